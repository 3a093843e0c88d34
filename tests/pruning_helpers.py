"""Small shared pieces of the pruning tests: digits, a tiny trainer, a seeded model."""

from __future__ import annotations

from functools import partial
from pathlib import Path

import pytorch_lightning as pl
import torch
from torch import nn

from kd.data import DigitsDataModule
from kd.modules import ClassifierModule

_DATA: DigitsDataModule | None = None


def digits() -> DigitsDataModule:
    global _DATA
    if _DATA is None:
        _DATA = DigitsDataModule(batch_size=64)
        _DATA.prepare_data()
        _DATA.setup("fit")
    return _DATA


def module(model: nn.Module, lr: float = 0.05, scheduler: bool = False) -> ClassifierModule:
    make_scheduler = partial(torch.optim.lr_scheduler.CosineAnnealingLR, T_max=3) if scheduler else None
    return ClassifierModule(model, 10, partial(torch.optim.SGD, lr=lr, momentum=0.9), make_scheduler)


def trainer(callbacks: list, max_epochs: int, root: Path | None = None, **kwargs) -> pl.Trainer:
    quiet = {"enable_progress_bar": False, "enable_model_summary": False, "logger": False}
    quiet.setdefault("enable_checkpointing", False)
    return pl.Trainer(
        max_epochs=max_epochs, callbacks=callbacks, accelerator="cpu", deterministic=True,
        default_root_dir=str(root) if root else None, **(quiet | kwargs),
    )  # fmt: skip


class KillAt(pl.Callback):
    """Raises at the start of ``epoch``: a job killed after the previous epoch's checkpoint."""

    def __init__(self, epoch: int) -> None:
        self.epoch = epoch

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.current_epoch == self.epoch:
            raise RuntimeError("killed")
