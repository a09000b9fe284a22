"""A run's initial model (``initial-model``): checked against the run's own network before anything starts, named in
the report by its digest, and refused with a line that says what to do."""

from __future__ import annotations

import hashlib
import html
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from consortium import run_side_by_side

from fl_server.cli import _check_initial
from fl_server.initial import load_initial, reload_initial
from fl_server.report import write_report
from fl_server.runstore import RunStore
from models.config import from_flat
from models.evaluation import HeldOutFigures
from models.nets import build_model
from models.weights import WeightsError, save_checkpoint, state_arrays


def model_file(path: Path, flat: dict[str, object], *, seed: int = 3) -> Path:
    torch.manual_seed(seed)
    config = from_flat(flat)
    save_checkpoint(path, state_arrays(build_model(config.model)), {**config.to_flat(), **flat}, round_number=7)
    return path


def test_a_fitting_model_is_the_start_in_the_networks_order_with_its_digest(tmp_path: Path) -> None:
    path = model_file(tmp_path / "public.pt", {"task": "breast-mg"})
    config = from_flat({"task": "breast-mg", "dp": "true"})
    torch.manual_seed(0)
    reference = state_arrays(build_model(config.model))
    start = load_initial(path, config, reference)
    assert list(start.arrays) == list(reference)
    torch.manual_seed(3)
    trained = state_arrays(build_model(config.model))
    assert all(np.array_equal(start.arrays[k], trained[k]) for k in trained)  # the file's weights, not fresh ones
    assert any(not np.array_equal(start.arrays[k], reference[k]) for k in reference)
    assert start.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    assert start.record() == {"file": str(path.resolve()), "sha256": start.sha256, "task": "breast-mg",
                              "norm": "instance", "dp": False, "round": 7, "tested": None}
    assert start.caution(dp=True) is None  # a federated run's model carries no test figures: nothing to say


def test_a_model_of_another_task_or_network_is_refused_with_what_to_do(tmp_path: Path) -> None:
    config = from_flat({"task": "colorectal-ct", "dp": "true"})  # DP-SGD: InstanceNorm, not the task's BatchNorm
    reference = state_arrays(build_model(config.model))
    lung = model_file(tmp_path / "lung.pt", {"task": "lung-ct"})
    with pytest.raises(WeightsError, match=r"lung\.pt was trained for 'lung-ct', this run trains 'colorectal-ct'"):
        load_initial(lung, config, reference)
    batch = model_file(tmp_path / "batch.pt", {"task": "colorectal-ct"})  # trained without DP: BatchNorm
    with pytest.raises(WeightsError, match=r"batch\.pt is not this run's network .*norm batch and this run trains "
                                           r"norm instance \(a DP-SGD .*train-local --norm instance"):
        load_initial(batch, config, reference)
    # The other way round: a start with InstanceNorm for a colorectal run without DP-SGD (BatchNorm) can also be
    # met by the run, and the message says so.
    plain = from_flat({"task": "colorectal-ct"})
    instance = model_file(tmp_path / "instance.pt", {"task": "colorectal-ct", "norm": "instance"})
    with pytest.raises(WeightsError, match=r"norm instance and this run trains norm batch: .*--norm batch.*give this "
                                           r"run '--set norm=instance'") as caught:
        load_initial(instance, plain, state_arrays(build_model(plain.model)))
    assert "DP-SGD" not in str(caught.value)
    wide = model_file(tmp_path / "wide.pt", {"task": "colorectal-ct", "norm": "instance", "model-width": "32"})
    with pytest.raises(WeightsError, match=r"wide\.pt is not this run's network \(array .* has shape"):
        load_initial(wide, config, reference)
    (tmp_path / "junk.pt").write_bytes(b"not a model")
    with pytest.raises(WeightsError, match=r"junk\.pt is not an oncofed model file"):
        load_initial(tmp_path / "junk.pt", config, reference)
    with pytest.raises(WeightsError, match=r"missing\.pt does not exist"):
        load_initial(tmp_path / "missing.pt", config, reference)


def test_a_run_resumed_before_its_first_checkpoint_reads_the_same_start_again(tmp_path: Path) -> None:
    path = model_file(tmp_path / "public.pt", {"task": "breast-mg"})
    config = from_flat({"task": "breast-mg"})
    reference = state_arrays(build_model(config.model))
    start = load_initial(path, config, reference)
    # The record is in the history from its first write: a run killed right after it began still knows its start.
    store = RunStore.create(tmp_path / "run", run_id="r1", run_config={"task": "breast-mg"},
                            initial_model=start.record())
    stored, arrays, offset = RunStore.resume(store.root)
    assert arrays is None and offset == 0 and stored.history["initial_model"] == start.record()
    again = reload_initial(stored.history["initial_model"], config, reference)
    assert all(np.array_equal(again.arrays[k], start.arrays[k]) for k in reference)
    model_file(path, {"task": "breast-mg"}, seed=4)  # the lead overwrote the file since
    with pytest.raises(WeightsError, match=r"public\.pt changed since the run began .*put the file back"):
        reload_initial(stored.history["initial_model"], config, reference)


def test_the_report_names_the_start_by_its_digest(tmp_path: Path) -> None:
    store = RunStore.create(tmp_path / "run", run_id="r1", run_config={"task": "breast-mg"})
    write_report(store.root)
    assert "fresh weights (seed)" in (store.root / "report.html").read_text()
    store.history["initial_model"] = {"file": "/lead/public/breast-model.pt", "sha256": "ab" * 32,
                                      "task": "breast-mg", "norm": "instance", "dp": False, "round": 20}
    store.save()
    write_report(store.root)
    page = html.unescape((store.root / "report.html").read_text())
    assert "breast-model.pt, sha256 abababababababab…, a federated run's (round 20) breast-mg model" in page
    assert "/lead/public" not in page  # the lead's folders are not the report's business


def model_with_figures(path: Path, tested: HeldOutFigures) -> Path:
    """A local run's model.pt with its test figures (as ``train-local`` writes it)."""
    config = from_flat({"task": "prostate-mr"})
    torch.manual_seed(3)
    save_checkpoint(path, state_arrays(build_model(config.model)), config.to_flat(), round_number=0, tested=tested)
    return path


def test_a_start_that_has_not_shown_it_learned_is_named_to_the_lead(tmp_path: Path,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    config = from_flat({"task": "prostate-mr", "dp": "true"})
    reference = state_arrays(build_model(config.model))
    sound = load_initial(model_with_figures(tmp_path / "sound.pt", HeldOutFigures("test", 48, 24, 0.83, 0.712, 0.948)),
                         config, reference)
    assert sound.caution(dp=True) is None and sound.caution(dp=False) is None
    # A zero-width interval a rounding away from its AUROC (DeLong's own AUROC) is written and read, not refused.
    exact = HeldOutFigures("test", 40, 20, 0.8, 0.8 + 1e-12, 0.8 + 1e-12)
    assert load_initial(model_with_figures(tmp_path / "exact.pt", exact), config, reference).caution(dp=True) is None
    assert sound.record()["tested"] == {"split": "test", "studies": 48, "positives": 24, "auroc": 0.83,
                                        "auroc_low": 0.712, "auroc_high": 0.948}
    weak = load_initial(model_with_figures(tmp_path / "weak.pt", HeldOutFigures("test", 24, 12, 0.58, 0.34, 0.82)),
                        config, reference)
    assert weak.caution(dp=False) == (
        "initial model weak.pt: AUROC 0.580 (0.340–0.820) on the 24 test studies (12 positive) of the run that "
        "trained it, an interval that reaches chance, so it may not have learned its task. Train it longer or on more "
        "studies, or go on if you know it is sound")
    assert "; under DP-SGD a run ends near its start (a prostate start at 0.56 ended at 0.62" in weak.caution(dp=True)
    # The command line says it before Flower starts; the run goes on (the lead may know better).
    _check_initial(from_flat({"task": "prostate-mr", "dp": "true", "initial-model": str(weak.path)}))
    assert "may not have learned its task; under DP-SGD" in " ".join(capsys.readouterr().err.split())
    # The report and the model card say how the start scored, by its digest and without the lead's folders.
    store = RunStore.create(tmp_path / "run", run_id="r1", run_config={"task": "prostate-mr"},
                            initial_model=sound.record())
    write_report(store.root)
    page = html.unescape((store.root / "report.html").read_text())
    assert ("a local run's prostate-mr model; AUROC 0.830 (0.712–0.948) on the 48 test studies (24 positive) of the "
            "run that trained it") in page


@pytest.mark.parametrize(("figures", "said"), [
    (HeldOutFigures("test", 40, 20, 0.30, 0.12, 0.48), "(0.120–0.480) on the 40 test studies (20 positive) of the run "
                                                       "that trained it, below chance"),
    (HeldOutFigures("test", 6, 1, 1.0, 1.0, 1.0), "too few of a class (below 10) to show it learned its task"),
    (HeldOutFigures("test", 12, 0, None), "no AUROC on the 12 test studies (0 positive) of the run that trained it "
                                          "(they hold one class)"),
])
def test_a_start_whose_test_figures_show_nothing_is_named(tmp_path: Path, figures: HeldOutFigures, said: str) -> None:
    # One positive study gives DeLong a zero-width interval at 1.0, which shows nothing; one class gives no AUROC.
    config = from_flat({"task": "prostate-mr"})
    start = load_initial(model_with_figures(tmp_path / "start.pt", figures), config,
                         state_arrays(build_model(config.model)))
    caution = start.caution(dp=False)
    assert caution is not None and said in caution


@pytest.mark.parametrize(("key", "value", "said"), [
    ("auroc_low", 1.5, "tested auroc_low is 1.5: a figure between 0 and 1"),
    ("auroc", float("nan"), "tested auroc is nan: a figure between 0 and 1"),
    ("auroc_high", float("inf"), "tested auroc_high is inf"),
    ("auroc", True, "tested auroc is True"),
    ("studies", -3, "tested studies is -3: a count is needed"),
    ("positives", 99, "tested positives (99) exceed its studies (24)"),
    ("auroc_low", 0.7, "tested auroc_low, auroc and auroc_high are 0.7, 0.58 and 0.82: an interval around its AUROC"),
    ("split", "somewhere", "tested split is 'somewhere'"),
])
def test_a_start_with_edited_test_figures_is_refused_by_name(tmp_path: Path, key: str, value: object,
                                                             said: str) -> None:
    config = from_flat({"task": "prostate-mr"})
    path = model_with_figures(tmp_path / "start.pt", HeldOutFigures("test", 24, 12, 0.58, 0.34, 0.82))
    doc = torch.load(path, weights_only=True)
    doc["tested"][key] = value
    torch.save(doc, tmp_path / "edited.pt")
    with pytest.raises(WeightsError) as caught:
        load_initial(tmp_path / "edited.pt", config, state_arrays(build_model(config.model)))
    assert str(caught.value).startswith(f"{tmp_path / 'edited.pt'}: ") and said in str(caught.value)


def test_the_command_line_refuses_a_wrong_start_before_flower_starts(tmp_path: Path) -> None:
    sites = tmp_path / "sites"
    sites.mkdir()
    lung = model_file(tmp_path / "lung.pt", {"task": "lung-ct"})
    other_task = "lung.pt was trained for 'lung-ct', this run trains 'breast-mg'"
    cases = ((["--initial-model", str(tmp_path / "none.pt")], "none.pt does not exist"),
             (["--initial-model", str(lung)], other_task),
             (["--initial-model", str(lung), "--resume"], "--initial-model starts a new run"),
             (["--set", f"initial-model={lung}", "--resume"], "--initial-model starts a new run"))
    done = run_side_by_side([[sys.executable, "-m", "fl_server.cli", "simulate", "--sites", str(sites), "--run-dir",
                              str(tmp_path / "run"), "--set", "task=breast-mg", *extra] for extra, _ in cases])
    for r, (_, said) in zip(done, cases, strict=True):
        assert r.returncode == 2 and said in r.stderr and "Traceback" not in r.stderr, r.stderr
