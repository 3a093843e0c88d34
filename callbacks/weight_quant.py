"""Weights restricted to very few values while training: binary (``quantize=binary``, one bit:
sign times a scale) and logarithmic (``quantize=log``, signed powers of two).

- Binary (BinaryConnect, Courbariaux et al. 2015, with the scale of XNOR-Net's binary-weight
  networks, Rastegari et al. 2016): ``w_b = alpha * sign(w)``, ``alpha = mean |w|`` per output
  channel (or per layer), the scale that minimises ``||w - alpha * sign(w)||^2``; ``sign(0) = +1``
  so every weight is one of two values of its channel.
- Logarithmic (power-of-two, Miyashita, Lee & Murmann 2016; the seed survey's 3.2.4 "take the
  logarithm, then quantize linearly"): the exponent ``round(log2 |w|)`` is quantized on a unit
  grid whose top is ``round(log2 max |w|)`` (the full-scale range) and which holds ``2**(bits-1) - 1``
  exponents; with the sign bit and one code for zero that is ``bits`` bits per weight, and a
  weight below the smallest power divided by sqrt(2) falls to zero. Rounding is in the log domain, so the
  boundary between ``2**e`` and ``2**(e+1)`` is their geometric mean. Multiplying by such a
  weight is a shift, which is the point on hardware without multipliers.

Both train latent float weights through a straight-through estimator: the forward pass uses the
quantized weight, the gradient reaches the latent weight as if quantization were the identity.
The reparametrisation is torch's (``torch.nn.utils.parametrize``), registered in ``setup()``
before a checkpoint is restored, so resuming works; at the end it is removed with the quantized
values left in place, and the run's evaluation is that float model holding 2 or ``2**bits - 1``
values per channel: there are no integer kernels for these formats here (the run tags
``kd.quant_eval`` and the summary says so). ``quant/size_bytes_coded`` is what they would take:
``bits`` per weight plus a 32-bit scale per channel (binary) or one exponent offset per channel
(log), everything else at 32 bits.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pytorch_lightning as pl
import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from kd.compression.layers import select_layers
from callbacks.quantization import QuantizationCallback

SCHEMES = ("binary", "log")


def _reduce_dims(w: Tensor, per_channel: bool) -> tuple[int, ...]:
    return tuple(range(1, w.dim())) if per_channel else tuple(range(w.dim()))


def binarize(w: Tensor, per_channel: bool = True) -> Tensor:
    """``mean|w| * sign(w)`` per output channel (dim 0) or per tensor; ``sign(0) = +1``."""
    alpha = w.abs().mean(dim=_reduce_dims(w, per_channel), keepdim=True)
    return torch.where(w >= 0, alpha, -alpha)


def power_of_two(w: Tensor, bits: int, per_channel: bool = True) -> Tensor:
    """``sign(w) * 2**e`` with ``e = round(log2|w|)`` clipped to the ``2**(bits-1) - 1`` exponents
    up to the (rounded) full-scale exponent; a weight whose rounded exponent lies below them
    (``|w| < 2**bottom / sqrt(2)``) becomes 0."""
    top = torch.log2(w.abs().amax(dim=_reduce_dims(w, per_channel), keepdim=True).clamp_min(1e-30)).round()
    bottom = top - (2 ** (bits - 1) - 2)
    exponent = torch.log2(w.abs().clamp_min(1e-30)).round()
    q = torch.sign(w) * torch.exp2(torch.minimum(exponent, top))
    return torch.where(exponent < bottom, torch.zeros_like(w), q)


class _StraightThrough(nn.Module):
    """A parametrisation: the quantized weight forward, the identity's gradient backward."""

    def __init__(self, scheme: str, bits: int, per_channel: bool, active: bool) -> None:
        super().__init__()
        self.scheme, self.bits, self.per_channel = scheme, bits, per_channel
        self.active = active  # False before the callback's start epoch: float weights

    def forward(self, w: Tensor) -> Tensor:
        if not self.active:
            return w
        q = binarize(w, self.per_channel) if self.scheme == "binary" else power_of_two(w, self.bits, self.per_channel)
        return q.detach() + (w - w.detach())  # exactly q forward (w - w is 0); w's gradient backward


class WeightQuantization(QuantizationCallback):
    """Binary or power-of-two weights trained with a straight-through estimator (module docstring).

    Args:
        scheme: ``binary`` (1 bit, sign times the channel's mean magnitude) or ``log``.
        bits: bits per weight for ``log`` (2..8, sign and zero included); ``binary`` is 1.
        per_channel: one scale (binary) or full-scale exponent (log) per output channel, else
            one per layer.
        start: epoch from which the weights are quantized (float training before it: binary
            weights learn far better from a trained float model; on digits LeNet-5, 4 epochs
            from scratch reached 18-53% binary against 82% float, 2 binary epochs after those
            4 float ones 87%). Model selection only considers epochs from ``start`` on.
        layers, skip: fnmatch patterns of the conv/linear layers to quantize / leave in float.
            The first and last layers are often left in float (``skip: [conv1, fc3]``).
    """

    converts = False

    def __init__(self, scheme: str = "binary", bits: int = 1, per_channel: bool = True, start: int = 0,
                 layers: Sequence[str] | None = None, skip: Sequence[str] = ()) -> None:  # fmt: skip
        if scheme not in SCHEMES:
            raise ValueError(f"quantize.scheme must be one of {SCHEMES}, got {scheme!r}")
        if scheme == "binary" and bits != 1:
            raise ValueError(f"quantize.bits must be 1 for binary weights, got {bits}")
        if scheme == "log" and not 2 <= bits <= 8:
            raise ValueError(f"quantize.bits must lie in [2, 8] for log weights, got {bits}")
        if start < 0:
            raise ValueError(f"quantize.start must be >= 0, got {start}")
        self.scheme, self.bits, self.per_channel, self.backend, self.start = scheme, bits, per_channel, "none", start
        self.mode = scheme
        self.layers, self.skip = list(layers) if layers is not None else None, list(skip)
        self._targets: dict[str, nn.Module] = {}

    def recipe(self) -> dict[str, Any]:
        return {"mode": self.scheme, "bits": self.bits, "per_channel": self.per_channel}

    def describe(self) -> str:
        return "binary weights" if self.scheme == "binary" else f"log{self.bits} weights"

    def check_with(self, objective: Any, pruner: Any, model: nn.Module, input_shape: tuple[int, ...] | None = None) -> None:
        select_layers(model, self.layers, self.skip)  # patterns that match nothing fail now

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self._targets:
            return  # registered for fit already (test after fit, or a second setup)
        if stage == "fit" and self.start >= trainer.max_epochs:
            raise ValueError(f"quantize.start={self.start} but training has trainer.max_epochs={trainer.max_epochs}")
        self._targets = select_layers(pl_module.model, self.layers, self.skip)
        for module in self._targets.values():
            quantizer = _StraightThrough(self.scheme, self.bits, self.per_channel, active=self.start == 0)
            parametrize.register_parametrization(module, "weight", quantizer)

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        for module in self._targets.values():  # from the epoch, so a resumed run sets it too
            module.parametrizations.weight[0].active = trainer.current_epoch >= self.start

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.current_epoch < self.start:
            return
        with torch.no_grad():  # the most distinct values any channel holds: 2 for binary, <= 2**bits - 1 for log
            levels = max(int(torch.unique(row).numel()) for m in self._targets.values() for row in m.weight.flatten(1))
        pl_module.log("quant/max_levels_per_channel", float(levels), on_step=False, on_epoch=True)

    def coded_bytes(self, model: nn.Module) -> float:
        """``bits`` per quantized weight plus 4 bytes per scale (binary) or 1 byte per full-scale
        exponent (log), per channel or per layer; every other parameter at 32 bits."""
        coded, quantized = 0.0, set()
        for module in self._targets.values():
            weight = module.weight
            quantized.add(id(weight))
            groups = weight.shape[0] if self.per_channel else 1
            coded += weight.numel() * self.bits / 8 + groups * (4 if self.scheme == "binary" else 1)
        return coded + sum(4 * p.numel() for p in model.parameters() if id(p) not in quantized)

    def convert(self, model: nn.Module, data: Any) -> nn.Module:
        for module in self._targets.values():
            if parametrize.is_parametrized(module, "weight"):
                parametrize.remove_parametrizations(module, "weight", leave_parametrized=True)
        return model
