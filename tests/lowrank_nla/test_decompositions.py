"""Decompositions on every backend: types, devices, dtypes, invariants, float64 references."""

from __future__ import annotations

import array_api_compat
import numpy as np
import pytest

import lowrank_nla as ln
from lowrank_nla.testing import (
    Backend,
    assert_orthonormal,
    matrix_with_spectrum,
    rtol_for,
    to_numpy,
)

PSD_ROUTINES = [ln.randomized_eigh, ln.srevd, ln.nystrom]


def _low_rank(m: int, n: int, k: int, seed: int = 0) -> np.ndarray:
    gen = np.random.default_rng(seed)
    return gen.standard_normal((m, k)) @ gen.standard_normal((k, n))


def _psd_low_rank(n: int, k: int, seed: int = 0) -> np.ndarray:
    X = np.random.default_rng(seed).standard_normal((n, k))
    return X @ X.T


def _assert_like(out, ref, backend: Backend) -> None:
    """Same library, device and dtype as the input."""
    assert type(out) is type(ref)
    assert out.dtype == backend.dtype
    assert array_api_compat.device(out) == array_api_compat.device(ref)


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b, 2) / np.linalg.norm(b, 2))


def test_randomized_svd_recovers_exact_low_rank(backend: Backend) -> None:
    A_np = _low_rank(60, 45, 7)
    A = backend.asarray(A_np)
    U, S, Vh = ln.randomized_svd(A, 7, rng=0)
    for part in (U, S, Vh):
        _assert_like(part, A, backend)
    assert U.shape == (60, 7)
    assert S.shape == (7,)
    assert Vh.shape == (7, 45)
    rtol = rtol_for(backend.dtype)
    assert_orthonormal(U)
    assert_orthonormal(to_numpy(Vh).T)
    u, s, vh = (to_numpy(x).astype(np.float64) for x in (U, S, Vh))
    assert _rel((u * s) @ vh, A_np) < rtol
    np.testing.assert_allclose(s, np.linalg.svd(A_np, compute_uv=False)[:7], rtol=rtol)
    assert np.all(np.diff(s) <= 0)


@pytest.mark.parametrize("routine", PSD_ROUTINES, ids=lambda f: f.__name__)
def test_psd_routines_recover_exact_low_rank(backend: Backend, routine) -> None:
    A_np = _psd_low_rank(50, 6)
    A = backend.asarray(A_np)
    w, V = routine(A, 6, rng=0)
    _assert_like(w, A, backend)
    _assert_like(V, A, backend)
    assert w.shape == (6,)
    assert V.shape == (50, 6)
    assert_orthonormal(V)
    w_np, V_np = to_numpy(w).astype(np.float64), to_numpy(V).astype(np.float64)
    rtol = rtol_for(backend.dtype)
    assert np.all(np.diff(w_np) <= 0)
    np.testing.assert_allclose(w_np, np.linalg.eigvalsh(A_np)[::-1][:6], rtol=rtol)
    assert _rel((V_np * w_np) @ V_np.T, A_np) < rtol


def test_partial_eigh_matches_float64_reference(backend: Backend) -> None:
    gen = np.random.default_rng(3)
    B = gen.standard_normal((40, 40))
    A_np = (B + B.T) / 2
    A = backend.asarray(A_np)
    w, V = ln.partial_eigh(A, 5)
    _assert_like(w, A, backend)
    _assert_like(V, A, backend)
    ref = np.linalg.eigvalsh(A_np)[::-1][:5]
    w_np, V_np = to_numpy(w).astype(np.float64), to_numpy(V).astype(np.float64)
    eps = backend.eps
    np.testing.assert_allclose(w_np, ref, atol=100 * eps * abs(ref).max())
    assert_orthonormal(V)
    residual = np.linalg.norm(A_np @ V_np - V_np * w_np, 2)
    assert residual <= 100 * eps * np.linalg.norm(A_np, 2)


def test_randomized_eigh_indefinite_takes_dominant_pairs(backend: Backend) -> None:
    w_true = np.array([5.0, -4.0, 3.0, -2.0, 1.0] + [0.0] * 25)
    A_np = matrix_with_spectrum(w_true, symmetric=True, rng=1)
    w, _V = ln.randomized_eigh(backend.asarray(A_np), 3, rng=0)
    np.testing.assert_allclose(
        to_numpy(w).astype(np.float64), [5.0, 3.0, -4.0], rtol=rtol_for(backend.dtype)
    )


def test_range_finder_is_orthonormal_and_captures_range(backend: Backend) -> None:
    A_np = _low_rank(70, 50, 8, seed=4)
    A = backend.asarray(A_np)
    for normalizer in ("qr", "cholqr2", "none"):
        Q = ln.randomized_range_finder(A, 12, power_iters=2, normalizer=normalizer, rng=1)
        _assert_like(Q, A, backend)
        assert Q.shape == (70, 12)
        assert_orthonormal(Q)
        q = to_numpy(Q).astype(np.float64)
        assert _rel(q @ (q.T @ A_np), A_np) < rtol_for(backend.dtype)


def test_adaptive_range_finder_meets_tolerance(backend: Backend) -> None:
    s = 0.7 ** np.arange(60.0)
    A_np = matrix_with_spectrum(s, m=80, n=60, rng=2)
    tol = 1e-3
    Q = ln.adaptive_range_finder(backend.asarray(A_np), tol, block=4, rng=0)
    assert_orthonormal(Q)
    q = to_numpy(Q).astype(np.float64)
    true_err = np.linalg.norm(A_np - q @ (q.T @ A_np), 2)
    assert true_err <= tol
    # sigma_j < tol / (10 sqrt(2/pi)) from j = 27 on: the basis stops within a few blocks.
    assert q.shape[1] <= 40


def test_same_seed_same_result(backend: Backend) -> None:
    A = backend.asarray(_psd_low_rank(40, 10) + np.eye(40))
    for routine in [*PSD_ROUTINES, ln.randomized_svd]:
        a, b = routine(A, 4, rng=7), routine(A, 4, rng=7)
        for x, y in zip(a, b, strict=True):
            np.testing.assert_array_equal(to_numpy(x), to_numpy(y))


def test_decompositions_accept_integer_input() -> None:
    A_int = np.arange(24).reshape(6, 4) % 5
    _U, S, _Vh = ln.randomized_svd(A_int, 3, rng=0)
    assert S.dtype == np.float64
    _U2, S2, _ = ln.randomized_svd(A_int.astype(np.float64), 3, rng=0)
    np.testing.assert_array_equal(S, S2)


class _Operator:
    """A matrix-free operator: only shape, dtype, @ and .T (plus the namespace hook)."""

    def __init__(self, M) -> None:
        self._M = M
        self.shape = tuple(M.shape)
        self.dtype = M.dtype
        self.device = array_api_compat.device(M)

    def __matmul__(self, X):
        return self._M @ X

    @property
    def T(self) -> _Operator:
        return _Operator(self._M.T)

    def __array_namespace__(self, api_version=None):
        return array_api_compat.array_namespace(self._M)


def test_operator_input_matches_array_input(backend: Backend) -> None:
    A_np = _psd_low_rank(45, 5, seed=8) + 0.01 * np.eye(45)
    A = backend.asarray(A_np)
    op = _Operator(A)
    rtol = rtol_for(backend.dtype)
    for routine in [*PSD_ROUTINES, ln.randomized_svd]:
        res_arr = routine(A, 5, rng=3)
        res_op = routine(op, 5, rng=3)
        _assert_like(res_op[0], A, backend)
        np.testing.assert_allclose(
            to_numpy(res_op[1] if routine is ln.randomized_svd else res_op[0]),
            to_numpy(res_arr[1] if routine is ln.randomized_svd else res_arr[0]),
            rtol=rtol,
        )
    w, _ = ln.partial_eigh(op, 3)
    np.testing.assert_allclose(to_numpy(w), np.linalg.eigvalsh(A_np)[::-1][:3], rtol=rtol)


def test_scipy_linear_operator_input() -> None:
    from scipy.sparse.linalg import aslinearoperator

    A_np = _low_rank(30, 25, 4, seed=5)
    op = aslinearoperator(A_np)
    _U, S, _Vh = ln.randomized_svd(op, 4, rng=0)
    np.testing.assert_allclose(S, np.linalg.svd(A_np, compute_uv=False)[:4], rtol=1e-10)
