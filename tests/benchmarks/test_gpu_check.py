"""The one-command GPU check: skips cleanly without CUDA; every part runs as a CPU dry run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "gpu_check.py"
PARTS = ("tests", "nla_decompositions", "nla_updates", "kfac_scaling")


def _run(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OPENBLAS_THREAD_TIMEOUT": "4", "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args], capture_output=True, text=True, env=env, check=True
    )


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is present: runs for real")
def test_without_cuda_every_part_is_skipped_and_nothing_written(tmp_path: Path) -> None:
    out = _run("--out", str(tmp_path))
    for part in PARTS:
        assert f"gpu_check: {part}: SKIPPED, no CUDA device" in out.stdout
    assert "nothing run, nothing written" in out.stdout
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_cpu_dry_run_of_every_part(tmp_path: Path) -> None:
    out = _run("--device", "cpu", "--quick", "--out", str(tmp_path))
    for part in PARTS:
        assert f"gpu_check: {part} done" in out.stdout
        table = (tmp_path / f"gpu_{part}.md").read_text()
        assert table.startswith("# ")
        json.loads((tmp_path / f"gpu_{part}.json").read_text())
    tests = json.loads((tmp_path / "gpu_tests.json").read_text())
    assert tests["returncode"] == 0
    assert tests["counts"].get("failed", 0) == 0
    if not torch.cuda.is_available():  # the gpu-marked tests skip themselves on the CPU
        assert tests["counts"]["skipped"] >= 1
        assert "passed" not in tests["counts"]
    rows = json.loads((tmp_path / "gpu_nla_decompositions.json").read_text())["rows"]
    assert {r["case"] for r in rows} == {"EA factor (PSD)", "dense, slow decay"}
    for r in rows:
        # accuracy before time: every timed configuration of ours reaches the peer's error
        timed = [name for name in r["times"] if name in r["errors"]]
        assert all(r["errors"][name] <= r["peer_error"] for name in timed)
        assert r["peer_error"] >= r["optimal_error"] * (1 - 1e-6)
    updates = json.loads((tmp_path / "gpu_nla_updates.json").read_text())["rows"]
    for r in updates:
        assert r["agreement"] < (1e-3 if r["dtype"] == "float32" else 1e-10)
        assert r["errors"]["randomized_eigh"] >= r["errors"]["optimal"] * (1 - 1e-6)
    assert not (tmp_path / "_kfac_scaling_tmp").exists()
