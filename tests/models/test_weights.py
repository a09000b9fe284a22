"""Weights as named arrays (models/weights.py): Opacus' prefix stripped, checks that name the bad array, exact
pack/unpack round trips, and model files written atomically and refused by name when they are not ours."""

from __future__ import annotations

import hashlib
import os
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
import torch
from opacus import GradSampleModule
from torch import nn

from models.evaluation import Calibration, Scoring
from models.weights import (
    OPACUS_PREFIX,
    WeightsError,
    check_arrays,
    load_checkpoint,
    load_scoring,
    pack,
    read_model,
    save_checkpoint,
    state_arrays,
    unpack,
)


class _Small(nn.Module):
    """A linear layer, a GroupNorm and two integer buffers (a step counter and a flag)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(3, 4)
        self.norm = nn.GroupNorm(2, 4)
        self.register_buffer("steps", torch.tensor([0, 1, 12345, 2**24 - 1, 2**24], dtype=torch.int64))
        self.register_buffer("flag", torch.tensor([True, False]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.fc(x))


def _arrays(seed: int = 0) -> OrderedDict[str, np.ndarray]:
    torch.manual_seed(seed)
    return state_arrays(_Small())


def test_state_arrays_strip_opacus_prefix_and_keep_order_and_dtypes() -> None:
    torch.manual_seed(0)
    model = _Small()
    wrapped = GradSampleModule(model)
    assert all(k.startswith(OPACUS_PREFIX) for k in wrapped.state_dict())
    plain, private = state_arrays(model), state_arrays(wrapped)
    # torch's state_dict order: a module's own parameters and buffers, then its children's.
    assert list(plain) == list(model.state_dict()) == ["steps", "flag", "fc.weight", "fc.bias", "norm.weight",
                                                         "norm.bias"]
    assert list(private) == list(plain)
    for key, value in plain.items():
        assert private[key].dtype == value.dtype
        np.testing.assert_array_equal(private[key], value)
    assert plain["steps"].dtype == np.int64 and plain["flag"].dtype == np.bool_


def test_state_arrays_strip_a_repeated_prefix_but_not_an_inner_one() -> None:
    outer = nn.Module()
    outer._module = nn.Module()  # a wrapper wrapped again
    outer._module._module = nn.Linear(2, 1)
    assert list(state_arrays(outer)) == ["weight", "bias"]
    holder = nn.Module()
    holder.block = GradSampleModule(nn.Linear(2, 1))  # the prefix in the middle of a name is a real module name
    assert list(state_arrays(holder)) == ["block._module.weight", "block._module.bias"]


def test_state_arrays_are_copies_not_views_of_the_model() -> None:
    model = _Small()
    arrays = state_arrays(model)
    arrays["fc.bias"][:] = 99.0
    assert not torch.any(model.fc.bias == 99.0)


def test_check_arrays_accepts_an_exact_match() -> None:
    reference = _arrays()
    check_arrays(reference, _arrays(seed=1), finite=True)  # other values, same keys, shapes and dtypes


def test_check_arrays_names_missing_and_unexpected_arrays() -> None:
    reference = _arrays()
    without = {k: v for k, v in reference.items() if k not in ("norm.bias", "flag")}
    with pytest.raises(WeightsError, match=r"array 'flag' is missing \(2 missing in all\)"):
        check_arrays(reference, without)
    extra = {**reference, "extra.a": np.zeros(1, np.float32), "extra.b": np.zeros(1, np.float32)}
    with pytest.raises(WeightsError, match=r"unexpected array 'extra.a' \(2 unexpected in all\)"):
        check_arrays(reference, extra)


def test_check_arrays_names_a_wrong_shape_and_a_wrong_dtype() -> None:
    reference = _arrays()
    with pytest.raises(WeightsError, match=r"array 'fc.weight' has shape \(3, 4\), the model's is \(4, 3\)"):
        check_arrays(reference, {**reference, "fc.weight": reference["fc.weight"].T.copy()})
    with pytest.raises(WeightsError, match="array 'fc.bias' has dtype float64, the model's is float32"):
        check_arrays(reference, {**reference, "fc.bias": reference["fc.bias"].astype(np.float64)})
    with pytest.raises(WeightsError, match="array 'steps' has dtype float32, the model's is int64"):
        check_arrays(reference, {**reference, "steps": reference["steps"].astype(np.float32)})


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_check_arrays_refuses_non_finite_values_only_when_asked(bad: float) -> None:
    reference = _arrays()
    poisoned = dict(reference)
    poisoned["norm.weight"] = reference["norm.weight"].copy()
    poisoned["norm.weight"][1] = bad
    check_arrays(reference, poisoned)  # keys, shapes and dtypes fit
    with pytest.raises(WeightsError, match="array 'norm.weight' holds NaN or Inf"):
        check_arrays(reference, poisoned, finite=True)


def test_pack_unpack_round_trip_exactly_with_integer_and_bool_buffers() -> None:
    reference = _arrays()
    flat = pack(reference)
    assert flat.dtype == np.float32 and flat.ndim == 1
    assert flat.size == sum(a.size for a in reference.values()) == 5 + 2 + 12 + 4 + 4 + 4
    back = unpack(flat, reference)
    assert list(back) == list(reference)
    for key, value in reference.items():
        assert back[key].dtype == value.dtype and back[key].shape == value.shape, key
        np.testing.assert_array_equal(back[key], value, err_msg=key)
    assert back["steps"].tolist() == [0, 1, 12345, 2**24 - 1, 2**24]
    # The packed order is the reference's: the step counter, the flag, then fc.weight row-major.
    assert flat[:7].tolist() == [0, 1, 12345, 2**24 - 1, 2**24, 1, 0]
    np.testing.assert_array_equal(flat[7:19], reference["fc.weight"].ravel())


def test_pack_of_nothing_is_empty_and_unpacks_to_nothing() -> None:
    flat = pack({})
    assert flat.shape == (0,) and flat.dtype == np.float32
    assert unpack(flat, {}) == OrderedDict()


@pytest.mark.parametrize("flat", [np.zeros(30, np.float32), np.zeros(32, np.float32), np.zeros((1, 31), np.float32)])
def test_unpack_refuses_a_wrong_length(flat: np.ndarray) -> None:
    reference = _arrays()
    with pytest.raises(WeightsError, match=f"packed weights have {flat.size} values, the model needs 31"):
        unpack(flat, reference)


def test_a_checkpoint_round_trips_arrays_run_config_and_round(tmp_path: Path) -> None:
    path = tmp_path / "model.pt"
    arrays = _arrays()
    run_config = {"task": "lung-ct", "local-epochs": 2, "dp": True, "dp-epsilon": 4.5}
    save_checkpoint(path, arrays, run_config, round_number=7)
    loaded, config, round_number = load_checkpoint(path)
    assert list(loaded) == list(arrays)
    for key, value in arrays.items():
        assert loaded[key].dtype == value.dtype, key
        np.testing.assert_array_equal(loaded[key], value, err_msg=key)
    assert config == run_config and round_number == 7
    assert [p.name for p in tmp_path.iterdir()] == ["model.pt"]  # no temporary file left


def test_saving_again_replaces_the_file_whole(tmp_path: Path) -> None:
    path = tmp_path / "model.pt"
    big = {f"w{i}": np.full((64, 64), i, np.float32) for i in range(8)}
    save_checkpoint(path, big, {"task": "lung-ct"}, round_number=1)
    big_size = path.stat().st_size
    with open(path, "rb") as old:  # a reader that opened the previous file keeps a whole file
        small = {"w0": np.ones(3, np.float32)}
        save_checkpoint(str(path), small, {"task": "breast-mg"}, round_number=2)
        previous = torch.load(old, map_location="cpu", weights_only=True)
    assert previous["round"] == 1 and len(previous["arrays"]) == 8
    assert path.stat().st_size < big_size / 10
    arrays, config, round_number = load_checkpoint(path)
    assert list(arrays) == ["w0"] and config == {"task": "breast-mg"} and round_number == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.pt"]


def test_a_save_that_fails_leaves_the_previous_file_whole(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "model.pt"
    save_checkpoint(path, {"w": np.arange(4, dtype=np.float32)}, {"task": "lung-ct"}, round_number=3)
    (tmp_path / "model.pt.tmp").write_bytes(b"half a file from a killed process")
    with pytest.raises(TypeError):  # not an array torch can hold: fails before anything is written
        save_checkpoint(path, {"w": np.array(["text"], dtype=object)}, {}, round_number=4)

    def disk_full(fd: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", disk_full)
    with pytest.raises(OSError, match="No space left"):
        save_checkpoint(path, {"w": np.zeros(4, np.float32)}, {}, round_number=5)
    monkeypatch.undo()
    arrays, config, round_number = load_checkpoint(path)
    np.testing.assert_array_equal(arrays["w"], np.arange(4, dtype=np.float32))
    assert config == {"task": "lung-ct"} and round_number == 3
    # A stale temporary file does not stop the next save.
    save_checkpoint(path, {"w": np.ones(2, np.float32)}, {}, round_number=6)
    assert load_checkpoint(path)[2] == 6 and not (tmp_path / "model.pt.tmp").exists()


def test_loading_a_missing_file_says_which(tmp_path: Path) -> None:
    path = tmp_path / "nowhere" / "model.pt"
    with pytest.raises(WeightsError, match=f"model file {path} does not exist"):
        load_checkpoint(path)
    with pytest.raises(WeightsError, match="does not exist"):
        load_checkpoint(tmp_path)  # a folder is not a model file


class _Pickled:
    """An arbitrary object: a file holding it is not ours, and torch's safe loader will not run it."""


@pytest.mark.parametrize("write", [
    lambda p: p.write_bytes(b"\x00\x01 definitely not a torch file"),
    lambda p: p.write_text('{"arrays": {}, "round": 1}'),
    lambda p: torch.save([torch.zeros(3)], p),
    lambda p: torch.save({"weights": {"w": torch.zeros(2)}}, p),
    lambda p: torch.save({"arrays": [torch.zeros(2)]}, p),
    lambda p: torch.save({"arrays": {"w": _Pickled()}}, p),
], ids=["bytes", "json", "list", "other-keys", "arrays-list", "pickled-object"])
def test_a_file_that_is_not_an_oncofed_model_is_refused(tmp_path: Path, write: object) -> None:
    path = tmp_path / "model.pt"
    write(path)  # type: ignore[operator]
    with pytest.raises(WeightsError, match=f"{path} is not an oncofed model file .*: give the model.pt"):
        load_checkpoint(path)


@pytest.mark.parametrize(("change", "needle"), [
    ({"round": True}, "its round is True, not a round number"),
    ({"round": 1.5}, "its round is 1.5, not a round number"),
    ({"round": None}, "its round is None, not a round number"),
    ({"run_config": ["task", "lung-ct"]}, "its run_config is a list, not the run's key/value table"),
    ({"run_config": {1: "lung-ct"}}, "its run_config is a dict, not the run's key/value table"),
    ({"arrays": {"ok": torch.zeros(2), "w": torch.tensor([1.0, float("inf")])}}, "array 'w' holds NaN or infinite"),
    ({"arrays": {"w": torch.tensor([float("nan")], dtype=torch.float16)}}, "array 'w' holds NaN or infinite"),
    ({"preprocessing_version": "6"}, "its preprocessing version is '6', not a number"),
])
def test_a_model_file_with_a_bad_field_is_refused_by_name(tmp_path: Path, change: dict, needle: str) -> None:
    path = tmp_path / "model.pt"
    torch.save({"arrays": {"w": torch.zeros(2)}, "run_config": {"task": "lung-ct"}, "round": 1, **change}, path)
    with pytest.raises(WeightsError, match=needle) as info:
        load_checkpoint(path)
    assert str(path) in str(info.value)


def test_a_model_file_without_round_or_run_config_reads_as_a_local_run(tmp_path: Path) -> None:
    path = tmp_path / "model.pt"
    torch.save({"arrays": {"w": torch.arange(3, dtype=torch.int64)}}, path)
    arrays, config, round_number = load_checkpoint(path)
    assert arrays["w"].dtype == np.int64 and arrays["w"].tolist() == [0, 1, 2]
    assert config == {} and round_number == 0


def test_a_global_model_carries_its_calibration_and_operating_point(tmp_path: Path) -> None:
    path = tmp_path / "model.pt"
    scoring = Scoring(Calibration(5.5, -0.25, 40, 60, "validation histograms, all sites pooled"), 0.53, "Youden")
    save_checkpoint(path, _arrays(), {"task": "colorectal-ct"}, round_number=30, scoring=scoring)
    assert load_scoring(path) == scoring
    assert load_checkpoint(path)[1:] == ({"task": "colorectal-ct"}, 30)  # the rest reads as before
    save_checkpoint(path, _arrays(), {"task": "colorectal-ct"}, round_number=3)  # a round's checkpoint, a local run
    assert load_scoring(path) == Scoring()
    # A file edited to show other scores is refused by name, not half-read.
    doc = torch.load(path, weights_only=True)
    doc["scoring"] = {"calibration": {"slope": 0.0, "intercept": 0.0}, "threshold": 0.5, "rule": "x"}
    torch.save(doc, path)
    with pytest.raises(WeightsError, match=f"{path}: calibration slope is 0.0 and intercept 0.0: the slope must be "
                                           "above 0"):
        load_scoring(path)
    with pytest.raises(WeightsError, match="does not exist"):
        load_scoring(tmp_path / "none.pt")


def test_a_model_file_is_read_once_so_its_digest_is_that_of_the_weights_and_tables_read(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A file replaced while it is read (a new global model written over it) cannot pair one file's digest with
    another's weights or operating point: everything comes from the one read of its bytes."""
    import models.weights as weights

    path, other = tmp_path / "model.pt", tmp_path / "other.pt"
    scoring = Scoring(Calibration(2.0, -0.5, 10, 12, "validation histograms, all sites pooled"), 0.4, "Youden")
    save_checkpoint(path, _arrays(1), {"task": "lung-ct"}, round_number=4, scoring=scoring)
    save_checkpoint(other, _arrays(2), {"task": "lung-ct"}, round_number=5)
    first_digest = hashlib.sha256(path.read_bytes()).hexdigest()
    read = weights._read_bytes

    def read_then_replace(p: Path) -> bytes:
        data = read(p)
        if other.exists():  # the file changes the moment after it was first read
            os.replace(other, p)
        return data

    monkeypatch.setattr(weights, "_read_bytes", read_then_replace)
    held = read_model(path)
    assert held.sha256 == first_digest != hashlib.sha256(path.read_bytes()).hexdigest()
    assert held.round == 4 and held.scoring == scoring and held.tested is None and held.path == path
    assert all(np.array_equal(held.arrays[k], v) for k, v in _arrays(1).items())


def test_a_file_too_large_or_not_a_torch_archive_is_refused_before_it_is_read(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A wrong file given as a model (a DICOM archive of gigabytes) is refused by its first bytes or its size, with
    what to do, not read into memory."""
    import models.weights as weights

    path = tmp_path / "model.pt"
    save_checkpoint(path, _arrays(), {"task": "lung-ct"}, round_number=1)
    monkeypatch.setattr(weights, "MAX_MODEL_BYTES", path.stat().st_size - 1)
    with pytest.raises(WeightsError, match=rf"{path} holds 0\.0 GiB, more than a model file of oncofed .*give the "
                                           "model.pt a run wrote"):
        read_model(path)
    dicom = tmp_path / "study.dcm"
    dicom.write_bytes(b"\x00" * 128 + b"DICM" + b"\x00" * 1000)
    with pytest.raises(WeightsError, match=r"study\.dcm is not an oncofed model file \(ValueError\)"):
        read_model(dicom)


def test_a_breast_model_from_before_the_calcification_step_is_refused_and_others_still_load(tmp_path: Path) -> None:
    """Preprocessing 6 changed mammograms (calcifications enhanced): a breast model trained before would be given
    images unlike its training images, so it is refused, naming the versions and what to do. A lung model of then
    still loads: its images did not change. Every file written now records the version."""
    from models.tasks import PREPROCESSING_VERSION, preprocessing_changed

    old = {"arrays": {"w": torch.zeros(2)}, "round": 3}  # as 0.3.3 wrote them: no preprocessing version
    for task in ("breast-mg", "breast-mg-seg"):
        path = tmp_path / f"{task}.pt"
        torch.save({**old, "run_config": {"task": task}}, path)
        needle = (rf"{path}: this {task} model learned from images prepared by preprocessing version 5.*"
                  r"\(6: mammograms have their calcifications enhanced\).*retrain the model")
        with pytest.raises(WeightsError, match=needle):
            load_checkpoint(path)
    lung = tmp_path / "lung.pt"
    torch.save({**old, "run_config": {"task": "lung-ct"}}, lung)
    assert load_checkpoint(lung)[2] == 3
    fresh = tmp_path / "fresh.pt"
    save_checkpoint(fresh, {"w": np.zeros(2, np.float32)}, {"task": "breast-mg"}, round_number=2)
    assert torch.load(fresh, weights_only=True)["preprocessing_version"] == PREPROCESSING_VERSION
    assert load_checkpoint(fresh)[2] == 2
    assert preprocessing_changed("breast-mg", 5) == ["6: mammograms have their calcifications enhanced"]
    assert preprocessing_changed("breast-mg", PREPROCESSING_VERSION) == preprocessing_changed("prostate-mr", 5) == []
