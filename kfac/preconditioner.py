"""``KFACPreconditioner``: rewrites each registered layer's ``.grad`` into its K-FAC direction."""

from __future__ import annotations

import fnmatch
import time
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

import lowrank_nla as ln

from ._capture import LOSSES, Capture
from ._damping import (
    DAMPING_SCHEMES,
    Schedule,
    check_decay,
    check_int_at_least,
    check_nonnegative,
    check_positive,
    factored_scheme,
    kl_clip_scale,
    precondition,
    rms_clip,
)
from ._factors import Factor
from ._inverse import make_inverse
from ._layers import SUPPORTED_TYPES, LinearLayer, make_layer

__all__ = ["KFACPreconditioner"]

FISHER_TYPES = ("empirical", "mc")
_STAT_DTYPES = (torch.float32, torch.float64)


@dataclass
class _LayerState:
    layer: Any
    A: Factor
    G: Factor

    def ready(self) -> bool:
        return self.A.rep is not None and self.G.rep is not None


PHASES = ("statistics", "update", "refresh", "apply")


def _optional(value: Any, name: str) -> Schedule[float] | None:
    return None if value is None else Schedule(value, name, check_positive)


def _discover(model: nn.Module, skip_layers: Iterable[Any]) -> dict[str, Any]:
    if isinstance(skip_layers, (str, type)):
        skip_layers = [skip_layers]
    patterns: list[str] = []
    types: list[type] = []
    for item in skip_layers:
        if isinstance(item, str):
            patterns.append(item)
        elif isinstance(item, type) and issubclass(item, nn.Module):
            types.append(item)
        else:
            raise ValueError(
                f"Invalid skip_layers entry: {item!r} (must be a name pattern or an nn.Module "
                "subclass)"
            )
    names = [name for name, _ in model.named_modules()]
    for pattern in patterns:
        if not fnmatch.filter(names, pattern):
            raise ValueError(f"Invalid skip_layers entry: pattern {pattern!r} matches no module")
    layers: dict[str, Any] = {}
    for name, module in model.named_modules():
        if not isinstance(module, SUPPORTED_TYPES) or isinstance(module, tuple(types)):
            continue
        if any(fnmatch.fnmatchcase(name, pattern) for pattern in patterns):
            continue
        if not module.weight.requires_grad:
            continue
        layers[name] = make_layer(name, module)
    return layers


class KFACPreconditioner:
    """K-FAC preconditioner for the ``nn.Linear`` and ``nn.Conv2d`` layers of a model.

    Call :meth:`step` after ``loss.backward()`` and before any ``torch.optim`` optimizer's
    ``step()``: it replaces each registered layer's ``.grad`` by the damped natural-gradient
    direction ``(G + ...)^-1 grad (A + ...)^-1`` and leaves every other parameter alone.

    Parameters
    ----------
    model : nn.Module
        The model. Every ``nn.Linear`` and ``nn.Conv2d`` (``groups=1``) with a trainable
        weight is registered unless ``skip_layers`` excludes it.
    inverse : str, default "eigh"
        Inverse strategy from the registry (``kfac.inverse_names()``); ``"eigh"`` is K-FAC's
        full eigendecomposition.
    factor_decay : float or callable(step), default 0.95
        Exponential-average decay ``rho`` of the factors, in ``[0, 1)``; ``0`` keeps only the
        latest statistics.
    damping : float or callable(step), default 0.1
        ``lambda > 0``; its meaning depends on ``damping_scheme``.
    damping_scheme : str, default "factored-relative"
        One of ``"eigenbasis"``, ``"eigenbasis-relative"``, ``"factored"``,
        ``"factored-relative"``, ``"pi"`` (see ``kfac._damping``). The identity
        initialisation's weight ``rho^m`` is added to each factor in every scheme.
    continuation : bool, default True
        Treat the discarded spectrum of a truncated (low-rank) representation as flat at its
        smallest kept eigenvalue instead of zero (ALGORITHMS.md 1.5); no effect on ``eigh``.
    factor_every, inverse_every : int or callable(step), default 20 and 100
        Periods, in steps, of the factor statistics and of the inverse refreshes (thesis runs,
        ALGORITHMS.md 2.2). Statistics are computed only on factor-update steps.
    kl_clip : float or callable(step), optional
        Global KL clip ``nu = min(1, sqrt(kl_clip / |sum lr^2 <V, grad>|))``; needs ``lr``.
    rms_clip : float or callable(step), optional
        Per-layer clip of the direction's RMS to ``rms_clip`` (the thesis' "non-standard"
        clip).
    lr : float or callable(step), optional
        Learning rate used by ``kl_clip`` when :meth:`step` is not given one.
    skip_layers : iterable of str or nn.Module subclasses, default ()
        Layers left unpreconditioned: ``fnmatch`` patterns on qualified module names
        (``"decoder.*"``) or module types.
    fisher : {"empirical", "mc"}, default "empirical"
        Output-gradient statistics from the true-label backward (empirical Fisher, the
        papers' choice) or from one extra backward with targets sampled from the model's
        predictive distribution on factor-update steps (Monte-Carlo Fisher).
    loss : {"cross_entropy", "mse"}, optional
        The batch-mean training loss; required by ``fisher="mc"`` to sample targets.
    factor_dtype : torch.dtype, default torch.float32
        dtype of the statistics, factors and preconditioning (float32 or float64),
        independent of the model dtype.
    decomposition_dtype : torch.dtype, optional
        dtype of the decompositions (default ``factor_dtype``).
    grad_scaler : torch.amp.GradScaler, optional
        The scaler of a mixed-precision loop: captured output gradients are divided by its
        scale, and steps whose gradients overflowed are skipped without a warning.
    factored_apply : bool, default True
        For a Linear layer whose two factors are Brand-tracked, compute the direction from
        the layer's per-sample rows, ``(I_G grad_outputs^T)(I_A inputs^T)^T``
        (:func:`lowrank_nla.kron_inverse_apply_factored`, linear in the width), instead of
        applying the factors to the gradient matrix. Used with the factored damping schemes
        and the empirical Fisher, for float32/float64 layers whose parameters all train; on
        every step a random probe checks that the rows reproduce ``.grad`` and a layer that
        fails (a penalty added to the loss, gradient accumulation, a gradient changed
        before :meth:`step`) is preconditioned from ``.grad`` with a warning.
        ``diagnostics()`` reports which application each layer used.
    seed : int, default 0
        Seed of the Monte-Carlo target sampler and of the factored application's probes.
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
    inverse-update steps each factor's representation ``(U, d)`` is refreshed; then every
    layer's direction is computed in ``factor_dtype`` and clipped. A layer whose gradient or
    statistics contain NaN/Inf keeps its factors (a warning names it) and its gradient is
    left as it is.

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
        damping_scheme: str = "factored-relative",
        continuation: bool = True,
        factor_every: Any = 20,
        inverse_every: Any = 100,
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
        seed: int = 0,
        **inverse_options: Any,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"`model` must be an nn.Module, got {type(model).__name__}")
        self.factor_decay = Schedule(factor_decay, "factor_decay", check_decay)
        self.damping = Schedule(damping, "damping", check_positive)
        if damping_scheme not in DAMPING_SCHEMES:
            raise ValueError(
                f"Invalid damping_scheme: {damping_scheme!r}; valid names are "
                f"{list(DAMPING_SCHEMES)}"
            )
        self.damping_scheme = damping_scheme
        if not isinstance(continuation, bool):
            raise ValueError(f"Invalid continuation: {continuation!r} (must be a bool)")
        self.continuation = continuation
        if not isinstance(factored_apply, bool):
            raise ValueError(f"Invalid factored_apply: {factored_apply!r} (must be a bool)")
        self.factored_apply = factored_apply
        self.factor_every = Schedule(factor_every, "factor_every", check_int_at_least(1))
        self.inverse_every = Schedule(inverse_every, "inverse_every", check_int_at_least(1))
        self.kl_clip = _optional(kl_clip, "kl_clip")
        self.rms_clip = _optional(rms_clip, "rms_clip")
        self.lr = None if lr is None else Schedule(lr, "lr", check_nonnegative)
        if fisher not in FISHER_TYPES:
            raise ValueError(f"Invalid fisher: {fisher!r}; valid names are {list(FISHER_TYPES)}")
        if fisher == "mc" and loss not in LOSSES:
            raise ValueError(f"Invalid loss: {loss!r}; fisher='mc' needs one of {list(LOSSES)}")
        if loss is not None and loss not in LOSSES:
            raise ValueError(f"Invalid loss: {loss!r}; valid names are {list(LOSSES)}")
        for name, dtype in (
            ("factor_dtype", factor_dtype),
            ("decomposition_dtype", decomposition_dtype),
        ):
            if dtype is not None and dtype not in _STAT_DTYPES:
                raise ValueError(
                    f"Invalid {name}: {dtype} (must be torch.float32 or torch.float64)"
                )
        self.fisher = fisher
        self.dtype = factor_dtype
        self.inverse = make_inverse(
            inverse, dtype=decomposition_dtype or factor_dtype, options=inverse_options
        )
        self.grad_scaler = grad_scaler
        layers = _discover(model, skip_layers)
        if not layers:
            raise ValueError(
                "Invalid model: no nn.Linear or nn.Conv2d layer with a trainable weight to "
                "precondition (after skip_layers)"
            )
        self._states = {
            name: _LayerState(layer, Factor(layer.dim_A), Factor(layer.dim_G))
            for name, layer in layers.items()
        }
        self.timings = dict.fromkeys(PHASES, 0.0)
        self.steps = 0
        self.seed = int(seed)
        device = next(iter(layers.values())).params[0].device
        self.generator: torch.Generator | None = None
        if fisher == "mc":
            self.generator = torch.Generator(device=device)
            self.generator.manual_seed(int(seed))
        self._capture = Capture(
            model,
            layers,
            active=self._is_factor_step,
            dtype=factor_dtype,
            fisher=fisher,
            loss=loss,
            generator=self.generator,
            grad_scale=self._grad_scale,
            keep_rows={n for n, layer in layers.items() if self.inverse.wants_block(layer)},
        )
        # Layers that may use the factored application once both factors are Brand-tracked.
        self._row_candidates = {
            name
            for name, layer in layers.items()
            if factored_apply
            and fisher == "empirical"
            and factored_scheme(damping_scheme)
            and isinstance(layer, LinearLayer)
            and name in self._capture.keep_rows
            and all(p.requires_grad and p.dtype in _STAT_DTYPES for p in layer.params)
        }
        self._probes: dict[str, Tensor] = {}
        self._row_mismatch: set[str] = set()
        self._applied: dict[str, str] = {}

    # ------------------------------------------------------------------ introspection
    @property
    def layer_names(self) -> list[str]:
        """Qualified names of the preconditioned layers, in model order."""
        return list(self._states)

    @property
    def inverse_name(self) -> str:
        """The registry name of the inverse strategy."""
        return self.inverse.name

    def factors(self, name: str) -> tuple[Tensor | None, Tensor | None]:
        """The dense exponential averages ``(A, G)`` of layer ``name`` (``None`` before any
        update, and for a factor the strategy keeps only in low-rank form).

        The identity initialisation is not included (see ``identity_weights``).
        """
        state = self._states[name]
        return state.A.matrix, state.G.matrix

    def representations(self, name: str) -> tuple[ln.LowRankPSD | None, ln.LowRankPSD | None]:
        """The representations ``(A, G)`` the preconditioner applies for layer ``name``."""
        state = self._states[name]
        return state.A.rep, state.G.rep

    def diagnostics(self) -> list[dict[str, Any]]:
        """One row per factor: kind, dimension, rank, target rank, truncation ratio
        ``d_min / d_max``, Brand drift estimate, EA updates, identity weight, memory in
        bytes, and how the
        layer's last direction was computed (``"apply"``: ``"factored"`` from the rows,
        ``"dense"`` from the gradient matrix, ``None`` before the first one).

        Time per phase (seconds, summed over steps) is in :attr:`timings`:
        ``statistics`` (hooks' products are not included), ``update``, ``refresh``,
        ``apply``.
        """
        rows = []
        for name, state in self._states.items():
            for side, factor in (("A", state.A), ("G", state.G)):
                rep = factor.rep
                kind = "brand" if factor.brand else ("dense" if factor.matrix is not None else "-")
                rows.append(
                    {
                        "layer": name,
                        "factor": side,
                        "kind": kind,
                        "dim": factor.dim,
                        "rank": None if rep is None else rep.rank,
                        "target_rank": None if factor.rank is None else factor.rank.rank,
                        "truncation_ratio": (
                            None if rep is None or rep.rank == 0 else ln.truncation_ratio(rep.d)
                        ),
                        "drift": factor.drift if factor.brand else None,
                        "updates": factor.updates,
                        "identity": factor.identity,
                        "memory": factor.memory(),
                        "apply": self._applied.get(name),
                    }
                )
        return rows

    def identity_weights(self, name: str) -> tuple[float, float]:
        """Weights ``(rho^m_A, rho^m_G)`` of the identity initialisation of layer ``name``
        (``m`` counts the factor's updates, or its statistics batches for a Brand-tracked
        factor with ``identity_clock="batches"``)."""
        state = self._states[name]
        return state.A.identity, state.G.identity

    def __repr__(self) -> str:
        return (
            f"KFACPreconditioner(inverse={self.inverse.name!r}, layers={self.layer_names}, "
            f"damping_scheme={self.damping_scheme!r}, fisher={self.fisher!r}, "
            f"steps={self.steps})"
        )

    def remove(self) -> None:
        """Remove the hooks from the model (the preconditioner can no longer step)."""
        self._capture.remove()

    # ------------------------------------------------------------------ the step
    def _is_factor_step(self) -> bool:
        return self.steps % self.factor_every(self.steps) == 0

    def _grad_scale(self) -> float:
        scaler = self.grad_scaler
        if scaler is None or not scaler.is_enabled():
            return 1.0
        return float(scaler.get_scale())

    def _warn_nonfinite(self, layers: list[Any], what: str) -> None:
        if not layers:
            return
        if self.grad_scaler is not None and self.grad_scaler.is_enabled():
            return  # an overflow step: the scaler skips it
        names = ", ".join(layer.describe() for layer in layers)
        warnings.warn(
            f"non-finite {what} in layer {names} at step {self.steps}: {what} left unused, "
            "factors unchanged",
            RuntimeWarning,
            stacklevel=3,
        )

    def _update_factors(self, finite: Mapping[str, bool]) -> None:
        decay = self.factor_decay(self.steps)
        period = self.inverse_every(self.steps)
        bad = []
        for name, state in self._states.items():
            if name not in finite:
                continue
            start = time.perf_counter()
            stats = self._capture.statistics(name)
            if stats is None:
                raise RuntimeError(
                    f"layer {state.layer.describe()} has a gradient but its hooks never fired "
                    f"on factor-update step {self.steps}: K-FAC records a layer through its "
                    "forward and output-gradient hooks, so it must be called as a module in a "
                    "forward with gradients enabled (not through torch.nn.functional with its "
                    "weight); exclude it with `skip_layers` otherwise"
                )
            stats_A, stats_G = stats
            self.timings["statistics"] += time.perf_counter() - start
            if not finite[name]:
                continue  # already reported for the gradient
            if not (stats_A.finite() and stats_G.finite()):
                bad.append(state.layer)
                continue
            start = time.perf_counter()
            self.inverse.update(state.A, stats_A, decay, self.steps, period)
            self.inverse.update(state.G, stats_G, decay, self.steps, period)
            self.timings["update"] += time.perf_counter() - start
        self._warn_nonfinite(bad, "statistics")
        self._sync_apply_rows()

    def _sync_apply_rows(self) -> None:
        """Record every step's rows of the candidates whose two factors are Brand-tracked."""
        self._capture.apply_rows = {
            name
            for name in self._row_candidates
            if self._states[name].A.brand and self._states[name].G.brand
        }

    def _probe(self, name: str, V: Tensor) -> Tensor:
        probe = self._probes.get(name)
        if probe is None:
            index = self.layer_names.index(name)
            gen = torch.Generator(device=V.device).manual_seed(self.seed + 7919 * (index + 1))
            probe = torch.randn(V.shape[1], generator=gen, device=V.device, dtype=V.dtype)
            self._probes[name] = probe
        return probe

    def _rows_match(self, name: str, V: Tensor, g_rows: Tensor, a_rows: Tensor) -> bool:
        """Whether ``g_rows^T a_rows`` is the gradient ``V``, checked on a random probe ``x``:
        ``|V x - g_rows^T (a_rows x)| <= 8 N eps ||g_rows||_F ||a_rows x||`` (rounding of
        the two ``N``-term sums), ``O((d_G + d_A) N + d_G d_A)``."""
        x = self._probe(name, V)
        ax = a_rows @ x
        err = float(torch.linalg.vector_norm(V @ x - g_rows.T @ ax))
        weight = self._states[name].layer.params[0]
        eps = max(torch.finfo(V.dtype).eps, torch.finfo(weight.dtype).eps)
        bound = float(torch.linalg.vector_norm(g_rows)) * float(torch.linalg.vector_norm(ax))
        return err <= 8 * g_rows.shape[0] * eps * bound

    def _refresh(self, inverse_step: bool) -> None:
        start = time.perf_counter()
        for state in self._states.values():
            for factor in (state.G, state.A):
                self.inverse.refresh(factor, self.steps, inverse_step, self.dtype)
        self.timings["refresh"] += time.perf_counter() - start

    def _warn_row_mismatch(self, names: list[str]) -> None:
        new = [name for name in names if name not in self._row_mismatch]
        if not new:
            return
        self._row_mismatch.update(new)
        layers = ", ".join(self._states[name].layer.describe() for name in new)
        warnings.warn(
            f"the gradient of layer {layers} is not the product of its recorded output "
            f"gradients and inputs at step {self.steps} (a penalty added to the loss, gradient "
            "accumulation over several forwards, or a gradient modified before step()?): "
            "preconditioning .grad instead of the rows for the steps where this happens; "
            "pass factored_apply=False to always do so",
            RuntimeWarning,
            stacklevel=5,
        )

    def _lr_for(self, lr: Any, weight: Tensor) -> float:
        if isinstance(lr, Mapping):
            return float(lr[weight])
        if lr is not None:
            return float(lr)
        if self.lr is None:
            raise ValueError("kl_clip needs a learning rate: pass `lr` to the constructor or step")
        return self.lr(self.steps)

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
            A layer with a gradient whose hooks never fired on a factor-update step.
        """
        grads: dict[str, Tensor] = {}
        finite: dict[str, bool] = {}
        for name, state in self._states.items():
            if state.layer.has_grad():
                grads[name] = state.layer.grad_matrix(self.dtype)
                finite[name] = bool(torch.isfinite(grads[name]).all())
        self._warn_nonfinite(
            [self._states[n].layer for n, ok in finite.items() if not ok], "gradient"
        )
        try:
            if self._is_factor_step():
                self._update_factors(finite)
            self._refresh(self.steps % self.inverse_every(self.steps) == 0)
            start = time.perf_counter()
            self._apply(grads, finite, lr)
            self.timings["apply"] += time.perf_counter() - start
        finally:
            self.steps += 1
            self._capture.reset()

    def _apply(self, grads: dict[str, Tensor], finite: dict[str, bool], lr: Any) -> None:
        damping = self.damping(self.steps)
        kappa = None if self.rms_clip is None else self.rms_clip(self.steps)
        directions: dict[str, Tensor] = {}
        mismatched = []
        for name, V in grads.items():
            state = self._states[name]
            if not finite[name] or not state.ready():
                continue
            assert state.G.rep is not None
            assert state.A.rep is not None
            rows = self._capture.rows(name) if name in self._capture.apply_rows else None
            if rows is not None and not self._rows_match(name, V, *rows):
                mismatched.append(name)
                rows = None
            D = precondition(
                state.G.rep,
                state.A.rep,
                V if rows is None else rows,
                damping=damping,
                scheme=self.damping_scheme,
                shift=(state.G.rep_identity, state.A.rep_identity),
                continuation=self.continuation,
            )
            self._applied[name] = "dense" if rows is None else "factored"
            directions[name] = D if kappa is None else rms_clip(D, kappa)
        self._warn_row_mismatch(mismatched)
        if self.kl_clip is not None and directions:
            terms = [
                (D, grads[name], self._lr_for(lr, self._states[name].layer.params[0]))
                for name, D in directions.items()
            ]
            nu = kl_clip_scale(terms, self.kl_clip(self.steps))
            directions = {name: D * nu for name, D in directions.items()}
        for name, D in directions.items():
            self._states[name].layer.write_grad(D)

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue exactly: step, factors (dense EA, online state,
        representation, ranks), the strategy's and the sampler's generators."""
        return {
            "steps": self.steps,
            "inverse_name": self.inverse.name,
            "layers": {
                name: {"A": state.A.state_dict(), "G": state.G.state_dict()}
                for name, state in self._states.items()
            },
            "inverse": self.inverse.state_dict(),
            "generator": None if self.generator is None else self.generator.get_state(),
        }

    def check_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Raise ``ValueError`` unless ``state_dict`` fits this model and strategy."""
        if state_dict.get("inverse_name") != self.inverse.name:
            raise ValueError(
                f"state_dict was saved with inverse={state_dict.get('inverse_name')!r}, this "
                f"preconditioner uses {self.inverse.name!r}"
            )
        saved = state_dict["layers"]
        if set(saved) != set(self._states):
            raise ValueError(
                f"state_dict layers {sorted(saved)} do not match the model's {self.layer_names}"
            )
        for name, state in self._states.items():
            state.A.check_state_dict(saved[name]["A"], f"A of layer '{name}'")
            state.G.check_state_dict(saved[name]["G"], f"G of layer '{name}'")

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`. Tensors move to each layer's device, so a state saved
        on another device (or by a run with another world size: the state is per model,
        not per process) loads as long as the layers and shapes match."""
        self.check_state_dict(state_dict)
        for name, state in self._states.items():
            device = state.layer.params[0].device
            state.A.load_state_dict(state_dict["layers"][name]["A"], device=device)
            state.G.load_state_dict(state_dict["layers"][name]["G"], device=device)
        self.inverse.load_state_dict(state_dict.get("inverse", {}))
        self.steps = int(state_dict["steps"])
        self._sync_apply_rows()
        gen_state = state_dict.get("generator")
        if self.generator is not None and gen_state is not None:
            self.generator.set_state(gen_state)
