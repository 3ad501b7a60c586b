"""Small image datasets for demos and experiments, read from local files only (never downloaded)."""

from __future__ import annotations

import gzip
import os
from pathlib import Path
from typing import Literal

import numpy as np
import torch

_IDX_MAGIC = {1: 2049, 3: 2051}  # labels, images
_MNIST_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


def load_digits_split(
    seed: int = 0, n_test: int = 297
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """scikit-learn's bundled 8x8 digits as (x_train, y_train, x_test, y_test), split by a seeded shuffle.

    Images are float32 ``[n, 64]`` scaled to [0, 1]; labels are int64. With the
    default ``n_test`` the 1797 images split into 1500 training and 297 test images.
    """
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise ImportError("the digits dataset needs scikit-learn: pip install 'dvemb[demo]'") from None
    digits = load_digits()
    x = torch.from_numpy(digits.data.astype(np.float32) / 16.0)
    y = torch.from_numpy(digits.target.astype(np.int64))
    if not 0 < n_test < len(y):
        raise ValueError(f"n_test must lie in [1, {len(y) - 1}], got {n_test}")
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    test, train = order[:n_test], order[n_test:]
    return x[train], y[train], x[test], y[test]


def load_mnist(
    data_dir: str | os.PathLike, split: Literal["train", "test"] = "train", limit: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """MNIST from the standard idx files in ``data_dir`` as (images float32 [n, 28, 28] in [0, 1], labels int64).

    Reads ``train-images-idx3-ubyte.gz`` and friends (or their uncompressed forms);
    ``limit`` keeps the first ``limit`` examples and reads only those bytes.
    """
    if split not in _MNIST_FILES:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    if limit is not None and limit < 0:
        raise ValueError(f"limit must be >= 0 or None, got {limit}")
    image_name, label_name = _MNIST_FILES[split]
    images = _read_idx(_find_idx(Path(data_dir), image_name), ndim=3, limit=limit)
    labels = _read_idx(_find_idx(Path(data_dir), label_name), ndim=1, limit=limit)
    if len(images) != len(labels):
        raise ValueError(f"MNIST {split} in {data_dir}: {len(images)} images but {len(labels)} labels")
    return torch.from_numpy(images.astype(np.float32) / 255.0), torch.from_numpy(labels.astype(np.int64))


def _find_idx(data_dir: Path, name: str) -> Path:
    for candidate in (data_dir / f"{name}.gz", data_dir / name):
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(
        f"MNIST file {name}.gz not found in {data_dir}; put the four standard idx files "
        "(train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, t10k-...) there (dvemb never downloads data)")


def _read_idx(path: Path, ndim: int, limit: int | None) -> np.ndarray:
    """Read an unsigned-byte idx file: big-endian int32 magic and sizes, then uint8 data."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        header = np.frombuffer(f.read(4 * (1 + ndim)), dtype=">i4")
        if len(header) != 1 + ndim or header[0] != _IDX_MAGIC[ndim]:
            raise ValueError(f"{path} is not an idx{ndim} ubyte file (magic {header[:1].tolist()})")
        shape = [int(s) for s in header[1:]]
        if limit is not None:
            shape[0] = min(shape[0], limit)
        count = int(np.prod(shape))
        data = np.frombuffer(f.read(count), dtype=np.uint8)
    if data.size != count:
        raise ValueError(f"{path} is truncated: expected {count} bytes of data, found {data.size}")
    return data.reshape(shape)
