"""The egress guard: the last check before anything leaves the site, and the log of what did.

A reply may hold only (1) arrays with exactly the keys, shapes and dtypes of the global model the
site received, finite, (2) scalar metrics from the fixed whitelist and (3) short strings from another
(both in :mod:`models.protocol`, the contract the server reads too). Anything else raises
:class:`EgressError` before sending. Every reply that passes is appended to the site's egress log
(``egress.jsonl`` in the workspace): time, run, round, message kind, bytes, SHA-256 of the arrays,
and the metric keys and values (counts, losses, ε: no image data, no identifiers).

The log is append-only; nothing in oncofed deletes or rewrites it.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fl_client.workspace import Workspace
from models.protocol import ALLOWED_METRICS, ALLOWED_STRINGS, LONG_STRINGS, SUPPRESSED, summary_keys

__all__ = ["EgressError", "EgressLog", "EgressRecord", "append_line", "check_reply", "digest"]


def append_line(path: Path, line: str) -> None:
    """Append one line to an append-only site log (mode 0600) and fsync it before returning."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        os.write(fd, (line + "\n").encode())
        os.fsync(fd)
    finally:
        os.close(fd)


class EgressError(Exception):
    """A reply would send something the site does not allow out; nothing was sent."""


@dataclass(frozen=True)
class EgressRecord:
    """One line of the egress log."""

    time: float
    run: str
    round: int
    kind: str
    bytes: int
    sha256: str
    metrics: dict[str, float]
    strings: dict[str, str]


def digest(arrays: Mapping[str, np.ndarray]) -> tuple[str, int]:
    """SHA-256 over the arrays' names, dtypes, shapes and bytes (in order), and the byte count."""
    h = hashlib.sha256()
    size = 0
    for key, array in arrays.items():
        a = np.ascontiguousarray(array)
        h.update(f"{key}|{a.dtype.str}|{a.shape}|".encode())
        h.update(a.tobytes())
        size += a.nbytes
    return h.hexdigest(), size


def check_reply(
    arrays: Mapping[str, np.ndarray],
    metrics: Mapping[str, float],
    *,
    reference: Mapping[str, np.ndarray] | None,
    strings: Mapping[str, str] | None = None,
    summary: Mapping[str, float] | None = None,
) -> None:
    """Raise unless the reply is only model arrays shaped like ``reference`` and whitelisted scalars.

    Args:
        arrays: Arrays about to be sent (empty for an evaluation or a refusal).
        metrics: Scalar metrics about to be sent.
        reference: The global arrays the site received (required when ``arrays`` is not empty).
        strings: Short strings about to be sent (site id, split, task).
        summary: A data summary about to be sent: only keys of :func:`models.protocol.summary_keys`, each a
            count, a share or :data:`models.protocol.SUPPRESSED`.

    Raises:
        EgressError: Naming the offending key.
    """
    if arrays:
        from models.weights import WeightsError, check_arrays  # torch: only when arrays are about to leave

        if reference is None:
            raise EgressError("arrays may only be sent in reply to a global model")
        try:
            check_arrays(reference, arrays, finite=True)
        except WeightsError as exc:
            raise EgressError(f"{exc}: not sent (a reply holds exactly the global model's arrays, finite)") from None
    for key, value in metrics.items():
        if key not in ALLOWED_METRICS:
            raise EgressError(f"metric {key!r} is not on the site's egress whitelist: not sent")
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise EgressError(f"metric {key!r} must be a number, got {type(value).__name__}: not sent")
        if isinstance(value, float) and not math.isfinite(value):
            raise EgressError(f"metric {key!r} is {value}: not sent")
    if summary:
        from models.tasks import TASK_DIMS

        allowed = summary_keys(tuple(TASK_DIMS))
        for key, value in summary.items():
            if key not in allowed:
                raise EgressError(f"summary field {key[:80]!r} is not on the site's egress whitelist: not sent")
            if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or (
                    value < 0 and value != SUPPRESSED):
                raise EgressError(f"summary field {key!r} must be a count or a share: not sent")
    for key, text in (strings or {}).items():
        if key not in ALLOWED_STRINGS:
            raise EgressError(f"text field {key!r} is not on the site's egress whitelist: not sent")
        if not isinstance(text, str) or len(text) > (240 if key in LONG_STRINGS else 64) or not text.isprintable():
            raise EgressError(f"text field {key!r} must be a short printable string: not sent")


class EgressLog:
    """The site's append-only record of every reply it sent.

    Args:
        workspace: The site workspace.
    """

    def __init__(self, workspace: Path) -> None:
        self.path = Workspace.of(workspace).egress_log

    def append(self, *, run: str, round_number: int, kind: str, arrays: Mapping[str, np.ndarray],
               metrics: Mapping[str, float], strings: Mapping[str, str] | None = None) -> EgressRecord:
        """Record one reply (call after :func:`check_reply`, before sending)."""
        sha, size = digest(arrays)
        record = EgressRecord(time=time.time(), run=run, round=round_number, kind=kind, bytes=size,
                              sha256=sha if arrays else "", metrics={k: float(v) for k, v in metrics.items()},
                              strings=dict(strings or {}))
        append_line(self.path, json.dumps(record.__dict__, sort_keys=True))
        return record

    def records(self) -> list[EgressRecord]:
        """Every record, oldest first (empty if nothing was ever sent)."""
        if not self.path.exists():
            return []
        out = []
        for line in self.path.read_text().splitlines():
            if line.strip():
                out.append(EgressRecord(**json.loads(line)))
        return out
