"""MBF: every mini-block direction against a dense solve with the block-diagonal empirical
Fisher assembled from torch.func per-sample gradients (float64), the SMW path against the
dense path, the state round trip, the hot path's host reads and the errors."""

from __future__ import annotations

import contextlib
import copy
import functools
import io
import warnings

import pytest
import torch
from torch import nn
from torch.func import functional_call, grad, vmap

import kfac
from kfac import mbf
from kfac.mbf import MBFBlock, Segment, chunk_segments

from .conftest import convnet
from .test_engine import count_conversions

RTOL = 1e-8


def per_sample_grads(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict:
    """Gradients of each sample's own loss (float64)."""
    params = {k: v.detach() for k, v in model.named_parameters()}

    def loss(p, xi, yi):
        out = functional_call(model, p, (xi.unsqueeze(0),))
        return nn.functional.cross_entropy(out, yi.unsqueeze(0))

    return vmap(grad(loss), in_dims=(None, 0, 0))(params, x, y)


def layer_matrix(tensors: dict, prefix: str, batched: bool) -> torch.Tensor:
    weight = tensors[prefix + "weight"]
    rows = weight.shape[1] if batched else weight.shape[0]
    lead = weight.shape[:1] if batched else ()
    mat = weight.reshape(*lead, rows, -1)
    bias = tensors.get(prefix + "bias")
    if bias is not None:
        mat = torch.cat([mat, bias.unsqueeze(-1)], dim=-1)
    return mat


def block_ids(rows: int, segments: tuple[Segment, ...]) -> torch.Tensor:
    """The mini-block of every entry of the row-major ``rows x d_A`` matrix."""
    per_row = []
    offset = 0
    for s in segments:
        per_row.append(offset + torch.arange(s.blocks).repeat_interleave(s.size))
        offset += s.blocks
    row = torch.cat(per_row)
    return (torch.arange(rows)[:, None] * offset + row[None, :]).flatten()


def oracle(
    fishers: list[torch.Tensor], decay: float, ids: torch.Tensor, g: torch.Tensor, damping: float,
    relative: bool = False,
) -> torch.Tensor:  # fmt: skip
    """``(F_bd + lambda I)^{-1} vec(g)`` with ``F`` the exponential average of ``fishers``
    (the first taken as is) restricted to the mini-blocks."""
    F = fishers[0]
    for inst in fishers[1:]:
        F = decay * F + (1 - decay) * inst
    F = F * (ids[:, None] == ids[None, :])
    if relative:
        diag = torch.diagonal(F)
        count = torch.bincount(ids).to(F.dtype)
        trace = torch.zeros(count.shape, dtype=F.dtype).index_add_(0, ids, diag)
        lam = damping * (trace / count)[ids]
    else:
        lam = torch.full((F.shape[0],), damping, dtype=F.dtype)
    system = F + torch.diag(lam)
    return torch.linalg.solve(system, g.flatten()).reshape(g.shape)


def empirical_fisher(matrices: torch.Tensor) -> torch.Tensor:
    flat = matrices.reshape(matrices.shape[0], -1)
    return flat.T @ flat / flat.shape[0]


def check_against_oracle(
    model: nn.Module, inputs: list[torch.Tensor], targets: list[torch.Tensor], *,
    decay: float = 0.0, damping: float = 0.1, prefixes: dict[str, str], **options,
) -> MBFBlock:  # fmt: skip
    model = model.double()
    reference = copy.deepcopy(model)  # no hooks: the parameters never change here
    precond = kfac.MBFPreconditioner(
        model, factor_every=1, inverse_every=1, factor_decay=decay, damping=damping,
        factor_dtype=torch.float64, **options,
    )  # fmt: skip
    fishers: dict[str, list[torch.Tensor]] = {name: [] for name in prefixes}
    for x, y in zip(inputs, targets, strict=True):
        model.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        grads = {k: p.grad.clone() for k, p in model.named_parameters()}
        samples = per_sample_grads(reference, x, y)
        for name, prefix in prefixes.items():
            fishers[name].append(empirical_fisher(layer_matrix(samples, prefix, batched=True)))
        precond.step()
    block = precond.mbf
    relative = options.get("damping_mode") == "relative"
    for name, prefix in prefixes.items():
        layer = precond.layer(name)
        g = layer_matrix(grads, prefix, batched=False)
        ids = block_ids(layer.dim_G, block.segments(layer))
        expected = oracle(fishers[name], decay, ids, g, damping, relative)
        written = layer.grad_matrix(torch.float64)
        torch.testing.assert_close(written, expected, rtol=RTOL, atol=RTOL * expected.abs().max())
    precond.remove()
    return block


def data(n: int, shape: tuple[int, ...], classes: int, seed: int = 1):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, *shape, generator=gen, dtype=torch.float64)
    return x, torch.randint(classes, (n,), generator=gen)


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("block_size", [None, 3, 4])
def test_linear_directions_equal_the_dense_block_diagonal_solve(bias, block_size) -> None:
    model = nn.Sequential(nn.Linear(6, 9, bias=bias), nn.Tanh(), nn.Linear(9, 4, bias=bias))
    x, y = data(10, (6,), 4)
    block = check_against_oracle(
        model, [x], [y], prefixes={"0": "0.", "2": "2."}, block_size=block_size,
        solver="cholesky",
    )  # fmt: skip
    d_A = 6 + bias
    layer = kfac.MBFPreconditioner(model, block_size=block_size).layer("0")
    assert block.segments(layer) == chunk_segments(d_A, block_size)


def test_directions_in_chunks_of_rows_equal_the_dense_block_diagonal_solve(monkeypatch) -> None:
    # one row of blocks of 3 per chunk, and the 1-blocks of the bias column 8 rows, then 1
    monkeypatch.setattr(mbf, "_DIRECTION_CHUNK", 8)
    model = nn.Sequential(nn.Linear(6, 9), nn.Tanh(), nn.Linear(9, 4))
    x, y = data(10, (6,), 4)
    check_against_oracle(
        model, [x], [y], prefixes={"0": "0.", "2": "2."}, block_size=3, solver="cholesky"
    )


def test_linear_exponential_average_and_relative_damping() -> None:
    model = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3))
    batches = [data(7, (5,), 3, seed) for seed in (1, 2, 3)]
    for mode in ("absolute", "relative"):
        check_against_oracle(
            model, [b[0] for b in batches], [b[1] for b in batches], decay=0.6,
            prefixes={"0": "0.", "2": "2."}, block_size=4, damping_mode=mode,
            solver="cholesky",
        )  # fmt: skip


class Positions(nn.Module):
    """A Linear layer applied at 3 positions per sample (a sequence), then a classifier."""

    def __init__(self) -> None:
        super().__init__()
        self.mix = nn.Linear(4, 5)
        self.head = nn.Linear(15, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.mix(x)).flatten(1))


@pytest.mark.parametrize("block_size", [None, 2])
def test_linear_with_extra_positions(block_size) -> None:
    x, y = data(6, (3, 4), 3)
    check_against_oracle(
        Positions(), [x], [y], prefixes={"mix": "mix.", "head": "head."}, block_size=block_size,
        solver="cholesky",
    )  # fmt: skip


@pytest.mark.parametrize(
    ("stride", "padding", "dilation"), [(1, 1, 1), (2, 0, 1), (1, 2, 2), (2, 1, 2)]
)
def test_conv2d_directions_equal_the_dense_block_diagonal_solve(stride, padding, dilation) -> None:
    model = convnet(stride=stride, padding=padding, dilation=dilation)
    x, y = data(5, (2, 8, 8), 4)
    block = check_against_oracle(
        model, [x], [y], prefixes={"0": "0.", "3": "3."}, block_size=5, solver="cholesky"
    )
    conv = kfac.MBFPreconditioner(model).layer("0")
    assert block.segments(conv) == (Segment(0, 2, 9), Segment(18, 1, 1))


def test_smw_path_equals_the_dense_path() -> None:
    """Blocks of 13 on batches of 4: the factored average (rank 4, 8, 12) against the dense
    one, through an exponential average, relative damping and float64."""
    directions = {}
    for solver in ("smw", "cholesky", "auto"):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(12, 6), nn.Tanh(), nn.Linear(6, 3)).double()
        precond = kfac.MBFPreconditioner(
            model, block_size=None, solver=solver, factor_every=1, inverse_every=1,
            factor_decay=0.7, damping=1e-2, damping_mode="relative", factor_dtype=torch.float64,
        )  # fmt: skip
        out = []
        for seed in range(3):
            x, y = data(4, (12,), 3, seed)
            model.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            precond.step()
            out.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
        directions[solver] = out
        kinds = {(r["layer"], r["kind"], r["rank"]) for r in precond.diagnostics()}
        if solver == "smw":
            assert kinds == {("0", "smw", 12), ("2", "smw", 12)}
        if solver == "auto":  # 13 columns: rank 12 > 13 / 2 is dense; 7 columns likewise
            assert kinds == {("0", "dense", None), ("2", "dense", None)}
    for a, b in zip(directions["smw"], directions["cholesky"], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    for a, b in zip(directions["auto"], directions["cholesky"], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_the_cost_rule_switches_from_factored_to_dense() -> None:
    model = nn.Sequential(nn.Linear(40, 3)).double()
    precond = kfac.MBFPreconditioner(
        model, block_size=None, factor_every=1, inverse_every=1, factor_dtype=torch.float64
    )
    kinds = []
    for seed in range(4):
        x, y = data(8, (40,), 3, seed)
        model.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        precond.step()
        (row,) = precond.diagnostics()
        kinds.append((row["kind"], row["rank"]))
    # block size 41: factored while the rank (8 per update) is at most 20
    assert kinds == [("smw", 8), ("smw", 16), ("dense", None), ("dense", None)]


def _train(opt, model, steps, seed=0):
    gen = torch.Generator().manual_seed(seed)
    losses = []
    for _ in range(steps):
        x = torch.randn(8, 1, 6, 6, generator=gen)
        y = torch.randint(3, (8,), generator=gen)
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def small_cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 36, 40),
        nn.Tanh(), nn.Linear(40, 3),
    )  # fmt: skip


def test_state_dict_round_trip_through_torch_load() -> None:
    model = small_cnn()
    opt = kfac.MBF(model, lr=0.05, momentum=0.9, block_size=8, inverse_every=3)
    _train(opt, model, 4)
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buffer)
    reference = _train(opt, model, 5, seed=1)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    model2 = small_cnn()
    model2.load_state_dict(saved["model"])
    opt2 = kfac.MBF(model2, lr=0.05, momentum=0.9, block_size=8, inverse_every=3)
    opt2.load_state_dict(saved["opt"])
    assert _train(opt2, model2, 5, seed=1) == reference
    other = kfac.MBF(small_cnn(), lr=0.05, block_size=4)
    with pytest.raises(ValueError, match="saved with block_size=8"):
        other.load_state_dict(saved["opt"])


def test_a_step_that_refreshes_nothing_reads_nothing_back(monkeypatch) -> None:
    model = small_cnn()
    precond = kfac.MBFPreconditioner(model, factor_every=4, inverse_every=4, block_size=8)
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(8, 1, 6, 6, generator=gen), torch.randint(3, (8,), generator=gen)
    for _ in range(6):  # steps 0-5; step 5 is neither a factor nor a refresh step
        model.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        if precond.steps == 5:
            before = [p.grad.clone() for p in model.parameters()]
            with count_conversions(monkeypatch) as calls:
                precond.step()
        else:
            precond.step()
    assert calls == []
    assert all(not torch.equal(b, p.grad) for b, p in zip(before, model.parameters(), strict=True))


@pytest.mark.parametrize(
    ("features", "block_size", "message"),
    [(4, 2, "inverting the mini-blocks"), (20, None, "Cholesky of the mini-blocks")],
)
def test_a_failed_inverse_is_retried_in_float64(
    monkeypatch, features, block_size, message
) -> None:
    """Blocks of 2 take the Gauss-Jordan sweep, blocks of 21 the batched Cholesky; a float32
    failure of either is retried in float64 with a warning."""
    model = nn.Sequential(nn.Linear(features, 3))
    precond = kfac.MBFPreconditioner(model, block_size=block_size, factor_every=1, inverse_every=1)
    original_cholesky, original_sweep = torch.linalg.cholesky_ex, mbf._sweep

    def failing_cholesky(A, *args, **kwargs):
        L, info = original_cholesky(A, *args, **kwargs)
        return L, info if A.dtype == torch.float64 else torch.ones_like(info)

    def failing_sweep(A, overwrite=False):
        inverse, ok = original_sweep(A, overwrite)
        return inverse, ok if A.dtype == torch.float64 else torch.zeros_like(ok)

    monkeypatch.setattr(torch.linalg, "cholesky_ex", failing_cholesky)
    monkeypatch.setattr(mbf, "_sweep", failing_sweep)
    x, y = torch.randn(8, features), torch.randint(3, (8,))
    nn.functional.cross_entropy(model(x), y).backward()
    with pytest.warns(RuntimeWarning, match=rf"{message} of layer '0' \(Linear\)"):
        precond.step()
    assert precond.state("0").groups[0].inverse.dtype == torch.float64
    assert model[0].weight.grad.dtype == torch.float32
    assert torch.isfinite(model[0].weight.grad).all()


def test_the_sweep_inverts_and_reports_a_non_positive_pivot() -> None:
    gen = torch.Generator().manual_seed(0)
    X = torch.randn(30, 6, 9, generator=gen, dtype=torch.float64)
    A = X @ X.mT / 9 + 0.01 * torch.eye(6, dtype=torch.float64)
    system = A.permute(1, 2, 0)  # block-last (m, m, B)
    inverse, ok = mbf._sweep(system)
    assert bool(ok)
    torch.testing.assert_close(inverse.permute(2, 0, 1), torch.linalg.inv(A), rtol=RTOL, atol=0)
    torch.testing.assert_close(system, A.permute(1, 2, 0), rtol=0, atol=0)  # not overwritten
    in_place, ok = mbf._sweep(system.clone(), overwrite=True)
    torch.testing.assert_close(in_place, inverse, rtol=0, atol=0)
    A[7] = -A[7]  # negative definite: the first pivot is negative
    assert not bool(mbf._sweep(A.permute(1, 2, 0))[1])


def test_the_sweep_in_chunks_of_blocks_equals_the_whole_sweep(monkeypatch) -> None:
    gen = torch.Generator().manual_seed(1)
    X = torch.randn(30, 6, 9, generator=gen, dtype=torch.float64)
    system = (X @ X.mT / 9 + 0.01 * torch.eye(6, dtype=torch.float64)).permute(1, 2, 0)
    whole, ok = mbf._sweep(system)
    monkeypatch.setattr(mbf, "_SWEEP_CHUNK", 6 * 6 * 7)  # chunks of 7 blocks, then 2
    chunked, chunked_ok = mbf._sweep(system)
    assert bool(ok)
    assert bool(chunked_ok)
    torch.testing.assert_close(chunked, whole, rtol=0, atol=0)
    system = system.clone()
    system[:, :, 23] *= -1  # a non-positive pivot in the last full chunk only
    assert not bool(mbf._sweep(system)[1])


def test_errors() -> None:
    model = nn.Sequential(nn.Linear(4, 3))
    for kwargs, message in (
        ({"block_size": 0}, r"Invalid block_size: 0 \(must be an int >= 1 or None\)"),
        ({"block_size": 2.5}, "Invalid block_size: 2.5"),
        ({"block_size": True}, "Invalid block_size: True"),
        ({"damping_mode": "trace"}, r"Invalid damping_mode: 'trace'; valid names are"),
        ({"solver": "qr"}, r"Invalid solver: 'qr'; valid names are \['auto', 'cholesky', 'smw'\]"),
        ({"block_map": 3}, r"Invalid block_map: 3 \(must be callable\)"),
        ({"damping": 0.0}, "Invalid damping"),
    ):
        with pytest.raises(ValueError, match=message):
            kfac.MBFPreconditioner(model, **kwargs)
    with pytest.raises(ValueError, match="do not tile a row of 5 columns"):
        kfac.MBFPreconditioner(model, block_map=lambda layer: (Segment(0, 2, 2),))
    with pytest.raises(ValueError, match="do not tile a row of 5 columns"):
        kfac.MBFPreconditioner(model, block_map=lambda layer: (Segment(1, 1, 4),))
    precond = kfac.MBFPreconditioner(model)
    saved = precond.state_dict()
    saved["layers"]["0"]["blocks"]["groups"] = []
    with pytest.raises(ValueError, match="does not match its block map"):
        precond.load_state_dict(saved)


def test_a_custom_block_map_plugs_in() -> None:
    """A map of two blocks per row (weights, bias) matches the oracle."""
    model = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3))
    x, y = data(9, (5,), 3)

    def weights_then_bias(layer):
        return (Segment(0, 1, layer.dim_in), Segment(layer.dim_in, 1, 1))

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_against_oracle(
            model, [x], [y], prefixes={"0": "0.", "2": "2."}, block_map=weights_then_bias
        )


class _Named:
    """A stand-in for a registered layer: the error messages only ask for its description."""

    def describe(self) -> str:
        return "'fc' (Linear)"


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("solver", ["sweep", "cholesky"])
def test_indefinite_damped_blocks_raise_naming_the_layer(solver: str, dtype: torch.dtype) -> None:
    """Mini-blocks that stay indefinite after damping raise, in float64 after a float32 retry."""
    eye = torch.eye(3, dtype=dtype)
    F = torch.stack([eye, -4 * eye], dim=-1)  # block-last (m, m, B): the second is indefinite
    lam = torch.full((2,), 0.1, dtype=dtype)
    message = r"MBF: the damped mini-blocks of layer 'fc' \(Linear\) are not positive definite"
    retry = (
        pytest.warns(RuntimeWarning, match="retrying in float64")
        if dtype == torch.float32
        else contextlib.nullcontext()
    )
    if solver == "sweep":
        invert = functools.partial(mbf._swept_inverse, F, lam, _Named())
    else:
        batch = mbf._damped_block_last(F, lam, dtype).permute(2, 0, 1)
        invert = functools.partial(mbf._damped_inverse, batch, _Named())
    with retry, pytest.raises(torch.linalg.LinAlgError, match=message):
        invert()
