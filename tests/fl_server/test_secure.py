"""Secure aggregation's refusals (fl_server/secure.py): a strategy SecAgg+ cannot run, too few sites, or a
reconstruction threshold out of range is refused with a reason before any round starts or anything is written.

The full SecAgg+ run is in tests/fl_server/test_simulation.py; ``failure_entry`` in tests/fl_server/test_rounds.py."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from fl_server.runstore import RunStore
from fl_server.secure import run_secure
from models.config import RunConfig, from_flat


class _Untouchable:
    """Stands in for Flower's grid and context: any use of it fails the test."""

    def __getattr__(self, name: str) -> object:
        raise AssertionError(f"run_secure used {name!r} of the grid or context before refusing")


def _refuse(tmp_path: Path, config: RunConfig) -> tuple[ValueError, RunStore]:
    store = RunStore.create(tmp_path / "run", run_id="lead-1", run_config=config.to_flat())
    before = (tmp_path / "run" / "history.json").read_bytes()
    initial = np.zeros(4, np.float32)
    with pytest.raises(ValueError) as info:
        run_secure(_Untouchable(), _Untouchable(), config=config, store=store, reference={"w": initial},
                   initial=initial, flat_config=config.to_flat(), offset=0)
    # Nothing was recorded or checkpointed.
    assert store.history["rounds"] == []
    assert (tmp_path / "run" / "history.json").read_bytes() == before
    assert list((tmp_path / "run" / "checkpoints").iterdir()) == []
    assert not (tmp_path / "run" / "model.pt").exists()
    return info.value, store


@pytest.mark.parametrize("strategy", ["fedadam", "fedyogi", "fedmedian", "fedtrimmedavg"])
def test_a_strategy_other_than_a_weighted_mean_is_refused(tmp_path: Path, strategy: str) -> None:
    config = from_flat({"strategy": strategy, "min-sites": 3})
    error, _ = _refuse(tmp_path, config)
    assert str(error) == (f"secure-aggregation works with strategy fedavg or fedprox, not {strategy}: the protocol "
                          "reveals only a weighted sum")


@pytest.mark.parametrize("sites", [1, 2])
def test_fewer_than_three_sites_are_refused(tmp_path: Path, sites: int) -> None:
    error, _ = _refuse(tmp_path, from_flat({"min-sites": sites}))
    assert "secure-aggregation needs min-sites of 3 or more" in str(error)
    assert "could work out the other's update from the sum" in str(error)


def test_fedprox_with_too_few_sites_is_refused_for_the_sites_not_the_strategy(tmp_path: Path) -> None:
    error, _ = _refuse(tmp_path, from_flat({"strategy": "fedprox", "proximal-mu": 0.01, "min-sites": 2}))
    assert "min-sites of 3 or more" in str(error)


@pytest.mark.parametrize(("sites", "threshold"), [(3, 3), (3, 1), (5, 5), (5, 7)])
def test_a_reconstruction_threshold_out_of_range_is_refused(tmp_path: Path, sites: int, threshold: int) -> None:
    config = from_flat({"min-sites": sites, "reconstruction-threshold": threshold})
    error, _ = _refuse(tmp_path, config)
    assert str(error) == f"reconstruction-threshold must be from 2 to {sites - 1} (min-sites - 1), got {threshold}"
