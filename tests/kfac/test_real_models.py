"""The models people train, for 30 steps on generated data: a pytorch/examples-style MNIST
CNN, a small ResNet, a Transformer encoder with an embedding and a tied output head, and a
siamese model called twice per step; with ``KFAC`` and with ``KFACPreconditioner`` + Adam.
Each run ends below plain SGD's loss on the same batches (SGD at the same learning rate for
``KFAC``, Adam without the preconditioner for the Adam front), emits no warning, and
preconditions every registered layer (attention projections included); multi-head attention
is checked against an unpacked model with hand-written attention."""

from __future__ import annotations

import copy
import math
import warnings
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import Tensor, nn
from torch.nn import functional as F

import kfac

STEPS = 30


class MnistNet(nn.Module):
    """pytorch/examples' MNIST network, narrowed: conv, max-pool, dropout, log-softmax."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, 3, 1)
        self.conv2 = nn.Conv2d(8, 16, 3, 1)
        self.dropout1 = nn.Dropout(0.25)
        self.dropout2 = nn.Dropout(0.5)
        self.fc1 = nn.Linear(16 * 5 * 5, 32)
        self.fc2 = nn.Linear(32, 10)

    def forward(self, x: Tensor) -> Tensor:
        x = F.relu(self.conv1(x))
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        x = torch.flatten(self.dropout1(x), 1)
        x = self.dropout2(F.relu(self.fc1(x)))
        return F.log_softmax(self.fc2(x), dim=1)


class Block(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.down = None
        if stride != 1 or c_in != c_out:
            self.down = nn.Sequential(
                nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out)
            )

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + (x if self.down is None else self.down(x)))


class ResNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, 1, 1, bias=False), nn.BatchNorm2d(8))
        self.layers = nn.Sequential(Block(8, 8, 1), Block(8, 16, 2))
        self.fc = nn.Linear(16, 10)

    def forward(self, x: Tensor) -> Tensor:
        x = self.layers(F.relu(self.stem(x)))
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


class TinyLM(nn.Module):
    """A Transformer encoder language model: embedding, positions, two encoder layers, a
    causal mask and an output head tied to the embedding."""

    def __init__(self, vocab: int = 16, d: int = 32, length: int = 12) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.position = nn.Parameter(0.02 * torch.randn(length, d))
        layer = nn.TransformerEncoderLayer(d, 4, 64, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.out = nn.Linear(d, vocab, bias=False)
        self.out.weight = self.embed.weight
        self.register_buffer("mask", nn.Transformer.generate_square_subsequent_mask(length))

    def forward(self, tokens: Tensor) -> Tensor:
        h = self.embed(tokens) + self.position
        h = self.encoder(h, mask=self.mask, is_causal=True)
        return self.out(h)


class Tower(nn.Module):
    """The tower of a siamese model: called once per input of a pair (two forwards of the
    model per step)."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(20, 32), nn.Tanh(), nn.Linear(32, 8))

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


def _mnist(gen: torch.Generator) -> tuple[tuple[Tensor, ...], Tensor]:
    y = torch.randint(10, (32,), generator=gen)
    x = 0.3 * torch.randn(32, 1, 14, 14, generator=gen)
    x[torch.arange(32), 0, y, y] += 3.0  # a class-dependent bright pixel
    return (x,), y


PROTOTYPES = torch.randn(10, 3, 8, 8, generator=torch.Generator().manual_seed(7))


def _cifar(gen: torch.Generator) -> tuple[tuple[Tensor, ...], Tensor]:
    y = torch.randint(10, (32,), generator=gen)
    return (PROTOTYPES[y] + torch.randn(32, 3, 8, 8, generator=gen),), y


def _tokens(gen: torch.Generator) -> tuple[tuple[Tensor, ...], Tensor]:
    start = torch.randint(16, (32, 1), generator=gen)
    seq = (start + torch.arange(13)) % 16  # counting modulo 16: next token is predictable
    return (seq[:, :-1],), seq[:, 1:]


def _pairs(gen: torch.Generator) -> tuple[tuple[Tensor, ...], Tensor]:
    a = torch.randn(32, 20, generator=gen)
    same = torch.randint(2, (32,), generator=gen)
    b = torch.where(same.bool().view(-1, 1), a + 0.1 * torch.randn(32, 20, generator=gen), -a)
    return (a, b), same


def _siamese_logits(model: nn.Module, a: Tensor, b: Tensor) -> Tensor:
    distance = (model(a) - model(b)).square().sum(dim=1)  # the model runs twice
    return torch.stack([distance - 1.0, 1.0 - distance], dim=1)  # class 1: "same"


def _nll(out: Tensor, y: Tensor) -> Tensor:
    return F.nll_loss(out, y)


def _ce(out: Tensor, y: Tensor) -> Tensor:
    return F.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1))


# name: (model, batches, loss, learning rate of SGD and KFAC, KFAC options)
CASES: dict[str, tuple[Callable[[], nn.Module], Any, Any, float, dict[str, Any]]] = {
    "mnist-cnn": (MnistNet, _mnist, _nll, 0.05, {}),
    "resnet": (ResNet, _cifar, _ce, 0.05, {}),
    "transformer": (TinyLM, _tokens, _ce, 0.05, {"skip_layers": ["embed"]}),
    "siamese": (Tower, _pairs, _ce, 0.05, {}),
}
KFAC_OPTIONS = {
    "factor_every": 1,
    "inverse_every": 5,
    "damping": 0.03,
    "damping_scheme": "factored-relative",
    "kl_clip": 1e-2,
}


def _train(model: nn.Module, make_batch: Any, loss_fn: Any, step: Callable[[], None]) -> float:
    gen = torch.Generator().manual_seed(1)
    losses = []
    for _ in range(STEPS):
        inputs, y = make_batch(gen)
        model.zero_grad()
        out = _siamese_logits(model, *inputs) if isinstance(model, Tower) else model(*inputs)
        loss = loss_fn(out, y)
        loss.backward()
        step()
        losses.append(float(loss.detach()))
    return sum(losses[-5:]) / 5  # the last steps' mean: robust to one noisy batch


def _all_preconditioned(precond: kfac.KFACPreconditioner) -> None:
    applied = precond.kron.applied
    assert set(applied) == set(precond.layer_names), set(precond.layer_names) - set(applied)


@pytest.mark.parametrize("case", list(CASES))
def test_kfac_beats_sgd_without_warnings(case: str) -> None:
    build, batches, loss_fn, lr, options = CASES[case]
    torch.manual_seed(0)
    model = build()
    baseline = copy.deepcopy(model)
    sgd = torch.optim.SGD(baseline.parameters(), lr=lr, momentum=0.9)
    sgd_loss = _train(baseline, batches, loss_fn, sgd.step)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt = kfac.KFAC(model, lr=lr, momentum=0.9, **KFAC_OPTIONS, **options)
        kfac_loss = _train(model, batches, loss_fn, opt.step)
    _all_preconditioned(opt.preconditioner)
    if case == "transformer":
        names = opt.preconditioner.layer_names
        assert "encoder.layers.0.self_attn.in_proj" in names
        assert "encoder.layers.1.self_attn.out_proj" in names
    assert math.isfinite(kfac_loss)
    assert kfac_loss < sgd_loss, (kfac_loss, sgd_loss)


@pytest.mark.parametrize("case", list(CASES))
def test_preconditioned_adam_beats_adam_without_warnings(case: str) -> None:
    build, batches, loss_fn, _, options = CASES[case]
    torch.manual_seed(0)
    model = build()
    baseline = copy.deepcopy(model)
    adam = torch.optim.Adam(baseline.parameters(), lr=1e-3)
    adam_loss = _train(baseline, batches, loss_fn, adam.step)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        precond = kfac.KFACPreconditioner(
            model, factor_every=1, inverse_every=5, damping=0.03, **options
        )
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)

        def step() -> None:
            precond.step()
            opt.step()

        loss = _train(model, batches, loss_fn, step)
    _all_preconditioned(precond)
    assert math.isfinite(loss)
    assert loss < adam_loss, (loss, adam_loss)


# --------------------------------------------------------------------------- attention


class Unpacked(nn.Module):
    """Self-attention written out: a Linear for the packed q/k/v projection, hand-written
    scaled dot-product attention, a Linear output projection (the exactness reference)."""

    def __init__(self, mha: nn.MultiheadAttention) -> None:
        super().__init__()
        E = mha.embed_dim
        self.heads = mha.num_heads
        self.in_proj = nn.Linear(E, 3 * E).to(mha.in_proj_weight.dtype)
        self.out_proj = nn.Linear(E, E).to(mha.in_proj_weight.dtype)
        with torch.no_grad():
            self.in_proj.weight.copy_(mha.in_proj_weight)
            self.in_proj.bias.copy_(mha.in_proj_bias)
            self.out_proj.weight.copy_(mha.out_proj.weight)
            self.out_proj.bias.copy_(mha.out_proj.bias)

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:  # x: (n, L, E), batch first
        n, L, E = x.shape
        q, k, v = self.in_proj(x).chunk(3, dim=-1)
        split = lambda t: t.reshape(n, L, self.heads, -1).transpose(1, 2)  # noqa: E731
        q, k, v = split(q), split(k), split(v)
        scores = q @ k.transpose(-1, -2) / math.sqrt(E // self.heads) + mask
        out = (scores.softmax(dim=-1) @ v).transpose(1, 2).reshape(n, L, E)
        return self.out_proj(out)


class Wrapped(nn.Module):
    def __init__(self, mha: nn.MultiheadAttention) -> None:
        super().__init__()
        self.attn = mha

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        if not self.attn.batch_first:
            x = x.transpose(0, 1)
        out = self.attn(x, x, x, attn_mask=mask, need_weights=False)[0]
        return out if self.attn.batch_first else out.transpose(0, 1)


@pytest.mark.parametrize("batch_first", [True, False])
def test_multihead_attention_equals_the_unpacked_reference(batch_first: bool) -> None:
    """Before: out_proj's hooks never fired (training stopped with an error) and the q/k/v
    projections were never preconditioned."""
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(12, 3, batch_first=batch_first, dtype=torch.float64)
    ours, reference = Wrapped(mha), Unpacked(mha)
    x = torch.randn(5, 7, 12, dtype=torch.float64)
    mask = torch.triu(torch.full((7, 7), float("-inf"), dtype=torch.float64), diagonal=1)
    options = {"factor_every": 1, "inverse_every": 1, "factor_dtype": torch.float64}
    p1 = kfac.KFACPreconditioner(ours, **options)
    p2 = kfac.KFACPreconditioner(reference, **options)
    assert p1.layer_names == ["attn.in_proj", "attn.out_proj"]
    for model, p in ((ours, p1), (reference, p2)):
        for _ in range(2):
            model.zero_grad()
            model(x, mask).square().mean().backward()
            p.step()
    for a, b in (("attn.in_proj", "in_proj"), ("attn.out_proj", "out_proj")):
        for fa, fb in zip(p1.factors(a), p2.factors(b), strict=True):
            torch.testing.assert_close(fa, fb, rtol=1e-10, atol=1e-13)
    torch.testing.assert_close(mha.in_proj_weight.grad, reference.in_proj.weight.grad)
    torch.testing.assert_close(mha.in_proj_bias.grad, reference.in_proj.bias.grad)
    torch.testing.assert_close(mha.out_proj.weight.grad, reference.out_proj.weight.grad)


def test_attention_forward_is_torch_s_and_is_restored() -> None:
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(16, 4, 32, dropout=0.0, batch_first=True)
    twin = copy.deepcopy(layer)
    precond = kfac.KFACPreconditioner(layer)
    x = torch.randn(3, 5, 16)
    key_padding = torch.tensor([[False] * 5, [False] * 4 + [True], [False] * 3 + [True] * 2])
    torch.testing.assert_close(
        layer(x, src_key_padding_mask=key_padding),
        twin(x, src_key_padding_mask=key_padding),
        rtol=0,
        atol=0,
    )
    assert "forward" in layer.self_attn.__dict__
    precond.remove()
    assert "forward" not in layer.self_attn.__dict__


def test_packed_cross_attention_is_an_error_naming_the_module() -> None:
    mha = nn.MultiheadAttention(8, 2, batch_first=True)

    class Cross(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.attn = mha

        def forward(self, q: Tensor, kv: Tensor) -> Tensor:
            return self.attn(q, kv, kv)[0]

    model = Cross()
    kfac.KFACPreconditioner(model)
    with pytest.raises(RuntimeError, match=r"MultiheadAttention 'attn'.*cross-attention"):
        model(torch.randn(2, 3, 8), torch.randn(2, 4, 8))
    with pytest.raises(ValueError, match=r"Invalid model: no nn\.Linear"):
        kfac.KFACPreconditioner(Cross(), skip_layers=["attn"])  # its out_proj is skipped too


def test_separate_projection_weights_are_three_layers() -> None:
    mha = nn.MultiheadAttention(8, 2, kdim=5, vdim=6, bias=False, batch_first=True)

    class Cross(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.attn = mha

        def forward(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
            return self.attn(q, k, v)[0]

    model = Cross()
    twin = copy.deepcopy(model)
    precond = kfac.KFACPreconditioner(model, factor_every=1, inverse_every=1)
    assert precond.layer_names == ["attn.q_proj", "attn.k_proj", "attn.v_proj", "attn.out_proj"]
    q, k, v = torch.randn(2, 3, 8), torch.randn(2, 4, 5), torch.randn(2, 4, 6)
    out = model(q, k, v)
    torch.testing.assert_close(out, twin(q, k, v), rtol=1e-6, atol=1e-7)
    out.square().sum().backward()
    precond.step()
    assert set(precond.kron.applied) == set(precond.layer_names)


def test_attention_with_frozen_projections_is_left_to_torch() -> None:
    layer = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True)
    layer.self_attn.in_proj_weight.requires_grad_(False)
    precond = kfac.KFACPreconditioner(layer, factor_every=1, inverse_every=1)
    assert precond.layer_names == ["linear1", "linear2"]
    assert "forward" not in layer.self_attn.__dict__
    layer(torch.randn(2, 5, 8)).square().sum().backward()
    precond.step()
