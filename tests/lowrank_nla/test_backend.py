"""The backend shim: seeded sketches, dtype rules, sorted eigh, normalizers, host copies."""

from __future__ import annotations

import array_api_compat
import numpy as np
import pytest
import torch

import lowrank_nla as ln
from lowrank_nla import _backend
from lowrank_nla._sketch import orthonormalize, qr_factor
from lowrank_nla.testing import Backend, assert_orthonormal, matrix_with_spectrum, to_numpy


def _sampler(backend: Backend, rng):
    return _backend.normal_sampler(backend.xp, rng, dtype=backend.dtype, device=backend.device)


def test_sampler_seed_reproducible_and_on_device(backend: Backend) -> None:
    a = _sampler(backend, 123)((50, 4))
    b = _sampler(backend, 123)((50, 4))
    c = _sampler(backend, 124)((50, 4))
    assert a.dtype == backend.dtype
    assert array_api_compat.device(a) == array_api_compat.device(backend.asarray(np.ones(1)))
    np.testing.assert_array_equal(to_numpy(a), to_numpy(b))
    assert not np.array_equal(to_numpy(a), to_numpy(c))
    # one stream across draws
    draw = _sampler(backend, 123)
    first, second = draw((50, 4)), draw((50, 4))
    np.testing.assert_array_equal(to_numpy(first), to_numpy(a))
    assert not np.array_equal(to_numpy(first), to_numpy(second))


@pytest.mark.parametrize("rng", [11, "generator"])
def test_one_seed_draws_one_sketch_in_float32_and_float64(rng) -> None:
    # As torch.randn and scikit-learn's randomized_svd (which draws float64 and casts): a
    # float32 run and a float64 run with the same seed use the same test matrix (NumPy's
    # float32 ziggurat would draw different numbers), so their results agree to float32.
    def seed():
        return np.random.default_rng(11) if rng == "generator" else rng

    for xp in (np, pytest.importorskip("array_api_strict")):
        a64 = _backend.normal_sampler(xp, seed(), dtype=xp.float64, device=None)((30, 4))
        a32 = _backend.normal_sampler(xp, seed(), dtype=xp.float32, device=None)((30, 4))
        assert a32.dtype == xp.float32
        np.testing.assert_array_equal(to_numpy(a32), to_numpy(a64).astype(np.float32))
    A = matrix_with_spectrum(np.geomspace(1.0, 1e-3, 30), m=40, n=30, rng=2)
    r64 = ln.randomized_svd(A, 5, oversample=0, power_iters=0, rng=seed())
    r32 = ln.randomized_svd(A.astype(np.float32), 5, oversample=0, power_iters=0, rng=seed())
    np.testing.assert_allclose(r32.S, r64.S, rtol=1e3 * np.finfo(np.float32).eps)


def test_sampler_is_standard_gaussian(backend: Backend) -> None:
    x = to_numpy(_sampler(backend, 0)((20000, 1))).astype(np.float64)
    assert abs(x.mean()) < 0.03
    assert abs(x.std() - 1.0) < 0.03


def test_numpy_generator_works_for_every_backend(backend: Backend) -> None:
    a = _sampler(backend, np.random.default_rng(5))((10, 2))
    np_dtype = np.float32 if backend.eps > 1e-10 else np.float64
    b = np.random.default_rng(5).standard_normal((10, 2)).astype(np_dtype)
    np.testing.assert_array_equal(to_numpy(a), b)


def test_torch_generator() -> None:
    xp = array_api_compat.array_namespace(torch.empty(0))
    g1 = torch.Generator().manual_seed(3)
    g2 = torch.Generator().manual_seed(3)
    A = torch.randn(30, 30, dtype=torch.float64)
    r1 = ln.randomized_svd(A, 4, rng=g1)
    r2 = ln.randomized_svd(A, 4, rng=g2)
    torch.testing.assert_close(r1.S, r2.S, rtol=0, atol=0)
    draw = _backend.normal_sampler(xp, 3, dtype=torch.float32, device=torch.device("cpu"))
    torch.testing.assert_close(
        draw((5,)), torch.randn(5, generator=torch.Generator().manual_seed(3))
    )


def test_float32_stays_float32(backend: Backend) -> None:
    A = backend.asarray(np.diag(np.arange(1.0, 21.0)))
    for res in (
        ln.randomized_svd(A, 3, rng=0),
        ln.randomized_eigh(A, 3, rng=0),
        ln.srevd(A, 3, rng=0),
        ln.nystrom(A, 3, rng=0),
        ln.partial_eigh(A, 3),
    ):
        assert all(part.dtype == backend.dtype for part in res)
    assert ln.randomized_range_finder(A, 3, rng=0).dtype == backend.dtype
    assert ln.estimate_spectral_norm(A, rng=0).dtype == backend.dtype


def test_integer_input_promoted_to_default_float() -> None:
    xp = array_api_compat.array_namespace(torch.empty(0))
    A = torch.arange(36).reshape(6, 6) % 4
    A = A + A.T
    w, _V = ln.partial_eigh(A, 2)
    assert w.dtype == torch.get_default_dtype()
    assert _backend.floating_dtype(xp, A, "A") == torch.float32


def test_eigh_descending_sorted_and_retries_in_float64(backend: Backend) -> None:
    A_np = np.diag([1.0, 5.0, 3.0, 2.0])
    w, V = _backend.eigh_descending(backend.xp, backend.asarray(A_np))
    np.testing.assert_array_equal(to_numpy(w), [5.0, 3.0, 2.0, 1.0])
    np.testing.assert_allclose(np.abs(to_numpy(V)[:, 0]), [0, 1, 0, 0])


class _FailingEigh:
    """The NumPy namespace with an ``eigh`` that fails (raises) for every call."""

    def __init__(self) -> None:
        self._xp = array_api_compat.array_namespace(np.empty(0))
        self.calls: list[str] = []

        def eigh(C):
            self.calls.append(str(C.dtype))
            raise np.linalg.LinAlgError("no convergence")

        self.linalg = type("linalg", (), {"eigh": staticmethod(eigh)})

    def __getattr__(self, name):
        return getattr(self._xp, name)


def test_eigh_descending_failure_is_reported_not_silent() -> None:
    xp = _FailingEigh()
    C = np.eye(4, dtype=np.float32)
    with (
        pytest.warns(RuntimeWarning, match="retrying in float64"),
        pytest.raises(np.linalg.LinAlgError, match="failed to converge in float64"),
    ):
        _backend.eigh_descending(xp, C)
    assert xp.calls == ["float32", "float64"]


def test_eigh_descending_never_passes_non_finite_input_to_lapack() -> None:
    xp = _FailingEigh()
    bad = np.full((4, 4), np.nan, dtype=np.float32)
    with pytest.raises(ValueError, match=r"`A` is too large for float32: the core overflowed"):
        _backend.eigh_descending(xp, bad, name="core")
    assert xp.calls == []


def test_cholqr2_orthonormal_and_falls_back_on_rank_deficiency(backend: Backend) -> None:
    gen = np.random.default_rng(0)
    Y = gen.standard_normal((60, 8)) @ np.diag(np.logspace(0, -2, 8))
    Q = orthonormalize(backend.xp, backend.asarray(Y), "cholqr2")
    assert_orthonormal(Q)
    q = to_numpy(Q).astype(np.float64)
    np.testing.assert_allclose(q @ (q.T @ Y), Y, atol=1e3 * backend.eps)
    # exactly rank deficient: Cholesky of the Gram matrix fails, QR takes over
    Yd = np.concatenate([Y[:, :4], Y[:, :4]], axis=1)
    Qd = orthonormalize(backend.xp, backend.asarray(Yd), "cholqr2")
    assert_orthonormal(Qd)
    assert Qd.shape == (60, 8)
    qd = to_numpy(Qd).astype(np.float64)
    np.testing.assert_allclose(qd @ (qd.T @ Yd), Yd, atol=1e3 * backend.eps)


def test_cholqr2_ill_conditioned_stays_orthonormal(backend: Backend) -> None:
    # cond(Y) = 1e12 is far beyond eps**-1/2 in both precisions: a plain CholeskyQR2 would
    # lose orthogonality (or fail); the fallback keeps Q orthonormal and Q R = Y.
    Y = matrix_with_spectrum(np.logspace(0, -12, 10), m=80, n=10, rng=3)
    Q, R = qr_factor(backend.xp, backend.asarray(Y), "cholqr2")
    assert_orthonormal(Q)
    q, r = to_numpy(Q).astype(np.float64), to_numpy(R).astype(np.float64)
    assert np.linalg.norm(q @ r - Y, 2) <= 100 * backend.eps * np.linalg.norm(Y, 2)


def test_cholesky_lower_reports_failure() -> None:
    xp = array_api_compat.array_namespace(np.empty(0))
    assert _backend.cholesky_lower(xp, -np.eye(3)) is None
    L = _backend.cholesky_lower(xp, 4 * np.eye(3))
    np.testing.assert_allclose(L, 2 * np.eye(3))


def test_sign_fix_makes_largest_entry_positive(backend: Backend) -> None:
    V = backend.asarray(np.array([[0.1, -0.9], [-0.8, 0.2], [0.3, 0.1]]))
    signs = to_numpy(_backend.sign_fix(backend.xp, V))
    np.testing.assert_array_equal(signs, [-1.0, -1.0])


def test_to_numpy_round_trip(backend: Backend) -> None:
    x = np.arange(6.0).reshape(2, 3)
    np.testing.assert_array_equal(to_numpy(backend.asarray(x)), x)
