"""Out-of-core randomized SVD on dask: lowrank_nla against ``dask.array.linalg.svd_compressed``.

Run from the repository root (the ``dask`` extra provides dask and distributed)::

    pip install -c constraints.txt ".[dask]"
    python benchmarks/nla_dask.py            # full run (see the sizes below), minutes
    python benchmarks/nla_dask.py --quick    # smoke run, seconds

Method (accuracy before time, side by side on one cluster):

* Cluster: ``dask.distributed.LocalCluster`` on 127.0.0.1 with ``--workers`` worker processes
  of one thread each and a memory limit of ``--memory-limit`` per worker.
* Matrix: ``A = U diag(s) V^T`` (float32, ``m x n``, rank ``r``), generated block by block of
  ``--block-rows`` rows (a blockwise ``dask.array.map_blocks`` array, as ``da.random`` or
  ``da.from_zarr`` give) and never held anywhere whole: block ``b`` is
  ``Q_b diag(s) V^T / sqrt(B)`` with ``Q_b`` the orthonormal factor of a seeded Gaussian
  block, so ``U^T U = (1/B) sum_b Q_b^T Q_b = I`` exactly and the singular values of ``A``
  are exactly ``s`` (``s_j = j^-1/2``). Every pass over ``A`` regenerates its blocks, so
  passes cost what reading the data from storage would.
* Accuracy: the exact relative spectral error ``||A - U_k S_k V_k^T||_2 / s_1`` of each
  result, from ``M = U^T U_k`` and ``U_k^T U_k`` (one extra pass over the blocks, not timed):
  ``||A - U_k S_k V_k^T||_2^2`` is the largest eigenvalue of the ``n x n`` matrix
  ``(diag(s) V^T - M S_k V_k^T)^T (...) + V_k S_k (U_k^T U_k - M^T M) S_k V_k^T``.
  The optimal error is ``s_{k+1} / s_1``. Both methods draw their test matrix from the
  seed of the round (round ``i`` uses seed ``i`` for every run), so each configuration's
  error is the mean over the same ``--repeats`` seeds (the spread is reported too): no
  pairing rests on one draw of either method.
* Error over many draws: three seeds still leave the comparison of two randomized methods
  to chance, so each configuration is also run with seeds ``0 .. --draws - 1`` on the
  ``r x n`` factor ``C = diag(s) V^T`` (``A = U C`` with ``U`` orthonormal: with the same
  seed each method computes ``U`` times its result on ``C``, hence the same error in exact
  arithmetic; the record gives the largest deviation from the measured runs). The pairing
  is reported by the measured mean error and by the mean over the draws.
* Methods: ``lowrank_nla.randomized_svd(A, k, oversample=p, power_iters=q)`` for each
  ``q:p`` of ``--ours``, and ``svd_compressed(A, k, n_oversamples=p, n_power_iter=q,
  compute=True)`` for each ``q:p`` of ``--peer`` (dask's setting for data larger than
  memory: intermediate results are persisted instead of keeping the input's graph alive).
  A run ends when its tall factor is persisted on the workers and its small factors are in
  the client.
* Passes: every block generation logs a worker event; passes = generations / blocks.
* Peak worker memory: the resident set size of each worker process (Python and dask
  baseline included) is sampled every 20 ms during each run; the largest sample is
  reported. Results of the previous run are released before the next one starts.
* Time: CPU seconds of each run (user + system time of the worker processes, from psutil,
  plus that of the client process, which hosts the scheduler) and its wall clock; runs in
  order of q within each round (ours then the peer at each q), medians over the rounds.
  On a shared machine wall clock measures the other jobs as much as the method, so the
  comparison pairs each peer configuration with our configuration of least CPU time whose
  mean error is at most the peer's; ratio = ours / peer (the wall-clock ratio is reported
  alongside). The load average of the machine at the start and the end is recorded.

Writes ``benchmarks/results/nla_dask.json`` and ``.md``.
"""

from __future__ import annotations

import os

os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "4")
os.environ.setdefault("OMP_NUM_THREADS", "1")  # one BLAS thread per worker process
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")

import argparse
import functools
import json
import platform
import statistics
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import dask
import dask.array as da
import distributed
import numpy as np

import lowrank_nla as ln

RESULTS = Path(__file__).resolve().parent / "results"
SEED = 0


def _coefficients(n: int, r: int) -> np.ndarray:
    """``C = diag(s) V^T`` (``r x n``): ``s_j = j^-1/2``, ``V`` orthonormal from a seeded draw."""
    V, _ = np.linalg.qr(np.random.default_rng([SEED, 2**31]).standard_normal((n, r)))
    return (1.0 / np.sqrt(np.arange(1.0, r + 1)))[:, None] * V.T


def _block(
    rows: int, n: int, r: int, scale: float, topic: str, block_id: tuple[int, int]
) -> np.ndarray:
    """Rows of block ``b``: ``Q_b C / sqrt(B)``, ``Q_b`` orthonormal from a seeded draw."""
    worker = distributed.get_worker()
    b = block_id[0]
    worker.log_event(topic, b)
    cache = worker.__dict__.setdefault("lowrank_bench_coefficients", {})
    if (n, r) not in cache:  # C once per worker process, not shipped with every task
        cache[(n, r)] = _coefficients(n, r)
    return (_orthonormal_rows(b, rows, r, scale) @ cache[(n, r)]).astype(np.float32)


def _orthonormal_rows(b: int, rows: int, r: int, scale: float) -> np.ndarray:
    G = np.random.default_rng([SEED, b]).standard_normal((rows, r))
    Q, R = np.linalg.qr(G)
    return Q * np.sign(np.diag(R)) * scale  # a deterministic factor


class Problem:
    """The matrix ``A = U diag(s) V^T`` of the docstring, as a dask array per pass topic."""

    def __init__(self, m: int, n: int, r: int, block_rows: int) -> None:
        if m % block_rows:
            raise ValueError("--m must be a multiple of --block-rows")
        self.m, self.n, self.r, self.rows = m, n, r, block_rows
        self.blocks = m // block_rows
        self.s = 1.0 / np.sqrt(np.arange(1.0, r + 1))
        self.C = _coefficients(n, r)
        self.scale = 1.0 / np.sqrt(self.blocks)

    def array(self, topic: str) -> da.Array:
        return da.map_blocks(
            functools.partial(_block, self.rows, self.n, self.r, self.scale, topic),
            chunks=((self.rows,) * self.blocks, (self.n,)),
            dtype=np.float32,
            meta=np.empty((0, 0), dtype=np.float32),
            name=f"matrix-{topic}",  # a new name per run: nothing is shared between runs
        )

    def error(self, U: da.Array, S: np.ndarray, Vh: np.ndarray) -> float:
        """Exact ``||A - U diag(S) Vh||_2 / s_1`` (one pass over the blocks of ``U``)."""
        U = U.rechunk({0: self.rows, 1: -1})
        parts = []
        for b, blk in enumerate(U.to_delayed().ravel()):
            Ub = dask.delayed(_orthonormal_rows)(b, self.rows, self.r, self.scale)
            parts.append(dask.delayed(_cross)(Ub, blk))
        M, G = dask.compute(dask.delayed(_sum_pairs)(parts))[0]
        S = np.asarray(S, dtype=np.float64)
        Vh = np.asarray(Vh, dtype=np.float64)
        X = self.C - (M * S) @ Vh  # r x n
        W = S[:, None] * Vh  # k x n
        gram = X.T @ X + W.T @ (G - M.T @ M) @ W
        top = float(np.linalg.eigvalsh((gram + gram.T) / 2)[-1])
        return float(np.sqrt(max(top, 0.0))) / float(self.s[0])


def _cross(Ub: np.ndarray, blk: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    blk = np.asarray(blk, dtype=np.float64)
    return Ub.T @ blk, blk.T @ blk


def _sum_pairs(parts: list[tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
    M = sum(p[0] for p in parts)
    G = sum(p[1] for p in parts)
    return M, G


def _sampler_start(dask_worker: Any) -> None:
    """Start sampling this worker's resident set size every 20 ms (on a daemon thread) and
    note its CPU time."""
    import psutil  # a dependency of distributed

    proc = psutil.Process()
    state = {"peak": 0, "stop": False, "cpu": sum(proc.cpu_times()[:2])}

    def loop() -> None:
        while not state["stop"]:
            state["peak"] = max(state["peak"], proc.memory_info().rss)
            time.sleep(0.02)

    threading.Thread(target=loop, daemon=True).start()
    dask_worker.lowrank_bench_rss = state


def _sampler_stop(dask_worker: Any) -> tuple[float, float]:
    """Stop the sampler; the peak resident set size of the run in MiB, its CPU seconds."""
    import psutil

    state = dask_worker.lowrank_bench_rss
    state["stop"] = True
    cpu = sum(psutil.Process().cpu_times()[:2]) - state["cpu"]
    return max(state["peak"], 0) / 2**20, cpu


def run_method(
    client: distributed.Client | None,
    problem: Problem,
    method: str,
    config: tuple[int, int],
    k: int,
    seed: int,
) -> dict[str, Any]:
    """One run: wall time, passes, peak worker memory, the result (tall factor persisted)."""
    q, p = config
    topic = f"read-{uuid.uuid4().hex}"
    if client is not None:
        client.run(_sampler_start)
    A = problem.array(topic)
    start, cpu_start = time.perf_counter(), time.process_time()
    if method == "lowrank_nla":
        U, S, Vh = ln.randomized_svd(A, k, oversample=p, power_iters=q, rng=seed)
        U = U.persist()
        distributed.wait(U) if client is not None else None
    else:
        u, s, v = da.linalg.svd_compressed(
            A, k, n_oversamples=p, n_power_iter=q, compute=True, seed=seed
        )
        U, s, v = dask.persist(u, s, v)
        S, Vh = dask.compute(s, v)
        distributed.wait(U) if client is not None else None
    seconds = time.perf_counter() - start
    cpu = time.process_time() - cpu_start  # the client and the scheduler (this process)
    if client is not None:
        reads = len(client.get_events(topic))
        samples = list(client.run(_sampler_stop).values())
        peaks = [peak for peak, _ in samples]
        cpu += sum(c for _, c in samples)  # the workers
    else:
        reads, peaks = -1, []
    return {
        "seconds": seconds,
        "cpu_seconds": cpu,
        "passes": reads / problem.blocks if reads >= 0 else None,
        "peak_worker_mib": max(peaks) if peaks else None,
        "result": (U, np.asarray(S), np.asarray(Vh)),
    }


def environment() -> dict[str, Any]:
    return {
        "python": platform.python_version(),
        "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
        "numpy": np.__version__,
        "dask": dask.__version__,
        "distributed": distributed.__version__,
        "lowrank_nla": ln.__version__,
    }


def factor_error(problem: Problem, method: str, q: int, p: int, k: int, seed: int) -> float:
    """The error of a method's run with ``seed``, computed on the ``r x n`` factor ``C``.

    ``A = U C`` with ``U`` orthonormal, so ``A^T A = C^T C`` and ``range((A A^T)^q A
    Omega) = U range((C C^T)^q C Omega)``: for the same test matrix ``Omega`` (the same
    seed: ours draws it as the in-memory routine does, ``svd_compressed`` from the column
    chunks of its input, which ``C`` shares with ``A``), the rank-k result on ``A`` is ``U``
    times the one on ``C`` and has the same error in exact arithmetic. The runs check the
    agreement (``max_deviation``).
    """
    C = problem.C
    if method == "lowrank_nla":
        U, S, Vh = ln.randomized_svd(C, k, oversample=p, power_iters=q, rng=seed)
    else:
        with dask.config.set(scheduler="synchronous"):
            Cd = da.from_array(C, chunks=(problem.r, problem.n))
            U, S, Vh = dask.compute(
                *da.linalg.svd_compressed(Cd, k, n_oversamples=p, n_power_iter=q, seed=seed)
            )
    return float(np.linalg.norm(C - (U * S) @ Vh, 2) / problem.s[0])


def draw_study(
    problem: Problem, runs: list[dict[str, Any]], k: int, draws: int
) -> list[dict[str, Any]]:
    """Each configuration's error over seeds ``0 .. draws - 1`` (:func:`factor_error`)."""
    out = []
    for r in runs:
        errors = [
            factor_error(problem, r["method"], r["q"], r["oversample"], k, seed)
            for seed in range(draws)
        ]
        measured = r["errors"]  # seeds 0, 1, ... of the runs
        out.append(
            {
                "method": r["method"],
                "q": r["q"],
                "oversample": r["oversample"],
                "draws": draws,
                "mean": statistics.fmean(errors),
                "std": statistics.stdev(errors),
                "min": min(errors),
                "max": max(errors),
                "max_deviation": max(abs(e - m) for e, m in zip(errors, measured, strict=False)),
            }
        )
    return out


def pairing(runs: list[dict[str, Any]], error: dict[tuple[str, int, int], float]) -> list[Any]:
    """Each peer configuration against our least-CPU configuration with ``error`` <= its."""
    ours = [s for s in runs if s["method"] == "lowrank_nla"]
    comparison = []
    for peer in (s for s in runs if s["method"] == "svd_compressed"):
        peer_error = error[("svd_compressed", peer["q"], peer["oversample"])]
        ok = [o for o in ours if error[("lowrank_nla", o["q"], o["oversample"])] <= peer_error]
        best = min(ok, key=lambda o: o["cpu_seconds"]) if ok else None
        comparison.append(
            {
                "peer_q": peer["q"],
                "peer_oversample": peer["oversample"],
                "peer_error": peer_error,
                "peer_passes": peer["passes"],
                "ours_q": best["q"] if best else None,
                "ours_oversample": best["oversample"] if best else None,
                "ours_error": error[("lowrank_nla", best["q"], best["oversample"])]
                if best
                else None,
                "ours_passes": best["passes"] if best else None,
                "ratio": best["cpu_seconds"] / peer["cpu_seconds"] if best else None,
                "wall_ratio": best["seconds"] / peer["seconds"] if best else None,
            }
        )
    return comparison


def finish(payload: dict[str, Any], problem: Problem, draws: int) -> None:
    """Add the draw study and both pairings to ``payload``."""
    runs = payload["runs"]
    payload["draws"] = draw_study(problem, runs, payload["config"]["rank"], draws)
    measured = {(r["method"], r["q"], r["oversample"]): r["error"] for r in runs}
    expected = {(d["method"], d["q"], d["oversample"]): d["mean"] for d in payload["draws"]}
    payload["comparison"] = pairing(runs, measured)
    payload["comparison_by_draws"] = pairing(runs, expected)


def _config(spec: str) -> tuple[int, int]:
    """``"q:p"`` -> ``(q, p)`` (power iterations, oversampling)."""
    q, _, p = spec.partition(":")
    return int(q), int(p or 10)


def markdown(payload: dict[str, Any]) -> str:
    cfg = payload["config"]
    env = payload["environment"]
    gib = cfg["m"] * cfg["n"] * 4 / 2**30
    load = payload["load_average"]
    lines = [
        "# Out-of-core randomized SVD on dask: lowrank_nla vs dask's svd_compressed",
        "",
        f"A: {cfg['m']:,} x {cfg['n']:,} float32 ({gib:.2f} GiB, rank {cfg['r']}, "
        f"s_j = j^-1/2), generated blockwise in {cfg['blocks']} blocks of "
        f"{cfg['block_rows']:,} rows at every pass; rank k = {cfg['rank']}. Cluster: "
        f"{cfg['workers']} worker processes x 1 thread, memory limit {cfg['memory_limit']} "
        f"per worker ({gib * 2**30 / _bytes(cfg['memory_limit']):.1f}x smaller than A), "
        f"{env['cpu_count']} CPU cores shared with other jobs (1-minute load average "
        f"{load['start']:.1f} at the start, {load['end']:.1f} at the end). dask "
        f"{env['dask']}; whole run {payload['seconds']:.0f} s.",
        "Error: exact relative spectral error ||A - U_k S_k V_k^T||_2 / s_1 (optimal "
        f"{payload['optimal_error']:.4e}), mean over the seeds {cfg['seeds']} (the same "
        "seeds for both methods; min and max in brackets). Time: CPU seconds of the run "
        "(user + system of the worker processes and of the client process, which hosts the "
        "scheduler) and wall clock, each the median of "
        f"{cfg['repeats']} rounds (one per seed, the methods alternating at each q); the "
        "machine is shared, so the comparison uses CPU time (wall-clock ratio alongside). "
        "Passes: block generations / blocks. Peak: largest peak RSS of a worker process "
        "during the runs (sampled every 20 ms), baseline included.",
        "",
        "| method | q | oversampling | error (min, max) | passes | CPU [s] | wall [s] "
        "| peak worker [MiB] |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in payload["runs"]:
        lines.append(
            f"| {r['method']} | {r['q']} | {r['oversample']} | {r['error']:.4f} "
            f"({min(r['errors']):.4f}, {max(r['errors']):.4f}) | {r['passes']:g} "
            f"| {r['cpu_seconds']:.1f} | {r['seconds']:.1f} | {r['peak_worker_mib']:.0f} |"
        )
    draws = payload["draws"]
    lines += [
        "",
        f"Error over {draws[0]['draws']} draws (seeds 0-{draws[0]['draws'] - 1}), each "
        "method's computation with the same seed on the r x n factor diag(s) V^T of A (A = U "
        "diag(s) V^T with U orthonormal: the same error in exact arithmetic; largest "
        "deviation from the measured runs above: "
        f"{max(d['max_deviation'] for d in draws):.1e}):",
        "",
        "| method | q | oversampling | mean error | std | min | max |",
        "|---|---|---|---|---|---|---|",
    ]
    for d in draws:
        lines.append(
            f"| {d['method']} | {d['q']} | {d['oversample']} | {d['mean']:.4f} "
            f"| {d['std']:.4f} | {d['min']:.4f} | {d['max']:.4f} |"
        )
    for key, what in (
        ("comparison", f"the mean measured error over the seeds {cfg['seeds']}"),
        ("comparison_by_draws", f"the mean error over the {draws[0]['draws']} draws"),
    ):
        lines += [
            "",
            "Each svd_compressed configuration against our configuration of least CPU time "
            f"that is at least as accurate by {what}:",
            "",
            "| svd_compressed q, p | its error | its passes | ours q, p | our error "
            "| our passes | CPU ratio ours / theirs | wall ratio |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for c in payload[key]:
            peer = f"| {c['peer_q']}, {c['peer_oversample']} | {c['peer_error']:.4f} "
            if c["ours_q"] is None:
                lines.append(f"{peer}| {c['peer_passes']:g} | none as accurate | - | - | - | - |")
                continue
            lines.append(
                f"{peer}| {c['peer_passes']:g} | {c['ours_q']}, {c['ours_oversample']} "
                f"| {c['ours_error']:.4f} | {c['ours_passes']:g} | **{c['ratio']:.2f}** "
                f"| {c['wall_ratio']:.2f} |"
            )
    return "\n".join(lines) + "\n"


def _bytes(limit: str) -> float:
    units = {"KiB": 2**10, "MiB": 2**20, "GiB": 2**30}
    for unit, factor in units.items():
        if limit.endswith(unit):
            return float(limit[: -len(unit)]) * factor
    return float(limit)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes, smoke run")
    parser.add_argument("--m", type=int, default=800_000)
    parser.add_argument("--n", type=int, default=600)
    parser.add_argument("--r", type=int, default=100, help="rank of A")
    parser.add_argument("--rank", type=int, default=50)
    parser.add_argument("--block-rows", type=int, default=10_000)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--memory-limit", default="384MiB")
    parser.add_argument(
        "--ours",
        nargs="+",
        default=["0:10", "0:20", "1:10", "1:20", "2:10", "3:10"],
        help="our configurations, q:p (power iterations : oversampling)",
    )
    parser.add_argument(
        "--peer",
        nargs="+",
        default=["0:10", "1:10", "2:10"],
        help="svd_compressed configurations, q:p (p = n_oversamples, dask's default 10)",
    )
    parser.add_argument("--repeats", type=int, default=3, help="rounds; round i uses seed i")
    parser.add_argument(
        "--draws", type=int, default=100, help="seeds of the error study on the factor C"
    )
    parser.add_argument(
        "--from-json",
        type=Path,
        help="redo the error study and the pairings of a recorded run (no cluster runs)",
    )
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    if args.from_json is not None:
        payload = json.loads(args.from_json.read_text())
        cfg = payload["config"]
        finish(payload, Problem(cfg["m"], cfg["n"], cfg["r"], cfg["block_rows"]), args.draws)
        write(payload, args.out, args.from_json.stem)
        return
    if args.quick:
        args.m, args.n, args.r, args.rank, args.block_rows = 8_000, 60, 40, 8, 1_000
        args.ours, args.peer = ["0:10", "0:20", "1:10", "2:10"], ["0:10", "1:10"]
        args.repeats, args.memory_limit, args.draws = 2, "1GiB", 10
    configs = [("lowrank_nla", _config(c)) for c in args.ours]
    configs += [("svd_compressed", _config(c)) for c in args.peer]
    schedule = sorted(configs, key=lambda mc: (mc[1][0], mc[0] != "lowrank_nla", mc[1][1]))
    seeds = list(range(args.repeats))
    problem = Problem(args.m, args.n, args.r, args.block_rows)
    load_start = os.getloadavg()[0]
    start = time.perf_counter()
    runs: dict[tuple[str, tuple[int, int]], list[dict[str, Any]]] = {}
    with (
        distributed.LocalCluster(
            n_workers=args.workers,
            threads_per_worker=1,
            processes=True,
            host="127.0.0.1",
            dashboard_address=":0",  # any free port (None still takes the default 8787)
            memory_limit=args.memory_limit,
        ) as cluster,
        distributed.Client(cluster) as client,
    ):
        for seed in seeds:
            for method, config in schedule:
                run = run_method(client, problem, method, config, args.rank, seed)
                run["error"] = problem.error(*run.pop("result"))
                runs.setdefault((method, config), []).append(run)
                print(
                    f"seed {seed} {method} q:p={config[0]}:{config[1]}: "
                    f"{run['seconds']:.1f} s ({run['cpu_seconds']:.1f} s CPU), "
                    f"{run['passes']:g} passes, error "
                    f"{run['error']:.4e}, peak {run['peak_worker_mib']:.0f} MiB",
                    flush=True,
                )
    summary = []
    for (method, (q, p)), rs in runs.items():
        summary.append(
            {
                "method": method,
                "q": q,
                "oversample": p,
                "error": statistics.fmean(r["error"] for r in rs),
                "errors": [r["error"] for r in rs],
                "passes": rs[0]["passes"],
                "all_passes": [r["passes"] for r in rs],
                "seconds": statistics.median(r["seconds"] for r in rs),
                "times": [r["seconds"] for r in rs],
                "cpu_seconds": statistics.median(r["cpu_seconds"] for r in rs),
                "cpu_times": [r["cpu_seconds"] for r in rs],
                "peak_worker_mib": max(r["peak_worker_mib"] for r in rs),
            }
        )
    payload = {
        "environment": environment(),
        "config": {
            "m": args.m,
            "n": args.n,
            "r": args.r,
            "rank": args.rank,
            "block_rows": args.block_rows,
            "blocks": problem.blocks,
            "workers": args.workers,
            "memory_limit": args.memory_limit,
            "memory_limit_mib": _bytes(args.memory_limit) / 2**20,
            "repeats": args.repeats,
            "seeds": seeds,
        },
        "load_average": {"start": load_start, "end": os.getloadavg()[0]},
        "optimal_error": float(problem.s[args.rank] / problem.s[0]),
        "seconds": time.perf_counter() - start,
        "runs": summary,
    }
    finish(payload, problem, args.draws)
    write(payload, args.out, "nla_dask_quick" if args.quick else "nla_dask")


def write(payload: dict[str, Any], out: Path, stem: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.json").write_text(json.dumps(payload, indent=1, default=float))
    table = markdown(payload)
    (out / f"{stem}.md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()
