"""Similarity-preserving knowledge distillation: Tung & Mori (ICCV 2019). The student's
pairwise similarities between the samples of a batch (a ``B x B`` Gram matrix of a layer's
activations) should match the teacher's; the layers may differ in shape."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from kd.losses.protocol import BindContext, Term, TermInputs


def similarity_matrix(features: Tensor) -> Tensor:
    """``G = normalise_rows(Q Q^T)``: ``(B, ...) -> (B, B)`` (Tung & Mori, eqs. 1-3).

    ``Q`` is the layer's activation flattened per sample; each row of the Gram matrix is divided
    by its L2 norm (``F.normalize``, ``eps = 1e-12``: an all-zero row stays zero).
    """
    q = features.flatten(start_dim=1)  # (B, ...) -> (B, N)
    return F.normalize(q @ q.t(), p=2.0, dim=1)  # (B, B), unit rows


def sp_loss(student: Tensor, teacher: Tensor) -> Tensor:
    """Similarity-preserving loss of one layer pair (Tung & Mori, eq. 4):
    ``L_SP = ||G_t - G_s||_F^2 / B^2``.

    The authors' code (verified by the first author, per RepDistiller's ``Similarity``) is the
    paper's formula; nothing differs. Invariant to a scaling of either layer's activations and to
    a permutation of its units (both leave the row-normalised Gram matrix unchanged); the two
    layers may have any shapes with the same batch size.

    Args:
        student: ``(B, ...)`` student activations (maps or vectors).
        teacher: ``(B, ...)`` teacher activations; detached.

    Returns:
        Scalar tensor.
    """
    if student.dim() < 2 or teacher.dim() < 2 or student.shape[0] != teacher.shape[0]:
        raise ValueError(f"SP needs (B, ...) features of one batch for student and teacher, "
                         f"got {tuple(student.shape)} and {tuple(teacher.shape)}")  # fmt: skip
    b = student.shape[0]
    diff = similarity_matrix(teacher.detach()) - similarity_matrix(student)  # (B, B)
    return diff.pow(2).sum() / (b * b)


class SP(Term):
    """Similarity-preserving KD (Tung & Mori, ICCV 2019): ``sum_pairs w_pair * L_SP`` (eq. 5's
    ``gamma`` is the term's weight).

    Args:
        weight: ``gamma`` (RepDistiller's CIFAR-100 ``-b 3000``).
        pairs: layer pairs; ``None``: the last feature stage of both models (``last``), as
            RepDistiller's ``feat[-2]`` (the last stage's post-activation map, before pooling).
    """

    name = "sp"
    default_layers = "last"

    def __init__(self, weight: float = 1.0, pairs: Sequence[Mapping[str, object]] | None = None) -> None:
        super().__init__(weight, pairs)

    def bind(self, context: BindContext) -> None:
        for pair in self.feature_pairs():
            for role, spec, shapes in (("student", pair.student, context.student_shapes),
                                       ("teacher", pair.teacher, context.teacher_shapes)):  # fmt: skip
                if len(shapes[spec]) < 1:
                    raise ValueError(f"sp: the {role} layer {spec} gives a scalar per sample {tuple(shapes[spec])}; "
                                     "SP needs feature maps or vectors")  # fmt: skip

    def forward(self, inputs: TermInputs) -> Tensor:
        losses = []
        for pair in self.feature_pairs():
            s, t = inputs.student[pair.student], inputs.teacher[pair.teacher]
            with torch.autocast(device_type=s.device.type, enabled=False):  # Gram matrices of long rows: float32
                losses.append(pair.weight * sp_loss(s.float(), t.float()))
        return torch.stack(losses).sum()
