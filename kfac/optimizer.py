"""``KFAC``: a ``torch.optim.Optimizer`` over :class:`KFACPreconditioner`."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from ._damping import check_nonnegative
from .preconditioner import KFACPreconditioner

__all__ = ["KFAC"]


class KFAC(torch.optim.Optimizer):
    """K-FAC as a ``torch.optim.Optimizer``: precondition, then heavy-ball SGD.

    Each :meth:`step` runs the closure (if any), preconditions the gradients of the model's
    ``nn.Linear``/``nn.Conv2d`` layers (:class:`KFACPreconditioner`), then updates every
    parameter, preconditioned or not (BatchNorm, LayerNorm, embeddings, ...), with
    ``v = grad + weight_decay * p``, ``b = momentum * b + v`` (``b = v`` the first time) and
    ``p -= lr * b``: ``torch.optim.SGD`` without dampening applied to the preconditioned
    gradient, so weight decay is not preconditioned (ALGORITHMS.md 1.6).

    Parameters
    ----------
    model : nn.Module
        The model whose layers are preconditioned.
    lr : float
        Learning rate (``>= 0``).
    momentum : float, default 0
        Heavy-ball momentum (``>= 0``).
    weight_decay : float, default 0
        L2 penalty added to the preconditioned direction (``>= 0``).
    inverse : str, default "eigh"
        Inverse strategy (registry name).
    params : iterable of parameters or dicts, optional
        Parameter groups as for any ``torch.optim`` optimizer (default: the model's trainable
        parameters). Per-group ``lr`` is used by the KL clip of each layer.
    **kwargs
        Passed to :class:`KFACPreconditioner` (``factor_decay``, ``damping``,
        ``damping_scheme``, ``factor_every``, ``inverse_every``, ``kl_clip``, ``rms_clip``,
        ``skip_layers``, ``fisher``, ``loss``, ``factor_dtype``, ``decomposition_dtype``,
        ``grad_scaler``, ``seed`` and the inverse strategy's options).

    Notes
    -----
    ``state_dict()`` holds the torch.optim state (momentum buffers, param groups) and, under
    the key ``"kfac"``, the preconditioner's state (step, factors, inverse representations,
    Monte-Carlo sampler), so a saved run continues identically after ``load_state_dict``.
    A step whose gradients contain NaN/Inf changes nothing (parameters, momentum, factors,
    step count) and warns, unless a ``GradScaler`` owns the step.

    Examples
    --------
    >>> import torch
    >>> from torch import nn
    >>> import kfac
    >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
    <torch._C.Generator object at ...>
    >>> model = nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 1))
    >>> x, y = torch.randn(64, 4), torch.randn(64, 1)
    >>> opt = kfac.KFAC(model, lr=0.1, factor_every=1, inverse_every=5)
    >>> def closure():
    ...     opt.zero_grad()
    ...     loss = nn.functional.mse_loss(model(x), y)
    ...     loss.backward()
    ...     return loss
    >>> first = opt.step(closure).item()
    >>> for _ in range(20):
    ...     last = opt.step(closure).item()
    >>> last < first
    True
    """

    def __init__(
        self,
        model: nn.Module,
        lr: float,
        *,
        momentum: float = 0.0,
        weight_decay: float = 0.0,
        inverse: str = "eigh",
        params: Iterable[Any] | None = None,
        **kwargs: Any,
    ) -> None:
        lr = check_nonnegative(lr, "learning rate")
        momentum = check_nonnegative(momentum, "momentum")
        weight_decay = check_nonnegative(weight_decay, "weight_decay")
        if params is None:
            params = [p for p in model.parameters() if p.requires_grad]
        defaults = {"lr": lr, "momentum": momentum, "weight_decay": weight_decay}
        super().__init__(params, defaults)
        self.preconditioner = KFACPreconditioner(model, inverse=inverse, **kwargs)
        owned = {id(p) for group in self.param_groups for p in group["params"]}
        for name in self.preconditioner.layer_names:
            layer = self.preconditioner._states[name].layer
            if any(id(p) not in owned for p in layer.params):
                raise ValueError(
                    f"Invalid params: layer '{name}' is preconditioned but its parameters are "
                    "not in `params` (skip it with `skip_layers`)"
                )

    def _group_lrs(self) -> dict[torch.Tensor, float]:
        return {p: float(group["lr"]) for group in self.param_groups for p in group["params"]}

    def _grads_finite(self) -> bool:
        return all(
            bool(torch.isfinite(p.grad).all())
            for group in self.param_groups
            for p in group["params"]
            if p.grad is not None
        )

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """Precondition and update; returns the closure's loss (``None`` without a closure)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if not self._grads_finite():
            scaler = self.preconditioner.grad_scaler
            if scaler is None or not scaler.is_enabled():
                warnings.warn(
                    "KFAC.step: non-finite gradient; step skipped (parameters, momentum and "
                    "factors unchanged)",
                    RuntimeWarning,
                    stacklevel=2,
                )
            self.preconditioner._capture.reset()
            return loss
        self.preconditioner.step(lr=self._group_lrs())
        for group in self.param_groups:
            lr, momentum, weight_decay = group["lr"], group["momentum"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                d = p.grad
                if weight_decay != 0:
                    d = d.add(p, alpha=weight_decay)
                if momentum != 0:
                    state = self.state[p]
                    buf = state.get("momentum_buffer")
                    if buf is None:
                        buf = state["momentum_buffer"] = torch.clone(d).detach()
                    else:
                        buf.mul_(momentum).add_(d)
                    d = buf
                p.add_(d, alpha=-lr)
        return loss

    def state_dict(self) -> dict[str, Any]:
        """torch.optim state plus the preconditioner's under ``"kfac"``."""
        state = super().state_dict()
        state["kfac"] = self.preconditioner.state_dict()
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Inverse of :meth:`state_dict`; raises ``ValueError`` without the ``"kfac"`` entry."""
        state_dict = dict(state_dict)
        if "kfac" not in state_dict:
            raise ValueError("state_dict has no 'kfac' entry: it was not saved by KFAC")
        kfac_state = state_dict.pop("kfac")
        self.preconditioner.check_state_dict(kfac_state)  # before anything changes
        super().load_state_dict(state_dict)
        self.preconditioner.load_state_dict(kfac_state)
