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

from torch import nn  # noqa: E402

from distill.config import DistillConfig  # noqa: E402
from distill.student import attach_kd, build_student, teacher_forward  # noqa: E402
from hybridvision.config import cli_main, config_to_dict  # noqa: E402

# accelerate, torchvision and the model zoo are imported inside the functions that use them, so
# `--help` and config errors answer in about the time torch takes to import


def main(cfg: DistillConfig) -> dict:
    from distill.augment import augment_generator, build_student_augment
    from distill.data import build_distill_data
    from distill.edge import export_for_edge
    from distill.losses import DistillCriterion
    from distill.models import load_teacher, resolve_data
    from distill.report import compare, print_summary
    from hybridvision.data.from_config import resolve_resize
    from hybridvision.engine import Engine, StepOutput
    from hybridvision.io import write_json_atomic
    from hybridvision.models import save_pretrained
    from hybridvision.models.profile import model_summary
    from hybridvision.segmentation.evaluate import evaluate_segmenter
    from hybridvision.segmentation.training import build_eval_loader, build_task_loss

    teacher = load_teacher(cfg.teacher)
    data, resize_line = resolve_resize(resolve_data(cfg, teacher))  # the one resolution of data.resize
    cfg = dataclasses.replace(cfg, data=data)
    d = cfg.data
    engine = Engine(cfg.train, cfg.optim, run_config=cfg, project_name="distill")
    cfg = dataclasses.replace(cfg, train=engine.cfg)  # train.mixed_precision=auto resolved
    acc = engine.accelerator
    teacher.to(acc.device)
    student = build_student(cfg, engine)
    engine.print(f"student {model_summary(student)}")
    terms = cfg.kd.active()
    kd, model, features = attach_kd(cfg, student, teacher, engine)

    engine.print(resize_line)
    train_set, val_set = build_distill_data(cfg, engine.print)
    eval_loader = build_eval_loader(val_set, cfg, acc)
    criterion = DistillCriterion(
        build_task_loss(cfg), kd, d.ignore_index, feature_loss=features.loss if features is not None else None
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
    summary = compare(cfg, teacher, student, result, eval_loader, val_set, engine)
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
    print_summary(summary, out, engine)
    engine.close()
    if export_error is not None:
        raise ValueError(
            f"edge export failed ({type(export_error).__name__}: {export_error}); the student and "
            f"metrics are saved in {out}: retry with python distill/export.py --model {out / 'student'} "
            f"--output {out / 'student.onnx'}"
        ) from export_error
    return summary


if __name__ == "__main__":
    code = cli_main(DistillConfig, main)
    if "hybridvision.engine" in sys.modules:  # imported only if a run started (not for --help)
        engine_module = sys.modules["hybridvision.engine"]
        engine_module.shutdown_distributed()
        code = code or engine_module.pending_exit_code()  # interrupted: 130 (SIGINT) / 143 (SIGTERM)
    sys.exit(code)
