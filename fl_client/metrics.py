"""Metrics clinicians read, computed per study with the number of studies behind each figure."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np

__all__ = ["BinaryMetrics", "auroc", "binary_metrics", "study_scores"]


@dataclass(frozen=True)
class BinaryMetrics:
    """Study-level metrics of a binary classifier at a stated threshold.

    ``auroc`` is None when the studies hold only one class (it is undefined then).
    """

    studies: int
    positives: int
    negatives: int
    threshold: float
    auroc: float | None
    sensitivity: float | None
    specificity: float | None
    balanced_accuracy: float | None
    brier: float | None
    loss: float | None = None

    def as_dict(self) -> dict[str, float | int | None]:
        """The metrics as a plain dict, one entry per field."""
        return asdict(self)


def auroc(labels: Sequence[int] | np.ndarray, scores: Sequence[float] | np.ndarray) -> float | None:
    """Area under the ROC curve (Mann-Whitney U, ties count one half); None with one class only."""
    y = np.asarray(labels, int)
    s = np.asarray(scores, float)
    pos, neg = s[y == 1], s[y == 0]
    if len(pos) == 0 or len(neg) == 0:
        return None
    order = np.argsort(s, kind="mergesort")
    ranks = np.empty(len(s), float)
    sorted_s = s[order]
    i = 0
    while i < len(s):  # average ranks over ties
        j = i
        while j + 1 < len(s) and sorted_s[j + 1] == sorted_s[i]:
            j += 1
        ranks[order[i:j + 1]] = (i + j) / 2 + 1
        i = j + 1
    u = ranks[y == 1].sum() - len(pos) * (len(pos) + 1) / 2
    return float(u / (len(pos) * len(neg)))


def study_scores(study_uids: Sequence[str], labels: Sequence[int], probs: Sequence[float]
                 ) -> tuple[list[str], np.ndarray, np.ndarray]:
    """One score per study: the highest image probability (a lesion seen on any view counts)."""
    best: dict[str, float] = {}
    label: dict[str, int] = {}
    for uid, y, p in zip(study_uids, labels, probs, strict=True):
        best[uid] = max(best.get(uid, -1.0), float(p))
        label[uid] = int(y)
    uids = sorted(best)
    return uids, np.array([label[u] for u in uids], int), np.array([best[u] for u in uids], float)


def binary_metrics(labels: Sequence[int] | np.ndarray, probs: Sequence[float] | np.ndarray, *,
                   threshold: float = 0.5, loss: float | None = None) -> BinaryMetrics:
    """Metrics of study-level labels and probabilities."""
    y = np.asarray(labels, int)
    p = np.asarray(probs, float)
    pred = p >= threshold
    pos, neg = int((y == 1).sum()), int((y == 0).sum())
    sens = float((pred & (y == 1)).sum() / pos) if pos else None
    spec = float((~pred & (y == 0)).sum() / neg) if neg else None
    balanced = (sens + spec) / 2 if sens is not None and spec is not None else None
    return BinaryMetrics(
        studies=len(y), positives=pos, negatives=neg, threshold=threshold, auroc=auroc(y, p),
        sensitivity=sens, specificity=spec, balanced_accuracy=balanced,
        brier=float(np.mean((p - y) ** 2)) if len(y) else None, loss=loss,
    )
