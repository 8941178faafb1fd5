"""The one command line for prediction: ``python -m hybridvision.deploy`` and ``finetune/predict.py``.

``python -m hybridvision.deploy`` runs exported models without PyTorch (``.onnx`` on onnxruntime,
OpenVINO ``.xml`` on OpenVINO: the file decides; an ExecuTorch ``.pte`` on ExecuTorch, whose Python
runtime takes PyTorch tensors); ``finetune/predict.py`` is the same command with a
:class:`Backend` that adds PyTorch model directories. Options, input checks, the loop over files, the summary and the exit status live here
once; what the command writes is :data:`HELP`.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np

from .errors import UserError
from .files import PredictResult, resolve_inputs, run_over_files
from .runtime import OnnxPredictor, check_predict_options, is_exported_model

__all__ = ["HELP", "ONNX_USAGE", "Backend", "build_parser", "main", "progress", "report_result", "run"]

#: ``--help`` of ``python -m hybridvision.deploy`` (exported models only)
ONNX_USAGE = """Predict segmentation masks for images with an exported model (ONNX, OpenVINO or ExecuTorch).

    python -m hybridvision.deploy --model model.onnx --input image_or_folder --output out/
    python -m hybridvision.deploy --model model.xml --input image_or_folder --output out/
    python -m hybridvision.deploy --model model.pte --input image_or_folder --output out/
"""

#: what the command writes and its exit status, the end of every ``--help``
HELP = """\
Writes, per input image, ``<id>_mask.png`` (class indices at the image's size as displayed: a
photo's EXIF orientation is applied, as in training; 8-bit, or 16-bit when there are more than
255 classes) and ``<id>_overlay.png`` (coloured classes over the image). ``<id>`` is the image's
path relative to ``--input`` without its extension; where two inputs would share it (``x.png``
and ``x.jpg``) both keep their extension (``x_png``, ``x_jpg``). Images of any size are handled
by the sliding window (default window: the training crop size recorded in the model), at the
training scale recorded in the model (``data.resize``; the prediction is resized back to the
image's size), or at ``--resize``. A ``.onnx`` model runs on onnxruntime and an OpenVINO ``.xml``
(``.bin`` beside it) on OpenVINO, both without PyTorch (``hybridvision.deploy.runtime``; OpenVINO:
``pip install -e ".[openvino]"``); an ExecuTorch ``.pte`` (``.pte.json`` beside it) on ExecuTorch's
XNNPACK backend (``pip install -e ".[executorch]"``; its Python runtime needs torch installed),
normalised as recorded in the model's metadata.

Exit status: 0 when every image was written; 1 when some images could not be read (each is
reported, the others are still written, the list is printed at the end); 2 for a user error (one
line naming the file or value; ``HYBRIDVISION_DEBUG=1`` shows the traceback).
"""


class Backend(NamedTuple):
    """How a model that is not an exported file (``.onnx``, ``.xml``, ``.pte``) reads and predicts one image.

    ``finetune/predict.py`` builds one for a PyTorch model directory (or hub id).
    """

    #: path -> raw image (C, H, W) float32; raises ``OSError``/``ValueError`` if unreadable
    read: Callable[[Path], np.ndarray]
    #: raw image (C, H, W) -> labels (H, W)
    predict: Callable[[np.ndarray], np.ndarray]
    #: K, for the mask file's bit depth
    num_classes: int
    #: label drawn white in the overlay
    ignore_index: int


#: builds the :class:`Backend` of a ``--model`` that is not an exported file from the parsed arguments
BackendFactory = Callable[[argparse.Namespace], Backend]


def build_parser(
    usage: str = ONNX_USAGE, torch_models: bool = False, prog: str | None = None
) -> argparse.ArgumentParser:
    """The options of the command; ``torch_models`` adds ``--device``.

    Args:
        usage: what ``--help`` says first (a summary and example command lines); :data:`HELP`
            follows it.
        torch_models: whether ``--model`` may also be a PyTorch model directory.
        prog: the command's name in ``--help`` (default: the script's file name).
    """
    p = argparse.ArgumentParser(
        prog=prog,
        description=f"{usage.rstrip()}\n\n{HELP}",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--model",
        required=True,
        help="model directory written by finetune/run.py (or a hub id), or a .onnx / OpenVINO .xml / "
        "ExecuTorch .pte file"
        if torch_models
        else "model.onnx, OpenVINO model.xml or ExecuTorch model.pte written by distill/export.py",
    )
    p.add_argument(
        "--input", required=True, help="an image file or a folder of images (searched recursively)"
    )
    p.add_argument("--output", required=True, help="output folder")
    p.add_argument(
        "--mode", choices=["slide", "whole"], default="slide", help="sliding window or whole image"
    )
    p.add_argument("--window", type=int, nargs=2, default=None, help="window H W (default: training crop)")
    p.add_argument(
        "--resize",
        nargs="+",
        default=None,
        metavar="SIDE",
        help="scale to predict at: SHORT [MAX_LONG] pixels or 'native' (default: the model's training "
        "scale, data.resize)",
    )
    p.add_argument("--overlap", type=float, default=0.25, help="sliding-window overlap fraction")
    p.add_argument(
        "--tta", nargs="*", default=[], choices=["h", "v", "hv"], help="flip test-time augmentation"
    )
    p.add_argument("--batch-size", type=int, default=8, help="windows per forward pass")
    if torch_models:
        p.add_argument("--device", default=None, help="PyTorch device (default: cuda if available, else cpu)")
    p.add_argument(
        "--bf16",
        action="store_true",
        help="bf16: autocast for PyTorch models, inference precision for OpenVINO .xml models "
        "(default fp32, which OpenVINO otherwise drops for bf16 on AMX / AVX-512 BF16 CPUs)",
    )
    p.add_argument(
        "--threads", type=int, default=None, help="runtime intra-op threads (.onnx, .xml and .pte models)"
    )
    return p


def run(args: argparse.Namespace, backend: BackendFactory | None = None) -> int:
    """Check the options and inputs, predict every image, print the summary; the exit status.

    Args:
        args: parsed :func:`build_parser` options.
        backend: for a ``--model`` that is not an exported file (None: every model is one; a
            ``.xml`` runs on OpenVINO, a ``.pte`` on ExecuTorch, anything else on onnxruntime).

    Raises:
        UserError: naming the option, file or model at fault.
    """
    check_predict_options(args.mode, args.window, args.overlap, args.batch_size, args.tta)
    files, root = resolve_inputs(Path(args.input))  # before loading the model: fail fast
    out = Path(args.output)
    if out.exists() and not out.is_dir():
        raise UserError(f"--output {out} is a file; give a folder")
    if backend is None or is_exported_model(args.model):
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
            bf16=args.bf16,
        )
        result = predictor.predict_files(files, root, out)
    else:
        read, predict, num_classes, ignore = backend(args)
        result = run_over_files(files, root, out, read, predict, num_classes, ignore, progress=progress)
    return report_result(result, out)


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


def progress(files: Sequence[Path]) -> Iterator[Path]:
    """``files``, with a tqdm bar on stderr where it is a terminal.

    Elsewhere (a log file, CI, a scheduler) a plain line every ~10 % of the images instead of the bar's carriage-return frames.
    """
    if _stderr_is_terminal():
        from tqdm.auto import tqdm

        yield from tqdm(files, desc="predict", dynamic_ncols=True)
        return
    total = len(files)
    every = max(1, math.ceil(total / 10))
    start = time.perf_counter()
    for done, path in enumerate(files, start=1):
        yield path  # resumed once the caller has written this image
        if done % every == 0 or done == total:
            rate = done / max(time.perf_counter() - start, 1e-9)
            sys.stderr.write(
                f"predict {done}/{total} images, {rate:.2f} img/s, ETA {(total - done) / rate:.0f} s\n"
            )
            sys.stderr.flush()


def _stderr_is_terminal() -> bool:
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):  # replaced or closed stream
        return False


def main(
    argv: list[str] | None = None,
    *,
    usage: str = ONNX_USAGE,
    backend: BackendFactory | None = None,
    prog: str | None = None,
) -> int:
    """Entry point: exit 0 (all written), 1 (some images unreadable), 2 (user error).

    Args:
        argv: command-line arguments (default: ``sys.argv[1:]``).
        usage: the start of ``--help`` (see :func:`build_parser`).
        backend: adds models that are not exported files (and ``--device``).
        prog: the command's name in ``--help`` and usage errors.
    """
    args = build_parser(usage, torch_models=backend is not None, prog=prog).parse_args(argv)
    try:
        return run(args, backend)
    except UserError as exc:
        if os.environ.get("HYBRIDVISION_DEBUG") == "1":
            raise
        sys.stderr.write(f"error: {exc}\n")
        return 2


if __name__ == "__main__":
    sys.exit(main(prog="python -m hybridvision.deploy.cli"))
