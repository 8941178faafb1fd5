"""Which exported runtime to deploy: the fastest one that keeps the accuracy of the fp32 model.

Used by :func:`hybridvision.export.report.deployment_report`: its rows are grouped by model (the
part of the row name before ``" ("``: ``"student (OpenVINO int8)"`` belongs to ``student``), and per
model the exported rows (every runtime but PyTorch eager) whose mIoU is at most ``tolerance`` below the
model's fp32 reference are ranked by full-image latency (what a deployed model runs), then crop
latency. The reference is the model's PyTorch row, else its fp32 row.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

__all__ = ["MIOU_TOLERANCE", "choice_lines", "choose_runtimes"]

#: the ``runtime`` of a report row measured in PyTorch (not exported)
EAGER = "pytorch-eager"

#: mIoU a faster runtime may lose against the fp32 model and still be chosen
MIOU_TOLERANCE = 0.01


def _model_of(row: dict[str, Any]) -> str:
    return str(row["name"]).split(" (", 1)[0]


def _latency(row: dict[str, Any]) -> tuple[float, float]:
    return row["latency_full_image"]["median_ms"], row["latency_train_crop"]["median_ms"]


def choose_runtimes(rows: Sequence[dict[str, Any]], tolerance: float = MIOU_TOLERANCE) -> dict[str, Any]:
    """Per model, the fastest exported row within ``tolerance`` mIoU of its fp32 reference.

    Args:
        rows: the report's rows (``name``, ``runtime``, ``precision``, ``miou``, ``latency_*``).
        tolerance: mIoU the chosen row may lose against the reference.

    Returns:
        ``{model: {"chosen", "reference", "miou_drop", "speedup_vs_onnx_fp32", "rejected"}}`` for
        every model with at least one exported row; ``chosen`` is None when every exported row
        loses more than ``tolerance``; ``rejected`` names the faster rows that lost too much.
    """
    choices: dict[str, Any] = {}
    for model in dict.fromkeys(_model_of(r) for r in rows):
        group = [r for r in rows if _model_of(r) == model]
        exported = [r for r in group if r["runtime"] != EAGER]
        if not exported:
            continue
        eager = [r for r in group if r["runtime"] == EAGER]
        fp32 = [r for r in group if r.get("precision") == "fp32"]
        reference = (eager or fp32 or exported)[0]
        ranked = sorted(exported, key=_latency)
        floor = reference["miou"] - tolerance
        chosen = next((r for r in ranked if r["miou"] >= floor), None)
        onnx_fp32 = next(
            (r for r in exported if r["runtime"] == "onnxruntime-cpu" and r.get("precision") == "fp32"), None
        )
        faster = ranked[: ranked.index(chosen)] if chosen is not None else ranked
        choices[model] = {
            "chosen": chosen["name"] if chosen else None,
            "reference": reference["name"],
            "tolerance": tolerance,
            "miou_drop": round(reference["miou"] - chosen["miou"], 4) if chosen else None,
            "speedup_vs_onnx_fp32": (
                round(_latency(onnx_fp32)[0] / _latency(chosen)[0], 2) if chosen and onnx_fp32 else None
            ),
            "rejected": [f"{r['name']}: mIoU {r['miou']:.4f} < {floor:.4f}" for r in faster],
        }
    return choices


def choice_lines(choices: dict[str, Any]) -> list[str]:
    """The report's sentences: one per model, naming the runtime to deploy and why."""
    lines = []
    for model, c in choices.items():
        if c["chosen"] is None:
            lines.append(
                f"**{model}**: no exported runtime stays within {c['tolerance']} mIoU of {c['reference']} "
                f"({'; '.join(c['rejected'])}); deploy fp32 or recalibrate."
            )
            continue
        speed = f", {c['speedup_vs_onnx_fp32']:.2f}x onnxruntime fp32" if c["speedup_vs_onnx_fp32"] else ""
        skipped = f" Faster but rejected: {'; '.join(c['rejected'])}." if c["rejected"] else ""
        lines.append(
            f"**{model}**: deploy **{c['chosen']}** on this CPU: the fastest full-image latency within "
            f"{c['tolerance']} mIoU of {c['reference']} (loses {c['miou_drop']:.4f}){speed}.{skipped}"
        )
    return lines
