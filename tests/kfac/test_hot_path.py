"""The prepared inverses of the hot path: the dense factor inverses and the full-rank
eigenbasis form equal the thin (complement) forms they replace, and a damping that changes
between refreshes is the one applied at every step."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import lowrank_nla as ln
from kfac._damping import Applied, DenseInverse, factor_inverse, make_damping

from .conftest import exact_preconditioner, mlp
from .test_direction import SCHEMES, _grad_matrices, _reference

F64 = torch.float64
EPS = torch.finfo(F64).eps
#: Condition number bound of the damped operators of the scheme tests: eigenvalues in
#: [1e-3, 10], identity weights 0.05 and 0.02, damping 0.01 (the eigenbasis schemes' worst
#: case, ``(10.05 * 10.02 + 0.01) / (0.05 * 0.02 + 0.01)``, is about 9.2e3).
KAPPA = 1e4


def _rep(dim: int, rank: int, seed: int) -> ln.LowRankPSD:
    """A rank-``rank`` PSD representation with spread eigenvalues (float64)."""
    gen = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(dim, dim, generator=gen, dtype=F64))
    d = torch.logspace(1, -3, rank, dtype=F64)
    return ln.LowRankPSD(Q[:, :rank].contiguous(), d)


def _thin_factored(G: Applied, A: Applied, lam_g: float, lam_a: float, V, cont: bool):
    """The previous hot path: the thin form ``U diag(c) U^T V + o V`` of both factors."""
    ig = ln.damped_inverse(G.rep, damping=lam_g + G.identity, tail=G.tail(cont))
    ia = ln.damped_inverse(A.rep, damping=lam_a + A.identity, tail=A.tail(cont))
    return ia.apply(ig.apply(V, "left"), "right")


def _close(actual: torch.Tensor, expected: torch.Tensor, kappa: float = KAPPA) -> None:
    """Two roundings of the same operator: the error of either is ``O(eps kappa)`` relative
    to the largest entry (``kappa`` the operator's condition number)."""
    scale = float(expected.abs().max())
    torch.testing.assert_close(actual, expected, rtol=0, atol=64 * EPS * kappa * scale)


@pytest.mark.parametrize("damping", [1e-4, 0.03, 3.0])
@pytest.mark.parametrize(("dim", "rank"), [(12, 12), (12, 7), (12, 6), (12, 5), (9, 0)], ids=str)
def test_factor_inverse_equals_the_thin_form(dim: int, rank: int, damping: float) -> None:
    """Dense for ``2 k >= D`` (full rank included), thin below; the same operator."""
    rep = _rep(dim, rank, seed=dim + rank)
    tail = float(rep.d.min()) if 0 < rank < dim else 0.0
    prepared = factor_inverse(rep, damping=damping, tail=tail, validate=True)
    thin = ln.damped_inverse(rep, damping=damping, tail=tail)
    assert isinstance(prepared, DenseInverse) == (2 * rank >= dim)
    kappa = (10.0 + damping) / damping
    V = torch.randn(dim, 5, dtype=F64)
    for side, W in (("left", V), ("right", V.T)):
        _close(prepared.apply(W, side), thin.apply(W, side), kappa)
    # against the inverse of the dense operator itself
    X = rep.to_dense() + tail * (torch.eye(dim, dtype=F64) - rep.U @ rep.U.T)
    X += damping * torch.eye(dim, dtype=F64)
    _close(prepared.apply(V), torch.linalg.solve(X, V), kappa)


@pytest.mark.parametrize("continuation", [True, False])
@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize(("rank_g", "rank_a"), [(10, 8), (10, 3), (4, 8)], ids=str)
def test_prepared_scheme_equals_the_previous_form(
    scheme: str, rank_g: int, rank_a: int, continuation: bool
) -> None:
    """Every scheme's prepared inverse against the form applied before the dense path
    (thin factor inverses; the four-block eigenbasis kernel), full and truncated ranks."""
    G = Applied.of(_rep(10, rank_g, 1), identity=0.05)
    A = Applied.of(_rep(8, rank_a, 2), identity=0.02)
    V = torch.randn(10, 8, dtype=F64)
    damping = 0.01
    prepared = make_damping(scheme).prepare(
        G, A, damping, continuation=continuation, validate=True
    )
    if scheme.startswith("eigenbasis"):
        lam = damping * G.top * A.top if scheme == "eigenbasis-relative" else damping
        previous = ln.kron_eigenbasis_inverse(
            G.rep,
            A.rep,
            damping=lam,
            tails=(G.tail(continuation), A.tail(continuation)),
            shift=(G.identity, A.identity),
        ).apply(V)
        full = rank_g == 10 and rank_a == 8
        assert (type(prepared).__name__ == "_FullEigenbasisInverse") == full
    else:
        lam_g, lam_a = make_damping(scheme).dampings(G, A, damping)  # type: ignore[attr-defined]
        previous = _thin_factored(G, A, lam_g, lam_a, V, continuation)
        assert isinstance(prepared.G, DenseInverse) == (2 * rank_g >= 10)  # type: ignore[attr-defined]
        assert isinstance(prepared.A, DenseInverse) == (2 * rank_a >= 8)  # type: ignore[attr-defined]
    _close(prepared.apply(V), previous)
    g_rows, a_rows = torch.randn(6, 10, dtype=F64), torch.randn(6, 8, dtype=F64)
    _close(prepared.apply_rows(g_rows, a_rows), prepared.apply(g_rows.T @ a_rows))


def _damping_schedule(step: int) -> float:
    return (0.1, 0.003, 0.03, 0.003, 1.0)[step % 5]


@pytest.mark.parametrize("scheme", SCHEMES)
def test_damping_schedule_is_applied_between_refreshes(scheme: str) -> None:
    """One refresh (step 0), then a damping that changes at every step: each step's
    direction is the float64 reference with that step's damping, never a stale one."""
    model = mlp().double()
    precond = exact_preconditioner(
        model,
        damping=_damping_schedule,
        damping_scheme=scheme,
        factor_every=100,
        inverse_every=100,
        factor_decay=0.5,
    )
    names = precond.layer_names
    factors: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    prepared_at: dict[int, object] = {}
    for step in range(7):
        x = torch.randn(10, 5, dtype=F64)
        model.zero_grad()
        nn.functional.cross_entropy(model(x), torch.randint(3, (10,))).backward()
        grads = _grad_matrices(model, names)
        precond.step()
        if step == 0:  # the only factor update and refresh
            factors = {n: precond.factors(n) for n in names}  # type: ignore[misc]
        after = _grad_matrices(model, names)
        prepared_at[step] = precond.state(names[0]).prepared
        for name in names:
            A, G = factors[name]
            assert precond.identity_weights(name) == (0.5, 0.5)
            ref = _reference(A, G, 0.5, 0.5, grads[name], _damping_schedule(step), scheme)
            stale = _reference(A, G, 0.5, 0.5, grads[name], _damping_schedule(step - 1), scheme)
            assert not torch.allclose(ref, stale, rtol=1e-6)  # the test can tell them apart
            torch.testing.assert_close(after[name], ref, rtol=1e-9, atol=1e-12)
            assert precond.state(name).damping == _damping_schedule(step)
    # steps 1 and 3 share a damping value but not a preparation: each change re-prepares
    assert prepared_at[1] is not prepared_at[3]


def test_constant_damping_prepares_once_per_refresh() -> None:
    """With a constant damping the prepared inverse is reused until the next refresh."""
    model = mlp().double()
    precond = exact_preconditioner(model, damping=0.01, inverse_every=3, factor_decay=0.5)
    seen = []
    for _ in range(6):
        model.zero_grad()
        out = model(torch.randn(10, 5, dtype=F64))
        nn.functional.cross_entropy(out, torch.randint(3, (10,))).backward()
        precond.step()
        seen.append(precond.state(precond.layer_names[0]).prepared)
    assert seen[0] is seen[1] is seen[2]
    assert seen[3] is seen[4] is seen[5]
    assert seen[2] is not seen[3]


def test_full_rank_factored_apply_is_two_products() -> None:
    """The dense path: one ``D x D`` matrix per factor, so the step is ``M_G V M_A``."""
    model = mlp().double()
    precond = exact_preconditioner(model, damping_scheme="factored", damping=0.04)
    model.zero_grad()
    nn.functional.cross_entropy(
        model(torch.randn(10, 5, dtype=F64)), torch.randint(3, (10,))
    ).backward()
    grads = _grad_matrices(model, precond.layer_names)
    precond.step()
    for name in precond.layer_names:
        prepared = precond.state(name).prepared
        assert isinstance(prepared.G, DenseInverse)
        assert isinstance(prepared.A, DenseInverse)
        A, G = precond.factors(name)
        sA, sG = precond.identity_weights(name)
        eye_a, eye_g = torch.eye(A.shape[0], dtype=F64), torch.eye(G.shape[0], dtype=F64)
        M_A = torch.linalg.inv(A + (sA + math.sqrt(0.04)) * eye_a)
        M_G = torch.linalg.inv(G + (sG + math.sqrt(0.04)) * eye_g)
        torch.testing.assert_close(prepared.A.M, M_A, rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(prepared.G.M, M_G, rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(prepared.apply(grads[name]), M_G @ grads[name] @ M_A)
