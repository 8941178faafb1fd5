"""Views and point correspondences for dense (point-level) contrastive learning
(``objectives.DenseContrastiveObjective``): NT-Xent between the features of the *same image point*
seen in two augmented views, against every other sampled point of the batch.

Image-level contrast (SimCLR) needs images that differ from each other; on a set where every image
shows the same tissue it has nothing to separate. Point-level contrast separates *positions*
(membrane vs cell interior, road vs sky) within and across images, which is what a segmentation
encoder needs — the idea of DenseCL (Wang et al., 2021), PixPro / PixContrast (Xie et al., 2021),
VICRegL (Bardes et al., 2022) and point-level region contrast (Bai et al., 2022). This module is the
plain form with exact correspondences and no momentum encoder (steps 1-2 here, 3-4 in the
objective):

1. For each image of ``batch["image"]`` (B, C, H, W) an anchor box is drawn
   (``anchor_scale`` of the area) and two view boxes that contain it (each ``view_scale`` of the
   area); ``torchvision.ops.roi_align`` resamples both boxes to (H, W), each view is flipped at
   random and gets its own brightness / contrast / noise.
2. ``points`` positions are drawn uniformly inside the anchor box; their coordinates in each view
   follow from the boxes and flips, so correspondence is exact.
3. Every encoder stage is sampled bilinearly at those coordinates (``F.grid_sample``; a point
   within half a cell of a map's edge takes the edge cell's value, never a blend with zeros) and the
   per-stage features are concatenated (a hypercolumn, so every stage gets a gradient), then an
   MLP projection maps them to ``projection_dim``.
4. lightly's ``NTXentLoss`` on the 2 x (B x points) embeddings: the same point in the other view is
   the positive, all other points of the batch (of every process with ``gather_distributed``) are
   negatives.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.ops import roi_align

__all__ = ["draw_view_boxes", "make_dense_views", "points_in_view", "sample_points"]


def draw_view_boxes(
    b: int,
    anchor_scale: tuple[float, float],
    view_scale: tuple[float, float],
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
) -> tuple[Tensor, Tensor]:
    """Anchor boxes and two view boxes per image that contain them, in [0, 1] image coordinates.

    Returns:
        ``anchor`` (B, 4) and ``views`` (2, B, 4), boxes as ``(x0, y0, x1, y1)``; each view box
        contains its image's anchor box and lies inside the image.
    """

    def side(scale: tuple[float, float], n: int) -> Tensor:  # square-ish boxes: side = sqrt(area)
        area = torch.empty(n, device=device).uniform_(scale[0], scale[1], generator=generator)
        return area.sqrt()

    a = side(anchor_scale, b)[:, None].expand(b, 2)  # (B, 2) width, height
    a0 = torch.rand(b, 2, generator=generator, device=device) * (1 - a)  # anchor top-left
    anchor = torch.cat([a0, a0 + a], dim=1)
    views = []
    for _ in range(2):
        s = torch.maximum(side(view_scale, b)[:, None].expand(b, 2), a)  # at least the anchor's side
        # top-left such that the view contains the anchor and stays inside the image
        lo = torch.clamp(a0 + a - s, min=0.0)
        hi = torch.minimum(a0, 1 - s)
        v0 = lo + torch.rand(b, 2, generator=generator, device=device) * (hi - lo).clamp(min=0.0)
        views.append(torch.cat([v0, v0 + s], dim=1))
    return anchor, torch.stack(views)


def points_in_view(points: Tensor, box: Tensor, flip_x: Tensor, flip_y: Tensor) -> Tensor:
    """Map image points into a view's ``grid_sample`` coordinates.

    Args:
        points: (B, N, 2) ``(x, y)`` in [0, 1] image coordinates.
        box: (B, 4) the view's ``(x0, y0, x1, y1)``.
        flip_x, flip_y: (B,) bool, the view was flipped horizontally / vertically.

    Returns:
        (B, N, 2) in [-1, 1] (``align_corners=False`` convention: -1 and 1 are the outer pixel edges).
    """
    u = (points - box[:, None, :2]) / (box[:, None, 2:] - box[:, None, :2])  # [0, 1] in the view
    u = torch.stack(
        [
            torch.where(flip_x[:, None], 1 - u[..., 0], u[..., 0]),
            torch.where(flip_y[:, None], 1 - u[..., 1], u[..., 1]),
        ],
        dim=-1,
    )
    return u * 2 - 1


def make_dense_views(
    x: Tensor,
    points: int,
    anchor_scale: tuple[float, float],
    view_scale: tuple[float, float],
    brightness: float,
    contrast: float,
    noise: float,
) -> tuple[Tensor, Tensor, Tensor]:
    """Two augmented views of every image of ``x`` (B, C, H, W) and where ``points`` shared image
    points lie in each.

    Returns:
        ``views`` (2B, C, H, W) (view 0 of every image, then view 1), ``grids`` (2B, N, 2), the
        points in each view's [-1, 1] ``grid_sample`` coordinates (same order as ``views``), and the
        points in the image, (B, N, 2) ``(x, y)`` in [0, 1].
    """
    b, _, h, w = x.shape
    dev = x.device
    anchor, boxes = draw_view_boxes(b, anchor_scale, view_scale, device=dev)  # (B, 4), (2, B, 4)
    span = anchor[:, None, 2:] - anchor[:, None, :2]
    pts = anchor[:, None, :2] + torch.rand(b, points, 2, device=dev) * span  # (B, N, 2) in the anchor
    scale = torch.tensor([w, h, w, h], dtype=x.dtype, device=dev)
    index = torch.arange(b, device=dev, dtype=x.dtype).repeat(2)[:, None]
    rois = torch.cat([index, boxes.reshape(2 * b, 4).to(x.dtype) * scale], dim=1)  # pixel boxes
    views = roi_align(x, rois, output_size=(h, w), spatial_scale=1.0, sampling_ratio=2, aligned=True)
    flips = torch.rand(2, 2, b, device=dev) < 0.5  # (view, axis, image)
    views = views.view(2, b, *views.shape[1:])
    views = torch.where(flips[:, 0, :, None, None, None], views.flip(-1), views)
    views = torch.where(flips[:, 1, :, None, None, None], views.flip(-2), views)
    views = views.reshape(2 * b, *views.shape[2:])
    grids = torch.cat([points_in_view(pts, boxes[v], flips[v, 0], flips[v, 1]) for v in range(2)])
    n = 2 * b  # photometric, per view: contrast around the view's mean, brightness, noise
    mean = views.mean(dim=(1, 2, 3), keepdim=True)
    c = 1 + (torch.rand(n, 1, 1, 1, device=dev) * 2 - 1) * contrast
    br = (torch.rand(n, 1, 1, 1, device=dev) * 2 - 1) * brightness
    sd = torch.rand(n, 1, 1, 1, device=dev) * noise
    views = (views - mean) * c + mean + br + sd * torch.randn_like(views)
    return views, grids, pts


def sample_points(
    feats: list[Tensor], grids: Tensor, image_size: tuple[int, int], padded_size: tuple[int, int]
) -> Tensor:
    """Bilinear samples of every feature map at ``grids``, concatenated over stages.

    A stage of stride ``s`` holds one value per ``s x s`` cell, located at the cell's centre
    (``align_corners=False``: pixel ``p`` of the image lies at ``p / s - 0.5`` on the map). A point
    between cell centres is the bilinear blend of its four neighbours; a point within half a cell of
    the map's edge lies outside every centre and takes the nearest edge cell's value
    (``padding_mode="border"``), so no sampled feature is ever blended with zeros. (With zero
    padding, a 64-px view and a stride-32 stage, half of all points would be.)

    The maps cover the input padded to ``padded_size`` (the encoder pads bottom/right to its size
    divisor); the grid coordinates refer to the unpadded ``image_size`` (H, W), so they are rescaled
    first.

    Args:
        feats: per-stage maps, each (2B, C_i, h_i, w_i).
        grids: (2B, N, 2) point ``(x, y)`` in each view's [-1, 1] coordinates (``align_corners=False``).
        image_size: (H, W) of the views.
        padded_size: (Hp, Wp) the encoder's input after its padding.

    Returns:
        (2B, N, sum of C_i), fp32.
    """
    (h, w), (hp, wp) = image_size, padded_size
    ratio = torch.tensor([w / wp, h / hp], device=grids.device, dtype=torch.float32)
    grid = (((grids.float() + 1) * ratio) - 1)[:, :, None, :]  # (2B, N, 1, 2)
    sampled = [
        F.grid_sample(f.float(), grid, mode="bilinear", padding_mode="border", align_corners=False)[..., 0]
        for f in feats
    ]  # each (2B, C_i, N)
    return torch.cat(sampled, dim=1).transpose(1, 2)  # (2B, N, sum C)
