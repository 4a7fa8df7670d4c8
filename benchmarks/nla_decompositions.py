"""Side-by-side benchmark of lowrank_nla's decompositions against their peers.

Run from the repository root (the ``bench`` extra provides scikit-learn)::

    pip install -c constraints.txt -e ".[bench]"
    python benchmarks/nla_decompositions.py            # full run, about 8 minutes on 2 cores
    python benchmarks/nla_decompositions.py --quick    # smoke run, seconds

Method (side by side in one process, accuracy before time):

* Inputs: K-factor-like PSD matrices (exponential averages of rank-32 batches,
  :func:`lowrank_nla.testing.ea_factor`) for n = 512 ... 4096, and dense n x n matrices with a
  slowly (``sigma_j = j^-0.5``) and a fast (``sigma_j = exp(-j / 40)``) decaying spectrum, in
  float32 and float64. Rank k = min(220, n/4) (220 is the thesis' R-KFAC rank).
* Accuracy first: every method and configuration is run once and its relative spectral
  error ``||A - A_k||_2 / ||A||_2`` is measured matrix-free in float64 (Golub-Kahan-Lanczos,
  30 steps; 60 steps agree to 10 digits and the exact norm to 1e-15). The optimal error
  ``sigma_{k+1} / sigma_1`` comes from the exact float64 spectrum.
* Peers (defaults as a user gets them): ``sklearn.utils.extmath.randomized_svd`` (10 extra
  columns, ``n_iter='auto'``, LU normalizer), ``torch.svd_lowrank(q=k+10)`` (``niter=2``),
  ``scipy.sparse.linalg.eigsh(k)`` and the full ``numpy.linalg.eigh`` /
  ``torch.linalg.eigh``. Each peer is compared with ours on the *same array library*.
* Ours: ``randomized_eigh``, ``srevd`` and ``nystrom`` (PSD) and ``randomized_svd`` (general)
  over oversampling p and power iterations q, and the block Krylov option
  (``method="block_krylov"``) of ``randomized_svd`` (general) and ``randomized_eigh`` (PSD)
  over block sizes (k/4, 3k/8, 9k/20, k/2, 3k/4, k + 10) and iterations q <= 8, searched on NumPy
  (q grows per (routine, p) until every peer's error is reached). For each peer, per routine
  and p the smallest sufficient q is rebuilt on the peer's library with each normalizer and
  run once; per routine the fastest whose re-measured error still reaches the peer's is timed
  (:func:`candidates_for`).
* Timing: one process, all timed methods alternating in each round, median of ``--repeats``
  (>= 5) rounds; the reported ratio is ours/peer on medians. ``--clock cpu`` times with the
  process's CPU time instead of wall time (for a loaded machine; run it with one BLAS
  thread, ``OMP_NUM_THREADS=1``, where CPU time is the computation's own time).
* ``--only psd|dense`` and ``--psd-sizes`` run part of the cases; with ``--merge`` their rows
  replace those of the existing record, the others are kept, and the record lists the runs
  and says which run each row comes from.

Writes ``benchmarks/results/nla_decompositions.json`` and ``.md``.
"""

from __future__ import annotations

import os

os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "4")  # BLAS pools of numpy/scipy/torch

import argparse
import json
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import scipy
import scipy.sparse.linalg as spla
import sklearn
import torch
from sklearn.utils.extmath import randomized_svd as sk_randomized_svd

import lowrank_nla as ln
from lowrank_nla.testing import ea_factor, matrix_with_spectrum

RESULTS = Path(__file__).resolve().parent / "results"
SEED = 0
# The clock of every timing: wall time by default; --clock cpu uses the process's CPU time,
# which a loaded machine disturbs far less (meaningful with one BLAS thread, where it is the
# time the computation itself takes).
CLOCK = {"wall": time.perf_counter, "cpu": time.process_time}
clock = time.perf_counter


@dataclass
class Method:
    """One timed callable with its measured accuracy."""

    name: str
    library: str  # "numpy" or "torch": the array library of its input and output
    config: dict[str, Any]
    run: Callable[[], Any] = field(repr=False)
    error: float = float("nan")
    times: list[float] = field(default_factory=list)
    # the same configuration with some settings changed, and the inputs (ours only)
    remake: Callable[..., Method] | None = field(default=None, repr=False)
    arrays: dict[str, Any] = field(default_factory=dict, repr=False)

    @property
    def median(self) -> float:
        return statistics.median(self.times) if self.times else float("nan")

    @property
    def label(self) -> str:
        cfg = ", ".join(f"{k}={v}" for k, v in self.config.items())
        return f"{self.name}({cfg})" if cfg else self.name


def _as_f64(x: Any) -> np.ndarray:
    return ln.testing.to_numpy(x).astype(np.float64)


class _Residual:
    """``A - approx`` in float64 as a matrix-free operator (``approx`` kept factored)."""

    def __init__(self, A64: np.ndarray, result: Any) -> None:
        self.shape, self.dtype, self._A = A64.shape, A64.dtype, A64
        if isinstance(result, ln.EighResult):
            w, V = (_as_f64(p) for p in result)
            self._left, self._mid, self._right = V, w, V.T
        else:
            U, S, Vh = (_as_f64(p) for p in result)
            self._left, self._mid, self._right = U, S, Vh

    def __matmul__(self, X: np.ndarray) -> np.ndarray:
        return self._A @ X - self._left @ (self._mid[:, None] * (self._right @ X))

    @property
    def T(self) -> _Residual:
        out = object.__new__(_Residual)
        out.shape, out.dtype, out._A = self.shape[::-1], self.dtype, self._A.T
        out._left, out._mid, out._right = self._right.T, self._mid, self._left.T
        return out


def spectral_error(A64: np.ndarray, norm_A: float, result: Any) -> float:
    """Relative spectral error of a (U, S, Vh) / (w, V) result, in float64, matrix-free.

    30 Golub-Kahan-Lanczos steps: on these residuals they agree with 60 steps to 10 digits.
    """
    return float(ln.estimate_spectral_norm(_Residual(A64, result), n_iter=30, rng=1)) / norm_A


def _torch_svd_lowrank(A: torch.Tensor, k: int) -> ln.SVDResult:
    torch.manual_seed(SEED)
    U, S, V = torch.svd_lowrank(A, q=k + 10)  # niter=2: torch's default
    return ln.SVDResult(U[:, :k], S[:k], V[:, :k].T)


def _eigsh(A: np.ndarray, k: int) -> ln.EighResult:
    w, V = spla.eigsh(A, k, which="LM", v0=np.random.default_rng(SEED).standard_normal(len(A)))
    order = np.argsort(w)[::-1]
    return ln.EighResult(w[order], V[:, order])


def _numpy_eigh(A: np.ndarray, k: int) -> ln.EighResult:
    w, V = np.linalg.eigh(A)
    return ln.EighResult(w[::-1][:k], V[:, ::-1][:, :k])


def _torch_eigh(A: torch.Tensor, k: int) -> ln.EighResult:
    w, V = torch.linalg.eigh(A)
    return ln.EighResult(w.flip(0)[:k], V.flip(1)[:, :k])


def peers_psd(A: np.ndarray, At: torch.Tensor, k: int, *, with_eigsh: bool) -> list[Method]:
    peers = [
        Method(
            "sklearn.randomized_svd",
            "numpy",
            {},
            lambda: ln.SVDResult(*sk_randomized_svd(A, k, random_state=SEED)),
        ),
        Method("torch.svd_lowrank", "torch", {}, lambda: _torch_svd_lowrank(At, k)),
        Method("numpy.linalg.eigh", "numpy", {}, lambda: _numpy_eigh(A, k)),
        Method("torch.linalg.eigh", "torch", {}, lambda: _torch_eigh(At, k)),
    ]
    if with_eigsh:
        peers.append(Method("scipy.eigsh", "numpy", {}, lambda: _eigsh(A, k)))
    return peers


def peers_general(A: np.ndarray, At: torch.Tensor, k: int) -> list[Method]:
    return [
        Method(
            "sklearn.randomized_svd",
            "numpy",
            {},
            lambda: ln.SVDResult(*sk_randomized_svd(A, k, random_state=SEED)),
        ),
        Method("torch.svd_lowrank", "torch", {}, lambda: _torch_svd_lowrank(At, k)),
    ]


def _ours(
    routine: Callable[..., Any],
    arrays: dict[str, Any],
    library: str,
    k: int,
    p: int,
    q: int,
    normalizer: str,
    krylov: bool = False,
) -> Method:
    """Our ``routine`` at oversampling ``p`` (subspace) or block size ``p`` (``krylov``)."""
    A = arrays[library]

    def remake(**change: Any) -> Method:
        cfg = {"library": library, "p": p, "q": q, "normalizer": normalizer, **change}
        return _ours(
            routine, arrays, cfg["library"], k, cfg["p"], cfg["q"], cfg["normalizer"], krylov
        )

    if krylov:
        return Method(
            f"{routine.__name__}[block_krylov]",
            library,
            {"block": p, "q": q, "normalizer": normalizer},
            lambda: routine(
                A,
                k,
                power_iters=q,
                normalizer=normalizer,
                method="block_krylov",
                block_size=p,
                rng=SEED,
            ),
            remake=remake,
            arrays=arrays,
        )
    return Method(
        routine.__name__,
        library,
        {"p": p, "q": q, "normalizer": normalizer},
        lambda: routine(A, k, oversample=p, power_iters=q, normalizer=normalizer, rng=SEED),
        remake=remake,
        arrays=arrays,
    )


def _width(m: Method) -> int:
    """The searched width of a configuration: oversampling p, or the Krylov block size."""
    return int(m.config.get("p", m.config.get("block", 0)))


def krylov_blocks(k: int, fractions: list[float]) -> list[int]:
    """Block sizes ``round(f k)`` (``f = 1`` means ``k + 10``, Musco & Musco's block)."""
    return sorted({k + 10 if f == 1.0 else max(1, round(f * k)) for f in fractions})


def ours_grid(
    arrays: dict[str, Any], k: int, psd: bool, grid: dict[str, list[int]]
) -> list[Method]:
    """Our configurations on NumPy (Householder QR): the accuracy search space.

    ``srevd`` is not searched: with the same seed it spans the same subspace as
    ``randomized_eigh`` at the same (p, q) (only the orthonormalization schedule differs), so
    it takes ``randomized_eigh``'s configurations and is re-measured as a candidate.
    """
    routines = (ln.randomized_eigh, ln.nystrom) if psd else (ln.randomized_svd,)
    qs = grid["power_iters"] if psd else grid["power_iters_general"]
    ours = [
        _ours(routine, arrays, "numpy", k, p, q, "qr")
        for routine in routines
        for p in grid["oversample"]
        for q in qs
    ]
    # block Krylov (randomized_eigh's for PSD input): block b, the basis b (q + 1) >= k
    krylov = ln.randomized_eigh if psd else ln.randomized_svd
    ours += [
        _ours(krylov, arrays, "numpy", k, b, q, "qr", krylov=True)
        for b in krylov_blocks(k, grid["krylov_block_fractions"])
        for q in grid["power_iters_krylov"]
        if b * (q + 1) >= k
    ]
    return ours


def measure_errors(methods: list[Method], A64: np.ndarray, norm_A: float) -> None:
    for m in methods:
        m.error = spectral_error(A64, norm_A, m.run())


def measure_ours(ours: list[Method], peers: list[Method], A64: np.ndarray, norm_A: float) -> None:
    """Errors of our configurations, q increasing per (routine, p).

    Once a configuration is at least as accurate as every randomized peer, larger q (more
    work, at best equal accuracy) are not run; their error stays NaN.
    """
    done: set[tuple[str, int]] = set()
    for m in sorted(ours, key=lambda m: m.config["q"]):
        key = (m.name, _width(m))
        if key in done:
            continue
        m.error = spectral_error(A64, norm_A, m.run())
        if all(m.error <= p.error for p in peers):
            done.add(key)


def candidates_for(
    peer: Method, ours: list[Method], A64: np.ndarray, norm_A: float, k: int, max_q: int
) -> list[Method]:
    """Our fastest configuration per routine, on the peer's library, at least as accurate.

    1. Frontier: per routine and p, the smallest q whose NumPy error reaches the peer's
       (``srevd`` takes ``randomized_eigh``'s frontier, see :func:`ours_grid`).
    2. Each frontier configuration is rebuilt on the peer's array library with each
       normalizer (Householder QR, CholeskyQR2, none) and timed (the shortest of three runs).
    3. Per routine, fastest first, the first one whose re-measured error (another library
       draws another sketch) reaches the peer's is kept; a miss gets one more power iteration
       at a time up to ``max_q`` before the next option is tried.
    The kept configurations go on to the alternating timing, which decides the routine.
    """
    frontier: dict[tuple[str, int], Method] = {}
    for m in ours:
        key = (m.name, _width(m))
        if m.error <= peer.error and (
            key not in frontier or m.config["q"] < frontier[key].config["q"]
        ):
            frontier[key] = m
    for (name, p), m in list(frontier.items()):
        if name == "randomized_eigh":
            frontier[("srevd", p)] = _ours(
                ln.srevd, m.arrays, "numpy", k, p, max(m.config["q"], 1), "qr"
            )
    options: dict[str, list[tuple[float, Method]]] = {}
    for (name, _), m in frontier.items():
        assert m.remake is not None
        # block Krylov orthogonalizes its blocks against each other: no 'none' normalizer
        normalizers = ("qr", "cholqr2") if "block_krylov" in name else ("qr", "cholqr2", "none")
        for normalizer in normalizers:
            cand = m.remake(library=peer.library, normalizer=normalizer)
            options.setdefault(name, []).append((_quick_time(cand), cand))
    out = []
    for opts in options.values():
        for _, cand in sorted(opts, key=lambda o: o[0]):
            found = None
            for q in range(cand.config["q"], max_q + 1):
                assert cand.remake is not None
                c = cand if q == cand.config["q"] else cand.remake(q=q)
                c.error = spectral_error(A64, norm_A, c.run())
                if c.error <= peer.error:
                    found = c
                    break
            if found is not None:
                out.append(found)
                break
    return out


def _quick_time(m: Method, runs: int = 3) -> float:
    """The shortest of ``runs`` timed runs of ``m`` (a pre-selection, not the record)."""
    times = []
    for _ in range(runs):
        start = clock()
        m.run()
        times.append(clock() - start)
    return min(times)


def time_alternating(methods: list[Method], repeats: int, *, warmup: bool) -> None:
    for m in methods if warmup else ():  # first-call costs: imports, pools, allocations
        m.run()
    for _ in range(repeats):
        for m in methods:
            start = clock()
            m.run()
            m.times.append(clock() - start)


def run_case(
    case: str,
    A64: np.ndarray,
    dtype: str,
    k: int,
    norm_A: float,
    optimal: float,
    psd: bool,
    grid: dict[str, list[int]],
    repeats: int,
    exact_repeats: int,
    with_eigsh: bool,
) -> list[dict[str, Any]]:
    A = A64.astype(dtype)
    At = torch.asarray(A)
    A_ref = A.astype(np.float64)  # errors against the matrix the methods actually saw
    # ||A_ref||_2 differs from the float64 norm_A by rounding only (float32: ~1e-7 relative).
    peers = peers_psd(A, At, k, with_eigsh=with_eigsh) if psd else peers_general(A, At, k)
    ours = ours_grid({"numpy": A, "torch": At}, k, psd, grid)
    max_q = max(grid["power_iters"] if psd else grid["power_iters_general"]) + 2
    names = ("sklearn.randomized_svd", "torch.svd_lowrank")
    randomized_peers = [p for p in peers if p.name in names]
    exact_peers = [p for p in peers if p.name not in names]
    measure_errors(peers, A_ref, norm_A)
    measure_ours(ours, randomized_peers, A_ref, norm_A)
    timed = {id(m): m for m in randomized_peers}
    pairs = []
    for peer in randomized_peers:
        cands = candidates_for(peer, ours, A_ref, norm_A, k, max_q)
        pairs.append((peer, cands))
        timed.update({id(m): m for m in cands})
    time_alternating(list(timed.values()), repeats, warmup=True)
    # Full eigendecompositions take ~10 s each at n = 4096: fewer rounds there, no warm-up.
    time_alternating(exact_peers, exact_repeats, warmup=False)

    rows = []
    for peer, cands in pairs:
        best = min(cands, key=lambda m: m.median) if cands else None
        rows.append(
            {
                "case": case,
                "n": A.shape[0],
                "dtype": dtype,
                "rank": k,
                "optimal_error": optimal,
                "peer": peer.name,
                "library": peer.library,
                "peer_error": peer.error,
                "peer_time": peer.median,
                "ours": best.label if best else None,
                "ours_error": best.error if best else None,
                "ours_time": best.median if best else None,
                "ratio": best.median / peer.median if best else None,
                "exact_times": {p.name: p.median for p in exact_peers},
                "exact_errors": {p.name: p.error for p in exact_peers},
                "exact_repeats": exact_repeats,
                "candidates": [
                    {"method": m.label, "error": m.error, "time": m.median} for m in cands
                ],
            }
        )
    return rows


def environment() -> dict[str, Any]:
    return {
        "python": platform.python_version(),
        "machine": platform.machine(),
        "processor": platform.processor(),
        "cpu_count": os.cpu_count(),
        "numpy": np.__version__,
        "scipy": scipy.__version__,
        "sklearn": sklearn.__version__,
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "lowrank_nla": ln.__version__,
        "OPENBLAS_THREAD_TIMEOUT": os.environ.get("OPENBLAS_THREAD_TIMEOUT"),
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
    }


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _run_line(run: dict[str, Any]) -> str:
    env, grid = run["environment"], run["grid"]
    return (
        f"run {run['id']} ({run['date']}): {run['what']}; {run['seconds']:.0f} s, "
        f"{run.get('clock', 'wall')} clock, "
        f"{env['torch_threads']} torch thread(s)"
        + (f", OMP_NUM_THREADS={env['OMP_NUM_THREADS']}" if env.get("OMP_NUM_THREADS") else "")
        + "; "
        f"block Krylov grid: blocks {grid['krylov_block_fractions']} x k, "
        f"q {grid['power_iters_krylov']}"
    )


def markdown(rows: list[dict[str, Any]], runs: list[dict[str, Any]]) -> str:
    env = runs[-1]["environment"]
    several = len(runs) > 1
    lines = [
        "# lowrank_nla decompositions vs peers",
        "",
        f"CPU, {env['cpu_count']} cores; numpy {env['numpy']}, scipy {env['scipy']}, "
        f"scikit-learn {env['sklearn']}, torch {env['torch']}; "
        + (
            f"whole run {runs[0]['seconds']:.0f} s, {runs[0].get('clock', 'wall')} clock."
            if not several
            else "rows from several runs, the 'run' column says which:"
        ),
        "Error: relative spectral error ||A - A_k||_2/||A||_2 (float64, matrix-free Lanczos); "
        "'optimal' is sigma_{k+1}/sigma_1. Time: median of alternating runs. 'ours' is our "
        "fastest configuration whose error is <= the peer's, on the same array library; "
        "ratio = ours / peer (< 1: ours faster).",
        "",
    ]
    if several:
        lines += [f"- {_run_line(run)}" for run in runs] + [""]
    run_head, run_rule = (" run |", "---|") if several else ("", "")
    lines += [
        "| case | n | dtype | k | optimal | peer | peer error | peer [s] | ours | ours error "
        "| ours [s] | ratio |" + run_head,
        "|---|---|---|---|---|---|---|---|---|---|---|---|" + run_rule,
    ]
    for r in rows:
        ours = r["ours"] or "none reaches the peer's error"
        lines.append(
            f"| {r['case']} | {r['n']} | {r['dtype']} | {r['rank']} | {r['optimal_error']:.3e} "
            f"| {r['peer']} | {r['peer_error']:.3e} | {r['peer_time']:.3f} | `{ours}` "
            f"| {_fmt(r['ours_error'], '.3e')} | {_fmt(r['ours_time'], '.3f')} "
            f"| **{_fmt(r['ratio'], '.2f')}** |" + (f" {r['run']} |" if several else "")
        )
    lines += [
        "",
        "Block Krylov (`method='block_krylov'`, block size `block`): its fastest configuration "
        "that reaches the peer's error, timed in the same alternating rounds; 'chosen' says "
        "whether it is the row's 'ours' above.",
        "",
        "| case | n | dtype | peer | block Krylov | error | [s] | ratio | chosen |" + run_head,
        "|---|---|---|---|---|---|---|---|---|" + run_rule,
    ]
    for r in rows:
        run_cell = f" {r['run']} |" if several else ""
        kry = [c for c in r["candidates"] if "block_krylov" in c["method"]]
        if not kry:
            lines.append(
                f"| {r['case']} | {r['n']} | {r['dtype']} | {r['peer']} "
                "| none reaches the peer's error | - | - | - | no |" + run_cell
            )
            continue
        c = min(kry, key=lambda c: c["time"])
        lines.append(
            f"| {r['case']} | {r['n']} | {r['dtype']} | {r['peer']} | `{c['method']}` "
            f"| {c['error']:.3e} | {c['time']:.3f} | {c['time'] / r['peer_time']:.2f} "
            f"| {'yes' if c['method'] == r['ours'] else 'no'} |" + run_cell
        )
    exact = [r for r in rows if r["exact_times"] and r["peer"] == "sklearn.randomized_svd"]
    if exact:
        lines += [
            "",
            "Exact peers on the PSD inputs (time [s], median of the 'runs' column; they reach "
            "the optimal error; scipy.eigsh is left out at n = 4096):",
            "",
            "| n | dtype | runs | " + " | ".join(exact[0]["exact_times"]) + " |" + run_head,
            "|---|---|---|" + "---|" * len(exact[0]["exact_times"]) + run_rule,
        ]
        for r in exact:
            times = " | ".join(
                f"{r['exact_times'].get(name, float('nan')):.3f}"
                for name in exact[0]["exact_times"]
            )
            lines.append(
                f"| {r['n']} | {r['dtype']} | {r['exact_repeats']} | {times} |"
                + (f" {r['run']} |" if several else "")
            )
    return "\n".join(lines) + "\n"


def _load_runs(path: Path) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Runs and rows of an existing record; a record from before runs were tracked is run 1."""
    old = json.loads(path.read_text())
    if "runs" in old:
        return old["runs"], old["rows"]
    run = {
        "id": 1,
        "date": "earlier record, date not stored",
        "what": "full run",
        "seconds": old["seconds"],
        "repeats": old["repeats"],
        "grid": old["grid"],
        "environment": old["environment"],
    }
    return [run], [{**r, "run": 1} for r in old["rows"]]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes, smoke run")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument(
        "--only", choices=("psd", "dense"), help="run only the PSD or only the dense cases"
    )
    parser.add_argument(
        "--psd-sizes", type=int, nargs="+", help="sizes n of the PSD cases (default: all)"
    )
    parser.add_argument(
        "--merge",
        action="store_true",
        help="replace only the (case, n, dtype) rows this run regenerates in the existing "
        "record and keep the others; the record then says which run each row comes from",
    )
    parser.add_argument(
        "--clock",
        choices=tuple(CLOCK),
        default="wall",
        help="wall time, or the process's CPU time (for a loaded machine; with one thread)",
    )
    args = parser.parse_args()
    global clock
    clock = CLOCK[args.clock]
    if args.quick:
        psd_sizes, dense_sizes, repeats = [256], [256], 2
        grid = {
            "oversample": [10, 40],
            "power_iters": [0, 1, 2],
            "power_iters_general": [1, 3],
            "krylov_block_fractions": [0.5, 1.0],
            "power_iters_krylov": [1, 2],
        }
    else:
        if args.repeats < 5:
            parser.error("--repeats must be >= 5 for a recorded run")
        psd_sizes, dense_sizes, repeats = [512, 1024, 2048, 4096], [2048], args.repeats
        grid = {
            "oversample": [10, 50, 150],
            "power_iters": [0, 1, 2, 3],
            "power_iters_general": [0, 1, 2, 3, 5],
            # small blocks with more iterations are often cheapest at a given error
            "krylov_block_fractions": [0.25, 0.375, 0.45, 0.5, 0.75, 1.0],
            "power_iters_krylov": [1, 2, 3, 4, 5, 6, 7, 8],
        }
    if args.psd_sizes:
        psd_sizes = args.psd_sizes
    if args.only == "psd":
        dense_sizes = []
    elif args.only == "dense":
        psd_sizes = []
    torch.manual_seed(SEED)
    start = time.perf_counter()
    rows: list[dict[str, Any]] = []
    # (case, matrix, its spectrum descending, PSD?, dtypes, rounds for the exact peers)
    cases: list[
        tuple[
            str,
            Callable[[], np.ndarray],
            Callable[[np.ndarray], np.ndarray],
            bool,
            tuple[str, ...],
            int,
        ]
    ] = []
    for n in psd_sizes:
        cases.append(
            (
                "EA factor (PSD)",
                lambda n=n: ea_factor(n, batch=32, steps=60, rng=SEED),
                lambda A: np.linalg.eigvalsh(A)[::-1],
                True,
                ("float64", "float32"),
                repeats if n <= 2048 else 1,  # a full eigh takes ~10 s at n = 4096
            )
        )
    for n in dense_sizes:
        for case, spectrum in (
            ("dense, slow decay", 1.0 / np.sqrt(np.arange(1.0, n + 1))),
            ("dense, fast decay", np.exp(-np.arange(n) / 40.0)),
        ):
            cases.append(
                (
                    case,
                    lambda s=spectrum: matrix_with_spectrum(s, rng=SEED),
                    lambda A, s=spectrum: s,
                    False,
                    ("float64",),  # the K-factor cases cover float32
                    repeats,
                )
            )
    for case, make, spectrum_of, psd, dtypes, exact_repeats in cases:
        A64 = make()
        s = spectrum_of(A64)
        n = A64.shape[0]
        k = min(220, n // 4)
        for dtype in dtypes:
            rows += run_case(
                case,
                A64,
                dtype,
                k,
                float(s[0]),
                float(s[k] / s[0]),
                psd,
                grid,
                repeats,
                exact_repeats,
                with_eigsh=psd and n <= 2048,
            )
            print(f"{case} n={n} {dtype}: {time.perf_counter() - start:.0f} s", flush=True)
    seconds = time.perf_counter() - start
    env = environment()
    args.out.mkdir(parents=True, exist_ok=True)
    stem = "nla_decompositions_quick" if args.quick else "nla_decompositions"
    path = args.out / f"{stem}.json"
    partial = bool(args.only or args.psd_sizes)
    runs: list[dict[str, Any]] = []
    kept: list[dict[str, Any]] = []
    if args.merge and path.exists():
        runs, kept = _load_runs(path)
        redone = {(r["case"], r["n"], r["dtype"]) for r in rows}
        kept = [r for r in kept if (r["case"], r["n"], r["dtype"]) not in redone]
        runs = [run for run in runs if any(r["run"] == run["id"] for r in kept)]
    run_id = max((run["id"] for run in runs), default=0) + 1
    cases_run = sorted({f"{r['case']} n={r['n']}" for r in rows})
    runs.append(
        {
            "id": run_id,
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "what": ("cases " + "; ".join(cases_run)) if partial else "full run",
            "seconds": seconds,
            "repeats": repeats,
            "grid": grid,
            "clock": args.clock,
            "environment": env,
        }
    )
    cases_order = ("EA factor (PSD)", "dense, slow decay", "dense, fast decay")
    rows = sorted(  # the order of a full run (stable: the peers keep theirs)
        kept + [{**r, "run": run_id} for r in rows],
        key=lambda r: (cases_order.index(r["case"]), r["n"], r["dtype"] != "float64"),
    )
    payload = {"runs": runs, "rows": rows}
    path.write_text(json.dumps(payload, indent=1, default=float))
    table = markdown(rows, runs)
    (args.out / f"{stem}.md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()
