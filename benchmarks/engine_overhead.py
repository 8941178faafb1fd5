"""Per-step overhead of ``Engine.fit`` over a bare PyTorch training loop.

Usage::

    python benchmarks/engine_overhead.py                     # CPU, 100 steps x 5 reps per loop
    python benchmarks/engine_overhead.py --device cuda --steps 300 --reps 10

The loops train the same tiny CNN (one conv, GELU, pooling, linear: a step costs about a
millisecond, so the loop's own work shows) on the same in-memory tensors, with the same
optimizer and schedule (``build_optimizer`` + ``build_scheduler``: AdamW, warmup + cosine),
the same gradient clipping (``grad_clip=1.0``), fp32, one process:

* ``bare PyTorch`` — ``for x, y in loader: loss = ce(model(x), y); backward; clip; step;
  zero_grad; scheduler.step()`` over the same seeded ``DataLoader`` the engine builds;
* ``Engine (tb + bar)`` — ``Engine.fit`` at realistic settings: TensorBoard tracker, tqdm bar
  (its output is captured, not shown), ``log_every=10``, one checkpoint at the end;
* ``Engine (no trackers)`` — the same with trackers and the bar off.

Steady-state ms/step is the time from the end of step 1 to the end of the last step divided by
the steps in between, so it includes the logging every ``log_every`` steps (amortised) but not
the setup; ``fixed s`` is the rest of each loop's wall time: Accelerator creation, ``prepare``,
tracker start/stop and the final checkpoint. Loops alternate (rotating order) in every
repetition; medians over the timed repetitions are shown. On the CPU the ``CPU ms/step`` column
(process CPU time) is less sensitive to other processes on a shared machine than wall time.
One intra-op thread by default (``--threads 0`` keeps torch's default): a millisecond step gains
nothing from more, and on a busy machine their synchronisation would swamp the loop overhead.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import itertools
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

_ROOT = Path(__file__).resolve().parents[1]
if str(_ROOT) not in sys.path:
    sys.path.insert(0, str(_ROOT))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import Tensor, nn  # noqa: E402
from torch.utils.data import DataLoader, TensorDataset  # noqa: E402

from hybridvision.config import OptimConfig, TrainConfig  # noqa: E402
from hybridvision.engine import Engine, StepOutput  # noqa: E402
from hybridvision.optim import build_optimizer, build_scheduler  # noqa: E402

Timing = tuple[float, float, float, float]  # steady wall s/step, steady CPU s/step, fixed wall s, fixed CPU s


def _now(device: torch.device) -> tuple[float, float]:
    """``(wall, process CPU)`` seconds now, after waiting for queued GPU work."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter(), time.process_time()


def tiny_model(in_chans: int = 3, width: int = 16, num_classes: int = 10) -> nn.Module:
    """Conv 3x3 → GELU → global average pool → linear."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(in_chans, width, 3, padding=1),
        nn.GELU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),  # (B, width, 1, 1) -> (B, width)
        nn.Linear(width, num_classes),
    )


def make_dataset(samples: int, size: int, num_classes: int = 10) -> TensorDataset:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(samples, 3, size, size, generator=g)
    y = torch.randint(0, num_classes, (samples,), generator=g)
    return TensorDataset(x, y)


def step_fn(model: nn.Module, batch: tuple[Tensor, Tensor]) -> StepOutput:
    x, y = batch
    return StepOutput(loss=F.cross_entropy(model(x), y))


def _forever(loader: DataLoader) -> Iterator[Any]:
    while True:
        yield from loader


def _timing(
    start: tuple[float, float],
    first: tuple[float, float],
    last: tuple[float, float],
    end: tuple[float, float],
    steps: int,
) -> Timing:
    """Steady per-step time between the ends of step 1 and step ``steps``; the rest is fixed cost."""
    n = steps - 1
    steady = ((last[0] - first[0]) / n, (last[1] - first[1]) / n)
    fixed = ((end[0] - start[0]) - steady[0] * steps, (end[1] - start[1]) - steady[1] * steps)
    return (*steady, *fixed)


def bare_runner(
    dataset: TensorDataset, batch_size: int, train: TrainConfig, optim: OptimConfig, device: torch.device
) -> Callable[[int], Timing]:
    """A plain PyTorch loop doing the same maths as the engine."""
    model = tiny_model().to(device)

    def run(steps: int) -> Timing:
        start = _now(device)
        loader = DataLoader(
            dataset,
            batch_size=batch_size,
            shuffle=True,
            drop_last=True,
            generator=torch.Generator().manual_seed(train.seed),
        )
        opt = build_optimizer(model, optim)
        sched = build_scheduler(opt, optim, steps)
        model.train()
        batches = _forever(loader)
        first = last = start
        for step in range(1, steps + 1):
            x, y = next(batches)
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), train.grad_clip)
            opt.step()
            opt.zero_grad(set_to_none=True)
            sched.step()
            if step == 1:
                first = _now(device)
        last = _now(device)
        return _timing(start, first, last, _now(device), steps)

    return run


def _reset_accelerate() -> None:
    """Forget the process-wide Accelerate singletons so that every ``Engine`` starts clean."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()


def engine_runner(
    dataset: TensorDataset, train: TrainConfig, optim: OptimConfig, root: Path, device: torch.device
) -> Callable[[int], Timing]:
    """``Engine.fit`` over ``dataset`` with the settings of ``train`` (its output_dir is replaced)."""
    model = tiny_model()
    counter = itertools.count()

    def run(steps: int) -> Timing:
        out_dir = root / f"fit_{next(counter)}"
        cfg = TrainConfig(
            **{**train.__dict__, "output_dir": str(out_dir), "max_steps": steps, "ckpt_every": steps}
        )
        stamps: dict[int, tuple[float, float]] = {}

        def on_step_end(engine: Engine) -> None:
            if engine.state.step in (1, steps):
                stamps[engine.state.step] = _now(device)

        _reset_accelerate()
        try:
            with contextlib.redirect_stderr(io.StringIO()):  # the tqdm bar
                start = _now(device)
                engine = Engine(cfg, optim, project_name="bench")
                engine.fit(model, dataset, step_fn, on_step_end=on_step_end)
                end = _now(device)
        finally:
            _reset_accelerate()
            shutil.rmtree(out_dir, ignore_errors=True)
        return _timing(start, stamps[1], stamps[steps], end, steps)

    return run


def run_benchmark(args: argparse.Namespace, device: torch.device, root: Path) -> dict[str, Timing]:
    dataset = make_dataset(args.samples, args.size)
    optim = OptimConfig(lr=1e-3, warmup_steps=10)
    base = TrainConfig(
        batch_size=args.batch_size,
        seed=0,
        resume="never",
        log_every=10,
        grad_clip=1.0,
        mixed_precision="no",
        progress_bar=True,
        trackers=["tensorboard"],
    )
    quiet = TrainConfig(**{**base.__dict__, "progress_bar": False, "trackers": []})
    runners = {
        "bare PyTorch": bare_runner(dataset, args.batch_size, base, optim, device),
        "Engine (tb + bar)": engine_runner(dataset, base, optim, root, device),
        "Engine (no trackers)": engine_runner(dataset, quiet, optim, root, device),
    }
    samples: dict[str, list[Timing]] = {k: [] for k in runners}
    keys = list(runners)
    for rep in range(args.warmup + args.reps):
        k = rep % len(keys)
        for key in keys[k:] + keys[:k]:  # rotate the order every repetition
            timing = runners[key](args.steps)
            if rep >= args.warmup:
                samples[key].append(timing)
    return {k: tuple(statistics.median(t[i] for t in v) for i in range(4)) for k, v in samples.items()}


def print_table(results: dict[str, Timing], cpu: bool) -> None:
    bare = results["bare PyTorch"]
    head = f"{'loop':<22} {'ms/step':>8} {'+ms/step':>9} {'x bare':>7} {'fixed s':>8}"
    print(head + (f" {'CPU ms/step':>12} {'+CPU ms':>8}" if cpu else ""))
    for key, (wall, cpu_s, fixed, _) in results.items():
        line = f"{key:<22} {1e3 * wall:>8.3f} {1e3 * (wall - bare[0]):>+9.3f} {wall / bare[0]:>7.2f} {fixed:>8.3f}"
        print(line + (f" {1e3 * cpu_s:>12.3f} {1e3 * (cpu_s - bare[1]):>+8.3f}" if cpu else ""))


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch.set_num_threads (CPU; 0 keeps torch's default). A ~1 ms step gains nothing from "
        "intra-op threads, and on a busy machine their synchronisation swamps the loop overhead",
    )
    parser.add_argument(
        "--steps", type=int, default=100, help="optimizer steps per loop and repetition (>= 2)"
    )
    parser.add_argument("--reps", type=int, default=5, help="timed repetitions")
    parser.add_argument("--warmup", type=int, default=1, help="untimed repetitions first")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--size", type=int, default=16, help="image side")
    parser.add_argument("--samples", type=int, default=256, help="dataset size (the loops cycle over it)")
    args = parser.parse_args(argv)
    if args.steps < 2:
        parser.error("--steps must be >= 2")
    return args


def main(argv: Sequence[str] | None = None) -> dict[str, Timing]:
    """Run the benchmark; returns ``loop -> (steady wall s/step, steady CPU s/step, fixed wall s, fixed CPU s)``."""
    args = parse_args(argv)
    device = torch.device(args.device)
    threads = torch.get_num_threads()
    if args.threads:
        torch.set_num_threads(args.threads)
    used_threads = torch.get_num_threads()
    previous = os.environ.get("ACCELERATE_USE_CPU")
    if device.type == "cpu":
        os.environ["ACCELERATE_USE_CPU"] = "true"  # Accelerate would pick a GPU where one exists
    try:
        with tempfile.TemporaryDirectory(prefix="hv_bench_engine_") as tmp:
            results = run_benchmark(args, device, Path(tmp))
    finally:
        torch.set_num_threads(threads)
        if previous is None:
            os.environ.pop("ACCELERATE_USE_CPU", None)
        else:
            os.environ["ACCELERATE_USE_CPU"] = previous
    print(
        f"\n== Engine.fit overhead: tiny CNN, batch {args.batch_size}, {args.size}x{args.size}, fp32, AdamW + clip 1.0, "
        f"1 process, device {device}, threads {used_threads}; {args.warmup} warmup + {args.reps} reps x "
        f"{args.steps} steps, interleaved; medians =="
    )
    print_table(results, device.type == "cpu")
    print("(shared machine: figures are noisy; compare within one run)")
    return results


if __name__ == "__main__":
    main()
