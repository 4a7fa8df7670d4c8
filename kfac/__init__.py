"""kfac: natural-gradient optimizers for PyTorch, built on ``lowrank_nla``.

- :class:`KFACPreconditioner` rewrites each ``nn.Linear``/``nn.Conv2d`` layer's ``.grad``
  into its K-FAC direction, so any ``torch.optim`` optimizer can step next;
  ``inverse=`` names an inverse strategy from a registry (:func:`inverse_names`).
- :class:`KFAC` is a ``torch.optim.Optimizer``: the preconditioner, then ``torch.optim.SGD``.
  Its defaults were chosen by measurement; :func:`preset` names them and the thesis'
  settings (``KFAC(model, lr, **kfac.preset("thesis"))``).
- :class:`MBF`, :class:`SOKLDWRM`, :class:`QKLDWRM` and :class:`QEKLDWRM` are the other
  methods' optimizers, from the same front. Every one of them can adapt its damping
  (:class:`AdaptiveDamping`) and choose its step from the exact quadratic model of the loss
  (``quadratic_step=True``).
- :class:`Preconditioner` and :class:`PreconditionedSGD` are the same fronts for any
  curvature method: a :class:`CurvatureBlock` registered with :func:`register_block`.

Importing ``kfac`` imports torch (it is a torch package) but not CuPy, matplotlib or
scikit-learn (the command line imports them when it needs them).
"""

from ._curvature import (
    CaptureSpec,
    CurvatureBlock,
    LayerBatch,
    Message,
    Tick,
    block_names,
    register_block,
)
from ._kron import inverse_names
from ._layers import Layer, register_layer
from ._quadratic import AdaptiveDamping
from ._schedule import InverseDecay
from .distributed import Distributed
from .fngd import FNGD, FNGDPreconditioner
from .kld_wrm import (
    QEKLDWRM,
    QKLDWRM,
    SOKLDWRM,
    QKLDWRMPreconditioner,
    SOKLDWRMPreconditioner,
)
from .mbf import MBF, MBFPreconditioner
from .optimizer import KFAC, PreconditionedSGD
from .preconditioner import KFACPreconditioner, Preconditioner
from .presets import preset
from .seng import SENG, SENGPreconditioner

__all__ = [
    "AdaptiveDamping",
    "CaptureSpec",
    "CurvatureBlock",
    "Distributed",
    "FNGD",
    "FNGDPreconditioner",
    "InverseDecay",
    "KFAC",
    "KFACPreconditioner",
    "Layer",
    "LayerBatch",
    "MBF",
    "MBFPreconditioner",
    "Message",
    "PreconditionedSGD",
    "Preconditioner",
    "QEKLDWRM",
    "QKLDWRM",
    "QKLDWRMPreconditioner",
    "SENG",
    "SENGPreconditioner",
    "SOKLDWRM",
    "SOKLDWRMPreconditioner",
    "Tick",
    "block_names",
    "inverse_names",
    "preset",
    "register_block",
    "register_layer",
]
