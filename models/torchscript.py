"""A network as TorchScript, for running without oncofed's code (a MONAI bundle's ``models/model.ts``)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

__all__ = ["Traced", "trace_network"]


@dataclass(frozen=True)
class Traced:
    """A traced network and how far its logits are from the eager network's on the example.

    Attributes:
        module: The TorchScript module (eval mode, on the CPU).
        max_logit_difference: The largest absolute difference of the logits on the example input.
    """

    module: torch.jit.ScriptModule
    max_logit_difference: float


def trace_network(net: nn.Module, input_shape: tuple[int, ...], *, seed: int = 0) -> Traced:
    """Trace ``net`` (in eval mode, on the CPU) on a random input of ``input_shape`` and check it.

    Args:
        net: The network (every oncofed network has no data-dependent control flow, so tracing is exact).
        input_shape: One image's shape, ``(channels, *spatial)``.
        seed: Seed of the example input.

    Returns:
        The traced module and its largest logit difference from the eager network on the example.
    """
    net = net.eval().to("cpu")
    example = torch.rand((1, *input_shape), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        module = torch.jit.trace(net, example)
        difference = float((module(example) - net(example)).abs().max())
    return Traced(module, difference)
