"""The exact quadratic model of the loss, and the step controls built on it.

For a loss ``h(theta) = L(f(theta, x), y)`` the model of the change along ``delta`` is

``M(delta) = g^T delta + 1/2 delta^T (C + (lambda + eta) I) delta``

with ``g`` the gradient (weight decay ``eta theta`` included), ``C = J^T H_L J`` the
generalised Gauss-Newton matrix of the batch (``J`` the Jacobian of the model's outputs, ``H_L``
the Hessian of the loss in the outputs; for the softmax cross-entropy and the squared error it is
also the Fisher), ``lambda`` the damping and ``eta`` the weight decay.

``C`` is never formed: ``delta_i^T C delta_j = (J delta_i)^T H_L (J delta_j)`` needs one
forward-mode Jacobian-vector product through the model per direction
(:func:`torch.func.jvp` over :func:`torch.func.functional_call`) and one Hessian-vector product
of the loss in the outputs (reverse over reverse, on the outputs only); the directions'
JVPs share one forward (:func:`torch.func.vmap`). Martens and Grosse
(2015, sections 6.5 and 7) use this model twice:

* :class:`AdaptiveDamping`, a Levenberg-Marquardt rule: every ``every`` steps the reduction
  ratio ``rho = (h(theta + delta) - h(theta)) / M(delta)`` of the step just taken multiplies
  the damping by ``decay`` when ``rho > 3/4`` (the model is trusted) and divides it by
  ``decay`` when ``rho < 1/4``;
* the quadratic-model step: the update ``delta = alpha Delta + mu delta_0`` along the new
  preconditioned direction ``Delta`` and the previous update ``delta_0``, with ``alpha, mu``
  minimising ``M`` over that plane (a 2 x 2 linear system).
"""

from __future__ import annotations

import importlib
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, jvp, vmap
from torch.nn.attention import SDPBackend, sdpa_kernel

from ._schedule import check_bool, check_fraction, check_int_at_least, check_positive

__all__ = ["AdaptiveDamping", "QuadraticModel", "solve_step"]

LossFn = Callable[[Tensor, Any], Tensor]


@dataclass(frozen=True)
class AdaptiveDamping:
    """Levenberg-Marquardt adaptation of the damping (Martens and Grosse 2015, section 6.5),
    with the rejection of steps that increase the loss.

    Every ``every`` steps, the reduction ratio ``rho`` of the step just taken (the loss's
    change on the step's batch over the quadratic model's prediction) updates the damping
    ``lambda``: ``lambda * decay`` if ``rho > high``, ``lambda / decay`` if ``rho < low``.
    With ``reject``, a step with ``rho < 0`` (the loss on its batch went up, or is not finite)
    is undone (parameters and momentum restored) and ``lambda`` is multiplied by ``2**k``
    instead, ``k`` the number of consecutive rejections so far (1, 2, ...), as in Nielsen's
    Levenberg-Marquardt rule, so that a damping orders of magnitude too small recovers in a few
    steps. The damping is kept in ``[minimum, maximum]``. A step whose model predicts no
    decrease counts as ``rho = -inf``.

    Parameters
    ----------
    every : int, default 1
        Period ``T_1`` in steps; each adaptation costs one extra forward on the step's batch
        (and, with a fixed learning rate, one Jacobian-vector product). Steps between
        adaptations are never rejected.
    decay : float, optional
        The factor ``omega`` in ``(0, 1)``; default ``(19/20) ** every`` (Martens and Grosse).
    low, high : float, default 0.25, 0.75
        Thresholds on ``rho``, ``0 < low < high < 1``.
    minimum, maximum : float, default 1e-8, 1e4
        Bounds of the damping.
    reject : bool, default True
        Undo the steps with ``rho < 0``.

    Examples
    --------
    >>> import kfac
    >>> kfac.AdaptiveDamping(every=2).decay
    0.9025
    >>> rule = kfac.AdaptiveDamping(decay=0.5)
    >>> rule.update(1.0, rho=0.9), rule.update(1.0, rho=0.1)
    (0.5, 2.0)
    >>> rule.update(1.0, rho=-1.0, rejections=3)  # the third rejection in a row
    8.0
    """

    every: int = 1
    decay: float | None = None
    low: float = 0.25
    high: float = 0.75
    minimum: float = 1e-8
    maximum: float = 1e4
    reject: bool = True

    def __post_init__(self) -> None:
        check_int_at_least(1)(self.every, "every")
        if self.decay is None:
            object.__setattr__(self, "decay", (19 / 20) ** self.every)
        check_fraction(self.decay, "decay")
        check_fraction(self.low, "low")
        check_fraction(self.high, "high")
        if not self.low < self.high:
            raise ValueError(f"Invalid low, high: {self.low}, {self.high} (need low < high)")
        check_positive(self.minimum, "minimum")
        check_positive(self.maximum, "maximum")
        if not self.minimum <= self.maximum:
            raise ValueError(
                f"Invalid minimum, maximum: {self.minimum}, {self.maximum} (need minimum <= "
                "maximum)"
            )
        check_bool(self.reject, "reject")

    def rejects(self, rho: float) -> bool:
        """Whether a step with reduction ratio ``rho`` is undone."""
        return self.reject and not rho >= 0.0

    def update(self, damping: float, rho: float, rejections: int = 0) -> float:
        """The damping after a step with reduction ratio ``rho``; ``rejections`` counts the
        consecutive rejected steps, this one included (0 when it was kept)."""
        assert self.decay is not None
        if rejections:
            damping *= 2.0**rejections
        elif rho > self.high:
            damping *= self.decay
        elif not rho >= self.low:  # also NaN
            damping /= self.decay
        return min(max(damping, self.minimum), self.maximum)


def _load_jvp_rules() -> None:
    """Import torch's forward-mode decompositions now, without the ``torch.jit.script``
    deprecation warning that their first import raises (torch's own, not the caller's)."""
    with warnings.catch_warnings():
        warnings.filterwarnings(
            "ignore", message=".*torch.jit.script.*", category=DeprecationWarning
        )
        importlib.import_module("torch._decomp.decompositions_for_jvp")


class QuadraticModel:
    """Curvature products of the batch's generalised Gauss-Newton matrix through
    :func:`torch.func` (forward-mode JVPs; the model's parameters are never changed).

    Parameters
    ----------
    model : nn.Module
    loss_fn : callable(outputs, targets) -> scalar tensor
        The training loss, as a function of the model's outputs (e.g.
        ``torch.nn.functional.cross_entropy``). It must be twice differentiable in the
        outputs.
    params : sequence of (name, parameter)
        The parameters the directions are given for (the optimizer's).
    """

    def __init__(
        self, model: nn.Module, loss_fn: LossFn, params: Sequence[tuple[str, Tensor]]
    ) -> None:
        _load_jvp_rules()
        self.model = model
        self.loss_fn = loss_fn
        self.names = [name for name, _ in params]
        self.params = [p for _, p in params]

    def _call(self, values: Sequence[Tensor], batch: tuple[Any, Any]) -> Tensor:
        inputs, _ = batch
        args = inputs if isinstance(inputs, tuple) else (inputs,)
        # copies of the buffers: batch-norm running statistics must not move
        buffers = {name: b.clone() for name, b in self.model.named_buffers()}
        params = dict(zip(self.names, values, strict=True))
        device = values[0].device.type if values else "cpu"
        # the model in the parameters' dtype; attention through the math kernel, the one
        # with forward-mode derivatives (the fused CPU and CUDA kernels have none)
        with torch.autocast(device, enabled=False), sdpa_kernel(SDPBackend.MATH):
            out = functional_call(
                self.model, (params, buffers), args, strict=False, tie_weights=True
            )
        if not isinstance(out, Tensor):
            raise TypeError(
                "the quadratic model needs a model that returns one tensor, got "
                f"{type(out).__name__}"
            )
        return out

    def _full(self, tensors: Sequence[Tensor], params: Sequence[Tensor] | None) -> list[Tensor]:
        """``tensors`` given for ``params`` (default: all), zeros for the other parameters."""
        if params is None:
            return list(tensors)
        given = {id(p): t for p, t in zip(params, tensors, strict=True)}
        return [given.get(id(p), torch.zeros_like(p)) for p in self.params]

    def _values(
        self, shift: Sequence[Tensor] | None, params: Sequence[Tensor] | None = None
    ) -> list[Tensor]:
        values = [p.detach() for p in self.params]
        if shift is not None:
            values = [p + s for p, s in zip(values, self._full(shift, params), strict=True)]
        return values

    def loss(
        self,
        batch: tuple[Any, Any],
        shift: Sequence[Tensor] | None = None,
        params: Sequence[Tensor] | None = None,
    ) -> float:
        """``h(theta + shift)`` on ``batch`` (one forward, no gradient); ``shift`` is given
        for ``params`` (default: every parameter)."""
        with torch.no_grad():
            out = self._call(self._values(shift, params), batch)
            return float(self.loss_fn(out, batch[1]))

    def gram(
        self,
        batch: tuple[Any, Any],
        directions: Sequence[Sequence[Tensor]],
        shift: Sequence[Tensor] | None = None,
        params: Sequence[Tensor] | None = None,
    ) -> tuple[float, Tensor]:
        """``h`` and ``[delta_i^T C delta_j]``, the Gauss-Newton Gram matrix of
        ``directions`` (float64, ``k x k``), at ``theta + shift``: one forward with ``k``
        vmapped tangents through the model, and ``k`` Hessian-vector products of the loss in
        the outputs. ``directions`` and ``shift`` are given for ``params`` (default: every
        parameter; the others are 0)."""
        primals = tuple(self._values(shift, params))
        directions = [self._full(d, params) for d in directions]
        targets = batch[1]
        stacked = tuple(
            torch.stack([d[i].to(p.dtype) for d in directions]) for i, p in enumerate(primals)
        )
        # one vmapped JVP: the primal forward runs once, every tangent shares its dropout mask
        dims: Any = (None, 0)  # the primal output is not batched
        pushed: Any = vmap(
            lambda tangent: jvp(lambda *values: self._call(values, batch), primals, tangent),
            out_dims=dims,
            randomness="same",
        )(stacked)
        outputs, tangents = pushed
        loss_grad = grad(lambda o: self.loss_fn(o, targets))
        # H_L t by reverse over reverse (forward over reverse fails for some losses' backward)
        curved = vmap(lambda t: grad(lambda o: (loss_grad(o) * t).sum())(outputs))(tangents)
        gram = (tangents.flatten(1).double() @ curved.flatten(1).double().T).cpu()
        gram = (gram + gram.T) / 2
        with torch.no_grad():
            value = float(self.loss_fn(outputs, targets))
        return value, gram


def solve_step(
    gram: Tensor, linear: Tensor, norms: Tensor, damping: float
) -> tuple[Tensor, Tensor]:
    """The minimiser of ``linear^T c + 1/2 c^T (gram + damping norms) c`` and the model's
    value there (float64). A direction with zero curvature and zero norm, or a system that is
    singular to working precision, is dropped (its coefficient is 0).

    Parameters
    ----------
    gram : (k, k) tensor
        ``delta_i^T C delta_j``.
    linear : (k,) tensor
        ``g^T delta_i``.
    norms : (k, k) tensor
        ``delta_i^T delta_j`` (the damping's quadratic form, weight decay already in
        ``damping`` or in ``gram``).
    damping : float
    """
    system = gram + damping * norms
    k = system.shape[0]
    keep = [i for i in range(k) if system[i, i] > 0]
    coeffs = torch.zeros(k, dtype=torch.float64)
    if keep:
        sub = system[keep][:, keep]
        scale = sub.diagonal().sqrt()
        normalised = sub / scale[:, None] / scale[None, :]
        if (
            len(keep) > 1
            and torch.linalg.eigvalsh(normalised)[0] <= 1e3 * torch.finfo(torch.float64).eps
        ):
            keep = keep[:1]  # (nearly) parallel directions: the new direction alone
            sub = system[keep][:, keep]
        coeffs[keep] = -torch.linalg.solve(sub, linear[keep])
    change = linear @ coeffs + 0.5 * coeffs @ system @ coeffs
    return coeffs, change


def named_params(model: nn.Module, params: Sequence[Tensor]) -> list[tuple[str, Tensor]]:
    """``(name, p)`` for each of ``params`` (raises if one is not the model's)."""
    names: Mapping[int, str] = {
        id(p): n for n, p in model.named_parameters(remove_duplicate=False)
    }
    missing = [i for i, p in enumerate(params) if id(p) not in names]
    if missing:
        raise ValueError(
            "the quadratic model needs every optimized parameter to be a parameter of the "
            f"model; parameter {missing[0]} of `params` is not"
        )
    return [(names[id(p)], p) for p in params]
