"""Engine: exact resume after SIGKILL, DDP sharding and LR, grad accumulation, NaN handling."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

SCRIPT = Path(__file__).with_name("toy_train.py")
COMMON = ["train.progress_bar=false", "train.trackers=[]", "optim.warmup_steps=2", "train.log_every=1"]


def _run(out: Path, *overrides: str, env: dict | None = None, launch: list[str] | None = None, timeout=240):
    cmd = (launch or [sys.executable]) + [str(SCRIPT), str(out), *COMMON, *overrides]
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    res = subprocess.run(cmd, capture_output=True, text=True, env=full_env, timeout=timeout)
    assert res.returncode == 0, res.stderr[-3000:]
    return res


def _final(out: Path, step: int):
    ckpt = out / "checkpoints" / f"step_{step:08d}"
    params = load_file(str(ckpt / "model.safetensors"))
    optim = torch.load(ckpt / "optimizer.bin", weights_only=True)
    return params, optim


def _assert_same_state(a, b):
    pa, oa = a
    pb, ob = b
    assert pa.keys() == pb.keys()
    for k in pa:
        assert torch.equal(pa[k], pb[k]), f"parameter {k} differs"
    for key in oa["state"]:
        for name, ta in oa["state"][key].items():
            tb = ob["state"][key][name]
            assert torch.equal(torch.as_tensor(ta), torch.as_tensor(tb)), (
                f"optimizer state {key}.{name} differs"
            )


@pytest.mark.slow
@pytest.mark.parametrize("accum", [1, 2])
def test_resume_after_sigkill_is_exact(tmp_path: Path, accum: int):
    n = 8
    args = [
        f"train.max_steps={n}",
        f"train.grad_accum_steps={accum}",
        "train.batch_size=4",
        "train.ckpt_every=4",
    ]
    straight = tmp_path / "straight"
    _run(straight, *args)

    killed = tmp_path / "killed"
    cmd = [sys.executable, str(SCRIPT), str(killed), *COMMON, *args]
    proc = subprocess.Popen(
        cmd,
        env={**os.environ, "TOY_HANG_AFTER": str(n // 2 + 1), "OMP_NUM_THREADS": "1"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    half = killed / "checkpoints" / f"step_{n // 2:08d}" / "trainer_state.json"
    deadline = time.time() + 120
    while not half.exists() and time.time() < deadline:
        time.sleep(0.2)
    time.sleep(1.0)  # let it run into step n/2 + 1 and hang there
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert half.exists(), "the half-way checkpoint was never written"
    assert not (killed / "checkpoints" / f"step_{n:08d}").exists()

    _run(killed, *args, "train.resume=auto")
    _assert_same_state(_final(straight, n), _final(killed, n))


def test_incomplete_checkpoint_is_ignored(tmp_path: Path):
    from hybridvision.engine import find_latest_checkpoint

    root = tmp_path / "checkpoints"
    (root / "step_00000004").mkdir(parents=True)
    (root / "step_00000004" / "trainer_state.json").write_text(json.dumps({"step": 4}))
    (root / ".tmp-step_00000008").mkdir()  # a crash mid-write leaves only a hidden temp dir
    (root / ".tmp-step_00000008" / "trainer_state.json").write_text(json.dumps({"step": 8}))
    (root / "step_00000006").mkdir()  # no state file: not complete
    assert find_latest_checkpoint(tmp_path) == root / "step_00000004"


@pytest.mark.slow
def test_two_processes_shard_data_and_keep_single_process_lr(tmp_path: Path):
    args = ["train.max_steps=6", "train.batch_size=2", "optim.warmup_steps=3"]
    single = tmp_path / "single"
    _run(single, *args, env={"TOY_RECORD": "1"})
    multi = tmp_path / "multi"
    launch = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--main_process_port",
        str(29500 + os.getpid() % 1000),
    ]
    _run(multi, *args, env={"TOY_RECORD": "1", "ACCELERATE_USE_CPU": "true"}, launch=launch)
    r0 = json.loads((multi / "record_rank0.json").read_text())
    r1 = json.loads((multi / "record_rank1.json").read_text())
    rs = json.loads((single / "record_rank0.json").read_text())
    assert r0["lr"] == pytest.approx(rs["lr"]) and r1["lr"] == pytest.approx(rs["lr"])
    # within each epoch, the two ranks see disjoint samples
    per_epoch = 24 // (2 * 2)  # micro-batches per rank per epoch
    for e in range(len(r0["ids"]) // per_epoch):
        a = {i for b in r0["ids"][e * per_epoch : (e + 1) * per_epoch] for i in b}
        b = {i for b in r1["ids"][e * per_epoch : (e + 1) * per_epoch] for i in b}
        assert not a & b, f"epoch {e}: ranks share samples {a & b}"
    first = {i for b in r0["ids"][:per_epoch] + r1["ids"][:per_epoch] for i in b}
    assert len(first) == 24  # together the ranks cover the epoch


def _one_update(tmp_path: Path, batch: int, accum: int) -> dict[str, torch.Tensor]:
    from accelerate.state import AcceleratorState, GradientState
    from torch.utils.data import DataLoader

    from hybridvision.config import OptimConfig, TrainConfig
    from hybridvision.engine import Engine, StepOutput

    sys.path.insert(0, str(SCRIPT.parent))
    from toy_train import ToyData, toy_model

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    train = TrainConfig(
        output_dir=str(tmp_path / f"b{batch}a{accum}"),
        max_steps=1,
        batch_size=batch,
        grad_accum_steps=accum,
        progress_bar=False,
        trackers=[],
        grad_clip=0.0,
        resume="never",
    )
    optim = OptimConfig(lr=0.1, warmup_steps=0, schedule="constant", weight_decay=0.0)
    engine = Engine(train, optim)
    model = toy_model(dropout=0.0)
    loader = DataLoader(ToyData(), batch_size=batch, shuffle=False)

    def step_fn(m, b):
        return StepOutput(loss=((m(b["x"]) - b["y"]) ** 2).mean())

    engine.fit(model, loader, step_fn)
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    return {
        k: v.detach().clone() for k, v in engine.accelerator.unwrap_model(engine.model).state_dict().items()
    }


def test_grad_accumulation_matches_large_batch(tmp_path: Path):
    big = _one_update(tmp_path, batch=8, accum=1)
    acc = _one_update(tmp_path, batch=4, accum=2)
    for k in big:
        # same maths, different summation order: float32 round-off only
        torch.testing.assert_close(acc[k], big[k], rtol=0, atol=1e-6)
    init = {k: v for k, v in __import__("toy_train").toy_model(0.0).state_dict().items()}
    assert any(not torch.equal(init[k], big[k]) for k in big), "the update did nothing"


def test_nonfinite_loss_stops_with_step_and_saves(tmp_path: Path):
    out = tmp_path / "nan"
    cmd = [sys.executable, str(SCRIPT), str(out), *COMMON, "train.max_steps=6", "train.batch_size=4"]
    res = subprocess.run(
        cmd, capture_output=True, text=True, env={**os.environ, "TOY_NAN_AT": "4"}, timeout=120
    )
    assert res.returncode != 0
    assert "non-finite loss" in res.stderr and "at step 4" in res.stderr
    assert (out / "checkpoints" / "step_00000003" / "trainer_state.json").exists()


def test_nonfinite_loss_skipped_and_counted(tmp_path: Path):
    out = tmp_path / "skip"
    res = _run(
        out, "train.max_steps=5", "train.batch_size=4", "train.skip_nonfinite=true", env={"TOY_NAN_AT": "2"}
    )
    assert "done step=5 skipped=1" in res.stdout
    state = json.loads((out / "checkpoints" / "step_00000005" / "trainer_state.json").read_text())
    assert state["skipped_nonfinite"] == 1


@pytest.mark.slow
def test_sigterm_saves_and_exits_cleanly_then_resumes(tmp_path: Path):
    out = tmp_path / "term"
    args = ["train.max_steps=200", "train.batch_size=4", "train.ckpt_every=1000"]
    cmd = [sys.executable, str(SCRIPT), str(out), *COMMON, *args]
    proc = subprocess.Popen(
        cmd,
        env={**os.environ, "TOY_STEP_SLEEP": "0.1", "OMP_NUM_THREADS": "1"},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    started = out / "run_config.yaml"  # written right before the first step
    deadline = time.time() + 120
    while not started.exists() and time.time() < deadline:
        time.sleep(0.1)
    time.sleep(1.5)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0, stderr[-2000:]
    assert "stopped by signal after step" in stdout and "train.resume=auto" in stdout
    from hybridvision.engine import find_latest_checkpoint

    ckpt = find_latest_checkpoint(out)
    assert ckpt is not None
    step = json.loads((ckpt / "trainer_state.json").read_text())["step"]
    assert 0 < step < 200
    res = _run(out, *args)
    assert "done step=200" in res.stdout
