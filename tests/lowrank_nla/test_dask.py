"""dask.array input: passes over ``A`` counted, result types, chunk validation, a cluster run."""

from __future__ import annotations

import threading

import numpy as np
import pytest

da = pytest.importorskip("dask.array", reason="dask is not installed (the `dask` extra)")
dask = pytest.importorskip("dask")

import lowrank_nla as ln  # noqa: E402
from lowrank_nla.testing import assert_orthonormal, matrix_with_spectrum  # noqa: E402

EPS64 = float(np.finfo(np.float64).eps)


class PassCounter:
    """Wraps a dask matrix so that every block read is counted; ``passes`` = reads / blocks."""

    def __init__(self, A: np.ndarray, chunks: tuple[int, int]) -> None:
        self.base = da.from_array(A, chunks=chunks)
        self.reads = 0
        self._lock = threading.Lock()
        meta = np.empty((0, 0), dtype=self.base.dtype)  # no meta-inference call
        self.array = self.base.map_blocks(self._read, dtype=self.base.dtype, meta=meta)

    def _read(self, block: np.ndarray) -> np.ndarray:
        with self._lock:
            self.reads += 1
        return block

    @property
    def passes(self) -> float:
        return self.reads / self.base.npartitions

    def reset(self) -> None:
        self.reads = 0


@pytest.fixture(autouse=True)
def _synchronous_scheduler():
    with dask.config.set(scheduler="synchronous"):
        yield


SPECTRUM = 0.8 ** np.arange(60.0)


@pytest.fixture(scope="module")
def tall() -> np.ndarray:
    return matrix_with_spectrum(SPECTRUM, m=600, n=60, rng=0)


@pytest.mark.parametrize("power_iters", [0, 1, 2])
def test_randomized_svd_makes_q_plus_one_passes_and_matches_in_memory(tall, power_iters):
    counted = PassCounter(tall, (100, 60))
    U, S, Vh = ln.randomized_svd(counted.array, 10, power_iters=power_iters, rng=0)
    assert counted.passes == power_iters + 1
    assert isinstance(U, da.Array)
    assert isinstance(S, np.ndarray)
    assert isinstance(Vh, np.ndarray)
    assert U.chunks[0] == counted.base.chunks[0]
    u = U.compute()
    assert counted.passes == power_iters + 1  # U lives on the persisted basis, not on A
    assert_orthonormal(u)
    assert_orthonormal(Vh.T)
    # same Gaussian block as the in-memory routine (float64 host draws): same subspace
    ref = ln.randomized_svd(tall, 10, power_iters=power_iters, rng=0)
    np.testing.assert_allclose(S, ref.S, rtol=1e4 * EPS64)
    err = np.linalg.norm(tall - (u * S) @ Vh, 2)
    ref_err = np.linalg.norm(tall - (ref.U * ref.S) @ ref.Vh, 2)
    assert err <= ref_err * (1 + 1e-8) + 1e3 * EPS64


@pytest.mark.parametrize("power_iters", [0, 2])
def test_range_finder_makes_q_plus_one_passes(tall, power_iters):
    counted = PassCounter(tall, (150, 60))
    Q = ln.randomized_range_finder(counted.array, 12, power_iters=power_iters, rng=1)
    assert isinstance(Q, da.Array)
    assert Q.shape == (600, 12)
    q = Q.compute()
    assert counted.passes == power_iters + 1
    assert_orthonormal(q)
    ref = ln.randomized_range_finder(tall, 12, power_iters=power_iters, rng=1)
    np.testing.assert_allclose(q @ q.T, ref @ ref.T, atol=1e-10)


def test_column_chunked_matrix_gives_a_dask_right_factor(tall):
    counted = PassCounter(tall.T.copy(), (60, 100))
    U, S, Vh = ln.randomized_svd(counted.array, 10, power_iters=1, rng=0)
    assert counted.passes == 2
    assert isinstance(U, np.ndarray)
    assert isinstance(Vh, da.Array)
    vh = Vh.compute()
    assert_orthonormal(U)
    assert_orthonormal(vh.T)
    np.testing.assert_allclose(S, SPECTRUM[:10], rtol=1e-6)
    # sign convention of the in-memory routine: largest-magnitude entry of each U column > 0
    cols = np.arange(U.shape[1])
    assert np.all(U[np.argmax(np.abs(U), axis=0), cols] > 0)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_dtype_is_kept_and_exact_low_rank_input_is_recovered(dtype):
    gen = np.random.default_rng(3)
    L = (gen.standard_normal((300, 5)) @ gen.standard_normal((5, 40))).astype(dtype)
    A = da.from_array(L, chunks=(64, 40))
    U, S, Vh = ln.randomized_svd(A, 8, oversample=4, power_iters=1, rng=0)
    assert U.dtype == dtype
    assert S.dtype == dtype
    assert Vh.dtype == dtype
    u = U.compute()
    assert_orthonormal(u)
    L64 = L.astype(np.float64)
    eps = float(np.finfo(dtype).eps)
    norm = np.linalg.norm(L64, 2)
    assert np.linalg.norm(L64 - (u * S) @ Vh, 2) <= 1e3 * eps * norm
    np.testing.assert_allclose(S[5:], 0.0, atol=1e3 * eps * norm)


def test_integer_matrix_is_promoted_to_float64():
    gen = np.random.default_rng(1)
    A = da.from_array(gen.integers(-5, 5, (80, 12)), chunks=(20, 12))
    U, S, _Vh = ln.randomized_svd(A, 12, oversample=0, power_iters=0, rng=0)
    assert U.dtype == np.float64
    ref = np.linalg.svd(A.compute().astype(np.float64), compute_uv=False)
    np.testing.assert_allclose(S, ref, rtol=1e-10)


@pytest.mark.parametrize(
    ("name", "passes"),
    [("randomized_eigh", 3 + 1), ("srevd", 3 + 1), ("nystrom", 2 + 1)],
)
def test_symmetric_routines_make_one_pass_per_product(name, passes):
    P = matrix_with_spectrum(SPECTRUM, symmetric=True, rng=2)
    counted = PassCounter(P, (20, 60))
    w, V = getattr(ln, name)(counted.array, 8, power_iters=1, rng=0)
    # randomized_eigh/srevd: q + 1 sketch products and the Rayleigh-Ritz one; nystrom:
    # q + 1 products; each + 1 for the two-column symmetry probe
    assert counted.passes == passes
    assert isinstance(V, np.ndarray)
    assert V.dtype == np.float64
    ref = getattr(ln, name)(P, 8, power_iters=1, rng=0)
    np.testing.assert_allclose(w, ref.eigenvalues, rtol=1e-10, atol=1e-12)


def test_symmetric_block_krylov_on_dask_input():
    P = matrix_with_spectrum(SPECTRUM, symmetric=True, rng=2)
    counted = PassCounter(P, (30, 60))
    w, _ = ln.randomized_eigh(
        counted.array, 8, power_iters=2, method="block_krylov", check_symmetric=False, rng=0
    )
    assert counted.passes == 2 + 2
    np.testing.assert_allclose(w, SPECTRUM[:8], rtol=1e-8)


def test_operator_routines_accept_dask_input(tall):
    counted = PassCounter(tall, (200, 60))
    norm = float(ln.estimate_spectral_norm(counted.array, n_iter=10, rng=0))
    assert norm == pytest.approx(1.0, rel=1e-12)
    assert counted.passes == 2 * 10  # one pass per product with A and with A^T


@pytest.mark.parametrize("chunks", [(100, 60), (600, 25)], ids=["row-blocks", "column-blocks"])
def test_operator_products_are_one_pass_each_for_blocks_and_vectors(tall, chunks):
    from lowrank_nla._dask import dask_operator

    counted = PassCounter(tall, chunks)
    op = dask_operator(counted.array)
    gen = np.random.default_rng(5)
    for M, X in [
        (op, gen.standard_normal((60, 3))),
        (op.T, gen.standard_normal((600, 4))),
        (op, gen.standard_normal(60)),
        (op.T, gen.standard_normal(600)),
    ]:
        counted.reset()
        out = M @ X
        assert counted.passes == 1
        ref = (tall if M is op else tall.T) @ X
        assert out.shape == ref.shape
        np.testing.assert_allclose(out, ref, rtol=0, atol=1e3 * EPS64 * np.abs(ref).max())


def test_float32_beyond_the_square_root_of_eps_warns():
    s = np.logspace(0, -5, 40)  # s_10 / s_1 = 5e-2 ... s_30 = 1e-4: squared below eps32
    A = matrix_with_spectrum(s, m=200, n=40, rng=0).astype(np.float32)
    Ad = da.from_array(A, chunks=(50, 40))
    ln.randomized_svd(Ad, 10, rng=0)  # (s_10 / s_1)^2 = 2e-3: resolved, no warning
    with pytest.warns(RuntimeWarning, match=r"randomized_svd: 2 products without"):
        ln.randomized_svd(Ad, 30, rng=0)


@pytest.mark.parametrize(
    ("make", "call", "error", "match"),
    [
        (
            lambda: da.ones((40, 40), chunks=(20, 20)),
            lambda A: ln.randomized_svd(A, 2, rng=0),
            ValueError,
            r"`A` must be chunked along one dimension only \(rows, or columns\), got 2 x 2 "
            r"blocks.*A\.rechunk\(\{1: -1\}\)",
        ),
        (
            lambda: da.ones((40, 40), chunks=(40, 20)),
            lambda A: ln.randomized_range_finder(A, 2, rng=0),
            ValueError,
            r"`A` must be chunked along rows only, got 1 x 2 blocks",
        ),
        (
            lambda: da.ones((40, 40), chunks=(20, 20)),
            lambda A: ln.randomized_eigh(A, 2, rng=0),
            ValueError,
            r"`A` must be chunked along one dimension only",
        ),
        (
            lambda: da.ones((40, 8), chunks=(10, 8))[da.ones(40, chunks=10) > 0],
            lambda A: ln.randomized_svd(A, 2, rng=0),
            ValueError,
            r"`A` is a dask array with unknown chunk sizes; call `A\.compute_chunk_sizes\(\)`",
        ),
        (
            lambda: da.ones((40, 8), chunks=(10, 8)),
            lambda A: ln.randomized_svd(A, 2, method="block_krylov", rng=0),
            ValueError,
            r"`method` must be 'subspace' for a dask array `A`",
        ),
        (
            lambda: da.ones((40, 8), chunks=(10, 8)),
            lambda A: ln.randomized_svd(A, 2, block_size=4, rng=0),
            ValueError,
            r"`block_size` applies to method='block_krylov' only",
        ),
        (
            lambda: da.ones((40, 8), chunks=(10, 8)),
            lambda A: ln.randomized_svd(A, 9, rng=0),
            ValueError,
            r"`rank` must be <= min\(A.shape\) = 8, got 9",
        ),
        (
            lambda: da.ones((40, 8), chunks=(10, 8)),
            lambda A: ln.randomized_range_finder(A, 2, power_iters=101, rng=0),
            ValueError,
            r"`power_iters` must be <= 100, got 101",
        ),
        (
            lambda: da.ones((40, 8), chunks=(10, 8)),
            lambda A: ln.randomized_svd(A, 2, normalizer="lu", rng=0),
            ValueError,
            r"`normalizer` must be one of",
        ),
        (
            lambda: da.ones((40, 8), chunks=(10, 8), dtype=np.complex128),
            lambda A: ln.randomized_svd(A, 2, rng=0),
            TypeError,
            r"`A` must have a real floating or integer dtype, got complex",
        ),
        (
            lambda: da.ones((40, 8), chunks=(10, 8), dtype=np.float16),
            lambda A: ln.randomized_svd(A, 2, rng=0),
            TypeError,
            r"`A` must be float32 or float64 \(or integer\), got float16",
        ),
        (
            lambda: da.ones((40,), chunks=10),
            lambda A: ln.randomized_svd(A, 2, rng=0),
            ValueError,
            r"`A` must be a 2-D array, got a dask array of shape \(40,\)",
        ),
        (
            lambda: da.ones((0, 8), chunks=(10, 8)),
            lambda A: ln.randomized_svd(A, 2, rng=0),
            ValueError,
            r"`A` must not be empty, got shape \(0, 8\)",
        ),
        (
            lambda: da.from_array(np.where(np.eye(40, 8) > 0, np.nan, 1.0), chunks=(10, 8)),
            lambda A: ln.randomized_svd(A, 2, rng=0),
            ValueError,
            r"`A` must not contain NaN or Inf",
        ),
        (
            lambda: da.from_array(np.where(np.eye(40, 8) > 0, np.inf, 1.0), chunks=(10, 8)),
            lambda A: ln.randomized_range_finder(A, 2, power_iters=0, rng=0),
            ValueError,
            r"`A` must not contain NaN or Inf",
        ),
    ],
    ids=[
        "both-dims-chunked",
        "range-finder-needs-rows",
        "symmetric-both-dims",
        "unknown-chunks",
        "krylov",
        "block-size",
        "rank",
        "power-iters",
        "normalizer",
        "complex",
        "float16",
        "1-D",
        "empty",
        "nan",
        "inf",
    ],
)
def test_bad_dask_input_is_a_clear_error(make, call, error, match):
    with pytest.raises(error, match=match):
        call(make())


def test_on_a_local_cluster_with_two_worker_processes(tall):
    distributed = pytest.importorskip("distributed", reason="dask.distributed is not installed")
    with (
        distributed.LocalCluster(
            n_workers=2,
            threads_per_worker=1,
            processes=True,
            host="127.0.0.1",
            dashboard_address=":0",  # any free port: another cluster may hold the default
            memory_limit="512MiB",
        ) as cluster,
        distributed.Client(cluster) as client,
    ):
        assert len(client.scheduler_info()["workers"]) == 2
        A = da.from_array(tall, chunks=(100, 60))
        U, S, Vh = ln.randomized_svd(A, 10, power_iters=1, rng=0)
        u = U.compute()
        ref = ln.randomized_svd(tall, 10, power_iters=1, rng=0)
        np.testing.assert_allclose(S, ref.S, rtol=1e4 * EPS64)
        assert_orthonormal(u)
        assert np.linalg.norm(tall - (u * S) @ Vh, 2) <= SPECTRUM[10] * (1 + 1e-6)
        P = matrix_with_spectrum(SPECTRUM, symmetric=True, rng=2)
        w, _ = ln.randomized_eigh(da.from_array(P, chunks=(20, 60)), 5, rng=0)
        np.testing.assert_allclose(w, SPECTRUM[:5], rtol=1e-6)
