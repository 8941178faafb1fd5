"""Distillation under DDP: 2 gloo processes x batch B == 1 process x batch 2B for the total loss
and every student (and adapter) gradient. The student has no BatchNorm (``swin_unet_nano``), since
BatchNorm statistics are per process; the teacher is frozen and not wrapped."""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from distill.losses import DistillCriterion, FeatureDistiller, match_stages
from distill.models import DistillStudent, forward_with_features
from hybridvision.losses import build_segmentation_loss
from hybridvision.models import create_segmenter

WORLD, PER_RANK, K = 2, 2, 3
WEIGHTS = {"kd": 0.3, "cwd": 0.2, "feature": 0.5}


def _build():
    torch.manual_seed(0)
    teacher = create_segmenter("segformer_nano", K).eval().requires_grad_(False)
    student = create_segmenter("swin_unet_nano", K)
    pairs = match_stages(student.encoder.reductions, teacher.encoder.reductions, [-1, -2])
    features = FeatureDistiller(student.encoder.out_channels, teacher.encoder.out_channels, pairs)
    model = DistillStudent(student, features)
    crit = DistillCriterion(
        build_segmentation_loss(K, 255, {"ce": 1.0}), 0.7, WEIGHTS, 255, feature_loss=features.loss
    )
    return teacher, model, crit


def _batch():
    g = torch.Generator().manual_seed(3)
    n = WORLD * PER_RANK
    return torch.randn(n, 3, 64, 64, generator=g), torch.randint(0, K, (n, 64, 64), generator=g)


def _step(teacher, model, crit, images, masks):
    with torch.inference_mode():
        t_logits, t_feats = forward_with_features(teacher, images)
    t_logits, t_feats = t_logits.clone(), [f.clone() for f in t_feats]
    s_logits, adapted = model(images)
    out = crit(s_logits, t_logits, masks, None, adapted, t_feats)
    out.total.backward()
    inner = getattr(model, "module", model)
    return out.total.detach(), {n: p.grad.detach().clone() for n, p in inner.named_parameters()}


def _worker(rank: int, port: int, out_dir: str) -> None:
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        teacher, model, crit = _build()
        ddp = torch.nn.parallel.DistributedDataParallel(model)
        images, masks = _batch()
        part = slice(rank * PER_RANK, (rank + 1) * PER_RANK)
        loss, grads = _step(teacher, ddp, crit, images[part], masks[part])
        dist.all_reduce(loss)
        if rank == 0:
            torch.save((loss / WORLD, grads), os.path.join(out_dir, "ddp.pt"))
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_equal_one_process_with_double_batch(tmp_path):
    mp.spawn(_worker, args=(_free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    ddp_loss, ddp_grads = torch.load(tmp_path / "ddp.pt")
    teacher, model, crit = _build()
    loss, grads = _step(teacher, model, crit, *_batch())
    torch.testing.assert_close(ddp_loss, loss, rtol=1e-5, atol=1e-6)
    assert ddp_grads.keys() == grads.keys()
    assert any(n.startswith("features.adapters.") for n in grads)
    for name, grad in grads.items():
        torch.testing.assert_close(ddp_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)
    assert sum(g.abs().sum() for g in grads.values()) > 0
