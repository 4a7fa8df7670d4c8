"""The curvature-block protocol: what every preconditioning method implements.

A *curvature block* is one method's rule for one kind of curvature (the Kronecker pair of
the K-FAC family, a diagonal, mini-blocks, a per-sample Gram matrix...). The engine
(``kfac._engine``) owns the loop and the order of the phases; a block owns only the maths,
on explicit state values:

=================  =====================================================================
``capture``        what the hooks must record for a layer on a step (:class:`CaptureSpec`:
                   sums of outer products or per-sample rows), or nothing
``check_layers``   a look at the registered layers at construction (errors, warnings)
``init``           the initial state value of a layer
``update``         ``update(state, batch, tick) -> state``: fold one step's statistics in
``refresh``        ``refresh(state, tick) -> state``: rebuild what the direction applies
                   (decompositions, prepared inverses) on the steps that call for it
``direction``      the preconditioned gradient matrix of a layer (no host synchronisation)
``exchange``       the tensors that define the applied representation: what an owner
                   process would broadcast after a refresh
``state_dict``     plain tensors and numbers for ``torch.save``; ``load_state`` inverts it
``diagnostics``    rows of numbers for people (ranks, memory, ...)
``correct``        optional: the gradient the direction preconditions (a method that
                   transforms the gradient, e.g. with the previous steps' gradients)
``commit``         optional: record the step's final direction in the state
=================  =====================================================================

Distributed execution (:mod:`kfac.distributed`) needs six more hooks, which a block that
supports it implements (the defaults raise ``NotImplementedError``, so a method without them
runs in one process and refuses a process group with a clear message):

=================  =====================================================================
``parts``          the parts of a layer's curvature that different processes may own
                   (the K-FAC family: the factors ``"A"`` and ``"G"``), each with its
                   predicted cost; the block's ``state_dict`` has one entry per part
``update_parts``   ``update`` restricted to the parts this process owns
``refresh_parts``  ``refresh`` restricted to the owned parts, without ``prepare``
``publish``        what the owner broadcasts for a part whose representation changed
                   (:class:`Message`: a fixed-length header of floats and tensors)
``message_shapes`` the shapes of a message's tensors, from its header (the receivers')
``install``        the state with a message received for a part
``prepare``        what every process rebuilds from the representations (the damped
                   inverse) once the messages are installed
=================  =====================================================================

States are immutable values (frozen dataclasses or NamedTuples): a block returns a new
state, so the engine knows what changed and nothing is written behind its back. The block
object itself holds only configuration and its random generators.

A layer's gradient is one matrix in the layer's canonical layout (``kfac._layers``): output
features by (augmented) input features; ``direction`` returns a matrix of the same shape.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol, TypeVar, runtime_checkable

import torch
from torch import Tensor

__all__ = [
    "CaptureSpec",
    "CurvatureBlock",
    "LayerBatch",
    "Message",
    "Tick",
    "all_finite",
    "block_names",
    "make_block",
    "register_block",
]

S = TypeVar("S")


def all_finite(t: Tensor) -> Tensor:
    """Whether every entry of ``t`` is finite, as a 0-d bool tensor on ``t``'s device.

    One read of ``t`` without a temporary of its size: the extremes of a tensor are NaN when
    any entry is NaN (``torch.aminmax`` propagates NaN) and infinite when any entry is, and
    finite otherwise, so the test is exact. It is several times cheaper than
    ``torch.isfinite(t).all()``, which writes a boolean tensor of ``t``'s size first.
    """
    if t.numel() == 0 or not (t.is_floating_point() or t.is_complex()):
        return torch.ones((), dtype=torch.bool, device=t.device)
    if t.is_complex():
        t = torch.view_as_real(t)
    lo, hi = torch.aminmax(t)
    return torch.isfinite(lo) & torch.isfinite(hi)


@dataclass(frozen=True)
class CaptureSpec:
    """What the hooks record for one layer on one step.

    Attributes
    ----------
    rows : bool
        Keep the per-sample rows (inputs ``(N, d_A)`` and output gradients ``(N, d_G)``,
        ``O(N (d_A + d_G))``) instead of reducing them to the sums of outer products
        ``sum a a^T`` and ``sum g g^T`` (``O(d_A^2 + d_G^2)``).
    optional : bool
        The rows are an optimisation only (a dense rule's rows application): under
        ``kfac.distributed`` they are gathered across processes when fewer numbers than the
        sums, and reduced to the sums otherwise.
    """

    rows: bool = False
    optional: bool = False


@dataclass(frozen=True)
class Tick:
    """The clock's reading for one step: which phases run and the scheduled values.

    Attributes
    ----------
    step : int
        Steps taken before this one.
    factor : bool
        Statistics are captured and folded into the state on this step.
    inverse : bool
        Representations are refreshed on this step.
    decay : float
        The exponential-average decay ``rho`` of this step.
    inverse_period : int
        The refresh period in force (some rules count in periods).
    damping : float
        The damping value of this step.
    """

    step: int
    factor: bool
    inverse: bool
    decay: float
    inverse_period: int
    damping: float


@dataclass(frozen=True)
class LayerBatch:
    """What one layer recorded on one step (in the statistics dtype).

    A layer sees ``n`` samples and ``tau`` positions per sample (``N = n tau`` rows). With
    rows ``a`` (augmented inputs or patches) and ``g`` (output gradients of the batch loss),
    either the sums ``sum a a^T`` / ``sum g g^T`` or the rows themselves are present,
    as the block's :class:`CaptureSpec` asked.

    Attributes
    ----------
    n : int
        Samples (leading dimension of the layer input).
    positions : int
        Rows ``N = n tau`` recorded.
    a_sum, g_sum : Tensor or None
        Sums of outer products (sums mode).
    a_rows, g_rows : Tensor or None
        Rows ``(N, d_A)`` and ``(N, d_G)`` (rows mode).
    exact : bool
        False when a product of the forward ran in half precision (autocast, a float16
        input): the rows then do not reproduce the gradient exactly.
    """

    n: int
    positions: int
    a_sum: Tensor | None = None
    g_sum: Tensor | None = None
    a_rows: Tensor | None = None
    g_rows: Tensor | None = None
    exact: bool = True

    @property
    def tau(self) -> float:
        """Positions per sample."""
        return self.positions / self.n

    def input_block(self) -> Tensor:
        """``B_A`` (``d_A x N``) with ``B_A B_A^T = sum a a^T / (n tau^2)`` (rows mode)."""
        assert self.a_rows is not None
        return self.a_rows.T / (self.tau * math.sqrt(self.n))

    def output_block(self) -> Tensor:
        """``B_G`` (``d_G x N``) with ``B_G B_G^T = tau n sum g g^T`` (rows mode)."""
        assert self.g_rows is not None
        return self.g_rows.T * math.sqrt(self.tau * self.n)

    def input_factor(self) -> Tensor:
        """The instantaneous input factor ``A = sum a a^T / (n tau^2)``, symmetric."""
        if self.a_sum is None:
            B = self.input_block()
            A = B @ B.T
        else:
            A = self.a_sum / (self.n * self.tau * self.tau)
        return (A + A.T) / 2

    def output_factor(self) -> Tensor:
        """The instantaneous output-gradient factor ``G = tau n sum g g^T``, symmetric."""
        if self.g_sum is None:
            B = self.output_block()
            G = B @ B.T
        else:
            G = self.g_sum * (self.tau * self.n)
        return (G + G.T) / 2

    def tensors(self) -> list[Tensor]:
        """The recorded tensors (for finiteness checks and reductions)."""
        return [t for t in (self.a_sum, self.g_sum, self.a_rows, self.g_rows) if t is not None]

    def finite(self) -> Tensor:
        """Whether every recorded entry is finite, and so is every entry of the two
        instantaneous factors, as a 0-d bool tensor (no host read).

        Finite rows (a gradient of ``1e20`` in float32) can still overflow the factors,
        whose scaled products would then poison the averages: an entry of a Gram matrix is
        at most its largest diagonal entry, so the scaled diagonals are checked."""
        flags = [all_finite(t) for t in self.tensors()]
        if self.n > 0:
            tau, n = self.tau, self.n
            if self.a_rows is not None:
                flags.append(all_finite((self.a_rows / (tau * math.sqrt(n))).square().sum(0)))
            if self.a_sum is not None:
                flags.append(all_finite(self.a_sum.diagonal() / (n * tau * tau)))
            if self.g_rows is not None:
                flags.append(all_finite((self.g_rows * math.sqrt(tau * n)).square().sum(0)))
            if self.g_sum is not None:
                flags.append(all_finite(self.g_sum.diagonal() * (tau * n)))
        return torch.stack(flags).all() if flags else torch.ones((), dtype=torch.bool)


@dataclass(frozen=True)
class Message:
    """What the owner of a part broadcasts after refreshing it.

    Attributes
    ----------
    header : tuple of float
        A fixed number of scalars per block (for the K-FAC family: rank, identity weight,
        Brand flag); the receivers size the tensors from it.
    tensors : tuple of Tensor
        The representation (for the K-FAC family: ``U`` and ``d``).
    """

    header: tuple[float, ...]
    tensors: tuple[Tensor, ...]


def _no_distributed(block: Any, hook: str) -> NotImplementedError:
    return NotImplementedError(
        f"the curvature block {block.name!r} does not implement `{hook}`, so it cannot run "
        "under a torch.distributed process group; pass distributed=False to run each process "
        "on its own (its curvature then sees only that process's batch)"
    )


@runtime_checkable
class CurvatureBlock(Protocol[S]):
    """One method's curvature rule over per-layer state values (see the module docstring).

    Implement ``capture``, ``init``, ``update``, ``ready``, ``direction``, ``state_dict`` and
    ``load_state``; a class that subclasses ``CurvatureBlock`` explicitly inherits the
    defaults of the others (no refresh, nothing to exchange, no diagnostics, no block-level
    state).

    Attributes
    ----------
    name : str
        The method's name (diagnostics, state dicts, error messages).
    """

    name: ClassVar[str]

    def capture(self, layer: Any, state: S, factor_step: bool) -> CaptureSpec | None:
        """What to record for ``layer`` on the coming step, a factor-update step or not
        (``None``: nothing)."""
        ...

    def init(self, layer: Any) -> S:
        """The state of a layer before any statistics."""
        ...

    def update(self, layer: Any, state: S, batch: LayerBatch, tick: Tick) -> S:
        """Fold the statistics of one step into the state (called on factor steps)."""
        ...

    def ready(self, state: S) -> bool:
        """Whether ``direction`` can be computed (a representation exists)."""
        ...

    def direction(
        self, layer: Any, state: S, grad: Tensor, batch: LayerBatch | None, tick: Tick
    ) -> Tensor:
        """The preconditioned gradient matrix (same shape as ``grad``); ``batch`` holds this
        step's record of the layer when its capture spec asked for one, else ``None``. It
        must not read anything back from the device (no ``float(tensor)``, no ``if
        tensor``): the engine's hot path stays asynchronous."""
        ...

    def state_dict(self, state: S) -> dict[str, Any]:
        """The state as plain tensors and numbers (``torch.load(weights_only=True)``)."""
        ...

    def load_state(self, layer: Any, saved: Mapping[str, Any], device: torch.device) -> S:
        """Inverse of :meth:`state_dict`; raises ``ValueError`` for a state of other shapes."""
        ...

    def check_layers(self, layers: Mapping[str, Any]) -> None:
        """Inspect the registered layers once, at construction: raise ``ValueError`` for a
        configuration the method cannot handle, warn for a costly or ineffective one
        (default: accept)."""
        return None

    def relative_damping(self) -> bool:
        """Whether the damping value is relative to the curvature's scale (then it is not the
        ``lambda`` of ``C + lambda I``, and adaptive damping does not apply; default
        ``False``)."""
        return False

    def refresh(self, layer: Any, state: S, tick: Tick) -> S:
        """Rebuild the applied representation where ``tick`` asks for it (every step;
        default: nothing to rebuild)."""
        return state

    def exchange(self, state: S) -> dict[str, Tensor]:
        """The tensors that define the applied representation (what an owner broadcasts;
        default: none)."""
        return {}

    def diagnostics(self, layer: Any, state: S) -> list[dict[str, Any]]:
        """Rows of numbers describing the state (default: none)."""
        return []

    def correct(
        self, layer: Any, state: S, grad: Tensor, tick: Tick, lr: float | None
    ) -> tuple[S, Tensor]:
        """Before the refresh: the gradient matrix the block preconditions (and clips
        against) on this step, given the layer's learning rate ``lr`` (``None`` when the
        preconditioner has none), and the new state (default: ``grad`` unchanged). A layer
        whose direction is not finite is written its recorded gradient, never this one."""
        return state, grad

    def commit(self, layer: Any, state: S, grad: Tensor, direction: Tensor, tick: Tick) -> S:
        """After the write: fold the step's recorded gradient and final (clipped) direction
        into the state, for methods whose next step depends on them (default: unchanged)."""
        return state

    # ------------------------------------------------------------ distributed execution
    def parts(self, layer: Any) -> dict[str, float]:
        """The parts of ``layer``'s curvature that processes may own, each with its predicted
        cost in relative units (default: not distributable)."""
        raise _no_distributed(self, "parts")

    def update_parts(self, layer: Any, state: S, batch: LayerBatch, tick: Tick, parts: Any) -> S:
        """:meth:`update` of the owned ``parts`` only."""
        raise _no_distributed(self, "update_parts")

    def refresh_parts(self, layer: Any, state: S, tick: Tick, parts: Any) -> S:
        """:meth:`refresh` of the owned ``parts`` only, without :meth:`prepare`."""
        raise _no_distributed(self, "refresh_parts")

    def prepare(self, layer: Any, before: S, state: S, tick: Tick) -> S:
        """What every process rebuilds from the installed representations (``before``: the
        state before the refresh)."""
        raise _no_distributed(self, "prepare")

    def publish(self, layer: Any, before: S, state: S, part: str) -> Message | None:
        """The owner's message for ``part`` when its representation changed since
        ``before`` (``None``: nothing to send)."""
        raise _no_distributed(self, "publish")

    def message_shapes(self, layer: Any, part: str, header: Any) -> list[tuple[int, ...]]:
        """The shapes of the tensors of a message for ``part`` with ``header``."""
        raise _no_distributed(self, "message_shapes")

    def install(self, layer: Any, state: S, part: str, header: Any, tensors: Any) -> S:
        """The state with the message ``(header, tensors)`` received for ``part``."""
        raise _no_distributed(self, "install")

    def block_state_dict(self) -> dict[str, Any]:
        """Block-level state, e.g. random generators (default: none)."""
        return {}

    def check_block_state_dict(self, state: Mapping[str, Any]) -> None:
        """Raise ``ValueError`` unless ``state`` was saved by a block configured like this
        one (default: accept)."""

    def load_block_state_dict(self, state: Mapping[str, Any]) -> None:
        """Inverse of :meth:`block_state_dict` (default: nothing to load)."""


BlockFactory = Callable[..., CurvatureBlock[Any]]
_BLOCKS: dict[str, BlockFactory] = {}


def register_block(name: str, factory: BlockFactory) -> BlockFactory:
    """Register a curvature method under ``name``: ``factory(*, dtype, seed, fisher,
    **options)`` returns its block (``dtype``: the statistics dtype; ``fisher``:
    ``"empirical"`` or ``"mc"``). ``Preconditioner(model, name, **options)`` then uses it."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"Invalid block name: {name!r} (must be a non-empty string)")
    _BLOCKS[name] = factory
    return factory


def block_names() -> tuple[str, ...]:
    """The registered curvature methods, sorted."""
    return tuple(sorted(_BLOCKS))


def make_block(name: Any, **kwargs: Any) -> CurvatureBlock[Any]:
    """The block registered as ``name``; ``ValueError`` listing the valid names otherwise."""
    if not isinstance(name, str) or name not in _BLOCKS:
        raise ValueError(f"Invalid block: {name!r}; valid names are {list(block_names())}")
    return _BLOCKS[name](**kwargs)
