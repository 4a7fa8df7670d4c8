"""kfac.InverseDecay: the values, the validation, and its use as a checkpointed KL clip."""

from __future__ import annotations

import io
import itertools
import pickle

import pytest
import torch
from torch import nn

import kfac

from .test_optimizer import batches, model_with_norm, run


def _model() -> nn.Module:
    torch.manual_seed(0)
    return model_with_norm()


def test_values_are_the_formula_and_exact_where_representable() -> None:
    clip = kfac.InverseDecay(1e-3, scale=100, power=2)
    assert clip(0) == 1e-3
    assert clip(100) == 1e-3 / 4
    assert clip(300) == 1e-3 / 16
    for step in (1, 7, 250, 10**6):
        assert clip(step) == pytest.approx(1e-3 / (1 + step / 100) ** 2, rel=1e-15)
    assert kfac.InverseDecay(2.0, scale=4)(4) == 1.0  # power 1 halves after `scale` steps
    # strictly decreasing and never zero, whatever the run length
    values = [clip(s) for s in range(0, 10**5, 997)]
    assert all(a > b > 0 for a, b in itertools.pairwise(values))


def test_a_frozen_value_with_a_repr_that_pickles() -> None:
    clip = kfac.InverseDecay(1e-3, scale=100, power=2)
    assert repr(clip) == "InverseDecay(start=0.001, scale=100.0, power=2.0)"
    assert clip == kfac.InverseDecay(0.001, 100.0, 2.0)
    assert clip != kfac.InverseDecay(1e-3, scale=100, power=1)
    assert pickle.loads(pickle.dumps(clip)) == clip
    with pytest.raises(AttributeError):
        clip.start = 1.0  # type: ignore[misc]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"start": 0.0, "scale": 1.0}, r"Invalid start: 0.0 \(must be > 0\)"),
        ({"start": 1e-3, "scale": -5.0}, r"Invalid scale: -5.0 \(must be > 0\)"),
        ({"start": 1e-3, "scale": 10.0, "power": 0}, r"Invalid power: 0.0 \(must be > 0\)"),
        ({"start": float("nan"), "scale": 1.0}, r"Invalid start: nan \(must be finite\)"),
        ({"start": 1e-3, "scale": "10"}, r"Invalid scale: '10' \(must be a real number\)"),
        ({"start": 1e-3, "scale": 10, "power": True}, r"Invalid power: True"),
    ],
)
def test_invalid_arguments_raise(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        kfac.InverseDecay(**kwargs)


def test_as_kl_clip_it_is_the_formula_of_the_step() -> None:
    data = batches(8)
    options = {"factor_every": 1, "inverse_every": 2}
    model_a, model_b = _model(), _model()
    clip = kfac.InverseDecay(1e-3, scale=2, power=2)
    run(model_a, kfac.KFAC(model_a, lr=0.5, kl_clip=clip, **options), data)
    run(
        model_b,
        kfac.KFAC(model_b, lr=0.5, kl_clip=lambda s: 1e-3 / (1 + s / 2) ** 2, **options),
        data,
    )
    pairs = zip(model_a.parameters(), model_b.parameters(), strict=True)
    assert all(torch.equal(p, q) for p, q in pairs)
    # and it is not the constant clip (the schedule binds on these steps)
    model_c = _model()
    run(model_c, kfac.KFAC(model_c, lr=0.5, kl_clip=1e-3, **options), data)
    pairs = zip(model_a.parameters(), model_c.parameters(), strict=True)
    assert not all(torch.equal(p, q) for p, q in pairs)


def test_a_checkpoint_resumes_the_schedule_at_its_step() -> None:
    """The schedule is a function of the step and the ``state_dict`` holds the step, so a
    run saved and loaded (``weights_only``) continues exactly as the uninterrupted one."""
    data = batches(12)
    clip = kfac.InverseDecay(1e-3, scale=2, power=2)
    options = {"factor_every": 1, "inverse_every": 3, "kl_clip": clip}
    model = model_with_norm()
    opt = kfac.KFAC(model, lr=0.5, **options)
    run(model, opt, data[:5])
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buffer)
    reference = run(model, opt, data[5:])

    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    model2 = model_with_norm()
    model2.load_state_dict(saved["model"])
    opt2 = kfac.KFAC(model2, lr=0.5, **options)
    opt2.load_state_dict(saved["opt"])
    assert run(model2, opt2, data[5:]) == reference
    pairs = zip(model.parameters(), model2.parameters(), strict=True)
    assert all(torch.equal(p, q) for p, q in pairs)


def test_the_optimizer_pickles_with_the_schedule() -> None:
    model = nn.Sequential(nn.Linear(4, 3))
    opt = kfac.KFAC(model, lr=0.1, kl_clip=kfac.InverseDecay(1e-3, scale=100))
    clone = pickle.loads(pickle.dumps(opt.preconditioner.engine.kl_clip))
    assert clone(100) == opt.preconditioner.engine.kl_clip(100) == 5e-4
