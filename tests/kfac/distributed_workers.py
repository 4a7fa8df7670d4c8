"""Functions run in the processes the distributed tests spawn (gloo on loopback, float64).

Each worker initialises a process group from a file store, runs its scenario with one thread,
and writes what the test checks to ``out/<rank>.pt``; a worker never lets an exception escape
(the spawner would kill the other processes before they report), it records it instead.
"""

from __future__ import annotations

import contextlib
import copy
import time
import traceback
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn import functional as F

import kfac

F64 = torch.float64
#: Global batch of every step (divisible by 1, 2 and 3).
BATCH = 12
#: Options of each strategy: small ranks and caps so the Brand rules track the 24-wide factors
#: (rank_cap + rows < D) and the resets and corrections happen within 20 steps.
STRATEGIES: dict[str, dict[str, Any]] = {
    "eigh": {},
    "rsvd": {"rank": 4, "oversample": 2},
    "srevd": {"rank": 4, "oversample": 2},
    "brand": {"rank": 4, "rank_cap": 6, "oversample": 2, "brand_every": 1},
    "brand-rsvd": {"rank": 4, "rank_cap": 6, "oversample": 2, "reset_every": 2},
    "brand-correct": {"rank": 4, "rank_cap": 6, "oversample": 2, "correct_every": 2},
    "brand-rsvd-correct": {
        "rank": 4, "rank_cap": 6, "oversample": 2, "reset_every": 2, "correct_every": 2,
    },
}  # fmt: skip


def model(width: int = 24) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(10, width), nn.Tanh(), nn.Linear(width, 24), nn.Tanh(),
                         nn.Linear(24, 5)).double()  # fmt: skip


def data(steps: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(3)
    return [
        (
            torch.randn(BATCH, 10, generator=gen, dtype=F64),
            torch.randint(5, (BATCH,), generator=gen),
        )
        for _ in range(steps)
    ]


def shard(batch: torch.Tensor, rank: int, world: int) -> torch.Tensor:
    size = batch.shape[0] // world
    return batch[rank * size : (rank + 1) * size]


def options(inverse: str, **extra: Any) -> dict[str, Any]:
    return {
        "inverse": inverse,
        "factor_every": 2,
        "inverse_every": 2,
        "factor_dtype": F64,
        "damping": 0.05,
        # a short step timeout: a failing scenario ends instead of waiting for minutes
        "distributed": kfac.Distributed(timeout=20.0),
        **STRATEGIES[inverse],
        **extra,
    }


def train(
    net: nn.Module,
    opt: torch.optim.Optimizer,
    batches: list[tuple[torch.Tensor, torch.Tensor]],
    rank: int = 0,
    world: int = 1,
    average: bool = True,
) -> None:
    """Steps on this process's shard; gradients averaged by hand (as a user would)."""
    for x, y in batches:
        opt.zero_grad()
        F.cross_entropy(net(shard(x, rank, world)), shard(y, rank, world)).backward()
        if world > 1 and average:
            for p in net.parameters():
                dist.all_reduce(p.grad)
                p.grad /= world
        opt.step()


def flat(net: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in net.parameters()])


def reference(inverse: str, steps: int, **extra: Any) -> torch.Tensor:
    """One process on the concatenated batch."""
    net = model()
    opt = kfac.KFAC(net, lr=0.1, **options(inverse, distributed=False, **extra))
    train(net, opt, data(steps))
    return flat(net)


# ---------------------------------------------------------------------------- scenarios


def equality(rank: int, world: int, steps: int) -> dict[str, Any]:
    """Every strategy: the distributed run's parameters and its reference's."""
    out: dict[str, Any] = {}
    for inverse in STRATEGIES:
        net = model()
        opt = kfac.KFAC(net, lr=0.1, **options(inverse))
        pre = opt.preconditioner
        batches = data(steps)
        train(net, opt, batches[:1], rank, world)  # step 0: the first refresh
        runtime = pre.engine.dist
        first = {
            "bytes": dict(runtime.bytes),
            "ranks": {row["layer"] + row["factor"]: row["rank"] for row in pre.diagnostics()},
        }
        train(net, opt, batches[1:], rank, world)
        out[inverse] = {
            "first": first,
            "params": flat(net),
            "reference": reference(inverse, steps) if rank == 0 else None,
            "owners": dict(runtime.owners),
            "costs": dict(runtime.costs),
            "bytes": dict(runtime.bytes),
            "applied": dict(pre.kron.applied),
            "ranks": {row["layer"] + row["factor"]: row["rank"] for row in pre.diagnostics()},
        }
    return out


def quadratic_train(
    net: nn.Module, opt: Any, batches: list[tuple[torch.Tensor, torch.Tensor]], rank: int,
    world: int,
) -> None:  # fmt: skip
    """The quadratic-model step on this process's shard (gradients averaged by hand)."""
    for x, y in batches:
        xs, ys = shard(x, rank, world), shard(y, rank, world)
        opt.zero_grad()
        F.cross_entropy(net(xs), ys).backward()
        if world > 1:
            for p in net.parameters():
                dist.all_reduce(p.grad)
                p.grad /= world
        opt.step(batch=(xs, ys))


QUADRATIC = {
    "lr": 1.0,
    "damping": 1e-3,
    "damping_scheme": "factored",
    "loss_fn": F.cross_entropy,
    "quadratic_step": True,
    "adaptive_damping": True,
}


def quadratic(rank: int, world: int, steps: int) -> dict[str, Any]:
    """Quadratic-model steps with adaptive damping: parameters, damping and the reference's
    (one process on the concatenated batch), for a dense and a Brand strategy."""
    out: dict[str, Any] = {}
    for inverse in ("eigh", "brand"):
        runs = {}
        for distributed in (True, False):
            if not distributed and rank != 0:
                continue
            net = model()
            extra = {} if distributed else {"distributed": False}
            opt = kfac.KFAC(net, **{**options(inverse, **extra), **QUADRATIC})
            quadratic_train(net, opt, data(steps), *((rank, world) if distributed else (0, 1)))
            runs[distributed] = (flat(net), opt.preconditioner.damping, opt._rejections)
        out[inverse] = {"mine": runs[True], "reference": runs.get(False)}
    return out


def owner_directions(rank: int, world: int, steps: int) -> dict[str, Any]:
    """Each layer's direction computed by one process and broadcast."""
    out: dict[str, Any] = {}
    for inverse in ("eigh", "brand-rsvd-correct"):
        net = model()
        config = kfac.Distributed(directions="owner", timeout=20.0)
        opt = kfac.KFAC(net, lr=0.1, **options(inverse, distributed=config))
        train(net, opt, data(steps), rank, world)
        runtime = opt.preconditioner.engine.dist
        out[inverse] = {
            "params": flat(net),
            "direction_owners": dict(runtime.direction_owners),
            "bytes": dict(runtime.bytes),
            "applied": dict(opt.preconditioner.kron.applied),
        }
    return out


def ddp(rank: int, world: int, steps: int) -> dict[str, Any]:
    """A model wrapped in DistributedDataParallel (names gain ``module.``)."""
    net = model()
    wrapped = nn.parallel.DistributedDataParallel(net)
    opt = kfac.KFAC(wrapped, lr=0.1, **options("brand-rsvd-correct"))
    train(wrapped, opt, data(steps), rank, world, average=False)
    ref = reference("brand-rsvd-correct", steps) if rank == 0 else None
    return {
        "params": flat(net),
        "reference": ref,
        "applied": dict(opt.preconditioner.kron.applied),
    }


def mismatch(rank: int, world: int, steps: int) -> dict[str, Any]:
    """Rank 1 registers a wider first layer."""
    net = model(width=25 if rank == 1 else 24)
    kfac.KFAC(net, lr=0.1, **options("rsvd", distributed=kfac.Distributed(timeout=10.0)))
    return {}


def one_raises(rank: int, world: int, steps: int) -> dict[str, Any]:
    """Rank 1 raises at its third step; the others must fail within the timeout."""
    net = model()
    opt = kfac.KFAC(net, lr=0.1, **options("eigh", distributed=kfac.Distributed(timeout=5.0)))
    batches = data(steps)
    for i, (x, y) in enumerate(batches):
        if rank == 1 and i == 3:
            raise RuntimeError("rank 1 stops here")
        opt.zero_grad()
        F.cross_entropy(net(shard(x, rank, world)), shard(y, rank, world)).backward()
        opt.step()  # gradients not averaged: the collectives of the step are the point
    return {}


def one_hangs(rank: int, world: int, steps: int) -> dict[str, Any]:
    """Rank 1 stalls for 6 s at its third step; rank 0's step must time out after 2 s."""
    net = model()
    opt = kfac.KFAC(net, lr=0.1, **options("eigh", distributed=kfac.Distributed(timeout=2.0)))
    batches = data(steps)
    for i, (x, y) in enumerate(batches):
        if rank == 1 and i == 3:
            time.sleep(6.0)
        opt.zero_grad()
        F.cross_entropy(net(shard(x, rank, world)), shard(y, rank, world)).backward()
        opt.step()
    return {}


def state_on_one(rank: int, world: int, steps: int) -> dict[str, Any]:
    """Only rank 0 calls ``state_dict()``; rank 1 stays alive for 6 s without taking part:
    rank 0 must raise after its 2 s timeout (not the process group's 30 s)."""
    net = model()
    opt = kfac.KFAC(net, lr=0.1, **options("rsvd", distributed=kfac.Distributed(timeout=2.0)))
    train(net, opt, data(steps), rank, world)
    if rank == 0:
        opt.state_dict()
    else:
        time.sleep(6.0)
    return {}


def nonfinite(rank: int, world: int, steps: int) -> dict[str, Any]:
    """Local statistics, and rank 1's are non-finite at step 2 (its gradients are not):
    every process skips the update of that layer, the owners on rank 0 included."""
    net = model()
    config = kfac.Distributed(statistics="local", timeout=20.0)
    pre = kfac.KFACPreconditioner(net, **options("eigh", factor_every=1, distributed=config))
    x, y = data(1)[0]
    for step in range(3):
        net.zero_grad()
        xs = shard(x, rank, world).clone()
        if rank == 1 and step == 2:
            xs[0, 0] = float("inf")
        F.cross_entropy(net(xs), shard(y, rank, world)).backward()
        for p in net.parameters():
            p.grad = torch.nan_to_num(p.grad, nan=0.0, posinf=0.0, neginf=0.0)
            dist.all_reduce(p.grad)
            p.grad /= world
        pre.step()
    return {
        "updates": {name: pre.state(name).A.updates for name in pre.layer_names},
        "owners": dict(pre.engine.dist.owners),
    }


class Branchy(nn.Module):
    """A model whose middle layer runs on even steps only (a branch not taken)."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = model()
        self.extra = nn.Linear(24, 24).double()
        self.use_extra = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.inner[3](self.inner[2](self.inner[1](self.inner[0](x))))
        if self.use_extra:
            h = torch.tanh(self.extra(h))
        return self.inner[4](h)


#: Damping schemes of the ``schemes`` scenario: separable (inverses prepared by the owners)
#: and coupled (every process prepares from the broadcast ``(U, d)``).
SCHEMES = ("factored-relative", "pi", "eigenbasis")


def schemes_run(
    rank: int, world: int, steps: int, scheme: str, distributed: bool
) -> tuple[torch.Tensor, dict[str, Any]]:
    """eigh with ``scheme`` on global batches of 24 (two of :func:`data`'s), refreshes at
    steps 0 and 3, the damping changed at step 4 (the prepared inverses are made for one
    damping value). Returns the parameters and the bytes after step 0 and at the end."""
    net = model()
    config = kfac.Distributed(timeout=20.0) if distributed else False
    opt = kfac.KFAC(
        net, lr=0.1, **options("eigh", damping_scheme=scheme, inverse_every=3,
                               distributed=config),
    )  # fmt: skip
    pairs = data(2 * steps)
    first = None
    for step in range(steps):
        if step == 4:
            opt.preconditioner.damping = 0.2
        (x1, y1), (x2, y2) = pairs[2 * step], pairs[2 * step + 1]
        x, y = torch.cat([x1, x2]), torch.cat([y1, y2])
        train(net, opt, [(x, y)], rank, world)
        if step == 0 and distributed:
            first = dict(opt.preconditioner.engine.dist.bytes)
    last = dict(opt.preconditioner.engine.dist.bytes) if distributed else None
    return flat(net), {"first": first, "last": last}


def schemes(rank: int, world: int, steps: int) -> dict[str, Any]:
    """Each scheme distributed, and one process on the concatenated batch (rank 0)."""
    out: dict[str, Any] = {}
    for scheme in SCHEMES:
        mine, nbytes = schemes_run(rank, world, steps, scheme, True)
        ref = schemes_run(0, 1, steps, scheme, False)[0] if rank == 0 else None
        out[scheme] = {"params": mine, "bytes": nbytes, "reference": ref}
    return out


def unused_layer_run(rank: int, world: int, steps: int, distributed: bool) -> torch.Tensor:
    torch.manual_seed(0)
    net = Branchy()
    config = kfac.Distributed(timeout=20.0) if distributed else False
    opt = kfac.KFAC(net, lr=0.1, **options("eigh", factor_every=1, distributed=config))
    for step, (x, y) in enumerate(data(steps)):
        net.use_extra = step % 2 == 0
        if not distributed:
            rank, world = 0, 1
        opt.zero_grad()
        F.cross_entropy(net(shard(x, rank, world)), shard(y, rank, world)).backward()
        if distributed:
            for p in net.parameters():
                if p.grad is not None:
                    dist.all_reduce(p.grad)
                    p.grad /= world
        opt.step()
    return flat(net)


def unused_layer(rank: int, world: int, steps: int) -> dict[str, Any]:
    """A layer the forward skips on some factor steps (no gradient, no statistics)."""
    return {
        "params": unused_layer_run(rank, world, steps, True),
        "reference": unused_layer_run(rank, world, steps, False) if rank == 0 else None,
    }


def ddp_no_sync(rank: int, world: int, steps: int) -> dict[str, Any]:
    """DDP with gradient accumulation: two micro-batches per step, the first under
    ``no_sync()``; and one process accumulating the concatenated micro-batches (rank 0)."""
    batches = data(2 * steps)
    out: dict[str, Any] = {}
    for distributed in (True, False):
        if not distributed and rank != 0:
            continue
        net = model()
        wrapped = nn.parallel.DistributedDataParallel(net) if distributed else net
        extra = {} if distributed else {"distributed": False}
        opt = kfac.KFAC(wrapped, lr=0.1, **options("eigh", factor_every=1, **extra))
        r, w = (rank, world) if distributed else (0, 1)
        for i in range(0, 2 * steps, 2):
            opt.zero_grad()
            for j, (x, y) in enumerate(batches[i : i + 2]):
                with wrapped.no_sync() if distributed and j == 0 else contextlib.nullcontext():
                    (F.cross_entropy(wrapped(shard(x, r, w)), shard(y, r, w)) / 2).backward()
            opt.step()
        out["params" if distributed else "reference"] = flat(net)
    return out


def rank_dependent_branch(rank: int, world: int, steps: int) -> dict[str, Any]:
    """DDP with ``find_unused_parameters``, the branch taken on rank 0 only: DDP accepts it,
    the preconditioner refuses (its statistics would differ per process)."""
    net = Branchy()
    net.use_extra = rank == 0
    wrapped = nn.parallel.DistributedDataParallel(net, find_unused_parameters=True)
    opt = kfac.KFAC(wrapped, lr=0.1, **options("eigh", factor_every=1))
    before = flat(net)
    x, y = data(1)[0]
    F.cross_entropy(wrapped(shard(x, rank, world)), shard(y, rank, world)).backward()
    try:
        opt.step()
    except RuntimeError as exc:
        return {"error": str(exc), "moved": not torch.equal(flat(net), before)}
    return {"error": None}


def checkpoint(rank: int, world: int, steps: int) -> dict[str, Any]:
    """``steps`` steps, then the (gathered) state dict, then ``steps`` more."""
    out: dict[str, Any] = {}
    for inverse in ("rsvd", "brand-rsvd-correct"):
        net = model()
        opt = kfac.KFAC(net, lr=0.1, momentum=0.5, **options(inverse))
        batches = data(2 * steps)
        train(net, opt, batches[:steps], rank, world)
        saved = copy.deepcopy(opt.state_dict())  # torch.optim returns live buffers
        weights = {k: v.clone() for k, v in net.state_dict().items()}
        train(net, opt, batches[steps:], rank, world)
        out[inverse] = {"state": saved, "model": weights, "params": flat(net)}
    return out


def resume(rank: int, world: int, steps: int, path: str) -> dict[str, Any]:
    """Load the state saved at another world size and continue ``steps`` steps."""
    out: dict[str, Any] = {}
    saved = torch.load(path, weights_only=False)
    for inverse in ("rsvd", "brand-rsvd-correct"):
        net = model()
        net.load_state_dict(saved[inverse]["model"])
        opt = kfac.KFAC(net, lr=0.1, momentum=0.5, **options(inverse))
        opt.load_state_dict(saved[inverse]["state"])
        train(net, opt, data(2 * steps)[steps:], rank, world)
        out[inverse] = {"params": flat(net)}
    return out


def local(rank: int, world: int, steps: int) -> dict[str, Any]:
    """Local statistics: the factors of each owner, from its own shard."""
    net = model()
    config = kfac.Distributed(statistics="local", timeout=20.0)
    pre = kfac.KFACPreconditioner(
        net, **options("eigh", factor_every=1, inverse_every=1, distributed=config)
    )
    x, y = data(1)[0]
    F.cross_entropy(net(shard(x, rank, world)), shard(y, rank, world)).backward()
    for p in net.parameters():
        dist.all_reduce(p.grad)
        p.grad /= world
    grads = [p.grad.clone() for p in net.parameters()]
    pre.step()
    return {
        "owners": dict(pre.engine.dist.owners),
        "factors": {n: pre.factors(n) for n in pre.layer_names},
        "reps": {n: pre.representations(n) for n in pre.layer_names},
        "inverse": _inverse(pre.engine.states["0"].A.applied),
        "grads": grads,
        "directions": [p.grad.clone() for p in net.parameters()],
        "bytes": dict(pre.engine.dist.bytes),
    }


def _inverse(applied: Any) -> tuple[float, torch.Tensor] | None:
    """A factor's prepared damped inverse ``(total damping, M)`` (``None``: none held)."""
    if applied is None or applied.inverse is None:
        return None
    return applied.inverse[0], applied.inverse[1].M


#: MBF's three applied layouts: swept blocks of 4 (and remainders), one Cholesky block of
#: 11 or 25 per output neuron, and the SMW path.
MBF_CONFIGS: dict[str, dict[str, Any]] = {
    "swept": {"block_size": 4},
    "cholesky": {"block_size": None, "solver": "cholesky"},
    "smw": {"block_size": None, "solver": "smw"},
}


def mbf_optimizer(net: nn.Module, layout: str, distributed: Any) -> kfac.MBF:
    return kfac.MBF(
        net, lr=0.1, momentum=0.5, damping=0.05, factor_every=2, inverse_every=2,
        factor_dtype=F64, distributed=distributed, **MBF_CONFIGS[layout],
    )  # fmt: skip


def mbf(rank: int, world: int, steps: int) -> dict[str, Any]:
    """MBF: ``steps`` steps, the gathered state dict, ``steps`` more; rank 0 also runs one
    process on the concatenated batch and resumes the gathered state in one process."""
    out: dict[str, Any] = {}
    for layout in MBF_CONFIGS:
        net = model()
        opt = mbf_optimizer(net, layout, kfac.Distributed(timeout=20.0))
        batches = data(2 * steps)
        train(net, opt, batches[:steps], rank, world)
        saved = copy.deepcopy(opt.state_dict())
        weights = {k: v.clone() for k, v in net.state_dict().items()}
        train(net, opt, batches[steps:], rank, world)
        runtime = opt.preconditioner.engine.dist
        record: dict[str, Any] = {
            "params": flat(net),
            "owners": dict(runtime.owners),
            "bytes": dict(runtime.bytes),
        }
        if rank == 0:
            ref_net = model()
            train(ref_net, mbf_optimizer(ref_net, layout, False), batches)
            record["reference"] = flat(ref_net)
            resumed = model()
            resumed.load_state_dict(weights)
            again = mbf_optimizer(resumed, layout, False)
            again.load_state_dict(saved)
            train(resumed, again, batches[steps:])
            record["resumed"] = flat(resumed)
        out[layout] = record
    return out


# ------------------------------------------------------------------ per-sample methods

#: Samples of the per-sample methods' dataset: two global batches of BATCH per epoch.
PERSAMPLE_N = 2 * BATCH
#: name: (optimizer class name, conv model?, options): FNGD with stored coefficients keyed by
#: dataset index (per layer and shared), by slot, recomputed; SENG sketched (col_sample_size
#: below the widths) on the MLP and on a small CNN (explicit per-sample gradients).
PERSAMPLE: dict[str, tuple[str, bool, dict[str, Any]]] = {
    "fngd-index": ("FNGD", False, {"store": "index"}),
    "fngd-shared": (
        "FNGD",
        False,
        {"store": "index", "coefficients": "shared", "weighted_step": "rows"},
    ),
    "fngd-slot": ("FNGD", False, {"store": "slot", "steps_per_epoch": 2}),
    "fngd-conv": ("FNGD", True, {"store": "none"}),
    "seng": ("SENG", False, {"update_freq": 2, "col_sample_size": 4}),
    "seng-conv": ("SENG", True, {"update_freq": 2, "col_sample_size": 3}),
}


def conv_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 3, 3), nn.Tanh(), nn.Flatten(),
                         nn.Linear(3 * 4 * 4, 5)).double()  # fmt: skip


def persample_data() -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    """Inputs (a 6x6 image per sample, also read flat as 10 features by the MLP), labels,
    and the global batches' dataset indices over 4 epochs (reshuffled every epoch)."""
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(PERSAMPLE_N, 1, 6, 6, generator=gen, dtype=F64)
    y = torch.randint(5, (PERSAMPLE_N,), generator=gen)
    steps = [b for _ in range(4) for b in torch.randperm(PERSAMPLE_N, generator=gen).split(BATCH)]
    return x, y, steps


def persample_setup(name: str, distributed: bool) -> tuple[nn.Module, Any]:
    cls, conv, extra = PERSAMPLE[name]
    net = conv_model() if conv else model()
    config = kfac.Distributed(timeout=20.0) if distributed else False
    opt = getattr(kfac, cls)(
        net, lr=0.1, momentum=0.5, damping=0.05, factor_dtype=F64, distributed=config, **extra
    )
    return net, opt


def persample_train(
    name: str, net: nn.Module, opt: Any, start: int, stop: int, rank: int = 0, world: int = 1
) -> None:
    """Steps ``start`` to ``stop`` on this process's shard of each global batch (gradients
    averaged by hand); FNGD gets the shard's dataset indices."""
    x, y, steps = persample_data()
    conv = PERSAMPLE[name][1]
    for idx in steps[start:stop]:
        mine = shard(idx, rank, world)
        inputs = x[mine] if conv else x[mine].flatten(1)[:, :10]
        opt.zero_grad()
        F.cross_entropy(net(inputs), y[mine]).backward()
        if world > 1:
            for p in net.parameters():
                dist.all_reduce(p.grad)
                p.grad /= world
        if isinstance(opt, kfac.FNGD):
            opt.step(indices=mine)
        else:
            opt.step()


def persample(rank: int, world: int, steps: int) -> dict[str, Any]:
    """FNGD and SENG on the global batch: parameters after ``steps`` steps, the state dict
    (and weights) saved halfway, the stored coefficients and the bytes gathered."""
    out: dict[str, Any] = {}
    half = steps // 2
    for name in PERSAMPLE:
        net, opt = persample_setup(name, distributed=True)
        persample_train(name, net, opt, 0, half, rank, world)
        saved = copy.deepcopy(opt.state_dict())
        weights = {k: v.clone() for k, v in net.state_dict().items()}
        persample_train(name, net, opt, half, steps, rank, world)
        pre = opt.preconditioner
        out[name] = {
            "params": flat(net),
            "state": saved,
            "model": weights,
            "final_state": copy.deepcopy(opt.state_dict()),
            "diagnostics": pre.diagnostics(),
            "bytes": dict(pre.engine.dist.bytes),
        }
    return out


def persample_refusals(rank: int, world: int, steps: int) -> dict[str, Any]:
    """What FNGD and SENG refuse under a process group, each message recorded."""
    out: dict[str, Any] = {}
    net = model()
    try:
        kfac.SENG(net, lr=0.1, distributed=kfac.Distributed(statistics="local"))
    except ValueError as exc:
        out["local"] = str(exc)
    opt = kfac.FNGD(net, lr=0.1, coefficients="shared", distributed=kfac.Distributed())
    out["weighted_step"] = opt.preconditioner.fngd.weighted_step
    try:
        opt.preconditioner.loss_weights(torch.arange(BATCH // world))
    except ValueError as exc:
        out["loss_weights"] = str(exc)
    try:
        kfac.FNGD(net, lr=0.1, coefficients="shared", weighted_step="loss")
    except ValueError as exc:
        out["explicit_loss"] = str(exc)
    return out


SCENARIOS: dict[str, Callable[..., dict[str, Any]]] = {
    "persample": persample,
    "persample_refusals": persample_refusals,
    "equality": equality,
    "ddp": ddp,
    "owner_directions": owner_directions,
    "mismatch": mismatch,
    "one_raises": one_raises,
    "one_hangs": one_hangs,
    "ddp_no_sync": ddp_no_sync,
    "rank_dependent_branch": rank_dependent_branch,
    "state_on_one": state_on_one,
    "nonfinite": nonfinite,
    "checkpoint": checkpoint,
    "resume": resume,
    "local": local,
    "quadratic": quadratic,
    "mbf": mbf,
    "unused_layer": unused_layer,
    "schemes": schemes,
}


def worker(rank: int, world: int, store: str, out: str, jobs: list[tuple[str, tuple]]) -> None:
    """Entry point of a spawned process (``torch.multiprocessing.spawn``): the scenarios
    ``jobs`` (name, arguments) in order, each one's record (or error) under its name."""
    torch.set_num_threads(1)
    records: dict[str, Any] = {}
    dist.init_process_group(
        "gloo", init_method=f"file://{store}", rank=rank, world_size=world,
        timeout=timedelta(seconds=30),
    )  # fmt: skip
    for name, args in jobs:
        start = time.monotonic()
        try:
            record = {"ok": SCENARIOS[name](rank, world, *args)}
        except Exception as exc:  # recorded for the test, which checks it
            record = {"error": f"{type(exc).__name__}: {exc}", "trace": traceback.format_exc()}
        record["seconds"] = time.monotonic() - start
        records[name] = record
    torch.save(records, Path(out) / f"{rank}.pt")
    if not any("error" in record for record in records.values()):
        dist.destroy_process_group()
