"""Train-step cost of our timm wrapper + engine over a bare timm loop, per family.

Usage::

    OMP_NUM_THREADS=1 python benchmarks/backbone_overhead.py           # 4 families, batch 4, 128x128
    python benchmarks/backbone_overhead.py --models fastvit_t8 --steps 20 --reps 7

The three loops train the same network from the same initial weights: timm's ``features_only``
model of the architecture and our U-Net decoder (``create_decoder("unet", ...)``), cross-entropy
on 2 classes, fp32, the same optimizer and schedule (``build_optimizer`` + ``build_scheduler``:
fused AdamW, warmup + cosine) and gradient clipping (1.0), on the same in-memory tensors:

* ``bare timm loop`` — ``timm.create_model(arch, features_only=True)`` and the decoder called
  directly, ``logits = interpolate(decoder(model(x)))``; ``backward; clip; step; zero_grad;
  scheduler.step()`` over a seeded ``DataLoader``;
* ``ours, bare loop`` — ``create_segmenter("timm/<arch>", decoder="unet")`` in that same loop:
  the cost of the encoder wrapper (padding check, feature list) and the segmenter (resize, crop);
* ``ours, Engine.fit`` — the same segmenter trained by ``Engine.fit`` (no trackers, no bar: the
  loop of every stage), adding the engine (Accelerate, the per-sample seeded loader, finiteness
  checks, logging every 10 steps).

Steady-state ms/step is measured as in ``benchmarks/engine_overhead.py`` (whose helpers this
reuses): from the end of step 1 to the end of the last step, divided by the steps in between;
``fixed s`` is the rest of a loop's wall time (Accelerator creation, ``prepare``, the final
checkpoint). The loops alternate (rotating order) in every repetition; ``x bare`` is the median
over repetitions of a loop's time per step divided by the bare loop's in the same repetition,
with its range; ``+CPU ms`` the difference of the median CPU times per step. One intra-op thread
(``--threads``): a shared machine's noise shows less in process CPU time than in wall time.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import importlib.util
import io
import itertools
import os
import shutil
import statistics
import sys
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from types import ModuleType
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
from hybridvision.export import cpu_name  # noqa: E402
from hybridvision.models import create_decoder, create_segmenter  # noqa: E402
from hybridvision.optim import build_optimizer, build_scheduler  # noqa: E402


def _sibling(name: str) -> ModuleType:
    """Another script of benchmarks/ (loaded by path: benchmarks/ is not a package)."""
    spec = importlib.util.spec_from_file_location(f"_bench_{name}", Path(__file__).with_name(f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_engine_overhead = _sibling("engine_overhead")
Timing = _engine_overhead.Timing  # steady wall s/step, steady CPU s/step, fixed wall s, fixed CPU s
_now, _timing, _forever = _engine_overhead._now, _engine_overhead._timing, _engine_overhead._forever
_reset_accelerate = _engine_overhead._reset_accelerate

FAMILIES = ["fastvit_t8", "repvit_m0_9", "efficientvit_b1", "convnextv2_atto"]
NUM_CLASSES = 2


def make_dataset(samples: int, size: int) -> TensorDataset:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(samples, 3, size, size, generator=g)
    y = torch.randint(0, NUM_CLASSES, (samples, size, size), generator=g)
    return TensorDataset(x, y)


def step_fn(model: nn.Module, batch: tuple[Tensor, Tensor]) -> StepOutput:
    x, y = batch
    return StepOutput(loss=F.cross_entropy(model(x), y))


class BareTimmSegmenter(nn.Module):
    """timm's ``features_only`` model + a decoder, called directly (no encoder contract)."""

    def __init__(self, features: nn.Module, decoder: nn.Module):
        super().__init__()
        self.features = features
        self.decoder = decoder

    def forward(self, x: Tensor) -> Tensor:
        """Args: x (B, 3, H, W), H and W multiples of the deepest stride. Returns (B, K, H, W)."""
        logits = self.decoder(self.features(x))  # (B, K, H / 4, W / 4)
        return F.interpolate(logits, size=x.shape[-2:], mode="bilinear", align_corners=False)


def build_pair(arch: str) -> tuple[nn.Module, BareTimmSegmenter]:
    """Our segmenter and the bare timm network, with the same initial weights."""
    import timm

    torch.manual_seed(0)
    ours = create_segmenter(f"timm/{arch}", num_classes=NUM_CLASSES, decoder="unet")
    features = timm.create_model(arch, features_only=True, pretrained=False)
    features.load_state_dict(ours.encoder.model.state_dict())
    info = features.feature_info
    decoder = create_decoder("unet", tuple(info.channels()), tuple(info.reduction()), NUM_CLASSES)
    decoder.load_state_dict(ours.decoder.state_dict())
    return ours, BareTimmSegmenter(features, decoder)


def bare_runner(
    model: nn.Module, dataset: TensorDataset, train: TrainConfig, optim: OptimConfig
) -> Callable[[int], Timing]:
    """A plain PyTorch loop over the bare timm network, the same maths as the engine."""
    device = torch.device("cpu")

    def run(steps: int) -> Timing:
        start = _now(device)
        loader = DataLoader(
            dataset,
            batch_size=train.batch_size,
            shuffle=True,
            drop_last=True,
            generator=torch.Generator().manual_seed(train.seed),
        )
        opt = build_optimizer(model, optim)
        sched = build_scheduler(opt, optim, steps)
        model.train()
        batches = _forever(loader)
        first = start
        for step in range(1, steps + 1):
            x, y = next(batches)
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


def engine_runner(
    model: nn.Module, dataset: TensorDataset, train: TrainConfig, optim: OptimConfig, root: Path
) -> Callable[[int], Timing]:
    """``Engine.fit`` of our segmenter (a fresh engine per call; its output_dir is removed)."""
    device = torch.device("cpu")
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
            with contextlib.redirect_stderr(io.StringIO()), contextlib.redirect_stdout(io.StringIO()):
                start = _now(device)
                engine = Engine(cfg, optim, project_name="bench")
                engine.fit(model, dataset, step_fn, on_step_end=on_step_end)
                end = _now(device)
        finally:
            _reset_accelerate()
            shutil.rmtree(out_dir, ignore_errors=True)
        return _timing(start, stamps[1], stamps[steps], end, steps)

    return run


#: the loops, compared with the first: the model wrapper alone, then the wrapper and the engine
BARE, WRAPPER, ENGINE = "bare timm loop", "ours, bare loop", "ours, Engine.fit"


def run_family(arch: str, args: argparse.Namespace, root: Path) -> dict[str, dict[str, Any]]:
    """Interleaved repetitions of the three loops for one architecture.

    Returns:
        loop -> ``timing`` (median Timing), ``ratio`` / ``cpu_ratio`` (median over repetitions of
        the loop's wall / CPU time per step divided by the bare loop's in the same repetition) and
        their ``(min, max)`` ranges.
    """
    dataset = make_dataset(args.samples, args.size)
    optim = OptimConfig(lr=1e-4, warmup_steps=1)
    train = TrainConfig(
        batch_size=args.batch_size,
        seed=0,
        resume="never",
        log_every=10,
        grad_clip=1.0,
        mixed_precision="no",
        progress_bar=False,
        trackers=[],
    )
    ours, bare = build_pair(arch)
    runners = {
        BARE: bare_runner(bare, dataset, train, optim),
        WRAPPER: bare_runner(copy.deepcopy(ours), dataset, train, optim),
        ENGINE: engine_runner(ours, dataset, train, optim, root),
    }
    samples: dict[str, list[Timing]] = {k: [] for k in runners}
    keys = list(runners)
    for rep in range(args.warmup + args.reps):
        k = rep % len(keys)
        for key in keys[k:] + keys[:k]:  # rotate the order every repetition
            timing = runners[key](args.steps)
            if rep >= args.warmup:
                samples[key].append(timing)
    results: dict[str, dict[str, Any]] = {}
    for key, timings in samples.items():
        wall = [t[0] / b[0] for t, b in zip(timings, samples[BARE])]
        cpu = [t[1] / b[1] for t, b in zip(timings, samples[BARE])]
        results[key] = {
            "timing": tuple(statistics.median(t[i] for t in timings) for i in range(4)),
            "ratio": statistics.median(wall),
            "ratio_range": (min(wall), max(wall)),
            "cpu_ratio": statistics.median(cpu),
            "cpu_ratio_range": (min(cpu), max(cpu)),
        }
    return results


def print_table(results: dict[str, dict[str, dict[str, Any]]], batch_size: int, target: float) -> None:
    print(
        f"{'family / loop':<24} {'ms/step':>8} {'x bare':>6} {'(range)':>11} {'CPU ms/step':>11} "
        f"{'x bare':>6} {'(range)':>11} {'+CPU ms':>8} {'fixed s':>7}"
    )
    for arch, loops in results.items():
        print(arch)
        bare_cpu = loops[BARE]["timing"][1]
        for key, r in loops.items():
            wall, cpu, fixed, _ = r["timing"]
            lo, hi = r["ratio_range"]
            clo, chi = r["cpu_ratio_range"]
            print(
                f"  {key:<22} {1e3 * wall:>8.1f} {r['ratio']:>6.3f} {f'{lo:.2f}-{hi:.2f}':>11} "
                f"{1e3 * cpu:>11.1f} {r['cpu_ratio']:>6.3f} {f'{clo:.2f}-{chi:.2f}':>11} "
                f"{1e3 * (cpu - bare_cpu):>+8.1f} {fixed:>7.2f}"
            )
    print(
        f"\nsummary (median ratios to the bare timm loop; +CPU ms per step and per sample of batch {batch_size}):"
    )
    for arch, loops in results.items():
        bare_cpu = loops[BARE]["timing"][1]
        extra = {k: 1e3 * (loops[k]["timing"][1] - bare_cpu) for k in (WRAPPER, ENGINE)}
        print(
            f"  {arch:<18} wrapper: wall x{loops[WRAPPER]['ratio']:.3f}, CPU x{loops[WRAPPER]['cpu_ratio']:.3f} "
            f"({extra[WRAPPER]:+.1f} ms); wrapper + engine: wall x{loops[ENGINE]['ratio']:.3f}, "
            f"CPU x{loops[ENGINE]['cpu_ratio']:.3f} ({extra[ENGINE]:+.1f} ms, "
            f"{extra[ENGINE] / batch_size:+.2f} ms/sample)"
        )
    for key in (WRAPPER, ENGINE):
        worst_wall = max(loops[key]["ratio"] for loops in results.values())
        worst_cpu = max(loops[key]["cpu_ratio"] for loops in results.values())
        verdict = "met" if max(worst_wall, worst_cpu) <= target else "NOT met"
        print(
            f"target {key} / bare <= {target:.2f}: {verdict} (worst median ratio: wall {worst_wall:.3f}, "
            f"CPU {worst_cpu:.3f})"
        )


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--models", nargs="+", default=FAMILIES, help="timm architectures")
    parser.add_argument(
        "--threads", type=int, default=1, help="torch.set_num_threads (0 keeps torch's default)"
    )
    parser.add_argument(
        "--steps", type=int, default=10, help="optimizer steps per loop and repetition (>= 2)"
    )
    parser.add_argument("--reps", type=int, default=5, help="timed repetitions")
    parser.add_argument("--warmup", type=int, default=1, help="untimed repetitions first")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--size", type=int, default=128, help="image side (a multiple of 32)")
    parser.add_argument("--samples", type=int, default=32, help="dataset size (the loops cycle over it)")
    parser.add_argument("--target", type=float, default=1.03, help="largest acceptable ours/bare ratio")
    args = parser.parse_args(argv)
    if args.steps < 2:
        parser.error("--steps must be >= 2")
    if args.size % 32:
        parser.error("--size must be a multiple of 32 (no padding in either loop)")
    return args


def main(argv: Sequence[str] | None = None) -> dict[str, dict[str, dict[str, Any]]]:
    """Run the benchmark; returns ``arch -> loop -> {"timing", "ratio", "cpu_ratio", ...}`` (see run_family)."""
    args = parse_args(argv)
    threads = torch.get_num_threads()
    if args.threads:
        torch.set_num_threads(args.threads)
    used_threads = torch.get_num_threads()
    previous = os.environ.get("ACCELERATE_USE_CPU")
    os.environ["ACCELERATE_USE_CPU"] = "true"  # Accelerate would pick a GPU where one exists
    results: dict[str, dict[str, dict[str, Any]]] = {}
    try:
        with tempfile.TemporaryDirectory(prefix="hv_bench_backbone_") as tmp:
            for arch in args.models:
                results[arch] = run_family(arch, args, Path(tmp))
    finally:
        torch.set_num_threads(threads)
        if previous is None:
            os.environ.pop("ACCELERATE_USE_CPU", None)
        else:
            os.environ["ACCELERATE_USE_CPU"] = previous
    import timm

    given = list(sys.argv[1:] if argv is None else argv)
    print(
        "\n== timm backbone train step: ours (create_segmenter + Engine.fit) vs bare timm loop; "
        f"U-Net decoder, batch {args.batch_size}, {args.size}x{args.size}, {NUM_CLASSES} classes, fp32, "
        f"fused AdamW + clip 1.0, CPU, torch threads {used_threads}; {args.warmup} warmup + "
        f"{args.reps} reps x {args.steps} steps, interleaved; medians =="
    )
    omp = os.environ.get("OMP_NUM_THREADS", "unset")
    print(
        "command: " + " ".join([f"OMP_NUM_THREADS={omp}", "python benchmarks/backbone_overhead.py", *given])
    )
    print(f"CPU: {cpu_name()}; torch {torch.__version__}, timm {timm.__version__}")
    print_table(results, args.batch_size, args.target)
    return results


if __name__ == "__main__":
    main()
