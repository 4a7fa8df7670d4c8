"""Run a benchmark script in quick mode and load its JSON record."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

SCRIPTS = Path(__file__).resolve().parents[2] / "benchmarks"


def checkout_env(**extra: str) -> dict[str, str]:
    """The environment of a benchmark subprocess: this checkout's packages first on the path
    (not an installed copy's), BLAS threads that do not spin."""
    path = os.pathsep.join(p for p in (str(SCRIPTS.parent), os.environ.get("PYTHONPATH")) if p)
    return {**os.environ, "OPENBLAS_THREAD_TIMEOUT": "4", "PYTHONPATH": path, **extra}


@pytest.fixture
def run_quick(tmp_path: Path) -> Callable[[str], tuple[dict[str, Any], str]]:
    """``run_quick("nla_updates")`` -> (JSON payload, markdown table) of a ``--quick`` run."""

    def run(stem: str) -> tuple[dict[str, Any], str]:
        env = checkout_env()
        subprocess.run(
            [sys.executable, str(SCRIPTS / f"{stem}.py"), "--quick", "--out", str(tmp_path)],
            check=True,
            capture_output=True,
            text=True,
            env=env,
        )
        payload = json.loads((tmp_path / f"{stem}_quick.json").read_text())
        return payload, (tmp_path / f"{stem}_quick.md").read_text()

    return run
