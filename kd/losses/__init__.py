"""Distillation objectives and their terms (the ``_target_`` of every ``conf/distill/*.yaml``).

``Objective`` = label cross-entropy + named, weighted ``Term``s (``kd.losses.protocol``); each
method of the zoo is one term in its own file, the maths in pure functions of tensors.
"""

from kd.losses.attention import attention_map, attention_transfer_loss
from kd.losses.feature_terms import AttentionTransfer, FeatureTerm, Hints
from kd.losses.hint import HintRegressor, hint_loss
from kd.losses.objective import CrossEntropy, Objective, SoftTargetKD
from kd.losses.protocol import BindContext, DistillationObjective, Term, TermInputs
from kd.losses.soft_target import SoftTarget, soft_target_loss
from kd.losses.standardize import standardize_logits
from kd.features import LayerPair

__all__ = [
    "AttentionTransfer",
    "BindContext",
    "CrossEntropy",
    "DistillationObjective",
    "FeatureTerm",
    "HintRegressor",
    "Hints",
    "LayerPair",
    "Objective",
    "SoftTarget",
    "SoftTargetKD",
    "Term",
    "TermInputs",
    "attention_map",
    "attention_transfer_loss",
    "hint_loss",
    "soft_target_loss",
    "standardize_logits",
]
