"""Edge export at the end of ``distill/run.py``: the student for each runtime, fp32 and int8, its
calibration images, and the deployment report."""

from __future__ import annotations

from pathlib import Path

import torch

from distill.config import DistillConfig
from hybridvision.config import config_to_dict


def export_for_edge(cfg: DistillConfig, teacher, student, val_set, out: Path, engine) -> dict:
    """The student for each ``export.targets`` runtime, fp32 (+ int8), and the deployment report.

    ``student.onnx`` is always written (every target's source); ``onnx`` adds ``student.int8.onnx``
    with ``export.int8``, ``openvino`` adds ``student.xml`` (+ ``student.int8.xml``), ``executorch``
    adds ``student.pte`` (+ ``student.int8.pte``, each with its ``.pte.json``). Every int8 model is
    calibrated on the same deployment-path inputs; the report measures every model, and OpenVINO
    fp32 once more in bf16 where the CPU runs bf16.
    """
    import copy

    from hybridvision.deploy.openvino_runtime import bf16_supported
    from hybridvision.export import (
        deployment_inputs,
        deployment_report,
        export_executorch,
        export_onnx,
        export_openvino,
        int8_agreement,
        quantize_executorch_int8,
        quantize_int8,
        quantize_openvino_int8,
    )

    d, e = cfg.data, cfg.export
    data_cfg = config_to_dict(cfg)["data"]
    cpu_student = copy.deepcopy(student).cpu().eval()
    result: dict = {}
    fp32 = export_onnx(
        cpu_student, out / "student.onnx", train_crop=tuple(d.image_size), data_cfg=data_cfg, opset=e.opset
    )
    result["onnx"] = str(fp32)
    entries = [
        {"name": "teacher (PyTorch)", "model": teacher},
        {"name": "student (PyTorch)", "model": cpu_student},
    ]
    if "onnx" in e.targets:
        entries.append({"name": "student (ONNX fp32)", "onnx": fp32, "model": cpu_student})
    engine.print(f"student exported to {fp32} ({fp32.stat().st_size / 2**20:.2f} MB)")
    ir = None
    if "openvino" in e.targets:
        ir = export_openvino(fp32, out / "student.xml")
        result["openvino"] = str(ir)
        entries.append({"name": "student (OpenVINO fp32)", "openvino": ir, "model": cpu_student})
        if bf16_supported():  # a separate choice on this CPU: what OpenVINO runs unless told f32
            entries.append(
                {"name": "student (OpenVINO bf16)", "openvino": ir, "bf16": True, "model": cpu_student}
            )
        engine.print(f"student converted to OpenVINO: {ir} (+ {ir.with_suffix('.bin').name})")
    pte = None
    if "executorch" in e.targets:
        pte = export_executorch(cpu_student, fp32, out / "student.pte", max_size=e.executorch_max_size)
        result["executorch"] = str(pte)
        entries.append({"name": "student (ExecuTorch fp32)", "executorch": pte, "model": cpu_student})
        engine.print(f"student lowered to ExecuTorch (XNNPACK): {pte} (+ {pte.name}.json)")
    if e.int8:
        # calibrated and checked as the evaluation predicts (the runtime predictor, the recorded scale)
        predictor = {
            "mode": cfg.eval.mode,
            "window": tuple(cfg.eval.window),
            "overlap": cfg.eval.overlap,
            "blend": cfg.eval.blend,
            "tta_flips": tuple(cfg.eval.tta_flips),
        }
        images = calibration_images(cfg, e.calibration_images)
        inputs = deployment_inputs(fp32, images, normalized=True, **predictor)
        info = {"images": len(images), "mode": cfg.eval.mode, "resize": d.resize_scale}
        quantized = []  # (target, fp32 file, int8 file)
        if "onnx" in e.targets:
            int8 = quantize_int8(fp32, out / "student.int8.onnx", inputs, calibration_info=info)
            result["onnx_int8"] = str(int8)
            entries.append({"name": "student (ONNX int8)", "onnx": int8, "model": cpu_student})
            quantized.append(("onnx", fp32, int8))
        if ir is not None:
            int8 = quantize_openvino_int8(ir, out / "student.int8.xml", inputs, calibration_info=info)
            result["openvino_int8"] = str(int8)
            entries.append({"name": "student (OpenVINO int8)", "openvino": int8, "model": cpu_student})
            quantized.append(("openvino", ir, int8))
        if pte is not None:
            int8 = quantize_executorch_int8(
                cpu_student, pte, out / "student.int8.pte", inputs, calibration_info=info
            )
            result["executorch_int8"] = str(int8)
            entries.append({"name": "student (ExecuTorch int8)", "executorch": int8, "model": cpu_student})
            quantized.append(("executorch", pte, int8))
        engine.print(
            f"int8 models {', '.join(str(q[2]) for q in quantized)}, calibrated on {len(images)} training "
            f"images as evaluation predicts them ({cfg.eval.mode}, scale {d.resize_scale or 'native'}: "
            f"{len(inputs)} model inputs)"
        )
        count = min(e.report_images or len(val_set), len(val_set)) if val_set is not None else 0
        for target, base, int8 in quantized if count else ():
            agree = int8_agreement(
                base, int8, (val_set[i]["image"] for i in range(count)), normalized=True, **predictor
            )
            result["int8_agreement" if target == "onnx" else f"{target}_int8_agreement"] = agree
            engine.print(
                f"{target} int8 agrees with fp32 on {100 * agree['pixel_agreement']:.2f}% of pixels of "
                f"{count} evaluation images; exactly tied top-2 logits: fp32 {100 * agree['ties_fp32']:.3f}%, "
                f"int8 {100 * agree['ties_int8']:.3f}% of pixels"
            )
    if e.report and val_set is not None:
        report = deployment_report(
            out,
            entries,
            val_set,
            d.num_classes,
            d.ignore_index,
            train_crop=tuple(d.image_size),
            eval_mode=cfg.eval.mode,
            window=tuple(cfg.eval.window),
            resize=d.resize_scale,
            runs=e.report_runs,
            class_names=list(d.class_names) or None,
            max_eval_images=e.report_images or None,
        )
        result["report"] = str(out / "report.md")
        engine.print((out / "report.md").read_text())
        result["report_entries"] = [
            {
                k: row.get(k)
                for k in ("name", "runtime", "precision", "miou", "params", "gmacs_train_crop", "file_mb")
            }
            for row in report["entries"]
        ]
    return result


def calibration_images(cfg: DistillConfig, count: int) -> list[torch.Tensor]:
    """The first ``count`` training images through the evaluation transform (as built by
    ``hybridvision.segmentation.build_data``): no augmentation, normalised, at their own size (the
    predictor applies the recorded scale)."""
    from hybridvision.data.from_config import build_labelled_datasets
    from hybridvision.segmentation.data import eval_transform

    d = cfg.data
    eval_tf = eval_transform(d)
    train, _ = build_labelled_datasets(d, eval_tf, eval_tf, seed=cfg.train.seed, check="lazy")
    samples = (train[i] for i in range(min(count, len(train)))) if hasattr(train, "__len__") else train
    return [sample["image"] for sample, _ in zip(samples, range(count))]
