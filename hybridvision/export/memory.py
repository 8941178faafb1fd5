"""Peak resident memory of one forward pass, measured in a fresh Python process (Linux)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

__all__ = ["peak_memory"]


#: Run in a fresh interpreter by :func:`peak_memory`: load one model, make its input, reset the
#: resident-set high-water mark (``/proc/self/clear_refs``), run one forward, print the figures.
_PEAK_MEMORY_CHILD = r"""
import json, sys
import numpy as np

def status_mib(field):
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024  # kB -> MiB
    raise OSError(f"no {field} in /proc/self/status")

args = json.loads(sys.argv[1])
x = np.random.default_rng(0).standard_normal(args["shape"]).astype(np.float32)
if args["kind"] == "exported":
    from hybridvision.deploy.runtime import forward_any_size, load_segmenter

    runner = load_segmenter(args["path"], threads=args["threads"], bf16=args["bf16"])
    forward = lambda: forward_any_size(runner, x)  # windows beyond a fixed or largest input size
else:
    import torch

    torch.set_num_threads(args["threads"])
    module = torch.load(args["path"], weights_only=False).eval()
    xt = torch.from_numpy(x)

    def forward():
        with torch.no_grad():
            module(xt)

with open("/proc/self/clear_refs", "w") as fh:
    fh.write("5")  # Linux >= 4.0: VmHWM := VmRSS
baseline = status_mib("VmRSS")
forward()
print(json.dumps({"baseline_mib": baseline, "peak_mib": status_mib("VmHWM")}))
"""


def peak_memory(
    model: nn.Module | str | os.PathLike,
    shape: Sequence[int],
    threads: int = 1,
    timeout: float = 600,
    bf16: bool = False,
) -> dict[str, float]:
    """Resident memory of one forward pass, measured in a fresh Python process (Linux).

    A fresh process, because in this one the allocators already hold the pages a forward needs
    (the latency runs touched them), so the high-water mark would not move.

    Args:
        model: a module (PyTorch eager, pickled to the child) or an exported file: ``.onnx``
            (onnxruntime CPU), ``.xml`` (OpenVINO CPU) or ``.pte`` (ExecuTorch, XNNPACK).
        shape: input (N, C, H, W); standard-normal values.
        threads: PyTorch / runtime intra-op threads.
        timeout: seconds before the measurement is abandoned.
        bf16: OpenVINO's bf16 inference precision (``.xml`` only).

    Returns:
        ``peak_rss_mib`` (the process's resident high-water mark during the forward: runtime,
        weights and activations) and ``forward_mib`` (how far the forward raised it above the
        resident memory just before it).

    Raises:
        RuntimeError: the child failed (e.g. no ``/proc``); the message ends with its last error line.
    """
    root = str(Path(__file__).resolve().parents[2])  # the child imports this package from here
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
    with tempfile.TemporaryDirectory() as tmp:
        if isinstance(model, nn.Module):
            path, kind = Path(tmp) / "model.pt", "torch"
            torch.save(model, path)
        else:
            path, kind = Path(model).resolve(), "exported"
        args = {
            "kind": kind,
            "path": str(path),
            "shape": [int(s) for s in shape],
            "threads": int(threads),
            "bf16": bf16,
        }
        proc = subprocess.run(
            [sys.executable, "-c", _PEAK_MEMORY_CHILD, json.dumps(args)],
            capture_output=True,
            text=True,
            env=env,
            timeout=timeout,
        )
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or [f"exit status {proc.returncode}"])[-1]
        raise RuntimeError(f"peak-memory measurement of {kind} model failed: {last}")
    figures = json.loads(proc.stdout.strip().splitlines()[-1])
    return {
        "peak_rss_mib": figures["peak_mib"],
        "forward_mib": figures["peak_mib"] - figures["baseline_mib"],
    }
