"""Training objectives: what the `distill/` config group builds.

``L = ce_weight * CE(y, z_s) + sum_i weight_i * scale_i(epoch) * L_i``

An objective is cross-entropy on the labels plus named ``Term``s (``kd.losses.protocol``): KD,
DKD, CRD, attention transfer, ... Each term is logged as ``train/loss_<name>`` (unweighted), the
total as ``train/loss``. ``SoftTargetKD`` is the Hinton objective with its own keys
(``temperature``, ``alpha``: ``ce_weight = 1 - alpha``, KD's weight ``alpha``); ``CrossEntropy`` is
the label-only baseline, or labels plus feature terms (``distill=at``).

Objectives validate their arguments on construction, so a bad value fails when the config is
instantiated. ``prepare()`` then resolves the feature layers against both models' declared stages,
runs one dummy batch through both, and binds every term to the shapes found: a wrong layer fails
before any teacher trains.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kd.models.features import FeatureHooks, feature_info
from kd.losses.protocol import BindContext, Term, TermInputs
from kd.losses.soft_target import SoftTarget
from kd.losses.standardize import standardize_logits


def _check_number(key: str, value: object, low: float, high: float = math.inf) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or not low <= value <= high:
        if math.isfinite(high):
            raise ValueError(f"distill.{key} must lie in [{low:g}, {high:g}], got {value!r}")
        raise ValueError(f"distill.{key} must be a finite number >= {low:g}, got {value!r}")
    return float(value)


class Objective(nn.Module):
    """Cross-entropy on the labels plus weighted distillation terms.

    Args:
        ce_weight: weight of the label cross-entropy (``>= 0``; 0 drops it).
        terms: named terms, e.g. ``{"dkd": DKD(...), "crd": CRD(...)}``; each is logged as
            ``train/loss_<name>``. Several terms combine as papers combine them (KD + CRD).
        logit_standardize: z-score the student's and the teacher's logits (per sample, over the
            classes) before every logit-based term (Sun et al., CVPR 2024); CE keeps raw logits.
    """

    def __init__(self, ce_weight: float = 1.0, terms: Mapping[str, Term] | None = None,
                 logit_standardize: bool = False) -> None:  # fmt: skip
        super().__init__()
        self.ce_weight = _check_number("ce_weight", ce_weight, 0.0)
        terms = dict(terms or {})
        for name, term in terms.items():
            if not isinstance(term, Term):
                raise TypeError(f"distill.terms.{name} must build a kd.losses Term (a _target_), got {type(term).__name__}")
        self.terms = nn.ModuleDict(terms)
        if not isinstance(logit_standardize, bool):
            raise ValueError(f"distill.logit_standardize must be true or false, got {logit_standardize!r}")
        self.logit_standardize = logit_standardize
        self.epoch, self.max_epochs = 0, 1
        self._pretraining = self.pretrain_epochs() > 0  # a bool, not the epoch: a compiled step recompiles only at the stage boundary
        self.bound = False
        # this epoch's weights, CE first: a buffer, so a compiled step reads new values without recompiling
        self.register_buffer("_weights", torch.ones(len(self.terms) + 1), persistent=False)
        self._refresh_weights()

    # -- declared needs ------------------------------------------------------------------------
    @property
    def needs_teacher_logits(self) -> bool:
        return any(t.needs_teacher_logits for t in self.terms.values())

    @property
    def needs_features(self) -> bool:
        return any(t.needs_features for t in self.terms.values())

    @property
    def needs_teacher_features(self) -> bool:
        return self.needs_features

    @property
    def needs_teacher(self) -> bool:
        return self.needs_teacher_logits or self.needs_features

    @property
    def needs_indices(self) -> bool:
        return any(t.needs_indices for t in self.terms.values())

    @property
    def features(self) -> dict[str, Term]:
        """The feature terms (those that read layers), by name."""
        return {k: t for k, t in self.terms.items() if t.needs_features}

    def pretrain_epochs(self) -> int:
        """Epochs of the pre-training stage (FT's paraphraser, AB, FitNets' stage 1); 0: none."""
        return max((t.pretrain_epochs for t in self.terms.values()), default=0)

    def warmup_epochs(self) -> int:  # the name FitNets' callers used
        return self.pretrain_epochs()

    def layers(self, role: str) -> list[str]:
        """The hook specs ``role`` ("student" or "teacher") must expose, from the terms' pairs."""
        return list(dict.fromkeys(getattr(p, role) for t in self.features.values() for p in t.feature_pairs()))

    # -- binding to the models, before training ------------------------------------------------
    def resolve(self, student: object, teacher: object) -> None:
        for term in self.features.values():
            term.resolve(student, teacher)

    def bind(self, context: BindContext) -> None:
        for term in self.terms.values():
            term.bind(context)
        self.bound = True

    @torch.no_grad()
    def prepare(self, student: nn.Module, teacher: nn.Module | None, input_shape: tuple[int, ...],
                num_classes: int, num_samples: int) -> None:  # fmt: skip
        """Resolve the feature layers against both models' declared stages, run one dummy batch
        through both with hooks on those layers, and bind every term to the shapes found (and
        the data's size). Idempotent; fails with the valid names and the shapes on a bad choice."""
        if self.bound:
            return
        student_shapes: dict[str, torch.Size] = {}
        teacher_shapes: dict[str, torch.Size] = {}
        if self.needs_features:
            if teacher is None:
                raise ValueError("feature terms need a teacher model")
            self.resolve(feature_info(student), feature_info(teacher))
            student_shapes = _probe(student, self.layers("student"), input_shape, "student")
            teacher_shapes = _probe(teacher, self.layers("teacher"), input_shape, "teacher")
        try:
            self.bind(BindContext(num_classes, num_samples, student_shapes, teacher_shapes))
        except (ValueError, KeyError) as err:
            found = "; ".join(f"{role} {k}: {tuple(v)}" for role, shapes in (("student", student_shapes),
                              ("teacher", teacher_shapes)) for k, v in shapes.items())  # fmt: skip
            raise ValueError(f"{err} (feature shapes found, without the batch: {found or 'none'})") from err

    # -- training ------------------------------------------------------------------------------
    def start_epoch(self, epoch: int, max_epochs: int) -> None:
        """Called by the module at each training epoch start (stages and schedules read it)."""
        self.epoch, self.max_epochs = epoch, max_epochs
        for term in self.terms.values():
            term.start_epoch(epoch, max_epochs)
        self._pretraining = epoch < self.pretrain_epochs()
        self._refresh_weights()

    def label_weight(self) -> float:
        return self.ce_weight

    def _refresh_weights(self) -> None:
        values = [self.label_weight(), *(t.weight * t.scale() for t in self.terms.values())]
        self._weights.copy_(torch.tensor(values, dtype=self._weights.dtype))

    def forward(
        self,
        student_logits: Tensor,
        targets: Tensor,
        teacher_logits: Tensor | None = None,
        student_features: Mapping[str, Tensor] | None = None,
        teacher_features: Mapping[str, Tensor] | None = None,
        index: Tensor | None = None,
    ) -> dict[str, Tensor]:
        if self.needs_teacher_logits and teacher_logits is None:
            raise ValueError(f"the objective {self.describe()!r} needs the teacher's logits")
        raw = TermInputs(student_logits, targets, teacher_logits, index, student_features or {}, teacher_features or {})
        standardized = raw
        if self.logit_standardize:
            standardized = TermInputs(standardize_logits(student_logits),
                                      targets, None if teacher_logits is None else standardize_logits(teacher_logits),
                                      index, raw.student, raw.teacher)  # fmt: skip
        if self._pretraining:  # the pre-training stage: the staged terms alone
            total = student_logits.new_zeros(())
            out: dict[str, Tensor] = {}
            for i, (name, term) in enumerate(self.terms.items(), start=1):
                if self.epoch < term.pretrain_epochs:
                    value = term.pretrain_loss(standardized if term.logit_based else raw)
                    total = total + self._weights[i] * value
                    out[f"loss_{name}"] = value
            return {"loss": total, **out, "stage": torch.ones((), device=total.device)}
        ce = F.cross_entropy(student_logits, targets)
        total = self._weights[0] * ce
        out = {"loss_ce": ce}
        for i, (name, term) in enumerate(self.terms.items(), start=1):
            if term.pretrain_epochs and not term.keep_after_pretrain:
                continue  # its stage has done its work
            value = term(standardized if term.logit_based else raw)
            total = total + self._weights[i] * value
            out[f"loss_{name}"] = value
            out.update(term.extra_terms())
        if self.pretrain_epochs():
            out["stage"] = torch.full((), 2.0, device=student_logits.device)
        return {"loss": total, **out}

    def describe(self) -> str:
        ls = " ls" if self.logit_standardize else ""
        return "+".join(["ce", *self.terms]) + ls


class CrossEntropy(Objective):
    """Training on labels: ``L = CE(y, z_s) + sum_i w_i * L_i``.

    Without terms this is the ``distill=none`` baseline (no teacher at all); with feature terms
    (``distill=at``, ``distill=fitnets``) the teacher is run for its features only.
    """

    def __init__(self, terms: Mapping[str, Term] | None = None, logit_standardize: bool = False,
                 features: Mapping[str, Term] | None = None) -> None:  # fmt: skip
        super().__init__(1.0, _renamed(terms, features), logit_standardize)

    def describe(self) -> str:
        return "+".join(["ce", *self.terms]) + (" ls" if self.logit_standardize else "")


class SoftTargetKD(Objective):
    """Hinton et al. (2015) knowledge distillation, plus optional further terms.

    ``L = alpha * T^2 * KL(softmax(z_t/T) || softmax(z_s/T)) + (1 - alpha) * CE(y, z_s) + sum_i w_i * L_i``

    Convention: ``alpha`` is the weight of the *soft* (teacher) term, as in Hinton's paper
    and RepDistiller. torchdistill's ``KDLoss`` uses the opposite reading (its ``alpha``
    weighs the hard-label term); translate with ``alpha_here = 1 - alpha_torchdistill``.

    Args:
        temperature: softmax temperature ``T > 0`` applied to both logits in the soft term.
        alpha: weight of the soft term, in ``[0, 1]``. ``alpha = 0`` is plain cross-entropy.
        alpha_end: when set, ``alpha`` is annealed linearly to this value over the training
            epochs (after a pre-training stage, over the epochs after it); None keeps it fixed.
        terms: further terms (``distill=kd_at``: attention transfer beside KD).
        logit_standardize: see ``Objective``; here it z-scores the logits of the KD term.
    """

    def __init__(
        self,
        temperature: float = 4.0,
        alpha: float = 0.9,
        alpha_end: float | None = None,
        terms: Mapping[str, Term] | None = None,
        logit_standardize: bool = False,
        features: Mapping[str, Term] | None = None,
    ) -> None:
        if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not math.isfinite(temperature) \
                or temperature <= 0:  # fmt: skip
            raise ValueError(f"distill.temperature must be a finite number > 0, got {temperature!r}")
        self.temperature = float(temperature)
        self.alpha = _check_number("alpha", alpha, 0.0, 1.0)
        self.alpha_end = None if alpha_end is None else _check_number("alpha_end", alpha_end, 0.0, 1.0)
        extra = _renamed(terms, features)
        if "kd" in extra:
            raise ValueError("distill.terms.kd: SoftTargetKD holds the kd term itself; name the extra term otherwise")
        super().__init__(1.0, {"kd": SoftTarget(self.temperature, weight=self.alpha), **extra}, logit_standardize)

    def current_alpha(self) -> float:
        """``alpha`` at the current epoch (linear from ``alpha`` to ``alpha_end``, when annealed)."""
        if self.alpha_end is None:
            return self.alpha
        start = self.pretrain_epochs()
        span = max(self.max_epochs - 1 - start, 1)
        progress = min(max((self.epoch - start) / span, 0.0), 1.0)
        return self.alpha + (self.alpha_end - self.alpha) * progress

    def label_weight(self) -> float:
        return 1.0 - self.current_alpha()

    def _refresh_weights(self) -> None:
        if "kd" in self.terms:  # during construction the kd term does not exist yet
            self.terms["kd"].weight = self.current_alpha()
        super()._refresh_weights()

    def describe(self) -> str:
        extra = "".join(f"+{name}" for name in self.terms if name != "kd")
        ls = " ls" if self.logit_standardize else ""
        return f"kd{extra} T={self.temperature:g} a={self.alpha:g}{ls}"


def _renamed(terms: Mapping[str, Term] | None, features: Mapping[str, Term] | None) -> dict[str, Term]:
    if features:
        if terms:
            raise ValueError("distill.features is the old spelling of distill.terms; give one of them")
        return dict(features)
    return dict(terms or {})


def _probe(model: nn.Module, specs: list[str], input_shape: tuple[int, ...], role: str) -> dict[str, torch.Size]:
    """Shapes (without the batch) of ``specs`` from one dummy batch of 2 through ``model`` in eval mode."""
    hooks = FeatureHooks(model, specs, role)
    was_training = model.training
    model.eval()  # no batch-norm statistics updated by the probe
    try:
        device = next(model.parameters()).device
        with hooks.capture() as found:
            model(torch.zeros(2, *input_shape, device=device))
    finally:
        hooks.remove()
        model.train(was_training)
    return {k: v.shape[1:] for k, v in found.items()}
