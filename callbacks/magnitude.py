"""Unstructured magnitude pruning (``prune=magnitude|agp|iterative``).

Each pruned tensor gets a boolean keep-mask buffer (``weight_mask``, ``bias_mask``) registered
in ``setup()``, all ones, so a checkpoint saved mid-schedule loads into it and the masks travel
in the model's state dict. Pruned weights are held at exactly zero by multiplying every tensor
by its mask after each optimizer step (one fused ``torch._foreach_mul_``). We measured
``torch.nn.utils.prune``'s reparametrisation (``weight = weight_orig * weight_mask`` recomputed
by a forward pre-hook, and differentiated through, at every step) at 1.11-1.18x the epoch time
of LeNet-5 on Fashion-MNIST (``benchmarks/pruning.py``); the masked forward is the same either
way, the gradients of the surviving weights too, so the cheaper form is used here (the lottery
callback keeps torch's form, whose ``weight_orig`` it rewinds).

Pruning events come from a :class:`~callbacks.schedule.SparsitySchedule`; each turns the
event's target into an integer count of the tensor's *original* size and masks the smallest
surviving weights until that count is reached, so the final sparsity is the target exactly
(torch's float amounts apply to the remaining weights and compound). Scope ``layer`` prunes
every tensor to its own sparsity (``sparsity``, or ``amounts`` by module-name pattern);
``global`` ranks all chosen weights together (Han et al. 2015 use a per-layer threshold;
global ranking is the common modern variant).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from fnmatch import fnmatch
from pathlib import Path

import pytorch_lightning as pl
import torch
from torch import Tensor, nn

from callbacks.base import PruningCallback
from kd.compression.layers import check_fraction, select_layers
from kd.train.trainer import scale_learning_rate
from callbacks.schedule import SparsitySchedule
from kd.compression import sensitivity

SCOPES = ("layer", "global")


class MagnitudePruning(PruningCallback):
    """Remove the smallest-magnitude weights on a schedule.

    Args:
        sparsity: final fraction of the chosen weights removed, in [0, 1).
        scope: ``layer`` (each tensor to its own sparsity) or ``global`` (one ranking).
        schedule, start, end, every, unit, initial_sparsity: see ``SparsitySchedule``.
        layers: fnmatch patterns of the conv/linear layers to prune; None for all of them.
        skip: patterns of layers left dense (e.g. the first conv and the classifier).
        amounts: ``{pattern: sparsity}`` overriding ``sparsity`` per layer (scope ``layer``).
        include_bias: prune biases too (off by default: they are few and matter).
        lr_scale: multiply the learning rate by this at the first pruning event (Han et al. 2015
            retrain at a lower rate); 1 leaves it.
        sensitivity: before the first event, prune each layer alone to each of
            ``sensitivity_levels`` on the validation set and write a CSV table and a plot.
        max_drop: with ``sensitivity``, replace the per-layer sparsities by the highest tested
            level that costs at most this much validation accuracy (absolute, e.g. 0.01).
    """

    kind = "magnitude"

    def __init__(
        self,
        sparsity: float,
        scope: str = "layer",
        schedule: str = "oneshot",
        start: int = 0,
        end: int | None = None,
        every: int = 1,
        unit: str = "epoch",
        initial_sparsity: float = 0.0,
        layers: Sequence[str] | None = None,
        skip: Sequence[str] = (),
        amounts: Mapping[str, float] | None = None,
        include_bias: bool = False,
        lr_scale: float = 1.0,
        sensitivity: bool = False,
        sensitivity_levels: Sequence[float] = sensitivity.LEVELS,
        max_drop: float | None = None,
    ) -> None:
        self.sparsity = check_fraction("prune.sparsity", sparsity)
        if scope not in SCOPES:
            raise ValueError(f"prune.scope must be one of {SCOPES}, got {scope!r}")
        self.amounts = {str(k): check_fraction(f"prune.amounts[{k}]", v) for k, v in (amounts or {}).items()}
        if scope == "global" and self.amounts:
            raise ValueError("prune.amounts sets per-layer sparsities; it needs prune.scope=layer, not global")
        if not 0.0 < lr_scale <= 1.0:
            raise ValueError(f"prune.lr_scale must lie in (0, 1], got {lr_scale}")
        if max_drop is not None and not sensitivity:
            raise ValueError("prune.max_drop picks amounts from the sensitivity analysis: set prune.sensitivity=true")
        if max_drop is not None and scope == "global":
            raise ValueError("prune.max_drop picks per-layer sparsities; it needs prune.scope=layer")
        self.levels = [check_fraction("prune.sensitivity_levels[]", v) for v in sensitivity_levels]
        self.schedule = SparsitySchedule(schedule, start, end, every, unit, initial_sparsity)
        self.scope, self.layers, self.skip = scope, list(layers) if layers is not None else None, list(skip)
        self.include_bias, self.lr_scale = include_bias, lr_scale
        self.sensitivity, self.max_drop = sensitivity, max_drop
        self._targets: dict[str, tuple[nn.Module, str]] = {}  # "layer" / "layer.bias" -> (module, tensor)
        self._done: list[int] = []  # event times applied (checkpointed)
        self._lr_scaled = False
        self._picked: dict[str, float] | None = None  # per-layer sparsities from sensitivity
        self._files: list[Path] = []

    # ---- configuration ------------------------------------------------------------------
    def check_layers(self, model: nn.Module, input_shape: tuple[int, ...], max_epochs: int | None = None) -> None:
        self.check_schedule(self.schedule, max_epochs)
        select_layers(model, self.layers, self.skip)
        for pattern in self.amounts:
            if not any(fnmatch(n, pattern) for n in select_layers(model, self.layers, self.skip)):
                raise ValueError(f"prune.amounts pattern {pattern!r} matches no pruned layer")

    def describe(self) -> str:
        kind = "magnitude" if self.schedule.kind == "oneshot" else self.schedule.kind
        per_layer = self.amounts or self.max_drop is not None  # prune.sparsity is then not the whole story
        return f"prune {kind}{'-global' if self.scope == 'global' else ''} s={'per-layer' if per_layer else f'{self.sparsity:g}'}"

    def final_sparsity(self, layer: str) -> float:
        if self._picked is not None:
            return self._picked[layer]
        return next((v for p, v in self.amounts.items() if fnmatch(layer, p)), self.sparsity)

    @property
    def at_target(self) -> bool:
        return self.schedule.last in self._done

    # ---- Lightning hooks ----------------------------------------------------------------
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        self.check_schedule(self.schedule, trainer.max_epochs)
        self._targets = {}
        for name, module in select_layers(pl_module.model, self.layers, self.skip).items():
            for tensor in ("weight", "bias") if self.include_bias else ("weight",):
                param = getattr(module, tensor, None)
                if param is None:
                    continue
                if not hasattr(module, f"{tensor}_mask"):  # present when set up before (resume, re-fit)
                    module.register_buffer(f"{tensor}_mask", torch.ones_like(param, dtype=torch.bool))
                self._targets[name if tensor == "weight" else f"{name}.{tensor}"] = (module, tensor)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.schedule.unit == "step" and self.schedule.last >= trainer.estimated_stepping_batches:
            raise ValueError(
                f"the pruning schedule ends at step {self.schedule.last} but training has "
                f"{trainer.estimated_stepping_batches} steps: the model would never reach its final sparsity"
            )

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.schedule.unit == "epoch":
            self._event(trainer, pl_module, trainer.current_epoch)

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: object, batch_idx: int) -> None:
        if self.schedule.unit == "step":
            self._event(trainer, pl_module, trainer.global_step)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: object, batch: object, batch_idx: int) -> None:
        self._apply_masks()  # after the optimizer step: pruned weights stay exactly zero

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.log_sparsity(pl_module, self.masks())

    # ---- pruning ------------------------------------------------------------------------
    def masks(self) -> dict[str, Tensor]:
        """Current keep-masks: ``layer`` for its weight, ``layer.bias`` for its bias."""
        return {key: getattr(module, f"{tensor}_mask") for key, (module, tensor) in self._targets.items()}

    @torch.no_grad()
    def _event(self, trainer: pl.Trainer, pl_module: pl.LightningModule, t: int) -> None:
        if t in self._done or t not in self.schedule.times():
            return
        self._prune(trainer, pl_module, t)
        self._apply_masks()
        self._done.append(t)
        if self.lr_scale != 1.0 and not self._lr_scaled:
            scale_learning_rate(trainer, self.lr_scale)
            self._lr_scaled = True

    def _prune(self, trainer: pl.Trainer, pl_module: pl.LightningModule, t: int) -> None:
        """Set the keep-masks for event ``t`` (the N:M pruner sets its own)."""
        if self.sensitivity and not self._done:
            self._analyse(trainer, pl_module)
        masks = self.masks()
        params = {key: getattr(module, tensor) for key, (module, tensor) in self._targets.items()}
        if self.scope == "global":
            target = self.schedule.sparsity_at(t, self.sparsity)
            order = list(masks)
            keep = _keep_largest(torch.cat([params[k].detach().flatten() for k in order]),
                                 torch.cat([masks[k].flatten() for k in order]), target)  # fmt: skip
            for key, chunk in zip(order, keep.split([masks[k].numel() for k in order])):
                masks[key].copy_(chunk.view_as(masks[key]))
        else:
            for key, mask in masks.items():
                target = self.schedule.sparsity_at(t, self.final_sparsity(key.removesuffix(".bias")))
                mask.copy_(_keep_largest(params[key].detach().flatten(), mask.flatten(), target).view_as(mask))

    def _apply_masks(self) -> None:
        if self._targets:
            with torch.no_grad():
                params = [getattr(m, t) for m, t in self._targets.values()]
                torch._foreach_mul_(params, [getattr(m, f"{t}_mask") for m, t in self._targets.values()])

    def _analyse(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        data = trainer.datamodule
        x, y = data.val.x, data.val.y  # the whole validation split on every rank: same picks under DDP

        def evaluate(model: nn.Module) -> float:
            correct = sum(int((model(xb.to(pl_module.device)).argmax(1).cpu() == yb).sum()) for xb, yb in zip(x.split(1024), y.split(1024)))
            return correct / len(y)

        layers = {n: m for n, m in select_layers(pl_module.model, self.layers, self.skip).items()}
        was_training = pl_module.model.training
        pl_module.model.eval()
        rows = sensitivity.layer_sensitivity(pl_module.model, layers, evaluate, self.levels)
        pl_module.model.train(was_training)
        out = Path(trainer.default_root_dir)
        self._files = [sensitivity.write_csv(rows, out / "sensitivity.csv"), sensitivity.plot(rows, out / "sensitivity.png")]
        if self.max_drop is not None:
            self._picked = sensitivity.pick_amounts(rows, self.max_drop)

    def artifacts(self, run_dir: Path) -> list[Path]:
        return [f for f in self._files if f.exists()]

    def fold(self, model: nn.Module) -> nn.Module:
        """Drop the mask buffers: a plain model whose pruned weights are zeros (once; a second
        call finds nothing left to fold)."""
        self._apply_masks()
        for module, tensor in self._targets.values():
            module._buffers.pop(f"{tensor}_mask", None)
        self._targets = {}
        return model

    # ---- checkpoint state (masks are in the model's state dict) --------------------------
    def state_dict(self) -> dict[str, object]:
        return {"done": list(self._done), "lr_scaled": self._lr_scaled, "picked": self._picked}

    def load_state_dict(self, state_dict: dict[str, object]) -> None:
        self._done = list(state_dict["done"])  # type: ignore[arg-type]
        self._lr_scaled = bool(state_dict["lr_scaled"])
        self._picked = state_dict.get("picked")  # type: ignore[assignment]


def _keep_largest(values: Tensor, keep: Tensor, sparsity: float) -> Tensor:
    """Keep-mask with exactly ``round(sparsity * numel)`` entries removed: those already removed
    (``keep`` False) first, then the smallest surviving magnitudes. Never revives a weight."""
    target = round(sparsity * values.numel())
    if target <= int((~keep).sum()):
        return keep
    scores = values.abs().masked_fill(~keep, -1.0)  # removed ones rank first
    new = torch.ones_like(keep)
    new[torch.topk(scores, target, largest=False).indices] = False
    return new
