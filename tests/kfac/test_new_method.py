"""The worked example of docs/guide/new_method.md: a new curvature method in one module and
one registry entry, checked against per-sample gradients from torch.func and a dense solve."""

from __future__ import annotations

import re

import torch
from torch import nn
from torch.func import functional_call, grad, vmap

import kfac

from .conftest import DOCS, new_method_example


def per_sample_fisher_diagonal(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict:
    """``mean_i g_i^2`` of the per-sample gradients of the per-sample losses (float64)."""
    params = {k: v.detach() for k, v in model.named_parameters()}

    def loss(p, xi, yi):
        out = functional_call(model, p, (xi.unsqueeze(0),))
        return nn.functional.cross_entropy(out, yi.unsqueeze(0))

    grads = vmap(grad(loss), in_dims=(None, 0, 0))(params, x, y)
    return {k: g.square().mean(dim=0) for k, g in grads.items()}


def test_the_example_is_registered_and_matches_the_definition() -> None:
    new_method_example()
    assert "diagonal-fisher" in kfac.block_names()
    assert "kron" in kfac.block_names()
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(2, 3, 3, padding=1), nn.Tanh(), nn.Flatten(), nn.Linear(3 * 25, 4)
    ).double()  # fmt: skip
    x = torch.randn(12, 2, 5, 5, dtype=torch.float64)
    y = torch.randint(4, (12,))
    precond = kfac.Preconditioner(
        model, "diagonal-fisher", factor_every=1, factor_decay=0.25, damping=0.3,
        factor_dtype=torch.float64,
    )  # fmt: skip
    model.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    grads = {k: p.grad.clone() for k, p in model.named_parameters()}
    precond.step()
    reference = per_sample_fisher_diagonal(model, x, y)
    for name, prefix in (("0", "0."), ("3", "3.")):
        layer = precond.layer(name)
        fisher = precond.state(name).fisher  # d_G x d_A, bias last
        weight = reference[prefix + "weight"].reshape(layer.dim_G, -1)
        expected = 0.75 * torch.cat([weight, reference[prefix + "bias"][:, None]], dim=1)
        torch.testing.assert_close(fisher, expected, rtol=1e-12, atol=1e-15)
        # the direction is the dense solve (diag(F) + lambda I)^-1 vec(grad)
        g = torch.cat(
            [grads[prefix + "weight"].reshape(layer.dim_G, -1), grads[prefix + "bias"][:, None]],
            dim=1,
        )
        system = torch.diag(fisher.flatten()) + 0.3 * torch.eye(fisher.numel(), dtype=g.dtype)
        solved = torch.linalg.solve(system, g.flatten()).reshape(g.shape)
        written = torch.cat(
            [layer.params[0].grad.reshape(layer.dim_G, -1), layer.params[1].grad[:, None]], dim=1
        )
        torch.testing.assert_close(written, solved, rtol=1e-12, atol=1e-15)


def test_the_training_example_of_the_page_runs_and_learns(capsys) -> None:
    namespace = dict(new_method_example())
    text = (DOCS / "guide" / "new_method.md").read_text()
    block = re.findall(r"```python\n(.*?)```", text, flags=re.S)[1]
    exec(compile(block, "new_method.md", "exec"), namespace)
    printed = capsys.readouterr().out
    final = float(printed.rsplit(":", 1)[1])
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 32), nn.Tanh(), nn.Linear(32, 3))
    x, y = torch.randn(256, 10), torch.randint(3, (256,))
    initial = nn.functional.cross_entropy(model(x), y).item()
    assert final < 0.8 * initial, (final, initial)
