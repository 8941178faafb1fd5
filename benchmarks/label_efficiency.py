"""Label-efficiency curves: segmentation quality against the number of labelled training images.

For each dataset: self-supervised pretraining once on every image not used for evaluation (labels
unused), then fine-tuning on a seeded subset of the labelled training split (``data.label_fraction``;
the subset changes with ``train.seed``) from scratch and from the pretrained encoder, at equal
fine-tuning steps, and self-training (``configs/distill/self_training.yaml``: the fine-tuned model
labels the rest of the split and the unlabelled images for a same-size student) on the smallest
fractions, from either teacher. Every run is a stage script with the benchmark configs; nothing is
tuned here.

    python benchmarks/label_efficiency.py                      # both datasets, 3 seeds (see the plan)
    python benchmarks/label_efficiency.py --datasets camvid --jobs 2 --seeds 0 1 2
    python benchmarks/label_efficiency.py --datasets camvid --pretrainings pretrained pretrained_visible_only
    python benchmarks/label_efficiency.py --summarize           # table + plot from finished runs

Runs are resumable: a run whose ``metrics.json`` exists is not run again, so an interrupted plan
continues where it stopped. Results: ``benchmarks/results/label_efficiency.{json,md,png}``; CPU
seconds are the run's own process CPU time (user + system, from ``os.wait4``).

Plan per dataset (``PLANS``): CamVid: pretraining on the 367 train + 101 val frames (the 233 test
frames are the evaluation split), fine-tuning on 5 %, 10 %, 25 % and 100 % of the 367 labelled train
frames; ISBI-2012: pretraining on the 25 training slices not held out + the 30 unlabelled test
slices, fine-tuning on 3, 6 and all 25 labelled slices (slices 25-29 evaluate).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"


@dataclass(frozen=True)
class Plan:
    """What one dataset's curve runs."""

    data: str  # dataset folder
    finetune: str  # fine-tuning config (scratch; the pretrained init is an override)
    pretrain: str  # pretraining config
    pool: dict[str, list[str]]  # split -> ids excluded ([] keeps all): the unlabelled pretraining pool
    fractions: tuple[float, ...]  # data.label_fraction values
    self_training: tuple[float, ...]  # fractions that also get a self-trained student
    overrides: tuple[str, ...] = ()  # extra fine-tuning overrides (both inits)
    distill: tuple[str, ...] = ()  # overrides of configs/distill/self_training.yaml for this dataset
    pretrain_overrides: tuple[str, ...] = field(default=())


ISBI_VAL = ["25", "26", "27", "28", "29"]

PLANS = {
    "camvid": Plan(
        data="../shared/data/camvid",
        finetune="configs/finetune/camvid_scratch.yaml",
        pretrain="configs/pretrain/camvid.yaml",
        pool={"train": [], "val": []},
        fractions=(0.05, 0.1, 0.25, 1.0),
        self_training=(0.05, 0.1),
    ),
    "isbi": Plan(
        data="../shared/data/isbi2012_em",
        finetune="configs/finetune/isbi_scratch.yaml",
        pretrain="configs/pretrain/isbi_em.yaml",
        pool={"train": ISBI_VAL, "test": []},
        fractions=(0.12, 0.24, 1.0),  # 3, 6 and 25 of the 25 labelled slices
        self_training=(0.12,),
        distill=(
            "data.source=../shared/data/isbi2012_em",
            f"data.val_ids=[{','.join(ISBI_VAL)}]",
            "data.ignore_index=255",
            "data.unlabelled_source=../shared/data/isbi2012_em",
            "data.unlabelled_split=test",
            "loss.weights={ce: 1.0, dice: 1.0}",
            "augment.scale=[0.75,1.5]",
            "augment.vflip=true",
            "augment.rot90=true",
            "augment.color_jitter=0.0",
            "eval.mode=slide",
            "eval.window=[256,256]",
            "eval.overlap=0.25",
            "eval.batch_size=1",
        ),
    ),
}


def unlabelled_pool(plan: Plan, out: Path) -> Path:
    """A folder of links to the images pretraining may see (labels unused, evaluation images left out)."""
    out.mkdir(parents=True, exist_ok=True)
    for split, excluded in plan.pool.items():
        for image in sorted((ROOT / plan.data / "images" / split).iterdir()):
            link = out / f"{split}_{image.name}"
            if image.stem not in excluded and not link.exists():
                link.symlink_to(image.resolve())
    return out


def _finished(metrics_file: Path) -> bool:
    """A run's metrics.json exists and is not an interrupted run's (``partial``)."""
    return metrics_file.is_file() and not json.loads(metrics_file.read_text()).get("partial")


@dataclass
class Run:
    """One stage-script invocation and where its metrics land."""

    name: str
    argv: list[str]
    out: Path
    after: tuple[str, ...] = ()  # runs that must finish first

    @property
    def done(self) -> bool:
        return _finished(self.out / "metrics.json") or (self.out / "encoder").is_dir()


#: pretraining variants (method name -> overrides of the dataset's pretraining config); each is one
#: more pretraining run and one more curve. ``pretrained``: the config as it is (contrastive + MIM).
PRETRAININGS = {
    "pretrained": (),
    # MIM encodes visible tokens only; it needs mask cells of whole stride-32 tokens (the configs mask 16 px)
    "pretrained_visible_only": ("objective.visible_only=true", "objective.mask_patch_size=32"),
}


def plan_runs(
    name: str, plan: Plan, seeds: list[int], work: Path, pretrain_steps: int | None, pretrainings: list[str]
) -> list[Run]:
    """Every run of one dataset's curve, in an order that respects their dependencies."""
    py = [sys.executable]
    pool = unlabelled_pool(plan, work / "pool")
    runs: list[Run] = []
    inits: dict[str, list[str]] = {"scratch": []}
    for method in pretrainings:
        pre_out = work / method.replace("pretrained", "pretrain")
        pre = [f"data.source={pool}", f"train.output_dir={pre_out}", *plan.pretrain_overrides]
        pre += list(PRETRAININGS[method])
        if pretrain_steps:
            pre += [f"train.max_steps={pretrain_steps}", f"train.ckpt_every={pretrain_steps}"]
        runs.append(
            Run(f"{name}/{pre_out.name}", [*py, "pretrain/run.py", "--config", plan.pretrain, *pre], pre_out)
        )
        inits[method] = ["model.name=", f"model.init={pre_out / 'encoder'}"]
    for seed in seeds:
        for fraction in plan.fractions:
            for init, extra in inits.items():
                out = work / f"{init}_f{fraction}_s{seed}"
                argv = [*py, "finetune/run.py", "--config", plan.finetune, *plan.overrides, *extra]
                argv += [f"data.label_fraction={fraction}", f"train.seed={seed}", f"train.output_dir={out}"]
                after = (f"{name}/{init.replace('pretrained', 'pretrain')}",) if init != "scratch" else ()
                runs.append(Run(f"{name}/{out.name}", argv, out, after))
    for seed in seeds:
        for fraction in plan.self_training:
            for init in ("scratch", "pretrained"):
                teacher = work / f"{init}_f{fraction}_s{seed}"
                out = work / f"{init}+self_training_f{fraction}_s{seed}"
                argv = [
                    *py,
                    "distill/run.py",
                    "--config",
                    "configs/distill/self_training.yaml",
                    *plan.distill,
                ]
                argv += [
                    f"teacher={teacher / 'model'}",
                    f"student.init={teacher / 'model'}",
                    f"data.label_fraction={fraction}",
                    f"train.seed={seed}",
                    f"train.output_dir={out}",
                ]
                runs.append(Run(f"{name}/{out.name}", argv, out, (f"{name}/{teacher.name}",)))
    return runs


def execute(runs: list[Run], jobs: int, log_dir: Path) -> None:
    """Run what is not done yet, ``jobs`` at a time, each after the runs it depends on."""
    log_dir.mkdir(parents=True, exist_ok=True)
    finished = {r.name for r in runs if r.done}
    failed: set[str] = set()
    pending = [r for r in runs if not r.done]
    print(
        f"{len(runs) - len(pending)} of {len(runs)} runs already done; {len(pending)} to go, {jobs} at a time"
    )

    def one(run: Run) -> tuple[str, int]:
        log = log_dir / f"{run.name.replace('/', '__')}.log"
        start = time.time()
        with open(log, "w") as fh:
            fh.write(shlex.join(run.argv) + "\n")
            fh.flush()
            proc = subprocess.Popen(run.argv, cwd=ROOT, stdout=fh, stderr=subprocess.STDOUT)
            _, status, usage = os.wait4(proc.pid, 0)
            proc.returncode = os.waitstatus_to_exitcode(status)
        cpu = usage.ru_utime + usage.ru_stime
        if proc.returncode == 0:
            (run.out / "label_efficiency_run.json").write_text(
                json.dumps(
                    {"cpu_s": round(cpu, 1), "wall_s": round(time.time() - start, 1), "argv": run.argv}
                )
            )
        print(
            f"  {run.name}: exit {proc.returncode}, {cpu:.0f} CPU-s, {time.time() - start:.0f} s ({log})",
            flush=True,
        )
        return run.name, proc.returncode

    with ThreadPoolExecutor(jobs) as pool:
        futures: dict = {}
        while pending or futures:
            ready = [r for r in pending if all(a in finished for a in r.after)]
            blocked = [r for r in pending if any(a in failed for a in r.after)]
            for r in blocked:
                print(f"  {r.name}: skipped, {[a for a in r.after if a in failed]} failed")
                failed.add(r.name)
                pending.remove(r)
            for r in ready[: max(0, jobs - len(futures))]:
                pending.remove(r)
                futures[pool.submit(one, r)] = r
            if not futures:
                break
            done = next(iter(_first_done(futures)))
            name, code = done.result()
            del futures[done]
            (finished if code == 0 else failed).add(name)
    if failed:
        print(f"failed: {sorted(failed)} (logs in {log_dir})")


def _first_done(futures: dict):
    from concurrent.futures import FIRST_COMPLETED, wait

    return wait(list(futures), return_when=FIRST_COMPLETED).done


# ------------------------------------------------------------------------------------------- results


def _score(metrics: dict, binary: bool) -> float:
    """mIoU (CamVid) or foreground IoU (ISBI membranes) of a fine-tuning or distillation metrics.json."""
    m = metrics.get("student", metrics)  # distill/run.py: {"student": {...}, "teacher": {...}}
    return float(m["iou"][1] if binary else m["miou"])


def collect(work_root: Path) -> list[dict]:
    """One row per finished run: dataset, method, fraction, seed, labelled images, score, CPU seconds."""
    rows = []
    for name in PLANS:
        work = work_root / name
        if not work.is_dir():
            continue
        pre_cpu = {m: _cpu(work / m.replace("pretrained", "pretrain")) for m in PRETRAININGS}
        for run in sorted(work.iterdir()):
            metrics_file = run / "metrics.json"
            if "_f" not in run.name or not _finished(metrics_file):
                continue
            metrics = json.loads(metrics_file.read_text())
            method, rest = run.name.rsplit("_f", 1)
            fraction, seed = rest.split("_s")
            teacher = work / run.name.replace("+self_training", "") / "metrics.json"  # a student's labels
            ids = metrics.get("labelled_ids") or json.loads(teacher.read_text()).get("labelled_ids")
            labelled = len(ids) if ids else "all"
            rows.append(
                {
                    "dataset": name,
                    "method": method,
                    "fraction": float(fraction),
                    "seed": int(seed),
                    "labelled": labelled,
                    "score": round(_score(metrics, name == "isbi"), 4),
                    "cpu_s": _cpu(run),
                    "pretrain_cpu_s": pre_cpu.get(method.split("+")[0]) if "pretrained" in method else 0.0,
                }
            )
    return rows


def _cpu(run: Path) -> float | None:
    info = run / "label_efficiency_run.json"
    return json.loads(info.read_text())["cpu_s"] if info.is_file() else None


def _cpu_text(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds:.0f}"


def summary_table(rows: list[dict]) -> str:
    """Markdown: per dataset, method and fraction, the mean score over seeds with its min-max."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["dataset"], r["method"], r["fraction"]), []).append(r)
    lines = [
        "| dataset | method | labelled fraction | labelled images | seeds | score mean (min-max) | "
        "fine-tune / student CPU-s | pretraining CPU-s |",
        "|---|---|---:|---:|---:|---|---:|---:|",
    ]
    for (dataset, method, fraction), rs in sorted(groups.items()):
        scores = [r["score"] for r in rs]
        cpu = [r["cpu_s"] for r in rs if r["cpu_s"] is not None]
        labelled = sorted({str(r["labelled"]) for r in rs})
        lines.append(
            f"| {dataset} | {method} | {fraction:g} | {'/'.join(map(str, labelled)) or '-'} | {len(rs)} | "
            f"{statistics.mean(scores):.4f} ({min(scores):.4f}-{max(scores):.4f}) | "
            f"{_cpu_text(statistics.mean(cpu) if cpu else None)} | {_cpu_text(rs[0]['pretrain_cpu_s'])} |"
        )
    lines.append("")
    lines.append("Score: CamVid test mIoU (11 classes); ISBI membrane (foreground) IoU on slices 25-29.")
    return "\n".join(lines)


COLOURS = {
    "scratch": (80, 80, 80),
    "pretrained": (31, 119, 180),
    "pretrained_visible_only": (148, 103, 189),
    "scratch+self_training": (255, 127, 14),
    "pretrained+self_training": (44, 160, 44),
}


def plot(rows: list[dict], path: Path, panel: tuple[int, int] = (460, 360)) -> None:
    """Score against labelled fraction (log x), one line per method, the seed range as a band (PIL only)."""
    from PIL import Image, ImageDraw

    datasets = [d for d in PLANS if any(r["dataset"] == d for r in rows)]
    img = Image.new("RGB", (panel[0] * max(1, len(datasets)), panel[1]), "white")
    draw = ImageDraw.Draw(img)
    for k, dataset in enumerate(datasets):
        _panel(draw, dataset, [r for r in rows if r["dataset"] == dataset], k * panel[0], panel)
    img.save(path)


def _panel(draw, dataset: str, rows: list[dict], x0: int, panel: tuple[int, int], margin: int = 50) -> None:
    width, h = panel
    fractions = sorted({r["fraction"] for r in rows})
    lo = min(r["score"] for r in rows) - 0.01
    hi = max(r["score"] for r in rows) + 0.01
    first, last = math.log10(fractions[0]), math.log10(fractions[-1])

    def px(f: float, s: float) -> tuple[float, float]:
        x = x0 + margin + (math.log10(f) - first) / ((last - first) or 1.0) * (width - 2 * margin)
        return x, h - margin - (s - lo) / (hi - lo) * (h - 2 * margin)

    black = (0, 0, 0)
    draw.rectangle([x0 + margin, margin, x0 + width - margin, h - margin], outline=black)
    score = "membrane IoU" if dataset == "isbi" else "mIoU"
    draw.text((x0 + margin, 10), f"{dataset}: {score} vs labelled fraction (log)", fill=black)
    for f in fractions:
        draw.text((px(f, lo)[0] - 10, h - margin + 5), f"{f:g}", fill=black)
    for s in (lo, (lo + hi) / 2, hi):
        draw.text((x0 + 5, px(fractions[0], s)[1] - 5), f"{s:.3f}", fill=black)
    curves: dict[str, dict[float, list[float]]] = {}
    for r in rows:
        curves.setdefault(r["method"], {}).setdefault(r["fraction"], []).append(r["score"])
    for method, by_f in curves.items():  # every band first, so no band hides a line
        pts = sorted(by_f)
        if len(pts) > 1:
            band = [px(f, max(by_f[f])) for f in pts] + [px(f, min(by_f[f])) for f in reversed(pts)]
            draw.polygon(band, fill=tuple(int(c + (255 - c) * 0.8) for c in COLOURS.get(method, black)))
    for i, (method, colour) in enumerate(COLOURS.items()):
        by_f = curves.get(method, {})
        if not by_f:
            continue
        line = [px(f, statistics.mean(by_f[f])) for f in sorted(by_f)]
        if len(line) > 1:
            draw.line(line, fill=colour, width=2)
        for x, y in line:
            draw.ellipse([x - 3, y - 3, x + 3, y + 3], fill=colour)
        draw.text((x0 + margin + 5, h - margin - 14 * (len(COLOURS) - i)), method, fill=colour)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--datasets", nargs="+", default=list(PLANS), choices=list(PLANS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--jobs", type=int, default=2, help="runs at a time (each with OMP_NUM_THREADS=1)")
    parser.add_argument(
        "--pretrain-steps", type=int, default=300, help="pretraining steps (the config's batch)"
    )
    parser.add_argument(
        "--pretrainings",
        nargs="+",
        default=["pretrained"],
        choices=list(PRETRAININGS),
        help="pretraining curves",
    )
    parser.add_argument("--fractions", nargs="+", type=float, help="label fractions instead of the plan's")
    parser.add_argument(
        "--finetune-steps", type=int, help="fine-tuning / student steps instead of the configs'"
    )
    parser.add_argument("--no-self-training", action="store_true", help="only the fine-tuning curves")
    parser.add_argument("--work", default="runs/label_efficiency", help="run folders (resumable)")
    parser.add_argument(
        "--results-name", default="label_efficiency", help="benchmarks/results/<name>.{json,md,png}"
    )
    parser.add_argument("--summarize", action="store_true", help="only write the table and plot")
    args = parser.parse_args()
    os.environ["OMP_NUM_THREADS"] = "1"
    work_root = ROOT / args.work
    if not args.summarize:
        for name in args.datasets:
            plan = PLANS[name]
            if not (ROOT / plan.data).is_dir():
                print(f"{name}: skipped, {plan.data} not found")
                continue
            changes: dict = {}
            if args.fractions:
                changes["fractions"] = tuple(args.fractions)
                changes["self_training"] = tuple(f for f in plan.self_training if f in args.fractions)
            if args.no_self_training:
                changes["self_training"] = ()
            if args.finetune_steps:
                steps = (f"train.max_steps={args.finetune_steps}", f"train.ckpt_every={args.finetune_steps}")
                changes["overrides"] = (*plan.overrides, *steps)
                changes["distill"] = (*plan.distill, *steps)
            plan = dataclasses.replace(plan, **changes)
            runs = plan_runs(name, plan, args.seeds, work_root / name, args.pretrain_steps, args.pretrainings)
            execute(runs, args.jobs, work_root / "logs")
    rows = collect(work_root)
    RESULTS.mkdir(parents=True, exist_ok=True)
    cpu = platform.processor() or platform.machine()
    flags = (
        sorted(
            set(open("/proc/cpuinfo").read().split()) & {"avx512_bf16", "amx_bf16", "avx512_vnni", "avx512f"}
        )
        if Path("/proc/cpuinfo").is_file()
        else []
    )
    (RESULTS / f"{args.results_name}.json").write_text(
        json.dumps({"cpu": cpu, "cpu_flags": flags, "rows": rows}, indent=1)
    )
    table = summary_table(rows)
    (RESULTS / f"{args.results_name}.md").write_text(table + f"\n\nCPU flags: {', '.join(flags)}\n")
    if rows:
        plot(rows, RESULTS / f"{args.results_name}.png")
    print(table)


if __name__ == "__main__":
    main()
