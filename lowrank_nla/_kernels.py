"""Prepared inverses: validate and factor once, apply many times without checks.

The checked routines of :mod:`lowrank_nla` (:func:`damped_inverse_apply`,
:func:`kron_inverse_apply`) validate their operands on every call, which reads the arrays back
to the host (finiteness, dtype, the scalars of the damping). An optimizer applies the same
inverse at every step between two refreshes, so it prepares the inverse once per refresh, with
every check, and applies the prepared value on the hot path: two thin products per factor and
no host synchronisation (the scalars are Python floats fixed at preparation).

``DampedInverse`` represents ``(U diag(d) U^T + t (I - U U^T) + l I)^-1`` as
``U diag(c) U^T + o I`` with ``c = 1/(d + l) - 1/(t + l)`` and ``o = 1/(t + l)``;
``KronEigenbasisInverse`` the eigenbasis-damped Kronecker inverse
``(G (x) A + l I)^-1`` of two low-rank factors with complement eigenvalues (see
:func:`lowrank_nla.kron_inverse_apply`, ``scheme="eigenbasis"``).
"""

from __future__ import annotations

from typing import Any, NamedTuple

from ._backend import all_finite, fp_guarded, namespace
from ._lowrank import LowRankPSD, check_state
from ._validation import check_bool, check_pair, check_real

__all__ = [
    "DampedInverse",
    "KronEigenbasisInverse",
    "damped_inverse",
    "inverse_coefficients",
    "kron_eigenbasis_inverse",
]

Array = Any


class DampedInverse(NamedTuple):
    """A prepared damped inverse ``U diag(coeff) U^T + outside I`` (see :func:`damped_inverse`).

    Attributes
    ----------
    U : array, shape (D, k)
        Orthonormal columns of the factor.
    coeff : array, shape (k,)
        ``1/(d + damping) - 1/(tail + damping)``.
    outside : float
        ``1/(tail + damping)``, the inverse on the complement of ``range(U)``.
    """

    U: Any
    coeff: Any
    outside: float

    def apply(self, V: Array, side: str = "left") -> Array:
        """``X^-1 V`` (``side="left"``, ``V`` of shape ``(D,)`` or ``(D, m)``) or ``V X^-1``
        (``side="right"``, ``V`` of shape ``(m, D)``), ``O(D k m)``.

        Unchecked: ``V`` must be finite, of the factor's library, device and dtype (the
        hot-path kernel; :func:`lowrank_nla.damped_inverse_apply` is the checked form). Only
        ``side`` is validated: any value but ``"left"`` or ``"right"`` raises
        ``ValueError``.
        """
        U, coeff = self.U, self.coeff
        if side not in ("left", "right"):
            raise ValueError(f"`side` must be 'left' or 'right', got {side!r}")
        if side == "left":
            proj = U.T @ V
            scaled = coeff * proj if V.ndim == 1 else coeff[:, None] * proj
            return U @ scaled + self.outside * V
        return ((V @ U) * coeff) @ U.T + self.outside * V


def inverse_coefficients(
    xp: Any, d: Array, damping: float, tail: float, name: str = "damping", check: bool = True
) -> tuple[Array, float]:
    """``1/(d+l) - 1/(t+l)`` and ``1/(t+l)``: the inverse of ``U D U^T + t(I - UU^T) + l I``.

    ``d >= 0`` (a :class:`LowRankPSD`) and ``l + t > 0`` make every denominator positive;
    a damping so small that ``1/(t+l)`` overflows the dtype raises ``ValueError`` (the
    coefficients themselves are read back for that only with ``check``).
    """
    top = float(xp.finfo(d.dtype).max)
    outside = 1.0 / (tail + damping)
    coeff = 1.0 / (d + damping) - outside
    if not outside <= top or (check and not all_finite(xp, coeff)):
        raise ValueError(
            f"`{name}` is too small for {str(d.dtype).rsplit('.', 1)[-1]}: the inverse "
            f"eigenvalue 1 / (tail + damping) = 1 / {tail + damping:.3e} overflows"
        )
    return coeff, outside


@fp_guarded
def damped_inverse(
    state: LowRankPSD, *, damping: float, tail: float = 0.0, validate: bool = True
) -> DampedInverse:
    """Prepare ``(U diag(d) U^T + tail (I - U U^T) + damping I)^-1`` for repeated application.

    Parameters
    ----------
    state : LowRankPSD
        ``(U, d)`` with ``U`` orthonormal.
    damping : float
        ``lambda > 0``.
    tail : float, default 0
        Eigenvalue of the complement of ``range(U)`` (``0``: plain Woodbury form;
        ``min(d)``: spectrum continuation).
    validate : bool, default True
        Check ``state`` (shapes, dtypes, finite entries: reads the arrays back to the host)
        and the scalars. ``False`` skips the checks of ``state`` for a caller that validated
        the same state before (an optimizer re-preparing it for a new damping value); the
        scalars are always checked (they are Python numbers, no array is read).

    Returns
    -------
    DampedInverse
        ``U diag(coeff) U^T + outside I``; :meth:`DampedInverse.apply` applies it.

    Raises
    ------
    ValueError
        ``damping <= 0``, ``tail < 0``, a malformed or non-finite ``state``, a damping so
        small that the inverse overflows the dtype (with ``validate=False`` only the
        complement's ``1/(tail + damping)`` is checked: nothing is read from the device).
    TypeError
        ``state`` is not a :class:`LowRankPSD`, mixed libraries or dtypes, a non-bool
        ``validate``.

    Notes
    -----
    With ``U`` orthonormal, ``X = U diag(d + l) U^T + (t + l)(I - U U^T)``, so
    ``X^-1 = U diag(1/(d + l) - 1/(t + l)) U^T + I/(t + l)``: ``O(k)`` work here, and
    :meth:`DampedInverse.apply` costs two thin products. It equals
    :func:`damped_inverse_apply` (the checked, one-shot form) exactly.

    Examples
    --------
    >>> import numpy as np
    >>> import lowrank_nla as ln
    >>> inv = ln.damped_inverse(ln.LowRankPSD(np.eye(3)[:, :1], np.array([3.0])), damping=1.0)
    >>> inv.apply(np.ones(3)).tolist()
    [0.25, 1.0, 1.0]
    """
    if check_bool(validate, "validate"):
        check_state(state)
    damping = check_real(damping, "damping", minimum=0.0, strict=True)
    tail = check_real(tail, "tail", minimum=0.0)
    xp = namespace(state.U)
    coeff, outside = inverse_coefficients(xp, state.d, damping, tail, check=validate)
    return DampedInverse(state.U, coeff, outside)


class KronEigenbasisInverse(NamedTuple):
    """A prepared eigenbasis-damped Kronecker inverse (see :func:`kron_eigenbasis_inverse`).

    Attributes
    ----------
    U_G, U_A : array
        Orthonormal columns of the two factors.
    d_G, d_A : array
        Their (shifted) eigenvalues.
    t_G, t_A : float
        Their (shifted) complement eigenvalues.
    damping : float
        ``lambda`` added to the Kronecker product.
    """

    U_G: Any
    d_G: Any
    t_G: float
    U_A: Any
    d_A: Any
    t_A: float
    damping: float

    def apply(self, V: Array) -> Array:
        """``(G (x) A + damping I)^-1`` applied to the ``d_G x d_A`` matrix ``V`` (unchecked).

        ``V`` splits into its four blocks ``P_G V P_A``, ``P_G V P_A^perp``,
        ``P_G^perp V P_A`` and ``P_G^perp V P_A^perp``, on which the operator is diagonal
        with entries ``d_G d_A^T + l``, ``d_G t_A + l``, ``t_G d_A^T + l`` and
        ``t_G t_A + l``.
        """
        Ug, Ua, dg, da, lam = self.U_G, self.U_A, self.d_G, self.d_A, self.damping
        W = Ug.T @ V  # (k_G, d_A)
        Y = V @ Ua  # (d_G, k_A)
        C = W @ Ua  # (k_G, k_A)
        inner = Ug @ (C / (dg[:, None] * da[None, :] + lam)) @ Ua.T
        g_in_a_out = Ug @ ((W - C @ Ua.T) / (dg[:, None] * self.t_A + lam))
        g_out_a_in = ((Y - Ug @ C) / (self.t_G * da[None, :] + lam)) @ Ua.T
        rest = (V - Ug @ W - Y @ Ua.T + Ug @ C @ Ua.T) / (self.t_G * self.t_A + lam)
        return inner + g_in_a_out + g_out_a_in + rest


@fp_guarded
def kron_eigenbasis_inverse(
    G: LowRankPSD,
    A: LowRankPSD,
    *,
    damping: float,
    tails: tuple[float, float] = (0.0, 0.0),
    shift: tuple[float, float] = (0.0, 0.0),
    validate: bool = True,
) -> KronEigenbasisInverse:
    """Prepare ``((G + s_G I) (x) (A + s_A I) + damping I)^-1`` in the factors' eigenbasis.

    Parameters
    ----------
    G, A : LowRankPSD
        Output-gradient and input factors (full or truncated eigendecompositions).
    damping : float
        ``lambda > 0`` added to the Kronecker product.
    tails : (float, float), default (0, 0)
        Complement eigenvalues ``(t_G, t_A)`` of truncated factors (spectrum continuation).
    shift : (float, float), default (0, 0)
        ``(s_G, s_A)`` added to each factor's spectrum, complement included.
    validate : bool, default True
        Check ``G`` and ``A`` (see :func:`damped_inverse`).

    Returns
    -------
    KronEigenbasisInverse

    Raises
    ------
    ValueError
        ``damping <= 0``, a negative tail or shift, a malformed or non-finite factor.
    TypeError
        Not :class:`LowRankPSD` values, mixed libraries or dtypes; ``tails`` or ``shift`` not
        a pair; a non-bool ``validate``.

    Notes
    -----
    The result applies the same operator as
    ``kron_inverse_apply(G, A, V, damping=damping, scheme="eigenbasis", shift=shift)`` with
    the given tails: ``V`` is split into the four blocks of the two projectors
    ``P_X = U_X U_X^T`` and their complements, on which the Kronecker product acts as
    ``d_G d_A^T``, ``d_G t_A``, ``t_G d_A^T`` and ``t_G t_A`` (exact for any ranks).
    Validation happens here, once; :meth:`KronEigenbasisInverse.apply` checks nothing.

    References
    ----------
    T. George et al., "Fast approximate natural gradient descent in a Kronecker-factored
    eigenbasis", NeurIPS 2018.

    Examples
    --------
    >>> import numpy as np
    >>> import lowrank_nla as ln
    >>> G = ln.LowRankPSD(np.eye(2), np.array([3.0, 1.0]))
    >>> A = ln.LowRankPSD(np.eye(3), np.array([1.0, 1.0, 1.0]))
    >>> ln.kron_eigenbasis_inverse(G, A, damping=1.0).apply(np.ones((2, 3)))[:, 0].tolist()
    [0.25, 0.5]
    """
    if check_bool(validate, "validate"):
        check_state(G, "G")
        check_state(A, "A")
        if G.U.dtype != A.U.dtype:
            raise TypeError(f"`G` and `A` must share a dtype, got {G.U.dtype} and {A.U.dtype}")
    damping = check_real(damping, "damping", minimum=0.0, strict=True)
    t_g, t_a = check_pair(tails, "tails", ("tail_G", "tail_A"))
    s_g, s_a = check_pair(shift, "shift", ("shift_G", "shift_A"))
    return KronEigenbasisInverse(G.U, G.d + s_g, t_g + s_g, A.U, A.d + s_a, t_a + s_a, damping)
