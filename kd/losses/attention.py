"""Attention transfer: Zagoruyko & Komodakis (2017), "Paying More Attention to Attention"."""

from __future__ import annotations

import math

import torch.nn.functional as F
from torch import Tensor

MODES = ("paper", "code")


def _check_mode_and_p(mode: str, p: float) -> None:
    if mode not in MODES:
        raise ValueError(f"attention transfer mode must be one of {MODES}, got {mode!r}")
    if isinstance(p, bool) or not isinstance(p, (int, float)) or not math.isfinite(p) or p <= 0:
        raise ValueError(f"attention transfer p must be a finite number > 0, got {p!r}")


def _check_4d(features: Tensor, name: str) -> None:
    if features.dim() != 4:
        raise ValueError(
            f"{name} must be a 4-D activation tensor (B, C, H, W), got shape {tuple(features.shape)}; "
            "attention transfer needs spatial feature maps, not vectors"
        )


def attention_map(
    features: Tensor, p: float = 2.0, mode: str = "code", size: tuple[int, int] | None = None
) -> Tensor:
    """Spatial attention map of one layer, flattened and L2-normalised per sample.

    ``"paper"`` (eq. 1, ``F_sum^p``): ``Q = sum_c |A_c|^p``.
    ``"code"`` (github.com/szagoruyko/attention-transfer,
    ``at(x) = F.normalize(x.pow(p).mean(1).view(B, -1))``): ``Q = mean_c |A_c|^p``.

    Both are then flattened and divided by their L2 norm per sample. Sum and mean differ only by
    the constant factor ``C``, which the normalisation removes, so for the same ``p`` the two
    modes give *equal* maps; the modes differ only in the distance used by
    :func:`attention_transfer_loss`. The authors' code uses ``x.pow(p)`` without ``abs``; for
    even ``p`` (including the default ``p = 2``) that is identical, for odd or fractional ``p``
    it would give negative or NaN values, so ``|A|`` is used in both modes.

    If ``size`` is given and differs from ``(H, W)``, the channel-aggregated map ``(B, 1, H, W)``
    is adaptive-average-pooled to ``size`` before flattening and normalising.

    Args:
        features: ``(B, C, H, W)`` activations ``A``.
        p: exponent ``p > 0``; the paper and code use ``p = 2``.
        mode: ``"paper"`` or ``"code"`` (see above).
        size: optional target spatial size ``(h, w)``.

    Returns:
        ``(B, h*w)`` tensor whose rows have unit L2 norm (zero rows stay zero).
    """
    _check_mode_and_p(mode, p)
    _check_4d(features, "features")
    powered = features.abs().pow(p)
    # (B, C, H, W) -> (B, H, W)
    aggregated = powered.sum(dim=1) if mode == "paper" else powered.mean(dim=1)
    # (B, H, W) -> (B, 1, H, W)
    aggregated = aggregated.unsqueeze(1)
    if size is not None and tuple(size) != tuple(aggregated.shape[-2:]):
        # (B, 1, H, W) -> (B, 1, h, w)
        aggregated = F.adaptive_avg_pool2d(aggregated, tuple(size))
    # (B, 1, h, w) -> (B, h*w)
    flat = aggregated.flatten(start_dim=1)
    return F.normalize(flat, p=2.0, dim=1)


def attention_transfer_loss(student: Tensor, teacher: Tensor, p: float = 2.0, mode: str = "code") -> Tensor:
    """Attention-transfer term for one (student, teacher) layer pair, without its weight.

    With ``Q_s``, ``Q_t`` the normalised maps of :func:`attention_map`:

    * ``"paper"`` (eq. 2): ``|| Q_s - Q_t ||_2`` per sample, averaged over the batch. The paper's
      loss term is ``beta/2`` times the sum of this over layer pairs.
    * ``"code"`` (the default, because the published numbers were produced with it):
      ``(Q_s - Q_t).pow(2).mean()``, the *squared* difference averaged over batch *and*
      positions. The authors multiply the sum over layer pairs by ``beta/2`` with
      ``beta = 1000``.

    The objective should multiply the sum of these terms by ``beta/2``; ``beta`` lives in the
    config. Note the two modes have very different scales (norm vs. squared mean over ``h*w``
    positions), so a ``beta`` tuned for one does not carry over to the other.

    Channel counts may differ between student and teacher: the map aggregates channels away.
    Different spatial sizes are handled by pooling both maps to ``(min(H_s, H_t), min(W_s, W_t))``.

    Args:
        student: ``(B, C_s, H_s, W_s)`` student activations.
        teacher: ``(B, C_t, H_t, W_t)`` teacher activations; treated as constants (detached).
        p: exponent ``p > 0`` of the attention map.
        mode: ``"paper"`` or ``"code"``.

    Returns:
        Scalar tensor.
    """
    _check_mode_and_p(mode, p)
    _check_4d(student, "student")
    _check_4d(teacher, "teacher")
    if student.shape[0] != teacher.shape[0]:
        raise ValueError(
            f"student and teacher batch sizes differ: {tuple(student.shape)} vs {tuple(teacher.shape)}"
        )
    size = (min(student.shape[2], teacher.shape[2]), min(student.shape[3], teacher.shape[3]))
    q_s = attention_map(student, p, mode, size)  # (B, h*w)
    q_t = attention_map(teacher.detach(), p, mode, size)  # (B, h*w)
    diff = q_s - q_t
    if mode == "paper":
        # (B, h*w) -> (B,) -> ()
        return diff.norm(p=2, dim=1).mean()
    return diff.pow(2).mean()
