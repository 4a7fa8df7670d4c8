"""Train the wide digits autoencoder with one K-FAC variant and print its diagnostics.

The measurements behind the "why" of the time-to-target results (identity weight against
the G factors' scale, Brand ranks, refresh frequency) come from this script:

    python benchmarks/kfac_diagnose.py brand                           # B-KFAC, defaults
    python benchmarks/kfac_diagnose.py brand '{"brand_every": 1}'
    python benchmarks/kfac_diagnose.py rsvd '{"inverse_every": 1}'
    python benchmarks/kfac_diagnose.py brand '{"identity_clock": "batches"}'

Width 2, seed 0, 10 epochs of batch 128, the command line's K-FAC hyperparameters; prints
the training loss per epoch, the time to a loss of 0.045, ``precond.diagnostics()``, the
phase timings, and each layer's top eigenvalues against its identity weight.
"""

from __future__ import annotations

import os

os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "4")  # numpy, scipy and torch BLAS on 2 cores

import json
import sys
import time

import torch
from torch.nn import functional as F

import kfac
from kfac import data, models


def main() -> None:
    name = sys.argv[1] if len(sys.argv) > 1 else "brand"
    extra = json.loads(sys.argv[2]) if len(sys.argv) > 2 else {}
    ds = data.digits28()
    torch.manual_seed(0)
    model = models.autoencoder(784, 2.0)
    options = {"inverse_every": 10, **extra}
    opt = kfac.KFAC(
        model, lr=0.3, momentum=0.9, inverse=name, damping=3e-3, kl_clip=1e-4,
        factor_every=1, factor_decay=0.95, loss="mse", time_phases=True, **options,
    )  # fmt: skip
    g = torch.Generator().manual_seed(0)
    n, wall, reached, loss = ds.x_train.shape[0], 0.0, None, float("nan")
    for epoch in range(10):
        perm = torch.randperm(n, generator=g)
        for i in range(0, n, 128):
            x = ds.x_train[perm[i : i + 128]]
            start = time.perf_counter()
            opt.zero_grad()
            F.mse_loss(model(x), x.flatten(1)).backward()
            opt.step()
            wall += time.perf_counter() - start
        with torch.no_grad():
            loss = F.mse_loss(model(ds.x_train), ds.x_train.flatten(1)).item()
        if reached is None and loss <= 0.045:
            reached = wall
        print(f"epoch {epoch + 1}: loss {loss:.4f}, training time {wall:.1f} s", flush=True)
    print(f"final loss {loss:.4f}; time to 0.045: {reached}; training time {wall:.1f} s")
    for row in opt.preconditioner.diagnostics():
        print(row)
    print({phase: round(t, 2) for phase, t in opt.preconditioner.timings.items()})
    for layer in opt.preconditioner.layer_names:
        A, G = opt.preconditioner.representations(layer)
        state = opt.preconditioner.state(layer)
        print(
            f"layer {layer}: A top {float(A.d[0]):.3g} (identity {state.A.applied.identity:.3g}), "
            f"G top {float(G.d[0]):.3g} (identity {state.G.applied.identity:.3g})"
        )


if __name__ == "__main__":
    main()
