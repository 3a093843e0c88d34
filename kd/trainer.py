"""The pieces every training and evaluation step of a run shares: a Lightning trainer built from
``cfg.trainer``, the measurement of a model, and a test-set accuracy through Lightning."""

from __future__ import annotations

from typing import Any

import pytorch_lightning as pl
from hydra.utils import instantiate
from omegaconf import DictConfig
from pytorch_lightning.callbacks import ProgressBar
from torch import nn

from kd.data import TensorDataModule
from kd.measure import measure
from kd.modules import ClassifierModule


def make_trainer(cfg: DictConfig, callbacks: list, logger: Any, max_epochs: int, **overrides: Any) -> pl.Trainer:
    """``cfg.trainer`` with these callbacks, logger and epochs (``overrides`` win)."""
    if not overrides.get("enable_progress_bar", cfg.trainer.get("enable_progress_bar", True)):
        # `trainer.enable_progress_bar=false` means no bar, whatever the callbacks group holds
        callbacks = [c for c in callbacks if not isinstance(c, ProgressBar)]
    return instantiate(cfg.trainer, callbacks=callbacks, logger=logger, max_epochs=max_epochs, **overrides)


def measure_model(cfg: DictConfig, model: nn.Module, data: TensorDataModule) -> dict[str, float]:
    """``kd.measure.measure`` with the run's ``measure`` settings."""
    return measure(model, data.input_shape, large_batch=cfg.measure.large_batch, latency=cfg.measure.latency)


def evaluate_accuracy(cfg: DictConfig, model: nn.Module, data: TensorDataModule) -> float:
    """Test accuracy of ``model`` through a quiet Lightning trainer of the run's kind."""
    module = ClassifierModule(model, data.num_classes, optimizer=None)  # evaluation only
    quiet = {"enable_progress_bar": False, "enable_model_summary": False, "enable_checkpointing": False}
    return float(make_trainer(cfg, [], False, 1, **quiet).test(module, datamodule=data, verbose=False)[0]["test/acc"])
