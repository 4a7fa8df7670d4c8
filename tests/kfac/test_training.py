"""A short training run: K-FAC beats SGD and Adam at equal steps on the deep autoencoder."""

from __future__ import annotations

import pytest

from kfac import data
from kfac.__main__ import RunConfig, train


@pytest.mark.slow
def test_kfac_beats_sgd_and_adam_on_the_autoencoder() -> None:
    """Digits autoencoder (width 0.25: 784-250-125-62-30-...), 180 steps of batch 128, the
    command line's default hyperparameters for each optimizer, same seed and batches.

    SGD and Adam stall on the mean-image plateau (training MSE about 0.047, the variance of
    the pixels) where the deep autoencoder's curvature is pathological; K-FAC leaves it.
    """
    ds = data.digits28()
    final = {}
    for name in ("sgd", "adam", "kfac"):
        result = train(RunConfig(optimizer=name, epochs=15, width=0.25), ds, progress=False)
        assert result.steps == 180
        final[name] = result.train_loss[-1]
    assert final["kfac"] < 0.9 * min(final["sgd"], final["adam"]), final
