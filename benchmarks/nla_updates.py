"""Brand updates vs randomized refreshes vs full eigh, and low-rank inverse application.

Run from the repository root::

    python benchmarks/nla_updates.py            # D = 512 ... 8192, float32 and float64
    python benchmarks/nla_updates.py --quick    # smoke run, seconds

Method (side by side in one process, accuracy before time), per dimension D and dtype:

* A stream of 100 updates ``X_t`` (D x n, n = 128) with a power-law covariance and a drifting
  mean builds the exact exponential average ``M`` (rho = 0.95) in float64; the same stream
  drives ``brand_update`` at rank r = 200.
* Accuracy first: relative spectral errors ``||M - M_hat||_2 / ||M||_2`` (Lanczos, float64) of
  the Brand state after the 100 updates, of ``randomized_eigh`` and ``srevd`` of ``M`` at rank
  200 (p = 10, q = 2 and q = 3, the library defaults), against the optimal
  ``lambda_201 / lambda_1`` from the full ``eigh``.
* Time of one Brand update, one randomized refresh (each routine), one full
  ``numpy.linalg.eigh``, alternating, median of ``--repeats`` rounds (the full eigh gets one
  round at D = 8192, where it takes over a minute).
* Growth exponents: least-squares slope of log(time) on log(D) (randomized for D >= 1024).
* ``damped_inverse_apply`` of a rank-200 factor to a D x D gradient-sized block against a
  dense Cholesky solve of the same matrix (agreement and time).

Writes ``benchmarks/results/nla_updates.json`` and ``.md``.
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
from pathlib import Path
from typing import Any

import numpy as np
import scipy
import scipy.linalg

import lowrank_nla as ln
from lowrank_nla.testing import to_numpy

RESULTS = Path(__file__).resolve().parent / "results"
SEED, RANK, BATCH, DECAY, UPDATES = 0, 200, 128, 0.95, 100


def stream(D: int, dtype: str, rng: np.random.Generator) -> list[np.ndarray]:
    """``UPDATES`` blocks, scaled so that ``X X^T`` is the batch's instantaneous factor."""
    scale = 1.0 / np.sqrt(np.arange(1, D + 1))
    mean = rng.standard_normal(D) / np.sqrt(D)
    out = []
    for _ in range(UPDATES):
        mean = 0.9 * mean + 0.1 * rng.standard_normal(D) / np.sqrt(D)
        X = (scale[:, None] * rng.standard_normal((D, BATCH)) + mean[:, None]) / np.sqrt(BATCH)
        out.append(X.astype(dtype))
    return out


def exact_ea(blocks: list[np.ndarray]) -> np.ndarray:
    """The exponential average of the blocks in float64, as one product."""
    k = len(blocks)
    w = np.sqrt((1 - DECAY) * DECAY ** np.arange(k - 1, -1, -1))
    Z = np.concatenate([wi * b.astype(np.float64) for wi, b in zip(w, blocks, strict=True)], 1)
    return Z @ Z.T


def rel_error(M: np.ndarray, norm_M: float, approx: Any) -> float:
    if isinstance(approx, ln.EighResult):
        d, U = (to_numpy(p).astype(np.float64) for p in approx)
    else:
        U, d = (to_numpy(p).astype(np.float64) for p in approx)

    class Residual:
        shape, dtype = M.shape, M.dtype

        def __matmul__(self, X: np.ndarray) -> np.ndarray:
            return M @ X - U @ (d[:, None] * (U.T @ X))

    res = Residual()
    return float(ln.estimate_spectral_norm(res, n_iter=30, symmetric=True, rng=1)) / norm_M


def timed(methods: dict[str, Callable[[], Any]], repeats: dict[str, int]) -> dict[str, float]:
    times: dict[str, list[float]] = {name: [] for name in methods}
    for name, fn in methods.items():  # warm-up, except the expensive full eigh
        if repeats[name] > 1:
            fn()
    for r in range(max(repeats.values())):
        for name, fn in methods.items():
            if r < repeats[name]:
                start = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def run(D: int, dtype: str, repeats: int) -> dict[str, Any]:
    rng = np.random.default_rng(SEED)
    blocks = stream(D, dtype, rng)
    M64 = exact_ea(blocks)
    M = M64.astype(dtype)
    w_exact = np.linalg.eigvalsh(M64)[::-1]
    norm_M = float(w_exact[0])

    state = ln.LowRankPSD(np.zeros((D, 0), dtype), np.zeros(0, dtype))
    for X in blocks:
        state = ln.brand_update(state, X, decay=DECAY, rank=RANK).state
    refreshes = {
        "randomized_eigh": lambda: ln.randomized_eigh(M, RANK, rng=SEED, check_symmetric=False),
        "srevd": lambda: ln.srevd(M, RANK, rng=SEED, check_symmetric=False),
    }
    errors = {
        "optimal": float(w_exact[RANK] / w_exact[0]),
        "brand (100 updates)": rel_error(M64, norm_M, state),
    }
    for name, fn in refreshes.items():
        errors[name] = rel_error(M64, norm_M, fn())

    X_next = blocks[-1]
    methods: dict[str, Callable[[], Any]] = {
        "brand_update": lambda: ln.brand_update(state, X_next, decay=DECAY, rank=RANK),
        **refreshes,
        "numpy.linalg.eigh": lambda: np.linalg.eigh(M),
    }
    reps = {name: repeats for name in methods}
    reps["numpy.linalg.eigh"] = 1 if D >= 8192 else repeats
    times = timed(methods, reps)

    # inverse application of the rank-200 factor to a D x D block (a square layer's gradient)
    V = np.random.default_rng(1).standard_normal((D, D)).astype(dtype)
    lam = 1e-3 * float(state.d[0])
    dense = state.to_dense() + lam * np.eye(D, dtype=dtype)
    apply_times = timed(
        {
            "damped_inverse_apply": lambda: ln.damped_inverse_apply(state, V, damping=lam),
            "scipy cho_factor + cho_solve": lambda: scipy.linalg.cho_solve(
                scipy.linalg.cho_factor(dense), V
            ),
        },
        {"damped_inverse_apply": repeats, "scipy cho_factor + cho_solve": repeats},
    )
    ours = ln.damped_inverse_apply(state, V, damping=lam).astype(np.float64)
    ref = scipy.linalg.cho_solve(scipy.linalg.cho_factor(dense.astype(np.float64)), V)
    agreement = float(np.linalg.norm(ours - ref) / np.linalg.norm(ref))
    return {
        "D": D,
        "dtype": dtype,
        "rank": RANK,
        "batch": BATCH,
        "updates": UPDATES,
        "errors": errors,
        "times": times,
        "eigh_repeats": reps["numpy.linalg.eigh"],
        "inverse_apply_times": apply_times,
        "inverse_apply_agreement": agreement,
    }


def exponent(Ds: list[int], ts: list[float]) -> float:
    return float(np.polyfit(np.log(Ds), np.log(ts), 1)[0])


def markdown(
    rows: list[dict[str, Any]],
    fits: dict[str, dict[str, float]],
    env: dict[str, Any],
    seconds: float,
) -> str:
    lines = [
        "# Brand updates vs randomized refreshes vs full eigh",
        "",
        f"CPU, {env['cpu_count']} cores; numpy {env['numpy']}, scipy {env['scipy']}; rank "
        f"{RANK}, batch {BATCH}, rho {DECAY}, {UPDATES} updates; whole run {seconds:.0f} s. "
        "Times: median of alternating rounds (full eigh: one round at D = 8192). Errors: "
        "relative spectral error against the exact EA factor after the updates.",
        "",
        "| D | dtype | brand_update [s] | randomized_eigh [s] | srevd [s] | full eigh [s] "
        "| brand/eigh | brand/srevd | err optimal | err brand | err randomized_eigh "
        "| err srevd |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        t, e = r["times"], r["errors"]
        lines.append(
            f"| {r['D']} | {r['dtype']} | {t['brand_update']:.4f} | {t['randomized_eigh']:.4f} "
            f"| {t['srevd']:.4f} | {t['numpy.linalg.eigh']:.3f} "
            f"| {t['brand_update'] / t['numpy.linalg.eigh']:.4f} "
            f"| {t['brand_update'] / t['srevd']:.3f} | {e['optimal']:.3e} "
            f"| {e['brand (100 updates)']:.3e} | {e['randomized_eigh']:.3e} | {e['srevd']:.3e} |"
        )
    lines += [
        "",
        "Fitted growth exponents (time ~ D^a):",
        "",
        "| dtype | brand_update | randomized_eigh (D >= 1024) | srevd (D >= 1024) | full eigh |",
        "|---|---|---|---|---|",
    ]
    for dtype, f in fits.items():
        lines.append(
            f"| {dtype} | {f['brand_update']:.2f} | {f['randomized_eigh']:.2f} "
            f"| {f['srevd']:.2f} | {f['numpy.linalg.eigh']:.2f} |"
        )
    lines += [
        "",
        "Inverse application to a D x D block (rank-200 factor + damping):",
        "",
        "| D | dtype | damped_inverse_apply [s] | Cholesky solve [s] | ratio "
        "| relative difference |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        a = r["inverse_apply_times"]
        ours, dense = a["damped_inverse_apply"], a["scipy cho_factor + cho_solve"]
        lines.append(
            f"| {r['D']} | {r['dtype']} | {ours:.4f} | {dense:.4f} | {ours / dense:.3f} "
            f"| {r['inverse_apply_agreement']:.1e} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, smoke run")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    sizes = [256, 512] if args.quick else [512, 1024, 2048, 4096, 8192]
    repeats = 2 if args.quick else args.repeats
    start = time.perf_counter()
    rows = []
    for dtype in ("float64", "float32"):
        for D in sizes:
            rows.append(run(D, dtype, repeats))
            print(f"D={D} {dtype}: {time.perf_counter() - start:.0f} s", flush=True)
    fits: dict[str, dict[str, float]] = {}
    for dtype in ("float64", "float32"):
        sub = [r for r in rows if r["dtype"] == dtype]
        big = [r for r in sub if r["D"] >= 1024] or sub
        fits[dtype] = {
            name: exponent(
                [r["D"] for r in (big if name in ("randomized_eigh", "srevd") else sub)],
                [r["times"][name] for r in (big if name in ("randomized_eigh", "srevd") else sub)],
            )
            for name in ("brand_update", "randomized_eigh", "srevd", "numpy.linalg.eigh")
        }
    seconds = time.perf_counter() - start
    env = {
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "numpy": np.__version__,
        "scipy": scipy.__version__,
        "lowrank_nla": ln.__version__,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    stem = "nla_updates_quick" if args.quick else "nla_updates"
    (args.out / f"{stem}.json").write_text(
        json.dumps({"environment": env, "seconds": seconds, "rows": rows, "fits": fits}, indent=1)
    )
    table = markdown(rows, fits, env, seconds)
    (args.out / f"{stem}.md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()
