"""Step clipping on the device: per-layer RMS clip and the global KL clip.

Both compute their scale as a 0-d tensor and multiply, so clipping reads nothing back to the
host (``min(1, x)`` is a clamp; a zero denominator gives an infinite ratio, clamped to 1).
The scalars are accumulated in float64 (float32 on devices without it), so the scale is the
one a host-side computation in Python floats would give.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = ["kl_clip_scale", "rms_clip"]


def _accumulation_dtype(device: torch.device) -> torch.dtype:
    return torch.float32 if device.type == "mps" else torch.float64


def rms_clip(V: Tensor, kappa: float) -> Tensor:
    """Scale ``V`` by ``min(1, kappa / RMS(V))``, ``RMS(V) = ||V||_F / sqrt(#V)``."""
    rms = torch.linalg.vector_norm(V).to(_accumulation_dtype(V.device)) / math.sqrt(V.numel())
    return V * torch.clamp(kappa / rms, max=1.0).to(V.dtype)


def _dot(V: Tensor, g: Tensor) -> Tensor:
    """``<V, g>`` as a 0-d tensor: one fused pass without a temporary of their size when
    both are contiguous and of one dtype, else the sum of the product."""
    if V.dtype == g.dtype and V.is_contiguous() and g.is_contiguous() and V.shape == g.shape:
        return torch.dot(V.reshape(-1), g.reshape(-1))
    return torch.sum(V * g)


def kl_clip_scale(terms: Sequence[tuple[Tensor, Tensor, float]], kappa: float) -> Tensor:
    """Global KL clip ``nu = min(1, sqrt(kappa / |sum_l lr_l^2 <V_l, grad_l>|))`` as a 0-d
    tensor (1 when the sum is 0), on the device of the first term.

    ``terms`` are ``(direction, gradient, learning rate)`` per layer.
    """
    sums = [_dot(V, g) for V, g, _ in terms]
    device = sums[0].device
    dtype = _accumulation_dtype(device)
    parts = [
        (lr * lr) * s.to(device=device, dtype=dtype)
        for s, (_, _, lr) in zip(sums, terms, strict=True)
    ]
    total = torch.stack(parts).sum()
    return torch.clamp(torch.sqrt(kappa / total.abs()), max=1.0)
