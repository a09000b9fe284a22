"""The site's privacy ledger: cumulative ε over all history, the site-owned ceiling, refusals."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from opacus.accountants import RDPAccountant

from fl_client.privacy import BudgetExceeded, NoBudget, PrivacyError, PrivacyLedger, default_delta, noise_for
from fl_client.train import plan_dp, train_local
from models.config import FineTune, GradSampleMode, ModelSpec, PrivacySpec, TrainSpec
from models.nets import build_model


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


class _FailingData(torch.utils.data.Dataset[tuple[torch.Tensor, torch.Tensor]]):
    """Sixty small images; reading fails after ``fail_after`` reads (a disk error half-way)."""

    def __init__(self, fail_after: int) -> None:
        self.reads, self.fail_after = 0, fail_after
        generator = torch.Generator().manual_seed(0)
        self.x = torch.randn(60, 1, 16, 16, generator=generator)
        self.y = (torch.arange(60) % 2).float()[:, None]

    def __len__(self) -> int:
        return 60

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        self.reads += 1
        if self.reads > self.fail_after:
            raise OSError("disk error")
        return self.x[i], self.y[i]


def test_dp_steps_taken_before_a_crash_are_still_counted(tmp_path: Path) -> None:
    ledger = PrivacyLedger(tmp_path)
    ledger.set_budget(20.0, 1e-5)
    spec = TrainSpec(batch_size=10, local_epochs=3)
    privacy = PrivacySpec(enabled=True, epsilon=5.0)
    plan = plan_dp(privacy, samples=60, batch_size=10, steps_per_round=18, rounds=1, ledger=ledger,
                   grad_sample_mode=GradSampleMode.EW)
    model = build_model(ModelSpec(task="breast-mg", spatial_dims=2))
    with pytest.raises(OSError, match="disk error"):
        train_local(model, _FailingData(fail_after=45), spec=spec, labels=[0, 1] * 30, dp=plan, ledger=ledger,
                    run_id="crash", task="breast-mg", patients=range(60))
    sessions = ledger.sessions()
    assert len(sessions) == 1 and 1 <= sessions[0].steps < 18 and sessions[0].run_id == "crash"
    assert ledger.spent() > 0


def bright_squares() -> tuple[torch.Tensor, torch.Tensor]:
    """200 faint 16×16 images; every other one holds a bright square (label 1): an easy problem for DP-SGD."""
    generator = torch.Generator().manual_seed(1)
    x = torch.rand(200, 1, 16, 16, generator=generator) * 0.2
    y = (torch.arange(200) % 2).float()[:, None]
    x[y[:, 0] == 1, :, 6:10, 6:10] += 0.8
    return x, y


def test_a_dp_model_trains(tmp_path: Path) -> None:
    """Loss falls under DP-SGD on an easy problem (bright square or not), with the ledger counting."""
    ledger = PrivacyLedger(tmp_path)
    ledger.set_budget(50.0, 1e-5)
    x, y = bright_squares()
    data = torch.utils.data.TensorDataset(x, y)
    torch.manual_seed(0)
    model = build_model(ModelSpec(task="breast-mg", spatial_dims=2))
    spec = TrainSpec(batch_size=20, learning_rate=3e-3, local_epochs=1)
    plan = plan_dp(PrivacySpec(enabled=True, epsilon=8.0), samples=200, batch_size=20, steps_per_round=10,
                   rounds=6, ledger=ledger, grad_sample_mode=GradSampleMode.EW)
    losses = [train_local(model, data, spec=spec, labels=y[:, 0].int().tolist(), dp=plan, ledger=ledger,
                          round_number=r, task="breast-mg", dp_seed=r, patients=range(200)).loss for r in range(6)]
    assert losses[-1] < 0.8 * losses[0], losses
    assert len(ledger.sessions()) == 6 and ledger.spent() <= 8.0 + 0.05


def test_dp_fine_tuning_of_norms_and_head_keeps_the_convolutions(tmp_path: Path) -> None:
    """Under DP-SGD with fine-tune=norm-head the convolutions leave training as they came (bit for bit), the norms
    and the head move, the loss falls, the ledger counts as for the whole network, and every parameter is
    trainable again afterwards (saliency takes gradients through every layer)."""
    ledger = PrivacyLedger(tmp_path)
    ledger.set_budget(50.0, 1e-5)
    x, y = bright_squares()
    torch.manual_seed(0)
    model = build_model(ModelSpec(task="breast-mg", spatial_dims=2))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    spec = TrainSpec(batch_size=20, learning_rate=3e-2, local_epochs=1, fine_tune=FineTune.NORM_HEAD)
    plan = plan_dp(PrivacySpec(enabled=True, epsilon=8.0), samples=200, batch_size=20, steps_per_round=10,
                   rounds=4, ledger=ledger, grad_sample_mode=GradSampleMode.EW)
    losses = [train_local(model, torch.utils.data.TensorDataset(x, y), spec=spec, labels=y[:, 0].int().tolist(),
                          dp=plan, ledger=ledger, round_number=r, task="breast-mg", dp_seed=r,
                          patients=range(200)).loss for r in range(4)]
    after = dict(model.named_parameters())
    convs = [n for n in before if ".conv." in n]
    assert convs and all(torch.equal(before[n], after[n]) for n in convs)
    assert not torch.equal(before["head.weight"], after["head.weight"])
    assert any(not torch.equal(before[n], after[n]) for n in before if ".adn.N." in n)
    assert losses[-1] < losses[0], losses
    assert len(ledger.sessions()) == 4 and all(s.steps > 0 for s in ledger.sessions())
    assert all(p.requires_grad for p in model.parameters())


def test_a_session_refused_before_training_leaves_every_parameter_trainable(tmp_path: Path) -> None:
    """fine-tune marks parameters frozen before the optimiser and Opacus see them; a session refused in its set-up
    (here the site's ceiling) leaves the model as it found it, for saliency and the next session."""
    planner, ledger = PrivacyLedger(tmp_path / "plan"), PrivacyLedger(tmp_path / "site")
    planner.set_budget(50.0, 1e-5)
    ledger.set_budget(0.5, 1e-5)
    x, y = torch.rand(40, 1, 16, 16), (torch.arange(40) % 2).float()[:, None]
    model = build_model(ModelSpec(task="breast-mg", spatial_dims=2))
    plan = plan_dp(PrivacySpec(enabled=True, epsilon=8.0), samples=40, batch_size=8, steps_per_round=5,
                   rounds=2, ledger=planner, grad_sample_mode=GradSampleMode.EW)
    with pytest.raises(BudgetExceeded):
        train_local(model, torch.utils.data.TensorDataset(x, y), spec=TrainSpec(fine_tune=FineTune.HEAD),
                    labels=y[:, 0].int().tolist(), dp=plan, ledger=ledger, task="breast-mg", dp_seed=0,
                    patients=range(40))
    assert all(p.requires_grad for p in model.parameters())
