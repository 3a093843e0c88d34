"""A small MobileNet-v1-style CNN built from depthwise-separable convolutions.

Reference:
    Howard, Zhu, Chen, Kalenichenko, Wang, Weyand, Andreetto & Adam (2017).
    MobileNets: Efficient convolutional neural networks for mobile vision
    applications. arXiv:1704.04861.
"""

from collections.abc import Sequence

import torch
from torch import nn

from kd.models.features import FeatureInfo, FeatureStage
from kd.models.arguments import check_classifier


class DepthwiseSeparable(nn.Module):
    """Depthwise 3x3 conv-BN-ReLU followed by pointwise 1x1 conv-BN-ReLU.

    Args:
        in_channels: Input channels (also the depthwise groups).
        out_channels: Output channels of the pointwise convolution.
        stride: Stride of the depthwise convolution (1 or 2).
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        self.depthwise = nn.Conv2d(
            in_channels, in_channels, 3, stride=stride, padding=1, groups=in_channels, bias=False
        )
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.pointwise = nn.Conv2d(in_channels, out_channels, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Applies the block: ``(B, C_in, H, W) -> (B, C_out, ceil(H/s), ceil(W/s))``."""
        x = self.relu(self.bn1(self.depthwise(x)))
        return self.relu(self.bn2(self.pointwise(x)))


class MobileNetLite(nn.Module):
    """Small MobileNet-v1-style classifier for low-resolution images.

    Stem ``conv1`` (3x3, stride 1) -> ``bn1`` -> ReLU, then ``blocks`` (an
    ``nn.Sequential`` of :class:`DepthwiseSeparable`, one per ``[out_channels,
    stride]`` entry), global average pool ``avgpool`` and linear ``fc``. Unlike the
    ImageNet model the stem has stride 1 and the stack is short, so 8x8 inputs work
    (stride-2 convs with padding 1 map ``H -> ceil(H/2)``, never to zero).

    Args:
        num_classes: Number of output logits.
        input_shape: Input shape ``(C, H, W)``.
        blocks: ``[out_channels, stride]`` per depthwise-separable block, stride
            in {1, 2}. Must not be empty.
        width_mult: Width multiplier alpha applied to all channel counts
            (rounded, at least 1 channel).
        stem: Output channels of the stem convolution (before ``width_mult``).

    Raises:
        ValueError: If an argument is out of range.
    """

    def __init__(
        self,
        num_classes: int,
        input_shape: tuple[int, int, int],
        blocks: Sequence[Sequence[int]] = ((32, 1), (64, 2), (128, 2), (128, 1)),
        width_mult: float = 1.0,
        stem: int = 32,
    ) -> None:
        super().__init__()
        check_classifier(num_classes, input_shape)
        if width_mult <= 0:
            raise ValueError(f"width_mult must be > 0, got {width_mult}")
        if stem < 1:
            raise ValueError(f"stem must be >= 1, got {stem}")
        if len(blocks) == 0:
            raise ValueError("blocks must be a non-empty list of [out_channels, stride] pairs")
        for block in blocks:
            if isinstance(block, (str, bytes)) or not isinstance(block, Sequence) or len(block) != 2:
                raise ValueError(f"each block must be [out_channels, stride], got {block!r}")
            if block[0] < 1 or block[1] not in (1, 2):
                raise ValueError(f"block needs out_channels >= 1 and stride in {{1, 2}}, got {list(block)}")

        def scaled(c: int) -> int:
            return max(1, round(c * width_mult))

        channels = scaled(stem)
        self.conv1 = nn.Conv2d(int(input_shape[0]), channels, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.relu = nn.ReLU(inplace=True)
        layers = []
        for out_channels, stride in blocks:
            layers.append(DepthwiseSeparable(channels, scaled(out_channels), int(stride)))
            channels = scaled(out_channels)
        self.blocks = nn.Sequential(*layers)
        self._strides = [int(stride) for _, stride in blocks]
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(channels, num_classes)

        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def feature_info(self) -> FeatureInfo:
        """One stage per resolution: the last block before each stride-2 block, and the last
        block (pre-activation: its ``bn2`` output, before the ReLU); the pooled embedding."""
        stages, reduction = [], 1
        for i, stride in enumerate(self._strides):
            reduction *= stride
            if i == len(self._strides) - 1 or self._strides[i + 1] == 2:
                block = self.blocks[i]
                stages.append(FeatureStage(f"blocks.{i}", f"blocks.{i}", f"blocks.{i}.bn2", block.bn2.num_features, reduction))
        return FeatureInfo(tuple(stages), "fc:in", self.fc.in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Computes logits.

        Args:
            x: Input batch of shape ``(B, C, H, W)``.

        Returns:
            Logits of shape ``(B, num_classes)``.
        """
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.blocks(x)
        x = torch.flatten(self.avgpool(x), 1)  # (B, C', 1, 1) -> (B, C')
        return self.fc(x)
