"""A T x alpha sweep of N students against N times one student, the teacher shared and cached.

What is measured, with the real command line (``python run.py``, fresh processes, one MLflow
store and teacher cache in a temporary folder):

0. one job that trains and caches the teacher (not timed into the ratio; printed for context);
1. one student job of the default recipe, the teacher now reused from the cache: ``t1``;
2. ``python run.py -m distill.temperature=... distill.alpha=...``: N students in one Hydra
   multirun (basic launcher, one after another), the same teacher reused by every job: ``tN``.

Ratio ``tN / (N * t1)``; target <= 1.1 (a sweep costs no more than its students: no teacher
retrained, no per-job overhead beyond the student's own). Steps 1 and 2 alternate ``--repeats``
times and the medians are used. Absolute times are context only; run on an idle machine.

Usage: ``.venv/bin/python benchmarks/sweep.py [--quick] [-- extra overrides]``, e.g.
``-- data=fashion_mnist model@student.model=lenet5``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TEMPERATURES, ALPHAS = ("1", "4", "8"), ("0.5", "0.9")
TARGET = 1.1


def timed(argv: list[str]) -> float:
    start = time.perf_counter()
    done = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, env=os.environ | {"MLFLOW_TRACKING_URI": ""})
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        sys.exit(f"failed: {' '.join(argv)}\n{done.stderr[-3000:]}")
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="short epochs, 2 x 2 grid, one repeat")
    parser.add_argument("--repeats", type=int, default=0, help="alternations of (one job, sweep); default 2, quick 1")
    parser.add_argument("extra", nargs="*", help="overrides for every job")
    args = parser.parse_args()
    temps, alphas = (TEMPERATURES[1:], ALPHAS) if args.quick else (TEMPERATURES, ALPHAS)
    repeats = args.repeats or (1 if args.quick else 2)
    n = len(temps) * len(alphas)
    with tempfile.TemporaryDirectory() as tmp:
        common = [
            f"paths.output_root={tmp}", "trainer.enable_progress_bar=false", "callbacks.progress=null",
            *(["trainer.max_epochs=5", "teacher.max_epochs=5"] if args.quick else []), *args.extra,
        ]  # fmt: skip
        python = [sys.executable, str(ROOT / "run.py")]
        cold = timed([*python, *common, "tracking.experiment=warm"])
        ones, sweeps = [], []
        for _ in range(repeats):
            ones.append(timed([*python, *common, "tracking.experiment=one"]))
            grid = [f"distill.temperature={','.join(temps)}", f"distill.alpha={','.join(alphas)}"]
            sweeps.append(timed([*python, "-m", *common, *grid, "tracking.experiment=sweep"]))
    t1, tn = statistics.median(ones), statistics.median(sweeps)
    ratio = tn / (n * t1)
    print(f"cpus {os.cpu_count()}; overrides: {' '.join(common[3:]) or '(default job)'}; medians of {repeats} repeat(s)")
    print(f"first job (teacher trained and cached): {cold:.1f} s")
    print(f"one student job, teacher from the cache: t1 = {t1:.1f} s  {[round(t, 1) for t in ones]}")
    print(f"sweep of N = {n} students (T in {temps}, alpha in {alphas}): tN = {tn:.1f} s  {[round(t, 1) for t in sweeps]}")
    print(f"tN / (N x t1) = {ratio:.2f}  (target <= {TARGET}: {'ok' if ratio <= TARGET else 'MISSED'})")


if __name__ == "__main__":
    main()
