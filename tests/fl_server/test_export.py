"""``oncofed-server export``: a finished run as a MONAI bundle that MONAI's own runner executes on a DICOM series,
with the same network input and probability as oncofed's own preprocessing and model, and a model card."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from monai.bundle import ConfigParser

from fl_client.explainer import Explainer
from fl_server.cli import main
from fl_server.export import hanley_mcneil, render_card, wilson
from imaging.catalog import Catalog
from models.config import RunConfig, from_flat
from models.evaluation import Calibration, Scoring
from models.nets import build_model
from models.weights import load_checkpoint, save_checkpoint, state_arrays
from tests.consortium import make_workspaces

ROOT = Path(__file__).resolve().parents[2]


def _site_metrics(pos: int, neg: int, auroc: float) -> dict[str, float]:
    return {"studies": pos + neg, "positives": pos, "negatives": neg, "threshold": 0.5, "auroc": auroc,
            "sensitivity": 0.5, "specificity": 0.75}


def _finished_run(run_dir: Path, task: str = "lung-ct") -> Path:
    """A run directory as the server leaves it after two rounds (no Flower: written by hand)."""
    flat = {**RunConfig().to_flat(), "task": task, "dp": True}
    torch.manual_seed(7)
    arrays = state_arrays(build_model(from_flat(flat).model))
    (run_dir / "checkpoints").mkdir(parents=True)
    for rnd in (1, 2):
        save_checkpoint(run_dir / "checkpoints" / f"round-{rnd:03d}.pt", arrays, flat, round_number=rnd)
    save_checkpoint(run_dir / "model.pt", arrays, flat, round_number=2)
    (run_dir / "config.json").write_text(json.dumps({"schema": "oncofed.run/1", "run_id": "42", "started": 1.0,
                                                     "run_config": flat}))
    train = {"site-a": {"num-examples": 20, "train-loss": 0.6, "dp": 1, "epsilon": 1.5, "epsilon-max": 8.0},
             "site-b": {"num-examples": 10, "train-loss": 0.7, "dp": 1, "epsilon": 2.25, "epsilon-max": 4.0}}
    rounds = [{"round": r, "train": train, "evaluate": {"site-a": _site_metrics(2, 2, 0.75)}, "aggregated_sites": 2,
               "checkpoint": f"checkpoints/round-{r:03d}.pt"} for r in (1, 2)]
    final = {"split": "test", "sites": {"site-a": _site_metrics(6, 4, 0.8), "site-b": _site_metrics(4, 8, 0.7)}}
    (run_dir / "history.json").write_text(json.dumps({"schema": "oncofed.run/1", "run_id": "42", "task": task,
                                                      "strategy": "fedavg", "rounds": rounds, "final": final,
                                                      "finished": 2.0}))
    return run_dir


def test_export_is_a_monai_bundle_that_scores_a_series_as_oncofed_does(tmp_path: Path,
                                                                        capsys: pytest.CaptureFixture[str]) -> None:
    ws = make_workspaces(tmp_path / "c", sites=1, studies_per_task=4, seed=11, tasks=["lung-ct"])
    run_dir, out = _finished_run(tmp_path / "run"), tmp_path / "bundle"
    # The global model carries its run's recalibration: the bundle's probability is the calibrated one too.
    arrays, flat, rnd = load_checkpoint(run_dir / "model.pt")
    save_checkpoint(run_dir / "model.pt", arrays, flat, round_number=rnd,
                    scoring=Scoring(Calibration(2.5, -0.4, 12, 12), 0.5, "Youden"))
    assert main(["export", str(run_dir), "--out", str(out)]) == 0
    assert "TorchScript within" in capsys.readouterr().out
    inference = json.loads((out / "configs" / "inference.json").read_text())
    assert (inference["calibration_slope"], inference["calibration_intercept"]) == (2.5, -0.4)
    card_text = json.loads((out / "docs" / "model-card.json").read_text())["network"]["output"]
    assert "sigmoid(2.5000 × logit -0.4000)" in card_text  # the card says what the bundle does

    for path in ("configs/metadata.json", "configs/inference.json", "models/model.pt", "models/model.ts",
                 "docs/README.md", "docs/model-card.md", "docs/model-card.json"):
        assert (out / path).is_file(), path
    sums = dict(reversed(line.split("  ")) for line in (out / "SHA256SUMS").read_text().splitlines())
    assert set(sums) == {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()} - {"SHA256SUMS"}
    assert all(hashlib.sha256((out / p).read_bytes()).hexdigest() == d for p, d in sums.items())

    card = json.loads((out / "docs" / "model-card.json").read_text())
    assert card["research_use_only"] and "not for clinical decisions" in (out / "docs" / "model-card.md").read_text()
    assert card["preprocessing"]["voxel_size_mm"] == [5.5, 5.5, 5.0]
    assert card["preprocessing"]["field_of_view_mm"] == [352.0, 352.0, 160.0]
    assert card["preprocessing"]["oncofed_transforms"] == ["imaging.transforms.LungFieldd"]
    assert card["sites"] == {"trained": ["site-a", "site-b"], "evaluated": ["site-a", "site-b"],
                             "studies": {"site-a": 10, "site-b": 12}}
    assert card["privacy"]["epsilon_per_site"]["site-b"] == {"epsilon": 2.25, "epsilon_max": 4.0}
    pooled = card["metrics"]["pooled"]
    assert pooled["sensitivity"]["value"] == pytest.approx(0.5)
    assert pooled["specificity"]["value"] == pytest.approx(0.75)
    assert pooled["auroc"]["value"] == pytest.approx((0.8 * 10 + 0.7 * 12) / 22)
    low, high = card["metrics"]["per_site"]["site-a"]["auroc"]["ci95"]
    assert low < 0.8 < high
    assert card["network"]["parameters"] > 0 and card["code_version"]["oncofed"]
    assert card["files_sha256"]["models/model.ts"] == sums["models/model.ts"]

    with Catalog.open(ws / "site-a", create=False) as catalog:
        item = catalog.items("lung-ct")[0]
    series = Path(item.plan.slices[0].path).parent
    explainer = Explainer.load(run_dir / "model.pt")
    ours = explainer.network_input(item, workspace=ws / "site-a")
    expected = explainer.probabilities([ours])[0]

    # The bundle's own preprocessing, parsed by MONAI from inference.json, gives oncofed's network input.
    parser = ConfigParser()
    parser.read_config(out / "configs" / "inference.json")
    parser.update({"bundle_root": str(out), "input_dir": str(series)})
    theirs = parser.get_parsed_content("dataset")[0]["image"]
    assert theirs.shape == ours.shape
    assert float((torch.as_tensor(theirs) - ours).abs().max()) < 1e-5

    # MONAI's own bundle runner, its command line as a hospital's team types it, writes the same probability.
    scores = _monai_run(out, series, tmp_path / "result")
    assert [s["image"] for s in scores] == [str(series)]
    assert scores[0]["probability"] == pytest.approx(expected, abs=1e-5)


def test_a_colorectal_bundle_calibrates_and_suppresses_as_oncofed_does(tmp_path: Path) -> None:
    # The non-IID consortium's unlike site (CT 35 HU off, twice the noise): the bundle's fat calibration and
    # bright-structure step, with the settings it writes out, give oncofed's own network input.
    from imaging.synth import ingested_consortium

    ws = ingested_consortium(tmp_path / "c", sites=3, studies_per_task=4, seed=11, tasks=["colorectal-ct"],
                             unlike="site-c")
    run_dir, out = _finished_run(tmp_path / "run", "colorectal-ct"), tmp_path / "bundle"
    assert main(["export", str(run_dir), "--out", str(out)]) == 0
    steps = json.loads((out / "configs" / "inference.json").read_text())["preprocessing"]["transforms"]
    calibrate = next(s for s in steps if s["_target_"] == "imaging.transforms.CalibrateHUd")
    suppress = next(s for s in steps if s["_target_"] == "imaging.transforms.SuppressBrightd")
    assert calibrate["reference"] == -100.0 and calibrate["max_shift"] == 60.0
    assert (suppress["threshold"], suppress["median"], suppress["bone"]) == (160.0, 3, 300.0)
    with Catalog.open(ws / "site-c", create=False) as catalog:
        item = catalog.items("colorectal-ct")[0]
    ours = Explainer.load(run_dir / "model.pt").network_input(item, workspace=ws / "site-c")
    parser = ConfigParser()
    parser.read_config(out / "configs" / "inference.json")
    parser.update({"bundle_root": str(out), "input_dir": str(Path(item.plan.slices[0].path).parent)})
    theirs = parser.get_parsed_content("dataset")[0]["image"]
    assert theirs.shape == ours.shape
    assert float((torch.as_tensor(theirs) - ours).abs().max()) < 1e-5


def test_a_model_replaced_during_export_gives_one_files_bundle(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The run's model.pt is read once: replaced right after (a resumed run writing its global model), the bundle's
    weights, its calibration and the card's are still all that first file's."""
    import models.weights as weights

    run_dir, out = _finished_run(tmp_path / "run"), tmp_path / "bundle"
    flat = {**RunConfig().to_flat(), "task": "lung-ct", "dp": True}
    arrays = load_checkpoint(run_dir / "model.pt")[0]
    first = Scoring(Calibration(2.0, -0.5, 10, 12, "validation histograms, all sites pooled"), 0.4, "Youden")
    save_checkpoint(run_dir / "model.pt", arrays, flat, round_number=2, scoring=first)
    torch.manual_seed(8)
    newer = tmp_path / "newer.pt"
    save_checkpoint(newer, state_arrays(build_model(from_flat(flat).model)), flat, round_number=2,
                    scoring=Scoring(Calibration(3.0, 0.25, 10, 12, "validation histograms, all sites pooled"), 0.6,
                                    "Youden"))
    read = weights._read_bytes

    def read_then_replace(path: Path) -> bytes:
        data = read(path)
        if newer.exists():
            newer.replace(path)
        return data

    monkeypatch.setattr(weights, "_read_bytes", read_then_replace)
    assert main(["export", str(run_dir), "--out", str(out)]) == 0
    assert not newer.exists()  # the file was replaced during the export
    bundled = torch.load(out / "models" / "model.pt", weights_only=True)
    assert all(np.array_equal(bundled[k].numpy(), v) for k, v in arrays.items())
    inference = json.loads((out / "configs" / "inference.json").read_text())
    assert (inference["calibration_slope"], inference["calibration_intercept"]) == (2.0, -0.5)
    card = json.loads((out / "docs" / "model-card.json").read_text())
    assert json.dumps(card).count('"slope": 2.0') >= 1 and '"slope": 3.0' not in json.dumps(card)


def _monai_run(out: Path, input_dir: Path, result: Path) -> list[dict[str, object]]:
    """MONAI's own bundle runner, its command line as a hospital's team types it."""
    done = subprocess.run([sys.executable, "-m", "monai.bundle", "run", "--config_file",
                           str(out / "configs" / "inference.json"), "--meta_file",
                           str(out / "configs" / "metadata.json"), "--bundle_root", str(out),
                           "--input_dir", str(input_dir), "--output_dir", str(result)],
                          capture_output=True, text=True, timeout=120, cwd=result.parent,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads((result / "probabilities.json").read_text())


def test_mammography_export_scores_each_view_as_oncofed_does(tmp_path: Path) -> None:
    """2D bundles read each view with oncofed's reader (pixel spacing, laterality), mirror left breasts and score
    every image of a study folder: the same network input and probability as oncofed's, for both sides."""
    ws = make_workspaces(tmp_path / "c", sites=1, studies_per_task=6, seed=5, tasks=["breast-mg"])
    run_dir, out = _finished_run(tmp_path / "run", "breast-mg"), tmp_path / "bundle"
    assert main(["export", str(run_dir), "--out", str(out)]) == 0
    card = json.loads((out / "docs" / "model-card.json").read_text())
    assert card["preprocessing"]["voxel_size_mm"] == [0.8, 0.8]
    assert card["preprocessing"]["oncofed_transforms"] == ["imaging.transforms.LoadDicomImaged",
                                                           "imaging.transforms.FlipToLateralityd",
                                                           "imaging.transforms.FindPectorald",
                                                           "imaging.transforms.RobustScaled",
                                                           "imaging.transforms.RemovePectorald",
                                                           "imaging.transforms.EnhanceCalcificationsd"]
    assert "most suspicious view" in (out / "docs" / "README.md").read_text()

    with Catalog.open(ws / "site-a", create=False) as catalog:
        items = catalog.items("breast-mg")
    sides = {item.plan.laterality for item in items}
    assert sides == {"L", "R"}, sides  # both sides, so the mirror is exercised
    # An MLO view of each side: the bundle removes its pectoral muscle as oncofed does.
    study = {item.plan.laterality: item for item in sorted(items, key=lambda i: i.plan.view == "MLO")}
    assert {item.plan.view for item in study.values()} == {"MLO"}
    explainer = Explainer.load(run_dir / "model.pt")
    parser = ConfigParser()
    parser.read_config(out / "configs" / "inference.json")
    for side, item in sorted(study.items()):
        ours = explainer.network_input(item, workspace=ws / "site-a")
        parser.update({"bundle_root": str(out), "input_dir": str(item.plan.slices[0].path)})
        theirs = parser.get_parsed_content("dataset", lazy=False)[0]["image"]
        assert theirs.shape == ours.shape, side
        assert float((torch.as_tensor(theirs) - ours).abs().max()) < 1e-5, side
        assert float(ours[0, -4:, :4].max()) == float(ours.min()), side  # the muscle's corner is background

    folder = Path(study["L"].plan.slices[0].path).parent
    views = [item for item in items if Path(item.plan.slices[0].path).parent == folder]
    expected = {str(item.plan.slices[0].path): p for item, p in
                zip(views, explainer.probabilities([explainer.network_input(v, workspace=ws / "site-a")
                                                    for v in views]), strict=True)}
    scores = _monai_run(out, folder, tmp_path / "result")
    assert {s["image"]: pytest.approx(s["probability"], abs=1e-5) for s in scores} == expected


def test_export_says_what_is_wrong_in_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["export", str(tmp_path / "nope"), "--out", str(tmp_path / "b")]) == 2
    assert "no run directory" in capsys.readouterr().err
    run_dir = _finished_run(tmp_path / "run")
    history = json.loads((run_dir / "history.json").read_text())
    (run_dir / "history.json").write_text(json.dumps({**history, "finished": None}))
    assert main(["export", str(run_dir), "--out", str(tmp_path / "b")]) == 2
    assert "has not finished" in capsys.readouterr().err
    (run_dir / "history.json").write_text(json.dumps(history))
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    assert main(["export", str(run_dir), "--out", str(tmp_path / "full")]) == 2
    assert "not empty" in capsys.readouterr().err
    assert main(["export", str(run_dir), "--out", str(tmp_path / "full"), "--force"]) == 0
    assert not (tmp_path / "full" / "x").exists() and (tmp_path / "full" / "models" / "model.ts").is_file()
    seg = _finished_run(tmp_path / "seg", "lung-ct-seg")
    assert main(["export", str(seg), "--out", str(tmp_path / "s")]) == 2
    assert "oncofed-site predict" in capsys.readouterr().err


def test_confidence_intervals() -> None:
    # Hanley & McNeil's variance by hand for A = 0.8, 10 positives, 20 negatives.
    q1, q2 = 0.8 / 1.2, 2 * 0.64 / 1.8
    se = ((0.8 * 0.2 + 9 * (q1 - 0.64) + 19 * (q2 - 0.64)) / 200) ** 0.5
    low, high = hanley_mcneil(0.8, 10, 20) or (0.0, 0.0)
    assert (low, high) == pytest.approx((0.8 - 1.959964 * se, 0.8 + 1.959964 * se), abs=1e-6)
    assert hanley_mcneil(0.8, 0, 5) is None and wilson(0.5, 0) is None
    assert wilson(0.5, 100) == pytest.approx((0.4038, 0.5962), abs=1e-4)


def test_model_card_takes_the_consortium_figures_when_the_sites_sent_histograms(tmp_path: Path) -> None:
    from fl_server.evaluation import consortium_figures, scoring_of
    from fl_server.export import model_card
    from models.evaluation import score_histogram

    run_dir = _finished_run(tmp_path / "run")
    history = json.loads((run_dir / "history.json").read_text())
    y = [0, 0, 0, 1, 1, 0, 1, 1, 0, 1]
    s = [0.1, 0.2, 0.6, 0.7, 0.9, 0.3, 0.4, 0.8, 0.05, 0.95]
    pos, neg = score_histogram(y, s)
    hists = {"site-a": {"pos": pos.tolist(), "neg": neg.tolist()}}
    history["final"]["consortium"] = consortium_figures(hists, hists, rule="sensitivity>=0.9")
    history["final"]["sites"]["site-a"].update({"auroc-low": 0.55, "auroc-high": 0.95})
    (run_dir / "history.json").write_text(json.dumps(history))
    card = model_card(run_dir, preprocessing={"task": "lung-ct"}, parameters=1, files={})
    m = card["metrics"]
    assert m["per_site"]["site-a"]["auroc"]["ci95"] == [0.55, 0.95]  # the site's DeLong interval
    assert m["pooled"]["auroc"]["value"] == pytest.approx(history["final"]["consortium"]["auroc"]["auroc"])
    assert "histograms" in m["ci_methods"]["pooled_auroc"]
    assert m["operating_point"]["rule"] == "sensitivity>=0.9" and m["operating_point"]["sensitivity"]["value"] == 1.0
    assert card["network"]["calibration"] is None  # 5 positives and 5 negatives: too few to fit
    # With enough validation studies the card carries the recalibration the sites apply, and the threshold on it.
    rng = np.random.default_rng(2)
    labels = np.r_[np.zeros(20), np.ones(20)].astype(int)
    scores = 1 / (1 + np.exp(-rng.normal(0.6 * labels - 0.3, 0.3)))
    pos, neg = score_histogram(labels, scores)
    hists = {"site-a": {"pos": pos.tolist(), "neg": neg.tolist()}}
    history["final"]["consortium"] = consortium_figures(hists, hists, rule="youden")
    (run_dir / "history.json").write_text(json.dumps(history))
    card = model_card(run_dir, preprocessing={"task": "lung-ct"}, parameters=1, files={})
    assert card["network"]["calibration"] is None  # the model.pt (what sites and the bundle apply) carries none yet
    arrays, flat, rnd = load_checkpoint(run_dir / "model.pt")  # as the server writes it at the end of the run
    save_checkpoint(run_dir / "model.pt", arrays, flat, round_number=rnd,
                    scoring=scoring_of(history["final"]["consortium"]))
    card = model_card(run_dir, preprocessing={"task": "lung-ct"}, parameters=1, files={})
    recal = history["final"]["consortium"]["calibration"]["recalibrated"]
    assert recal["fitted"] and card["network"]["calibration"]["slope"] == recal["slope"] > 1  # timid scores spread
    assert card["network"]["calibration"]["test_ece"] == recal["ece"]
    assert f"sigmoid({recal['slope']:.4f} × logit" in card["network"]["output"]
    assert card["metrics"]["operating_point"]["calibrated_threshold"] == pytest.approx(recal["threshold"])
    assert f"recalibrated: threshold {recal['threshold']:.4f}" in render_card(card)


def test_the_model_card_names_the_model_the_run_started_from(tmp_path: Path) -> None:
    from fl_server.export import model_card

    run_dir = _finished_run(tmp_path / "run")
    card = model_card(run_dir, preprocessing={"task": "lung-ct"}, parameters=1, files={})
    assert card["run"]["initial_model"] is None and "started from fresh weights" in render_card(card)
    history = json.loads((run_dir / "history.json").read_text())
    history["initial_model"] = {"file": "/lead/archive/public-lung.pt", "sha256": "c" * 64, "task": "lung-ct",
                                "norm": "instance", "dp": False, "round": 0,
                                "tested": {"split": "test", "studies": 40, "positives": 20, "auroc": 0.9,
                                           "auroc_low": 0.8, "auroc_high": 1.0}}
    (run_dir / "history.json").write_text(json.dumps(history))
    config = json.loads((run_dir / "config.json").read_text())
    config["run_config"]["initial-model"] = "/lead/archive/public-lung.pt"
    (run_dir / "config.json").write_text(json.dumps(config))
    card = model_card(run_dir, preprocessing={"task": "lung-ct"}, parameters=1, files={})
    assert card["run"]["initial_model"] == {"file": "public-lung.pt", "sha256": "c" * 64, "task": "lung-ct",
                                            "round": 0, "dp": False, "tested": history["initial_model"]["tested"]}
    assert card["run"]["configuration"]["initial-model"] == "public-lung.pt"
    text = render_card(card)
    assert f"started from `public-lung.pt` (SHA-256 {'c' * 64}), a local run's lung-ct model; AUROC 0.900 " \
        "(0.800–1.000) on the 40 test studies (20 positive) of the run that trained it" in text
    assert "/lead/archive" not in json.dumps(card)
