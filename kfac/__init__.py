"""kfac: K-FAC natural-gradient optimizers for PyTorch, built on ``lowrank_nla``.

- :class:`KFACPreconditioner` rewrites each ``nn.Linear``/``nn.Conv2d`` layer's ``.grad``
  into its K-FAC direction, so any ``torch.optim`` optimizer can step next.
- :class:`KFAC` is a ``torch.optim.Optimizer``: the preconditioner followed by heavy-ball SGD.
- ``inverse=`` names an inverse strategy from a registry (:func:`inverse_names`).

Importing ``kfac`` imports torch (it is a torch package) but not CuPy, matplotlib or
scikit-learn (the command line imports them when it needs them).
"""

from ._inverse import inverse_names
from .optimizer import KFAC
from .preconditioner import KFACPreconditioner

__all__ = ["KFAC", "KFACPreconditioner", "inverse_names"]
