"""The K-FAC benchmarks run end to end (quick mode) and their records are consistent."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.mark.slow
def test_quick_scaling_benchmark(run_quick) -> None:
    payload, table = run_quick("kfac_scaling")
    rows = payload["rows"]
    assert [r["D"] for r in rows] == [64, 128]
    for r in rows:
        # accuracy first: the randomized representations are near the optimal rank-r error
        for name in ("rsvd", "srevd"):
            assert r["optimal_error"] * (1 - 1e-4) <= r["errors"][name] <= 1.5 * r["optimal_error"]
        assert abs(r["errors"]["eigh"] - r["optimal_error"]) <= 1e-3 * r["optimal_error"]
        assert set(r["seconds"]) == {
            "eigh", "rsvd", "srevd", "brand", "apply-eigh", "apply-lowrank", "apply-factored"
        }  # fmt: skip
        assert all(t > 0 for t in r["seconds"].values())
        assert r["memory_bytes"]["Brand only"] < r["memory_bytes"]["dense EA + rank r"]
    assert set(payload["fits"]) == set(rows[0]["seconds"])
    assert "fitted exponent" in table


@pytest.mark.slow
def test_quick_time_to_target_benchmark(run_quick, tmp_path) -> None:
    payload, table = run_quick("kfac_time_to_target")
    summary = payload["summary"]
    assert set(summary) == {"autoencoder", "cnn", "transformer"}
    for task, rows in summary.items():
        assert list(rows) == [
            "sgd", "adam", "adamw", "kfac", "rkfac", "srekfac", "bkfac", "brkfac", "bckfac",
            "brckfac", "bkfac-batch-clock",
        ]  # fmt: skip
        for name, row in rows.items():
            assert row["time_per_epoch"] > 0, (task, name)
            assert row["reached"] == "1/1", (task, name)  # the quick targets are easy
        assert f"## {task}" in table
    assert (tmp_path / "autoencoder_time_to_target_quick.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.slow
def test_quick_mbf_benchmark(run_quick) -> None:
    payload, table = run_quick("kfac_mbf")
    summary = payload["summary"]
    assert set(summary) == {"autoencoder-w1", "autoencoder-w2", "cnn"}
    expected = ["adam", "kfac", "bkfac-batch-clock", "mbf"]
    for task, rows in summary.items():
        assert list(rows)[:4] == expected
        assert set(rows) - set(expected) <= {"shampoo"}
        for name, row in rows.items():
            assert row["time_per_step"] > 0, (task, name)
            assert row["reached"] == "1/1", (task, name)  # the quick targets are easy
        assert f"## {task}" in table
        for layer in payload["memory"][task]:
            assert layer["mbf"] > 0
            assert layer["kfac"] > 0
    assert "Shampoo" in payload["meta"]["note"]


@pytest.mark.slow
def test_quick_mbf_interleaved_timing(tmp_path) -> None:
    import json
    import os
    import subprocess
    import sys

    from .conftest import SCRIPTS

    subprocess.run(
        [sys.executable, str(SCRIPTS / "kfac_mbf.py"), "--quick", "--timing", "--tasks", "cnn",
         "--out", str(tmp_path)],
        check=True, capture_output=True, text=True,
        env={**os.environ, "OPENBLAS_THREAD_TIMEOUT": "4"},
    )  # fmt: skip
    times = json.loads((tmp_path / "kfac_mbf_timing_quick.json").read_text())["times"]
    assert set(times) == {"cnn"}
    assert {"adam", "mbf", "kfac"} <= set(times["cnn"])
    assert all(row["time_per_step"] > 0 for row in times["cnn"].values())
    assert times["cnn"]["adam"]["ratio"] == 1.0
    assert "| cnn |" in (tmp_path / "kfac_mbf_timing_quick.md").read_text()


@pytest.mark.slow
def test_quick_kld_wrm_benchmark(run_quick) -> None:
    payload, table = run_quick("kfac_kld_wrm")
    summary = payload["summary"]
    names = ["kfac", "kfac-rho0.33", "so-kld-wrm", "q-kld-wrm", "qe-kld-wrm"]
    assert list(payload["curves"]) == names
    for name in names:
        assert summary[name]["time_per_epoch"] > 0, name
        assert len(payload["runs"][name]) == 1
        assert payload["runs"][name][0]["steps"] == 3
    assert summary["kfac"]["time_ratio_to_kfac"] == 1.0
    assert "## Accuracy against epochs" in table
    assert "## Cost and accuracy against time" in table
    assert set(payload["cpu_per_step"]) == set(names)


@pytest.mark.slow
def test_quick_fngd_benchmark(run_quick) -> None:
    payload, table = run_quick("kfac_fngd")
    summary = payload["summary"]
    assert set(summary) == {"cnn", "autoencoder"}
    for task, rows in summary.items():
        expected = {"sgd", "adam", "kfac", "bkfac-batch-clock", "fngd", "fngd-shared",
                    "fngd-shared-rows", "fngd-recompute", "fngd-recompute-1e-3",
                    "fngd-3-epochs", "seng", "seng-unbiased"}  # fmt: skip
        assert expected <= set(rows) <= expected | {"shampoo"}
        for name, row in rows.items():
            assert row["time_per_step"] > 0, (task, name)
            assert row["time_per_step_after_epoch_1"] > 0, (task, name)
            assert row["reached"] == "1/1", (task, name)  # the quick targets are easy
        assert f"## {task}" in table
    assert "shampoo" not in summary["autoencoder"]
    assert "Shampoo" in payload["meta"]["note"]


@pytest.mark.slow
def test_quick_fngd_staleness(run_quick) -> None:
    payload, table = run_quick("kfac_fngd_staleness")
    results = payload["results"]
    assert set(results) == {"0.1", "0.003"}
    for per_epoch in results.values():
        assert list(per_epoch) == ["2"]  # epochs after the first
        for row in per_epoch["2"].values():
            assert set(row) == {"alpha", "direction", "gradient"}
            assert all(-1.0 - 1e-6 <= v <= 1.0 + 1e-6 for v in row.values())
    assert "## relative damping 0.1" in table


@pytest.mark.slow
def test_quick_fngd_interleaved_timing(tmp_path) -> None:
    import json
    import os
    import subprocess
    import sys

    from .conftest import SCRIPTS

    subprocess.run(
        [sys.executable, str(SCRIPTS / "kfac_fngd.py"), "--quick", "--timing", "--tasks", "cnn",
         "--optimizers", "sgd", "fngd", "fngd-shared", "seng", "--out", str(tmp_path)],
        check=True, capture_output=True, text=True,
        env={**os.environ, "OPENBLAS_THREAD_TIMEOUT": "4"},
    )  # fmt: skip
    times = json.loads((tmp_path / "kfac_fngd_timing_quick.json").read_text())["times"]
    assert set(times["cnn"]) == {"sgd", "fngd", "fngd-shared", "seng"}
    assert all(t > 0 for t in times["cnn"].values())


@pytest.mark.slow
def test_quick_defaults_benchmark(run_quick) -> None:
    payload, table = run_quick("kfac_defaults")
    rows = payload["results"]["mlp"]
    assert list(rows) == [
        "sgd (momentum 0.9)", "adam", "KFAC(model, lr) defaults", "KFAC, thesis preset",
        "KFAC, command-line settings", "K-FAC, quadratic step + adaptive damping",
        "B-KFAC rank 64, quadratic step + adaptive damping",
    ]  # fmt: skip
    for name, row in rows.items():
        assert len(row["losses"]) == 3, name
        assert row["best"] == min(row["losses"].values()), name
    # the documented grid for the defaults (docs/kfac.md, *Defaults, by measurement*)
    assert list(rows["KFAC(model, lr) defaults"]["losses"]) == ["0.1", "1.0", "10.0"]
    assert "| mlp (width 0.1) |" in table
    ours, sgd, adam = (
        rows[n]["best"] for n in ("KFAC(model, lr) defaults", "sgd (momentum 0.9)", "adam")
    )
    assert f"| {ours / sgd:.3g}, {ours / adam:.3g}: " in table  # the criterion column


@pytest.mark.slow
def test_quick_defaults_search_options(tmp_path) -> None:
    """--config adds a configuration with its grid (a {"start", "scale", "power"} value is an
    InverseDecay schedule), --only runs just it (and the named ones), --grid replaces a
    grid, --trace keeps the loss curve and the KL clip's scale, --per-lr lists every run."""
    import json
    import subprocess
    import sys

    script = Path(__file__).parents[2] / "benchmarks" / "kfac_defaults.py"
    spec = (
        '{"damping": 0.01, "kl_clip": {"start": 0.01, "scale": 1, "power": 2}, '
        '"lr_grid": [0.01, 0.02, 0.05]}'
    )
    subprocess.run(
        [sys.executable, str(script), "--quick", "--out", str(tmp_path), "--only", "adam",
         "--trace", "--per-lr", "--seed", "3", "--config", f"mine={spec}",
         "--grid", "adam=0.001"],
        check=True, capture_output=True, text=True, env=_env(),
    )  # fmt: skip
    payload = json.loads((tmp_path / "kfac_defaults_quick.json").read_text())
    assert payload["seed"] == 3
    assert payload["configs"] == {"mine": spec}
    assert list(payload["results"]["mlp"]) == ["adam", "mine"]
    assert list(payload["results"]["mlp"]["adam"]["losses"]) == ["0.001"]
    row = payload["results"]["mlp"]["mine"]
    assert list(row["losses"]) == ["0.01", "0.02", "0.05"]
    assert set(row["last5"]) == set(row["losses"])
    table = (tmp_path / "kfac_defaults_quick.md").read_text()
    assert "(0.001, one value)" in table
    assert "| mlp | mine | 0.01: " in table
    assert f"- mine: `{spec}`" in table
    trace = row["trace"]["0.02"]
    assert len(trace["loss"]) == 2  # before training and after the one epoch
    assert trace["loss"][-1] == row["losses"]["0.02"]
    assert len(trace["clip_median"]) == 1  # 256 samples: one epoch of two steps
    assert 0 < trace["clip_min"][0] <= trace["clip_median"][0] <= 1
    bad = subprocess.run(
        [sys.executable, str(script), "--quick", "--out", str(tmp_path), "--config", "mine"],
        capture_output=True, text=True, env=_env(),
    )  # fmt: skip
    assert bad.returncode == 2
    assert "expected NAME=JSON" in bad.stderr
    bad = subprocess.run(
        [sys.executable, str(script), "--quick", "--out", str(tmp_path), "--only",
         "--config", 'mine={"kl_clip": {"start": 0.01, "decay": 2}}'],
        capture_output=True, text=True, env=_env(),
    )  # fmt: skip
    assert bad.returncode != 0
    assert "unknown keys ['decay']" in bad.stderr
    bad = subprocess.run(
        [sys.executable, str(script), "--quick", "--out", str(tmp_path), "--grid", "nadam=1"],
        capture_output=True, text=True, env=_env(),
    )  # fmt: skip
    assert bad.returncode == 2
    assert "--grid 'nadam=1': expected NAME=LR" in bad.stderr


def _env() -> dict[str, str]:
    from .conftest import checkout_env

    return checkout_env(OMP_NUM_THREADS="1")


@pytest.mark.slow
def test_quick_peers_table(tmp_path) -> None:
    """The peers mode of kfac_time_to_target.py: grids, levels, equal time budgets."""
    import json
    import subprocess
    import sys

    from .conftest import SCRIPTS

    pytest.importorskip("pytorch_optimizer")
    subprocess.run(
        [sys.executable, str(SCRIPTS / "kfac_time_to_target.py"), "--peers", "--quick",
         "--optimizers", "adam", "muon", "kfac", "kfac-noclip",
         "--config", 'kfac-noclip={"optimizer": "kfac", "kl_clip": null}',
         "--grid", "muon=0.01,0.02", "--out", str(tmp_path)],
        check=True, capture_output=True, text=True,
        env=_env(),
    )  # fmt: skip
    payload = json.loads((tmp_path / "kfac_peers_quick.json").read_text())
    assert set(payload["results"]) == {"autoencoder-w1", "cnn"}
    assert payload["meta"]["configs"]["kfac-noclip"] == ["kfac", {"kl_clip": None}]
    assert payload["meta"]["grids"]["muon"] == [0.01, 0.02]
    for task, res in payload["results"].items():
        assert set(res["best"]) == {"adam", "muon", "kfac", "kfac-noclip"}, task
        assert set(res["grid"]["muon"]) == {"0.01", "0.02"}
        best_muon = min(res["grid"]["muon"].values(), key=lambda row: row["final_loss"])
        assert res["best"]["muon"]["final_loss"] == best_muon["final_loss"]
        for name, row in res["best"].items():
            assert len(row["level_times"]) == len(res["levels"])
            assert row["cpu_ms_per_step"] > 0
            # every run stops at the first step past the budget (equal time)
            assert res["budget"] <= row["seconds"] <= res["budget"] + 3 * row["cpu_ms_per_step"]
            run = res["runs"][name][row["lr"]][0]
            assert run["time"][-1] == run["wall_time"]  # the final loss is evaluated there
    runs = payload["results"]["cnn"]["runs"]  # the clip binds on the CNN's first steps
    assert runs["kfac-noclip"]["0.3"][0]["train_loss"] != runs["kfac"]["0.3"][0]["train_loss"]
    table = (tmp_path / "kfac_peers_quick.md").read_text()
    assert "## autoencoder-w1" in table
    assert "| muon |" in table
    # tasks run in separate processes merge into one table
    subprocess.run(
        [sys.executable, str(SCRIPTS / "kfac_time_to_target.py"), "--merge", "kfac_peers_quick",
         "--stem", "merged", "--out", str(tmp_path)],
        check=True, capture_output=True, text=True, env=_env(),
    )  # fmt: skip
    merged = json.loads((tmp_path / "merged.json").read_text())
    assert merged["results"] == payload["results"]
    assert merged["meta"]["merged"] == ["kfac_peers_quick"]


@pytest.mark.slow
def test_quick_asdl_benchmark(tmp_path) -> None:
    import json
    import subprocess
    import sys

    from .conftest import SCRIPTS

    env = _env()
    script = str(SCRIPTS / "kfac_asdl.py")
    # without ASDL: a clear message and nothing written
    absent = (
        "import runpy, sys; sys.modules['asdl'] = None; "
        f"sys.argv = [{script!r}, '--quick', '--out', {str(tmp_path)!r}]; "
        f"runpy.run_path({script!r}, run_name='__main__')"
    )
    proc = subprocess.run(
        [sys.executable, "-c", absent], capture_output=True, text=True, env=env, check=True
    )
    assert "ASDL is not installed (pip install --no-deps asdfghjkl)" in proc.stderr
    assert not (tmp_path / "kfac_asdl_quick.json").exists()
    pytest.importorskip("asdl")
    subprocess.run(
        [sys.executable, script, "--quick", "--out", str(tmp_path)],
        check=True, capture_output=True, text=True, env=env,
    )  # fmt: skip
    payload = json.loads((tmp_path / "kfac_asdl_quick.json").read_text())
    summary = payload["summary"]
    assert list(summary) == ["kfac", "kfac-pi-noclip", "kfac-dense", "kfac-before", "asdl"]
    for name, row in summary.items():
        assert row["cpu_ms_per_step"] > 0, name
        assert len(payload["cpu"][name]) == 3
    # the three hot paths compute the same directions: the same loss after 30 steps
    for name in ("kfac-dense", "kfac-before"):
        assert abs(summary[name]["train_loss"] - summary["kfac"]["train_loss"]) <= 1e-4
    assert "| asdl |" in (tmp_path / "kfac_asdl_quick.md").read_text()


@pytest.mark.slow
@pytest.mark.distributed
def test_quick_distributed_benchmark(run_quick) -> None:
    payload, table = run_quick("kfac_distributed")
    strategies = payload["strategies"]
    assert set(strategies) == {"eigh", "rsvd", "brand"}
    for name, entry in strategies.items():
        # accuracy first: world size 2 computes what world size 1 computes
        for world in ("2", "2o"):
            assert entry[world]["max_relative_parameter_difference_to_world_1"] < 1e-4, name
        assert entry["bytes_per_step"]["representations"] > 0
        assert entry["1"]["cpu_per_step"] > 0
    for name in ("rsvd", "brand"):  # a rank-r representation is r/D of a dense one
        assert strategies[name]["per_factor_ratio_over_r_by_D"] <= 1.1
        assert strategies[name]["representation_ratio_to_eigh"] < 0.5
    for simulation in payload["simulation"].values():
        assert set(simulation["strategies"]) == {"eigh", "rsvd", "brand"}
    assert "## Simulated curvature time per step" in table
