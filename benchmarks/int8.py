"""int8 against float, measured side by side in one process: PT2E (torchao) and FX graph mode.

    python benchmarks/int8.py            # LeNet-5 (28x28) and resnet20 (32x32): latency, size
    python benchmarks/int8.py --quick    # shorter timing budget

1. Latency and size of random-weight models at their real input sizes (what a deployment sees),
   with one intra-op thread: float eager, float compiled (Inductor with freezing), the PT2E int8
   model compiled the same way (the way it runs int8 kernels), the FX int8 model (its int8 modules
   run eagerly). The speed-up that counts is PT2E int8 compiled over float compiled.
2. PT2E against FX on the same trained model (LeNet-5 trained 4 epochs on digits): test accuracy,
   agreement with the float model, size.

Compiling takes seconds per model and batch size (once); the timings are medians of
``kd.tracking.measure.time_forward`` after a warm-up. Run it on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from callbacks import PostTrainingQuantization  # noqa: E402
from callbacks.pt2e_quant import lowered  # noqa: E402
from kd.data import DigitsDataModule  # noqa: E402
from kd.models import CIFARResNet, LeNet5  # noqa: E402
from kd.tracking.measure import accuracy, agreement, state_dict_bytes, time_forward  # noqa: E402


class Calibration:
    """What the quantizers read from a data module: ``train.x``/``train.y``, ``batch_size``."""

    def __init__(self, x: torch.Tensor, batch_size: int = 64) -> None:
        self.train = type("Split", (), {"x": x, "y": torch.zeros(len(x), dtype=torch.long)})()
        self.batch_size = batch_size


def warm_batch_norm(model: torch.nn.Module, shape: tuple[int, ...]) -> torch.nn.Module:
    """Give random-weight BatchNorm layers real running statistics."""
    model.train()
    with torch.no_grad():
        for _ in range(10):
            model(torch.randn(32, *shape))
    return model.eval()


def ms(model: torch.nn.Module, shape: tuple[int, ...], batch: int, budget: float) -> float:
    return time_forward(model, shape, batch, threads=1, budget_s=budget).median_ms


def latency_table(budget: float) -> None:
    torch.manual_seed(0)
    models = {"LeNet-5": (LeNet5(10, (1, 28, 28)), (1, 28, 28)),
              "resnet20": (CIFARResNet(10, (3, 32, 32), depth=20, width=[16, 32, 64]), (3, 32, 32))}  # fmt: skip
    print("| model | form | size KiB | b=1 ms | b=256 ms | compile s |")
    print("|---|---|---|---|---|---|")
    ratios = []
    for name, (model, shape) in models.items():
        warm_batch_norm(model, shape)
        calibration = Calibration(torch.randn(512, *shape, generator=torch.Generator().manual_seed(1)))
        pt2e = PostTrainingQuantization(calibration_batches=8, engine="pt2e").convert(model, calibration)
        fx = PostTrainingQuantization(calibration_batches=8, engine="fx").convert(model, calibration)
        forms = {"float eager": (model, model), "float compiled": (model, lowered(model)),
                 "PT2E int8 compiled": (pt2e, lowered(pt2e)), "FX int8 eager": (fx, fx)}  # fmt: skip
        found = {}
        for form, (sized, timed) in forms.items():
            began = time.perf_counter()
            with torch.no_grad():
                timed(torch.randn(1, *shape)), timed(torch.randn(256, *shape))  # compiles both sizes
            compile_s = time.perf_counter() - began
            found[form] = (ms(timed, shape, 1, budget), ms(timed, shape, 256, budget))
            print(f"| {name} | {form} | {state_dict_bytes(sized) / 1024:.1f} | {found[form][0]:.3f} | {found[form][1]:.2f} | "
                  f"{compile_s:.1f} |")  # fmt: skip
        f, q = found["float compiled"], found["PT2E int8 compiled"]
        ratios.append((name, f[0] / q[0], f[1] / q[1], state_dict_bytes(model) / state_dict_bytes(pt2e), found["FX int8 eager"][1] / q[1]))
    print()
    print("| model | PT2E int8 speed-up b=1 | b=256 | size reduction | PT2E compiled vs FX eager, b=256 |")
    print("|---|---|---|---|---|")
    for name, b1, b256, size, vs_fx in ratios:
        print(f"| {name} | {b1:.2f}x | {b256:.2f}x | {size:.2f}x | {vs_fx:.2f}x |")


def accuracy_table() -> None:
    torch.manual_seed(0)
    data = DigitsDataModule(batch_size=64)
    data.prepare_data()
    data.setup("fit")
    model = LeNet5(10, (1, 8, 8))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    for _ in range(4):
        for index in torch.randperm(len(data.train.y)).split(64):
            optimizer.zero_grad()
            F.cross_entropy(model(data.train.x[index]), data.train.y[index]).backward()
            optimizer.step()
    model.eval()
    x, y = data.test.x, data.test.y
    print()
    print(f"LeNet-5 on digits (4 epochs), float test accuracy {accuracy(model, x, y):.2%}, size {state_dict_bytes(model) / 1024:.1f} KiB")
    print("| flow | estimator | int8 test acc | agreement with float | logit rel. error | size KiB |")
    print("|---|---|---|---|---|---|")
    for engine in ("pt2e", "fx"):
        for observer in ("minmax", "histogram", "percentile", "entropy"):
            int8 = PostTrainingQuantization(observer=observer, calibration_batches=8, engine=engine).convert(model, data)
            agree = agreement(model, int8, x)
            print(f"| {engine} | {observer} | {accuracy(int8, x, y):.2%} | {agree['argmax_agreement']:.2%} | "
                  f"{agree['logit_rel_error']:.4f} | {state_dict_bytes(int8) / 1024:.1f} |")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="0.2 s of timing per batch size instead of 1 s")
    args = parser.parse_args()
    latency_table(0.2 if args.quick else 1.0)
    accuracy_table()


if __name__ == "__main__":
    main()
