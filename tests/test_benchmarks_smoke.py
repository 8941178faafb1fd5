"""Smoke tests: the benchmark scripts still run end to end at the smallest settings.

They check structure only (every row printed, every figure finite, nothing left on disk), never
timings.
"""

from __future__ import annotations

import importlib.util
import json
import math
import multiprocessing
import multiprocessing.util
import re
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def _load(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"_bench_{name}", BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses with postponed annotations look their module up
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def isolated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[Path, Path]]:
    """Temp files and the working directory both inside ``tmp_path``, to see what is left behind.

    multiprocessing keeps the temp folder it first uses for the rest of the process (DataLoader
    workers share tensors over AF_UNIX sockets made there, paths of at most 107 bytes): it is made
    in the real temp folder before the patch, so no later test of this pytest worker inherits a
    socket folder under this test's long, soon deleted path.
    """
    multiprocessing.util.get_temp_dir()
    temp, cwd = tmp_path / "temp", tmp_path / "cwd"
    temp.mkdir()
    cwd.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(temp))
    monkeypatch.chdir(cwd)
    yield temp, cwd


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


def test_peers_seg_benchmark_runs(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    """Ours and a transformers SegFormer trained by the same fine-tuning pipeline; then --summarize."""
    bench = _load("peers_seg")
    config = tmp_path / "tiny.yaml"
    config.write_text(
        "train: {max_steps: 2, batch_size: 2, mixed_precision: 'no', ckpt_every: 2, eval_every: 0}\n"
        "data: {num_classes: 1, image_size: [32, 32], synthetic_samples: 8, synthetic_val_samples: 3}\n"
        "model: {name: hybrid_nano, init: ''}\n"
    )
    result = tmp_path / "res.json"
    runs = str(tmp_path / "runs")
    args = ["--config", str(config), "--models", "ours", "hf_segformer_b0", "--output-root", runs]
    assert bench.main([*args, "--json", str(result), "train.seed=3"]) == 0
    rows = json.loads(result.read_text())
    assert [r["model"] for r in rows] == ["ours", "hf_segformer_b0"]
    for row in rows:
        assert row["resolved_config"]["train"]["seed"] == 3
        assert row["params"] > 0 and 0.0 <= row["metrics"]["miou"] <= 1.0
        assert row["steps"] == 2 and 0 < row["train_cpu_s"] < 10 * row["train_wall_s"] + 10
        assert len(row["metrics"]["iou"]) == 2  # binary: background + foreground
        assert (Path(row["output_dir"]) / "metrics.json").is_file()
    assert rows[0]["label"] == "ours (hybrid_nano, scratch)"
    capsys.readouterr()
    assert bench.main(["--summarize", str(result)]) == 0
    out = capsys.readouterr().out
    assert "| tiny | ours (hybrid_nano, scratch) | 3 |" in out
    assert "Mean over seeds" in out and "| tiny | hf_segformer_b0 | 2 | 1 |" in out  # steps, runs


def test_peers_seg_reports_an_interrupted_run_instead_of_scoring_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
):
    bench = _load("peers_seg")
    monkeypatch.setattr(bench, "finetune_main", lambda cfg, model=None: {})  # a signal stopped it
    monkeypatch.setattr(bench, "pending_exit_code", lambda: 143)
    cfg = bench.FinetuneConfig()
    cfg.train.output_dir = str(tmp_path / "ours")
    with pytest.raises(SystemExit) as stop:
        bench.run_one("ours", cfg)
    assert stop.value.code == 143
    assert "interrupted" in capsys.readouterr().err


@pytest.mark.slow
def test_distill_benchmark_runs(isolated: tuple[Path, Path], capsys: pytest.CaptureFixture[str]):
    """Every loop of benchmarks/distill.py prints a finite row (no timing asserted)."""
    bench = _load("distill")
    bench.main(["--size", "64", "--batch-size", "2", "--reps", "1", "--steps", "1", "--warmup", "1"])
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if "x " in line and "ms/step" not in line]
    names = ("student alone", "+kd, teacher fp32", "+kd, teacher bf16", "+kd+cwd+dist+feature, teacher bf16")
    for name in names:
        row = next(r for r in rows if r.startswith(name))
        ms = float(row[len(name) :].split()[0])
        assert math.isfinite(ms) and ms > 0
    assert "teacher in bf16 vs fp32" in out
    assert _left_behind(isolated) == []


def test_encoders_benchmark_prints_every_row(capsys: pytest.CaptureFixture[str]):
    """Every row of benchmarks/encoders.py (tiny models of each family) prints finite figures."""
    bench = _load("encoders")
    rows = list(bench.build_rows())
    results = bench.main("--tiny --size-scale 0.15 --batch-size 2 --reps 1 --warmup 0 --dtypes fp32".split())
    out = capsys.readouterr().out
    assert list(results) == rows
    for name in rows:
        line = next(line for line in out.splitlines() if line.startswith(f"{name} "))
        figures = results[name]["fp32"]
        references = [k for k in figures if k != "ours"]
        assert references and line.count("|") == len(references)
        assert math.isfinite(figures["ours"]) and figures["ours"] > 0
        for ref in references:
            assert all(math.isfinite(v) and v > 0 for v in figures[ref].values()), (name, ref)


@pytest.mark.slow
def test_export_benchmark_runs(isolated: tuple[Path, Path], capsys: pytest.CaptureFixture[str]):
    """PyTorch vs onnxruntime fp32 vs int8 rows for a teacher and a student (no timing asserted)."""
    bench = _load("export")
    args = ["--teacher", "unet_resnet_nano", "--student", "segformer_nano", "--num-classes", "3", "--extra"]
    args += ["--runtimes", "onnxruntime"]  # OpenVINO in-process breaks later forks (tests/test_openvino.py)
    bench.main([*args, "--size", "32", "32", "--reps", "1", "--warmup", "0", "--calibration-count", "2"])
    out = capsys.readouterr().out
    rows = [line.split() for line in out.splitlines() if "onnxruntime " in line or "pytorch eager" in line]
    rows = [row for row in rows if "fastest" not in row]
    assert len(rows) == 6  # teacher and student x eager, fp32, int8
    for row in rows:
        ms = float(row[-5])
        assert math.isfinite(ms) and ms > 0
    assert out.count("fastest exported: onnxruntime") == 2 and not re.search(r"\bnan\b", out.lower())
    assert _left_behind(isolated) == []


def test_make_varsize_rescales_images_and_masks_together(tmp_path: Path):
    import numpy as np
    from PIL import Image

    bench = _load("make_varsize")
    src = tmp_path / "src"
    for split in ("train", "test"):
        (src / "images" / split).mkdir(parents=True)
        (src / "masks" / split).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(np.full((36, 48, 3), 40 * i, np.uint8)).save(src / "images" / split / f"{i}.png")
            Image.fromarray(np.full((36, 48), i, np.uint8)).save(src / "masks" / split / f"{i}.png")
    out = tmp_path / "out"
    assert bench.main([str(src), str(out), "--min", "16", "--max", "128"]) == 0
    shorts = []
    for split in ("train", "test"):
        for i in range(3):
            image = Image.open(out / "images" / split / f"{i}.jpg")
            mask = Image.open(out / "masks" / split / f"{i}.png")
            assert image.size == mask.size and set(np.unique(np.array(mask))) == {i}
            assert 16 <= min(image.size) <= 128 and abs(image.size[0] / image.size[1] - 48 / 36) < 0.05
            shorts.append(min(image.size))
    assert len(set(shorts)) > 1  # sizes vary


def test_precision_benchmark_prints_every_op(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
):
    bench = _load("precision")
    monkeypatch.setattr(bench, "LINEARS", [(64, 16, 32), (32, 8, 8)])
    monkeypatch.setattr(bench, "CONVS", [(4, 8)])
    ratios = bench.main(["--reps", "1"])
    out = capsys.readouterr().out
    assert list(ratios) == ["linear 64x16 -> 32", "linear 32x8 -> 8", "conv3x3 8x4x8x8"]
    for name, ratio in ratios.items():
        assert math.isfinite(ratio) and ratio > 0
        assert any(line.startswith(name) for line in out.splitlines())


def test_backbones_table_runs_one_model(
    tmp_path: Path, isolated: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
):
    """benchmarks/backbones.py on one timm model: every column filled, every check passing."""
    pytest.importorskip("timm")
    bench = _load("backbones")
    output = tmp_path / "table.md"
    args = ["--models", "timm/convnextv2_atto", "--size", "64", "--output", str(output)]
    (row,) = bench.main(args)
    out = capsys.readouterr().out
    assert row["strides"] == (4, 8, 16, 32) and row["input_size"] is None
    assert 3.0 < row["params_m"] < 3.6  # ConvNeXt-V2 atto without its head: 3.39 M
    assert 0 < row["encoder_gmacs"] < row["gmacs"] and math.isfinite(row["gmacs"])
    assert row["train"] == "✓" and row["mim"].startswith("✓") and row["onnx"].startswith("✓ (dynamic")
    line = next(line for line in out.splitlines() if "`timm/convnextv2_atto`" in line)
    assert line.count("|") == len(bench.COLUMNS) + 1 and "@64²" in line
    assert output.read_text() in out and "CPU: " in out and "--models timm/convnextv2_atto" in out
    assert _left_behind(isolated) == []  # the ONNX files went to a temporary directory, now removed


def test_backbone_overhead_benchmark_runs(isolated: tuple[Path, Path], capsys: pytest.CaptureFixture[str]):
    """The three loops of benchmarks/backbone_overhead.py print finite rows (no timing asserted)."""
    pytest.importorskip("timm")
    bench = _load("backbone_overhead")
    args = ["--models", "convnextv2_atto", "--steps", "2", "--reps", "1", "--warmup", "0"]
    results = bench.main([*args, "--batch-size", "2", "--size", "32", "--samples", "4"])
    out = capsys.readouterr().out
    loops = results["convnextv2_atto"]
    assert list(loops) == [bench.BARE, bench.WRAPPER, bench.ENGINE]
    for loop, r in loops.items():
        assert all(math.isfinite(v) and v > 0 for v in (*r["timing"][:2], r["ratio"], r["cpu_ratio"]))
        assert f"\n  {loop} " in out
    assert loops[bench.BARE]["ratio"] == 1.0
    assert "\nconvnextv2_atto\n" in out and out.count("\ntarget ours") == 2
    assert _left_behind(isolated) == []


def test_label_efficiency_plan_and_summary(tmp_path: Path):
    """The plan's runs and dependencies, and the table of finished runs (a student's labels are its teacher's)."""
    import json

    bench = _load("label_efficiency")
    plan = bench.Plan(
        data=str(tmp_path / "data"),
        finetune="f.yaml",
        pretrain="p.yaml",
        pool={"train": ["3"], "test": []},
        fractions=(0.5, 1.0),
        self_training=(0.5,),
    )
    for split, ids in {"train": ["1", "2", "3"], "test": ["9"]}.items():
        (tmp_path / "data" / "images" / split).mkdir(parents=True)
        for i in ids:
            (tmp_path / "data" / "images" / split / f"{i}.png").write_bytes(b"")
    work = tmp_path / "work" / "camvid"
    runs = bench.plan_runs("camvid", plan, [0], work, 10, ["pretrained"])
    assert sorted(p.name for p in (work / "pool").iterdir()) == ["test_9.png", "train_1.png", "train_2.png"]
    names = [r.name for r in runs]
    assert (
        names[0] == "camvid/pretrain" and len(runs) == 1 + 2 * 2 + 2
    )  # pretrain, 2 fractions x 2 inits, 2 students
    by_name = {r.name: r for r in runs}
    assert by_name["camvid/pretrained_f0.5_s0"].after == ("camvid/pretrain",)
    assert by_name["camvid/scratch+self_training_f0.5_s0"].after == ("camvid/scratch_f0.5_s0",)
    assert "data.label_fraction=0.5" in by_name["camvid/scratch_f0.5_s0"].argv
    # finished runs -> rows; a partial metrics.json is not finished
    for name, metrics in {
        "scratch_f0.5_s0": {"miou": 0.3, "labelled_ids": ["a", "b"]},
        "scratch_f1.0_s0": {"miou": 0.4},
        "scratch+self_training_f0.5_s0": {"student": {"miou": 0.35}},
        "pretrained_f0.5_s0": {"step": 3, "partial": True},
    }.items():
        (work / name).mkdir(parents=True)
        (work / name / "metrics.json").write_text(json.dumps(metrics))
    rows = bench.collect(tmp_path / "work")
    got = {(r["method"], r["fraction"]): (r["score"], r["labelled"]) for r in rows}
    assert got == {
        ("scratch", 0.5): (0.3, 2),
        ("scratch", 1.0): (0.4, "all"),
        ("scratch+self_training", 0.5): (0.35, 2),
    }
    assert not by_name["camvid/pretrained_f0.5_s0"].done and by_name["camvid/scratch_f0.5_s0"].done
    table = bench.summary_table(rows)
    assert "| camvid | scratch | 0.5 | 2 | 1 | 0.3000 (0.3000-0.3000) | - | 0 |" in table
    bench.plot(rows, tmp_path / "curve.png")
    assert (tmp_path / "curve.png").stat().st_size > 0
