"""Training throughput of ``kd.run.experiment.run`` against the hand-written loops of the peers.

What is measured: images per second of the student's training steps, in steady state, for the
CRD pair (student resnet8x4, teacher resnet32x4) on CIFAR-100-shaped data (random images and
labels: the values do not change the cost), three objectives and two batch sizes:

* ``hand``: the eager loop torchdistill, RepDistiller and mdistiller write: the whole split on
  the device, ``randperm`` + index gather, forward, loss (CE, or Hinton's KD with the teacher
  run every step or its logits looked up), ``zero_grad``, ``backward``, ``step`` and a
  ``loss.item()`` every step, as those loops do for their running averages.
* ``run()``: ``kd.run.experiment.run(cfg)`` itself (Hydra config composed in-process; data module,
  teacher training and caching, Lightning trainer, MLflow in a temporary folder), eager and
  with ``compile=true``. Its steps are timed by a callback: the interval from the start of an
  epoch's first training batch to the end of its last (the device synchronised at both ends),
  so validation, checkpoints and logging at epoch ends are outside it, as they are outside
  the hand loop's interval.
* ``hand+compile``: the hand loop with ``torch.compile`` (CUDA graphs on a GPU), for context.

Each configuration trains ``1 + K`` epochs; the first (compilation, CUDA-graph recording,
allocator warm-up) is dropped and the median of the other K is reported. Ratios are to the
hand loop of the same row, measured side by side in this one process.

Targets (issue #9): ``run()`` eager >= 0.95x of the hand loop; with ``compile=true`` >= 1.5x at
batch 64 and >= 1.3x at batch 256 (on a GPU; on a CPU the pair is replaced by resnet8 from
resnet20 and small sizes, to check that the script works: CUDA graphs do not exist there).

Usage: ``.venv/bin/python benchmarks/speed.py [--quick] [--epochs K] [--batches 64 256]``.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import logging
import os
import platform
import statistics
import tempfile
import time
import warnings
from functools import partial
from pathlib import Path

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import OmegaConf
from torch import nn

from kd.data import TensorDataModule
from kd.data.base import Split
from kd.run.experiment import run
from kd.losses.soft_target import soft_target_loss

ROOT = Path(__file__).resolve().parents[1]
SGD = partial(torch.optim.SGD, lr=0.05, momentum=0.9, nesterov=True, weight_decay=5e-4)  # conf/student/scratch.yaml
T, ALPHA = 4.0, 0.9  # conf/distill/kd.yaml
MODES = ("CE", "KD online", "KD cached")


class SyntheticData(TensorDataModule):
    """Random CIFAR-100-shaped images and labels (no files), for throughput only."""

    def __init__(self, num_train: int, batch_size: int, num_classes: int = 100, eval_size: int = 512) -> None:
        super().__init__(batch_size=batch_size, eval_batch_size=512, val_fraction=eval_size / (num_train + eval_size))
        self.classes = tuple(str(k) for k in range(num_classes))
        self.num_train, self.eval_size = num_train, eval_size

    def load(self) -> tuple[Split, Split]:
        g = torch.Generator().manual_seed(0)
        k, n = len(self.classes), self.num_train + self.eval_size

        def split(m: int) -> Split:
            return Split(torch.rand(m, 3, 32, 32, generator=g), torch.randint(0, k, (m,), generator=g))

        return split(n), split(self.eval_size)

    def source(self) -> str:
        return f"synthetic-cifar{len(self.classes)}(n={self.num_train})"


class StepClock(pl.Callback):
    """Wall time of each epoch's training steps: first batch start to last batch end, synced."""

    built: list[StepClock] = []  # the teacher's trainer (1 epoch) gets its own

    def __init__(self) -> None:
        self.epochs: list[float] = []
        self._start = 0.0
        StepClock.built.append(self)

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        if batch_idx == 0:
            _sync()
            self._start = time.perf_counter()

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        if batch_idx == trainer.num_training_batches - 1:
            _sync()
            self.epochs.append(time.perf_counter() - self._start)


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def framework(mode: str, compiled: bool, batch: int, n: int, epochs: int, pair: tuple[str, str], tmp: Path) -> float:
    """Steady-state seconds per epoch of ``run(cfg)``'s student steps."""
    student, teacher = pair
    overrides = [
        f"model@student.model={student}", f"model@teacher.model={teacher}",
        "distill=none" if mode == "CE" else "distill=kd", f"distill_cache={mode == 'KD cached'}",
        f"compile={compiled}", f"trainer.max_epochs={1 + epochs}", "teacher.max_epochs=1",
        "trainer.enable_progress_bar=false", "callbacks.progress=null", "measure.latency=false",
        f"paths.output_root={tmp}", f"paths.run_dir={tmp}/run", "tracking.experiment=speed",
        *(["trainer=gpu"] if torch.cuda.is_available() else []),
    ]  # fmt: skip
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=overrides)
    OmegaConf.set_struct(cfg, False)
    cfg.data = OmegaConf.create({"_target_": f"{__name__}.SyntheticData", "num_train": n, "batch_size": batch})
    cfg.callbacks.clock = OmegaConf.create({"_target_": f"{__name__}.StepClock"})
    OmegaConf.set_struct(cfg, True)
    StepClock.built.clear()
    with contextlib.redirect_stdout(io.StringIO()):
        run(cfg)
    (student_clock,) = [c for c in StepClock.built if len(c.epochs) == 1 + epochs]
    return statistics.median(student_clock.epochs[1:])


def build(name: str) -> nn.Module:
    """``conf/model/<name>.yaml``'s network for CIFAR-100-shaped inputs, as ``run()`` builds it."""
    return instantiate(OmegaConf.load(ROOT / "conf" / "model" / f"{name}.yaml"))(num_classes=100, input_shape=(3, 32, 32))


def hand(mode: str, compiled: bool, batch: int, n: int, epochs: int, pair: tuple[str, str], device: torch.device) -> float:
    """Steady-state seconds per epoch of the peers' eager loop (``compiled``: the student compiled)."""
    torch.manual_seed(0)
    data = SyntheticData(n, batch)
    data.setup("fit")
    x_all, y_all = data.train.x.to(device), data.train.y.to(device)
    student = build(pair[0]).to(device).train()
    teacher = build(pair[1]).to(device).eval().requires_grad_(False)
    cached = None
    if mode == "KD cached":
        with torch.no_grad():
            cached = torch.cat([teacher(x) for x in x_all.split(1024)])
    graphs = compiled and device.type == "cuda"
    forward = torch.compile(student, mode="reduce-overhead" if graphs else "default", dynamic=False) if compiled else student
    opt = SGD(student.parameters())
    times = []
    for _ in range(1 + epochs):
        order = torch.randperm(len(y_all), device=device)
        _sync()
        start = time.perf_counter()
        running = 0.0
        for index in order.split(batch):
            if len(index) < batch:
                break
            x, y = x_all[index], y_all[index]
            if graphs:
                torch.compiler.cudagraph_mark_step_begin()
            logits = forward(x)
            loss = F.cross_entropy(logits, y)
            if mode != "CE":
                if cached is not None:
                    t_logits = cached[index]
                else:
                    with torch.no_grad():
                        t_logits = teacher(x)
                loss = ALPHA * soft_target_loss(logits, t_logits, T) + (1 - ALPHA) * loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            running += loss.item()  # the peers' per-step running average
        _sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times[1:])


def attempt(measure, *args) -> float | None:
    """``measure(*args)``, or None (and the reason printed) when it fails: one broken cell must
    not hide the rest of the table."""
    try:
        return measure(*args)
    except Exception as err:  # noqa: BLE001
        print(f"  ({measure.__name__}{args[:3]} failed: {type(err).__name__}: {str(err).splitlines()[0][:200]})", flush=True)
        return None


def cell(n: int, base: float, seconds: float | None) -> str:
    return "-" if seconds is None else f"{n / seconds:>8.0f} ({base / seconds:4.2f}x)"


def quiet() -> None:
    for name in ("pytorch_lightning", "lightning", "lightning.pytorch", "lightning_fabric", "mlflow", "kd", "alembic", "torch._dynamo", "torch._inductor"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer steps and epochs, batch 64 only")
    parser.add_argument("--epochs", type=int, default=0, help="measured epochs after the warm-up one (default 3, quick 2)")
    parser.add_argument("--batches", type=int, nargs="+", default=None, help="batch sizes (default 64 256)")
    parser.add_argument("--steps", type=int, default=0, help="training steps per epoch (default: GPU 200, CPU 12; quick half)")
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    parser.add_argument("--no-compile", action="store_true", help="skip the compiled columns")
    args = parser.parse_args()
    quiet()
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    pair = ("resnet8x4", "resnet32x4") if cuda else ("resnet8", "resnet20")
    epochs = args.epochs or (2 if args.quick else 3)
    batches = args.batches or ([64] if args.quick else [64, 256])
    steps = args.steps or (200 if cuda else 12) // (2 if args.quick else 1)
    name = torch.cuda.get_device_name() if cuda else f"CPU {platform.processor() or platform.machine()} x{os.cpu_count()}, {torch.get_num_threads()} threads"
    print(f"device: {name}; torch {torch.__version__}, lightning {pl.__version__}; student {pair[0]} <- teacher {pair[1]}, "
          f"CIFAR-100-shaped random data on the device; {steps} steps/epoch, median of {epochs} epochs after a warm-up one", flush=True)  # fmt: skip
    print(f"{'batch':>5} {'mode':<10} {'hand img/s':>10} {'run() eager':>17} {'run() compile':>19} {'hand+compile':>18}  targets: eager >= 0.95x, compile >= 1.5x (b64) / 1.3x (b256)")
    with tempfile.TemporaryDirectory() as tmp:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
        for batch in batches:
            n = steps * batch
            for mode in args.modes:
                base = hand(mode, False, batch, n, epochs, pair, device)
                fw = attempt(framework, mode, False, batch, n, epochs, pair, Path(tmp))
                compiled = hand_c = None
                if not args.no_compile:
                    compiled = attempt(framework, mode, True, batch, n, epochs, pair, Path(tmp))
                    hand_c = attempt(hand, mode, True, batch, n, epochs, pair, device)
                cells = [f"{n / base:>10.0f}", *(cell(n, base, t) for t in (fw, compiled, hand_c))]
                target = 1.5 if batch <= 64 else 1.3
                verdict = "eager " + ("ok" if fw and base / fw >= 0.95 else "MISSED")
                if not args.no_compile and cuda:
                    verdict += ", compile " + ("ok" if compiled and base / compiled >= target else "MISSED")
                print(f"{batch:>5} {mode:<10} {cells[0]} {cells[1]:>17} {cells[2]:>19} {cells[3]:>18}  {verdict}", flush=True)
    print("img/s = training images per second (steps only); (x) = hand loop's time / this time, higher is faster")


if __name__ == "__main__":
    main()
