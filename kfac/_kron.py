"""The Kronecker pair of the K-FAC family as a curvature block, built by composition.

Each layer's curvature is ``G (x) A`` (output-gradient factor by input factor). How a factor
is kept and its representation refreshed is a :class:`FactorRule`:

* :class:`DenseRule` keeps the dense exponential average (EA) and decomposes it on refresh
  steps with a :class:`Decomposer` (:class:`Eigh`, :class:`RSVD` or :class:`SREVD`), with an
  optional adaptive rank (:class:`Ranks`);
* :class:`BrandRule` keeps a Brand-updated low-rank EA (linear memory) for the factors it is
  eligible for, optionally also the dense EA with periodic randomized resets
  (:class:`Reset`) and partial Rayleigh-Ritz corrections (:class:`Correction`), and hands
  every other factor to an explicit fallback :class:`DenseRule`.

The seven ``inverse=`` names are registry entries that compose these parts
(:func:`make_strategy`); see the algorithm reference, docs/algorithms.md, for the maths and
the papers. Factor states are frozen values (:class:`FactorState`); an update or a refresh
returns a new one.

The conceptual initialisation ``X_0 = I`` is not stored: the first update sets
``X = (1 - rho) X_inst`` and the identity's weight ``prod rho_j`` (``rho^m``) is carried in
:attr:`FactorState.identity` and added to the damping. Keeping ``I`` out of the matrix keeps
it positive semidefinite with the fast spectral decay the low-rank inverses exploit.
"""

from __future__ import annotations

import abc
import warnings
import zlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from typing import Any, ClassVar

import torch
from torch import Tensor

import lowrank_nla as ln

from ._curvature import CaptureSpec, CurvatureBlock, LayerBatch, Message, Tick, register_block
from ._damping import Applied, DampingScheme, DenseInverse, Prepared, make_damping
from ._layers import LinearLayer
from ._schedule import check_bool, check_fraction, check_int_at_least, find_stacklevel

__all__ = [
    "RSVD",
    "SREVD",
    "BrandRule",
    "Correction",
    "DenseRule",
    "Eigh",
    "FactorState",
    "KronBlock",
    "KronState",
    "KronStrategy",
    "Ranks",
    "Reset",
    "inverse_names",
    "make_strategy",
]

_STAT_DTYPES = (torch.float32, torch.float64)
#: Width above which a dense eigendecomposition draws a warning at construction.
DENSE_WARN_DIM = 4096
#: The parts of a Kronecker block that processes may own separately (distributed execution).
PARTS = ("A", "G")
#: Initialisations of the factors' exponential averages (:class:`KronBlock`).
FACTOR_INITS = ("identity", "zero")


def clip_spectrum(d: Tensor) -> Tensor:
    """Zero the eigenvalues at or below ``D eps max(d)`` (``eps`` of ``d``'s dtype): the
    rounding level of a ``D x D`` decomposition, relative to the factor's own scale, so a
    factor of any magnitude keeps its spectrum (negative rounding noise included)."""
    if d.numel() == 0:
        return d
    floor = d.max().clamp(min=0) * (d.numel() * torch.finfo(d.dtype).eps)
    return torch.where(d > floor, d, torch.zeros_like(d))


# ---------------------------------------------------------------------------- decomposers


class Decomposer(abc.ABC):
    """How a dense symmetric PSD factor becomes a representation ``(U, d)``."""

    #: Whether the representation is a full eigendecomposition (no rank).
    full: ClassVar[bool] = False

    @abc.abstractmethod
    def __call__(self, X: Tensor, rank: int, rng: torch.Generator) -> ln.LowRankPSD:
        """A rank-``rank`` representation of ``X`` (``rank`` ignored when :attr:`full`), as
        the decomposition returned it (not yet validated: its smallest eigenvalues may be
        negative rounding noise, which :func:`clip_spectrum` removes)."""


@dataclass(frozen=True)
class Eigh(Decomposer):
    """Full symmetric eigendecomposition (:func:`lowrank_nla.partial_eigh`, ``O(D^3)``; a
    float32 decomposition that fails is retried in float64 with a warning)."""

    full: ClassVar[bool] = True

    def __call__(self, X: Tensor, rank: int, rng: torch.Generator) -> ln.LowRankPSD:
        w, V = ln.partial_eigh(X, X.shape[0])
        return ln.LowRankPSD(V, w, check=False)  # raw: validated once clipped


@dataclass(frozen=True)
class RSVD(Decomposer):
    """Randomized decomposition (R-KFAC): Rayleigh-Ritz finish
    (:func:`lowrank_nla.randomized_eigh`, exactly symmetric) or ``finish="svd"``
    (:func:`lowrank_nla.randomized_svd`, the ``torch.svd_lowrank`` form), ``O(q D^2 l)``."""

    oversample: int = 10
    power_iters: int = 3
    finish: str = "rr"

    def __call__(self, X: Tensor, rank: int, rng: torch.Generator) -> ln.LowRankPSD:
        p, q = self.oversample, self.power_iters
        if self.finish == "svd":
            _, S, Vh = ln.randomized_svd(X, rank, oversample=p, power_iters=q, rng=rng)
            return ln.LowRankPSD(Vh.T, S, check=False)  # raw: validated once clipped
        w, V = ln.randomized_eigh(
            X, rank, oversample=p, power_iters=q, rng=rng, check_symmetric=False
        )
        return ln.LowRankPSD(V, w, check=False)  # raw: validated once clipped


@dataclass(frozen=True)
class SREVD(Decomposer):
    """Symmetric randomized EVD (SRE-KFAC, :func:`lowrank_nla.srevd`)."""

    oversample: int = 10
    power_iters: int = 4
    reorth_every: int | None = 2

    def __call__(self, X: Tensor, rank: int, rng: torch.Generator) -> ln.LowRankPSD:
        w, V = ln.srevd(
            X,
            rank,
            oversample=self.oversample,
            power_iters=self.power_iters,
            reorth_every=self.reorth_every,
            rng=rng,
            check_symmetric=False,
        )
        return ln.LowRankPSD(V, w, check=False)  # raw: validated once clipped


@dataclass(frozen=True)
class Ranks:
    """Initial rank and, when ``adaptive``, the :class:`lowrank_nla.RankController` that moves
    it from the truncation ratio ``d_min / d_max`` of every new representation."""

    initial: int = 180
    adaptive: bool = True
    target: float = 0.033

    def rsvd(self, dim: int) -> ln.RankController:
        return ln.RankController.rsvd(dim, target=self.target)

    def brand(self, cap: int) -> ln.RankController:
        return ln.RankController.brand(target=self.target, cap=cap, floor=min(70, cap))


# ---------------------------------------------------------------------------- factor state


@dataclass(frozen=True)
class FactorState:
    """One Kronecker factor of one layer (``A`` or ``G``), a frozen value.

    Attributes
    ----------
    dim : int
        Dimension ``D``.
    matrix : Tensor or None
        Dense ``D x D`` exponential average (``None`` when the rule keeps none).
    online : LowRankPSD or None
        Brand-updated low-rank exponential average.
    updates : int
        EA updates ``m``.
    identity : float
        Weight of the identity initialisation, ``prod_j rho_j`` (1 before any update).
    applied : Applied or None
        The representation the direction applies, with the identity weight it was made with.
    brand : bool or None
        Whether the factor is Brand-tracked (decided at its first update; ``None`` before).
    rank : RankState or None
        Adaptive-rank state.
    drift : float
        Running ``brand_drift_bound`` of the online state.
    batches : int
        Statistics batches offered to the online state.
    seed : int
        Seed of the factor's own random stream (sketches, column choices).
    rng : Tensor or None
        State of that stream after its last draw (``None``: not drawn from yet). Each factor
        draws from its own stream, so a factor refreshed by another process (distributed
        execution) draws exactly what it draws in one process.
    """

    dim: int
    matrix: Tensor | None = None
    online: ln.LowRankPSD | None = None
    updates: int = 0
    identity: float = 1.0
    applied: Applied | None = None
    brand: bool | None = None
    rank: ln.RankState | None = None
    drift: float = 0.0
    batches: int = 0
    seed: int = 0
    rng: Tensor | None = None

    @property
    def rep(self) -> ln.LowRankPSD | None:
        """The applied representation ``(U, d)`` (``None`` before the first refresh)."""
        return None if self.applied is None else self.applied.rep

    def counted(self, decay: float) -> FactorState:
        """One more EA update: ``m + 1`` and the identity weight times ``decay``."""
        return replace(self, updates=self.updates + 1, identity=self.identity * decay)

    def with_dense(self, inst: Tensor, decay: float) -> FactorState:
        """``X <- decay X + (1 - decay) X_inst`` (``(1 - decay) X_inst`` the first time)."""
        if self.matrix is None:
            return replace(self, matrix=(1.0 - decay) * inst)
        return replace(self, matrix=(self.matrix * decay).add_(inst, alpha=1.0 - decay))

    def with_block(self, B: Tensor, decay: float) -> FactorState:
        """``X <- decay X + (1 - decay) B B^T`` as one product (``B`` the ``D x N`` block of
        the step's rows): no ``X_inst`` formed, symmetrised and added in separate passes
        (symmetric to rounding only; :meth:`DenseRule.low_rank` symmetrises it)."""
        if self.matrix is None:
            return replace(self, matrix=torch.mm(B, B.T).mul_(1.0 - decay))
        return replace(
            self, matrix=torch.addmm(self.matrix, B, B.T, beta=decay, alpha=1.0 - decay)
        )

    def generator(self, device: torch.device) -> torch.Generator:
        """The factor's random stream on ``device``, where its last draw left it. A state
        saved on another kind of device (a CUDA run loaded on a CPU) cannot be restored: the
        stream is re-seeded with ``seed`` and the CRC-32 of the saved state (deterministic)."""
        gen = torch.Generator(device=device)
        if self.rng is None:
            return gen.manual_seed(self.seed)
        if self.rng.numel() != gen.get_state().numel():
            return gen.manual_seed(self.seed ^ zlib.crc32(self.rng.cpu().numpy().tobytes()))
        gen.set_state(self.rng.cpu())
        return gen

    def drawn(self, gen: torch.Generator) -> FactorState:
        """The factor after drawing from ``gen`` (its stream's new state recorded)."""
        return replace(self, rng=gen.get_state())

    def memory(self) -> int:
        """Bytes held by the factor's tensors (dense EA, online state, representation)."""
        tensors = [self.matrix]
        for rep in (self.online, self.rep):
            if rep is not None:
                tensors += [rep.U, rep.d]
        return sum(t.numel() * t.element_size() for t in tensors if t is not None)


def _rep_state(rep: ln.LowRankPSD | None) -> list[Tensor] | None:
    return None if rep is None else [rep.U.clone(), rep.d.clone()]


def _load_rep(value: Any, device: torch.device, where: str) -> ln.LowRankPSD | None:
    if value is None:
        return None
    U, d = (t.detach().clone().to(device) for t in value)
    try:  # validated: finite, d >= 0 descending, U orthonormal
        return ln.LowRankPSD(U, d)
    except (ValueError, TypeError) as exc:
        raise ValueError(f"state_dict representation {where}: {exc}") from exc


def _factor_state_dict(f: FactorState) -> dict[str, Any]:
    return {
        "matrix": None if f.matrix is None else f.matrix.clone(),
        "online": _rep_state(f.online),
        "rep": _rep_state(f.rep),
        "updates": f.updates,
        "identity": f.identity,
        "rep_identity": None if f.applied is None else f.applied.identity,
        "brand": f.brand,
        "rank": None
        if f.rank is None
        else (f.rank.rank, list(f.rank.errors), f.rank.observations),
        "drift": f.drift,
        "batches": f.batches,
        "seed": f.seed,
        "rng": None if f.rng is None else f.rng.clone(),
    }


_FACTOR_KEYS = (
    "matrix", "online", "rep", "updates", "identity", "rep_identity", "brand", "rank", "drift",
    "batches",
)  # fmt: skip


def _check_factor_state(dim: int, saved: Any, where: str) -> None:
    """Keys, types, shapes and values of a saved factor (``ValueError`` naming the entry)."""
    if not isinstance(saved, Mapping):
        raise ValueError(f"state_dict factor {where} must be a mapping")
    missing = sorted(set(_FACTOR_KEYS) - set(saved))
    if missing:
        raise ValueError(f"state_dict factor {where} is missing the entries {missing}")
    matrix = saved["matrix"]
    if matrix is not None:
        if not isinstance(matrix, Tensor) or tuple(matrix.shape) != (dim, dim):
            shape = tuple(matrix.shape) if isinstance(matrix, Tensor) else type(matrix).__name__
            raise ValueError(
                f"state_dict factor {where} has shape {shape}, expected ({dim}, {dim})"
            )
        if not bool(torch.isfinite(matrix).all()):
            raise ValueError(f"state_dict factor {where} has non-finite entries")
    for key in ("online", "rep"):
        value = saved[key]
        if value is None:
            continue
        if (
            not isinstance(value, (list, tuple))
            or len(value) != 2
            or not all(isinstance(t, Tensor) for t in value)
        ):
            raise ValueError(f"state_dict {key} representation of factor {where} must be (U, d)")
        if value[0].ndim != 2 or value[0].shape[0] != dim:
            raise ValueError(
                f"state_dict {key} representation of factor {where} has dimension "
                f"{tuple(value[0].shape)}, expected ({dim}, k)"
            )
    for key in ("updates", "batches"):
        count = saved[key]
        if isinstance(count, bool) or not isinstance(count, int) or count < 0:
            raise ValueError(
                f"state_dict factor {where}: {key!r} must be an int >= 0, got {count!r}"
            )
    for key in ("identity", "rep_identity"):
        weight = saved[key]
        if weight is None and key == "rep_identity":
            continue
        if not isinstance(weight, (int, float)) or not 0.0 <= float(weight) <= 1.0:
            raise ValueError(
                f"state_dict factor {where}: {key!r} must be in [0, 1], got {weight!r}"
            )
    seed = saved.get("seed", 0)  # absent from checkpoints written before per-factor streams
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"state_dict factor {where}: 'seed' must be an int >= 0, got {seed!r}")
    rng = saved.get("rng")
    if rng is not None and (
        not isinstance(rng, Tensor) or rng.dtype != torch.uint8 or rng.ndim != 1
    ):
        raise ValueError(f"state_dict factor {where}: 'rng' must be a 1-d uint8 tensor")


def _load_factor_state(
    dim: int, saved: Mapping[str, Any], device: torch.device, where: str, seed: int
) -> FactorState:
    matrix = saved["matrix"]
    rep = _load_rep(saved["rep"], device, f"of factor {where}")
    rank = saved["rank"]
    return FactorState(
        dim=dim,
        matrix=None if matrix is None else matrix.detach().clone().to(device),
        online=_load_rep(saved["online"], device, f"(online) of factor {where}"),
        updates=int(saved["updates"]),
        identity=float(saved["identity"]),
        applied=None if rep is None else Applied.of(rep, float(saved["rep_identity"])),
        brand=saved["brand"],
        rank=None if rank is None else ln.RankState(int(rank[0]), tuple(rank[1]), int(rank[2])),
        drift=float(saved["drift"]),
        batches=int(saved["batches"]),
        seed=int(saved.get("seed", seed)),
        rng=None if saved.get("rng") is None else saved["rng"].detach().clone().cpu(),
    )


# ---------------------------------------------------------------------------- factor rules


@dataclass(frozen=True)
class Statistics:
    """One factor's statistics of one step: the dense ``X_inst`` lazily, or its block ``B``
    (``D x N``, ``X_inst = B B^T``) when rows were captured."""

    dense: Callable[[], Tensor]
    block: Tensor | None = None


class FactorRule(abc.ABC):
    """How one factor is kept (:meth:`update`) and its representation refreshed."""

    @abc.abstractmethod
    def update(
        self, f: FactorState, stats: Statistics, tick: Tick, ctx: RuleContext
    ) -> FactorState:
        """Fold one step's statistics into the factor."""

    @abc.abstractmethod
    def refresh(self, f: FactorState, tick: Tick, ctx: RuleContext) -> FactorState:
        """Make ``applied`` current where the clock asks for it."""

    def wants_rows(self, layer: Any) -> bool:
        """Whether the capture keeps the per-sample rows of ``layer`` on factor steps."""
        return False


@dataclass(frozen=True)
class RuleContext:
    """What rules share: decomposition and application dtypes and the initialisation
    convention of the exponential averages (``"identity"`` or ``"zero"``, see
    :class:`KronBlock`). Random draws come from each factor's own stream
    (:meth:`FactorState.generator`)."""

    decomposition_dtype: torch.dtype
    dtype: torch.dtype
    init: str = "identity"


def _published(f: FactorState, rep: ln.LowRankPSD, ctx: RuleContext) -> FactorState:
    """Publish ``rep`` for the direction. With the identity initialisation the identity weight
    ``rho^m`` travels with it; with the bias-corrected zero initialisation the EA is divided
    by its total weight ``1 - rho^m`` and no identity is added."""
    d = rep.d.to(ctx.dtype)
    identity = f.identity
    if ctx.init == "zero":
        d = d / (1.0 - identity)
        identity = 0.0
    # a cast (and rescaling) of a representation validated when it was made
    rep = ln.LowRankPSD(rep.U.to(ctx.dtype), d, check=False)
    return replace(f, applied=Applied.of(rep, identity))


@dataclass(frozen=True)
class DenseRule(FactorRule):
    """Dense EA, decomposed on refresh steps (K-FAC, R-KFAC, SRE-KFAC, and the fallback of
    the Brand rules). ``ranks`` is ``None`` for a full decomposition."""

    decomposer: Decomposer
    ranks: Ranks | None = None

    def update(
        self, f: FactorState, stats: Statistics, tick: Tick, ctx: RuleContext
    ) -> FactorState:
        if stats.block is not None:  # rows captured (for the rows application)
            return f.with_block(stats.block, tick.decay).counted(tick.decay)
        return f.with_dense(stats.dense(), tick.decay).counted(tick.decay)

    def target_rank(self, f: FactorState) -> tuple[int, FactorState]:
        """The rank of the next decomposition (initialising the rank state)."""
        assert self.ranks is not None
        if f.rank is None:
            f = replace(f, rank=self.ranks.rsvd(f.dim).init(min(self.ranks.initial, f.dim)))
        assert f.rank is not None
        return min(f.rank.rank, f.dim), f

    def low_rank(self, f: FactorState, ctx: RuleContext) -> tuple[ln.LowRankPSD, FactorState]:
        """A representation of the dense EA (no rank observation)."""
        assert f.matrix is not None
        X = f.matrix.to(ctx.decomposition_dtype)
        # symmetric to the last bit (the EA of B B^T products is so only to rounding)
        X = (X + X.T) / 2
        rank = X.shape[0]
        if self.ranks is not None:
            rank, f = self.target_rank(f)
        gen = f.generator(X.device)
        rep = self.decomposer(X, rank, gen)
        if not self.decomposer.full:
            f = f.drawn(gen)
        # validated after the rounding noise is zeroed: a factor accumulated in float32 and
        # decomposed in float64 has negative eigenvalues at float32's rounding level
        return ln.LowRankPSD(rep.U, clip_spectrum(rep.d)), f

    def refresh(self, f: FactorState, tick: Tick, ctx: RuleContext) -> FactorState:
        if f.matrix is None or not (tick.inverse or f.applied is None):
            return f
        rep, f = self.low_rank(f, ctx)
        if self.ranks is not None and self.ranks.adaptive and f.rank is not None and rep.rank:
            f = replace(f, rank=self.ranks.rsvd(f.dim).update(f.rank, ln.truncation_ratio(rep.d)))
        return _published(f, rep, ctx)


@dataclass(frozen=True)
class Reset:
    """B-R: every ``every`` inverse periods the Brand state is replaced by a randomized
    decomposition of the dense EA (the Brand update of that batch is skipped)."""

    every: int = 5


@dataclass(frozen=True)
class Correction:
    """BC: every ``every`` Brand updates, Rayleigh-Ritz against the dense EA on a random
    ``fraction`` of the columns (:func:`lowrank_nla.rayleigh_ritz_refresh`)."""

    every: int = 5
    fraction: float = 0.2


@dataclass(frozen=True)
class BrandRule(FactorRule):
    """Brand online updates of the eligible factors (Linear layers with ``cap + N < D``),
    ``fallback`` for the others.

    ``every`` (``m_B``): a Brand update every ``every`` statistics batches. ``identity_clock``:
    ``"updates"`` decays the identity weight per Brand update (``rho^m``), ``"batches"`` per
    statistics batch (``rho^b``, the dense factors' clock). ``keep_dense`` also keeps the
    dense EA (needed by ``reset`` and ``correction``).
    """

    fallback: DenseRule
    every: int = 5
    cap: int = 500
    identity_clock: str = "updates"
    keep_dense: bool = False
    reset: Reset | None = None
    correction: Correction | None = None

    def wants_rows(self, layer: Any) -> bool:
        return isinstance(layer, LinearLayer)

    @property
    def ranks(self) -> Ranks:
        assert self.fallback.ranks is not None
        return self.fallback.ranks

    def update(
        self, f: FactorState, stats: Statistics, tick: Tick, ctx: RuleContext
    ) -> FactorState:
        if f.brand is None:
            eligible = stats.block is not None and self.cap + stats.block.shape[1] < f.dim
            f = replace(f, brand=eligible)
            if eligible:
                initial = min(self.ranks.initial, f.dim)
                f = replace(f, rank=self.ranks.brand(self.cap).init(initial))
        if not f.brand:
            return self.fallback.update(f, stats, tick, ctx)
        if self.keep_dense:
            f = f.with_dense(stats.dense(), tick.decay)
        return self._online(f, stats, tick, ctx)

    def _is_reset(self, tick: Tick) -> bool:
        period = tick.inverse_period
        return (
            self.reset is not None
            and tick.step > period
            and tick.step % (period * self.reset.every) == 0
        )

    def _online(
        self, f: FactorState, stats: Statistics, tick: Tick, ctx: RuleContext
    ) -> FactorState:
        decay = tick.decay
        if self._is_reset(tick):
            rep, f = self.fallback.low_rank(f.counted(decay), ctx)
            return replace(f, online=rep, drift=0.0, batches=0)
        count = f.batches
        f = replace(f, batches=count + 1)
        if count % self.every:
            # between Brand updates: this batch is not used (m_B > 1)
            if self.identity_clock == "batches":
                f = replace(f, identity=f.identity * decay)
            return f
        assert stats.block is not None
        block = stats.block.to(ctx.decomposition_dtype)
        state = f.online
        if state is None:
            empty = block.new_zeros((f.dim, 0)), block.new_zeros((0,))
            state = ln.LowRankPSD(*empty, check=False)
        assert f.rank is not None
        result = ln.brand_update(state, block, decay=decay, rank=min(f.rank.rank, f.dim))
        f = replace(
            f.counted(decay),
            online=result.state,
            drift=decay * f.drift + float(result.dropped_max),
        )
        if self.ranks.adaptive and result.state.rank > 0 and f.rank is not None:
            ratio = ln.truncation_ratio(result.state.d)
            f = replace(f, rank=self.ranks.brand(self.cap).update(f.rank, ratio))
        c = self.correction
        if c is not None and f.updates % c.every == 0 and f.matrix is not None:
            f = self._correct(f, c, ctx)
        return f

    def _correct(self, f: FactorState, c: Correction, ctx: RuleContext) -> FactorState:
        assert f.online is not None
        assert f.matrix is not None
        k = f.online.rank
        size = min(k, round(c.fraction * k + 1))
        if size < 1:
            return f
        U = f.online.U
        gen = f.generator(U.device)
        perm = torch.randperm(k, generator=gen, device=U.device)
        columns = perm[:size].sort().values
        # the exponential average of outer products is symmetric by construction
        online = ln.rayleigh_ritz_refresh(
            f.online, f.matrix.to(ctx.decomposition_dtype), columns, check_symmetric=False
        )
        return replace(f.drawn(gen), online=online)

    def refresh(self, f: FactorState, tick: Tick, ctx: RuleContext) -> FactorState:
        if not f.brand:
            return self.fallback.refresh(f, tick, ctx)
        # The online state changes at every Brand update; as for the other rules, the
        # representation applied changes only on refresh steps.
        fresh = tick.inverse or f.applied is None
        if fresh and f.online is not None and f.online.rank > 0:
            return _published(f, f.online, ctx)
        return f


# ---------------------------------------------------------------------------- registry


@dataclass(frozen=True)
class KronStrategy:
    """A registered ``inverse=`` strategy: its name, the rule of every factor and the seed
    of its sketches and random column choices."""

    name: str
    rule: FactorRule
    seed: int = 0


@dataclass(frozen=True)
class _Entry:
    options: tuple[str, ...]
    build: Callable[..., FactorRule]


_RANDOMIZED = ("rank", "oversample", "power_iters", "adaptive_rank", "rank_target", "seed")
_BRAND = (*_RANDOMIZED, "finish", "brand_every", "rank_cap", "identity_clock")
_STRATEGIES: dict[str, _Entry] = {}


def _randomized_rule(
    decomposer: Callable[..., Decomposer],
    *,
    rank: int = 180,
    oversample: int = 10,
    power_iters: int,
    adaptive_rank: bool = True,
    rank_target: float = 0.033,
    **extra: Any,
) -> DenseRule:
    """A dense rule with a randomized decomposer and adaptive ranks (validated options)."""
    ranks = Ranks(
        initial=check_int_at_least(1)(rank, "rank"),
        adaptive=check_bool(adaptive_rank, "adaptive_rank"),
        target=check_fraction(rank_target, "rank_target"),
    )
    sketch = decomposer(
        oversample=check_int_at_least(0)(oversample, "oversample"),
        power_iters=check_int_at_least(0)(power_iters, "power_iters"),
        **extra,
    )
    return DenseRule(sketch, ranks)


def _rsvd_rule(*, power_iters: int = 3, finish: str = "rr", **options: Any) -> DenseRule:
    if finish not in ("rr", "svd"):
        raise ValueError(f"Invalid finish: {finish!r}; valid names are ['rr', 'svd']")
    return _randomized_rule(RSVD, power_iters=power_iters, finish=finish, **options)


def _srevd_rule(
    *, power_iters: int = 4, reorth_every: int | None = 2, **options: Any
) -> DenseRule:
    if reorth_every is not None:
        check_int_at_least(1)(reorth_every, "reorth_every")
    return _randomized_rule(SREVD, power_iters=power_iters, reorth_every=reorth_every, **options)


def _brand_rule(
    *,
    controlled: bool,
    resets: bool,
    corrects: bool,
    brand_every: int | None = None,
    rank_cap: int = 500,
    identity_clock: str = "updates",
    reset_every: int = 5,
    correct_every: int = 5,
    correct_fraction: float = 0.2,
    **rsvd: Any,
) -> BrandRule:
    fallback = _rsvd_rule(**rsvd)
    every = (1 if controlled else 5) if brand_every is None else brand_every
    cap = check_int_at_least(1)(rank_cap, "rank_cap")
    if identity_clock not in ("updates", "batches"):
        raise ValueError(
            f"Invalid identity_clock: {identity_clock!r}; valid names are ['updates', 'batches']"
        )
    assert fallback.ranks is not None
    if fallback.ranks.initial > cap:
        raise ValueError(f"Invalid rank: {fallback.ranks.initial} (must be <= rank_cap = {cap})")
    reset = Reset(check_int_at_least(1)(reset_every, "reset_every")) if resets else None
    correction = None
    if corrects:
        correction = Correction(
            check_int_at_least(1)(correct_every, "correct_every"),
            check_fraction(correct_fraction, "correct_fraction"),
        )
    return BrandRule(
        fallback=fallback,
        every=check_int_at_least(1)(every, "brand_every"),
        cap=cap,
        identity_clock=identity_clock,
        keep_dense=controlled,
        reset=reset,
        correction=correction,
    )


def _register(name: str, options: tuple[str, ...], build: Callable[..., FactorRule]) -> None:
    _STRATEGIES[name] = _Entry(options, build)


_register("eigh", (), lambda: DenseRule(Eigh()))
_register("rsvd", (*_RANDOMIZED, "finish"), _rsvd_rule)
_register("srevd", (*_RANDOMIZED, "reorth_every"), _srevd_rule)
_register(
    "brand", _BRAND, lambda **o: _brand_rule(controlled=False, resets=False, corrects=False, **o)
)
_register(
    "brand-rsvd",
    (*_BRAND, "reset_every"),
    lambda **o: _brand_rule(controlled=True, resets=True, corrects=False, **o),
)
_register(
    "brand-correct",
    (*_BRAND, "correct_every", "correct_fraction"),
    lambda **o: _brand_rule(controlled=True, resets=False, corrects=True, **o),
)
_register(
    "brand-rsvd-correct",
    (*_BRAND, "reset_every", "correct_every", "correct_fraction"),
    lambda **o: _brand_rule(controlled=True, resets=True, corrects=True, **o),
)


def inverse_names() -> tuple[str, ...]:
    """The registered ``inverse=`` names, sorted."""
    return tuple(sorted(_STRATEGIES))


def make_strategy(name: Any, options: Mapping[str, Any] | None = None) -> KronStrategy:
    """The strategy registered as ``name`` with its keyword ``options``; ``ValueError`` for an
    unknown name (listing the valid ones) or an option the strategy does not take."""
    if not isinstance(name, str) or name not in _STRATEGIES:
        raise ValueError(f"Invalid inverse: {name!r}; valid names are {list(inverse_names())}")
    entry = _STRATEGIES[name]
    options = dict(options or {})
    known = {option for other in _STRATEGIES.values() for option in other.options}
    foreign = sorted(set(options) - known - {"seed"})
    if foreign:
        raise TypeError(
            f"unexpected keyword argument(s) {foreign}: neither an option of the optimizer or "
            "preconditioner nor of any inverse strategy (options of the strategies: "
            f"{sorted(known | {'seed'})})"
        )
    unknown = sorted(set(options) - set(entry.options))
    if unknown:
        raise ValueError(
            f"inverse={name!r} does not take option(s) {unknown}; it accepts {list(entry.options)}"
        )
    seed = check_int_at_least(0)(options.pop("seed", 0), "seed")
    return KronStrategy(name, entry.build(**options), seed)


# ---------------------------------------------------------------------------- the block


@dataclass(frozen=True)
class KronState:
    """The Kronecker pair of one layer: two factors and the inverse prepared from their
    applied representations for the damping value ``damping`` (``None`` before)."""

    A: FactorState
    G: FactorState
    prepared: Prepared | None = None
    damping: float | None = None
    probe: Tensor | None = None


class KronBlock(CurvatureBlock[KronState]):
    """The K-FAC family's curvature block: ``(G (x) A)`` per layer, every factor kept by the
    strategy's rule, directions through a damping scheme's prepared inverse.

    Parameters
    ----------
    strategy : KronStrategy
        From :func:`make_strategy`.
    damping : DampingScheme
        How the damping enters the inverse (``kfac._damping``).
    continuation : bool
        Model the discarded spectrum of a truncated representation as flat at its smallest
        kept eigenvalue.
    factored_apply : bool
        Compute the directions of Linear layers from the layer's rows (only with a factored
        damping scheme; checked by a probe each step): always once both factors are
        Brand-tracked, and with a dense rule on factor steps when ``N`` rows make it the
        cheaper product, ``(I_G g^T)(I_A a^T)^T`` instead of ``I_G V I_A`` (for ``N`` below
        about two thirds of the width with dense inverses). A gradient the rows do not
        reproduce falls back to ``.grad``; with a dense rule silently (the same product,
        computed the other way).
    dtype, decomposition_dtype : torch.dtype
        Application (factor) dtype and decomposition dtype.
    seed : int
        Seed of the rows' probes (the strategy carries the seed of its sketches).
    factor_init : {"identity", "zero"}
        Initialisation of the factors' exponential averages. ``"identity"`` (the K-FAC
        papers'): ``X_0 = I``, carried as the weight ``rho^m`` added to the damping, so the
        direction depends on the scale of the loss. ``"zero"``: ``X_0 = 0`` with the average
        divided by its total weight ``1 - rho^m`` (the bias correction of Adam and kfac-jax);
        with relative damping, multiplying the loss by ``c`` divides the direction by ``c``.
    """

    name: ClassVar[str] = "kron"

    def __init__(
        self,
        strategy: KronStrategy,
        damping: DampingScheme,
        *,
        continuation: bool = True,
        factored_apply: bool = True,
        dtype: torch.dtype = torch.float32,
        decomposition_dtype: torch.dtype | None = None,
        seed: int = 0,
        factor_init: str = "identity",
    ) -> None:
        if factor_init not in FACTOR_INITS:
            raise ValueError(
                f"Invalid factor_init: {factor_init!r}; valid names are {list(FACTOR_INITS)}"
            )
        self.factor_init = factor_init
        self.strategy = strategy
        self.damping_scheme = damping
        self.continuation = continuation
        self.factored_apply = factored_apply and damping.factored
        self.dtype = dtype
        self.seed = seed
        self.ctx = RuleContext(decomposition_dtype or dtype, dtype, factor_init)
        #: Position of each registered layer (:meth:`check_layers`): the factors' seeds.
        self._positions: dict[str, int] = {}
        #: How each layer's last direction was computed ("factored" or "dense").
        self.applied: dict[str, str] = {}
        self._mismatch_warned: set[str] = set()

    def relative_damping(self) -> bool:
        """Whether the damping is relative to the curvature's scale."""
        return bool(getattr(self.damping_scheme, "relative", False))

    @property
    def rule(self) -> FactorRule:
        return self.strategy.rule

    # -------------------------------------------------------------- protocol
    def rows_candidate(self, layer: Any) -> bool:
        """Whether ``layer`` may use the rows application: a Linear layer of a Brand rule
        (once its factors are Brand-tracked) or of a dense rule (on the steps where the rows
        are the cheaper product, :meth:`Prepared.rows_cheaper`)."""
        return (
            self.factored_apply
            and (self.rule.wants_rows(layer) or self._dense_rows(layer))
            and all(p.requires_grad and p.dtype in _STAT_DTYPES for p in layer.params)
        )

    def _dense_rows(self, layer: Any) -> bool:
        # under kfac.distributed the rows are gathered across processes (or reduced to the
        # sums where those are fewer numbers: CaptureSpec.optional)
        return isinstance(self.rule, DenseRule) and isinstance(layer, LinearLayer)

    def rows_applied(self, layer: Any, state: KronState) -> bool:
        """Whether the layer's direction may come from its rows (a candidate whose factors
        are Brand-tracked, or a dense rule's candidate)."""
        if state.probe is None:
            return False
        if isinstance(self.rule, DenseRule):
            return True
        return bool(state.A.brand) and bool(state.G.brand)

    def capture(self, layer: Any, state: KronState, factor_step: bool) -> CaptureSpec | None:
        rows = self.rows_applied(layer, state)
        if factor_step:
            wanted = self.rule.wants_rows(layer)
            # a dense rule's rows only serve the rows application: optional (distributed
            # execution reduces them to the sums where those are fewer numbers)
            return CaptureSpec(rows=rows or wanted, optional=rows and not wanted)
        # a dense rule uses the rows on factor steps only (see _rows)
        dense = isinstance(self.rule, DenseRule)
        return CaptureSpec(rows=True) if rows and not dense else None

    def check_layers(self, layers: Mapping[str, Any]) -> None:
        """Warn when the strategy cannot do what its name says on these layers: a Brand
        strategy whose ``rank_cap`` leaves no factor to track (every factor would take the
        fallback), or a dense eigendecomposition of a factor wider than
        :data:`DENSE_WARN_DIM` (``O(D^3)`` per refresh, ``D^2`` memory)."""
        self._positions = {name: i for i, name in enumerate(layers)}
        rule = self.rule
        if isinstance(rule, BrandRule):
            trackable = [
                (name, side)
                for name, layer in layers.items()
                if rule.wants_rows(layer)
                for side, dim in (("A", layer.dim_A), ("G", layer.dim_G))
                if rule.cap + 1 < dim
            ]
            if not trackable:
                warnings.warn(
                    f"inverse={self.strategy.name!r} tracks no factor here: a Brand-tracked "
                    f"factor needs a Linear layer with rank_cap + batch rows < its dimension, "
                    f"and rank_cap={rule.cap} leaves none (widest factor: "
                    f"{max(max(layer.dim_A, layer.dim_G) for layer in layers.values())}); "
                    "every factor runs the fallback randomized decomposition. Lower rank_cap, "
                    "or use inverse='rsvd' to say so",
                    UserWarning,
                    stacklevel=find_stacklevel(),
                )
        if isinstance(rule, DenseRule) and rule.decomposer.full:
            wide = [
                f"'{name}' {side} ({dim})"
                for name, layer in layers.items()
                for side, dim in (("A", layer.dim_A), ("G", layer.dim_G))
                if dim > DENSE_WARN_DIM
            ]
            if wide:
                warnings.warn(
                    f"inverse={self.strategy.name!r} decomposes dense factors wider than "
                    f"{DENSE_WARN_DIM}: {', '.join(wide)}; each refresh costs O(D^3) time and "
                    "each factor D^2 memory (a 9216-wide factor: minutes per refresh on a CPU). "
                    "A low-rank strategy (inverse='rsvd', 'brand') is linear or quadratic in D",
                    UserWarning,
                    stacklevel=find_stacklevel(),
                )

    def init(self, layer: Any) -> KronState:
        probe = None
        if self.rows_candidate(layer):
            weight = layer.params[0]
            seed = self.seed + zlib.crc32(layer.name.encode())
            gen = torch.Generator(device=weight.device).manual_seed(seed)
            probe = torch.randn(layer.dim_A, generator=gen, device=weight.device, dtype=self.dtype)
        return KronState(
            A=FactorState(layer.dim_A, seed=self._factor_seed(layer, "A")),
            G=FactorState(layer.dim_G, seed=self._factor_seed(layer, "G")),
            probe=probe,
        )

    def _factor_seed(self, layer: Any, side: str) -> int:
        """The seed of a factor's random stream: the strategy's seed and the factor's place
        (the layer's position among the registered layers, so a model wrapped in
        ``DistributedDataParallel``, whose names gain a ``module.`` prefix, draws the same)."""
        place = self._positions.get(layer.name, layer.name)
        return (self.strategy.seed * 1_000_003 + zlib.crc32(f"{place}.{side}".encode())) % 2**62

    def update(self, layer: Any, state: KronState, batch: LayerBatch, tick: Tick) -> KronState:
        return self.update_parts(layer, state, batch, tick, PARTS)

    def refresh(self, layer: Any, state: KronState, tick: Tick) -> KronState:
        return self.prepare(layer, state, self._refresh_factors(state, tick, PARTS), tick)

    # -------------------------------------------------------------- distributed parts
    def parts(self, layer: Any) -> dict[str, float]:
        """The two factors, each with the predicted cost of keeping it (:meth:`cost`)."""
        return {"A": self.cost(layer, layer.dim_A), "G": self.cost(layer, layer.dim_G)}

    def cost(self, layer: Any, dim: int) -> float:
        """Predicted work of one factor of width ``dim`` per refresh (relative units): ``D^3``
        for a full eigendecomposition, ``D^2 (r + p)`` for a randomized one (``r`` the
        initial rank, ``p`` the oversampling, at most ``D``), ``D (r + n)^2`` for a Brand
        update (``n`` taken as ``r``); a Brand rule's factors that cannot be tracked (not a
        Linear layer, or ``rank_cap + 1 >= D``) cost what their fallback costs."""
        rule = self.rule
        if isinstance(rule, BrandRule):
            if rule.wants_rows(layer) and rule.cap + 1 < dim:
                r = min(rule.ranks.initial, dim)
                return float(dim) * (2.0 * r) ** 2
            rule = rule.fallback
        assert isinstance(rule, DenseRule)
        if rule.ranks is None:
            return float(dim) ** 3
        sketch = rule.decomposer
        oversample = getattr(sketch, "oversample", 0)
        return float(dim) ** 2 * min(rule.ranks.initial + oversample, dim)

    def update_parts(
        self, layer: Any, state: KronState, batch: LayerBatch, tick: Tick, parts: Any
    ) -> KronState:
        """:meth:`update` of the factors named in ``parts`` only (``"A"``, ``"G"``)."""
        if batch.a_rows is not None:
            stats_A = Statistics(lambda: batch.input_factor(), batch.input_block())
            stats_G = Statistics(lambda: batch.output_factor(), batch.output_block())
        else:
            stats_A, stats_G = Statistics(batch.input_factor), Statistics(batch.output_factor)
        A = self.rule.update(state.A, stats_A, tick, self.ctx) if "A" in parts else state.A
        G = self.rule.update(state.G, stats_G, tick, self.ctx) if "G" in parts else state.G
        return replace(state, A=A, G=G)

    def refresh_parts(self, layer: Any, state: KronState, tick: Tick, parts: Any) -> KronState:
        """The factors named in ``parts`` refreshed (distributed execution: the parts this
        process owns), each with its damped inverse for ``tick.damping`` prepared here when
        the damping scheme makes it from the factor alone as a dense full-rank matrix
        (:meth:`DampingScheme.prepare_factor`): the owner then broadcasts that inverse, so
        the preparation is split between the processes too. The layer's inverse is left to
        :meth:`prepare`."""
        state = self._refresh_factors(state, tick, parts)
        for part in parts:
            f = getattr(state, part)
            if f.applied is None:
                continue
            made = self.damping_scheme.prepare_factor(
                f.applied, tick.damping, validate=f.applied.inverse is None
            )
            if made is not None and made is not f.applied.inverse:
                f = replace(f, applied=replace(f.applied, inverse=made))
                state = replace(state, **{part: f})
        return state

    def _refresh_factors(self, state: KronState, tick: Tick, parts: Any) -> KronState:
        G = self.rule.refresh(state.G, tick, self.ctx) if "G" in parts else state.G
        A = self.rule.refresh(state.A, tick, self.ctx) if "A" in parts else state.A
        return state if G is state.G and A is state.A else replace(state, A=A, G=G)

    def prepare(self, layer: Any, before: KronState, state: KronState, tick: Tick) -> KronState:
        """The damped inverse of ``state``'s representations, rebuilt when one of them
        changed since ``before`` or the damping value changed."""
        A, G = state.A, state.G
        changed = G.applied is not before.G.applied or A.applied is not before.A.applied
        if (
            G.applied is None
            or A.applied is None
            or (not changed and before.damping == tick.damping)
        ):
            return state
        # validated once per new representation; a new damping value alone reuses it
        prepared = self.damping_scheme.prepare(
            G.applied, A.applied, tick.damping, continuation=self.continuation, validate=changed
        )
        return replace(state, A=A, G=G, prepared=prepared, damping=tick.damping)

    def publish(
        self, layer: Any, before: KronState, state: KronState, part: str
    ) -> Message | None:
        """The factor's new representation (or its inverse for a new damping value) when it
        changed since ``before``: the header ``(rank, identity weight, Brand-tracked,
        kind)``, then for kind 1 ``(max d, mean d, min d, total damping)``, and the tensors
        ``(U, d)`` (kind 0) or the dense damped inverse ``(M,)`` that :meth:`refresh_parts`
        prepared (kind 1, a full-rank factor under a separable factored damping: ``D^2``
        numbers against ``D^2 + D``)."""
        f, old = getattr(state, part), getattr(before, part)
        if f.applied is None or f.applied is old.applied:
            return None
        brand = -1.0 if f.brand is None else float(f.brand)
        a = f.applied
        if a.inverse is not None:
            total, inverse = a.inverse
            header = (float(a.rank), a.identity, brand, 1.0, a.top, a.mean, a.bottom, total)
            return Message(header, (inverse.M,))
        rep = a.rep
        assert rep is not None  # an owner holds the representations it publishes
        return Message((float(rep.rank), a.identity, brand, 0.0), (rep.U, rep.d))

    def message_shapes(self, layer: Any, part: str, header: Any) -> list[tuple[int, ...]]:
        """Shapes of the tensors of a :meth:`publish` message with ``header``."""
        dim = layer.dim_A if part == "A" else layer.dim_G
        if header[3] == 1:
            return [(dim, dim)]
        rank = round(header[0])
        return [(dim, rank), (rank,)]

    def install(
        self, layer: Any, state: KronState, part: str, header: Any, tensors: Any
    ) -> KronState:
        """The state with the representation (or inverse) published for ``part``. Every
        process installs the broadcast buffer, its owner too (the same tensors in the same
        layout everywhere); the owner keeps its representation ``(U, d)`` beside an inverse,
        the others hold the inverse only."""
        brand = None if header[2] < 0 else bool(header[2])
        f = getattr(state, part)
        if header[3] == 1:
            (M,) = tensors
            # only the owner holds a representation together with an inverse prepared
            # ahead (refresh_parts); the others have one or the other
            own = f.applied is not None and f.applied.rep is not None
            rep = f.applied.rep if own and f.applied.inverse is not None else None
            rank, identity, _, _, top, mean, bottom, total = (float(v) for v in header[:8])
            applied = Applied(
                rep, identity, top, mean, bottom, f.dim, round(rank), (total, DenseInverse(M))
            )
        else:
            U, d = tensors
            applied = Applied.of(ln.LowRankPSD(U, d, check=False), float(header[1]))
        f = replace(f, applied=applied, brand=brand)
        return replace(state, **{part: f})

    def ready(self, state: KronState) -> bool:
        return state.prepared is not None

    def direction(
        self, layer: Any, state: KronState, grad: Tensor, batch: LayerBatch | None, tick: Tick
    ) -> Tensor:
        prepared = state.prepared
        assert prepared is not None
        rows = self._rows(layer, state, grad, batch, tick)
        if rows is None:
            self.applied[layer.name] = "dense"
            return prepared.apply(grad)
        self.applied[layer.name] = "factored"
        return prepared.apply_rows(*rows)

    def _rows(
        self, layer: Any, state: KronState, V: Tensor, batch: LayerBatch | None, tick: Tick
    ) -> tuple[Tensor, Tensor] | None:
        """The rows ``(grad_outputs, inputs)`` when they reproduce ``V`` on a random probe
        ``x``: ``|V x - g^T (a x)| <= 8 N eps ||g||_F ||a x||`` (rounding of the two
        ``N``-term sums); ``None`` (with one warning per layer) when they do not.

        A dense rule takes them only where they are the cheaper product and only on factor
        steps, which read back from the device anyway: the probe's check is a host read, and
        a step that updates and refreshes nothing reads nothing back."""
        if not self.rows_applied(layer, state) or batch is None or not batch.exact:
            return None
        if not all(p.requires_grad for p in layer.params):
            return None  # a bias frozen after registration: its column of V is zero
        g_rows, a_rows = batch.g_rows, batch.a_rows
        if g_rows is None or a_rows is None or g_rows.shape[0] != a_rows.shape[0]:
            return None
        dense = isinstance(self.rule, DenseRule)
        assert state.prepared is not None
        if dense and not (tick.factor and state.prepared.rows_cheaper(g_rows.shape[0])):
            return None
        assert state.probe is not None
        x = state.probe
        ax = a_rows @ x
        err = float(torch.linalg.vector_norm(V @ x - g_rows.T @ ax))
        eps = max(torch.finfo(V.dtype).eps, torch.finfo(layer.params[0].dtype).eps)
        bound = float(torch.linalg.vector_norm(g_rows)) * float(torch.linalg.vector_norm(ax))
        if err <= 8 * g_rows.shape[0] * eps * bound:
            return g_rows, a_rows
        if dense:
            return None  # the rows were an optimisation of the same product: nothing to say
        if layer.name not in self._mismatch_warned:
            self._mismatch_warned.add(layer.name)
            warnings.warn(
                f"the gradient of layer {layer.describe()} is not the product of its recorded "
                "output gradients and inputs (a penalty added to the loss, gradient "
                "accumulation over several forwards, or a gradient modified before step()?): "
                "preconditioning .grad instead of the rows for the steps where this happens; "
                "pass factored_apply=False to always do so",
                RuntimeWarning,
                stacklevel=6,
            )
        return None

    def exchange(self, state: KronState) -> dict[str, Tensor]:
        out = {}
        for side, f in (("A", state.A), ("G", state.G)):
            if f.rep is not None:
                out[f"{side}.U"], out[f"{side}.d"] = f.rep.U, f.rep.d
        return out

    # -------------------------------------------------------------- state
    def state_dict(self, state: KronState) -> dict[str, Any]:
        return {"A": _factor_state_dict(state.A), "G": _factor_state_dict(state.G)}

    def load_state(self, layer: Any, saved: Mapping[str, Any], device: torch.device) -> KronState:
        where = f"of layer '{layer.name}'"
        _check_factor_state(layer.dim_A, saved["A"], f"A {where}")
        _check_factor_state(layer.dim_G, saved["G"], f"G {where}")
        fresh = self.init(layer)
        return replace(
            fresh,
            A=_load_factor_state(layer.dim_A, saved["A"], device, f"A {where}", fresh.A.seed),
            G=_load_factor_state(layer.dim_G, saved["G"], device, f"G {where}", fresh.G.seed),
        )

    def block_state_dict(self) -> dict[str, Any]:
        return {"strategy": self.strategy.name, "factor_init": self.factor_init}

    def check_block_state_dict(self, saved: Mapping[str, Any]) -> None:
        if saved.get("strategy") != self.strategy.name:
            raise ValueError(
                f"state_dict was saved with inverse={saved.get('strategy')!r}, this "
                f"preconditioner uses {self.strategy.name!r}"
            )
        if saved.get("factor_init", "identity") != self.factor_init:
            raise ValueError(
                f"state_dict was saved with factor_init={saved.get('factor_init')!r}, this "
                f"preconditioner uses {self.factor_init!r}"
            )

    def load_block_state_dict(self, saved: Mapping[str, Any]) -> None:
        self.check_block_state_dict(saved)

    def diagnostics(self, layer: Any, state: KronState) -> list[dict[str, Any]]:
        rows = []
        for side, f in (("A", state.A), ("G", state.G)):
            rep = f.rep
            kind = "brand" if f.brand else ("dense" if f.matrix is not None else "-")
            rows.append(
                {
                    "layer": layer.name,
                    "factor": side,
                    "kind": kind,
                    "dim": f.dim,
                    "rank": None if f.applied is None else f.applied.rank,
                    "target_rank": None if f.rank is None else f.rank.rank,
                    "truncation_ratio": (
                        None if rep is None or rep.rank == 0 else ln.truncation_ratio(rep.d)
                    ),
                    "drift": f.drift if f.brand else None,
                    "updates": f.updates,
                    "identity": f.identity,
                    "memory": f.memory(),
                    "apply": self.applied.get(layer.name),
                }
            )
        return rows


def kron_block(
    *,
    dtype: torch.dtype,
    seed: int,
    fisher: str,
    inverse: str = "eigh",
    damping_scheme: str = "factored-relative",
    continuation: bool = True,
    factored_apply: bool = True,
    decomposition_dtype: torch.dtype | None = None,
    factor_init: str = "identity",
    **inverse_options: Any,
) -> KronBlock:
    """The K-FAC family's block (registered as ``"kron"``): ``inverse`` names the strategy
    (:func:`inverse_names`), ``inverse_options`` its options. The rows application needs the
    empirical Fisher (the rows of a Monte-Carlo pass are not those of the gradient)."""
    scheme = make_damping(damping_scheme)
    strategy = make_strategy(inverse, inverse_options)
    return KronBlock(
        strategy,
        scheme,
        continuation=check_bool(continuation, "continuation"),
        factored_apply=check_bool(factored_apply, "factored_apply") and fisher == "empirical",
        dtype=dtype,
        decomposition_dtype=decomposition_dtype,
        seed=seed,
        factor_init=factor_init,
    )


register_block("kron", kron_block)
