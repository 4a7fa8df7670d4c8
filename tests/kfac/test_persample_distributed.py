"""FNGD and SENG under torch.distributed: real processes (gloo on loopback, float64) whose
runs must equal one process on the concatenated batch, stored coefficients and checkpoints
included (the scenarios are in ``tests/kfac/distributed_workers.py``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from . import distributed_workers as W
from .test_distributed import _same, ok, spawn

pytestmark = pytest.mark.distributed

#: Four epochs of two global batches: FNGD computes in the first and reuses afterwards.
STEPS = 8
#: Relative tolerance: float64 rounding (the processes sum the gradients and Grams in another
#: order) amplified over 8 steps by the conditioning of the damped n x n solves.
TOL = 1e-8


@pytest.fixture(scope="module")
def world2(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    tmp: Path = tmp_path_factory.mktemp("persample")
    return spawn(tmp, 2, [("persample", (STEPS,)), ("persample_refusals", (0,))])


def _reference(name: str) -> tuple[torch.Tensor, Any]:
    torch.set_num_threads(1)
    net, opt = W.persample_setup(name, distributed=False)
    W.persample_train(name, net, opt, 0, STEPS)
    return W.flat(net), opt


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("name", list(W.PERSAMPLE))
def test_world_size_2_equals_one_process_on_the_concatenated_batch(
    name: str, world2: list[dict[str, Any]]
) -> None:
    records = ok(world2, "persample")
    ref, opt = _reference(name)
    start = W.flat(W.conv_model() if W.PERSAMPLE[name][1] else W.model())
    assert _rel(ref, start) > 1e-2  # the run moved
    for rank, record in enumerate(records):
        err = _rel(record[name]["params"], ref)
        assert err <= TOL, f"{name}, rank {rank}: {err:.2e}"
        assert record[name]["bytes"]["statistics"] > 0  # the rows were gathered
    # the same work: computed and reused steps (FNGD), refreshes (SENG)
    assert world2[0]["persample"]["ok"][name]["diagnostics"] == opt.preconditioner.diagnostics()
    if name.startswith("fngd") and W.PERSAMPLE[name][2]["store"] != "none":
        rows = opt.preconditioner.diagnostics()
        assert all(row["reused"] == STEPS - 2 for row in rows)  # epochs 2-4 reuse


@pytest.mark.parametrize("name", ["fngd-index", "fngd-shared"])
def test_coefficients_are_keyed_by_the_global_indices(
    name: str, world2: list[dict[str, Any]]
) -> None:
    """Both ranks store the coefficients of all 24 dataset indices, equal to one process's."""
    _, opt = _reference(name)
    expected = opt.preconditioner.state_dict()["block"]["stores"]
    for record in ok(world2, "persample"):
        stores = record[name]["final_state"]["kfac"]["block"]["stores"]
        assert stores.keys() == expected.keys()
        for key, store in stores.items():
            assert int(store["filled"].sum()) == W.PERSAMPLE_N
            torch.testing.assert_close(store["table"], expected[key]["table"], rtol=TOL, atol=0)


@pytest.mark.parametrize("name", list(W.PERSAMPLE))
def test_state_saved_at_world_size_2_continues_in_one_process(
    name: str, world2: list[dict[str, Any]]
) -> None:
    records = ok(world2, "persample")
    assert _same(records[0][name]["state"], records[1][name]["state"])  # full state on both
    net, opt = W.persample_setup(name, distributed=False)
    net.load_state_dict(records[0][name]["model"])
    opt.load_state_dict(records[0][name]["state"])
    W.persample_train(name, net, opt, STEPS // 2, STEPS)
    err = _rel(W.flat(net), records[0][name]["params"])
    assert err <= TOL, f"{name} resumed in one process: {err:.2e}"


def test_refusals_under_a_process_group(world2: list[dict[str, Any]]) -> None:
    record = ok(world2, "persample_refusals")[0]
    assert "Invalid statistics: 'local'" in record["local"]
    assert record["weighted_step"] == "rows"  # the default under a process group
    assert "Invalid weighted_step: 'rows'; loss weights need" in record["loss_weights"]
    assert "'loss' is not supported under torch.distributed" in record["explicit_loss"]
