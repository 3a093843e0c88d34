"""Choosing a model's layers by name: the prunable layers, the output layer, fractions of them.

Shared by the compression stages (``callbacks/``), factorisation and the omitted-class analysis.
"""

from __future__ import annotations

from collections.abc import Sequence
from fnmatch import fnmatch

import torch
from torch import nn

PRUNABLE = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


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
