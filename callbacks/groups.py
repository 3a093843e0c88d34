"""Channel groups of a Torch-Pruning dependency graph, as parameter slices: what the structured
pruner zeroes (keep-masks) and what its group-lasso penalty is taken over."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch_pruning as tp
from torch import Tensor, nn

NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.GroupNorm, nn.LayerNorm)


@dataclass
class Member:
    """One slice of a channel group: ``param`` entries ``index`` along ``dim`` belong to the
    root channels ``root`` (same length as ``index``)."""

    param: nn.Parameter
    dim: int
    index: Tensor
    root: Tensor


def group_members(graph: tp.DependencyGraph, group: tp.Group) -> list[Member]:
    """The parameter slices of a full channel group (see ``_Member``)."""
    members: list[Member] = []
    for i, (dep, idxs) in enumerate(group):
        module, out = dep.target.module, graph.is_out_channel_pruning_fn(dep.handler)
        index = torch.as_tensor(list(idxs), dtype=torch.long)
        root = torch.as_tensor(list(group[i].root_idxs), dtype=torch.long)
        if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)):
            depthwise = isinstance(module, nn.modules.conv._ConvNd) and module.groups > 1
            if depthwise and module.groups != module.in_channels:
                raise NotImplementedError(f"grouped convolution {module} is not supported by structured pruning")
            if out or depthwise:
                members += [Member(p, 0, index, root) for p in (module.weight, module.bias) if p is not None]
            else:
                members.append(Member(module.weight, 1, index, root))
        elif isinstance(module, NORMS):
            members += [Member(p, 0, index, root) for p in (module.weight, module.bias) if p is not None]
        elif any(True for _ in module.parameters(recurse=False)) if isinstance(module, nn.Module) else False:
            raise NotImplementedError(f"structured pruning does not know how to mask {type(module).__name__}")
    return members


def keep_masks(groups: dict[str, list[Member]], pruned: dict[str, Tensor]) -> list[tuple[nn.Parameter, Tensor]]:
    """One boolean keep-mask per parameter that a pruned channel touches (a parameter can sit in
    several groups: a conv's rows in its own, its columns in its producer's)."""
    keep: dict[int, tuple[nn.Parameter, Tensor]] = {}
    for root, members in groups.items():
        removed = pruned[root]
        if removed.any():
            for m in members:
                _, mask = keep.setdefault(id(m.param), (m.param, torch.ones_like(m.param, dtype=torch.bool)))
                mask.index_fill_(m.dim, m.index[removed[m.root]].to(mask.device), False)
    return list(keep.values())


@torch.no_grad()
def add_penalty_gradient(kind: str, lam: float, groups: dict[str, list[Member]], model: nn.Module) -> None:
    """Add the gradient of a sparsity penalty to ``.grad`` (after backward): ``l1`` on the
    grouped layers' weights, ``group_lasso`` over whole channel groups, ``bn_l1`` on norm scales."""
    if kind == "bn_l1":  # network slimming: lam * sign(gamma)
        for m in model.modules():
            if isinstance(m, NORMS) and m.weight is not None and m.weight.grad is not None:
                m.weight.grad.add_(lam * torch.sign(m.weight))
    elif kind == "l1":
        for members in groups.values():
            for m in members:
                if m.param.grad is not None and m.param.dim() > 1:
                    m.param.grad.add_(lam * torch.sign(m.param))
    else:  # group lasso: d/dw of lam * sum_g ||w_g||_2 = lam * w / ||w_g||_2
        for members in groups.values():
            channels = int(max(int(m.root.max()) for m in members)) + 1
            norms = torch.zeros(channels, device=members[0].param.device)
            for m in members:  # (entries along dim) -> squared norm of each root channel
                sq = m.param.index_select(m.dim, m.index.to(m.param.device)).pow(2)
                norms.index_add_(0, m.root.to(norms.device), sq.movedim(m.dim, 0).reshape(len(m.index), -1).sum(1))
            scale = lam / norms.sqrt().clamp_min(1e-12)
            for m in members:
                if m.param.grad is not None:
                    shape = [1] * m.param.dim()
                    shape[m.dim] = -1
                    factor = scale[m.root.to(scale.device)].view(shape)
                    grad_slice = m.param.index_select(m.dim, m.index.to(m.param.device)) * factor
                    m.param.grad.index_add_(m.dim, m.index.to(m.param.device), grad_slice)
