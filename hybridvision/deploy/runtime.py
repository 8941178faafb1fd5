"""PyTorch-free segmentation with an exported model: numpy, Pillow and onnxruntime or OpenVINO only.

(ExecuTorch ``.pte`` models run through the same predictor, with PyTorch tensors: see the end.)

The edge-device counterpart of :mod:`hybridvision.inference`: it normalises images read by the
project's one reader (:mod:`hybridvision.deploy.reader`) as recorded in the model's metadata
(written by :func:`hybridvision.export.export_onnx`; :mod:`hybridvision.deploy.normalization`), and runs whole-image or sliding-window
inference with the same scale, window placement and blending (:mod:`hybridvision.geometry`;
uniform or Gaussian, scores averaged in probability space for K >= 2 and in logit space for K = 1,
optional flip TTA). :class:`OnnxPredictor` writes ``<id>_mask.png`` / ``<id>_overlay.png``
(:mod:`hybridvision.deploy.files`); the command line is :mod:`hybridvision.deploy.cli`::

    python -m hybridvision.deploy --model model.onnx --input images/ --output out/
    python -m hybridvision.deploy --model model.xml --input images/ --output out/
    python -m hybridvision.deploy --model model.pte --input images/ --output out/

The predictor runs any *segmenter*: a callable ``(N, C, H, W) float32 -> logits (N, K, H, W)``
with ``metadata``, ``in_chans`` and ``num_classes`` attributes. :func:`load_segmenter` picks one
by the file: ``.xml`` an OpenVINO IR (:class:`~hybridvision.deploy.openvino_runtime.OpenVinoSegmenter`),
``.pte`` an ExecuTorch program (:class:`~hybridvision.deploy.executorch_runtime.ExecuTorchSegmenter`),
anything else ONNX on onnxruntime (:class:`OnnxSegmenter`).

Nothing here imports ``torch`` (a test runs this module with ``torch`` made unimportable); running a
``.pte`` does, inside ExecuTorch's Python runtime (see :mod:`~hybridvision.deploy.executorch_runtime`).
"""

from __future__ import annotations

import json
import logging
import os
import sys
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, cast

import numpy as np
from PIL import Image

from ..geometry import (
    FLIP_AXES,
    IMAGE_PAD_VALUE,
    Scale,
    gaussian_window,
    rescaled_size,
    window_positions,
    window_starts,
)
from .errors import UserError
from .files import PredictResult, resolve_inputs, run_over_files
from .normalization import IMAGENET_MEAN, IMAGENET_STD, normalization_spec, normalize_image
from .reader import read_image

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "METADATA_KEY",
    "OnnxPredictor",
    "OnnxSegmenter",
    "OPENVINO_SUFFIX",
    "EXECUTORCH_SUFFIX",
    "check_predict_options",
    "forward_any_size",
    "largest_input",
    "is_exported_model",
    "labels_from_scores",
    "load_segmenter",
    "normalization_spec",
    "normalize_image",
    "parse_resize",
    "predict_sliding_window",
    "predict_whole",
    "read_metadata",
    "resize_image",
    "scores_at_scale",
    # importable from here as before the split (distill/export.py, tests/test_export.py and
    # tests/test_int8.py import them so); their homes: errors, reader, files, geometry and
    # normalization (IMAGENET_MEAN/STD, normalization_spec and normalize_image above)
    "IMAGE_PAD_VALUE",
    "UserError",
    "read_image",
    "rescaled_size",
    "resolve_inputs",
    "window_starts",
]

#: ``metadata_props`` key of the ONNX model holding the deployment metadata as JSON
METADATA_KEY = "hybridvision"
#: suffix of an OpenVINO IR (``model.xml`` + ``model.bin``); every other exported model is ONNX
OPENVINO_SUFFIX = ".xml"
#: suffix of an ExecuTorch program (``model.pte`` + its metadata ``model.pte.json``)
EXECUTORCH_SUFFIX = ".pte"


# --------------------------------------------------------------------------- model


def read_metadata(model: str | os.PathLike | Any) -> dict[str, Any]:
    """The deployment metadata of an exported model.

    Args:
        model: a path (``.onnx``, ``.xml`` for OpenVINO or ``.pte`` for ExecuTorch), an
            ``onnx.ModelProto`` or an onnxruntime session.
    """
    if isinstance(model, (str, os.PathLike)):
        if Path(model).suffix.lower() == OPENVINO_SUFFIX:
            from .openvino_runtime import read_ir_metadata

            return read_ir_metadata(model)
        if Path(model).suffix.lower() == EXECUTORCH_SUFFIX:
            from .executorch_runtime import read_pte_metadata

            return read_pte_metadata(model)
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
        """Logits (N, K, H, W) of ``images`` (N, C, H, W)."""
        if images.ndim != 4 or images.shape[1] != self.in_chans:
            raise ValueError(f"expected (N, {self.in_chans}, H, W) images, got shape {images.shape}")
        return self.session.run(None, {self.input_name: np.ascontiguousarray(images, dtype=np.float32)})[0]


def is_exported_model(path: str | os.PathLike) -> bool:
    """Whether ``path`` names an exported model file (``.onnx``, OpenVINO ``.xml``, ExecuTorch ``.pte``)."""
    return Path(path).suffix.lower() in (".onnx", OPENVINO_SUFFIX, EXECUTORCH_SUFFIX)


def load_segmenter(path: str | os.PathLike, threads: int | None = None, bf16: bool = False) -> Any:
    """The segmenter of an exported model file: OpenVINO for ``.xml``, ExecuTorch for ``.pte``, else onnxruntime.

    Args:
        path: ``model.onnx``, ``model.xml`` or ``model.pte``.
        threads: intra-op threads (None: the runtime's default).
        bf16: OpenVINO's bf16 inference precision (``.xml`` only; fp32 otherwise).

    Raises:
        UserError: missing or unreadable file, missing runtime (naming the extra to install), or
            ``bf16`` asked of an ONNX or ExecuTorch model.
    """
    if Path(path).suffix.lower() == OPENVINO_SUFFIX:
        from .openvino_runtime import OpenVinoSegmenter

        return OpenVinoSegmenter(path, threads, bf16=bf16)
    if bf16:
        raise UserError(f"--bf16 runs PyTorch and OpenVINO (.xml) models; {Path(path).name} runs in fp32")
    if Path(path).suffix.lower() == EXECUTORCH_SUFFIX:
        from .executorch_runtime import ExecuTorchSegmenter

        return ExecuTorchSegmenter(path, threads)
    return OnnxSegmenter(path, threads)


def parse_resize(option: Sequence[str] | None, recorded: Any = None) -> Scale | None:
    """The prediction scale: ``--resize`` if given, else the model's recorded ``data.resize``.

    Args:
        option: ``--resize`` (``SHORT [MAX_LONG]`` or ``native``).
        recorded: the model's recorded ``data.resize`` (a list, ``"native"`` or absent).

    Returns:
        The scale, or None: native size.
    """
    try:
        return Scale.parse(option) if option else Scale.parse(recorded or None)
    except ValueError as err:
        where = f"--resize {' '.join(map(str, option))}" if option else "the model's recorded resize"
        raise UserError(f"{where}: {err}") from None


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
                (size[1], size[0]), Image.Resampling.BILINEAR
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
    views = [()] + [FLIP_AXES[f] for f in tta_flips]
    for axes in views:
        x = np.flip(images, axes) if axes else images
        logits = np.asarray(model(np.ascontiguousarray(x)), dtype=np.float32)
        if logits.shape[-2:] != images.shape[-2:]:
            logits = _resize_bilinear(logits, images.shape[-2:])
        scores = logits if logits.shape[1] == 1 else _softmax(logits)
        scores = np.flip(scores, axes) if axes else scores
        total = scores if total is None else total + scores
    assert total is not None  # views holds at least the image itself
    return total / len(views)


def predict_whole(model: Callable, images: np.ndarray, tta_flips: Sequence[str] = ()) -> np.ndarray:
    """Scores (B, K, H, W) of whole images (B, C, H, W): probabilities, or logits for K = 1."""
    return _scores(model, images, tta_flips)


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
    positions = window_positions(h, w, window, overlap)
    tiles = [(i, y, x) for i in range(b) for y, x in positions]
    weight = gaussian_window((wh, ww)) if blend == "gaussian" else np.ones((wh, ww), np.float32)
    norm = np.zeros((ph, pw), np.float32)
    for y, x in positions:
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
    assert scores is not None  # every image has at least one window
    return (scores / norm)[..., :h, :w]


def largest_input(metadata: dict[str, Any]) -> tuple[int, int] | None:
    """The largest (H, W) a model takes: its fixed ``input_size``, an ExecuTorch program's bound, or None."""
    size = metadata.get("input_size") or (metadata.get("executorch") or {}).get("max_input_size")
    return (int(size[0]), int(size[1])) if size else None


def forward_any_size(segmenter: Any, images: np.ndarray) -> np.ndarray:
    """Scores (N, K, H, W) of ``images`` of any size: the model's logits, or windows beyond its largest input.

    Images larger than :func:`largest_input` are predicted in Gaussian-blended windows of that size
    (probabilities for K >= 2, as :func:`predict_sliding_window`). What the deployment report times
    and measures as a model's full-image forward.
    """
    largest = largest_input(segmenter.metadata)
    if largest and (images.shape[-2] > largest[0] or images.shape[-1] > largest[1]):
        return predict_sliding_window(segmenter, images, largest, blend="gaussian")
    return segmenter(images)


def labels_from_scores(scores: np.ndarray) -> np.ndarray:
    """Hard labels (B, H, W) int64: argmax for K >= 2, logit > 0 for K = 1."""
    return (scores[:, 0] > 0).astype(np.int64) if scores.shape[1] == 1 else scores.argmax(axis=1)


class OnnxPredictor:
    """Read, normalise, predict and write, with an exported model and no PyTorch.

    The runtime is the segmenter's (onnxruntime for ``.onnx``, OpenVINO for ``.xml``, ExecuTorch
    for ``.pte``); scale, windows, blending and TTA are the same code for every runtime.

    Args:
        model: path of ``model.onnx``, ``model.xml`` or ``model.pte`` (:func:`load_segmenter`), or a segmenter
            (callable images -> logits with ``metadata``, ``in_chans``, ``num_classes``).
        mode: ``"slide"`` (default, window = the training crop in the metadata) or ``"whole"``.
        window: (h, w) sliding window; None: the training crop.
        overlap: sliding-window overlap fraction.
        blend: ``"gaussian"`` or ``"uniform"``.
        batch_size: windows per forward pass.
        tta_flips: flipped views (``"h"``, ``"v"``, ``"hv"``).
        threads: runtime intra-op threads (a path ``model`` only).
        resize: ``SHORT [MAX_LONG]`` or ``["native"]`` (the ``--resize`` option); None: the training
            scale in the metadata (``resize``), as :class:`hybridvision.inference.Predictor`.
        bf16: OpenVINO's bf16 inference precision (a ``.xml`` path only).
    """

    def __init__(
        self,
        model: str | os.PathLike | Any,
        mode: str = "slide",
        window: tuple[int, int] | None = None,
        overlap: float = 0.25,
        blend: str = "gaussian",
        batch_size: int = 8,
        tta_flips: Sequence[str] = (),
        threads: int | None = None,
        resize: Sequence[str] | None = None,
        bf16: bool = False,
    ) -> None:
        check_predict_options(mode, window, overlap, batch_size, tta_flips)
        exported = isinstance(model, (str, os.PathLike))
        # a segmenter (OnnxSegmenter, OpenVinoSegmenter, ExecuTorchSegmenter) or any callable with their attributes
        self.segmenter: Any = load_segmenter(model, threads, bf16) if exported else cast(Any, model)
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
                    model if exported else type(model).__name__,
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
    bad = [f for f in tta_flips if f not in FLIP_AXES]
    if bad:
        raise UserError(f"--tta flips {bad} unknown; valid: {', '.join(FLIP_AXES)}")


if __name__ == "__main__":  # the command line before it moved: python -m hybridvision.deploy.runtime
    from .cli import main

    sys.exit(main(prog="python -m hybridvision.deploy.runtime"))
