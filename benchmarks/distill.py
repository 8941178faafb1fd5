"""Distillation step throughput: teacher forward + student step vs a plain student training step.

Usage::

    python benchmarks/distill.py                       # CPU, 1 thread, 128² crops, batch 8
    python benchmarks/distill.py --size 256 --batch-size 16 --reps 10 --device cuda

All loops train the same student (``unet_resnet_nano`` by default) on the same in-memory batch with
AdamW and the same task loss (CE + Dice); the distillation loops first run the frozen teacher
(``hybrid_tiny`` + U-Net decoder with image skips, the real-data teacher of benchmarks/realdata.sh;
random weights: speed does not depend on them) under ``torch.inference_mode``, in fp32 or bf16
autocast, and add the distillation terms of ``distill/run.py``:

* ``student alone``        — task loss only (what ``finetune/run.py`` does);
* ``+kd, teacher fp32``    — task 0.7 + pixel KD 0.3 (the default recipe);
* ``+kd, teacher bf16``    — same with ``kd.teacher_dtype=bf16``;
* ``+kd+cwd+dist+feature, teacher bf16`` — every term, with the feature adapters.

The student step runs under bf16 autocast with ``--student-bf16`` (``train.mixed_precision=bf16``).
Loops alternate in every repetition (rotating order); medians of ms/step are shown with the ratio of
throughput to ``student alone`` and, on the CPU, process CPU time per step (less sensitive to other
processes on a shared machine). Nothing is asserted; ``tests/test_benchmarks_smoke.py`` runs it tiny.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time
from pathlib import Path

_ROOT = Path(__file__).resolve().parents[1]
# this file is named like the `distill` package: take benchmarks/ off the path, put the repo root first
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
sys.path.insert(0, str(_ROOT))

import torch  # noqa: E402

from distill.config import KDConfig  # noqa: E402
from distill.losses import DistillCriterion, FeatureDistiller, match_stages  # noqa: E402
from distill.models import DistillStudent, count_gmacs, forward_with_features  # noqa: E402
from hybridvision.losses import build_segmentation_loss  # noqa: E402
from hybridvision.models import create_segmenter  # noqa: E402

TEACHER_KW = {"decoder": "unet", "decoder_kwargs": {"image_skip_channels": [16, 32]}}


def _loops(args, device):
    torch.manual_seed(0)
    k = args.num_classes
    teacher = create_segmenter(args.teacher, k, **TEACHER_KW).to(device).eval().requires_grad_(False)
    images = torch.randn(args.batch_size, 3, args.size, args.size, device=device)
    masks = torch.randint(0, k, (args.batch_size, args.size, args.size), device=device)
    task = build_segmentation_loss(k, 255, {"ce": 1.0, "dice": 1.0})
    loops = {}

    def make(name, weights, teacher_dtype):
        torch.manual_seed(1)
        student = create_segmenter(args.student, k)
        features = None
        if "feature" in weights:
            pairs = match_stages(student.encoder.reductions, teacher.encoder.reductions, [-1, -2])
            features = FeatureDistiller(student.encoder.out_channels, teacher.encoder.out_channels, pairs)
        model = DistillStudent(student, features).to(device).train()
        kd = KDConfig(task_weight=0.7 if weights else 1.0, weights=dict(weights))
        crit = DistillCriterion(task, kd, 255, feature_loss=features.loss if features is not None else None)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        use_teacher = bool(weights)

        def step():
            t_logits, t_feats = None, []
            if use_teacher:
                with (
                    torch.inference_mode(),
                    torch.autocast(device.type, dtype=torch.bfloat16, enabled=teacher_dtype == "bf16"),
                ):
                    if features is not None:
                        t_logits, t_feats = forward_with_features(teacher, images)
                    else:
                        t_logits = teacher(images)
                t_logits, t_feats = t_logits.float().clone(), [f.float().clone() for f in t_feats]
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.student_bf16):
                s_logits, adapted = model(images)
            out = crit(
                s_logits.float(),
                t_logits if use_teacher else s_logits.detach(),
                masks,
                None,
                adapted,
                t_feats,
            )
            out.total.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        loops[name] = step

    make("student alone", {}, "fp32")
    make("+kd, teacher fp32", {"kd": 0.3}, "fp32")
    make("+kd, teacher bf16", {"kd": 0.3}, "bf16")
    make("+kd+cwd+dist+feature, teacher bf16", {"kd": 0.3, "cwd": 0.3, "dist": 0.3, "feature": 0.3}, "bf16")
    return loops, teacher


def summarize(results: Path, runs: Path) -> str:
    """Markdown table of the real-data distillation runs (benchmarks/realdata.sh part 7): mean and
    min-max over seeds of each student variant's mIoU and foreground IoU, its ratio to the teacher,
    and the training wall time; also written to ``results/distill_summary.json``."""
    import json

    rows: dict[tuple[str, str], list[dict]] = {}
    for path in sorted(runs.glob("*/*/seed*/metrics.json")):
        seed, name, ds = path.parent.name, path.parent.parent.name, path.parent.parent.parent.name
        m = json.loads(path.read_text())
        if "student" not in m:  # interrupted run
            continue
        wall_file = results / f"wall_distill_{ds}_{name}_{seed}.json"
        wall = json.loads(wall_file.read_text())["wall_s"] if wall_file.is_file() else float("nan")
        rows.setdefault((ds, name), []).append({"seed": seed, "wall_s": wall, **m})
    lines = [
        "| data | model | mIoU, mean (min-max) over seeds | last-class IoU | student / teacher mIoU | wall (s) |",
        "|---|---|---:|---:|---:|---:|",
    ]
    summary = {}
    for ds in sorted({d for d, _ in rows}):
        first = next(v[0] for (d, _), v in rows.items() if d == ds)
        t, p, g = first["teacher"], first["params"], first["gmacs"]
        lines.append(
            f"| {ds} | teacher: {p['teacher'] / 1e6:.2f} M params, {g['teacher']:.3f} GMACs at "
            f"{g['size'][0]}² | {t['miou']:.3f} | {t['iou'][-1]:.3f} | 1.000 | |"
        )
        for (d, name), runs_ in sorted(rows.items(), key=lambda kv: kv[0]):
            if d != ds:
                continue
            miou = [r["student"]["miou"] for r in runs_]
            last = [r["student"]["iou"][-1] for r in runs_]
            ratio = [r["miou_ratio"] for r in runs_]
            wall = [r["wall_s"] for r in runs_ if r["wall_s"] == r["wall_s"]]  # NaN: no wall file
            summary[f"{ds}/{name}"] = {"miou": miou, "last_class_iou": last, "ratio": ratio, "wall_s": wall}
            lines.append(
                f"| {ds} | student ({p['student'] / 1e6:.2f} M, {g['student']:.3f} GMACs) {name} | "
                f"{statistics.mean(miou):.3f} ({min(miou):.3f}-{max(miou):.3f}) | {statistics.mean(last):.3f} | "
                f"{statistics.mean(ratio):.3f} | {f'{statistics.mean(wall):.0f}' if wall else '—'} |"
            )
    (results / "distill_summary.json").write_text(json.dumps(summary, indent=2))
    return "\n".join(lines)


def agreement(config: str, teacher_dir: str, students: list[str], max_images: int) -> str:
    """How often each student's label equals the teacher's on the evaluation split (valid pixels),
    next to each one's accuracy: whether distillation moved the student towards the teacher."""
    import dataclasses

    from distill.config import DistillConfig
    from distill.models import load_teacher, resolve_data
    from hybridvision.config import load_config
    from hybridvision.data.from_config import resolve_resize
    from hybridvision.inference import Predictor
    from hybridvision.models import from_pretrained
    from hybridvision.segmentation.data import build_data

    cfg = load_config(DistillConfig, config, [f"teacher={teacher_dir}"])
    teacher = load_teacher(teacher_dir)
    cfg = dataclasses.replace(cfg, data=resolve_resize(resolve_data(cfg, teacher))[0])
    _, _, val_set = build_data(cfg)
    models = {"teacher": teacher} | {s: from_pretrained(s).eval() for s in students}
    window = tuple(cfg.eval.window) if cfg.eval.mode == "slide" else None
    predictors = {
        k: Predictor(m, mode=cfg.eval.mode, num_classes=cfg.data.num_classes, window=window)
        for k, m in models.items()
    }
    same = {s: 0 for s in students}
    correct = {k: 0 for k in models}
    total = 0
    with torch.no_grad():
        for i in range(min(max_images, len(val_set))):
            sample = val_set[i]
            x, mask = sample["image"][None], sample["mask"][None]
            labels = {k: p.predict_labels(x) for k, p in predictors.items()}
            valid = mask != cfg.data.ignore_index
            total += int(valid.sum())
            for k in models:
                correct[k] += int(((labels[k] == mask) & valid).sum())
            for s in students:
                same[s] += int(((labels[s] == labels["teacher"]) & valid).sum())
    lines = ["| model | pixel accuracy | agreement with the teacher |", "|---|---:|---:|"]
    lines.append(f"| teacher | {correct['teacher'] / total:.4f} | 1 |")
    for s in students:
        lines.append(f"| {s} | {correct[s] / total:.4f} | {same[s] / total:.4f} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--summarize", metavar="RESULTS_DIR", help="print the real-data distillation table and exit"
    )
    p.add_argument("--runs", default="runs/realdata/distill", help="with --summarize: the runs' root")
    p.add_argument(
        "--agreement",
        nargs="+",
        metavar=("CONFIG TEACHER", "STUDENT"),
        help="distill config, teacher dir, student dirs: pixel agreement of each student with the teacher",
    )
    p.add_argument("--max-images", type=int, default=50, help="with --agreement: evaluation images used")
    p.add_argument("--teacher", default="hybrid_tiny")
    p.add_argument("--student", default="unet_resnet_nano")
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--num-classes", type=int, default=11)
    p.add_argument("--steps", type=int, default=5, help="timed steps per loop per repetition")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (0: torch's default)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--student-bf16", action="store_true", help="student step under bf16 autocast")
    args = p.parse_args(argv)
    if args.summarize:
        print(summarize(Path(args.summarize), Path(args.runs)))
        return
    if args.agreement:
        if len(args.agreement) < 3:
            p.error("--agreement needs CONFIG TEACHER STUDENT [STUDENT ...]")
        torch.set_num_threads(max(args.threads, 1))
        print(agreement(args.agreement[0], args.agreement[1], args.agreement[2:], args.max_images))
        return
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    loops, teacher = _loops(args, device)
    student = create_segmenter(args.student, args.num_classes).to(device)
    size = (args.size, args.size)
    print(
        f"teacher {args.teacher}+unet {count_gmacs(teacher, 3, size):.3f} GMACs, student {args.student} "
        f"{count_gmacs(student, 3, size):.3f} GMACs at {args.size}²; batch {args.batch_size}, "
        f"{torch.get_num_threads()} thread(s), device {device}, student bf16={args.student_bf16}"
    )
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    wall = {k: [] for k in loops}
    cpu = {k: [] for k in loops}
    names = list(loops)
    for rep in range(args.reps + 1):
        order = names[rep % len(names) :] + names[: rep % len(names)]
        for name in order:
            n = args.warmup if rep == 0 else args.steps
            sync()
            t0, c0 = time.perf_counter(), time.process_time()
            for _ in range(n):
                loops[name]()
            sync()
            if rep:  # repetition 0 is the warm-up
                wall[name].append((time.perf_counter() - t0) / n)
                cpu[name].append((time.process_time() - c0) / n)
    base = statistics.median(wall[names[0]])
    base_cpu = statistics.median(cpu[names[0]])
    print(f"\n{'loop':<38} {'ms/step':>9} {'img/s':>8} {'throughput vs alone':>20} {'CPU-time ratio':>15}")
    for name in names:
        w, c = statistics.median(wall[name]), statistics.median(cpu[name])
        print(
            f"{name:<38} {w * 1e3:>9.1f} {args.batch_size / w:>8.1f} {base / w:>19.2f}x {base_cpu / c:>14.2f}x"
        )
    with contextlib.suppress(Exception):
        t32 = statistics.median(wall["+kd, teacher fp32"])
        t16 = statistics.median(wall["+kd, teacher bf16"])
        print(f"\nteacher in bf16 vs fp32: the distillation step is {t32 / t16:.2f}x faster")


if __name__ == "__main__":
    main()
