"""Server-side update validation: malformed and outlying updates are named and dropped."""

from __future__ import annotations

import numpy as np

from fl_server.validation import screen_updates

REF = {"weights": np.zeros(100, np.float32)}


def upd(scale: float, seed: int) -> dict[str, np.ndarray]:
    return {"weights": (np.random.default_rng(seed).standard_normal(100) * scale).astype(np.float32)}


def test_good_updates_pass() -> None:
    reasons, norms = screen_updates(REF, [upd(1, 0), upd(1.2, 1), upd(0.8, 2)])
    assert reasons == [None, None, None]
    assert all(n is not None and 5 < n < 15 for n in norms)


def test_each_kind_of_bad_update_is_named() -> None:
    bad_shape = {"weights": np.zeros(99, np.float32)}
    bad_dtype = {"weights": np.zeros(100, np.float64)}
    bad_key = {"weights": np.zeros(100, np.float32), "extra": np.zeros(1, np.float32)}
    missing = {"other": np.zeros(100, np.float32)}
    nan = {"weights": np.full(100, np.nan, np.float32)}
    huge = upd(1000, 3)
    reasons, _ = screen_updates(REF, [upd(1, 0), upd(1, 1), bad_shape, bad_dtype, bad_key, missing, nan, huge])
    assert reasons[:2] == [None, None]
    assert "shape (99,)" in reasons[2]
    assert "dtype float64" in reasons[3]
    assert "unexpected array 'extra'" in reasons[4]
    assert "'weights' is missing" in reasons[5]
    assert "NaN or Inf" in reasons[6]
    assert "update norm" in reasons[7] and "median" in reasons[7]


def test_with_two_sites_the_wild_one_is_still_caught() -> None:
    reasons, _ = screen_updates(REF, [upd(1, 0), upd(500, 1)])
    assert reasons[0] is None and reasons[1] is not None


def test_norm_check_can_be_turned_off() -> None:
    reasons, _ = screen_updates(REF, [upd(1, 0), upd(500, 1)], norm_factor=0)
    assert reasons == [None, None]
