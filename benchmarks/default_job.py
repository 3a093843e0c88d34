"""The default job, cold, as a whole process, against the same job written by hand.

What is measured (fresh processes, alternating A B A B ...; medians over ``--repeats``):

* A ``kd``: ``python run.py`` on an empty output folder (so the teacher trains, MLflow creates its
  store), progress bar off; and, for context, the same with the teacher cached (``kd warm``).
* B ``hand``: ``benchmarks/hand_default.py``, the same data split, networks, epochs, optimiser,
  schedule, loss and validation-selected student, with torch and scikit-learn only.

Printed: wall seconds and peak RSS of each, and the ratio A/B. Target: kd cold <= 2x the hand
script (issue 21). Absolute times depend on the machine and its load; read the ratio, on an
otherwise idle machine.

Usage: ``.venv/bin/python benchmarks/default_job.py [--repeats 3]``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
from pathlib import Path

from processes import ROOT, timed  # benchmarks/processes.py (the script's folder is on sys.path)

TARGET = 2.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    python = sys.executable
    rows: dict[str, list[tuple[float, float]]] = {"kd": [], "kd warm": [], "hand": []}
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.repeats):
            out = Path(tmp) / f"cold{i}"
            kd = [python, str(ROOT / "run.py"), f"paths.output_root={out}", "trainer.enable_progress_bar=false"]
            rows["hand"].append(timed([python, str(ROOT / "benchmarks" / "hand_default.py")]))
            rows["kd"].append(timed(kd))
            rows["kd warm"].append(timed(kd))  # the teacher just cached
            print(f"repeat {i + 1}: " + "  ".join(f"{k} {v[-1][0]:.1f} s" for k, v in rows.items()), flush=True)
    hand = statistics.median(s for s, _ in rows["hand"])
    print(f"\n{'':<10}{'wall (median)':>14}{'peak RSS':>12}{'/ hand':>9}")
    for name, values in rows.items():
        wall = statistics.median(s for s, _ in values)
        rss = max(m for _, m in values)
        print(f"{name:<10}{wall:>12.1f} s{rss:>8.0f} MiB{wall / hand:>8.2f}x")
    ratio = statistics.median(k[0] / h[0] for k, h in zip(rows["kd"], rows["hand"]))
    print(f"\nkd cold / hand, median of per-repeat ratios: {ratio:.2f}x (target <= {TARGET}x) "
          f"{'ok' if ratio <= TARGET else 'MISSED'}; load average {os.getloadavg()[0]:.2f}")  # fmt: skip


if __name__ == "__main__":
    main()
