"""The weights a new run starts from: fresh ones, or a model the lead gives (``initial-model``).

A consortium need not start from nothing: a model trained on a public archive, or last year's global model, can be
the start. The sites spend no privacy on it: the start is the lead's, and a site receives a global model every round
anyway. Under DP-SGD a start helps, but not reliably. On the synthetic breast task at ε = 8, five rounds from a model
trained on 48 studies of another vendor's mammograms reached 0.957 and 0.959, against 0.81-0.83 from fresh weights.
From a second model of the same kind they left it where it was (0.87-0.88). Long runs wore a start down
(BENCHMARKS.md, "DP-SGD from a public start").

The file is a ``model.pt`` (a local run's, or a federated run's global model), read with
:func:`models.weights.load_checkpoint` (tensors only, its preprocessing version checked, no NaN), then held to this
run: the same task, and exactly the arrays of this run's network (a DP run of colorectal CT trains InstanceNorm,
so a BatchNorm model does not fit it, and the error says so).
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from models.config import RunConfig
from models.weights import WeightsError, check_arrays, load_checkpoint

__all__ = ["InitialModel", "load_initial"]


class InitialModel:
    """A checked start: the arrays, the file's SHA-256 (the report names it) and the run it came from.

    Args:
        path: The file.
        arrays: Its arrays, in the order of this run's network.
        sha256: The file's digest.
        source: What the file says of itself: its task, its norm, its DP setting and its round.
    """

    def __init__(self, path: Path, arrays: OrderedDict[str, np.ndarray], sha256: str,
                 source: Mapping[str, object]) -> None:
        self.path = path
        self.arrays = arrays
        self.sha256 = sha256
        self.source = dict(source)

    def record(self) -> dict[str, object]:
        """What the run's history keeps of it (no arrays)."""
        return {"file": str(self.path), "sha256": self.sha256, **self.source}


def _digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def load_initial(path: str | Path, config: RunConfig, reference: Mapping[str, np.ndarray]) -> InitialModel:
    """Read ``path`` and check it fits the run of ``config``, whose fresh network's arrays are ``reference``.

    Raises:
        WeightsError: The file is missing or not a model file, was trained for another task or preprocessing, or
            its network is not this run's; the message names the file and what to do.
    """
    path = Path(path).expanduser()
    arrays, run_config, round_number = load_checkpoint(path)
    task = str(run_config.get("task", ""))
    if task != config.model.task:
        raise WeightsError(f"initial model {path} was trained for {task or 'no task'!r}, this run trains "
                           f"{config.model.task!r}: give a {config.model.task} model.pt")
    norm = str(run_config.get("norm", ""))
    try:
        check_arrays(reference, arrays)
    except WeightsError as exc:
        hint = ""
        if norm and norm not in ("auto", config.model.norm.value):
            hint = (f" It was trained with norm={norm}, this run trains norm={config.model.norm.value} "
                    "(a DP-SGD or secure-aggregation run cannot train BatchNorm): train the initial model with "
                    f"--set norm={config.model.norm.value}.")
        raise WeightsError(f"initial model {path} is not this run's network ({exc}): train it with this run's "
                           f"model, model-width and norm settings.{hint}") from None
    ordered = OrderedDict((k, np.asarray(arrays[k])) for k in reference)
    source = {"task": task, "norm": norm, "dp": str(run_config.get("dp", "false")).lower() == "true",
              "round": round_number}
    return InitialModel(path.resolve(), ordered, _digest(path), source)
