"""A tiny training run through :class:`hybridvision.engine.Engine`, used by the engine tests.

Run as a script (also under ``accelerate launch``)::

    python tests/engine/toy_train.py OUTPUT_DIR [key=value ...]

Extra env vars: ``TOY_HANG_AFTER=k`` sleeps forever after optimizer step k (so a test can
SIGKILL the process); ``TOY_RECORD=1`` writes the sample ids and LRs each rank saw to
``OUTPUT_DIR/record_rank{r}.json``; ``TOY_NAN_AT=k`` makes the loss NaN at step k;
``TOY_STEP_SLEEP=s`` sleeps s seconds in every step (so a test can signal mid-run);
``TOY_NANGRAD_AT=k`` adds ``0 * sqrt(0 * pred)`` at step k: a finite loss with a NaN gradient;
``TOY_WORKERS=n`` loads with n DataLoader workers. The record also holds one ``torch.rand`` draw
per step (``draws``: ranks must differ) and the script exits with the engine's exit code.
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import Dataset

from hybridvision.config import OptimConfig, TrainConfig, apply_overrides
from hybridvision.engine import Engine, StepOutput, pending_exit_code


@dataclass
class ToyConfig:
    train: TrainConfig = field(default_factory=TrainConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)


class ToyData(Dataset):
    def __init__(self, n: int = 24, dim: int = 8):
        g = torch.Generator().manual_seed(123)
        self.x = torch.randn(n, dim, generator=g)
        self.y = self.x @ torch.randn(dim, 1, generator=g) + 0.1 * torch.randn(n, 1, generator=g)

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict:
        return {"x": self.x[i], "y": self.y[i], "id": i}


def toy_model(dropout: float = 0.1) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Dropout(dropout), nn.Linear(16, 1))


def main(output_dir: str, overrides: list[str]) -> None:
    cfg = apply_overrides(ToyConfig(), [f"train.output_dir={output_dir}", *overrides])
    engine = Engine(cfg.train, cfg.optim, run_config=cfg, project_name="toy")
    hang_after = int(os.environ.get("TOY_HANG_AFTER", "0"))
    nan_at = int(os.environ.get("TOY_NAN_AT", "0"))
    step_sleep = float(os.environ.get("TOY_STEP_SLEEP", "0"))
    nangrad_at = int(os.environ.get("TOY_NANGRAD_AT", "0"))
    record: dict[str, list] = {"ids": [], "lr": [], "draws": []}

    def step_fn(model: nn.Module, batch: dict) -> StepOutput:
        if hang_after and engine.state.step >= hang_after:
            while True:
                time.sleep(1)
        if step_sleep:
            time.sleep(step_sleep)
        pred = model(batch["x"])
        loss = ((pred - batch["y"]) ** 2).mean()
        if nan_at and engine.state.step + 1 == nan_at:
            loss = loss * float("nan")
        if nangrad_at and engine.state.step + 1 == nangrad_at:
            loss = loss + 0.0 * torch.sqrt(0.0 * pred).sum()  # value 0, gradient 0 * inf = NaN
        if model is getattr(engine, "model", None):  # not the engine's dry run (DDP auto-detection)
            record["ids"].append([int(i) for i in batch["id"]])
            record["lr"].append(engine.optimizer.param_groups[0]["lr"])
            record["draws"].append(float(torch.rand(())))
        return StepOutput(loss=loss, logs={"mse": loss.detach()})

    result = engine.fit(toy_model(), ToyData(), step_fn, num_workers=int(os.environ.get("TOY_WORKERS", "0")))
    if os.environ.get("TOY_RECORD"):
        rank = engine.accelerator.process_index
        Path(output_dir, f"record_rank{rank}.json").write_text(json.dumps(record))
    engine.print(f"done step={result['step']} skipped={result['skipped_nonfinite']}")
    engine.close()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
    sys.exit(pending_exit_code())
