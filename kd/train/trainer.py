"""The pieces every training and evaluation step of a run shares: :class:`Trainers`, which builds
each Lightning trainer of a run from the trainer settings and the callbacks (read from the config
once, by the orchestrator), a test-set accuracy through Lightning, and the compile decision."""

from __future__ import annotations

import copy
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import pytorch_lightning as pl
from hydra.utils import instantiate
from pytorch_lightning.callbacks import Callback, ModelCheckpoint, ProgressBar
from torch import nn

from kd.data import TensorDataModule
from kd.train.modules import ClassifierModule

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Trainers:
    """Builds the trainers of one run: the student's, the teacher's, a fine-tuning one, a quiet
    evaluation one, all with the same settings.

    Attributes:
        settings: the trainer's arguments, resolved, with their ``_target_`` (``cfg.trainer``).
        templates: the run's callbacks (``cfg.callbacks``), instantiated once and never attached
            to a trainer: each trainer gets fresh copies of those it asks for.
    """

    settings: Mapping[str, Any]
    templates: Mapping[str, Callback] = field(default_factory=dict)

    @property
    def progress_bar(self) -> bool:
        return bool(self.settings.get("enable_progress_bar", True))

    def callbacks(self, checkpoints: bool = True, only_progress: bool = False) -> dict[str, Callback]:
        """Copies of the run's callbacks: all, without ``ModelCheckpoint`` (the teacher's fit,
        which keeps its last weights), or the progress bar alone (fine-tuning)."""
        kept = {name: c for name, c in self.templates.items() if checkpoints or not isinstance(c, ModelCheckpoint)}
        if only_progress:
            kept = {name: c for name, c in kept.items() if isinstance(c, ProgressBar)}
        return {name: copy.deepcopy(c) for name, c in kept.items()}

    def build(self, callbacks: list[Callback], logger: Any, max_epochs: int, **overrides: Any) -> pl.Trainer:
        """A trainer with these callbacks, logger and epochs (``overrides`` win over the settings)."""
        if not overrides.get("enable_progress_bar", self.progress_bar):
            # `trainer.enable_progress_bar=false` means no bar, whatever the callbacks group holds
            callbacks = [c for c in callbacks if not isinstance(c, ProgressBar)]
        # kd's data modules shard their own loaders under DDP (kd.data.batches.EpochBatches)
        overrides.setdefault("use_distributed_sampler", False)
        return instantiate(dict(self.settings), callbacks=callbacks, logger=logger, max_epochs=max_epochs, **overrides)

    def check(self) -> None:
        """Build one trainer from the settings now (a few milliseconds), so an accelerator this
        machine lacks, a device count or a precision Lightning refuses is named before anything
        opens or trains."""
        try:
            self.build([], False, 1, enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False)
        except Exception as err:
            cause = err
            while cause.__cause__ is not None:
                cause = cause.__cause__
            shown = {k: self.settings.get(k) for k in ("accelerator", "devices", "strategy", "precision") if k in self.settings}
            raise ValueError(f"Lightning refuses the trainer settings ({', '.join(f'trainer.{k}={v}' for k, v in shown.items())}): {cause}") from err

    def test_accuracy(self, model: nn.Module, data: TensorDataModule) -> float:
        """Test accuracy of ``model`` through a quiet trainer of the run's kind (its devices)."""
        module = ClassifierModule(model, data.num_classes, optimizer=None)  # evaluation only
        quiet = {"enable_progress_bar": False, "enable_model_summary": False, "enable_checkpointing": False}
        return float(self.build([], False, 1, **quiet).test(module, datamodule=data, verbose=False)[0]["test/acc"])


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


def compile_choice(enabled: bool, objective: Any, data: TensorDataModule, *compression: Any) -> bool:
    """Whether the student's training forward is compiled (``compile=true`` is ``enabled``), and
    the data's training batches made one shape for it. Compression callbacks and feature terms
    keep the run eager: their masks, parametrisations and hooks act on the eager modules."""
    if not enabled:
        return False
    blockers = [c.describe() for c in compression if c is not None]
    if objective.needs_features:
        blockers.append("feature terms (forward hooks)")
    if blockers:
        log.warning("compile=true ignored for the student: %s; training eagerly", ", ".join(blockers))
        return False
    data.drop_last = True  # one batch shape: no recompilation, and CUDA graphs replay every step
    return True
