"""The training loss of a slimmable student (``kd.models.slimmable``), one step over the sandwich
of widths (widest, narrowest, random ones between; Yu & Huang 2019):

- the widest width learns as a plain student does: the run's objective (labels, and the
  teacher's logits when the objective reads them);
- each narrower width learns from the widest width's predictions (in-place distillation: the
  cross-entropy of its softmax against the widest's, detached, so no gradient reaches the
  widest through its targets), or, ``inplace_distill=False``, from the run's objective; with
  ``narrow_objective=True`` the run's objective is added to its in-place term (the external
  teacher's KD term beside the widest's).

The step's loss is the mean over the widths: their gradients accumulate before one optimiser
step, as in the paper, at the scale of one width's, so a learning rate tuned for the plain
student serves (their sum, four widths at the plain student's rate, diverged here)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from torch import Tensor


def inplace_distillation(logits: Tensor, widest: Tensor) -> Tensor:
    """``-sum_k p_k log q_k`` averaged over the batch: ``p`` the widest's softmax (detached), ``q`` this width's."""
    return -(widest.detach().softmax(-1) * logits.log_softmax(-1)).sum(-1).mean()


def slimmable_terms(objective, forward: Callable[[float], Tensor], widths: Sequence[float], y: Tensor, teacher_logits: Tensor | None,
                    index: Tensor | None, inplace_distill: bool = True, narrow_objective: bool = False) -> tuple[Tensor, dict[str, Tensor]]:  # fmt: skip
    """The widest width's logits and the terms: ``loss`` (the mean) and ``width/<w>/loss`` each;
    ``forward(w)`` runs the student at width ``w`` (``widths[0]`` is the widest)."""

    def own(z: Tensor) -> Tensor:
        return (objective(z, y, teacher_logits, index=index) if objective.needs_teacher_logits else objective(z, y))["loss"]

    widest = forward(widths[0])
    terms = {f"width/{widths[0]:g}/loss": own(widest)}
    for w in widths[1:]:
        z = forward(w)
        loss = inplace_distillation(z, widest) if inplace_distill else own(z)
        if inplace_distill and narrow_objective:
            loss = loss + own(z)
        terms[f"width/{w:g}/loss"] = loss
    terms["loss"] = sum(terms.values()) / len(widths)  # type: ignore[assignment]
    return widest, terms
