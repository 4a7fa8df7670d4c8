"""Error utilities against exact float64 values."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

import lowrank_nla as ln
from lowrank_nla.testing import Backend, matrix_with_spectrum, rtol_for, to_numpy


def test_estimate_spectral_norm_matches_exact(backend: Backend) -> None:
    s = np.concatenate([[10.0, 9.5], np.linspace(5, 0.1, 58)])
    A_np = matrix_with_spectrum(s, m=90, n=60, rng=4)
    est = ln.estimate_spectral_norm(backend.asarray(A_np), rng=0)
    assert est.shape == ()
    # Lanczos never overestimates (up to rounding) and 30 steps resolve a 5% gap fully.
    assert float(est) <= 10.0 * (1 + 10 * backend.eps)
    assert float(est) == pytest.approx(10.0, rel=rtol_for(backend.dtype))


def test_estimate_spectral_norm_exact_on_low_rank_and_symmetric() -> None:
    A = np.diag([3.0, -7.0, 1.0] + [0.0] * 20)

    class Sym:  # no .T: only usable with symmetric=True
        shape = A.shape
        dtype = A.dtype

        def __matmul__(self, X):
            return A @ X

    assert float(ln.estimate_spectral_norm(Sym(), symmetric=True, rng=1)) == pytest.approx(
        7.0, rel=1e-13
    )
    with pytest.raises(TypeError, match="without a transpose"):
        ln.estimate_spectral_norm(Sym())


def test_posterior_error_estimate_bounds_true_error(backend: Backend) -> None:
    s = 0.6 ** np.arange(40.0)
    A_np = matrix_with_spectrum(s, m=50, n=40, rng=1)
    A = backend.asarray(A_np)
    for size in (3, 8, 15):
        Q = ln.randomized_range_finder(A, size, power_iters=1, rng=size)
        q = to_numpy(Q).astype(np.float64)
        true = np.linalg.norm(A_np - q @ (q.T @ A_np), 2)
        est = float(ln.posterior_error_estimate(A, Q, rng=0))
        assert true <= est <= 200 * true  # upper bound, loose by design (constant ~8)


def test_relative_error_exact_and_lanczos(backend: Backend) -> None:
    A_np = np.diag([4.0, 2.0, 1.0, 0.5])
    A = backend.asarray(A_np)
    res = ln.partial_eigh(A, 2)
    assert float(ln.relative_error(A, res)) == pytest.approx(0.25, rel=10 * backend.eps)
    fro = math.sqrt(1.25) / math.sqrt(21.25)
    assert float(ln.relative_error(A, res, ord="fro")) == pytest.approx(fro, rel=10 * backend.eps)
    assert float(ln.relative_error(A, res, method="lanczos")) == pytest.approx(
        0.25, rel=100 * backend.eps
    )
    dense = backend.asarray(np.diag([4.0, 2.0, 0.0, 0.0]))
    assert float(ln.relative_error(A, dense)) == pytest.approx(0.25, rel=10 * backend.eps)
    svd = ln.randomized_svd(A, 3, rng=0)
    assert float(ln.relative_error(A, svd, method="lanczos")) == pytest.approx(
        0.125, rel=rtol_for(backend.dtype)
    )


def test_hmt_error_bound_exact_values() -> None:
    s = np.array([1.0, 0.5, 0.25, 0.125])
    # k = 1, p = 2, q = 0: (1 + sqrt(1)) * 0.5 + e sqrt(3)/2 * sqrt(0.25 + 0.0625 + 0.015625)
    expected = 2 * 0.5 + math.e * math.sqrt(3) / 2 * math.sqrt(0.328125)
    assert ln.hmt_error_bound(s, 1, 2) == pytest.approx(expected, rel=1e-15)
    # q = 1 (s = 3) and symmetric q = 2 (s = 3) coincide
    assert ln.hmt_error_bound(s, 1, 2, 1) == pytest.approx(
        ln.hmt_error_bound(s, 1, 2, 2, symmetric=True), rel=1e-15
    )
    # order and sign of the input do not matter; no tail means zero error
    assert ln.hmt_error_bound(-s[::-1], 1, 2) == pytest.approx(expected, rel=1e-15)
    assert ln.hmt_error_bound(s, 4, 2) == 0.0
    # powers shrink the bound toward sigma_{k+1}
    b = [ln.hmt_error_bound(s, 1, 2, q) for q in range(6)]
    assert all(x > y for x, y in itertools.pairwise(b))
    assert b[-1] > 0.5


def test_hmt_error_bound_no_overflow_for_high_powers() -> None:
    s = np.logspace(300, 290, 50)
    assert math.isfinite(ln.hmt_error_bound(s, 5, 5, 30))
