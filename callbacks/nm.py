"""N:M semi-structured sparsity (``prune=nm``, 2:4 by default): in every group of M consecutive
weights along a layer's input dimension at most N stay non-zero, the pattern NVIDIA's sparse
tensor cores run at twice the dense rate (Mishra et al. 2021, "Accelerating Sparse Deep Neural
Networks"; PyTorch's ``torch.sparse.to_sparse_semi_structured``).

Groups: a linear layer's rows split into runs of M input features; a convolution's weight, taken
as ``(out, kh, kw, in)`` (NVIDIA's layout for sparse convolutions), into runs of M input channels
at every kernel position. The input dimension must be a multiple of M (checked before training,
with the layer named). Within each group the weights with the lowest importance are removed:
``magnitude`` ``|w|`` or ``taylor`` ``|w * dL/dw|`` (the gradient summed over
``calibration_batches`` training batches, first-order Taylor as in Molchanov et al. 2019).

The schedules are the unstructured ones (``callbacks/schedule.py``): an event's sparsity target
``s_t`` (ending at ``(M - N) / M``) removes ``floor(s_t * M)`` weights of every group, so each step of a
gradual schedule is itself an N':M pattern (4:4, 3:4, 2:4). The pattern is verified on every pruned
tensor after each event. Masks are held as the magnitude pruner holds them (a keep-mask buffer,
re-applied after every optimizer step). On the CPU only the mask is applied: the weights stay dense
tensors with zeros (the run tags ``kd.nm_kernels`` so), since semi-structured sparse kernels exist
for CUDA only.
"""

from __future__ import annotations

from collections.abc import Sequence

import pytorch_lightning as pl
import torch
from torch import Tensor, nn

from callbacks.importance import calibration_gradients
from callbacks.magnitude import MagnitudePruning
from callbacks.stage import StageContext, StageResult
from kd.compression.layers import select_layers

IMPORTANCE = ("magnitude", "taylor")


def _grouped(t: Tensor, m: int) -> Tensor:
    """``(groups, m)``: the weight (or a tensor shaped like it) in runs of ``m`` along its input dimension."""
    if t.dim() == 4:  # conv (out, in, kh, kw) -> (out, kh, kw, in): runs of input channels
        t = t.permute(0, 2, 3, 1)
    return t.reshape(-1, m)


def _ungrouped(groups: Tensor, like: Tensor) -> Tensor:
    if like.dim() == 4:
        out, cin, kh, kw = like.shape
        return groups.reshape(out, kh, kw, cin).permute(0, 3, 1, 2)
    return groups.reshape(like.shape)


def nm_mask(scores: Tensor, keep: Tensor, n_removed: int, m: int) -> Tensor:
    """A keep-mask shaped like ``scores`` that removes the ``n_removed`` lowest-scoring entries
    of every group of ``m`` (those already removed, ``keep`` False, first: never revived)."""
    grouped = _grouped(scores, m).masked_fill(~_grouped(keep, m), float("-inf"))
    new = torch.ones_like(grouped, dtype=torch.bool)
    if n_removed > 0:
        new.scatter_(1, grouped.topk(n_removed, dim=1, largest=False).indices, False)
    return _ungrouped(new, keep).contiguous()


def check_pattern(weight: Tensor, n: int, m: int) -> int:
    """The largest count of non-zeros in any group of ``m``; raises if it is above ``n``."""
    most = int((_grouped(weight.detach(), m) != 0).sum(1).max())
    if most > n:
        raise AssertionError(f"a group of {m} weights holds {most} non-zeros, more than {n}")
    return most


class NMPruning(MagnitudePruning):
    """N:M semi-structured pruning (module docstring).

    Args:
        n, m: at most ``n`` non-zeros in every ``m`` consecutive input weights (2:4 by default).
        importance: ``magnitude`` or ``taylor``.
        calibration_batches: training batches for ``taylor``.
        schedule, start, end, every, unit, initial_sparsity, layers, skip, lr_scale: as for
            ``MagnitudePruning``; the final sparsity is ``(m - n) / m`` of the chosen layers.
    """

    def __init__(self, n: int = 2, m: int = 4, importance: str = "magnitude", calibration_batches: int = 8,
                 schedule: str = "oneshot", start: int = 0, end: int | None = None, every: int = 1, unit: str = "epoch",
                 initial_sparsity: float = 0.0, layers: Sequence[str] | None = None, skip: Sequence[str] = (),
                 lr_scale: float = 1.0) -> None:  # fmt: skip
        for key, value in (("n", n), ("m", m)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"prune.{key} must be an integer >= 1, got {value!r}")
        if n > m:
            raise ValueError(f"prune.n must be <= prune.m (at most n non-zeros in every m weights), got n={n}, m={m}")
        if importance not in IMPORTANCE:
            raise ValueError(f"prune.importance must be one of {IMPORTANCE} for N:M pruning, got {importance!r}")
        if calibration_batches < 1:
            raise ValueError(f"prune.calibration_batches must be >= 1, got {calibration_batches}")
        super().__init__((m - n) / m, "layer", schedule, start, end, every, unit, initial_sparsity, layers, skip, lr_scale=lr_scale)
        self.n, self.m, self.importance, self.calibration_batches = n, m, importance, calibration_batches
        self._fold_targets: list[tuple[nn.Module, str]] = []

    def describe(self) -> str:
        kind = "" if self.schedule.kind == "oneshot" else f" {self.schedule.kind}"
        return f"prune {self.n}:{self.m}{kind}" + ("" if self.importance == "magnitude" else f" {self.importance}")

    def check_layers(self, model: nn.Module, input_shape: tuple[int, ...], max_epochs: int | None = None) -> None:
        super().check_layers(model, input_shape, max_epochs)
        for name, layer in select_layers(model, self.layers, self.skip).items():
            width = layer.weight.shape[1]
            if isinstance(layer, nn.Conv2d) and layer.groups != 1:
                raise ValueError(f"N:M pruning of {name!r}: grouped convolutions are not supported; add it to prune.skip")
            if not isinstance(layer, (nn.Linear, nn.Conv2d)):
                raise ValueError(f"N:M pruning of {name!r} ({type(layer).__name__}): only linear and 2-d conv layers; add it to prune.skip")
            if width % self.m:
                raise ValueError(f"N:M pruning of {name!r}: its input dimension {width} is not a multiple of prune.m={self.m}; "
                                 f"add it to prune.skip (the first conv of an RGB model has 3)")  # fmt: skip

    def _prune(self, trainer: pl.Trainer, pl_module: pl.LightningModule, t: int) -> None:
        removed = int(self.schedule.sparsity_at(t, self.sparsity) * self.m + 1e-9)  # floor(s_t * M)
        if self.importance == "taylor":
            with torch.enable_grad():
                calibration_gradients(pl_module.model, trainer.datamodule, self.calibration_batches, squared=False)
        for module, tensor in self._targets.values():
            weight, mask = getattr(module, tensor), getattr(module, f"{tensor}_mask")
            scores = weight.abs() if self.importance == "magnitude" else (weight * weight.grad).abs()
            mask.copy_(nm_mask(scores, mask, removed, self.m))
            check_pattern(weight * mask, self.m - removed, self.m)
        if self.importance == "taylor":
            pl_module.model.zero_grad(set_to_none=True)

    def finalize(self, model: nn.Module, context: StageContext) -> StageResult:
        result = super().finalize(model, context)
        for module, tensor in self._fold_targets:
            check_pattern(getattr(module, tensor), self.n, self.m)
        cuda = next(model.parameters()).is_cuda
        result.tags["kd.nm_kernels"] = (f"{self.n}:{self.m} pattern verified on every pruned tensor; " +
                                        ("CUDA: semi-structured kernels not yet applied by kd" if cuda else
                                         "CPU: only the mask is applied (semi-structured sparse kernels are CUDA-only)"))  # fmt: skip
        return result

    def fold(self, model: nn.Module) -> nn.Module:
        self._fold_targets = list(self._targets.values())
        return super().fold(model)
