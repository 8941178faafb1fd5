"""Export a segmenter for edge deployment: ONNX (onnxruntime), OpenVINO IR and ExecuTorch, optionally also int8.

    python distill/export.py --model runs/distill/model --output runs/distill/model.onnx
    python distill/export.py --model runs/finetune/model --output out/model.onnx \\
        --int8 --calibration ../shared/data/camvid/images/train --calibration-count 32
    python distill/export.py --model runs/distill/model --output out/model.onnx --targets onnx openvino
    python distill/export.py --model runs/distill/model --output out/model.onnx --targets executorch

``--model`` is any ``from_pretrained`` segmenter directory (finetune's or distill's ``model/``).
The ONNX graph has dynamic batch, height and width, is checked with ``onnx.checker`` and against
PyTorch at a size that is not a multiple of the size divisor, and records class names, input
normalisation, channels, size divisor and training crop; ``finetune/predict.py --model X.onnx``
(or ``python -m hybridvision.deploy.runtime``) runs it without PyTorch. ``--int8`` adds
``<output>.int8.onnx`` (logits and classifier in float; see ``hybridvision.export.quantize_int8``),
calibrated on the first N images of ``--calibration`` as the runtime predictor feeds them to the
model (normalised, at the recorded ``data.resize`` scale, in ``--mode``/``--window`` windows), and
prints how often it agrees with fp32 on held-out images predicted the same way (``--eval-images``,
default: the ``--calibration`` images after the first N).

``--targets`` picks the runtimes (default ``onnx``): ``openvino`` adds ``<output>.xml`` + ``.bin``,
an OpenVINO IR converted from the ONNX file (which is always written) with the same metadata and
checked against onnxruntime; with ``--int8`` also ``<output>.int8.xml`` (NNCF post-training
quantization on the same calibration inputs, classifier in float) and its agreement with the fp32
IR. ``finetune/predict.py --model X.xml`` runs it (``pip install -e ".[openvino]"``). ``executorch``
adds ``<output>.pte``, the model lowered to ExecuTorch's XNNPACK backend, with the ONNX metadata in
``<output>.pte.json`` and checked against PyTorch; with ``--int8`` also ``<output>.int8.pte`` (PT2E
quantization with XNNPACKQuantizer on the same calibration inputs, classifier in float) and its
agreement with the fp32 program. ``finetune/predict.py --model X.pte`` runs it
(``pip install -e ".[executorch]"``).

Exit status 2 with a one-line message for user errors (``HYBRIDVISION_DEBUG=1``: traceback).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hybridvision.deploy.runtime import (  # noqa: E402
    UserError,
    check_predict_options,
    read_image,
    read_metadata,
    resolve_inputs,
)

#: ``--targets``: the runtimes an export is written for
TARGETS = ("onnx", "openvino", "executorch")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="segmenter directory (from_pretrained)")
    p.add_argument("--output", required=True, help="output .onnx file")
    p.add_argument("--opset", type=int, default=18, help="ONNX opset (>= 17; TransUNet needs 18)")
    p.add_argument(
        "--targets",
        nargs="+",
        choices=TARGETS,
        default=["onnx"],
        help="runtimes to export for: onnx (<output>), openvino (<output>.xml + .bin) and/or executorch "
        "(<output>.pte + .pte.json); the ONNX file is always written, as every target's source",
    )
    p.add_argument("--train-crop", type=int, nargs=2, default=None, help="H W (default: data.image_size)")
    p.add_argument(
        "--executorch-max-size",
        type=int,
        default=1024,
        help="largest input height/width of a dynamic .pte (larger images: sliding windows); ExecuTorch "
        "plans memory for it",
    )
    p.add_argument(
        "--int8",
        action="store_true",
        help="also int8 per target: <output>.int8.onnx (onnx), <output>.int8.xml (openvino), "
        "<output>.int8.pte (executorch)",
    )
    p.add_argument("--calibration", default=None, help="image file or folder for int8 calibration")
    p.add_argument("--calibration-count", type=int, default=32, help="calibration images used (N)")
    p.add_argument(
        "--mode",
        choices=["slide", "whole"],
        default="slide",
        help="how the deployed model predicts (the runtime's --mode): int8 is calibrated and checked so",
    )
    p.add_argument("--window", type=int, nargs=2, default=None, help="window H W (default: training crop)")
    p.add_argument(
        "--eval-images",
        default=None,
        help="held-out images for the int8/fp32 agreement (default: --calibration's images after the first N)",
    )
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
    mode: str = "slide",
    window: tuple[int, int] | None = None,
    eval_images: str | None = None,
    targets: tuple[str, ...] = ("onnx",),
    executorch_max_size: int = 1024,
) -> dict:
    """Export (and quantize); returns a summary dict. Raises :class:`UserError` for user errors."""
    from hybridvision.export import (
        ExportError,
        deployment_inputs,
        executorch_path,
        export_executorch,
        export_onnx,
        export_openvino,
        int8_agreement,
        openvino_path,
        quantize_executorch_int8,
        quantize_int8,
        quantize_openvino_int8,
    )
    from hybridvision.models import Segmenter, from_pretrained
    from hybridvision.models.hub import read_run_config

    if output.suffix.lower() != ".onnx":
        raise UserError(f"--output {output} must end in .onnx")
    if int8 and not calibration:
        raise UserError("--int8 needs --calibration IMAGES (a folder or file of training images)")
    unknown = [t for t in targets if t not in TARGETS]
    if unknown or not targets:
        raise UserError(f"--targets {' '.join(targets)}: give one or more of {', '.join(TARGETS)}")
    if "openvino" in targets:
        from hybridvision.deploy.openvino_runtime import import_openvino

        import_openvino()  # a missing extra is a one-line error before anything is written
    if "executorch" in targets:
        from hybridvision.deploy.executorch_runtime import import_executorch

        import_executorch()
    if calibration_count < 1:
        raise UserError(f"--calibration-count must be >= 1, got {calibration_count}")
    check_predict_options(mode, window, overlap=0.25, batch_size=1, tta_flips=())
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
    data = read_run_config(model, "data")
    crop = tuple(train_crop or data.get("image_size") or (256, 256))
    try:
        onnx_path = export_onnx(model, output, train_crop=crop, data_cfg=data, opset=opset)
    except ExportError as exc:
        raise UserError(str(exc)) from exc
    summary = {"onnx": str(onnx_path), "onnx_mb": onnx_path.stat().st_size / 2**20, "train_crop": list(crop)}
    ir = None
    if "openvino" in targets:
        try:
            ir = export_openvino(onnx_path, openvino_path(output))
        except ExportError as exc:
            raise UserError(str(exc)) from exc
        summary.update(openvino=str(ir), openvino_mb=_ir_mb(ir))
    pte = None
    if "executorch" in targets:
        try:
            pte = export_executorch(model, onnx_path, executorch_path(output), max_size=executorch_max_size)
        except (ExportError, ValueError) as exc:  # ValueError: a max size below the crop
            raise UserError(str(exc)) from exc
        summary.update(executorch=str(pte), executorch_mb=pte.stat().st_size / 2**20)
    if int8:
        files, _ = resolve_inputs(Path(calibration))
        in_chans = int(model.build_kwargs["in_chans"])
        images = read_images(files[:calibration_count], in_chans)
        if not images:
            raise UserError(f"no readable calibration image under --calibration {calibration}")
        if eval_images:
            held_out = read_images(resolve_inputs(Path(eval_images))[0], in_chans)
        else:
            held_out = read_images(files[calibration_count : 2 * calibration_count], in_chans)
        # as finetune/predict.py / the runtime predict with this file: recorded scale, these windows
        predictor = {"mode": mode, "window": window}
        meta = read_metadata(onnx_path)
        path = {"mode": mode, "resize": meta["resize"]}
        if mode == "slide":
            path["window"] = list(window or meta["train_crop"])
        inputs = deployment_inputs(onnx_path, images, **predictor)
        info = {"images": len(images), **path}
        summary.update(
            calibration_images=len(images),
            calibration_inputs=len(inputs),
            deployment_path=path,
            agreement_images="held-out" if held_out else "calibration",
        )
        if "onnx" in targets:
            q_path = quantize_int8(onnx_path, int8_path(output), inputs, calibration_info=info)
            summary.update(
                int8=str(q_path),
                int8_mb=q_path.stat().st_size / 2**20,
                int8_agreement=int8_agreement(onnx_path, q_path, held_out or images, **predictor),
            )
        if ir is not None:
            q_ir = quantize_openvino_int8(ir, openvino_path(int8_path(output)), inputs, calibration_info=info)
            summary.update(
                openvino_int8=str(q_ir),
                openvino_int8_mb=_ir_mb(q_ir),
                openvino_int8_agreement=int8_agreement(ir, q_ir, held_out or images, **predictor),
            )
        if pte is not None:
            try:
                q_pte = quantize_executorch_int8(
                    model, pte, executorch_path(int8_path(output)), inputs, calibration_info=info
                )
            except ExportError as exc:
                raise UserError(str(exc)) from exc
            summary.update(
                executorch_int8=str(q_pte),
                executorch_int8_mb=q_pte.stat().st_size / 2**20,
                executorch_int8_agreement=int8_agreement(pte, q_pte, held_out or images, **predictor),
            )
    return summary


def _ir_mb(xml: Path) -> float:
    """Size of an OpenVINO IR: ``.xml`` + ``.bin``."""
    return (xml.stat().st_size + xml.with_suffix(".bin").stat().st_size) / 2**20


def read_images(files: list[Path], in_chans: int) -> list:
    """Raw images (C, H, W) as the runtime reads them; an unreadable file is skipped with a warning."""
    images = []
    for f in files:
        try:
            images.append(read_image(f, in_chans))
        except (OSError, ValueError) as exc:
            sys.stderr.write(f"warning: image {f} skipped: {exc}\n")
    return images


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
            mode=args.mode,
            window=tuple(args.window) if args.window else None,
            eval_images=args.eval_images,
            targets=tuple(args.targets),
            executorch_max_size=args.executorch_max_size,
        )
    except UserError as exc:
        if os.environ.get("HYBRIDVISION_DEBUG") == "1":
            raise
        sys.stderr.write(f"error: {exc}\n")
        return 2
    print(f"wrote {summary['onnx']} ({summary['onnx_mb']:.2f} MB, checked against PyTorch)")
    if "openvino" in summary:
        print(
            f"wrote {summary['openvino']} + .bin ({summary['openvino_mb']:.2f} MB, checked against onnxruntime)"
        )
    if "executorch" in summary:
        print(
            f"wrote {summary['executorch']} + .pte.json ({summary['executorch_mb']:.2f} MB, checked against PyTorch)"
        )
    if "deployment_path" in summary:
        path = summary["deployment_path"]
        how = f"{path['mode']}" + (
            f" {path['window'][0]}x{path['window'][1]} windows" if "window" in path else ""
        )
        how += f" at scale {path['resize']}" if path["resize"] else " at native scale"
    for key, runtime in (("int8", ""), ("openvino_int8", "OpenVINO "), ("executorch_int8", "ExecuTorch ")):
        if key not in summary:
            continue
        agree = summary[f"{key}_agreement"]
        print(
            f"wrote {summary[key]} ({summary[f'{key}_mb']:.2f} MB), calibrated on {summary['calibration_images']} "
            f"images as the runtime predicts them ({how}: {summary['calibration_inputs']} model inputs)"
        )
        print(
            f"{runtime}int8 agrees with fp32 on {100 * agree['pixel_agreement']:.2f}% of pixels of "
            f"{agree['images']} {summary['agreement_images']} images predicted the same way; exactly tied "
            f"top-2 logits: fp32 {100 * agree['ties_fp32']:.3f}%, int8 {100 * agree['ties_int8']:.3f}% of pixels"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
