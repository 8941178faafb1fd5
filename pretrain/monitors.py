"""Health statistics for self-supervised training and a MIM image grid for TensorBoard.

Collapse is the failure mode of joint-embedding methods: all embeddings converge to one point
(or to a low-dimensional subspace). The statistics here detect it without labels:

* :func:`embedding_std` — per-dimension std of l2-normalised embeddings, averaged over dims.
  Healthy, spread-out embeddings of dimension ``d`` give about ``1 / sqrt(d)``; a collapsed
  representation gives ~0 (the lightly / SimSiam diagnostic).
* :func:`alignment` and :func:`uniformity` — Wang & Isola, 2020, "Understanding Contrastive
  Representation Learning through Alignment and Uniformity on the Hypersphere". Lower is better
  for both; collapse shows up as uniformity -> 0 (its maximum).
* :func:`cosine_similarities` — mean cosine similarity of positive pairs and of negative pairs.

All functions work on detached copies in fp32 and return 0-dim tensors (no host sync).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.utils import make_grid

__all__ = [
    "alignment",
    "contrastive_stats",
    "cosine_similarities",
    "embedding_std",
    "make_mim_grid",
    "uniformity",
]


def _unit(z: Tensor) -> Tensor:
    return F.normalize(z.detach().float(), dim=1)


def embedding_std(z: Tensor) -> Tensor:
    """Mean over dimensions of the per-dimension std of l2-normalised embeddings.

    Args:
        z: (N, D) embeddings.

    Returns:
        0-dim tensor; about ``1 / sqrt(D)`` for healthy embeddings, 0 when collapsed.
    """
    return _unit(z).std(dim=0).mean()


def alignment(z0: Tensor, z1: Tensor, alpha: float = 2.0) -> Tensor:
    """Alignment ``E ||f(x) - f(y)||^alpha`` over positive pairs (Wang & Isola, 2020).

    Args:
        z0: (N, D) embeddings of the first views.
        z1: (N, D) embeddings of the second views (row ``i`` is the positive of ``z0[i]``).
        alpha: exponent (2 in the paper).
    """
    return (_unit(z0) - _unit(z1)).norm(dim=1).pow(alpha).mean()


def uniformity(z: Tensor, t: float = 2.0) -> Tensor:
    """Uniformity ``log E_{i<j} exp(-t ||f(x_i) - f(x_j)||^2)`` (Wang & Isola, 2020).

    Args:
        z: (N, D) embeddings, N >= 2.
        t: temperature (2 in the paper).

    Returns:
        0-dim tensor in ``[-4t, 0]``; 0 means every embedding is the same point.
    """
    sq_dist = torch.pdist(_unit(z), p=2).pow(2)  # (N*(N-1)/2,)
    return sq_dist.mul(-t).exp().mean().log()


def cosine_similarities(z0: Tensor, z1: Tensor) -> tuple[Tensor, Tensor]:
    """Mean cosine similarity of positive pairs and of negative pairs.

    The ``2N`` embeddings ``[z0; z1]`` form ``N`` positive pairs ``(z0[i], z1[i])``; every other
    pair of distinct embeddings is a negative (as in NT-Xent).

    Args:
        z0: (N, D) embeddings of the first views.
        z1: (N, D) embeddings of the second views.

    Returns:
        ``(positive, negative)`` 0-dim tensors.
    """
    u0, u1 = _unit(z0), _unit(z1)
    n = u0.shape[0]
    positive = (u0 * u1).sum(dim=1).mean()
    u = torch.cat([u0, u1], dim=0)  # (2N, D)
    sim = u @ u.T  # (2N, 2N)
    idx = torch.arange(2 * n, device=u.device)
    excluded = torch.zeros_like(sim, dtype=torch.bool)
    excluded[idx, idx] = True  # self
    excluded[idx, (idx + n) % (2 * n)] = True  # positive partner
    negative = sim[~excluded].mean() if n > 1 else sim.new_zeros(())
    return positive, negative


def contrastive_stats(z0: Tensor, z1: Tensor) -> dict[str, Tensor]:
    """All health statistics of a pair of embedding batches, as a dict of 0-dim tensors.

    Args:
        z0: (N, D) first-view embeddings.
        z1: (N, D) second-view embeddings.

    Returns:
        ``embedding_std`` (of both views together), ``alignment``, ``uniformity`` (mean of the
        two views, as in Wang & Isola's code), ``positive_cosine``, ``negative_cosine``.
    """
    positive, negative = cosine_similarities(z0, z1)
    stats = {
        "embedding_std": embedding_std(torch.cat([z0, z1], dim=0)),
        "alignment": alignment(z0, z1),
        "positive_cosine": positive,
        "negative_cosine": negative,
    }
    if z0.shape[0] > 1:
        stats["uniformity"] = (uniformity(z0) + uniformity(z1)) / 2
    return stats


def _to_rgb(x: Tensor) -> Tensor:
    """(N, C, H, W) -> (N, 3, H, W): grey repeated, the first three bands of multi-band images."""
    if x.shape[1] == 1:
        return x.expand(-1, 3, -1, -1)
    if x.shape[1] == 2:
        return torch.cat([x, x[:, :1]], dim=1)
    return x[:, :3]


@torch.no_grad()
def make_mim_grid(
    masked: Tensor,
    recon: Tensor,
    original: Tensor,
    max_images: int = 8,
    mask: Tensor | None = None,
) -> Tensor:
    """An image grid showing masked image modelling at work, for TensorBoard.

    One row per image (at most ``max_images``), four columns: the masked input, the
    reconstruction pasted into the masked regions of the original, the raw reconstruction, the
    original. Each row is min-max scaled with the original's range (the images may be
    normalised), so colours are comparable across columns.

    Args:
        masked: (B, C, H, W) masked input (masked pixels zero).
        recon: (B, C, H, W) reconstruction.
        original: (B, C, H, W) un-masked input.
        max_images: rows to show.
        mask: (B, 1, h, w) patch mask (1 = masked) on any grid that tiles (H, W); if None it is
            read from ``masked`` as the pixels where every channel is exactly 0 and the
            original is not.

    Returns:
        (3, H', W') float image in [0, 1].
    """
    n = min(max_images, original.shape[0])
    masked, recon, original = (t[:n].detach().float().cpu() for t in (masked, recon, original))
    if mask is None:
        m = ((masked == 0).all(dim=1, keepdim=True) & (original != 0).any(dim=1, keepdim=True)).float()
    else:
        m = F.interpolate(mask[:n].detach().float().cpu(), size=original.shape[-2:], mode="nearest")
    pasted = recon * m + original * (1 - m)
    lo = original.amin(dim=(1, 2, 3), keepdim=True)
    hi = original.amax(dim=(1, 2, 3), keepdim=True)
    scale = (hi - lo).clamp_min(1e-6)
    shown = [masked, pasted, recon, original]
    columns = [_to_rgb(((t - lo) / scale).clamp(0, 1)) for t in shown]
    columns[0] = columns[0] * (1 - m)  # masked regions black whatever the normalisation
    tiles = torch.stack(columns, dim=1).flatten(0, 1)  # (n * 4, 3, H, W), row-major
    return make_grid(tiles, nrow=4, padding=2, pad_value=1.0)
