"""Data: in-memory DataModules for the small datasets, offline sources first."""

from kd.data.base import DataNotFoundError, EvalShardSampler, IndexedTensorDataset, Split, TensorDataModule, random_crop_flip
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
    "CIFAR10DataModule",
    "CIFAR100DataModule",
    "DataNotFoundError",
    "DigitsDataModule",
    "EvalShardSampler",
    "FashionMNISTDataModule",
    "IndexedTensorDataset",
    "MNISTDataModule",
    "Split",
    "TensorDataModule",
    "TorchvisionDataModule",
    "random_crop_flip",
]
