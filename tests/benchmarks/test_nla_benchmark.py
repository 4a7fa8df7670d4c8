"""The decomposition benchmark runs end to end (quick mode) and its records are consistent."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "nla_decompositions.py"


@pytest.mark.slow
def test_quick_benchmark_run(tmp_path: Path) -> None:
    env = {**os.environ, "OPENBLAS_THREAD_TIMEOUT": "4"}
    subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", "--out", str(tmp_path)],
        check=True,
        capture_output=True,
        text=True,
        env=env,
    )
    payload = json.loads((tmp_path / "nla_decompositions_quick.json").read_text())
    rows = payload["rows"]
    assert {r["peer"] for r in rows} == {"sklearn.randomized_svd", "torch.svd_lowrank"}
    for r in rows:
        # no method beats the optimal rank-k error (up to the Lanczos estimate's rounding)
        assert r["peer_error"] >= r["optimal_error"] * (1 - 1e-6)
        if r["ours"] is not None:
            assert r["optimal_error"] * (1 - 1e-6) <= r["ours_error"] <= r["peer_error"]
            assert r["ratio"] == pytest.approx(r["ours_time"] / r["peer_time"])
        for name, err in r["exact_errors"].items():
            assert err == pytest.approx(r["optimal_error"], rel=1e-6), name
    table = (tmp_path / "nla_decompositions_quick.md").read_text()
    assert table.count("\n| EA factor (PSD) |") == 4
