"""The composed strategy: aggregation matches a NumPy reference, and bad or refused replies never reach it."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict

from fl_server.runstore import RunStore
from fl_server.strategies import ConsortiumStrategy, ServerStep, build_strategy, packed_record
from models.config import from_flat

N = 50
GLOBAL = np.zeros(N, np.float32)


@pytest.fixture(autouse=True)
def _inside_a_run() -> None:
    """Flower's messages carry the run's identity, which a ServerApp process has set."""
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.run_id = 1
    TaskIdentity.task_id = 1
    TaskIdentity.node_id = 1


def reply(site: str, weights: np.ndarray | None, metrics: dict[str, float], **strings: str) -> Message:
    content = RecordDict({"metrics": MetricRecord(metrics), "site": ConfigRecord({"site-id": site, **strings})})
    if weights is not None:
        content["arrays"] = ArrayRecord({"weights": Array(weights)})
    return Message(content=content, dst_node_id=0, message_type=MessageType.TRAIN)


def strategy(tmp_path: Path, name: str, **extra: object) -> ConsortiumStrategy:
    config = from_flat({"task": "breast-mg", "strategy": name, **extra})
    store = RunStore.create(tmp_path / name, run_id="t", run_config={"task": "breast-mg"})
    s = ConsortiumStrategy(build_strategy(config), store=store, reference={"weights": GLOBAL}, run_config={})
    s._sent[1] = {"weights": GLOBAL}
    return s


def updates(k: int) -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [rng.normal(0, 0.1, N).astype(np.float32) for _ in range(k)]


def test_fedavg_is_the_sample_weighted_mean_and_skips_bad_and_refused(tmp_path: Path) -> None:
    s = strategy(tmp_path, "fedavg")
    w = updates(3)
    counts = [10, 30, 60]
    replies = [reply(f"s{i}", w[i], {"num-examples": counts[i], "train-loss": 0.5 + i}) for i in range(3)]
    replies.append(reply("nan-site", np.full(N, np.nan, np.float32), {"num-examples": 1000, "train-loss": 0.1}))
    replies.append(reply("wrong-shape", np.zeros(N + 1, np.float32), {"num-examples": 1000, "train-loss": 0.1}))
    replies.append(reply("huge", np.full(N, 50.0, np.float32), {"num-examples": 1000, "train-loss": 0.1}))
    replies.append(reply("dp-site", None, {"refused": 1, "refused-budget": 1, "num-examples": 0, "epsilon": 8.0,
                                          "epsilon-max": 8.0}))
    replies.append(reply("strict-site", None, {"refused": 1, "num-examples": 0}, refusal="policy-rounds",
                         detail="this site allows at most 2 rounds per run; the run has 3"))
    arrays, metrics = s.aggregate_train(1, replies)
    assert arrays is not None and metrics is not None
    expected = sum(c * x.astype(np.float64) for c, x in zip(counts, w, strict=True)) / sum(counts)
    np.testing.assert_allclose(arrays["weights"].numpy(), expected, rtol=1e-5, atol=1e-7)
    assert metrics["train-loss"] == pytest.approx((0.5 * 10 + 1.5 * 30 + 2.5 * 60) / 100)
    record = json.loads((s.store.root / "history.json").read_text())["rounds"][0]
    dropped = {d["site"]: d["reason"] for d in record["dropped"]}
    assert set(dropped) == {"nan-site", "wrong-shape", "huge"}
    assert "NaN" in dropped["nan-site"] and "shape" in dropped["wrong-shape"] and "norm" in dropped["huge"]
    # A site of an earlier version sends only the flags; ours send a reason code and the site's sentence.
    assert record["refused"] == [{"site": "dp-site", "code": "", "reason": "privacy budget spent", "epsilon": 8.0,
                                  "epsilon_max": 8.0},
                                 {"site": "strict-site", "code": "policy-rounds", "epsilon": None, "epsilon_max": None,
                                  "reason": "this site allows at most 2 rounds per run; the run has 3"}]
    assert record["aggregated_sites"] == 3


def test_fedmedian_and_trimmed_mean_match_numpy(tmp_path: Path) -> None:
    w = updates(5)
    replies = [reply(f"s{i}", w[i], {"num-examples": 10 + i, "train-loss": 1.0}) for i in range(5)]
    arrays, _ = strategy(tmp_path, "fedmedian").aggregate_train(1, replies)
    np.testing.assert_allclose(arrays["weights"].numpy(), np.median(np.stack(w), axis=0), rtol=1e-6)
    replies = [reply(f"s{i}", w[i], {"num-examples": 10 + i, "train-loss": 1.0}) for i in range(5)]  # consumed
    arrays, _ = strategy(tmp_path, "fedtrimmedavg", **{"trim-beta": 0.2}).aggregate_train(1, replies)
    srt = np.sort(np.stack(w), axis=0)
    np.testing.assert_allclose(arrays["weights"].numpy(), srt[1:4].mean(axis=0), rtol=1e-5)


def test_a_round_with_no_valid_update_keeps_the_model(tmp_path: Path) -> None:
    s = strategy(tmp_path, "fedavg")
    arrays, metrics = s.aggregate_train(1, [reply("a", np.full(N, np.inf, np.float32), {"num-examples": 5})])
    assert arrays is None and metrics is None


def test_checkpoint_each_round_and_resume_from_the_last(tmp_path: Path) -> None:
    s = strategy(tmp_path, "fedavg")
    s.end_of_round(1, packed_record(np.ones(N, np.float32)))
    s.end_of_round(2, packed_record(np.full(N, 2.0, np.float32)))
    store, arrays, done = RunStore.resume(s.store.root)
    assert done == 2 and arrays is not None
    np.testing.assert_array_equal(arrays["weights"], np.full(N, 2.0, np.float32))
    assert [r["round"] for r in store.history["rounds"]] == [1, 2]
    assert store.history["resumed_at"][0]["round"] == 2


def test_every_strategy_is_flowers_own(tmp_path: Path) -> None:
    import flwr.serverapp.strategy as fs

    for name, cls in [("fedavg", fs.FedAvg), ("fedprox", fs.FedProx), ("fedadam", fs.FedAdam),
                      ("fedyogi", fs.FedYogi), ("fedmedian", fs.FedMedian), ("fedtrimmedavg", fs.FedTrimmedAvg)]:
        extra = {"proximal-mu": 0.01} if name == "fedprox" else {}
        assert type(build_strategy(from_flat({"strategy": name, **extra}))) is cls


def test_the_server_steps_along_the_mean_update_by_the_runs_server_learning_rate(tmp_path: Path) -> None:
    """An averaging strategy moves the global model by its server step times the mean update: by default 1 (the
    mean itself), or the run's server-learning-rate (3: about as far as an epoch over everyone's data would with
    three sites); FedAdam keeps its own step."""
    from models.config import ADAPTIVE_SERVER_LR, ConfigError, server_step

    base = np.linspace(-1, 1, N).astype(np.float32)
    w = [base + u for u in updates(3)]
    counts = [10, 30, 60]
    mean = sum(c * x.astype(np.float64) for c, x in zip(counts, w, strict=True)) / sum(counts)
    for extra, step in (({}, 1.0), ({"server-learning-rate": 3}, 3.0), ({"server-learning-rate": 1.5}, 1.5),
                        ({"task": "breast-mg"}, 2.0)):  # breast's own default (models.tasks.TASK_SERVER_STEP)
        config = from_flat({"task": "lung-ct", **extra})
        store = RunStore.create(tmp_path / str(step), run_id="t", run_config={"task": "breast-mg"})
        s = ConsortiumStrategy(build_strategy(config), store=store, reference={"weights": base}, run_config={},
                               server_step=server_step(config.federation))
        s._sent[1] = {"weights": base}
        replies = [reply(f"s{i}", w[i], {"num-examples": counts[i], "train-loss": 1.0}) for i in range(3)]
        arrays, _ = s.aggregate_train(1, replies)
        np.testing.assert_allclose(arrays["weights"].numpy(), base + step * (mean - base), rtol=1e-5, atol=1e-6)
        assert arrays["weights"].numpy().dtype == np.float32
        assert json.loads((store.root / "history.json").read_text())["rounds"][0]["server_step"] == step
    # Breast steps 2 under FedAvg and FedProx without DP-SGD; 1 under DP-SGD (unmeasured there), with the robust
    # aggregates, and where the run sets its own.
    for extra, step in (({"dp": "true"}, 1.0), ({"strategy": "fedmedian"}, 1.0), ({"strategy": "fedavg"}, 2.0),
                        ({"server-learning-rate": 1}, 1.0), ({"secure-aggregation": "true", "min-sites": 3}, 2.0),
                        ({"server-momentum": 0.9}, 1.0)):  # not stacked on momentum (measured on the plain mean)
        assert server_step(from_flat({"task": "breast-mg", **extra}).federation) == step, extra
    adam = from_flat({"strategy": "fedadam"})
    assert server_step(adam.federation) == ADAPTIVE_SERVER_LR == build_strategy(adam).eta
    assert build_strategy(from_flat({"strategy": "fedyogi", "server-learning-rate": 0.05})).eta == 0.05
    with pytest.raises(ConfigError, match="server-learning-rate"):
        from_flat({"strategy": "fedadam", "server-learning-rate": 2})
    with pytest.raises(ConfigError, match="server-learning-rate"):
        from_flat({"server-learning-rate": -1})
    # BatchNorm's running statistics travel with the weights: a running variance stepped past the sites' values can
    # turn negative, so only the plain aggregate may carry them.
    assert from_flat({"norm": "batch"}).federation.server_learning_rate == 0
    for extra in ({"server-learning-rate": 3}, {"strategy": "fedadam"}):
        with pytest.raises(ConfigError, match="BatchNorm"):
            from_flat({"norm": "batch", **extra})


def _site_models(glob: np.ndarray, rnd: int) -> list[np.ndarray]:
    """Three sites' models after a round: the global model plus a drift and noise of their own."""
    rng = np.random.default_rng(rnd)
    return [(glob + 0.05 + rng.normal(0, 0.1, N)).astype(np.float32) for _ in range(3)]


def _run_rounds(s: ConsortiumStrategy, glob: np.ndarray, rounds: range) -> np.ndarray:
    for rnd in rounds:
        s._sent[rnd] = {"weights": glob}
        if hasattr(s.inner, "m_t"):  # what FedAdam's configure_train keeps of the model it sends
            s.inner.current_arrays = {"weights": glob}
        replies = [reply(f"s{i}", w, {"num-examples": 10 * (i + 1), "train-loss": 1.0})
                   for i, w in enumerate(_site_models(glob, rnd))]
        arrays, _ = s.aggregate_train(rnd - s.offset, replies)
        glob = arrays["weights"].numpy()
        assert glob.dtype == np.float32  # FedAdam's own result is float64: sent on, every site's update was refused
        s.end_of_round(rnd - s.offset, packed_record(glob))
    return glob


def _composed(tmp_path: Path, name: str, flat: dict[str, object], *, offset: int = 0) -> ConsortiumStrategy:
    from models.config import AVERAGING, server_step

    config = from_flat({"task": "breast-mg", **flat})
    store = (RunStore.resume(tmp_path / name)[0] if offset else
             RunStore.create(tmp_path / name, run_id="t", run_config={"task": "breast-mg"}))
    f = config.federation
    return ConsortiumStrategy(build_strategy(config), store=store, reference={"weights": GLOBAL}, run_config={},
                              round_offset=offset, server_momentum=f.server_momentum,
                              server_step=server_step(f) if f.strategy in AVERAGING else None)


def test_server_momentum_is_flowers_fedavgm_and_a_resumed_run_steps_as_an_uninterrupted_one(tmp_path: Path) -> None:
    """With server-momentum the averaging strategies step as Flower's own FedAvgM does; the velocity (and FedAdam's
    moments) are checkpointed with each round, so a run stopped after round 2 and resumed ends where an
    uninterrupted run ends. Without the saved state the resumed run would differ."""
    import flwr.serverapp.strategy as fs

    start = np.linspace(-1, 1, N).astype(np.float32)
    flat = {"strategy": "fedavg", "server-momentum": 0.9, "server-learning-rate": 1.5}
    ours = _composed(tmp_path, "whole", flat)
    flower = fs.FedAvgM(server_momentum=0.9, server_learning_rate=1.5)
    flower.current_arrays = ArrayRecord({"weights": Array(start)})
    glob = start
    for rnd in range(1, 5):
        ours._sent[rnd] = {"weights": glob}
        models = _site_models(glob, rnd)
        mine, _ = ours.aggregate_train(rnd, [reply(f"s{i}", w, {"num-examples": 10 * (i + 1), "train-loss": 1.0})
                                             for i, w in enumerate(models)])
        theirs, _ = flower.aggregate_train(rnd, [reply(f"s{i}", w, {"num-examples": 10 * (i + 1)})
                                                 for i, w in enumerate(models)])
        np.testing.assert_allclose(mine["weights"].numpy(), theirs["weights"].numpy(), rtol=1e-5, atol=1e-6)
        glob = mine["weights"].numpy()
    assert json.loads((ours.store.root / "history.json").read_text())["rounds"][0]["server_momentum"] == 0.9

    for name, extra in (("momentum", flat), ("adam", {"strategy": "fedadam"})):
        whole = _run_rounds(_composed(tmp_path, f"{name}-whole", extra), start, range(1, 5))
        first = _composed(tmp_path, f"{name}-cut", extra)
        _run_rounds(first, start, range(1, 3))
        assert (first.store.root / "checkpoints" / "round-002.state.npz").exists()
        _, arrays, done = RunStore.resume(first.store.root)
        resumed = _composed(tmp_path, f"{name}-cut", extra, offset=done)
        state = resumed.store.server_state(done)
        assert state, name
        resumed.restore_server_state(state)
        np.testing.assert_allclose(_run_rounds(resumed, arrays["weights"], range(3, 5)), whole, rtol=1e-6, atol=1e-7)
        forgetful = _composed(tmp_path, f"{name}-cut", extra, offset=done)  # the same resume, state not restored
        assert not np.allclose(_run_rounds(forgetful, arrays["weights"], range(3, 5)), whole, atol=1e-4), name

    plain = _composed(tmp_path, "plain", {"strategy": "fedavg"})
    _run_rounds(plain, start, range(1, 3))
    assert not list((plain.store.root / "checkpoints").glob("*.state.npz"))  # a stateless step saves no state

    # A round with no valid update leaves the velocity as it was (as Flower's FedAvgM does).
    cut = _composed(tmp_path, "momentum-whole", flat, offset=4)
    cut.restore_server_state(cut.store.server_state(4))
    velocity = cut.stepper.state()
    cut._sent[5] = {"weights": start}
    assert cut.aggregate_train(1, [reply("a", np.full(N, np.inf, np.float32), {"num-examples": 5})]) == (None, None)
    assert {k: v.tolist() for k, v in cut.stepper.state().items()} == {k: v.tolist() for k, v in velocity.items()}
    from models.config import ConfigError

    for bad, match in (({"server-momentum": 1.0}, "server-momentum"), ({"server-momentum": -0.1}, "server-momentum"),
                       ({"strategy": "fedadam", "server-momentum": 0.9}, "own moments"),
                       ({"norm": "batch", "server-momentum": 0.9}, "BatchNorm")):
        with pytest.raises(ConfigError, match=match):
            from_flat(bad)


def test_a_resume_forgets_what_an_interrupted_round_left_and_keeps_its_aggregation(tmp_path: Path) -> None:
    """A kill after round 3's server state was written but before its weights: the resume goes back to round 2 and
    removes the orphan, so that a round 3 with no state to save cannot be paired with it later. A resume under
    another strategy, step or momentum is refused by name."""
    from fl_server.app import check_resumed_federation

    s = _composed(tmp_path, "orphan", {"strategy": "fedavg", "server-momentum": 0.9})
    _run_rounds(s, np.zeros(N, np.float32), range(1, 3))
    checkpoints = s.store.root / "checkpoints"
    (checkpoints / "round-003.state.npz").write_bytes((checkpoints / "round-002.state.npz").read_bytes())
    (checkpoints / "round-003.pt.tmp").write_bytes(b"half")
    store, _, done = RunStore.resume(s.store.root)
    assert done == 2 and sorted(p.name for p in checkpoints.iterdir()) == [
        "round-001.pt", "round-001.state.npz", "round-002.pt", "round-002.state.npz"]
    store.checkpoint(3, {"weights": GLOBAL}, {})  # nothing to save: an old file of that round is removed too
    (checkpoints / "round-003.state.npz").write_bytes(b"stale")
    store.checkpoint(3, {"weights": GLOBAL}, {})
    assert store.server_state(3) is None

    stored = {"task": "lung-ct", "strategy": "fedavg", "server-momentum": 0.9, "num-rounds": 4}
    check_resumed_federation(stored, from_flat(stored), "run")  # the same aggregation resumes
    # A breast run of a version that stored no resolved step ran at the mean itself (1); today's default (2) would
    # change it, so the lead resumes it with server-learning-rate=1. From 0.3.5 the run stores the step it resolved.
    breast = {"task": "breast-mg", "strategy": "fedprox", "server-learning-rate": 0, "num-rounds": 4}
    with pytest.raises(ValueError, match="it ran with server-learning-rate=1.0"):
        check_resumed_federation(breast, from_flat({"task": "breast-mg", "num-rounds": 4}), "run")
    check_resumed_federation(breast, from_flat({"task": "breast-mg", "num-rounds": 4, "server-learning-rate": 1}),
                             "run")
    now = {**breast, "server-learning-rate": 2.0}  # what the server stores from 0.3.5
    check_resumed_federation(now, from_flat({"task": "breast-mg", "num-rounds": 4}), "run")
    for change, key in (({"server-momentum": 0.0}, "server-momentum"), ({"strategy": "fedprox"}, "strategy"),
                        ({"server-learning-rate": 2}, "server-learning-rate"),
                        ({"learning-rate": 0.01}, "learning-rate")):
        with pytest.raises(ValueError, match=f"it ran with {key}="):
            check_resumed_federation(stored, from_flat({**stored, **change}), "run")
    # A segmentation run of a version without server momentum ran without it: today's default (0.9) would change it.
    older = {"task": "lung-ct-seg", "strategy": "fedprox", "learning-rate": 0.003, "num-rounds": 4}
    with pytest.raises(ValueError, match="it ran with server-momentum=0.0"):
        check_resumed_federation(older, from_flat({"task": "lung-ct-seg"}), "run")
    check_resumed_federation(older, from_flat({"task": "lung-ct-seg", "server-momentum": 0}), "run")
    with pytest.raises(ValueError, match="momentum"):
        ServerStep(1.0, -1.0)


def test_every_named_recipe_is_a_valid_run_config_with_the_momentum_it_names() -> None:
    from fl_server.strategies import RECIPES

    assert RECIPES["default"] == {}  # the task's own defaults: FedProx with momentum here
    seg = from_flat({"task": "lung-ct-seg", **RECIPES["default"]}).federation
    assert (seg.strategy.value, seg.server_momentum) == ("fedprox", 0.9)
    crc = from_flat({"task": "colorectal-ct", **RECIPES["default"]})  # BatchNorm, FedProx
    assert (crc.model.norm.value, crc.federation.strategy.value) == ("batch", "fedprox")
    instance = from_flat({"task": "colorectal-ct", **RECIPES["norm-instance"]})
    assert (instance.model.norm.value, instance.federation.strategy.value) == ("instance", "fedprox")
    bare = from_flat({"task": "colorectal-ct", **RECIPES["norm-none"]})  # no norm layer, so FedAvg
    assert (bare.model.norm.value, bare.training.proximal_mu, bare.federation.strategy.value) == (
        "none", 0.0, "fedavg")
    for name, values in RECIPES.items():
        if name in ("default", "norm-instance", "norm-none"):
            continue
        config = from_flat({"task": "lung-ct-seg", **values})
        assert config.federation.strategy.value == values["strategy"], name
        # Plain recipes stay plain on a segmentation task, whose default would add momentum.
        assert config.federation.server_momentum == values.get("server-momentum", 0.0), name


def test_a_run_resumes_only_with_its_own_norm() -> None:
    """A colorectal run started with InstanceNorm and FedProx μ 0.01 (the default before 0.3.2), resumed under
    ``norm=auto`` (now BatchNorm) or ``norm=none``: refused naming the norm (its checkpoints hold the InstanceNorm
    network), and the hint works: with that norm the defaults resolve to the run's FedProx again."""
    from fl_server.app import check_resumed_federation

    stored = {"task": "colorectal-ct", "norm": "instance", "proximal-mu": 0.01, "strategy": "fedprox",
              "num-rounds": 30, "learning-rate": 0.001}
    with pytest.raises(ValueError, match=r"norm=instance, this run config says batch; resume with --set norm=instance"):
        check_resumed_federation(stored, from_flat({"task": "colorectal-ct"}), "run")
    with pytest.raises(ValueError, match=r"norm=instance, this run config says none; resume with --set norm=instance"):
        check_resumed_federation(stored, from_flat({"task": "colorectal-ct", "norm": "none"}), "run")
    check_resumed_federation(stored, from_flat({"task": "colorectal-ct", "norm": "instance"}), "run")
    # A run stored without its norm ran InstanceNorm, the default then: resumed under today's default, refused.
    unnamed = {k: v for k, v in stored.items() if k != "norm"}
    with pytest.raises(ValueError, match=r"norm=instance, this run config says batch"):
        check_resumed_federation(unnamed, from_flat({"task": "colorectal-ct"}), "run")


def test_a_site_under_dp_sgd_while_the_server_uses_momentum_is_warned_of_once(tmp_path: Path) -> None:
    """A site's own policy may turn DP-SGD on under a run whose momentum was chosen for plain training (a
    segmentation default): the server warns once per site, in the log, the history and the report, and goes on."""
    from fl_server.report import write_report

    def rounds(s: ConsortiumStrategy) -> list[dict[str, object]]:
        glob = np.zeros(N, np.float32)
        for rnd in (1, 2):
            s._sent[rnd] = {"weights": glob}
            replies = [reply(f"s{i}", w, {"num-examples": 10, "train-loss": 1.0, "dp": int(i == 1)})
                       for i, w in enumerate(_site_models(glob, rnd))]
            arrays, _ = s.aggregate_train(rnd, replies)
            glob = arrays["weights"].numpy()
        return json.loads((s.store.root / "history.json").read_text())["rounds"]

    flat = {"strategy": "fedavg", "server-momentum": 0.9}
    warned = rounds(_composed(tmp_path, "momentum", flat))
    assert [[w["site"] for w in r.get("warnings", [])] for r in warned] == [["s1"], []]
    # Resumed, the run does not warn of the same site again (the history remembers it).
    RunStore.resume(tmp_path / "momentum")[0].checkpoint(2, {"weights": GLOBAL}, {})
    resumed = _composed(tmp_path, "momentum", flat, offset=2)
    resumed._sent[3] = {"weights": GLOBAL}
    resumed.aggregate_train(1, [reply("s1", w, {"num-examples": 10, "train-loss": 1.0, "dp": 1})
                                for w in _site_models(GLOBAL, 3)[:1]])
    history = json.loads((tmp_path / "momentum" / "history.json").read_text())["rounds"]
    assert [w["site"] for r in history for w in r.get("warnings", [])] == ["s1"]
    assert "server-momentum=0" in warned[0]["warnings"][0]["reason"]
    page = write_report(tmp_path / "momentum").read_text()
    assert "warning" in page and "momentum 0.9" in page
    plain = {"strategy": "fedavg", "server-learning-rate": 1}
    assert all("warnings" not in r for r in rounds(_composed(tmp_path, "plain", plain)))
    # Breast's longer default step (2, chosen for runs without DP-SGD) multiplies a DP site's noise: warned too.
    stepped = rounds(_composed(tmp_path, "stepped", {"strategy": "fedavg"}))
    assert [[w["site"] for w in r.get("warnings", [])] for r in stepped] == [["s1"], []]
    assert "steps 2 times along the mean update" in stepped[0]["warnings"][0]["reason"]
    assert "0.76 against 0.81-0.83" in stepped[0]["warnings"][0]["reason"]  # what it cost, measured
    assert "--set dp=true" in stepped[0]["warnings"][0]["reason"]


@pytest.mark.parametrize("name", ["fedavg", "fedadam"])
def test_a_fine_tuning_run_keeps_the_frozen_weights_and_drops_a_site_that_changed_them(tmp_path: Path,
                                                                                      name: str) -> None:
    """fine-tune: the arrays the run does not train come back as they were sent, and so does the global model;
    FedAdam turned the rounding of a mean of equal values into a full step on every frozen weight before."""
    reference = {"conv": np.zeros(30, np.float32), "head": np.zeros(20, np.float32)}
    sent = (np.arange(N, dtype=np.float32) * 0.1 + 0.3).astype(np.float32)
    store = RunStore.create(tmp_path / name, run_id="t", run_config={"task": "breast-mg"})
    s = ConsortiumStrategy(build_strategy(from_flat({"task": "breast-mg", "strategy": name})), store=store,
                           reference=reference, run_config={}, kept=["conv"])
    s._sent[1] = {"weights": sent}
    if hasattr(s.inner, "m_t"):  # what FedAdam's configure_train keeps of the model it sends
        s.inner.current_arrays = {"weights": sent}
    w = updates(3)
    trained = [np.concatenate([sent[:30], sent[30:] + x[30:]]) for x in w]
    rogue = sent + w[0]  # trained the frozen convolutions too
    replies = [reply(f"s{i}", trained[i], {"num-examples": 10 * (i + 1), "train-loss": 0.5}) for i in range(3)]
    replies.append(reply("rogue", rogue, {"num-examples": 10, "train-loss": 0.5}))
    arrays, _ = s.aggregate_train(1, replies)
    assert arrays is not None
    new = arrays["weights"].numpy()
    assert np.array_equal(new[:30], sent[:30]) and not np.allclose(new[30:], sent[30:])
    record = json.loads((s.store.root / "history.json").read_text())["rounds"][0]
    assert [(d["site"], d["reason"]) for d in record["dropped"]] == [
        ("rogue", "changed weights this run does not train (fine-tune)")]
    assert record["aggregated_sites"] == 3


def test_a_run_resumes_only_with_its_own_fine_tuning_scope() -> None:
    """A run that fine-tuned norms and head from a start resumes so (its checkpoints froze the start's
    convolutions); switching the scope on a resume would freeze the checkpoint's instead, so it is refused."""
    from fl_server.app import check_resumed_federation

    stored = {"task": "breast-mg", "fine-tune": "norm-head", "initial-model": "/m.pt", "num-rounds": 5,
              "learning-rate": 0.001, "server-learning-rate": 2.0}
    with pytest.raises(ValueError, match=r"fine-tune=norm-head, this run config says all"):
        check_resumed_federation(stored, from_flat({"task": "breast-mg"}), "run")
    check_resumed_federation(stored, from_flat({"task": "breast-mg", "fine-tune": "norm-head",
                                                "initial-model": "/m.pt"}), "run")
