"""Checkpoints: atomic writes, the trainer state, resume resolution, loading and pruning.

Checkpoint layout (``<output_dir>/checkpoints/step_00000100/``)::

    model.safetensors, optimizer.bin, scheduler.bin, random_states_*.pkl   (Accelerate save_state)
    trainer_state.json     step, epoch, position in the epoch, skipped steps  (the resume source of truth)
    run_config.yaml        the resolved run config
    export/                the stage's exportable model (model.safetensors + config.json)

Each checkpoint is written to a hidden temporary directory and renamed into place, so a
directory named ``step_*`` is always complete; ``train.resume=auto`` picks the one with the
highest ``step`` recorded in its ``trainer_state.json`` (loudly skipping unreadable ones, and
refusing to start over them when none can be read).
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.logging import get_logger
from torch import nn

from ..config import ConfigError, save_config
from ..io import write_json_atomic
from .trackers import flat_scalars

logger = get_logger(__name__)

CHECKPOINT_DIR = "checkpoints"
STATE_FILE = "trainer_state.json"


@dataclass
class TrainerState:
    """Counters saved in every checkpoint; the single source of truth for resuming."""

    step: int = 0  # optimizer steps done
    epoch: int = 0  # epoch of the next micro-batch
    batch_in_epoch: int = 0  # micro-batches of `epoch` already consumed
    skipped_nonfinite: int = 0  # optimizer steps skipped for a non-finite loss
    images_seen: int = 0  # samples consumed over all processes

    def to_json(self) -> dict[str, int]:
        """The counters as a JSON-ready dict (written to ``trainer_state.json``)."""
        return dict(self.__dict__)


def read_step(path: Path) -> int:
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
            readable.append((read_step(path), path))
        except ValueError as exc:
            unreadable.append((path, str(exc)))
    readable.sort()
    return readable, unreadable


def find_latest_checkpoint(output_dir: str | os.PathLike) -> Path | None:
    """Newest readable checkpoint under ``output_dir/checkpoints`` (by the recorded step), or None."""
    readable, _ = scan_checkpoints(output_dir)
    return readable[-1][1] if readable else None


def prune_checkpoints(output_dir: Path, keep_last: int) -> None:
    """Delete readable checkpoints beyond the newest ``keep_last``; never an unreadable one.

    Only checkpoints whose state can be read count towards ``keep_last``, so a newer checkpoint that
    cannot be read never causes an older, good one to be deleted.
    """
    readable, unreadable = scan_checkpoints(output_dir)
    for path, reason in unreadable:
        logger.warning(f"not pruning {path}: {reason}", main_process_only=True)
    for _, path in readable[:-keep_last]:
        shutil.rmtree(path, ignore_errors=True)


def weights_finite(accelerator: Accelerator, model: nn.Module | None) -> bool:
    """Whether every parameter of ``model`` is finite on every rank (no model yet: True)."""
    if model is None:
        return True
    bad = torch.zeros((), device=accelerator.device)
    with torch.no_grad():
        for p in model.parameters():
            if p.numel() and not torch.isfinite(p).all():
                bad += 1
                break
    if accelerator.num_processes > 1:
        bad = accelerator.reduce(bad, reduction="sum")
    return bool(bad.item() == 0)


def write_checkpoint(
    accelerator: Accelerator,
    output_dir: Path,
    state: TrainerState,
    run_config: Any,
    keep_last: int,
    export: Callable[[Path], None] | None = None,
) -> Path:
    """Write a complete checkpoint for ``state.step`` atomically, then keep the newest ``keep_last``.

    Every rank calls it (Accelerate's ``save_state`` and the barriers are collective).

    Args:
        accelerator: saves model, optimizer, scheduler, RNG and registered objects.
        output_dir: the run directory; the checkpoint goes to ``checkpoints/step_<step>``.
        state: the counters written to ``trainer_state.json``.
        run_config: the resolved run config saved as ``run_config.yaml`` (None: not saved).
        keep_last: how many readable checkpoints to keep.
        export: writes the exportable model into the directory given (main process only).

    Returns:
        The checkpoint directory.
    """
    acc = accelerator
    root = output_dir / CHECKPOINT_DIR
    final = root / f"step_{state.step:08d}"
    tmp = root / f".tmp-step_{state.step:08d}"
    if acc.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    acc.wait_for_everyone()
    acc.save_state(str(tmp), safe_serialization=True)
    if export is not None and acc.is_main_process:
        export(tmp / "export")
    acc.wait_for_everyone()
    if acc.is_main_process:
        write_json_atomic(tmp / STATE_FILE, state.to_json())
        if run_config is not None:
            save_config(run_config, tmp / "run_config.yaml")
        _publish(tmp, final)
        prune_checkpoints(output_dir, keep_last)
    acc.wait_for_everyone()
    return final


def _publish(tmp: Path, final: Path) -> None:
    """Flush every file of ``tmp`` to disk, then rename it to ``final`` (replacing an older one)."""
    for path in tmp.rglob("*"):
        if path.is_file():
            with open(path, "rb") as fh:
                os.fsync(fh.fileno())
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)


def resolve_resume(resume: str, output_dir: Path) -> Path | None:
    """The checkpoint ``train.resume`` names (``never``, ``auto`` or a path), or None for a fresh run.

    Raises:
        ConfigError: ``resume`` names no readable checkpoint, or every checkpoint in ``output_dir`` is
            unreadable (the run would otherwise restart at step 0 and prune them).
    """
    if resume == "never":
        return None
    if resume == "auto":
        return _resolve_auto(output_dir)
    path = Path(resume)
    if path.is_dir() and (path / STATE_FILE).exists():
        try:
            read_step(path)
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


def _resolve_auto(output_dir: Path) -> Path | None:
    """``train.resume=auto``: the newest readable checkpoint of ``output_dir`` (None: a fresh run)."""
    readable, unreadable = scan_checkpoints(output_dir)
    if unreadable and not readable:
        names = ", ".join(f"{reason}" for _, reason in unreadable)
        raise ConfigError(
            f"train.resume=auto: no checkpoint in {output_dir / CHECKPOINT_DIR} can be read "
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


def config_differences(run_config: Any, path: Path) -> list[str]:
    """Settings (outside ``train.*``) whose value in ``path/run_config.yaml`` differs from ``run_config``'s."""
    if run_config is None or not (path / "run_config.yaml").is_file():
        return []
    import yaml

    from ..config import config_to_dict

    try:
        saved = flat_scalars(yaml.safe_load((path / "run_config.yaml").read_text()) or {})
    except (OSError, yaml.YAMLError):
        return []
    now = flat_scalars(config_to_dict(run_config))
    diffs = []
    for key in sorted(set(saved) | set(now)):
        if key.split("/")[0] in ("train", "probe", "eval"):
            continue
        if saved.get(key) != now.get(key):
            diffs.append(f"{key.replace('/', '.')}={saved.get(key)!r} there but {now.get(key)!r} now")
    return diffs


def load_checkpoint(
    accelerator: Accelerator, optimizer: torch.optim.Optimizer, path: Path, run_config: Any
) -> TrainerState:
    """Restore model, optimizer, scheduler and RNG from ``path``; return its trainer state.

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
    diffs = config_differences(run_config, path)
    hint = "; use train.resume=never with another train.output_dir, or the settings it was written with"
    groups_before = [set(g) for g in optimizer.param_groups]
    try:
        accelerator.load_state(str(path))
    except Exception as exc:  # a state dict of another shape / optimizer
        what = "; ".join(diffs[:4]) if diffs else f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
        raise ConfigError(
            f"cannot resume from {path}: it was written with another setup ({what}){hint}"
        ) from None
    if [set(g) for g in optimizer.param_groups] != groups_before:
        optim_diffs = [d for d in diffs if d.startswith("optim.")] or diffs
        what = "; ".join(optim_diffs[:4]) or "a different optimizer"
        raise ConfigError(f"cannot resume from {path}: it was written with another optimizer ({what}){hint}")
    return trainer_state


def resume_command(resume: str, output_dir: Path, num_processes: int) -> str:
    """The command line that continues this process's run from its newest checkpoint.

    Args:
        resume: the run's ``train.resume`` (replaced by ``train.resume=auto``).
        output_dir: the run's ``train.output_dir`` (added unless the command line or a config names it).
        num_processes: launched with ``accelerate launch --num_processes`` when above 1.
    """
    args = [a for a in sys.argv[1:] if not a.startswith("train.resume=")]
    if resume != "auto":
        args.append("train.resume=auto")
    if not any(a.startswith("train.output_dir=") for a in args) and "--config" not in args:
        args.append(f"train.output_dir={output_dir}")
    launcher = (
        ["accelerate", "launch", "--num_processes", str(num_processes)]
        if num_processes > 1
        else [Path(sys.executable).name]
    )
    return shlex.join([*launcher, sys.argv[0] if sys.argv and sys.argv[0] else "<script>", *args])
