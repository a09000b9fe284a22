"""Statistics of a binary classifier that the sites and the server compute alike (NumPy only).

- **AUROC with a 95 % interval by DeLong's method** (DeLong, DeLong and Clarke-Pearson 1988; the placement
  values of Sun and Xu 2014), ties counted one half.
- **Score histograms on fixed bins**, per class: what a site sends instead of its per-study scores. The
  consortium's AUROC and its DeLong interval are computed from the sites' summed histograms, treating the scores
  of one bin as tied; the error against the exact AUROC is at most half the share of positive-negative pairs that
  fall in one bin (:attr:`HistogramAUROC.max_error`, computed from the histograms themselves and reported with the
  figure). The bins are narrow where probabilities crowd (near 0 and 1): edges equally spaced in logit.
- **The operating point**: a threshold chosen on validation scores by a named rule (:class:`OperatingRule`),
  then applied to the test split.
- **Calibration**: expected calibration error over equal-width probability bins, and the reliability curve.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

__all__ = [
    "CI_METHOD",
    "SCORE_BINS",
    "SCORE_EDGES",
    "AurocCI",
    "HistogramAUROC",
    "OperatingRule",
    "auroc_ci",
    "bin_thresholds",
    "choose_threshold",
    "ece",
    "histogram_auroc",
    "histogram_ece",
    "histogram_rates",
    "histogram_threshold",
    "parse_rule",
    "reliability",
    "score_histogram",
    "wilson",
]

Z95 = 1.959963984540054
CI_METHOD = "DeLong (normal approximation, clipped to [0, 1])"
SCORE_BINS = 64
_LOGIT = np.linspace(-7.0, 7.0, SCORE_BINS - 1)
SCORE_EDGES: np.ndarray = np.concatenate([[0.0], 1.0 / (1.0 + np.exp(-_LOGIT)), [1.0 + 1e-9]])
"""The fixed bin edges of score histograms: ``SCORE_BINS`` bins over [0, 1], equally spaced in logit between
-7 and 7 (probabilities 0.0009 to 0.9991), the outer bins open to 0 and 1. Bin ``b`` holds scores in
``[SCORE_EDGES[b], SCORE_EDGES[b + 1])``."""


@dataclass(frozen=True)
class AurocCI:
    """An AUROC with its 95 % interval.

    Attributes:
        auroc: The area under the ROC curve.
        low: Lower end of the 95 % interval.
        high: Upper end.
        se: DeLong's standard error.
        positives: Positive cases behind it.
        negatives: Negative cases behind it.
        method: How the interval was computed.
    """

    auroc: float
    low: float
    high: float
    se: float
    positives: int
    negatives: int
    method: str = CI_METHOD


@dataclass(frozen=True)
class HistogramAUROC:
    """The AUROC of pooled score histograms, its interval and the largest error binning can have made.

    Attributes:
        ci: AUROC and DeLong interval, the scores of a bin counted as tied.
        max_error: The exact AUROC lies within ``ci.auroc ± max_error``: half the share of positive-negative pairs
            whose scores share a bin.
    """

    ci: AurocCI
    max_error: float


def _delong(pos_values: np.ndarray, pos_weights: np.ndarray, neg_values: np.ndarray,
            neg_weights: np.ndarray) -> AurocCI | None:
    """DeLong on weighted scores (a weight is how many cases have that score)."""
    p, n = float(pos_weights.sum()), float(neg_weights.sum())
    if p < 1 or n < 1:
        return None
    order = np.argsort(neg_values, kind="mergesort")
    nv, nw = neg_values[order], neg_weights[order]
    cum = np.concatenate([[0.0], np.cumsum(nw)])
    below = cum[np.searchsorted(nv, pos_values, side="left")]
    tied = cum[np.searchsorted(nv, pos_values, side="right")] - below
    v10 = (below + 0.5 * tied) / n  # each positive's share of negatives below it
    order = np.argsort(pos_values, kind="mergesort")
    pv, pw = pos_values[order], pos_weights[order]
    cum = np.concatenate([[0.0], np.cumsum(pw)])
    above = p - cum[np.searchsorted(pv, neg_values, side="right")]
    tied = cum[np.searchsorted(pv, neg_values, side="right")] - cum[np.searchsorted(pv, neg_values, side="left")]
    v01 = (above + 0.5 * tied) / p  # each negative's share of positives above it
    auc = float((v10 * pos_weights).sum() / p)
    s10 = float(((v10 - auc) ** 2 * pos_weights).sum() / (p - 1)) if p > 1 else 0.0
    s01 = float(((v01 - auc) ** 2 * neg_weights).sum() / (n - 1)) if n > 1 else 0.0
    se = math.sqrt(max(s10 / p + s01 / n, 0.0))
    return AurocCI(auc, max(0.0, auc - Z95 * se), min(1.0, auc + Z95 * se), se, int(p), int(n))


def auroc_ci(labels: Sequence[int] | np.ndarray, scores: Sequence[float] | np.ndarray) -> AurocCI | None:
    """The AUROC of per-case scores with DeLong's 95 % interval (None without a positive and a negative)."""
    y = np.asarray(labels, int)
    s = np.asarray(scores, float)
    pos, neg = s[y == 1], s[y == 0]
    return _delong(pos, np.ones(len(pos)), neg, np.ones(len(neg)))


def score_histogram(labels: Sequence[int] | np.ndarray, scores: Sequence[float] | np.ndarray
                    ) -> tuple[np.ndarray, np.ndarray]:
    """Counts of positive and of negative cases per bin of :data:`SCORE_EDGES` (two int arrays of
    :data:`SCORE_BINS`)."""
    y = np.asarray(labels, int)
    s = np.clip(np.asarray(scores, float), 0.0, 1.0)
    index = np.clip(np.searchsorted(SCORE_EDGES, s, side="right") - 1, 0, SCORE_BINS - 1)
    pos = np.bincount(index[y == 1], minlength=SCORE_BINS)
    neg = np.bincount(index[y == 0], minlength=SCORE_BINS)
    return pos.astype(np.int64), neg.astype(np.int64)


def histogram_auroc(pos: Sequence[float] | np.ndarray, neg: Sequence[float] | np.ndarray) -> HistogramAUROC | None:
    """The AUROC and DeLong interval of per-class score histograms (summed over sites), with the binning error
    bound (None without a positive and a negative)."""
    pos_w, neg_w = np.asarray(pos, float), np.asarray(neg, float)
    centres = np.arange(len(pos_w), dtype=float)  # only the order of the bins matters
    ci = _delong(centres, pos_w, centres, neg_w)
    if ci is None:
        return None
    max_error = float(0.5 * (pos_w * neg_w).sum() / (pos_w.sum() * neg_w.sum()))
    return HistogramAUROC(ci, max_error)


def bin_thresholds() -> np.ndarray:
    """The thresholds a histogram can apply exactly: the bins' lower edges (a case is positive when its score is at
    or above the threshold)."""
    return SCORE_EDGES[:-1].copy()


def histogram_rates(pos: Sequence[float] | np.ndarray, neg: Sequence[float] | np.ndarray, bin_index: int
                    ) -> tuple[float | None, float | None]:
    """Sensitivity and specificity when the cases of bins ``bin_index`` and above are called positive."""
    pos_w, neg_w = np.asarray(pos, float), np.asarray(neg, float)
    sens = float(pos_w[bin_index:].sum() / pos_w.sum()) if pos_w.sum() else None
    spec = float(neg_w[:bin_index].sum() / neg_w.sum()) if neg_w.sum() else None
    return sens, spec


@dataclass(frozen=True)
class OperatingRule:
    """How the operating threshold is chosen on the validation split.

    Attributes:
        kind: ``youden`` (maximise sensitivity + specificity - 1), ``sensitivity`` (the highest threshold whose
            sensitivity reaches ``target``), ``specificity`` (the lowest threshold whose specificity reaches
            ``target``) or ``fixed`` (``target`` itself).
        target: The rate to reach, or the fixed threshold.
    """

    kind: str
    target: float = 0.0

    def __str__(self) -> str:
        if self.kind == "youden":
            return "youden"
        if self.kind == "fixed":
            return f"fixed:{self.target:g}"
        return f"{self.kind}>={self.target:g}"

    def describe(self) -> str:
        """The rule in words, for reports."""
        return {"youden": "Youden's J (sensitivity + specificity - 1) maximised on validation",
                "fixed": f"fixed threshold {self.target:g}",
                "sensitivity": f"sensitivity ≥ {self.target:g} on validation, highest such threshold",
                "specificity": f"specificity ≥ {self.target:g} on validation, lowest such threshold"}[self.kind]


_RULE = re.compile(r"^(youden|fixed:(?P<fixed>[0-9.]+)|(?P<kind>sensitivity|specificity)>=(?P<target>[0-9.]+))$")


def parse_rule(text: str) -> OperatingRule:
    """Read an operating-point rule: ``youden``, ``sensitivity>=0.9``, ``specificity>=0.95`` or ``fixed:0.5``.

    Raises:
        ValueError: Anything else, with the forms allowed.
    """
    m = _RULE.match(text.strip().lower().replace(" ", ""))
    if not m:
        raise ValueError(f"{text!r} is not an operating-point rule: use youden, sensitivity>=0.9, "
                         "specificity>=0.9 or fixed:0.5")
    if m.group("fixed") is not None:
        value = float(m.group("fixed"))
        kind = "fixed"
    elif m.group("kind"):
        value, kind = float(m.group("target")), m.group("kind")
    else:
        return OperatingRule("youden")
    if not 0.0 < value < 1.0:
        raise ValueError(f"{text!r}: the value must be between 0 and 1")
    return OperatingRule(kind, value)


def _pick(thresholds: np.ndarray, sens: np.ndarray, spec: np.ndarray, rule: OperatingRule) -> int:
    if rule.kind == "youden":
        return int(np.argmax(sens + spec))  # a tie goes to the lowest threshold: the more sensitive point
    if rule.kind == "sensitivity":
        ok = np.flatnonzero(sens >= rule.target - 1e-12)
        return int(ok[-1]) if len(ok) else 0
    ok = np.flatnonzero(spec >= rule.target - 1e-12)
    return int(ok[0]) if len(ok) else len(thresholds) - 1


def choose_threshold(labels: Sequence[int] | np.ndarray, scores: Sequence[float] | np.ndarray,
                     rule: OperatingRule) -> float:
    """The threshold ``rule`` picks on per-case validation scores (0.5 when a class is missing and the rule needs
    both)."""
    if rule.kind == "fixed":
        return rule.target
    y = np.asarray(labels, int)
    s = np.asarray(scores, float)
    if not (y == 1).any() or not (y == 0).any():
        return 0.5
    thresholds = np.unique(np.concatenate([s, [1.0 + 1e-9]]))
    sens = np.array([(s[y == 1] >= t).mean() for t in thresholds])
    spec = np.array([(s[y == 0] < t).mean() for t in thresholds])
    return float(thresholds[_pick(thresholds, sens, spec, rule)])


def histogram_threshold(pos: Sequence[float] | np.ndarray, neg: Sequence[float] | np.ndarray,
                        rule: OperatingRule) -> float:
    """The threshold ``rule`` picks on pooled validation histograms: a bin edge, so every site applies it exactly
    (0.5 when a class is missing and the rule needs both)."""
    if rule.kind == "fixed":
        return rule.target
    pos_w, neg_w = np.asarray(pos, float), np.asarray(neg, float)
    if pos_w.sum() == 0 or neg_w.sum() == 0:
        return 0.5
    thresholds = bin_thresholds()
    sens = np.array([pos_w[b:].sum() / pos_w.sum() for b in range(SCORE_BINS)])
    spec = np.array([neg_w[:b].sum() / neg_w.sum() for b in range(SCORE_BINS)])
    return float(thresholds[_pick(thresholds, sens, spec, rule)])


def ece(labels: Sequence[int] | np.ndarray, scores: Sequence[float] | np.ndarray, *, bins: int = 10) -> float | None:
    """Expected calibration error: over ``bins`` equal-width probability bins, the case-weighted mean of
    ``|observed positive rate - mean predicted probability|`` (None without cases)."""
    y = np.asarray(labels, float)
    s = np.clip(np.asarray(scores, float), 0.0, 1.0)
    if len(y) == 0:
        return None
    index = np.minimum((s * bins).astype(int), bins - 1)
    total = 0.0
    for b in range(bins):
        sel = index == b
        if sel.any():
            total += sel.sum() * abs(y[sel].mean() - s[sel].mean())
    return float(total / len(y))


def reliability(pos: Sequence[float] | np.ndarray, neg: Sequence[float] | np.ndarray, *, bins: int = 10
                ) -> list[tuple[float, float, int]]:
    """The reliability curve of score histograms: per equal-width probability bin holding cases, ``(mean
    predicted probability, observed positive rate, cases)``; a histogram bin's cases are placed at its score
    centre (its mid-point in logit)."""
    pos_w, neg_w = np.asarray(pos, float), np.asarray(neg, float)
    logit_mid = np.concatenate([[-7.5], (_LOGIT[:-1] + _LOGIT[1:]) / 2, [7.5]])
    centre = 1.0 / (1.0 + np.exp(-logit_mid))
    group = np.minimum((centre * bins).astype(int), bins - 1)
    out = []
    for b in range(bins):
        sel = group == b
        n = float(pos_w[sel].sum() + neg_w[sel].sum())
        if n:
            mean_p = float(((pos_w[sel] + neg_w[sel]) * centre[sel]).sum() / n)
            out.append((mean_p, float(pos_w[sel].sum() / n), int(n)))
    return out


def histogram_ece(pos: Sequence[float] | np.ndarray, neg: Sequence[float] | np.ndarray, *, bins: int = 10
                  ) -> float | None:
    """The expected calibration error of score histograms (cases at their bin's centre; see :func:`reliability`)."""
    curve = reliability(pos, neg, bins=bins)
    n = sum(c for _, _, c in curve)
    return float(sum(c * abs(rate - p) for p, rate, c in curve) / n) if n else None


def wilson(proportion: float, n: int) -> tuple[float, float] | None:
    """The 95 % Wilson score interval of a proportion over ``n`` cases (None when ``n`` is 0)."""
    if n < 1:
        return None
    z2 = Z95 * Z95
    centre = (proportion + z2 / (2 * n)) / (1 + z2 / n)
    half = Z95 * math.sqrt(proportion * (1 - proportion) / n + z2 / (4 * n * n)) / (1 + z2 / n)
    return max(0.0, centre - half), min(1.0, centre + half)
