"""A multi-exit student after training (``student=multi_exit``): when to leave early.

An input leaves at the first exit whose confidence passes the threshold ``t`` (strictly: at
``t = 0`` every input leaves at the first exit, at ``t = 1`` none passes and all reach the final
one), the final exit taking the rest. Confidence is the largest softmax probability
(``max_softmax``) or one minus the softmax entropy over its maximum, ``1 - H(p) / log K``
(``entropy``). Every threshold of the grid is evaluated on the validation split (accuracy, and
the average multiply-accumulates per input from each exit's cost, ``MultiExit.exit_macs``); the
chosen one is the cheapest whose validation accuracy stays within ``max_drop`` of the final exit's,
and the test split reports it: selection never looks at the test set.
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import DictConfig
from torch import Tensor

from kd.tracking.figures import new_figure, save_figure
from kd.models.exits import MultiExit
from kd.tracking import keys

CRITERIA = ("max_softmax", "entropy")


@dataclass(frozen=True)
class ExitPolicy:
    """How the run chooses its threshold: ``criterion``, ``max_drop`` (accuracy, 0..1) and the
    number of thresholds evenly spaced over [0, 1]."""

    criterion: str = "max_softmax"
    max_drop: float = 0.01
    thresholds: int = 21

    def __post_init__(self) -> None:
        if self.criterion not in CRITERIA:
            raise ValueError(f"student.exits.criterion must be one of {CRITERIA}, got {self.criterion!r}")
        if isinstance(self.max_drop, bool) or not isinstance(self.max_drop, (int, float)) or not 0 <= self.max_drop <= 1:
            raise ValueError(f"student.exits.max_drop must be an accuracy drop in [0, 1], got {self.max_drop!r}")
        if isinstance(self.thresholds, bool) or not isinstance(self.thresholds, int) or self.thresholds < 2:
            raise ValueError(f"student.exits.thresholds must be an integer >= 2 (points in [0, 1]), got {self.thresholds!r}")

    @property
    def grid(self) -> list[float]:
        """Evenly spaced over [0, 1], with finer steps below 1, where a trained exit's softmax
        confidences crowd."""
        return sorted({i / (self.thresholds - 1) for i in range(self.thresholds)} | {0.99, 0.995, 0.999})


def build(cfg: DictConfig, student: torch.nn.Module, num_classes: int, input_shape: tuple[int, ...], objective) -> tuple[MultiExit, ExitPolicy]:
    """The multi-exit student of ``student.exits`` and its policy, checked before training."""
    if objective.needs_features:
        raise ValueError("student=multi_exit trains each exit with the run's objective on logits; an objective with feature "
                         "terms is not supported with early exits: use a logit objective (distill=kd, dkd, none, ...)")  # fmt: skip
    stages = cfg.get("stages")
    model = MultiExit(student, list(stages) if stages is not None else None, num_classes, input_shape,
                      list(cfg.loss_weights) if cfg.get("loss_weights") is not None else None, cfg.get("distill_from", "teacher"))  # fmt: skip
    if model.distill_from == "final" and not objective.needs_teacher_logits:
        raise ValueError("student.exits.distill_from=final distils the early exits from the final one through the run's objective, "
                         "which reads no teacher logits here (distill=none): use distill=kd (or another logit objective)")  # fmt: skip
    return model, ExitPolicy(cfg.get("criterion", "max_softmax"), cfg.get("max_drop", 0.01), cfg.get("thresholds", 21))


@torch.no_grad()
def exit_logits(model: MultiExit, x: Tensor, batch_size: int = 512) -> list[Tensor]:
    """Every exit's logits over ``x`` (eval mode, on the model's device; returned on the CPU)."""
    was = model.training
    model.eval()
    device = next(model.parameters()).device
    parts = [model.exits(xb.to(device)) for xb in x.split(batch_size)]
    model.train(was)
    return [torch.cat([p[i] for p in parts]).cpu() for i in range(len(model.exit_names))]


def confidence(logits: Tensor, criterion: str) -> Tensor:
    p = logits.float().softmax(-1)
    if criterion == "max_softmax":
        return p.max(-1).values
    entropy = -(p * p.clamp_min(1e-12).log()).sum(-1)
    return 1 - entropy / math.log(logits.shape[-1])


def leave(logits: list[Tensor], threshold: float, criterion: str) -> Tensor:
    """The exit each input leaves at (index into the exits; the final takes what no other does)."""
    n = logits[0].shape[0]
    chosen = torch.full((n,), len(logits) - 1, dtype=torch.long)
    undecided = torch.ones(n, dtype=torch.bool)
    for i, z in enumerate(logits[:-1]):
        passes = undecided & (confidence(z, criterion) > threshold)
        chosen[passes] = i
        undecided &= ~passes
    return chosen


def evaluate(logits: list[Tensor], y: Tensor, macs: list[int], threshold: float, criterion: str) -> dict[str, float | list[float]]:
    """Accuracy, average MACs per input and the share leaving at each exit, at ``threshold``."""
    where = leave(logits, threshold, criterion)
    predicted = torch.stack([z.argmax(-1) for z in logits])[where, torch.arange(len(y))]
    share = torch.bincount(where, minlength=len(logits)).float() / len(y)
    return {"acc": float((predicted == y).float().mean()), "macs": float((share * torch.tensor(macs, dtype=torch.float)).sum()),
            "share": share.tolist()}  # fmt: skip


def report(model: MultiExit, policy: ExitPolicy, data, run_dir: Path) -> tuple[dict[str, float], list[Path]]:
    """The threshold sweep on validation, the chosen threshold on test: metrics, ``exits.csv``
    (every threshold) and ``exits.png`` (accuracy against average MACs)."""
    macs = model.exit_macs()
    val, test = exit_logits(model, data.val.x), exit_logits(model, data.test.x)
    rows = [(t, evaluate(val, data.val.y, macs, t, policy.criterion), evaluate(test, data.test.y, macs, t, policy.criterion))
            for t in policy.grid]  # fmt: skip
    final_val = rows[-1][1]["acc"]  # at t = 1 every input reaches the final exit
    within = [r for r in rows if r[1]["acc"] >= final_val - policy.max_drop - 1e-9]
    chosen = min(within, key=lambda r: (r[1]["macs"], -r[1]["acc"]))
    t, v, s = chosen
    metrics = {keys.key(keys.EXIT, "threshold"): t, keys.key(keys.EXIT, "val_acc"): v["acc"], keys.key(keys.EXIT, "test_acc"): s["acc"],
               keys.key(keys.EXIT, "macs_avg"): s["macs"], keys.key(keys.EXIT, "macs_ratio"): macs[-1] / s["macs"],
               keys.key(keys.EXIT, "final_val_acc"): final_val, keys.key(keys.EXIT, "max_drop"): policy.max_drop}  # fmt: skip
    for i, name in enumerate(model.exit_names):
        alone = float((test[i].argmax(-1) == data.test.y).float().mean())
        metrics |= {keys.key(keys.EXIT, f"{name}/test_acc"): alone, keys.key(keys.EXIT, f"{name}/macs"): float(macs[i]),
                    keys.key(keys.EXIT, f"{name}/share"): s["share"][i], keys.key(keys.EXIT, f"{name}/weight"): model.loss_weights[i]}  # fmt: skip
    table = run_dir / "exits.csv"
    run_dir.mkdir(parents=True, exist_ok=True)
    with table.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["threshold", "val_acc", "val_macs", "test_acc", "test_macs", *(f"share_{n}" for n in model.exit_names), "chosen"])
        for r in rows:
            writer.writerow([f"{r[0]:.4g}", r[1]["acc"], r[1]["macs"], r[2]["acc"], r[2]["macs"], *r[2]["share"], r is chosen])
    return metrics, [table, _plot(run_dir / "exits.png", rows, chosen, model, macs, test, data.test.y, policy)]


def _plot(path: Path, rows, chosen, model: MultiExit, macs: list[int], test: list[Tensor], y: Tensor, policy: ExitPolicy) -> Path:
    fig, ax = new_figure((6.4, 4.4))
    ax.plot([r[1]["macs"] for r in rows], [r[1]["acc"] for r in rows], ".-", color="C0", label="validation (threshold sweep)")
    ax.plot([r[2]["macs"] for r in rows], [r[2]["acc"] for r in rows], ".-", color="C1", label="test")
    alone = [float((z.argmax(-1) == y).float().mean()) for z in test]
    ax.scatter(macs, alone, marker="s", color="0.4", label="each exit alone (test)", zorder=3)
    for name, m, a in zip(model.exit_names, macs, alone):
        ax.annotate(name, (m, a), textcoords="offset points", xytext=(4, -10), fontsize=8)
    ax.scatter([chosen[2]["macs"]], [chosen[2]["acc"]], s=90, facecolors="none", edgecolors="C3", linewidths=2, zorder=4,
               label=f"chosen: threshold {chosen[0]:.2g} (within {policy.max_drop:.1%} on validation)")  # fmt: skip
    ax.set_xlabel("average MACs per input")
    ax.set_ylabel("accuracy")
    ax.set_title(f"early exits ({policy.criterion})", fontsize=10)
    return save_figure(fig, ax, path)
