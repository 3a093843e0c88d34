"""ONNX export of a student, checked in onnxruntime against the torch model it came from.

- :func:`export` writes one self-contained ``.onnx`` file (weights inside, batch dimension dynamic)
  with torch's ``torch.export``-based exporter (``dynamo=True``; the TorchScript one is deprecated
  and cannot export PT2E's int8 graphs). A float student, thinned (structured pruning) or factorised,
  is a plain module; a PT2E int8 model exports as a QDQ graph (QuantizeLinear/DequantizeLinear
  around int8 weights): the same function as the torch int8 model kd tested.
- :func:`quantize_static` is the other way to an int8 ONNX: onnxruntime's static quantization of
  the float graph (QDQ, per-channel int8 weights, uint8 activations) calibrated on kd's training
  batches; used where the run's int8 model is not a PT2E one (the FX flow), and as the faster
  choice for onnxruntime (its fusions match its own placement of quantize nodes).
- :func:`check` runs a file in onnxruntime on the test set against a torch model: the share of
  equal top-1 predictions and the largest logit difference; :func:`latency_ms` times it with the
  same timer as kd's torch measurements.
"""

from __future__ import annotations

import contextlib
import copy
import io
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from torch import nn

from kd.tracking.measure import Timing, int8_ops, time_forward

INPUT, OUTPUT = "x", "logits"
FLOAT_AGREEMENT, INT8_AGREEMENT = 0.995, 0.99  # what an export must reach on the test set to count as the same model


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """torch.onnx prints its progress (and onnxscript warns about opset choices) on every export."""
    with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def export(model: nn.Module, input_shape: tuple[int, ...], path: str | Path) -> Path:
    """Write ``model`` (on the CPU, in eval mode; a copy) to ``path`` as ONNX with a dynamic batch."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    probe = copy.deepcopy(model).cpu()
    probe.eval()
    example = torch.zeros(2, *input_shape)
    with _quiet(), torch.no_grad():
        torch.onnx.export(probe, (example,), str(path), input_names=[INPUT], output_names=[OUTPUT], dynamo=True,
                          external_data=False, dynamic_shapes={INPUT: {0: torch.export.Dim("batch")}})  # fmt: skip
    return path


def session(path: str | Path, threads: int = 1):
    """An onnxruntime CPU session of ``path`` with ``threads`` intra-op threads."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    options.log_severity_level = 3  # errors only
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


class OnnxModule(nn.Module):
    """An onnxruntime session called like a torch model on CPU tensors (for checks and timing)."""

    def __init__(self, path: str | Path, threads: int = 1) -> None:
        super().__init__()
        self.path = Path(path)
        self.session = session(path, threads)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(self.session.run(None, {INPUT: x.detach().cpu().numpy().astype(np.float32)})[0])


@torch.no_grad()
def check(reference: nn.Module, onnx_model: OnnxModule, x: torch.Tensor, batch_size: int = 512) -> dict[str, float]:
    """``argmax_agreement`` (share of equal top-1 predictions) and ``max_logit_diff`` of
    ``onnx_model`` against the torch ``reference`` on CPU inputs ``x``."""
    reference = copy.deepcopy(reference).cpu()
    reference.eval()
    with int8_ops():  # an FX int8 reference runs quantized kernels that have no deterministic flag
        pairs = [(reference(xb), onnx_model(xb)) for xb in x.split(batch_size)]
    z, zo = torch.cat([p[0] for p in pairs]), torch.cat([p[1] for p in pairs])
    return {"argmax_agreement": float((z.argmax(1) == zo.argmax(1)).float().mean()), "max_logit_diff": float((z - zo).abs().max())}


def latency_ms(onnx_model: OnnxModule, input_shape: tuple[int, ...], batch: int, threads: int = 1, full: bool = False) -> Timing:
    """onnxruntime's forward pass of a batch, timed as kd times torch models."""
    return time_forward(onnx_model, input_shape, batch, threads, full)


class _Batches:
    """onnxruntime's calibration reader over kd's calibration batches."""

    def __init__(self, batches: list[torch.Tensor]) -> None:
        self._batches = iter([{INPUT: b.cpu().numpy().astype(np.float32)} for b in batches])

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._batches, None)


def quantize_static(float_path: str | Path, path: str | Path, batches: list[torch.Tensor]) -> Path:
    """onnxruntime's static int8 quantization of the float graph at ``float_path``: QDQ format,
    per-channel int8 weights, uint8 activations, ranges from ``batches`` (min/max)."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType
    from onnxruntime.quantization import quantize_static as ort_quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(_Batches, CalibrationDataReader):
        pass

    path = Path(path)
    prepared = path.with_name(path.stem + ".pre.onnx")
    with _quiet():
        quant_pre_process(str(float_path), str(prepared))
        ort_quantize_static(str(prepared), str(path), Reader(batches), quant_format=QuantFormat.QDQ, per_channel=True,
                            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)  # fmt: skip
    prepared.unlink(missing_ok=True)
    return path

