"""What a site does in a federated round (fl_client/federated.py), called directly with no Flower: which workspace
a process serves, what the run's manifest lists, refusals, training and evaluation replies, all of them logged in
the site's egress log as they leave."""

from __future__ import annotations

import math
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from consortium import make_workspaces

from fl_client.egress import EgressLog, digest
from fl_client.federated import (
    Site,
    SiteConfigError,
    evaluate,
    fit,
    refusal,
    run_manifest,
    site_from_config,
    steps_per_round,
)
from fl_client.policy import RunBook, SitePolicy
from fl_client.privacy import PrivacyLedger
from fl_client.train import dp_sample_rate, dp_steps
from imaging.sitedata import load_site_data
from models.config import DP_BATCH, RunConfig, from_flat
from models.nets import build_model, parameter_count
from models.protocol import (
    ALLOWED_METRICS,
    ALLOWED_STRINGS,
    EVAL_METRICS,
    PRIVACY_METRICS,
    TRAIN_METRICS,
    WEIGHTS,
    Metric,
    Refusal,
    SiteKey,
    split_histograms,
)
from models.weights import pack, state_arrays

TINY = {"task": "lung-ct", "model-width": 8, "batch-size": 4, "local-epochs": 1, "augment": False}


def _config(**extra: object) -> RunConfig:
    return from_flat({**TINY, **extra})


def _global(config: RunConfig, seed: int = 0) -> np.ndarray:
    torch.manual_seed(seed)
    return pack(state_arrays(build_model(config.model)))


@pytest.fixture(scope="module")
def ingested(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_workspaces(tmp_path_factory.mktemp("federated"), sites=1, studies_per_task=12, seed=0,
                           tasks=["lung-ct"]) / "site-a"


@pytest.fixture()
def site(ingested: Path, tmp_path: Path) -> Site:
    """A fresh copy of the ingested site: its egress log and ledger start empty."""
    ws = tmp_path / "site-a"
    shutil.copytree(ingested, ws)
    return Site("a", ws)


# Which site this process serves ----------------------------------------------------------------------------------


def test_the_node_configs_workspace_wins_over_a_simulation(tmp_path: Path) -> None:
    ws = tmp_path / "hospital-1"
    ws.mkdir()
    (tmp_path / "sims" / "x").mkdir(parents=True)
    run_config = {"sim-sites": str(tmp_path / "sims")}
    assert site_from_config({"workspace": str(ws), "site-id": "a", "partition-id": 0}, run_config) == Site("a", ws)
    assert site_from_config({"workspace": str(ws)}, {}) == Site("hospital-1", ws)  # the folder names the site


def test_a_workspace_under_home_is_expanded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "ws").mkdir()
    assert site_from_config({"workspace": "~/ws", "site-id": "b"}, {}) == Site("b", tmp_path / "ws")


def test_a_simulated_partition_takes_the_ith_sorted_folder(tmp_path: Path) -> None:
    for name in ("site-c", "site-a", "site-b"):
        (tmp_path / name).mkdir()
    (tmp_path / "notes.txt").write_text("not a site")
    run_config = {"sim-sites": str(tmp_path)}
    for pid, name in enumerate(["site-a", "site-b", "site-c"]):
        assert site_from_config({"partition-id": pid}, run_config) == Site(name, tmp_path / name)
    # An empty workspace in the node config does not count: the simulation decides.
    assert site_from_config({"workspace": "", "partition-id": 1}, run_config) == Site("site-b", tmp_path / "site-b")


@pytest.mark.parametrize("pid", [3, -1, None])
def test_a_partition_without_a_folder_is_refused_with_the_count(tmp_path: Path, pid: int | None) -> None:
    for name in ("site-a", "site-b", "site-c"):
        (tmp_path / name).mkdir()
    node_config = {} if pid is None else {"partition-id": pid}
    shown = -1 if pid is None else pid
    expected = rf"simulation partition {shown} has no workspace in .*\(3 site folders\): use as many supernodes"
    with pytest.raises(SiteConfigError, match=expected):
        site_from_config(node_config, {"sim-sites": str(tmp_path)})


def test_a_missing_simulation_folder_has_no_sites(tmp_path: Path) -> None:
    with pytest.raises(SiteConfigError, match=r"partition 0 has no workspace in .*nowhere \(0 site folders\)"):
        site_from_config({"partition-id": 0}, {"sim-sites": str(tmp_path / "nowhere")})


def test_no_workspace_anywhere_says_how_to_start_the_supernode() -> None:
    with pytest.raises(SiteConfigError, match="this SuperNode has no workspace: start it with --node-config"):
        site_from_config({}, {})
    with pytest.raises(SiteConfigError, match="no workspace"):
        site_from_config({"workspace": ""}, {"sim-sites": ""})


def test_a_workspace_that_does_not_exist_says_to_ingest_first(tmp_path: Path) -> None:
    with pytest.raises(SiteConfigError, match=f"site workspace {tmp_path / 'gone'} does not exist: ingest"):
        site_from_config({"workspace": str(tmp_path / "gone"), "site-id": "a"}, {})
    (tmp_path / "file").write_text("")
    with pytest.raises(SiteConfigError, match="does not exist"):
        site_from_config({"workspace": str(tmp_path / "file")}, {})


# The run's manifest ----------------------------------------------------------------------------------------------


def test_the_manifest_lists_train_and_eval_metrics_and_privacy_ones_only_under_dp() -> None:
    plain = run_manifest(_config(), {}, {}, run="11", lead_run_id="lead-11")
    assert tuple(plain.metrics) == TRAIN_METRICS + EVAL_METRICS
    assert not plain.dp and not set(PRIVACY_METRICS) & set(plain.metrics)
    private = run_manifest(_config(dp=True, **{"dp-epsilon": 2.5}), {}, {}, run="12", lead_run_id="lead-12")
    assert tuple(private.metrics) == TRAIN_METRICS + EVAL_METRICS + PRIVACY_METRICS
    assert private.dp and private.dp_epsilon == 2.5
    assert set(private.metrics) <= ALLOWED_METRICS


def test_the_manifest_describes_the_run_from_the_typed_config() -> None:
    config = _config(**{"num-rounds": 4, "local-epochs": 2, "strategy": "fedprox", "proximal-mu": 0.1})
    m = run_manifest(config, {}, {"app-bundle": "oncofed/oncofed==0.1.0", "app-bundle-sha256": "ab" * 32}, run="5",
                     lead_run_id="lead-3")
    assert (m.run, m.lead_run_id, m.task, m.rounds, m.local_epochs) == ("5", "lead-3", "lung-ct", 4, 2)
    assert (m.strategy, m.network) == ("fedprox", "compact-cnn")
    assert m.parameters == parameter_count(build_model(config.model)) > 0
    assert (m.app, m.app_hash) == ("oncofed/oncofed==0.1.0", "ab" * 32)
    assert not m.secure_aggregation
    simulated = run_manifest(config, {}, {}, run="5", lead_run_id="lead-3")
    assert (simulated.app, simulated.app_hash) == ("simulation", "")
    assert m.fine_tune == "all" and not any("fine-tune" in line for line in m.lines())
    # A run that fine-tunes a start tells the site how much of the network it trains.
    tuned = run_manifest(_config(**{"fine-tune": "norm-head", "initial-model": "/m.pt"}), {}, {}, run="6",
                         lead_run_id="lead-4")
    assert tuned.parameters == m.parameters and 0 < tuned.trained < tuned.parameters / 10
    assert f"it trains {tuned.trained:,}, fine-tune norm-head" in tuned.lines()[1]


def test_secure_aggregation_is_read_from_the_typed_config_not_the_flat_keys() -> None:
    secure = _config(**{"secure-aggregation": "true", "min-sites": 3})
    assert run_manifest(secure, {}, {}, run="1", lead_run_id="1").secure_aggregation
    # The flat run config is not where the manifest reads it.
    assert not run_manifest(_config(), {"secure-aggregation": "true"}, {}, run="1", lead_run_id="1").secure_aggregation


def test_steps_per_round_are_the_dp_step_formula() -> None:
    assert steps_per_round(_config(**{"batch-size": 7, "local-epochs": 3}), 25) == 12
    assert steps_per_round(_config(**{"batch-size": 16, "local-epochs": 2}), 5) == 2
    for samples, batch, epochs in ((7, 4, 1), (100, 16, 3), (37, 8, 2)):
        config = _config(**{"batch-size": batch, "local-epochs": epochs})
        assert steps_per_round(config, samples) == dp_steps(dp_sample_rate(samples, batch), epochs=epochs)


# Refusals ------------------------------------------------------------------------------------------------------


def test_a_refusal_sends_no_arrays_only_whitelisted_keys_and_is_logged(site: Site) -> None:
    reply = refusal(site, task="lung-ct", run_id="run-9", round_number=2, kind="train", code=Refusal.PENDING,
                    detail="the run waits for the site's approval")
    assert reply.arrays == {} and reply.evaluation == {}
    assert reply.metrics == {Metric.REFUSED: 1, Metric.NUM_EXAMPLES: 0}
    assert reply.strings == {SiteKey.SITE_ID: "a", SiteKey.REFUSAL: "pending-approval",
                             SiteKey.DETAIL: "the run waits for the site's approval", SiteKey.TASK: "lung-ct"}
    assert set(reply.strings) <= ALLOWED_STRINGS and set(reply.metrics) <= ALLOWED_METRICS
    (record,) = EgressLog(site.workspace).records()
    assert (record.run, record.round, record.kind, record.bytes, record.sha256) == ("run-9", 2, "train-refused", 0, "")
    assert record.metrics == {"refused": 1.0, "num-examples": 0.0} and record.strings == reply.strings


def test_a_refusal_without_a_task_or_with_a_long_one(site: Site) -> None:
    bare = refusal(site, task="", run_id="r", round_number=0, kind="evaluate", code=Refusal.VERSION, detail="old")
    assert SiteKey.TASK not in bare.strings
    long = refusal(site, task="t" * 100, run_id="r", round_number=0, kind="evaluate", code=Refusal.TASK,
                   detail="not this task")
    assert long.strings[SiteKey.TASK] == "t" * 64  # a code field stays short
    assert [r.kind for r in EgressLog(site.workspace).records()] == ["evaluate-refused", "evaluate-refused"]


# Training ------------------------------------------------------------------------------------------------------


def test_fit_returns_float32_weights_of_the_models_length_and_counts_samples(site: Site) -> None:
    config = _config()
    flat = _global(config)
    train = load_site_data([site.workspace], "lung-ct")
    reply = fit(site, config, run_id="run-1", round_number=1, global_flat=flat, evaluate_split="val")
    assert list(reply.arrays) == [WEIGHTS]
    sent = reply.arrays[WEIGHTS]
    assert sent.dtype == np.float32 and sent.shape == flat.shape and np.isfinite(sent).all()
    assert not np.array_equal(sent, flat)  # it trained
    samples = train.count("train")
    assert reply.metrics[Metric.NUM_EXAMPLES] == samples  # samples, not batches
    assert reply.metrics[Metric.SAMPLES_SEEN] == samples
    assert reply.metrics[Metric.STEPS] == math.ceil(samples / 4)
    assert reply.metrics[Metric.DP] == 0 and Metric.EPSILON not in reply.metrics
    assert set(reply.metrics) <= set(TRAIN_METRICS) | {Metric.DP}
    assert reply.strings == {SiteKey.SITE_ID: "a", SiteKey.TASK: "lung-ct"}
    # The received model's evaluation on the val split travels with the reply.
    assert reply.evaluation[Metric.STUDIES] == len(set(train.study_uids("val"))) > 0
    evaluated, trained = EgressLog(site.workspace).records()
    assert (evaluated.kind, evaluated.round, evaluated.bytes) == ("evaluate-val", 0, 0)
    assert evaluated.metrics == {k: float(v) for k, v in reply.evaluation.items()}
    assert (trained.kind, trained.run, trained.round) == ("train", "run-1", 1)
    assert (trained.sha256, trained.bytes) == digest(reply.arrays) and trained.bytes == 4 * flat.size
    assert trained.metrics == {k: float(v) for k, v in reply.metrics.items()}


def test_the_proximal_term_applies_in_a_fedprox_run_only(site: Site) -> None:
    """FedProx is the default strategy, with μ 0.01 for a network with normalisation: a FedAvg run trains without
    the term (the same weights as at μ 0), a FedProx run with it (the run's μ, or the round's from Flower's
    FedProx)."""
    def weights(**extra: object) -> np.ndarray:
        config = _config(**extra)
        return fit(site, config, run_id="run-mu", round_number=1, global_flat=_global(config)).arrays[WEIGHTS]

    assert _config().federation.strategy.value == "fedprox" and _config().training.proximal_mu == 0.01
    fedavg = weights(strategy="fedavg")
    np.testing.assert_array_equal(fedavg, weights(strategy="fedavg", **{"proximal-mu": 0}))
    assert not np.array_equal(fedavg, weights(**{"proximal-mu": 1.0}))


def test_fit_under_dp_takes_the_planned_steps_and_reports_the_sites_epsilon(site: Site) -> None:
    PrivacyLedger(site.workspace).set_budget(20.0, 1e-5)
    config = _config(dp=True, **{"dp-epsilon": 4.0, "num-rounds": 2, "batch-size": 2})
    reply = fit(site, config, run_id="run-dp", round_number=1, global_flat=_global(config))
    data = load_site_data([site.workspace], "lung-ct")
    samples = data.count_patients("train")  # DP-SGD's unit: a patient of two studies is one
    # a check that can fail: the site's patients and its images give other rates at this batch
    assert dp_sample_rate(samples, 2) != dp_sample_rate(data.count("train"), 2)
    (session,) = PrivacyLedger(site.workspace).sessions()
    assert reply.metrics[Metric.DP] == 1 and session.samples == samples
    assert reply.metrics[Metric.STEPS] == session.steps == steps_per_round(config, samples)
    assert reply.metrics[Metric.EPSILON] == pytest.approx(session.epsilon_cumulative)
    assert 0 < reply.metrics[Metric.EPSILON] < 4.0  # one round of two spends part of the run's ε
    assert reply.metrics[Metric.EPSILON_MAX] == 20.0 and reply.metrics[Metric.DELTA] == 1e-5
    assert reply.metrics[Metric.SAMPLE_RATE] == pytest.approx(dp_sample_rate(samples, 2))
    assert set(reply.metrics) <= set(TRAIN_METRICS) | set(PRIVACY_METRICS)
    (record,) = EgressLog(site.workspace).records()
    assert record.kind == "train" and record.metrics[Metric.EPSILON] == reply.metrics[Metric.EPSILON]


def test_a_site_that_requires_dp_trains_a_plain_run_at_the_dp_batch_it_reserved(site: Site,
                                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """The run asks for no DP and leaves the batch to the default (4 per step without DP); the site's policy turns
    DP on, so it plans, reserves and takes its steps at DP's expected batch of 16, the same in all three. Its
    learning rate stays the run's (1e-3, what the server stores and reports), not the DP default of 3e-3."""
    import fl_client.federated as federated

    rates: list[float] = []
    real = federated.train_local

    def spy(*args: Any, **kwargs: Any) -> Any:
        rates.append(kwargs["spec"].learning_rate)
        return real(*args, **kwargs)

    monkeypatch.setattr(federated, "train_local", spy)
    PrivacyLedger(site.workspace).set_budget(20.0, 1e-5, require_dp=True)
    config = _config(**{"batch-size": 0, "num-rounds": 2})
    assert not config.privacy.enabled
    reply = fit(site, config, run_id="run-forced", round_number=1, global_flat=_global(config))
    assert rates == [1e-3]
    samples = load_site_data([site.workspace], "lung-ct").count_patients("train")
    (session,) = PrivacyLedger(site.workspace).sessions()
    assert reply.metrics[Metric.DP] == 1
    assert reply.metrics[Metric.STEPS] == session.steps == steps_per_round(config, samples)
    assert reply.metrics[Metric.SAMPLE_RATE] == pytest.approx(dp_sample_rate(samples, DP_BATCH))


def test_a_site_that_requires_dp_refuses_a_batchnorm_run_naming_the_way_out(site: Site) -> None:
    """BatchNorm mixes the samples of a batch, which DP-SGD cannot allow: a site whose policy requires DP refuses a
    run of a BatchNorm network (the colorectal default without DP) with the network reason and what the lead can
    change, before anything is planned or spent."""
    PrivacyLedger(site.workspace).set_budget(20.0, 1e-5, require_dp=True)
    config = _config(norm="batch")
    reply = fit(site, config, run_id="run-bn", round_number=1, global_flat=_global(config))
    assert reply.arrays == {} and reply.metrics[Metric.REFUSED] == 1
    assert reply.strings[SiteKey.REFUSAL] == Refusal.NETWORK
    assert "dp=true or norm=instance" in reply.strings[SiteKey.DETAIL]
    assert PrivacyLedger(site.workspace).sessions() == []
    assert [r.kind for r in EgressLog(site.workspace).records()] == ["train-refused"]


def test_fit_under_dp_without_a_budget_is_refused_before_training(site: Site) -> None:
    config = _config(dp=True)
    reply = fit(site, config, run_id="run-nb", round_number=1, global_flat=_global(config))
    assert reply.arrays == {}
    assert reply.metrics[Metric.REFUSED] == 1 and reply.metrics[Metric.REFUSED_BUDGET] == 1
    assert Metric.EPSILON_MAX not in reply.metrics  # the site has set no budget at all
    assert reply.strings[SiteKey.REFUSAL] == Refusal.BUDGET
    assert "no privacy budget" in reply.strings[SiteKey.DETAIL]
    assert PrivacyLedger(site.workspace).sessions() == []
    assert [r.kind for r in EgressLog(site.workspace).records()] == ["train-refused"]


def test_a_round_past_the_runs_count_is_refused_before_anything_is_spent(site: Site) -> None:
    """A site plans its DP noise and approves a run for the count of rounds it reads; a lead that goes on past it
    (or a site whose version resolves num-rounds 0 to fewer rounds) gets a refusal, and no ε is spent."""
    PrivacyLedger(site.workspace).set_budget(50.0, 1e-5)
    config = _config(dp=True, **{"num-rounds": 2})
    reply = fit(site, config, run_id="run-past", round_number=3, global_flat=_global(config))
    assert reply.arrays == {} and reply.metrics[Metric.REFUSED] == 1
    assert reply.strings[SiteKey.REFUSAL] == Refusal.ROUNDS
    assert "round 3 is past the 2 rounds" in reply.strings[SiteKey.DETAIL]
    assert PrivacyLedger(site.workspace).sessions() == []  # nothing reserved, nothing spent
    (logged,) = EgressLog(site.workspace).records()  # what left is logged, and it is only the refusal
    assert logged.kind == "train-refused" and logged.bytes == 0


@pytest.mark.parametrize("where", ["other-task", "no-catalog"])
def test_fit_without_data_for_the_task_answers_a_no_data_refusal(site: Site, tmp_path: Path, where: str) -> None:
    if where == "other-task":
        config = from_flat({"task": "breast-mg", "model-width": 8})  # the site holds lung CT only
        target = site
    else:
        config = _config()
        target = Site("b", tmp_path / "empty")
        target.workspace.mkdir()
    reply = fit(target, config, run_id="run-2", round_number=3, global_flat=_global(config))
    assert reply.arrays == {}
    assert reply.metrics == {Metric.REFUSED: 1, Metric.REFUSED_NO_DATA: 1, Metric.NUM_EXAMPLES: 0}
    assert reply.strings[SiteKey.REFUSAL] == Refusal.NO_DATA == "no-data"
    assert reply.strings[SiteKey.TASK] == config.model.task
    (record,) = EgressLog(target.workspace).records()
    assert (record.kind, record.round, record.bytes) == ("train-refused", 3, 0)
    assert record.strings == reply.strings


# Evaluation ----------------------------------------------------------------------------------------------------


def test_evaluate_gives_study_counts_for_the_split_and_the_extra_split(site: Site) -> None:
    config = _config()
    data = load_site_data([site.workspace], "lung-ct")
    RunBook(site.workspace).set_policy(SitePolicy(min_count=1), who="site DPO")  # this small split's histograms
    reply = evaluate(site, config, run_id="run-4", round_number=2, global_flat=_global(config), split="val",
                     evaluate_split="test")
    val_studies = len(set(data.study_uids("val")))
    assert reply.arrays == {}
    assert reply.metrics[Metric.STUDIES] == reply.metrics[Metric.NUM_EXAMPLES] == val_studies > 0
    assert reply.metrics[Metric.POSITIVES] + reply.metrics[Metric.NEGATIVES] == val_studies
    assert reply.metrics[Metric.POSITIVES] == sum(data.labels("val"))
    rest, pos, neg = split_histograms(reply.metrics)
    assert set(rest) <= set(EVAL_METRICS) | {Metric.NUM_EXAMPLES}
    # The studies' scores leave only as per-class counts on fixed bins, summing to the split's studies.
    assert pos is not None and neg is not None
    assert sum(pos) == reply.metrics[Metric.POSITIVES] and sum(neg) == reply.metrics[Metric.NEGATIVES]
    assert reply.metrics[Metric.AUROC_LOW] <= reply.metrics[Metric.AUROC] <= reply.metrics[Metric.AUROC_HIGH]
    assert reply.strings == {SiteKey.SITE_ID: "a", SiteKey.TASK: "lung-ct", SiteKey.SPLIT: "val"}
    assert reply.evaluation[Metric.STUDIES] == len(set(data.study_uids("test"))) > 0
    records = EgressLog(site.workspace).records()
    assert [(r.kind, r.round) for r in records] == [("evaluate-val", 2), ("evaluate-test", 2)]
    assert records[0].metrics == {k: float(v) for k, v in reply.metrics.items()}


def test_score_histograms_stay_at_a_site_whose_classes_are_below_its_minimum_count(site: Site) -> None:
    config = _config()
    data = load_site_data([site.workspace], "lung-ct")
    smaller = min(sum(data.labels("val")), len(data.labels("val")) - sum(data.labels("val")))
    assert smaller > 0
    RunBook(site.workspace).set_policy(SitePolicy(min_count=smaller + 1), who="site DPO")
    reply = evaluate(site, config, run_id="run-6", round_number=1, global_flat=_global(config), split="val")
    assert split_histograms(reply.metrics)[1] is None
    assert not any(k.startswith("score-") for k in reply.metrics)
    assert Metric.AUROC in reply.metrics  # the site's own figures still leave
    (record,) = EgressLog(site.workspace).records()
    assert not any(k.startswith("score-") for k in record.metrics)
    RunBook(site.workspace).set_policy(SitePolicy(min_count=smaller), who="site DPO")
    reply = evaluate(site, config, run_id="run-6", round_number=2, global_flat=_global(config), split="val")
    assert sum(split_histograms(reply.metrics)[1] or []) == sum(data.labels("val"))


def test_evaluate_without_data_reports_zero_studies(site: Site) -> None:
    config = from_flat({"task": "prostate-mr", "model-width": 8})
    reply = evaluate(site, config, run_id="run-5", round_number=1, global_flat=_global(config))
    assert reply.metrics == {Metric.STUDIES: 0, Metric.NUM_EXAMPLES: 0}
    assert reply.strings[SiteKey.SPLIT] == "val"
    (record,) = EgressLog(site.workspace).records()
    assert record.kind == "evaluate-val"


def test_the_site_chooses_its_device_and_a_missing_one_fails_with_a_site_config_code(tmp_path: Path) -> None:
    from fl_client.failures import failure_of
    from models.device import DeviceError

    ws = tmp_path / "ws"
    ws.mkdir()
    site = site_from_config({"workspace": str(ws), "site-id": "a", "device": "cpu", "precision": "fp32"}, {})
    assert (site.device, site.precision) == ("cpu", "fp32") and site.placement().describe() == "cpu fp32"
    default = site_from_config({"workspace": str(ws)}, {})
    assert (default.device, default.precision) == ("auto", "auto")
    missing = f"cuda:{torch.cuda.device_count() if torch.cuda.is_available() else 2}"  # past the last GPU
    gone = site_from_config({"workspace": str(ws), "device": missing}, {})
    with pytest.raises(DeviceError) as caught:
        gone.placement()
    failure = failure_of(caught.value)
    assert failure.code == "site-config" and missing in failure.sentence and str(ws) not in failure.sentence


def test_join_checks_the_device_before_starting_and_passes_it_in_the_node_config(tmp_path: Path) -> None:
    from fl_client.join import JoinError, check_placement, node_config_arg

    assert check_placement("cpu", "fp32") == "cpu fp32"
    text = node_config_arg(tmp_path, "a", device="cpu", precision="bf16")
    assert 'device="cpu"' in text and 'precision="bf16"' in text and 'site-id="a"' in text
    missing = f"cuda:{torch.cuda.device_count() if torch.cuda.is_available() else 3}"  # past the last GPU
    with pytest.raises(JoinError, match=rf"--device/--precision: device '{missing}' does not exist on this machine"):
        check_placement(missing, "auto")
