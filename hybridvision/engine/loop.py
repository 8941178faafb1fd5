"""The training loop: :class:`Engine` and its ``fit``.

``fit`` prepares the model, optimizer, schedule and loader with Accelerate, resumes from
``train.resume`` when asked, then runs optimizer steps until ``train.max_steps``; after each step it
logs, evaluates and checkpoints when due, and stops cleanly on SIGINT/SIGTERM. The parts it calls
live next to it: :mod:`.step`, :mod:`.checkpoints`, :mod:`.loaders`, :mod:`.signals`,
:mod:`.trackers`, :mod:`.distributed`, :mod:`.precision`.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
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
from torch.utils.data import DataLoader, Dataset

from ..config import OptimConfig, TrainConfig, save_config
from ..io import write_json_atomic
from ..optim import build_optimizer, build_scheduler
from . import checkpoints, loaders
from .checkpoints import TrainerState, find_latest_checkpoint, weights_finite
from .distributed import any_rank, decide_find_unused, mean_over_ranks, uses_ddp
from .ema import build_ema
from .precision import settle_mixed_precision
from .seeding import EpochSeeded
from .signals import StopFlag, exit_code, record_exit_code
from .step import NonFiniteLossError, StepOutput, StepResult, optimizer_step
from .trackers import LossWindow, Progress, Trackers

logger = get_logger(__name__)


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
        # resolved once, into a copy; the saved run config records the mode used
        train, precision_note = settle_mixed_precision(train)
        if dataclasses.is_dataclass(run_config) and isinstance(
            getattr(run_config, "train", None), TrainConfig
        ):
            run_config = dataclasses.replace(run_config, train=train)  # type: ignore[type-var]
        self.cfg = train
        self.optim_cfg = optim
        self.run_config = run_config
        self.output_dir = Path(train.output_dir)
        self.find_unused_parameters = find_unused_parameters
        self.accelerator = _build_accelerator(train, self.output_dir, find_unused_parameters is True)
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
        self.trackers = Trackers(self.accelerator, train.trackers, project_name, run_config)
        self.state = TrainerState()
        self._stop = StopFlag()
        self._resume_resolved = False
        self._resume_path: Path | None = None
        self._seeded: EpochSeeded | None = None

    # ------------------------------------------------------------------ helpers

    @property
    def is_main(self) -> bool:
        """Whether this is the global main process (rank 0)."""
        return self.accelerator.is_main_process

    def print(self, *args: Any) -> None:
        """Print on the main process only."""
        self.accelerator.print(*args)

    def log(self, values: dict[str, Any], step: int | None = None) -> None:
        """Log scalars to the trackers (main process writes)."""
        self.trackers.log(values, self.state.step if step is None else step)

    def log_images(self, images: dict[str, Tensor], step: int | None = None) -> None:
        """Log ``name -> (3, H, W)`` images to TensorBoard (main process only)."""
        self.trackers.log_images(images, self.state.step if step is None else step)

    def build_ema(self, model: nn.Module, decay: float) -> nn.Module:
        """An EMA of ``model``'s weights on the training device, saved and resumed with the run.

        See :func:`hybridvision.engine.ema.build_ema`; call ``ema.update_parameters(unwrapped_model)``
        in ``fit``'s ``on_step_end`` and evaluate ``ema.module``.
        """
        return build_ema(self.accelerator, model, decay)

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
        shard the loader across processes. Fewer samples than one batch per process are repeated
        until they fill one.
        """
        rank = self.accelerator.process_index
        return loaders.build_loader(
            dataset,
            self.cfg.seed,
            rank,
            batch_size,
            shuffle,
            num_workers,
            persistent_workers,
            pin_memory,
            drop_last,
            world_size=self.accelerator.num_processes,
        )

    def prepare_loader(self, loader: DataLoader) -> DataLoader:
        """Shard a loader across processes (datasets that shard themselves are only device-placed)."""
        return loaders.prepare_loader(self.accelerator, loader)

    def flush_trackers(self) -> None:
        """Write what the trackers hold to disk without closing them (logging may continue)."""
        self.trackers.flush()

    def close_interrupted(self, result: dict[str, Any]) -> None:
        """End a run ``fit`` stopped by a signal, then :meth:`close`.

        ``<output_dir>/metrics.json`` says it is partial (step, checkpoint) instead of holding
        metrics. Stages write no final model
        in that case; the engine has already printed the command that resumes.
        """
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
        self.trackers.close()

    # ------------------------------------------------------------------ checkpoints

    def save_checkpoint(self, export_fn: Callable[[nn.Module, Path], None] | None = None) -> Path:
        """Write a complete checkpoint for the current step atomically; keep the last K.

        Raises:
            NonFiniteLossError: the weights hold NaN/inf (checked on every rank): nothing is written, so
                no checkpoint with broken weights ever looks like a good state.
        """
        acc = self.accelerator
        if not weights_finite(acc, getattr(self, "model", None)):
            last = find_latest_checkpoint(self.output_dir)
            raise NonFiniteLossError(
                f"the weights are non-finite at step {self.state.step}; not saving them. "
                + (f"The last good state is {last}." if last else "No earlier checkpoint exists.")
            )

        def export(directory: Path) -> None:
            assert export_fn is not None  # only passed on when export_fn is set
            export_fn(acc.unwrap_model(self.model), directory)

        return checkpoints.write_checkpoint(
            acc,
            self.output_dir,
            self.state,
            self.run_config,
            self.cfg.keep_last,
            export if export_fn else None,
        )

    def _prune_checkpoints(self) -> None:
        """Delete readable checkpoints beyond the newest ``train.keep_last``; never an unreadable one."""
        checkpoints.prune_checkpoints(self.output_dir, self.cfg.keep_last)

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
            self._resume_path = checkpoints.resolve_resume(self.cfg.resume, self.output_dir)
            self._resume_resolved = True
        return self._resume_path

    def load_checkpoint(self, path: Path) -> None:
        """Restore model, optimizer, scheduler, RNG and trainer state from ``path``.

        Raises:
            ConfigError: the checkpoint was written by another model, class count or optimizer, or its
                ``trainer_state.json`` is unreadable; the message names the directory and the setting.
        """
        self.state = checkpoints.load_checkpoint(self.accelerator, self.optimizer, path, self.run_config)
        self.print(f"resumed from {path} at step {self.state.step}")

    def resume_command(self) -> str:
        """The command line that continues this run from its newest checkpoint."""
        return checkpoints.resume_command(self.cfg.resume, self.output_dir, self.accelerator.num_processes)

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
            num_workers: DataLoader workers when ``train_data`` is a Dataset.
            persistent_workers: keep those workers alive between epochs.
            pin_memory: pin host memory in that loader.

        Returns:
            ``{"step", "final_metrics", "checkpoint", "skipped_nonfinite", "interrupted", "signal",
            "exit_code", "resume_command"}``; ``exit_code`` is 0, or 130/143 after SIGINT/SIGTERM
            (see :func:`pending_exit_code`).
        """
        if not isinstance(train_data, DataLoader):
            train_data = self.build_loader(
                train_data,
                self.cfg.batch_size,
                True,
                num_workers,
                persistent_workers,
                pin_memory,
                drop_last=True,
            )
        loader = self._prepare(model, train_data, step_fn, optimizer)
        self._resume_or_start()
        self._stop.install()
        try:
            result = self._loop(loader, step_fn, eval_fn, export_fn, on_step_end)
        finally:
            self._stop.restore()
            self.flush_trackers()
        result["signal"] = self._stop.signum if result["interrupted"] else None
        result["exit_code"] = exit_code(result)
        result["resume_command"] = self.resume_command() if result["interrupted"] else None
        record_exit_code(result["exit_code"])
        return result

    def _prepare(
        self, model: nn.Module, loader: DataLoader, step_fn: Callable, optimizer: torch.optim.Optimizer | None
    ) -> DataLoader:
        """Build the optimizer and schedule, settle DDP's options, hand everything to Accelerate."""
        cfg, acc = self.cfg, self.accelerator
        if isinstance(loader.dataset, EpochSeeded):
            self._seeded = loader.dataset
        optimizer = optimizer or build_optimizer(model, self.optim_cfg)
        scheduler = build_scheduler(optimizer, self.optim_cfg, cfg.max_steps)
        self.optimizer = optimizer
        if self.find_unused_parameters == "auto" and uses_ddp(acc):
            decide_find_unused(acc, model, loader, step_fn)
        self.model, self.optimizer, self.scheduler = acc.prepare(model, optimizer, scheduler)
        loader = self.prepare_loader(loader)
        # a different stream per rank (masks, dropout, drop-path); restored per process on resume
        set_seed(cfg.seed, device_specific=True)
        return loader

    def _resume_or_start(self) -> None:
        """Load the checkpoint ``train.resume`` names, or record the run config of a fresh run."""
        resume_from = self.resume_checkpoint
        if resume_from is not None:
            self.load_checkpoint(resume_from)
        elif self.accelerator.is_main_process:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            if self.run_config is not None:
                save_config(self.run_config, self.output_dir / "run_config.yaml")
        self.trackers.start()

    def _loop(self, loader, step_fn, eval_fn, export_fn, on_step_end) -> dict[str, Any]:
        """Optimizer steps until ``train.max_steps`` or a stop request; then the final evaluation."""
        cfg = self.cfg
        batches = loaders.endless_batches(loader, self.state, self.accelerator, self._seeded)
        progress = Progress(
            self.accelerator, self.project_name, cfg.max_steps, self.state.step, cfg.progress_bar
        )
        window = LossWindow(self.accelerator.device, self.state.images_seen)
        metrics: dict[str, float] = {}
        last_ckpt: Path | None = None
        last_images: dict[str, Tensor] | None = None
        interrupted = False

        self.model.train()
        while self.state.step < cfg.max_steps:
            done = optimizer_step(
                self.accelerator, self.model, self.optimizer, batches, step_fn, cfg, self.state
            )
            last_images = done.images if done.images is not None else last_images
            if done.bad_reason:
                self._skip_nonfinite(done.bad_reason, export_fn)
            else:  # only steps that updated the weights enter the logged means
                window.add(done.loss, done.terms)
            self.scheduler.step()
            self.state.step += 1
            step = self.state.step
            if on_step_end is not None:
                on_step_end(self)

            progress.advance()
            if step % cfg.log_every == 0 or step == cfg.max_steps:
                self._log_window(window, progress, done)
            if last_images is not None and cfg.log_images_every and step % cfg.log_images_every == 0:
                self.log_images(last_images, step)
            if eval_fn is not None and cfg.eval_every and step % cfg.eval_every == 0 and step < cfg.max_steps:
                metrics = self._evaluate(eval_fn)

            stop = any_rank(self.accelerator, self._stop.requested)
            if step % cfg.ckpt_every == 0 or step == cfg.max_steps or stop:
                last_ckpt = self.save_checkpoint(export_fn)
            if stop:
                interrupted = True
                self.print(
                    f"\nstopped by {self._stop.name()} after step {step}/{cfg.max_steps}; checkpoint saved to "
                    f"{last_ckpt}; outputs are partial.\nresume with: {self.resume_command()}"
                )
                break

        progress.close()
        if not interrupted and eval_fn is not None:
            metrics = self._evaluate(eval_fn)
        return {
            "step": self.state.step,
            "final_metrics": metrics,
            "checkpoint": last_ckpt if last_ckpt is not None else find_latest_checkpoint(self.output_dir),
            "skipped_nonfinite": self.state.skipped_nonfinite,
            "interrupted": interrupted,
        }

    def _skip_nonfinite(self, reason: str, export_fn) -> None:
        """Count a step skipped for ``reason``; raise (after saving what is good) unless allowed.

        Raises:
            NonFiniteLossError: ``train.skip_nonfinite`` is off, or more than ``train.max_nonfinite``
                steps were skipped.
        """
        cfg = self.cfg
        if not cfg.skip_nonfinite:
            path = self._save_if_good(export_fn) if self.state.step > 0 else None
            where = f"; the last good state is saved in {path}" if path else ""
            raise NonFiniteLossError(
                f"{reason} at step {self.state.step + 1}{where}. "
                "Lower optim.lr, use train.mixed_precision=bf16 instead of fp16, or set "
                "train.skip_nonfinite=true to skip such steps."
            )
        self.state.skipped_nonfinite += 1
        logger.warning(
            f"skipped step {self.state.step + 1}: {reason} ({self.state.skipped_nonfinite} skipped so far)",
            main_process_only=True,
        )
        if self.state.skipped_nonfinite > cfg.max_nonfinite:
            path = self._save_if_good(export_fn)
            raise NonFiniteLossError(
                f"{self.state.skipped_nonfinite} steps skipped for non-finite losses or gradients "
                f"(> train.max_nonfinite={cfg.max_nonfinite}); state saved in {path}"
            )

    def _log_window(self, window: LossWindow, progress: Progress, last: StepResult) -> None:
        """Log the means over the window that ends at this step (on every rank: a collective), then reset it."""
        step = self.state.step
        now = time.perf_counter()
        ips = (self.state.images_seen - window.images_seen) / max(now - window.start, 1e-9)
        logs: dict[str, float] = {
            "train/lr": last.lr,  # the LR this step was taken with
            "train/images_per_s": ips,
            "train/epoch": self.state.epoch,
            "train/skipped_nonfinite": self.state.skipped_nonfinite,
        }
        reduced = mean_over_ranks(self.accelerator, {"__loss__": window.loss, **window.terms})
        mean_loss = reduced.pop("__loss__") / window.steps if window.steps else None
        if mean_loss is not None:  # a window of skipped steps only has no loss to report
            logs["train/loss"] = mean_loss
            logs.update({f"train/{k}": v / window.steps for k, v in reduced.items()})
        if last.grad_norm is not None and torch.isfinite(torch.as_tensor(last.grad_norm)):
            logs["train/grad_norm"] = float(last.grad_norm)
        self.log(logs, step)
        loss_text = f"{mean_loss:.4f}" if mean_loss is not None else "n/a (skipped)"
        progress.show(step, loss_text, last.lr, ips, now)
        window.reset(self.state.images_seen)

    def _save_if_good(self, export_fn) -> Path | None:
        """Checkpoint the current state unless its weights are non-finite (then: the newest good one)."""
        if not weights_finite(self.accelerator, getattr(self, "model", None)):
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


def _build_accelerator(train: TrainConfig, output_dir: Path, find_unused_parameters: bool) -> Accelerator:
    """The run's Accelerator: precision, accumulation, trackers, seeded sampling and DDP options."""
    trackers = [t for t in train.trackers if t != "none"]
    return Accelerator(
        mixed_precision=train.mixed_precision,
        # the window never straddles an epoch end: we count optimizer steps, not epochs
        gradient_accumulation_plugin=GradientAccumulationPlugin(
            num_steps=train.grad_accum_steps, sync_with_dataloader=False
        ),
        log_with=trackers or None,
        project_config=ProjectConfiguration(
            project_dir=str(output_dir), logging_dir=str(output_dir / "logs")
        ),
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=train.seed),
        step_scheduler_with_optimizer=False,
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=find_unused_parameters)],
    )
