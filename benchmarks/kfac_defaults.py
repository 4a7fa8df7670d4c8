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

from kfac import KFAC, data
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
CONFIGS: dict[str, tuple[list[float], Any]] = {
    "sgd (momentum 0.9)": (
        [0.03, 0.1, 0.3],
        lambda m, lr: torch.optim.SGD(m.parameters(), lr=lr, momentum=0.9),
    ),
    "adam": ([1e-4, 1e-3, 1e-2], lambda m, lr: torch.optim.Adam(m.parameters(), lr=lr)),
    "KFAC(model, lr) defaults": ([0.03, 0.1, 0.3], lambda m, lr: KFAC(m, lr=lr)),
    "KFAC, command-line settings": ([0.1, 0.3, 1.0], lambda m, lr: KFAC(m, lr=lr, **CLI)),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--epochs", type=int, default=7)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = parser.parse_args()
    ds = data.digits28()
    epochs = 1 if args.quick else args.epochs
    tasks = {"mlp": ("mlp", 0.1)} if args.quick else TASKS
    results: dict[str, dict[str, Any]] = {}
    for task, (model, width) in tasks.items():
        results[task] = {}
        for name, (grid, make) in CONFIGS.items():
            runs = {}
            for lr in grid:
                cfg = RunConfig(
                    optimizer="sgd", model=model, width=width, epochs=epochs, seed=0,
                    max_train=256 if args.quick else None, label=name,
                )  # fmt: skip
                try:
                    result = train(
                        cfg, ds, progress=False, make_optimizer=lambda m, lr=lr, f=make: f(m, lr)
                    )
                    loss = result.train_loss[-1]
                except FloatingPointError:
                    loss = math.inf
                runs[str(lr)] = loss
                print(f"{task:12s} {name:30s} lr {lr:<7g} final loss {loss:.4g}", flush=True)
            best = min(runs, key=lambda k: runs[k])
            results[task][name] = {"losses": runs, "best_lr": float(best), "best": runs[best]}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = "kfac_defaults" + ("_quick" if args.quick else "")
    (out / f"{stem}.json").write_text(json.dumps({"epochs": epochs, "results": results}, indent=1))
    lines = [
        "# `KFAC(model, lr)` defaults against SGD and Adam",
        "",
        f"Final training loss after {epochs} epochs of batch 128 on the digits (seed 0), the "
        "best of a three-point learning-rate grid (in brackets); `inf`: every grid point "
        "diverged. `python benchmarks/kfac_defaults.py`.",
        "",
        "| task | " + " | ".join(CONFIGS) + " |",
        "|---|" + "---|" * len(CONFIGS),
    ]
    for task, rows in results.items():
        cells = [f"{rows[n]['best']:.4g} ({rows[n]['best_lr']:g})" for n in CONFIGS]
        lines.append(f"| {task} (width {tasks[task][1]:g}) | " + " | ".join(cells) + " |")
    text = "\n".join(lines) + "\n"
    (out / f"{stem}.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
