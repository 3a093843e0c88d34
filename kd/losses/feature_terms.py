"""Feature-distillation terms: attention transfer and FitNets hints over named layer pairs.

A term is an ``nn.Module`` (a hint term owns trainable regressors) configured with a list of
layer pairs ``{student: <name>, teacher: <name>, weight: <float>}``; the hooks of both models
are derived from that one list. The term's ``weight`` (one YAML key) multiplies its sum over
pairs in the objective; the logged ``train/loss_<name>`` is the unweighted sum.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from kd.losses.attention import attention_transfer_loss
from kd.losses.hint import HintRegressor, hint_loss

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LayerPair:
    """One matched pair: the student's layer, the teacher's layer, and this pair's weight."""

    student: str
    teacher: str
    weight: float = 1.0


def _pairs(pairs: Sequence[Mapping[str, object]], term: str) -> list[LayerPair]:
    if not pairs:
        raise ValueError(f"{term}: `pairs` is empty; give a list of {{student: <layer>, teacher: <layer>}}")
    out = []
    for pair in pairs:
        unknown = set(pair) - {"student", "teacher", "weight"}
        if unknown or not {"student", "teacher"} <= set(pair):
            raise ValueError(f"{term}: a pair needs keys student, teacher (and optionally weight); got {dict(pair)}")
        out.append(LayerPair(str(pair["student"]), str(pair["teacher"]), float(pair.get("weight", 1.0))))
    return out


class FeatureTerm(nn.Module):
    """Base of the feature terms: named, weighted, over layer pairs."""

    name = "feature"  # for messages; the objective logs a term under its config key

    def __init__(self, pairs: Sequence[Mapping[str, object]], weight: float) -> None:
        super().__init__()
        if weight < 0:
            raise ValueError(f"{self.name}: weight must be >= 0, got {weight}")
        self.pairs = _pairs(pairs, self.name)
        self.weight = float(weight)

    def bind(self, student_shapes: dict[str, torch.Size], teacher_shapes: dict[str, torch.Size]) -> None:
        """Check the captured shapes (batch dimension removed) and build what depends on them."""

    def forward(self, student: dict[str, Tensor], teacher: dict[str, Tensor]) -> Tensor:
        raise NotImplementedError


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

    def __init__(self, pairs: Sequence[Mapping[str, object]], weight: float = 500.0, p: float = 2.0, mode: str = "code") -> None:
        super().__init__(pairs, weight)
        self.p, self.mode = p, mode
        attention_transfer_loss(torch.ones(1, 1, 1, 1), torch.ones(1, 1, 1, 1), p, mode)  # validates p and mode

    def bind(self, student_shapes: dict[str, torch.Size], teacher_shapes: dict[str, torch.Size]) -> None:
        for pair in self.pairs:
            s, t = student_shapes[pair.student], teacher_shapes[pair.teacher]
            if len(s) != 3 or len(t) != 3:
                raise ValueError(
                    f"at: attention needs (C, H, W) feature maps; student {pair.student} gives {tuple(s)}, "
                    f"teacher {pair.teacher} gives {tuple(t)}. Pick convolutional layers."
                )
            if s[1:] != t[1:]:
                log.info("at: %s %s vs %s %s differ in size; both maps are pooled to the smaller",
                         pair.student, tuple(s[1:]), pair.teacher, tuple(t[1:]))  # fmt: skip

    def forward(self, student: dict[str, Tensor], teacher: dict[str, Tensor]) -> Tensor:
        losses = [
            pair.weight * attention_transfer_loss(student[pair.student], teacher[pair.teacher], self.p, self.mode)
            for pair in self.pairs
        ]
        return torch.stack(losses).sum()


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

    def __init__(
        self,
        pairs: Sequence[Mapping[str, object]],
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
        self.regressors = nn.ModuleDict()

    def bind(self, student_shapes: dict[str, torch.Size], teacher_shapes: dict[str, torch.Size]) -> None:
        for i, pair in enumerate(self.pairs):
            shape_s, shape_t = tuple(student_shapes[pair.student]), tuple(teacher_shapes[pair.teacher])
            self.regressors[str(i)] = HintRegressor(shape_s, shape_t, self.kernel_size)

    def forward(self, student: dict[str, Tensor], teacher: dict[str, Tensor]) -> Tensor:
        losses = [
            pair.weight * hint_loss(self.regressors[str(i)](student[pair.student]), teacher[pair.teacher], self.mode)
            for i, pair in enumerate(self.pairs)
        ]
        return torch.stack(losses).sum()
