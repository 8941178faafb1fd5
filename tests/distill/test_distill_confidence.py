"""Self-training terms of DistillCriterion: the teacher's confidence mask on unlabelled samples
(checked against a naive loop, normaliser included) and the strong view's erased pixels."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from distill.config import KDConfig
from distill.losses import DistillCriterion, confident_pixels, cwd_loss, dist_loss, kd_loss
from hybridvision.losses import build_segmentation_loss

IGNORE = 255


def _criterion(threshold: float, weights: dict[str, float], temperature: float = 2.0, classes: int = 4):
    task = build_segmentation_loss(classes, IGNORE, {"ce": 1.0})  # weight 0 below: not computed
    kd = KDConfig(task_weight=0.0, weights=weights, temperature=temperature, confidence_threshold=threshold)
    return DistillCriterion(task, kd, IGNORE)


def _naive_confident_kd(s, t, target, labelled, threshold, temperature):
    """Pixel KD written out: labelled rows count their labelled pixels; unlabelled rows the pixels
    whose teacher max probability (T = 1; sigmoid max(p, 1 - p) for one logit) is >= threshold."""
    total, count = 0.0, 0
    batch, classes, height, width = s.shape
    for b in range(batch):
        for i in range(height):
            for j in range(width):
                zs, zt = s[b, :, i, j], t[b, :, i, j]
                if classes == 1:
                    zs, zt = np.array([0.0, zs[0]]), np.array([0.0, zt[0]])
                if labelled[b]:
                    if target[b, i, j] == IGNORE:
                        continue
                else:
                    confidence = max(math.exp(v) for v in zt) / sum(math.exp(v) for v in zt)
                    if confidence < threshold:
                        continue
                ps = np.exp(zs / temperature) / np.exp(zs / temperature).sum()
                pt = np.exp(zt / temperature) / np.exp(zt / temperature).sum()
                total += float((pt * np.log(pt / ps)).sum())
                count += 1
    return temperature**2 * total / max(count, 1), count


@pytest.mark.parametrize("shape", [(3, 4, 5, 6), (2, 1, 4, 7), (4, 3, 3, 3)])
@pytest.mark.parametrize("temperature", [1.0, 3.0])
@pytest.mark.parametrize("threshold", [0.4, 0.7, 0.9])
def test_confidence_masked_kd_matches_the_naive_loop(shape, temperature, threshold):
    batch, classes, height, width = shape
    g = torch.Generator().manual_seed(batch * 100 + classes)
    s = torch.randn(*shape, generator=g, dtype=torch.float64)
    t = 2.5 * torch.randn(*shape, generator=g, dtype=torch.float64)  # some confident, some not
    target = torch.randint(0, max(classes, 2), (batch, height, width), generator=g)
    target[torch.rand(batch, height, width, generator=g) < 0.3] = IGNORE
    labelled = torch.tensor([b % 2 == 0 for b in range(batch)])
    target[~labelled] = IGNORE  # unlabelled samples carry no label
    out = _criterion(threshold, {"kd": 1.0}, temperature, classes)(s, t, target, labelled)
    expected, count = _naive_confident_kd(
        s.numpy(), t.numpy(), target.numpy(), labelled.numpy(), threshold, temperature
    )
    assert out.terms["kd"].item() == pytest.approx(expected, rel=1e-6, abs=1e-9)
    assert 0 < count  # the case is not vacuous
    all_distilled = int((target != IGNORE).sum()) + int((~labelled).sum()) * height * width
    assert out.stats["confident_fraction"].item() == pytest.approx(count / all_distilled)


def test_confident_pixels_naive_multiclass_and_binary():
    g = torch.Generator().manual_seed(0)
    logits = 3 * torch.randn(2, 5, 4, 4, generator=g)
    probs = F.softmax(logits, dim=1)
    assert torch.equal(confident_pixels(logits, 0.6), probs.max(dim=1).values >= 0.6)
    z = 3 * torch.randn(2, 1, 4, 4, generator=g)
    p = torch.sigmoid(z)[:, 0]
    assert torch.equal(confident_pixels(z, 0.8), torch.maximum(p, 1 - p) >= 0.8)
    assert confident_pixels(z, 0.8).float().mean() not in (0.0, 1.0)


def test_unconfident_pixels_leave_numerator_and_normaliser():
    """Garbage student logits where the teacher is unsure change nothing, and the mean is over the
    confident pixels only (not the masked sum divided by every pixel)."""
    g = torch.Generator().manual_seed(1)
    s, t = torch.randn(2, 3, 6, 6, generator=g), torch.zeros(2, 3, 6, 6)
    t[:, 0, :3] = 8.0  # confident in the top half, uniform (p = 1/3) below
    target = torch.full((2, 6, 6), IGNORE)
    labelled = torch.tensor([False, False])
    crit = _criterion(0.9, {"kd": 1.0, "dist": 1.0})
    out = crit(s, t, target, labelled)
    s2 = s.clone()
    s2[:, :, 3:] = 40 * torch.randn(2, 3, 3, 6, generator=g)
    out2 = crit(s2, t, target, labelled)
    for name in ("kd", "dist"):
        assert out2.terms[name].item() == pytest.approx(out.terms[name].item(), rel=1e-6)
    top = torch.zeros(2, 6, 6, dtype=torch.bool)
    top[:, :3] = True
    assert out.terms["kd"].item() == pytest.approx(kd_loss(s, t, 2.0, top).item(), rel=1e-6)
    assert out.terms["dist"].item() == pytest.approx(dist_loss(s, t, valid=top).item(), rel=1e-6)
    half_sum = kd_loss(s, t, 2.0, top).item() / 2  # what a normaliser over all pixels would give
    assert abs(out.terms["kd"].item() - half_sum) > 1e-3
    assert out.stats["confident_fraction"].item() == pytest.approx(0.5)


def test_labelled_samples_and_cwd_are_not_masked_and_zero_is_off():
    g = torch.Generator().manual_seed(2)
    s, t = torch.randn(2, 3, 5, 5, generator=g), 0.1 * torch.randn(2, 3, 5, 5, generator=g)  # t unsure
    target = torch.randint(0, 3, (2, 5, 5), generator=g)
    labelled = torch.tensor([True, True])
    masked = _criterion(0.9, {"kd": 1.0, "cwd": 1.0})(s, t, target, labelled)
    off = _criterion(0.0, {"kd": 1.0, "cwd": 1.0})(s, t, target, labelled)
    assert masked.terms["kd"].item() == pytest.approx(off.terms["kd"].item())  # labelled rows: all kept
    assert masked.stats["confident_fraction"].item() == 1.0 and off.stats == {}
    target[1] = IGNORE
    unl = torch.tensor([True, False])
    masked = _criterion(0.9, {"kd": 1.0, "cwd": 1.0})(s, t, target, unl)
    off = _criterion(0.0, {"kd": 1.0, "cwd": 1.0})(s, t, target, unl)
    assert masked.terms["cwd"].item() == pytest.approx(off.terms["cwd"].item())  # cwd: never masked
    assert masked.terms["cwd"].item() == pytest.approx(cwd_loss(s, t, 4.0).item(), rel=1e-6)
    valid0 = torch.zeros(2, 5, 5, dtype=torch.bool)
    valid0[0] = True  # the unsure unlabelled sample is gone: only sample 0's pixels remain
    assert masked.terms["kd"].item() == pytest.approx(kd_loss(s, t, 2.0, valid0).item(), rel=1e-6)
    assert abs(masked.terms["kd"].item() - off.terms["kd"].item()) > 1e-4


def test_erased_pixels_leave_task_and_every_logit_term():
    g = torch.Generator().manual_seed(3)
    s, t = torch.randn(2, 3, 6, 6, generator=g), torch.randn(2, 3, 6, 6, generator=g)
    target = torch.randint(0, 3, (2, 6, 6), generator=g)
    target[1] = IGNORE
    labelled = torch.tensor([True, False])
    kept = torch.ones(2, 6, 6, dtype=torch.bool)
    kept[:, 1:4, 2:5] = False
    task = build_segmentation_loss(3, IGNORE, {"ce": 1.0})
    kd = KDConfig(task_weight=0.5, weights={"kd": 1.0, "cwd": 1.0, "dist": 1.0})
    crit = DistillCriterion(task, kd, IGNORE)
    out = crit(s, t, target, labelled, kept=kept)
    s2 = s.clone()
    s2[:, :, 1:4, 2:5] = 30 * torch.randn(2, 3, 3, 3, generator=g)  # garbage where erased
    out2 = crit(s2, t, target, labelled, kept=kept)
    for name in ("task", "kd", "cwd", "dist"):
        assert out2.terms[name].item() == pytest.approx(out.terms[name].item(), rel=1e-6), name
    valid = kept & ((target != IGNORE) | ~labelled.view(-1, 1, 1))
    assert out.terms["kd"].item() == pytest.approx(kd_loss(s, t, 3.0, valid).item(), rel=1e-6)
    assert out.terms["task"].item() == pytest.approx(
        F.cross_entropy(s, target.masked_fill(~kept, IGNORE), ignore_index=IGNORE).item(), rel=1e-6
    )
    assert abs(crit(s2, t, target, labelled).terms["kd"].item() - out.terms["kd"].item()) > 1e-3
