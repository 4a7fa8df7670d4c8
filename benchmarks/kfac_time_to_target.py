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

from kfac import data
from kfac.__main__ import RunConfig, RunResult, plot, train

#: Labelled configurations beyond the command line's names: (name, inverse options).
CONFIGS = {
    "bkfac-batch-clock": ("bkfac", {"identity_clock": "batches"}),
    # the bias-corrected zero initialisation of the factors (not in the default list)
    "kfac-zero-init": ("kfac", {"factor_init": "zero"}),
    "bkfac-batch-clock-zero-init": ("bkfac", {"identity_clock": "batches", "factor_init": "zero"}),
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
    parser.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS))
    parser.add_argument(
        "--optimizers", nargs="+", default=OPTIMIZERS, choices=[*OPTIMIZERS, *CONFIGS]
    )
    parser.add_argument("--width", type=float, default=None, help="override the tasks' width")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"))
    parser.add_argument("--stem", default=DEFAULT_STEM, help="name of the result files")
    args = parser.parse_args()
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
        runs: dict[str, list[RunResult]] = {name: [] for name in args.optimizers}
        for seed in seeds:
            for name in args.optimizers:  # alternate optimizers within a seed
                base, options = CONFIGS.get(name, (name, {}))
                cfg = RunConfig(
                    optimizer=base, inverse_options=options, label=name,
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


if __name__ == "__main__":
    main()
