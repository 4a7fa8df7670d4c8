"""How stale FNGD's stored coefficients are: on the digits CNN, each step after the first
epoch compares the stored coefficients of the batch's samples (computed an epoch or more
earlier) with the ones a fresh solve on the current per-sample gradients gives, and the two
directions they weight (cosine similarity per layer, mean over the epoch's steps).

    python benchmarks/kfac_fngd_staleness.py            # damping 0.1 and 3e-3, seed 0
    python benchmarks/kfac_fngd_staleness.py --quick    # smoke run

Writes benchmarks/results/kfac_fngd_staleness.{json,md}.
"""

from __future__ import annotations

import os

os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "4")

import argparse
import json
import platform
from pathlib import Path
from typing import Any

import torch
from torch.nn import functional as F

from kfac import FNGD, data, models
from kfac import _persample as ps
from kfac.__main__ import RunConfig, _make_optimizer


def _cos(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.flatten() @ b.flatten()) / (a.norm() * b.norm()).clamp_min(1e-30))


def staleness(damping: float, epochs: int, width: float, train_size: int | None) -> dict:
    """Per epoch (after the first) and layer: mean cosine of stored vs fresh coefficients
    and of the directions they weight."""
    ds = data.digits28()
    n = ds.x_train.shape[0] if train_size is None else train_size
    torch.manual_seed(0)
    model = models.build("cnn", ds.image_shape, ds.num_classes, width)
    cfg = RunConfig(optimizer="fngd", model="cnn", lr=0.3, damping=damping)
    opt = _make_optimizer("fngd", model, cfg, "cross_entropy")
    assert isinstance(opt, FNGD)
    pre = opt.preconditioner
    block = pre.fngd
    gen = torch.Generator().manual_seed(0)
    out: dict[str, Any] = {}
    for epoch in range(epochs):
        sums: dict[str, list[float]] = {}
        for idx in torch.randperm(n, generator=gen).split(128):
            opt.zero_grad()
            F.cross_entropy(model(ds.x_train[idx]), ds.y_train[idx]).backward()
            if epoch:
                for name in pre.layer_names:
                    batch = pre.recorded(name)
                    a, g = ps.per_sample_rows(batch)
                    store = pre.coefficients(name)
                    stored = store.lookup(idx)
                    fresh = block._solve(ps.gram(a, g), damping)
                    row = sums.setdefault(name, [0.0, 0.0, 0.0, 0.0])
                    direction = ps.weighted_sum(a, g, fresh)
                    mean = ps.weighted_sum(a, g, torch.full_like(fresh, 1.0 / len(idx)))
                    row[0] += _cos(stored, fresh)
                    row[1] += _cos(ps.weighted_sum(a, g, stored), direction)
                    row[2] += _cos(direction, mean)
                    row[3] += 1
            opt.step(indices=idx)
        if epoch:
            out[str(epoch + 1)] = {
                name: {"alpha": s[0] / s[3], "direction": s[1] / s[3], "gradient": s[2] / s[3]}
                for name, s in sums.items()
            }
    return out


def markdown(results: dict[str, Any], meta: dict[str, Any]) -> str:
    lines = [
        "# FNGD: stored against fresh coefficients on the digits CNN",
        "",
        f"{meta['device']}; torch {meta['torch']}; seed 0; the paper's schedule (coefficients "
        "computed in epoch 1, stored by dataset index, reused after), lr 0.3, momentum 0.9, "
        "KL clip 1e-4. Each step after epoch 1 also solves for fresh coefficients on the "
        "current per-sample gradients (not applied). Cosine similarity, mean over the "
        "epoch's steps, per layer: stored against fresh coefficients `alpha` / stored "
        "against fresh directions `G alpha` / fresh direction against the batch gradient "
        "(1: FNGD is SGD on that layer).",
        "",
    ]
    for damping, per_epoch in results.items():
        names = list(next(iter(per_epoch.values())))
        lines += [
            f"## relative damping {damping}",
            "",
            "| epoch | " + " | ".join(f"layer {n}" for n in names) + " |",
            "|---|" + "---|" * len(names),
        ]
        for epoch, rows in per_epoch.items():
            cells = [
                f"{rows[n]['alpha']:.3f} / {rows[n]['direction']:.3f} / {rows[n]['gradient']:.3f}"
                for n in names
            ]
            lines.append(f"| {epoch} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--dampings", type=float, nargs="+", default=[0.1, 3e-3])
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    epochs, width, size = (2, 0.25, 256) if args.quick else (6, 1.0, None)
    results = {str(d): staleness(d, epochs, width, size) for d in args.dampings}
    meta = {"device": f"CPU ({platform.machine()})", "torch": torch.__version__}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = "kfac_fngd_staleness" + ("_quick" if args.quick else "")
    (out / f"{stem}.json").write_text(json.dumps({"meta": meta, "results": results}, indent=1))
    text = markdown(results, meta)
    (out / f"{stem}.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
