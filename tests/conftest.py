"""Shared fixtures: the backend matrix and the hypothesis profiles."""

from __future__ import annotations

import os

import pytest
from hypothesis import HealthCheck, settings

from lowrank_nla.testing import Backend, available_backends

# Derandomized by default so CI is reproducible; `HYPOTHESIS_PROFILE=explore` searches more.
settings.register_profile(
    "default",
    max_examples=25,
    derandomize=True,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile("explore", max_examples=500, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))


def _gpu_available(backend: Backend) -> bool:
    if backend.name.startswith("torch"):
        import torch

        return bool(torch.cuda.is_available())
    if backend.name.startswith("cupy"):
        import cupy

        try:
            return bool(cupy.cuda.is_available())
        except Exception:  # CuPy without a driver raises on the query itself.
            return False
    return False


def _params() -> list:
    params = []
    for b in available_backends():
        marks = [pytest.mark.gpu] if b.needs_gpu else []
        params.append(pytest.param(b, id=b.name, marks=marks))
    return params


@pytest.fixture(params=_params())
def backend(request: pytest.FixtureRequest) -> Backend:
    """Every cell of the backend matrix; GPU cells skip cleanly without CUDA."""
    b: Backend = request.param
    if b.needs_gpu and not _gpu_available(b):
        pytest.skip(f"{b.name}: no CUDA device")
    return b
