"""CTKD: Li et al. (AAAI 2023), "Curriculum Temperature for Knowledge Distillation".

The KD temperature is learned, adversarially: the student minimises the KD loss while the
temperature *maximises* it, through a gradient reversal layer (Ganin & Lempitsky, 2015) whose
weight ``lambda`` grows from ``lambda_min`` to ``lambda_max`` along a cosine curriculum, so the
task gets harder as the student gets better.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kd.losses.protocol import Term, TermInputs


class GradientReversal(torch.autograd.Function):
    """Identity forward; backward multiplies the incoming gradient by ``-lambda``.

    ``lambda`` is a tensor (a buffer of the term), so a new value each epoch reaches a compiled
    step without recompiling it.
    """

    @staticmethod
    def forward(ctx, x: Tensor, lambda_: Tensor) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(lambda_)
        return x.clone()

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:  # type: ignore[override]
        (lambda_,) = ctx.saved_tensors
        return -lambda_.to(grad.dtype) * grad, None


def curriculum_lambda(epoch: int, lambda_min: float, lambda_max: float, curriculum_epochs: int) -> float:
    """The cosine curriculum of the reversal weight (Li et al. 2023):

    ``lambda_n = lambda_min + (lambda_max - lambda_min) * (1 + cos((1 + min(n, E) / E) * pi)) / 2``

    for epoch ``n`` and ``E = curriculum_epochs``: ``lambda_min`` at ``n = 0``, ``lambda_max`` from
    ``n = E`` on. ``E = 0`` gives ``lambda_max`` at once. The authors' code (``CosineDecay`` in
    ``train_student.py``) computes the same curve with the sign folded in (from 0 to -1, the layer
    multiplying by ``lambda``) and counts epochs from 1.
    """
    if curriculum_epochs == 0:
        return float(lambda_max)
    progress = min(max(epoch, 0), curriculum_epochs) / curriculum_epochs
    return lambda_min + (lambda_max - lambda_min) * 0.5 * (1.0 + math.cos((1.0 + progress) * math.pi))


def ctkd_loss(student_logits: Tensor, teacher_logits: Tensor, temperature: Tensor) -> Tensor:
    """KD at a learnable temperature: ``tau^2 * KL(softmax(z_t / tau) || softmax(z_s / tau))``,
    averaged over the batch (Hinton's loss with the paper's ``tau``; gradients reach ``tau``).

    Args:
        student_logits: ``(B, K)``.
        teacher_logits: ``(B, K)``; detached here.
        temperature: a scalar tensor (global temperature) or ``(B, 1)`` (one per sample).

    Returns:
        Scalar tensor.
    """
    if student_logits.shape != teacher_logits.shape or student_logits.dim() != 2:
        raise ValueError(f"ctkd: student and teacher logits must both be (B, K); got {tuple(student_logits.shape)} "
                         f"and {tuple(teacher_logits.shape)}")  # fmt: skip
    log_p_s = F.log_softmax(student_logits / temperature, dim=1)
    log_p_t = F.log_softmax(teacher_logits.detach() / temperature, dim=1)
    kl = (log_p_t.exp() * (log_p_t - log_p_s)).sum(dim=1, keepdim=True)  # (B, K) -> (B, 1)
    return (kl * temperature**2).mean()


def _check(key: str, value: object, *, positive: bool = False) -> float:
    ok = not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)
    if not ok or (value <= 0 if positive else value < 0):
        bound = "> 0" if positive else ">= 0"
        raise ValueError(f"distill.terms.ctkd.{key} must be a finite number {bound}, got {value!r}")
    return float(value)


class CTKD(Term):
    """Curriculum temperature KD with one global, learnable temperature.

    ``tau = t_min + t_span * sigmoid(GRL_lambda(theta))``, ``theta`` an ``nn.Parameter`` of the
    term (in the optimiser and the Lightning checkpoint, never in the student), initialised to
    ``theta_init``. The authors' ``Global_T`` and ``train_distill``: ``theta`` starts at 1, and
    ``tau = t_start + t_end * sigmoid(theta)`` with their ``--t_start 1 --t_end 20``, so ``tau``
    lies in ``(1, 21)`` and starts at ``1 + 20 * sigmoid(1) = 15.6``; ``t_min`` and ``t_span``
    are those two numbers renamed for what they are. The KD loss is the plain ``ctkd_loss``;
    the reversal flips only the gradient that reaches ``theta``.

    ``lambda`` follows ``curriculum_lambda`` and lives in a (non-persistent) buffer refreshed by
    ``start_epoch``, which receives Lightning's epoch counted from 0; the authors count from 1,
    so epoch ``e`` here uses their ``e + 1`` (their first epoch already has a small ``lambda``).

    The paper's instance-wise variant (a temperature per sample from a small network on both
    models' logits) is not in the authors' public code and not offered here.

    Logged: ``train/ctkd_temperature`` (the current ``tau``, detached).

    Args:
        weight: the term's weight (the authors' ``-a 0.9`` for KD+CTKD on CIFAR-100, CE ``-r 0.1``).
        t_min: lower bound of ``tau`` (> 0).
        t_span: width of its range (>= 0; ``tau < t_min + t_span``).
        theta_init: initial value of the unbounded parameter ``theta``.
        lambda_min: reversal weight at the start of the curriculum (>= 0).
        lambda_max: reversal weight at its end (>= 0).
        curriculum_epochs: epochs of the cosine curriculum (an integer >= 0; 0: ``lambda_max`` throughout).
    """

    name = "ctkd"
    needs_teacher_logits = True
    logit_based = True

    def __init__(self, weight: float = 0.9, t_min: float = 1.0, t_span: float = 20.0, theta_init: float = 1.0,
                 lambda_min: float = 0.0, lambda_max: float = 1.0, curriculum_epochs: int = 10) -> None:  # fmt: skip
        super().__init__(weight)
        self.t_min = _check("t_min", t_min, positive=True)
        self.t_span = _check("t_span", t_span)
        if isinstance(theta_init, bool) or not isinstance(theta_init, (int, float)) or not math.isfinite(theta_init):
            raise ValueError(f"distill.terms.ctkd.theta_init must be a finite number, got {theta_init!r}")
        self.lambda_min = _check("lambda_min", lambda_min)
        self.lambda_max = _check("lambda_max", lambda_max)
        if isinstance(curriculum_epochs, bool) or not isinstance(curriculum_epochs, int) or curriculum_epochs < 0:
            raise ValueError(f"distill.terms.ctkd.curriculum_epochs must be an integer >= 0, got {curriculum_epochs!r}")
        self.curriculum_epochs = curriculum_epochs
        self.theta = nn.Parameter(torch.tensor(float(theta_init)))
        self.register_buffer("lambda_", torch.tensor(self._lambda_at(0)), persistent=False)

    def _lambda_at(self, epoch: int) -> float:
        return curriculum_lambda(epoch + 1, self.lambda_min, self.lambda_max, self.curriculum_epochs)

    def start_epoch(self, epoch: int, max_epochs: int) -> None:
        super().start_epoch(epoch, max_epochs)
        self.lambda_.fill_(self._lambda_at(epoch))

    def temperature(self) -> Tensor:
        """The current ``tau`` (a scalar tensor, with the gradient of ``theta``, not reversed)."""
        return self.t_min + self.t_span * torch.sigmoid(self.theta)

    def forward(self, inputs: TermInputs) -> Tensor:
        assert inputs.teacher_logits is not None
        theta = GradientReversal.apply(self.theta, self.lambda_)
        tau = self.t_min + self.t_span * torch.sigmoid(theta)
        return ctkd_loss(inputs.student_logits, inputs.teacher_logits, tau)

    def extra_terms(self) -> dict[str, Tensor]:
        return {"ctkd_temperature": self.temperature().detach()}

    def describe(self) -> str:
        return (f"ctkd tau in ({self.t_min:g}, {self.t_min + self.t_span:g}) "
                f"lambda {self.lambda_min:g}->{self.lambda_max:g} over {self.curriculum_epochs} epochs")  # fmt: skip
