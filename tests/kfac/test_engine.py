"""The engine's hot path: no host synchronisation on a step that refreshes nothing, phases in
order, deferred reports of non-finite directions, the clock."""

from __future__ import annotations

import contextlib
import copy
import math
import warnings
from collections.abc import Iterator

import pytest
import torch
from torch import nn

import kfac

#: Every way a tensor is read back to the host from Python.
CONVERSIONS = ("item", "tolist", "__bool__", "__float__", "__int__", "__index__")


@contextlib.contextmanager
def count_conversions(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[str]]:
    calls: list[str] = []
    for name in CONVERSIONS:
        original = getattr(torch.Tensor, name)

        def spy(self, *args, _original=original, _name=name):
            calls.append(_name)
            return _original(self, *args)

        monkeypatch.setattr(torch.Tensor, name, spy)
    try:
        yield calls
    finally:
        monkeypatch.undo()


def model_and_batch(device: str = "cpu") -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 36, 40),
        nn.Tanh(), nn.Linear(40, 3),
    ).to(device)  # fmt: skip
    x = torch.randn(8, 1, 6, 6, device=device)
    y = torch.randint(3, (8,), device=device)
    return model, x, y


def backward(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> None:
    model.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()


OPTIONS = [
    {"inverse": "eigh"},
    {"inverse": "eigh", "damping_scheme": "eigenbasis-relative"},
    {"inverse": "eigh", "damping_scheme": "pi", "kl_clip": 1e-3, "lr": 0.1, "rms_clip": 0.1},
    {"inverse": "rsvd", "rank": 8},
    {"inverse": "srevd", "rank": 8},
    *(
        {"inverse": name, "rank": 8, "rank_cap": 10, "brand_every": 1, "factored_apply": False}
        for name in ("brand", "brand-rsvd", "brand-correct", "brand-rsvd-correct")
    ),
]


@pytest.mark.parametrize("options", OPTIONS, ids=lambda o: "-".join(map(str, o.values())))
def test_a_step_that_refreshes_nothing_reads_nothing_back(
    monkeypatch: pytest.MonkeyPatch, options: dict
) -> None:
    model, x, y = model_and_batch()
    precond = kfac.KFACPreconditioner(model, factor_every=4, inverse_every=4, **options)
    for _ in range(5):  # steps 0-4: step 4 refreshes
        backward(model, x, y)
        precond.step()
    backward(model, x, y)  # step 5: neither a factor nor a refresh step
    before = [p.grad.clone() for p in model.parameters()]
    with count_conversions(monkeypatch) as calls:
        precond.step()
    assert calls == []
    # it did precondition: every layer's gradient changed
    assert all(not torch.equal(b, p.grad) for b, p in zip(before, model.parameters(), strict=True))


@pytest.mark.parametrize("options", [{"block_size": 8}, {"block_size": None, "solver": "smw"}])
def test_an_mbf_step_that_refreshes_nothing_reads_nothing_back(
    monkeypatch: pytest.MonkeyPatch, options: dict
) -> None:
    model, x, y = model_and_batch()
    precond = kfac.MBFPreconditioner(model, factor_every=4, inverse_every=4, **options)
    for _ in range(5):
        backward(model, x, y)
        precond.step()
    backward(model, x, y)
    before = [p.grad.clone() for p in model.parameters()]
    with count_conversions(monkeypatch) as calls:
        precond.step()
    assert calls == []
    assert all(not torch.equal(b, p.grad) for b, p in zip(before, model.parameters(), strict=True))


def test_the_conversion_counter_sees_a_synchronising_step(monkeypatch: pytest.MonkeyPatch) -> None:
    """The control of the test above: a factor-and-refresh step reads flags and scalars."""
    model, x, y = model_and_batch()
    precond = kfac.KFACPreconditioner(model, factor_every=1, inverse_every=1)
    backward(model, x, y)
    with count_conversions(monkeypatch) as calls:
        precond.step()
    assert calls


def test_kfac_step_reads_one_flag(monkeypatch: pytest.MonkeyPatch) -> None:
    """``KFAC.step`` adds exactly one read: the fused finiteness check of the gradients."""
    model, x, y = model_and_batch()
    opt = kfac.KFAC(model, lr=0.1, momentum=0.9, factor_every=4, inverse_every=4)
    for _ in range(5):
        backward(model, x, y)
        opt.step()
    backward(model, x, y)
    with count_conversions(monkeypatch) as calls:
        opt.step()
    assert calls == ["__bool__"]


@pytest.mark.gpu
@pytest.mark.parametrize("options", OPTIONS, ids=lambda o: "-".join(map(str, o.values())))
def test_no_cuda_synchronisation_on_a_step_that_refreshes_nothing(options: dict) -> None:
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    model, x, y = model_and_batch("cuda")
    precond = kfac.KFACPreconditioner(model, factor_every=4, inverse_every=4, **options)
    for _ in range(5):
        backward(model, x, y)
        precond.step()
    backward(model, x, y)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        precond.step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


def test_a_non_finite_direction_is_never_written_and_is_reported_later() -> None:
    """On a step that does not synchronise, a layer whose gradient is NaN keeps it (nothing
    non-finite is written by the preconditioner) and the warning comes at the next factor or
    refresh step, naming the step it happened at."""
    model, x, y = model_and_batch()
    precond = kfac.KFACPreconditioner(model, factor_every=3, inverse_every=3)
    for _ in range(4):
        backward(model, x, y)
        precond.step()
    backward(model, x, y)  # step 4
    model[5].weight.grad[0, 0] = float("nan")
    nan_grad = model[5].weight.grad.clone()
    clean_before = model[3].weight.grad.clone()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        precond.step()  # no read: no warning yet
    torch.testing.assert_close(model[5].weight.grad, nan_grad, equal_nan=True)
    assert not torch.equal(model[3].weight.grad, clean_before)  # the others were written
    backward(model, x, y)  # step 5: not synchronising either
    precond.step()
    backward(model, x, y)  # step 6: factor + refresh step
    with pytest.warns(
        RuntimeWarning, match=r"non-finite direction in layer '5' \(Linear\) at step 4"
    ):
        precond.step()


def test_the_kl_clip_is_written_scaled_and_a_nan_keeps_every_gradient() -> None:
    """The write applies the KL clip's scale to the direction in ``.grad``; with a NaN in one
    layer the clip's scale is NaN, so no layer is written (each keeps its gradient)."""
    model, x, y = model_and_batch()
    twin = copy.deepcopy(model)
    options = {"factor_every": 1, "inverse_every": 1, "lr": 0.1}
    precond = kfac.KFACPreconditioner(model, kl_clip=1e-6, **options)
    unclipped = kfac.KFACPreconditioner(twin, kl_clip=None, **options)
    backward(model, x, y)
    backward(twin, x, y)
    grads = [p.grad.clone() for p in model.parameters()]
    precond.step()
    unclipped.step()
    directions = [p.grad for p in twin.parameters()]
    pairs = zip(directions, grads, strict=True)
    total = sum(0.01 * torch.sum(d.double() * g.double()) for d, g in pairs)  # lr^2 <D, g>
    nu = min(1.0, math.sqrt(1e-6 / abs(float(total))))
    assert nu < 0.1  # the clip is active
    for p, d in zip(model.parameters(), directions, strict=True):
        torch.testing.assert_close(p.grad, d * nu, rtol=1e-5, atol=1e-7)
    backward(model, x, y)
    model[5].weight.grad[0, 0] = float("nan")
    before = [p.grad.clone() for p in model.parameters()]
    gradient = r"non-finite gradient in layer '5' \(Linear\) at step 1"
    nan = r"non-finite direction in layer '0' \(Conv2d\), '3' \(Linear\) at step 1"
    with pytest.warns(RuntimeWarning, match=gradient), pytest.warns(RuntimeWarning, match=nan):
        precond.step()  # the NaN makes the clip's scale, so every scaled direction, NaN
    for p, b in zip(model.parameters(), before, strict=True):
        torch.testing.assert_close(p.grad, b, rtol=0, atol=0, equal_nan=True)


def test_report_flushes_pending_warnings() -> None:
    model, x, y = model_and_batch()
    precond = kfac.KFACPreconditioner(model, factor_every=3, inverse_every=3)
    for _ in range(2):
        backward(model, x, y)
        precond.step()
    backward(model, x, y)
    model[0].bias.grad.fill_(float("inf"))
    precond.step()
    with pytest.warns(RuntimeWarning, match=r"layer '0' \(Conv2d\) at step 2"):
        precond.report()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        precond.report()  # reported once


def test_timings_cover_the_phases_only_when_asked() -> None:
    model, x, y = model_and_batch()
    quiet = kfac.KFACPreconditioner(model, factor_every=1, inverse_every=1)
    backward(model, x, y)
    quiet.step()
    assert set(quiet.timings) == {
        "capture", "reduce", "update", "refresh", "exchange", "direction", "clip", "write"
    }  # fmt: skip
    assert all(t == 0.0 for t in quiet.timings.values())
    with pytest.raises(ValueError, match="Invalid time_phases"):
        kfac.KFACPreconditioner(model, time_phases=1)


def test_profiler_sees_the_phases() -> None:
    model, x, y = model_and_batch()
    precond = kfac.KFACPreconditioner(model, factor_every=1, inverse_every=1, time_phases=True)
    backward(model, x, y)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        precond.step()
    names = {event.key for event in prof.key_averages()}
    assert {"kfac.update", "kfac.refresh", "kfac.direction", "kfac.write"} <= names
    assert precond.timings["refresh"] > 0.0
    assert precond.timings["update"] > 0.0


def test_schedules_are_read_by_one_clock() -> None:
    """Periods and decay given as callables of the step drive every phase."""
    model, x, y = model_and_batch()
    factor_steps: list[int] = []

    def factor_every(step: int) -> int:
        return 1 if step < 3 else 5

    precond = kfac.KFACPreconditioner(
        model, factor_every=factor_every, inverse_every=lambda s: 2, factor_decay=lambda s: 0.5
    )
    for step in range(12):
        backward(model, x, y)
        before = precond.state("3").A.updates
        precond.step()
        if precond.state("3").A.updates > before:
            factor_steps.append(step)
    assert factor_steps == [0, 1, 2, 5, 10]
    assert precond.identity_weights("3") == (0.5**5, 0.5**5)


# ------------------------------------------------------------------ the finiteness test


@pytest.mark.parametrize(
    "dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.complex64]
)
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf"), None])
@pytest.mark.parametrize("shape", [(1,), (7,), (5, 3), (2, 3, 4)])
def test_all_finite_equals_isfinite_all(dtype, bad, shape):
    """The one-read test agrees with ``isfinite(t).all()`` wherever the bad entry sits."""
    from kfac._curvature import all_finite

    gen = torch.Generator().manual_seed(0)
    base = torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype)
    positions = [None] if bad is None else range(base.numel())
    for pos in positions:
        t = base.clone()
        if pos is not None:
            t.view(-1)[pos] = bad
        got = all_finite(t)
        assert got.dtype == torch.bool
        assert got.shape == ()
        assert bool(got) == bool(torch.isfinite(t).all()) == (pos is None)


def test_all_finite_edge_cases():
    from kfac._curvature import all_finite

    assert bool(all_finite(torch.empty(0)))  # nothing to be non-finite
    assert bool(all_finite(torch.arange(5)))  # integers are always finite
    huge = torch.full((4,), torch.finfo(torch.float32).max)  # finite, though its sum is not
    assert bool(all_finite(huge))
    assert not bool(torch.isfinite(huge.sum()))
    assert not bool(all_finite(torch.tensor([1.0, float("nan"), -float("inf")])))
    assert bool(all_finite(torch.randn(3, 4).T))  # non-contiguous
