"""Framework overhead: one student training epoch through Lightning vs a hand-written loop.

What is measured: the steady-state wall time of one training epoch of the same network, from
the same initial weights, on the same in-memory training tensors, with the same optimiser
(SGD as in ``conf/student/scratch.yaml``, no scheduler) and batch size, shuffled every epoch:

* A ``Lightning``: ``kd.train.modules.ClassifierModule`` with ``kd.losses.CrossEntropy`` fitted by a
  ``pl.Trainer`` built like ``kd.run.experiment`` builds one (cpu, 32-true, no logger, checkpointing,
  progress bar, model summary, sanity or validation batches), data served by the data module's
  own ``train_dataloader``. An epoch is the interval between consecutive
  ``on_train_epoch_start`` hooks (the last one ends at ``on_train_end``), so the per-epoch metric
  computation and logging that Lightning does after ``on_train_epoch_end`` count too.
* B ``hand``: ``randperm`` + index gather; ``loss = F.cross_entropy(model(x), y);
  opt.zero_grad(); loss.backward(); opt.step()``, timed between the same points.

Each repeat runs A then B (A B A B ...) for ``1 + K`` epochs each; the first epoch is warm-up
and dropped, the rest give that repeat's median epoch time. The table prints, per scenario,
the median over repeats of A and of B and the median of the per-repeat ratios A/B. Scenarios:
sklearn digits (default student MLP[32], default teacher-size MLP[256,256]) and a 20,000-image
slice of Fashion-MNIST (MLP[256,256], LeNet5; skipped with a note when the data is missing).

Target: Lightning/hand within 1.05x. Read the ratio column only; absolute times depend on the
machine and its load and are printed for context, never as targets. Where the model step is
tiny (digits, MLP[32]) the ratio measures Lightning's fixed per-step cost, not the model.
Finally one full ``kd.run.experiment.run(cfg)`` of the default job is timed once, for context
(``--quick``: with the tests' short epochs).

Usage: ``.venv/bin/python benchmarks/overhead.py [--quick] [--threads N]``. Run it on an otherwise
idle machine: with torch's default threads (one per core) any competing process stalls every
parallel op, and the ``[min-max]`` spread and the printed load average show it.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import io
import logging
import os
import platform
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable
from functools import partial
from pathlib import Path

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import nn

from kd.data import DigitsDataModule, FashionMNISTDataModule, TensorDataModule
from kd.losses import CrossEntropy
from kd.models import MLP, LeNet5
from kd.train.modules import ClassifierModule

ROOT = Path(__file__).resolve().parents[1]
FASHION_ROOT = Path("/usr/share/datasets/fashion-mnist")
# conf/student/scratch.yaml's optimiser (its cosine scheduler is left out of both sides)
SGD = partial(torch.optim.SGD, lr=0.05, momentum=0.9, nesterov=True, weight_decay=5e-4)
TARGET = 1.05


class EpochClock(pl.Callback):
    """Marks the start of every training epoch and the end of training."""

    def __init__(self) -> None:
        self.marks: list[float] = []

    def on_train_epoch_start(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        self.marks.append(time.perf_counter())

    def on_train_end(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        self.marks.append(time.perf_counter())


def steady_epoch(marks: list[float]) -> float:
    """Median epoch time after the first (warm-up) epoch."""
    return statistics.median(b - a for a, b in list(zip(marks, marks[1:]))[1:])


def lightning_epoch(model: nn.Module, data: TensorDataModule, epochs: int) -> float:
    clock = EpochClock()
    trainer = pl.Trainer(
        accelerator="cpu", devices=1, precision="32-true", logger=False, callbacks=[clock],
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        num_sanity_val_steps=0, limit_val_batches=0, max_epochs=epochs, deterministic=False,
    )  # fmt: skip
    trainer.fit(ClassifierModule(model, data.num_classes, SGD, objective=CrossEntropy()), datamodule=data)
    return steady_epoch(clock.marks)


def hand_epoch(model: nn.Module, data: TensorDataModule, epochs: int) -> float:
    x, y = data.train.x, data.train.y  # type: ignore[union-attr]
    opt = SGD(model.parameters())
    model.train()
    marks = []
    for _ in range(epochs):
        marks.append(time.perf_counter())
        for index in torch.randperm(len(y)).split(data.batch_size):
            loss = F.cross_entropy(model(x[index]), y[index])
            opt.zero_grad()
            loss.backward()
            opt.step()
    marks.append(time.perf_counter())
    return steady_epoch(marks)


def compare(name: str, build: Callable[[], nn.Module], data: TensorDataModule, epochs: int, repeats: int) -> str:
    torch.manual_seed(0)
    init = build()
    a_times, b_times = [], []
    for _ in range(repeats):  # interleaved: A B A B ...
        a_times.append(lightning_epoch(copy.deepcopy(init), data, 1 + epochs))
        b_times.append(hand_epoch(copy.deepcopy(init), data, 1 + epochs))
    ratios = [a / b for a, b in zip(a_times, b_times)]
    ratio = statistics.median(ratios)
    a, b = statistics.median(a_times), statistics.median(b_times)
    steps = -(-len(data.train.y) // data.batch_size)  # type: ignore[union-attr]
    ok = "ok" if ratio <= TARGET else "MISSED"
    return (f"{name:<28} {steps:>5} {epochs:>3}x{repeats:<3} {a * 1e3:>10.1f} {b * 1e3:>9.1f} "
            f"{(a - b) / steps * 1e6:>9.0f} {ratio:>6.2f}x [{min(ratios):.2f}-{max(ratios):.2f}]  <= {TARGET}x {ok}")  # fmt: skip


def time_full_run(quick: bool) -> str:
    from hydra import compose, initialize_config_dir

    from kd.run.experiment import run

    short = ["trainer.max_epochs=2", "teacher.max_epochs=3"] if quick else []
    with tempfile.TemporaryDirectory() as tmp:
        overrides = [f"paths.output_root={tmp}", f"paths.run_dir={tmp}/run", "measure.latency=false",
                     "trainer.enable_progress_bar=false", "callbacks.progress=null", *short]  # fmt: skip
        with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
            cfg = compose("config", overrides=overrides)
        os.environ.pop("MLFLOW_TRACKING_URI", None)
        start = time.perf_counter()
        try:
            with contextlib.redirect_stdout(io.StringIO()):
                metrics = run(cfg)
        except Exception as err:  # context only: a broken job must not hide the table above
            return f"full run(cfg), default job: FAILED ({type(err).__name__}: {str(err).splitlines()[0]})"
        seconds = time.perf_counter() - start
    what = "short: " + " ".join(short) if quick else f"teacher {cfg.teacher.max_epochs} + student {cfg.trainer.max_epochs} epochs"
    return f"full run(cfg), default job ({what}): {seconds:.1f} s, test/acc {metrics['test/acc']:.3f} (one run, context only)"


def quiet() -> None:
    for name in ("pytorch_lightning", "lightning", "lightning.pytorch", "lightning_fabric", "mlflow", "kd", "alembic"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message=r".*number of training batches.*smaller than the logging interval")
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)")
    warnings.filterwarnings("ignore", message=r".*module\(s\) in eval mode.*")
    # run() tests the best checkpoint with a fresh trainer that lacks the ModelCheckpoint callback
    warnings.filterwarnings("ignore", message=r"Be aware that when using `ckpt_path`")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer epochs and repeats (about a minute)")
    parser.add_argument("--threads", type=int, default=0, help="torch.set_num_threads(N); default: torch's own")
    args = parser.parse_args()
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    quiet()
    print(f"machine: processor={platform.processor() or platform.machine()!r} cpus={os.cpu_count()} "
          f"torch threads={torch.get_num_threads()} torch {torch.__version__} lightning {pl.__version__} "
          f"load avg {os.getloadavg()[0]:.2f}")  # fmt: skip
    print("A = Lightning (ClassifierModule + pl.Trainer), B = hand loop; epoch times: median over repeats, "
          "each repeat the median of its epochs after a warm-up one; ratio = median of per-repeat A/B")
    print(f"{'scenario':<28} {'steps':>5} {'ep x rep':<7} {'A ms/ep':>10} {'B ms/ep':>9} {'A-B us/st':>9} {'A/B [min-max]':>19}  target")
    digits = DigitsDataModule()
    digits.setup("fit")
    shape, k = digits.input_shape, digits.num_classes
    ep, rep = (8, 5) if args.quick else (20, 11)
    print(compare("digits MLP[32] b64", partial(MLP, k, shape, [32]), digits, ep, rep), flush=True)
    print(compare("digits MLP[256,256] b64", partial(MLP, k, shape, [256, 256], 0.2), digits, ep, rep), flush=True)
    if not (FASHION_ROOT / "train-images-idx3-ubyte.gz").is_file() and not (FASHION_ROOT / "train-images-idx3-ubyte").is_file():
        print(f"(fashion-mnist skipped: no IDX files in {FASHION_ROOT}; apt-get install dataset-fashion-mnist)")
    else:
        fashion = FashionMNISTDataModule(root=str(FASHION_ROOT), limit_train=20000)
        fashion.setup("fit")
        shape, k = fashion.input_shape, fashion.num_classes
        ep, rep = (2, 3) if args.quick else (2, 7)
        print(compare("fmnist20k MLP[256,256] b128", partial(MLP, k, shape, [256, 256], 0.2), fashion, ep, rep), flush=True)
        if not args.quick:
            print(compare("fmnist20k LeNet5 b128", partial(LeNet5, k, shape), fashion, ep, rep), flush=True)
    print("A-B us/st: extra wall time per training step of A over B (microseconds)")
    print(time_full_run(args.quick))
    load = os.getloadavg()[0]
    busy = " > cpus: other processes competed, ratios are noisier" if load > (os.cpu_count() or 1) else ""
    print(f"load avg at the end: {load:.2f}{busy}")


if __name__ == "__main__":
    main()
