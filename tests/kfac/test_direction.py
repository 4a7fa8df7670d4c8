"""The preconditioned direction against a dense float64 reference built with ``torch.kron``."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import kfac

from .conftest import convnet, exact_preconditioner, mlp


def _grad_matrices(model: nn.Module, names: list[str]) -> dict[str, torch.Tensor]:
    out = {}
    for name in names:
        m = model.get_submodule(name)
        w = m.weight.grad.reshape(m.weight.shape[0], -1)
        out[name] = w if m.bias is None else torch.cat([w, m.bias.grad[:, None]], dim=1)
    return out


def _reference(A, G, sA, sG, V, damping: float, scheme: str) -> torch.Tensor:
    """vec(V') = F^-1 vec(V), column-major vec, F from kron of the damped factors."""
    dA, dG = A.shape[0], G.shape[0]
    IA, IG = torch.eye(dA, dtype=A.dtype), torch.eye(dG, dtype=A.dtype)
    v = V.T.reshape(-1)
    top_a, top_g = float(torch.linalg.eigvalsh(A)[-1]), float(torch.linalg.eigvalsh(G)[-1])
    if scheme.startswith("eigenbasis"):
        lam = damping * top_a * top_g if scheme == "eigenbasis-relative" else damping
        F = torch.kron(A + sA * IA, G + sG * IG) + lam * torch.eye(dA * dG, dtype=A.dtype)
    else:
        if scheme == "factored":
            la = lg = math.sqrt(damping)
        elif scheme == "factored-relative":
            la, lg = damping * top_a, damping * top_g
        else:  # pi
            pi = math.sqrt((float(A.trace()) / dA) / (float(G.trace()) / dG))
            la, lg = math.sqrt(damping) * pi, math.sqrt(damping) / pi
        F = torch.kron(A + (sA + la) * IA, G + (sG + lg) * IG)
    return torch.linalg.solve(F, v).reshape(dA, dG).T


SCHEMES = ["eigenbasis", "eigenbasis-relative", "factored", "factored-relative", "pi"]


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("build", [mlp, convnet], ids=["mlp", "conv"])
def test_direction_matches_dense_kron(scheme: str, build) -> None:
    model = build().double()
    shape = (10, 5) if build is mlp else (6, 2, 8, 8)
    precond = exact_preconditioner(model, factor_decay=0.5, damping=0.03, damping_scheme=scheme)
    for _step in range(3):  # three EA updates: the identity weight is 0.5^3
        x = torch.randn(*shape, dtype=torch.float64)
        model.zero_grad()
        out = model(x)
        nn.functional.cross_entropy(out, torch.randint(out.shape[1], (shape[0],))).backward()
        grads = _grad_matrices(model, precond.layer_names)
        precond.step()
    after = _grad_matrices(model, precond.layer_names)
    for name in precond.layer_names:
        A, G = precond.factors(name)
        sA, sG = precond.identity_weights(name)
        assert sA == sG == 0.125
        ref = _reference(A, G, sA, sG, grads[name], 0.03, scheme)
        torch.testing.assert_close(after[name], ref, rtol=1e-9, atol=1e-12)


def test_float32_factors_match_float64_reference() -> None:
    """float32 statistics and decompositions: the direction agrees to float32 accuracy."""
    model = mlp()
    precond = exact_preconditioner(model, factor_dtype=torch.float32, damping_scheme="factored")
    x = torch.randn(32, 5)
    nn.functional.cross_entropy(model(x), torch.randint(3, (32,))).backward()
    grads = _grad_matrices(model, precond.layer_names)
    precond.step()
    after = _grad_matrices(model, precond.layer_names)
    for name in precond.layer_names:
        A, G = (f.double() for f in precond.factors(name))
        ref = _reference(A, G, 0.0, 0.0, grads[name].double(), 0.1, "factored")
        rtol = 4 * math.sqrt(torch.finfo(torch.float32).eps)
        torch.testing.assert_close(
            after[name].double(), ref, rtol=rtol, atol=rtol * ref.abs().max()
        )


def _one_step(precond_kwargs: dict, lr: float | None = None):
    model = mlp().double()
    precond = exact_preconditioner(model, damping_scheme="factored", **precond_kwargs)
    x = torch.randn(10, 5, dtype=torch.float64)
    nn.functional.cross_entropy(model(x), torch.randint(3, (10,))).backward()
    grads = _grad_matrices(model, precond.layer_names)
    precond.step(lr=lr)
    after = _grad_matrices(model, precond.layer_names)
    refs = {}
    for name in precond.layer_names:
        A, G = precond.factors(name)
        refs[name] = _reference(A, G, 0.0, 0.0, grads[name], 0.1, "factored")
    return grads, after, refs


def test_rms_clip_caps_each_layer() -> None:
    kappa = 1e-3
    _grads, after, refs = _one_step({"rms_clip": kappa})
    for name, ref in refs.items():
        rms = float(torch.linalg.vector_norm(ref)) / math.sqrt(ref.numel())
        assert rms > kappa  # the clip is active on this case
        torch.testing.assert_close(after[name], ref * (kappa / rms), rtol=1e-12, atol=0)


def test_kl_clip_scales_all_layers_by_one_factor() -> None:
    kappa, lr = 1e-4, 0.5
    grads, after, refs = _one_step({"kl_clip": kappa}, lr=lr)
    total = sum(lr**2 * float((refs[n] * grads[n]).sum()) for n in refs)
    nu = min(1.0, math.sqrt(kappa / abs(total)))
    assert nu < 1.0
    for name, ref in refs.items():
        torch.testing.assert_close(after[name], nu * ref, rtol=1e-12, atol=0)


def test_kl_clip_without_lr_is_an_error() -> None:
    model = mlp()
    precond = kfac.KFACPreconditioner(model, kl_clip=1e-3, factor_every=1, inverse_every=1)
    nn.functional.cross_entropy(model(torch.randn(4, 5)), torch.tensor([0, 1, 2, 0])).backward()
    with pytest.raises(ValueError, match="kl_clip needs a learning rate"):
        precond.step()


def test_schedules_are_called_with_the_step() -> None:
    seen: list[int] = []

    def damping(step: int) -> float:
        seen.append(step)
        return 0.1

    model = mlp()
    precond = kfac.KFACPreconditioner(model, damping=damping, factor_every=1, inverse_every=2)
    for _ in range(3):
        model.zero_grad()
        nn.functional.cross_entropy(
            model(torch.randn(4, 5)), torch.tensor([0, 1, 2, 0])
        ).backward()
        precond.step()
    assert seen == [0, 1, 2]


def test_inverse_period_keeps_the_representation() -> None:
    """Between inverse updates the direction uses the last representation, not the new EA."""
    model = mlp().double()
    precond = exact_preconditioner(model, inverse_every=2, factor_decay=0.5)
    snapshot = {}
    for step in range(2):
        model.zero_grad()
        nn.functional.cross_entropy(
            model(torch.randn(10, 5, dtype=torch.float64)), torch.randint(3, (10,))
        ).backward()
        grads = _grad_matrices(model, precond.layer_names)
        precond.step()
        if step == 0:  # the representation is refreshed here, from one EA update
            snapshot = {n: tuple(f.clone() for f in precond.factors(n)) for n in grads}
    after = _grad_matrices(model, precond.layer_names)
    for name in precond.layer_names:
        assert precond.identity_weights(name) == (0.25, 0.25)  # two EA updates happened
        A, G = snapshot[name]
        ref = _reference(A, G, 0.5, 0.5, grads[name], 0.1, "factored-relative")
        torch.testing.assert_close(after[name], ref, rtol=1e-9, atol=1e-12)
        A_now, _ = precond.factors(name)
        assert not torch.allclose(A_now, A)  # the EA moved on; the representation did not
