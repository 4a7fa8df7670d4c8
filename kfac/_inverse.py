"""Inverse strategies: how each Kronecker factor is kept and its representation refreshed.

A strategy owns three decisions for every factor (``kfac._factors.Factor``):

* what is stored: the dense exponential average (``matrix``), a Brand-updated low-rank state
  (``online``), or both (:meth:`InverseStrategy.update`);
* when and how the representation ``rep = (U, d)`` applied by the preconditioner is
  refreshed (:meth:`InverseStrategy.refresh`);
* whether the capture must keep the per-sample rows of a layer (:meth:`wants_block`).

Registered names (``inverse=``), ALGORITHMS.md sections 1-7:

``"eigh"`` (K-FAC)
    Full eigendecomposition of the dense EA every ``inverse_every`` steps, ``O(D^3)``.
``"rsvd"`` (R-KFAC)
    Randomized decomposition of the dense EA: Rayleigh-Ritz finish
    (:func:`lowrank_nla.randomized_eigh`) by default, or the HMT/torch-faithful SVD finish
    (``finish="svd"``, :func:`lowrank_nla.randomized_svd`), ``O(q D^2 (r + p))``.
``"srevd"`` (SRE-KFAC)
    :func:`lowrank_nla.srevd`, the symmetric randomized EVD.
``"brand"`` (B-KFAC)
    Brand-eligible factors (Linear layers with ``rank_cap + N < D``, ``N`` the rows of one
    batch; ALGORITHMS.md 4.4) keep only a :class:`~lowrank_nla.LowRankPSD` updated by
    :func:`lowrank_nla.brand_update` every ``brand_every`` factor updates: no ``D x D``
    matrix. Other factors fall back to ``"rsvd"``. As for every strategy, the representation
    applied is republished (from the online state) only on inverse-update steps: refreshing
    it at every step made the final loss of the wide autoencoder 30% worse, for R-KFAC as
    well (``inverse_every=1``).
``"brand-rsvd"`` (B-R-KFAC)
    Brand plus the dense EA, and every ``reset_every`` inverse periods the Brand state is
    replaced by a randomized decomposition of the EA.
``"brand-correct"`` (BC-KFAC), ``"brand-rsvd-correct"`` (B-R-C-KFAC)
    Brand (with or without resets) plus, every ``correct_every`` Brand updates, a partial
    Rayleigh-Ritz correction (:func:`lowrank_nla.rayleigh_ritz_refresh`) of a random
    ``correct_fraction`` of the columns against the dense EA.

Ranks: randomized and Brand ranks adapt through :class:`lowrank_nla.RankController`
(``adaptive_rank=True``, the thesis runs' setting), observing the truncation ratio
``d_min / d_max`` of every new representation.
"""

from __future__ import annotations

import abc
from collections.abc import Mapping
from typing import Any, ClassVar

import torch

import lowrank_nla as ln

from ._damping import check_fraction, check_int_at_least
from ._factors import Factor, FactorStats
from ._layers import LinearLayer

__all__ = [
    "BrandInverse",
    "EighInverse",
    "InverseStrategy",
    "RSVDInverse",
    "SREVDInverse",
    "inverse_names",
    "make_inverse",
    "register",
]

# Eigenvalues at or below this are rounding noise of a PSD matrix (ALGORITHMS.md 1.5).
EIGENVALUE_FLOOR = 1e-10

_REGISTRY: dict[str, type[InverseStrategy]] = {}


def clip_spectrum(d: torch.Tensor) -> torch.Tensor:
    """Zero the eigenvalues ``<= EIGENVALUE_FLOOR`` (negative rounding noise included)."""
    return torch.where(d > EIGENVALUE_FLOOR, d, torch.zeros_like(d))


class InverseStrategy(abc.ABC):
    """Keeps the factors and refreshes their representations (see the module docstring).

    Parameters
    ----------
    dtype : torch.dtype
        Decomposition dtype (float32 or float64), independent of the model dtype.
    """

    name: ClassVar[str]
    #: Keyword options the strategy accepts (``rank``, ``oversample``, ...).
    options: ClassVar[tuple[str, ...]] = ()

    def __init__(self, *, dtype: torch.dtype) -> None:
        self.dtype = dtype

    def wants_block(self, layer: Any) -> bool:
        """Whether the capture keeps the per-sample rows of ``layer`` (online updates)."""
        return False

    def update(
        self, factor: Factor, stats: FactorStats, decay: float, step: int, period: int
    ) -> None:
        """Fold one batch's statistics into the factor (default: the dense EA)."""
        factor.update_dense(stats.dense(), decay)
        factor.count_update(decay)

    def refresh(self, factor: Factor, step: int, inverse_step: bool, dtype: torch.dtype) -> None:
        """Make ``factor.rep`` current (default: decompose the dense EA on inverse steps)."""
        if factor.matrix is None:
            return
        if inverse_step or factor.rep is None:
            factor.set_rep(self.decompose(factor), dtype)

    @abc.abstractmethod
    def decompose(self, factor: Factor) -> ln.LowRankPSD:
        """A representation ``(U, d)`` of the factor's dense EA, in :attr:`dtype`."""

    def state_dict(self) -> dict[str, Any]:
        """Strategy-level state (random generator); factors hold the rest."""
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:  # noqa: B027 (optional hook)
        """Inverse of :meth:`state_dict` (stateless strategies ignore it)."""


def register(cls: type[InverseStrategy]) -> type[InverseStrategy]:
    """Class decorator adding a strategy to the ``inverse=`` registry under ``cls.name``."""
    _REGISTRY[cls.name] = cls
    return cls


def inverse_names() -> tuple[str, ...]:
    """The registered ``inverse=`` names, sorted."""
    return tuple(sorted(_REGISTRY))


def make_inverse(
    name: Any, *, dtype: torch.dtype, options: Mapping[str, Any] | None = None
) -> InverseStrategy:
    """Instantiate the strategy registered as ``name`` with its keyword ``options``."""
    if not isinstance(name, str) or name not in _REGISTRY:
        raise ValueError(f"Invalid inverse: {name!r}; valid names are {list(inverse_names())}")
    cls = _REGISTRY[name]
    options = dict(options or {})
    unknown = sorted(set(options) - set(cls.options))
    if unknown:
        raise ValueError(
            f"inverse={name!r} does not take option(s) {unknown}; it accepts {list(cls.options)}"
        )
    return cls(dtype=dtype, **options)


@register
class EighInverse(InverseStrategy):
    """K-FAC: full symmetric eigendecomposition ``X = Q diag(d) Q^T`` (``O(D^3)``).

    Computed by :func:`lowrank_nla.partial_eigh` in the decomposition dtype; a float32
    decomposition that fails or returns NaN is retried in float64 with a warning.
    """

    name = "eigh"

    def decompose(self, factor: Factor) -> ln.LowRankPSD:
        assert factor.matrix is not None
        X = factor.matrix.to(self.dtype)
        w, V = ln.partial_eigh(X, X.shape[0])
        return ln.LowRankPSD(V, clip_spectrum(w))


class _Randomized(InverseStrategy):
    """Shared part of the randomized strategies: ranks, sketch options, generator."""

    options: ClassVar[tuple[str, ...]] = (
        "rank",
        "oversample",
        "power_iters",
        "adaptive_rank",
        "rank_target",
        "seed",
    )
    default_power_iters: ClassVar[int] = 3

    def __init__(
        self,
        *,
        dtype: torch.dtype,
        rank: int = 180,
        oversample: int = 10,
        power_iters: int | None = None,
        adaptive_rank: bool = True,
        rank_target: float = 0.033,
        seed: int = 0,
    ) -> None:
        super().__init__(dtype=dtype)
        self.rank = check_int_at_least(1)(rank, "rank")
        self.oversample = check_int_at_least(0)(oversample, "oversample")
        q = self.default_power_iters if power_iters is None else power_iters
        self.power_iters = check_int_at_least(0)(q, "power_iters")
        if not isinstance(adaptive_rank, bool):
            raise ValueError(f"Invalid adaptive_rank: {adaptive_rank!r} (must be a bool)")
        self.adaptive_rank = adaptive_rank
        self.rank_target = check_fraction(rank_target, "rank_target")
        self.seed = check_int_at_least(0)(seed, "seed")
        self._generators: dict[str, torch.Generator] = {}

    def generator(self, device: torch.device) -> torch.Generator:
        key = str(device)
        if key not in self._generators:
            self._generators[key] = torch.Generator(device=device).manual_seed(self.seed)
        return self._generators[key]

    def controller(self, factor: Factor) -> ln.RankController:
        return ln.RankController.rsvd(factor.dim, target=self.rank_target)

    def target_rank(self, factor: Factor) -> int:
        if factor.rank is None:
            factor.rank = self.controller(factor).init(min(self.rank, factor.dim))
        return min(factor.rank.rank, factor.dim)

    def observe(self, factor: Factor, rep: ln.LowRankPSD) -> None:
        """Feed the truncation ratio of a new representation to the rank controller."""
        if self.adaptive_rank and factor.rank is not None and rep.rank > 0:
            ratio = ln.truncation_ratio(rep.d)
            factor.rank = self.controller(factor).update(factor.rank, ratio)

    def low_rank(self, factor: Factor) -> ln.LowRankPSD:
        """Rank-``target_rank`` representation of the dense EA (no rank observation)."""
        assert factor.matrix is not None
        X = factor.matrix.to(self.dtype)
        rep = self._decompose(X, self.target_rank(factor), self.generator(X.device))
        return ln.LowRankPSD(rep.U, clip_spectrum(rep.d))

    def decompose(self, factor: Factor) -> ln.LowRankPSD:
        rep = self.low_rank(factor)
        self.observe(factor, rep)
        return rep

    @abc.abstractmethod
    def _decompose(self, X: torch.Tensor, rank: int, rng: torch.Generator) -> ln.LowRankPSD:
        """Rank-``rank`` representation of the symmetric PSD ``X``."""

    def state_dict(self) -> dict[str, Any]:
        return {key: g.get_state() for key, g in self._generators.items()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        for key, value in state.items():
            device = torch.device(key)
            self._generators[key] = torch.Generator(device=device)
            self._generators[key].set_state(value)


@register
class RSVDInverse(_Randomized):
    """R-KFAC: randomized decomposition of each dense EA factor (ALGORITHMS.md 2).

    Options: ``rank`` (180, the thesis runs' initial rank), ``oversample`` (10),
    ``power_iters`` (3), ``finish`` (``"rr"``: Rayleigh-Ritz, exactly symmetric;
    ``"svd"``: the paper code's ``torch.svd_lowrank`` form, singular values and right
    vectors), ``adaptive_rank`` (True), ``rank_target`` (0.033), ``seed``.
    """

    name = "rsvd"
    options: ClassVar[tuple[str, ...]] = (*_Randomized.options, "finish")

    def __init__(self, *, dtype: torch.dtype, finish: str = "rr", **kwargs: Any) -> None:
        if finish not in ("rr", "svd"):
            raise ValueError(f"Invalid finish: {finish!r}; valid names are ['rr', 'svd']")
        self.finish = finish
        super().__init__(dtype=dtype, **kwargs)

    def _decompose(self, X: torch.Tensor, rank: int, rng: torch.Generator) -> ln.LowRankPSD:
        p, q = self.oversample, self.power_iters
        if self.finish == "svd":
            _, S, Vh = ln.randomized_svd(X, rank, oversample=p, power_iters=q, rng=rng)
            return ln.LowRankPSD(Vh.T, S)
        w, V = ln.randomized_eigh(
            X, rank, oversample=p, power_iters=q, rng=rng, check_symmetric=False
        )
        return ln.LowRankPSD(V, w)


@register
class SREVDInverse(_Randomized):
    """SRE-KFAC: symmetric randomized EVD of each dense EA factor (ALGORITHMS.md 3).

    Options as ``"rsvd"`` with ``power_iters`` 4 (the arXiv runs) and ``reorth_every`` (2;
    ``None`` is the paper's single QR, see :func:`lowrank_nla.srevd`).
    """

    name = "srevd"
    options: ClassVar[tuple[str, ...]] = (*_Randomized.options, "reorth_every")
    default_power_iters = 4

    def __init__(self, *, dtype: torch.dtype, reorth_every: int | None = 2, **kwargs: Any) -> None:
        if reorth_every is not None:
            check_int_at_least(1)(reorth_every, "reorth_every")
        self.reorth_every = reorth_every
        super().__init__(dtype=dtype, **kwargs)

    def _decompose(self, X: torch.Tensor, rank: int, rng: torch.Generator) -> ln.LowRankPSD:
        w, V = ln.srevd(
            X,
            rank,
            oversample=self.oversample,
            power_iters=self.power_iters,
            reorth_every=self.reorth_every,
            rng=rng,
            check_symmetric=False,
        )
        return ln.LowRankPSD(V, w)


@register
class BrandInverse(RSVDInverse):
    """B-KFAC: Brand online updates of the eligible factors, R-KFAC for the others.

    Options (ALGORITHMS.md 4.4, 6.4, 7): those of ``"rsvd"`` (used by the fallback factors
    and by resets; ``rank`` is also the initial Brand rank), ``brand_every`` (``m_B``:
    Brand updates happen every ``brand_every`` factor updates; 5 for B-KFAC, 1 for the
    controlled variants, as in the thesis runs), ``rank_cap`` (largest admissible Brand
    rank, 500: a factor is Brand-tracked iff ``rank_cap + N < D``), and for the controlled
    variants ``reset_every`` (``P_BR``, in inverse periods, 5), ``correct_every`` (``m_C``,
    in Brand updates, 5) and ``correct_fraction`` (``f``, 0.2).

    ``identity_clock`` sets how a Brand-tracked factor's identity weight decays:
    ``"updates"`` (default, the thesis'): ``rho^m`` with ``m`` the Brand updates, so with
    ``brand_every > 1`` it decays ``brand_every`` times slower than the weight of a dense
    factor updated on every statistics batch; ``"batches"``: ``rho^b`` with ``b`` the
    statistics batches, the dense factors' clock (see docs/kfac.md for the measurement that
    motivates it).
    """

    name = "brand"
    options: ClassVar[tuple[str, ...]] = (
        *RSVDInverse.options,
        "brand_every",
        "rank_cap",
        "identity_clock",
    )
    keeps_dense: ClassVar[bool] = False
    resets: ClassVar[bool] = False
    corrects: ClassVar[bool] = False
    default_brand_every: ClassVar[int] = 5

    def __init__(
        self,
        *,
        dtype: torch.dtype,
        brand_every: int | None = None,
        rank_cap: int = 500,
        reset_every: int = 5,
        correct_every: int = 5,
        correct_fraction: float = 0.2,
        identity_clock: str = "updates",
        **kwargs: Any,
    ) -> None:
        super().__init__(dtype=dtype, **kwargs)
        every = self.default_brand_every if brand_every is None else brand_every
        self.brand_every = check_int_at_least(1)(every, "brand_every")
        self.rank_cap = check_int_at_least(1)(rank_cap, "rank_cap")
        self.reset_every = check_int_at_least(1)(reset_every, "reset_every")
        self.correct_every = check_int_at_least(1)(correct_every, "correct_every")
        self.correct_fraction = check_fraction(correct_fraction, "correct_fraction")
        if identity_clock not in ("updates", "batches"):
            raise ValueError(
                f"Invalid identity_clock: {identity_clock!r}; valid names are "
                "['updates', 'batches']"
            )
        self.identity_clock = identity_clock
        if self.rank > self.rank_cap:
            raise ValueError(f"Invalid rank: {self.rank} (must be <= rank_cap = {self.rank_cap})")

    def wants_block(self, layer: Any) -> bool:
        return isinstance(layer, LinearLayer)

    def controller(self, factor: Factor) -> ln.RankController:
        """The Brand rule (ALGORITHMS.md 4.3) for Brand-tracked factors, rsvd's otherwise."""
        if not factor.brand:
            return super().controller(factor)
        return ln.RankController.brand(
            target=self.rank_target, cap=self.rank_cap, floor=min(70, self.rank_cap)
        )

    def eligible(self, factor: Factor, stats: FactorStats) -> bool:
        """ALGORITHMS.md 4.4: Linear factors (a block is kept) with ``rank_cap + N < D``."""
        return stats.block is not None and self.rank_cap + stats.block.shape[1] < factor.dim

    def update(
        self, factor: Factor, stats: FactorStats, decay: float, step: int, period: int
    ) -> None:
        if factor.brand is None:
            factor.brand = self.eligible(factor, stats)
            if factor.brand:
                factor.rank = self.controller(factor).init(min(self.rank, factor.dim))
        if not factor.brand:
            super().update(factor, stats, decay, step, period)
            return
        if self.keeps_dense:
            factor.update_dense(stats.dense(), decay)
        self._brand_step(factor, stats, decay, step, period)

    def _is_reset(self, step: int, period: int) -> bool:
        return self.resets and step > period and step % (period * self.reset_every) == 0

    def _brand_step(
        self, factor: Factor, stats: FactorStats, decay: float, step: int, period: int
    ) -> None:
        if self._is_reset(step, period):
            # B-R: skip the Brand update and replace the state by a randomized decomposition
            factor.count_update(decay)
            factor.online = self.low_rank(factor)
            factor.drift = 0.0
            factor.batches = 0
            return
        count = factor.batches
        factor.batches += 1
        if count % self.brand_every:
            # between Brand updates: this batch is not used (m_B > 1)
            if self.identity_clock == "batches":
                factor.identity *= decay
            return
        assert stats.block is not None
        block = stats.block.to(self.dtype)
        state = factor.online
        if state is None:
            empty = block.new_zeros((factor.dim, 0))
            state = ln.LowRankPSD(empty, block.new_zeros((0,)))
        result = ln.brand_update(state, block, decay=decay, rank=self.target_rank(factor))
        factor.online = result.state
        factor.count_update(decay)
        factor.drift = decay * factor.drift + float(result.dropped_max)
        self.observe(factor, result.state)
        if (
            self.corrects
            and factor.updates % self.correct_every == 0
            and factor.matrix is not None
        ):
            self._correct(factor)

    def _correct(self, factor: Factor) -> None:
        """BC: Rayleigh-Ritz on a random ``correct_fraction`` of the columns (ALGORITHMS 7.2)."""
        assert factor.online is not None
        assert factor.matrix is not None
        k = factor.online.rank
        size = min(k, round(self.correct_fraction * k + 1))
        if size < 1:
            return
        U = factor.online.U
        perm = torch.randperm(k, generator=self.generator(U.device), device=U.device)
        columns = perm[:size].sort().values
        factor.online = ln.rayleigh_ritz_refresh(
            factor.online, factor.matrix.to(self.dtype), columns
        )

    def refresh(self, factor: Factor, step: int, inverse_step: bool, dtype: torch.dtype) -> None:
        if not factor.brand:
            super().refresh(factor, step, inverse_step, dtype)
            return
        # The online state changes at every Brand update; like the other strategies, the
        # representation the optimizer applies changes only on inverse-update steps.
        fresh = inverse_step or factor.rep is None
        if fresh and factor.online is not None and factor.online.rank > 0:
            factor.set_rep(factor.online, dtype)


@register
class BrandRSVDInverse(BrandInverse):
    """B-R-KFAC: Brand plus the dense EA and a periodic randomized reset (ALGORITHMS 7.1)."""

    name = "brand-rsvd"
    options: ClassVar[tuple[str, ...]] = (*BrandInverse.options, "reset_every")
    keeps_dense = True
    resets = True
    default_brand_every = 1


@register
class BrandCorrectInverse(BrandInverse):
    """BC-KFAC: Brand plus the dense EA and partial Rayleigh-Ritz corrections (7.2)."""

    name = "brand-correct"
    options: ClassVar[tuple[str, ...]] = (
        *BrandInverse.options,
        "correct_every",
        "correct_fraction",
    )
    keeps_dense = True
    corrects = True
    default_brand_every = 1


@register
class BrandRSVDCorrectInverse(BrandInverse):
    """B-R-C-KFAC: Brand, periodic resets and partial corrections (ALGORITHMS 7.1-7.2)."""

    name = "brand-rsvd-correct"
    options: ClassVar[tuple[str, ...]] = (
        *BrandInverse.options,
        "reset_every",
        "correct_every",
        "correct_fraction",
    )
    keeps_dense = True
    resets = True
    corrects = True
    default_brand_every = 1
