"""The weights a new run starts from: fresh ones, or a model the lead gives (``initial-model``).

A consortium need not start from nothing: a model trained on a public archive, or last year's global model, can be
the start. The sites spend no privacy on it: the start is the lead's, and a site receives a global model every round
anyway. Under DP-SGD a start helps, but not reliably. On the synthetic breast task at ε = 8, five rounds at learning
rate 3e-3 from a model trained on 48 studies of another vendor's mammograms lifted it from 0.875 to 0.957 and 0.959,
against 0.81-0.83 from fresh weights. From two more models of the same kind they moved it by -0.024 to +0.009, not
significantly. Long runs wore a start down. On prostate MR five such rounds lifted every start by 0.02-0.06 (the
best from 0.855 to 0.91, within 3 % of the same rounds without DP), on colorectal CT they kept it and added nothing
(BENCHMARKS.md, "DP-SGD from a public start").

The file is a ``model.pt`` (a local run's, or a federated run's global model), read with
:func:`models.weights.read_model` (one read of the file, so its digest is that of the weights used; tensors only,
its preprocessing version checked, no NaN), then held to this run: the same task, and exactly the arrays of this
run's network (a DP run of colorectal CT trains InstanceNorm, so a BatchNorm model does not fit it, and the error says
so). A run resumed before its first checkpoint reads the start again, and refuses it if the file changed
(:func:`reload_initial`).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fl_server.evaluation import MIN_CASES
from models.config import RunConfig
from models.evaluation import HeldOutFigures
from models.weights import WeightsError, check_arrays, read_model

__all__ = ["InitialModel", "load_initial", "reload_initial"]


@dataclass(frozen=True)
class InitialModel:
    """A checked start.

    Args:
        path: The file.
        arrays: Its arrays, in the order of this run's network.
        sha256: The file's digest (the history, report and model card name the start by it).
        source: What the file says of itself: its task, its norm, its DP setting, its round and, for a local run's
            model, how it scored on that run's test studies (``tested``: :class:`models.evaluation.HeldOutFigures`).
    """

    path: Path
    arrays: OrderedDict[str, np.ndarray]
    sha256: str
    source: Mapping[str, object]

    def record(self) -> dict[str, object]:
        """What the run's history keeps of it (no arrays)."""
        return {"file": str(self.path), "sha256": self.sha256, **self.source}

    def caution(self, dp: bool) -> str | None:
        """A sentence for the lead when the start has not shown, on the test studies of the run that trained it,
        that it learned its task: their AUROC's 95 % interval reaches 0.5, they hold fewer than
        :data:`fl_server.evaluation.MIN_CASES` studies of a class, or one class only. None otherwise, or when the file
        holds no such figures (a federated run's model). ``dp``: this run trains under DP-SGD, which ends near its
        start."""
        tested = HeldOutFigures.from_dict(self.source.get("tested"))
        if tested is None:
            return None
        name = f"initial model {self.path.name}"
        if tested.auroc is None:
            said = f"{name}: {tested.describe()} (they hold one class), so they do not show it learned its task"
        elif min(tested.positives, tested.studies - tested.positives) < MIN_CASES:
            said = (f"{name}: {tested.describe()}: too few of a class (below {MIN_CASES}) to show it learned its "
                    "task")
        elif tested.learned is False:
            where = "below chance" if tested.auroc_high is not None and tested.auroc_high < 0.5 else \
                "an interval that reaches chance"
            said = f"{name}: {tested.describe()}, {where}, so it may not have learned its task"
        else:
            return None
        if dp:
            said += ("; under DP-SGD a run ends near its start (a prostate start at 0.56 ended at 0.62 under DP-SGD "
                     "and at 0.85 without, five rounds each: BENCHMARKS.md, \"DP-SGD from a public start\")")
        return said + ". Train it longer or on more studies, or go on if you know it is sound"


def _norm_hint(start: str, run: str) -> str:
    if not start or start in ("auto", run):
        return ""
    why = " (a DP-SGD or secure-aggregation run cannot train BatchNorm)" if start == "batch" else ""
    return (f" It was trained with norm {start} and this run trains norm {run}{why}: train the start with norm {run} "
            f"('oncofed-site train-local --norm {run}', or '--set norm={run}' for a federated run)"
            + ("" if start == "batch" else f", or give this run '--set norm={start}'") + ".")


def load_initial(path: str | Path, config: RunConfig, reference: Mapping[str, np.ndarray]) -> InitialModel:
    """Read ``path`` and check it fits the run of ``config``, whose fresh network's arrays are ``reference``.

    Raises:
        WeightsError: The file is missing or not a model file, was trained for another task or preprocessing, or
            its network is not this run's; the message names the file and what to do.
    """
    path = Path(path).expanduser()
    start = read_model(path)  # one read: the digest is that of the weights and figures used
    arrays, run_config = start.arrays, start.run_config
    task = str(run_config.get("task", ""))
    if task != config.model.task:
        raise WeightsError(f"initial model {path} was trained for {task or 'no task'!r}, this run trains "
                           f"{config.model.task!r}: give a {config.model.task} model.pt")
    norm = str(run_config.get("norm", ""))
    try:
        check_arrays(reference, arrays)
    except WeightsError as exc:
        raise WeightsError(f"initial model {path} is not this run's network ({exc}): train it with this run's "
                           f"model, model-width and norm.{_norm_hint(norm, config.model.norm.value)}") from None
    ordered = OrderedDict((k, np.asarray(arrays[k])) for k in reference)
    source = {"task": task, "norm": norm, "dp": str(run_config.get("dp", "false")).lower() == "true",
              "round": start.round, "tested": None if start.tested is None else start.tested.to_dict()}
    return InitialModel(path.resolve(), ordered, start.sha256, source)


def reload_initial(record: Mapping[str, object], config: RunConfig,
                   reference: Mapping[str, np.ndarray]) -> InitialModel:
    """The start a run recorded (``history.json``'s ``initial_model``), read again for a run resumed before its first
    checkpoint: the same file, unchanged since the run began.

    Raises:
        WeightsError: The file is gone, no longer fits, or its SHA-256 is not the one recorded.
    """
    start = load_initial(str(record.get("file", "")), config, reference)
    if start.sha256 != record.get("sha256"):
        raise WeightsError(f"initial model {start.path} changed since the run began (SHA-256 {start.sha256[:16]}…, "
                           f"the run recorded {str(record.get('sha256'))[:16]}…): put the file back, or start a new "
                           "run")
    return start
