"""Two-process runs of the stage scripts as a user starts them: default trackers, default workers.

One launch per stage checks everything a multi-process run touches in Accelerate: DDP with
parameters that get no gradient, TensorBoard trackers started and closed on every rank, the
checkpoint (``save_state``), the end of the run (no collective after the process group is gone)
and the exit status.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

from ._util import run_stage

pytestmark = pytest.mark.slow  # each test launches two processes


def _launch() -> list[str]:
    return [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--main_process_port",
        str(29200 + os.getpid() % 300),
    ]


def _event_files(out: Path) -> list[Path]:
    return sorted((out / "logs").rglob("events.out.tfevents.*"))


TINY = ["train.max_steps=3", "train.batch_size=4", "data.synthetic_samples=16", "data.image_size=[32,32]"]


def test_two_process_pretrain_with_unused_parameters_and_tensorboard(tmp_path: Path):
    """MIM with the pixel-shuffle decoder leaves stage norms of ``hybrid_*`` without gradient: DDP
    needs ``find_unused_parameters``, which the engine finds from the model (no objective list)."""
    res = run_stage(
        "pretrain/run.py",
        f"train.output_dir={tmp_path}",
        *TINY,
        "objective.name=mim",
        "objective.mim_decoder=pixel_shuffle",
        "objective.mask_patch_size=8",
        "probe.source=none",
        "train.progress_bar=false",
        env={"ACCELERATE_USE_CPU": "true"},
        launch=_launch(),
    )
    assert res.returncode == 0, res.stderr[-3000:]
    assert "find_unused_parameters=True" in res.stdout
    assert (tmp_path / "encoder" / "model.safetensors").is_file()
    ckpt = tmp_path / "checkpoints" / "step_00000003"
    assert json.loads((ckpt / "trainer_state.json").read_text())["step"] == 3
    assert {p.name for p in ckpt.glob("random_states_*.pkl")} == {
        "random_states_0.pkl",
        "random_states_1.pkl",
    }
    events = _event_files(tmp_path)
    assert events and all(e.stat().st_size > 0 for e in events), "no TensorBoard events written"
    assert "Default process group has not been initialized" not in res.stderr


def test_two_process_finetune_with_ema_eval_and_tensorboard(tmp_path: Path):
    res = run_stage(
        "finetune/run.py",
        f"train.output_dir={tmp_path}",
        *TINY,
        "data.synthetic_val_samples=4",
        "model.ema_decay=0.9",
        "train.progress_bar=false",
        env={"ACCELERATE_USE_CPU": "true"},
        launch=_launch(),
    )
    assert res.returncode == 0, res.stderr[-3000:]
    assert (tmp_path / "model" / "model.safetensors").is_file()
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["step"] == 3 and 0.0 <= metrics["miou"] <= 1.0
    assert (tmp_path / "checkpoints" / "step_00000003" / "trainer_state.json").is_file()
    assert _event_files(tmp_path), "no TensorBoard events written"
    assert "Default process group has not been initialized" not in res.stderr
