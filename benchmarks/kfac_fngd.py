"""FNGD and SENG against SGD, Adam, K-FAC, the best low-rank K-FAC variant and Shampoo.

Tasks on the bundled digits (28x28): the CNN trained to test accuracy 0.9 and the deep
autoencoder trained to a training-loss target. Every optimizer starts from the same weights
and sees the same batches for a given seed (reshuffled every epoch). Times are the process's
CPU time of the training steps (``time.process_time``, one thread: the machine is shared, so
wall time measures the other jobs too), evaluations excluded.

    python benchmarks/kfac_fngd.py                   # seeds 0, 1, 2
    python benchmarks/kfac_fngd.py --quick           # smoke run
    python benchmarks/kfac_fngd.py --timing          # interleaved time per step only

``--timing`` trains each optimizer for one epoch (FNGD computes and stores its coefficients),
then steps them round robin on the same batches and reports the mean CPU time per step of
each, after the first epoch (kfac_fngd_timing.{json,md}).

Shampoo is ``pytorch_optimizer.Shampoo`` (the ``bench`` extra); it is skipped, and said so,
when the package is missing. Writes benchmarks/results/kfac_fngd.{json,md}.
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

from kfac import data, models
from kfac.__main__ import (
    RunConfig,
    RunResult,
    _fngd_weights,
    _loss_fn,
    _make_optimizer,
    _per_sample_loss_fn,
    train,
)

#: FNGD's settings (chosen on the CNN, seed 0, by the grid in docs/kfac.md): the paper's
#: schedule (coefficients computed in the first epoch, stored by dataset index, reused after).
FNGD = {"lr": 0.3, "damping": 0.1}
#: SENG's settings (the same grid): refreshed every 10 steps (about once an epoch, as the
#: authors' 200 steps on CIFAR-10), damping 0.1.
SENG = {"lr": 0.3, "damping": 0.1, "inverse_every": 10}
#: name: (command-line optimizer, RunConfig overrides); ``None``: built here (Shampoo).
CONFIGS: dict[str, tuple[str | None, dict[str, Any]]] = {
    "sgd": ("sgd", {}),
    "adam": ("adam", {}),
    "kfac": ("kfac", {}),
    "bkfac-batch-clock": ("bkfac", {"inverse_options": {"identity_clock": "batches"}}),
    "shampoo": (None, {}),
    "fngd": ("fngd", FNGD),
    "fngd-shared": ("fngd", {**FNGD, "inverse_options": {"coefficients": "shared"}}),
    # the same coefficients, G alpha by weighted outer products of the rows (not the loss)
    "fngd-shared-rows": (
        "fngd",
        {**FNGD, "inverse_options": {"coefficients": "shared", "weighted_step": "rows"}},
    ),
    "fngd-recompute": ("fngd", {"lr": 0.3, "damping": 3e-3, "inverse_options": {"store": "none"}}),
    # the damping chosen for time to target on the CNN, seed 0, from {1e-4, 3e-4, 1e-3, 3e-3,
    # 1e-2, 3e-2} (docs/kfac.md)
    "fngd-recompute-1e-3": (
        "fngd",
        {"lr": 0.3, "damping": 1e-3, "inverse_options": {"store": "none"}},
    ),
    "fngd-3-epochs": (
        "fngd",
        {
            "lr": 0.3,
            "damping": 3e-3,
            "inverse_options": {"compute_epochs": 3, "steps_per_epoch": 12},
        },
    ),
    "seng": ("seng", SENG),
    "seng-unbiased": ("seng", {**SENG, "inverse_options": {"scaling": "unbiased"}}),
}
#: lr from {1e-3, 3e-3, 1e-2, 3e-2} on the CNN, seed 0: 1e-3 did not learn in 6 epochs, 3e-3
#: and 3e-2 diverged, 1e-2 was best (docs/kfac.md).
SHAMPOO = {"lr": 1e-2, "preconditioning_compute_steps": 10}
TASKS = {
    # name: (model, width, epochs, target loss, target accuracy, optimizers left out)
    "cnn": ("cnn", 1.0, 6, None, 0.9, ()),
    "autoencoder": ("autoencoder", 0.5, 10, 0.045, None, ()),
    "transformer": (
        "transformer",
        1.0,
        4,
        None,
        0.8,
        (
            "fngd-shared-rows",
            "fngd-recompute",
            "fngd-recompute-1e-3",
            "fngd-3-epochs",
            "seng-unbiased",
        ),
    ),
}
QUICK_TASKS = {
    "cnn": ("cnn", 0.25, 2, None, 0.0, ()),
    "autoencoder": ("autoencoder", 0.1, 2, 0.3, None, ("shampoo",)),
}
#: Not in the default run (``--tasks transformer``): the digits Transformer.


def shampoo_factory() -> Any:
    """``pytorch_optimizer.Shampoo`` with :data:`SHAMPOO`, or ``None`` if not installed."""
    try:
        from pytorch_optimizer import Shampoo
    except ImportError:
        return None
    return lambda model: Shampoo(model.parameters(), **SHAMPOO)


def _optimizer(name: str, model: nn.Module, model_name: str, shampoo: Any) -> Any:
    base, overrides = CONFIGS[name]
    if base is None:
        return shampoo(model)
    cfg = RunConfig(**{"optimizer": base, "model": model_name, **overrides})
    return _make_optimizer(base, model, cfg, models.MODELS[model_name][1])


def interleaved_times(
    task: tuple[Any, ...], names: list[str], shampoo: Any, epochs: int, train_size: int | None
) -> dict[str, float]:
    """Mean CPU seconds per step of each optimizer after a first epoch, stepping them round
    robin on the same batches (each sees the same machine load)."""
    model_name, width = task[0], task[1]
    ds = data.digits28()
    n = ds.x_train.shape[0] if train_size is None else train_size
    loss_name = models.MODELS[model_name][1]
    loss, per_sample = _loss_fn(loss_name), _per_sample_loss_fn(loss_name)
    runs = []
    for name in names:
        torch.manual_seed(0)
        model = models.build(model_name, ds.image_shape, ds.num_classes, width)
        runs.append((name, model, _optimizer(name, model, model_name, shampoo)))
    gen = torch.Generator().manual_seed(0)
    totals = dict.fromkeys(names, 0.0)
    steps = 0
    for epoch in range(1 + epochs):
        for idx in torch.randperm(n, generator=gen).split(128):
            x, y = ds.x_train[idx], ds.y_train[idx]
            for name, model, opt in runs:
                start = time.process_time()
                opt.zero_grad()
                weights = _fngd_weights(opt, idx)
                if weights is None:
                    loss(model(x), x, y).backward()
                else:
                    (weights * per_sample(model(x), x, y)).sum().backward()
                if name.startswith("fngd"):
                    opt.step(indices=idx)
                else:
                    opt.step()
                if epoch:
                    totals[name] += time.process_time() - start
            steps += int(epoch > 0)
    return {name: total / max(steps, 1) for name, total in totals.items()}


def timing_markdown(
    times: dict[str, dict[str, float]], meta: dict[str, Any], title: str | None = None
) -> str:
    names = list(dict.fromkeys(n for row in times.values() for n in row))
    lines = [
        "# "
        + (
            title
            or "FNGD and SENG: CPU time per step after the first epoch, optimizers interleaved"
        ),
        "",
        f"{meta['device']}; torch {meta['torch']}; one epoch of training first (FNGD stores "
        f"its coefficients), then {meta['epochs']} epochs with the optimizers stepping round "
        "robin on the same batches of 128; process CPU time per step in milliseconds (ratio "
        "to SGD). SENG refreshes every 10 steps, K-FAC its inverses every 10 and Shampoo its "
        "preconditioners every 10, so their means include those steps.",
        "",
        "| task | " + " | ".join(names) + " |",
        "|---|" + "---|" * len(names),
    ]
    for task, row in times.items():
        cells = [
            f"{1e3 * row[n]:.1f} ({row[n] / row['sgd']:.2f})" if n in row else "-" for n in names
        ]
        lines.append(f"| {task} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def summarize(runs: list[RunResult]) -> dict[str, Any]:
    per_step = [r.time_per_step for r in runs]
    # after the first epoch (the first evaluation after step 0 closes it)
    later = [(r.wall_time - r.time[1]) / max(r.steps - r.step[1], 1) for r in runs]
    reached = [r.time_to_target for r in runs if r.time_to_target is not None]
    final_acc = [r.test_accuracy[-1] for r in runs if r.test_accuracy[-1] is not None]
    return {
        "time_per_step": statistics.mean(per_step),
        "time_per_step_std": statistics.pstdev(per_step),
        "time_per_step_after_epoch_1": statistics.mean(later),
        "time_to_target": statistics.mean(reached) if len(reached) == len(runs) else None,
        "reached": f"{len(reached)}/{len(runs)}",
        "final_loss": statistics.mean(r.train_loss[-1] for r in runs),
        "final_accuracy": statistics.mean(final_acc) if final_acc else None,
    }


def markdown(results: dict[str, Any], meta: dict[str, Any]) -> str:
    lines = [
        "# FNGD and SENG against SGD, Adam, K-FAC, B-KFAC and Shampoo",
        "",
        f"{meta['device']}; torch {meta['torch']}; seeds {meta['seeds']}; whole run "
        f"{meta['seconds']:.0f} s; {meta['note']}. Times are process CPU seconds of the "
        "training steps (one thread). Means over seeds; ratios are to K-FAC, to Shampoo (its "
        "time to target only where every Shampoo seed reached it) and, after epoch 1, to SGD. "
        "Time to target is reported only when every seed reached it.",
        "",
        "Settings: " + "; ".join(f"{k}: {json.dumps(v[1])}" for k, v in CONFIGS.items()) + ". "
        f"Shampoo: pytorch_optimizer.Shampoo {json.dumps(SHAMPOO)}. Unlisted values are the "
        "command line's (momentum 0.9, KL clip 1e-4; K-FAC damping 3e-3, factor_every 1, "
        "inverse_every 10).",
    ]
    for task, rows in results.items():
        _, width, epochs, target_loss, target_acc, left_out = meta["tasks"][task]
        target = (
            f"training loss <= {target_loss}"
            if target_loss is not None
            else f"test accuracy >= {target_acc}"
        )
        base = rows.get("kfac")
        sgd = rows.get("sgd")
        sham = rows.get("shampoo")
        lines += [
            "",
            f"## {task} (width {width}, {epochs} epochs, target: {target})",
            "",
        ]
        if left_out:
            lines += [f"Not run on this task: {', '.join(left_out)} (time budget).", ""]
        lines += [
            "| optimizer | time/step (ms) | vs K-FAC | vs Shampoo | after epoch 1 (ms) "
            "| vs SGD | time to target (s) | vs K-FAC | vs Shampoo | reached | final loss "
            "| final accuracy |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for name, row in rows.items():
            ratio = "-" if base is None else f"{row['time_per_step'] / base['time_per_step']:.2f}"
            ttt = row["time_to_target"]
            base_ttt = None if base is None else base["time_to_target"]
            ratio_ttt = "-" if ttt is None or not base_ttt else f"{ttt / base_ttt:.2f}"
            acc = "-" if row["final_accuracy"] is None else f"{row['final_accuracy']:.3f}"
            later = row["time_per_step_after_epoch_1"]
            sgd_later = None if sgd is None else sgd["time_per_step_after_epoch_1"]
            vs_sgd = "-" if not sgd_later else f"{later / sgd_later:.2f}"
            sh_base = None if sham is None else sham["time_per_step"]
            sh_step = "-" if not sh_base else f"{row['time_per_step'] / sh_base:.2f}"
            sh_ttt = None if sham is None else sham["time_to_target"]
            sh_ratio = "-" if ttt is None or not sh_ttt else f"{ttt / sh_ttt:.2f}"
            lines.append(
                f"| {name} | {1e3 * row['time_per_step']:.1f} ± "
                f"{1e3 * row['time_per_step_std']:.1f} | {ratio} | {sh_step} | "
                f"{1e3 * later:.1f} | {vs_sgd} | {'-' if ttt is None else f'{ttt:.2f}'} | "
                f"{ratio_ttt} | {sh_ratio} | {row['reached']} | {row['final_loss']:.4f} | {acc} |"
            )
    return "\n".join(lines) + "\n"


def _device() -> str:
    return f"CPU ({platform.machine()}, {torch.get_num_threads()} thread)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny models, one seed, smoke run")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--tasks", nargs="+", default=["cnn", "autoencoder"], choices=list(TASKS))
    parser.add_argument("--optimizers", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"))
    parser.add_argument("--timing", action="store_true", help="only the interleaved time per step")
    parser.add_argument("--stem", default="kfac_fngd", help="name of the result files")
    parser.add_argument(
        "--merge",
        action="store_true",
        help="update the rows of the chosen optimizers in an existing result file (the other "
        "rows are kept as they were measured)",
    )
    args = parser.parse_args()
    torch.set_num_threads(1)
    tasks = QUICK_TASKS if args.quick else TASKS
    seeds = [0] if args.quick else args.seeds
    names = list(args.optimizers)
    shampoo = shampoo_factory()
    note = "Shampoo included" if "shampoo" in names else "Shampoo not run (--optimizers)"
    if "shampoo" in names and shampoo is None:
        names.remove("shampoo")
        note = "Shampoo skipped: pytorch_optimizer is not installed"
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    suffix = "_quick" if args.quick else ""
    if args.timing:
        epochs = 1 if args.quick else 2
        times = {}
        for task in args.tasks:
            left_out = tasks[task][5]
            chosen = [n for n in names if n not in left_out]
            times[task] = interleaved_times(
                tasks[task], chosen, shampoo, epochs, 256 if args.quick else None
            )
        meta = {"device": _device(), "torch": torch.__version__, "epochs": epochs, "note": note}
        stem = f"{args.stem}_timing{suffix}"
        (out / f"{stem}.json").write_text(json.dumps({"meta": meta, "times": times}, indent=1))
        title = None
        if args.stem != "kfac_fngd":  # a distinct heading for each included table
            title = f"CPU time per step after the first epoch, interleaved: {', '.join(names)}"
        text = timing_markdown(times, meta, title)
        (out / f"{stem}.md").write_text(text)
        print(text)
        return
    ds = data.digits28()
    start = time.perf_counter()
    results: dict[str, Any] = {}
    histories: dict[str, Any] = {}
    previous_seconds = 0.0
    path = out / f"{args.stem}{suffix}.json"
    if args.merge and path.exists():
        saved = json.loads(path.read_text())
        results, histories = saved["summary"], saved["runs"]
        previous_seconds = float(saved["meta"]["seconds"])
    for task in args.tasks:
        model, width, epochs, target_loss, target_acc, left_out = tasks[task]
        chosen = [n for n in names if n not in left_out]
        runs: dict[str, list[RunResult]] = {name: [] for name in chosen}
        for seed in seeds:
            for name in chosen:  # alternate optimizers within a seed
                base, overrides = CONFIGS[name]
                cfg = RunConfig(
                    **{"optimizer": base or name, "label": name, "model": model,
                       "epochs": epochs, "width": width, "seed": seed,
                       "target_loss": target_loss, "target_accuracy": target_acc,
                       "max_train": 256 if args.quick else None, **overrides},
                )  # fmt: skip
                factory = shampoo if name == "shampoo" else None
                result = train(
                    cfg, ds, progress=False, make_optimizer=factory, timer=time.process_time
                )
                runs[name].append(result)
                print(
                    f"{task} seed {seed} {name:18s}: {1e3 * result.time_per_step:7.1f} ms/step, "
                    f"final loss {result.train_loss[-1]:.4f}, accuracy "
                    f"{result.test_accuracy[-1]}, time to target {result.time_to_target}",
                    flush=True,
                )
        fresh = {name: summarize(rs) for name, rs in runs.items()}
        fresh_runs = {name: [asdict(r) for r in rs] for name, rs in runs.items()}
        old, old_runs = results.get(task, {}), histories.get(task, {})
        order = [n for n in CONFIGS if n in fresh or n in old]
        results[task] = {n: fresh.get(n, old.get(n)) for n in order}
        histories[task] = {n: fresh_runs.get(n, old_runs.get(n)) for n in order}
        meta = {
            "device": _device(),
            "torch": torch.__version__,
            "seeds": seeds,
            "seconds": previous_seconds + time.perf_counter() - start,
            "tasks": {t: tasks[t] for t in results},
            "note": note,
        }
        payload = {"meta": meta, "summary": results, "runs": histories}
        (out / f"{args.stem}{suffix}.json").write_text(json.dumps(payload, indent=1))
        text = markdown(results, meta)
        (out / f"{args.stem}{suffix}.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
