"""Brand online updates: the exponential-average update of a ``LowRankPSD`` (B-KFAC), the
general thin-SVD update ``M + A B^T``, and the Rayleigh-Ritz refresh on a column subset
(BC-KFAC). All cost time linear in the dimension ``D``.
"""

from __future__ import annotations

import math
import numbers
from typing import Any, NamedTuple

import numpy as np
from array_api_compat import device

from ._backend import (
    as_operator,
    check_factor,
    check_finite,
    eigh_descending,
    eps,
    floating_dtype,
    fp_guarded,
    namespace,
    normal_sampler,
    to_numpy,
)
from ._lowrank import LowRankPSD, check_state
from ._sketch import check_symmetric as symmetry_probe
from ._sketch import qr_factor
from ._svd import SVDResult
from ._validation import check_bool, check_decay, check_int, check_real

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
    check_factor(xp, U, _BRAND_SUBJECT, "updated basis")
    Q, R = xp.linalg.qr(U)
    core = (R * d) @ R.T
    w, W = eigh_descending(
        xp, (core + core.T) / 2, name="re-orthonormalization core", subject=_BRAND_SUBJECT
    )
    return Q @ W, xp.clip(w, min=0.0)


_BRAND_SUBJECT = "`X` (with `state`)"


def _truncate(xp: Any, U: Array, w: Array, rank: int | None) -> BrandUpdate:
    # U, w come from an eigendecomposition: the LowRankPSD invariants hold (check=False)
    zero = xp.zeros((), dtype=w.dtype, device=device(w))
    if rank is None or rank >= w.shape[0]:
        return BrandUpdate(LowRankPSD(U, w, check=False), zero, zero)
    dropped = w[rank:]
    return BrandUpdate(
        LowRankPSD(U[:, :rank], w[:rank], check=False), xp.max(dropped), xp.sum(dropped)
    )


@fp_guarded
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
        ``X X^T`` is the instantaneous factor). Integer input is promoted to the default
        float, which must then be the dtype of ``state``.
    decay : float
        ``rho`` in ``[0, 1)``.
    rank : int, optional
        Keep the ``rank`` largest eigenpairs of the result (``None``: keep all ``k + n``).
    reorth_tol : float, optional
        Re-orthonormalize when ``||U^T U - I||_F`` of the result exceeds this; a finite
        number ``>= 0`` (default ``10 sqrt(eps)`` of the dtype; ``0`` re-orthonormalizes
        after every update).

    Returns
    -------
    BrandUpdate
        ``(state, dropped_max, dropped_sum)``: the new representation (eigenvalues descending,
        non-negative) and the largest and total discarded eigenvalue.

    Raises
    ------
    ValueError
        Shape mismatch, ``decay`` outside ``[0, 1)``, ``rank < 1``, ``reorth_tol`` negative
        or not finite, NaN/Inf, an update that overflows the dtype.
    TypeError
        Mixed array libraries or dtypes.

    Notes
    -----
    Symmetric Brand update (Brand 2006; B-KFAC of Puiu, arXiv:2210.08494; see the algorithm
    reference, docs/algorithms.md, section 'Brand online updates'). With
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
    x_dtype = floating_dtype(xp, X, "X", device=device(X))
    if x_dtype != U.dtype:
        raise TypeError(f"`X` must have the dtype of `state` ({U.dtype}), got {X.dtype}")
    X = X if X.dtype == x_dtype else xp.astype(X, x_dtype)
    check_finite(xp, X, "X")
    if rank is not None:
        rank = check_int(rank, "rank", minimum=1)
    tol = (
        orthogonality_threshold(xp, U.dtype)
        if reorth_tol is None
        else check_real(reorth_tol, "reorth_tol", minimum=0.0)
    )

    Xs = math.sqrt(1.0 - decay) * X
    C, E = _project_out(U, Xs)
    # GEMM-speed; Householder if E is ill-conditioned
    Q_E, R_E = qr_factor(xp, E, "cholqr2", _BRAND_SUBJECT)
    top = xp.concat([decay * _diag(xp, d) + C @ C.T, C @ R_E.T], axis=1)
    bottom = xp.concat([R_E @ C.T, R_E @ R_E.T], axis=1)
    K = xp.concat([top, bottom], axis=0)
    w, V = eigh_descending(xp, (K + K.T) / 2, name="Brand core", subject=_BRAND_SUBJECT)
    w = xp.clip(w, min=0.0)
    U_new = xp.concat([U, Q_E], axis=1) @ V
    if U_new.shape[1] > U_new.shape[0]:
        # [U, Q_E] cannot be orthonormal: re-diagonalize before choosing what to truncate
        U_new, w = _reorthonormalize(xp, U_new, w)
    out = _truncate(xp, U_new, w, rank)
    if out.state.orthogonality_defect() > tol:  # checked on the kept columns only
        U_kept, w_kept = _reorthonormalize(xp, *out.state)
        out = BrandUpdate(
            LowRankPSD(U_kept, w_kept, check=False), out.dropped_max, out.dropped_sum
        )
    return out


def _diag(xp: Any, d: Array) -> Array:
    k = d.shape[0]
    return xp.eye(k, dtype=d.dtype, device=device(d)) * d


def _is_orthonormal(xp: Any, P: Array) -> bool:
    """``||P^T P - I||_F <= 10 sqrt(eps)`` (always false for more columns than rows)."""
    if P.shape[1] > P.shape[0]:
        return False
    G = P.T @ P
    eye = xp.eye(G.shape[0], dtype=G.dtype, device=device(G))
    return float(xp.linalg.matrix_norm(G - eye)) <= orthogonality_threshold(xp, P.dtype)


@fp_guarded
def svd_update(U: Any, S: Any, Vh: Any, A: Any, B: Any, rank: int | None = None) -> SVDResult:
    """Thin SVD of ``U diag(S) Vh + A B^T`` from the thin SVD of the first term (Brand 2006).

    Parameters
    ----------
    U : array, shape (m, k)
        Orthonormal columns (a basis that is not orthonormal still gives the exact result,
        through the slower path of the Notes).
    S : array, shape (k,)
        Singular values (any real values: ``U diag(S) Vh`` is what is updated).
    Vh : array, shape (k, n)
        Orthonormal rows.
    A : array, shape (m, c)
        Left factor of the update.
    B : array, shape (n, c)
        Right factor of the update.
    rank : int, optional
        Keep the ``rank`` largest singular triplets (``None``: all
        ``min(k + c, m, n)``).

    Returns
    -------
    SVDResult
        ``(U', S', Vh')`` with orthonormal ``U'`` and ``Vh'`` and singular values
        descending, in the inputs' library, device and dtype (integer inputs are promoted
        to the default float).

    Raises
    ------
    ValueError
        Inconsistent shapes, ``rank < 1``, NaN/Inf, an update that overflows the dtype.
    TypeError
        Mixed array libraries or dtypes, unsupported dtypes.

    Notes
    -----
    ``A = U C_A + Q_A R_A`` and ``B = V C_B + Q_B R_B`` (projections done twice, thin QRs),
    then

    .. math::

        U S V^T + A B^T = [U\\ Q_A]\\Big(\\begin{bmatrix} S & 0\\\\ 0 & 0\\end{bmatrix}
        + \\begin{bmatrix} C_A\\\\ R_A\\end{bmatrix}
        \\begin{bmatrix} C_B\\\\ R_B\\end{bmatrix}^T\\Big)[V\\ Q_B]^T,

    and the SVD of the ``(k + c)`` core rotates both bases. Cost
    ``O((m + n)(k + c)^2 + (k + c)^3)``. The identity holds for any bases, but only
    orthonormal ``[U Q_A]`` and ``[V Q_B]`` make the rotated bases orthonormal and the
    core's singular values those of the sum. They cannot be when ``k + c`` exceeds ``m`` or
    ``n`` (the residual ``Q_A`` then holds rounding noise, not new directions), nor when the
    input bases are not orthonormal; this is checked (``||P^T P - I||_F <= 10 sqrt(eps)``,
    ``O((m + n)(k + c)^2)``), and otherwise both bases are re-orthonormalized exactly,
    ``[U Q_A] = Q_P R_P``, ``[V Q_B] = Q_W R_W``, and the SVD is taken of
    ``R_P core R_W^T``: the result then has ``min(k + c, m, n)`` triplets. Exact before
    truncation (to rounding) in every case.

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
    names = ("U", "S", "Vh", "A", "B")
    xp = namespace(U, S, Vh, A, B, names=names)
    if U.ndim != 2:
        raise ValueError(f"`U` must have shape (m, k), got {U.shape}")
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
    arrays = [U, S, Vh, A, B]
    dtypes = [
        floating_dtype(xp, a, nm, device=device(a)) for a, nm in zip(arrays, names, strict=True)
    ]
    if len(set(dtypes)) != 1:
        got = ", ".join(str(a.dtype) for a in arrays)
        raise TypeError(f"`U`, `S`, `Vh`, `A`, `B` must share a dtype, got {got}")
    U, S, Vh, A, B = (a if a.dtype == dtypes[0] else xp.astype(a, dtypes[0]) for a in arrays)
    for arr, nm in zip((U, S, Vh, A, B), names, strict=True):
        check_finite(xp, arr, nm)
    if rank is not None:
        rank = check_int(rank, "rank", minimum=1)
    subject = "`A` and `B` (with `U`, `S`, `Vh`)"
    V = Vh.T
    C_A, E_A = _project_out(U, A)
    C_B, E_B = _project_out(V, B)
    Q_A, R_A = qr_factor(xp, E_A, "cholqr2", subject)
    Q_B, R_B = qr_factor(xp, E_B, "cholqr2", subject)
    c = A.shape[1]
    Sk = xp.concat(
        [
            xp.concat([_diag(xp, S), xp.zeros((k, c), dtype=S.dtype, device=device(S))], axis=1),
            xp.zeros((c, k + c), dtype=S.dtype, device=device(S)),
        ],
        axis=0,
    )
    core = Sk + xp.concat([C_A, R_A], axis=0) @ xp.concat([C_B, R_B], axis=0).T
    P = xp.concat([U, Q_A], axis=1)
    W = xp.concat([V, Q_B], axis=1)
    check_factor(xp, core, subject, "update core")
    check_factor(xp, P, subject, "left basis")
    check_factor(xp, W, subject, "right basis")
    if not (_is_orthonormal(xp, P) and _is_orthonormal(xp, W)):
        # exact for any bases: P core W^T = Q_P (R_P core R_W^T) Q_W^T
        (P, R_P), (W, R_W) = xp.linalg.qr(P), xp.linalg.qr(W)
        core = R_P @ core @ R_W.T
        check_factor(xp, core, subject, "re-orthonormalized update core")
    Uk, Sc, Vkh = xp.linalg.svd(core, full_matrices=False)
    keep = Sc.shape[0] if rank is None else min(rank, Sc.shape[0])
    U_new = P @ Uk[:, :keep]
    V_new = W @ Vkh[:keep, :].T
    return SVDResult(U_new, Sc[:keep], V_new.T)


@fp_guarded
def rayleigh_ritz_refresh(
    state: LowRankPSD, dense: Any, columns: Any, *, check_symmetric: bool = True
) -> LowRankPSD:
    """Partial Rayleigh-Ritz correction of ``state`` on a subset of its columns (BC-KFAC).

    Parameters
    ----------
    state : LowRankPSD
        Representation ``(U, d)`` to correct.
    dense : array or symmetric linear operator, shape (D, D)
        The exact matrix (for BC-KFAC the dense exponential-average factor).
    columns : sequence of int or integer array
        Distinct column indices ``S`` of ``U`` (``1 <= len(S) <= k``), as Python/NumPy
        integers or a 1-D integer array of any library (floats and bools are rejected).
    check_symmetric : bool, keyword-only, default True
        Test ``dense`` for symmetry with two fixed Gaussian probes (one product with a
        two-column block, the test of :func:`randomized_eigh`); a non-symmetric matrix
        raises instead of being replaced silently by its symmetric part.

    Returns
    -------
    LowRankPSD
        ``U[:, S]`` rotated to the Ritz vectors of ``dense`` in its span and ``d[S]`` replaced
        by the Ritz values (clipped at 0); eigenpairs re-sorted descending.

    Raises
    ------
    ValueError
        Out-of-range or repeated columns, shape mismatch, NaN/Inf, a ``dense`` that is not
        symmetric (with ``check_symmetric``).
    TypeError
        Mixed array libraries; ``columns`` not integers; a non-bool ``check_symmetric``.

    Notes
    -----
    ``H = U_S^T X U_S`` (``s x s``), ``H = W diag(w) W^T``, ``U_S <- U_S W``, ``d_S <- w``
    (BC-KFAC of Puiu, arXiv:2210.08494; see the algorithm reference, docs/algorithms.md,
    section 'Error-controlled Brand variants'). Because ``U_S W`` spans the same space as
    ``U_S``, the other columns stay orthogonal to it. Cost ``O(D^2 s + D s^2 + s^3)`` for a
    dense ``X``.

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
    if op.dtype != U.dtype:
        raise TypeError(f"`dense` must have the dtype of `state` ({U.dtype}), got {op.dtype}")
    idx = _column_indices(columns)
    k = U.shape[1]
    if not idx or len(set(idx)) != len(idx) or min(idx) < 0 or max(idx) >= k:
        raise ValueError(
            f"`columns` must be distinct indices in [0, {k}) (at least one), got {idx}"
        )
    if check_bool(check_symmetric, "check_symmetric"):
        # fixed probes: the check is deterministic and leaves every generator alone
        symmetry_probe(op, normal_sampler(xp, 0, dtype=op.dtype, device=op.device), "dense")
    chosen = xp.asarray(idx, device=device(U))
    rest = xp.asarray(
        [i for i in range(k) if i not in set(idx)], dtype=chosen.dtype, device=device(U)
    )
    U_S = xp.take(U, chosen, axis=1)
    H = U_S.T @ op.checked_matmat(U_S, "dense")
    w, W = eigh_descending(xp, (H + H.T) / 2, name="Rayleigh-Ritz matrix", subject="`dense`")
    U_all = xp.concat([xp.take(U, rest, axis=1), U_S @ W], axis=1)
    d_all = xp.concat([xp.take(d, rest), xp.clip(w, min=0.0)])
    order = xp.argsort(d_all, descending=True, stable=True)
    # a rotation of orthonormal columns, sorted non-negative values: valid by construction
    return LowRankPSD(xp.take(U_all, order, axis=1), xp.take(d_all, order), check=False)


def _column_indices(columns: Any) -> list[int]:
    """``columns`` as a list of Python ints; non-integers raise ``TypeError``."""
    if isinstance(columns, list | tuple | range):
        items = list(columns)
        bad = [c for c in items if isinstance(c, bool) or not isinstance(c, numbers.Integral)]
        if bad:
            raise TypeError(
                f"`columns` must hold integer indices, got {type(bad[0]).__name__} {bad[0]!r}"
            )
        return [int(c) for c in items]
    if not hasattr(columns, "dtype") or not hasattr(columns, "shape"):
        raise TypeError(
            f"`columns` must be a sequence of integers or an integer array, got "
            f"{type(columns).__name__}"
        )
    values = to_numpy(columns)
    if values.ndim > 1 or values.dtype == np.bool_ or not np.issubdtype(values.dtype, np.integer):
        raise TypeError(
            f"`columns` must be a 1-D integer array, got dtype {columns.dtype} and shape "
            f"{tuple(columns.shape)}"
        )
    return [int(i) for i in values.ravel()]
