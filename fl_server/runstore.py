"""The run directory: checkpoints, the resolved configuration and every metric of a federated run.

Layout (schema ``oncofed.run/1``)::

    RUN_DIR/config.json              resolved run configuration (flat keys) and the run's identity
    RUN_DIR/history.json             per round: sites asked, per-site train/eval metrics, dropped and
                                     refused sites with reasons, timings; the final test evaluation
    RUN_DIR/checkpoints/round-NNN.pt global weights after round NNN ({"arrays", "run_config", "round"})
    RUN_DIR/checkpoints/round-NNN.state.npz
                                     the server optimiser's state after round NNN (server momentum, FedAdam's
                                     moments), written before the weights; absent for a stateless step
    RUN_DIR/model.pt                 the latest global model (same format as a local run's model.pt)

Everything is written atomically (temporary file, then rename), so a server killed mid-write leaves
the previous round's files intact; :meth:`RunStore.resume` continues from the last checkpoint.
"""

from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from fl_server.rounds import new_round
from models.config import RunKey
from models.weights import load_checkpoint, save_checkpoint

__all__ = ["RunStore", "RunStoreError"]

SCHEMA = "oncofed.run/1"
_CKPT = re.compile(r"round-(\d+)\.pt$")
_STATE = re.compile(r"round-(\d+)\.state\.npz$")


class RunStoreError(Exception):
    """A run directory that cannot be created or resumed; the message says why."""


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


class RunStore:
    """One run's directory.

    Args:
        root: The run directory.
        history: The history document (loaded or new).
    """

    def __init__(self, root: Path, history: dict[str, Any]) -> None:
        self.root = root
        self.history = history

    @classmethod
    def create(cls, root: Path, *, run_id: str, run_config: Mapping[str, Any],
               initial_model: Mapping[str, Any] | None = None) -> RunStore:
        """Start a new run in ``root`` (created; refused if it already holds a run). ``initial_model`` is the record
        of the model the run starts from (``fl_server.initial``), in the history from its first write."""
        root = Path(root).expanduser()
        if (root / "history.json").exists():
            raise RunStoreError(f"{root} already holds a run: pass --run-config \"resume='{root}'\" to continue "
                                "it, or choose another run-dir")
        (root / "checkpoints").mkdir(parents=True, exist_ok=True)
        config = {"schema": SCHEMA, "run_id": run_id, "started": time.time(), "run_config": dict(run_config)}
        _atomic_write(root / "config.json", json.dumps(config, indent=1).encode())
        store = cls(root, {"schema": SCHEMA, "run_id": run_id, "task": run_config.get(RunKey.TASK),
                           "strategy": run_config.get(RunKey.STRATEGY), "rounds": [], "final": None,
                           "resumed_at": []})
        if initial_model is not None:
            store.history["initial_model"] = dict(initial_model)
        store.save()
        return store

    @classmethod
    def resume(cls, root: Path) -> tuple[RunStore, dict[str, np.ndarray] | None, int]:
        """Open a run for resuming: the store, the last checkpoint's arrays (None if none) and its round.

        Raises:
            RunStoreError: ``root`` holds no run.
        """
        root = Path(root).expanduser()
        if not (root / "history.json").exists():
            raise RunStoreError(f"cannot resume: {root} holds no run (no history.json); start a new run instead")
        history = json.loads((root / "history.json").read_text())
        last = cls.last_checkpoint(root)
        if last is None:
            return cls(root, history), None, 0
        arrays, _, round_number = load_checkpoint(last)
        # Rounds after the last checkpoint did not finish: forget their partial records, and the server state or
        # temporary files an interrupted round left (a later round of the same number must not find them).
        history["rounds"] = [r for r in history["rounds"] if r["round"] <= round_number]
        for leftover in (root / "checkpoints").iterdir():
            found = _STATE.search(leftover.name)
            if leftover.name.endswith(".tmp") or (found and int(found.group(1)) > round_number):
                leftover.unlink(missing_ok=True)
        history.setdefault("resumed_at", []).append({"round": round_number, "time": time.time()})
        store = cls(root, history)
        store.save()
        return store, arrays, round_number

    @staticmethod
    def last_checkpoint(root: Path) -> Path | None:
        """The checkpoint of the latest round saved in run directory ``root``, or None if there is none."""
        found = [(int(m.group(1)), p) for p in (Path(root) / "checkpoints").glob("round-*.pt")
                 if (m := _CKPT.search(p.name))]
        return max(found)[1] if found else None

    def config(self) -> dict[str, Any]:
        """The flat run configuration the run was started with."""
        return dict(json.loads((self.root / "config.json").read_text())["run_config"])

    def save(self) -> None:
        """Write the history document to ``history.json``, atomically (a crash leaves the old or the new one)."""
        _atomic_write(self.root / "history.json", json.dumps(self.history, indent=1, default=float).encode())

    def checkpoint(self, round_number: int, arrays: Mapping[str, np.ndarray], run_config: Mapping[str, Any], *,
                   server_state: Mapping[str, np.ndarray] | None = None) -> Path:
        """Write the round's global weights and make them the run's ``model.pt``.

        ``server_state`` (the server optimiser's momentum or moments, if any) is written first, to
        ``round-NNN.state.npz`` beside the weights: a crash between the two leaves the round without its
        weights, so a resume starts from the round before, whose state is whole."""
        path = self.root / "checkpoints" / f"round-{round_number:03d}.pt"
        if server_state:
            import io

            buffer = io.BytesIO()
            np.savez(buffer, **{k: np.asarray(v) for k, v in server_state.items()})
            path.parent.mkdir(parents=True, exist_ok=True)
            _atomic_write(self.state_path(round_number), buffer.getvalue())
        else:  # a file an interrupted attempt at this round left must not be taken for this round's state
            self.state_path(round_number).unlink(missing_ok=True)
        save_checkpoint(path, arrays, run_config, round_number=round_number)
        save_checkpoint(self.root / "model.pt", arrays, run_config, round_number=round_number)
        return path

    def state_path(self, round_number: int) -> Path:
        """Where the server optimiser's state after round ``round_number`` is kept."""
        return self.root / "checkpoints" / f"round-{round_number:03d}.state.npz"

    def server_state(self, round_number: int) -> dict[str, np.ndarray] | None:
        """The server optimiser's state saved with round ``round_number``'s checkpoint (None if there is none: a
        stateless step, or a run of a version that did not save it)."""
        path = self.state_path(round_number)
        if not path.exists():
            return None
        with np.load(path, allow_pickle=False) as saved:
            return {k: saved[k] for k in saved.files}

    def round_record(self, round_number: int) -> dict[str, Any]:
        """The history entry of a round (created on first use)."""
        for record in self.history["rounds"]:
            if record["round"] == round_number:
                return record
        record = new_round(round_number)
        self.history["rounds"].append(record)
        self.history["rounds"].sort(key=lambda r: r["round"])
        return record
