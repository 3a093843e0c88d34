"""Decoupled knowledge distillation: Zhao et al. (CVPR 2022), "Decoupled Knowledge Distillation".

Classical KD splits, per sample, into a binary target-vs-rest term and a term over the
non-target classes alone, coupled by the teacher's non-target mass (the paper's reformulation):

``KD = TCKD + (1 - p_t^T) * NCKD``

DKD drops that coupling and weighs the two freely (its Algorithm 1): ``DKD = alpha * TCKD + beta * NCKD``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from kd.losses.protocol import Term, TermInputs


def _non_target(logits: Tensor, targets: Tensor) -> Tensor:
    """The ``K - 1`` non-target logits of each row, in class order: ``(B, K) -> (B, K - 1)``.

    A gather with indices that skip the target (``j`` for ``j < y``, ``j + 1`` from ``y`` on)
    keeps the shape static: no boolean indexing, so no host synchronisation.
    """
    b, k = logits.shape
    cols = torch.arange(k - 1, device=logits.device).expand(b, k - 1)  # (K-1,) -> (B, K-1)
    index = cols + (cols >= targets.unsqueeze(1)).long()  # (B, K-1): skips column y
    return logits.gather(1, index)


def dkd_parts(student_logits: Tensor, teacher_logits: Tensor, targets: Tensor,
              temperature: float) -> tuple[Tensor, Tensor]:  # fmt: skip
    """TCKD and NCKD of Zhao et al. (2022), each times ``T^2`` and averaged over the batch.

    With ``p = softmax(z / T)`` and ``t`` the label of a sample:

    * ``b = [p_t, 1 - p_t]``, the binary target-vs-rest probabilities (the paper's ``b``);
      ``TCKD = KL(b^T || b^S)``;
    * ``p_hat = softmax(z_{\\t} / T)`` over the ``K - 1`` non-target classes (the paper's
      ``p_hat_i = p_i / (1 - p_t)``); ``NCKD = KL(p_hat^T || p_hat^S)``.

    Both are computed from log-sum-exps of the logits, never ``log`` of a probability, so a
    student that puts ~0 mass on the target gives a finite loss. The authors' code (mdistiller
    ``DKD.py``) builds ``b`` by summing probabilities then taking ``log``, and ``p_hat`` by
    subtracting 1000 from the target logit before the softmax; both equal these in exact
    arithmetic. The ``T^2`` factor is the code's, as in Hinton's KD.

    Args:
        student_logits: ``(B, K)`` student scores, ``K >= 2``.
        teacher_logits: ``(B, K)`` teacher scores; detached here.
        targets: ``(B,)`` int64 labels in ``[0, K)``.
        temperature: ``T > 0``.

    Returns:
        ``(tckd, nckd)``, two scalars.
    """
    if student_logits.shape != teacher_logits.shape or student_logits.dim() != 2:
        raise ValueError(f"dkd: student and teacher logits must both be (B, K); got {tuple(student_logits.shape)} "
                         f"and {tuple(teacher_logits.shape)}")  # fmt: skip
    if student_logits.shape[1] < 2:
        raise ValueError(f"dkd: needs at least 2 classes, got logits of shape {tuple(student_logits.shape)}")
    z_s = student_logits / temperature
    z_t = teacher_logits.detach() / temperature
    y = targets.reshape(-1, 1)  # (B,) -> (B, 1)

    def binary_log_probs(z: Tensor) -> tuple[Tensor, Tensor]:
        rest = _non_target(z, targets)  # (B, K-1)
        log_all = torch.logsumexp(z, dim=1, keepdim=True)  # (B, K) -> (B, 1)
        log_b = torch.cat([z.gather(1, y), torch.logsumexp(rest, dim=1, keepdim=True)], dim=1) - log_all  # (B, 2)
        return log_b, F.log_softmax(rest, dim=1)  # (B, 2), (B, K-1)

    log_b_s, log_hat_s = binary_log_probs(z_s)
    log_b_t, log_hat_t = binary_log_probs(z_t)
    scale = temperature**2
    tckd = F.kl_div(log_b_s, log_b_t, reduction="batchmean", log_target=True) * scale
    nckd = F.kl_div(log_hat_s, log_hat_t, reduction="batchmean", log_target=True) * scale
    return tckd, nckd


def dkd_loss(student_logits: Tensor, teacher_logits: Tensor, targets: Tensor, alpha: float, beta: float,
             temperature: float) -> Tensor:  # fmt: skip
    """``alpha * TCKD + beta * NCKD`` (Zhao et al. 2022, Algorithm 1); see ``dkd_parts`` for the terms.

    ``alpha = 1`` with ``beta = 1 - p_t^T`` per sample would give back Hinton's KD (the reformulation);
    DKD's point is a fixed, larger ``beta`` (8 for ResNet32x4 -> ResNet8x4 on CIFAR-100).
    """
    tckd, nckd = dkd_parts(student_logits, teacher_logits, targets, temperature)
    return alpha * tckd + beta * nckd


def _check(key: str, value: object, *, positive: bool = False) -> float:
    ok = not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)
    if not ok or (value <= 0 if positive else value < 0):
        bound = "> 0" if positive else ">= 0"
        raise ValueError(f"distill.terms.dkd.{key} must be a finite number {bound}, got {value!r}")
    return float(value)


class DKD(Term):
    """Decoupled KD as a term: ``scale(epoch) * (alpha * TCKD + beta * NCKD)``.

    The warm-up is the authors' (mdistiller ``DKD.forward_train``): the loss is multiplied by
    ``min(epoch / warmup, 1)`` where mdistiller counts epochs from 1, so its first epoch already
    has ``1 / warmup``. Here ``start_epoch`` receives Lightning's epoch counted from 0, and
    ``scale()`` is ``min((epoch + 1) / warmup_epochs, 1)``: the same factor in the same epoch of
    the run. ``warmup_epochs = 0`` turns the warm-up off.

    TCKD and NCKD are logged apart, unweighted, as ``train/dkd_tckd`` and ``train/dkd_nckd``
    (the term itself as ``train/loss_<key>``).

    Args:
        weight: the term's weight in the objective (mdistiller has none beyond alpha and beta: 1).
        alpha: weight of TCKD, ``>= 0``.
        beta: weight of NCKD, ``>= 0``.
        temperature: ``T > 0``.
        warmup_epochs: epochs of the linear warm-up, ``>= 0`` (an integer).
    """

    name = "dkd"
    needs_teacher_logits = True
    logit_based = True

    def __init__(self, weight: float = 1.0, alpha: float = 1.0, beta: float = 8.0, temperature: float = 4.0,
                 warmup_epochs: int = 20) -> None:  # fmt: skip
        super().__init__(weight)
        self.alpha = _check("alpha", alpha)
        self.beta = _check("beta", beta)
        self.temperature = _check("temperature", temperature, positive=True)
        if isinstance(warmup_epochs, bool) or not isinstance(warmup_epochs, int) or warmup_epochs < 0:
            raise ValueError(f"distill.terms.dkd.warmup_epochs must be an integer >= 0, got {warmup_epochs!r}")
        self.warmup_epochs = warmup_epochs
        self._parts: tuple[Tensor, Tensor] | None = None

    def scale(self) -> float:
        if self.warmup_epochs == 0:
            return 1.0
        return min((self.epoch + 1) / self.warmup_epochs, 1.0)

    def forward(self, inputs: TermInputs) -> Tensor:
        assert inputs.teacher_logits is not None
        tckd, nckd = dkd_parts(inputs.student_logits, inputs.teacher_logits, inputs.targets, self.temperature)
        self._parts = (tckd.detach(), nckd.detach())
        return self.alpha * tckd + self.beta * nckd

    def extra_terms(self) -> dict[str, Tensor]:
        if self._parts is None:
            return {}
        return {"dkd_tckd": self._parts[0], "dkd_nckd": self._parts[1]}

    def describe(self) -> str:
        return f"dkd a={self.alpha:g} b={self.beta:g} T={self.temperature:g} warmup={self.warmup_epochs}"
