"""MBF (mini-block Fisher) against Adam, K-FAC, the best low-rank K-FAC variant and Shampoo.

Three tasks on the bundled digits (28x28): the deep autoencoder at width 1 and 2 trained to
the training-loss target of kfac_time_to_target.py (0.045), and the CNN (target test accuracy
0.9). Every optimizer starts from the same weights and sees the same batches for a given
seed. Times count training steps only (evaluations excluded). Also records the memory of the
curvature statistics per layer, MBF against K-FAC.

    python benchmarks/kfac_mbf.py                    # seeds 0, 1, 2
    python benchmarks/kfac_mbf.py --seeds 0          # one seed
    python benchmarks/kfac_mbf.py --quick            # smoke run
    python benchmarks/kfac_mbf.py --timing           # interleaved time per step only

On a shared machine the load changes between runs; ``--timing`` alternates the optimizers
step by step on the same batch (round robin, after a warm-up), so that each sees the same
load, on one thread, and reports the mean process CPU time per step of each and its ratio to
Adam per seed (kfac_mbf_timing.{json,md}).

Shampoo is ``pytorch_optimizer.Shampoo`` (the ``bench`` extra); it is skipped, and said so,
when the package is missing. Writes benchmarks/results/kfac_mbf.{json,md}.
"""

from __future__ import annotations

import os

os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "4")  # numpy, scipy and torch BLAS on 2 cores

import argparse
import json
import platform
import statistics
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from torch import nn

import kfac
from kfac import data, models
from kfac.__main__ import RunConfig, RunResult, _make_optimizer, train

#: MBF's settings: the library's defaults (block size 4, statistics and refresh every 20
#: steps), chosen by measurement (docs/guide/optimizers.md, *Mini-block Fisher (MBF)*).
MBF = {
    "lr": 0.3,
    "damping": 0.1,
    "factor_every": 20,
    "inverse_every": 20,
    "inverse_options": {"block_size": 4},
}
#: The cheaper end of the measured trade-off (statistics and refresh every 50 steps).
MBF_LEAN = {**MBF, "factor_every": 50, "inverse_every": 50}
#: The former defaults (block size 8, statistics and refresh every 10 steps).
MBF_B8_P10 = {"factor_every": 10, "inverse_every": 10, "inverse_options": {"block_size": 8}}
#: name: (command-line optimizer, RunConfig overrides); ``None``: built here (Shampoo).
CONFIGS: dict[str, tuple[str | None, dict[str, Any]]] = {
    "adam": ("adam", {}),
    "kfac": ("kfac", {}),
    "bkfac-batch-clock": ("bkfac", {"inverse_options": {"identity_clock": "batches"}}),
    "mbf": ("mbf", MBF),
    "shampoo": (None, {}),
    "mbf-p50": ("mbf", MBF_LEAN),
    "mbf-b8-p10": ("mbf", {**MBF, **MBF_B8_P10}),
}
#: What runs unless ``--optimizers`` says otherwise.
DEFAULT_OPTIMIZERS = ["adam", "kfac", "bkfac-batch-clock", "mbf", "shampoo"]
#: lr 0.01: the best of the peers benchmark's grid on the autoencoders (kfac_peers.md; at
#: 1e-3 its SVD fails to converge on the width-1 autoencoder).
SHAMPOO = {"lr": 1e-2, "preconditioning_compute_steps": 10}
TASKS = {
    # name: (model, width, epochs, target loss, target accuracy)
    "autoencoder-w1": ("autoencoder", 1.0, 10, 0.045, None),
    "autoencoder-w2": ("autoencoder", 2.0, 10, 0.045, None),
    "cnn": ("cnn", 1.0, 6, None, 0.9),
}
QUICK_TASKS = {
    "autoencoder-w1": ("autoencoder", 0.1, 1, 0.2, None),
    "autoencoder-w2": ("autoencoder", 0.2, 1, 0.2, None),
    "cnn": ("cnn", 0.25, 1, None, 0.0),
}


def shampoo_factory() -> Any:
    """``pytorch_optimizer.Shampoo`` with :data:`SHAMPOO`, or ``None`` if not installed."""
    try:
        from pytorch_optimizer import Shampoo
    except ImportError:
        return None
    return lambda model: Shampoo(model.parameters(), **SHAMPOO)


def statistics_memory(model_name: str, width: float, ds: data.Dataset) -> list[dict[str, Any]]:
    """Bytes of the curvature statistics per layer after one step: MBF's mini-blocks (and
    their inverses) against K-FAC's factors (dense averages plus eigendecompositions)."""
    rows: dict[str, dict[str, Any]] = {}
    x = ds.x_train[:64]
    for name in ("mbf", "kfac"):
        torch.manual_seed(0)
        model = models.build(model_name, ds.image_shape, ds.num_classes, width)
        if name == "mbf":
            precond: kfac.Preconditioner = kfac.MBFPreconditioner(
                model, block_size=MBF["inverse_options"]["block_size"]
            )
        else:
            precond = kfac.KFACPreconditioner(model, factor_every=1, inverse_every=1)
        out = model(x)
        loss = (
            nn.functional.mse_loss(out, x.flatten(1))
            if model_name == "autoencoder"
            else nn.functional.cross_entropy(out, ds.y_train[:64])
        )
        loss.backward()
        precond.step()
        for row in precond.diagnostics():
            entry = rows.setdefault(row["layer"], {"layer": row["layer"]})
            layer = precond.layer(row["layer"])
            entry["shape"] = f"{layer.dim_G}x{layer.dim_A}"
            if name == "mbf":
                entry["mbf"] = entry.get("mbf", 0) + row["memory"]
                entry["mbf_inverse"] = entry.get("mbf_inverse", 0) + row["inverse_memory"]
                entry["blocks"] = entry.get("blocks", 0) + row["blocks"]
            else:
                entry["kfac"] = entry.get("kfac", 0) + row["memory"]
        precond.remove()
    return list(rows.values())


def interleaved_times(
    task: tuple[Any, ...], names: list[str], shampoo: Any, steps: int, warmup: int, seed: int
) -> dict[str, float]:
    """Mean process CPU seconds per step of each optimizer, stepping them round robin on one
    batch of 128 (drawn with ``seed``; the models start from the weights of ``seed``)."""
    model_name, width = task[0], task[1]
    ds = data.digits28()
    index = torch.randperm(ds.x_train.shape[0], generator=torch.Generator().manual_seed(seed))
    x, y = ds.x_train[index[:128]], ds.y_train[index[:128]]
    runs = []
    for name in names:
        torch.manual_seed(seed)
        model = models.build(model_name, ds.image_shape, ds.num_classes, width)
        base, overrides = CONFIGS[name]
        if base is None:
            opt = shampoo(model)
        else:
            cfg = RunConfig(**{"optimizer": base, "model": model_name, **overrides})
            loss_name = models.MODELS[model_name][1]
            opt = _make_optimizer(base, model, cfg, loss_name)
        runs.append((name, model, opt))
    totals = dict.fromkeys(names, 0.0)
    for step in range(warmup + steps):
        for name, model, opt in runs:
            start = time.process_time()
            opt.zero_grad()
            out = model(x)
            loss = (
                nn.functional.mse_loss(out, x.flatten(1))
                if model_name == "autoencoder"
                else nn.functional.cross_entropy(out, y)
            )
            loss.backward()
            opt.step()
            if step >= warmup:
                totals[name] += time.process_time() - start
    return {name: total / steps for name, total in totals.items()}


def timing_summary(per_seed: list[dict[str, float]]) -> dict[str, dict[str, float]]:
    """Mean time per step and the mean and spread of each seed's ratio to Adam."""
    out = {}
    for name in per_seed[0]:
        ratios = [row[name] / row["adam"] for row in per_seed]
        out[name] = {
            "time_per_step": statistics.mean(row[name] for row in per_seed),
            "ratio": statistics.mean(ratios),
            "ratio_std": statistics.pstdev(ratios),
        }
    return out


def timing_markdown(times: dict[str, dict[str, dict[str, float]]], meta: dict[str, Any]) -> str:
    names = list(next(iter(times.values())))
    lines = [
        "# MBF: time per step, optimizers interleaved",
        "",
        f"{meta['device']}; torch {meta['torch']}; one thread; seeds {meta['seeds']}; "
        f"{meta['steps']} steps per optimizer after {meta['warmup']} warm-up steps, the "
        "optimizers stepping round robin on one batch of 128 (each sees the same machine "
        "load); process CPU time; every statistics period and refresh period divides the step "
        "count. Milliseconds per step (mean over seeds), then the ratio to Adam (mean ± "
        f"spread over seeds). {meta['load']}.",
        "",
        "| task | " + " | ".join(names) + " |",
        "|---|" + "---|" * len(names),
    ]
    for task, rows in times.items():
        cells = [
            f"{1e3 * rows[n]['time_per_step']:.1f} ({rows[n]['ratio']:.2f} ± "
            f"{rows[n]['ratio_std']:.2f})"
            for n in names
        ]
        lines.append(f"| {task} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def summarize(runs: list[RunResult]) -> dict[str, Any]:
    per_step = [r.time_per_step for r in runs]
    reached = [r.time_to_target for r in runs if r.time_to_target is not None]
    final_acc = [r.test_accuracy[-1] for r in runs if r.test_accuracy[-1] is not None]
    return {
        "time_per_step": statistics.mean(per_step),
        "time_per_step_std": statistics.pstdev(per_step),
        "time_to_target": statistics.mean(reached) if len(reached) == len(runs) else None,
        "reached": f"{len(reached)}/{len(runs)}",
        "final_loss": statistics.mean(r.train_loss[-1] for r in runs),
        "final_accuracy": statistics.mean(final_acc) if final_acc else None,
    }


def _mib(value: int | None) -> str:
    return "-" if value is None else f"{value / 2**20:.2f}"


def markdown(results: dict[str, Any], memory: dict[str, Any], meta: dict[str, Any]) -> str:
    lines = [
        "# MBF against Adam, K-FAC, the best low-rank K-FAC variant and Shampoo",
        "",
        f"{meta['device']}; torch {meta['torch']}; one thread; seeds {meta['seeds']}; whole "
        f"run {meta['seconds']:.0f} s (wall); {meta['note']}. Times are process CPU seconds "
        "of the training steps (evaluations excluded), robust to the shared machine's load. "
        "Means over seeds; ratios are to Adam. Time to target is reported only when every "
        "seed reached it.",
        "",
        f"MBF: {json.dumps(MBF)} (block_size is the Linear chunk; Conv2d blocks are kernels; "
        "mbf-p50: statistics and refresh every 50 steps; mbf-b8-p10: the former defaults). "
        f"Shampoo: pytorch_optimizer.Shampoo {json.dumps(SHAMPOO)}. K-FAC and "
        "bkfac-batch-clock: the command line's defaults (damping 3e-3, KL clip 1e-4, "
        "factor_every 1, inverse_every 10).",
    ]
    for task, rows in results.items():
        _, width, epochs, target_loss, target_acc = meta["tasks"][task]
        target = (
            f"training loss <= {target_loss}"
            if target_loss is not None
            else f"test accuracy >= {target_acc}"
        )
        base = rows["adam"]
        lines += [
            "",
            f"## {task} (width {width}, {epochs} epochs, target: {target})",
            "",
            "| optimizer | time/step (ms) | vs Adam | time to target (s) | vs Adam | reached "
            "| final loss | final accuracy |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for name, row in rows.items():
            ratio = row["time_per_step"] / base["time_per_step"]
            ttt, base_ttt = row["time_to_target"], base["time_to_target"]
            ratio_ttt = "-" if ttt is None or not base_ttt else f"{ttt / base_ttt:.2f}"
            acc = "-" if row["final_accuracy"] is None else f"{row['final_accuracy']:.3f}"
            lines.append(
                f"| {name} | {1e3 * row['time_per_step']:.1f} ± "
                f"{1e3 * row['time_per_step_std']:.1f} | {ratio:.2f} | "
                f"{'-' if ttt is None else f'{ttt:.1f}'} | {ratio_ttt} | {row['reached']} | "
                f"{row['final_loss']:.4f} | {acc} |"
            )
        lines += [
            "",
            "Statistics memory per layer (MiB): MBF's mini-block averages (and their prepared "
            "inverses) against K-FAC's two factors (dense averages and eigendecompositions).",
            "",
            "| layer | d_G x d_A | MBF blocks | MBF statistics | MBF inverses | K-FAC factors |",
            "|---|---|---|---|---|---|",
        ]
        for row in memory[task]:
            lines.append(
                f"| {row['layer']} | {row['shape']} | {row.get('blocks', '-')} | "
                f"{_mib(row.get('mbf'))} | {_mib(row.get('mbf_inverse'))} | "
                f"{_mib(row.get('kfac'))} |"
            )
    return "\n".join(lines) + "\n"


def _device(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(0)
    return f"CPU ({platform.machine()}, {torch.get_num_threads()} threads)"


def write(
    args: argparse.Namespace,
    tasks: dict[str, Any],
    seeds: list[int],
    note: str,
    start: float,
    results: dict[str, Any],
    memory: dict[str, Any],
    histories: dict[str, Any],
    failures: dict[str, dict[str, str]],
) -> str:
    """Write the JSON and markdown records of the tasks done so far (after each task, so a
    long run that is stopped keeps what it measured); returns the markdown."""
    meta = {
        "device": _device(args.device),
        "torch": torch.__version__,
        "seeds": seeds,
        "seconds": time.perf_counter() - start,
        "tasks": {task: tasks[task] for task in results},
        "note": note,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = args.stem + ("_quick" if args.quick else "")
    payload = {
        "meta": meta, "summary": results, "memory": memory, "runs": histories,
        "failures": failures,
    }  # fmt: skip
    (out / f"{stem}.json").write_text(json.dumps(payload, indent=1))
    text = markdown(results, memory, meta)
    for task, failed in failures.items():
        text += (
            f"\nFailed runs on {task} (not summarised): "
            + "; ".join(f"{run}: {error}" for run, error in failed.items())
            + "\n"
        )
    (out / f"{stem}.md").write_text(text)
    return text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny models, one seed, smoke run")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS))
    parser.add_argument(
        "--optimizers", nargs="+", default=DEFAULT_OPTIMIZERS, choices=list(CONFIGS)
    )
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"))
    parser.add_argument("--timing", action="store_true", help="only the interleaved time per step")
    parser.add_argument("--stem", default="kfac_mbf", help="name of the result files")
    args = parser.parse_args()
    tasks = QUICK_TASKS if args.quick else TASKS
    seeds = [0] if args.quick else args.seeds
    names = list(args.optimizers)
    shampoo = shampoo_factory()
    note = "Shampoo included" if "shampoo" in names else "Shampoo not run (--optimizers)"
    if "shampoo" in names and shampoo is None:
        names.remove("shampoo")
        note = "Shampoo skipped: pytorch_optimizer is not installed"
    if args.timing:
        torch.set_num_threads(1)
        steps, warmup = (2, 1) if args.quick else (100, 10)
        load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
        times = {
            task: timing_summary(
                [interleaved_times(tasks[task], names, shampoo, steps, warmup, s) for s in seeds]
            )
            for task in args.tasks
        }
        meta = {"device": _device(args.device), "torch": torch.__version__, "steps": steps,
                "warmup": warmup, "note": note, "seeds": seeds,
                "load": f"load average {load:.1f} at the start"}  # fmt: skip
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        stem = "kfac_mbf_timing" + ("_quick" if args.quick else "")
        (out / f"{stem}.json").write_text(json.dumps({"meta": meta, "times": times}, indent=1))
        text = timing_markdown(times, meta)
        (out / f"{stem}.md").write_text(text)
        print(text)
        return
    torch.set_num_threads(1)  # process CPU time on one thread: robust to the machine's load
    ds = data.digits28()
    start = time.perf_counter()
    results: dict[str, Any] = {}
    histories: dict[str, Any] = {}
    memory: dict[str, Any] = {}
    failures: dict[str, dict[str, str]] = {}
    for task in args.tasks:
        model, width, epochs, target_loss, target_acc = tasks[task]
        runs: dict[str, list[RunResult]] = {name: [] for name in names}
        for seed in seeds:
            for name in names:  # alternate optimizers within a seed
                base, overrides = CONFIGS[name]
                cfg = RunConfig(
                    **{"optimizer": base or name, "label": name, "model": model,
                       "epochs": epochs, "width": width, "seed": seed, "device": args.device,
                       "target_loss": target_loss, "target_accuracy": target_acc,
                       "max_train": 256 if args.quick else None, **overrides},
                )  # fmt: skip
                factory = shampoo if name == "shampoo" else None
                try:
                    result = train(
                        cfg, ds, progress=False, make_optimizer=factory, timer=time.process_time
                    )
                except (torch.linalg.LinAlgError, FloatingPointError) as exc:
                    failures.setdefault(task, {})[f"{name} seed {seed}"] = (
                        f"{type(exc).__name__}: {str(exc)[:120]}"
                    )
                    print(f"{task} seed {seed} {name}: failed ({exc})", flush=True)
                    continue
                runs[name].append(result)
                print(
                    f"{task} seed {seed} {name:18s}: {1e3 * result.time_per_step:7.1f} ms/step, "
                    f"final loss {result.train_loss[-1]:.4f}, time to target "
                    f"{result.time_to_target}",
                    flush=True,
                )
            # written after every seed: a long run that is stopped keeps what it measured
            results[task] = {name: summarize(rs) for name, rs in runs.items() if rs}
            histories[task] = {name: [asdict(r) for r in rs] for name, rs in runs.items()}
            if task not in memory:
                memory[task] = statistics_memory(model, width, ds)
            done = seeds[: seeds.index(seed) + 1]
            text = write(args, tasks, done, note, start, results, memory, histories, failures)
    print(text)


if __name__ == "__main__":
    main()
