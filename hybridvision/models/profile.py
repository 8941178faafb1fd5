"""Model cost figures shared by the distillation stage and the deployment report."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

__all__ = ["count_params", "count_gmacs", "flop_counter", "model_summary"]


def count_params(model: nn.Module) -> int:
    """Number of parameters."""
    return sum(p.numel() for p in model.parameters())


def _cpu_sdpa_flops(
    query: Any, key: Any, value: Any, *args: Any, out_shape: Any = None, **kwargs: Any
) -> int:
    """FLOPs of the CPU fused attention kernel (torch's formula for the CUDA kernels)."""
    from torch.utils.flop_counter import sdpa_flop_count

    return sdpa_flop_count(query, key, value)


def flop_counter() -> Any:
    """A ``FlopCounterMode`` that also counts CPU fused attention.

    torch's counter knows the CUDA attention kernels only: ``scaled_dot_product_attention`` on CPU
    (``_scaled_dot_product_flash_attention_for_cpu``) would count as 0 FLOPs.
    """
    from torch.utils.flop_counter import FlopCounterMode

    mapping = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_sdpa_flops}
    return FlopCounterMode(display=False, custom_mapping=mapping)


@torch.no_grad()
def count_gmacs(model: nn.Module, in_chans: int, size: tuple[int, int]) -> float:
    """Multiply-accumulates (FLOPs / 2, torch's FlopCounterMode) of one (1, C, H, W) forward, in G.

    Runs in eval mode on the model's device; the model's mode is restored.
    """
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        with flop_counter() as counter:
            model(torch.zeros(1, in_chans, *size, device=device))
    finally:
        model.train(was_training)
    return counter.get_total_flops() / 2e9


def model_summary(model: nn.Module) -> str:
    """One log line: the model's registered name, its encoder and decoder, and its parameter count."""
    from .factory import DEFAULT_DECODER
    from .registry import list_segmenters, segmenter_spec

    params = f"{count_params(model) / 1e6:.3f} M parameters"
    build = getattr(model, "build_kwargs", None) or {}
    if "name" not in build:  # a module built elsewhere (benchmarks/peers_seg.py)
        return f"model {type(model).__name__}: {params}"
    name = build["name"]
    preset_decoder = segmenter_spec(name).decoder if name in list_segmenters() else DEFAULT_DECODER
    encoder = model.encoder.build_kwargs["name"]  # type: ignore[union-attr, index]  # nn.Module.__getattr__ typing
    return f"model {name} (encoder {encoder}, decoder {build.get('decoder') or preset_decoder}): {params}"
