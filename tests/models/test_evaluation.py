"""The statistics sites and server share: DeLong intervals, histogram AUROC against the exact value, operating
points and calibration, each against a direct computation on known scores."""

from __future__ import annotations

import math

import numpy as np
import pytest

from models.evaluation import (
    SCORE_BINS,
    SCORE_EDGES,
    auroc_ci,
    choose_threshold,
    ece,
    histogram_auroc,
    histogram_ece,
    histogram_rates,
    histogram_threshold,
    parse_rule,
    score_histogram,
)


def _brute_delong(y: np.ndarray, s: np.ndarray) -> tuple[float, float]:
    """DeLong's AUROC and standard error by its definition, pair by pair."""
    pos, neg = s[y == 1], s[y == 0]
    psi = (pos[:, None] > neg[None, :]) + 0.5 * (pos[:, None] == neg[None, :])
    auc = psi.mean()
    v10, v01 = psi.mean(axis=1), psi.mean(axis=0)
    var = v10.var(ddof=1) / len(pos) + v01.var(ddof=1) / len(neg)
    return float(auc), math.sqrt(var)


def test_delong_matches_its_definition_with_ties() -> None:
    rng = np.random.default_rng(3)
    for n in (12, 40, 200):
        y = rng.integers(0, 2, n)
        y[:2] = [0, 1]
        s = np.round(rng.random(n) * 0.6 + 0.3 * y, 1)  # rounded: many ties
        ci = auroc_ci(y, s)
        auc, se = _brute_delong(y, s)
        assert ci is not None
        assert ci.auroc == pytest.approx(auc) and ci.se == pytest.approx(se)
        assert ci.low == pytest.approx(max(0, auc - 1.959964 * se), abs=1e-6)
        assert (ci.positives, ci.negatives) == (int(y.sum()), int((1 - y).sum()))
    assert auroc_ci([1, 1], [0.2, 0.3]) is None


def test_histogram_auroc_is_within_its_stated_error_of_the_exact_value() -> None:
    rng = np.random.default_rng(7)
    worst = 0.0
    for trial in range(30):
        n = int(rng.integers(20, 400))
        y = (rng.random(n) < 0.4).astype(int)
        y[:2] = [0, 1]
        logits = rng.normal(1.5 * y - 0.5, 1.0 + trial / 15)
        s = 1 / (1 + np.exp(-logits))
        exact = auroc_ci(y, s)
        # Three "sites" send their histograms; the server sums them.
        parts = np.array_split(np.arange(n), 3)
        hists = [score_histogram(y[p], s[p]) for p in parts]
        pooled = histogram_auroc(sum(h[0] for h in hists), sum(h[1] for h in hists))
        assert exact is not None and pooled is not None
        err = abs(pooled.ci.auroc - exact.auroc)
        assert err <= pooled.max_error + 1e-12
        assert pooled.ci.se == pytest.approx(exact.se, rel=0.15, abs=0.01)
        worst = max(worst, err)
    assert worst < 0.01  # on these score distributions, 64 logit bins cost less than 0.01 AUROC


def test_histogram_bins_cover_zero_to_one() -> None:
    pos, neg = score_histogram([1, 0, 1, 0], [0.0, 1.0, 0.5, 0.99999])
    assert pos.sum() == 2 and neg.sum() == 2 and len(pos) == SCORE_BINS
    assert pos[0] == 1 and neg[-1] == 2  # 1.0 and 0.99999 share the last bin
    assert np.all(np.diff(SCORE_EDGES) > 0)


def test_operating_point_rules() -> None:
    y = np.array([0, 0, 0, 0, 1, 1, 1, 1])
    s = np.array([0.1, 0.2, 0.3, 0.6, 0.4, 0.7, 0.8, 0.9])
    # J is 0.75 at 0.4 (sens 1, spec .75) and at 0.7 (sens .75, spec 1): a tie goes to the more sensitive one.
    assert choose_threshold(y, s, parse_rule("youden")) == pytest.approx(0.4)
    assert choose_threshold(y[1:], s[1:], parse_rule("youden")) == pytest.approx(0.7)  # no tie: J .75 vs .67
    t = choose_threshold(y, s, parse_rule("sensitivity>=1.0".replace("1.0", "0.99")))
    assert t == pytest.approx(0.4)  # all positives at or above
    assert choose_threshold(y, s, parse_rule("specificity>=0.75")) == pytest.approx(0.4)
    assert choose_threshold(y, s, parse_rule("fixed:0.35")) == 0.35
    with pytest.raises(ValueError, match="youden"):
        parse_rule("best")
    with pytest.raises(ValueError, match="between 0 and 1"):
        parse_rule("sensitivity>=1.5")
    # On histograms the threshold is a bin edge and the rates there are the exact rates of the cases.
    pos, neg = score_histogram(y, s)
    th = histogram_threshold(pos, neg, parse_rule("sensitivity>=0.99"))
    b = int(np.searchsorted(SCORE_EDGES, th))
    sens, spec = histogram_rates(pos, neg, b)
    assert sens == pytest.approx((s[y == 1] >= th).mean()) == 1.0
    assert spec == pytest.approx((s[y == 0] < th).mean())


def test_calibration_error() -> None:
    rng = np.random.default_rng(1)
    s = rng.random(20000)
    y = (rng.random(20000) < s).astype(int)  # calibrated by construction
    assert ece(y, s) < 0.02
    assert ece(y, s ** 3) > 0.1  # overconfident towards 0
    pos, neg = score_histogram(y, s)
    assert histogram_ece(pos, neg) < 0.03
    assert ece([], []) is None
