"""Distillation losses (pure functions of tensors), feature terms, and the objectives that
combine them (the ``_target_`` of every ``conf/distill/*.yaml``)."""

from kd.losses.attention import attention_map, attention_transfer_loss
from kd.losses.feature_terms import AttentionTransfer, FeatureTerm, Hints, LayerPair
from kd.losses.hint import HintRegressor, hint_loss
from kd.losses.objective import CrossEntropy, SoftTargetKD
from kd.losses.soft_target import soft_target_loss

__all__ = [
    "AttentionTransfer",
    "CrossEntropy",
    "FeatureTerm",
    "HintRegressor",
    "Hints",
    "LayerPair",
    "SoftTargetKD",
    "attention_map",
    "attention_transfer_loss",
    "hint_loss",
    "soft_target_loss",
]
