"""A-priori error bounds and a-posteriori error estimators.

A-priori bounds take spectra (any array-like, read on the host) and return Python floats.
Estimators work on the data in its own library and device and return 0-d arrays there, so a
GPU computation is not synchronised until the caller asks for a number (``float(...)``).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from ._backend import (
    Operator,
    as_operator,
    check_factor,
    check_finite,
    floating_dtype,
    fp_guarded,
    host_values,
    namespace,
    normal_sampler,
    overflow_error,
    safe_norm,
)
from ._eigh import EighResult
from ._lowrank import ORTHONORMALITY_TOL, orthonormality_estimate
from ._sketch import HMT_PROBE_FACTOR
from ._svd import SVDResult
from ._validation import (
    check_bool,
    check_decay,
    check_int,
    check_power_iters,
    check_real,
    check_square,
)

__all__ = [
    "estimate_spectral_norm",
    "hmt_error_bound",
    "krylov_error_bound",
    "posterior_error_estimate",
    "relative_error",
]

Array = Any


@fp_guarded
def hmt_error_bound(
    singular_values: Any,
    rank: int,
    oversample: int,
    power_iters: int = 0,
    *,
    symmetric: bool = False,
) -> float:
    """Expected spectral error of randomized range finding (Halko, Martinsson & Tropp).

    Parameters
    ----------
    singular_values : array_like, shape (min(m, n),)
        All singular values of ``A`` (any order; any library, read on the host). For a
        symmetric matrix, the absolute eigenvalues.
    rank : int
        Target rank ``k >= 1``.
    oversample : int
        Oversampling ``p >= 2`` (the bound is infinite for ``p < 2``).
    power_iters : int, default 0
        Power iterations ``q >= 0`` of the sketch.
    symmetric : bool, default False
        ``False``: the sketch is ``(A A^T)^q A Omega`` (:func:`randomized_range_finder`,
        :func:`randomized_svd`), exponent ``s = 2q + 1``. ``True``: the sketch is
        ``A^(q+1) Omega`` (:func:`randomized_eigh`, :func:`srevd`), exponent ``s = q + 1``.

    Returns
    -------
    float
        Upper bound on ``E ||A - Q Q^T A||_2`` for the ``k + p`` column basis ``Q``.

    Notes
    -----
    With ``sigma`` sorted descending and ``s`` the exponent,

    .. math::

        \\mathbb E\\|A - QQ^TA\\|_2 \\le \\Big[\\big(1 + \\sqrt{\\tfrac{k}{p-1}}\\big)
        \\sigma_{k+1}^{s} + \\tfrac{e\\sqrt{k+p}}{p}
        \\big(\\textstyle\\sum_{j>k}\\sigma_j^{2s}\\big)^{1/2}\\Big]^{1/s}

    (HMT 2011, Theorem 10.6 and Corollary 10.10). For the symmetric sketch, ``A^s Omega`` has
    the range distribution of ``|A|^s Omega``, ``||(I-P)A||_2 = ||(I-P)|A| ||_2`` and, by the
    Hölder-McCarthy inequality, ``||(I-P)|A| ||^s <= ||(I-P)|A|^s||``; Jensen's inequality
    then gives the same formula with ``s = q + 1``. A rank-``k`` truncation of the result
    adds at most ``sigma_{k+1}`` (HMT Theorem 9.3), and the Rayleigh-Ritz finish at most a
    factor 2 on the range error. This bounds an expectation: a single draw may exceed it,
    rarely by much (HMT Theorem 10.8 gives the tail).

    References
    ----------
    N. Halko, P.-G. Martinsson, J. A. Tropp, SIAM Review 53(2), 2011.

    Examples
    --------
    >>> import numpy as np
    >>> import lowrank_nla as ln
    >>> round(ln.hmt_error_bound(np.ones(10), 10, 2), 12)  # nothing beyond rank 10
    0.0
    """
    sigma = np.sort(np.abs(host_values(singular_values, "singular_values")))[::-1]
    rank = check_int(rank, "rank", minimum=1)
    oversample = check_int(oversample, "oversample", minimum=2)
    power_iters = check_int(power_iters, "power_iters", minimum=0)
    symmetric = check_bool(symmetric, "symmetric")
    if not np.all(np.isfinite(sigma)):
        raise ValueError("`singular_values` must not contain NaN or Inf")
    tail = sigma[rank:]
    if tail.size == 0 or tail[0] == 0.0:
        return 0.0
    s = power_iters + 1 if symmetric else 2 * power_iters + 1
    # Normalise by sigma_{k+1} so that high powers neither overflow nor underflow.
    t = tail / tail[0]
    k, p = rank, oversample
    inner = (1.0 + math.sqrt(k / (p - 1))) + math.e * math.sqrt(k + p) / p * math.sqrt(
        float(np.sum(t ** (2 * s)))
    )
    return float(tail[0] * inner ** (1.0 / s))


def _chebyshev_inverse(degree: int, x: float) -> float:
    """``1 / T_degree(x)`` for ``x >= 1`` without overflow (``T_d(x) = cosh(d acosh x)``)."""
    t = degree * math.acosh(x)
    return 2.0 * math.exp(-t) / (1.0 + math.exp(-2.0 * t))


def _filtered_bound(t: np.ndarray, head: float, k: int, p: int) -> float:
    """``sigma_{k+1}``-relative bound: ``1 + head (sqrt(k/(p-1)) max t + e sqrt(k+p)/p ||t||)``.

    ``t`` are the filtered tail values ``|phi(sigma_j)| / sigma_{k+1}`` (``j > k``) and
    ``head = max_{j <= k} sigma_j / |phi(sigma_j)|`` times ``sigma_{k+1}``.
    """
    spread = math.sqrt(k / (p - 1)) * float(np.max(t)) + math.e * math.sqrt(k + p) / p * float(
        np.sqrt(np.sum(t * t))
    )
    return 1.0 + head * spread


@fp_guarded
def krylov_error_bound(
    singular_values: Any,
    rank: int,
    oversample: int,
    power_iters: int = 0,
    *,
    symmetric: bool = False,
) -> float:
    """Expected spectral error of randomized block Krylov range finding.

    Parameters
    ----------
    singular_values : array_like, shape (min(m, n),)
        All singular values of ``A`` (any order; any library, read on the host). For a
        symmetric matrix, the absolute eigenvalues.
    rank : int
        Target rank ``k >= 1``.
    oversample : int
        Oversampling ``p >= 2`` of the block: the Krylov block has ``k + p`` columns.
    power_iters : int, default 0
        Krylov iterations ``0 <= q <= 100`` (``method="block_krylov"`` with
        ``power_iters=q``; the decompositions accept the same range).
    symmetric : bool, default False
        ``False``: the space ``[A W, (A A^T) A W, ..., (A A^T)^q A W]`` of
        :func:`randomized_range_finder` and :func:`randomized_svd`. ``True``: the space
        ``[A W, ..., A^(q+1) W]`` of :func:`randomized_eigh`.

    Returns
    -------
    float
        Upper bound on ``E ||A - Q Q^T A||_2`` for the block Krylov basis ``Q``; never
        larger than :func:`hmt_error_bound` with the same arguments.

    Raises
    ------
    ValueError
        ``rank < 1``, ``oversample < 2``, ``power_iters`` outside ``[0, 100]`` (the bound
        minimizes over ``q + 1`` filters, so a count like ``10**9`` would run for hours),
        NaN/Inf or a ``singular_values`` of two or more dimensions.
    TypeError
        Non-integer counts, a non-bool ``symmetric``, non-numeric ``singular_values``.

    Notes
    -----
    The Krylov space contains ``phi(A) Omega`` for every odd polynomial
    ``phi(sigma) = sigma r(sigma^2)`` of degree ``2d + 1`` (``d = q``; ``d = floor(q/2)``
    for the symmetric space), applied through the singular value decomposition. The proof
    of HMT Theorem 9.1 with ``phi(A) Omega`` in place of ``A Omega`` and Theorem 10.6 for
    the Gaussian factor give, for any such ``phi`` with ``phi(sigma_j) != 0`` for ``j <= k``,

    .. math::

        \\mathbb E\\|A - QQ^TA\\|_2 \\le \\sigma_{k+1} + \\max_{j\\le k}
        \\frac{\\sigma_j}{|\\phi(\\sigma_j)|}\\Big[\\sqrt{\\tfrac{k}{p-1}}\\max_{j>k}
        |\\phi(\\sigma_j)| + \\tfrac{e\\sqrt{k+p}}{p}\\Big(\\sum_{j>k}\\phi(\\sigma_j)^2
        \\Big)^{1/2}\\Big].

    The value returned is the smallest of this bound over the filters
    ``phi(sigma) = sigma^(2a+1) T_(d-a)(2 sigma^2 / sigma_{k+1}^2 - 1)``, ``a = 0..d``
    (``T_b`` the Chebyshev polynomial: at most 1 in magnitude on the tail, growing like
    ``exp(2 b sqrt(gap))`` above it, ``gap = sigma_k^2 / sigma_{k+1}^2 - 1``: the
    square-root acceleration of Krylov methods; the monomial factor damps the tail's
    Frobenius mass), and :func:`hmt_error_bound` (the Krylov space contains the
    subspace-iteration sketch).
    The rank-``k`` truncation of a decomposition adds at most ``sigma_{k+1}``, the
    Rayleigh-Ritz finish at most a factor 2 on the range error, as for
    :func:`hmt_error_bound`.

    References
    ----------
    C. Musco, C. Musco, "Randomized block Krylov methods for stronger and faster
    approximate singular value decomposition", NeurIPS 2015; J. A. Tropp, R. J. Webber,
    "Randomized algorithms for low-rank matrix approximation: design, analysis, and
    applications", arXiv:2306.12418, 2023; Halko, Martinsson & Tropp (2011), Theorems 9.1
    and 10.6.

    Examples
    --------
    >>> import numpy as np
    >>> import lowrank_nla as ln
    >>> s = np.r_[np.full(20, 1.2), 0.9 ** np.arange(280.0)]  # sigma_20 / sigma_21 = 1.2
    >>> round(ln.hmt_error_bound(s, 20, 5, 5), 3), round(ln.krylov_error_bound(s, 20, 5, 5), 3)
    (1.179, 1.027)
    """
    power_iters = check_power_iters(power_iters)
    hmt = hmt_error_bound(singular_values, rank, oversample, power_iters, symmetric=symmetric)
    sigma = np.sort(np.abs(host_values(singular_values, "singular_values")))[::-1]
    k, p = rank, oversample
    tail = sigma[k:]
    if hmt == 0.0 or tail.size == 0 or tail[0] == 0.0:
        return hmt
    d = power_iters // 2 if symmetric else power_iters
    t = tail / tail[0]  # sigma_j / sigma_{k+1} <= 1 on the tail
    ratio = float(sigma[k - 1] / tail[0])  # sigma_k / sigma_{k+1} >= 1
    # phi(sigma) = sigma^(2a+1) T_(d-a)(2 sigma^2 / sigma_{k+1}^2 - 1), a = 0..d, in units
    # of sigma_{k+1}: |T| <= 1 on the tail (x in [-1, 1]); on the head sigma_j / phi(sigma_j)
    # decreases with sigma_j, so its maximum is at j = k.
    x_tail = np.clip(2.0 * t * t - 1.0, -1.0, 1.0)
    theta = np.arccos(x_tail)
    best = math.inf
    for a in range(d + 1):
        b = d - a
        filtered = t ** (2 * a + 1) * np.abs(np.cos(b * theta))
        head = ratio ** (-2 * a) * _chebyshev_inverse(b, 2.0 * ratio**2 - 1.0)
        best = min(best, _filtered_bound(filtered, head, k, p))
    return float(min(hmt, tail[0] * best))


def _gk_lanczos_norm(op: Operator, n_iter: int, rng: Any, name: str) -> Array:
    """Largest singular value by Golub-Kahan-Lanczos with full reorthogonalization.

    After ``k`` steps the estimate is the largest singular value of the ``k x (k + 1)`` upper
    bidiagonal ``U_k^T A V_(k+1)`` (its last column included, so a wide ``A`` with
    ``k = m`` steps is exact), a compression of ``A`` and thus never above ``||A||_2``.
    Every product is checked for NaN/Inf and the norms are taken without under/overflow
    (:func:`~lowrank_nla._backend.safe_norm`), so the estimate scales with ``A`` at any
    magnitude instead of vanishing (tiny ``A``) or failing (huge ``A``).
    """
    xp = op.xp
    op.rmatmat_or_raise(name)
    m, n = op.shape
    k = min(n_iter, m, n)
    draw = normal_sampler(xp, rng, dtype=op.dtype, device=op.device)
    v = draw((n, 1))
    Vs = [v / safe_norm(xp, v)]
    Us: list[Array] = []
    alphas: list[Array] = []
    betas: list[Array] = []
    tiny = 100 * float(xp.finfo(op.dtype).eps)
    scale = 0.0

    def norm_of(w: Array) -> Array:
        value = safe_norm(xp, w)
        if not bool(xp.isfinite(value)):
            raise overflow_error(f"`{name}`", "Lanczos recurrence", op.dtype)
        return value

    for _ in range(k):
        u = op.checked_matmat(Vs[-1], name)
        if betas:
            u = u - betas[-1] * Us[-1]
        if Us:
            Um = xp.concat(Us, axis=1)
            for _ in range(2):
                u = u - Um @ (Um.T @ u)
        alpha = norm_of(u)
        scale = max(scale, float(alpha))
        if float(alpha) <= tiny * scale:
            break  # A v_j lies in span(U): an invariant subspace, B is complete
        alphas.append(alpha)
        Us.append(u / alpha)
        # beta_j closes column j + 1 of the k x (k + 1) bidiagonal U_k^T A V_(k+1): without
        # it a wide A (m < n, so k <= m) would be estimated from too few directions
        w = op.checked_rmatmat(Us[-1], name) - alpha * Vs[-1]
        Vm = xp.concat(Vs, axis=1)
        for _ in range(2):
            w = w - Vm @ (Vm.T @ w)
        beta = norm_of(w)
        scale = max(scale, float(beta))
        if float(beta) <= tiny * scale:
            break
        betas.append(beta)
        Vs.append(w / beta)
    rows = len(alphas)
    if rows == 0:  # A v_0 = 0 to rounding: the zero matrix (or v_0 in its null space)
        return xp.zeros((), dtype=op.dtype, device=op.device)
    Bd = xp.zeros((rows, rows + (len(betas) == rows)), dtype=op.dtype, device=op.device)
    for i, a in enumerate(alphas):
        Bd[i, i] = a
    for i, b in enumerate(betas):
        Bd[i, i + 1] = b
    check_factor(xp, Bd, f"`{name}`", "Lanczos bidiagonal matrix")
    return xp.max(xp.linalg.svdvals(Bd))


@fp_guarded
def estimate_spectral_norm(
    A: Any, *, n_iter: int = 30, symmetric: bool = False, rng: Any = None
) -> Array:
    """Estimate ``||A||_2`` of a matrix or of an operator that is never formed.

    Parameters
    ----------
    A : array or linear operator, shape (m, n)
        An operator needs ``shape``, ``dtype``, ``@`` and ``.T`` (or ``symmetric=True``).
    n_iter : int, default 30
        Lanczos steps ``k`` (each one product with ``A`` and one with ``A^T``); at most
        ``min(m, n)`` are taken (a larger ``n_iter`` costs nothing more).
    symmetric : bool, default False
        Treat ``A`` as symmetric (its own transpose); then ``.T`` is not needed.
    rng : None, int, numpy/torch/cupy Generator, optional
        Source of the random start vector.

    Returns
    -------
    array, shape ()
        The estimate, a 0-d array in ``A``'s library, device and dtype.

    Raises
    ------
    ValueError
        NaN/Inf in ``A`` or its products, ``n_iter < 1``, a product that overflows the dtype,
        a non-square ``A`` with ``symmetric=True``.
    TypeError
        Unsupported input type or dtype; an operator without a transpose (unless
        ``symmetric=True``).

    Notes
    -----
    Golub-Kahan-Lanczos bidiagonalization started from a random unit vector, with full
    reorthogonalization of both Lanczos bases (done twice), returns the largest singular
    value of the ``k x k`` bidiagonal matrix. The estimate never exceeds ``||A||_2`` (up to
    rounding) and its relative error decays like a Chebyshev polynomial in the gap
    ``sigma_1 / sigma_2``: much faster than the power method's ``(sigma_2/sigma_1)^(2k)``.
    It stops early when an invariant subspace is found (exact for rank < ``k``, and for
    ``k = min(m, n)``: the last step's ``beta`` is kept, so a wide ``A`` is exact too).
    Cost: ``k`` products with each of ``A`` and ``A^T`` plus ``O((m + n) k^2)``.

    References
    ----------
    G. H. Golub, W. Kahan, "Calculating the singular values and pseudo-inverse of a
    matrix", SIAM J. Numer. Anal. 2(2), 1965; J. Kuczyński, H. Woźniakowski, "Estimating the
    largest eigenvalue by the power and Lanczos algorithms with a random start", SIAM J.
    Matrix Anal. Appl. 13(4), 1992.

    Examples
    --------
    >>> import numpy as np
    >>> import lowrank_nla as ln
    >>> A = np.diag([3.0, 2.0, 1.0])
    >>> round(float(ln.estimate_spectral_norm(A, rng=0)), 12)
    3.0
    """
    symmetric = check_bool(symmetric, "symmetric")
    op = as_operator(A, "A", symmetric=symmetric)
    if symmetric:
        check_square(op.shape)
    n_iter = check_int(n_iter, "n_iter", minimum=1)
    return _gk_lanczos_norm(op, n_iter, rng, "A")


@fp_guarded
def posterior_error_estimate(A: Any, Q: Any, *, n_probes: int = 10, rng: Any = None) -> Array:
    """Probabilistic upper bound on ``||A - Q Q^T A||_2`` from ``n_probes`` Gaussian probes.

    Parameters
    ----------
    A : array or linear operator, shape (m, n)
        The matrix (only ``@`` is used).
    Q : array, shape (m, k)
        Orthonormal basis, same library and device as ``A``.
    n_probes : int, default 10
        Number ``r`` of Gaussian probes.
    rng : None, int, numpy/torch/cupy Generator, optional
        Source of the probes.

    Returns
    -------
    array, shape ()
        ``10 sqrt(2/pi) max_i ||(I - QQ^T) A w_i||``, an upper bound with probability at
        least ``1 - 10**-r`` (HMT 2011, Lemma 4.1 / eq. 4.3), as a 0-d array.

    Raises
    ------
    ValueError
        Shape mismatch, NaN/Inf, a ``Q`` whose columns are not orthonormal
        (``||Q^T Q - I||_F > 0.01``, estimated in ``O(m k)`` as for :class:`LowRankPSD`), or
        a bound that overflows the dtype.
    TypeError
        ``A`` and ``Q`` from different array libraries or of different dtypes.

    Notes
    -----
    Cost: one product of ``A`` with ``n x r`` probes and ``O(m k r)``. The bound is loose
    by the constant ``10 sqrt(2/pi) ~ 8`` by design; :func:`estimate_spectral_norm` of the
    residual operator gives a tight lower estimate instead.

    Examples
    --------
    >>> import numpy as np
    >>> import lowrank_nla as ln
    >>> A = np.diag(0.1 ** np.arange(20.0))
    >>> Q = ln.randomized_range_finder(A, 8, rng=0)
    >>> float(ln.posterior_error_estimate(A, Q, rng=1)) >= 1e-8  # sigma_9 = 1e-8
    True
    """
    op = as_operator(A, "A", check_finite_entries=False)  # checked in the probe product
    xp = op.xp
    namespace(op.array if op.array is not None else xp.empty((0,)), Q, names=("A", "Q"))
    if Q.ndim != 2 or Q.shape[0] != op.shape[0]:
        raise ValueError(f"`Q` must have shape ({op.shape[0]}, k) to match `A`, got {Q.shape}")
    check_finite(xp, Q, "Q")
    n_probes = check_int(n_probes, "n_probes", minimum=1)
    draw = normal_sampler(xp, rng, dtype=op.dtype, device=op.device)
    q_dtype = floating_dtype(xp, Q, "Q", device=op.device)
    if q_dtype != op.dtype:
        raise TypeError(f"`Q` must have the dtype of `A` ({op.dtype}), got {Q.dtype}")
    Q = Q if Q.dtype == q_dtype else xp.astype(Q, q_dtype)
    defect = orthonormality_estimate(xp, Q)
    if not defect <= ORTHONORMALITY_TOL:
        raise ValueError(
            f"`Q` must have orthonormal columns: ||Q^T Q - I||_F is about {defect:.3e} > "
            f"{ORTHONORMALITY_TOL:g}; orthonormalize it (e.g. QR) first"
        )
    Y = op.checked_matmat(draw((op.shape[1], n_probes)))
    for _ in range(2):
        Y = Y - Q @ (Q.T @ Y)
    bound = HMT_PROBE_FACTOR * xp.max(safe_norm(xp, Y, axis=0))
    if not bool(xp.isfinite(bound)):  # within a factor 8 of the dtype's largest number
        raise overflow_error("`A`", "probabilistic error bound", op.dtype)
    return bound


def _approx_names(approx: Any) -> tuple[str, ...]:
    if isinstance(approx, SVDResult | EighResult):
        return tuple(f"approx.{field}" for field in approx._fields)
    return ("approx",)


def _approx_shape(approx: Any) -> tuple[int, ...]:
    """The shape of the matrix ``approx`` stands for; malformed factors raise ``ValueError``."""
    if isinstance(approx, SVDResult):
        U, S, Vh = approx
        if (
            U.ndim != 2
            or S.ndim != 1
            or Vh.ndim != 2
            or not U.shape[1] == S.shape[0] == Vh.shape[0]
        ):
            raise ValueError(
                "`approx` must be an SVDResult with U of shape (m, k), S (k,) and Vh (k, n), "
                f"got {tuple(U.shape)}, {tuple(S.shape)} and {tuple(Vh.shape)}"
            )
        return (int(U.shape[0]), int(Vh.shape[1]))
    if isinstance(approx, EighResult):
        w, V = approx
        if w.ndim != 1 or V.ndim != 2 or V.shape[1] != w.shape[0]:
            raise ValueError(
                "`approx` must be an EighResult with eigenvalues of shape (k,) and "
                f"eigenvectors (n, k), got {tuple(w.shape)} and {tuple(V.shape)}"
            )
        return (int(V.shape[0]), int(V.shape[0]))
    return tuple(int(n) for n in approx.shape)


def _dense_approx(xp: Any, approx: Any) -> Array:
    if isinstance(approx, SVDResult):
        return (approx.U * approx.S) @ approx.Vh
    if isinstance(approx, EighResult):
        V = approx.eigenvectors
        return (V * approx.eigenvalues) @ V.T
    return approx


def _residual_operator(op: Operator, approx: Any) -> Operator:
    """``A - approx`` as an :class:`Operator`, with ``approx`` kept in factored form."""
    if isinstance(approx, SVDResult):
        U, S, Vh = approx

        def low(X: Array) -> Array:
            return U @ (S[:, None] * (Vh @ X))

        def low_t(X: Array) -> Array:
            return Vh.T @ (S[:, None] * (U.T @ X))

    elif isinstance(approx, EighResult):
        w, V = approx

        def low(X: Array) -> Array:
            return V @ (w[:, None] * (V.T @ X))

        low_t = low
    else:

        def low(X: Array) -> Array:
            return approx @ X

        def low_t(X: Array) -> Array:
            return approx.T @ X

    op.rmatmat_or_raise("A")
    return Operator(
        shape=op.shape,
        dtype=op.dtype,
        xp=op.xp,
        device=op.device,
        # a NaN or overflow of A itself is reported as A's (the residual is checked again)
        matmat=lambda X: op.checked_matmat(X, "A") - low(X),
        rmatmat=lambda X: op.checked_rmatmat(X, "A") - low_t(X),
        array=None,
    )


@fp_guarded
def relative_error(A: Any, approx: Any, *, ord: Any = 2, method: str = "auto") -> Array:
    """Relative error ``||A - approx|| / ||A||`` of an approximation.

    Parameters
    ----------
    A : array or linear operator, shape (m, n)
        The reference.
    approx : array, SVDResult or EighResult
        The approximation, dense or in factored form, same library as ``A``.
    ord : {2, "fro"}, default 2
        Spectral or Frobenius norm.
    method : {"auto", "exact", "lanczos"}, default "auto"
        ``"exact"`` forms the residual and computes the norm exactly (the spectral norm by a
        full SVD, ``O(mn min(m, n))``); ``"lanczos"`` never forms it and estimates both
        spectral norms with :func:`estimate_spectral_norm` (60 steps, fixed seed; a tight
        lower estimate, only for ``ord=2``). ``"auto"`` is exact for arrays and Lanczos for
        operators.

    Returns
    -------
    array, shape ()
        The relative error as a 0-d array in ``A``'s library and device.

    Raises
    ------
    ValueError
        Unknown ``ord``/``method``, shape mismatch (also between the factors of an
        ``SVDResult``/``EighResult``), ``ord="fro"`` with Lanczos, zero ``A``,
        NaN/Inf in ``A`` or ``approx``, a residual or ratio that overflows the dtype.
    TypeError
        Arguments from different array libraries or of different dtypes.

    Notes
    -----
    For a rank-``k`` approximation the spectral value is at least the optimal
    ``sigma_{k+1} / sigma_1`` (Eckart-Young-Mirsky), which makes it the natural scale to
    compare randomized routines on. A factored ``approx`` is applied as
    ``U (S (Vh x))`` in the Lanczos path, so nothing of size ``m x n`` is formed.

    Examples
    --------
    >>> import numpy as np
    >>> import lowrank_nla as ln
    >>> A = np.diag([4.0, 2.0, 1.0])
    >>> float(ln.relative_error(A, ln.partial_eigh(A, 2)))
    0.25
    """
    if ord not in (2, "fro"):
        raise ValueError(f"`ord` must be 2 or 'fro', got {ord!r}")
    if method not in ("auto", "exact", "lanczos"):
        raise ValueError(f"`method` must be 'auto', 'exact' or 'lanczos', got {method!r}")
    op = as_operator(A, "A")
    xp = op.xp
    parts = tuple(approx) if isinstance(approx, SVDResult | EighResult) else (approx,)
    namespace(*parts, names=_approx_names(approx))
    shape = _approx_shape(approx)
    if shape != op.shape:
        raise ValueError(f"`approx` must have the shape of `A` {op.shape}, got {shape}")
    if op.array is not None:
        namespace(op.array, parts[0], names=("A", "approx"))
    for part in parts:
        if floating_dtype(xp, part, "approx", device=op.device) != op.dtype:
            raise TypeError(f"`approx` must have the dtype of `A` ({op.dtype}), got {part.dtype}")
        check_finite(xp, part, "approx")
    if not isinstance(approx, SVDResult | EighResult) and approx.dtype != op.dtype:
        approx = xp.astype(approx, op.dtype)  # an integer dense approximation
    if method == "auto":
        method = "exact" if op.array is not None else "lanczos"
    if method == "lanczos":
        if ord != 2:
            raise ValueError("`method='lanczos'` estimates only the spectral norm (`ord=2`)")
        num = _gk_lanczos_norm(_residual_operator(op, approx), 60, 0, "A - approx")
        den = _gk_lanczos_norm(op, 60, 0, "A")
    else:
        M = op.array
        if M is None:
            M = op.checked_matmat(xp.eye(op.shape[1], dtype=op.dtype, device=op.device))
        residual = M - _dense_approx(xp, approx)
        check_factor(xp, residual, "`approx`", "residual A - approx")

        def norm(X: Array) -> Array:
            if ord == 2:  # LAPACK's SVD scales internally
                return xp.max(xp.linalg.svdvals(X))
            return safe_norm(xp, X)

        num, den = norm(residual), norm(M)
    if float(den) == 0.0:
        raise ValueError("`A` is zero: the relative error is undefined")
    out = num / den
    if not bool(xp.isfinite(out)):  # num huge, den tiny
        raise overflow_error("`approx`", "relative error", op.dtype)
    return out


@fp_guarded
def ea_decay_modes(
    update_rank: int, decay: float, eps: float, *, steps: int | None = None, dim: int | None = None
) -> int:
    """Upper bound on how many eigenvalues of an exponential average can exceed ``eps c``.

    Parameters
    ----------
    update_rank : int
        ``m``: rank of each update ``C_j`` (for a K-factor: ``min(D, n)`` for Linear,
        ``min(D, n tau)`` for Conv2d).
    decay : float
        ``rho`` in ``[0, 1)``.
    eps : float
        Relative threshold in ``(0, 1]``.
    steps : int, optional
        Number ``k`` of updates so far (the average then has rank at most ``m k``).
    dim : int, optional
        Matrix dimension ``D`` (the count never exceeds it).

    Returns
    -------
    int
        ``m * ceil(ln(eps) / ln(rho))``, capped by ``m k`` and ``D`` when given.

    Notes
    -----
    For ``M_k = rho^k M_0 + (1 - rho) sum_j rho^(k-j) C_j`` with ``C_j`` PSD, rank ``<= m``,
    ``||C_j|| <= c`` and ``||M_0|| <= c``: the last ``s`` terms have rank ``<= m s`` and the
    rest has norm ``<= rho^s c``, so by Weyl's inequality ``lambda_{ms+1}(M_k) <= rho^s c``
    (see the algorithm reference, docs/algorithms.md, section 'Spectrum decay and error
    bounds'). Taking ``s = ceil(ln eps / ln rho)`` gives the count. The bound only
    guarantees decay; measured K-factor spectra decay much faster.

    Examples
    --------
    >>> import lowrank_nla as ln
    >>> ln.ea_decay_modes(16, 0.95, 0.1)  # 16 * ceil(44.9)
    720
    """
    m = check_int(update_rank, "update_rank", minimum=1)
    rho = check_decay(decay)
    eps = check_real(eps, "eps")
    if not 0.0 < eps <= 1.0:
        raise ValueError(f"`eps` must be in (0, 1], got {eps}")
    s = 1 if rho == 0.0 or eps == 1.0 else math.ceil(math.log(eps) / math.log(rho))
    count = m * max(s, 1)
    if steps is not None:
        count = min(count, m * check_int(steps, "steps", minimum=0))
    if dim is not None:
        count = min(count, check_int(dim, "dim", minimum=1))
    return count


@fp_guarded
def brand_drift_bound(dropped_max: Any, decay: float, *, initial: float = 0.0) -> float:
    """Accumulated truncation error of exponential-average Brand updates.

    Parameters
    ----------
    dropped_max : array_like, shape (k,)
        ``delta_j``: largest eigenvalue discarded at update ``j`` (``BrandUpdate.dropped_max``),
        oldest first.
    decay : float
        ``rho`` in ``[0, 1)``.
    initial : float, default 0
        ``||M_0 - B_0||_2`` of the starting representation.

    Returns
    -------
    float
        ``rho^k initial + sum_j rho^(k-j) delta_j``, an upper bound on
        ``||M_k - B_k||_2`` (and at most ``rho^k initial + max_j delta_j / (1 - rho)``).

    Notes
    -----
    :func:`brand_update` truncates after the update, so ``B_k = rho B_{k-1} + (1 - rho)
    X_k X_k^T - T_k`` with ``T_k`` PSD and ``||T_k|| = delta_k``. The error
    ``E_k = M_k - B_k`` obeys ``E_k = rho E_{k-1} + T_k``: each truncation is forgotten
    geometrically (see the algorithm reference, docs/algorithms.md, section
    'Error-controlled Brand variants'). ``E_k`` is PSD, so the same recursion with the
    dropped sums (``BrandUpdate.dropped_sum``) gives ``trace(E_k)`` exactly.

    Examples
    --------
    >>> import lowrank_nla as ln
    >>> round(ln.brand_drift_bound([1.0, 1.0], 0.5), 12)  # 0.5 * 1 + 1
    1.5
    """
    rho = check_decay(decay)
    initial = check_real(initial, "initial", minimum=0.0)
    deltas = host_values(dropped_max, "dropped_max")
    if not np.all(np.isfinite(deltas)) or np.any(deltas < 0):
        raise ValueError("`dropped_max` must be finite and non-negative")
    k = deltas.size
    weights = rho ** np.arange(k - 1, -1, -1, dtype=np.float64)
    bound = float(rho**k * initial + np.sum(weights * deltas))
    if not math.isfinite(bound):
        raise ValueError(
            "the drift bound overflows float64: `dropped_max` (or `initial`) is too large"
        )
    return bound


@fp_guarded
def inverse_perturbation_bound(error: float, damping: float) -> float:
    """Bound on the damped-inverse error caused by a representation error.

    Parameters
    ----------
    error : float
        ``||X - X_hat||_2`` with ``X``, ``X_hat`` positive semidefinite.
    damping : float
        ``lambda > 0``.

    Returns
    -------
    float
        ``error / lambda^2``, an upper bound on
        ``||(X + lambda I)^-1 - (X_hat + lambda I)^-1||_2``.

    Raises
    ------
    ValueError
        Negative or non-finite ``error``, ``damping <= 0``, or a bound that overflows
        float64 (``error / damping^2 > 1.8e308``).
    TypeError
        Non-numeric arguments.

    Notes
    -----
    ``(X + l I)^-1 - (X_hat + l I)^-1 = (X + l I)^-1 (X_hat - X) (X_hat + l I)^-1`` and both
    outer factors have norm ``<= 1 / lambda`` for PSD ``X``, ``X_hat``. With relative
    damping ``lambda = lambda_rel lambda_1``, a relative error ``e`` becomes an inverse error
    of order ``e / (lambda_rel^2 lambda_1)`` (see the algorithm reference,
    docs/algorithms.md, section 'Spectrum decay and error bounds'). Computed as
    ``(error / lambda) / lambda``, which stays exact where ``lambda^2`` would underflow.

    Examples
    --------
    >>> import lowrank_nla as ln
    >>> ln.inverse_perturbation_bound(0.5, 0.5)
    2.0
    """
    error = check_real(error, "error", minimum=0.0)
    damping = check_real(damping, "damping", minimum=0.0, strict=True)
    bound = error / damping / damping
    if not math.isfinite(bound):
        raise ValueError(
            f"the bound error / damping^2 overflows float64 (error = {error:g}, damping = "
            f"{damping:g})"
        )
    return bound
