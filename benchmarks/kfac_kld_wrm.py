"""KLD-WRM (SO, Q, QE) against K-FAC on the KLD-WRM paper's MNIST network.

The network is ``mnist-cnn`` (conv 1-5 5x5, pool, conv 5-7 5x5, pool, FC 112-30, dropout,
FC 30-10), batch 512, the paper's hyperparameters otherwise: constant learning rate, KL clip
0.1, absolute eigenbasis damping 0.01, momentum 0, ``rho`` 0.95 (K-FAC), 0.33 (SO), 0.5 (Q
and QE), QE with 7 inner steps over 3 snapshots. K-FAC is also run at SO's ``rho`` 0.33, to
separate the effect of the shorter average from that of the gradient correction.

Data: the bundled digits resized to 28x28 (1497 training and 300 test images, so 3 steps per
epoch at batch 512) unless ``--data`` names the MNIST IDX files. On digits an epoch is 40
times shorter than on MNIST, so the factor and refresh period is 3 steps (once an epoch)
instead of the paper's 30, and the learning rate 0.1 instead of 0.01 (``--lr-grid`` runs
the grid behind that choice; 0.01 does not leave the initial plateau in 100 epochs here).
Weight decay is 0 (the paper's 1e-3 is preconditioned inside its optimizers; ours is
torch's, outside).

Every method starts from the same weights and sees the same batches for a given seed; the
methods alternate within each seed. Times are the training steps' wall time (evaluations
excluded), one thread.

    python benchmarks/kfac_kld_wrm.py                 # 3 seeds, 100 epochs
    python benchmarks/kfac_kld_wrm.py --lr-grid       # the learning-rate grid, seed 0
    python benchmarks/kfac_kld_wrm.py --data ~/mnist  # real MNIST (IDX files)
    python benchmarks/kfac_kld_wrm.py --quick         # smoke run

Writes benchmarks/results/kfac_kld_wrm.{json,md,png} (``_grid`` for the grid).
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
from kfac.__main__ import RunConfig, RunResult, train

#: name: (command-line optimizer, RunConfig overrides).
METHODS: dict[str, tuple[str, dict[str, Any]]] = {
    "kfac": ("kfac", {"factor_decay": 0.95}),
    "kfac-rho0.33": ("kfac", {"factor_decay": 0.33}),
    "so-kld-wrm": ("so-kld-wrm", {"factor_decay": 0.33}),
    "q-kld-wrm": ("q-kld-wrm", {"factor_decay": 0.5, "rms_clip": 2.0}),
    "qe-kld-wrm": (
        "qe-kld-wrm",
        {"factor_decay": 0.5, "rms_clip": 2.0, "inverse_options": {"inner_steps": 7}},
    ),
}
COMMON: dict[str, Any] = {
    "model": "mnist-cnn",
    "batch_size": 512,
    "momentum": 0.0,
    "kl_clip": 0.1,
    "damping": 0.01,
    "damping_scheme": "eigenbasis",
    "evals_per_epoch": 1,
}
TARGETS = (0.9, 0.95)


def config(name: str, seed: int, args: argparse.Namespace, lr: float) -> RunConfig:
    optimizer, overrides = METHODS[name]
    return RunConfig(
        optimizer=optimizer,
        label=name,
        seed=seed,
        epochs=args.epochs,
        lr=lr,
        factor_every=args.period,
        inverse_every=args.period,
        max_train=args.max_train,
        **COMMON,
        **overrides,
    )


def interleaved_timing(ds: Any, args: argparse.Namespace, steps: int) -> dict[str, float]:
    """Process CPU seconds per training step of each method, measured round robin (every
    method takes step ``i`` on batch ``i`` before any takes step ``i + 1``) after a warm-up
    that fills QE's snapshots, so that all see the same machine load; one thread, so CPU
    time is the work's and not the other processes' on a shared machine."""
    from kfac import models
    from kfac.__main__ import _make_optimizer

    n = ds.x_train.shape[0] if args.max_train is None else min(args.max_train, ds.x_train.shape[0])
    gen = torch.Generator().manual_seed(0)
    idx = [torch.randint(n, (COMMON["batch_size"],), generator=gen) for _ in range(steps + 3)]
    runs = {}
    for name in METHODS:
        torch.manual_seed(0)
        model = models.build("mnist-cnn", ds.image_shape, ds.num_classes, 1.0)
        cfg = config(name, 0, args, learning_rate(args, name))
        runs[name] = (model, _make_optimizer(cfg.optimizer, model, cfg, "cross_entropy"))
    seconds = dict.fromkeys(METHODS, 0.0)
    for i, batch in enumerate(idx):
        x, y = ds.x_train[batch], ds.y_train[batch]
        for name, (model, opt) in runs.items():
            start = time.process_time()
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
            if i >= 3:
                seconds[name] += time.process_time() - start
    return {name: t / steps for name, t in seconds.items()}


def first_reaching(r: RunResult, target: float) -> tuple[int | None, float | None]:
    """(epoch, seconds) of the first evaluation at or above ``target``."""
    for step, t, acc in zip(r.step, r.time, r.test_accuracy, strict=True):
        if acc is not None and acc >= target:
            return step, t
    return None, None


def accuracy_at(r: RunResult, seconds: float) -> float:
    """Test accuracy of the last evaluation at or before ``seconds`` of training."""
    acc = [a for t, a in zip(r.time, r.test_accuracy, strict=True) if t <= seconds]
    return float(acc[-1]) if acc and acc[-1] is not None else float("nan")


def mean_std(values: list[float]) -> tuple[float, float]:
    if not values:
        return float("nan"), float("nan")
    return statistics.fmean(values), statistics.pstdev(values) if len(values) > 1 else 0.0


def summarize(
    runs: dict[str, list[RunResult]], steps_per_epoch: int, cpu: dict[str, float]
) -> dict[str, Any]:
    budget = min(r.wall_time for rs in runs.values() for r in rs)
    base = statistics.median(r.time_per_step for r in runs["kfac"]) if "kfac" in runs else None
    cpu_budget = min(cpu[name] * rs[0].steps for name, rs in runs.items())
    out: dict[str, Any] = {"equal_time_budget_s": budget, "equal_cpu_budget_s": cpu_budget}
    for name, rs in runs.items():
        # the last evaluation within the CPU budget, at this method's interleaved cost
        within = [
            [float(a) for s, a in zip(r.step, r.test_accuracy, strict=True)
             if s * cpu[name] <= cpu_budget and a is not None][-1]
            for r in rs
        ]  # fmt: skip
        final = [float(r.test_accuracy[-1]) for r in rs]  # type: ignore[arg-type]
        per_step = statistics.median(r.time_per_step for r in rs)
        row: dict[str, Any] = {
            "final_accuracy": mean_std(final),
            "best_accuracy": mean_std(
                [max(a for a in r.test_accuracy if a is not None) for r in rs]
            ),
            "final_train_loss": mean_std([r.train_loss[-1] for r in rs]),
            "time_per_epoch": per_step * steps_per_epoch,
            "time_ratio_to_kfac": None if base is None else per_step / base,
            "accuracy_at_equal_time": mean_std([accuracy_at(r, budget) for r in rs]),
            "cpu_per_epoch": cpu[name] * steps_per_epoch,
            "cpu_ratio_to_kfac": cpu[name] / cpu["kfac"],
            "accuracy_at_equal_cpu": mean_std(within),
        }
        for target in TARGETS:
            hits = [first_reaching(r, target) for r in rs]
            epochs = [s / steps_per_epoch for s, _ in hits if s is not None]
            seconds = [t for _, t in hits if t is not None]
            row[f"target_{target}"] = {
                "reached": f"{len(epochs)}/{len(rs)}",
                "epochs": mean_std(epochs),
                "seconds": mean_std(seconds),
            }
        out[name] = row
    return out


def _pm(pair: tuple[float, float], spec: str = ".3f") -> str:
    mean, std = pair
    if mean != mean:  # nan
        return "-"
    return f"{mean:{spec}} ± {std:{spec}}"


def markdown(payload: dict[str, Any]) -> str:
    meta, summary = payload["meta"], payload["summary"]
    names = list(METHODS)
    lines = [
        f"# KLD-WRM against K-FAC{'' if meta.get('tag') is None else ' (' + meta['tag'] + ')'}: "
        f"{meta['dataset']}, mnist-cnn, batch 512",
        "",
        f"{meta['epochs']} epochs ({meta['steps_per_epoch']} steps each), seeds "
        f"{meta['seeds']}, learning rates {meta['lr']}, factor/refresh period "
        f"{meta['period']} steps, "
        f"KL clip 0.1, eigenbasis damping 0.01, momentum 0. {meta['machine']}, one thread, the "
        "methods alternating within each seed (times: see the last table). Mean ± standard "
        "deviation over the seeds.",
        "",
        f"![test accuracy against epochs and CPU time]({meta['plot']})",
        "",
        "## Accuracy against epochs",
        "",
        "| method | " + " | ".join(f"epoch {e}" for e in payload["checkpoints"]) + " | final "
        "| best | train loss |",
        "|---|" + "---|" * (len(payload["checkpoints"]) + 3),
    ]
    for name in names:
        row = summary[name]
        cells = [
            _pm(tuple(payload["curves"][name]["at_checkpoints"][str(e)]))
            for e in payload["checkpoints"]
        ]
        lines.append(
            f"| {name} | " + " | ".join(cells) + f" | {_pm(tuple(row['final_accuracy']))} | "
            f"{_pm(tuple(row['best_accuracy']))} | {_pm(tuple(row['final_train_loss']), '.4f')} |"
        )
    lines += [
        "",
        "## Epochs and seconds to a test accuracy",
        "",
        "| method | "
        + " | ".join(f"reached {t} | epochs to {t} | wall s to {t}" for t in TARGETS)
        + " |",
        "|---|" + "---|" * (3 * len(TARGETS)),
    ]
    for name in names:
        row = summary[name]
        cells = []
        for t in TARGETS:
            hit = row[f"target_{t}"]
            cells += [
                hit["reached"],
                _pm(tuple(hit["epochs"]), ".1f"),
                _pm(tuple(hit["seconds"]), ".2f"),
            ]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "## Cost and accuracy against time",
        "",
        "CPU time: process CPU seconds per step measured round robin over the methods "
        f"({meta['timing_steps']} steps after a warm-up, one thread), times the steps per "
        "epoch; accuracy at equal CPU time: the last evaluation within "
        f"{summary['equal_cpu_budget_s']:.2f} CPU s (the cheapest method's whole run). Wall "
        "time: the training runs' own step times (a shared machine: noisier); accuracy at "
        f"equal wall time: the last evaluation within {summary['equal_time_budget_s']:.2f} s.",
        "",
        "| method | CPU s per epoch | CPU ratio to K-FAC | accuracy at equal CPU time "
        "| wall s per epoch | wall ratio to K-FAC | accuracy at equal wall time |",
        "|---|---|---|---|---|---|---|",
    ]
    for name in names:
        row = summary[name]
        ratio = row["time_ratio_to_kfac"]
        lines.append(
            f"| {name} | {row['cpu_per_epoch']:.3f} | {row['cpu_ratio_to_kfac']:.2f} | "
            f"{_pm(tuple(row['accuracy_at_equal_cpu']))} | {row['time_per_epoch']:.3f} | "
            f"{'-' if ratio is None else f'{ratio:.2f}'} | "
            f"{_pm(tuple(row['accuracy_at_equal_time']))} |"
        )
    return "\n".join(lines) + "\n"


def curves(
    runs: dict[str, list[RunResult]], checkpoints: list[int], spe: int, cpu: dict[str, float]
) -> dict[str, Any]:
    out = {}
    for name, rs in runs.items():
        acc = [[float(a) for a in r.test_accuracy] for r in rs]  # type: ignore[arg-type]
        times = [r.time for r in rs]
        n = min(len(a) for a in acc)
        mean_acc = [statistics.fmean(a[i] for a in acc) for i in range(n)]
        mean_time = [statistics.fmean(t[i] for t in times) for i in range(n)]
        epochs = [s / spe for s in rs[0].step[:n]]
        at = {}
        for e in checkpoints:
            i = min(range(n), key=lambda j: abs(epochs[j] - e))
            at[str(e)] = mean_std([a[i] for a in acc])
        out[name] = {
            "epoch": epochs,
            "accuracy": mean_acc,
            "time": mean_time,
            "cpu_time": [e * spe * cpu[name] for e in epochs],
            "at_checkpoints": at,
        }
    return out


def plot(payload: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for name, c in payload["curves"].items():
        axes[0].plot(c["epoch"], c["accuracy"], label=name)
        axes[1].plot(c["cpu_time"], c["accuracy"], label=name)
    meta = payload["meta"]
    title = f"mnist-cnn on {meta['dataset']} (mean of {len(meta['seeds'])} seeds)"
    axes[0].set(xlabel="epoch", ylabel="test accuracy", title=title)
    axes[1].set(xlabel="training CPU time (s, interleaved cost)", ylabel="test accuracy")
    for ax in axes:
        ax.set_ylim(0.0, 1.0)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def learning_rate(args: argparse.Namespace, name: str) -> float:
    """``--lrs NAME=LR`` for ``name``, else ``--lr``."""
    for spec in args.lrs:
        key, _, value = spec.partition("=")
        if key == name:
            return float(value)
    return float(args.lr)


def lr_grid(ds: Any, args: argparse.Namespace, out: Path, stem: str) -> None:
    """Final training loss and test accuracy per method and learning rate (first seed),
    written after every run."""
    rows: list[dict[str, Any]] = []
    for lr in args.lr_grid:
        for name in METHODS:
            r = train(config(name, args.seeds[0], args, lr), ds, progress=False)
            rows.append(
                {
                    "method": name,
                    "lr": lr,
                    "final_accuracy": r.test_accuracy[-1],
                    "final_train_loss": r.train_loss[-1],
                    "wall_time": r.wall_time,
                }
            )
            print(rows[-1], flush=True)
            lines = [
                f"# KLD-WRM learning-rate grid: {ds.name}, mnist-cnn, {args.epochs} epochs, "
                f"seed {args.seeds[0]}, period {args.period}",
                "",
                "| method | lr | final train loss | final test accuracy |",
                "|---|---|---|---|",
            ]
            lines += [
                f"| {r['method']} | {r['lr']} | {r['final_train_loss']:.4f} | "
                f"{r['final_accuracy']:.3f} |"
                for r in sorted(rows, key=lambda r: (list(METHODS).index(r["method"]), r["lr"]))
            ]
            record = {"rows": rows, "epochs": args.epochs, "period": args.period}
            (out / f"{stem}_grid.json").write_text(json.dumps(record, indent=1))
            (out / f"{stem}_grid.md").write_text("\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--epochs", type=int, default=60)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--lrs", nargs="*", default=[], metavar="NAME=LR", help="per method")
    parser.add_argument("--period", type=int, default=3, help="factor and refresh period")
    parser.add_argument("--data", default=None, help="MNIST IDX directory (default: digits)")
    parser.add_argument("--max-train", type=int, default=None)
    parser.add_argument("--lr-grid", type=float, nargs="*", default=None, metavar="LR")
    parser.add_argument("--part", default=None, help="run the seeds and keep only the runs")
    parser.add_argument("--merge", nargs="*", default=None, metavar="PART")
    parser.add_argument("--tag", default=None, help="suffix of the output files")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    stem = "kfac_kld_wrm" if args.tag is None else f"kfac_kld_wrm_{args.tag}"
    if args.quick:
        args.epochs, args.seeds, args.max_train = 3, [0], 512
        stem += "_quick"
    ds = data.load(args.data)
    n = ds.x_train.shape[0] if args.max_train is None else min(args.max_train, ds.x_train.shape[0])
    spe = -(-n // COMMON["batch_size"])
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.time()
    if args.lr_grid is not None:
        lr_grid(ds, args, out, stem)
        return

    runs: dict[str, list[RunResult]] = {name: [] for name in METHODS}
    if args.merge is not None:
        parts = [json.loads((out / f"{stem}_part_{p}.json").read_text()) for p in args.merge]
        args.seeds = [seed for part in parts for seed in part["seeds"]]
        for part in parts:
            for name in METHODS:
                runs[name] += [RunResult(**r) for r in part["runs"][name]]
    else:
        for seed in args.seeds:
            for name in METHODS:  # alternating within the seed
                r = train(config(name, seed, args, learning_rate(args, name)), ds, progress=False)
                runs[name].append(r)
                print(f"seed {seed} {name}: final accuracy {r.test_accuracy[-1]:.3f}, "
                      f"{r.wall_time:.2f} s", flush=True)  # fmt: skip
        if args.part is not None:
            part = {
                "seeds": args.seeds,
                "runs": {name: [asdict(r) for r in rs] for name, rs in runs.items()},
            }
            (out / f"{stem}_part_{args.part}.json").write_text(json.dumps(part))
            return
    timing_steps = 6 if args.quick else 30
    cpu = interleaved_timing(ds, args, timing_steps)
    checkpoints = sorted({max(1, args.epochs * k // 5) for k in range(1, 6)})
    payload = {
        "meta": {
            "dataset": ds.name,
            "epochs": args.epochs,
            "steps_per_epoch": spe,
            "seeds": args.seeds,
            "lr": {name: learning_rate(args, name) for name in METHODS},
            "period": args.period,
            "machine": f"{platform.machine()} CPU, torch {torch.__version__}",
            "timing_steps": timing_steps,
            "plot": f"{stem}.png",
            "tag": args.tag,
            "elapsed_s": time.time() - start,
        },
        "methods": {k: {"optimizer": v[0], **v[1]} for k, v in METHODS.items()},
        "common": COMMON,
        "checkpoints": checkpoints,
        "cpu_per_step": cpu,
        "curves": curves(runs, checkpoints, spe, cpu),
        "summary": summarize(runs, spe, cpu),
        "runs": {name: [asdict(r) for r in rs] for name, rs in runs.items()},
    }
    (out / f"{stem}.json").write_text(json.dumps(payload, indent=1))
    table = markdown(payload)
    (out / f"{stem}.md").write_text(table)
    plot(payload, out / f"{stem}.png")
    print(table)


if __name__ == "__main__":
    main()
