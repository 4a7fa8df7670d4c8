"""The ``LowRankPSD`` value type: a positive semidefinite matrix ``U diag(d) U^T``."""

from __future__ import annotations

import functools
import math
from typing import Any, NamedTuple

import array_api_compat
import numpy as np

from ._backend import check_finite, eps, floating_dtype, fp_guarded, namespace, safe_norm
from ._validation import check_bool

__all__ = ["LowRankPSD"]

Array = Any

#: Largest accepted estimate of ``||U^T U - I||_F`` at construction. It catches a ``U`` that
#: is not meant as an orthonormal basis (unnormalized or non-orthogonal columns, a transposed
#: factor, ``k > D``), not rounding: float32 eigendecompositions reach 1e-4, Brand states
#: re-orthonormalize at 3.5e-3 in float32 (``10 sqrt(eps)``), and such bases stay valid when
#: cast to float64.
ORTHONORMALITY_TOL = 1e-2

#: Probes of the orthonormality estimate (Rademacher vectors, fixed: the check is
#: deterministic). ``E ||(U^T U - I) z||^2 = ||U^T U - I||_F^2`` for each of them.
_PROBES = 4


@functools.lru_cache(maxsize=64)
def _rademacher(k: int) -> np.ndarray:
    gen = np.random.default_rng(0x1A0E)
    return gen.choice(np.array([-1.0, 1.0]), size=(k, _PROBES))


def orthonormality_estimate(xp: Any, U: Array) -> float:
    """Estimate of ``||U^T U - I||_F`` from four fixed sign probes, in ``O(D k)``.

    With ``z`` a Rademacher vector, ``E ||(U^T U - I) z||^2 = ||U^T U - I||_F^2``; the
    estimate is the root mean square over the probes (exact ``||.||_F`` costs ``O(D k^2)``,
    as much as the decomposition that produced ``U``).
    """
    k = int(U.shape[1])
    if k == 0:
        return 0.0
    Z = xp.asarray(_rademacher(k), dtype=U.dtype, device=array_api_compat.device(U))
    R = U.T @ (U @ Z) - Z
    return float(safe_norm(xp, R)) / math.sqrt(_PROBES)


@fp_guarded
def _validated(U: Any, d: Any) -> tuple[Array, Array]:
    """The construction checks of :class:`LowRankPSD`; returns ``(U, d)`` (``d`` clipped)."""
    xp = namespace(U, d, names=("U", "d"))
    if U.ndim != 2 or d.ndim != 1 or d.shape[0] != U.shape[1]:
        raise ValueError(
            f"`U` must have shape (D, k) and `d` shape (k,), got {tuple(U.shape)} and "
            f"{tuple(d.shape)}"
        )
    dev = array_api_compat.device(U)
    u_dtype, d_dtype = floating_dtype(xp, U, "U", device=dev), floating_dtype(xp, d, "d")
    U = U if U.dtype == u_dtype else xp.astype(U, u_dtype)  # integer input is promoted
    d = d if d.dtype == d_dtype else xp.astype(d, d_dtype)
    if U.dtype != d.dtype:
        raise TypeError(f"`U` and `d` must share a dtype, got {U.dtype} and {d.dtype}")
    check_finite(xp, U, "U")
    check_finite(xp, d, "d")
    k = int(d.shape[0])
    if k == 0:
        return U, d
    if k > 1 and not bool(xp.all(d[:-1] >= d[1:])):
        raise ValueError(f"`d` must be sorted in descending order, got {_show(d)}")
    top, low = float(d[0]), float(d[-1])
    if low < 0.0:
        floor = math.sqrt(eps(xp, d.dtype)) * max(top, 0.0)
        if low < -floor:
            raise ValueError(
                f"`d` must be non-negative (a PSD spectrum), got min(d) = {low:.3e} < "
                f"-sqrt(eps) max(d) = {-floor:.3e}"
            )
        d = xp.clip(d, min=0.0)  # rounding-level negatives of a PSD spectrum
    defect = orthonormality_estimate(xp, U)
    if not defect <= ORTHONORMALITY_TOL:
        raise ValueError(
            f"`U` must have orthonormal columns: ||U^T U - I||_F is about {defect:.3e} > "
            f"{ORTHONORMALITY_TOL:g}; orthonormalize it (e.g. QR, then rediagonalize), or pass "
            "`check=False` for a basis known to be orthonormal"
        )
    return U, d


def _show(d: Array) -> str:
    from ._backend import to_numpy

    values = to_numpy(d)
    text = np.array2string(values[:8], precision=4, separator=", ")
    return text if values.size <= 8 else text[:-1] + ", ...]"


class _LowRankPSDFields(NamedTuple):
    U: Any
    d: Any


class LowRankPSD(_LowRankPSDFields):
    """A positive semidefinite matrix in low-rank form ``U @ diag(d) @ U.T``.

    A frozen value (a NamedTuple): operations return new values. Construction validates it
    once; every routine that takes a ``LowRankPSD`` re-checks the cheap structural part
    (shapes, dtypes, one array library, finite entries).

    Parameters
    ----------
    U : array, shape (D, k)
        Orthonormal columns. Integer input is promoted to the default float.
    d : array, shape (k,)
        Eigenvalues, non-negative and sorted descending, same library and dtype as ``U``.
    check : bool, keyword-only, default True
        Validate the invariants (see Notes). ``False`` skips every check: for hot paths
        whose ``U`` and ``d`` come straight from a decomposition or a previous
        ``LowRankPSD`` (the library's own routines build their results this way). A
        value that violates the invariants gives wrong results downstream.

    Attributes
    ----------
    U : array, shape (D, k)
        Orthonormal columns (up to rounding; see :meth:`orthogonality_defect`).
    d : array, shape (k,)
        Non-negative eigenvalues, sorted descending.

    Raises
    ------
    ValueError
        Shapes that do not match, NaN/Inf, ``d`` not sorted descending, a negative ``d``
        beyond rounding, ``U`` not orthonormal.
    TypeError
        Non-arrays, arrays of different libraries or dtypes, unsupported dtypes.

    Notes
    -----
    The checks cost ``O(D k)``, the price of one product with ``U``: finiteness, the order
    of ``d``, ``d >= 0`` (entries in ``[-sqrt(eps) max(d), 0)``, the rounding of a PSD
    spectrum by a float32 eigensolver, are set to 0; anything more negative raises), and
    ``||U^T U - I||_F <= 0.01`` estimated with four fixed sign probes (exact
    ``||U^T U - I||_F`` would cost ``O(D k^2)``). The tolerance catches a ``U`` that is not an
    orthonormal basis, not rounding: float32 bases cast to float64 pass. Values built by
    ``_make``/``_replace`` are not checked, like ``check=False``.

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
    >>> ln.LowRankPSD(np.eye(4)[:, :2], np.array([1.0, 3.0]))
    Traceback (most recent call last):
    ...
    ValueError: `d` must be sorted in descending order, got [1., 3.]
    """

    __slots__ = ()

    def __new__(cls, U: Any, d: Any, *, check: bool = True) -> LowRankPSD:
        if check_bool(check, "check"):
            U, d = _validated(U, d)
        return super().__new__(cls, U, d)

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
        """``U diag(d) U^T V`` for ``V`` of shape ``(D,)`` or ``(D, m)``, in ``O(D k m)``.

        Only the shape of ``V`` is checked (a ``ValueError`` naming ``V``); its values are
        not read (no host synchronisation).
        """
        shape = tuple(getattr(V, "shape", ()))
        if len(shape) not in (1, 2) or shape[0] != self.U.shape[0]:
            raise ValueError(
                f"`V` must have shape ({self.dim},) or ({self.dim}, m) to match the state, "
                f"got {shape}"
            )
        coeff = self.U.T @ V
        scaled = self.d * coeff if V.ndim == 1 else self.d[:, None] * coeff
        return self.U @ scaled

    def __matmul__(self, V: Array) -> Array:
        return self.matvec(V)

    def truncate(self, rank: int) -> LowRankPSD:
        """Keep the ``rank`` largest eigenpairs (``rank >= self.rank`` keeps everything)."""
        if isinstance(rank, bool) or not isinstance(rank, int | np.integer):
            raise TypeError(f"`rank` must be a non-negative integer, got {rank!r}")
        if rank < 0:
            raise ValueError(f"`rank` must be a non-negative integer, got {rank!r}")
        keep = min(int(rank), self.rank)  # array-API slicing must stay in bounds
        return LowRankPSD(self.U[:, :keep], self.d[:keep], check=False)

    def orthogonality_defect(self) -> float:
        """``||U^T U - I||_F``: how far ``U`` is from orthonormal (0 in exact arithmetic)."""
        xp = namespace(self.U)
        G = self.U.T @ self.U
        eye = xp.eye(G.shape[0], dtype=G.dtype, device=array_api_compat.device(G))
        return float(xp.linalg.matrix_norm(G - eye))


def check_state(state: Any, name: str = "state") -> tuple[Any, LowRankPSD]:
    """Validate a :class:`LowRankPSD`; return its namespace and the state itself.

    The structural checks only (type, shapes, dtypes, one library, finite entries): the
    spectral invariants are established at construction.
    """
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
