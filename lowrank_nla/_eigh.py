"""Symmetric eigensolvers: randomized (Rayleigh-Ritz, SRE-KFAC's SREVD, Nystrom) and exact top-k.

All return :class:`EighResult` with eigenvalues sorted descending and eigenvectors as columns,
in the input's library, device and dtype. The randomized routines target the *dominant*
eigenpairs (largest ``|lambda|``), which for positive semidefinite input (Kronecker factors,
Gram and covariance matrices) are the largest ones.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import array_api_compat

from ._backend import (
    Operator,
    as_operator,
    check_factor,
    cholesky_lower,
    eigh_descending,
    eps,
    fp_guarded,
    max_abs,
    normal_sampler,
    power_of_two_scale,
    safe_norm,
    sign_fix,
    solve_triangular,
)
from ._sketch import (
    NORMALIZER_REMEDY,
    check_symmetric,
    orthonormalize,
    symmetric_krylov,
    symmetric_range,
    thin_svd,
    warn_if_unresolved,
)
from ._validation import (
    check_block_size,
    check_bool,
    check_int,
    check_method,
    check_normalizer,
    check_power_iters,
    check_rank,
    check_square,
)

__all__ = ["EighResult", "nystrom", "partial_eigh", "randomized_eigh", "srevd"]


class EighResult(NamedTuple):
    """Truncated symmetric eigendecomposition ``A ~ V @ diag(w) @ V.T``.

    Attributes
    ----------
    eigenvalues : array, shape (k,)
        Sorted descending.
    eigenvectors : array, shape (n, k)
        Orthonormal columns; column ``i`` belongs to ``eigenvalues[i]``.
    """

    eigenvalues: Any
    eigenvectors: Any


def _prepare(
    A: Any, rank: int, oversample: int, power_iters: int, rng: Any, check: bool
) -> tuple[Operator, int, int, int, Any]:
    # NaN/Inf are caught in the first product (Operator.checked_matmat)
    op = as_operator(A, "A", symmetric=True, check_finite_entries=False)
    check_square(op.shape)
    rank = check_rank(rank, op.shape)
    oversample = check_int(oversample, "oversample", minimum=0)
    power_iters = check_power_iters(power_iters)
    draw = normal_sampler(op.xp, rng, dtype=op.dtype, device=op.device)
    if check_bool(check, "check_symmetric"):
        check_symmetric(op, draw)
    return op, rank, min(rank + oversample, op.shape[0]), power_iters, draw


def _finish(xp: Any, w: Any, V: Any, rank: int, *, dominant: bool) -> EighResult:
    """Keep ``rank`` pairs (largest ``|w|`` if ``dominant`` else largest ``w``), sign-fixed."""
    if dominant:
        keep = xp.argsort(xp.abs(w), descending=True, stable=True)[:rank]
        w, V = xp.take(w, keep), xp.take(V, keep, axis=1)
        order = xp.argsort(w, descending=True, stable=True)
        w, V = xp.take(w, order), xp.take(V, order, axis=1)
    else:
        w, V = w[:rank], V[:, :rank]
    return EighResult(w, V * sign_fix(xp, V))


def _rayleigh_ritz(op: Operator, Q: Any, rank: int, AQ: Any = None) -> EighResult:
    """Eigenpairs of ``Q Q^T A Q Q^T``: ``eigh(Q^T A Q)`` rotated back by ``Q``."""
    xp = op.xp
    C = Q.T @ (op.checked_matmat(Q) if AQ is None else AQ)
    w, V = eigh_descending(xp, (C + C.T) / 2, name="Rayleigh-Ritz matrix")
    return _finish(xp, w, Q @ V, rank, dominant=True)


def _warn_if_unresolved(
    xp: Any, res: EighResult, exponent: int, routine: str, remedy: str = NORMALIZER_REMEDY
) -> None:
    """:func:`warn_if_unresolved` on the absolute Ritz values (largest first)."""
    mags = xp.abs(res.eigenvalues)
    mags = xp.take(mags, xp.argsort(mags, descending=True, stable=True))
    warn_if_unresolved(
        xp, mags, mags.shape[0], exponent, mags.dtype, routine, remedy, stacklevel=5
    )


_RR_NOTES = """
    Rayleigh-Ritz finish: with ``Q`` (n x l) orthonormal, ``C = Q^T A Q`` is symmetrized and
    diagonalized, ``C = W diag(w) W^T``, and ``(w, Q W)`` are the Ritz pairs, so the result
    ``Q C Q^T`` is exactly symmetric. If ``Q`` captures the range to accuracy
    ``eps_Q = ||(I - QQ^T) A||_2`` then ``||A - Q C Q^T||_2 <= 2 eps_Q`` and the rank-``k``
    truncation adds at most ``lambda_{k+1}``.
"""


@fp_guarded
def randomized_eigh(
    A: Any,
    rank: int,
    *,
    oversample: int = 10,
    power_iters: int = 2,
    normalizer: str = "qr",
    rng: Any = None,
    check_symmetric: bool = True,
    method: str = "subspace",
    block_size: int | None = None,
) -> EighResult:
    """Dominant eigenpairs of a symmetric matrix by randomized subspace iteration.

    Parameters
    ----------
    A : array or linear operator, shape (n, n)
        Symmetric. An operator needs only ``shape``, ``dtype`` and ``@``.
    rank : int
        Number of eigenpairs, ``1 <= rank <= n``.
    oversample : int, default 10
        Extra sketch columns ``p`` (sketch size ``min(rank + p, n)``).
    power_iters : int, default 2
        ``q``: the sketch is ``A^(q+1) Omega``, orthonormalized after every product;
        ``0 <= q <= 100``.
    normalizer : {"qr", "cholqr2", "none"}, default "qr"
        Orthonormalization between products (see :func:`randomized_range_finder`).
        ``"none"`` is accurate while ``(|lambda_rank| / |lambda_1|)^(q + 1)`` stays above
        about ``2 eps``; beyond that a ``RuntimeWarning`` is issued.
    rng : None, int, numpy/torch/cupy Generator, optional
        Source of the Gaussian test matrix.
    check_symmetric : bool, default True
        Run a two-probe symmetry check (one extra product with two columns) and raise
        ``ValueError`` for clearly non-symmetric input.
    method : {"subspace", "block_krylov"}, default "subspace"
        ``"block_krylov"``: Rayleigh-Ritz on the whole Krylov space
        ``[A Omega, A^2 Omega, ..., A^(q+1) Omega]`` (``(rank + p)(q + 1)`` columns, capped
        at ``n``) with the same ``q + 2`` products; expected range error bounded by
        :func:`lowrank_nla.krylov_error_bound` with ``symmetric=True``. Needs
        ``normalizer`` "qr" or "cholqr2".
    block_size : int, optional
        Block Krylov only: columns of the Gaussian block (default ``rank + oversample``);
        as in :func:`randomized_svd`, the basis ``block_size (q + 1)`` must hold ``rank``.

    Returns
    -------
    EighResult
        ``(eigenvalues, eigenvectors)``: the ``rank`` Ritz pairs of largest magnitude, sorted
        by eigenvalue descending.

    Raises
    ------
    ValueError
        Non-square or non-symmetric ``A``, NaN/Inf, out-of-range arguments, a product
        that overflows ``A``'s dtype.
    TypeError
        Unsupported input type or dtype.

    Warns
    -----
    RuntimeWarning
        ``normalizer="none"`` beyond its safe range (see ``normalizer``).

    Notes
    -----
    Sketch: ``q + 1`` products of ``A`` with an ``n x l`` block (``l = rank + p``), each
    followed by an orthonormalization; one more product for the Rayleigh-Ritz matrix. Cost
    ``(q + 2) n^2 l + O((q + 1) n l^2 + l^3)`` for a dense ``A``, against ``O(n^3)`` for a
    full eigendecomposition. Because ``|A|`` and ``A`` have the same singular vectors, the
    HMT expectation bound holds with exponent ``s = q + 1``: see
    :func:`lowrank_nla.hmt_error_bound` with ``symmetric=True``.
    {rr}
    References
    ----------
    Halko, Martinsson & Tropp (2011), Algorithm 5.3 (direct eigenvalue decomposition) with
    the subspace iteration of Algorithm 4.4 specialised to ``A = A^T``.

    Examples
    --------
    >>> import numpy as np
    >>> import lowrank_nla as ln
    >>> X = np.random.default_rng(0).standard_normal((200, 6))
    >>> w, V = ln.randomized_eigh(X @ X.T, 6, rng=0)
    >>> bool(np.allclose(w, np.linalg.eigvalsh(X @ X.T)[::-1][:6]))
    True
    """
    op, rank, size, power_iters, draw = _prepare(
        A, rank, oversample, power_iters, rng, check_symmetric
    )
    normalizer = check_normalizer(normalizer)
    method = check_method(method, normalizer)
    block_size = check_block_size(block_size, method, rank, power_iters, op.shape)
    if method == "block_krylov":
        Q, AQ = symmetric_krylov(
            op,
            size if block_size is None else block_size,
            power_iters=power_iters,
            normalizer=normalizer,
            draw=draw,
        )
        return _rayleigh_ritz(op, Q, rank, AQ)
    Q = symmetric_range(
        op, size, passes=power_iters + 1, normalize_every=1, normalizer=normalizer, draw=draw
    )
    res = _rayleigh_ritz(op, Q, rank)
    if normalizer == "none":
        _warn_if_unresolved(op.xp, res, power_iters + 1, "randomized_eigh")
    return res


@fp_guarded
def srevd(
    A: Any,
    rank: int,
    *,
    oversample: int = 10,
    power_iters: int = 3,
    reorth_every: int | None = 2,
    normalizer: str = "qr",
    rng: Any = None,
    check_symmetric: bool = True,
) -> EighResult:
    """Symmetric randomized EVD of SRE-KFAC: a power sketch, one QR, Rayleigh-Ritz.

    Parameters
    ----------
    A : array or linear operator, shape (n, n)
        Symmetric (in SRE-KFAC a positive semidefinite Kronecker factor).
    rank : int
        Number of eigenpairs, ``1 <= rank <= n``.
    oversample : int, default 10
        Extra sketch columns ``p``.
    power_iters : int, default 3
        ``q``: the sketch is ``A^(q+1) Omega``. The arXiv SRE-KFAC code's ``X^4 Omega`` is
        ``power_iters=3``; the thesis error measurements' ``X^9 Omega`` is ``power_iters=8``.
        ``0 <= q <= 100``.
    reorth_every : int or None, default 2
        Orthonormalize (QR) the block after every ``k``-th product. ``None`` is the paper's
        form (no intermediate orthonormalization, columns only rescaled); in float32 it loses
        the non-dominant directions once ``(lambda_1 / lambda_l)^(q+1)`` nears ``1e7``, which
        the default avoids at the cost of a few QRs. ``reorth_every=1`` equals
        :func:`randomized_eigh`. With ``None`` (or ``normalizer="none"``) a
        ``RuntimeWarning`` says when ``(|lambda_rank| / |lambda_1|)^(q + 1)`` of the result
        is below about ``2 eps``.
    normalizer : {"qr", "cholqr2", "none"}, default "qr"
        How the periodic and the final orthonormalizations are done (see
        :func:`randomized_range_finder`; ``"none"`` leaves only the final QR).
    rng : None, int, numpy/torch/cupy Generator, optional
        Source of the Gaussian test matrix.
    check_symmetric : bool, default True
        Two-probe symmetry check, as in :func:`randomized_eigh`.

    Returns
    -------
    EighResult
        Top ``rank`` Ritz pairs by magnitude, eigenvalues descending.

    Raises
    ------
    ValueError
        Non-square or non-symmetric ``A``, NaN/Inf, out-of-range arguments, a product
        that overflows ``A``'s dtype.
    TypeError
        Unsupported input type or dtype.

    Warns
    -----
    RuntimeWarning
        Products without orthonormalization beyond their safe range (see
        ``reorth_every``).

    Notes
    -----
    ``Y = A^(q+1) Omega`` by repeated products, ``Q = qr(Y)``, ``C = Q^T A Q``,
    ``C = W diag(w) W^T``, ``U = Q W`` (Puiu 2022, arXiv:2206.15397; see the algorithm
    reference, docs/algorithms.md, section 'Randomized decompositions'). Cost ``(q + 2) n^2 l`` for
    the products plus ``ceil(q / k)`` QRs, against ``2q + 1`` QRs in HMT subspace iteration.
    {rr}
    References
    ----------
    C. O. Puiu, "Randomized K-FACs: speeding up K-FAC with randomized numerical linear
    algebra", arXiv:2206.15397, 2022.

    Examples
    --------
    >>> import numpy as np
    >>> import lowrank_nla as ln
    >>> X = np.random.default_rng(1).standard_normal((150, 4))
    >>> w, V = ln.srevd(X @ X.T, 4, rng=0)
    >>> bool(np.allclose(V * w @ V.T, X @ X.T))
    True
    """
    op, rank, size, power_iters, draw = _prepare(
        A, rank, oversample, power_iters, rng, check_symmetric
    )
    if reorth_every is not None:
        reorth_every = check_int(reorth_every, "reorth_every", minimum=1)
    normalizer = check_normalizer(normalizer)
    Q = symmetric_range(
        op,
        size,
        passes=power_iters + 1,
        normalize_every=reorth_every,
        normalizer=normalizer,
        draw=draw,
    )
    res = _rayleigh_ritz(op, Q, rank)
    if normalizer == "none" or reorth_every is None:
        remedy = "use reorth_every=2 (the default)" + (
            " and normalizer='qr' or 'cholqr2'" if normalizer == "none" else ""
        )
        _warn_if_unresolved(op.xp, res, power_iters + 1, "srevd", remedy)
    return res


@fp_guarded
def nystrom(
    A: Any,
    rank: int,
    *,
    oversample: int = 10,
    power_iters: int = 0,
    normalizer: str = "qr",
    rng: Any = None,
    check_symmetric: bool = True,
) -> EighResult:
    """Stabilized randomized Nystrom approximation of a positive semidefinite matrix.

    Parameters
    ----------
    A : array or linear operator, shape (n, n)
        Symmetric positive semidefinite.
    rank : int
        Number of eigenpairs, ``1 <= rank <= n``.
    oversample : int, default 10
        Extra sketch columns ``p``.
    power_iters : int, default 0
        ``q``: the test matrix is ``orth(A^q Omega)`` (orthonormalized after each product);
        ``0 <= q <= 100``.
    normalizer : {"qr", "cholqr2", "none"}, default "qr"
        Orthonormalization of the test matrix (see :func:`randomized_range_finder`);
        ``"none"`` warns beyond ``(lambda_rank / lambda_1)^q < 2 eps``.
    rng : None, int, numpy/torch/cupy Generator, optional
        Source of the Gaussian test matrix.
    check_symmetric : bool, default True
        Two-probe symmetry check, as in :func:`randomized_eigh`.

    Returns
    -------
    EighResult
        Top ``rank`` eigenpairs of the Nystrom approximation; eigenvalues descending and
        non-negative (clipped at 0). For the zero matrix: zero eigenvalues with orthonormal
        (arbitrary) eigenvectors.

    Raises
    ------
    ValueError
        Non-square, non-symmetric or (detectably) indefinite ``A``; NaN/Inf; out-of-range
        arguments; a product that overflows ``A``'s dtype.
    TypeError
        Unsupported input type or dtype.

    Warns
    -----
    RuntimeWarning
        ``normalizer="none"`` beyond its safe range (see ``normalizer``).

    Notes
    -----
    With an orthonormal test matrix ``Omega`` (n x l), ``Y = A Omega``, the Nystrom
    approximation is ``A_nys = Y (Omega^T Y)^+ Y^T``. The stabilized form shifts
    ``Y_nu = Y + nu Omega`` with ``nu = sqrt(n) eps ||Y||_F``, takes the Cholesky factor
    ``Omega^T Y_nu = L L^T``, ``B = Y_nu L^-T``, the thin SVD ``B = U S W^T`` and returns
    ``(max(S^2 - nu, 0), U)``. It needs only ``q + 1`` products with ``A`` (no Rayleigh-Ritz
    product), the cheapest of the randomized PSD routines, and is at least as accurate as
    ``Q Q^T A Q Q^T`` from the same sketch. A Cholesky failure of the shifted core means
    ``A`` is not positive semidefinite, which is reported as a ``ValueError``. At extreme
    scales the core is computed from ``Y / c`` with ``c`` a power of two near ``max|Y|``
    (exact), so the shift and the Cholesky factor neither underflow nor overflow; a zero
    ``Y`` (the zero matrix, a valid PSD input) returns zero eigenvalues.

    References
    ----------
    J. A. Tropp, A. Yurtsever, M. Udell, V. Cevher, "Fixed-rank approximation of a
    positive-semidefinite matrix from streaming data", NeurIPS 2017 (Algorithm 3);
    Z. Frangella, J. A. Tropp, M. Udell, "Randomized Nystrom preconditioning", SIAM J.
    Matrix Anal. Appl. 44(2), 2023.

    Examples
    --------
    >>> import numpy as np
    >>> import lowrank_nla as ln
    >>> X = np.random.default_rng(2).standard_normal((120, 5))
    >>> w, V = ln.nystrom(X @ X.T, 5, rng=0)
    >>> bool(np.allclose(V * w @ V.T, X @ X.T))
    True
    """
    op, rank, size, power_iters, draw = _prepare(
        A, rank, oversample, power_iters, rng, check_symmetric
    )
    normalizer = check_normalizer(normalizer)
    xp = op.xp
    n = op.shape[0]
    Omega = orthonormalize(xp, draw((n, size)), "qr")
    if power_iters:
        Omega = symmetric_range(
            op,
            size,
            passes=power_iters,
            normalize_every=1,
            normalizer=normalizer,
            draw=lambda shape: Omega,
        )
    Y = op.checked_matmat(Omega)
    if max_abs(xp, Y) == 0.0:  # A Omega = 0: for a PSD A, the approximation is exactly zero
        w0 = xp.zeros((size,), dtype=op.dtype, device=op.device)
        return _finish(xp, w0, Omega, rank, dominant=False)
    c = power_of_two_scale(xp, Y, gram_rows=n)  # exact; 1.0 unless the scale is extreme
    Y = Y if c == 1.0 else Y / c
    nu = math.sqrt(n) * eps(xp, op.dtype) * float(safe_norm(xp, Y))
    Y_nu = Y + nu * Omega
    C = Omega.T @ Y_nu
    check_factor(xp, C, "`A`", "Nystrom core")
    L = cholesky_lower(xp, (C + C.T) / 2)
    if L is None:
        raise ValueError(
            "`A` is not positive semidefinite: the shifted Nystrom core Omega^T (A + nu I) "
            "Omega has no Cholesky factor; use randomized_eigh for indefinite matrices"
        )
    B = solve_triangular(xp, L, Y_nu.T, lower=True).T
    U, S, _ = thin_svd(xp, B, normalizer)
    w = xp.clip(S * S - nu, min=0.0) * c
    check_factor(xp, w, "`A`", "eigenvalues")
    res = _finish(xp, w, U, rank, dominant=False)
    if normalizer == "none" and power_iters > 0:
        _warn_if_unresolved(xp, res, power_iters, "nystrom")
    return res


@fp_guarded
def partial_eigh(A: Any, k: int) -> EighResult:
    """Exact top-``k`` eigenpairs (largest eigenvalues) of a symmetric matrix.

    The reference path for the randomized routines and the choice for small matrices.

    Parameters
    ----------
    A : array or linear operator, shape (n, n)
        Symmetric. An operator is materialized as ``A @ I`` (``O(n^2)`` memory).
    k : int
        Number of eigenpairs, ``1 <= k <= n``.

    Returns
    -------
    EighResult
        The ``k`` largest eigenvalues, descending, with orthonormal eigenvectors.

    Raises
    ------
    ValueError
        Non-square or non-symmetric ``A`` (``max|A - A^T| > sqrt(eps) max|A|``), NaN/Inf, or
        ``k`` out of range.
    TypeError
        Unsupported input type or dtype.

    Notes
    -----
    NumPy input uses :func:`scipy.linalg.eigh` with ``subset_by_index`` (LAPACK ``syevr``),
    which computes only the requested eigenpairs: ``O(n^3)`` for the reduction to
    tridiagonal form but only ``O(n^2 k)`` after it. Other backends compute the full
    eigendecomposition with ``xp.linalg.eigh`` and slice (the same result within rounding).
    float32 failures are retried in float64 with a warning.

    Examples
    --------
    >>> import numpy as np
    >>> import lowrank_nla as ln
    >>> w, V = ln.partial_eigh(np.diag([1.0, 4.0, 2.0, 3.0]), 2)
    >>> w.tolist()
    [4.0, 3.0]
    """
    op = as_operator(A, "A", symmetric=True)
    n = check_square(op.shape)
    k = check_rank(k, op.shape, "k")
    xp = op.xp
    M = op.array
    if M is None:
        M = op.checked_matmat(xp.eye(n, dtype=op.dtype, device=op.device))
    scale = float(xp.max(xp.abs(M)))
    gap = float(xp.max(xp.abs(M - M.T)))
    if gap > math.sqrt(eps(xp, op.dtype)) * scale:
        raise ValueError(
            f"`A` is not symmetric: max|A - A^T| = {gap:.3e} exceeds sqrt(eps) * max|A| = "
            f"{math.sqrt(eps(xp, op.dtype)) * scale:.3e}"
        )
    if array_api_compat.is_numpy_namespace(xp):
        import scipy.linalg

        w, V = scipy.linalg.eigh(M, subset_by_index=(n - k, n - 1), check_finite=False)
        w, V = xp.flip(w, axis=0), xp.flip(V, axis=1)
    else:
        w, V = eigh_descending(xp, M, name="matrix `A`")
    return _finish(xp, w, V, k, dominant=False)


for _f in (randomized_eigh, srevd):
    _f.__doc__ = (_f.__doc__ or "").replace("{rr}", _RR_NOTES)
