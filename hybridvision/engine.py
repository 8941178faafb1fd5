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
highest ``step`` recorded in its ``trainer_state.json``.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.utils import (
    DataLoaderConfiguration,
    DistributedDataParallelKwargs,
    GradientAccumulationPlugin,
    ProjectConfiguration,
    set_seed,
)
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, IterableDataset

from .config import ConfigError, OptimConfig, TrainConfig, save_config
from .io import write_json_atomic
from .optim import build_optimizer, build_scheduler

__all__ = [
    "Engine",
    "StepOutput",
    "NonFiniteLossError",
    "find_latest_checkpoint",
    "shutdown_distributed",
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


def find_latest_checkpoint(output_dir: str | os.PathLike) -> Path | None:
    """Newest complete checkpoint under ``output_dir/checkpoints`` (by the recorded step), or None."""
    root = Path(output_dir) / CHECKPOINT_DIR
    best: tuple[int, Path] | None = None
    if not root.is_dir():
        return None
    for path in root.iterdir():
        state = path / STATE_FILE
        if path.name.startswith(".") or not state.is_file():
            continue
        try:
            step = int(json.loads(state.read_text())["step"])
        except (ValueError, KeyError, json.JSONDecodeError):
            continue
        if best is None or step > best[0]:
            best = (step, path)
    return best[1] if best else None


class _StopFlag:
    """SIGINT/SIGTERM → finish the current step, checkpoint, exit cleanly."""

    def __init__(self) -> None:
        self.requested = False
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


class Engine:
    """Accelerate training loop.

    Args:
        train: the ``train.*`` section.
        optim: the ``optim.*`` section.
        run_config: the stage's full resolved config (saved next to every checkpoint).
        project_name: tracker run name.
        find_unused_parameters: DDP option for models whose step leaves some parameters without a
            gradient (e.g. contrastive pretraining reads only the last stage of the encoder).
    """

    def __init__(
        self,
        train: TrainConfig,
        optim: OptimConfig,
        run_config: Any = None,
        project_name: str = "run",
        find_unused_parameters: bool = False,
    ):
        self.cfg = train
        self.optim_cfg = optim
        self.run_config = run_config
        self.output_dir = Path(train.output_dir)
        trackers = [t for t in train.trackers if t != "none"]
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
            kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=find_unused_parameters)],
        )
        set_seed(train.seed, device_specific=False)
        self.project_name = project_name
        self.state = TrainerState()
        self._stop = _StopFlag()
        self._trackers_started = False
        self._closed = False

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
        """A DataLoader with a seeded generator; ``fit``/``prepare`` shard it across processes."""
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
        )

    def prepare_loader(self, loader: DataLoader) -> DataLoader:
        """Shard a loader across processes (datasets that shard themselves are only device-placed)."""
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
            )
        return self.accelerator.prepare_data_loader(loader)

    # ------------------------------------------------------------------ checkpoints

    def _checkpoint_root(self) -> Path:
        return self.output_dir / CHECKPOINT_DIR

    def save_checkpoint(self, export_fn: Callable[[nn.Module, Path], None] | None = None) -> Path:
        """Write a complete checkpoint for the current step atomically; keep the last K."""
        acc = self.accelerator
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

    def _prune_checkpoints(self) -> None:
        root = self._checkpoint_root()
        done = []
        for path in root.iterdir():
            if path.name.startswith("."):
                continue
            try:
                done.append((int(json.loads((path / STATE_FILE).read_text())["step"]), path))
            except (OSError, ValueError, KeyError, json.JSONDecodeError):
                continue
        for _, path in sorted(done)[: -self.cfg.keep_last]:
            shutil.rmtree(path, ignore_errors=True)

    def _resolve_resume(self) -> Path | None:
        resume = self.cfg.resume
        if resume == "never":
            return None
        if resume == "auto":
            return find_latest_checkpoint(self.output_dir)
        path = Path(resume)
        if (path / STATE_FILE).is_file():
            return path
        latest = find_latest_checkpoint(path)
        if latest is None:
            raise ConfigError(
                f"train.resume={resume!r}: no complete checkpoint there (expected {STATE_FILE} in it or "
                f"in {path}/{CHECKPOINT_DIR}/step_*)"
            )
        return latest

    def load_checkpoint(self, path: Path) -> None:
        self.accelerator.load_state(str(path))
        self.state = TrainerState(**json.loads((path / STATE_FILE).read_text()))
        self.print(f"resumed from {path} at step {self.state.step}")

    # ------------------------------------------------------------------ data iteration

    def _batches(self, loader: DataLoader) -> Iterator[Any]:
        """Yield micro-batches forever, starting at the saved (epoch, position) without replay."""
        iterable = isinstance(loader.dataset, IterableDataset)
        while True:
            if hasattr(loader, "set_epoch"):
                loader.set_epoch(self.state.epoch)
            skip = self.state.batch_in_epoch
            if skip and not iterable:
                epoch_loader = self.accelerator.skip_first_batches(loader, skip)
                if hasattr(epoch_loader, "set_epoch"):
                    epoch_loader.set_epoch(self.state.epoch)
            else:
                epoch_loader = loader
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
            train_data: a Dataset (a shuffled, seeded loader is built) or a ready DataLoader.
            step_fn: ``(prepared_model, batch) -> StepOutput``; runs under autocast.
            eval_fn: ``(engine, prepared_model) -> metrics``; called every ``train.eval_every`` steps
                and at the end, on every process (it must gather across processes itself).
            export_fn: ``(unwrapped_model, directory)`` writing the exportable model; called on the
                main process at every checkpoint (``<checkpoint>/export``).
            on_step_end: ``(engine)`` called after every optimizer step (e.g. an EMA update).
            optimizer: defaults to :func:`build_optimizer` over ``model``'s parameters.

        Returns:
            ``{"step", "final_metrics", "checkpoint", "skipped_nonfinite", "interrupted"}``.
        """
        cfg, acc = self.cfg, self.accelerator
        if isinstance(train_data, DataLoader):
            loader = train_data
        else:
            loader = self.build_loader(
                train_data, cfg.batch_size, True, num_workers, persistent_workers, pin_memory, drop_last=True
            )
        optimizer = optimizer or build_optimizer(model, self.optim_cfg)
        scheduler = build_scheduler(optimizer, self.optim_cfg, cfg.max_steps)
        self.model, self.optimizer, self.scheduler = acc.prepare(model, optimizer, scheduler)
        loader = self.prepare_loader(loader)

        resume_from = self._resolve_resume()
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
        return result

    def flush_trackers(self) -> None:
        """Write what the trackers hold to disk without closing them (logging may continue)."""
        for tracker in self.accelerator.trackers:
            writer = getattr(tracker, "writer", None)
            if writer is not None and hasattr(writer, "flush"):
                writer.flush()

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

    def _loop(self, loader, step_fn, eval_fn, export_fn, on_step_end) -> dict[str, Any]:
        cfg, acc = self.cfg, self.accelerator
        model, optimizer, scheduler = self.model, self.optimizer, self.scheduler
        global_batch = cfg.batch_size * acc.num_processes
        batches = self._batches(loader)
        bar = None
        if cfg.progress_bar and acc.is_local_main_process and self.state.step < cfg.max_steps:
            from tqdm.auto import tqdm

            bar = tqdm(
                total=cfg.max_steps, initial=self.state.step, desc=self.project_name, dynamic_ncols=True
            )

        window_loss = torch.zeros((), device=acc.device)
        window_terms: dict[str, Tensor] = {}
        window_steps = 0
        t0 = time.perf_counter()
        seen0 = self.state.images_seen
        metrics: dict[str, float] = {}
        last_ckpt: Path | None = None
        interrupted = False
        last_images: dict[str, Tensor] | None = None

        model.train()
        while self.state.step < cfg.max_steps:
            bad_window = False
            step_loss = torch.zeros((), device=acc.device)
            grad_norm = None
            for _ in range(cfg.grad_accum_steps):
                batch = next(batches)
                with acc.accumulate(model):
                    out = step_fn(model, batch)
                    finite = torch.isfinite(out.loss.detach()).float()
                    if acc.num_processes > 1:
                        finite = acc.reduce(finite, reduction="mean")  # every rank takes the same branch
                    if finite.item() < 1.0:
                        bad_window = True
                    if not bad_window:
                        acc.backward(out.loss)
                    if acc.sync_gradients and not bad_window:
                        if cfg.grad_clip > 0:
                            grad_norm = acc.clip_grad_norm_(model.parameters(), cfg.grad_clip)
                        optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                step_loss += out.loss.detach() / cfg.grad_accum_steps
                for k, v in out.logs.items():  # kept as tensors: no device sync per step
                    v = v.detach() if isinstance(v, Tensor) else torch.tensor(float(v))
                    window_terms[k] = window_terms.get(k, 0.0) + v / cfg.grad_accum_steps
                if out.images is not None:
                    last_images = out.images
                self.state.images_seen += global_batch

            if bad_window:
                if not cfg.skip_nonfinite:
                    path = self.save_checkpoint(export_fn) if self.state.step > 0 else None
                    where = f"; the last good state is saved in {path}" if path else ""
                    raise NonFiniteLossError(
                        f"non-finite loss ({out.loss.item()}) at step {self.state.step + 1}{where}. "
                        "Lower optim.lr, use train.mixed_precision=bf16 instead of fp16, or set "
                        "train.skip_nonfinite=true to skip such steps."
                    )
                self.state.skipped_nonfinite += 1
                logger.warning(
                    f"skipped step {self.state.step + 1}: non-finite loss "
                    f"({self.state.skipped_nonfinite} skipped so far)",
                    main_process_only=True,
                )
                if self.state.skipped_nonfinite > cfg.max_nonfinite:
                    path = self.save_checkpoint(export_fn)
                    raise NonFiniteLossError(
                        f"{self.state.skipped_nonfinite} steps skipped for non-finite losses "
                        f"(> train.max_nonfinite={cfg.max_nonfinite}); state saved in {path}"
                    )
            else:
                window_loss += step_loss
                window_steps += 1
            scheduler.step()
            self.state.step += 1
            step = self.state.step
            if on_step_end is not None:
                on_step_end(self)

            if bar is not None:
                bar.update(1)
            if step % cfg.log_every == 0 or step == cfg.max_steps:
                elapsed = max(time.perf_counter() - t0, 1e-9)
                mean_loss = acc.reduce(window_loss, reduction="mean").item() / max(window_steps, 1)
                ips = (self.state.images_seen - seen0) / elapsed
                logs = {
                    "train/loss": mean_loss,
                    "train/lr": optimizer.param_groups[0]["lr"],
                    "train/images_per_s": ips,
                    "train/epoch": self.state.epoch,
                    "train/skipped_nonfinite": self.state.skipped_nonfinite,
                }
                if grad_norm is not None:
                    logs["train/grad_norm"] = float(grad_norm)
                n = max(window_steps, 1)
                logs.update({f"train/{k}": float(v) / n for k, v in window_terms.items()})
                self.log(logs, step)
                if bar is not None:
                    bar.set_postfix(loss=f"{mean_loss:.4f}", lr=f"{logs['train/lr']:.2e}", img_s=f"{ips:.1f}")
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
                self.print(
                    f"\nstopped by signal after step {step}; checkpoint saved to {last_ckpt}.\n"
                    f"resume with the same command (train.resume=auto, train.output_dir={self.output_dir})"
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


def _use_cpu_forced() -> bool:
    return os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes")


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
