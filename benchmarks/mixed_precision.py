"""Mixed precision against uniform bits at the same size, on Fashion-MNIST LeNet-5 (one process).

    python benchmarks/mixed_precision.py                # 6 float epochs, 2 QAT epochs per variant
    python benchmarks/mixed_precision.py --quick        # digits, 3 + 1 epochs (a smoke run)

One float LeNet-5 is trained; every variant starts from a copy of it, chooses its weight widths
(``QuantizationAwareTraining.choose_widths``: uniform is the budget with one allowed width), and
fine-tunes the fake-quant graph with the same seed, epochs and learning rate (what
``quantize=qat quantize.budget_bits=B`` does after the float training). For each budget B the
table gives uniform B-bit weights beside the mixed widths chosen under the same budget (so
never larger), by the measured and by the Hessian (HAWQ-v2) sensitivity: test accuracy of the
fake-quant model, the average weight bits, the coded size, and the widths per layer. The float
model fine-tuned the same way is the header's reference (QAT's epochs also train).
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
from functools import partial
from pathlib import Path

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pytorch_lightning as pl  # noqa: E402
import torch  # noqa: E402

from callbacks import QuantizationAwareTraining  # noqa: E402
from kd.compression import mixed_precision as mp  # noqa: E402
from kd.data import DigitsDataModule, FashionMNISTDataModule  # noqa: E402
from kd.models import LeNet5  # noqa: E402
from kd.run.experiment import ignore_known_warnings  # noqa: E402
from kd.tracking.measure import accuracy  # noqa: E402
from kd.train.modules import ClassifierModule  # noqa: E402


def fit(model: torch.nn.Module, data, epochs: int, lr: float, callbacks=()) -> torch.nn.Module:
    pl.seed_everything(0, verbose=False)
    module = ClassifierModule(model, data.num_classes, partial(torch.optim.SGD, lr=lr, momentum=0.9))
    trainer = pl.Trainer(max_epochs=epochs, callbacks=list(callbacks), accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_model_summary=False, enable_progress_bar=False)  # fmt: skip
    trainer.fit(module, datamodule=data)
    return module.model.eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="digits, few epochs")
    parser.add_argument("--budgets", type=float, nargs="+", default=[2.0, 3.0, 4.0, 6.0])
    args = parser.parse_args()
    ignore_known_warnings()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    data = DigitsDataModule(batch_size=64) if args.quick else FashionMNISTDataModule(batch_size=128)
    data.prepare_data()
    data.setup("fit")
    float_epochs, qat_epochs, lr = (3, 1, 0.05) if args.quick else (6, 2, 0.05)
    pl.seed_everything(0, verbose=False)
    trained = fit(LeNet5(data.num_classes, data.input_shape), data, float_epochs, lr)
    float_acc = accuracy(trained, data.test.x, data.test.y)
    tuned_float = accuracy(fit(copy.deepcopy(trained), data, qat_epochs, lr * 0.1), data.test.x, data.test.y)
    name = "digits" if args.quick else "Fashion-MNIST"
    print(f"LeNet-5 on {name}: float test acc {float_acc:.2%} after {float_epochs} epochs ({tuned_float:.2%} after the same "
          f"fine-tuning as the variants, in float); every variant fine-tunes {qat_epochs} QAT epochs at lr {lr * 0.1:g} from it "
          "(8-bit activations)\n")  # fmt: skip
    print("| budget | weights | sensitivity | test acc | avg bits | coded KiB | widths (conv1 conv2 fc1 fc2 fc3) |")
    print("|---|---|---|---|---|---|---|")
    for budget in args.budgets:
        variants = [("uniform", "measured", [int(budget)])] if float(budget).is_integer() else []
        if budget > min(mp.CANDIDATES):  # at the narrowest width there is nothing to choose
            variants += [("mixed", "measured", list(mp.CANDIDATES)), ("mixed", "hessian", list(mp.CANDIDATES))]
        for kind, sensitivity, choices in variants:
            qat = QuantizationAwareTraining(budget_bits=budget, bit_choices=choices, sensitivity=sensitivity, engine="pt2e")
            model = copy.deepcopy(trained)
            qat.layer_bits = qat.choose_widths(model, data)
            tuned = fit(model, data, qat_epochs, lr * 0.1, [qat])
            acc = accuracy(tuned, data.test.x, data.test.y)
            widths = " ".join(str(b) for b in qat.layer_bits.values())
            print(f"| {budget:g} | {kind} | {'-' if kind == 'uniform' else sensitivity} | {acc:.2%} | "
                  f"{mp.average_bits(qat.layer_bits, qat.layer_params):.2f} | {qat.coded_bytes(model) / 1024:.1f} | {widths} |", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
