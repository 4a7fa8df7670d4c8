"""Every bad input gets a clear error naming the argument (each message matched)."""

from __future__ import annotations

import array_api_strict as xs
import numpy as np
import pytest
import torch

import lowrank_nla as ln

RNG = np.random.default_rng(0)
GENERAL = RNG.standard_normal((12, 9))
_B = RNG.standard_normal((10, 10))
SYM = _B @ _B.T

# (routine, a valid matrix for it, extra keyword arguments)
RANKED = [
    (ln.randomized_svd, GENERAL, {}),
    (ln.randomized_eigh, SYM, {}),
    (ln.srevd, SYM, {}),
    (ln.nystrom, SYM, {}),
    (ln.partial_eigh, SYM, {}),
    (ln.randomized_range_finder, GENERAL, {}),
]
SYMMETRIC = [ln.randomized_eigh, ln.srevd, ln.nystrom, ln.partial_eigh]
# every entry point that takes `A`, called with valid other arguments
ALL_A = {
    **{r.__name__: (lambda A, r=r: r(A, 2)) for r, _, _ in RANKED},
    "adaptive_range_finder": lambda A: ln.adaptive_range_finder(A, 1e-3),
    "estimate_spectral_norm": ln.estimate_spectral_norm,
    "posterior_error_estimate": lambda A: ln.posterior_error_estimate(A, np.eye(10)[:, :2]),
    "relative_error": lambda A: ln.relative_error(A, np.eye(10)),
}


def ids(f) -> str:
    return f.__name__


@pytest.mark.parametrize(("routine", "A", "kw"), RANKED, ids=[ids(r[0]) for r in RANKED])
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_input(routine, A, kw, bad) -> None:
    A = A.copy()
    A[1, 2] = bad
    with pytest.raises(ValueError, match="`A` must not contain NaN or Inf"):
        routine(A, 2, **kw)


def test_non_finite_input_other_entry_points() -> None:
    A = GENERAL.copy()
    A[0, 0] = np.nan
    with pytest.raises(ValueError, match="`A` must not contain NaN or Inf"):
        ln.adaptive_range_finder(A, 1e-3)
    with pytest.raises(ValueError, match="`A` must not contain NaN or Inf"):
        ln.estimate_spectral_norm(A)
    with pytest.raises(ValueError, match="`A` must not contain NaN or Inf"):
        ln.posterior_error_estimate(A, np.eye(12)[:, :2])


class _NaNOperator:
    shape = (6, 6)
    dtype = np.float64

    def __matmul__(self, X):
        return np.full((6, X.shape[1]), np.nan)

    @property
    def T(self):
        return self


def test_operator_producing_nan_is_caught_by_the_estimators() -> None:
    with pytest.raises(ValueError, match=r"`A @ X` must not contain NaN or Inf"):
        ln.estimate_spectral_norm(_NaNOperator(), rng=0)
    with pytest.raises(ValueError, match=r"`A @ X` must not contain NaN or Inf"):
        ln.posterior_error_estimate(_NaNOperator(), np.eye(6)[:, :2], rng=0)


def test_operator_producing_nan_is_caught() -> None:
    with pytest.raises(ValueError, match=r"`A @ X` must not contain NaN or Inf"):
        ln.randomized_svd(_NaNOperator(), 2, rng=0)
    with pytest.raises(ValueError, match=r"`A @ X` must not contain NaN or Inf"):
        ln.srevd(_NaNOperator(), 2, check_symmetric=False, rng=0)


@pytest.mark.parametrize(("routine", "A", "kw"), RANKED, ids=[ids(r[0]) for r in RANKED])
def test_rank_out_of_range(routine, A, kw) -> None:
    name = (
        "k"
        if routine is ln.partial_eigh
        else ("size" if routine is ln.randomized_range_finder else "rank")
    )
    with pytest.raises(ValueError, match=f"`{name}` must be >= 1, got 0"):
        routine(A, 0, **kw)
    with pytest.raises(ValueError, match=f"`{name}` must be >= 1, got -3"):
        routine(A, -3, **kw)
    too_big = min(A.shape) + 1
    with pytest.raises(ValueError, match=rf"`{name}` must be <= min\(A.shape\) = {too_big - 1}"):
        routine(A, too_big, **kw)
    with pytest.raises(TypeError, match=f"`{name}` must be an integer, got float"):
        routine(A, 2.0, **kw)
    with pytest.raises(TypeError, match=f"`{name}` must be an integer, got bool"):
        routine(A, True, **kw)


@pytest.mark.parametrize("routine", SYMMETRIC, ids=ids)
def test_symmetric_routines_reject_non_square(routine) -> None:
    with pytest.raises(ValueError, match=r"`A` must be square .* got shape \(12, 9\)"):
        routine(GENERAL, 2)


@pytest.mark.parametrize("routine", SYMMETRIC, ids=ids)
def test_symmetric_routines_reject_non_symmetric(routine) -> None:
    A = RNG.standard_normal((30, 30))
    with pytest.raises(ValueError, match="`A` is not symmetric"):
        routine(A, 3)


def test_symmetry_check_tolerates_rounding_and_can_be_disabled() -> None:
    A = SYM + 1e-13 * RNG.standard_normal(SYM.shape)  # asymmetric at rounding level
    ln.randomized_eigh(A, 3, rng=0)
    ln.partial_eigh(A, 3)
    B = RNG.standard_normal((30, 30))
    ln.randomized_eigh(B, 3, rng=0, check_symmetric=False)


def test_nystrom_rejects_indefinite() -> None:
    A = np.diag([3.0, 2.0, 1.0, -5.0, 0.5, 0.1])
    with pytest.raises(ValueError, match="`A` is not positive semidefinite"):
        ln.nystrom(A, 2, oversample=4, rng=0)


@pytest.mark.parametrize("routine", ALL_A.values(), ids=ALL_A.keys())
@pytest.mark.parametrize(
    ("dtype", "message"),
    [
        (np.complex128, "complex input is not supported, got complex128"),
        (np.bool_, "real floating or integer dtype, got bool"),
        (np.float16, "must be float32 or float64 .* got float16"),
    ],
)
def test_unsupported_dtypes(routine, dtype, message) -> None:
    A = SYM.astype(dtype)
    with pytest.raises(TypeError, match=message):
        routine(A)


def test_torch_half_precision_rejected() -> None:
    with pytest.raises(TypeError, match=r"got torch\.bfloat16"):
        ln.randomized_eigh(torch.eye(5, dtype=torch.bfloat16), 2)


@pytest.mark.parametrize("routine", ALL_A.values(), ids=ALL_A.keys())
def test_not_an_array(routine) -> None:
    with pytest.raises(TypeError, match=r"`A` must be a 2-D array .* got list"):
        routine([[1.0, 0.0], [0.0, 1.0]])


def test_wrong_dimension_and_empty() -> None:
    with pytest.raises(ValueError, match=r"`A` must be a 2-D array, got an array of shape \(5,\)"):
        ln.randomized_svd(np.ones(5), 1)
    with pytest.raises(ValueError, match=r"`A` must not be empty, got shape \(0, 3\)"):
        ln.randomized_svd(np.ones((0, 3)), 1)


def test_bad_operator() -> None:
    class NoShape:
        dtype = np.float64

        def __matmul__(self, X):
            return X

    class BadShape(NoShape):
        shape = (3, 0)

    class NoTranspose(NoShape):
        shape = (4, 4)

    class UnknownLibrary(NoShape):
        shape = (4, 4)
        dtype = "float64-ish"

    class BoolOperator(NoShape):
        shape = (4, 4)
        dtype = np.bool_

    with pytest.raises(TypeError, match="cannot tell which array library the operator `A`"):
        ln.randomized_eigh(UnknownLibrary(), 1)
    with pytest.raises(
        TypeError, match=r"`A\.dtype` must be float32, float64 or an integer dtype for an operator"
    ):
        ln.randomized_eigh(BoolOperator(), 1)
    with pytest.raises(TypeError, match="linear operator with `shape`, `dtype` and `@`"):
        ln.randomized_svd(NoShape(), 1)
    with pytest.raises(ValueError, match=r"`A.shape` must be two positive integers"):
        ln.randomized_svd(BadShape(), 1)
    with pytest.raises(TypeError, match=r"operator without a transpose: it must expose `\.T`"):
        ln.randomized_svd(NoTranspose(), 1)
    # symmetric routines need no transpose
    w, _ = ln.randomized_eigh(NoTranspose(), 2, rng=0)
    np.testing.assert_allclose(w, [1.0, 1.0])


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"oversample": -1}, ValueError, "`oversample` must be >= 0, got -1"),
        ({"power_iters": -1}, ValueError, "`power_iters` must be >= 0, got -1"),
        ({"power_iters": 1.5}, TypeError, "`power_iters` must be an integer"),
        ({"normalizer": "lu"}, ValueError, r"`normalizer` must be one of \('qr', 'cholqr2'"),
        ({"rng": "seed"}, TypeError, "`rng` must be None, an int seed, a numpy.random"),
        (  # scikit-learn's random_state accepts it; the documented answer is default_rng
            {"rng": np.random.RandomState(0)},
            TypeError,
            r"`rng` must be None, an int seed, .* got RandomState",
        ),
        ({"rng": -4}, ValueError, "`rng` seed must be non-negative, got -4"),
        ({"rng": torch.Generator()}, TypeError, "`rng` is a torch generator but the data"),
    ],
)
def test_bad_options(kwargs, error, message) -> None:
    with pytest.raises(error, match=message):
        ln.randomized_svd(GENERAL, 2, **kwargs)


def test_srevd_reorth_every() -> None:
    with pytest.raises(ValueError, match="`reorth_every` must be >= 1, got 0"):
        ln.srevd(SYM, 2, reorth_every=0)


def test_adaptive_range_finder_arguments() -> None:
    with pytest.raises(ValueError, match=r"`tol` must be finite and > 0, got 0\.0"):
        ln.adaptive_range_finder(GENERAL, 0.0)
    with pytest.raises(TypeError, match="`tol` must be a real number, got str"):
        ln.adaptive_range_finder(GENERAL, "1e-3")
    with pytest.raises(ValueError, match="`tol` must be finite and > 0, got inf"):
        ln.adaptive_range_finder(GENERAL, float("inf"))
    with pytest.raises(ValueError, match="`block` must be >= 1"):
        ln.adaptive_range_finder(GENERAL, 1e-3, block=0)
    with pytest.raises(ValueError, match=r"`max_rank` must be <= min\(A.shape\) = 9"):
        ln.adaptive_range_finder(GENERAL, 1e-3, max_rank=10)
    with pytest.warns(RuntimeWarning, match="reached `max_rank` = 4 with an error estimate"):
        Q = ln.adaptive_range_finder(GENERAL, 1e-8, block=3, max_rank=4, rng=0)
    assert Q.shape == (12, 4)


def test_mixed_array_libraries() -> None:
    Q = ln.randomized_range_finder(GENERAL, 3, rng=0)
    with pytest.raises(TypeError, match="`A`, `Q` must all come from one array library"):
        ln.posterior_error_estimate(GENERAL, torch.asarray(Q))
    res = ln.randomized_svd(torch.asarray(GENERAL), 3, rng=0)
    with pytest.raises(TypeError, match="`A`, `approx` must all come from one array library"):
        ln.relative_error(GENERAL, res)
    strict = xs.asarray(GENERAL)
    with pytest.raises(TypeError, match="must all come from one array library"):
        ln.posterior_error_estimate(strict, Q)


def test_posterior_and_relative_error_arguments() -> None:
    with pytest.raises(ValueError, match=r"`Q` must have shape \(12, k\) to match `A`"):
        ln.posterior_error_estimate(GENERAL, np.eye(9))
    Q = np.eye(12)[:, :3]
    Q[0, 0] = np.inf
    with pytest.raises(ValueError, match="`Q` must not contain NaN or Inf"):
        ln.posterior_error_estimate(GENERAL, Q)
    with pytest.raises(ValueError, match="`n_probes` must be >= 1"):
        ln.posterior_error_estimate(GENERAL, np.eye(12)[:, :3], n_probes=0)
    with pytest.raises(ValueError, match="`ord` must be 2 or 'fro', got 1"):
        ln.relative_error(GENERAL, GENERAL, ord=1)
    with pytest.raises(ValueError, match="`method` must be 'auto', 'exact' or 'lanczos'"):
        ln.relative_error(GENERAL, GENERAL, method="svd")
    with pytest.raises(ValueError, match=r"estimates only the spectral norm \(`ord=2`\)"):
        ln.relative_error(GENERAL, GENERAL, ord="fro", method="lanczos")
    with pytest.raises(ValueError, match=r"`approx` must have the shape of `A` \(12, 9\)"):
        ln.relative_error(GENERAL, GENERAL[:5])
    with pytest.raises(ValueError, match="`A` is zero: the relative error is undefined"):
        ln.relative_error(np.zeros((3, 3)), np.zeros((3, 3)))


def test_hmt_error_bound_arguments() -> None:
    with pytest.raises(ValueError, match="`oversample` must be >= 2, got 1"):
        ln.hmt_error_bound(np.ones(5), 2, 1)
    with pytest.raises(ValueError, match="`rank` must be >= 1"):
        ln.hmt_error_bound(np.ones(5), 0, 2)
    with pytest.raises(ValueError, match="`singular_values` must not contain NaN or Inf"):
        ln.hmt_error_bound(np.array([1.0, np.nan]), 1, 2)


@pytest.mark.gpu
def test_torch_generator_on_other_device() -> None:
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    A = torch.eye(8, device="cuda")
    with pytest.raises(ValueError, match=r"`rng` is a torch\.Generator on cpu but the data is on"):
        ln.randomized_eigh(A, 2, rng=torch.Generator())
