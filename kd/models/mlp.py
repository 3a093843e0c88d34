"""Multi-layer perceptron (fully connected) classifiers.

References:
    LeCun, Bottou, Bengio & Haffner (1998). Gradient-based learning applied to
    document recognition. Proc. IEEE. (LeNet-300-100 is ``MLP(hidden=[300, 100])``.)
    Han, Pool, Tran & Dally (2015). Learning both weights and connections for
    efficient neural networks. NeurIPS. (Uses LeNet-300-100 as a pruning benchmark.)
"""

from collections.abc import Sequence
from math import prod

import torch
from torch import nn

from kd.models.features import FeatureInfo, FeatureStage
from kd.models.arguments import check_classifier, positive_ints


class MLP(nn.Module):
    """Fully connected ReLU network on the flattened input.

    Each hidden layer is ``Linear -> ReLU -> Dropout`` (dropout omitted when 0),
    followed by a linear ``head``. With ``hidden=[]`` the model is multinomial
    logistic regression (a single linear layer).

    Submodules for feature hooks: ``layers`` (``nn.Sequential``; hidden layer ``i``
    occupies a ``Linear``/``ReLU``[/``Dropout``] group) and ``head``.

    Args:
        num_classes: Number of output logits.
        input_shape: Input shape ``(C, H, W)``; the input is flattened to ``C*H*W``.
        hidden: Widths of the hidden layers, e.g. ``[300, 100]`` for LeNet-300-100.
            May be empty.
        dropout: Dropout probability after every hidden ReLU, in ``[0, 1)``.

    Raises:
        ValueError: If an argument is out of range.
    """

    def __init__(
        self,
        num_classes: int,
        input_shape: tuple[int, int, int],
        hidden: Sequence[int],
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        check_classifier(num_classes, input_shape)
        widths = positive_ints("hidden", hidden)
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")

        self.input_shape = tuple(int(s) for s in input_shape)
        self.hidden = widths
        in_features = prod(self.input_shape)
        layers: list[nn.Module] = []
        for width in self.hidden:
            layers += [nn.Linear(in_features, width), nn.ReLU(inplace=True)]
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
            in_features = width
        self.layers = nn.Sequential(*layers)
        self.head = nn.Linear(in_features, num_classes)

    def feature_info(self) -> FeatureInfo:
        """One stage per hidden layer (post-activation: its ReLU; pre: its Linear), vectors
        ``(B, width)``; the embedding is the input of ``head``."""
        stages, linear = [], None
        for i, layer in enumerate(self.layers):
            if isinstance(layer, nn.Linear):
                linear = i
            elif isinstance(layer, nn.ReLU):
                width = self.layers[linear].out_features
                stages.append(FeatureStage(f"hidden{len(stages) + 1}", f"layers.{i}", f"layers.{linear}", width, 1))
        return FeatureInfo(tuple(stages), "head:in", self.head.in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Computes logits.

        Args:
            x: Input batch of shape ``(B, C, H, W)``.

        Returns:
            Logits of shape ``(B, num_classes)``.
        """
        x = torch.flatten(x, 1)  # (B, C, H, W) -> (B, C*H*W)
        return self.head(self.layers(x))
