"""Probabilistic knowledge transfer: Passalis & Tefas (ECCV 2018), "Learning Deep
Representations with Probabilistic Knowledge Transfer". The student matches the teacher's
conditional probability distribution of the samples of a batch in feature space, estimated with
a cosine-similarity kernel, so the two feature spaces may differ in width."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from kd.losses.protocol import BindContext, Term, TermInputs

EPS = 1e-7  # the authors' `cosine_similarity_loss(..., eps=0.0000001)`


def pkt_probabilities(features: Tensor, eps: float = EPS) -> Tensor:
    """Conditional probabilities ``p_{j|i}`` of one model's batch: ``(B, D) -> (B, B)``, rows sum to 1.

    ``K(a, b) = (cos(a, b) + 1) / 2`` (the cosine-similarity kernel, in ``[0, 1]``), with
    ``x / (||x|| + eps)`` as the normalisation; ``p_{j|i} = K(x_i, x_j) / sum_k K(x_i, x_k)``.
    """
    unit = features / (features.norm(p=2, dim=1, keepdim=True) + eps)  # (B, D)
    kernel = (unit @ unit.t() + 1.0) / 2.0  # (B, B)
    return kernel / kernel.sum(dim=1, keepdim=True)  # (B, B) -> rows sum to 1


def pkt_loss(student: Tensor, teacher: Tensor, eps: float = EPS) -> Tensor:
    """PKT loss (Passalis & Tefas, §3: conditional probabilities from the cosine-similarity kernel,
    matched by the Kullback-Leibler divergence).

    ``L = mean_{i,j} p^t_{j|i} * log((p^t_{j|i} + eps) / (p^s_{j|i} + eps))``: the KL divergence of
    the student's conditional distributions from the teacher's, computed as the authors' code
    (github.com/passalis/probabilistic_kt ``nn/pkt.py``, copied by RepDistiller) does, for which
    RepDistiller's CIFAR-100 weight 30000 is tuned:

    * the normalisation over ``k`` includes ``k = i`` (each sample's kernel with itself, 1), where
      the paper's probabilities leave the sample itself out;
    * the ``B x B`` terms are averaged (the paper sums them: ``B^2`` times this value);
    * ``eps = 1e-7`` in the norm and inside the logarithm. The code also replaces NaNs after the
      normalisation by 0, which its ``+ eps`` already prevents for finite inputs: not repeated here.

    Args:
        student: ``(B, ...)`` student features, flattened to ``(B, D_s)``.
        teacher: ``(B, ...)`` teacher features, flattened to ``(B, D_t)`` (any width); detached.
        eps: the small constant above (``> 0``).

    Returns:
        Scalar tensor, ``>= 0`` up to ``eps``; zero when the two distributions are equal.
    """
    if student.dim() < 2 or teacher.dim() < 2 or student.shape[0] != teacher.shape[0]:
        raise ValueError(f"PKT needs (B, ...) features of one batch for student and teacher, "
                         f"got {tuple(student.shape)} and {tuple(teacher.shape)}")  # fmt: skip
    # (B, ...) -> (B, D)
    p_s = pkt_probabilities(student.flatten(start_dim=1), eps)
    p_t = pkt_probabilities(teacher.detach().flatten(start_dim=1), eps)
    return (p_t * torch.log((p_t + eps) / (p_s + eps))).mean()


class PKT(Term):
    """Probabilistic knowledge transfer (Passalis & Tefas, ECCV 2018) over layer pairs:
    ``sum_pairs w_pair * pkt_loss``.

    Args:
        weight: the term's weight (RepDistiller's CIFAR-100 ``-b 30000``).
        pairs: layer pairs; ``None``: the classifier inputs of both models (``embedding``, as
            RepDistiller's ``feat[-1]``). Maps are flattened; widths may differ.
        eps: the authors' ``1e-7`` (``> 0``).
    """

    name = "pkt"
    default_layers = "embedding"

    def __init__(self, weight: float = 1.0, pairs: Sequence[Mapping[str, object]] | None = None,
                 eps: float = EPS) -> None:  # fmt: skip
        super().__init__(weight, pairs)
        if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not math.isfinite(eps) or eps <= 0:
            raise ValueError(f"distill.terms.pkt.eps must be a finite number > 0, got {eps!r}")
        self.eps = float(eps)

    def bind(self, context: BindContext) -> None:
        for pair in self.feature_pairs():
            for role, spec, shapes in (("student", pair.student, context.student_shapes),
                                       ("teacher", pair.teacher, context.teacher_shapes)):  # fmt: skip
                if len(shapes[spec]) < 1:
                    raise ValueError(f"pkt: the {role} layer {spec} gives a scalar per sample {tuple(shapes[spec])}; "
                                     "PKT needs feature vectors or maps")  # fmt: skip

    def forward(self, inputs: TermInputs) -> Tensor:
        losses = []
        for pair in self.feature_pairs():
            s, t = inputs.student[pair.student], inputs.teacher[pair.teacher]
            with torch.autocast(device_type=s.device.type, enabled=False):  # eps = 1e-7 and a log: float32
                losses.append(pair.weight * pkt_loss(s.float(), t.float(), self.eps))
        return torch.stack(losses).sum()
