"""The pieces every training and evaluation step of a run shares: a Lightning trainer built from
``cfg.trainer``, the measurement of a model, and a test-set accuracy through Lightning."""

from __future__ import annotations

import logging
from typing import Any

import pytorch_lightning as pl
from hydra.utils import instantiate
from omegaconf import DictConfig
from pytorch_lightning.callbacks import ProgressBar
from torch import nn

from kd.data import TensorDataModule
from kd.tracking.measure import measure
from kd.train.modules import ClassifierModule

log = logging.getLogger(__name__)


def make_trainer(cfg: DictConfig, callbacks: list, logger: Any, max_epochs: int, **overrides: Any) -> pl.Trainer:
    """``cfg.trainer`` with these callbacks, logger and epochs (``overrides`` win)."""
    if not overrides.get("enable_progress_bar", cfg.trainer.get("enable_progress_bar", True)):
        # `trainer.enable_progress_bar=false` means no bar, whatever the callbacks group holds
        callbacks = [c for c in callbacks if not isinstance(c, ProgressBar)]
    # kd's data modules shard their own loaders under DDP (kd.data.batches.EpochBatches)
    overrides.setdefault("use_distributed_sampler", False)
    return instantiate(cfg.trainer, callbacks=callbacks, logger=logger, max_epochs=max_epochs, **overrides)


def scale_learning_rate(trainer: pl.Trainer, factor: float) -> None:
    """Multiply the learning rate of every optimizer and the base rates of their schedulers
    (so an epoch scheduler continues from the lower rate instead of undoing it)."""
    for optimizer in trainer.optimizers:
        for group in optimizer.param_groups:
            group["lr"] *= factor
            if "initial_lr" in group:
                group["initial_lr"] *= factor
    for config in trainer.lr_scheduler_configs:
        if hasattr(config.scheduler, "base_lrs"):
            config.scheduler.base_lrs = [b * factor for b in config.scheduler.base_lrs]


def measure_model(cfg: DictConfig, model: nn.Module, data: TensorDataModule) -> dict[str, float]:
    """``kd.tracking.measure.measure`` with the run's ``measure`` settings."""
    return measure(model, data.input_shape, large_batch=cfg.measure.large_batch, latency=cfg.measure.latency)


def evaluate_accuracy(cfg: DictConfig, model: nn.Module, data: TensorDataModule) -> float:
    """Test accuracy of ``model`` through a quiet Lightning trainer of the run's kind."""
    module = ClassifierModule(model, data.num_classes, optimizer=None)  # evaluation only
    quiet = {"enable_progress_bar": False, "enable_model_summary": False, "enable_checkpointing": False}
    return float(make_trainer(cfg, [], False, 1, **quiet).test(module, datamodule=data, verbose=False)[0]["test/acc"])


def compile_choice(cfg: DictConfig, objective: Any, data: TensorDataModule, *compression: Any) -> bool:
    """Whether the student's training forward is compiled (``cfg.compile``), and the data's
    training batches made one shape for it. Compression callbacks and feature terms keep
    the run eager: their masks, parametrisations and hooks act on the eager modules."""
    if not cfg.get("compile", False):
        return False
    blockers = [c.describe() for c in compression if c is not None]
    if objective.needs_features:
        blockers.append("feature terms (forward hooks)")
    if blockers:
        log.warning("compile=true ignored for the student: %s; training eagerly", ", ".join(blockers))
        return False
    data.drop_last = True  # one batch shape: no recompilation, and CUDA graphs replay every step
    return True
