"""Local training and evaluation (fl_client/train.py): the one DP step formula, DP sessions that take exactly the
steps the ledger reserved, the class weighting, the DP plan's calibration, and study-level evaluation."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from consortium import make_workspaces
from torch.utils.data import TensorDataset

from fl_client.privacy import BudgetExceeded, NoBudget, PrivacyLedger, epsilon_of
from fl_client.train import (
    ByPatient,
    DPPlan,
    Multiplied,
    TrainingError,
    dp_sample_rate,
    dp_steps,
    evaluate_local,
    plan_dp,
    pos_weight_of,
    predict,
    train_local,
)
from imaging.sitedata import SiteData, load_site_data
from models.config import Accountant, GradSampleMode, PrivacySpec, TrainSpec, from_flat
from models.nets import build_model
from models.weights import state_arrays

TINY = from_flat({"task": "lung-ct", "model-width": 8})


def _model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_model(TINY.model)


def _volumes(n: int, seed: int = 0) -> tuple[TensorDataset, list[int]]:
    """``n`` tiny 3D images (8³ voxels), half of them with a bright cube."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 1, 8, 8, 8, generator=generator) * 0.2
    labels = [i % 2 for i in range(n)]
    y = torch.tensor(labels, dtype=torch.float32)[:, None]
    x[y[:, 0] == 1, :, 2:6, 2:6, 2:6] += 0.8
    return TensorDataset(x, y), labels


def _ledger(folder: Path, epsilon: float = 50.0) -> PrivacyLedger:
    ledger = PrivacyLedger(folder)
    ledger.set_budget(epsilon, 1e-5)
    return ledger


# The DP step formula ---------------------------------------------------------------------------------------------


def test_dp_sample_rate_is_one_over_the_batches_of_a_pass() -> None:
    assert dp_sample_rate(25, 7) == 0.25  # 4 batches a pass: Opacus samples each image with probability 1/4
    assert dp_sample_rate(200, 20) == pytest.approx(0.1)
    assert dp_sample_rate(5, 16) == 1.0  # a batch larger than the data takes every sample
    assert dp_sample_rate(0, 4) == 1.0  # no division by zero


@pytest.mark.parametrize(("samples", "batch_size"), [
    (25, 7), (20, 8), (6, 16), (200, 20), (186, 2), (1481, 16), (1488, 16), (99, 1), (117, 1), (10, 3),
])
def test_the_formula_is_what_opacus_private_loader_does(samples: int, batch_size: int) -> None:
    """The rate and the steps of a pass are Opacus' own, float rounding included (93 batches give 92 steps)."""
    from opacus.data_loader import DPDataLoader
    from torch.utils.data import DataLoader, TensorDataset

    private = DPDataLoader.from_data_loader(DataLoader(TensorDataset(torch.zeros(samples, 1)), batch_size=batch_size))
    rate = dp_sample_rate(samples, batch_size)
    assert private.sample_rate == rate
    assert len(private.batch_sampler) == dp_steps(rate)
    assert dp_steps(rate, epochs=3) == 3 * dp_steps(rate)


def test_dp_steps_take_at_least_one_step_a_pass() -> None:
    for epochs in (1, 2, 5):
        assert dp_steps(1.0, epochs=epochs) == epochs
        assert dp_steps(0.9, epochs=epochs) == epochs


# DP sessions take exactly what the ledger reserved ------------------------------------------------------------


def _plan(samples: int, batch_size: int, *, epochs: int, noise: float = 1.0) -> DPPlan:
    """A DP plan with a fixed noise multiplier: calibrating it costs seconds at large sample rates."""
    rate = dp_sample_rate(samples, batch_size)
    return DPPlan(noise_multiplier=noise, sample_rate=rate, delta=1e-5, max_grad_norm=1.0,
                  planned_steps=dp_steps(rate, epochs=epochs), epsilon_target=8.0,
                  grad_sample_mode=GradSampleMode.EW, accountant="rdp")


@pytest.mark.parametrize(("samples", "batch_size", "epochs"), [(25, 7, 3), (20, 8, 3), (6, 16, 2), (186, 2, 1)],
                         ids=["q=1/4", "q=1/3", "q=1", "q=1/93"])
def test_a_dp_session_takes_exactly_the_steps_the_ledger_reserved(tmp_path: Path, samples: int, batch_size: int,
                                                                 epochs: int) -> None:
    ledger = _ledger(tmp_path)
    data, labels = _volumes(samples)
    plan = _plan(samples, batch_size, epochs=epochs)
    planned = plan.planned_steps
    spec = TrainSpec(batch_size=batch_size, local_epochs=epochs, augment=False)
    result = train_local(_model(), data, spec=spec, labels=labels, dp=plan, ledger=ledger, run_id="run-q",
                         round_number=1, task="lung-ct", patients=range(samples))
    assert result.steps == planned
    assert result.num_examples == samples  # samples, not batches
    assert result.noise_multiplier == plan.noise_multiplier
    lines = [json.loads(line) for line in ledger.ledger_path.read_text().splitlines()]
    assert [(line["status"], line["steps"]) for line in lines] == [("planned", planned), ("done", planned)]
    assert lines[0]["id"] == lines[1]["id"]
    (session,) = ledger.sessions()
    assert (session.run_id, session.round, session.task, session.samples) == ("run-q", 1, "lung-ct", samples)
    assert session.steps == planned and session.sample_rate == pytest.approx(plan.sample_rate)
    assert result.epsilon == session.epsilon_cumulative
    assert session.epsilon_cumulative == pytest.approx(epsilon_of([(1.0, plan.sample_rate, planned)], 1e-5))


@pytest.mark.parametrize("mode", [GradSampleMode.EW, GradSampleMode.HOOKS])
def test_augmentation_multiplicity_clips_one_mean_gradient_per_sample(tmp_path: Path, mode: GradSampleMode) -> None:
    # Copies that do not differ (no augmentation; the same noise and batches drawn): the mean over a sample's copies
    # is its one gradient, so the run must equal the run without copies. Treating the copies as samples would clip
    # and sum three times as many gradients (SGD: three times the step) on a batch the accountant counts once.
    data, labels = _volumes(12)
    plan = replace(_plan(12, 4, epochs=2), max_grad_norm=0.05, grad_sample_mode=mode)
    weights = []
    for k in (1, 3):
        torch.manual_seed(0)
        model = build_model(from_flat({"task": "lung-ct", "model-width": 8, "dropout": 0}).model)  # no random masks
        spec = TrainSpec(batch_size=4, local_epochs=2, augment=False, optimizer="sgd", learning_rate=0.1,
                         augmentation_multiplicity=k)
        result = train_local(model, data, spec=spec, labels=labels, dp=plan, ledger=_ledger(tmp_path / f"k{k}"),
                             run_id="run-k", round_number=1, task="lung-ct", dp_seed=1,  # the same noise, batches
                             patients=range(12))
        assert result.steps == plan.planned_steps and result.samples_seen <= 2 * 12
        weights.append(state_arrays(model))
    torch.manual_seed(0)
    start = state_arrays(build_model(from_flat({"task": "lung-ct", "model-width": 8, "dropout": 0}).model))
    assert max(float(np.abs(a - b).max()) for a, b in zip(start.values(), weights[0].values(), strict=True)) > 1e-3
    for name, a in weights[0].items():
        np.testing.assert_allclose(weights[1][name], a, atol=1e-5, err_msg=name)


def test_dp_noise_and_batches_are_the_sites_secret(tmp_path: Path) -> None:
    # Everything the lead knows is the same (run config seed, round, weights): without a seed of the site's own, two
    # sessions draw other noise and batches, so nobody outside can replay and subtract the noise.
    data, labels = _volumes(12)
    plan = _plan(12, 4, epochs=1)

    def session(folder: str, dp_seed: int | None) -> dict[str, np.ndarray]:
        torch.manual_seed(0)
        model = build_model(from_flat({"task": "lung-ct", "model-width": 8, "dropout": 0}).model)
        torch.manual_seed(0)  # even the global generator as the run config's seed leaves it
        train_local(model, data, spec=TrainSpec(batch_size=4, augment=False), labels=labels, dp=plan,
                    ledger=_ledger(tmp_path / folder), run_id="run-s", round_number=1, task="lung-ct", dp_seed=dp_seed,
                    patients=range(12))
        return state_arrays(model)

    secret = [session("a", None), session("b", None)]
    assert any(not np.allclose(secret[0][k], secret[1][k]) for k in secret[0])
    seeded = [session("c", 7), session("d", 7)]  # a test's or benchmark's own seed replays them
    for k in seeded[0]:
        np.testing.assert_array_equal(seeded[0][k], seeded[1][k])


def test_dp_samples_patients_so_the_epsilon_holds_for_a_patient_with_several_images(tmp_path: Path) -> None:
    # 12 patients of 2 images each (two views, or two studies): DP-SGD samples the 12 patients, each sampled
    # patient giving one image's clipped gradient, so one patient changes a step by at most the clipping norm.
    data, labels = _volumes(24)
    patients = [i // 2 for i in range(24)]
    plan = _plan(12, 4, epochs=2)
    ledger = _ledger(tmp_path)
    result = train_local(_model(), data, spec=TrainSpec(batch_size=4, local_epochs=2, augment=False), labels=labels,
                         dp=plan, ledger=ledger, run_id="run-p", round_number=1, task="lung-ct", dp_seed=3,
                         patients=patients)
    (session,) = ledger.sessions()
    assert session.samples == 12 and result.num_examples == 24  # the ledger's unit is the patient; FedAvg's the image
    assert session.unit == "patient" and '"unit":"patient"' in ledger.ledger_path.read_text()
    assert result.steps == plan.planned_steps and result.samples_seen <= 2 * 12 * 2
    # a plan made for the images (twice the patients, half the sample rate) is refused before any step
    with pytest.raises(ValueError, match="12 patients .* not its 24 images"):
        train_local(_model(), data, spec=TrainSpec(batch_size=4, augment=False), labels=labels,
                    dp=_plan(24, 4, epochs=1), ledger=_ledger(tmp_path / "images"), patients=patients)
    with pytest.raises(ValueError, match="needs the patient of each image"):
        train_local(_model(), data, spec=TrainSpec(batch_size=4, augment=False), labels=labels,
                    dp=plan, ledger=_ledger(tmp_path / "none"))
    assert len(ledger.sessions()) == 1


def test_under_dp_the_classes_weigh_alike(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A class weight from the split's labels would let one patient's label move every other patient's clipped
    # gradient, outside what the noise is calibrated for.
    import fl_client.train as train

    def private(labels: object) -> float:
        raise AssertionError("the class weight was computed from the site's labels under DP-SGD")

    monkeypatch.setattr(train, "pos_weight_of", private)
    data, labels = _volumes(12)
    train_local(_model(), data, spec=TrainSpec(batch_size=4, augment=False), labels=labels, dp=_plan(12, 4, epochs=1),
                ledger=_ledger(tmp_path), patients=range(12), dp_seed=0)
    with pytest.raises(AssertionError, match="under DP-SGD"):  # without DP it is used
        train_local(_model(), data, spec=TrainSpec(batch_size=4, augment=False), labels=labels)


def test_by_patient_draws_one_of_the_patients_own_images() -> None:
    inner = TensorDataset(torch.arange(6.0)[:, None], torch.zeros(6, 1))
    by = ByPatient(inner, [0, 0, 1, 2, 2, 2], seed=0)
    assert len(by) == 3
    drawn = {i: {float(by[i][0]) for _ in range(200)} for i in range(3)}
    assert drawn == {0: {0.0, 1.0}, 1: {2.0}, 2: {3.0, 4.0, 5.0}}  # each patient's images, and every one of them
    with pytest.raises(ValueError, match="5 patient numbers for 6 images"):
        ByPatient(inner, [0, 0, 1, 2, 2], seed=0)
    x, _ = Multiplied(ByPatient(inner, [0] * 6, seed=1), 8)[0]  # copies pick their own image
    assert len({float(v) for v in x[:, 0]}) > 1


def test_by_patient_in_loader_workers_each_worker_draws_its_own_images() -> None:
    """A GPU site reads batches in worker processes (``loader_options``). Each worker must draw its own images: a
    copy of one RNG in every worker would make the workers pick the same view at the same turn."""
    from torch.utils.data import DataLoader

    views = 4
    inner = TensorDataset(torch.arange(160.0)[:, None], torch.zeros(160, 1))
    by = ByPatient(inner, [i // views for i in range(160)], seed=5)  # 40 patients, 4 images each

    def loader(seed: int) -> DataLoader:
        return DataLoader(by, batch_size=1, num_workers=2, generator=torch.Generator().manual_seed(seed))

    seeded = loader(0)
    first, second = ([int(x) for x, _ in seeded] for _ in range(2))
    assert [v // views for v in first] == list(range(40))  # each patient gives one of its own images
    picks = [v % views for v in first]
    assert picks[0::2] != picks[1::2]  # the two workers (even and odd patients) draw apart: (1/4)^20 by chance
    assert first != second  # a later pass of the same loader draws again
    assert [int(x) for x, _ in loader(0)] == first  # from the loader's generator: a seeded session replays


def test_a_dp_session_reads_through_loader_workers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The private loader of a GPU site (Poisson sampling over patients, worker processes) trains and records the
    steps it reserved. Run here on the CPU with a GPU's worker processes (not its pinned memory)."""
    from opacus.data_loader import DPDataLoader

    import fl_client.train as train

    asked: list[str] = []
    workers: list[int] = []

    def gpu_like(device: torch.device) -> dict[str, object]:
        asked.append(device.type)
        return {"num_workers": 2, "persistent_workers": False}

    real_iter = DPDataLoader.__iter__

    def counting_iter(self: DPDataLoader) -> object:
        workers.append(self.num_workers)
        return real_iter(self)

    monkeypatch.setattr(train, "loader_options", gpu_like)
    monkeypatch.setattr(DPDataLoader, "__iter__", counting_iter)
    data, labels = _volumes(24)
    plan = _plan(12, 4, epochs=1)
    ledger = _ledger(tmp_path)
    result = train_local(_model(), data, spec=TrainSpec(batch_size=4, augment=False), labels=labels, dp=plan,
                         ledger=ledger, run_id="workers", task="lung-ct", dp_seed=1,
                         patients=[i // 2 for i in range(24)])
    assert result.steps == plan.planned_steps and ledger.sessions()[0].samples == 12
    assert asked == ["cpu"] and workers and set(workers) == {2}  # the private loader itself read through workers


def test_multiplied_draws_each_item_k_times() -> None:
    class Counting(torch.utils.data.Dataset):
        def __init__(self) -> None:
            self.calls = 0

        def __len__(self) -> int:
            return 2

        def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
            self.calls += 1
            return torch.full((1, 2, 2), float(self.calls)), torch.tensor([float(index)])

    inner = Counting()
    x, y = Multiplied(inner, 3)[1]
    assert x.shape == (3, 1, 2, 2) and y.shape == (3, 1)
    assert x[:, 0, 0, 0].tolist() == [1.0, 2.0, 3.0] and y[:, 0].tolist() == [1.0, 1.0, 1.0]
    assert len(Multiplied(inner, 3)) == 2


def test_a_dp_session_past_the_ceiling_trains_nothing_and_records_nothing(tmp_path: Path) -> None:
    ledger = _ledger(tmp_path, epsilon=1.0)
    data, labels = _volumes(20)
    plan = plan_dp(PrivacySpec(enabled=True, epsilon=0.9), samples=20, batch_size=5, steps_per_round=4, rounds=1,
                   ledger=ledger, grad_sample_mode=GradSampleMode.EW)
    spec = TrainSpec(batch_size=5, local_epochs=1, augment=False)
    model = _model()
    train_local(model, data, spec=spec, labels=labels, dp=plan, ledger=ledger, run_id="a", patients=range(20))
    before = state_arrays(model)
    with pytest.raises(BudgetExceeded, match="Nothing was trained or sent"):
        train_local(model, data, spec=spec, labels=labels, dp=plan, ledger=ledger, run_id="b", patients=range(20))
    for key, value in state_arrays(model).items():
        np.testing.assert_array_equal(value, before[key], err_msg=key)
    assert [s.run_id for s in ledger.sessions()] == ["a"]


def test_dp_needs_the_ledger_and_training_needs_data(tmp_path: Path) -> None:
    ledger = _ledger(tmp_path)
    data, labels = _volumes(10)
    plan = _plan(10, 5, epochs=1)
    with pytest.raises(ValueError, match="needs the site's ledger"):
        train_local(_model(), data, spec=TrainSpec(batch_size=5), labels=labels, dp=plan, patients=range(10))
    empty = TensorDataset(torch.zeros(0, 1, 8, 8, 8), torch.zeros(0, 1))
    with pytest.raises(TrainingError, match="empty"):
        train_local(_model(), empty, spec=TrainSpec(), labels=[])
    assert ledger.sessions() == []


def test_plain_training_counts_samples_steps_and_epochs() -> None:
    data, labels = _volumes(10)
    seen: list[tuple[int, float]] = []
    model = _model()
    before = state_arrays(model)
    result = train_local(model, data, spec=TrainSpec(batch_size=4, local_epochs=2, augment=False), labels=labels,
                         on_epoch=lambda epoch, loss: seen.append((epoch, loss)))
    assert result.num_examples == 10 and result.samples_seen == 20
    assert result.steps == 2 * math.ceil(10 / 4)  # without DP every batch of every pass, the last one short
    assert result.epsilon is None and result.noise_multiplier is None
    assert [e for e, _ in seen] == [0, 1] and all(math.isfinite(loss) and loss > 0 for _, loss in seen)
    assert result.loss == pytest.approx(sum(loss for _, loss in seen) / 2)
    assert not model.training  # left in eval mode
    assert any(not np.array_equal(v, before[k]) for k, v in state_arrays(model).items())


# Class weighting ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("labels", "weight"), [
    ([0, 0, 0, 1], 3.0),
    ([1, 1, 0], 0.5),
    ([0, 1] * 5, 1.0),
    ([0, 0, 0], 1.0),  # one class only: no weighting
    ([1, 1], 1.0),
    ([], 1.0),
])
def test_pos_weight_is_negatives_over_positives(labels: list[int], weight: float) -> None:
    assert pos_weight_of(labels) == pytest.approx(weight)


# The DP plan ---------------------------------------------------------------------------------------------------


def test_plan_dp_refuses_a_site_without_a_budget(tmp_path: Path) -> None:
    ledger = PrivacyLedger(tmp_path)
    with pytest.raises(NoBudget, match="--set-budget"):
        plan_dp(PrivacySpec(enabled=True), samples=100, batch_size=10, steps_per_round=10, rounds=3, ledger=ledger,
                grad_sample_mode=GradSampleMode.EW)
    assert not ledger.ledger_path.exists() and not ledger.budget_path.exists()


@pytest.mark.parametrize("accountant", [Accountant.RDP, Accountant.PRV])
def test_plan_dp_spends_the_target_epsilon_over_the_planned_steps(tmp_path: Path, accountant: Accountant) -> None:
    ledger = _ledger(tmp_path, epsilon=10.0)
    steps_per_round = dp_steps(dp_sample_rate(200, 20), epochs=2)
    plan = plan_dp(PrivacySpec(enabled=True, epsilon=3.0, accountant=accountant), samples=200, batch_size=20,
                   steps_per_round=steps_per_round, rounds=5, ledger=ledger, grad_sample_mode=GradSampleMode.HOOKS)
    assert plan.planned_steps == 100 and plan.sample_rate == pytest.approx(0.1)
    assert plan.delta == 1e-5  # the budget's δ when the run sets none
    assert plan.epsilon_target == 3.0 and plan.accountant == accountant.value
    assert plan.grad_sample_mode == GradSampleMode.HOOKS and plan.max_grad_norm == 1.0
    spent = epsilon_of([(plan.noise_multiplier, plan.sample_rate, plan.planned_steps)], plan.delta, accountant.value)
    assert 2.9 <= spent <= 3.0 + 1e-6
    # Over half the steps it spends clearly less; over twice as many, clearly more.
    half = epsilon_of([(plan.noise_multiplier, plan.sample_rate, 50)], plan.delta, accountant.value)
    double = epsilon_of([(plan.noise_multiplier, plan.sample_rate, 200)], plan.delta, accountant.value)
    assert half < 0.9 * spent and double > 1.1 * spent


def test_plan_dp_takes_the_runs_delta_and_more_steps_need_more_noise(tmp_path: Path) -> None:
    ledger = _ledger(tmp_path)
    privacy = PrivacySpec(enabled=True, epsilon=2.0, delta=1e-6)
    short = plan_dp(privacy, samples=50, batch_size=10, steps_per_round=5, rounds=2, ledger=ledger,
                    grad_sample_mode=GradSampleMode.EW)
    long = plan_dp(privacy, samples=50, batch_size=10, steps_per_round=5, rounds=8, ledger=ledger,
                   grad_sample_mode=GradSampleMode.EW)
    assert short.delta == long.delta == 1e-6
    assert long.noise_multiplier > short.noise_multiplier
    assert epsilon_of([(long.noise_multiplier, 0.2, 40)], 1e-6) == pytest.approx(2.0, abs=0.1)
    with pytest.raises(ValueError, match="resolve 'auto' first"):
        plan_dp(privacy, samples=50, batch_size=10, steps_per_round=5, rounds=2, ledger=ledger,
                grad_sample_mode=GradSampleMode.AUTO)


# Evaluation -----------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One site with lung CT (one volume a study) and mammography (two views a study)."""
    ws = make_workspaces(tmp_path_factory.mktemp("train"), sites=1, studies_per_task=12, seed=0,
                         tasks=["lung-ct", "breast-mg"])
    return ws / "site-a"


def test_evaluate_local_scores_each_study_by_its_highest_image(site: Path) -> None:
    data = load_site_data([site], "breast-mg")
    uids, labels = data.study_uids("val"), data.labels("val")
    assert len(uids) > len(set(uids)) >= 2  # several views a study
    torch.manual_seed(0)
    model = build_model(from_flat({"task": "breast-mg", "model-width": 8}).model)
    result = evaluate_local(model, data, "val")
    assert result is not None
    m = result.metrics
    assert result.images == len(uids) and m.studies == len(set(uids))
    truth = {u: y for u, y in zip(uids, labels, strict=True)}
    assert m.positives == sum(truth.values()) and m.negatives == m.studies - m.positives
    probs = predict(model, data.dataset("val", train=False))
    best = {u: max(float(p) for v, p in zip(uids, probs, strict=True) if v == u) for u in truth}
    assert m.brier == pytest.approx(np.mean([(best[u] - truth[u]) ** 2 for u in truth]), rel=1e-5)
    assert m.threshold == 0.5 and m.loss is not None and m.loss > 0
    assert result.seconds >= 0


def test_the_patient_of_each_image_follows_the_dataset_order(site: Path) -> None:
    data = load_site_data([site], "breast-mg")
    patients, uids = data.patients("train"), data.study_uids("train")
    assert len(patients) == data.count("train") == len(data.dataset("train", train=False))
    assert sorted(set(patients)) == list(range(data.count_patients("train")))
    assert data.count_patients("train") < data.count("train")  # two views a study
    for uid in set(uids):  # a study's views are one patient's
        assert len({p for p, u in zip(patients, uids, strict=True) if u == uid}) == 1
    pseudonyms = [item.patient_pseudonym for _, item in data.items["train"]]
    assert len(set(zip(patients, pseudonyms, strict=True))) == data.count_patients("train")


def test_evaluate_local_on_one_image_a_study_and_on_an_empty_split(site: Path) -> None:
    data = load_site_data([site], "lung-ct")
    result = evaluate_local(_model(), data, "test", threshold=0.0)
    assert result is not None
    m = result.metrics
    assert result.images == m.studies == data.count("test") == len(set(data.study_uids("test")))
    assert m.sensitivity == 1.0 and m.specificity == 0.0  # threshold 0: every study called positive
    assert m.auroc is None or 0.0 <= m.auroc <= 1.0
    assert evaluate_local(_model(), SiteData("lung-ct", {"train": data.items["train"]}), "val") is None


# Mixed precision, where a CPU can run it ---------------------------------------------------------------------------


@pytest.mark.parametrize("mode", [None, GradSampleMode.HOOKS], ids=["plain", "dp-hooks"])
def test_bf16_mixed_precision_trains_and_the_weights_leave_as_float32(tmp_path: Path,
                                                                      mode: GradSampleMode | None) -> None:
    from dataclasses import replace

    from models.device import place

    data, labels = _volumes(12)
    model = _model()
    before = state_arrays(model)
    dp = replace(_plan(12, 4, epochs=1), grad_sample_mode=mode) if mode is not None else None
    placement = place("cpu", "bf16", dp_mode=mode.value if mode is not None else None)
    assert placement.amp_dtype == torch.bfloat16
    result = train_local(model, data, spec=TrainSpec(batch_size=4, local_epochs=1, augment=False), labels=labels,
                         dp=dp, ledger=_ledger(tmp_path) if dp is not None else None, placement=placement,
                         patients=range(12))
    after = state_arrays(model)
    assert np.isfinite(result.loss) and result.steps == 3
    assert {k: a.dtype for k, a in after.items()} == {k: a.dtype for k, a in before.items()}
    assert all(np.isfinite(a).all() for a in after.values() if a.dtype.kind == "f")
    assert any(not np.array_equal(after[k], before[k]) for k in before)  # it trained
    assert next(model.parameters()).device == torch.device("cpu")
