"""Time per epoch and time to target of every K-FAC variant against K-FAC, SGD and Adam.

Three tasks on the bundled digits (28x28): the deep autoencoder with wide layers (``--width
2``: factors of 2000-2001 for the largest layers) trained to a target training loss, and
the CNN and the row-sequence Transformer (``kfac.models.transformer``) trained to a target
test accuracy. Every optimizer starts from the same weights and
sees the same batches for a given seed; seeds 0, 1, 2. Times count training steps only
(evaluations excluded). Final values are checked next to the times (a fast optimizer that
ends worse is reported as such).

    python benchmarks/kfac_time_to_target.py                 # full run (long on 2 cores)
    python benchmarks/kfac_time_to_target.py --quick         # smoke run
    python benchmarks/kfac_time_to_target.py --device cuda

Writes benchmarks/results/kfac_time_to_target.{json,md} and one PNG per task.

``--peers`` runs the peers table instead: the family's configurations against the optimizers
users pick today (Adam, AdamW, and Muon, SOAP, PSGD Kron and Shampoo of ``pytorch-optimizer``,
the ``bench`` extra) on :data:`PEER_TASKS`, each optimizer at every rate of its grid
(:data:`GRIDS`, at most three values; one value, the command line's default, for a name
without a grid). Reported per task, for each optimizer at its best rate (lowest final
training loss, mean over seeds): the time to each loss level of the task, the loss at the
task's equal time (the shortest run's training time) and the time per step. Times are the
process's CPU seconds of the training steps (``time.process_time``; run with
``OMP_NUM_THREADS=1``: on a shared machine CPU time is what one thread's work costs), with the
wall time per step next to them::

    OMP_NUM_THREADS=1 python benchmarks/kfac_time_to_target.py --peers --seeds 0
    python benchmarks/kfac_time_to_target.py --peers --tasks cnn mlp --optimizers adam muon kfac
    python benchmarks/kfac_time_to_target.py --peers --config \
        'kfac-noclip={"optimizer": "kfac", "kl_clip": null}' --optimizers adam kfac-noclip

A new configuration is one entry of :data:`CONFIGS` (or one ``--config``): a command-line
optimizer name and the :class:`kfac.__main__.RunConfig` fields it changes (``kl_clip``,
``damping``, ``inverse_options`` with any other keyword of the optimizer, ...). Writes
benchmarks/results/kfac_peers.{json,md}.
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
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from kfac import data
from kfac.__main__ import DEFAULT_LR, PEERS, RunConfig, RunResult, optimizer_names, plot, train

#: The quadratic-model step's settings (RunConfig fields).
QUADRATIC: dict[str, Any] = {
    "quadratic_step": True,
    "adaptive_damping": True,
    "damping": 1e-4,
    "damping_scheme": "factored",
    "kl_clip": None,
    "momentum": 0.0,
}
#: Labelled configurations beyond the command line's names: name -> (command-line optimizer,
#: the RunConfig fields it sets; ``inverse_options`` reach the optimizer as keywords).
CONFIGS: dict[str, tuple[str, dict[str, Any]]] = {
    "bkfac-batch-clock": ("bkfac", {"inverse_options": {"identity_clock": "batches"}}),
    # the bias-corrected zero initialisation of the factors (not in the default list)
    "kfac-zero-init": ("kfac", {"inverse_options": {"factor_init": "zero"}}),
    "bkfac-batch-clock-zero-init": (
        "bkfac",
        {"inverse_options": {"identity_clock": "batches", "factor_init": "zero"}},
    ),
    # the quadratic-model step with adaptive damping, no clip, no momentum (the measured
    # settings of docs/kfac.md, "Steps without a clip"; the learning rate only scales)
    "bkfac-quadratic": (
        "bkfac",
        {
            **QUADRATIC,
            "inverse_options": {"rank": 64, "identity_clock": "batches", "factor_init": "zero"},
        },
    ),
    "kfac-quadratic": ("kfac", {**QUADRATIC, "inverse_options": {"factor_init": "zero"}}),
}
OPTIMIZERS = [
    "sgd", "adam", "adamw", "kfac", "rkfac", "srekfac", "bkfac", "brkfac", "bckfac", "brckfac",
    "bkfac-batch-clock",
]  # fmt: skip
TASKS = {
    # name: (model, width, epochs, target loss, target accuracy)
    "autoencoder": ("autoencoder", 2.0, 10, 0.045, None),
    "cnn": ("cnn", 1.0, 6, None, 0.9),
    "transformer": ("transformer", 1.0, 8, None, 0.7),
}


DEFAULT_STEM = "kfac_time_to_target"

#: The peers table's optimizers (``--peers``).
PEER_OPTIMIZERS = [
    "adam", "adamw", "muon", "soap", "psgd-kron", "shampoo", "kfac", "bkfac-batch-clock",
    "kfac-quadratic", "bkfac-quadratic",
]  # fmt: skip
#: Learning-rate grids of the peers table (at most three values each, around each library's
#: default); a name without a grid runs at the command line's default rate only.
GRIDS: dict[str, list[float]] = {
    "adamw": [3e-4, 1e-3, 3e-3],
    "muon": [2e-2, 5e-2, 1e-1],
    "soap": [1e-3, 3e-3, 1e-2],
    "psgd-kron": [3e-4, 1e-3, 3e-3],
    "shampoo": [1e-3, 3e-3, 1e-2],
}
#: The peers table's tasks: name -> (model, width, CPU-second budget of every run, training-loss
#: levels). Every run trains for the same budget of process CPU time (epochs without end), so
#: its final loss is its loss at equal time and its first passage below each level its time to
#: that level.
PEER_TASKS: dict[str, tuple[str, float, float, tuple[float, ...]]] = {
    "autoencoder-w1": ("autoencoder", 1.0, 20.0, (0.045, 0.03, 0.02, 0.01)),
    "autoencoder-w2": ("autoencoder", 2.0, 40.0, (0.045, 0.03, 0.02, 0.01)),
    "cnn": ("cnn", 1.0, 4.0, (0.5, 0.2, 0.1, 0.05)),
    "mlp": ("mlp", 1.0, 2.0, (0.5, 0.2, 0.1, 0.05)),
    "transformer": ("transformer", 1.0, 5.0, (1.0, 0.5, 0.3, 0.2)),
}
PEER_STEM = "kfac_peers"


def figure_name(task: str, stem: str, suffix: str) -> str:
    """``<task>_time_to_target[_quick].png`` for the default run, ``<task>_<stem>...`` else."""
    tag = "time_to_target" if stem == DEFAULT_STEM else stem
    return f"{task}_{tag}{suffix}.png"


def summarize(runs: list[RunResult], epochs: int) -> dict[str, Any]:
    per_epoch = [r.wall_time / epochs for r in runs]
    reached = [r.time_to_target for r in runs if r.time_to_target is not None]
    final_loss = [r.train_loss[-1] for r in runs]
    final_acc = [r.test_accuracy[-1] for r in runs if r.test_accuracy[-1] is not None]
    return {
        "time_per_epoch": statistics.mean(per_epoch),
        "time_per_epoch_std": statistics.pstdev(per_epoch),
        "time_to_target": statistics.mean(reached) if len(reached) == len(runs) else None,
        "reached": f"{len(reached)}/{len(runs)}",
        "final_loss": statistics.mean(final_loss),
        "final_accuracy": statistics.mean(final_acc) if final_acc else None,
    }


def markdown(results: dict[str, Any], meta: dict[str, Any]) -> str:
    lines = [
        "# Time to target: K-FAC variants vs K-FAC, SGD and Adam",
        "",
        f"{meta['device']}; torch {meta['torch']}; seeds {meta['seeds']}; whole run "
        f"{meta['seconds']:.0f} s. Means over seeds; ratios are to K-FAC (eigh). Time to target "
        "is reported only when every seed reached it.",
    ]
    for task, rows in results.items():
        _, width, epochs, target_loss, target_acc = meta["tasks"][task]
        target = (
            f"training loss <= {target_loss}"
            if target_loss is not None
            else f"test accuracy >= {target_acc}"
        )
        base = rows["kfac"]
        lines += [
            "",
            f"## {task} (width {width}, {epochs} epochs, target: {target})",
            "",
            "| optimizer | time/epoch (s) | vs K-FAC | time to target (s) | vs K-FAC | reached "
            "| final loss | final accuracy |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for name, row in rows.items():
            ratio_epoch = row["time_per_epoch"] / base["time_per_epoch"]
            ttt, base_ttt = row["time_to_target"], base["time_to_target"]
            ratio_ttt = "-" if ttt is None or not base_ttt else f"{ttt / base_ttt:.2f}"
            acc = "-" if row["final_accuracy"] is None else f"{row['final_accuracy']:.3f}"
            lines.append(
                f"| {name} | {row['time_per_epoch']:.2f} ± {row['time_per_epoch_std']:.2f} | "
                f"{ratio_epoch:.2f} | {'-' if ttt is None else f'{ttt:.1f}'} | {ratio_ttt} | "
                f"{row['reached']} | {row['final_loss']:.4f} | {acc} |"
            )
        lines += ["", f"![{task}]({figure_name(task, meta['stem'], meta['suffix'])})"]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny models, one seed, smoke run")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--tasks", nargs="+", default=None, help="default: every task")
    parser.add_argument("--optimizers", nargs="+", default=None, help="names or configs")
    parser.add_argument("--width", type=float, default=None, help="override the tasks' width")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"))
    parser.add_argument("--stem", default=None, help="name of the result files")
    parser.add_argument("--peers", action="store_true", help="the peers table (see above)")
    parser.add_argument(
        "--config",
        nargs="*",
        default=[],
        metavar="NAME=JSON",
        help='extra configurations, e.g. \'kfac-x={"optimizer": "kfac", "kl_clip": null}\'',
    )
    parser.add_argument(
        "--grid", nargs="*", default=[], metavar="NAME=LR,LR", help="override a rate grid"
    )
    parser.add_argument(
        "--budget", type=float, default=None, help="override the CPU seconds per run (--peers)"
    )
    parser.add_argument(
        "--merge",
        nargs="+",
        default=None,
        metavar="STEM",
        help="merge the peers results of earlier runs (in --out) into one table (--stem)",
    )
    args = parser.parse_args()
    configs = dict(CONFIGS)
    for spec in args.config:
        name, _, text = spec.partition("=")
        value = json.loads(text)
        if not isinstance(value, dict) or value.get("optimizer") not in optimizer_names():
            parser.error(f'--config {spec!r}: expected NAME={{"optimizer": <a CLI name>, ...}}')
        configs[name] = (value.pop("optimizer"), value)
    grids = dict(GRIDS)
    for spec in args.grid:
        name, _, text = spec.partition("=")
        grids[name] = [float(v) for v in text.split(",")]
    default = PEER_OPTIMIZERS if args.peers else OPTIMIZERS
    names = args.optimizers if args.optimizers is not None else default
    unknown = [n for n in names if n not in configs and n not in optimizer_names()]
    if unknown:
        parser.error(
            f"--optimizers: unknown {unknown}; valid: {optimizer_names() + list(configs)}"
        )
    if args.merge:
        merge_peers(Path(args.out), args.merge, args.stem or PEER_STEM)
        return
    if args.peers:
        run_peers(args, names, configs, grids)
        return
    args.stem = args.stem or DEFAULT_STEM
    args.tasks = args.tasks or list(TASKS)
    if set(args.tasks) - set(TASKS):
        parser.error(f"--tasks: choose from {list(TASKS)}")
    tasks = dict(TASKS)
    seeds = args.seeds
    if args.quick:
        tasks = {
            "autoencoder": ("autoencoder", 0.1, 1, 0.2, None),
            "cnn": ("cnn", 0.25, 1, None, 0.0),
            "transformer": ("transformer", 0.25, 1, None, 0.0),
        }
        seeds = [0]
    if args.width is not None:
        tasks = {name: (t[0], args.width, *t[2:]) for name, t in tasks.items()}
    ds = data.digits28()
    start = time.perf_counter()
    results: dict[str, Any] = {}
    histories: dict[str, Any] = {}
    for task in args.tasks:
        model, width, epochs, target_loss, target_acc = tasks[task]
        runs: dict[str, list[RunResult]] = {name: [] for name in names}
        for seed in seeds:
            for name in names:  # alternate optimizers within a seed
                base, overrides = configs.get(name, (name, {}))
                cfg = RunConfig(
                    optimizer=base, **overrides, label=name,
                    model=model, epochs=epochs, width=width, seed=seed,
                    device=args.device, target_loss=target_loss, target_accuracy=target_acc,
                    max_train=256 if args.quick else None,
                )  # fmt: skip
                result = train(cfg, ds, progress=False)
                runs[name].append(result)
                print(
                    f"{task} seed {seed} {name:8s}: {result.wall_time:7.1f} s, final loss "
                    f"{result.train_loss[-1]:.4f}, time to target {result.time_to_target}",
                    flush=True,
                )
        results[task] = {name: summarize(rs, epochs) for name, rs in runs.items()}
        histories[task] = {name: [asdict(r) for r in rs] for name, rs in runs.items()}
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        suffix = "_quick" if args.quick else ""
        plot([rs[0] for rs in runs.values()], str(out / figure_name(task, args.stem, suffix)),
             f"{task} (width {width}), seed {seeds[0]}")  # fmt: skip
    meta = {
        "device": torch.cuda.get_device_name(0)
        if args.device.startswith("cuda")
        else f"CPU ({platform.machine()}, {torch.get_num_threads()} threads)",
        "torch": torch.__version__,
        "seeds": seeds,
        "seconds": time.perf_counter() - start,
        "tasks": {task: tasks[task] for task in args.tasks},
        "suffix": "_quick" if args.quick else "",
        "stem": args.stem,
    }
    out = Path(args.out)
    stem = (
        args.stem
        + ("_quick" if args.quick else "")
        + ("_cuda" if args.device.startswith("cuda") else "")
    )
    (out / f"{stem}.json").write_text(
        json.dumps({"meta": meta, "summary": results, "runs": histories}, indent=1)
    )
    text = markdown(results, meta)
    (out / f"{stem}.md").write_text(text)
    print(text)


# ---------------------------------------------------------------------------- the peers table


def default_lr(base: str) -> float:
    """The command line's default rate of ``base``."""
    return DEFAULT_LR[base] if base in DEFAULT_LR else DEFAULT_LR["kfac"]


def level_times(run: RunResult, levels: tuple[float, ...]) -> list[float | None]:
    """The first evaluated time at which the training loss is at or below each level."""
    out: list[float | None] = []
    for level in levels:
        hit = [t for t, loss in zip(run.time, run.train_loss, strict=True) if loss <= level]
        out.append(hit[0] if hit else None)
    return out


def _mean_or_none(values: list[float | None]) -> float | None:
    return None if any(v is None for v in values) else statistics.mean(values)  # type: ignore[arg-type]


def peer_summary(runs: list[RunResult], levels: tuple[float, ...], walls: list[float]) -> Any:
    """Mean over seeds: final loss (the loss at the budget), time to each level (``None``
    unless every seed reached it), seeds that reached it, CPU and wall ms per step."""
    per_level = list(zip(*(level_times(r, levels) for r in runs), strict=True))
    return {
        "final_loss": statistics.mean(r.train_loss[-1] for r in runs),
        "level_times": [_mean_or_none(list(ts)) for ts in per_level],
        "reached": [sum(t is not None for t in ts) for ts in per_level],
        "cpu_ms_per_step": 1e3 * statistics.mean(r.time_per_step for r in runs),
        "wall_ms_per_step": 1e3
        * statistics.mean(w / max(r.steps, 1) for r, w in zip(runs, walls, strict=True)),
        "steps": statistics.mean(r.steps for r in runs),
        "seconds": statistics.mean(r.wall_time for r in runs),
    }


def run_peers(
    args: argparse.Namespace,
    names: list[str],
    configs: dict[str, tuple[str, dict[str, Any]]],
    grids: dict[str, list[float]],
) -> None:
    """The peers table: every optimizer at every rate of its grid on every task."""
    tasks = dict(PEER_TASKS)
    task_names = args.tasks or list(PEER_TASKS)
    if set(task_names) - set(PEER_TASKS):
        raise SystemExit(f"--tasks: choose from {list(PEER_TASKS)} with --peers")
    if args.quick:
        tasks = {
            "autoencoder-w1": ("autoencoder", 0.1, 0.3, (0.2, 0.1)),
            "cnn": ("cnn", 0.25, 0.3, (2.5, 2.0)),
        }
        task_names = [t for t in task_names if t in tasks] or list(tasks)
    if args.width is not None:
        tasks = {name: (t[0], args.width, *t[2:]) for name, t in tasks.items()}
    if args.budget is not None:
        tasks = {name: (t[0], t[1], args.budget, t[3]) for name, t in tasks.items()}
    missing = [n for n in names if configs.get(n, (n, {}))[0] in PEERS]
    try:
        import pytorch_optimizer  # noqa: F401
    except ImportError:
        if missing:
            print(f"pytorch-optimizer is not installed: skipping {missing}", flush=True)
            names = [n for n in names if n not in missing]
    seeds = [0] if args.quick else args.seeds
    ds = data.digits28()
    start = time.perf_counter()
    results: dict[str, Any] = {}
    for task in task_names:
        model, width, budget, levels = tasks[task]
        rates = {n: grids.get(n, grids.get(configs.get(n, (n, {}))[0], [None])) for n in names}  # type: ignore[list-item]
        runs: dict[str, dict[str, list[RunResult]]] = {n: {} for n in names}
        walls: dict[str, dict[str, list[float]]] = {n: {} for n in names}
        diverged: set[tuple[str, str]] = set()
        failures: dict[str, str] = {}
        for seed in seeds:
            for name in names:  # alternate optimizers within a seed
                base, overrides = configs.get(name, (name, {}))
                for lr in rates[name]:
                    cfg = RunConfig(
                        optimizer=base, **{"lr": lr, **overrides}, label=name,
                        model=model, epochs=1_000_000, width=width, seed=seed,
                        device=args.device, evals_per_epoch=3, max_time=budget,
                        max_train=256 if args.quick else None,
                    )  # fmt: skip
                    key = f"{cfg.lr if cfg.lr is not None else default_lr(base):g}"
                    wall = time.perf_counter()
                    try:
                        result = train(cfg, ds, progress=False, timer=time.process_time)
                    except (FloatingPointError, torch.linalg.LinAlgError) as exc:
                        # a diverged loss, or a decomposition that failed (Shampoo's SVD)
                        print(f"{task} seed {seed} {name} lr {key}: {exc}", flush=True)
                        diverged.add((name, key))
                        failures.setdefault(f"{name} lr {key}", f"{type(exc).__name__}: {exc}")
                        continue
                    wall = time.perf_counter() - wall
                    runs[name].setdefault(key, []).append(result)
                    walls[name].setdefault(key, []).append(wall)
                    print(
                        f"{task} seed {seed} {name:18s} lr {key:>7s}: {result.wall_time:6.1f} "
                        f"CPU s, {result.steps} steps, final loss {result.train_loss[-1]:.4f}, "
                        f"levels {level_times(result, levels)}",
                        flush=True,
                    )
        grid_rows: dict[str, dict[str, Any]] = {}
        best: dict[str, Any] = {}
        for name in names:
            grid_rows[name] = {}
            for key, rs in runs[name].items():
                if (name, key) in diverged or not all(math.isfinite(r.train_loss[-1]) for r in rs):
                    grid_rows[name][key] = {"final_loss": math.inf, "diverged": True}
                    continue
                grid_rows[name][key] = peer_summary(rs, levels, walls[name][key])
            for n, key in diverged:
                if n == name and key not in grid_rows[name]:
                    grid_rows[name][key] = {"final_loss": math.inf, "diverged": True}
            finite = {k: v for k, v in grid_rows[name].items() if math.isfinite(v["final_loss"])}
            if finite:
                lr = min(finite, key=lambda k: finite[k]["final_loss"])
                best[name] = {"lr": lr, **finite[lr]}
        results[task] = {
            "levels": levels, "budget": budget, "best": best, "grid": grid_rows,
            "failures": failures, "grids": _grids(names, configs, grids),
            "model": model, "width": width,
            "runs": {n: {k: [asdict(r) for r in rs] for k, rs in runs[n].items()} for n in names},
        }  # fmt: skip
    meta = {
        "device": f"CPU ({platform.machine()}, {torch.get_num_threads()} threads)",
        "torch": torch.__version__,
        "pytorch_optimizer": _version("pytorch-optimizer"),
        "seeds": seeds,
        "seconds": time.perf_counter() - start,
        "grids": _grids(names, configs, grids),
        "configs": {n: configs[n] for n in names if n in configs},
        "peers": {n: PEERS[n] for n in PEERS},
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = (args.stem or PEER_STEM) + ("_quick" if args.quick else "")
    (out / f"{stem}.json").write_text(json.dumps({"meta": meta, "results": results}, indent=1))
    text = peers_markdown(results, meta)
    (out / f"{stem}.md").write_text(text)
    print(text)


def _grids(
    names: list[str], configs: dict[str, tuple[str, dict[str, Any]]], grids: dict[str, list[float]]
) -> dict[str, list[float] | None]:
    """Each name's grid (its own, else its base optimizer's; ``None``: the default rate)."""
    return {n: grids.get(n, grids.get(configs.get(n, (n, {}))[0])) for n in names}


def merge_peers(out: Path, stems: list[str], stem: str) -> None:
    """One table from the peers runs ``stems`` (tasks run in separate processes)."""
    payloads = [json.loads((out / f"{name}.json").read_text()) for name in stems]
    meta = dict(payloads[0]["meta"])
    for other in payloads[1:]:
        if other["meta"]["seeds"] != meta["seeds"]:
            raise SystemExit(f"--merge: {stems} ran with different seeds")
    meta["seconds"] = sum(p["meta"]["seconds"] for p in payloads)
    meta["merged"] = stems
    results = {}
    for payload in payloads:  # each task keeps the grids it ran with
        for task, res in payload["results"].items():
            results[task] = {"grids": payload["meta"]["grids"], **res}
    (out / f"{stem}.json").write_text(json.dumps({"meta": meta, "results": results}, indent=1))
    text = peers_markdown(results, meta)
    (out / f"{stem}.md").write_text(text)
    print(text)


def _version(dist: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return None


def peers_markdown(results: dict[str, Any], meta: dict[str, Any]) -> str:
    """One table per task: each optimizer at its best rate, lowest loss first."""
    lines = [
        "# The family against the optimizers users pick today",
        "",
        f"{meta['device']}; torch {meta['torch']}; pytorch-optimizer "
        f"{meta['pytorch_optimizer']}; seeds {meta['seeds']}; whole run {meta['seconds']:.0f} s "
        "(wall). Every run trains for the same budget of process CPU time (one thread), so its "
        "final training loss is its loss at equal time; each optimizer at the best rate of its "
        "grid (lowest final loss, mean over seeds). Time to a level: the CPU seconds of "
        "training until the first evaluation (three per epoch) at or below it, given when "
        "every seed reached it ('-' when none did, 'k/n' when some did). Grids: "
        + "; ".join(f"{n} {g}" for n, g in meta["grids"].items() if g)
        + "; the others at the command line's default rate. Configurations: "
        + (
            "; ".join(f"{n} = {b} {json.dumps(o)}" for n, (b, o) in meta["configs"].items())
            or "none"
        )
        + ". Wall ms/step depends on the machine's load (shared); CPU ms/step does not.",
    ]
    n_seeds = len(meta["seeds"])
    for task, res in results.items():
        levels = res["levels"]
        lines += [
            "",
            f"## {task} ({res['model']}, width {res['width']:g}, {res['budget']:g} CPU s per run)",
            "",
            *(
                [
                    "Rates tried here: "
                    + "; ".join(f"{n} {g}" for n, g in res["grids"].items() if g)
                    + ".",
                    "",
                ]
                if res.get("grids", meta["grids"]) != meta["grids"]
                else []
            ),
            f"| optimizer | lr | loss at {res['budget']:g} s | "
            + " | ".join(f"to {lv:g} (s)" for lv in levels)
            + " | steps | CPU ms/step | wall ms/step |",
            "|---|---|---|" + "---|" * len(levels) + "---|---|---|",
        ]
        for name, row in sorted(res["best"].items(), key=lambda kv: kv[1]["final_loss"]):
            cells = [
                f"{t:.1f}" if t is not None else ("-" if k == 0 else f"{k}/{n_seeds}")
                for t, k in zip(row["level_times"], row["reached"], strict=True)
            ]
            lines.append(
                f"| {name} | {float(row['lr']):g} | {row['final_loss']:.4f} | "
                + " | ".join(cells)
                + f" | {row['steps']:.0f} | {row['cpu_ms_per_step']:.0f} | "
                f"{row['wall_ms_per_step']:.0f} |"
            )
        if res["failures"]:
            lines += [
                "",
                "Failed runs (not ranked; the first seed's error): "
                + "; ".join(f"{k}: {v.splitlines()[0][:120]}" for k, v in res["failures"].items())
                + ".",
            ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
