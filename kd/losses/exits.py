"""The training loss of a multi-exit student (``kd.models.exits``): the run's objective on each
exit, weighted, ``L = sum_i w_i L_i``. The final exit learns as a plain student does (labels, and
the teacher's logits when the objective reads them); each earlier exit learns the same way, or,
``distill_from="final"``, with the final exit's logits, detached, standing for the teacher's
(gradients of an early exit's term stop at those targets and never reach the final exit)."""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor


def exit_terms(objective, names: Sequence[str], weights: Sequence[float], distill_from: str, exits: Sequence[Tensor],
               y: Tensor, teacher_logits: Tensor | None = None, index: Tensor | None = None) -> dict[str, Tensor]:  # fmt: skip
    """``loss`` (the weighted sum) and ``exit/<name>/loss`` for each exit's own term."""
    final = exits[-1]
    terms: dict[str, Tensor] = {}
    total: Tensor | float = 0.0
    for i, (name, weight, logits) in enumerate(zip(names, weights, exits)):
        target = final.detach() if distill_from == "final" and i < len(exits) - 1 else teacher_logits
        if objective.needs_teacher_logits:
            own = objective(logits, y, target, index=index)
        else:
            own = objective(logits, y)
        terms[f"exit/{name}/loss"] = own["loss"]
        total = total + weight * own["loss"]
    terms["loss"] = total  # type: ignore[assignment]
    return terms
