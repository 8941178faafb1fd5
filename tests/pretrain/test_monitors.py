"""Collapse statistics (values for healthy vs collapsed embeddings) and the MIM image grid."""

from __future__ import annotations

import math

import pytest
import torch

from pretrain.monitors import (
    alignment,
    contrastive_stats,
    cosine_similarities,
    embedding_std,
    make_mim_grid,
    uniformity,
)


@pytest.mark.parametrize("dim", [16, 128])
def test_embedding_std_healthy_vs_collapsed(dim):
    torch.manual_seed(0)
    healthy = torch.randn(4096, dim)
    assert embedding_std(healthy).item() == pytest.approx(1 / math.sqrt(dim), rel=0.02)
    collapsed = torch.randn(1, dim).expand(4096, dim) + 1e-4 * torch.randn(4096, dim)
    assert embedding_std(collapsed).item() < 1e-3


def test_alignment_and_uniformity():
    torch.manual_seed(0)
    z = torch.randn(256, 32)
    assert alignment(z, 3 * z).item() == pytest.approx(0.0, abs=1e-6)  # scale-free: normalised first
    antipodal = alignment(z, -z).item()
    assert antipodal == pytest.approx(4.0, rel=1e-5)  # ||u - (-u)||^2 = 4
    assert uniformity(torch.ones(8, 4)).item() == pytest.approx(0.0, abs=1e-6)  # collapse: maximum
    # spread points: uniformity ~ log E exp(-2 * 2(1 - cos)) ~ -4 for near-orthogonal directions
    assert uniformity(z).item() == pytest.approx(-4.0, abs=0.3)
    # naive definition over pairs i < j
    u = torch.nn.functional.normalize(z[:10], dim=1)
    pairs = [math.exp(-2 * float((u[i] - u[j]).pow(2).sum())) for i in range(10) for j in range(i + 1, 10)]
    assert uniformity(z[:10]).item() == pytest.approx(math.log(sum(pairs) / len(pairs)), rel=1e-5)


def test_cosine_similarities_match_naive():
    torch.manual_seed(1)
    z0, z1 = torch.randn(5, 6), torch.randn(5, 6)
    positive, negative = cosine_similarities(z0, z1)
    z = torch.cat([z0, z1])
    cos = torch.nn.functional.cosine_similarity
    pos = [cos(z0[i], z1[i], dim=0).item() for i in range(5)]
    neg = [cos(z[i], z[j], dim=0).item() for i in range(10) for j in range(10) if i != j and abs(i - j) != 5]
    assert positive.item() == pytest.approx(sum(pos) / len(pos), abs=1e-6)
    assert negative.item() == pytest.approx(sum(neg) / len(neg), abs=1e-6)
    stats = contrastive_stats(z0, z0)
    assert stats["positive_cosine"].item() == pytest.approx(1.0)
    assert stats["alignment"].item() == pytest.approx(0.0, abs=1e-6)


def test_make_mim_grid_pastes_reconstruction_into_masked_regions():
    torch.manual_seed(0)
    original = torch.rand(3, 1, 8, 8) + 1.0  # range [1, 2]: exercises the min-max scaling
    recon = torch.full_like(original, 1.5)
    mask = torch.zeros(3, 1, 2, 2)
    mask[:, :, 0, 0] = 1
    pixel = mask.repeat_interleave(4, 2).repeat_interleave(4, 3)
    masked = original * (1 - pixel)
    grid = make_mim_grid(masked, recon, original, max_images=2, mask=mask)
    assert grid.shape == (3, 2 * 8 + 3 * 2, 4 * 8 + 5 * 2)  # 2 rows x 4 columns, 2 px padding
    assert grid.min() >= 0 and grid.max() <= 1
    tile = lambda r, c: grid[:, 2 + r * 10 : 10 + r * 10, 2 + c * 10 : 10 + c * 10]  # noqa: E731
    lo, hi = original[0].min(), original[0].max()
    scaled = lambda t: ((t - lo) / (hi - lo)).expand(3, -1, -1)  # noqa: E731
    pasted = torch.where(pixel[0].bool(), recon[0], original[0])
    torch.testing.assert_close(tile(0, 1), scaled(pasted))
    torch.testing.assert_close(tile(0, 3), scaled(original[0]))
    assert torch.all(tile(0, 0)[:, :4, :4] == 0)  # masked block shown black
    # the mask can be inferred from the masked input when it is not given
    torch.testing.assert_close(make_mim_grid(masked, recon, original, max_images=2), grid)
