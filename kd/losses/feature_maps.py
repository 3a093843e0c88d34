"""Feature shapes the feature terms share: vectors as one-position maps, maps pooled to a size.

Every model of the zoo gives either ``(B, C, H, W)`` maps or ``(B, D)`` vectors at a stage; the
terms built for maps (VID, AB, OFD, FSP, FT, ReviewKD) read a vector as a map of one position,
so a 1x1 convolution on it is a linear layer, and pool the larger of two maps to the smaller
(RepDistiller's choice for pairs of different spatial size).
"""

from __future__ import annotations

import math
from collections.abc import Sequence


import torch.nn.functional as F
from torch import Tensor, nn


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


def conv_bn_connector(in_channels: int, out_channels: int) -> nn.Sequential:
    """The connector of the AB and OFD authors' code (``build_feature_connector``): a 1x1
    convolution without bias, ``N(0, sqrt(2 / out_channels))``, then batch norm (weight 1, bias 0).
    On a ``(D, 1, 1)`` vector: a linear layer + batch norm."""
    conv = nn.Conv2d(in_channels, out_channels, 1, bias=False)
    nn.init.normal_(conv.weight, 0.0, math.sqrt(2.0 / out_channels))
    bn = nn.BatchNorm2d(out_channels)
    nn.init.ones_(bn.weight)
    nn.init.zeros_(bn.bias)
    return nn.Sequential(conv, bn)
