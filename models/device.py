"""Where a model runs and in what precision: the site's choice, never the lead's.

``auto`` takes the first CUDA device when there is one, else the CPU. Mixed precision (``auto``) is bf16 on a
CUDA device that supports it, else fp16 with loss scaling; full fp32 on the CPU. Whatever the device and
precision, the weights a site sends are float32 on the CPU (:func:`models.weights.state_arrays`), so CPU and GPU
sites aggregate together.

Under DP-SGD, Opacus computes per-sample gradients of bf16 activations in its ``hooks`` and ``ghost`` modes but
not in ``ew`` (its einsum mixes dtypes), and it has no loss scaling for fp16: DP training uses bf16 with hooks or
ghost, and fp32 otherwise.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from enum import StrEnum

import torch

__all__ = ["DeviceError", "Placement", "Precision", "autocast", "place", "resolve_device"]


class DeviceError(ValueError):
    """A device that does not exist here, or a precision it cannot run; the message says what there is."""


class Precision(StrEnum):
    """Arithmetic precision of the forward and backward passes (the weights stay float32)."""

    AUTO = "auto"  # bf16 on a CUDA device that supports it, else fp16; fp32 on the CPU
    FP32 = "fp32"
    BF16 = "bf16"  # mixed precision: autocast to bfloat16 (CPUs run it too, slowly: for tests)
    FP16 = "fp16"  # mixed precision with loss scaling (CUDA only)


def _available() -> str:
    n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    return f"{n} CUDA device(s): " + ", ".join(f"cuda:{i}" for i in range(n)) if n else "no CUDA device"


def resolve_device(name: str = "auto") -> torch.device:
    """The device named ``name``: ``auto``, ``cpu``, ``cuda`` or ``cuda:N``.

    Raises:
        DeviceError: An unknown name, or a CUDA device this machine does not have (the message lists what it has).
    """
    text = str(name or "auto").strip().lower()
    if text == "auto":
        return torch.device("cuda:0") if torch.cuda.is_available() else torch.device("cpu")
    try:
        device = torch.device(text)
    except RuntimeError:
        raise DeviceError(f"device {name!r} is not one of auto, cpu, cuda, cuda:N") from None
    if device.type == "cpu":
        return torch.device("cpu")
    if device.type != "cuda":
        raise DeviceError(f"device {name!r}: oncofed runs models on auto, cpu or cuda[:N]")
    index = device.index or 0
    if not torch.cuda.is_available() or index >= torch.cuda.device_count():
        raise DeviceError(f"device {name!r} does not exist on this machine ({_available()}); use --device cpu or "
                          "auto")
    return torch.device("cuda", index)


@dataclass(frozen=True)
class Placement:
    """A device and the autocast dtype used on it (None: full fp32)."""

    device: torch.device
    amp_dtype: torch.dtype | None = None

    @property
    def scaled(self) -> bool:
        """fp16 needs loss scaling against gradient underflow."""
        return self.amp_dtype == torch.float16

    def describe(self) -> str:
        """``cuda:0 bf16`` / ``cpu fp32``: for logs and the egress-free local reports."""
        dtype = {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(self.amp_dtype, "fp32")  # type: ignore[arg-type]
        return f"{self.device} {dtype}"


def place(device: str = "auto", precision: str = Precision.AUTO, *, dp_mode: str | None = None) -> Placement:
    """Where and how a model runs at this site.

    Args:
        device: ``auto``, ``cpu``, ``cuda`` or ``cuda:N``.
        precision: A :class:`Precision`.
        dp_mode: The Opacus grad-sample mode when training under DP (None: no DP).

    Raises:
        DeviceError: The device does not exist, or the precision cannot run on it (fp16 on the CPU).
    """
    where = resolve_device(device)
    try:
        wanted = Precision(str(precision).strip().lower())
    except ValueError:
        raise DeviceError(f"precision {precision!r} is not one of {', '.join(Precision)}") from None
    if wanted == Precision.FP16 and where.type != "cuda":
        raise DeviceError("precision fp16 needs a CUDA device (loss scaling is CUDA's); use bf16 or fp32 on the CPU")
    if wanted == Precision.AUTO:
        if where.type != "cuda":
            return Placement(where)
        wanted = Precision.BF16 if torch.cuda.is_bf16_supported() else Precision.FP16
    if wanted == Precision.FP32:
        return Placement(where)
    if dp_mode is not None and (dp_mode == "ew" or wanted == Precision.FP16):
        return Placement(where)  # Opacus: no bf16 in ew, no loss scaling for fp16 (module docstring)
    return Placement(where, torch.bfloat16 if wanted == Precision.BF16 else torch.float16)


@contextlib.contextmanager
def autocast(placement: Placement) -> Iterator[None]:
    """Mixed precision for the forward pass on ``placement`` (nothing at fp32)."""
    if placement.amp_dtype is None:
        yield
        return
    with torch.autocast(placement.device.type, dtype=placement.amp_dtype):
        yield
