"""Update validation: a malformed or outlying site update never reaches aggregation.

Each update is checked against the global model the server sent: the same array keys, shapes and
dtypes; only finite values; BatchNorm running variances at or above 0; and an update norm
``||w_site - w_global||`` over the learned weights not far above the other sites' (more than ``norm_factor`` times
the median of the *other* updates' norms, so that with two sites a wild update is still caught by its partner).
The reason names what was wrong.

The norm leaves out BatchNorm's running statistics and its batch counter: they are not learned, and the counter
grows with a site's count of steps (one local epoch of the colorectal network moved it by 14 at 32 training
studies and 139 at 320, against 0.4 and 1.2 for all the weights together), so a site ten times the others' size
would be dropped every round and a wild weight update would hide under a small site's counter.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from models.weights import WeightsError, check_arrays

__all__ = ["screen_updates", "shape_problem", "update_norm"]

DEFAULT_NORM_FACTOR = 10.0


def shape_problem(reference: Mapping[str, np.ndarray], arrays: Mapping[str, np.ndarray]) -> str | None:
    """Why ``arrays`` cannot stand for the global model (None if it can): :func:`models.weights.check_arrays`."""
    try:
        check_arrays(reference, arrays, finite=True)
    except WeightsError as exc:
        return str(exc)
    for key in reference:
        if _name(key) == "running_var" and float(np.min(arrays[key], initial=0.0)) < 0:
            return f"{key}: a running variance below 0"
    return None


_STATISTICS = ("running_mean", "running_var", "num_batches_tracked")  # BatchNorm's buffers, by their last name


def _name(key: str) -> str:
    return key.rsplit(".", 1)[-1]


def update_norm(reference: Mapping[str, np.ndarray], arrays: Mapping[str, np.ndarray]) -> float:
    """Euclidean norm of the update over the learned arrays (BatchNorm's running statistics left out)."""
    return float(np.sqrt(sum(float(np.sum((arrays[k].astype(np.float64) - ref.astype(np.float64)) ** 2))
                             for k, ref in reference.items() if _name(k) not in _STATISTICS)))


def screen_updates(reference: Mapping[str, np.ndarray], updates: Sequence[Mapping[str, np.ndarray]], *,
                   norm_factor: float = DEFAULT_NORM_FACTOR) -> tuple[list[str | None], list[float | None]]:
    """Check every update; return a reason per update (None: keep it) and its norm (None if malformed).

    Args:
        reference: The global arrays sent this round.
        updates: The sites' returned arrays.
        norm_factor: An update whose norm exceeds this many times the median norm of the other
            well-formed updates is dropped (0 turns the norm check off).
    """
    reasons: list[str | None] = [shape_problem(reference, u) for u in updates]
    norms: list[float | None] = [update_norm(reference, u) if r is None else None for u, r in zip(updates, reasons,
                                                                                                  strict=True)]
    if norm_factor > 0:
        for i, norm in enumerate(norms):
            others = [n for j, n in enumerate(norms) if j != i and n is not None]
            if norm is None or not others:
                continue
            median = float(np.median(others))
            if median > 0 and norm > norm_factor * median:
                reasons[i] = (f"update norm {norm:.3g} is {norm / median:.1f}x the median of the other sites "
                              f"({median:.3g}; limit {norm_factor:g}x)")
    return reasons, norms
