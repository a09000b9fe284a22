"""Clinical metrics against hand-computed values."""

from __future__ import annotations

import numpy as np
import pytest

from fl_client.metrics import auroc, binary_metrics, study_scores


def test_auroc_matches_pairwise_counting_with_ties() -> None:
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 60)
    s = rng.integers(0, 5, 60) / 4  # many ties
    pos, neg = s[y == 1], s[y == 0]
    expected = np.mean([(p > n) + 0.5 * (p == n) for p in pos for n in neg])
    assert auroc(y, s) == pytest.approx(expected)
    assert auroc([1, 1], [0.2, 0.3]) is None
    assert auroc([0, 1], [0.2, 0.9]) == 1.0


def test_threshold_metrics_and_brier() -> None:
    m = binary_metrics([1, 1, 0, 0, 0], [0.9, 0.4, 0.6, 0.1, 0.2], threshold=0.5)
    assert (m.studies, m.positives, m.negatives) == (5, 2, 3)
    assert m.sensitivity == 0.5 and m.specificity == pytest.approx(2 / 3)
    assert m.balanced_accuracy == pytest.approx((0.5 + 2 / 3) / 2)
    assert m.brier == pytest.approx(np.mean([0.01, 0.36, 0.36, 0.01, 0.04]))


def test_images_of_one_study_count_once_by_their_highest_score() -> None:
    uids, y, p = study_scores(["a", "a", "b"], [1, 1, 0], [0.2, 0.7, 0.4])
    assert uids == ["a", "b"] and y.tolist() == [1, 0] and p.tolist() == [0.7, 0.4]
