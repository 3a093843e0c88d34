"""The orchestrator's side of the compression stages after training: the int8 model's metrics
against the float one (for any stage that hands on a deployable form), and fine-tuning the
student with the run's objective (what a stage asks for through ``StageContext.finetune``)."""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence

import pytorch_lightning as pl
from pytorch_lightning.callbacks import Callback
from torch import nn

from kd.data import TensorDataModule
from kd.tracking import keys
from kd.tracking.measure import Measurement, accuracy, agreement, int8_ops
from kd.train.modules import ClassifierModule
from kd.train.trainer import Trainers, scale_learning_rate


def quantized_metrics(
    measurement: Measurement, model: nn.Module, int8: nn.Module, data: TensorDataModule, final: dict[str, float], float_acc: float,
    lower: Callable[[nn.Module], nn.Module] | None = None,
) -> dict[str, float]:  # fmt: skip
    """``quant/*``: the int8 model's test accuracy (and its change from the tested float or
    fake-quant ``model``), its agreement with ``model`` on the test set, size and latency, with
    ratios to the float student. ``lower``: how the int8 model runs fast (PT2E: compiled by
    Inductor); its latency is then that of the lowered model, and the speed-up is against the float
    model lowered the same way (``quant/float_latency_ms_b*``), not against eager float. After QAT
    the tested model is the fake-quant graph (slow, and not a float model): no speed-up is given."""
    assert data.test is not None
    quant = lambda name: keys.key(keys.QUANT, name)  # noqa: E731
    metrics = {quant("test_acc"): accuracy(int8, data.test.x, data.test.y), quant("bits_per_weight"): 8.0}
    reference = copy.deepcopy(model).cpu().eval()  # the tested float (or fake-quant) model
    metrics |= keys.prefixed(keys.QUANT, agreement(reference, int8, data.test.x))
    metrics[quant("acc_delta")] = metrics[quant("test_acc")] - float_acc
    with int8_ops():
        measured = measurement.quantized(int8, data.input_shape, lower)
    metrics |= keys.prefixed(keys.QUANT, measured)
    metrics[quant("size_reduction")] = final[keys.key(keys.MODEL, keys.SIZE)] / metrics[quant(keys.SIZE)]
    if any("FakeQuantize" in type(m).__name__ for m in model.modules()):
        return metrics  # QAT: the trained model is the fake-quant graph, no float model to time the int8 one against
    reference = {}
    if lower is not None and keys.latency_batches(measured):  # the float model, run the way the int8 one runs
        reference = measurement.latencies(lower(model), data.input_shape)
        metrics |= {quant(f"float_{k}"): v for k, v in reference.items()}
    for batch in keys.latency_batches(measured):
        float_ms = reference[keys.LATENCY + batch] if reference else final[keys.key(keys.MODEL, keys.LATENCY + batch)]
        metrics[quant(f"speedup_b{batch}")] = float_ms / measured[keys.LATENCY + batch]
    return metrics


def finetune(
    trainers: Trainers, module: ClassifierModule, data: TensorDataModule, epochs: int, lr_scale: float,
    callbacks: Sequence[Callback] = (),
) -> nn.Module:  # fmt: skip
    """Train ``module`` ``epochs`` more epochs with its objective at ``lr_scale`` times its learning
    rate, by rank zero alone (after DDP), without checkpoints, with a stage's own ``callbacks``
    (QAT's fake-quant graph); the run's progress bar shows it. Returns the trained model (a
    callback may have replaced it)."""

    class _ScaleLR(pl.Callback):
        def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
            scale_learning_rate(trainer, lr_scale)

    quiet = {"enable_checkpointing": False, "devices": 1, "strategy": "auto"}
    progress = list(trainers.callbacks(only_progress=True).values())
    trainers.build([_ScaleLR(), *callbacks, *progress], False, epochs, **quiet).fit(module, datamodule=data)
    return module.model
