"""How ``kfac.KFAC(model, lr)`` with the library defaults does against SGD with momentum and
Adam, each with a three-point learning-rate grid, at equal steps, on the command line's
tasks (the record behind the defaults discussion in docs/kfac.md).

Configurations: SGD (momentum 0.9), Adam, ``KFAC`` with the library defaults (the thesis'
long-run settings: factors every 20 steps, inverses every 100, relative damping 0.1, no
momentum, no clip) and ``KFAC`` with the command line's settings (factors every step,
inverses every 10, relative damping 3e-3, KL clip 1e-4, momentum 0.9). Every run starts from
the same weights and sees the same batches (seed 0); the best final training loss over the
grid is reported (a diverged run counts as infinite).

    python benchmarks/kfac_defaults.py            # 7 epochs (84 steps) per task
    python benchmarks/kfac_defaults.py --quick    # smoke run

Writes benchmarks/results/kfac_defaults.{json,md}.
"""

from __future__ import annotations

import os

os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "4")

import argparse
import json
import math
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from kfac import KFAC, data, models
from kfac.__main__ import RunConfig, train

TASKS = {
    # name: (model, width)
    "mlp": ("mlp", 0.5),
    "autoencoder": ("autoencoder", 0.5),
    "cnn": ("cnn", 1.0),
    "transformer": ("transformer", 1.0),
}
CLI = {
    "factor_every": 1,
    "inverse_every": 10,
    "damping": 3e-3,
    "kl_clip": 1e-4,
    "momentum": 0.9,
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
    "KFAC(model, lr) defaults": ([0.03, 0.1, 0.3], lambda m, lr, loss: KFAC(m, lr=lr)),
    "KFAC, command-line settings": (
        [0.1, 0.3, 1.0],
        lambda m, lr, loss: KFAC(m, lr=lr, **CLI),
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--epochs", type=int, default=7)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"))
    parser.add_argument(
        "--only",
        nargs="+",
        default=None,
        choices=list(CONFIGS),
        metavar="CONFIG",
        help="run only these configurations; the others' rows are kept from the existing "
        "JSON of the same epochs (same seeds, batches and code for them)",
    )
    parser.add_argument("--stem", default="kfac_defaults")
    args = parser.parse_args()
    ds = data.digits28()
    epochs = 1 if args.quick else args.epochs
    tasks = {"mlp": ("mlp", 0.1)} if args.quick else TASKS
    out = Path(args.out)
    stem = args.stem + ("_quick" if args.quick else "")
    results: dict[str, dict[str, Any]] = {}
    if args.only is not None:
        previous = json.loads((out / f"{stem}.json").read_text())
        if previous["epochs"] != epochs:
            raise SystemExit(f"--only: {stem}.json has {previous['epochs']} epochs, not {epochs}")
        results = previous["results"]
    for task, (model, width) in tasks.items():
        results.setdefault(task, {})
        loss_fn = F.mse_loss if models.MODELS[model][1] == "mse" else F.cross_entropy
        for name, (grid, make) in CONFIGS.items():
            if args.only is not None and name not in args.only:
                continue
            runs = {}
            for lr in grid:
                cfg = RunConfig(
                    optimizer="sgd", model=model, width=width, epochs=epochs, seed=0,
                    max_train=256 if args.quick else None, label=name,
                )  # fmt: skip
                try:
                    result = train(
                        cfg,
                        ds,
                        progress=False,
                        make_optimizer=lambda m, lr=lr, f=make, loss=loss_fn: f(m, lr, loss),
                    )
                    loss = result.train_loss[-1]
                except FloatingPointError:
                    loss = math.inf
                runs[str(lr)] = loss
                print(f"{task:12s} {name:30s} lr {lr:<7g} final loss {loss:.4g}", flush=True)
            best = min(runs, key=lambda k: runs[k])
            results[task][name] = {"losses": runs, "best_lr": float(best), "best": runs[best]}
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.json").write_text(json.dumps({"epochs": epochs, "results": results}, indent=1))
    lines = [
        "# `KFAC(model, lr)` defaults against SGD and Adam",
        "",
        f"Final training loss after {epochs} epochs of batch 128 on the digits (seed 0), the "
        "best of a three-point learning-rate grid (in brackets; for the quadratic-model step, "
        "which has no learning rate, a grid of the initial damping); `inf`: every grid point "
        f"diverged. `python benchmarks/kfac_defaults.py --epochs {epochs}`.",
        "",
        "| task | " + " | ".join(CONFIGS) + " |",
        "|---|" + "---|" * len(CONFIGS),
    ]
    for task, rows in results.items():
        cells = [
            f"{rows[n]['best']:.4g} ({rows[n]['best_lr']:g})" if n in rows else "-"
            for n in CONFIGS
        ]
        lines.append(f"| {task} (width {tasks[task][1]:g}) | " + " | ".join(cells) + " |")
    text = "\n".join(lines) + "\n"
    (out / f"{stem}.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
