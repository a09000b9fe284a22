"""Two resolution profiles per task: ``cpu`` (tests, the demo) and ``diagnostic`` (voxel sizes a radiologist would
accept, for GPU sites). The diagnostic profile builds, preprocesses a real synthetic study at its resolution, trains
a step and round-trips its weights; server and sites agree on the profile, and a mismatch is said in words."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from consortium import make_workspaces

from fl_client.federated import Site, fit
from fl_client.train import train_local
from imaging.dataset import preprocessing_key
from imaging.presets import PRESETS, get_preset
from imaging.sitedata import load_site_data
from models.config import Arch, from_flat
from models.nets import build_model
from models.weights import pack, state_arrays, unpack


def test_every_task_has_a_finer_diagnostic_profile_with_its_own_cache() -> None:
    for name, preset in PRESETS.items():
        fine = get_preset(name, "diagnostic")
        assert len(fine.target_spacing) == len(preset.target_spacing) == preset.spatial_dims, name
        assert all(f < c for f, c in zip(fine.target_spacing, preset.target_spacing, strict=True)), name
        assert preprocessing_key(fine) != preprocessing_key(preset), name
        assert get_preset(name) == get_preset(name, "cpu") == preset
    assert get_preset("lung-ct", "diagnostic").target_spacing[:2] == (1.5, 1.5)  # CT near 1-1.5 mm in-plane
    assert get_preset("prostate-mr", "diagnostic").target_spacing == (0.5, 0.5, 3.0)
    assert get_preset("breast-mg", "diagnostic").target_spacing == (0.2, 0.2)
    with pytest.raises(ValueError, match="unknown resolution profile 'ultra'"):
        get_preset("lung-ct", "ultra")


def test_the_default_network_follows_the_profile() -> None:
    assert from_flat({}).model.network == Arch.COMPACT_CNN
    assert from_flat({"resolution": "diagnostic"}).model.network == Arch.DENSENET_SMALL
    assert from_flat({"resolution": "diagnostic", "model": "compact-cnn"}).model.network == Arch.COMPACT_CNN


@pytest.fixture(scope="module")
def prostate(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("diagnostic")
    return make_workspaces(root, sites=1, studies_per_task=4, seed=11, tasks=["prostate-mr"]) / "site-a"


def test_the_diagnostic_profile_preprocesses_trains_a_step_and_round_trips(prostate: Path) -> None:
    config = from_flat({"task": "prostate-mr", "resolution": "diagnostic", "batch-size": 64, "augment": False})
    data = load_site_data([prostate], "prostate-mr", resolution="diagnostic")
    train = data.dataset("train", train=False)
    image, label = train[0]
    assert tuple(image.shape) == (1, 256, 256, 24) and image.dtype == torch.float32 and float(label) in (0.0, 1.0)
    torch.manual_seed(0)
    model = build_model(config.model)
    result = train_local(model, train, spec=config.training, labels=data.labels("train"))
    assert result.steps == 1 and np.isfinite(result.loss)
    wire = pack(state_arrays(model))
    fresh = build_model(config.model)
    back = unpack(wire, state_arrays(fresh))
    np.testing.assert_array_equal(pack(back), wire)


def test_a_global_model_of_another_profile_or_network_is_said_in_words(prostate: Path) -> None:
    config = from_flat({"task": "prostate-mr", "resolution": "diagnostic"})
    other = pack(state_arrays(build_model(from_flat({"task": "prostate-mr"}).model)))  # the cpu profile's network
    with pytest.raises(ValueError, match="this site builds densenet-small for prostate-mr at the diagnostic "
                                         "resolution profile with .*: the lead and this site disagree on the model"):
        fit(Site("a", prostate), config, run_id="r", round_number=1, global_flat=other)
