"""Feature-distillation step cost: ``kd_at`` (soft targets + attention transfer) vs ``kd``.

What is measured, on digits with a small CNN pair (student resnet8 <- teacher resnet20, the
default AT pairs layer1..3): the steady-state wall time of one training epoch through Lightning
(same student init, same data, interleaved repeats, first epoch dropped, as in ``kd_step.py``)
for

* ``kd``     soft targets with the teacher run online every step (what ``kd_at`` must do too);
* ``kd_at``  the same plus forward hooks on three layer pairs and the attention-transfer term;
* ``cached`` soft targets with cached teacher logits (the default for ``kd``), for context.

and, each in a fresh subprocess, the peak resident memory (``ru_maxrss``) after a few epochs,
which shows whether captured activations outlive their step (they must not: memory would grow).

Target: ``kd_at / kd <= 1.3x`` per epoch. Ratios are medians of per-repeat ratios measured side
by side in one process; absolute times are context only. Run on an otherwise idle machine.

Usage: ``.venv/bin/python benchmarks/feature_step.py [--quick]``
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import statistics
import subprocess
import sys

import pytorch_lightning as pl
import torch

from kd.data import DigitsDataModule
from kd.losses import AttentionTransfer, SoftTargetKD
from kd.models import CIFARResNet
from kd.train.modules import DistillationModule
from kd_step import SGD, Clock, quiet  # benchmarks/ is on sys.path when run as a script

MODES = ("kd", "kd_at", "cached")
TARGET = 1.3


def build(mode: str, data: DigitsDataModule) -> DistillationModule:
    torch.manual_seed(0)
    shape, k = data.input_shape, data.num_classes
    student = CIFARResNet(k, shape, depth=8)
    teacher = CIFARResNet(k, shape, depth=20)
    features = {}
    if mode == "kd_at":
        pairs = [{"student": f"layer{i}", "teacher": f"layer{i}"} for i in (1, 2, 3)]
        features = {"at": AttentionTransfer(pairs=pairs)}
    cache = data.train.x if mode == "cached" else None
    return DistillationModule(student, teacher, k, SGD, SoftTargetKD(features=features), shape, teacher_inputs=cache)


def epoch_seconds(module: DistillationModule, data: DigitsDataModule, epochs: int) -> float:
    clock = Clock()
    trainer = pl.Trainer(
        accelerator="cpu", devices=1, logger=False, callbacks=[clock], enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
        limit_val_batches=0, max_epochs=1 + epochs,
    )  # fmt: skip
    trainer.fit(module, datamodule=data)
    return statistics.median(b - a for a, b in list(zip(clock.marks, clock.marks[1:]))[1:])


def peak_rss_mib(mode: str, epochs: int) -> float:
    """Peak RSS of a fresh process that fits ``mode`` for ``epochs`` epochs."""
    out = subprocess.run(
        [sys.executable, __file__, "--peak", mode, "--epochs", str(epochs)],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    return float(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer epochs and repeats (about a minute)")
    parser.add_argument("--peak", choices=MODES, help=argparse.SUPPRESS)  # internal: one subprocess
    parser.add_argument("--epochs", type=int, default=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    quiet()
    data = DigitsDataModule()
    data.setup("fit")
    if args.peak:
        epoch_seconds(build(args.peak, data), data, args.epochs)
        print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)  # KiB -> MiB on Linux
        return

    print(f"machine: processor={platform.processor() or platform.machine()!r} cpus={os.cpu_count()} "
          f"torch threads={torch.get_num_threads()} torch {torch.__version__} load avg {os.getloadavg()[0]:.2f}")
    epochs, repeats = (3, 3) if args.quick else (8, 7)
    times: dict[str, list[float]] = {m: [] for m in MODES}
    for _ in range(repeats):  # interleaved: kd kd_at cached kd kd_at cached ...
        for mode in MODES:
            times[mode].append(epoch_seconds(build(mode, data), data, epochs))
    ratios = {m: [a / b for a, b in zip(times[m], times["kd"])] for m in MODES}
    peaks = {m: peak_rss_mib(m, epochs) for m in MODES}
    print(f"digits, student resnet8 <- teacher resnet20, batch {data.batch_size}, {epochs} epochs x {repeats} repeats")
    print(f"{'mode':<8} {'epoch ms':>9} {'vs kd [min-max]':>20} {'peak RSS MiB':>13}")
    for m in MODES:
        r = ratios[m]
        print(f"{m:<8} {statistics.median(times[m]) * 1e3:>9.1f} "
              f"{statistics.median(r):>8.2f}x [{min(r):.2f}-{max(r):.2f}] {peaks[m]:>13.0f}")  # fmt: skip
    verdict = "ok" if statistics.median(ratios["kd_at"]) <= TARGET else "MISSED"
    print(f"kd_at/kd target <= {TARGET}x: {verdict}; load avg at the end {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
