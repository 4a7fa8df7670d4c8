"""The exact quadratic model (Gauss-Newton products through torch.func), adaptive damping and
the quadratic-model step, against explicit float64 Jacobians and Hessians."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import kfac
from kfac import AdaptiveDamping
from kfac._quadratic import QuadraticModel, named_params, solve_step


def _model(seed: int = 0, out: int = 3, width: int = 7) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, width), nn.Tanh(), nn.Linear(width, out)).double()


def _data(n: int = 24, classes: int = 3, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 5, generator=g, dtype=torch.float64), torch.randint(
        0, classes, (n,), generator=g
    )


def _explicit_ggn(model: nn.Module, loss_fn, x, y) -> torch.Tensor:
    """``J^T H J`` formed from the full Jacobian and the loss's Hessian (float64), in eval
    mode so that an optimizer's hooks record nothing (the models here have no dropout or
    normalisation)."""
    model.eval()
    params = [p for p in model.parameters()]
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for p in params]
    sizes = [p.numel() for p in params]

    def outputs(flat: torch.Tensor) -> torch.Tensor:
        chunks = torch.split(flat, sizes)
        values = {n: c.reshape(s) for n, c, s in zip(names, chunks, shapes, strict=True)}
        return torch.func.functional_call(model, values, (x,)).reshape(-1)

    flat = torch.cat([p.detach().reshape(-1) for p in params])
    out = outputs(flat)
    J = torch.autograd.functional.jacobian(outputs, flat)
    shape = torch.func.functional_call(model, dict(model.named_parameters()), (x,)).shape
    H = torch.autograd.functional.hessian(lambda o: loss_fn(o.reshape(shape), y), out.detach())
    model.train()
    return J.T @ H @ J


def _flat(ts) -> torch.Tensor:
    return torch.cat([t.reshape(-1) for t in ts])


@pytest.mark.parametrize(
    ("loss_fn", "out"), [(F.cross_entropy, 3), (F.mse_loss, 3)], ids=["cross_entropy", "mse"]
)
def test_gram_equals_explicit_gauss_newton(loss_fn, out) -> None:
    model = _model(out=out)
    x, y = _data()
    if loss_fn is F.mse_loss:
        y = torch.randn(
            x.shape[0], out, generator=torch.Generator().manual_seed(3), dtype=torch.float64
        )
    params = list(model.parameters())
    qm = QuadraticModel(model, loss_fn, named_params(model, params))
    g = torch.Generator().manual_seed(5)
    dirs = [[torch.randn(p.shape, generator=g, dtype=p.dtype) for p in params] for _ in range(2)]
    h, gram = qm.gram((x, y), dirs)
    C = _explicit_ggn(model, loss_fn, x, y)
    D = torch.stack([_flat(d) for d in dirs])
    expected = D @ C @ D.T
    tol = 1e3 * torch.finfo(torch.float64).eps
    torch.testing.assert_close(gram, expected, rtol=tol, atol=tol * float(expected.abs().max()))
    with torch.no_grad():
        assert h == pytest.approx(float(loss_fn(model(x), y)), rel=1e-14)
    # the Gauss-Newton matrix is PSD: the Gram matrix of any directions is too
    assert torch.linalg.eigvalsh(gram).min() >= -tol * float(gram.abs().max())


def test_gram_at_a_shift_and_buffers_unchanged() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 6), nn.BatchNorm1d(6), nn.Tanh(), nn.Linear(6, 3)).double()
    x, y = _data()
    params = list(model.parameters())
    before = copy.deepcopy(model.state_dict())
    qm = QuadraticModel(model, F.cross_entropy, named_params(model, params))
    shift = [0.1 * torch.ones_like(p) for p in params]
    h_shift = qm.loss((x, y), shift=shift)
    h_gram, _ = qm.gram((x, y), [shift], shift=shift)
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key  # running statistics did not move
    with torch.no_grad():
        for p, s in zip(params, shift, strict=True):
            p.add_(s)
    model_copy = copy.deepcopy(model)
    with torch.no_grad():
        expected = float(F.cross_entropy(model_copy(x), y))
    assert h_shift == pytest.approx(expected, rel=1e-13)
    assert h_gram == pytest.approx(expected, rel=1e-13)


def test_solve_step_is_the_exact_minimiser() -> None:
    gram = torch.tensor([[4.0, 1.0], [1.0, 3.0]], dtype=torch.float64)
    norms = torch.tensor([[2.0, 0.5], [0.5, 1.0]], dtype=torch.float64)
    linear = torch.tensor([-1.0, 2.0], dtype=torch.float64)
    coeffs, change = solve_step(gram, linear, norms, 0.5)
    system = gram + 0.5 * norms
    expected = -torch.linalg.solve(system, linear)
    torch.testing.assert_close(coeffs, expected, rtol=1e-15, atol=0)
    assert float(change) == pytest.approx(
        -0.5 * float(linear @ torch.linalg.solve(system, linear))
    )
    # parallel directions: the second is dropped, the first solved alone
    gram = torch.tensor([[4.0, 8.0], [8.0, 16.0]], dtype=torch.float64)
    norms = torch.tensor([[1.0, 2.0], [2.0, 4.0]], dtype=torch.float64)
    linear = torch.tensor([-2.0, -4.0], dtype=torch.float64)
    coeffs, _ = solve_step(gram, linear, norms, 0.0)
    assert coeffs.tolist() == [0.5, 0.0]
    # a zero direction has coefficient 0
    zero = torch.zeros(1, 1, dtype=torch.float64)
    coeffs, change = solve_step(zero, torch.zeros(1, dtype=torch.float64), zero, 1.0)
    assert coeffs.tolist() == [0.0]
    assert float(change) == 0.0


def test_adaptive_damping_rule_exact() -> None:
    rule = AdaptiveDamping(every=1, decay=0.5, minimum=1e-3, maximum=10.0)
    assert rule.update(1.0, 0.9) == 0.5
    assert rule.update(1.0, 0.1) == 2.0
    assert rule.update(1.0, 0.5) == 1.0
    assert rule.update(1.0, -math.inf) == 2.0
    assert rule.update(1.0, math.nan) == 2.0
    assert rule.update(8.0, 0.1) == 10.0
    assert rule.update(1.5e-3, 1.0) == 1e-3
    # rejected steps: doubled, then x4, x8, ... (consecutive rejections)
    assert rule.update(1e-2, -5.0, rejections=1) == 2e-2
    assert rule.update(1e-2, -5.0, rejections=3) == 8e-2
    assert rule.rejects(-0.1)
    assert rule.rejects(math.nan)
    assert not rule.rejects(0.0)
    assert not AdaptiveDamping(reject=False).rejects(-1.0)
    assert AdaptiveDamping(every=5).decay == pytest.approx((19 / 20) ** 5, rel=1e-15)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"every": 0}, "every"),
        ({"decay": 1.0}, "decay"),
        ({"low": 0.8, "high": 0.5}, "low, high"),
        ({"minimum": 0.0}, "minimum"),
        ({"minimum": 2.0, "maximum": 1.0}, "minimum, maximum"),
        ({"reject": 1}, "reject"),
    ],
)
def test_adaptive_damping_validates(kwargs, match) -> None:
    with pytest.raises(ValueError, match=match):
        AdaptiveDamping(**kwargs)


def _kfac(model: nn.Module, **kwargs) -> kfac.KFAC:
    options = {
        "lr": 1.0,
        "momentum": 0.0,  # no momentum and no clip unless a test sets them
        "kl_clip": None,
        "damping": 1e-2,
        "damping_scheme": "eigenbasis",
        "factor_every": 1,
        "inverse_every": 1,
        "factor_dtype": torch.float64,
        "loss_fn": F.cross_entropy,
    }
    options.update(kwargs)
    return kfac.KFAC(model, **options)


def _train(opt, model, x, y, steps: int) -> list[float]:
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step(batch=(x, y))
        losses.append(float(loss.detach()))
    return losses


def test_quadratic_step_is_stationary_on_its_plane() -> None:
    """The update delta = alpha Delta + mu delta_0 minimises M over the plane: M's derivative
    along delta and along the previous update delta_0 vanishes (explicit GGN)."""
    model = _model()
    x, y = _data()
    opt = _kfac(model, quadratic_step=True, weight_decay=1e-3)
    _train(opt, model, x, y, 3)
    params = list(model.parameters())
    previous = _flat([opt.state[p]["previous_update"] for p in params])
    start = _flat([p.detach() for p in params])
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    g = _flat([p.grad + 1e-3 * p.detach() for p in params])
    C = _explicit_ggn(model, F.cross_entropy, x, y)
    opt.step(batch=(x, y))
    delta = _flat([p.detach() for p in params]) - start
    torch.testing.assert_close(delta, _flat([opt.state[p]["previous_update"] for p in params]))
    shift = 1e-2 + 1e-3  # damping + weight decay
    for d in (delta, previous):
        slope = g @ d + d @ C @ delta + shift * d @ delta
        scale = abs(float(g @ d)) + abs(float(d @ C @ delta))
        assert abs(float(slope)) <= 1e-9 * scale
    stats = opt.last_step_control
    assert stats["mu"] != 0.0
    assert stats["alpha"] > 0
    # the reduction ratio's model: the loss's (weight decay in it), without the damping
    change = g @ delta + 0.5 * delta @ C @ delta + 0.5 * 1e-3 * delta @ delta
    assert stats["predicted_change"] == pytest.approx(float(change), rel=1e-9)


@pytest.mark.parametrize("decay", [0.0, 1e-2])
def test_adaptive_damping_follows_the_reduction_ratio(decay: float) -> None:
    """Fixed learning rate, every=1: the damping moves by the rule on rho, with rho computed
    here from the explicit model of h = loss + eta |theta|^2 / 2."""
    model = _model()
    x, y = _data()
    rule = AdaptiveDamping(every=1, decay=0.5, reject=False)
    opt = _kfac(model, lr=0.5, momentum=0.9, weight_decay=decay, adaptive_damping=rule)

    def h() -> float:
        with torch.no_grad():
            penalty = 0.5 * decay * sum(float(p.square().sum()) for p in model.parameters())
            return float(F.cross_entropy(model(x), y)) + penalty

    for _ in range(4):
        params = list(model.parameters())
        start = _flat([p.detach() for p in params])
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        old = h()
        g = _flat([p.grad + decay * p.detach() for p in params])
        C = _explicit_ggn(model, F.cross_entropy, x, y)
        damping = opt.preconditioner.damping
        opt.step(batch=(x, y))
        delta = _flat([p.detach() for p in params]) - start
        change = g @ delta + 0.5 * delta @ C @ delta + 0.5 * decay * delta @ delta
        rho = (h() - old) / float(change)
        stats = opt.last_step_control
        assert stats["rho"] == pytest.approx(rho, rel=1e-6)
        assert opt.preconditioner.damping == rule.update(damping, rho)


def test_every_inverse_strategy_trains_with_both_controls() -> None:
    x, y = _data(n=16)
    for inverse in kfac.inverse_names():
        model = _model(width=48)
        low_rank = {"rank": 8} | ({"rank_cap": 12} if inverse.startswith("brand") else {})
        opt = _kfac(
            model,
            inverse=inverse,
            quadratic_step=True,
            adaptive_damping=AdaptiveDamping(every=2),
            **({} if inverse == "eigh" else low_rank),
        )
        losses = _train(opt, model, x, y, 12)
        assert all(math.isfinite(v) for v in losses), inverse
        assert losses[-1] < 0.5 * losses[0], inverse


def test_model_evaluations_record_nothing_and_frozen_parameters_never_move() -> None:
    model = _model()
    model[0].bias.requires_grad_(False)
    frozen = model[0].bias.detach().clone()
    x, y = _data()
    opt = _kfac(model, quadratic_step=True, adaptive_damping=AdaptiveDamping(every=1))
    _train(opt, model, x, y, 3)
    assert torch.equal(model[0].bias, frozen)
    for name in opt.preconditioner.layer_names:
        assert opt.preconditioner.recorded(name) is None
    assert opt.preconditioner.timings["quadratic"] == 0.0  # not timed unless asked


def test_checkpoint_continues_exactly() -> None:
    x, y = _data()
    rule = AdaptiveDamping(every=2, decay=0.5)
    model = _model()
    opt = _kfac(model, quadratic_step=True, adaptive_damping=rule)
    _train(opt, model, x, y, 3)
    saved = copy.deepcopy(opt.state_dict())
    saved_model = copy.deepcopy(model.state_dict())
    _train(opt, model, x, y, 4)
    other = _model(seed=7)
    other.load_state_dict(saved_model)
    opt2 = _kfac(other, quadratic_step=True, adaptive_damping=rule)
    opt2.load_state_dict(copy.deepcopy(saved))
    assert opt2.preconditioner.damping == saved["adaptive_damping"]["damping"]
    _train(opt2, other, x, y, 4)
    for a, b in zip(model.parameters(), other.parameters(), strict=True):
        assert torch.equal(a, b)
    # a corrupted previous update, and a checkpoint without the damping, are refused
    bad = copy.deepcopy(saved)
    key = next(iter(bad["state"]))
    bad["state"][key]["previous_update"] = torch.zeros(2)
    with pytest.raises(ValueError, match="previous update of parameter"):
        opt2.load_state_dict(bad)
    bad = copy.deepcopy(saved)
    del bad["adaptive_damping"]
    with pytest.raises(ValueError, match="adaptive_damping"):
        opt2.load_state_dict(bad)


def test_mbf_and_seng_take_the_quadratic_step() -> None:
    x, y = _data(n=32)
    for cls, extra in ((kfac.MBF, {}), (kfac.SENG, {})):
        model = _model()
        opt = cls(
            model, lr=1.0, damping=1e-2, loss_fn=F.cross_entropy, quadratic_step=True, **extra
        )
        losses = _train(opt, model, x, y, 10)
        assert losses[-1] < 0.7 * losses[0], cls.__name__


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"quadratic_step": True, "loss_fn": None}, "loss_fn"),
        ({"loss_fn": F.cross_entropy, "quadratic_step": False}, "neither is on"),
        ({"quadratic_step": True, "damping_scheme": "factored-relative"}, "damping_scheme"),
        ({"adaptive_damping": True, "damping": lambda step: 0.1}, "`damping` as a number"),
        ({"quadratic_step": True, "momentum": 0.9}, "momentum"),
        ({"quadratic_step": True, "kl_clip": 1e-3}, "kl_clip"),
        ({"quadratic_step": 1}, "quadratic_step"),
    ],
)
def test_invalid_configurations(kwargs, match) -> None:
    with pytest.raises(ValueError, match=match):
        _kfac(_model(), **kwargs)


def test_invalid_adaptive_damping_type_and_missing_batch() -> None:
    with pytest.raises(TypeError, match="adaptive_damping"):
        _kfac(_model(), adaptive_damping="yes")
    with pytest.raises(ValueError, match="QEKLDWRM"):
        kfac.QEKLDWRM(_model(), lr=0.1, quadratic_step=True, loss_fn=F.cross_entropy)
    with pytest.raises(ValueError, match="q-kld-wrm"):
        kfac.QKLDWRM(
            _model(),
            lr=0.1,
            quadratic_step=True,
            loss_fn=F.cross_entropy,
            damping_scheme="eigenbasis",
        )
    model = _model()
    x, y = _data()
    opt = _kfac(model, quadratic_step=True)
    F.cross_entropy(model(x), y).backward()
    with pytest.raises(ValueError, match="`batch`"):
        opt.step()
    with pytest.raises(ValueError, match="pair"):
        opt.step(batch=x)


def test_phase_timing_autocast_and_model_outputs() -> None:
    x, y = _data()
    model = _model().float()
    opt = _kfac(
        model,
        quadratic_step=True,
        adaptive_damping=True,
        time_phases=True,
        factor_dtype=torch.float32,
    )
    xf = x.float()
    for _ in range(3):
        opt.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = F.cross_entropy(model(xf), y)
        loss.backward()
        with torch.autocast("cpu", dtype=torch.bfloat16):  # a step inside autocast, too
            opt.step(batch=(xf, y))
    assert opt.preconditioner.timings["quadratic"] > 0.0
    stats = opt.last_step_control
    with torch.no_grad():
        exact = float(F.cross_entropy(model(xf), y))  # float32, no autocast
    assert math.isfinite(stats["alpha"])
    # the model's own evaluation of h ran in float32 (a bf16 forward is off by ~1e-3)
    h_before = stats["loss"]
    assert abs(h_before - exact) > 0  # it is the loss before the step, not after
    qm = opt.quadratic_model
    assert qm.loss((xf, y)) == pytest.approx(exact, rel=1e-6)

    class Pair(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(5, 3)

        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            out = self.fc(x)
            return out, out

    pair = Pair().double()
    opt = _kfac(pair, quadratic_step=True)
    out, _ = pair(x)
    F.cross_entropy(out, y).backward()
    with pytest.raises(TypeError, match="returns one tensor"):
        opt.step(batch=(x, y))


def test_gram_with_dropout_uses_one_mask_for_every_direction() -> None:
    """The directions' JVPs share one forward (one dropout mask), so the Gram matrix of a
    direction with itself twice is exactly rank one."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 16), nn.Dropout(0.5), nn.Tanh(), nn.Linear(16, 3)).double()
    x, y = _data()
    params = list(model.parameters())
    qm = QuadraticModel(model, F.cross_entropy, named_params(model, params))
    d = [torch.randn_like(p) for p in params]
    _, gram = qm.gram((x, y), [d, d])
    assert gram[0, 0] > 0
    assert torch.equal(gram[0, 0], gram[1, 1])
    assert torch.equal(gram[0, 1], gram[0, 0])


@pytest.mark.parametrize("quadratic", [True, False], ids=["quadratic-step", "fixed-lr"])
def test_a_step_that_increases_the_loss_is_undone(quadratic: bool) -> None:
    """A damping far too small on a classifier: the first steps overshoot; each is undone
    exactly (parameters, momentum, previous update) and the damping doubles, then x4, ..."""
    model = _model(width=32)
    x, y = _data(n=64)
    options = {"damping": 1e-8, "damping_scheme": "factored", "factor_init": "zero"}
    if quadratic:
        opt = _kfac(model, quadratic_step=True, adaptive_damping=True, **options)
    else:
        opt = _kfac(model, lr=50.0, momentum=0.9, adaptive_damping=True, **options)
    _train(opt, model, x, y, 1)  # kept or not, it leaves state to restore
    rejected = 0
    for _ in range(6):
        before = copy.deepcopy(model.state_dict())
        state = copy.deepcopy({k: dict(v) for k, v in opt.state.items()})
        damping = opt.preconditioner.damping
        _train(opt, model, x, y, 1)
        stats = opt.last_step_control
        if stats["rejected"]:
            rejected += 1
            assert stats["rho"] < 0
            for key, value in model.state_dict().items():
                assert torch.equal(value, before[key])
            for p, entry in opt.state.items():
                for key, value in entry.items():
                    assert torch.equal(value, state[p][key])
            expected = damping * 2.0**opt._rejections
            assert opt.preconditioner.damping == pytest.approx(expected, rel=1e-12)
    assert rejected >= 1
    losses = _train(opt, model, x, y, 20)
    assert losses[-1] < losses[0]


def test_quadratic_step_through_attention() -> None:
    """Forward-mode JVPs through nn.MultiheadAttention (the fused attention kernels have no
    forward derivative; the model is evaluated with the math kernel)."""
    from kfac import models

    torch.manual_seed(0)
    model = models.build("transformer", (1, 28, 28), 10, 0.25)
    x = torch.rand(16, 1, 28, 28)
    y = torch.randint(0, 10, (16,))
    opt = kfac.KFAC(
        model,
        lr=1.0,
        damping=1e-3,
        damping_scheme="factored",
        factor_every=1,
        inverse_every=1,
        loss_fn=F.cross_entropy,
        quadratic_step=True,
        adaptive_damping=True,
    )
    losses = []
    for _ in range(5):
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step(batch=(x, y))
        losses.append(float(loss.detach()))
    assert all(math.isfinite(v) for v in losses)
    assert losses[-1] < losses[0]
