"""Per-layer cost of K-FAC's inverse refresh and application against the layer width.

For square Linear layers of width D (512 ... 8192), batch n = 128 and rank r = 220 (the
thesis' class default), times one refresh of one factor with each strategy, one Brand
update, and one application of the damped inverse to a D x D gradient, on the same
exponentially averaged factor, in one process, alternating; then fits the exponent of each
cost in D. Accuracy is checked first: the relative spectral error of each representation
against the factor (Lanczos on the residual), next to the optimal rank-r error.

    python benchmarks/kfac_scaling.py            # full run (several minutes on 2 cores)
    python benchmarks/kfac_scaling.py --quick    # smoke run, seconds
    python benchmarks/kfac_scaling.py --device cuda

Writes benchmarks/results/kfac_scaling.{json,md} (``--out`` to change the folder).
"""

from __future__ import annotations

import os

os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "4")  # numpy, scipy and torch BLAS on 2 cores

import argparse
import json
import math
import platform
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

import lowrank_nla as ln

RANK, BATCH = 220, 128


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def ea_factor(D: int, device: torch.device, dtype: torch.dtype, steps: int = 8) -> torch.Tensor:
    """EA (rho 0.95) of `steps` batches of n = 128 inputs with a power-law covariance."""
    g = torch.Generator(device=device).manual_seed(D)
    scale = torch.arange(1, D + 1, device=device, dtype=dtype) ** -0.5
    M = torch.zeros(D, D, device=device, dtype=dtype)
    for _ in range(steps):
        Z = torch.randn(D, BATCH, generator=g, device=device, dtype=dtype) * scale[:, None]
        M.mul_(0.95).add_(Z @ Z.T / BATCH, alpha=0.05)
    return (M + M.T) / 2


def timed(device: torch.device, fn: Any, *args: Any, **kwargs: Any) -> tuple[Any, float]:
    """``fn(*args, **kwargs)`` and its wall time (device synchronized)."""
    sync(device)
    start = time.perf_counter()
    out = fn(*args, **kwargs)
    sync(device)
    return out, time.perf_counter() - start


def rel_error(M: torch.Tensor, rep: ln.LowRankPSD) -> float:
    """||M - U diag(d) U^T||_2 / ||M||_2 by Lanczos on the operator (float64)."""
    M64 = M.double()
    U, d = rep.U.double(), rep.d.double()

    class Residual:
        shape = M64.shape
        dtype = M64.dtype

        def __matmul__(self, V: torch.Tensor) -> torch.Tensor:
            return M64 @ V - U @ (d[:, None] * (U.T @ V))

        @property
        def T(self) -> Residual:  # the residual is symmetric
            return self

    top = float(ln.estimate_spectral_norm(M64, n_iter=30, symmetric=True, rng=0))
    err = float(ln.estimate_spectral_norm(Residual(), n_iter=30, symmetric=True, rng=0))
    return err / top


def fit_exponent(widths: list[int], times: list[float]) -> float:
    slope, _ = np.polyfit(np.log(widths), np.log(times), 1)
    return float(slope)


def run(
    widths: list[int], repeats: int, device: torch.device, dtype: torch.dtype
) -> dict[str, Any]:
    # What each kfac strategy runs on a refresh, with its defaults (kfac's inverse="eigh",
    # "rsvd" with the Rayleigh-Ritz finish and q = 3, "srevd" with q = 4 and reorth_every 2).
    sketch = torch.Generator(device=device).manual_seed(0)
    strategies = {
        "eigh": lambda X: ln.LowRankPSD(*reversed(ln.partial_eigh(X, X.shape[0]))),
        "rsvd": lambda X: ln.LowRankPSD(
            *reversed(
                ln.randomized_eigh(
                    X, min(RANK, X.shape[0]), oversample=10, power_iters=3, rng=sketch,
                    check_symmetric=False,
                )
            )
        ),
        "srevd": lambda X: ln.LowRankPSD(
            *reversed(
                ln.srevd(
                    X, min(RANK, X.shape[0]), oversample=10, power_iters=4, reorth_every=2,
                    rng=sketch, check_symmetric=False,
                )
            )
        ),
    }  # fmt: skip
    rows = []
    warm = ea_factor(64, device, dtype)
    for strategy in strategies.values():  # first-call overheads (threads, kernels) out
        strategy(warm)
    for D in widths:
        M = ea_factor(D, device, dtype)
        factor = M
        reps, times = (
            {},
            {
                name: []
                for name in [*strategies, "brand", "apply-eigh", "apply-lowrank", "apply-factored"]
            },
        )
        # Brand state: the rank-r truncation of M, updated with one new batch
        g = torch.Generator(device=device).manual_seed(7)
        block = torch.randn(D, BATCH, generator=g, device=device, dtype=dtype) / math.sqrt(BATCH)
        grad = torch.randn(D, D, generator=g, device=device, dtype=dtype)
        inputs = torch.randn(D, BATCH, generator=g, device=device, dtype=dtype)
        outputs = torch.randn(D, BATCH, generator=g, device=device, dtype=dtype)
        for r in range(repeats):
            for name, strategy in strategies.items():
                if name == "eigh" and D >= 8192 and r > 0:
                    continue  # one O(D^3) decomposition at the largest width is enough
                rep, t = timed(device, strategy, factor)
                reps[name] = rep
                times[name].append(t)
            state = reps["srevd"].truncate(RANK)
            _, t = timed(device, ln.brand_update, state, block, decay=0.95, rank=RANK)
            times["brand"].append(t)
            full = reps["eigh"]
            _, t = timed(
                device, ln.kron_inverse_apply, full, full, grad, damping=0.1, relative=True
            )
            times["apply-eigh"].append(t)
            low = reps["srevd"]
            _, t = timed(
                device, ln.kron_inverse_apply, low, low, grad, damping=0.1, relative=True,
                continuation=True,
            )  # fmt: skip
            times["apply-lowrank"].append(t)
            _, t = timed(
                device, ln.kron_inverse_apply_factored, low, low, outputs, inputs,
                damping=0.1, relative=True, continuation=True,
            )  # fmt: skip
            times["apply-factored"].append(t)
        w = reps["eigh"].d
        optimal = float(w[RANK] / w[0])
        errors = {name: rel_error(M, reps[name].truncate(RANK)) for name in ("rsvd", "srevd")}
        errors["eigh"] = rel_error(M, reps["eigh"].truncate(RANK))
        itemsize = torch.finfo(dtype).bits // 8
        rows.append(
            {
                "D": D,
                "optimal_error": optimal,
                "errors": errors,
                "seconds": {k: statistics.median(v) for k, v in times.items()},
                "memory_bytes": {
                    "dense EA + eigh": 2 * D * D * itemsize,
                    "dense EA + rank r": (D * D + D * RANK) * itemsize,
                    "Brand only": (D * RANK + RANK) * itemsize,
                },
            }
        )
        print(
            f"D={D:5d}  "
            + "  ".join(f"{k} {v * 1e3:9.2f} ms" for k, v in rows[-1]["seconds"].items()),
            flush=True,
        )
    fits = {}
    for key in rows[0]["seconds"]:
        ts = [row["seconds"][key] for row in rows]
        fits[key] = {
            "exponent": fit_exponent(widths, ts),
            "last_slope": fit_exponent(widths[-2:], ts[-2:]) if len(widths) > 1 else float("nan"),
        }
    return {"rows": rows, "fits": fits}


def markdown(result: dict[str, Any], meta: dict[str, Any]) -> str:
    rows, fits = result["rows"], result["fits"]
    keys = list(rows[0]["seconds"])
    lines = [
        "# K-FAC per-layer cost against width",
        "",
        f"{meta['device']}; torch {meta['torch']}; {meta['dtype']}; n = {BATCH}, r = {RANK}; "
        f"whole run {meta['seconds']:.0f} s. Median of {meta['repeats']} runs (eigh once at "
        "D = 8192). Refresh = one factor; Brand = one update of a rank-r state with n "
        "columns; apply = one D x D gradient through both factors (eigh: full eigenbasis; "
        "low rank: rank r + continuation; factored: from the n per-sample rows, no gradient "
        "formed).",
        "",
        "Accuracy first (relative spectral error of the rank-r representation; optimal = "
        "lambda_{r+1}/lambda_1):",
        "",
        "| D | optimal | eigh (top r) | rsvd | srevd |",
        "|---|---|---|---|---|",
    ]
    for row in rows:
        e = row["errors"]
        lines.append(
            f"| {row['D']} | {row['optimal_error']:.2e} | {e['eigh']:.2e} | {e['rsvd']:.2e} | "
            f"{e['srevd']:.2e} |"
        )
    lines += [
        "",
        "Time (ms):",
        "",
        "| D | " + " | ".join(keys) + " |",
        "|---" * (len(keys) + 1) + "|",
    ]
    for row in rows:
        lines.append(
            f"| {row['D']} | " + " | ".join(f"{row['seconds'][k] * 1e3:.2f}" for k in keys) + " |"
        )
    lines.append(
        "| fitted exponent | " + " | ".join(f"{fits[k]['exponent']:.2f}" for k in keys) + " |"
    )
    lines.append(
        "| slope, last two widths | "
        + " | ".join(f"{fits[k]['last_slope']:.2f}" for k in keys)
        + " |"
    )
    lines += [
        "",
        "Memory per factor (MB):",
        "",
        "| D | dense EA + eigh | dense EA + rank r | Brand only |",
        "|---|---|---|---|",
    ]
    for row in rows:
        m = row["memory_bytes"]
        lines.append(
            f"| {row['D']} | {m['dense EA + eigh'] / 1e6:.1f} | "
            f"{m['dense EA + rank r'] / 1e6:.1f} | {m['Brand only'] / 1e6:.2f} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny widths, smoke run")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--widths", type=int, nargs="+", help="layer widths D (default 512 ... 8192)"
    )
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = parser.parse_args()
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    global RANK, BATCH
    if args.quick:
        widths, RANK, BATCH, repeats = [64, 128], 20, 16, 1
    else:
        widths, repeats = [512, 1024, 2048, 4096, 8192], args.repeats
    if args.widths:
        widths = args.widths
    torch.manual_seed(0)
    start = time.perf_counter()
    result = run(widths, repeats, device, dtype)
    meta = {
        "device": torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"CPU ({platform.machine()}, {torch.get_num_threads()} threads)",
        "torch": torch.__version__,
        "dtype": args.dtype,
        "repeats": repeats,
        "seconds": time.perf_counter() - start,
        "rank": RANK,
        "batch": BATCH,
        "widths": widths,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = (
        "kfac_scaling_quick"
        if args.quick
        else "kfac_scaling" + ("_cuda" if device.type == "cuda" else "")
    )
    (out / f"{stem}.json").write_text(json.dumps({"meta": meta, **result}, indent=1))
    (out / f"{stem}.md").write_text(markdown(result, meta))
    print(markdown(result, meta))


if __name__ == "__main__":
    main()
