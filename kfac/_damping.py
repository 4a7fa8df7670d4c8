"""Damping schemes as objects: each turns two factor representations and a damping value into
a prepared inverse of the NLA core (:func:`lowrank_nla.damped_inverse`,
:func:`lowrank_nla.kron_eigenbasis_inverse`), so a new scheme is a new class here and never an
edit of ``lowrank_nla``.

With ``lambda`` the ``damping`` value and ``s_X`` the identity weight ``rho^m`` of each
factor (see :class:`kfac._kron.FactorState`):

``"eigenbasis"``
    Exact damping of the Kronecker product: ``(G (x) A + lambda I)^-1`` in the eigenbasis,
    ``Q_G [(Q_G^T V Q_A) / (d_G d_A^T + lambda)] Q_A^T``.
``"eigenbasis-relative"``
    The same with ``lambda max(d_G) max(d_A)`` (the thesis' baseline K-FAC).
``"factored"``
    Tikhonov damping split between the factors, ``(G + sqrt(lambda) I)^-1 V
    (A + sqrt(lambda) I)^-1``.
``"factored-relative"`` (the ``kron`` block's default; ``KFACPreconditioner``'s is ``"factored"``)
    ``lambda_X = lambda max(d_X)`` per factor (the thesis' "adaptive" damping).
``"pi"``
    Factored with Martens and Grosse's pi-adjustment, ``lambda_G = sqrt(lambda) / pi``,
    ``lambda_A = sqrt(lambda) pi``, ``pi = sqrt((tr A / d_A) / (tr G / d_G))``.

Every scheme adds ``s_X I`` to each factor and, with ``continuation``, models the discarded
spectrum of a truncated representation as flat at its smallest kept eigenvalue (no effect on
a full eigendecomposition). A factor with no curvature at all (every eigenvalue zero: a layer
whose inputs or output gradients vanish, a "dead" ReLU layer) is taken as the identity
(``s_X = 1``, scale 1) by every scheme: relative damping would be zero there and ``rho^m``
alone would underflow, so its inverse would overflow and ``0 * inf`` turn the direction into
NaN. The scalars a scheme needs (``max(d)``, ``tr``, ``min(d)``) are
read once, when a representation is published (:meth:`Applied.of`), so preparing an inverse
for a new damping value reads nothing back from the device.

What preparation precomputes (the per-step apply is the hot path). A factored scheme turns a
factor whose representation keeps at least half of its dimension (every factor of
``inverse="eigh"``) into the dense damped inverse ``(X + lambda_X I)^-1``, one ``D^2 k``
product per preparation; the step then costs one product per factor, ``I_G V I_A``, where the
low-rank form ``U diag(c) U^T V + o V`` costs two. The eigenbasis schemes of two full-rank
factors precompute the inverse denominators ``1 / (d_G d_A^T + lambda)`` and apply
``Q_G [(Q_G^T V Q_A) * inv] Q_A^T``, four products (the truncated form adds the three
complement blocks). A prepared inverse is made for one damping value: the block prepares a
new one whenever the step's damping differs from the one it was prepared with.
"""

from __future__ import annotations

import abc
import math
from dataclasses import dataclass, replace
from typing import Any, ClassVar, Protocol

from torch import Tensor

import lowrank_nla as ln

__all__ = [
    "DAMPING_SCHEMES",
    "Applied",
    "DampingScheme",
    "DenseInverse",
    "Eigenbasis",
    "Factored",
    "FactoredInverse",
    "PiAdjusted",
    "Prepared",
    "factor_inverse",
    "make_damping",
]


@dataclass(frozen=True)
class Applied:
    """A published representation: ``(U, d)``, the identity weight ``s`` it carries, and the
    spectrum's scalars the damping schemes use (read from the device once, here).

    Attributes
    ----------
    rep : LowRankPSD or None
        ``None`` on a process that received only the factor's prepared inverse from the
        factor's owner (``kfac.distributed``, :attr:`inverse`).
    identity : float
        Weight ``rho^m`` of the identity initialisation when the representation was made.
    top : float
        ``max(d)`` (0 for rank 0).
    mean : float
        ``tr / D = sum(d) / D``.
    bottom : float
        ``min(d)`` (0 for rank 0).
    dim, rank : int
        ``D`` and the rank of the representation.
    inverse : tuple of (float, DenseInverse) or None
        A full-rank factor's dense damped inverse ``(X + c I)^-1`` prepared ahead (by the
        factor's owner under ``kfac.distributed``) with the total damping ``c`` it was made
        for; a scheme that needs this factor with the same ``c`` uses it
        (:meth:`DampingScheme.prepare_factor`).
    """

    rep: ln.LowRankPSD | None
    identity: float
    top: float
    mean: float
    bottom: float
    dim: int = 0
    rank: int = 0
    inverse: tuple[float, DenseInverse] | None = None

    @classmethod
    def of(cls, rep: ln.LowRankPSD, identity: float) -> Applied:
        """Publish ``rep`` with identity weight ``identity`` (one read of three scalars)."""
        if rep.rank == 0:
            return cls(rep, identity, 0.0, 0.0, 0.0, rep.dim, 0)
        d = rep.d
        top, total, bottom = (float(v) for v in (d.max(), d.sum(), d.min()))
        return cls(rep, identity, top, total / rep.dim, bottom, rep.dim, rep.rank)

    def tail(self, continuation: bool) -> float:
        """Complement eigenvalue: ``min(d)`` of a truncated representation with
        continuation, else 0."""
        if not continuation or self.rank == 0 or self.rank >= self.dim:
            return 0.0
        return self.bottom


def _live(x: Applied) -> Applied:
    """``x``, or the identity (weight 1, unit scale) for a factor with no curvature."""
    if x.top > 0.0:
        return x
    return replace(x, identity=1.0, top=1.0, mean=1.0, bottom=0.0)


class Prepared(Protocol):
    """A prepared inverse of one layer's Kronecker pair."""

    def apply(self, V: Tensor) -> Tensor:
        """The direction for the gradient matrix ``V`` (``d_G x d_A``)."""
        ...

    def apply_rows(self, grad_outputs: Tensor, inputs: Tensor) -> Tensor:
        """The direction of ``V = grad_outputs^T inputs`` from the rows ``(N, d_G)`` and
        ``(N, d_A)``, without forming ``V`` first (factored schemes only)."""
        ...

    def rows_cheaper(self, n: int) -> bool:
        """Whether :meth:`apply_rows` on ``n`` rows costs fewer products than :meth:`apply`."""
        ...


@dataclass(frozen=True)
class DenseInverse:
    """A damped factor inverse ``(X + lambda I)^-1`` held as a dense symmetric matrix ``M``.

    Built by :func:`factor_inverse` from the eigendecomposition ``X = U diag(d) U^T`` (plus
    a flat complement ``tail`` when ``U`` is truncated); :meth:`apply` is one product, where
    :class:`lowrank_nla.DampedInverse` applies the same operator with two thin ones.
    """

    M: Tensor

    def apply(self, V: Tensor, side: str = "left") -> Tensor:
        """``M V`` (``side="left"``) or ``V M`` (``side="right"``)."""
        return self.M @ V if side == "left" else V @ self.M


def factor_inverse(
    rep: ln.LowRankPSD, *, damping: float, tail: float, validate: bool
) -> ln.DampedInverse | DenseInverse:
    """The prepared inverse of ``U diag(d) U^T + tail (I - U U^T) + damping I``.

    A representation of rank ``k >= D / 2`` gives a :class:`DenseInverse` (its apply, ``D^2 m``
    per ``m`` columns, is cheaper than the thin form's ``2 D k m``), a lower rank the thin
    :class:`lowrank_nla.DampedInverse`. Validation (and the overflow check of the inverse
    eigenvalues) is :func:`lowrank_nla.damped_inverse`'s in both cases.
    """
    thin = ln.damped_inverse(rep, damping=damping, tail=tail, validate=validate)
    if 2 * rep.rank < rep.dim:
        return thin
    U = thin.U
    if rep.rank == rep.dim:
        # U U^T = I: the inverse is U diag(1/(d + l)) U^T, without the cancellation of
        # 1/(d + l) - 1/l against 1/l that the complement form carries for a small damping
        M = (U * (1.0 / (rep.d + damping))) @ U.T
    else:
        M = (U * thin.coeff) @ U.T
        M.diagonal().add_(thin.outside)
    return DenseInverse((M + M.T) / 2)


def _per_column(inverse: ln.DampedInverse | DenseInverse) -> tuple[int, int]:
    """``(D, multiply-adds of one column's apply)``: ``D^2`` dense, ``2 D k`` thin."""
    if isinstance(inverse, DenseInverse):
        D = inverse.M.shape[0]
        return D, D * D
    D, k = inverse.U.shape
    return D, 2 * D * k


@dataclass(frozen=True)
class FactoredInverse:
    """``I_G V I_A`` with ``I_X`` a prepared damped inverse of each factor (thin or dense)."""

    G: ln.DampedInverse | DenseInverse
    A: ln.DampedInverse | DenseInverse

    def rows_cheaper(self, n: int) -> bool:
        # I_G V I_A: d_A columns through I_G, d_G rows through I_A; from the rows: n columns
        # through each, then the (d_G x n)(n x d_A) product
        d_g, cost_g = _per_column(self.G)
        d_a, cost_a = _per_column(self.A)
        return (cost_g + cost_a + d_g * d_a) * n < cost_g * d_a + cost_a * d_g

    def apply(self, V: Tensor) -> Tensor:
        return self.A.apply(self.G.apply(V, "left"), "right")

    def apply_rows(self, grad_outputs: Tensor, inputs: Tensor) -> Tensor:
        # I_G (g^T a) I_A = (I_G g^T)(I_A a^T)^T: linear in the width but for the product
        return self.G.apply(grad_outputs.T) @ self.A.apply(inputs.T).T


@dataclass(frozen=True)
class _EigenbasisInverse:
    inverse: ln.KronEigenbasisInverse

    def apply(self, V: Tensor) -> Tensor:
        return self.inverse.apply(V)

    def apply_rows(self, grad_outputs: Tensor, inputs: Tensor) -> Tensor:
        return self.inverse.apply(grad_outputs.T @ inputs)

    def rows_cheaper(self, n: int) -> bool:
        return False


@dataclass(frozen=True)
class _FullEigenbasisInverse:
    """The eigenbasis inverse of two full-rank factors: ``Q_G [(Q_G^T V Q_A) * inv] Q_A^T``
    with ``inv = 1 / (d_G d_A^T + lambda)`` precomputed (no complement blocks)."""

    Q_G: Tensor
    Q_A: Tensor
    inv: Tensor

    def apply(self, V: Tensor) -> Tensor:
        return self.Q_G @ (((self.Q_G.T @ V) @ self.Q_A) * self.inv) @ self.Q_A.T

    def apply_rows(self, grad_outputs: Tensor, inputs: Tensor) -> Tensor:
        return self.apply(grad_outputs.T @ inputs)

    def rows_cheaper(self, n: int) -> bool:
        return False


class DampingScheme(abc.ABC):
    """Turns the two published representations and ``damping`` into a prepared inverse."""

    #: The scheme's registry name.
    name: str
    #: Whether the scheme damps each factor separately (the rows application needs it).
    factored: ClassVar[bool]

    @abc.abstractmethod
    def prepare(
        self, G: Applied, A: Applied, damping: float, *, continuation: bool, validate: bool
    ) -> Prepared:
        """The prepared inverse; ``validate`` checks the representations (a host read)."""

    def prepare_factor(
        self, X: Applied, damping: float, *, validate: bool
    ) -> tuple[float, DenseInverse] | None:
        """One factor's dense damped inverse with its total damping (``X.inverse`` when it
        was made for that value), where the scheme's inverse of ``X`` depends on ``X`` alone
        and is dense and full rank (so it is fewer numbers than ``(U, d)``); ``None``
        otherwise (default)."""
        return None


def _side(
    X: Applied, total: float, continuation: bool, validate: bool
) -> ln.DampedInverse | DenseInverse:
    """``X``'s damped inverse for the total damping ``total``: the one prepared ahead when it
    was made for that value, else made from the representation."""
    if X.inverse is not None and X.inverse[0] == total:
        return X.inverse[1]
    if X.rep is None:
        raise RuntimeError(
            f"a factor's inverse was prepared for the total damping {X.inverse and X.inverse[0]}"
            f" and is needed for {total}, but its representation is not held here"
        )
    return factor_inverse(X.rep, damping=total, tail=X.tail(continuation), validate=validate)


class Factored(DampingScheme):
    """Per-factor Tikhonov damping: ``sqrt(lambda)`` each, or ``lambda max(d_X)``."""

    factored: ClassVar[bool] = True
    #: Whether each factor's damping depends on that factor alone.
    separable: ClassVar[bool] = True

    def __init__(self, relative: bool) -> None:
        self.relative = relative
        self.name = "factored-relative" if relative else "factored"

    def _lam(self, X: Applied, damping: float) -> float:
        return damping * X.top if self.relative else math.sqrt(damping)

    def dampings(self, G: Applied, A: Applied, damping: float) -> tuple[float, float]:
        """``(lambda_G, lambda_A)`` before the identity weights."""
        return self._lam(G, damping), self._lam(A, damping)

    def prepare(
        self, G: Applied, A: Applied, damping: float, *, continuation: bool, validate: bool
    ) -> Prepared:
        G, A = _live(G), _live(A)
        lam_g, lam_a = self.dampings(G, A, damping)
        return FactoredInverse(
            _side(G, lam_g + G.identity, continuation, validate),
            _side(A, lam_a + A.identity, continuation, validate),
        )

    def prepare_factor(
        self, X: Applied, damping: float, *, validate: bool
    ) -> tuple[float, DenseInverse] | None:
        if not self.separable or X.rep is None or X.rank < X.dim or X.dim == 0:
            return None
        X = _live(X)
        total = self._lam(X, damping) + X.identity
        if X.inverse is not None and X.inverse[0] == total:
            return X.inverse
        assert X.rep is not None
        inverse = factor_inverse(X.rep, damping=total, tail=0.0, validate=validate)
        assert isinstance(inverse, DenseInverse)
        return total, inverse


class PiAdjusted(Factored):
    """Factored with the pi-adjustment (Martens & Grosse 2015, section 6.3)."""

    separable: ClassVar[bool] = False

    def __init__(self) -> None:
        self.relative = False
        self.name = "pi"

    def dampings(self, G: Applied, A: Applied, damping: float) -> tuple[float, float]:
        pi = math.sqrt(A.mean / G.mean) if G.mean > 0 and A.mean > 0 else 1.0
        return math.sqrt(damping) / pi, math.sqrt(damping) * pi


class Eigenbasis(DampingScheme):
    """Exact damping of the Kronecker product in the factors' eigenbasis."""

    factored: ClassVar[bool] = False

    def __init__(self, relative: bool) -> None:
        self.relative = relative
        self.name = "eigenbasis-relative" if relative else "eigenbasis"

    def prepare(
        self, G: Applied, A: Applied, damping: float, *, continuation: bool, validate: bool
    ) -> Prepared:
        G, A = _live(G), _live(A)
        assert G.rep is not None  # the eigenbasis schemes exchange every representation
        assert A.rep is not None
        lam = damping * G.top * A.top if self.relative else damping
        inverse = ln.kron_eigenbasis_inverse(
            G.rep,
            A.rep,
            damping=lam,
            tails=(G.tail(continuation), A.tail(continuation)),
            shift=(G.identity, A.identity),
            validate=validate,
        )
        if G.rep.rank == G.rep.dim and A.rep.rank == A.rep.dim:
            inv = 1.0 / (inverse.d_G[:, None] * inverse.d_A[None, :] + lam)
            return _FullEigenbasisInverse(inverse.U_G, inverse.U_A, inv)
        return _EigenbasisInverse(inverse)


DAMPING_SCHEMES: dict[str, Any] = {
    "eigenbasis": lambda: Eigenbasis(relative=False),
    "eigenbasis-relative": lambda: Eigenbasis(relative=True),
    "factored": lambda: Factored(relative=False),
    "factored-relative": lambda: Factored(relative=True),
    "pi": PiAdjusted,
}


def make_damping(name: Any) -> DampingScheme:
    """The scheme registered as ``name``; ``ValueError`` listing the valid names otherwise."""
    if not isinstance(name, str) or name not in DAMPING_SCHEMES:
        raise ValueError(
            f"Invalid damping_scheme: {name!r}; valid names are {list(DAMPING_SCHEMES)}"
        )
    scheme: DampingScheme = DAMPING_SCHEMES[name]()
    return scheme
