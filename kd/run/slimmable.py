"""A slimmable student after training (``student=slimmable``): every width tested, measured and
saved as a plain model of its own (``student_w<w>.pt``, which loads into the architecture of the
config), with a table (``widths.csv``) and accuracy against MACs (``widths.png``)."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Callable

from omegaconf import DictConfig
from torch import nn

from kd.tracking.figures import new_figure, save_figure
from kd.compression.thinning import PRUNED_KEY
from kd.models.slimmable import Slimmable
from kd.tracking import keys
from kd.tracking.measure import accuracy
from kd.train.checkpoint import save_weights

WIDTH = "width"


def build(cfg: DictConfig, student: nn.Module, num_classes: int, input_shape: tuple[int, ...], objective) -> Slimmable:
    """The slimmable student of ``student.widths``, checked before training."""
    if objective.needs_features:
        raise ValueError("student=slimmable trains every width with the run's objective on logits; an objective with feature "
                         "terms is not supported with slimmable students: use a logit objective (distill=kd, dkd, none, ...)")  # fmt: skip
    widths = cfg.widths
    return Slimmable(student, list(widths) if widths is not None else [], num_classes, input_shape, cfg.get("random_widths", 2),
                     cfg.get("inplace_distill", True), cfg.get("narrow_objective", False))  # fmt: skip


def report(model: Slimmable, data, measure: Callable[[nn.Module], dict[str, float]],
           run_dir: Path) -> tuple[dict[str, float], list[Path], dict[float, nn.Module]]:  # fmt: skip
    """``width/<w>/*``: test accuracy and the plain model's measurements; the files; the plain
    models of the narrower widths (for the ONNX export)."""
    metrics: dict[str, float] = {}
    plains: dict[float, nn.Module] = {}
    rows = []
    files: list[Path] = []
    for w in model.widths:
        plain, removed = model.materialize(w)
        plain.eval()
        measured = measure(plain)
        acc = accuracy(plain, data.test.x, data.test.y)
        metrics[keys.key(WIDTH, f"{w:g}/test_acc")] = acc
        metrics |= {keys.key(WIDTH, f"{w:g}/{k}"): v for k, v in measured.items()}
        files.append(save_weights(plain, run_dir / f"student_w{w:g}.pt", {PRUNED_KEY: removed} if removed else None))
        rows.append({"width": w, "test_acc": acc, **measured})
        if w != model.widths[-1]:
            plains[w] = plain
    table = run_dir / "widths.csv"
    columns = list(dict.fromkeys(k for r in rows for k in r))
    with table.open("w", newline="") as f:
        writer = csv.DictWriter(f, columns)
        writer.writeheader()
        writer.writerows(rows)
    return metrics, [table, _plot(run_dir / "widths.png", rows), *files], plains


def _plot(path: Path, rows: list[dict]) -> Path:
    fig, ax = new_figure((6.0, 4.2))
    ax.plot([r["macs"] for r in rows], [r["test_acc"] for r in rows], "o-", color="C0", label="one set of weights")
    for r in rows:
        ax.annotate(f"{r['width']:g}x", (r["macs"], r["test_acc"]), textcoords="offset points", xytext=(4, -10), fontsize=8)
    ax.set_xscale("log")
    ax.set_xlabel("MACs per input")
    ax.set_ylabel("test accuracy")
    ax.set_title("slimmable student: every width", fontsize=10)
    return save_figure(fig, ax, path)
