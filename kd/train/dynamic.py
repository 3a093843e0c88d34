"""The training and validation steps of dynamic students (``docs/dynamic.md``), for the Lightning
modules of ``kd.train.modules``: a multi-exit student trains every exit (``kd.losses.exits``), a
slimmable one the sandwich of widths (``kd.losses.slimmable``) and validates each width."""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor, nn
from torchmetrics import Metric

from kd.losses.exits import exit_terms
from kd.losses.slimmable import slimmable_terms
from kd.models.exits import MultiExit
from kd.models.slimmable import Slimmable


def is_dynamic(model: nn.Module) -> bool:
    return isinstance(model, (MultiExit, Slimmable))


def dynamic_terms(model: nn.Module, objective, x: Tensor, y: Tensor, teacher_logits: Tensor | None,
                  index: Tensor) -> tuple[Tensor, dict[str, Tensor]]:  # fmt: skip
    """The logits the step counts as correct (final exit, widest width) and the loss terms."""
    if isinstance(model, MultiExit):
        exits = model.exits(x)
        return exits[-1], exit_terms(objective, model.exit_names, model.loss_weights, model.distill_from, exits, y, teacher_logits, index)
    assert isinstance(model, Slimmable)

    def at(width: float) -> Tensor:
        model.set_width(width)
        return model(x)

    try:
        return slimmable_terms(objective, at, model.sandwich(model.random_widths), y, teacher_logits, index, model.inplace_distill,
                               model.narrow_objective)  # fmt: skip
    finally:
        model.set_width(model.widths[-1])


def width_metrics(model: nn.Module, make: Callable[[], Metric]) -> list[Metric]:
    """One accuracy per narrower width of a slimmable student (none for another model)."""
    return [make() for _ in model.widths[:-1]] if isinstance(model, Slimmable) else []


def validate_widths(model: nn.Module, metrics: list[Metric], x: Tensor, y: Tensor, log: Callable[[str, Metric], None]) -> None:
    """Each narrower width of a slimmable student on a validation batch (``width/<w>/val_acc``)."""
    if not isinstance(model, Slimmable) or not metrics:
        return
    try:
        for width, metric in zip(model.widths, metrics):
            model.set_width(width)
            metric.update(model(x), y)
            log(f"width/{width:g}/val_acc", metric)
    finally:
        model.set_width(model.widths[-1])
