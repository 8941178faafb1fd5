"""Dense contrastive objective: the two views' point correspondences are exact, the loss is
lightly's NT-Xent on the sampled hypercolumns, and it trains every stage."""

from __future__ import annotations

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


def test_sample_points_accounts_for_the_encoders_padding():
    """A 48-px-wide input padded to 64: the map covers the padded width, the grid the unpadded one."""
    f = torch.arange(64.0).view(1, 1, 1, 64).expand(1, 1, 4, 64)  # value = padded x index
    grid = torch.tensor([[[1.0 - 1.0 / 48, 0.0]]])  # the centre of the last real pixel column (47)
    out = sample_points([f], grid, image_size=(4, 48), padded_size=(4, 64))
    torch.testing.assert_close(out, torch.tensor([[[47.0]]]))


def test_loss_is_lightly_ntxent_on_the_projected_hypercolumns():
    from hybridvision.models import create_encoder

    torch.manual_seed(0)
    model = PretrainModel(create_encoder("resnet_nano"), "dense_contrastive", dense_points=8, temperature=0.3)
    obj = model.objective
    x = torch.rand(2, 3, 64, 64)
    torch.manual_seed(1)
    out = model({"image": x})
    torch.manual_seed(1)
    views, grids, _ = make_dense_views(x, 8, **obj.view_options)
    hyper = sample_points(model.encoder.forward_features(views), grids, (64, 64), (64, 64))
    z = obj.projection(hyper.reshape(2, 16, -1))
    expected = NTXentLoss(temperature=0.3)(z[0], z[1])
    torch.testing.assert_close(out.loss, expected)
    assert hyper.shape[-1] == sum(model.encoder.out_channels)


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
