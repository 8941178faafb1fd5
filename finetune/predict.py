"""Predict segmentation masks for images with a fine-tuned model (PyTorch) or an exported one (ONNX).

    python finetune/predict.py --model runs/finetune/model --input image_or_folder --output out/
    python finetune/predict.py --model runs/distill/model.onnx --input images/ --output out/

Writes, per input image, ``<id>_mask.png`` (class indices at the image's size as displayed: a
photo's EXIF orientation is applied, as in training; 8-bit, or 16-bit when there are more than
255 classes) and ``<id>_overlay.png`` (coloured classes over
the image). ``<id>`` is the image's path relative to ``--input`` without its extension; where two
inputs would share it (``x.png`` and ``x.jpg``) both keep their extension (``x_png``, ``x_jpg``).
Images of any size are handled by the sliding window (default window: the training crop size
recorded in the model), at the training scale recorded in the model (``data.resize``; the
prediction is resized back to the image's size), or at ``--resize``. A ``.onnx`` model runs on onnxruntime without PyTorch
(``hybridvision.deploy.runtime``), normalised as recorded in its metadata.

Exit status: 0 when every image was written; 1 when some images could not be read (each is
reported, the others are still written, the list is printed at the end); 2 for a user error (one
line naming the file or value; ``HYBRIDVISION_DEBUG=1`` shows the traceback).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

from hybridvision.deploy.runtime import (  # noqa: E402
    OnnxPredictor,
    UserError,
    check_predict_options,
    normalization_spec,
    parse_resize,
    report_result,
    resolve_inputs,
    run_over_files,
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--model",
        required=True,
        help="model directory written by finetune/run.py (or a hub id), or a .onnx file",
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
    p.add_argument("--device", default=None, help="PyTorch device (default: cuda if available, else cpu)")
    p.add_argument("--bf16", action="store_true", help="bf16 autocast (PyTorch models)")
    p.add_argument("--threads", type=int, default=None, help="onnxruntime intra-op threads (.onnx models)")
    return p.parse_args(argv)


def _load_torch_model(spec: str):
    """The segmenter at ``spec`` (directory or hub id); every failure is a one-line UserError."""
    from hybridvision.models import Segmenter, from_pretrained

    path = Path(spec)
    if not path.exists() and (spec.startswith((".", "/", "~")) or spec.count("/") != 1):
        raise UserError(
            f"--model {spec} does not exist (give a model directory, a hub id owner/name or a .onnx file)"
        )
    try:
        model = from_pretrained(spec)
    except (ValueError, OSError) as exc:  # hub.py's messages already name the file and the fix
        raise UserError(str(exc).strip().splitlines()[0]) from exc
    except Exception as exc:  # anything else from safetensors / the hub client: still one line
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"cannot load the model from {spec}: {reason}; copy or export it again") from exc
    if not isinstance(model, Segmenter):
        raise UserError(f"--model {spec} holds an encoder, not a segmentation model")
    return model


def _torch_predictor(args: argparse.Namespace):
    """(read, predict, num_classes, ignore_index) for a PyTorch model directory."""
    import torch

    from hybridvision.data.io import apply_transform, read_image
    from hybridvision.data.transforms import build_seg_transforms
    from hybridvision.inference import Predictor

    model = _load_torch_model(args.model)
    run = model.pretrained_config.get("extra", {}).get("run_config", {})
    data = run.get("data", {})
    in_chans = model.build_kwargs["in_chans"]
    ignore = data.get("ignore_index", 255)
    window = tuple(args.window or data.get("image_size") or (256, 256))
    spec = normalization_spec(data, in_chans)
    normalize = (spec["mean"], spec["std"]) if spec["kind"] == "mean_std" else spec["kind"]
    tf = build_seg_transforms(
        False, None, in_chans=in_chans, normalize=normalize, window=spec["window"], ignore_index=ignore
    )
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        model.to(device).eval()
    except (RuntimeError, ValueError) as exc:
        raise UserError(f"--device {device}: {str(exc).splitlines()[0]}") from exc
    predictor = Predictor(
        model,
        mode=args.mode,
        num_classes=model.num_classes,
        window=window if args.mode == "slide" else None,
        overlap=args.overlap,
        blend="gaussian",
        batch_size=args.batch_size,
        tta_flips=args.tta,
        output="logits",
        resize=parse_resize(args.resize, data.get("resize")),
    )

    def read(path: Path) -> np.ndarray:
        return read_image(path, in_chans).numpy()  # (C, H, W) as displayed (EXIF orientation)

    def predict(image: np.ndarray) -> np.ndarray:
        # apply_transform wraps the image as a tv_tensors.Image: Window and PerImageNormalize only
        # transform those (a plain tensor passed through them unchanged before)
        x = apply_transform({"image": torch.from_numpy(image)}, tf)["image"]
        with (
            torch.no_grad(),
            torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=args.bf16),
        ):
            return predictor.predict_labels(torch.as_tensor(x)[None].to(device))[0].cpu().numpy()

    return read, predict, model.num_classes, ignore


def run(args: argparse.Namespace) -> int:
    check_predict_options(args.mode, args.window, args.overlap, args.batch_size, args.tta)
    files, root = resolve_inputs(Path(args.input))  # before loading the model: fail fast
    out = Path(args.output)
    if out.exists() and not out.is_dir():
        raise UserError(f"--output {out} is a file; give a folder")
    if args.model.lower().endswith(".onnx"):
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
        result = predictor.predict_files(files, root, out)
    else:
        read, predict, num_classes, ignore = _torch_predictor(args)
        result = run_over_files(files, root, out, read, predict, num_classes, ignore, progress=progress)
    return report_result(result, out)


def progress(files: Sequence[Path]) -> Iterator[Path]:
    """``files``, with a tqdm bar on stderr where it is a terminal; elsewhere (a log file, CI, a
    scheduler) a plain line every ~10 % of the images instead of the bar's carriage-return frames."""
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


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        return run(args)
    except UserError as exc:
        if os.environ.get("HYBRIDVISION_DEBUG") == "1":
            raise
        sys.stderr.write(f"error: {exc}\n")
        return 2


if __name__ == "__main__":
    sys.exit(main())
