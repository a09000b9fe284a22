"""The consortium's own figures, from the sites' score histograms: no per-study score ever reaches the server.

Each site's evaluation of a classifier carries two histograms of its study scores on fixed bins (positives,
negatives; ``models.evaluation.SCORE_EDGES``). Summed over the sites they give:

- the **consortium AUROC** with DeLong's 95 % interval, and the largest error the binning can have made
  against the AUROC of all studies pooled (stated next to the figure);
- the **operating point**: the threshold the run's rule (``operating-point``) picks on the pooled validation
  histograms, a bin edge, so sensitivity and specificity at it are exact on every site's and the pooled test
  histograms (with Wilson intervals);
- **calibration**: the reliability curve and its expected calibration error, and a **recalibration** (Platt
  scaling) fitted on the pooled validation histograms, with its curve and error on the test histograms: what a
  site's score means once the global model carries it (``model.pt``'s ``scoring``);
- the **ROC curve** at every bin edge.

A site's figures are flagged when its test split is too small to judge (fewer than :data:`MIN_CASES` positive
or negative studies).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from models.evaluation import (
    CI_METHOD,
    SCORE_BINS,
    SCORE_EDGES,
    Calibration,
    Scoring,
    histogram_auroc,
    histogram_ece,
    histogram_rates,
    histogram_threshold,
    parse_rule,
    recalibrate_histograms,
    reliability,
    wilson,
)
from models.protocol import Metric

__all__ = ["MIN_CASES", "Histograms", "consortium_auroc", "consortium_figures", "pooled", "recalibration",
           "roc_points", "scoring_of", "too_small"]

MIN_CASES = 10
"""A test split with fewer positive or negative studies than this is flagged as too small to judge."""

Histograms = Mapping[str, Mapping[str, Sequence[float]]]
"""Per site: ``{"pos": counts, "neg": counts}`` on the fixed bins."""


def pooled(histograms: Histograms) -> tuple[np.ndarray, np.ndarray]:
    """The sites' histograms summed, per class."""
    pos, neg = np.zeros(SCORE_BINS), np.zeros(SCORE_BINS)
    for h in histograms.values():
        pos += np.asarray(h["pos"], float)
        neg += np.asarray(h["neg"], float)
    return pos, neg


def consortium_auroc(histograms: Histograms) -> dict[str, Any] | None:
    """The AUROC of every site's studies together, from their histograms: value, DeLong interval, binning error
    bound and case counts (None without a positive and a negative)."""
    result = histogram_auroc(*pooled(histograms))
    if result is None:
        return None
    ci = result.ci
    return {"auroc": ci.auroc, "low": ci.low, "high": ci.high, "max_error": result.max_error,
            "positives": ci.positives, "negatives": ci.negatives, "sites": len(histograms), "method": CI_METHOD}


def roc_points(pos: Sequence[float] | np.ndarray, neg: Sequence[float] | np.ndarray) -> list[tuple[float, float]]:
    """``(1 - specificity, sensitivity)`` at every bin edge, from (1, 1) down to (0, 0)."""
    out = []
    for b in range(SCORE_BINS + 1):
        sens, spec = histogram_rates(pos, neg, b)
        if sens is not None and spec is not None:
            out.append((1.0 - spec, sens))
    return out


def _rates(pos: np.ndarray, neg: np.ndarray, index: int) -> dict[str, Any]:
    sens, spec = histogram_rates(pos, neg, index)
    p, n = int(pos.sum()), int(neg.sum())
    return {"positives": p, "negatives": n, "sensitivity": sens, "specificity": spec,
            "sensitivity_ci95": list(wilson(sens, p) or ()) if sens is not None else None,
            "specificity_ci95": list(wilson(spec, n) or ()) if spec is not None else None}


def too_small(metrics: Mapping[str, float]) -> bool:
    """A site's test split holds too few positive or negative studies to judge a classifier on."""
    return min(metrics.get(Metric.POSITIVES, 0), metrics.get(Metric.NEGATIVES, 0)) < MIN_CASES


def recalibration(val: Histograms, test: Histograms, *, threshold: float) -> dict[str, Any]:
    """The recalibration the global model will carry: fitted on the pooled validation histograms
    (:func:`models.evaluation.recalibrate_histograms`: Platt scaling or its intercept alone, where a closed test finds
    the network's own scores miscalibrated), judged on the pooled test histograms.

    Args:
        val: Each site's validation-split histograms of the final model.
        test: Each site's test-split histograms.
        threshold: The operating threshold on the network's own score.

    Returns:
        ``fitted`` True: the calibration (:meth:`models.evaluation.Calibration.to_dict`), the test ECE and
        reliability curve after it, and ``threshold``: the operating threshold on the calibrated scale (the same
        calls). ``fitted`` False: ``reason``.
    """
    calibration, why = recalibrate_histograms(*pooled(val), fitted_on="validation histograms, all sites pooled")
    if calibration is None:
        return {"fitted": False, "reason": why + ": the scores stay the network's own"}
    tpos, tneg = pooled(test)
    return {"fitted": True, **calibration.to_dict(),
            "threshold": float(calibration.of_scores([threshold])[0]),
            "ece": histogram_ece(tpos, tneg, calibration=calibration),
            "curve": [{"predicted": p, "observed": o, "studies": n}
                      for p, o, n in reliability(tpos, tneg, calibration=calibration)]}


def consortium_figures(test: Histograms, val: Histograms, *, rule: str) -> dict[str, Any] | None:
    """The consortium block of a run's final evaluation (None when no site sent a histogram).

    Args:
        test: Each site's test-split histograms of the final model.
        val: Each site's validation-split histograms of the final model (where the threshold is chosen).
        rule: The run's ``operating-point`` rule.

    Returns:
        ``auroc`` (see :func:`consortium_auroc`), ``operating_point`` (the rule, the threshold, whether it was
        chosen on validation, the pooled and per-site rates with Wilson intervals), ``calibration`` (ECE and the
        reliability curve, and ``recalibrated``: see :func:`recalibration`), ``roc`` (pooled and per site).
    """
    if not test:
        return None
    parsed = parse_rule(rule)
    vpos, vneg = pooled(val)
    on_val = bool(vpos.sum() and vneg.sum()) or parsed.kind == "fixed"
    threshold = histogram_threshold(vpos, vneg, parsed)
    # Cases in bins from ``index`` up are called positive: exact when the threshold is that bin's lower edge (always,
    # except for a fixed threshold between edges, which then acts as the next edge up).
    index = min(int(np.searchsorted(SCORE_EDGES, threshold - 1e-12, side="left")), SCORE_BINS)
    exact = bool(np.isclose(SCORE_EDGES[index], threshold))
    tpos, tneg = pooled(test)
    sites = {site: _rates(np.asarray(h["pos"], float), np.asarray(h["neg"], float), index)
             for site, h in sorted(test.items())}
    return {
        "auroc": consortium_auroc(test),
        "operating_point": {"rule": str(parsed), "rule_text": parsed.describe(), "threshold": threshold,
                            "chosen_on": "validation (all sites pooled)" if on_val else
                            "no validation studies of both classes: 0.5",
                            "bin_edge": float(SCORE_EDGES[index]), "exact": exact,
                            "consortium": _rates(tpos, tneg, index), "sites": sites},
        "calibration": {"ece": histogram_ece(tpos, tneg),
                        "curve": [{"predicted": p, "observed": o, "studies": n}
                                  for p, o, n in reliability(tpos, tneg)],
                        "recalibrated": recalibration(val, test, threshold=threshold)},
        "roc": {"consortium": roc_points(tpos, tneg),
                **{site: roc_points(h["pos"], h["neg"]) for site, h in sorted(test.items())}},
    }


def scoring_of(figures: Mapping[str, Any] | None) -> Scoring | None:
    """What the global model's ``model.pt`` carries of the consortium's figures (:func:`consortium_figures`): its
    recalibration and operating point, so that a site's review page shows calibrated scores and the consortium's
    calls. None without figures (no final evaluation, or a segmentation task)."""
    if not figures:
        return None
    op = figures.get("operating_point") or {}
    recalibrated = (figures.get("calibration") or {}).get("recalibrated") or {}
    calibration = Calibration.from_dict(recalibrated) if recalibrated.get("fitted") else None
    threshold = op.get("threshold")
    rule = str(op.get("rule_text", ""))
    if threshold is not None and not str(op.get("chosen_on", "")).startswith("validation"):
        rule = f"{rule} ({op.get('chosen_on')})" if op.get("chosen_on") else rule
    return Scoring(calibration, None if threshold is None else float(threshold), rule)
