"""What the loop agrees on across processes: finiteness, stop requests, logged means, DDP settings.

Every function here that takes an ``accelerator`` is a collective under more than one process: all
ranks must call it, in the same order, and all get the same answer (so all take the same branch).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType, send_to_device
from torch import Tensor, nn
from torch.utils.data import DataLoader, IterableDataset


def finite_on_every_rank(accelerator: Accelerator, value: Tensor) -> bool:
    """Whether ``value`` is finite on every rank."""
    finite = torch.isfinite(value.detach().float()).all().float().to(accelerator.device)
    if accelerator.num_processes > 1:
        finite = accelerator.reduce(finite, reduction="mean")
    return bool(finite.item() >= 1.0)


def any_rank(accelerator: Accelerator, flag: bool) -> bool:
    """Whether ``flag`` is set on at least one rank (e.g. a stop request that reached one process)."""
    value = torch.tensor(float(flag), device=accelerator.device)
    if accelerator.num_processes > 1:
        value = accelerator.reduce(value, reduction="sum")
    return bool(value.item() > 0)


def mean_over_ranks(accelerator: Accelerator, terms: dict[str, Tensor]) -> dict[str, float]:
    """Mean of each logged term over ranks, in one collective (same reduction as the loss)."""
    if not terms:
        return {}
    keys = sorted(terms)
    stacked = torch.stack([terms[k].float().to(accelerator.device).reshape(()) for k in keys])
    if accelerator.num_processes > 1:
        stacked = accelerator.reduce(stacked, reduction="mean")
    return dict(zip(keys, stacked.tolist(), strict=True))


def uses_ddp(accelerator: Accelerator) -> bool:
    """Whether prepared models are wrapped in DistributedDataParallel (several processes, not DeepSpeed/FSDP)."""
    ddp_types = {DistributedType.MULTI_GPU, DistributedType.MULTI_CPU}
    for name in ("MULTI_XPU", "MULTI_NPU", "MULTI_MLU", "MULTI_MUSA", "MULTI_HPU", "MULTI_SDAA"):
        if hasattr(DistributedType, name):
            ddp_types.add(getattr(DistributedType, name))
    return accelerator.num_processes > 1 and accelerator.distributed_type in ddp_types


def decide_find_unused(
    accelerator: Accelerator, model: nn.Module, loader: DataLoader, step_fn: Callable[[nn.Module, Any], Any]
) -> None:
    """Set DDP's ``find_unused_parameters`` from one dry forward/backward on a first batch.

    Any rank finding a trainable parameter without gradient turns it on for all. The model's
    gradients and buffers (e.g. BatchNorm statistics) and every RNG are restored afterwards, so the
    dry run leaves no trace in training.
    """
    acc = accelerator
    model.to(acc.device)
    dataset = loader.dataset
    if isinstance(dataset, IterableDataset):
        import itertools

        samples = list(itertools.islice(iter(dataset), loader.batch_size or 1))
    else:
        samples = [dataset[i] for i in range(min(loader.batch_size or 1, len(dataset)))]  # type: ignore[arg-type]  # torch's Dataset declares no __len__
    batch = send_to_device(loader.collate_fn(samples), acc.device)
    buffers = {k: v.detach().clone() for k, v in model.named_buffers()}
    was_training = model.training
    model.train()
    with torch.random.fork_rng(devices=[acc.device] if acc.device.type == "cuda" else []):
        with acc.autocast():
            loss = step_fn(model, batch).loss
        loss.backward()
    unused = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    model.zero_grad(set_to_none=True)
    with torch.no_grad():
        for k, v in model.named_buffers():
            if k in buffers:
                v.copy_(buffers[k])
    model.train(was_training)
    flag = acc.reduce(torch.tensor(float(len(unused)), device=acc.device), reduction="sum")
    found = bool(flag.item() > 0)
    acc.ddp_handler.find_unused_parameters = found
    if found:
        shown = ", ".join(unused[:6]) + (", ..." if len(unused) > 6 else "")
        acc.print(
            f"DDP: {len(unused)} parameters get no gradient in this model's step ({shown}): "
            "find_unused_parameters=True"
        )


def shutdown_distributed() -> None:
    """Tear down the default process group, if any: the last call of a stage script.

    Every process must reach it (it synchronises first). Accelerate's ``end_training`` would do this
    inside the loop, after which every later collective fails with "Default process group has not
    been initialized"; the engine therefore leaves it to the script's exit.
    """
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
