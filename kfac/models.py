"""The models of the command line and the benchmarks.

- :func:`autoencoder`: the deep autoencoder of the K-FAC paper (Martens and Grosse 2015,
  after Hinton and Salakhutdinov 2006), ``784-1000-500-250-30`` and its mirror, tanh units,
  a linear code layer and a sigmoid output trained with the squared error.
- :func:`mlp`: a two-hidden-layer ReLU classifier.
- :func:`cnn`: a small convolutional classifier with one BatchNorm (which K-FAC leaves
  unpreconditioned).
- :func:`transformer`: a small Transformer encoder classifying an image read as a sequence
  of its pixel rows (28 tokens of 28 features for the digits): a linear token embedding, a
  learned position embedding, pre-norm ``nn.TransformerEncoderLayer`` blocks (batch first)
  and a linear head on the mean token.

``width`` multiplies every hidden width (not the 30-unit code or the classes) so wide-layer
behaviour can be studied.
"""

from __future__ import annotations

import itertools
import math

import torch
from torch import Tensor, nn

__all__ = ["MODELS", "RowTransformer", "autoencoder", "build", "cnn", "mlp", "transformer"]


def _scaled(width: float, size: int) -> int:
    if not (isinstance(width, (int, float)) and math.isfinite(width) and width > 0):
        raise ValueError(f"Invalid width: {width!r} (must be > 0)")
    return max(1, round(size * width))


def autoencoder(in_features: int = 784, width: float = 1.0) -> nn.Sequential:
    """Deep autoencoder ``in-1000-500-250-30-250-500-1000-in`` (hidden sizes times ``width``)."""
    hidden = [_scaled(width, s) for s in (1000, 500, 250)]
    sizes = [in_features, *hidden, 30, *hidden[::-1], in_features]
    layers: list[nn.Module] = [nn.Flatten()]
    for i, (a, b) in enumerate(itertools.pairwise(sizes)):
        layers.append(nn.Linear(a, b))
        if i == len(sizes) - 2:
            layers.append(nn.Sigmoid())
        elif b != 30:
            layers.append(nn.Tanh())
    return nn.Sequential(*layers)


def mlp(in_features: int = 784, num_classes: int = 10, width: float = 1.0) -> nn.Sequential:
    """ReLU classifier ``in-512-256-classes`` (hidden sizes times ``width``)."""
    h1, h2 = _scaled(width, 512), _scaled(width, 256)
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(in_features, h1),
        nn.ReLU(),
        nn.Linear(h1, h2),
        nn.ReLU(),
        nn.Linear(h2, num_classes),
    )


def cnn(in_channels: int = 1, num_classes: int = 10, width: float = 1.0) -> nn.Sequential:
    """Two 3x3 conv blocks (16 and 32 channels times ``width``), pooled to 3x3, then a
    128-unit hidden layer; any input size of at least 12x12."""
    c1, c2, h = _scaled(width, 16), _scaled(width, 32), _scaled(width, 128)
    return nn.Sequential(
        nn.Conv2d(in_channels, c1, 3, padding=1),
        nn.BatchNorm2d(c1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(c1, c2, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.AdaptiveAvgPool2d(3),
        nn.Flatten(),
        nn.Linear(c2 * 9, h),
        nn.ReLU(),
        nn.Linear(h, num_classes),
    )


class RowTransformer(nn.Module):
    """Transformer encoder over the rows of an image (see :func:`transformer`)."""

    def __init__(
        self, rows: int, features: int, num_classes: int, d_model: int, layers: int, heads: int
    ) -> None:
        super().__init__()
        self.embed = nn.Linear(features, d_model)
        self.position = nn.Parameter(torch.zeros(rows, d_model))
        nn.init.normal_(self.position, std=0.02)
        block = nn.TransformerEncoderLayer(
            d_model, heads, 2 * d_model, dropout=0.0, batch_first=True, norm_first=True
        )
        self.encoder = nn.TransformerEncoder(block, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        tokens = x.flatten(1, -2) if x.ndim > 3 else x  # (n, C*H, W): one token per row
        h = self.encoder(self.embed(tokens) + self.position)
        return self.head(self.norm(h).mean(dim=1))


def transformer(
    image_shape: tuple[int, int, int] = (1, 28, 28), num_classes: int = 10, width: float = 1.0
) -> RowTransformer:
    """Two pre-norm encoder blocks of width ``64 width`` with 4 heads over the ``C H`` pixel
    rows of ``W`` features of each image."""
    c, h, w = image_shape
    return RowTransformer(c * h, w, num_classes, 4 * _scaled(width, 16), 2, 4)


#: Model name -> (task kind, loss name).
MODELS = {
    "autoencoder": ("reconstruction", "mse"),
    "mlp": ("classification", "cross_entropy"),
    "cnn": ("classification", "cross_entropy"),
    "transformer": ("classification", "cross_entropy"),
}


def build(
    name: str, image_shape: tuple[int, int, int], num_classes: int, width: float
) -> nn.Module:
    """The model ``name`` for images of ``image_shape`` ``(C, H, W)``."""
    c, h, w = image_shape
    if name == "autoencoder":
        return autoencoder(c * h * w, width)
    if name == "mlp":
        return mlp(c * h * w, num_classes, width)
    if name == "cnn":
        return cnn(c, num_classes, width)
    if name == "transformer":
        return transformer(image_shape, num_classes, width)
    raise ValueError(f"Invalid model: {name!r}; valid names are {list(MODELS)}")
