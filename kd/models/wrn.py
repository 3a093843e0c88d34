"""Wide residual networks (WRN-d-k).

References:
    Zagoruyko & Komodakis (2016). Wide residual networks. BMVC.
    Tian, Krishnan & Isola (2020). Contrastive representation distillation. ICLR.
    (RepDistiller code base, whose WRN layout this module follows.)
"""

import torch
from torch import nn
from torch.nn import functional as F

from kd.models.features import FeatureInfo, FeatureStage
from kd.models.arguments import check_classifier


class PreActBlock(nn.Module):
    """Pre-activation basic block: BN-ReLU-conv3x3-BN-ReLU-[dropout]-conv3x3, add.

    The shortcut is the identity, or a 1x1 conv applied to the pre-activated input
    when the stride or the channel count changes.

    Args:
        in_channels: Input channels.
        out_channels: Output channels.
        stride: Stride of the first convolution.
        dropout: Dropout probability between the two convolutions.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int, dropout: float) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.dropout = dropout
        self.shortcut: nn.Module | None = None
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Applies the block: ``(B, C_in, H, W) -> (B, C_out, ceil(H/s), ceil(W/s))``."""
        out = F.relu(self.bn1(x))
        identity = x if self.shortcut is None else self.shortcut(out)
        out = self.conv1(out)
        out = F.relu(self.bn2(out))
        if self.dropout > 0:
            out = F.dropout(out, p=self.dropout, training=self.training)
        return self.conv2(out) + identity


class WideResNet(nn.Module):
    """WRN-depth-widen_factor with pre-activation basic blocks.

    Stem ``conv1`` (3x3, 16 channels), then ``block1``/``block2``/``block3`` with
    ``n = (depth - 4) / 6`` blocks each and ``16k``/``32k``/``64k`` channels
    (stride 2 at the start of ``block2`` and ``block3``), final ``bn`` + ReLU,
    global average pool ``avgpool`` and linear ``fc``. Adaptive pooling makes any
    input size work (e.g. 8x8 -> 8 -> 4 -> 2).

    Args:
        num_classes: Number of output logits.
        input_shape: Input shape ``(C, H, W)``.
        depth: Number of weighted layers; ``(depth - 4) % 6 == 0`` and ``depth >= 10``
            (10, 16, 22, 28, 40, ...).
        widen_factor: Width multiplier ``k >= 1``.
        dropout: Dropout probability inside each block, in ``[0, 1)``.

    Raises:
        ValueError: If an argument is out of range.
    """

    def __init__(
        self,
        num_classes: int,
        input_shape: tuple[int, int, int],
        depth: int = 16,
        widen_factor: int = 1,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        check_classifier(num_classes, input_shape)
        if isinstance(depth, bool) or not isinstance(depth, int) or depth < 10 or (depth - 4) % 6 != 0:
            raise ValueError(
                "depth must satisfy (depth - 4) % 6 == 0 and depth >= 10 "
                f"(e.g. 10, 16, 22, 28, 40), got {depth!r}"
            )
        if isinstance(widen_factor, bool) or not isinstance(widen_factor, int) or widen_factor < 1:
            raise ValueError(f"widen_factor must be an int >= 1, got {widen_factor!r}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")

        self.depth = depth
        self.widen_factor = widen_factor
        n = (depth - 4) // 6
        channels = [16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor]
        self.conv1 = nn.Conv2d(int(input_shape[0]), channels[0], 3, padding=1, bias=False)
        self.block1 = self._make_stage(channels[0], channels[1], n, 1, dropout)
        self.block2 = self._make_stage(channels[1], channels[2], n, 2, dropout)
        self.block3 = self._make_stage(channels[2], channels[3], n, 2, dropout)
        self.bn = nn.BatchNorm2d(channels[3])
        self.relu = nn.ReLU(inplace=True)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(channels[3], num_classes)

        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)

    @staticmethod
    def _make_stage(
        in_channels: int, out_channels: int, blocks: int, stride: int, dropout: float
    ) -> nn.Sequential:
        layers = [PreActBlock(in_channels, out_channels, stride, dropout)]
        layers += [PreActBlock(out_channels, out_channels, 1, dropout) for _ in range(blocks - 1)]
        return nn.Sequential(*layers)

    def feature_info(self) -> FeatureInfo:
        """The three groups (``block1..3``). A pre-activation network: a group's output is its
        pre-activation feature; its post-activation is the BN-ReLU the next group applies first
        (``block2.0.bn1:relu``), and for the last group the final ``relu``."""
        widths = [self.fc.in_features // 4, self.fc.in_features // 2, self.fc.in_features]
        post = ["block2.0.bn1:relu", "block3.0.bn1:relu", "relu"]
        stages = tuple(FeatureStage(f"block{i + 1}", post[i], f"block{i + 1}", c, 2**i) for i, c in enumerate(widths))
        return FeatureInfo(stages, "fc:in", self.fc.in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Computes logits.

        Args:
            x: Input batch of shape ``(B, C, H, W)``.

        Returns:
            Logits of shape ``(B, num_classes)``.
        """
        x = self.conv1(x)  # (B, 16, H, W)
        x = self.block1(x)  # (B, 16k, H, W)
        x = self.block2(x)  # (B, 32k, H/2, W/2)
        x = self.block3(x)  # (B, 64k, H/4, W/4)
        x = self.relu(self.bn(x))
        x = torch.flatten(self.avgpool(x), 1)  # (B, 64k, 1, 1) -> (B, 64k)
        return self.fc(x)
