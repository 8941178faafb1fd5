"""``train.mixed_precision=auto``: the GPU rules and the CPU decision from a measured, cached figure.

The measurement is injected everywhere but in the one test that only checks it returns a ratio:
no timing is asserted.
"""

from __future__ import annotations

import builtins
import json
import math
from pathlib import Path

import pytest
import torch

from hybridvision import engine
from hybridvision.engine import CPU_BF16_MIN_SPEEDUP, precision, resolve_mixed_precision


class _Measure:
    """A stand-in measurement returning ``value`` and counting its calls."""

    def __init__(self, value: float):
        self.value = value
        self.calls = 0

    def __call__(self) -> float:
        self.calls += 1
        return self.value


@pytest.fixture
def cpu_only(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("ACCELERATE_USE_CPU", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


def test_gpus_use_bf16_where_supported_else_fp16_and_never_measure(monkeypatch: pytest.MonkeyPatch, tmp_path):
    monkeypatch.delenv("ACCELERATE_USE_CPU", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    measure = _Measure(0.5)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert resolve_mixed_precision(measure, tmp_path / "p.json")[0] == "fp16"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert resolve_mixed_precision(measure, tmp_path / "p.json")[0] == "bf16"
    assert measure.calls == 0 and not (tmp_path / "p.json").exists()
    monkeypatch.setenv("ACCELERATE_USE_CPU", "true")  # a GPU machine told to train on its CPU
    assert resolve_mixed_precision(measure, tmp_path / "p.json")[0] == "no"
    assert measure.calls == 1


@pytest.mark.parametrize(
    "speedup, expected",
    [
        (0.6, "no"),  # AVX512-BF16 without AMX on one machine: bf16 GEMMs at 0.6x fp32
        (CPU_BF16_MIN_SPEEDUP - 0.01, "no"),
        (CPU_BF16_MIN_SPEEDUP, "bf16"),
        (2.1, "bf16"),  # AVX512-BF16 on another: 2x faster
    ],
)
def test_cpu_decision_follows_the_measured_speedup(cpu_only, tmp_path: Path, speedup: float, expected: str):
    mode, note = resolve_mixed_precision(_Measure(speedup), tmp_path / "p.json")
    assert mode == expected
    assert f"{speedup:.2f}x the fp32 speed" in note and "measured now" in note


def test_cpu_figure_is_measured_once_per_machine(cpu_only, monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    path = tmp_path / "hv" / "precision.json"
    first = _Measure(2.0)
    assert resolve_mixed_precision(first, path)[0] == "bf16"
    again = _Measure(0.5)  # would say "no" if it were called
    mode, note = resolve_mixed_precision(again, path)
    assert (mode, first.calls, again.calls) == ("bf16", 1, 0)
    assert "2.00x" in note and f"cached in {path}" in note
    key = engine.cpu_signature()
    assert json.loads(path.read_text())[key]["bf16_speedup"] == 2.0
    # another CPU, torch version or thread count is another key: measured again, both kept
    monkeypatch.setattr(precision, "cpu_signature", lambda: "another machine")
    assert resolve_mixed_precision(again, path)[0] == "no"
    assert again.calls == 1
    assert set(json.loads(path.read_text())) == {key, "another machine"}


def test_unreadable_or_unwritable_cache_still_decides(cpu_only, tmp_path: Path):
    corrupt = tmp_path / "p.json"
    corrupt.write_text("{not json")
    assert resolve_mixed_precision(_Measure(2.0), corrupt)[0] == "bf16"
    assert next(iter(json.loads(corrupt.read_text()).values()))["bf16_speedup"] == 2.0  # rewritten
    blocker = tmp_path / "a file"
    blocker.write_text("")
    mode, note = resolve_mixed_precision(_Measure(0.5), blocker / "hv" / "p.json")
    assert mode == "no" and "not cached" in note


def test_default_cache_follows_xdg_cache_home(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert engine.precision_cache_path() == tmp_path / "hybridvision" / "precision.json"


def test_cpu_signature_names_the_cpu_its_flags_torch_and_threads(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
):
    real_open = builtins.open

    def cpuinfo(flags: str):
        (tmp_path / "cpuinfo").write_text(
            f"processor\t: 0\nmodel name\t: Test CPU 9000\nflags\t\t: fpu {flags}\n"
        )
        return lambda path, *a, **k: real_open(
            tmp_path / "cpuinfo" if path == "/proc/cpuinfo" else path, *a, **k
        )

    monkeypatch.setattr(builtins, "open", cpuinfo("avx512_bf16 avx512_vnni"))
    no_amx = engine.cpu_signature()
    monkeypatch.setattr(builtins, "open", cpuinfo("avx512_vnni avx512_bf16"))
    assert engine.cpu_signature() == no_amx  # flag order does not matter
    monkeypatch.setattr(builtins, "open", cpuinfo("avx512_bf16 avx512_vnni amx_bf16 amx_tile"))
    amx = engine.cpu_signature()
    assert amx != no_amx
    assert amx.startswith("Test CPU 9000 |") and f"torch {torch.__version__}" in amx
    assert f"{torch.get_num_threads()} threads" in amx


def test_measurement_returns_a_ratio():
    ratio = engine.measure_cpu_bf16_speedup(reps=1)
    assert math.isfinite(ratio) and ratio > 0
