"""Self-supervised objectives and the model that trains an encoder with them.

``PretrainModel(encoder, objective)`` wraps any :class:`~hybridvision.models.Encoder`; its
``forward(batch)`` returns a :class:`PretrainOutput` (loss, unweighted terms, health statistics,
images to log). Losses are computed here, outside the encoder, which only ever runs
``forward_features``. After training, ``model.encoder`` is what gets saved.

Objectives:

* ``"contrastive"`` — SimCLR (Chen et al., 2020): NT-Xent (lightly ``NTXentLoss``) on projections
  of the global-average-pooled last-stage features of two views ``batch["view0"]``,
  ``batch["view1"]``; both views go through the encoder as one batch of ``2B``.
* ``"mim"`` — SimMIM (Xie et al., 2022) / SparK (Tian et al., 2023): random block masks, the
  encoder sees the masked ``batch["image"]`` (masked positions replaced by a learnable
  ``mask_token`` after its stem), a light decoder reconstructs the pixels, and an L1 (or MSE)
  loss is taken on masked pixels only. With ``segmentation_decoder`` the decoder is the
  segmenter's own (``SegmentationDecoderHead``): the whole encoder-decoder learns to restore the
  masked image and fine-tuning inherits both halves (``objective.mim_decoder=segmenter``). With
  ``visible_only`` (MAE, He et al., 2022; GreenMIM, Huang et al., 2022) the encoder's attention
  stages encode the visible tokens only (``Encoder.forward_visible``) and the multiscale
  decoder's mask embeddings stand in for the masked ones (``objective.visible_only=true``).
* ``"contrastive_mim"`` — the weighted sum of both, on the same step. The MIM branch reads
  ``batch["image"]`` (a random resized crop with no photometric augmentation), not ``view0``:
  colour jitter, grayscale and blur would make the reconstruction target depend on random
  photometric noise, and the MIM term then equals what the ``"mim"`` objective computes on the
  same batch. It costs a third encoder pass (2B views + B masked images).

Distributed training (DDP through Accelerate), and why 2 processes x B equals 1 process x 2B:

* Contrastive: ``NTXentLoss(gather_distributed=True)`` all-gathers the projections, so each rank
  contrasts its ``2B`` rows against all ``2BW`` embeddings and returns the mean over *its* rows,
  ``L_r``. With equal per-rank batches the global loss is ``L = mean_r L_r``. lightly's gather
  layer **sums** the gradients of the gathered copies over ranks in backward, so rank ``r``
  back-propagates ``d(sum_r' L_r') / dz_r``; DDP then **averages** parameter gradients over the
  ``W`` ranks, which gives ``(1/W) d(sum_r' L_r')/dtheta = dL/dtheta`` — exactly the
  single-process gradient; no extra scaling is needed.
* MIM: the loss is ``sum over masked pixels / (number of masked pixels x C)``. With
  ``gather_distributed`` the denominator is all-reduced (no gradient) and each rank returns
  ``W * local_sum / global_count``; DDP's average then yields the gradient of
  ``global_sum / global_count`` for any split. Every image has exactly ``round(ratio * N)``
  masked blocks, so with equal per-rank batches the per-rank mean is already the global one.
* BatchNorm statistics are per process unless the engine converts the model with
  ``nn.SyncBatchNorm.convert_sync_batchnorm`` (``sync_batchnorm``; CUDA only). The equivalence
  above is exact for batch-independent layers (LayerNorm/GroupNorm; the MIM decoder's default).

Learning rate: :func:`scaled_lr` implements SimCLR's linear rule ``lr = base_lr x B / 256`` (and
its square-root variant) with ``B`` the *global* batch (per device x processes x accumulation).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from einops import rearrange
from lightly.loss import NTXentLoss
from torch import Tensor, nn

from hybridvision.models.base import Encoder, Segmenter, encoder_layer_groups, mask_to
from hybridvision.models.registry import list_encoders, preset_class

from .dense import make_dense_views, sample_points
from .heads import (
    MultiScaleDecoder,
    SegmentationDecoderHead,
    build_mim_decoder,
    build_projection_head,
    resolve_mim_decoder,
)
from .masking import BlockMaskGenerator
from .monitors import contrastive_stats, embedding_std

__all__ = [
    "OBJECTIVES",
    "CombinedObjective",
    "ContrastiveObjective",
    "DenseContrastiveObjective",
    "MIMObjective",
    "PretrainModel",
    "PretrainOutput",
    "build_objective",
    "masked_reconstruction_loss",
    "patch_normalize",
    "scaled_lr",
    "visible_only_encoders",
]

OBJECTIVES = ("contrastive", "mim", "contrastive_mim", "dense_contrastive")


@dataclass
class PretrainOutput:
    """What a pretraining forward returns.

    Attributes:
        loss: scalar fp32 loss to back-propagate (weighted sum of the terms).
        terms: unweighted loss terms (``"contrastive"``, ``"mim"``), detached.
        stats: detached health statistics: ``embedding_std``, ``feature_std``,
            ``positive_cosine``, ``negative_cosine``, ``alignment``, ``uniformity`` (contrastive),
            ``mask_ratio`` (MIM).
        images: MIM only: ``masked``, ``reconstruction``, ``original`` (N, C, H, W) and ``mask``
            (N, 1, h, w) for the first N images, detached — feed to ``monitors.make_mim_grid``.
    """

    loss: Tensor
    terms: dict[str, Tensor]
    stats: dict[str, Tensor]
    images: dict[str, Tensor] | None = None


def scaled_lr(
    base_lr: float, global_batch_size: int, rule: str = "linear", reference_batch_size: int = 256
) -> float:
    """Scale a learning rate with the global batch size (Goyal et al., 2017; SimCLR, 2020).

    ``"linear"``: ``base_lr * B / reference`` (SimCLR with LARS: 0.3 x B/256; MAE/SimMIM use the
    same rule). ``"sqrt"``: ``base_lr * sqrt(B / reference)`` (SimCLR's small-batch variant
    ``0.075 * sqrt(B)`` is ``base_lr = 1.2`` here).

    Args:
        base_lr: learning rate at ``reference_batch_size``.
        global_batch_size: per-device batch x processes x gradient-accumulation steps.
        rule: ``"linear"`` or ``"sqrt"``.
        reference_batch_size: batch size ``base_lr`` refers to.
    """
    if global_batch_size < 1 or reference_batch_size < 1:
        raise ValueError("batch sizes must be >= 1")
    ratio = global_batch_size / reference_batch_size
    if rule == "linear":
        return base_lr * ratio
    if rule == "sqrt":
        return base_lr * math.sqrt(ratio)
    raise ValueError(f"rule must be 'linear' or 'sqrt', got {rule!r}")


def _world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def patch_normalize(target: Tensor, patch_size: int, eps: float = 1e-6) -> tuple[Tensor, Tensor, Tensor]:
    """MAE's ``norm_pix_loss`` target: standardise every ``patch_size`` patch over its pixels and bands.

    Args:
        target: (B, C, H, W) image; H and W multiples of ``patch_size``.
        patch_size: patch side ``p``.
        eps: added to the (unbiased, as in MAE) variance.

    Returns:
        ``(normalised, mean, std)``: (B, C, H, W) target and (B, 1, H, W) per-pixel patch mean and
        std, so that ``normalised * std + mean == target``.
    """
    b, _, h, w = target.shape
    if h % patch_size or w % patch_size:
        raise ValueError(f"image size {(h, w)} is not a multiple of the patch size {patch_size}")
    patches = rearrange(target, "b c (h p) (w q) -> b h w (c p q)", p=patch_size, q=patch_size)
    mean = patches.mean(dim=-1, keepdim=True)  # (B, h/p, w/p, 1)
    std = (patches.var(dim=-1, keepdim=True) + eps).sqrt()
    patches = (patches - mean) / std
    normalised = rearrange(
        patches, "b h w (c p q) -> b c (h p) (w q)", p=patch_size, q=patch_size, c=target.shape[1]
    )

    def to_pixels(stat: Tensor) -> Tensor:  # (B, h/p, w/p, 1) -> (B, 1, H, W)
        return stat.permute(0, 3, 1, 2).repeat_interleave(patch_size, 2).repeat_interleave(patch_size, 3)

    return normalised, to_pixels(mean), to_pixels(std)


def masked_reconstruction_loss(
    pred: Tensor, target: Tensor, mask: Tensor, loss: str = "l1", gather_distributed: bool = True
) -> Tensor:
    """Reconstruction loss on masked pixels only.

    ``sum_{masked pixels, bands} err / (num masked pixels * C)``; visible pixels contribute
    nothing. Computed in fp32.

    Args:
        pred: (B, C, H, W) reconstruction.
        target: (B, C, H, W) target.
        mask: (B, 1, H, W) pixel mask, 1 = masked (or any grid that tiles (H, W)).
        loss: ``"l1"`` (SimMIM) or ``"mse"`` (MAE, SparK).
        gather_distributed: normalise by the masked-pixel count of all processes (see the module
            docstring), so DDP's gradient average gives the global-mean gradient for any split.

    Returns:
        0-dim fp32 loss.
    """
    if loss not in ("l1", "mse"):
        raise ValueError(f"loss must be 'l1' or 'mse', got {loss!r}")
    mask = mask_to(mask, pred.shape[-2:])  # (B, 1, H, W) float
    diff = pred.float() - target.float()
    err = diff.abs() if loss == "l1" else diff.square()  # (B, C, H, W)
    total = (err * mask).sum()
    count = mask.sum() * pred.shape[1]
    world = _world_size()
    if gather_distributed and world > 1:
        count = count.detach().clone()
        dist.all_reduce(count)
        return total * world / count.clamp_min(1.0)
    return total / count.clamp_min(1.0)


def _pad_image_and_mask(x: Tensor, mask: Tensor, size_divisor: int) -> tuple[Tensor, Tensor]:
    """Zero-pad the image (bottom/right) to a size the encoder takes without padding, and the
    mask with visible cells, so that the mask keeps tiling the padded image."""
    (h, w), (gh, gw) = x.shape[-2:], mask.shape[-2:]
    if h % gh or w % gw:
        raise ValueError(f"mask grid {(gh, gw)} does not tile the image of size {(h, w)}")
    cell_h, cell_w = h // gh, w // gw
    mult_h, mult_w = math.lcm(size_divisor, cell_h), math.lcm(size_divisor, cell_w)
    hp, wp = math.ceil(h / mult_h) * mult_h, math.ceil(w / mult_w) * mult_w
    if (hp, wp) == (h, w):
        return x, mask
    x = F.pad(x, (0, wp - w, 0, hp - h))
    mask = F.pad(mask, (0, (wp - w) // cell_w, 0, (hp - h) // cell_h))
    return x, mask


class ContrastiveObjective(nn.Module):
    """SimCLR objective (Chen et al., 2020, "A Simple Framework for Contrastive Learning of
    Visual Representations"): NT-Xent on projected, pooled last-stage features of two views.

    Args:
        feature_dim: channels of the encoder's last stage.
        projection_dim: output size of the projection head.
        projection_hidden_dim: hidden size (None = ``feature_dim``).
        projection_layers: linear layers in the head.
        projection_batch_norm: BatchNorm1d in the head.
        temperature: NT-Xent temperature.
        gather_distributed: contrast against the embeddings of every process.
    """

    def __init__(
        self,
        feature_dim: int,
        projection_dim: int = 128,
        projection_hidden_dim: int | None = None,
        projection_layers: int = 2,
        projection_batch_norm: bool = True,
        temperature: float = 0.5,
        gather_distributed: bool = True,
    ):
        super().__init__()
        self.projection = build_projection_head(
            feature_dim, projection_hidden_dim, projection_dim, projection_layers, projection_batch_norm
        )
        self.criterion = NTXentLoss(temperature=temperature, gather_distributed=gather_distributed)

    def forward(self, encoder: Encoder, batch: dict[str, Tensor]) -> PretrainOutput:
        """NT-Xent of the two views.

        Args:
            encoder: the encoder being trained.
            batch: ``view0`` and ``view1``, each (B, C, H, W).
        """
        v0, v1 = _require(batch, "view0", "contrastive"), _require(batch, "view1", "contrastive")
        b = v0.shape[0]
        if v0.shape == v1.shape:
            last = encoder.forward_features(torch.cat([v0, v1], dim=0))[-1]  # (2B, C, h, w)
        else:
            last = torch.cat([encoder.forward_features(v)[-1] for v in (v0, v1)], dim=0)
        pooled = last.mean(dim=(-2, -1))  # (2B, C)
        z = self.projection(pooled).float()  # (2B, D)
        with torch.autocast(device_type=z.device.type, enabled=False):
            loss = self.criterion(z[:b], z[b:])
        stats = contrastive_stats(z[:b], z[b:])
        stats["feature_std"] = embedding_std(pooled)
        return PretrainOutput(loss=loss, terms={"contrastive": loss.detach()}, stats=stats)


class MIMObjective(nn.Module):
    """Masked image modelling: SimMIM (Xie et al., 2022) masking and L1 loss, with SimMIM's
    pixel-shuffle head or a SparK-style (Tian et al., 2023) multi-scale decoder.

    Masks come from ``batch["mask"]`` ((B, 1, h, w), 1 = masked) when present, otherwise a
    :class:`BlockMaskGenerator` draws them with the global torch RNG (seed each process
    differently, e.g. ``accelerate.utils.set_seed(seed, device_specific=True)``).

    Args:
        encoder: the encoder (read for channels, strides, ``mask_token_dim``, ``size_divisor``).
        in_chans: image channels to reconstruct.
        mask_patch_size: side of a masked block in pixels; image sides must be multiples of it.
        mask_ratio: fraction of blocks masked per image.
        decoder: ``"auto"`` (= ``"multiscale"``, see ``heads.resolve_mim_decoder``),
            ``"multiscale"`` or ``"pixel_shuffle"``.
        decoder_dim: width of the multiscale decoder at its deepest scale.
        loss: ``"l1"`` or ``"mse"``.
        norm_pix_loss: reconstruct per-patch standardised pixels (MAE), patches of
            ``mask_patch_size``.
        gather_distributed: normalise the loss by the global masked-pixel count.
        max_log_images: images kept in ``PretrainOutput.images``.
        segmentation_decoder: a segmentation decoder with ``in_chans`` outputs to use instead of
            ``decoder`` (wrapped in :class:`SegmentationDecoderHead`); decoders with image skips
            get the masked image.
        visible_only: encode the visible tokens only (``encoder.forward_visible``; the encoder must
            have ``encodes_visible_only``, the decoder must be the multiscale one, whose mask
            embeddings fill the masked positions). The mask token exists only for encoders whose
            convolutional stem reads it (``visible_only_mask_token``).
    """

    def __init__(
        self,
        encoder: Encoder,
        in_chans: int,
        mask_patch_size: int = 32,
        mask_ratio: float = 0.6,
        decoder: str = "auto",
        decoder_dim: int = 256,
        loss: str = "l1",
        norm_pix_loss: bool = False,
        gather_distributed: bool = True,
        max_log_images: int = 8,
        segmentation_decoder: nn.Module | None = None,
        visible_only: bool = False,
    ):
        super().__init__()
        if visible_only:
            _check_visible_only(encoder, "segmenter" if segmentation_decoder is not None else decoder)
        if loss not in ("l1", "mse"):
            raise ValueError(f"loss must be 'l1' or 'mse', got {loss!r}")
        if mask_patch_size < 1 or not 0.0 < mask_ratio < 1.0:
            raise ValueError(
                f"need mask_patch_size >= 1 and 0 < mask_ratio < 1, got {mask_patch_size}, {mask_ratio}"
            )
        self.mask_patch_size = mask_patch_size
        self.mask_ratio = mask_ratio
        self.size_divisor = int(encoder.size_divisor)
        self.loss = loss
        self.norm_pix_loss = norm_pix_loss
        self.gather_distributed = gather_distributed
        self.max_log_images = max_log_images
        self.visible_only = visible_only
        self.mask_token: nn.Parameter | None = None
        if not visible_only or encoder.visible_only_mask_token:
            self.mask_token = nn.Parameter(torch.zeros(encoder.mask_token_dim))
            nn.init.trunc_normal_(self.mask_token, std=0.02)  # SimMIM's init
        if segmentation_decoder is not None:
            self.decoder = SegmentationDecoderHead(segmentation_decoder, encoder.reductions[0])
        else:
            name = resolve_mim_decoder(decoder)
            kwargs = {"dim": decoder_dim} if name == "multiscale" else {}
            self.decoder = build_mim_decoder(
                name, encoder.out_channels, encoder.reductions, in_chans, **kwargs
            )
        self._generators: dict[tuple[int, int], BlockMaskGenerator] = {}

    def mask_generator(self, size: tuple[int, int]) -> BlockMaskGenerator:
        """The (cached) mask generator for images of ``size`` (H, W)."""
        if size not in self._generators:
            self._generators[size] = BlockMaskGenerator(size, self.mask_patch_size, self.mask_ratio)
        return self._generators[size]

    def forward(self, encoder: Encoder, batch: dict[str, Tensor]) -> PretrainOutput:
        """Mask, encode, decode and score the reconstruction of masked pixels.

        Args:
            encoder: the encoder being trained.
            batch: ``image`` (B, C, H, W) and optionally ``mask`` (B, 1, h, w), 1 = masked, on a
                grid that tiles the image (drawn by a :class:`BlockMaskGenerator` if absent).
        """
        x = _require(batch, "image", "mim")
        b, _, h, w = x.shape
        mask = batch.get("mask")
        if mask is None:
            mask = self.mask_generator((h, w))(b, device=x.device)
        mask = mask.to(device=x.device, dtype=torch.float32)  # (B, 1, gh, gw)
        x_pad, mask_pad = _pad_image_and_mask(x, mask, self.size_divisor)
        if self.visible_only:
            feats = encoder.forward_visible(x_pad, mask_pad, self.mask_token)  # 0 where masked
        else:
            feats = encoder.forward_features(x_pad, mask=mask_pad, mask_token=self.mask_token)
        if isinstance(self.decoder, SegmentationDecoderHead):
            image = (
                x_pad * (1 - mask_to(mask_pad, x_pad.shape[-2:]).to(x_pad.dtype))
                if self.decoder.uses_image
                else None
            )
            pred = self.decoder(feats, mask_pad, image=image)
        else:
            pred = self.decoder(feats, mask_pad)  # (B, C, Hp, Wp)
        if tuple(pred.shape[-2:]) != tuple(x_pad.shape[-2:]):
            raise RuntimeError(
                f"MIM decoder output {tuple(pred.shape[-2:])} != padded input {tuple(x_pad.shape[-2:])}: "
                "the encoder's reductions do not match its feature sizes"
            )
        pred = pred[..., :h, :w].float()  # (B, C, H, W)
        target = x.float()
        pixel_mask = mask_to(mask, (h, w))  # (B, 1, H, W)
        with torch.autocast(device_type=x.device.type, enabled=False):
            if self.norm_pix_loss:
                target, mean, std = patch_normalize(target, self.mask_patch_size)
            loss = masked_reconstruction_loss(pred, target, pixel_mask, self.loss, self.gather_distributed)
        recon = pred.detach() * std + mean if self.norm_pix_loss else pred.detach()
        n = self.max_log_images
        images = {
            "masked": (x[:n] * (1 - pixel_mask[:n])).detach(),
            "reconstruction": recon[:n],
            "original": x[:n].detach(),
            "mask": mask[:n].detach(),
        }
        stats = {"mask_ratio": pixel_mask.mean().detach()}
        return PretrainOutput(loss=loss, terms={"mim": loss.detach()}, stats=stats, images=images)


def visible_only_encoders() -> list[str]:
    """Registered encoders that can encode visible tokens only (``objective.visible_only``)."""
    return [n for n in list_encoders() if getattr(preset_class(n), "encodes_visible_only", False)]


def _check_visible_only(encoder: Encoder, decoder: str) -> None:
    """Raise a one-line error when ``objective.visible_only=true`` cannot work with these parts."""
    if not encoder.encodes_visible_only:
        raise ValueError(
            f"objective.visible_only=true needs an encoder that encodes visible tokens only "
            f"({', '.join(visible_only_encoders())}); {type(encoder).__name__} does not"
        )
    if decoder not in ("auto", "multiscale"):
        raise ValueError(
            f"objective.visible_only=true needs objective.mim_decoder=multiscale (or auto), got {decoder}: "
            "only its mask embeddings fill the positions the encoder leaves empty"
        )


class DenseContrastiveObjective(nn.Module):
    """Point-level NT-Xent between two views of each image (DenseCL / PixPro / VICRegL family).

    Both views of an image contain a shared anchor box; ``points`` positions in it are sampled
    from every encoder stage of each view (bilinear, concatenated: a hypercolumn) and projected;
    the same point in the other view is the positive, every other point of the batch a negative
    (``pretrain.dense`` has the geometry). Reads ``batch["image"]`` (the MIM crop).

    Args:
        encoder: the encoder (read for its stage channels and size divisor).
        points: positions sampled per image.
        projection_dim: output size of the projection.
        hidden_dim: hidden size of the 2-layer projection MLP.
        temperature: NT-Xent temperature.
        anchor_scale: area fraction range of the anchor box that both views contain.
        view_scale: area fraction range of each view box (at least the anchor's).
        brightness: a view adds ``U(-brightness, brightness)`` (normalised units).
        contrast: a view scales by ``U(1 - contrast, 1 + contrast)`` around its mean.
        noise: a view adds Gaussian noise of std ``U(0, noise)``.
        gather_distributed: negatives from every process (lightly's gather layer).
    """

    def __init__(
        self,
        encoder: Encoder,
        points: int = 64,
        projection_dim: int = 128,
        hidden_dim: int = 256,
        temperature: float = 0.2,
        anchor_scale: tuple[float, float] = (0.1, 0.3),
        view_scale: tuple[float, float] = (0.3, 1.0),
        brightness: float = 0.4,
        contrast: float = 0.4,
        noise: float = 0.1,
        gather_distributed: bool = True,
    ):
        super().__init__()
        if points < 2:
            raise ValueError(f"points must be >= 2, got {points}")
        for name, (lo, hi) in (("anchor_scale", anchor_scale), ("view_scale", view_scale)):
            if not 0 < lo <= hi <= 1:
                raise ValueError(f"{name} must satisfy 0 < low <= high <= 1, got {(lo, hi)}")
        self.points = points
        self.size_divisor = int(encoder.size_divisor)
        self.view_options = dict(
            anchor_scale=anchor_scale,
            view_scale=view_scale,
            brightness=brightness,
            contrast=contrast,
            noise=noise,
        )
        dim = sum(encoder.out_channels)
        self.projection = nn.Sequential(
            nn.Linear(dim, hidden_dim),
            nn.LayerNorm(hidden_dim),
            nn.GELU(),
            nn.Linear(hidden_dim, projection_dim),
        )
        self.criterion = NTXentLoss(temperature=temperature, gather_distributed=gather_distributed)

    def forward(self, encoder: Encoder, batch: dict[str, Tensor]) -> PretrainOutput:
        """Point-level NT-Xent of two views made from ``batch["image"]`` (B, C, H, W)."""
        x = _require(batch, "image", "dense_contrastive")
        b, _, h, w = x.shape
        with torch.no_grad():
            views, grids, _ = make_dense_views(x.float(), self.points, **self.view_options)
        feats = encoder.forward_features(views.to(x.dtype))
        d = self.size_divisor
        padded = (math.ceil(h / d) * d, math.ceil(w / d) * d)
        hyper = sample_points(feats, grids, (h, w), padded)  # (2B, N, sum C)
        z = self.projection(hyper.reshape(2, b * self.points, -1)).float()  # (2, B*N, D)
        # NT-Xent in fp32 under autocast too, as in ContrastiveObjective (bf16 logits shift the loss)
        with torch.autocast(device_type=z.device.type, enabled=False):
            loss = self.criterion(z[0], z[1])
        with torch.no_grad():
            zn = F.normalize(z.float(), dim=-1)
            stats = {
                "dense_positive_cosine": (zn[0] * zn[1]).sum(-1).mean(),
                "dense_negative_cosine": (zn[0] @ zn[1].T).mean(),
                "embedding_std": embedding_std(z[0].float()),
            }
        return PretrainOutput(loss=loss, terms={"dense_contrastive": loss.detach()}, stats=stats)


class CombinedObjective(nn.Module):
    """Contrastive + masked image modelling on the same step: ``wc * L_contrastive + wm * L_mim``.

    The MIM branch reads ``batch["image"]`` (see the module docstring for why not ``view0``).

    Args:
        contrastive: the contrastive objective.
        mim: the MIM objective.
        contrastive_weight: weight ``wc``.
        mim_weight: weight ``wm``.
    """

    def __init__(
        self,
        contrastive: ContrastiveObjective,
        mim: MIMObjective,
        contrastive_weight: float = 1.0,
        mim_weight: float = 1.0,
    ):
        super().__init__()
        self.contrastive = contrastive
        self.mim = mim
        self.contrastive_weight = contrastive_weight
        self.mim_weight = mim_weight

    def forward(self, encoder: Encoder, batch: dict[str, Tensor]) -> PretrainOutput:
        """Both objectives on the same batch.

        Args:
            encoder: the encoder being trained.
            batch: ``view0``, ``view1`` and ``image``, each (B, C, H, W).
        """
        c = self.contrastive(encoder, batch)
        m = self.mim(encoder, batch)
        loss = self.contrastive_weight * c.loss + self.mim_weight * m.loss
        return PretrainOutput(
            loss=loss, terms={**c.terms, **m.terms}, stats={**c.stats, **m.stats}, images=m.images
        )


def _require(batch: dict[str, Tensor], key: str, objective: str) -> Tensor:
    if key not in batch:
        raise KeyError(
            f"the {objective} objective needs batch[{key!r}]; the batch has {sorted(batch)}. "
            "Build the dataset transform with pretrain.views.build_pretrain_transform(objective, ...)"
        )
    return batch[key]


def build_objective(
    name: str,
    encoder: Encoder,
    in_chans: int | None = None,
    *,
    temperature: float = 0.5,
    projection_dim: int = 128,
    projection_hidden_dim: int | None = None,
    projection_layers: int = 2,
    projection_batch_norm: bool = True,
    mask_patch_size: int = 32,
    mask_ratio: float = 0.6,
    decoder: str = "auto",
    decoder_dim: int = 256,
    mim_loss: str = "l1",
    norm_pix_loss: bool = False,
    contrastive_weight: float = 1.0,
    mim_weight: float = 1.0,
    gather_distributed: bool = True,
    max_log_images: int = 8,
    segmentation_decoder: nn.Module | None = None,
    dense_points: int = 64,
    visible_only: bool = False,
) -> nn.Module:
    """Build an objective module by name from plain arguments (no config object).

    Args:
        name: ``"contrastive"``, ``"mim"`` or ``"contrastive_mim"``.
        encoder: the encoder to pretrain.
        in_chans: image channels (default: ``encoder.build_kwargs["in_chans"]``); MIM only.
        temperature: NT-Xent temperature.
        projection_dim: projection output size.
        projection_hidden_dim: projection hidden size (None = last-stage channels).
        projection_layers: linear layers of the projection head.
        projection_batch_norm: BatchNorm1d in the projection head.
        mask_patch_size: MIM mask block side in pixels.
        mask_ratio: MIM fraction of masked blocks.
        decoder: MIM decoder, ``"auto"`` | ``"multiscale"`` | ``"pixel_shuffle"``.
        decoder_dim: multiscale decoder width at its deepest scale (halved per finer scale).
        mim_loss: ``"l1"`` or ``"mse"``.
        norm_pix_loss: MAE per-patch normalised targets.
        contrastive_weight: weight of the contrastive term (``contrastive_mim``).
        mim_weight: weight of the MIM term (``contrastive_mim``).
        gather_distributed: global negatives / global loss normalisation under DDP.
        max_log_images: images kept for logging (MIM).
        segmentation_decoder: the segmenter's decoder (``in_chans`` outputs) as the MIM decoder.
        dense_points: points per image of ``dense_contrastive``.
        visible_only: MIM encodes the visible tokens only (see :class:`MIMObjective`).
    """
    if name not in OBJECTIVES:
        raise ValueError(f"unknown objective {name!r}; valid: {', '.join(OBJECTIVES)}")
    if segmentation_decoder is not None and name in ("contrastive", "dense_contrastive"):
        raise ValueError("a segmentation decoder is a MIM decoder: use objective mim or contrastive_mim")
    if visible_only and name in ("contrastive", "dense_contrastive"):
        raise ValueError(
            "objective.visible_only=true is an option of MIM: use objective mim or contrastive_mim"
        )
    if name == "dense_contrastive":
        return DenseContrastiveObjective(
            encoder,
            points=dense_points,
            projection_dim=projection_dim,
            temperature=temperature,
            gather_distributed=gather_distributed,
        )
    contrastive = mim = None
    if name in ("contrastive", "contrastive_mim"):
        contrastive = ContrastiveObjective(
            encoder.out_channels[-1],
            projection_dim=projection_dim,
            projection_hidden_dim=projection_hidden_dim,
            projection_layers=projection_layers,
            projection_batch_norm=projection_batch_norm,
            temperature=temperature,
            gather_distributed=gather_distributed,
        )
    if name in ("mim", "contrastive_mim"):
        if in_chans is None:
            in_chans = getattr(encoder, "build_kwargs", {}).get("in_chans")
        if in_chans is None:
            raise ValueError("in_chans is required for MIM when the encoder was not built by create_encoder")
        mim = MIMObjective(
            encoder,
            in_chans,
            mask_patch_size=mask_patch_size,
            mask_ratio=mask_ratio,
            decoder=decoder,
            decoder_dim=decoder_dim,
            loss=mim_loss,
            norm_pix_loss=norm_pix_loss,
            gather_distributed=gather_distributed,
            max_log_images=max_log_images,
            segmentation_decoder=segmentation_decoder,
            visible_only=visible_only,
        )
    if contrastive is not None and mim is not None:
        return CombinedObjective(contrastive, mim, contrastive_weight, mim_weight)
    return contrastive if contrastive is not None else mim


class PretrainModel(nn.Module):
    """An encoder plus the heads of a self-supervised objective.

    Args:
        encoder: any encoder of the zoo (or an :class:`Encoder` subclass).
        objective: ``"contrastive"``, ``"mim"`` or ``"contrastive_mim"``.
        **options: forwarded to :func:`build_objective` (``in_chans``, ``temperature``,
            ``mask_ratio``, ``decoder``, ...).

    Example:
        >>> model = PretrainModel(create_encoder("mit_nano"), "contrastive_mim", mask_patch_size=16)
        >>> out = model({"view0": v0, "view1": v1, "image": x})
        >>> out.loss.backward()
    """

    def __init__(self, encoder: Encoder, objective: str = "contrastive", **options: Any):
        super().__init__()
        self.encoder = encoder
        self.objective_name = objective
        self.objective = build_objective(objective, encoder, **options)
        self.segmenter_build: dict[str, Any] | None = None

    @classmethod
    def from_segmenter(cls, segmenter: Segmenter, objective: str = "mim", **options: Any) -> PretrainModel:
        """Pretrain a whole segmenter: its encoder as usual, its decoder as the MIM decoder.

        ``segmenter`` must output as many channels as the image has (``num_classes = in_chans``,
        e.g. ``create_segmenter("sequential_unet_tiny", num_classes=3, in_chans=3)``);
        :meth:`segmenter` gives it back, trained, for ``save_pretrained``.
        """
        in_chans = segmenter.build_kwargs.get("in_chans", options.get("in_chans"))
        if in_chans is None or segmenter.num_classes != in_chans:
            raise ValueError(
                f"the segmenter to pretrain must have num_classes = in_chans (it reconstructs the image), "
                f"got num_classes={segmenter.num_classes}, in_chans={in_chans}"
            )
        options = {**options, "in_chans": in_chans}
        model = cls(segmenter.encoder, objective, segmentation_decoder=segmenter.decoder, **options)
        model.segmenter_build = dict(segmenter.build_kwargs)
        return model

    def segmenter(self) -> Segmenter:
        """The pretrained encoder + decoder as a :class:`Segmenter` (shares this model's modules)."""
        mim = self.objective.mim if isinstance(self.objective, CombinedObjective) else self.objective
        if self.segmenter_build is None or not isinstance(mim.decoder, SegmentationDecoderHead):
            raise ValueError(
                "this model pretrains an encoder only; build it with PretrainModel.from_segmenter"
            )
        seg = Segmenter(self.encoder, mim.decoder.decoder, self.segmenter_build["num_classes"])
        seg.build_kwargs = dict(self.segmenter_build)
        return seg

    @property
    def mask_token(self) -> nn.Parameter | None:
        """The MIM mask token (mask_token_dim,), or None without a MIM objective."""
        mim = self.objective.mim if isinstance(self.objective, CombinedObjective) else self.objective
        return mim.mask_token if isinstance(mim, MIMObjective) else None

    def forward(self, batch: dict[str, Tensor]) -> PretrainOutput:
        """Run the objective on a batch.

        Args:
            batch: ``view0``/``view1`` (B, C, H, W) for contrastive objectives, ``image``
                (B, C, H, W) and optionally ``mask`` (B, 1, h, w) for MIM.

        Returns:
            :class:`PretrainOutput`.
        """
        return self.objective(self.encoder, batch)

    @property
    def num_layers(self) -> int:
        """Depth groups for layer-wise LR decay (``optim.layer_decay``): encoder groups, then the heads."""
        if getattr(self, "_layer_order", None) is None:
            in_chans = (
                self.encoder.build_kwargs.get("in_chans", 3) if hasattr(self.encoder, "build_kwargs") else 3
            )
            self._layer_order = [f"encoder.{n}" for n in encoder_layer_groups(self.encoder, in_chans)]
        return len(self._layer_order)

    def layer_id(self, name: str) -> int:
        """Depth group of parameter ``name``: encoder groups 0.., heads and mask token ``num_layers``.

        A continued run (``model.init``) with ``optim.layer_decay < 1`` moves the loaded early layers
        least, as in BEiT / MAE fine-tuning; parameters directly on the encoder share group 0.
        """
        top = self.num_layers
        if not name.startswith("encoder."):
            return top
        for i, prefix in enumerate(self._layer_order):
            if name.startswith(prefix + "."):
                return i
        return 0

    def no_weight_decay(self) -> set[str]:
        """Encoder tokens / position tables, the MIM mask token and the decoder's mask embeddings."""
        names = {f"encoder.{n}" for n in self.encoder.no_weight_decay()}
        for name, module in self.named_modules():
            prefix = f"{name}." if name else ""
            if isinstance(module, (MultiScaleDecoder, SegmentationDecoderHead)):
                names |= {prefix + n for n in module.no_weight_decay()}
            elif isinstance(module, MIMObjective) and module.mask_token is not None:
                names.add(prefix + "mask_token")
        return names
