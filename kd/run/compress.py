"""The orchestrator's side of the compression stages after training: the int8 model's metrics
against the float one (for any stage that hands on a deployable form), and fine-tuning the
student with the run's objective (what a stage asks for through ``StageContext.finetune``)."""

from __future__ import annotations

import copy

import pytorch_lightning as pl
from hydra.utils import instantiate
from omegaconf import DictConfig
from pytorch_lightning.callbacks import ProgressBar
from torch import nn

from kd.data import TensorDataModule
from kd.tracking.measure import accuracy, agreement, int8_ops, measure_quantized
from kd.train.modules import ClassifierModule
from kd.train.trainer import make_trainer, scale_learning_rate


def quantized_metrics(
    cfg: DictConfig, model: nn.Module, int8: nn.Module, data: TensorDataModule, final: dict[str, float], float_acc: float
) -> dict[str, float]:
    """``quant/*``: the int8 model's test accuracy (and its change from the tested float or
    fake-quant ``model``), its agreement with ``model`` on the test set, size and latency, with
    ratios to the float student."""
    assert data.test is not None
    metrics = {"quant/test_acc": accuracy(int8, data.test.x, data.test.y), "quant/bits_per_weight": 8.0}
    reference = copy.deepcopy(model).cpu().eval()  # the tested float (or fake-quant) model
    metrics |= {f"quant/{k}": v for k, v in agreement(reference, int8, data.test.x).items()}
    metrics["quant/acc_delta"] = metrics["quant/test_acc"] - float_acc
    with int8_ops():
        measured = measure_quantized(int8, data.input_shape, large_batch=cfg.measure.large_batch, latency=cfg.measure.latency)
    metrics |= {f"quant/{k}": v for k, v in measured.items()}
    metrics["quant/size_reduction"] = final["model/size_bytes"] / metrics["quant/size_bytes"]
    for key in [k for k in measured if k.startswith("latency_ms_b")]:
        metrics[f"quant/speedup_{key.rsplit('_', 1)[1]}"] = final[f"model/{key}"] / measured[key]
    return metrics



def finetune(cfg: DictConfig, module: ClassifierModule, data: TensorDataModule, epochs: int, lr_scale: float) -> None:
    """Train ``module`` ``epochs`` more epochs with its objective at ``lr_scale`` times its learning
    rate, by rank zero alone (after DDP), without checkpoints; the run's progress bar shows it."""

    class _ScaleLR(pl.Callback):
        def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
            scale_learning_rate(trainer, lr_scale)

    quiet = {"enable_checkpointing": False, "devices": 1, "strategy": "auto"}
    progress = [c for c in (instantiate(c) for c in cfg.callbacks.values() if c is not None) if isinstance(c, ProgressBar)]
    make_trainer(cfg, [_ScaleLR(), *progress], False, epochs, **quiet).fit(module, datamodule=data)
