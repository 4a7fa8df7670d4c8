"""Damping schemes, clipping and hyperparameter schedules.

Damping schemes (``damping_scheme=``), each a configuration of
:func:`lowrank_nla.kron_inverse_apply`, with ``lambda`` the ``damping`` value and ``s_X`` the
identity weight ``rho^m`` of each factor (ALGORITHMS.md 1.3):

``"eigenbasis"``
    Exact damping of the Kronecker product: ``(G (x) A + lambda I)^-1`` in the eigenbasis,
    ``Q_G [(Q_G^T V Q_A) / (d_G d_A^T + lambda)] Q_A^T``.
``"eigenbasis-relative"``
    The same with ``lambda max(d_G) max(d_A)`` (the thesis' baseline K-FAC).
``"factored"``
    Tikhonov damping split between the factors, ``(G + sqrt(lambda) I)^-1 V
    (A + sqrt(lambda) I)^-1``.
``"factored-relative"`` (default)
    ``lambda_X = lambda max(d_X)`` per factor (the thesis' "adaptive" damping).
``"pi"``
    Factored with Martens and Grosse's pi-adjustment, ``lambda_G = sqrt(lambda) / pi``,
    ``lambda_A = sqrt(lambda) pi``, ``pi = sqrt((tr A / d_A) / (tr G / d_G))``.

Every scheme adds ``s_X I`` to each factor and, unless ``continuation=False``, models the
discarded spectrum of a truncated representation as flat at its smallest kept eigenvalue
(the spectrum continuation of ALGORITHMS.md 1.5; no effect on a full eigendecomposition).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Iterable
from typing import Any, Generic, TypeVar

import torch
from torch import Tensor

import lowrank_nla as ln

__all__ = [
    "DAMPING_SCHEMES",
    "Schedule",
    "check_fraction",
    "check_int_at_least",
    "check_nonnegative",
    "check_positive",
    "factored_scheme",
    "kl_clip_scale",
    "precondition",
    "rms_clip",
]

DAMPING_SCHEMES: dict[str, dict[str, Any]] = {
    "eigenbasis": {"scheme": "eigenbasis"},
    "eigenbasis-relative": {"scheme": "eigenbasis", "relative": True},
    "factored": {"scheme": "factored"},
    "factored-relative": {"scheme": "factored", "relative": True},
    "pi": {"scheme": "factored", "pi_adjusted": True},
}

T = TypeVar("T")


def _real(value: Any, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"Invalid {name}: {value!r} (must be a real number)")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"Invalid {name}: {value} (must be finite)")
    return value


def check_positive(value: Any, name: str) -> float:
    """A finite real ``> 0``; ``ValueError("Invalid <name>: ...")`` otherwise."""
    value = _real(value, name)
    if value <= 0:
        raise ValueError(f"Invalid {name}: {value} (must be > 0)")
    return value


def check_nonnegative(value: Any, name: str) -> float:
    """A finite real ``>= 0``."""
    value = _real(value, name)
    if value < 0:
        raise ValueError(f"Invalid {name}: {value} (must be >= 0)")
    return value


def check_decay(value: Any, name: str) -> float:
    """An exponential-average decay in ``[0, 1)``."""
    value = _real(value, name)
    if not 0.0 <= value < 1.0:
        raise ValueError(f"Invalid {name}: {value} (must be in [0, 1))")
    return value


def check_fraction(value: Any, name: str) -> float:
    """A real in the open interval ``(0, 1)``."""
    value = _real(value, name)
    if not 0.0 < value < 1.0:
        raise ValueError(f"Invalid {name}: {value} (must be in (0, 1))")
    return value


def check_int_at_least(minimum: int) -> Callable[[Any, str], int]:
    """A checker for integers ``>= minimum``."""

    def check(value: Any, name: str) -> int:
        if isinstance(value, bool) or not isinstance(value, numbers.Integral):
            raise ValueError(f"Invalid {name}: {value!r} (must be an integer >= {minimum})")
        if value < minimum:
            raise ValueError(f"Invalid {name}: {value} (must be an integer >= {minimum})")
        return int(value)

    return check


class Schedule(Generic[T]):
    """A hyperparameter given as a constant or as ``callable(step) -> value``.

    A constant is validated once, here; a callable's value is validated at every call, so a
    schedule that returns a bad value fails with the argument's name and the step.
    """

    def __init__(self, value: Any, name: str, check: Callable[[Any, str], T]) -> None:
        self.name = name
        self._check = check
        self._fn: Callable[[int], Any] | None = None
        self._const: T | None = None
        if callable(value):
            self._fn = value
        else:
            self._const = check(value, name)

    def __call__(self, step: int) -> T:
        if self._fn is None:
            return self._const  # type: ignore[return-value]
        return self._check(self._fn(step), f"{self.name} (schedule at step {step})")


def factored_scheme(scheme: str) -> bool:
    """Whether ``scheme`` damps each factor separately (the factored application needs it)."""
    return DAMPING_SCHEMES[scheme]["scheme"] == "factored"


def precondition(
    G: ln.LowRankPSD,
    A: ln.LowRankPSD,
    grad: Tensor | tuple[Tensor, Tensor],
    *,
    damping: float,
    scheme: str,
    shift: tuple[float, float],
    continuation: bool = True,
) -> Tensor:
    """The damped K-FAC direction ``(G (x) A + damping)^-1 V`` of one layer (``d_G x d_A``).

    ``grad`` is the gradient matrix ``V``, or, for a Linear layer and a factored scheme, its
    rows ``(grad_outputs (N, d_G), inputs (N, d_A))`` with ``V = grad_outputs^T inputs``
    (:func:`lowrank_nla.kron_inverse_apply_factored`: the factors never touch ``V``).
    """
    options: dict[str, Any] = {"damping": damping, "shift": shift, "continuation": continuation}
    if isinstance(grad, tuple):
        grad_outputs, inputs = grad
        options.update((k, v) for k, v in DAMPING_SCHEMES[scheme].items() if k != "scheme")
        return ln.kron_inverse_apply_factored(G, A, grad_outputs.T, inputs.T, **options)
    return ln.kron_inverse_apply(G, A, grad, **options, **DAMPING_SCHEMES[scheme])


def rms_clip(V: Tensor, kappa: float) -> Tensor:
    """Scale ``V`` by ``min(1, kappa / RMS(V))``, ``RMS(V) = ||V||_F / sqrt(#V)``."""
    rms = float(torch.linalg.vector_norm(V)) / math.sqrt(V.numel())
    return V * (kappa / rms) if rms > kappa else V


def kl_clip_scale(terms: Iterable[tuple[Tensor, Tensor, float]], kappa: float) -> float:
    """Global KL clip ``nu = min(1, sqrt(kappa / |sum_l lr_l^2 <V_l, grad_l>|))``.

    ``terms`` are ``(direction, gradient, learning rate)`` per layer.
    """
    total = sum(lr * lr * float(torch.sum(V * g)) for V, g, lr in terms)
    if total == 0.0:
        return 1.0
    return min(1.0, math.sqrt(kappa / abs(total)))
