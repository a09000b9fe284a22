"""The consortium's live status for the lead: sites registered and connected, runs and their state, and where the
current run stands — from Flower's own API (``flwr supernode list``, ``flwr list``, ``flwr stop``) and the run's
history, never from log scraping. Sites always by their site id (the node ids Flower gave them at ``start``).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from fl_server.deploy import DeployError, ServerKit, connection_home, state_dir_for
from fl_server.flower_ops import CONNECTION, flower_env
from fl_server.rounds import RoundRecord
from models.protocol import Metric

__all__ = ["SCHEMA", "consortium_status", "stop_run"]

SCHEMA = "oncofed.consortium-status/1"


def _flwr_json(home: Path, *args: str) -> dict[str, Any]:
    """``flwr ARGS oncofed --format json`` on the lead's Flower home, parsed.

    Raises:
        DeployError: Flower answered with an error (its message, in one line).
    """
    cmd = [str(Path(sys.executable).parent / "flwr"), *args, CONNECTION, "--format", "json"]
    done = subprocess.run(cmd, capture_output=True, text=True, env=flower_env(home), timeout=120)
    try:
        doc = json.loads(done.stdout[done.stdout.find("{"):])
    except ValueError:
        doc = {}
    if done.returncode != 0 or not doc.get("success", False):
        why = doc.get("error-message") or " ".join((done.stdout + done.stderr).split())[-300:]
        raise DeployError(f"flwr {' '.join(args)}: {why}")
    return dict(doc)


def consortium_status(kit_dir: Path, *, state: Path | None = None, run_dir: Path | None = None) -> dict[str, Any]:
    """Sites, runs and (with ``run_dir``) the current run's latest round, as a JSON-ready document.

    Raises:
        DeployError: No SuperLink runs for the kit, or Flower refused the query.
    """
    home = connection_home(kit_dir, state)
    names_file = state_dir_for(ServerKit.load(kit_dir), state) / "sites.json"
    names: dict[str, str] = json.loads(names_file.read_text()) if names_file.is_file() else {}
    nodes = _flwr_json(home, "supernode", "list").get("nodes", [])
    sites = [{"site": names.get(str(n.get("node-id")), f"node-{n.get('node-id')}"), "node": str(n.get("node-id")),
              "status": n.get("status"), "online_since": n.get("online-at"), "offline_since": n.get("offline-at")}
             for n in nodes]
    runs = [{"run": r.get("run-id"), "status": r.get("status"), "app": f"{r.get('fab-id')}=={r.get('fab-version')}",
             "elapsed": r.get("elapsed"), "started": r.get("running-at"), "finished": r.get("finished-at")}
            for r in _flwr_json(home, "list").get("runs", [])]
    doc: dict[str, Any] = {"schema": SCHEMA, "sites": sorted(sites, key=lambda s: s["site"]), "runs": runs}
    if run_dir is not None and (Path(run_dir) / "history.json").is_file():
        history = json.loads((Path(run_dir) / "history.json").read_text())
        rounds = [RoundRecord.from_dict(r) for r in history.get("rounds", []) if r.get("round", 0) >= 1]
        current: dict[str, Any] = {"run_dir": str(run_dir), "run_id": history.get("run_id"),
                                   "task": history.get("task"), "finished": bool(history.get("finished")),
                                   "rounds_done": len(rounds)}
        if rounds:
            last = rounds[-1]
            current.update(round=last.round,
                           answered=sorted(s for s in last.train if not last.train[s].get("refused")),
                           refused=[{"site": e.get("site"), "reason": e.get("reason")} for e in last.refused],
                           failed=[{"site": e.get("site"), "reason": e.get("reason")} for e in last.failed],
                           dropped=[{"site": e.get("site"), "reason": e.get("reason")} for e in last.dropped],
                           warnings=[{"round": r.round, "site": e.get("site"), "reason": e.get("reason")}
                                     for r in rounds for e in r.warnings],
                           train_loss=last.aggregated_train.get(Metric.TRAIN_LOSS),
                           val_auroc=last.aggregated_evaluate.get(Metric.AUROC),
                           val_dice=last.aggregated_evaluate.get(Metric.DICE), line=last.progress_line())
        doc["current"] = current
    return doc


def stop_run(kit_dir: Path, run: str, *, state: Path | None = None) -> None:
    """Stop a run on the SuperLink (Flower's ``flwr stop``). Its last checkpoint stays; ``oncofed-server run
    --resume`` continues it.

    Raises:
        DeployError: No SuperLink runs for the kit, or Flower refused (an unknown or finished run).
    """
    _flwr_json(connection_home(kit_dir, state), "stop", str(run))
