"""Inverse application against dense float64 solves, on every backend."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import lowrank_nla as ln
from lowrank_nla.testing import Backend, to_numpy


def _factor(D: int, k: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    gen = np.random.default_rng(seed)
    U, _ = np.linalg.qr(gen.standard_normal((D, k)))
    d = np.sort(gen.uniform(0.1, 5.0, k))[::-1]
    return U, d


def _dense(U: np.ndarray, d: np.ndarray, tail: float, damping: float) -> np.ndarray:
    D = U.shape[0]
    return (U * d) @ U.T + tail * (np.eye(D) - U @ U.T) + damping * np.eye(D)


def _state(backend: Backend, U: np.ndarray, d: np.ndarray) -> ln.LowRankPSD:
    return ln.LowRankPSD(backend.asarray(U), backend.asarray(d))


def _rel(a, b) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("tail", [0.0, "min"])
def test_damped_inverse_apply_equals_dense_solve(backend: Backend, side, tail) -> None:
    U, d = _factor(30, 7, 0)
    t = float(d.min()) if tail == "min" else 0.0
    X = _dense(U, d, t, 0.3)
    V = np.random.default_rng(1).standard_normal((30, 4) if side == "left" else (4, 30))
    out = ln.damped_inverse_apply(
        _state(backend, U, d), backend.asarray(V), damping=0.3, tail=t, side=side
    )
    assert out.dtype == backend.dtype
    assert tuple(out.shape) == V.shape
    ref = np.linalg.solve(X, V) if side == "left" else np.linalg.solve(X.T, V.T).T
    assert _rel(to_numpy(out).astype(np.float64), ref) <= 100 * backend.eps


def test_damped_inverse_apply_vector_and_full_rank() -> None:
    U, d = _factor(12, 12, 2)
    v = np.arange(12.0)
    out = ln.damped_inverse_apply(ln.LowRankPSD(U, d), v, damping=1e-3)
    np.testing.assert_allclose(out, np.linalg.solve(_dense(U, d, 0.0, 1e-3), v), rtol=1e-10)


@given(st.integers(2, 25), st.floats(1e-4, 10.0), st.booleans(), st.integers(0, 2**16))
def test_damped_inverse_apply_property(D, damping, continuation, seed) -> None:
    gen = np.random.default_rng(seed)
    k = int(gen.integers(0, D + 1))
    U, d = _factor(D, k, seed) if k else (np.zeros((D, 0)), np.zeros(0))
    t = float(d.min()) if continuation and k else 0.0
    V = gen.standard_normal((D, 3))
    out = ln.damped_inverse_apply(ln.LowRankPSD(U, d), V, damping=damping, tail=t)
    X = _dense(U, d, t, damping)
    assert np.linalg.norm(X @ out - V) <= 1e-9 * np.linalg.norm(V) * np.linalg.cond(X)


def _kfac_pair(dg: int, da: int, kg: int, ka: int):
    Ug, dG = _factor(dg, kg, 3)
    Ua, dA = _factor(da, ka, 4)
    return Ug, dG, Ua, dA


@pytest.mark.parametrize("ranks", [(8, 6), (5, 4)], ids=["full", "low-rank"])
@pytest.mark.parametrize("continuation", [False, True])
@pytest.mark.parametrize("relative", [False, True])
def test_kron_inverse_apply_factored_equals_dense(backend, ranks, continuation, relative) -> None:
    Ug, dG, Ua, dA = _kfac_pair(8, 6, *ranks)
    V = np.random.default_rng(5).standard_normal((8, 6))
    lam, shift = 0.05, (0.01, 0.02)
    out = ln.kron_inverse_apply(
        _state(backend, Ug, dG),
        _state(backend, Ua, dA),
        backend.asarray(V),
        damping=lam,
        relative=relative,
        continuation=continuation,
        shift=shift,
    )
    lg = (lam * dG.max() if relative else np.sqrt(lam)) + shift[0]
    la = (lam * dA.max() if relative else np.sqrt(lam)) + shift[1]
    tg = dG.min() if continuation and ranks[0] < 8 else 0.0
    ta = dA.min() if continuation and ranks[1] < 6 else 0.0
    ref = np.linalg.solve(_dense(Ug, dG, tg, lg), V) @ np.linalg.inv(_dense(Ua, dA, ta, la))
    assert _rel(to_numpy(out).astype(np.float64), ref) <= 1e3 * backend.eps


def test_kron_inverse_apply_pi_adjusted() -> None:
    Ug, dG, Ua, dA = _kfac_pair(8, 6, 8, 6)
    V = np.random.default_rng(6).standard_normal((8, 6))
    out = ln.kron_inverse_apply(
        ln.LowRankPSD(Ug, dG), ln.LowRankPSD(Ua, dA), V, damping=0.04, pi_adjusted=True
    )
    pi = np.sqrt((dA.sum() / 6) / (dG.sum() / 8))
    ref = np.linalg.solve(_dense(Ug, dG, 0, 0.2 / pi), V) @ np.linalg.inv(
        _dense(Ua, dA, 0, 0.2 * pi)
    )
    np.testing.assert_allclose(out, ref, rtol=1e-10)


@pytest.mark.parametrize("ranks", [(8, 6), (5, 4)], ids=["full", "low-rank"])
@pytest.mark.parametrize("continuation", [False, True])
def test_kron_inverse_apply_eigenbasis_equals_dense(backend, ranks, continuation) -> None:
    Ug, dG, Ua, dA = _kfac_pair(8, 6, *ranks)
    V = np.random.default_rng(7).standard_normal((8, 6))
    lam = 0.05
    out = ln.kron_inverse_apply(
        _state(backend, Ug, dG),
        _state(backend, Ua, dA),
        backend.asarray(V),
        damping=lam,
        scheme="eigenbasis",
        relative=True,
        continuation=continuation,
    )
    tg = dG.min() if continuation and ranks[0] < 8 else 0.0
    ta = dA.min() if continuation and ranks[1] < 6 else 0.0
    G = _dense(Ug, dG, tg, 0.0)
    A = _dense(Ua, dA, ta, 0.0)
    # (G kron A + l I) acting on vec(V) with row-major vec: G V A for symmetric A
    big = np.kron(G, A) + lam * dG.max() * dA.max() * np.eye(48)
    ref = np.linalg.solve(big, V.reshape(-1)).reshape(8, 6)
    assert _rel(to_numpy(out).astype(np.float64), ref) <= 1e3 * backend.eps


@pytest.mark.parametrize("ranks", [(8, 6), (5, 4)], ids=["full", "low-rank"])
@pytest.mark.parametrize(
    "options",
    [
        {"relative": True, "continuation": True, "shift": (0.01, 0.02)},
        {"pi_adjusted": True},
        {},
    ],
    ids=["relative-continuation-shift", "pi", "plain"],
)
def test_kron_inverse_apply_factored_form_equals_dense_gradient_path(
    backend: Backend, ranks, options
) -> None:
    Ug, dG, Ua, dA = _kfac_pair(8, 6, *ranks)
    gen = np.random.default_rng(8)
    outputs, inputs = gen.standard_normal((8, 16)), gen.standard_normal((6, 16))
    G, A = _state(backend, Ug, dG), _state(backend, Ua, dA)
    out = ln.kron_inverse_apply_factored(
        G, A, backend.asarray(outputs), backend.asarray(inputs), damping=0.1, **options
    )
    dense_path = ln.kron_inverse_apply(
        G, A, backend.asarray(outputs @ inputs.T), damping=0.1, **options
    )
    assert _rel(to_numpy(out), to_numpy(dense_path)) <= 1e2 * backend.eps
    # against float64 dense algebra
    relative, shift = options.get("relative", False), options.get("shift", (0.0, 0.0))
    if options.get("pi_adjusted"):
        pi = np.sqrt((dA.sum() / 6) / (dG.sum() / 8))
        lg, la = np.sqrt(0.1) / pi, np.sqrt(0.1) * pi
    else:
        lg = 0.1 * dG.max() if relative else np.sqrt(0.1)
        la = 0.1 * dA.max() if relative else np.sqrt(0.1)
    cont = options.get("continuation", False)
    tg = dG.min() if cont and ranks[0] < 8 else 0.0
    ta = dA.min() if cont and ranks[1] < 6 else 0.0
    ref = np.linalg.solve(_dense(Ug, dG, tg, lg + shift[0]), outputs @ inputs.T) @ np.linalg.inv(
        _dense(Ua, dA, ta, la + shift[1])
    )
    assert _rel(to_numpy(out).astype(np.float64), ref) <= 1e3 * backend.eps


@pytest.mark.parametrize("cond", [1e2, 1e8, 1e12])
def test_woodbury_solve_equals_dense_including_ill_conditioned(cond) -> None:
    gen = np.random.default_rng(9)
    n, P = 6, 40
    J = gen.standard_normal((n, P)) * np.sqrt(cond)
    lam = 1.0
    v = gen.standard_normal(P)
    out = ln.woodbury_solve(J, v, lam)
    ref = np.linalg.solve(lam * np.eye(P) + J.T @ J, v)
    # both are backward stable: agreement to eps * cond(lam I + J^T J)
    assert _rel(out, ref) <= 1e3 * 2.2e-16 * cond
    V = gen.standard_normal((P, 3))
    np.testing.assert_allclose(
        ln.woodbury_solve(J, V, lam)[:, 1], ln.woodbury_solve(J, V[:, 1], lam), rtol=1e-12
    )


def test_woodbury_solve_backends(backend: Backend) -> None:
    gen = np.random.default_rng(10)
    J, v = gen.standard_normal((5, 30)), gen.standard_normal(30)
    out = ln.woodbury_solve(backend.asarray(J), backend.asarray(v), 0.5)
    assert out.dtype == backend.dtype
    ref = np.linalg.solve(0.5 * np.eye(30) + J.T @ J, v)
    assert _rel(to_numpy(out).astype(np.float64), ref) <= 1e3 * backend.eps


def test_smw_coefficients_backends(backend: Backend) -> None:
    gen = np.random.default_rng(12)
    G = gen.standard_normal((20, 6))
    alpha = ln.smw_coefficients(backend.asarray(G.T @ G), 0.2)
    assert alpha.dtype == backend.dtype
    ref = np.linalg.solve(G.T @ G + 6 * 0.2 * np.eye(6), np.ones(6))
    assert _rel(to_numpy(alpha).astype(np.float64), ref) <= 1e3 * backend.eps


def test_smw_coefficients_give_the_damped_natural_gradient() -> None:
    gen = np.random.default_rng(11)
    n, P, lam = 8, 25, 0.3
    G = gen.standard_normal((P, n))
    alpha = ln.smw_coefficients(G.T @ G, lam)
    F = G @ G.T / n
    ref = np.linalg.solve(F + lam * np.eye(P), G.mean(axis=1))
    np.testing.assert_allclose(G @ alpha, ref, rtol=1e-10)
    # and SENG's Woodbury direction is the same vector
    np.testing.assert_allclose(
        ln.woodbury_solve(G.T / np.sqrt(n), G.mean(axis=1), lam), ref, rtol=1e-10
    )


def test_inverse_application_bad_inputs() -> None:
    s = ln.LowRankPSD(np.eye(5)[:, :2], np.array([2.0, 1.0]))
    with pytest.raises(ValueError, match=r"`damping` must be finite and > 0, got -1\.0"):
        ln.damped_inverse_apply(s, np.ones(5), damping=-1.0)
    with pytest.raises(ValueError, match=r"`tail` must be finite and >= 0"):
        ln.damped_inverse_apply(s, np.ones(5), damping=1.0, tail=-0.5)
    with pytest.raises(ValueError, match=r"`V` must have shape \(m, 5\) for side='right'"):
        ln.damped_inverse_apply(s, np.ones((5, 2)), damping=1.0, side="right")
    with pytest.raises(ValueError, match="`side` must be 'left' or 'right'"):
        ln.damped_inverse_apply(s, np.ones(5), damping=1.0, side="up")
    V = np.ones(5)
    V[2] = np.nan
    with pytest.raises(ValueError, match="`V` must not contain NaN or Inf"):
        ln.damped_inverse_apply(s, V, damping=1.0)
    A = ln.LowRankPSD(np.eye(3), np.ones(3))
    with pytest.raises(ValueError, match=r"`V` must have shape \(5, 3\) = \(d_G, d_A\)"):
        ln.kron_inverse_apply(s, A, np.ones((3, 5)), damping=1.0)
    with pytest.raises(ValueError, match="`scheme` must be 'factored' or 'eigenbasis'"):
        ln.kron_inverse_apply(s, A, np.ones((5, 3)), damping=1.0, scheme="exact")
    with pytest.raises(ValueError, match="`pi_adjusted` applies to absolute factored damping"):
        ln.kron_inverse_apply(s, A, np.ones((5, 3)), damping=1.0, relative=True, pi_adjusted=True)
    with pytest.raises(ValueError, match=r"`shift\[0\]` must be finite and >= 0"):
        ln.kron_inverse_apply(s, A, np.ones((5, 3)), damping=1.0, shift=(-1.0, 0.0))
    with pytest.raises(ValueError, match=r"`inputs` \(3, n\) = \(d_A, n\) with the same n"):
        ln.kron_inverse_apply_factored(s, A, np.ones((5, 4)), np.ones((3, 5)), damping=1.0)
    with pytest.raises(ValueError, match=r"`grad_outputs` must be \(5, n\)"):
        ln.kron_inverse_apply_factored(s, A, np.ones((4, 4)), np.ones((3, 4)), damping=1.0)
    with pytest.raises(ValueError, match="`pi_adjusted` applies to absolute factored damping"):
        ln.kron_inverse_apply_factored(
            s, A, np.ones((5, 4)), np.ones((3, 4)), damping=1.0, relative=True, pi_adjusted=True
        )
    with pytest.raises(TypeError, match="`inputs` must have the dtype of the factors"):
        ln.kron_inverse_apply_factored(
            s, A, np.ones((5, 4)), np.ones((3, 4), dtype=np.float32), damping=1.0
        )
    with pytest.raises(ValueError, match="`grad_outputs` must not contain NaN or Inf"):
        ln.kron_inverse_apply_factored(s, A, np.full((5, 4), np.nan), np.ones((3, 4)), damping=1.0)
    with pytest.raises(ValueError, match=r"`J` must be \(n, P\) and `v` \(P,\) or \(P, m\)"):
        ln.woodbury_solve(np.ones((2, 4)), np.ones(3), 1.0)
    with pytest.raises(ValueError, match=r"`damping` must be finite and > 0, got 0\.0"):
        ln.woodbury_solve(np.ones((2, 4)), np.ones(4), 0.0)
    with pytest.raises(ValueError, match=r"`K` must be a square \(n, n\) matrix"):
        ln.smw_coefficients(np.ones((2, 3)), 1.0)
    with pytest.raises(ValueError, match="is not positive definite"):
        ln.smw_coefficients(-10 * np.eye(3), 1.0)
