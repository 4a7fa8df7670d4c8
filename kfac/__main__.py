"""``python -m kfac``: train one optimizer or compare several on the same task.

Examples::

    python -m kfac train --optimizer kfac --model autoencoder --epochs 5
    python -m kfac compare --optimizers sgd adam kfac --model mlp --plot compare.png
    python -m kfac compare --optimizers adam muon bkfac --model autoencoder

``muon``, ``soap``, ``psgd-kron`` and ``shampoo`` are optimizers of the ``pytorch-optimizer``
package (``pip install "lowrank-kfac[bench]"``), see :data:`PEERS`.

    torchrun --nproc-per-node 2 -m kfac train --optimizer rkfac --model autoencoder

The default data are scikit-learn's bundled digits resized to 28x28 (no download); ``--data``
reads MNIST IDX files, CIFAR-10 pickles or an ``.npz``. Every optimizer starts from the same
initial weights and sees the same batches (``--seed``). Wall time counts only the training
steps: the evaluations between them are excluded.

Under ``torchrun`` (``WORLD_SIZE > 1``) the process group is initialised (gloo, or NCCL with
a CUDA ``--device``, one GPU per local rank), every global batch of ``--batch-size`` samples is
split into one contiguous shard per process (so the global batches are the single-process
run's), the gradients are averaged with one all-reduce (each weighted by its shard's share
of the global batch, so uneven shards give the global batch's gradient too), the
preconditioners run distributed (:mod:`kfac.distributed`), rank 0 alone evaluates and prints,
and a table of every rank's phase times closes the run. Every global batch, the last one
included, needs at least one sample per process.
"""

from __future__ import annotations

import argparse
import json
import math
import numbers
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn import functional as F

from . import data as datasets
from . import models
from ._kron import inverse_names
from .fngd import FNGD
from .kld_wrm import PAPER_RHO, QEKLDWRM, QKLDWRM, SOKLDWRM
from .mbf import MBF
from .optimizer import KFAC
from .seng import SENG

#: Default learning rates (``--lr`` overrides). K-FAC's (with damping 3e-3, KL clip 1e-4,
#: momentum 0.9) were chosen on the digits autoencoder at width 0.25; see docs/kfac.md.
#: KLD-WRM's on mnist-cnn with the paper's KL clip 0.1 and momentum 0
#: (benchmarks/results/kfac_kld_wrm_grid.md).
DEFAULT_LR = {
    "sgd": 0.1,
    "adam": 1e-3,
    "adamw": 1e-3,
    "muon": 0.02,
    "soap": 3e-3,
    "psgd-kron": 1e-3,
    "shampoo": 1e-3,
    "kfac": 0.3,
    "mbf": 0.3,
    "fngd": 0.3,
    "seng": 0.3,
    "so-kld-wrm": 0.1,
    "q-kld-wrm": 0.1,
    "qe-kld-wrm": 0.1,
}

#: The KLD-WRM optimizers by command-line name (Puiu 2022; docs/algorithms.md).
KLD_WRM: dict[str, Any] = {"so-kld-wrm": SOKLDWRM, "q-kld-wrm": QKLDWRM, "qe-kld-wrm": QEKLDWRM}

#: KLD-WRM's command-line defaults (``--damping``, ``--factor-every``, ``--inverse-every``,
#: ``--factor-decay``, ``--rms-clip``): the paper's MNIST values (absolute eigenbasis damping
#: 0.01, both periods 30, ``rho`` 0.33 for SO and 0.5 for Q and QE, Q's RMS clip 2).
KLD_WRM_DEFAULTS: dict[str, dict[str, Any]] = {
    name: {
        "damping": 0.01,
        "factor_every": 30,
        "inverse_every": 30,
        "factor_decay": rho,
        "rms_clip": None if name == "so-kld-wrm" else 2.0,
    }
    for name, rho in PAPER_RHO.items()
}

#: MBF's command-line defaults (``--damping``, ``--factor-every``, ``--inverse-every`` and
#: the block size, which ``--inverse-options`` overrides), chosen with lr 0.3 and KL clip 1e-4
#: on the digits autoencoder (benchmarks/kfac_mbf.py, docs/guide/optimizers.md).
MBF_DEFAULTS: dict[str, Any] = {
    "damping": 0.1,
    "factor_every": 20,
    "inverse_every": 20,
    "block_size": 4,
}

#: FNGD's and SENG's command-line defaults (``--damping``; SENG's ``--inverse-every`` is its
#: ``update_freq``), chosen on the digits CNN (benchmarks/kfac_fngd.py, docs/kfac.md).
FNGD_DEFAULTS: dict[str, Any] = {"damping": 0.1, "factor_every": 1, "inverse_every": 1}
SENG_DEFAULTS: dict[str, Any] = {"damping": 0.1, "factor_every": 10, "inverse_every": 10}
METHOD_DEFAULTS = {"mbf": MBF_DEFAULTS, "fngd": FNGD_DEFAULTS, "seng": SENG_DEFAULTS}

#: Optimizers of the ``pytorch-optimizer`` package by command-line name: the class and its
#: options besides ``lr`` (the library's defaults otherwise). ``muon``: ``Muon`` on the
#: weight of every ``nn.Linear`` and ``nn.Conv2d`` (a convolution's kernel as its flattened
#: ``(out, in * k * k)`` matrix), with the library's AdamW fallback (``use_muon=False``, lr
#: :data:`MUON_ADAMW_LR`) for every other parameter: biases, norm gains, the Transformer's
#: position table. ``shampoo`` recomputes its matrix roots every 10 steps (every step by
#: default: minutes per epoch on the width-1 autoencoder).
PEERS: dict[str, tuple[str, dict[str, Any]]] = {
    "muon": ("Muon", {}),
    "soap": ("SOAP", {}),
    "psgd-kron": ("Kron", {}),
    "shampoo": ("Shampoo", {"preconditioning_compute_steps": 10}),
}
#: Learning rate of Muon's AdamW group (the command line's Adam default).
MUON_ADAMW_LR = 1e-3


def _peer(name: str, model: nn.Module, lr: float) -> torch.optim.Optimizer:
    """The ``pytorch-optimizer`` optimizer ``name`` of :data:`PEERS` over ``model``."""
    try:
        import pytorch_optimizer
    except ImportError:
        raise ValueError(
            f"optimizer {name!r} is pytorch-optimizer's {PEERS[name][0]}, which is not "
            "installed: pip install pytorch-optimizer (or the bench extra, "
            "pip install 'lowrank-kfac[bench]')"
        ) from None
    cls_name, options = PEERS[name]
    cls = getattr(pytorch_optimizer, cls_name)
    if name != "muon":
        return cls(model.parameters(), lr=lr, **options)
    matrices = {
        id(m.weight)
        for m in model.modules()
        if isinstance(m, (nn.Linear, nn.Conv2d)) and m.weight.requires_grad
    }
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if id(p) in matrices], "lr": lr, "use_muon": True},
        {
            "params": [p for p in params if id(p) not in matrices],
            "lr": MUON_ADAMW_LR,
            "use_muon": False,
        },
    ]
    return cls([g for g in groups if g["params"]], **options)


#: The K-FAC variants' command-line defaults with ``--quadratic-step`` or
#: ``--adaptive-damping`` (absolute Tikhonov damping, and the bias-corrected zero
#: initialisation of the factors through :data:`QUADRATIC_INVERSE_OPTIONS`), measured on the
#: digits autoencoder (docs/kfac.md, "Steps without a clip").
QUADRATIC_DEFAULTS: dict[str, Any] = {"damping": 1e-4, "damping_scheme": "factored"}
QUADRATIC_INVERSE_OPTIONS: dict[str, Any] = {"factor_init": "zero"}

#: The papers' names of the K-FAC variants and their ``inverse=`` strategies.
VARIANTS = {
    "kfac": "eigh",
    "rkfac": "rsvd",
    "srekfac": "srevd",
    "bkfac": "brand",
    "brkfac": "brand-rsvd",
    "bckfac": "brand-correct",
    "brckfac": "brand-rsvd-correct",
}


def optimizer_names() -> list[str]:
    """``sgd``, ``adam``, ``adamw``, the variants' paper names (``kfac``, ``rkfac``,
    ``srekfac``, ``bkfac``, ``brkfac``, ``bckfac``, ``brckfac``), ``kfac-<inverse>`` for every
    registered inverse strategy, ``mbf`` (the mini-block Fisher method), ``fngd``, ``seng``,
    the KLD-WRM optimizers (``so-kld-wrm``, ``q-kld-wrm``, ``qe-kld-wrm``) and the
    ``pytorch-optimizer`` peers (``muon``, ``soap``, ``psgd-kron``, ``shampoo``)."""
    aliases = [name for name, inverse in VARIANTS.items() if inverse in inverse_names()]
    kfacs = [*aliases, *(f"kfac-{name}" for name in inverse_names())]
    return ["sgd", "adam", "adamw", *kfacs, "mbf", "fngd", "seng", *KLD_WRM, *PEERS]


def inverse_for(name: str) -> str:
    """The ``inverse=`` strategy behind a command-line optimizer name."""
    return VARIANTS[name] if name in VARIANTS else name.removeprefix("kfac-")


@dataclass
class RunConfig:
    """One training run."""

    optimizer: str = "kfac"
    model: str = "autoencoder"
    epochs: int = 10
    batch_size: int = 128
    lr: float | None = None
    momentum: float = 0.9
    width: float = 1.0
    seed: int = 0
    data: str | None = None
    device: str = "cpu"
    damping: float = 3e-3
    damping_scheme: str = "factored-relative"
    kl_clip: float | None = 1e-4
    rms_clip: float | None = None
    factor_every: int = 1
    inverse_every: int = 10
    factor_decay: float = 0.95
    evals_per_epoch: int = 1
    target_loss: float | None = None
    target_accuracy: float | None = None
    max_train: int | None = None
    inverse_options: dict[str, Any] = field(default_factory=dict)
    label: str | None = None
    shuffle: bool = True
    max_time: float | None = None
    adaptive_damping: bool = False
    quadratic_step: bool = False


@dataclass
class RunResult:
    """History and summary of one run (times in seconds of training only)."""

    optimizer: str
    model: str
    steps: int = 0
    wall_time: float = 0.0
    time: list[float] = field(default_factory=list)
    step: list[int] = field(default_factory=list)
    train_loss: list[float] = field(default_factory=list)
    test_accuracy: list[float | None] = field(default_factory=list)
    time_to_target: float | None = None
    #: Seconds per engine phase (distributed runs of the K-FAC family; else empty).
    phase_times: dict[str, float] = field(default_factory=dict)
    #: Payload bytes handed to collectives, by kind (distributed runs; else empty).
    bytes_exchanged: dict[str, int] = field(default_factory=dict)

    @property
    def time_per_step(self) -> float:
        return self.wall_time / max(self.steps, 1)


def _make_optimizer(
    name: str, model: nn.Module, cfg: RunConfig, loss_name: str
) -> torch.optim.Optimizer:
    if name not in optimizer_names():
        raise ValueError(f"Invalid optimizer: {name!r}; valid names are {optimizer_names()}")
    own = ("sgd", "adam", "adamw", "mbf", "fngd", "seng", *KLD_WRM, *PEERS)
    kind = name if name in own else "kfac"
    lr = cfg.lr if cfg.lr is not None else DEFAULT_LR[kind]
    if name == "sgd":
        return torch.optim.SGD(model.parameters(), lr=lr, momentum=cfg.momentum)
    if name == "adam":
        return torch.optim.Adam(model.parameters(), lr=lr)
    if name == "adamw":
        return torch.optim.AdamW(model.parameters(), lr=lr)
    if name in PEERS:
        return _peer(name, model, lr)
    # what every preconditioned optimizer takes, then each method's own options
    common: dict[str, Any] = {
        "lr": lr,
        "momentum": cfg.momentum,
        "damping": cfg.damping,
        "kl_clip": cfg.kl_clip,
        "rms_clip": cfg.rms_clip,
    }
    schedule: dict[str, Any] = {
        "factor_every": cfg.factor_every,
        "inverse_every": cfg.inverse_every,
        "factor_decay": cfg.factor_decay,
        "loss": loss_name,
    }
    if cfg.adaptive_damping or cfg.quadratic_step:
        common.update(
            loss_fn=_model_loss(loss_name),
            adaptive_damping=cfg.adaptive_damping,
            quadratic_step=cfg.quadratic_step,
        )
        if cfg.quadratic_step:  # the model chooses the step and its momentum
            common.update(momentum=0.0, kl_clip=None)
    if name == "mbf":
        options: dict[str, Any] = {"block_size": MBF_DEFAULTS["block_size"]}
        options.update(cfg.inverse_options)
        return MBF(model, **common, **schedule, **options)
    if name == "fngd":
        return FNGD(model, **common, **cfg.inverse_options)
    if name == "seng":
        return SENG(model, **common, update_freq=cfg.inverse_every, **cfg.inverse_options)
    kron = {**schedule, "damping_scheme": cfg.damping_scheme, **cfg.inverse_options}
    if name in VARIANTS and (cfg.adaptive_damping or cfg.quadratic_step):
        kron = {**QUADRATIC_INVERSE_OPTIONS, **kron}
    if name in KLD_WRM:
        return KLD_WRM[name](model, **common, **kron)
    kron["time_phases"] = _world() > 1  # the per-rank phase table
    return KFAC(model, inverse=inverse_for(name), **common, **kron)


def _world() -> int:
    """Processes of the default group (1 without one)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _shard(idx: torch.Tensor) -> torch.Tensor:
    """This process's contiguous shard of a global batch (sizes differ by at most one)."""
    world = _world()
    return idx if world == 1 else torch.tensor_split(idx, world)[_rank()]


def _check_distributed(cfg: RunConfig, n: int) -> None:
    """:class:`ValueError` for a run that cannot be split over the processes: ``max_time``,
    or a global batch (the last one included) with fewer samples than processes, whose empty
    shard would give a NaN loss on one rank only."""
    world = _world()
    if world == 1:
        return
    if cfg.max_time is not None:
        raise ValueError(
            "max_time is not supported under torchrun: each rank measures its own time, so "
            "the ranks would stop at different steps"
        )
    smallest = min(cfg.batch_size, n % cfg.batch_size or cfg.batch_size)
    if smallest < world:
        raise ValueError(
            f"a global batch of {smallest} samples cannot be split over {world} processes "
            f"({n} training samples, batch_size {cfg.batch_size}); choose a batch size and "
            f"a max_train whose last batch has at least {world} samples"
        )


def _average_gradients(model: nn.Module, share: float = 1.0) -> None:
    """The global batch's gradient from the processes' gradients of their shard's mean loss,
    in one all-reduce of one flat buffer: each weighted by its ``share`` of the global batch
    (``1 / world`` each for equal shards, the plain mean)."""
    if _world() == 1:
        return
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    weight = share * _world()
    if weight != 1.0:  # uneven shards (exactly 1 for equal ones)
        flat *= weight
    dist.all_reduce(flat)
    flat /= _world()
    offset = 0
    for g in grads:
        g.copy_(flat[offset : offset + g.numel()].view_as(g))
        offset += g.numel()


def _init_distributed(device: str) -> str:
    """Initialise the default process group under ``torchrun``; the device of this rank."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        return device
    cuda = device.startswith("cuda")
    if cuda:
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        device = f"cuda:{local}"
    dist.init_process_group("nccl" if cuda else "gloo")
    return device


def _phase_table(results: Sequence[tuple[str, int, dict[str, float], dict[str, int], int]]) -> str:
    """Seconds per phase of every rank (and the payload bytes per step, the same on all)."""
    phases = ["capture", "reduce", "update", "refresh", "exchange", "direction", "clip", "write"]
    lines = [
        "| optimizer | rank | " + " | ".join(phases) + " | total | stats B/step | reps B/step |",
        "|---|---:|" + "---:|" * (len(phases) + 3),
    ]
    for name, rank, timings, sent, steps in results:
        cells = [f"{timings.get(p, 0.0):.3f}" for p in phases]
        total = sum(timings.values())
        per = {k: sent.get(k, 0) / max(steps, 1) for k in ("statistics", "representations")}
        lines.append(
            f"| {name} | {rank} | " + " | ".join(cells) + f" | {total:.3f} | "
            f"{per['statistics']:.0f} | {per['representations']:.0f} |"
        )
    return "\n".join(lines)


def _model_loss(loss_name: str) -> Any:
    """The loss as a function of (outputs, targets), for the quadratic model."""
    return F.mse_loss if loss_name == "mse" else F.cross_entropy


def _targets(loss_name: str, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """What :func:`_model_loss` compares the outputs with: the flattened inputs for the
    autoencoder, the labels else."""
    return x.flatten(1) if loss_name == "mse" else y


def _loss_fn(loss_name: str) -> Any:
    if loss_name == "mse":
        return lambda out, x, y: F.mse_loss(out, x.flatten(1))
    return lambda out, x, y: F.cross_entropy(out, y)


def _per_sample_loss_fn(loss_name: str) -> Any:
    """The per-sample losses whose batch mean is :func:`_loss_fn`'s loss."""
    if loss_name == "mse":
        return lambda out, x, y: F.mse_loss(out, x.flatten(1), reduction="none").mean(dim=1)
    return lambda out, x, y: F.cross_entropy(out, y, reduction="none")


def _fngd_weights(opt: torch.optim.Optimizer, idx: torch.Tensor) -> torch.Tensor | None:
    """FNGD with ``weighted_step="loss"`` (the default with shared coefficients in one
    process): the loss weights of a step that reuses stored coefficients (about one SGD
    step); ``None`` otherwise."""
    if isinstance(opt, FNGD) and opt.preconditioner.fngd.weighted_step == "loss":
        return opt.preconditioner.loss_weights(idx)
    return None


@torch.no_grad()
def _evaluate(
    model: nn.Module, ds: datasets.Dataset, loss: Any, kind: str, device: str
) -> tuple[float, float | None]:
    model.eval()
    total, count = 0.0, 0
    for i in range(0, ds.x_train.shape[0], 1024):
        x, y = ds.x_train[i : i + 1024].to(device), ds.y_train[i : i + 1024].to(device)
        total += float(loss(model(x), x, y)) * x.shape[0]
        count += x.shape[0]
    accuracy = None
    if kind == "classification":
        correct = 0
        for i in range(0, ds.x_test.shape[0], 1024):
            x, y = ds.x_test[i : i + 1024].to(device), ds.y_test[i : i + 1024].to(device)
            correct += int((model(x).argmax(dim=1) == y).sum())
        accuracy = correct / ds.x_test.shape[0]
    model.train()
    return total / count, accuracy


def _reached(cfg: RunConfig, loss: float, accuracy: float | None) -> bool:
    if cfg.target_loss is not None and loss <= cfg.target_loss:
        return True
    return (
        cfg.target_accuracy is not None
        and accuracy is not None
        and accuracy >= cfg.target_accuracy
    )


class ConfigError(ValueError):
    """A run configuration the optimizer rejects (the command line reports it as a usage
    error)."""


def _build(
    cfg: RunConfig,
    ds: datasets.Dataset,
    make_optimizer: Callable[[nn.Module], torch.optim.Optimizer] | None = None,
) -> tuple[nn.Module, torch.optim.Optimizer]:
    """The seeded model and its optimizer; :class:`ConfigError` for rejected options."""
    _, loss_name = models.MODELS[cfg.model]
    torch.manual_seed(cfg.seed)
    model = models.build(cfg.model, ds.image_shape, ds.num_classes, cfg.width).to(cfg.device)
    if make_optimizer is not None:
        return model, make_optimizer(model)
    try:
        return model, _make_optimizer(cfg.optimizer, model, cfg, loss_name)
    except (TypeError, ValueError, NotImplementedError) as exc:
        raise ConfigError(f"--optimizer {cfg.optimizer}: {exc}") from exc


def train(
    cfg: RunConfig,
    dataset: datasets.Dataset | None = None,
    progress: bool = True,
    make_optimizer: Callable[[nn.Module], torch.optim.Optimizer] | None = None,
    timer: Callable[[], float] = time.perf_counter,
) -> RunResult:
    """Train ``cfg.model`` with ``cfg.optimizer``; evaluate ``evals_per_epoch`` times an epoch.

    ``make_optimizer(model)``, when given, builds the optimizer instead of ``cfg.optimizer``
    (an optimizer from another package; ``cfg.optimizer`` then only names the run).
    ``timer`` measures the training steps (``time.process_time`` for the process's CPU time
    on a loaded machine); ``cfg.max_time`` (in the timer's seconds) stops the run early."""
    for key, low in (("epochs", 0), ("batch_size", 1), ("evals_per_epoch", 1), ("max_train", 1)):
        value = getattr(cfg, key)
        if value is None and key == "max_train":
            continue
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low:
            raise ValueError(f"Invalid {key}: {value!r} (must be an integer >= {low})")
    ds = dataset if dataset is not None else datasets.load(cfg.data)
    if cfg.max_train is not None:
        ds = ds._replace(x_train=ds.x_train[: cfg.max_train], y_train=ds.y_train[: cfg.max_train])
    kind, loss_name = models.MODELS.get(cfg.model, (None, None))
    model, opt = _build(cfg, ds, make_optimizer)
    assert kind is not None
    assert loss_name is not None
    loss = _loss_fn(loss_name)
    per_sample_loss = _per_sample_loss_fn(loss_name)
    n = ds.x_train.shape[0]
    steps_per_epoch = math.ceil(n / cfg.batch_size)
    total_steps = cfg.epochs * steps_per_epoch
    eval_every = max(1, steps_per_epoch // max(cfg.evals_per_epoch, 1))
    result = RunResult(cfg.label or cfg.optimizer, cfg.model)
    batches = torch.Generator().manual_seed(cfg.seed)

    def record(elapsed: float, step: int) -> None:
        if _rank() != 0:  # the models agree: rank 0 evaluates for everyone
            return
        value, accuracy = _evaluate(model, ds, loss, kind, cfg.device)
        result.time.append(elapsed)
        result.step.append(step)
        result.train_loss.append(value)
        result.test_accuracy.append(accuracy)
        if result.time_to_target is None and _reached(cfg, value, accuracy):
            result.time_to_target = elapsed

    _check_distributed(cfg, n)
    record(0.0, 0)
    bar = None
    if progress and _rank() == 0:
        from tqdm.auto import tqdm

        bar = tqdm(total=total_steps, desc=cfg.optimizer, leave=False, file=sys.stderr)
    elapsed, step = 0.0, 0
    for _ in range(cfg.epochs):
        perm = torch.randperm(n, generator=batches) if cfg.shuffle else torch.arange(n)
        if cfg.max_time is not None and elapsed >= cfg.max_time:
            break
        for i in range(0, n, cfg.batch_size):
            batch = perm[i : i + cfg.batch_size]
            idx = _shard(batch)
            x, y = ds.x_train[idx].to(cfg.device), ds.y_train[idx].to(cfg.device)
            if cfg.device.startswith("cuda"):
                torch.cuda.synchronize()
            start = timer()
            opt.zero_grad()
            weights = _fngd_weights(opt, idx)
            if weights is None:
                batch_loss = loss(model(x), x, y)
                batch_loss.backward()
                _average_gradients(model, idx.numel() / batch.numel())
            else:  # the gradient of the weighted loss is FNGD's direction
                losses = per_sample_loss(model(x), x, y)
                (weights * losses).sum().backward()
                batch_loss = losses.detach().mean()
            extra: dict[str, Any] = {}
            if getattr(opt, "quadratic_model", None) is not None:
                extra["batch"] = (x, _targets(loss_name, x, y))
            if isinstance(opt, FNGD):  # its coefficients are stored by dataset index
                extra["indices"] = idx
            opt.step(**extra)
            if cfg.device.startswith("cuda"):
                torch.cuda.synchronize()
            elapsed += timer() - start
            step += 1
            if not math.isfinite(batch_loss.item()):
                raise FloatingPointError(
                    f"{cfg.optimizer}: the training loss diverged at step {step}"
                )
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{float(batch_loss):.4g}")
            out_of_time = cfg.max_time is not None and elapsed >= cfg.max_time
            if step % eval_every == 0 or step == total_steps or out_of_time:
                record(elapsed, step)
            if out_of_time:
                break
    if bar is not None:
        bar.close()
    result.steps = step
    result.wall_time = elapsed
    preconditioner = getattr(opt, "preconditioner", None)
    runtime = getattr(getattr(preconditioner, "engine", None), "dist", None)
    if runtime is not None:
        result.phase_times = dict(preconditioner.timings)  # type: ignore[union-attr]
        result.bytes_exchanged = dict(runtime.bytes)
    return result


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def table(results: Sequence[RunResult]) -> str:
    """Markdown table: final loss and accuracy, wall time, time per step, time to target."""
    rows = [
        "| optimizer | train loss | test accuracy | wall time (s) | time/step (ms) "
        "| time to target (s) |",
        "|---|---|---|---|---|---|",
    ]
    for r in results:
        rows.append(
            f"| {r.optimizer} | {r.train_loss[-1]:.4g} | {_fmt(r.test_accuracy[-1], '.3f')} | "
            f"{r.wall_time:.2f} | {1e3 * r.time_per_step:.1f} | {_fmt(r.time_to_target, '.2f')} |"
        )
    return "\n".join(rows)


def plot(results: Sequence[RunResult], path: str, title: str) -> None:
    """PNG of training loss (log scale) and test accuracy against wall time."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    has_acc = any(a is not None for r in results for a in r.test_accuracy)
    fig, axes = plt.subplots(
        1, 2 if has_acc else 1, figsize=(11 if has_acc else 6, 4), squeeze=False
    )
    for r in results:
        axes[0, 0].plot(r.time, r.train_loss, marker=".", label=r.optimizer)
        if has_acc:
            axes[0, 1].plot(r.time, r.test_accuracy, marker=".", label=r.optimizer)
    axes[0, 0].set(xlabel="wall time (s)", ylabel="training loss", yscale="log", title=title)
    axes[0, 0].legend()
    if has_acc:
        axes[0, 1].set(xlabel="wall time (s)", ylabel="test accuracy", title=title)
        axes[0, 1].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _clip(text: str) -> float | None:
    """A clip threshold: a number >= 0, where 0 (or 'none') switches the clip off."""
    if text.lower() in ("none", "off"):
        return None
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected a number >= 0 or 'none', got {text!r}"
        ) from None
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"must be finite and >= 0 (0 is off), got {text!r}")
    return value or None


def _int_at_least(low: int) -> Callable[[str], int]:
    """An argparse type: an integer >= ``low``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be an integer >= {low}, got {text!r}")
        return value

    return parse


def _finite(low: float | None = None, high: float | None = None) -> Callable[[str], float]:
    """An argparse type: a finite number, ``> low`` and ``<= high`` where given."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"must be finite, got {text!r}")
        if low is not None and value <= low:
            raise argparse.ArgumentTypeError(f"must be > {low:g}, got {text!r}")
        if high is not None and value > high:
            raise argparse.ArgumentTypeError(f"must be <= {high:g}, got {text!r}")
        return value

    return parse


def _parser() -> argparse.ArgumentParser:
    formatter = argparse.ArgumentDefaultsHelpFormatter
    parser = argparse.ArgumentParser(
        prog="python -m kfac", description=__doc__.split("\n")[0], formatter_class=formatter
    )
    sub = parser.add_subparsers(dest="command", required=True)
    for command in ("train", "compare"):
        p = sub.add_parser(command, help=f"{command} on one task", formatter_class=formatter)
        if command == "train":
            p.add_argument("--optimizer", default="kfac", choices=optimizer_names())
            p.add_argument(
                "--lr",
                type=_finite(0.0),
                default=None,
                help="learning rate (default per optimizer)",
            )
        else:
            p.add_argument(
                "--optimizers",
                nargs="+",
                default=["sgd", "adam", "kfac"],
                choices=optimizer_names(),
            )
            p.add_argument(
                "--lr",
                nargs="*",
                default=[],
                metavar="NAME=LR",
                help="per-optimizer learning rates",
            )
        p.add_argument("--model", default="autoencoder", choices=list(models.MODELS))
        p.add_argument("--epochs", type=_int_at_least(1), default=RunConfig.epochs)
        p.add_argument("--batch-size", type=_int_at_least(1), default=RunConfig.batch_size)
        p.add_argument(
            "--width", type=_finite(0.0), default=RunConfig.width, help="hidden-width multiplier"
        )
        p.add_argument("--momentum", type=float, default=RunConfig.momentum)
        p.add_argument(
            "--damping", type=float, default=None, help="default per optimizer (K-FAC: 3e-3)"
        )
        p.add_argument(
            "--kl-clip", type=_clip, default=RunConfig.kl_clip, help="KL clip; 0 or 'none': off"
        )
        p.add_argument(
            "--rms-clip", type=_clip, default=None, help="per-layer RMS clip; 0 or none: off"
        )
        p.add_argument(
            "--factor-decay",
            type=float,
            default=None,
            help="EA decay rho (default per optimizer: 0.95; KLD-WRM: the paper's rho)",
        )
        p.add_argument(
            "--damping-scheme",
            default=None,
            help="K-FAC damping scheme (default: factored-relative; KLD-WRM: eigenbasis)",
        )
        p.add_argument("--factor-every", type=int, default=None, help="default per optimizer")
        p.add_argument("--inverse-every", type=int, default=None, help="default per optimizer")
        p.add_argument(
            "--inverse-options",
            type=_json_object,
            default={},
            metavar="JSON",
            help="options of the K-FAC inverse strategies, e.g. '{\"rank\": 100}', of the "
            "MBF, FNGD and SENG blocks, e.g. '{\"block_size\": 16}', "
            '\'{"coefficients": "shared"}\', \'{"scaling": "reference"}\', or of the KLD-WRM '
            "optimizers, e.g. '{\"inner_steps\": 7}'",
        )
        p.add_argument(
            "--adaptive-damping",
            action="store_true",
            help="Levenberg-Marquardt damping from the exact quadratic model; with it or "
            "--quadratic-step the K-FAC variants default to --damping 1e-4, --damping-scheme "
            'factored and {"factor_init": "zero"}',
        )
        p.add_argument(
            "--quadratic-step",
            action="store_true",
            help="learning rate and momentum from the exact quadratic model each step "
            "(turns the KL clip and --momentum off)",
        )
        p.add_argument("--seed", type=_int_at_least(0), default=RunConfig.seed)
        p.add_argument(
            "--data", default=None, help="MNIST IDX dir, CIFAR-10 dir or .npz (default: digits28)"
        )
        p.add_argument("--device", default="cpu")
        p.add_argument(
            "--evals-per-epoch", type=_int_at_least(1), default=RunConfig.evals_per_epoch
        )
        p.add_argument(
            "--max-train",
            type=_int_at_least(1),
            default=None,
            help="use the first N training samples",
        )
        p.add_argument(
            "--max-time",
            type=_finite(0.0),
            default=None,
            help="stop each run after this many seconds of training steps",
        )
        p.add_argument("--target-loss", type=_finite(), default=None)
        p.add_argument("--target-accuracy", type=_finite(None, 1.0), default=None)
        p.add_argument("--plot", default=None, help="PNG path for loss/accuracy vs wall time")
        p.add_argument("--json", default=None, help="write the histories as JSON")
        p.add_argument("--quiet", action="store_true", help="no progress bar")
    return parser


def _json_object(text: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"not JSON: {exc}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object, got {text!r}")
    return value


def _learning_rates(specs: Sequence[str], names: Sequence[str]) -> dict[str, float]:
    """``--lr NAME=LR ...`` of ``compare``; :class:`ValueError` for a malformed one."""
    lrs: dict[str, float] = {}
    for spec in specs:
        name, sep, value = spec.partition("=")
        if not sep or name not in names:
            raise ValueError(f"--lr expects NAME=LR with NAME in {list(names)}, got {spec!r}")
        if name in lrs:
            raise ValueError(f"--lr {name}: given more than once")
        try:
            lrs[name] = _finite(0.0)(value)
        except argparse.ArgumentTypeError as exc:
            raise ValueError(f"--lr {spec}: {exc}") from None
    return lrs


def _writable(option: str, path: str) -> None:
    """:class:`ValueError` unless ``path`` can be written (checked before any training)."""
    target = os.path.abspath(path)
    parent = os.path.dirname(target)
    if os.path.isdir(target):
        raise ValueError(f"{option} {path}: is a directory")
    if not os.path.isdir(parent):
        raise ValueError(f"{option} {path}: directory {parent} does not exist")
    if not os.access(parent, os.W_OK) or (
        os.path.exists(target) and not os.access(target, os.W_OK)
    ):
        raise ValueError(f"{option} {path}: not writable")


def _periods(args: argparse.Namespace, name: str) -> dict[str, Any]:
    """``damping``, ``factor_every``, ``inverse_every``, ``factor_decay``,
    ``damping_scheme`` and ``rms_clip``: the command line's values, else the optimizer's defaults
    (:data:`METHOD_DEFAULTS` for ``mbf``, ``fngd`` and ``seng``, :data:`KLD_WRM_DEFAULTS` and the
    eigenbasis damping for KLD-WRM, :class:`RunConfig`'s else)."""
    keys = (
        "damping",
        "factor_every",
        "inverse_every",
        "factor_decay",
        "damping_scheme",
        "rms_clip",
    )
    defaults = {key: getattr(RunConfig, key) for key in keys}
    if name in METHOD_DEFAULTS:
        defaults.update({k: v for k, v in METHOD_DEFAULTS[name].items() if k in defaults})
    if name in KLD_WRM:
        defaults.update(KLD_WRM_DEFAULTS[name], damping_scheme="eigenbasis")
    elif name in VARIANTS and (args.quadratic_step or args.adaptive_damping):
        defaults.update(QUADRATIC_DEFAULTS)
    given = {key: getattr(args, key, None) for key in defaults}
    return {key: defaults[key] if given[key] is None else given[key] for key in defaults}


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        device = torch.device(args.device)
    except RuntimeError as exc:
        parser.error(f"--device {args.device!r}: {exc}")
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: CUDA is not available on this machine")
    if device.type == "meta":
        parser.error(f"--device {args.device}: the meta device holds no data to train on")
    try:  # not on CUDA: under torchrun every rank would open a context on GPU 0
        if device.type != "cuda":
            torch.empty(0, device=device)
    except (RuntimeError, NotImplementedError) as exc:
        reason = (
            str(exc).strip().split(". ")[0].splitlines()[0]
            if str(exc).strip()
            else type(exc).__name__
        )
        parser.error(f"--device {args.device}: not available here ({reason})")
    for option, path in (("--plot", args.plot), ("--json", args.json)):
        if path is not None:
            try:
                _writable(option, path)
            except ValueError as exc:
                parser.error(str(exc))
    if args.target_accuracy is not None and models.MODELS[args.model][0] != "classification":
        parser.error(
            f"--target-accuracy: --model {args.model} is not a classifier (it has no test "
            "accuracy); use --target-loss"
        )
    if args.plot is not None:
        from matplotlib.backends.backend_agg import FigureCanvasAgg

        formats = FigureCanvasAgg.get_supported_filetypes()
        suffix = os.path.splitext(args.plot)[1].lower().lstrip(".")
        if suffix and suffix not in formats:
            parser.error(
                f"--plot {args.plot}: matplotlib cannot write .{suffix} files; use one of "
                f"{sorted(formats)}"
            )
    args.device = _init_distributed(args.device)
    try:
        return _main(parser, args)
    finally:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()


def _main(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    common = {
        key: getattr(args, key)
        for key in (
            "model",
            "kl_clip",
            "epochs",
            "batch_size",
            "width",
            "momentum",
            "seed",
            "data",
            "device",
            "evals_per_epoch",
            "max_train",
            "target_loss",
            "target_accuracy",
            "inverse_options",
            "max_time",
            "adaptive_damping",
            "quadratic_step",
        )
    }
    if args.command == "train" and args.optimizer in ("sgd", "adam", "adamw", *PEERS):
        given = [
            option
            for option, value in (
                ("--damping", args.damping),
                ("--damping-scheme", args.damping_scheme),
                ("--factor-decay", args.factor_decay),
                ("--factor-every", args.factor_every),
                ("--inverse-every", args.inverse_every),
                ("--rms-clip", args.rms_clip),
                ("--inverse-options", args.inverse_options or None),
                ("--adaptive-damping", args.adaptive_damping or None),
                ("--quadratic-step", args.quadratic_step or None),
            )
            if value is not None
        ]
        if given:
            parser.error(
                f"--optimizer {args.optimizer} takes no preconditioner options, got {given}"
            )
    if args.command == "train":
        configs = [
            RunConfig(
                optimizer=args.optimizer, lr=args.lr, **common, **_periods(args, args.optimizer)
            )
        ]
    else:
        repeated = sorted({name for name in args.optimizers if args.optimizers.count(name) > 1})
        if repeated:
            parser.error(f"--optimizers: {repeated} given more than once")
        try:
            lrs = _learning_rates(args.lr, args.optimizers)
        except ValueError as exc:
            parser.error(str(exc))
        configs = [
            RunConfig(optimizer=name, lr=lrs.get(name), **common, **_periods(args, name))
            for name in args.optimizers
        ]
    try:
        dataset = datasets.load(args.data)
    except (OSError, ValueError) as exc:  # missing, unreadable or malformed files
        parser.error(f"--data {args.data}: {exc}")
    for cfg in configs:  # every configuration is checked before any training starts
        try:
            _build(cfg, dataset)
            n = dataset.x_train.shape[0]
            _check_distributed(cfg, n if cfg.max_train is None else min(n, cfg.max_train))
        except ValueError as exc:  # ConfigError included
            parser.error(str(exc))
    results = [train(cfg, dataset, progress=not args.quiet) for cfg in configs]
    world = _world()
    phases = []
    if world > 1:
        mine = [(r.optimizer, _rank(), r.phase_times, r.bytes_exchanged, r.steps) for r in results]
        gathered: list[Any] = [None] * world
        dist.all_gather_object(gathered, mine)
        phases = [row for rank_rows in gathered for row in rank_rows if row[2]]
    if _rank() != 0:
        return 0
    title = f"{args.model} (width {args.width:g}) on {dataset.name}"
    processes = f", {world} processes" if world > 1 else ""
    print(
        f"\n{title}, {args.epochs} epochs, batch {args.batch_size}, seed {args.seed}{processes}\n"
    )
    print(table(results))
    if phases:
        print("\nseconds per phase on each rank (payload bytes per step, every rank alike)\n")
        print(_phase_table(sorted(phases, key=lambda row: (row[0], row[1]))))
    if args.json:  # first: the histories survive a failing plot
        payload = {
            "configs": [asdict(c) for c in configs],
            "results": [asdict(r) for r in results],
        }
        with open(args.json, "w") as f:
            json.dump(payload, f, indent=1)
    if args.plot:
        plot(results, args.plot, title)
        print(f"\nplot written to {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
