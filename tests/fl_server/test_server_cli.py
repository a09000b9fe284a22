"""``oncofed-server``'s checks before and after a run: bad run-config values refused in one line, and a run in
which no site trained is not reported as a success."""

from __future__ import annotations

import io
import json
import zipfile
from pathlib import Path

import pytest

from fl_server.cli import UserError, nothing_trained, parse_sets


@pytest.mark.parametrize(("item", "needle"), [
    ("update-norm-factor=nan", "expected a finite number"),
    ("round-timeout=-1", "'round-timeout': must be above 0"),
    ("dp-epsilon=-1", "'dp-epsilon': must be in (0, 100]"),
    ("final-evaluation=perhaps", "expected true or false"),
])
def test_bad_values_are_refused_before_anything_starts(item: str, needle: str) -> None:
    with pytest.raises(UserError, match="run-config|--set") as info:
        parse_sets([item])
    assert needle in str(info.value)


def _history(tmp_path: Path, rounds: list[dict]) -> Path:
    (tmp_path / "history.json").write_text(json.dumps({"rounds": [{"round": 0, "aggregated_sites": 0}, *rounds]}))
    return tmp_path


def test_a_run_in_which_no_site_trained_says_why(tmp_path: Path) -> None:
    refused = {"round": 1, "aggregated_sites": 0, "refused": [
        {"site": "a", "code": "version", "reason": "site a runs oncofed 0.1.0; this run was built with 0.4.0"}],
        "failed": [{"site": "b", "reason": "oncofed site b: data-unreadable: a file ..."}]}
    why = nothing_trained(_history(tmp_path, [refused, {**refused, "round": 2}]))
    assert why == ("site a refused: site a runs oncofed 0.1.0; this run was built with 0.4.0; "
                   "site b failed: oncofed site b: data-unreadable: a file ...")
    assert nothing_trained(_history(tmp_path, [{"round": 1, "aggregated_sites": 0}])) == "no site answered"
    assert nothing_trained(_history(tmp_path, [refused, {"round": 2, "aggregated_sites": 1}])) is None


@pytest.mark.parametrize("command", ["simulate", "report", "provision", "start", "summary", "status", "stop", "run",
                                     "export"])
def test_every_command_has_help_with_an_example(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    from fl_server.cli import main

    with pytest.raises(SystemExit) as done:
        main([command, "--help"])
    out = capsys.readouterr().out
    assert done.value.code == 0 and ("example:" in out or "examples:" in out) and f"oncofed-server {command}" in out


def test_the_run_config_sent_carries_the_count_of_rounds_the_server_runs(tmp_path: Path) -> None:
    """Sites read the count the server runs (their DP plan, their approval), never their own version's default; a
    resumed run keeps the count it started with unless --set says otherwise."""
    import argparse

    from fl_server.cli import _run_config
    from models.tasks import TASK_ROUNDS

    def args(*sets: str, resume: bool = False) -> argparse.Namespace:
        return argparse.Namespace(set=list(sets), resume=resume, run_dir=tmp_path / "run")

    assert _run_config(args("task=prostate-mr"))["num-rounds"] == TASK_ROUNDS["prostate-mr"]
    assert _run_config(args("task=prostate-mr", "num-rounds=4"))["num-rounds"] == 4
    assert _run_config(args("task=lung-ct", "dp=true"))["num-rounds"] == 30  # lung CT's count under DP-SGD
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "history.json").write_text("{}")
    (tmp_path / "run" / "config.json").write_text(json.dumps({"run_config": {"task": "colorectal-ct",
                                                                             "num-rounds": 20}}))
    assert _run_config(args("task=colorectal-ct", resume=True))["num-rounds"] == 20
    assert _run_config(args("task=colorectal-ct", "num-rounds=25", resume=True))["num-rounds"] == 25
    # A breast run from before 0.3.5 stored its step unresolved and stepped the mean itself: it resumes at 1, not at
    # today's default of 2, unless --set says otherwise.
    (tmp_path / "run" / "config.json").write_text(json.dumps({"run_config": {
        "task": "breast-mg", "strategy": "fedprox", "server-learning-rate": 0, "num-rounds": 10}}))
    assert _run_config(args(resume=True))["server-learning-rate"] == 1.0
    assert _run_config(args("server-learning-rate=3", resume=True))["server-learning-rate"] == 3.0
    for stored, step in (({"task": "breast-mg"}, 1.0),  # older still: no step stored at all, the mean itself
                         ({"task": "breast-mg", "strategy": "fedadam"}, 0.0),  # FedAdam's own default
                         ({"task": "breast-mg", "server-learning-rate": 2.0}, 2.0)):  # stored resolved (0.3.5 on)
        (tmp_path / "run" / "config.json").write_text(json.dumps({"run_config": stored}))
        assert _run_config(args(resume=True))["server-learning-rate"] == step, stored


def from_flat_step(flat: dict[str, object]) -> float:
    from models.config import from_flat, server_step

    return server_step(from_flat(flat).federation)


def test_a_default_sentinel_in_set_waits_for_the_runs_task() -> None:
    """``--set server-momentum=-1`` (or ``num-rounds=0``, ``learning-rate=0``) means "the task's default": it is kept
    as given, to be resolved with the run's task, not against the default task."""
    from fl_server.cli import parse_sets

    sets = parse_sets(["server-momentum=-1", "num-rounds=0", "learning-rate=0", "local-epochs=2", "proximal-mu=-1",
                       "norm=auto", "server-learning-rate=0"])
    assert sets == {"server-momentum": "-1", "num-rounds": "0", "learning-rate": "0", "local-epochs": 2,
                    "proximal-mu": "-1", "norm": "auto", "server-learning-rate": "0"}
    assert from_flat_step({"task": "breast-mg", **sets}) == 2.0  # breast's step, not the default task's 1
    # Resolved with the run's task: the colorectal network with BatchNorm, and its run a FedProx run.
    from models.config import from_flat

    run = from_flat({"task": "colorectal-ct", **sets})
    assert (run.model.norm.value, run.training.proximal_mu, run.federation.strategy.value) == ("batch", 0.01,
                                                                                                "fedprox")


def test_a_combination_that_cannot_run_is_a_clear_error_not_a_traceback(tmp_path: Path) -> None:
    import argparse

    from fl_server.cli import _run_config

    # Each --set is fine alone; with what the resumed run was started with, it cannot run.
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "history.json").write_text("{}")
    (tmp_path / "run" / "config.json").write_text(json.dumps({"run_config": {
        "task": "lung-ct", "secure-aggregation": True, "min-sites": 3}}))
    args = argparse.Namespace(set=["strategy=fedadam"], resume=True, run_dir=tmp_path / "run")
    with pytest.raises(UserError, match="secure-aggregation"):
        _run_config(args)


def test_the_app_bundle_holds_the_apps_and_nothing_else_of_the_checkout(tmp_path: Path) -> None:
    """What Flower sends to every site: the project file, the README and the four packages. A checkout's other
    files (a lead's runs/ folder with histories and data summaries, tests, benchmarks) stay out of it."""
    from flwr.cli.build import build_fab_from_disk

    from fl_server.flower_ops import APP_FILES, APP_PACKAGES, app_dir, stage_app

    stage = stage_app(tmp_path / "app")
    assert {p.name for p in stage.iterdir()} == set(APP_FILES + APP_PACKAGES)
    assert not list(stage.rglob("__pycache__"))
    fab = zipfile.ZipFile(io.BytesIO(build_fab_from_disk(stage)))
    tops = {n.split("/")[0] for n in fab.namelist()}
    assert tops == set(APP_FILES + APP_PACKAGES) | {".info"}, tops
    # Each source file of the apps is in it, as it is in the checkout.
    source = app_dir()
    for name in ("fl_server/app.py", "fl_client/app.py", "fl_client/executor.py", "models/nets.py"):
        assert fab.read(name) == (source / name).read_bytes()


def test_a_run_hands_flower_the_staged_apps_not_the_checkout(tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """The folder ``flwr run`` gets holds the apps alone, and exists while Flower builds the bundle from it."""
    from fl_server import flower_ops

    class Seen(Exception):
        pass

    seen: dict[str, object] = {}

    def popen(cmd: list[str], **_: object) -> None:
        folder = Path(cmd[2])
        seen["folder"], seen["names"] = folder, {p.name for p in folder.iterdir()}
        raise Seen

    monkeypatch.setattr(flower_ops.subprocess, "Popen", popen)
    with pytest.raises(Seen):
        flower_ops.flwr_run(tmp_path / "flwr-home", run_config={"task": "lung-ct"})
    folder = seen["folder"]
    assert isinstance(folder, Path) and folder != flower_ops.app_dir() and flower_ops.app_dir() not in folder.parents
    assert seen["names"] == set(flower_ops.APP_FILES + flower_ops.APP_PACKAGES)
    assert not folder.exists()  # a temporary folder, gone after the run
