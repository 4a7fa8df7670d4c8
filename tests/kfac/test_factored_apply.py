"""The factored application of Brand-tracked Linear layers (docs/algorithms.md, *Low-rank
inverse application*): the direction computed from the per-sample rows equals the one
computed from the gradient matrix, is used on every step, and gives way to the gradient
matrix whenever the rows do not reproduce it."""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import nn

import kfac

BRAND = ["brand", "brand-rsvd", "brand-correct", "brand-rsvd-correct"]


class Positions(nn.Module):
    """Linear layers applied to inputs with an extra position dimension (n, 3, 64)."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(64, 48), nn.Tanh(), nn.Linear(48, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x).mean(dim=1)


def wide_mlp() -> nn.Module:
    # Layer '0' has both factors Brand-tracked with rank_cap 20 and batches of 4 (65 and 48
    # > 24); layer '2' has a 3-dimensional G, so it stays on the gradient matrix.
    return nn.Sequential(nn.Linear(64, 48), nn.Tanh(), nn.Linear(48, 3))


def batches(model: nn.Module, count: int, dtype: torch.dtype) -> list[tuple[Any, Any]]:
    g = torch.Generator().manual_seed(3)
    shape = (4, 3, 64) if isinstance(model, Positions) else (4, 64)
    return [
        (torch.randn(shape, generator=g, dtype=dtype), torch.randint(3, (4,), generator=g))
        for _ in range(count)
    ]


LossFn = Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]


def cross_entropy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return nn.functional.cross_entropy(model(x), y)


def run(
    model: nn.Module,
    data: list[tuple[Any, Any]],
    loss_fn: LossFn = cross_entropy,
    **options: Any,
) -> tuple[list[torch.Tensor], kfac.KFACPreconditioner]:
    """Directions of successive SGD steps; ``options`` go to the preconditioner."""
    settings: dict[str, Any] = {
        "inverse": "brand",
        "factor_every": 2,
        "inverse_every": 3,
        "rank": 10,
        "rank_cap": 20,
        "brand_every": 1,
        "adaptive_rank": False,
        "damping": 0.05,
    }
    settings.update(options)
    if not settings["inverse"].startswith("brand"):
        del settings["rank_cap"], settings["brand_every"]
    if settings["inverse"] == "eigh":
        del settings["rank"], settings["adaptive_rank"]
    precond = kfac.KFACPreconditioner(model, **settings)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    out = []
    for x, y in data:
        opt.zero_grad()
        loss_fn(model, x, y).backward()
        precond.step()
        out.append(torch.cat([p.grad.reshape(-1).clone() for p in model.parameters()]))
        opt.step()
    return out, precond


def applied(precond: kfac.KFACPreconditioner) -> dict[str, str]:
    return {row["layer"]: row["apply"] for row in precond.diagnostics()}


@pytest.mark.parametrize("inverse", BRAND)
@pytest.mark.parametrize("scheme", ["factored-relative", "factored", "pi"])
@pytest.mark.parametrize("make", [wide_mlp, Positions], ids=["batch", "positions"])
def test_factored_application_equals_the_gradient_path(inverse, scheme, make) -> None:
    """float64, truncated Brand states with continuation: the rows give the same directions,
    step after step (statistics every 2 steps, refreshes every 3, rows used on all)."""
    torch.manual_seed(0)
    model = make().double()
    data = batches(model, 7, torch.float64)
    twin = copy.deepcopy(model)
    options = {"inverse": inverse, "damping_scheme": scheme, "factor_dtype": torch.float64}
    ours, precond = run(model, data, **options)
    reference, dense = run(twin, data, factored_apply=False, **options)
    first = "body.0" if isinstance(model, Positions) else "0"
    last = "body.2" if isinstance(model, Positions) else "2"
    assert applied(precond) == {first: "factored", last: "dense"}
    assert applied(dense) == {first: "dense", last: "dense"}
    assert precond.representations(first)[0].rank < 48  # truncated: continuation is active
    for step, (a, b) in enumerate(zip(ours, reference, strict=True)):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12, msg=f"step {step}")


def test_factored_application_in_float32_within_rounding_and_without_warnings() -> None:
    torch.manual_seed(0)
    model = wide_mlp()
    data = batches(model, 12, torch.float32)
    twin = copy.deepcopy(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the probe check must not fire on rounding
        ours, precond = run(model, data)
    reference, _ = run(twin, data, factored_apply=False)
    assert applied(precond)["0"] == "factored"
    eps = torch.finfo(torch.float32).eps
    for a, b in zip(ours, reference, strict=True):
        assert float((a - b).norm() / b.norm()) <= 100 * eps


def l2_penalty(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return cross_entropy(model, x, y) + 1e-2 * model[0].weight.square().sum()


def accumulate(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Two micro-batches of half the loss each (the rows of both count)."""
    (cross_entropy(model, x[:2], y[:2]) * 2 / len(x)).backward()
    return cross_entropy(model, x[2:], y[2:]) * (len(x) - 2) / len(x)


def test_rows_that_do_not_give_the_gradient_fall_back_with_a_warning() -> None:
    torch.manual_seed(0)
    model = wide_mlp().double()
    data = batches(model, 5, torch.float64)
    twin = copy.deepcopy(model)
    options = {"factor_dtype": torch.float64, "factor_every": 1, "rank_cap": 20}
    with pytest.warns(RuntimeWarning, match=r"layer '0' \(Linear\) is not the product") as rec:
        ours, precond = run(model, data, l2_penalty, **options)
    assert len([w for w in rec if "is not the product" in str(w.message)]) == 1  # once
    reference, _ = run(twin, data, l2_penalty, factored_apply=False, **options)
    assert applied(precond)["0"] == "dense"
    for a, b in zip(ours, reference, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


def test_accumulated_micro_batches_keep_the_rows_application_exact() -> None:
    """The rows of every micro-batch are kept, so they reproduce the accumulated gradient."""
    torch.manual_seed(0)
    model = wide_mlp().double()
    data = batches(model, 5, torch.float64)
    twin = copy.deepcopy(model)
    options = {"factor_dtype": torch.float64, "factor_every": 1, "rank_cap": 20}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ours, precond = run(model, data, accumulate, **options)
    reference, _ = run(twin, data, accumulate, factored_apply=False, **options)
    assert applied(precond)["0"] == "factored"
    for a, b in zip(ours, reference, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


def rows_every_step(precond) -> set[str]:
    """The layers whose direction comes from their rows (recorded on every step)."""
    return {
        n
        for n in precond.layer_names
        if precond.kron.rows_applied(precond.layer(n), precond.state(n))
    }


@pytest.mark.parametrize(
    "options",
    [
        {"factored_apply": False},
        {"damping_scheme": "eigenbasis-relative"},
        {"fisher": "mc", "loss": "cross_entropy"},
    ],
    ids=["off", "eigenbasis", "mc-fisher"],
)
def test_factored_application_only_where_it_applies(options) -> None:
    model = wide_mlp().double()
    _, precond = run(model, batches(model, 4, torch.float64), **options)
    assert set(applied(precond).values()) == {"dense"}
    assert rows_every_step(precond) == set()


@pytest.mark.parametrize("scheme", ["factored-relative", "factored", "pi"])
@pytest.mark.parametrize("inverse", ["eigh", "rsvd"])
def test_dense_rules_use_the_rows_where_they_are_cheaper(inverse: str, scheme: str) -> None:
    """K-FAC's dense inverses (``eigh``) and R-KFAC's thin ones: with 4 rows, layer '0'
    (48 x 65) is cheaper from its rows on factor steps, layer '2' (3 x 49) from its gradient
    matrix, and the directions equal the gradient path's; with 64 rows neither uses them."""
    torch.manual_seed(0)
    model = wide_mlp().double()
    data = batches(model, 7, torch.float64)
    twin = copy.deepcopy(model)
    options = {"inverse": inverse, "damping_scheme": scheme, "factor_dtype": torch.float64}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ours, precond = run(model, data, **options)
    reference, dense = run(twin, data, factored_apply=False, **options)
    assert applied(precond) == {"0": "factored", "2": "dense"}
    assert applied(dense) == {"0": "dense", "2": "dense"}
    for step, (a, b) in enumerate(zip(ours, reference, strict=True)):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12, msg=f"step {step}")
    # between factor steps (every 2) nothing is recorded: the rows' check is a host read
    assert precond.steps % 2 == 1
    assert precond.capture_plan() == dense.capture_plan() == {}
    wide = [(torch.randn(64, 64, dtype=torch.float64), torch.randint(3, (64,))) for _ in range(3)]
    _, precond = run(wide_mlp().double(), wide, **options)
    assert applied(precond) == {"0": "dense", "2": "dense"}
    assert precond.steps % 2 == 1
    assert precond.capture_plan() == {}


def test_dense_rule_falls_back_silently_when_the_rows_do_not_give_the_gradient() -> None:
    """A penalty in the loss: the same product from ``.grad``, without a warning (the rows
    were only a cheaper way to compute it)."""
    torch.manual_seed(0)
    model = wide_mlp().double()
    data = batches(model, 4, torch.float64)
    twin = copy.deepcopy(model)
    options = {"inverse": "eigh", "factor_dtype": torch.float64, "factor_every": 1}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ours, precond = run(model, data, l2_penalty, **options)
    reference, _ = run(twin, data, l2_penalty, factored_apply=False, **options)
    assert applied(precond)["0"] == "dense"
    for a, b in zip(ours, reference, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


def test_rows_are_recorded_on_every_step_only_for_factored_layers() -> None:
    """Between factor-update steps only the factored layer keeps rows, and nothing else."""
    model = wide_mlp().double()
    _, precond = run(model, batches(model, 3, torch.float64), factor_every=5)
    assert rows_every_step(precond) == {"0"}
    assert precond.capture_plan() == {"0": kfac.CaptureSpec(rows=True)}
    x, y = batches(model, 1, torch.float64)[0]
    cross_entropy(model, x, y).backward()  # step 3: not a factor-update step
    record = precond.recorded("0")
    assert record is not None
    assert record.a_rows.shape == (x.shape[0], precond.layer("0").dim_A)
    assert record.g_rows.shape == (x.shape[0], precond.layer("0").dim_G)
    assert record.a_sum is None
    assert precond.recorded("2") is None


def test_invalid_factored_apply() -> None:
    with pytest.raises(ValueError, match="Invalid factored_apply: 1 \\(must be a bool\\)"):
        kfac.KFACPreconditioner(wide_mlp(), factored_apply=1)


def test_half_precision_autocast_uses_the_gradient_matrix_without_warnings() -> None:
    """Under bfloat16 autocast the gradient comes from bf16 products, which float32 rows
    do not reproduce: the layer is preconditioned from .grad, silently."""
    model = wide_mlp()
    precond = kfac.KFACPreconditioner(
        model, inverse="brand", rank=10, rank_cap=20, factor_every=1, inverse_every=1
    )
    assert precond.kron.rows_candidate(precond.layer("0"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for x, y in batches(model, 3, torch.float32):
            model.zero_grad()
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = cross_entropy(model, x, y)
            loss.backward()
            precond.step()
    assert rows_every_step(precond) == {"0"}
    assert applied(precond)["0"] == "dense"
