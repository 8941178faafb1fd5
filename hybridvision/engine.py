"""The one training loop, shared by pretrain/, finetune/ and distill/.

A stage supplies a model, a dataset (or DataLoader), a ``step_fn(model, batch) -> StepOutput``
and optionally an ``eval_fn`` and an ``export_fn``; :class:`Engine` does the rest with
Hugging Face Accelerate: device placement, DDP, mixed precision, gradient accumulation,
clipping, the LR schedule, logging, checkpoints, resume, signals and non-finite losses.

Checkpoint layout (``<output_dir>/checkpoints/step_00000100/``)::

    model.safetensors, optimizer.bin, scheduler.bin, random_states_*.pkl   (Accelerate save_state)
    trainer_state.json     step, epoch, position in the epoch, skipped steps  (the resume source of truth)
    run_config.yaml        the resolved run config
    export/                the stage's exportable model (model.safetensors + config.json)

Each checkpoint is written to a hidden temporary directory and renamed into place, so a
directory named ``step_*`` is always complete; ``train.resume=auto`` picks the one with the
highest ``step`` recorded in its ``trainer_state.json`` (loudly skipping unreadable ones, and
refusing to start over them when none can be read).

Exact resume: the training dataset is wrapped so sample ``i`` of epoch ``e`` is drawn under an RNG
seeded by ``(train.seed, e, i)`` (:class:`SeededDataset`); the model's own randomness (masks,
dropout) uses the per-process RNG (seeded ``seed + rank``) restored from the checkpoint. A resumed
run is therefore bit-identical to an uninterrupted one, with any ``num_workers``.

Stage scripts end with ``sys.exit(cli_main(...) or pending_exit_code())``: a run stopped by
SIGINT/SIGTERM exits 130/143 after checkpointing, and ``fit``'s result has ``interrupted``,
``signal``, ``exit_code`` and ``resume_command``.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import shlex
import shutil
import signal
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.utils import (
    DataLoaderConfiguration,
    DistributedDataParallelKwargs,
    DistributedType,
    GradientAccumulationPlugin,
    ProjectConfiguration,
    send_to_device,
    set_seed,
)
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, IterableDataset, get_worker_info

from .config import ConfigError, OptimConfig, TrainConfig, save_config
from .io import write_json_atomic
from .optim import build_optimizer, build_scheduler

__all__ = [
    "Engine",
    "StepOutput",
    "NonFiniteLossError",
    "SeededDataset",
    "SeededIterableDataset",
    "find_latest_checkpoint",
    "resolve_mixed_precision",
    "scan_checkpoints",
    "shutdown_distributed",
    "exit_code",
    "pending_exit_code",
    "CHECKPOINT_DIR",
]

logger = get_logger(__name__)

CHECKPOINT_DIR = "checkpoints"
STATE_FILE = "trainer_state.json"


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
class TrainerState:
    """Counters saved in every checkpoint; the single source of truth for resuming."""

    step: int = 0  # optimizer steps done
    epoch: int = 0  # epoch of the next micro-batch
    batch_in_epoch: int = 0  # micro-batches of `epoch` already consumed
    skipped_nonfinite: int = 0  # optimizer steps skipped for a non-finite loss
    images_seen: int = 0  # samples consumed over all processes

    def to_json(self) -> dict[str, int]:
        return dict(self.__dict__)


def _read_step(path: Path) -> int:
    """The ``step`` recorded in ``path/trainer_state.json``; raises ValueError naming the file if unreadable."""
    state = path / STATE_FILE
    try:
        return int(json.loads(state.read_text())["step"])
    except (OSError, ValueError, KeyError, TypeError) as exc:  # JSONDecodeError is a ValueError
        raise ValueError(f"{state} is unreadable ({type(exc).__name__}: {exc})") from None


def scan_checkpoints(output_dir: str | os.PathLike) -> tuple[list[tuple[int, Path]], list[tuple[Path, str]]]:
    """Checkpoints under ``output_dir/checkpoints``: ``(readable, unreadable)``.

    ``readable`` is ``[(step, path)]`` sorted by step; ``unreadable`` is ``[(path, reason)]`` for every
    ``step_*`` directory whose ``trainer_state.json`` is missing or cannot be parsed (hidden temporary
    directories of an interrupted write are not checkpoints and are not listed).
    """
    root = Path(output_dir) / CHECKPOINT_DIR
    readable: list[tuple[int, Path]] = []
    unreadable: list[tuple[Path, str]] = []
    if not root.is_dir():
        return readable, unreadable
    for path in sorted(root.iterdir()):
        if path.name.startswith(".") or not path.is_dir():
            continue
        try:
            readable.append((_read_step(path), path))
        except ValueError as exc:
            unreadable.append((path, str(exc)))
    readable.sort()
    return readable, unreadable


def find_latest_checkpoint(output_dir: str | os.PathLike) -> Path | None:
    """Newest readable checkpoint under ``output_dir/checkpoints`` (by the recorded step), or None."""
    readable, _ = scan_checkpoints(output_dir)
    return readable[-1][1] if readable else None


#: exit status of the last interrupted ``fit`` in this process (0: none), see :func:`pending_exit_code`
_PENDING_EXIT = 0


def exit_code(result: dict[str, Any]) -> int:
    """Process exit status for a ``fit`` result: 0, or 128 + signal (130 SIGINT, 143 SIGTERM)."""
    signum = result.get("signal")
    return 128 + int(signum) if signum else 0


def pending_exit_code() -> int:
    """Exit status owed by this process: 128 + signal if a ``fit`` was interrupted, else 0.

    Stage scripts end with ``sys.exit(cli_main(...) or pending_exit_code())`` so an interrupted run
    exits 130 (SIGINT) / 143 (SIGTERM), as a shell or scheduler expects, and never looks successful.
    """
    return _PENDING_EXIT


class _StopFlag:
    """SIGINT/SIGTERM → finish the current step, checkpoint, exit cleanly."""

    def __init__(self) -> None:
        self.requested = False
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def install(self) -> None:
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread (e.g. notebooks running in a thread)
                pass

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested:  # second signal: stop now
            raise KeyboardInterrupt
        self.requested = True
        self.signum = signum


class _WorkerInit:
    """``worker_init_fn`` of training loaders: workers ignore SIGINT/SIGTERM.

    A scheduler (SLURM, Kubernetes, a terminal's Ctrl-C) signals the whole process group. Left to
    the default handler, every DataLoader worker dies and the main process fails with "DataLoader
    worker ... is killed by signal" before it can checkpoint. Workers therefore ignore both; the
    main process finishes the step, saves, and shuts its workers down itself (a worker whose parent
    dies exits on its own).
    """

    def __init__(self, inner: Callable[[int], None] | None = None) -> None:
        self.inner = inner

    def __call__(self, worker_id: int) -> None:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        if self.inner is not None:
            self.inner(worker_id)


def _sample_seed(*key: int) -> int:
    """A 63-bit seed from a tuple of non-negative ints (``numpy.random.SeedSequence`` mixing)."""
    return (
        int(
            np.random.SeedSequence([int(k) for k in key])
            .generate_state(2, dtype=np.uint32)
            .view(np.uint64)[0]
        )
        >> 1
    )


@contextlib.contextmanager
def _seeded_rng(seed: int) -> Iterator[None]:
    """Run the body with the CPU torch, ``random`` and NumPy global RNGs seeded by ``seed``, then restore them."""
    py_state, np_state = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        random.seed(seed)
        np.random.seed(seed % 2**32)
        try:
            yield
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)


class _EpochSeeded:
    """Shared part of the per-sample seeding wrappers: seed, rank and a shared-memory epoch counter."""

    def __init__(self, dataset: Any, seed: int, rank: int) -> None:
        self.dataset = dataset
        self.seed = seed
        self.rank = rank
        # shared memory: persistent DataLoader workers see the epoch the main process sets
        self._epoch = torch.zeros((), dtype=torch.int64).share_memory_()

    def set_epoch(self, epoch: int) -> None:
        self._epoch.fill_(int(epoch))
        if hasattr(self.dataset, "set_epoch"):
            self.dataset.set_epoch(epoch)

    def __getattr__(self, name: str) -> Any:  # forward dataset attributes (e.g. ``shards_itself``)
        if name.startswith("__") or name in ("dataset", "seed", "rank", "_epoch"):
            raise AttributeError(name)
        return getattr(self.dataset, name)


class SeededDataset(_EpochSeeded, Dataset):
    """Map-style dataset whose sample ``i`` of epoch ``e`` is drawn under RNG seed ``(seed, e, i)``.

    Augmentations (random crops, flips, colour jitter, views) then depend only on which sample is
    read in which epoch, not on how many samples this process or worker drew before. That makes a
    run resumed mid-epoch (``skip_first_batches``) bit-identical to an uninterrupted one, with any
    ``num_workers``, and gives every rank different augmentations (ranks read different indices).
    The global RNG of the caller is left untouched.

    Args:
        dataset: the wrapped map-style dataset.
        seed: the run seed (``train.seed``).
        rank: the process index (unused for map-style keys; kept for symmetry).
    """

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> Any:
        with _seeded_rng(_sample_seed(self.seed, int(self._epoch), int(index))):
            return self.dataset[index]


class SeededIterableDataset(_EpochSeeded, IterableDataset):
    """Streaming counterpart of :class:`SeededDataset`: the ``k``-th sample a (rank, worker) draws in
    epoch ``e`` is produced under RNG seed ``(seed, e, rank, worker, k)``.

    A resumed stream is replayed up to the saved position (streams cannot seek); since every sample's
    randomness depends only on its position, the replayed prefix and everything after it are the
    same as in the uninterrupted run, provided the stream itself yields the same order.
    """

    def __iter__(self) -> Iterator[Any]:
        info = get_worker_info()
        worker = info.id if info is not None else 0
        epoch = int(self._epoch)
        with _seeded_rng(_sample_seed(self.seed, epoch, self.rank, worker, 2**31)):
            iterator = iter(self.dataset)
        k = 0
        while True:
            with _seeded_rng(_sample_seed(self.seed, epoch, self.rank, worker, k)):
                try:
                    item = next(iterator)
                except StopIteration:
                    return
            yield item
            k += 1


class Engine:
    """Accelerate training loop.

    Args:
        train: the ``train.*`` section.
        optim: the ``optim.*`` section.
        run_config: the stage's full resolved config (saved next to every checkpoint).
        project_name: tracker run name.
        find_unused_parameters: DDP's option for models whose step leaves some parameters without a
            gradient (contrastive pretraining reads only the last encoder stage; a pixel-shuffle MIM
            decoder skips some stage norms). ``"auto"`` (default) decides it from the model actually
            built: under DDP, one dry forward/backward on the first batch (RNG, gradients and buffers
            restored afterwards) finds the parameters that get no gradient, agreed across ranks.
    """

    def __init__(
        self,
        train: TrainConfig,
        optim: OptimConfig,
        run_config: Any = None,
        project_name: str = "run",
        find_unused_parameters: bool | str = "auto",
    ):
        if find_unused_parameters not in (True, False, "auto"):
            raise ValueError(
                f"find_unused_parameters must be True, False or 'auto', got {find_unused_parameters!r}"
            )
        self.cfg = train
        self.optim_cfg = optim
        self.run_config = run_config
        self.output_dir = Path(train.output_dir)
        self.find_unused_parameters = find_unused_parameters
        trackers = [t for t in train.trackers if t != "none"]
        precision_note = ""
        if train.mixed_precision == "auto":  # resolved once; the saved run config records the choice
            train.mixed_precision, precision_note = resolve_mixed_precision()
        if train.mixed_precision == "fp16" and (not torch.cuda.is_available() or _use_cpu_forced()):
            raise ConfigError(
                "train.mixed_precision=fp16 needs a CUDA GPU; on CPU use train.mixed_precision=bf16"
            )
        self.accelerator = Accelerator(
            mixed_precision=train.mixed_precision,
            # the window never straddles an epoch end: we count optimizer steps, not epochs
            gradient_accumulation_plugin=GradientAccumulationPlugin(
                num_steps=train.grad_accum_steps, sync_with_dataloader=False
            ),
            log_with=trackers or None,
            project_config=ProjectConfiguration(
                project_dir=str(self.output_dir), logging_dir=str(self.output_dir / "logs")
            ),
            dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=train.seed),
            step_scheduler_with_optimizer=False,
            kwargs_handlers=[
                DistributedDataParallelKwargs(find_unused_parameters=find_unused_parameters is True)
            ],
        )
        if precision_note:
            self.print(f"train.mixed_precision=auto -> {train.mixed_precision} ({precision_note})")
        # the same seed on every rank: model init is identical; fit() re-seeds per rank before training
        set_seed(train.seed, device_specific=False)
        if optim.warmup_steps >= train.max_steps:
            logger.warning(
                f"optim.warmup_steps={optim.warmup_steps} >= train.max_steps={train.max_steps}: the learning "
                "rate never reaches its decay phase (lower optim.warmup_steps)",
                main_process_only=True,
            )
        self.project_name = project_name
        self.state = TrainerState()
        self._stop = _StopFlag()
        self._trackers_started = False
        self._closed = False
        self._resume_resolved = False
        self._resume_path: Path | None = None
        self._seeded: _EpochSeeded | None = None

    # ------------------------------------------------------------------ helpers

    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process

    def print(self, *args: Any) -> None:
        self.accelerator.print(*args)

    def _start_trackers(self) -> None:
        if not self._trackers_started and self.accelerator.log_with:
            from .config import config_to_dict

            hparams = _flat_scalars(config_to_dict(self.run_config)) if self.run_config is not None else {}
            self.accelerator.init_trackers(self.project_name, config=hparams)
            self._trackers_started = True

    def log(self, values: dict[str, Any], step: int | None = None) -> None:
        """Log scalars to the trackers (main process writes)."""
        if not self.accelerator.log_with or self._closed:
            return
        self._start_trackers()
        clean = {k: (v.item() if isinstance(v, Tensor) else v) for k, v in values.items()}
        self.accelerator.log(clean, step=self.state.step if step is None else step)

    def log_images(self, images: dict[str, Tensor], step: int | None = None) -> None:
        """Log ``name -> (3, H, W)`` images to TensorBoard (main process only)."""
        if not self.is_main or "tensorboard" not in self.cfg.trackers or self._closed:
            return
        self._start_trackers()
        writer = self.accelerator.get_tracker("tensorboard", unwrap=True)
        for name, img in images.items():
            writer.add_image(
                name, img.detach().float().clamp(0, 1).cpu(), self.state.step if step is None else step
            )

    def build_ema(self, model: nn.Module, decay: float) -> nn.Module:
        """An exponential moving average of ``model``'s weights on the model's training device.

        The average is built after moving ``model`` to ``accelerator.device`` (``prepare`` would move
        the model later but never the copy), so the per-step update and evaluation stay on the device,
        with no host round trip. It is registered for checkpointing (saved and resumed with the run).

        Args:
            model: the module to train (unprepared).
            decay: EMA decay in (0, 1), e.g. 0.999.

        Returns:
            A ``torch.optim.swa_utils.AveragedModel``; call ``ema.update_parameters(unwrapped_model)``
            after every optimizer step (``fit``'s ``on_step_end``) and evaluate ``ema.module``.
        """
        from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

        device = self.accelerator.device
        model.to(device)
        ema = AveragedModel(model, device=device, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True)
        self.accelerator.register_for_checkpointing(ema)
        return ema

    def build_loader(
        self,
        dataset: Dataset,
        batch_size: int,
        shuffle: bool,
        num_workers: int = 0,
        persistent_workers: bool = False,
        pin_memory: bool = False,
        drop_last: bool = True,
    ) -> DataLoader:
        """A training DataLoader: seeded shuffling, per-sample seeded augmentations, signal-safe workers.

        The dataset is wrapped in :class:`SeededDataset` (or :class:`SeededIterableDataset`) so each
        sample's random augmentations depend only on ``(train.seed, epoch, index)``: exact mid-epoch
        resume with any ``num_workers``, and different augmentations on every rank. ``fit``/``prepare``
        shard the loader across processes.
        """
        if not isinstance(dataset, _EpochSeeded):
            wrapper = SeededIterableDataset if isinstance(dataset, IterableDataset) else SeededDataset
            dataset = wrapper(dataset, self.cfg.seed, self.accelerator.process_index)
        generator = torch.Generator().manual_seed(self.cfg.seed)
        return DataLoader(
            dataset,
            batch_size=batch_size,
            shuffle=shuffle and not isinstance(dataset, IterableDataset),
            num_workers=num_workers,
            persistent_workers=persistent_workers and num_workers > 0,
            pin_memory=pin_memory and torch.cuda.is_available(),
            drop_last=drop_last,
            generator=generator,
            worker_init_fn=_WorkerInit() if num_workers > 0 else None,
        )

    def prepare_loader(self, loader: DataLoader) -> DataLoader:
        """Shard a loader across processes (datasets that shard themselves are only device-placed)."""
        if loader.num_workers > 0 and not isinstance(loader.worker_init_fn, _WorkerInit):
            loader.worker_init_fn = _WorkerInit(loader.worker_init_fn)
        if getattr(loader.dataset, "shards_itself", False):
            from accelerate.data_loader import DataLoaderShard

            return DataLoaderShard(
                loader.dataset,
                device=self.accelerator.device,
                batch_size=loader.batch_size,
                num_workers=loader.num_workers,
                collate_fn=loader.collate_fn,
                drop_last=loader.drop_last,
                pin_memory=loader.pin_memory,
                worker_init_fn=loader.worker_init_fn,
                generator=loader.generator,  # worker base seeds never drawn from the global RNG
            )
        return self.accelerator.prepare_data_loader(loader)

    # ------------------------------------------------------------------ checkpoints

    def _checkpoint_root(self) -> Path:
        return self.output_dir / CHECKPOINT_DIR

    def save_checkpoint(self, export_fn: Callable[[nn.Module, Path], None] | None = None) -> Path:
        """Write a complete checkpoint for the current step atomically; keep the last K.

        Raises:
            NonFiniteLossError: the weights hold NaN/inf (checked on every rank): nothing is written, so
                no checkpoint with broken weights ever looks like a good state.
        """
        acc = self.accelerator
        if not self._weights_finite():
            last = find_latest_checkpoint(self.output_dir)
            raise NonFiniteLossError(
                f"the weights are non-finite at step {self.state.step}; not saving them. "
                + (f"The last good state is {last}." if last else "No earlier checkpoint exists.")
            )
        root = self._checkpoint_root()
        final = root / f"step_{self.state.step:08d}"
        tmp = root / f".tmp-step_{self.state.step:08d}"
        if acc.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        acc.wait_for_everyone()
        acc.save_state(str(tmp), safe_serialization=True)
        if export_fn is not None and acc.is_main_process:
            export_fn(acc.unwrap_model(self.model), tmp / "export")
        acc.wait_for_everyone()
        if acc.is_main_process:
            write_json_atomic(tmp / STATE_FILE, self.state.to_json())
            if self.run_config is not None:
                save_config(self.run_config, tmp / "run_config.yaml")
            for path in tmp.rglob("*"):
                if path.is_file():
                    with open(path, "rb") as fh:
                        os.fsync(fh.fileno())
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
            self._prune_checkpoints()
        acc.wait_for_everyone()
        return final

    def _weights_finite(self) -> bool:
        model = getattr(self, "model", None)
        if model is None:
            return True
        bad = torch.zeros((), device=self.accelerator.device)
        with torch.no_grad():
            for p in model.parameters():
                if p.numel() and not torch.isfinite(p).all():
                    bad += 1
                    break
        if self.accelerator.num_processes > 1:
            bad = self.accelerator.reduce(bad, reduction="sum")
        return bool(bad.item() == 0)

    def _prune_checkpoints(self) -> None:
        """Delete readable checkpoints beyond the newest ``train.keep_last``; never an unreadable one.

        Only checkpoints whose state can be read count towards ``keep_last``, so a newer checkpoint that
        cannot be read never causes an older, good one to be deleted.
        """
        readable, unreadable = scan_checkpoints(self.output_dir)
        for path, reason in unreadable:
            logger.warning(f"not pruning {path}: {reason}", main_process_only=True)
        for _, path in readable[: -self.cfg.keep_last]:
            shutil.rmtree(path, ignore_errors=True)

    @property
    def resume_checkpoint(self) -> Path | None:
        """The checkpoint ``fit`` will resume from (``train.resume``), or None for a fresh run.

        Stage scripts use it to say only what happens (e.g. not "initialised from scratch" when the
        weights will come from a checkpoint).

        Raises:
            ConfigError: ``train.resume`` names no readable checkpoint, or every checkpoint in
                ``output_dir`` is unreadable (the run would otherwise restart at step 0 and prune them).
        """
        if not self._resume_resolved:
            self._resume_path = self._resolve_resume()
            self._resume_resolved = True
        return self._resume_path

    def _resolve_resume(self) -> Path | None:
        resume = self.cfg.resume
        if resume == "never":
            return None
        if resume == "auto":
            readable, unreadable = scan_checkpoints(self.output_dir)
            if unreadable and not readable:
                names = ", ".join(f"{reason}" for _, reason in unreadable)
                raise ConfigError(
                    f"train.resume=auto: no checkpoint in {self.output_dir / CHECKPOINT_DIR} can be read "
                    f"({names}); repair or remove them, pass train.resume=<checkpoint dir>, or "
                    "use another train.output_dir"
                )
            if not readable:
                return None
            step, chosen = readable[-1]
            for path, reason in unreadable:
                logger.warning(
                    f"train.resume=auto: SKIPPING unreadable checkpoint {path} ({reason}); resuming from "
                    f"{chosen} (step {step}) instead",
                    main_process_only=True,
                )
            return chosen
        path = Path(resume)
        if path.is_dir() and (path / STATE_FILE).exists():
            try:
                _read_step(path)
            except ValueError as exc:
                raise ConfigError(f"train.resume={resume!r}: {exc}; pass another checkpoint") from None
            return path
        readable, unreadable = scan_checkpoints(path)
        if not readable:
            why = f" ({'; '.join(r for _, r in unreadable)})" if unreadable else ""
            raise ConfigError(
                f"train.resume={resume!r}: no readable checkpoint there{why} (expected {STATE_FILE} in it "
                f"or in {path}/{CHECKPOINT_DIR}/step_*)"
            )
        for bad, reason in unreadable:
            logger.warning(
                f"train.resume: skipping unreadable checkpoint {bad} ({reason})", main_process_only=True
            )
        return readable[-1][1]

    def _config_differences(self, path: Path) -> list[str]:
        """Settings (outside ``train.*``) whose value in ``path/run_config.yaml`` differs from this run's."""
        if self.run_config is None or not (path / "run_config.yaml").is_file():
            return []
        import yaml

        from .config import config_to_dict

        try:
            saved = _flat_scalars(yaml.safe_load((path / "run_config.yaml").read_text()) or {})
        except (OSError, yaml.YAMLError):
            return []
        now = _flat_scalars(config_to_dict(self.run_config))
        diffs = []
        for key in sorted(set(saved) | set(now)):
            if key.split("/")[0] in ("train", "probe", "eval"):
                continue
            if saved.get(key) != now.get(key):
                diffs.append(f"{key.replace('/', '.')}={saved.get(key)!r} there but {now.get(key)!r} now")
        return diffs

    def load_checkpoint(self, path: Path) -> None:
        """Restore model, optimizer, scheduler, RNG and trainer state from ``path``.

        Raises:
            ConfigError: the checkpoint was written by another model, class count or optimizer, or its
                ``trainer_state.json`` is unreadable; the message names the directory and the setting.
        """
        try:
            state = json.loads((path / STATE_FILE).read_text())
            trainer_state = TrainerState(**state)
        except (OSError, ValueError, TypeError) as exc:
            raise ConfigError(
                f"cannot resume from {path}: {path / STATE_FILE} is unreadable ({type(exc).__name__}: {exc})"
            ) from None
        diffs = self._config_differences(path)
        hint = "; use train.resume=never with another train.output_dir, or the settings it was written with"
        groups_before = [set(g) for g in self.optimizer.param_groups]
        try:
            self.accelerator.load_state(str(path))
        except Exception as exc:  # a state dict of another shape / optimizer
            what = (
                "; ".join(diffs[:4]) if diffs else f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
            )
            raise ConfigError(
                f"cannot resume from {path}: it was written with another setup ({what}){hint}"
            ) from None
        if [set(g) for g in self.optimizer.param_groups] != groups_before:
            optim_diffs = [d for d in diffs if d.startswith("optim.")] or diffs
            what = "; ".join(optim_diffs[:4]) or "a different optimizer"
            raise ConfigError(
                f"cannot resume from {path}: it was written with another optimizer ({what}){hint}"
            )
        self.state = trainer_state
        self.print(f"resumed from {path} at step {self.state.step}")

    # ------------------------------------------------------------------ data iteration

    def _batches(self, loader: DataLoader) -> Iterator[Any]:
        """Yield micro-batches forever, starting at the saved (epoch, position).

        Map-style data skips the consumed batches without reading them; a stream cannot seek, so it is
        replayed up to the saved position (exact when it was built by :meth:`build_loader`).
        """
        iterable = isinstance(loader.dataset, IterableDataset)
        while True:
            if self._seeded is not None:
                self._seeded.set_epoch(self.state.epoch)
            if hasattr(loader, "set_epoch"):
                loader.set_epoch(self.state.epoch)
            skip = self.state.batch_in_epoch
            if skip and not iterable:
                epoch_loader = self.accelerator.skip_first_batches(loader, skip)
                if hasattr(epoch_loader, "set_epoch"):
                    epoch_loader.set_epoch(self.state.epoch)
            else:
                epoch_loader = loader
                if skip:
                    exact = (
                        "exact"
                        if self._seeded is not None
                        else "approximate: augmentations are not per-sample seeded"
                    )
                    self.print(
                        f"resuming a stream: replaying {skip} batches of epoch {self.state.epoch} ({exact})"
                    )
            produced = 0
            for i, batch in enumerate(epoch_loader):
                if iterable and i < skip:
                    continue
                produced += 1
                self.state.batch_in_epoch += 1
                yield batch
            if produced == 0 and skip == 0:
                raise ValueError(
                    "the training DataLoader produced no batch: the dataset is empty or smaller than "
                    "train.batch_size with drop_last (reduce train.batch_size or add data)"
                )
            self.state.epoch += 1
            self.state.batch_in_epoch = 0

    # ------------------------------------------------------------------ the loop

    def fit(
        self,
        model: nn.Module,
        train_data: Dataset | DataLoader,
        step_fn: Callable[[nn.Module, Any], StepOutput],
        eval_fn: Callable[[Engine, nn.Module], dict[str, float]] | None = None,
        export_fn: Callable[[nn.Module, Path], None] | None = None,
        on_step_end: Callable[[Engine], None] | None = None,
        optimizer: torch.optim.Optimizer | None = None,
        num_workers: int = 0,
        persistent_workers: bool = False,
        pin_memory: bool = False,
    ) -> dict[str, Any]:
        """Train ``model`` for ``train.max_steps`` optimizer steps.

        Args:
            model: the module to train (unprepared).
            train_data: a Dataset (a shuffled loader with per-sample seeded augmentations is built, see
                :meth:`build_loader`) or a ready DataLoader (exact resume then needs its dataset to be
                deterministic per index, e.g. built with :meth:`build_loader`).
            step_fn: ``(prepared_model, batch) -> StepOutput``; runs under autocast.
            eval_fn: ``(engine, prepared_model) -> metrics``; called every ``train.eval_every`` steps
                and at the end, on every process (it must gather across processes itself).
            export_fn: ``(unwrapped_model, directory)`` writing the exportable model; called on the
                main process at every checkpoint (``<checkpoint>/export``).
            on_step_end: ``(engine)`` called after every optimizer step (e.g. an EMA update).
            optimizer: defaults to :func:`build_optimizer` over ``model``'s parameters.

        Returns:
            ``{"step", "final_metrics", "checkpoint", "skipped_nonfinite", "interrupted", "signal",
            "exit_code", "resume_command"}``; ``exit_code`` is 0, or 130/143 after SIGINT/SIGTERM
            (see :func:`pending_exit_code`).
        """
        global _PENDING_EXIT
        cfg, acc = self.cfg, self.accelerator
        if isinstance(train_data, DataLoader):
            loader = train_data
        else:
            loader = self.build_loader(
                train_data, cfg.batch_size, True, num_workers, persistent_workers, pin_memory, drop_last=True
            )
        if isinstance(loader.dataset, _EpochSeeded):
            self._seeded = loader.dataset
        optimizer = optimizer or build_optimizer(model, self.optim_cfg)
        scheduler = build_scheduler(optimizer, self.optim_cfg, cfg.max_steps)
        self.optimizer = optimizer
        if self.find_unused_parameters == "auto" and self._uses_ddp():
            self._decide_find_unused(model, loader, step_fn)
        self.model, self.optimizer, self.scheduler = acc.prepare(model, optimizer, scheduler)
        loader = self.prepare_loader(loader)
        # a different stream per rank (masks, dropout, drop-path); restored per process on resume
        set_seed(cfg.seed, device_specific=True)

        resume_from = self.resume_checkpoint
        if resume_from is not None:
            self.load_checkpoint(resume_from)
        elif acc.is_main_process:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            if self.run_config is not None:
                save_config(self.run_config, self.output_dir / "run_config.yaml")
        self._start_trackers()

        self._stop.install()
        try:
            result = self._loop(loader, step_fn, eval_fn, export_fn, on_step_end)
        finally:
            self._stop.restore()
            self.flush_trackers()
        result["signal"] = self._stop.signum if result["interrupted"] else None
        result["exit_code"] = exit_code(result)
        result["resume_command"] = self.resume_command() if result["interrupted"] else None
        if result["exit_code"]:
            _PENDING_EXIT = result["exit_code"]
        return result

    def resume_command(self) -> str:
        """The command line that continues this run from its newest checkpoint."""
        args = [a for a in sys.argv[1:] if not a.startswith("train.resume=")]
        if self.cfg.resume != "auto":
            args.append("train.resume=auto")
        if not any(a.startswith("train.output_dir=") for a in args) and "--config" not in args:
            args.append(f"train.output_dir={self.output_dir}")
        n = self.accelerator.num_processes
        launcher = (
            ["accelerate", "launch", "--num_processes", str(n)] if n > 1 else [Path(sys.executable).name]
        )
        return shlex.join([*launcher, sys.argv[0] if sys.argv and sys.argv[0] else "<script>", *args])

    def _uses_ddp(self) -> bool:
        acc = self.accelerator
        ddp_types = {DistributedType.MULTI_GPU, DistributedType.MULTI_CPU}
        for name in ("MULTI_XPU", "MULTI_NPU", "MULTI_MLU", "MULTI_MUSA", "MULTI_HPU", "MULTI_SDAA"):
            if hasattr(DistributedType, name):
                ddp_types.add(getattr(DistributedType, name))
        return acc.num_processes > 1 and acc.distributed_type in ddp_types

    def _decide_find_unused(self, model: nn.Module, loader: DataLoader, step_fn) -> None:
        """Set DDP's ``find_unused_parameters`` from one dry forward/backward on a first batch.

        Any rank finding a trainable parameter without gradient turns it on for all. The model's
        gradients and buffers (e.g. BatchNorm statistics) and every RNG are restored afterwards, so the
        dry run leaves no trace in training.
        """
        acc = self.accelerator
        model.to(acc.device)
        dataset = loader.dataset
        if isinstance(dataset, IterableDataset):
            import itertools

            samples = list(itertools.islice(iter(dataset), loader.batch_size or 1))
        else:
            samples = [dataset[i] for i in range(min(loader.batch_size or 1, len(dataset)))]
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
            self.print(
                f"DDP: {len(unused)} parameters get no gradient in this model's step ({shown}): "
                "find_unused_parameters=True"
            )

    def flush_trackers(self) -> None:
        """Write what the trackers hold to disk without closing them (logging may continue)."""
        for tracker in self.accelerator.trackers:
            writer = getattr(tracker, "writer", None)
            if writer is not None and hasattr(writer, "flush"):
                writer.flush()

    def close_interrupted(self, result: dict[str, Any]) -> None:
        """End a run ``fit`` stopped by a signal: ``<output_dir>/metrics.json`` says it is partial
        (step, checkpoint) instead of holding metrics, then :meth:`close`. Stages write no final model
        in that case; the engine has already printed the command that resumes."""
        if self.is_main:
            write_json_atomic(
                self.output_dir / "metrics.json",
                {"step": result["step"], "partial": True, "checkpoint": str(result["checkpoint"])},
            )
        self.close()

    def close(self) -> None:
        """Finish the trackers (event files closed); the process group stays up.

        Unlike Accelerate's ``end_training`` this does not destroy the process group, so a stage may
        still synchronise after it and a process may build several engines one after another
        (``benchmarks/peers_seg.py``). Stage scripts call :func:`shutdown_distributed` once, on exit.
        Idempotent; nothing is logged after it.
        """
        if self._closed:
            return
        self._closed = True
        for tracker in self.accelerator.trackers:
            tracker.finish()
        self.accelerator.trackers = []
        self._trackers_started = False

    def _finite_everywhere(self, value: Tensor) -> bool:
        """Whether ``value`` is finite on every rank (all ranks take the same branch)."""
        finite = torch.isfinite(value.detach().float()).all().float().to(self.accelerator.device)
        if self.accelerator.num_processes > 1:
            finite = self.accelerator.reduce(finite, reduction="mean")
        return bool(finite.item() >= 1.0)

    def _reduce_terms(self, terms: dict[str, Tensor]) -> dict[str, float]:
        """Mean of each logged term over ranks, in one collective (same reduction as the loss)."""
        if not terms:
            return {}
        keys = sorted(terms)
        stacked = torch.stack([terms[k].float().to(self.accelerator.device).reshape(()) for k in keys])
        if self.accelerator.num_processes > 1:
            stacked = self.accelerator.reduce(stacked, reduction="mean")
        return dict(zip(keys, stacked.tolist(), strict=True))

    def _loop(self, loader, step_fn, eval_fn, export_fn, on_step_end) -> dict[str, Any]:
        cfg, acc = self.cfg, self.accelerator
        model, optimizer, scheduler = self.model, self.optimizer, self.scheduler
        global_batch = cfg.batch_size * acc.num_processes
        batches = self._batches(loader)
        bar = None
        plain_lines = False
        if acc.is_local_main_process and self.state.step < cfg.max_steps:
            if cfg.progress_bar and _stdout_is_terminal():
                from tqdm.auto import tqdm

                bar = tqdm(
                    total=cfg.max_steps, initial=self.state.step, desc=self.project_name, dynamic_ncols=True
                )
            else:  # a log file, CI, SLURM: one plain line every train.log_every steps
                plain_lines = True
        # the fp16 GradScaler checks gradients itself (and lowers its scale); DeepSpeed does the same
        check_grads = acc.scaler is None and acc.distributed_type != DistributedType.DEEPSPEED

        window_loss = torch.zeros((), device=acc.device)
        window_terms: dict[str, Tensor] = {}
        window_steps = 0
        t0 = t_start = time.perf_counter()
        step0 = self.state.step
        seen0 = self.state.images_seen
        metrics: dict[str, float] = {}
        last_ckpt: Path | None = None
        interrupted = False
        last_images: dict[str, Tensor] | None = None

        model.train()
        while self.state.step < cfg.max_steps:
            bad_window = False
            bad_reason = ""
            step_loss = torch.zeros((), device=acc.device)
            step_terms: dict[str, Tensor] = {}
            grad_norm = None
            lr_used = optimizer.param_groups[0]["lr"]
            for _ in range(cfg.grad_accum_steps):
                batch = next(batches)
                with acc.accumulate(model):
                    out = step_fn(model, batch)
                    if not bad_window and not self._finite_everywhere(out.loss):
                        bad_window, bad_reason = True, f"non-finite loss ({out.loss.item()})"
                    if not bad_window:
                        acc.backward(out.loss)
                    if acc.sync_gradients and not bad_window:
                        # the total norm is needed even without clipping: a NaN gradient with a finite
                        # loss (e.g. d/dx sqrt(x) at 0) must not reach the weights
                        max_norm = cfg.grad_clip if cfg.grad_clip > 0 else float("inf")
                        grad_norm = acc.clip_grad_norm_(model.parameters(), max_norm)
                        if check_grads and grad_norm is not None and not self._finite_everywhere(grad_norm):
                            bad_window, bad_reason = True, f"non-finite gradient norm ({float(grad_norm)})"
                        if not bad_window:
                            optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                step_loss += out.loss.detach() / cfg.grad_accum_steps
                for k, v in out.logs.items():  # kept as tensors: no device sync per step
                    v = v.detach() if isinstance(v, Tensor) else torch.tensor(float(v))
                    step_terms[k] = step_terms.get(k, 0.0) + v / cfg.grad_accum_steps
                if out.images is not None:
                    last_images = out.images
                self.state.images_seen += global_batch

            if bad_window:
                if not cfg.skip_nonfinite:
                    path = self._save_if_good(export_fn) if self.state.step > 0 else None
                    where = f"; the last good state is saved in {path}" if path else ""
                    raise NonFiniteLossError(
                        f"{bad_reason} at step {self.state.step + 1}{where}. "
                        "Lower optim.lr, use train.mixed_precision=bf16 instead of fp16, or set "
                        "train.skip_nonfinite=true to skip such steps."
                    )
                self.state.skipped_nonfinite += 1
                logger.warning(
                    f"skipped step {self.state.step + 1}: {bad_reason} "
                    f"({self.state.skipped_nonfinite} skipped so far)",
                    main_process_only=True,
                )
                if self.state.skipped_nonfinite > cfg.max_nonfinite:
                    path = self._save_if_good(export_fn)
                    raise NonFiniteLossError(
                        f"{self.state.skipped_nonfinite} steps skipped for non-finite losses or gradients "
                        f"(> train.max_nonfinite={cfg.max_nonfinite}); state saved in {path}"
                    )
            else:  # only steps that updated the weights enter the logged means
                window_loss += step_loss
                window_steps += 1
                for k, v in step_terms.items():
                    window_terms[k] = window_terms.get(k, 0.0) + v
            scheduler.step()
            self.state.step += 1
            step = self.state.step
            if on_step_end is not None:
                on_step_end(self)

            if bar is not None:
                bar.update(1)
            if step % cfg.log_every == 0 or step == cfg.max_steps:
                now = time.perf_counter()
                elapsed = max(now - t0, 1e-9)
                ips = (self.state.images_seen - seen0) / elapsed
                logs: dict[str, float] = {
                    "train/lr": lr_used,  # the LR this step was taken with
                    "train/images_per_s": ips,
                    "train/epoch": self.state.epoch,
                    "train/skipped_nonfinite": self.state.skipped_nonfinite,
                }
                reduced = self._reduce_terms({"__loss__": window_loss, **window_terms})
                mean_loss = reduced.pop("__loss__") / window_steps if window_steps else None
                if window_steps:  # a window of skipped steps only has no loss to report
                    logs["train/loss"] = mean_loss
                    logs.update({f"train/{k}": v / window_steps for k, v in reduced.items()})
                if grad_norm is not None and torch.isfinite(torch.as_tensor(grad_norm)):
                    logs["train/grad_norm"] = float(grad_norm)
                self.log(logs, step)
                loss_text = f"{mean_loss:.4f}" if mean_loss is not None else "n/a (skipped)"
                if bar is not None:
                    bar.set_postfix(loss=loss_text, lr=f"{lr_used:.2e}", img_s=f"{ips:.1f}")
                elif plain_lines:
                    per_step = (now - t_start) / max(step - step0, 1)
                    eta = _format_duration(per_step * (cfg.max_steps - step))
                    acc.print(
                        f"{self.project_name} step {step}/{cfg.max_steps} loss {loss_text} lr {lr_used:.3e} "
                        f"{ips:.1f} img/s ETA {eta}",
                        flush=True,
                    )
                window_loss.zero_()
                window_terms.clear()
                window_steps = 0
                t0 = time.perf_counter()
                seen0 = self.state.images_seen
            if last_images is not None and cfg.log_images_every and step % cfg.log_images_every == 0:
                self.log_images(last_images, step)

            if eval_fn is not None and cfg.eval_every and step % cfg.eval_every == 0 and step < cfg.max_steps:
                metrics = self._evaluate(eval_fn)

            stop = self._stop_requested()
            if step % cfg.ckpt_every == 0 or step == cfg.max_steps or stop:
                last_ckpt = self.save_checkpoint(export_fn)
            if stop:
                interrupted = True
                name = signal.Signals(self._stop.signum).name if self._stop.signum else "a signal"
                self.print(
                    f"\nstopped by {name} after step {step}/{cfg.max_steps}; checkpoint saved to {last_ckpt}; "
                    f"outputs are partial.\nresume with: {self.resume_command()}"
                )
                break

        if bar is not None:
            bar.close()
        if not interrupted and eval_fn is not None:
            metrics = self._evaluate(eval_fn)
        if last_ckpt is None:
            last_ckpt = find_latest_checkpoint(self.output_dir)
        return {
            "step": self.state.step,
            "final_metrics": metrics,
            "checkpoint": last_ckpt,
            "skipped_nonfinite": self.state.skipped_nonfinite,
            "interrupted": interrupted,
        }

    def _save_if_good(self, export_fn) -> Path | None:
        """Checkpoint the current state unless its weights are non-finite (then: the newest good one)."""
        if not self._weights_finite():
            return find_latest_checkpoint(self.output_dir)
        return self.save_checkpoint(export_fn)

    def _evaluate(self, eval_fn) -> dict[str, float]:
        self.model.eval()
        with torch.no_grad():
            metrics = eval_fn(self, self.model)
        self.model.train()
        scalars = {f"eval/{k}": v for k, v in metrics.items() if isinstance(v, (int, float))}
        if scalars:
            self.log(scalars)
        return metrics

    def _stop_requested(self) -> bool:
        flag = torch.tensor(float(self._stop.requested), device=self.accelerator.device)
        if self.accelerator.num_processes > 1:
            flag = self.accelerator.reduce(flag, reduction="sum")
        return bool(flag.item() > 0)


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


def _stdout_is_terminal() -> bool:
    try:
        return sys.stdout.isatty()
    except (AttributeError, ValueError):
        return False


def _format_duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    seconds = int(round(seconds))
    h, rem = divmod(seconds, 3600)
    m, sec = divmod(rem, 60)
    return f"{h:d}:{m:02d}:{sec:02d}"


def _use_cpu_forced() -> bool:
    return os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes")


#: bf16 autocast is chosen on a CPU only where its matmuls and convolutions ran at least this much
#: faster than fp32: norms, elementwise ops and the casts autocast adds gain nothing from bf16, so a
#: GEMM speed-up near 1 still means slower training steps (benchmarks/precision.py).
CPU_BF16_MIN_SPEEDUP = 1.2


def precision_cache_path() -> Path:
    """Where CPU precision measurements are kept: ``$XDG_CACHE_HOME/hybridvision/precision.json``
    (``~/.cache`` by default). Delete it to measure again."""
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(root) / "hybridvision" / "precision.json"


def cpu_signature() -> str:
    """What a CPU precision measurement depends on: CPU model, its ISA flags, torch, threads."""
    model, flags = "", ""
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                key, _, value = line.partition(":")
                if key.strip() == "model name" and not model:
                    model = value.strip()
                elif key.strip() == "flags" and not flags:
                    flags = value.strip()
                if model and flags:
                    break
    except OSError:  # not Linux
        pass
    import hashlib
    import platform

    digest = hashlib.sha1(" ".join(sorted(flags.split())).encode()).hexdigest()[:12]
    model = model or platform.processor() or platform.machine() or "unknown CPU"
    return f"{model} | flags {digest} | torch {torch.__version__} | {torch.get_num_threads()} threads"


def measure_cpu_bf16_speedup(reps: int = 5) -> float:
    """fp32 time over bf16-autocast time of typical training shapes on this CPU (above 1: bf16 is faster).

    Two ``nn.Linear`` calls of a Swin/ViT MLP ((2048, 192) -> 768 -> 192) and a 3x3 convolution of a
    U-Net stage ((2, 64, 32, 32)), forward only, autocast casts included; the best of ``reps``
    interleaved runs of each (the least disturbed by other processes). A few hundred ms on one thread.
    """
    import torch.nn.functional as F

    g = torch.Generator().manual_seed(0)
    x = torch.randn(2048, 192, generator=g)
    w1, w2 = torch.randn(768, 192, generator=g), torch.randn(192, 768, generator=g)
    image, kernel = torch.randn(2, 64, 32, 32, generator=g), torch.randn(64, 64, 3, 3, generator=g)

    def ops() -> None:
        F.linear(F.linear(x, w1), w2)
        F.conv2d(image, kernel, padding=1)

    best = {False: math.inf, True: math.inf}
    with torch.no_grad():
        for rep in range(reps + 1):
            for bf16 in (False, True):
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                    start = time.perf_counter()
                    ops()
                    elapsed = time.perf_counter() - start
                if rep:  # the first run of each warms up oneDNN's kernel caches
                    best[bf16] = min(best[bf16], elapsed)
    return best[False] / best[True]


def _cached_cpu_bf16_speedup(measure: Callable[[], float], path: Path) -> tuple[float, str]:
    """(speedup, where it came from): the cached figure for :func:`cpu_signature`, else ``measure()``
    stored there. Processes of one machine starting together (a multi-process launch) take a file
    lock, so one measures (undisturbed) and the others read its figure: every rank picks the same."""
    key = cpu_signature()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        lock = open(path.with_name(path.name + ".lock"), "a")  # noqa: SIM115 (closed below)
    except OSError as exc:
        return float(measure()), f"measured now, not cached: {exc}"
    with lock:
        try:
            import fcntl

            fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file is closed
        except (ImportError, OSError):  # Windows, or a file system without locks
            pass
        try:
            cache = json.loads(path.read_text())
            cache = cache if isinstance(cache, dict) else {}
        except (OSError, ValueError):
            cache = {}
        entry = cache.get(key)
        if isinstance(entry, dict) and isinstance(entry.get("bf16_speedup"), (int, float)):
            return float(entry["bf16_speedup"]), f"measured {entry.get('measured', '?')}, cached in {path}"
        speedup = float(measure())
        cache[key] = {"bf16_speedup": round(speedup, 3), "measured": time.strftime("%Y-%m-%d")}
        try:
            write_json_atomic(path, cache)
        except OSError as exc:
            return speedup, f"measured now, not cached: {exc}"
        return speedup, f"measured now, cached in {path}"


def resolve_mixed_precision(
    measure: Callable[[], float] | None = None, cache_path: Path | None = None
) -> tuple[str, str]:
    """``train.mixed_precision=auto``: the autocast mode that trains fastest here, and why.

    GPU: ``bf16`` where supported (Ampere and later), else ``fp16`` (with GradScaler). CPU: measured,
    since the ISA flags do not tell (bf16 GEMMs ran 2x faster than fp32 on one AVX512-BF16 CPU and
    0.6x on another): ``bf16`` where bf16 matmuls and convolutions ran at least
    :data:`CPU_BF16_MIN_SPEEDUP` times faster than fp32, else ``no``. The figure is measured once per
    machine (:func:`cpu_signature`) and cached in :func:`precision_cache_path`.

    Args:
        measure: returns fp32 time / bf16 time; default :func:`measure_cpu_bf16_speedup`.
        cache_path: the cache file; default :func:`precision_cache_path`.
    """
    if torch.cuda.is_available() and not _use_cpu_forced():
        if torch.cuda.is_bf16_supported():
            return "bf16", "GPU with bf16 support"
        return "fp16", "GPU without bf16 support: fp16 with loss scaling"
    speedup, source = _cached_cpu_bf16_speedup(
        measure or measure_cpu_bf16_speedup, cache_path or precision_cache_path()
    )
    mode = "bf16" if speedup >= CPU_BF16_MIN_SPEEDUP else "no"
    return mode, (
        f"CPU: bf16 matmuls and convolutions ran at {speedup:.2f}x the fp32 speed, bf16 needs "
        f">= {CPU_BF16_MIN_SPEEDUP}x; {source}"
    )


def _flat_scalars(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Flatten a config to TensorBoard-hparams-friendly scalars."""
    out: dict[str, Any] = {}
    for k, v in tree.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flat_scalars(v, key + "/"))
        elif isinstance(v, (int, float, str, bool)):
            out[key] = v
        elif v is not None:
            out[key] = str(v)
    return out
