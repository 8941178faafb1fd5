"""Segmentation transforms on sample dicts, built from ``torchvision.transforms.v2``.

Every transform takes and returns the sample dict ``{"image": tv_tensors.Image, "mask":
tv_tensors.Mask, "id": str}``; spatial ops move image and mask together, masks are resampled
with nearest-neighbour interpolation and padded with ``ignore_index``.

Padding follows one rule in training and inference: it is added to the *normalised* image, with
:data:`~hybridvision.deploy.runtime.IMAGE_PAD_VALUE` (0, the normalisation mean), so an image
smaller than the training crop sees the same border as one smaller than an inference window
(:func:`hybridvision.inference.predict_sliding_window`, the ONNX runtime).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

from ..geometry import IMAGE_PAD_VALUE, rescaled_size

__all__ = [
    "AlignedResize",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "PadToSize",
    "PerImageNormalize",
    "RandomCropUpTo",
    "RandomResize",
    "RandomRot90",
    "RandomScale",
    "Window",
    "build_seg_transforms",
]

logger = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

Normalize = str | tuple[Sequence[float], Sequence[float]]


class Window(v2.Transform):
    """Intensity windowing: map raw values in ``[center - width/2, center + width/2]`` to [0, 1].

    The usual CT display window (e.g. soft tissue: center 40 HU, width 400 HU); values outside are
    clipped. Applies to images only.

    Args:
        center: Window centre in raw units.
        width: Window width in raw units (> 0).
    """

    _transformed_types = (tv_tensors.Image,)

    def __init__(self, center: float, width: float) -> None:
        super().__init__()
        if width <= 0:
            raise ValueError(f"window width must be > 0, got {width}")
        self.center, self.width = float(center), float(width)

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        """Map the image to [0, 1] through the window (clamped)."""
        low = self.center - self.width / 2.0
        out = ((inpt.as_subclass(torch.Tensor).float() - low) / self.width).clamp_(0.0, 1.0)
        return tv_tensors.wrap(out, like=inpt)


class PerImageNormalize(v2.Transform):
    """Normalise each channel of each image by its own mean and standard deviation.

    Args:
        eps: Added to the standard deviation (flat images stay finite).
    """

    _transformed_types = (tv_tensors.Image,)

    def __init__(self, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        """Normalise the image (C, H, W) by its own channel statistics."""
        x = inpt.as_subclass(torch.Tensor).float()  # (C, H, W)
        mean = x.mean(dim=(-2, -1), keepdim=True)
        std = x.std(dim=(-2, -1), keepdim=True, unbiased=False)
        return tv_tensors.wrap((x - mean) / (std + self.eps), like=inpt)


class RandomRot90(v2.Transform):
    """Rotate image and mask together by a random multiple of 90 degrees (exact, no resampling)."""

    _transformed_types = (tv_tensors.Image, tv_tensors.Mask)

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        """Draw the number of quarter turns ``k``."""
        return {"k": int(torch.randint(4, ()).item())}

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        """Rotate by ``k`` quarter turns."""
        return tv_tensors.wrap(
            torch.rot90(inpt.as_subclass(torch.Tensor), params["k"], dims=(-2, -1)), like=inpt
        )


def _resize(inpt: Any, size: list[int]) -> Any:
    """Bilinear (antialiased) for images, centre-aligned nearest (``NEAREST_EXACT``) for masks.

    Plain ``NEAREST`` samples source pixel ``floor(i * in / out)``, shifted by up to half a source
    pixel against the centre-aligned bilinear grid; ``NEAREST_EXACT`` keeps masks on the image grid.
    """
    if isinstance(inpt, tv_tensors.Mask):
        return F.resize(inpt, size, interpolation=v2.InterpolationMode.NEAREST_EXACT)
    return F.resize(inpt, size, interpolation=v2.InterpolationMode.BILINEAR, antialias=True)


class AlignedResize(v2.Transform):
    """Resize image (bilinear) and mask (centre-aligned nearest) to a fixed size.

    Args:
        size: Output (H, W).
    """

    _transformed_types = (tv_tensors.Image, tv_tensors.Mask)

    def __init__(self, size: tuple[int, int]) -> None:
        super().__init__()
        self.size = [int(size[0]), int(size[1])]

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        """Resize to ``size``."""
        return _resize(inpt, self.size)


class RandomResize(v2.Transform):
    """Rescale image and mask to a fixed scale, then by a random ratio, in one resampling.

    MMSegmentation's ``RandomResize(scale, ratio_range, keep_ratio=True)``.

    The target is :func:`~hybridvision.deploy.runtime.rescaled_size` of the sample at
    ``resize = [short_side, max_long_side]`` (``None``: the sample's own size), times a ratio
    drawn uniformly from ``ratio_range``; the aspect ratio is kept.

    Args:
        resize: ``[short_side, max_long_side]`` (0 or absent: no long-side limit), or None.
        ratio_range: ``(low, high)`` of the random ratio.
    """

    _transformed_types = (tv_tensors.Image, tv_tensors.Mask)

    def __init__(self, resize: Sequence[int] | None, ratio_range: tuple[float, float]) -> None:
        super().__init__()
        if not 0 < ratio_range[0] <= ratio_range[1]:
            raise ValueError(f"ratio_range must be (low, high) with 0 < low <= high, got {ratio_range}")
        self.resize = [int(v) for v in resize] if resize else None
        self.ratio_range = (float(ratio_range[0]), float(ratio_range[1]))

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        """Draw the output (H, W): the rescaled size times a random ratio."""
        height, width = F.get_size(flat_inputs[0])
        height, width = rescaled_size(height, width, self.resize)
        low, high = self.ratio_range
        ratio = low + float(torch.rand(())) * (high - low)
        return {"size": [max(1, round(height * ratio)), max(1, round(width * ratio))]}

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        """Resize to the drawn size."""
        return _resize(inpt, params["size"])


class RandomCropUpTo(v2.Transform):
    """Crop image and mask together at a random position to at most ``size``.

    A side shorter than the crop is kept whole: padding is added after normalisation, by
    :class:`PadToSize`, so that padded pixels have the value inference pads with.

    Args:
        size: Crop (H, W).
    """

    _transformed_types = (tv_tensors.Image, tv_tensors.Mask)

    def __init__(self, size: tuple[int, int]) -> None:
        super().__init__()
        self.size = (int(size[0]), int(size[1]))

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        """Draw the crop box."""
        height, width = F.get_size(flat_inputs[0])
        crop_h, crop_w = min(self.size[0], height), min(self.size[1], width)
        top = int(torch.randint(0, height - crop_h + 1, ()))
        left = int(torch.randint(0, width - crop_w + 1, ()))
        return {"top": top, "left": left, "height": crop_h, "width": crop_w}

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        """Crop to the drawn box."""
        return F.crop(inpt, **params)


class PadToSize(v2.Transform):
    """Pad a normalised image and its mask up to ``size``, the picture at a random offset.

    The image is padded with :data:`~hybridvision.deploy.runtime.IMAGE_PAD_VALUE`, the mask with
    ``ignore_index``.
    The value is the one inference pads windows with, so padding means the same in both.

    Args:
        size: Minimum output (H, W); larger inputs are left as they are.
        ignore_index: Mask value of the added pixels.
    """

    _transformed_types = (tv_tensors.Image, tv_tensors.Mask)

    def __init__(self, size: tuple[int, int], ignore_index: int) -> None:
        super().__init__()
        self.size = (int(size[0]), int(size[1]))
        self.ignore_index = int(ignore_index)

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        """Draw the offset of the picture in the padded output."""
        height, width = F.get_size(flat_inputs[0])
        extra_h, extra_w = max(self.size[0] - height, 0), max(self.size[1] - width, 0)
        top = int(torch.randint(0, extra_h + 1, ())) if extra_h else 0
        left = int(torch.randint(0, extra_w + 1, ())) if extra_w else 0
        return {"padding": [left, top, extra_w - left, extra_h - top]}  # left, top, right, bottom

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        """Pad with the value of the input kind (image or mask)."""
        if not any(params["padding"]):
            return inpt
        fill = self.ignore_index if isinstance(inpt, tv_tensors.Mask) else IMAGE_PAD_VALUE
        return F.pad(inpt, params["padding"], fill=fill)


class RandomScale(RandomResize):
    """Resize image and mask by one random factor relative to their own size.

    Args:
        scale: Range ``(low, high)`` of the factor, drawn uniformly.
    """

    def __init__(self, scale: tuple[float, float]) -> None:
        super().__init__(None, scale)


def build_seg_transforms(
    train: bool,
    size: tuple[int, int] | None = None,
    *,
    in_chans: int = 3,
    scale: tuple[float, float] = (0.5, 2.0),
    hflip: bool = True,
    vflip: bool = False,
    rot90: bool = False,
    color_jitter: float = 0.0,
    elastic: float = 0.0,
    normalize: Normalize = "imagenet",
    window: tuple[float, float] | None = None,
    ignore_index: int = 255,
    resize: Sequence[int] | None = None,
) -> v2.Compose:
    """Build the train or eval transform for segmentation samples.

    Train: window -> random 90-degree rotation -> rescale to ``resize`` times a random ratio in
    ``scale`` -> random crop of at most ``size`` -> flips -> colour jitter -> normalisation ->
    padding up to ``size`` -> elastic. Padding and the pixels elastic deformation brings in from
    outside are added to the normalised image with
    :data:`~hybridvision.deploy.runtime.IMAGE_PAD_VALUE` (0, the normalisation mean), as inference
    pads its windows, and to the mask with ``ignore_index``. Eval: window -> resize to ``size``
    (if given) -> normalisation (evaluation at the ``resize`` scale happens in
    :class:`hybridvision.inference.Predictor`, which maps predictions back to the original size
    and pads images smaller than its window by the same rule).

    Args:
        train: Training (random augmentation) or evaluation pipeline.
        size: Output (H, W): crop size when training, resize target when evaluating. None keeps
            the input size (training then skips scale and crop).
        in_chans: Image channels; decides the normalisation statistics and colour jitter.
        scale: Random rescaling range (training), relative to the ``resize`` scale, or to the
            input's own size when ``resize`` is None.
        hflip: Random horizontal flip (training).
        vflip: Random vertical flip (training).
        rot90: Random rotation by k * 90 degrees (training; with non-square inputs the crop
            restores ``size``).
        color_jitter: Strength c of brightness/contrast/saturation (c each) and hue (c / 4)
            jitter; 0 disables. RGB gets all four, 1-channel images brightness and contrast only,
            other channel counts none. Expects values in [0, 1] (after ``window``).
        elastic: Displacement strength ``alpha`` (pixels) of an elastic deformation with
            smoothness sigma = 5 (less for crops under 41 pixels) (training); 0 disables.
        normalize: ``"imagenet"`` (1 or 3 channels), ``"per_image"`` (each image's own channel
            mean/std), ``"none"``, or explicit ``(mean, std)`` sequences of length ``in_chans``.
        window: ``(center, width)`` intensity window on raw values (e.g. CT Hounsfield units),
            applied first; None disables.
        ignore_index: Mask value for pixels created by padding or deformation.
        resize: Training scale ``[short_side, max_long_side]`` (see :class:`RandomResize`); None:
            each image's native size.

    Returns:
        A ``v2.Compose`` taking and returning a sample dict.
    """
    steps: list[v2.Transform] = [Window(*window)] if window is not None else []
    if not train:
        if size is not None:
            steps.append(AlignedResize(size))
        steps.extend(_normalization(normalize, in_chans))
        return v2.Compose(steps or [v2.Identity()])
    steps.extend(_random_geometry(size, scale, resize, hflip, vflip, rot90))
    if color_jitter > 0:
        steps.extend(_color_jitter(color_jitter, in_chans))
    steps.extend(_normalization(normalize, in_chans))
    if size is not None:
        steps.append(PadToSize(size, ignore_index))
    if elastic > 0:
        steps.append(_elastic(elastic, size, ignore_index))
    return v2.Compose(steps or [v2.Identity()])


def _random_geometry(
    size: tuple[int, int] | None,
    scale: tuple[float, float],
    resize: Sequence[int] | None,
    hflip: bool,
    vflip: bool,
    rot90: bool,
) -> list[v2.Transform]:
    """Training's spatial steps: rotation by k * 90 degrees, rescale and crop (if ``size``), flips."""
    steps: list[v2.Transform] = []
    if rot90:
        steps.append(RandomRot90())
    if size is not None:
        steps.append(RandomResize(resize, scale))
        steps.append(RandomCropUpTo(size))
    if hflip:
        steps.append(v2.RandomHorizontalFlip())
    if vflip:
        steps.append(v2.RandomVerticalFlip())
    return steps


def _elastic(alpha: float, size: tuple[int, int] | None, ignore_index: int) -> v2.Transform:
    """Elastic deformation of strength ``alpha``; new pixels get the pad value and ``ignore_index``."""
    # The displacement blur pads by ~4 sigma, which must stay below the image side.
    sigma = 5.0 if size is None else min(5.0, (min(size) - 1) / 8)
    fill = {tv_tensors.Image: IMAGE_PAD_VALUE, tv_tensors.Mask: ignore_index}
    return v2.ElasticTransform(alpha=float(alpha), sigma=sigma, fill=fill)


def _color_jitter(strength: float, in_chans: int) -> list[v2.Transform]:
    if in_chans == 3:
        return [v2.ColorJitter(strength, strength, strength, min(0.5, strength / 4))]
    if in_chans == 1:
        return [v2.ColorJitter(brightness=strength, contrast=strength)]
    logger.info("color_jitter=%s ignored for in_chans=%d", strength, in_chans)
    return []


def _normalization(normalize: Normalize, in_chans: int) -> list[v2.Transform]:
    if isinstance(normalize, str):
        if normalize == "none":
            return []
        if normalize == "per_image":
            return [PerImageNormalize()]
        if normalize == "imagenet":
            if in_chans == 3:
                return [v2.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
            if in_chans == 1:  # channel average, for grayscale inputs to ImageNet-style models
                return [v2.Normalize([sum(IMAGENET_MEAN) / 3], [sum(IMAGENET_STD) / 3])]
            raise ValueError(
                f"normalize='imagenet' needs in_chans 1 or 3, got {in_chans}; "
                "pass explicit (mean, std) (data.mean / data.std in the configs) or 'per_image'"
            )
        raise ValueError(
            f"normalize must be 'imagenet', 'per_image', 'none' or (mean, std); got {normalize!r}"
        )
    mean, std = normalize
    if len(mean) != in_chans or len(std) != in_chans:
        raise ValueError(
            f"normalize (mean, std) have lengths {len(mean)} and {len(std)}, expected in_chans={in_chans}"
        )
    return [v2.Normalize(list(mean), list(std))]
