"""Federated lesion segmentation in a real Flower simulation: three sites with DICOM SEG annotations, DP-SGD at
every site and secure aggregation; Dice and lesion-wise figures per site in the history and the report."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from consortium import make_workspaces

from fl_client.privacy import PrivacyLedger
from models.protocol import Metric

pytestmark = pytest.mark.slow


def test_federated_segmentation_with_dp_and_secure_aggregation(tmp_path: Path) -> None:
    sites = make_workspaces(tmp_path, sites=3, studies_per_task=12, seed=9, tasks=["prostate-mr"])
    for ws in sorted(sites.iterdir()):
        PrivacyLedger(ws).set_budget(20.0, 1e-5)
    run_dir = tmp_path / "run"
    result = subprocess.run(
        [sys.executable, "-m", "fl_server.cli", "simulate", "--sites", str(sites), "--run-dir", str(run_dir),
         "--set", "task=prostate-mr-seg", "--set", "num-rounds=1", "--set", "threads=1", "--set", "dp=true",
         "--set", "dp-epsilon=8", "--set", "secure-aggregation=true", "--set", "min-sites=3",
         "--set", "batch-size=2"],
        capture_output=True, text=True, timeout=900, env={**os.environ, "COLUMNS": "200"})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    history = json.loads((run_dir / "history.json").read_text())
    rounds = [r for r in history["rounds"] if r["round"] >= 1]
    assert all(r["secure_aggregation"] and r["aggregated_sites"] == 3 for r in rounds)
    assert all(0 < r["train"][s]["epsilon"] <= 8.0 + 1e-6 for r in rounds for s in r["train"])
    final = history["final"]["sites"]
    assert set(final) == {"site-a", "site-b", "site-c"}
    assert sum(m.get(Metric.POSITIVES, 0) for m in final.values()) >= 1
    for m in final.values():  # a site whose test split has no lesion has no Dice; every figure is a segmenter's
        assert {Metric.DICE, Metric.LESIONS, Metric.LESION_SENSITIVITY} <= set(m) or m.get(Metric.POSITIVES, 0) == 0
        assert Metric.AUROC not in m
    assert "dice" in history["final"]["weighted"]
    page = (run_dir / "report.html").read_text()
    assert "Dice" in page and "lesion sens." in page and (run_dir / "plots" / "val-dice.png").is_file()
    assert "val Dice" in result.stdout
    for ws in sorted(sites.iterdir()):
        tasks = {s.task for s in PrivacyLedger(ws).sessions()}
        assert tasks == {"prostate-mr-seg"}
