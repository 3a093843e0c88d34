"""Structured pruning (``prune=structured``): whole filters, channels and neurons, made
physically smaller at the end by Torch-Pruning.

How it runs. Torch-Pruning's dependency graph splits the network into *groups*: an output
channel of a conv or linear layer together with everything coupled to it (the BatchNorm
channel, the input channel of the consumer, the columns a flatten maps it to, the channels a
residual addition ties to it). Pruning the input channels of a layer is pruning the output
channels of its producer, so every choice is made on groups. At each pruning event a
``MetaPruner`` ranks the channels of every group by the chosen importance and the group's
lowest ones are marked pruned; during training they are held at zero (re-zeroed after every
optimizer step), which is the physically pruned network's function exactly, so the model
keeps its shapes (DDP, checkpoints and ``ModelCheckpoint`` keep working mid-training).
:meth:`fold` then removes the channels with Torch-Pruning, checks that the outputs did
not change, and the run saves the smaller model with the list of removed channels.

Importance (``importance=``): ``l1``/``l2`` (group filter norm, Li et al. 2017), ``random``,
``taylor`` (first order, Molchanov et al. 2019: ``|w * dL/dw|`` with the gradient summed over
``calibration_batches`` training batches), ``hessian`` (second order, Optimal Brain Damage's
diagonal ``w^2 h`` with ``h`` estimated by the mean squared mini-batch gradient, the empirical
Fisher) and ``fpgm`` (distance to the geometric median of the layer's filters, He et al. 2019).
A channel once pruned stays pruned: later events only add to it.

Sparse regularisation (``regularize=``) adds a penalty's gradient after every backward pass:
``l1`` (``lambda * sign(w)`` on the pruned layers' weights), ``group_lasso``
(``lambda * w / ||w_g||_2`` with ``g`` a whole channel group, across coupled layers) and
``bn_l1`` (network slimming, Liu et al. 2017: ``lambda * sign(gamma)`` on BatchNorm scales).
Written here rather than taken from Torch-Pruning's ``GroupNormPruner``, whose regulariser
rescales the penalty by importance (DepGraph's variant), not the plain formulas above.
"""

from __future__ import annotations

from collections.abc import Sequence
from fnmatch import fnmatch

import pytorch_lightning as pl
import torch
import torch_pruning as tp
from torch import Tensor, nn

from callbacks.base import PruningCallback
from kd.compression.layers import check_fraction, output_layer
from kd.train.trainer import scale_learning_rate
from callbacks.groups import Member, add_penalty_gradient, group_members, keep_masks
from callbacks.importance import IMPORTANCE, Monotone, importance_of
from callbacks.schedule import SparsitySchedule
from kd.compression.thinning import PRUNED_KEY, dependency_graph, remove_channels

REGULARIZERS = ("l1", "group_lasso", "bn_l1")
SCOPES = ("layer", "global")


class StructuredPruning(PruningCallback):
    """Prune channel groups by importance on a schedule, then remove them physically.

    Args:
        sparsity: final fraction of each group's channels removed (of all channels, ranked
            together, with ``scope=global``), in [0, 1).
        importance: one of ``l1, l2, random, taylor, hessian, fpgm`` (module docstring).
        scope: ``layer`` (each group to ``sparsity``) or ``global`` (channels of all groups
            ranked together; group sizes then differ).
        schedule, start, end, every, unit, initial_sparsity: see ``SparsitySchedule``.
        layers: fnmatch patterns of the group roots to prune (the layer whose output channels
            lead the group); None for every group that can be pruned.
        skip: patterns of layers to keep whole; a group containing one is not pruned.
        calibration_batches: training batches for the ``taylor``/``hessian`` estimates.
        regularize: None or one of ``l1, group_lasso, bn_l1``, applied all through training.
        reg_strength: the penalty's lambda.
        lr_scale: learning-rate factor applied at the first pruning event.
    """

    kind = "structured"

    def __init__(
        self,
        sparsity: float,
        importance: str = "l1",
        scope: str = "layer",
        schedule: str = "oneshot",
        start: int = 0,
        end: int | None = None,
        every: int = 1,
        unit: str = "epoch",
        initial_sparsity: float = 0.0,
        layers: Sequence[str] | None = None,
        skip: Sequence[str] = (),
        calibration_batches: int = 8,
        regularize: str | None = None,
        reg_strength: float = 1e-4,
        lr_scale: float = 1.0,
    ) -> None:
        self.sparsity = check_fraction("prune.sparsity", sparsity)
        if importance not in IMPORTANCE:
            raise ValueError(f"prune.importance must be one of {IMPORTANCE}, got {importance!r}")
        if scope not in SCOPES:
            raise ValueError(
                f"prune.scope must be one of {SCOPES} for structured pruning (global ranks channels of "
                f"all groups together; unstructured global magnitude pruning is prune=magnitude), got {scope!r}"
            )
        if regularize is not None and regularize not in REGULARIZERS:
            raise ValueError(f"prune.regularize must be null or one of {REGULARIZERS}, got {regularize!r}")
        if calibration_batches < 1 or reg_strength < 0 or not 0.0 < lr_scale <= 1.0:
            raise ValueError("prune.calibration_batches must be >= 1, prune.reg_strength >= 0, prune.lr_scale in (0, 1]")
        self.schedule = SparsitySchedule(schedule, start, end, every, unit, initial_sparsity)
        self.importance, self.scope, self.regularize = importance, scope, regularize
        self.layers, self.skip = list(layers) if layers is not None else None, list(skip)
        self.calibration_batches, self.reg_strength, self.lr_scale = calibration_batches, reg_strength, lr_scale
        self._input_shape: tuple[int, ...] | None = None
        self._groups: dict[str, list[Member]] = {}  # root layer -> its group's slices
        self._pruned: dict[str, Tensor] = {}  # root layer -> bool per output channel (checkpointed)
        self._done: list[int] = []
        self._lr_scaled = False
        self._zeros: list[tuple[nn.Parameter, Tensor]] | None = None  # (param, keep-mask)

    # ---- configuration ------------------------------------------------------------------
    def describe(self) -> str:
        return f"prune structured-{self.importance} s={self.sparsity:g}"

    @property
    def at_target(self) -> bool:
        return self.schedule.last in self._done

    def _plan(
        self, model: nn.Module, input_shape: tuple[int, ...]
    ) -> tuple[tp.DependencyGraph, dict[str, nn.Module], list[nn.Module]]:
        """The dependency graph, the selected group roots by name, and the layers not to prune
        (kept whole, and the roots of groups not selected)."""
        graph = dependency_graph(model, input_shape)
        names = {m: n for n, m in model.named_modules()}
        output = output_layer(model, input_shape)
        kept = [m for n, m in model.named_modules() if any(fnmatch(n, p) for p in self.skip)] + [output]
        roots = {names[g[0].dep.target.module]: g[0].dep.target.module for g in graph.get_all_groups(ignored_layers=kept)}
        coupled = {names[dep.target.module]: names[g[0].dep.target.module]
                   for g in graph.get_all_groups() for dep, _ in g
                   if graph.is_out_channel_pruning_fn(dep.handler) and dep.target.module in names}  # fmt: skip
        coupled = {n: coupled[n] for n in names.values() if n in coupled}  # in the model's order
        for pattern in [*(self.layers or []), *self.skip]:
            if not any(fnmatch(n, pattern) for n in coupled):
                raise ValueError(f"no layer matches {pattern!r}; the layers with prunable outputs are {list(coupled)}")
        if self.layers is not None:
            for name in [n for n in coupled if any(fnmatch(n, p) for p in self.layers)]:
                if name == names[output]:
                    raise ValueError(f"{name!r} is the output layer: its channels are the classes and cannot be pruned")
                if coupled[name] not in roots:
                    raise ValueError(
                        f"{name!r} cannot be pruned: its channels are coupled (group of {coupled[name]!r}) with "
                        f"a layer kept whole (prune.skip or the output layer); prunable groups: {list(roots)}"
                    )
            selected = {n: m for n, m in roots.items() if any(fnmatch(a, p) for p in self.layers for a, r in coupled.items() if r == n)}
            kept += [m for n, m in roots.items() if n not in selected]
            roots = selected
        if not roots:
            raise ValueError("no channel group is left to prune (every group holds a skipped layer)")
        return graph, roots, kept

    def check_layers(self, model: nn.Module, input_shape: tuple[int, ...], max_epochs: int | None = None) -> None:
        self.check_schedule(self.schedule, max_epochs)
        self._plan(model, input_shape)

    # ---- Lightning hooks ----------------------------------------------------------------
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        self.check_schedule(self.schedule, trainer.max_epochs)
        self._bind(pl_module.model, tuple(trainer.datamodule.input_shape))

    def _bind(self, model: nn.Module, input_shape: tuple[int, ...]) -> None:
        """Find the groups of ``model`` (and their parameter slices) to prune."""
        self._input_shape = input_shape
        graph, roots, _ = self._plan(model, input_shape)
        self._groups = {}
        for name, root in roots.items():
            handler = graph.get_pruner_of_module(root).prune_out_channels
            group = graph.get_pruning_group(root, handler, list(range(graph.get_out_channels(root))))
            self._groups[name] = group_members(graph, group)
            self._pruned.setdefault(name, torch.zeros(graph.get_out_channels(root), dtype=torch.bool))
        self._zeros = None

    def apply(self, model: nn.Module, input_shape: tuple[int, ...]) -> nn.Module:
        """Prune ``model`` to the final sparsity now, outside training (pruned channels at zero;
        :meth:`fold` removes them). Data-free importances only: ``taylor`` and ``hessian``
        need the training data and run inside a fit."""
        self._bind(model, input_shape)
        self._prune_to(model, self.sparsity, None)
        return model

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.schedule.unit == "epoch":
            self._event(trainer, pl_module, trainer.current_epoch)

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: object, batch_idx: int) -> None:
        if self.schedule.unit == "step":
            self._event(trainer, pl_module, trainer.global_step)

    def on_after_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.regularize is not None and self.reg_strength > 0:
            add_penalty_gradient(self.regularize, self.reg_strength, self._groups, pl_module.model)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: object, batch: object, batch_idx: int) -> None:
        self._apply_zeros()  # after the optimizer step: pruned channels stay exactly zero

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        weights = [(n, m.weight) for n, m in pl_module.model.named_modules() if isinstance(m, (nn.Conv2d, nn.Conv1d, nn.Linear))]
        self.log_sparsity(pl_module, {n: w.detach() != 0 for n, w in weights})
        kept = sum(int((~p).sum()) for p in self._pruned.values())
        total = sum(p.numel() for p in self._pruned.values())
        pl_module.log("model/channel_sparsity", 1.0 - kept / total, on_step=False, on_epoch=True)

    # ---- pruning ------------------------------------------------------------------------
    def _event(self, trainer: pl.Trainer, pl_module: pl.LightningModule, t: int) -> None:
        if t in self._done or t not in self.schedule.times():
            return
        self._prune_to(pl_module.model, self.schedule.sparsity_at(t, self.sparsity), trainer)
        self._done.append(t)
        if self.lr_scale != 1.0 and not self._lr_scaled:
            scale_learning_rate(trainer, self.lr_scale)
            self._lr_scaled = True

    def _prune_to(self, model: nn.Module, ratio: float, trainer: pl.Trainer | None) -> None:
        """Mark the lowest-importance channels of every group pruned, up to ``ratio``."""
        data = trainer.datamodule if trainer is not None else None
        scores = importance_of(self.importance, model, data, self.calibration_batches)
        importance = Monotone(scores, self._pruned, model)
        _, _, kept = self._plan(model, self._input_shape)
        example = torch.zeros(1, *self._input_shape, device=next(model.parameters()).device)
        pruner = tp.pruner.MetaPruner(
            model, example, importance=importance, pruning_ratio=ratio, global_pruning=self.scope == "global",
            ignored_layers=kept,
        )  # fmt: skip
        names = {m: n for n, m in model.named_modules()}
        with torch.no_grad():
            for group in pruner.step(interactive=True):  # groups with the channels to remove; not removed here
                root = names[group[0].dep.target.module]
                self._pruned[root][torch.as_tensor(group[0].idxs, dtype=torch.long)] = True
        self._zeros = None
        self._apply_zeros()

    # ---- zeros, penalties, physical removal ---------------------------------------------
    def _apply_zeros(self) -> None:
        """Multiply every parameter a pruned channel touches by its keep-mask (one fused op)."""
        if self._zeros is None:
            self._zeros = keep_masks(self._groups, self._pruned)
        if self._zeros:
            with torch.no_grad():
                torch._foreach_mul_([p for p, _ in self._zeros], [k for _, k in self._zeros])

    def pruned_channels(self) -> dict[str, list[int]]:
        return {root: torch.nonzero(p).flatten().tolist() for root, p in self._pruned.items() if p.any()}

    def fold(self, model: nn.Module) -> nn.Module:
        """Remove the pruned channels for real and check that the function did not change."""
        assert self._input_shape is not None, "finalize() runs after fit()"
        model.eval()
        probe = torch.randn(8, *self._input_shape, generator=torch.Generator().manual_seed(0)).to(next(model.parameters()).device)
        with torch.no_grad():
            before = model(probe)
            remove_channels(model, self.pruned_channels(), self._input_shape)
            after = model(probe)
        if not torch.allclose(before, after, rtol=1e-4, atol=1e-4 * float(before.abs().max().clamp_min(1.0))):
            raise RuntimeError(f"removing the pruned channels changed the outputs (max |diff| {float((before - after).abs().max()):.3g})")
        return model

    def saved_extras(self) -> dict[str, object]:
        return {PRUNED_KEY: self.pruned_channels()}

    # ---- checkpoint state ----------------------------------------------------------------
    def state_dict(self) -> dict[str, object]:
        return {"done": list(self._done), "lr_scaled": self._lr_scaled, "pruned": {k: v.clone() for k, v in self._pruned.items()}}

    def load_state_dict(self, state_dict: dict[str, object]) -> None:
        self._done = list(state_dict["done"])  # type: ignore[arg-type]
        self._lr_scaled = bool(state_dict["lr_scaled"])
        self._pruned = {k: v.clone() for k, v in state_dict["pruned"].items()}  # type: ignore[union-attr]
        self._zeros = None
