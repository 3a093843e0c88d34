"""The FX graph-mode flow behind the quantization callbacks (torch's deprecated path, kept for what
PT2E cannot do yet: ``callbacks/quant_engine.py``): QConfigs, prepare / calibrate / convert, QAT
preparation, observer switches and BatchNorm freezing, reloading a saved int8 model. The PT2E
flow, ``callbacks/pt2e_quant.py``, has the same functions."""

from __future__ import annotations

import copy
import functools
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.ao.quantization import QConfig, QConfigMapping, get_default_qat_qconfig_mapping, get_default_qconfig_mapping
from torch.ao.quantization import fake_quantize as fq
from torch.ao.quantization import observer as obs

from callbacks.observers import EntropyObserver, PercentileObserver
from kd.tracking.measure import int8_ops

OBSERVERS = {
    "minmax": obs.MinMaxObserver,
    "moving_average": obs.MovingAverageMinMaxObserver,
    "histogram": obs.HistogramObserver,  # the clipping range minimising the L2 (MSE) error
    "percentile": PercentileObserver,
    "entropy": EntropyObserver,  # KL divergence, TensorRT's calibrator
}
enable_observer = torch.ao.quantization.enable_observer  # model.apply(...) switches
disable_observer = torch.ao.quantization.disable_observer


@functools.cache
def has_vnni() -> bool:
    """Whether this x86 CPU has VNNI (``avx512_vnni``, ``avx_vnni`` or AMX), whose int8 dot products
    accumulate in 32 bits. Without it fbgemm's u8 x s8 pairs add up in 16 bits and saturate on
    full-range activations, and the int8 model disagrees with its fake-quant model on a few
    percent of predictions (docs/quantization.md has the measurements); qnnpack does not
    saturate. Unknown (not Linux): no."""
    try:
        flags = set(Path("/proc/cpuinfo").read_text().split())
    except OSError:
        return False
    return bool(flags & {"avx512_vnni", "avx_vnni", "amx_int8"})


def _fx():  # imported lazily: the module emits deprecation warnings at import
    from torch.ao.quantization import quantize_fx

    return quantize_fx


def qconfig_mapping(observer: str, per_channel: bool, backend: str, qat: bool, bits: int = 8,
                    activation_bits: int | None = None, layer_bits: dict[str, int] | None = None) -> QConfigMapping:  # fmt: skip
    """The backend's default mapping (fixed-range ops keep their settings) with our global QConfig;
    ``bits`` < 8 narrows the weights' integer range, ``activation_bits`` (default: ``bits``) the
    activations' (fake-quant only: simulated low-bit training); ``layer_bits`` (mixed precision:
    module name -> weight bits) overrides the weights' width layer by layer."""
    act_max = 2 ** (activation_bits or bits) - 1  # full-range activations on every backend: see the module docstring

    def weight(width: int) -> Any:
        w_min, w_max = -(2 ** (width - 1)), 2 ** (width - 1) - 1
        scheme = torch.per_channel_symmetric if per_channel else torch.per_tensor_symmetric
        args = dict(dtype=torch.qint8, qscheme=scheme, quant_min=w_min, quant_max=w_max)
        if qat:
            w_observer = obs.MovingAveragePerChannelMinMaxObserver if per_channel else obs.MovingAverageMinMaxObserver
            return fq.FakeQuantize.with_args(observer=w_observer, **args)
        return (obs.PerChannelMinMaxObserver if per_channel else obs.MinMaxObserver).with_args(**args)

    if qat:
        activation = fq.FakeQuantize.with_args(observer=obs.MovingAverageMinMaxObserver, dtype=torch.quint8, quant_min=0, quant_max=act_max)
        base = get_default_qat_qconfig_mapping(backend)
    else:
        activation = OBSERVERS[observer].with_args(dtype=torch.quint8, quant_min=0, quant_max=act_max)
        base = get_default_qconfig_mapping(backend)
    mapping = base.set_global(QConfig(activation=activation, weight=weight(bits)))
    for name, width in (layer_bits or {}).items():
        mapping.set_module_name(name, QConfig(activation=activation, weight=weight(width)))
    return mapping


def quantize_model(model: nn.Module, recipe: dict[str, Any], batches: list[torch.Tensor]) -> nn.Module:
    """An int8 copy of ``model`` (float, or prepared for QAT when ``recipe["mode"] == "qat"``),
    on the CPU; static modes are observed on ``batches`` first."""
    torch.backends.quantized.engine = recipe["backend"]
    fx = _fx()
    model = copy.deepcopy(model).cpu().eval()
    with int8_ops():
        if recipe["mode"] == "dynamic":
            return torch.ao.quantization.quantize_dynamic(model, {nn.Linear}, dtype=torch.qint8)
        if recipe["mode"] != "qat":
            mapping = qconfig_mapping(recipe["observer"], recipe["per_channel"], recipe["backend"], qat=False)
            model = fx.prepare_fx(model, mapping, example_inputs=(batches[0][:1].cpu(),))
            with torch.no_grad():
                for x in batches:
                    model(x.cpu())
        return fx.convert_fx(model)


def prepare_for_qat(model: nn.Module, recipe: dict[str, Any], example: torch.Tensor) -> nn.Module:
    torch.backends.quantized.engine = recipe["backend"]
    bits = recipe.get("bits", 8)
    mapping = qconfig_mapping("moving_average", recipe["per_channel"], recipe["backend"], qat=True, bits=bits,
                              activation_bits=recipe.get("activation_bits", bits), layer_bits=recipe.get("layer_bits"))  # fmt: skip
    return _fx().prepare_qat_fx(model.train(), mapping, example_inputs=(example,))


def freeze_bn(model: nn.Module) -> None:
    """BatchNorm of the fused QAT modules uses its running statistics from now on."""
    model.apply(torch.ao.nn.intrinsic.qat.freeze_bn_stats)


def load_quantized(model: nn.Module, saved: dict[str, Any], recipe: dict[str, Any], input_shape: tuple[int, ...]) -> nn.Module:
    """Rebuild a saved int8 model: ``model`` is the float architecture, already reshaped as the
    saved one was (``quant_engine.load_quantized`` reads the file)."""
    example = torch.zeros(2, *input_shape)
    if recipe["mode"] == "qat":
        model = prepare_for_qat(model, recipe, example[:1])
        with torch.no_grad():
            model(example)  # give the fake-quant observers a range; the saved one replaces it
    quantized = quantize_model(model, recipe, [example])
    with int8_ops():
        quantized.load_state_dict(saved["state_dict"])
    return quantized
