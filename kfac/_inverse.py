"""Inverse strategies: how each Kronecker factor's inverse representation is refreshed.

A strategy turns a factor into a :class:`lowrank_nla.LowRankPSD` ``(U, d)`` on inverse-update
steps; the preconditioner applies the damped inverse of that representation
(:func:`lowrank_nla.kron_inverse_apply`). Strategies are registered by name (``inverse=``);
this module provides ``"eigh"``, the full eigendecomposition of K-FAC.
"""

from __future__ import annotations

import abc
from collections.abc import Mapping
from typing import Any, ClassVar

import torch

import lowrank_nla as ln

from ._factors import DenseFactor

__all__ = ["EighInverse", "InverseStrategy", "inverse_names", "make_inverse", "register"]

# Eigenvalues at or below this are rounding noise of a PSD matrix (ALGORITHMS.md 1.5).
EIGENVALUE_FLOOR = 1e-10

_REGISTRY: dict[str, type[InverseStrategy]] = {}


class InverseStrategy(abc.ABC):
    """Refreshes the inverse representation of one factor.

    Parameters
    ----------
    dtype : torch.dtype
        Decomposition dtype (float32 or float64), independent of the model dtype.
    """

    name: ClassVar[str]
    #: Keyword options the strategy accepts (``rank``, ``oversample``, ...).
    options: ClassVar[tuple[str, ...]] = ()

    def __init__(self, *, dtype: torch.dtype) -> None:
        self.dtype = dtype

    @abc.abstractmethod
    def refresh(self, factor: DenseFactor) -> ln.LowRankPSD:
        """A representation ``(U, d)`` of the factor's current matrix, in :attr:`dtype`."""


def register(cls: type[InverseStrategy]) -> type[InverseStrategy]:
    """Class decorator adding a strategy to the ``inverse=`` registry under ``cls.name``."""
    _REGISTRY[cls.name] = cls
    return cls


def inverse_names() -> tuple[str, ...]:
    """The registered ``inverse=`` names, sorted."""
    return tuple(sorted(_REGISTRY))


def make_inverse(
    name: Any, *, dtype: torch.dtype, options: Mapping[str, Any] | None = None
) -> InverseStrategy:
    """Instantiate the strategy registered as ``name`` with its keyword ``options``."""
    if not isinstance(name, str) or name not in _REGISTRY:
        raise ValueError(f"Invalid inverse: {name!r}; valid names are {list(inverse_names())}")
    cls = _REGISTRY[name]
    options = dict(options or {})
    unknown = sorted(set(options) - set(cls.options))
    if unknown:
        raise ValueError(
            f"inverse={name!r} does not take option(s) {unknown}; it accepts {list(cls.options)}"
        )
    return cls(dtype=dtype, **options)


def clip_spectrum(d: torch.Tensor) -> torch.Tensor:
    """Zero the eigenvalues ``<= EIGENVALUE_FLOOR`` (negative rounding noise included)."""
    return torch.where(d > EIGENVALUE_FLOOR, d, torch.zeros_like(d))


@register
class EighInverse(InverseStrategy):
    """K-FAC: full symmetric eigendecomposition ``X = Q diag(d) Q^T`` (``O(D^3)``).

    Computed by :func:`lowrank_nla.partial_eigh` in the decomposition dtype; a float32
    decomposition that fails or returns NaN is retried in float64 with a warning.
    """

    name = "eigh"

    def refresh(self, factor: DenseFactor) -> ln.LowRankPSD:
        if factor.matrix is None:
            raise RuntimeError("cannot decompose a factor that was never updated")
        X = factor.matrix.to(self.dtype)
        w, V = ln.partial_eigh(X, X.shape[0])
        return ln.LowRankPSD(V, clip_spectrum(w))
