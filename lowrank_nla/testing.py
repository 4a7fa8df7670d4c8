"""Test matrices, assertion helpers and the backend matrix used by the tests and benchmarks.

The matrix generators return float64 NumPy arrays (convert with :meth:`Backend.asarray`).
Nothing here imports pytest, torch or CuPy at import time.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import numpy as np
import scipy.fft

from ._backend import to_numpy

__all__ = [
    "Backend",
    "assert_orthonormal",
    "available_backends",
    "ea_factor",
    "matrix_with_spectrum",
    "rtol_for",
    "to_numpy",
]


def matrix_with_spectrum(
    singular_values: Any,
    *,
    m: int | None = None,
    n: int | None = None,
    symmetric: bool = False,
    rng: Any = 0,
) -> np.ndarray:
    """A float64 matrix ``U diag(s) V^T`` with Haar-random orthonormal ``U``, ``V``.

    With ``symmetric=True`` it is ``U diag(s) U^T`` (``s`` may then be negative). Shape
    ``(m, n)`` defaults to square ``len(s)``; ``len(s) <= min(m, n)``.
    """
    s = np.asarray(singular_values, dtype=np.float64)
    k = s.size
    m = k if m is None else m
    n = k if n is None else n
    gen = np.random.default_rng(rng)

    def haar(rows: int) -> np.ndarray:
        q, r = np.linalg.qr(gen.standard_normal((rows, k)))
        return q * np.sign(np.diag(r))

    U = haar(m)
    if symmetric:
        if m != n:
            raise ValueError("`symmetric=True` needs m == n")
        A = (U * s) @ U.T
        return (A + A.T) / 2
    return (U * s) @ haar(n).T


def ea_factor(
    n: int, *, batch: int = 32, steps: int = 60, decay: float = 0.95, rng: Any = 0
) -> np.ndarray:
    """A K-factor-like PSD matrix: the exponential average of ``steps`` rank-``batch`` updates.

    ``M_k = decay M_{k-1} + (1 - decay) X_k X_k^T / batch`` from ``M_0 = 0``, where the
    columns of ``X_k`` (n x batch) are drawn from a fixed Gaussian with a power-law
    covariance (eigenvalues ``j^-1`` in a dense orthonormal basis) and a slowly drifting
    mean, as layer activations are.
    Its spectrum decays fast (see the algorithm reference, docs/algorithms.md, section
    'Spectrum decay and error bounds'): at most ``batch * s`` eigenvalues
    exceed ``decay^s`` times the largest batch term.
    """
    gen = np.random.default_rng(rng)
    # A random orthonormal basis without an O(n^3) QR: the orthonormal DCT-II matrix with
    # randomly permuted and sign-flipped columns.
    basis = scipy.fft.dct(np.eye(n), norm="ortho", axis=0)
    basis = basis[:, gen.permutation(n)] * gen.choice([-1.0, 1.0], size=n)
    scale = 1.0 / np.sqrt(np.arange(1, n + 1))
    mean = gen.standard_normal(n) / np.sqrt(n)
    blocks = []
    for t in range(steps):
        mean = 0.9 * mean + 0.1 * gen.standard_normal(n) / np.sqrt(n)
        X = basis @ (scale[:, None] * gen.standard_normal((n, batch))) + mean[:, None]
        # weight of step t in the average after `steps` updates
        weight = (1.0 - decay) * decay ** (steps - 1 - t) / batch
        blocks.append(np.sqrt(weight) * X)
    Z = np.concatenate(blocks, axis=1)
    M = Z @ Z.T
    return (M + M.T) / 2


def rtol_for(dtype: Any) -> float:
    """Default relative tolerance ``4 sqrt(eps)`` of a float dtype (NumPy or torch)."""
    name = str(dtype).rsplit(".", 1)[-1].strip("'>")
    return 4.0 * math.sqrt(float(np.finfo(np.dtype(name)).eps))


def assert_orthonormal(Q: Any, *, atol: float | None = None) -> None:
    """Assert ``||Q^T Q - I||_max <= atol`` (default ``10 k eps`` of ``Q``'s dtype)."""
    q = to_numpy(Q).astype(np.float64)
    k = q.shape[1]
    eps = float(np.finfo(to_numpy(Q).dtype).eps)
    atol = 10 * max(k, 1) * eps if atol is None else atol
    defect = float(np.max(np.abs(q.T @ q - np.eye(k)))) if k else 0.0
    if defect > atol:
        raise AssertionError(
            f"columns not orthonormal: max|Q^T Q - I| = {defect:.3e} > {atol:.3e}"
        )


@dataclass(frozen=True)
class Backend:
    """One cell of the backend matrix: an array library, a device and a float dtype.

    ``asarray(x)`` converts a NumPy array to this backend (cast to ``dtype``);
    ``needs_gpu`` marks cells that need CUDA.
    """

    name: str
    xp: Any
    device: Any
    dtype: Any
    convert: Callable[[np.ndarray], Any] = field(repr=False)
    needs_gpu: bool = False

    def asarray(self, x: Any) -> Any:
        return self.convert(np.ascontiguousarray(x))

    @property
    def eps(self) -> float:
        return float(self.xp.finfo(self.dtype).eps)


def _astype(a: np.ndarray, *, dtype: Any) -> np.ndarray:
    return a.astype(dtype)


def _cupy_asarray(a: np.ndarray, *, dtype: Any) -> Any:
    import cupy

    return cupy.asarray(a.astype(dtype))


def available_backends() -> list[Backend]:
    """The backend matrix: NumPy, array_api_strict (every device), torch CPU; CUDA cells.

    Libraries that are not installed are left out. CUDA cells (CuPy, torch CUDA) are listed
    with ``needs_gpu=True`` so that tests can mark and skip them when no GPU is present.
    """
    import array_api_compat

    out: list[Backend] = []
    np_xp = array_api_compat.array_namespace(np.empty(0))
    for dt in (np.float64, np.float32):
        out.append(Backend(f"numpy-{dt.__name__}", np_xp, "cpu", dt, partial(_astype, dtype=dt)))
    try:
        import array_api_strict as xs
    except ImportError:
        pass
    else:
        for dev_name in ("CPU_DEVICE", "device1", "no_float64"):
            dev = xs.Device(dev_name)
            dts = (xs.float32,) if dev_name == "no_float64" else (xs.float64, xs.float32)
            for sdt in dts:
                np_dt = np.float64 if sdt == xs.float64 else np.float32

                def conv(a: np.ndarray, dev: Any = dev, np_dt: Any = np_dt) -> Any:
                    return xs.asarray(a.astype(np_dt), device=dev)

                out.append(Backend(f"strict-{dev_name}-{np_dt.__name__}", xs, dev, sdt, conv))
    try:
        import torch
    except ImportError:
        pass
    else:
        t_xp = array_api_compat.array_namespace(torch.empty(0))
        for dev_name in ("cpu", "cuda"):
            for tdt in (torch.float64, torch.float32):

                def conv_t(a: np.ndarray, tdt: Any = tdt, dev_name: str = dev_name) -> Any:
                    return torch.asarray(a, dtype=tdt, device=dev_name)

                label = str(tdt).rsplit(".", 1)[-1]
                out.append(
                    Backend(
                        f"torch-{dev_name}-{label}",
                        t_xp,
                        dev_name,
                        tdt,
                        conv_t,
                        needs_gpu=dev_name == "cuda",
                    )
                )
    try:
        import cupy as cp  # importable without a GPU; only its use fails
    except ImportError:
        pass
    else:
        for cdt in (np.float64, np.float32):
            out.append(
                Backend(
                    f"cupy-{cdt.__name__}",
                    cp,
                    None,
                    cdt,
                    partial(_cupy_asarray, dtype=cdt),
                    needs_gpu=True,
                )
            )
    return out
