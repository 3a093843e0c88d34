"""A training epoch's loss terms and correct predictions, summed on the device and read once."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor


class EpochSums:
    """Running sums of a training epoch's terms and correct predictions, on the device.

    A plain object, not a module attribute per number: ``nn.Module.__setattr__`` is slow, and
    this is updated every step."""

    def __init__(self) -> None:
        self.terms: dict[str, Tensor] = {}
        self.correct: Tensor | None = None
        self.count = 0

    def add(self, sums: dict[str, Tensor], correct: Tensor, n: int) -> None:
        for name, value in sums.items():
            total = self.terms.get(name)
            # a copy first: a compiled step's outputs are overwritten by its next CUDA-graph replay
            self.terms[name] = value.clone() if total is None else total + value
        self.correct = correct.clone() if self.correct is None else self.correct + correct
        self.count += n

    def means(self, strategy: Any | None) -> dict[str, float]:
        """``train/<term>`` and ``train/acc`` over the samples seen: summed over all ranks by
        ``strategy`` (one all-reduce) when given, then read to the host once."""
        names = list(self.terms)
        totals = torch.stack([*(self.terms[k].float() for k in names), self.correct.float()])
        counts = totals.new_tensor(float(self.count))
        if strategy is not None:
            totals, counts = strategy.reduce(torch.cat([totals, counts[None]]), reduce_op="sum").split([len(names) + 1, 1])
        values = (totals / counts).tolist()
        return {**{f"train/{k}": v for k, v in zip(names, values)}, "train/acc": values[-1]}
