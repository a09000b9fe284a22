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


def test_batchnorm_statistics_are_checked_but_left_out_of_the_norm() -> None:
    """A real BatchNorm network's updates from sites of 32 and 480 training studies: the larger site's batch counter
    and running statistics move fifteen times as far, yet it is kept, since the norm is taken over the learned weights;
    a wild weight update is still dropped beside a small site's counter, and a negative running variance is named."""
    import torch

    from models.config import from_flat
    from models.nets import build_model
    from models.weights import state_arrays

    torch.manual_seed(0)
    net = build_model(from_flat({"task": "colorectal-ct", "model-width": 8}).model)
    assert any(isinstance(m, torch.nn.BatchNorm3d) for m in net.modules())
    ref = state_arrays(net)

    def trained(samples: int, seed: int) -> dict[str, np.ndarray]:
        torch.manual_seed(seed)
        site = build_model(from_flat({"task": "colorectal-ct", "model-width": 8}).model)
        site.load_state_dict({k: torch.from_numpy(v.copy()) for k, v in ref.items()})
        site.train()
        opt = torch.optim.AdamW(site.parameters(), lr=1e-3)
        for _ in range(samples // 4):  # one local epoch at 4 a step
            opt.zero_grad()
            site(torch.rand(4, 1, 12, 12, 12)).sum().backward()
            opt.step()
        return state_arrays(site)

    small, other, large = trained(32, 1), trained(32, 2), trained(480, 3)
    counter = next(k for k in ref if k.endswith("num_batches_tracked"))
    assert large[counter] - ref[counter] == 120 and small[counter] - ref[counter] == 8
    reasons, norms = screen_updates(ref, [small, other, large])
    assert reasons == [None, None, None], reasons
    wild = {k: (v * 50 if v.dtype == np.float32 and not k.rsplit(".", 1)[-1].startswith("running") else v)
            for k, v in small.items()}
    reasons, _ = screen_updates(ref, [other, large, wild])
    assert reasons[:2] == [None, None] and "update norm" in reasons[2]
    negative = dict(small)
    var = next(k for k in ref if k.endswith("running_var"))
    negative[var] = -np.abs(negative[var])
    reasons, _ = screen_updates(ref, [other, large, negative])
    assert reasons[2] == f"{var}: a running variance below 0"
