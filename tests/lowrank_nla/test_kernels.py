"""Prepared inverses equal the checked one-shot routines, on every backend."""

from __future__ import annotations

import numpy as np
import pytest

import lowrank_nla as ln
from lowrank_nla.testing import Backend, to_numpy


def _factor(D: int, k: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    gen = np.random.default_rng(seed)
    U, _ = np.linalg.qr(gen.standard_normal((D, k)))
    return U, np.sort(gen.uniform(0.1, 5.0, k))[::-1]


def _state(backend: Backend, U: np.ndarray, d: np.ndarray) -> ln.LowRankPSD:
    return ln.LowRankPSD(backend.asarray(U), backend.asarray(d))


@pytest.mark.parametrize("side", ["left", "right"])
def test_damped_inverse_equals_damped_inverse_apply(backend: Backend, side: str) -> None:
    U, d = _factor(30, 7, 0)
    state = _state(backend, U, d)
    tail = float(d.min())
    V = np.random.default_rng(1).standard_normal((30, 4) if side == "left" else (4, 30))
    prepared = ln.damped_inverse(state, damping=0.3, tail=tail).apply(backend.asarray(V), side)
    checked = ln.damped_inverse_apply(state, backend.asarray(V), damping=0.3, tail=tail, side=side)
    np.testing.assert_array_equal(to_numpy(prepared), to_numpy(checked))
    # and against the dense float64 solve
    X = (U * d) @ U.T + tail * (np.eye(30) - U @ U.T) + 0.3 * np.eye(30)
    dense = np.linalg.solve(X, V) if side == "left" else np.linalg.solve(X, V.T).T
    error = np.linalg.norm(to_numpy(prepared) - dense) / np.linalg.norm(dense)
    assert error <= 100 * backend.eps  # X is well conditioned: cond(X) = 5.3 / 0.4 < 14


@pytest.mark.parametrize("ranks", [(6, 6), (3, 5), (0, 4)])
def test_kron_eigenbasis_inverse_equals_kron_inverse_apply(backend: Backend, ranks) -> None:
    """Full and truncated factors, with shifts; the checked routine with ``continuation``
    uses ``min(d)`` as each truncated factor's tail, the prepared form is given it."""
    (Ug, dg), (Ua, da) = _factor(6, ranks[0], 2), _factor(6, ranks[1], 3)
    G, A = _state(backend, Ug, dg), _state(backend, Ua, da)
    V = backend.asarray(np.random.default_rng(4).standard_normal((6, 6)))

    def tail(U: np.ndarray, d: np.ndarray) -> float:
        return float(d.min()) if 0 < U.shape[1] < U.shape[0] else 0.0

    prepared = ln.kron_eigenbasis_inverse(
        G, A, damping=0.2, tails=(tail(Ug, dg), tail(Ua, da)), shift=(0.1, 0.05)
    ).apply(V)
    checked = ln.kron_inverse_apply(
        G, A, V, damping=0.2, scheme="eigenbasis", continuation=True, shift=(0.1, 0.05)
    )
    np.testing.assert_array_equal(to_numpy(prepared), to_numpy(checked))


def test_prepared_inverse_rejects_an_unknown_side() -> None:
    # Anything but "left" used to run the right-side product: side="Left" on a square V
    # returned V X^-1 instead of X^-1 V without a word.
    U, d = _factor(5, 2, 0)
    inv = ln.damped_inverse(ln.LowRankPSD(U, d), damping=0.5)
    V = np.random.default_rng(1).standard_normal((5, 5))
    X = (U * d) @ U.T + 0.5 * np.eye(5)
    np.testing.assert_allclose(inv.apply(V, "left"), np.linalg.solve(X, V), rtol=1e-12)
    np.testing.assert_allclose(inv.apply(V, "right"), np.linalg.solve(X.T, V.T).T, rtol=1e-12)
    for bad in ("Left", "up", None):
        with pytest.raises(ValueError, match=r"`side` must be 'left' or 'right', got"):
            inv.apply(V, bad)  # type: ignore[arg-type]


def test_prepared_inverses_validate_once() -> None:
    U, d = _factor(5, 2, 0)
    bad = ln.LowRankPSD(U, np.array([1.0, np.nan]), check=False)
    with pytest.raises(ValueError, match=r"`state\.d`"):
        ln.damped_inverse(bad, damping=1.0)
    with pytest.raises(ValueError, match="damping"):
        ln.damped_inverse(ln.LowRankPSD(U, d), damping=0.0)
    with pytest.raises(ValueError, match="tail"):
        ln.damped_inverse(ln.LowRankPSD(U, d), damping=1.0, tail=-1.0)
    with pytest.raises(TypeError, match="LowRankPSD"):
        ln.damped_inverse((U, d), damping=1.0)  # type: ignore[arg-type]
    # validate=False is the caller's promise: the state is not read, the scalars still are
    unchecked = ln.damped_inverse(bad, damping=1.0, validate=False)
    assert np.isnan(unchecked.coeff[1])
    with pytest.raises(ValueError, match="damping"):
        ln.damped_inverse(bad, damping=-1.0, validate=False)
    good = ln.LowRankPSD(U, d)
    with pytest.raises(ValueError, match="tails\\[1\\]"):
        ln.kron_eigenbasis_inverse(good, good, damping=1.0, tails=(0.0, -1.0))
    with pytest.raises(ValueError, match="shift\\[0\\]"):
        ln.kron_eigenbasis_inverse(good, good, damping=1.0, shift=(-1.0, 0.0))
    with pytest.raises(ValueError, match=r"`G\.d`"):
        ln.kron_eigenbasis_inverse(bad, good, damping=1.0)
    with pytest.raises(TypeError, match="share a dtype"):
        ln.kron_eigenbasis_inverse(
            good, ln.LowRankPSD(U.astype(np.float32), d.astype(np.float32)), damping=1.0
        )
