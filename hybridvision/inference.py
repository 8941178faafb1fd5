"""Whole-image and sliding-window segmentation inference, with optional flip test-time augmentation.

A model is any callable ``model(x (B, C, H, W)) -> logits (B, K, h, w)``; logits at another size are
resized bilinearly to the input size. Predictions are combined (over TTA flips and overlapping
windows) in *score space*: softmax probabilities for K >= 2, logits for K = 1 (binary), because
averaging logits and then applying the sigmoid keeps the 0-logit decision threshold meaningful.
The result is returned as

* ``output="probs"``: probabilities (B, K, H, W); for K = 1 the sigmoid of the averaged logits;
* ``output="logits"``: K = 1: the averaged logits; K >= 2: the log of the averaged probabilities,
  i.e. logits whose softmax is the averaged probabilities. Either feeds
  :class:`hybridvision.metrics.ConfusionMatrix` (argmax / threshold at 0) directly.

The functions do not change the model's train/eval mode and run without gradient; call
``model.eval()`` first.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Literal, cast

import torch
import torch.nn.functional as F
from torch import Tensor

from . import geometry
from .geometry import FLIP_AXES, IMAGE_PAD_VALUE, Scale, rescaled_size, window_positions

__all__ = ["Predictor", "gaussian_window", "predict_sliding_window", "predict_whole"]

Model = Callable[[Tensor], Tensor]
Output = Literal["probs", "logits"]


def _check_flips(tta_flips: Sequence[str]) -> None:
    if isinstance(tta_flips, str):
        raise TypeError(f"tta_flips must be a sequence such as ('h',), got the string {tta_flips!r}")
    unknown = [f for f in tta_flips if f not in FLIP_AXES]
    if unknown:
        raise ValueError(f"unknown TTA flip(s) {unknown}; valid: {list(FLIP_AXES)}")


def _scores(model: Model, images: Tensor, num_classes: int | None, tta_flips: Sequence[str]) -> Tensor:
    """Model scores averaged over the identity and each flip: probabilities (K >= 2) or logits (K = 1).

    Args:
        model: maps (N, C, H, W) images to (N, K, H, W) logits.
        images: (N, C, H, W).
        num_classes: K the model must return, checked when given.
        tta_flips: flips averaged with the identity (keys of ``FLIP_AXES``).

    Returns:
        (N, K, H, W) float32.
    """
    total = None
    views = [()] + [FLIP_AXES[f] for f in tta_flips]
    for dims in views:
        x = images.flip(dims) if dims else images
        logits = model(x)
        if logits.ndim != 4 or logits.shape[0] != images.shape[0]:
            raise ValueError(f"model must return (B, K, H, W) logits, got shape {tuple(logits.shape)}")
        if num_classes is not None and logits.shape[1] != num_classes:
            raise ValueError(f"model returned {logits.shape[1]} channels, expected num_classes={num_classes}")
        if logits.shape[-2:] != images.shape[-2:]:
            logits = F.interpolate(
                logits.float(), size=images.shape[-2:], mode="bilinear", align_corners=False
            )
        scores = logits.float() if logits.shape[1] == 1 else logits.float().softmax(dim=1)
        scores = scores.flip(dims) if dims else scores
        total = scores if total is None else total + scores
    assert total is not None  # views holds the identity
    return total / len(views)


def _finish_logits(logits: Tensor) -> Tensor:
    """Probabilities from :func:`_finish`'s logits (sigmoid for K = 1, softmax for K >= 2)."""
    return logits.sigmoid() if logits.shape[1] == 1 else logits.softmax(dim=1)


def _finish(scores: Tensor, output: Output) -> Tensor:
    if output == "probs":
        return scores.sigmoid() if scores.shape[1] == 1 else scores
    if output == "logits":
        return scores if scores.shape[1] == 1 else scores.clamp_min(torch.finfo(scores.dtype).tiny).log()
    raise ValueError(f"output must be 'probs' or 'logits', got {output!r}")


@torch.no_grad()
def predict_whole(
    model: Model,
    images: Tensor,
    num_classes: int | None = None,
    tta_flips: Sequence[str] = (),
    output: Output = "probs",
) -> Tensor:
    """Predict on whole images in one forward pass (per TTA view).

    Args:
        model: callable mapping (B, C, H, W) to logits (B, K, h, w).
        images: (B, C, H, W).
        num_classes: if given, the model's K is checked against it.
        tta_flips: extra flipped views averaged with the plain one: ``"h"`` (left-right),
            ``"v"`` (up-down), ``"hv"`` (both).
        output: ``"probs"`` or ``"logits"`` (see the module docstring).

    Returns:
        (B, K, H, W) float32 probabilities or logits.
    """
    _check_flips(tta_flips)
    return _finish(_scores(model, images, num_classes, tta_flips), output)


def gaussian_window(
    size: tuple[int, int], sigma_scale: float = 0.125, device: torch.device | None = None
) -> Tensor:
    """:func:`hybridvision.geometry.gaussian_window` as a tensor on ``device``.

    Args:
        size: (h, w) of the window.
        sigma_scale: standard deviation as a fraction of each side.
        device: where the weights go (default: the CPU).

    Returns:
        (h, w) float32 weights.
    """
    return torch.from_numpy(geometry.gaussian_window(size, sigma_scale)).to(device)


@torch.no_grad()
def predict_sliding_window(
    model: Model,
    image: Tensor,
    window: tuple[int, int],
    overlap: float = 0.25,
    blend: Literal["uniform", "gaussian"] = "uniform",
    batch_size: int = 8,
    num_classes: int | None = None,
    tta_flips: Sequence[str] = (),
    output: Output = "probs",
    pad_value: float = IMAGE_PAD_VALUE,
) -> Tensor:
    """Predict by tiling the image with overlapping windows and blending their scores.

    Images smaller than the window are padded (bottom/right, ``pad_value``; by default
    :data:`~hybridvision.geometry.IMAGE_PAD_VALUE`, the value training crops are padded with
    after normalisation) and the prediction is cropped back; larger images, of any (odd) size, are covered by evenly spaced windows whose stride
    is at most ``window * (1 - overlap)``, the last one flush with the border. Windows of all images
    are run through the model ``batch_size`` at a time. Each pixel's score is the weighted mean of
    the windows covering it (``"uniform"`` weights, or a ``"gaussian"`` centred on each window, which
    down-weights window borders where context is missing).

    Args:
        model: callable mapping (N, C, h, w) to logits (N, K, h', w').
        image: (B, C, H, W).
        window: (h, w) window size.
        overlap: fraction of the window shared by neighbours, in [0, 1).
        blend: ``"uniform"`` or ``"gaussian"``.
        batch_size: windows per forward pass.
        num_classes: if given, the model's K is checked against it.
        tta_flips: flipped views per window, see :func:`predict_whole`.
        output: ``"probs"`` or ``"logits"`` (see the module docstring).
        pad_value: value of the padding for images smaller than the window (``image`` is
            normalised: the default 0 is the normalisation mean, as in training crops).

    Returns:
        (B, K, H, W) float32 probabilities or logits.
    """
    _check_flips(tta_flips)
    if image.ndim != 4:
        raise ValueError(f"image must be (B, C, H, W), got shape {tuple(image.shape)}")
    if not 0.0 <= overlap < 1.0:
        raise ValueError(f"overlap must be in [0, 1), got {overlap}")
    if blend not in ("uniform", "gaussian"):
        raise ValueError(f"blend must be 'uniform' or 'gaussian', got {blend!r}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    wh, ww = window
    b, _, h, w = image.shape
    padded = F.pad(image, (0, max(ww - w, 0), 0, max(wh - h, 0)), value=pad_value)
    ph, pw = padded.shape[-2:]
    positions = window_positions(h, w, window, overlap)
    # every (image, y, x) window; windows of one image are contiguous
    tiles = [(i, y, x) for i in range(b) for y, x in positions]

    if blend == "gaussian":
        weight = gaussian_window((wh, ww), device=image.device)
    else:
        weight = torch.ones(wh, ww, device=image.device)
    scores: Tensor | None = None  # (B, K, ph, pw) weighted sums
    norm = torch.zeros(ph, pw, device=image.device)
    for y, x in positions:
        norm[y : y + wh, x : x + ww] += weight

    for start in range(0, len(tiles), batch_size):
        chunk = tiles[start : start + batch_size]
        crops = torch.stack([padded[i, :, y : y + wh, x : x + ww] for i, y, x in chunk])  # (n, C, wh, ww)
        out = _scores(model, crops, num_classes, tta_flips)  # (n, K, wh, ww)
        if scores is None:
            scores = torch.zeros(b, out.shape[1], ph, pw, device=image.device)
        for (i, y, x), tile in zip(chunk, out):
            scores[i, :, y : y + wh, x : x + ww] += tile * weight
    assert scores is not None  # at least one tile
    scores = scores / norm
    return _finish(scores[..., :h, :w], output)


def fixed_input_size(model: Any) -> tuple[int, int] | None:
    """The fixed (H, W) input of ``model``'s encoder (unwrapping DDP / EMA wrappers), or None."""
    for candidate in (model, getattr(model, "module", None)):
        encoder = getattr(candidate, "encoder", None)
        size = getattr(encoder, "input_size", None)
        if size is not None:
            return tuple(int(v) for v in size)  # type: ignore[return-value]
    return None


class Predictor:
    """Inference with the mode chosen by arguments: ``"whole"`` image or ``"slide"`` (sliding window).

    Args:
        model: callable mapping (B, C, H, W) to logits (B, K, h, w).
        mode: ``"whole"`` or ``"slide"``.
        num_classes: K, checked against the model's output if given.
        window: (h, w) window; required for ``"slide"``.
        overlap, blend, batch_size: sliding-window settings (see :func:`predict_sliding_window`).
        tta_flips: flipped views averaged with the plain one (``"h"``, ``"v"``, ``"hv"``).
        output: ``"probs"`` or ``"logits"``.
        resize: ``[short_side, max_long_side]``: each image is rescaled to this scale
            (:func:`~hybridvision.geometry.rescaled_size`; bilinear, antialiased), predicted
            (whole or sliding window at that scale), and its logits are resized back (bilinear) to
            the image's own size before probabilities or labels are taken, as MMSegmentation's
            ``Resize(keep_ratio=True)`` test pipeline. None: predict at the given size.
    """

    def __init__(
        self,
        model: Model,
        mode: Literal["whole", "slide"] = "whole",
        num_classes: int | None = None,
        window: tuple[int, int] | None = None,
        overlap: float = 0.25,
        blend: Literal["uniform", "gaussian"] = "uniform",
        batch_size: int = 8,
        tta_flips: Sequence[str] = (),
        output: Output = "probs",
        resize: Sequence[int] | None = None,
    ) -> None:
        if mode not in ("whole", "slide"):
            raise ValueError(f"mode must be 'whole' or 'slide', got {mode!r}")
        if mode == "slide" and window is None:
            raise ValueError("mode='slide' needs window=(h, w)")
        if output not in ("probs", "logits"):
            raise ValueError(f"output must be 'probs' or 'logits', got {output!r}")
        _check_flips(tta_flips)
        fixed = fixed_input_size(model)
        if fixed is not None and (mode == "whole" or tuple(window or ()) != tuple(fixed)):
            # an encoder built at one input size sees only windows of that size (smaller images are
            # padded to it by the encoder, larger ones are tiled)
            mode, window = "slide", fixed
        self.model = model
        self.mode = mode
        self.num_classes = num_classes
        self.window = cast("tuple[int, int]", tuple(window)) if window is not None else None
        self.overlap = overlap
        self.blend = blend
        self.batch_size = batch_size
        self.tta_flips = tuple(tta_flips)
        self.output = output
        self.resize = Scale.parse(resize)

    def __call__(self, images: Tensor) -> Tensor:
        """Predict (B, K, H, W) probabilities or logits for images (B, C, H, W)."""
        height, width = images.shape[-2:]
        size = rescaled_size(height, width, self.resize)
        if size == (height, width):
            return self._predict(images, self.output)
        x = F.interpolate(images.float(), size=size, mode="bilinear", align_corners=False, antialias=True)
        logits = F.interpolate(
            self._predict(x, "logits"), size=(height, width), mode="bilinear", align_corners=False
        )
        return logits if self.output == "logits" else _finish_logits(logits)

    def _predict(self, images: Tensor, output: Output) -> Tensor:
        if self.mode == "whole":
            return predict_whole(self.model, images, self.num_classes, self.tta_flips, output)
        return predict_sliding_window(
            self.model,
            images,
            self.window,  # type: ignore[arg-type]  # set for mode="slide" (checked in __init__)
            overlap=self.overlap,
            blend=self.blend,
            batch_size=self.batch_size,
            num_classes=self.num_classes,
            tta_flips=self.tta_flips,
            output=output,
        )

    def predict_labels(self, images: Tensor) -> Tensor:
        """Hard labels (B, H, W): argmax for K >= 2, foreground probability > 0.5 for K = 1."""
        scores = self(images)
        if scores.shape[1] == 1:
            return (scores[:, 0] > (0.5 if self.output == "probs" else 0.0)).long()
        return scores.argmax(dim=1)
