"""Distillation losses: the issue's reference values, naive loops from the papers' formulas,
ignore_index, binary logits, resizing, and the weighted total."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from distill.config import KDConfig
from distill.losses import (
    DistillCriterion,
    FeatureDistiller,
    align_logits,
    as_two_class,
    cwd_loss,
    dist_loss,
    kd_loss,
    match_stages,
)
from hybridvision.losses import build_segmentation_loss


def _pair(*shape):
    torch.manual_seed(0)
    return torch.randn(*shape), torch.randn(*shape)


# ---------------------------------------------------------------- reference values (issue 9)


@pytest.mark.parametrize("T, expected", [(1, 0.864829), (2, 0.901560), (4, 0.903345)])
def test_kd_rows_batchmean_reference(T, expected):
    s, t = _pair(8, 10)
    got = kd_loss(s[:, :, None, None], t[:, :, None, None], T)
    assert got.item() == pytest.approx(expected, abs=1e-5)
    ref = F.kl_div(F.log_softmax(s / T, 1), F.log_softmax(t / T, 1), reduction="batchmean", log_target=True)
    assert got.item() == pytest.approx(ref.item() * T * T, abs=1e-6)


@pytest.mark.parametrize("T, expected", [(1, 0.897009), (4, 0.957030)])
def test_pixel_kd_reference(T, expected):
    s, t = _pair(2, 19, 16, 32)
    assert kd_loss(s, t, T).item() == pytest.approx(expected, abs=1e-5)


@pytest.mark.parametrize("tau, expected", [(1, 1.009516), (4, 1.011749)])
def test_cwd_reference(tau, expected):
    s, t = _pair(2, 19, 16, 32)
    assert cwd_loss(s, t, tau).item() == pytest.approx(expected, abs=1e-5)


def test_dist_reference():
    s, t = _pair(2, 19, 16, 32)
    total, inter, intra = dist_loss(s, t, 1.0, tau_squared=False, return_terms=True)
    assert total.item() == pytest.approx(2.021914, abs=1e-5)
    assert inter.item() == pytest.approx(1.010715, abs=1e-5)
    assert intra.item() == pytest.approx(1.011199, abs=1e-5)
    assert dist_loss(s, t, 4.0, tau_squared=False).item() == pytest.approx(2.024799, abs=1e-5)
    assert dist_loss(s, t, 4.0).item() == pytest.approx(16 * 2.024799, abs=1e-4)  # paper's τ² scaling


@pytest.mark.parametrize("T, expected", [(1, 0.171620), (2, 0.189664)])
def test_binary_kd_reference_and_gradient(T, expected):
    s, t = _pair(2, 1, 8, 8)
    s.requires_grad_(True)
    loss = kd_loss(s, t, T)
    assert loss.item() == pytest.approx(expected, abs=1e-5)
    loss.backward()
    assert s.grad.abs().sum() > 1e-3
    # a plain softmax over the single channel would be identically zero: the bug this avoids
    naive = (F.softmax(t / T, 1) * (F.log_softmax(t / T, 1) - F.log_softmax(s / T, 1))).sum(1).mean()
    assert naive.item() == 0.0
    two = as_two_class(s.detach())
    assert torch.allclose(F.softmax(two, 1)[:, 1:], torch.sigmoid(s.detach()))


# ---------------------------------------------------------------- naive loops


def _naive_kd(s, t, T, valid):
    total, n = 0.0, 0
    B, K, H, W = s.shape
    for b in range(B):
        for i in range(H):
            for j in range(W):
                if valid is not None and not valid[b, i, j]:
                    continue
                ps = np.exp(s[b, :, i, j] / T) / np.exp(s[b, :, i, j] / T).sum()
                pt = np.exp(t[b, :, i, j] / T) / np.exp(t[b, :, i, j] / T).sum()
                total += float((pt * np.log(pt / ps)).sum())
                n += 1
    return T * T * total / max(n, 1)


def _naive_cwd(s, t, tau, valid):
    B, C, H, W = s.shape
    total = 0.0
    for b in range(B):
        keep = np.ones((H, W), bool) if valid is None else valid[b]
        for c in range(C):
            xs, xt = s[b, c][keep] / tau, t[b, c][keep] / tau
            ps, pt = np.exp(xs) / np.exp(xs).sum(), np.exp(xt) / np.exp(xt).sum()
            total += float((pt * np.log(pt / ps)).sum())
    return tau * tau * total / (B * C)


def _pearson(a, b):
    a, b = a - a.mean(), b - b.mean()
    return float((a * b).sum() / math.sqrt((a * a).sum() * (b * b).sum()))


def _naive_dist(s, t, tau, valid):
    def probs(x):
        e = np.exp(x / tau)
        return e / e.sum(1, keepdims=True)

    ys, yt = probs(s), probs(t)
    B, K, H, W = s.shape
    rows_s, rows_t = [], []
    for b in range(B):
        for i in range(H):
            for j in range(W):
                if valid is None or valid[b, i, j]:
                    rows_s.append(ys[b, :, i, j])
                    rows_t.append(yt[b, :, i, j])
    rs, rt = np.array(rows_s), np.array(rows_t)
    inter = 1 - np.mean([_pearson(rs[p], rt[p]) for p in range(len(rs))])
    intra = 1 - np.mean([_pearson(rs[:, k], rt[:, k]) for k in range(K)])
    return inter, intra


@pytest.mark.parametrize("shape", [(2, 5, 6, 7), (1, 3, 4, 9)])
@pytest.mark.parametrize("temp", [0.5, 1.0, 3.0])
@pytest.mark.parametrize("with_ignore", [False, True])
def test_losses_match_naive_loops(shape, temp, with_ignore):
    torch.manual_seed(1)
    s, t = torch.randn(*shape, dtype=torch.float64), torch.randn(*shape, dtype=torch.float64)
    valid = None
    if with_ignore:
        valid = torch.rand(shape[0], *shape[2:]) > 0.3
    sn, tn = s.numpy(), t.numpy()
    vn = None if valid is None else valid.numpy()
    assert kd_loss(s, t, temp, valid).item() == pytest.approx(_naive_kd(sn, tn, temp, vn), rel=1e-5, abs=1e-6)
    assert cwd_loss(s, t, temp, valid).item() == pytest.approx(
        _naive_cwd(sn, tn, temp, vn), rel=1e-5, abs=1e-6
    )
    inter, intra = _naive_dist(sn, tn, temp, vn)
    _, got_inter, got_intra = dist_loss(s, t, temp, valid=valid, return_terms=True)
    assert got_inter.item() == pytest.approx(inter, abs=1e-5)
    assert got_intra.item() == pytest.approx(intra, abs=1e-5)


# ---------------------------------------------------------------- properties


def test_identical_teacher_and_student_give_zero():
    s, _ = _pair(2, 6, 8, 8)
    for value in (kd_loss(s, s, 3.0), cwd_loss(s, s, 4.0), dist_loss(s, s, 1.0)):
        assert abs(value.item()) < 1e-5
    fd = FeatureDistiller([4], [4], [(0, 0)], norm="none")
    with torch.no_grad():
        fd.adapters[0].weight.copy_(torch.eye(4)[:, :, None, None])
        fd.adapters[0].bias.zero_()
    feats = [torch.randn(2, 4, 5, 5)]
    assert fd.loss(fd.adapt(feats), feats).item() < 1e-10


def test_ignored_pixels_change_nothing():
    s, t = _pair(2, 5, 8, 8)
    valid = torch.ones(2, 8, 8, dtype=torch.bool)
    valid[:, :3] = False
    s2, t2 = s.clone(), t.clone()
    s2[:, :, :3] = 50 * torch.randn_like(s2[:, :, :3])  # garbage where ignored
    t2[:, :, :3] = -30.0
    for fn in (lambda a, b: kd_loss(a, b, 2.0, valid), lambda a, b: cwd_loss(a, b, 4.0, valid)):
        assert fn(s, t).item() == pytest.approx(fn(s2, t2).item(), abs=1e-6)
    assert dist_loss(s, t, valid=valid).item() == pytest.approx(
        dist_loss(s2, t2, valid=valid).item(), abs=1e-6
    )
    # and ignoring them is not a no-op
    assert abs(kd_loss(s2, t2, 2.0).item() - kd_loss(s2, t2, 2.0, valid).item()) > 1e-3


def test_no_valid_pixel_is_zero_not_nan():
    s, t = _pair(2, 3, 4, 4)
    s.requires_grad_(True)
    none = torch.zeros(2, 4, 4, dtype=torch.bool)
    for v in (kd_loss(s, t, 2.0, none), cwd_loss(s, t, 2.0, none), dist_loss(s, t, valid=none)):
        assert v.item() == 0.0
        v.backward()
        assert torch.isfinite(s.grad).all()


def test_align_logits_resizes_to_one_grid():
    s, t = torch.randn(1, 3, 8, 8), torch.randn(1, 3, 16, 16)
    a, b = align_logits(s, t, to="student")
    assert a.shape == b.shape == (1, 3, 8, 8) and a is s
    a, b = align_logits(s, t, to="teacher")
    assert a.shape == b.shape == (1, 3, 16, 16) and b is t
    a, b = align_logits(s, t, size=(12, 10))
    assert a.shape == b.shape == (1, 3, 12, 10)


def test_match_stages_nearest_stride_and_errors():
    assert match_stages((2, 4, 8, 16, 32), (4, 8, 16, 32), [-1, -2, 0]) == [(4, 3), (3, 2), (0, 0)]
    assert match_stages((4, 8, 16, 32), (16,), [0, 3]) == [(0, 0), (3, 0)]
    with pytest.raises(ValueError, match="out of range"):
        match_stages((4, 8), (4, 8), [5])


def test_feature_distiller_heterogeneous_strides_and_channels():
    torch.manual_seed(0)
    fd = FeatureDistiller([16, 32], [64, 160], [(0, 0), (1, 1)])
    student = [torch.randn(2, 16, 16, 16, requires_grad=True), torch.randn(2, 32, 8, 8, requires_grad=True)]
    teacher = [torch.randn(2, 64, 8, 8), torch.randn(2, 160, 2, 2)]  # other strides than the student
    adapted = fd.adapt(student)
    assert [a.shape[1] for a in adapted] == [64, 160]
    loss = fd.loss(adapted, teacher)
    loss.backward()
    assert all(a.weight.grad.abs().sum() > 0 for a in fd.adapters)
    assert student[0].grad.abs().sum() > 0
    # channel normalisation: scaling the teacher's features changes nothing
    scaled = [10 * x + 3 for x in teacher]
    assert fd.loss(adapted, scaled).item() == pytest.approx(loss.item(), rel=1e-4)


def test_criterion_total_is_weighted_sum_and_unlabelled_rows_skip_task():
    torch.manual_seed(0)
    task = build_segmentation_loss(3, 255, {"ce": 1.0})
    kd = KDConfig(task_weight=0.7, weights={"kd": 0.3, "cwd": 0.2, "dist": 0.1}, temperature=3.0)
    crit = DistillCriterion(task, kd, 255)
    s, t = torch.randn(2, 3, 8, 8), torch.randn(2, 3, 8, 8)
    target = torch.randint(0, 3, (2, 8, 8))
    target[0, :2] = 255
    out = crit(s, t, target)
    valid = target != 255
    expected = (
        0.7 * F.cross_entropy(s, target, ignore_index=255)
        + 0.3 * kd_loss(s, t, 3.0, valid)
        + 0.2 * cwd_loss(s, t, 4.0, valid)
        + 0.1 * dist_loss(s, t, 1.0, valid=valid)
    )
    assert out.total.item() == pytest.approx(expected.item(), abs=1e-6)
    assert set(out.terms) == {"task", "task_ce", "kd", "cwd", "dist"}
    # an unlabelled sample (mask all ignore): task ignores it, KD counts all its pixels
    unl = target.clone()
    unl[1] = 255
    labelled = torch.tensor([True, False])
    out2 = crit(s, t, unl, labelled)
    valid2 = (unl != 255) | ~labelled.view(-1, 1, 1)
    assert out2.terms["kd"].item() == pytest.approx(kd_loss(s, t, 3.0, valid2).item(), abs=1e-6)
    assert out2.terms["task"].item() == pytest.approx(
        F.cross_entropy(s[:1], unl[:1], ignore_index=255).item(), abs=1e-6
    )


def test_dist_inter_class_term_is_degenerate_for_two_classes():
    """ρ of two centred 2-vectors is ±1: the binary inter-class term carries no gradient (why
    distill/run.py drops it), while the intra-class term does."""
    s, t = _pair(2, 1, 8, 8)
    s.requires_grad_(True)
    _, inter, intra = dist_loss(s, t, tau_squared=False, return_terms=True)
    (grad_inter,) = torch.autograd.grad(inter, s, retain_graph=True)
    (grad_intra,) = torch.autograd.grad(intra, s)
    agree = (torch.sigmoid(s) - 0.5).sign() == (torch.sigmoid(t) - 0.5).sign()
    assert inter.item() == pytest.approx(1 - (2 * agree.float() - 1).mean().item(), abs=1e-5)
    assert grad_inter.abs().max() < 1e-4 < grad_intra.abs().max()


# ---------------------------------------------------------------- binary CWD (issue 20, item 6)


def _mmrazor_cwd(s, t, tau):
    """mmrazor's ``ChannelWiseDivergence.forward`` (loss_weight 1), transcribed: a spatial softmax
    per (image, channel) row, the KL summed, times τ², divided by C·N."""
    n, c, h, w = s.shape
    pt = F.softmax(t.reshape(-1, w * h) / tau, dim=1)
    loss = torch.sum(
        pt * F.log_softmax(t.reshape(-1, w * h) / tau, 1) - pt * F.log_softmax(s.reshape(-1, w * h) / tau, 1)
    )
    return loss * tau**2 / (c * n)


@pytest.mark.parametrize("tau, expected", [(1, 0.785897), (4, 0.782922)])
def test_binary_cwd_is_the_reference_formula_on_the_single_channel(tau, expected):
    """A 1-logit model's CWD is the paper's formula with C = 1. Through the two-class view [0, z]
    it was half of that (0.3915 for 0.7829 at τ = 4): the constant channel is uniform in both
    spatial softmaxes, adds 0, and doubles C."""
    s, t = _pair(2, 1, 8, 8)
    s.requires_grad_(True)
    loss = cwd_loss(s, t, tau)
    assert loss.item() == pytest.approx(expected, abs=1e-5)
    assert loss.item() == pytest.approx(_mmrazor_cwd(s.detach(), t, tau).item(), rel=1e-6)
    assert loss.item() == pytest.approx(_naive_cwd(s.detach().numpy(), t.numpy(), tau, None), rel=1e-5)
    loss.backward()
    assert s.grad.abs().sum() > 1e-3


@pytest.mark.parametrize("temp", [0.5, 2.0])
def test_binary_cwd_with_ignored_pixels_matches_the_naive_loop(temp):
    torch.manual_seed(2)
    s, t = torch.randn(3, 1, 5, 7, dtype=torch.float64), torch.randn(3, 1, 5, 7, dtype=torch.float64)
    valid = torch.rand(3, 5, 7) > 0.4
    got = cwd_loss(s, t, temp, valid).item()
    assert got == pytest.approx(_naive_cwd(s.numpy(), t.numpy(), temp, valid.numpy()), rel=1e-6)


# ---------------------------------------------------------------- feature maps of one position (item 10)


def test_feature_channel_norm_on_a_1x1_map_is_an_error_not_a_silent_zero():
    """A 32-px crop at a stride-32 stage gives 1x1 maps: standardising each channel over one position
    gives 0 - 0, so the loss and its gradient would be exactly 0. It is an error that says what to
    change; without the normalisation a 1x1 map still trains."""
    torch.manual_seed(0)
    student = [torch.randn(2, 8, 1, 1, requires_grad=True)]
    teacher = [torch.randn(2, 16, 1, 1)]
    fd = FeatureDistiller([8], [16], [(0, 0)], norm="channel")
    with pytest.raises(ValueError, match=r"1x1 map.*feature_norm=none"):
        fd.loss(fd.adapt(student), teacher)
    plain = FeatureDistiller([8], [16], [(0, 0)], norm="none")
    loss = plain.loss(plain.adapt(student), teacher)
    loss.backward()
    assert loss.item() > 0.1 and student[0].grad.abs().sum() > 0
    # 2 positions are enough for the standardisation to carry a signal
    wide = [torch.randn(2, 8, 1, 2, requires_grad=True)]
    loss = fd.loss(fd.adapt(wide), [torch.randn(2, 16, 1, 2)])
    loss.backward()
    assert loss.item() > 0.1 and wide[0].grad.abs().sum() > 0


# ---------------------------------------------------------------- global normalisation (item 9)


def _as_rank(monkeypatch, other_count):
    """Make the losses see a 2-process group in which the other process holds ``other_count``
    elements (a stand-in for the all-reduce, which sums the counts)."""
    import distill.losses as losses

    monkeypatch.setattr(losses, "_world_size", lambda: 2)
    monkeypatch.setattr(losses.dist, "all_reduce", lambda x: x.add_(float(other_count)))


def test_means_over_pixels_are_global_across_processes(monkeypatch):
    """Two "processes" with 3 and 40 ignored pixels: the mean over processes of what each returns
    equals the one-process value of the whole batch, for KD, CWD, DIST's inter-class term and the
    feature term (it was not for KD: each process divided by its own pixel count)."""
    torch.manual_seed(4)
    s, t = torch.randn(4, 3, 8, 8, dtype=torch.float64), torch.randn(4, 3, 8, 8, dtype=torch.float64)
    valid = torch.ones(4, 8, 8, dtype=torch.bool)
    valid[0, :1, :3] = False  # process 0: 3 ignored pixels
    valid[2, :5] = False  # process 1: 40
    halves = (slice(0, 2), slice(2, 4))
    counts = [int(valid[h].sum()) for h in halves]

    def split(fn, count_of):
        values = []
        for r, h in enumerate(halves):
            with monkeypatch.context() as m:
                _as_rank(m, count_of(1 - r))
                values.append(fn(s[h], t[h], valid[h]))
        return sum(values) / 2

    whole = kd_loss(s, t, 2.0, valid)
    assert split(lambda a, b, v: kd_loss(a, b, 2.0, v), lambda r: counts[r]).item() == pytest.approx(
        whole.item(), rel=1e-6
    )
    per_rank = (
        kd_loss(s[:2], t[:2], 2.0, valid[:2], False) + kd_loss(s[2:], t[2:], 2.0, valid[2:], False)
    ) / 2
    assert abs(per_rank.item() - whole.item()) > 1e-3  # what it was: the split mattered
    whole = cwd_loss(s, t, 4.0, valid)
    assert split(lambda a, b, v: cwd_loss(a, b, 4.0, v), lambda r: 2 * 3).item() == pytest.approx(
        whole.item(), rel=1e-6
    )
    _, inter, _ = dist_loss(s, t, valid=valid, return_terms=True)
    got = split(lambda a, b, v: dist_loss(a, b, valid=v, return_terms=True)[1], lambda r: counts[r])
    assert got.item() == pytest.approx(inter.item(), rel=1e-6)
    fd = FeatureDistiller([3], [3], [(0, 0)]).double()
    adapted = fd.adapt([s])
    whole = fd.loss(adapted, [t])
    fd_split = []
    for h in halves:
        with monkeypatch.context() as m:
            _as_rank(m, 2 * 3 * 8 * 8)
            fd_split.append(fd.loss([adapted[0][h]], [t[h]]))
    assert (sum(fd_split) / 2).item() == pytest.approx(whole.item(), rel=1e-6)


def test_dist_intra_class_term_is_a_per_process_statistic(monkeypatch):
    """Documented, not synchronised: under 2 processes DIST's intra-class term is the mean of each
    process's own term, which differs from the whole batch's."""
    torch.manual_seed(5)
    s, t = torch.randn(4, 3, 6, 6, dtype=torch.float64), torch.randn(4, 3, 6, 6, dtype=torch.float64)
    own = []
    for h in (slice(0, 2), slice(2, 4)):
        with monkeypatch.context() as m:
            _as_rank(m, 2 * 36)
            own.append(dist_loss(s[h], t[h], return_terms=True)[2])
        assert own[-1].item() == pytest.approx(dist_loss(s[h], t[h], return_terms=True)[2].item(), rel=1e-12)
    whole = dist_loss(s, t, return_terms=True)[2]
    assert abs((own[0] + own[1]).item() / 2 - whole.item()) > 1e-4
