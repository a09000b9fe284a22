"""The statistics sites and server share: DeLong intervals, histogram AUROC against the exact value, operating
points and calibration, each against a direct computation on known scores."""

from __future__ import annotations

import math

import numpy as np
import pytest

from models.evaluation import (
    MIN_CALIBRATION_CASES,
    SCORE_BINS,
    SCORE_EDGES,
    Calibration,
    Scoring,
    auroc_ci,
    choose_threshold,
    compare_aurocs,
    ece,
    fit_platt,
    fit_platt_histograms,
    histogram_auroc,
    histogram_ece,
    histogram_rates,
    histogram_threshold,
    parse_rule,
    recalibrate_histograms,
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


def test_paired_delong_matches_its_definition_and_holds_its_level() -> None:
    rng = np.random.default_rng(5)
    for n in (15, 60, 240):
        y = rng.integers(0, 2, n)
        y[:2] = [0, 1]
        a = np.round(rng.random(n) * 0.6 + 0.3 * y, 1)
        b = np.round(a + rng.normal(0, 0.2, n), 1)  # correlated with a, ties in both
        psi = [((s[y == 1][:, None] > s[y == 0][None, :]) + 0.5 * (s[y == 1][:, None] == s[y == 0][None, :]))
               for s in (a, b)]
        s10 = np.cov(np.stack([m.mean(axis=1) for m in psi]))  # DeLong's 2 x 2 covariances, pair by pair
        s01 = np.cov(np.stack([m.mean(axis=0) for m in psi]))
        var = ((s10[0, 0] + s10[1, 1] - 2 * s10[0, 1]) / y.sum()
               + (s01[0, 0] + s01[1, 1] - 2 * s01[0, 1]) / (n - y.sum()))
        d = compare_aurocs(y, a, b)
        assert d is not None
        assert (d.first, d.second) == (pytest.approx(psi[0].mean()), pytest.approx(psi[1].mean()))
        assert d.difference == pytest.approx(psi[0].mean() - psi[1].mean()) and d.se == pytest.approx(math.sqrt(var))
        assert d.high - d.difference == pytest.approx(1.959964 * d.se, abs=1e-6)
        assert d.p_value == pytest.approx(math.erfc(abs(d.difference) / d.se / math.sqrt(2)))
        # paired: the shared cases make the difference far surer than two independent intervals would
        assert d.se < math.hypot(auroc_ci(y, a).se, auroc_ci(y, b).se)
    same = compare_aurocs([0, 1, 0, 1], [0.1, 0.9, 0.2, 0.7], [0.1, 0.9, 0.2, 0.7])
    assert same is not None and (same.difference, same.se, same.p_value) == (0.0, 0.0, 1.0)
    # A perfect model against a constant one: the placements do not vary, so there is nothing to test against
    flat = compare_aurocs([0, 0, 1, 1], [0.1, 0.2, 0.8, 0.9], [0.5, 0.5, 0.5, 0.5])
    assert flat is not None and flat.difference == 0.5 and math.isnan(flat.p_value) and math.isnan(flat.low)
    assert compare_aurocs([1, 1], [0.2, 0.3], [0.1, 0.4]) is None
    assert compare_aurocs([0, 1, 0], [0.2, 0.3, 0.1], [0.1, 0.4, 0.3]) is None  # one positive: no variance of its own
    assert compare_aurocs([0, 1], [0.2, 0.3], [0.1]) is None
    # under no difference (two noisy readings of one latent score) it rejects at about its 5 % level
    rejected = 0
    for _ in range(400):
        y = rng.integers(0, 2, 120)
        latent = y + rng.normal(0, 1.2, 120)
        d = compare_aurocs(y, latent + rng.normal(0, 0.6, 120), latent + rng.normal(0, 0.6, 120))
        rejected += d is not None and d.p_value < 0.05
    assert 0.02 <= rejected / 400 <= 0.09


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


def _timid(seed: int, n: int, *, slope: float = 6.0, intercept: float = -0.3) -> tuple[np.ndarray, np.ndarray]:
    """Labels drawn from ``sigmoid(slope * z + intercept)`` for narrow logits ``z``: a network whose scores all sit
    near 0.5 (what federated models of the colorectal task gave) and are calibrated by that map."""
    rng = np.random.default_rng(seed)
    z = rng.normal(0.0, 0.25, n)
    y = (rng.random(n) < 1 / (1 + np.exp(-(slope * z + intercept)))).astype(int)
    return y, z


def test_platt_scaling_recovers_a_known_calibration_from_cases_and_from_histograms() -> None:
    y, z = _timid(0, 4000)
    exact = fit_platt(y, z)
    assert exact is not None and exact.slope == pytest.approx(6.0, rel=0.1)
    assert exact.intercept == pytest.approx(-0.3, abs=0.12)
    # From histograms (what the server has): each bin's cases at its logit mid-point. The bins are 0.23 logit
    # wide against a spread of 0.25 here, the hardest case a real model gave. Rounding flattens the fit (0.91 of
    # the per-case slope); the correction for it brings it back within 5 %.
    pos, neg = score_histogram(y, 1 / (1 + np.exp(-z)))
    binned = fit_platt_histograms(pos, neg)
    assert binned is not None and binned.slope == pytest.approx(exact.slope, rel=0.05)
    assert binned.intercept == pytest.approx(exact.intercept, abs=0.05)
    assert (binned.positives, binned.negatives) == (int(y.sum()), int(len(y) - y.sum()))
    # The scores were badly calibrated (all near 0.5); recalibrated on fresh cases of the same model they are not.
    ty, tz = _timid(1, 4000)
    raw = 1 / (1 + np.exp(-tz))
    assert ece(ty, raw) > 0.15
    assert ece(ty, exact.of_logits(tz)) < 0.03 and ece(ty, binned.of_logits(tz)) < 0.04
    tpos, tneg = score_histogram(ty, raw)
    assert histogram_ece(tpos, tneg) > 0.15 and histogram_ece(tpos, tneg, calibration=binned) < 0.05
    # Monotone: the order of the studies (the AUROC) and the calls at a threshold carried along stay.
    assert np.all(np.diff(exact.of_logits(np.sort(tz))) >= 0)
    assert exact.of_scores(raw) == pytest.approx(exact.of_logits(tz))
    assert auroc_ci(ty, exact.of_logits(tz)).auroc == pytest.approx(auroc_ci(ty, raw).auroc)  # type: ignore[union-attr]


def test_platt_scaling_refuses_what_it_cannot_fit() -> None:
    y = np.r_[np.zeros(20), np.ones(20)].astype(int)
    z = np.r_[np.linspace(-0.4, -0.2, 20), np.linspace(0.2, 0.4, 20)]  # separable, timid validation scores
    separable = fit_platt(y, z)
    assert separable is not None and 0 < separable.slope < 30  # Platt's smoothed targets keep the slope finite
    assert fit_platt(y, -z) is None  # scores that rank backwards: nothing to calibrate
    assert fit_platt(y[12:28], z[12:28]) is None  # 8 of each class: fewer than MIN_CALIBRATION_CASES
    assert MIN_CALIBRATION_CASES == 10
    # Histograms that cannot be fitted: every case in one bin, counts that are not counts, most cases in the open
    # outer bins (their logits are unknown) - refused, never a crash.
    one_bin = np.zeros(SCORE_BINS)
    one_bin[40] = 1e5
    assert fit_platt_histograms(one_bin, one_bin) is None
    pos, neg = score_histogram(y, 1 / (1 + np.exp(-z)))
    assert fit_platt_histograms(np.where(pos > 0, np.nan, 0), neg) is None
    assert fit_platt_histograms(-pos, neg) is None and fit_platt_histograms(pos[:10], neg[:10]) is None
    outer_pos, outer_neg = pos.astype(float).copy(), neg.astype(float).copy()
    outer_pos[-1], outer_neg[0] = 5, 5  # 10 of 50 cases beyond logit ±7
    assert fit_platt_histograms(outer_pos, outer_neg) is None and fit_platt_histograms(pos, neg) is not None


def test_the_closed_test_keeps_calibrated_scores_and_shifts_only_what_is_off() -> None:
    rng = np.random.default_rng(4)
    z = rng.normal(0.0, 1.5, 400)
    calibrated = (rng.random(400) < 1 / (1 + np.exp(-z))).astype(int)
    assert fit_platt(calibrated, z) is None  # the network's own scores fit as well: kept
    # Off by a constant (a prevalence unlike the training sites'): the intercept alone is updated.
    shifted = (rng.random(400) < 1 / (1 + np.exp(-(z - 1.2)))).astype(int)
    update = fit_platt(shifted, z)
    assert update is not None and update.update == "intercept" and update.slope == 1.0
    assert update.intercept == pytest.approx(-1.2, abs=0.3) and update.statistic > 5.99
    # Too timid: slope and intercept.
    y, tz = _timid(2, 400)
    full = fit_platt(y, tz)
    assert full is not None and full.update == "logistic" and full.slope > 3


def test_a_network_at_chance_with_the_wrong_prevalence_gets_the_intercept_alone() -> None:
    # Every score near 0.5, a fifth of the studies positive, and a slight backward ranking: no usable slope, but the
    # scores claim 50 % where 20 % is right. The intercept alone keeps the order and fixes the level.
    z = np.linspace(-0.2, 0.2, 200)
    y = np.zeros(200, int)
    y[np.r_[0:30:1, 100:110:1]] = 1  # 40 positives, most of them at the low end
    update = fit_platt(y, z)
    assert update is not None and update.update == "intercept" and update.slope == 1.0
    assert update.of_logits([0.0])[0] == pytest.approx(0.2, abs=0.02) and update.statistic > 3.84
    pos, neg = score_histogram(y, 1 / (1 + np.exp(-z)))
    assert fit_platt_histograms(pos, neg) == update.__class__(1.0, pytest.approx(update.intercept, abs=0.02), 40,
                                                              160, "", "intercept",
                                                              pytest.approx(update.statistic, rel=0.05))
    # Only the reason that applies is given.
    assert recalibrate_histograms(pos, neg)[1] == ""
    assert "do not rank" in recalibrate_histograms(np.where(np.arange(SCORE_BINS) < 32, 20, 0),
                                                   np.where(np.arange(SCORE_BINS) >= 32, 20, 0))[1]
    assert "fewer than 10" in recalibrate_histograms(pos * 0, neg)[1]
    assert "closed test" in recalibrate_histograms(*score_histogram(*_calibrated(9, 300)))[1]


def test_scores_within_a_bin_get_no_slope_from_histograms() -> None:
    # Every score at 0.495-0.505 (a federated model that ranks well but barely moves): per case the slope is huge;
    # on the histograms it would rest on which side of one bin edge a few studies fell. Only the intercept is tested.
    rng = np.random.default_rng(6)
    z = rng.normal(0.0, 0.01, 60)
    y = (z > 0).astype(int)
    fitted = fit_platt(y, z)
    assert fitted is not None and fitted.slope > 50  # per case: steep
    pos, neg = score_histogram(y, 1 / (1 + np.exp(-z)))
    assert fit_platt_histograms(pos, neg) is None  # balanced classes: the network's own level fits
    assert "too close together for a slope" in recalibrate_histograms(pos, neg)[1]
    shifted = np.r_[y, np.zeros(60, int)]  # four in five negative at the same scores: the level is off
    pos, neg = score_histogram(shifted, 1 / (1 + np.exp(-np.r_[z, z])))
    update = fit_platt_histograms(pos, neg)
    assert update is not None and update.update == "intercept" and update.slope == 1.0


def _calibrated(seed: int, n: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    z = rng.normal(0.0, 1.5, n)
    return (rng.random(n) < 1 / (1 + np.exp(-z))).astype(int), 1 / (1 + np.exp(-z))


def test_the_binning_correction_keeps_the_line_through_off_centre_scores() -> None:
    # Scores centred away from 0.5: the correction steepens the slope about the mean logit, not about 0.
    for centre in (2.0, -3.0):
        rng = np.random.default_rng(5)
        z = rng.normal(centre, 0.25, 6000)
        y = (rng.random(6000) < 1 / (1 + np.exp(-(5.0 * (z - centre) + 0.4 * centre)))).astype(int)
        exact = fit_platt(y, z)
        binned = fit_platt_histograms(*score_histogram(y, 1 / (1 + np.exp(-z))))
        assert exact is not None and binned is not None and binned.update == exact.update == "logistic"
        assert binned.slope == pytest.approx(exact.slope, rel=0.06)
        assert binned.of_logits([centre])[0] == pytest.approx(exact.of_logits([centre])[0], abs=0.02)
        assert isinstance(binned.slope, float) and isinstance(binned.intercept, float)  # what torch can save


def test_scoring_reads_back_and_names_a_bad_value() -> None:
    calibration = Calibration(4.0, -0.5, 30, 50, "validation")
    scoring = Scoring(calibration, 0.52, "Youden")
    assert Scoring.from_dict(scoring.to_dict()) == scoring
    assert Scoring.from_dict(None) == Scoring() and Scoring().probabilities([0.0]) == pytest.approx([0.5])
    # The operating point moves onto the calibrated scale with the scores: the same studies are called positive.
    z = np.linspace(-1, 1, 201)
    raw = 1 / (1 + np.exp(-z))
    shown = scoring.probabilities(z)
    assert scoring.calls(z) == [bool(r >= 0.52) for r in raw]
    assert [bool(p >= scoring.shown_threshold) for p in shown] == scoring.calls(z)  # the display agrees
    assert Scoring(None, 0.52).shown_threshold == 0.52 and Scoring().calls(z) is None
    # A steep calibration saturates near 1 (every score above logit 3 shows as 1.000), but the calls stay those the
    # server counted: made on the network's own score.
    steep = Scoring(Calibration(25.0, 0.0, 30, 30), 0.9914, "sensitivity")
    assert steep.probabilities([3.45, 4.8]) == pytest.approx([1.0, 1.0]) and steep.calls([3.45, 4.8]) == [False, True]
    for doc, key in (({"calibration": {"slope": -1.0, "intercept": 0.0}}, "slope"),
                     ({"calibration": {"slope": float("nan"), "intercept": 0.0}}, "slope"),
                     ({"calibration": {"slope": 1.0, "intercept": "0"}}, "intercept"),
                     ({"calibration": {"slope": 1.0, "intercept": 0.0, "positives": -3}}, "counts"),
                     ({"threshold": 1.5}, "threshold"), ([1, 2], "scoring")):
        with pytest.raises(ValueError, match=key):
            Scoring.from_dict(doc)
