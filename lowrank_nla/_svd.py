"""Randomized truncated SVD."""

from __future__ import annotations

from typing import Any, NamedTuple

from ._backend import as_operator, fp_guarded, is_dask_array, normal_sampler, sign_fix
from ._sketch import general_range, krylov_range, leading_svd, thin_svd, warn_if_unresolved
from ._validation import (
    check_block_size,
    check_int,
    check_method,
    check_normalizer,
    check_power_iters,
    check_rank,
)

__all__ = ["SVDResult", "randomized_svd"]


class SVDResult(NamedTuple):
    """Truncated SVD ``A ~ U @ diag(S) @ Vh``.

    Attributes
    ----------
    U : array, shape (m, k)
        Left singular vectors (orthonormal columns).
    S : array, shape (k,)
        Singular values, descending, non-negative.
    Vh : array, shape (k, n)
        Right singular vectors as rows (orthonormal rows).
    """

    U: Any
    S: Any
    Vh: Any


@fp_guarded
def randomized_svd(
    A: Any,
    rank: int,
    *,
    oversample: int = 10,
    power_iters: int = 2,
    normalizer: str = "qr",
    rng: Any = None,
    method: str = "subspace",
    block_size: int | None = None,
) -> SVDResult:
    """Rank-``rank`` truncated SVD of ``A`` by randomized subspace iteration.

    Parameters
    ----------
    A : array or linear operator, shape (m, n)
        NumPy, CuPy, torch or array-API array, or an operator with ``shape``, ``dtype``,
        ``@`` and ``.T``.
    rank : int
        Number of singular triplets, ``1 <= rank <= min(m, n)``.
    oversample : int, default 10
        Extra sketch columns ``p``; the sketch has ``min(rank + p, min(m, n))`` columns.
    power_iters : int, default 2
        Subspace iterations ``q`` (each one product with ``A^T`` and one with ``A``),
        ``0 <= q <= 100``.
    normalizer : {"qr", "cholqr2", "none"}, default "qr"
        Orthonormalization between products (see :func:`randomized_range_finder`).
        ``"none"`` is accurate while ``(sigma_rank / sigma_1)^(2q + 1)`` stays above about
        ``2 eps``; beyond that a ``RuntimeWarning`` is issued.
    rng : None, int, numpy/torch/cupy Generator, optional
        Source of the Gaussian test matrix.
    method : {"subspace", "block_krylov"}, default "subspace"
        How the range is sketched (see :func:`randomized_range_finder`).
        ``"block_krylov"`` keeps every iterate: the basis has
        ``(rank + p)(q + 1)`` columns (capped at ``min(m, n)``) and costs the same
        ``2q + 2`` products (the ``A^T`` products of the recurrence are reused for
        ``Q^T A``) plus larger orthonormalizations; at equal error it needs fewer
        iterations on slowly decaying spectra. Needs ``normalizer`` "qr" or "cholqr2".
    block_size : int, optional
        Block Krylov only: columns of the Gaussian block (default ``rank + oversample``).
        A block smaller than ``rank`` is allowed as long as the basis
        ``block_size (q + 1)`` holds ``rank`` columns; small blocks with more iterations
        are often the cheapest at a given error (Tropp & Webber 2023, section 11).
        :func:`lowrank_nla.krylov_error_bound` applies for ``block_size >= rank + 2``.

    Returns
    -------
    SVDResult
        ``(U, S, Vh)`` with ``U`` (m x rank), ``S`` (rank,) descending, ``Vh`` (rank x n), in
        ``A``'s library, device and dtype. Each column of ``U`` has its largest-magnitude
        entry positive (``Vh`` flipped accordingly), so results are deterministic. For a
        dask array ``A`` the factor along its chunked dimension (``U`` for row chunks,
        ``Vh`` for column chunks) is a dask array, the other two are NumPy arrays.

    Raises
    ------
    ValueError
        Out-of-range ``rank``, ``oversample`` or ``power_iters``; unknown ``normalizer``;
        NaN/Inf in ``A``; a product or a factor that overflows ``A``'s dtype (the singular
        values themselves are not representable).
    TypeError
        Unsupported input type or dtype; an operator without ``.T``.

    Warns
    -----
    RuntimeWarning
        ``normalizer="none"`` with ``(S[rank-1] / S[0])^(2q + 1) < 2 eps`` (and
        ``S[rank-1] / S[0]`` itself above rounding): the trailing triplets are unreliable.

    Notes
    -----
    Algorithm (HMT 2011, Algorithms 4.4 and 5.1): ``Q = orth((A A^T)^q A Omega)``, then the
    SVD ``Q^T A = U_B S Vh``, and ``U = Q U_B``; the leading ``rank`` triplets are kept. The
    SVD of the wide ``Q^T A`` is taken as a thin QR of ``A^T Q`` (with ``normalizer``)
    followed by the SVD of its small triangular factor. Cost: ``2q + 2`` products with an
    ``n x (rank + p)`` block and ``O((m + n)(rank + p)^2)`` for the orthonormalizations.
    By HMT Theorem 9.3 the rank-``k`` result satisfies
    ``||A - U diag(S) Vh||_2 <= sigma_{k+1} + ||A - Q Q^T A||_2``, and the last term is
    bounded in expectation by :func:`lowrank_nla.hmt_error_bound`. To measure the error of
    a result use :func:`lowrank_nla.posterior_error_estimate` (range) or
    :func:`lowrank_nla.relative_error` (decomposition). Every product and the small
    triangular factor are checked for NaN/Inf, so LAPACK never sees a non-finite matrix.

    With ``method="block_krylov"`` the range is the block Krylov space (Musco & Musco 2015,
    Algorithm 2) and the expected range error is bounded by
    :func:`lowrank_nla.krylov_error_bound`, which depends on the gap
    ``sigma_rank / sigma_{rank+1}`` through a Chebyshev polynomial (square-root
    acceleration over subspace iteration). The basis has ``(q + 1)`` blocks but only
    ``rank`` directions are kept: when the Gram matrix ``(A^T Q)^T (A^T Q)`` has its
    ``(rank+1)``-th eigenvalue at least ``sqrt(eps)`` times its largest, those directions
    are picked from it and only an ``n x rank`` block goes through the QR-based SVD
    (orthonormal factors to rounding; the squared truncation error changes by a relative
    ``O(sqrt(eps))`` at most); otherwise (exactly low-rank input, fast decay in float32) the
    whole ``A^T Q`` does. See docs/algorithms.md, 'Randomized block Krylov'.

    A dask array ``A`` with chunks along one dimension only is read in exactly ``q + 1``
    passes (subspace iteration only): each pass reads every block ``A_i`` once and forms
    both ``A_i V`` and ``A_i^T (A_i V)``, so ``A^T A V`` costs one pass; the ``n x l``
    blocks and the ``l x l`` work stay in memory (NumPy), the tall ``A V`` stays on the
    workers. See the user guide's dask section for the accuracy floor of this scheme.

    Compared with :func:`sklearn.utils.extmath.randomized_svd` the sketch is drawn in the
    input's own library and device; compared with :func:`torch.svd_lowrank` it accepts a
    generator and has a stronger default (``q = 2``, ``p = 10``).

    References
    ----------
    N. Halko, P.-G. Martinsson, J. A. Tropp, SIAM Review 53(2), 2011. C. Musco, C. Musco,
    "Randomized block Krylov methods for stronger and faster approximate singular value
    decomposition", NeurIPS 2015.

    Examples
    --------
    >>> import numpy as np
    >>> import lowrank_nla as ln
    >>> rng = np.random.default_rng(0)
    >>> A = rng.standard_normal((100, 5)) @ rng.standard_normal((5, 80))
    >>> U, S, Vh = ln.randomized_svd(A, 5, rng=0)
    >>> bool(np.allclose(U * S @ Vh, A))
    True
    >>> bool(np.allclose(S, np.linalg.svd(A, compute_uv=False)[:5]))
    True
    """
    if is_dask_array(A):
        from ._dask import dask_svd

        return dask_svd(
            A,
            rank,
            oversample=oversample,
            power_iters=power_iters,
            normalizer=normalizer,
            rng=rng,
            method=method,
            block_size=block_size,
        )
    op = as_operator(A, "A", check_finite_entries=False)  # checked in the first product
    rank = check_rank(rank, op.shape)
    oversample = check_int(oversample, "oversample", minimum=0)
    power_iters = check_power_iters(power_iters)
    normalizer = check_normalizer(normalizer)
    method = check_method(method, normalizer)
    block_size = check_block_size(block_size, method, rank, power_iters, op.shape)
    xp = op.xp
    op.rmatmat_or_raise("A")
    size = min(rank + oversample, min(op.shape)) if block_size is None else block_size
    draw = normal_sampler(xp, rng, dtype=op.dtype, device=op.device)
    res = None
    if method == "block_krylov":
        Q, AtQ = krylov_range(
            op,
            size,
            power_iters=power_iters,
            normalizer=normalizer,
            draw=draw,
            with_transpose=True,
        )
        # a basis of (q + 1) blocks: the leading `rank` directions through a Gram step
        res = leading_svd(xp, Q, AtQ, rank)
    else:
        Q, _ = general_range(op, size, power_iters=power_iters, normalizer=normalizer, draw=draw)
        AtQ = op.checked_rmatmat(Q)
    if res is not None:
        U, S, V = res
        Vh = V.T
    else:
        # B = Q^T A (size x n) through its transpose: B^T = A^T Q = W S Z^T, so B = Z S W^T.
        W, S, Zh = thin_svd(xp, AtQ, normalizer, keep=rank)
        U = Q @ Zh.T[:, :rank]
        S, Vh = S[:rank], W.T
    if normalizer == "none":
        warn_if_unresolved(xp, S, rank, 2 * power_iters + 1, op.dtype, "randomized_svd")
    signs = sign_fix(xp, U)
    return SVDResult(U * signs, S, Vh * signs[:, None])
