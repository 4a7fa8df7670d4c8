"""The decomposition benchmark runs end to end (quick mode) and its records are consistent."""

from __future__ import annotations

import pytest


@pytest.mark.slow
def test_quick_benchmark_run(run_quick) -> None:
    payload, table = run_quick("nla_decompositions")
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
    main, krylov = table.split("Block Krylov (")
    assert main.count("\n| EA factor (PSD) |") == 4
    assert krylov.count("\n| EA factor (PSD) |") == 4  # block Krylov's best per row
    for r in rows:
        # block Krylov is in the search; what it reaches is at least as accurate as the peer
        for c in r["candidates"]:
            if "block_krylov" in c["method"]:
                assert c["error"] <= r["peer_error"]
                assert "normalizer=none" not in c["method"]


@pytest.mark.slow
def test_partial_run_merges_into_the_record(tmp_path) -> None:
    import json
    import subprocess
    import sys

    from .conftest import SCRIPTS, checkout_env

    def run(*args: str) -> None:
        subprocess.run(
            [sys.executable, str(SCRIPTS / "nla_decompositions.py"), "--quick", *args],
            check=True,
            capture_output=True,
            text=True,
            env=checkout_env(OMP_NUM_THREADS="1"),
        )

    run("--out", str(tmp_path))
    first = json.loads((tmp_path / "nla_decompositions_quick.json").read_text())
    assert [r["id"] for r in first["runs"]] == [1]
    assert first["runs"][0]["clock"] == "wall"
    run("--out", str(tmp_path), "--only", "dense", "--merge", "--clock", "cpu")
    payload = json.loads((tmp_path / "nla_decompositions_quick.json").read_text())
    table = (tmp_path / "nla_decompositions_quick.md").read_text()
    assert [r["id"] for r in payload["runs"]] == [1, 2]
    assert payload["runs"][1]["clock"] == "cpu"
    assert "dense, slow decay" in payload["runs"][1]["what"]
    # same rows in the same order; the dense ones are the new run's, the PSD ones kept
    assert [(r["case"], r["dtype"], r["peer"]) for r in payload["rows"]] == [
        (r["case"], r["dtype"], r["peer"]) for r in first["rows"]
    ]
    for new, old in zip(payload["rows"], first["rows"], strict=True):
        if new["case"].startswith("dense"):
            assert new["run"] == 2
        else:
            assert new["run"] == 1
            assert new == {**old, "run": 1}
    assert "rows from several runs" in table
    assert "| ratio | run |" in table
    assert "cpu clock" in table
