"""Export a segmenter to ONNX for edge deployment (onnxruntime), optionally also as static int8.

    python distill/export.py --model runs/distill/model --output runs/distill/model.onnx
    python distill/export.py --model runs/finetune/model --output out/model.onnx \\
        --int8 --calibration ../shared/data/camvid/images/train --calibration-count 32

``--model`` is any ``from_pretrained`` segmenter directory (finetune's or distill's ``model/``).
The ONNX graph has dynamic batch, height and width, is checked with ``onnx.checker`` and against
PyTorch at a size that is not a multiple of the size divisor, and records class names, input
normalisation, channels, size divisor and training crop; ``finetune/predict.py --model X.onnx``
(or ``python -m hybridvision.deploy.runtime``) runs it without PyTorch. ``--int8`` adds
``<output>.int8.onnx`` (QDQ, per-channel weights) calibrated on N images of ``--calibration``,
normalised as the model expects, and prints how often it agrees with fp32 on them.

Exit status 2 with a one-line message for user errors (``HYBRIDVISION_DEBUG=1``: traceback).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hybridvision.deploy.runtime import (  # noqa: E402
    OnnxSegmenter,
    UserError,
    labels_from_scores,
    normalization_spec,
    normalize_image,
    predict_whole,
    read_image,
    resolve_inputs,
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="segmenter directory (from_pretrained)")
    p.add_argument("--output", required=True, help="output .onnx file")
    p.add_argument("--opset", type=int, default=18, help="ONNX opset (>= 17; TransUNet needs 18)")
    p.add_argument("--train-crop", type=int, nargs=2, default=None, help="H W (default: data.image_size)")
    p.add_argument("--int8", action="store_true", help="also write <output>.int8.onnx (static quantization)")
    p.add_argument("--calibration", default=None, help="image file or folder for int8 calibration")
    p.add_argument("--calibration-count", type=int, default=32, help="calibration images used (N)")
    return p.parse_args(argv)


def int8_path(output: Path) -> Path:
    """``model.onnx`` -> ``model.int8.onnx``."""
    return output.with_name(output.stem + ".int8" + output.suffix)


def export_from_dir(
    model_dir: str,
    output: Path,
    opset: int = 18,
    train_crop: tuple[int, int] | None = None,
    int8: bool = False,
    calibration: str | None = None,
    calibration_count: int = 32,
) -> dict:
    """Export (and quantize); returns a summary dict. Raises :class:`UserError` for user errors."""
    from hybridvision.export import ExportError, export_onnx, quantize_int8
    from hybridvision.models import Segmenter, from_pretrained

    if output.suffix.lower() != ".onnx":
        raise UserError(f"--output {output} must end in .onnx")
    if int8 and not calibration:
        raise UserError("--int8 needs --calibration IMAGES (a folder or file of training images)")
    if calibration_count < 1:
        raise UserError(f"--calibration-count must be >= 1, got {calibration_count}")
    path = Path(model_dir)
    if not (path / "config.json").is_file():
        raise UserError(f"--model {model_dir} is not a model directory (no config.json there)")
    try:
        model = from_pretrained(model_dir)
    except Exception as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(
            f"cannot load {path / 'model.safetensors'}: {reason}; copy or export it again"
        ) from exc
    if not isinstance(model, Segmenter):
        raise UserError(f"--model {model_dir} holds an encoder, not a segmentation model")
    data = model.pretrained_config.get("extra", {}).get("run_config", {}).get("data", {})
    crop = tuple(train_crop or data.get("image_size") or (256, 256))
    try:
        onnx_path = export_onnx(model, output, train_crop=crop, data_cfg=data, opset=opset)
    except ExportError as exc:
        raise UserError(str(exc)) from exc
    summary = {"onnx": str(onnx_path), "onnx_mb": onnx_path.stat().st_size / 2**20, "train_crop": list(crop)}
    if int8:
        files, _ = resolve_inputs(Path(calibration))
        in_chans = int(model.build_kwargs["in_chans"])
        spec = normalization_spec(data, in_chans)
        images = []
        for f in files[:calibration_count]:
            try:
                images.append(normalize_image(read_image(f, in_chans), spec))
            except (OSError, ValueError) as exc:
                sys.stderr.write(f"warning: calibration image {f} skipped: {exc}\n")
        if not images:
            raise UserError(f"no readable calibration image under --calibration {calibration}")
        q_path = quantize_int8(onnx_path, int8_path(output), images)
        fp32, q = OnnxSegmenter(onnx_path), OnnxSegmenter(q_path)
        agree = [
            float(
                (
                    labels_from_scores(predict_whole(fp32, x[None]))
                    == labels_from_scores(predict_whole(q, x[None]))
                ).mean()
            )
            for x in images
        ]
        summary.update(
            int8=str(q_path),
            int8_mb=q_path.stat().st_size / 2**20,
            calibration_images=len(images),
            int8_fp32_pixel_agreement=sum(agree) / len(agree),
        )
    return summary


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        summary = export_from_dir(
            args.model,
            Path(args.output),
            opset=args.opset,
            train_crop=tuple(args.train_crop) if args.train_crop else None,
            int8=args.int8,
            calibration=args.calibration,
            calibration_count=args.calibration_count,
        )
    except UserError as exc:
        if os.environ.get("HYBRIDVISION_DEBUG") == "1":
            raise
        sys.stderr.write(f"error: {exc}\n")
        return 2
    print(f"wrote {summary['onnx']} ({summary['onnx_mb']:.2f} MB, checked against PyTorch)")
    if "int8" in summary:
        print(
            f"wrote {summary['int8']} ({summary['int8_mb']:.2f} MB); int8 agrees with fp32 on "
            f"{100 * summary['int8_fp32_pixel_agreement']:.2f}% of pixels of {summary['calibration_images']} "
            "calibration images (measure accuracy on held-out data: see deployment_report)"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
