"""Damped inverse application without forming matrices: low rank + tail + damping, Kronecker
products of two factors (K-FAC), and Woodbury solves through the small ``n x n`` system.

Layout: a factor ``X`` of dimension ``D`` is a :class:`LowRankPSD` ``(U, d)`` (a full dense
eigendecomposition is the case ``k = D``). A layer's gradient matrix ``V`` is ``d_G x d_A``
(output x input, bias last; see the algorithm reference, docs/algorithms.md, section
'The K-FAC core'); the K-FAC direction is ``(G + l_G I)^-1 V (A + l_A I)^-1``.
"""

from __future__ import annotations

import math
from typing import Any

import array_api_compat

from ._backend import (
    all_finite,
    check_factor,
    check_finite,
    cholesky_lower,
    eps,
    floating_dtype,
    fp_guarded,
    namespace,
    overflow_error,
    solve_triangular,
)
from ._kernels import DampedInverse, KronEigenbasisInverse, inverse_coefficients
from ._lowrank import LowRankPSD, check_state
from ._validation import check_bool, check_pair, check_real

__all__ = [
    "damped_inverse_apply",
    "kron_inverse_apply",
    "kron_inverse_apply_factored",
    "smw_coefficients",
    "woodbury_solve",
]

Array = Any


def _operand(xp: Any, X: Array, name: str, dtype: Any) -> Array:
    """``X`` in the factors' ``dtype`` (integers promoted to the default float first), checked
    finite; another floating dtype raises ``TypeError``."""
    own = floating_dtype(xp, X, name, device=array_api_compat.device(X))
    if own != dtype:
        raise TypeError(f"`{name}` must have the dtype of the factors ({dtype}), got {X.dtype}")
    X = X if X.dtype == own else xp.astype(X, own)
    check_finite(xp, X, name)
    return X


def _checked_result(xp: Any, out: Array, subject: str) -> Array:
    if not all_finite(xp, out):
        raise overflow_error(subject, "damped inverse applied to it", out.dtype)
    return out


def _apply(U: Array, coeff: Array, outside: float, V: Array, side: str) -> Array:
    return DampedInverse(U, coeff, outside).apply(V, side)


@fp_guarded
def damped_inverse_apply(
    state: LowRankPSD, V: Any, *, damping: float, tail: float = 0.0, side: str = "left"
) -> Array:
    """Apply ``(U diag(d) U^T + tail (I - U U^T) + damping I)^-1`` to ``V`` in ``O(D k m)``.

    Parameters
    ----------
    state : LowRankPSD
        ``(U, d)`` with ``U`` (D x k) orthonormal.
    V : array, shape (D,) or (D, m) for ``side="left"``, (m, D) for ``side="right"``
        Right-hand sides, same library and dtype as ``state`` (integer arrays are promoted
        to the default float first).
    damping : float
        ``lambda > 0``.
    tail : float, default 0
        Eigenvalue assigned to the complement of ``range(U)``: ``0`` is the plain Woodbury
        form, ``min(d)`` the spectrum continuation (see the algorithm reference,
        docs/algorithms.md, section 'Low-rank inverse application').
    side : {"left", "right"}, default "left"
        ``X^-1 V`` or ``V X^-1``; neither transposes a copy of ``V``.

    Returns
    -------
    array
        Same shape, library, device and dtype as ``V``.

    Raises
    ------
    ValueError
        Shape mismatch, ``damping <= 0``, ``tail < 0``, unknown ``side``, NaN/Inf, a
        ``damping`` whose inverse (or a result) overflows the dtype.
    TypeError
        Mixed array libraries or dtypes.

    Notes
    -----
    With ``U`` orthonormal (an invariant of :class:`LowRankPSD`, like ``d >= 0``, which
    keeps every denominator positive), ``X = U (D + l) U^T + (t + l)(I - U U^T)`` and

    .. math::

        X^{-1} = U\\,\\mathrm{diag}\\big(\\tfrac{1}{d+\\lambda}
        - \\tfrac{1}{t+\\lambda}\\big)U^T + \\tfrac{1}{t+\\lambda} I ,

    applied as ``U (c * (U^T V)) + V / (t + l)``: two thin products, no ``D x D`` matrix.

    Examples
    --------
    >>> import numpy as np
    >>> import lowrank_nla as ln
    >>> s = ln.LowRankPSD(np.eye(3)[:, :1], np.array([3.0]))
    >>> ln.damped_inverse_apply(s, np.ones(3), damping=1.0).tolist()
    [0.25, 1.0, 1.0]
    """
    xp, (U, d) = check_state(state)
    damping = check_real(damping, "damping", minimum=0.0, strict=True)
    tail = check_real(tail, "tail", minimum=0.0)
    if side not in ("left", "right"):
        raise ValueError(f"`side` must be 'left' or 'right', got {side!r}")
    namespace(U, V, names=("state.U", "V"))
    D = U.shape[0]
    ok = (
        (V.ndim in (1, 2) and V.shape[0] == D)
        if side == "left"
        else (V.ndim == 2 and V.shape[1] == D)
    )
    if not ok:
        want = f"({D},) or ({D}, m)" if side == "left" else f"(m, {D})"
        raise ValueError(f"`V` must have shape {want} for side={side!r}, got {V.shape}")
    own = floating_dtype(xp, V, "V", device=array_api_compat.device(V))
    if own != U.dtype:
        raise TypeError(f"`V` must have the dtype of `state` ({U.dtype}), got {V.dtype}")
    V = V if V.dtype == own else xp.astype(V, own)
    check_finite(xp, V, "V")
    coeff, outside = inverse_coefficients(xp, d, damping, tail)
    return _checked_result(xp, _apply(U, coeff, outside, V, side), "`V`")


def _check_factored_options(
    damping: float, relative: bool, pi_adjusted: bool, shift: tuple[float, float], factored: bool
) -> tuple[float, tuple[float, float]]:
    """Validated ``damping`` and ``shift`` of :func:`kron_inverse_apply` and its factored form."""
    damping = check_real(damping, "damping", minimum=0.0, strict=True)
    relative = check_bool(relative, "relative")
    pi_adjusted = check_bool(pi_adjusted, "pi_adjusted")
    if pi_adjusted and (relative or not factored):
        raise ValueError("`pi_adjusted` applies to absolute factored damping only")
    return damping, check_pair(shift, "shift", ("shift_G", "shift_A"))


def _factored_inverses(
    G: LowRankPSD,
    A: LowRankPSD,
    damping: float,
    relative: bool,
    pi_adjusted: bool,
    shift: tuple[float, float],
    tails: tuple[float, float],
) -> tuple[tuple[Array, float], tuple[Array, float]]:
    """Inverse coefficients (:func:`_inverse_coefficients`) of both factors under the factored
    scheme, with per-factor damping ``l_X + shift_X``."""
    xp = namespace(G.d)
    if relative:
        lam_g = damping * (float(xp.max(G.d)) if G.rank else 0.0)
        lam_a = damping * (float(xp.max(A.d)) if A.rank else 0.0)
        for name, lam, s in (("G", lam_g, shift[0]), ("A", lam_a, shift[1])):
            if lam + s == 0.0:
                raise ValueError(
                    f"relative damping of `{name}` is zero: `{name}` is the zero matrix "
                    f"(max({name}.d) = 0 or rank 0) and its shift is 0, so "
                    f"`{name}` + 0 I has no inverse; use absolute damping or a positive shift"
                )
    elif pi_adjusted:
        # Martens & Grosse (2015), 6.3: pi = sqrt((tr A / d_A) / (tr G / d_G)).
        mean_g = float(xp.sum(G.d)) / G.dim
        mean_a = float(xp.sum(A.d)) / A.dim
        pi = math.sqrt(mean_a / mean_g) if mean_g > 0 and mean_a > 0 else 1.0
        lam_g, lam_a = math.sqrt(damping) / pi, math.sqrt(damping) * pi
    else:
        lam_g = lam_a = math.sqrt(damping)
    return (
        inverse_coefficients(xp, G.d, lam_g + shift[0], tails[0]),
        inverse_coefficients(xp, A.d, lam_a + shift[1], tails[1]),
    )


def _check_pair(G: Any, A: Any) -> Any:
    xp, _ = check_state(G, "G")
    check_state(A, "A")
    namespace(G.U, A.U, names=("G.U", "A.U"))
    if G.U.dtype != A.U.dtype:
        raise TypeError(f"`G` and `A` must share a dtype, got {G.U.dtype} and {A.U.dtype}")
    return xp


def _tails(G: LowRankPSD, A: LowRankPSD, continuation: bool) -> tuple[float, float]:
    """Complement eigenvalues: ``min(d)`` of a truncated factor with continuation, else 0."""
    xp = namespace(G.d)

    def tail(X: LowRankPSD) -> float:
        if not continuation or X.rank == 0 or X.rank >= X.dim:
            return 0.0
        return float(xp.min(X.d))

    return tail(G), tail(A)


@fp_guarded
def kron_inverse_apply(
    G: LowRankPSD,
    A: LowRankPSD,
    V: Any,
    *,
    damping: float,
    scheme: str = "factored",
    relative: bool = False,
    pi_adjusted: bool = False,
    continuation: bool = False,
    shift: tuple[float, float] = (0.0, 0.0),
) -> Array:
    """K-FAC preconditioned gradient ``(G (x) A + damping)^-1`` applied to a ``d_G x d_A`` ``V``.

    Parameters
    ----------
    G, A : LowRankPSD
        Output-gradient factor (``d_G``) and input factor (``d_A``): a full eigendecomposition
        (``k = D``) or a low-rank representation.
    V : array, shape (d_G, d_A)
        The layer's gradient matrix (integer arrays are promoted to the default float).
    damping : float
        ``lambda > 0``; its meaning depends on ``scheme`` and ``relative``.
    scheme : {"factored", "eigenbasis"}, default "factored"
        ``"factored"``: ``(G + l_G I)^-1 V (A + l_A I)^-1`` (Tikhonov damping split between
        the factors). ``"eigenbasis"``: exact damping of the Kronecker product in its
        eigenbasis, ``Q_G [(Q_G^T V Q_A) / (d_G d_A^T + l)] Q_A^T``.
    relative : bool, default False
        Scale the damping by the top eigenvalues: ``l_X = damping max(d_X)`` per factor
        (factored; the thesis' "adaptive" damping) or ``l = damping max(d_G) max(d_A)``
        (eigenbasis; baseline K-FAC of the thesis).
    pi_adjusted : bool, default False
        Factored, absolute damping only: ``l_G = sqrt(damping) / pi``,
        ``l_A = sqrt(damping) pi`` with ``pi = sqrt((tr A / d_A) / (tr G / d_G))``
        (Martens & Grosse 2015, section 6.3); otherwise both are ``sqrt(damping)``.
    continuation : bool, default False
        Model the discarded spectrum of a truncated factor as flat at its smallest retained
        eigenvalue instead of zero (see the algorithm reference, docs/algorithms.md,
        section 'Low-rank inverse application').
    shift : (float, float), default (0, 0)
        Identity weights added to ``(G, A)``: the ``rho^m`` of the identity initialisation
        (docs/algorithms.md, section 'The K-FAC core'), so ``G + shift_G I`` and
        ``A + shift_A I`` are inverted.

    Returns
    -------
    array, shape (d_G, d_A)
        The preconditioned matrix, in ``V``'s library, device and dtype.

    Raises
    ------
    ValueError
        Shape mismatch, non-positive damping, negative shift, unknown scheme, ``pi_adjusted``
        with ``relative`` or with the eigenbasis scheme, relative damping of a zero factor
        without a shift (no inverse exists), NaN/Inf, a result that overflows the dtype.
    TypeError
        Mixed array libraries or dtypes, non-bool flags, a ``shift`` that is not a pair.

    Notes
    -----
    Factored: :func:`damped_inverse_apply` from the left with ``G`` and from the right with
    ``A``, ``O((k_G d_A + k_A d_G) d)`` work. Eigenbasis: with ``U`` orthonormal and ``t``
    the complement eigenvalue of each factor, ``V`` splits into the four blocks
    ``P_G V P_A``, ``P_G V P_A^perp``, ``P_G^perp V P_A``, ``P_G^perp V P_A^perp``, on which
    ``G (x) A + l`` acts as ``d_G d_A^T + l``, ``d_G t_A + l``, ``t_G d_A^T + l`` and
    ``t_G t_A + l``: exact for any ranks, and the textbook formula when both factors are
    full eigendecompositions.

    References
    ----------
    J. Martens, R. Grosse, "Optimizing neural networks with Kronecker-factored approximate
    curvature", ICML 2015; T. George et al., "Fast approximate natural gradient descent in a
    Kronecker-factored eigenbasis", NeurIPS 2018.

    Examples
    --------
    >>> import numpy as np
    >>> import lowrank_nla as ln
    >>> G = ln.LowRankPSD(np.eye(2), np.array([3.0, 1.0]))
    >>> A = ln.LowRankPSD(np.eye(3), np.array([1.0, 1.0, 1.0]))
    >>> ln.kron_inverse_apply(G, A, np.ones((2, 3)), damping=1.0, scheme="eigenbasis")[:, 0]
    array([0.25, 0.5 ])
    """
    xp = _check_pair(G, A)
    if scheme not in ("factored", "eigenbasis"):
        raise ValueError(f"`scheme` must be 'factored' or 'eigenbasis', got {scheme!r}")
    damping, (s_g, s_a) = _check_factored_options(
        damping, relative, pi_adjusted, shift, scheme == "factored"
    )
    namespace(G.U, V, names=("G.U", "V"))
    if V.ndim != 2 or V.shape != (G.dim, A.dim):
        raise ValueError(f"`V` must have shape ({G.dim}, {A.dim}) = (d_G, d_A), got {V.shape}")
    V = _operand(xp, V, "V", G.U.dtype)
    t_g, t_a = _tails(G, A, check_bool(continuation, "continuation"))
    if scheme == "factored":
        (c_g, o_g), (c_a, o_a) = _factored_inverses(
            G, A, damping, relative, pi_adjusted, (s_g, s_a), (t_g, t_a)
        )
        out = _apply(A.U, c_a, o_a, _apply(G.U, c_g, o_g, V, "left"), "right")
        return _checked_result(xp, out, "`V`")

    lam = damping
    if relative:
        lam *= (float(xp.max(G.d)) if G.rank else 0.0) * (float(xp.max(A.d)) if A.rank else 0.0)
        if lam == 0.0:
            raise ValueError("relative eigenbasis damping is zero: both factors must be nonzero")
    inverse = KronEigenbasisInverse(G.U, G.d + s_g, t_g + s_g, A.U, A.d + s_a, t_a + s_a, lam)
    return _checked_result(xp, inverse.apply(V), "`V`")


@fp_guarded
def kron_inverse_apply_factored(
    G: LowRankPSD,
    A: LowRankPSD,
    grad_outputs: Any,
    inputs: Any,
    *,
    damping: float,
    relative: bool = False,
    pi_adjusted: bool = False,
    continuation: bool = False,
    shift: tuple[float, float] = (0.0, 0.0),
) -> Array:
    """Factored K-FAC direction of a Linear layer from its per-sample factors, without
    preconditioning its gradient matrix.

    Parameters
    ----------
    G, A : LowRankPSD
        Factor representations (``d_G``, ``d_A``).
    grad_outputs : array, shape (d_G, n)
        Gradients of the batch loss with respect to the layer outputs, one column per
        sample (or position).
    inputs : array, shape (d_A, n)
        The (bias-augmented) layer inputs, same columns.
    damping, relative, pi_adjusted, continuation, shift
        The factored damping of :func:`kron_inverse_apply` (``scheme="factored"``), with the
        same meaning and defaults.

    Returns
    -------
    array, shape (d_G, d_A)
        ``(I_G grad_outputs)(I_A inputs)^T`` with ``I_X = (X + t_X (I - UU^T) + l_X I)^-1``,
        which equals ``kron_inverse_apply(G, A, grad_outputs @ inputs.T, ...)``.

    Raises
    ------
    ValueError
        Shape mismatch, non-positive damping, negative shift, ``pi_adjusted`` with
        ``relative``, relative damping of a zero factor without a shift, NaN/Inf, a result
        that overflows the dtype.
    TypeError
        Mixed array libraries or dtypes, non-bool flags, a ``shift`` that is not a pair.

    Notes
    -----
    The gradient of a Linear layer is ``V = grad_outputs inputs^T`` (the K-FAC papers write
    it ``Gamma A^T / n`` with ``Gamma = n grad_outputs``; see the algorithm reference,
    docs/algorithms.md, section 'The K-FAC core'), so
    ``I_G V I_A = (I_G grad_outputs)(I_A inputs)^T``. Preconditioning the two thin blocks
    costs ``O((d_G k_G + d_A k_A) n)``, linear in the layer width, instead of the
    ``O(d_G d_A (k_G + k_A))`` of applying the factors to ``V``; only the final outer product
    is ``O(d_G d_A n)``, the cost of forming the gradient itself.

    Examples
    --------
    >>> import numpy as np
    >>> import lowrank_nla as ln
    >>> G = ln.LowRankPSD(np.eye(2)[:, :1], np.array([3.0]))
    >>> A = ln.LowRankPSD(np.eye(3)[:, :1], np.array([3.0]))
    >>> out = ln.kron_inverse_apply_factored(
    ...     G, A, np.ones((2, 4)), np.ones((3, 4)), damping=1.0)
    >>> out[0].tolist()
    [0.25, 1.0, 1.0]
    """
    xp = _check_pair(G, A)
    damping, shifts = _check_factored_options(damping, relative, pi_adjusted, shift, True)
    namespace(G.U, grad_outputs, inputs, names=("G.U", "grad_outputs", "inputs"))
    if (
        grad_outputs.ndim != 2
        or inputs.ndim != 2
        or grad_outputs.shape[1] != inputs.shape[1]
        or grad_outputs.shape[0] != G.dim
        or inputs.shape[0] != A.dim
    ):
        raise ValueError(
            f"`grad_outputs` must be ({G.dim}, n) = (d_G, n) and `inputs` ({A.dim}, n) = "
            f"(d_A, n) with the same n, got {grad_outputs.shape} and {inputs.shape}"
        )
    grad_outputs = _operand(xp, grad_outputs, "grad_outputs", G.U.dtype)
    inputs = _operand(xp, inputs, "inputs", G.U.dtype)
    tails = _tails(G, A, check_bool(continuation, "continuation"))
    (c_g, o_g), (c_a, o_a) = _factored_inverses(
        G, A, damping, relative, pi_adjusted, shifts, tails
    )
    left = _apply(G.U, c_g, o_g, grad_outputs, "left")
    right = _apply(A.U, c_a, o_a, inputs, "left")
    return _checked_result(xp, left @ right.T, "`grad_outputs` and `inputs`")


def _work_dtype(xp: Any, dtype: Any, device: Any) -> Any:
    """float64 for the small systems when the device has it (float32 input stays float32 out)."""
    info = xp.__array_namespace_info__()
    return xp.float64 if "float64" in info.dtypes(device=device) else dtype


def _spd_solve(xp: Any, K: Array, B: Array, what: str, subject: str) -> Array:
    check_factor(xp, K, subject, what)
    L = cholesky_lower(xp, (K + K.T) / 2)
    if L is None:
        raise ValueError(f"the {what} is not positive definite (damping too small for its dtype)")
    return solve_triangular(xp, L.T, solve_triangular(xp, L, B, lower=True), lower=False)


@fp_guarded
def woodbury_solve(J: Any, v: Any, damping: float) -> Array:
    """``(damping I + J^T J)^-1 v`` through the small ``n x n`` system (SENG, FNGD, MBF).

    Parameters
    ----------
    J : array, shape (n, P)
        ``n`` rows (e.g. per-sample gradients scaled by ``1/sqrt(n)``), ``n`` small.
        Integer arrays are promoted to the default float.
    v : array, shape (P,) or (P, m)
        Right-hand side(s), same dtype as ``J`` after that promotion.
    damping : float
        ``lambda > 0``.

    Returns
    -------
    array
        Same shape, library and device as ``v``, in the (promoted) floating dtype.

    Raises
    ------
    ValueError
        Shape mismatch, ``damping <= 0``, NaN/Inf, a capacitance matrix or result that
        overflows the dtype.
    TypeError
        Mixed array libraries or dtypes, unsupported dtypes.

    Notes
    -----
    Sherman-Morrison-Woodbury:
    ``(l I + J^T J)^-1 v = (v - J^T (l I_n + J J^T)^-1 J v) / l``. The capacitance matrix
    ``l I_n + J J^T`` is factored by Cholesky in float64 when the device supports it (it is
    only ``n x n``), so float32 input does not lose the small eigen-directions to rounding
    of the factorization. Cost ``O(n^2 P + n^3)`` instead of ``O(P^3)``.

    Examples
    --------
    >>> import numpy as np
    >>> import lowrank_nla as ln
    >>> J = np.array([[1.0, 0.0, 0.0]])
    >>> ln.woodbury_solve(J, np.ones(3), 1.0).tolist()
    [0.5, 1.0, 1.0]
    """
    xp = namespace(J, v, names=("J", "v"))
    lam = check_real(damping, "damping", minimum=0.0, strict=True)
    if J.ndim != 2 or v.ndim not in (1, 2) or v.shape[0] != J.shape[1]:
        raise ValueError(
            f"`J` must be (n, P) and `v` (P,) or (P, m) with the same P, got {J.shape} and "
            f"{v.shape}"
        )
    device = array_api_compat.device(J)
    j_dtype = floating_dtype(xp, J, "J", device=device)
    v_dtype = floating_dtype(xp, v, "v", device=array_api_compat.device(v))
    if v_dtype != j_dtype:
        raise TypeError(f"`v` must have the dtype of `J` ({J.dtype}), got {v.dtype}")
    J = J if J.dtype == j_dtype else xp.astype(J, j_dtype)  # integer input is promoted
    v = v if v.dtype == v_dtype else xp.astype(v, v_dtype)
    check_finite(xp, J, "J")
    check_finite(xp, v, "v")
    work = _work_dtype(xp, J.dtype, device)
    n = J.shape[0]
    K = xp.astype(J @ J.T, work) + lam * xp.eye(n, dtype=work, device=device)
    Jv = J @ v
    rhs = Jv[:, None] if v.ndim == 1 else Jv
    z = _spd_solve(xp, K, xp.astype(rhs, work), "capacitance matrix", "`J`")
    z = xp.astype(z, J.dtype)
    correction = J.T @ (z[:, 0] if v.ndim == 1 else z)
    out = (v - correction) / lam
    if not all_finite(xp, out):
        raise overflow_error("`v`", "solution (v - J^T z) / damping", out.dtype)
    return out


@fp_guarded
def smw_coefficients(K: Any, damping: float) -> Array:
    """FNGD's per-sample coefficients ``alpha = (K + n damping I)^-1 1`` from a Gram matrix.

    Parameters
    ----------
    K : array, shape (n, n)
        Gram matrix ``G^T G`` of the per-sample gradients (symmetric PSD; integer arrays
        are promoted to the default float).
    damping : float
        ``lambda > 0``.

    Returns
    -------
    array, shape (n,)
        ``alpha`` in ``K``'s (promoted) floating dtype; the natural-gradient direction is
        ``G alpha`` (Sherman-Morrison-Woodbury form of the damped natural gradient; see the
        algorithm reference, docs/algorithms.md, section 'Low-rank inverse application').

    Raises
    ------
    ValueError
        Non-square or non-symmetric ``K`` (``max|K - K^T| > sqrt(eps) max|K|``),
        ``damping <= 0``, NaN/Inf, a matrix that is not PSD enough for the damping, or
        ``K + n damping I`` overflowing the dtype.
    TypeError
        Unsupported dtypes.

    Notes
    -----
    With ``F = G G^T / n`` and ``g = G 1 / n``: ``(F + l I)^-1 g = G (G^T G + n l I)^-1 1``.
    Solved by Cholesky in float64 when available; cost ``O(n^3)``.

    Examples
    --------
    >>> import numpy as np
    >>> import lowrank_nla as ln
    >>> ln.smw_coefficients(np.eye(2), 1.5).tolist()  # (1 + 2 * 1.5)^-1 = 0.25
    [0.25, 0.25]
    """
    xp = namespace(K, names=("K",))
    lam = check_real(damping, "damping", minimum=0.0, strict=True)
    if K.ndim != 2 or K.shape[0] != K.shape[1]:
        raise ValueError(f"`K` must be a square (n, n) matrix, got shape {K.shape}")
    device = array_api_compat.device(K)
    dtype = floating_dtype(xp, K, "K", device=device)
    K = K if K.dtype == dtype else xp.astype(K, dtype)  # integer input is promoted
    check_finite(xp, K, "K")
    n = K.shape[0]
    if n:
        scale = float(xp.max(xp.abs(K)))
        gap = float(xp.max(xp.abs(K - K.T)))
        if gap > math.sqrt(eps(xp, dtype)) * scale:
            raise ValueError(
                f"`K` must be symmetric: max|K - K^T| = {gap:.3e} exceeds sqrt(eps) * max|K| "
                f"= {math.sqrt(eps(xp, dtype)) * scale:.3e}"
            )
    work = _work_dtype(xp, dtype, device)
    M = xp.astype(K, work) + (n * lam) * xp.eye(n, dtype=work, device=device)
    ones = xp.ones((n, 1), dtype=work, device=device)
    alpha = _spd_solve(xp, M, ones, "matrix K + n damping I", "`K` (with `damping`)")
    return xp.astype(alpha[:, 0], dtype)
