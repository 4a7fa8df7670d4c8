"""Rank selection: the truncation ratio and the RSVD/Brand rank controllers.

The rules are those of Puiu's thesis and papers (arXiv:2206.15397, arXiv:2210.08494); see the
algorithm reference, docs/algorithms.md, section 'Rank selection'.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np

from ._backend import fp_guarded, host_values
from ._validation import check_int, check_real

__all__ = ["RankController", "RankState", "truncation_ratio"]


@fp_guarded
def truncation_ratio(d: Any) -> float:
    """``min(d) / max(d)`` of retained eigenvalues: the proxy for ``lambda_{r+1} / lambda_1``.

    Parameters
    ----------
    d : array_like, shape (k,)
        Retained eigenvalues (any order, any library; read on the host), ``k >= 1``.

    Returns
    -------
    float
        The ratio in ``[0, 1]``; ``0.0`` when all eigenvalues are zero (nothing to resolve).

    Raises
    ------
    ValueError
        Empty, negative or non-finite ``d``; a ``d`` of two or more dimensions.
    TypeError
        Non-numeric ``d``, masked arrays, ``numpy.matrix``, meta tensors.

    Notes
    -----
    After a rank-``r`` decomposition, ``d_min / d_max ~ lambda_r / lambda_1`` bounds the
    relative spectral truncation error ``lambda_{r+1} / lambda_1`` from above; the rank
    controllers steer it toward a target (thesis default 0.033).

    Examples
    --------
    >>> import numpy as np
    >>> import lowrank_nla as ln
    >>> ln.truncation_ratio(np.array([4.0, 2.0, 1.0]))
    0.25
    """
    v = host_values(d, "d")
    if v.size == 0:
        raise ValueError("`d` must hold at least one eigenvalue")
    if not np.all(np.isfinite(v)) or np.any(v < 0):
        raise ValueError("`d` must be finite and non-negative")
    top = float(v.max())
    return 0.0 if top == 0.0 else float(v.min()) / top


class RankState(NamedTuple):
    """State of a :class:`RankController`: current rank, recent errors, observations."""

    rank: int
    errors: tuple[float, ...]
    observations: int


def _check_rank_state(state: Any) -> None:
    """A :class:`RankState` whose fields have the types and ranges :meth:`update` needs."""
    if not isinstance(state, RankState):
        raise TypeError(f"`state` must be a RankState, got {type(state).__name__}")
    check_int(state.rank, "state.rank", minimum=1)
    check_int(state.observations, "state.observations", minimum=0)
    if not isinstance(state.errors, tuple):
        raise TypeError(f"`state.errors` must be a tuple, got {type(state.errors).__name__}")
    for i, e in enumerate(state.errors):
        check_real(e, f"state.errors[{i}]", minimum=0.0)


@dataclass(frozen=True)
class RankController:
    """Adaptive rank rule: step the rank toward a target truncation ratio.

    Every ``every`` observations the mean ``e`` of the last ``every`` truncation ratios is
    compared with the target: ``e < target - lower_margin`` (more accurate than needed)
    lowers the rank by ``decrease_step`` down to ``floor``; ``e > target + upper_margin``
    raises it by ``increase_step`` up to ``cap``; otherwise it stays. The state is an
    explicit :class:`RankState` value, updated by :meth:`update`.

    Parameters
    ----------
    target : float, default 0.033
    lower_margin, upper_margin : float
    decrease_step, increase_step : int
    floor, cap : int
    every : int, default 1
        Observations between re-evaluations (``K`` of the thesis' rank rule).
    history : int, default 30
        Errors kept in the state.

    Notes
    -----
    :meth:`rsvd` and :meth:`brand` give the thesis rules (see the algorithm reference,
    docs/algorithms.md, section 'Rank selection'): RSVD
    ranks move by 10 with margins 0.007 below / 0.02 above and floor 10, cap
    ``min(700, D)``; Brand ranks decrease by 5 (margin 0.02, floor 70) and increase by 10
    (margin 0.015, cap 500): cautious decreases, because information a truncation drops
    only slowly re-enters an online update.

    Examples
    --------
    >>> import lowrank_nla as ln
    >>> ctrl = ln.RankController.rsvd(dim=1000)
    >>> state = ctrl.init(220)
    >>> ctrl.update(state, 0.01).rank  # far more accurate than the target 0.033
    210
    >>> ctrl.update(state, 0.08).rank  # far less accurate
    230
    """

    target: float = 0.033
    lower_margin: float = 0.007
    upper_margin: float = 0.02
    decrease_step: int = 10
    increase_step: int = 10
    floor: int = 10
    cap: int = 700
    every: int = 1
    history: int = 30

    def __post_init__(self) -> None:
        for name in ("target", "lower_margin", "upper_margin"):
            check_real(getattr(self, name), name, minimum=0.0)
        for name in ("decrease_step", "increase_step"):
            check_int(getattr(self, name), name, minimum=0)
        for name in ("floor", "every", "history"):
            check_int(getattr(self, name), name, minimum=1)
        check_int(self.cap, "cap", minimum=self.floor)

    @classmethod
    def rsvd(cls, dim: int, *, every: int = 1, target: float = 0.033) -> RankController:
        """The thesis rule for randomized-decomposition ranks (docs/algorithms.md, 'Rank
        selection')."""
        dim = check_int(dim, "dim", minimum=1)
        return cls(target, 0.007, 0.02, 10, 10, min(10, dim), min(700, dim), every)

    @classmethod
    def brand(
        cls, *, every: int = 1, target: float = 0.033, cap: int = 500, floor: int = 70
    ) -> RankController:
        """The thesis rule for Brand ranks (docs/algorithms.md, 'Rank selection'); ``floor``
        must be <= ``cap``."""
        return cls(target, 0.02, 0.015, 5, 10, floor, cap, every)

    def init(self, rank: int) -> RankState:
        """Initial state at ``rank`` (clipped into ``[floor, cap]``)."""
        rank = check_int(rank, "rank", minimum=1)
        return RankState(min(max(rank, self.floor), self.cap), (), 0)

    def update(self, state: RankState, error: float) -> RankState:
        """Record one truncation ratio; re-evaluate the rank every ``every`` observations.

        ``error`` is a truncation ratio (:func:`truncation_ratio`): a finite number
        ``>= 0``, else ``ValueError``; ``state`` must be a :class:`RankState` with an
        integer ``rank >= 1``, a tuple of finite ``errors >= 0`` and an integer
        ``observations >= 0`` (a state restored from a checkpoint is checked here).
        """
        _check_rank_state(state)
        error = check_real(error, "error", minimum=0.0)
        errors = (*state.errors, error)[-self.history :]
        count = state.observations + 1
        rank = state.rank
        if count % self.every == 0:
            mean = sum(errors[-self.every :]) / min(self.every, len(errors))
            if mean < self.target - self.lower_margin:
                rank = max(rank - self.decrease_step, self.floor)
            elif mean > self.target + self.upper_margin:
                rank = min(rank + self.increase_step, self.cap)
        return RankState(rank, errors, count)
