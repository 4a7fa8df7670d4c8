"""Time per step of dense K-FAC (``inverse="eigh"``) against ASDL's ``KfacGradientMaker``.

The K-FAC paper's digits autoencoder 784-1000-500-250-30 (``--width 1``), batch 128, both
optimizers with the same factor period (every step), inverse period (``--inverse-every``,
10) and EA decay (0.95), the empirical Fisher for both, same initial weights and batches.
The methods run side by side in one process, alternating blocks of one inverse period (each
block has one refresh and ``inverse_every`` factor updates), single-threaded; the medians
of the blocks' per-step times are reported as process CPU time and wall time.

Methods:

``kfac``
    ``kfac.KFAC(model, lr=0.3, inverse="eigh")`` with the command line's settings (damping
    3e-3 factored-relative, KL clip 1e-4, momentum 0.9): dense damped factor inverses
    prepared at each refresh, and the directions of the wide Linear layers from their
    ``N = 128`` rows, ``(I_G g^T)(I_A a^T)^T``, with the factors' averages updated by one
    product from the same rows.
``kfac-pi-noclip``
    ``kfac`` with ASDL's settings: its damping scheme (``"pi"``), no KL clip (ASDL has
    none), lr 1e-3.
``kfac-dense``
    ``kfac`` with ``factored_apply=False``: ``I_G V I_A`` with the dense inverses, two
    ``D x D x n`` products per layer.
``kfac-before``
    The hot path before both changes (``factored_apply=False`` and each factor's damped
    inverse applied in its thin form ``U diag(c) U^T V + o V``: four products per layer).
``asdl``
    ``asdl.KfacGradientMaker(model, config, fisher_type="fisher_emp")`` (pi-adjusted
    Tikhonov damping, Cholesky inverses) and ``torch.optim.SGD`` with momentum 0.9.

ASDL is ``pip install --no-deps asdfghjkl`` (import name ``asdl``; not a dependency of this
package). Without it the script says so and exits. ASDL wraps its phases in
``torch.cuda.nvtx`` ranges, which fail on a CPU-only torch: they are replaced by no-ops here.

    OMP_NUM_THREADS=1 python benchmarks/kfac_asdl.py              # width 1, 12 blocks
    python benchmarks/kfac_asdl.py --quick                         # smoke run

Writes benchmarks/results/kfac_asdl.{json,md}.
"""

from __future__ import annotations

import os

os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "4")

import argparse
import contextlib
import copy
import json
import platform
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

import kfac
import lowrank_nla as ln
from kfac import _damping, data, models

METHODS = ["kfac", "kfac-pi-noclip", "kfac-dense", "kfac-before", "asdl"]
LR = {"kfac": 0.3, "kfac-pi-noclip": 1e-3, "kfac-dense": 0.3, "kfac-before": 0.3, "asdl": 1e-3}
DAMPING = dict.fromkeys(METHODS, 3e-3)
DECAY = 0.95


def asdl_available() -> bool:
    try:
        _import_asdl()
    except ImportError:
        return False
    return True


def _import_asdl() -> Any:
    """``asdl`` with its NVTX ranges made no-ops when torch has no CUDA."""
    if not torch.cuda.is_available():
        torch.cuda.nvtx.range_push = lambda *args, **kwargs: 0  # type: ignore[assignment]
        torch.cuda.nvtx.range_pop = lambda *args, **kwargs: 0  # type: ignore[assignment]
    import asdl

    return asdl


@contextlib.contextmanager
def thin_factor_inverses() -> Iterator[None]:
    """Prepare every factor inverse in the thin form (the hot path before the dense one)."""
    original = _damping.factor_inverse

    def thin(rep: Any, *, damping: float, tail: float, validate: bool) -> Any:
        return ln.damped_inverse(rep, damping=damping, tail=tail, validate=validate)

    _damping.factor_inverse = thin  # type: ignore[assignment]
    try:
        yield
    finally:
        _damping.factor_inverse = original  # type: ignore[assignment]


class Runner:
    """One method's model and optimizer; :meth:`steps` runs a block of training steps."""

    def __init__(self, name: str, model: nn.Module, inverse_every: int) -> None:
        self.name = name
        self.model = model
        self.context: Callable[[], Any] = contextlib.nullcontext
        if name.startswith("kfac"):
            self.opt = kfac.KFAC(
                model,
                lr=LR[name],
                momentum=0.9,
                inverse="eigh",
                damping=DAMPING[name],
                damping_scheme="pi" if name == "kfac-pi-noclip" else "factored-relative",
                kl_clip=None if name == "kfac-pi-noclip" else 1e-4,
                factor_every=1,
                inverse_every=inverse_every,
                factor_decay=DECAY,
                factored_apply=name in ("kfac", "kfac-pi-noclip"),
            )
            if name == "kfac-before":
                self.context = thin_factor_inverses
            self.gm = None
        else:
            asdl = _import_asdl()
            config = asdl.PreconditioningConfig(
                data_size=1,  # the loss is a batch mean already
                damping=DAMPING[name],
                preconditioner_upd_interval=inverse_every,
                curvature_upd_interval=1,
                ema_decay=1 - DECAY,
            )
            self.gm = asdl.KfacGradientMaker(model, config, fisher_type="fisher_emp")
            self.opt = torch.optim.SGD(model.parameters(), lr=LR[name], momentum=0.9)

    def step(self, x: torch.Tensor) -> float:
        self.opt.zero_grad()
        if self.gm is None:
            loss = F.mse_loss(self.model(x), x.flatten(1))
            loss.backward()
        else:
            dummy_y = self.gm.setup_model_call(self.model, x)
            self.gm.setup_loss_call(F.mse_loss, dummy_y, x.flatten(1))
            _, loss = self.gm.forward_and_backward()
        self.opt.step()
        return float(loss.detach())

    def steps(self, batches: list[torch.Tensor]) -> tuple[float, float, float]:
        """(CPU seconds, wall seconds, last loss) of the block."""
        with self.context():
            cpu, wall = time.process_time(), time.perf_counter()
            losses = [self.step(x) for x in batches]
            return time.process_time() - cpu, time.perf_counter() - wall, losses[-1]


@torch.no_grad()
def train_loss(model: nn.Module, x: torch.Tensor) -> float:
    return float(F.mse_loss(model(x), x.flatten(1)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny model, 3 blocks")
    parser.add_argument("--width", type=float, default=1.0)
    parser.add_argument("--blocks", type=int, default=12, help="blocks per method")
    parser.add_argument("--inverse-every", type=int, default=10)
    parser.add_argument("--methods", nargs="+", default=METHODS, choices=METHODS)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"))
    parser.add_argument("--stem", default="kfac_asdl", help="name of the result files")
    args = parser.parse_args()
    width, blocks = (0.1, 3) if args.quick else (args.width, args.blocks)
    methods = list(args.methods)
    if "asdl" in methods and not asdl_available():
        print(
            "kfac_asdl.py: ASDL is not installed (pip install --no-deps asdfghjkl); "
            "nothing measured",
            file=sys.stderr,
        )
        sys.exit(0)
    torch.set_num_threads(1)
    ds = data.digits28()
    x_train = ds.x_train
    torch.manual_seed(0)
    base = models.autoencoder(784, width)
    runners = [Runner(name, copy.deepcopy(base), args.inverse_every) for name in methods]
    gen = torch.Generator().manual_seed(0)
    n, bs = x_train.shape[0], 128
    # one stream of shuffled passes over the data, cut into full batches
    per_block = bs * args.inverse_every
    passes = 1 + per_block * blocks // n
    order = torch.cat([torch.randperm(n, generator=gen) for _ in range(passes)])
    cpu: dict[str, list[float]] = {name: [] for name in methods}
    wall: dict[str, list[float]] = {name: [] for name in methods}
    start = time.perf_counter()
    for block in range(blocks):
        base_pos = block * per_block
        idx = [
            order[base_pos + i * bs : base_pos + (i + 1) * bs] for i in range(args.inverse_every)
        ]
        batch = [x_train[i] for i in idx]
        rotation = runners[block % len(runners) :] + runners[: block % len(runners)]
        for runner in rotation:  # alternate, rotating who goes first
            c, w, _ = runner.steps(batch)
            cpu[runner.name].append(c / args.inverse_every)
            wall[runner.name].append(w / args.inverse_every)
        print(f"block {block}: " + ", ".join(f"{k} {1e3 * v[-1]:.0f} ms" for k, v in cpu.items()))
    losses = {r.name: train_loss(r.model, x_train) for r in runners}
    first = train_loss(base, x_train)
    summary = {
        name: {
            "cpu_ms_per_step": 1e3 * statistics.median(cpu[name][1:] or cpu[name]),
            "wall_ms_per_step": 1e3 * statistics.median(wall[name][1:] or wall[name]),
            "train_loss": losses[name],
        }
        for name in methods
    }
    meta = {
        "device": f"CPU ({platform.machine()}), 1 thread",
        "torch": torch.__version__,
        "asdl": _version("asdfghjkl"),
        "width": width,
        "blocks": blocks,
        "inverse_every": args.inverse_every,
        "factor_every": 1,
        "factor_decay": DECAY,
        "lr": {k: LR[k] for k in methods},
        "damping": {k: DAMPING[k] for k in methods},
        "initial_loss": first,
        "seconds": time.perf_counter() - start,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = args.stem + ("_quick" if args.quick else "")
    (out / f"{stem}.json").write_text(
        json.dumps({"meta": meta, "summary": summary, "cpu": cpu, "wall": wall}, indent=1)
    )
    text = markdown(summary, meta)
    (out / f"{stem}.md").write_text(text)
    print(text)


def _version(dist: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return None


def markdown(summary: dict[str, Any], meta: dict[str, Any]) -> str:
    ref = summary.get("asdl")
    lines = [
        "# Dense K-FAC against ASDL's K-FAC: time per step, inverses every "
        f"{meta['inverse_every']} steps",
        "",
        f"Digits autoencoder at width {meta['width']:g}, batch 128, factors every step, "
        f"inverses every {meta['inverse_every']} steps, EA decay {meta['factor_decay']}; "
        f"{meta['device']}, torch {meta['torch']}, asdfghjkl {meta['asdl']}. Medians over "
        f"{meta['blocks'] - 1} blocks of {meta['inverse_every']} steps (the first block is "
        "warm-up), methods alternating block by block. Training loss after "
        f"{meta['blocks'] * meta['inverse_every']} steps (initial {meta['initial_loss']:.4f}) "
        f"with lr {meta['lr']}.",
        "",
        "| method | CPU ms/step | vs ASDL | wall ms/step | vs ASDL | training loss |",
        "|---|---|---|---|---|---|",
    ]
    for name, row in summary.items():
        cpu_ratio = (
            "-" if ref is None else f"{row['cpu_ms_per_step'] / ref['cpu_ms_per_step']:.2f}"
        )
        wall_ratio = (
            "-" if ref is None else f"{row['wall_ms_per_step'] / ref['wall_ms_per_step']:.2f}"
        )
        lines.append(
            f"| {name} | {row['cpu_ms_per_step']:.1f} | {cpu_ratio} | "
            f"{row['wall_ms_per_step']:.1f} | {wall_ratio} | {row['train_loss']:.4f} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
