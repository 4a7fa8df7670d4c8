"""Per-sample gradient algebra from a layer's recorded rows, without forming the gradients.

A layer records ``n`` samples with ``tau`` positions each: input rows ``a_{i,t}`` (``d_A``,
bias augmented; patches for Conv2d) and output-gradient rows ``g_{i,t}`` (``d_G``) of the
*batch-mean* loss. The gradient of sample ``i``'s own loss is therefore

    G_i = n sum_t g_{i,t} a_{i,t}^T        (d_G x d_A)

and everything FNGD and SENG need is a bilinear form in these matrices:

- the Gram matrix ``K_ij = <G_i, G_j>`` (:func:`gram`),
- the weighted sum ``sum_i w_i G_i`` (:func:`weighted_sum`, one GEMM),
- the projections ``<G_i, V>`` of a matrix ``V`` (:func:`project`).

Gram cost rule (:func:`gram_method`). Two ways to form ``K``:

``"positions"``  ``K_ij = n^2 sum_{t,t'} (a_{i,t} . a_{j,t'}) (g_{i,t} . g_{j,t'})``: the
                 Hadamard product of the two ``N x N`` row Grams (``N = n tau``) summed over
                 position blocks; ``n^2 tau^2 (d_A + d_G)`` multiply-adds, no per-sample
                 gradient. With one position (Linear layers) it is ``(A A^T) * (Gamma
                 Gamma^T)``.
``"explicit"``   form the ``n`` gradients (``n tau d_A d_G``) and their Gram
                 (``n^2 d_A d_G``); memory ``n d_A d_G``.

``"auto"`` picks the smaller multiply-add count (ties go to ``"positions"``): with one
position ``"positions"`` always wins; a convolution with many positions and few channels
(the first layers of a CNN) goes explicit.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ._curvature import LayerBatch

__all__ = [
    "GRAM_METHODS",
    "diagonal_explicit",
    "explicit",
    "gram",
    "gram_method",
    "per_sample_rows",
    "project",
    "weighted_sum",
]

GRAM_METHODS = ("auto", "positions", "explicit")
#: Elements of the largest ``N x N`` temporary of the positions Gram (memory bound).
_CHUNK_ELEMENTS = 1 << 24


def per_sample_rows(batch: LayerBatch, scaled: bool = True) -> tuple[Tensor, Tensor]:
    """``a`` ``(n, tau, d_A)`` and ``g`` ``(n, tau, d_G)`` scaled by ``n`` (per-sample loss
    gradients), so that ``G_i = sum_t g_{i,t} a_{i,t}^T`` (``scaled=False``: ``g`` as
    recorded, one pass over the rows less; then ``G_i = n sum_t g_{i,t} a_{i,t}^T``)."""
    if batch.a_rows is None or batch.g_rows is None:
        raise RuntimeError("per-sample algebra needs the layer's rows (CaptureSpec(rows=True))")
    n = batch.n
    if batch.positions % n:
        raise RuntimeError(
            f"{batch.positions} recorded rows are not a multiple of the {n} samples"
        )
    a = batch.a_rows.reshape(n, -1, batch.a_rows.shape[-1])
    g = batch.g_rows.reshape(n, -1, batch.g_rows.shape[-1])
    return a, (g * n if scaled else g)


def gram_method(n: int, tau: int, d_A: int, d_G: int, method: str = "auto") -> str:
    """The Gram method the cost rule of the module docstring picks (or ``method`` forced)."""
    if method != "auto":
        return method
    positions = n * n * tau * tau * (d_A + d_G)
    explicit_cost = n * tau * d_A * d_G + n * n * d_A * d_G
    return "positions" if positions <= explicit_cost else "explicit"


def explicit(a: Tensor, g: Tensor) -> Tensor:
    """The per-sample gradients ``(n, d_G, d_A)``."""
    return torch.einsum("nto,nti->noi", g, a)


def diagonal_explicit(a: Tensor, g: Tensor, bias: bool) -> Tensor:
    """The per-sample gradients ``(n, C, 1 + bias)`` of a channel-wise layer (BatchNorm2d:
    ``a`` the normalised inputs ``xhat``, ``g`` the output gradients, both ``(n, tau, C)``):
    ``[sum_t g_{i,t} * a_{i,t}, sum_t g_{i,t}]`` per channel, the layout of the layer's
    gradient matrix (weight column, then bias)."""
    columns = [(g * a).sum(dim=1)]
    if bias:
        columns.append(g.sum(dim=1))
    return torch.stack(columns, dim=2)


def gram(a: Tensor, g: Tensor, method: str = "auto") -> Tensor:
    """``K_ij = <G_i, G_j>`` ``(n, n)`` by the cost rule (``a``, ``g`` from
    :func:`per_sample_rows`); symmetric by construction."""
    n, tau, d_A = a.shape
    d_G = g.shape[-1]
    if gram_method(n, tau, d_A, d_G, method) == "explicit":
        flat = explicit(a, g).reshape(n, -1)
        K = flat @ flat.T
    elif tau == 1:
        a2, g2 = a[:, 0], g[:, 0]
        K = (a2 @ a2.T) * (g2 @ g2.T)
    else:
        N = n * tau
        A = a.reshape(N, d_A)
        Gm = g.reshape(N, d_G)
        K = a.new_empty(n, n)
        step = max(1, _CHUNK_ELEMENTS // max(1, tau * N))  # samples per chunk of rows
        for lo in range(0, n, step):
            hi = min(n, lo + step)
            rows = slice(lo * tau, hi * tau)
            block = (A[rows] @ A.T) * (Gm[rows] @ Gm.T)  # (chunk tau, N)
            K[lo:hi] = block.reshape(hi - lo, tau, n, tau).sum(dim=(1, 3))
    return (K + K.T) / 2


def weighted_sum(a: Tensor, g: Tensor, w: Tensor) -> Tensor:
    """``sum_i w_i G_i`` ``(d_G, d_A)``: one GEMM over the rows (``w`` of shape ``(n,)``)."""
    n, tau, d_A = a.shape
    gw = g * w.to(g.dtype)[:, None, None]
    return gw.reshape(n * tau, -1).T @ a.reshape(n * tau, d_A)


def project(a: Tensor, g: Tensor, V: Tensor) -> Tensor:
    """``<G_i, V>`` for every sample, ``(n,)``: ``sum_t g_{i,t}^T V a_{i,t}``."""
    return torch.einsum("nto,nto->n", g, a @ V.to(a.dtype).T)


def check_method(method: Any) -> str:
    if method not in GRAM_METHODS:
        raise ValueError(f"Invalid gram: {method!r}; valid names are {list(GRAM_METHODS)}")
    return str(method)
