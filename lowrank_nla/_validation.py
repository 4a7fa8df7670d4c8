"""Argument checks shared by the entry points; every message names the argument in backticks."""

from __future__ import annotations

import math
import numbers
from typing import Any

import numpy as np

NORMALIZERS = ("qr", "cholqr2", "none")
METHODS = ("subspace", "block_krylov")

#: Largest accepted ``power_iters``. The sketch error of subspace iteration shrinks like
#: ``(sigma_{k+1} / sigma_k)^(2q)`` (HMT 2011, Corollary 10.10): past a hundred iterations
#: any gap that can help at all has long reached rounding, and a count like ``10**9`` (a
#: typo, or a misread parameter) would otherwise run for days.
MAX_POWER_ITERS = 100


def check_int(value: Any, name: str, *, minimum: int) -> int:
    """Return ``value`` as an int ``>= minimum`` or raise naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"`{name}` must be an integer, got {type(value).__name__}")
    value = int(value)
    if value < minimum:
        raise ValueError(f"`{name}` must be >= {minimum}, got {value}")
    return value


def check_power_iters(value: Any, name: str = "power_iters") -> int:
    """``0 <= power_iters <= MAX_POWER_ITERS``."""
    value = check_int(value, name, minimum=0)
    if value > MAX_POWER_ITERS:
        raise ValueError(
            f"`{name}` must be <= {MAX_POWER_ITERS}, got {value}: more power iterations never "
            "improve a sketch measurably (use a Krylov solver for spectra without a gap)"
        )
    return value


def check_bool(value: Any, name: str) -> bool:
    """A Python or NumPy bool (not merely a truthy value)."""
    if not isinstance(value, bool | np.bool_):
        raise TypeError(f"`{name}` must be a bool, got {type(value).__name__}")
    return bool(value)


def check_rank(rank: Any, shape: tuple[int, int], name: str = "rank") -> int:
    """``1 <= rank <= min(shape)``."""
    bound = min(shape)
    if isinstance(rank, numbers.Integral) and not isinstance(rank, bool) and int(rank) > bound:
        raise ValueError(f"`{name}` must be <= min(A.shape) = {bound}, got {int(rank)}")
    return check_int(rank, name, minimum=1)


def check_real(
    value: Any, name: str, *, minimum: float | None = None, strict: bool = False
) -> float:
    """Return ``value`` as a finite float (``> minimum`` if ``strict``, else ``>= minimum``)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"`{name}` must be a real number, got {type(value).__name__}")
    value = float(value)
    if minimum is None:
        if not math.isfinite(value):
            raise ValueError(f"`{name}` must be finite, got {value}")
        return value
    if not math.isfinite(value) or value < minimum or (strict and value == minimum):
        bound = f"> {minimum:g}" if strict else f">= {minimum:g}"
        raise ValueError(f"`{name}` must be finite and {bound}, got {value}")
    return value


def check_pair(value: Any, name: str, labels: tuple[str, str]) -> tuple[float, float]:
    """A pair of finite numbers ``>= 0`` (``(G, A)`` options such as shifts and tails)."""
    if isinstance(value, str) or not hasattr(value, "__len__") or len(value) != 2:
        raise TypeError(
            f"`{name}` must be a pair ({labels[0]}, {labels[1]}) of non-negative numbers, "
            f"got {value!r}"
        )
    return (
        check_real(value[0], f"{name}[0]", minimum=0.0),
        check_real(value[1], f"{name}[1]", minimum=0.0),
    )


def check_decay(decay: Any) -> float:
    """An exponential-average decay ``rho`` in ``[0, 1)``."""
    value = check_real(decay, "decay")
    if not 0.0 <= value < 1.0:
        raise ValueError(f"`decay` must be in [0, 1), got {value}")
    return value


def check_normalizer(normalizer: Any) -> str:
    if normalizer not in NORMALIZERS:
        raise ValueError(f"`normalizer` must be one of {NORMALIZERS}, got {normalizer!r}")
    return str(normalizer)


def check_method(method: Any, normalizer: str) -> str:
    """``method`` in :data:`METHODS`; block Krylov needs an orthonormalizing ``normalizer``."""
    if method not in METHODS:
        raise ValueError(f"`method` must be one of {METHODS}, got {method!r}")
    if method == "block_krylov" and normalizer == "none":
        raise ValueError(
            "`normalizer` must be 'qr' or 'cholqr2' with method='block_krylov' (its basis "
            "blocks are orthogonalized against each other), got 'none'"
        )
    return str(method)


def check_block_size(
    block_size: Any, method: str, rank: int, power_iters: int, shape: tuple[int, int]
) -> int | None:
    """``block_size`` of block Krylov: ``None``, or an int whose basis can hold ``rank``.

    The basis has ``min(block_size * (power_iters + 1), min(shape))`` columns, which must be
    at least ``rank``.
    """
    if block_size is None:
        return None
    if method != "block_krylov":
        raise ValueError(
            f"`block_size` applies to method='block_krylov' only, got method={method!r}"
        )
    block_size = check_rank(block_size, shape, "block_size")
    basis = min(block_size * (power_iters + 1), min(shape))
    if basis < rank:
        raise ValueError(
            f"`block_size` * (power_iters + 1) = {block_size * (power_iters + 1)} must be "
            f">= rank = {rank} (the Krylov basis must hold the rank-{rank} approximation)"
        )
    return block_size


def check_square(shape: tuple[int, int], name: str = "A") -> int:
    if shape[0] != shape[1]:
        raise ValueError(f"`{name}` must be square for a symmetric routine, got shape {shape}")
    return shape[0]
