"""The OpenVINO target's tests (tests/openvino_cases.py), run in a child pytest process.

OpenVINO starts thread pools that a later ``fork`` does not survive: in a pytest worker that ran
them, the next DataLoader with workers (``fork`` start method) brought the worker process down
(seen under xdist: the streaming-dataset test after these). In a child process the OpenVINO state
ends with the child.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow  # the cases export, quantize and time several models
def test_openvino_cases_in_a_child_process(tmp_path: Path):
    pytest.importorskip("openvino")
    cmd = [
        sys.executable,
        "-m",
        "pytest",
        "-q",
        "-p",
        "no:cacheprovider",
        str(ROOT / "tests" / "openvino_cases.py"),
    ]
    cmd += ["--basetemp", str(tmp_path / "t"), "-p", "no:xdist"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-2000:]
    assert " passed" in res.stdout and "failed" not in res.stdout.splitlines()[-1]
