"""LeNet-5 convolutional network.

Reference:
    LeCun, Bottou, Bengio & Haffner (1998). Gradient-based learning applied to
    document recognition. Proc. IEEE.
"""

import torch
from torch import nn
from torch.nn import functional as F


class LeNet5(nn.Module):
    """LeNet-5, modern ReLU + max-pool variant.

    ``conv1`` (6 maps, 5x5) -> ReLU -> 2x2 max-pool -> ``conv2`` (16 maps, 5x5) ->
    ReLU -> 2x2 max-pool -> ``fc1`` (120) -> ``fc2`` (84) -> ``fc3`` (classes).

    Differences from the 1998 paper: ReLU instead of scaled tanh, max- instead of
    trainable average pooling, full C3 connectivity, linear output instead of RBF
    units, and ``padding=2`` on *both* convolutions so that the net also runs on
    8x8 inputs (sklearn digits: 8 -> 4 -> 2). For 28x28 MNIST this gives a
    16x7x7 feature map before ``fc1`` (the original has 16x5x5).

    Args:
        num_classes: Number of output logits.
        input_shape: Input shape ``(C, H, W)``; needs ``H, W >= 4``.

    Raises:
        ValueError: If an argument is out of range.
    """

    def __init__(self, num_classes: int, input_shape: tuple[int, int, int]) -> None:
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        if len(input_shape) != 3 or min(input_shape) < 1:
            raise ValueError(f"input_shape must be (C, H, W) with positive entries, got {input_shape}")
        channels, height, width = (int(s) for s in input_shape)
        if height < 4 or width < 4:
            raise ValueError(f"LeNet5 needs H, W >= 4 (two 2x2 poolings), got input_shape={input_shape}")

        self.conv1 = nn.Conv2d(channels, 6, kernel_size=5, padding=2)
        self.conv2 = nn.Conv2d(6, 16, kernel_size=5, padding=2)
        # 'same' convolutions; each floor-mode 2x2 pooling halves H and W.
        flat = 16 * (height // 4) * (width // 4)
        self.fc1 = nn.Linear(flat, 120)
        self.fc2 = nn.Linear(120, 84)
        self.fc3 = nn.Linear(84, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Computes logits.

        Args:
            x: Input batch of shape ``(B, C, H, W)``.

        Returns:
            Logits of shape ``(B, num_classes)``.
        """
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)  # (B, 6, H/2, W/2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)  # (B, 16, H/4, W/4)
        x = torch.flatten(x, 1)  # (B, 16, H/4, W/4) -> (B, 16*(H/4)*(W/4))
        x = F.relu(self.fc1(x))
        x = F.relu(self.fc2(x))
        return self.fc3(x)
