"""Statistics of a binary classifier that the sites and the server compute alike (NumPy only).

- **AUROC with a 95 % interval by DeLong's method** (DeLong, DeLong and Clarke-Pearson 1988; the placement
  values of Sun and Xu 2014), ties counted one half; and **two models compared on the same cases** by DeLong's
  paired test (:func:`compare_aurocs`: the difference, its interval and a two-sided p-value, the covariance of the two
  AUROCs taken into account).
- **Score histograms on fixed bins**, per class: what a site sends instead of its per-study scores. The
  consortium's AUROC and its DeLong interval are computed from the sites' summed histograms, treating the scores
  of one bin as tied; the error against the exact AUROC is at most half the share of positive-negative pairs that
  fall in one bin (:attr:`HistogramAUROC.max_error`, computed from the histograms themselves and reported with the
  figure). The bins are narrow where probabilities crowd (near 0 and 1): edges equally spaced in logit.
- **The operating point**: a threshold chosen on validation scores by a named rule (:class:`OperatingRule`),
  then applied to the test split.
- **Calibration**: expected calibration error over equal-width probability bins, and the reliability curve; and
  **recalibration** by Platt scaling (:class:`Calibration`: a logistic fit of the label on the score's logit, Platt's
  smoothed targets), fitted on validation histograms (:func:`fit_platt_histograms`) or per-case logits
  (:func:`fit_platt`). A monotone map: ranks, AUROC and the calls at an operating point stay as they were.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np

__all__ = [
    "CALIBRATION_METHOD",
    "CI_METHOD",
    "MAX_OUTER_SHARE",
    "MIN_CALIBRATION_CASES",
    "SCORE_BINS",
    "SCORE_EDGES",
    "AurocCI",
    "AurocDifference",
    "Calibration",
    "HistogramAUROC",
    "OperatingRule",
    "Scoring",
    "HeldOutFigures",
    "auroc_ci",
    "bin_thresholds",
    "choose_threshold",
    "compare_aurocs",
    "ece",
    "fit_platt",
    "fit_platt_histograms",
    "histogram_auroc",
    "histogram_ece",
    "histogram_rates",
    "histogram_threshold",
    "parse_rule",
    "reliability",
    "recalibrate_histograms",
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
def _sigmoid(x: Sequence[float] | np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-np.asarray(x, float)))


_CENTRE_LOGIT = np.concatenate([[-7.5], (_LOGIT[:-1] + _LOGIT[1:]) / 2, [7.5]])
"""Where a histogram bin's cases are placed, in logit: its mid-point (the open outer bins at -7.5 and 7.5)."""


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


@dataclass(frozen=True)
class AurocDifference:
    """Two models' AUROCs on the same cases, compared by DeLong's paired test.

    Attributes:
        first: The first model's AUROC.
        second: The second model's AUROC.
        difference: ``first - second``.
        low: Lower end of the difference's 95 % interval.
        high: Upper end.
        se: DeLong's standard error of the difference (the two AUROCs' covariance subtracted).
        p_value: Two-sided p-value of no difference (normal approximation; 1.0 when the scores rank the cases alike,
            NaN with the interval when the two differ but the placements do not vary: no test is possible).
        positives: Positive cases behind it.
        negatives: Negative cases behind it.
    """

    first: float
    second: float
    difference: float
    low: float
    high: float
    se: float
    p_value: float
    positives: int
    negatives: int


def _placements(pos_values: np.ndarray, pos_weights: np.ndarray, neg_values: np.ndarray,
                neg_weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """DeLong's placement values: each positive's share of negatives scored below it, each negative's share of
    positives scored above it (ties one half; a weight is how many cases have that score)."""
    p, n = float(pos_weights.sum()), float(neg_weights.sum())
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
    return v10, v01


def _delong(pos_values: np.ndarray, pos_weights: np.ndarray, neg_values: np.ndarray,
            neg_weights: np.ndarray) -> AurocCI | None:
    """DeLong on weighted scores (a weight is how many cases have that score)."""
    p, n = float(pos_weights.sum()), float(neg_weights.sum())
    if p < 1 or n < 1:
        return None
    v10, v01 = _placements(pos_values, pos_weights, neg_values, neg_weights)
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


def compare_aurocs(labels: Sequence[int] | np.ndarray, first: Sequence[float] | np.ndarray,
                   second: Sequence[float] | np.ndarray) -> AurocDifference | None:
    """Whether two models' AUROCs on the same cases differ: DeLong's paired test (DeLong et al. 1988).

    The two AUROCs share their cases, so the variance of their difference is the sum of their variances less twice
    their covariance, all three from the placement values (:func:`auroc_ci` for one model alone). None without
    two positives and two negatives (with one, that class's variance cannot be estimated), or when the score lists do
    not match the labels.
    """
    y = np.asarray(labels, int)
    a, b = np.asarray(first, float), np.asarray(second, float)
    if a.shape != y.shape or b.shape != y.shape:
        return None
    p, n = int((y == 1).sum()), int((y == 0).sum())
    if p < 2 or n < 2:
        return None
    v10, v01 = zip(*(_placements(s[y == 1], np.ones(p), s[y == 0], np.ones(n)) for s in (a, b)), strict=True)
    auc = [float(v.mean()) for v in v10]
    d10, d01 = v10[0] - v10[1], v01[0] - v01[1]  # var(A - B) = var(A) + var(B) - 2 cov(A, B), per class
    var = float(d10.var(ddof=1)) / p + float(d01.var(ddof=1)) / n
    se = math.sqrt(max(var, 0.0))
    diff = auc[0] - auc[1]
    if se == 0 and diff != 0:  # e.g. a perfect model against a constant one: no variance to test against
        return AurocDifference(auc[0], auc[1], diff, math.nan, math.nan, 0.0, math.nan, p, n)
    p_value = math.erfc(abs(diff) / se / math.sqrt(2)) if se > 0 else 1.0
    return AurocDifference(auc[0], auc[1], diff, diff - Z95 * se, diff + Z95 * se, se, p_value, p, n)


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


def reliability(pos: Sequence[float] | np.ndarray, neg: Sequence[float] | np.ndarray, *, bins: int = 10,
                calibration: Calibration | None = None) -> list[tuple[float, float, int]]:
    """The reliability curve of score histograms: per equal-width probability bin holding cases, ``(mean
    predicted probability, observed positive rate, cases)``; a histogram bin's cases are placed at its score
    centre (its mid-point in logit), carried through ``calibration`` when given."""
    pos_w, neg_w = np.asarray(pos, float), np.asarray(neg, float)
    centre = calibration.of_logits(_CENTRE_LOGIT) if calibration is not None else _sigmoid(_CENTRE_LOGIT)
    group = np.minimum((centre * bins).astype(int), bins - 1)
    out = []
    for b in range(bins):
        sel = group == b
        n = float(pos_w[sel].sum() + neg_w[sel].sum())
        if n:
            mean_p = float(((pos_w[sel] + neg_w[sel]) * centre[sel]).sum() / n)
            out.append((mean_p, float(pos_w[sel].sum() / n), int(n)))
    return out


def histogram_ece(pos: Sequence[float] | np.ndarray, neg: Sequence[float] | np.ndarray, *, bins: int = 10,
                  calibration: Calibration | None = None) -> float | None:
    """The expected calibration error of score histograms (cases at their bin's centre, carried through
    ``calibration`` when given; see :func:`reliability`)."""
    curve = reliability(pos, neg, bins=bins, calibration=calibration)
    n = sum(c for _, _, c in curve)
    return float(sum(c * abs(rate - p) for p, rate, c in curve) / n) if n else None


MIN_CALIBRATION_CASES = 10
"""Fewer validation cases of either class than this, and no recalibration is fitted: two parameters from a handful
of cases would move every score on noise."""
CALIBRATION_METHOD = ("Platt scaling (a logistic fit of the label on the network's logit, Platt's smoothed targets), "
                      "adopted by a closed test against the network's own scores")
MAX_OUTER_SHARE = 0.1
"""More validation cases than this share beyond logit ±7 (scores below 0.0009 or above 0.9991, the histograms' open
outer bins) and no recalibration is fitted from histograms: their logits are unknown there."""
_MAX_PARAMETER = 1000.0
_CHI2_95 = {1: 3.841458820694124, 2: 5.991464547107979}


@dataclass(frozen=True)
class Calibration:
    """A recalibration of a classifier's scores: the calibrated probability is ``sigmoid(slope * logit +
    intercept)``, where ``logit`` is the network's output. Monotone (``slope > 0``): it changes what a score says,
    never the order of two studies.

    Attributes:
        slope: Multiplies the logit (above 1: the network's scores were too timid; below 1: too confident).
        intercept: Added to it (moves the scores towards the prevalence the fit saw).
        positives: Positive cases it was fitted on.
        negatives: Negative cases it was fitted on.
        fitted_on: Which cases: e.g. ``"validation histograms, all sites pooled"``.
        update: ``logistic`` (slope and intercept) or ``intercept`` (the intercept alone, slope 1: recalibration
            in the large), as the closed test chose (:func:`fit_platt`).
        statistic: The likelihood-ratio χ² of the adopted update against the network's own scores (2 degrees of
            freedom for ``logistic``, 1 for ``intercept``; 0 for a calibration stored before the closed test).
    """

    slope: float
    intercept: float
    positives: int
    negatives: int
    fitted_on: str = ""
    update: str = "logistic"
    statistic: float = 0.0

    def of_logits(self, logits: Sequence[float] | np.ndarray) -> np.ndarray:
        """Calibrated probabilities of network logits."""
        return _sigmoid(self.slope * np.asarray(logits, float) + self.intercept)

    def of_scores(self, scores: Sequence[float] | np.ndarray) -> np.ndarray:
        """Calibrated probabilities of uncalibrated ones (the network's sigmoid; exact for logits within ±34)."""
        s = np.clip(np.asarray(scores, float), 1e-15, 1.0 - 1e-15)
        return self.of_logits(np.log(s) - np.log1p(-s))

    def to_dict(self) -> dict[str, float | int | str]:
        """A plain table (what a ``model.pt`` and the run's history keep)."""
        return {"method": CALIBRATION_METHOD, "slope": self.slope, "intercept": self.intercept,
                "positives": self.positives, "negatives": self.negatives, "fitted_on": self.fitted_on,
                "update": self.update, "statistic": self.statistic}

    @classmethod
    def from_dict(cls, doc: object) -> Calibration:
        """Read :meth:`to_dict`'s table back.

        Raises:
            ValueError: Not such a table, or a value out of range (the message names the key).
        """
        if not isinstance(doc, dict):
            raise ValueError(f"calibration is a {type(doc).__name__}, not a table of slope and intercept")
        values: dict[str, float] = {}
        for key in ("slope", "intercept", "statistic"):
            value = doc.get(key, 0.0 if key == "statistic" else None)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"calibration {key} is {value!r}: a finite number within "
                                 f"±{_MAX_PARAMETER:g} is needed")
            values[key] = float(value)
        if not 0 < values["slope"] <= _MAX_PARAMETER or abs(values["intercept"]) > _MAX_PARAMETER:
            raise ValueError(f"calibration slope is {values['slope']!r} and intercept {values['intercept']!r}: the "
                             f"slope must be above 0 (a calibration that reversed the order of the scores), both "
                             f"within ±{_MAX_PARAMETER:g}")
        counts = [doc.get(key, 0) for key in ("positives", "negatives")]
        if any(isinstance(c, bool) or not isinstance(c, int) or c < 0 for c in counts):
            raise ValueError(f"calibration case counts are {counts!r}: two whole numbers of at least 0 are needed")
        fitted_on, update = doc.get("fitted_on", ""), doc.get("update", "logistic")
        if not isinstance(fitted_on, str) or len(fitted_on) > 200:
            raise ValueError("calibration fitted_on must be a short text (which cases it was fitted on)")
        if update not in ("logistic", "intercept"):
            raise ValueError(f"calibration update is {update!r}: logistic or intercept")
        return cls(values["slope"], values["intercept"], counts[0], counts[1], fitted_on, update,
                   values["statistic"])


def _log_likelihood(z: np.ndarray, y: np.ndarray, w: np.ndarray, a: float, b: float) -> float:
    f = a * z + b
    return float(-(w * (y * np.logaddexp(0.0, -f) + (1 - y) * np.logaddexp(0.0, f))).sum())


def _platt(z: np.ndarray, target: np.ndarray, weight: np.ndarray, prior: float, *,
           slope: float | None = None) -> tuple[float, float] | None:
    """Maximise the weighted log likelihood of ``sigmoid(a * z + b)`` against ``target`` by Newton's method with a
    backtracking line search (Lin, Lin and Weng 2007); ``prior`` is the starting intercept. With ``slope`` given, only
    the intercept is fitted. None when the Newton system is singular (all cases at one logit)."""
    a, b = (0.0 if slope is None else slope), prior
    current = -_log_likelihood(z, target, weight, a, b)
    for _ in range(100):
        p = _sigmoid(a * z + b)
        r, d = weight * (p - target), weight * p * (1 - p)
        if slope is None:
            g = np.array([(r * z).sum(), r.sum()])
            h = np.array([[(d * z * z).sum(), (d * z).sum()], [(d * z).sum(), d.sum()]])
        else:
            g, h = np.array([0.0, r.sum()]), np.array([[1.0, 0.0], [0.0, d.sum()]])
        if np.abs(g).max() < 1e-10 * max(1.0, weight.sum()):
            break
        try:
            step = np.linalg.solve(h + 1e-12 * np.eye(2), g)
        except np.linalg.LinAlgError:
            return None
        t = 1.0
        while t > 1e-10:
            trial = -_log_likelihood(z, target, weight, a - t * step[0], b - t * step[1])
            if trial < current + 1e-4 * t * float(g @ -step):
                break
            t /= 2
        else:
            break
        a, b, current = a - t * step[0], b - t * step[1], trial
    return float(a), float(b)


_CLOSED_TEST = ("(closed test: likelihood-ratio χ² {statistic:.1f}, at most {limit:.2f} with {df} degree{s} of "
                "freedom, 5 %)")


def _fit(z: np.ndarray, pos_w: np.ndarray, neg_w: np.ndarray, fitted_on: str, *, slopes: bool = True,
         closed_test: bool = True) -> tuple[Calibration | None, str]:
    """Recalibrate by the closed testing procedure of clinical prediction models (Vergouwe et al. 2017): the
    logistic update (Platt) is kept only when it fits the validation cases significantly better than the network's
    own scores (likelihood ratio, 2 degrees of freedom, 5 %); then the intercept alone is taken unless the slope adds
    significantly (1 degree of freedom). Where the logistic update cannot be used (its slope is not above 0), the
    intercept alone is tested against the network's own scores (1 degree of freedom). On small validation sets this
    keeps a calibrated network as it is, where a fit on noise would make it worse.

    With ``slopes`` False (scores too close together to resolve a slope) only the intercept is tested. With
    ``closed_test`` False every test passes: Platt scaling adopted always, for comparison (``bench_calibration.py``).

    Returns:
        The calibration (None: keep the network's scores) and, with None, why, in words.
    """
    p, n = float(pos_w.sum()), float(neg_w.sum())
    if min(p, n) < MIN_CALIBRATION_CASES:
        return None, (f"the validation split holds {int(p)} positive and {int(n)} negative studies, fewer than "
                      f"{MIN_CALIBRATION_CASES} of a class")
    if np.count_nonzero(pos_w + neg_w) < 2:
        return None, "every validation score falls in one bin: the scores do not tell studies apart"
    limit = _CHI2_95 if closed_test else {1: -math.inf, 2: -math.inf}
    keep_p, keep_n = pos_w > 0, neg_w > 0
    zz = np.concatenate([z[keep_p], z[keep_n]])
    labels = np.concatenate([np.ones(int(keep_p.sum())), np.zeros(int(keep_n.sum()))])
    weight = np.concatenate([pos_w[keep_p], neg_w[keep_n]])
    prior = math.log((p + 1) / (n + 1))
    own = _log_likelihood(zz, labels, weight, 1.0, 0.0)
    shift = _platt(zz, labels, weight, prior, slope=1.0)
    shifted: Calibration | None = None  # the intercept alone (slope 1)
    shift_statistic = 0.0
    if shift is not None and math.isfinite(shift[1]) and abs(shift[1]) <= _MAX_PARAMETER:
        shift_statistic = 2 * (_log_likelihood(zz, labels, weight, 1.0, shift[1]) - own)
        shifted = Calibration(1.0, shift[1], int(p), int(n), fitted_on, "intercept", float(shift_statistic))
    # Adopted on its own (no usable slope) where it fits significantly better than the network's own scores.
    intercept = shifted if shift_statistic > limit[1] else None
    if not slopes:
        return intercept, "" if intercept is not None else (
            "the validation scores lie within about one bin of the histograms, too close together for a slope, and "
            "the network's own level fits them as well as a shifted one " + _CLOSED_TEST.format(
                statistic=shift_statistic, limit=_CHI2_95[1], df=1, s=""))
    # Platt's targets: a positive counts as (P + 1) / (P + 2), a negative as 1 / (N + 2), so that separable
    # validation scores give a finite slope rather than an infinitely steep step.
    full = _platt(zz, np.where(labels == 1, (p + 1) / (p + 2), 1 / (n + 2)), weight, prior)
    a, b = full if full is not None else (math.nan, math.nan)
    if not (a > 0 and math.isfinite(a) and math.isfinite(b)) or max(abs(a), abs(b)) > _MAX_PARAMETER:
        # No usable slope (the scores rank validation cases backwards, or not at all): the intercept alone keeps
        # the order of the scores.
        return intercept, "" if intercept is not None else (
            "the validation scores do not rank positive studies above negative ones")
    logistic = _log_likelihood(zz, labels, weight, a, b)
    statistic = 2 * (logistic - own)
    if statistic <= limit[2]:
        return None, ("the network's own scores fit the validation studies as well as a recalibration would "
                      + _CLOSED_TEST.format(statistic=statistic, limit=_CHI2_95[2], df=2, s="s"))
    if shifted is not None and 2 * (logistic - _log_likelihood(zz, labels, weight, 1.0, shifted.intercept)) \
            <= limit[1]:
        return shifted, ""  # the slope adds nothing significant to the intercept
    return Calibration(a, b, int(p), int(n), fitted_on, "logistic", float(statistic)), ""


def fit_platt(labels: Sequence[int] | np.ndarray, logits: Sequence[float] | np.ndarray, *,
              fitted_on: str = "") -> Calibration | None:
    """Recalibration fitted on per-case network logits: Platt scaling, or its intercept alone, where the closed test
    finds the network's own scores miscalibrated (see :func:`_fit`). None with fewer than
    :data:`MIN_CALIBRATION_CASES` of a class, without a usable update, or when the network's own scores fit the
    cases as well."""
    y = np.asarray(labels, int)
    z = np.asarray(logits, float)
    return _fit(z, (y == 1).astype(float), (y == 0).astype(float), fitted_on)[0]


def recalibrate_histograms(pos: Sequence[float] | np.ndarray, neg: Sequence[float] | np.ndarray, *,
                           fitted_on: str = "", closed_test: bool = True) -> tuple[Calibration | None, str]:
    """Recalibration fitted on score histograms, as :func:`fit_platt`, and why nothing was adopted (in words for the
    report; "" when a recalibration is). None also when more than :data:`MAX_OUTER_SHARE` of the cases lie in the
    open outer bins, or the counts are not finite and at least 0.

    Each bin's cases sit at its logit mid-point; the bins are 0.23 logit wide, so the fit sees each score to within
    ±0.11. Scores whose spread (standard deviation of the logits) is under half a bin's width are too close together
    to show a slope: it would rest on which side of one bin edge a few studies fell (a non-IID colorectal model with
    every score at 0.495-0.505 got slope 24 so, against 180 per case, and its held-out ECE rose from 0.32 to 0.40);
    only the intercept is tested for them. Rounding adds ``width² / 12`` to the spread of the logits (Sheppard) and
    so flattens the fitted slope, as a covariate measured with error does; the slope is scaled back by
    ``var / (var - width² / 12)`` (at most 1.5, since the spread is at least ``width² / 4``), the line kept through
    the mean logit. On logits of spread 0.25 (scores 0.44–0.56 for most studies) this took the fit from 0.92 to 0.98
    of the per-case slope; at a spread of 1 the correction is below 1 %.
    """
    pos_w, neg_w = np.asarray(pos, float), np.asarray(neg, float)
    if pos_w.shape != (SCORE_BINS,) or neg_w.shape != (SCORE_BINS,) or not (
            np.isfinite(pos_w).all() and np.isfinite(neg_w).all() and (pos_w >= 0).all() and (neg_w >= 0).all()):
        return None, "the histograms are not counts on the fixed bins"
    weight = pos_w + neg_w
    total = float(weight.sum())
    if total > 0 and (weight[0] + weight[-1]) / total > MAX_OUTER_SHARE:
        return None, (f"{(weight[0] + weight[-1]) / total:.0%} of the validation scores lie beyond 0.0009 or 0.9991, "
                      f"where the histograms do not place them (at most {MAX_OUTER_SHARE:.0%})")
    width = float(_LOGIT[1] - _LOGIT[0])
    mean = float((weight * _CENTRE_LOGIT).sum() / total) if total > 0 else 0.0
    spread = float((weight * (_CENTRE_LOGIT - mean) ** 2).sum() / total) if total > 0 else 0.0
    fit, why = _fit(_CENTRE_LOGIT, pos_w, neg_w, fitted_on, slopes=math.sqrt(spread) >= width / 2,
                    closed_test=closed_test)
    if fit is None or fit.update == "intercept":
        return fit, why
    slope = fit.slope * spread / (spread - width ** 2 / 12)
    intercept = fit.intercept - (slope - fit.slope) * mean
    if max(abs(slope), abs(intercept)) > _MAX_PARAMETER:
        return None, "the fitted slope is too steep to apply (the validation scores separate the classes completely)"
    return replace(fit, slope=float(slope), intercept=float(intercept)), ""


def fit_platt_histograms(pos: Sequence[float] | np.ndarray, neg: Sequence[float] | np.ndarray, *,
                         fitted_on: str = "") -> Calibration | None:
    """The recalibration :func:`recalibrate_histograms` adopts on score histograms, or None."""
    return recalibrate_histograms(pos, neg, fitted_on=fitted_on)[0]


@dataclass(frozen=True)
class Scoring:
    """How a finished model's scores are read where it is used: its calibration and the consortium's operating
    point (both chosen on validation at the end of the run; a ``model.pt``'s ``scoring`` table).

    Attributes:
        calibration: Platt scaling of the network's logit, or None (the network's own sigmoid).
        threshold: The operating threshold on the network's own score (a study at or above it is called
            positive), or None when the run chose none.
        rule: The rule that chose it, in words ("" with no threshold).
    """

    calibration: Calibration | None = None
    threshold: float | None = None
    rule: str = ""

    def probabilities(self, logits: Sequence[float] | np.ndarray) -> np.ndarray:
        """The probabilities to show for network logits: calibrated when the model carries a calibration."""
        if self.calibration is not None:
            return self.calibration.of_logits(logits)
        return _sigmoid(logits)

    @property
    def shown_threshold(self) -> float | None:
        """The operating threshold on the scale of :meth:`probabilities`, for display (calls are made on the
        network's own score: :meth:`calls`)."""
        if self.threshold is None or self.calibration is None:
            return self.threshold
        return float(self.calibration.of_scores([self.threshold])[0])

    def calls(self, logits: Sequence[float] | np.ndarray) -> list[bool] | None:
        """Whether each network logit's score is at or above the operating point, on the network's own score as the
        server chose and counted it (None without an operating point)."""
        if self.threshold is None:
            return None
        scores = _sigmoid(np.asarray(logits, float).reshape(-1))
        # Within float32 rounding of the threshold counts as at it: a local run's threshold is one validation
        # study's own score, which a second forward pass reproduces only to about 1e-7.
        return [bool(v) for v in scores >= self.threshold - 1e-6]

    def to_dict(self) -> dict[str, object]:
        """A plain table (what a ``model.pt`` keeps)."""
        return {"calibration": self.calibration.to_dict() if self.calibration is not None else None,
                "threshold": self.threshold, "rule": self.rule}

    @classmethod
    def from_dict(cls, doc: object) -> Scoring:
        """Read :meth:`to_dict`'s table back (None or an empty table: the network's own scores, no threshold).

        Raises:
            ValueError: A value out of range; the message names the key.
        """
        if doc is None:
            return cls()
        if not isinstance(doc, dict):
            raise ValueError(f"scoring is a {type(doc).__name__}, not a table of calibration, threshold and rule")
        raw = doc.get("calibration")
        calibration = Calibration.from_dict(raw) if raw is not None else None
        threshold = doc.get("threshold")
        if threshold is not None and (isinstance(threshold, bool) or not isinstance(threshold, (int, float))
                                      or not 0.0 <= threshold <= 1.0):
            raise ValueError(f"scoring threshold is {threshold!r}: a score between 0 and 1, or none, is needed")
        rule = doc.get("rule", "")
        if not isinstance(rule, str) or len(rule) > 300:
            raise ValueError("scoring rule must be a short text (the operating-point rule in words)")
        return cls(calibration, None if threshold is None else float(threshold), rule if threshold is not None else "")


@dataclass(frozen=True)
class HeldOutFigures:
    """How a model scored on held-out studies of the run that trained it (a ``model.pt``'s ``tested`` table: a local
    run's test split). A lead who starts a federated run from the model reads it there: a start that has not learned
    its task gives DP-SGD nothing to keep (BENCHMARKS.md, "DP-SGD from a public start").

    Attributes:
        split: The split it was scored on (``test``).
        studies: Its studies, ``positives`` of them positive.
        positives: Positive studies among them.
        auroc: Study-level AUROC (None with one class only).
        auroc_low: The DeLong 95 % interval's lower end (None when it cannot be computed).
        auroc_high: Its upper end.
    """

    split: str
    studies: int
    positives: int
    auroc: float | None
    auroc_low: float | None = None
    auroc_high: float | None = None

    @property
    def learned(self) -> bool | None:
        """Whether the interval lies above chance (None without one)."""
        return None if self.auroc_low is None else self.auroc_low > 0.5

    def describe(self) -> str:
        """In words, e.g. "AUROC 0.830 (0.712–0.948) on the 48 test studies (24 positive) of the run that trained
        it"."""
        where = f"the {self.studies} {self.split} studies ({self.positives} positive) of the run that trained it"
        if self.auroc is None:
            return f"no AUROC on {where}"
        ci = f" ({self.auroc_low:.3f}–{self.auroc_high:.3f})" if self.auroc_low is not None \
            and self.auroc_high is not None else ""
        return f"AUROC {self.auroc:.3f}{ci} on {where}"

    def to_dict(self) -> dict[str, object]:
        """A plain table (what a ``model.pt`` keeps)."""
        return {"split": self.split, "studies": self.studies, "positives": self.positives, "auroc": self.auroc,
                "auroc_low": self.auroc_low, "auroc_high": self.auroc_high}

    @classmethod
    def from_dict(cls, doc: object) -> HeldOutFigures | None:
        """Read :meth:`to_dict`'s table back (None for a file without one).

        Raises:
            ValueError: A value of the wrong kind or out of range; the message names the key.
        """
        if doc is None:
            return None
        if not isinstance(doc, dict):
            raise ValueError(f"tested is a {type(doc).__name__}, not a table of split, studies and AUROC")
        split = doc.get("split")
        if not isinstance(split, str) or split not in ("train", "val", "test"):
            raise ValueError(f"tested split is {split!r}: train, val or test is needed")
        counts = []
        for key in ("studies", "positives"):
            value = doc.get(key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"tested {key} is {value!r}: a count is needed")
            counts.append(value)
        if counts[1] > counts[0]:
            raise ValueError(f"tested positives ({counts[1]}) exceed its studies ({counts[0]})")
        figures = []
        for key in ("auroc", "auroc_low", "auroc_high"):
            value = doc.get(key)
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                      or not 0.0 <= value <= 1.0):
                raise ValueError(f"tested {key} is {value!r}: a figure between 0 and 1, or none, is needed")
            figures.append(None if value is None else float(value))
        present = [v for v in (figures[1], figures[0], figures[2]) if v is not None]
        # DeLong's interval is centred on its own AUROC, which may differ from the rank AUROC in the last bits.
        if any(a > b + 1e-9 for a, b in zip(present, present[1:], strict=False)):
            raise ValueError(f"tested auroc_low, auroc and auroc_high are {figures[1]}, {figures[0]} and {figures[2]}: "
                             "an interval around its AUROC is needed")
        return cls(split, counts[0], counts[1], *figures)


def wilson(proportion: float, n: int) -> tuple[float, float] | None:
    """The 95 % Wilson score interval of a proportion over ``n`` cases (None when ``n`` is 0)."""
    if n < 1:
        return None
    z2 = Z95 * Z95
    centre = (proportion + z2 / (2 * n)) / (1 + z2 / n)
    half = Z95 * math.sqrt(proportion * (1 - proportion) / n + z2 / (4 * n * n)) / (1 + z2 / n)
    return max(0.0, centre - half), min(1.0, centre + half)
