"""Engine: exact resume, signals, DDP sharding and seeding, grad accumulation, NaN handling, bad checkpoints."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
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
def test_two_processes_shard_data_seed_per_rank_and_keep_single_process_lr(tmp_path: Path):
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
    # each rank draws its own random numbers (masks, dropout, drop-path): set_seed per process
    assert len(r0["draws"]) == len(r1["draws"]) == 6 and r0["draws"] != r1["draws"]
    assert r0["draws"] == rs["draws"]  # rank 0 of N draws what a single process draws


def _reset_accelerate() -> None:
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()


def _engine(out: Path, run_config=None, optim: dict | None = None, **train):
    from hybridvision.config import OptimConfig, TrainConfig
    from hybridvision.engine import Engine

    _reset_accelerate()
    defaults = dict(output_dir=str(out), max_steps=1, batch_size=4, progress_bar=False, trackers=[])
    optim_cfg = OptimConfig(**{"lr": 0.1, "warmup_steps": 0, "schedule": "constant", **(optim or {})})
    return Engine(TrainConfig(**{**defaults, **train}), optim_cfg, run_config=run_config)


def _toy():
    sys.path.insert(0, str(SCRIPT.parent))
    import toy_train

    return toy_train


def _mse_step(m, b):
    from hybridvision.engine import StepOutput

    return StepOutput(loss=((m(b["x"]) - b["y"]) ** 2).mean())


def _one_update(tmp_path: Path, batch: int, accum: int) -> dict[str, torch.Tensor]:
    from torch.utils.data import DataLoader

    toy = _toy()
    engine = _engine(
        tmp_path / f"b{batch}a{accum}",
        optim={"name": "sgd", "momentum": 0.0, "weight_decay": 0.0},
        batch_size=batch,
        grad_accum_steps=accum,
        grad_clip=0.0,
        resume="never",
    )
    loader = DataLoader(toy.ToyData(), batch_size=batch, shuffle=False)
    engine.fit(toy.toy_model(dropout=0.0), loader, _mse_step)
    _reset_accelerate()
    return {
        k: v.detach().clone() for k, v in engine.accelerator.unwrap_model(engine.model).state_dict().items()
    }


def test_grad_accumulation_matches_large_batch(tmp_path: Path):
    """With SGD the update is proportional to the gradient, so a scale error (e.g. summing instead of
    averaging the micro-batches: 2x) fails; AdamW would normalise it away."""
    big = _one_update(tmp_path, batch=8, accum=1)
    acc = _one_update(tmp_path, batch=4, accum=2)
    init = _toy().toy_model(0.0).state_dict()
    for k in big:
        # same maths, different summation order: float32 round-off only
        torch.testing.assert_close(acc[k], big[k], rtol=0, atol=1e-6)
    moved = max(float((big[k] - init[k]).abs().max()) for k in big)
    assert moved > 1e-3, f"the update did nothing ({moved})"


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
def test_sigterm_to_process_group_with_workers_saves_exits_143_then_resumes(tmp_path: Path):
    """A scheduler signals the whole process group: DataLoader workers must not die first."""
    out = tmp_path / "term"
    args = ["train.max_steps=200", "train.batch_size=4", "train.ckpt_every=1000"]
    cmd = [sys.executable, str(SCRIPT), str(out), *COMMON, *args]
    proc = subprocess.Popen(
        cmd,
        env={**os.environ, "TOY_STEP_SLEEP": "0.1", "TOY_WORKERS": "2", "OMP_NUM_THREADS": "1"},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # its own process group, as under SLURM / a container
    )
    started = out / "run_config.yaml"  # written right before the first step
    deadline = time.time() + 120
    while not started.exists() and time.time() < deadline:
        time.sleep(0.1)
    time.sleep(2.0)
    os.killpg(proc.pid, signal.SIGTERM)  # main process and its DataLoader workers
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 143, stderr[-2000:]
    assert "killed by signal" not in stderr
    assert "stopped by SIGTERM after step" in stdout and "outputs are partial" in stdout
    resume_line = stdout.split("resume with: ")[1].splitlines()[0]
    assert "toy_train.py" in resume_line and str(out) in resume_line
    from hybridvision.engine import find_latest_checkpoint

    ckpt = find_latest_checkpoint(out)
    assert ckpt is not None
    step = json.loads((ckpt / "trainer_state.json").read_text())["step"]
    assert 0 < step < 200
    res = _run(out, *args)
    assert "done step=200" in res.stdout
    assert f"resumed from {ckpt} at step {step}" in res.stdout


# ---------------------------------------------------------------- non-finite gradients and logs


def _recording_fit(out: Path, losses: list, lrs: list, bad: dict, **train):
    """Fit the toy model in-process; ``bad[step] = "loss" | "grad"`` breaks that step."""
    from torch.utils.data import DataLoader

    from hybridvision.engine import StepOutput

    toy = _toy()
    engine = _engine(out, optim={"name": "sgd", "momentum": 0.0}, **train)
    logged: list[tuple[int, dict]] = []
    engine.log = lambda values, step=None: logged.append((step, dict(values)))

    def step_fn(m, b):
        pred = m(b["x"])
        loss = ((pred - b["y"]) ** 2).mean()
        kind = bad.get(engine.state.step + 1)
        if kind == "loss":
            loss = loss * float("nan")
        elif kind == "grad":  # finite value 0, gradient 0 * inf = NaN
            loss = loss + 0.0 * torch.sqrt(0.0 * pred).sum()
        losses.append(float(loss.detach()))
        lrs.append(engine.optimizer.param_groups[0]["lr"])
        return StepOutput(loss=loss, logs={"term": 2 * loss.detach()})

    try:
        result = engine.fit(toy.toy_model(0.0), DataLoader(toy.ToyData(), batch_size=4), step_fn)
    finally:
        _reset_accelerate()
    return engine, result, logged


def test_nan_gradient_with_finite_loss_is_skipped_and_weights_stay_finite(tmp_path: Path):
    from safetensors.torch import load_file

    losses, lrs = [], []
    engine, result, _ = _recording_fit(
        tmp_path, losses, lrs, {2: "grad"}, max_steps=4, skip_nonfinite=True, grad_clip=0.0, ckpt_every=4
    )
    assert np.isfinite(losses[1]), "the broken step's loss itself is finite"
    assert result["skipped_nonfinite"] == 1
    weights = load_file(str(result["checkpoint"] / "model.safetensors"))
    assert all(torch.isfinite(v).all() for v in weights.values()), "NaN gradient reached the weights"


def test_nan_gradient_stops_and_never_saves_nan_weights(tmp_path: Path):
    from hybridvision.engine import NonFiniteLossError, find_latest_checkpoint

    with pytest.raises(NonFiniteLossError, match="non-finite gradient norm.*at step 3"):
        _recording_fit(tmp_path, [], [], {3: "grad"}, max_steps=5, ckpt_every=100)
    ckpt = find_latest_checkpoint(tmp_path)
    assert ckpt is not None and ckpt.name == "step_00000002"
    weights = load_file(str(ckpt / "model.safetensors"))
    assert all(torch.isfinite(v).all() for v in weights.values())


def test_logs_count_only_good_steps_and_show_the_lr_used(tmp_path: Path):
    losses, lrs = [], []
    _, _, logged = _recording_fit(
        tmp_path,
        losses,
        lrs,
        {2: "loss"},
        max_steps=4,
        log_every=4,
        skip_nonfinite=True,
        ckpt_every=100,
    )
    (step, logs), *_ = [entry for entry in logged if "train/lr" in entry[1]]
    assert step == 4
    good = [losses[i] for i in (0, 2, 3)]  # step 2 was skipped
    assert logs["train/loss"] == pytest.approx(np.mean(good), rel=1e-6)
    assert logs["train/term"] == pytest.approx(2 * np.mean(good), rel=1e-6)  # not NaN
    assert logs["train/lr"] == pytest.approx(lrs[3])  # the LR step 4 was taken with
    assert logs["train/skipped_nonfinite"] == 1


# ---------------------------------------------------------------- checkpoints that cannot be read


def _fake_checkpoint(root: Path, step: int, state: str | None = None) -> Path:
    path = root / "checkpoints" / f"step_{step:08d}"
    path.mkdir(parents=True)
    (path / "trainer_state.json").write_text(json.dumps({"step": step}) if state is None else state)
    return path


def test_all_checkpoints_unreadable_is_an_error_naming_them(tmp_path: Path):
    from hybridvision.config import ConfigError

    for step in (5, 10):
        _fake_checkpoint(tmp_path, step, state="")
    engine = _engine(tmp_path, resume="auto")
    with pytest.raises(ConfigError, match=r"step_00000005.*unreadable.*step_00000010"):
        engine.resume_checkpoint  # noqa: B018
    engine._prune_checkpoints()  # and nothing is ever deleted for it
    assert len(list((tmp_path / "checkpoints").iterdir())) == 2


def test_newest_unreadable_warns_names_both_and_is_never_pruned(tmp_path: Path, caplog):
    older = _fake_checkpoint(tmp_path, 4)
    good = _fake_checkpoint(tmp_path, 8)
    corrupt = _fake_checkpoint(tmp_path, 12, state='{"step": ')
    engine = _engine(tmp_path, resume="auto", keep_last=1)
    with caplog.at_level("WARNING"):
        assert engine.resume_checkpoint == good
    assert str(corrupt) in caplog.text and str(good) in caplog.text and "SKIPPING" in caplog.text
    engine._prune_checkpoints()
    assert corrupt.exists() and good.exists() and not older.exists()


def test_explicit_corrupt_resume_names_the_file(tmp_path: Path):
    from hybridvision.config import ConfigError

    ckpt = _fake_checkpoint(tmp_path, 3, state="not json")
    engine = _engine(tmp_path / "new", resume=str(ckpt))
    with pytest.raises(ConfigError, match=r"trainer_state.json is unreadable"):
        engine.resume_checkpoint  # noqa: B018


# ---------------------------------------------------------------- resuming another setup


@dataclass
class _RunConfig:
    model: dict
    optim: dict


def _fit_model(out: Path, hidden: int, optim: str):
    from torch.utils.data import DataLoader

    toy = _toy()
    engine = _engine(
        out,
        run_config=_RunConfig(model={"hidden": hidden}, optim={"name": optim}),
        optim={"name": optim},
        max_steps=2,
        ckpt_every=2,
    )
    model = torch.nn.Sequential(torch.nn.Linear(8, hidden), torch.nn.GELU(), torch.nn.Linear(hidden, 1))
    try:
        return engine.fit(model, DataLoader(toy.ToyData(), batch_size=4), _mse_step)
    finally:
        _reset_accelerate()


def test_resume_into_another_model_or_optimizer_is_a_config_error(tmp_path: Path):
    from hybridvision.config import ConfigError

    _fit_model(tmp_path, hidden=16, optim="adamw")
    ckpt = tmp_path / "checkpoints" / "step_00000002"
    with pytest.raises(ConfigError, match=rf"{ckpt}.*model.hidden=16 there but 32 now"):
        _fit_model(tmp_path, hidden=32, optim="adamw")
    with pytest.raises(
        ConfigError, match=rf"{ckpt}.*another optimizer.*optim.name='adamw' there but 'sgd' now"
    ):
        _fit_model(tmp_path, hidden=16, optim="sgd")


# ---------------------------------------------------------------- small engine features


def test_exit_codes_follow_the_shell_convention():
    from hybridvision.engine import exit_code

    assert exit_code({"signal": None}) == 0
    assert exit_code({"signal": signal.SIGINT}) == 130
    assert exit_code({"signal": signal.SIGTERM}) == 143


def test_warmup_longer_than_training_warns(tmp_path: Path, caplog):
    with caplog.at_level("WARNING"):
        _engine(tmp_path, max_steps=5, optim={"warmup_steps": 5})
    assert "optim.warmup_steps=5 >= train.max_steps=5" in caplog.text
    _reset_accelerate()


def test_ema_lives_on_the_training_device(tmp_path: Path, monkeypatch):
    """Built before ``prepare``, an EMA copy would stay on the host; build_ema puts it on the device."""
    from accelerate import Accelerator

    engine = _engine(tmp_path)
    monkeypatch.setattr(Accelerator, "device", property(lambda self: torch.device("meta")))
    model = _toy().toy_model(0.0)  # on the CPU, as a stage builds it
    ema = engine.build_ema(model, 0.99)
    assert {p.device.type for p in ema.parameters()} == {"meta"}
    assert {b.device.type for b in ema.buffers()} == {"meta"}  # incl. n_averaged
    assert ema in engine.accelerator._custom_objects  # saved and resumed with the run
    _reset_accelerate()


class _RandomSamples(torch.utils.data.Dataset):
    """Each sample is a draw from the global RNG, like a random augmentation."""

    def __len__(self) -> int:
        return 6

    def __getitem__(self, i: int) -> torch.Tensor:
        return torch.rand(3) + i


class _RandomStream(torch.utils.data.IterableDataset):
    def __iter__(self):
        for i in range(6):
            yield torch.rand(2) + i


def test_per_sample_seeding_ignores_draw_order_and_keeps_the_caller_rng():
    from hybridvision.engine import SeededDataset, SeededIterableDataset

    ds = SeededDataset(_RandomSamples(), seed=3, rank=0)
    forward = [ds[i] for i in range(6)]
    torch.manual_seed(0)
    before = torch.get_rng_state()
    backward = [ds[i] for i in reversed(range(6))][::-1]
    assert torch.equal(torch.get_rng_state(), before), "the caller's RNG was consumed"
    assert all(torch.equal(a, b) for a, b in zip(forward, backward, strict=True))
    ds.set_epoch(1)
    assert not torch.equal(ds[0], forward[0]), "every epoch must draw new augmentations"

    stream = SeededIterableDataset(_RandomStream(), seed=3, rank=0)
    full = list(stream)
    torch.rand(5)  # the caller's RNG moved on, as after a resume
    replayed = list(stream)[2:]  # a resumed stream replays its prefix
    assert all(torch.equal(a, b) for a, b in zip(full[2:], replayed, strict=True))
    other_rank = list(SeededIterableDataset(_RandomStream(), seed=3, rank=1))
    assert not torch.equal(other_rank[0], full[0])


def test_engine_resolves_auto_precision_and_records_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
):
    from hybridvision.engine import precision, resolve_mixed_precision

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setattr(precision, "measure_cpu_bf16_speedup", lambda: 0.5)  # read on CPUs only
    from hybridvision.config import OptimConfig, TrainConfig
    from hybridvision.engine import Engine

    @dataclasses.dataclass
    class Run:
        train: TrainConfig

    _reset_accelerate()
    given = TrainConfig(output_dir=str(tmp_path), max_steps=1, progress_bar=False, trackers=[], mixed_precision="auto")
    run = Run(given)
    eng = Engine(given, OptimConfig(lr=0.1, warmup_steps=0), run_config=run)
    expected = resolve_mixed_precision()[0]
    assert eng.run_config.train.mixed_precision == expected  # what run_config.yaml records
    assert given.mixed_precision == run.train.mixed_precision == "auto"  # resolved into a copy
    assert expected == ("bf16" if torch.cuda.is_available() else "no")
    assert eng.cfg.mixed_precision == expected  # the saved run config shows the mode used
    assert eng.accelerator.mixed_precision == expected
    out = capsys.readouterr().out
    assert f"train.mixed_precision=auto -> {expected}" in out
    if not torch.cuda.is_available():  # one line saying what was measured and where it is kept
        assert "0.50x the fp32 speed" in out and str(tmp_path / "cache") in out
    eng.close()


def test_fewer_samples_than_a_batch_are_repeated_to_fill_one(tmp_path: Path):
    """3 labelled images and batch 8: every batch is full, each repeat has its own augmentation."""
    from torch.utils.data import Dataset

    from hybridvision.engine import loaders

    class Three(Dataset):
        def __len__(self) -> int:
            return 3

        def __getitem__(self, i: int) -> dict:
            return {"id": torch.tensor(i), "noise": torch.rand(1)}  # the seeded per-sample RNG

    loader = loaders.build_loader(Three(), seed=0, rank=0, batch_size=8, shuffle=True, world_size=2)
    assert len(loader.dataset) == 18 and len(loader) == 2  # 16 per 2 processes x 8: two full batches here
    batches = list(loader)
    ids = torch.cat([b["id"] for b in batches])
    assert [len(b["id"]) for b in batches] == [8, 8]
    counts = torch.bincount(ids, minlength=3)
    assert counts.sum() == 16 and counts.min() >= 4  # 16 of the 18 slots (6 per sample) drawn
    noise = torch.cat([b["noise"] for b in batches]).flatten()
    assert len(set(noise[ids == 0].tolist())) == counts[0]  # every repeat has its own augmentation
    # enough samples: left as they are; the engine's fit trains on 3 samples with batch 8
    assert len(loaders.build_loader(Three(), 0, 0, batch_size=2, shuffle=False).dataset) == 3
    eng = _engine(tmp_path, max_steps=2, batch_size=8)
    model = torch.nn.Linear(1, 1)
    data = [{"x": torch.randn(1), "y": torch.randn(1)} for _ in range(3)]
    result = eng.fit(model, data, _mse_step)
    assert result["step"] == 2
    eng.close()


def test_stop_signals_are_held_back_while_workers_start_not_lost():
    """Workers forked while DataLoader workers start inherit SIGINT/SIGTERM blocked (a signal to the
    process group cannot kill them before WorkerInit ignores it); the run still receives it."""
    import os
    import signal
    import time

    from hybridvision.engine.signals import stop_signals_blocked

    received: list[int] = []
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: received.append(signum))
    try:
        with stop_signals_blocked():
            pid = os.fork()
            if pid == 0:  # the "worker": SIGTERM blocked from its first instruction
                blocked = signal.pthread_sigmask(signal.SIG_BLOCK, [])
                os._exit(0 if {signal.SIGINT, signal.SIGTERM} <= blocked else 1)
            os.kill(os.getpid(), signal.SIGTERM)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        for _ in range(100):  # another thread of this process may take it; the handler still runs
            if received:
                break
            time.sleep(0.01)
        assert received == [signal.SIGTERM]  # not lost
        assert signal.SIGTERM not in signal.pthread_sigmask(signal.SIG_BLOCK, [])  # mask restored
    finally:
        signal.signal(signal.SIGTERM, previous)
