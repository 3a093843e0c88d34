"""Logit standardization: Sun et al. (CVPR 2024), "Logit Standardization in Knowledge Distillation"."""

from __future__ import annotations

from torch import Tensor


def standardize_logits(logits: Tensor, eps: float = 1e-7) -> Tensor:
    """Z-score of each sample's logits over the classes: ``(z - mean(z)) / (std(z) + eps)``.

    The paper's ``Z(z; tau) = (z - mean(z)) / (std(z) * tau)`` (eq. 8) divides by the temperature
    too; here the logit term applies its own temperature afterwards, so ``Z(z) / T`` is exactly the
    paper's ``Z(z; T)``. The standard deviation is the sample one (``torch.std``'s default, with
    ``K - 1``), as in the authors' code; the population one differs by the constant factor
    ``sqrt((K - 1) / K)``, which a temperature absorbs. The student and the teacher
    are standardised alike, so a student whose logits are an affine map ``a z_t + b`` (``a > 0``)
    of the teacher's matches it exactly: the point of the method.

    Args:
        logits: ``(B, K)`` raw scores.
        eps: added to the standard deviation (a sample with equal logits maps to zeros).

    Returns:
        ``(B, K)`` standardised logits.
    """
    mean = logits.mean(dim=-1, keepdim=True)  # (B, K) -> (B, 1)
    std = logits.std(dim=-1, keepdim=True)  # (B, K) -> (B, 1)
    return (logits - mean) / (std + eps)
