"""Reading images and masks from files, and the sample-dict conventions shared by every dataset.

A *sample* is a dict ``{"image": (C, H, W) float32, "mask": (H, W) int64, "id": str}`` (no
``"mask"`` for unlabelled data). Transforms receive the image and mask wrapped as
``tv_tensors.Image`` / ``tv_tensors.Mask`` so spatial augmentations move both together; after the
transform every tensor is a plain ``torch.Tensor`` again so ``default_collate`` works.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils._pytree import tree_map
from torchvision import tv_tensors

from ..deploy import reader
from ..deploy.reader import IMAGE_EXTENSIONS, ImageSource

__all__ = [
    "IMAGE_EXTENSIONS",
    "Sample",
    "apply_transform",
    "check_mask_values",
    "image_to_tensor",
    "mask_to_tensor",
    "read_image",
    "read_mask",
    "remap_mask",
    "READ_ERRORS",
]

Sample = dict[str, Any]

#: Exceptions that mean "this file cannot be decoded" (corrupt, truncated, 0-byte, unreadable,
#: absurdly large). ``PIL.UnidentifiedImageError`` is an ``OSError``; some plugins raise SyntaxError.
READ_ERRORS: tuple[type[BaseException], ...] = (OSError, SyntaxError, Image.DecompressionBombError)


def read_image(path: ImageSource, in_chans: int = 3, name: str | None = None) -> torch.Tensor:
    """Read an image file into a float tensor with ``in_chans`` channels, upright as displayed.

    The project has one image reader, :func:`hybridvision.deploy.reader.read_image` (no torch, so
    the ONNX predictor uses it too); this wraps its array in a tensor. Its rules:

    * the EXIF (or TIFF) orientation tag is applied: a phone photo stored sideways is read upright,
      and :func:`read_mask` turns masks the same way;
    * unsigned integer data are scaled to [0, 1] by their type's range (8-bit / 255, 16-bit
      ``I;16`` and 16-bit-per-channel RGB(A) PNGs / 65535); signed-integer and floating-point data
      (float TIFF, 32-bit ``I`` TIFF, e.g. CT slices in Hounsfield units) are returned as stored,
      in float32: map them to [0, 1] with the ``window`` option of
      :func:`~hybridvision.data.transforms.build_seg_transforms`;
    * channel conversion to ``in_chans``: equal counts are kept; an alpha channel is dropped when
      that makes the counts match (RGBA -> 3, gray+alpha -> 1); gray is repeated to 3 channels;
      RGB becomes 1 channel by ITU-R 601-2 luminance. Any other mismatch is a ``ValueError``.

    TIFF files are read with ``tifffile`` when it is installed (any number of bands, e.g.
    RGB + NIR), otherwise with PIL.

    Args:
        path: Image file (png, jpg, jpeg, tif, tiff, bmp, webp), or the bytes of one.
        in_chans: Number of channels wanted.
        name: What to call the image in error messages (default: the path).

    Returns:
        Image of shape (C, H, W), float32, C = ``in_chans``, H and W as displayed.

    Raises:
        ValueError: If the channel count cannot be converted to ``in_chans``.
        OSError: If the file is missing, corrupt or truncated (``PIL.UnidentifiedImageError``
            is an ``OSError``).
    """
    return torch.from_numpy(reader.read_image(path, in_chans, name))


def image_to_tensor(image: Image.Image | np.ndarray, in_chans: int, name: str) -> torch.Tensor:
    """Convert a decoded PIL image or array (H, W) / (H, W, C) with the rules of :func:`read_image`.

    Args:
        image: PIL image (its EXIF orientation is applied), or a numpy array (H, W) or (H, W, C)
            taken as displayed (uint8/uint16 are scaled to [0, 1]).
        in_chans: Number of channels wanted.
        name: What to call the image in error messages (file name, dataset row).

    Returns:
        Image of shape (C, H, W), float32.
    """
    return torch.from_numpy(reader.image_array(image, in_chans, name))


def read_mask(path: ImageSource, name: str | None = None) -> torch.Tensor:
    """Read a class-index mask (one channel, value = class id), upright as displayed.

    The EXIF / TIFF orientation tag is applied, as :func:`read_image` does for images.

    Args:
        path: Mask file, or its bytes; PIL modes ``1``, ``L``, ``P`` (palette indices are the class
            ids), ``I``, ``I;16``.
        name: What to call the mask in error messages (default: the path).

    Returns:
        Mask of shape (H, W), int64.

    Raises:
        ValueError: For multi-channel (e.g. colour-coded RGB) masks, naming the file.
    """
    return torch.from_numpy(reader.read_mask(path, name))


def mask_to_tensor(mask: Image.Image | np.ndarray, name: str) -> torch.Tensor:
    """Convert a decoded mask (PIL image or (H, W) array) to an int64 tensor (H, W).

    Args:
        mask: PIL image in mode ``1``/``L``/``P``/``I``/``I;16`` (its EXIF orientation is
            applied), or an integer array (H, W).
        name: What to call the mask in error messages.

    Returns:
        Mask of shape (H, W), int64.
    """
    return torch.from_numpy(reader.mask_array(mask, name))


def check_mask_values(
    mask: torch.Tensor, num_classes: int, ignore_index: int | None, name: str
) -> torch.Tensor:
    """Check that every mask value is a class id in [0, num_classes) or ``ignore_index``.

    Args:
        mask: Mask (H, W), integer.
        num_classes: Number of classes K.
        ignore_index: Label of ignored pixels, or None when there is none.
        name: What to call the mask in the error message (file name).

    Returns:
        Pixel count per non-negative value, (max(K, max value + 1),) int64 (``torch.bincount``).

    Raises:
        ValueError: Naming the mask and the offending values.
    """
    flat = mask.reshape(-1)
    if ignore_index is not None and ignore_index < 0:  # e.g. -100: bincount needs values >= 0
        flat = flat[flat != ignore_index]
    if flat.numel() and int(flat.min()) < 0:
        bad = sorted({int(v) for v in flat[flat < 0].unique()})
        raise ValueError(
            f"mask {name} has values {bad} outside [0, {num_classes})"
            + (f" that are not the ignore_index {ignore_index}" if ignore_index is not None else "")
        )
    counts = torch.bincount(flat, minlength=num_classes)
    present = torch.nonzero(counts).flatten().tolist()
    bad = [v for v in present if v >= num_classes and v != ignore_index]
    if bad:
        raise ValueError(
            f"mask {name} has values {bad} outside [0, {num_classes})"
            + (f" that are not the ignore_index {ignore_index}" if ignore_index is not None else "")
            + f" (num_classes={num_classes})"
        )
    return counts


def remap_mask(
    mask: torch.Tensor, mask_values: Sequence[int], ignore_index: int | None, name: str
) -> torch.Tensor:
    """Map stored mask values to class ids: ``mask_values[i]`` becomes class ``i``.

    For masks that do not store class ids directly, e.g. 0/255 binary masks (``[0, 255]``) or
    grey levels (``[0, 128, 255]``). A stored value listed in ``mask_values`` wins over
    ``ignore_index``; ``ignore_index`` pixels not listed stay ignored.

    Args:
        mask: Stored mask (H, W), integer.
        mask_values: Stored value of class 0, 1, ...
        ignore_index: Label of ignored pixels, or None.
        name: What to call the mask in the error message (file name).

    Returns:
        Class-id mask (H, W), int64.

    Raises:
        ValueError: Naming the mask and the stored values that are neither listed nor ignored.
    """
    out = torch.full_like(mask, -1 if ignore_index is None else ignore_index, dtype=torch.int64)
    known = torch.zeros_like(mask, dtype=torch.bool)
    for class_id, value in enumerate(mask_values):
        hit = mask == value
        out[hit] = class_id
        known |= hit
    if ignore_index is not None:
        known |= (mask == ignore_index) & ~known
    if not bool(known.all()):
        bad = sorted(int(v) for v in mask[~known].unique()[:8])
        raise ValueError(
            f"mask {name} has values {bad} that are neither in data.mask_values={list(mask_values)} "
            f"nor data.ignore_index={ignore_index}; list every stored value in data.mask_values"
        )
    return out


def apply_transform(sample: Sample, transform: Callable[[Sample], Any] | None) -> Any:
    """Run ``transform`` on a sample with its image/mask wrapped as tv_tensors, then unwrap.

    Args:
        sample: ``{"image": (C, H, W), "mask": (H, W) (optional), "id": str, ...}``.
        transform: Callable on the wrapped dict (e.g. a ``torchvision.transforms.v2`` pipeline);
            it may return any nest of dicts/lists/tuples (e.g. two augmented views).

    Returns:
        The transform's output with every tv_tensor turned back into a plain ``torch.Tensor``.
    """
    if transform is None:
        return sample
    wrapped = dict(sample)
    wrapped["image"] = tv_tensors.Image(sample["image"])
    if "mask" in sample:
        wrapped["mask"] = tv_tensors.Mask(sample["mask"])
    out = transform(wrapped)
    return tree_map(lambda x: x.as_subclass(torch.Tensor) if isinstance(x, tv_tensors.TVTensor) else x, out)


def list_files(root: Path, extensions: Iterable[str], recursive: bool = True) -> list[Path]:
    """List files under ``root`` whose suffix (case-insensitive) is in ``extensions``, sorted."""
    extensions = tuple(e.lower() if e.startswith(".") else f".{e.lower()}" for e in extensions)
    pattern = root.rglob("*") if recursive else root.glob("*")
    return sorted(p for p in pattern if p.is_file() and p.suffix.lower() in extensions)
