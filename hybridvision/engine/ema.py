"""An exponential moving average of the weights, kept on the training device and checkpointed."""

from __future__ import annotations

from accelerate import Accelerator
from torch import nn


def build_ema(accelerator: Accelerator, model: nn.Module, decay: float) -> nn.Module:
    """An exponential moving average of ``model``'s weights on the model's training device.

    The average is built after moving ``model`` to ``accelerator.device`` (``prepare`` would move
    the model later but never the copy), so the per-step update and evaluation stay on the device,
    with no host round trip. It is registered for checkpointing (saved and resumed with the run).

    Args:
        accelerator: the run's accelerator (device, checkpoint registry).
        model: the module to train (unprepared).
        decay: EMA decay in (0, 1), e.g. 0.999.

    Returns:
        A ``torch.optim.swa_utils.AveragedModel``; call ``ema.update_parameters(unwrapped_model)``
        after every optimizer step (``fit``'s ``on_step_end``) and evaluate ``ema.module``.
    """
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    device = accelerator.device
    model.to(device)
    ema = AveragedModel(model, device=device, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True)
    accelerator.register_for_checkpointing(ema)
    return ema
