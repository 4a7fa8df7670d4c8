"""Hyperparameter validation and schedules: every value a constant or ``callable(step)``.

Messages follow ``torch.optim``: ``ValueError("Invalid damping: 0.0 (must be > 0)")``.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

__all__ = [
    "InverseDecay",
    "Schedule",
    "check_bool",
    "check_decay",
    "check_fraction",
    "check_int_at_least",
    "check_integer",
    "check_nonnegative",
    "check_positive",
    "optional_schedule",
]

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


def check_integer(value: Any, name: str) -> int:
    """An integer of any sign (a seed); ``ValueError("Invalid <name>: ...")`` otherwise (a
    float or a string is not silently truncated or parsed)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"Invalid {name}: {value!r} (must be an integer)")
    return int(value)


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


@dataclass(frozen=True)
class InverseDecay:
    """A hyperparameter that decays as an inverse power of the step:
    ``start / (1 + step / scale) ** power``.

    The value halves (``power=1``) or quarters (``power=2``) after ``scale`` steps and keeps
    falling without an end, so the schedule needs no run length. ``KFAC``'s default KL clip
    is ``InverseDecay(1e-3, scale=..., power=...)`` (docs/kfac.md, *Defaults, by
    measurement*); any option that takes a ``callable(step)`` takes one. It is a frozen value
    of the step alone: it pickles, compares by value, and a checkpoint resumes it exactly,
    since the optimizer's ``state_dict`` holds the step.

    Parameters
    ----------
    start : float
        The value at step 0 (``> 0``).
    scale : float
        The number of steps ``T`` over which ``1 + step / T`` doubles (``> 0``).
    power : float, default 1
        The exponent ``p`` (``> 0``).

    Raises
    ------
    ValueError
        A non-finite, non-real or non-positive ``start``, ``scale`` or ``power``.

    Examples
    --------
    >>> import kfac
    >>> clip = kfac.InverseDecay(1e-3, scale=100, power=2)
    >>> clip
    InverseDecay(start=0.001, scale=100.0, power=2.0)
    >>> clip(0), clip(100), clip(300)
    (0.001, 0.00025, 6.25e-05)
    """

    start: float
    scale: float
    power: float = 1.0

    def __post_init__(self) -> None:
        for name in ("start", "scale", "power"):
            object.__setattr__(self, name, check_positive(getattr(self, name), name))

    def __call__(self, step: int) -> float:
        return self.start / (1.0 + step / self.scale) ** self.power


def check_bool(value: Any, name: str) -> bool:
    """A ``bool`` (``1`` and ``0`` are rejected: they are usually a typo for another option)."""
    if not isinstance(value, bool):
        raise ValueError(f"Invalid {name}: {value!r} (must be a bool)")
    return value


def optional_schedule(
    value: Any, name: str, check: Callable[[Any, str], float] = check_positive
) -> Schedule[float] | None:
    """``None`` or a :class:`Schedule` of ``value``."""
    return None if value is None else Schedule(value, name, check)


def find_stacklevel() -> int:
    """The ``stacklevel`` that makes a warning point at the first frame outside ``kfac``
    (the user's line that built or stepped the optimizer)."""
    import inspect
    import os

    package = os.path.dirname(os.path.abspath(__file__))
    frame = inspect.currentframe()
    level = 0
    while (
        frame is not None and os.path.dirname(os.path.abspath(frame.f_code.co_filename)) == package
    ):
        frame = frame.f_back
        level += 1
    return level
