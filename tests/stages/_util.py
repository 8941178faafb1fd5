"""Helpers to run the stage scripts as a user would (subprocess, exit code, stderr)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
QUIET = ["train.progress_bar=false", "train.trackers=[]"]


def run_stage(
    script: str,
    *args: str,
    cwd: Path | None = None,
    env: dict | None = None,
    launch: list[str] | None = None,
    timeout: int = 600,
) -> subprocess.CompletedProcess:
    cmd = (launch or [sys.executable]) + [str(ROOT / script), *args]
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run(cmd, capture_output=True, text=True, cwd=cwd or ROOT, env=full_env, timeout=timeout)


def tiny_pretrain_args(out: Path) -> list[str]:
    return [
        f"train.output_dir={out}",
        "train.max_steps=2",
        "train.batch_size=4",
        "data.synthetic_samples=16",
        "probe.train_images=4",
        "probe.val_images=4",
        "train.eval_every=0",
        *QUIET,
    ]


def tiny_finetune_args(out: Path) -> list[str]:
    return [
        f"train.output_dir={out}",
        "train.max_steps=2",
        "train.batch_size=4",
        "data.synthetic_samples=16",
        "data.synthetic_val_samples=5",
        "train.eval_every=0",
        *QUIET,
    ]
