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
import statistics
import time
import zlib
from collections.abc import Callable, Iterator
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


# How latency is timed (``measure.latency``): quick, a fixed thread count and a short budget of
# single forward passes per batch size (a few hundred milliseconds per model), or full, torch's
# benchmark timer (warm-up, adaptive repeats, blocks; seconds per model), or not at all.
LATENCY_MODES = (True, False, "quick", "full")
QUICK_BUDGET_S = 0.05  # per batch size; at least MIN_REPEATS passes whatever the budget
MIN_REPEATS, MAX_REPEATS = 5, 2000  # timed blocks
WARMUP, WARMUP_S = 3, 0.01  # warm-up: at least 3 passes and 10 ms
BLOCK_S = 0.0005  # shortest timed block: faster passes are timed several to a block
NOISY = 0.5  # a spread (interquartile range over the median) above this flags the run's latency as noisy


@dataclass(frozen=True)
class Timing:
    """A latency measurement: the median forward pass, its spread and how many passes it saw."""

    median_ms: float
    spread: float  # interquartile range / median: about 0.1 on a quiet machine, > NOISY on a busy one
    repeats: int


@contextlib.contextmanager
def _threads(count: int) -> Iterator[None]:
    """torch's intra-op thread count fixed at ``count`` while timing (restored after)."""
    saved = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(saved)


def time_forward(
    model: nn.Module, input_shape: tuple[int, ...], batch_size: int, threads: int = 1, full: bool = False,
    budget_s: float = QUICK_BUDGET_S, clock: Callable[[], float] = time.perf_counter,
) -> Timing:  # fmt: skip
    """Median wall time of one forward pass of a batch of ``batch_size``, in milliseconds, with
    ``threads`` intra-op threads. Quick: a warm-up (``WARMUP`` passes and ``WARMUP_S``), then blocks of passes (one pass, or
    as many as take ``BLOCK_S``) timed until ``budget_s`` is spent (``MIN_REPEATS`` to
    ``MAX_REPEATS`` blocks); the median and spread are per pass. Full: ``torch.utils.benchmark``'s
    ``blocked_autorange`` over one second. ``clock``: seconds (a test passes its own)."""
    x = torch.randn(batch_size, *input_shape, device=_device(model))
    with torch.no_grad(), _threads(threads):
        if full:
            timer = Timer(stmt="model(x)", globals={"model": model, "x": x}, num_threads=threads)
            found = timer.blocked_autorange(min_run_time=1.0)
            return Timing(found.median * 1e3, found.iqr / found.median if found.median else 0.0, found.number_per_run * len(found.times))
        model(x)  # the first pass can be much slower (a compile, a cold cache): not part of the warm-up's rate
        began, warm = clock(), 0
        while warm < WARMUP or (warm < MAX_REPEATS and clock() - began < WARMUP_S):
            model(x)
            warm += 1
        # passes shorter than BLOCK_S are timed in blocks of several: the clock's own jitter
        # would otherwise be most of the spread of a 30 us forward pass
        block = max(1, int(BLOCK_S / max((clock() - began) / warm, 1e-9)))
        times: list[float] = []
        deadline = clock() + budget_s
        while len(times) < MIN_REPEATS or (len(times) < MAX_REPEATS and clock() < deadline):
            began = clock()
            for _ in range(block):
                model(x)
            times.append((clock() - began) / block)
    q1, median, q3 = statistics.quantiles(times, n=4, method="inclusive")
    return Timing(median * 1e3, (q3 - q1) / median if median else 0.0, len(times) * block)


def latency_ms(model: nn.Module, input_shape: tuple[int, ...], batch_size: int, threads: int = 1, full: bool = False) -> float:
    """The median of :func:`time_forward`, in milliseconds."""
    return time_forward(model, input_shape, batch_size, threads, full).median_ms


def _latencies(model: nn.Module, input_shape: tuple[int, ...], batches: tuple[int, ...], threads: int, full: bool) -> dict[str, float]:
    result: dict[str, float] = {}
    for batch in batches:
        timing = time_forward(model, input_shape, batch, threads, full)
        result[f"latency_ms_b{batch}"] = timing.median_ms
        result[f"latency_spread_b{batch}"] = timing.spread
    return result


def noisy_latencies(metrics: dict[str, float]) -> list[str]:
    """The latency keys of ``metrics`` whose spread is above ``NOISY`` (what the run flags)."""
    return sorted(k.replace("latency_spread_", "latency_ms_") for k, v in metrics.items() if "latency_spread_b" in k and v > NOISY)


def measure(
    model: nn.Module, input_shape: tuple[int, ...], large_batch: int = 256, latency: bool | str = True, threads: int = 1
) -> dict[str, float]:
    """All measurements of ``model`` on the CPU, in eval mode, on a copy (the model is untouched).

    Returns:
        ``params``, ``nonzero_params``, ``sparsity_all`` (zero fraction of all parameters),
        ``size_bytes``, ``size_bytes_zip``, ``size_bytes_sparse``, ``macs`` and, unless
        ``latency`` is false, ``latency_ms_b1`` and ``latency_ms_b<large_batch>`` (medians, with
        ``threads`` threads) and their ``latency_spread_b*`` (interquartile range / median).
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
        result |= _latencies(probe, input_shape, (1, large_batch), threads, latency == "full")
    return result


def _device(model: nn.Module) -> torch.device:
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


def measure_quantized(
    model: nn.Module, input_shape: tuple[int, ...], large_batch: int = 256, latency: bool | str = True, threads: int = 1,
    lower: Callable[[nn.Module], nn.Module] | None = None,
) -> dict[str, float]:  # fmt: skip
    """Size on disk and CPU latency of an int8 model (its packed weights are not parameters, so
    parameter counts and the FLOP counter do not apply); timed as ``lower(model)`` when given (a
    PT2E model runs int8 kernels only once Inductor has compiled it)."""
    result: dict[str, float] = {"size_bytes": state_dict_bytes(model), "size_bytes_zip": zip_bytes(model)}
    if latency:
        result |= _latencies(lower(model) if lower is not None else model, input_shape, (1, large_batch), threads, latency == "full")
    return result


@dataclass(frozen=True)
class Measurement:
    """How a run measures its models (``cfg.measure``): the large batch of the throughput
    latency, how latency is timed (true or ``quick``: a short budget per batch size; ``full``:
    torch's benchmark timer; false: not timed) and with how many threads."""

    large_batch: int = 256
    latency: bool | str = True
    threads: int = 1

    def __post_init__(self) -> None:
        if self.latency not in LATENCY_MODES or (self.latency in (0, 1) and not isinstance(self.latency, bool)):
            raise ValueError(f"measure.latency must be one of true, false, quick, full, got {self.latency!r}")
        for key, value in (("large_batch", self.large_batch), ("threads", self.threads)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"measure.{key} must be an integer >= 1, got {value!r}")

    def __call__(self, model: nn.Module, input_shape: tuple[int, ...]) -> dict[str, float]:
        return measure(model, input_shape, self.large_batch, self.latency, self.threads)

    def quantized(self, model: nn.Module, input_shape: tuple[int, ...], lower: Callable[[nn.Module], nn.Module] | None = None) -> dict[str, float]:
        return measure_quantized(model, input_shape, self.large_batch, self.latency, self.threads, lower)

    def latencies(self, model: nn.Module, input_shape: tuple[int, ...]) -> dict[str, float]:
        """Only the latency keys (``latency_ms_b*``, ``latency_spread_b*``); {} when not timed."""
        if not self.latency:
            return {}
        return _latencies(model, input_shape, (1, self.large_batch), self.threads, self.latency == "full")


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
