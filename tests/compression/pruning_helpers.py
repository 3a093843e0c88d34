"""Small shared pieces of the pruning tests: digits, a tiny trainer, a seeded model."""

from __future__ import annotations

from functools import partial
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import ModelCheckpoint
from torch import nn

from kd.data import DigitsDataModule
from kd.train.modules import ClassifierModule

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


def uninterrupted_and_resumed(make_model, make_callbacks, root: Path, epochs: int, kill_at: int = 2) -> tuple[ClassifierModule, ClassifierModule]:
    """Fit ``make_model()`` with ``make_callbacks()`` straight through, and again killed at the
    start of epoch ``kill_at`` and resumed from its last checkpoint; returns both modules."""

    def fit(folder: Path, ckpt: str | None = None, kill: bool = False) -> ClassifierModule:
        pl.seed_everything(0, verbose=False)
        lit = module(make_model())
        callbacks = [*make_callbacks(), ModelCheckpoint(dirpath=folder, save_last=True), *([KillAt(kill_at)] if kill else [])]
        trainer(callbacks, epochs, enable_checkpointing=True).fit(lit, datamodule=digits(), ckpt_path=ckpt)
        return lit

    full = fit(root / "full")
    with pytest.raises(RuntimeError, match="killed"):
        fit(root / "cut", kill=True)
    return full, fit(root / "cut", ckpt=str(root / "cut" / "last.ckpt"))


_TRAINED: nn.Module | None = None


def trained_lenet5() -> nn.Module:
    """A LeNet-5 trained 4 epochs on digits (seeded), built once per session; tests copy it
    before changing it."""
    global _TRAINED
    if _TRAINED is None:
        from kd.models import LeNet5

        pl.seed_everything(0, verbose=False)
        _TRAINED = LeNet5(10, (1, 8, 8))
        trainer([], max_epochs=4).fit(module(_TRAINED), datamodule=digits())
        _TRAINED.eval()
    return _TRAINED
