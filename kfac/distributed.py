"""Data-parallel execution of a curvature block on ``torch.distributed``.

Every process holds a replica of the model and a batch of its own; the gradients are averaged
across processes (``DistributedDataParallel``, or an all-reduce the user runs himself) before
:meth:`kfac.Preconditioner.step`. The curvature work is split by *parts* (for the K-FAC
family: the factors ``A`` and ``G`` of every layer), each owned by one process:

* **reduce** (``statistics="all-reduce"``, the default): the factor statistics of every
  process are combined so that every factor sees the global batch. Sums of outer products go
  through one all-reduce, per-sample rows (Brand-tracked factors, the rows application)
  through one all-gather; a dense rule's optional rows (:class:`~kfac._curvature.CaptureSpec`)
  are gathered when the rows of all processes are fewer numbers than the sums, and reduced to
  the sums otherwise; the combined batch is the one a single process would record on the
  concatenated batch (the input factor pooled over all rows, the output factor the mean of the
  processes' output factors, which is the concatenated batch's when the processes hold batches
  of equal size, as ``DistributedSampler`` makes them). With ``statistics="local"`` (the lean
  design of Puiu's thesis) nothing is communicated: each owner keeps its factors from its own
  batch;
* **update** and **refresh** run for the owned parts only, so the decompositions and Brand
  updates are split across processes; a block may prepare what it can from a part alone
  there too (the K-FAC family: a full-rank factor's dense damped inverse under a factored
  damping);
* **exchange**: each owner broadcasts what changed (on refresh steps and when the damping
  value changes), ``(U, d)`` of rank ``r`` (``D r + r`` numbers) or a full-rank factor's
  prepared damped inverse (``D^2``), in one flattened buffer per owner, after one small
  all-reduce of headers that tells every process what comes;
* every process then prepares the layers' damped inverses from what it holds and computes
  every layer's direction from its (identical) gradient (or, with ``directions="owner"``,
  the layers it is given, then broadcasts them).

Owners are assigned by longest-processing-time-first greedy balancing over the block's
predicted costs (:func:`assign_owners`): deterministic, the same on every process. Every
collective of a step waits at most ``timeout`` seconds, so a process that died produces an
error on the others instead of a hang.
"""

from __future__ import annotations

import math
import pickle
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from ._curvature import CurvatureBlock, LayerBatch, Tick

__all__ = ["STATISTICS_MODES", "Distributed", "assign_owners"]

#: How factor statistics travel between processes.
STATISTICS_MODES = ("all-reduce", "local")
#: Where the layers' directions are computed.
DIRECTION_MODES = ("all", "owner")
#: Scalars per part in the exchange's header (a changed flag, then the block's header).
_HEADER = 9
#: Entries per layer in the reduce phase's header.
_FIELDS = 6


@dataclass(frozen=True)
class Distributed:
    """How a preconditioner runs under ``torch.distributed`` (pass it as ``distributed=``).

    Parameters
    ----------
    statistics : {"all-reduce", "local"}, default "all-reduce"
        ``"all-reduce"``: every factor sees the statistics of the global batch (the result
        equals one process on the concatenated batch). ``"local"``: each factor's owner uses
        its own batch only, with no statistics communication (the thesis' lean design); the
        rows application is then off, because a process's rows do not reproduce the averaged
        gradient.
    group : ProcessGroup, optional
        The process group (default: the default group, which must be initialised).
    timeout : float, default 300
        Seconds any collective of a step may wait before it raises ``RuntimeError``
        (at least ``0.001``, and finite: for practically no limit, pass a large number
        such as ``1e9``).
    directions : {"all", "owner"}, default "all"
        ``"all"``: every process computes every layer's direction from the broadcast
        representations (no more communication). ``"owner"``: each layer's direction is
        computed by one process (longest-processing-time balancing of ``d_G d_A (d_G +
        d_A)``) and broadcast, ``d_G d_A`` numbers per layer and step, which splits the
        direction work too (KAISA's memory-optimised end).

    Examples
    --------
    >>> import kfac
    >>> kfac.Distributed(statistics="local", timeout=60.0)
    Distributed(statistics='local', group=None, timeout=60.0, directions='all')
    """

    statistics: str = "all-reduce"
    group: Any = None
    timeout: float = 300.0
    directions: str = "all"

    def __post_init__(self) -> None:
        if self.statistics not in STATISTICS_MODES:
            raise ValueError(
                f"Invalid statistics: {self.statistics!r}; valid names are "
                f"{list(STATISTICS_MODES)}"
            )
        if self.directions not in DIRECTION_MODES:
            raise ValueError(
                f"Invalid directions: {self.directions!r}; valid names are {list(DIRECTION_MODES)}"
            )
        timeout = self.timeout
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not timeout > 0:
            raise ValueError(f"Invalid timeout: {timeout!r} (must be a number of seconds > 0)")
        try:  # every wait builds this timedelta: an infinite or huge value would fail mid-step
            timedelta(seconds=timeout)
        except OverflowError:
            raise ValueError(
                f"Invalid timeout: {timeout!r} (must be a finite number of seconds, at most "
                f"{timedelta.max.total_seconds():.0f})"
            ) from None
        if timeout < 1e-3:  # the waits count whole milliseconds, and 0 ms means "no limit"
            raise ValueError(
                f"Invalid timeout: {timeout!r} (must be at least 0.001 s, the resolution of "
                "torch.distributed's waits)"
            )
        if self.group is not None and not isinstance(self.group, dist.ProcessGroup):
            raise TypeError(
                "`group` must be a torch.distributed.ProcessGroup or None, got "
                f"{type(self.group).__name__}"
            )


def assign_owners(costs: Sequence[float], world: int) -> list[int]:
    """Longest-processing-time-first owners of parts with predicted ``costs``.

    The parts are taken in decreasing cost (ties in their given order) and each goes to the
    least loaded process so far (ties to the lowest rank); the result is deterministic.

    Parameters
    ----------
    costs : sequence of float
        Predicted cost of each part (``>= 0``).
    world : int
        Number of processes (``>= 1``).

    Returns
    -------
    list of int
        The owner rank of each part, in the order of ``costs``.

    Examples
    --------
    >>> from kfac.distributed import assign_owners
    >>> assign_owners([8.0, 1.0, 5.0, 4.0], 2)
    [0, 0, 1, 1]
    """
    if isinstance(world, bool) or not isinstance(world, int) or world < 1:
        raise ValueError(f"`world` must be an int >= 1, got {world!r}")
    values = [float(c) for c in costs]
    if any(not math.isfinite(c) or c < 0 for c in values):
        raise ValueError(f"`costs` must be finite and >= 0, got {values}")
    loads = [0.0] * world
    owners = [0] * len(values)
    for i in sorted(range(len(values)), key=lambda i: (-values[i], i)):
        rank = min(range(world), key=lambda r: (loads[r], r))
        owners[i] = rank
        loads[rank] += values[i]
    return owners


class Runtime:
    """The distributed phases of one engine (created by the preconditioner).

    Attributes
    ----------
    rank, world : int
    parts : list of (layer name, part)
        Every part, in registration order.
    owners : dict
        Owner rank of each part.
    owned : dict
        Parts this process owns, per layer.
    bytes : dict
        Payload bytes handed to collectives, summed over steps, by kind: ``"statistics"``,
        ``"representations"`` and ``"control"`` (headers and flags). The same on every process.
    collectives : dict
        Number of collective calls by kind.
    """

    def __init__(
        self,
        config: Distributed,
        layers: Mapping[str, Any],
        block: CurvatureBlock[Any],
        dtype: torch.dtype,
        fingerprint: Sequence[str],
    ) -> None:
        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError(
                "distributed execution needs an initialised process group "
                "(torch.distributed.init_process_group, or torchrun)"
            )
        self.config = config
        self.group = config.group
        self.rank = dist.get_rank(self.group)
        self.world = dist.get_world_size(self.group)
        self.layers = dict(layers)
        self.block = block
        self.dtype = dtype
        self.names = list(layers)
        #: A replicated block (FNGD, SENG: ``block.replicated``) has no parts: every process
        #: updates every layer from the global batch's per-sample rows, and nothing is
        #: exchanged after the update.
        self.replicated = bool(getattr(block, "replicated", False))
        if self.replicated and config.statistics == "local":
            raise ValueError(
                f"Invalid statistics: 'local'; the block {block.name!r} solves with the "
                "per-sample gradients of the global batch, so its rows must be gathered "
                "(statistics='all-reduce')"
            )
        costs = {
            (name, part): cost
            for name, layer in self.layers.items()
            for part, cost in ({} if self.replicated else block.parts(layer)).items()
        }
        self.parts = list(costs)
        self.costs = costs
        self.check(fingerprint)
        ranks = assign_owners([costs[p] for p in self.parts], self.world)
        self.owners = dict(zip(self.parts, ranks, strict=True))
        self.owned = {
            name: frozenset(
                part for (n, part), r in self.owners.items() if n == name and r == self.rank
            )
            for name in self.names
        }
        direction_costs = [
            float(layer.dim_G * layer.dim_A * (layer.dim_G + layer.dim_A))
            for layer in self.layers.values()
        ]
        #: The process that computes each layer's direction (``directions="owner"``).
        self.direction_owners = dict(
            zip(self.names, assign_owners(direction_costs, self.world), strict=True)
        )
        #: The damping value of the last exchange (an owner's prepared inverses are made
        #: for one value, so a new one is exchanged).
        self._damping: float | None = None
        kinds = ("statistics", "representations", "directions", "control")
        self.bytes = dict.fromkeys(kinds, 0)
        self.collectives = dict.fromkeys(kinds, 0)

    @property
    def local(self) -> bool:
        return self.config.statistics == "local"

    @property
    def split_directions(self) -> bool:
        return self.config.directions == "owner"

    def directing(self, names: Sequence[str]) -> list[str]:
        """The layers among ``names`` whose direction this process computes."""
        if not self.split_directions:
            return list(names)
        return [name for name in names if self.direction_owners[name] == self.rank]

    def share(
        self, directions: dict[str, Tensor], names: Sequence[str], like: Mapping[str, Tensor]
    ) -> dict[str, Tensor]:
        """Every layer's direction (``directions="owner"``): one broadcast per process of
        the flattened directions it computed; ``like`` gives each one's shape and dtype."""
        if not self.split_directions:
            return directions
        device = self._device()
        out = dict(directions)
        for owner in range(self.world):
            mine = [name for name in names if self.direction_owners[name] == owner]
            if not mine:
                continue
            dtype = like[mine[0]].dtype
            if owner == self.rank:
                flat = torch.cat([directions[n].reshape(-1).to(device, dtype) for n in mine])
            else:
                flat = torch.empty(sum(like[n].numel() for n in mine), dtype=dtype, device=device)
            self.broadcast(flat, owner, "directions", "direction broadcast")
            offset = 0
            for name in mine:
                size = like[name].numel()
                view = flat[offset : offset + size].view_as(like[name])
                out[name] = view.to(like[name].device).clone()
                offset += size
        return {name: out[name] for name in names}

    def loads(self) -> list[float]:
        """Predicted cost owned by each rank."""
        loads = [0.0] * self.world
        for part, rank in self.owners.items():
            loads[rank] += self.costs[part]
        return loads

    # ------------------------------------------------------------------ collectives
    def _wait(self, work: Any, what: str) -> None:
        try:
            work.wait(timeout=timedelta(seconds=self.config.timeout))
        except Exception as exc:  # the backends raise RuntimeError or DistBackendError
            raise RuntimeError(
                f"kfac.distributed: the {what} on rank {self.rank} of {self.world} failed or "
                f"timed out after {self.config.timeout} s (did another process stop?): {exc}"
            ) from exc

    def _count(self, kind: str, tensor: Tensor, times: int = 1) -> None:
        self.bytes[kind] += tensor.numel() * tensor.element_size() * times
        self.collectives[kind] += 1

    def all_reduce(self, tensor: Tensor, kind: str, what: str, op: Any = None) -> Tensor:
        self._count(kind, tensor)
        work = dist.all_reduce(
            tensor, op=dist.ReduceOp.SUM if op is None else op, group=self.group, async_op=True
        )
        self._wait(work, what)
        return tensor

    def gather_rows(self, rows: Tensor, kind: str, what: str) -> Tensor:
        """The concatenation, in rank order, of every process's ``rows`` (the leading
        dimension may differ between processes): an all-gather of the sizes, then of the
        padded rows."""
        device = self._device()
        size = torch.tensor([rows.shape[0]], dtype=torch.int64, device=device)
        sizes = [int(t) for t in self.all_gather(size, "control", f"{what} sizes")]
        padded = rows.new_zeros((max(sizes), *rows.shape[1:]), device=device)
        padded[: rows.shape[0]] = rows.to(device)
        gathered = self.all_gather(padded, kind, what)
        return torch.cat([g[:k] for g, k in zip(gathered, sizes, strict=True)]).to(rows.device)

    def all_gather(self, tensor: Tensor, kind: str, what: str) -> list[Tensor]:
        self._count(kind, tensor, self.world)
        out = [torch.empty_like(tensor) for _ in range(self.world)]
        work = dist.all_gather(out, tensor, group=self.group, async_op=True)
        self._wait(work, what)
        return out

    def all_gather_objects(self, value: Any, what: str) -> list[Any]:
        """``value`` of every process, pickled, through two all-gathers (the sizes, then the
        padded bytes) that wait at most ``timeout`` like a step's; not counted in
        :attr:`bytes` (construction and checkpoints, not steps)."""
        device = self._device()
        data = torch.frombuffer(bytearray(pickle.dumps(value)), dtype=torch.uint8)
        size = torch.tensor([data.numel()], dtype=torch.int64, device=device)
        sizes = [torch.empty_like(size) for _ in range(self.world)]
        self._wait(dist.all_gather(sizes, size, group=self.group, async_op=True), what)
        lengths = [int(n) for n in sizes]
        padded = torch.zeros(max(lengths), dtype=torch.uint8, device=device)
        padded[: data.numel()] = data.to(device)
        out = [torch.empty_like(padded) for _ in range(self.world)]
        self._wait(dist.all_gather(out, padded, group=self.group, async_op=True), what)
        return [
            pickle.loads(t[:n].cpu().numpy().tobytes()) for t, n in zip(out, lengths, strict=True)
        ]

    def broadcast(self, tensor: Tensor, src: int, kind: str, what: str) -> Tensor:
        self._count(kind, tensor)
        source = dist.get_global_rank(self.group, src) if self.group is not None else src
        work = dist.broadcast(tensor, source, group=self.group, async_op=True)
        self._wait(work, what)
        return tensor

    def _device(self) -> torch.device:
        device = next(iter(self.layers.values())).params[0].device
        if dist.get_backend(self.group) == "nccl" and device.type != "cuda":
            return torch.device("cuda", torch.cuda.current_device())
        return device

    # ------------------------------------------------------------------ construction
    def check(self, fingerprint: Sequence[str]) -> None:
        """One all-gather of every process's description of its layers and options;
        ``ValueError`` on every process naming the first difference from rank 0."""
        gathered = self.all_gather_objects(list(fingerprint), "consistency check")
        reference = gathered[0]
        for rank, other in enumerate(gathered):
            if other == reference:
                continue
            for i in range(max(len(other), len(reference))):
                mine = reference[i] if i < len(reference) else "(nothing)"
                theirs = other[i] if i < len(other) else "(nothing)"
                if mine != theirs:
                    raise ValueError(
                        "the processes did not register the same layers and options: rank "
                        f"{rank} has {theirs!r} where rank 0 has {mine!r}"
                    )

    # ------------------------------------------------------------------ reduce
    def reduce(
        self, plan: Mapping[str, Any], batches: Mapping[str, LayerBatch | None]
    ) -> dict[str, LayerBatch | None]:
        """The batches of the global batch (all-reduce mode): one all-gather of a small
        header, one all-reduce of every sum, one all-gather of every row."""
        if not plan:
            return dict(batches)
        device = self._device()
        header = torch.zeros(len(self.names), _FIELDS, dtype=torch.int64)
        for i, name in enumerate(self.names):
            spec = plan.get(name)
            batch = batches.get(name)
            if spec is None:
                continue
            header[i, 0] = 1
            header[i, 1] = int(spec.rows) + int(spec.rows and spec.optional)
            if batch is not None:
                header[i, 2] = 1
                header[i, 3] = batch.n
                header[i, 4] = batch.positions
                header[i, 5] = int(batch.exact)
        headers = torch.stack(
            [h.cpu() for h in self.all_gather(header.to(device), "control", "statistics header")]
        )
        for i, name in enumerate(self.names):
            column = headers[:, i, :3]
            if not bool((column == column[0]).all()):
                flags = {r: tuple(column[r].tolist()) for r in range(self.world)}
                raise RuntimeError(
                    f"the processes recorded layer {self.layers[name].describe()} differently "
                    f"on this step ((planned, rows, recorded) per rank: {flags}): every "
                    "process must run the same forwards and backwards through the model"
                )
        out: dict[str, LayerBatch | None] = dict(batches)
        present = [i for i in range(len(self.names)) if headers[0, i, 2] == 1]
        totals = {i: (int(headers[:, i, 3].sum()), int(headers[:, i, 4].sum())) for i in present}
        batches = dict(batches)
        for i in present:  # optional rows: gathered only when fewer numbers than the sums
            if headers[0, i, 1] == 2 and not self._gathered(i, totals[i][1]):
                batch = batches[self.names[i]]
                assert batch is not None
                batches[self.names[i]] = _summed(batch)
                headers[:, i, 1] = 0
        sums = [i for i in present if headers[0, i, 1] == 0]
        rows = [i for i in present if headers[0, i, 1] >= 1]
        weight = {}  # each process's output statistics enter as the mean over processes
        for i in present:
            n = int(headers[self.rank, i, 3])
            weight[i] = n / (self.world * totals[i][0])
        if sums:
            parts = []
            for i in sums:
                batch = batches[self.names[i]]
                assert batch is not None
                assert batch.a_sum is not None
                assert batch.g_sum is not None
                parts += [batch.a_sum.reshape(-1), (batch.g_sum * weight[i]).reshape(-1)]
            flat = self.all_reduce(torch.cat(parts), "statistics", "statistics all-reduce")
            offset = 0
            for i in sums:
                batch = batches[self.names[i]]
                assert batch is not None
                assert batch.a_sum is not None
                assert batch.g_sum is not None
                a_sum = flat[offset : offset + batch.a_sum.numel()].view_as(batch.a_sum)
                offset += batch.a_sum.numel()
                g_sum = flat[offset : offset + batch.g_sum.numel()].view_as(batch.g_sum)
                offset += batch.g_sum.numel()
                out[self.names[i]] = self._combined(batch, headers, i, a_sum=a_sum, g_sum=g_sum)
        if rows:
            out.update(self._gather_rows(rows, batches, headers, weight))
        return out

    def _gathered(self, i: int, positions: int) -> bool:
        """Whether layer ``i``'s optional rows, ``positions`` of them over all processes, are
        fewer numbers than its sums (``N (d_A + d_G)`` against ``d_A^2 + d_G^2``)."""
        layer = self.layers[self.names[i]]
        return positions * (layer.dim_A + layer.dim_G) < layer.dim_A**2 + layer.dim_G**2

    def _combined(self, batch: LayerBatch, headers: Tensor, i: int, **tensors: Any) -> LayerBatch:
        return replace(
            batch,
            n=int(headers[:, i, 3].sum()),
            positions=int(headers[:, i, 4].sum()),
            exact=bool((headers[:, i, 5] == 1).all()),
            **tensors,
        )

    def _gather_rows(
        self,
        rows: list[int],
        batches: Mapping[str, LayerBatch | None],
        headers: Tensor,
        weight: Mapping[int, float],
    ) -> dict[str, LayerBatch]:
        dims = {}
        parts = []
        for i in rows:
            batch = batches[self.names[i]]
            assert batch is not None
            assert batch.a_rows is not None
            assert batch.g_rows is not None
            if batch.a_rows.shape[0] != batch.g_rows.shape[0]:
                raise RuntimeError(
                    f"layer {self.layers[self.names[i]].describe()} recorded "
                    f"{batch.a_rows.shape[0]} input rows and {batch.g_rows.shape[0]} "
                    "output-gradient rows: its rows cannot be gathered across processes"
                )
            dims[i] = (batch.a_rows.shape[1], batch.g_rows.shape[1])
            # per-sample algebra (replicated blocks): each output-gradient row becomes the
            # concatenated batch's, n_r / N times this process's; the factors' rows enter
            # the output factor as the mean over processes (the same at equal batch sizes)
            scale = weight[i] * self.world if self.replicated else math.sqrt(weight[i])
            parts += [batch.a_rows.reshape(-1), (batch.g_rows * scale).reshape(-1)]
        sizes = [
            sum(int(headers[r, i, 4]) * (dims[i][0] + dims[i][1]) for i in rows)
            for r in range(self.world)
        ]
        local = torch.cat(parts)
        padded = local.new_zeros(max(sizes))
        padded[: local.numel()] = local
        gathered = self.all_gather(padded, "statistics", "rows all-gather")
        out = {}
        offsets = [0] * self.world
        for i in rows:
            a_parts, g_parts = [], []
            d_a, d_g = dims[i]
            for r in range(self.world):
                count = int(headers[r, i, 4])
                o = offsets[r]
                a_parts.append(gathered[r][o : o + count * d_a].view(count, d_a))
                o += count * d_a
                g_parts.append(gathered[r][o : o + count * d_g].view(count, d_g))
                offsets[r] = o + count * d_g
            batch = batches[self.names[i]]
            assert batch is not None
            out[self.names[i]] = self._combined(
                batch, headers, i, a_rows=torch.cat(a_parts), g_rows=torch.cat(g_parts)
            )
        return out

    # ------------------------------------------------------------------ flags
    def agree(self, flags: Tensor) -> Tensor:
        """Finiteness flags (1 finite, 0 not) combined with a minimum over processes, so a
        non-finite step on any process is skipped on all."""
        out = flags.to(device=self._device(), dtype=torch.int32)
        self.all_reduce(out, "control", "finiteness flags", op=dist.ReduceOp.MIN)
        return out.to(flags.device)

    # ------------------------------------------------------------------ exchange
    def exchange(
        self, before: Mapping[str, Any], states: dict[str, Any], tick: Tick, ready: bool
    ) -> dict[str, Any]:
        """Install every representation (or prepared factor inverse) its owner refreshed (on
        refresh steps, on a new damping value, and while some layer has none yet), then
        prepare every layer."""
        damping, self._damping = self._damping, tick.damping
        if tick.inverse or not ready or damping != tick.damping:
            device = self._device()
            header = torch.zeros(len(self.parts), _HEADER, dtype=torch.float64)
            messages = {}
            for j, (name, part) in enumerate(self.parts):
                if self.owners[(name, part)] != self.rank:
                    continue
                layer = self.layers[name]
                message = self.block.publish(layer, before[name], states[name], part)
                if message is None:
                    continue
                if len(message.header) >= _HEADER:
                    raise ValueError(
                        f"block {self.block.name!r} publishes headers of "
                        f"{len(message.header)} scalars; at most {_HEADER - 1} are supported"
                    )
                header[j, 0] = 1.0
                header[j, 1 : 1 + len(message.header)] = torch.tensor(
                    message.header, dtype=torch.float64
                )
                messages[j] = message
            header = self.all_reduce(header.to(device), "control", "exchange header").cpu()
            for owner in range(self.world):
                changed = [
                    j
                    for j, part in enumerate(self.parts)
                    if self.owners[part] == owner and header[j, 0] > 0
                ]
                if changed:
                    states = self._receive(owner, changed, header, messages, states, device)
        for name, layer in self.layers.items():
            states[name] = self.block.prepare(layer, before[name], states[name], tick)
        return states

    def _receive(
        self,
        owner: int,
        changed: list[int],
        header: Tensor,
        messages: Mapping[int, Any],
        states: dict[str, Any],
        device: torch.device,
    ) -> dict[str, Any]:
        shapes = {
            j: self.block.message_shapes(
                self.layers[self.parts[j][0]], self.parts[j][1], header[j, 1:].tolist()
            )
            for j in changed
        }
        total = sum(math.prod(s) for j in changed for s in shapes[j])
        if owner == self.rank:
            flat = torch.cat(
                [
                    t.reshape(-1).to(device=device, dtype=self.dtype)
                    for j in changed
                    for t in messages[j].tensors
                ]
            )
        else:
            flat = torch.empty(total, dtype=self.dtype, device=device)
        self.broadcast(flat, owner, "representations", "representation broadcast")
        # the owner installs the buffer too: every process then applies the same tensors in
        # the same memory layout, so the directions (and the models) agree bit for bit
        offset = 0
        for j in changed:
            name, part = self.parts[j]
            layer = self.layers[name]
            tensors = []
            for shape in shapes[j]:
                size = math.prod(shape)
                target = layer.params[0].device
                tensors.append(flat[offset : offset + size].view(shape).to(target).clone())
                offset += size
            states[name] = self.block.install(
                layer, states[name], part, header[j, 1:].tolist(), tensors
            )
        return states

    # ------------------------------------------------------------------ state
    def gather(self, saved: Mapping[str, Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
        """Every layer's state with each part taken from its owner (one all-gather of the
        owned parts' state dicts, pickled: the full curvature state travels to every
        process)."""
        if self.replicated:  # every process holds the whole (identical) state
            return {name: dict(saved[name]) for name in self.names}
        mine = {
            (name, part): _to_cpu(saved[name][part])
            for (name, part), owner in self.owners.items()
            if owner == self.rank
        }
        gathered = self.all_gather_objects(mine, "state gather")
        out: dict[str, dict[str, Any]] = {name: dict(saved[name]) for name in self.names}
        for (name, part), owner in self.owners.items():
            out[name][part] = gathered[owner][(name, part)]
        return out


def _summed(batch: LayerBatch) -> LayerBatch:
    """``batch`` with its rows reduced to the sums of their outer products."""
    a, g = batch.a_rows, batch.g_rows
    assert a is not None
    assert g is not None
    return replace(batch, a_sum=a.T @ a, g_sum=g.T @ g, a_rows=None, g_rows=None)


def _to_cpu(value: Any) -> Any:
    """``value`` with every tensor moved to the CPU (what is pickled between processes)."""
    if isinstance(value, Tensor):
        return value.cpu()
    if isinstance(value, Mapping):
        return {k: _to_cpu(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_to_cpu(v) for v in value)
    return value
