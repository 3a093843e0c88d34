"""Variational information distillation: Ahn, Hu, Damianou, Lawrence & Dai (CVPR 2019),
"Variational Information Distillation for Knowledge Transfer".

VID maximises a variational lower bound of the mutual information ``I(t; s)`` between a teacher
layer ``t`` and a student layer ``s``: a Gaussian ``q(t | s)`` whose mean a small regressor
predicts from ``s`` and whose variance is learned per channel. Minimising ``-log q(t | s)``
trains the student, the regressor and the variances together.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kd.losses.feature_maps import as_map, map_shape, pool_to
from kd.losses.protocol import BindContext, Term, TermInputs


def vid_loss(mean: Tensor, target: Tensor, variance: Tensor) -> Tensor:
    """Gaussian negative log-likelihood of the teacher's feature given the student's prediction.

    The paper's observation model (a Gaussian with a heteroscedastic mean and a homoscedastic,
    per-channel variance): ``-log q(t | s) = sum_{c,h,w} [ log sigma_c + (t_chw - mu_chw(s))^2 /
    (2 sigma_c^2) ] + const``, with ``sigma_c^2 = softplus(alpha_c) + eps``.

    Averaging: as the authors' code (RepDistiller's ``VIDLoss``, "code from author"), the mean
    over batch, channels and positions of ``0.5 * ((mu - t)^2 / sigma^2 + log sigma^2)``, i.e.
    the paper's per-sample sum divided by ``C*H*W``, the constant ``0.5 log 2 pi`` dropped. Its
    minimum is not zero: ``0.5 log sigma^2`` remains (negative for ``sigma^2 < 1``).

    Args:
        mean: ``(B, C, H, W)`` or ``(B, C)`` predicted mean ``mu(s)``.
        target: teacher feature ``t``, the same shape; treated as a constant (detached).
        variance: ``(C,)`` positive per-channel variances ``sigma_c^2``.

    Returns:
        Scalar tensor.
    """
    if mean.shape != target.shape or mean.dim() < 2:
        raise ValueError(f"vid: predicted mean {tuple(mean.shape)} and teacher feature {tuple(target.shape)} "
                         "must have one shape (B, C, ...)")  # fmt: skip
    if variance.shape != (mean.shape[1],):
        raise ValueError(f"vid: variance must be (C,) = ({mean.shape[1]},), got {tuple(variance.shape)}")
    # (C,) -> (1, C, 1, ...) to broadcast over the batch and positions
    var = variance.view(1, -1, *([1] * (mean.dim() - 2)))
    nll = 0.5 * ((mean - target.detach()).pow(2) / var + var.log())
    return nll.mean()


def inverse_softplus(value: float) -> float:
    """``alpha`` with ``softplus(alpha) = value`` (``value > 0``): ``log(exp(value) - 1)``, stably."""
    return value + math.log(-math.expm1(-value))


def vid_regressor(in_channels: int, mid_channels: int, out_channels: int) -> nn.Sequential:
    """The mean predictor ``mu(s)``: three 1x1 convolutions without bias, ReLU between (the
    authors' / RepDistiller's ``VIDLoss.regressor``). On a ``(D, 1, 1)`` vector it is a 3-layer MLP."""
    return nn.Sequential(
        nn.Conv2d(in_channels, mid_channels, 1, bias=False),
        nn.ReLU(),
        nn.Conv2d(mid_channels, mid_channels, 1, bias=False),
        nn.ReLU(),
        nn.Conv2d(mid_channels, out_channels, 1, bias=False),
    )


class VID(Term):
    """VID over layer pairs: per pair a regressor and learned per-channel variances of its own.

    Maps and vectors: a vector layer ``(B, D)`` is the map ``(B, D, 1, 1)`` (the 1x1 regressor
    is then linear, with ReLUs); where the spatial sizes differ, the larger map is
    average-pooled to the smaller (RepDistiller), so a map pairs with a vector by global pooling.

    Args:
        weight: multiplies the sum over pairs (RepDistiller CIFAR-100: ``-b 1``).
        pairs: layer pairs; ``None``: the models' feature stages (RepDistiller: the three stages).
        mid_channels: hidden width of the regressor; ``None``: the teacher layer's channels
            (RepDistiller ``VIDLoss(s, t, t)``).
        init_variance: ``sigma^2`` at initialisation (the authors' ``init_pred_var = 5``).
        eps: the variance floor ``eps`` in ``softplus(alpha) + eps`` (authors: ``1e-5``).
    """

    name = "vid"
    default_layers = "stages"

    def __init__(self, weight: float = 1.0, pairs: Sequence[Mapping[str, object]] | None = None,
                 mid_channels: int | None = None, init_variance: float = 5.0, eps: float = 1e-5) -> None:  # fmt: skip
        super().__init__(weight, pairs)
        key = f"distill.terms.{self.name}"
        if mid_channels is not None and (isinstance(mid_channels, bool) or not isinstance(mid_channels, int)
                                         or mid_channels < 1):  # fmt: skip
            raise ValueError(f"{key}.mid_channels must be a positive int or null, got {mid_channels!r}")
        for field, value in (("eps", eps), ("init_variance", init_variance)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
                raise ValueError(f"{key}.{field} must be a finite number > 0, got {value!r}")
        if not init_variance > eps:
            raise ValueError(f"{key}.init_variance must exceed eps ({eps!r}), got {init_variance!r}")
        self.mid_channels, self.init_variance, self.eps = mid_channels, float(init_variance), float(eps)
        self.regressors = nn.ModuleDict()
        self.alphas = nn.ParameterDict()
        self._sizes: list[tuple[int, int]] = []

    def bind(self, context: BindContext) -> None:
        self.regressors, self.alphas, self._sizes = nn.ModuleDict(), nn.ParameterDict(), []
        alpha0 = inverse_softplus(self.init_variance - self.eps)
        for i, pair in enumerate(self.feature_pairs()):
            s = map_shape(context.student_shapes[pair.student], pair.student, "student", self.name)
            t = map_shape(context.teacher_shapes[pair.teacher], pair.teacher, "teacher", self.name)
            self._sizes.append((min(s[1], t[1]), min(s[2], t[2])))
            self.regressors[str(i)] = vid_regressor(s[0], self.mid_channels or t[0], t[0])
            self.alphas[str(i)] = nn.Parameter(torch.full((t[0],), alpha0))

    def variance(self, i: int) -> Tensor:
        """``(C,)`` variances ``softplus(alpha) + eps`` of pair ``i``."""
        return F.softplus(self.alphas[str(i)]) + self.eps

    def forward(self, inputs: TermInputs) -> Tensor:
        losses = []
        for i, pair in enumerate(self.feature_pairs()):
            s = pool_to(as_map(inputs.student[pair.student]), self._sizes[i])
            t = pool_to(as_map(inputs.teacher[pair.teacher].detach()), self._sizes[i])
            losses.append(pair.weight * vid_loss(self.regressors[str(i)](s), t, self.variance(i)))
        return torch.stack(losses).sum()
