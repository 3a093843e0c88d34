"""Classifier architectures (plain ``torch.nn.Module``s).

Every model takes ``num_classes`` and ``input_shape`` (C, H, W) as its first two
keyword arguments, followed by architecture arguments, and returns logits of
shape ``(B, num_classes)``. Hydra configs in ``conf/model/`` name the classes
directly via ``_target_`` (with ``_partial_: true``).
"""

from kd.models.lenet import LeNet5
from kd.models.mlp import MLP
from kd.models.mobilenet import MobileNetLite
from kd.models.resnet_cifar import CIFARResNet
from kd.models.wrn import WideResNet

__all__ = ["MLP", "LeNet5", "MobileNetLite", "CIFARResNet", "WideResNet"]
