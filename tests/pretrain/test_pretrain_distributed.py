"""2 gloo processes x batch B == 1 process x batch 2B: losses and DDP-averaged encoder gradients.

Each case builds the same model on every rank, wraps it in DistributedDataParallel (gradients
all-reduced and divided by the world size), feeds rank ``r`` the ``r``-th half of a fixed batch
and compares the mean of the per-rank losses and the gradients with a single-process step on
the whole batch (see ``pretrain/objectives.py`` for why no extra scaling is needed).
"""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from ssl_toy_encoders import make_toy

from pretrain.masking import BlockMaskGenerator
from pretrain.objectives import PretrainModel

WORLD = 2
PER_RANK = 3

# name -> (encoder, objective, options, mask kind)
CASES = {
    "contrastive_cnn": ("toy_cnn", "contrastive", {}, None),
    "contrastive_vit": ("toy_vit", "contrastive", {"temperature": 0.1}, None),
    "mim_cnn": ("toy_cnn", "mim", {}, "generator"),
    "mim_vit_mse": ("toy_vit", "mim", {"mim_loss": "mse"}, "generator"),
    "mim_unequal_counts": ("toy_cnn", "mim", {}, "unequal"),
    "mim_unequal_counts_local_norm": ("toy_cnn", "mim", {"gather_distributed": False}, "unequal"),
    "contrastive_mim_vit": ("toy_vit", "contrastive_mim", {}, "generator"),
    # zoo encoders with LayerNorm only (BatchNorm statistics are per process, so B != 2B there)
    "mim_mit_nano": ("mit_nano", "mim", {}, "generator"),
    "contrastive_mim_mit_nano": ("mit_nano", "contrastive_mim", {}, "generator"),
    "mim_swin_nano": ("swin_nano", "mim", {}, "generator"),
    "contrastive_mim_swin_nano": ("swin_nano", "contrastive_mim", {}, "generator"),
}
ZOO = ("mit_nano", "swin_nano")


def _build(case: str) -> PretrainModel:
    encoder, objective, options, _ = CASES[case]
    kwargs = {"projection_dim": 8, "projection_batch_norm": False} if "contrastive" in objective else {}
    if "mim" in objective:
        kwargs |= {"in_chans": 3, "mask_patch_size": 16, "decoder_dim": 8}
    if encoder in ZOO:
        from hybridvision.models import create_encoder

        torch.manual_seed(0)
        enc = create_encoder(encoder, in_chans=3, drop_path_rate=0.0)  # no per-rank randomness
        assert not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in enc.modules())
    else:
        enc = make_toy(encoder, seed=0)
    torch.manual_seed(1)
    return PretrainModel(enc, objective, **kwargs, **options)


def _batch(case: str) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(42)
    n = WORLD * PER_RANK
    batch = {k: torch.rand(n, 3, 32, 64, generator=g) for k in ("view0", "view1", "image")}
    kind = CASES[case][3]
    if kind == "generator":
        batch["mask"] = BlockMaskGenerator((32, 64), 16, 0.6)(n, generator=g)
    elif kind == "unequal":  # all of rank 0's images masked more than rank 1's
        mask = torch.zeros(n, 1, 2, 4, dtype=torch.bool)
        for i in range(n):
            mask.view(n, -1)[i, : 6 - i] = True
        batch["mask"] = mask
    return batch


def _step(
    model: torch.nn.Module, batch: dict[str, torch.Tensor]
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    out = model(batch)
    out.loss.backward()
    inner = getattr(model, "module", model)
    grads = {n: p.grad.detach().clone() for n, p in inner.named_parameters()}
    return out.loss.detach(), grads


def _worker(rank: int, port: int, out_dir: str) -> None:
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        results = {}
        for case in CASES:
            model = torch.nn.parallel.DistributedDataParallel(_build(case))
            batch = {k: v[rank * PER_RANK : (rank + 1) * PER_RANK] for k, v in _batch(case).items()}
            loss, grads = _step(model, batch)
            dist.all_reduce(loss)  # mean of the per-rank losses = what a logger would report
            results[case] = (loss / WORLD, grads)
        if rank == 0:
            torch.save(results, os.path.join(out_dir, "ddp.pt"))
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ddp_results(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("ddp")
    mp.spawn(_worker, args=(_free_port(), str(out_dir)), nprocs=WORLD, join=True)
    return torch.load(out_dir / "ddp.pt")


@pytest.mark.slow
@pytest.mark.parametrize("case", [c for c in CASES if not c.endswith("local_norm")])
def test_two_processes_equal_one_process_with_double_batch(ddp_results, case):
    ddp_loss, ddp_grads = ddp_results[case]
    loss, grads = _step(_build(case), _batch(case))
    torch.testing.assert_close(ddp_loss, loss, rtol=1e-5, atol=1e-5)
    assert ddp_grads.keys() == grads.keys()
    assert any(n.startswith("encoder.") for n in grads)
    for name, grad in grads.items():
        assert grad.abs().sum() > 0, name
        torch.testing.assert_close(ddp_grads[name], grad, rtol=1e-5, atol=1e-5, msg=name)


@pytest.mark.slow
def test_per_rank_normalisation_differs_when_counts_differ(ddp_results):
    """The check above can fail: with local normalisation and unequal masked counts per rank,
    the mean of per-rank means is not the global mean."""
    ddp_loss, ddp_grads = ddp_results["mim_unequal_counts_local_norm"]
    loss, grads = _step(_build("mim_unequal_counts_local_norm"), _batch("mim_unequal_counts_local_norm"))
    assert abs(ddp_loss.item() - loss.item()) > 1e-3
    assert not torch.allclose(ddp_grads["objective.mask_token"], grads["objective.mask_token"], atol=1e-5)
