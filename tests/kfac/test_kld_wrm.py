"""KLD-WRM: SO against K-FAC where they coincide, the SO correction and the Q recursion
against hand-unrolled float64 computations, the QE inner gradient against autograd of the
written objective, QE without inner steps against Q, the state and the errors."""

from __future__ import annotations

import io

import pytest
import torch
from torch import nn
from torch.func import functional_call
from torch.nn import functional as F

import kfac
from kfac.kld_wrm import WakeProblem, wake_divergence, wake_gradient

from .test_engine import backward, count_conversions, model_and_batch

RTOL = 1e-10  # float64 throughout: only rounding separates the paths

_LOW_RANK = {"rank": 4, "adaptive_rank": False}
INVERSE_OPTIONS = {
    "eigh": {},
    "rsvd": _LOW_RANK,
    "srevd": _LOW_RANK,
    "brand": {**_LOW_RANK, "rank_cap": 5, "brand_every": 1},
    "brand-rsvd": {**_LOW_RANK, "rank_cap": 5, "brand_every": 1, "reset_every": 1},
    "brand-correct": {**_LOW_RANK, "rank_cap": 5, "brand_every": 1},
    "brand-rsvd-correct": {**_LOW_RANK, "rank_cap": 5, "brand_every": 1, "reset_every": 1},
}


def make_model(dtype: torch.dtype = torch.float32) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 24), nn.Tanh(), nn.Linear(24, 3)).to(dtype)


def batches(count: int, n: int = 4, dtype: torch.dtype = torch.float32) -> list:
    g = torch.Generator().manual_seed(1)
    return [
        (torch.randn(n, 6, generator=g, dtype=dtype), torch.randint(3, (n,), generator=g))
        for _ in range(count)
    ]


def train(model: nn.Module, opt: torch.optim.Optimizer, data: list) -> list[float]:
    losses = []
    for x, y in data:
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def test_inverse_options_cover_every_strategy() -> None:
    assert set(INVERSE_OPTIONS) == set(kfac.inverse_names())


# ---------------------------------------------------------------------------- SO


@pytest.mark.parametrize("inverse", sorted(INVERSE_OPTIONS))
@pytest.mark.parametrize("shared", [True, False], ids=["rho-0", "wake_decay-0"])
def test_so_with_rho_zero_is_kfac_exactly(inverse: str, shared: bool) -> None:
    """alpha constant and rho = 0: SO's steps are K-FAC's with the same damping, bit for bit
    (rho = 0 for the factors too, or only for the wake with the factors at 0.9)."""
    common = {
        "inverse": inverse,
        "damping": 0.03,
        "damping_scheme": "eigenbasis",
        "factor_every": 1,
        "inverse_every": 2,
        "kl_clip": 0.05,
        **INVERSE_OPTIONS[inverse],
    }
    decay = {"factor_decay": 0.0} if shared else {"factor_decay": 0.9}
    wake = {} if shared else {"wake_decay": 0.0}
    data = batches(6)
    model = make_model()
    so = kfac.SOKLDWRM(model, lr=0.1, momentum=0.9, **common, **decay, **wake)
    so_losses = train(model, so, data)
    reference = make_model()
    opt = kfac.KFAC(reference, lr=0.1, momentum=0.9, factored_apply=False, **common, **decay)
    assert train(reference, opt, data) == so_losses
    for p, q in zip(model.parameters(), reference.parameters(), strict=True):
        assert torch.equal(p, q)


def test_so_preconditions_the_corrected_gradient() -> None:
    """Every step's written gradient is the prepared inverse applied to
    ``g_k - rho (alpha_{k-1} / alpha_k) g_{k-1}``, with the learning rate changing."""
    model = make_model(torch.float64)
    precond = kfac.SOKLDWRMPreconditioner(
        model, factor_decay=0.6, factor_every=1, inverse_every=2, factor_dtype=torch.float64
    )
    layer = precond.layer("2")
    previous, lrs = None, [0.1, 0.2, 0.05, 0.05]
    for k, (x, y) in enumerate(batches(4, n=8, dtype=torch.float64)):
        model.zero_grad()
        F.cross_entropy(model(x), y).backward()
        g = layer.grad_matrix(torch.float64)
        precond.step(lr=lrs[k])
        corrected = g if previous is None else g - 0.6 * (lrs[k - 1] / lrs[k]) * previous
        prepared = precond.state("2").kron.prepared
        assert prepared is not None
        torch.testing.assert_close(
            layer.grad_matrix(torch.float64), prepared.apply(corrected), rtol=RTOL, atol=0
        )
        previous = g


# ---------------------------------------------------------------------------- Q


def kron_solve(G: torch.Tensor, A: torch.Tensor, V: torch.Tensor, lam: float) -> torch.Tensor:
    """``((G (x) A) + lam I)^{-1}`` on the ``d_G x d_A`` matrix ``V``, densely: with the
    column-major ``vec``, ``vec(G V A) = (A (x) G) vec(V)``."""
    system = torch.kron(A, G) + lam * torch.eye(A.shape[0] * G.shape[0], dtype=V.dtype)
    return torch.linalg.solve(system, V.T.reshape(-1)).reshape(V.shape[1], V.shape[0]).T


def linear_statistics(
    layer: nn.Linear, x: torch.Tensor, y: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradient matrix ``[dW, db]``, ``A = 1/n sum a a^T`` and ``G = n sum s s^T`` (``s`` the
    gradients of the batch-mean loss with respect to the outputs) of a one-layer model."""
    out = layer(x)
    out.retain_grad()
    F.cross_entropy(out, y).backward()
    assert layer.weight.grad is not None
    assert layer.bias.grad is not None
    n = x.shape[0]
    a = torch.cat([x, torch.ones(n, 1, dtype=x.dtype)], dim=1)
    s = out.grad
    assert s is not None
    grad = torch.cat([layer.weight.grad, layer.bias.grad[:, None]], dim=1)
    return grad.detach().clone(), a.T @ a / n, n * s.T @ s


def test_q_recursion_matches_a_hand_unrolled_float64_computation() -> None:
    """Three steps with factor and refresh periods 2 and a changing learning rate: step 0
    (statistics, refresh), step 1 (no statistics; the step after a refresh rebuilds from the
    averages; the product M_0 s_0 is exact because step 0's representation came from its own
    statistics), step 2 (statistics, refresh; M_1 s_1 approximated by g^_1 / (1 + alpha_1))."""
    rho, lam, lrs = 0.5, 0.02, [0.1, 0.3, 0.05]
    torch.manual_seed(0)
    layer = nn.Linear(3, 4).double()
    reference = nn.Linear(3, 4).double()
    reference.load_state_dict(layer.state_dict())
    precond = kfac.QKLDWRMPreconditioner(
        layer,
        factor_decay=rho,
        damping=lam,
        damping_scheme="eigenbasis",
        factor_every=2,
        inverse_every=2,
        factor_dtype=torch.float64,
        rms_clip=None,
    )
    data = batches(3, n=16, dtype=torch.float64)
    data = [(x[:, :3], y) for x, y in data]
    eye_A, eye_G = torch.eye(4, dtype=torch.float64), torch.eye(4, dtype=torch.float64)

    # by hand
    A_ea = G_ea = None
    s_A = s_G = 1.0
    history = []  # (g, g_hat, direction, A_ea, G_ea, s_A, s_G, alpha)
    expected = []
    for k, (x, y) in enumerate(data):
        reference.zero_grad()
        g, A_inst, G_inst = linear_statistics(reference, x, y)
        alpha = lrs[k]
        captured = k % 2 == 0
        if captured:
            A_ea = (1 - rho) * A_inst if A_ea is None else rho * A_ea + (1 - rho) * A_inst
            G_ea = (1 - rho) * G_inst if G_ea is None else rho * G_ea + (1 - rho) * G_inst
            s_A, s_G = s_A * rho, s_G * rho
        assert A_ea is not None
        assert G_ea is not None
        if k == 0:
            g_hat = g
        else:
            g1, h1, d1, A1, G1, sA1, sG1, a1 = history[-1]
            # step 0's representation was built from its statistics, step 1's from the averages
            exact = (G1 + sG1 * eye_G) @ d1 @ (A1 + sA1 * eye_A)
            product = exact if k == 1 else h1 / (1 + a1)
            g_hat = g + rho * (a1 / alpha) * (h1 - g1 - product)
        A_cur, G_cur = (A_inst, G_inst) if captured else (A_ea, G_ea)
        A_aug = A_ea + alpha * A_cur + s_A * eye_A
        G_aug = G_ea + alpha * G_cur + s_G * eye_G
        direction = kron_solve(G_aug, A_aug, g_hat, lam)
        expected.append(direction)
        history.append((g, g_hat, direction, A_ea, G_ea, s_A, s_G, alpha))
        with torch.no_grad():
            reference.weight -= alpha * direction[:, :3]
            reference.bias -= alpha * direction[:, 3]

    # the preconditioner, its written gradient applied by the same plain update
    for k, (x, y) in enumerate(data):
        layer.zero_grad()
        F.cross_entropy(layer(x), y).backward()
        precond.step(lr=lrs[k])
        written = torch.cat([layer.weight.grad, layer.bias.grad[:, None]], dim=1)
        torch.testing.assert_close(written, expected[k], rtol=RTOL, atol=1e-14)
        assert precond.state("").fresh == (k % 2 == 0)
        with torch.no_grad():
            layer.weight -= lrs[k] * layer.weight.grad
            layer.bias -= lrs[k] * layer.bias.grad
    torch.testing.assert_close(layer.weight, reference.weight, rtol=RTOL, atol=1e-14)


@pytest.mark.parametrize("inverse", ["rsvd", "srevd"])
def test_q_full_rank_low_rank_strategies_equal_eigh(inverse: str) -> None:
    """With the rank at the dimension, the randomized strategies reproduce Q with eigh."""
    data = batches(5, n=32, dtype=torch.float64)
    results = []
    for name, options in (("eigh", {}), (inverse, {"rank": 25, "adaptive_rank": False})):
        model = make_model(torch.float64)
        opt = kfac.QKLDWRM(
            model,
            lr=0.1,
            inverse=name,
            factor_every=1,
            inverse_every=2,
            factor_dtype=torch.float64,
            **options,
        )
        train(model, opt, data)
        results.append(list(model.parameters()))
    for p, q in zip(*results, strict=True):
        torch.testing.assert_close(p, q, rtol=1e-7, atol=1e-9)


@pytest.mark.parametrize("inverse", ["brand", "brand-rsvd", "brand-correct"])
def test_q_rejects_the_brand_strategies(inverse: str) -> None:
    with pytest.raises(ValueError, match=rf"Invalid inverse: '{inverse}'; q-kld-wrm decomposes"):
        kfac.QKLDWRM(make_model(), lr=0.1, inverse=inverse)


# ---------------------------------------------------------------------------- QE


def written_objective(
    model: nn.Module,
    params: dict[str, torch.Tensor],
    x: torch.Tensor,
    start: dict[str, torch.Tensor],
    grads: dict[str, torch.Tensor],
    curvature: dict[str, tuple[torch.Tensor, torch.Tensor]],
    snapshots: list[dict[str, torch.Tensor]],
    rho: float,
    alpha: float,
    kappa: float,
    loss: str,
) -> torch.Tensor:
    """``g^T Delta + 1/2 sum_l vec(Delta_l)^T (A_l (x) G_l) vec(Delta_l) + W / (2 alpha
    kappa)``, written out (KL from its definition, the Kronecker product formed)."""
    linear = sum((grads[k] * (params[k] - start[k])).sum() for k in params)
    quadratic = 0.0
    for prefix, (A, G) in curvature.items():
        delta = torch.cat(
            [
                params[prefix + "weight"] - start[prefix + "weight"],
                (params[prefix + "bias"] - start[prefix + "bias"])[:, None],
            ],
            dim=1,
        )
        v = delta.T.reshape(-1)
        quadratic = quadratic + 0.5 * v @ torch.kron(A, G) @ v
    out = functional_call(model, params, (x,))
    divergences = []
    for snapshot in snapshots:
        target = functional_call(model, snapshot, (x,))
        if loss == "mse":
            kl = 0.5 * ((out - target) ** 2).sum(dim=1)  # both directions agree
        else:
            p, q = torch.softmax(out, dim=1), torch.softmax(target, dim=1)
            kl_pq = (p * (p.log() - q.log())).sum(dim=1)
            kl_qp = (q * (q.log() - p.log())).sum(dim=1)
            kl = (kl_pq + kl_qp) / 2
        divergences.append(kl.mean())
    W = divergences[0]
    for d in divergences[1:]:
        W = rho * W + (1 - rho) * d
    return linear + quadratic + W / (2 * alpha * kappa)


@pytest.mark.parametrize("loss", ["cross_entropy", "mse"])
def test_qe_inner_gradient_is_autograd_of_the_written_objective(loss: str) -> None:
    model = make_model(torch.float64)
    names = [k for k, _ in model.named_parameters()]
    params = list(model.parameters())
    g = torch.Generator().manual_seed(3)

    def like(scale: float) -> dict[str, torch.Tensor]:
        return {
            k: scale * torch.randn(p.shape, generator=g, dtype=p.dtype)
            for k, p in zip(names, params, strict=True)
        }

    start = {
        k: p.detach() + d
        for (k, p), d in zip(model.named_parameters(), like(0.1).values(), strict=True)
    }
    grads = like(1.0)
    snapshots = [
        {
            k: p.detach() + d
            for (k, p), d in zip(model.named_parameters(), like(0.3).values(), strict=True)
        }
        for _ in range(3)
    ]
    x = torch.randn(10, 6, generator=g, dtype=torch.float64)
    precond = kfac.KFACPreconditioner(model)
    curvature = {}
    layers = []
    for name in precond.layer_names:
        helper = precond.layer(name)
        B_A = torch.randn(helper.dim_A, 30, generator=g, dtype=torch.float64)
        B_G = torch.randn(helper.dim_G, 30, generator=g, dtype=torch.float64)
        A, G = B_A @ B_A.T / 30, B_G @ B_G.T / 30
        curvature[name + "."] = (A, G)
        layers.append((helper, A, G))
    rho, alpha, kappa = 0.4, 0.05, 3.0
    with torch.no_grad():
        targets = [functional_call(model, s, (x,)) for s in snapshots]
    problem = WakeProblem(
        params=params,
        start=[start[k] for k in names],
        grads=[grads[k] for k in names],
        rates=[alpha] * len(params),
        layers=layers,
        targets=targets,
        rho=rho,
        kappa=kappa,
        loss=loss,
    )
    got = wake_gradient(model, ((x,), {}), problem)

    live = {k: p.detach().clone().requires_grad_(True) for k, p in model.named_parameters()}
    J = written_objective(
        model, live, x, start, grads, curvature, snapshots, rho, alpha, kappa, loss
    )
    expected = torch.autograd.grad(J, list(live.values()))
    for a, b in zip(got, expected, strict=True):
        torch.testing.assert_close(a, b, rtol=RTOL, atol=1e-13)


def test_wake_divergence_is_zero_at_a_snapshot_and_positive_elsewhere() -> None:
    logits = torch.randn(8, 5, dtype=torch.float64)
    other = torch.randn(8, 5, dtype=torch.float64)
    assert float(wake_divergence(logits, [logits], 0.5, "cross_entropy")) == 0.0
    assert float(wake_divergence(logits, [other, logits], 0.5, "cross_entropy")) > 0.0


def test_qe_without_inner_steps_is_the_q_step() -> None:
    data = batches(8)
    options = {"factor_every": 1, "inverse_every": 3, "kl_clip": 0.1, "rms_clip": 2.0}
    model = make_model()
    qe = kfac.QEKLDWRM(model, lr=0.1, inner_steps=0, **options)
    qe_losses = train(model, qe, data)
    reference = make_model()
    q = kfac.QKLDWRM(reference, lr=0.1, **options)
    assert train(reference, q, data) == qe_losses
    for p, r in zip(model.parameters(), reference.parameters(), strict=True):
        assert torch.equal(p, r)
    assert len(qe.snapshots) == 3


def test_qe_refines_after_c_snapshots_without_recording_statistics() -> None:
    """The inner loop starts once ``snapshots`` snapshots exist, moves the parameters, records
    no statistics for the next step, and leaves every module's train/eval mode as it was."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 24), nn.Tanh(), nn.Dropout(0.2), nn.Linear(24, 3))
    model[2].eval()  # a module the user put in eval mode stays so
    options = {"factor_every": 1, "inverse_every": 1}
    opt = kfac.QEKLDWRM(model, lr=0.1, inner_steps=3, snapshots=2, **options)
    data = batches(3)
    for k, (x, y) in enumerate(data):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        opt.step()
        # snapshots: the initial parameters, then one per step, the last two kept
        assert len(opt.snapshots) == 2
        newest = opt.snapshots[-1]
        assert all(torch.equal(newest[n], p) for n, p in model.named_parameters())
        assert all(opt.preconditioner.recorded(n) is None for n in opt.preconditioner.layer_names)
        assert model.training
        assert not model[2].training
        # the Q step alone is p - lr * direction (.grad holds the direction); from the
        # second step on, two snapshots exist and the inner loop moves the parameters on
        weight = model[0].weight
        q_step = before["0.weight"].add(weight.grad, alpha=-0.1)
        assert torch.equal(weight, q_step) == (k == 0)


def test_qe_refinement_lowers_the_inner_objective() -> None:
    """The inner steps lower the written objective below its value at the Q step."""
    torch.manual_seed(0)
    model = make_model(torch.float64)
    lr = 0.05
    opt = kfac.QEKLDWRM(
        model,
        lr=lr,
        inner_steps=20,
        snapshots=2,
        factor_every=1,
        inverse_every=1,
        factor_dtype=torch.float64,
    )
    for x, y in batches(3, n=16, dtype=torch.float64):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        start = {n: p.detach().clone() for n, p in model.named_parameters()}
        grads = {n: p.grad.clone() for n, p in model.named_parameters()}
        snapshots = opt.snapshots
        opt.step()
    precond = opt.preconditioner
    curvature = {}
    for name in precond.layer_names:
        current = precond.state(name).current(precond.steps - 1)
        assert current is not None
        curvature[name + "."] = current
    q_step = {n: start[n].add(p.grad, alpha=-lr) for n, p in model.named_parameters()}
    refined = {n: p.detach() for n, p in model.named_parameters()}
    values = [
        float(
            written_objective(
                model, params, x, start, grads, curvature, snapshots, 0.5, lr, 330.0,
                "cross_entropy",
            )
        )
        for params in (q_step, refined)
    ]  # fmt: skip
    assert values[1] < values[0]


@pytest.mark.parametrize("cls", [kfac.SOKLDWRMPreconditioner, kfac.QKLDWRMPreconditioner])
def test_a_step_that_refreshes_nothing_reads_nothing_back(
    monkeypatch: pytest.MonkeyPatch, cls: type
) -> None:
    """Steps 0-4: step 4 refreshes and Q also refreshes on step 5; step 6 is quiet."""
    model, x, y = model_and_batch()
    precond = cls(model, factor_every=4, inverse_every=4, kl_clip=0.1, lr=0.1)
    for _ in range(6):
        backward(model, x, y)
        precond.step()
    backward(model, x, y)
    before = [p.grad.clone() for p in model.parameters()]
    with count_conversions(monkeypatch) as calls:
        precond.step()
    assert calls == []
    assert all(not torch.equal(b, p.grad) for b, p in zip(before, model.parameters(), strict=True))


# ---------------------------------------------------------------------------- state


def test_state_dict_carries_the_history_and_the_snapshots() -> None:
    model = make_model()
    opt = kfac.QEKLDWRM(model, lr=0.1, inner_steps=1, snapshots=2, factor_every=1)
    train(model, opt, batches(3))
    state = opt.state_dict()
    layer = state["kfac"]["layers"]["0"]
    for key in ("grad", "corrected", "direction"):
        assert tuple(layer[key].shape) == (24, 7)
    assert layer["lr"] == 0.1
    assert [tuple(t.shape) for t in layer["previous"][:2]] == [(7, 7), (24, 24)]
    assert len(state["wake"]["snapshots"]) == 2
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    saved["kfac"]["layers"]["0"]["grad"] = torch.zeros(3, 3)
    other = kfac.QEKLDWRM(make_model(), lr=0.1, inner_steps=1, snapshots=2, factor_every=1)
    with pytest.raises(ValueError, match=r"state_dict grad of layer '0' has shape \(3, 3\)"):
        other.load_state_dict(saved)
    saved = opt.state_dict()
    saved["wake"]["snapshots"][0].pop("0.weight")
    with pytest.raises(ValueError, match="state_dict snapshots do not match"):
        other.load_state_dict(saved)
    saved = opt.state_dict()
    del saved["wake"]
    with pytest.raises(ValueError, match="state_dict has no 'wake' entry"):
        other.load_state_dict(saved)


# ---------------------------------------------------------------------------- errors


def test_errors() -> None:
    model = make_model()
    with pytest.raises(ValueError, match=r"Invalid option `factored_apply`"):
        kfac.SOKLDWRM(model, lr=0.1, factored_apply=True)
    with pytest.raises(ValueError, match=r"Invalid wake_decay: 1.0 \(must be in \[0, 1\)\)"):
        kfac.SOKLDWRM(model, lr=0.1, wake_decay=1.0)
    with pytest.raises(ValueError, match=r"Invalid decomposition_dtype"):
        kfac.QKLDWRM(model, lr=0.1, decomposition_dtype=torch.float16)
    for key, value, message in (
        ("inner_steps", -1, r"Invalid inner_steps: -1 \(must be an integer >= 0\)"),
        ("snapshots", 0, r"Invalid snapshots: 0 \(must be an integer >= 1\)"),
        ("wake_kappa", 0.0, r"Invalid wake_kappa: 0.0 \(must be > 0\)"),
        ("inner_lr", -0.1, r"Invalid inner_lr: -0.1 \(must be >= 0\)"),
        ("inner_momentum", -1.0, r"Invalid inner_momentum: -1.0 \(must be >= 0\)"),
        ("inner_rms_clip", 0.0, r"Invalid inner_rms_clip: 0.0 \(must be > 0\)"),
    ):
        with pytest.raises(ValueError, match=message):
            kfac.QEKLDWRM(model, lr=0.1, **{key: value})
    (x, y), *_ = batches(1)
    precond = kfac.SOKLDWRMPreconditioner(model)
    F.cross_entropy(model(x), y).backward()
    with pytest.raises(ValueError, match=r"so-kld-wrm needs the learning rate.*pass `lr`"):
        precond.step()
    model = make_model()
    opt = kfac.QKLDWRM(model, lr=0.0)
    F.cross_entropy(model(x), y).backward()
    with pytest.raises(ValueError, match=r"Invalid lr: 0.0 \(q-kld-wrm weighs its wake"):
        opt.step()


def test_qe_needs_a_forward_of_the_model() -> None:
    model = make_model()
    opt = kfac.QEKLDWRM(model, lr=0.1, snapshots=1, inner_steps=1)
    (x, y), *_ = batches(1)
    hidden = model[1](model[0](x))  # the model's own forward never ran
    F.cross_entropy(model[2](hidden), y).backward()
    with pytest.raises(RuntimeError, match="no training forward of the model was recorded"):
        opt.step()
