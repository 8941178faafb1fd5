"""``benchmarks/gpu_check.sh --dry-run``: every command of the GPU check, at tiny size on the CPU.

The GPU run itself is not part of the suite (no GPU here); this keeps its commands and keys from
rotting and checks what the script checks: each section ran, the resume resumed, the logs name the
models, the ONNX model ran, the peers printed their rows, and the work directory is cleaned up.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SECTIONS = [
    "1. environment",
    "2. pretrain (no)",
    "3. finetune (no, EMA on)",
    "4. resume (no)",
    "5. distill (no) with ONNX export",
    "6. onnxruntime",
    "7. peers",
    "8. fsdp",
    "9. summary",
]


@pytest.mark.slow  # about a minute: seven stage runs, an export, the peers
def test_gpu_check_dry_run_runs_every_section(tmp_path: Path):
    log = tmp_path / "results" / "gpu_check.txt"
    # a short TMPDIR: DataLoader workers pass tensors over AF_UNIX sockets made there, whose paths
    # may not exceed 107 bytes (pytest's tmp_path is longer: the workers would fail and the run hang)
    temp = Path(tempfile.mkdtemp(prefix="gc", dir="/tmp"))
    env = {**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1", "TMPDIR": str(temp)}
    res = subprocess.run(
        ["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--dry-run", "--log", str(log)],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=400,
    )
    out = res.stdout
    assert res.returncode == 0, out[-4000:] + res.stderr[-2000:]
    headers = [line for line in out.splitlines() if line.startswith("== ")]
    for section, header in zip(SECTIONS, headers, strict=True):  # each once, in order
        assert header.startswith(f"== {section}"), (section, header)
    assert log.read_text() == out  # the log is the whole output
    assert re.search(r"resumed from .*step_00000(\d+) at step \d+", out)
    assert "the interrupted run exited" not in out
    # the logs name what they built (model, encoder, decoder, parameters)
    assert re.search(
        r"\nmodel hybrid_nano \(encoder hybrid_nano, decoder segformer_mlp\): [\d.]+ M parameters", out
    )
    assert re.search(r"\nstudent model unet_resnet_nano \(encoder resnet_nano, decoder unet\): [\d.]+ M", out)
    assert re.search(r"CPUExecutionProvider +output \(2, 4, 64, 64\) .* argmax agreement 100\.000%", out)
    assert "has no CUDAExecutionProvider" in out or "CUDAExecutionProvider " in out
    for row in (
        "ours segformer_nano",
        "transformers SegFormer (tiny)",
        "transformers SimMIM (swin_nano config)",
    ):
        assert re.search(rf"\n{re.escape(row)} +no +[\d.]+ +[\d.]+ +[\d.]+", out), row
    assert "skipped in --dry-run" in out
    summary = out.split("== 9. summary")[1].splitlines()[1:-1]
    assert [line.split()[0] for line in summary] == ["pretrain_no", "finetune_no", "resume", "distill_no"]
    assert out.rstrip().splitlines()[-1].startswith("gpu_check: all sections passed")
    assert list(temp.glob("gpu_check.*")) == []  # the work directory is removed after a passing run
    shutil.rmtree(temp, ignore_errors=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results"]  # nothing in the cwd


def test_gpu_check_rejects_unknown_options(tmp_path: Path):
    res = subprocess.run(
        ["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--dryrun"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert res.returncode == 2 and "unknown option --dryrun" in res.stderr
    assert list(tmp_path.iterdir()) == []  # nothing started, nothing written


@pytest.mark.parametrize(
    "name, peak",
    [
        ("NVIDIA H200", 989.0),
        ("NVIDIA H100 80GB HBM3", 989.0),
        ("NVIDIA H100 PCIe", 756.0),
        ("NVIDIA A100-SXM4-80GB", 312.0),  # not the A10's 125
        ("NVIDIA L40S", 362.0),
        ("NVIDIA L4", 121.0),
        ("NVIDIA A10G", None),  # no published figure: MFU against the measured matmul only
        ("NVIDIA GeForce GTX 1080", None),
    ],
)
def test_peak_table_matches_the_most_specific_name(name: str, peak: float | None):
    spec = importlib.util.spec_from_file_location("_gpu_peers", ROOT / "benchmarks" / "gpu_peers.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.table_peak_tflops(name) == peak
