"""Structured pruning of the student before distillation (``student.prune=<ratio>``).

The student starts as a copy of the fine-tuned teacher; whole convolution channels are removed by
Torch-Pruning (Fang et al., "DepGraph: Towards Any Structural Pruning", CVPR 2023), which finds the
layers coupled to each channel (the BatchNorm after a convolution, the next layer's inputs, residual
additions, concatenated skips) and removes the channel from all of them. The distillation loop then
recovers the pruned model from the unpruned teacher.

Inside Transformer blocks, global attention layers (``hybridvision.models.layers.Attention``) lose
the same fraction of their heads (whole heads, ranked by the same importance over their q, k and v
rows and the output projection's columns: Torch-Pruning's ``prune_num_heads``; the head width
stays) and MLPs (``layers.common.Mlp``) the same fraction of their hidden width. What is kept
whole: the input channels, the classifier's output channels (the model's interface), the token
width of Transformer blocks and every other ``nn.Linear`` (window and spatial-reduction attention,
MixFFN) together with the channels coupled to one; the convolutions around them are pruned.

The pruned shapes are recorded on the model (``hybridvision.models.prune``), so ``save_pretrained``
/ ``from_pretrained`` and the engine's checkpoints rebuild the pruned architecture.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from hybridvision.config import ConfigError
from hybridvision.models.layers.attention import Attention
from hybridvision.models.layers.common import Mlp
from hybridvision.models.profile import count_gmacs, count_params
from hybridvision.models.prune import module_shapes, record_pruning

__all__ = ["PruneReport", "classifier_layer", "prune_model", "prune_student", "conv_channels"]


@dataclass(frozen=True)
class PruneReport:
    """Cost of the model before and after pruning, and the channels removed."""

    ratio: float  # the requested fraction of channels removed per prunable layer group
    importance: str  # magnitude | taylor
    params: tuple[int, int]  # parameters before, after
    gmacs: tuple[float, float]  # GMACs of one (1, C, H, W) forward at the crop, before, after
    channels: tuple[int, int]  # output channels of every convolution but the classifier, before, after
    pruned_channels: tuple[int, int]  # output channels of the convolutions that were pruned, before, after
    heads: tuple[int, int] = (0, 0)  # heads of the global attention layers, before, after

    def summary(self) -> str:
        """One log line: channels, parameters and GMACs before -> after."""
        (p0, p1), (g0, g1), (c0, c1), (q0, q1) = self.params, self.gmacs, self.channels, self.pruned_channels
        kept = f"; {c0 - q0} channels tied to Linear layers kept whole" if c0 > q0 else ""
        if self.heads[0]:
            kept += f"; attention heads {self.heads[0]} -> {self.heads[1]}"
        return (
            f"pruned {100 * (1 - q1 / max(q0, 1)):.1f}% of the prunable convolution channels ({q0} -> {q1}"
            f"{kept}), {100 * (1 - c1 / max(c0, 1)):.1f}% of all ({c0} -> {c1}); student.prune={self.ratio}, "
            f"{self.importance} importance: params {p0 / 1e6:.3f} M -> {p1 / 1e6:.3f} M, "
            f"GMACs {g0:.4f} -> {g1:.4f}"
        )


def torch_pruning():
    """The ``torch_pruning`` module, or a one-line error naming the extra that installs it."""
    try:
        import torch_pruning as tp
    except ImportError:
        raise ConfigError(
            "student.prune needs Torch-Pruning: pip install -e '.[prune]' (or pip install torch-pruning)"
        ) from None
    return tp


def classifier_layer(model: nn.Module, example: torch.Tensor) -> nn.Module:
    """The last convolution or linear layer the forward runs: the one that writes the class logits."""
    order: list[nn.Module] = []
    hooks = [
        m.register_forward_hook(lambda module, args, out: order.append(module))
        for m in model.modules()
        if isinstance(m, (nn.modules.conv._ConvNd, nn.Linear))
    ]
    try:
        with torch.no_grad():
            model(example)
    finally:
        for hook in hooks:
            hook.remove()
    if not order:
        raise ValueError(f"{type(model).__name__} has no convolution or linear layer to prune")
    return order[-1]


def conv_channels(model: nn.Module, ignored: Iterable[nn.Module] = ()) -> int:
    """Output channels summed over the convolutions of ``model`` not in ``ignored``."""
    skip = {id(m) for m in ignored}
    return sum(
        m.out_channels
        for m in model.modules()
        if isinstance(m, nn.modules.conv._ConvNd) and id(m) not in skip
    )


def prune_model(
    model: nn.Module,
    ratio: float,
    example: torch.Tensor,
    importance: Literal["magnitude", "taylor"] = "magnitude",
    gradient_batches: Iterable[tuple[torch.Tensor, torch.Tensor]] = (),
    loss_fn: Any = None,
) -> PruneReport:
    """Remove ``ratio`` of the channels of every prunable layer group of ``model``, in place.

    Channels of the input, of the classifier's output and of every ``nn.Linear`` are kept (see the
    module docstring). The encoder's ``out_channels`` is updated to its new feature widths, and what
    changed is recorded on the model for ``save_pretrained``.

    Args:
        model: a :class:`~hybridvision.models.Segmenter` (any module with a ``(B, C, H, W)`` forward).
        ratio: fraction of channels removed per layer group, in [0, 1).
        example: (1, C, H, W) input the dependency graph is traced with (the training crop).
        importance: ``magnitude``: group L2 norm of each channel's weights over every coupled layer
            (Torch-Pruning's ``MagnitudeImportance(p=2)``); ``taylor``: |weight · gradient|
            (``TaylorImportance``, Molchanov et al., 2019), gradients from ``gradient_batches``.
        gradient_batches: (images (B, C, H, W), masks (B, H, W)) batches for ``taylor``.
        loss_fn: ``loss_fn(logits, masks) -> scalar`` for ``taylor`` (the task loss).

    Returns:
        A :class:`PruneReport`; ``model`` is pruned in place (and left in the mode it was in).
    """
    if not 0.0 <= ratio < 1.0:
        raise ValueError(f"ratio must be in [0, 1), got {ratio}")
    tp = torch_pruning()
    was_training = model.training
    model.eval()  # tracing and Taylor gradients must not move BatchNorm statistics
    size, in_chans = tuple(example.shape[-2:]), example.shape[1]
    classifier = classifier_layer(model, example)
    attention = [m for m in model.modules() if isinstance(m, Attention)]
    # pruned: whole heads of global attention, the hidden width of MLPs; every other Linear kept whole
    inside = {id(m.qkv) for m in attention} | {id(m.fc1) for m in model.modules() if isinstance(m, Mlp)}
    ignored = [classifier] + [m for m in model.modules() if isinstance(m, nn.Linear) and id(m) not in inside]
    heads0 = sum(m.num_heads for m in attention)
    before = module_shapes(model)
    params0, gmacs0 = count_params(model), count_gmacs(model, in_chans, size)
    channels0 = conv_channels(model, [classifier])
    widths0 = {id(m): m.out_channels for m in model.modules() if isinstance(m, nn.modules.conv._ConvNd)}
    with torch.no_grad():
        out_shape = model(example).shape
    if importance == "magnitude":
        scorer = tp.importance.MagnitudeImportance(p=2)
    elif importance == "taylor":
        scorer = tp.importance.TaylorImportance()
    else:
        raise ValueError(f"importance must be 'magnitude' or 'taylor', got {importance!r}")
    name = (getattr(model, "build_kwargs", None) or {}).get("name", type(model).__name__)
    with warnings.catch_warnings():  # parameters outside layers (position tables) belong to ignored groups
        warnings.filterwarnings("ignore", message="Unwrapped parameters detected")
        try:
            pruner = tp.pruner.MetaPruner(
                model,
                example,
                importance=scorer,
                pruning_ratio=ratio,
                ignored_layers=ignored,
                num_heads={m.qkv: m.num_heads for m in attention},
                prune_num_heads=True,
                prune_head_dims=False,
                head_pruning_ratio=ratio,
                # at least one head stays in every layer
                head_pruning_ratio_dict={
                    m.qkv: min(ratio, (m.num_heads - 1) / m.num_heads) for m in attention
                },
            )
        except Exception as exc:
            raise ValueError(f"Torch-Pruning cannot trace {name} ({type(exc).__name__}: {exc})") from exc
    if importance == "taylor":
        if loss_fn is None:
            raise ValueError("taylor importance needs loss_fn and gradient_batches")
        model.zero_grad(set_to_none=True)
        seen = 0
        for images, masks in gradient_batches:
            logits = model(images)
            if logits.shape[-2:] != masks.shape[-2:]:
                logits = F.interpolate(logits, size=masks.shape[-2:], mode="bilinear", align_corners=False)
            loss_fn(logits, masks).backward()  # gradients add up over the batches
            seen += 1
        if not seen:
            raise ValueError("taylor importance needs at least one batch of training data")
    try:
        pruner.step()
    except Exception as exc:
        raise ValueError(f"Torch-Pruning cannot prune {name} ({type(exc).__name__}: {exc})") from exc
    model.zero_grad(set_to_none=True)
    for m in attention:
        m.num_heads = pruner.num_heads[m.qkv]  # the head width is unchanged: qkv lost whole heads
    channels1 = conv_channels(model, [classifier])
    pruned = [m for m in model.modules() if id(m) in widths0 and m.out_channels != widths0[id(m)]]
    if ratio > 0 and count_params(model) == params0:
        raise ValueError(
            f"student.prune: nothing of {name} can be removed: its convolution channels feed Linear layers "
            "kept whole (window / spatial-reduction attention, the token width) and it has no global "
            "attention heads or MLPs to prune"
        )
    with torch.no_grad():
        if model(example).shape != out_shape:  # pragma: no cover - the ignored layers guarantee it
            raise RuntimeError(f"pruning changed the output shape {tuple(out_shape)}")
        encoder = getattr(model, "encoder", None)
        if encoder is not None and hasattr(encoder, "forward_features"):
            encoder.out_channels = tuple(f.shape[1] for f in encoder.forward_features(example))
    record_pruning(model, before)
    report = PruneReport(
        ratio=ratio,
        importance=importance,
        params=(params0, count_params(model)),
        gmacs=(gmacs0, count_gmacs(model, in_chans, size)),
        channels=(channels0, channels1),
        pruned_channels=(sum(widths0[id(m)] for m in pruned), sum(m.out_channels for m in pruned)),
        heads=(heads0, sum(m.num_heads for m in attention)),
    )
    model.train(was_training)
    return report


def prune_student(student: nn.Module, cfg: Any) -> PruneReport:
    """``student.prune`` of a distillation config applied to ``student`` (a copy of the teacher).

    Taylor importance takes its gradients from ``student.prune_batches`` batches of the labelled
    training set (with the stage's augmentation, seeded by ``train.seed``) and the task loss.
    """
    from hybridvision.losses import build_segmentation_loss
    from hybridvision.segmentation.data import build_data

    d, s = cfg.data, cfg.student
    example = torch.zeros(1, d.in_chans, *d.image_size)
    batches: list[tuple[torch.Tensor, torch.Tensor]] = []
    loss_fn = None
    if s.prune_importance == "taylor":
        train_set = build_data(cfg).train_set
        loader = torch.utils.data.DataLoader(
            train_set,
            batch_size=cfg.train.batch_size,
            shuffle=True,
            generator=torch.Generator().manual_seed(cfg.train.seed),
        )
        for batch, _ in zip(loader, range(s.prune_batches)):
            batches.append((batch["image"], batch["mask"]))
        task = build_segmentation_loss(
            d.num_classes,
            d.ignore_index,
            cfg.loss.weights,
            cfg.loss.class_weights or None,
            cfg.loss.label_smoothing,
        )

        def loss_fn(logits: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
            return task(logits, masks).total

    return prune_model(student, s.prune, example, s.prune_importance, batches, loss_fn)
