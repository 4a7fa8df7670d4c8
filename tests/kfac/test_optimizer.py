"""The torch.optim contract of ``kfac.KFAC`` and the preconditioner's composition with others."""

from __future__ import annotations

import copy
import io
import warnings

import pytest
import torch
from torch import nn

import kfac

from .conftest import mlp


def model_with_norm() -> nn.Sequential:
    return nn.Sequential(nn.Linear(5, 8), nn.LayerNorm(8), nn.Tanh(), nn.Linear(8, 3))


def batches(count: int, seed: int = 1) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(16, 5, generator=g), torch.randint(3, (16,), generator=g))
        for _ in range(count)
    ]


OPTIONS = {"factor_every": 2, "inverse_every": 3, "momentum": 0.9, "weight_decay": 1e-3}


def run(model: nn.Module, opt: torch.optim.Optimizer, data) -> list[float]:
    losses = []
    for x, y in data:

        def closure(x=x, y=y) -> torch.Tensor:
            opt.zero_grad()
            loss = nn.functional.cross_entropy(model(x), y)
            loss.backward()
            return loss

        losses.append(opt.step(closure).item())
    return losses


@pytest.mark.parametrize("fisher", ["empirical", "mc"])
def test_state_dict_round_trip_continues_identically(fisher: str) -> None:
    data = batches(12)
    model = model_with_norm()
    opt = kfac.KFAC(model, lr=0.05, fisher=fisher, loss="cross_entropy", **OPTIONS)
    run(model, opt, data[:7])
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buffer)
    reference = run(model, opt, data[7:])
    reference_params = [p.detach().clone() for p in model.parameters()]

    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)  # plain tensors, numbers and containers
    model2 = model_with_norm()
    model2.load_state_dict(saved["model"])
    opt2 = kfac.KFAC(model2, lr=0.05, fisher=fisher, loss="cross_entropy", **OPTIONS)
    opt2.load_state_dict(saved["opt"])
    assert opt2.preconditioner.steps == 7
    resumed = run(model2, opt2, data[7:])
    assert resumed == reference
    for p, q in zip(model2.parameters(), reference_params, strict=True):
        assert torch.equal(p, q)


def test_state_dict_exposes_momentum_and_factors() -> None:
    model = model_with_norm()
    opt = kfac.KFAC(model, lr=0.05, **OPTIONS)
    run(model, opt, batches(2))
    state = opt.state_dict()
    assert set(state) == {"state", "param_groups", "kfac"}
    assert all("momentum_buffer" in s for s in state["state"].values())
    assert len(state["state"]) == len(list(model.parameters()))  # LayerNorm included
    layers = state["kfac"]["layers"]
    assert set(layers) == {"0", "3"}
    assert layers["0"]["A"]["matrix"].shape == (6, 6)


def test_load_state_dict_rejects_foreign_state() -> None:
    model = model_with_norm()
    opt = kfac.KFAC(model, lr=0.05)
    sgd_state = torch.optim.SGD(model.parameters(), lr=0.1).state_dict()
    with pytest.raises(ValueError, match="no 'kfac' entry"):
        opt.load_state_dict(sgd_state)
    other = kfac.KFAC(mlp(), lr=0.05)
    with pytest.raises(ValueError, match="do not match the model"):
        opt.load_state_dict(other.state_dict())


def test_closure_loss_is_returned_and_step_without_closure() -> None:
    model = mlp()
    opt = kfac.KFAC(model, lr=0.05, factor_every=1, inverse_every=1)
    x, y = batches(1)[0]
    opt.zero_grad()
    loss = nn.functional.cross_entropy(model(x), y)
    loss.backward()
    assert opt.step() is None

    def closure() -> torch.Tensor:
        opt.zero_grad()
        out = nn.functional.cross_entropy(model(x), y)
        out.backward()
        return out

    assert isinstance(opt.step(closure), torch.Tensor)


def test_zero_grad_sets_none() -> None:
    model = mlp()
    opt = kfac.KFAC(model, lr=0.05, factor_every=1, inverse_every=1)
    run(model, opt, batches(1))
    opt.zero_grad()
    assert all(p.grad is None for p in model.parameters())


def test_param_groups_have_their_own_lr_and_unsupported_layers_get_plain_sgd() -> None:
    """A LayerNorm in its own group with momentum 0 receives exactly p -= lr (g + wd p)."""
    model = model_with_norm()
    norm = list(model[1].parameters())
    others = [p for n, p in model.named_parameters() if not n.startswith("1.")]
    opt = kfac.KFAC(
        model,
        lr=0.05,
        params=[{"params": others}, {"params": norm, "lr": 0.3, "weight_decay": 0.1}],
        factor_every=1,
        inverse_every=1,
    )
    assert [g["lr"] for g in opt.param_groups] == [0.05, 0.3]
    x, y = batches(1)[0]
    nn.functional.cross_entropy(model(x), y).backward()
    before = [p.detach().clone() for p in norm]
    grads = [p.grad.clone() for p in norm]
    linear_grad = model[0].weight.grad.clone()
    opt.step()
    for p, b, g in zip(norm, before, grads, strict=True):
        torch.testing.assert_close(p, b - 0.3 * (g + 0.1 * b))
    assert not torch.allclose(model[0].weight.grad, linear_grad)  # preconditioned


def test_lr_scheduler_drives_the_learning_rate() -> None:
    model = mlp()
    opt = kfac.KFAC(model, lr=0.1, factor_every=1, inverse_every=1)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    lrs = []
    for x, y in batches(3):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        sched.step()
        lrs.append(opt.param_groups[0]["lr"])
    assert lrs == [0.05, 0.025, 0.0125]
    # the scheduler state round-trips alongside
    assert sched.state_dict()["last_epoch"] == 3


def test_momentum_matches_sgd_on_preconditioned_gradients() -> None:
    """KFAC = KFACPreconditioner + torch.optim.SGD(momentum, weight_decay) exactly."""
    data = batches(6)
    model_a, model_b = mlp(), mlp()
    model_b.load_state_dict(model_a.state_dict())
    opt_a = kfac.KFAC(
        model_a, lr=0.05, momentum=0.9, weight_decay=1e-2, factor_every=1, inverse_every=2
    )
    precond = kfac.KFACPreconditioner(model_b, factor_every=1, inverse_every=2)
    sgd = torch.optim.SGD(model_b.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-2)
    for x, y in data:
        for model, step in ((model_a, opt_a.step), (model_b, None)):
            model.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            if step is not None:
                step()
            else:
                precond.step()
                sgd.step()
    for p, q in zip(model_a.parameters(), model_b.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)


def test_preconditioner_composes_with_adam() -> None:
    model = mlp()
    precond = kfac.KFACPreconditioner(model, factor_every=1, inverse_every=1)
    adam = torch.optim.Adam(model.parameters(), lr=1e-2)
    first = None
    for x, y in batches(1) * 60:
        adam.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        precond.step()
        adam.step()
        first = loss.item() if first is None else first
    assert loss.item() < 0.5 * first


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"lr": -1.0}, "Invalid learning rate: -1.0"),
        ({"lr": 0.1, "momentum": -0.5}, "Invalid momentum"),
        ({"lr": 0.1, "weight_decay": -1}, "Invalid weight_decay"),
        ({"lr": 0.1, "damping": 0.0}, "Invalid damping: 0.0"),
        ({"lr": 0.1, "factor_decay": 1.0}, r"Invalid factor_decay: 1.0 \(must be in \[0, 1\)\)"),
        ({"lr": 0.1, "factor_every": 0}, "Invalid factor_every: 0"),
        ({"lr": 0.1, "inverse_every": 1.5}, "Invalid inverse_every: 1.5"),
        ({"lr": 0.1, "kl_clip": -1.0}, "Invalid kl_clip"),
        ({"lr": 0.1, "rms_clip": -0.5}, "Invalid rms_clip"),
        (
            {"lr": 0.1, "inverse": "svd"},
            r"Invalid inverse: 'svd'; valid names are \['brand', 'brand-correct', 'brand-rsvd', "
            r"'brand-rsvd-correct', 'eigh', 'rsvd', 'srevd'\]",
        ),
        ({"lr": 0.1, "rank": 10}, r"inverse='eigh' does not take option\(s\) \['rank'\]"),
        ({"lr": 0.1, "damping_scheme": "tikhonov"}, "Invalid damping_scheme: 'tikhonov'"),
        ({"lr": 0.1, "fisher": "exact"}, "Invalid fisher: 'exact'"),
        ({"lr": 0.1, "fisher": "mc"}, "Invalid loss: None; fisher='mc' needs one of"),
        ({"lr": 0.1, "loss": "hinge"}, "Invalid loss: 'hinge'"),
        ({"lr": 0.1, "factor_dtype": torch.float16}, "Invalid factor_dtype"),
        ({"lr": 0.1, "skip_layers": ["nothing.*"]}, "pattern 'nothing.*' matches no module"),
        ({"lr": 0.1, "skip_layers": [3]}, "Invalid skip_layers entry: 3"),
        # before: int() parsed a string or truncated a float without naming `seed`
        ({"lr": 0.1, "seed": "a"}, r"Invalid seed: 'a' \(must be an integer\)"),
        ({"lr": 0.1, "seed": 1.5}, r"Invalid seed: 1.5 \(must be an integer\)"),
        ({"lr": 0.1, "skip_layers": [nn.Linear]}, "Invalid model: no nn.Linear, nn.Conv1d"),
    ],
)
def test_invalid_hyperparameters_raise(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        kfac.KFAC(mlp(), **kwargs)


def test_grad_scaler_that_is_not_one_is_a_type_error() -> None:
    """Before: accepted, then an AttributeError at the first step."""
    with pytest.raises(TypeError, match=r"`grad_scaler` must be a torch.amp.GradScaler .*int"):
        kfac.KFAC(mlp(), lr=0.1, grad_scaler=3)


def test_scheduled_hyperparameter_is_validated_when_called() -> None:
    model = mlp()
    opt = kfac.KFAC(model, lr=0.1, damping=lambda step: -1.0, factor_every=1, inverse_every=1)
    x, y = batches(1)[0]
    nn.functional.cross_entropy(model(x), y).backward()
    with pytest.raises(ValueError, match=r"Invalid damping \(schedule at step 0\): -1.0"):
        opt.step()


def test_params_must_cover_preconditioned_layers() -> None:
    model = mlp()
    with pytest.raises(ValueError, match="layer '2' is preconditioned but its parameters"):
        kfac.KFAC(model, lr=0.1, params=list(model[0].parameters()))


def test_deepcopy_of_model_and_optimizer_state_is_independent() -> None:
    model = mlp()
    opt = kfac.KFAC(model, lr=0.1, factor_every=1, inverse_every=1)
    run(model, opt, batches(2))
    state = copy.deepcopy(opt.state_dict())
    run(model, opt, batches(2, seed=5))
    assert state["kfac"]["steps"] == 2
    assert opt.preconditioner.steps == 4


# ------------------------------------------------------------------ torch.optim habits


def test_parameters_instead_of_the_model_is_a_type_error() -> None:
    """Before: "'generator' object has no attribute 'parameters'"."""
    model = mlp()
    with pytest.raises(TypeError, match=r"KFAC takes the model \(an nn.Module\), not its param"):
        kfac.KFAC(model.parameters(), lr=0.1)


def test_unknown_keyword_is_a_type_error() -> None:
    """Before: ``nesterov=`` was reported as an option of the inverse strategy."""
    with pytest.raises(TypeError, match=r"unexpected keyword argument\(s\) \['nesterov'\]"):
        kfac.KFAC(mlp(), lr=0.1, nesterov=True)


@pytest.mark.parametrize("clip", ["kl_clip", "rms_clip"])
def test_a_clip_of_zero_is_off(clip: str) -> None:
    """Before: ``kl_clip=0`` could not switch the clip off (it was rejected)."""
    x, y = torch.randn(16, 5), torch.randint(3, (16,))
    results = []
    for value in (0, None, lambda step: 0.0):
        torch.manual_seed(0)
        model = mlp()
        opt = kfac.KFAC(model, lr=0.1, factor_every=1, inverse_every=1, **{clip: value})
        for _ in range(3):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
        results.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
    torch.testing.assert_close(results[0], results[1], rtol=0, atol=0)
    torch.testing.assert_close(results[2], results[1], rtol=0, atol=0)


def test_brand_that_tracks_no_factor_warns() -> None:
    """Before: every factor silently ran the fallback rsvd."""
    with pytest.warns(UserWarning, match=r"inverse='brand' tracks no factor here.*rank_cap=500"):
        kfac.KFAC(mlp(), lr=0.1, inverse="brand")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        kfac.KFAC(nn.Sequential(nn.Linear(40, 30)), lr=0.1, inverse="brand", rank=8, rank_cap=10)


def test_wide_dense_factor_warns() -> None:
    """Before: a 9216-wide eigh factor gave no hint of its cost."""
    model = nn.Sequential(nn.Linear(4097, 2, bias=False))
    with pytest.warns(UserWarning, match=r"wider than 4096: '0' A \(4097\).*O\(D\^3\)"):
        kfac.KFACPreconditioner(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        kfac.KFACPreconditioner(model, inverse="rsvd", rank=10)
