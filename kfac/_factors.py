"""How a Kronecker factor is stored: dense exponential average, Brand low-rank state, or both.

The conceptual initialisation ``X_0 = I`` is not stored (ALGORITHMS.md 1.3). The first update
sets ``X = (1 - rho) X_inst``; after ``m`` updates the identity's weight is ``prod rho_j``
(``rho^m`` for a constant decay), carried in :attr:`Factor.identity` and added to the
damping. Keeping ``I`` out of the matrix keeps it positive semidefinite with the fast
spectral decay the low-rank inverses exploit.

An inverse strategy (``kfac._inverse``) decides which parts a factor keeps: ``matrix`` (the
dense ``D x D`` EA, quadratic memory) and/or ``online`` (a Brand-updated
:class:`lowrank_nla.LowRankPSD`, linear memory), and refreshes ``rep``, the representation
the preconditioner applies.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

import lowrank_nla as ln

__all__ = ["Factor", "FactorStats"]


@dataclass
class FactorStats:
    """Instantaneous statistics of one factor: ``X_inst`` itself, or a block ``B`` (``D x N``)
    with ``X_inst = B B^T`` (kept for Linear layers when a strategy updates online)."""

    matrix: Tensor | None = None
    block: Tensor | None = None

    def dense(self) -> Tensor:
        """``X_inst`` as a symmetric ``D x D`` matrix."""
        if self.matrix is not None:
            return self.matrix
        assert self.block is not None
        M = self.block @ self.block.T
        return (M + M.T) / 2

    def finite(self) -> bool:
        t = self.matrix if self.matrix is not None else self.block
        return bool(torch.isfinite(t).all()) if t is not None else False


def _rep_state(rep: ln.LowRankPSD | None) -> list[Tensor] | None:
    return None if rep is None else [rep.U.clone(), rep.d.clone()]


def _load_rep(value: Any, device: torch.device) -> ln.LowRankPSD | None:
    if value is None:
        return None
    U, d = (t.detach().clone().to(device) for t in value)
    return ln.LowRankPSD(U, d)


class Factor:
    """State of one Kronecker factor (``A`` or ``G`` of one layer).

    Attributes
    ----------
    dim : int
        Dimension ``D``.
    matrix : Tensor or None
        Dense ``D x D`` exponential average (``None`` when the strategy keeps none).
    online : LowRankPSD or None
        Brand-updated low-rank exponential average (online strategies).
    updates : int
        Number of EA updates ``m``.
    identity : float
        Weight of the identity initialisation, ``prod_j rho_j`` (1 before any update).
    rep : LowRankPSD or None
        The representation the preconditioner applies, and ``rep_identity`` the identity
        weight it was made with.
    brand : bool or None
        Whether the factor is Brand-tracked (decided at its first update; ``None`` before).
    rank : RankState or None
        Adaptive-rank state (current target rank and recent truncation ratios).
    drift : float
        Running ``brand_drift_bound`` of the online state (0 when nothing was dropped).
    batches : int
        Statistics batches offered to the online state (Brand updates use every
        ``brand_every``-th).
    """

    def __init__(self, dim: int) -> None:
        self.dim = dim
        self.matrix: Tensor | None = None
        self.online: ln.LowRankPSD | None = None
        self.updates = 0
        self.identity = 1.0
        self.rep: ln.LowRankPSD | None = None
        self.rep_identity = 0.0
        self.brand: bool | None = None
        self.rank: ln.RankState | None = None
        self.drift = 0.0
        self.batches = 0

    def update_dense(self, inst: Tensor, decay: float) -> None:
        """``X <- decay X + (1 - decay) X_inst`` (``(1 - decay) X_inst`` the first time)."""
        if self.matrix is None:
            self.matrix = (1.0 - decay) * inst
        else:
            self.matrix.mul_(decay).add_(inst, alpha=1.0 - decay)

    def count_update(self, decay: float) -> None:
        """Record one EA update: ``m += 1`` and the identity weight decays."""
        self.updates += 1
        self.identity *= decay

    def set_rep(self, rep: ln.LowRankPSD, dtype: torch.dtype) -> None:
        self.rep = ln.LowRankPSD(rep.U.to(dtype), rep.d.to(dtype))
        self.rep_identity = self.identity

    def memory(self) -> int:
        """Bytes held by the factor's tensors (dense EA, online state, representation)."""
        tensors = [self.matrix]
        for rep in (self.online, self.rep):
            if rep is not None:
                tensors += [rep.U, rep.d]
        return sum(t.numel() * t.element_size() for t in tensors if t is not None)

    def state_dict(self) -> dict[str, Any]:
        return {
            "matrix": None if self.matrix is None else self.matrix.clone(),
            "online": _rep_state(self.online),
            "rep": _rep_state(self.rep),
            "updates": self.updates,
            "identity": self.identity,
            "rep_identity": self.rep_identity,
            "brand": self.brand,
            "rank": None
            if self.rank is None
            else (self.rank.rank, list(self.rank.errors), self.rank.observations),
            "drift": self.drift,
            "batches": self.batches,
        }

    def check_state_dict(self, state: dict[str, Any], where: str) -> None:
        matrix = state["matrix"]
        if matrix is not None and tuple(matrix.shape) != (self.dim, self.dim):
            raise ValueError(
                f"state_dict factor {where} has shape {tuple(matrix.shape)}, expected "
                f"({self.dim}, {self.dim})"
            )
        for key in ("online", "rep"):
            value = state[key]
            if value is not None and value[0].shape[0] != self.dim:
                raise ValueError(
                    f"state_dict {key} representation of factor {where} has dimension "
                    f"{value[0].shape[0]}, expected {self.dim}"
                )

    def load_state_dict(self, state: dict[str, Any], *, device: torch.device) -> None:
        matrix = state["matrix"]
        self.matrix = None if matrix is None else matrix.detach().clone().to(device)
        self.online = _load_rep(state["online"], device)
        self.rep = _load_rep(state["rep"], device)
        self.updates = int(state["updates"])
        self.identity = float(state["identity"])
        self.rep_identity = float(state["rep_identity"])
        self.brand = state["brand"]
        rank = state["rank"]
        self.rank = (
            None if rank is None else ln.RankState(int(rank[0]), tuple(rank[1]), int(rank[2]))
        )
        self.drift = float(state["drift"])
        self.batches = int(state["batches"])
