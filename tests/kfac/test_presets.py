"""kfac.preset: the named configurations are what the constructors use, and they differ."""

from __future__ import annotations

import inspect

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import kfac


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 12), nn.Tanh(), nn.Linear(12, 3))


def _train(opt: torch.optim.Optimizer, model: nn.Module, steps: int = 25) -> torch.Tensor:
    gen = torch.Generator().manual_seed(1)
    for _ in range(steps):
        x = torch.randn(32, 6, generator=gen)
        y = torch.randint(3, (32,), generator=gen)
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def _signature_defaults(cls: type) -> dict[str, object]:
    return {
        name: p.default
        for name, p in inspect.signature(cls.__init__).parameters.items()
        if p.default is not inspect.Parameter.empty
    }


def test_default_preset_is_the_signatures_defaults() -> None:
    pre = _signature_defaults(kfac.KFACPreconditioner)
    for key, value in kfac.preset("default", optimizer=False).items():
        assert pre[key] == value, key
    # KFAC's own: momentum and the clip are resolved in its constructor
    opt = kfac.KFAC(_model(), lr=0.1)
    assert opt.param_groups[0]["momentum"] == kfac.preset("default")["momentum"] == 0.9
    engine = opt.preconditioner.engine
    assert engine.kl_clip is not None
    # the measured clip decays with the step, with no run length (docs/kfac.md)
    assert kfac.preset("default")["kl_clip"] == kfac.InverseDecay(1e-3, scale=50, power=2)
    assert [engine.kl_clip(s) for s in (0, 50, 150)] == [1e-3, 2.5e-4, 6.25e-5]
    assert kfac.KFACPreconditioner(_model()).engine.kl_clip is None


def test_default_preset_reproduces_the_plain_call_exactly() -> None:
    model_a, model_b = _model(), _model()
    plain = _train(kfac.KFAC(model_a, lr=0.3), model_a)
    named = _train(kfac.KFAC(model_b, lr=0.3, **kfac.preset("default")), model_b)
    assert torch.equal(plain, named)


def test_thesis_preset_is_the_former_defaults_and_differs() -> None:
    thesis = kfac.preset("thesis")
    assert thesis == {
        "factor_decay": 0.95,
        "damping": 0.1,
        "damping_scheme": "factored-relative",
        "factor_every": 20,
        "inverse_every": 100,
        "factor_init": "identity",
        "kl_clip": None,
        "momentum": 0.0,
    }
    opt = kfac.KFAC(_model(), lr=0.1, **thesis)
    clock = opt.preconditioner.engine.clock
    assert (clock.factor_every(0), clock.inverse_every(0), clock.damping(0)) == (20, 100, 0.1)
    assert opt.preconditioner.block.relative_damping()
    assert not kfac.KFAC(_model(), lr=0.1).preconditioner.block.relative_damping()
    assert opt.preconditioner.engine.kl_clip is None
    assert opt.param_groups[0]["momentum"] == 0.0
    model_a, model_b = _model(), _model()
    default = _train(kfac.KFAC(model_a, lr=0.1), model_a)
    former = _train(kfac.KFAC(model_b, lr=0.1, **thesis), model_b)
    assert not torch.allclose(default, former)


def test_preconditioner_presets_leave_out_the_momentum() -> None:
    for name in kfac.presets.PRESETS:
        kwargs = kfac.preset(name, optimizer=False)
        assert "momentum" not in kwargs
        kfac.KFACPreconditioner(_model(), lr=0.1, **kwargs)  # accepted as they are
    assert kfac.preset("default", optimizer=False)["kl_clip"] is None
    assert kfac.preset("command-line", optimizer=False)["kl_clip"] == 1e-4


def test_preset_returns_a_new_dict() -> None:
    first = kfac.preset("default")
    first["damping"] = 5.0
    assert kfac.preset("default")["damping"] == 0.1


@pytest.mark.parametrize("name", ["Default", "kfac", 3])
def test_unknown_preset(name: object) -> None:
    with pytest.raises(ValueError, match=r"Invalid preset `name`: .*valid names are"):
        kfac.preset(name)  # type: ignore[arg-type]


def test_quadratic_step_turns_the_momentum_and_clip_defaults_off() -> None:
    opt = kfac.KFAC(_model(), lr=1.0, loss_fn=F.cross_entropy, quadratic_step=True)
    assert opt.param_groups[0]["momentum"] == 0.0
    assert opt.preconditioner.engine.kl_clip is None
    with pytest.raises(ValueError, match="quadratic_step chooses the momentum"):
        kfac.KFAC(_model(), lr=1.0, momentum=0.9, loss_fn=F.cross_entropy, quadratic_step=True)
    # adaptive damping alone keeps both defaults (the step is still lr times the direction)
    opt = kfac.KFAC(_model(), lr=0.1, loss_fn=F.cross_entropy, adaptive_damping=True)
    assert opt.param_groups[0]["momentum"] == 0.9
    assert opt.preconditioner.engine.kl_clip is not None


def test_command_line_preset_is_the_command_line_defaults() -> None:
    """The preset restates ``python -m kfac``'s defaults; the two must not drift apart."""
    from kfac.__main__ import RunConfig

    cli = RunConfig()
    expected = {key: getattr(cli, key) for key in kfac.preset("command-line") if hasattr(cli, key)}
    got = kfac.preset("command-line")
    assert expected == {key: got[key] for key in expected}
    assert set(got) - set(expected) <= {"factor_init"}  # not a RunConfig field
    assert got["factor_init"] == kfac.preset("default")["factor_init"]
