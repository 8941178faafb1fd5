"""PyTorch-free segmentation with an exported ONNX model: numpy, Pillow and onnxruntime only.

The edge-device counterpart of ``finetune/predict.py`` + :mod:`hybridvision.inference`: it reads
images of any size and channel count with the project's one image reader (:func:`read_image`, also
behind :func:`hybridvision.data.io.read_image`: EXIF orientation applied, 16-bit PNGs at full
depth), normalises them as recorded in the model's metadata (written by
:func:`hybridvision.export.export_onnx`), runs whole-image or sliding-window inference with the
same window placement and blending (uniform or Gaussian, scores averaged in probability space for
K >= 2 and in logit space for K = 1, optional flip TTA) and writes ``<id>_mask.png`` /
``<id>_overlay.png``::

    python -m hybridvision.deploy.runtime --model model.onnx --input images/ --output out/

Nothing here imports ``torch`` (a test runs this module with ``torch`` made unimportable).
"""

from __future__ import annotations

import argparse
import io
import itertools
import json
import logging
import math
import os
import sys
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

__all__ = [
    "IMAGE_EXTENSIONS",
    "IMAGE_PAD_VALUE",
    "METADATA_KEY",
    "ORIENTATION_TAG",
    "OnnxSegmenter",
    "OnnxPredictor",
    "UserError",
    "colorize",
    "displayed_size",
    "gaussian_window",
    "image_array",
    "image_orientation",
    "list_images",
    "mask_array",
    "normalization_spec",
    "normalize_image",
    "orient",
    "output_stems",
    "overlay",
    "predict_sliding_window",
    "predict_whole",
    "read_image",
    "read_mask",
    "parse_resize",
    "read_metadata",
    "rescaled_size",
    "resize_image",
    "save_mask",
    "scores_at_scale",
    "window_starts",
]

#: ``metadata_props`` key of the ONNX model holding the deployment metadata as JSON
METADATA_KEY = "hybridvision"
IMAGE_EXTENSIONS: tuple[str, ...] = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".webp")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)  # ITU-R 601-2, as PIL's RGB -> L
#: Value of the pixels added around a *normalised* image, by training crops
#: (:func:`hybridvision.data.transforms.build_seg_transforms`) and inference windows alike: 0, the
#: normalisation mean (MMSegmentation's ``SegDataPreProcessor(pad_val=0)``); masks get ``ignore_index``.
IMAGE_PAD_VALUE = 0.0
_FLIP_AXES = {"h": (-1,), "v": (-2,), "hv": (-2, -1)}


class UserError(Exception):
    """A problem with the user's input (file, value, model); the message is one line naming it."""


# --------------------------------------------------------------------------- images
#
# The project's one reader of image and mask files: training and evaluation
# (hybridvision.data.io wraps these arrays in tensors) and both predictors use it, so a rule
# (orientation, bit depth, channels) cannot differ between them.

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
    """Read a class-index mask (one channel, value = class id), upright as :func:`read_image` reads
    its image (EXIF / TIFF orientation applied).

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
    """A decoded mask (PIL image, with its EXIF orientation applied, or integer array (H, W)) as
    (H, W) int64.

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
    """Refuse, before decoding, a TIFF whose orientation swaps H and W: PIL applies TIFF
    orientations itself when loading, and scrambles single-band images when they swap H and W
    (Pillow 13); ``tifffile`` reads them exactly."""
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
    """For a not yet loaded 16-bit-per-channel colour (or gray + alpha) PNG, the rawmode that
    decodes the bytes PIL drops (see ``_PNG16_LOW_RAWMODES``); None for any other image."""
    if img.format != "PNG" or len(img.tile) != 1:
        return None
    rawmode = img.tile[0].args
    return _PNG16_LOW_RAWMODES.get(rawmode) if isinstance(rawmode, str) else None


def _png16_to_array(path: ImageSource, img: Image.Image, low_rawmode: str) -> tuple[np.ndarray, bool]:
    """(H, W, C) float32 in [0, 1] at the full 16 bits of a 16-bit colour PNG, and whether C ends
    in alpha. ``img`` is the loaded image (high bytes); the file is decoded again for the rest by
    PIL's own PNG decoder (filters, interlacing, checksums) with another rawmode."""
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
    """A (possibly multi-band) TIFF via tifffile: (H, W, C) scaled array as stored, whether C ends
    in alpha, and the orientation tag (1 when absent)."""
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


# --------------------------------------------------------------------------- normalisation


def normalization_spec(data_cfg: dict[str, Any] | None, in_chans: int) -> dict[str, Any]:
    """The input normalisation a run used, as plain data (what the ONNX metadata records).

    Mirrors ``build_seg_transforms``: ``data.window`` first, then explicit ``data.mean``/``data.std``
    when set, else ``data.normalize`` (``imagenet`` for 1 or 3 channels, ``per_image``, ``none``).

    Args:
        data_cfg: the run config's ``data`` section as a dict (None: ImageNet defaults).
        in_chans: model input channels.

    Returns:
        ``{"kind": "mean_std" | "per_image" | "none", "mean": [...], "std": [...], "window": [c, w] | None}``.
    """
    data = data_cfg or {}
    window = data.get("window")
    spec: dict[str, Any] = {"window": [float(v) for v in window] if window else None}
    mean, std = data.get("mean") or [], data.get("std") or []
    kind = data.get("normalize", "imagenet")
    if not isinstance(kind, str):  # an explicit (mean, std) pair, as build_seg_transforms accepts
        mean, std = kind
        kind = "mean_std"
    if mean or std:
        if len(mean) != in_chans or len(std) != in_chans:
            raise UserError(
                f"data.mean/data.std have {len(mean)}/{len(std)} values but in_chans={in_chans}; give one per channel"
            )
        return {**spec, "kind": "mean_std", "mean": [float(v) for v in mean], "std": [float(v) for v in std]}
    if kind == "imagenet":
        if in_chans == 3:
            return {**spec, "kind": "mean_std", "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD)}
        if in_chans == 1:  # channel average, as build_seg_transforms
            return {
                **spec,
                "kind": "mean_std",
                "mean": [sum(IMAGENET_MEAN) / 3],
                "std": [sum(IMAGENET_STD) / 3],
            }
        raise UserError(
            f"data.normalize='imagenet' needs in_chans 1 or 3, got {in_chans}; set data.mean/data.std"
        )
    if kind in ("per_image", "none"):
        return {**spec, "kind": kind}
    raise UserError(f"data.normalize must be imagenet, per_image or none, got {kind!r}")


def normalize_image(image: np.ndarray, spec: dict[str, Any]) -> np.ndarray:
    """Apply a :func:`normalization_spec` to one image (C, H, W) float32; returns (C, H, W) float32."""
    x = image.astype(np.float32, copy=False)
    if spec.get("window"):
        center, width = spec["window"]
        low = np.float32(center - width / 2.0)
        x = np.clip((x - low) / np.float32(width), 0.0, 1.0)
    kind = spec["kind"]
    if kind == "mean_std":
        mean = np.asarray(spec["mean"], dtype=np.float32)[:, None, None]
        std = np.asarray(spec["std"], dtype=np.float32)[:, None, None]
        x = (x - mean) / std
    elif kind == "per_image":
        mean = x.mean(axis=(-2, -1), keepdims=True, dtype=np.float64).astype(np.float32)
        std = x.std(axis=(-2, -1), keepdims=True, dtype=np.float64).astype(np.float32)
        x = (x - mean) / (std + np.float32(1e-6))
    elif kind != "none":
        raise UserError(f"unknown normalisation kind {kind!r} in the model metadata")
    return np.ascontiguousarray(x, dtype=np.float32)


# --------------------------------------------------------------------------- model


def read_metadata(model: str | os.PathLike | Any) -> dict[str, Any]:
    """The deployment metadata of an exported model (path, ``onnx.ModelProto`` or ORT session)."""
    if isinstance(model, (str, os.PathLike)):
        model = _session(Path(model), threads=1)
    props = (
        model.get_modelmeta().custom_metadata_map
        if hasattr(model, "get_modelmeta")
        else {p.key: p.value for p in model.metadata_props}
    )
    if METADATA_KEY not in props:
        raise UserError("the ONNX model has no hybridvision metadata: export it with distill/export.py")
    return json.loads(props[METADATA_KEY])


def _session(path: Path, threads: int | None) -> Any:
    import onnxruntime as ort

    if not path.is_file():
        raise UserError(f"ONNX model {path} not found")
    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
    try:
        return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own types for corrupt/truncated files
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"cannot load ONNX model {path} ({first}); export it again") from exc


class OnnxSegmenter:
    """An exported segmenter as a callable ``(N, C, H, W) float32 -> logits (N, K, H, W)``.

    Args:
        path: ``model.onnx`` written by ``export_onnx``.
        threads: onnxruntime intra-op threads (None: onnxruntime's default).
    """

    def __init__(self, path: str | os.PathLike, threads: int | None = None) -> None:
        self.path = Path(path)
        self.session = _session(self.path, threads)
        self.metadata = read_metadata(self.session)
        self.input_name = self.session.get_inputs()[0].name
        self.in_chans = int(self.metadata["in_chans"])
        self.num_classes = int(self.metadata["num_classes"])

    def __call__(self, images: np.ndarray) -> np.ndarray:
        if images.ndim != 4 or images.shape[1] != self.in_chans:
            raise ValueError(f"expected (N, {self.in_chans}, H, W) images, got shape {images.shape}")
        return self.session.run(None, {self.input_name: np.ascontiguousarray(images, dtype=np.float32)})[0]


# --------------------------------------------------------------------------- inference (numpy port)


def rescaled_size(height: int, width: int, resize: Sequence[int] | None) -> tuple[int, int]:
    """(H, W) of an image rescaled to the scale ``resize = [short_side, max_long_side]``, aspect kept.

    The short side becomes ``short_side`` unless the long side would then exceed ``max_long_side``
    (0: no limit), in which case the long side becomes ``max_long_side`` (MMSegmentation's
    ``Resize(scale=(long, short), keep_ratio=True)``). ``None`` keeps the size. Shared by training
    (:class:`hybridvision.data.transforms.RandomResize`), evaluation
    (:class:`hybridvision.inference.Predictor`) and this runtime, so all three agree.
    """
    if not resize:
        return int(height), int(width)
    short, long_max = int(resize[0]), int(resize[1]) if len(resize) > 1 else 0
    factor = short / min(height, width)
    if long_max and max(height, width) * factor > long_max:
        factor = long_max / max(height, width)
    return max(1, round(height * factor)), max(1, round(width * factor))


def parse_resize(option: Sequence[str] | None, recorded: Any = None) -> list[int] | None:
    """The prediction scale: ``--resize`` (``SHORT [MAX_LONG]`` or ``native``) if given, else the
    model's recorded ``data.resize`` (a list, ``"native"`` or absent). None: native size."""
    if option:
        if len(option) == 1 and str(option[0]).lower() == "native":
            return None
        try:
            values = [int(v) for v in option]
        except ValueError:
            values = []
        if len(values) not in (1, 2) or values[0] < 1 or (len(values) == 2 and values[1] < 0):
            raise UserError(
                f"--resize {' '.join(map(str, option))}: give SHORT [MAX_LONG] pixels or 'native'"
            )
        return values
    if isinstance(recorded, (list, tuple)) and recorded:
        return [int(v) for v in recorded]
    return None


def resize_image(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """(C, H, W) float32 -> (C, h, w): Pillow's bilinear filter, antialiased when shrinking.

    ``torch``'s ``interpolate(mode="bilinear", antialias=True)`` (what training and
    :class:`hybridvision.inference.Predictor` use) follows the same filter.
    """
    if tuple(image.shape[-2:]) == tuple(size):
        return image
    channels = [
        np.asarray(
            Image.fromarray(np.ascontiguousarray(c, dtype=np.float32)).resize(
                (size[1], size[0]), Image.BILINEAR
            )
        )
        for c in image
    ]
    return np.stack(channels).astype(np.float32)


def scores_at_scale(
    scores: Callable[[np.ndarray], np.ndarray], image: np.ndarray, resize: Sequence[int] | None
) -> np.ndarray:
    """Scores (1, K, H, W) of one normalised image (C, H, W) predicted at the scale ``resize``.

    The image is rescaled (:func:`rescaled_size`, :func:`resize_image`), ``scores`` runs on the
    (1, C, h, w) batch (whole image or sliding window: :func:`_scores`' probabilities / K = 1
    logits), and the scores go back to (H, W) as logits, bilinear, as
    :class:`hybridvision.inference.Predictor` does. ``resize=None``: the image's own size.
    """
    height, width = image.shape[-2:]
    size = rescaled_size(height, width, resize)
    out = scores(resize_image(image, size)[None])
    if size != (height, width):
        out = _resize_bilinear(_to_logits(out), (height, width))  # argmax of log-probs = of probs
    return out


def _softmax(x: np.ndarray, axis: int = 1) -> np.ndarray:
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def _resize_bilinear(x: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """(N, K, h, w) -> (N, K, H, W), bilinear, half-pixel centres (``align_corners=False``)."""
    out = x
    for axis, new in ((-2, size[0]), (-1, size[1])):
        old = out.shape[axis]
        if old == new:
            continue
        src = np.clip((np.arange(new) + 0.5) * (old / new) - 0.5, 0, None)
        lo = np.minimum(np.floor(src).astype(np.int64), old - 1)
        hi = np.minimum(lo + 1, old - 1)
        frac = (src - lo).astype(np.float32)
        shape = [1] * out.ndim
        shape[axis] = new
        frac = frac.reshape(shape)
        out = np.take(out, lo, axis=axis) * (1 - frac) + np.take(out, hi, axis=axis) * frac
    return out


def _to_logits(scores: np.ndarray) -> np.ndarray:
    """Scores of :func:`_scores` as logits: K = 1 already are; K >= 2 probabilities -> log."""
    return scores if scores.shape[1] == 1 else np.log(np.maximum(scores, np.finfo(np.float32).tiny))


def _scores(model: Callable, images: np.ndarray, tta_flips: Sequence[str]) -> np.ndarray:
    """Scores averaged over the identity and each flip: probabilities (K >= 2) or logits (K = 1)."""
    total = None
    views = [()] + [_FLIP_AXES[f] for f in tta_flips]
    for axes in views:
        x = np.flip(images, axes) if axes else images
        logits = np.asarray(model(np.ascontiguousarray(x)), dtype=np.float32)
        if logits.shape[-2:] != images.shape[-2:]:
            logits = _resize_bilinear(logits, images.shape[-2:])
        scores = logits if logits.shape[1] == 1 else _softmax(logits)
        scores = np.flip(scores, axes) if axes else scores
        total = scores if total is None else total + scores
    return total / len(views)


def predict_whole(model: Callable, images: np.ndarray, tta_flips: Sequence[str] = ()) -> np.ndarray:
    """Scores (B, K, H, W) of whole images (B, C, H, W): probabilities, or logits for K = 1."""
    return _scores(model, images, tta_flips)


def window_starts(size: int, window: int, stride: int) -> list[int]:
    """Evenly spaced window offsets covering ``[0, size)``, the last flush with the border (nnU-Net)."""
    if size <= window:
        return [0]
    steps = math.ceil((size - window) / stride) + 1
    return [round(i * (size - window) / (steps - 1)) for i in range(steps)]


def gaussian_window(size: tuple[int, int], sigma_scale: float = 0.125) -> np.ndarray:
    """Gaussian importance map (h, w) float32, maximum 1, strictly positive (nnU-Net)."""
    axes = []
    for n in size:
        coords = np.arange(n, dtype=np.float64) - (n - 1) / 2
        sigma = max(n * sigma_scale, 1e-6)
        axes.append(np.exp(-0.5 * (coords / sigma) ** 2))
    weights = axes[0][:, None] * axes[1][None, :]
    weights = weights / weights.max()
    return np.maximum(weights, max(weights[weights > 0].min(), 1e-6)).astype(np.float32)


def predict_sliding_window(
    model: Callable,
    image: np.ndarray,
    window: tuple[int, int],
    overlap: float = 0.25,
    blend: str = "gaussian",
    batch_size: int = 8,
    tta_flips: Sequence[str] = (),
    pad_value: float = IMAGE_PAD_VALUE,
) -> np.ndarray:
    """Sliding-window scores, as ``hybridvision.inference.predict_sliding_window``.

    Args:
        model: callable (N, C, h, w) -> logits (N, K, h', w').
        image: (B, C, H, W) float32.
        window: (h, w) window.
        overlap: fraction of the window shared by neighbours, in [0, 1).
        blend: ``"uniform"`` or ``"gaussian"``.
        batch_size: windows per forward pass.
        tta_flips: flipped views averaged per window.
        pad_value: padding (bottom/right) of images smaller than the window; the default is the
            project's one rule, :data:`IMAGE_PAD_VALUE` (as training crops are padded).

    Returns:
        (B, K, H, W) float32: probabilities (K >= 2) or logits (K = 1).
    """
    if not 0.0 <= overlap < 1.0:
        raise UserError(f"overlap must be in [0, 1), got {overlap}")
    wh, ww = window
    b, _, h, w = image.shape
    padded = np.pad(
        image, ((0, 0), (0, 0), (0, max(wh - h, 0)), (0, max(ww - w, 0))), constant_values=pad_value
    )
    ph, pw = padded.shape[-2:]
    ys = window_starts(ph, wh, max(1, int(wh * (1 - overlap))))
    xs = window_starts(pw, ww, max(1, int(ww * (1 - overlap))))
    tiles = [(i, y, x) for i in range(b) for y, x in itertools.product(ys, xs)]
    weight = gaussian_window((wh, ww)) if blend == "gaussian" else np.ones((wh, ww), np.float32)
    norm = np.zeros((ph, pw), np.float32)
    for y, x in itertools.product(ys, xs):
        norm[y : y + wh, x : x + ww] += weight
    scores = None
    for start in range(0, len(tiles), batch_size):
        chunk = tiles[start : start + batch_size]
        crops = np.stack([padded[i, :, y : y + wh, x : x + ww] for i, y, x in chunk])  # (n, C, wh, ww)
        out = _scores(model, crops, tta_flips)  # (n, K, wh, ww)
        if scores is None:
            scores = np.zeros((b, out.shape[1], ph, pw), np.float32)
        for (i, y, x), tile in zip(chunk, out):
            scores[i, :, y : y + wh, x : x + ww] += tile * weight
    return (scores / norm)[..., :h, :w]


def labels_from_scores(scores: np.ndarray) -> np.ndarray:
    """Hard labels (B, H, W) int64: argmax for K >= 2, logit > 0 for K = 1."""
    return (scores[:, 0] > 0).astype(np.int64) if scores.shape[1] == 1 else scores.argmax(axis=1)


# --------------------------------------------------------------------------- outputs


def _palette(num_colors: int = 256) -> np.ndarray:
    out = np.zeros((num_colors, 3), np.uint8)
    for i in range(num_colors):
        c, r, g, b = i, 0, 0, 0
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        out[i] = (r, g, b)
    return out


_PALETTE = _palette()


def colorize(mask: np.ndarray, ignore_index: int = 255) -> np.ndarray:
    """Class-index mask (H, W) -> RGB (3, H, W) float32 in [0, 1]; ignored pixels are white."""
    rgb = _PALETTE[np.clip(mask, 0, 255)].transpose(2, 0, 1).astype(np.float32) / 255.0
    rgb[:, mask == ignore_index] = 1.0
    return rgb


def overlay(image: np.ndarray, mask: np.ndarray, alpha: float = 0.5, ignore_index: int = 255) -> np.ndarray:
    """Coloured mask blended over a (C, H, W) image (min-max scaled): (H, W, 3) uint8."""
    x = image[:3] if image.shape[0] >= 3 else np.repeat(image[:1], 3, axis=0)
    lo, hi = x.min(), x.max()
    shown = (x - lo) / max(hi - lo, 1e-6)
    vis = (1 - alpha) * shown + alpha * colorize(mask, ignore_index)
    return np.round(vis * 255).clip(0, 255).astype(np.uint8).transpose(1, 2, 0)


def save_mask(labels: np.ndarray, path: str | os.PathLike, num_classes: int) -> None:
    """Write class indices (H, W) as an 8-bit PNG, or 16-bit beyond 255 classes."""
    Image.fromarray(labels.astype(np.uint8 if num_classes <= 255 else np.uint16)).save(path)


def output_stems(files: Sequence[Path], root: Path | None) -> dict[Path, Path]:
    """Output name (without ``_mask.png``) of each input; distinct inputs never share one.

    The name is the path relative to ``root`` (a folder input) without its suffix; where two inputs
    would get the same name (``x.png`` and ``x.jpg``; case-insensitively, for case-insensitive
    filesystems) both keep their extension (``x_png``, ``x_jpg``).

    Raises:
        UserError: if names still clash after that (e.g. ``x.png``, ``x.jpg`` and ``x_jpg.png``).
    """
    rel = {f: (f.relative_to(root) if root is not None else Path(f.name)) for f in files}
    plain = {f: r.with_suffix("") for f, r in rel.items()}
    counts: dict[str, int] = {}
    for stem in plain.values():
        counts[str(stem).lower()] = counts.get(str(stem).lower(), 0) + 1
    stems = {
        f: (
            stem.with_name(f"{stem.name}_{rel[f].suffix.lstrip('.')}")
            if counts[str(stem).lower()] > 1
            else stem
        )
        for f, stem in plain.items()
    }
    seen: dict[str, Path] = {}
    for f, stem in stems.items():
        key = str(stem).lower()
        if key in seen:
            raise UserError(
                f"inputs {seen[key]} and {f} would both write {stem}_mask.png; rename one of them"
            )
        seen[key] = f
    return stems


@dataclass
class PredictResult:
    """What a prediction run did: files written and files that failed (with the reason)."""

    written: list[Path]
    failed: list[tuple[Path, str]]


class OnnxPredictor:
    """Read, normalise, predict and write, with an exported model and no PyTorch.

    Args:
        model: path of ``model.onnx``.
        mode: ``"slide"`` (default, window = the training crop in the metadata) or ``"whole"``.
        window: (h, w) sliding window; None: the training crop.
        overlap: sliding-window overlap fraction.
        blend: ``"gaussian"`` or ``"uniform"``.
        batch_size: windows per forward pass.
        tta_flips: flipped views (``"h"``, ``"v"``, ``"hv"``).
        threads: onnxruntime intra-op threads.
        resize: ``SHORT [MAX_LONG]`` or ``["native"]`` (the ``--resize`` option); None: the training
            scale in the metadata (``resize``), as :class:`hybridvision.inference.Predictor`.
    """

    def __init__(
        self,
        model: str | os.PathLike,
        mode: str = "slide",
        window: tuple[int, int] | None = None,
        overlap: float = 0.25,
        blend: str = "gaussian",
        batch_size: int = 8,
        tta_flips: Sequence[str] = (),
        threads: int | None = None,
        resize: Sequence[str] | None = None,
    ) -> None:
        check_predict_options(mode, window, overlap, batch_size, tta_flips)
        self.segmenter = OnnxSegmenter(model, threads)
        meta = self.segmenter.metadata
        self.metadata = meta
        self.mode, self.overlap, self.blend, self.batch_size = mode, overlap, blend, batch_size
        self.tta_flips = tuple(tta_flips)
        self.window = tuple(window or meta.get("train_crop") or (256, 256))
        fixed = meta.get("input_size")
        if fixed:  # a model built at one input size: windows of that size, whatever was asked
            fixed = tuple(int(v) for v in fixed)
            if mode == "whole" or self.window != fixed:
                logging.getLogger(__name__).info(
                    "%s takes inputs of at most %dx%d: predicting with sliding windows of that size",
                    model,
                    *fixed,
                )
            self.mode, self.window = "slide", fixed
        self.in_chans, self.num_classes = self.segmenter.in_chans, self.segmenter.num_classes
        self.ignore_index = int(meta.get("ignore_index", 255))
        self.normalization = meta["normalization"]
        self.resize = parse_resize(resize, meta.get("resize"))

    def predict_labels(self, image: np.ndarray) -> np.ndarray:
        """Labels (H, W) int64 of one raw image (C, H, W) as read by :func:`read_image`."""

        def scores(x: np.ndarray) -> np.ndarray:
            if self.mode == "whole":
                return predict_whole(self.segmenter, x, self.tta_flips)
            return predict_sliding_window(
                self.segmenter, x, self.window, self.overlap, self.blend, self.batch_size, self.tta_flips
            )

        x = normalize_image(image, self.normalization)
        return labels_from_scores(scores_at_scale(scores, x, self.resize))[0]

    def predict_files(self, files: Sequence[Path], root: Path | None, output: Path) -> PredictResult:
        """Predict every file, writing ``<stem>_mask.png`` and ``<stem>_overlay.png`` under ``output``."""
        return run_over_files(
            files,
            root,
            output,
            lambda p: read_image(p, self.in_chans),
            self.predict_labels,
            self.num_classes,
            self.ignore_index,
        )


def check_predict_options(
    mode: str, window: Sequence[int] | None, overlap: float, batch_size: int, tta_flips: Iterable[str]
) -> None:
    """Raise :class:`UserError` naming the option at fault."""
    if mode not in ("slide", "whole"):
        raise UserError(f"--mode must be slide or whole, got {mode!r}")
    if window is not None and (len(window) != 2 or min(window) < 1):
        raise UserError(f"--window must be two positive sizes H W, got {' '.join(map(str, window))}")
    if not 0.0 <= overlap < 1.0:
        raise UserError(f"--overlap must be in [0, 1), got {overlap}")
    if batch_size < 1:
        raise UserError(f"--batch-size must be >= 1, got {batch_size}")
    bad = [f for f in tta_flips if f not in _FLIP_AXES]
    if bad:
        raise UserError(f"--tta flips {bad} unknown; valid: {', '.join(_FLIP_AXES)}")


def resolve_inputs(src: Path) -> tuple[list[Path], Path | None]:
    """Files to predict and the root their output names are relative to (None for one file)."""
    if src.is_dir():
        files = list_images(src)
        if not files:
            raise UserError(f"no image ({', '.join(IMAGE_EXTENSIONS)}) found under --input {src}")
        return files, src
    if src.is_file():
        return [src], None
    raise UserError(f"--input {src} does not exist")


def run_over_files(
    files: Sequence[Path],
    root: Path | None,
    output: Path,
    read: Callable[[Path], np.ndarray],
    predict: Callable[[np.ndarray], np.ndarray],
    num_classes: int,
    ignore_index: int,
    progress: Callable[[Iterable], Iterable] = lambda it: it,
) -> PredictResult:
    """The loop shared by both predictors: an unreadable image is reported and skipped, never fatal.

    Args:
        read: path -> raw image (C, H, W) float32; raises ``OSError``/``ValueError`` if unreadable.
        predict: raw image -> labels (H, W).
    """
    stems = output_stems(files, root)  # raises before anything is written
    output.mkdir(parents=True, exist_ok=True)
    result = PredictResult([], [])
    for path in progress(files):
        try:
            image = read(path)
        except (OSError, ValueError) as exc:
            reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            sys.stderr.write(f"warning: skipped {path}: {reason}\n")
            result.failed.append((path, reason))
            continue
        labels = np.asarray(predict(image))
        target = output / stems[path]
        target.parent.mkdir(parents=True, exist_ok=True)
        save_mask(labels, f"{target}_mask.png", num_classes)
        Image.fromarray(overlay(np.asarray(image), labels, ignore_index=ignore_index)).save(
            f"{target}_overlay.png"
        )
        result.written.append(Path(f"{target}_mask.png"))
    return result


def report_result(result: PredictResult, output: Path) -> int:
    """Print the summary; 0 if every image was written, 1 (listing them) if some failed."""
    print(f"wrote {len(result.written)} masks and overlays to {output}{os.sep}")
    if result.failed:
        sys.stderr.write(
            f"error: {len(result.failed)} image(s) could not be read: "
            + ", ".join(str(p) for p, _ in result.failed)
            + "\n"
        )
        return 1
    return 0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="model.onnx written by distill/export.py")
    p.add_argument("--input", required=True, help="an image file or a folder of images (recursive)")
    p.add_argument("--output", required=True, help="output folder")
    p.add_argument("--mode", choices=["slide", "whole"], default="slide")
    p.add_argument("--window", type=int, nargs=2, default=None, help="window H W (default: training crop)")
    p.add_argument("--overlap", type=float, default=0.25)
    p.add_argument(
        "--resize", nargs="+", default=None, metavar="SIDE",
        help="scale: SHORT [MAX_LONG] pixels or 'native' (default: the training scale in the metadata)",
    )  # fmt: skip
    p.add_argument("--tta", nargs="*", default=[], choices=["h", "v", "hv"])
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--threads", type=int, default=None, help="onnxruntime intra-op threads")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """CLI entry point: exit 0 (all written), 1 (some images unreadable), 2 (user error)."""
    try:
        args = parse_args(argv)
        predictor = OnnxPredictor(
            args.model,
            args.mode,
            args.window,
            args.overlap,
            "gaussian",
            args.batch_size,
            args.tta,
            args.threads,
            resize=args.resize,
        )
        files, root = resolve_inputs(Path(args.input))
        return report_result(predictor.predict_files(files, root, Path(args.output)), Path(args.output))
    except UserError as exc:
        if os.environ.get("HYBRIDVISION_DEBUG") == "1":
            raise
        sys.stderr.write(f"error: {exc}\n")
        return 2


if __name__ == "__main__":
    sys.exit(main())
