"""Pretraining throughput: our contrastive step vs lightly's SimCLR loop, and MIM / combined steps.

Usage::

    python benchmarks/pretrain.py                          # CPU defaults, a few minutes on 2 cores
    python benchmarks/pretrain.py --device cuda --batch-size 256 --size 224 --mim-size 224 --mim-batch-size 64
    python benchmarks/pretrain.py --skip-mim --reps 10     # only the lightly comparison

1. Contrastive (SimCLR, Chen et al., 2020), same backbone (default ``resnet18``), same batch of
   ``B`` image pairs already in memory, same optimizer (SGD, lr 0.06, no weight decay, as in
   lightly's example), fp32:

   * ``ours (step)`` — ``PretrainModel(create_encoder(backbone), "contrastive")`` run by the same
     ``step_fn`` as ``pretrain/run.py``, then backward, optimizer step, ``zero_grad`` (what
     ``Engine`` does around ``step_fn``, without the engine);
   * ``lightly`` — lightly's canonical SimCLR example: torchvision trunk (``children()[:-1]``) →
     flatten → ``SimCLRProjectionHead(C, C, 128)`` → ``NTXentLoss()``, one forward per view, then
     backward, ``optimizer.step()``, ``optimizer.zero_grad()``. Its weights are copied from ours
     (torchvision and our ResNet share module names), so both start from the same point;
   * ``ours (Engine.fit)`` — a short ``Engine.fit`` run of the same model and step (trackers and
     progress bar off, ``log_every=10``, ``grad_clip=0`` like lightly's loop, one checkpoint at
     the end): the step time is read between ``on_step_end`` callbacks, so it includes the
     engine's per-step work (DataLoader + collate from an in-memory dataset, finiteness check,
     log accumulation, scheduler) but not its setup or the final checkpoint.

   Every repetition runs ``--steps-per-rep`` steps of each runner, in an order that rotates from
   one repetition to the next; the first ``--warmup`` repetitions are not timed. The table shows
   the median images/s (an image = one pair of views) and the ratio to lightly.

2. MIM (SimMIM / SparK) and ``contrastive_mim`` train steps (forward + loss + backward + AdamW
   step, ``pretrain/run.py``'s step) of ``mit_b0``, ``swin_tiny`` and ``hybrid_small`` at fp32
   and under bf16 autocast. An image is one ``batch["image"]`` (plus, for ``contrastive_mim``,
   its two views). Objectives and dtypes of one encoder are interleaved in every repetition.

3. MIM on ``swin_tiny`` vs transformers' ``SwinForMaskedImageModeling`` (SimMIM), 192 x 192,
   batch 8, window 6, 32 px mask blocks by default: ours with the multiscale (SparK-style) decoder
   and with the pixel-shuffle head (every token encoded), ours encoding the visible tokens only
   (``objective.visible_only=true``, multiscale decoder), the same images, masks and AdamW, fp32
   and bf16 interleaved (see :func:`bench_simmim`; ``--simmim-*`` flags, ``--skip-simmim``).

4. With section 3: the full and the visible-only MIM step of the default encoders (conv stages,
   then attention stages: ``hybrid_nano``, pretraining's default, and ``sequential_tiny``, the
   default fine-tuning model's), same size, batch and masks, fp32 and bf16 interleaved: what
   skipping masked tokens saves when only the attention stages can skip them
   (``--visible-encoders``; none to skip).

``python benchmarks/pretrain.py --skip-contrastive --skip-mim`` runs sections 3 and 4 only (the
figures in ``benchmarks/results/pretrain_visible_only.txt``). The CPU, its bf16/AMX flags and what
``train.mixed_precision=auto`` picks on it are printed first.

Timings on a shared machine are noisy: compare figures from one run, not across runs.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import platform
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

_ROOT = Path(__file__).resolve().parents[1]
# `python benchmarks/pretrain.py` puts benchmarks/ first on sys.path, where this file would shadow
# the repository's `pretrain` package: put the repository root there instead.
_HERE = Path(__file__).resolve().parent
sys.path[:] = [str(_ROOT)] + [p for p in sys.path if Path(p or ".").resolve() not in (_HERE, _ROOT)]

import torch  # noqa: E402
from torch import Tensor, nn  # noqa: E402
from torch.utils.data import Dataset  # noqa: E402

from hybridvision.config import OptimConfig, TrainConfig  # noqa: E402
from hybridvision.engine import Engine, StepOutput  # noqa: E402
from hybridvision.models import create_encoder  # noqa: E402
from hybridvision.optim import build_optimizer  # noqa: E402
from pretrain.objectives import PretrainModel  # noqa: E402

DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
MIXED_PRECISION = {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}

# ---------------------------------------------------------------------------------------- helpers


def _now(device: torch.device) -> Tensor:
    """``(wall, process CPU)`` seconds now, after waiting for queued GPU work."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return torch.tensor([time.perf_counter(), time.process_time()], dtype=torch.float64)


def _autocast(device: torch.device, dtype: str) -> contextlib.AbstractContextManager:
    if DTYPES[dtype] is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=DTYPES[dtype])


def _rotated(keys: Sequence[str], rep: int) -> list[str]:
    """``keys`` rotated by ``rep``: every runner goes first, middle and last equally often."""
    k = rep % len(keys)
    return list(keys[k:]) + list(keys[:k])


def _interleave(
    runners: dict[str, Callable[[int], Tensor]], steps: int, warmup: int, reps: int
) -> dict[str, tuple[float, float]]:
    """Median ``(wall, CPU)`` seconds per step of every runner; runners alternate within a repetition."""
    times: dict[str, list[Tensor]] = {k: [] for k in runners}
    for rep in range(warmup + reps):
        for key in _rotated(list(runners), rep):
            elapsed = runners[key](steps)  # (2,) wall and CPU seconds
            if rep >= warmup:
                times[key].append(elapsed / steps)
    return {
        k: (statistics.median(float(t[0]) for t in v), statistics.median(float(t[1]) for t in v))
        for k, v in times.items()
    }


def step_fn(model: nn.Module, batch: dict[str, Tensor]) -> StepOutput:
    """``pretrain/run.py``'s step function (without image logging)."""
    out = model(batch)
    logs = {f"loss_{k}": v for k, v in out.terms.items()} | out.stats
    return StepOutput(loss=out.loss, logs=logs)


def loss_runner(
    model: nn.Module,
    loss_fn: Callable[[], Tensor],
    opt: torch.optim.Optimizer,
    device: torch.device,
    dtype: str,
) -> Callable[[int], Tensor]:
    """``steps`` train steps (``loss_fn()`` under autocast + backward + optimizer step); returns the
    seconds they took. Every runner of this file is one of these, so they time the same loop."""

    def run(steps: int) -> Tensor:
        model.train()
        start = _now(device)
        for _ in range(steps):
            with _autocast(device, dtype):
                loss = loss_fn()
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        return _now(device) - start

    return run


def bare_runner(
    model: nn.Module, batch: dict[str, Tensor], opt: torch.optim.Optimizer, device: torch.device, dtype: str
) -> Callable[[int], Tensor]:
    """``steps`` train steps of ``step_fn`` + backward + optimizer step; returns the seconds they took."""
    return loss_runner(model, lambda: step_fn(model, batch).loss, opt, device, dtype)


class _InMemoryPairs(Dataset):
    """Samples ``{"view0", "view1"}`` cut from a ready batch (repeated ``repeats`` times, so an
    epoch holds several batches, as with real data): the engine collates them again."""

    def __init__(self, batch: dict[str, Tensor], repeats: int = 8):
        self.batch = {k: v.cpu() for k, v in batch.items()}
        self.size = next(iter(self.batch.values())).shape[0]
        self.repeats = repeats

    def __len__(self) -> int:
        return self.size * self.repeats

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        return {k: v[i % self.size] for k, v in self.batch.items()}


def _reset_accelerate() -> None:
    """Forget the process-wide Accelerate singletons so that every ``Engine`` starts clean."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()


def engine_runner(
    model: nn.Module,
    dataset: Dataset,
    batch_size: int,
    optim: OptimConfig,
    root: Path,
    device: torch.device,
    dtype: str,
) -> Callable[[int], Tensor]:
    """``Engine.fit`` for ``steps + 1`` steps; returns the seconds between the 1st and last step end."""
    counter = itertools.count()

    def run(steps: int) -> Tensor:
        out_dir = root / f"fit_{next(counter)}"
        train = TrainConfig(
            output_dir=str(out_dir),
            max_steps=steps + 1,
            batch_size=batch_size,
            mixed_precision=MIXED_PRECISION[dtype],
            seed=0,
            resume="never",
            log_every=10,
            ckpt_every=steps + 1,
            grad_clip=0.0,
            progress_bar=False,
            trackers=[],
        )
        stamps: list[Tensor] = []
        _reset_accelerate()
        try:
            engine = Engine(train, optim, project_name="bench")
            engine.fit(model, dataset, step_fn, on_step_end=lambda _: stamps.append(_now(device)))
        finally:
            _reset_accelerate()
            shutil.rmtree(out_dir, ignore_errors=True)
        return stamps[-1] - stamps[0]

    return run


# ---------------------------------------------------------------------------------------- 1. contrastive


class LightlySimCLR(nn.Module):
    """lightly's SimCLR example model: backbone → flatten → ``SimCLRProjectionHead``."""

    def __init__(self, backbone: nn.Module, feature_dim: int, output_dim: int = 128):
        super().__init__()
        from lightly.models.modules import SimCLRProjectionHead

        self.backbone = backbone
        self.projection_head = SimCLRProjectionHead(feature_dim, feature_dim, output_dim)

    def forward(self, x: Tensor) -> Tensor:
        x = self.backbone(x).flatten(start_dim=1)  # (B, C, 1, 1) -> (B, C)
        return self.projection_head(x)


def build_contrastive_pair(backbone: str, device: torch.device) -> tuple[PretrainModel, LightlySimCLR]:
    """Our contrastive ``PretrainModel`` and lightly's SimCLR model with identical weights."""
    import torchvision

    torch.manual_seed(0)
    encoder = create_encoder(backbone)
    ours = PretrainModel(encoder, "contrastive", temperature=0.5, projection_dim=128)
    resnet = getattr(torchvision.models, backbone)(weights=None)
    missing, unexpected = resnet.load_state_dict(encoder.state_dict(), strict=False)
    if unexpected or sorted(missing) != ["fc.bias", "fc.weight"]:
        raise RuntimeError(f"{backbone}: our encoder does not match torchvision's ({missing}, {unexpected})")
    trunk = nn.Sequential(*list(resnet.children())[:-1])  # everything but fc; ends with avgpool
    theirs = LightlySimCLR(trunk, encoder.out_channels[-1])
    theirs.projection_head.load_state_dict(ours.objective.projection.state_dict())
    n_ours = sum(p.numel() for p in ours.parameters())
    n_theirs = sum(p.numel() for p in theirs.parameters())
    if n_ours != n_theirs:
        raise RuntimeError(f"parameter counts differ: ours {n_ours}, lightly {n_theirs}")
    return ours.to(device), theirs.to(device)


def lightly_runner(
    model: LightlySimCLR,
    x0: Tensor,
    x1: Tensor,
    opt: torch.optim.Optimizer,
    device: torch.device,
    dtype: str,
    one_pass: bool = False,
) -> Callable[[int], Tensor]:
    """lightly's SimCLR training loop body on a fixed batch.

    ``one_pass=False`` is lightly's example verbatim (``z0 = model(x0); z1 = model(x1)``);
    ``one_pass=True`` runs both views as one batch of ``2B``, as our objective does.
    """
    from lightly.loss import NTXentLoss

    criterion = NTXentLoss()

    def run(steps: int) -> Tensor:
        model.train()
        start = _now(device)
        for _ in range(steps):
            with _autocast(device, dtype):
                if one_pass:
                    z0, z1 = model(torch.cat([x0, x1])).chunk(2)  # (2B, D) -> 2 x (B, D)
                else:
                    z0 = model(x0)
                    z1 = model(x1)
            loss = criterion(z0.float(), z1.float())
            loss.backward()
            opt.step()
            opt.zero_grad()
        return _now(device) - start

    return run


def _table(rows: dict[str, tuple[float, float]], images: int, reference: str, cpu: bool) -> dict[str, float]:
    """Print ms/step, images/s and the ratio to ``reference`` (also in CPU time on the CPU)."""
    head = f"{'runner':<22} {'ms/step':>9} {'img/s':>8} {'vs ' + reference:>12}"
    print(head + (f" {'CPU-time ratio':>15}" if cpu else ""))
    ref_wall, ref_cpu = rows[reference]
    out = {}
    for key, (wall, cpu_s) in rows.items():
        out[key] = images / wall
        line = f"{key:<22} {1e3 * wall:>9.1f} {images / wall:>8.2f} {ref_wall / wall:>11.3f}x"
        print(line + (f" {ref_cpu / cpu_s:>14.3f}x" if cpu else ""))
    return out


def bench_contrastive(args: argparse.Namespace, device: torch.device, root: Path) -> dict[str, float]:
    """Section 1; returns median images/s per runner and our ratios to lightly's example."""
    ours, theirs = build_contrastive_pair(args.backbone, device)
    engine_model, theirs_one_pass = build_contrastive_pair(args.backbone, device)
    g = torch.Generator().manual_seed(0)
    shape = (args.batch_size, 3, args.size, args.size)
    batch = {
        "view0": torch.randn(shape, generator=g).to(device),
        "view1": torch.randn(shape, generator=g).to(device),
    }
    optim = OptimConfig(
        name="sgd", lr=0.06, momentum=0.0, weight_decay=0.0, warmup_steps=0, schedule="constant"
    )
    x0, x1 = batch["view0"], batch["view1"]
    runners = {
        "ours (step)": bare_runner(ours, batch, build_optimizer(ours, optim), device, args.dtype),
        "lightly": lightly_runner(
            theirs, x0, x1, torch.optim.SGD(theirs.parameters(), lr=0.06), device, args.dtype
        ),
        "ours (Engine.fit)": engine_runner(
            engine_model, _InMemoryPairs(batch), args.batch_size, optim, root, device, args.dtype
        ),
        "lightly (1 pass of 2B)": lightly_runner(
            theirs_one_pass,
            x0,
            x1,
            torch.optim.SGD(theirs_one_pass.parameters(), lr=0.06),
            device,
            args.dtype,
            True,
        ),
    }
    print(
        f"\n== contrastive (SimCLR) train step: {args.backbone}, batch {args.batch_size} x 2 views, "
        f"{args.size}x{args.size}, {args.dtype}, SGD, device {device}, threads {torch.get_num_threads()}; "
        f"{args.warmup} warmup + {args.reps} reps x {args.steps_per_rep} steps, interleaved; medians =="
    )
    times = _interleave(runners, args.steps_per_rep, args.warmup, args.reps)
    ips = _table(times, args.batch_size, "lightly", device.type == "cpu")
    return {
        **ips,
        "ratio_step": ips["ours (step)"] / ips["lightly"],
        "ratio_engine": ips["ours (Engine.fit)"] / ips["lightly"],
    }


# ---------------------------------------------------------------------------------------- 2. MIM


def bench_mim(args: argparse.Namespace, device: torch.device) -> dict[tuple[str, str, str], float]:
    """Section 2; returns median images/s per (encoder, objective, dtype)."""
    size, b = args.mim_size, args.mim_batch_size
    print(
        f"\n== MIM / contrastive_mim train step (AdamW): batch {b}, {size}x{size}, mask patch "
        f"{args.mask_patch_size}, device {device}, threads {torch.get_num_threads()}; "
        f"{args.mim_warmup} warmup + {args.mim_reps} reps, objectives and dtypes interleaved =="
    )
    cpu = device.type == "cpu"
    print(
        f"{'encoder':<14} {'objective':<16} {'dtype':<5} {'ms/step':>9} {'img/s':>8} {'vs fp32':>8}"
        + (f" {'CPU-time vs fp32':>17}" if cpu else "")
    )
    g = torch.Generator().manual_seed(1)
    shape = (b, 3, size, size)
    batch = {k: torch.randn(shape, generator=g).to(device) for k in ("image", "view0", "view1")}
    results: dict[tuple[str, str, str], float] = {}
    for name in args.mim_encoders:
        runners: dict[str, Callable[[int], Tensor]] = {}
        for objective in args.objectives:
            torch.manual_seed(0)
            model = PretrainModel(
                create_encoder(name), objective, in_chans=3, mask_patch_size=args.mask_patch_size
            ).to(device)
            opt = build_optimizer(model, OptimConfig())
            for dtype in args.dtypes:
                runners[f"{objective}|{dtype}"] = bare_runner(model, batch, opt, device, dtype)
        times = _interleave(runners, 1, args.mim_warmup, args.mim_reps)
        for key, (wall, cpu_s) in times.items():
            objective, dtype = key.split("|")
            results[(name, objective, dtype)] = b / wall
            base = times.get(f"{objective}|fp32")
            line = f"{name:<14} {objective:<16} {dtype:<5} {1e3 * wall:>9.1f} {b / wall:>8.2f}"
            if base is not None and dtype != "fp32":
                line += f" {base[0] / wall:>7.2f}x" + (f" {base[1] / cpu_s:>16.2f}x" if cpu else "")
            print(line)
        del runners, model, opt
    return results


# ---------------------------------------------------------------------------------------- 3. SimMIM reference


def _simmim_window(args: argparse.Namespace) -> int:
    """Window of both Swins: ``--simmim-window``, at most the last stage's side (stride 32)."""
    return max(1, min(args.simmim_window, args.simmim_size // 32))


def hf_simmim_runner(
    model: nn.Module,
    x: Tensor,
    bool_masked_pos: Tensor,
    opt: torch.optim.Optimizer,
    device: torch.device,
    dtype: str,
) -> Callable[[int], Tensor]:
    """transformers' ``SwinForMaskedImageModeling`` train step (its own L1 loss on masked pixels)."""
    return loss_runner(
        model, lambda: model(pixel_values=x, bool_masked_pos=bool_masked_pos).loss, opt, device, dtype
    )


def bench_simmim(args: argparse.Namespace, device: torch.device) -> dict[str, float]:
    """Section 3: our MIM step on ``swin_tiny`` vs transformers' SimMIM, same size, batch and mask.

    Ours: ``PretrainModel(swin_tiny, "mim")`` with the default multiscale (SparK-style) decoder and
    with SimMIM's pixel-shuffle head; transformers: ``SwinForMaskedImageModeling`` (Swin-T, the
    same window, stochastic depth 0.2, 1x1 conv + PixelShuffle(32) head, L1 on masked pixels).
    Both get the same images and the same 32 px block masks (``bool_masked_pos`` is our mask on
    the 4 px patch grid) and the same AdamW. Returns images/s per ``runner|dtype`` and the ratios.
    """
    from transformers import SwinConfig, SwinForMaskedImageModeling

    from pretrain.masking import BlockMaskGenerator

    size, b, window = args.simmim_size, args.simmim_batch_size, _simmim_window(args)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(b, 3, size, size, generator=g).to(device)
    mask = BlockMaskGenerator(size, args.mask_patch_size, 0.6)(b, generator=g)  # (B, 1, S/32, S/32)
    scale = args.mask_patch_size // 4  # mask cells -> 4 px patches
    bool_masked_pos = mask.repeat_interleave(scale, 2).repeat_interleave(scale, 3).flatten(1).to(device)
    batch = {"image": x, "mask": mask.to(device)}
    models: dict[str, nn.Module] = {}
    variants = {"multiscale": ("multiscale", False), "pixel_shuffle": ("pixel_shuffle", False)}
    variants["visible-only"] = ("multiscale", True)
    for label, (decoder, visible_only) in variants.items():
        torch.manual_seed(0)
        encoder = create_encoder("swin_tiny", window_size=window)
        models[f"ours ({label})"] = PretrainModel(
            encoder,
            "mim",
            in_chans=3,
            mask_patch_size=args.mask_patch_size,
            decoder=decoder,
            visible_only=visible_only,
        ).to(device)
    config = SwinConfig(image_size=size, window_size=window, encoder_stride=32, drop_path_rate=0.2)
    models["transformers SimMIM"] = SwinForMaskedImageModeling(config).to(device)
    runners: dict[str, Callable[[int], Tensor]] = {}
    for key, model in models.items():
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.05)
        for dtype in args.dtypes:
            if key.startswith("ours"):
                runners[f"{key}|{dtype}"] = bare_runner(model, batch, opt, device, dtype)
            else:
                runners[f"{key}|{dtype}"] = hf_simmim_runner(model, x, bool_masked_pos, opt, device, dtype)
    params = ", ".join(f"{k} {sum(p.numel() for p in m.parameters()) / 1e6:.1f} M" for k, m in models.items())
    print(
        f"\n== MIM train step vs transformers SwinForMaskedImageModeling: swin_tiny (window {window}), batch {b}, "
        f"{size}x{size}, mask patch {args.mask_patch_size}, ratio 0.6, AdamW, device {device}, "
        f"threads {torch.get_num_threads()}; {args.simmim_warmup} warmup + {args.simmim_reps} reps, interleaved =="
    )
    print(f"(parameters: {params})")
    times = _interleave(runners, 1, args.simmim_warmup, args.simmim_reps)
    results: dict[str, float] = {}
    for dtype in args.dtypes:
        print(f"-- {dtype}")
        rows = {k.split("|")[0]: v for k, v in times.items() if k.endswith(f"|{dtype}")}
        ips = _table(rows, b, "transformers SimMIM", device.type == "cpu")
        for key, value in ips.items():
            results[f"{key}|{dtype}"] = value
            if key != "transformers SimMIM":
                results[f"ratio {key}|{dtype}"] = value / ips["transformers SimMIM"]
        saving = ips["ours (visible-only)"] / ips["ours (multiscale)"]
        results[f"visible-only vs full|{dtype}"] = saving
        print(f"ours (visible-only) vs ours (multiscale), every token encoded: {saving:.3f}x")
    return results


def bench_visible_only(args: argparse.Namespace, device: torch.device) -> dict[str, float]:
    """Section 4: full vs visible-only MIM step of encoders whose first stages are convolutional.

    Same size, batch, masks and AdamW as :func:`bench_simmim`, the default (multiscale) decoder;
    their conv stages compute every position either way (SparK-style masking), so only the
    attention stages skip masked tokens. Returns images/s per ``encoder|mode|dtype`` and the
    visible-only / full ratio per ``encoder|dtype``.
    """
    from pretrain.masking import BlockMaskGenerator

    size, b = args.simmim_size, args.simmim_batch_size
    g = torch.Generator().manual_seed(2)
    x = torch.randn(b, 3, size, size, generator=g).to(device)
    mask = BlockMaskGenerator(size, args.mask_patch_size, 0.6)(b, generator=g).to(device)
    batch = {"image": x, "mask": mask}
    runners: dict[str, Callable[[int], Tensor]] = {}
    for name in args.visible_encoders:
        for mode in ("full", "visible-only"):
            torch.manual_seed(0)
            model = PretrainModel(
                create_encoder(name),
                "mim",
                in_chans=3,
                mask_patch_size=args.mask_patch_size,
                visible_only=mode == "visible-only",
            ).to(device)
            opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.05)
            for dtype in args.dtypes:
                runners[f"{name}|{mode}|{dtype}"] = bare_runner(model, batch, opt, device, dtype)
    print(
        f"\n== MIM train step, every token vs visible tokens only in the attention stages: batch {b}, "
        f"{size}x{size}, mask patch {args.mask_patch_size}, ratio 0.6, AdamW, device {device}, "
        f"threads {torch.get_num_threads()}; {args.simmim_warmup} warmup + {args.simmim_reps} reps, interleaved =="
    )
    times = _interleave(runners, 1, args.simmim_warmup, args.simmim_reps)
    print(f"{'encoder':<16} {'dtype':<5} {'full ms':>9} {'visible-only ms':>16} {'speed-up':>9}")
    results: dict[str, float] = {}
    for name in args.visible_encoders:
        for dtype in args.dtypes:
            full, visible = times[f"{name}|full|{dtype}"][0], times[f"{name}|visible-only|{dtype}"][0]
            results[f"{name}|full|{dtype}"] = b / full
            results[f"{name}|visible-only|{dtype}"] = b / visible
            results[f"{name}|{dtype}"] = full / visible
            print(f"{name:<16} {dtype:<5} {1e3 * full:>9.1f} {1e3 * visible:>16.1f} {full / visible:>8.3f}x")
    return results


def machine_line(device: torch.device) -> str:
    """The CPU model, its bf16 / AMX flags and what ``train.mixed_precision=auto`` picks here."""
    from hybridvision.engine.precision import resolve_mixed_precision

    model, flags = platform.processor() or platform.machine(), set()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                model = value.strip()
            elif key.strip() == "flags":
                flags = set(value.split())
    wanted = ("avx2", "avx512f", "avx512_bf16", "amx_tile", "amx_bf16")
    present = " ".join(f if f in flags else f"no {f}" for f in wanted)
    mode, why = resolve_mixed_precision() if device.type == "cpu" else ("(GPU)", "")
    return (
        f"machine: {model}; flags: {present}; torch {torch.__version__}, {torch.get_num_threads()} threads; "
        f"train.mixed_precision=auto picks {mode} ({why})"
    )


# ---------------------------------------------------------------------------------------- main


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch.set_num_threads (CPU; 1 is steadier on a busy machine)",
    )
    contrastive = parser.add_argument_group("contrastive vs lightly")
    contrastive.add_argument("--backbone", default="resnet18", choices=["resnet18", "resnet34", "resnet50"])
    contrastive.add_argument("--batch-size", type=int, default=32, help="image pairs per step")
    contrastive.add_argument("--size", type=int, default=64, help="view side in pixels")
    contrastive.add_argument("--dtype", default="fp32", choices=sorted(DTYPES))
    contrastive.add_argument("--reps", type=int, default=5, help="timed repetitions")
    contrastive.add_argument("--warmup", type=int, default=1, help="untimed repetitions first")
    contrastive.add_argument(
        "--steps-per-rep", type=int, default=2, help="steps of each runner per repetition"
    )
    contrastive.add_argument("--skip-contrastive", action="store_true")
    mim = parser.add_argument_group("MIM and contrastive_mim")
    mim.add_argument("--mim-encoders", nargs="+", default=["mit_b0", "swin_tiny", "hybrid_small"])
    mim.add_argument(
        "--objectives", nargs="+", default=["mim", "contrastive_mim"], choices=["mim", "contrastive_mim"]
    )
    mim.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"], choices=sorted(DTYPES))
    mim.add_argument("--mim-batch-size", type=int, default=8)
    mim.add_argument("--mim-size", type=int, default=96, help="image side; a multiple of --mask-patch-size")
    mim.add_argument("--mask-patch-size", type=int, default=32)
    mim.add_argument("--mim-reps", type=int, default=3)
    mim.add_argument("--mim-warmup", type=int, default=1)
    mim.add_argument("--skip-mim", action="store_true")
    simmim = parser.add_argument_group(
        "MIM vs transformers SimMIM (runs when swin_tiny is among --mim-encoders, the default)"
    )
    simmim.add_argument("--simmim-size", type=int, default=192, help="image side; a multiple of 32")
    simmim.add_argument("--simmim-batch-size", type=int, default=8)
    simmim.add_argument("--simmim-window", type=int, default=6, help="Swin window (capped at size / 32)")
    simmim.add_argument("--simmim-reps", type=int, default=3)
    simmim.add_argument("--simmim-warmup", type=int, default=1)
    simmim.add_argument("--skip-simmim", action="store_true")
    simmim.add_argument(
        "--visible-encoders",
        nargs="*",
        default=["hybrid_nano", "sequential_tiny"],
        help="section 4: encoders timed full vs visible-only beside section 3 (none: skip)",
    )
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run the benchmark; returns the printed figures (images/s and ratios)."""
    args = parse_args(argv)
    device = torch.device(args.device)
    threads = torch.get_num_threads()
    if args.threads:
        torch.set_num_threads(args.threads)
    results: dict[str, Any] = {}
    try:
        with tempfile.TemporaryDirectory(prefix="hv_bench_pretrain_") as tmp, _cpu_accelerate(device):
            if not args.skip_contrastive:
                results["contrastive"] = bench_contrastive(args, device, Path(tmp))
            if not args.skip_mim:
                results["mim"] = bench_mim(args, device)
            if not args.skip_simmim and "swin_tiny" in args.mim_encoders:
                print(machine_line(device))
                results["simmim"] = bench_simmim(args, device)
                if args.visible_encoders:
                    results["visible_only"] = bench_visible_only(args, device)
    finally:
        torch.set_num_threads(threads)
    print("\n(shared machine: figures are noisy; compare within one run)")
    return results


@contextlib.contextmanager
def _cpu_accelerate(device: torch.device):
    """Make Accelerate use the CPU when ``--device cpu`` (even where a GPU exists)."""
    import os

    previous = os.environ.get("ACCELERATE_USE_CPU")
    if device.type == "cpu":
        os.environ["ACCELERATE_USE_CPU"] = "true"
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop("ACCELERATE_USE_CPU", None)
        else:
            os.environ["ACCELERATE_USE_CPU"] = previous


if __name__ == "__main__":
    main()
