"""What happens to the tested student after training when it is factorised or quantized to int8:
the factorisation with its fine-tuning, and the int8 model's metrics (``kd.experiment`` calls
these in order: pruning finalised, factorised, quantized)."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
from hydra.utils import instantiate
from omegaconf import DictConfig
from pytorch_lightning.callbacks import ProgressBar
from torch import nn

from callbacks.base import scale_learning_rate
from callbacks.fx_quant import accuracy, agreement, int8_ops
from kd.data import TensorDataModule
from kd.factorize import FACTORIZED_KEY, LowRank
from kd.measure import measure_quantized
from kd.modules import ClassifierModule
from kd.tracking import Tracker
from kd.trainer import make_trainer, measure_model


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


def check_factorize(factorizer: LowRank, student: nn.Module, objective: Any, pruner: Any, quantizer: Any) -> None:
    """Refuse what factorisation does not combine with, before anything is written."""
    if pruner is not None:
        raise ValueError("factorize with prune is not supported: both reshape the model (use one of them)")
    if quantizer is not None and quantizer.mode not in ("static", "dynamic"):
        raise ValueError(f"factorize with quantize={quantizer.mode} is not supported: only post-training "
                         "quantization (quantize=ptq or dynamic) of the fine-tuned factorised model")  # fmt: skip
    if objective.needs_teacher_features:
        raise ValueError("factorize with feature distillation is not supported: the feature hooks may point at "
                         "layers the factorisation replaces (use a logit objective: kd, dkd, dist, ctkd, mlkd, or none)")  # fmt: skip
    factorizer.apply(copy.deepcopy(student))  # bad layer patterns, or nothing to factorise, fail now


def factorize(
    cfg: DictConfig, factorizer: LowRank, module: ClassifierModule, data: TensorDataModule,
    final: dict[str, float], extras: dict[str, Any], tracker: Tracker, run_id: str,
) -> float:  # fmt: skip
    """Factorise the tested model, fine-tune it with the run's objective, test it; returns the
    test accuracy and fills ``final`` with ``dense/*`` (before) and ``factorize/*``."""
    def test_acc() -> float:  # on the CPU, by rank zero alone
        return accuracy(module.model.cpu().eval(), data.test.x, data.test.y)

    final.update({f"dense/{k}": v for k, v in measure_model(cfg, module.model, data).items()})
    final["factorize/test_acc_before"] = test_acc()
    rows = factorizer.apply(module.model)
    final["factorize/test_acc_truncated"] = test_acc()
    final["factorize/layers"] = float(sum(r["factorized"] for r in rows))
    extras[FACTORIZED_KEY] = factorizer.ranks(rows)
    tracker.log_artifact(run_id, factorizer.write_report(rows, Path(cfg.paths.run_dir) / "factorization.csv"))
    quiet = {"enable_checkpointing": False, "devices": 1, "strategy": "auto"}  # rank zero alone, after DDP
    if factorizer.finetune_epochs:

        class _ScaleLR(pl.Callback):
            def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
                scale_learning_rate(trainer, factorizer.lr_scale)

        progress = [c for c in (instantiate(c) for c in cfg.callbacks.values() if c is not None) if isinstance(c, ProgressBar)]
        make_trainer(cfg, [_ScaleLR(), *progress], False, factorizer.finetune_epochs, **quiet).fit(module, datamodule=data)
    return test_acc()
