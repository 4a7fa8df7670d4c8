"""KLD-WRM: KL-divergence wake-regularized models on the K-FAC platform (Puiu, 2022).

Exponential averaging of the curvature can be read as minimising, at every step, a local
model plus a *wake* of regularisers centred at the past iterates and weighted by ``rho^j``.
KLD-WRM makes the wake a sum of KL divergences between the model's predictive distributions
at the candidate point and at past iterates (strength ``1 / alpha_k``, ``alpha_k`` the
learning rate), and approximates it on the K-FAC platform. Three instantiations:

``so-kld-wrm`` (:class:`SOKLDWRM`)
    Second-order expansion of every KL term: the K-FAC direction of the *corrected*
    gradient ``g_k - rho (alpha_{k-1} / alpha_k) g_{k-1}``.
``q-kld-wrm`` (:class:`QKLDWRM`)
    A quadratic model that also carries the current curvature: the Kronecker factors are
    augmented to ``X_EA + alpha_k X_cur`` and the gradient follows the recursion
    ``g^_k = g_k + rho r (g^_{k-1} - g_{k-1} - M_{k-1} s_{k-1})``, ``r = alpha_{k-1} /
    alpha_k``.
:class:`QEKLDWRM` (experimental)
    The Q step, then ``inner_steps`` SGD iterations on the exact symmetric-KL wake over the
    last ``snapshots`` parameter snapshots.

Both blocks are built by composition over the K-FAC family's :class:`~kfac._kron.KronBlock`:
its factor rules keep the exponential averages, its strategies (``inverse=``) decompose and
its damping schemes invert; KLD-WRM adds the gradient correction (the engine's ``correct``
hook), the augmented factors (Q) and the record of each step's direction (``commit``). See
docs/algorithms.md, *KLD-WRM*, for the maths and every choice made where the paper's
derivation was not available.
"""

from __future__ import annotations

import abc
import weakref
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, ClassVar, NamedTuple

import torch
from torch import Tensor, nn
from torch.func import functional_call
from torch.optim.sgd import sgd as sgd_kernel

from ._capture import WeakHook
from ._clip import rms_clip
from ._curvature import CaptureSpec, CurvatureBlock, LayerBatch, Tick, register_block
from ._kron import BrandRule, FactorState, KronBlock, KronState, kron_block
from ._layers import Layer
from ._schedule import (
    Schedule,
    check_decay,
    check_int_at_least,
    check_nonnegative,
    check_positive,
)
from .optimizer import PreconditionedSGD, unhooked
from .preconditioner import Preconditioner

__all__ = [
    "QEKLDWRM",
    "QKLDWRM",
    "SOKLDWRM",
    "KLDWRMBlock",
    "QKLDWRMBlock",
    "QKLDWRMPreconditioner",
    "SOKLDWRMBlock",
    "SOKLDWRMPreconditioner",
    "WakeProblem",
    "WakeState",
    "wake_divergence",
    "wake_gradient",
]

#: The paper's MNIST ``rho`` per method (K-FAC 0.95).
PAPER_RHO = {"so-kld-wrm": 0.33, "q-kld-wrm": 0.5, "qe-kld-wrm": 0.5}
_WAKE_LOSSES = ("cross_entropy", "mse")


class Pair(NamedTuple):
    """The exponential averages ``(A, G)`` of one step with their identity weights."""

    A: Tensor
    G: Tensor
    s_A: float
    s_G: float

    def apply(self, S: Tensor) -> Tensor:
        """``(G + s_G I) S (A + s_A I)`` for a ``d_G x d_A`` matrix ``S``."""
        left = self.G @ S + self.s_G * S
        return left @ self.A + self.s_A * left


@dataclass(frozen=True)
class WakeState:
    """One layer's KLD-WRM state, a frozen value.

    Attributes
    ----------
    kron : KronState
        The exponential averages of the factors (SO: also the representation applied).
    applied : KronState or None
        Q: the augmented pair ``X_EA + alpha X_cur`` whose prepared inverse is applied.
    grad, corrected : Tensor or None
        The last step's gradient ``g`` and corrected gradient ``g^`` (``d_G x d_A``).
    lr : float or None
        The last step's learning rate ``alpha``.
    direction : Tensor or None
        Q: the last step's final (clipped) direction ``s``.
    previous : Pair or None
        Q: the exponential averages the last step used.
    inst : tuple of Tensor or None
        Q: the instantaneous factors ``(A, G)`` captured on step :attr:`inst_step`.
    inst_step : int
        The step of :attr:`inst` (-1: none).
    fresh : bool
        Q: the applied representation was built from captured instantaneous factors (not from
        the average standing in for them).
    again : bool
        Q: rebuild the augmented pair on the next step too (the step after a refresh).
    """

    kron: KronState
    applied: KronState | None = None
    grad: Tensor | None = None
    corrected: Tensor | None = None
    lr: float | None = None
    direction: Tensor | None = None
    previous: Pair | None = None
    inst: tuple[Tensor, Tensor] | None = None
    inst_step: int = -1
    fresh: bool = False
    again: bool = False

    def current(self, step: int) -> tuple[Tensor, Tensor] | None:
        """The current curvature ``(A_cur, G_cur)`` of ``step``: the instantaneous factors
        captured on that step, else the exponential averages (``None`` before any)."""
        if self.inst is not None and self.inst_step == step:
            return self.inst
        A, G = self.kron.A.matrix, self.kron.G.matrix
        return None if A is None or G is None else (A, G)


def _clone(t: Tensor | None) -> Tensor | None:
    return None if t is None else t.detach().clone()


def _load(t: Any, shape: tuple[int, ...], where: str, device: torch.device) -> Tensor | None:
    if t is None:
        return None
    if tuple(t.shape) != shape:
        raise ValueError(f"state_dict {where} has shape {tuple(t.shape)}, expected {shape}")
    return t.detach().clone().to(device)


class KLDWRMBlock(CurvatureBlock[WakeState], abc.ABC):
    """What SO- and Q-KLD-WRM share: a :class:`KronBlock` for the factors, the wake decay
    and the state round trip. Subclasses add the gradient correction and the representation.

    Parameters
    ----------
    kron : KronBlock
        The K-FAC block (strategy, damping scheme) with ``factored_apply`` off: a corrected
        gradient is not the product of the recorded rows.
    wake_decay : float or callable(step), optional
        ``rho`` of the gradient correction (default: the factors' ``factor_decay``).
    """

    name: ClassVar[str]

    def __init__(self, kron: KronBlock, *, wake_decay: Any = None) -> None:
        self.kron = kron
        self.wake_decay = (
            None if wake_decay is None else Schedule(wake_decay, "wake_decay", check_decay)
        )

    def rho(self, tick: Tick) -> float:
        """The wake decay of ``tick``'s step."""
        return tick.decay if self.wake_decay is None else self.wake_decay(tick.step)

    def _rate(self, lr: float | None) -> float:
        if lr is None:
            raise ValueError(
                f"{self.name} needs the learning rate (its wake weighs by 1 / lr): pass `lr` "
                "to the preconditioner or to step()"
            )
        if lr <= 0.0:
            raise ValueError(f"Invalid lr: {lr} ({self.name} weighs its wake by 1 / lr: > 0)")
        return lr

    # -------------------------------------------------------------- protocol
    def capture(self, layer: Any, state: WakeState, factor_step: bool) -> CaptureSpec | None:
        return self.kron.capture(layer, state.kron, factor_step)

    def check_layers(self, layers: Mapping[str, Any]) -> None:
        self.kron.check_layers(layers)

    def relative_damping(self) -> bool:
        return self.kron.relative_damping()

    def init(self, layer: Any) -> WakeState:
        return WakeState(kron=self.kron.init(layer))

    def update(self, layer: Any, state: WakeState, batch: LayerBatch, tick: Tick) -> WakeState:
        return replace(state, kron=self.kron.update(layer, state.kron, batch, tick))

    def exchange(self, state: WakeState) -> dict[str, Tensor]:
        return self.kron.exchange(state.applied or state.kron)

    def diagnostics(self, layer: Any, state: WakeState) -> list[dict[str, Any]]:
        return self.kron.diagnostics(layer, state.applied or state.kron)

    def block_state_dict(self) -> dict[str, Any]:
        return {"kron": self.kron.block_state_dict()}

    def check_block_state_dict(self, state: Mapping[str, Any]) -> None:
        self.kron.check_block_state_dict(state.get("kron", {}))

    def load_block_state_dict(self, state: Mapping[str, Any]) -> None:
        self.kron.load_block_state_dict(state["kron"])

    def state_dict(self, state: WakeState) -> dict[str, Any]:
        previous = state.previous
        inst = state.inst
        return {
            "kron": self.kron.state_dict(state.kron),
            "applied": None if state.applied is None else self.kron.state_dict(state.applied),
            "grad": _clone(state.grad),
            "corrected": _clone(state.corrected),
            "lr": state.lr,
            "direction": _clone(state.direction),
            "previous": None
            if previous is None
            else [previous.A.clone(), previous.G.clone(), previous.s_A, previous.s_G],
            "inst": None if inst is None else [inst[0].clone(), inst[1].clone()],
            "inst_step": state.inst_step,
            "fresh": state.fresh,
            "again": state.again,
        }

    def load_state(self, layer: Any, saved: Mapping[str, Any], device: torch.device) -> WakeState:
        shape = (layer.dim_G, layer.dim_A)
        where = f"of layer '{layer.name}'"
        kron = self.kron.load_state(layer, saved["kron"], device)
        applied = saved["applied"]
        previous, inst = saved["previous"], saved["inst"]
        dims_A, dims_G = (layer.dim_A,) * 2, (layer.dim_G,) * 2
        pair = None
        if previous is not None:
            A = _load(previous[0], dims_A, f"previous A {where}", device)
            G = _load(previous[1], dims_G, f"previous G {where}", device)
            assert A is not None
            assert G is not None
            pair = Pair(A, G, float(previous[2]), float(previous[3]))
        current = None
        if inst is not None:
            A = _load(inst[0], dims_A, f"inst A {where}", device)
            G = _load(inst[1], dims_G, f"inst G {where}", device)
            assert A is not None
            assert G is not None
            current = (A, G)
        return WakeState(
            kron=kron,
            applied=None if applied is None else self.kron.load_state(layer, applied, device),
            grad=_load(saved["grad"], shape, f"grad {where}", device),
            corrected=_load(saved["corrected"], shape, f"corrected grad {where}", device),
            lr=None if saved["lr"] is None else float(saved["lr"]),
            direction=_load(saved["direction"], shape, f"direction {where}", device),
            previous=pair,
            inst=current,
            inst_step=int(saved["inst_step"]),
            fresh=bool(saved["fresh"]),
            again=bool(saved["again"]),
        )


def _finite_or(candidate: Tensor, fallback: Tensor) -> Tensor:
    """``candidate`` when all its entries are finite, else ``fallback`` (on the device: a
    non-finite history must not poison every later step)."""
    return torch.where(torch.isfinite(candidate).all(), candidate, fallback)


class SOKLDWRMBlock(KLDWRMBlock):
    """SO-KLD-WRM: the K-FAC direction of ``g_k - rho (alpha_{k-1} / alpha_k) g_{k-1}``
    (registered as ``"so-kld-wrm"``)."""

    name: ClassVar[str] = "so-kld-wrm"

    def correct(
        self, layer: Any, state: WakeState, grad: Tensor, tick: Tick, lr: float | None
    ) -> tuple[WakeState, Tensor]:
        alpha = self._rate(lr)
        rho = self.rho(tick)
        corrected = grad
        if state.grad is not None and state.lr is not None and rho != 0.0:
            corrected = _finite_or(grad - (rho * state.lr / alpha) * state.grad, grad)
        return replace(state, grad=grad, corrected=corrected, lr=alpha), corrected

    def refresh(self, layer: Any, state: WakeState, tick: Tick) -> WakeState:
        kron = self.kron.refresh(layer, state.kron, tick)
        return state if kron is state.kron else replace(state, kron=kron)

    def ready(self, state: WakeState) -> bool:
        return self.kron.ready(state.kron)

    def direction(
        self, layer: Any, state: WakeState, grad: Tensor, batch: LayerBatch | None, tick: Tick
    ) -> Tensor:
        return self.kron.direction(layer, state.kron, grad, batch, tick)


class QKLDWRMBlock(KLDWRMBlock):
    """Q-KLD-WRM: the augmented factors ``X_EA + alpha_k X_cur`` and the gradient recursion
    (registered as ``"q-kld-wrm"``).

    ``X_cur`` is the step's instantaneous factor when statistics were captured on it, else
    the exponential average (the value the exponential-average recursion gives back when no
    statistics arrived). The augmented pair is rebuilt on refresh steps and on the step
    after one. ``M_{k-1} s_{k-1}`` is the previous step's averages applied to its final
    direction when the representation applied then was built from captured statistics, and
    ``g^_{k-1} / (1 + alpha_{k-1})`` when it was built from the averages alone (then the
    applied curvature is ``(1 + alpha) M_EA`` up to damping).
    """

    name: ClassVar[str] = "q-kld-wrm"

    def __init__(self, kron: KronBlock, *, wake_decay: Any = None) -> None:
        if isinstance(kron.rule, BrandRule):
            raise ValueError(
                f"Invalid inverse: {kron.strategy.name!r}; q-kld-wrm decomposes the augmented "
                "factors X_EA + lr X_cur, which needs the dense exponential average of every "
                "factor: use 'eigh', 'rsvd' or 'srevd'"
            )
        super().__init__(kron, wake_decay=wake_decay)

    def update(self, layer: Any, state: WakeState, batch: LayerBatch, tick: Tick) -> WakeState:
        kron = self.kron.update(layer, state.kron, batch, tick)
        inst = (batch.input_factor(), batch.output_factor())
        return replace(state, kron=kron, inst=inst, inst_step=tick.step)

    def correct(
        self, layer: Any, state: WakeState, grad: Tensor, tick: Tick, lr: float | None
    ) -> tuple[WakeState, Tensor]:
        alpha = self._rate(lr)
        corrected = grad
        last, prev_grad, prev_lr = state.corrected, state.grad, state.lr
        if last is not None and prev_grad is not None and prev_lr is not None:
            if state.fresh and state.previous is not None and state.direction is not None:
                product = state.previous.apply(state.direction)
            else:
                product = last / (1.0 + prev_lr)
            scale = self.rho(tick) * prev_lr / alpha
            corrected = _finite_or(grad + scale * (last - prev_grad - product), grad)
        return replace(state, grad=grad, corrected=corrected, lr=alpha), corrected

    def refresh(self, layer: Any, state: WakeState, tick: Tick) -> WakeState:
        ea = state.kron
        if ea.A.matrix is None or ea.G.matrix is None or state.lr is None:
            return state
        if not (tick.inverse or state.again or state.applied is None):
            applied = self.kron.refresh(layer, state.applied, tick)  # a new damping value
            return state if applied is state.applied else replace(state, applied=applied)
        inst = state.inst if state.inst_step == tick.step else None
        A_cur, G_cur = inst if inst is not None else (ea.A.matrix, ea.G.matrix)
        base = state.applied or KronState(
            A=FactorState(ea.A.dim, seed=ea.A.seed), G=FactorState(ea.G.dim, seed=ea.G.seed)
        )
        aug = replace(
            base,
            A=replace(
                base.A,
                matrix=ea.A.matrix + state.lr * A_cur,
                identity=ea.A.identity,
                updates=ea.A.updates,
            ),
            G=replace(
                base.G,
                matrix=ea.G.matrix + state.lr * G_cur,
                identity=ea.G.identity,
                updates=ea.G.updates,
            ),
        )
        applied = self.kron.refresh(layer, aug, replace(tick, inverse=True))
        # the augmented matrices are decomposed: keep only their representations
        applied = replace(
            applied, A=replace(applied.A, matrix=None), G=replace(applied.G, matrix=None)
        )
        return replace(state, applied=applied, fresh=inst is not None, again=tick.inverse)

    def ready(self, state: WakeState) -> bool:
        return state.applied is not None and self.kron.ready(state.applied)

    def direction(
        self, layer: Any, state: WakeState, grad: Tensor, batch: LayerBatch | None, tick: Tick
    ) -> Tensor:
        assert state.applied is not None
        return self.kron.direction(layer, state.applied, grad, batch, tick)

    def commit(
        self, layer: Any, state: WakeState, grad: Tensor, direction: Tensor, tick: Tick
    ) -> WakeState:
        A, G = state.kron.A, state.kron.G
        assert A.matrix is not None
        assert G.matrix is not None
        return replace(
            state,
            direction=_finite_or(direction, grad),  # what the write phase wrote
            previous=Pair(A.matrix, G.matrix, A.identity, G.identity),
        )


def _factory(cls: type[KLDWRMBlock]) -> Callable[..., KLDWRMBlock]:
    def build(
        *,
        dtype: torch.dtype,
        seed: int,
        fisher: str,
        inverse: str = "eigh",
        damping_scheme: str = "eigenbasis",
        continuation: bool = True,
        decomposition_dtype: torch.dtype | None = None,
        wake_decay: Any = None,
        **inverse_options: Any,
    ) -> KLDWRMBlock:
        kron = kron_block(
            dtype=dtype,
            seed=seed,
            fisher=fisher,
            inverse=inverse,
            damping_scheme=damping_scheme,
            continuation=continuation,
            factored_apply=False,
            decomposition_dtype=decomposition_dtype,
            **inverse_options,
        )
        return cls(kron, wake_decay=wake_decay)

    build.__doc__ = (
        f"The registry's factory for ``{cls.name!r}``: a :class:`KronBlock` with the given "
        "strategy and damping scheme (``factored_apply`` off) wrapped by the method."
    )
    return build


register_block("so-kld-wrm", _factory(SOKLDWRMBlock))
register_block("q-kld-wrm", _factory(QKLDWRMBlock))


# ---------------------------------------------------------------------------- fronts


class _KLDWRMPreconditioner(Preconditioner):
    """The K-FAC options over a KLD-WRM block (see the subclasses)."""

    block_name: ClassVar[str]

    def __init__(
        self,
        model: nn.Module,
        *,
        factor_decay: Any,
        damping: Any = 0.01,
        damping_scheme: str = "eigenbasis",
        factor_every: Any = 30,
        inverse_every: Any = 30,
        wake_decay: Any = None,
        decomposition_dtype: torch.dtype | None = None,
        **kwargs: Any,
    ) -> None:
        if "factored_apply" in kwargs:
            raise ValueError(
                "Invalid option `factored_apply`: KLD-WRM preconditions a corrected gradient, "
                "which is not the product of the recorded rows"
            )
        if decomposition_dtype not in (None, torch.float32, torch.float64):
            raise ValueError(
                f"Invalid decomposition_dtype: {decomposition_dtype} (must be torch.float32 "
                "or torch.float64)"
            )
        super().__init__(
            model,
            self.block_name,
            factor_decay=factor_decay,
            damping=damping,
            factor_every=factor_every,
            inverse_every=inverse_every,
            damping_scheme=damping_scheme,
            wake_decay=wake_decay,
            decomposition_dtype=decomposition_dtype,
            **kwargs,
        )

    @property
    def kron(self) -> KronBlock:
        """The K-FAC block inside the method (strategy, damping scheme)."""
        block = self.block
        assert isinstance(block, KLDWRMBlock)
        return block.kron

    @property
    def inverse_name(self) -> str:
        """The registry name of the inverse strategy."""
        return self.kron.strategy.name

    @property
    def damping_scheme(self) -> str:
        """The damping scheme's name."""
        return self.kron.damping_scheme.name

    def state(self, name: str) -> WakeState:
        """The :class:`WakeState` of layer ``name``."""
        state: WakeState = super().state(name)
        return state

    def factors(self, name: str) -> tuple[Tensor | None, Tensor | None]:
        """The exponential averages ``(A, G)`` of layer ``name`` (no identity weight)."""
        kron = self.state(name).kron
        return kron.A.matrix, kron.G.matrix

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(inverse={self.inverse_name!r}, layers={self.layer_names}, "
            f"damping_scheme={self.damping_scheme!r}, steps={self.steps})"
        )


_PRECONDITIONER_DOC = """{title}

    Call :meth:`step` after ``loss.backward()`` and before any ``torch.optim`` optimizer's
    ``step()``, with the learning rate (``step(lr=...)`` or ``lr=`` here): {what}

    Parameters
    ----------
    model : nn.Module
        The model (its ``nn.Linear`` and ``nn.Conv2d`` layers are preconditioned).
    factor_decay : float or callable(step), default {rho}
        ``rho``: the factors' exponential-average decay and (unless ``wake_decay`` is given)
        the wake's (the paper's MNIST value).
    damping : float or callable(step), default 0.01
        ``lambda`` (with ``"eigenbasis"``: added to the eigenvalues of the Kronecker product).
    damping_scheme : str, default "eigenbasis"
        Any K-FAC damping scheme (``kfac.KFACPreconditioner``).
    factor_every, inverse_every : int or callable(step), default 30 and 30
        Periods of the statistics and of the refreshes (the paper's ``T_s = T_f = 30``).
    wake_decay : float or callable(step), optional
        ``rho`` of the gradient correction when it differs from ``factor_decay``.
    rms_clip : float or callable(step), {rms}
        Per-layer clip of the direction's RMS (applied before the KL clip).
    inverse : str, default "eigh"
        {inverse}
    **kwargs
        The other options of :class:`~kfac.KFACPreconditioner` (``kl_clip``, ``lr``,
        ``skip_layers``, ``fisher``, ``loss``, ``factor_dtype``, ``decomposition_dtype``,
        ``continuation``, the strategy's options, ...) except ``factored_apply``.
"""


class SOKLDWRMPreconditioner(_KLDWRMPreconditioner):
    block_name: ClassVar[str] = "so-kld-wrm"

    def __init__(self, model: nn.Module, *, factor_decay: Any = 0.33, **kwargs: Any) -> None:
        super().__init__(model, factor_decay=factor_decay, **kwargs)


class QKLDWRMPreconditioner(_KLDWRMPreconditioner):
    block_name: ClassVar[str] = "q-kld-wrm"

    def __init__(
        self, model: nn.Module, *, factor_decay: Any = 0.5, rms_clip: Any = 2.0, **kwargs: Any
    ) -> None:
        super().__init__(model, factor_decay=factor_decay, rms_clip=rms_clip, **kwargs)


SOKLDWRMPreconditioner.__doc__ = (
    _PRECONDITIONER_DOC.format(
        title='The SO-KLD-WRM preconditioner (block ``"so-kld-wrm"``).',
        what="each layer's ``.grad`` becomes the K-FAC direction of the corrected gradient "
        "``g_k - rho (lr_{k-1} / lr_k) g_{k-1}``.",
        rho=0.33,
        rms="optional",
        inverse="Any K-FAC inverse strategy (``kfac.inverse_names()``).",
    )
    + """
    Examples
    --------
    >>> import torch
    >>> from torch import nn
    >>> import kfac
    >>> model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    >>> precond = kfac.SOKLDWRMPreconditioner(model, lr=0.1)
    >>> loss = nn.functional.cross_entropy(model(torch.randn(16, 4)), torch.randint(2, (16,)))
    >>> loss.backward()
    >>> precond.step()
    >>> precond.state("0").grad.shape  # the gradient the next step corrects with
    torch.Size([8, 5])
"""
)
QKLDWRMPreconditioner.__doc__ = (
    _PRECONDITIONER_DOC.format(
        title='The Q-KLD-WRM preconditioner (block ``"q-kld-wrm"``).',
        what="each layer's ``.grad`` becomes the direction of the recursively corrected gradient "
        "under the augmented factors ``X_EA + lr X_cur``.",
        rho=0.5,
        rms="default 2.0 (the paper's; ``None``: off)",
        inverse='``"eigh"``, ``"rsvd"`` or ``"srevd"``: the augmented factors need the '
        "dense average of every factor, which the Brand strategies do not keep.",
    )
    + """
    Examples
    --------
    >>> import torch
    >>> from torch import nn
    >>> import kfac
    >>> model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    >>> precond = kfac.QKLDWRMPreconditioner(model, lr=0.1)
    >>> loss = nn.functional.cross_entropy(model(torch.randn(16, 4)), torch.randint(2, (16,)))
    >>> loss.backward()
    >>> precond.step()
    >>> precond.state("0").fresh  # built from this step's statistics
    True
"""
)


_OPTIMIZER_DOC = """{title}

    The step is :class:`~kfac.PreconditionedSGD`'s: one finiteness check, the
    preconditioner (which uses each parameter group's ``lr`` as ``alpha_k``), then
    ``torch.optim.SGD``'s update (heavy-ball momentum, unpreconditioned weight decay).

    Parameters
    ----------
    model : nn.Module
        The model whose layers are preconditioned.
    lr : float
        Learning rate ``alpha_k`` (``>= 0``; the wake needs ``> 0`` at every step).
    momentum : float, default 0
        Heavy-ball momentum (the paper's runs use 0).
    weight_decay : float, default 0
    params : iterable of parameters or dicts, optional
        Parameter groups (default: the model's trainable parameters).
    **kwargs
        Passed to :class:`{precond}` (``factor_decay``, ``damping``, ``damping_scheme``,
        ``factor_every``, ``inverse_every``, ``wake_decay``, ``inverse``, ``kl_clip``,
        ``rms_clip``, ...).
"""


class SOKLDWRM(PreconditionedSGD):
    preconditioner_class: ClassVar[type[Preconditioner]] = SOKLDWRMPreconditioner
    preconditioner: SOKLDWRMPreconditioner


class QKLDWRM(PreconditionedSGD):
    preconditioner_class: ClassVar[type[Preconditioner]] = QKLDWRMPreconditioner
    preconditioner: QKLDWRMPreconditioner


_TRAIN_EXAMPLE = """
    Examples
    --------
    >>> import torch
    >>> from torch import nn
    >>> import kfac
    >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
    <torch._C.Generator object at ...>
    >>> model = nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 3))
    >>> x, y = torch.randn(64, 4), torch.randint(3, (64,))
    >>> opt = kfac.{cls}(model, lr=0.1, kl_clip=0.1, factor_every=1, inverse_every=5{extra})
    >>> def closure():
    ...     opt.zero_grad()
    ...     loss = nn.functional.cross_entropy(model(x), y)
    ...     loss.backward()
    ...     return loss
    >>> first = opt.step(closure).item()
    >>> for _ in range(20):
    ...     last = opt.step(closure).item()
    >>> last < first
    True
"""

SOKLDWRM.__doc__ = _OPTIMIZER_DOC.format(
    title="SO-KLD-WRM as a ``torch.optim.Optimizer`` (Puiu 2022): "
    ":class:`SOKLDWRMPreconditioner`, then torch's SGD.",
    precond="SOKLDWRMPreconditioner",
) + _TRAIN_EXAMPLE.format(cls="SOKLDWRM", extra="")
QKLDWRM.__doc__ = _OPTIMIZER_DOC.format(
    title="Q-KLD-WRM as a ``torch.optim.Optimizer`` (Puiu 2022): "
    ":class:`QKLDWRMPreconditioner`, then torch's SGD.",
    precond="QKLDWRMPreconditioner",
) + _TRAIN_EXAMPLE.format(cls="QKLDWRM", extra="")


# ---------------------------------------------------------------------------- QE


class WakeProblem(NamedTuple):
    """QE-KLD-WRM's inner problem at one outer step ``k``.

    Minimise over the parameters ``theta`` (``Delta = theta - theta_k``)::

        J = sum_p <g_p, Delta_p> + 1/2 sum_layers <Delta_l, G_l Delta_l A_l>
            + W(theta) / (2 alpha kappa)

    ``W`` the exponential average (decay ``rho``, oldest snapshot first) of the symmetric KL
    divergences between the model's predictive distribution and the snapshots'.

    Attributes
    ----------
    params : list of Tensor
        The parameters optimised (live tensors).
    start : list of Tensor
        ``theta_k``, the parameters before the Q step.
    grads : list of Tensor
        ``g_k``, the raw gradients at ``theta_k``.
    rates : list of float
        ``alpha_k`` of each parameter (its group's learning rate).
    layers : list of (Layer, Tensor, Tensor)
        The preconditioned layers with their current curvature ``(A_l, G_l)``.
    targets : list of Tensor
        The snapshots' outputs on the batch, oldest first.
    rho : float
    kappa : float
    loss : {"cross_entropy", "mse"}
        Softmax over dimension 1 of logits, or a unit-variance Gaussian.
    """

    params: list[Tensor]
    start: list[Tensor]
    grads: list[Tensor]
    rates: list[float]
    layers: list[tuple[Layer, Tensor, Tensor]]
    targets: list[Tensor]
    rho: float
    kappa: float
    loss: str


def _symmetric_kl(output: Tensor, target: Tensor, loss: str) -> Tensor:
    """Batch mean of ``(KL(p||q) + KL(q||p)) / 2``."""
    if loss == "mse":  # N(f, I) against N(f_j, I): both KLs are ||f - f_j||^2 / 2
        diff = (output - target).flatten(1)
        return 0.5 * diff.square().sum(dim=1).mean()
    log_p = torch.log_softmax(output, dim=1)
    log_q = torch.log_softmax(target, dim=1)
    per = 0.5 * ((log_p.exp() - log_q.exp()) * (log_p - log_q)).sum(dim=1)
    return per.mean()


def wake_divergence(output: Tensor, targets: Sequence[Tensor], rho: float, loss: str) -> Tensor:
    """``W``: the exponential average of the symmetric KL divergences between ``output`` and
    each of ``targets`` (oldest first): ``w = KL_1``, then ``w = rho w + (1 - rho) KL_j``.

    Examples
    --------
    >>> import torch
    >>> from kfac.kld_wrm import wake_divergence
    >>> logits = torch.randn(8, 3)
    >>> float(wake_divergence(logits, [logits, logits], 0.5, "cross_entropy"))
    0.0
    """
    w = _symmetric_kl(output, targets[0], loss)
    for target in targets[1:]:
        w = rho * w + (1.0 - rho) * _symmetric_kl(output, target, loss)
    return w


def _layer_matrix(layer: Layer, tensors: Mapping[Tensor, Tensor], dtype: torch.dtype) -> Tensor:
    """The ``d_G x d_A`` matrix of ``layer`` (bias last) from per-parameter tensors."""
    params = layer.params
    mat = tensors[params[0]].reshape(layer.dim_out, layer.dim_in).to(dtype)
    if layer.has_bias:
        mat = torch.cat([mat, tensors[params[1]].reshape(-1, 1).to(dtype)], dim=1)
    return mat


def wake_gradient(model: nn.Module, inputs: Any, problem: WakeProblem) -> list[Tensor]:
    """The gradient of the inner objective of :class:`WakeProblem` at the live parameters:
    ``g_p + (G Delta A)_p + dW/dp / (2 alpha_p kappa)``, the last term by autograd through one
    forward of ``model`` on ``inputs`` (``(args, kwargs)``), the quadratic term in closed form.

    With one learning rate this is the gradient of ``J``; with several, each parameter's
    wake term is weighed by its own group's rate.
    """
    args, kwargs = inputs
    with torch.enable_grad():
        output = model(*args, **kwargs)
        W = wake_divergence(output, problem.targets, problem.rho, problem.loss)
        wanted = [p for p in problem.params if p.requires_grad]
        parts = torch.autograd.grad(W, wanted, allow_unused=True)
    wake = {p: g for p, g in zip(wanted, parts, strict=True)}
    delta = {p: p.detach() - s for p, s in zip(problem.params, problem.start, strict=True)}
    quadratic: dict[Tensor, Tensor] = {}
    for layer, A, G in problem.layers:
        D = _layer_matrix(layer, delta, A.dtype)
        for param, part in zip(layer.params, layer.split(G @ D @ A), strict=True):
            quadratic[param] = part
    out = []
    for p, g, rate in zip(problem.params, problem.grads, problem.rates, strict=True):
        total = g.clone()
        if p in quadratic:
            total += quadratic[p].to(g.dtype)
        w = wake.get(p)
        if w is not None:
            total += w / (2.0 * rate * problem.kappa)
        out.append(total)
    return out


@dataclass(frozen=True)
class WakeRefinement:
    """QE's inner loop: ``steps`` SGD iterations (rate ``lr_factor * alpha``, momentum
    ``momentum``, torch's functional SGD kernel) on :func:`wake_gradient`, each gradient
    tensor RMS-clipped to ``rms_clip``."""

    steps: int = 10
    lr_factor: float = 0.1
    momentum: float = 0.5
    snapshots: int = 3
    kappa: float = 330.0
    rms_clip: float | None = 2.0

    def run(self, model: nn.Module, inputs: Any, problem: WakeProblem) -> None:
        """Move ``problem.params`` in place (no ``.grad`` is touched)."""
        buffers: list[Tensor | None] = [None] * len(problem.params)
        by_rate: dict[float, list[int]] = {}
        for i, rate in enumerate(problem.rates):
            by_rate.setdefault(rate, []).append(i)
        for _ in range(self.steps):
            grads = wake_gradient(model, inputs, problem)
            if self.rms_clip is not None:
                grads = [rms_clip(g, self.rms_clip) for g in grads]
            for rate, idx in by_rate.items():
                momentum = [buffers[i] for i in idx]
                sgd_kernel(
                    [problem.params[i] for i in idx],
                    [grads[i] for i in idx],
                    momentum,
                    weight_decay=0.0,
                    momentum=self.momentum,
                    lr=self.lr_factor * rate,
                    dampening=0.0,
                    nesterov=False,
                    maximize=False,
                )
                for i, buf in zip(idx, momentum, strict=True):
                    buffers[i] = buf


def _unhooked_step(optimizer: PreconditionedSGD) -> None:
    """:meth:`PreconditionedSGD.step` without the step hooks torch wraps it with (they run
    around :meth:`QEKLDWRM.step` itself)."""
    unhooked(PreconditionedSGD.step)(optimizer)


class QEKLDWRM(PreconditionedSGD):
    """QE-KLD-WRM (experimental) as a ``torch.optim.Optimizer``: the Q-KLD-WRM step, then
    ``inner_steps`` SGD iterations on the exact symmetric-KL wake (Puiu 2022).

    After the Q step (:class:`QKLDWRM`), and once ``snapshots`` parameter snapshots exist,
    the parameters are refined by SGD on the inner objective of :class:`WakeProblem`: the
    step's raw gradient, the current K-FAC curvature ``A_cur (x) G_cur`` of every
    preconditioned layer around the parameters before the step, and the exponential average
    of symmetric KL divergences to the last ``snapshots`` iterates, weighed by
    ``1 / (2 lr wake_kappa)``. The divergences are evaluated on the inputs of the step's last
    training forward of ``model``, with the whole model in eval mode (deterministic, no
    dropout noise between the current and the snapshot outputs, no BatchNorm statistics
    updated), by ``torch.func.functional_call`` on the stored snapshots (their outputs once
    per step). The parameters after the step are stored as the newest snapshot.

    Cost per step: the Q step, ``snapshots`` forwards, and ``inner_steps`` forward-backward
    passes; memory: ``snapshots`` copies of the parameters.

    Parameters
    ----------
    model : nn.Module
    lr : float
        ``alpha_k``; the inner loop's rate is ``inner_lr * lr`` per group.
    momentum, weight_decay : float, default 0
        Of the outer (Q) step.
    inner_steps : int, default 10
        ``N_in`` (the paper's MNIST runs use 7); 0 gives the Q step exactly.
    inner_lr : float, default 0.1
    inner_momentum : float, default 0.5
    snapshots : int, default 3
        ``C``, the parameter snapshots in the wake.
    wake_kappa : float, default 330
        ``kappa`` of the wake weight ``1 / (2 lr kappa)``.
    inner_rms_clip : float or None, default 2.0
        Per-tensor RMS clip of each inner gradient.
    params : iterable, optional
    **kwargs
        Passed to :class:`QKLDWRMPreconditioner` (``loss="mse"`` makes the wake Gaussian
        instead of categorical).

    Notes
    -----
    ``state_dict()`` holds the snapshots under ``"wake"`` as well as the Q state.
    """

    preconditioner_class: ClassVar[type[Preconditioner]] = QKLDWRMPreconditioner
    preconditioner: QKLDWRMPreconditioner

    def __init__(
        self,
        model: nn.Module,
        lr: float,
        *,
        momentum: float = 0.0,
        weight_decay: float = 0.0,
        inner_steps: int = 10,
        inner_lr: float = 0.1,
        inner_momentum: float = 0.5,
        snapshots: int = 3,
        wake_kappa: float = 330.0,
        inner_rms_clip: float | None = 2.0,
        params: Iterable[Any] | None = None,
        **kwargs: Any,
    ) -> None:
        loss = kwargs.get("loss")
        for option in ("adaptive_damping", "quadratic_step"):
            if kwargs.get(option):
                raise ValueError(
                    f"QEKLDWRM refines its own step in the wake's exact KL: `{option}` does "
                    "not apply (use it with SOKLDWRM or QKLDWRM)"
                )
        self.refinement = WakeRefinement(
            steps=check_int_at_least(0)(inner_steps, "inner_steps"),
            lr_factor=check_nonnegative(inner_lr, "inner_lr"),
            momentum=check_nonnegative(inner_momentum, "inner_momentum"),
            snapshots=check_int_at_least(1)(snapshots, "snapshots"),
            kappa=check_positive(wake_kappa, "wake_kappa"),
            rms_clip=None
            if inner_rms_clip is None
            else check_positive(inner_rms_clip, "inner_rms_clip"),
        )
        super().__init__(
            model, lr, momentum=momentum, weight_decay=weight_decay, params=params, **kwargs
        )
        self.wake_loss = "mse" if loss == "mse" else "cross_entropy"
        self.model = model
        self._names = {p: name for name, p in model.named_parameters()}
        self._snapshots: list[dict[str, Tensor]] = [self._snapshot()]
        self._inputs: tuple[tuple[Any, ...], dict[str, Any]] | None = None
        self._refining = False
        # held weakly by the model (which outlives the optimizer), removed with the optimizer
        self._hook = model.register_forward_pre_hook(
            WeakHook(self, "_record_inputs"), with_kwargs=True
        )
        weakref.finalize(self, self._hook.remove)

    # ------------------------------------------------------------------ helpers
    def _params(self) -> list[Tensor]:
        return [p for group in self.param_groups for p in group["params"]]

    def _snapshot(self) -> dict[str, Tensor]:
        owned = {id(p) for p in self._params()}
        return {
            name: p.detach().clone() for name, p in self.model.named_parameters() if id(p) in owned
        }

    def _record_inputs(self, module: nn.Module, args: Any, kwargs: Any) -> None:
        if module.training and torch.is_grad_enabled() and not self._refining:
            self._inputs = (tuple(args), dict(kwargs))

    @property
    def snapshots(self) -> list[dict[str, Tensor]]:
        """The stored parameter snapshots, oldest first (name to tensor)."""
        return list(self._snapshots)

    # ------------------------------------------------------------------ the step
    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None, *, batch: Any = None) -> Any:
        """The Q step, then the inner refinement; returns the closure's loss (``batch`` is
        accepted for the common front's signature and unused: QE-KLD-WRM takes neither
        quadratic-model option)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        refine = self.refinement.steps > 0 and len(self._snapshots) >= self.refinement.snapshots
        precond = self.preconditioner
        before = precond.steps
        params = self._params()
        start: list[Tensor] = []
        grads: list[Tensor] = []
        if refine:
            start = [p.detach().clone() for p in params]
            grads = [torch.zeros_like(p) if p.grad is None else p.grad.clone() for p in params]
        _unhooked_step(self)
        if precond.steps == before:  # skipped: a non-finite gradient
            return loss
        if refine:
            self._refine(params, start, grads)
        self._inputs = None
        self._snapshots.append(self._snapshot())
        del self._snapshots[: max(0, len(self._snapshots) - self.refinement.snapshots)]
        return loss

    def _refine(self, params: list[Tensor], start: list[Tensor], grads: list[Tensor]) -> None:
        if self._inputs is None:
            raise RuntimeError(
                "QEKLDWRM.step: no training forward of the model was recorded since the last "
                "step; the wake is evaluated on the inputs of the step's forward"
            )
        precond = self.preconditioner
        step = precond.steps - 1
        block = precond.block
        assert isinstance(block, KLDWRMBlock)
        rho = block.rho(precond.engine.clock.tick(step))
        rates = {p: float(group["lr"]) for group in self.param_groups for p in group["params"]}
        layers = []
        for name in precond.layer_names:
            current = precond.state(name).current(step)
            if current is not None:
                layers.append((precond.layer(name), *current))
        modes = {m: m.training for m in self.model.modules()}
        capture = precond.engine.capture
        capture.arm({}, statistics=False)
        self._refining = True
        try:
            self.model.eval()
            args, kwargs = self._inputs
            targets = [
                functional_call(self.model, snapshot, args, kwargs) for snapshot in self._snapshots
            ]
            problem = WakeProblem(
                params=params,
                start=start,
                grads=grads,
                rates=[rates[p] for p in params],
                layers=layers,
                targets=targets,
                rho=rho,
                kappa=self.refinement.kappa,
                loss=self.wake_loss,
            )
            self.refinement.run(self.model, self._inputs, problem)
        finally:
            self._refining = False
            for module, mode in modes.items():
                module.training = mode
            precond.engine.arm()

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """The Q optimizer's state plus the snapshots under ``"wake"``."""
        state = super().state_dict()
        state["wake"] = {"snapshots": [dict(s) for s in self._snapshots]}
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Inverse of :meth:`state_dict` (validated before anything changes)."""
        state_dict = dict(state_dict)
        if "kfac" in state_dict:
            self.preconditioner.check_state_dict(state_dict["kfac"])
            if "wake" not in state_dict:
                raise ValueError("state_dict has no 'wake' entry: it was not saved by QEKLDWRM")
        wake = state_dict.pop("wake", None)
        reference = self._snapshot()
        snapshots = [] if wake is None else list(wake["snapshots"])
        for snapshot in snapshots:
            if set(snapshot) != set(reference) or any(
                tuple(snapshot[k].shape) != tuple(reference[k].shape) for k in reference
            ):
                raise ValueError(
                    "state_dict snapshots do not match the model's trainable parameters"
                )
        super().load_state_dict(state_dict)
        self._snapshots = [
            {k: v.detach().clone().to(reference[k].device) for k, v in s.items()}
            for s in snapshots
        ]
