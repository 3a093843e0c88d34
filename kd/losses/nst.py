"""Neuron selectivity transfer: Huang & Wang (2017), "Like What You Like: Knowledge Distill via
Neuron Selectivity Transfer". Each channel of a feature map is one sample of a distribution over
spatial positions (what the neuron is selective to); the student's distribution of channels
should match the teacher's, in maximum mean discrepancy."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from kd.losses.protocol import BindContext, Term, TermInputs

log = logging.getLogger(__name__)


def _as_channels(features: Tensor, name: str) -> Tensor:
    """Maps as they are; a vector ``(B, D)`` as ``D`` channels of one position, ``(B, D, 1, 1)``."""
    if features.dim() == 2:
        return features[:, :, None, None]
    if features.dim() != 4:
        raise ValueError(f"NST needs (B, C, H, W) maps or (B, D) vectors; the {name} gives {tuple(features.shape)}")
    return features


def _poly_kernel_mean(a: Tensor, b: Tensor) -> Tensor:
    """``mean_{b, i, j} (a_i . b_j)^2``: the polynomial kernel ``d = 2, c = 0`` between the channels
    ``(B, C_a, N)`` and ``(B, C_b, N)``, averaged over the batch and all channel pairs."""
    return torch.bmm(a, b.transpose(1, 2)).pow(2).mean()  # (B, C_a, N) @ (B, N, C_b) -> (B, C_a, C_b) -> ()


def nst_loss(student: Tensor, teacher: Tensor) -> Tensor:
    """NST loss of one layer pair (Huang & Wang, §3: the squared MMD of the channel distributions
    with the polynomial kernel ``k(x, y) = (x . y + c)^d``, ``d = 2``, ``c = 0``).

    With ``f^k`` the ``k``-th channel flattened over the ``N = H W`` positions and L2-normalised,
    ``MMD^2 = mean_{i,i'} k(f_t^i, f_t^i') + mean_{j,j'} k(f_s^j, f_s^j') - 2 mean_{i,j} k(f_s^j, f_t^i)``
    per sample, ``k(x, y) = (x . y)^2``, averaged over the batch. The paper's objective is
    ``CE + lambda / 2 * MMD^2``; the authors' code (TuSimple/neuron-selectivity-transfer,
    ``mmd_poly``) scales ``MMD^2`` by ``lambda = 50`` without the half and drops the teacher-only
    term, a constant. Here it is kept (as RepDistiller's ``NSTLoss``) so the loss is ``MMD^2 >= 0``,
    zero when the two distributions agree; the gradient is the same.

    Channel counts may differ. Maps of different spatial size: the larger is average-pooled to
    the smaller (``(min H, min W)``), as RepDistiller does.

    A vector ``(B, D)`` is ``D`` channels of one position each: normalised, every unit becomes its
    sign (``+1``, ``-1``, or 0 for an inactive unit), each kernel value is 1 or 0, and ``MMD^2``
    reduces to ``(rho_s - rho_t)^2``, ``rho`` the fraction of non-zero units, with zero gradient:
    NST transfers nothing from vector layers (an MLP's), it only reports that difference. Pair
    maps for NST.

    Args:
        student: ``(B, C_s, H_s, W_s)`` maps or ``(B, D_s)`` vectors.
        teacher: ``(B, C_t, H_t, W_t)`` maps or ``(B, D_t)`` vectors; detached.

    Returns:
        Scalar tensor.
    """
    s, t = _as_channels(student, "student"), _as_channels(teacher.detach(), "teacher")
    if s.shape[0] != t.shape[0]:
        raise ValueError(f"NST: student and teacher batch sizes differ: {tuple(student.shape)} vs {tuple(teacher.shape)}")
    size = (min(s.shape[2], t.shape[2]), min(s.shape[3], t.shape[3]))
    if tuple(s.shape[2:]) != size:
        s = F.adaptive_avg_pool2d(s, size)  # (B, C_s, H_s, W_s) -> (B, C_s, h, w)
    if tuple(t.shape[2:]) != size:
        t = F.adaptive_avg_pool2d(t, size)  # (B, C_t, H_t, W_t) -> (B, C_t, h, w)
    # (B, C, h, w) -> (B, C, h*w), each channel of unit L2 norm
    s = F.normalize(s.flatten(start_dim=2), p=2.0, dim=2)
    t = F.normalize(t.flatten(start_dim=2), p=2.0, dim=2)
    return _poly_kernel_mean(t, t) + _poly_kernel_mean(s, s) - 2.0 * _poly_kernel_mean(s, t)


class NST(Term):
    """Neuron selectivity transfer (Huang & Wang, 2017) over layer pairs: ``sum_pairs w_pair * MMD^2``.

    Args:
        weight: the term's weight (RepDistiller's CIFAR-100 ``-b 50``; the authors' ``lambda = 50``).
        pairs: layer pairs; ``None``: the last feature stage of both models (``last``), as the
            authors' code (the last feature map before pooling). RepDistiller instead sums the
            loss over all three stages of its CIFAR networks (``feat[1:-1]``); name them in
            ``pairs`` for that.
    """

    name = "nst"
    default_layers = "last"

    def __init__(self, weight: float = 1.0, pairs: Sequence[Mapping[str, object]] | None = None) -> None:
        super().__init__(weight, pairs)

    def bind(self, context: BindContext) -> None:
        for pair in self.feature_pairs():
            s, t = context.student_shapes[pair.student], context.teacher_shapes[pair.teacher]
            if len(s) not in (1, 3) or len(t) not in (1, 3):
                raise ValueError(f"nst: needs (C, H, W) maps or (D,) vectors; student {pair.student} gives {tuple(s)}, "
                                 f"teacher {pair.teacher} gives {tuple(t)}")  # fmt: skip
            if len(s) == 1 or len(t) == 1:
                log.warning("nst: %s %s / %s %s: on a vector layer each unit is a channel of one position, so NST "
                            "only compares the fractions of active units and gives no gradient; pair feature maps",
                            pair.student, tuple(s), pair.teacher, tuple(t))  # fmt: skip
            elif s[1:] != t[1:]:
                log.info("nst: %s %s vs %s %s differ in spatial size; the larger map is pooled to the smaller",
                         pair.student, tuple(s), pair.teacher, tuple(t))  # fmt: skip

    def forward(self, inputs: TermInputs) -> Tensor:
        losses = []
        for pair in self.feature_pairs():
            s, t = inputs.student[pair.student], inputs.teacher[pair.teacher]
            with torch.autocast(device_type=s.device.type, enabled=False):  # squared dot products: float32
                losses.append(pair.weight * nst_loss(s.float(), t.float()))
        return torch.stack(losses).sum()
