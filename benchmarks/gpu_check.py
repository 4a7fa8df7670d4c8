"""One-command GPU validation: the gpu-marked tests and reduced CUDA benchmark columns.

Run from the repository root on a machine with one CUDA device (CuPy optional)::

    python benchmarks/gpu_check.py            # about 3-6 minutes on one GPU
    python benchmarks/gpu_check.py --quick    # tiny sizes
    python benchmarks/gpu_check.py --device cpu --quick   # CPU dry run of every part

Parts (each writes ``benchmarks/results/gpu_<part>.md`` and ``.json`` under ``--out``):

1. ``tests``: ``pytest -m gpu`` over ``tests/`` (the CuPy and torch-CUDA cells of the backend
   matrix and the other gpu-marked tests); the table lists passed, failed and skipped tests.
2. ``nla_decompositions``: the torch columns of ``benchmarks/nla_decompositions.py`` on the
   device at reduced sizes: ``torch.svd_lowrank`` and ``torch.linalg.eigh`` against ours on
   the same tensors (``randomized_eigh``, ``srevd``, ``nystrom`` on a K-factor-like PSD
   matrix, ``randomized_svd`` with subspace iteration and block Krylov on a slowly decaying
   dense one), accuracy first (float64 on the host), then time (device synchronized,
   alternating, median).
3. ``nla_updates``: ``brand_update`` vs ``randomized_eigh``/``srevd`` refreshes vs
   ``torch.linalg.eigh``, and ``damped_inverse_apply`` vs a Cholesky solve, on the device.
4. ``kfac_scaling``: ``benchmarks/kfac_scaling.py --device <device>`` at reduced widths.

Without a CUDA device (and ``--device cuda``, the default) every part is skipped with a
message and nothing is written: results are never invented. ``--device cpu`` runs every
part on the CPU (the gpu-marked tests then skip themselves), which is how the smoke test
exercises this script.
"""

from __future__ import annotations

import os

os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "4")

import argparse
import json
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RESULTS = HERE / "results"
sys.path.insert(0, str(HERE))

import nla_decompositions as decomp  # noqa: E402
import nla_updates as updates  # noqa: E402

import lowrank_nla as ln  # noqa: E402
from lowrank_nla.testing import ea_factor, matrix_with_spectrum  # noqa: E402

SEED = 0


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _alternate(
    methods: dict[str, Callable[[], Any]], repeats: int, device: torch.device
) -> dict[str, float]:
    """Median wall time of each method, all alternating in each round, device synchronized."""
    for fn in methods.values():  # warm-up: kernels, workspaces, cuSOLVER handles
        fn()
    times: dict[str, list[float]] = {name: [] for name in methods}
    for _ in range(repeats):
        for name, fn in methods.items():
            _sync(device)
            start = time.perf_counter()
            fn()
            _sync(device)
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def _write(out: Path, part: str, payload: dict[str, Any], table: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / f"gpu_{part}.json").write_text(json.dumps(payload, indent=1, default=float))
    (out / f"gpu_{part}.md").write_text(table)
    print(table, flush=True)


def _header(title: str, device: torch.device) -> list[str]:
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU (dry run)"
    return [f"# {title}", "", f"Device: {name}; torch {torch.__version__}.", ""]


# --------------------------------------------------------------------------- parts


def part_tests(device: torch.device, quick: bool, out: Path) -> None:
    """``pytest -m gpu``: every gpu-marked test, with its outcome."""
    targets = ["tests/lowrank_nla/test_errors.py"] if quick else ["tests"]
    cmd = [sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-rA", "-p", "no:cacheprovider"]
    start = time.perf_counter()
    proc = subprocess.run([*cmd, *targets], cwd=ROOT, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    outcomes: dict[str, list[str]] = {"PASSED": [], "FAILED": [], "SKIPPED": [], "ERROR": []}
    for line in proc.stdout.splitlines():
        m = re.match(r"^(PASSED|FAILED|SKIPPED|ERROR) (.*)$", line)
        if m:
            outcomes[m.group(1)].append(m.group(2))
    summary = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else proc.stderr
    counts = {word: int(n) for n, word in re.findall(r"(\d+) (\w+)", summary)}
    lines = _header("gpu-marked tests", device)
    lines += [
        f"`pytest -m gpu {' '.join(targets)}`: exit code {proc.returncode}, {seconds:.0f} s; "
        f"{summary.strip('= ')}",
        "",
        "| outcome | count |",
        "|---|---|",
        *(
            f"| {k} | {counts.get(k, 0)} |"
            for k in ("passed", "failed", "skipped", "error", "deselected")
        ),
    ]
    if outcomes["FAILED"] or outcomes["ERROR"]:
        lines += ["", "Failures:", "", *(f"- {t}" for t in outcomes["FAILED"] + outcomes["ERROR"])]
    if outcomes["SKIPPED"]:
        reasons = sorted({s.split(": ", 1)[-1] for s in outcomes["SKIPPED"]})
        lines += ["", "Skip reasons:", "", *(f"- {r}" for r in reasons)]
    payload = {
        "command": [*cmd, *targets],
        "returncode": proc.returncode,
        "counts": counts,
        **outcomes,
    }
    _write(out, "tests", payload, "\n".join(lines) + "\n")


def part_decompositions(device: torch.device, quick: bool, out: Path) -> None:
    """Ours against torch.svd_lowrank / torch.linalg.eigh on the device, accuracy first."""
    n_psd, n_dense, repeats = (128, 128, 1) if quick else (4096, 4096, 5)
    k = min(220, n_psd // 4)
    rows = []
    cases = [
        ("EA factor (PSD)", ea_factor(n_psd, batch=32, steps=60, rng=SEED), True, "float32"),
        ("EA factor (PSD)", ea_factor(n_psd, batch=32, steps=60, rng=SEED), True, "float64"),
        (
            "dense, slow decay",
            matrix_with_spectrum(1.0 / np.sqrt(np.arange(1.0, n_dense + 1)), rng=SEED),
            False,
            "float64",
        ),
    ]
    for case, A64, psd, dtype in cases:
        At = torch.asarray(A64.astype(dtype), device=device)
        A_ref = A64.astype(dtype).astype(np.float64)
        norm = float(np.linalg.norm(A_ref, 2))
        s = np.linalg.svd(A_ref, compute_uv=False)
        peer_fn = lambda At=At: decomp._torch_svd_lowrank(At, k)  # noqa: E731
        peer_err = decomp.spectral_error(A_ref, norm, peer_fn())
        ours: dict[str, Callable[[], Any]] = {}
        if psd:
            for p, q in ((50, 1), (50, 2), (150, 1)):
                for name in ("randomized_eigh", "srevd", "nystrom"):
                    f = getattr(ln, name)
                    ours[f"{name}(p={p}, q={q}, cholqr2)"] = lambda f=f, p=p, q=q, At=At: f(
                        At, k, oversample=p, power_iters=q, normalizer="cholqr2", rng=SEED
                    )
        else:
            for p, q in ((10, 2), (10, 3), (50, 2)):
                ours[f"randomized_svd(p={p}, q={q}, cholqr2)"] = lambda p=p, q=q, At=At: (
                    ln.randomized_svd(
                        At, k, oversample=p, power_iters=q, normalizer="cholqr2", rng=SEED
                    )
                )
            for b, q in ((k + 40, 1), (k // 2 + 50, 2), (k // 2, 3), (3 * k // 8, 4)):
                ours[f"randomized_svd[block_krylov](block={b}, q={q}, cholqr2)"] = (
                    lambda b=b, q=q, At=At: ln.randomized_svd(
                        At,
                        k,
                        power_iters=q,
                        normalizer="cholqr2",
                        method="block_krylov",
                        block_size=b,
                        rng=SEED,
                    )
                )
        errors = {name: decomp.spectral_error(A_ref, norm, fn()) for name, fn in ours.items()}
        accurate = {name: fn for name, fn in ours.items() if errors[name] <= peer_err}
        timed = {"torch.svd_lowrank": peer_fn, **accurate}
        if psd:
            timed["torch.linalg.eigh"] = lambda At=At: torch.linalg.eigh(At)
        times = _alternate(timed, repeats, device)
        best = min(accurate, key=lambda n: times[n]) if accurate else None
        rows.append(
            {
                "case": case,
                "n": A64.shape[0],
                "dtype": dtype,
                "rank": k,
                "optimal_error": float(s[k] / s[0]),
                "peer_error": peer_err,
                "errors": errors,
                "times": times,
                "ours": best,
                "ratio": times[best] / times["torch.svd_lowrank"] if best else None,
            }
        )
    lines = _header("lowrank_nla decompositions vs torch on the device", device)
    lines += [
        "Error: relative spectral error (float64, host). Ours: fastest configuration at least "
        "as accurate as torch.svd_lowrank (niter=2, q=k+10). Time: median of alternating "
        f"synchronized runs ({repeats} rounds).",
        "",
        "| case | n | dtype | k | optimal | torch.svd_lowrank error | [s] | ours | error | [s] "
        "| ratio | torch.linalg.eigh [s] |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        b = r["ours"]
        eigh = r["times"].get("torch.linalg.eigh")
        lines.append(
            f"| {r['case']} | {r['n']} | {r['dtype']} | {r['rank']} | {r['optimal_error']:.3e} "
            f"| {r['peer_error']:.3e} | {r['times']['torch.svd_lowrank']:.4f} "
            f"| `{b or 'none as accurate'}` | "
            + (
                f"{r['errors'][b]:.3e} | {r['times'][b]:.4f} | **{r['ratio']:.2f}**"
                if b
                else "- | - | -"
            )
            + f" | {'-' if eigh is None else format(eigh, '.4f')} |"
        )
    _write(out, "nla_decompositions", {"rows": rows}, "\n".join(lines) + "\n")


def part_updates(device: torch.device, quick: bool, out: Path) -> None:
    """Brand update vs randomized refresh vs torch.linalg.eigh, and inverse application."""
    sizes, repeats, rank = ([128], 1, 20) if quick else ([1024, 2048, 4096], 5, updates.RANK)
    rows = []
    for dtype in ("float32", "float64"):
        tdtype = getattr(torch, dtype)
        for D in sizes:
            blocks = updates.stream(D, dtype, np.random.default_rng(SEED))
            M64 = updates.exact_ea(blocks)
            norm = float(np.linalg.eigvalsh(M64)[-1])
            w_exact = np.linalg.eigvalsh(M64)[::-1]
            M = torch.asarray(M64.astype(dtype), device=device)
            Xs = [torch.asarray(b, device=device) for b in blocks]
            state = ln.LowRankPSD(
                torch.zeros((D, 0), dtype=tdtype, device=device),
                torch.zeros(0, dtype=tdtype, device=device),
            )
            for X in Xs:
                state = ln.brand_update(state, X, decay=updates.DECAY, rank=rank).state
            gen = torch.Generator(device=device).manual_seed(SEED)
            refresh = {
                "randomized_eigh": lambda M=M, g=gen: ln.randomized_eigh(
                    M, rank, rng=g, check_symmetric=False
                ),
                "srevd": lambda M=M, g=gen: ln.srevd(M, rank, rng=g, check_symmetric=False),
            }
            errors = {
                "optimal": float(w_exact[rank] / w_exact[0]),
                "brand (100 updates)": updates.rel_error(M64, norm, state),
                **{n: updates.rel_error(M64, norm, f()) for n, f in refresh.items()},
            }
            lam = 1e-3 * float(state.d[0])
            V = torch.randn(D, D, dtype=tdtype, device=device, generator=gen)
            dense = state.to_dense() + lam * torch.eye(D, dtype=tdtype, device=device)
            ours_apply = ln.damped_inverse_apply(state, V, damping=lam)
            ref = torch.cholesky_solve(V.double(), torch.linalg.cholesky(dense.double()))
            agreement = float(
                torch.linalg.norm(ours_apply.double() - ref) / torch.linalg.norm(ref)
            )
            times = _alternate(
                {
                    "brand_update": lambda s=state, X=Xs[-1]: ln.brand_update(
                        s, X, decay=updates.DECAY, rank=rank
                    ),
                    **refresh,
                    "torch.linalg.eigh": lambda M=M: torch.linalg.eigh(M),
                    "damped_inverse_apply": lambda s=state, V=V, lam=lam: ln.damped_inverse_apply(
                        s, V, damping=lam
                    ),
                    "torch cholesky + cholesky_solve": lambda d=dense, V=V: torch.cholesky_solve(
                        V, torch.linalg.cholesky(d)
                    ),
                },
                repeats,
                device,
            )
            rows.append(
                {"D": D, "dtype": dtype, "errors": errors, "times": times, "agreement": agreement}
            )
    lines = _header("Brand updates, refreshes and inverse application on the device", device)
    lines += [
        f"Rank {rank}, 100 updates of {updates.BATCH} columns (decay {updates.DECAY}); errors "
        "relative spectral (float64, host); times median of alternating synchronized runs.",
        "",
        "| D | dtype | optimal | brand error | randomized_eigh error | srevd error "
        "| brand_update [s] | randomized_eigh [s] | srevd [s] | torch.linalg.eigh [s] "
        "| damped_inverse_apply [s] | Cholesky solve [s] | agreement |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        e, t = r["errors"], r["times"]
        lines.append(
            f"| {r['D']} | {r['dtype']} | {e['optimal']:.3e} | {e['brand (100 updates)']:.3e} "
            f"| {e['randomized_eigh']:.3e} | {e['srevd']:.3e} | {t['brand_update']:.4f} "
            f"| {t['randomized_eigh']:.4f} | {t['srevd']:.4f} | {t['torch.linalg.eigh']:.4f} "
            f"| {t['damped_inverse_apply']:.4f} | {t['torch cholesky + cholesky_solve']:.4f} "
            f"| {r['agreement']:.1e} |"
        )
    _write(out, "nla_updates", {"rank": rank, "rows": rows}, "\n".join(lines) + "\n")


def part_kfac_scaling(device: torch.device, quick: bool, out: Path) -> None:
    """``kfac_scaling.py`` on the device at reduced widths, its tables renamed gpu_*."""
    widths = ["64", "128"] if quick else ["512", "1024", "2048", "4096"]
    tmp = out / "_kfac_scaling_tmp"
    cmd = [
        sys.executable,
        str(HERE / "kfac_scaling.py"),
        "--device",
        str(device),
        "--widths",
        *widths,
        "--repeats",
        "1" if quick else "3",
        "--out",
        str(tmp),
    ]
    if quick:
        cmd.append("--quick")
    subprocess.run(cmd, cwd=ROOT, check=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    produced = sorted(tmp.glob("kfac_scaling*.md"))
    if len(produced) != 1:
        raise RuntimeError(f"kfac_scaling.py wrote {produced}, expected one table")
    stem = produced[0].with_suffix("")
    (out / "gpu_kfac_scaling.md").write_text(stem.with_suffix(".md").read_text())
    (out / "gpu_kfac_scaling.json").write_text(stem.with_suffix(".json").read_text())
    for f in tmp.iterdir():
        f.unlink()
    tmp.rmdir()
    print((out / "gpu_kfac_scaling.md").read_text(), flush=True)


PARTS = {
    "tests": part_tests,
    "nla_decompositions": part_decompositions,
    "nla_updates": part_updates,
    "kfac_scaling": part_kfac_scaling,
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu (dry run)")
    parser.add_argument("--quick", action="store_true", help="tiny sizes")
    parser.add_argument("--parts", nargs="+", choices=list(PARTS), default=list(PARTS))
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        for part in args.parts:
            print(
                f"gpu_check: {part}: SKIPPED, no CUDA device (torch.cuda.is_available() is False)"
            )
        print("gpu_check: nothing run, nothing written")
        return 0
    start = time.perf_counter()
    for part in args.parts:
        t0 = time.perf_counter()
        PARTS[part](device, args.quick, args.out)
        print(f"gpu_check: {part} done in {time.perf_counter() - t0:.0f} s", flush=True)
    print(f"gpu_check: all parts done in {time.perf_counter() - start:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
