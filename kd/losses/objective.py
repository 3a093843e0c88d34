"""Training objectives: what the `distill/` config group selects.

An objective turns one batch's student logits, labels and (when it needs one) the teacher's
logits into a dict of named loss terms. The key ``"loss"`` is the total that is optimised;
every other key is one term, logged on its own as ``train/<key>``.

The objectives are small validated value objects so that a bad ``alpha`` or ``temperature``
fails when the config is instantiated, before any data is loaded or any teacher is trained.
The maths lives in the pure functions of this package (``soft_target_loss``).
"""

from __future__ import annotations

import math

import torch.nn.functional as F
from torch import Tensor

from kd.losses.soft_target import soft_target_loss


class CrossEntropy:
    """Plain supervised training, no teacher: ``L = CE(y, z_s)``. The ``distill=none`` baseline."""

    needs_teacher = False

    def __call__(
        self, student_logits: Tensor, targets: Tensor, teacher_logits: Tensor | None = None
    ) -> dict[str, Tensor]:
        ce = F.cross_entropy(student_logits, targets)
        return {"loss": ce, "loss_ce": ce}

    def describe(self) -> str:
        return "ce"


class SoftTargetKD:
    """Hinton et al. (2015) knowledge distillation.

    ``L = alpha * T^2 * KL(softmax(z_t/T) || softmax(z_s/T)) + (1 - alpha) * CE(y, z_s)``

    Convention: ``alpha`` is the weight of the *soft* (teacher) term, as in Hinton's paper
    and RepDistiller. torchdistill's ``KDLoss`` uses the opposite reading (its ``alpha``
    weighs the hard-label term); translate with ``alpha_here = 1 - alpha_torchdistill``.

    Args:
        temperature: softmax temperature ``T > 0`` applied to both logits in the soft term.
        alpha: weight of the soft term, in ``[0, 1]``. ``alpha = 0`` is plain cross-entropy.
    """

    needs_teacher = True

    def __init__(self, temperature: float = 4.0, alpha: float = 0.9) -> None:
        if not isinstance(temperature, (int, float)) or not math.isfinite(temperature) or temperature <= 0:
            raise ValueError(f"distill.temperature must be a finite number > 0, got {temperature!r}")
        if not isinstance(alpha, (int, float)) or not 0.0 <= alpha <= 1.0:
            raise ValueError(
                f"distill.alpha must lie in [0, 1] (the weight of the soft-target term), got {alpha!r}"
            )
        self.temperature = float(temperature)
        self.alpha = float(alpha)

    def __call__(
        self, student_logits: Tensor, targets: Tensor, teacher_logits: Tensor | None = None
    ) -> dict[str, Tensor]:
        if teacher_logits is None:
            raise ValueError("SoftTargetKD needs the teacher's logits")
        ce = F.cross_entropy(student_logits, targets)
        kd = soft_target_loss(student_logits, teacher_logits, self.temperature)
        total = self.alpha * kd + (1.0 - self.alpha) * ce
        return {"loss": total, "loss_kd": kd, "loss_ce": ce}

    def describe(self) -> str:
        return f"kd T={self.temperature:g} a={self.alpha:g}"
