"""Range estimators beyond torch's own, for post-training calibration: the percentile of the
observed distribution, and the KL-divergence (entropy) threshold of TensorRT's calibrator.

Both keep the ``HistogramObserver`` (a 2048-bin histogram of everything observed, widened as
the range grows) and replace only the choice of the clipping range from it, which is what the
seeds' "calibration by MinMax / MSE / KL divergence" differ in. Each search is written once and
made into an observer of both flows: torch's (``torch.ao``, the FX path, here) and torchao's
(PT2E, ``callbacks/pt2e_quant.py``), whose histogram observers share their internals and must not
be mixed in one model.
"""

from __future__ import annotations

import torch
from torch.ao.quantization.observer import HistogramObserver


class _Percentile:
    """Clip both tails at ``percentile`` (e.g. 99.99: the top and bottom 0.01% are saturated)."""

    def __init__(self, percentile: float = 99.99, bins: int = 2048, dtype: torch.dtype = torch.quint8,
                 qscheme: torch.qscheme = torch.per_tensor_affine, quant_min: int | None = None,
                 quant_max: int | None = None, **kwargs) -> None:  # fmt: skip
        super().__init__(bins=bins, dtype=dtype, qscheme=qscheme, quant_min=quant_min, quant_max=quant_max, **kwargs)
        if not 50.0 < percentile <= 100.0:
            raise ValueError(f"percentile must lie in (50, 100], got {percentile}")
        self.percentile = percentile

    def _non_linear_param_search(self) -> tuple[torch.Tensor, torch.Tensor]:
        width = (self.max_val - self.min_val) / self.bins
        cdf = self.histogram.cumsum(0) / self.histogram.sum().clamp_min(1)
        p = torch.tensor(self.percentile / 100.0, dtype=cdf.dtype)
        low = torch.searchsorted(cdf, 1.0 - p)  # first bin whose cumulative mass reaches 1 - p
        high = torch.searchsorted(cdf, p)
        return self.min_val + low * width, self.min_val + (high + 1) * width


class _Entropy:
    """The upper clipping threshold minimising ``KL(P || Q)``, where ``P`` is the histogram up to
    the threshold with everything above folded into its last bin, and ``Q`` that histogram
    quantized to the integer levels (each level spreads its mass evenly over its non-empty bins),
    searched every ``stride`` bins (Migacz, "8-bit inference with TensorRT", GTC 2017). Only the
    upper end is searched: activations after ReLU start at 0; a negative minimum is kept."""

    def __init__(self, stride: int = 16, bins: int = 2048, dtype: torch.dtype = torch.quint8,
                 qscheme: torch.qscheme = torch.per_tensor_affine, quant_min: int | None = None,
                 quant_max: int | None = None, **kwargs) -> None:  # fmt: skip
        super().__init__(bins=bins, dtype=dtype, qscheme=qscheme, quant_min=quant_min, quant_max=quant_max, **kwargs)
        self.stride = stride

    def _non_linear_param_search(self) -> tuple[torch.Tensor, torch.Tensor]:
        hist = self.histogram.double()
        levels = int(self.quant_max - self.quant_min + 1)
        width = (self.max_val - self.min_val) / self.bins
        best_kl, best_i = float("inf"), self.bins
        # From `stride` bins up, not from `levels` as TensorRT: torch's histogram spans the observed
        # min..max, so with a few far outliers the whole body can sit in the first bins.
        for i in range(self.stride, self.bins + 1, self.stride):
            p = hist[:i].clone()
            p[-1] += hist[i:].sum()  # outliers saturate into the last level
            level = torch.arange(i) * levels // i  # (i,) -> the integer level each bin falls in
            filled = (hist[:i] > 0).double()
            mass = torch.zeros(levels, dtype=hist.dtype).index_add_(0, level, hist[:i])
            count = torch.zeros(levels, dtype=hist.dtype).index_add_(0, level, filled)
            q = filled * mass[level] / count[level].clamp_min(1)
            p, q = p / p.sum(), q / q.sum().clamp_min(1e-12)
            keep = p > 0
            kl = float((p[keep] * torch.log(p[keep] / q[keep].clamp_min(1e-12))).sum())
            if kl < best_kl:
                best_kl, best_i = kl, i
        return self.min_val, self.min_val + best_i * width


class PercentileObserver(_Percentile, HistogramObserver):
    """The percentile clipping range, for torch's FX flow."""


class EntropyObserver(_Entropy, HistogramObserver):
    """The KL-divergence (TensorRT) clipping range, for torch's FX flow."""
