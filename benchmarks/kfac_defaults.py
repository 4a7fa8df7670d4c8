"""How ``kfac.KFAC(model, lr)`` with the library defaults does against SGD with momentum and
Adam, each with a three-point learning-rate grid, at equal steps, on the command line's
tasks (the record behind the defaults discussion in docs/kfac.md).

Configurations: SGD (momentum 0.9), Adam, ``KFAC(model, lr)`` with the library defaults
(``kfac.preset("default")``: factors every step, inverses every 10, absolute factored
damping 0.1, KL clip ``InverseDecay(1e-3, scale=50, power=2)``, i.e.
``1e-3 / (1 + step / 50) ** 2``, momentum 0.9), ``KFAC`` with ``kfac.preset("thesis")`` (the
thesis' long-run settings, the defaults before they were measured: factors every 20 steps,
inverses every 100, relative damping 0.1, no momentum, no clip), with
``kfac.preset("command-line")`` (relative damping 3e-3, KL clip 1e-4, momentum 0.9), and
the quadratic-model step with adaptive damping (which needs ``loss_fn`` and
``step(batch=...)``). Every run starts from the same weights and sees the same batches
(``--seed``); the best final training loss over the grid is reported (a diverged run
counts as infinite).

    python benchmarks/kfac_defaults.py                       # 7 epochs (84 steps) per task
    python benchmarks/kfac_defaults.py --epochs 30 --stem kfac_defaults_long   # 360 steps
    python benchmarks/kfac_defaults.py --quick               # smoke run
    # the search behind the defaults: extra configurations, their loss curves and clip scale
    python benchmarks/kfac_defaults.py --epochs 30 --tasks mlp --only --trace \
        --config 'mine={"damping": 1e-2, "lr_grid": [0.1, 0.3, 1]}'
    # the search behind the default KL clip's schedule ({"start", "scale", "power"} in the
    # JSON is kfac.InverseDecay); --per-lr adds every run's final loss and last-5-epoch mean
    python benchmarks/kfac_defaults.py --epochs 30 --stem kfac_clip_search_long --tasks cnn \
        transformer --only --per-lr --trace \
        --config 'T50p2={"kl_clip": {"start": 1e-3, "scale": 50, "power": 2}}'
    # another seed at each optimizer's best learning rate of seed 0
    python benchmarks/kfac_defaults.py --epochs 30 --seed 1 --stem kfac_defaults_long_seeds_1 \
        --tasks cnn --only "KFAC(model, lr) defaults" "sgd (momentum 0.9)" adam \
        --grid "KFAC(model, lr) defaults=10" --grid "sgd (momentum 0.9)=0.1" --grid adam=0.01

Writes benchmarks/results/kfac_defaults.{json,md}.
"""

from __future__ import annotations

import os

os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "4")

import argparse
import contextlib
import json
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from kfac import KFAC, InverseDecay, _engine, data, models, preset
from kfac.__main__ import RunConfig, train

TASKS = {
    # name: (model, width)
    "mlp": ("mlp", 0.5),
    "autoencoder": ("autoencoder", 0.5),
    "cnn": ("cnn", 1.0),
    "transformer": ("transformer", 1.0),
}
#: The quadratic-model step with adaptive damping (no clip, no momentum, no learning rate to
#: tune): the grid is over the initial damping instead.
QUADRATIC = {
    "lr": 1.0,
    "factor_every": 1,
    "inverse_every": 10,
    "damping_scheme": "factored",
    "factor_init": "zero",
    "adaptive_damping": True,
    "quadratic_step": True,
}
CONFIGS: dict[str, tuple[list[float], Any]] = {
    "sgd (momentum 0.9)": (
        [0.03, 0.1, 0.3],
        lambda m, lr, loss: torch.optim.SGD(m.parameters(), lr=lr, momentum=0.9),
    ),
    "adam": ([1e-4, 1e-3, 1e-2], lambda m, lr, loss: torch.optim.Adam(m.parameters(), lr=lr)),
    "KFAC(model, lr) defaults": ([0.1, 1.0, 10.0], lambda m, lr, loss: KFAC(m, lr=lr)),
    "KFAC, thesis preset": (
        [0.03, 0.1, 0.3],
        lambda m, lr, loss: KFAC(m, lr=lr, **preset("thesis")),
    ),
    "KFAC, command-line settings": (
        [0.1, 0.3, 1.0],
        lambda m, lr, loss: KFAC(m, lr=lr, **preset("command-line")),
    ),
    # grid: the initial damping
    "K-FAC, quadratic step + adaptive damping": (
        [1e-5, 1e-4, 1e-3],
        lambda m, d, loss: KFAC(m, damping=d, loss_fn=loss, **QUADRATIC),
    ),
    "B-KFAC rank 64, quadratic step + adaptive damping": (
        [1e-5, 1e-4, 1e-3],
        lambda m, d, loss: KFAC(
            m,
            inverse="brand",
            rank=64,
            identity_clock="batches",
            damping=d,
            loss_fn=loss,
            **QUADRATIC,
        ),
    ),
}


@contextlib.contextmanager
def _clip_scales(scales: list[list[float]], on: bool) -> Iterator[None]:
    """Record the KL clip's scale of every step (a list per step: one value) while ``on``."""
    if not on:
        yield
        return
    original = _engine.kl_clip_scale

    def recording(terms: Any, kappa: float) -> torch.Tensor:
        nu = original(terms, kappa)
        scales.append([float(nu)])
        return nu

    _engine.kl_clip_scale = recording
    try:
        yield
    finally:
        _engine.kl_clip_scale = original


def _trace(curve: list[float], scales: list[list[float]], per_epoch: int) -> dict[str, Any]:
    """The loss after every epoch and the clip scale's median and minimum in each epoch."""
    values = [s[0] for s in scales]
    epochs = [values[i : i + per_epoch] for i in range(0, len(values), per_epoch)]
    return {
        "loss": curve,
        "clip_median": [float(torch.tensor(e).median()) for e in epochs],
        "clip_min": [min(e) for e in epochs],
    }


def _from_json(value: Any) -> Any:
    """An option's JSON value as ``KFAC`` takes it: a mapping with ``"start"`` is a schedule."""
    if isinstance(value, dict) and "start" in value:
        unknown = sorted(set(value) - {"start", "scale", "power"})
        if unknown:
            raise SystemExit(f"schedule {value}: unknown keys {unknown}")
        return InverseDecay(**value)
    return value


def _last(curve: list[float], k: int = 5) -> float:
    """The mean loss over the last ``k`` evaluations (an oscillating run's final value is
    partly luck); infinite for a diverged run."""
    return sum(curve[-k:]) / len(curve[-k:]) if curve else math.inf


def _criterion(rows: dict[str, Any], config: str = "KFAC(model, lr) defaults") -> str:
    """``config``'s loss over SGD's and over Adam's, and whether the criterion holds."""
    names = (config, "sgd (momentum 0.9)", "adam")
    if not all(n in rows for n in names):
        return "-"
    ours, sgd, adam = (rows[n]["best"] for n in names)
    met = ours < sgd and ours <= 1.05 * adam
    return f"{ours / sgd:.3g}, {ours / adam:.3g}: " + ("met" if met else "**missed**")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--epochs", type=int, default=7)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"))
    parser.add_argument(
        "--only",
        nargs="*",
        default=None,
        metavar="CONFIG",
        help="run only these configurations (and those of --config; `--only` alone: only "
        "those, or none: the tables are rewritten from the JSON); the others' rows are kept "
        "from the existing JSON of the same epochs and seed (same batches and code for them), "
        "if there is one",
    )
    parser.add_argument("--stem", default="kfac_defaults")
    parser.add_argument(
        "--config",
        action="append",
        default=[],
        metavar="NAME=JSON",
        help="an extra KFAC(model, lr, **JSON) configuration (repeatable); the JSON's optional "
        '"lr_grid" (three values) replaces the grid 0.1, 1, 10',
    )
    parser.add_argument(
        "--grid",
        action="append",
        default=[],
        metavar="NAME=LR[,LR...]",
        help="replace the named configuration's learning-rate grid (repeatable), e.g. a "
        "seed's check at each optimizer's best learning rate of seed 0; the table says 'one "
        "value' for a grid of one",
    )
    parser.add_argument("--tasks", nargs="+", default=None, choices=list(TASKS))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--trace",
        action="store_true",
        help="keep each run's loss curve (every epoch) and, for a KFAC run with a KL clip, "
        "the clip's scale (median and minimum over each epoch's steps) in the JSON",
    )
    parser.add_argument(
        "--per-lr",
        action="store_true",
        help="add a table of every run (each learning rate's final loss and mean of the last "
        "five epochs) and each configuration's criterion against SGD's and Adam's rows",
    )
    parser.add_argument(
        "--middle",
        action="store_true",
        help="run only the middle value of each grid (a long run's budget); the table says so",
    )
    args = parser.parse_args()
    configs = dict(CONFIGS)
    specs: dict[str, str] = {}
    for spec in args.config:
        name, sep, text = spec.partition("=")
        specs[name] = text
        if not sep:
            parser.error(f"--config {spec!r}: expected NAME=JSON")
        options = json.loads(text)
        grid = [float(v) for v in options.pop("lr_grid", [0.1, 1.0, 10.0])]
        if len(grid) != 3:
            parser.error(f"--config {name!r}: lr_grid needs three values")
        options = {key: _from_json(value) for key, value in options.items()}
        configs[name] = (grid, lambda m, lr, loss, o=options: KFAC(m, lr=lr, **o))
    for spec in args.grid:
        name, sep, text = spec.partition("=")
        if not sep or name not in configs:
            parser.error(f"--grid {spec!r}: expected NAME=LR[,LR...] with NAME a configuration")
        configs[name] = ([float(v) for v in text.split(",")], configs[name][1])
    ds = data.digits28()
    epochs = 1 if args.quick else args.epochs
    tasks = {"mlp": ("mlp", 0.1)} if args.quick else TASKS
    if args.tasks is not None and not args.quick:
        tasks = {t: TASKS[t] for t in args.tasks}
    out = Path(args.out)
    stem = args.stem + ("_quick" if args.quick else "")
    results: dict[str, dict[str, Any]] = {}
    only = args.only
    if only is not None and args.config:
        only = [*only, *(spec.partition("=")[0] for spec in args.config)]
    if only is not None:
        unknown = sorted(set(only) - set(configs))
        if unknown:
            parser.error(f"--only: unknown configurations {unknown}")
        path = out / f"{stem}.json"
        if path.exists():
            previous = json.loads(path.read_text())
            kept = (previous["epochs"], previous.get("seed", 0))
            if kept != (epochs, args.seed):
                raise SystemExit(
                    f"--only: {stem}.json has (epochs, seed) {kept}, not {(epochs, args.seed)}"
                )
            results = previous["results"]
            specs = {**previous.get("configs", {}), **specs}
    for task, (model, width) in tasks.items():
        results.setdefault(task, {})
        loss_fn = F.mse_loss if models.MODELS[model][1] == "mse" else F.cross_entropy
        for name, (grid, make) in configs.items():
            if only is not None and name not in only:
                continue
            runs, lasts, traces = {}, {}, {}
            for lr in grid[1:2] if args.middle else grid:
                cfg = RunConfig(
                    optimizer="sgd", model=model, width=width, epochs=epochs, seed=args.seed,
                    max_train=256 if args.quick else None, label=name,
                )  # fmt: skip
                scales: list[list[float]] = []
                try:
                    with _clip_scales(scales, args.trace):
                        result = train(
                            cfg,
                            ds,
                            progress=False,
                            make_optimizer=lambda m, lr=lr, f=make, loss=loss_fn: f(m, lr, loss),
                        )
                    loss = result.train_loss[-1]
                    curve = result.train_loss
                except FloatingPointError:
                    loss, curve = math.inf, []
                runs[str(lr)] = loss
                lasts[str(lr)] = _last(curve)
                if args.trace:
                    traces[str(lr)] = _trace(curve, scales, math.ceil(len(ds.x_train) / 128))
                print(
                    f"{task:12s} {name:30s} lr {lr:<7g} final loss {loss:.4g} "
                    f"last 5 {lasts[str(lr)]:.4g}",
                    flush=True,
                )
                if args.trace:
                    for key, values in traces[str(lr)].items():
                        print(f"  {key:11s}", " ".join(f"{v:.2g}" for v in values), flush=True)
            best = min(runs, key=lambda k: runs[k])
            results[task][name] = {
                "losses": runs,
                "last5": lasts,
                "best_lr": float(best),
                "best": runs[best],
            }
            if args.trace:
                results[task][name]["trace"] = traces
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.json").write_text(
        json.dumps(
            {"epochs": epochs, "seed": args.seed, "configs": specs, "results": results}, indent=1
        )
    )
    # the configurations of this run, then those of earlier --config runs kept in the JSON
    names = [*configs, *(n for n in specs if n not in configs)]
    shown = [n for n in names if any(n in rows for rows in results.values())]
    lines = [
        "# `KFAC(model, lr)` defaults against SGD and Adam",
        "",
        f"Final training loss after {epochs} epochs of batch 128 on the digits (seed "
        f"{args.seed}), the best of a three-point learning-rate grid (in brackets; for the "
        "quadratic-model step, which has no learning rate, a grid of the initial damping); "
        "`inf`: every grid point diverged. The last column is the criterion for the "
        "defaults: below SGD's loss, and below Adam's or within 5% of it. "
        f"`python benchmarks/kfac_defaults.py --epochs {epochs}"
        + ("" if args.stem == "kfac_defaults" else f" --stem {args.stem}")
        + ("" if args.seed == 0 else f" --seed {args.seed}")
        + "` (configurations run with `--only` keep the others' rows from the previous run).",
        "",
        "| task | " + " | ".join(shown) + " | defaults / SGD, / Adam |",
        "|---|" + "---|" * (len(shown) + 1),
    ]
    for task, rows in results.items():
        cells = [
            f"{rows[n]['best']:.4g} ({rows[n]['best_lr']:g}"
            + ("" if len(rows[n]["losses"]) > 1 else ", one value")
            + ")"
            if n in rows
            else "-"
            for n in shown
        ]
        lines.append(
            f"| {task} (width {tasks.get(task, TASKS.get(task))[1]:g}) | "
            + " | ".join(cells)
            + f" | {_criterion(rows)} |"
        )
    if args.per_lr:
        lines += [
            "",
            "Every run: final loss / mean of the last five epochs' losses, per learning rate "
            "(a schedule `InverseDecay(start, scale, power)` is `start / (1 + step / scale) ** "
            "power`); the last column is the criterion for the configuration's best final loss.",
            "",
            "| task | configuration | runs (lr: final / last 5) | / SGD, / Adam |",
            "|---|---|---|---|",
        ]
        for task, rows in results.items():
            for n in shown:
                if n not in rows or n in ("sgd (momentum 0.9)", "adam"):
                    continue
                row = rows[n]
                runs = "; ".join(
                    f"{float(lr):g}: {loss:.3g}"
                    + (f" / {row['last5'][lr]:.3g}" if "last5" in row else "")
                    for lr, loss in row["losses"].items()
                )
                lines.append(f"| {task} | {n} | {runs} | {_criterion(rows, n)} |")
        extra = [n for n in shown if n in specs]
        if extra:
            lines += ["", "Configurations of `--config` (keyword arguments of `KFAC`):", ""]
            lines += [f"- {n}: `{specs[n]}`" for n in extra]
    text = "\n".join(lines) + "\n"
    (out / f"{stem}.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
