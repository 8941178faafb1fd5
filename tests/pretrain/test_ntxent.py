"""NT-Xent: a loop-by-loop version of the SimCLR paper's formula vs lightly vs the objective."""

from __future__ import annotations

import math

import pytest
import torch
from lightly.loss import NTXentLoss
from ssl_toy_encoders import make_toy

from pretrain.objectives import ContrastiveObjective, PretrainModel


def naive_ntxent(z0: torch.Tensor, z1: torch.Tensor, temperature: float) -> float:
    """SimCLR (Chen et al., 2020), Algorithm 1, written with explicit loops over i and k.

    l(i, j) = -log exp(sim(z_i, z_j)/t) / sum_{k != i} exp(sim(z_i, z_k)/t);
    L = 1/(2N) sum_{k=1..N} [l(2k-1, 2k) + l(2k, 2k-1)].
    """
    n = z0.shape[0]
    z = [z0[i] for i in range(n)] + [z1[i] for i in range(n)]  # anchors 0..2N-1

    def sim(a: torch.Tensor, b: torch.Tensor) -> float:
        return float(a @ b) / (float(a.norm()) * float(b.norm()))

    total = 0.0
    for i in range(2 * n):
        j = (i + n) % (2 * n)
        denominator = sum(math.exp(sim(z[i], z[k]) / temperature) for k in range(2 * n) if k != i)
        total += -math.log(math.exp(sim(z[i], z[j]) / temperature) / denominator)
    return total / (2 * n)


def test_ntxent_reference_value():
    torch.manual_seed(0)
    z0, z1 = torch.randn(8, 16), torch.randn(8, 16)
    expected = 2.593192
    assert naive_ntxent(z0, z1, 0.5) == pytest.approx(expected, abs=1e-6)
    assert NTXentLoss(temperature=0.5, gather_distributed=True)(z0, z1).item() == pytest.approx(
        expected, abs=1e-6
    )


@pytest.mark.parametrize("n, d", [(2, 3), (5, 8), (16, 32)])
@pytest.mark.parametrize("temperature", [0.07, 0.2, 1.0])
def test_ntxent_matches_naive_formula(n, d, temperature):
    g = torch.Generator().manual_seed(n * 100 + d)
    z0, z1 = torch.randn(n, d, generator=g), torch.randn(n, d, generator=g)
    naive = naive_ntxent(z0.double(), z1.double(), temperature)
    lightly_loss = NTXentLoss(temperature=temperature, gather_distributed=True)(z0.double(), z1.double())
    assert lightly_loss.item() == pytest.approx(naive, rel=1e-9, abs=1e-9)


def test_ntxent_is_low_for_aligned_views():
    torch.manual_seed(1)
    z = torch.randn(16, 32)
    aligned = naive_ntxent(z, z + 0.01 * torch.randn_like(z), 0.1)
    random = naive_ntxent(z, torch.randn_like(z), 0.1)
    assert aligned < 0.5 < random


@pytest.mark.parametrize("encoder", ["toy_cnn", "toy_vit"])
def test_contrastive_objective_is_ntxent_of_pooled_projections(encoder):
    """The objective's loss = lightly NT-Xent of projection(mean-pooled last stage) of each view."""
    enc = make_toy(encoder)
    model = PretrainModel(enc, "contrastive", temperature=0.2, projection_dim=8, projection_batch_norm=False)
    torch.manual_seed(3)
    v0, v1 = torch.rand(4, 3, 32, 32), torch.rand(4, 3, 32, 32)
    out = model({"view0": v0, "view1": v1})
    objective: ContrastiveObjective = model.objective
    with torch.no_grad():
        z0 = objective.projection(enc.forward_features(v0)[-1].mean(dim=(2, 3)))
        z1 = objective.projection(enc.forward_features(v1)[-1].mean(dim=(2, 3)))
        expected = naive_ntxent(z0.double(), z1.double(), 0.2)
    assert out.loss.item() == pytest.approx(expected, abs=1e-5)
    assert out.terms["contrastive"].item() == pytest.approx(expected, abs=1e-5)
