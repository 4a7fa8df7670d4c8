"""dask.array input: blockwise passes over ``A``, the small work in memory.

A dask matrix ``A`` must be chunked along one dimension only (tall-skinny row blocks
``A_i``, or wide column blocks). Everything of size ``min(m, n) x l`` or smaller (the sketch
``Omega``, the iterates ``V``, the ``l x l`` factors) is a NumPy array in the client's
memory; everything of size ``max(m, n) x l`` stays a dask array on the workers. A *pass* is
one execution of a graph that reads every block of ``A`` once; the routines below are
written so that each pass does as much as one read of a block allows:

* :func:`gram_pass` forms ``A_i V`` and ``A_i^T (A_i V)`` from one read of ``A_i``, so a
  subspace iteration step ``V <- orth(A^T A V)`` costs one pass instead of two (the last
  pass of :func:`dask_svd` also feeds ``A_i V`` to the tall-skinny QR);
* :class:`DaskOperator` presents ``A`` to the generic (operator) algorithms: each product
  ``A @ X`` or ``A.T @ X`` with a NumPy block is one pass and returns NumPy.

dask is imported only when a dask array is seen (it is then already in ``sys.modules``).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from ._backend import all_finite, normal_sampler, sign_fix
from ._sketch import _normalize_between, warn_if_unresolved
from ._validation import (
    check_block_size,
    check_int,
    check_method,
    check_normalizer,
    check_power_iters,
    check_rank,
)

Array = Any
FAN_IN = 8  # partial sums added per task of the tree reduction


def _dask() -> tuple[Any, Any]:
    import dask
    import dask.array as da

    return dask, da


def _np_namespace() -> Any:
    import array_api_compat.numpy as np_xp

    return np_xp


def check_dask_matrix(A: Any, name: str = "A", *, rows_only: bool = False) -> tuple[Any, int]:
    """Validate a dask matrix; return it (integers cast to float64) and its chunked axis.

    Raises ``ValueError`` for a non-2-D or empty array, unknown chunk sizes, or chunks along
    both dimensions (along columns too, with ``rows_only``), and ``TypeError`` for a
    dtype that is neither real floating nor integer.
    """
    if A.ndim != 2:
        raise ValueError(f"`{name}` must be a 2-D array, got a dask array of shape {A.shape}")
    if any(isinstance(c, float) and math.isnan(c) for dim in A.chunks for c in dim):
        raise ValueError(
            f"`{name}` is a dask array with unknown chunk sizes; call "
            f"`{name}.compute_chunk_sizes()` first"
        )
    if 0 in A.shape:
        raise ValueError(f"`{name}` must not be empty, got shape {A.shape}")
    dtype = np.dtype(A.dtype)
    if dtype == np.bool_ or dtype.kind not in "fiu":
        kind = "complex" if dtype.kind == "c" else str(dtype)
        raise TypeError(f"`{name}` must have a real floating or integer dtype, got {kind}")
    if dtype.kind in "iu":
        A = A.astype(np.float64)
    elif dtype not in (np.float32, np.float64):
        raise TypeError(f"`{name}` must be float32 or float64 (or integer), got {dtype}")
    rows, cols = A.numblocks
    if cols == 1:
        return A, 0
    if rows == 1 and not rows_only:
        return A, 1
    hint = f"`{name}.rechunk({{1: -1}})`"
    along = "rows only" if rows_only else "one dimension only (rows, or columns)"
    raise ValueError(
        f"`{name}` must be chunked along {along}, got {rows} x {cols} blocks (chunks "
        f"{A.chunksize}); rechunk with {hint} (tall-skinny row blocks)"
    )


def _gram_block(block: np.ndarray, V: np.ndarray) -> np.ndarray:
    """``A_i^T (A_i V)`` in the block's dtype, as a ``1 x n x l`` float64 partial sum."""
    Y = block @ V.astype(block.dtype, copy=False)
    return (block.T @ Y).astype(np.float64)[None]


def _product_block(block: np.ndarray, X: np.ndarray) -> np.ndarray:
    return block @ X.astype(block.dtype, copy=False)


def _transposed_product_block(block: np.ndarray, X: np.ndarray) -> np.ndarray:
    """``A_i^T X_i`` as a ``1 x n x c`` float64 partial sum."""
    return (block.T @ X.astype(block.dtype, copy=False)).astype(np.float64)[None]


def _meta(dtype: Any, ndim: int) -> np.ndarray:
    return np.empty((0,) * ndim, dtype=dtype)  # no meta-inference call of the block functions


def _small(da: Any, X: np.ndarray) -> Any:
    """A NumPy block as a one-chunk dask array: one key shared by every block's task."""
    return da.from_array(X, chunks=X.shape)


def _products(da: Any, A: Any, X: np.ndarray) -> Any:
    """``A X`` for row-chunked ``A``: the blocks ``A_i X`` (``A``'s dtype), chunked as ``A``."""
    return da.blockwise(
        _product_block,
        "ik",
        A,
        "ij",
        _small(da, X),
        "jk",
        concatenate=True,  # j is one chunk: the function gets the blocks themselves
        dtype=A.dtype,
        meta=_meta(A.dtype, 2),
    )


def _sum_of_parts(parts: Any) -> Any:
    """Sum the ``1 x n x c`` partial sums by a tree of ``FAN_IN``-way additions."""
    return parts.sum(axis=0, split_every=FAN_IN, dtype=np.float64)


def _gram(da: Any, A: Any, V: np.ndarray) -> Any:
    """``A^T A V`` (float64), each block read once: ``sum_i A_i^T (A_i V)``."""
    parts = da.blockwise(
        _gram_block,
        "ijk",
        A,
        "ij",
        _small(da, V),
        "jk",
        adjust_chunks={"i": 1},
        dtype=np.float64,
        meta=_meta(np.float64, 3),
    )
    return _sum_of_parts(parts)


def _transposed_products(da: Any, A: Any, X: Any) -> Any:
    """``A^T X`` (float64) for row-chunked ``A`` and ``X`` chunked like ``A``'s rows."""
    parts = da.blockwise(
        _transposed_product_block,
        "ijk",
        A,
        "ij",
        X,
        "ik",
        adjust_chunks={"i": 1},
        dtype=np.float64,
        meta=_meta(np.float64, 3),
    )
    return _sum_of_parts(parts)


def _check_sum(Z: np.ndarray, dtype: Any, what: str) -> None:
    if not np.all(np.isfinite(Z)):
        raise ValueError(
            f"`A` must not contain NaN or Inf: the product {what} is not finite (NaN/Inf "
            f"in `A`, or a product that overflowed {np.dtype(dtype).name})"
        )


def gram_pass(A: Any, V: np.ndarray) -> np.ndarray:
    """One pass over the row blocks of ``A``: ``Z = A^T A V`` (NumPy, float64).

    The block products run in ``A``'s dtype; the partial sums ``A_i^T (A_i V)`` are added in
    float64. The graph is blockwise: the task that produces ``A_i`` feeds the products
    directly (and fuses with them where dask's graph optimization allows).
    """
    _, da = _dask()
    Z = np.asarray(_gram(da, A, V).compute())
    _check_sum(Z, A.dtype, "A^T A V")
    return Z


def _draw(rng: Any) -> Any:
    """Gaussian sketches on the host in float64 (``rng`` as for the in-memory routines)."""
    return normal_sampler(_np_namespace(), rng, dtype=np.float64, device=None)


def _iterate(A: Any, size: int, power_iters: int, normalizer: str, rng: Any) -> np.ndarray:
    """``V`` spanning ``(A^T A)^q Omega`` by ``q`` passes, normalized in memory (float64)."""
    np_xp = _np_namespace()
    V = _draw(rng)((A.shape[1], size))
    for _ in range(power_iters):
        Z = gram_pass(A, V)
        V = _normalize_between(np_xp, Z, normalizer, "`A`")
    return V


def _check_common(power_iters: Any, normalizer: Any, method: Any) -> tuple[int, str]:
    power_iters = check_power_iters(power_iters)
    normalizer = check_normalizer(normalizer)
    if check_method(method, normalizer) != "subspace":
        raise ValueError(
            "`method` must be 'subspace' for a dask array `A` (the block Krylov basis would "
            "need a tall block per iteration); compute `A` in memory for 'block_krylov'"
        )
    return power_iters, normalizer


def dask_range_finder(
    A: Any, size: Any, *, power_iters: Any, normalizer: Any, rng: Any, method: Any
) -> Any:
    """:func:`~lowrank_nla.randomized_range_finder` of a row-chunked dask ``A``.

    ``q`` passes build ``V = orth((A^T A)^q Omega)`` in memory; pass ``q + 1`` computes
    ``Y = A V`` and its tall-skinny QR ``Y = Q R`` together (``Y`` is not kept); ``Q`` is
    returned persisted, chunked like ``A``'s rows. ``range(Y)`` equals
    ``range((A A^T)^q A Omega)``: the subspace of the in-memory routine.
    """
    dask, da = _dask()
    A, _ = check_dask_matrix(A, rows_only=True)
    size = check_rank(size, A.shape, "size")
    power_iters, normalizer = _check_common(power_iters, normalizer, method)
    V = _iterate(A, size, power_iters, normalizer, rng)
    # one pass: each Y_i = A_i V goes straight into the first level of the tall-skinny QR
    Q, R = dask.persist(*da.linalg.tsqr(_products(da, A, V)))
    _check_sum(np.asarray(R.compute()), A.dtype, "A V")  # a NaN/Inf in Y reaches R
    return Q


def dask_svd(
    A: Any,
    rank: Any,
    *,
    oversample: Any,
    power_iters: Any,
    normalizer: Any,
    rng: Any,
    method: Any,
    block_size: Any = None,
) -> Any:
    """:func:`~lowrank_nla.randomized_svd` of a dask ``A`` in ``q + 1`` passes.

    Row blocks (column blocks are handled as the row blocks of ``A^T``): ``q`` passes of
    ``V <- orth(A^T A V)``; pass ``q + 1`` forms ``Y = A V``, ``Z = A^T Y = (Y^T A)^T`` and
    the tall-skinny QR ``Y = Q_Y R`` together (``Q_Y`` persisted, ``Y`` not kept). With the SVD
    ``R = P Sigma W^T``, ``Q = Q_Y P`` is an orthonormal basis of ``range(Y)`` and
    ``Q^T A = Sigma^-1 W^T Z^T`` for the directions with ``Sigma_j > sqrt(eps) Sigma_1``
    (the others are at the rounding level of ``Y``: their rows are set to zero). Then
    ``Q^T A = U_B S Vh`` in memory and ``U = Q U_B`` stays on the workers.
    """
    from ._svd import SVDResult

    dask, da = _dask()
    A, axis = check_dask_matrix(A)
    rank = check_rank(rank, A.shape)
    oversample = check_int(oversample, "oversample", minimum=0)
    power_iters, normalizer = _check_common(power_iters, normalizer, method)
    check_block_size(block_size, "subspace", rank, power_iters, A.shape)  # None only
    if axis == 1:
        T = _dask_svd_rows(dask, da, A.T, rank, oversample, power_iters, normalizer, rng)
        # A = (A^T)^T = V S U^T; keep the sign convention on the left factor
        U, S, Vh = T.Vh.T, T.S, T.U.T
        signs = sign_fix(_np_namespace(), U)
        return SVDResult(U * signs, S, Vh * signs[:, None])
    return _dask_svd_rows(
        dask, da, A, rank, oversample, power_iters, normalizer, rng, fix_signs=True
    )


def _column_extremes(block: np.ndarray) -> np.ndarray:
    """The largest and the negated smallest entry of each column (``1 x 2 x k``)."""
    return np.stack([block.max(axis=0), -block.min(axis=0)])[None]


def _dask_sign_fix(da: Any, Qy: Any, M: np.ndarray) -> np.ndarray:
    """:func:`~lowrank_nla._backend.sign_fix` of ``U = Q_Y M`` (reads ``Q_Y``, not ``A``)."""
    parts = da.blockwise(
        _column_extremes,
        "ijk",
        _products(da, Qy, M),
        "ik",
        new_axes={"j": 2},
        adjust_chunks={"i": 1},
        dtype=M.dtype,
        meta=_meta(M.dtype, 3),
    )
    vmax, neg_vmin = np.asarray(parts.max(axis=0).compute())
    return np.where(vmax >= neg_vmin, 1.0, -1.0).astype(M.dtype)


def _dask_svd_rows(
    dask: Any,
    da: Any,
    A: Any,
    rank: int,
    oversample: int,
    power_iters: int,
    normalizer: str,
    rng: Any,
    *,
    fix_signs: bool = False,
) -> Any:
    from ._svd import SVDResult

    m, n = A.shape
    size = min(rank + oversample, m, n)
    V = _iterate(A, size, power_iters, normalizer, rng)
    # the last pass: A_i feeds Y_i = A_i V, which feeds both A_i^T Y_i and the first level of
    # the tall-skinny QR of Y; only Q_Y (persisted), R and Z are kept, never Y itself
    Y = _products(da, A, V)
    Qy, R = da.linalg.tsqr(Y)
    Qy, R, Z = dask.persist(Qy, R, _transposed_products(da, A, Y))
    del Y
    Z = np.asarray(Z.compute())
    _check_sum(Z, A.dtype, "A^T A V")
    R = np.asarray(R.compute(), dtype=np.float64)
    P, sigma, Wt = np.linalg.svd(R)
    keep = sigma > math.sqrt(float(np.finfo(A.dtype).eps)) * sigma[0]
    B = np.zeros((size, n))
    B[keep] = (Wt[keep] @ Z.T) / sigma[keep, None]  # Sigma^-1 W^T Z^T on the kept rows
    if not all_finite(_np_namespace(), B):
        _check_sum(B, A.dtype, "Q^T A")
    U_B, S, Vh = np.linalg.svd(B, full_matrices=False)
    S = S[:rank]
    # the singular values of Y = A V (not S, whose dropped directions are exact zeros)
    warn_if_unresolved(
        _np_namespace(),
        sigma,
        rank,
        2,
        A.dtype,
        "randomized_svd",
        "compute with float64 blocks (`A.astype('float64')`) or in memory",
        stacklevel=5,
    )
    M = (P @ U_B[:, :rank]).astype(A.dtype)
    Vh = Vh[:rank].astype(A.dtype)
    if fix_signs:  # the sign convention of the in-memory routine, folded into M and Vh
        signs = _dask_sign_fix(da, Qy, M)
        M, Vh = M * signs, Vh * signs[:, None]
    U = Qy @ M  # blockwise on the persisted Q_Y: no pass over A
    return SVDResult(U, S.astype(A.dtype), Vh)


class DaskOperator:
    """A dask matrix chunked along one dimension as a linear operator of NumPy blocks.

    ``A @ X`` and ``A.T @ X`` (``X`` a NumPy block) each read every block of ``A`` once
    (one pass) and return NumPy arrays: the blocks' products are concatenated along the
    chunked dimension, or summed (in float64, by a tree of additions) across it.
    """

    def __init__(self, A: Any, axis: int, *, transposed: bool = False) -> None:
        self._A = A
        self._axis = axis
        self._transposed = transposed
        m, n = (int(s) for s in A.shape)
        self.shape = (n, m) if transposed else (m, n)
        self.dtype = np.dtype(A.dtype)

    @property
    def T(self) -> DaskOperator:
        return DaskOperator(self._A, self._axis, transposed=not self._transposed)

    def __matmul__(self, X: Any) -> np.ndarray:
        _, da = _dask()
        X = np.asarray(X)
        if X.ndim == 1:  # a vector as a one-column block
            return (self @ X[:, None])[:, 0]
        R = self._A if self._axis == 0 else self._A.T  # row blocks R_i (lazy transpose)
        # A @ X or A.T @ X is R @ X (stacked along the blocks) or R.T @ X (summed)
        if (self._axis == 0) != self._transposed:
            out = _products(da, R, X).compute()
        else:
            Xd = da.from_array(X, chunks=(R.chunks[0], X.shape[1:]))
            out = _transposed_products(da, R, Xd).compute()
        return np.asarray(out).astype(self.dtype, copy=False)


def dask_operator(A: Any, name: str = "A") -> DaskOperator:
    """Validate a dask matrix and wrap it as a :class:`DaskOperator`."""
    A, axis = check_dask_matrix(A, name)
    return DaskOperator(A, axis)
