"""Distillation losses (pure functions of tensors) and the objectives that combine them."""

from kd.losses.objective import CrossEntropy, SoftTargetKD
from kd.losses.soft_target import soft_target_loss

__all__ = ["CrossEntropy", "SoftTargetKD", "soft_target_loss"]
