"""Feature-distillation terms: attention transfer and FitNets hints over layer pairs.

A term is a ``kd.losses.protocol.Term`` (a hint term owns trainable regressors) configured with
a list of layer pairs ``{student: <spec>, teacher: <spec>, weight: <float>}``, or none: then the
pairs come from both models' declared feature stages. The hooks of both models are derived from
that one list. The term's ``weight`` (one YAML key) multiplies its sum over pairs in the
objective; the logged ``train/loss_<name>`` is the unweighted sum.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor, nn

from kd.models.features import LayerPair
from kd.losses.attention import attention_transfer_loss
from kd.losses.hint import HintRegressor, hint_loss
from kd.losses.protocol import BindContext, Term, TermInputs

log = logging.getLogger(__name__)


class FeatureTerm(Term):
    """Base of the feature terms: named, weighted, over layer pairs (``None``: the models' stages)."""

    name = "feature"
    default_layers = "stages"

    def __init__(self, pairs: Sequence[Mapping[str, object]] | None, weight: float) -> None:
        super().__init__(weight, pairs)

    @property
    def pairs(self) -> list[LayerPair]:
        return self.feature_pairs()


class AttentionTransfer(FeatureTerm):
    """Attention transfer (Zagoruyko & Komodakis, ICLR 2017), summed over layer pairs.

    Args:
        pairs: layer pairs; both layers must output ``(B, C, H, W)`` maps (channels may differ;
            different spatial sizes are pooled to the smaller, reported once in the log).
        weight: multiplies the sum; the authors' ``beta / 2`` with ``beta = 1000`` is 500 for
            ``mode: code``.
        p: exponent of the activation-based attention map (2 in the paper's experiments).
        mode: ``code`` (default: the authors' public code, with which the published numbers were
            produced: mean over channels, squared difference averaged over elements) or ``paper``
            (sum over channels, L2 distance of the normalised maps). See ``attention_transfer_loss``.
    """

    name = "at"

    def __init__(self, pairs: Sequence[Mapping[str, object]] | None = None, weight: float = 500.0, p: float = 2.0,
                 mode: str = "code") -> None:  # fmt: skip
        super().__init__(pairs, weight)
        self.p, self.mode = p, mode
        attention_transfer_loss(torch.ones(1, 1, 1, 1), torch.ones(1, 1, 1, 1), p, mode)  # validates p and mode

    def bind(self, context: BindContext) -> None:
        for pair in self.pairs:
            s, t = context.student_shapes[pair.student], context.teacher_shapes[pair.teacher]
            if len(s) != len(t) or len(s) not in (1, 3):
                raise ValueError(
                    f"at: attention needs two (C, H, W) feature maps or two (D,) vectors; student {pair.student} "
                    f"gives {tuple(s)}, teacher {pair.teacher} gives {tuple(t)}. Pick layers of the same kind."
                )
            if s[1:] != t[1:] or (len(s) == 1 and s != t):
                log.info("at: %s %s vs %s %s differ in size; both maps are pooled to the smaller",
                         pair.student, tuple(s), pair.teacher, tuple(t))  # fmt: skip

    def forward(self, inputs: TermInputs) -> Tensor:
        losses = [
            pair.weight * attention_transfer_loss(_as_map(inputs.student[pair.student]),
                                                  _as_map(inputs.teacher[pair.teacher]), self.p, self.mode)
            for pair in self.pairs
        ]  # fmt: skip
        return torch.stack(losses).sum()


def _as_map(features: Tensor) -> Tensor:
    """Maps as they are; a vector layer ``(B, D)`` as one channel over ``D`` positions,
    ``(B, 1, D, 1)``: its attention is over units (kd's extension for MLPs; the paper has maps)."""
    return features[:, None, :, None] if features.dim() == 2 else features


class Hints(FeatureTerm):
    """FitNets hints (Romero et al., ICLR 2015): a regressor maps each guided student layer to the
    teacher's hint layer, trained with the student and dropped from the final student.

    Args:
        pairs: (guided student layer, teacher hint layer) pairs.
        weight: multiplies the sum (CRD's code base uses 100 with ``mode: mean``).
        mode: ``paper`` (``1/2 ||u_h - r(v_g)||^2`` per sample) or ``mean`` (element-wise MSE, as
            in the CRD/RepDistiller code base).
        kernel_size: 1 or 3, of the convolutional regressor (maps); vectors use a linear one.
        stage: ``one`` (CE [+ KD] + weight * hint from the first step, as the CRD code base
            trains FitNets) or ``two`` (the paper: for ``stage1_epochs`` the hint loss alone
            trains the student up to the guided layer and the regressor; then the whole student
            trains on the rest of the objective, the hint dropped; set ``alpha_end`` on the
            objective to anneal the soft-target weight over stage 2). Both stages are one fit and
            one MLflow run; ``train/stage`` marks the boundary.
        stage1_epochs: length of stage 1 when ``stage: two``.
    """

    name = "hint"
    default_layers = "middle"

    def __init__(
        self,
        pairs: Sequence[Mapping[str, object]] | None = None,
        weight: float = 1.0,
        mode: str = "mean",
        kernel_size: int = 1,
        stage: str = "one",
        stage1_epochs: int = 0,
    ) -> None:
        super().__init__(pairs, weight)
        if mode not in ("paper", "mean"):
            raise ValueError(f"hint: mode must be 'paper' or 'mean', got {mode!r}")
        if kernel_size not in (1, 3):
            raise ValueError(f"hint: kernel_size must be 1 or 3, got {kernel_size}")
        if stage not in ("one", "two"):
            raise ValueError(f"hint: stage must be 'one' or 'two', got {stage!r}")
        if stage == "two" and stage1_epochs < 1:
            raise ValueError(f"hint: stage two needs stage1_epochs >= 1, got {stage1_epochs}")
        self.mode, self.kernel_size = mode, kernel_size
        self.stage, self.stage1_epochs = stage, stage1_epochs
        self.pretrain_epochs = stage1_epochs if stage == "two" else 0  # stage 1: the hint alone
        self.keep_after_pretrain = stage != "two"  # stage 2: the hint has done its work
        self.regressors = nn.ModuleDict()

    def bind(self, context: BindContext) -> None:
        for i, pair in enumerate(self.pairs):
            shape_s, shape_t = tuple(context.student_shapes[pair.student]), tuple(context.teacher_shapes[pair.teacher])
            self.regressors[str(i)] = HintRegressor(shape_s, shape_t, self.kernel_size)

    def forward(self, inputs: TermInputs) -> Tensor:
        student, teacher = inputs.student, inputs.teacher
        losses = [
            pair.weight * hint_loss(self.regressors[str(i)](student[pair.student]), teacher[pair.teacher], self.mode)
            for i, pair in enumerate(self.pairs)
        ]
        return torch.stack(losses).sum()
