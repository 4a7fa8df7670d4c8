"""The ``LowRankPSD`` value type: a positive semidefinite matrix ``U diag(d) U^T``."""

from __future__ import annotations

from typing import Any, NamedTuple

import array_api_compat

from ._backend import check_finite, floating_dtype, namespace

__all__ = ["LowRankPSD"]

Array = Any


class LowRankPSD(NamedTuple):
    """A positive semidefinite matrix in low-rank form ``U @ diag(d) @ U.T``.

    A frozen value (a NamedTuple): operations return new values. Every routine that takes a
    ``LowRankPSD`` validates it (shapes, dtypes, one array library, finite entries).

    Attributes
    ----------
    U : array, shape (D, k)
        Orthonormal columns (up to rounding; see :meth:`orthogonality_defect`).
    d : array, shape (k,)
        Non-negative eigenvalues, sorted descending.

    Examples
    --------
    >>> import numpy as np
    >>> import lowrank_nla as ln
    >>> state = ln.LowRankPSD(np.eye(4)[:, :2], np.array([3.0, 1.0]))
    >>> state.rank, state.dim
    (2, 4)
    >>> (state @ np.ones(4)).tolist()
    [3.0, 1.0, 0.0, 0.0]
    >>> state.truncate(1).d.tolist()
    [3.0]
    """

    U: Any
    d: Any

    @property
    def rank(self) -> int:
        """Number of stored eigenpairs ``k``."""
        return int(self.U.shape[1])

    @property
    def dim(self) -> int:
        """Dimension ``D`` of the represented matrix."""
        return int(self.U.shape[0])

    def to_dense(self) -> Array:
        """The ``D x D`` matrix ``U diag(d) U^T`` (``O(D^2 k)``; for tests and small ``D``)."""
        return (self.U * self.d) @ self.U.T

    def matvec(self, V: Array) -> Array:
        """``U diag(d) U^T V`` for ``V`` of shape ``(D,)`` or ``(D, m)``, in ``O(D k m)``."""
        coeff = self.U.T @ V
        scaled = self.d * coeff if V.ndim == 1 else self.d[:, None] * coeff
        return self.U @ scaled

    def __matmul__(self, V: Array) -> Array:
        return self.matvec(V)

    def truncate(self, rank: int) -> LowRankPSD:
        """Keep the ``rank`` largest eigenpairs (``rank >= self.rank`` keeps everything)."""
        if isinstance(rank, bool) or not isinstance(rank, int) or rank < 0:
            raise ValueError(f"`rank` must be a non-negative integer, got {rank!r}")
        keep = min(rank, self.rank)  # array-API slicing must stay in bounds
        return LowRankPSD(self.U[:, :keep], self.d[:keep])

    def orthogonality_defect(self) -> float:
        """``||U^T U - I||_F``: how far ``U`` is from orthonormal (0 in exact arithmetic)."""
        xp = namespace(self.U)
        G = self.U.T @ self.U
        eye = xp.eye(G.shape[0], dtype=G.dtype, device=array_api_compat.device(G))
        return float(xp.linalg.matrix_norm(G - eye))


def check_state(state: Any, name: str = "state") -> tuple[Any, LowRankPSD]:
    """Validate a :class:`LowRankPSD`; return its namespace and the state itself."""
    if not isinstance(state, LowRankPSD):
        raise TypeError(f"`{name}` must be a LowRankPSD, got {type(state).__name__}")
    U, d = state
    xp = namespace(U, d, names=(f"{name}.U", f"{name}.d"))
    if U.ndim != 2 or d.ndim != 1 or d.shape[0] != U.shape[1]:
        raise ValueError(
            f"`{name}` must have U of shape (D, k) and d of shape (k,), got {U.shape} and "
            f"{d.shape}"
        )
    dtype = floating_dtype(xp, U, f"{name}.U")
    if U.dtype != d.dtype or dtype != U.dtype:
        raise TypeError(
            f"`{name}.U` and `{name}.d` must share a float32/float64 dtype, got {U.dtype} and "
            f"{d.dtype}"
        )
    check_finite(xp, U, f"{name}.U")
    check_finite(xp, d, f"{name}.d")
    return xp, state
