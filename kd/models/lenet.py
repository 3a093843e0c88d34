"""LeNet-5 convolutional networks: LeCun's 6-16-120-84 and Caffe's 20-50-500 (Han et al.'s).

References:
    LeCun, Bottou, Bengio & Haffner (1998). Gradient-based learning applied to
    document recognition. Proc. IEEE.
    Han, Pool, Tran & Dally (2015). Learning both weights and connections for efficient
    neural networks. NeurIPS. Their "LeNet-5" is Caffe's MNIST example: 20 and 50 maps,
    no padding, one 500-unit hidden layer (431K weights; ``conf/model/lenet5_caffe.yaml``).
"""

from collections.abc import Sequence

import torch
from torch import nn
from torch.nn import functional as F

from kd.models.features import FeatureInfo, FeatureStage
from kd.models.arguments import check_classifier, positive_ints


class LeNet5(nn.Module):
    """LeNet-5, modern ReLU + max-pool variant, with the widths as arguments.

    ``conv1`` (``channels[0]`` maps, 5x5) -> ReLU -> 2x2 max-pool -> ``conv2``
    (``channels[1]`` maps, 5x5) -> ReLU -> 2x2 max-pool -> ``fc1`` ... ``fc{n}``
    (``hidden`` widths, ReLU) -> ``fc{n+1}`` (classes).

    Defaults are LeCun's widths (6, 16; 120, 84) with ``padding=2`` on *both*
    convolutions, so that the net also runs on 8x8 inputs (sklearn digits: 8 -> 4 -> 2);
    on 28x28 this gives a 16x7x7 map before ``fc1`` (the 1998 original has 16x5x5).
    Other differences from the 1998 paper: ReLU instead of scaled tanh, max- instead of
    trainable average pooling, full C3 connectivity, linear output instead of RBF units.
    ``channels=[20, 50], hidden=[500], padding=0`` is Caffe's LeNet-5 (Han et al. 2015):
    28 -> 24 -> 12 -> 8 -> 4, a 50x4x4 map before ``fc1``.

    Args:
        num_classes: Number of output logits.
        input_shape: Input shape ``(C, H, W)``.
        channels: Maps of ``conv1`` and ``conv2``.
        hidden: Widths of the hidden fully connected layers (may be empty).
        padding: Zero padding of both convolutions, 0..2.

    Raises:
        ValueError: If an argument is out of range, or the input is too small for two
            5x5 convolutions and two poolings at this padding.
    """

    def __init__(
        self,
        num_classes: int,
        input_shape: tuple[int, int, int],
        channels: Sequence[int] = (6, 16),
        hidden: Sequence[int] = (120, 84),
        padding: int = 2,
    ) -> None:
        super().__init__()
        check_classifier(num_classes, input_shape)
        maps = positive_ints("channels", channels, length=2)
        widths = positive_ints("hidden", hidden)
        if isinstance(padding, bool) or padding not in (0, 1, 2):
            raise ValueError(f"padding must be 0, 1 or 2, got {padding!r}")
        in_channels, height, width = (int(s) for s in input_shape)

        def after_block(size: int) -> int:  # 5x5 convolution at this padding, then 2x2 floor pooling
            return (size + 2 * padding - 4) // 2

        out_h, out_w = after_block(after_block(height)), after_block(after_block(width))
        if out_h < 1 or out_w < 1:
            need = "H, W >= 4" if padding == 2 else f"larger inputs at padding={padding}"
            raise ValueError(f"LeNet5 needs {need} (two 5x5 convolutions, two 2x2 poolings), got input_shape={input_shape}")

        self.conv1 = nn.Conv2d(in_channels, maps[0], kernel_size=5, padding=padding)
        self.conv2 = nn.Conv2d(maps[0], maps[1], kernel_size=5, padding=padding)
        sizes = [maps[1] * out_h * out_w, *widths, num_classes]
        self._fc_names = [f"fc{i + 1}" for i in range(len(sizes) - 1)]
        for name, fan_in, fan_out in zip(self._fc_names, sizes, sizes[1:]):
            self.add_module(name, nn.Linear(fan_in, fan_out))

    def feature_info(self) -> FeatureInfo:
        """The two convolutions (ReLU applied functionally, so the post-activation spec is
        ``conv1:relu``), and the input of the last linear layer as the embedding."""
        stages = (FeatureStage("conv1", "conv1:relu", "conv1", self.conv1.out_channels, 1),
                  FeatureStage("conv2", "conv2:relu", "conv2", self.conv2.out_channels, 2))  # fmt: skip
        last = self._fc_names[-1]
        return FeatureInfo(stages, f"{last}:in", getattr(self, last).in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Computes logits.

        Args:
            x: Input batch of shape ``(B, C, H, W)``.

        Returns:
            Logits of shape ``(B, num_classes)``.
        """
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)  # (B, C1, H1, W1)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)  # (B, C2, H2, W2)
        x = torch.flatten(x, 1)  # (B, C2, H2, W2) -> (B, C2*H2*W2)
        *hidden, last = self._fc_names
        for name in hidden:  # looked up by name: pruning and factorisation may swap a layer
            x = F.relu(getattr(self, name)(x))
        return getattr(self, last)(x)
