"""The teacher stays frozen through a distillation run: eval mode, no parameter that requires a
gradient, outputs outside the autograd graph, and its weights and BatchNorm statistics unchanged."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch


def _reset_accelerate() -> None:
    """Accelerate keeps process-wide state; the run here must neither see nor leave any."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()


@pytest.mark.slow  # a whole 2-step distillation run in this process: 3-6 s
def test_teacher_stays_in_eval_mode_without_gradients_through_a_run(tmp_path: Path, monkeypatch):
    import distill.models
    import distill.run as run
    from distill.config import DistillConfig
    from hybridvision.config import load_config
    from hybridvision.models import create_segmenter, save_pretrained

    torch.manual_seed(0)
    # a BatchNorm teacher: in training mode its forward would move the running statistics
    teacher = create_segmenter("unet_resnet_nano", 4)
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in teacher.modules())
    save_pretrained(teacher, tmp_path / "teacher")

    loaded, calls = [], []
    real_load, real_forward = distill.models.load_teacher, run.teacher_forward

    def load(path):
        teacher = real_load(path)
        loaded.append((teacher, {k: v.clone() for k, v in teacher.state_dict().items()}))
        return teacher

    def forward(teacher, images, cfg, with_feats):
        logits, feats = real_forward(teacher, images, cfg, with_feats)
        calls.append(
            {
                "training": [n for n, m in teacher.named_modules() if m.training],
                "requires_grad": [n for n, p in teacher.named_parameters() if p.requires_grad],
                "outputs_require_grad": logits.requires_grad or any(f.requires_grad for f in feats),
                "features": len(feats),
            }
        )
        return logits, feats

    monkeypatch.setattr(distill.models, "load_teacher", load)
    monkeypatch.setattr(run, "teacher_forward", forward)
    _reset_accelerate()
    cfg = load_config(
        DistillConfig,
        overrides=[
            f"teacher={tmp_path / 'teacher'}",
            f"train.output_dir={tmp_path / 'out'}",
            "train.max_steps=2",
            "train.batch_size=2",
            "train.eval_every=1",
            "train.progress_bar=false",
            "train.trackers=[]",
            "data.synthetic_samples=4",
            "data.synthetic_val_samples=2",
            "optim.warmup_steps=0",
            "optim.lr=0.1",
            "export.onnx=false",
            "kd.weights={kd: 0.3, cwd: 0.1, dist: 0.1, feature: 0.5}",
        ],
    )
    try:
        run.main(cfg)
    finally:
        _reset_accelerate()
    ((teacher, before),) = loaded
    assert len(calls) == 2 and all(c["features"] > 0 for c in calls)
    for c in calls:
        assert c["training"] == [] and c["requires_grad"] == [] and not c["outputs_require_grad"], c
    assert not teacher.training and all(p.grad is None for p in teacher.parameters())
    after = teacher.state_dict()
    changed = [k for k, v in before.items() if not torch.equal(v, after[k].to(v.device))]
    assert changed == []
