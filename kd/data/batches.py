"""Serving batches from tensors that live on the training device: the dataset that gathers a
whole batch at once, the samplers (a per-epoch shuffle that resume can replay, exact
evaluation shards under DDP), the batch sampler that moves an epoch's order to the device once,
and batched augmentation."""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import BatchSampler, Dataset, DistributedSampler, RandomSampler, Sampler


class IndexedTensorDataset(Dataset):
    """``(x, y, index)`` triples from two tensors.

    ``__getitems__`` lets the DataLoader fetch a whole batch with one tensor gather instead of
    ``batch_size`` Python calls and a collate; it works with any sampler, the
    ``DistributedSampler`` the data module uses under DDP included.
    """

    def __init__(self, x: Tensor, y: Tensor) -> None:
        if len(x) != len(y):
            raise ValueError(f"{len(x)} inputs but {len(y)} labels")
        self.x, self.y = x, y

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor, int]:
        return self.x[i], self.y[i], i

    def __getitems__(self, indices: Tensor | list[int]) -> tuple[Tensor, Tensor, Tensor]:
        index = torch.as_tensor(indices, dtype=torch.long)  # EpochBatches: already a tensor on x's device
        if index.device != self.x.device:
            index = index.to(self.x.device)
        return self.x[index], self.y[index], index


class EpochShuffleSampler(RandomSampler):
    """A shuffle that depends only on the seed and the epoch (Lightning calls ``set_epoch``), so
    a run resumed from a checkpoint sees the same batches as one that was never interrupted.
    The seed is torch's at construction (``seed_everything`` sets it). Under DDP the data
    module uses a seeded ``DistributedSampler`` instead."""

    def __init__(self, data_source: Dataset) -> None:
        super().__init__(data_source)
        self.seed = torch.initial_seed()
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        generator = torch.Generator().manual_seed((self.seed * 100_003 + self.epoch) % (2**63 - 1))
        yield from torch.randperm(len(self.data_source), generator=generator).tolist()


class EpochBatches(BatchSampler):
    """Batches of indices cut from one tensor per epoch that lives where the data does.

    The sampler's order for the whole epoch is read once at the epoch's start and copied to
    ``device`` in one transfer; each batch is then a slice of it, so a training step copies
    nothing from the host and never waits for the GPU (a per-batch copy of a Python list is a
    synchronous transfer). Any sampler works, Lightning's ``DistributedSampler`` under DDP
    included (Lightning rebuilds this class with it).
    """

    def __init__(self, sampler: Sampler | Iterable[int], batch_size: int, drop_last: bool, device: torch.device | None = None) -> None:
        super().__init__(sampler, batch_size, drop_last)
        self.device = device

    def __iter__(self) -> Iterator[Tensor]:
        order = torch.as_tensor(list(self.sampler), dtype=torch.long)
        if self.device is not None:
            order = order.to(self.device)  # (N,): once per epoch
        stop = len(order) - len(order) % self.batch_size if self.drop_last else len(order)
        yield from order[:stop].split(self.batch_size)


class EvalShardSampler(DistributedSampler):
    """Evaluation under DDP with every sample counted exactly once.

    torch's ``DistributedSampler`` pads the last shard with repeated
    samples so that all ranks see equal batch counts; that matters for gradient all-reduces but
    skews a test accuracy. Evaluation needs no per-step collectives (torchmetrics sums its
    states once, at epoch end), so rank ``r`` simply takes samples ``r, r + W, r + 2W, ...``.
    """

    def __init__(self, dataset: Dataset, num_replicas: int | None = None, rank: int | None = None) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=False, drop_last=False)

    def _indices(self) -> range:
        return range(self.rank, len(self.dataset), self.num_replicas)

    def __iter__(self):
        return iter(self._indices())

    def __len__(self) -> int:
        return len(self._indices())


def _already_batched(batch: tuple[Tensor, Tensor, Tensor]) -> tuple[Tensor, Tensor, Tensor]:
    """Collate for ``IndexedTensorDataset``: ``__getitems__`` has already built the batch."""
    return batch


def random_crop_flip(x: Tensor, padding: int = 4, flip: bool = True) -> Tensor:
    """Batched augmentation on whatever device ``x`` lives: zero-pad, random crop (a shift of up
    to ``padding`` pixels each way), and a horizontal flip of half the images when ``flip``.
    CIFAR's is padding 4 with flips; Hinton et al.'s MNIST jitter is padding 2 without.

    Args:
        x: ``(B, C, H, W)``.
        padding: pixels of zero padding on each side before the crop.
        flip: flip half of the images left-right.
    """
    b, c, h, w = x.shape
    padded = F.pad(x, (padding, padding, padding, padding))  # (B, C, H+2p, W+2p)
    top = torch.randint(0, 2 * padding + 1, (b,), device=x.device)
    left = torch.randint(0, 2 * padding + 1, (b,), device=x.device)
    rows = top[:, None] + torch.arange(h, device=x.device)  # (B, H)
    cols = left[:, None] + torch.arange(w, device=x.device)  # (B, W)
    batch_ix = torch.arange(b, device=x.device)[:, None, None, None]
    chan_ix = torch.arange(c, device=x.device)[None, :, None, None]
    out = padded[batch_ix, chan_ix, rows[:, None, :, None], cols[:, None, None, :]]  # (B, C, H, W)
    if not flip:
        return out
    flipped = torch.rand(b, device=x.device) < 0.5
    return torch.where(flipped[:, None, None, None], out.flip(-1), out)


def calibration_batches(data: object, n: int) -> list[Tensor]:
    """The first ``n`` batches of a fixed shuffle of ``data``'s training split (``data.train.x``,
    ``data.batch_size``): what quantizers calibrate on and the ONNX int8 export too, the same on
    every rank and in every run."""
    return [x for x, _ in labelled_batches(data, n)]


def labelled_batches(data: object, n: int) -> list[tuple[Tensor, Tensor]]:
    """:func:`calibration_batches` with their labels (a Hessian estimate needs the loss)."""
    order = torch.randperm(len(data.train.y), generator=torch.Generator().manual_seed(0))  # type: ignore[attr-defined]
    chunks = order[: n * data.batch_size].split(data.batch_size)  # type: ignore[attr-defined]
    return [(data.train.x[chunk], data.train.y[chunk]) for chunk in chunks]  # type: ignore[attr-defined]
