"""Rank controllers on scripted sequences; the decay, drift and inverse bounds on instances."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import lowrank_nla as ln


def _run(ctrl: ln.RankController, rank: int, errors: list[float]) -> list[int]:
    state = ctrl.init(rank)
    ranks = []
    for e in errors:
        state = ctrl.update(state, e)
        ranks.append(state.rank)
    return ranks


def test_rsvd_controller_scripted_sequence() -> None:
    ctrl = ln.RankController.rsvd(dim=1000)
    # target 0.033: below 0.026 decreases by 10, above 0.053 increases by 10
    errors = [0.01, 0.01, 0.03, 0.0265, 0.0255, 0.06, 0.0525, 0.0535]
    assert _run(ctrl, 220, errors) == [210, 200, 200, 200, 190, 200, 200, 210]
    # floor 10 and cap min(700, D)
    assert _run(ctrl, 20, [0.0] * 3) == [10, 10, 10]
    assert _run(ln.RankController.rsvd(dim=215), 200, [1.0] * 3) == [210, 215, 215]


def test_brand_controller_scripted_sequence() -> None:
    ctrl = ln.RankController.brand()
    # decrease by 5 below 0.013 (floor 70); increase by 10 above 0.048 (cap 500)
    assert _run(ctrl, 80, [0.0, 0.0, 0.0, 0.02, 0.05]) == [75, 70, 70, 70, 80]
    assert _run(ctrl, 495, [0.5, 0.5]) == [500, 500]
    # a small cap needs a lower floor (kfac uses floor = min(70, cap))
    small = ln.RankController.brand(cap=30, floor=20)
    assert _run(small, 28, [0.0, 0.0, 0.5]) == [23, 20, 30]
    with pytest.raises(ValueError, match="`cap` must be >= 20"):
        ln.RankController.brand(cap=10, floor=20)


def test_controller_averages_over_every_observations() -> None:
    ctrl = ln.RankController.rsvd(dim=1000, every=3)
    # re-evaluated at observations 3 and 6, on the mean of the last three
    assert _run(ctrl, 100, [0.0, 0.0, 0.03, 0.2, 0.0, 0.0]) == [100, 100, 90, 90, 90, 100]
    state = ctrl.init(100)
    for _ in range(40):
        state = ctrl.update(state, 0.03)
    assert len(state.errors) == 30
    assert state.observations == 40


def test_controller_bad_arguments() -> None:
    with pytest.raises(ValueError, match="`cap` must be >= 70"):
        ln.RankController(floor=70, cap=50)
    with pytest.raises(ValueError, match="`target` must be finite and >= 0"):
        ln.RankController(target=-0.1)
    with pytest.raises(ValueError, match="`error` must be finite and >= 0, got nan"):
        ln.RankController().update(ln.RankController().init(10), float("nan"))
    with pytest.raises(ValueError, match=r"`error` must be finite and >= 0, got -0\.5"):
        ln.RankController().update(ln.RankController().init(10), -0.5)
    with pytest.raises(TypeError, match="`state` must be a RankState, got tuple"):
        ln.RankController().update((10, (), 0), 0.1)
    with pytest.raises(ValueError, match="`rank` must be >= 1, got 0"):
        ln.RankController().init(0)


def test_truncation_ratio() -> None:
    assert ln.truncation_ratio(np.array([1.0, 0.5, 0.25])) == 0.25
    assert ln.truncation_ratio(np.zeros(3)) == 0.0
    with pytest.raises(ValueError, match="`d` must hold at least one eigenvalue"):
        ln.truncation_ratio(np.zeros(0))
    with pytest.raises(ValueError, match="`d` must be finite and non-negative"):
        ln.truncation_ratio(np.array([1.0, -1.0]))


@given(
    st.integers(1, 6),
    st.floats(0.5, 0.97),
    st.sampled_from([0.3, 0.1, 0.03]),
    st.integers(0, 2**16),
)
def test_ea_decay_modes_bound_holds(m, decay, eps, seed) -> None:
    gen = np.random.default_rng(seed)
    D, steps = 60, 80
    M = np.zeros((D, D))
    c = 0.0
    for _ in range(steps):
        X = gen.standard_normal((D, m)) * gen.uniform(0.2, 1.0)
        C = X @ X.T
        c = max(c, np.linalg.norm(C, 2))
        M = decay * M + (1 - decay) * C
    w = np.linalg.eigvalsh(M)
    count = int(np.sum(w > eps * c))
    assert count <= ln.ea_decay_modes(m, decay, eps, steps=steps, dim=D)


def test_ea_decay_modes_values() -> None:
    assert ln.ea_decay_modes(16, 0.95, 0.1) == 16 * math.ceil(math.log(0.1) / math.log(0.95))
    assert ln.ea_decay_modes(16, 0.95, 0.1, steps=3) == 48
    assert ln.ea_decay_modes(16, 0.95, 0.1, dim=100) == 100
    assert ln.ea_decay_modes(4, 0.0, 0.5) == 4
    with pytest.raises(ValueError, match=r"`eps` must be in \(0, 1\], got 0\.0"):
        ln.ea_decay_modes(4, 0.9, 0.0)
    with pytest.raises(ValueError, match=r"`decay` must be in \[0, 1\), got 1\.0"):
        ln.ea_decay_modes(4, 1.0, 0.1)


def test_brand_drift_bound_values() -> None:
    assert ln.brand_drift_bound([], 0.9) == 0.0
    assert ln.brand_drift_bound([2.0], 0.9, initial=1.0) == pytest.approx(2.9)
    # geometric limit max(delta) / (1 - rho)
    assert ln.brand_drift_bound(np.ones(2000), 0.95) == pytest.approx(20.0)
    with pytest.raises(ValueError, match="`dropped_max` must be finite and non-negative"):
        ln.brand_drift_bound([1.0, -1.0], 0.9)
    with pytest.raises(ValueError, match="`initial` must be finite and >= 0"):
        ln.brand_drift_bound([1.0], 0.9, initial=-1.0)


@given(st.integers(3, 25), st.floats(1e-3, 10.0), st.integers(0, 2**16))
def test_inverse_perturbation_bound_holds(D, damping, seed) -> None:
    gen = np.random.default_rng(seed)
    A = gen.standard_normal((D, D))
    X = A @ A.T
    k = int(gen.integers(1, D + 1))
    w, V = np.linalg.eigh(X)
    X_hat = (V[:, -k:] * w[-k:]) @ V[:, -k:].T
    eye = np.eye(D)
    gap = np.linalg.norm(
        np.linalg.inv(X + damping * eye) - np.linalg.inv(X_hat + damping * eye), 2
    )
    err = np.linalg.norm(X - X_hat, 2)
    assert gap <= ln.inverse_perturbation_bound(err, damping) * (1 + 1e-8) + 1e-12


def test_inverse_perturbation_bound_is_attained() -> None:
    # a perturbation in the null space of X: the bound is exact
    X = np.diag([1.0, 0.0])
    X_hat = np.diag([1.0, 1e-3])
    lam = 0.01
    gap = np.linalg.norm(
        np.linalg.inv(X + lam * np.eye(2)) - np.linalg.inv(X_hat + lam * np.eye(2)), 2
    )
    bound = ln.inverse_perturbation_bound(1e-3, lam)
    assert gap == pytest.approx(bound / (1 + 1e-3 / lam), rel=1e-12)
    with pytest.raises(ValueError, match=r"`damping` must be finite and > 0, got 0\.0"):
        ln.inverse_perturbation_bound(1.0, 0.0)


def test_hmt_bound_is_not_vacuous_on_decaying_spectra() -> None:
    # measured mean error within a factor 10 of the expectation bound
    from lowrank_nla.testing import matrix_with_spectrum

    for rate, q in ((0.8, 0), (0.9, 1), (0.95, 2)):
        s = rate ** np.arange(80.0)
        A = matrix_with_spectrum(s, m=100, n=80, rng=3)
        errors = []
        for seed in range(6):
            Q = ln.randomized_range_finder(A, 15, power_iters=q, rng=seed)
            errors.append(np.linalg.norm(A - Q @ (Q.T @ A), 2))
        bound = ln.hmt_error_bound(s, 10, 5, q)
        assert np.mean(errors) <= bound <= 10 * np.mean(errors), (rate, q)


def test_ea_decay_modes_is_not_vacuous() -> None:
    # The worst case of the proposition: every update C_j (rank m, norm c = 1) lives in fresh
    # coordinates, so M is diagonal with eigenvalues (1 - rho) rho^i. The count above eps c
    # is m ceil(ln(eps / (1 - rho)) / ln rho) = 8 * 32 = 256 here; the bound (which drops the
    # (1 - rho) factor) gives 8 * 90 = 720: within a factor 3.
    m, decay, eps, steps = 8, 0.95, 0.01, 100
    weights = (1 - decay) * decay ** np.arange(steps)  # newest first
    eigenvalues = np.repeat(weights, m)
    count = int(np.sum(eigenvalues > eps * 1.0))
    bound = ln.ea_decay_modes(m, decay, eps, steps=steps, dim=m * steps)
    assert count == 256
    assert bound == 720
    assert count <= bound <= 3 * count
