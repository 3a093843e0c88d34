"""Weight clustering (``quantize=cluster``): k-means weight sharing per layer, kept through
training (Han, Mao & Dally 2016, "Deep Compression", section 3).

At epoch ``start`` the weights of every chosen layer are clustered into ``2**bits`` centroids by
1-D k-means (initialised ``linear``: evenly between min and max, the paper's best; ``density``:
at quantiles of the weight distribution; ``random``: at sampled weights), and each weight is
replaced by its centroid. From then on every weight of a cluster receives the *sum* of the
gradients of that cluster (the paper's centroid gradient; or their mean, the default, see
``centroid_gradient``) and the optimizer's per-weight state
is reset, so all of them take the same step and the layer keeps ``2**bits`` distinct values
(each weight is also snapped to its cluster's mean after every step, against drift); zero weights (left by
pruning) form a cluster of their own that stays at zero, and count as one of the ``2**bits``
codes (the non-zeros of a pruned layer share ``2**bits - 1`` centroids). The assignment is a buffer of the layer
(``weight_cluster``), so it travels in checkpoints. The stored size is the paper's: ``bits`` per
weight plus a 32-bit codebook per layer (``quant/size_bytes_coded``).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from torch import Tensor, nn

from kd.compression.layers import select_layers
from callbacks.quantization import QuantizationCallback
from kd.compression.deep_compression import storage_metrics, storage_report, write_report

INITS = ("linear", "density", "random")


def kmeans_1d(values: Tensor, k: int, init: str = "linear", iterations: int = 30, seed: int = 0) -> tuple[Tensor, Tensor]:
    """Lloyd's k-means on a 1-D tensor: ``(centroids (k,), assignment (n,))``."""
    if init == "linear":
        centroids = torch.linspace(float(values.min()), float(values.max()), k)
    elif init == "density":
        centroids = torch.quantile(values[:: max(1, len(values) // 100_000)], torch.linspace(0, 1, k))
    else:
        g = torch.Generator().manual_seed(seed)
        centroids = values[torch.randint(len(values), (k,), generator=g)].clone()
    for _ in range(iterations):
        assignment = (values[:, None] - centroids[None, :]).abs().argmin(1)  # (n, k) -> (n,)
        sums = torch.zeros(k).index_add_(0, assignment, values)
        counts = torch.zeros(k).index_add_(0, assignment, torch.ones_like(values))
        updated = torch.where(counts > 0, sums / counts.clamp_min(1), centroids)
        if torch.allclose(updated, centroids):
            break
        centroids = updated
    return centroids, (values[:, None] - centroids[None, :]).abs().argmin(1)


class WeightClustering(QuantizationCallback):
    """Cluster each chosen layer's weights into ``2**bits`` shared values (module docstring).

    Args:
        bits: 1..8; 2**bits centroids per layer (1 bit: two values per layer).
        init: centroid initialisation, ``linear``, ``density`` or ``random``.
        start: epoch at which the weights are clustered (then fine-tuned as clusters).
        centroid_gradient: ``sum`` (the paper's eq. 3) or ``mean`` of the cluster's gradients.
            The sum over a cluster of thousands of weights is that many times a weight's
            gradient: a LeNet-5 on digits (82%), clustered to 3 bits and fine-tuned 2 epochs with
            SGD, ended at 14% / 8% with the sum (lr 0.01 / 0.05) and 88% / 92% with the mean,
            so ``mean`` (the sum at a learning rate divided by the cluster size) is the default.
        layers, skip: fnmatch patterns of the conv/linear layers to cluster / leave alone.
        index_bits_conv, index_bits_fc: bits of the relative sparse indices in the Deep
            Compression storage report (the paper's 8 and 5), see ``kd/compression/deep_compression.py``;
            the run logs ``dc/*`` per stage and per layer and ``deep_compression.csv``.
    """

    mode = "cluster"
    converts = False

    def __init__(self, bits: int = 4, init: str = "linear", start: int = 0, centroid_gradient: str = "mean",
                 layers: Sequence[str] | None = None, skip: Sequence[str] = (), index_bits_conv: int = 8,
                 index_bits_fc: int = 5) -> None:  # fmt: skip
        if not 1 <= bits <= 8:
            raise ValueError(f"quantize.bits must lie in [1, 8] for clustering, got {bits}")
        if init not in INITS:
            raise ValueError(f"quantize.init must be one of {INITS}, got {init!r}")
        if centroid_gradient not in ("sum", "mean"):
            raise ValueError(f"quantize.centroid_gradient must be 'sum' or 'mean', got {centroid_gradient!r}")
        for key, value in (("index_bits_conv", index_bits_conv), ("index_bits_fc", index_bits_fc)):
            if not 1 <= value <= 16:
                raise ValueError(f"quantize.{key} must lie in [1, 16], got {value}")
        self.index_bits_conv, self.index_bits_fc = index_bits_conv, index_bits_fc
        self._storage: tuple[list[dict], dict[str, float]] | None = None
        self.centroid_gradient = centroid_gradient
        self.bits, self.init, self.start = bits, init, start
        self.layers, self.skip = list(layers) if layers is not None else None, list(skip)
        self.backend, self.per_channel = "none", False
        self._targets: dict[str, nn.Module] = {}
        self._clustered = False

    def recipe(self) -> dict[str, Any]:
        return {"mode": self.mode, "bits": self.bits, "init": self.init}

    def describe(self) -> str:
        return f"cluster {self.bits}-bit"

    def check_with(self, objective: Any, pruner: Any, model: nn.Module, input_shape: tuple[int, ...] | None = None) -> None:
        select_layers(model, self.layers, self.skip)  # patterns that match nothing fail now
        # Deep Compression clusters what pruning left: the pruning schedule must be over first
        schedule = getattr(pruner, "schedule", None)
        if schedule is not None and schedule.unit == "epoch" and self.start <= schedule.last:
            raise ValueError(f"quantize.start={self.start} must come after the last pruning event (epoch {schedule.last})")

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        if self.start >= trainer.max_epochs:
            raise ValueError(f"quantize.start={self.start} but training has trainer.max_epochs={trainer.max_epochs}")
        self._targets = select_layers(pl_module.model, self.layers, self.skip)
        for module in self._targets.values():
            if not hasattr(module, "weight_cluster"):  # present on resume: the checkpoint refills it
                module.register_buffer("weight_cluster", torch.full_like(module.weight, -1, dtype=torch.long))

    @torch.no_grad()
    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.current_epoch == self.start and not self._clustered:
            for module in self._targets.values():
                w = module.weight.detach().flatten().cpu()
                nonzero = w != 0
                # a pruned layer spends one of its 2**bits codes on zero (Deep Compression's
                # filler entries need it too), so its non-zeros share 2**bits - 1 centroids
                k = 2**self.bits - 1 if self.bits > 1 and not bool(nonzero.all()) else 2**self.bits
                centroids, assignment = kmeans_1d(w[nonzero], k, self.init)
                labels = torch.full_like(w, 2**self.bits, dtype=torch.long)  # zeros: a cluster of their own
                labels[nonzero] = assignment
                table = torch.zeros(2**self.bits + 1)
                table[:k] = centroids
                module.weight_cluster.copy_(labels.view_as(module.weight))
                module.weight.copy_(table[labels].view_as(module.weight))
                for optimizer in trainer.optimizers:  # per-weight momentum would pull a cluster apart
                    optimizer.state.pop(module.weight, None)
            self._clustered = True

    @torch.no_grad()
    def on_after_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self._clustered:
            return
        k = 2**self.bits + 1
        for module in self._targets.values():
            grad, labels = module.weight.grad, module.weight_cluster
            if grad is None:
                continue
            shared = torch.zeros(k, device=grad.device, dtype=grad.dtype).index_add_(0, labels.flatten(), grad.flatten())
            if self.centroid_gradient == "mean":
                counts = torch.zeros(k, device=grad.device, dtype=grad.dtype).index_add_(0, labels.flatten(), torch.ones_like(grad.flatten()))
                shared /= counts.clamp_min(1)
            shared[-1] = 0.0  # the zero cluster stays at zero
            grad.copy_(shared[labels])  # every weight of a cluster takes the cluster's summed gradient

    @torch.no_grad()
    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        # equal gradients and fresh optimizer state keep a cluster's weights equal; snapping each
        # weight to its cluster's mean after the step removes floating-point drift
        if not self._clustered:
            return
        k = 2**self.bits + 1
        for module in self._targets.values():
            w, labels = module.weight, module.weight_cluster.flatten()
            sums = torch.zeros(k, device=w.device, dtype=w.dtype).index_add_(0, labels, w.flatten())
            counts = torch.zeros(k, device=w.device, dtype=w.dtype).index_add_(0, labels, torch.ones_like(w.flatten()))
            means = sums / counts.clamp_min(1)
            means[-1] = 0.0
            w.copy_(means[labels].view_as(w))

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._clustered:
            distinct = max(int(torch.unique(m.weight.detach()[m.weight_cluster < 2**self.bits]).numel()) for m in self._targets.values())
            pl_module.log("quant/max_distinct_weights", float(distinct), on_step=False, on_epoch=True)

    def coded_bytes(self, model: nn.Module) -> float:
        """Bytes of the clustered layers stored as ``bits``-bit indices plus a 32-bit codebook,
        plus every other parameter at 32 bits (Deep Compression's accounting, before Huffman)."""
        clustered = {id(m.weight) for m in self._targets.values()}
        coded = sum(m.weight.numel() * self.bits / 8 + 4 * 2**self.bits for m in self._targets.values())
        return coded + sum(4 * p.numel() for p in model.parameters() if id(p) not in clustered)

    def extra_metrics(self, model: nn.Module) -> dict[str, float]:
        """Deep Compression's storage per stage and per layer (``dc/*``)."""
        self._storage = storage_report(model, self.index_bits_conv, self.index_bits_fc)
        return storage_metrics(*self._storage)

    def artifacts(self, run_dir: Path) -> list[Path]:
        return [write_report(*self._storage, Path(run_dir) / "deep_compression.csv")] if self._storage else []

    def convert(self, model: nn.Module, data: Any) -> nn.Module:
        for module in self._targets.values():
            module._buffers.pop("weight_cluster", None)
        return model

    def state_dict(self) -> dict[str, Any]:
        return {"clustered": self._clustered}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._clustered = bool(state_dict["clustered"])
