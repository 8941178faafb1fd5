"""``train.mixed_precision=auto``: the autocast mode that trains fastest on this machine.

GPUs follow a rule (bf16 where supported, else fp16); CPUs are measured once per machine and the
figure is cached in :func:`precision_cache_path`, keyed by :func:`cpu_signature`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Literal

import torch

from ..config import ConfigError, TrainConfig
from ..io import write_json_atomic

#: bf16 autocast is chosen on a CPU only where its matmuls and convolutions ran at least this much
#: faster than fp32: norms, elementwise ops and the casts autocast adds gain nothing from bf16, so a
#: GEMM speed-up near 1 still means slower training steps (benchmarks/precision.py).
CPU_BF16_MIN_SPEEDUP = 1.2


def use_cpu_forced() -> bool:
    """Whether ``ACCELERATE_USE_CPU`` tells Accelerate to train on the CPU despite a GPU."""
    return os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes")


def settle_mixed_precision(train: TrainConfig) -> tuple[TrainConfig, str]:
    """``train`` with ``mixed_precision=auto`` replaced by the mode it stands for (a copy).

    Returns:
        The resolved copy (the input is left as given) and why ``auto`` became what it did, or
        ``""`` when the mode was set explicitly.

    Raises:
        ConfigError: fp16 was asked for without a CUDA GPU.
    """
    note = ""
    if train.mixed_precision == "auto":
        mode, note = resolve_mixed_precision()
        train = dataclasses.replace(train, mixed_precision=mode)
    if train.mixed_precision == "fp16" and (not torch.cuda.is_available() or use_cpu_forced()):
        raise ConfigError(
            "train.mixed_precision=fp16 needs a CUDA GPU; on CPU use train.mixed_precision=bf16"
        )
    return train, note


def precision_cache_path() -> Path:
    """Where CPU precision measurements are kept.

    ``$XDG_CACHE_HOME/hybridvision/precision.json`` (``~/.cache`` by default). Delete it to measure
    again.
    """
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(root) / "hybridvision" / "precision.json"


def cpu_signature() -> str:
    """What a CPU precision measurement depends on: CPU model, its ISA flags, torch, threads."""
    model, flags = "", ""
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                key, _, value = line.partition(":")
                if key.strip() == "model name" and not model:
                    model = value.strip()
                elif key.strip() == "flags" and not flags:
                    flags = value.strip()
                if model and flags:
                    break
    except OSError:  # not Linux
        pass
    import hashlib
    import platform

    digest = hashlib.sha1(" ".join(sorted(flags.split())).encode()).hexdigest()[:12]
    model = model or platform.processor() or platform.machine() or "unknown CPU"
    return f"{model} | flags {digest} | torch {torch.__version__} | {torch.get_num_threads()} threads"


def measure_cpu_bf16_speedup(reps: int = 5) -> float:
    """fp32 time over bf16-autocast time of typical training shapes on this CPU (above 1: bf16 is faster).

    Two ``nn.Linear`` calls of a Swin/ViT MLP ((2048, 192) -> 768 -> 192) and a 3x3 convolution of a
    U-Net stage ((2, 64, 32, 32)), forward only, autocast casts included; the best of ``reps``
    interleaved runs of each (the least disturbed by other processes). A few hundred ms on one thread.
    """
    import torch.nn.functional as F

    g = torch.Generator().manual_seed(0)
    x = torch.randn(2048, 192, generator=g)
    w1, w2 = torch.randn(768, 192, generator=g), torch.randn(192, 768, generator=g)
    image, kernel = torch.randn(2, 64, 32, 32, generator=g), torch.randn(64, 64, 3, 3, generator=g)

    def ops() -> None:
        F.linear(F.linear(x, w1), w2)
        F.conv2d(image, kernel, padding=1)

    best = {False: math.inf, True: math.inf}
    with torch.no_grad():
        for rep in range(reps + 1):
            for bf16 in (False, True):
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                    start = time.perf_counter()
                    ops()
                    elapsed = time.perf_counter() - start
                if rep:  # the first run of each warms up oneDNN's kernel caches
                    best[bf16] = min(best[bf16], elapsed)
    return best[False] / best[True]


def _cached_cpu_bf16_speedup(measure: Callable[[], float], path: Path) -> tuple[float, str]:
    """(speedup, where it came from): the cached figure for :func:`cpu_signature`.

    Else ``measure()``, stored there. Processes of one machine starting together (a multi-process launch) take a file
    lock, so one measures (undisturbed) and the others read its figure: every rank picks the same.
    """
    key = cpu_signature()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        lock = open(path.with_name(path.name + ".lock"), "a")  # noqa: SIM115 (closed below)
    except OSError as exc:
        return float(measure()), f"measured now, not cached: {exc}"
    with lock:
        try:
            import fcntl

            fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file is closed
        except (ImportError, OSError):  # Windows, or a file system without locks
            pass
        try:
            cache = json.loads(path.read_text())
            cache = cache if isinstance(cache, dict) else {}
        except (OSError, ValueError):
            cache = {}
        entry = cache.get(key)
        if isinstance(entry, dict) and isinstance(entry.get("bf16_speedup"), (int, float)):
            return float(entry["bf16_speedup"]), f"measured {entry.get('measured', '?')}, cached in {path}"
        speedup = float(measure())
        cache[key] = {"bf16_speedup": round(speedup, 3), "measured": time.strftime("%Y-%m-%d")}
        try:
            write_json_atomic(path, cache)
        except OSError as exc:
            return speedup, f"measured now, not cached: {exc}"
        return speedup, f"measured now, cached in {path}"


def resolve_mixed_precision(
    measure: Callable[[], float] | None = None, cache_path: Path | None = None
) -> tuple[Literal["no", "bf16", "fp16"], str]:
    """``train.mixed_precision=auto``: the autocast mode that trains fastest here, and why.

    GPU: ``bf16`` where supported (Ampere and later), else ``fp16`` (with GradScaler). CPU: measured,
    since the ISA flags do not tell (bf16 GEMMs ran 2x faster than fp32 on one AVX512-BF16 CPU and
    0.6x on another): ``bf16`` where bf16 matmuls and convolutions ran at least
    :data:`CPU_BF16_MIN_SPEEDUP` times faster than fp32, else ``no``. The figure is measured once per
    machine (:func:`cpu_signature`) and cached in :func:`precision_cache_path`.

    Args:
        measure: returns fp32 time / bf16 time; default :func:`measure_cpu_bf16_speedup`.
        cache_path: the cache file; default :func:`precision_cache_path`.
    """
    if torch.cuda.is_available() and not use_cpu_forced():
        if torch.cuda.is_bf16_supported():
            return "bf16", "GPU with bf16 support"
        return "fp16", "GPU without bf16 support: fp16 with loss scaling"
    speedup, source = _cached_cpu_bf16_speedup(
        measure or measure_cpu_bf16_speedup, cache_path or precision_cache_path()
    )
    mode: Literal["no", "bf16"] = "bf16" if speedup >= CPU_BF16_MIN_SPEEDUP else "no"
    return mode, (
        f"CPU: bf16 matmuls and convolutions ran at {speedup:.2f}x the fp32 speed, bf16 needs "
        f">= {CPU_BF16_MIN_SPEEDUP}x; {source}"
    )
