"""One optimizer step: gradient accumulation, clipping, and the guards against non-finite values.

A stage's ``step_fn`` returns a :class:`StepOutput` per micro-batch; :func:`optimizer_step` runs
``train.grad_accum_steps`` of them and updates the weights only when the loss and the gradient norm
are finite on every rank.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType
from torch import Tensor, nn

from ..config import TrainConfig
from .checkpoints import TrainerState
from .distributed import finite_on_every_rank


class NonFiniteLossError(RuntimeError):
    """Raised when the loss is NaN/inf and ``train.skip_nonfinite`` is off (or too many were skipped)."""


@dataclass
class StepOutput:
    """What a stage's step function returns.

    Attributes:
        loss: scalar loss to back-propagate.
        logs: extra scalars to log (detached tensors or floats), e.g. loss terms, health stats.
        images: optional ``name -> (3, H, W)`` float images in [0, 1] to log when due.
    """

    loss: Tensor
    logs: dict[str, Tensor | float] = field(default_factory=dict)
    images: dict[str, Tensor] | None = None


@dataclass
class StepResult:
    """What one optimizer step (``train.grad_accum_steps`` micro-batches) produced."""

    loss: Tensor  # mean of the micro-batch losses, on the device
    lr: float  # the learning rate the step was taken with
    terms: dict[str, Tensor] = field(default_factory=dict)  # means of the logged terms
    grad_norm: Tensor | None = None  # total gradient norm before clipping
    images: dict[str, Tensor] | None = None  # the last images a micro-batch returned
    bad_reason: str = ""  # why the weights were left untouched ("" when they were updated)

    def add(self, out: StepOutput, accum_steps: int) -> None:
        """Accumulate one micro-batch's loss and logged terms, each divided by ``accum_steps``."""
        self.loss += out.loss.detach() / accum_steps
        for k, v in out.logs.items():  # kept as tensors: no device sync per step
            v = v.detach() if isinstance(v, Tensor) else torch.tensor(float(v))
            self.terms[k] = self.terms.get(k, 0.0) + v / accum_steps
        if out.images is not None:
            self.images = out.images


def optimizer_step(
    accelerator: Accelerator,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    batches: Iterator[Any],
    step_fn: Callable[[nn.Module, Any], StepOutput],
    train: TrainConfig,
    state: TrainerState,
) -> StepResult:
    """One optimizer step over ``train.grad_accum_steps`` micro-batches (every rank: collectives).

    The weights are left untouched when the loss or the gradient norm is non-finite on any rank;
    the result's ``bad_reason`` then says which. The learning-rate schedule is not stepped here.

    Args:
        accelerator: accumulation, backward, clipping (all prepared objects belong to it).
        model: the prepared model.
        optimizer: the prepared optimizer.
        batches: micro-batches (see :func:`hybridvision.engine.loaders.endless_batches`).
        step_fn: ``(model, batch) -> StepOutput``, run under autocast.
        train: ``train.*`` (accumulation, clipping, batch size).
        state: the run's counters; ``images_seen`` is advanced.
    """
    acc = accelerator
    # the fp16 GradScaler checks gradients itself (and lowers its scale); DeepSpeed does the same
    check_grads = acc.scaler is None and acc.distributed_type != DistributedType.DEEPSPEED
    done = StepResult(loss=torch.zeros((), device=acc.device), lr=optimizer.param_groups[0]["lr"])
    for _ in range(train.grad_accum_steps):
        batch = next(batches)
        with acc.accumulate(model):
            out = step_fn(model, batch)
            if not done.bad_reason and not finite_on_every_rank(acc, out.loss):
                done.bad_reason = f"non-finite loss ({out.loss.item()})"
            if not done.bad_reason:
                acc.backward(out.loss)
            if acc.sync_gradients and not done.bad_reason:
                # the total norm is needed even without clipping: a NaN gradient with a finite
                # loss (e.g. d/dx sqrt(x) at 0) must not reach the weights
                max_norm = train.grad_clip if train.grad_clip > 0 else float("inf")
                done.grad_norm = acc.clip_grad_norm_(model.parameters(), max_norm)
                if (
                    check_grads
                    and done.grad_norm is not None
                    and not finite_on_every_rank(acc, done.grad_norm)
                ):
                    done.bad_reason = f"non-finite gradient norm ({float(done.grad_norm)})"
                if not done.bad_reason:
                    optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        done.add(out, train.grad_accum_steps)
        state.images_seen += train.batch_size * acc.num_processes
    return done
