"""Data: in-memory DataModules for the small datasets, offline sources first."""

from kd.data.base import DataNotFoundError, Split, TensorDataModule
from kd.data.batches import EpochBatches, EpochShuffleSampler, EvalShardSampler, IndexedTensorDataset, calibration_batches, labelled_batches, random_crop_flip
from kd.data.idx import read_idx
from kd.data.sources import (
    CIFAR10DataModule,
    CIFAR100DataModule,
    DigitsDataModule,
    FashionMNISTDataModule,
    MNISTDataModule,
    TorchvisionDataModule,
)

__all__ = [
    "calibration_batches",
    "CIFAR10DataModule",
    "CIFAR100DataModule",
    "DataNotFoundError",
    "DigitsDataModule",
    "EpochBatches",
    "EpochShuffleSampler",
    "EvalShardSampler",
    "FashionMNISTDataModule",
    "IndexedTensorDataset",
    "labelled_batches",
    "MNISTDataModule",
    "Split",
    "TensorDataModule",
    "TorchvisionDataModule",
    "random_crop_flip",
    "read_idx",
]
