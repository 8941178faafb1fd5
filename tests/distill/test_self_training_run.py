"""distill/run.py as a self-training run: same-size student from the teacher, half the labels
dropped, strong view for the student, confidence mask; logged, and resumed bit-identically."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.stages._util import QUIET, run_stage, tiny_finetune_args

pytestmark = pytest.mark.slow  # stage scripts in subprocesses (4 runs) and one run in this process


def _args(out: Path, teacher: Path, *extra: str) -> list[str]:
    # 8 samples, half labelled, batch 2: 4 batches an epoch, so step 3 ends mid-epoch
    return [
        f"teacher={teacher}",
        f"train.output_dir={out}",
        "train.max_steps=6",
        "train.batch_size=2",
        "train.ckpt_every=3",
        "train.keep_last=5",
        "train.eval_every=0",
        "train.log_every=1",
        "train.progress_bar=false",
        "optim.warmup_steps=0",
        "data.synthetic_samples=8",
        "data.synthetic_val_samples=2",
        "data.label_fraction=0.5",
        "student.name=",
        f"student.init={teacher}",
        "kd.confidence_threshold=0.6",
        "export.onnx=false",
        *extra,
    ]


def _weights(out: Path, step: int) -> dict[str, torch.Tensor]:
    return load_file(str(out / "checkpoints" / f"step_{step:08d}" / "model.safetensors"))


def test_self_training_run_logs_and_resumes_exactly(tmp_path: Path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    res = run_stage("finetune/run.py", *tiny_finetune_args(tmp_path / "teacher"), "model.init=")
    assert res.returncode == 0, res.stderr[-3000:]
    teacher = tmp_path / "teacher" / "model"

    straight = tmp_path / "straight"
    res = run_stage("distill/run.py", *_args(straight, teacher, "kd.student_augment=strong"))
    assert res.returncode == 0, res.stderr[-3000:]
    assert "4 unlabelled images from the rest of split" in res.stdout
    events = EventAccumulator(str(next((straight / "logs").rglob("events.out.tfevents.*"))))
    events.Reload()
    fractions = [e.value for e in events.Scalars("train/kd_confident_fraction")]
    assert len(fractions) == 6 and all(0.0 <= f <= 1.0 for f in fractions)

    resumed = tmp_path / "resumed"  # from the mid-epoch checkpoint: the same strong views are drawn
    step3 = Path("checkpoints") / f"step_{3:08d}"
    shutil.copytree(straight / step3, resumed / step3)
    res = run_stage("distill/run.py", *_args(resumed, teacher, "kd.student_augment=strong"), *QUIET)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "resumed from" in res.stdout
    final, again = _weights(straight, 6), _weights(resumed, 6)
    differ = [k for k in final if not torch.equal(final[k], again[k])]
    assert not differ, f"{len(differ)} of {len(final)} tensors differ after resuming, e.g. {differ[:3]}"

    # the strong view is what the student trained on: without it the weights come out otherwise
    plain = tmp_path / "plain"
    res = run_stage("distill/run.py", *_args(plain, teacher, "train.max_steps=3"), *QUIET)
    assert res.returncode == 0, res.stderr[-3000:]
    strong3, plain3 = _weights(straight, 3), _weights(plain, 3)
    assert any(not torch.equal(strong3[k], plain3[k]) for k in strong3)


def _reset_accelerate() -> None:
    """Accelerate keeps process-wide state; the run here must neither see nor leave any."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()


def test_the_teacher_sees_the_batch_and_the_student_its_strong_view(tmp_path: Path, monkeypatch):
    """The step function's wiring, in this process: per step, the teacher's input is the batch the
    augmentation received, the student's is exactly what it returned, and the two differ."""
    import distill.augment
    import distill.models
    import distill.run as run
    from distill.config import DistillConfig
    from hybridvision.config import load_config
    from hybridvision.models import create_segmenter, save_pretrained

    torch.manual_seed(0)
    save_pretrained(create_segmenter("unet_resnet_nano", 3), tmp_path / "teacher")
    teacher_in, augment_io, student_in = [], [], []
    real_forward, real_student = run.teacher_forward, distill.models.DistillStudent.forward
    real_build = distill.augment.build_student_augment

    def teacher_forward(teacher, images, cfg, with_feats):
        teacher_in.append(images.clone())
        return real_forward(teacher, images, cfg, with_feats)

    def student_forward(self, images):
        student_in.append(images.clone())
        return real_student(self, images)

    def build(kind):
        augment = real_build(kind)

        def record(images, generator):
            view = augment(images, generator)
            augment_io.append((images.clone(), view.images.clone()))
            return view

        return record

    monkeypatch.setattr(run, "teacher_forward", teacher_forward)
    monkeypatch.setattr(distill.models.DistillStudent, "forward", student_forward)
    monkeypatch.setattr(distill.augment, "build_student_augment", build)
    overrides = [
        f"teacher={tmp_path / 'teacher'}",
        f"train.output_dir={tmp_path / 'out'}",
        "train.max_steps=2",
        "train.batch_size=2",
        "train.eval_every=0",
        "train.progress_bar=false",
        "train.trackers=[]",
        "data.synthetic_samples=4",
        "data.synthetic_val_samples=0",
        "optim.warmup_steps=0",
        "export.onnx=false",
        "kd.student_augment=strong",
    ]
    _reset_accelerate()
    try:
        run.main(load_config(DistillConfig, overrides=overrides))
    finally:
        _reset_accelerate()
    assert len(teacher_in) == len(augment_io) == len(student_in) == 2  # one of each per step
    for teacher_images, (augment_in, augment_out), student_images in zip(teacher_in, augment_io, student_in):
        assert torch.equal(teacher_images, augment_in)
        assert torch.equal(student_images, augment_out)
        assert not torch.allclose(teacher_images, student_images)
