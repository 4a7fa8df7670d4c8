"""Randomized block Krylov: the exact-recovery and bound batteries of subspace iteration."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import lowrank_nla as ln
from lowrank_nla.testing import (
    Backend,
    assert_orthonormal,
    matrix_with_spectrum,
    rtol_for,
    to_numpy,
)

EPS64 = float(np.finfo(np.float64).eps)
SEEDS = range(6)


@st.composite
def low_rank_problems(draw):
    m = draw(st.integers(2, 40))
    n = draw(st.integers(2, 40))
    k = draw(st.integers(1, min(m, n)))
    extra = draw(st.integers(0, min(m, n) - k))
    seed = draw(st.integers(0, 2**16))
    gen = np.random.default_rng(seed)
    A = gen.standard_normal((m, k)) @ gen.standard_normal((k, n))
    return A, k, k + extra, seed


@given(
    low_rank_problems(),
    st.sampled_from(["qr", "cholqr2"]),
    st.integers(0, 2),
    st.integers(1, 40),
)
def test_svd_recovers_exactly_low_rank_input(problem, normalizer, power_iters, block) -> None:
    A, k, rank, seed = problem
    # a block smaller than the rank is allowed when the basis block (q + 1) holds it
    block = min(block, min(A.shape))
    if block * (power_iters + 1) < rank:
        block = min(-(-rank // (power_iters + 1)), min(A.shape))
    U, S, Vh = ln.randomized_svd(
        A,
        rank,
        power_iters=power_iters,
        normalizer=normalizer,
        method="block_krylov",
        block_size=block,
        rng=seed,
    )
    assert U.shape == (A.shape[0], rank)
    assert Vh.shape == (rank, A.shape[1])
    assert_orthonormal(U)
    assert_orthonormal(Vh.T)
    assert np.all(np.diff(S) <= 0)
    assert np.all(S >= 0)
    norm = np.linalg.norm(A, 2)
    tol = 1e3 * max(A.shape) * EPS64 * norm
    if block * (power_iters + 1) >= k or block >= k:
        # the Krylov basis holds the whole range: exact
        assert np.linalg.norm(A - (U * S) @ Vh, 2) <= tol
        np.testing.assert_allclose(S[:k], np.linalg.svd(A, compute_uv=False)[:k], atol=tol)


@given(st.integers(2, 40), st.integers(0, 2**16), st.integers(0, 2))
def test_eigh_recovers_exactly_low_rank_psd_input(n, seed, power_iters) -> None:
    gen = np.random.default_rng(seed)
    k = int(gen.integers(1, n + 1))
    X = gen.standard_normal((n, k))
    A = X @ X.T
    w, V = ln.randomized_eigh(A, k, power_iters=power_iters, method="block_krylov", rng=seed)
    assert_orthonormal(V)
    assert np.all(np.diff(w) <= 0)
    tol = 1e4 * n * EPS64 * np.linalg.norm(A, 2)
    assert np.linalg.norm(A - (V * w) @ V.T, 2) <= tol


@st.composite
def decaying_spectra(draw):
    n = draw(st.integers(30, 80))
    rate = draw(st.floats(0.6, 0.97))
    rank = draw(st.integers(1, 10))
    p = draw(st.integers(2, 8))
    q = draw(st.integers(0, 2))
    seed = draw(st.integers(0, 2**16))
    return rate ** np.arange(float(n)), rank, p, q, seed


@given(decaying_spectra())
def test_range_error_within_krylov_expectation_bound(problem) -> None:
    s, rank, p, q, seed = problem
    A = matrix_with_spectrum(s, m=s.size + 10, n=s.size, rng=seed)
    errors = []
    for r in SEEDS:
        Q = ln.randomized_range_finder(
            A, rank + p, power_iters=q, method="block_krylov", rng=1000 * seed + r
        )
        assert Q.shape[1] == min((rank + p) * (q + 1), s.size)
        assert_orthonormal(Q)
        errors.append(np.linalg.norm(A - Q @ (Q.T @ A), 2))
    bound = ln.krylov_error_bound(s, rank, p, q)
    assert bound <= ln.hmt_error_bound(s, rank, p, q)
    assert np.mean(errors) <= bound + 100 * s.size * EPS64


@given(decaying_spectra())
def test_symmetric_error_within_krylov_expectation_bound(problem) -> None:
    s, rank, p, q, seed = problem
    signs = np.where(np.arange(s.size) % 3 == 1, -1.0, 1.0)
    A = matrix_with_spectrum(s * signs, symmetric=True, rng=seed)
    bound = ln.krylov_error_bound(s, rank, p, q, symmetric=True)
    errors = []
    for r in SEEDS:
        w, V = ln.randomized_eigh(
            A, rank, oversample=p, power_iters=q, method="block_krylov", rng=1000 * seed + r
        )
        errors.append(np.linalg.norm(A - (V * w) @ V.T, 2))
    # Rayleigh-Ritz doubles the range error at most; truncation adds sigma_{k+1}.
    assert np.mean(errors) <= s[rank] + 2 * bound + 100 * s.size * EPS64


@given(decaying_spectra())
def test_krylov_space_contains_the_subspace_iterate(problem) -> None:
    # Same seed, same Gaussian block: range((A A^T)^q A Omega) lies in the Krylov space, so
    # its range error is never smaller (up to rounding), draw by draw.
    s, rank, p, q, seed = problem
    A = matrix_with_spectrum(s, m=s.size + 5, n=s.size, rng=seed)
    sub = ln.randomized_range_finder(A, rank + p, power_iters=q, rng=seed)
    kry = ln.randomized_range_finder(A, rank + p, power_iters=q, method="block_krylov", rng=seed)
    e_sub = np.linalg.norm(A - sub @ (sub.T @ A), 2)
    e_kry = np.linalg.norm(A - kry @ (kry.T @ A), 2)
    assert e_kry <= e_sub + 1e3 * s.size * EPS64


@given(
    st.lists(st.floats(0.0, 1e3), min_size=3, max_size=60),
    st.integers(1, 10),
    st.integers(2, 8),
    st.integers(0, 4),
    st.booleans(),
)
def test_krylov_bound_never_exceeds_the_hmt_bound(values, rank, p, q, symmetric) -> None:
    hmt = ln.hmt_error_bound(values, rank, p, q, symmetric=symmetric)
    kry = ln.krylov_error_bound(values, rank, p, q, symmetric=symmetric)
    assert 0.0 <= kry <= hmt
    s = np.sort(values)[::-1]
    if rank < len(s):
        assert kry >= s[rank]  # no subspace of the basis beats the optimal error


def test_krylov_bound_uses_the_gap() -> None:
    # sigma_20 / sigma_21 = 1.2: the Chebyshev filter accelerates, the monomial does not
    s = np.r_[np.full(20, 1.2), 0.9 ** np.arange(280.0)]
    for q in (4, 5, 6):
        assert ln.krylov_error_bound(s, 20, 5, q) < 0.95 * ln.hmt_error_bound(s, 20, 5, q)
    # exactly rank k: nothing to miss
    assert ln.krylov_error_bound(np.r_[np.ones(5), np.zeros(5)], 5, 2, 1) == 0.0


@pytest.fixture(scope="module")
def slow_decay_matrix() -> np.ndarray:
    return matrix_with_spectrum(1.0 / np.arange(1, 101) ** 0.5, m=150, n=100, rng=11)


def _mean_error(A, **kwargs) -> float:
    errs = []
    for r in range(8):
        U, S, Vh = ln.randomized_svd(A, 10, rng=r, **kwargs)
        errs.append(np.linalg.norm(A - (U * S) @ Vh, 2))
    return float(np.mean(errs))


def test_error_decreases_with_krylov_iterations_and_beats_subspace(slow_decay_matrix) -> None:
    A = slow_decay_matrix
    kry = [_mean_error(A, oversample=5, power_iters=q, method="block_krylov") for q in range(4)]
    sub = [_mean_error(A, oversample=5, power_iters=q) for q in range(4)]
    assert all(a > b for a, b in itertools.pairwise(kry)), kry
    assert kry[0] == pytest.approx(sub[0], rel=1e-12)  # q = 0: the same space
    assert all(k < s for k, s in zip(kry[1:], sub[1:], strict=True)), (kry, sub)
    optimal = 1.0 / np.sqrt(11)
    assert kry[-1] < 1.02 * optimal


def test_small_blocks_with_more_iterations(slow_decay_matrix) -> None:
    # a block of 4 columns, 5 iterations: a 24-column basis for a rank-10 approximation
    errs = [
        _mean_error(slow_decay_matrix, power_iters=5, method="block_krylov", block_size=b)
        for b in (4, 8)
    ]
    optimal = 1.0 / np.sqrt(11)
    assert errs[1] < errs[0] < 1.2 * optimal


def test_block_krylov_on_every_backend(backend: Backend) -> None:
    gen = np.random.default_rng(0)
    A_np = gen.standard_normal((60, 7)) @ gen.standard_normal((7, 45))
    A = backend.asarray(A_np)
    for normalizer in ("qr", "cholqr2"):
        U, S, Vh = ln.randomized_svd(
            A, 7, power_iters=1, method="block_krylov", normalizer=normalizer, rng=0
        )
        assert type(U) is type(A)
        assert U.dtype == backend.dtype
        u, s, vh = (to_numpy(x).astype(np.float64) for x in (U, S, Vh))
        rtol = rtol_for(backend.dtype)
        assert np.linalg.norm((u * s) @ vh - A_np, 2) < rtol * np.linalg.norm(A_np, 2)
        Q = ln.randomized_range_finder(A, 5, power_iters=2, method="block_krylov", rng=0)
        assert Q.shape == (60, 15)
        assert_orthonormal(Q)
    X = gen.standard_normal((50, 6))
    P = backend.asarray(X @ X.T)
    w, V = ln.randomized_eigh(P, 6, power_iters=1, method="block_krylov", rng=0)
    assert type(V) is type(P)
    ref = np.linalg.eigvalsh(X @ X.T)[::-1][:6]
    np.testing.assert_allclose(to_numpy(w), ref, rtol=rtol_for(backend.dtype))


def test_basis_is_capped_at_the_smaller_dimension() -> None:
    A = matrix_with_spectrum(0.7 ** np.arange(12.0), m=30, n=12, rng=0)
    Q = ln.randomized_range_finder(A, 5, power_iters=4, method="block_krylov", rng=0)
    assert Q.shape == (30, 12)
    assert_orthonormal(Q)
    np.testing.assert_allclose(Q @ (Q.T @ A), A, atol=1e3 * EPS64)


# ----------------------------------------------------------------- cheaper orthogonalization


def _krylov_basis(A, block, q, seed, normalizer="cholqr2"):
    from lowrank_nla._backend import as_operator, normal_sampler
    from lowrank_nla._sketch import krylov_range

    op = as_operator(A, "A")
    draw = normal_sampler(op.xp, seed, dtype=op.dtype, device=op.device)
    Q, W = krylov_range(
        op, block, power_iters=q, normalizer=normalizer, draw=draw, with_transpose=True
    )
    return op.xp, Q, W


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("seed", range(3))
def test_gram_finish_matches_the_qr_finish(dtype, seed) -> None:
    from lowrank_nla._sketch import leading_svd, thin_svd

    s = 1.0 / np.sqrt(np.arange(1.0, 201.0))
    A = matrix_with_spectrum(s, m=300, n=200, rng=seed).astype(dtype)
    xp, Q, W = _krylov_basis(A, 10, 3, seed)
    k = 20
    res = leading_svd(xp, Q, W, k)
    assert res is not None  # slow decay: lambda_{k+1} / lambda_1 = 1 / 21 >> sqrt(eps)
    U, S, V = res
    assert U.shape == (300, k)
    assert V.shape == (200, k)
    assert U.dtype == S.dtype == dtype
    assert_orthonormal(U)
    assert_orthonormal(V)
    # the QR-based SVD of the whole W (the finish used when the Gram step declines)
    Wq, Sq, Zh = thin_svd(xp, W, "qr")
    Uq, Sq, Vq = Q @ Zh.T[:, :k], Sq[:k], Wq[:, :k]
    eps = float(np.finfo(dtype).eps)
    np.testing.assert_allclose(S, Sq, rtol=0, atol=100 * eps * Sq[0])
    A64 = A.astype(np.float64)
    err = np.linalg.norm(A64 - (U * S) @ V.T, 2)
    err_qr = np.linalg.norm(A64 - (Uq * Sq) @ Vq.T, 2)
    assert err <= err_qr + 100 * eps * Sq[0]


def test_gram_finish_declines_where_squaring_would_cost_accuracy() -> None:
    from lowrank_nla._sketch import leading_svd

    # exactly rank 6 < rank + 1: lambda_{k+1} is rounding
    gen = np.random.default_rng(0)
    low = gen.standard_normal((80, 6)) @ gen.standard_normal((6, 60))
    assert leading_svd(*_krylov_basis(low, 10, 2, 0), 8) is None
    # float32: lambda_{k+1} / lambda_1 = e^-10 = 4.5e-5 < sqrt(eps) = 3.5e-4
    fast = matrix_with_spectrum(np.exp(-np.arange(60.0) / 4.0), m=80, n=60, rng=0)
    assert leading_svd(*_krylov_basis(fast.astype(np.float32), 10, 2, 0), 20) is None
    # the same spectrum in float64 (sqrt(eps) = 1.5e-8): the Gram step is taken
    assert leading_svd(*_krylov_basis(fast, 10, 2, 0), 20) is not None
    # nothing to select from: the basis is no wider than the rank
    xp, Q, W = _krylov_basis(fast, 10, 1, 0)
    assert leading_svd(xp, Q, W, Q.shape[1]) is None


@pytest.mark.parametrize(
    ("dtype", "exponents"), [(np.float64, (-520, 520)), (np.float32, (-70, 70))]
)
def test_gram_finish_is_scale_equivariant(dtype, exponents) -> None:
    # W^T W of A * 2^520 overflows float64 and of A * 2^-520 underflows: the Gram step works
    # on W / c, c a power of two, so the result scales with A up to rounding (LAPACK's own
    # safeguards make it not bit-exact)
    s = 1.0 / np.sqrt(np.arange(1.0, 61.0))
    A = matrix_with_spectrum(s, m=70, n=60, rng=3).astype(dtype)
    base = ln.randomized_svd(A, 8, power_iters=2, method="block_krylov", block_size=6, rng=0)
    for e in exponents:
        c = dtype(2.0**e)
        got = ln.randomized_svd(
            A * c, 8, power_iters=2, method="block_krylov", block_size=6, rng=0
        )
        eps = float(np.finfo(dtype).eps)
        assert np.all(np.isfinite(got.S))
        np.testing.assert_allclose(got.S / c, base.S, rtol=100 * eps)
        np.testing.assert_allclose(got.U, base.U, rtol=0, atol=1e3 * eps)
        np.testing.assert_allclose(got.Vh, base.Vh, rtol=0, atol=1e3 * eps)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("normalizer", ["qr", "cholqr2"])
def test_krylov_basis_stays_orthonormal_in_both_precisions(dtype, normalizer) -> None:
    # one projection per Gram-Schmidt pass and a single Cholesky pass for the second block:
    # orthonormal to rounding on slowly decaying, fast decaying and exactly low-rank input
    # (where the Krylov space saturates and blocks are refilled)
    gen = np.random.default_rng(1)
    inputs = {
        "slow": matrix_with_spectrum(1.0 / np.sqrt(np.arange(1.0, 121.0)), m=150, rng=1),
        "fast": matrix_with_spectrum(np.exp(-np.arange(120.0) / 4.0), m=150, rng=1),
        "rank 9": gen.standard_normal((150, 9)) @ gen.standard_normal((9, 120)),
    }
    for name, A64 in inputs.items():
        A = A64.astype(dtype)
        Q = ln.randomized_range_finder(
            A, 8, power_iters=5, normalizer=normalizer, method="block_krylov", rng=2
        )
        assert Q.shape == (150, 48), name
        assert_orthonormal(Q)
        if name == "rank 9":  # the whole range is in the basis
            tol = 1e3 * 150 * float(np.finfo(dtype).eps) * np.linalg.norm(A64, 2)
            assert np.linalg.norm(A64 - Q @ (Q.T @ A64), 2) <= tol, name
        _, V = ln.randomized_eigh(
            A @ A.T, 8, power_iters=3, normalizer=normalizer, method="block_krylov", rng=2
        )
        assert_orthonormal(V)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_extend_basis_fallback_when_the_cholesky_pass_declines(dtype, monkeypatch) -> None:
    # the fallback path (normalize, project twice, normalize) of the second Gram-Schmidt
    # pass, forced: the result is still orthonormal and orthogonal to the basis so far
    from lowrank_nla import _sketch
    from lowrank_nla._backend import normal_sampler

    xp = _sketch.as_operator(np.eye(2, dtype=dtype), "A").xp
    gen = np.random.default_rng(5)
    Q = np.linalg.qr(gen.standard_normal((60, 12)))[0].astype(dtype)
    # a block mostly inside range(Q): strong cancellation in the projection
    Y = (Q @ gen.standard_normal((12, 5)) + 1e-3 * gen.standard_normal((60, 5))).astype(dtype)
    draw = normal_sampler(xp, 0, dtype=Y.dtype, device="cpu")
    reference = _sketch._extend_basis(xp, Q, Y, "cholqr2", "`A`", draw)
    monkeypatch.setattr(_sketch, "_cholesky_pass", lambda xp, Z, subject: None)
    for normalizer in ("qr", "cholqr2"):
        Qi = _sketch._extend_basis(xp, Q, Y, normalizer, "`A`", draw)
        assert_orthonormal(np.concatenate([Q, Qi], axis=1))
        # the same space as the Cholesky pass gives
        P = Qi @ Qi.T - reference @ reference.T
        # (the projection cancels ~1e3: the new directions are known to ~1e3 eps)
        assert np.linalg.norm(P, 2) <= 1e3 * float(np.finfo(dtype).eps)
    assert_orthonormal(np.concatenate([Q, reference], axis=1))
