"""What a run reports: trackers (TensorBoard, ...), the progress bar or plain lines, windowed means."""

from __future__ import annotations

import math
import sys
import time
from typing import Any

import torch
from accelerate import Accelerator
from torch import Tensor


def flat_scalars(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Flatten a config to TensorBoard-hparams-friendly scalars."""
    out: dict[str, Any] = {}
    for k, v in tree.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flat_scalars(v, key + "/"))
        elif isinstance(v, (int, float, str, bool)):
            out[key] = v
        elif v is not None:
            out[key] = str(v)
    return out


class Trackers:
    """The run's trackers, started on first use with the run config as hyper-parameters.

    Args:
        accelerator: owns the trackers (``log_with``); the main process writes.
        names: ``train.trackers`` (images go to ``tensorboard`` only).
        project_name: tracker run name.
        run_config: the stage's resolved config, recorded as flat hyper-parameters.
    """

    def __init__(
        self, accelerator: Accelerator, names: list[str], project_name: str, run_config: Any
    ) -> None:
        self.accelerator = accelerator
        self.names = names
        self.project_name = project_name
        self.run_config = run_config
        self.started = False
        self.closed = False

    def start(self) -> None:
        """Start the trackers once, with the flattened run config as hyper-parameters (no-op without trackers)."""
        if not self.started and self.accelerator.log_with:
            from ..config import config_to_dict

            hparams = flat_scalars(config_to_dict(self.run_config)) if self.run_config is not None else {}
            self.accelerator.init_trackers(self.project_name, config=hparams)
            self.started = True

    def log(self, values: dict[str, Any], step: int) -> None:
        """Log scalars (tensors are read with ``.item()``); nothing once closed."""
        if not self.accelerator.log_with or self.closed:
            return
        self.start()
        clean = {k: (v.item() if isinstance(v, Tensor) else v) for k, v in values.items()}
        self.accelerator.log(clean, step=step)

    def log_images(self, images: dict[str, Tensor], step: int) -> None:
        """Log ``name -> (3, H, W)`` images in [0, 1] to TensorBoard (main process only)."""
        if not self.accelerator.is_main_process or "tensorboard" not in self.names or self.closed:
            return
        self.start()
        writer = self.accelerator.get_tracker("tensorboard", unwrap=True)
        for name, img in images.items():
            writer.add_image(name, img.detach().float().clamp(0, 1).cpu(), step)

    def flush(self) -> None:
        """Write what the trackers hold to disk without closing them (logging may continue)."""
        for tracker in self.accelerator.trackers:
            writer = getattr(tracker, "writer", None)
            if writer is not None and hasattr(writer, "flush"):
                writer.flush()

    def close(self) -> None:
        """Finish every tracker (event files closed); idempotent, nothing is logged after it."""
        if self.closed:
            return
        self.closed = True
        for tracker in self.accelerator.trackers:
            tracker.finish()
        self.accelerator.trackers = []
        self.started = False


class LossWindow:
    """Sums of the loss and logged terms over the updated steps since the last log line, on the device.

    Kept as tensors: no device sync per step; they are reduced over ranks only when a line is due.
    """

    def __init__(self, device: torch.device, images_seen: int) -> None:
        self.loss = torch.zeros((), device=device)
        self.terms: dict[str, Tensor] = {}
        self.steps = 0
        self.start = time.perf_counter()
        self.images_seen = images_seen

    def add(self, loss: Tensor, terms: dict[str, Tensor]) -> None:
        """Add one updated step's loss and logged terms to the window."""
        self.loss += loss
        self.steps += 1
        for k, v in terms.items():
            self.terms[k] = self.terms.get(k, 0.0) + v

    def reset(self, images_seen: int) -> None:
        """Empty the window after a log line; ``images_seen`` is the count it starts from."""
        self.loss.zero_()
        self.terms.clear()
        self.steps = 0
        self.start = time.perf_counter()
        self.images_seen = images_seen


class Progress:
    """A progress bar on a terminal, else one plain line per log window (a log file, CI, SLURM).

    Shown by the local main process only, and only when steps remain.
    """

    def __init__(
        self, accelerator: Accelerator, name: str, total: int, initial: int, progress_bar: bool
    ) -> None:
        self.accelerator = accelerator
        self.name = name
        self.total = total
        self.initial = initial
        self.bar = None
        self.plain_lines = False
        if accelerator.is_local_main_process and initial < total:
            if progress_bar and stdout_is_terminal():
                from tqdm.auto import tqdm

                self.bar = tqdm(total=total, initial=initial, desc=name, dynamic_ncols=True)
            else:  # one plain line every train.log_every steps
                self.plain_lines = True
        self.start = time.perf_counter()

    def advance(self) -> None:
        """Move the bar on by one optimizer step (no-op without a bar)."""
        if self.bar is not None:
            self.bar.update(1)

    def show(self, step: int, loss_text: str, lr: float, images_per_s: float, now: float) -> None:
        """Show a log window's figures: as the bar's postfix, or as a line with an ETA."""
        if self.bar is not None:
            self.bar.set_postfix(loss=loss_text, lr=f"{lr:.2e}", img_s=f"{images_per_s:.1f}")
        elif self.plain_lines:
            per_step = (now - self.start) / max(step - self.initial, 1)
            eta = format_duration(per_step * (self.total - step))
            self.accelerator.print(
                f"{self.name} step {step}/{self.total} loss {loss_text} lr {lr:.3e} "
                f"{images_per_s:.1f} img/s ETA {eta}",
                flush=True,
            )

    def close(self) -> None:
        """Close the bar, if one is shown."""
        if self.bar is not None:
            self.bar.close()


def stdout_is_terminal() -> bool:
    """Whether stdout is an interactive terminal (False when it is closed or replaced)."""
    try:
        return sys.stdout.isatty()
    except (AttributeError, ValueError):
        return False


def format_duration(seconds: float) -> str:
    """``h:mm:ss``, or ``?`` for an unknown (non-finite) duration."""
    if not math.isfinite(seconds):
        return "?"
    seconds = int(round(seconds))
    h, rem = divmod(seconds, 3600)
    m, sec = divmod(rem, 60)
    return f"{h:d}:{m:02d}:{sec:02d}"
