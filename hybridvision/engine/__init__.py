"""The one training loop, shared by pretrain/, finetune/ and distill/.

A stage supplies a model, a dataset (or DataLoader), a ``step_fn(model, batch) -> StepOutput``
and optionally an ``eval_fn`` and an ``export_fn``; :class:`Engine` does the rest with
Hugging Face Accelerate: device placement, DDP, mixed precision, gradient accumulation,
clipping, the LR schedule, logging, checkpoints, resume, signals and non-finite losses.

The package is split by job:

- :mod:`.loop`: :class:`Engine` and its ``fit`` (steps, logging, evaluation, saving, stopping);
- :mod:`.step`: one optimizer step (accumulation, clipping, non-finite guards), :class:`StepOutput`;
- :mod:`.checkpoints`: atomic checkpoint writes, resume resolution, loading, pruning;
- :mod:`.seeding`: per-sample seeded dataset wrappers (exact resume with any ``num_workers``);
- :mod:`.loaders`: training DataLoaders and the resumable stream of micro-batches;
- :mod:`.signals`: SIGINT/SIGTERM handling and the exit status an interrupted run owes;
- :mod:`.precision`: ``train.mixed_precision=auto`` and its cached CPU measurement;
- :mod:`.distributed`: collectives across ranks, DDP's ``find_unused_parameters``, shutdown;
- :mod:`.trackers`: trackers, the progress bar / plain lines, windowed loss means;
- :mod:`.ema`: the exponential moving average of the weights.

Stage scripts end with ``sys.exit(cli_main(...) or pending_exit_code())``: a run stopped by
SIGINT/SIGTERM exits 130/143 after checkpointing, and ``fit``'s result has ``interrupted``,
``signal``, ``exit_code`` and ``resume_command``.
"""

from __future__ import annotations

from .checkpoints import CHECKPOINT_DIR, STATE_FILE, TrainerState, find_latest_checkpoint, scan_checkpoints
from .distributed import shutdown_distributed
from .loop import Engine
from .precision import (
    CPU_BF16_MIN_SPEEDUP,
    cpu_signature,
    measure_cpu_bf16_speedup,
    precision_cache_path,
    resolve_mixed_precision,
)
from .seeding import SeededDataset, SeededIterableDataset
from .signals import exit_code, pending_exit_code
from .step import NonFiniteLossError, StepOutput

__all__ = [
    "Engine",
    "StepOutput",
    "NonFiniteLossError",
    "TrainerState",
    "SeededDataset",
    "SeededIterableDataset",
    "find_latest_checkpoint",
    "scan_checkpoints",
    "resolve_mixed_precision",
    "cpu_signature",
    "measure_cpu_bf16_speedup",
    "precision_cache_path",
    "shutdown_distributed",
    "exit_code",
    "pending_exit_code",
    "CHECKPOINT_DIR",
    "STATE_FILE",
    "CPU_BF16_MIN_SPEEDUP",
]
