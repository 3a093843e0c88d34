"""A 9-job T x alpha sweep of the default job, packed (``hydra/launcher=packed``) and one by one
(the basic launcher), against one job; and one training step of a pack of 9 students against the
hand loop's step for one.

Part 1, whole processes (``python run.py``), one MLflow store and teacher cache in a temporary
folder, the teacher trained first (not timed into the ratios); then, ``--repeats`` times in turn:
one student job ``t1``, the 9-job sweep packed ``tp`` and (unless ``--no-basic``) one by one
``tb``. Ratios ``tp / t1`` (target <= 3) and ``tb / t1``; medians; peak RSS of each process
(a pack of 9 default students must fit in 2 GB).

Part 2, in this process: the steady-state time of one training step (forward, loss, backward,
optimiser step) of ``PackedStudents`` with 9 default students (MLP[32], cached teacher logits,
digits batch 64) divided by 9, against the hand loop's step for one student (``F.cross_entropy``
+ KL on the same batch); target <= 1.2x per student.

Usage: ``.venv/bin/python benchmarks/packed_sweep.py [--repeats 2] [--quick] [--no-basic]``. Run it
on an otherwise idle machine; absolute times are context only.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from functools import partial

import torch
import torch.nn.functional as F

from processes import ROOT, timed  # benchmarks/processes.py (the script's folder is on sys.path)

sys.path.insert(0, str(ROOT))
GRID = ("distill.temperature=1,4,8", "distill.alpha=0.1,0.5,0.9")
SWEEP_TARGET, STEP_TARGET = 3.0, 1.2


def sweeps(repeats: int, quick: bool, basic: bool) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        common = [f"paths.output_root={tmp}", "trainer.enable_progress_bar=false", "callbacks.progress=null",
                  *(["trainer.max_epochs=5", "teacher.max_epochs=5"] if quick else [])]  # fmt: skip
        python = [sys.executable, str(ROOT / "run.py")]
        cold = timed([*python, *common, "tracking.experiment=warm"])
        print(f"teacher trained and cached: {cold[0]:.1f} s (context)", flush=True)
        rows: dict[str, list[tuple[float, float]]] = {"one job": [], "9 packed": [], **({"9 one by one": []} if basic else {})}
        for i in range(repeats):
            rows["one job"].append(timed([*python, *common]))
            rows["9 packed"].append(timed([*python, "-m", "hydra/launcher=packed", *common, *GRID]))
            if basic:
                rows["9 one by one"].append(timed([*python, "-m", *common, *GRID]))
            print(f"repeat {i + 1}: " + "  ".join(f"{k} {v[-1][0]:.1f} s" for k, v in rows.items()), flush=True)
    one = statistics.median(s for s, _ in rows["one job"])
    print(f"\n{'':<14}{'wall (median)':>14}{'peak RSS':>12}{'/ one job':>11}")
    for name, values in rows.items():
        wall = statistics.median(s for s, _ in values)
        print(f"{name:<14}{wall:>12.1f} s{max(m for _, m in values):>8.0f} MiB{wall / one:>10.2f}x")
    ratio = statistics.median(p[0] / o[0] for p, o in zip(rows["9 packed"], rows["one job"]))
    print(f"9-job sweep packed / one job: {ratio:.2f}x (target <= {SWEEP_TARGET}x) {'ok' if ratio <= SWEEP_TARGET else 'MISSED'}")


def steps(repeats: int) -> None:
    from kd.data import DigitsDataModule
    from kd.losses import SoftTargetKD
    from kd.models import MLP
    from kd.train.packed import PackedStudents

    data = DigitsDataModule()
    data.setup("fit")
    x, y = data.train.x[:64], data.train.y[:64]
    teacher = torch.randn(len(data.train.y), 10)
    index = torch.arange(64)
    n = 9

    def lone_step(model, opt):
        logits = model(x)
        t = 4.0
        kl = F.kl_div(F.log_softmax(logits / t, 1), F.log_softmax(teacher[index] / t, 1), reduction="batchmean", log_target=True)
        loss = 0.9 * t * t * kl + 0.1 * F.cross_entropy(logits, y)
        opt.zero_grad()
        loss.backward()
        opt.step()

    students = [MLP(10, (1, 8, 8), hidden=[32]) for _ in range(n)]
    pack = PackedStudents(students, [SoftTargetKD() for _ in range(n)], [partial(torch.optim.SGD, lr=0.05, momentum=0.9)] * n, None, None, None)
    pack.cached_teacher_logits = teacher
    pack.teacher = torch.nn.Identity()  # looked up, never run
    for o in pack.objectives:
        o.start_epoch(0, 1)
    pack.trainer = None
    optimizer = pack.configure_optimizers()
    xs, ys, idx = x.expand(n, *x.shape), y.expand(n, 64), index.expand(n, 64)

    def pack_step():
        loss = pack.training_step((xs, ys, idx), 0)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    alone = MLP(10, (1, 8, 8), hidden=[32])
    lone_opt = torch.optim.SGD(alone.parameters(), lr=0.05, momentum=0.9)

    def per_step(fn, count=300):
        for _ in range(30):
            fn()
        start = time.perf_counter()
        for _ in range(count):
            fn()
        return (time.perf_counter() - start) / count

    hand, packed = [], []
    for _ in range(repeats):
        hand.append(per_step(lambda: lone_step(alone, lone_opt)))
        packed.append(per_step(pack_step) / n)
    h, p = statistics.median(hand), statistics.median(packed)
    print(f"\ntraining step, digits MLP[32] batch 64, {torch.get_num_threads()} thread(s): hand loop {h * 1e3:.3f} ms/student, "
          f"pack of {n}: {p * 1e3:.3f} ms/student -> {p / h:.2f}x (target <= {STEP_TARGET}x) {'ok' if p / h <= STEP_TARGET else 'MISSED'}")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="5-epoch jobs")
    parser.add_argument("--no-basic", action="store_true", help="skip the one-by-one sweep (the slow part)")
    args = parser.parse_args()
    steps(max(3, args.repeats))
    sweeps(args.repeats, args.quick, not args.no_basic)
    print(f"load average at the end: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
