"""Brand updates, the LowRankPSD value and the Rayleigh-Ritz refresh against dense float64."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import lowrank_nla as ln
from lowrank_nla.testing import Backend, assert_orthonormal, ea_factor, rtol_for, to_numpy


def _empty(backend: Backend, D: int) -> ln.LowRankPSD:
    return ln.LowRankPSD(backend.asarray(np.zeros((D, 0))), backend.asarray(np.zeros(0)))


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b, 2) / np.linalg.norm(b, 2))


def test_brand_without_truncation_equals_dense_ea(backend: Backend) -> None:
    gen = np.random.default_rng(0)
    D, n, decay = 40, 6, 0.9
    state = _empty(backend, D)
    dense = np.zeros((D, D))
    for _ in range(5):  # 30 <= D: exact, no truncation
        X = gen.standard_normal((D, n))
        res = ln.brand_update(state, backend.asarray(X), decay=decay)
        state = res.state
        X_used = to_numpy(backend.asarray(X)).astype(np.float64)
        dense = decay * dense + (1 - decay) * X_used @ X_used.T
        assert float(res.dropped_max) == 0.0
        assert float(res.dropped_sum) == 0.0
    assert type(state.U) is type(backend.asarray(X))
    assert state.U.dtype == backend.dtype
    assert state.rank == 30
    assert_orthonormal(state.U, atol=100 * backend.eps)
    d = to_numpy(state.d).astype(np.float64)
    assert np.all(np.diff(d) <= 0)
    assert np.all(d >= 0)
    approx = to_numpy(state.to_dense()).astype(np.float64)
    assert _rel(approx, dense) <= 100 * backend.eps


def test_brand_truncation_is_the_best_rank_r_of_the_exact_update() -> None:
    gen = np.random.default_rng(1)
    D, decay = 60, 0.8
    B = gen.standard_normal((D, 10))
    state = ln.brand_update(ln.LowRankPSD(np.zeros((D, 0)), np.zeros(0)), B, decay=0.0).state
    X = gen.standard_normal((D, 5))
    exact = decay * state.to_dense() + (1 - decay) * X @ X.T
    w = np.linalg.eigvalsh(exact)[::-1]
    res = ln.brand_update(state, X, decay=decay, rank=8)
    assert res.state.rank == 8
    np.testing.assert_allclose(res.state.d, w[:8], rtol=1e-12)
    assert float(res.dropped_max) == pytest.approx(w[8], rel=1e-12)
    assert float(res.dropped_sum) == pytest.approx(w[8:15].sum(), rel=1e-12)
    # the truncation error is exactly the dropped part: ||exact - B||_2 = lambda_9
    assert np.linalg.norm(exact - res.state.to_dense(), 2) == pytest.approx(w[8], rel=1e-10)


def test_long_float32_stream_stays_orthonormal_and_within_drift_bound() -> None:
    gen = np.random.default_rng(2)
    D, n, r, decay = 120, 8, 24, 0.95
    basis, _ = np.linalg.qr(gen.standard_normal((D, D)))
    scale = 1.0 / np.arange(1, D + 1)
    state = ln.LowRankPSD(np.zeros((D, 0), np.float32), np.zeros(0, np.float32))
    dense = np.zeros((D, D))
    dropped, dropped_sums, defects = [], [], []
    threshold = 10 * np.sqrt(np.finfo(np.float32).eps)
    for _ in range(1000):
        X = (basis @ (scale[:, None] * gen.standard_normal((D, n)))).astype(np.float32)
        res = ln.brand_update(state, X, decay=decay, rank=r)
        state = res.state
        dense = decay * dense + (1 - decay) * X.astype(np.float64) @ X.astype(np.float64).T
        dropped.append(res.dropped_max)
        dropped_sums.append(float(res.dropped_sum))
        defects.append(state.orthogonality_defect())
    # re-orthonormalization keeps U orthonormal to the float32 threshold over 1000 updates
    assert max(defects) <= threshold
    approx = state.to_dense().astype(np.float64)
    drift = np.linalg.norm(dense - approx, 2)
    bound = ln.brand_drift_bound(dropped, decay)
    assert drift <= bound * (1 + 1e-3) + 1e-4 * np.linalg.norm(dense, 2)
    # the bound is not vacuous here: within a factor 20 of the measured drift
    assert bound <= 20 * drift
    # the trace of the (PSD) drift is the decayed sum of the dropped eigenvalue sums
    trace_pred = ln.brand_drift_bound(dropped_sums, decay)
    assert np.trace(dense - approx) == pytest.approx(trace_pred, rel=1e-3)


@given(st.integers(5, 30), st.integers(1, 6), st.floats(0.0, 0.99), st.integers(0, 2**16))
def test_brand_exact_property(D, n, decay, seed) -> None:
    gen = np.random.default_rng(seed)
    k = int(gen.integers(0, D + 1))
    Y = gen.standard_normal((D, k))
    state = ln.brand_update(ln.LowRankPSD(np.zeros((D, 0)), np.zeros(0)), Y, decay=0.0).state
    X = gen.standard_normal((D, n))
    exact = decay * (Y @ Y.T) + (1 - decay) * (X @ X.T)
    res = ln.brand_update(state, X, decay=decay)
    scale = max(np.linalg.norm(exact, 2), 1.0)
    assert np.linalg.norm(exact - res.state.to_dense(), 2) <= 1e3 * D * 2.2e-16 * scale
    assert res.state.orthogonality_defect() <= 10 * np.sqrt(2.2e-16)


def test_svd_update_exact_and_truncated(backend: Backend) -> None:
    gen = np.random.default_rng(3)
    M = gen.standard_normal((50, 4)) @ gen.standard_normal((4, 30))
    A, B = gen.standard_normal((50, 3)), gen.standard_normal((30, 3))
    U, S, Vh = np.linalg.svd(M, full_matrices=False)
    U, S, Vh = (backend.asarray(x) for x in (U[:, :4], S[:4], Vh[:4]))
    res = ln.svd_update(U, S, Vh, backend.asarray(A), backend.asarray(B))
    assert res.S.shape == (7,)
    assert type(res.U) is type(U)
    target = to_numpy(backend.asarray(M + A @ B.T)).astype(np.float64)
    u, s, vh = (to_numpy(x).astype(np.float64) for x in res)
    assert _rel((u * s) @ vh, target) <= 100 * backend.eps
    assert_orthonormal(res.U, atol=100 * backend.eps)
    assert_orthonormal(to_numpy(res.Vh).T, atol=100 * backend.eps)
    np.testing.assert_allclose(
        s, np.linalg.svd(target, compute_uv=False)[:7], rtol=rtol_for(backend.dtype)
    )
    trunc = ln.svd_update(U, S, Vh, backend.asarray(A), backend.asarray(B), rank=3)
    assert trunc.S.shape == (3,)


def test_rayleigh_ritz_refresh_restores_true_eigenvalues(backend: Backend) -> None:
    X_np = ea_factor(60, batch=8, steps=20, rng=4)
    w, V = np.linalg.eigh(X_np)
    w, V = w[::-1], V[:, ::-1]
    # a stale representation: the right top-10 subspace, scrambled and with wrong eigenvalues
    rot, _ = np.linalg.qr(np.random.default_rng(5).standard_normal((10, 10)))
    stale = ln.LowRankPSD(
        backend.asarray(V[:, :10] @ rot), backend.asarray(np.linspace(1.0, 0.1, 10))
    )
    fixed = ln.rayleigh_ritz_refresh(stale, backend.asarray(X_np), list(range(10)))
    np.testing.assert_allclose(
        to_numpy(fixed.d).astype(np.float64), w[:10], rtol=rtol_for(backend.dtype)
    )
    assert_orthonormal(fixed.U, atol=100 * backend.eps)
    # a subset refresh keeps the other columns and improves the error
    part = ln.rayleigh_ritz_refresh(stale, backend.asarray(X_np), np.array([0, 3, 7]))
    assert part.rank == 10
    d_part = to_numpy(part.d)
    assert np.all(np.diff(d_part) <= 0)
    err = [
        np.linalg.norm(X_np - to_numpy(s.to_dense()).astype(np.float64), 2) for s in (stale, part)
    ]
    assert err[1] < err[0]


def test_low_rank_psd_value(backend: Backend) -> None:
    U = backend.asarray(np.eye(5)[:, :3])
    d = backend.asarray(np.array([3.0, 2.0, 1.0]))
    s = ln.LowRankPSD(U, d)
    v = backend.asarray(np.arange(5.0))
    np.testing.assert_allclose(to_numpy(s @ v), [0.0, 2.0, 2.0, 0.0, 0.0])
    np.testing.assert_allclose(
        to_numpy(s.matvec(backend.asarray(np.ones((5, 2))))[:, 1]), [3.0, 2.0, 1.0, 0.0, 0.0]
    )
    np.testing.assert_allclose(to_numpy(s.to_dense()), np.diag([3.0, 2.0, 1.0, 0.0, 0.0]))
    assert s.truncate(2).rank == 2
    assert s.truncate(10).rank == 3
    assert s.orthogonality_defect() == 0.0
    # check=False skips the construction checks (this U is not orthonormal)
    skew = ln.LowRankPSD(backend.asarray(np.ones((5, 2)) / np.sqrt(5)), d[:2], check=False)
    assert skew.orthogonality_defect() == pytest.approx(np.sqrt(2), rel=rtol_for(backend.dtype))
    with pytest.raises(AttributeError):
        s.U = U  # a frozen value
    with pytest.raises(ValueError, match="`rank` must be a non-negative integer, got -1"):
        s.truncate(-1)
    # A non-integer rank is a TypeError like every other rank argument (it was ValueError).
    for bad in (1.0, True, "2"):
        with pytest.raises(TypeError, match="`rank` must be a non-negative integer, got"):
            s.truncate(bad)
    assert s.truncate(np.int64(2)).rank == 2
    # A V of the wrong shape is named (it was NumPy's/torch's own matmul error).
    for bad in (np.ones(4), np.ones((6, 2)), np.ones((5, 2, 1)), np.float64(1.0)):
        with pytest.raises(ValueError, match=r"`V` must have shape \(5,\) or \(5, m\) to match"):
            s.matvec(backend.asarray(bad) if np.ndim(bad) else bad)


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"decay": 1.0}, ValueError, r"`decay` must be in \[0, 1\), got 1\.0"),
        ({"decay": -0.1}, ValueError, r"`decay` must be in \[0, 1\), got -0\.1"),
        ({"decay": "0.9"}, TypeError, "`decay` must be a real number"),
        ({"decay": 0.9, "rank": -1}, ValueError, "`rank` must be >= 1, got -1"),
        ({"decay": 0.9, "rank": 0}, ValueError, "`rank` must be >= 1, got 0"),
    ],
)
def test_brand_update_bad_arguments(kwargs, error, message) -> None:
    state = ln.LowRankPSD(np.eye(6)[:, :2], np.array([2.0, 1.0]))
    with pytest.raises(error, match=message):
        ln.brand_update(state, np.ones((6, 2)), **kwargs)


def test_brand_update_bad_inputs() -> None:
    state = ln.LowRankPSD(np.eye(6)[:, :2], np.array([2.0, 1.0]))
    with pytest.raises(ValueError, match=r"`X` must have shape \(6, n\) to match `state`"):
        ln.brand_update(state, np.ones((5, 2)), decay=0.5)
    X = np.ones((6, 2))
    X[0, 0] = np.nan
    with pytest.raises(ValueError, match="`X` must not contain NaN or Inf"):
        ln.brand_update(state, X, decay=0.5)
    with pytest.raises(TypeError, match="`X` must have the dtype of `state`"):
        ln.brand_update(state, np.ones((6, 2), np.float32), decay=0.5)
    with pytest.raises(TypeError, match="`state` must be a LowRankPSD, got tuple"):
        ln.brand_update((np.eye(6), np.ones(6)), X, decay=0.5)
    # states built with check=False (or by _make) are still checked structurally by the
    # routines that take them
    unchecked = ln.LowRankPSD(np.eye(6), np.ones(5), check=False)
    with pytest.raises(ValueError, match=r"`state` must have U of shape \(D, k\) and d of shape"):
        ln.brand_update(unchecked, np.ones((6, 2)), decay=0.5)
    bad = ln.LowRankPSD(np.eye(6)[:, :2], np.array([np.inf, 1.0]), check=False)
    with pytest.raises(ValueError, match=r"`state\.d` must not contain NaN or Inf"):
        ln.brand_update(bad, np.ones((6, 2)), decay=0.5)


def test_mixed_libraries_rejected() -> None:
    import torch

    state = ln.LowRankPSD(np.eye(6)[:, :2], np.array([2.0, 1.0]))
    with pytest.raises(TypeError, match=r"`state\.U`, `X` must all come from one array library"):
        ln.brand_update(state, torch.ones(6, 2, dtype=torch.float64), decay=0.5)
    with pytest.raises(TypeError, match=r"`state\.U`, `V` must all come from one array library"):
        ln.damped_inverse_apply(state, torch.ones(6, dtype=torch.float64), damping=1.0)


@given(st.integers(10, 40), st.integers(1, 5), st.floats(0.5, 0.99), st.integers(0, 2**16))
def test_brand_drift_bound_holds_property(D, n, decay, seed) -> None:
    gen = np.random.default_rng(seed)
    r = int(gen.integers(1, D // 2 + 1))
    state = ln.LowRankPSD(np.zeros((D, 0)), np.zeros(0))
    dense = np.zeros((D, D))
    dropped = []
    for _ in range(30):
        X = gen.standard_normal((D, n)) * gen.uniform(0.1, 2.0)
        res = ln.brand_update(state, X, decay=decay, rank=r)
        state = res.state
        dense = decay * dense + (1 - decay) * X @ X.T
        dropped.append(float(res.dropped_max))
    drift = np.linalg.norm(dense - state.to_dense(), 2)
    assert drift <= ln.brand_drift_bound(dropped, decay) + 1e-9 * np.linalg.norm(dense, 2)


def test_svd_update_and_refresh_bad_inputs() -> None:
    U, S, Vh = np.eye(6)[:, :2], np.ones(2), np.eye(4)[:2]
    with pytest.raises(ValueError, match=r"`A` and `B` must have shapes \(6, c\) and \(4, c\)"):
        ln.svd_update(U, S, Vh, np.ones((6, 2)), np.ones((4, 3)))
    with pytest.raises(ValueError, match=r"`U`, `S`, `Vh` must have shapes"):
        ln.svd_update(U, np.ones(3), Vh, np.ones((6, 1)), np.ones((4, 1)))
    state = ln.LowRankPSD(np.eye(6)[:, :3], np.ones(3))
    with pytest.raises(ValueError, match=r"`columns` must be distinct indices in \[0, 3\)"):
        ln.rayleigh_ritz_refresh(state, np.eye(6), [0, 0])
    with pytest.raises(ValueError, match=r"`columns` must be distinct indices in \[0, 3\)"):
        ln.rayleigh_ritz_refresh(state, np.eye(6), [3])
    with pytest.raises(ValueError, match=r"`dense` must have shape \(6, 6\) to match `state`"):
        ln.rayleigh_ritz_refresh(state, np.eye(5), [0])
