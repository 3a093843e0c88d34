"""DIST: Huang et al. (NeurIPS 2022), "Knowledge Distillation from A Stronger Teacher".

Instead of matching the teacher's probabilities exactly (KL), DIST asks the student to keep
their *relations*: the Pearson correlation between student and teacher predictions, per sample
across the classes (inter-class relation) and per class across the batch (intra-class relation).
A correlation ignores scale and shift, so a student need not reach a strong teacher's confidence.
"""

from __future__ import annotations

import math

from torch import Tensor

from kd.losses.protocol import Term, TermInputs


def pearson_correlation(a: Tensor, b: Tensor, eps: float = 1e-8) -> Tensor:
    """Row-wise Pearson correlation: cosine similarity of the mean-centred rows.

    ``rho(u, v) = <u - mean(u), v - mean(v)> / (||u - mean(u)|| * ||v - mean(v)|| + eps)``; the
    ``eps`` is the authors' (``1e-8``, added to the product of the norms), so a constant row
    has correlation 0 rather than NaN.

    Args:
        a, b: ``(N, D)``.

    Returns:
        ``(N,)`` correlations in ``[-1, 1]``.
    """
    a = a - a.mean(dim=1, keepdim=True)  # (N, D) - (N, 1)
    b = b - b.mean(dim=1, keepdim=True)
    return (a * b).sum(dim=1) / (a.norm(dim=1) * b.norm(dim=1) + eps)  # (N, D) -> (N,)


def dist_loss(student_logits: Tensor, teacher_logits: Tensor, beta: float = 1.0, gamma: float = 1.0,
              temperature: float = 1.0) -> Tensor:  # fmt: skip
    """DIST (Huang et al. 2022), the inter- and intra-class relation losses: ``beta * tau^2 * L_inter + gamma * tau^2 * L_intra``.

    With ``Y = softmax(Z / tau)`` (rows: the ``B`` samples, columns: the ``K`` classes) and the
    Pearson distance ``d_p(u, v) = 1 - rho_p(u, v)``:

    * inter-class relation: ``L_inter = 1/B * sum_i d_p(Y^s_{i,:}, Y^t_{i,:})`` (each sample's
      prediction across the classes);
    * intra-class relation: ``L_intra = 1/K * sum_j d_p(Y^s_{:,j}, Y^t_{:,j})`` (each class's
      probabilities across the batch).

    Each ``d_p`` lies in ``[0, 2]``; the minimum, 0, is reached when every row and every column
    of the student's ``Y`` is a positive affine map of the teacher's, e.g. ``Z^s = Z^t`` (up to
    the ``eps`` of ``pearson_correlation``). The ``tau^2`` factor is the authors' code's
    (hunto/image_classification_sota ``lib/models/losses/dist_kd.py``, which DIST_KD runs:
    ``dist_t4``, ``tau = 4``, for CIFAR-100; ``dist``, ``tau = 1``, for ImageNet, where the factor is 1).

    Args:
        student_logits: ``(B, K)`` student scores.
        teacher_logits: ``(B, K)`` teacher scores; detached here.
        beta: weight of the inter-class term.
        gamma: weight of the intra-class term.
        temperature: ``tau > 0``.

    Returns:
        Scalar tensor.
    """
    if student_logits.shape != teacher_logits.shape or student_logits.dim() != 2:
        raise ValueError(f"dist: student and teacher logits must both be (B, K); got {tuple(student_logits.shape)} "
                         f"and {tuple(teacher_logits.shape)}")  # fmt: skip
    y_s = (student_logits / temperature).softmax(dim=1)  # (B, K)
    y_t = (teacher_logits.detach() / temperature).softmax(dim=1)
    inter = 1.0 - pearson_correlation(y_s, y_t).mean()  # rows: samples
    intra = 1.0 - pearson_correlation(y_s.t(), y_t.t()).mean()  # (B, K) -> (K, B): rows are classes
    return temperature**2 * (beta * inter + gamma * intra)


def _check(key: str, value: object, *, positive: bool = False) -> float:
    ok = not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)
    if not ok or (value <= 0 if positive else value < 0):
        bound = "> 0" if positive else ">= 0"
        raise ValueError(f"distill.terms.dist.{key} must be a finite number {bound}, got {value!r}")
    return float(value)


class DIST(Term):
    """DIST as a term: ``dist_loss(z_s, z_t, beta, gamma, temperature)``.

    The intra-class relation is a correlation across the batch, so the loss depends on the
    batch composition (and needs ``B >= 2`` to be informative).

    Args:
        weight: the term's weight in the objective (the authors' ``kd_loss_weight``: 2 on CIFAR-100).
        beta: weight of the inter-class relation, ``>= 0``.
        gamma: weight of the intra-class relation, ``>= 0``.
        temperature: ``tau > 0`` (4 on CIFAR-100, 1 on ImageNet in the authors' runs).
    """

    name = "dist"
    needs_teacher_logits = True
    logit_based = True

    def __init__(self, weight: float = 2.0, beta: float = 1.0, gamma: float = 1.0, temperature: float = 4.0) -> None:
        super().__init__(weight)
        self.beta = _check("beta", beta)
        self.gamma = _check("gamma", gamma)
        self.temperature = _check("temperature", temperature, positive=True)

    def forward(self, inputs: TermInputs) -> Tensor:
        assert inputs.teacher_logits is not None
        return dist_loss(inputs.student_logits, inputs.teacher_logits, self.beta, self.gamma, self.temperature)

    def describe(self) -> str:
        return f"dist b={self.beta:g} g={self.gamma:g} T={self.temperature:g}"
