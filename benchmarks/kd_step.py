"""KD step cost: what a distillation epoch costs over a plain cross-entropy epoch.

What is measured: the steady-state wall time of one training epoch through Lightning of the
same student, from the same initial weights, on the same data, in three modes:

* CE     ``kd.train.modules.ClassifierModule`` with ``kd.losses.CrossEntropy`` (no teacher);
* cached ``kd.train.modules.DistillationModule`` with ``kd.losses.SoftTargetKD`` and
  ``teacher_inputs=<train x>``: the teacher runs once at fit start, each step looks its logits
  up by sample index (what ``run`` does when the inputs are deterministic);
* online the same with ``teacher_inputs=None``: the teacher's forward pass runs every step.

The teacher is untrained (seeded random weights): its weights do not change its cost. Each
repeat fits CE, cached, online in turn (interleaved) for ``1 + K`` epochs with a ``pl.Trainer``
built like ``kd.run.experiment``'s (no logger, checkpointing or validation); an epoch is the interval
between consecutive ``on_train_epoch_start`` hooks (the last ends at ``on_train_end``), the first
epoch is warm-up and dropped. ``setup`` is the time from ``on_fit_start`` to ``on_train_start``,
where the cached mode runs the teacher over the training split (a one-off per fit, not per epoch).

Target: cached/CE <= 1.1x per epoch (a lookup and a KL term must not cost a teacher pass);
online/CE is reported, not targeted: it grows with the teacher. The ratios are medians of
per-repeat ratios measured side by side in this process; absolute times depend on the machine
and its load and are context only.

Usage: ``.venv/bin/python benchmarks/kd_step.py [--quick] [--threads N]``. Run it on an otherwise
idle machine: with torch's default threads (one per core) any competing process stalls every
parallel op, and the ``[min-max]`` spread and the printed load average show it.
"""

from __future__ import annotations

import argparse
import copy
import inspect
import logging
import os
import platform
import statistics
import time
import warnings
from collections.abc import Callable
from functools import partial
from pathlib import Path

import pytorch_lightning as pl
import torch
from torch import nn

from kd.data import DigitsDataModule, FashionMNISTDataModule, TensorDataModule
from kd.losses import CrossEntropy, SoftTargetKD
from kd.models import MLP, LeNet5
from kd.train.modules import ClassifierModule, DistillationModule

FASHION_ROOT = Path("/usr/share/datasets/fashion-mnist")
SGD = partial(torch.optim.SGD, lr=0.05, momentum=0.9, nesterov=True, weight_decay=5e-4)  # conf/student/scratch.yaml
TARGET = 1.1
MODES = ("CE", "cached", "online")


class Clock(pl.Callback):
    """Marks fit start, train start, every training epoch start, and the end of training."""

    def __init__(self) -> None:
        self.fit_start = self.train_start = 0.0
        self.marks: list[float] = []

    def on_fit_start(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        self.fit_start = time.perf_counter()  # callbacks run before the module's on_fit_start

    def on_train_start(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        self.train_start = time.perf_counter()

    def on_train_epoch_start(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        self.marks.append(time.perf_counter())

    def on_train_end(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        self.marks.append(time.perf_counter())


def fit(mode: str, student: nn.Module, teacher: nn.Module, data: TensorDataModule, epochs: int) -> tuple[float, float]:
    """``(median steady epoch seconds, setup seconds)`` of one fit in ``mode``."""
    k = data.num_classes
    if mode == "CE":
        module: ClassifierModule = ClassifierModule(student, k, SGD, objective=CrossEntropy())
    else:
        cache = data.train.x if mode == "cached" else None  # type: ignore[union-attr]
        # newer versions of the module also take the input shape (to probe feature shapes)
        shape = {"input_shape": data.input_shape} if "input_shape" in inspect.signature(DistillationModule).parameters else {}
        module = DistillationModule(student, teacher, k, SGD, SoftTargetKD(), teacher_inputs=cache, **shape)
    clock = Clock()
    trainer = pl.Trainer(
        accelerator="cpu", devices=1, precision="32-true", logger=False, callbacks=[clock],
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        num_sanity_val_steps=0, limit_val_batches=0, max_epochs=1 + epochs, deterministic=False,
    )  # fmt: skip
    trainer.fit(module, datamodule=data)
    epoch = statistics.median(b - a for a, b in list(zip(clock.marks, clock.marks[1:]))[1:])
    return epoch, clock.train_start - clock.fit_start


def compare(name: str, student: Callable[[], nn.Module], teacher: Callable[[], nn.Module],
            data: TensorDataModule, epochs: int, repeats: int) -> str:  # fmt: skip
    torch.manual_seed(0)
    init, frozen = student(), teacher()
    times: dict[str, list[float]] = {m: [] for m in MODES}
    setups: dict[str, list[float]] = {m: [] for m in MODES}
    for _ in range(repeats):  # interleaved: CE cached online CE cached online ...
        for mode in MODES:
            epoch, setup = fit(mode, copy.deepcopy(init), frozen, data, epochs)
            times[mode].append(epoch)
            setups[mode].append(setup)
    ratios = {m: [a / b for a, b in zip(times[m], times["CE"])] for m in MODES[1:]}
    ratio = {m: statistics.median(r) for m, r in ratios.items()}
    spread = {m: f"[{min(r):.2f}-{max(r):.2f}]" for m, r in ratios.items()}
    ms = {m: statistics.median(times[m]) * 1e3 for m in MODES}
    cache_ms = (statistics.median(setups["cached"]) - statistics.median(setups["CE"])) * 1e3
    ok = "ok" if ratio["cached"] <= TARGET else "MISSED"
    return (f"{name:<36} {epochs:>2}x{repeats:<3} {ms['CE']:>8.1f} {ms['cached']:>8.1f} {ms['online']:>8.1f} "
            f"{cache_ms:>8.1f} {ratio['cached']:>5.2f}x {spread['cached']} <= {TARGET}x {ok:<6} "
            f"{ratio['online']:>5.2f}x {spread['online']}")  # fmt: skip


def quiet() -> None:
    for name in ("pytorch_lightning", "lightning", "lightning.pytorch", "lightning_fabric", "kd"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message=r".*number of training batches.*smaller than the logging interval")
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)")
    warnings.filterwarnings("ignore", message=r".*module\(s\) in eval mode.*")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer scenarios, epochs and repeats (about a minute)")
    parser.add_argument("--threads", type=int, default=0, help="torch.set_num_threads(N); default: torch's own")
    args = parser.parse_args()
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    quiet()
    print(f"machine: processor={platform.processor() or platform.machine()!r} cpus={os.cpu_count()} "
          f"torch threads={torch.get_num_threads()} torch {torch.__version__} lightning {pl.__version__} "
          f"load avg {os.getloadavg()[0]:.2f}")  # fmt: skip
    print("per-epoch ms: median over repeats of each repeat's median steady epoch; ratios: median of per-repeat "
          "ratios to CE [min-max over repeats]; cache ms: setup(cached) - setup(CE). Teachers are untrained (timing only).")
    print(f"{'scenario (student <- teacher)':<36} {'ep x rep':<5} {'CE ms':>8} {'cached':>8} {'online':>8} "
          f"{'cache ms':>8} {'cached/CE [min-max]':>18}  target {'':<6} online/CE [min-max]")  # fmt: skip
    digits = DigitsDataModule()
    digits.setup("fit")
    shape, k = digits.input_shape, digits.num_classes
    ep, rep = (6, 3) if args.quick else (15, 9)
    print(compare("digits MLP[32] <- MLP[256,256]", partial(MLP, k, shape, [32]),
                  partial(MLP, k, shape, [256, 256], 0.2), digits, ep, rep), flush=True)  # fmt: skip
    if not (FASHION_ROOT / "train-images-idx3-ubyte.gz").is_file() and not (FASHION_ROOT / "train-images-idx3-ubyte").is_file():
        print(f"(fashion-mnist skipped: no IDX files in {FASHION_ROOT}; apt-get install dataset-fashion-mnist)")
    else:
        fashion = FashionMNISTDataModule(root=str(FASHION_ROOT), limit_train=20000)
        fashion.setup("fit")
        shape, k = fashion.input_shape, fashion.num_classes
        ep, rep = (1, 3) if args.quick else (2, 5)
        teachers = {"MLP[1200,1200]": partial(MLP, k, shape, [1200, 1200], 0.2), "LeNet5": partial(LeNet5, k, shape)}
        for tname, teacher in list(teachers.items())[: 1 if args.quick else 2]:
            print(compare(f"fmnist20k MLP[32] <- {tname}", partial(MLP, k, shape, [32]), teacher, fashion, ep, rep), flush=True)
    load = os.getloadavg()[0]
    busy = " > cpus: other processes competed, ratios are noisier" if load > (os.cpu_count() or 1) else ""
    print(f"load avg at the end: {load:.2f}{busy}")


if __name__ == "__main__":
    main()
