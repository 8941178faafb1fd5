"""Bit-identical resume through the stage scripts, mid-epoch, with and without DataLoader workers.

A run killed with SIGKILL right after writing checkpoint ``step_k`` leaves exactly that checkpoint
behind; copying ``step_k`` of an uninterrupted run into a fresh output directory reproduces that
state without the cost of a third run (the SIGKILL mechanics themselves are tested in
``tests/engine/test_engine.py``). The resumed run must end with the same weights and optimizer
state as the uninterrupted one, whatever ``data.num_workers`` it uses.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from ._util import run_stage

pytestmark = pytest.mark.slow  # each test starts the stage script three times

# 16 samples / batch 4 = 4 batches per epoch: steps 3 and 6 both end mid-epoch
COMMON = [
    "train.max_steps=8",
    "train.batch_size=4",
    "data.synthetic_samples=16",
    "data.image_size=[32,32]",
    "train.ckpt_every=3",
    "train.keep_last=5",
    "optim.warmup_steps=1",
    "train.eval_every=0",
    "train.progress_bar=false",  # TensorBoard stays on: trackers are resumed too
]
STAGES = {
    "pretrain/run.py": ["probe.source=none", "objective.mask_patch_size=8"],  # contrastive + MIM
    "finetune/run.py": ["data.synthetic_val_samples=4", "augment.color_jitter=0.2"],
}


def _state(out: Path, step: int) -> tuple[dict, dict]:
    ckpt = out / "checkpoints" / f"step_{step:08d}"
    return load_file(str(ckpt / "model.safetensors")), torch.load(ckpt / "optimizer.bin", weights_only=True)


def _assert_identical(a: tuple[dict, dict], b: tuple[dict, dict], what: str) -> None:
    (pa, oa), (pb, ob) = a, b
    assert pa.keys() == pb.keys(), f"{what}: parameter names differ"
    differ = [k for k in pa if not torch.equal(pa[k], pb[k])]
    assert not differ, f"{what}: {len(differ)} of {len(pa)} tensors differ, e.g. {differ[:3]}"
    assert oa["state"].keys() == ob["state"].keys()
    for key, entry in oa["state"].items():
        for name, value in entry.items():
            assert torch.equal(torch.as_tensor(value), torch.as_tensor(ob["state"][key][name])), (
                f"{what}: optimizer state {key}.{name} differs"
            )


@pytest.mark.parametrize("script", sorted(STAGES))
def test_mid_epoch_resume_is_bit_identical(tmp_path: Path, script: str):
    args = [*COMMON, *STAGES[script]]
    straight = tmp_path / "straight"
    res = run_stage(script, f"train.output_dir={straight}", *args, "train.trackers=[]")  # trackers: no effect
    assert res.returncode == 0, res.stderr[-3000:]
    final = _state(straight, 8)
    for step, workers in ((3, 2), (6, 0)):
        resumed = tmp_path / f"from{step}_w{workers}"
        shutil.copytree(
            straight / "checkpoints" / f"step_{step:08d}", resumed / "checkpoints" / f"step_{step:08d}"
        )
        res = run_stage(script, f"train.output_dir={resumed}", *args, f"data.num_workers={workers}")
        assert res.returncode == 0, res.stderr[-3000:]
        assert f"resumed from {resumed / 'checkpoints' / f'step_{step:08d}'} at step {step}" in res.stdout
        assert "from scratch" not in res.stdout  # the log says only what happened
        _assert_identical(final, _state(resumed, 8), f"resumed at step {step} with {workers} workers")
