"""Relational knowledge distillation: Park, Kim, Lu & Cho (CVPR 2019), "Relational Knowledge
Distillation". The student matches the teacher's *relations* between the samples of a batch (the
distances of pairs, the angles of triplets), not the features themselves, so the two embeddings
may differ in width."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from kd.losses.protocol import BindContext, Term, TermInputs

_EPS = 1e-12  # squared distances are clamped here before the square root (the authors' `pdist`)


def _flat_pair(student: Tensor, teacher: Tensor, method: str) -> tuple[Tensor, Tensor]:
    if student.dim() < 2 or teacher.dim() < 2 or student.shape[0] != teacher.shape[0]:
        raise ValueError(f"{method} needs (B, ...) features of one batch for student and teacher, "
                         f"got {tuple(student.shape)} and {tuple(teacher.shape)}")  # fmt: skip
    # (B, ...) -> (B, D)
    return student.flatten(start_dim=1), teacher.detach().flatten(start_dim=1)


def pairwise_distances(x: Tensor) -> Tensor:
    """Euclidean distances between the rows of ``x``: ``(B, D) -> (B, B)``, zero on the diagonal.

    The squared distance is clamped at ``1e-12`` before the square root (finite gradients where
    two samples coincide) and the diagonal is masked to exactly zero, as the authors' ``pdist``.
    """
    x = x - x.mean(dim=0, keepdim=True)  # distances are translation-invariant; centring keeps the Gram form precise
    sq = x.pow(2).sum(dim=1)  # (B, D) -> (B,)
    d2 = (sq[:, None] + sq[None, :] - 2.0 * x @ x.t()).clamp(min=_EPS)  # (B, B)
    off_diagonal = 1.0 - torch.eye(x.shape[0], device=x.device, dtype=x.dtype)
    return d2.sqrt() * off_diagonal


def _normalised_distances(x: Tensor) -> Tensor:
    """``psi_D``: distances divided by their mean ``mu`` over the ``B (B - 1)`` distinct pairs."""
    d = pairwise_distances(x)  # (B, B)
    b = x.shape[0]
    mu = d.sum() / (b * (b - 1))
    return d / mu.clamp(min=_EPS)


def rkd_distance_loss(student: Tensor, teacher: Tensor) -> Tensor:
    """Distance-wise RKD loss (Park et al., §3, "distance-wise distillation loss").

    ``psi_D(t_i, t_j) = ||t_i - t_j||_2 / mu`` with ``mu`` the mean distance over the distinct
    pairs of the batch; ``L_D = mean_{i,j} huber(psi_D(s_i, s_j), psi_D(t_i, t_j))`` with the
    Huber loss of ``delta = 1`` (``F.smooth_l1_loss``). Invariant to a scaling (and a translation
    or rotation) of either embedding.

    Where the authors' code (github.com/lenscloth/RKD, copied by RepDistiller) differs from the
    paper, this follows the code, for which its weight 25 is tuned: the Huber loss is averaged over
    all ``B^2`` entries, the zero diagonal included (the paper sums over the pairs). ``mu``: the
    code averages the distances ``> 0``; here the ``B (B - 1)`` off-diagonal ones (a boolean
    selection would synchronise with the host); the two differ only when distinct samples coincide.

    Args:
        student: ``(B, ...)`` student features, flattened to ``(B, D_s)``.
        teacher: ``(B, ...)`` teacher features, flattened to ``(B, D_t)``; detached.

    Returns:
        Scalar tensor; zero for a batch of fewer than 2 samples (no pair).
    """
    s, t = _flat_pair(student, teacher, "RKD")
    if s.shape[0] < 2:
        return s.sum() * 0.0
    return F.smooth_l1_loss(_normalised_distances(s), _normalised_distances(t))


def _angles(x: Tensor) -> Tensor:
    """``psi_A``: ``(B, D) -> (B, B, B)``, entry ``[i, j, k]`` the cosine of the angle at ``x_i``
    between ``x_j`` and ``x_k``; zero where ``j == i`` or ``k == i`` (no direction)."""
    # (B, 1, D) - (1, B, D) ... entry [i, j] = x_j - x_i -> (B, B, D)
    e = F.normalize(x[None, :, :] - x[:, None, :], p=2.0, dim=2)
    # (B, B, D) @ (B, D, B) -> (B, B, B)
    return torch.bmm(e, e.transpose(1, 2))


def rkd_angle_loss(student: Tensor, teacher: Tensor) -> Tensor:
    """Angle-wise RKD loss (Park et al., §3, "angle-wise distillation loss").

    ``psi_A(t_i, t_j, t_k) = <e_ij, e_kj>`` with ``e_ij = (t_i - t_j) / ||t_i - t_j||_2``, the
    cosine of the angle the triplet makes at ``t_j``;
    ``L_A = mean huber(psi_A(s_i, s_j, s_k), psi_A(t_i, t_j, t_k))`` (``delta = 1``).
    Invariant to a scaling, translation or rotation of either embedding.

    As in the authors' code: all ``B^3`` index triplets are averaged, the degenerate ones
    included (they give the same value, 0 or 1, for student and teacher, so they only dilute the
    mean; the paper sums over the triplets of distinct samples). Memory: a ``(B, B, D)`` tensor of
    differences, as in the code.

    Args:
        student: ``(B, ...)`` student features, flattened to ``(B, D_s)``.
        teacher: ``(B, ...)`` teacher features, flattened to ``(B, D_t)``; detached.

    Returns:
        Scalar tensor; zero for a batch of fewer than 3 samples (no triplet).
    """
    s, t = _flat_pair(student, teacher, "RKD")
    if s.shape[0] < 3:
        return s.sum() * 0.0
    return F.smooth_l1_loss(_angles(s), _angles(t))


def rkd_loss(student: Tensor, teacher: Tensor, distance_weight: float = 25.0, angle_weight: float = 50.0,
             normalize: bool = False) -> Tensor:  # fmt: skip
    """``L_RKD = distance_weight * L_D + angle_weight * L_A`` (Park et al., §3, the weighted sum of
    both losses), with the authors' classification weights 25 and 50 (lenscloth/RKD
    ``run_distill_classification.py``; RepDistiller's ``RKDLoss``). A zero weight skips its part.

    Args:
        student: ``(B, ...)`` student features, flattened to ``(B, D_s)``.
        teacher: ``(B, ...)`` teacher features (any width), flattened; detached.
        distance_weight: ``lambda_D >= 0``.
        angle_weight: ``lambda_A >= 0``.
        normalize: L2-normalise each flattened embedding first, as the authors' CIFAR
            classification script does; RepDistiller (whose CIFAR-100 numbers the config follows)
            does not.
    """
    student, teacher = _flat_pair(student, teacher, "RKD")
    if normalize:
        student, teacher = F.normalize(student, p=2.0, dim=1), F.normalize(teacher, p=2.0, dim=1)
    total = student.new_zeros(())
    if distance_weight:
        total = total + distance_weight * rkd_distance_loss(student, teacher)
    if angle_weight:
        total = total + angle_weight * rkd_angle_loss(student, teacher)
    return total


def _check_weight(key: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise ValueError(f"distill.terms.rkd.{key} must be a finite number >= 0, got {value!r}")
    return float(value)


class RKD(Term):
    """Relational KD (Park et al., CVPR 2019) over layer pairs: ``sum_pairs w_pair * L_RKD``.

    Args:
        weight: the term's weight (RepDistiller's CIFAR-100 ``-b 1``).
        pairs: layer pairs; ``None``: the classifier inputs of both models (``embedding``).
            Maps are flattened; student and teacher widths may differ.
        distance_weight: ``lambda_D`` of the distance loss (paper: 25).
        angle_weight: ``lambda_A`` of the angle loss (paper: 50).
        normalize: L2-normalise the embeddings first (the authors' CIFAR script; not RepDistiller).
    """

    name = "rkd"
    default_layers = "embedding"

    def __init__(self, weight: float = 1.0, pairs: Sequence[Mapping[str, object]] | None = None,
                 distance_weight: float = 25.0, angle_weight: float = 50.0, normalize: bool = False) -> None:  # fmt: skip
        super().__init__(weight, pairs)
        if not isinstance(normalize, bool):
            raise ValueError(f"distill.terms.rkd.normalize must be true or false, got {normalize!r}")
        self.normalize = normalize
        self.distance_weight = _check_weight("distance_weight", distance_weight)
        self.angle_weight = _check_weight("angle_weight", angle_weight)
        if self.distance_weight == 0 and self.angle_weight == 0:
            raise ValueError("distill.terms.rkd: distance_weight and angle_weight are both 0; set one > 0")

    def bind(self, context: BindContext) -> None:
        for pair in self.feature_pairs():
            for role, spec, shapes in (("student", pair.student, context.student_shapes),
                                       ("teacher", pair.teacher, context.teacher_shapes)):  # fmt: skip
                if len(shapes[spec]) < 1:
                    raise ValueError(f"rkd: the {role} layer {spec} gives a scalar per sample {tuple(shapes[spec])}; "
                                     "RKD needs feature vectors or maps")  # fmt: skip

    def forward(self, inputs: TermInputs) -> Tensor:
        losses = []
        for pair in self.feature_pairs():
            s, t = inputs.student[pair.student], inputs.teacher[pair.teacher]
            with torch.autocast(device_type=s.device.type, enabled=False):  # distances from a Gram matrix: float32
                loss = rkd_loss(s.float(), t.float(), self.distance_weight, self.angle_weight, self.normalize)
            losses.append(pair.weight * loss)
        return torch.stack(losses).sum()
