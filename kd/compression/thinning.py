"""Physically removing channels: the graph surgery that makes a structurally pruned model
smaller, done by Torch-Pruning's dependency graph (dependent layers, BatchNorm, flatten and
residual couplings adjusted together).

A pruned model is stored as a state dict plus ``{layer: [removed output channels]}`` of the
dense architecture (``PRUNED_KEY``); :func:`remove_channels` replays that onto a freshly built
dense model before the weights load, so nothing is unpickled.
"""

from __future__ import annotations

import torch
import torch_pruning as tp
from torch import nn

PRUNED_KEY = "kd.pruned_channels"


def dependency_graph(model: nn.Module, input_shape: tuple[int, ...]) -> tp.DependencyGraph:
    device = next(model.parameters()).device
    with torch.enable_grad():  # the graph is traced through autograd
        return tp.DependencyGraph().build_dependency(model, example_inputs=torch.zeros(1, *input_shape, device=device))


def remove_channels(model: nn.Module, pruned: dict[str, list[int]], input_shape: tuple[int, ...]) -> nn.Module:
    """Remove the listed output channels of each named layer, and everything coupled to them,
    in place; returns ``model``."""
    graph = dependency_graph(model, input_shape)
    modules = dict(model.named_modules())
    unknown = sorted(set(pruned) - set(modules))
    if unknown:
        raise ValueError(f"cannot remove channels of {unknown}: no such layers in {type(model).__name__}")
    was_training = model.training
    model.eval()
    for name, channels in pruned.items():
        if channels:
            layer = modules[name]
            handler = graph.get_pruner_of_module(layer).prune_out_channels
            graph.get_pruning_group(layer, handler, sorted(int(c) for c in channels)).prune()
    return model.train(was_training)
