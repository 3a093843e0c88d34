"""Knowledge review: Chen, Liu, Zhao & Jia (CVPR 2021), "Distilling Knowledge via Knowledge
Review", as the authors' CIFAR-100 code (github.com/dvlab-research/ReviewKD, ``CIFAR-100/``) and
mdistiller's ``ReviewKD`` (the same modules) implement it.

Each student stage is fused with the fused result of all deeper stages (top-down, the paper's
residual review): an attention-based fusion (ABF) module maps the stage to a mid width, mixes it
with the deeper result under two attention maps computed from both, and a 3x3 conv maps the mix to
the teacher's channels. Each fused output is compared with the teacher's feature of the same level
by the hierarchical context loss (HCL), the levels summed.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kd.models.features import FeatureInfo, LayerPair, resolve_pairs
from kd.losses.feature_maps import as_map
from kd.losses.protocol import BindContext, Term, TermInputs

log = logging.getLogger(__name__)

LEVELS = (4, 2, 1)  # the HCL's pooled sizes, as the authors


def hcl_loss(student: Tensor, teacher: Tensor) -> Tensor:
    """Hierarchical context loss of one level (Chen et al., Sec. 3, Fig. 3b), as the authors' ``hcl``.

    ``L = (MSE(F_s, F_t) + sum_j w_j MSE(P_l(F_s), P_l(F_t))) / (1 + sum_j w_j)``, over the pooled
    sizes ``l`` in ``(4, 2, 1)`` smaller than the map's height ``H`` (``P_l``: adaptive average
    pooling to ``l x l``), with weights halving over the levels used: ``w = 1/2, 1/4, 1/8``
    (``H >= 8``), ``1/2, 1/4`` (``H = 4``: levels 2, 1), ``1/2`` (``H = 2``), none (``H = 1``: the
    MSE alone). MSE is the mean over all elements. The paper names the pyramid of levels and the L2
    distance; the weights and their normalisation are the code's, followed here.

    Args:
        student: ``(B, C, H, W)`` fused student feature (``H`` is read, as the authors, for the levels).
        teacher: ``(B, C, H, W)`` teacher feature; detached.

    Returns:
        A scalar tensor; zero when the two are equal.
    """
    if student.shape != teacher.shape or student.dim() != 4:
        raise ValueError(f"hcl needs two (B, C, H, W) maps of one shape, got {tuple(student.shape)} "
                         f"and {tuple(teacher.shape)}")  # fmt: skip
    teacher = teacher.detach()
    loss, weight, total = F.mse_loss(student, teacher), 1.0, 1.0
    for level in LEVELS:
        if level >= student.shape[2]:
            continue
        weight /= 2.0
        pooled_s = F.adaptive_avg_pool2d(student, (level, level))  # (B, C, H, W) -> (B, C, l, l)
        pooled_t = F.adaptive_avg_pool2d(teacher, (level, level))
        loss = loss + weight * F.mse_loss(pooled_s, pooled_t)
        total += weight
    return loss / total


def resize(x: Tensor, size: tuple[int, int]) -> Tensor:
    """``x`` at spatial ``size`` by adaptive average pooling (the identity at its own size).

    The authors resize with nearest interpolation, always upward by whole factors (the deeper
    result to the shallower stage; a ShuffleNet student's stage to a larger teacher map); for whole
    factors upward this is exactly nearest (each value repeated), and downward (which the authors
    never need: a student map larger than the teacher's) it averages instead of dropping positions.
    """
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.adaptive_avg_pool2d(x, size)  # (B, C, h, w) -> (B, C, *size)


class ABF(nn.Module):
    """Attention-based fusion (Chen et al., Fig. 3a; the authors' ``ABF``).

    ``x = BN(conv1x1(F_s))`` (``C_s -> mid``); with a deeper result ``y`` (resized to ``x``'s size):
    ``[a, b] = sigmoid(conv1x1([x, y]))`` (two maps, ``2 mid -> 2``), ``x = a * x + b * y``; then
    ``x`` is resized to the teacher's size and the output is ``BN(conv3x3(x))`` (``mid -> C_t``).
    Returns the output and ``x`` (the residual the next shallower stage fuses). Convolutions
    without bias, Kaiming-uniform (``a = 1``) initialised, as the authors.

    Args:
        in_channels: ``C_s`` of the student stage.
        mid_channels: the fusion width.
        out_channels: ``C_t`` of the teacher feature.
        fuse: whether a deeper result is fused (all but the deepest level).
    """

    def __init__(self, in_channels: int, mid_channels: int, out_channels: int, fuse: bool) -> None:
        super().__init__()
        self.conv1 = nn.Sequential(nn.Conv2d(in_channels, mid_channels, 1, bias=False), nn.BatchNorm2d(mid_channels))
        self.conv2 = nn.Sequential(nn.Conv2d(mid_channels, out_channels, 3, padding=1, bias=False),
                                   nn.BatchNorm2d(out_channels))  # fmt: skip
        self.att_conv = nn.Sequential(nn.Conv2d(2 * mid_channels, 2, 1), nn.Sigmoid()) if fuse else None
        nn.init.kaiming_uniform_(self.conv1[0].weight, a=1)
        nn.init.kaiming_uniform_(self.conv2[0].weight, a=1)

    def forward(self, x: Tensor, residual: Tensor | None, out_size: tuple[int, int]) -> tuple[Tensor, Tensor]:
        x = self.conv1(x)  # (B, C_s, H_s, W_s) -> (B, mid, H_s, W_s)
        if self.att_conv is not None:
            if residual is None:
                raise ValueError("ABF: a fusing level needs the deeper level's result")
            residual = resize(residual, (x.shape[2], x.shape[3]))  # (B, mid, h, w) -> (B, mid, H_s, W_s)
            attention = self.att_conv(torch.cat([x, residual], dim=1))  # (B, 2 mid, H_s, W_s) -> (B, 2, H_s, W_s)
            x = x * attention[:, 0:1] + residual * attention[:, 1:2]
        x = resize(x, out_size)  # (B, mid, H_s, W_s) -> (B, mid, H_t, W_t)
        return self.conv2(x), x  # (B, C_t, H_t, W_t), (B, mid, H_t, W_t)


def review_fuse(student: Sequence[Tensor], abfs: Sequence[ABF], sizes: Sequence[tuple[int, int]]) -> list[Tensor]:
    """The review path: the deepest level through its ABF alone, then each shallower level fused
    with the deeper result (the authors' top-down loop). Inputs and outputs shallow to deep.

    Args:
        student: per level, ``(B, C_s, H_s, W_s)`` student maps.
        abfs: per level, its ABF (the deepest one without fusion).
        sizes: per level, the teacher's ``(H_t, W_t)``.

    Returns:
        Per level, ``(B, C_t, H_t, W_t)``.
    """
    outputs: list[Tensor] = []
    residual: Tensor | None = None
    for features, abf, size in zip(reversed(student), reversed(abfs), reversed(sizes)):
        out, residual = abf(features, residual, size)
        outputs.insert(0, out)
    return outputs


class ReviewKD(Term):
    """ReviewKD as a term: ``sum_levels w_pair * hcl_loss(fused student, teacher)``, its weight warmed
    up linearly over the first ``warmup_epochs`` (``scale()``).

    Args:
        weight: the term's weight (the authors' ``--kd-loss-weight``; see ``conf/distill/reviewkd.yaml``).
        pairs: layer pairs, shallow to deep (the last, deepest one is not fused); ``None``: the
            models' stages, then their classifier inputs (``stages+embedding``: the authors' stages
            and pooled feature). Vectors ``(B, D)`` are ``(B, D, 1, 1)`` maps.
        warmup_epochs: ``scale() = min(epoch / warmup_epochs, 1)`` with the 0-based epoch, as the
            authors' ``train.py`` (0 in the first epoch; mdistiller counts from 1, so 1/20 there);
            0: no warm-up.
        mid_channels: the ABFs' fusion width; ``None``: the authors' ``min(512, C_s)`` of the
            deepest student level.
        teacher_pre_activation: with ``pairs: null``, read the teacher's stages before their last
            ReLU (``preact=True``, as both codes; the student's after it; the pooled feature is the
            same either way). False: post-activation for both.
    """

    name = "reviewkd"
    default_layers = "stages+embedding"

    def __init__(self, weight: float = 1.0, pairs: Sequence[Mapping[str, object]] | None = None,
                 warmup_epochs: int = 20, mid_channels: int | None = None,
                 teacher_pre_activation: bool = True) -> None:  # fmt: skip
        super().__init__(weight, pairs)
        if isinstance(warmup_epochs, bool) or not isinstance(warmup_epochs, int) or warmup_epochs < 0:
            raise ValueError(f"distill.terms.reviewkd.warmup_epochs must be an integer >= 0, got {warmup_epochs!r}")
        if mid_channels is not None and (isinstance(mid_channels, bool) or not isinstance(mid_channels, int)
                                         or mid_channels < 1):  # fmt: skip
            raise ValueError("distill.terms.reviewkd.mid_channels must be an integer >= 1 or null, "
                             f"got {mid_channels!r}")  # fmt: skip
        if not isinstance(teacher_pre_activation, bool):
            raise ValueError("distill.terms.reviewkd.teacher_pre_activation must be true or false, "
                             f"got {teacher_pre_activation!r}")  # fmt: skip
        self.warmup_epochs, self.mid_channels = warmup_epochs, mid_channels
        self.teacher_pre_activation = teacher_pre_activation
        self.abfs = nn.ModuleList()
        self._sizes: list[tuple[int, int]] = []

    def resolve(self, student: FeatureInfo | None, teacher: FeatureInfo | None) -> None:
        """The default pairs, with the teacher's stages pre-activation when ``teacher_pre_activation``."""
        if self._pairs is not None:
            return
        post = resolve_pairs(self.default_layers, student, teacher, False, self.name)
        if not self.teacher_pre_activation:
            self._pairs = post
            return
        pre = resolve_pairs(self.default_layers, student, teacher, True, self.name)
        self._pairs = [LayerPair(p.student, q.teacher, p.weight) for p, q in zip(post, pre)]

    def bind(self, context: BindContext) -> None:
        pairs = self.feature_pairs()
        shapes = []
        for pair in pairs:
            s, t = tuple(context.student_shapes[pair.student]), tuple(context.teacher_shapes[pair.teacher])
            if len(s) not in (1, 3) or len(t) not in (1, 3):
                raise ValueError(f"reviewkd needs (C, H, W) maps or (D,) vectors; student {pair.student} gives "
                                 f"{s}, teacher {pair.teacher} gives {t}")  # fmt: skip
            s, t = (s + (1, 1) if len(s) == 1 else s), (t + (1, 1) if len(t) == 1 else t)
            if s[1:] != t[1:]:
                log.info("reviewkd: %s %s and %s %s differ in size; the fused student is resized to the teacher's",
                         pair.student, s, pair.teacher, t)  # fmt: skip
            shapes.append((s, t))
        mid = self.mid_channels if self.mid_channels is not None else min(512, shapes[-1][0][0])
        self.abfs = nn.ModuleList(ABF(s[0], mid, t[0], fuse=i < len(shapes) - 1) for i, (s, t) in enumerate(shapes))
        self._sizes = [(t[1], t[2]) for _, t in shapes]

    def forward(self, inputs: TermInputs) -> Tensor:
        if not self._sizes:
            raise RuntimeError("reviewkd: bind() the term to the feature shapes before calling it")
        pairs = self.feature_pairs()
        fused = review_fuse([as_map(inputs.student[p.student]) for p in pairs], list(self.abfs), self._sizes)
        losses = [pair.weight * hcl_loss(out, as_map(inputs.teacher[pair.teacher]))
                  for pair, out in zip(pairs, fused)]  # fmt: skip
        return torch.stack(losses).sum()

    def scale(self) -> float:
        return 1.0 if self.warmup_epochs == 0 else min(self.epoch / self.warmup_epochs, 1.0)
