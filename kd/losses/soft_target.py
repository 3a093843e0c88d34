"""Hinton soft-target distillation loss."""

from __future__ import annotations

import math

import torch.nn.functional as F
from torch import Tensor

from kd.losses.protocol import Term, TermInputs


def soft_target_loss(student_logits: Tensor, teacher_logits: Tensor, temperature: float) -> Tensor:
    """Soft-target term of Hinton, Vinyals & Dean (2015), "Distilling the Knowledge in a Neural Network".

    ``T^2 * KL(softmax(z_t / T) || softmax(z_s / T))``, averaged over the batch.

    The ``T^2`` factor keeps the gradient of this term comparable across temperatures: the
    gradient of the soft cross-entropy with respect to a logit scales as ``1/T^2`` for large
    ``T`` (Hinton §2.1), so multiplying by ``T^2`` lets ``alpha`` mean the same thing at
    ``T = 1`` and ``T = 20``.

    The KL divergence (not the soft cross-entropy) is used so that the loss is zero when the
    student matches the teacher; both have the same gradient with respect to the student.

    Args:
        student_logits: ``(B, K)`` raw student scores ``z_s``.
        teacher_logits: ``(B, K)`` raw teacher scores ``z_t``; treated as constants (detached).
        temperature: ``T > 0``.

    Returns:
        Scalar tensor.
    """
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"student and teacher logits differ in shape: {tuple(student_logits.shape)} vs "
            f"{tuple(teacher_logits.shape)}; do they predict the same number of classes?"
        )
    log_p_student = F.log_softmax(student_logits / temperature, dim=-1)
    log_p_teacher = F.log_softmax(teacher_logits.detach() / temperature, dim=-1)
    # kl_div(input=log q, target=log p, log_target=True) = sum p * (log p - log q), per sample
    kl = F.kl_div(log_p_student, log_p_teacher, reduction="batchmean", log_target=True)
    return kl * temperature**2



class SoftTarget(Term):
    """Hinton's soft-target term as a ``Term``: ``soft_target_loss(z_s, z_t, T)``.

    ``distill=kd`` builds it inside ``SoftTargetKD`` (weight ``alpha``); it can also be listed
    as a term of any objective (``KD + CRD``).

    Args:
        temperature: ``T > 0``.
        weight: the term's weight in the objective.
    """

    name = "kd"
    needs_teacher_logits = True
    logit_based = True

    def __init__(self, temperature: float = 4.0, weight: float = 1.0) -> None:
        super().__init__(weight)
        if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not math.isfinite(temperature) \
                or temperature <= 0:  # fmt: skip
            raise ValueError(f"distill.temperature must be a finite number > 0, got {temperature!r}")
        self.temperature = float(temperature)

    def forward(self, inputs: TermInputs) -> Tensor:
        assert inputs.teacher_logits is not None
        return soft_target_loss(inputs.student_logits, inputs.teacher_logits, self.temperature)
