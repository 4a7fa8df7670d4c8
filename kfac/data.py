"""Datasets for the command line and the benchmarks: one embedded default, three file formats.

Nothing is downloaded. The default, :func:`digits28`, is scikit-learn's bundled handwritten
digits (1797 images of 8x8) resized to 28x28, so the MNIST-shaped models run unchanged.
:func:`load` reads real files: MNIST IDX files (optionally gzipped), the CIFAR-10 python
pickles, or an ``.npz`` with ``x_train``, ``y_train``, ``x_test``, ``y_test``.

Every loader returns a :class:`Dataset` of float32 images in ``[0, 1]`` with shape
``(N, C, H, W)`` and int64 labels.
"""

from __future__ import annotations

import gzip
import pickle
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from torch.nn import functional as F

__all__ = ["Dataset", "digits28", "load", "load_cifar10", "load_mnist_idx", "load_npz"]


class Dataset(NamedTuple):
    """Train/test split: images ``(N, C, H, W)`` float32 in [0, 1], labels int64."""

    name: str
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.x_train.shape[1:])  # type: ignore[return-value]

    @property
    def num_classes(self) -> int:
        return int(max(int(self.y_train.max()), int(self.y_test.max()))) + 1


def _images(x: np.ndarray, name: str) -> torch.Tensor:
    x = np.asarray(x)
    if x.ndim == 3:
        x = x[:, None]
    if x.ndim != 4:
        raise ValueError(
            f"{name}: images must have shape (N, H, W) or (N, C, H, W), got {x.shape}"
        )
    t = torch.from_numpy(np.ascontiguousarray(x)).float()
    if np.issubdtype(x.dtype, np.integer):
        t = t / 255.0
    return t


def _labels(y: np.ndarray, n: int, name: str) -> torch.Tensor:
    y = np.asarray(y).reshape(-1)
    if y.shape[0] != n:
        raise ValueError(f"{name}: {y.shape[0]} labels for {n} images")
    return torch.from_numpy(y.astype(np.int64))


def digits28(test_fraction: float = 1 / 6, seed: int = 0) -> Dataset:
    """scikit-learn's handwritten digits, bilinearly resized from 8x8 to 28x28.

    A fixed permutation (``seed``) splits train and test.
    """
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.from_numpy(digits.images.astype(np.float32) / 16.0)[:, None]
    x = F.interpolate(x, size=(28, 28), mode="bilinear", align_corners=False).clamp(0.0, 1.0)
    y = torch.from_numpy(digits.target.astype(np.int64))
    perm = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(seed))
    n_test = round(test_fraction * x.shape[0])
    test, train = perm[:n_test], perm[n_test:]
    return Dataset("digits28", x[train], y[train], x[test], y[test])


def _read_idx(path: Path) -> np.ndarray:
    opener: Any = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise ValueError(f"{path}: not an IDX file (bad magic number)")
    if data[2] != 0x08:
        raise ValueError(f"{path}: IDX type code {data[2]:#x} is not unsigned byte (0x08)")
    ndim = data[3]
    dims = np.frombuffer(data, dtype=">u4", count=ndim, offset=4).astype(int)
    body = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if body.size != int(np.prod(dims)):
        raise ValueError(f"{path}: expected {int(np.prod(dims))} values, found {body.size}")
    return body.reshape(dims).copy()  # frombuffer is read-only


def _find(root: Path, stem: str) -> Path:
    for candidate in (root / stem, root / f"{stem}.gz"):
        if candidate.exists():
            return candidate
    raise FileNotFoundError(f"{root}: missing {stem} (or {stem}.gz)")


def load_mnist_idx(root: str | Path) -> Dataset:
    """MNIST (or Fashion-MNIST) from the four IDX files in ``root`` (plain or ``.gz``)."""
    root = Path(root)
    arrays = {
        key: _read_idx(_find(root, stem))
        for key, stem in [
            ("x_train", "train-images-idx3-ubyte"),
            ("y_train", "train-labels-idx1-ubyte"),
            ("x_test", "t10k-images-idx3-ubyte"),
            ("y_test", "t10k-labels-idx1-ubyte"),
        ]
    }
    return _from_arrays("mnist", arrays, str(root))


def load_cifar10(root: str | Path) -> Dataset:
    """CIFAR-10 from the python pickles (``data_batch_1..5``, ``test_batch``) in ``root``."""
    root = Path(root)
    if (root / "cifar-10-batches-py").is_dir():
        root = root / "cifar-10-batches-py"

    def read(name: str) -> tuple[np.ndarray, np.ndarray]:
        path = root / name
        if not path.exists():
            raise FileNotFoundError(f"{root}: missing CIFAR-10 batch {name}")
        with open(path, "rb") as f:
            batch = pickle.load(f, encoding="bytes")
        x = np.asarray(batch[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32)
        return x, np.asarray(batch[b"labels"])

    train = [read(f"data_batch_{i}") for i in range(1, 6)]
    x_test, y_test = read("test_batch")
    arrays = {
        "x_train": np.concatenate([x for x, _ in train]),
        "y_train": np.concatenate([y for _, y in train]),
        "x_test": x_test,
        "y_test": y_test,
    }
    return _from_arrays("cifar10", arrays, str(root))


def load_npz(path: str | Path) -> Dataset:
    """An ``.npz`` with ``x_train``, ``y_train``, ``x_test``, ``y_test`` (uint8 images are
    scaled by 1/255, float images used as they are)."""
    with np.load(path) as f:
        missing = [k for k in ("x_train", "y_train", "x_test", "y_test") if k not in f]
        if missing:
            raise ValueError(f"{path}: missing arrays {missing}")
        arrays = {k: f[k] for k in ("x_train", "y_train", "x_test", "y_test")}
    return _from_arrays(Path(path).stem, arrays, str(path))


def _from_arrays(name: str, arrays: dict[str, np.ndarray], where: str) -> Dataset:
    x_train = _images(arrays["x_train"], where)
    x_test = _images(arrays["x_test"], where)
    return Dataset(
        name,
        x_train,
        _labels(arrays["y_train"], x_train.shape[0], where),
        x_test,
        _labels(arrays["y_test"], x_test.shape[0], where),
    )


def load(path: str | Path | None = None) -> Dataset:
    """The dataset at ``path``: an ``.npz`` file, a CIFAR-10 directory or an MNIST IDX
    directory; :func:`digits28` when ``path`` is ``None``."""
    if path is None:
        return digits28()
    p = Path(path)
    if p.is_file() and p.suffix == ".npz":
        return load_npz(p)
    if p.is_dir():
        if (p / "data_batch_1").exists() or (p / "cifar-10-batches-py").is_dir():
            return load_cifar10(p)
        return load_mnist_idx(p)
    raise FileNotFoundError(
        f"--data {path}: expected an .npz file, a CIFAR-10 directory or an MNIST IDX directory"
    )
