"""Site-local training from the command line: metrics files, DP with the site's ledger, refusals."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from consortium import run_side_by_side

from imaging.catalog import Catalog
from imaging.ingest import ingest_folder
from imaging.labels import load_labels
from imaging.synth import generate_consortium
from models.weights import load_checkpoint, read_model


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "fl_client.cli", *args], capture_output=True, text=True,
                          timeout=600, env={**os.environ, "COLUMNS": "200"})


@pytest.fixture(scope="module")
def workspaces(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    root = tmp_path_factory.mktemp("local")
    generate_consortium(root / "data", sites=2, studies_per_task=12, seed=11, tasks=["prostate-mr"])
    out = []
    for site in ("site-a", "site-b"):
        ws = root / "ws" / site
        with Catalog.open(ws) as catalog:
            ingest_folder(catalog, root / "data" / site / "dicom")
            load_labels(catalog, root / "data" / site / "labels.csv")
        out.append(ws)
    return out


def test_train_local_writes_model_metrics_and_curves(workspaces: list[Path], tmp_path: Path) -> None:
    out = tmp_path / "run"
    result = run("train-local", "--workspace", str(workspaces[0]), "--workspace", str(workspaces[1]),
                 "--task", "prostate-mr", "--out", str(out), "--epochs", "2", "--threads", "2", "--norm", "group")
    assert result.returncode == 0, result.stderr
    _, flat, _ = load_checkpoint(out / "model.pt")  # the norm asked for, as a run's --initial-model must match
    assert flat["norm"] == "group"
    doc = json.loads((out / "metrics.json").read_text())
    assert doc["schema"] == "oncofed.local-run/1" and doc["task"] == "prostate-mr"
    assert doc["training_samples"] == sum(doc["splits"]["train"][k] for k in ("positives", "negatives"))
    for split in ("train", "val", "test"):
        m = doc["splits"][split]
        assert m["studies"] == m["positives"] + m["negatives"] > 0
        assert set(m) >= {"auroc", "sensitivity", "specificity", "balanced_accuracy", "brier", "threshold"}
    assert len(doc["curve"]) == 2 and doc["privacy"] is None
    # The model.pt carries its test figures, for a lead who starts a federated run from it (fl_server.initial).
    tested, test = read_model(out / "model.pt").tested, doc["splits"]["test"]
    assert tested is not None and tested.split == "test"
    assert (tested.studies, tested.positives, tested.auroc, tested.auroc_low, tested.auroc_high) == \
        (test["studies"], test["positives"], test["auroc"], test["auroc_low"], test["auroc_high"])
    assert (out / "model.pt").stat().st_size > 0 and (out / "curves.png").stat().st_size > 0
    assert "Study-level metrics" in result.stdout


def test_dp_needs_the_sites_budget_then_counts_against_it(workspaces: list[Path], tmp_path: Path) -> None:
    ws = str(workspaces[0])
    refused = run("train-local", "--workspace", ws, "--task", "prostate-mr", "--out", str(tmp_path / "a"),
                  "--epochs", "1", "--dp-epsilon", "2")
    assert refused.returncode == 2 and "no privacy budget" in refused.stderr and "--set-budget" in refused.stderr
    assert run("privacy", "--workspace", ws, "--set-budget", "2.5", "--delta", "1e-5").returncode == 0
    ok = run("train-local", "--workspace", ws, "--task", "prostate-mr", "--out", str(tmp_path / "b"),
             "--epochs", "1", "--dp-epsilon", "2", "--threads", "2")
    assert ok.returncode == 0, ok.stderr
    # A handful of studies at ε = 2: the site is told before training that the noise will drown the gradient.
    assert "learning is unlikely" in " ".join(ok.stdout.split()), ok.stdout
    ledger = json.loads(run("privacy", "--workspace", ws, "--json").stdout)
    assert ledger["schema"] == "oncofed.privacy/1" and len(ledger["sessions"]) == 1
    assert 0 < ledger["epsilon_spent"] <= 2.05
    # A second run of the same size would pass the ceiling of 2.5: refused, nothing recorded.
    again = run("train-local", "--workspace", ws, "--task", "prostate-mr", "--out", str(tmp_path / "c"),
                "--epochs", "1", "--dp-epsilon", "2")
    assert again.returncode == 2 and "would be exceeded" in again.stderr
    assert len(json.loads(run("privacy", "--workspace", ws, "--json").stdout)["sessions"]) == 1
    shown = run("privacy", "--workspace", ws)
    assert "remaining" in shown.stdout and "Privacy ledger" in shown.stdout


def test_user_mistakes_are_one_line(workspaces: list[Path], tmp_path: Path) -> None:
    bad = run("train-local", "--workspace", str(workspaces[0]), "--task", "liver-ct", "--out", str(tmp_path))
    assert bad.returncode == 2 and "unknown task 'liver-ct'" in bad.stderr and "Traceback" not in bad.stderr
    norm = run("train-local", "--workspace", str(workspaces[0]), "--task", "lung-ct", "--out", str(tmp_path),
               "--norm", "layer")
    assert norm.returncode == 2 and "option '--norm': 'layer'" in norm.stderr and "instance" in norm.stderr, norm.stderr
    assert "Traceback" not in norm.stderr
    pooled_dp = run("train-local", "--workspace", str(workspaces[0]), "--workspace", str(workspaces[1]), "--task",
                    "prostate-mr", "--out", str(tmp_path), "--dp-epsilon", "1")
    assert pooled_dp.returncode == 2 and "accounted per site" in pooled_dp.stderr
    for cmd in ("train-local", "privacy"):
        helped = run(cmd, "--help")
        assert helped.returncode == 0 and "oncofed-site " + cmd in helped.stdout


def test_explain_writes_maps_overlays_and_an_index(workspaces: list[Path], tmp_path: Path) -> None:
    model_dir = tmp_path / "run"
    trained = run("train-local", "--workspace", str(workspaces[0]), "--task", "prostate-mr", "--out", str(model_dir),
                  "--epochs", "1")
    assert trained.returncode == 0, trained.stderr
    out = tmp_path / "explain"
    result = run("explain", "--workspace", str(workspaces[0]), "--model", str(model_dir / "model.pt"), "--out",
                 str(out), "--split", "val", "--method", "hirescam,gradcam")
    assert result.returncode == 0, result.stdout + result.stderr
    doc = json.loads((out / "explain.json").read_text())
    assert doc["schema"] == "oncofed.explain/1" and doc["task"] == "prostate-mr" and doc["images"]
    # The model.pt carries its run's operating point (and no calibration: a handful of validation studies).
    operating = json.loads((model_dir / "metrics.json").read_text())["operating_point"]
    assert operating["calibration"] is None and not doc["scoring"]["calibrated"]
    assert doc["scoring"]["threshold"] == operating["threshold"] and doc["scoring"]["rule"] == operating["rule_text"]
    for entry in doc["images"]:
        assert 0.0 < entry["probability"] < 1.0 and entry["split"] == "val"
        assert entry["call"] == (entry["probability"] >= operating["threshold"] - 1e-9)
        for method, layer in (("hirescam", "features.0"), ("gradcam", "features")):
            heat = np.load(out / entry["maps"][method]["map"])
            assert heat.shape == (48, 48, 16) and heat.min() >= 0.0 and heat.max() <= 1.0
            assert (out / entry["maps"][method]["png"]).stat().st_size > 10_000
            assert entry["maps"][method]["layer"] == layer
            dicom = [out / f for f in entry["maps"][method]["dicom"]]  # Parametric Map + key images
            assert dicom[0].name.endswith("-pm.dcm") and len(dicom) == 6 and all(f.is_file() for f in dicom)
    assert f"at or above the operating point {operating['threshold']:.3f}" in " ".join(result.stdout.split())
    one = doc["images"][0]["study_uid"]
    result = run("explain", "--workspace", str(workspaces[0]), "--model", str(model_dir / "model.pt"), "--out",
                 str(tmp_path / "one"), "--study", one)
    assert result.returncode == 0
    one_doc = json.loads((tmp_path / "one" / "explain.json").read_text())
    assert len(one_doc["images"]) == 1 and one_doc["methods"] == ["hirescam"]  # prostate's own map, asked for none
    cases = [(["--model", str(tmp_path / "nope.pt")], "does not exist"),
             (["--model", str(model_dir / "metrics.json")], "not an oncofed model file"),
             (["--model", str(model_dir / "model.pt"), "--study", "1.2.3"], "no labelled image of study"),
             (["--model", str(model_dir / "model.pt"), "--method", "lime"], "expected gradcam")]
    done = run_side_by_side([[sys.executable, "-m", "fl_client.cli", "explain", "--workspace", str(workspaces[0]),
                              "--out", str(tmp_path / f"bad{k}"), *args] for k, (args, _) in enumerate(cases)])
    for bad, (_, needle) in zip(done, cases, strict=True):
        assert bad.returncode == 2 and needle in bad.stderr and "Traceback" not in bad.stderr, bad.stderr


def test_dp_spend_is_written_ahead_and_survives_kill_9(workspaces: list[Path], tmp_path: Path) -> None:
    import shutil
    import signal
    import time

    from fl_client.privacy import PrivacyLedger

    ws = tmp_path / "site"
    shutil.copytree(workspaces[1], ws)
    assert run("privacy", "--workspace", str(ws), "--set-budget", "50", "--delta", "1e-5").returncode == 0
    ledger = PrivacyLedger(ws)
    proc = subprocess.Popen([sys.executable, "-m", "fl_client.cli", "train-local", "--workspace", str(ws), "--task",
                             "prostate-mr", "--out", str(tmp_path / "out"), "--epochs", "40", "--dp-epsilon", "3",
                             "--threads", "1"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 300
        while not (ledger.ledger_path.exists() and '"status":"planned"' in ledger.ledger_path.read_text()):
            assert proc.poll() is None and time.monotonic() < deadline, "training never reserved its DP spend"
            time.sleep(0.05)
        time.sleep(1.0)  # in the middle of its steps
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    (session,) = ledger.sessions()
    # The whole planned session counts: the site can only over-count a killed run, never forget it.
    assert session.status == "planned" and session.steps >= 40
    assert 0 < ledger.spent() == session.epsilon_cumulative <= 3.05
    # A later session counts on top of it.
    later = ledger.record(run_id="later", round=1, task="prostate-mr", steps=10, sample_rate=session.sample_rate,
                          noise_multiplier=session.noise_multiplier, max_grad_norm=1.0, samples=session.samples)
    assert later.epsilon_cumulative > session.epsilon_cumulative
