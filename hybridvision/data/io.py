"""Reading images and masks from files, and the sample-dict conventions shared by every dataset.

A *sample* is a dict ``{"image": (C, H, W) float32, "mask": (H, W) int64, "id": str}`` (no
``"mask"`` for unlabelled data). Transforms receive the image and mask wrapped as
``tv_tensors.Image`` / ``tv_tensors.Mask`` so spatial augmentations move both together; after the
transform every tensor is a plain ``torch.Tensor`` again so ``default_collate`` works.
"""

from __future__ import annotations

import functools
import importlib.util
import os
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils._pytree import tree_map
from torchvision import tv_tensors

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

IMAGE_EXTENSIONS: tuple[str, ...] = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".webp")
"""File suffixes (lower case) that :func:`read_image` understands."""

#: Exceptions that mean "this file cannot be decoded" (corrupt, truncated, 0-byte, unreadable,
#: absurdly large). ``PIL.UnidentifiedImageError`` is an ``OSError``; some plugins raise SyntaxError.
READ_ERRORS: tuple[type[BaseException], ...] = (OSError, SyntaxError, Image.DecompressionBombError)

_TIFF_SUFFIXES = (".tif", ".tiff")
# ITU-R 601-2 luma, the weights PIL uses for RGB -> L.
_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)


@functools.cache
def _has_tifffile() -> bool:
    return importlib.util.find_spec("tifffile") is not None


def read_image(path: str | os.PathLike, in_chans: int = 3) -> torch.Tensor:
    """Read an image file into a float tensor with ``in_chans`` channels.

    Unsigned integer data are scaled to [0, 1] by their type's range (8-bit / 255, 16-bit
    ``I;16`` / 65535). Signed-integer and floating-point data (float TIFF, 32-bit ``I`` TIFF,
    e.g. CT slices in Hounsfield units) are returned as stored, in float32: map them to [0, 1]
    with the ``window`` option of :func:`~hybridvision.data.transforms.build_seg_transforms`.

    Channel conversion to ``in_chans``: equal counts are kept; an alpha channel is dropped when
    that makes the counts match (RGBA -> 3, gray+alpha -> 1); gray is repeated to 3 channels;
    RGB becomes 1 channel by ITU-R 601-2 luminance. Any other mismatch is a ``ValueError``.

    TIFF files are read with ``tifffile`` when it is installed (any number of bands, e.g.
    RGB + NIR), otherwise with PIL.

    Args:
        path: Image file (png, jpg, jpeg, tif, tiff, bmp, webp).
        in_chans: Number of channels wanted.

    Returns:
        Image of shape (C, H, W), float32, C = ``in_chans``.

    Raises:
        ValueError: If the channel count cannot be converted to ``in_chans``.
        OSError: If the file is missing, corrupt or truncated (``PIL.UnidentifiedImageError``
            is an ``OSError``).
    """
    path = Path(path)
    if path.suffix.lower() in _TIFF_SUFFIXES and _has_tifffile():
        array, has_alpha = _read_tiff_bands(path)
    else:
        with Image.open(path) as img:
            img.load()  # decode now, so truncated files raise here
            array, has_alpha = _pil_to_array(img)
    return _convert_channels(array, has_alpha, in_chans, str(path))


def image_to_tensor(image: Image.Image | np.ndarray, in_chans: int, name: str) -> torch.Tensor:
    """Convert a decoded PIL image or array (H, W) / (H, W, C) with the rules of :func:`read_image`.

    Args:
        image: PIL image, or a numpy array (H, W) or (H, W, C) (uint8/uint16 are scaled to [0, 1]).
        in_chans: Number of channels wanted.
        name: What to call the image in error messages (file name, dataset row).

    Returns:
        Image of shape (C, H, W), float32.
    """
    if isinstance(image, Image.Image):
        array, has_alpha = _pil_to_array(image)
    else:
        array, has_alpha = _scale_array(np.asarray(image)), False
    return _convert_channels(array, has_alpha, in_chans, name)


def read_mask(path: str | os.PathLike) -> torch.Tensor:
    """Read a class-index mask (one channel, value = class id).

    Args:
        path: Mask file; PIL modes ``1``, ``L``, ``P`` (palette indices are the class ids),
            ``I``, ``I;16``.

    Returns:
        Mask of shape (H, W), int64.

    Raises:
        ValueError: For multi-channel (e.g. colour-coded RGB) masks, naming the file.
    """
    with Image.open(path) as img:
        img.load()
        return mask_to_tensor(img, str(path))


def mask_to_tensor(mask: Image.Image | np.ndarray, name: str) -> torch.Tensor:
    """Convert a decoded mask (PIL image or (H, W) array) to an int64 tensor (H, W).

    Args:
        mask: PIL image in mode ``1``/``L``/``P``/``I``/``I;16``, or an integer array (H, W).
        name: What to call the mask in error messages.

    Returns:
        Mask of shape (H, W), int64.
    """
    if isinstance(mask, Image.Image):
        if mask.mode not in ("1", "L", "P", "I", "I;16", "I;16B", "I;16L"):
            raise ValueError(
                f"mask {name} has mode {mask.mode!r} ({len(mask.getbands())} channels); "
                "expected a single-channel class-index mask (mode L, P or I) where each pixel "
                "value is a class id. Convert colour-coded masks to class indices first."
            )
        array = np.asarray(mask)
    else:
        array = np.asarray(mask)
        if array.ndim == 3 and array.shape[-1] == 1:
            array = array[..., 0]
        if array.ndim != 2 or not (np.issubdtype(array.dtype, np.integer) or array.dtype == bool):
            raise ValueError(
                f"mask {name} has shape {array.shape} and dtype {array.dtype}; "
                "expected a single-channel integer class-index mask (H, W)"
            )
    return torch.from_numpy(array.astype(np.int64))


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


# --------------------------------------------------------------------------- internals


def _pil_to_array(img: Image.Image) -> tuple[np.ndarray, bool]:
    """Decode a PIL image to (H, W, C) float32 and whether its last channel is alpha."""
    mode = img.mode
    if mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    elif mode == "PA":
        img = img.convert("RGBA")
    elif mode in ("1", "CMYK", "YCbCr", "LAB", "HSV"):
        img = img.convert("L" if mode == "1" else "RGB")
    mode = img.mode
    array = np.asarray(img)
    if mode in ("I;16", "I;16L", "I;16B", "I;16N"):
        array = array.astype(np.float32) / 65535.0
    elif mode == "I" and img.format == "PNG":  # 16-bit PNG decoded as 32-bit by older Pillow
        array = array.astype(np.float32) / 65535.0
    else:
        array = _scale_array(array)
    if array.ndim == 2:
        array = array[:, :, None]
    return array, mode in ("LA", "La", "RGBA", "RGBa")


def _scale_array(array: np.ndarray) -> np.ndarray:
    """uint8 / uint16 / bool -> [0, 1]; every other dtype -> float32 unchanged."""
    if array.dtype == np.uint8:
        return array.astype(np.float32) / 255.0
    if array.dtype == np.uint16:
        return array.astype(np.float32) / 65535.0
    if array.dtype == bool:
        return array.astype(np.float32)
    return array.astype(np.float32)


def _read_tiff_bands(path: Path) -> tuple[np.ndarray, bool]:
    """Read a (possibly multi-band) TIFF with tifffile: (H, W, C) array and whether C ends in alpha."""
    import tifffile

    with tifffile.TiffFile(path) as tif:
        series = tif.series[0]
        axes, array = series.axes, np.asarray(series.asarray())
        extra_samples = tuple(getattr(tif.pages[0], "extrasamples", ()) or ())
    if axes == "YX":
        array = array[:, :, None]
    elif len(axes) == 3 and axes[1:] == "YX":
        array = np.moveaxis(array, 0, -1)  # planar (C, H, W) -> (H, W, C)
    elif not (len(axes) == 3 and axes[:2] == "YX"):
        raise ValueError(
            f"image {path} has TIFF axes {axes!r} with shape {array.shape}; expected a single "
            "2-D image with at most one band axis (multi-page stacks are not supported)"
        )
    # TIFF ExtraSamples 1 / 2 = associated / unassociated alpha.
    has_alpha = bool(extra_samples) and int(extra_samples[-1]) in (1, 2)
    return _scale_array(array), has_alpha


def _convert_channels(array: np.ndarray, has_alpha: bool, in_chans: int, name: str) -> torch.Tensor:
    """(H, W, C_src) float32 -> (in_chans, H, W) tensor, following :func:`read_image`'s rules."""
    channels = array.shape[-1]
    if channels != in_chans and has_alpha:
        array, channels = array[..., :-1], channels - 1
    if channels != in_chans:
        if channels == 1 and in_chans == 3:
            array = np.repeat(array, 3, axis=-1)
        elif channels == 3 and in_chans == 1:
            array = (array @ _LUMA)[..., None]
        else:
            raise ValueError(
                f"image {name} has {array.shape[-1] + int(has_alpha)} channel(s) "
                f"({channels} without alpha) but in_chans={in_chans}; only gray->3, RGB->1 and "
                "dropping an alpha channel are converted automatically"
            )
    # (H, W, C) -> (C, H, W)
    return torch.from_numpy(np.ascontiguousarray(array.transpose(2, 0, 1), dtype=np.float32))
