"""Smoke tests: the benchmark scripts still run end to end at the smallest settings.

They check structure only (every row printed, every figure finite, nothing left on disk), never
timings.
"""

from __future__ import annotations

import importlib.util
import math
import tempfile
from pathlib import Path
from types import ModuleType

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def _load(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"_bench_{name}", BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def isolated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, Path]:
    """Temp files and the working directory both inside ``tmp_path``, to see what is left behind."""
    temp, cwd = tmp_path / "temp", tmp_path / "cwd"
    temp.mkdir()
    cwd.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(temp))
    monkeypatch.chdir(cwd)
    return temp, cwd


def _left_behind(dirs: tuple[Path, Path]) -> list[str]:
    """Files in the temp and working directories, except torch's own compile cache."""
    return sorted(p.name for d in dirs for p in d.iterdir() if not p.name.startswith("torchinductor_"))


@pytest.mark.slow
def test_pretrain_benchmark_runs(isolated: tuple[Path, Path], capsys: pytest.CaptureFixture[str]):
    bench = _load("pretrain")
    results = bench.main(
        ["--size", "32", "--batch-size", "2", "--reps", "1", "--warmup", "0", "--steps-per-rep", "1"]
        + ["--mim-encoders", "mit_nano", "--mim-size", "64", "--mim-batch-size", "2"]
        + ["--mim-reps", "1", "--mim-warmup", "0", "--dtypes", "fp32", "bf16"]
    )
    out = capsys.readouterr().out

    runners = ["ours (step)", "lightly", "ours (Engine.fit)", "lightly (1 pass of 2B)"]
    contrastive = results["contrastive"]
    assert set(contrastive) == set(runners) | {"ratio_step", "ratio_engine"}
    assert all(math.isfinite(v) and v > 0 for v in contrastive.values())
    for runner in runners:
        assert f"\n{runner} " in out
    expected = {("mit_nano", o, d) for o in ("mim", "contrastive_mim") for d in ("fp32", "bf16")}
    assert set(results["mim"]) == expected
    assert all(math.isfinite(v) and v > 0 for v in results["mim"].values())
    assert len([line for line in out.splitlines() if line.startswith("mit_nano ")]) == 4
    assert _left_behind(isolated) == []


def test_engine_overhead_benchmark_runs(isolated: tuple[Path, Path], capsys: pytest.CaptureFixture[str]):
    bench = _load("engine_overhead")
    results = bench.main(["--steps", "2", "--reps", "1", "--warmup", "0", "--samples", "32"])
    out = capsys.readouterr().out

    loops = ["bare PyTorch", "Engine (tb + bar)", "Engine (no trackers)"]
    assert list(results) == loops
    for loop in loops:
        assert len(results[loop]) == 4
        assert all(math.isfinite(v) for v in results[loop])
        assert f"\n{loop} " in out
    assert _left_behind(isolated) == []
