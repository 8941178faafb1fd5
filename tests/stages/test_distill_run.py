"""distill/run.py end to end (1 and 2 processes, default trackers on) and its errors."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from ._util import run_stage, tiny_finetune_args

pytestmark = pytest.mark.slow  # each test starts the stage script in a fresh interpreter

# the launcher through this interpreter: `accelerate` by name fails when the environment's bin/ is not on PATH
LAUNCH_2 = [
    sys.executable,
    "-m",
    "accelerate.commands.launch",
    "--multi_gpu",
    "--num_processes",
    "2",
    "--main_process_port",
    "0",
]


def tiny_distill_args(out: Path, teacher: Path) -> list[str]:
    return [
        f"teacher={teacher}",
        f"train.output_dir={out}",
        "train.max_steps=2",
        "train.batch_size=2",
        "data.synthetic_samples=8",
        "data.synthetic_val_samples=3",
        "train.eval_every=0",
        "optim.warmup_steps=0",
        "export.onnx=false",
    ]


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("teacher")
    res = run_stage("finetune/run.py", *tiny_finetune_args(out), "model.init=")
    assert res.returncode == 0, res.stderr[-3000:]
    return out / "model"


@pytest.fixture(scope="module")
def hf_segformer_dir(tmp_path_factory) -> Path:
    """A tiny random transformers SegFormer (4 labels) saved with save_pretrained."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.SegformerConfig(
        depths=[1, 1, 1, 1],
        hidden_sizes=[8, 16, 24, 32],
        num_attention_heads=[1, 1, 1, 2],
        decoder_hidden_size=16,
        num_labels=4,
        id2label={0: "bg", 1: "a", 2: "b", 3: "c"},
        label2id={"bg": 0, "a": 1, "b": 2, "c": 3},
    )
    model = transformers.SegformerForSemanticSegmentation(config).eval()
    path = tmp_path_factory.mktemp("hf") / "segformer"
    model.save_pretrained(path)
    return path


def _check_outputs(out: Path, teacher_classes: int) -> dict:
    from hybridvision.models import Segmenter, from_pretrained

    student = from_pretrained(out / "student")
    assert isinstance(student, Segmenter) and student.num_classes == teacher_classes
    assert not any("adapter" in k for k in student.state_dict())  # adapters are not exported
    metrics = json.loads((out / "metrics.json").read_text())
    for who in ("student", "teacher"):
        assert 0.0 <= metrics[who]["miou"] <= 1.0
        assert metrics["params"][who] > 0 and metrics["gmacs"][who] > 0
    assert metrics["miou_ratio"] == pytest.approx(
        metrics["student"]["miou"] / metrics["teacher"]["miou"], rel=1e-6
    )
    return metrics


def _scalars(logdir: Path) -> set[str]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tags: set[str] = set()
    for events in logdir.rglob("events.out.tfevents.*"):
        acc = EventAccumulator(str(events))
        acc.Reload()
        tags |= set(acc.Tags()["scalars"]) | set(acc.Tags()["images"])
    return tags


def test_distill_from_finetune_teacher_with_tensorboard_and_export(teacher_dir: Path, tmp_path: Path):
    out = tmp_path / "d"
    args = [a for a in tiny_distill_args(out, teacher_dir) if a != "export.onnx=false"]  # default: export
    res = run_stage(
        "distill/run.py",
        *args,
        "kd.weights={kd: 0.3, cwd: 0.1, dist: 0.1}",
        "train.log_every=1",
        "train.progress_bar=false",
        "export.int8=true",
        "export.calibration_images=2",
        "export.report_runs=2",
    )
    assert res.returncode == 0, res.stderr[-3000:]
    metrics = _check_outputs(out, 4)
    for name in ("student.onnx", "student.int8.onnx", "report.json", "report.md", "report.png"):
        assert (out / name).is_file(), name
    report = json.loads((out / "report.json").read_text())
    names = [row["name"] for row in report["entries"]]
    assert names == ["teacher (PyTorch)", "student (PyTorch)", "student (ONNX fp32)", "student (ONNX int8)"]
    fp32 = report["entries"][2]
    assert fp32["miou"] == pytest.approx(report["entries"][1]["miou"], abs=1e-3)  # ONNX == PyTorch
    assert metrics["export"]["onnx"].endswith("student.onnx")
    assert "| teacher (PyTorch) |" in res.stdout  # the report table is printed
    assert metrics["student_name"] == "unet_resnet_nano"
    assert "student mIoU=" in res.stdout and "GMACs" in res.stdout
    tags = _scalars(out / "logs")
    for tag in ("train/loss_task", "train/loss_kd", "train/loss_cwd", "train/loss_dist", "eval/teacher_miou"):
        assert tag in tags, (tag, sorted(tags))
    assert "eval/input|truth|teacher|student" in tags


def test_segformer_teacher_to_cnn_student_with_feature_kd(hf_segformer_dir: Path, tmp_path: Path):
    out = tmp_path / "d"
    res = run_stage(
        "distill/run.py",
        *tiny_distill_args(out, hf_segformer_dir),
        "kd.weights={kd: 0.3, feature: 1.0}",
        "train.trackers=[]",
        "train.progress_bar=false",
    )
    assert res.returncode == 0, res.stderr[-3000:]
    metrics = _check_outputs(out, 4)
    assert metrics["student"]["class_names"] == ["bg", "a", "b", "c"]  # from the teacher's id2label
    assert "feature distillation pairs" in res.stdout


def test_two_processes_default_trackers_segformer_teacher(hf_segformer_dir: Path, tmp_path: Path):
    out = tmp_path / "d"
    res = run_stage(
        "distill/run.py",
        *tiny_distill_args(out, hf_segformer_dir),
        "kd.weights={kd: 0.3, feature: 0.5}",
        "data.num_workers=1",
        launch=LAUNCH_2,
        env={"ACCELERATE_USE_CPU": "true"},
    )
    assert res.returncode == 0, res.stderr[-4000:]
    _check_outputs(out, 4)
    assert list((out / "logs").rglob("events.out.tfevents.*"))


def test_missing_teacher_says_how_to_make_one(tmp_path: Path):
    res = run_stage("distill/run.py", *tiny_distill_args(tmp_path / "d", tmp_path / "nope"))
    assert res.returncode == 2
    assert "python finetune/run.py" in res.stderr and "Traceback" not in res.stderr


def test_num_classes_mismatch_names_both(teacher_dir: Path, tmp_path: Path):
    res = run_stage("distill/run.py", *tiny_distill_args(tmp_path / "d", teacher_dir), "data.num_classes=3")
    assert res.returncode == 2
    assert "data.num_classes=3" in res.stderr and "4 classes" in res.stderr
