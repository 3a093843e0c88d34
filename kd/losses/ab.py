"""Activation boundaries: Heo, Lee, Yun & Choi (AAAI 2019), "Knowledge Transfer via
Distillation of Activation Boundaries Formed by Hidden Neurons".

AB transfers where the teacher's neurons switch on: a connector maps the student's pre-ReLU
response to the teacher's channels, and a hinge-like loss pushes each of its values past a margin
on the side the teacher's pre-ReLU response lies (active or not). It is an initialisation: the
student trains on it alone, then on the classification objective without it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kd.losses.feature_maps import as_map, conv_bn_connector, map_shape, pool_to
from kd.losses.protocol import BindContext, Term, TermInputs


def ab_loss(source: Tensor, target: Tensor, margin: float = 1.0) -> Tensor:
    """The paper's alternative (differentiable) activation-transfer loss with margin ``mu``.

    ``sum_i [ rho(t_i) * max(0, mu - s_i)^2 + (1 - rho(t_i)) * max(0, mu + s_i)^2 ]`` per sample,
    ``rho(t) = 1[t > 0]``, averaged over the batch: where the teacher neuron is active the
    student's connected response must exceed ``+mu``, where it is not, lie below ``-mu``. The
    authors' ``criterion_alternative_L2`` writes the same as ``(s + mu)^2 1[s > -mu, t <= 0] +
    (s - mu)^2 1[s <= mu, t > 0]``, summed, divided by the batch size. Its minimum, 0, is reached
    where every ``|s_i| >= mu`` on the teacher's side of the boundary (``s = t`` gives 0 only
    where ``|t| >= mu``).

    Args:
        source: ``(B, ...)`` connected student pre-ReLU response ``r(S(I))``.
        target: ``(B, ...)`` teacher pre-ReLU response ``T(I)``, same shape; detached.
        margin: ``mu >= 0`` (the paper: 1).

    Returns:
        Scalar tensor.
    """
    if source.shape != target.shape or source.dim() < 2:
        raise ValueError(f"ab: the connected student response {tuple(source.shape)} and the teacher's "
                         f"{tuple(target.shape)} must have one shape (B, ...)")  # fmt: skip
    active = target.detach() > 0
    per_unit = torch.where(active, F.relu(margin - source).pow(2), F.relu(margin + source).pow(2))
    # (B, ...) -> (B, N) -> (B,) -> ()
    return per_unit.flatten(1).sum(1).mean()


def connector(in_channels: int, out_channels: int) -> nn.Module:
    """The authors' connector: 1x1 convolution without bias + batch norm, initialised as their
    code (conv ``N(0, sqrt(2 / out_channels))``, BN weight 1, bias 0); identity where the channel
    counts are equal (theirs and RepDistiller's). On a ``(D, 1, 1)`` vector: linear + batch norm."""
    return nn.Identity() if in_channels == out_channels else conv_bn_connector(in_channels, out_channels)


class AB(Term):
    """Activation-boundary distillation over pre-ReLU layer pairs, each with its own connector.

    Pair ``i`` of ``n`` (shallow to deep) is weighted ``depth_decay ** (n - 1 - i)`` times its
    pair weight: the authors halve the weight of each shallower layer (1/4, 1/2, 1 for three).
    Vectors are ``(D, 1, 1)`` maps; where spatial sizes differ the larger map is average-pooled
    to the smaller (not in the authors' code, whose layers match in size).

    Stages (RepDistiller ``--init_epochs 30``; the authors' ``Distillation`` loop): for
    ``init_epochs`` the student (with the connectors) trains on AB alone; afterwards AB is
    dropped (``keep_after_pretrain = False``) and the student trains on CE (+ KD) from that
    initialisation. ``init_epochs: 0`` keeps AB in the loss from the first step instead.

    Args:
        weight: multiplies the sum; the authors' ``loss / 1000 * 3`` is ``0.003`` with
            ``ab_loss``'s batch mean (RepDistiller's ``-b`` is not applied in its init stage).
        pairs: pre-ReLU layer pairs; ``None``: the models' stages before their ReLU.
        margin: ``mu >= 0`` of ``ab_loss`` (the paper: 1).
        init_epochs: epochs of the AB-only initialisation stage.
        depth_decay: factor per layer towards the input (authors: 0.5; 1: equal weights).
    """

    name = "ab"
    default_layers = "stages"
    pre_activation = True

    def __init__(self, weight: float = 0.003, pairs: Sequence[Mapping[str, object]] | None = None,
                 margin: float = 1.0, init_epochs: int = 30, depth_decay: float = 0.5) -> None:  # fmt: skip
        super().__init__(weight, pairs)
        key = f"distill.terms.{self.name}"
        if isinstance(margin, bool) or not isinstance(margin, (int, float)) or not math.isfinite(margin) or margin < 0:
            raise ValueError(f"{key}.margin must be a finite number >= 0, got {margin!r}")
        if isinstance(init_epochs, bool) or not isinstance(init_epochs, int) or init_epochs < 0:
            raise ValueError(f"{key}.init_epochs must be an int >= 0, got {init_epochs!r}")
        if isinstance(depth_decay, bool) or not isinstance(depth_decay, (int, float)) \
                or not math.isfinite(depth_decay) or depth_decay <= 0:  # fmt: skip
            raise ValueError(f"{key}.depth_decay must be a finite number > 0, got {depth_decay!r}")
        self.margin, self.init_epochs, self.depth_decay = float(margin), init_epochs, float(depth_decay)
        self.pretrain_epochs = init_epochs
        self.keep_after_pretrain = False  # the initialisation has done its work
        self.connectors = nn.ModuleDict()
        self._sizes: list[tuple[int, int]] = []

    def bind(self, context: BindContext) -> None:
        self.connectors, self._sizes = nn.ModuleDict(), []
        for i, pair in enumerate(self.feature_pairs()):
            s = map_shape(context.student_shapes[pair.student], pair.student, "student", self.name)
            t = map_shape(context.teacher_shapes[pair.teacher], pair.teacher, "teacher", self.name)
            self._sizes.append((min(s[1], t[1]), min(s[2], t[2])))
            self.connectors[str(i)] = connector(s[0], t[0])

    def forward(self, inputs: TermInputs) -> Tensor:
        pairs = self.feature_pairs()
        losses = []
        for i, pair in enumerate(pairs):
            s = self.connectors[str(i)](pool_to(as_map(inputs.student[pair.student]), self._sizes[i]))
            t = pool_to(as_map(inputs.teacher[pair.teacher].detach()), self._sizes[i])
            decay = self.depth_decay ** (len(pairs) - 1 - i)
            losses.append(decay * pair.weight * ab_loss(s, t, self.margin))
        return torch.stack(losses).sum()
