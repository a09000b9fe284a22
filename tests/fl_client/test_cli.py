"""The site CLI as a user runs it: real processes, real files."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from consortium import run_side_by_side
from dicom_factory import write_mammogram, write_series

from imaging.catalog import Catalog


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "fl_client.cli", *args], capture_output=True, text=True, timeout=300,
        env={**os.environ, "COLUMNS": "200"},
    )


@pytest.fixture()
def site(tmp_path: Path) -> tuple[Path, Path, Path]:
    src = tmp_path / "dicom"
    for i in range(4):
        write_series(src / f"ct{i}", n=16, rows=6, cols=6, patient_id=f"SECRET-PID-{i}", seed=i)
    write_mammogram(src / "mg")
    paths, _, _ = write_series(src / "broken", n=16, rows=6, cols=6, patient_id="SECRET-PID-9", seed=9)
    paths[3].unlink()  # a missing slice
    ws = tmp_path / "ws"
    labels = tmp_path / "labels.csv"
    return src, ws, labels


def test_ingest_status_series_end_to_end(site: tuple[Path, Path, Path]) -> None:
    src, ws, labels = site
    first = run("ingest", "--workspace", str(ws), "--source", str(src))
    assert first.returncode == 0, first.stderr
    assert "series accepted / rejected" in first.stdout and "missing-slice" in first.stdout
    with Catalog.open(ws) as catalog:
        studies = [r[0] for r in catalog.db.execute("SELECT study_uid FROM studies ORDER BY 1")]
        phi = [v for row in catalog.db.execute("SELECT patient_id, patient_name, accession, study_date, "
                                                "study_uid FROM studies") for v in row if v]
        phi += [r[0] for r in catalog.db.execute("SELECT series_uid FROM series")]
    labels.write_text("study_instance_uid,task,label\n" + "".join(
        f"{s},lung-ct,{i % 2}\n" for i, s in enumerate(studies)))
    second = run("ingest", "--workspace", str(ws), "--source", str(src), "--labels", str(labels))
    assert second.returncode == 0, second.stderr
    assert "files unchanged (skipped)" in second.stdout

    status = run("status", "--workspace", str(ws), "--json")
    assert status.returncode == 0, status.stderr
    doc = json.loads(status.stdout)
    assert doc["schema"] == "oncofed.site-status/1"
    assert doc["series"] == {"ok": 5, "rejected": 1}
    assert {"level": "series", "reason": "missing-slice", "count": 1} in doc["rejects"]
    assert doc["tasks"]["lung-ct"]["labelled_studies"] == 4
    for secret in phi + ["SECRET", "TEST^PATIENT", str(src)]:
        assert secret not in status.stdout, f"status --json leaks {secret!r}"

    listing = json.loads(run("series", "--workspace", str(ws), "--json").stdout)
    assert listing["schema"] == "oncofed.series/1"
    rejected = [s for s in listing["series"] if s["status"] == "rejected"]
    assert len(rejected) == 1 and rejected[0]["reason"] == "missing-slice"
    human = run("status", "--workspace", str(ws))
    assert human.returncode == 0 and "lung-ct" in human.stdout


@pytest.mark.parametrize("command", ["ingest", "status", "series", "explain", "review", "join", "policy", "runs",
                                     "approve", "refuse", "model"])
def test_help_has_an_example(command: str) -> None:
    out = run(command, "--help")
    assert out.returncode == 0 and ("example:" in out.stdout or "examples:" in out.stdout)
    assert "oncofed-site " + command in out.stdout


def test_user_mistakes_are_one_clear_line(tmp_path: Path) -> None:
    missing = run("status", "--workspace", str(tmp_path / "nowhere"))
    assert missing.returncode == 2 and "run 'oncofed-site ingest" in missing.stderr
    assert "Traceback" not in missing.stderr
    no_folder = run("ingest", "--workspace", str(tmp_path / "ws"), "--source", str(tmp_path / "nope"))
    assert no_folder.returncode == 2 and "is not a folder" in no_folder.stderr
    bad_csv = tmp_path / "labels.csv"
    bad_csv.write_text("uid,label\n")
    bad = run("ingest", "--workspace", str(tmp_path / "ws"), "--labels", str(bad_csv))
    assert bad.returncode == 2 and "missing column" in bad.stderr and "Traceback" not in bad.stderr


def test_a_path_that_cannot_be_used_is_one_line_before_any_work(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    for args in (["ingest", "--workspace", str(blocker / "ws"), "--source", str(tmp_path)],
                 ["train-local", "--workspace", str(tmp_path), "--task", "lung-ct", "--out", str(blocker / "out")]):
        done = run(*args)
        assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
        assert f"cannot use {blocker}" in done.stderr and "Not a directory" in done.stderr
        assert "epochs" not in done.stdout


def test_a_device_this_machine_lacks_is_one_clear_line(tmp_path: Path) -> None:
    import torch

    missing = f"cuda:{torch.cuda.device_count() if torch.cuda.is_available() else 1}"  # one past the last GPU
    model = tmp_path / "model.pt"
    model.write_bytes(b"")
    commands = [["train-local", "--workspace", str(tmp_path), "--task", "lung-ct", "--out", str(tmp_path / "o")],
                ["explain", "--workspace", str(tmp_path), "--model", str(model), "--out", str(tmp_path / "e")],
                ["review", "--workspace", str(tmp_path), "--model", str(model), "--port", "0"]]
    *answers, bad = run_side_by_side(
        [[sys.executable, "-m", "fl_client.cli", *c, "--device", missing] for c in commands]
        + [[sys.executable, "-m", "fl_client.cli", "train-local", "--workspace", str(tmp_path), "--task", "lung-ct",
            "--out", str(tmp_path / "o"), "--device", "cpu", "--precision", "fp16"]])  # fp16 is CUDA's alone
    for done in answers:
        assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
        assert f"device '{missing}' does not exist on this machine" in done.stderr, done.stderr
    assert bad.returncode == 2 and "fp16 needs a CUDA device" in bad.stderr


def test_model_says_what_a_model_file_holds_and_how_its_scores_are_read(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    monkeypatch.setenv("COLUMNS", "250")  # the table's rows on one line each

    from fl_client.cli import main
    from models.config import from_flat
    from models.evaluation import Calibration, HeldOutFigures, Scoring
    from models.nets import build_model
    from models.weights import save_checkpoint, state_arrays

    torch.manual_seed(0)
    flat = {"task": "colorectal-ct", "model-width": 8, "dp": True, "dp-epsilon": 3.0}
    arrays = state_arrays(build_model(from_flat(flat).model))
    model = tmp_path / "model.pt"
    scoring = Scoring(Calibration(2.41, -0.59, 22, 21, "validation histograms, all sites pooled", "logistic", 10.2),
                      0.52, "Youden's J (sensitivity + specificity - 1) maximised on validation")
    save_checkpoint(model, arrays, flat, round_number=30, scoring=scoring)
    assert main(["model", str(model), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert (doc["task"], doc["round"], doc["dp"], doc["dp_epsilon"]) == ("colorectal-ct", 30, True, 3.0)
    assert doc["calibration"]["slope"] == 2.41 and doc["calibration"]["update"] == "logistic"
    assert doc["operating_point"]["threshold"] == 0.52
    assert doc["operating_point"]["shown_threshold"] == pytest.approx(float(scoring.shown_threshold))
    assert len(doc["sha256"]) == 64 and doc["parameters"] > 0 and doc["tested"] is None
    assert main(["model", str(model)]) == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "recalibrated (slope and intercept): sigmoid(2.410 × logit -0.590)" in text and "ε 3 per site" in text
    local = tmp_path / "local.pt"
    save_checkpoint(local, arrays, {"task": "colorectal-ct", "model-width": 8}, round_number=0,
                    tested=HeldOutFigures("test", 30, 14, 0.81, 0.65, 0.97))
    assert main(["model", str(local)]) == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "the network's own sigmoid" in text and "a local run" in text and "none carried: no study is marked" in text
    # What a site hands over with the file, if it gives it to the lead as a start: how it scored on its test split.
    assert "AUROC 0.810 (0.650–0.970) on the 30 test studies (14 positive) of the run that trained it" in text
    # A file that is not a model, or one whose scoring was edited out of range: one line, naming the file.
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a model")
    assert main(["model", str(bad)]) == 2
    assert f"{bad} is not an oncofed model file" in " ".join(capsys.readouterr().err.split())
    doc = torch.load(model, weights_only=True)
    doc["scoring"]["threshold"] = 7.0
    torch.save(doc, model)
    assert main(["model", str(model)]) == 2
    assert "scoring threshold is 7.0" in capsys.readouterr().err
