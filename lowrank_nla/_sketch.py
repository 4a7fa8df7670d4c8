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
    all_finite,
    as_operator,
    check_factor,
    cholesky_lower,
    column_scale,
    eps,
    fp_guarded,
    is_dask_array,
    normal_sampler,
    power_of_two_scale,
    safe_norm,
    solve_triangular,
)
from ._validation import (
    check_int,
    check_method,
    check_normalizer,
    check_power_iters,
    check_rank,
    check_real,
)

Array = Any

__all__ = ["adaptive_range_finder", "randomized_range_finder"]


# --------------------------------------------------------------------------- normalizers


def qr_factor(xp: Any, Y: Array, normalizer: str, subject: str = "`A`") -> tuple[Array, Array]:
    """Thin QR ``Y = Q R`` with the chosen normalizer (``"none"`` means Householder QR).

    ``"cholqr2"`` is CholeskyQR2 (Fukaya, Nakatsukasa, Yanagisawa & Yamamoto 2014): two
    Gram-Cholesky passes, ``R = R_2 R_1``, all matrix products and triangular solves, so it
    runs at GEMM speed where Householder QR does not (CPU BLAS and GPUs alike). It is
    accurate when ``cond(Y) < eps**-1/2``. When a Cholesky factorization fails, or the first
    pass leaves ``max|Q_1^T Q_1 - I| > 1/2`` (``Y`` numerically rank deficient or too
    ill-conditioned), it falls back to Householder QR, so the result is always orthonormal.
    Where ``max|Y|`` is so large or small that the Gram matrix would overflow or underflow,
    it (and Householder QR, whose reflectors overflow near the dtype's limit) works on
    ``Y / c`` with ``c`` the power of two nearest ``max|Y|``
    (:func:`~lowrank_nla._backend.power_of_two_scale`), which is exact, and ``R`` is scaled
    back; otherwise nothing is scaled.

    ``Y`` is checked for NaN/Inf first (one reduction), so LAPACK never receives a
    non-finite block; ``subject`` names the argument in the error.
    """
    check_factor(xp, Y, subject, "block to orthonormalize")
    c = power_of_two_scale(xp, Y, gram_rows=Y.shape[0]) if Y.shape[1] > 0 else 1.0
    Ys = Y if c == 1.0 else Y / c
    if normalizer == "cholqr2" and Y.shape[1] > 0:
        L = cholesky_lower(xp, Ys.T @ Ys)  # None also for a non-finite Gram matrix
        if L is not None:
            Q1 = solve_triangular(xp, L, Ys.T, lower=True).T
            G1 = Q1.T @ Q1
            # The second pass restores orthogonality to rounding only if the first pass left
            # cond(Q1) small; max|G1 - I| <= 1/2 guarantees cond(Q1) <= sqrt(3).
            eye = xp.eye(G1.shape[0], dtype=G1.dtype, device=_dev(G1))
            if float(xp.max(xp.abs(G1 - eye))) <= 0.5:
                L1 = cholesky_lower(xp, G1)
                if L1 is not None:
                    R = L1.T @ L.T
                    Q = solve_triangular(xp, L1, Q1.T, lower=True).T
                    return Q, (R if c == 1.0 else R * c)
    # Householder QR overflows too near the dtype's limit (x_1 - alpha in the reflector)
    res = xp.linalg.qr(Ys)
    return res.Q, (res.R if c == 1.0 else res.R * c)


def orthonormalize(xp: Any, Y: Array, normalizer: str, subject: str = "`A`") -> Array:
    """Orthonormal basis of ``range(Y)`` with the chosen normalizer (``none`` -> QR)."""
    return qr_factor(xp, Y, normalizer, subject)[0]


def thin_svd(
    xp: Any, Y: Array, normalizer: str, subject: str = "`A`", keep: int | None = None
) -> tuple[Array, Array, Array]:
    """Thin SVD of a tall ``Y`` (m x l, m >= l) as ``QR`` then the SVD of the l x l ``R``.

    ``Y = Q R = (Q U_R) S V_R^T``: the work on the tall matrix is one QR and one product,
    which is much faster than a direct SVD of ``Y`` (LAPACK ``gesdd`` on the tall matrix).
    ``R`` is checked for NaN/Inf (an overflow of the singular values' dtype) before the SVD.
    With ``keep``, only the leading ``keep`` left singular vectors are formed (the product
    ``Q U_R`` shrinks accordingly); ``S`` and ``V_R^T`` are returned whole.
    """
    Q, R = qr_factor(xp, Y, normalizer, subject)
    check_factor(xp, R, subject, "triangular factor of the final SVD")
    U_R, S, Vh = xp.linalg.svd(R, full_matrices=False)
    return Q @ (U_R if keep is None else U_R[:, :keep]), S, Vh


def leading_svd(
    xp: Any, Q: Array, W: Array, rank: int, subject: str = "`A`"
) -> tuple[Array, Array, Array] | None:
    """The ``rank`` leading singular triplets of ``Q Q^T A`` from ``W = A^T Q``, via a Gram step.

    ``Q`` (m x l) is orthonormal and ``W = A^T Q = B^T`` (n x l) with ``B = Q^T A``. For a
    basis much wider than ``rank`` (block Krylov: ``l = b (q + 1)``), the QR-based SVD of
    the whole ``W`` costs ``O(n l^2)`` twice over (CholeskyQR2, then ``Q_W U_R``). Here:

    1. ``G = W^T W = B B^T`` (l x l) is diagonalized, ``Z_k`` its ``rank`` leading
       eigenvectors and ``lambda`` their eigenvalues. ``P = Q Z_k`` is orthonormal to
       rounding (``Q`` and ``Z_k`` are); only the choice of this subspace sees the squared
       condition number: with ``E`` the rounding of ``G`` and of its eigendecomposition,
       ``||(I - Z_k Z_k^T) B||_2^2 <= sigma_{k+1}(B)^2 + 2 ||E||_2`` (``(I - P_Z) G
       (I - P_Z)`` is within ``||E||`` of its computed counterpart, whose norm is the
       computed ``lambda_{k+1}``), and ``||E||_2`` is of order ``eps lambda_1``.
    2. ``C^T = W Z_k`` (n x rank) has orthogonal columns of norms ``sqrt(lambda)`` up to
       that rounding, so ``V_0 = W Z_k diag(lambda)^(-1/2)`` has ``max|V_0^T V_0 - I|`` of
       order ``eps lambda_1 / lambda_k``, and one Gram-Cholesky pass ``V_0 = Q_V L^T``
       makes it orthonormal to rounding. Then ``C^T = Q_V M`` with the small
       ``M = L^T diag(sqrt(lambda))``, whose SVD ``M = U_M S V_M^T`` gives
       ``Q Q^T A ~ (Q Z_k V_M) S (Q_V U_M)^T``: both factors orthonormal to rounding, and
       ``S`` the singular values of ``Z_k^T B`` computed from an orthonormal factorization.

    Taken only when the computed ``lambda_{k+1} >= sqrt(eps) lambda_1`` (so the ``||E||``
    term changes the squared truncation error by a relative ``O(sqrt(eps))`` at most) and
    the Cholesky pass sees ``max|V_0^T V_0 - I| <= 1/2``; otherwise (fast decay in low
    precision, exactly low-rank input, ``l == rank``) it returns ``None`` and the caller
    takes the QR-based SVD of the whole ``W``. ``W`` is scaled by a power of two near
    ``max|W|`` when its Gram matrix could over- or underflow (exact). Returns
    ``(U, S, V)`` with ``V`` (n x rank) the right singular vectors as columns.
    """
    width = W.shape[1]
    if width <= rank:
        return None
    c = power_of_two_scale(xp, W, gram_rows=W.shape[0])
    Ws = W if c == 1.0 else W / c
    G = Ws.T @ Ws
    check_factor(xp, G, subject, "Gram matrix of the final SVD")
    lam, Z = xp.linalg.eigh(G)  # ascending
    top = float(lam[width - 1])
    if not top > 0.0 or not float(lam[width - 1 - rank]) >= math.sqrt(eps(xp, W.dtype)) * top:
        return None
    Zk = xp.flip(Z[:, width - rank :], axis=1)
    root = xp.sqrt(xp.flip(lam[width - rank :], axis=0))
    V0 = (Ws @ Zk) / root
    GV = V0.T @ V0
    eye = xp.eye(rank, dtype=GV.dtype, device=_dev(GV))
    if not all_finite(xp, GV) or not float(xp.max(xp.abs(GV - eye))) <= 0.5:
        return None
    L = cholesky_lower(xp, GV)
    if L is None:
        return None
    QV = solve_triangular(xp, L, V0.T, lower=True).T
    M = L.T * root[None, :]
    check_factor(xp, M, subject, "triangular factor of the final SVD")
    U_M, S, VMh = xp.linalg.svd(M, full_matrices=False)
    return Q @ (Zk @ VMh.T), (S if c == 1.0 else S * c), QV @ U_M


# Products without an orthonormalization between them (normalizer="none", or srevd's
# reorth_every=None) shrink direction j of the block relative to the dominant one like
# (sigma_j / sigma_1)^s, s the number of such products; once that falls to the order of eps
# the direction is rounding noise and its singular value is lost (measured: 30-60% errors
# in the top ten values of j^-1 and 0.9^j spectra). The routines check the computed
# spectrum a posteriori and warn below UNRESOLVED_FACTOR * eps. The factor is measured
# (randomized_svd, rank 10, p = 10, on j^-1, 0.9^j and exp(-j/10) spectra; srevd and
# randomized_eigh, rank 128-220, p = 50, on K-factor-like matrices in float32): every
# configuration with (sigma_k / sigma_1)^s <= 2 eps lost its trailing values (top-ten
# errors 2e-3 to 60% where QR between the products gives 5e-8 to 2e-5; the trailing Ritz
# value of a K-factor 12% worse than QR at 0.9 eps), none at 4 eps or more did (within 3%
# of QR, or below 1e-6). Directions whose value is itself at rounding level
# (ratio <= NEGLIGIBLE_FACTOR * eps: exactly low-rank input) are exempt: no normalizer
# resolves them.
UNRESOLVED_FACTOR = 2.0
NEGLIGIBLE_FACTOR = 1000.0


NORMALIZER_REMEDY = "use normalizer='qr' or 'cholqr2' (or fewer power iterations)"


def warn_if_unresolved(
    xp: Any,
    magnitudes: Array,
    k: int,
    exponent: int,
    dtype: Any,
    routine: str,
    remedy: str = NORMALIZER_REMEDY,
    stacklevel: int = 4,
) -> None:
    """Warn when ``(m_k / m_1)^exponent`` of the computed magnitudes is below rounding.

    ``magnitudes`` are the computed singular values or absolute eigenvalues, largest first;
    ``exponent`` the number of products between orthonormalizations. The default
    ``stacklevel`` points at the caller of a public function that calls this directly (this
    function, the routine, its :func:`~lowrank_nla._backend.fp_guarded` wrapper).
    """
    if exponent < 2 or k < 1:
        return
    top = float(magnitudes[0])
    if not top > 0.0:
        return
    ratio = float(magnitudes[k - 1]) / top
    e = eps(xp, dtype)
    if ratio <= NEGLIGIBLE_FACTOR * e or ratio**exponent >= UNRESOLVED_FACTOR * e:
        return
    warnings.warn(
        f"{routine}: {exponent} products without orthonormalization shrank the weakest "
        f"requested direction to {ratio**exponent:.1e} of the dominant one, below the "
        f"rounding of {str(dtype).rsplit('.', 1)[-1]}: the trailing results are unreliable; "
        f"{remedy}",
        RuntimeWarning,
        stacklevel=stacklevel,
    )


def _normalize_between(xp: Any, Y: Array, normalizer: str, subject: str) -> Array:
    """Normalization between power iterations: ``none`` only rescales columns."""
    if normalizer == "none":
        return column_scale(xp, Y)
    return orthonormalize(xp, Y, normalizer, subject)


# --------------------------------------------------------------------------- engines


def general_range(
    op: Operator,
    size: int,
    *,
    power_iters: int,
    normalizer: str,
    draw: Sampler,
    name: str = "A",
) -> tuple[Array, Array]:
    """Subspace iteration ``Q = orth((A A^T)^q A Omega)`` (HMT 2011, Algorithm 4.4).

    Returns ``Q`` and the triangular factor ``R`` of the final orthonormalization. Every
    product is checked for NaN/Inf.
    """
    xp = op.xp
    subject = f"`{name}`"
    if power_iters > 0:
        op.rmatmat_or_raise(name)
    Y = op.checked_matmat(draw((op.shape[1], size)), name)
    for _ in range(power_iters):
        Z = op.checked_rmatmat(_normalize_between(xp, Y, normalizer, subject), name)
        Y = op.checked_matmat(_normalize_between(xp, Z, normalizer, subject), name)
    return qr_factor(xp, Y, normalizer, subject)


def _extend_basis(
    xp: Any, Q: Array | None, Y: Array, normalizer: str, subject: str, draw: Sampler
) -> Array:
    """Orthonormal basis of the part of ``range(Y)`` orthogonal to the orthonormal ``Q``.

    Block classical Gram-Schmidt with reorthogonalization (BCGS2, Barlow & Smoktunowicz
    2013): ``Y`` is projected out of ``range(Q)`` and orthonormalized (``normalizer``), and
    the result is projected and orthonormalized once more. A column whose projected part is
    at rounding level (``|R_jj| <= 10 m eps`` times the largest column norm of ``Y``: a
    Krylov space that has saturated on exactly low-rank input) carries no new direction; it
    is replaced by a Gaussian column, so that the basis stays orthonormal instead of
    repeating a direction of ``Q``. Every other column kept more than ``10 m eps`` of its
    norm, so what the first projection left of ``range(Q)`` in the normalized block is far
    below 1 and the second projection removes it to rounding; the second block is then
    orthonormal up to that small remainder and one Cholesky pass orthonormalizes it
    (:func:`_cholesky_pass`). Should that block still be far from orthonormal, it is
    orthonormalized, projected twice more and orthonormalized again (``normalizer``).
    """
    if Q is None:
        return orthonormalize(xp, Y, normalizer, subject)
    Q1, R = qr_factor(xp, Y - Q @ (Q.T @ Y), normalizer, subject)
    ref = float(xp.max(safe_norm(xp, Y, axis=0)))
    tol = 10.0 * Y.shape[0] * eps(xp, Y.dtype) * ref
    bad = xp.abs(xp.linalg.diagonal(R)) <= tol
    if bool(xp.any(bad)):
        fill = _project_out(xp, Q, draw(tuple(Y.shape)))
        Q1 = orthonormalize(xp, xp.where(bad[None, :], fill, Q1), normalizer, subject)
    Z = Q1 - Q @ (Q.T @ Q1)
    out = _cholesky_pass(xp, Z, subject)
    if out is None:  # Z far from orthonormal: normalize, then project twice and normalize
        Z = orthonormalize(xp, Z, normalizer, subject)
        out = orthonormalize(xp, _project_out(xp, Q, Z), normalizer, subject)
    return out


def _cholesky_pass(xp: Any, Z: Array, subject: str) -> Array | None:
    """Orthonormalize a nearly orthonormal ``Z`` with one Gram-Cholesky pass, or ``None``.

    When ``max|Z^T Z - I| <= 1/2`` (so ``cond(Z) <= sqrt(3)``), ``Z L^{-T}`` with
    ``Z^T Z = L L^T`` is orthonormal to a few ulps (the second pass of CholeskyQR2);
    otherwise, or when the Cholesky factorization fails, ``None``.
    """
    check_factor(xp, Z, subject, "block to orthonormalize")
    G = Z.T @ Z
    eye = xp.eye(G.shape[0], dtype=G.dtype, device=_dev(G))
    if all_finite(xp, G) and float(xp.max(xp.abs(G - eye))) <= 0.5:
        L = cholesky_lower(xp, G)
        if L is not None:
            return solve_triangular(xp, L, Z.T, lower=True).T
    return None


def krylov_range(
    op: Operator,
    size: int,
    *,
    power_iters: int,
    normalizer: str,
    draw: Sampler,
    with_transpose: bool,
    name: str = "A",
) -> tuple[Array, Array | None]:
    """Randomized block Krylov: an orthonormal basis of ``[A W, (A A^T) A W, ...]``.

    The Krylov space of degree ``q = power_iters`` with the ``size``-column block
    ``A Omega`` (Musco & Musco 2015, Algorithm 2; Tropp & Webber 2023, section 11) has
    ``size (q + 1)`` columns, capped at ``min(m, n)`` (the last block is cut). Each new
    block ``A orth(A^T Q_i)`` is orthogonalized against the basis so far
    (:func:`_extend_basis`). Returns the basis ``Q`` and, with ``with_transpose``,
    ``A^T Q``, whose blocks are the products ``A^T Q_i`` the recurrence computes anyway
    (only the last one is extra). Products: ``q + 1`` with ``A`` and ``q`` (``q + 1`` with
    ``with_transpose``) with ``A^T``, each with a ``size``-column block: as many as subspace
    iteration with the same ``q``.
    """
    xp = op.xp
    subject = f"`{name}`"
    cap = min(op.shape)
    if power_iters > 0 or with_transpose:
        op.rmatmat_or_raise(name)
    transposed: list[Array] = []
    Q: Array | None = None
    total = 0
    Y = op.checked_matmat(draw((op.shape[1], size)), name)
    for i in range(power_iters + 1):
        Qi = _extend_basis(xp, Q, Y, normalizer, subject, draw)
        if Qi.shape[1] > cap - total:  # the last block is cut at min(m, n) columns
            Qi = Qi[:, : cap - total]
        total += Qi.shape[1]
        Q = Qi if Q is None else xp.concat([Q, Qi], axis=1)
        last = i == power_iters or total >= cap
        if with_transpose or not last:
            transposed.append(op.checked_rmatmat(Qi, name))
        if last:
            break
        Y = op.checked_matmat(orthonormalize(xp, transposed[-1], normalizer, subject), name)
    assert Q is not None
    if not with_transpose:
        return Q, None
    W = transposed[0] if len(transposed) == 1 else xp.concat(transposed, axis=1)
    return Q, W


def symmetric_krylov(
    op: Operator, size: int, *, power_iters: int, normalizer: str, draw: Sampler
) -> tuple[Array, Array]:
    """Block Krylov basis ``Q`` of ``[A W, ..., A^(q+1) W]`` for a symmetric ``A``, and ``A Q``.

    ``q + 1`` blocks of ``size`` columns (capped at ``n``), built with ``q + 2`` products,
    the last of which, ``A Q_q``, completes ``A Q`` for the Rayleigh-Ritz matrix: as many
    products as :func:`symmetric_range` with ``q + 1`` passes plus the Rayleigh-Ritz one.
    """
    xp = op.xp
    cap = op.shape[0]
    Q: Array | None = None
    AQ: list[Array] = []
    total = 0
    Y = op.checked_matmat(draw((cap, size)))
    for _ in range(power_iters + 1):
        Qi = _extend_basis(xp, Q, Y, normalizer, "`A`", draw)
        if Qi.shape[1] > cap - total:
            Qi = Qi[:, : cap - total]
        total += Qi.shape[1]
        Q = Qi if Q is None else xp.concat([Q, Qi], axis=1)
        Y = op.checked_matmat(Qi)
        AQ.append(Y)
        if total >= cap:
            break
    assert Q is not None
    return Q, (AQ[0] if len(AQ) == 1 else xp.concat(AQ, axis=1))


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
    subject = f"`{name}`"
    Y = draw((op.shape[0], size))
    for i in range(1, passes + 1):
        Y = op.checked_matmat(Y, name)
        if i == passes:
            break
        if normalize_every is not None and i % normalize_every == 0:
            Y = _normalize_between(xp, Y, normalizer, subject)
        else:
            Y = column_scale(xp, Y)
    return orthonormalize(xp, Y, normalizer, subject)


def check_symmetric(op: Operator, draw: Sampler, name: str = "A") -> None:
    """Probabilistic symmetry check with two Gaussian probes ``u``, ``v``.

    Raises ``ValueError`` when ``|u^T A v - v^T A u| > sqrt(eps) (|u| |Av| + |v| |Au|)``.
    Rounding contributes about ``sqrt(n) eps`` to the left side, so symmetric input passes; an
    asymmetric part ``K = (A - A^T)/2`` is detected once ``|K|_F / |A|_F`` exceeds about
    ``sqrt(n eps)``. Both sides are computed on ``A W / c`` with ``c`` a power of two near
    ``max|A W|`` and with :func:`~lowrank_nla._backend.safe_norm`, so the test is invariant
    under scaling ``A`` (neither side underflows to zero for tiny ``A`` nor overflows for
    huge ``A``); the zero matrix passes. Cost: one product with a two-column block.
    """
    xp = op.xp
    W = draw((op.shape[0], 2))
    AW = op.checked_matmat(W, name)
    c = power_of_two_scale(xp, AW)
    AW = AW if c == 1.0 else AW / c
    u, v = W[:, 0], W[:, 1]
    Au, Av = AW[:, 0], AW[:, 1]
    uAv = xp.vecdot(u, Av)
    vAu = xp.vecdot(v, Au)
    scale = safe_norm(xp, u) * safe_norm(xp, Av) + safe_norm(xp, v) * safe_norm(xp, Au)
    gap = float(xp.abs(uAv - vAu))
    limit = math.sqrt(eps(xp, op.dtype)) * float(scale)
    if not gap <= limit:
        raise ValueError(
            f"`{name}` is not symmetric: the probe |u^T A v - v^T A u| = {gap * c:.3e} exceeds "
            f"{limit * c:.3e}; pass a symmetric matrix (or `check_symmetric=False` if it is "
            "symmetric up to a known perturbation)"
        )


# --------------------------------------------------------------------------- public API


@fp_guarded
def randomized_range_finder(
    A: Any,
    size: int,
    *,
    power_iters: int = 2,
    normalizer: str = "qr",
    rng: Any = None,
    method: str = "subspace",
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
        Number ``q`` of subspace iterations with ``A A^T``, ``0 <= q <= 100``.
    normalizer : {"qr", "cholqr2", "none"}, default "qr"
        Orthonormalization between products: Householder QR; CholeskyQR2 (two
        Gram-Cholesky passes, bound by matrix products and fast on GPUs, with a fallback to
        QR when Cholesky fails); or none (only column rescaling). ``"none"`` is accurate
        while ``(sigma_size / sigma_1)^(2q + 1)`` stays above about ``2 eps`` of the
        dtype. The decompositions check this on the spectrum they compute and warn; the
        range finder computes no spectrum and cannot (a collapsed block and an ``A`` of
        rank below ``size`` look alike), so prefer ``"qr"``/``"cholqr2"`` for ``q > 1``.
    rng : None, int, numpy/torch/cupy Generator, optional
        Source of the Gaussian test matrix; an int seed gives reproducible results on a
        given backend.
    method : {"subspace", "block_krylov"}, default "subspace"
        ``"subspace"``: the basis of the last iterate ``(A A^T)^q A Omega``.
        ``"block_krylov"``: the basis of the whole Krylov space
        ``[A Omega, (A A^T) A Omega, ..., (A A^T)^q A Omega]``, ``size (q + 1)`` columns
        (capped at ``min(m, n)``) from the same number of products; it contains the
        subspace-iteration range of the same ``Omega``, so its error is never larger, and
        it converges much faster on slowly decaying spectra (see
        :func:`lowrank_nla.krylov_error_bound`). Needs ``normalizer`` "qr" or "cholqr2".

    Returns
    -------
    Q : array, shape (m, size) or (m, min(size * (power_iters + 1), m, n))
        Orthonormal columns, same library, device and dtype as ``A`` (the second shape for
        ``method="block_krylov"``). For a dask array ``A`` (see the Notes) ``Q`` is a dask
        array chunked along rows like ``A``.

    Raises
    ------
    ValueError
        If ``size`` or ``power_iters`` is out of range, ``normalizer`` unknown, ``A``
        holds NaN/Inf, or a product overflows ``A``'s dtype.
    TypeError
        If ``A`` is not an array or operator, or has a complex/boolean dtype.

    Notes
    -----
    Computes ``Y = (A A^T)^q A Omega`` with a Gaussian ``Omega`` (n x size),
    orthonormalizing between products, and returns ``Q = orth(Y)`` (Halko, Martinsson &
    Tropp 2011, Algorithm 4.4). Cost: ``(2q + 1)`` products of ``A`` (or ``A^T``) with an
    ``n x size`` block plus ``2q + 1`` orthonormalizations of ``O(m size^2)``.
    For ``p = size - k >= 2`` the expected error ``E ||A - Q Q^T A||_2`` is bounded by
    :func:`lowrank_nla.hmt_error_bound`. Every product is checked for NaN/Inf (see the
    algorithm reference, docs/algorithms.md, section 'Randomized decompositions').

    A dask array ``A`` (chunked along rows only) is read in ``q + 1`` passes: each of the
    first ``q`` passes applies ``A^T A`` to an ``n x size`` block held in memory, the last
    computes ``A V`` (kept on the workers) and ``Q`` is its tall-skinny QR (see the user
    guide's dask section; ``method="block_krylov"`` is not available for dask input).

    References
    ----------
    N. Halko, P.-G. Martinsson, J. A. Tropp, "Finding structure with randomness:
    probabilistic algorithms for constructing approximate matrix decompositions", SIAM
    Review 53(2), 2011. C. Musco, C. Musco, "Randomized block Krylov methods for stronger
    and faster approximate singular value decomposition", NeurIPS 2015.

    Examples
    --------
    >>> import numpy as np
    >>> import lowrank_nla as ln
    >>> A = np.random.default_rng(0).standard_normal((50, 8)) @ np.ones((8, 40))
    >>> Q = ln.randomized_range_finder(A, 10, rng=0)
    >>> bool(np.allclose(Q @ (Q.T @ A), A))
    True
    """
    if is_dask_array(A):
        from ._dask import dask_range_finder

        return dask_range_finder(
            A, size, power_iters=power_iters, normalizer=normalizer, rng=rng, method=method
        )
    op = as_operator(A, "A", check_finite_entries=False)
    size = check_rank(size, op.shape, "size")
    power_iters = check_power_iters(power_iters)
    normalizer = check_normalizer(normalizer)
    method = check_method(method, normalizer)
    xp = op.xp
    draw = normal_sampler(xp, rng, dtype=op.dtype, device=op.device)
    if method == "block_krylov":
        Q = krylov_range(
            op,
            size,
            power_iters=power_iters,
            normalizer=normalizer,
            draw=draw,
            with_transpose=False,
        )[0]
    else:
        Q = general_range(op, size, power_iters=power_iters, normalizer=normalizer, draw=draw)[0]
    check_factor(xp, Q, "`A`", "orthonormal basis")  # QR of a block near the dtype's limit
    return Q


# HMT 2011, Lemma 4.1: ||(I - P) A|| <= HMT_PROBE_FACTOR max_i ||(I - P) A w_i|| w.h.p.
HMT_PROBE_FACTOR = 10.0 * math.sqrt(2.0 / math.pi)


def _project_out(xp: Any, Q: Array | None, Y: Array) -> Array:
    """``(I - Q Q^T) Y`` applied twice ("twice is enough", Giraud et al. 2005)."""
    if Q is None:
        return Y
    for _ in range(2):
        Y = Y - Q @ (Q.T @ Y)
    return Y


@fp_guarded
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
        Columns added per step; also the number of probes of the stopping estimate. A
        ``block`` above ``max(min(m, n), 10)`` is reduced to it (more probes add nothing).
    max_rank : int, optional
        Largest basis size (default ``min(m, n)``). If it is reached before ``tol`` a
        ``RuntimeWarning`` says so and the basis built so far is returned.
    power_iters : int, default 0
        Subspace iterations applied to each new block before it joins the basis
        (``0 <= power_iters <= 100``).
    rng : None, int, numpy/torch/cupy Generator, optional
        Source of the Gaussian probes.

    Returns
    -------
    Q : array, shape (m, k)
        Orthonormal columns, ``k`` a multiple of ``block`` (or ``max_rank``).

    Raises
    ------
    ValueError
        Out-of-range ``tol``, ``block``, ``max_rank`` or ``power_iters``; NaN/Inf in ``A``;
        a product that overflows ``A``'s dtype.
    TypeError
        Unsupported input type or dtype; an operator without ``.T`` when
        ``power_iters > 0``.

    Notes
    -----
    Blocked form of HMT 2011, Algorithm 4.2. Each step draws ``block`` Gaussian vectors,
    forms ``Y = (I - Q Q^T) A Omega`` and uses HMT Lemma 4.1,

    .. math:: \\|(I - QQ^T)A\\|_2 \\le 10\\sqrt{2/\\pi}\\,\\max_i \\|(I - QQ^T)A\\omega_i\\|,

    which holds with probability at least ``1 - 10**-block``: below ``tol`` it stops,
    otherwise the orthonormalized (and optionally power-iterated) ``Y`` joins ``Q``.
    Projections are done twice for orthogonality in floating point; the probe norms are
    computed without under/overflow (:func:`~lowrank_nla._backend.safe_norm`), so the
    stopping test is exact in scale for any input magnitude. Cost per step:
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
    block = min(check_int(block, "block", minimum=1), max(full, 10))
    max_rank = full if max_rank is None else check_rank(max_rank, op.shape, "max_rank")
    power_iters = check_power_iters(power_iters)
    xp = op.xp
    draw = normal_sampler(xp, rng, dtype=op.dtype, device=op.device)
    if power_iters > 0:
        op.rmatmat_or_raise("A")

    Q: Array | None = None
    k = 0
    while True:
        b = min(block, max_rank - k)
        Y = _project_out(xp, Q, op.checked_matmat(draw((op.shape[1], block)), "A"))
        estimate = HMT_PROBE_FACTOR * float(xp.max(safe_norm(xp, Y, axis=0)))
        if estimate <= tol:
            break
        if b == 0:
            if max_rank < full:
                warnings.warn(
                    f"adaptive_range_finder reached `max_rank` = {max_rank} with an error "
                    f"estimate {estimate:.3e} > `tol` = {tol:.3e}",
                    RuntimeWarning,
                    stacklevel=3,
                )
            break
        Y = Y[:, :b]
        for _ in range(power_iters):
            Z = orthonormalize(xp, op.checked_rmatmat(orthonormalize(xp, Y, "qr")), "qr")
            Y = _project_out(xp, Q, op.checked_matmat(Z))
        Qb = orthonormalize(xp, _project_out(xp, Q, orthonormalize(xp, Y, "qr")), "qr")
        Q = Qb if Q is None else xp.concat([Q, Qb], axis=1)
        k += b
    if Q is None:
        # A is (numerically) zero at this tolerance: an empty basis is the exact answer.
        return xp.zeros((op.shape[0], 0), dtype=op.dtype, device=op.device)
    check_factor(xp, Q, "`A`", "orthonormal basis")
    return Q
