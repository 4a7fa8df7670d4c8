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
