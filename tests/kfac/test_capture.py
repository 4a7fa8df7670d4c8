"""Curvature capture: layer coverage, failure modes, NaN safety and mixed precision."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

import kfac
import lowrank_nla as ln

from .conftest import Branchy, exact_preconditioner, mlp


def backward(model: nn.Module, x: torch.Tensor, classes: int = 3) -> None:
    model.zero_grad()
    out = model(x)
    nn.functional.cross_entropy(out.float(), torch.randint(classes, (x.shape[0],))).backward()


def factors_after_one_step(model: nn.Module, x: torch.Tensor) -> list[tuple]:
    """``(A, G)`` of every layer after one exact step on ``x`` with labels from seed 3."""
    precond = exact_preconditioner(model)
    torch.manual_seed(3)
    backward(model, x)
    precond.step()
    return [precond.factors(n) for n in precond.layer_names]


def test_inplace_activation_after_layer_is_captured() -> None:
    """nn.ReLU(inplace=True) rewrites the Linear output; the tensor hook still sees the
    gradient of the pre-activation, identical to the out-of-place model."""
    inplace = mlp(act=lambda: nn.ReLU(inplace=True)).double()
    plain = mlp(act=nn.ReLU).double()
    plain.load_state_dict(inplace.state_dict())
    x = torch.randn(12, 5, dtype=torch.float64)
    results = [factors_after_one_step(model, x) for model in (inplace, plain)]
    for (A1, G1), (A2, G2) in zip(*results, strict=True):
        torch.testing.assert_close(A1, A2, rtol=0, atol=0)
        torch.testing.assert_close(G1, G2, rtol=0, atol=0)


def test_layer_called_with_its_input_by_keyword_is_captured() -> None:
    """``layer(input=x)``. Before: ``IndexError`` in the forward hook (no positional input)."""

    class Keywords(nn.Sequential):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self[2](input=self[1](self[0](input=x)))

    model = mlp().double()
    twin = Keywords(*copy.deepcopy(list(model)))
    x, y = torch.randn(6, 5, dtype=torch.float64), torch.randint(3, (6,))
    factors = []
    for net in (model, twin):
        precond = exact_preconditioner(net)
        nn.functional.cross_entropy(net(x), y).backward()
        precond.step()
        factors.append([f for name in precond.layer_names for f in precond.factors(name)])
    for a, b in zip(*factors, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_skip_layers_by_pattern_and_type() -> None:
    model = nn.Sequential(
        nn.Conv2d(1, 2, 3), nn.Flatten(), nn.Linear(2 * 4 * 4, 4), nn.ReLU(), nn.Linear(4, 3)
    )
    assert kfac.KFACPreconditioner(model).layer_names == ["0", "2", "4"]
    assert kfac.KFACPreconditioner(model, skip_layers=["4"]).layer_names == ["0", "2"]
    assert kfac.KFACPreconditioner(model, skip_layers=[nn.Conv2d]).layer_names == ["2", "4"]
    precond = kfac.KFACPreconditioner(model, skip_layers="[24]", factor_every=1)
    x = torch.randn(5, 1, 6, 6)
    backward(model, x)
    skipped_grad = model[4].weight.grad.clone()
    precond.step()
    assert torch.equal(model[4].weight.grad, skipped_grad)  # untouched


def test_frozen_layers_are_not_registered() -> None:
    model = mlp()
    model[0].weight.requires_grad_(False)
    assert kfac.KFACPreconditioner(model).layer_names == ["2"]


@pytest.mark.parametrize(
    ("conv", "message"),
    [
        (nn.Conv2d(4, 4, 3, groups=2), r"Unsupported layer '0': Conv2d with groups=2"),
        (nn.Conv2d(4, 4, 3, padding=1, padding_mode="reflect"), "padding_mode='reflect'"),
        (nn.Conv2d(4, 4, 4, padding="same"), "padding='same' with an asymmetric"),
    ],
)
def test_unsupported_conv_is_rejected_at_construction(conv: nn.Conv2d, message: str) -> None:
    model = nn.Sequential(conv, nn.Flatten())
    with pytest.raises(ValueError, match=message):
        kfac.KFACPreconditioner(model)
    # and skipping it is the documented way out
    with pytest.raises(ValueError, match=r"no nn\.Linear, nn\.Conv1d or nn\.Conv2d"):
        kfac.KFACPreconditioner(model, skip_layers=["0"])


def test_conv_same_padding_matches_explicit_padding() -> None:
    a = nn.Sequential(nn.Conv2d(2, 3, 3, padding="same"), nn.Flatten(), nn.Linear(48, 3)).double()
    b = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.Flatten(), nn.Linear(48, 3)).double()
    b.load_state_dict(a.state_dict())
    x = torch.randn(4, 2, 4, 4, dtype=torch.float64)
    (A1, G1), _ = factors_after_one_step(a, x)
    (A2, G2), _ = factors_after_one_step(b, x)
    torch.testing.assert_close(A1, A2)
    torch.testing.assert_close(G1, G2)


class Functional(nn.Module):
    """Calls its Linear through torch.nn.functional: the module hooks never fire."""

    def __init__(self) -> None:
        super().__init__()
        self.hidden = nn.Linear(5, 7)
        self.head = nn.Linear(7, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(nn.functional.linear(x, self.hidden.weight, self.hidden.bias))
        return self.head(h)


def test_hooks_that_never_fired_raise_naming_the_layer() -> None:
    model = Functional()
    precond = kfac.KFACPreconditioner(model, factor_every=1)
    backward(model, torch.randn(4, 5))
    with pytest.raises(
        RuntimeError, match=r"layer 'hidden' \(Linear\) has a gradient but its hooks"
    ):
        precond.step()


def test_layer_without_gradient_is_left_alone() -> None:
    """A registered layer that took no part in the loss has no .grad: not an error."""
    model = nn.ModuleDict({"used": nn.Linear(5, 3), "unused": nn.Linear(5, 3)})

    class Wrapper(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.layers = model

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.layers["used"](x)

    wrapper = Wrapper()
    precond = kfac.KFACPreconditioner(wrapper, factor_every=1, inverse_every=1)
    backward(wrapper, torch.randn(4, 5))
    precond.step()
    assert model["unused"].weight.grad is None
    assert precond.factors("layers.unused") == (None, None)


def test_layer_unused_after_zero_grad_without_set_to_none_is_left_alone() -> None:
    """``zero_grad(set_to_none=False)`` leaves a zero ``.grad`` on a layer this step's loss
    does not use. Before: a ``RuntimeError`` claimed its hooks never fired."""

    model = Branchy()
    opt = kfac.KFAC(model, lr=0.1, momentum=0.0, factor_every=1, inverse_every=1)
    x, y = torch.randn(8, 5), torch.randint(3, (8,))
    for use_b in (True, False, False):
        opt.zero_grad(set_to_none=False)
        nn.functional.cross_entropy(model(x, use_b), y).backward()
        before = model.b.weight.detach().clone()
        opt.step()
        if not use_b:  # a zero gradient, no weight decay, no momentum: b does not move
            assert torch.equal(model.b.weight, before)
    assert opt.preconditioner.state("b").A.updates == 1
    # a non-zero gradient that the hooks did not see is still an error
    opt.zero_grad(set_to_none=False)
    nn.functional.cross_entropy(model(x, False), y).backward()
    model.b.weight.grad.add_(1.0)
    with pytest.raises(RuntimeError, match=r"layer 'b' \(Linear\) has a gradient but its hooks"):
        opt.step()


def test_nan_batch_does_not_poison_the_factors() -> None:
    model = mlp().double()
    precond = exact_preconditioner(model, factor_decay=0.5)
    backward(model, torch.randn(8, 5, dtype=torch.float64))
    precond.step()
    before = {n: tuple(f.clone() for f in precond.factors(n)) for n in precond.layer_names}
    x = torch.randn(8, 5, dtype=torch.float64)
    x[3, 2] = float("nan")
    backward(model, x)
    with pytest.warns(RuntimeWarning, match=r"non-finite gradient in layer '0' \(Linear\), '2'"):
        precond.step()
    for name in precond.layer_names:
        for new, old in zip(precond.factors(name), before[name], strict=True):
            assert torch.equal(new, old)
    # and training continues from the clean state
    backward(model, torch.randn(8, 5, dtype=torch.float64))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        precond.step()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


_PERIODS = {"factor_every": 1, "inverse_every": 1}


@pytest.mark.parametrize(
    "make",
    [
        lambda m: kfac.KFAC(m, lr=0.1, **_PERIODS),
        lambda m: kfac.KFAC(m, lr=0.1, factored_apply=False, **_PERIODS),
        lambda m: kfac.KFAC(m, lr=0.1, inverse="rsvd", rank=3, **_PERIODS),
        lambda m: kfac.KFAC(m, lr=0.1, inverse="brand", rank=2, rank_cap=2, brand_every=1),
        lambda m: kfac.MBF(m, lr=0.1, **_PERIODS),
        lambda m: kfac.FNGD(m, lr=0.1, store="slot", steps_per_epoch=2),
        lambda m: kfac.SENG(m, lr=0.1, update_freq=1),
    ],
    ids=["eigh-rows", "eigh-sums", "rsvd", "brand", "mbf", "fngd", "seng"],
)
def test_finite_gradients_whose_statistics_overflow_leave_the_state_alone(make) -> None:
    """Gradients of ``1e19`` are finite in float32, their squares are not. Before: the
    overflowing outer products entered the averages (every later refresh then raised, e.g.
    "`A` must not contain NaN or Inf"; MBF, FNGD and SENG failed their factorisations)."""
    model = mlp()
    opt = make(model)
    x, y = torch.randn(8, 5), torch.randint(3, (8,))

    def step(scale: float) -> None:
        opt.zero_grad()
        (nn.functional.cross_entropy(model(x), y) * scale).backward()
        assert all(torch.isfinite(p.grad).all() for p in model.parameters())
        opt.step()

    step(1.0)
    kron = isinstance(opt.preconditioner, kfac.KFACPreconditioner)
    before = opt.preconditioner.factors("2") if kron else ()
    with pytest.warns(RuntimeWarning, match=r"non-finite statistics in layer .*'2' \(Linear\)"):
        step(1e20)
    if kron:  # the dense averages (absent for a factor a Brand rule tracks) are unchanged
        after = opt.preconditioner.factors("2")
        for new, old in zip(after, before, strict=True):
            assert (new is None and old is None) or torch.equal(new, old)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for _ in range(3):
            step(1.0)
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_kfac_skips_a_nan_step_entirely() -> None:
    model = mlp()
    opt = kfac.KFAC(model, lr=0.1, momentum=0.9, factor_every=1, inverse_every=1)
    x, y = torch.randn(8, 5), torch.randint(3, (8,))
    opt.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    opt.step()
    params = [p.detach().clone() for p in model.parameters()]
    state = opt.state_dict()
    x_bad = x.clone()
    x_bad[0, 0] = float("inf")
    opt.zero_grad()
    nn.functional.cross_entropy(model(x_bad), y).backward()
    with pytest.warns(RuntimeWarning, match="non-finite gradient; step skipped"):
        opt.step()
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), params, strict=True))
    assert opt.preconditioner.steps == state["kfac"]["steps"]


def test_statistics_only_on_factor_steps(monkeypatch: pytest.MonkeyPatch) -> None:
    model = mlp()
    # factored_apply=False: the rows of a cheaper rows application are recorded on every step
    precond = kfac.KFACPreconditioner(model, factor_every=3, inverse_every=3, factored_apply=False)
    calls: list[int] = []
    layer = precond.layer("0")
    original = layer.input_rows

    def counting(x):
        calls.append(precond.steps)
        return original(x)

    monkeypatch.setattr(layer, "input_rows", counting)
    for _ in range(7):
        backward(model, torch.randn(4, 5))
        precond.step()
    assert calls == [0, 3, 6]
    # evaluation forwards under no_grad record nothing, even on a factor step
    with torch.no_grad():
        model(torch.randn(4, 5))
    assert calls == [0, 3, 6]


def test_mc_fisher_does_not_touch_gradients_and_runs_only_on_factor_steps() -> None:
    model = mlp().double()
    twin = mlp().double()
    twin.load_state_dict(model.state_dict())
    precond = kfac.KFACPreconditioner(
        model, fisher="mc", loss="cross_entropy", factor_every=2, inverse_every=2
    )
    x, y = torch.randn(6, 5, dtype=torch.float64), torch.randint(3, (6,))
    passes = []
    handle = model[2].register_full_backward_hook(lambda *args: passes.append(precond.steps))
    for _ in range(3):
        model.zero_grad()
        twin.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        nn.functional.cross_entropy(twin(x), y).backward()
        for p, q in zip(model.parameters(), twin.parameters(), strict=True):
            assert torch.equal(p.grad, q.grad)  # the sampled backward left .grad alone
        precond.step()
    handle.remove()
    # one extra (sampled) backward on the factor steps 0 and 2, the user's on every step
    assert passes == [0, 0, 1, 2, 2]


def test_linear_with_extra_leading_dimensions() -> None:
    model = mlp().double()
    precond = exact_preconditioner(model)
    x = torch.randn(4, 6, 5, dtype=torch.float64)
    out = model(x)
    nn.functional.mse_loss(out, torch.zeros_like(out)).backward()
    precond.step()
    A, _ = precond.factors("0")
    rows = torch.cat([x.reshape(-1, 5), torch.ones(24, 1, dtype=torch.float64)], dim=1)
    torch.testing.assert_close(A, rows.T @ rows / (4 * 6 * 6))  # 1 / (n tau^2)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_model_keeps_float32_factors(dtype: torch.dtype) -> None:
    model = nn.Sequential(nn.Linear(5, 16), nn.Tanh(), nn.Linear(16, 3)).to(dtype)
    opt = kfac.KFAC(model, lr=0.5, damping=0.01, factor_every=1, inverse_every=2)
    g = torch.Generator().manual_seed(0)
    x32 = torch.randn(64, 5, generator=g)
    y = (x32 @ torch.randn(5, 3, generator=g)).argmax(dim=1)  # a learnable labelling
    x = x32.to(dtype)
    losses = []
    for _ in range(25):
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x).float(), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    A, G = opt.preconditioner.factors("0")
    assert A.dtype == G.dtype == torch.float32
    assert all(p.dtype == dtype for p in model.parameters())
    assert losses[-1] < 0.5 * losses[0]


def test_autocast_with_grad_scaler_trains_and_unscales_statistics() -> None:
    """bfloat16 autocast + a GradScaler (scale 2^10): G equals the unscaled float32 G."""
    model = mlp()
    reference = mlp()
    reference.load_state_dict(model.state_dict())
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    opt = kfac.KFAC(
        model, lr=0.5, damping=0.01, factor_every=1, inverse_every=1, grad_scaler=scaler
    )
    ref_precond = kfac.KFACPreconditioner(reference, factor_every=1, inverse_every=1)
    x = torch.randn(32, 5)
    y = (x @ torch.randn(5, 3)).argmax(dim=1)
    losses = []
    for step in range(20):
        opt.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = nn.functional.cross_entropy(model(x), y)
        scaler.scale(loss).backward()
        if step == 0:
            reference.zero_grad()
            with torch.autocast("cpu", dtype=torch.bfloat16):
                nn.functional.cross_entropy(reference(x), y).backward()
            ref_precond.step()
            G_ref = ref_precond.factors("0")[1].clone()
        scaler.step(opt)
        scaler.update()
        losses.append(loss.item())
        if step == 0:
            G0 = opt.preconditioner.factors("0")[1].clone()
    torch.testing.assert_close(G0, G_ref, rtol=1e-5, atol=1e-9)
    assert losses[-1] < 0.5 * losses[0]


def test_eigh_failure_in_float32_is_retried_in_float64(monkeypatch: pytest.MonkeyPatch) -> None:
    """A float32 eigh that returns NaN (as cuSOLVER can) is retried in float64 with a warning."""
    import array_api_compat.torch

    real_eigh = torch.linalg.eigh

    def flaky(A, *args, **kwargs):
        w, V = real_eigh(A, *args, **kwargs)
        return (w * float("nan"), V) if A.dtype == torch.float32 else (w, V)

    monkeypatch.setattr(array_api_compat.torch.linalg, "eigh", flaky)
    model = mlp()
    precond = kfac.KFACPreconditioner(model, factor_every=1, inverse_every=1)
    backward(model, torch.randn(8, 5))
    with pytest.warns(RuntimeWarning, match="retrying in float64"):
        precond.step()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


def test_decomposition_dtype_is_independent_of_the_factor_dtype(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    model = mlp()
    precond = kfac.KFACPreconditioner(
        model, factor_every=1, inverse_every=1, decomposition_dtype=torch.float64
    )
    seen = []
    original = ln.partial_eigh

    def spy(X, k):
        seen.append(X.dtype)
        return original(X, k)

    monkeypatch.setattr(ln, "partial_eigh", spy)
    backward(model, torch.randn(8, 5))
    precond.step()
    assert set(seen) == {torch.float64}
    assert precond.factors("0")[0].dtype == torch.float32
    assert model[0].weight.grad.dtype == torch.float32
