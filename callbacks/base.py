"""What every pruning callback shares: choosing layers by name, model selection at the final
sparsity, the learning-rate drop of prune-and-retrain, and the contract with ``kd.experiment``.

Why our own callbacks rather than Lightning's ``ModelPruning``: its defaults are traps for
research use (``resample_parameters``/lottery-ticket reset on by default, amounts that compound
call after call, biases pruned unless told otherwise), it reports sparsity only on the console,
and it prunes only at epoch ends. These callbacks use ``torch.nn.utils.prune`` (unstructured) and
Torch-Pruning (structured) directly, with integer counts, and log through ``pl_module.log``.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from fnmatch import fnmatch
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Callback
from torch import nn
from torch.nn.utils import prune

from callbacks.schedule import SparsitySchedule

PRUNABLE = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)

# ModelCheckpoint monitors this key while a pruning or quantization callback runs: val/acc at
# the final sparsity (and in the quantized form), 0 before, so the selected epoch is never one
# of a denser or still-float model.
SELECTION_KEY = "val/acc_at_target"


def check_fraction(name: str, value: float) -> float:
    if not isinstance(value, (int, float)) or not 0.0 <= float(value) < 1.0:
        raise ValueError(f"{name} must be a fraction in [0, 1), got {value!r}")
    return float(value)


def select_layers(model: nn.Module, layers: Sequence[str] | None, skip: Sequence[str]) -> dict[str, nn.Module]:
    """Convolution and linear layers of ``model`` matching ``layers`` (fnmatch patterns on
    module names; None for all) minus those matching ``skip``. A pattern that matches no
    prunable layer is an error that lists the valid names."""
    candidates = {n: m for n, m in model.named_modules() if isinstance(m, PRUNABLE)}
    for pattern in [*(layers or []), *skip]:
        if not any(fnmatch(n, pattern) for n in candidates):
            raise ValueError(f"no prunable layer matches {pattern!r}; the prunable layers are {list(candidates)}")
    chosen = {
        n: m
        for n, m in candidates.items()
        if (layers is None or any(fnmatch(n, p) for p in layers)) and not any(fnmatch(n, p) for p in skip)
    }
    if not chosen:
        raise ValueError(f"every prunable layer is skipped; the prunable layers are {list(candidates)}")
    return chosen


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


def output_layer(model: nn.Module, input_shape: tuple[int, ...]) -> nn.Module:
    """The last linear (or conv) layer whose output width equals the model's output width:
    its channels are the classes."""
    with torch.no_grad():
        was_training = model.training
        width = model.eval()(torch.zeros(1, *input_shape, device=next(model.parameters()).device)).shape[1]
        model.train(was_training)
    for module in reversed(list(model.modules())):
        if isinstance(module, nn.Linear) and module.out_features == width:
            return module
        if isinstance(module, nn.modules.conv._ConvNd) and module.out_channels == width:
            return module
    raise ValueError(f"cannot find the output layer of {type(model).__name__}")


class PruningCallback(Callback):
    """Base of the pruning callbacks (see the module docstring for the contract).

    ``kd.experiment`` calls :meth:`check` before training (bad layer names fail there), points
    the checkpoint callback at :data:`SELECTION_KEY`, and after testing calls :meth:`finalize`
    to make the pruning permanent (and, for structured pruning, physical) before measuring and
    saving the model.
    """

    selection_key = SELECTION_KEY
    # ``kd.experiment`` sets this to the seeded student builder (lottery tickets' random reinit)
    build_model: Callable[[], nn.Module] | None = None

    @property
    def at_target(self) -> bool:
        """True once the model has its final sparsity."""
        raise NotImplementedError

    def check(self, model: nn.Module, input_shape: tuple[int, ...], max_epochs: int | None = None) -> None:
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

    def finalize(self, model: nn.Module) -> nn.Module:
        """The model to measure and save once training is over."""
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
        acc = trainer.callback_metrics.get("val/acc")
        if acc is not None and not trainer.sanity_checking:
            trainer.callback_metrics[self.selection_key] = acc.clone() if self.at_target else torch.zeros_like(acc)

    def log_sparsity(self, pl_module: pl.LightningModule, masks: dict[str, torch.Tensor]) -> None:
        """``model/sparsity`` over the pruned weights and ``model/sparsity/<layer>`` per layer,
        from keep-masks, once per epoch through Lightning (so they reach MLflow)."""
        kept = sum(int(m.sum()) for m in masks.values())
        total = sum(m.numel() for m in masks.values())
        values = {f"model/sparsity/{name}": 1.0 - float(m.float().mean()) for name, m in masks.items()}
        values["model/sparsity"] = 1.0 - kept / total
        values["prune/at_target"] = float(self.at_target)
        pl_module.log_dict(values, on_step=False, on_epoch=True)
