"""Slimmable students (Yu et al., ICLR 2019; Yu & Huang, ICCV 2019): one set of weights that runs
at several widths.

``Slimmable(backbone, widths)`` replaces the backbone's convolutions and linear layers, in place,
by slimmable ones: at width ``w`` a layer with ``C`` output channels uses its first
``floor(w * C)`` filters and as many input channels as the input it receives (the previous layer's
active ones; a flattened feature map keeps its leading channels first, so a linear layer after a
flatten slices alike). The layer that produces the logits keeps all its outputs. Each BatchNorm
becomes a switchable one: its own statistics and affine parameters per width (``bns.<i>``), as
the paper prescribes, since a narrower network's activations have other statistics. Depthwise
convolutions slice their groups with their channels; other grouped convolutions are refused.

:meth:`Slimmable.set_width` chooses the width the next forwards run at; :meth:`materialize` returns
a plain copy of the backbone at one width, its channels physically removed (Torch-Pruning, as
structured pruning does) and that width's BatchNorm statistics in place, with the channels it
removed in the form ``student.pt`` records them (``kd.compression.thinning.PRUNED_KEY``), so the
file of one width loads into the architecture of the config.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kd.compression.thinning import remove_channels


class _Width:
    """The width the slimmable layers of one network run at (one object shared by its layers)."""

    def __init__(self, widths: Sequence[float]) -> None:
        self.widths = list(widths)
        self.index = len(widths) - 1

    @property
    def value(self) -> float:
        return self.widths[self.index]


def active(channels: int, width: float) -> int:
    """The channels a layer of ``channels`` keeps at ``width`` (at least one is checked for)."""
    return int(math.floor(width * channels + 1e-9))


class SlimmableLinear(nn.Linear):
    def forward(self, x: Tensor) -> Tensor:
        out = self.out_features if self.keep_outputs else active(self.out_features, self.state.value)
        return F.linear(x, self.weight[:out, : x.shape[-1]], None if self.bias is None else self.bias[:out])


class SlimmableConv2d(nn.Conv2d):
    def forward(self, x: Tensor) -> Tensor:
        depthwise = self.groups > 1
        out = x.shape[1] if depthwise else (self.out_channels if self.keep_outputs else active(self.out_channels, self.state.value))
        weight = self.weight[:out] if depthwise else self.weight[:out, : x.shape[1]]
        bias = None if self.bias is None else self.bias[:out]
        return F.conv2d(x, weight, bias, self.stride, self.padding, self.dilation, x.shape[1] if depthwise else 1)


class SwitchableBatchNorm(nn.Module):
    """One BatchNorm per width, each over that width's channels."""

    def __init__(self, bn: nn.modules.batchnorm._BatchNorm, state: _Width) -> None:
        super().__init__()
        self.state = state
        self.num_features = bn.num_features
        self.bns = nn.ModuleList()
        for w in state.widths:
            norm = type(bn)(active(bn.num_features, w), bn.eps, bn.momentum, bn.affine, bn.track_running_stats)
            if bn.affine:  # every width starts from the wrapped layer's parameters
                with torch.no_grad():
                    norm.weight.copy_(bn.weight[: norm.num_features])
                    norm.bias.copy_(bn.bias[: norm.num_features])
            self.bns.append(norm.to(bn.weight.device if bn.affine else "cpu"))

    def forward(self, x: Tensor) -> Tensor:
        return self.bns[self.state.index](x)


def check_widths(widths: Sequence[float]) -> list[float]:
    values = list(widths)
    if not values or any(isinstance(w, bool) or not isinstance(w, (int, float)) for w in values):
        raise ValueError(f"student.widths must be a list of numbers in (0, 1], got {values!r}")
    values = [float(w) for w in values]
    if any(not 0 < w <= 1 for w in values):
        raise ValueError(f"student.widths must lie in (0, 1], got {values}")
    if values != sorted(set(values)):
        raise ValueError(f"student.widths must be distinct and increasing, got {values}")
    if len(values) < 2:
        raise ValueError(f"student.widths needs at least two widths, got {values}")
    return values


class Slimmable(nn.Module):
    """``backbone`` runnable at each of ``widths`` (see the module docstring).

    Args:
        backbone: the student; its layers are replaced in place.
        widths: increasing fractions in (0, 1]; the widest should be 1 (the full student).
        num_classes, input_shape: as the zoo's models take them (the logits' layer is found,
            and every width checked, by a dry forward).
        random_widths, inplace_distill, narrow_objective: how it trains (``kd.losses.slimmable``).
    """

    def __init__(self, backbone: nn.Module, widths: Sequence[float], num_classes: int, input_shape: tuple[int, ...],
                 random_widths: int = 2, inplace_distill: bool = True, narrow_objective: bool = False) -> None:  # fmt: skip
        super().__init__()
        self.widths = check_widths(widths)
        if isinstance(random_widths, bool) or not isinstance(random_widths, int) or random_widths < 0:
            raise ValueError(f"student.random_widths must be an integer >= 0, got {random_widths!r}")
        for key, value in (("inplace_distill", inplace_distill), ("narrow_objective", narrow_objective)):
            if not isinstance(value, bool):
                raise ValueError(f"student.{key} must be true or false, got {value!r}")
        # how it trains (kd.losses.slimmable): the sandwich's random widths, in-place distillation, the objective on narrow widths
        self.random_widths, self.inplace_distill, self.narrow_objective = random_widths, inplace_distill, narrow_objective
        self.state = _Width(self.widths)
        self.input_shape = tuple(input_shape)
        layers = [(n, m) for n, m in backbone.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
        if not layers:
            raise ValueError(f"{type(backbone).__name__} has no convolution or linear layer to slim")
        self.logits_layer = layers[-1][0]  # the last layer in definition order makes the logits (checked below)
        for name, m in layers:
            if isinstance(m, nn.Conv2d) and m.groups > 1 and not (m.groups == m.in_channels == m.out_channels):
                raise ValueError(f"student=slimmable: {name} is a grouped convolution ({m.groups} groups), which cannot be slimmed")
            thin = [w for w in self.widths if active(m.out_channels if isinstance(m, nn.Conv2d) else m.out_features, w) < 1]
            if thin and name != self.logits_layer:
                raise ValueError(f"student.widths {thin} leave {name} with no channels "
                                 f"(floor(width x {m.out_channels if isinstance(m, nn.Conv2d) else m.out_features}) = 0)")  # fmt: skip
        self.slimmed = [n for n, _ in layers]
        modules = dict(backbone.named_modules())
        for name, m in layers:
            m.__class__ = SlimmableConv2d if isinstance(m, nn.Conv2d) else SlimmableLinear
            m.state, m.keep_outputs = self.state, name == self.logits_layer
        for name, m in list(modules.items()):
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                parent, _, attr = name.rpartition(".")
                setattr(modules[parent] if parent else backbone, attr, SwitchableBatchNorm(m, self.state))
        self.backbone = backbone
        device = next(backbone.parameters()).device
        was = backbone.training
        backbone.eval()
        with torch.no_grad():
            for w in self.widths:
                self.set_width(w)
                try:
                    out = backbone(torch.zeros(2, *input_shape, device=device))
                except RuntimeError as err:
                    raise ValueError(f"student=slimmable: {type(backbone).__name__} does not run at width {w} ({err}); its "
                                     "layers must take the channels the previous one gives (sequential or residual nets)") from err  # fmt: skip
                if tuple(out.shape) != (2, num_classes):
                    raise ValueError(f"student=slimmable: the last layer {self.logits_layer} does not make the logits")
        backbone.train(was)
        self.set_width(self.widths[-1])

    @property
    def width(self) -> float:
        return self.state.value

    def set_width(self, width: float) -> None:
        if width not in self.widths:
            raise ValueError(f"width {width} is not one of {self.widths}")
        self.state.index = self.widths.index(width)

    def forward(self, x: Tensor) -> Tensor:
        return self.backbone(x)

    def sandwich(self, random: int, generator: torch.Generator | None = None) -> list[float]:
        """The widths of one training step: the widest, the narrowest and ``random`` others drawn
        from those between (without repeats, as many as there are)."""
        middle = self.widths[1:-1]
        take = min(random, len(middle))
        picked = torch.randperm(len(middle), generator=generator)[:take].tolist() if take else []
        return [self.widths[-1], self.widths[0], *(middle[i] for i in sorted(picked))]

    def materialize(self, width: float) -> tuple[nn.Module, dict[str, list[int]]]:
        """A plain copy of the backbone at ``width`` and the channels removed per layer."""
        index = self.widths.index(width)
        plain = copy.deepcopy(self.backbone)
        modules = dict(plain.named_modules())
        for name, m in modules.items():
            if isinstance(m, (SlimmableConv2d, SlimmableLinear)):
                m.__class__ = nn.Conv2d if isinstance(m, SlimmableConv2d) else nn.Linear
                del m.state, m.keep_outputs
            elif isinstance(m, SwitchableBatchNorm):  # full-size BatchNorm holding this width's statistics first
                source = m.bns[index]
                bn = type(source)(m.num_features, source.eps, source.momentum, source.affine, source.track_running_stats)
                c = source.num_features
                with torch.no_grad():
                    for key in ("weight", "bias", "running_mean", "running_var"):
                        if getattr(source, key, None) is not None:
                            getattr(bn, key)[:c] = getattr(source, key)
                    if source.num_batches_tracked is not None:
                        bn.num_batches_tracked.copy_(source.num_batches_tracked)
                parent, _, attr = name.rpartition(".")
                setattr(modules[parent] if parent else plain, attr, bn.to(source.running_mean.device if source.track_running_stats else "cpu"))
        plain = plain.cpu()
        removed: dict[str, list[int]] = {}
        for name in self.slimmed:
            if name == self.logits_layer:
                continue
            layer = dict(plain.named_modules())[name]
            full = self._full(name)
            now = layer.out_channels if isinstance(layer, nn.Conv2d) else layer.out_features
            keep = active(full, width)
            if now > keep:  # not already thinned with a coupled layer (residual connections, depthwise pairs)
                drop = list(range(keep, now))
                remove_channels(plain, {name: drop}, self.input_shape)
                removed[name] = drop
        return plain, removed

    def _full(self, name: str) -> int:
        m = dict(self.backbone.named_modules())[name]
        return m.out_channels if isinstance(m, nn.Conv2d) else m.out_features
