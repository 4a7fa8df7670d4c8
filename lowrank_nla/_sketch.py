"""Randomized range finders: fixed rank with power iterations, and fixed accuracy.

Conventions: ``A`` is ``m x n``; a sketch has ``size`` columns; ``Q`` returned is ``m x size``
with orthonormal columns in ``A``'s namespace, device and dtype.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

from array_api_compat import device as _dev

from ._backend import (
    Operator,
    Sampler,
    as_operator,
    cholesky_lower,
    column_scale,
    eps,
    normal_sampler,
    solve_triangular,
)
from ._validation import check_int, check_normalizer, check_rank, check_real

Array = Any

__all__ = ["adaptive_range_finder", "randomized_range_finder"]


# --------------------------------------------------------------------------- normalizers


def qr_factor(xp: Any, Y: Array, normalizer: str) -> tuple[Array, Array]:
    """Thin QR ``Y = Q R`` with the chosen normalizer (``"none"`` means Householder QR).

    ``"cholqr2"`` is CholeskyQR2 (Fukaya, Nakatsukasa, Yanagisawa & Yamamoto 2014): two
    Gram-Cholesky passes, ``R = R_2 R_1``, all matrix products and triangular solves, so it
    runs at GEMM speed where Householder QR does not (CPU BLAS and GPUs alike). It is
    accurate when ``cond(Y) < eps**-1/2``. When a Cholesky factorization fails, or the first
    pass leaves ``max|Q_1^T Q_1 - I| > 1/2`` (``Y`` numerically rank deficient or too
    ill-conditioned), it falls back to Householder QR, so the result is always orthonormal.
    """
    if normalizer == "cholqr2" and Y.shape[1] > 0:
        G = Y.T @ Y
        L = cholesky_lower(xp, G)
        if L is not None:
            Q1 = solve_triangular(xp, L, Y.T, lower=True).T
            G1 = Q1.T @ Q1
            # The second pass restores orthogonality to rounding only if the first pass left
            # cond(Q1) small; max|G1 - I| <= 1/2 guarantees cond(Q1) <= sqrt(3).
            if (
                float(xp.max(xp.abs(G1 - xp.eye(G1.shape[0], dtype=G1.dtype, device=_dev(G1)))))
                <= 0.5
            ):
                L1 = cholesky_lower(xp, G1)
                if L1 is not None:
                    return solve_triangular(xp, L1, Q1.T, lower=True).T, L1.T @ L.T
    res = xp.linalg.qr(Y)
    return res.Q, res.R


def orthonormalize(xp: Any, Y: Array, normalizer: str) -> Array:
    """Orthonormal basis of ``range(Y)`` with the chosen normalizer (``none`` -> QR)."""
    return qr_factor(xp, Y, normalizer)[0]


def thin_svd(xp: Any, Y: Array, normalizer: str) -> tuple[Array, Array, Array]:
    """Thin SVD of a tall ``Y`` (m x l, m >= l) as ``QR`` then the SVD of the l x l ``R``.

    ``Y = Q R = (Q U_R) S V_R^T``: the work on the tall matrix is one QR and one product,
    which is much faster than a direct SVD of ``Y`` (LAPACK ``gesdd`` on the tall matrix).
    """
    Q, R = qr_factor(xp, Y, normalizer)
    U_R, S, Vh = xp.linalg.svd(R, full_matrices=False)
    return Q @ U_R, S, Vh


def _normalize_between(xp: Any, Y: Array, normalizer: str) -> Array:
    """Normalization between power iterations: ``none`` only rescales columns."""
    if normalizer == "none":
        return column_scale(xp, Y)
    return orthonormalize(xp, Y, normalizer)


# --------------------------------------------------------------------------- engines


def general_range(
    op: Operator,
    size: int,
    *,
    power_iters: int,
    normalizer: str,
    draw: Sampler,
    name: str = "A",
) -> Array:
    """Subspace iteration ``Q = orth((A A^T)^q A Omega)`` (HMT 2011, Algorithm 4.4)."""
    xp = op.xp
    rmatmat = op.rmatmat_or_raise(name) if power_iters > 0 else None
    Y = op.checked_matmat(draw((op.shape[1], size)), name)
    for _ in range(power_iters):
        assert rmatmat is not None
        Z = _normalize_between(xp, rmatmat(_normalize_between(xp, Y, normalizer)), normalizer)
        Y = op.matmat(Z)
    return orthonormalize(xp, Y, normalizer)


def symmetric_range(
    op: Operator,
    size: int,
    *,
    passes: int,
    normalize_every: int | None,
    normalizer: str,
    draw: Sampler,
    name: str = "A",
) -> Array:
    """Orthonormal basis of ``range(A^passes Omega)`` for a symmetric ``A``.

    Between products the block is orthonormalized every ``normalize_every`` products
    (``None``: never, the SRE-KFAC form; the columns are then only rescaled, which keeps the
    range and prevents overflow). A final orthonormalization always follows.
    """
    xp = op.xp
    Y = draw((op.shape[0], size))
    for i in range(1, passes + 1):
        Y = op.checked_matmat(Y, name)
        if i == passes:
            break
        if normalize_every is not None and i % normalize_every == 0:
            Y = _normalize_between(xp, Y, normalizer)
        else:
            Y = column_scale(xp, Y)
    return orthonormalize(xp, Y, normalizer)


def check_symmetric(op: Operator, draw: Sampler, name: str = "A") -> None:
    """Probabilistic symmetry check with two Gaussian probes ``u``, ``v``.

    Raises ``ValueError`` when ``|u^T A v - v^T A u| > sqrt(eps) (|u| |Av| + |v| |Au|)``.
    Rounding contributes about ``sqrt(n) eps`` to the left side, so symmetric input passes; an
    asymmetric part ``K = (A - A^T)/2`` is detected once ``|K|_F / |A|_F`` exceeds about
    ``sqrt(n eps)``. Cost: one product with a two-column block.
    """
    xp = op.xp
    W = draw((op.shape[0], 2))
    AW = op.checked_matmat(W, name)
    u, v = W[:, 0], W[:, 1]
    Au, Av = AW[:, 0], AW[:, 1]
    uAv = xp.vecdot(u, Av)
    vAu = xp.vecdot(v, Au)
    norm = xp.linalg.vector_norm
    scale = norm(u) * norm(Av) + norm(v) * norm(Au)
    gap = float(xp.abs(uAv - vAu))
    limit = math.sqrt(eps(xp, op.dtype)) * float(scale)
    if gap > limit:
        raise ValueError(
            f"`{name}` is not symmetric: the probe |u^T A v - v^T A u| = {gap:.3e} exceeds "
            f"{limit:.3e}; pass a symmetric matrix (or `check_symmetric=False` if it is "
            "symmetric up to a known perturbation)"
        )


# --------------------------------------------------------------------------- public API


def randomized_range_finder(
    A: Any,
    size: int,
    *,
    power_iters: int = 2,
    normalizer: str = "qr",
    rng: Any = None,
) -> Array:
    """Orthonormal basis for the dominant range of ``A`` by randomized subspace iteration.

    Parameters
    ----------
    A : array or linear operator, shape (m, n)
        NumPy, CuPy, torch or array-API array, or an object with ``shape``, ``dtype``,
        ``@`` and (when ``power_iters > 0``) ``.T``.
    size : int
        Number of columns of the sketch, ``1 <= size <= min(m, n)``. For a target rank
        ``k`` use ``size = k + p`` with a small oversampling ``p`` (5 to 10).
    power_iters : int, default 2
        Number ``q`` of subspace iterations with ``A A^T``.
    normalizer : {"qr", "cholqr2", "none"}, default "qr"
        Orthonormalization between products: Householder QR; CholeskyQR2 (two
        Gram-Cholesky passes, bound by matrix products and fast on GPUs, with a fallback to
        QR when Cholesky fails); or none (only column rescaling; accurate only for small
        ``q`` or mild decay).
    rng : None, int, numpy/torch/cupy Generator, optional
        Source of the Gaussian test matrix; an int seed gives reproducible results on a
        given backend.

    Returns
    -------
    Q : array, shape (m, size)
        Orthonormal columns, same library, device and dtype as ``A``.

    Raises
    ------
    ValueError
        If ``size`` or ``power_iters`` is out of range, ``normalizer`` unknown, or ``A``
        holds NaN/Inf.
    TypeError
        If ``A`` is not an array or operator, or has a complex/boolean dtype.

    Notes
    -----
    Computes ``Y = (A A^T)^q A Omega`` with a Gaussian ``Omega`` (n x size),
    orthonormalizing between products, and returns ``Q = orth(Y)`` (Halko, Martinsson &
    Tropp 2011, Algorithm 4.4). Cost: ``(2q + 1)`` products of ``A`` (or ``A^T``) with an
    ``n x size`` block plus ``2q + 1`` orthonormalizations of ``O(m size^2)``.
    For ``p = size - k >= 2`` the expected error ``E ||A - Q Q^T A||_2`` is bounded by
    :func:`lowrank_nla.hmt_error_bound`.

    References
    ----------
    N. Halko, P.-G. Martinsson, J. A. Tropp, "Finding structure with randomness:
    probabilistic algorithms for constructing approximate matrix decompositions", SIAM
    Review 53(2), 2011.

    Examples
    --------
    >>> import numpy as np
    >>> import lowrank_nla as ln
    >>> A = np.random.default_rng(0).standard_normal((50, 8)) @ np.ones((8, 40))
    >>> Q = ln.randomized_range_finder(A, 10, rng=0)
    >>> bool(np.allclose(Q @ (Q.T @ A), A))
    True
    """
    op = as_operator(A, "A", check_finite_entries=False)
    size = check_rank(size, op.shape, "size")
    power_iters = check_int(power_iters, "power_iters", minimum=0)
    normalizer = check_normalizer(normalizer)
    draw = normal_sampler(op.xp, rng, dtype=op.dtype, device=op.device)
    return general_range(op, size, power_iters=power_iters, normalizer=normalizer, draw=draw)


# HMT 2011, Lemma 4.1: ||(I - P) A|| <= HMT_PROBE_FACTOR max_i ||(I - P) A w_i|| w.h.p.
HMT_PROBE_FACTOR = 10.0 * math.sqrt(2.0 / math.pi)


def _project_out(xp: Any, Q: Array | None, Y: Array) -> Array:
    """``(I - Q Q^T) Y`` applied twice ("twice is enough", Giraud et al. 2005)."""
    if Q is None:
        return Y
    for _ in range(2):
        Y = Y - Q @ (Q.T @ Y)
    return Y


def adaptive_range_finder(
    A: Any,
    tol: float,
    *,
    block: int = 10,
    max_rank: int | None = None,
    power_iters: int = 0,
    rng: Any = None,
) -> Array:
    """Orthonormal basis ``Q`` with ``||A - Q Q^T A||_2 <= tol`` (with high probability).

    Parameters
    ----------
    A : array or linear operator, shape (m, n)
        As in :func:`randomized_range_finder` (``.T`` needed only when ``power_iters > 0``).
    tol : float
        Absolute spectral-norm tolerance (> 0). For a relative tolerance multiply by
        :func:`lowrank_nla.estimate_spectral_norm` of ``A``.
    block : int, default 10
        Columns added per step; also the number of probes of the stopping estimate.
    max_rank : int, optional
        Largest basis size (default ``min(m, n)``). If it is reached before ``tol`` a
        ``RuntimeWarning`` says so and the basis built so far is returned.
    power_iters : int, default 0
        Subspace iterations applied to each new block before it joins the basis.
    rng : None, int, numpy/torch/cupy Generator, optional
        Source of the Gaussian probes.

    Returns
    -------
    Q : array, shape (m, k)
        Orthonormal columns, ``k`` a multiple of ``block`` (or ``max_rank``).

    Notes
    -----
    Blocked form of HMT 2011, Algorithm 4.2. Each step draws ``block`` Gaussian vectors,
    forms ``Y = (I - Q Q^T) A Omega`` and uses HMT Lemma 4.1,

    .. math:: \\|(I - QQ^T)A\\|_2 \\le 10\\sqrt{2/\\pi}\\,\\max_i \\|(I - QQ^T)A\\omega_i\\|,

    which holds with probability at least ``1 - 10**-block``: below ``tol`` it stops,
    otherwise the orthonormalized (and optionally power-iterated) ``Y`` joins ``Q``.
    Projections are done twice for orthogonality in floating point. Cost per step:
    ``1 + 2 power_iters`` block products and ``O(m k block)`` for the projections.

    References
    ----------
    Halko, Martinsson & Tropp (2011), Section 4.4; P.-G. Martinsson, S. Voronin, "A
    randomized blocked algorithm for efficiently computing rank-revealing factorizations of
    matrices", SIAM J. Sci. Comput. 38(5), 2016.

    Examples
    --------
    >>> import numpy as np
    >>> import lowrank_nla as ln
    >>> A = np.diag(0.5 ** np.arange(60.0))
    >>> Q = ln.adaptive_range_finder(A, 1e-6, block=5, rng=0)
    >>> Q.shape[1] <= 30
    True
    """
    op = as_operator(A, "A", check_finite_entries=False)
    tol = check_real(tol, "tol", minimum=0.0, strict=True)
    full = min(op.shape)
    block = check_int(block, "block", minimum=1)
    max_rank = full if max_rank is None else check_rank(max_rank, op.shape, "max_rank")
    power_iters = check_int(power_iters, "power_iters", minimum=0)
    xp = op.xp
    draw = normal_sampler(xp, rng, dtype=op.dtype, device=op.device)
    rmatmat = op.rmatmat_or_raise("A") if power_iters > 0 else None

    Q: Array | None = None
    k = 0
    while True:
        b = min(block, max_rank - k)
        Y = _project_out(xp, Q, op.checked_matmat(draw((op.shape[1], block)), "A"))
        estimate = HMT_PROBE_FACTOR * float(xp.max(xp.linalg.vector_norm(Y, axis=0)))
        if estimate <= tol:
            break
        if b == 0:
            if max_rank < full:
                warnings.warn(
                    f"adaptive_range_finder reached `max_rank` = {max_rank} with an error "
                    f"estimate {estimate:.3e} > `tol` = {tol:.3e}",
                    RuntimeWarning,
                    stacklevel=2,
                )
            break
        Y = Y[:, :b]
        for _ in range(power_iters):
            assert rmatmat is not None
            Z = orthonormalize(xp, rmatmat(orthonormalize(xp, Y, "qr")), "qr")
            Y = _project_out(xp, Q, op.matmat(Z))
        Qb = orthonormalize(xp, _project_out(xp, Q, orthonormalize(xp, Y, "qr")), "qr")
        Q = Qb if Q is None else xp.concat([Q, Qb], axis=1)
        k += b
    if Q is None:
        # A is (numerically) zero at this tolerance: an empty basis is the exact answer.
        return xp.zeros((op.shape[0], 0), dtype=op.dtype, device=op.device)
    return Q
