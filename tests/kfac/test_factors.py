"""Kronecker factors against curvlinops' KFACLinearOperator and exact-curvature cases.

curvlinops (``KFACLinearOperator``, ``separate_weight_and_bias=False``) stores ``A`` (input
covariance) and ``G`` (gradient covariance) per module. Our conventions (``kfac._layers``)
relate to its as::

    Linear, (n, d) inputs, cross-entropy:  A = A_cl,         G = G_cl
    Linear, MSELoss mean over k outputs:   A = A_cl,         G = G_cl / k  (empirical)
                                                             G = G_cl      (MC vs type-2)
    Linear, tau extra positions, MSE:      A = A_cl / tau,   G = G_cl / k  (empirical)
    Conv2d, tau output positions, CE:      A = A_cl / tau,   G = G_cl * tau

(we use ``n dL/ds`` of the batch-mean loss and put the KFC ``1/tau`` on ``A``; curvlinops'
empirical Fisher for MSELoss treats each of the ``k`` outputs as a unit-variance Gaussian
term, its type-2 Fisher matches ours). The products agree up to those scalars.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn
from torch.func import functional_call, jacrev

from .conftest import convnet, exact_preconditioner, mlp

curvlinops = pytest.importorskip("curvlinops")


def curvlinops_factors(
    model: nn.Module, loss: nn.Module, x: torch.Tensor, y: torch.Tensor, fisher: str, **kw: Any
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    op = curvlinops.KFACLinearOperator(
        model,
        loss,
        list(model.parameters()),
        [(x, y)],
        fisher_type=fisher,
        separate_weight_and_bias=False,
        check_deterministic=False,
        **kw,
    )
    op.compute_kronecker_factors()
    return op._input_covariances, op._gradient_covariances


def our_factors(model: nn.Module, loss: nn.Module, x, y, **kw: Any):
    precond = exact_preconditioner(model, **kw)
    model.zero_grad()
    loss(model(x), y).backward()
    precond.step()
    precond.remove()
    return {name: precond.factors(name) for name in precond.layer_names}


CASES = {
    "linear-ce": (lambda: mlp(), (11, 5), "ce", lambda tau, k: (1.0, 1.0)),
    "linear-nobias-ce": (lambda: mlp(bias=False), (11, 5), "ce", lambda tau, k: (1.0, 1.0)),
    "linear-mse": (lambda: mlp(), (11, 5), "mse", lambda tau, k: (1.0, 1.0 / k)),
    "linear-positions-mse": (lambda: mlp(), (4, 6, 5), "mse", lambda tau, k: (1 / tau, 1.0 / k)),
    "conv-ce": (lambda: convnet(), (6, 2, 8, 8), "ce", lambda tau, k: (1 / tau, tau)),
    "conv-strided-ce": (
        lambda: convnet(stride=2),
        (6, 2, 8, 8),
        "ce",
        lambda tau, k: (1 / tau, tau),
    ),
    "conv-dilated-ce": (
        lambda: convnet(padding=2, dilation=2),
        (6, 2, 8, 8),
        "ce",
        lambda tau, k: (1 / tau, tau),
    ),
}


def _data(model: nn.Module, shape: tuple[int, ...], kind: str):
    x = torch.randn(*shape, dtype=torch.float64)
    out = model(x)
    if kind == "ce":
        return x, torch.randint(out.shape[-1], out.shape[:-1]), nn.CrossEntropyLoss()
    return x, torch.randn_like(out), nn.MSELoss()


def _positions(model: nn.Module, name: str, x: torch.Tensor) -> float:
    """tau of a layer: extra input positions (Linear) or output positions (Conv2d)."""
    seen: dict[str, float] = {}
    module = model.get_submodule(name)

    def hook(mod, args, out):
        seen["tau"] = (
            out[0, 0].numel() if isinstance(mod, nn.Conv2d) else out[0].numel() / out.shape[-1]
        )

    handle = module.register_forward_hook(hook)
    model(x)
    handle.remove()
    return float(seen["tau"])


@pytest.mark.parametrize("case", list(CASES))
def test_empirical_factors_match_curvlinops(case: str) -> None:
    build, shape, kind, scale = CASES[case]
    model = build().double()
    x, y, loss = _data(model, shape, kind)
    A_cl, G_cl = curvlinops_factors(model, loss, x, y, "empirical")
    ours = our_factors(model, loss, x, y)
    k = model(x).shape[-1]
    for name, (A, G) in ours.items():
        s_a, s_g = scale(_positions(model, name, x), k)
        torch.testing.assert_close(A, s_a * A_cl[name], rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(G, s_g * G_cl[name], rtol=1e-10, atol=1e-14)


MC_SCALE = {"linear-ce": 1.0, "linear-mse": 1.0, "conv-ce": None}


@pytest.mark.parametrize("case", list(MC_SCALE))
def test_mc_factors_match_curvlinops_in_expectation(case: str) -> None:
    """MC Fisher: A is exact; G averaged over many draws converges to curvlinops' exact
    ("type-2") expectation. The running mean uses the decay schedule rho_m = m / (m + 1)."""
    build, shape, kind, scale = CASES[case]
    model = build().double()
    x, y, loss = _data(model, shape, kind)
    A_cl, G_cl = curvlinops_factors(model, loss, x, y, "type-2")
    draws = 400
    precond = exact_preconditioner(
        model,
        fisher="mc",
        loss="cross_entropy" if kind == "ce" else "mse",
        factor_decay=lambda step: step / (step + 1),
    )
    for _ in range(draws):
        model.zero_grad()
        loss(model(x), y).backward()
        precond.step()
    k = model(x).shape[-1]
    for name in precond.layer_names:
        A, G = precond.factors(name)
        assert precond.identity_weights(name) == (0.0, 0.0)
        s_a, s_g = scale(_positions(model, name, x), k)
        s_g = MC_SCALE[case] or s_g
        torch.testing.assert_close(A, s_a * A_cl[name], rtol=1e-10, atol=1e-12)
        ref = s_g * G_cl[name]
        rel = float(torch.linalg.matrix_norm(G - ref) / torch.linalg.matrix_norm(ref))
        # Monte-Carlo error ~ 1/sqrt(draws) = 0.05; a wrong scale or sampler is off by >= 50%.
        assert rel < 0.2, rel


def test_empirical_one_datum_is_exact() -> None:
    """With one datum, A (x) G is the exact empirical Fisher block vec(grad) vec(grad)^T."""
    model = mlp().double()
    x, y = torch.randn(1, 5, dtype=torch.float64), torch.tensor([2])
    precond = exact_preconditioner(model)
    nn.functional.cross_entropy(model(x), y).backward()
    grads = {
        name: torch.cat([m.weight.grad, m.bias.grad[:, None]], dim=1)
        for name, m in [("0", model[0]), ("2", model[2])]
    }
    precond.step()
    for name, grad in grads.items():
        A, G = precond.factors(name)
        # column-major vec of the d_G x d_A gradient: F = A (x) G
        v = grad.T.reshape(-1)
        torch.testing.assert_close(torch.kron(A, G), torch.outer(v, v), rtol=1e-12, atol=1e-14)


def _ggn_blocks(model: nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Exact GGN blocks of MSELoss(mean) per layer, ordered like vec([W, b]) column-major."""
    params = dict(model.named_parameters())
    out_dim = model(x).numel()

    def f(p):
        return functional_call(model, p, (x,)).reshape(-1)

    J = jacrev(f)(params)
    blocks = {}
    for name, _ in model.named_children():
        if f"{name}.weight" not in params:
            continue
        Jw, Jb = J[f"{name}.weight"], J[f"{name}.bias"]
        # columns of [W, b] in column-major order: for each input column j, all outputs
        Jmat = torch.cat([Jw, Jb[..., None]], dim=-1)  # (out, d_G, d_A)
        Jvec = Jmat.transpose(1, 2).reshape(out_dim, -1)
        blocks[name] = Jvec.T @ Jvec * (2.0 / out_dim)  # Hessian of MSELoss(mean) = 2/N I
    return blocks


def test_deep_linear_network_matches_exact_ggn() -> None:
    """In a deep linear network the output Jacobian does not depend on the input, so the
    exact GGN block of each layer is a Kronecker product and K-FAC (MC Fisher, averaged) is
    exact: our A (x) G equals it up to Monte-Carlo error, and A equals its input side exactly."""
    model = nn.Sequential(nn.Linear(4, 6), nn.Linear(6, 5), nn.Linear(5, 3)).double()
    x = torch.randn(9, 4, dtype=torch.float64)
    y = torch.randn(9, 3, dtype=torch.float64)
    with torch.no_grad():
        exact = _ggn_blocks(model, x)
    precond = exact_preconditioner(
        model, fisher="mc", loss="mse", factor_decay=lambda step: step / (step + 1)
    )
    for _ in range(600):
        model.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        precond.step()
    n = x.shape[0]
    for name in precond.layer_names:
        A, G = precond.factors(name)
        # A = mean of a a^T and E[G] = J^T H_i J: A (x) G is the GGN of the batch mean
        approx = torch.kron(A, G)
        rel = float(
            torch.linalg.matrix_norm(approx - exact[name]) / torch.linalg.matrix_norm(exact[name])
        )
        assert rel < 0.08, (name, rel)  # measured 0.01-0.025 with 600 draws
    # the exact block's input side: contract the output indices of the first layer's block
    first = precond.layer_names[0]
    A, _ = precond.factors(first)
    xa = torch.cat([x, torch.ones(n, 1, dtype=torch.float64)], dim=1)
    torch.testing.assert_close(A, xa.T @ xa / n, rtol=1e-12, atol=1e-14)
