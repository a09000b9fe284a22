"""A real Flower simulation of three sites through our own SuperLink: training, DP at one site, a site whose
budget is spent, per-round checkpoints, the report, the egress logs, and resuming a stopped run."""

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
from consortium import make_workspaces

from fl_client.egress import EgressLog
from fl_client.policy import RunBook, SitePolicy
from fl_client.privacy import PrivacyLedger
from models.config import from_flat
from models.nets import build_model, parameter_count
from models.protocol import Metric
from models.weights import load_checkpoint, load_scoring

pytestmark = pytest.mark.slow


def server(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "fl_server.cli", *args], capture_output=True, text=True, timeout=900,
                          env={**os.environ, "COLUMNS": "200"})


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("sim")
    sites = make_workspaces(root, sites=3, studies_per_task=12, seed=5, tasks=["breast-mg"])
    # site-a trains only with DP-SGD (its own policy); site-c's budget was spent by an earlier run.
    PrivacyLedger(sites / "site-a").set_budget(10.0, 1e-5, require_dp=True)
    spent = PrivacyLedger(sites / "site-c")
    spent.set_budget(1.0, 1e-5, require_dp=True)
    spent.record(run_id="earlier", round=1, task="breast-mg", steps=400, sample_rate=0.5, noise_multiplier=0.8,
                 max_grad_norm=1.0, samples=30)
    # Sites a and b accept counts of one leaving them (their score histograms are sent); site c keeps the default
    # minimum of 5, which its 2-3 test studies do not reach.
    for site in ("site-a", "site-b"):
        RunBook(sites / site).set_policy(SitePolicy(min_count=1), who="site DPO")
    run_dir = root / "run"
    result = server("simulate", "--sites", str(sites), "--run-dir", str(run_dir), "--set", "task=breast-mg",
                    "--set", "num-rounds=3", "--set", "threads=1", "--set", "dp-epsilon=4",
                    "--set", "server-momentum=0.5", "--set", "norm=auto")
    assert result.returncode == 0, result.stdout + result.stderr
    (root / "stdout.txt").write_text(result.stdout)
    return {"sites": sites, "run": run_dir, "stdout": root / "stdout.txt"}


def test_rounds_are_checkpointed_and_reported(run: dict[str, Path]) -> None:
    run_dir = run["run"]
    # Each round's weights, and the server momentum's velocity beside them (written first, for a resume).
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == [
        name for i in (1, 2, 3) for name in (f"round-00{i}.pt", f"round-00{i}.state.npz")]
    history = json.loads((run_dir / "history.json").read_text())
    # Round 0 is the initial model: evaluated (inside the first training message), not trained.
    assert [r["round"] for r in history["rounds"]] == [0, 1, 2, 3]
    assert set(history["rounds"][0]["evaluate"]) == {"site-a", "site-b", "site-c"}
    # the mean itself: breast's longer step (models.tasks.TASK_SERVER_STEP) is not stacked on the run's momentum
    assert all(r["server_step"] == 1.0 and r["aggregated_sites"] == 2 for r in history["rounds"][1:])
    for record in history["rounds"][1:]:
        assert set(record["evaluate"]) == {"site-a", "site-b", "site-c"}  # every site evaluates on its val split
        assert record["aggregated_sites"] == 2  # site-c refuses to train
        assert record["refused"] == [{"site": "site-c", "code": "budget", "reason": "privacy budget spent",
                                      "epsilon": pytest.approx(record["train"]["site-c"]["epsilon"]),
                                      "epsilon_max": 1.0}]
        assert 0 <= record["aggregated_evaluate"]["auroc"] <= 1
    final = history["final"]
    assert set(final["sites"]) == {"site-a", "site-b", "site-c"} and "auroc" in final["weighted"]
    # The consortium's AUROC from the sites' histograms covers every test study the sites counted.
    consortium = final["consortium"]
    assert consortium["auroc"]["positives"] == sum(m.get("positives", 0) for s, m in final["sites"].items()
                                                   if s in final["histograms"])
    assert consortium["auroc"]["low"] <= consortium["auroc"]["auroc"] <= consortium["auroc"]["high"]
    assert consortium["operating_point"]["rule"] == "youden"
    # Histograms leave a site only when each class holds at least its minimum count (1 at a and b, 5 at c).
    minimum = {"site-a": 1, "site-b": 1, "site-c": 5}
    sent = {s for s, m in final["sites"].items() if min(m.get("positives", 0), m.get("negatives", 0)) >= minimum[s]}
    assert "site-c" not in sent and set(final["histograms"]) == sent
    assert set(final["without_histograms"]) == {s for s, m in final["sites"].items() if m["studies"] > 0} - sent
    assert not any(k.startswith("score-") for m in final["sites"].values() for k in m)  # kept apart
    summary = json.loads((run_dir / "summary" / "summary.json").read_text())  # asked before round 1
    assert summary["schema"] == "oncofed.data-summary/1" and (run_dir / "summary" / "summary.html").is_file()
    assert {r["site"] for r in summary["tasks"]["lung-ct"]["sites"]} == set(history["final"]["sites"])
    page = (run_dir / "report.html").read_text()
    assert "privacy budget spent" in page and "site-c" in page
    assert "Not in the consortium figures: site-c" in page
    assert {p.name for p in (run_dir / "plots").iterdir()} >= {"val-auroc.png", "train-loss.png", "epsilon.png",
                                                               "roc.png", "reliability.png"}
    assert "Operating point" in page
    assert any((run_dir / "tensorboard").iterdir())
    stdout = run["stdout"].read_text()
    assert "round   3" in stdout and "Final global model" in stdout


def test_the_global_model_loads_into_the_tasks_network(run: dict[str, Path]) -> None:
    arrays, run_config, rnd = load_checkpoint(run["run"] / "model.pt")
    assert rnd == 3
    # Stored resolved, as the run ran: a later version whose "auto" or -1 means something else rebuilds this network.
    assert (run_config["norm"], run_config["proximal-mu"], run_config["strategy"]) == ("instance", 0.01, "fedprox")
    history = json.loads((run["run"] / "history.json").read_text())
    assert history["strategy"] == "fedprox"
    # It carries the consortium's operating point and, where validation held enough studies, its calibration.
    figures = history["final"]["consortium"]
    scoring, recalibrated = load_scoring(run["run"] / "model.pt"), figures["calibration"]["recalibrated"]
    assert scoring.threshold == figures["operating_point"]["threshold"] and scoring.rule
    assert (scoring.calibration is not None) == recalibrated["fitted"]
    assert recalibrated["fitted"] or "fewer than 10 of a class" in recalibrated["reason"]
    model = build_model(from_flat(run_config).model)
    model.load_state_dict({k: torch.from_numpy(v) for k, v in arrays.items()})


def test_dp_site_accounts_every_round_in_its_own_ledger(run: dict[str, Path]) -> None:
    ledger = PrivacyLedger(run["sites"] / "site-a")
    sessions = ledger.sessions()
    assert [s.round for s in sessions] == [1, 2, 3]
    eps = [s.epsilon_cumulative for s in sessions]
    assert eps[0] < eps[1] < eps[2] <= 4.0 + 1e-6  # the run's dp-epsilon, within the site's ceiling of 10
    history = json.loads((run["run"] / "history.json").read_text())
    reported = [r["train"]["site-a"]["epsilon"] for r in history["rounds"][1:]]
    assert reported == pytest.approx(eps)
    assert "epsilon" not in history["rounds"][1]["train"]["site-b"]  # site-b has no DP policy, the run asks none


def test_egress_logs_hold_only_weights_and_metrics(run: dict[str, Path]) -> None:
    params = parameter_count(build_model(from_flat({"task": "breast-mg"}).model))
    for site in ("site-a", "site-b", "site-c"):
        records = EgressLog(run["sites"] / site).records()
        kinds = [r.kind for r in records]
        # the models after rounds 0 (initial) to 3 on the validation split, the last one on the test split
        assert kinds.count("evaluate-val") == 4 and kinds.count("evaluate-test") == 1
        for r in records:
            if r.kind == "train":
                assert r.bytes == 4 * params and len(r.sha256) == 64  # one float32 array of the model's size
            else:
                assert r.bytes == 0
        assert ("train-refused" in kinds) == (site == "site-c")


def test_a_stopped_run_resumes_from_its_last_checkpoint(run: dict[str, Path]) -> None:
    # Resumed with evaluation in messages of its own (the other placement) for round 4.
    result = server("simulate", "--sites", str(run["sites"]), "--run-dir", str(run["run"]), "--resume",
                    "--set", "task=breast-mg", "--set", "num-rounds=4", "--set", "threads=1", "--set", "dp-epsilon=4",
                    "--set", "evaluate-in-train=false", "--set", "cross-site-eval=true")
    assert result.returncode == 0, result.stdout + result.stderr
    history = json.loads((run["run"] / "history.json").read_text())
    assert [r["round"] for r in history["rounds"]] == [0, 1, 2, 3, 4]
    # Cross-site: the global model and the last local model of each site that trained, at every site's test split.
    cross = history["cross_site"]
    assert set(cross["models"]) == {"global", "site site-a", "site site-b"}  # site-c's budget is spent
    for name, per_site in cross["models"].items():
        assert set(per_site) == {"site-a", "site-b", "site-c"}, name
        # Every model is scored on the same test studies at a site.
        assert {s: m["studies"] for s, m in per_site.items()} == {
            s: m["studies"] for s, m in cross["models"]["global"].items()}, name
    assert "Cross-site evaluation (test split)" in (run["run"] / "report.html").read_text()
    assert set(history["rounds"][4]["evaluate"]) == {"site-a", "site-b", "site-c"}
    assert history["resumed_at"][0]["round"] == 3
    # The resume kept the run's server momentum without being told again, and took up its velocity.
    assert history["resumed_at"][0]["server_state"] is True and history["rounds"][4]["server_momentum"] == 0.5
    assert (run["run"] / "checkpoints" / "round-004.pt").exists()
    assert "round   4" in result.stdout and "round   1" not in result.stdout
    # The global model carries the operating point chosen for its own weights, as the history reports it.
    scoring = load_scoring(run["run"] / "model.pt")
    assert scoring.threshold == history["final"]["consortium"]["operating_point"]["threshold"]


def test_secure_aggregation_with_a_site_dropping_out(run: dict[str, Path], tmp_path: Path) -> None:
    # SecAgg+ over the same three sites: site-c refuses to train (its budget is spent), which the protocol
    # handles as a drop-out; the server sees only the sum of site-a's and site-b's updates. The run fine-tunes the
    # first run's model (norms and head): the protocol's quantised sum must not move the convolutions.
    run_dir, start = tmp_path / "secure", run["run"] / "model.pt"
    result = server("simulate", "--sites", str(run["sites"]), "--run-dir", str(run_dir), "--set", "task=breast-mg",
                    "--set", "num-rounds=2", "--set", "threads=1", "--set", "dp-epsilon=4",
                    "--set", "server-learning-rate=2", "--set", "server-momentum=0.5",
                    "--set", "secure-aggregation=true", "--set", "min-sites=3", "--set", "data-summary=false",
                    "--set", "fine-tune=norm-head", "--initial-model", str(start))
    assert result.returncode == 0, result.stdout + result.stderr
    history = json.loads((run_dir / "history.json").read_text())
    rounds = [r for r in history["rounds"] if r["round"] >= 1]
    assert [r["round"] for r in rounds] == [1, 2]
    for record in rounds:
        # The server steps twice along the momentum of the mean of the sum the protocol revealed.
        assert record["secure_aggregation"] and record["aggregated_sites"] == 2 and record["server_step"] == 2.0
        assert record["server_momentum"] == 0.5
        assert set(record["train"]) == {"site-a", "site-b"}
        assert record["failed"] == [{"site": "site-c", "stage": "train", "reason": "privacy budget spent"}]
        assert set(record["evaluate"]) == {"site-a", "site-b", "site-c"}
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == [
        "round-001.pt", "round-001.state.npz", "round-002.pt", "round-002.state.npz"]  # the momentum, for a resume
    first, _, _ = load_checkpoint(run_dir / "checkpoints" / "round-001.pt")
    second, _, _ = load_checkpoint(run_dir / "checkpoints" / "round-002.pt")
    assert all(v.dtype == np.float32 for v in second.values())
    assert any(not np.allclose(first[k], second[k]) for k in first)  # the sum was unmasked and applied
    start_arrays, _, _ = load_checkpoint(start)
    convs = [k for k in second if ".conv." in k]
    assert convs and all(np.array_equal(second[k], start_arrays[k]) for k in convs)
    assert "Secure aggregation (SecAgg+)" in (run_dir / "report.html").read_text()


def test_fedadam_keeps_the_global_model_in_float32(run: dict[str, Path], tmp_path: Path) -> None:
    """Flower's FedAdam returns float64 arrays (NumPy 2 promotes with its float64 step); sent on, every site's
    float32 update of round 2 was refused and the run trained one round only. The server keeps the sent dtype, and
    FedAdam's moments are checkpointed for a resume. The run starts from the first run's global model
    (``--initial-model``), as a consortium continues from last year's model, and fine-tunes only its norms and head
    (``fine-tune=norm-head``): the sites, one of them under DP-SGD, leave the convolutions as the start gave them."""
    run_dir, start = tmp_path / "adam", run["run"] / "model.pt"
    start_arrays, _, start_round = load_checkpoint(start)
    result = server("simulate", "--sites", str(run["sites"]), "--run-dir", str(run_dir), "--set", "task=breast-mg",
                    "--set", "num-rounds=2", "--set", "threads=1", "--set", "dp-epsilon=4",
                    "--set", "strategy=fedadam", "--set", "final-evaluation=false", "--set", "data-summary=false",
                    "--set", "fine-tune=norm-head", "--initial-model", str(start))
    assert result.returncode == 0, result.stdout + result.stderr
    history = json.loads((run_dir / "history.json").read_text())
    # Round 0 is the start: every site scores it on its validation split as it scored the first run's model.
    earlier = json.loads((run["run"] / "history.json").read_text())
    scored = next(r for r in earlier["rounds"] if r["round"] == start_round)["evaluate"]
    assert history["rounds"][0]["round"] == 0
    assert set(history["rounds"][0]["evaluate"]) == set(scored)
    for site, metrics in history["rounds"][0]["evaluate"].items():
        assert Metric.AUROC in metrics, site
        assert {k: v for k, v in metrics.items() if k != Metric.EVAL_SECONDS} == pytest.approx(
            {k: v for k, v in scored[site].items() if k != Metric.EVAL_SECONDS}), site
    assert history["initial_model"]["sha256"] == hashlib.sha256(start.read_bytes()).hexdigest()
    assert history["initial_model"]["round"] == start_round
    for record in (r for r in history["rounds"] if r["round"] >= 1):
        assert record["aggregated_sites"] == 2 and not record.get("dropped"), record  # site-c: budget spent
        assert [f["site"] for f in record.get("failed", [])] == [], record
    second, _, _ = load_checkpoint(run_dir / "checkpoints" / "round-002.pt")
    assert all(v.dtype == np.float32 for v in second.values() if v.dtype.kind == "f")
    convs = [k for k in second if ".conv." in k]
    assert convs and all(np.array_equal(second[k], start_arrays[k]) for k in convs)
    assert not np.array_equal(second["head.weight"], start_arrays["head.weight"])
    assert (run_dir / "checkpoints" / "round-002.state.npz").exists()


def test_user_mistakes_are_one_line(tmp_path: Path, run: dict[str, Path]) -> None:
    r = server("simulate", "--sites", str(tmp_path), "--run-dir", str(tmp_path / "r"))
    assert r.returncode == 2 and "one workspace folder per site" in r.stderr and "Traceback" not in r.stderr
    r = server("simulate", "--sites", str(run["sites"]), "--run-dir", str(tmp_path / "r"), "--set", "tsak=lung-ct")
    assert r.returncode == 2 and "did you mean 'task'" in r.stderr
    r = server("simulate", "--sites", str(run["sites"]), "--run-dir", str(run["run"]))
    assert r.returncode == 2 and "--resume" in r.stderr
    r = server("report", str(tmp_path))
    assert r.returncode == 2 and "history.json" in r.stderr
