"""The project's one reader of image and mask files (numpy and Pillow; no torch).

Training and evaluation (:mod:`hybridvision.data.io` wraps these arrays in tensors) and both
predictors (:mod:`hybridvision.inference` via ``data.io``, and the PyTorch-free
:mod:`hybridvision.deploy.runtime`) read through here, so a rule (orientation, bit depth, channels)
cannot differ between them: the EXIF / TIFF orientation is applied, 16-bit PNGs are read at full
depth, TIFFs with any number of bands through ``tifffile`` when installed.
"""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
from PIL import Image

__all__ = [
    "IMAGE_EXTENSIONS",
    "ORIENTATION_TAG",
    "ImageSource",
    "displayed_size",
    "image_array",
    "image_orientation",
    "list_images",
    "mask_array",
    "orient",
    "read_image",
    "read_mask",
]

IMAGE_EXTENSIONS: tuple[str, ...] = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".webp")
_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)  # ITU-R 601-2, as PIL's RGB -> L

#: EXIF / TIFF tag saying how the stored pixels are turned to show the picture upright
ORIENTATION_TAG = 0x0112
#: what a file argument may be: a path, or the file's bytes (e.g. a Hugging Face image cell)
ImageSource = str | os.PathLike | bytes
# 16-bit-per-channel PNG colour types that PIL decodes to 8 bits (rawmode "…;16B" takes the high
# byte). Decoding the same data again with these rawmodes yields the low bytes ("RGB;16L" reads
# the second byte of each sample) or, for gray + alpha, all four bytes as one 8-bit RGBA pixel.
_PNG16_LOW_RAWMODES = {"RGB;16B": "RGB;16L", "RGBA;16B": "RGBA;16L", "LA;16B": "RGBA"}
_MASK_MODES = ("1", "L", "P", "I", "I;16", "I;16B", "I;16L")


def read_image(path: ImageSource, in_chans: int = 3, name: str | None = None) -> np.ndarray:
    """Read an image file as float32 (C, H, W), upright as displayed.

    The rules (shared with :func:`hybridvision.data.io.read_image`, which calls this):

    * orientation: the EXIF (or TIFF) orientation tag is applied, so the array is the picture as
      viewers show it (phone photos stored sideways come out upright);
    * scaling: unsigned integer data are scaled to [0, 1] by their type's range (8-bit / 255,
      16-bit / 65535, 16-bit-per-channel RGB(A) PNGs included); signed-integer and floating-point
      data (float TIFF, 32-bit ``I`` TIFF) are kept as stored;
    * channels: equal counts are kept; an alpha channel is dropped when that makes the counts
      match; gray is repeated to 3 channels; RGB becomes 1 channel by ITU-R 601-2 luma; any
      other mismatch is a ``ValueError``.

    TIFF files use ``tifffile`` when installed (any number of bands), otherwise PIL.

    Args:
        path: Image file (png, jpg, jpeg, tif, tiff, bmp, webp), or the bytes of one.
        in_chans: Channels wanted.
        name: What to call the image in error messages (default: the path; ``<bytes>``).

    Returns:
        (in_chans, H, W) float32, H and W as displayed.

    Raises:
        OSError: Unreadable, truncated or missing file.
        ValueError: Channel count that cannot be converted to ``in_chans``; a TIFF whose
            orientation swaps H and W read without ``tifffile`` (PIL misreads those).
    """
    name = name or _source_name(path)
    if not isinstance(path, bytes) and Path(path).suffix.lower() in (".tif", ".tiff") and _has_tifffile():
        array, has_alpha, orientation = _read_tiff(Path(path))
    else:
        with _open(path) as img:
            low_rawmode = _png16_low_rawmode(img)  # first: the tile is gone once loaded
            _check_pil_orientation(img, name)
            img.load()  # decode now, so truncated files raise here
            orientation = image_orientation(img)  # PIL applies a TIFF's own on load, then drops it
            if low_rawmode is None:
                array, has_alpha = _pil_to_array(img)
            else:
                array, has_alpha = _png16_to_array(path, img, low_rawmode)
    return _convert_channels(orient(array, orientation), has_alpha, in_chans, name)


def image_array(image: Image.Image | np.ndarray, in_chans: int, name: str) -> np.ndarray:
    """A decoded image (PIL image, or array (H, W) / (H, W, C)) as (in_chans, H, W) float32.

    A PIL image follows :func:`read_image`'s rules (its EXIF orientation included); an array is
    taken as displayed, uint8 / uint16 / bool scaled to [0, 1].
    """
    if isinstance(image, Image.Image):
        array, has_alpha = _pil_to_array(image)
        return _convert_channels(orient(array, image_orientation(image)), has_alpha, in_chans, name)
    array = _scale(np.asarray(image))
    return _convert_channels(array if array.ndim == 3 else array[:, :, None], False, in_chans, name)


def read_mask(path: ImageSource, name: str | None = None) -> np.ndarray:
    """Read a class-index mask (one channel, value = class id).

    Upright as :func:`read_image` reads its image (EXIF / TIFF orientation applied).

    Args:
        path: Mask file or its bytes; PIL modes ``1``, ``L``, ``P`` (palette indices are the class
            ids), ``I``, ``I;16``.
        name: What to call the mask in error messages (default: the path).

    Returns:
        (H, W) int64.

    Raises:
        OSError: Unreadable file.
        ValueError: Multi-channel (e.g. colour-coded RGB) masks, naming the file.
    """
    name = name or _source_name(path)
    with _open(path) as img:
        _check_pil_orientation(img, name)
        img.load()
        return mask_array(img, name)


def mask_array(mask: Image.Image | np.ndarray, name: str) -> np.ndarray:
    """A decoded mask as (H, W) int64.

    ``mask`` is a PIL image (its EXIF orientation already applied) or an integer array (H, W);
    ``name`` names it in error messages.

    Raises:
        ValueError: Naming the mask, for more than one channel or a non-integer array.
    """
    if isinstance(mask, Image.Image):
        if mask.mode not in _MASK_MODES:
            raise ValueError(
                f"mask {name} has mode {mask.mode!r} ({len(mask.getbands())} channels); "
                "expected a single-channel class-index mask (mode L, P or I) where each pixel "
                "value is a class id. Convert colour-coded masks to class indices first."
            )
        array = orient(np.asarray(mask), image_orientation(mask))
    else:
        array = np.asarray(mask)
        if array.ndim == 3 and array.shape[-1] == 1:
            array = array[..., 0]
        if array.ndim != 2 or not (np.issubdtype(array.dtype, np.integer) or array.dtype == bool):
            raise ValueError(
                f"mask {name} has shape {array.shape} and dtype {array.dtype}; "
                "expected a single-channel integer class-index mask (H, W)"
            )
    return np.array(array, dtype=np.int64, order="C")  # a writable copy (torch.from_numpy)


def image_orientation(img: Image.Image) -> int:
    """The EXIF / TIFF orientation (1-8) of an opened image; 1 (as stored) when absent or invalid."""
    try:
        value = int(img.getexif().get(ORIENTATION_TAG, 1))
    except (TypeError, ValueError, OSError, SyntaxError):  # a broken EXIF block: read as stored
        return 1
    return value if 1 <= value <= 8 else 1


def displayed_size(img: Image.Image) -> tuple[int, int]:
    """(H, W) of an opened image as displayed (after its orientation), from the header.

    PIL already reports a TIFF's displayed size (it applies TIFF orientations itself).
    """
    swap = img.format != "TIFF" and image_orientation(img) >= 5
    return (img.width, img.height) if swap else (img.height, img.width)


def orient(array: np.ndarray, orientation: int) -> np.ndarray:
    """Turn stored pixels (H, W, ...) into the displayed picture, for an EXIF orientation 1-8.

    The same operations as ``PIL.ImageOps.exif_transpose``: 2 mirror left-right, 3 rotate 180,
    4 mirror top-bottom, 5 transpose, 6 rotate 90 clockwise, 7 transverse, 8 rotate 90
    counter-clockwise. Orientations 5-8 swap H and W.
    """
    if orientation == 2:
        return array[:, ::-1]
    if orientation == 3:
        return array[::-1, ::-1]
    if orientation == 4:
        return array[::-1]
    if orientation == 5:
        return array.swapaxes(0, 1)
    if orientation == 6:
        return np.rot90(array, -1)
    if orientation == 7:
        return array[::-1, ::-1].swapaxes(0, 1)
    if orientation == 8:
        return np.rot90(array, 1)
    return array


def _check_pil_orientation(img: Image.Image, name: str) -> None:
    """Refuse, before decoding, a TIFF whose orientation swaps H and W.

    PIL applies TIFF orientations itself when loading, and scrambles single-band images when they swap H and W
    (Pillow 13); ``tifffile`` reads them exactly.
    """
    if img.format != "TIFF":  # (PNG's getexif() would decode the whole image here)
        return
    orientation = image_orientation(img)
    if orientation >= 5:
        raise ValueError(
            f"image {name} is a TIFF with orientation tag {orientation} (height and width swapped), "
            "which PIL cannot decode reliably; install tifffile (pip install tifffile) to read it"
        )


def _source_name(path: ImageSource) -> str:
    return "<bytes>" if isinstance(path, bytes) else str(path)


def _open(path: ImageSource) -> Image.Image:
    return Image.open(io.BytesIO(path) if isinstance(path, bytes) else path)


def _has_tifffile() -> bool:
    import importlib.util

    return importlib.util.find_spec("tifffile") is not None


def _scale(array: np.ndarray) -> np.ndarray:
    """uint8 / uint16 / bool -> [0, 1]; every other dtype -> float32 unchanged."""
    if array.dtype == np.uint8:
        return array.astype(np.float32) / 255.0
    if array.dtype == np.uint16:
        return array.astype(np.float32) / 65535.0
    return array.astype(np.float32)


def _pil_to_array(img: Image.Image) -> tuple[np.ndarray, bool]:
    """Decode a PIL image to (H, W, C) float32 (as stored) and whether its last channel is alpha."""
    mode = img.mode
    if mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    elif mode == "PA":
        img = img.convert("RGBA")
    elif mode in ("1", "CMYK", "YCbCr", "LAB", "HSV"):
        img = img.convert("L" if mode == "1" else "RGB")
    mode = img.mode
    array = np.asarray(img)
    if mode in ("I;16", "I;16L", "I;16B", "I;16N") or (mode == "I" and img.format == "PNG"):
        array = array.astype(np.float32) / 65535.0  # 16-bit (PNG: decoded as 32-bit by older PIL)
    else:
        array = _scale(array)
    if array.ndim == 2:
        array = array[:, :, None]
    return array, mode in ("LA", "La", "RGBA", "RGBa")


def _png16_low_rawmode(img: Image.Image) -> str | None:
    """The rawmode that decodes the low bytes PIL drops from a 16-bit colour PNG.

    For a not yet loaded 16-bit-per-channel colour (or gray + alpha) PNG (see
    ``_PNG16_LOW_RAWMODES``); None for any other image.
    """
    tile = img.tile  # type: ignore[attr-defined]  # Pillow's stubs omit ImageFile.tile
    if img.format != "PNG" or len(tile) != 1:
        return None
    rawmode = tile[0].args
    return _PNG16_LOW_RAWMODES.get(rawmode) if isinstance(rawmode, str) else None


def _png16_to_array(path: ImageSource, img: Image.Image, low_rawmode: str) -> tuple[np.ndarray, bool]:
    """(H, W, C) float32 in [0, 1] at the full 16 bits of a 16-bit colour PNG, and whether C ends in alpha.

    ``img`` is the loaded image (high bytes); the file is decoded again for the rest by
    PIL's own PNG decoder (filters, interlacing, checksums) with another rawmode.
    """
    with _open(path) as again:
        again.tile = [again.tile[0]._replace(args=low_rawmode)]
        again.load()
        low = np.asarray(again).astype(np.uint16)
    if low_rawmode == "RGBA":  # gray + alpha: bytes (gray hi, gray lo, alpha hi, alpha lo)
        words = (low[..., 0::2] << 8) | low[..., 1::2]  # (H, W, 2)
    else:
        words = (np.asarray(img).astype(np.uint16) << 8) | low  # (H, W, 3 or 4)
    return words.astype(np.float32) / 65535.0, words.shape[-1] in (2, 4)


def _read_tiff(path: Path) -> tuple[np.ndarray, bool, int]:
    """A (possibly multi-band) TIFF via tifffile.

    Returns the (H, W, C) scaled array as stored, whether C ends in alpha, and the orientation tag
    (1 when absent).
    """
    import tifffile

    with tifffile.TiffFile(path) as tif:
        series = tif.series[0]
        axes, array = series.axes, np.asarray(series.asarray())
        page = tif.pages[0]
        extra = tuple(getattr(page, "extrasamples", ()) or ())
        tag = page.tags.get(ORIENTATION_TAG)
        orientation = int(tag.value) if tag is not None else 1
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
    has_alpha = bool(extra) and int(extra[-1]) in (1, 2)
    return _scale(array), has_alpha, orientation if 1 <= orientation <= 8 else 1


def _convert_channels(array: np.ndarray, has_alpha: bool, in_chans: int, name: str) -> np.ndarray:
    """(H, W, C_src) float32 -> (in_chans, H, W), following :func:`read_image`'s rules."""
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
                f"image {name} has {channels + int(has_alpha)} channel(s) ({channels} without alpha) "
                f"but in_chans={in_chans}; only gray->3, RGB->1 and dropping an alpha channel are "
                "converted automatically"
            )
    return np.ascontiguousarray(array.transpose(2, 0, 1), dtype=np.float32)  # (C, H, W)


def list_images(root: Path) -> list[Path]:
    """Image files under ``root`` (recursive, case-insensitive suffixes), sorted."""
    return sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
