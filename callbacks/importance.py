"""Channel importance for structured pruning: Torch-Pruning's estimators, fed with gradients
accumulated over calibration batches where they need them, and made monotone."""

from __future__ import annotations

import torch
import torch.nn.functional as F
import torch_pruning as tp
from torch import Tensor, nn

from kd.data import TensorDataModule

IMPORTANCE = ("l1", "l2", "random", "taylor", "hessian", "fpgm")


def importance_of(name: str, model: nn.Module, data: TensorDataModule | None, calibration_batches: int) -> tp.importance.Importance:
    """The estimator ``name`` (one of ``IMPORTANCE``); ``taylor`` and ``hessian`` first run
    ``calibration_batches`` batches of ``data`` through ``model`` for their gradients."""
    if name in ("l1", "l2"):
        return tp.importance.GroupMagnitudeImportance(p=1 if name == "l1" else 2)
    if name == "random":
        return SeededRandom()
    if name == "fpgm":
        return tp.importance.FPGMImportance()
    if data is None:
        raise ValueError(f"importance {name!r} needs training batches: prune inside a fit")
    squares = calibration_gradients(model, data, calibration_batches, squared=name == "hessian")
    if name == "taylor":
        return tp.importance.GroupTaylorImportance()  # reads |w * grad| from the summed .grad
    scorer = tp.importance.GroupHessianImportance()  # w^2 * h with h = mean squared batch gradient
    scorer._accu_grad, scorer._counter = squares, {p: calibration_batches for p in squares}
    return scorer


def calibration_gradients(model: nn.Module, data: TensorDataModule, batches: int, squared: bool) -> dict[nn.Parameter, Tensor]:
    """Leave in ``.grad`` the cross-entropy gradient summed over the first ``batches`` batches of
    a fixed shuffle of the training split (the same on every DDP rank); with ``squared`` also
    return the sums of squared batch gradients."""
    order = torch.randperm(len(data.train.y), generator=torch.Generator().manual_seed(0))
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()  # no batch-norm statistics updated by the probe
    model.zero_grad(set_to_none=True)
    squares: dict[nn.Parameter, Tensor] = {}
    with torch.enable_grad():
        for chunk in order[: batches * data.batch_size].split(data.batch_size):
            if squared:
                model.zero_grad(set_to_none=True)
            F.cross_entropy(model(data.train.x[chunk].to(device)), data.train.y[chunk].to(device)).backward()
            if squared:
                for p in model.parameters():
                    if p.grad is not None:
                        squares[p] = squares.get(p, 0) + p.grad.detach() ** 2
    model.train(was_training)
    return squares


class Monotone(tp.importance.Importance):
    """An importance whose already-pruned channels rank lowest, so each event keeps them
    pruned and adds new ones (the model keeps its shapes between events)."""

    def __init__(self, inner: tp.importance.Importance, pruned: dict[str, Tensor], model: nn.Module) -> None:
        self.inner, self.pruned = inner, pruned
        self.names = {m: n for n, m in model.named_modules()}

    def __call__(self, group: tp.Group) -> Tensor | None:
        scores = self.inner(group)
        root = self.names.get(group[0].dep.target.module)
        if scores is not None and root in self.pruned and len(scores) == len(self.pruned[root]):
            scores = scores.clone()
            scores[self.pruned[root].to(scores.device)] = float("-inf")
        return scores




class SeededRandom(tp.importance.Importance):
    """Uniform random scores from a generator of its own (Torch-Pruning's ``RandomImportance``
    draws from the global RNG, which DDP ranks need not share): every rank prunes alike."""

    def __init__(self, seed: int = 0) -> None:
        self.generator = torch.Generator().manual_seed(seed)

    def __call__(self, group: tp.Group) -> Tensor:
        return torch.rand(len(group[0].idxs), generator=self.generator)
