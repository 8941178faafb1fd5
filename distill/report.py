"""What ``distill/run.py`` reports once the student is trained: teacher and student side by side
(mIoU, parameters, GMACs) and an input | truth | teacher | student grid."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from distill.config import DistillConfig
from distill.models import count_gmacs, count_params
from hybridvision.segmentation.evaluate import evaluate_segmenter


def compare(
    cfg: DistillConfig, teacher: nn.Module, student: nn.Module, result: dict, eval_loader, val_set, engine
) -> dict:
    """The run's summary (``metrics.json``): step, both models' metrics and their mIoU ratio (with a
    validation set), parameters and GMACs at the training crop; logs the mIoUs and the grid."""
    d, acc = cfg.data, engine.accelerator
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
    return summary


def print_summary(summary: dict, out: Path, engine) -> None:
    """Student vs teacher mIoU, parameters and GMACs, and where the student and metrics are."""
    p, g = summary["params"], summary["gmacs"]
    size = g["size"]
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
