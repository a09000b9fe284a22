"""Where a model runs and in what precision (``models.device``), checked on this CPU machine: the CPU explicitly,
a CUDA device that is not there as one clear error, the mixed-precision paths that a CPU can run (bf16 autocast,
with and without DP-SGD), and weights that leave as float32 on the CPU whatever trained them."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from models.config import from_flat
from models.device import DeviceError, Placement, Precision, autocast, place, resolve_device
from models.nets import build_model
from models.weights import pack, state_arrays

NO_GPU = not torch.cuda.is_available()


def test_the_cpu_and_auto_resolve_here() -> None:
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto") == (torch.device("cpu") if NO_GPU else torch.device("cuda:0"))
    assert resolve_device("") == resolve_device("auto")


def test_a_missing_cuda_device_is_a_clear_error() -> None:
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    names = [f"cuda:{count}", f"cuda:{count + 3}"] + (["cuda", "cuda:0"] if NO_GPU else [])
    for name in names:
        with pytest.raises(DeviceError, match=rf"device '{name}' does not exist on this machine \("):
            resolve_device(name)
    if NO_GPU:
        with pytest.raises(DeviceError, match=r"\(no CUDA device\)"):
            resolve_device("cuda")


@pytest.mark.parametrize("name", ["tpu", "gpu0", "mps", "cuda:x"])
def test_an_unknown_device_name_says_what_is_accepted(name: str) -> None:
    with pytest.raises(DeviceError, match="auto, cpu"):
        resolve_device(name)


def test_precision_on_the_cpu() -> None:
    assert place("cpu").amp_dtype is None  # auto: fp32 on the CPU
    assert place("cpu", Precision.FP32).describe() == "cpu fp32"
    assert place("cpu", "bf16").amp_dtype == torch.bfloat16 and place("cpu", "bf16").describe() == "cpu bf16"
    with pytest.raises(DeviceError, match="fp16 needs a CUDA device"):
        place("cpu", "fp16")
    with pytest.raises(DeviceError, match="precision 'half'"):
        place("cpu", "half")
    # Under DP-SGD: Opacus' ew mode cannot take bf16 activations; hooks and ghost can.
    assert place("cpu", "bf16", dp_mode="ew").amp_dtype is None
    assert place("cpu", "bf16", dp_mode="hooks").amp_dtype == torch.bfloat16


def test_bf16_autocast_runs_the_network_in_bf16_and_fp32_does_not() -> None:
    net = build_model(from_flat({"task": "breast-mg", "model-width": 8}).model).eval()
    x = torch.randn(2, 1, 32, 40)
    seen: list[torch.dtype] = []
    handle = next(m for m in net.modules() if isinstance(m, torch.nn.Conv2d)).register_forward_hook(
        lambda _m, _i, out: seen.append(out.dtype))
    with torch.no_grad(), autocast(place("cpu", "bf16")):
        net(x)
    with torch.no_grad(), autocast(Placement(torch.device("cpu"))):
        net(x)
    handle.remove()
    assert seen == [torch.bfloat16, torch.float32]


def test_weights_leave_as_float32_on_the_cpu_however_they_were_held() -> None:
    torch.manual_seed(0)
    net = build_model(from_flat({"task": "lung-ct", "model-width": 8}).model)
    wire = state_arrays(net)
    held = build_model(from_flat({"task": "lung-ct", "model-width": 8}).model)
    held.load_state_dict(net.state_dict())
    held.to(torch.float64)  # a model held in another precision (as on an accelerator)
    moved = state_arrays(held)
    assert list(moved) == list(wire)
    for key, array in moved.items():
        assert array.dtype == wire[key].dtype, key
    assert all(a.dtype == np.float32 for a in moved.values() if a.dtype.kind == "f")
    np.testing.assert_array_equal(pack(moved), pack(wire))
