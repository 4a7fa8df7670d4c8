"""SENG: sketch-based empirical natural gradient (Yang, Xu, Wen, Chen and Xu; J. Sci. Comput.
92, 2022; arXiv 2006.05924).

Per layer, the rows of ``U`` (``n x P``) are the per-sample gradients scaled by
``1 / sqrt(n)``, so that ``U^T U`` is the batch's empirical Fisher, and the direction is the
Sherman-Morrison-Woodbury solve

    (lambda I + U^T U)^{-1} g = (g - U^T (lambda I_n + U U^T)^{-1} U g) / lambda

with an ``n x n`` system. ``U`` and the inverse of the system are rebuilt from one batch every
``update_freq`` steps and reused, stale, with the current gradient in between (a step costs
two products with ``U``, ``O(n P)``). See docs/algorithms.md, *FNGD and SENG*.

Representations of ``U`` (the cost rule, :meth:`SENGBlock.kind`):

``"factored"``  a layer with one position per sample (Linear): ``U_i = g_i a_i^T / sqrt(n)``
                kept as its two factors (``O(n (d_A + d_G))`` memory, exact).
``"explicit"``  a convolution (many positions) with ``P = d_G d_A <= explicit_max``: the
                ``n`` per-sample gradients formed (``O(n P)`` memory).
``"explicit"``  also a BatchNorm2d layer (channel-wise rows: ``U_i`` is ``[sum_t g * xhat,
                sum_t g]`` per channel, ``kfac._persample.diagonal_explicit``).
``"implicit"``  a larger convolution: each sample's output-gradient map (``tau x d_G``) is
                compressed by a truncated SVD to rank ``svd_rank``, so ``U_i`` is a sum of
                ``svd_rank`` outer products ``sum_k l_{ik} r_{ik}^T`` (the factored form with
                more than one term; an approximation unless ``svd_rank >= min(tau, d_G)``).

Sketches (``col_sample_size = s``): the Gram ``U U^T`` and the product ``U g`` use sampled
coordinates. Explicit layers with ``P > s^2`` sample ``m = s^2`` of the ``P`` coordinates
without replacement; factored layers sample ``s`` of the ``d_G`` rows of the left factors and
``s`` of the ``d_A`` rows of the right factors when larger (the Gram is then the sum over
terms of Hadamard products of two small Grams, and ``U g`` uses the full factors).
``U^T v`` always uses the full ``U``. With the sampling ratio ``r = P / m`` (per factor for
the factored form), ``scaling="unbiased"`` multiplies each sampled copy by ``sqrt(r)``, so the
sketched Gram is unbiased; ``scaling="reference"`` multiplies each copy by ``r``, as the
authors' code does, so the sketched Gram is ``r U U^T`` in expectation (an effective damping
of ``lambda / r`` on that layer). ``U g`` is unbiased under both. The default is
``"reference"``: it trained the digits CNN better over three seeds and tied on the
autoencoder (docs/kfac.md).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, ClassVar, NamedTuple

import torch
from torch import Tensor, nn

from . import _persample as ps
from ._curvature import CaptureSpec, CurvatureBlock, LayerBatch, Tick, register_block
from ._layers import BatchNorm2dLayer, Layer
from ._schedule import check_int_at_least, check_integer
from .optimizer import PreconditionedSGD
from .preconditioner import Preconditioner

__all__ = [
    "KINDS",
    "SCALINGS",
    "SENG",
    "SENGBlock",
    "SENGPreconditioner",
    "SENGState",
    "seng_block",
]

SCALINGS = ("reference", "unbiased")
KINDS = ("factored", "explicit", "implicit")


class SENGState(NamedTuple):
    """One layer's stale representation of ``U`` and the prepared inverse.

    ``kind`` names the representation: ``U`` ``(n, P)`` (explicit) or the factors ``L``
    ``(n, p, d_G)`` and ``R`` ``(n, p, d_A)`` with ``U_i = sum_k L_{ik} R_{ik}^T`` (factored,
    implicit). ``cols`` are the sampled coordinates of an explicit sketch (``None``: all) and
    ``ug_scale`` the factor of the sampled ``U g``. ``inverse`` is
    ``(lambda I_n + K)^{-1}`` for the sketched Gram ``K`` and ``lam`` its ``lambda``.
    """

    kind: str = "-"
    U: Tensor | None = None
    L: Tensor | None = None
    R: Tensor | None = None
    cols: Tensor | None = None
    ug_scale: float = 1.0
    inverse: Tensor | None = None
    lam: float = 0.0
    refreshes: int = 0


class SENGBlock(CurvatureBlock[SENGState]):
    """The SENG curvature block (see the module docstring).

    Parameters
    ----------
    dtype : torch.dtype
        Statistics dtype.
    seed : int
        Seed of the coordinate sampler.
    col_sample_size : int or None, default 256
        ``s`` (``None``: no sketching).
    scaling : {"reference", "unbiased"}, default "reference"
    explicit_max : int, default 1_000_000
        Largest ``P`` of a convolution whose per-sample gradients are formed.
    svd_rank : int, default 16
        Terms per sample of the implicit representation.
    """

    name: ClassVar[str] = "seng"
    #: Layers SENG preconditions beyond the registry's: BatchNorm2d (its per-sample
    #: gradients are channel-wise, ``U`` formed explicitly; ``kfac._layers``).
    extra_layers: ClassVar[dict[type[nn.Module], type[Layer]]] = {nn.BatchNorm2d: BatchNorm2dLayer}
    #: Under ``torch.distributed`` every process gathers the global batch's rows on refresh
    #: steps and builds ``U`` and the inverse itself (``kfac.distributed``).
    replicated: ClassVar[bool] = True

    def __init__(
        self,
        *,
        dtype: torch.dtype = torch.float32,
        seed: int = 0,
        col_sample_size: int | None = 256,
        scaling: str = "reference",
        explicit_max: int = 1_000_000,
        svd_rank: int = 16,
    ) -> None:
        if scaling not in SCALINGS:
            raise ValueError(f"Invalid scaling: {scaling!r}; valid names are {list(SCALINGS)}")
        if col_sample_size is not None and not _positive_int(col_sample_size):
            raise ValueError(
                f"Invalid col_sample_size: {col_sample_size!r} (must be an int >= 1 or None)"
            )
        for key, value in (("explicit_max", explicit_max), ("svd_rank", svd_rank)):
            if not _positive_int(value):
                raise ValueError(f"Invalid {key}: {value!r} (must be an int >= 1)")
        self.dtype = dtype
        self.seed = check_integer(seed, "seed")
        self.col_sample_size = col_sample_size
        self.scaling = scaling
        self.explicit_max = explicit_max
        self.svd_rank = svd_rank
        self.generator = torch.Generator().manual_seed(self.seed)

    def kind(self, layer: Layer, positions: int) -> str:
        """The representation of ``U`` for ``layer`` with ``positions`` per sample."""
        if getattr(layer, "diagonal", False):
            return "explicit"  # channel-wise: 2 C coordinates per sample
        if positions == 1:
            return "factored"
        return "explicit" if layer.dim_G * layer.dim_A <= self.explicit_max else "implicit"

    # ------------------------------------------------------------------ sketches
    def _ratio_scale(self, ratio: float) -> float:
        """Factor of each sampled copy for the sampling ratio ``total / sampled``."""
        return math.sqrt(ratio) if self.scaling == "unbiased" else ratio

    def _sample(self, total: int, size: int, device: torch.device) -> Tensor:
        return torch.randperm(total, generator=self.generator)[:size].to(device)

    def sketch(self, state: SENGState) -> tuple[Tensor, Tensor | None, float]:
        """One draw of the sketched Gram ``K`` (``n x n``), with the sampled columns and the
        scale of ``U g`` (explicit), from ``state``'s ``U`` or factors."""
        s = self.col_sample_size
        if state.U is not None:
            U = state.U
            P = U.shape[1]
            if s is None or s * s >= P:
                return U @ U.T, None, 1.0
            cols = self._sample(P, s * s, U.device)
            ratio = P / (s * s)
            c = self._ratio_scale(ratio)
            Us = U[:, cols]
            return (c * c) * (Us @ Us.T), cols, ratio
        assert state.L is not None
        assert state.R is not None
        L, R = state.L, state.R
        scale = 1.0
        if s is not None and L.shape[2] > s:
            rows = self._sample(L.shape[2], s, L.device)
            scale *= self._ratio_scale(L.shape[2] / s) ** 2
            L = L[:, :, rows]
        if s is not None and R.shape[2] > s:
            rows = self._sample(R.shape[2], s, R.device)
            scale *= self._ratio_scale(R.shape[2] / s) ** 2
            R = R[:, :, rows]
        n, p = L.shape[:2]
        GL = L.reshape(n * p, -1) @ L.reshape(n * p, -1).T
        GR = R.reshape(n * p, -1) @ R.reshape(n * p, -1).T
        K = (GL * GR).reshape(n, p, n, p).sum(dim=(1, 3))
        return scale * K, None, 1.0

    # ------------------------------------------------------------------ protocol
    def check_layers(self, layers: Mapping[str, Any]) -> None:
        """Accept every registered layer: the per-sample algebra needs only its rows."""
        return None

    def capture(self, layer: Layer, state: SENGState, factor_step: bool) -> CaptureSpec | None:
        return CaptureSpec(rows=True) if factor_step else None

    def init(self, layer: Layer) -> SENGState:
        return SENGState()

    def ready(self, state: SENGState) -> bool:
        return state.inverse is not None

    def represent(self, layer: Layer, batch: LayerBatch) -> SENGState:
        """``U`` of one batch in the representation of the cost rule (no inverse yet)."""
        a, g = ps.per_sample_rows(batch)
        n, tau = a.shape[:2]
        root = math.sqrt(n)
        kind = self.kind(layer, tau)
        if getattr(layer, "diagonal", False):
            per_sample = ps.diagonal_explicit(a, g, layer.has_bias)
            return SENGState(kind, U=per_sample.reshape(n, -1) / root)
        if kind == "factored":
            return SENGState(kind, L=g / root, R=a)  # one term per sample
        if kind == "explicit":
            return SENGState(kind, U=ps.explicit(a, g).reshape(n, -1) / root)
        # implicit: g_i (tau x d_G) ~ Uk Sk Vk^T, so G_i ~ sum_k v_k (s_k A_i^T u_k)^T
        left, sing, right = torch.linalg.svd(g, full_matrices=False)
        p = min(self.svd_rank, sing.shape[1])
        L = right[:, :p, :]  # (n, p, d_G)
        R = torch.einsum("ntk,nti->nki", left[:, :, :p] * sing[:, None, :p], a)
        return SENGState(kind, L=L / root, R=R)

    def update(self, layer: Layer, state: SENGState, batch: LayerBatch, tick: Tick) -> SENGState:
        rep = self.represent(layer, batch)
        K, cols, ug_scale = self.sketch(rep)
        K = (K + K.T) / 2
        lam = tick.damping
        eye = torch.eye(K.shape[0], dtype=torch.float64, device=K.device)
        L = torch.linalg.cholesky(K.double() + lam * eye)  # float64: the system is only n x n
        inverse = torch.cholesky_inverse(L).to(K.dtype)
        return rep._replace(
            cols=cols, ug_scale=ug_scale, inverse=inverse, lam=lam, refreshes=state.refreshes + 1
        )

    def direction(
        self, layer: Layer, state: SENGState, grad: Tensor, batch: LayerBatch | None, tick: Tick
    ) -> Tensor:
        assert state.inverse is not None
        V = grad.to(state.inverse.dtype)
        if state.U is not None:
            U = state.U
            v = V.flatten()
            if state.cols is None:
                u = U @ v
            else:
                u = state.ug_scale * (U[:, state.cols] @ v[state.cols])
            y = state.inverse @ u
            out = (v - U.T @ y).reshape(V.shape)
        else:
            assert state.L is not None
            assert state.R is not None
            L, R = state.L, state.R
            u = torch.einsum("npo,npo->n", L, torch.einsum("npi,oi->npo", R, V))
            y = state.inverse @ u
            n, p = L.shape[:2]
            out = V - (L * y[:, None, None]).reshape(n * p, -1).T @ R.reshape(n * p, -1)
        return (out / state.lam).to(grad.dtype)

    def state_dict(self, state: SENGState) -> dict[str, Any]:
        return dict(state._asdict())

    def load_state(
        self, layer: Layer, saved: Mapping[str, Any], device: torch.device
    ) -> SENGState:
        missing = set(SENGState._fields) - set(saved)
        if missing:
            raise ValueError(f"SENG state of layer {layer.describe()} lacks {sorted(missing)}")
        values: dict[str, Any] = {
            key: value.to(device) if isinstance(value, Tensor) else value
            for key, value in saved.items()
            if key in SENGState._fields
        }
        state = SENGState(**values)
        P = layer.dim_G * layer.dim_A
        if state.U is not None and state.U.shape[1] != P:
            raise ValueError(
                f"SENG state of layer {layer.describe()}: U of shape {tuple(state.U.shape)} "
                f"does not fit {P} parameters"
            )
        return state

    def block_state_dict(self) -> dict[str, Any]:
        return {
            "col_sample_size": self.col_sample_size,
            "scaling": self.scaling,
            "generator": self.generator.get_state(),
        }

    def check_block_state_dict(self, state: Mapping[str, Any]) -> None:
        for key in ("col_sample_size", "scaling"):
            if state.get(key) != getattr(self, key):
                raise ValueError(
                    f"state_dict was saved with {key}={state.get(key)!r}, this preconditioner "
                    f"uses {getattr(self, key)!r}"
                )

    def load_block_state_dict(self, state: Mapping[str, Any]) -> None:
        self.generator.set_state(state["generator"])

    def exchange(self, state: SENGState) -> dict[str, Tensor]:
        names = ("U", "L", "R", "cols", "inverse")
        return {k: t for k in names if (t := getattr(state, k)) is not None}

    def diagnostics(self, layer: Layer, state: SENGState) -> list[dict[str, Any]]:
        tensors = [t for t in (state.U, state.L, state.R) if t is not None]
        return [
            {
                "layer": layer.name,
                "kind": state.kind,
                "terms": None if state.L is None else state.L.shape[1],
                "sketched": state.cols is not None,
                "refreshes": state.refreshes,
                "memory": sum(t.numel() * t.element_size() for t in tensors),
            }
        ]


def _positive_int(value: Any) -> bool:
    return not isinstance(value, bool) and isinstance(value, int) and value >= 1


def seng_block(
    *,
    dtype: torch.dtype,
    seed: int,
    fisher: str,
    col_sample_size: int | None = 256,
    scaling: str = "reference",
    explicit_max: int = 1_000_000,
    svd_rank: int = 16,
) -> SENGBlock:
    """The registry's factory for ``"seng"`` (empirical Fisher only)."""
    if fisher != "empirical":
        raise ValueError(
            f"Invalid fisher: {fisher!r}; SENG's U holds the per-sample gradients of the "
            "training loss, so only 'empirical' applies"
        )
    return SENGBlock(
        dtype=dtype,
        seed=seed,
        col_sample_size=col_sample_size,
        scaling=scaling,
        explicit_max=explicit_max,
        svd_rank=svd_rank,
    )


register_block("seng", seng_block)


class SENGPreconditioner(Preconditioner):
    """The SENG preconditioner: :class:`~kfac.Preconditioner` with the ``"seng"`` block.

    Call :meth:`step` after ``loss.backward()`` (the batch-mean loss) and before any
    ``torch.optim`` optimizer's ``step()``: each registered layer's ``.grad`` becomes
    ``(lambda I + U^T U)^{-1} grad`` with ``U`` the (sketched) per-sample gradients of the
    latest refresh batch.

    Parameters
    ----------
    model : nn.Module
        The model (its ``nn.Linear``, ``nn.Conv1d``/``nn.Conv2d`` and affine
        ``nn.BatchNorm2d`` layers are preconditioned).
    damping : float or callable(step), default 1.0
        ``lambda`` (read at each refresh).
    update_freq : int or callable(step), default 200
        Steps between refreshes of ``U`` and the inverse (the authors' CIFAR-10 value).
    col_sample_size : int or None, default 256
    scaling : {"reference", "unbiased"}, default "reference"
    explicit_max : int, default 1_000_000
    svd_rank : int, default 16
    **kwargs
        The other options of :class:`~kfac.Preconditioner` (``kl_clip``, ``rms_clip``,
        ``lr``, ``skip_layers``, ``factor_dtype``, ``grad_scaler``, ``seed``,
        ``time_phases``).

    Notes
    -----
    The per-sample gradients come from the layer's rows as ``n`` times the output gradients
    of the *batch-mean* loss: the loss must be a mean over the batch's samples. Rows are
    recorded on refresh steps only; the steps in between reuse the stale ``U`` and inverse
    and read nothing back from the device. A BatchNorm2d layer's per-sample gradients use
    its input normalised in the hook (never a call of the module: the running statistics
    are untouched). Other parameters (LayerNorm, embeddings, ...) keep their gradient.

    Examples
    --------
    >>> import torch
    >>> from torch import nn
    >>> import kfac
    >>> model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(64, 2))
    >>> precond = kfac.SENGPreconditioner(model, update_freq=10)  # BatchNorm2d too
    >>> x, y = torch.randn(8, 1, 6, 6), torch.randint(2, (8,))
    >>> nn.functional.cross_entropy(model(x), y).backward()
    >>> precond.step()
    >>> [row["kind"] for row in precond.diagnostics()]
    ['explicit', 'factored']
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        damping: Any = 1.0,
        update_freq: Any = 200,
        col_sample_size: int | None = 256,
        scaling: str = "reference",
        explicit_max: int = 1_000_000,
        svd_rank: int = 16,
        **kwargs: Any,
    ) -> None:
        for key in ("factor_every", "inverse_every", "factor_decay", "fisher"):
            if key in kwargs:
                raise ValueError(
                    f"Invalid option {key!r}: SENG rebuilds U and its inverse from one batch "
                    "every `update_freq` steps"
                )
        if not callable(update_freq):  # (else validated at each step, as factor_every)
            check_int_at_least(1)(update_freq, "update_freq")
        super().__init__(
            model,
            "seng",
            damping=damping,
            factor_every=update_freq,
            inverse_every=update_freq,
            factor_decay=0.0,
            col_sample_size=col_sample_size,
            scaling=scaling,
            explicit_max=explicit_max,
            svd_rank=svd_rank,
            **kwargs,
        )

    @property
    def seng(self) -> SENGBlock:
        """The SENG block (sketch options, sampler)."""
        block = self.block
        assert isinstance(block, SENGBlock)
        return block

    def state(self, name: str) -> SENGState:
        """The :class:`SENGState` of layer ``name``."""
        state: SENGState = super().state(name)
        return state


class SENG(PreconditionedSGD):
    """SENG as a ``torch.optim.Optimizer``: :class:`SENGPreconditioner`, then torch's SGD.

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
        Passed to :class:`SENGPreconditioner` (``damping``, ``update_freq``,
        ``col_sample_size``, ``scaling``, ``explicit_max``, ``svd_rank``, ``kl_clip``, ...).

    Notes
    -----
    ``state_dict()`` holds the stale ``U`` (or its factors), the prepared inverses and the
    coordinate sampler's generator, so a saved run continues identically.

    Examples
    --------
    >>> import torch
    >>> from torch import nn
    >>> import kfac
    >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
    <torch._C.Generator object at ...>
    >>> model = nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 1))
    >>> x, y = torch.randn(64, 4), torch.randn(64, 1)
    >>> opt = kfac.SENG(model, lr=0.1, damping=0.1, update_freq=5)
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

    preconditioner_class: ClassVar[type[Preconditioner]] = SENGPreconditioner
    preconditioner: SENGPreconditioner
