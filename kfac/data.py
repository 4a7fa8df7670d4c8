"""Datasets for the command line and the benchmarks: one embedded default, three file formats.

Nothing is downloaded. The default, :func:`digits28`, is scikit-learn's bundled handwritten
digits (1797 images of 8x8) resized to 28x28, so the MNIST-shaped models run unchanged.
:func:`load` reads real files: MNIST IDX files (optionally gzipped), the CIFAR-10 python
pickles, or an ``.npz`` with ``x_train``, ``y_train``, ``x_test``, ``y_test``.

Every loader returns a :class:`Dataset` of float32 images in ``[0, 1]`` with shape
``(N, C, H, W)`` and int64 labels. Malformed files (corrupt or truncated IDX, gzip, pickle or
``.npz`` data, label and image counts that differ, empty splits, train and test images of
different shapes, NaN images, integer images outside [0, 255], labels that are not
non-negative integers) raise :class:`ValueError` naming the file; missing files
:class:`FileNotFoundError`.
"""

from __future__ import annotations

import gzip
import math
import pickle
import zlib
from pathlib import Path
from typing import NamedTuple

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
    if x.dtype.kind not in "biuf":
        raise ValueError(f"{name}: images must be booleans, integers or floats, not {x.dtype}")
    if np.issubdtype(x.dtype, np.floating) and not np.isfinite(x).all():
        raise ValueError(f"{name}: images contain NaN or infinite values")
    if x.ndim == 3:
        x = x[:, None]
    if x.ndim != 4:
        raise ValueError(
            f"{name}: images must have shape (N, H, W) or (N, C, H, W), got {x.shape}"
        )
    if x.dtype.kind in "iu" and x.size and (x.min() < 0 or x.max() > 255):
        raise ValueError(
            f"{name}: integer images must be in [0, 255] (they are scaled by 1/255), got "
            f"values in [{x.min()}, {x.max()}]"
        )
    t = torch.from_numpy(np.ascontiguousarray(x)).float()
    if np.issubdtype(x.dtype, np.integer):
        t = t / 255.0
    return t


def _labels(y: np.ndarray, n: int, name: str) -> torch.Tensor:
    y = np.asarray(y)
    if y.ndim != 1:
        raise ValueError(f"{name}: labels must be one class index per image, got shape {y.shape}")
    if y.shape[0] != n:
        raise ValueError(f"{name}: {y.shape[0]} labels for {n} images")
    if not (np.issubdtype(y.dtype, np.integer) or np.issubdtype(y.dtype, np.floating)):
        raise ValueError(f"{name}: labels must be integers, got dtype {y.dtype}")
    if np.issubdtype(y.dtype, np.floating) and not (np.isfinite(y) & (y == np.round(y))).all():
        raise ValueError(f"{name}: labels must be integers, got non-integer values")
    if y.size and y.min() < 0:
        raise ValueError(f"{name}: labels must be >= 0, got {y.min()}")
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
    """The array of an IDX file, gzip-compressed or not (told apart by the content, not the
    name); :class:`ValueError` naming ``path`` for a corrupt or truncated one."""
    data = path.read_bytes()
    if data[:2] == b"\x1f\x8b":  # the gzip magic number
        try:
            data = gzip.decompress(data)
        except (OSError, EOFError, zlib.error) as exc:
            raise ValueError(f"{path}: corrupt or truncated gzip data ({exc})") from None
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise ValueError(f"{path}: not an IDX file (bad magic number)")
    if data[2] != 0x08:
        raise ValueError(f"{path}: IDX type code {data[2]:#x} is not unsigned byte (0x08)")
    ndim = data[3]
    if ndim == 0 or len(data) < 4 + 4 * ndim:
        raise ValueError(f"{path}: truncated IDX header ({ndim} dimensions)")
    dims = [int(d) for d in np.frombuffer(data, dtype=">u4", count=ndim, offset=4)]
    body = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if body.size != math.prod(dims):
        raise ValueError(f"{path}: expected {math.prod(dims)} values, found {body.size}")
    return body.reshape(dims).copy()  # frombuffer is read-only


def _find(root: Path, stem: str) -> Path:
    for candidate in (root / stem, root / f"{stem}.gz"):
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(f"{root}: missing {stem} (or {stem}.gz)")


def load_mnist_idx(root: str | Path) -> Dataset:
    """MNIST (or Fashion-MNIST) from the four IDX files in ``root`` (plain or ``.gz``;
    gzip data is recognised by its content, whatever the name)."""
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
        try:
            with open(path, "rb") as f:
                batch = pickle.load(f, encoding="bytes")
            x = np.asarray(batch[b"data"], dtype=np.uint8)
            y = np.asarray(batch[b"labels"])
        except (pickle.UnpicklingError, EOFError, KeyError, TypeError, ValueError) as exc:
            raise ValueError(
                f"{path}: not a CIFAR-10 batch (a pickled dict with b'data' and b'labels'): "
                f"{type(exc).__name__}: {exc}"
            ) from None
        if x.ndim != 2 or x.shape[1] != 3 * 32 * 32:
            raise ValueError(f"{path}: data must have shape (N, 3072), got {x.shape}")
        return x.reshape(-1, 3, 32, 32), y

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
    try:
        f = np.load(path)
    except (OSError, EOFError, ValueError) as exc:  # empty, corrupt or a pickle
        raise ValueError(f"{path}: not a readable .npz file ({exc})") from None
    if not isinstance(f, np.lib.npyio.NpzFile):
        raise ValueError(f"{path}: a single .npy array, not an .npz archive")
    with f:
        missing = [k for k in ("x_train", "y_train", "x_test", "y_test") if k not in f]
        if missing:
            raise ValueError(f"{path}: missing arrays {missing}")
        try:
            arrays = {k: f[k] for k in ("x_train", "y_train", "x_test", "y_test")}
        except (OSError, EOFError, ValueError) as exc:  # e.g. object arrays, bad members
            raise ValueError(f"{path}: unreadable array ({exc})") from None
    return _from_arrays(Path(path).stem, arrays, str(path))


def _from_arrays(name: str, arrays: dict[str, np.ndarray], where: str) -> Dataset:
    x_train = _images(arrays["x_train"], where)
    x_test = _images(arrays["x_test"], where)
    for split, x in (("training", x_train), ("test", x_test)):
        if x.shape[0] == 0:
            raise ValueError(f"{where}: no {split} images")
    if x_train.shape[1:] != x_test.shape[1:]:
        raise ValueError(
            f"{where}: training images of shape {tuple(x_train.shape[1:])} but test images "
            f"of shape {tuple(x_test.shape[1:])}"
        )
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
    if p.is_file() and p.suffix.lower() == ".npz":
        return load_npz(p)
    if p.is_dir():
        if (p / "data_batch_1").exists() or (p / "cifar-10-batches-py").is_dir():
            return load_cifar10(p)
        return load_mnist_idx(p)
    raise FileNotFoundError(
        f"{path}: expected an .npz file, a CIFAR-10 directory or an MNIST IDX directory"
    )
