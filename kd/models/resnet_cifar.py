"""ResNet for CIFAR-sized images (basic blocks, three stages).

References:
    He, Zhang, Ren & Sun (2016). Deep residual learning for image recognition.
    CVPR. (Section 4.2: the 6n+2-layer CIFAR-10 networks.)
    Tian, Krishnan & Isola (2020). Contrastive representation distillation. ICLR.
    (RepDistiller code base: option-B shortcuts and the wide resnet8x4/resnet32x4.)
"""

from collections.abc import Sequence

import torch
from torch import nn

from kd.models.features import FeatureInfo, FeatureStage
from kd.models.arguments import check_classifier


class BasicBlock(nn.Module):
    """Post-activation residual block: conv3x3-BN-ReLU-conv3x3-BN, add, ReLU.

    The shortcut is the identity, or a 1x1 conv + BN projection (option B) when
    the stride or the channel count changes.

    Args:
        in_channels: Input channels.
        out_channels: Output channels.
        stride: Stride of the first convolution.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU(inplace=True)
        self.preact = nn.Identity()  # names the pre-activation sum for feature hooks (OFD, AB)
        # a ReLU module of its own for the output: one module called twice is one partition with two
        # outputs to torch.export-based quantizers (torchao's x86 quantizer refuses the block)
        self.relu2 = nn.ReLU(inplace=True)
        self.downsample: nn.Module | None = None
        if stride != 1 or in_channels != out_channels:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False),
                nn.BatchNorm2d(out_channels),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Applies the block: ``(B, C_in, H, W) -> (B, C_out, ceil(H/s), ceil(W/s))``."""
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu2(self.preact(out + identity))


class CIFARResNet(nn.Module):
    """CIFAR ResNet-(6n+2) with basic blocks (He et al. 2016, option-B shortcuts).

    Stem ``conv1`` (3x3, ``stem`` channels) -> ``bn1`` -> ``relu``, then
    ``layer1``/``layer2``/``layer3`` with ``n = (depth - 2) / 6`` basic blocks each
    and ``width[i]`` channels (stride 2 at the start of ``layer2`` and ``layer3``),
    global average pool ``avgpool`` and linear ``fc``. Defaults give resnet20 etc.;
    RepDistiller's resnet8x4/resnet32x4 are ``width=[64, 128, 256], stem=32``.
    Adaptive pooling makes any input size >= 1 work (e.g. 8x8 -> 8 -> 4 -> 2).

    Args:
        num_classes: Number of output logits.
        input_shape: Input shape ``(C, H, W)``.
        depth: Number of weighted layers; ``(depth - 2) % 6 == 0`` and ``depth >= 8``
            (8, 14, 20, 32, 44, 56, 110, ...).
        width: Channels of the three stages.
        stem: Channels of the stem convolution; ``None`` means ``width[0]``.

    Raises:
        ValueError: If an argument is out of range.
    """

    def __init__(
        self,
        num_classes: int,
        input_shape: tuple[int, int, int],
        depth: int = 20,
        width: Sequence[int] = (16, 32, 64),
        stem: int | None = None,
    ) -> None:
        super().__init__()
        check_classifier(num_classes, input_shape)
        if isinstance(depth, bool) or not isinstance(depth, int) or depth < 8 or (depth - 2) % 6 != 0:
            raise ValueError(
                "depth must satisfy (depth - 2) % 6 == 0 and depth >= 8 "
                f"(e.g. 8, 14, 20, 32, 44, 56, 110), got {depth!r}"
            )
        if len(width) != 3 or min(width) < 1:
            raise ValueError(f"width must be 3 positive channel counts (one per stage), got {list(width)}")
        if stem is not None and stem < 1:
            raise ValueError(f"stem must be >= 1 or None, got {stem}")

        self.depth = depth
        self.width = [int(w) for w in width]
        self.stem = self.width[0] if stem is None else int(stem)
        n = (depth - 2) // 6
        self.conv1 = nn.Conv2d(int(input_shape[0]), self.stem, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(self.stem)
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = self._make_layer(self.stem, self.width[0], n, stride=1)
        self.layer2 = self._make_layer(self.width[0], self.width[1], n, stride=2)
        self.layer3 = self._make_layer(self.width[1], self.width[2], n, stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(self.width[2], num_classes)

        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    @staticmethod
    def _make_layer(in_channels: int, out_channels: int, blocks: int, stride: int) -> nn.Sequential:
        layers = [BasicBlock(in_channels, out_channels, stride)]
        layers += [BasicBlock(out_channels, out_channels) for _ in range(blocks - 1)]
        return nn.Sequential(*layers)

    def feature_info(self) -> FeatureInfo:
        """The three stages (``layer1..3``; pre-activation: the last block's sum before its ReLU)
        and the pooled embedding ``fc`` reads."""
        stages = []
        for i, (name, channels) in enumerate(zip(("layer1", "layer2", "layer3"), self.width)):
            last = len(getattr(self, name)) - 1
            stages.append(FeatureStage(name, name, f"{name}.{last}.preact", channels, 2**i))
        return FeatureInfo(tuple(stages), "fc:in", self.fc.in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Computes logits.

        Args:
            x: Input batch of shape ``(B, C, H, W)``.

        Returns:
            Logits of shape ``(B, num_classes)``.
        """
        x = self.relu(self.bn1(self.conv1(x)))  # (B, stem, H, W)
        x = self.layer1(x)  # (B, width[0], H, W)
        x = self.layer2(x)  # (B, width[1], H/2, W/2)
        x = self.layer3(x)  # (B, width[2], H/4, W/4)
        x = torch.flatten(self.avgpool(x), 1)  # (B, width[2], 1, 1) -> (B, width[2])
        return self.fc(x)
