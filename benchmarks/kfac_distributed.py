"""Distributed K-FAC: bytes exchanged, time per step at world size 1 and 2, and a simulation.

On the wide digits autoencoder (``--width 2``: factors of 785 to 2001), for ``eigh``
(K-FAC), ``rsvd`` (R-KFAC) and ``brand`` (B-KFAC), with ``factor_every = inverse_every = 1``
and one global batch of ``--batch`` samples per step:

1. **bytes** handed to collectives per step, by kind (statistics, representations, control),
   counted exactly by ``kfac.distributed`` at world size 2, and the representation bytes of a
   refresh against eigh's (``D r + r`` against ``D^2`` per factor: a full-rank factor's
   owner broadcasts its dense damped inverse, prepared once, under the factored damping
   these runs pass explicitly);
2. **time per step** at world size 1 (one process, no process group) and 2 (gloo on
   loopback), one thread per process, on the same global batches: wall time and process CPU
   time per step (the machine is shared, so CPU time is the steadier measure), medians over
   the steps after the first, the two world sizes alternated ``--repeats`` times, and the
   per-phase breakdown;
3. a **simulation** of the curvature step at 8, 32 and 128 GPUs on a model of a few hundred
   factors of widths 1,000-16,000: per-factor refresh times from this machine's measured
   coefficients (``t = c D^3`` eigh, ``c D^2 (r + p)`` rsvd, ``c D (r + n)^2`` Brand), owners
   by the library's LPT assignment, and an alpha-beta model of the collectives with stated
   constants (NVLink within a node of 8, InfiniBand across nodes).

    python benchmarks/kfac_distributed.py            # full run (several minutes on 2 cores)
    python benchmarks/kfac_distributed.py --quick    # smoke run

Writes benchmarks/results/kfac_distributed.{json,md} (``--out`` to change the folder).
"""

from __future__ import annotations

import os

os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "4")  # numpy, scipy and torch BLAS on 2 cores
os.environ.setdefault("OMP_NUM_THREADS", "1")

import argparse
import json
import math
import platform
import statistics
import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn import functional as F

import kfac
import lowrank_nla as ln
from kfac import data, models
from kfac.distributed import assign_owners

STRATEGIES = ("eigh", "rsvd", "brand")
RESULTS = Path(__file__).resolve().parent / "results"

#: The communication model (stated, not measured): ``t = alpha + bytes / beta`` per message.
#: NVLink within a node of 8 GPUs, InfiniBand (200 Gb/s per GPU) across nodes.
LINKS = {
    "nvlink": {"alpha": 5e-6, "beta": 150e9},
    "infiniband": {"alpha": 10e-6, "beta": 25e9},
}
#: GPUs per node of the simulation.
NODE = 8
#: Compute speed-ups over this machine's one CPU thread that the simulation is run at: 1 (this
#: CPU core, measured) and 100 (a stated assumption for one GPU, not a measurement).
SPEEDUPS = (1.0, 100.0)


# ---------------------------------------------------------------------------- one run


def _run(rank: int, world: int, cfg: dict[str, Any]) -> dict[str, Any]:
    """``cfg["steps"]`` steps of one strategy on this process's shard of each global batch."""
    torch.set_num_threads(1)
    ds = data.digits28()
    torch.manual_seed(0)
    net = models.autoencoder(784, cfg["width"])
    options = dict(cfg["options"])
    if world > 1:
        options["distributed"] = kfac.Distributed(timeout=600.0, directions=cfg["directions"])
    else:
        options["distributed"] = False
    opt = kfac.KFAC(
        net, lr=0.1, momentum=0.9, inverse=cfg["inverse"], factor_every=1, inverse_every=1,
        damping=3e-3, damping_scheme="factored", kl_clip=1e-4, time_phases=True, **options,
    )  # fmt: skip
    gen = torch.Generator().manual_seed(1)
    walls, cpus, losses = [], [], []
    for _ in range(cfg["steps"]):
        idx = torch.randperm(ds.x_train.shape[0], generator=gen)[: cfg["batch"]]
        mine = torch.tensor_split(idx, world)[rank]
        x = ds.x_train[mine]
        wall, cpu = time.perf_counter(), time.process_time()
        opt.zero_grad()
        loss = F.mse_loss(net(x), x.flatten(1))
        loss.backward()
        if world > 1:
            flat = torch.cat([p.grad.reshape(-1) for p in net.parameters()])
            dist.all_reduce(flat)
            flat /= world
            offset = 0
            for p in net.parameters():
                p.grad.copy_(flat[offset : offset + p.numel()].view_as(p))
                offset += p.numel()
        opt.step()
        walls.append(time.perf_counter() - wall)
        cpus.append(time.process_time() - cpu)
        losses.append(float(loss.detach()))
    pre = opt.preconditioner
    runtime = pre.engine.dist
    rows = pre.diagnostics()
    return {
        "wall": walls,
        "cpu": cpus,
        "loss": losses,
        "phases": pre.timings,
        "bytes": None if runtime is None else dict(runtime.bytes),
        "factors": [(r["layer"], r["factor"], r["dim"], r["rank"], r["kind"]) for r in rows],
        "params": torch.cat([p.detach().reshape(-1) for p in net.parameters()]),
    }


def _message(dim: int, rank: int) -> int:
    """Numbers an owner broadcasts for a refreshed factor under the factored damping: its
    dense damped inverse (``D^2``) at full rank, else ``(U, d)`` (``D r + r``)."""
    return dim * dim if rank == dim else dim * rank + rank


def _worker(rank: int, world: int, store: str, out: str, cfg: dict[str, Any]) -> None:
    dist.init_process_group(
        "gloo", init_method=f"file://{store}", rank=rank, world_size=world,
        timeout=timedelta(seconds=600),
    )  # fmt: skip
    result = _run(rank, world, cfg)
    torch.save(result, Path(out) / f"{rank}.pt")
    dist.destroy_process_group()


def run_world(world: int, cfg: dict[str, Any]) -> list[dict[str, Any]]:
    """Every rank's record of one run at world size ``world`` (spawned processes)."""
    if world == 1:  # this process, one thread, no process group
        return [_run(0, 1, cfg)]
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_worker, args=(world, str(Path(tmp) / "store"), tmp, cfg), nprocs=world)
        return [torch.load(Path(tmp) / f"{r}.pt", weights_only=False) for r in range(world)]


# ---------------------------------------------------------------------------- per-factor costs


def measure_coefficients(dims: list[int], rank: int, oversample: int, batch: int) -> dict:
    """Seconds of one refresh of one factor (one thread) at each width, and the fitted ``c``
    of each strategy's cost model (median of ``t / model``)."""
    torch.set_num_threads(1)
    gen = torch.Generator().manual_seed(0)
    times: dict[str, dict[int, float]] = {s: {} for s in STRATEGIES}
    for D in dims:
        B = torch.randn(D, 4 * rank, generator=gen) / math.sqrt(D)
        X = B @ B.T + 1e-3 * torch.eye(D)
        for strategy in STRATEGIES:
            best = math.inf
            for _ in range(3):
                start = time.process_time()
                if strategy == "eigh":
                    ln.partial_eigh(X, D)
                elif strategy == "rsvd":
                    ln.randomized_eigh(X, min(rank, D), oversample=oversample, power_iters=3,
                                       rng=gen, check_symmetric=False)  # fmt: skip
                else:
                    w, V = torch.linalg.eigh(X)
                    k = min(rank, D)
                    state = ln.LowRankPSD(V[:, -k:].flip(1), w[-k:].flip(0).clamp(min=0))
                    rows = torch.randn(D, batch, generator=gen) / math.sqrt(D)
                    start = time.process_time()
                    ln.brand_update(state, rows, decay=0.95, rank=k)
                best = min(best, time.process_time() - start)
            times[strategy][D] = best
    model = _cost_models(rank, oversample, batch)
    coefficients = {
        s: statistics.median(times[s][D] / model[s](D) for D in dims) for s in STRATEGIES
    }
    return {"seconds": times, "coefficients": coefficients}


def _cost_models(rank: int, oversample: int, batch: int) -> dict[str, Any]:
    return {
        "eigh": lambda D: float(D) ** 3,
        "rsvd": lambda D: float(D) ** 2 * min(rank + oversample, D),
        "brand": lambda D: float(D) * (min(rank, D) + batch) ** 2,
    }


# ---------------------------------------------------------------------------- simulation


def _collective(kind: str, nbytes: float, world: int) -> float:
    """Alpha-beta time of one collective over ``world`` GPUs (ring algorithms)."""
    if world == 1 or nbytes == 0:
        return 0.0
    link = LINKS["nvlink" if world <= NODE else "infiniband"]
    alpha, beta = link["alpha"], link["beta"]
    if kind == "all-reduce":
        return 2 * (world - 1) * alpha + 2 * (world - 1) / world * nbytes / beta
    if kind == "all-gather":  # nbytes: the gathered total
        return (world - 1) * alpha + (world - 1) / world * nbytes / beta
    # broadcast: pipelined, log-depth latency
    return math.ceil(math.log2(world)) * alpha + nbytes / beta


def simulate(coefficients: dict[str, float], rank: int, oversample: int, batch: int,
             factors: int, seed: int = 0, dtype_bytes: int = 4) -> dict[str, Any]:  # fmt: skip
    """Curvature time per step (refresh every step) at 8, 32 and 128 GPUs."""
    gen = torch.Generator().manual_seed(seed)
    widths = (
        torch.exp(torch.empty(factors).uniform_(math.log(1000), math.log(16000), generator=gen))
        .round()
        .int()
        .tolist()
    )
    models = _cost_models(rank, oversample, batch)
    table: dict[str, Any] = {}
    for strategy in STRATEGIES:
        costs = [coefficients[strategy] * models[strategy](D) for D in widths]
        rows = {}
        for world in (1, 8, 32, 128):
            owners = assign_owners(costs, world)
            loads = [0.0] * world
            for c, o in zip(costs, owners, strict=True):
                loads[o] += c
            compute = max(loads)
            # the rows of the global batch, gathered (a Brand rule's factors; a dense rule's
            # where the rows are fewer numbers than the sums), else one all-reduce of the sums
            gathered = [D for D in widths if strategy == "brand" or batch < D]
            summed = [D for D in widths if not (strategy == "brand" or batch < D)]
            stats = _collective("all-gather", sum(D * batch * dtype_bytes for D in gathered),
                                world)  # fmt: skip
            stats += _collective("all-reduce", sum(D * D * dtype_bytes for D in summed), world)
            r = [min(rank, D) if strategy != "eigh" else D for D in widths]
            per_owner = [0.0] * world
            for D, k, o in zip(widths, r, owners, strict=True):
                per_owner[o] += _message(D, k) * dtype_bytes
            reps = sum(_collective("broadcast", b, world) for b in per_owner if b)
            rows[world] = {
                "compute": compute,
                "statistics": stats,
                "representations": reps,
                "total": compute + stats + reps,
                "communication_share": (stats + reps) / (compute + stats + reps),
            }
        crossover = next((w for w in (8, 32, 128) if rows[w]["communication_share"] > 0.5), None)
        table[strategy] = {"rows": rows, "crossover": crossover}
    return {"widths": {"min": min(widths), "max": max(widths), "count": len(widths)},
            "strategies": table}  # fmt: skip


# ---------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke run (tiny sizes)")
    parser.add_argument("--width", type=float, default=2.0)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--rank", type=int, default=220)
    parser.add_argument("--factors", type=int, default=300)
    parser.add_argument("--strategies", nargs="+", default=list(STRATEGIES), choices=STRATEGIES)
    parser.add_argument("--out", default=str(RESULTS), help="folder of the records")
    args = parser.parse_args(argv)
    if args.quick:
        args.width, args.batch, args.steps, args.repeats, args.rank = 0.1, 16, 2, 1, 8
    oversample = 10
    inverse_options = {
        "eigh": {},
        "rsvd": {"rank": args.rank, "oversample": oversample},
        "brand": {"rank": args.rank, "rank_cap": 2 * args.rank, "oversample": oversample},
    }
    results: dict[str, Any] = {"strategies": {}}
    for strategy in args.strategies:
        cfg = {"width": args.width, "batch": args.batch, "steps": args.steps,
               "inverse": strategy, "options": inverse_options[strategy]}  # fmt: skip
        runs: dict[str, list[list[dict[str, Any]]]] = {"1": [], "2": [], "2o": []}
        for _ in range(args.repeats):  # alternated: the machine's load drifts
            for key in runs:
                world = int(key[0])
                directions = "owner" if key.endswith("o") else "all"
                runs[key].append(run_world(world, {**cfg, "directions": directions}))
                print(f"{strategy} world {key} done", file=sys.stderr, flush=True)
        entry: dict[str, Any] = {}
        reference = runs["1"][0][0]["params"]
        for key, repeats in runs.items():
            world = int(key[0])
            walls = [w for rep in repeats for rank in rep for w in rank["wall"][1:]]
            cpus = [c for rep in repeats for rank in rep for c in rank["cpu"][1:]]
            phases = {
                p: statistics.median(rep[r]["phases"][p] for rep in repeats for r in range(world))
                / args.steps
                for p in repeats[0][0]["phases"]
            }
            err = max(
                float((rank["params"] - reference).norm() / reference.norm())
                for rep in repeats for rank in rep
            )  # fmt: skip
            entry[key] = {
                "wall_per_step": statistics.median(walls),
                "cpu_per_step": statistics.median(cpus),
                "phases_per_step": phases,
                "max_relative_parameter_difference_to_world_1": err,
                "final_loss": repeats[0][0]["loss"][-1],
            }
        two = runs["2"][0][0]
        entry["bytes_per_step"] = {k: v / args.steps for k, v in two["bytes"].items()}
        entry["factors"] = two["factors"]
        rep_bytes = sum(_message(d, k) for _, _, d, k, _ in two["factors"] if k) * 4
        entry["representation_bytes_per_refresh"] = rep_bytes
        entry["directions_bytes_per_step_owner"] = (
            runs["2o"][0][0]["bytes"]["directions"] / args.steps
        )
        for key in ("2", "2o"):
            entry[f"ratio_wall_{key}"] = entry[key]["wall_per_step"] / entry["1"]["wall_per_step"]
            entry[f"ratio_cpu_{key}"] = entry[key]["cpu_per_step"] / entry["1"]["cpu_per_step"]
        results["strategies"][strategy] = entry
    eigh_bytes = results["strategies"].get("eigh", {}).get("representation_bytes_per_refresh")
    for strategy in [s for s in ("rsvd", "brand") if eigh_bytes and s in args.strategies]:
        entry = results["strategies"][strategy]
        factors = entry["factors"]
        eigh_per = {(n, s): _message(d, d) for n, s, d, _, _ in factors}
        entry["representation_ratio_to_eigh"] = (
            entry["representation_bytes_per_refresh"] / eigh_bytes
        )
        entry["per_factor_ratio_over_r_by_D"] = max(
            (_message(d, k) / eigh_per[(n, s)]) / (k / d) for n, s, d, k, _ in factors if k
        )
    dims = [128, 256] if args.quick else [500, 1000, 2000, 3000]
    measured = measure_coefficients(dims, args.rank, oversample, args.batch)
    results["per_factor"] = measured
    results["simulation"] = {
        str(speedup): simulate(
            {k: c / speedup for k, c in measured["coefficients"].items()},
            args.rank,
            oversample,
            args.batch,
            args.factors,
        )
        for speedup in SPEEDUPS
    }
    results["config"] = {
        **vars(args), "oversample": oversample, "links": LINKS, "node": NODE,
        "torch": torch.__version__, "machine": platform.machine(), "cpus": os.cpu_count(),
        "threads_per_process": 1,
    }  # fmt: skip
    out = Path(args.out) / ("kfac_distributed_quick" if args.quick else "kfac_distributed")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(results, indent=1, default=str))
    out.with_suffix(".md").write_text(report(results))
    print(report(results))
    return 0


def report(results: dict[str, Any]) -> str:
    cfg = results["config"]
    lines = [
        f"# Distributed K-FAC (autoencoder width {cfg['width']}, global batch {cfg['batch']}, "
        f"{cfg['steps']} steps x {cfg['repeats']} repeats, one thread per process)",
        "",
        "## Bytes handed to collectives per step (world size 2, exact)",
        "",
        "| strategy | statistics | representations | control | representation bytes per "
        "refresh | vs eigh | max per-factor ratio / (r/D) |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for s, e in results["strategies"].items():
        b = e["bytes_per_step"]
        lines.append(
            f"| {s} | {b['statistics']:,.0f} | {b['representations']:,.0f} | "
            f"{b['control']:,.0f} | {e['representation_bytes_per_refresh']:,} | "
            f"{e.get('representation_ratio_to_eigh', 1.0):.3f} | "
            f"{e.get('per_factor_ratio_over_r_by_D', 1.0):.3f} |"
        )
    lines += [
        "",
        "## Time per step, world size 1 against 2 (medians; seconds)",
        "",
        '`2`: every process computes every direction (`directions="all"`); `2o`: each '
        'layer\'s direction on one process, then broadcast (`directions="owner"`). CPU: '
        "the process CPU time per step of each rank (median over ranks and steps).",
        "",
        "| strategy | world | wall | wall ratio | CPU | CPU ratio | directions B/step | "
        "max rel. param. diff. to ws1 |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for s, e in results["strategies"].items():
        for key in ("1", "2", "2o"):
            r = e[key]
            ratio_wall = 1.0 if key == "1" else e[f"ratio_wall_{key}"]
            ratio_cpu = 1.0 if key == "1" else e[f"ratio_cpu_{key}"]
            moved = e["directions_bytes_per_step_owner"] if key == "2o" else 0
            lines.append(
                f"| {s} | {key} | {r['wall_per_step']:.3f} | {ratio_wall:.2f} | "
                f"{r['cpu_per_step']:.3f} | {ratio_cpu:.2f} | {moved:,.0f} | "
                f"{r['max_relative_parameter_difference_to_world_1']:.1e} |"
            )
    phases = list(next(iter(results["strategies"].values()))["1"]["phases_per_step"])
    lines += ["", "Per-phase seconds per step (median over ranks):", "",
              "| strategy | world | " + " | ".join(phases) + " |",
              "|---|---:|" + "---:|" * len(phases)]  # fmt: skip
    for s, e in results["strategies"].items():
        for w in ("1", "2", "2o"):
            cells = " | ".join(f"{e[w]['phases_per_step'][p]:.3f}" for p in phases)
            lines.append(f"| {s} | {w} | {cells} |")
    per = results["per_factor"]
    lines += [
        "",
        "## Measured refresh of one factor (CPU seconds, one thread)",
        "",
        "| width | " + " | ".join(STRATEGIES) + " |",
        "|---:|" + "---:|" * len(STRATEGIES),
    ]
    for D in next(iter(per["seconds"].values())):
        lines.append(f"| {D} | " + " | ".join(f"{per['seconds'][s][D]:.4f}"
                                              for s in STRATEGIES) + " |")  # fmt: skip
    coef = ", ".join(f"{s} {c:.3g}" for s, c in per["coefficients"].items())
    lines += ["", f"Fitted coefficients (seconds per model unit): {coef}."]
    for speedup, sim in results["simulation"].items():
        widths = sim["widths"]
        lines += [
            "",
            f"## Simulated curvature time per step, compute {float(speedup):g}x this CPU thread "
            f"({widths['count']} factors, widths {widths['min']}-{widths['max']}, refresh "
            "every step)",
            "",
            "Compute: the coefficients above divided by the speed-up, times each factor's "
            "model, owners by LPT. Communication: alpha-beta, NVLink (alpha 5 us, beta 150 "
            "GB/s) up to 8 GPUs, InfiniBand (alpha 10 us, beta 25 GB/s) beyond; "
            "all-gather of the global batch's rows for the factors wider than the batch "
            "(taken as Linear layers' factors: the dense rules gather their rows there too), "
            "ring all-reduce of the sums for the others, one broadcast per owner of its "
            "representations (`D r + r` numbers, `D^2` for a full-rank factor's damped "
            "inverse); float32.",
            "",
            "| strategy | GPUs | compute (s) | statistics (s) | representations (s) | "
            "total (s) | communication share |",
            "|---|---:|---:|---:|---:|---:|---:|",
        ]
        for s, e in sim["strategies"].items():
            for w, r in e["rows"].items():
                lines.append(
                    f"| {s} | {w} | {r['compute']:.3g} | {r['statistics']:.3g} | "
                    f"{r['representations']:.3g} | {r['total']:.3g} | "
                    f"{r['communication_share']:.2f} |"
                )
        lines += [""]
        for s, e in sim["strategies"].items():
            where = "none up to 128" if e["crossover"] is None else f"{e['crossover']} GPUs"
            lines.append(f"- {s}: communication exceeds half the curvature time at {where}.")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
