"""The training loops people write: frozen parameters, gradient accumulation, several
forwards per step, shared weights, evaluation forwards, activation checkpointing, dead
layers, loss scale. Each test names the silent failure it guards against."""

from __future__ import annotations

import copy
import gc
import io
import warnings
from typing import Any

import pytest
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.checkpoint import checkpoint

import kfac

from .conftest import exact_preconditioner, mlp

F64 = torch.float64


def data(n: int = 24, d: int = 5, classes: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.randn(n, d, dtype=F64), torch.randint(classes, (n,))


def grads(model: nn.Module) -> list[torch.Tensor]:
    return [p.grad.clone() for p in model.parameters() if p.grad is not None]


# --------------------------------------------------------------------------- frozen parameters


def test_bias_frozen_at_construction_is_never_touched_and_the_layer_is_bias_free() -> None:
    """Before: KFAC raised "skip it with skip_layers"; the preconditioner wrote a .grad."""
    model = mlp().double()
    model[0].bias.requires_grad_(False)
    bias = model[0].bias.detach().clone()
    opt = kfac.KFAC(model, lr=0.1, factor_every=1, inverse_every=1, factor_dtype=F64)
    assert opt.preconditioner.layer("0").dim_A == 5  # no column of ones
    x, y = data()
    for _ in range(3):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    assert model[0].bias.grad is None
    torch.testing.assert_close(model[0].bias, bias, rtol=0, atol=0)
    # the bias-free layer's K-FAC: the same model built without that bias
    twin = mlp().double()
    twin.load_state_dict(model.state_dict())
    twin[0].bias = None
    p1, p2 = exact_preconditioner(model), exact_preconditioner(twin)
    for m, p in ((model, p1), (twin, p2)):
        m.zero_grad()
        out = m[0](x)
        out = out + (model[0].bias if m is twin else 0)
        F.cross_entropy(m[2](m[1](out)), y).backward()
        p.step()
    torch.testing.assert_close(model[0].weight.grad, twin[0].weight.grad)


@pytest.mark.parametrize("which", ["bias", "weight"])
def test_parameter_frozen_mid_run_never_moves(which: str) -> None:
    """Before: the preconditioner gave a frozen bias a .grad and SGD moved it."""
    model = mlp().double()
    opt = kfac.KFAC(model, lr=0.1, factor_every=1, inverse_every=1, factor_dtype=F64)
    x, y = data()
    for step in range(4):
        if step == 2:
            getattr(model[0], which).requires_grad_(False)
            frozen = getattr(model[0], which).detach().clone()
        opt.zero_grad()
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            F.cross_entropy(model(x), y).backward()
            opt.step()
    param = getattr(model[0], which)
    assert param.grad is None
    torch.testing.assert_close(param, frozen, rtol=0, atol=0)


# --------------------------------------------------------------------------- accumulation


@pytest.mark.parametrize("inverse", ["eigh", "brand"])
def test_accumulated_micro_batches_equal_one_batch(inverse: str) -> None:
    """Before: only the last micro-batch's statistics counted and G shrank by k^2."""
    model = nn.Sequential(nn.Linear(60, 80), nn.Tanh(), nn.Linear(80, 3)).double()
    twin = copy.deepcopy(model)
    x, y = torch.randn(24, 60, dtype=F64), torch.randint(3, (24,))
    options: dict[str, Any] = {"inverse": inverse}
    if inverse == "brand":
        options.update(rank=8, rank_cap=10)
    full, accumulated = (
        exact_preconditioner(model, **options),
        exact_preconditioner(twin, **options),
    )
    F.cross_entropy(model(x), y).backward()
    full.step()
    k = 4
    for part in range(k):
        rows = slice(part * 6, (part + 1) * 6)
        (F.cross_entropy(twin(x[rows]), y[rows]) / k).backward()
    accumulated.step()
    for name in full.layer_names:
        for a, b in zip(full.factors(name), accumulated.factors(name), strict=True):
            if a is not None:
                torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)
        ra, rb = full.representations(name), accumulated.representations(name)
        for a, b in zip(ra, rb, strict=True):
            torch.testing.assert_close(a.to_dense(), b.to_dense(), rtol=1e-9, atol=1e-12)
    for a, b in zip(grads(model), grads(twin), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


def test_mc_fisher_accumulates_per_sample_statistics() -> None:
    """The Monte-Carlo pass of each micro-batch is a mean over that micro-batch: its
    gradients are rescaled to the step's samples (G does not grow with k)."""
    model = mlp().double()
    precond = exact_preconditioner(model, fisher="mc", loss="cross_entropy")
    x, y = data(48)
    for part in range(4):
        rows = slice(part * 12, (part + 1) * 12)
        (F.cross_entropy(model(x[rows]), y[rows]) / 4).backward()
    batch = precond.recorded("2")
    assert batch is not None
    assert batch.n == 48
    single = exact_preconditioner(copy.deepcopy(model), fisher="mc", loss="cross_entropy")
    F.cross_entropy(single.engine.model(x), y).backward()
    one = single.recorded("2")
    # same distribution, different draws: the scales agree (not off by k or k^2)
    ratio = float(batch.output_factor().trace() / one.output_factor().trace())
    assert 0.5 < ratio < 2.0


# --------------------------------------------------------------------------- several forwards


class Siamese(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(5, 6), nn.Tanh())
        self.head = nn.Linear(12, 3)

    def forward(self, x1: torch.Tensor, x2: torch.Tensor) -> torch.Tensor:
        return self.head(torch.cat([self.body(x1), self.body(x2)], dim=1))


class Stacked(nn.Module):
    """The siamese net written with the two views as a positions axis of one call."""

    def __init__(self, siamese: Siamese) -> None:
        super().__init__()
        self.body = siamese.body
        self.head = siamese.head

    def forward(self, x1: torch.Tensor, x2: torch.Tensor) -> torch.Tensor:
        h = self.body(torch.stack([x1, x2], dim=1))  # (n, 2, 6): two positions
        return self.head(h.reshape(len(x1), -1))


def test_two_calls_in_one_forward_count_as_positions() -> None:
    """Before: only the last call's statistics were used. Convention: calls that share a
    backward are positions of the same samples (the expand setting)."""
    siamese = Siamese().double()
    stacked = Stacked(copy.deepcopy(siamese))
    x1, x2, y = (
        torch.randn(10, 5, dtype=F64),
        torch.randn(10, 5, dtype=F64),
        torch.randint(3, (10,)),
    )
    p1, p2 = exact_preconditioner(siamese), exact_preconditioner(stacked)
    for model, p in ((siamese, p1), (stacked, p2)):
        F.cross_entropy(model(x1, x2), y).backward()
        batch = p.recorded("body.0")
        assert batch is not None
        assert (batch.n, batch.positions) == (10, 20)
        p.step()
    for a, b in zip(p1.factors("body.0"), p2.factors("body.0"), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)
    for a, b in zip(grads(siamese), grads(stacked), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


def test_model_called_twice_per_step_counts_both_calls() -> None:
    """Before: each model forward started a new record, so only the second view's
    statistics were used. Two forwards of the model before one backward are two calls of
    every layer: positions of the same samples."""
    siamese = Siamese().double()
    stacked = Stacked(copy.deepcopy(siamese))
    x1, x2 = torch.randn(10, 5, dtype=F64), torch.randn(10, 5, dtype=F64)
    p1 = exact_preconditioner(siamese.body)
    p2 = exact_preconditioner(stacked.body)
    h1, h2 = siamese.body(x1), siamese.body(x2)  # two forwards of the model `siamese.body`
    h = stacked.body(torch.stack([x1, x2], dim=1))
    F.mse_loss(torch.cat([h1, h2], 1), torch.ones(10, 12, dtype=F64)).backward()
    F.mse_loss(h.reshape(10, 12), torch.ones(10, 12, dtype=F64)).backward()
    p1.step()
    p2.step()
    for a, b in zip(p1.factors("0"), p2.factors("0"), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(siamese.body[0].weight.grad, stacked.body[0].weight.grad)


# --------------------------------------------------------------------------- shared weights


def test_shared_parameter_is_rejected_naming_both_modules() -> None:
    """Before: both layers were registered and the second direction overwrote the first."""
    shared = nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 4))
    shared[2].weight = shared[0].weight
    with pytest.raises(
        ValueError, match=r"shared parameter: a parameter of layer '0' is also held by '2'"
    ):
        kfac.KFAC(shared, lr=0.1)
    kfac.KFAC(shared, lr=0.1, skip_layers=["2"])  # one holder preconditioned: allowed


def test_tied_embedding_and_output_weights_are_rejected() -> None:
    """Before: the tied weight was preconditioned with the output layer's factors only."""

    class Tied(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Embedding(11, 6)
            self.out = nn.Linear(6, 11, bias=False)
            self.out.weight = self.embed.weight

        def forward(self, tokens: torch.Tensor) -> torch.Tensor:
            return self.out(self.embed(tokens))

    with pytest.raises(ValueError, match=r"layer 'out' is also held by 'embed'.*untie"):
        kfac.KFACPreconditioner(Tied())
    precond = kfac.KFACPreconditioner(Tied(), skip_layers=["embed"])  # the user's choice
    assert precond.layer_names == ["out"]


def test_a_module_applied_twice_is_one_layer() -> None:
    block = nn.Linear(4, 4)
    model = nn.Sequential(block, nn.Tanh(), block)
    precond = kfac.KFACPreconditioner(model, factor_every=1, inverse_every=1)
    assert precond.layer_names == ["0"]
    F.mse_loss(model(torch.randn(8, 4)), torch.zeros(8, 4)).backward()
    assert precond.recorded("0").positions == 16
    precond.step()


# --------------------------------------------------------------------------- evaluation forwards


@pytest.mark.parametrize("fisher", ["empirical", "mc"])
def test_eval_forwards_never_touch_the_statistics(fisher: str) -> None:
    """Before: a grad-enabled eval forward between backward() and step() raised a misleading
    error; with the MC Fisher every eval forward ran the sampled backward."""
    model, twin = mlp().double(), None
    twin = copy.deepcopy(model)
    options = {"fisher": fisher, "loss": "cross_entropy"}
    p1, p2 = exact_preconditioner(model, **options), exact_preconditioner(twin, **options)
    x, y = data()
    for m, p in ((model, p1), (twin, p2)):
        F.cross_entropy(m(x), y).backward()
        if m is model:
            m.eval()
            m(torch.randn(7, 5, dtype=F64)).sum()  # grad enabled, eval mode
            with torch.no_grad():
                m.train()
                m(torch.randn(7, 5, dtype=F64))
            m.train()
        p.step()
    for name in p1.layer_names:
        for a, b in zip(p1.factors(name), p2.factors(name), strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_training_in_eval_mode_is_an_error_that_says_so() -> None:
    """Before: the error blamed a ``torch.nn.functional`` call (hooks that never fired)."""
    model = mlp()
    opt = kfac.KFAC(model, lr=0.1, factor_every=1)
    model.eval()
    x, y = torch.randn(8, 5), torch.randint(3, (8,))
    F.cross_entropy(model(x), y).backward()
    with pytest.raises(RuntimeError, match=r"layer '0' \(Linear\) has a gradient but is in eval"):
        opt.step()
    model.train()
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    opt.step()
    assert opt.preconditioner.state("0").A.updates == 1


@pytest.mark.parametrize("set_to_none", [True, False])
def test_a_head_whose_loss_is_left_out_on_some_steps_is_left_alone(set_to_none: bool) -> None:
    """An auxiliary head computed on every step, its loss added on every other step. Before:
    each step without its loss raised ("got no output gradient before step()")."""

    class TwoHeads(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body, self.main, self.aux = nn.Linear(5, 7), nn.Linear(7, 3), nn.Linear(7, 3)

        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            h = torch.tanh(self.body(x))
            return self.main(h), self.aux(h)

    model = TwoHeads()
    opt = kfac.KFAC(model, lr=0.1, momentum=0.0, factor_every=1, inverse_every=1)
    x, y = torch.randn(8, 5), torch.randint(3, (8,))
    for step in range(4):
        opt.zero_grad(set_to_none=set_to_none)
        main, aux = model(x)
        with_aux = step % 2 == 0
        loss = F.cross_entropy(main, y) + (F.cross_entropy(aux, y) if with_aux else 0.0)
        loss.backward()
        before = model.aux.weight.detach().clone()
        opt.step()
        assert torch.equal(model.aux.weight, before) != with_aux
    assert opt.preconditioner.state("aux").A.updates == 2
    assert opt.preconditioner.state("main").A.updates == 4


def test_training_forward_after_backward_is_reported() -> None:
    model = mlp()
    precond = kfac.KFACPreconditioner(model, factor_every=1, inverse_every=1)
    x, y = torch.randn(8, 5), torch.randint(3, (8,))
    F.cross_entropy(model(x), y).backward()
    model(x)  # a metric computed in training mode with gradients enabled
    with pytest.raises(
        RuntimeError, match=r"forward was run after the last backward|torch.no_grad"
    ):
        precond.step()


# --------------------------------------------------------------------------- checkpointing


@pytest.mark.parametrize("reentrant", [False, True])
def test_activation_checkpointing_counts_each_call_once(reentrant: bool) -> None:
    """Before: the recomputation of a non-reentrant checkpoint halved A and doubled G."""
    model = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh()).double()
    head = nn.Linear(8, 3).double()
    plain, twin = nn.Sequential(model, head), copy.deepcopy(nn.Sequential(model, head))
    p1, p2 = exact_preconditioner(plain), exact_preconditioner(twin)
    x, y = data()
    F.cross_entropy(plain(x), y).backward()
    p1.step()
    hidden = checkpoint(twin[0], x.requires_grad_(reentrant), use_reentrant=reentrant)
    F.cross_entropy(twin[1](hidden), y).backward()
    p2.step()
    for name in p1.layer_names:
        for a, b in zip(p1.factors(name), p2.factors(name), strict=True):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)
    for a, b in zip(grads(plain), grads(twin), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


# --------------------------------------------------------------------------- dead layers


def dead_model() -> nn.Sequential:
    """Layer '2' sees only zeros (a ReLU that never fires, no bias): its A factor is zero,
    and layer '0' gets zero output gradients: its G factor is zero."""
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3, bias=False), nn.Linear(3, 2))
    with torch.no_grad():
        model[0].bias.fill_(-100.0)
    return model


def train_dead(steps: int, **options: Any) -> kfac.KFAC:
    model = dead_model()
    opt = kfac.KFAC(model, lr=0.1, factor_every=1, **options)
    x, y = torch.randn(16, 4), torch.randint(2, (16,))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for _ in range(steps):
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
    assert all(bool(torch.isfinite(p).all()) for p in model.parameters())
    assert opt.preconditioner.steps == steps
    return opt


def test_dead_layer_stays_finite_for_3000_float32_steps() -> None:
    """Before: after ~1,750 updates at rho = 0.95, rho^m underflowed float32, the inverse
    overflowed and NaN reached the weights."""
    opt = train_dead(3000, inverse_every=100)
    assert opt.preconditioner.identity_weights("2")[0] < 1e-60  # far below float32's range


@pytest.mark.parametrize(
    "scheme", ["factored-relative", "factored", "pi", "eigenbasis", "eigenbasis-relative"]
)
@pytest.mark.parametrize("decay", [0.5, 0.0])
def test_dead_layer_is_damped_safely_by_every_scheme(scheme: str, decay: float) -> None:
    """rho = 0.5 underflows float32 within 150 updates; ``factor_decay=0`` (no identity at
    all) raised at the first refresh before."""
    train_dead(300 if decay else 20, inverse_every=10, factor_decay=decay, damping_scheme=scheme)


# --------------------------------------------------------------------------- loss scale


@pytest.mark.parametrize("inverse", ["eigh", "rsvd", "brand"])
def test_zero_initialisation_makes_the_direction_loss_scale_invariant(inverse: str) -> None:
    """With factor_init='zero' and relative damping, loss * c gives direction / c exactly
    (c a power of two, so every product scales exactly); the identity initialisation does
    not."""
    base = mlp().double()
    x, y = data(40)
    options: dict[str, Any] = {
        "inverse": inverse,
        "factor_dtype": F64,
        "damping": 0.1,
        "damping_scheme": "factored-relative",
    }
    if inverse != "eigh":
        options["rank"] = 4
    if inverse == "brand":
        options["rank_cap"] = 4

    def direction(c: float, init: str) -> torch.Tensor:
        model = copy.deepcopy(base)
        p = kfac.KFACPreconditioner(
            model, factor_every=1, inverse_every=1, factor_init=init, **options
        )
        for i in range(3):
            model.zero_grad()
            (
                c * F.cross_entropy(model(x[10 * i : 10 * i + 20]), y[10 * i : 10 * i + 20])
            ).backward()
            p.step()
        return torch.cat([q.grad.flatten() for q in model.parameters()])

    c = 1024.0
    torch.testing.assert_close(direction(1.0, "zero"), c * direction(c, "zero"), rtol=0, atol=0)
    identity = direction(1.0, "identity") - c * direction(c, "identity")
    assert float(identity.norm()) > 1e-3 * float(direction(1.0, "identity").norm())


# --------------------------------------------------------------------------- checkpoints


def _trained(inverse: str = "rsvd", steps: int = 3, **options: Any) -> tuple[nn.Module, kfac.KFAC]:
    torch.manual_seed(0)
    model = mlp().double()
    opt = kfac.KFAC(
        model,
        lr=0.1,
        momentum=0.9,
        inverse=inverse,
        factor_every=1,
        inverse_every=2,
        factor_dtype=F64,
        fisher="mc",
        loss="cross_entropy",
        **({"rank": 3} if inverse != "eigh" else {}),
        **options,
    )
    _steps(model, opt, steps)
    return model, opt


def _steps(model: nn.Module, opt: kfac.KFAC, steps: int) -> None:
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(32, 5, dtype=F64, generator=gen)
    y = torch.randint(3, (32,), generator=gen)
    for _ in range(steps):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()


def _corrupt(state: dict, name: str) -> dict:
    state = copy.deepcopy(state)
    k, layer = state["kfac"], state["kfac"]["layers"]["0"]
    if name == "steps":
        k["steps"] = -1
    elif name == "steps-type":
        k["steps"] = "3"
    elif name == "block":
        k["block_name"] = "mbf"
    elif name == "layers":
        del k["layers"]["2"]
    elif name == "missing-key":
        del layer["A"]["identity"]
    elif name == "matrix-shape":
        layer["A"]["matrix"] = torch.zeros(4, 4, dtype=F64)
    elif name == "matrix-nan":
        layer["A"]["matrix"][0, 0] = float("nan")
    elif name == "negative-eigenvalue":
        layer["G"]["rep"][1][0] = -1.0
    elif name == "rep-nan":
        layer["G"]["rep"][0][0, 0] = float("nan")
    elif name == "rep-dim":
        layer["A"]["rep"][0] = layer["A"]["rep"][0][:-1]
    elif name == "updates":
        layer["A"]["updates"] = -2
    elif name == "identity":
        layer["G"]["identity"] = 2.0
    elif name == "generators":
        layer["A"]["rng"] = torch.zeros(3)
    elif name == "mc-generator":
        k["generator"] = torch.zeros(7, dtype=torch.int64)
    elif name == "momentum-shape":
        state["state"][0]["momentum_buffer"] = torch.zeros(3)
    elif name == "momentum-nan":
        state["state"][0]["momentum_buffer"] = state["state"][0]["momentum_buffer"] * float("nan")
    elif name == "groups":
        state["param_groups"][0]["params"] = state["param_groups"][0]["params"][:-1]
    else:  # pragma: no cover - the parametrisation lists every name
        raise AssertionError(name)
    return state


def _same(a: Any, b: Any) -> bool:
    """Exact equality of nested state dicts (tensors bit for bit, NaN equal to NaN)."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and torch.equal(
            torch.nan_to_num(a, nan=0.5), torch.nan_to_num(b, nan=0.5)
        )
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    return bool(a == b)


CORRUPTIONS = [
    "steps", "steps-type", "block", "layers", "missing-key", "matrix-shape", "matrix-nan",
    "negative-eigenvalue", "rep-nan", "rep-dim", "updates", "identity", "generators",
    "mc-generator", "momentum-shape", "momentum-nan", "groups",
]  # fmt: skip


@pytest.mark.parametrize("corruption", CORRUPTIONS)
def test_corrupted_checkpoint_changes_nothing(corruption: str) -> None:
    """Before: 9 of 17 corruptions replaced the momentum and some factors before failing,
    and a NaN factor or negative eigenvalues were accepted."""
    model, opt = _trained()
    saved = opt.state_dict()
    _steps(model, opt, 2)  # the live state differs from the checkpoint
    before = copy.deepcopy(opt.state_dict())
    with pytest.raises(ValueError, match="state_dict"):
        opt.load_state_dict(_corrupt(saved, corruption))
    assert _same(opt.state_dict(), before)
    # and the run continues exactly as one that never saw the corrupted checkpoint
    twin_model, twin = _trained(steps=5)
    _steps(model, opt, 2)
    _steps(twin_model, twin, 2)
    for a, b in zip(model.parameters(), twin_model.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_generators_saved_on_an_absent_device_are_reseeded_deterministically() -> None:
    """Before: a checkpoint saved from a CUDA run with a randomized strategy failed on a
    CUDA-less machine ("Cannot get CUDA generator")."""
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: the saved states would be restored instead")
    _, opt = _trained()
    cuda_like = copy.deepcopy(opt.state_dict())
    for factor in cuda_like["kfac"]["layers"]["0"].values():  # a CUDA-sized random stream
        factor["rng"] = torch.arange(16, dtype=torch.uint8)
    cuda_like["kfac"]["generator"] = torch.arange(16, dtype=torch.uint8)  # a CUDA-sized state
    m1, o1 = _trained()
    m2, o2 = _trained()
    o1.load_state_dict(copy.deepcopy(cuda_like))  # torch.optim keeps the loaded tensors
    o2.load_state_dict(copy.deepcopy(cuda_like))
    _steps(m1, o1, 3)
    _steps(m2, o2, 3)  # the seeding rule is deterministic: both continue identically
    for a, b in zip(m1.parameters(), m2.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert all(bool(torch.isfinite(p).all()) for p in m1.parameters())


def test_embedding_is_left_to_the_base_update() -> None:
    """nn.Embedding is not preconditioned (docs/kfac.md): its gradient is untouched."""
    model = nn.Sequential(nn.Embedding(10, 6), nn.Flatten(), nn.Linear(18, 3))
    precond = kfac.KFACPreconditioner(model, factor_every=1, inverse_every=1)
    assert precond.layer_names == ["2"]
    tokens, y = torch.randint(10, (8, 3)), torch.randint(3, (8,))
    F.cross_entropy(model(tokens), y).backward()
    raw = model[0].weight.grad.clone()
    precond.step()
    torch.testing.assert_close(model[0].weight.grad, raw, rtol=0, atol=0)


# --------------------------------------------------------------------------- layer types


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (
            lambda: torch.nn.utils.parametrizations.weight_norm(nn.Linear(4, 3)),
            r"Unsupported layer '0' \(\w+\): its weight is computed by a parametrization",
        ),
        (
            lambda: torch.nn.utils.parametrizations.spectral_norm(nn.Linear(4, 3)),
            r"computed by a parametrization",
        ),
        (
            lambda: torch.nn.utils.spectral_norm(nn.Linear(4, 3)),
            r"its weight is a computed tensor, not a Parameter",
        ),
        (lambda: nn.LazyLinear(3), r"its weight is not initialized yet \(a lazy module\)"),
        (lambda: nn.ConvTranspose2d(4, 3, 2), r"no K-FAC layer helper for this type"),
        (  # before: trained with the imaginary parts silently dropped from the factors
            lambda: nn.Linear(4, 3, dtype=torch.complex64),
            r"its weight is torch.complex64; K-FAC's factors are real",
        ),
    ],
    ids=["weight_norm", "spectral_norm", "old-spectral_norm", "lazy", "conv-transpose", "complex"],
)
def test_layers_kfac_cannot_describe_are_rejected_with_what_to_do(make, message: str) -> None:
    """Before: misleading errors, a silently changed bias gradient, an obscure reshape
    error, or (ConvTranspose2d) a layer silently left out."""
    model = nn.Sequential(make(), nn.Flatten(), nn.Linear(2, 2))
    with pytest.raises(ValueError, match=message):
        kfac.KFACPreconditioner(model)
    with pytest.raises(ValueError, match=r"exclude it with skip_layers=\['0'\]"):
        kfac.KFACPreconditioner(model)
    assert kfac.KFACPreconditioner(model, skip_layers=["0"]).layer_names == ["2"]


def test_old_style_weight_norm_is_rejected() -> None:
    with pytest.warns(FutureWarning, match="deprecated"):
        layer = torch.nn.utils.weight_norm(nn.Linear(4, 3))
    with pytest.raises(ValueError, match=r"computed tensor, not a Parameter"):
        kfac.KFACPreconditioner(nn.Sequential(layer))


@pytest.mark.parametrize("options", [{"kernel_size": 3}, {"kernel_size": 3, "padding": "same"}])
def test_conv1d_equals_the_same_conv2d(options: dict) -> None:
    """Before: Conv1d layers were silently left out."""
    conv1 = nn.Conv1d(3, 4, dtype=F64, **options)
    conv2 = nn.Conv2d(3, 4, (1, 3), padding=(0, 1) if "padding" in options else 0, dtype=F64)
    with torch.no_grad():
        conv2.weight.copy_(conv1.weight.unsqueeze(2))
        conv2.bias.copy_(conv1.bias)
    x = torch.randn(6, 3, 9, dtype=F64)
    p1 = exact_preconditioner(nn.Sequential(conv1))
    p2 = exact_preconditioner(nn.Sequential(conv2))
    conv1(x).square().sum().backward()
    conv2(x.unsqueeze(2)).square().sum().backward()
    p1.step()
    p2.step()
    for a, b in zip(p1.factors("0"), p2.factors("0"), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(conv1.weight.grad, conv2.weight.grad.squeeze(2))


def test_a_step_called_inside_autocast_computes_in_the_factor_dtype() -> None:
    """Before: the refresh's products ran in bfloat16 under the caller's autocast and the
    float32 eigenbasis failed its orthonormality check."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3))
    reference = copy.deepcopy(model)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(24, 5, generator=g), torch.randint(0, 3, (24,), generator=g)
    options = {"lr": 0.1, "damping_scheme": "eigenbasis", "factor_every": 1, "inverse_every": 1}
    inside, outside = kfac.KFAC(model, **options), kfac.KFAC(reference, **options)
    for _ in range(3):
        for net, opt, wrap in ((model, inside, True), (reference, outside, False)):
            opt.zero_grad()
            nn.functional.cross_entropy(net(x), y).backward()
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=wrap):
                opt.step()
    for a, b in zip(model.parameters(), reference.parameters(), strict=True):
        assert torch.equal(a, b)


def test_mc_fisher_of_a_squeezed_regression_output_is_per_sample() -> None:
    """A model returning ``(n,)`` (a regression output squeezed inside its forward) and the
    same model returning ``(n, 1)`` have one MC Fisher. Before: the 1-D output was read as
    one sample of ``n`` entries, its targets' variance ``n / 2``: G ``n`` times too large."""

    class Squeezed(nn.Module):
        def __init__(self, net: nn.Module) -> None:
            super().__init__()
            self.net = net

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.net(x).squeeze(-1)

    base = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 1)).double()
    x, y = torch.randn(16, 5, dtype=F64), torch.randn(16, 1, dtype=F64)
    factors = []
    for model, target in ((base, y), (Squeezed(copy.deepcopy(base)), y.squeeze(-1))):
        precond = exact_preconditioner(model, fisher="mc", loss="mse")
        F.mse_loss(model(x), target).backward()
        precond.step()
        factors.append([f for name in precond.layer_names for f in precond.factors(name)])
    for a, b in zip(*factors, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=0)


def test_mc_fisher_skips_a_nan_batch_and_an_empty_batch() -> None:
    """Before: a NaN in the batch made the sampler raise inside the model's forward
    ("probability tensor contains either `inf`, `nan` or element < 0"), and an empty batch
    raised ZeroDivisionError in the sampled backward."""
    model = mlp()
    opt = kfac.KFAC(model, lr=0.1, momentum=0.0, fisher="mc", loss="cross_entropy", factor_every=1)
    x, y = torch.randn(8, 5), torch.randint(3, (8,))

    def step(x: torch.Tensor, y: torch.Tensor) -> None:
        opt.zero_grad()
        F.cross_entropy(model(x), y, reduction="sum").backward()
        opt.step()

    step(x, y)
    before = [p.detach().clone() for p in model.parameters()]
    bad = x.clone()
    bad[2, 1] = float("nan")
    with pytest.warns(RuntimeWarning, match="non-finite gradient; step skipped"):
        step(bad, y)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        step(x[:0], y[:0])
        assert all(torch.equal(p, q) for p, q in zip(before, model.parameters(), strict=True))
        assert opt.preconditioner.state("0").A.updates == 1
        step(x, y)
    assert opt.preconditioner.state("0").A.updates == 2
    assert all(torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.parametrize("inverse", ["eigh", "brand"])
def test_an_empty_batch_leaves_the_factors_and_parameters_alone(inverse: str) -> None:
    """Before: ZeroDivisionError in the statistics' scaling (no samples)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(40, 30))
    options = {} if inverse == "eigh" else {"rank": 2, "rank_cap": 4}
    # no momentum: a momentum buffer would move the parameters on a zero gradient
    opt = kfac.KFAC(
        model, lr=0.1, momentum=0.0, factor_every=1, inverse_every=1, inverse=inverse, **options
    )
    x = torch.randn(8, 40)
    opt.zero_grad()
    model(x).sum().backward()
    opt.step()
    state = copy.deepcopy(opt.preconditioner.state_dict()["layers"])
    before = [p.detach().clone() for p in model.parameters()]
    opt.zero_grad()
    model(x[:0]).sum().backward()
    opt.step()
    assert opt.preconditioner.steps == 2
    for a, b in zip(before, model.parameters(), strict=True):
        assert torch.equal(a, b)
    after = opt.preconditioner.state_dict()["layers"]

    def tensors(value: object, path: str = "") -> dict[str, torch.Tensor]:
        if isinstance(value, torch.Tensor):
            return {path: value}
        if isinstance(value, dict):
            return {
                k: t for key, v in value.items() for k, t in tensors(v, f"{path}/{key}").items()
            }
        if isinstance(value, (list, tuple)):
            return {
                k: t for i, v in enumerate(value) for k, t in tensors(v, f"{path}/{i}").items()
            }
        return {}

    saved, now = tensors(state), tensors(after)
    assert set(saved) == set(now)
    assert len(saved) >= 4
    for key, value in saved.items():
        assert torch.equal(value, now[key]), key


# --------------------------------------------------------------------------- model copies


class SelfAttention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.attn(x, x, x)[0].mean(1))


def hooks(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


COPIED = {
    "kfac-mc": (mlp, lambda m: kfac.KFAC(m, lr=0.1, fisher="mc", loss="cross_entropy")),
    "qekldwrm": (mlp, lambda m: kfac.QEKLDWRM(m, lr=0.1, factor_every=1, inverse_every=1)),
    "attention": (SelfAttention, lambda m: kfac.KFAC(m, lr=0.1, factor_every=1)),
}


def example(model: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    shape = (4, 5, 8) if isinstance(model, SelfAttention) else (4, 5)
    return torch.randn(*shape), torch.randint(3, (4,))


def train(model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor) -> None:
    for _ in range(2):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()


@pytest.mark.parametrize("case", list(COPIED))
def test_a_dropped_optimizer_takes_its_hooks_with_it(case: str) -> None:
    """Before: the model held every optimizer ever built on it (its hooks kept recording,
    their rows accumulating, and an attention module kept the replaced forward)."""
    build, make = COPIED[case]
    model = build()
    x, y = example(model)
    opt = make(model)
    train(model, opt, x, y)
    assert hooks(model) > 0
    del opt
    gc.collect()
    assert hooks(model) == 0
    assert all("forward" not in m.__dict__ for m in model.modules())
    train(model, make(model), x, y)  # a new optimizer on the same model trains as usual


@pytest.mark.parametrize("copier", ["deepcopy", "torch.save"])
@pytest.mark.parametrize("case", list(COPIED))
def test_copies_of_a_hooked_model_are_plain_models(case: str, copier: str) -> None:
    """``copy.deepcopy(model)`` (an EMA or teacher model) and ``torch.save(model)``. Before:
    the copy's forwards were recorded by the original's optimizer (a training forward of the
    copy made the next step raise), QE-KLD-WRM's copied hook called a broken copy of the
    optimizer, an attention copy computed with the original's weights, and ``torch.save``
    failed (local hook functions cannot be pickled)."""
    build, make = COPIED[case]
    model = build()
    x, y = example(model)
    opt = make(model)
    train(model, opt, x, y)

    def saved_and_loaded() -> nn.Module:
        buffer = io.BytesIO()
        torch.save(model, buffer)
        buffer.seek(0)
        return torch.load(buffer, weights_only=False)

    other = copy.deepcopy(model) if copier == "deepcopy" else saved_and_loaded()
    with torch.no_grad():
        for p in other.parameters():
            p.mul_(2.0)
    expected = other(x)
    if isinstance(other, SelfAttention):  # the copy's attention uses the copy's weights
        with torch.no_grad():
            original = model.attn(x, x, x)[0]
        assert not torch.allclose(other.attn(x, x, x)[0], original)
    other.eval()
    torch.testing.assert_close(other(x), expected)  # its own weights, torch's forward
    other.train()
    sgd = torch.optim.SGD(other.parameters(), lr=0.1)
    sgd.zero_grad()
    F.cross_entropy(other(x), y).backward()
    sgd.step()
    other(x)  # a training forward without a backward: nothing of the original's
    reference = build()
    reference.load_state_dict(model.state_dict())
    reference_opt = make(reference)
    reference_opt.load_state_dict(copy.deepcopy(opt.state_dict()))  # no shared buffers
    train(model, opt, x, y)
    train(reference, reference_opt, x, y)
    for p, q in zip(model.parameters(), reference.parameters(), strict=True):
        assert torch.equal(p, q)
