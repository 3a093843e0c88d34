"""The PT2E flow behind the quantization callbacks (torchao's ``torchao.quantization.pt2e``, the
successor of torch's FX graph mode): capture, the quantizer and its configuration from kd's recipe,
prepare / calibrate / convert, QAT preparation with train/eval and BatchNorm freezing, reloading a
saved int8 model, and the Inductor lowering that runs it with int8 kernels.

How it differs from the FX flow (``callbacks/fx_quant.py``), and what kd does about it:

- The model is captured by ``torch.export`` with a dynamic batch dimension (a graph specialised to
  the example's batch refuses every other size). The captured graph has no submodules: layers are
  gone, parameters keep their names. What needs modules (forward hooks for feature distillation,
  pruning masks registered on layers) stays on the FX flow (``callbacks/quant_engine.py``).
- The converted model is a reference graph: float ops between quantize/dequantize pairs, which in
  eager mode compute what the int8 kernels compute, slowly. It runs int8 kernels once lowered by
  Inductor with freezing on (:func:`lowered`); kd measures its latency that way, beside the float
  model compiled the same way.
- ``convert_pt2e`` leaves the float weights behind as unused attributes: :func:`strip_unused`
  drops them, so the saved file and the size kd reports hold only what the graph uses.
- ``.train()`` / ``.eval()`` raise on a captured graph; :func:`allow_train_eval` gives it both
  (torchao rewrites the dropout and BatchNorm patterns) and keeps BatchNorm frozen once QAT froze it.

Imported only when a run quantizes with PT2E: torchao takes about 2.5 s to import.
"""

from __future__ import annotations

import copy
import logging
import types
import warnings
from typing import Any

import torch
from torch import nn


class _KnownLogLine(logging.Filter):
    """torchao registers an Enum with torch's pytree at import, which torch 2.14 logs as deprecated."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "is an Enum subclass" not in record.getMessage()


logging.getLogger("torch.utils._pytree").addFilter(_KnownLogLine())

from torchao.quantization.pt2e import (
    FusedMovingAvgObsFakeQuantize,
    HistogramObserver,
    MinMaxObserver,
    MovingAverageMinMaxObserver,
    MovingAveragePerChannelMinMaxObserver,
    PerChannelMinMaxObserver,
    disable_observer,
    enable_observer,
    move_exported_model_to_eval,
    move_exported_model_to_train,
)
from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e, prepare_qat_pt2e
from torchao.quantization.pt2e.quantizer import QuantizationConfig, QuantizationSpec
from torchao.quantization.pt2e.quantizer.x86_inductor_quantizer import (
    X86InductorQuantizer,
    get_default_x86_inductor_quantization_config,
)

from callbacks.observers import _Entropy, _Percentile

__all__ = ["Lowered", "allow_train_eval", "capture", "disable_observer", "enable_observer", "freeze_bn", "load_quantized",
           "lowered", "prepare_for_qat", "quantize_model", "strip_unused"]

EPS = 2**-12  # the smallest scale, as torchao's own configurations


class Pt2ePercentileObserver(_Percentile, HistogramObserver):
    """The percentile clipping range (``callbacks/observers.py``), for the PT2E flow."""


class Pt2eEntropyObserver(_Entropy, HistogramObserver):
    """The KL-divergence (TensorRT) clipping range (``callbacks/observers.py``), for the PT2E flow."""


OBSERVERS = {
    "minmax": MinMaxObserver,
    "moving_average": MovingAverageMinMaxObserver,
    "histogram": HistogramObserver,
    "percentile": Pt2ePercentileObserver,
    "entropy": Pt2eEntropyObserver,
}


def capture(model: nn.Module, example: torch.Tensor) -> torch.fx.GraphModule:
    """``torch.export`` of ``model`` with the batch dimension dynamic (``example`` has >= 2 rows:
    torch specialises a dimension of size 1)."""
    if example.shape[0] < 2:
        example = torch.cat([example, example])
    batch = torch.export.Dim("batch")
    return torch.export.export(model, (example,), dynamic_shapes=({0: batch},)).module()


def quantization_config(recipe: dict[str, Any], qat: bool) -> QuantizationConfig:
    """The quantizer's configuration from kd's recipe: the range estimator (PTQ), per-channel or
    per-tensor weights, the weight and activation widths (``bits``, ``activation_bits``; int8
    storage, narrowed integer range), fake quantization with moving-average ranges for QAT."""
    xnnpack = recipe["backend"] == "xnnpack"
    bits = recipe.get("bits", 8)
    act_bits = recipe.get("activation_bits", bits)
    if recipe["mode"] == "dynamic":
        if xnnpack:
            from torchao.testing.pt2e._xnnpack_quantizer import get_symmetric_quantization_config

            return get_symmetric_quantization_config(is_per_channel=recipe["per_channel"], is_dynamic=True)
        return get_default_x86_inductor_quantization_config(is_dynamic=True)
    # activations: x86 takes unsigned 8 bits (after ReLU), XNNPACK signed
    act_range = (-(2 ** (act_bits - 1)), 2 ** (act_bits - 1) - 1) if xnnpack else (0, 2**act_bits - 1)
    w_max = 2 ** (bits - 1) - 1
    w_range = (-w_max if xnnpack else -w_max - 1, w_max)  # XNNPACK wants symmetric weights
    per_channel = recipe["per_channel"]
    if qat:
        act_ctr = FusedMovingAvgObsFakeQuantize.with_args(observer=MovingAverageMinMaxObserver, eps=EPS)
        w_observer = MovingAveragePerChannelMinMaxObserver if per_channel else MovingAverageMinMaxObserver
        w_ctr = FusedMovingAvgObsFakeQuantize.with_args(observer=w_observer, eps=EPS)
    else:
        act_ctr = OBSERVERS[recipe["observer"]].with_args(eps=EPS)
        w_ctr = (PerChannelMinMaxObserver if per_channel else MinMaxObserver).with_args(eps=EPS)
    activation = QuantizationSpec(
        dtype=torch.int8 if xnnpack else torch.uint8, quant_min=act_range[0], quant_max=act_range[1],
        qscheme=torch.per_tensor_affine, observer_or_fake_quant_ctr=act_ctr,
    )  # fmt: skip
    weight = QuantizationSpec(
        dtype=torch.int8, quant_min=w_range[0], quant_max=w_range[1],
        qscheme=torch.per_channel_symmetric if per_channel else torch.per_tensor_symmetric,
        ch_axis=0 if per_channel else None, observer_or_fake_quant_ctr=w_ctr,
    )  # fmt: skip
    return QuantizationConfig(input_activation=activation, output_activation=activation, weight=weight, bias=None, is_qat=qat)


def quantizer(recipe: dict[str, Any], qat: bool):
    """The backend's quantizer with kd's configuration; ``recipe["layer_bits"]`` (mixed precision:
    module name -> weight bits) overrides the weights' width layer by layer."""
    config = quantization_config(recipe, qat)
    layers = {name: quantization_config(recipe | {"bits": bits}, qat) for name, bits in recipe.get("layer_bits", {}).items()}
    if recipe["backend"] == "xnnpack":
        from torchao.testing.pt2e._xnnpack_quantizer import XNNPACKQuantizer  # torchao keeps it for tests; ExecuTorch has its own

        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="XNNPACKQuantizer is deprecated")
            chosen = XNNPACKQuantizer().set_global(config)
        for name, layer in layers.items():
            chosen.set_module_name(name, layer)
        return chosen
    chosen = X86InductorQuantizer().set_global(config)
    for name, layer in layers.items():
        chosen.set_module_name_qconfig(name, layer)
    return chosen


def _quiet(call, *args):
    """torchao's x86 quantizer warns about every max-pool it leaves in float (by design)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The input of maxpool2d is not quantized")
        return call(*args)


def quantize_model(model: nn.Module, recipe: dict[str, Any], batches: list[torch.Tensor]) -> nn.Module:
    """The int8 (reference) graph of ``model``, on the CPU: a float model is captured, prepared,
    observed on ``batches`` and converted; a model prepared for QAT (``recipe["mode"] == "qat"``)
    is converted as it is (a copy)."""
    if recipe["mode"] == "qat":
        prepared = copy.deepcopy(model).cpu()
        move_exported_model_to_eval(prepared)
    else:
        graph = capture(copy.deepcopy(model).cpu().eval(), batches[0][:2].cpu())
        prepared = _quiet(prepare_pt2e, graph, quantizer(recipe, qat=False))
        with torch.no_grad():
            for x in batches:
                prepared(x.cpu())
    converted = _quiet(convert_pt2e, prepared)
    strip_unused(converted)
    converted.register_buffer(QPARAMS, activation_qparams(converted))  # saved with the weights: see load_quantized
    return allow_train_eval(converted)


QPARAMS = "kd_activation_qparams"
_PER_TENSOR = ("quantized_decomposed.quantize_per_tensor.default", "quantized_decomposed.dequantize_per_tensor.default")


def _per_tensor_nodes(graph: torch.fx.GraphModule) -> list[torch.fx.Node]:
    return [n for n in graph.graph.nodes if n.op == "call_function" and str(n.target) in _PER_TENSOR]


def activation_qparams(graph: torch.fx.GraphModule) -> torch.Tensor:
    """``(scale, zero_point)`` of every per-tensor quantize/dequantize node, in graph order: the
    activations' ranges, which ``convert_pt2e`` writes into the graph as constants, not tensors."""
    rows = [[float(n.args[1]), float(n.args[2])] for n in _per_tensor_nodes(graph)]
    return torch.tensor(rows, dtype=torch.float64).reshape(-1, 2)


def set_activation_qparams(graph: torch.fx.GraphModule, qparams: torch.Tensor) -> None:
    nodes = _per_tensor_nodes(graph)
    if len(nodes) != len(qparams):
        raise ValueError(f"the saved int8 model has {len(qparams)} activation ranges but this architecture's graph has {len(nodes)}: "
                         "was it saved from another model?")  # fmt: skip
    for node, (scale, zero_point) in zip(nodes, qparams.tolist()):
        node.args = (node.args[0], scale, int(zero_point), *node.args[3:])
    graph.recompile()


def prepare_for_qat(model: nn.Module, recipe: dict[str, Any], example: torch.Tensor) -> nn.Module:
    """The fake-quant training graph of ``model`` (in training mode, on its device), with
    ``.train()`` and ``.eval()`` that work."""
    graph = capture(model.train(), example)
    return allow_train_eval(_quiet(prepare_qat_pt2e, graph, quantizer(recipe, qat=True)))


_BATCH_NORM = ("aten.batch_norm.default", "aten._native_batch_norm_legit.default", "aten.cudnn_batch_norm.default")


def _freeze_bn_nodes(graph: torch.fx.GraphModule) -> None:
    changed = False
    for node in graph.graph.nodes:
        if str(node.target) in _BATCH_NORM and node.args[5] is not False:
            node.args = (*node.args[:5], False, *node.args[6:])  # training=False: running statistics, not updated
            changed = True
    if changed:
        graph.recompile()


def freeze_bn(graph: torch.fx.GraphModule) -> None:
    """BatchNorm from now on uses its running statistics and stops updating them, in training
    too (the PT2E counterpart of ``freeze_bn_stats``); kept through later ``.train()`` calls."""
    graph._kd_bn_frozen = True
    _freeze_bn_nodes(graph)


def allow_train_eval(graph: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """Give a captured graph ``.train(mode)`` and ``.eval()``: torchao's rewrites of its dropout and
    BatchNorm patterns, BatchNorm kept frozen after :func:`freeze_bn`, and the ``training`` flags
    of the graph and its (fake-quant) submodules set as ``nn.Module.train`` sets them."""

    def train(self: torch.fx.GraphModule, mode: bool = True) -> torch.fx.GraphModule:
        (move_exported_model_to_train if mode else move_exported_model_to_eval)(self)
        if mode and getattr(self, "_kd_bn_frozen", False):
            _freeze_bn_nodes(self)
        return nn.Module.train(self, mode)

    graph.train = types.MethodType(train, graph)
    graph.eval = types.MethodType(lambda self: self.train(False), graph)
    return graph


def strip_unused(graph: torch.fx.GraphModule) -> None:
    """Drop the parameters and buffers the graph no longer reads (``convert_pt2e`` leaves the float
    weights beside their int8 copies)."""
    used = {str(node.target) for node in graph.graph.nodes if node.op == "get_attr"}
    for name in [n for n, _ in graph.named_parameters()] + [n for n, _ in graph.named_buffers()]:
        if name not in used:
            owner, _, attr = name.rpartition(".")
            module = graph.get_submodule(owner) if owner else graph
            module._parameters.pop(attr, None)
            module._buffers.pop(attr, None)


def load_quantized(model: nn.Module, saved: dict[str, Any], recipe: dict[str, Any], input_shape: tuple[int, ...]) -> nn.Module:
    """Rebuild a saved int8 graph: ``model`` is the float architecture (already reshaped as the
    saved one was); it is captured and converted the way the run did it, on zeros, and the saved
    int8 state (weights, their scales, the activations' ranges) replaces what that gave. A plain
    state dict, loaded with ``weights_only=True``: ``torch.export.load`` would unpickle."""
    example = torch.zeros(2, *input_shape)
    if recipe["mode"] == "qat":
        model = prepare_for_qat(model, recipe, example)
        with torch.no_grad():
            model(example)
    quantized = quantize_model(model, recipe, [example])
    quantized.load_state_dict(saved["state_dict"])  # int8 weights, their scales, and the activations' ranges:
    set_activation_qparams(quantized, getattr(quantized, QPARAMS))  # written back into the graph
    return quantized


class Lowered(nn.Module):
    """A model run through ``torch.compile`` (Inductor) with freezing, which turns PT2E's
    quantize/dequantize pairs around conv and linear into oneDNN int8 kernels, and folds a float
    model's weights the same way. Inference only; a batch size compiles on its first call."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.compiled = torch.compile(model, dynamic=False)
        self._seen: set[tuple[int, ...]] = set()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if tuple(x.shape) in self._seen:
            return self.compiled(x)
        import torch._inductor.config as inductor

        with inductor.patch(freezing=True), warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="To copy construct from a tensor")  # Inductor's own int8 lowering
            out = self.compiled(x)
        self._seen.add(tuple(x.shape))
        return out


def lowered(model: nn.Module) -> nn.Module:
    """See :class:`Lowered`."""
    return Lowered(copy.deepcopy(model).cpu().eval())


