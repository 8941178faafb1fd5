"""Every YAML in configs/distill/ loads, builds its student at tiny scale (offline) and takes one
criterion step with its kd section; the self-training recipe is consistent with its teacher's."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from distill.augment import augment_generator, build_student_augment
from distill.config import DistillConfig
from distill.losses import DistillCriterion
from finetune.config import FinetuneConfig
from hybridvision.config import load_config
from hybridvision.losses import build_segmentation_loss
from hybridvision.models import create_segmenter, save_pretrained
from hybridvision.models.transfer import build_segmenter

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
DISTILL = sorted((CONFIGS / "distill").glob("*.yaml"))
SELF_TRAINING = CONFIGS / "distill" / "self_training.yaml"
TEACHER_FINETUNE = CONFIGS / "finetune" / "camvid_scratch.yaml"  # the recipe's teacher (its header)


def test_there_are_distill_configs():
    assert SELF_TRAINING in DISTILL and len(DISTILL) >= 4


@pytest.mark.parametrize("path", DISTILL, ids=lambda p: p.stem)
def test_distill_config_builds_and_steps(path: Path, tmp_path: Path):
    cfg = load_config(DistillConfig, path)
    classes, chans = cfg.data.num_classes or 3, cfg.data.in_chans or 3  # 0: the teacher's
    s = cfg.student
    init = s.init
    if init.startswith("runs/"):  # the teacher the recipe starts from: a stand-in of its architecture
        teacher = load_config(FinetuneConfig, TEACHER_FINETUNE)
        torch.manual_seed(0)
        stand_in = create_segmenter(teacher.model.name, classes, chans)
        save_pretrained(stand_in, tmp_path / "teacher")
        init = str(tmp_path / "teacher")
    torch.manual_seed(0)
    student, report = build_segmenter(
        s.name,
        classes,
        chans,
        init=init,
        strict=s.init_strict,
        decoder=s.decoder or None,
        decoder_kwargs=s.decoder_kwargs or None,
        overrides=s.overrides,
        input_size=(64, 64),
    )
    if init:
        assert report.loaded and not report.missing and not report.skipped, report.summary()
        assert all(
            torch.equal(a, b) for a, b in zip(student.state_dict().values(), stand_in.state_dict().values())
        )
    images = torch.randn(2, chans, 64, 64)
    target = torch.randint(0, classes, (2, 64, 64))
    target[1] = cfg.data.ignore_index  # one unlabelled sample
    labelled = torch.tensor([True, False])
    augment = build_student_augment(cfg.kd.student_augment)
    kept = None
    if augment is not None:
        images, kept = augment(images, augment_generator("cpu", 0))
    logits = student(images)
    assert logits.shape == (2, classes, 64, 64)
    weights = {
        k: v for k, v in cfg.kd.weights.items() if k != "feature"
    }  # feature needs the teacher's encoder
    kd = type(cfg.kd)(**{**cfg.kd.__dict__, "weights": weights})
    task = build_segmentation_loss(classes, cfg.data.ignore_index, cfg.loss.weights)
    out = DistillCriterion(task, kd, cfg.data.ignore_index)(
        logits, torch.randn_like(logits) * 4, target, labelled, kept=kept
    )
    assert torch.isfinite(out.total)
    out.total.backward()


def _teacher_command(path: Path) -> tuple[Path, list[str]]:
    """The ``finetune/run.py`` command in the header comment of ``path``: (config, overrides)."""
    header = " ".join(
        line.lstrip("# ").rstrip("\\ ") for line in path.read_text().splitlines() if line[:1] == "#"
    )
    words = header[header.index("finetune/run.py") :].split()
    config = Path(words[2])  # finetune/run.py --config CONFIG key=value ...
    overrides = []
    for word in words[3:]:
        if "=" not in word:
            break
        overrides.append(word)
    return CONFIGS.parent / config, overrides


def test_self_training_recipe():
    """Same-size student from the teacher's weights, unlabelled images, strong view, confidence mask,
    and the labelled frames of the teacher made by the header's command (same source, split,
    fraction and seed)."""
    cfg = load_config(DistillConfig, SELF_TRAINING)
    assert cfg.student.name == "" and cfg.student.init == cfg.teacher
    assert cfg.data.unlabelled_source and cfg.data.label_fraction < 1
    assert cfg.kd.student_augment == "strong" and cfg.kd.confidence_threshold == 0.9
    config, overrides = _teacher_command(SELF_TRAINING)
    assert config == TEACHER_FINETUNE
    teacher = load_config(FinetuneConfig, config, overrides)
    assert cfg.teacher == f"{teacher.train.output_dir}/model"
    for key in ("source", "split", "label_fraction", "ignore_index", "image_size"):
        assert getattr(cfg.data, key) == getattr(teacher.data, key), key
    assert cfg.train.seed == teacher.train.seed  # train.seed picks the labelled subset
