"""Optimizers: a preconditioner followed by ``torch.optim.SGD``'s own update.

:class:`PreconditionedSGD` is the one front every method's optimizer comes from: a
``torch.optim.SGD`` whose ``step`` first rewrites the gradients with a :class:`Preconditioner`.
A method's optimizer is a preset of it (:class:`KFAC` sets the K-FAC preconditioner).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Mapping
from typing import Any, ClassVar

import torch
from torch import nn

from ._schedule import check_nonnegative
from .preconditioner import KFACPreconditioner, Preconditioner

__all__ = ["KFAC", "PreconditionedSGD"]


def unhooked(step: Callable[..., Any]) -> Callable[..., Any]:
    """An optimizer class's ``step`` without the hook runner torch wraps it with (it does so
    for the first instance of each class): called from inside another ``step``, whose hooks
    already ran, the hooks must not run twice."""
    if getattr(step, "hooked", False):
        return step.__wrapped__  # type: ignore[attr-defined]
    return step


def _sgd_update(optimizer: torch.optim.SGD) -> None:
    """``torch.optim.SGD.step`` without its step hooks (:func:`unhooked`)."""
    unhooked(torch.optim.SGD.step)(optimizer)


class PreconditionedSGD(torch.optim.SGD):
    """A preconditioner, then ``torch.optim.SGD`` (no dampening, no Nesterov).

    Each :meth:`step` runs the closure (if any), checks once that every gradient is finite
    (else the whole step is skipped with a warning: parameters, momentum buffers and the
    preconditioner's state and step count are unchanged, unless a ``GradScaler`` owns the
    step), preconditions the registered layers' gradients, then applies torch's SGD update
    to every parameter, preconditioned or not: ``v = grad + weight_decay * p``,
    ``b = momentum * b + v`` (``b = v`` the first time), ``p -= lr * b``. Weight decay is
    therefore not preconditioned.

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
    params : iterable of parameters or dicts, optional
        Parameter groups as for any ``torch.optim`` optimizer (default: the model's trainable
        parameters). Per-group ``lr`` is used by the KL clip of each layer.
    **kwargs
        Passed to the preconditioner class (:attr:`preconditioner_class`; for the generic
        front, :class:`Preconditioner` with ``block=`` a registered name or a block).

    Notes
    -----
    ``state_dict()`` holds the torch.optim state (momentum buffers, param groups) and, under
    the key ``"kfac"``, the preconditioner's state, so a saved run continues identically
    after ``load_state_dict``.
    """

    #: The preconditioner a preset builds.
    preconditioner_class: ClassVar[type[Preconditioner]] = Preconditioner

    def __init__(
        self,
        model: nn.Module,
        lr: float,
        *,
        momentum: float = 0.0,
        weight_decay: float = 0.0,
        params: Iterable[Any] | None = None,
        **kwargs: Any,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(
                f"{type(self).__name__} takes the model (an nn.Module), not its parameters: "
                f"got {type(model).__name__}. The preconditioner hooks the model's layers; "
                f"write {type(self).__name__}(model, lr=...) and pass parameter groups, if "
                "any, as params=..."
            )
        lr = check_nonnegative(lr, "learning rate")
        momentum = check_nonnegative(momentum, "momentum")
        weight_decay = check_nonnegative(weight_decay, "weight_decay")
        if params is None:
            params = [p for p in model.parameters() if p.requires_grad]
        super().__init__(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
        self.preconditioner = self.preconditioner_class(model, **kwargs)
        owned = {id(p) for group in self.param_groups for p in group["params"]}
        for name in self.preconditioner.layer_names:
            if any(id(p) not in owned for p in self.preconditioner.layer(name).params):
                raise ValueError(
                    f"Invalid params: layer '{name}' is preconditioned but its parameters are "
                    "not in `params` (skip it with `skip_layers`)"
                )

    def _group_lrs(self) -> dict[torch.Tensor, float]:
        return {p: float(group["lr"]) for group in self.param_groups for p in group["params"]}

    def _grads_finite(self) -> bool:
        """One fused check of every gradient: the step's only read from the device."""
        flags = [
            torch.isfinite(p.grad).all()
            for group in self.param_groups
            for p in group["params"]
            if p.grad is not None
        ]
        finite = torch.stack([f.to(flags[0].device) for f in flags]).all() if flags else None
        runtime = self.preconditioner.engine.dist
        if runtime is not None:  # skipped on every process when non-finite on one
            finite = runtime.agree(torch.ones(1) if finite is None else finite.reshape(1))
        return True if finite is None else bool(finite.all())

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
                    f"{type(self).__name__}.step: non-finite gradient; step skipped "
                    "(parameters, momentum and factors unchanged)",
                    RuntimeWarning,
                    stacklevel=2,
                )
            self.preconditioner.skip()
            return loss
        self.preconditioner.step(lr=self._group_lrs())
        _sgd_update(self)
        return loss

    def state_dict(self) -> dict[str, Any]:
        """torch.optim state plus the preconditioner's under ``"kfac"``."""
        state = super().state_dict()
        state["kfac"] = self.preconditioner.state_dict()
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Inverse of :meth:`state_dict`. Everything is validated before anything changes:
        a checkpoint of another model or method, or a corrupted one (missing or mistyped
        entries, wrong shapes, non-finite values, negative eigenvalues, invalid generator
        states, momentum buffers of the wrong shape) raises ``ValueError`` and leaves the
        optimizer as it was."""
        state_dict = dict(state_dict)
        if "kfac" not in state_dict:
            raise ValueError("state_dict has no 'kfac' entry: it was not saved by this optimizer")
        kfac_state = state_dict.pop("kfac")
        install = self.preconditioner._prepare_load(kfac_state)
        self._check_torch_state(state_dict)
        super().load_state_dict(state_dict)
        install()

    def _check_torch_state(self, state_dict: Mapping[str, Any]) -> None:
        """What ``torch.optim`` does not check before loading: the groups' sizes, and each
        momentum buffer's shape and finiteness (a wrong one would load and fail, or poison
        the parameters, steps later)."""
        groups, state = state_dict.get("param_groups"), state_dict.get("state")
        if not isinstance(groups, list) or not isinstance(state, Mapping):
            raise ValueError("state_dict must hold 'param_groups' (a list) and 'state'")
        if len(groups) != len(self.param_groups) or any(
            not isinstance(g, Mapping) or len(g.get("params", ())) != len(own["params"])
            for g, own in zip(groups, self.param_groups, strict=False)
        ):
            raise ValueError("state_dict param_groups do not match this optimizer's groups")
        params = {
            saved_id: p
            for g, own in zip(groups, self.param_groups, strict=True)
            for saved_id, p in zip(g["params"], own["params"], strict=True)
        }
        for key, entry in state.items():
            if key not in params or not isinstance(entry, Mapping):
                raise ValueError(f"state_dict state entry {key!r} matches no parameter")
            buffer = entry.get("momentum_buffer")
            if buffer is None:
                continue
            p = params[key]
            if not isinstance(buffer, torch.Tensor) or buffer.shape != p.shape:
                shape = tuple(buffer.shape) if isinstance(buffer, torch.Tensor) else buffer
                raise ValueError(
                    f"state_dict momentum buffer of parameter {key} has shape {shape}, "
                    f"expected {tuple(p.shape)}"
                )
            if not bool(torch.isfinite(buffer).all()):
                raise ValueError(f"state_dict momentum buffer of parameter {key} is not finite")


class KFAC(PreconditionedSGD):
    """K-FAC as a ``torch.optim.Optimizer``: :class:`KFACPreconditioner`, then torch's SGD.

    See :class:`PreconditionedSGD` for the step (one finiteness check, preconditioning,
    ``torch.optim.SGD`` without dampening on the preconditioned gradient; weight decay is not
    preconditioned).

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
        Parameter groups (default: the model's trainable parameters).
    **kwargs
        Passed to :class:`KFACPreconditioner` (``factor_decay``, ``damping``,
        ``damping_scheme``, ``factor_every``, ``inverse_every``, ``kl_clip``, ``rms_clip``,
        ``skip_layers``, ``fisher``, ``loss``, ``factor_dtype``, ``decomposition_dtype``,
        ``grad_scaler``, ``seed``, ``distributed`` and the inverse strategy's options).

    Notes
    -----
    ``state_dict()`` holds the torch.optim state (momentum buffers, param groups) and, under
    the key ``"kfac"``, the preconditioner's state (step, factors, inverse representations,
    Monte-Carlo sampler), so a saved run continues identically after ``load_state_dict``.
    A step whose gradients contain NaN/Inf changes nothing (parameters, momentum, factors,
    step count) and warns, unless a ``GradScaler`` owns the step; distributed
    (``distributed=``, docs/guide/distributed.md), every process skips it when one process's
    gradients are non-finite.

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

    preconditioner_class: ClassVar[type[Preconditioner]] = KFACPreconditioner
    preconditioner: KFACPreconditioner

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
        super().__init__(
            model,
            lr,
            momentum=momentum,
            weight_decay=weight_decay,
            params=params,
            inverse=inverse,
            **kwargs,
        )
