"""Small models and a one-step helper shared by the kfac tests."""

from __future__ import annotations

import functools
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import kfac


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def mlp(bias: bool = True, act: Callable[[], nn.Module] = nn.Tanh) -> nn.Sequential:
    return nn.Sequential(nn.Linear(5, 7, bias=bias), act(), nn.Linear(7, 3, bias=bias))


def convnet(stride: int = 1, padding: int = 1, dilation: int = 1) -> nn.Sequential:
    conv = nn.Conv2d(2, 3, 3, stride=stride, padding=padding, dilation=dilation)
    out = (8 + 2 * padding - dilation * 2 - 1) // stride + 1
    return nn.Sequential(conv, nn.ReLU(), nn.Flatten(), nn.Linear(3 * out * out, 4))


class Branchy(nn.Module):
    """Two Linear layers and a head; ``b`` is used only when the forward is asked to."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.head = nn.Linear(5, 5), nn.Linear(5, 5), nn.Linear(5, 3)

    def forward(self, x: torch.Tensor, use_b: bool) -> torch.Tensor:
        h = torch.tanh(self.a(x))
        return self.head(torch.tanh(self.b(h)) if use_b else h)


def exact_preconditioner(model: nn.Module, **kwargs: Any) -> kfac.KFACPreconditioner:
    """Factors of the latest batch only (decay 0), refreshed every step, in float64, with the
    thesis' relative damping 0.1 (the tests' references are written for it)."""
    options: dict[str, Any] = {
        "damping": 0.1,
        "damping_scheme": "factored-relative",
        "factor_every": 1,
        "inverse_every": 1,
        "factor_decay": 0.0,
        "factor_dtype": torch.float64,
    }
    options.update(kwargs)
    return kfac.KFACPreconditioner(model, **options)


DOCS = Path(__file__).resolve().parents[2] / "docs"


@functools.cache
def new_method_example() -> dict[str, Any]:
    """The namespace of the worked example of docs/guide/new_method.md (its first code
    block: the diagonal empirical-Fisher block, registered as ``"diagonal-fisher"``)."""
    text = (DOCS / "guide" / "new_method.md").read_text()
    block = re.findall(r"```python\n(.*?)```", text, flags=re.S)[0]
    namespace: dict[str, Any] = {}
    exec(compile(block, "new_method.md", "exec"), namespace)
    return namespace
