"""Dense contrastive objective: the two views' point correspondences are exact, the loss is
lightly's NT-Xent on the sampled hypercolumns, and it trains every stage."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from lightly.loss import NTXentLoss

from pretrain.dense import draw_view_boxes, make_dense_views, points_in_view, sample_points
from pretrain.objectives import PretrainModel


def test_view_boxes_contain_the_anchor_and_stay_in_the_image():
    g = torch.Generator().manual_seed(0)
    anchor, views = draw_view_boxes(500, (0.05, 0.4), (0.2, 1.0), generator=g)
    assert anchor.shape == (500, 4) and views.shape == (2, 500, 4)
    eps = 1e-6
    for v in views:
        assert (v[:, :2] >= -eps).all() and (v[:, 2:] <= 1 + eps).all()
        assert (v[:, :2] <= anchor[:, :2] + eps).all() and (v[:, 2:] >= anchor[:, 2:] - eps).all()
    area = (anchor[:, 2] - anchor[:, 0]) * (anchor[:, 3] - anchor[:, 1])
    assert area.min() >= 0.05 - eps and area.max() <= 0.4 + eps


def test_points_in_view_by_hand():
    box = torch.tensor([[0.25, 0.5, 0.75, 1.0]])
    pts = torch.tensor([[[0.25, 0.5], [0.5, 0.75], [0.75, 1.0]]])
    no, yes = torch.tensor([False]), torch.tensor([True])
    torch.testing.assert_close(
        points_in_view(pts, box, no, no), torch.tensor([[[-1.0, -1.0], [0.0, 0.0], [1.0, 1.0]]])
    )
    torch.testing.assert_close(
        points_in_view(pts, box, yes, no), torch.tensor([[[1.0, -1.0], [0.0, 0.0], [-1.0, 1.0]]])
    )


@pytest.mark.parametrize("size", [(64, 64), (48, 80)])
def test_views_show_the_sampled_points_where_the_grids_say(size):
    """On an image whose pixels hold their own (x, y) coordinates, each view sampled at its grid
    returns the image coordinates of the points, to within a pixel of resampling error."""
    h, w = size
    torch.manual_seed(0)
    ys, xs = torch.meshgrid((torch.arange(h) + 0.5) / h, (torch.arange(w) + 0.5) / w, indexing="ij")
    image = torch.stack([xs, ys]).expand(3, 2, h, w).contiguous()  # (B, 2, H, W)
    views, grids, pts = make_dense_views(image, 32, (0.1, 0.3), (0.3, 1.0), 0.0, 0.0, 0.0)
    assert views.shape == (6, 2, h, w) and grids.shape == (6, 32, 2)
    seen = F.grid_sample(views, grids[:, :, None], mode="bilinear", align_corners=False)[..., 0]  # (2B, 2, N)
    expected = pts.repeat(2, 1, 1).transpose(1, 2)  # (2B, 2, N)
    err = (seen - expected).abs()
    assert err[:, 0].max() < 1.0 / w and err[:, 1].max() < 1.0 / h, err.max()
    assert not torch.allclose(views[:3], views[3:])  # the two views differ


def _coordinate_image(b: int, h: int, w: int) -> torch.Tensor:
    """(B, 3, H, W): each pixel holds its own centre ``(x, y)`` in [0, 1] image coordinates, and 1."""
    ys, xs = torch.meshgrid((torch.arange(h) + 0.5) / h, (torch.arange(w) + 0.5) / w, indexing="ij")
    return torch.stack([xs, ys, torch.ones(h, w)]).expand(b, 3, h, w).contiguous()


@pytest.mark.parametrize("stride", [4, 8, 32])
@pytest.mark.parametrize("size", [(64, 64), (64, 96)])
def test_strided_maps_give_every_point_its_own_feature_without_zero_blending(stride, size):
    """A stride-s "stage" that averages the view over s x s cells (each cell then holds the image
    coordinates of its centre) sampled at the grids: points between cell centres read back their
    image coordinates exactly; points within half a cell of the edge read the edge cell's centre
    (within s/2 view pixels); and the constant channel reads 1 everywhere, i.e. no point is blended
    with zeros. With zero padding at 64 px and stride 32 about half of the points were."""
    h, w = size
    torch.manual_seed(0)
    views, grids, pts = make_dense_views(
        _coordinate_image(4, h, w), 64, (0.1, 0.3), (0.3, 1.0), 0.0, 0.0, 0.0
    )
    feats = F.avg_pool2d(views, stride)  # (2B, 3, H/s, W/s)
    got = sample_points([feats], grids, (h, w), (h, w))  # (2B, N, 3)
    torch.testing.assert_close(got[..., 2], torch.ones_like(got[..., 2]), rtol=0, atol=1e-6)
    # view pixel coordinates of the points; the cell centres span [s/2, size - s/2]
    u = (grids + 1) / 2 * torch.tensor([w, h])  # (2B, N, 2)
    inside = ((u >= stride / 2) & (u <= torch.tensor([w, h]) - stride / 2)).all(-1)  # (2B, N)
    truth = pts.repeat(2, 1, 1)  # (2B, N, 2) image coordinates
    err = (got[..., :2] - truth).abs() * torch.tensor([w, h])  # in image pixels
    assert inside.any() and (~inside).any()
    assert err[inside].max() < 0.05, err[inside].max()  # measured <= 0.005 (fp32, roi_align)
    # an edge point reads the nearest cell centre: at most s/2 view pixels (<= s/2 image pixels) off
    assert err[~inside].max() <= stride / 2 + 0.05, err[~inside].max()


def test_sample_points_accounts_for_the_encoders_padding():
    """A 48-px-wide input padded to 64: the map covers the padded width, the grid the unpadded one."""
    f = torch.arange(64.0).view(1, 1, 1, 64).expand(1, 1, 4, 64)  # value = padded x index
    grid = torch.tensor([[[1.0 - 1.0 / 48, 0.0]]])  # the centre of the last real pixel column (47)
    out = sample_points([f], grid, image_size=(4, 48), padded_size=(4, 64))
    torch.testing.assert_close(out, torch.tensor([[[47.0]]]))


def _naive_ntxent(z0: torch.Tensor, z1: torch.Tensor, temperature: float) -> float:
    """NT-Xent from SimCLR's definition (Chen et al., 2020, eq. 1), one anchor at a time: for each of
    the 2M embeddings, -log( exp(sim(i, j(i)) / t) / sum_{k != i} exp(sim(i, k) / t) ), where j(i) is
    the same point in the other view and sim the cosine; the mean over the 2M anchors."""
    z = torch.cat([z0, z1]).double()
    m = z0.shape[0]
    total = 0.0
    for i in range(2 * m):
        pos = i + m if i < m else i - m
        sims = [float(F.cosine_similarity(z[i], z[k], dim=0)) / temperature for k in range(2 * m)]
        denominator = sum(math.exp(s) for k, s in enumerate(sims) if k != i)
        total += -math.log(math.exp(sims[pos]) / denominator)
    return total / (2 * m)


def _naive_bilinear(feature: torch.Tensor, x: float, y: float, stride: int) -> torch.Tensor:
    """Value of a (C, h, w) map of stride ``stride`` at image pixel position (x, y): cell (i, j) sits
    at pixel ((j + 0.5) s, (i + 0.5) s); outside the cell centres the nearest edge cell counts."""
    _, h, w = feature.shape
    fx = min(max(x / stride - 0.5, 0.0), w - 1.0)
    fy = min(max(y / stride - 0.5, 0.0), h - 1.0)
    x0, y0 = int(math.floor(fx)), int(math.floor(fy))
    x1, y1 = min(x0 + 1, w - 1), min(y0 + 1, h - 1)
    ax, ay = fx - x0, fy - y0
    top = (1 - ax) * feature[:, y0, x0] + ax * feature[:, y0, x1]
    bottom = (1 - ax) * feature[:, y1, x0] + ax * feature[:, y1, x1]
    return (1 - ay) * top + ay * bottom


@pytest.mark.parametrize("size, temperature", [((64, 64), 0.3), ((48, 80), 0.1)])
def test_loss_is_naive_ntxent_of_naive_hypercolumns(size, temperature, monkeypatch):
    """The objective's loss against references written from the definitions, not with the functions
    under test: every stage sampled by a naive bilinear loop at each point (the encoder pads 48 x 80
    to 64 x 96), the same point of the other view as the one positive, NT-Xent anchor by anchor."""
    import pretrain.objectives as objectives
    from hybridvision.models import create_encoder

    h, w = size
    torch.manual_seed(0)
    model = PretrainModel(
        create_encoder("resnet_nano"), "dense_contrastive", dense_points=8, temperature=temperature
    )
    obj = model.objective
    made, projected = [], []
    real = objectives.make_dense_views
    monkeypatch.setattr(
        objectives, "make_dense_views", lambda *a, **k: made.append(real(*a, **k)) or made[-1]
    )
    obj.projection.register_forward_hook(lambda _m, args, out: projected.append((args[0], out)))
    x = torch.rand(2, 3, h, w)
    out = model({"image": x})
    ((views, grids, _),), ((hyper, z),) = made, projected
    assert hyper.shape == (2, 2 * 8, sum(model.encoder.out_channels))  # (view, B * N, sum C)
    with torch.no_grad():
        feats = model.encoder.forward_features(views)
    for v in range(2):  # row b * N + n of view v is point n of image b, in view v (= batch row v*B + b)
        for b in range(2):
            for n in range(8):
                gx, gy = grids[v * 2 + b, n].tolist()
                px, py = (gx + 1) / 2 * w, (gy + 1) / 2 * h  # pixel position in the view
                expected = torch.cat(
                    [
                        _naive_bilinear(f[v * 2 + b], px, py, r)
                        for f, r in zip(feats, model.encoder.reductions)
                    ]
                )
                torch.testing.assert_close(hyper[v, b * 8 + n], expected, rtol=1e-5, atol=1e-5)
    naive = _naive_ntxent(z[0].detach(), z[1].detach(), temperature)
    assert out.loss.item() == pytest.approx(naive, rel=1e-5, abs=1e-6)
    lightly_loss = NTXentLoss(temperature=temperature)(z[0].detach(), z[1].detach())  # the reference library
    assert lightly_loss.item() == pytest.approx(naive, rel=1e-5, abs=1e-6)


def test_loss_is_fp32_under_bf16_autocast():
    """Under bf16 autocast the projection's output is bf16, but NT-Xent (normalise, similarities,
    exp, log) runs in fp32: the loss equals the fp32 loss of the same embeddings to 1e-6. (In bf16
    it was 3.6556 against 3.6527.)"""
    from hybridvision.models import create_encoder

    torch.manual_seed(0)
    model = PretrainModel(
        create_encoder("resnet_nano"), "dense_contrastive", dense_points=16, temperature=0.1
    )
    z = torch.randn(2, 2 * 16, 128).to(torch.bfloat16)  # what autocast's Linear gives: (view, B*N, D)

    class Fixed(torch.nn.Module):
        def forward(self, hyper):
            return z + 0 * hyper.sum()

    model.objective.projection = Fixed()
    with torch.autocast("cpu", torch.bfloat16):
        loss = model({"image": torch.rand(2, 3, 64, 64)}).loss
    assert loss.dtype == torch.float32
    expected = NTXentLoss(temperature=0.1)(z[0].float(), z[1].float())
    assert abs(loss.item() - expected.item()) < 1e-6, (loss.item(), expected.item())
    assert abs(loss.item() - _naive_ntxent(z[0].float(), z[1].float(), 0.1)) < 1e-5


def test_dense_contrastive_trains_every_stage_and_its_loss_falls():
    from hybridvision.models import create_encoder

    torch.manual_seed(0)
    model = PretrainModel(
        create_encoder("resnet_nano", in_chans=1), "dense_contrastive", in_chans=1, dense_points=16
    )
    x = torch.rand(4, 1, 64, 64)
    x = F.avg_pool2d(x, 5, 1, 2)  # some spatial structure to tell points apart
    out = model({"image": x})
    out.loss.backward()
    dead = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert dead == []
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    first = None
    for _ in range(25):
        torch.manual_seed(3)  # the same views every step: the loss on them must fall
        loss = model({"image": x}).loss
        first = loss.item() if first is None else first
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < first - 0.5, (first, loss.item())


def test_dense_contrastive_rejects_bad_settings():
    from hybridvision.models import create_encoder
    from pretrain.objectives import DenseContrastiveObjective

    enc = create_encoder("resnet_nano")
    with pytest.raises(ValueError, match="points"):
        DenseContrastiveObjective(enc, points=1)
    with pytest.raises(ValueError, match="anchor_scale"):
        DenseContrastiveObjective(enc, anchor_scale=(0.5, 0.2))
