"""The dask benchmark runs end to end on a 2-worker LocalCluster (quick mode)."""

from __future__ import annotations

import pytest

pytest.importorskip("dask.array", reason="dask is not installed (the `dask` extra)")
pytest.importorskip("distributed", reason="dask.distributed is not installed")


def test_quick_dask_benchmark_run(run_quick) -> None:
    payload, table = run_quick("nla_dask")
    runs = {(r["method"], r["q"]): r for r in payload["runs"]}
    expected = {(m, q) for m in ("lowrank_nla", "svd_compressed") for q in (0, 1)}
    assert set(runs) == expected | {("lowrank_nla", 2)}  # ours one q further
    for (method, q), r in runs.items():
        # exact errors: never below the optimal rank-k error
        assert r["error"] >= payload["optimal_error"] * (1 - 1e-6)
        assert r["peak_worker_mib"] > 0
        if method == "lowrank_nla":
            assert r["passes"] == q + 1  # the documented pass count, counted on the workers
        else:
            assert r["passes"] >= 2 * q + 2
    for c in payload["comparison"]:
        # the pairing is accuracy first: our run is at least as accurate as the peer's
        if c["ours_q"] is not None:
            assert c["ours_error"] <= c["peer_error"]
            assert c["ours_passes"] == c["ours_q"] + 1
    assert "| lowrank_nla | 0 |" in table
