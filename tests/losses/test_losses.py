"""Segmentation losses against naive per-pixel formulas, references, and ignore_index semantics."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from hybridvision.losses import (
    BCEWithLogitsLoss,
    BoundaryLoss,
    CombinedLoss,
    CrossEntropyLoss,
    DiceLoss,
    FocalLoss,
    build_segmentation_loss,
    euclidean_distance_transform,
    signed_distance_maps,
)
from hybridvision.losses import boundary as boundary_module

IGNORE = 255
SHAPES = [(1, 3, 4, 5), (2, 4, 3, 3), (3, 2, 5, 2)]  # (B, K, H, W)


def _inputs(shape, seed=0, ignore_fraction=0.25, binary=False):
    gen = torch.Generator().manual_seed(seed)
    b, k, h, w = shape
    logits = torch.randn(b, 1 if binary else k, h, w, generator=gen, dtype=torch.float64) * 2
    target = torch.randint(0, 2 if binary else k, (b, h, w), generator=gen)
    target[torch.rand(b, h, w, generator=gen) < ignore_fraction] = IGNORE
    return logits, target


def _pixels(target):
    b, h, w = target.shape
    return [(i, y, x) for i in range(b) for y in range(h) for x in range(w) if target[i, y, x] != IGNORE]


# ----------------------------------------------------------------------------------- naive formulas


def naive_ce(logits, target, weights=None, smoothing=0.0):
    k = logits.shape[1]
    weights = [1.0] * k if weights is None else weights
    total, norm = 0.0, 0.0
    for i, y, x in _pixels(target):
        z = [logits[i, c, y, x].item() for c in range(k)]
        log_z = math.log(sum(math.exp(v) for v in z))
        logp = [v - log_z for v in z]
        t = int(target[i, y, x])
        total += (1 - smoothing) * -weights[t] * logp[t] + smoothing / k * sum(
            -weights[c] * logp[c] for c in range(k)
        )
        norm += weights[t]
    return total / norm


def naive_bce(logits, target, pos_weight=1.0):
    total, n = 0.0, 0
    for i, y, x in _pixels(target):
        p = 1 / (1 + math.exp(-logits[i, 0, y, x].item()))
        t = int(target[i, y, x])
        total += -(pos_weight * t * math.log(p) + (1 - t) * math.log(1 - p))
        n += 1
    return total / n


def naive_focal(logits, target, gamma, alpha=None):
    k = logits.shape[1]
    total, n = 0.0, 0
    for i, y, x in _pixels(target):
        t = int(target[i, y, x])
        if k == 1:
            p = 1 / (1 + math.exp(-logits[i, 0, y, x].item()))
            pt = p if t == 1 else 1 - p
            at = 1.0 if alpha is None else (alpha if t == 1 else 1 - alpha)
        else:
            z = [math.exp(logits[i, c, y, x].item()) for c in range(k)]
            pt = z[t] / sum(z)
            at = 1.0 if alpha is None else alpha[t]
        total += -at * (1 - pt) ** gamma * math.log(pt)
        n += 1
    return total / n


def naive_dice(logits, target, smooth, present_only=False):
    k = logits.shape[1]
    probs = torch.sigmoid(logits) if k == 1 else logits.softmax(1)
    classes = [1] if k == 1 else list(range(k))
    losses, present = [], []
    for j, c in enumerate(classes):
        inter = p_sum = g_sum = 0.0
        for i, y, x in _pixels(target):
            p = probs[i, 0 if k == 1 else j, y, x].item()
            g = 1.0 if int(target[i, y, x]) == c else 0.0
            inter += p * g
            p_sum += p
            g_sum += g
        losses.append(1 - (2 * inter + smooth) / (p_sum + g_sum + smooth))
        present.append(g_sum > 0)
    if present_only:
        kept = [v for v, keep in zip(losses, present) if keep]
        return sum(kept) / max(len(kept), 1)
    return sum(losses) / len(losses)


# -------------------------------------------------------------------------------- cross-entropy / BCE


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("smoothing", [0.0, 0.1])
@pytest.mark.parametrize("weighted", [False, True])
def test_cross_entropy_matches_naive_and_torch(shape, smoothing, weighted):
    logits, target = _inputs(shape, seed=sum(shape))
    k = shape[1]
    weights = [0.5 + c for c in range(k)] if weighted else None
    loss = CrossEntropyLoss(IGNORE, class_weights=weights, label_smoothing=smoothing)(logits, target)
    reference = F.cross_entropy(
        logits,
        target,
        weight=None if weights is None else torch.tensor(weights, dtype=torch.float64),
        ignore_index=IGNORE,
        label_smoothing=smoothing,
    )
    torch.testing.assert_close(loss, reference, rtol=1e-10, atol=1e-12)
    assert loss.item() == pytest.approx(naive_ce(logits, target, weights, smoothing), rel=1e-9)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("pos_weight", [None, 3.0])
def test_bce_matches_naive(shape, pos_weight):
    logits, target = _inputs(shape, seed=1, binary=True)
    loss = BCEWithLogitsLoss(IGNORE, pos_weight=pos_weight)(logits, target)
    assert loss.item() == pytest.approx(naive_bce(logits, target, pos_weight or 1.0), rel=1e-9)


def test_bce_label_smoothing_moves_targets_towards_half():
    logits = torch.zeros(1, 1, 2, 2, dtype=torch.float64)
    logits[0, 0, 0, 0] = 4.0
    target = torch.tensor([[[1, 0], [0, 0]]])
    loss = BCEWithLogitsLoss(label_smoothing=0.2)(logits, target)
    # pixel (0,0): target 0.9 on logit 4; the others: target 0.1 on logit 0 -> log(2)
    p = 1 / (1 + math.exp(-4))
    first = -(0.9 * math.log(p) + 0.1 * math.log(1 - p))
    assert loss.item() == pytest.approx((first + 3 * math.log(2)) / 4, rel=1e-9)


def test_wrong_channel_counts_raise():
    with pytest.raises(ValueError, match="BCEWithLogitsLoss"):
        CrossEntropyLoss()(torch.randn(1, 1, 2, 2), torch.zeros(1, 2, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="K = 1"):
        BCEWithLogitsLoss()(torch.randn(1, 3, 2, 2), torch.zeros(1, 2, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="does not match"):
        CrossEntropyLoss()(torch.randn(1, 3, 4, 4), torch.zeros(1, 2, 2, dtype=torch.long))
    with pytest.raises(TypeError, match="integer"):
        CrossEntropyLoss()(torch.randn(1, 3, 2, 2), torch.zeros(1, 2, 2))


# ---------------------------------------------------------------------------------------------- focal


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("gamma", [0.5, 2.0])
def test_focal_matches_naive_multiclass(shape, gamma):
    logits, target = _inputs(shape, seed=2)
    alpha = [0.2 + 0.1 * c for c in range(shape[1])]
    assert FocalLoss(gamma, ignore_index=IGNORE)(logits, target).item() == pytest.approx(
        naive_focal(logits, target, gamma), rel=1e-9
    )
    assert FocalLoss(gamma, alpha=alpha, ignore_index=IGNORE)(logits, target).item() == pytest.approx(
        naive_focal(logits, target, gamma, alpha), rel=1e-9
    )


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("alpha", [None, 0.25])
def test_focal_matches_naive_binary(shape, alpha):
    logits, target = _inputs(shape, seed=3, binary=True)
    loss = FocalLoss(2.0, alpha=alpha, ignore_index=IGNORE)(logits, target)
    assert loss.item() == pytest.approx(naive_focal(logits, target, 2.0, alpha), rel=1e-9)


@pytest.mark.parametrize("shape", SHAPES)
def test_focal_with_gamma_zero_equals_cross_entropy(shape):
    logits, target = _inputs(shape, seed=4)
    torch.testing.assert_close(FocalLoss(0.0)(logits, target), CrossEntropyLoss()(logits, target))
    logits, target = _inputs(shape, seed=4, binary=True)
    torch.testing.assert_close(FocalLoss(0.0)(logits, target), BCEWithLogitsLoss()(logits, target))


def test_focal_down_weights_easy_pixels():
    logits = torch.tensor([[[[4.0]], [[-4.0]]]])  # confident and right
    target = torch.zeros(1, 1, 1, dtype=torch.long)
    assert FocalLoss(2.0)(logits, target) < 1e-3 * CrossEntropyLoss()(logits, target)


@pytest.mark.parametrize("binary", [False, True])
def test_focal_gradients_stay_finite_for_saturated_pixels(binary):
    target = torch.tensor([[[0, 1], [IGNORE, 1]]])
    if binary:
        logits = torch.tensor([[[[-200.0, 200.0], [300.0, 0.5]]]], requires_grad=True)
    else:
        logits = torch.tensor(
            [[[[200.0, 0.0], [300.0, 0.0]], [[0.0, 200.0], [0.0, 0.5]]]], requires_grad=True
        )
    loss = FocalLoss(gamma=0.5, ignore_index=IGNORE)(logits, target)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(logits.grad).all()
    assert (logits.grad[..., 1, 0] == 0).all() and (logits.grad[..., 1, 1] != 0).all()


def test_focal_rejects_scalar_alpha_for_multiclass():
    with pytest.raises(ValueError, match="per-class"):
        FocalLoss(alpha=0.25)(torch.randn(1, 3, 2, 2), torch.zeros(1, 2, 2, dtype=torch.long))


# ----------------------------------------------------------------------------------------------- dice


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("smooth", [0.0, 1.0])
@pytest.mark.parametrize("present_only", [False, True])
def test_dice_matches_naive(shape, smooth, present_only):
    logits, target = _inputs(shape, seed=5)
    loss = DiceLoss(smooth, IGNORE, classes_present_only=present_only)(logits, target)
    assert loss.item() == pytest.approx(naive_dice(logits, target, smooth, present_only), rel=1e-9, abs=1e-12)
    logits, target = _inputs(shape, seed=6, binary=True)
    loss = DiceLoss(smooth, IGNORE, mode="binary", classes_present_only=present_only)(logits, target)
    assert loss.item() == pytest.approx(naive_dice(logits, target, smooth, present_only), rel=1e-9, abs=1e-12)


def test_dice_from_probabilities_and_perfect_prediction():
    target = torch.tensor([[[0, 1, 2], [2, 1, 0]]])
    probs = F.one_hot(target, 3).permute(0, 3, 1, 2).double()
    assert DiceLoss(smooth=0.0, from_logits=False)(probs, target).item() == pytest.approx(0.0, abs=1e-12)
    wrong = probs.roll(1, dims=1)  # every pixel predicts the next class
    assert DiceLoss(smooth=0.0, from_logits=False)(wrong, target).item() == pytest.approx(1.0)


def test_dice_class_absent_in_target_counts_unless_present_only():
    target = torch.zeros(1, 2, 2, dtype=torch.long)  # only class 0
    probs = torch.zeros(1, 2, 2, 2, dtype=torch.float64)
    probs[:, 0] = 1.0  # perfect; class 1 absent in both -> Dice 1 with smoothing
    assert DiceLoss(smooth=1.0, from_logits=False)(probs, target).item() == pytest.approx(0.0)
    probs[:, :] = 0.5  # half mass on the absent class
    full = DiceLoss(smooth=1.0, from_logits=False)(probs, target).item()
    present = DiceLoss(smooth=1.0, from_logits=False, classes_present_only=True)(probs, target).item()
    assert present == pytest.approx(1 - (2 * 2 + 1) / (2 + 4 + 1))
    assert full == pytest.approx((present + 1 - 1 / (2 + 1)) / 2)


# ------------------------------------------------------------------------------------------- boundary


def _scipy_signed(mask):
    """Kervadec et al.'s one_hot2dist for one binary mask (no ignored pixels)."""
    ndimage = pytest.importorskip("scipy.ndimage")
    pos = mask.numpy().astype(bool)
    if not pos.any() or pos.all():
        return torch.zeros(mask.shape, dtype=torch.float64)
    neg = ~pos
    res = ndimage.distance_transform_edt(neg) * neg - (ndimage.distance_transform_edt(pos) - 1) * pos
    return torch.from_numpy(res)


@pytest.mark.parametrize("backend", ["torch", "scipy"])
@pytest.mark.parametrize("size", [(7, 7), (12, 5), (5, 16), (33, 20)])
def test_distance_transform_is_exact(size, backend):
    ndimage = pytest.importorskip("scipy.ndimage")
    gen = torch.Generator().manual_seed(size[0] * size[1])
    features = torch.rand(4, *size, generator=gen) < torch.tensor([0.02, 0.1, 0.5, 0.9])[:, None, None]
    features[0] = False
    features[0, 0, 0] = True  # one corner seed: largest distances
    ours = euclidean_distance_transform(features, backend=backend)
    reference = torch.stack([torch.from_numpy(ndimage.distance_transform_edt(~f)) for f in features.numpy()])
    torch.testing.assert_close(ours.double(), reference, rtol=0, atol=1e-5)
    clamped = euclidean_distance_transform(features, max_distance=3.5, backend=backend)
    torch.testing.assert_close(clamped.double(), reference.clamp_max(3.5), rtol=0, atol=1e-5)
    empty = euclidean_distance_transform(torch.zeros(1, *size, dtype=torch.bool), backend=backend)
    assert torch.isinf(empty).all()


@pytest.mark.parametrize("backend", ["torch", "scipy"])
@pytest.mark.parametrize("size", [(9, 9), (10, 14)])
def test_signed_distance_maps_match_kervadec(size, backend):
    gen = torch.Generator().manual_seed(7)
    target = torch.randint(0, 3, (2, *size), generator=gen)
    target[1] = 0
    target[1, 2:5, 3:7] = 2  # one rectangle of class 2 on background, class 1 absent in image 1
    maps = signed_distance_maps(target, range(3), normalize=False, backend=backend)
    for b in range(2):
        for c in range(3):
            torch.testing.assert_close(maps[b, c].double(), _scipy_signed(target[b] == c), rtol=0, atol=1e-5)
    normalized = signed_distance_maps(target, range(3), backend=backend)
    torch.testing.assert_close(normalized, maps / math.hypot(*size))


def test_torch_and_scipy_backends_agree_on_a_larger_multiclass_mask(monkeypatch):
    pytest.importorskip("scipy")
    monkeypatch.setattr(boundary_module, "_CHUNK_ELEMENTS", 3 * 70 * 90)  # several chunks of 3 maps
    gen = torch.Generator().manual_seed(3)
    coarse = torch.rand(2, 5, 6, 6, generator=gen)
    target = F.interpolate(coarse, size=(70, 90), mode="bilinear").argmax(1)  # blobs of 5 classes
    target[0, 10:20, 30:40] = IGNORE
    torch_maps = signed_distance_maps(target, range(5), IGNORE, backend="torch")
    scipy_maps = signed_distance_maps(target, range(5), IGNORE, backend="scipy")
    torch.testing.assert_close(torch_maps, scipy_maps, rtol=0, atol=1e-6)
    assert torch_maps.abs().max() > 0.1  # non-trivial maps


def test_signed_distance_map_signs_on_a_square():
    target = torch.zeros(1, 9, 9, dtype=torch.long)
    target[0, 3:6, 3:6] = 1
    phi = signed_distance_maps(target, [1], normalize=False)[0, 0]
    assert phi[4, 4] == -1.0  # centre: one pixel inside the boundary ring
    assert (phi[3:6, 3:6][target[0, 3:6, 3:6] == 1] <= 0).all()
    assert phi[3, 3] == 0.0 and phi[3, 4] == 0.0  # boundary pixels of the square
    assert phi[2, 4] == 1.0 and phi[0, 4] == 3.0  # straight above
    assert phi[0, 0] == pytest.approx(math.sqrt(18))  # to corner (3, 3)
    assert (phi[target[0] == 0] > 0).all()


def test_signed_distance_maps_skip_ignored_pixels():
    target = torch.zeros(1, 1, 9, dtype=torch.long)
    target[0, 0, 4] = 1
    target[0, 0, 5:7] = IGNORE  # ignored ring on the right: neither class 1 nor background
    phi = signed_distance_maps(target, [1], ignore_index=IGNORE, normalize=False)[0, 0, 0]
    assert phi.tolist() == [4.0, 3.0, 2.0, 1.0, 0.0, 0.0, 0.0, 3.0, 4.0]


@pytest.mark.parametrize("num_classes", [1, 3])
def test_boundary_loss_perfect_prediction_is_minimum(num_classes):
    target = torch.zeros(2, 12, 10, dtype=torch.long)
    target[0, 2:7, 3:8] = 1
    target[1, 5:, :4] = num_classes - 1 if num_classes > 1 else 1
    if num_classes == 3:
        target[0, 8:11, 1:4] = 2
    loss_fn = BoundaryLoss()
    if num_classes == 1:
        perfect = (target[:, None] == 1).double() * 40 - 20
    else:
        perfect = F.one_hot(target, num_classes).permute(0, 3, 1, 2).double() * 40
    best = loss_fn(perfect, target)
    assert best < 0
    # the perfect loss is mean over pixels of the (clamped) negative inside distances
    phi = signed_distance_maps(target, [1] if num_classes == 1 else range(num_classes))
    expected = phi.clamp_max(0).sum() / target.numel()
    assert best.item() == pytest.approx(expected.item(), rel=1e-6)
    gen = torch.Generator().manual_seed(0)
    for _ in range(5):
        noisy = perfect + 5 * torch.randn(perfect.shape, generator=gen, dtype=torch.float64)
        assert loss_fn(noisy, target) > best
    # uniform prediction sits in between; a prediction that swaps inside/outside is worst
    assert best < loss_fn(torch.zeros_like(perfect), target) < loss_fn(-perfect, target)


def test_boundary_loss_zero_without_boundaries():
    logits = torch.randn(2, 3, 6, 6)
    target = torch.full((2, 6, 6), 1)  # class 1 everywhere: no boundary for any class
    target[1, :, :3] = IGNORE
    assert BoundaryLoss()(logits, target).item() == 0.0


# ------------------------------------------------------------------------------------ ignore_index


LOSS_FACTORIES = {
    "ce": lambda: CrossEntropyLoss(IGNORE, class_weights=[1.0, 2.0, 0.5], label_smoothing=0.1),
    "bce": lambda: BCEWithLogitsLoss(IGNORE, pos_weight=2.0),
    "dice": lambda: DiceLoss(ignore_index=IGNORE),
    "dice_binary": lambda: DiceLoss(ignore_index=IGNORE, mode="binary"),
    "focal": lambda: FocalLoss(2.0, ignore_index=IGNORE),
    "focal_binary": lambda: FocalLoss(2.0, alpha=0.25, ignore_index=IGNORE),
    "boundary": lambda: BoundaryLoss(IGNORE),
    "boundary_binary": lambda: BoundaryLoss(IGNORE),
    "combined": lambda: build_segmentation_loss(3, IGNORE, class_weights=[1.0, 2.0, 0.5]),
    "combined_binary": lambda: build_segmentation_loss(1, IGNORE),
}


@pytest.mark.parametrize("name", list(LOSS_FACTORIES))
def test_ignored_pixels_change_nothing(name):
    binary = name in ("bce",) or name.endswith("_binary")
    logits, target = _inputs((2, 3, 6, 7), seed=8, ignore_fraction=0.3, binary=binary)
    ignored = target == IGNORE
    assert ignored.any() and (~ignored).any()
    loss_fn = LOSS_FACTORIES[name]()

    def value(x):
        out = loss_fn(x, target)
        return out.total if isinstance(out, tuple) else out

    x1 = logits.clone().requires_grad_(True)
    loss1 = value(x1)
    loss1.backward()
    assert torch.isfinite(loss1)
    grad_at_ignored = x1.grad.permute(1, 0, 2, 3)[:, ignored]
    assert (grad_at_ignored == 0).all()
    assert (x1.grad.permute(1, 0, 2, 3)[:, ~ignored] != 0).any()

    changed = logits.clone()
    changed.permute(1, 0, 2, 3)[:, ignored] = 50 * torch.randn(
        changed.shape[1], int(ignored.sum()), dtype=torch.float64
    )
    assert value(changed).item() == pytest.approx(loss1.item(), rel=1e-12, abs=1e-12)
    # a change at a valid pixel does change the loss (so this test can fail)
    moved = logits.clone()
    moved.permute(1, 0, 2, 3)[:, ~ignored] += (
        3.0 * torch.linspace(-1, 1, moved.shape[1], dtype=torch.float64)[:, None]
    )
    assert value(moved).item() != pytest.approx(loss1.item(), rel=1e-6)


@pytest.mark.parametrize("name", list(LOSS_FACTORIES))
def test_all_ignored_gives_zero_not_nan(name):
    binary = name in ("bce",) or name.endswith("_binary")
    logits = torch.randn(1, 1 if binary else 3, 4, 4, requires_grad=True)
    target = torch.full((1, 4, 4), IGNORE)
    out = LOSS_FACTORIES[name]()(logits, target)
    total = out.total if isinstance(out, tuple) else out
    assert total.item() == 0.0  # Dice of two empty sets with smoothing: 1 - smooth / smooth = 0
    total.backward()
    assert torch.isfinite(logits.grad).all() and (logits.grad == 0).all()


# ------------------------------------------------------------------------------------------- combined


def test_combined_loss_sums_weighted_terms():
    logits, target = _inputs((2, 3, 5, 5), seed=9)
    loss = build_segmentation_loss(
        3, IGNORE, weights={"ce": 1.0, "dice": 0.5, "focal": 0.25, "boundary": 0.1}
    )
    out = loss(logits, target)
    assert list(out.terms) == ["ce", "dice", "focal", "boundary"]
    expected = {
        "ce": CrossEntropyLoss(IGNORE)(logits, target),
        "dice": DiceLoss(ignore_index=IGNORE)(logits, target),
        "focal": FocalLoss(2.0, ignore_index=IGNORE)(logits, target),
        "boundary": BoundaryLoss(IGNORE)(logits, target),
    }
    for name, value in expected.items():
        torch.testing.assert_close(out.terms[name], value)
    total = expected["ce"] + 0.5 * expected["dice"] + 0.25 * expected["focal"] + 0.1 * expected["boundary"]
    torch.testing.assert_close(out.total, total)


def test_builder_picks_bce_for_one_class_and_drops_zero_weights():
    loss = build_segmentation_loss(1, weights={"ce": 1.0, "dice": 1.0, "boundary": 0.0}, class_weights=[3.0])
    assert isinstance(loss, CombinedLoss)
    assert isinstance(loss.losses["ce"], BCEWithLogitsLoss) and loss.losses["ce"].pos_weight.item() == 3.0
    assert loss.losses["dice"].mode == "binary"
    assert "boundary" not in loss.losses
    assert isinstance(build_segmentation_loss(2).losses["ce"], CrossEntropyLoss)


def test_builder_errors_name_the_valid_terms():
    with pytest.raises(
        ValueError,
        match=r"unknown loss term\(s\) \['lovasz'\]; valid terms: \['ce', 'dice', 'focal', 'boundary'\]",
    ):
        build_segmentation_loss(3, weights={"ce": 1.0, "lovasz": 1.0})
    with pytest.raises(ValueError, match="class_weights has 2 entries"):
        build_segmentation_loss(3, class_weights=[1.0, 2.0])
    with pytest.raises(ValueError, match="one value"):
        build_segmentation_loss(1, class_weights=[1.0, 2.0])
