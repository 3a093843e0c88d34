"""Pruning sensitivity: how much accuracy each layer loses when it alone is pruned.

Each layer's weight is magnitude-pruned to every level in turn, with every other layer intact
and no retraining, and the model is evaluated (Han et al. 2015, fig. 6; the seeds' "sensitivity
analysis" that sets per-layer pruning rates). The table answers "which layers can take more
pruning", and :func:`pick_amounts` turns it into per-layer sparsities for an allowed drop.
"""

from __future__ import annotations

import csv
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch import nn

from kd.tracking.figures import new_figure, save_figure

LEVELS = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95)


@torch.no_grad()
def magnitude_mask(weight: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Keep-mask removing exactly ``round(sparsity * numel)`` weights of smallest magnitude."""
    k = round(sparsity * weight.numel())
    mask = torch.ones_like(weight, dtype=torch.bool)
    if k:
        drop = torch.topk(weight.abs().flatten(), k, largest=False).indices
        mask.view(-1)[drop] = False
    return mask


@torch.no_grad()
def layer_sensitivity(
    model: nn.Module,
    layers: dict[str, nn.Module],
    evaluate: Callable[[nn.Module], float],
    levels: Sequence[float] = LEVELS,
) -> list[dict[str, float | str]]:
    """Rows ``{"layer", "sparsity", "accuracy"}``: each layer pruned alone to each level.

    ``layers`` maps names to modules with a ``weight``; the weights are restored afterwards.
    A module under ``torch.nn.utils.prune`` is changed through ``weight_orig`` (its ``weight``
    is recomputed from it at every forward).
    """
    rows: list[dict[str, float | str]] = []
    for name, module in layers.items():
        stored = getattr(module, "weight_orig", module.weight)
        original = stored.detach().clone()
        for level in levels:
            stored.mul_(magnitude_mask(module.weight.detach(), level))
            rows.append({"layer": name, "sparsity": float(level), "accuracy": float(evaluate(model))})
            stored.copy_(original)
    return rows


def pick_amounts(rows: list[dict[str, float | str]], max_drop: float) -> dict[str, float]:
    """Per layer, the highest tested sparsity whose accuracy is within ``max_drop`` of the dense
    model (the layer's 0% row); every sparsity below it must also be within the drop."""
    picked: dict[str, float] = {}
    for name in dict.fromkeys(str(r["layer"]) for r in rows):
        mine = sorted((r for r in rows if r["layer"] == name), key=lambda r: float(r["sparsity"]))
        base = float(mine[0]["accuracy"])
        picked[name] = 0.0
        for r in mine:
            if base - float(r["accuracy"]) > max_drop:
                break
            picked[name] = float(r["sparsity"])
    return picked


def write_csv(rows: list[dict[str, float | str]], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["layer", "sparsity", "accuracy"])
        writer.writeheader()
        writer.writerows(rows)
    return path


def plot(rows: list[dict[str, float | str]], path: Path, title: str = "pruning sensitivity") -> Path:
    """Accuracy vs sparsity, one line per layer, the dense accuracy as a reference line."""
    fig, ax = new_figure((7, 4.5))
    names = list(dict.fromkeys(str(r["layer"]) for r in rows))
    for name in names:
        mine = sorted((r for r in rows if r["layer"] == name), key=lambda r: float(r["sparsity"]))
        ax.plot([100 * float(r["sparsity"]) for r in mine], [100 * float(r["accuracy"]) for r in mine], marker="o", label=name)
    dense = [float(r["accuracy"]) for r in rows if float(r["sparsity"]) == 0.0]
    if dense:
        ax.axhline(100 * dense[0], color="grey", linestyle="--", linewidth=1, label="dense")
    ax.set_xlabel("sparsity of the layer alone (% of its weights removed)")
    ax.set_ylabel("validation accuracy (%)")
    ax.set_title(title)
    return save_figure(fig, ax, path)
