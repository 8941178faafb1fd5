"""Table of benchmarks/prune_vs_preset.sh: pruned-then-distilled vs preset students, per seed and mean.

    python benchmarks/prune_vs_preset.py runs/prune

Reads each run's ``metrics.json`` (student metrics, parameters, GMACs at the training crop) and its
deployment report ``report.json`` (median latency of the student's rows at the crop and the full
image, per runtime and precision).
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path


def rows(root: Path) -> list[dict]:
    found = []
    for run in sorted(root.glob("*_s*")):
        metrics_file, report_file = run / "metrics.json", run / "report.json"
        if not metrics_file.is_file():
            continue
        m = json.loads(metrics_file.read_text())
        variant, seed = run.name.rsplit("_s", 1)
        row = {
            "variant": variant,
            "seed": int(seed),
            "membrane_iou": m["student"]["iou"][1],
            "miou": m["student"]["miou"],
            "teacher_membrane_iou": m["teacher"]["iou"][1],
            "params_m": m["params"]["student"] / 1e6,
            "gmacs": m["gmacs"]["student"],
            "crop": m["gmacs"]["size"],
            "latency": {},
        }
        if report_file.is_file():
            for entry in json.loads(report_file.read_text())["entries"]:
                if entry["name"].startswith("student ("):
                    row["latency"][entry["name"][9:-1]] = (
                        entry["latency_train_crop"]["median_ms"],
                        entry["latency_full_image"]["median_ms"],
                    )
        found.append(row)
    return found


def table(found: list[dict]) -> str:
    runtimes = sorted({k for r in found for k in r["latency"]})
    head = "| student | seed | params (M) | GMACs | membrane IoU | mIoU | teacher membrane IoU | "
    head += " | ".join(f"{k} ms crop / full" for k in runtimes) + " |"
    lines = [head, "|" + "---|" * (7 + len(runtimes))]
    for r in found:
        lat = " | ".join(
            f"{r['latency'][k][0]:.1f} / {r['latency'][k][1]:.1f}" if k in r["latency"] else "-"
            for k in runtimes
        )
        lines.append(
            f"| {r['variant']} | {r['seed']} | {r['params_m']:.2f} | {r['gmacs']:.3f} | {r['membrane_iou']:.4f} | "
            f"{r['miou']:.4f} | {r['teacher_membrane_iou']:.4f} | {lat} |"
        )
    lines += ["", "| student | seeds | membrane IoU mean (min-max) | mIoU mean |", "|---|---:|---|---:|"]
    for variant in sorted({r["variant"] for r in found}):
        rs = [r for r in found if r["variant"] == variant]
        ious = [r["membrane_iou"] for r in rs]
        lines.append(
            f"| {variant} | {len(rs)} | {statistics.mean(ious):.4f} ({min(ious):.4f}-{max(ious):.4f}) | "
            f"{statistics.mean(r['miou'] for r in rs):.4f} |"
        )
    if found:
        lines.append(
            f"\nGMACs at the training crop {found[0]['crop'][0]}x{found[0]['crop'][1]}; latency: batch 1, 1 thread."
        )
    return "\n".join(lines)


if __name__ == "__main__":
    print(table(rows(Path(sys.argv[1] if len(sys.argv) > 1 else "runs/prune"))))
