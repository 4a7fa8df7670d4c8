"""Optimizers: a preconditioner followed by ``torch.optim.SGD``'s own update.

:class:`PreconditionedSGD` is the one front every method's optimizer comes from: a
``torch.optim.SGD`` whose ``step`` first rewrites the gradients with a :class:`Preconditioner`.
A method's optimizer is a preset of it (:class:`KFAC` sets the K-FAC preconditioner).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable, Mapping
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from ._curvature import CurvatureBlock, all_finite
from ._quadratic import AdaptiveDamping, QuadraticModel, named_params, solve_step
from ._schedule import check_bool, check_int_at_least, check_nonnegative, check_positive
from .preconditioner import KFACPreconditioner, Preconditioner
from .presets import PRESETS

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
    lr : float or Tensor
        Learning rate (``>= 0``); as for ``torch.optim.SGD``, a one-element real tensor is
        accepted and kept in the parameter groups.
    momentum : float, default 0
        Heavy-ball momentum (``>= 0``).
    weight_decay : float, default 0
        L2 penalty added to the preconditioned direction (``>= 0``).
    params : iterable of parameters or dicts, optional
        Parameter groups as for any ``torch.optim`` optimizer (default: the model's trainable
        parameters). Per-group ``lr`` is used by the KL clip of each layer.
    loss_fn : callable(outputs, targets) -> scalar tensor, optional
        The training loss as a function of the model's outputs (e.g.
        ``torch.nn.functional.cross_entropy``): needed by ``adaptive_damping`` and
        ``quadratic_step``, which evaluate the exact quadratic model of the loss on the step's
        ``batch`` (see :mod:`kfac._quadratic`).
    adaptive_damping : bool or AdaptiveDamping, default False
        Adapt the damping by the Levenberg-Marquardt rule on the reduction ratio (Martens and
        Grosse 2015, section 6.5); ``True`` uses :class:`AdaptiveDamping`'s defaults. The
        preconditioner's ``damping`` (a constant) is the initial value; the method's damping
        must be absolute (not a ``*-relative`` scheme or ``damping_mode="relative"``).
    quadratic_step : bool, default False
        Choose each step's learning rate and momentum by minimising the exact quadratic
        model over the plane of the new preconditioned direction and the previous update
        (Martens and Grosse 2015, section 7). The groups' ``lr`` then only set the relative
        scale of their directions; ``momentum`` must be 0 and the KL clip off (the model sets
        the step length).
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
        loss_fn: Callable[[torch.Tensor, Any], torch.Tensor] | None = None,
        adaptive_damping: bool | AdaptiveDamping = False,
        quadratic_step: bool = False,
        **kwargs: Any,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(
                f"{type(self).__name__} takes the model (an nn.Module), not its parameters: "
                f"got {type(model).__name__}. The preconditioner hooks the model's layers; "
                f"write {type(self).__name__}(model, lr=...) and pass parameter groups, if "
                "any, as params=..."
            )
        if isinstance(lr, torch.Tensor):  # as torch.optim.SGD: a one-element real tensor
            if lr.numel() != 1 or lr.is_complex() or not lr.is_floating_point():
                raise ValueError(
                    f"Invalid learning rate: a tensor learning rate must hold one real "
                    f"floating-point value, got shape {tuple(lr.shape)} and dtype {lr.dtype}"
                )
            check_nonnegative(float(lr), "learning rate")
        else:
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
        self._configure_control(model, loss_fn, adaptive_damping, quadratic_step, kwargs)

    def _configure_control(
        self,
        model: nn.Module,
        loss_fn: Any,
        adaptive_damping: Any,
        quadratic_step: Any,
        kwargs: Mapping[str, Any],
    ) -> None:
        """Validate the quadratic-model options; build :attr:`quadratic_model`."""
        if isinstance(adaptive_damping, bool):
            adaptive_damping = AdaptiveDamping() if adaptive_damping else None
        elif not isinstance(adaptive_damping, AdaptiveDamping):
            raise TypeError(
                "`adaptive_damping` must be a bool or a kfac.AdaptiveDamping, got "
                f"{type(adaptive_damping).__name__}"
            )
        self.adaptive_damping: AdaptiveDamping | None = adaptive_damping
        self.quadratic_step = check_bool(quadratic_step, "quadratic_step")
        self.quadratic_model: QuadraticModel | None = None
        self.last_step_control: dict[str, float] = {}
        self._rejections = 0  # consecutive rejected steps (adaptive damping)
        if adaptive_damping is None and not quadratic_step:
            if loss_fn is not None:
                raise ValueError(
                    "`loss_fn` is used only by adaptive_damping and quadratic_step; neither is on"
                )
            return
        what = "adaptive_damping" if adaptive_damping is not None else "quadratic_step"
        if not callable(loss_fn):
            raise ValueError(f"{what} needs `loss_fn(outputs, targets)`, the training loss")
        if self.preconditioner.block.relative_damping():
            raise ValueError(
                f"{what} needs an absolute damping (the lambda of C + lambda I): choose a "
                "`damping_scheme` (or `damping_mode`) that is not relative"
            )
        if adaptive_damping is not None and callable(kwargs.get("damping")):
            raise ValueError(
                "adaptive_damping sets the damping: give `damping` as a number (its initial "
                "value), not a schedule"
            )
        if quadratic_step:
            block = self.preconditioner.block
            if getattr(type(block), "commit", CurvatureBlock.commit) is not CurvatureBlock.commit:
                raise ValueError(
                    f"quadratic_step does not apply to {block.name}: its next direction "
                    "depends on the step it took with its own learning rate"
                )
            if any(group["momentum"] != 0 for group in self.param_groups):
                raise ValueError("quadratic_step chooses the momentum: leave `momentum` at 0")
            if kwargs.get("kl_clip") not in (None, 0):
                raise ValueError(
                    "quadratic_step sets the step length: `kl_clip` must be off (None or 0)"
                )
        params = [p for group in self.param_groups for p in group["params"]]
        self.quadratic_model = QuadraticModel(model, loss_fn, named_params(model, params))
        self.preconditioner.engine.timings.setdefault("quadratic", 0.0)

    def __getstate__(self) -> dict[str, Any]:
        """Refused: ``torch.optim.Optimizer`` pickles only its groups and state, so a copy
        would silently lose the preconditioner (and its hooks belong to the model)."""
        name = type(self).__name__
        raise TypeError(
            f"a {name} optimizer cannot be pickled or copied: its preconditioner hooks the "
            f"model's layers. Save `state_dict()` (with the model's) and load it into a new "
            f"{name} built on the (copied) model"
        )

    def _group_lrs(self) -> dict[torch.Tensor, float]:
        return {p: float(group["lr"]) for group in self.param_groups for p in group["params"]}

    def _grads_finite(self) -> bool:
        """One fused check of every gradient: the step's only read from the device."""
        flags = [
            all_finite(p.grad)
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
    def step(self, closure: Callable[[], Any] | None = None, *, batch: Any = None) -> Any:
        """Precondition and update; returns the closure's loss (``None`` without a closure).

        Parameters
        ----------
        closure : callable, optional
            Re-evaluates the model and returns the loss (as for any ``torch.optim``).
        batch : (inputs, targets), optional
            The step's batch, required with ``adaptive_damping`` or ``quadratic_step``:
            ``model(*inputs)`` (or ``model(inputs)`` for one tensor) gives the outputs of
            ``loss_fn(outputs, targets)``; the gradients must be this batch's.
        """
        loss = None
        if self.quadratic_model is not None and batch is None:
            raise ValueError(
                "`batch` (inputs, targets) is needed by adaptive_damping / quadratic_step"
            )
        if batch is not None and (not isinstance(batch, (tuple, list)) or len(batch) != 2):
            raise ValueError("`batch` must be a pair (inputs, targets)")
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
        if self.quadratic_model is None:
            self.preconditioner.step(lr=self._group_lrs())
            _sgd_update(self)
        else:
            assert batch is not None
            self._controlled_step((batch[0], batch[1]))
        return loss

    def _controlled_step(self, batch: tuple[Any, Any]) -> None:
        """Precondition, then take the quadratic-model step or torch's SGD step, and adapt
        the damping on the steps of its period.

        The model's terms are dot products of parameter-sized tensors; they are taken in the
        parameters' dtype on the device and read back together (one host transfer), then the
        2 x 2 system is solved in float64."""
        model = self.quadratic_model
        assert model is not None
        precond = self.preconditioner
        control = self.adaptive_damping
        adapt = control is not None and precond.steps % control.every == 0
        damping = precond.damping
        entries = [
            (p, float(group["lr"]), float(group["weight_decay"]))
            for group in self.param_groups
            for p in group["params"]
            if p.grad is not None  # a parameter without a gradient does not move
        ]
        params = [p for p, _, _ in entries]
        # the gradient before preconditioning, for the model's linear term (not needed by a
        # fixed-learning-rate step that does not adapt the damping)
        raw = [p.grad.clone() for p in params] if self.quadratic_step or adapt else []
        # what a rejected step restores: parameters and their optimizer state
        saved = (
            [(p.detach().clone(), dict(self.state[p])) for p in params]
            if adapt and control is not None and control.reject
            else []
        )
        precond.step(lr=self._group_lrs())
        stats: dict[str, float] = {"damping": damping}

        def linear_and_norms(
            directions: list[list[Tensor]], thetas: list[Tensor]
        ) -> tuple[Tensor, Tensor, Tensor]:
            """``g^T d_i`` (weight decay ``eta theta`` included, at ``thetas``), ``d_i^T d_j``
            and ``sum_p eta_p d_i^T d_j``."""
            k = len(directions)
            terms = []
            for d in directions:
                terms += [
                    torch.vdot(g.flatten(), x.flatten())
                    + decay * torch.vdot(theta.flatten(), x.flatten())
                    for (_, _, decay), theta, g, x in zip(entries, thetas, raw, d, strict=True)
                ]
            pairs = [(a, b) for a in range(k) for b in range(a, k)]
            for a, b in pairs:
                dots = [
                    torch.vdot(x.flatten(), y.flatten())
                    for x, y in zip(directions[a], directions[b], strict=True)
                ]
                terms += dots + [
                    decay * dot for (_, _, decay), dot in zip(entries, dots, strict=True)
                ]
            n = len(params)
            values = torch.stack([t.double() for t in terms]).reshape(-1, n).sum(dim=1).cpu()
            plain = torch.empty(k, k, dtype=torch.float64)
            decayed = torch.empty(k, k, dtype=torch.float64)
            for i, (a, b) in enumerate(pairs):
                plain[a, b] = plain[b, a] = values[k + 2 * i]
                decayed[a, b] = decayed[b, a] = values[k + 2 * i + 1]
            return values[:k], plain, decayed

        if self.quadratic_step:
            new = [
                (p.grad + decay * p).mul_(-lr) if decay else p.grad.mul(-lr)
                for p, lr, decay in entries
            ]
            previous = [self.state[p].get("previous_update") for p in params]
            directions = [new]
            if all(d is not None for d in previous):
                directions.append([d for d in previous if d is not None])
            with precond.engine.phase("quadratic"):
                h0, gram = self._global(*model.gram(batch, directions, params=params))
                linear, plain, decayed = linear_and_norms(directions, params)
            # the step minimises the damped model (the damping is its trust region)
            coeffs, _ = solve_step(gram + decayed, linear, plain, damping)
            # the reduction ratio compares the loss with the model of the loss: no damping
            change = linear @ coeffs + 0.5 * coeffs @ (gram + decayed) @ coeffs
            alpha, mu = float(coeffs[0]), float(coeffs[1]) if len(coeffs) > 1 else 0.0
            delta = []
            for i, p in enumerate(params):
                d = new[i].mul_(alpha)
                if mu:
                    d.add_(directions[1][i], alpha=mu)
                p.add_(d)
                self.state[p]["previous_update"] = d
                delta.append(d)
            stats.update(alpha=alpha, mu=mu)
        else:
            before = [p.detach().clone() for p in params] if adapt else []
            if saved:  # torch's SGD replaces or updates its momentum buffers in place
                for _, state in saved:
                    if isinstance(state.get("momentum_buffer"), Tensor):
                        state["momentum_buffer"] = state["momentum_buffer"].clone()
            _sgd_update(self)
            if not adapt:
                self.last_step_control = stats
                return
            delta = [p.detach() - b for p, b in zip(params, before, strict=True)]
            back = [-d for d in delta]
            with precond.engine.phase("quadratic"):
                h0, gram = self._global(*model.gram(batch, [delta], shift=back, params=params))
                linear, _, decayed = linear_and_norms([delta], before)
            change = linear[0] + 0.5 * (gram[0, 0] + decayed[0, 0])
        stats.update(loss=h0, predicted_change=float(change))
        if adapt:
            assert control is not None
            with precond.engine.phase("quadratic"):
                new_loss = self._global(model.loss(batch))[0]
                # h includes the weight-decay term: eta (theta^T delta + |delta|^2 / 2)
                h1 = new_loss + sum(
                    decay * float(torch.vdot(p.flatten(), d.flatten()) - 0.5 * d.square().sum())
                    for (p, _, decay), d in zip(entries, delta, strict=True)
                    if decay
                )
            predicted = float(change)
            rho = (h1 - h0) / predicted if predicted < 0 and math.isfinite(h1) else -math.inf
            rejected = bool(saved) and control.rejects(rho)
            self._rejections = self._rejections + 1 if rejected else 0
            if rejected:
                for p, (value, state) in zip(params, saved, strict=True):
                    p.copy_(value)
                    self.state[p] = state
            precond.damping = control.update(damping, rho, self._rejections)
            stats.update(new_loss=new_loss, rho=rho, rejected=float(rejected))
        self.last_step_control = stats

    def _global(self, loss: float, gram: Tensor | None = None) -> tuple[float, Tensor]:
        """The batch's loss and Gauss-Newton Gram matrix over every process: the means of
        the processes' own (their batches are equal shards of the global batch, and the loss
        a mean over samples), in one all-reduce; unchanged in one process."""
        gram = torch.zeros(0, 0, dtype=torch.float64) if gram is None else gram
        runtime = self.preconditioner.engine.dist
        if runtime is None:
            return loss, gram
        packed = torch.cat([torch.tensor([loss], dtype=torch.float64), gram.flatten()])
        packed = runtime.all_reduce(packed.to(runtime._device()), "control", "quadratic model")
        packed = packed.cpu() / runtime.world
        return float(packed[0]), packed[1:].reshape(gram.shape)

    def state_dict(self) -> dict[str, Any]:
        """torch.optim state plus the preconditioner's under ``"kfac"``."""
        state = super().state_dict()
        state["kfac"] = self.preconditioner.state_dict()
        if self.adaptive_damping is not None:
            state["adaptive_damping"] = {
                "damping": self.preconditioner.damping,
                "rejections": self._rejections,
            }
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
        adaptive = state_dict.pop("adaptive_damping", None)
        damping = None
        if self.adaptive_damping is not None:
            if not isinstance(adaptive, Mapping) or "damping" not in adaptive:
                raise ValueError(
                    "state_dict has no 'adaptive_damping' entry: it was saved without "
                    "adaptive damping"
                )
            damping = check_positive(adaptive["damping"], "damping (state_dict)")
            rejections = check_int_at_least(0)(
                adaptive.get("rejections", 0), "rejections (state_dict)"
            )
        install = self.preconditioner._prepare_load(kfac_state)
        self._check_torch_state(state_dict)
        super().load_state_dict(state_dict)
        install()
        if damping is not None:
            self.preconditioner.damping = damping
            self._rejections = rejections

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
            for what in ("momentum_buffer", "previous_update"):
                buffer = entry.get(what)
                if buffer is None:
                    continue
                p = params[key]
                label = what.replace("_", " ")
                if not isinstance(buffer, torch.Tensor) or buffer.shape != p.shape:
                    shape = tuple(buffer.shape) if isinstance(buffer, torch.Tensor) else buffer
                    raise ValueError(
                        f"state_dict {label} of parameter {key} has shape {shape}, "
                        f"expected {tuple(p.shape)}"
                    )
                if not bool(torch.isfinite(buffer).all()):
                    raise ValueError(f"state_dict {label} of parameter {key} is not finite")


class KFAC(PreconditionedSGD):
    """K-FAC as a ``torch.optim.Optimizer``: :class:`KFACPreconditioner`, then torch's SGD.

    See :class:`PreconditionedSGD` for the step (one finiteness check, preconditioning,
    ``torch.optim.SGD`` without dampening on the preconditioned gradient; weight decay is not
    preconditioned).

    Parameters
    ----------
    model : nn.Module
        The model whose layers are preconditioned.
    lr : float or Tensor
        Learning rate (``>= 0``; a one-element real tensor as for ``torch.optim.SGD``); with
        the defaults, try 0.1, 1 and 10.
    momentum : float, optional
        Heavy-ball momentum (``>= 0``); default 0.9 (0 with ``quadratic_step=True``).
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
        ``grad_scaler``, ``seed``, ``distributed`` and the inverse strategy's options), and
        :class:`PreconditionedSGD`'s ``loss_fn``, ``adaptive_damping`` and
        ``quadratic_step``. ``kl_clip`` defaults here to
        ``kfac.InverseDecay(1e-3, scale=50, power=2)``, a clip ``1e-3 / (1 + step / 50) ** 2``
        that decays with the step so that the clipped steps of a long run shrink (off with
        ``quadratic_step=True``); the other defaults are :class:`KFACPreconditioner`'s.
        Together they are ``kfac.preset("default")``, chosen by measurement on four tasks
        over short and long runs (docs/kfac.md); ``kfac.preset("thesis")`` gives the
        thesis' long-run settings.

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
        momentum: float | None = None,
        weight_decay: float = 0.0,
        inverse: str = "eigh",
        params: Iterable[Any] | None = None,
        **kwargs: Any,
    ) -> None:
        # the measured defaults (kfac.preset("default")); the quadratic-model step chooses
        # the momentum and the step length itself, so there both default to off
        quadratic = kwargs.get("quadratic_step") is True
        if momentum is None:
            momentum = 0.0 if quadratic else 0.9
        if "kl_clip" not in kwargs:
            kwargs["kl_clip"] = None if quadratic else PRESETS["default"]["kl_clip"]
        super().__init__(
            model,
            lr,
            momentum=momentum,
            weight_decay=weight_decay,
            params=params,
            inverse=inverse,
            **kwargs,
        )
