"""Model cost figures shared by the distillation stage and the deployment report."""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["count_params", "count_gmacs"]


def count_params(model: nn.Module) -> int:
    """Number of parameters."""
    return sum(p.numel() for p in model.parameters())


@torch.no_grad()
def count_gmacs(model: nn.Module, in_chans: int, size: tuple[int, int]) -> float:
    """Multiply-accumulates (FLOPs / 2, torch's FlopCounterMode) of one (1, C, H, W) forward, in G.

    Runs in eval mode on the model's device; the model's mode is restored.
    """
    from torch.utils.flop_counter import FlopCounterMode

    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        with FlopCounterMode(display=False) as counter:
            model(torch.zeros(1, in_chans, *size, device=device))
    finally:
        model.train(was_training)
    return counter.get_total_flops() / 2e9
