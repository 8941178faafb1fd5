"""Distillation under DDP: 2 gloo processes x batch B == 1 process x batch 2B for the total loss
and every student (and adapter) gradient, with KD, CWD, DIST and feature terms, also when the
processes hold different numbers of ignored pixels. The student has no BatchNorm
(``swin_unet_nano``), since BatchNorm statistics are per process; the teacher is frozen and not
wrapped. DIST's intra-class term is a per-process statistic (``distill.losses``), so the
equivalence runs with γ = 0 and a separate check shows what that term is under DDP."""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from distill.config import KDConfig
from distill.losses import DistillCriterion, FeatureDistiller, dist_loss, match_stages
from distill.models import DistillStudent, forward_with_features
from hybridvision.losses import build_segmentation_loss
from hybridvision.models import create_segmenter

WORLD, PER_RANK, K = 2, 2, 3
WEIGHTS = {"kd": 0.3, "cwd": 0.2, "dist": 0.4, "feature": 0.5}
# name -> (task weight, ignored pixels). The task loss (hybridvision.losses) averages over each
# process's own valid pixels, so it joins only the case where every pixel is labelled.
CASES = {"labelled": (0.7, False), "ignored": (0.0, True)}


def _build(task_weight: float):
    torch.manual_seed(0)
    teacher = create_segmenter("segformer_nano", K).eval().requires_grad_(False)
    student = create_segmenter("swin_unet_nano", K)
    pairs = match_stages(student.encoder.reductions, teacher.encoder.reductions, [-1, -2])
    features = FeatureDistiller(student.encoder.out_channels, teacher.encoder.out_channels, pairs)
    model = DistillStudent(student, features)
    kd = KDConfig(task_weight=task_weight, weights=dict(WEIGHTS), dist_gamma=0.0)
    crit = DistillCriterion(build_segmentation_loss(K, 255, {"ce": 1.0}), kd, 255, feature_loss=features.loss)
    return teacher, model, crit


def _batch(ignored: bool):
    g = torch.Generator().manual_seed(3)
    n = WORLD * PER_RANK
    images, masks = torch.randn(n, 3, 64, 64, generator=g), torch.randint(0, K, (n, 64, 64), generator=g)
    if ignored:  # rank 0 holds 5 ignored pixels, rank 1 holds 1,408
        masks[0, 0, :5] = 255
        masks[2, :20] = 255
        masks[3, :, :2] = 255
    return images, masks


def _step(teacher, model, crit, images, masks):
    with torch.inference_mode():
        t_logits, t_feats = forward_with_features(teacher, images)
    t_logits, t_feats = t_logits.clone(), [f.clone() for f in t_feats]
    s_logits, adapted = model(images)
    out = crit(s_logits, t_logits, masks, None, adapted, t_feats)
    out.total.backward()
    inner = getattr(model, "module", model)
    grads = {n: p.grad.detach().clone() for n, p in inner.named_parameters()}
    terms = {k: v.detach() for k, v in out.terms.items()}
    return out.total.detach(), terms, grads


def _intra(teacher, images, masks):
    """DIST's intra-class term of the student's initial logits on this batch."""
    _, model, _ = _build(0.0)
    with torch.no_grad():
        s_logits, _ = model(images)
        t_logits = teacher(images)
    return dist_loss(s_logits, t_logits, valid=masks != 255, return_terms=True)[2]


def _worker(rank: int, port: int, out_dir: str) -> None:
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        results = {}
        part = slice(rank * PER_RANK, (rank + 1) * PER_RANK)
        for name, (task_weight, ignored) in CASES.items():
            teacher, model, crit = _build(task_weight)
            ddp = torch.nn.parallel.DistributedDataParallel(model)
            images, masks = _batch(ignored)
            loss, terms, grads = _step(teacher, ddp, crit, images[part], masks[part])
            for value in (loss, *terms.values()):
                dist.all_reduce(value)  # the mean over processes is what the engine logs
            results[name] = (loss / WORLD, {k: v / WORLD for k, v in terms.items()}, grads)
        images, masks = _batch(True)
        intra = _intra(teacher, images[part], masks[part])
        dist.all_reduce(intra)
        results["intra"] = intra / WORLD
        if rank == 0:
            torch.save(results, os.path.join(out_dir, "ddp.pt"))
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_equal_one_process_with_double_batch(tmp_path):
    mp.spawn(_worker, args=(_free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    ddp = torch.load(tmp_path / "ddp.pt")
    for name, (task_weight, ignored) in CASES.items():
        ddp_loss, ddp_terms, ddp_grads = ddp[name]
        teacher, model, crit = _build(task_weight)
        loss, terms, grads = _step(teacher, model, crit, *_batch(ignored))
        assert set(terms) >= {"kd", "cwd", "dist", "feature"}
        for term, value in terms.items():
            torch.testing.assert_close(ddp_terms[term], value, rtol=1e-5, atol=1e-6, msg=f"{name}: {term}")
        torch.testing.assert_close(ddp_loss, loss, rtol=1e-5, atol=1e-6)
        assert ddp_grads.keys() == grads.keys()
        assert any(n.startswith("features.adapters.") for n in grads)
        for n, grad in grads.items():
            torch.testing.assert_close(ddp_grads[n], grad, rtol=1e-4, atol=1e-6, msg=f"{name}: {n}")
        assert sum(g.abs().sum() for g in grads.values()) > 0
    # DIST's intra-class term is per process: under DDP it is the mean of each half's own term
    teacher, _, _ = _build(0.0)
    images, masks = _batch(True)
    halves = [_intra(teacher, images[h], masks[h]) for h in (slice(0, PER_RANK), slice(PER_RANK, None))]
    torch.testing.assert_close(ddp["intra"], (halves[0] + halves[1]) / 2, rtol=1e-5, atol=1e-6)
    assert abs(ddp["intra"].item() - _intra(teacher, images, masks).item()) > 1e-5
