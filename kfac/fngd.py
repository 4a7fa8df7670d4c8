"""FNGD: inverse-free fast natural gradient descent (Ou, Zhu, Huang and Liu, arXiv 2403.03473).

With ``G = [G_1, ..., G_n]`` the per-sample gradients of a layer (or of every preconditioned
layer together), the damped natural gradient of the empirical Fisher
``F = G G^T / n`` applied to the batch gradient ``g = G 1 / n`` is a re-weighting of the
per-sample gradients (Sherman-Morrison-Woodbury)::

    (F + lambda I)^{-1} g = G alpha,    alpha = (K + n lambda I)^{-1} 1,    K = G^T G.

Only the ``n x n`` Gram ``K`` is needed (``kfac._persample``: Hadamard products of the row
Grams, never the per-sample gradients of a Linear layer), and the direction ``G alpha`` is
one GEMM over the layer's rows. FNGD stores ``alpha`` when it computes it and, on later
epochs, reuses the stored coefficients with the *current* per-sample gradients: no Gram and
no solve, a step of about SGD's cost. See docs/algorithms.md, *FNGD and SENG*.

Options (:class:`FNGDBlock`):

- ``coefficients``: ``"per-layer"`` (one ``alpha`` per layer from its own Gram) or
  ``"shared"`` (one ``alpha`` from the sum of the layers' Grams: the natural gradient of the
  block of all preconditioned layers together).
- ``damping_mode``: ``"relative"`` (``lambda = damping tr(K) / n``) or ``"absolute"``.
- ``store``: ``"index"`` (coefficients keyed by the dataset index of each sample: pass the
  batch's ``indices`` to ``step``), ``"slot"`` (keyed by the step's slot within the epoch,
  ``step % steps_per_epoch``), or ``"none"`` (recompute every step: the exact per-batch SMW
  natural gradient).
- ``compute_epochs``, ``refresh_epochs`` and ``refresh_steps``: compute (and overwrite) the
  stored coefficients during the first ``compute_epochs`` epochs (default 1), every
  ``refresh_epochs`` epochs (epochs of ``steps_per_epoch`` steps) and every
  ``refresh_steps`` steps; otherwise they are computed once, the first time a key is seen.

The weighted step (``weighted_step``), on steps that reuse stored coefficients:
``"rows"`` forms ``G alpha`` as one weighted outer product per layer from the recorded rows;
``"loss"`` (shared coefficients only) has the training loop back-propagate the weighted
loss ``sum_i alpha_i l_i`` instead (:meth:`FNGDPreconditioner.loss_weights` gives the
weights before the forward pass), whose gradient is the direction, and nothing is recorded.
Measured on the digits CNN and autoencoder (docs/kfac.md), the weighted backward costs about
an SGD step and the outer products much more (the convolutions' rows are their unfolded
patches), so the default is ``"loss"`` with shared coefficients (one process) and ``"rows"``
otherwise. With ``"loss"`` a reusing step whose backward was not weighted raises
``ValueError`` (never a silent change of path).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar, NamedTuple

import torch
from torch import Tensor, nn

import lowrank_nla as ln

from . import _persample as ps
from ._curvature import CaptureSpec, CurvatureBlock, LayerBatch, Tick, register_block
from ._layers import Layer
from .optimizer import PreconditionedSGD, unhooked
from .preconditioner import Preconditioner, _distributed_config

__all__ = [
    "COEFFICIENTS",
    "DAMPING_MODES",
    "FNGD",
    "STORES",
    "WEIGHTED_STEPS",
    "CoefficientStore",
    "FNGDBlock",
    "FNGDPreconditioner",
    "FNGDState",
    "fngd_block",
]

COEFFICIENTS = ("per-layer", "shared")
DAMPING_MODES = ("relative", "absolute")
STORES = ("index", "slot", "none")
WEIGHTED_STEPS = ("loss", "rows")
#: Key of the one coefficient set of ``coefficients="shared"``.
SHARED = "*"


class CoefficientStore:
    """The stored coefficients of one coefficient set (one layer, or the shared set).

    ``"index"`` keys: a table ``alpha[index]`` that grows with the largest index seen, with a
    host-side mask of the filled entries (so deciding whether a batch is known reads nothing
    back from the device). ``"slot"`` keys: one ``(n,)`` tensor per slot.
    """

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self.table: Tensor | None = None
        self.filled = torch.zeros(0, dtype=torch.bool)
        self.slots: dict[int, Tensor] = {}

    def lookup(self, key: Any) -> Tensor | None:
        """The stored coefficients of ``key`` (indices or a slot), ``None`` if any is missing."""
        if self.kind == "index":
            idx: Tensor = key
            if self.table is None or int(idx.max()) >= self.filled.numel():
                return None
            if not bool(self.filled[idx].all()):
                return None
            return self.table[idx.to(self.table.device)]
        return self.slots.get(int(key))

    def put(self, key: Any, alpha: Tensor) -> None:
        """Store ``alpha`` under ``key`` (overwriting)."""
        if self.kind != "index":
            self.slots[int(key)] = alpha.detach().clone()
            return
        idx: Tensor = key
        size = int(idx.max()) + 1
        if self.table is None or size > self.table.numel():
            grown = alpha.new_zeros(max(size, 2 * self.filled.numel()))
            mask = torch.zeros(grown.numel(), dtype=torch.bool)
            if self.table is not None:
                grown[: self.table.numel()] = self.table
                mask[: self.filled.numel()] = self.filled
            self.table, self.filled = grown, mask
        self.table[idx.to(self.table.device)] = alpha.detach().to(self.table.dtype)
        self.filled[idx] = True

    def __len__(self) -> int:
        return int(self.filled.sum()) if self.kind == "index" else len(self.slots)

    def state_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "table": self.table,
            "filled": self.filled,
            "slots": {int(k): v for k, v in self.slots.items()},
        }

    @classmethod
    def from_state_dict(cls, saved: Mapping[str, Any], device: torch.device) -> CoefficientStore:
        store = cls(str(saved["kind"]))
        table = saved.get("table")
        store.table = None if table is None else table.to(device)
        store.filled = saved["filled"].to("cpu", torch.bool)
        store.slots = {int(k): v.to(device) for k, v in saved.get("slots", {}).items()}
        return store


def _positive_int(value: Any) -> bool:
    return not isinstance(value, bool) and isinstance(value, int) and value >= 1


class FNGDState(NamedTuple):
    """One layer's coefficients for the current step (``alpha``, tagged with the ``step``
    they belong to; ``None`` outside that step) and counters of computed and reused steps."""

    alpha: Tensor | None = None
    step: int = -1
    computed: int = 0
    reused: int = 0
    gram: str = "-"


class FNGDBlock(CurvatureBlock[FNGDState]):
    """The FNGD curvature block (see the module docstring).

    Parameters
    ----------
    dtype : torch.dtype
        Statistics dtype (float32 or float64): Grams, coefficients and directions.
    coefficients : {"per-layer", "shared"}, default "per-layer"
    damping_mode : {"relative", "absolute"}, default "relative"
    store : {"index", "slot", "none"}, default "index"
    steps_per_epoch : int, optional
        Steps per epoch: needed by ``store="slot"`` and ``refresh_epochs``.
    refresh_epochs : int, optional
        Recompute the coefficients on every ``refresh_epochs``-th epoch (0, E, 2E, ...).
    gram : {"auto", "positions", "explicit"}, default "auto"
        How the Grams are formed (``kfac._persample``'s cost rule).
    compute_epochs : int, default 1
        Epochs, from the first, in which every step computes its coefficients (more than 1
        needs ``steps_per_epoch``).
    refresh_steps : int, optional
        Also recompute the coefficients on every ``refresh_steps``-th step (0, k, 2k, ...).
    weighted_step : {"loss", "rows"}, default "rows"
        How a reusing step forms ``G alpha`` (module docstring); ``"loss"`` needs
        ``coefficients="shared"``.

    Notes
    -----
    The block keeps the coefficient stores and, within a step, the sum of the layers' Grams
    of the shared set: this is block-level state (:meth:`block_state_dict` saves the stores),
    because the shared coefficients couple every layer.
    """

    name: ClassVar[str] = "fngd"
    #: Under ``torch.distributed`` every process gathers the global batch's rows and solves
    #: the global batch's system itself (``kfac.distributed``: no parts, no exchange).
    replicated: ClassVar[bool] = True

    def __init__(
        self,
        *,
        dtype: torch.dtype = torch.float32,
        coefficients: str = "per-layer",
        damping_mode: str = "relative",
        store: str = "index",
        steps_per_epoch: int | None = None,
        refresh_epochs: int | None = None,
        gram: str = "auto",
        compute_epochs: int = 1,
        refresh_steps: int | None = None,
        weighted_step: str = "rows",
    ) -> None:
        if coefficients not in COEFFICIENTS:
            raise ValueError(
                f"Invalid coefficients: {coefficients!r}; valid names are {list(COEFFICIENTS)}"
            )
        if damping_mode not in DAMPING_MODES:
            raise ValueError(
                f"Invalid damping_mode: {damping_mode!r}; valid names are {list(DAMPING_MODES)}"
            )
        if store not in STORES:
            raise ValueError(f"Invalid store: {store!r}; valid names are {list(STORES)}")
        periods = (("steps_per_epoch", steps_per_epoch), ("refresh_epochs", refresh_epochs))
        for key, value in periods:
            if value is not None and (
                isinstance(value, bool) or not isinstance(value, int) or value < 1
            ):
                raise ValueError(f"Invalid {key}: {value!r} (must be an int >= 1 or None)")
        if weighted_step not in WEIGHTED_STEPS:
            raise ValueError(
                f"Invalid weighted_step: {weighted_step!r}; valid names are {list(WEIGHTED_STEPS)}"
            )
        if weighted_step == "loss" and coefficients != "shared":
            raise ValueError(
                "Invalid weighted_step: 'loss' needs coefficients='shared' (one weight per "
                "sample for every layer)"
            )
        if refresh_steps is not None and not _positive_int(refresh_steps):
            raise ValueError(f"Invalid refresh_steps: {refresh_steps!r} (must be an int >= 1)")
        if not _positive_int(compute_epochs):
            raise ValueError(f"Invalid compute_epochs: {compute_epochs!r} (must be an int >= 1)")
        if steps_per_epoch is None and (
            store == "slot" or refresh_epochs is not None or compute_epochs > 1
        ):
            what = (
                "store='slot'"
                if store == "slot"
                else ("refresh_epochs" if refresh_epochs is not None else "compute_epochs > 1")
            )
            raise ValueError(f"Invalid steps_per_epoch: None ({what} needs the epoch length)")
        self.dtype = dtype
        self.coefficients = coefficients
        self.damping_mode = damping_mode
        self.store = store
        self.steps_per_epoch = steps_per_epoch
        self.refresh_epochs = refresh_epochs
        self.compute_epochs = compute_epochs
        self.refresh_steps = refresh_steps
        self.weighted_step = weighted_step
        self.gram = ps.check_method(gram)
        self.stores: dict[str, CoefficientStore] = {}
        self.indices: Tensor | None = None
        self._names: list[str] = []  # the coefficient sets (layer names, or SHARED)
        self._plan: dict[str, Any] = {"step": -1}  # this step's decision and shared values
        #: the coming step's loss is weighted by the stored shared coefficients
        #: (:meth:`FNGDPreconditioner.loss_weights`)
        self.weighted = False

    # ------------------------------------------------------------------ keys

    def relative_damping(self) -> bool:
        """Whether the damping is relative to the curvature's scale."""
        return self.damping_mode == "relative"

    def set_indices(self, indices: Any) -> None:
        """The dataset indices of the coming step's samples (``store="index"``)."""
        if indices is None:
            self.indices = None
            return
        try:
            idx = torch.as_tensor(indices)
        except (TypeError, ValueError, RuntimeError) as error:
            raise TypeError(
                f"Invalid indices: must be a 1-D integer tensor, got {type(indices).__name__} "
                f"({error})"
            ) from None
        if idx.ndim != 1 or idx.dtype in (torch.bool,) or idx.is_floating_point():
            raise ValueError(
                f"Invalid indices: must be a 1-D integer tensor, got dtype {idx.dtype} and "
                f"shape {tuple(idx.shape)}"
            )
        if idx.numel() and int(idx.min()) < 0:
            raise ValueError(f"Invalid indices: must be >= 0, got min {int(idx.min())}")
        self.indices = idx.detach().to("cpu", torch.long)

    def _key(self, tick: Tick, n: int) -> Any:
        if self.store == "index":
            if self.indices is None:
                raise ValueError(
                    "FNGD with store='index' needs the batch's dataset `indices`: call "
                    "step(indices=...) (or use store='slot' or 'none')"
                )
            if self.indices.numel() != n:
                raise ValueError(
                    f"Invalid indices: {self.indices.numel()} indices for a batch of {n} samples"
                )
            return self.indices
        if self.store == "slot":
            assert self.steps_per_epoch is not None
            return tick.step % self.steps_per_epoch
        return None

    def _refresh_epoch(self, step: int) -> bool:
        """Whether ``step`` recomputes every coefficient: a multiple of ``refresh_steps``, or
        in one of the first ``compute_epochs`` epochs, or in a multiple of
        ``refresh_epochs``."""
        if self.refresh_steps is not None and step % self.refresh_steps == 0:
            return True
        if self.steps_per_epoch is None:
            return False
        epoch = step // self.steps_per_epoch
        if epoch < self.compute_epochs:
            return True
        return self.refresh_epochs is not None and epoch % self.refresh_epochs == 0

    def compute_step(self, step: int) -> bool:
        """Whether step ``step`` computes coefficients (Grams and solves) rather than reusing
        stored ones: always without a store and on refresh epochs, else when any coefficient
        set lacks one of the step's keys. Before the step's indices are known (arming the
        capture at the end of the previous step) the answer is ``True``; the clock asks
        again when the step runs. The preconditioner makes this its statistics schedule, so
        a reusing step runs no update phase and reads nothing back from the device."""
        plan = self._plan
        if plan["step"] == step and plan["indices"] is self.indices:
            return bool(plan["compute"])
        if self.store == "index" and self.indices is None:
            return True
        stored: dict[str, Tensor] = {}
        if self.store == "none" or self._refresh_epoch(step) or not self._names:
            compute = True
        else:
            key = self.indices if self.store == "index" else step % (self.steps_per_epoch or 1)
            for name in self._names:
                store = self.stores.get(name)
                alpha = None if store is None else store.lookup(key)
                if alpha is None:
                    stored = {}
                    break
                stored[name] = alpha
            compute = not stored
        self._plan = {
            "step": step, "indices": self.indices, "compute": compute, "stored": stored,
            "K": None, "alpha": None,
        }  # fmt: skip
        return compute

    def _put(self, name: str, key: Any, alpha: Tensor) -> None:
        if self.store != "none":
            self.stores.setdefault(name, CoefficientStore(self.store)).put(key, alpha)

    def _solve(self, K: Tensor, damping: float) -> Tensor:
        n = K.shape[0]
        if self.damping_mode == "relative":
            trace = float(torch.diagonal(K).sum())
            lam = damping * max(trace, 0.0) / n
            if lam <= 0.0:  # a zero Gram (dead layer): alpha for any positive damping
                lam = damping
        else:
            lam = damping
        alpha: Tensor = ln.smw_coefficients(K, lam)
        return alpha

    # ------------------------------------------------------------------ protocol
    def check_layers(self, layers: Mapping[str, Any]) -> None:
        """Accept every registered layer: the per-sample algebra needs only its rows."""
        return None

    def capture(self, layer: Layer, state: FNGDState, factor_step: bool) -> CaptureSpec | None:
        # a weighted-loss step records nothing: its gradient already is G alpha
        return None if self.weighted else CaptureSpec(rows=True)

    def init(self, layer: Layer) -> FNGDState:
        name = SHARED if self.coefficients == "shared" else layer.name
        if name not in self._names:
            self._names.append(name)
        return FNGDState()

    def ready(self, state: FNGDState) -> bool:
        return state.alpha is not None

    def update(self, layer: Layer, state: FNGDState, batch: LayerBatch, tick: Tick) -> FNGDState:
        """A computing step: the layer's Gram, then (per layer) its coefficients, stored."""
        n = batch.n
        key = self._key(tick, n)
        self.compute_step(tick.step)
        a, g = ps.per_sample_rows(batch)
        method = ps.gram_method(n, a.shape[1], a.shape[2], g.shape[2], self.gram)
        K = ps.gram(a, g, method)
        if self.coefficients == "shared":
            plan = self._plan
            plan["K"] = K if plan["K"] is None else plan["K"] + K
            plan["key"] = key
            return state._replace(step=tick.step, gram=method)
        alpha = self._solve(K, tick.damping)
        self._put(layer.name, key, alpha)
        return state._replace(
            alpha=alpha, step=tick.step, computed=state.computed + 1, gram=method
        )

    def refresh(self, layer: Layer, state: FNGDState, tick: Tick) -> FNGDState:
        """Every step: a reusing step looks the stored coefficients up; a computing step
        solves the shared system once (first layer) and hands it to every layer."""
        if not tick.factor:
            name = SHARED if self.coefficients == "shared" else layer.name
            self.compute_step(tick.step)
            stored = self._plan["stored"].get(name)
            if stored is None:  # no stored coefficients (a layer without statistics)
                return state._replace(alpha=None, step=-1)
            return state._replace(alpha=stored, step=tick.step, reused=state.reused + 1)
        if state.step != tick.step:  # not updated this step (no record, non-finite)
            return state._replace(alpha=None) if state.alpha is not None else state
        if self.coefficients == "per-layer":
            return state
        plan = self._plan
        alpha: Tensor | None = plan["alpha"]
        if alpha is None:
            alpha = self._solve(plan["K"], tick.damping)
            plan["alpha"], plan["K"] = alpha, None
            self._put(SHARED, plan["key"], alpha)
        return state._replace(alpha=alpha, computed=state.computed + 1)

    def direction(
        self, layer: Layer, state: FNGDState, grad: Tensor, batch: LayerBatch | None, tick: Tick
    ) -> Tensor:
        assert state.alpha is not None
        if batch is None:
            # a weighted-loss step (.grad is sum_i alpha_i grad l_i already), or a layer this
            # step's loss did not use (the zero .grad of zero_grad(set_to_none=False))
            return grad
        if state.alpha.shape[0] != batch.n:
            raise ValueError(
                f"FNGD: the coefficients stored for step {tick.step}'s slot weight "
                f"{state.alpha.shape[0]} samples, the batch has {batch.n} (is `steps_per_epoch` "
                "the number of batches per epoch?)"
            )
        a, g = ps.per_sample_rows(batch, scaled=False)  # n folded into the weights
        return ps.weighted_sum(a, g, state.alpha * batch.n).to(grad.dtype)

    def state_dict(self, state: FNGDState) -> dict[str, Any]:
        return dict(state._asdict())

    def load_state(
        self, layer: Layer, saved: Mapping[str, Any], device: torch.device
    ) -> FNGDState:
        missing = set(FNGDState._fields) - set(saved)
        if missing:
            raise ValueError(f"FNGD state of layer {layer.describe()} lacks {sorted(missing)}")
        alpha = saved["alpha"]
        return FNGDState(
            alpha=None if alpha is None else alpha.to(device),
            step=int(saved["step"]),
            computed=int(saved["computed"]),
            reused=int(saved["reused"]),
            gram=str(saved["gram"]),
        )

    def _config(self) -> dict[str, Any]:
        return {"coefficients": self.coefficients, "store": self.store}

    def block_state_dict(self) -> dict[str, Any]:
        return {
            **self._config(),
            "stores": {name: s.state_dict() for name, s in self.stores.items()},
        }

    def check_block_state_dict(self, state: Mapping[str, Any]) -> None:
        for key, value in self._config().items():
            if state.get(key) != value:
                raise ValueError(
                    f"state_dict was saved with {key}={state.get(key)!r}, this preconditioner "
                    f"uses {value!r}"
                )

    def load_block_state_dict(self, state: Mapping[str, Any]) -> None:
        device = torch.device("cpu")
        for s in self.stores.values():
            if s.table is not None:
                device = s.table.device
        self.stores = {
            name: CoefficientStore.from_state_dict(saved, device)
            for name, saved in state["stores"].items()
        }
        self._plan = {"step": -1}

    def diagnostics(self, layer: Layer, state: FNGDState) -> list[dict[str, Any]]:
        name = SHARED if self.coefficients == "shared" else layer.name
        store = self.stores.get(name)
        return [
            {
                "layer": layer.name,
                "kind": "fngd",
                "coefficients": self.coefficients,
                "gram": state.gram,
                "computed": state.computed,
                "reused": state.reused,
                "stored": 0 if store is None else len(store),
            }
        ]


def fngd_block(
    *,
    dtype: torch.dtype,
    seed: int,
    fisher: str,
    coefficients: str = "per-layer",
    damping_mode: str = "relative",
    store: str = "index",
    steps_per_epoch: int | None = None,
    refresh_epochs: int | None = None,
    gram: str = "auto",
    compute_epochs: int = 1,
    refresh_steps: int | None = None,
    weighted_step: str = "rows",
) -> FNGDBlock:
    """The registry's factory for ``"fngd"`` (``seed`` unused: the method is deterministic;
    ``fisher`` must be ``"empirical"``: the coefficients weight the true-label gradients)."""
    if fisher != "empirical":
        raise ValueError(
            f"Invalid fisher: {fisher!r}; FNGD re-weights the per-sample gradients of the "
            "training loss, so only 'empirical' applies"
        )
    return FNGDBlock(
        dtype=dtype,
        coefficients=coefficients,
        damping_mode=damping_mode,
        store=store,
        steps_per_epoch=steps_per_epoch,
        refresh_epochs=refresh_epochs,
        gram=gram,
        compute_epochs=compute_epochs,
        refresh_steps=refresh_steps,
        weighted_step=weighted_step,
    )


register_block("fngd", fngd_block)


class FNGDPreconditioner(Preconditioner):
    """The FNGD preconditioner: :class:`~kfac.Preconditioner` with the ``"fngd"`` block.

    Call :meth:`step` after ``loss.backward()`` (the batch-mean loss) and before any
    ``torch.optim`` optimizer's ``step()``: each registered layer's ``.grad`` becomes
    ``G alpha``, the per-sample gradients of the batch weighted by the coefficients (computed
    the first time the batch's keys are seen, reused afterwards).

    Parameters
    ----------
    model : nn.Module
        The model (its ``nn.Linear`` and ``nn.Conv2d`` layers are preconditioned).
    damping : float or callable(step), default 0.1
        ``lambda`` relative to ``tr(K) / n`` (``damping_mode="relative"``) or absolute.
    coefficients : {"per-layer", "shared"}, default "per-layer"
    damping_mode : {"relative", "absolute"}, default "relative"
    store : {"index", "slot", "none"}, default "index"
        How stored coefficients are keyed: by dataset index (pass ``indices`` to
        :meth:`step`), by the step's slot in the epoch, or not stored (recomputed every step).
    steps_per_epoch : int, optional
        Needed by ``store="slot"`` and ``refresh_epochs``.
    refresh_epochs : int, optional
        Recompute the coefficients every ``refresh_epochs`` epochs.
    gram : {"auto", "positions", "explicit"}, default "auto"
    compute_epochs : int, default 1
        Recompute during the first ``compute_epochs`` epochs (the paper: 1).
    refresh_steps : int, optional
        Also recompute every ``refresh_steps`` steps (a refresh period in steps).
    weighted_step : {"loss", "rows"}, optional
        How a reusing step forms ``G alpha``: ``"loss"``, the training loop back-propagates
        the loss weighted by :meth:`loss_weights`; ``"rows"``, weighted outer products of
        the recorded rows. Default (by measurement, docs/kfac.md): ``"loss"`` with
        ``coefficients="shared"`` in one process, ``"rows"`` otherwise.
    **kwargs
        The other options of :class:`~kfac.Preconditioner` (``kl_clip``, ``rms_clip``,
        ``lr``, ``skip_layers``, ``factor_dtype``, ``grad_scaler``, ``time_phases``).

    Notes
    -----
    The coefficients weight per-sample gradients recovered from the layer's rows as ``n``
    times the output gradients of the *batch-mean* loss: the loss must be a mean over the
    batch's samples. Every step captures the rows of the registered layers (the direction is
    formed from them).

    Examples
    --------
    >>> import torch
    >>> from torch import nn
    >>> import kfac
    >>> model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    >>> precond = kfac.FNGDPreconditioner(model, store="index")
    >>> x, y = torch.randn(16, 4), torch.randint(2, (16,))
    >>> nn.functional.cross_entropy(model(x), y).backward()
    >>> precond.step(indices=torch.arange(16))
    >>> [(row["computed"], row["reused"]) for row in precond.diagnostics()]
    [(1, 0), (1, 0)]
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        damping: Any = 0.1,
        coefficients: str = "per-layer",
        damping_mode: str = "relative",
        store: str = "index",
        steps_per_epoch: int | None = None,
        refresh_epochs: int | None = None,
        gram: str = "auto",
        compute_epochs: int = 1,
        refresh_steps: int | None = None,
        weighted_step: str | None = None,
        **kwargs: Any,
    ) -> None:
        distributed = _distributed_config(kwargs.get("distributed"))
        if weighted_step is None:
            one = distributed is None
            weighted_step = "loss" if coefficients == "shared" and one else "rows"
        elif weighted_step == "loss" and distributed is not None:
            raise ValueError(
                "Invalid weighted_step: 'loss' is not supported under torch.distributed (each "
                "process could weight only its own samples); use 'rows'"
            )
        for key in ("factor_every", "inverse_every", "factor_decay", "fisher"):
            if key in kwargs:
                raise ValueError(
                    f"Invalid option {key!r}: FNGD computes or reuses coefficients every step "
                    "(see `store` and `refresh_epochs`)"
                )
        super().__init__(
            model,
            "fngd",
            damping=damping,
            factor_every=self._period,
            inverse_every=self._period,
            factor_decay=0.0,
            coefficients=coefficients,
            damping_mode=damping_mode,
            store=store,
            steps_per_epoch=steps_per_epoch,
            refresh_epochs=refresh_epochs,
            gram=gram,
            compute_epochs=compute_epochs,
            refresh_steps=refresh_steps,
            weighted_step=weighted_step,
            **kwargs,
        )

    def _period(self, step: int) -> int:
        """The statistics (and refresh) schedule: 1 on computing steps; on reusing steps a
        period that does not divide ``step``, so the engine runs no update phase."""
        if not hasattr(self, "engine"):  # the clock is validated before the block exists
            return 1
        return 1 if self.fngd.compute_step(step) else step + 2

    @property
    def fngd(self) -> FNGDBlock:
        """The FNGD block (options and coefficient stores)."""
        block = self.block
        assert isinstance(block, FNGDBlock)
        return block

    def set_indices(self, indices: Any) -> None:
        """The dataset indices of the samples of the coming :meth:`step`.

        Under ``torch.distributed`` each process passes the indices of its own samples;
        they are gathered in rank order (the order of the gathered rows), so the stored
        coefficients are keyed by the global batch's indices."""
        self.fngd.set_indices(indices)
        runtime = self.engine.dist
        block = self.fngd
        if runtime is not None and block.indices is not None:
            block.indices = runtime.gather_rows(block.indices, "control", "indices all-gather")

    @torch.no_grad()
    def step(
        self, lr: float | Mapping[Tensor, float] | None = None, *, indices: Any = None
    ) -> None:
        """Precondition the registered layers' gradients in place.

        Parameters
        ----------
        lr : float or mapping of weight tensor to float, optional
            Learning rate(s) for the KL clip.
        indices : 1-D integer tensor, optional
            The dataset index of each sample of the batch (``store="index"``; may also be
            given beforehand with :meth:`set_indices`). Consumed by the step.

        Raises
        ------
        ValueError
            ``store="index"`` and no ``indices``, or as many indices as samples.
        """
        if indices is not None:
            self.set_indices(indices)
        block = self.fngd
        unweighted = block.weighted_step == "loss" and not block.weighted
        if unweighted and not block.compute_step(self.steps):
            self.skip()
            raise ValueError(
                f"Invalid weighted_step: 'loss', and step {self.steps} reuses stored shared "
                "coefficients but its backward was not weighted: call loss_weights(indices) "
                "before the forward pass and back-propagate (weights * "
                "per_sample_losses).sum() when it returns weights (the command line does), "
                "or pass weighted_step='rows'"
            )
        try:
            super().step(lr)
        finally:
            self._forget()

    def _forget(self) -> None:
        """End of a step: forget its indices and weighting, and re-arm the capture."""
        block = self.fngd
        block.indices = None
        if block.weighted:
            block.weighted = False
            self.engine.arm()

    def skip(self) -> None:
        """Discard the coming step's records, indices and weighting."""
        super().skip()
        self._forget()

    def loss_weights(self, indices: Any = None) -> Tensor | None:
        """The per-sample loss weights of the coming step, for the weighted-loss path.

        On a step that reuses stored shared coefficients, returns them (``alpha``, one per
        sample): the caller then back-propagates ``(alpha * per_sample_losses).sum()``, whose
        gradient *is* FNGD's direction ``G alpha`` for every layer, and the hooks record
        nothing (the step costs what an SGD step costs). On a step that computes
        coefficients, returns ``None``: back-propagate the usual batch-mean loss. Call it
        before the forward pass.

        Parameters
        ----------
        indices : 1-D integer tensor, optional
            The batch's dataset indices (``store="index"``), as for :meth:`step`.

        Raises
        ------
        ValueError
            ``coefficients="per-layer"`` (one weight per sample must serve every layer).

        Notes
        -----
        Every parameter's gradient is then the weighted one, the parameters outside the
        preconditioned layers (biases of normalisation layers, ...) included, whereas the
        default path leaves those with the batch-mean gradient.
        """
        block = self.fngd
        if block.weighted_step != "loss":
            raise ValueError(
                f"Invalid weighted_step: {block.weighted_step!r}; loss weights need "
                "weighted_step='loss' (with coefficients='shared', in one process: each "
                "process could weight only its own samples)"
            )
        if indices is not None:
            self.set_indices(indices)
        if block.compute_step(self.steps):
            return None
        block.weighted = True
        self.engine.arm()  # record nothing on this step
        alpha: Tensor = block._plan["stored"][SHARED]
        return alpha

    def state(self, name: str) -> FNGDState:
        """The :class:`FNGDState` of layer ``name``."""
        state: FNGDState = super().state(name)
        return state

    def coefficients(self, name: str | None = None) -> CoefficientStore | None:
        """The coefficient store of layer ``name`` (``None``: the shared set)."""
        return self.fngd.stores.get(SHARED if name is None else name)


class FNGD(PreconditionedSGD):
    """FNGD as a ``torch.optim.Optimizer``: :class:`FNGDPreconditioner`, then torch's SGD.

    Parameters
    ----------
    model : nn.Module
        The model whose layers are preconditioned.
    lr : float
        Learning rate (``>= 0``).
    momentum : float, default 0
    weight_decay : float, default 0
    params : iterable of parameters or dicts, optional
        Parameter groups (default: the model's trainable parameters).
    **kwargs
        Passed to :class:`FNGDPreconditioner` (``damping``, ``coefficients``,
        ``damping_mode``, ``store``, ``steps_per_epoch``, ``refresh_epochs``, ``gram``,
        ``kl_clip``, ...).

    Notes
    -----
    With ``store="index"`` (the default) each :meth:`step` needs the dataset indices of the
    batch: ``opt.step(indices=idx)``. A data loader gives them when the dataset returns them,
    e.g. ``TensorDataset(x, y, torch.arange(len(x)))``.

    Examples
    --------
    >>> import torch
    >>> from torch import nn
    >>> import kfac
    >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
    <torch._C.Generator object at ...>
    >>> model = nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 1))
    >>> x, y = torch.randn(64, 4), torch.randn(64, 1)
    >>> opt = kfac.FNGD(model, lr=0.1, damping=0.1)
    >>> def full_loss():
    ...     with torch.no_grad():  # evaluations record nothing
    ...         return nn.functional.mse_loss(model(x), y).item()
    >>> first = full_loss()
    >>> for epoch in range(10):
    ...     for idx in torch.arange(64).reshape(4, 16):
    ...         opt.zero_grad()
    ...         nn.functional.mse_loss(model(x[idx]), y[idx]).backward()
    ...         opt.step(indices=idx)
    >>> full_loss() < first
    True
    >>> [row["reused"] for row in opt.preconditioner.diagnostics()]  # epochs 2-10
    [36, 36]
    """

    preconditioner_class: ClassVar[type[Preconditioner]] = FNGDPreconditioner
    preconditioner: FNGDPreconditioner

    def step(self, closure: Any = None, *, indices: Any = None, batch: Any = None) -> Any:
        """Precondition and update (see :class:`~kfac.PreconditionedSGD`); ``indices`` are the
        dataset indices of the batch (``store="index"``), ``batch`` the step's (inputs,
        targets) for ``adaptive_damping`` and ``quadratic_step``."""
        if indices is not None:
            self.preconditioner.set_indices(indices)
        # the hooks already ran around this method: the front's step without them
        return unhooked(PreconditionedSGD.step)(self, closure, batch=batch)
