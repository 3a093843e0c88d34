"""Measuring a model the same way everywhere: size, sparsity, compute and CPU latency.

These are the compression numbers every run reports, for the teacher and the student alike.
Masks do not make a model smaller: ``size_bytes`` is the serialised dense state dict, and
``nonzero_params`` counts what a sparse format could drop; ``size_bytes_zip`` (the state dict
through zlib) and ``size_bytes_sparse`` (each tensor stored dense or as values + indices,
whichever is smaller) say what the zeros are worth on disk. Only a physically smaller model
(fewer channels) is faster: latency and MACs of a masked model are those of the dense one.
"""

from __future__ import annotations

import contextlib
import copy
import io
import math
import zlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.benchmark import Timer
from torch.utils.flop_counter import FlopCounterMode


def count_params(model: nn.Module) -> int:
    """Number of parameters (every element of every parameter tensor)."""
    return sum(p.numel() for p in model.parameters())


def count_nonzero(model: nn.Module) -> int:
    """Parameters that are not exactly zero (what survives pruning)."""
    return sum(int(torch.count_nonzero(p.detach())) for p in model.parameters())


def state_dict_bytes(model: nn.Module) -> int:
    """Bytes of ``torch.save(model.state_dict())``: the size of the checkpoint on disk."""
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    return buffer.getbuffer().nbytes


def zip_bytes(model: nn.Module) -> int:
    """Bytes of the serialised state dict after zlib (level 6): what zeros save a plain archive."""
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    return len(zlib.compress(buffer.getbuffer(), 6))


def sparse_bytes(model: nn.Module) -> int:
    """Bytes of the parameters when each tensor is stored either dense or as its non-zero values
    plus their flat indices (the smallest unsigned integer that holds ``numel``), whichever is
    smaller. Buffers (batch-norm statistics) count dense."""
    total = 0
    for p in model.parameters():
        nnz, numel = int(torch.count_nonzero(p.detach())), p.numel()
        index_bytes = max(1, math.ceil(math.log2(max(numel, 2)) / 8))
        total += min(numel * p.element_size(), nnz * (p.element_size() + index_bytes))
    return total + sum(b.numel() * b.element_size() for b in model.buffers())


def layer_sparsity(model: nn.Module) -> dict[str, float]:
    """Fraction of exact zeros in the weight of every convolution and linear layer, by name."""
    return {
        name: 1.0 - int(torch.count_nonzero(m.weight.detach())) / m.weight.numel()
        for name, m in model.named_modules()
        if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear))
    }


def count_macs(model: nn.Module, input_shape: tuple[int, ...]) -> int:
    """Multiply-accumulates of one forward pass of a single sample (torch's FLOP counter / 2)."""
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        model(torch.zeros(1, *input_shape, device=_device(model)))
    return counter.get_total_flops() // 2


def latency_ms(model: nn.Module, input_shape: tuple[int, ...], batch_size: int, min_run_time: float = 0.2) -> float:
    """Median wall time of one forward pass in milliseconds (``torch.utils.benchmark``, which
    warms up, picks the number of repeats, and reports the median of blocks of runs)."""
    x = torch.randn(batch_size, *input_shape, device=_device(model))
    timer = Timer(stmt="model(x)", globals={"model": model, "x": x}, num_threads=torch.get_num_threads())
    with torch.no_grad():
        return timer.blocked_autorange(min_run_time=min_run_time).median * 1e3


def measure(
    model: nn.Module, input_shape: tuple[int, ...], large_batch: int = 256, latency: bool = True
) -> dict[str, float]:
    """All measurements of ``model`` on the CPU, in eval mode, on a copy (the model is untouched).

    Returns:
        ``params``, ``nonzero_params``, ``sparsity_all`` (zero fraction of all parameters),
        ``size_bytes``, ``size_bytes_zip``, ``size_bytes_sparse``, ``macs`` and, when ``latency``
        is set, ``latency_ms_b1`` and ``latency_ms_b<large_batch>`` (medians).
    """
    probe = copy.deepcopy(model).cpu().eval()
    params, nonzero = count_params(probe), count_nonzero(probe)
    result: dict[str, float] = {
        "params": params,
        "nonzero_params": nonzero,
        "sparsity_all": 1.0 - nonzero / params if params else 0.0,
        "size_bytes": state_dict_bytes(probe),
        "size_bytes_zip": zip_bytes(probe),
        "size_bytes_sparse": sparse_bytes(probe),
        "macs": count_macs(probe, input_shape),
    }
    if latency:
        result["latency_ms_b1"] = latency_ms(probe, input_shape, 1)
        result[f"latency_ms_b{large_batch}"] = latency_ms(probe, input_shape, large_batch)
    return result


def _device(model: nn.Module) -> torch.device:
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


def measure_quantized(model: nn.Module, input_shape: tuple[int, ...], large_batch: int = 256, latency: bool = True) -> dict[str, float]:
    """Size on disk and CPU latency of an int8 model (its packed weights are not parameters, so
    parameter counts and the FLOP counter do not apply)."""
    result: dict[str, float] = {"size_bytes": state_dict_bytes(model), "size_bytes_zip": zip_bytes(model)}
    if latency:
        result["latency_ms_b1"] = latency_ms(model, input_shape, 1)
        result[f"latency_ms_b{large_batch}"] = latency_ms(model, input_shape, large_batch)
    return result


@dataclass(frozen=True)
class Measurement:
    """How a run measures its models (``cfg.measure``): the large batch of the throughput
    latency, and whether latency is timed at all (it is the slow and noisy part)."""

    large_batch: int = 256
    latency: bool = True

    def __call__(self, model: nn.Module, input_shape: tuple[int, ...]) -> dict[str, float]:
        return measure(model, input_shape, self.large_batch, self.latency)

    def quantized(self, model: nn.Module, input_shape: tuple[int, ...]) -> dict[str, float]:
        return measure_quantized(model, input_shape, self.large_batch, self.latency)


@contextlib.contextmanager
def int8_ops() -> Iterator[None]:
    """Let int8 kernels run under ``trainer.deterministic=true``: torch has no deterministic
    flag for some quantized ops (``quantized_resize_cpu_``), so determinism warns instead of
    raising inside this block, and is restored after it."""
    strict = torch.are_deterministic_algorithms_enabled() and not torch.is_deterministic_algorithms_warn_only_enabled()
    if strict:
        torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        yield
    finally:
        if strict:
            torch.use_deterministic_algorithms(True)


@torch.no_grad()
def agreement(reference: nn.Module, quantized: nn.Module, x: torch.Tensor, batch_size: int = 512) -> dict[str, float]:
    """How closely ``quantized`` follows ``reference`` on CPU inputs ``x``: the fraction of equal
    top-1 predictions and the relative error of the logits, ``||z_q - z|| / ||z||``."""
    with int8_ops():
        pairs = [(reference(xb), quantized(xb)) for xb in x.split(batch_size)]
    z, zq = torch.cat([p[0] for p in pairs]), torch.cat([p[1] for p in pairs])  # (N, classes) each
    return {"argmax_agreement": float((z.argmax(1) == zq.argmax(1)).float().mean()),
            "logit_rel_error": float((zq - z).norm() / z.norm().clamp_min(1e-12))}  # fmt: skip


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 512) -> float:
    """Top-1 accuracy of ``model`` on CPU tensors, in batches."""
    with int8_ops():
        correct = sum(int((model(xb).argmax(1) == yb).sum()) for xb, yb in zip(x.split(batch_size), y.split(batch_size)))
    return correct / len(y)
