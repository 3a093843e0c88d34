"""Overhaul of feature distillation: Heo, Kim, Yun, Park, Kwak & Choi (ICCV 2019), "A
Comprehensive Overhaul of Feature Distillation".

OFD distils pre-ReLU features: a connector (1x1 conv + BN) maps the student's to the teacher's
channels; the teacher's feature passes a *margin ReLU* ``max(x, m_c)``, ``m_c`` the expected value
of its negative responses per channel; and a *partial* L2 distance ignores the student where
both are negative and the student is already below the target (the ReLU would erase that
difference anyway).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor, nn

from kd.losses.feature_maps import as_map, conv_bn_connector, map_shape, pool_to
from kd.losses.protocol import BindContext, Term, TermInputs

CDF_FLOOR = 1e-3  # the authors' threshold on Phi(-mean/std) below which the margin is -3 std


def ofd_margin(mean: Tensor, std: Tensor) -> Tensor:
    """Per-channel margin ``m = E[x | x < 0]`` of ``x ~ N(mean, std^2)`` (the paper's margin of
    the margin ReLU; the authors' ``get_margin_from_BN``, which reads ``mean``/``std`` from the
    teacher's BN bias/``|weight|``).

    ``m = mean - std * phi(mean / std) / Phi(-mean / std)``, with ``phi``/``Phi`` the standard
    normal density/CDF; where ``Phi(-mean/std) <= 0.001`` (almost no negative responses) the
    authors use ``m = -3 std``. Always ``<= 0``.

    Args:
        mean: ``(C,)`` per-channel means.
        std: ``(C,)`` per-channel standard deviations ``>= 0``.

    Returns:
        ``(C,)`` margins.
    """
    std = std.clamp_min(torch.finfo(std.dtype).eps)
    z = mean / std
    tail = torch.special.ndtr(-z)  # Phi(-mean/std): the probability of a negative response
    density = torch.exp(-0.5 * z.pow(2)) / math.sqrt(2.0 * math.pi)
    gaussian = mean - std * density / tail.clamp_min(CDF_FLOOR)
    return torch.where(tail > CDF_FLOOR, gaussian, -3.0 * std)


def ofd_loss(source: Tensor, target: Tensor, margin: Tensor) -> Tensor:
    """Partial L2 between the connected student feature and the margin-ReLU'd teacher feature.

    With ``T = max(t, m_c)`` (margin ReLU, per channel ``c``):
    ``d_p(T, S) = sum_i 0 if S_i <= T_i <= 0 else (T_i - S_i)^2``, per sample, averaged over
    the batch. The authors' ``distillation_loss`` is the sum over the batch; their CIFAR
    training divides it by the batch size and 1000 (``weight: 1e-3`` here).

    Args:
        source: ``(B, C, ...)`` connected student pre-ReLU feature ``r(F_s)``.
        target: ``(B, C, ...)`` teacher pre-ReLU feature ``F_t``; detached.
        margin: ``(C,)`` per-channel margins ``m_c <= 0``.

    Returns:
        Scalar tensor.
    """
    if source.shape != target.shape or source.dim() < 2:
        raise ValueError(f"ofd: the connected student feature {tuple(source.shape)} and the teacher's "
                         f"{tuple(target.shape)} must have one shape (B, C, ...)")  # fmt: skip
    if margin.shape != (source.shape[1],):
        raise ValueError(f"ofd: margin must be (C,) = ({source.shape[1]},), got {tuple(margin.shape)}")
    # (C,) -> (1, C, 1, ...)
    m = margin.detach().view(1, -1, *([1] * (source.dim() - 2)))
    goal = torch.maximum(target.detach(), m)
    counted = (source > goal) | (goal > 0)
    sq = (source - goal).pow(2) * counted
    # (B, C, ...) -> (B, N) -> (B,) -> ()
    return sq.flatten(1).sum(1).mean()


def ofd_connector(in_channels: int, out_channels: int) -> nn.Sequential:
    """The authors' ``build_feature_connector``: 1x1 conv without bias, ``N(0, sqrt(2 / out))``,
    then BN (weight 1, bias 0); used even where the channel counts match."""
    return conv_bn_connector(in_channels, out_channels)


class OFD(Term):
    """OFD over pre-ReLU layer pairs (the stages' pre-activation outputs, the last one being the
    final pre-ReLU feature the authors also distil), each pair with its own connector.

    The margin: the authors read each channel's mean and std from the teacher's BN before the
    ReLU; kd cannot find that BN reliably from a hook spec (and in a residual stage the pre-ReLU
    feature is BN + shortcut, not the BN's output), so it *estimates them from the data*: the
    per-channel mean and second moment of the teacher's pre-ReLU feature over the first
    ``margin_batches`` training batches this term sees, kept in persistent buffers (fixed
    afterwards, restored on resume), and applies ``ofd_margin`` to them at every step.

    Pair ``i`` of ``n`` is weighted ``depth_decay ** (n - 1 - i)`` (authors: ``/ 2 ** (n-i-1)``).
    Vectors are ``(D, 1, 1)`` maps (the connector is then linear + BN); where spatial sizes
    differ the larger map is average-pooled to the smaller (the margin estimated on what the
    loss sees).

    Args:
        weight: multiplies the sum; the authors' CIFAR setting ``loss_distill / batch / 1000``
            is ``1e-3`` (``ofd_loss`` is already a batch mean).
        pairs: pre-ReLU layer pairs; ``None``: the models' stages before their ReLU.
        depth_decay: factor per layer towards the input (authors: 0.5; 1: equal weights).
        margin_batches: batches whose teacher statistics give the margins (``>= 1``).
    """

    name = "ofd"
    default_layers = "stages"
    pre_activation = True

    def __init__(self, weight: float = 1e-3, pairs: Sequence[Mapping[str, object]] | None = None,
                 depth_decay: float = 0.5, margin_batches: int = 10) -> None:  # fmt: skip
        super().__init__(weight, pairs)
        key = f"distill.terms.{self.name}"
        if isinstance(depth_decay, bool) or not isinstance(depth_decay, (int, float)) \
                or not math.isfinite(depth_decay) or depth_decay <= 0:  # fmt: skip
            raise ValueError(f"{key}.depth_decay must be a finite number > 0, got {depth_decay!r}")
        if isinstance(margin_batches, bool) or not isinstance(margin_batches, int) or margin_batches < 1:
            raise ValueError(f"{key}.margin_batches must be an int >= 1, got {margin_batches!r}")
        self.depth_decay, self.margin_batches = float(depth_decay), margin_batches
        self.connectors = nn.ModuleDict()
        self._sizes: list[tuple[int, int]] = []
        self.register_buffer("batches_seen", torch.zeros((), dtype=torch.long), persistent=True)

    def bind(self, context: BindContext) -> None:
        self.connectors, self._sizes = nn.ModuleDict(), []
        for i, pair in enumerate(self.feature_pairs()):
            s = map_shape(context.student_shapes[pair.student], pair.student, "student", self.name)
            t = map_shape(context.teacher_shapes[pair.teacher], pair.teacher, "teacher", self.name)
            self._sizes.append((min(s[1], t[1]), min(s[2], t[2])))
            self.connectors[str(i)] = ofd_connector(s[0], t[0])
            self.register_buffer(f"teacher_mean{i}", torch.zeros(t[0]), persistent=True)
            self.register_buffer(f"teacher_sq{i}", torch.ones(t[0]), persistent=True)
        self.batches_seen.zero_()

    def margin(self, i: int) -> Tensor:
        """``(C,)`` margins of pair ``i`` from the teacher statistics gathered so far."""
        mean, sq = getattr(self, f"teacher_mean{i}"), getattr(self, f"teacher_sq{i}")
        return ofd_margin(mean, (sq - mean.pow(2)).clamp_min(0.0).sqrt())

    @torch.no_grad()
    def _gather(self, teachers: list[Tensor]) -> None:
        """Running per-channel moments over the first ``margin_batches`` batches; no host sync."""
        take = (self.batches_seen < self.margin_batches).to(teachers[0].dtype)  # () 1 or 0
        count = (self.batches_seen + 1).to(teachers[0].dtype)
        for i, t in enumerate(teachers):
            # (B, C, h, w) -> (C, B*h*w)
            flat = t.transpose(0, 1).flatten(1)
            mean, sq = getattr(self, f"teacher_mean{i}"), getattr(self, f"teacher_sq{i}")
            mean.add_(take * (flat.mean(1) - mean) / count)
            sq.add_(take * (flat.pow(2).mean(1) - sq) / count)
        self.batches_seen.add_(1)

    def forward(self, inputs: TermInputs) -> Tensor:
        pairs = self.feature_pairs()
        teachers = [pool_to(as_map(inputs.teacher[p.teacher].detach()), self._sizes[i]) for i, p in enumerate(pairs)]
        self._gather(teachers)
        losses = []
        for i, (pair, t) in enumerate(zip(pairs, teachers)):
            s = self.connectors[str(i)](pool_to(as_map(inputs.student[pair.student]), self._sizes[i]))
            decay = self.depth_decay ** (len(pairs) - 1 - i)
            losses.append(decay * pair.weight * ofd_loss(s, t, self.margin(i)))
        return torch.stack(losses).sum()
