"""Step clipping on the device: per-layer RMS clip and the global KL clip.

Both compute their scale as a 0-d tensor and multiply, so clipping reads nothing back to the
host (``min(1, x)`` is a clamp, a zero denominator gives an infinite ratio clamped to 1).
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import Tensor

__all__ = ["kl_clip_scale", "rms_clip"]


def rms_clip(V: Tensor, kappa: float) -> Tensor:
    """Scale ``V`` by ``min(1, kappa / RMS(V))``, ``RMS(V) = ||V||_F / sqrt(#V)``."""
    rms = torch.linalg.vector_norm(V) / math.sqrt(V.numel())
    return V * torch.clamp(kappa / rms, max=1.0)


def kl_clip_scale(terms: Iterable[tuple[Tensor, Tensor, float]], kappa: float) -> Tensor:
    """Global KL clip ``nu = min(1, sqrt(kappa / |sum_l lr_l^2 <V_l, grad_l>|))`` as a 0-d
    tensor (1 when the sum is 0).

    ``terms`` are ``(direction, gradient, learning rate)`` per layer, on one device.
    """
    parts = [lr * lr * torch.sum(V * g) for V, g, lr in terms]
    total = torch.stack([p.to(parts[0].device) for p in parts]).sum()
    return torch.clamp(torch.sqrt(kappa / total.abs()), max=1.0)
