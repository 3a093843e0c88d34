"""Distillation objectives and their terms (the ``_target_`` of every ``conf/distill/*.yaml``).

``Objective`` = label cross-entropy + named, weighted ``Term``s (``kd.losses.protocol``); each
method of the zoo is one term in its own file, the maths in pure functions of tensors.
"""

from kd.losses.ab import AB
from kd.losses.cc import CC
from kd.losses.crd import CRD
from kd.losses.ctkd import CTKD
from kd.losses.dist import DIST
from kd.losses.dkd import DKD
from kd.losses.fsp import FSP
from kd.losses.ft import FT
from kd.losses.mlkd import MLKD
from kd.losses.nst import NST
from kd.losses.ofd import OFD
from kd.losses.pkt import PKT
from kd.losses.review import ReviewKD
from kd.losses.rkd import RKD
from kd.losses.sp import SP
from kd.losses.vid import VID
from kd.losses.attention import attention_map, attention_transfer_loss
from kd.losses.feature_terms import AttentionTransfer, FeatureTerm, Hints
from kd.losses.hint import HintRegressor, hint_loss
from kd.losses.objective import CrossEntropy, Objective, SoftTargetKD
from kd.losses.protocol import BindContext, DistillationObjective, Term, TermInputs
from kd.losses.soft_target import SoftTarget, soft_target_loss
from kd.losses.standardize import standardize_logits
from kd.models.features import LayerPair

__all__ = [
    "AB",
    "attention_map",
    "attention_transfer_loss",
    "AttentionTransfer",
    "BindContext",
    "CC",
    "CRD",
    "CrossEntropy",
    "CTKD",
    "DIST",
    "DistillationObjective",
    "DKD",
    "FeatureTerm",
    "FSP",
    "FT",
    "hint_loss",
    "HintRegressor",
    "Hints",
    "LayerPair",
    "MLKD",
    "NST",
    "Objective",
    "OFD",
    "PKT",
    "ReviewKD",
    "RKD",
    "soft_target_loss",
    "SoftTarget",
    "SoftTargetKD",
    "SP",
    "standardize_logits",
    "Term",
    "TermInputs",
    "VID",
]
