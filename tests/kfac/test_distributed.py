"""Distributed execution with real processes: gloo on loopback, float64, one thread each.

The scenarios run in ``tests/kfac/distributed_workers.py``; here they are spawned and their
records checked against one process on the concatenated batch.
"""

from __future__ import annotations

import math
import re
import time
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.multiprocessing as mp
from torch.nn import functional as F

import kfac
from kfac.distributed import assign_owners

from . import distributed_workers as W

pytestmark = pytest.mark.distributed

STEPS = 20
QUADRATIC_STEPS = 8


def spawn(tmp: Path, world: int, jobs: list[tuple[str, tuple]]) -> list[dict[str, Any]]:
    """Run the scenarios ``jobs`` on ``world`` processes; every process's records."""
    out = tmp / f"world-{world}-{'-'.join(name for name, _ in jobs)}"
    out.mkdir()
    mp.spawn(W.worker, args=(world, str(out / "store"), str(out), jobs), nprocs=world, join=True)
    return [torch.load(out / f"{rank}.pt", weights_only=False) for rank in range(world)]


def ok(records: list[dict[str, Any]], name: str) -> list[dict[str, Any]]:
    """The records of scenario ``name`` on every rank (failing on a recorded error)."""
    for rank, record in enumerate(records):
        assert "error" not in record[name], f"{name}, rank {rank}: {record[name].get('trace')}"
    return [record[name]["ok"] for record in records]


CHECKPOINT_STEPS = 6


@pytest.fixture(scope="module")
def tmp(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("distributed")


@pytest.fixture(scope="module")
def world2(tmp: Path) -> list[dict[str, Any]]:
    """Every scenario at world size 2, in one set of processes (start-up costs seconds)."""
    jobs = [
        ("equality", (STEPS,)),
        ("ddp", (STEPS,)),
        ("local", (1,)),
        ("nonfinite", (3,)),
        ("checkpoint", (CHECKPOINT_STEPS,)),
        ("quadratic", (QUADRATIC_STEPS,)),
        ("unused_layer", (4,)),
        ("schemes", (6,)),
        ("ddp_no_sync", (3,)),
        ("rank_dependent_branch", (1,)),  # last: it ends its step with an error
    ]
    return spawn(tmp, 2, jobs)


@pytest.fixture(scope="module")
def checkpoint(tmp: Path, world2: list[dict[str, Any]]) -> Path:
    path = tmp / "checkpoint.pt"
    saved = ok(world2, "checkpoint")[0]
    torch.save({k: {"state": v["state"], "model": v["model"]} for k, v in saved.items()}, path)
    return path


@pytest.fixture(scope="module")
def world3(tmp: Path, checkpoint: Path) -> list[dict[str, Any]]:
    jobs = [
        ("equality", (STEPS,)),
        ("owner_directions", (STEPS,)),
        ("resume", (CHECKPOINT_STEPS, str(checkpoint))),
    ]
    return spawn(tmp, 3, jobs)


@pytest.fixture(scope="module")
def references() -> dict[str, torch.Tensor]:
    torch.set_num_threads(1)
    return {inverse: W.reference(inverse, STEPS) for inverse in W.STRATEGIES}


@pytest.mark.parametrize("world", [2, 3])
def test_every_strategy_equals_one_process_on_the_concatenated_batch(
    world: int, request: pytest.FixtureRequest, references: dict[str, torch.Tensor]
) -> None:
    records = ok(request.getfixturevalue(f"world{world}"), "equality")
    start = W.flat(W.model())
    for inverse, ref in references.items():
        assert float((ref - start).norm()) > 1e-2 * float(start.norm())  # the run moved
        for rank, record in enumerate(records):
            mine = record[inverse]
            err = float((mine["params"] - ref).norm() / ref.norm())
            assert err <= 1e-6, f"{inverse} at world size {world}, rank {rank}: {err:.2e}"
            # and the processes agree bit for bit
            torch.testing.assert_close(
                mine["params"], records[0][inverse]["params"], rtol=0, atol=0
            )
        first = records[0][inverse]
        # one owner per factor, the same on every rank, balanced by the cost model
        owners = first["owners"]
        assert all(record[inverse]["owners"] == owners for record in records)
        assert [owners[p] for p in first["costs"]] == assign_owners(
            list(first["costs"].values()), world
        )
        assert set(owners.values()) == set(range(world))
        # the Brand strategies apply layer '2' from its gathered rows, under data parallelism
        brand = inverse.startswith("brand")
        assert first["applied"]["2"] == ("factored" if brand else "dense")


def test_directions_computed_by_one_process_each_equal_one_process(
    world3: list[dict[str, Any]], references: dict[str, torch.Tensor]
) -> None:
    """``directions="owner"`` at world size 3: the three layers' directions are computed on
    three different processes and broadcast, ``d_G d_A`` numbers per layer and step."""
    records = ok(world3, "owner_directions")
    for inverse in ("eigh", "brand-rsvd-correct"):
        ref = references[inverse]
        for record in records:
            mine = record[inverse]
            assert float((mine["params"] - ref).norm() / ref.norm()) <= 1e-6, inverse
            torch.testing.assert_close(
                mine["params"], records[0][inverse]["params"], rtol=0, atol=0
            )
        owners = records[0][inverse]["direction_owners"]
        assert sorted(owners.values()) == [0, 1, 2]
        # every step has directions (step 0's exchange installs the first representations)
        sizes = {"0": 24 * 11, "2": 24 * 25, "4": 5 * 25}
        assert records[0][inverse]["bytes"]["directions"] == STEPS * sum(sizes.values()) * 8
        # the rows application ran where layer '2''s direction was computed
        if inverse.startswith("brand"):
            assert records[owners["2"]][inverse]["applied"]["2"] == "factored"


def test_exchange_volume_follows_the_representations(world2: list[dict[str, Any]]) -> None:
    """Representation bytes of the first refresh: ``D r + r`` numbers per factor, each
    factor sent once; eigh's full-rank factors travel as their damped inverses, ``D^2``
    numbers (the owner prepares them). The statistics of these Linear layers are their rows,
    gathered (``N (d_A + d_G)`` numbers per layer, fewer than the sums' ``d_A^2 + d_G^2``)."""
    record = ok(world2, "equality")[0]
    dims = {"0A": 11, "0G": 24, "2A": 25, "2G": 24, "4A": 25, "4G": 5}
    eigh = record["eigh"]["first"]["bytes"]
    assert eigh["representations"] == sum(d * d for d in dims.values()) * 8
    assert eigh["statistics"] == W.BATCH * sum(dims.values()) * 8
    assert W.BATCH * sum(dims.values()) < sum(d * d for d in dims.values())
    rsvd = record["rsvd"]["first"]
    # a full-rank factor (rank + oversampling covers the 5-wide one) sends its inverse
    full = [key for key, rank in rsvd["ranks"].items() if rank == dims[key]]
    assert full == ["4G"]
    sent = (
        sum(
            dims[key] * rank + rank if key not in full else rank * rank
            for key, rank in rsvd["ranks"].items()
        )
        * 8
    )
    assert rsvd["bytes"]["representations"] == sent
    assert sent < 0.5 * eigh["representations"]


def test_damping_schemes_and_mixed_statistics_equal_one_process(
    world2: list[dict[str, Any]],
) -> None:
    """eigh on global batches of 24 under three damping schemes, with a new damping value on
    a step without refresh. The factored schemes gather a Linear layer's rows only where
    they are fewer numbers than its sums (layer '2': ``24 (25 + 24) < 25^2 + 24^2``; layers
    '0' and '4' are all-reduced as sums); the eigenbasis scheme takes no rows. A separable
    scheme's owners send each factor's damped inverse (``D^2`` numbers) at both refreshes and
    again for the new damping value; the coupled schemes send ``(U, d)`` at the refreshes."""
    records = ok(world2, "schemes")
    dims = {"0A": 11, "0G": 24, "2A": 25, "2G": 24, "4A": 25, "4G": 5}
    squares = sum(d * d for d in dims.values())
    for scheme in W.SCHEMES:
        ref = records[0][scheme]["reference"]
        for record in records:
            mine = record[scheme]["params"]
            assert float((mine - ref).norm() / ref.norm()) <= 1e-6, scheme
            torch.testing.assert_close(mine, records[0][scheme]["params"], rtol=0, atol=0)
        first, last = records[0][scheme]["bytes"]["first"], records[0][scheme]["bytes"]["last"]
        if scheme == "eigenbasis":
            assert first["statistics"] == squares * 8
        else:
            assert first["statistics"] == ((11**2 + 24**2) + (25**2 + 5**2) + 24 * 49) * 8
        if scheme == "factored-relative":
            assert first["representations"] == squares * 8
            assert last["representations"] == 3 * squares * 8
        else:
            full = sum(d * d + d for d in dims.values())
            assert first["representations"] == full * 8
            assert last["representations"] == 2 * full * 8


def test_ddp_model_equals_one_process(
    world2: list[dict[str, Any]], references: dict[str, torch.Tensor]
) -> None:
    records = ok(world2, "ddp")
    ref = references["brand-rsvd-correct"]
    for record in records:
        assert float((record["params"] - ref).norm() / ref.norm()) <= 1e-6
    assert records[0]["applied"]["module.2"] == "factored"


def test_ddp_gradient_accumulation_with_no_sync_equals_one_process(
    world2: list[dict[str, Any]],
) -> None:
    records = ok(world2, "ddp_no_sync")
    ref = records[0]["reference"]
    for record in records:
        assert float((record["params"] - ref).norm() / ref.norm()) <= 1e-12


def test_a_branch_taken_on_some_processes_only_is_refused(world2: list[dict[str, Any]]) -> None:
    """DDP's ``find_unused_parameters`` allows it; the statistics would differ per process,
    so the step raises on every process, naming the layer, and moves nothing."""
    for record in ok(world2, "rank_dependent_branch"):
        assert record["error"].startswith("the processes recorded layer 'module.extra' (Linear)")
        assert "every process must run the same forwards and backwards" in record["error"]
        assert record["moved"] is False


def test_faults_end_with_errors_within_their_timeouts(tmp: Path) -> None:
    """A mismatched model raises at construction on every rank, naming the difference; a
    rank that raises during training ends the other with an error within the step timeout
    (5 s), never a hang."""
    start = time.monotonic()
    records = spawn(tmp, 2, [("mismatch", (1,)), ("one_raises", (6,))])
    assert time.monotonic() - start < 60
    for record in records:
        error = record["mismatch"]["error"]
        assert error.startswith("ValueError: the processes did not register")
        assert "rank 1 has \"layer '0' (Linear): A 11, G 25" in error
    assert records[1]["one_raises"]["error"] == "RuntimeError: rank 1 stops here"
    assert records[0]["one_raises"]["error"].startswith("RuntimeError: kfac.distributed: the ")
    assert records[0]["one_raises"]["seconds"] < 5.0 + 10.0


@pytest.mark.slow
def test_a_rank_that_stalls_times_the_others_out(tmp: Path) -> None:
    """Rank 1 stops answering for 6 s (alive, not crashed): rank 0's step raises once its
    collective has waited the 2 s timeout, long before rank 1 comes back."""
    records = spawn(tmp, 2, [("one_hangs", (6,))])
    error = records[0]["one_hangs"]["error"]
    assert error.startswith("RuntimeError: kfac.distributed: the ")
    assert "timed out after 2.0 s" in error
    assert "timed out" in error.split("stop?): ", 1)[1].lower()  # the backend's own word
    assert records[0]["one_hangs"]["seconds"] < records[1]["one_hangs"]["seconds"]


def test_state_dict_on_one_rank_only_times_out(tmp: Path) -> None:
    """``state_dict()`` on rank 0 alone (rank 1 alive, elsewhere): rank 0 raises once the
    gather has waited the 2 s step timeout, not the process group's 30 s."""
    records = spawn(tmp, 2, [("state_on_one", (2,))])
    error = records[0]["state_on_one"]["error"]
    assert error.startswith("RuntimeError: kfac.distributed: the state gather on rank 0 of 2")
    assert "timed out after 2.0 s" in error
    assert records[0]["state_on_one"]["seconds"] < records[1]["state_on_one"]["seconds"]
    assert "error" not in records[1]["state_on_one"]


def test_local_statistics_on_a_hand_checked_case(world2: list[dict[str, Any]]) -> None:
    """Each factor's owner keeps it from its own shard only: ``(1 - rho) a^T a / n`` of its
    6 rows; the other rank keeps nothing and applies the damped inverse the owner prepared
    from its eigendecomposition and broadcast."""
    local = ok(world2, "local")
    x, _ = W.data(1)[0]
    rho = 0.95
    owner = local[0]["owners"][("0", "A")]
    a = torch.cat([W.shard(x, owner, 2), torch.ones(6, 1, dtype=W.F64)], 1)
    expected = (1 - rho) * a.T @ a / 6
    eps = torch.finfo(W.F64).eps
    tol = 8 * 6 * eps * float(expected.abs().max())  # six-term sums, rounded
    torch.testing.assert_close(local[owner]["factors"]["0"][0], expected, rtol=0, atol=tol)
    assert local[1 - owner]["factors"]["0"][0] is None  # never updated off its owner
    w = torch.linalg.eigvalsh(expected)
    d = local[owner]["reps"]["0"][0].d
    torch.testing.assert_close(d.sort().values, w, rtol=1e-12, atol=1e-15)
    assert local[1 - owner]["reps"]["0"][0] is None  # the inverse travelled, not (U, d)
    total, M = local[1 - owner]["inverse"]
    assert total == math.sqrt(0.05) + rho  # factored damping sqrt(lambda) plus rho^m
    eye = torch.eye(11, dtype=W.F64)
    torch.testing.assert_close(M @ (expected + total * eye), eye, rtol=0, atol=1e-12)
    # both ranks apply the same buffer
    torch.testing.assert_close(local[owner]["inverse"][1], M, rtol=0, atol=0)
    for a_rank, b_rank in zip(local[0]["directions"], local[1]["directions"], strict=True):
        torch.testing.assert_close(a_rank, b_rank, rtol=0, atol=0)
    assert local[0]["bytes"]["statistics"] == 0
    # the all-reduce mode's factor (both shards) is another matrix
    full = torch.cat([x, torch.ones(12, 1, dtype=W.F64)], 1)
    assert float(((1 - rho) * full.T @ full / 12 - expected).abs().max()) > 1e-3


def test_a_nonfinite_batch_on_one_rank_skips_the_update_on_all(
    world2: list[dict[str, Any]],
) -> None:
    records = ok(world2, "nonfinite")
    owner = records[0]["owners"][("0", "A")]
    assert records[owner]["updates"]["0"] == 2  # steps 0 and 1; step 2 skipped everywhere


def test_a_layer_skipped_on_some_steps_equals_one_process(
    world2: list[dict[str, Any]],
) -> None:
    """A branch not taken leaves its layer without gradient and statistics on that step; the
    processes agree on it and the run equals one process on the concatenated batch."""
    records = ok(world2, "unused_layer")
    torch.testing.assert_close(records[0]["params"], records[0]["reference"], rtol=1e-9, atol=0)
    torch.testing.assert_close(records[1]["params"], records[0]["params"], rtol=0, atol=0)


def test_checkpoint_at_world_size_2_continues_at_1_and_3(
    world2: list[dict[str, Any]], world3: list[dict[str, Any]], checkpoint: Path
) -> None:
    saved = ok(world2, "checkpoint")
    for inverse, record in saved[0].items():
        assert _same(record["state"], saved[1][inverse]["state"])  # full state on any rank
    payload = torch.load(checkpoint, weights_only=False)
    steps = CHECKPOINT_STEPS
    for inverse, entry in payload.items():  # world size 1: this process, the whole batch
        net = W.model()
        net.load_state_dict(entry["model"])
        opt = kfac.KFAC(net, lr=0.1, momentum=0.5, **W.options(inverse, distributed=False))
        opt.load_state_dict(entry["state"])
        W.train(net, opt, W.data(2 * steps)[steps:])
        uninterrupted = saved[0][inverse]["params"]
        err = float((W.flat(net) - uninterrupted).norm() / uninterrupted.norm())
        assert err <= 1e-6, f"{inverse} resumed at world size 1: {err:.2e}"
    for record in ok(world3, "resume"):
        for inverse in payload:
            uninterrupted = saved[0][inverse]["params"]
            err = float((record[inverse]["params"] - uninterrupted).norm() / uninterrupted.norm())
            assert err <= 1e-6, f"{inverse} resumed at world size 3: {err:.2e}"


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    return bool(a == b)


# --------------------------------------------------------------------------- in one process


def test_owner_assignment_is_longest_processing_time_first() -> None:
    assert assign_owners([8.0, 1.0, 5.0, 4.0], 2) == [0, 0, 1, 1]  # 8+1 against 5+4
    assert assign_owners([3.0, 3.0, 3.0], 2) == [0, 1, 0]  # ties: order, then lowest rank
    assert assign_owners([], 4) == []
    costs = [float(c) for c in range(1, 30)]
    owners = assign_owners(costs, 4)
    loads = [sum(c for c, o in zip(costs, owners, strict=True) if o == r) for r in range(4)]
    assert max(loads) - min(loads) <= max(costs)  # LPT's bound on the spread
    with pytest.raises(ValueError, match="`world` must be an int >= 1"):
        assign_owners([1.0], 0)
    with pytest.raises(ValueError, match="`costs` must be finite and >= 0"):
        assign_owners([1.0, math.inf], 2)


def test_cost_model_per_strategy() -> None:
    net = W.model()
    costs = {}
    for inverse in ("eigh", "rsvd", "brand"):
        pre = kfac.KFACPreconditioner(net, **W.options(inverse, distributed=False))
        costs[inverse] = pre.block.parts(pre.layer("2"))
        pre.remove()
    assert costs["eigh"] == {"A": 25.0**3, "G": 24.0**3}
    assert costs["rsvd"] == {"A": 25.0**2 * 6, "G": 24.0**2 * 6}  # rank 4 + oversample 2
    assert costs["brand"] == {"A": 25.0 * 8**2, "G": 24.0 * 8**2}  # D (r + n)^2, n = r


def test_configuration_is_validated() -> None:
    with pytest.raises(ValueError, match="Invalid statistics: 'mean'"):
        kfac.Distributed(statistics="mean")
    with pytest.raises(ValueError, match="Invalid directions: 'some'"):
        kfac.Distributed(directions="some")
    with pytest.raises(ValueError, match="Invalid timeout: 0"):
        kfac.Distributed(timeout=0)
    for timeout in (math.inf, 1e30):  # each wait builds a timedelta: refused up front
        message = re.escape(f"Invalid timeout: {timeout!r} (must be a finite")
        with pytest.raises(ValueError, match=message):
            kfac.Distributed(timeout=timeout)
    assert kfac.Distributed(timeout=1e9).timeout == 1e9
    # under a millisecond the wait rounded to 0 ms, which torch.distributed reads as no limit
    with pytest.raises(ValueError, match=r"Invalid timeout: 0\.0005 \(must be at least 0\.001"):
        kfac.Distributed(timeout=0.0005)
    assert kfac.Distributed(timeout=0.001).timeout == 0.001
    with pytest.raises(TypeError, match=r"`group` must be a torch\.distributed\.ProcessGroup"):
        kfac.Distributed(group="gloo")
    net = W.model()
    with pytest.raises(TypeError, match=r"`distributed` must be a kfac\.Distributed"):
        kfac.KFACPreconditioner(net, distributed="yes")
    with pytest.raises(RuntimeError, match="needs an initialised process group"):
        kfac.KFACPreconditioner(net, distributed=True)


@pytest.mark.parametrize("method", ["KFAC", "MBF"])
def test_a_process_group_started_after_construction_is_refused(
    method: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Built with the default ``distributed=None`` before ``init_process_group``, the
    optimizer ran each process on its own curvature under DDP and the replicas drifted apart
    silently; its step now refuses, and ``distributed=False`` keeps the deliberate choice."""
    x, y = W.data(1)[0]
    opts = {}
    for distributed in (None, False):
        net = W.model()
        opt = getattr(kfac, method)(net, lr=0.1, distributed=distributed)
        F.cross_entropy(net(x), y).backward()
        opt.step()  # no process group yet: one process
        with monkeypatch.context() as patch:  # a group of two processes started since
            patch.setattr(torch.distributed, "is_initialized", lambda: True)
            patch.setattr(torch.distributed, "get_world_size", lambda group=None: 2)
            opt.zero_grad()
            F.cross_entropy(net(x), y).backward()
            if distributed is None:
                before = W.flat(net)
                with pytest.raises(RuntimeError, match=r"built before torch\.distributed"):
                    opt.step()
                assert torch.equal(W.flat(net), before)
            else:
                opt.step()
        opts[distributed] = opt
    assert opts[None].preconditioner.distributed is None


def test_blocks_without_the_hooks_refuse_a_process_group() -> None:
    net = W.model()
    block = kfac.FNGD(net, lr=0.1).preconditioner.block
    with pytest.raises(NotImplementedError, match="'fngd' does not implement `parts`"):
        block.parts(None)


MBF_STEPS = 6


def test_mbf_equals_one_process_and_its_state_resumes_in_one(tmp: Path) -> None:
    """MBF at world size 2 (statistics of the global batch, each layer's inverses refreshed
    by its owner and broadcast) equals one process on the concatenated batch, for the swept,
    Cholesky and SMW layouts; the gathered state dict continues in one process."""
    records = ok(spawn(tmp, 2, [("mbf", (MBF_STEPS,))]), "mbf")
    start = W.flat(W.model())
    for layout in W.MBF_CONFIGS:
        ref = records[0][layout]["reference"]
        assert float((ref - start).norm()) > 1e-2 * float(start.norm())  # the run moved
        for rank, record in enumerate(records):
            mine = record[layout]
            err = float((mine["params"] - ref).norm() / ref.norm())
            assert err <= 1e-6, f"{layout}, rank {rank}: {err:.2e}"
            torch.testing.assert_close(
                mine["params"], records[0][layout]["params"], rtol=0, atol=0
            )
            assert mine["owners"] == records[0][layout]["owners"]
        assert set(records[0][layout]["owners"].values()) == {0, 1}  # three layers, two owners
        assert records[0][layout]["bytes"]["representations"] > 0
        resumed = records[0][layout]["resumed"]
        assert float((resumed - ref).norm() / ref.norm()) <= 1e-6, layout


def test_single_process_is_unchanged_by_default() -> None:
    """Without a process group the default runs in one process (no runtime)."""
    net = W.model()
    options = W.options("rsvd")
    del options["distributed"]
    opt = kfac.KFAC(net, lr=0.1, **options)
    assert opt.preconditioner.engine.dist is None
    x, y = W.data(1)[0]
    F.cross_entropy(net(x), y).backward()
    opt.step()


def test_quadratic_step_and_adaptive_damping_equal_one_process(
    world2: list[dict[str, Any]],
) -> None:
    """The quadratic model's loss and Gram matrix are the means over the processes' shards:
    the steps, the damping and the rejections equal one process on the concatenated batch."""
    records = ok(world2, "quadratic")
    start = W.flat(W.model())
    for inverse in ("eigh", "brand"):
        ref, ref_damping, ref_rejections = records[0][inverse]["reference"]
        assert float((ref - start).norm()) > 1e-2 * float(start.norm())  # the run moved
        for record in records:
            params, damping, rejections = record[inverse]["mine"]
            err = float((params - ref).norm() / ref.norm())
            assert err <= 1e-6, f"{inverse}: {err:.2e}"
            assert damping == pytest.approx(ref_damping, rel=1e-6)
            assert rejections == ref_rejections
