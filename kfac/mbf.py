"""MBF: the mini-block Fisher method (Bahamou, Goldfarb and Ren, AISTATS 2023).

Each layer's block of the empirical Fisher ``F = 1/n sum_i vec(g_i) vec(g_i)^T`` (``g_i``
the gradient of sample ``i``'s loss) is itself approximated by a block-diagonal matrix of
*mini-blocks*: a block map splits every row of the layer's ``d_G x d_A`` gradient matrix into
contiguous segments, each segment a mini-block of size ``m``. All mini-blocks of one size are
kept as one ``(B, m, m)`` tensor, exponentially averaged, and refreshed by one batched
Cholesky factorisation; the direction is one batched matrix-vector product. See
docs/algorithms.md, *Mini-block Fisher (MBF)*.

Block maps (:func:`default_block_map`):

- ``nn.Linear``: contiguous chunks of ``block_size`` entries of each output neuron's row
  (weights then bias; the last chunk of a row holds the remainder), or the whole row
  (``block_size=None``: one block of size ``d_in + 1`` per output neuron). Statistics memory
  ``d_out d_A m`` for chunks of ``m`` (``d_out d_A^2`` per neuron).
- ``nn.Conv2d``: one block per (output channel, input channel) kernel, of size ``k_h k_w``,
  and the bias as ``c_out`` blocks of size 1. Memory ``c_out c_in (k_h k_w)^2 + c_out``.

A block map is any callable ``layer -> tuple[Segment, ...]`` whose segments tile a row.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any, ClassVar, NamedTuple

import torch
from torch import Tensor, nn

from ._curvature import CaptureSpec, CurvatureBlock, LayerBatch, Message, Tick, register_block
from ._layers import Conv2dLayer, Layer, LinearLayer
from .optimizer import PreconditionedSGD
from .preconditioner import Preconditioner

__all__ = [
    "DAMPING_MODES",
    "MBF",
    "SOLVERS",
    "GroupState",
    "MBFBlock",
    "MBFPreconditioner",
    "MBFState",
    "Segment",
    "default_block_map",
    "mbf_block",
]

#: ``"absolute"``: ``F_b + lambda I``; ``"relative"``: ``F_b + lambda (tr F_b / m) I``.
DAMPING_MODES = ("absolute", "relative")
#: ``"auto"``: the cost rule; ``"cholesky"``: always dense; ``"smw"``: always factored.
SOLVERS = ("auto", "cholesky", "smw")
#: Elements of the largest temporary the statistics form at once (memory bound).
_CHUNK_ELEMENTS = 1 << 24
#: The relative damping's floor on ``tr F_b / m`` (a block of a dead unit stays invertible).
_TRACE_FLOOR = 1e-12
#: Elements of the chunk of blocks the Gauss-Jordan sweep inverts at once (4 MiB in float32:
#: its ``m`` passes then run in cache; measured on one CPU thread).
_SWEEP_CHUNK = 1 << 20
#: Elements of the gradient the direction of block-last groups transposes at once (1 MiB in
#: float32: the transposed rows and their product stay in cache; measured on one CPU thread).
_DIRECTION_CHUNK = 1 << 18
#: The one distributable part of a layer: all its mini-blocks, owned by one process.
PART = "blocks"
#: Codes of a group's applied representation in a distributed message's header (the SMW
#: path sends its rank instead, ``>= 0``).
_SWEPT, _CHOLESKY = -1.0, -2.0
#: Mini-blocks up to this size keep their statistic and inverse *block-last*, ``(m, m, B)``
#: (entry ``[j, k, b]`` is ``(j, k)`` of block ``b``), so that every elementwise operation
#: runs over the ``B`` blocks contiguously: the refresh is a vectorised Gauss-Jordan sweep and
#: the direction ``m`` fused multiply-adds of length ``m B`` (measured on one CPU thread: 3-4x
#: faster than LAPACK's batched Cholesky and a batched matrix-vector product at ``m = 8``, and
#: 1.4-1.8x faster than the ``(m, B, m)`` layout at ``m = 4``, whose innermost loops ran over
#: ``m`` entries); larger ones are inverted by batched Cholesky and applied by a batched
#: product, ``(B, m, m)``.
_SWEEP_MAX = 16


class Segment(NamedTuple):
    """``blocks`` mini-blocks of ``size`` contiguous entries of a row, from column ``start``."""

    start: int
    blocks: int
    size: int

    @property
    def stop(self) -> int:
        return self.start + self.blocks * self.size


BlockMap = Callable[[Layer], tuple[Segment, ...]]


def chunk_segments(width: int, size: int | None, start: int = 0) -> tuple[Segment, ...]:
    """Chunks of ``size`` of ``width`` columns from ``start``; the remainder is one block."""
    if size is None or size >= width:
        return (Segment(start, 1, width),)
    full, rest = divmod(width, size)
    segments = [Segment(start, full, size)]
    if rest:
        segments.append(Segment(start + full * size, 1, rest))
    return tuple(segments)


def default_block_map(block_size: int | None) -> BlockMap:
    """The block map of the module docstring: Linear rows in chunks of ``block_size``
    (``None``: one block per output neuron), Conv2d one block per kernel plus the bias."""

    def segments(layer: Layer) -> tuple[Segment, ...]:
        if isinstance(layer, Conv2dLayer):
            k = layer.kernel_size[0] * layer.kernel_size[1]
            out = (Segment(0, layer.dim_in // k, k),)
            return out + ((Segment(layer.dim_in, 1, 1),) if layer.has_bias else ())
        if isinstance(layer, LinearLayer):
            return chunk_segments(layer.dim_A, block_size)
        return chunk_segments(layer.dim_A, block_size)  # a registered layer type: its rows

    return segments


def split_rows(M: Tensor, segments: Sequence[Segment]) -> list[Tensor]:
    """``(..., rows, d_A)`` into one ``(..., rows * blocks, size)`` tensor per segment (block
    ``b = row * blocks + chunk``)."""
    lead, rows = M.shape[:-2], M.shape[-2]
    return [M[..., s.start : s.stop].reshape(*lead, rows * s.blocks, s.size) for s in segments]


def _block_last(F: Tensor) -> Tensor:
    """``(B, m, m)`` blocks as the block-last ``(m, m, B)``."""
    return F.permute(1, 2, 0).contiguous()


class GroupState(NamedTuple):
    """The state of one segment's ``B`` mini-blocks of size ``m``.

    Exactly one of ``F`` (the dense exponential average, block-last ``(m, m, B)``: entry
    ``[j, k, b]`` is ``(j, k)`` of block ``b``) and ``U`` (the same average as ``U U^T``
    with ``U`` of shape ``(B, m, r)``: the SMW path) is set once a statistic exists.
    ``inverse`` is what the direction applies: ``(F + lam I)^{-1}``, block-last ``(m, m,
    B)`` for ``m <= 16`` and ``(B, m, m)`` above, or for the SMW path ``(U^T U + lam
    I)^{-1}`` ``(B, r, r)`` with ``basis`` the ``U`` it was prepared from (later updates
    replace ``U``, not ``basis``); ``lam`` ``(B,)`` is the damping it was prepared with.
    Blocks are numbered row-major, ``b = row * blocks + chunk``.
    """

    F: Tensor | None = None
    U: Tensor | None = None
    inverse: Tensor | None = None
    lam: Tensor | None = None
    basis: Tensor | None = None

    @property
    def smw(self) -> bool:
        return self.U is not None

    def memory(self) -> int:
        """Bytes of the statistic (``F`` or ``U``)."""
        t = self.F if self.F is not None else self.U
        return 0 if t is None else t.numel() * t.element_size()


class MBFState(NamedTuple):
    """One layer's mini-block groups (one per segment of its block map), the number of
    statistics updates, and whether the applied inverses are stale."""

    groups: tuple[GroupState, ...]
    updates: int = 0
    stale: bool = False


class MBFBlock(CurvatureBlock[MBFState]):
    """The mini-block Fisher curvature block (see the module docstring).

    Parameters
    ----------
    dtype : torch.dtype
        Statistics dtype (float32 or float64).
    block_size : int or None, default 4
        Linear layers: chunk size ``m`` of each row (``None``: one block per output neuron).
    block_map : callable, optional
        ``layer -> tuple[Segment, ...]``, overriding :func:`default_block_map`.
    damping_mode : {"absolute", "relative"}, default "absolute"
        ``F_b + lambda I`` or ``F_b + lambda (tr F_b / m) I``, ``lambda`` the step's damping.
    solver : {"auto", "cholesky", "smw"}, default "auto"
        ``"auto"`` keeps a group's statistic factored (``U U^T``, Sherman-Morrison-Woodbury
        solves with ``r x r`` systems) while its rank ``r`` is at most ``m / 2`` and dense
        (``m x m`` Cholesky) otherwise; the others force one path.
    """

    name: ClassVar[str] = "mbf"

    def __init__(
        self,
        *,
        dtype: torch.dtype = torch.float32,
        block_size: int | None = 4,
        block_map: BlockMap | None = None,
        damping_mode: str = "absolute",
        solver: str = "auto",
    ) -> None:
        if block_size is not None and (
            isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1
        ):
            raise ValueError(f"Invalid block_size: {block_size!r} (must be an int >= 1 or None)")
        if damping_mode not in DAMPING_MODES:
            raise ValueError(
                f"Invalid damping_mode: {damping_mode!r}; valid names are {list(DAMPING_MODES)}"
            )
        if solver not in SOLVERS:
            raise ValueError(f"Invalid solver: {solver!r}; valid names are {list(SOLVERS)}")
        if block_map is not None and not callable(block_map):
            raise ValueError(f"Invalid block_map: {block_map!r} (must be callable)")
        self.dtype = dtype
        self.block_size = block_size
        self.block_map = block_map if block_map is not None else default_block_map(block_size)
        self.damping_mode = damping_mode
        self.solver = solver
        self._segments: dict[str, tuple[Segment, ...]] = {}
        self._work: Tensor | None = None

    def relative_damping(self) -> bool:
        """Whether the damping is relative to the curvature's scale."""
        return self.damping_mode == "relative"

    # ------------------------------------------------------------------ the map
    def segments(self, layer: Layer) -> tuple[Segment, ...]:
        """The segments of one row of ``layer`` (validated once per layer)."""
        cached = self._segments.get(layer.name)
        if cached is not None:
            return cached
        segments = tuple(Segment(*s) for s in self.block_map(layer))
        column = 0
        for s in segments:
            if s.start != column or s.blocks < 1 or s.size < 1:
                raise ValueError(
                    f"Invalid block_map for layer {layer.describe()}: segments {segments} do "
                    f"not tile a row of {layer.dim_A} columns"
                )
            column = s.stop
        if column != layer.dim_A:
            raise ValueError(
                f"Invalid block_map for layer {layer.describe()}: segments {segments} do not "
                f"tile a row of {layer.dim_A} columns"
            )
        self._segments[layer.name] = segments
        return segments

    def _factored(self, rank: int, size: int) -> bool:
        """The cost rule: factored (SMW) while ``r <= m / 2`` (``r^3 <= m^3 / 8`` flops for
        the factorisation, ``m r <= m^2 / 2`` memory)."""
        if self.solver == "smw":
            return True
        if self.solver == "cholesky":
            return False
        return 2 * rank <= size

    # ------------------------------------------------------------------ protocol
    def capture(self, layer: Layer, state: MBFState, factor_step: bool) -> CaptureSpec | None:
        return CaptureSpec(rows=True) if factor_step else None

    def init(self, layer: Layer) -> MBFState:
        return MBFState(tuple(GroupState() for _ in self.segments(layer)))

    def ready(self, state: MBFState) -> bool:
        return all(g.inverse is not None for g in state.groups)

    def _per_sample(self, layer: Layer, batch: LayerBatch) -> list[Tensor]:
        """Per-sample block gradients ``(n, B, m)`` per segment: ``n sum_t g_{i,t} a_{i,t}^T``
        split by the map (formed in row chunks to bound the temporaries)."""
        assert batch.a_rows is not None
        assert batch.g_rows is not None
        n = batch.n
        a = batch.a_rows.reshape(n, -1, batch.a_rows.shape[-1])
        g = batch.g_rows.reshape(n, -1, batch.g_rows.shape[-1])
        d_G, d_A = g.shape[-1], a.shape[-1]
        step = max(1, _CHUNK_ELEMENTS // max(1, n * d_A))
        pieces: list[list[Tensor]] = []
        for lo in range(0, d_G, step):
            per_sample = n * torch.einsum("nto,nti->noi", g[..., lo : lo + step], a)
            pieces.append(split_rows(per_sample, self.segments(layer)))
        return [torch.cat(list(parts), dim=1) for parts in zip(*pieces, strict=True)]

    def _dense_linear(self, layer: Layer, batch: LayerBatch) -> list[Tensor]:
        """One position per sample: ``F_b = n sum_i g_{i,o}^2 a_{i,c} a_{i,c}^T`` as one GEMM
        of the squared output gradients with the chunks' outer products (no per-sample
        gradient is formed; only the ``m (m + 1) / 2`` entries on and above the diagonal are
        multiplied, one GEMM each, straight into its place, then mirrored). Block-last
        ``(m, m, B)``."""
        assert batch.a_rows is not None
        assert batch.g_rows is not None
        a, g = batch.a_rows, batch.g_rows
        n, rows = batch.n, g.shape[1]
        weights = n * g.square()  # (n, d_G)
        out = []
        for s in self.segments(layer):
            m = s.size
            F = a.new_empty(m, m, rows, s.blocks)
            step = max(1, _CHUNK_ELEMENTS // max(1, s.blocks))
            for lo in range(0, n, step):
                chunk = a[lo : lo + step, s.start : s.stop].unflatten(1, (s.blocks, m))
                w = weights[lo : lo + step].T
                for j in range(m):
                    for k in range(j, m):
                        outer = chunk[:, :, j] * chunk[:, :, k]  # (n, blocks)
                        if lo == 0:
                            torch.mm(w, outer, out=F[j, k])
                        else:
                            F[j, k].addmm_(w, outer)
            for j in range(m):
                for k in range(j + 1, m):
                    F[k, j] = F[j, k]
            out.append(F.view(m, m, rows * s.blocks))
        return out

    def update(self, layer: Layer, state: MBFState, batch: LayerBatch, tick: Tick) -> MBFState:
        rho = tick.decay
        n = batch.n
        segments = self.segments(layer)
        one_position = batch.positions == batch.n
        rank = (0 if rho == 0.0 else _rank(state)) + n
        per_sample: list[Tensor] | None = None
        dense_fast: list[Tensor] | None = None
        groups = []
        for k, (s, old) in enumerate(zip(segments, state.groups, strict=True)):
            factored = old.F is None and self._factored(rank, s.size)
            if factored:
                if per_sample is None:
                    per_sample = self._per_sample(layer, batch)
                U_inst = per_sample[k].permute(1, 2, 0) / math.sqrt(n)  # (B, m, n)
                if old.U is None or rho == 0.0:
                    U = U_inst
                else:
                    U = torch.cat([math.sqrt(rho) * old.U, math.sqrt(1 - rho) * U_inst], dim=2)
                groups.append(old._replace(U=U))
                continue
            if one_position:
                if dense_fast is None:
                    dense_fast = self._dense_linear(layer, batch)
                F_inst = dense_fast[k]
            else:
                if per_sample is None:
                    per_sample = self._per_sample(layer, batch)
                u = per_sample[k]
                F_inst = torch.einsum("nbj,nbk->jkb", u, u).div_(n)
            if old.U is not None:  # the factored average grew past the cost rule
                old = old._replace(F=_block_last(old.U @ old.U.mT), U=None)
            # F_inst is this update's own tensor: the average is formed in it
            F = F_inst if old.F is None else F_inst.mul_(1 - rho).add_(old.F, alpha=rho)
            groups.append(old._replace(F=F))
        return MBFState(tuple(groups), state.updates + 1, stale=True)

    def refresh(self, layer: Layer, state: MBFState, tick: Tick) -> MBFState:
        if not state.stale or not (tick.inverse or not self.ready(state)):
            return state
        groups = tuple(self._prepare(layer, g, tick.damping) for g in state.groups)
        return state._replace(groups=groups, stale=False)

    def _damping(self, trace: Tensor, size: int, damping: float) -> Tensor:
        if self.damping_mode == "absolute":
            return torch.full_like(trace, damping)
        return damping * (trace / size).clamp_min(_TRACE_FLOOR)

    def _prepare(self, layer: Layer, group: GroupState, damping: float) -> GroupState:
        """The damped inverse of one group: a vectorised Gauss-Jordan sweep (``m <=``
        ``_SWEEP_MAX``, block-last) or one batched Cholesky and the inverse from the factor;
        float32 failures are retried in float64 with a warning."""
        if group.U is not None:
            U = group.U
            size = U.shape[1]
            lam = self._damping(U.square().sum(dim=(1, 2)), size, damping)
            system = U.mT @ U
        else:
            assert group.F is not None
            F = group.F
            size = F.shape[0]
            lam = self._damping(torch.diagonal(F, dim1=0, dim2=1).sum(dim=1), size, damping)
            if size <= _SWEEP_MAX:  # F is symmetric by construction (mirrored or a Gram)
                inverse = _swept_inverse(F, lam, layer)
                return group._replace(inverse=inverse, lam=lam, basis=None)
            system = F.permute(2, 0, 1)
        eye = torch.eye(system.shape[-1], dtype=system.dtype, device=system.device)
        system = (system + system.mT) / 2 + lam[:, None, None] * eye
        inverse = _damped_inverse(system, layer)
        return group._replace(inverse=inverse, lam=lam, basis=group.U)

    def direction(
        self, layer: Layer, state: MBFState, grad: Tensor, batch: LayerBatch | None, tick: Tick
    ) -> Tensor:
        rows = grad.shape[0]
        out = torch.empty_like(grad)
        for s, g in zip(self.segments(layer), state.groups, strict=True):
            assert g.inverse is not None
            assert g.lam is not None
            inverse = g.inverse
            # (rows, blocks, m) views of the gradient and of the direction
            x = grad[:, s.start : s.stop].unflatten(1, (s.blocks, s.size)).to(inverse.dtype)
            target = out[:, s.start : s.stop].unflatten(1, (s.blocks, s.size))
            if g.basis is not None:  # SMW
                v = x.reshape(-1, s.size)
                U = g.basis.to(inverse.dtype)
                y = torch.einsum("brs,bs->br", inverse, torch.einsum("bmr,bm->br", U, v))
                d = (v - torch.einsum("bmr,br->bm", U, y)) / g.lam.to(inverse.dtype)[:, None]
                target.copy_(d.view_as(target))
            elif s.size <= _SWEEP_MAX:  # block-last: m fused multiply-adds of length m b
                m = s.size
                step = max(1, _DIRECTION_CHUNK // (m * s.blocks))  # rows at once, in cache
                for lo in range(0, rows, step):
                    r = min(rows, lo + step) - lo
                    # the rows' segment as (m, b): row j holds entry j of every block
                    v, y = self._workspace(2 * m * r * s.blocks, inverse).view(2, m, -1)
                    v.view(m, r, s.blocks).copy_(x[lo : lo + r].permute(2, 0, 1))
                    A = inverse[:, :, lo * s.blocks : (lo + r) * s.blocks]
                    torch.mul(A[0], v[0], out=y)  # y[k, b] = sum_j A[j, k, b] v[j, b]
                    for j in range(1, m):
                        y.addcmul_(A[j], v[j])
                    target[lo : lo + r].copy_(y.view(m, r, s.blocks).permute(1, 2, 0))
            else:
                v = x.reshape(-1, s.size, 1)
                target.copy_((inverse @ v).view_as(target))
        return out

    def _workspace(self, numel: int, like: Tensor) -> Tensor:
        """``numel`` elements of scratch memory of ``like``'s dtype and device, kept between
        calls (the directions of all layers share it, one chunk after another; at most
        ``2 _DIRECTION_CHUNK`` elements but for a block row longer than a chunk): a new
        buffer on every step costs the CPU its page faults again."""
        work = self._work
        if (
            work is None
            or work.numel() < numel
            or work.dtype != like.dtype
            or work.device != like.device
        ):
            work = self._work = like.new_empty(numel)
        return work[:numel]

    def exchange(self, state: MBFState) -> dict[str, Tensor]:
        out = {}
        for k, g in enumerate(state.groups):
            for key in ("basis", "inverse", "lam"):
                t = getattr(g, key)
                if t is not None:
                    out[f"{k}.{key}"] = t
        return out

    # -------------------------------------------------------------- distributed parts
    def parts(self, layer: Layer) -> dict[str, float]:
        """One part per layer, all its mini-blocks, with the predicted cost of a refresh and
        a statistics update: ``B (m^3 + n m^2)`` summed over the groups (``n`` taken as
        ``m``)."""
        cost = sum(layer.dim_G * s.blocks * 2.0 * s.size**3 for s in self.segments(layer))
        return {PART: cost}

    def update_parts(
        self, layer: Layer, state: MBFState, batch: LayerBatch, tick: Tick, parts: Any
    ) -> MBFState:
        """:meth:`update` when this process owns the layer."""
        return self.update(layer, state, batch, tick) if PART in parts else state

    def refresh_parts(self, layer: Layer, state: MBFState, tick: Tick, parts: Any) -> MBFState:
        """:meth:`refresh` when this process owns the layer (the inverses are prepared
        there; the other processes install them)."""
        return self.refresh(layer, state, tick) if PART in parts else state

    def prepare(self, layer: Layer, before: MBFState, state: MBFState, tick: Tick) -> MBFState:
        """Nothing to rebuild: the installed inverses are what the direction applies."""
        return state

    def publish(
        self, layer: Layer, before: MBFState, state: MBFState, part: str
    ) -> Message | None:
        """The owner's new inverses: a header with each group's layout (swept, Cholesky, or
        the SMW rank) and per group the tensors ``(inverse, lam)``, plus ``basis`` for SMW."""
        changed = any(
            g.inverse is not None and g.inverse is not old.inverse
            for g, old in zip(state.groups, before.groups, strict=True)
        )
        if not changed:
            return None
        header: list[float] = []
        tensors: list[Tensor] = []
        for s, g in zip(self.segments(layer), state.groups, strict=True):
            assert g.inverse is not None
            assert g.lam is not None
            if g.basis is not None:
                header.append(float(g.inverse.shape[-1]))
                tensors += [g.inverse, g.lam, g.basis]
            else:
                header.append(_SWEPT if s.size <= _SWEEP_MAX else _CHOLESKY)
                tensors += [g.inverse, g.lam]
        return Message(tuple(header), tuple(tensors))

    def message_shapes(self, layer: Layer, part: str, header: Any) -> list[tuple[int, ...]]:
        """Shapes of the tensors of a :meth:`publish` message with ``header``."""
        shapes: list[tuple[int, ...]] = []
        for s, code in zip(self.segments(layer), header, strict=False):
            B, m = layer.dim_G * s.blocks, s.size
            if code == _SWEPT:
                shapes += [(m, m, B), (B,)]
            elif code == _CHOLESKY:
                shapes += [(B, m, m), (B,)]
            else:
                r = round(code)
                shapes += [(B, r, r), (B,), (B, m, r)]
        return shapes

    def install(
        self, layer: Layer, state: MBFState, part: str, header: Any, tensors: Any
    ) -> MBFState:
        """The state with the inverses the layer's owner published."""
        tensors = list(tensors)
        groups = []
        for g, code in zip(state.groups, header, strict=False):
            inverse, lam = tensors.pop(0), tensors.pop(0)
            basis = tensors.pop(0) if code >= 0 else None
            groups.append(g._replace(inverse=inverse, lam=lam, basis=basis))
        return state._replace(groups=tuple(groups))

    def state_dict(self, state: MBFState) -> dict[str, Any]:
        return {
            PART: {
                "groups": [dict(g._asdict()) for g in state.groups],
                "updates": state.updates,
                "stale": state.stale,
            }
        }

    def load_state(self, layer: Layer, saved: Mapping[str, Any], device: torch.device) -> MBFState:
        segments = self.segments(layer)
        saved = saved.get(PART, {})
        groups = saved.get("groups")
        if not isinstance(groups, Sequence) or len(groups) != len(segments):
            raise ValueError(
                f"MBF state of layer {layer.describe()} does not match its block map "
                f"({len(segments)} segments)"
            )
        loaded = []
        for s, g in zip(segments, groups, strict=True):
            blocks = layer.dim_G * s.blocks
            values = {}
            for key in GroupState._fields:
                t = g.get(key)
                if t is not None:
                    if not _fits(key, t, blocks, s.size, g.get("basis") is None):
                        raise ValueError(
                            f"MBF state of layer {layer.describe()}: {key} of shape "
                            f"{tuple(t.shape)} does not fit {blocks} blocks of size {s.size}"
                        )
                    t = t.to(device)
                values[key] = t
            loaded.append(GroupState(**values))
        return MBFState(tuple(loaded), int(saved["updates"]), bool(saved["stale"]))

    def check_block_state_dict(self, state: Mapping[str, Any]) -> None:
        if state.get("block_size", self.block_size) != self.block_size:
            raise ValueError(
                f"state_dict was saved with block_size={state.get('block_size')!r}, this "
                f"preconditioner uses {self.block_size!r}"
            )

    def block_state_dict(self) -> dict[str, Any]:
        return {"block_size": self.block_size}

    def load_block_state_dict(self, state: Mapping[str, Any]) -> None:
        """Nothing to load: the block size was checked by :meth:`check_block_state_dict`."""
        return None

    def diagnostics(self, layer: Layer, state: MBFState) -> list[dict[str, Any]]:
        rows = []
        for s, g in zip(self.segments(layer), state.groups, strict=True):
            inverse = g.inverse
            rows.append(
                {
                    "layer": layer.name,
                    "kind": "smw" if g.smw else ("dense" if g.F is not None else "-"),
                    "blocks": layer.dim_G * s.blocks,
                    "block_size": s.size,
                    "rank": None if g.U is None else g.U.shape[2],
                    "updates": state.updates,
                    "memory": g.memory(),
                    "inverse_memory": 0
                    if inverse is None
                    else inverse.numel() * inverse.element_size(),
                }
            )
        return rows


def _fits(key: str, t: Tensor, blocks: int, size: int, dense: bool) -> bool:
    """Whether a saved group tensor has the shape of its layout (see :class:`GroupState`)."""
    if key == "F" or (key == "inverse" and dense and size <= _SWEEP_MAX):
        return tuple(t.shape) == (size, size, blocks)
    if key == "lam":
        return tuple(t.shape) == (blocks,)
    if key == "inverse" and dense:
        return tuple(t.shape) == (blocks, size, size)
    if key == "inverse":
        return t.ndim == 3 and t.shape[0] == blocks and t.shape[1] == t.shape[2]
    return t.ndim == 3 and t.shape[0] == blocks and t.shape[1] == size  # U, basis


def _rank(state: MBFState) -> int:
    """Columns of the factored statistics (0 before any update or when every group is dense)."""
    for g in state.groups:
        if g.U is not None:
            return int(g.U.shape[2])
    return 0


def _triangle(m: int, device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
    """Row and column indices of the entries of an ``m x m`` matrix on and above the
    diagonal, and for every entry of the full matrix its index among them."""
    J, K = torch.triu_indices(m, m, device=device)
    index = torch.empty(m, m, dtype=torch.long, device=device)
    index[J, K] = torch.arange(J.numel(), device=device)
    index[K, J] = index[J, K]
    return J, K, index.flatten()


def _sweep(system: Tensor, overwrite: bool = False) -> tuple[Tensor, Tensor]:
    """Gauss-Jordan inversion of a block-last batch ``(m, m, B)`` of symmetric positive
    definite matrices, without pivoting (the pivots are Schur complements: positive), as
    ``m`` rank-one updates over the whole batch; returns the inverse (in ``system``'s memory
    when ``overwrite``) and whether every pivot was positive and finite."""
    out = system if overwrite else system.clone()  # overwritten by its inverse
    m, B = out.shape[0], out.shape[-1]
    ok = torch.ones((), dtype=torch.bool, device=out.device)
    # blocks in chunks that stay in cache through the m passes (3x faster on a CPU at m = 4)
    step = max(1, _SWEEP_CHUNK // (m * m))
    for lo in range(0, B, step):
        A = out[..., lo : lo + step]
        for k in range(m):
            pivot = A[k, k].clone()  # (b,)
            ok = ok & ((pivot > 0) & torch.isfinite(pivot)).all()
            p = 1 / pivot
            row = A[k] * p  # (m, b)
            row[k] = p
            col = A[:, k].clone()  # (m, b)
            col[k] = 0
            A.addcmul_(col[:, None], row[None], value=-1)
            A[k] = row
            A[:, k] = -col * p
            A[k, k] = p
    return out, ok


def _damped_block_last(F: Tensor, lam: Tensor, dtype: torch.dtype) -> Tensor:
    """A new ``F + diag(lam)`` in ``dtype`` (block-last ``(m, m, B)``, ``lam`` ``(B,)``)."""
    system = F.to(dtype, copy=True)
    torch.diagonal(system, dim1=0, dim2=1).add_(lam.to(dtype)[:, None])
    return system


def _not_positive_definite(layer: Layer) -> torch.linalg.LinAlgError:
    """The error for damped mini-blocks that stay indefinite in float64."""
    return torch.linalg.LinAlgError(
        f"MBF: the damped mini-blocks of layer {layer.describe()} are not positive "
        "definite in float64 (increase the damping)"
    )


def _swept_inverse(F: Tensor, lam: Tensor, layer: Layer) -> Tensor:
    """The inverse of ``F + diag(lam)`` by :func:`_sweep` in the system's own memory, with
    the float64 retry of :func:`_damped_inverse` (reads one flag)."""
    system = _damped_block_last(F, lam, F.dtype)
    inverse, ok = _sweep(system, overwrite=True)
    if bool(ok):
        return inverse
    if system.dtype == torch.float64:
        raise _not_positive_definite(layer)
    warnings.warn(
        f"MBF: inverting the mini-blocks of layer {layer.describe()} failed in "
        f"{system.dtype}; retrying in float64",
        RuntimeWarning,
        stacklevel=4,
    )
    inverse, ok = _sweep(_damped_block_last(F, lam, torch.float64), overwrite=True)
    if not bool(ok):
        raise _not_positive_definite(layer)
    return inverse


def _damped_inverse(system: Tensor, layer: Layer) -> Tensor:
    """``system^{-1}`` of a batch of SPD matrices by batched Cholesky (reads one flag)."""
    L, info = torch.linalg.cholesky_ex(system)
    if bool((info != 0).any()):
        if system.dtype == torch.float64:
            raise _not_positive_definite(layer)
        warnings.warn(
            f"MBF: Cholesky of the mini-blocks of layer {layer.describe()} failed in "
            f"{system.dtype}; retrying in float64",
            RuntimeWarning,
            stacklevel=4,
        )
        L, info = torch.linalg.cholesky_ex(system.double())
        if bool((info != 0).any()):
            raise _not_positive_definite(layer)
    return torch.cholesky_inverse(L)


def mbf_block(
    *,
    dtype: torch.dtype,
    seed: int,
    fisher: str,
    block_size: int | None = 4,
    block_map: BlockMap | None = None,
    damping_mode: str = "absolute",
    solver: str = "auto",
) -> MBFBlock:
    """The registry's factory for ``"mbf"`` (``seed`` unused: the method is deterministic)."""
    return MBFBlock(
        dtype=dtype,
        block_size=block_size,
        block_map=block_map,
        damping_mode=damping_mode,
        solver=solver,
    )


register_block("mbf", mbf_block)


class MBFPreconditioner(Preconditioner):
    """The mini-block Fisher preconditioner: :class:`~kfac.Preconditioner` with the ``"mbf"``
    block (see :class:`MBFBlock` and docs/algorithms.md, *Mini-block Fisher (MBF)*).

    Call :meth:`step` after ``loss.backward()`` and before any ``torch.optim`` optimizer's
    ``step()``: each registered layer's ``.grad`` becomes ``(F_b + lambda_b I)^{-1} grad_b``
    on every mini-block ``b``.

    Parameters
    ----------
    model : nn.Module
        The model (its ``nn.Linear`` and ``nn.Conv2d`` layers are preconditioned).
    block_size : int or None, default 4
        Linear layers: chunk size of each output neuron's row (``None``: the whole row).
    damping : float or callable(step), default 0.1
        ``lambda`` (absolute) or its multiple of ``tr F_b / m`` (``damping_mode="relative"``).
    damping_mode : {"absolute", "relative"}, default "absolute"
    solver : {"auto", "cholesky", "smw"}, default "auto"
        Dense Cholesky or the Sherman-Morrison-Woodbury path (cost rule: factored while the
        statistic's rank is at most half the block size).
    factor_decay : float or callable(step), default 0.95
        Exponential-average decay of the mini-block statistics.
    factor_every, inverse_every : int or callable(step), default 20 and 20
        Periods of the statistics updates and of the refreshes (no statistics are recorded
        on the other steps; see docs/guide/optimizers.md for the measured trade-off).
    block_map : callable, optional
        ``layer -> tuple[Segment, ...]`` overriding the default map.
    **kwargs
        The other options of :class:`~kfac.Preconditioner` (``kl_clip``, ``rms_clip``,
        ``lr``, ``skip_layers``, ``fisher``, ``loss``, ``factor_dtype``, ``grad_scaler``,
        ``seed``, ``time_phases``).

    Examples
    --------
    >>> import torch
    >>> from torch import nn
    >>> import kfac
    >>> model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    >>> precond = kfac.MBFPreconditioner(model, block_size=2)
    >>> loss = nn.functional.cross_entropy(model(torch.randn(16, 4)), torch.randint(2, (16,)))
    >>> loss.backward()
    >>> precond.step()
    >>> [(row["blocks"], row["block_size"]) for row in precond.diagnostics()]
    [(16, 2), (8, 1), (8, 2), (2, 1)]
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        block_size: int | None = 4,
        damping: Any = 0.1,
        damping_mode: str = "absolute",
        solver: str = "auto",
        factor_decay: Any = 0.95,
        factor_every: Any = 20,
        inverse_every: Any = 20,
        block_map: BlockMap | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(
            model,
            "mbf",
            damping=damping,
            factor_decay=factor_decay,
            factor_every=factor_every,
            inverse_every=inverse_every,
            block_size=block_size,
            damping_mode=damping_mode,
            solver=solver,
            block_map=block_map,
            **kwargs,
        )

    @property
    def mbf(self) -> MBFBlock:
        """The MBF block (block map, damping mode, solver)."""
        block = self.block
        assert isinstance(block, MBFBlock)
        return block

    def state(self, name: str) -> MBFState:
        """The :class:`MBFState` of layer ``name``: one :class:`GroupState` per segment of
        its block map (statistic ``F`` or factored ``U``, applied inverse, damping)."""
        state: MBFState = super().state(name)
        return state


class MBF(PreconditionedSGD):
    """MBF as a ``torch.optim.Optimizer``: :class:`MBFPreconditioner`, then torch's SGD
    (heavy-ball momentum and weight decay as in :class:`~kfac.PreconditionedSGD`).

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
        Passed to :class:`MBFPreconditioner` (``block_size``, ``damping``,
        ``damping_mode``, ``solver``, ``factor_decay``, ``factor_every``,
        ``inverse_every``, ``block_map``, ``kl_clip``, ...).

    Examples
    --------
    >>> import torch
    >>> from torch import nn
    >>> import kfac
    >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
    <torch._C.Generator object at ...>
    >>> model = nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 1))
    >>> x, y = torch.randn(64, 4), torch.randn(64, 1)
    >>> opt = kfac.MBF(model, lr=0.05, momentum=0.9, block_size=4)
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

    preconditioner_class: ClassVar[type[Preconditioner]] = MBFPreconditioner
    preconditioner: MBFPreconditioner
