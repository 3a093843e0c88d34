"""Small datasets held whole as tensors on the training device, served in batches by one gather each.

Per-sample PIL transforms and worker processes cost more than the model on the small
datasets this framework trains, so every split is a ``(N, C, H, W)`` float tensor, normalised
once, and the loaders serve it from the device the trainer trains on (a GPU's memory holds
CIFAR whole): a batch is one index gather there, with no host-to-device copy and no loader
process. Random augmentation runs batched on that device too. Every sample carries its index
in its split, which is what the teacher-logit cache looks logits up by.
"""

from __future__ import annotations

import logging
import os
from typing import NamedTuple

import pytorch_lightning as pl
import torch
from torch import Tensor
from torch.utils.data import DataLoader, DistributedSampler, Sampler, SequentialSampler

from kd.data.batches import (
    EpochBatches,
    EpochShuffleSampler,
    EvalShardSampler,
    IndexedTensorDataset,
    _already_batched,
    random_crop_flip,
)

log = logging.getLogger(__name__)


class DataNotFoundError(FileNotFoundError):
    """A dataset is not on disk; the message says how to get it."""


class Split(NamedTuple):
    """One split: images ``(N, C, H, W)`` float and labels ``(N,)`` int64."""

    x: Tensor
    y: Tensor


class TensorDataModule(pl.LightningDataModule):
    """Base DataModule: a subclass provides ``classes`` and ``load()``; this class splits,
    normalises, slices and serves.

    Args:
        batch_size: training batch size.
        eval_batch_size: batch size for validation and test.
        val_fraction: fraction of the training split held out for validation (model selection).
        split_seed: seed of the train/val (and, where the source has none, test) split.
        limit_train: keep only the first N training samples after the split (None: all).
        limit_eval: keep only the first N validation and test samples (None: all).
        augment: random crop with padding and horizontal flip, batched on the training
            device. Makes the training inputs non-deterministic, which disables the teacher
            logit cache.
        augment_padding: the largest shift of the random crop, in pixels (CIFAR: 4).
        augment_flip: also flip half the images left-right (not for digits and letters).
        drop_last: drop the last, partial training batch of each epoch (the shuffle differs
            every epoch, so no sample is left out for good): every step then has the same
            shapes, which compiled steps with CUDA graphs need (``compile=true`` sets it).
    """

    classes: tuple[str, ...] = ()
    test_fraction: float = 0.2  # used only when the source has no official test split

    def __init__(
        self,
        batch_size: int = 64,
        eval_batch_size: int = 512,
        val_fraction: float = 0.1,
        split_seed: int = 0,
        limit_train: int | None = None,
        limit_eval: int | None = None,
        augment: bool = False,
        augment_padding: int = 4,
        augment_flip: bool = True,
        drop_last: bool = False,
    ) -> None:
        super().__init__()
        _count("augment_padding", augment_padding, 0)
        _count("batch_size", batch_size, 1)
        _count("eval_batch_size", eval_batch_size, 1)
        _count("split_seed", split_seed, 0)
        if not _number(val_fraction) or not 0.0 < val_fraction < 1.0:
            raise ValueError(f"data.val_fraction must lie in (0, 1), got {val_fraction!r}")
        for name, value in (("limit_train", limit_train), ("limit_eval", limit_eval)):
            if value is not None:
                _count(name, value, 1, " or null")
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size
        self.val_fraction = val_fraction
        self.split_seed = split_seed
        self.limit_train = limit_train
        self.limit_eval = limit_eval
        self.augment, self.augment_padding, self.augment_flip = augment, augment_padding, augment_flip
        self.drop_last = drop_last
        self.train: Split | None = None
        self.val: Split | None = None
        self.test: Split | None = None

    # -- what a subclass provides -------------------------------------------------------
    def load(self) -> tuple[Split, Split | None]:
        """Return ``(train_pool, test)`` with ``x`` scaled to ``[0, 1]``; ``test`` may be None
        when the source has no official test split (then one is carved from the pool)."""
        raise NotImplementedError

    def source(self) -> str:
        """Where the data comes from, for the log and the fingerprint."""
        return type(self).__name__

    # -- derived facts ------------------------------------------------------------------
    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def input_shape(self) -> tuple[int, int, int]:
        self._require_setup()
        return tuple(self.train.x.shape[1:])  # type: ignore[union-attr,return-value]

    @property
    def deterministic_inputs(self) -> bool:
        """True when a training sample's input is the same every epoch (no random augmentation)."""
        return not self.augment

    def fingerprint(self) -> dict[str, object]:
        """Everything that decides which samples a model trains and is evaluated on."""
        return {
            "source": self.source(),
            "val_fraction": self.val_fraction,
            "split_seed": self.split_seed,
            "limit_train": self.limit_train,
            "limit_eval": self.limit_eval,
            "augment": self.augment,
            **({"augment_padding": self.augment_padding, "augment_flip": self.augment_flip} if self.augment else {}),
            **({"drop_last": True} if self.drop_last else {}),
        }

    # -- Lightning hooks ----------------------------------------------------------------
    def setup(self, stage: str | None = None) -> None:
        if self.train is not None:
            return
        pool, test = self.load()
        gen = torch.Generator().manual_seed(self.split_seed)
        order = torch.randperm(len(pool.y), generator=gen)
        if test is None:
            n_test = int(round(self.test_fraction * len(order)))
            test = Split(pool.x[order[:n_test]], pool.y[order[:n_test]])
            order = order[n_test:]
        n_val = int(round(self.val_fraction * len(order)))
        val = Split(pool.x[order[:n_val]], pool.y[order[:n_val]])
        train = Split(pool.x[order[n_val:]], pool.y[order[n_val:]])
        train = _head(train, self.limit_train)
        val, test = _head(val, self.limit_eval), _head(test, self.limit_eval)
        # per-channel statistics of the training split only, applied to every split
        mean = train.x.mean(dim=(0, 2, 3), keepdim=True)  # (1, C, 1, 1)
        std = train.x.std(dim=(0, 2, 3), keepdim=True).clamp_min(1e-6)
        self.train, self.val, self.test = (Split((s.x - mean) / std, s.y) for s in (train, val, test))
        log.info(
            "%s: %d train / %d val / %d test samples, input %s, %d classes",
            self.source(), len(train.y), len(val.y), len(test.y), tuple(train.x.shape[1:]), self.num_classes,
        )

    def train_dataloader(self) -> DataLoader:
        self._require_setup()
        return self._loader(self.train, self.batch_size, shuffle=True, drop_last=self.drop_last)  # type: ignore[arg-type]

    def val_dataloader(self) -> DataLoader:
        self._require_setup()
        return self._loader(self.val, self.eval_batch_size, shuffle=False)  # type: ignore[arg-type]

    def test_dataloader(self) -> DataLoader:
        self._require_setup()
        return self._loader(self.test, self.eval_batch_size, shuffle=False)  # type: ignore[arg-type]

    def on_after_batch_transfer(self, batch: tuple[Tensor, Tensor, Tensor], dataloader_idx: int) -> tuple:
        if self.augment and self.trainer is not None and self.trainer.training:
            x, y, index = batch
            return random_crop_flip(x, self.augment_padding, self.augment_flip), y, index
        return batch

    # -- helpers ------------------------------------------------------------------------
    def _loader(self, split: Split, batch_size: int, shuffle: bool, drop_last: bool = False) -> DataLoader:
        device = self.device
        dataset = IndexedTensorDataset(split.x.to(device), split.y.to(device))  # a no-op on the CPU
        # Under DDP each rank takes its own shard here (kd.train.trainer.make_trainer turns Lightning's
        # sampler injection off: it would not see through EpochBatches).
        distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
        sampler: Sampler
        if shuffle:
            seed = int(os.environ.get("PL_GLOBAL_SEED", 0))  # seed_everything's, the same on every rank
            sampler = DistributedSampler(dataset, shuffle=True, seed=seed) if distributed else EpochShuffleSampler(dataset)
        else:
            sampler = EvalShardSampler(dataset) if distributed else SequentialSampler(dataset)
        return DataLoader(dataset, batch_sampler=EpochBatches(sampler, batch_size, drop_last, device), collate_fn=_already_batched)

    @property
    def device(self) -> torch.device:
        """Where the loaders serve from: the attached trainer's device (each rank's own under
        DDP), the CPU without a trainer. The splits themselves stay on the CPU, where the
        int8 evaluation and the measurements read them."""
        if self.trainer is None:
            return torch.device("cpu")
        return self.trainer.strategy.root_device

    def _require_setup(self) -> None:
        if self.train is None:
            raise RuntimeError(f"{type(self).__name__}.setup() has not run yet")


def _head(split: Split, n: int | None) -> Split:
    return split if n is None else Split(split.x[:n], split.y[:n])


def _number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _count(name: str, value: object, low: int, alternative: str = "") -> None:
    """``data.<name>`` is an integer >= ``low`` (a string or 1.5 named with its key, not a torch error)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"data.{name} must be an integer >= {low}{alternative}, got {value!r}")
