"""Pruning: does a physically pruned CNN run faster, and what does a pruning callback cost a step?

1. Latency. A CNN is pruned to 50% of the channels of every group with
   ``callbacks.StructuredPruning`` (L1), giving three models with the same function: *dense*
   (the original weights), *masked* (the same shapes with the pruned channels at zero: what a
   mask-only tool gives) and *physical* (channels removed by Torch-Pruning). Forward latency in
   eval mode is measured with ``kd.tracking.measure.latency_ms`` (``torch.utils.benchmark``, medians),
   the three interleaved within each repeat, at batch 64 and 256. Reported: the speed-up over
   dense of masked and physical, the MAC reduction, and physical speed-up / MAC reduction.
   Target: >= 0.8 of the MAC reduction at batch >= 64.
2. Training-step overhead. The same student is fitted through Lightning with no callback, with
   ``MagnitudePruning`` (torch's reparametrisation: a ``weight_orig * weight_mask`` product per
   layer per forward) and with ``StructuredPruning`` (pruned channels re-zeroed after every
   optimizer step), both at their target sparsity from the first epoch. The ratio of median
   steady epochs (interleaved, first epoch dropped) is the overhead. Target: <= 1.1x.

Ratios are measured side by side in one process; absolute times are context only (shared,
noisy machine). Usage: ``.venv/bin/python benchmarks/pruning.py [--quick] [--threads N]``.
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import statistics
from collections.abc import Callable
from functools import partial

import pytorch_lightning as pl
import torch
from torch import nn

from callbacks import MagnitudePruning, StructuredPruning
from kd.data import DigitsDataModule, FashionMNISTDataModule, TensorDataModule
from kd.tracking.measure import count_macs, latency_ms
from kd.models import MLP, CIFARResNet, LeNet5
from kd.train.modules import ClassifierModule
from kd_step import FASHION_ROOT, SGD, Clock, quiet  # benchmarks/ is on sys.path when run as a script

LATENCY_TARGET, OVERHEAD_TARGET = 0.8, 1.1


def pruned_pair(build: Callable[[], nn.Module], shape: tuple[int, ...]) -> tuple[nn.Module, nn.Module, nn.Module]:
    """(dense, masked, physical) with 50% of each group's channels pruned by L1."""
    torch.manual_seed(0)
    dense = build().eval()
    cb = StructuredPruning(0.5, importance="l1")
    masked = cb.apply(copy.deepcopy(dense), shape).eval()
    physical = cb.finalize(copy.deepcopy(masked)).eval()
    return dense, masked, physical


def latency(name: str, build: Callable[[], nn.Module], shape: tuple[int, ...], repeats: int) -> list[str]:
    dense, masked, physical = pruned_pair(build, shape)
    mac_reduction = count_macs(dense, shape) / count_macs(physical, shape)
    rows = []
    for batch in (64, 256):
        times: dict[str, list[float]] = {"dense": [], "masked": [], "physical": []}
        for _ in range(repeats):
            for label, model in (("dense", dense), ("masked", masked), ("physical", physical)):
                times[label].append(latency_ms(model, shape, batch, threads=torch.get_num_threads(), full=True))
        speed = {k: statistics.median(a / b for a, b in zip(times["dense"], times[k])) for k in ("masked", "physical")}
        ms = {k: statistics.median(v) for k, v in times.items()}
        share = speed["physical"] / mac_reduction
        ok = "ok" if share >= LATENCY_TARGET else "MISSED"
        rows.append(f"{name:<28} b={batch:<4} {ms['dense']:>8.2f} {ms['masked']:>8.2f} {ms['physical']:>8.2f}  "
                    f"{speed['masked']:>5.2f}x {speed['physical']:>5.2f}x {mac_reduction:>5.2f}x  "
                    f"{share:>4.2f} >= {LATENCY_TARGET} {ok}")  # fmt: skip
    return rows


def epoch_time(callback: pl.Callback | None, model: nn.Module, data: TensorDataModule, epochs: int) -> float:
    clock = Clock()
    trainer = pl.Trainer(
        accelerator="cpu", devices=1, logger=False, callbacks=[clock] + ([callback] if callback else []),
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        num_sanity_val_steps=0, limit_val_batches=0, max_epochs=1 + epochs,
    )  # fmt: skip
    trainer.fit(ClassifierModule(model, data.num_classes, SGD), datamodule=data)
    return statistics.median(b - a for a, b in list(zip(clock.marks, clock.marks[1:]))[1:])


def overhead(name: str, build: Callable[[], nn.Module], data: TensorDataModule, epochs: int, repeats: int) -> str:
    torch.manual_seed(0)
    init = build()
    makers = {
        "none": lambda: None,
        "magnitude": lambda: MagnitudePruning(0.9, start=0),
        "structured": lambda: StructuredPruning(0.5, start=0),
    }
    times: dict[str, list[float]] = {k: [] for k in makers}
    for _ in range(repeats):
        for label, make in makers.items():
            times[label].append(epoch_time(make(), copy.deepcopy(init), data, epochs))
    ratio = {k: statistics.median(a / b for a, b in zip(times[k], times["none"])) for k in ("magnitude", "structured")}
    spread = {k: [a / b for a, b in zip(times[k], times["none"])] for k in ratio}
    verdict = {k: "ok" if v <= OVERHEAD_TARGET else "MISSED" for k, v in ratio.items()}
    return (f"{name:<28} {statistics.median(times['none']) * 1e3:>8.1f}  "
            + "  ".join(f"{k} {ratio[k]:.3f}x [{min(spread[k]):.2f}-{max(spread[k]):.2f}] {verdict[k]}" for k in ratio)
            + f"   (<= {OVERHEAD_TARGET}x)")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats and epochs (about two minutes)")
    parser.add_argument("--threads", type=int, default=0, help="torch.set_num_threads(N); default: torch's own")
    args = parser.parse_args()
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    quiet()
    print(f"machine: processor={platform.processor() or platform.machine()!r} cpus={os.cpu_count()} "
          f"torch threads={torch.get_num_threads()} torch {torch.__version__} load avg {os.getloadavg()[0]:.2f}")  # fmt: skip
    repeats = 3 if args.quick else 7
    print("\n1. forward latency, eval mode, ms (medians); speed-ups are dense/x, medians of per-repeat ratios")
    print(f"{'model (input)':<28} {'batch':<6} {'dense':>8} {'masked':>8} {'physical':>8}  {'masked':>6} {'phys.':>6} "
          f"{'MACs':>6}  phys./MACs")  # fmt: skip
    cifar = (3, 32, 32)
    for name, build in [
        ("resnet20 (3x32x32)", partial(CIFARResNet, 10, cifar, depth=20, width=[16, 32, 64])),
        ("resnet8x4 (3x32x32)", partial(CIFARResNet, 10, cifar, depth=8, width=[64, 128, 256])),
        ("lenet5 (1x28x28)", partial(LeNet5, 10, (1, 28, 28))),
    ]:
        for row in latency(name, build, cifar if "resnet" in name else (1, 28, 28), repeats):
            print(row, flush=True)

    print("\n2. training epoch with a pruning callback vs none (median steady epoch ms of 'none'; ratios [min-max])")
    digits = DigitsDataModule()
    digits.setup("fit")
    ep = 3 if args.quick else 6
    print(overhead("digits MLP[32]", partial(MLP, 10, digits.input_shape, [32]), digits, ep, repeats), flush=True)
    if (FASHION_ROOT / "train-images-idx3-ubyte.gz").is_file() or (FASHION_ROOT / "train-images-idx3-ubyte").is_file():
        fashion = FashionMNISTDataModule(root=str(FASHION_ROOT), limit_train=10000)
        fashion.setup("fit")
        print(overhead("fmnist10k LeNet5", partial(LeNet5, 10, fashion.input_shape), fashion, 1 if args.quick else 2, repeats), flush=True)
    else:
        print(f"(fashion-mnist skipped: no IDX files in {FASHION_ROOT})")
    print(f"load avg at the end: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
