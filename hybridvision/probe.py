"""Dense linear probe: how good are frozen encoder features for segmentation?

Used during pretraining (is the representation improving?) and to compare a pretrained encoder
with a random one. The probe

1. runs the frozen encoder (eval mode, no grad) on labelled images,
2. takes the chosen stages, resizes them to the grid of the first chosen stage, concatenates,
3. samples pixels whose (nearest-resized) label is not ``ignore_index``,
4. standardises the features (train statistics) and fits a linear softmax classifier
   (full-batch L-BFGS on cached features, L2-regularised: deterministic, no LR to tune),
5. reports pixel accuracy and mIoU of the probe on the held-out images' pixels.

A linear probe on frozen features is the standard SSL evaluation (SimCLR, MAE); the dense
(per-pixel) variant follows the segmentation linear probes of DINO / Hummingbird-style
evaluations. Everything is computed on the calling process; under DDP call it on every rank
with the same data or only on the main process.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["extract_pixel_features", "fit_linear_probe", "dense_linear_probe"]


@torch.no_grad()
def extract_pixel_features(
    encoder: nn.Module,
    batches: Iterable[dict],
    stages: Sequence[int] = (-1,),
    ignore_index: int = 255,
    max_pixels_per_image: int = 256,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    """Sample per-pixel features and labels from labelled batches.

    Args:
        encoder: an ``Encoder`` (``forward_features``).
        batches: iterable of ``{"image": (B, C, H, W), "mask": (B, H, W)}``.
        stages: indices into the feature list to concatenate (resized to the first one's grid).
        ignore_index: label excluded from sampling.
        max_pixels_per_image: pixels sampled per image (uniformly, without replacement).
        generator: RNG for the pixel sampling (None: the global one).

    Returns:
        features (N, D) float32 and labels (N,) int64.
    """
    was_training = encoder.training
    encoder.eval()
    device = next(encoder.parameters()).device
    feats_out, labels_out = [], []
    for batch in batches:
        images = batch["image"].to(device)
        masks = batch["mask"].to(device)
        feats = encoder.forward_features(images)  # type: ignore[operator]  # an Encoder; nn.Module.__getattr__ typing
        chosen = [feats[i] for i in stages]
        size = chosen[0].shape[-2:]
        grid = torch.cat(
            [
                f
                if f.shape[-2:] == size
                else F.interpolate(f, size=size, mode="bilinear", align_corners=False)
                for f in chosen
            ],
            dim=1,
        ).float()  # (B, D, h, w)
        # labels on the feature grid of the (padded) input: pad masks like the encoder pads images
        h, w = images.shape[-2:]
        div = getattr(encoder, "size_divisor", 1)
        hp, wp = -(-h // div) * div, -(-w // div) * div
        padded = F.pad(masks, (0, wp - w, 0, hp - h), value=ignore_index)
        lab = F.interpolate(padded[:, None].float(), size=size, mode="nearest")[:, 0].long()  # (B, h, w)
        vec = grid.permute(0, 2, 3, 1).reshape(grid.shape[0], -1, grid.shape[1])  # (B, h*w, D)
        lab = lab.reshape(lab.shape[0], -1)
        for b in range(vec.shape[0]):
            valid = (lab[b] != ignore_index).nonzero().squeeze(1)
            if valid.numel() == 0:
                continue
            pick = valid[
                torch.randperm(valid.numel(), generator=generator)[:max_pixels_per_image].to(valid.device)
            ]
            feats_out.append(vec[b, pick].cpu())
            labels_out.append(lab[b, pick].cpu())
    encoder.train(was_training)
    if not feats_out:
        raise ValueError("the probe found no labelled pixel (all masks are ignore_index?)")
    return torch.cat(feats_out), torch.cat(labels_out)


def fit_linear_probe(
    features: Tensor, labels: Tensor, num_classes: int, weight_decay: float = 1e-2, max_iter: int = 100
) -> nn.Linear:
    """Fit an L2-regularised softmax classifier on standardised ``features`` (N, D) with L-BFGS.

    The returned layer includes the standardisation (folded into weight and bias).
    """
    features = features.float()
    mean = features.mean(0)
    std = features.std(0).clamp_min(1e-6)
    x = (features - mean) / std
    layer = nn.Linear(x.shape[1], num_classes)
    nn.init.zeros_(layer.weight)
    nn.init.zeros_(layer.bias)
    opt = torch.optim.LBFGS(layer.parameters(), lr=1.0, max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure() -> Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(layer(x), labels) + weight_decay * layer.weight.pow(2).sum()
        loss.backward()
        return loss

    # full precision even when called under autocast: L-BFGS line searches fail in bf16
    with torch.enable_grad(), torch.autocast(x.device.type, enabled=False):
        opt.step(closure)
    with torch.no_grad():  # fold the standardisation into the layer
        layer.weight.div_(std)
        layer.bias.sub_(layer.weight @ mean)
    return layer


def _miou(pred: Tensor, target: Tensor, num_classes: int) -> tuple[float, float]:
    cm = torch.bincount(target * num_classes + pred, minlength=num_classes**2).reshape(
        num_classes, num_classes
    )
    inter = cm.diag().float()
    union = cm.sum(0).float() + cm.sum(1).float() - inter
    present = union > 0
    miou = (inter[present] / union[present]).mean().item()
    acc = (inter.sum() / cm.sum().clamp_min(1)).item()
    return miou, acc


def dense_linear_probe(
    encoder: nn.Module,
    train_batches: Iterable[dict],
    val_batches: Iterable[dict],
    num_classes: int,
    stages: Sequence[int] = (-1,),
    ignore_index: int = 255,
    max_pixels_per_image: int = 256,
    seed: int = 0,
    weight_decay: float = 1e-2,
) -> dict[str, float]:
    """Fit a dense linear probe on ``train_batches`` and score it on ``val_batches``.

    Returns:
        ``{"probe_miou", "probe_pixel_acc", "probe_train_pixel_acc"}``.
    """
    g = torch.Generator().manual_seed(seed)
    xtr, ytr = extract_pixel_features(encoder, train_batches, stages, ignore_index, max_pixels_per_image, g)
    xva, yva = extract_pixel_features(encoder, val_batches, stages, ignore_index, max_pixels_per_image, g)
    k = max(num_classes, 2)
    layer = fit_linear_probe(xtr, ytr, k, weight_decay=weight_decay)
    with torch.no_grad(), torch.autocast(xva.device.type, enabled=False):
        miou, acc = _miou(layer(xva.float()).argmax(1), yva, k)
        _, train_acc = _miou(layer(xtr.float()).argmax(1), ytr, k)
    return {"probe_miou": miou, "probe_pixel_acc": acc, "probe_train_pixel_acc": train_acc}
