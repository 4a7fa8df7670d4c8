"""The online-update benchmark runs end to end (quick mode) and its records are consistent."""

from __future__ import annotations

import pytest


@pytest.mark.slow
def test_quick_updates_benchmark(run_quick) -> None:
    payload, table = run_quick("nla_updates")
    assert {(r["D"], r["dtype"]) for r in payload["rows"]} == {
        (D, t) for D in (256, 512) for t in ("float64", "float32")
    }
    for r in payload["rows"]:
        e = r["errors"]
        for name in ("brand (100 updates)", "randomized_eigh", "srevd"):
            # nobody beats the optimal rank-200 error; the low-rank methods stay within 2x
            assert e["optimal"] * (1 - 1e-6) <= e[name] <= 2 * e["optimal"], name
        tol = 1e-9 if r["dtype"] == "float64" else 1e-3
        assert r["inverse_apply_agreement"] <= tol
        assert all(t > 0 for t in r["times"].values())
    assert "Fitted growth exponents" in table
    # two sizes in the timing table, one fit row, two sizes in the inverse-application table
    assert table.count("| float64 |") == 5
