"""The site's privacy ledger: cumulative ε over all history, the site-owned ceiling, refusals."""

from __future__ import annotations

from pathlib import Path

import pytest
from opacus.accountants import RDPAccountant

from fl_client.privacy import BudgetExceeded, NoBudget, PrivacyError, PrivacyLedger, default_delta, noise_for


def _independent_epsilon(history: list[tuple[float, float, int]], delta: float) -> float:
    acc = RDPAccountant()
    for noise, rate, steps in history:
        for _ in range(steps):
            acc.step(noise_multiplier=noise, sample_rate=rate)
    return float(acc.get_epsilon(delta=delta))


def test_epsilon_grows_and_matches_the_accountant_over_all_history(tmp_path: Path) -> None:
    ledger = PrivacyLedger(tmp_path)
    ledger.set_budget(50.0, 1e-5)
    history: list[tuple[float, float, int]] = []
    last = 0.0
    for run, round_number, steps in (("run-1", 1, 20), ("run-1", 2, 20), ("run-2", 1, 35)):
        session = ledger.record(run_id=run, round=round_number, task="lung-ct", steps=steps, sample_rate=0.1,
                                noise_multiplier=1.1, max_grad_norm=1.0, samples=160)
        history.append((1.1, 0.1, steps))
        assert session.epsilon_cumulative > last  # grows with every session, across rounds and runs
        assert session.epsilon_cumulative == pytest.approx(_independent_epsilon(history, 1e-5), rel=1e-6)
        last = session.epsilon_cumulative
    # It survives a restart: a new ledger object reads the same history.
    assert PrivacyLedger(tmp_path).spent() == pytest.approx(last)
    # Two sessions add up: more than either alone (a fresh accountant per round would report only the last).
    alone = _independent_epsilon([(1.1, 0.1, 35)], 1e-5)
    assert last > alone * 1.2


def test_training_past_the_ceiling_is_refused_and_nothing_is_recorded(tmp_path: Path) -> None:
    ledger = PrivacyLedger(tmp_path)
    with pytest.raises(NoBudget, match="--set-budget"):
        ledger.check(noise_multiplier=1.0, sample_rate=0.1, steps=10)
    ledger.set_budget(2.0, 1e-5)
    noise = noise_for(epsilon=1.5, delta=1e-5, sample_rate=0.1, steps=100)
    ledger.check(noise_multiplier=noise, sample_rate=0.1, steps=100)
    ledger.record(run_id="r", round=1, task="lung-ct", steps=100, sample_rate=0.1, noise_multiplier=noise,
                  max_grad_norm=1.0, samples=100)
    assert 1.4 < ledger.spent() <= 1.5 + 0.02
    with pytest.raises(BudgetExceeded, match="ceiling is 2"):
        ledger.check(noise_multiplier=noise, sample_rate=0.1, steps=100)
    assert len(ledger.sessions()) == 1
    with pytest.raises(PrivacyError, match="already spent"):
        ledger.set_budget(1.0, 1e-5)
    with pytest.raises(PrivacyError, match="keep that δ"):
        ledger.set_budget(5.0, 1e-6)
    ledger.set_budget(5.0, 1e-5)  # the site may raise its own ceiling
    ledger.check(noise_multiplier=noise, sample_rate=0.1, steps=100)


def test_damaged_ledger_is_named(tmp_path: Path) -> None:
    ledger = PrivacyLedger(tmp_path)
    ledger.set_budget(5.0)
    ledger.ledger_path.write_text("{not json\n")
    with pytest.raises(PrivacyError, match="line 1 is damaged"):
        ledger.sessions()


def test_default_delta_is_below_one_over_samples() -> None:
    for n in (10, 99, 1000, 123456):
        d = default_delta(n)
        assert 0 < d < 1 / n and d <= 1e-5
