"""Data: splits, the IDX reader, batched fetching, augmentation and missing-data messages."""

import gzip
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from kd.data import (
    CIFAR10DataModule,
    DataNotFoundError,
    DigitsDataModule,
    EvalShardSampler,
    FashionMNISTDataModule,
    IndexedTensorDataset,
    MNISTDataModule,
    random_crop_flip,
    read_idx,
)

DEBIAN_FASHION = Path("/usr/share/datasets/fashion-mnist")


def test_digits_split_is_disjoint_complete_and_seeded():
    dm = DigitsDataModule(split_seed=3)
    dm.setup()
    sizes = [len(s.y) for s in (dm.train, dm.val, dm.test)]
    assert sum(sizes) == 1797 and sizes[2] == round(0.2 * 1797)
    assert dm.input_shape == (1, 8, 8) and dm.num_classes == 10
    # train statistics are normalised to mean 0, std 1 per channel
    assert dm.train.x.mean().abs() < 1e-4 and (dm.train.x.std() - 1).abs() < 1e-3
    again = DigitsDataModule(split_seed=3)
    again.setup()
    assert torch.equal(dm.test.x, again.test.x)
    other = DigitsDataModule(split_seed=4)
    other.setup()
    assert not torch.equal(dm.test.y, other.test.y)


def test_limits_slice_the_splits():
    dm = DigitsDataModule(limit_train=100, limit_eval=50)
    dm.setup()
    assert (len(dm.train.y), len(dm.val.y), len(dm.test.y)) == (100, 50, 50)


def test_batches_carry_sample_indices_into_their_split():
    dm = DigitsDataModule(batch_size=32)
    dm.setup()
    x, y, index = next(iter(dm.train_dataloader()))
    assert x.shape == (32, 1, 8, 8) and y.shape == (32,) and index.shape == (32,)
    assert torch.equal(dm.train.x[index], x) and torch.equal(dm.train.y[index], y)


def test_dataset_refuses_mismatched_lengths():
    with pytest.raises(ValueError, match="3 inputs but 2 labels"):
        IndexedTensorDataset(torch.zeros(3, 1), torch.zeros(2))


def _write_idx(path: Path, array: np.ndarray, code: int = 0x08) -> None:
    header = bytes([0, 0, code, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.tobytes())


def test_idx_reader_roundtrips_gzip_files(tmp_path):
    images = np.random.default_rng(0).integers(0, 256, (5, 28, 28), dtype=np.uint8)
    _write_idx(tmp_path / "x.gz", images)
    assert np.array_equal(read_idx(tmp_path / "x.gz"), images)


def test_idx_reader_rejects_truncated_files(tmp_path):
    images = np.zeros((5, 4, 4), dtype=np.uint8)
    path = tmp_path / "x.gz"
    header = bytes([0, 0, 8, 3]) + struct.pack(">3I", 5, 4, 4)
    with gzip.open(path, "wb") as f:
        f.write(header + images.tobytes()[:-7])
    with pytest.raises(ValueError, match="truncated or corrupt"):
        read_idx(path)


def test_fashion_mnist_loads_from_a_folder_of_idx_files(tmp_path):
    rng = np.random.default_rng(1)
    for split, n in (("train", 120), ("t10k", 30)):
        _write_idx(tmp_path / f"{split}-images-idx3-ubyte.gz", rng.integers(0, 256, (n, 28, 28), dtype=np.uint8))
        _write_idx(tmp_path / f"{split}-labels-idx1-ubyte.gz", rng.integers(0, 10, (n,), dtype=np.uint8))
    dm = FashionMNISTDataModule(root=str(tmp_path), val_fraction=0.25)
    dm.prepare_data()
    dm.setup()
    assert (len(dm.train.y), len(dm.val.y), len(dm.test.y)) == (90, 30, 30)
    assert dm.input_shape == (1, 28, 28) and dm.num_classes == 10


def test_missing_fashion_mnist_says_how_to_get_it(tmp_path):
    with pytest.raises(DataNotFoundError, match="apt-get install dataset-fashion-mnist"):
        FashionMNISTDataModule(root=str(tmp_path)).prepare_data()


@pytest.mark.parametrize("cls", [MNISTDataModule, CIFAR10DataModule])
def test_missing_torchvision_data_says_how_to_get_it(cls, tmp_path):
    with pytest.raises(DataNotFoundError, match="data.download=true"):
        cls(root=str(tmp_path)).prepare_data()


@pytest.mark.skipif(not DEBIAN_FASHION.is_dir(), reason="Debian package dataset-fashion-mnist not installed")
def test_real_fashion_mnist_slice():
    dm = FashionMNISTDataModule(limit_train=512, limit_eval=256)
    dm.setup()
    assert (len(dm.train.y), len(dm.test.y)) == (512, 256)
    assert set(dm.train.y.tolist()) == set(range(10))


def test_random_crop_flip_moves_content_but_keeps_shape():
    torch.manual_seed(0)
    x = torch.arange(2 * 3 * 8 * 8, dtype=torch.float).reshape(2, 3, 8, 8) + 1
    out = random_crop_flip(x, padding=2)
    assert out.shape == x.shape
    # every output row is a (possibly shifted, flipped, zero-padded) row of the input
    assert not torch.equal(out, x) or not torch.equal(random_crop_flip(x, 2), x)
    assert set(out.unique().tolist()) <= set(x.unique().tolist()) | {0.0}


def test_jitter_without_flips_only_shifts_the_image():
    torch.manual_seed(0)
    x = torch.zeros(64, 1, 9, 9)
    x[:, 0, 4, 3] = 1.0  # one pixel left of centre: a flip would move it to column 5 +- 2
    out = random_crop_flip(x, padding=2, flip=False)
    rows, cols = (out[:, 0] == 1.0).nonzero()[:, 1:].T
    assert out.sum() == 64 and rows.sub(4).abs().max() <= 2 and cols.sub(3).abs().max() <= 2
    assert len(set(zip(rows.tolist(), cols.tolist()))) > 10  # the shifts vary across the batch
    # with flips, about half the images are mirrored: column 8 - (3 +- 2)
    flipped = (random_crop_flip(x, padding=0, flip=True)[:, 0, 4, 5] == 1.0).float().mean()
    assert 0.25 < flipped < 0.75


def test_augmentation_turns_the_teacher_cache_off():
    assert DigitsDataModule().deterministic_inputs
    assert not DigitsDataModule(augment=True).deterministic_inputs


@pytest.mark.parametrize("world", [1, 2, 3, 8])
def test_eval_shards_count_every_sample_exactly_once(world):
    dataset = IndexedTensorDataset(torch.zeros(359, 1), torch.zeros(359))
    seen = [i for rank in range(world) for i in EvalShardSampler(dataset, num_replicas=world, rank=rank)]
    assert sorted(seen) == list(range(359))
    assert sum(len(EvalShardSampler(dataset, world, r)) for r in range(world)) == 359
