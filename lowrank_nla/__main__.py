"""Command line: ``python -m lowrank_nla demo``.

Decomposes a generated K-factor-like PSD matrix (an exponential average of low-rank batches)
and a dense matrix with decaying spectrum, and prints rank, time and relative spectral error
of each routine next to NumPy's exact decomposition.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from . import (
    nystrom,
    partial_eigh,
    randomized_eigh,
    randomized_svd,
    relative_error,
    srevd,
)
from .testing import ea_factor, matrix_with_spectrum


def _timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def demo(n: int, rank: int, dtype: str, seed: int) -> list[tuple[str, str, int, float, float]]:
    """Run the demo and return its table rows ``(matrix, method, rank, seconds, error)``."""
    np_dtype = np.dtype(dtype)
    rows: list[tuple[str, str, int, float, float]] = []

    psd = ea_factor(n, batch=32, steps=40, rng=seed).astype(np_dtype)
    (w_all, _), t_exact = _timed(lambda: np.linalg.eigh(psd))
    w_all = w_all[::-1]
    optimal = float(abs(w_all[rank]) / abs(w_all[0]))
    rows.append(("EA factor (PSD)", "numpy.linalg.eigh (exact, full)", n, t_exact, optimal))
    psd_methods: dict[str, Callable[[], Any]] = {
        "randomized_eigh": lambda: randomized_eigh(psd, rank, rng=seed),
        "srevd": lambda: srevd(psd, rank, rng=seed),
        "nystrom": lambda: nystrom(psd, rank, power_iters=1, rng=seed),
        "partial_eigh (exact top-k)": lambda: partial_eigh(psd, rank),
    }
    for name, fn in psd_methods.items():
        res, secs = _timed(fn)
        err = float(relative_error(psd, res, method="lanczos"))
        rows.append(("EA factor (PSD)", name, rank, secs, err))

    s = np.logspace(0, -6, n)
    dense = matrix_with_spectrum(s, rng=seed).astype(np_dtype)
    _, t_svd = _timed(lambda: np.linalg.svd(dense))
    rows.append(("dense, s_j = 10^(-6j/n)", "numpy.linalg.svd (exact, full)", n, t_svd, s[rank]))
    res, secs = _timed(lambda: randomized_svd(dense, rank, rng=seed))
    err = float(relative_error(dense, res, method="lanczos"))
    rows.append(("dense, s_j = 10^(-6j/n)", "randomized_svd", rank, secs, err))
    return rows


def _print_table(rows: Sequence[tuple[str, str, int, float, float]]) -> None:
    head = f"{'matrix':<26} {'method':<34} {'rank':>5} {'time [s]':>9} {'rel. error':>11}"
    print(head)
    print("-" * len(head))
    for matrix, method, rank, secs, err in rows:
        print(f"{matrix:<26} {method:<34} {rank:>5} {secs:>9.4f} {err:>11.3e}")
    print(
        "\nrel. error = ||A - A_k||_2 / ||A||_2; for the exact rows it is the optimal "
        "rank-k error sigma_{k+1} / sigma_1."
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lowrank_nla")
    sub = parser.add_subparsers(dest="command", required=True)
    p_demo = sub.add_parser("demo", help="decompose generated matrices and compare with NumPy")
    p_demo.add_argument("--n", type=int, default=1500, help="matrix size (default 1500)")
    p_demo.add_argument("--rank", type=int, default=100, help="target rank (default 100)")
    p_demo.add_argument("--dtype", choices=("float32", "float64"), default="float64")
    p_demo.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if not 1 <= args.rank < args.n:
        parser.error(f"--rank must be in [1, n), got {args.rank} with n = {args.n}")
    if args.seed < 0:
        parser.error(f"--seed must be a non-negative integer, got {args.seed}")
    print(f"lowrank_nla demo: n = {args.n}, rank = {args.rank}, {args.dtype}, seed {args.seed}\n")
    _print_table(demo(args.n, args.rank, args.dtype, args.seed))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
