"""Predicted lesion masks back to the radiologist: DICOM SEG, overlays and predictions.json from
``oncofed-site predict``, SEG stored to a real Orthanc, and the outlines on the review page in headless Chromium."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import highdicom as hd
import numpy as np
import pydicom
import pytest
import torch

from fl_client.explainer import Explainer
from fl_client.predict import PREDICTED_COLOUR, REFERENCE_COLOUR, dice, predict, reference_mask
from imaging.catalog import Catalog
from imaging.seg_dicom import predicted_mask
from models.config import from_flat
from models.nets import build_model
from models.tasks import PREPROCESSING_VERSION
from models.weights import state_arrays

BROWSER_FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]


def save_model(path: Path, task: str, *, logit: float | None = None, seed: int = 0) -> Path:
    """A model.pt of ``task`` with random weights, or (``logit``) a UNet whose every voxel gets that logit."""
    torch.manual_seed(seed)
    flat = {"task": task, "model-width": 8}
    net = build_model(from_flat(flat).model)
    if logit is not None:
        with torch.no_grad():
            for p in net.parameters():
                p.zero_()
            convs = [m for m in net.modules() if isinstance(m, torch.nn.modules.conv._ConvNd)]
            assert convs[-1].bias is not None
            convs[-1].bias.fill_(logit)
    torch.save({"arrays": {k: torch.from_numpy(v) for k, v in state_arrays(net).items()}, "run_config": flat,
                "round": 0, "preprocessing_version": PREPROCESSING_VERSION}, path)
    return path


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from consortium import make_workspaces

    from fl_client.local_run import run_local

    root = tmp_path_factory.mktemp("predict")
    ws = make_workspaces(root, sites=1, studies_per_task=4, seed=21, tasks=["lung-ct", "breast-mg"]) / "site-a"
    config = from_flat({"task": "lung-ct-seg", "model-width": 8, "batch-size": 4, "threads": 2})
    run_local([ws], config, root / "lung-seg", epochs=2)
    return {"ws": ws, "trained": root / "lung-seg" / "model.pt",
            "full": save_model(root / "full.pt", "lung-ct-seg", logit=8.0),
            "breast": save_model(root / "breast.pt", "breast-mg-seg", logit=8.0),
            "classifier": save_model(root / "lung.pt", "lung-ct")}


def cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    """``oncofed-site ARGS`` in this process (as the console script runs it): exit code, stdout, stderr."""
    from fl_client.cli import main

    capsys.readouterr()
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def test_predict_writes_seg_overlays_and_figures(site: dict[str, Path], tmp_path: Path) -> None:
    ws = site["ws"]
    with Catalog.open(ws) as catalog:
        items = {i.plan.key: i for i in catalog.items("lung-ct-seg", labelled_only=False)}
    assert any(i.mask is not None for i in items.values()), "the synthetic lesions arrive as DICOM SEG"
    calls: list[tuple[int, int]] = []
    doc = predict(ws, site["trained"], tmp_path / "out", split="all", on_study=lambda d, t, _: calls.append((d, t)))
    assert doc["schema"] == "oncofed.predict/1" and doc["task"] == "lung-ct-seg" and calls[-1] == (4, 4)
    assert json.loads((tmp_path / "out" / "predictions.json").read_text())["images"] == doc["images"]
    for entry in doc["images"]:
        item = items[entry["image"]]
        assert "error" not in entry and item.study_uid not in entry["folder"] + entry["seg"] + entry["png"]
        seg = hd.seg.segread(tmp_path / "out" / entry["seg"])
        assert seg.StudyInstanceUID == item.study_uid and seg.SeriesInstanceUID == entry["seg_series_uid"]
        uids = [str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in item.plan.paths]
        mask = seg.get_pixels_by_source_instance(uids, segment_numbers=[1], combine_segments=True) > 0
        assert mask.sum() == entry["voxels"] and entry["volume_ml"] == pytest.approx(
            mask.sum() * np.prod(item.plan.spacing) / 1000, rel=1e-3) and entry["area_cm2"] is None
        ref = reference_mask(item)
        assert ref is not None  # every synthetic study is annotated or labelled 0
        assert entry["reference"]["voxels"] == ref.sum()
        assert entry["dice"] == (None if not ref.any() else pytest.approx(dice(mask, ref), abs=1e-4))
        png = (tmp_path / "out" / entry["png"]).read_bytes()
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    assert {e["dice"] is None for e in doc["images"]} == {True, False}  # studies with and without a lesion

    # The same model again: the same objects (a PACS replaces them), whatever the folder.
    again = predict(ws, site["trained"], tmp_path / "again", split="all")
    assert [(e["seg_series_uid"], e["seg_sop_instance_uid"]) for e in again["images"]] == \
        [(e["seg_series_uid"], e["seg_sop_instance_uid"]) for e in doc["images"]]


def test_what_a_constant_model_outlines_is_exactly_its_field_of_view(site: dict[str, Path], tmp_path: Path) -> None:
    ws = site["ws"]
    doc = predict(ws, site["full"], tmp_path / "lung", split="all")
    explainer = Explainer.load(site["full"])
    with Catalog.open(ws) as catalog:
        items = {i.plan.key: i for i in catalog.items("lung-ct-seg", labelled_only=False)}
    for entry in doc["images"]:
        item = items[entry["image"]]
        x = explainer.network_input(item, workspace=ws)
        probabilities = explainer.lesion_probabilities(x)
        assert probabilities.min() > 0.99  # logit 8 everywhere
        expected = predicted_mask(np.ones_like(probabilities), item.plan, explainer.preset)
        assert entry["voxels"] == expected.sum() and entry["lesions"] == 1
        assert entry["max_probability"] == pytest.approx(1 / (1 + np.exp(-8.0)), abs=1e-4)
    # A mammography study: an area per view, both views in the study's folder.
    with Catalog.open(ws) as catalog:
        study = catalog.items("breast-mg-seg")[0].study_uid
    breast = predict(ws, site["breast"], tmp_path / "breast", study=study)
    assert len(breast["images"]) == 2 and len({e["folder"] for e in breast["images"]}) == 1
    assert {e["view"].split()[1] for e in breast["images"]} == {"CC", "MLO"}
    assert all(e["area_cm2"] > 0 and e["volume_ml"] is None and e["lesions"] == 1 for e in breast["images"])


def test_predict_and_evaluation_drop_lesions_below_the_tasks_smallest(site: dict[str, Path], tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """Both paths pass their mask through the smallest-lesion filter with the preset's size (lung: 4 mm): on the
    DICOM grid for predict, on the network's grid for evaluation. A filter that drops everything leaves nothing."""
    import fl_client.predict as predict_module
    import fl_client.train as train_module
    from fl_client.train import evaluate_local
    from imaging.presets import get_preset
    from imaging.sitedata import load_site_data

    calls: list[tuple[str, tuple[float, ...], float]] = []

    def spy(where: str) -> Any:
        def drop_all(mask: np.ndarray, *, spacing: Any, min_diameter_mm: float) -> np.ndarray:
            calls.append((where, tuple(spacing), min_diameter_mm))
            return np.zeros_like(np.asarray(mask, bool))
        return drop_all

    monkeypatch.setattr(predict_module, "without_small_lesions", spy("predict"))
    monkeypatch.setattr(train_module, "without_small_lesions", spy("evaluate"))
    doc = predict(site["ws"], site["full"], tmp_path / "out", split="all")
    assert doc["images"] and all(e["voxels"] == 0 and e["lesions"] == 0 for e in doc["images"])
    preset = get_preset("lung-ct-seg")
    assert {(w, m) for w, _, m in calls} == {("predict", preset.min_lesion_mm)} and preset.min_lesion_mm == 4.0
    calls.clear()
    result = evaluate_local(Explainer.load(site["full"]).net, load_site_data([site["ws"]], "lung-ct-seg"), "train")
    assert result is not None and result.metrics.fp_lesions == 0.0 and result.metrics.lesion_sensitivity == 0.0
    assert calls and all(c == ("evaluate", preset.target_spacing, 4.0) for c in calls)


def test_the_site_outlines_as_evaluation_does(site: dict[str, Path]) -> None:
    from torch.utils.data import TensorDataset

    from fl_client.train import predict_masks

    explainer = Explainer.load(site["trained"])
    with Catalog.open(site["ws"]) as catalog:
        item = catalog.items("lung-ct-seg")[0]
    x = explainer.network_input(item, workspace=site["ws"])
    (expected, _, _), = predict_masks(explainer.net, TensorDataset(x[None], torch.zeros_like(x)[None]),
                                      roi_size=explainer.preset.patch_size)
    assert np.allclose(explainer.lesion_probabilities(x), expected, atol=1e-6)
    with pytest.raises(ValueError, match="need a \\*-seg model"):
        Explainer.load(site["classifier"]).lesion_probabilities(x)


@pytest.mark.slow
def test_predict_on_the_command_line_stores_seg_to_the_pacs(site: dict[str, Path], tmp_path: Path,
                                                            capsys: pytest.CaptureFixture[str],
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    from orthanc import orthanc

    ws = site["ws"]
    monkeypatch.setenv("COLUMNS", "200")
    with orthanc(tmp_path / "orthanc") as server:
        monkeypatch.setenv("ONCOFED_PACS_USER", server.user)
        monkeypatch.setenv("ONCOFED_PACS_PASSWORD", server.password)
        args = ["predict", "--workspace", str(ws), "--model", str(site["trained"]), "--out", str(tmp_path / "out"),
                "--split", "all", "--device", "cpu", "--store-to", server.dicomweb]
        code, out, err = cli(capsys, *args)
        assert code == 0, out + err
        assert "Stored 4 SEG object(s) of 4 study(ies)" in out and "lung-ct-seg: 4 image(s)" in out
        assert int(server.statistics()["CountInstances"]) == 4
        found = json.loads(server._request("/tools/find", json.dumps(
            {"Level": "Instance", "Query": {}, "Expand": True}).encode(), "POST"))
        written = json.loads((tmp_path / "out" / "predictions.json").read_text())["images"]
        assert {f["MainDicomTags"].get("SOPInstanceUID") for f in found} == {e["seg_sop_instance_uid"] for e in written}
        # Predicting again replaces the SEG objects in the PACS rather than adding new ones.
        code, out, err = cli(capsys, *args)
        assert code == 0 and int(server.statistics()["CountInstances"]) == 4, out + err
    with sqlite3.connect(ws / "catalog.sqlite") as db:
        (stored,) = db.execute("SELECT COUNT(DISTINCT sop_instance_uid) FROM pacs_stored WHERE url = ?",
                               (server.dicomweb,)).fetchone()
    assert stored == 4


def test_the_wrong_kind_of_model_gets_one_line_naming_the_right_command(site: dict[str, Path], tmp_path: Path,
                                                                       capsys: pytest.CaptureFixture[str]) -> None:
    ws = str(site["ws"])
    for args, needle in [
        (["predict", "--workspace", ws, "--model", str(site["classifier"]), "--out", str(tmp_path / "p")],
         "use 'oncofed-site explain'"),
        (["explain", "--workspace", ws, "--model", str(site["trained"]), "--out", str(tmp_path / "e")],
         "use 'oncofed-site predict'"),
        (["predict", "--workspace", ws, "--model", str(site["trained"]), "--out", str(tmp_path / "p"), "--study",
          "1.2.3.4"], "no usable image of study 1.2.3.4 for task lung-ct-seg"),
        (["predict", "--workspace", str(tmp_path / "nope"), "--model", str(site["trained"]), "--out", str(tmp_path)],
         "does not exist"),
        (["predict", "--workspace", ws, "--model", str(tmp_path / "missing.pt"), "--out", str(tmp_path / "p")],
         "missing.pt"),
    ]:
        code, _, err = cli(capsys, *args)
        assert code == 2 and needle in err and "Traceback" not in err, err
        assert len(err.strip().splitlines()) == 1, err
    with pytest.raises(SystemExit):
        cli(capsys, "predict", "--help")
    assert "examples:" in capsys.readouterr().out


@pytest.fixture
def review_server(site: dict[str, Path]) -> Iterator[str]:
    proc = subprocess.Popen([sys.executable, "-m", "fl_client.cli", "review", "--workspace", str(site["ws"]), "--model",
                             str(site["full"]), "--model", str(site["breast"]), "--port", "0", "--device", "cpu"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "COLUMNS": "200"})
    url = None
    deadline = time.monotonic() + 180
    assert proc.stdout is not None
    while url is None and time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            pytest.fail(f"review server exited: {proc.stderr.read() if proc.stderr else ''}")
        if "Review page:" in line:
            url = line.split("Review page:")[1].split()[0].rstrip("/")
    assert url is not None
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(url + "/", timeout=5).read()
            break
        except OSError:
            time.sleep(0.2)
    yield url
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=30) == 0


def _colours(png: bytes) -> set[tuple[int, int, int]]:
    import io

    from PIL import Image

    rgba = np.asarray(Image.open(io.BytesIO(png)).convert("RGBA"))
    return {tuple(int(v) for v in c) for c in rgba[rgba[..., 3] > 0][:, :3]}  # type: ignore[misc]


def _rgb(colour: str) -> tuple[int, int, int]:
    return int(colour[1:3], 16), int(colour[3:5], 16), int(colour[5:7], 16)


@pytest.mark.slow
def test_the_review_page_shows_outlines_and_records_the_verdict(site: dict[str, Path], review_server: str,
                                                                tmp_path: Path) -> None:
    from conftest import system_tool
    from playwright.sync_api import expect, sync_playwright

    chromium = system_tool("chromium")
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=chromium, headless=True, args=BROWSER_FLAGS)
        page = browser.new_page(viewport={"width": 1400, "height": 950})
        errors: list[str] = []
        page.on("pageerror", lambda exc: errors.append(str(exc)))
        page.goto(review_server + "/")
        rows = page.locator("tr.case")
        expect(rows.first).to_be_visible()
        # The worklist shows the predicted lesion's size, in ml for CT and cm² for mammograms.
        page.select_option("#filter-task", "lung-ct-seg")
        page.select_option("#filter-label", "1")
        sizes = page.locator("tr.case td.score").all_inner_texts()
        assert sizes and all(s.endswith(" ml") for s in sizes), sizes
        rows.first.click()
        expect(page.locator("#score-label")).to_have_text("predicted lesion volume")
        expect(page.locator("#score")).to_contain_text("ml (1 lesion)")
        expect(page.locator("#legend")).to_contain_text("predicted lesion (model)")
        expect(page.locator("#legend")).to_contain_text("reference annotation")
        assert page.locator("#method").is_hidden()
        outlines_loaded = ("() => { const i = document.getElementById('overlay-img'); "
                           "return i.complete && i.naturalWidth > 0 && i.src.includes('/outlines/'); }")
        page.wait_for_function(outlines_loaded)
        expect(page.locator("#slice-label")).to_contain_text("(most lesion)")
        # The slice with the most lesion shows the model's outline over the reference annotation's.
        first = page.evaluate("document.getElementById('overlay-img').src")
        colours = _colours(page.request.get(first).body())
        assert _rgb(PREDICTED_COLOUR) in colours and _rgb(REFERENCE_COLOUR) in colours
        page.locator("#slice").fill("2")
        expect(page.locator("#overlay-img")).to_have_attribute("src", "/".join(first.split("/")[:-1])[
            len(review_server):] + "/2.png")
        page.wait_for_function(outlines_loaded)
        page.locator("#opacity").fill("70")
        assert page.eval_on_selector("#overlay-img", "e => e.style.opacity") == "0.7"
        # The verdict, as for a classifier.
        page.check("input[name=verdict][value=disagree]")
        page.fill("#comment", "outline far too wide")
        page.fill("#reader", "CD")
        page.click("#save")
        expect(page.locator("#status")).to_contain_text("saved")
        key = page.evaluate("state.meta.key")
        # A mammogram: its area.
        page.select_option("#filter-label", "")
        page.select_option("#filter-task", "breast-mg-seg")
        assert all(s.endswith(" cm²") for s in page.locator("tr.case td.score").all_inner_texts())
        rows.first.click()
        expect(page.locator("#score-label")).to_have_text("predicted lesion area")
        page.wait_for_function(outlines_loaded)
        assert page.locator("#slice").is_disabled()
        shot = tmp_path / "review-seg.png"
        page.screenshot(path=str(shot), full_page=True)
        assert not errors, errors
        browser.close()
    with sqlite3.connect(site["ws"] / "catalog.sqlite") as db:
        db.row_factory = sqlite3.Row
        rows_: list[Any] = db.execute("SELECT * FROM review_verdicts WHERE image_key = ?", (key,)).fetchall()
    (row,) = rows_
    assert row["task"] == "lung-ct-seg" and row["verdict"] == "disagree" and row["reader"] == "CD"
    assert row["comment"] == "outline far too wide" and row["probability"] == pytest.approx(1 / (1 + np.exp(-8)),
                                                                                             abs=1e-4)
