"""The objective protocol: what a distillation term declares, receives and returns.

An objective (``kd.losses.Objective``) is cross-entropy on the labels plus a dict of named,
weighted **terms**. Every method of the zoo (KD, DKD, CRD, AT, ...) is one ``Term``: a small
``nn.Module`` that declares what it needs, is bound once to the models' feature shapes, and maps
one batch's ``TermInputs`` to a scalar. The objective logs each term as ``train/loss_<name>``.

What a term may ask for, each declared by a class attribute, never discovered by ``isinstance``:

* ``needs_teacher_logits``: the teacher's logits (cached on the training device when the inputs
  are deterministic and no term of the objective needs teacher features).
* ``logit_based``: the term reads logits only, so ``distill.logit_standardize`` z-scores the
  logits it receives (Sun et al., CVPR 2024).
* ``needs_indices``: the sample indices of the batch (CRD's memory bank).
* feature layers: ``feature_pairs()`` returns ``LayerPair``s of hook specs (see ``kd.models.features``);
  a term built without explicit ``pairs`` picks them from both models' declared feature stages
  in ``resolve()`` (``default_layers``: which stages, ``pre_activation``: before the ReLU).
* trainable parameters of its own: ordinary submodules and parameters, created in ``bind()``
  from the feature shapes; they are in the optimiser and the Lightning checkpoint (the objective
  is a submodule of the training module), never in ``student.pt`` (the student alone is saved).
  State that is not trained (a memory bank) is a persistent buffer, so a resumed fit continues it.
* the epoch: ``start_epoch(epoch, max_epochs)`` is called at every training epoch's start; a
  term whose weight follows a schedule (DKD's warm-up) returns it from ``scale()``.
* a pre-training stage: ``pretrain_epochs > 0`` runs ``pretrain_loss`` alone for that many
  epochs at the start of the same fit (FT's paraphraser, AB's initialisation, FitNets' stage 1);
  ``train/stage`` is 1 then, 2 after. ``keep_after_pretrain`` says whether the term stays in the
  loss afterwards.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import ClassVar, Protocol, runtime_checkable

import torch
from torch import Tensor, nn

from kd.models.features import FeatureInfo, LayerPair, resolve_pairs

Shapes = dict[str, torch.Size]  # hook spec -> feature shape without the batch dimension


@dataclass(frozen=True)
class BindContext:
    """What a term may size itself by, beside the feature shapes: known before training."""

    num_classes: int
    num_samples: int  # training-set size (CRD's memory bank, its number of negatives)
    student_shapes: Shapes = field(default_factory=dict)
    teacher_shapes: Shapes = field(default_factory=dict)


@dataclass
class TermInputs:
    """One training batch, as a term sees it. Features are keyed by hook spec."""

    student_logits: Tensor  # (B, K)
    targets: Tensor  # (B,)
    teacher_logits: Tensor | None = None  # (B, K) when a term needs them
    index: Tensor | None = None  # (B,) sample indices into the training set
    student: Mapping[str, Tensor] = field(default_factory=dict)
    teacher: Mapping[str, Tensor] = field(default_factory=dict)


class Term(nn.Module):
    """Base of every distillation term (the zoo's methods). Subclasses set the class attributes
    that declare their needs and implement ``forward``; those with features implement ``bind``.

    Args:
        weight: multiplies the term in the objective (``>= 0``); ``train/loss_<name>`` logs the
            unweighted value.
        pairs: for feature terms, ``[{student: <spec>, teacher: <spec>, weight: w}, ...]``;
            ``None`` picks the pairs from the models' feature stages (``default_layers``).
    """

    name: ClassVar[str] = "term"  # for messages; the objective logs the term under its config key
    needs_teacher_logits: ClassVar[bool] = False
    logit_based: ClassVar[bool] = False
    needs_indices: ClassVar[bool] = False
    default_layers: ClassVar[str | None] = None  # "stages", "last", "middle", "embedding", ... ; None: no features
    pre_activation: ClassVar[bool] = False
    pretrain_epochs: int = 0
    keep_after_pretrain: bool = True

    def __init__(self, weight: float = 1.0, pairs: Sequence[Mapping[str, object]] | None = None) -> None:
        super().__init__()
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not weight >= 0:
            raise ValueError(f"{self.name}: weight must be a number >= 0, got {weight!r}")
        self.weight = float(weight)
        self._pairs = None if pairs is None else parse_pairs(pairs, self.name)
        self.epoch, self.max_epochs = 0, 1

    # -- declared needs ------------------------------------------------------------------------
    @property
    def needs_features(self) -> bool:
        return self.default_layers is not None or bool(self._pairs)

    def resolve(self, student: FeatureInfo | None, teacher: FeatureInfo | None) -> None:
        """Pick the layer pairs from the models' declared stages, unless the config named them."""
        if self._pairs is None and self.default_layers is not None:
            self._pairs = resolve_pairs(self.default_layers, student, teacher, self.pre_activation, self.name)

    def feature_pairs(self) -> list[LayerPair]:
        """The (student spec, teacher spec, weight) pairs this term reads; empty for logit terms."""
        if self._pairs is None and self.default_layers is not None:
            raise RuntimeError(f"{self.name}: resolve() the layer pairs before asking for them")
        return list(self._pairs or [])

    def bind(self, context: BindContext) -> None:
        """Check the feature shapes (batch dimension removed) and build what depends on them."""

    def start_epoch(self, epoch: int, max_epochs: int) -> None:
        self.epoch, self.max_epochs = epoch, max_epochs

    def scale(self) -> float:
        """This epoch's multiplier of ``weight`` (a warm-up or curriculum); 1 by default."""
        return 1.0

    # -- the loss ------------------------------------------------------------------------------
    def forward(self, inputs: TermInputs) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError(f"{type(self).__name__} must implement forward(inputs) -> scalar")

    def pretrain_loss(self, inputs: TermInputs) -> Tensor:
        """The loss of this term's pre-training stage (only called when ``pretrain_epochs > 0``)."""
        return self(inputs)

    def extra_terms(self) -> dict[str, Tensor]:
        """Further values to log beside the term, e.g. CTKD's temperature (``train/<key>``)."""
        return {}

    def describe(self) -> str:
        return self.name


def parse_pairs(pairs: Sequence[Mapping[str, object]], term: str) -> list[LayerPair]:
    """``[{student, teacher, weight?}, ...]`` from the config, checked."""
    if isinstance(pairs, (str, bytes)) or not pairs:
        raise ValueError(f"{term}: `pairs` must be a non-empty list of {{student: <layer>, teacher: <layer>}} "
                         f"(or null for the models' feature stages), got {pairs!r}")  # fmt: skip
    out = []
    for pair in pairs:
        if not isinstance(pair, Mapping):
            raise ValueError(f"{term}: a pair is a mapping {{student: <layer>, teacher: <layer>}}, got {pair!r}")
        unknown = set(pair) - {"student", "teacher", "weight"}
        if unknown or not {"student", "teacher"} <= set(pair):
            raise ValueError(f"{term}: a pair needs keys student, teacher (and optionally weight); got {dict(pair)}")
        weight = float(pair.get("weight", 1.0))
        if not weight >= 0:
            raise ValueError(f"{term}: a pair's weight must be >= 0, got {weight}")
        out.append(LayerPair(str(pair["student"]), str(pair["teacher"]), weight))
    return out


@runtime_checkable
class DistillationObjective(Protocol):
    """What the training modules and the run ask of an objective (``kd.losses.Objective`` is the
    implementation every ``conf/distill/*.yaml`` builds)."""

    needs_teacher: bool
    needs_teacher_logits: bool
    needs_features: bool
    needs_teacher_features: bool
    needs_indices: bool

    def layers(self, role: str) -> list[str]: ...

    def resolve(self, student: FeatureInfo | None, teacher: FeatureInfo | None) -> None: ...

    def bind(self, context: BindContext) -> None: ...

    def start_epoch(self, epoch: int, max_epochs: int) -> None: ...

    def pretrain_epochs(self) -> int: ...

    def __call__(self, student_logits: Tensor, targets: Tensor, teacher_logits: Tensor | None = None,
                 student_features: Mapping[str, Tensor] | None = None,
                 teacher_features: Mapping[str, Tensor] | None = None,
                 index: Tensor | None = None) -> dict[str, Tensor]: ...  # fmt: skip

    def describe(self) -> str: ...
