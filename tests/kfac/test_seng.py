"""SENG: directions against the dense damped empirical-Fisher solve from torch.func per-sample
gradients (float64) in every representation, stale reuse between refreshes, the sketched
Gram's expectation under both scalings (statistical test over many draws), and the errors."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import kfac
from kfac.seng import SENGBlock

from .test_fngd import VMAP_ATTENTION, make_case, per_sample_layers

RTOL = 1e-8


def dense_direction(G: torch.Tensor, grad: torch.Tensor, damping: float) -> torch.Tensor:
    """``(lambda I + G^T G / n)^{-1} grad`` solved densely (``G`` is ``(n, P)``)."""
    n, P = G.shape
    F = G.T @ G / n
    return torch.linalg.solve(F + damping * torch.eye(P, dtype=G.dtype), grad)


@pytest.mark.parametrize(
    ("case", "options", "kinds"),
    [
        ("linear", {}, ["factored", "factored"]),
        ("linear-no-bias", {}, ["factored", "factored"]),
        ("positions", {}, ["explicit", "factored"]),
        ("conv", {}, ["explicit", "factored"]),
        ("conv-strided", {}, ["explicit", "factored"]),
        # the implicit form is exact when it keeps every singular triple
        ("conv", {"explicit_max": 1, "svd_rank": 3}, ["implicit", "factored"]),
        ("positions", {"explicit_max": 1, "svd_rank": 3}, ["implicit", "factored"]),
        ("attention", {}, ["explicit", "explicit", "factored"]),
    ],
)
@VMAP_ATTENTION
def test_unsketched_direction_equals_the_dense_solve(case, options, kinds) -> None:
    model, x, y, prefixes = make_case(case)
    G = per_sample_layers(copy.deepcopy(model), x, y, prefixes)
    damping = 0.07
    precond = kfac.SENGPreconditioner(
        model, damping=damping, update_freq=1, col_sample_size=None,
        factor_dtype=torch.float64, **options,
    )  # fmt: skip
    nn.functional.cross_entropy(model(x), y).backward()
    grads = {n: precond.layer(n).grad_matrix(torch.float64).flatten().clone() for n in prefixes}
    precond.step()
    assert [row["kind"] for row in precond.diagnostics()] == kinds
    for name in prefixes:
        expected = dense_direction(G[name], grads[name], damping)
        written = precond.layer(name).grad_matrix(torch.float64).flatten()
        torch.testing.assert_close(written, expected, rtol=RTOL, atol=RTOL * expected.abs().max())


def test_truncated_implicit_form_is_an_approximation() -> None:
    """With fewer SVD terms than the output-gradient maps' rank the direction differs from the
    exact one, and its Gram is below the exact Gram in the PSD order (a projection)."""
    model, x, y, _ = make_case("conv")
    block = SENGBlock(dtype=torch.float64, col_sample_size=None, explicit_max=1, svd_rank=1)
    exact = SENGBlock(dtype=torch.float64, col_sample_size=None)
    precond = kfac.SENGPreconditioner(model, update_freq=1, factor_dtype=torch.float64)
    nn.functional.cross_entropy(model(x), y).backward()
    batch = precond.recorded("0")
    layer = precond.layer("0")
    K1, _, _ = block.sketch(block.represent(layer, batch))
    K, _, _ = exact.sketch(exact.represent(layer, batch))
    assert torch.linalg.eigvalsh(K - K1).min() > -1e-10 * K.abs().max()
    assert (K - K1).abs().max() > 1e-3 * K.abs().max()


def test_stale_u_is_reused_with_the_current_gradient() -> None:
    model, x, y, prefixes = make_case("conv", n=12)
    clean = copy.deepcopy(model)
    damping = 0.1
    precond = kfac.SENGPreconditioner(
        model, damping=damping, update_freq=3, col_sample_size=None, factor_dtype=torch.float64
    )
    sgd = torch.optim.SGD(model.parameters(), lr=0.05)
    batches = torch.arange(12).split(4)
    refresh_G = None
    for step, idx in enumerate(batches * 2):
        sgd.zero_grad()
        clean.load_state_dict(model.state_dict())
        nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
        if step % 3 == 0:
            refresh_G = per_sample_layers(clean, x[idx], y[idx], prefixes)
        grads = {
            n: precond.layer(n).grad_matrix(torch.float64).flatten().clone() for n in prefixes
        }
        precond.step()
        for name in prefixes:
            expected = dense_direction(refresh_G[name], grads[name], damping)
            written = precond.layer(name).grad_matrix(torch.float64).flatten()
            torch.testing.assert_close(
                written, expected, rtol=RTOL, atol=RTOL * expected.abs().max()
            )
        sgd.step()
    assert [row["refreshes"] for row in precond.diagnostics()] == [2, 2]


@pytest.mark.parametrize("kind", ["explicit", "factored"])
@pytest.mark.parametrize("scaling", ["unbiased", "reference"])
def test_sketched_gram_expectation(kind, scaling) -> None:
    """Mean of many sketched Grams against ``K`` (unbiased) or ``r K`` (reference; ``r`` the
    sampling ratio), within 5 standard errors entrywise."""
    case = "conv" if kind == "explicit" else "linear"
    model, x, y, _ = make_case(case, n=5)
    if kind == "factored":
        model = nn.Sequential(nn.Linear(6, 9), nn.Tanh(), nn.Linear(9, 4)).double()
    precond = kfac.SENGPreconditioner(model, update_freq=1, factor_dtype=torch.float64)
    nn.functional.cross_entropy(model(x), y).backward()
    layer = precond.layer("0")
    batch = precond.recorded("0")
    s = 2 if kind == "explicit" else 3  # explicit: 4 of 27 coordinates; factored: 3 of 9, 3 of 7
    block = SENGBlock(dtype=torch.float64, col_sample_size=s, scaling=scaling, seed=5)
    rep = block.represent(layer, batch)
    assert rep.kind == kind
    K, _, _ = SENGBlock(dtype=torch.float64, col_sample_size=None).sketch(rep)
    draws = torch.stack([block.sketch(rep)[0] for _ in range(4000)])
    if kind == "explicit":
        ratio = layer.dim_G * layer.dim_A / s**2
    else:
        ratio = (layer.dim_G / s) * (layer.dim_A / s)
    target = K if scaling == "unbiased" else ratio * K
    mean = draws.mean(dim=0)
    stderr = draws.std(dim=0) / draws.shape[0] ** 0.5
    assert ((mean - target).abs() <= 5 * stderr + 1e-12).all()
    if scaling == "reference":  # and it is not the unbiased Gram
        assert ((mean - K).abs() > 5 * stderr).any()


def test_ug_uses_the_sampled_coordinates_and_the_direction_is_finite() -> None:
    model, x, y, _ = make_case("conv")
    precond = kfac.SENGPreconditioner(model, update_freq=1, col_sample_size=2)
    nn.functional.cross_entropy(model(x), y).backward()
    precond.step()
    state = precond.state("0")
    assert state.cols is not None
    assert state.cols.numel() == 4
    assert state.ug_scale == 3 * 19 / 4  # P = d_G d_A = 3 (2 * 9 + 1) over s^2 = 4
    assert torch.isfinite(precond.layer("0").grad_matrix(torch.float32)).all()


def test_errors() -> None:
    model, *_ = make_case("linear")
    for options, message in (
        ({"scaling": "biased"}, r"Invalid scaling: 'biased'; valid names"),
        ({"col_sample_size": 0}, r"Invalid col_sample_size: 0 \(must be an int >= 1 or None\)"),
        ({"explicit_max": 0.5}, r"Invalid explicit_max: 0.5 \(must be an int >= 1\)"),
        ({"svd_rank": True}, r"Invalid svd_rank: True \(must be an int >= 1\)"),
        ({"inverse_every": 3}, r"Invalid option 'inverse_every': SENG rebuilds"),
        # before: "Invalid factor_every: 0", an option SENG does not take
        ({"update_freq": 0}, r"Invalid update_freq: 0 \(must be an integer >= 1\)"),
    ):
        with pytest.raises(ValueError, match=message):
            kfac.SENGPreconditioner(model, **options)
    with pytest.raises(ValueError, match=r"Invalid seed: 1.5 \(must be an integer\)"):
        SENGBlock(seed=1.5)  # before: truncated to 1
    with pytest.raises(ValueError, match=r"Invalid fisher: 'mc'; SENG's U holds"):
        kfac.Preconditioner(model, "seng", fisher="mc", loss="cross_entropy")
    precond = kfac.SENGPreconditioner(model)
    other = kfac.SENGPreconditioner(make_case("linear")[0], scaling="unbiased")
    with pytest.raises(ValueError, match=r"saved with scaling='unbiased'"):
        precond.load_state_dict(other.state_dict())


def test_a_stale_step_reads_nothing_back(monkeypatch) -> None:
    from .test_engine import count_conversions, model_and_batch

    model, x, y = model_and_batch()
    precond = kfac.SENGPreconditioner(model, update_freq=3, col_sample_size=4)
    for step in range(3):
        model.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        if step == 2:
            before = [p.grad.clone() for p in model.parameters()]
            with count_conversions(monkeypatch) as calls:
                precond.step()
        else:
            precond.step()
    assert calls == []
    assert all(not torch.equal(b, p.grad) for b, p in zip(before, model.parameters(), strict=True))


# ------------------------------------------------------------------ BatchNorm2d


def _bn_model(bias: bool = True) -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(1, 3, 3), nn.BatchNorm2d(3), nn.Tanh(), nn.Flatten(), nn.Linear(48, 4)
    ).double()
    if not bias:
        net[1].bias.requires_grad_(False)
    return net


def _bn_per_sample(net: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``(n, C, 2)`` per-sample gradients of the BatchNorm's weight and bias by
    ``vmap(grad)``: each sample's loss through the network with the normalisation frozen
    at the batch's statistics (what the training forward used), computed without running
    the BatchNorm module (its running averages stay as they are)."""
    from torch.func import grad, vmap

    with torch.no_grad():
        h = net[0](x)
        var, mean = torch.var_mean(h, dim=(0, 2, 3), unbiased=False)
    bn = net[1]
    params = {"weight": bn.weight.detach(), "bias": bn.bias.detach()}

    def loss(p: dict[str, torch.Tensor], xi: torch.Tensor, yi: torch.Tensor) -> torch.Tensor:
        hi = net[0](xi[None])
        z = nn.functional.batch_norm(
            hi, mean, var, p["weight"], p["bias"], training=False, eps=bn.eps
        )
        out = net[4](net[3](net[2](z)))
        return nn.functional.cross_entropy(out, yi[None])

    g = vmap(grad(loss), in_dims=(None, 0, 0))(params, x, y)
    return torch.stack([g["weight"], g["bias"]], dim=2).detach()


@pytest.mark.parametrize("bias", [True, False])
def test_batchnorm2d_direction_equals_the_dense_solve(bias: bool) -> None:
    """SENG preconditions BatchNorm2d: its per-sample gradients (channel-wise, from the
    recorded rows) equal ``vmap(grad)``'s in float64, the direction is the dense damped
    solve, and the running statistics are exactly those of the training forward alone."""
    net = _bn_model(bias)
    plain = copy.deepcopy(net)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(7, 1, 6, 6, generator=gen, dtype=torch.float64)
    y = torch.randint(4, (7,), generator=gen)
    expected_G = _bn_per_sample(copy.deepcopy(net), x, y)[:, :, : 1 + int(bias)]
    damping = 0.07
    precond = kfac.SENGPreconditioner(
        net, damping=damping, update_freq=1, col_sample_size=None, factor_dtype=torch.float64
    )
    assert precond.layer_names == ["0", "1", "4"]
    assert kfac.FNGDPreconditioner(_bn_model()).layer_names == ["0", "4"]  # SENG's only
    assert kfac.KFACPreconditioner(_bn_model()).layer_names == ["0", "4"]
    nn.functional.cross_entropy(net(x), y).backward()
    plain(x)  # the same training forward, without SENG
    grad = precond.layer("1").grad_matrix(torch.float64).flatten().clone()
    precond.step()
    state = precond.state("1")
    assert state.kind == "explicit"
    n = x.shape[0]
    G = expected_G.reshape(n, -1)
    torch.testing.assert_close(state.U * n**0.5, G, rtol=RTOL, atol=RTOL * float(G.abs().max()))
    torch.testing.assert_close(G.mean(0), grad, rtol=RTOL, atol=RTOL * float(grad.abs().max()))
    expected = dense_direction(G, grad, damping)
    written = precond.layer("1").grad_matrix(torch.float64).flatten()
    torch.testing.assert_close(written, expected, rtol=RTOL, atol=RTOL * expected.abs().max())
    for key in ("running_mean", "running_var", "num_batches_tracked"):
        assert torch.equal(getattr(net[1], key), getattr(plain[1], key)), key


def test_batchnorm2d_in_eval_mode_and_without_affine_is_left_alone() -> None:
    """A BatchNorm2d without affine parameters has nothing to precondition; in eval mode
    nothing is recorded (and the running statistics do not move)."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2, affine=False), nn.Flatten(),
                        nn.Linear(32, 3))  # fmt: skip
    precond = kfac.SENGPreconditioner(net, update_freq=1)
    assert precond.layer_names == ["0", "3"]
    net = _bn_model()
    precond = kfac.SENGPreconditioner(net, update_freq=1)
    before = net[1].running_mean.clone()
    net.eval()
    with torch.no_grad():
        net(torch.randn(4, 1, 6, 6, dtype=torch.float64))
    assert torch.equal(net[1].running_mean, before)
    assert precond.recorded("1") is None
