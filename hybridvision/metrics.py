"""Confusion-matrix segmentation metrics (IoU, Dice/F1, accuracies) with ``ignore_index``, DDP-safe.

The matrix ``M[t, p]`` counts valid pixels of target class ``t`` predicted as ``p``. Per class:
``IoU = TP / (TP + FP + FN)``, ``Dice = F1 = 2 TP / (2 TP + FP + FN)``, ``accuracy = TP / (TP + FN)``.

Averaging convention: mIoU and mean Dice average over the classes *present in the target or the
prediction* (``TP + FP + FN > 0``); a class absent from both is undefined (NaN per class) and left
out. This is torchmetrics' ``average="macro"`` for ``MulticlassJaccardIndex`` / ``MulticlassF1Score``
and mmsegmentation's ``nanmean``. torchmetrics' ``average=None`` reports 0 for such classes instead:
``compute(zero_division=0.0)`` reproduces it. Mean class accuracy averages over classes present in
the target (mmsegmentation's mAcc). If ``0 <= ignore_index < num_classes`` that class is left out of
every mean, as in torchmetrics.

Distributed evaluation: a global matrix is the sum of the per-process ones only if every sample is
counted exactly once. Accelerate's prepared loaders (and ``DistributedSampler``) repeat samples to
even out the last batch, so either

* call :meth:`ConfusionMatrix.gather_update` every batch: it gathers the small per-sample matrices
  with ``accelerator.gather_for_metrics`` (which drops the repeated samples) and every process ends
  with the global matrix; do not call :meth:`reduce_` afterwards; or
* shard without padding (``Accelerator(even_batches=False)`` or :func:`unpadded_shard`), call
  :meth:`update` locally and :meth:`reduce_` once at the end.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = ["ConfusionMatrix", "per_sample_confusion", "predictions_from_logits", "unpadded_shard"]


def predictions_from_logits(logits: Tensor) -> Tensor:
    """Hard labels from scores.

    Args:
        logits: (B, K, H, W) logits or probabilities (K >= 2: argmax), or (B, 1, H, W) logits of the
            foreground (thresholded at 0, i.e. probability 0.5).

    Returns:
        (B, H, W) int64 labels.
    """
    if logits.ndim != 4:
        raise ValueError(f"logits must be (B, K, H, W), got shape {tuple(logits.shape)}")
    if logits.shape[1] == 1:
        return (logits[:, 0] > 0).long()
    return logits.argmax(dim=1)


def per_sample_confusion(preds: Tensor, target: Tensor, num_classes: int, ignore_index: int = 255) -> Tensor:
    """One confusion matrix per sample, with a single ``torch.bincount``.

    Args:
        preds: (B, H, W) int labels, or (B, K, H, W) logits (see :func:`predictions_from_logits`).
        target: (B, H, W) or (B, 1, H, W) int labels; ``ignore_index`` pixels are skipped.
        num_classes: K (1 means binary: 2x2 matrices).
        ignore_index: unlabeled target value.

    Returns:
        (B, C, C) int64 matrices, ``[b, t, p]``, with ``C = max(num_classes, 2)``.
    """
    size = max(num_classes, 2)
    if preds.ndim == 4 and not preds.is_floating_point():
        if preds.shape[1] != 1:
            raise TypeError("integer preds must be labels (B, H, W); logits must be floating point")
        preds = preds[:, 0]
    elif preds.ndim == 4:
        preds = predictions_from_logits(preds)
    elif preds.is_floating_point():
        raise TypeError("preds must be (B, H, W) integer labels or (B, K, H, W) logits")
    if target.ndim == 4 and target.shape[1] == 1:
        target = target[:, 0]
    if preds.shape != target.shape:
        raise ValueError(f"preds {tuple(preds.shape)} and target {tuple(target.shape)} differ in shape")
    preds, target = preds.long(), target.long()
    valid = target != ignore_index
    bad_target = valid & ((target < 0) | (target >= size))
    bad_preds = valid & ((preds < 0) | (preds >= size))
    if bool((bad_target | bad_preds).any()):
        raise ValueError(
            f"labels outside [0, {size}) (ignore_index={ignore_index}): "
            f"target values {target[bad_target].unique().tolist()}, predictions {preds[bad_preds].unique().tolist()}"
        )
    batch = preds.shape[0]
    sample = torch.arange(batch, device=preds.device).view(-1, *([1] * (preds.ndim - 1)))
    index = (sample * size + target) * size + preds  # (B, H, W) flat index into (B, C, C)
    dump = batch * size * size  # ignored pixels go to one extra bin, dropped below
    counts = torch.bincount(torch.where(valid, index, dump).flatten(), minlength=dump + 1)
    return counts[:dump].view(batch, size, size)


def unpadded_shard(num_samples: int, rank: int, world_size: int) -> list[int]:
    """Indices of the samples process ``rank`` evaluates so that each sample is seen exactly once.

    Strided like ``DistributedSampler(shuffle=False)`` but without its padding repeats; the shards may
    differ in length by one. Use with :meth:`ConfusionMatrix.update` + :meth:`ConfusionMatrix.reduce_`.
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} outside [0, {world_size})")
    return list(range(rank, num_samples, world_size))


class ConfusionMatrix:
    """Accumulates a (C, C) int64 confusion matrix of segmentation predictions.

    See the module docstring for the definitions, the averaging convention and distributed use.

    Args:
        num_classes: K; 1 means binary (logits thresholded at 0, a 2x2 matrix, classes 0 and 1).
        ignore_index: target value skipped entirely.
        class_names: optional names for :meth:`to_json` (C of them).
        device: where the matrix lives; default: the device of the first update.
    """

    def __init__(
        self,
        num_classes: int,
        ignore_index: int = 255,
        class_names: Sequence[str] | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.num_classes = num_classes
        self.size = max(num_classes, 2)
        self.ignore_index = ignore_index
        if class_names is not None and len(class_names) != self.size:
            raise ValueError(f"expected {self.size} class names, got {len(class_names)}")
        self.class_names = list(class_names) if class_names is not None else None
        self._device = device
        self.reset()

    def reset(self) -> None:
        """Zero the matrix and forget how it was accumulated."""
        self.matrix = torch.zeros(self.size, self.size, dtype=torch.int64, device=self._device)
        self._mode: str | None = None  # "local", "gathered" or "reduced"
        self._updates = 0

    def _set_mode(self, mode: str) -> None:
        if self._mode == "reduced":
            raise RuntimeError("the matrix was already reduced across processes; call reset() first")
        if self._mode not in (None, mode):
            raise RuntimeError(
                f"cannot mix update() (local counts, reduce_ later) with gather_update() (global counts); "
                f"this matrix was filled with {'update' if self._mode == 'local' else 'gather_update'}()"
            )
        self._mode = mode

    def _add(self, counts: Tensor) -> None:
        if self._device is None and self._updates == 0:
            self.matrix = self.matrix.to(counts.device)  # follow the data unless a device was given
        self.matrix += counts.to(self.matrix.device)
        self._updates += 1

    @torch.no_grad()
    def update(self, preds: Tensor, target: Tensor) -> None:
        """Add a batch computed on this process.

        Args:
            preds: (B, H, W) int labels or (B, K, H, W) logits/probabilities.
            target: (B, H, W) int labels, ``ignore_index`` for unlabeled pixels.
        """
        self._set_mode("local")
        self._add(per_sample_confusion(preds, target, self.num_classes, self.ignore_index).sum(0))

    @torch.no_grad()
    def gather_update(self, preds: Tensor, target: Tensor, accelerator: Any) -> None:
        """Add a batch from every process, dropping the samples Accelerate repeated to pad batches.

        Gathers the (B, C, C) per-sample matrices (not the masks) with
        ``accelerator.gather_for_metrics``; the matrix is then global on every process.

        Args:
            preds: (B, H, W) int labels or (B, K, H, W) logits of this process' batch.
            target: (B, H, W) int labels.
            accelerator: an ``accelerate.Accelerator`` whose prepared dataloader produced the batch.
        """
        self._set_mode("gathered")
        per_sample = per_sample_confusion(preds, target, self.num_classes, self.ignore_index)
        self._add(accelerator.gather_for_metrics(per_sample).sum(0))

    @torch.no_grad()
    def reduce_(self, accelerator: Any | None = None) -> ConfusionMatrix:
        """Sum the matrix over processes, in place (all processes end with the global matrix).

        Exact when each sample was given to :meth:`update` on exactly one process. Uses
        ``accelerator.reduce(..., "sum")`` if an accelerator is given, else ``torch.distributed``
        ``all_reduce`` when a process group is initialised; otherwise does nothing.

        Returns:
            ``self``.
        """
        if self._mode == "gathered":
            raise RuntimeError(
                "gather_update() already produced the global matrix; reduce_() would double count"
            )
        if self._mode == "reduced":
            raise RuntimeError("reduce_() was already called; call reset() before accumulating again")
        if accelerator is not None:
            if accelerator.num_processes > 1:
                self.matrix = accelerator.reduce(self.matrix, reduction="sum")
        elif dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(self.matrix, op=dist.ReduceOp.SUM)
        self._mode = "reduced"
        return self

    def compute(self, zero_division: float | None = None) -> dict[str, Any]:
        """Metrics of the accumulated matrix.

        Args:
            zero_division: value reported for undefined per-class entries (class absent from target
                and prediction); None reports NaN. Means never include undefined classes.

        Returns:
            ``miou``, ``mean_dice``, ``pixel_accuracy``, ``mean_class_accuracy`` (floats) and the
            per-class lists ``iou``, ``dice``, ``class_accuracy``, plus ``num_pixels`` (int).
        """
        m = self.matrix.double().cpu()
        tp = m.diag()
        target_count = m.sum(1)  # TP + FN
        pred_count = m.sum(0)  # TP + FP
        union = target_count + pred_count - tp  # TP + FP + FN
        counted = torch.ones(self.size, dtype=torch.bool)
        if 0 <= self.ignore_index < self.size:
            counted[self.ignore_index] = False
        nan = torch.tensor(math.nan, dtype=torch.float64)
        iou = torch.where(union > 0, tp / union, nan)
        dice = torch.where(union > 0, 2 * tp / (target_count + pred_count), nan)
        accuracy = torch.where(target_count > 0, tp / target_count, nan)
        iou[~counted], dice[~counted], accuracy[~counted] = nan, nan, nan
        total = m.sum()

        def mean(values: Tensor) -> float:
            defined = values[~values.isnan()]
            return defined.mean().item() if defined.numel() else math.nan

        def per_class(values: Tensor) -> list[float]:
            return (values if zero_division is None else values.nan_to_num(zero_division)).tolist()

        return {
            "miou": mean(iou),
            "mean_dice": mean(dice),
            "pixel_accuracy": (tp.sum() / total).item() if total > 0 else math.nan,
            "mean_class_accuracy": mean(accuracy),
            "iou": per_class(iou),
            "dice": per_class(dice),
            "class_accuracy": per_class(accuracy),
            "num_pixels": int(total.item()),
        }

    def to_json(self, class_names: Sequence[str] | None = None, indent: int | None = 2) -> str:
        """Metrics as JSON text, per-class values keyed by class name; NaN (undefined) becomes null.

        Args:
            class_names: names of the C classes; default: the constructor's, else ``"class_<i>"``.
            indent: ``json.dumps`` indentation.
        """
        names = list(class_names) if class_names is not None else self.class_names
        names = names or [f"class_{i}" for i in range(self.size)]
        if len(names) != self.size:
            raise ValueError(f"expected {self.size} class names, got {len(names)}")
        metrics = self.compute()

        def clean(value: float) -> float | None:
            return None if math.isnan(value) else value

        summary: dict[str, Any] = {
            key: clean(metrics[key]) for key in ("miou", "mean_dice", "pixel_accuracy", "mean_class_accuracy")
        }
        summary["num_pixels"] = metrics["num_pixels"]
        summary["per_class"] = {
            name: {key: clean(metrics[key][i]) for key in ("iou", "dice", "class_accuracy")}
            for i, name in enumerate(names)
        }
        summary["confusion_matrix"] = self.matrix.cpu().tolist()
        return json.dumps(summary, indent=indent)
