"""What every pruning callback shares: choosing layers by name, model selection at the final
sparsity, the learning-rate drop of prune-and-retrain, and the contract with ``kd.run.experiment``.

Why our own callbacks rather than Lightning's ``ModelPruning``: its defaults are traps for
research use (``resample_parameters``/lottery-ticket reset on by default, amounts that compound
call after call, biases pruned unless told otherwise), it reports sparsity only on the console,
and it prunes only at epoch ends. These callbacks use ``torch.nn.utils.prune`` (unstructured) and
Torch-Pruning (structured) directly, with integer counts, and log through ``pl_module.log``.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Callback
from torch import nn
from torch.nn.utils import prune

from callbacks.schedule import SparsitySchedule
from callbacks.stage import SELECTION_KEY, StageContext, StageResult, write_selection
from kd.tracking import keys

class PruningCallback(Callback):
    """Base of the pruning callbacks: a ``CompressionStage`` (``callbacks/stage.py``).

    ``check`` before training (bad layer names, a schedule the epochs cannot complete); the
    callback itself trains; an epoch counts for model selection once the model has its final
    sparsity; ``finalize`` measures the dense view (``dense/*``), makes the pruning permanent (and,
    for structured pruning, physical: :meth:`fold`), and hands on what rebuilds the architecture.
    """

    group = "prune"
    kind = "magnitude"
    prepares_graph = False
    selection_key = SELECTION_KEY
    # ``kd.run.experiment`` sets this to the seeded student builder (lottery tickets' random reinit)
    build_model: Callable[[], nn.Module] | None = None

    @property
    def at_target(self) -> bool:
        """True once the model has its final sparsity."""
        raise NotImplementedError

    # -- the CompressionStage contract -----------------------------------------------------
    def check(self, model: nn.Module, context: StageContext) -> None:
        self.check_layers(model, context.input_shape, context.max_epochs)

    def prepare(self, model: nn.Module, context: StageContext) -> nn.Module:
        return model  # acts while training and after it

    def callbacks(self) -> list[Callback]:
        return [self]

    def selectable(self, epoch: int) -> bool:
        return self.at_target

    def finalize(self, model: nn.Module, context: StageContext) -> StageResult:
        dense = {}
        if context.measure is not None:  # masks folded in (and channels removed): measured against the dense model
            dense = keys.prefixed(keys.DENSE, context.measure(self.dense_view(model)))
        folded = self.fold(model)
        return StageResult(folded, dense, self.artifacts(Path(context.run_dir)), self.saved_extras())

    # -- what the subclasses implement ------------------------------------------------------
    def check_layers(self, model: nn.Module, input_shape: tuple[int, ...], max_epochs: int | None = None) -> None:
        """Raise on anything in the configuration that does not fit ``model`` (or a schedule
        that ``max_epochs`` of training cannot complete), before training starts."""

    def check_schedule(self, schedule: SparsitySchedule, max_epochs: int | None) -> None:
        if max_epochs is not None and schedule.unit == "epoch" and schedule.last >= max_epochs:
            raise ValueError(
                f"the pruning schedule ends at epoch {schedule.last} but training has trainer.max_epochs="
                f"{max_epochs}: the model would never reach its final sparsity (epochs count from 0)"
            )

    def describe(self) -> str:
        raise NotImplementedError

    def fold(self, model: nn.Module) -> nn.Module:
        """The model to measure and save once training is over (the pruning made permanent)."""
        return model

    def dense_view(self, model: nn.Module) -> nn.Module:
        """A copy of ``model`` with every mask folded into its weights and the original shapes:
        the dense reference a pruned model is measured against (torch's pruning
        reparametrisation removed, keep-mask buffers ``*_mask`` dropped)."""
        probe = copy.deepcopy(model)
        for module in probe.modules():
            for hook in list(module._forward_pre_hooks.values()):
                if isinstance(hook, prune.BasePruningMethod):
                    prune.remove(module, hook._tensor_name)
            for name in [n for n in module._buffers if n.endswith("_mask")]:
                del module._buffers[name]
        return probe

    def saved_extras(self) -> dict[str, Any]:
        """Entries stored beside the state dict in ``student.pt`` (what rebuilds the architecture)."""
        return {}

    def artifacts(self, run_dir: Path) -> list[Path]:
        """Files this callback wrote for the run (tables, plots, masks), to log as artifacts."""
        return []

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Checkpoint callbacks run after all others, so they see this key for this epoch.
        write_selection(trainer)

    def log_sparsity(self, pl_module: pl.LightningModule, masks: dict[str, torch.Tensor]) -> None:
        """``model/sparsity`` over the pruned weights and ``model/sparsity/<layer>`` per layer,
        from keep-masks, once per epoch through Lightning (so they reach MLflow)."""
        kept = sum(int(m.sum()) for m in masks.values())
        total = sum(m.numel() for m in masks.values())
        values = {keys.key(keys.MODEL, f"sparsity/{name}"): 1.0 - float(m.float().mean()) for name, m in masks.items()}
        values[keys.key(keys.MODEL, "sparsity")] = 1.0 - kept / total
        values[keys.key(keys.PRUNE, "at_target")] = float(self.at_target)
        pl_module.log_dict(values, on_step=False, on_epoch=True)
