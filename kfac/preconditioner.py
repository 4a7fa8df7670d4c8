"""The preconditioner fronts: :class:`Preconditioner` for any curvature block, and
:class:`KFACPreconditioner`, the K-FAC family's."""

from __future__ import annotations

import contextlib
import zlib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import replace
from typing import Any

import torch
from torch import Tensor, nn

import lowrank_nla as ln

from ._capture import LOSSES, Capture
from ._curvature import CaptureSpec, CurvatureBlock, LayerBatch, make_block
from ._engine import Clock, Engine
from ._kron import KronBlock, KronState
from ._layers import Layer, discover
from ._schedule import (
    Schedule,
    check_bool,
    check_decay,
    check_int_at_least,
    check_integer,
    check_nonnegative,
    check_positive,
    optional_schedule,
)
from .distributed import Distributed, Runtime

__all__ = ["KFACPreconditioner", "Preconditioner"]

FISHER_TYPES = ("empirical", "mc")
_STAT_DTYPES = (torch.float32, torch.float64)


def _check_dtype(dtype: Any, name: str) -> None:
    if dtype is not None and dtype not in _STAT_DTYPES:
        raise ValueError(f"Invalid {name}: {dtype} (must be torch.float32 or torch.float64)")


class Preconditioner:
    """Rewrites each registered layer's ``.grad`` into a curvature block's direction.

    Call :meth:`step` after ``loss.backward()`` and before any ``torch.optim`` optimizer's
    ``step()``. The layers are the model's modules of a registered layer type
    (``nn.Linear``, ``nn.Conv2d``) with a trainable weight; every other parameter is left
    alone.

    Parameters
    ----------
    model : nn.Module
        The model.
    block : str or CurvatureBlock
        The method: a registered name (:func:`kfac.block_names`; ``"kron"`` is the K-FAC
        family, see :class:`KFACPreconditioner`) built with ``block_options``, or a block
        object.
    factor_decay : float or callable(step), default 0.95
        Exponential-average decay ``rho`` of the statistics, in ``[0, 1)``.
    damping : float or callable(step), default 0.1
        ``lambda > 0``, passed to the block with each step's clock reading.
    factor_every, inverse_every : int or callable(step), default 20 and 100
        Periods, in steps, of the statistics updates and of the refreshes. Statistics are
        captured only on factor-update steps (and on the steps the block asks for rows).
    kl_clip : float or callable(step), optional
        Global KL clip ``nu = min(1, sqrt(kl_clip / |sum lr^2 <V, grad>|))``; needs ``lr``.
        ``None`` or ``0`` (also as a schedule's value) switches it off.
    rms_clip : float or callable(step), optional
        Per-layer clip of the direction's RMS to ``rms_clip``; ``None`` or ``0`` is off.
    lr : float or callable(step), optional
        Learning rate used by ``kl_clip`` when :meth:`step` is not given one.
    skip_layers : iterable of str or nn.Module subclasses, default ()
        Layers left unpreconditioned: ``fnmatch`` patterns on qualified module names
        (``"decoder.*"``) or module types.
    fisher : {"empirical", "mc"}, default "empirical"
        Output-gradient statistics from the true-label backward (empirical Fisher) or from
        one extra backward with targets sampled from the model's predictive distribution on
        factor-update steps (Monte-Carlo Fisher).
    loss : {"cross_entropy", "mse"}, optional
        The batch-mean training loss; required by ``fisher="mc"`` to sample targets.
    factor_dtype : torch.dtype, default torch.float32
        dtype of the statistics and directions (float32 or float64), independent of the
        model dtype.
    grad_scaler : torch.amp.GradScaler, optional
        The scaler of a mixed-precision loop: captured output gradients are divided by its
        scale, and steps whose gradients overflowed are its own to skip (no warning).
    seed : int, default 0
        Seed of the Monte-Carlo target sampler (and of the block's own randomness).
    time_phases : bool, default False
        Accumulate the seconds of each phase in :attr:`timings` (on CUDA the device is
        synchronised around each phase, which costs time: leave it off in production and
        use ``torch.profiler``, which sees the ``kfac.<phase>`` ranges, instead).
    distributed : Distributed or bool, optional
        Data-parallel execution on ``torch.distributed`` (:class:`kfac.Distributed`; see
        docs/guide/distributed.md). Default: on, with ``Distributed()``, when the default
        process group is initialised with more than one process; ``False``: each process
        runs on its own (its curvature sees only its own batch). Every process must call
        the constructor, :meth:`step` and :meth:`state_dict` together.
    **block_options
        Options of a block given by name.

    Raises
    ------
    ValueError
        An invalid hyperparameter (``"Invalid damping: ..."``), an unknown block, a model
        with no supported layer, an unsupported layer configuration.

    Notes
    -----
    Each :meth:`step` runs the engine's phases (capture, reduce, update, refresh, exchange,
    direction, clip, write; see docs/architecture.md). A step that is neither a
    factor-update nor a refresh step reads nothing back from the device: a layer whose
    direction is not finite keeps its gradient (nothing non-finite is written) and is
    reported by a ``RuntimeWarning`` at the next factor or refresh step, or by
    :meth:`report`.
    """

    def __init__(
        self,
        model: nn.Module,
        block: str | CurvatureBlock[Any],
        *,
        factor_decay: Any = 0.95,
        damping: Any = 0.1,
        factor_every: Any = 20,
        inverse_every: Any = 100,
        kl_clip: Any = None,
        rms_clip: Any = None,
        lr: Any = None,
        skip_layers: Iterable[Any] = (),
        fisher: str = "empirical",
        loss: str | None = None,
        factor_dtype: torch.dtype = torch.float32,
        grad_scaler: Any = None,
        seed: int = 0,
        time_phases: bool = False,
        distributed: Distributed | bool | None = None,
        **block_options: Any,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"`model` must be an nn.Module, got {type(model).__name__}")
        clock = Clock(
            factor_every=Schedule(factor_every, "factor_every", check_int_at_least(1)),
            inverse_every=Schedule(inverse_every, "inverse_every", check_int_at_least(1)),
            factor_decay=Schedule(factor_decay, "factor_decay", check_decay),
            damping=Schedule(damping, "damping", check_positive),
        )
        if fisher not in FISHER_TYPES:
            raise ValueError(f"Invalid fisher: {fisher!r}; valid names are {list(FISHER_TYPES)}")
        if fisher == "mc" and loss not in LOSSES:
            raise ValueError(f"Invalid loss: {loss!r}; fisher='mc' needs one of {list(LOSSES)}")
        if loss is not None and loss not in LOSSES:
            raise ValueError(f"Invalid loss: {loss!r}; valid names are {list(LOSSES)}")
        _check_dtype(factor_dtype, "factor_dtype")
        check_bool(time_phases, "time_phases")
        if grad_scaler is not None and not all(
            callable(getattr(grad_scaler, method, None)) for method in ("is_enabled", "get_scale")
        ):
            raise TypeError(
                "`grad_scaler` must be a torch.amp.GradScaler (or None), got "
                f"{type(grad_scaler).__name__}"
            )
        config = _distributed_config(distributed)
        self.distributed = config
        #: ``distributed`` left to its default with no process group yet: one initialised
        #: later must not go unnoticed (see :meth:`step`)
        self._alone_by_default = distributed is None and config is None
        self.seed = check_integer(seed, "seed")
        self.fisher = fisher
        self.grad_scaler = grad_scaler
        if isinstance(block, str):
            block = make_block(
                block, dtype=factor_dtype, seed=self.seed, fisher=fisher, **block_options
            )
        elif block_options:
            raise ValueError(
                f"options {sorted(block_options)} are for a block given by name; configure "
                "the block object instead"
            )
        layers = discover(model, skip_layers, getattr(block, "extra_layers", None))
        if not layers:
            raise ValueError(
                "Invalid model: no nn.Linear, nn.Conv1d or nn.Conv2d layer with a trainable "
                "weight to precondition (after skip_layers)"
            )
        device = next(iter(layers.values())).params[0].device
        self.generator: torch.Generator | None = None
        if fisher == "mc":
            self.generator = torch.Generator(device=device)
            # distinct targets on each process (the same seed would correlate their samples)
            rank = 0 if config is None else torch.distributed.get_rank(config.group)
            self.generator.manual_seed(self.seed + rank)
        capture = Capture(
            model,
            layers,
            dtype=factor_dtype,
            fisher=fisher,
            loss=loss,
            generator=self.generator,
            grad_scale=self._grad_scale,
        )
        self.engine = Engine(
            model,
            layers,
            block,
            clock=clock,
            capture=capture,
            dtype=factor_dtype,
            kl_clip=optional_schedule(kl_clip, "kl_clip", check_nonnegative),
            rms_clip=optional_schedule(rms_clip, "rms_clip", check_nonnegative),
            lr=optional_schedule(lr, "lr", check_nonnegative),
            grad_scaler=grad_scaler,
            time_phases=time_phases,
            dist=None if config is None else self._runtime_factory(config, block, locals()),
        )

    def _runtime_factory(
        self, config: Distributed, block: CurvatureBlock[Any], arguments: Mapping[str, Any]
    ) -> Callable[[Mapping[str, Any], CurvatureBlock[Any]], Runtime]:
        """What builds the engine's distributed phases, with the description of this process's
        layers and options that every process must share."""
        options = {
            key: arguments[key]
            for key in (
                "factor_decay", "damping", "factor_every", "inverse_every", "kl_clip",
                "rms_clip", "fisher", "loss", "factor_dtype", "seed",
            )
        }  # fmt: skip
        described = [
            f"{key}={'<schedule>' if callable(value) else value!r}"
            for key, value in options.items()
        ]
        described += [f"block {block.name!r}: {_block_description(block)}"]
        described += [f"statistics={config.statistics!r}"]
        dtype = arguments["factor_dtype"]

        def factory(layers: Mapping[str, Any], block: CurvatureBlock[Any]) -> Runtime:
            fingerprint = described + [
                f"layer {layer.describe()}: A {layer.dim_A}, G {layer.dim_G}, "
                f"parameters {[tuple(p.shape) for p in layer.params]}"
                for layer in layers.values()
            ]
            return Runtime(config, layers, block, dtype, fingerprint)

        return factory

    def _grad_scale(self) -> float:
        scaler = self.grad_scaler
        if scaler is None or not scaler.is_enabled():
            return 1.0
        return float(scaler.get_scale())

    # ------------------------------------------------------------------ introspection
    @property
    def block(self) -> CurvatureBlock[Any]:
        """The curvature block (the method's configuration)."""
        return self.engine.block

    @property
    def steps(self) -> int:
        """Steps taken."""
        return self.engine.steps

    @property
    def layer_names(self) -> list[str]:
        """Qualified names of the preconditioned layers, in model order."""
        return list(self.engine.layers)

    def layer(self, name: str) -> Layer:
        """The layer helper of ``name`` (its module, parameters, dimensions, layout)."""
        return self.engine.layers[name]

    def state(self, name: str) -> Any:
        """The block's state value for layer ``name`` (immutable; it is replaced, never
        modified, by later steps)."""
        return self.engine.states[name]

    @property
    def damping(self) -> float:
        """The damping of the coming step."""
        return self.engine.clock.damping(self.engine.steps)

    @damping.setter
    def damping(self, value: float) -> None:
        """Replace the damping (schedule) by the constant ``value`` from the coming step on
        (what an adaptive damping rule does)."""
        clock = self.engine.clock
        self.engine.clock = replace(clock, damping=Schedule(value, "damping", check_positive))

    def capture_plan(self) -> dict[str, CaptureSpec]:
        """What each layer records on the coming step (absent: nothing)."""
        return dict(self.engine.capture.plan)

    def recorded(self, name: str) -> LayerBatch | None:
        """What the hooks recorded for layer ``name`` since the last step (``None``:
        nothing)."""
        if name not in self.engine.capture.plan:
            return None
        return self.engine.capture.batch(name)

    @property
    def timings(self) -> dict[str, float]:
        """Seconds per phase, summed over steps (zeros unless ``time_phases=True``)."""
        return dict(self.engine.timings)

    def diagnostics(self) -> list[dict[str, Any]]:
        """The block's rows for every layer (for the K-FAC family: one row per factor with
        kind, dimension, rank, target rank, truncation ratio, Brand drift, updates, identity
        weight, memory in bytes and how the last direction was computed)."""
        return [
            row
            for name, layer in self.engine.layers.items()
            for row in self.block.diagnostics(layer, self.engine.states[name])
        ]

    def skip(self) -> None:
        """Discard what the hooks recorded for the coming step (a step that will not happen:
        the optimizer skipped it); the step count is unchanged."""
        self.engine.capture.reset()

    def report(self) -> None:
        """Warn now about any non-finite direction not yet reported (reads the device)."""
        self.engine.report()

    def remove(self) -> None:
        """Remove the hooks from the model (the preconditioner can no longer step)."""
        self.engine.capture.remove()

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(block={self.block.name!r}, layers={self.layer_names}, "
            f"fisher={self.fisher!r}, steps={self.steps})"
        )

    # ------------------------------------------------------------------ the step
    @torch.no_grad()
    def step(self, lr: float | Mapping[Tensor, float] | None = None) -> None:
        """Precondition the registered layers' gradients in place.

        Parameters
        ----------
        lr : float or mapping of weight tensor to float, optional
            Learning rate(s) for the KL clip (default: the constructor's ``lr``).

        Raises
        ------
        RuntimeError
            A layer with a non-zero gradient whose hooks never fired on a factor-update step;
            a process group of more than one process initialised after the constructor ran
            with the default ``distributed=None``.
        """
        if self._alone_by_default and _group_started():
            # each process would precondition with its own shard's curvature while the
            # gradients are averaged: the replicas would silently drift apart
            raise RuntimeError(
                "this preconditioner was built before torch.distributed.init_process_group, "
                "so it would run each process on its own and the model replicas would drift "
                "apart; build it after init_process_group (it then runs distributed), or pass "
                "`distributed=False` to run each process on its own deliberately"
            )
        with contextlib.ExitStack() as stack:
            # a step called inside torch.autocast still computes in the factors' dtype
            for kind in {
                p.device.type for name in self.layer_names for p in self.layer(name).params
            }:
                stack.enter_context(torch.autocast(kind, enabled=False))
            self.engine.step(lr)

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue exactly: step, block state, per-layer states, the
        sampler's generator.

        Distributed, every process must call it: each part's state is taken from its owner
        (one all-gather of the pickled owned states, so the whole curvature state travels to
        every process once), and every process returns the full state, which loads at any
        world size."""
        engine = self.engine
        layers = {name: self.block.state_dict(state) for name, state in engine.states.items()}
        if engine.dist is not None:
            layers = engine.dist.gather(layers)
        return {
            "steps": engine.steps,
            "block_name": self.block.name,
            "block": self.block.block_state_dict(),
            "layers": layers,
            "generator": None if self.generator is None else self.generator.get_state(),
        }

    def _prepare_load(self, state_dict: Any) -> Callable[[], None]:
        """Validate ``state_dict`` completely and return the function that installs it
        (which cannot fail): nothing changes unless everything is valid."""
        if not isinstance(state_dict, Mapping):
            raise ValueError(f"state_dict must be a mapping, got {type(state_dict).__name__}")
        missing = sorted({"steps", "block_name", "block", "layers"} - set(state_dict))
        if missing:
            raise ValueError(f"state_dict is missing the entries {missing}")
        if state_dict["block_name"] != self.block.name:
            raise ValueError(
                f"state_dict was saved with block {state_dict['block_name']!r}, this "
                f"preconditioner uses {self.block.name!r}"
            )
        steps = state_dict["steps"]
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
            raise ValueError(f"state_dict entry 'steps' must be an int >= 0, got {steps!r}")
        saved = state_dict["layers"]
        if not isinstance(saved, Mapping) or set(saved) != set(self.engine.layers):
            names = sorted(saved) if isinstance(saved, Mapping) else type(saved).__name__
            raise ValueError(
                f"state_dict layers {names} do not match the model's {self.layer_names}"
            )
        block_state = state_dict["block"]
        if not isinstance(block_state, Mapping):
            raise ValueError("state_dict entry 'block' must be a mapping")
        self.block.check_block_state_dict(block_state)
        states = {}
        for name, layer in self.engine.layers.items():
            try:
                states[name] = self.block.load_state(layer, saved[name], layer.params[0].device)
            except (KeyError, TypeError, AttributeError, IndexError, RuntimeError) as exc:
                raise ValueError(
                    f"state_dict entry of layer {layer.describe()} is malformed: "
                    f"{type(exc).__name__}: {exc}"
                ) from exc
        generator = self._loaded_generator(state_dict.get("generator"))

        def install() -> None:
            engine = self.engine
            engine.states = states
            self.block.load_block_state_dict(block_state)
            engine.steps = steps
            engine.capture.reset()
            engine.arm()
            if generator is not None and self.generator is not None:
                self.generator.set_state(generator.get_state())  # the capture's sampler

        return install

    def _loaded_generator(self, saved: Any) -> torch.Generator | None:
        """The Monte-Carlo sampler to install (``None``: keep the current one). A state saved
        on another kind of device (a CUDA run loaded on a CPU) cannot be restored: the
        sampler is re-seeded with ``seed`` and the CRC-32 of the saved state (deterministic,
        a different stream from the saved run's)."""
        current = self.generator
        if current is None or saved is None:
            return None
        if not isinstance(saved, Tensor) or saved.dtype != torch.uint8 or saved.ndim != 1:
            raise ValueError("state_dict entry 'generator' must be a 1-d uint8 tensor")
        fresh = torch.Generator(device=current.device)
        if saved.numel() == current.get_state().numel():
            try:
                fresh.set_state(saved.cpu())
            except RuntimeError as exc:
                raise ValueError(f"state_dict entry 'generator' is invalid: {exc}") from exc
            return fresh
        fresh.manual_seed(self.seed ^ zlib.crc32(saved.cpu().numpy().tobytes()))
        return fresh

    def check_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Raise ``ValueError`` unless ``state_dict`` fits this model and block (keys, types,
        shapes, finite values, eigenvalue signs, generator states)."""
        self._prepare_load(state_dict)

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`, validated completely before anything changes (a
        corrupted checkpoint raises ``ValueError`` and leaves the preconditioner as it
        was). Tensors move to each layer's device, so a state saved on another device
        loads; random generators saved on a device type absent here are re-seeded
        deterministically (:meth:`_loaded_generator`, ``kfac._kron.Generators``)."""
        self._prepare_load(state_dict)()


def _group_started() -> bool:
    """Whether a default process group of more than one process is initialised."""
    dist = torch.distributed
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _distributed_config(distributed: Any) -> Distributed | None:
    """The distributed configuration of ``distributed=`` (``None``: one process)."""
    if isinstance(distributed, Distributed):
        return distributed
    if distributed is None:
        return Distributed() if _group_started() else None
    if distributed is True:
        return Distributed()
    if distributed is False:
        return None
    kind = type(distributed).__name__
    raise TypeError(f"`distributed` must be a kfac.Distributed, a bool or None, got {kind}")


def _block_description(block: CurvatureBlock[Any]) -> str:
    """The configuration of a block, as far as its attributes show it."""
    strategy = getattr(block, "strategy", None)
    parts = [repr(strategy)] if strategy is not None else []
    scheme = getattr(block, "damping_scheme", None)
    if scheme is not None:
        parts.append(f"damping_scheme={getattr(scheme, 'name', type(scheme).__name__)!r}")
    for key in ("continuation", "factored_apply", "factor_init", "dtype"):
        if hasattr(block, key):
            parts.append(f"{key}={getattr(block, key)!r}")
    return ", ".join(parts)


class KFACPreconditioner(Preconditioner):
    """K-FAC preconditioner for the ``nn.Linear`` and ``nn.Conv2d`` layers of a model.

    Call :meth:`step` after ``loss.backward()`` and before any ``torch.optim`` optimizer's
    ``step()``: it replaces each registered layer's ``.grad`` by the damped natural-gradient
    direction ``(G + ...)^-1 grad (A + ...)^-1`` and leaves every other parameter alone.
    This is :class:`Preconditioner` with the Kronecker block (``block="kron"``).

    Parameters
    ----------
    model : nn.Module
        The model. Every ``nn.Linear`` and ``nn.Conv2d`` (``groups=1``) with a trainable
        weight is registered unless ``skip_layers`` excludes it.
    inverse : str, default "eigh"
        Inverse strategy from the registry (``kfac.inverse_names()``); ``"eigh"`` is K-FAC's
        full eigendecomposition, the others the low-rank family (docs/algorithms.md).
    factor_decay : float or callable(step), default 0.95
        Exponential-average decay ``rho`` of the factors, in ``[0, 1)``; ``0`` keeps only the
        latest statistics.
    damping : float or callable(step), default 0.1
        ``lambda > 0``; its meaning depends on ``damping_scheme`` (by default
        ``sqrt(lambda) = 0.32`` is added to each factor).
    damping_scheme : str, default "factored"
        One of ``"eigenbasis"``, ``"eigenbasis-relative"``, ``"factored"`` (``sqrt(lambda)``
        added to each factor), ``"factored-relative"``, ``"pi"`` (docs/kfac.md). The
        identity initialisation's weight ``rho^m`` is added to each factor in every scheme.
    continuation : bool, default True
        Treat the discarded spectrum of a truncated (low-rank) representation as flat at its
        smallest kept eigenvalue instead of zero; no effect on ``eigh``.
    factor_every, inverse_every : int or callable(step), default 1 and 10
        Periods, in steps, of the factor statistics and of the inverse refreshes.
        Statistics are computed only on factor-update steps. The defaults were chosen by
        measurement (docs/kfac.md); ``kfac.preset("thesis", optimizer=False)`` gives the
        thesis' settings (20 and 100, relative damping 0.1).
    kl_clip, rms_clip, lr, skip_layers, fisher, loss, factor_dtype, grad_scaler, seed, time_phases
        As for :class:`Preconditioner` (no clip by default: :class:`KFAC` clips at 1e-3,
        knowing the step's learning rate).
    distributed : Distributed or bool, optional
        As for :class:`Preconditioner`. With ``statistics="local"`` the rows application
        (``factored_apply``) is off.
    decomposition_dtype : torch.dtype, optional
        dtype of the decompositions (default ``factor_dtype``).
    factored_apply : bool, default True
        For a Linear layer whose two factors are Brand-tracked, compute the direction from
        the layer's per-sample rows, ``(I_G grad_outputs^T)(I_A inputs^T)^T`` (linear in the
        width), instead of applying the factors to the gradient matrix. Used with the
        factored damping schemes and the empirical Fisher, for float32/float64 layers whose
        parameters all train; on every step a random probe checks that the rows reproduce
        ``.grad`` (one host read per such layer), and a layer that fails (a penalty added to
        the loss, a gradient changed before :meth:`step`) is preconditioned from ``.grad``
        with a warning. ``diagnostics()`` reports which application each layer used.
    factor_init : {"identity", "zero"}, default "identity"
        Initialisation of the factors' exponential averages: ``"identity"`` (the K-FAC
        papers' ``X_0 = I``, carried as the weight ``rho^m`` added to the damping; the
        direction then depends on the scale of the loss) or ``"zero"`` (the average divided
        by its total weight ``1 - rho^m``, as Adam and kfac-jax do; with a relative damping
        scheme the direction scales exactly as ``1 / c`` when the loss is multiplied by
        ``c``).
    **inverse_options
        Options of the inverse strategy (the low-rank strategies take ``rank``,
        ``oversample``, ``power_iters``, ...).

    Raises
    ------
    ValueError
        An invalid hyperparameter (``"Invalid damping: ..."``), an unknown ``inverse`` (the
        message lists the valid names), an unsupported Conv2d (``groups != 1``), a model with
        no supported layer.

    Notes
    -----
    Per step ``k``: on factor-update steps the hooks record the layer inputs and output
    gradients and each factor is updated, ``X <- rho X + (1 - rho) X_inst``; on
    inverse-update steps each factor's representation ``(U, d)`` is refreshed and the damped
    inverse prepared; then every layer's direction is computed in ``factor_dtype`` and
    clipped. A layer whose gradient or statistics contain NaN/Inf keeps its factors (a
    warning names it) and its gradient is left as it is.

    Examples
    --------
    >>> import torch
    >>> from torch import nn
    >>> import kfac
    >>> model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    >>> precond = kfac.KFACPreconditioner(model, factor_every=1, inverse_every=1)
    >>> opt = torch.optim.SGD(model.parameters(), lr=0.1)
    >>> loss = nn.functional.cross_entropy(model(torch.randn(16, 4)), torch.randint(2, (16,)))
    >>> loss.backward()
    >>> precond.step()
    >>> opt.step()
    >>> precond.layer_names
    ['0', '2']
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        inverse: str = "eigh",
        factor_decay: Any = 0.95,
        damping: Any = 0.1,
        damping_scheme: str = "factored",
        continuation: bool = True,
        factor_every: Any = 1,
        inverse_every: Any = 10,
        kl_clip: Any = None,
        rms_clip: Any = None,
        lr: Any = None,
        skip_layers: Iterable[Any] = (),
        fisher: str = "empirical",
        loss: str | None = None,
        factor_dtype: torch.dtype = torch.float32,
        decomposition_dtype: torch.dtype | None = None,
        grad_scaler: Any = None,
        factored_apply: bool = True,
        factor_init: str = "identity",
        seed: int = 0,
        time_phases: bool = False,
        distributed: Distributed | bool | None = None,
        **inverse_options: Any,
    ) -> None:
        _check_dtype(decomposition_dtype, "decomposition_dtype")
        config = _distributed_config(distributed)
        if config is not None and config.statistics == "local":
            factored_apply = False  # a process's rows do not reproduce the averaged gradient
        super().__init__(
            model,
            "kron",
            factor_decay=factor_decay,
            damping=damping,
            factor_every=factor_every,
            inverse_every=inverse_every,
            kl_clip=kl_clip,
            rms_clip=rms_clip,
            lr=lr,
            skip_layers=skip_layers,
            fisher=fisher,
            loss=loss,
            factor_dtype=factor_dtype,
            grad_scaler=grad_scaler,
            seed=seed,
            time_phases=time_phases,
            # None stays None: the base class then refuses a process group started later
            distributed=config if config is not None or distributed is None else False,
            inverse=inverse,
            damping_scheme=damping_scheme,
            continuation=continuation,
            factored_apply=factored_apply,
            decomposition_dtype=decomposition_dtype,
            factor_init=factor_init,
            **inverse_options,
        )

    @property
    def kron(self) -> KronBlock:
        """The Kronecker block (strategy, damping scheme, options)."""
        block = self.block
        assert isinstance(block, KronBlock)
        return block

    @property
    def inverse_name(self) -> str:
        """The registry name of the inverse strategy."""
        return self.kron.strategy.name

    @property
    def damping_scheme(self) -> str:
        """The damping scheme's name."""
        return self.kron.damping_scheme.name

    def state(self, name: str) -> KronState:
        """The :class:`~kfac._kron.KronState` of layer ``name``: factors ``A`` and ``G``
        (each a frozen ``FactorState``: dense EA, online state, applied representation,
        rank state, counters) and the prepared inverse."""
        state: KronState = super().state(name)
        return state

    def factors(self, name: str) -> tuple[Tensor | None, Tensor | None]:
        """The dense exponential averages ``(A, G)`` of layer ``name`` (``None`` before any
        update, and for a factor the strategy keeps only in low-rank form).

        The identity initialisation is not included (see ``identity_weights``).
        """
        state = self.state(name)
        return state.A.matrix, state.G.matrix

    def representations(self, name: str) -> tuple[ln.LowRankPSD | None, ln.LowRankPSD | None]:
        """The representations ``(A, G)`` the preconditioner applies for layer ``name``."""
        state = self.state(name)
        return state.A.rep, state.G.rep

    def identity_weights(self, name: str) -> tuple[float, float]:
        """Weights ``(rho^m_A, rho^m_G)`` of the identity initialisation of layer ``name``
        (``m`` counts the factor's updates, or its statistics batches for a Brand-tracked
        factor with ``identity_clock="batches"``)."""
        state = self.state(name)
        return state.A.identity, state.G.identity

    def __repr__(self) -> str:
        return (
            f"KFACPreconditioner(inverse={self.inverse_name!r}, layers={self.layer_names}, "
            f"damping_scheme={self.damping_scheme!r}, fisher={self.fisher!r}, "
            f"steps={self.steps})"
        )
