"""The datasets: where each comes from and how it reaches memory.

Offline first: scikit-learn's digits ship inside its wheel; Fashion-MNIST is read from the
IDX files that Debian's ``dataset-fashion-mnist`` package installs. MNIST and CIFAR come
through torchvision from ``root``, downloaded only when the user sets ``download=true``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from kd.data.base import DataNotFoundError, Split, TensorDataModule
from kd.data.idx import read_idx

FASHION_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)  # fmt: skip
DIGIT_CLASSES = tuple(str(d) for d in range(10))


def _images(array: np.ndarray, scale: float) -> torch.Tensor:
    """uint8 ``(N, H, W)`` or ``(N, H, W, C)`` array -> float ``(N, C, H, W)`` in ``[0, 1]``."""
    x = torch.as_tensor(np.ascontiguousarray(array)).float() / scale
    if x.ndim == 3:
        return x.unsqueeze(1)  # (N, H, W) -> (N, 1, H, W)
    return x.permute(0, 3, 1, 2).contiguous()  # (N, H, W, C) -> (N, C, H, W)


class DigitsDataModule(TensorDataModule):
    """scikit-learn's 8x8 handwritten digits (1,797 images, 10 classes); ships with the wheel.

    It has no official test split: ``test_fraction`` of it is held out with ``split_seed``.
    """

    classes = DIGIT_CLASSES

    def __init__(
        self,
        batch_size: int = 64,
        eval_batch_size: int = 512,
        val_fraction: float = 0.1,
        test_fraction: float = 0.2,
        split_seed: int = 0,
        limit_train: int | None = None,
        limit_eval: int | None = None,
        augment: bool = False,
        augment_padding: int = 4,
        augment_flip: bool = True,
    ) -> None:
        super().__init__(batch_size, eval_batch_size, val_fraction, split_seed, limit_train, limit_eval, augment,
                         augment_padding, augment_flip)  # fmt: skip
        if isinstance(test_fraction, bool) or not isinstance(test_fraction, (int, float)) or not 0.0 < test_fraction < 1.0:
            raise ValueError(f"data.test_fraction must lie in (0, 1), got {test_fraction!r}")
        self.test_fraction = test_fraction

    def load(self) -> tuple[Split, None]:
        from sklearn.datasets import load_digits

        digits = load_digits()
        x = _images(digits.images, scale=16.0)  # pixel values are 0..16
        return Split(x, torch.as_tensor(digits.target, dtype=torch.long)), None

    def source(self) -> str:
        return f"sklearn-digits(test_fraction={self.test_fraction})"


class FashionMNISTDataModule(TensorDataModule):
    """Fashion-MNIST (Xiao et al. 2017): 60k/10k 28x28 grey images of 10 clothing classes.

    Args:
        root: folder holding ``train-images-idx3-ubyte(.gz)`` and the three sibling files;
            the default is where Debian's ``dataset-fashion-mnist`` package puts them.
        Others: see ``TensorDataModule``.
    """

    classes = FASHION_CLASSES
    FILES = {
        "train_x": "train-images-idx3-ubyte",
        "train_y": "train-labels-idx1-ubyte",
        "test_x": "t10k-images-idx3-ubyte",
        "test_y": "t10k-labels-idx1-ubyte",
    }

    def __init__(
        self,
        root: str = "/usr/share/datasets/fashion-mnist",
        batch_size: int = 128,
        eval_batch_size: int = 1024,
        val_fraction: float = 1 / 12,
        split_seed: int = 0,
        limit_train: int | None = None,
        limit_eval: int | None = None,
        augment: bool = False,
        augment_padding: int = 4,
        augment_flip: bool = True,
    ) -> None:
        super().__init__(batch_size, eval_batch_size, val_fraction, split_seed, limit_train, limit_eval, augment,
                         augment_padding, augment_flip)  # fmt: skip
        self.root = Path(root).expanduser()

    def _path(self, stem: str) -> Path:
        for candidate in (self.root / f"{stem}.gz", self.root / stem):
            if candidate.is_file():
                return candidate
        raise DataNotFoundError(
            f"Fashion-MNIST: {stem}(.gz) not found in {self.root}. Install the Debian package "
            "(`sudo apt-get install dataset-fashion-mnist`, files land in "
            "/usr/share/datasets/fashion-mnist), or download the four IDX files from the "
            "zalandoresearch/fashion-mnist repository and set data.root=<their folder>."
        )

    def prepare_data(self) -> None:
        for stem in self.FILES.values():
            self._path(stem)

    def load(self) -> tuple[Split, Split]:
        arrays = {key: read_idx(self._path(stem)) for key, stem in self.FILES.items()}
        train = Split(_images(arrays["train_x"], 255.0), torch.as_tensor(arrays["train_y"], dtype=torch.long))
        test = Split(_images(arrays["test_x"], 255.0), torch.as_tensor(arrays["test_y"], dtype=torch.long))
        return train, test

    def source(self) -> str:
        return "fashion-mnist"


class TorchvisionDataModule(TensorDataModule):
    """A torchvision dataset read once into memory. Subclasses name the torchvision class.

    Args:
        root: torchvision's ``root`` folder.
        download: fetch the files when they are missing (needs network).
        Others: see ``TensorDataModule``.
    """

    torchvision_name = ""

    def __init__(
        self,
        root: str = "data",
        download: bool = False,
        batch_size: int = 128,
        eval_batch_size: int = 1024,
        val_fraction: float = 0.1,
        split_seed: int = 0,
        limit_train: int | None = None,
        limit_eval: int | None = None,
        augment: bool = False,
        augment_padding: int = 4,
        augment_flip: bool = True,
    ) -> None:
        super().__init__(batch_size, eval_batch_size, val_fraction, split_seed, limit_train, limit_eval, augment,
                         augment_padding, augment_flip)  # fmt: skip
        self.root = Path(root).expanduser()
        self.download = download

    def _dataset(self, train: bool):
        import torchvision.datasets

        cls = getattr(torchvision.datasets, self.torchvision_name)
        try:
            return cls(root=str(self.root), train=train, download=self.download)
        except RuntimeError as err:  # torchvision: "Dataset not found or corrupted ..."
            raise DataNotFoundError(
                f"{self.torchvision_name} was not found under {self.root.resolve()} ({err}). "
                f"Set data.download=true to let torchvision download it there (needs network), "
                f"or data.root=<folder that already holds it>."
            ) from err

    def prepare_data(self) -> None:
        self._dataset(train=True)
        self._dataset(train=False)

    def load(self) -> tuple[Split, Split]:
        splits = []
        for train in (True, False):
            ds = self._dataset(train)
            data = ds.data.numpy() if isinstance(ds.data, torch.Tensor) else np.asarray(ds.data)
            splits.append(Split(_images(data, 255.0), torch.as_tensor(np.asarray(ds.targets), dtype=torch.long)))
        return splits[0], splits[1]

    def source(self) -> str:
        return self.torchvision_name.lower()


class MNISTDataModule(TorchvisionDataModule):
    """MNIST (LeCun et al. 1998), 60k/10k 28x28 digits, through torchvision."""

    torchvision_name = "MNIST"
    classes = DIGIT_CLASSES


class CIFAR10DataModule(TorchvisionDataModule):
    """CIFAR-10 (Krizhevsky 2009), 50k/10k 32x32 colour images, through torchvision."""

    torchvision_name = "CIFAR10"
    classes = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


class CIFAR100DataModule(TorchvisionDataModule):
    """CIFAR-100 (Krizhevsky 2009), 50k/10k 32x32 colour images of 100 classes, through torchvision."""

    torchvision_name = "CIFAR100"
    classes = tuple(f"class_{i}" for i in range(100))
