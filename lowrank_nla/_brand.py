"""Brand online updates: the exponential-average update of a ``LowRankPSD`` (B-KFAC), the
general thin-SVD update ``M + A B^T``, and the Rayleigh-Ritz refresh on a column subset
(BC-KFAC). All cost time linear in the dimension ``D``.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

from array_api_compat import device

from ._backend import (
    as_operator,
    check_finite,
    eigh_descending,
    eps,
    namespace,
    to_numpy,
)
from ._lowrank import LowRankPSD, check_state
from ._sketch import qr_factor
from ._svd import SVDResult
from ._validation import check_decay, check_int

__all__ = ["BrandUpdate", "brand_update", "rayleigh_ritz_refresh", "svd_update"]

Array = Any


class BrandUpdate(NamedTuple):
    """Result of :func:`brand_update`.

    Attributes
    ----------
    state : LowRankPSD
        The updated (and truncated) representation.
    dropped_max : array, shape ()
        Largest eigenvalue discarded by the truncation (0 if none was).
    dropped_sum : array, shape ()
        Sum of the discarded eigenvalues (0 if none was).
    """

    state: LowRankPSD
    dropped_max: Any
    dropped_sum: Any


def orthogonality_threshold(xp: Any, dtype: Any) -> float:
    """Default re-orthonormalization threshold ``10 sqrt(eps)`` on ``||U^T U - I||_F``.

    About 3.5e-3 in float32 and 1.5e-7 in float64: far above the defect one update adds
    (a few ``eps``), far below where the representation stops being an eigendecomposition.
    """
    return 10.0 * math.sqrt(eps(xp, dtype))


def _project_out(U: Array, X: Array) -> tuple[Array, Array]:
    """``C = U^T X`` and ``E = X - U C``, projected twice for orthogonality in floating point."""
    C = U.T @ X
    E = X - U @ C
    C2 = U.T @ E
    return C + C2, E - U @ C2


def _reorthonormalize(xp: Any, U: Array, d: Array) -> tuple[Array, Array]:
    """Exact re-diagonalization of ``U diag(d) U^T`` when ``U`` drifted from orthonormal.

    ``U = Q R`` (Householder), ``R diag(d) R^T = W diag(w) W^T``, new state ``(Q W, w)``.
    """
    Q, R = xp.linalg.qr(U)
    core = (R * d) @ R.T
    w, W = eigh_descending(xp, (core + core.T) / 2, name="re-orthonormalization core")
    return Q @ W, xp.clip(w, min=0.0)


def _truncate(xp: Any, U: Array, w: Array, rank: int | None) -> BrandUpdate:
    zero = xp.zeros((), dtype=w.dtype, device=device(w))
    if rank is None or rank >= w.shape[0]:
        return BrandUpdate(LowRankPSD(U, w), zero, zero)
    dropped = w[rank:]
    return BrandUpdate(LowRankPSD(U[:, :rank], w[:rank]), xp.max(dropped), xp.sum(dropped))


def brand_update(
    state: LowRankPSD,
    X: Any,
    *,
    decay: float,
    rank: int | None = None,
    reorth_tol: float | None = None,
) -> BrandUpdate:
    """Exponential-average update ``decay U diag(d) U^T + (1 - decay) X X^T`` of a low-rank PSD.

    Parameters
    ----------
    state : LowRankPSD
        Current representation ``(U, d)``, ``U`` of shape (D, k). A rank-0 state (``k = 0``)
        represents the zero matrix.
    X : array, shape (D, n)
        The new block (for K-FAC: the ``n`` scaled layer inputs or output gradients, so that
        ``X X^T`` is the instantaneous factor).
    decay : float
        ``rho`` in ``[0, 1)``.
    rank : int, optional
        Keep the ``rank`` largest eigenpairs of the result (``None``: keep all ``k + n``).
    reorth_tol : float, optional
        Re-orthonormalize when ``||U^T U - I||_F`` of the result exceeds this
        (default ``10 sqrt(eps)`` of the dtype).

    Returns
    -------
    BrandUpdate
        ``(state, dropped_max, dropped_sum)``: the new representation (eigenvalues descending,
        non-negative) and the largest and total discarded eigenvalue.

    Raises
    ------
    ValueError
        Shape mismatch, ``decay`` outside ``[0, 1)``, ``rank < 1``, NaN/Inf.
    TypeError
        Mixed array libraries or dtypes.

    Notes
    -----
    Symmetric Brand update (Brand 2006; B-KFAC, ALGORITHMS.md 6.3). With
    ``X' = sqrt(1 - rho) X`` and ``d' = rho d``: ``C = U^T X'``, ``E = X' - U C`` (projected
    twice), ``E = Q_E R_E`` (thin QR: CholeskyQR2, Householder when ``E`` is too
    ill-conditioned for it), and

    .. math::

        \\rho U D U^T + (1-\\rho) X X^T = [U\\ Q_E]
        \\begin{bmatrix} D' + C C^T & C R_E^T \\\\ R_E C^T & R_E R_E^T \\end{bmatrix}
        [U\\ Q_E]^T .

    The small ``(k + n)`` core is symmetrized and diagonalized, ``[U Q_E]`` rotated by its
    eigenvectors, negative rounding-level eigenvalues clipped to 0. Before truncation the
    result equals the dense exponential average to rounding. When ``k + n > D`` or the
    update made ``U`` drift, the result is re-orthonormalized exactly (QR of ``U``, then a
    small ``eigh``). Cost ``O(D (k + n)^2 + (k + n)^3)``: linear in ``D``.

    References
    ----------
    M. Brand, "Fast low-rank modifications of the thin singular value decomposition",
    Linear Algebra Appl. 415(1), 2006; C. O. Puiu, "Brand New K-FACs: speeding up K-FAC with
    online decomposition updates", arXiv:2210.08494, 2022.

    Examples
    --------
    >>> import numpy as np
    >>> import lowrank_nla as ln
    >>> rng = np.random.default_rng(0)
    >>> state = ln.LowRankPSD(np.zeros((50, 0)), np.zeros(0))
    >>> dense = np.zeros((50, 50))
    >>> for _ in range(3):
    ...     X = rng.standard_normal((50, 4))
    ...     state = ln.brand_update(state, X, decay=0.9).state
    ...     dense = 0.9 * dense + 0.1 * X @ X.T
    >>> bool(np.allclose(state.to_dense(), dense))
    True
    """
    xp, (U, d) = check_state(state)
    decay = check_decay(decay)
    namespace(U, X, names=("state.U", "X"))
    if X.ndim != 2 or X.shape[0] != U.shape[0]:
        raise ValueError(f"`X` must have shape ({U.shape[0]}, n) to match `state`, got {X.shape}")
    if X.dtype != U.dtype:
        raise TypeError(f"`X` must have the dtype of `state` ({U.dtype}), got {X.dtype}")
    check_finite(xp, X, "X")
    if rank is not None:
        rank = check_int(rank, "rank", minimum=1)
    tol = orthogonality_threshold(xp, U.dtype) if reorth_tol is None else float(reorth_tol)

    Xs = math.sqrt(1.0 - decay) * X
    C, E = _project_out(U, Xs)
    Q_E, R_E = qr_factor(xp, E, "cholqr2")  # GEMM-speed; Householder if E is ill-conditioned
    top = xp.concat([decay * _diag(xp, d) + C @ C.T, C @ R_E.T], axis=1)
    bottom = xp.concat([R_E @ C.T, R_E @ R_E.T], axis=1)
    K = xp.concat([top, bottom], axis=0)
    w, V = eigh_descending(xp, (K + K.T) / 2, name="Brand core")
    w = xp.clip(w, min=0.0)
    U_new = xp.concat([U, Q_E], axis=1) @ V
    if U_new.shape[1] > U_new.shape[0]:
        # [U, Q_E] cannot be orthonormal: re-diagonalize before choosing what to truncate
        U_new, w = _reorthonormalize(xp, U_new, w)
    out = _truncate(xp, U_new, w, rank)
    if out.state.orthogonality_defect() > tol:  # checked on the kept columns only
        U_kept, w_kept = _reorthonormalize(xp, *out.state)
        out = BrandUpdate(LowRankPSD(U_kept, w_kept), out.dropped_max, out.dropped_sum)
    return out


def _diag(xp: Any, d: Array) -> Array:
    k = d.shape[0]
    return xp.eye(k, dtype=d.dtype, device=device(d)) * d


def svd_update(U: Any, S: Any, Vh: Any, A: Any, B: Any, rank: int | None = None) -> SVDResult:
    """Thin SVD of ``U diag(S) Vh + A B^T`` from the thin SVD of the first term (Brand 2006).

    Parameters
    ----------
    U : array, shape (m, k)
        Orthonormal columns.
    S : array, shape (k,)
        Singular values.
    Vh : array, shape (k, n)
        Orthonormal rows.
    A : array, shape (m, c)
        Left factor of the update.
    B : array, shape (n, c)
        Right factor of the update.
    rank : int, optional
        Keep the ``rank`` largest singular triplets (``None``: all ``k + c``).

    Returns
    -------
    SVDResult
        ``(U', S', Vh')``, singular values descending, in the inputs' library and device.

    Raises
    ------
    ValueError
        Inconsistent shapes, ``rank < 1``, NaN/Inf.
    TypeError
        Mixed array libraries.

    Notes
    -----
    ``A = U C_A + Q_A R_A`` and ``B = V C_B + Q_B R_B`` (projections done twice, thin QRs),
    then

    .. math::

        U S V^T + A B^T = [U\\ Q_A]\\Big(\\begin{bmatrix} S & 0\\\\ 0 & 0\\end{bmatrix}
        + \\begin{bmatrix} C_A\\\\ R_A\\end{bmatrix}
        \\begin{bmatrix} C_B\\\\ R_B\\end{bmatrix}^T\\Big)[V\\ Q_B]^T,

    and the SVD of the ``(k + c)`` core rotates both bases. Cost
    ``O((m + n)(k + c)^2 + (k + c)^3)``. Exact before truncation when ``k + c <= min(m, n)``.

    References
    ----------
    M. Brand, "Fast low-rank modifications of the thin singular value decomposition",
    Linear Algebra Appl. 415(1), 2006.

    Examples
    --------
    >>> import numpy as np
    >>> import lowrank_nla as ln
    >>> rng = np.random.default_rng(0)
    >>> M = rng.standard_normal((30, 3)) @ rng.standard_normal((3, 20))
    >>> U, S, Vh = np.linalg.svd(M, full_matrices=False)
    >>> A, B = rng.standard_normal((30, 2)), rng.standard_normal((20, 2))
    >>> U2, S2, Vh2 = ln.svd_update(U[:, :3], S[:3], Vh[:3], A, B)
    >>> bool(np.allclose((U2 * S2) @ Vh2, M + A @ B.T))
    True
    """
    xp = namespace(U, S, Vh, A, B, names=("U", "S", "Vh", "A", "B"))
    m, k = U.shape
    if S.shape != (k,) or Vh.ndim != 2 or Vh.shape[0] != k:
        raise ValueError(
            f"`U`, `S`, `Vh` must have shapes (m, k), (k,), (k, n); got {U.shape}, {S.shape}, "
            f"{Vh.shape}"
        )
    n = Vh.shape[1]
    if (
        A.ndim != 2
        or B.ndim != 2
        or A.shape[0] != m
        or B.shape[0] != n
        or A.shape[1] != B.shape[1]
    ):
        raise ValueError(
            f"`A` and `B` must have shapes ({m}, c) and ({n}, c), got {A.shape} and {B.shape}"
        )
    for arr, nm in ((U, "U"), (S, "S"), (Vh, "Vh"), (A, "A"), (B, "B")):
        check_finite(xp, arr, nm)
    if rank is not None:
        rank = check_int(rank, "rank", minimum=1)
    V = Vh.T
    C_A, E_A = _project_out(U, A)
    C_B, E_B = _project_out(V, B)
    Q_A, R_A = qr_factor(xp, E_A, "cholqr2")
    Q_B, R_B = qr_factor(xp, E_B, "cholqr2")
    c = A.shape[1]
    Sk = xp.concat(
        [
            xp.concat([_diag(xp, S), xp.zeros((k, c), dtype=S.dtype, device=device(S))], axis=1),
            xp.zeros((c, k + c), dtype=S.dtype, device=device(S)),
        ],
        axis=0,
    )
    core = Sk + xp.concat([C_A, R_A], axis=0) @ xp.concat([C_B, R_B], axis=0).T
    Uk, Sc, Vkh = xp.linalg.svd(core, full_matrices=False)
    U_new = xp.concat([U, Q_A], axis=1) @ Uk
    V_new = xp.concat([V, Q_B], axis=1) @ Vkh.T
    keep = Sc.shape[0] if rank is None else min(rank, Sc.shape[0])
    return SVDResult(U_new[:, :keep], Sc[:keep], V_new[:, :keep].T)


def rayleigh_ritz_refresh(state: LowRankPSD, dense: Any, columns: Any) -> LowRankPSD:
    """Partial Rayleigh-Ritz correction of ``state`` on a subset of its columns (BC-KFAC).

    Parameters
    ----------
    state : LowRankPSD
        Representation ``(U, d)`` to correct.
    dense : array or symmetric linear operator, shape (D, D)
        The exact matrix (for BC-KFAC the dense exponential-average factor).
    columns : sequence of int or integer array
        Distinct column indices ``S`` of ``U`` (``1 <= len(S) <= k``).

    Returns
    -------
    LowRankPSD
        ``U[:, S]`` rotated to the Ritz vectors of ``dense`` in its span and ``d[S]`` replaced
        by the Ritz values (clipped at 0); eigenpairs re-sorted descending.

    Raises
    ------
    ValueError
        Out-of-range or repeated columns, shape mismatch, NaN/Inf.
    TypeError
        Mixed array libraries.

    Notes
    -----
    ``H = U_S^T X U_S`` (``s x s``), ``H = W diag(w) W^T``, ``U_S <- U_S W``, ``d_S <- w``
    (ALGORITHMS.md 7.2). Because ``U_S W`` spans the same space as ``U_S``, the other columns
    stay orthogonal to it. Cost ``O(D^2 s + D s^2 + s^3)`` for a dense ``X``.

    Examples
    --------
    >>> import numpy as np
    >>> import lowrank_nla as ln
    >>> X = np.diag([5.0, 4.0, 3.0, 2.0])
    >>> stale = ln.LowRankPSD(np.eye(4)[:, :2], np.array([1.0, 1.0]))
    >>> ln.rayleigh_ritz_refresh(stale, X, [0, 1]).d.tolist()
    [5.0, 4.0]
    """
    xp, (U, d) = check_state(state)
    op = as_operator(dense, "dense", symmetric=True)
    if op.shape != (U.shape[0], U.shape[0]):
        raise ValueError(
            f"`dense` must have shape ({U.shape[0]}, {U.shape[0]}) to match `state`, got "
            f"{op.shape}"
        )
    if op.array is not None:
        namespace(U, op.array, names=("state.U", "dense"))
    idx = (
        [int(i) for i in to_numpy(columns).ravel()]
        if not isinstance(columns, list | tuple | range)
        else [int(i) for i in columns]
    )
    k = U.shape[1]
    if not idx or len(set(idx)) != len(idx) or min(idx) < 0 or max(idx) >= k:
        raise ValueError(
            f"`columns` must be distinct indices in [0, {k}) (at least one), got {idx}"
        )
    chosen = xp.asarray(idx, device=device(U))
    rest = xp.asarray(
        [i for i in range(k) if i not in set(idx)], dtype=chosen.dtype, device=device(U)
    )
    U_S = xp.take(U, chosen, axis=1)
    H = U_S.T @ op.checked_matmat(U_S, "dense")
    w, W = eigh_descending(xp, (H + H.T) / 2, name="Rayleigh-Ritz matrix")
    U_all = xp.concat([xp.take(U, rest, axis=1), U_S @ W], axis=1)
    d_all = xp.concat([xp.take(d, rest), xp.clip(w, min=0.0)])
    order = xp.argsort(d_all, descending=True, stable=True)
    return LowRankPSD(xp.take(U_all, order, axis=1), xp.take(d_all, order))
