"""The torch.optim contract, checked over a registry of every optimizer and preset the
package exports (in the spirit of torch's ``optim_db``): a new method joins by adding one
entry to ``OPTIM_DB``.

Each optimizer must equal its own preconditioner followed by ``torch.optim.SGD`` on the
same parameter groups, step for step and bit for bit; then the usual contract: closures,
``zero_grad``, LR schedulers, ``add_param_group``, ``state_dict`` through
``torch.load(weights_only=True)`` with identical continuation, and every error message.
"""

from __future__ import annotations

import copy
import io
import pickle
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch
from torch import nn
from torch.optim.optimizer import register_optimizer_step_pre_hook

import kfac

from .conftest import new_method_example


@dataclass(frozen=True)
class OptimInfo:
    """One registry entry: the optimizer class and the options of its preconditioner."""

    name: str
    cls: type[kfac.PreconditionedSGD]
    options: dict[str, Any] = field(default_factory=dict)
    setup: Callable[[], Any] = lambda: None
    #: Options of the optimizer itself (not of its preconditioner).
    extra: dict[str, Any] = field(default_factory=dict)
    #: The optimizer moves the parameters after the SGD update (QE's inner loop).
    refines: bool = False

    def make(self, model: nn.Module, params: Any = None, **sgd: Any) -> kfac.PreconditionedSGD:
        self.setup()
        sgd = {"lr": 0.05, "momentum": 0.9, "weight_decay": 1e-3, **sgd}
        return self.cls(model, params=params, **sgd, **self.options, **self.extra)


_PERIODS = {"factor_every": 1, "inverse_every": 2}
_LOW_RANK = {"rank": 4, "adaptive_rank": False}
OPTIM_DB = [
    OptimInfo("KFAC-eigh", kfac.KFAC, {"inverse": "eigh", **_PERIODS}),
    *(
        OptimInfo(f"KFAC-{name}", kfac.KFAC, {"inverse": name, **_PERIODS, **_LOW_RANK})
        for name in ("rsvd", "srevd")
    ),
    *(
        OptimInfo(
            f"KFAC-{name}",
            kfac.KFAC,
            {
                "inverse": name,
                **_PERIODS,
                **_LOW_RANK,
                "rank_cap": 5,
                "brand_every": 1,
                **({"reset_every": 1} if "rsvd" in name else {}),
            },
        )
        for name in ("brand", "brand-rsvd", "brand-correct", "brand-rsvd-correct")
    ),
    OptimInfo(
        "KFAC-mc-clipped",
        kfac.KFAC,
        {"fisher": "mc", "loss": "cross_entropy", "rms_clip": 0.5, **_PERIODS},
    ),
    OptimInfo("MBF-chunks", kfac.MBF, {"block_size": 5, **_PERIODS}),
    OptimInfo(
        "MBF-neuron-smw-relative", kfac.MBF, {"block_size": None, "damping_mode": "relative"}
    ),
    OptimInfo("SOKLDWRM-eigh", kfac.SOKLDWRM, {"kl_clip": 0.1, **_PERIODS}),
    OptimInfo(
        "SOKLDWRM-rsvd-factored",
        kfac.SOKLDWRM,
        {"inverse": "rsvd", "damping_scheme": "factored-relative", **_PERIODS, **_LOW_RANK},
    ),
    OptimInfo(
        "SOKLDWRM-brand",
        kfac.SOKLDWRM,
        {"inverse": "brand", **_PERIODS, **_LOW_RANK, "rank_cap": 5, "brand_every": 1},
    ),
    OptimInfo("QKLDWRM-eigh", kfac.QKLDWRM, {"kl_clip": 0.1, "rms_clip": 2.0, **_PERIODS}),
    OptimInfo(
        "QKLDWRM-srevd-period3",
        kfac.QKLDWRM,
        {"inverse": "srevd", "factor_every": 2, "inverse_every": 3, **_LOW_RANK},
    ),
    OptimInfo(
        "QEKLDWRM",
        kfac.QEKLDWRM,
        {"kl_clip": 0.1, **_PERIODS},
        extra={"inner_steps": 2, "snapshots": 2},
        refines=True,
    ),
    OptimInfo("QEKLDWRM-no-inner", kfac.QEKLDWRM, _PERIODS, extra={"inner_steps": 0}),
    OptimInfo("FNGD-slot", kfac.FNGD, {"store": "slot", "steps_per_epoch": 2}),
    OptimInfo(
        "FNGD-shared-absolute-refresh",
        kfac.FNGD,
        {
            "store": "slot",
            "steps_per_epoch": 2,
            "refresh_epochs": 2,
            "coefficients": "shared",
            "weighted_step": "rows",  # closures back-propagate the batch-mean loss
            "damping_mode": "absolute",
        },
    ),
    OptimInfo("FNGD-recompute-clipped", kfac.FNGD, {"store": "none", "rms_clip": 0.5}),
    OptimInfo(
        "PreconditionedSGD-fngd", kfac.PreconditionedSGD, {"block": "fngd", "store": "none"}
    ),
    OptimInfo("SENG-sketched", kfac.SENG, {"update_freq": 2, "col_sample_size": 4}),
    OptimInfo(
        "SENG-unbiased",
        kfac.SENG,
        {"update_freq": 3, "col_sample_size": 3, "scaling": "unbiased", "damping": 0.5},
    ),
    OptimInfo("PreconditionedSGD-seng", kfac.PreconditionedSGD, {"block": "seng"}),
    OptimInfo("PreconditionedSGD-mbf", kfac.PreconditionedSGD, {"block": "mbf", **_PERIODS}),
    *(
        OptimInfo(f"PreconditionedSGD-{name}", kfac.PreconditionedSGD, {"block": name, **_PERIODS})
        for name in ("so-kld-wrm", "q-kld-wrm")
    ),
    OptimInfo("PreconditionedSGD-kron", kfac.PreconditionedSGD, {"block": "kron", **_PERIODS}),
    OptimInfo(
        "PreconditionedSGD-diagonal-fisher",
        kfac.PreconditionedSGD,
        {"block": "diagonal-fisher", "damping": 1e-2, **_PERIODS},
        setup=new_method_example,
    ),
]
IDS = [info.name for info in OPTIM_DB]


def make_model() -> nn.Module:
    """Small enough to be quick, wide enough that the Brand rules track some factors (batch 4
    plus rank_cap 5 is below 24 and 25)."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 24), nn.Tanh(), nn.LayerNorm(24), nn.Linear(24, 3))


def batches(count: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [
        (torch.randn(4, 6, generator=g), torch.randint(3, (4,), generator=g)) for _ in range(count)
    ]


def loss_of(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return nn.functional.cross_entropy(model(x), y)


def run(model: nn.Module, opt: torch.optim.Optimizer, data, scheduler=None) -> list[float]:
    losses = []
    for x, y in data:

        def closure(x=x, y=y) -> torch.Tensor:
            opt.zero_grad()
            loss = loss_of(model, x, y)
            loss.backward()
            return loss

        losses.append(opt.step(closure).item())
        if scheduler is not None:
            scheduler.step()
    return losses


def groups(model: nn.Module) -> list[dict[str, Any]]:
    """Two groups: the first layer at a tenth of the learning rate, the rest at the default."""
    first = list(model[0].parameters())
    rest = [p for p in model.parameters() if all(p is not q for q in first)]
    return [{"params": first, "lr": 0.005}, {"params": rest}]


@pytest.mark.parametrize("info", OPTIM_DB, ids=IDS)
def test_equals_its_preconditioner_then_torch_sgd_with_param_groups(info: OptimInfo) -> None:
    data = batches(6)
    model = make_model()
    opt = info.make(model, params=groups(model))
    run(model, opt, data)

    reference = make_model()
    info.setup()
    options = dict(info.options)
    if info.cls is kfac.PreconditionedSGD:
        precond = kfac.Preconditioner(reference, options.pop("block"), **options)
    else:
        if info.cls is kfac.KFAC:  # KFAC's default KL clip; the preconditioner has none
            options.setdefault("kl_clip", kfac.preset("default")["kl_clip"])
        precond = info.cls.preconditioner_class(reference, **options)
    sgd = torch.optim.SGD(groups(reference), lr=0.05, momentum=0.9, weight_decay=1e-3)
    for x, y in data:
        sgd.zero_grad()
        loss_of(reference, x, y).backward()
        precond.step(lr={p: g["lr"] for g in sgd.param_groups for p in g["params"]})
        sgd.step()
    pairs = zip(model.parameters(), reference.parameters(), strict=True)
    same = [torch.equal(p, q) for p, q in pairs]
    # QE's inner loop moves the parameters after the preconditioned SGD step
    assert all(same) != info.refines
    assert opt.param_groups[0]["lr"] == 0.005
    assert opt.param_groups[1]["lr"] == 0.05


@pytest.mark.parametrize("info", OPTIM_DB, ids=IDS)
def test_closure_zero_grad_and_a_step_without_closure(info: OptimInfo) -> None:
    model = make_model()
    opt = info.make(model)
    (x, y), *_ = batches(1)

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = loss_of(model, x, y)
        loss.backward()
        return loss

    loss = opt.step(closure)
    assert isinstance(loss, torch.Tensor)
    assert loss.grad_fn is not None  # the closure ran with gradients enabled
    opt.zero_grad()
    assert all(p.grad is None for p in model.parameters())
    loss_of(model, x, y).backward()
    before = [p.detach().clone() for p in model.parameters()]
    assert opt.step() is None
    assert all(not torch.equal(b, p) for b, p in zip(before, model.parameters(), strict=True))


@pytest.mark.parametrize("info", OPTIM_DB, ids=IDS)
def test_step_hooks_run_once_per_step(info: OptimInfo) -> None:
    """Per-optimizer and global step hooks run once, also after a plain ``torch.optim.SGD``
    exists (torch then wraps ``SGD.step`` with the hook runner too)."""
    model = make_model()
    torch.optim.SGD(model.parameters(), lr=0.1)
    opt = info.make(model)
    calls: list[str] = []
    handles = [
        opt.register_step_pre_hook(lambda *args: calls.append("pre")),
        opt.register_step_post_hook(lambda *args: calls.append("post")),
        register_optimizer_step_pre_hook(lambda *args: calls.append("global")),
    ]
    try:
        run(model, opt, batches(2))
    finally:
        for handle in handles:
            handle.remove()
    assert calls == ["global", "pre", "post"] * 2


@pytest.mark.parametrize("info", OPTIM_DB, ids=IDS)
def test_step_is_a_no_op_for_zero_gradients(info: OptimInfo) -> None:
    """Zero gradients set by hand (no forward), as torch's own optimizer tests do. Before:
    on a factor-update step, "has a gradient but its hooks never fired"."""
    model = make_model()
    opt = info.make(model, momentum=0.0, weight_decay=0.0)
    before = [p.detach().clone() for p in model.parameters()]
    for step in range(2):
        for p in model.parameters():
            p.grad = torch.zeros_like(p)
        if info.refines and step == 1:  # QE's refinement evaluates the wake on the step's inputs
            with pytest.raises(RuntimeError, match="no training forward of the model"):
                opt.step()
            return
        opt.step()
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before, strict=True))


@pytest.mark.parametrize("info", OPTIM_DB, ids=IDS)
def test_lr_scheduler_drives_every_group(info: OptimInfo) -> None:
    model = make_model()
    opt = info.make(model, params=groups(model))
    scheduler = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    run(model, opt, batches(4), scheduler)
    assert [g["lr"] for g in opt.param_groups] == [0.005 * 0.25, 0.05 * 0.25]


@pytest.mark.parametrize("info", OPTIM_DB, ids=IDS)
def test_add_param_group_trains_a_new_parameter(info: OptimInfo) -> None:
    model = make_model()
    opt = info.make(model)
    temperature = nn.Parameter(torch.tensor(1.0))
    opt.add_param_group({"params": [temperature], "lr": 0.1})
    for x, y in batches(3):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x) / temperature, y).backward()
        opt.step()
    assert temperature.item() != 1.0
    assert len(opt.param_groups) == 2


@pytest.mark.parametrize("info", OPTIM_DB, ids=IDS)
def test_state_dict_round_trip_continues_bit_identically(info: OptimInfo) -> None:
    data = batches(10)
    model = make_model()
    opt = info.make(model, params=groups(model))
    run(model, opt, data[:5])
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buffer)
    reference = run(model, opt, data[5:])
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    model2 = make_model()
    model2.load_state_dict(saved["model"])
    opt2 = info.make(model2, params=groups(model2))
    opt2.load_state_dict(saved["opt"])
    assert run(model2, opt2, data[5:]) == reference
    for p, q in zip(model.parameters(), model2.parameters(), strict=True):
        assert torch.equal(p, q)
    if info.options.get("inverse", "").startswith("brand"):  # the online state round-tripped
        kinds = {row["kind"] for row in opt2.preconditioner.diagnostics()}
        assert kinds == {"brand", "dense"}, kinds


@pytest.mark.parametrize("info", OPTIM_DB, ids=IDS)
def test_error_messages(info: OptimInfo) -> None:
    model = make_model()
    for key, value, message in (
        ("lr", -1.0, r"Invalid learning rate: -1.0 \(must be >= 0\)"),
        ("momentum", -0.5, r"Invalid momentum: -0.5 \(must be >= 0\)"),
        ("weight_decay", float("nan"), r"Invalid weight_decay: nan \(must be finite\)"),
    ):
        with pytest.raises(ValueError, match=message):
            info.make(model, **{key: value})
    with pytest.raises(ValueError, match="Invalid params: layer '0' is preconditioned"):
        info.make(model, params=list(model[3].parameters()))
    opt = info.make(model)
    with pytest.raises(ValueError, match="state_dict has no 'kfac' entry"):
        opt.load_state_dict(torch.optim.SGD(model.parameters(), lr=0.1).state_dict())
    other = OPTIM_DB[0] if info.options.get("inverse") == "rsvd" else OPTIM_DB[1]
    foreign = other.make(make_model())
    with pytest.raises(ValueError, match="state_dict was saved with"):
        opt.load_state_dict(foreign.state_dict())


def test_every_exported_optimizer_is_in_the_registry() -> None:
    exported = {
        obj
        for name in kfac.__all__
        if isinstance(obj := getattr(kfac, name), type) and issubclass(obj, torch.optim.Optimizer)
    }
    assert exported == {info.cls for info in OPTIM_DB}
    assert {info.options.get("inverse") for info in OPTIM_DB if info.cls is kfac.KFAC} >= set(
        kfac.inverse_names()
    )
    registered = {info.options.get("block") for info in OPTIM_DB}
    assert set(kfac.block_names()) <= registered


@pytest.mark.parametrize("info", OPTIM_DB, ids=IDS)
def test_copying_or_pickling_the_optimizer_is_refused_with_what_to_do(info: OptimInfo) -> None:
    """Before: torch's ``Optimizer.__getstate__`` kept only the groups and state, so a copy
    or a pickle lost the preconditioner silently and failed steps later."""
    model = make_model()
    opt = info.make(model)
    name = type(opt).__name__
    message = rf"a {name} optimizer cannot be pickled or copied: .* Save `state_dict\(\)`"
    for copy_it in (copy.deepcopy, pickle.dumps, lambda o: torch.save(o, io.BytesIO())):
        with pytest.raises(TypeError, match=message):
            copy_it(opt)


@pytest.mark.parametrize("info", OPTIM_DB, ids=IDS)
def test_a_tensor_learning_rate_steps_as_its_value(info: OptimInfo) -> None:
    """``lr=torch.tensor(0.05)``, which ``torch.optim.SGD`` accepts. Before: "Invalid
    learning rate: tensor(0.0500) (must be a real number)"."""
    trained = []
    for lr in (0.05, torch.tensor(0.05, dtype=torch.float64)):
        model = make_model()
        run(model, info.make(model, lr=lr), batches(3))
        trained.append([p.detach().clone() for p in model.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(*trained, strict=True))


def test_a_tensor_learning_rate_must_hold_one_real_value() -> None:
    model = make_model()
    for lr in (torch.tensor([0.1, 0.2]), torch.tensor(1), torch.tensor(0.1 + 0j)):
        with pytest.raises(ValueError, match="a tensor learning rate must hold one real"):
            kfac.KFAC(model, lr=lr)
    with pytest.raises(ValueError, match=r"Invalid learning rate: -0\.1 \(must be >= 0\)"):
        kfac.KFAC(model, lr=torch.tensor(-0.1, dtype=torch.float64))
