"""How a Kronecker factor is stored: the dense exponential average (ALGORITHMS.md 1.3).

The conceptual initialisation ``X_0 = I`` is not stored. The first update sets
``X = (1 - rho) X_inst``; after ``m`` updates the identity's weight is ``prod rho_j`` (``rho^m``
for a constant decay), carried in :attr:`DenseFactor.identity` and added to the damping.
Keeping ``I`` out of the matrix keeps it positive semidefinite with the fast spectral decay
the low-rank inverses exploit.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

__all__ = ["DenseFactor"]


class DenseFactor:
    """Dense exponential average of one K-factor.

    Attributes
    ----------
    matrix : Tensor or None
        ``D x D`` EA matrix (``None`` before the first update).
    updates : int
        Number of EA updates ``m``.
    identity : float
        Weight of the identity initialisation, ``prod_j rho_j`` over the updates (1 before any).
    """

    def __init__(self, dim: int) -> None:
        self.dim = dim
        self.matrix: Tensor | None = None
        self.updates = 0
        self.identity = 1.0

    def update(self, inst: Tensor, decay: float) -> None:
        """``X <- decay X + (1 - decay) X_inst`` (``X <- (1 - decay) X_inst`` the first time)."""
        if self.matrix is None:
            self.matrix = (1.0 - decay) * inst
        else:
            self.matrix.mul_(decay).add_(inst, alpha=1.0 - decay)
        self.updates += 1
        self.identity *= decay

    def state_dict(self) -> dict[str, Any]:
        matrix = None if self.matrix is None else self.matrix.clone()
        return {"matrix": matrix, "updates": self.updates, "identity": self.identity}

    def load_state_dict(self, state: dict[str, Any], *, device: torch.device) -> None:
        matrix = state["matrix"]
        self.matrix = None if matrix is None else matrix.detach().clone().to(device)
        self.updates = int(state["updates"])
        self.identity = float(state["identity"])
