"""Feature shapes the feature terms share: vectors as one-position maps, maps pooled to a size.

Every model of the zoo gives either ``(B, C, H, W)`` maps or ``(B, D)`` vectors at a stage; the
terms built for maps (VID, AB, OFD, FSP, FT, ReviewKD) read a vector as a map of one position,
so a 1x1 convolution on it is a linear layer, and pool the larger of two maps to the smaller
(RepDistiller's choice for pairs of different spatial size).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch.nn.functional as F
from torch import Tensor


def as_map(features: Tensor) -> Tensor:
    """``(B, D) -> (B, D, 1, 1)``; maps unchanged."""
    return features[:, :, None, None] if features.dim() == 2 else features


def map_shape(shape: Sequence[int], spec: str, role: str, term: str) -> tuple[int, int, int]:
    """A feature shape without the batch as ``(C, H, W)``: a map as it is, a vector ``(D,)`` as
    ``(D, 1, 1)``; anything else is refused, naming the ``term``, the ``role``'s layer and the shape."""
    dims = tuple(int(d) for d in shape)
    if len(dims) == 1:
        return (dims[0], 1, 1)
    if len(dims) == 3:
        return dims  # type: ignore[return-value]
    raise ValueError(f"{term}: the {role} layer {spec} gives features of shape {dims}; {term.upper()} needs "
                     "(C, H, W) maps or (D,) vectors")  # fmt: skip


def pool_to(features: Tensor, size: tuple[int, int]) -> Tensor:
    """``(B, C, H, W) -> (B, C, h, w)`` by adaptive average pooling where the sizes differ."""
    return features if tuple(features.shape[-2:]) == tuple(size) else F.adaptive_avg_pool2d(features, size)
