"""The dask benchmark runs end to end on a 2-worker LocalCluster (quick mode)."""

from __future__ import annotations

import pytest

pytest.importorskip("dask.array", reason="dask is not installed (the `dask` extra)")
pytest.importorskip("distributed", reason="dask.distributed is not installed")


def test_quick_dask_benchmark_run(run_quick) -> None:
    payload, table = run_quick("nla_dask")
    runs = {(r["method"], r["q"], r["oversample"]): r for r in payload["runs"]}
    ours = {("lowrank_nla", q, p) for q, p in ((0, 10), (0, 20), (1, 10), (2, 10))}
    assert set(runs) == ours | {("svd_compressed", q, 10) for q in (0, 1)}
    seeds = payload["config"]["seeds"]
    assert seeds == [0, 1]
    for (method, q, _), r in runs.items():
        # exact errors, one per seed: never below the optimal rank-k error
        assert len(r["errors"]) == len(seeds)
        assert min(r["errors"]) >= payload["optimal_error"] * (1 - 1e-6)
        assert r["error"] == pytest.approx(sum(r["errors"]) / len(seeds))
        assert r["peak_worker_mib"] > 0
        assert len(r["cpu_times"]) == len(seeds)
        assert r["cpu_seconds"] > 0
        if method == "lowrank_nla":
            # the documented pass count, counted on the workers, in every round
            assert r["all_passes"] == [q + 1] * len(seeds)
        else:
            assert min(r["all_passes"]) >= 2 * q + 2
    for c in payload["comparison"]:
        # the pairing is accuracy first: our run is at least as accurate as the peer's
        if c["ours_q"] is not None:
            assert c["ours_error"] <= c["peer_error"]
            assert c["ours_passes"] == c["ours_q"] + 1
            ours = runs[("lowrank_nla", c["ours_q"], c["ours_oversample"])]
            peer = runs[("svd_compressed", c["peer_q"], c["peer_oversample"])]
            assert c["ratio"] == pytest.approx(ours["cpu_seconds"] / peer["cpu_seconds"])
    # the error study on the factor reproduces the measured errors of the same seeds
    assert len(payload["draws"]) == len(runs)
    for d in payload["draws"]:
        assert d["draws"] == 10
        assert d["max_deviation"] < 1e-4
        assert d["min"] <= d["mean"] <= d["max"]
    expected = {(d["method"], d["q"], d["oversample"]): d["mean"] for d in payload["draws"]}
    for c in payload["comparison_by_draws"]:
        if c["ours_q"] is not None:
            assert c["ours_error"] == expected[("lowrank_nla", c["ours_q"], c["ours_oversample"])]
            assert c["ours_error"] <= c["peer_error"]
    assert "| lowrank_nla | 0 | 20 |" in table
