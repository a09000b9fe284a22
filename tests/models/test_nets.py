"""Networks and weights: identical keys with and without DP, exact round trips, named errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from opacus import PrivacyEngine
from torch.utils.data import DataLoader, TensorDataset

from models.config import Arch, FineTune, ModelSpec, Norm
from models.nets import build_model, parameter_count, set_trainable
from models.weights import WeightsError, check_arrays, load_arrays, pack, state_arrays, unpack


# DenseNet121 is built in 2D only here: in 3D it is 11 M parameters, the same code path, and slow.
@pytest.mark.parametrize(("arch", "dims"), [(Arch.COMPACT_CNN, 2), (Arch.COMPACT_CNN, 3), (Arch.DENSENET_SMALL, 2),
                                            (Arch.DENSENET_SMALL, 3), (Arch.DENSENET121, 2)])
def test_every_network_maps_images_to_one_logit(arch: Arch, dims: int) -> None:
    model = build_model(ModelSpec(task="breast-mg" if dims == 2 else "lung-ct", arch=arch, spatial_dims=dims))
    size = (64 if arch == Arch.DENSENET121 else 32,) * dims  # InstanceNorm needs >1 voxel at the last stage
    assert model(torch.randn(2, 1, *size)).shape == (2, 1)
    assert not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules())
    assert not any(getattr(m, "inplace", False) for m in model.modules())
    assert parameter_count(model) > 0


def test_the_compact_cnn_without_norm_scales_its_logit_and_starts_at_even_odds() -> None:
    """Without a norm layer the compact CNN's logit is its head's output times ``NO_NORM_LOGIT_SCALE`` (its
    features start small: unscaled, the trained colorectal network scored every study at 0.50-0.51), with a head
    bias of 0 so the scores start at 0.5; with a norm layer nothing changes."""
    from models.nets import NO_NORM_LOGIT_SCALE

    torch.manual_seed(0)
    x = torch.rand(4, 1, 32, 32, 16) * 0.7
    plain = build_model(ModelSpec(task="colorectal-ct", norm=Norm.NONE))
    normed = build_model(ModelSpec(task="colorectal-ct", norm=Norm.INSTANCE))
    assert NO_NORM_LOGIT_SCALE > 1 and plain.logit_scale == NO_NORM_LOGIT_SCALE and normed.logit_scale == 1.0
    assert not plain.head.bias.any()
    plain.eval()
    with torch.no_grad():
        head = plain.head(plain.pool(plain.features(x)))
        torch.testing.assert_close(plain(x), head * NO_NORM_LOGIT_SCALE)
        assert plain(x).abs().max().item() < 2.0  # near even odds at the start
    # The scale is a constant of the network, not a weight: the state dict is the same either way.
    assert set(plain.state_dict()) == {k for k in normed.state_dict() if "adn.N" not in k}


def test_server_and_dp_site_have_the_same_keys_and_weights_round_trip() -> None:
    spec = ModelSpec(task="prostate-mr", spatial_dims=3)
    torch.manual_seed(0)
    server = build_model(spec)
    torch.manual_seed(1)
    site = build_model(spec)
    loader = DataLoader(TensorDataset(torch.randn(8, 1, 16, 16, 8), torch.rand(8, 1).round()), batch_size=4)
    optimizer = torch.optim.SGD(site.parameters(), lr=0.1)
    private, optimizer, loader = PrivacyEngine().make_private(module=site, optimizer=optimizer, data_loader=loader,
                                                             noise_multiplier=1.0, max_grad_norm=1.0)
    assert any(k.startswith("_module.") for k in private.state_dict())
    server_arrays = state_arrays(server)
    site_arrays = state_arrays(private)
    assert list(server_arrays) == list(site_arrays)  # same names, same order, prefix stripped
    load_arrays(private, server_arrays)
    for key, value in state_arrays(private).items():
        np.testing.assert_array_equal(value, server_arrays[key])
    flat = pack(server_arrays)
    assert flat.ndim == 1 and flat.dtype == np.float32
    for key, value in unpack(flat, server_arrays).items():
        np.testing.assert_array_equal(value, server_arrays[key])


def test_mismatched_weights_name_the_key() -> None:
    model = build_model(ModelSpec(task="breast-mg", spatial_dims=2, norm=Norm.GROUP))
    arrays = state_arrays(model)
    first = next(iter(arrays))
    missing = dict(arrays)
    del missing[first]
    with pytest.raises(WeightsError, match=f"array '{first}' is missing"):
        check_arrays(arrays, missing)
    shaped = dict(arrays)
    shaped["head.weight"] = np.zeros((2, 2), np.float32)
    with pytest.raises(WeightsError, match=r"array 'head.weight' has shape \(2, 2\)"):
        load_arrays(model, shaped)
    with pytest.raises(WeightsError, match="unexpected array 'extra'"):
        check_arrays(arrays, {**arrays, "extra": np.zeros(1, np.float32)})
    with pytest.raises(WeightsError, match="packed weights have 3 values"):
        unpack(np.zeros(3, np.float32), arrays)


@pytest.mark.parametrize("dims", [2, 3])
def test_ew_per_sample_gradients_equal_hooks_on_the_compact_cnn(dims: int) -> None:
    """'ew' is the default DP mode for the compact CNN: its per-sample gradients must equal 'hooks'."""
    from opacus import GradSampleModule
    from opacus.grad_sample import GradSampleModuleExpandedWeights

    spec = ModelSpec(task="breast-mg" if dims == 2 else "prostate-mr", spatial_dims=dims, dropout=0.0)
    x = torch.randn(5, 1, *((24,) * dims))
    y = torch.rand(5, 1).round()
    grads = {}
    for mode in ("hooks", "ew"):
        torch.manual_seed(0)
        wrapper = GradSampleModule if mode == "hooks" else GradSampleModuleExpandedWeights
        model = wrapper(build_model(spec), batch_first=True, loss_reduction="mean")
        loss = torch.nn.functional.binary_cross_entropy_with_logits(model(x), y)
        loss.backward()
        grads[mode] = {n: p.grad_sample.detach().clone() for n, p in model.named_parameters()
                       if getattr(p, "grad_sample", None) is not None}
    assert grads["hooks"] and set(grads["hooks"]) == set(grads["ew"])
    for name, g in grads["hooks"].items():
        torch.testing.assert_close(grads["ew"][name], g, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize(("change", "needle"), [
    ({"round": "abc"}, "its round is 'abc'"),
    ({"round": -1}, "its round is -1"),
    ({"run_config": 5}, "its run_config is a int"),
    ({"arrays": {"w": torch.tensor([1.0, float("nan")])}}, "array 'w' holds NaN"),
])
def test_a_model_file_with_wrong_fields_is_refused_by_name(tmp_path: Path, change: dict, needle: str) -> None:
    from models.weights import load_checkpoint

    path = tmp_path / "model.pt"
    torch.save({"arrays": {"w": torch.zeros(2)}, "run_config": {"task": "lung-ct"}, "round": 1, **change}, path)
    with pytest.raises(WeightsError, match=needle):
        load_checkpoint(path)


@pytest.mark.parametrize("arch", [Arch.COMPACT_CNN, Arch.DENSENET_SMALL])
def test_fine_tuning_trains_the_norms_and_the_head_or_the_head_alone(arch: Arch) -> None:
    model = build_model(ModelSpec(task="breast-mg", spatial_dims=2, arch=arch))
    norms = {n for n, m in model.named_modules() if isinstance(m, (torch.nn.InstanceNorm2d, torch.nn.GroupNorm))}
    linears = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    assert norms and linears
    head = {f"{linears[-1]}.weight", f"{linears[-1]}.bias"}

    def trainable() -> set[str]:
        return {n for n, p in model.named_parameters() if p.requires_grad}

    assert set(set_trainable(model, FineTune.HEAD)) == trainable() == head
    named = set_trainable(model, FineTune.NORM_HEAD)
    assert set(named) == trainable() == head | {n for n, _ in model.named_parameters() if n.rsplit(".", 1)[0] in norms}
    assert not any("conv" in n for n in named)
    sizes = [(p.numel(), p.requires_grad) for p in model.parameters()]
    assert sum(n for n, trains in sizes if trains) < sum(n for n, _ in sizes) / 10
    assert set_trainable(model, FineTune.ALL) == [n for n, _ in model.named_parameters()]  # no stale flag left


def test_the_unet_has_no_head_to_fine_tune() -> None:
    model = build_model(ModelSpec(task="lung-ct-seg", spatial_dims=3, arch=Arch.UNET))
    with pytest.raises(ValueError, match="needs a classifier head"):
        set_trainable(model, FineTune.NORM_HEAD)
