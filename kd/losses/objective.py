"""Training objectives: what the `distill/` config group selects.

An objective turns one batch's student logits, labels, and (when it needs them) the teacher's
logits and both models' captured features into a dict of named loss terms. ``"loss"`` is the
total that is optimised; every other key is one term, logged on its own as ``train/<key>``.

``L = alpha * T^2 * KL(softmax(z_t/T) || softmax(z_s/T)) + (1 - alpha) * CE(y, z_s) + sum_i w_i * L_i``

where the ``L_i`` are feature terms (attention transfer, hints) with their weights ``w_i``.
Objectives validate their arguments on construction, so a bad ``alpha`` or ``temperature``
fails when the config is instantiated, before any data is loaded or any teacher trained. The
maths lives in the pure functions of this package.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kd.losses.feature_terms import FeatureTerm, Hints
from kd.losses.soft_target import soft_target_loss

Features = dict[str, Tensor]


class CrossEntropy(nn.Module):
    """Training on labels: ``L = CE(y, z_s) + sum_i w_i * L_i``.

    Without feature terms this is the ``distill=none`` baseline (no teacher at all); with them
    (``distill=at``, ``distill=fitnets``) the teacher is run for its features only.

    Args:
        features: named feature terms (``AttentionTransfer``, ``Hints``) over layer pairs, e.g.
            ``{"at": AttentionTransfer(...)}``; each is logged as ``train/loss_<name>``.
    """

    def __init__(self, features: Mapping[str, FeatureTerm] | None = None) -> None:
        super().__init__()
        self.features = nn.ModuleDict(dict(features or {}))
        self.epoch, self.max_epochs = 0, 1

    @property
    def needs_teacher(self) -> bool:
        return len(self.features) > 0

    @property
    def needs_teacher_features(self) -> bool:
        return len(self.features) > 0

    def layers(self, role: str) -> list[str]:
        """The layer names that ``role`` ("student" or "teacher") must expose, from the pairs."""
        return list(dict.fromkeys(getattr(p, role) for term in self.features.values() for p in term.pairs))

    def bind(self, student_shapes: dict[str, torch.Size], teacher_shapes: dict[str, torch.Size]) -> None:
        """Give the terms the feature shapes (without batch) so they check them and build regressors."""
        for term in self.features.values():
            term.bind(student_shapes, teacher_shapes)

    def start_epoch(self, epoch: int, max_epochs: int) -> None:
        """Called by the module at each training epoch start (stages and annealing read it)."""
        self.epoch, self.max_epochs = epoch, max_epochs

    def warmup_epochs(self) -> int:
        """Epochs of a FitNets stage 1 (hint-only training), 0 when no term asks for one."""
        return max((t.stage1_epochs for t in self._two_stage_hints().values()), default=0)

    def _two_stage_hints(self) -> dict[str, Hints]:
        return {k: t for k, t in self.features.items() if isinstance(t, Hints) and t.stage == "two"}

    def forward(
        self,
        student_logits: Tensor,
        targets: Tensor,
        teacher_logits: Tensor | None = None,
        student_features: Features | None = None,
        teacher_features: Features | None = None,
    ) -> dict[str, Tensor]:
        if not self.features:  # logits only: the path a compiled training step traces (no epoch read, no break)
            return self.label_terms(student_logits, targets, teacher_logits)
        warmup = self.warmup_epochs()
        if self.epoch < warmup:  # FitNets stage 1: the hint alone trains the student up to the guided layer
            total = student_logits.new_zeros(())
            terms = {}
            for name, hint in self._two_stage_hints().items():
                value = hint(student_features, teacher_features)
                total = total + hint.weight * value
                terms[f"loss_{name}"] = value
            return {"loss": total, **terms, "stage": torch.ones((), device=total.device)}
        terms = self.label_terms(student_logits, targets, teacher_logits)
        staged = self._two_stage_hints()
        for name, term in self.features.items():
            if name in staged:
                continue  # stage 2: the hint has done its work
            value = term(student_features, teacher_features)
            terms["loss"] = terms["loss"] + term.weight * value
            terms[f"loss_{name}"] = value
        if warmup:
            terms["stage"] = torch.full((), 2.0, device=student_logits.device)
        return terms

    def label_terms(self, student_logits: Tensor, targets: Tensor, teacher_logits: Tensor | None) -> dict[str, Tensor]:
        ce = F.cross_entropy(student_logits, targets)
        return {"loss": ce, "loss_ce": ce}

    def describe(self) -> str:
        return "+".join(["ce", *self.features])


class SoftTargetKD(CrossEntropy):
    """Hinton et al. (2015) knowledge distillation, plus optional feature terms.

    ``L = alpha * T^2 * KL(softmax(z_t/T) || softmax(z_s/T)) + (1 - alpha) * CE(y, z_s) + sum_i w_i * L_i``

    Convention: ``alpha`` is the weight of the *soft* (teacher) term, as in Hinton's paper
    and RepDistiller. torchdistill's ``KDLoss`` uses the opposite reading (its ``alpha``
    weighs the hard-label term); translate with ``alpha_here = 1 - alpha_torchdistill``.

    Args:
        temperature: softmax temperature ``T > 0`` applied to both logits in the soft term.
        alpha: weight of the soft term, in ``[0, 1]``. ``alpha = 0`` is plain cross-entropy.
        alpha_end: when set, ``alpha`` is annealed linearly to this value over the training
            epochs (after a FitNets stage 1, over the epochs of stage 2); None keeps it fixed.
        features: feature terms, as for ``CrossEntropy``.
    """

    def __init__(
        self,
        temperature: float = 4.0,
        alpha: float = 0.9,
        alpha_end: float | None = None,
        features: Mapping[str, FeatureTerm] | None = None,
    ) -> None:
        super().__init__(features)
        if not isinstance(temperature, (int, float)) or not math.isfinite(temperature) or temperature <= 0:
            raise ValueError(f"distill.temperature must be a finite number > 0, got {temperature!r}")
        for name, value in (("alpha", alpha), ("alpha_end", alpha_end)):
            if value is not None and (not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0):
                raise ValueError(f"distill.{name} must lie in [0, 1] (the weight of the soft-target term), got {value!r}")
        self.temperature = float(temperature)
        self.alpha = float(alpha)
        self.alpha_end = None if alpha_end is None else float(alpha_end)

    @property
    def needs_teacher(self) -> bool:
        return True

    def current_alpha(self) -> float:
        """``alpha`` at the current epoch (linear from ``alpha`` to ``alpha_end``, when annealed)."""
        if self.alpha_end is None:
            return self.alpha
        start = self.warmup_epochs()
        span = max(self.max_epochs - 1 - start, 1)
        progress = min(max((self.epoch - start) / span, 0.0), 1.0)
        return self.alpha + (self.alpha_end - self.alpha) * progress

    def label_terms(self, student_logits: Tensor, targets: Tensor, teacher_logits: Tensor | None) -> dict[str, Tensor]:
        if teacher_logits is None:
            raise ValueError("SoftTargetKD needs the teacher's logits")
        ce = F.cross_entropy(student_logits, targets)
        kd = soft_target_loss(student_logits, teacher_logits, self.temperature)
        alpha = self.current_alpha()
        return {"loss": alpha * kd + (1.0 - alpha) * ce, "loss_kd": kd, "loss_ce": ce}

    def describe(self) -> str:
        extra = "".join(f"+{name}" for name in self.features)
        return f"kd{extra} T={self.temperature:g} a={self.alpha:g}"
