"""The student of ``distill/run.py``, its feature adapters, and the frozen teacher's forward."""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

import torch
from torch import nn

from distill.config import DistillConfig, KDConfig

if TYPE_CHECKING:
    from distill.losses import FeatureDistiller
    from distill.models import DistillStudent

# the model zoo and the losses are imported inside the functions that use them, so `distill/run.py
# --help` and config errors answer in about the time torch takes to import


def build_student(cfg: DistillConfig, engine):
    """The student: ``student.*`` as built, or with ``student.prune`` a pruned copy of the teacher.

    ``student.prune > 0`` without ``student.init`` starts from the teacher (``student.name`` is not
    used); a resumed pruned run rebuilds the pruned shapes from the checkpoint's exported model.
    """
    from hybridvision.models.transfer import build_segmenter

    d, s = cfg.data, cfg.student
    resume = engine.resume_checkpoint
    if s.prune > 0 and resume is not None:  # the pruned architecture is the checkpoint's
        from hybridvision.models import from_pretrained

        return from_pretrained(resume / "export")
    from_teacher = s.prune > 0 and not s.init
    student, report = build_segmenter(
        "" if from_teacher else s.name,
        d.num_classes,
        d.in_chans,
        init=cfg.teacher if from_teacher else s.init,
        strict=s.init_strict,
        decoder=s.decoder or None,
        decoder_kwargs=s.decoder_kwargs or None,
        overrides=s.overrides,
        input_size=tuple(d.image_size),
    )
    if resume is None:  # else the weights come from the checkpoint
        name = f"{student.build_kwargs['name']} (a copy of the teacher)" if from_teacher else s.name
        engine.print(f"student {name}: " + report.summary())
    if s.prune > 0:
        from distill.prune import prune_student

        engine.print(prune_student(student, cfg).summary())
    return student


def attach_kd(
    cfg: DistillConfig, student: nn.Module, teacher: nn.Module, engine
) -> tuple[KDConfig, DistillStudent, FeatureDistiller | None]:
    """The distillation settings this teacher allows, and the student wrapped with the feature
    adapters ``kd`` asks for (None without feature distillation)."""
    from distill.losses import FeatureDistiller, match_stages
    from distill.models import DistillStudent

    kd = cfg.kd
    terms = kd.active()
    if "dist" in terms and teacher.num_classes <= 2 and kd.dist_beta > 0:
        engine.print(
            "kd.dist_beta set to 0: DIST's inter-class correlation of two class probabilities is always "
            "±1 (no gradient) for a binary model; only the intra-class term is used"
        )
        kd = dataclasses.replace(kd, dist_beta=0.0)
    features = None
    if "feature" in terms:
        pairs = match_stages(student.encoder.reductions, teacher.encoder.reductions, kd.feature_stages)
        features = FeatureDistiller(
            student.encoder.out_channels, teacher.encoder.out_channels, pairs, kd.feature_norm
        )
        engine.print("feature distillation pairs (student stage -> teacher stage): " + str(pairs))
    return kd, DistillStudent(student, features), features


def teacher_forward(teacher: nn.Module, images: torch.Tensor, cfg: DistillConfig, with_feats: bool):
    """Frozen teacher logits (and features), never part of the autograd graph."""
    from distill.models import forward_with_features

    device_type = images.device.type
    with (
        torch.inference_mode(),
        torch.autocast(device_type, dtype=torch.bfloat16, enabled=cfg.kd.teacher_dtype == "bf16"),
    ):
        if with_feats:
            logits, feats = forward_with_features(teacher, images)
        else:
            logits, feats = teacher(images), []
    # inference tensors cannot be saved for backward: plain fp32 copies enter the losses
    return logits.float().clone(), [f.float().clone() for f in feats]
