"""Distil a fine-tuned teacher into a small student, evaluate both, and export the student.

    accelerate launch distill/run.py [--config configs/distill/X.yaml] [teacher=DIR] [key=value ...]
    python distill/run.py        # built-in synthetic data; teacher = runs/finetune/model

Writes ``<train.output_dir>/student/`` (``from_pretrained``-loadable, no adapter weights),
``metrics.json`` (student and teacher metrics, their ratio, params and GMACs) and, with
``export.onnx=true``, ``student.onnx`` and the deployment report.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # repo root: `distill`, `finetune` packages

import dataclasses  # noqa: E402

import torch  # noqa: E402
from torch import nn  # noqa: E402

from distill.config import DistillConfig  # noqa: E402
from hybridvision.config import cli_main, config_to_dict  # noqa: E402

# accelerate, torchvision and the model zoo are imported inside the functions that use them, so
# `--help` and config errors answer in about the time torch takes to import


def build_student(cfg: DistillConfig, engine):
    """The student: ``student.*`` as built, or with ``student.prune`` a pruned copy of the teacher.

    ``student.prune > 0`` without ``student.init`` starts from the teacher (``student.name`` is not
    used); a resumed pruned run rebuilds the pruned shapes from the checkpoint's exported model.
    """
    from hybridvision.models.transfer import build_segmenter

    d, s = cfg.data, cfg.student
    resume = engine.resume_checkpoint
    if s.prune > 0 and resume is not None:  # the pruned architecture is the checkpoint's
        from hybridvision.models import from_pretrained

        return from_pretrained(resume / "export")
    from_teacher = s.prune > 0 and not s.init
    student, report = build_segmenter(
        "" if from_teacher else s.name,
        d.num_classes,
        d.in_chans,
        init=cfg.teacher if from_teacher else s.init,
        strict=s.init_strict,
        decoder=s.decoder or None,
        decoder_kwargs=s.decoder_kwargs or None,
        overrides=s.overrides,
        input_size=tuple(d.image_size),
    )
    if resume is None:  # else the weights come from the checkpoint
        name = f"{student.build_kwargs['name']} (a copy of the teacher)" if from_teacher else s.name
        engine.print(f"student {name}: " + report.summary())
    if s.prune > 0:
        from distill.prune import prune_student

        engine.print(prune_student(student, cfg).summary())
    return student


def teacher_forward(teacher: nn.Module, images: torch.Tensor, cfg: DistillConfig, with_feats: bool):
    """Frozen teacher logits (and features), never part of the autograd graph."""
    from distill.models import forward_with_features

    device_type = images.device.type
    with (
        torch.inference_mode(),
        torch.autocast(device_type, dtype=torch.bfloat16, enabled=cfg.kd.teacher_dtype == "bf16"),
    ):
        if with_feats:
            logits, feats = forward_with_features(teacher, images)
        else:
            logits, feats = teacher(images), []
    # inference tensors cannot be saved for backward: plain fp32 copies enter the losses
    return logits.float().clone(), [f.float().clone() for f in feats]


def main(cfg: DistillConfig) -> dict:
    from distill.augment import augment_generator, build_student_augment
    from distill.data import build_distill_train_set
    from distill.losses import DistillCriterion, FeatureDistiller, match_stages
    from distill.models import DistillStudent, count_gmacs, count_params, load_teacher, resolve_data
    from hybridvision.data.loader import collate_mixed_sizes
    from hybridvision.engine import Engine, StepOutput
    from hybridvision.io import write_json_atomic
    from hybridvision.losses import build_segmentation_loss
    from hybridvision.models import save_pretrained
    from hybridvision.models.profile import model_summary
    from hybridvision.segmentation.data import build_data, labelled_line
    from hybridvision.segmentation.evaluate import evaluate_segmenter

    teacher = load_teacher(cfg.teacher)
    from hybridvision.data.from_config import resolve_resize

    data, resize_line = resolve_resize(resolve_data(cfg, teacher))  # the one resolution of data.resize
    cfg = dataclasses.replace(cfg, data=data)
    d, kd = cfg.data, cfg.kd
    engine = Engine(cfg.train, cfg.optim, run_config=cfg, project_name="distill")
    acc = engine.accelerator
    teacher.to(acc.device)
    student = build_student(cfg, engine)
    engine.print(f"student {model_summary(student)}")
    terms = kd.active()
    if "dist" in terms and teacher.num_classes <= 2 and kd.dist_beta > 0:
        engine.print(
            "kd.dist_beta set to 0: DIST's inter-class correlation of two class probabilities is always "
            "±1 (no gradient) for a binary model; only the intra-class term is used"
        )
        kd = dataclasses.replace(kd, dist_beta=0.0)
    features = None
    if "feature" in terms:
        pairs = match_stages(student.encoder.reductions, teacher.encoder.reductions, kd.feature_stages)
        features = FeatureDistiller(
            student.encoder.out_channels, teacher.encoder.out_channels, pairs, kd.feature_norm
        )
        engine.print("feature distillation pairs (student stage -> teacher stage): " + str(pairs))
    model = DistillStudent(student, features)

    engine.print(resize_line)
    data = build_data(cfg)
    val_set = data.val_set
    train_set, n_unlabelled = build_distill_train_set(
        d, data.train_set, data.train_transform, cfg.train.seed, rest=data.unlabelled_rest
    )
    if data.labelled_ids is not None:
        engine.print(labelled_line(d, data.labelled_ids, len(data.unlabelled_rest or ())))
    if n_unlabelled:
        sources = [
            s for s in (data.unlabelled_rest and f"the rest of split {d.split!r}", d.unlabelled_source) if s
        ]
        engine.print(
            f"{n_unlabelled} unlabelled images from {' and '.join(sources)} (distillation terms only)"
        )
    task = build_segmentation_loss(
        d.num_classes,
        d.ignore_index,
        cfg.loss.weights,
        cfg.loss.class_weights or None,
        cfg.loss.label_smoothing,
    )
    criterion = DistillCriterion(
        task, kd, d.ignore_index, feature_loss=features.loss if features is not None else None
    )
    student_augment = build_student_augment(kd.student_augment)

    def step_fn(m: nn.Module, batch: dict):
        images, masks = batch["image"], batch["mask"]
        if terms:
            t_logits, t_feats = teacher_forward(teacher, images, cfg, features is not None)
        else:  # no distillation term (the "student alone" baseline): the teacher is not run
            t_logits, t_feats = None, []
        student_images, kept = images, None
        if student_augment is not None:  # the teacher saw the weak view; the student gets a strong one
            state = engine.state  # keyed by the counters a checkpoint saves: a resumed run draws the same
            key = (cfg.train.seed, state.epoch, state.batch_in_epoch, acc.process_index)
            student_images, kept = student_augment(images, augment_generator(images.device, *key))
        s_logits, adapted = m(student_images)
        out = criterion(s_logits, t_logits, masks, batch.get("labelled"), adapted, t_feats, kept=kept)
        logs = {f"loss_{k}": v for k, v in out.terms.items()} | {f"kd_{k}": v for k, v in out.stats.items()}
        return StepOutput(loss=out.total, logs=logs)

    eval_loader = None
    if val_set is not None:
        eval_loader = acc.prepare_data_loader(  # images of different sizes are evaluated at their own size
            torch.utils.data.DataLoader(
                val_set, batch_size=cfg.eval.batch_size, collate_fn=collate_mixed_sizes
            )
        )

    def eval_fn(eng, m: nn.Module) -> dict:
        metrics, _ = evaluate_segmenter(acc.unwrap_model(m).student, eval_loader, cfg, acc)
        eng.log({f"iou/{n}": v for n, v in zip(metrics["class_names"], metrics["iou"]) if v is not None})
        return metrics

    def export(m: nn.Module, directory: Path) -> None:
        extra = {"stage": "distill", "teacher": cfg.teacher, "run_config": config_to_dict(cfg)}
        save_pretrained(m.student, directory, extra=extra)

    result = engine.fit(
        model,
        train_set,
        step_fn,
        eval_fn=eval_fn if eval_loader is not None else None,
        export_fn=export,
        num_workers=d.num_workers,
        persistent_workers=d.persistent_workers,
        pin_memory=d.pin_memory,
    )
    out = Path(cfg.train.output_dir)
    if result["interrupted"]:  # partial: no student/, metrics.json says so
        engine.close_interrupted(result)
        return {}
    student = acc.unwrap_model(engine.model).student
    summary: dict = {"step": result["step"], "teacher_path": cfg.teacher, "student_name": cfg.student.name}
    if eval_loader is not None:
        t_metrics, _ = evaluate_segmenter(teacher, eval_loader, cfg, acc)
        s_metrics = result["final_metrics"]
        summary |= {
            "student": s_metrics,
            "teacher": t_metrics,
            "miou_ratio": s_metrics["miou"] / max(t_metrics["miou"], 1e-12),
        }
        engine.log({"eval/teacher_miou": t_metrics["miou"], "eval/student_miou": s_metrics["miou"]})
        if cfg.eval.grid_images:
            engine.log_images(
                {"eval/input|truth|teacher|student": comparison_grid(teacher, student, val_set, cfg)}
            )
    size = tuple(d.image_size)
    summary["params"] = {"teacher": count_params(teacher), "student": count_params(student)}
    summary["gmacs"] = {
        "size": list(size),
        "teacher": count_gmacs(teacher, d.in_chans, size),
        "student": count_gmacs(student, d.in_chans, size),
    }
    export_error = None
    if acc.is_main_process:
        export(acc.unwrap_model(engine.model), out / "student")
        write_json_atomic(out / "metrics.json", summary)  # before the export: nothing trained is lost
        if cfg.export.onnx:
            try:
                summary["export"] = export_for_edge(cfg, teacher, student, val_set, out, engine)
            except Exception as exc:  # the student and metrics are written; say what failed, exit 2
                export_error = exc
                summary["export"] = {"error": f"{type(exc).__name__}: {exc}"}
            write_json_atomic(out / "metrics.json", summary)
    acc.wait_for_everyone()
    p, g = summary["params"], summary["gmacs"]
    if "student" in summary:
        engine.print(
            f"student mIoU={summary['student']['miou']:.4f}  teacher mIoU={summary['teacher']['miou']:.4f}  "
            f"ratio={summary['miou_ratio']:.3f}"
        )
    engine.print(
        f"params teacher {p['teacher'] / 1e6:.2f} M -> student {p['student'] / 1e6:.2f} M "
        f"({p['teacher'] / max(p['student'], 1):.1f}x fewer); GMACs at {size[0]}x{size[1]} "
        f"{g['teacher']:.3f} -> {g['student']:.3f} ({g['teacher'] / max(g['student'], 1e-12):.1f}x fewer)"
    )
    engine.print(f"student written to {out / 'student'}; metrics in {out / 'metrics.json'}")
    engine.close()
    if export_error is not None:
        raise ValueError(
            f"edge export failed ({type(export_error).__name__}: {export_error}); the student and "
            f"metrics are saved in {out}: retry with python distill/export.py --model {out / 'student'} "
            f"--output {out / 'student.onnx'}"
        ) from export_error
    return summary


def export_for_edge(cfg: DistillConfig, teacher, student, val_set, out: Path, engine) -> dict:
    """The student for each ``export.targets`` runtime, fp32 (+ int8), and the deployment report.

    ``student.onnx`` is always written (every target's source); ``onnx`` adds ``student.int8.onnx``
    with ``export.int8``, ``openvino`` adds ``student.xml`` (+ ``student.int8.xml``). Both int8
    models are calibrated on the same deployment-path inputs; the report measures every model, and
    OpenVINO fp32 once more in bf16 where the CPU runs bf16.
    """
    import copy

    from hybridvision.deploy.openvino_runtime import bf16_supported
    from hybridvision.export import (
        deployment_inputs,
        deployment_report,
        export_onnx,
        export_openvino,
        int8_agreement,
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
    from hybridvision.data.transforms import build_seg_transforms

    d = cfg.data
    eval_tf = build_seg_transforms(
        False,
        None,
        in_chans=d.in_chans,
        normalize=d.normalization,
        window=d.window,
        ignore_index=d.ignore_index,
    )
    train, _ = build_labelled_datasets(d, eval_tf, eval_tf, seed=cfg.train.seed, check="lazy")
    samples = (train[i] for i in range(min(count, len(train)))) if hasattr(train, "__len__") else train
    return [sample["image"] for sample, _ in zip(samples, range(count))]


@torch.no_grad()
def comparison_grid(teacher: nn.Module, student: nn.Module, val_set, cfg: DistillConfig) -> torch.Tensor:
    """input | truth | teacher | student rows for the first ``eval.grid_images`` validation samples."""
    from hybridvision.visualize import colorize, image_grid, to_display

    def labels(logits: torch.Tensor) -> torch.Tensor:
        return logits.argmax(1)[0] if logits.shape[1] > 1 else (logits[0, 0] > 0).long()

    rows = []
    device = next(student.parameters()).device
    was_training = student.training
    student.eval()
    for i in range(min(cfg.eval.grid_images, len(val_set))):
        sample = val_set[i]
        x = sample["image"][None].to(device)
        ig = cfg.data.ignore_index
        rows.append(
            [
                to_display(sample["image"]),
                colorize(sample["mask"], ig),
                colorize(labels(teacher(x)).cpu(), ig),
                colorize(labels(student(x)).cpu(), ig),
            ]
        )
    student.train(was_training)
    return image_grid(rows)


if __name__ == "__main__":
    code = cli_main(DistillConfig, main)
    if "hybridvision.engine" in sys.modules:  # imported only if a run started (not for --help)
        engine_module = sys.modules["hybridvision.engine"]
        engine_module.shutdown_distributed()
        code = code or engine_module.pending_exit_code()  # interrupted: 130 (SIGINT) / 143 (SIGTERM)
    sys.exit(code)
