"""The low-rank K-FAC family: exactness at full rank, Brand eligibility and memory, adaptive
ranks, state round trips, and training."""

from __future__ import annotations

import itertools

import pytest
import torch
from torch import nn

import kfac
import lowrank_nla as ln
from kfac import data
from kfac.__main__ import RunConfig, train

from .conftest import convnet

LOW_RANK = ["rsvd", "srevd", "brand", "brand-rsvd", "brand-correct", "brand-rsvd-correct"]
BRAND = [name for name in LOW_RANK if name.startswith("brand")]


def wide_mlp() -> nn.Sequential:
    # A of layer 0 (65), G of layer 0 (48) and A of layer 2 (49) are Brand-eligible with
    # rank_cap 20 and batches of 4 (20 + 4 < D); G of layer 2 (3) falls back to rsvd.
    return nn.Sequential(nn.Linear(64, 48), nn.Tanh(), nn.Linear(48, 3))


def exact_options(name: str) -> dict:
    """No truncation: randomized ranks = D (sketch spans everything), Brand rank above the
    EA's rank (3 updates x 4 rows), fixed ranks, updates every step, resets and corrections
    at their most frequent."""
    options = {"rank": 20, "oversample": 70, "power_iters": 1, "adaptive_rank": False}
    if name.startswith("brand"):
        options.update(rank_cap=20, brand_every=1)
    if "rsvd-" in name or name.endswith("-rsvd"):
        options.update(reset_every=1)
    if "correct" in name:
        options.update(correct_every=1, correct_fraction=0.5)
    return options


def directions(model: nn.Module, inverse: str, batches, **options) -> list[torch.Tensor]:
    precond = kfac.KFACPreconditioner(
        model,
        inverse=inverse,
        factor_every=1,
        inverse_every=1,
        factor_decay=0.8,
        factor_dtype=torch.float64,
        continuation=False,
        **options,
    )
    out = []
    for x, y in batches:
        model.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        precond.step()
        out.append(torch.cat([p.grad.reshape(-1) for p in model.parameters()]))
    precond.remove()
    kinds = [r["kind"] for r in precond.diagnostics()]
    if inverse.startswith("brand") and isinstance(model[0], nn.Linear):
        assert kinds == ["brand", "brand", "brand", "dense"], kinds  # the Brand path ran
    else:
        assert set(kinds) == {"dense"}, kinds
    return out


@pytest.mark.parametrize("inverse", LOW_RANK)
def test_full_rank_equals_dense_kfac(inverse: str) -> None:
    """With no truncation every variant's direction equals dense
    K-FAC (eigh) with the same damping, step after step, in float64."""
    torch.manual_seed(0)
    model = wide_mlp().double()
    g = torch.Generator().manual_seed(1)
    batches = [
        (torch.randn(4, 64, generator=g, dtype=torch.float64), torch.randint(3, (4,), generator=g))
        for _ in range(3)
    ]
    start = {k: v.clone() for k, v in model.state_dict().items()}
    reference = directions(model, "eigh", batches)
    model.load_state_dict(start)
    ours = directions(model, inverse, batches, **exact_options(inverse))
    for step, (a, b) in enumerate(zip(ours, reference, strict=True)):
        torch.testing.assert_close(a, b, rtol=1e-7, atol=1e-10, msg=f"step {step}")


@pytest.mark.parametrize("inverse", ["rsvd", "srevd", "brand"])
def test_full_rank_equals_dense_kfac_on_conv(inverse: str) -> None:
    """Conv2d factors are never Brand-tracked: they use the randomized decomposition."""
    torch.manual_seed(0)
    model = convnet().double()
    batches = [
        (torch.randn(6, 2, 8, 8, dtype=torch.float64), torch.randint(4, (6,))) for _ in range(2)
    ]
    start = {k: v.clone() for k, v in model.state_dict().items()}
    reference = directions(model, "eigh", batches)
    model.load_state_dict(start)
    options = {"rank": 200, "oversample": 0, "power_iters": 1, "adaptive_rank": False}
    if inverse == "brand":
        options["rank_cap"] = 200
        with pytest.warns(UserWarning, match="tracks no factor here"):  # and says so
            ours = directions(model, inverse, batches, **options)
    else:
        ours = directions(model, inverse, batches, **options)
    for a, b in zip(ours, reference, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-7, atol=1e-10)


def test_brand_eligibility_on_a_mixed_model() -> None:
    """The Brand eligibility rule (docs/algorithms.md, *Rank selection*): Linear factors
    with rank_cap + N < D are Brand-tracked; conv factors and small Linear factors use rsvd;
    the decision is per factor."""
    model = nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 10 * 10, 50),
        nn.ReLU(), nn.Linear(50, 200),
    )  # fmt: skip
    precond = kfac.KFACPreconditioner(
        model, inverse="brand", rank=20, rank_cap=30, factor_every=1, inverse_every=1,
        adaptive_rank=False,
    )  # fmt: skip
    model(torch.randn(8, 1, 10, 10)).square().mean().backward()
    precond.step()
    kinds = {(r["layer"], r["factor"]): r["kind"] for r in precond.diagnostics()}
    assert kinds == {
        ("0", "A"): "dense",  # conv
        ("0", "G"): "dense",
        ("3", "A"): "brand",  # 401 > 30 + 8
        ("3", "G"): "brand",  # 50 > 38
        ("5", "A"): "brand",  # 51 > 38
        ("5", "G"): "brand",  # 200 > 38
    }
    precond2 = kfac.KFACPreconditioner(
        model, inverse="brand", rank=20, rank_cap=45, factor_every=1, adaptive_rank=False
    )
    model.zero_grad()
    model(torch.randn(8, 1, 10, 10)).square().mean().backward()
    precond2.step()
    kinds2 = {(r["layer"], r["factor"]): r["kind"] for r in precond2.diagnostics()}
    assert kinds2[("3", "G")] == "dense"  # 50 <= 45 + 8: not eligible any more
    assert kinds2[("5", "A")] == "dense"


def test_brand_only_factor_memory_is_linear() -> None:
    """A Brand-tracked factor stores U (D x r) and d, never a D x D matrix: not in the factor,
    not in the capture, not in the state dict."""
    D, r = 600, 16
    model = nn.Sequential(nn.Linear(D - 1, 8))
    precond = kfac.KFACPreconditioner(
        model, inverse="brand", rank=r, rank_cap=r, brand_every=1, factor_every=1,
        adaptive_rank=False,
    )  # fmt: skip
    for _ in range(4):
        model.zero_grad()
        model(torch.randn(10, D - 1)).square().mean().backward()
        precond.step()
    factor = precond.state("0").A
    assert factor.brand is True
    assert factor.matrix is None
    assert factor.online is not None
    assert factor.online.U.shape == (D, r)
    assert precond.capture_plan()["0"].rows  # the capture keeps rows, never a D x D sum
    row = next(r for r in precond.diagnostics() if r["factor"] == "A")
    assert row["memory"] <= 2 * (D * r + r) * 4  # online state + representation, float32
    state = precond.state_dict()["layers"]["0"]["A"]
    tensors = [state["matrix"], *(state["online"] or []), *(state["rep"] or [])]
    assert all(t is None or t.numel() <= D * r for t in tensors)
    # the G factor (8 < 16 + 10) is not eligible and is dense
    assert precond.state("0").G.matrix is not None


def test_adaptive_rank_follows_the_controller() -> None:
    """The rank moves as RankController.rsvd replayed on the observed truncation ratios."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(120, 60), nn.Tanh(), nn.Linear(60, 3))
    precond = kfac.KFACPreconditioner(
        model, inverse="rsvd", rank=40, factor_every=1, inverse_every=2
    )
    ratios: list[float] = []
    ranks: list[int] = []
    for _ in range(12):
        model.zero_grad()
        nn.functional.cross_entropy(
            model(torch.randn(32, 120)), torch.randint(3, (32,))
        ).backward()
        precond.step()
        row = next(r for r in precond.diagnostics() if r["layer"] == "0" and r["factor"] == "A")
        ranks.append(row["target_rank"])
    factor = precond.state("0").A
    ctrl = ln.RankController.rsvd(121)
    state = ctrl.init(40)
    for ratio in factor.rank.errors:
        state = ctrl.update(state, ratio)
    assert state.rank == factor.rank.rank
    assert factor.rank.observations == 6  # one per refresh (inverse_every=2, 12 steps)
    assert len(set(ranks)) > 1  # it moved
    ratios = list(factor.rank.errors)
    assert all(0 <= e <= 1 for e in ratios)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"inverse": "rsvd", "rank": 0}, "Invalid rank: 0"),
        ({"inverse": "rsvd", "finish": "qr"}, "Invalid finish: 'qr'"),
        ({"inverse": "srevd", "reorth_every": 0}, "Invalid reorth_every: 0"),
        ({"inverse": "brand", "rank": 600}, "Invalid rank: 600 \\(must be <= rank_cap = 500\\)"),
        ({"inverse": "brand-correct", "correct_fraction": 1.0}, "Invalid correct_fraction"),
        (
            {"inverse": "brand", "reset_every": 3},
            "does not take option\\(s\\) \\['reset_every'\\]",
        ),
        ({"inverse": "rsvd", "adaptive_rank": 1}, "Invalid adaptive_rank"),
        ({"inverse": "brand", "identity_clock": "steps"}, "Invalid identity_clock: 'steps'"),
    ],
)
def test_invalid_variant_options(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        kfac.KFACPreconditioner(wide_mlp(), **kwargs)


@pytest.mark.slow
@pytest.mark.parametrize("inverse", LOW_RANK)
def test_each_variant_beats_sgd_on_the_autoencoder_and_the_cnn(inverse: str) -> None:
    """Equal steps, the command line's defaults: 60 steps of the autoencoder (width 0.25) and
    24 of the CNN (width 0.5) on the digits. The Brand strategies get a rank cap these narrow
    layers leave room under (the default 500 would leave every factor to the fallback, which
    construction warns about)."""
    ds = data.digits28()
    results = {}
    options = {"rank": 32, "rank_cap": 40} if inverse.startswith("brand") else {}
    for model, epochs, width in (("autoencoder", 5, 0.25), ("cnn", 2, 0.5)):
        for name in ("sgd", f"kfac-{inverse}"):
            cfg = RunConfig(
                optimizer=name,
                model=model,
                epochs=epochs,
                width=width,
                inverse_options=options if name != "sgd" else {},
            )
            results[model, name] = train(cfg, ds, progress=False).train_loss[-1]
    for model in ("autoencoder", "cnn"):
        assert results[model, f"kfac-{inverse}"] < results[model, "sgd"], results


def test_brand_representation_changes_only_on_inverse_steps() -> None:
    """The online state moves at every Brand update; the applied representation, as for
    every strategy, only on inverse-update steps."""
    torch.manual_seed(0)
    model = wide_mlp()
    precond = kfac.KFACPreconditioner(
        model, inverse="brand", rank=10, rank_cap=20, brand_every=1, adaptive_rank=False,
        factor_every=1, inverse_every=3,
    )  # fmt: skip
    reps, onlines = [], []
    for _ in range(6):
        model.zero_grad()
        nn.functional.cross_entropy(model(torch.randn(4, 64)), torch.randint(3, (4,))).backward()
        precond.step()
        factor = precond.state("0").A
        reps.append(factor.rep.d.clone())
        onlines.append(factor.online.d.clone())
    assert factor.brand is True
    changed = [not torch.equal(a, b) for a, b in itertools.pairwise(reps)]
    assert changed == [False, False, True, False, False]  # steps 1, 2 reuse step 0's
    assert all(not torch.equal(a, b) for a, b in itertools.pairwise(onlines))
    torch.testing.assert_close(reps[3], onlines[3])
    rep_A, rep_G = precond.representations("0")
    assert rep_A is factor.rep
    assert rep_G is precond.state("0").G.rep


@pytest.mark.parametrize("clock", ["updates", "batches"])
def test_identity_clock_of_brand_factors(clock: str) -> None:
    """With ``brand_every=3`` a Brand factor's identity weight is ``rho^m`` over its Brand
    updates (thesis) or ``rho^b`` over its statistics batches (the dense factors' clock)."""
    model = wide_mlp()
    precond = kfac.KFACPreconditioner(
        model, inverse="brand", rank_cap=20, rank=10, brand_every=3, identity_clock=clock,
        factor_every=1, inverse_every=1, factor_decay=0.9,
    )  # fmt: skip
    g = torch.Generator().manual_seed(0)
    for _ in range(7):
        model.zero_grad()
        x, y = torch.randn(4, 64, generator=g), torch.randint(3, (4,), generator=g)
        nn.functional.cross_entropy(model(x), y).backward()
        precond.step()
    brand_a, brand_g = precond.identity_weights("0")
    dense_a, dense_g = precond.identity_weights("2")  # G of layer 2 (3) is dense (rsvd)
    assert dense_g == pytest.approx(0.9**7, rel=1e-12)
    expected = 0.9**7 if clock == "batches" else 0.9**3  # Brand updates at batches 0, 3, 6
    for weight in (brand_a, brand_g, dense_a):  # A of layer 2 (49) is Brand-tracked
        assert weight == pytest.approx(expected, rel=1e-12)
    rows = {(r["layer"], r["factor"]): r for r in precond.diagnostics()}
    assert rows[("0", "A")]["updates"] == 3
    assert rows[("0", "A")]["identity"] == brand_a
