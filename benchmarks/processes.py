"""Timing whole processes for the benchmarks: wall seconds and the child's own peak RSS."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def timed(argv: list[str]) -> tuple[float, float]:
    """(wall seconds, peak RSS in MiB) of one process run from the repository root (its own
    rusage, through wait4); exits with its stderr when it fails."""
    start = time.perf_counter()
    child = subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                             env=os.environ | {"MLFLOW_TRACKING_URI": ""})  # fmt: skip
    stderr = child.stderr.read()
    _, status, usage = os.wait4(child.pid, 0)
    seconds = time.perf_counter() - start
    child.returncode = os.waitstatus_to_exitcode(status)
    if child.returncode != 0:
        sys.exit(f"failed: {' '.join(argv)}\n{stderr[-3000:]}")
    return seconds, usage.ru_maxrss / 1024
