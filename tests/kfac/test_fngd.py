"""FNGD: Grams against torch.func per-sample gradients, directions against the dense damped
empirical-Fisher solve (per layer and shared), stored-coefficient reuse, keys, refresh,
state round trips and the errors (float64 references)."""

from __future__ import annotations

import copy
import io

import pytest
import torch
from torch import nn

import kfac
from kfac import _persample as ps
from kfac.fngd import FNGDBlock

from .conftest import Branchy, convnet
from .test_mbf import Positions, data, layer_matrix, per_sample_grads

RTOL = 1e-8


def per_sample_layers(model: nn.Module, x, y, prefixes: dict[str, str]) -> dict[str, torch.Tensor]:
    """``(n, P_l)`` per-sample gradients of each layer, in the ``d_G x d_A`` layout."""
    samples = per_sample_grads(model, x, y)
    return {
        name: layer_matrix(samples, prefix, batched=True).reshape(x.shape[0], -1)
        for name, prefix in prefixes.items()
    }


def recorded_rows(model: nn.Module, x, y, name: str):
    """The rows the hooks record for layer ``name`` (float64), as per-sample tensors."""
    precond = kfac.FNGDPreconditioner(model, store="none", factor_dtype=torch.float64)
    nn.functional.cross_entropy(model(x), y).backward()
    batch = precond.recorded(name)
    precond.remove()
    model.zero_grad()
    return ps.per_sample_rows(batch)


class Attention(nn.Module):
    """Self-attention over 3 positions (packed in_proj and out_proj), then a classifier."""

    def __init__(self) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(4, 2, batch_first=True)
        self.head = nn.Linear(12, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.attn(x, x, x, need_weights=False)[0].flatten(1))


CASES = {
    "linear": (lambda: nn.Sequential(nn.Linear(6, 9), nn.Tanh(), nn.Linear(9, 4)), (6,), 4,
               {"0": "0.", "2": "2."}),
    "linear-no-bias": (lambda: nn.Sequential(nn.Linear(6, 9, bias=False), nn.Tanh(),
                                             nn.Linear(9, 4, bias=False)), (6,), 4,
                       {"0": "0.", "2": "2."}),
    "positions": (Positions, (3, 4), 3, {"mix": "mix.", "head": "head."}),
    "conv": (convnet, (2, 8, 8), 4, {"0": "0.", "3": "3."}),
    "conv-strided": (lambda: convnet(stride=2, padding=0), (2, 8, 8), 4, {"0": "0.", "3": "3."}),
    "conv-dilated": (lambda: convnet(padding=2, dilation=2), (2, 8, 8), 4, {"0": "0.", "3": "3."}),
    "conv1d": (lambda: nn.Sequential(nn.Conv1d(2, 3, 3, padding=1), nn.Tanh(), nn.Flatten(),
                                     nn.Linear(24, 4)), (2, 8), 4, {"0": "0.", "3": "3."}),
    "attention": (Attention, (3, 4), 3, {"attn.in_proj": "attn.in_proj_",
                                         "attn.out_proj": "attn.out_proj.", "head": "head."}),
}  # fmt: skip


def make_case(case: str, n: int = 7, seed: int = 1):
    build, shape, classes, prefixes = CASES[case]
    torch.manual_seed(0)
    model = build().double()
    x, y = data(n, shape, classes, seed)
    return model, x, y, prefixes


# torch.func has no batching rule for CPU flash attention yet: it falls back (slowly) and warns
VMAP_ATTENTION = pytest.mark.filterwarnings("ignore:There is a performance drop:UserWarning")


@VMAP_ATTENTION
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("method", ["positions", "explicit"])
def test_gram_equals_torch_func_per_sample_gradients(case, method) -> None:
    model, x, y, prefixes = make_case(case)
    expected = per_sample_layers(copy.deepcopy(model), x, y, prefixes)
    for name in prefixes:
        a, g = recorded_rows(model, x, y, name)
        K = ps.gram(a, g, method)
        G = expected[name]
        torch.testing.assert_close(K, G @ G.T, rtol=RTOL, atol=RTOL * (G @ G.T).abs().max())
        V = torch.randn(g.shape[-1], a.shape[-1], dtype=torch.float64)
        torch.testing.assert_close(ps.project(a, g, V), G @ V.flatten(), rtol=RTOL, atol=1e-12)
        w = torch.randn(x.shape[0], dtype=torch.float64)
        torch.testing.assert_close(
            ps.weighted_sum(a, g, w).flatten(), G.T @ w, rtol=RTOL, atol=1e-12
        )


def test_the_gram_cost_rule() -> None:
    assert ps.gram_method(128, 1, 1000, 1000) == "positions"  # Linear: always Hadamard
    assert ps.gram_method(128, 784, 10, 16) == "explicit"  # first conv of a CNN
    assert ps.gram_method(4, 4, 1000, 1000) == "positions"
    assert ps.gram_method(128, 1, 10, 10, "explicit") == "explicit"


def dense_direction(G: torch.Tensor, damping: float, mode: str) -> torch.Tensor:
    """``(F + lambda I)^{-1} g`` with ``F = G^T G / n``, ``g = G^T 1 / n`` (``G`` is
    ``(n, P)``), solved densely."""
    n, P = G.shape
    F = G.T @ G / n
    lam = damping * torch.trace(G @ G.T) / n if mode == "relative" else damping
    return torch.linalg.solve(F + lam * torch.eye(P, dtype=G.dtype), G.mean(dim=0))


@VMAP_ATTENTION
@pytest.mark.parametrize(
    "case", ["linear", "positions", "conv", "conv-strided", "conv1d", "attention"]
)
@pytest.mark.parametrize("mode", ["relative", "absolute"])
@pytest.mark.parametrize("coefficients", ["per-layer", "shared"])
def test_direction_equals_the_dense_damped_fisher_solve(case, mode, coefficients) -> None:
    model, x, y, prefixes = make_case(case)
    expected_grads = per_sample_layers(copy.deepcopy(model), x, y, prefixes)
    damping = 0.3 if mode == "relative" else 0.05
    precond = kfac.FNGDPreconditioner(
        model, damping=damping, damping_mode=mode, coefficients=coefficients, store="none",
        factor_dtype=torch.float64,
    )  # fmt: skip
    nn.functional.cross_entropy(model(x), y).backward()
    precond.step()
    names = list(prefixes)
    if coefficients == "per-layer":
        expected = {name: dense_direction(expected_grads[name], damping, mode) for name in names}
    else:
        G = torch.cat([expected_grads[name] for name in names], dim=1)
        flat = dense_direction(G, damping, mode)
        sizes = [expected_grads[name].shape[1] for name in names]
        expected = dict(zip(names, flat.split(sizes), strict=True))
    for name in names:
        written = precond.layer(name).grad_matrix(torch.float64).flatten()
        scale = expected[name].abs().max()
        torch.testing.assert_close(written, expected[name], rtol=RTOL, atol=RTOL * scale)


def train_epochs(model, clean, precond, x, y, epochs: int, batch: int, shuffle: bool = True):
    """Batches of ``batch`` samples (reshuffled per epoch); per step: (indices, direction of
    every layer, per-sample gradients of every layer). ``clean``: a hook-free copy of
    ``model`` for the per-sample references."""
    gen = torch.Generator().manual_seed(3)
    n = x.shape[0]
    out = []
    sgd = torch.optim.SGD(model.parameters(), lr=0.05)
    for _ in range(epochs):
        order = torch.randperm(n, generator=gen) if shuffle else torch.arange(n)
        for idx in order.split(batch):
            sgd.zero_grad()
            clean.load_state_dict(model.state_dict())
            nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
            precond.step(indices=idx)
            directions = {
                name: precond.layer(name).grad_matrix(torch.float64).flatten()
                for name in precond.layer_names
            }
            samples = per_sample_layers(clean, x[idx], y[idx], {"0": "0.", "3": "3."})
            out.append((idx, directions, samples))
            sgd.step()
    return out


@pytest.mark.parametrize("coefficients", ["per-layer", "shared"])
def test_later_epochs_apply_the_stored_coefficients_to_the_current_gradients(
    coefficients, monkeypatch
) -> None:
    model, x, y, _ = make_case("conv", n=12)
    clean = copy.deepcopy(model)
    precond = kfac.FNGDPreconditioner(
        model, damping=0.2, coefficients=coefficients, factor_dtype=torch.float64,
        weighted_step="rows",  # the outer products (the loss path: the test below)
    )  # fmt: skip
    first = train_epochs(model, clean, precond, x, y, epochs=1, batch=4)
    stored = {
        name: precond.coefficients(None if coefficients == "shared" else name)
        for name in precond.layer_names
    }
    tables = {name: s.table.clone() for name, s in stored.items()}

    def no_solve(*args, **kwargs):
        raise AssertionError("a coefficient was recomputed in epoch 2")

    monkeypatch.setattr(kfac.fngd.ln, "smw_coefficients", no_solve)
    monkeypatch.setattr(ps, "gram", no_solve)
    second = train_epochs(model, clean, precond, x, y, epochs=1, batch=4)
    assert all(row["reused"] == 3 and row["computed"] == 3 for row in precond.diagnostics())
    for idx, directions, samples in second:
        for name, D in directions.items():
            alpha = tables[name][idx]
            expected = samples[name].T @ alpha  # G_t alpha_stored
            torch.testing.assert_close(D, expected, rtol=1e-12, atol=1e-12 * expected.abs().max())
    last = second[-1][0]
    for name in precond.layer_names:  # the stored values themselves, bit for bit
        assert torch.equal(precond.state(name).alpha, tables[name][last])
    # epoch 1 stored exactly what it applied
    for idx, directions, samples in first:
        for name, D in directions.items():
            G = samples[name]
            torch.testing.assert_close(
                D, G.T @ tables[name][idx], rtol=1e-12, atol=1e-12 * D.abs().max()
            )


def test_the_applied_direction_is_exactly_the_weighted_sum_of_the_rows() -> None:
    model, x, y, _ = make_case("linear", n=6)
    precond = kfac.FNGDPreconditioner(model, store="slot", steps_per_epoch=1)
    for step in range(2):
        model.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        batch = {name: precond.recorded(name) for name in precond.layer_names}
        precond.step()
        for name in precond.layer_names:
            a, g = ps.per_sample_rows(batch[name], scaled=False)
            alpha = precond.coefficients(name).slots[0]
            expected = ps.weighted_sum(a, g, alpha * batch[name].n).to(torch.float32)
            assert torch.equal(precond.layer(name).grad_matrix(torch.float32), expected)
        assert [r["reused"] for r in precond.diagnostics()] == [step, step]


def test_refresh_epochs_recompute_and_slot_keys() -> None:
    model, x, y, _ = make_case("linear", n=8)
    precond = kfac.FNGDPreconditioner(
        model, store="slot", steps_per_epoch=2, refresh_epochs=2, factor_dtype=torch.float64
    )
    history = []
    for step in range(8):  # epochs 0..3: computed in 0 and 2, reused in 1 and 3
        model.zero_grad()
        idx = torch.arange(4) + 4 * (step % 2)
        nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
        precond.step()
        history.append((precond.state("0").computed, precond.state("0").reused))
        if step in (1, 5):
            saved = precond.coefficients("0").slots[1].clone()
        if step == 3:
            assert torch.equal(precond.coefficients("0").slots[1], saved)
        model[0].weight.data.add_(0.1)  # the parameters move: recomputed values differ
    assert history == [(1, 0), (2, 0), (2, 1), (2, 2), (3, 2), (4, 2), (4, 3), (4, 4)]
    assert not torch.equal(precond.coefficients("0").slots[1], torch.zeros(4))


def test_compute_epochs_recompute_the_first_epochs() -> None:
    model, x, y, _ = make_case("linear", n=8)
    precond = kfac.FNGDPreconditioner(model, steps_per_epoch=2, compute_epochs=2)
    for step in range(6):
        model.zero_grad()
        idx = torch.arange(4) + 4 * (step % 2)
        nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
        precond.step(indices=idx)
    assert (precond.state("0").computed, precond.state("0").reused) == (4, 2)


def test_index_keys_follow_the_samples_across_batches() -> None:
    """A batch whose samples all have stored coefficients reuses them, whatever the batch;
    a batch with one unseen sample is recomputed."""
    model, x, y, _ = make_case("linear", n=10)
    precond = kfac.FNGDPreconditioner(model, factor_dtype=torch.float64)

    def step(idx):
        model.zero_grad()
        nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
        precond.step(indices=idx)
        return precond.state("0")

    step(torch.tensor([0, 1, 2, 3]))
    step(torch.tensor([4, 5, 6, 7]))
    table = precond.coefficients("0").table.clone()
    state = step(torch.tensor([6, 1, 4, 3]))
    assert (state.computed, state.reused) == (2, 1)
    assert torch.equal(state.alpha, table[torch.tensor([6, 1, 4, 3])])
    state = step(torch.tensor([0, 1, 2, 9]))
    assert (state.computed, state.reused) == (3, 1)
    assert len(precond.coefficients("0")) == 9  # 0-7 and 9


def test_state_dict_round_trip_keeps_the_stored_coefficients() -> None:
    model, x, y, _ = make_case("linear", n=8)
    opt = kfac.FNGD(model, lr=0.1, momentum=0.9, coefficients="shared", weighted_step="rows")
    batches = torch.arange(8).split(4)

    def run(model, opt):
        out = []
        for idx in batches:
            opt.zero_grad()
            loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
            loss.backward()
            opt.step(indices=idx)
            out.append(loss.item())
        return out

    run(model, opt)  # epoch 1 computes and stores
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buffer)
    expected = run(model, opt)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    model2, *_ = make_case("linear", n=8)
    model2.load_state_dict(saved["model"])
    opt2 = kfac.FNGD(model2, lr=0.1, momentum=0.9, coefficients="shared", weighted_step="rows")
    opt2.load_state_dict(saved["opt"])
    assert len(opt2.preconditioner.coefficients()) == 8
    assert run(model2, opt2) == expected
    assert all(row["reused"] == 2 for row in opt2.preconditioner.diagnostics())


def test_errors() -> None:
    model, x, y, _ = make_case("linear", n=4)
    for options, message in (
        ({"coefficients": "global"}, r"Invalid coefficients: 'global'; valid names"),
        ({"damping_mode": "trace"}, r"Invalid damping_mode: 'trace'; valid names"),
        ({"store": "epoch"}, r"Invalid store: 'epoch'; valid names"),
        ({"store": "slot"}, r"Invalid steps_per_epoch: None \(store='slot' needs"),
        ({"refresh_epochs": 2}, r"Invalid steps_per_epoch: None \(refresh_epochs needs"),
        ({"steps_per_epoch": 0}, r"Invalid steps_per_epoch: 0 \(must be an int >= 1"),
        ({"refresh_epochs": 1.5, "steps_per_epoch": 2}, r"Invalid refresh_epochs: 1.5"),
        ({"compute_epochs": 0}, r"Invalid compute_epochs: 0 \(must be an int >= 1\)"),
        ({"compute_epochs": 2}, r"Invalid steps_per_epoch: None \(compute_epochs > 1 needs"),
        ({"gram": "dense"}, r"Invalid gram: 'dense'; valid names"),
        ({"factor_every": 2}, r"Invalid option 'factor_every': FNGD computes"),
    ):
        with pytest.raises(ValueError, match=message):
            kfac.FNGDPreconditioner(model, **options)
    with pytest.raises(ValueError, match=r"Invalid fisher: 'mc'; FNGD re-weights"):
        kfac.Preconditioner(model, "fngd", fisher="mc", loss="cross_entropy")
    precond = kfac.FNGDPreconditioner(model)
    nn.functional.cross_entropy(model(x), y).backward()
    with pytest.raises(ValueError, match=r"needs the batch's dataset `indices`"):
        precond.step()
    nn.functional.cross_entropy(model(x), y).backward()
    with pytest.raises(ValueError, match=r"Invalid indices: 3 indices for a batch of 4"):
        precond.step(indices=torch.arange(3))
    for bad, message in (
        (torch.zeros(4), r"Invalid indices: must be a 1-D integer tensor"),
        (torch.arange(4).reshape(2, 2), r"Invalid indices: must be a 1-D integer tensor"),
        (torch.tensor([0, -1, 2, 3]), r"Invalid indices: must be >= 0, got min -1"),
    ):
        with pytest.raises(ValueError, match=message):
            precond.set_indices(bad)
    # before: torch's "new(): invalid data type 'str'", not naming `indices`
    with pytest.raises(TypeError, match=r"Invalid indices: must be a 1-D integer tensor, got str"):
        precond.set_indices("abc")
    other = kfac.FNGDPreconditioner(make_case("linear")[0], coefficients="shared")
    with pytest.raises(ValueError, match=r"saved with coefficients='shared'"):
        precond.load_state_dict(other.state_dict())
    assert isinstance(precond.block, FNGDBlock)


def test_weighted_loss_path_equals_the_outer_product_path() -> None:
    """Epoch 2 with ``loss_weights``: the weighted loss's gradient is the same direction as
    the default path's weighted outer products, and the hooks record nothing."""
    model, x, y, _ = make_case("conv", n=12)
    twin = copy.deepcopy(model)
    options = {"damping": 0.2, "coefficients": "shared", "factor_dtype": torch.float64}
    plain = kfac.FNGD(model, lr=0.05, momentum=0.9, weighted_step="rows", **options)
    weighted = kfac.FNGD(twin, lr=0.05, momentum=0.9, **options)  # "loss", the default
    batches = torch.arange(12).split(4)
    for epoch in range(2):
        for idx in batches[::-1] if epoch else batches:
            plain.zero_grad()
            nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
            plain.step(indices=idx)
            weighted.zero_grad()
            w = weighted.preconditioner.loss_weights(idx)
            assert (w is None) == (epoch == 0)
            assert bool(weighted.preconditioner.capture_plan()) == (epoch == 0)
            losses = nn.functional.cross_entropy(twin(x[idx]), y[idx], reduction="none")
            (losses.mean() if w is None else (w * losses).sum()).backward()
            weighted.step(indices=idx)
            assert weighted.preconditioner.capture_plan()  # re-armed for the next step
            for p, q in zip(model.parameters(), twin.parameters(), strict=True):
                torch.testing.assert_close(p, q, rtol=1e-10, atol=1e-12)
    rows = weighted.preconditioner.diagnostics()
    assert [(r["computed"], r["reused"]) for r in rows] == [(3, 3), (3, 3)]


def test_loss_weights_need_the_weighted_loss_step() -> None:
    model, *_ = make_case("linear")
    precond = kfac.FNGDPreconditioner(model)
    assert precond.fngd.weighted_step == "rows"  # per-layer: the only path
    with pytest.raises(ValueError, match=r"Invalid weighted_step: 'rows'; loss weights need"):
        precond.loss_weights(torch.arange(4))
    shared = kfac.FNGDPreconditioner(make_case("linear")[0], coefficients="shared")
    assert shared.fngd.weighted_step == "loss"  # the measured default with shared ones
    with pytest.raises(ValueError, match=r"Invalid weighted_step: 'loss' needs coefficients="):
        kfac.FNGDPreconditioner(model, weighted_step="loss")
    with pytest.raises(ValueError, match=r"Invalid weighted_step: 'backward'; valid names"):
        kfac.FNGDPreconditioner(model, coefficients="shared", weighted_step="backward")
    with pytest.raises(ValueError, match=r"Invalid refresh_steps: 0 \(must be an int >= 1\)"):
        kfac.FNGDPreconditioner(model, refresh_steps=0)


def test_an_unweighted_backward_on_a_reusing_loss_step_raises() -> None:
    """``weighted_step="loss"``: a reusing step whose backward was the batch-mean loss is
    refused (not silently formed from rows), and leaves nothing behind: the next, weighted
    step runs."""
    model, x, y, _ = make_case("linear", n=8)
    opt = kfac.FNGD(model, lr=0.1, coefficients="shared")
    idx = torch.arange(8)
    for _ in range(2):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
        if opt.preconditioner.steps == 0:
            opt.step(indices=idx)
            continue
        before = [p.detach().clone() for p in model.parameters()]
        with pytest.raises(ValueError, match=r"step 1 reuses stored shared coefficients but"):
            opt.step(indices=idx)
        assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before, strict=True))
    assert opt.preconditioner.steps == 1
    opt.zero_grad()
    w = opt.preconditioner.loss_weights(idx)
    assert w is not None
    losses = nn.functional.cross_entropy(model(x[idx]), y[idx], reduction="none")
    (w * losses).sum().backward()
    opt.step(indices=idx)
    assert [(r["computed"], r["reused"]) for r in opt.preconditioner.diagnostics()] == [
        (1, 1),
        (1, 1),
    ]


def test_refresh_steps_recompute_every_k_steps() -> None:
    """Index keys, one batch per epoch: steps 0, 3, 6 compute (refresh_steps=3), the others
    reuse the coefficients stored by the latest refresh."""
    model, x, y, _ = make_case("linear", n=8)
    opt = kfac.FNGD(model, lr=0.1, refresh_steps=3, factor_dtype=torch.float64)
    idx = torch.arange(8)
    computed = []
    for _ in range(7):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
        before = opt.preconditioner.diagnostics()[0]["computed"]
        opt.step(indices=idx)
        computed.append(opt.preconditioner.diagnostics()[0]["computed"] - before)
    assert computed == [1, 0, 0, 1, 0, 0, 1]


def test_a_reusing_step_reads_nothing_back(monkeypatch) -> None:
    """Slot keys: a step that reuses stored coefficients runs no update phase and converts no
    tensor to a Python value (index keys read only the host-side index tensor)."""
    from .test_engine import count_conversions, model_and_batch

    model, x, y = model_and_batch()
    precond = kfac.FNGDPreconditioner(model, store="slot", steps_per_epoch=2)
    for step in range(4):
        model.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        if step == 3:
            before = [p.grad.clone() for p in model.parameters()]
            with count_conversions(monkeypatch) as calls:
                precond.step()
        else:
            precond.step()
    assert calls == []
    assert all(not torch.equal(b, p.grad) for b, p in zip(before, model.parameters(), strict=True))
    assert [row["reused"] for row in precond.diagnostics()] == [2, 2, 2]


def test_a_layer_unused_on_a_reusing_step_keeps_its_zero_gradient() -> None:
    """A branch this step's loss does not use, after ``zero_grad(set_to_none=False)`` (a zero
    ``.grad``, no rows), on a step reusing the coefficients its slot stored earlier. Before:
    an ``AssertionError`` in the direction."""

    model = Branchy()
    opt = kfac.FNGD(model, lr=0.1, store="slot", steps_per_epoch=2)
    x, y = torch.randn(8, 5), torch.randint(3, (8,))
    for use_b in (True, True, False, True):  # step 2 reuses slot 0, stored with b used
        opt.zero_grad(set_to_none=False)
        nn.functional.cross_entropy(model(x, use_b), y).backward()
        before = model.b.weight.detach().clone()
        opt.step()
        if not use_b:
            assert torch.equal(model.b.weight, before)
    assert all(torch.isfinite(p).all() for p in model.parameters())
