"""Fit a zoo model (``distprop.models``) to a dataset's sample shape and class count.

The zoo models are the benchmark workloads with fixed input shapes (mlp: 784 features, cnn:
1x28x28 images, wide: 1024 features, ...). ``distprop train`` keeps each model's architecture
and changes only what touches the data:

* ``mlp``, ``wide``: the first Linear takes the dataset's number of features (samples of any
  shape are flattened first); the last Linear gives ``num_classes`` outputs.
* ``cnn``: the same two conv-ReLU-maxpool stages and Linear-128 head. 1-D samples whose length
  is a perfect square (digits: 64 = 8x8, MNIST: 784 = 28x28) are viewed as square images;
  other 1-D samples (MNIST-1D: 40 steps) use the 1-D version (Conv1d/MaxPool1d); convolutions
  get padding 1 when the input is too small for unpadded ones. On 1x28x28 inputs it is exactly
  the zoo model.
* ``lstm``: samples become sequences (a 1-D sample of length L = s*s is s steps of s features,
  other lengths L steps of 1 feature); the input size and class count follow the data.
* ``transformer``: float features are projected to the model width per step (a Linear instead
  of the token Embedding), then the zoo's encoder layers, mean-pooling and head.

When the dataset already has the model's input shape, the zoo model is used unchanged.
"""

from __future__ import annotations

import math

from distprop import nn


class _View(nn.Module):
    """Reshape each sample to ``shape`` (batch dimension kept)."""

    def __init__(self, *shape: int):
        super().__init__()
        self.shape = tuple(shape)

    def forward(self, x):
        return x.reshape(x.shape[0], *self.shape)

    def extra_repr(self) -> str:
        return ", ".join(str(s) for s in self.shape)


def _square_side(n: int) -> int | None:
    side = math.isqrt(n)
    return side if side * side == n and side >= 4 else None


def _zoo(name: str, num_classes: int):
    from distprop import models

    return models.build_model(name, num_classes=num_classes)


def _dense(name: str, input_shape, num_classes: int) -> nn.Module:
    features = math.prod(input_shape)
    model = _zoo(name, num_classes)
    layers = list(model)
    first = layers[0]
    if len(input_shape) == 1 and first.in_features == features:
        return model
    layers[0] = nn.Linear(features, first.out_features)
    prefix = [nn.Flatten()] if len(input_shape) > 1 else []
    return nn.Sequential(*prefix, *layers)


def _conv_stack(dims: int, channels: int, spatial: tuple[int, ...], num_classes: int):
    conv, pool = (nn.Conv1d, nn.MaxPool1d) if dims == 1 else (nn.Conv2d, nn.MaxPool2d)
    # the zoo's stages: conv3 -> pool2 -> conv3 -> pool2; pad when the input is too small
    unpadded = [((s - 2) // 2 - 2) // 2 for s in spatial]
    padding = 0 if min(unpadded) >= 1 else 1
    size = [((s - 2 + 2 * padding) // 2 - 2 + 2 * padding) // 2 for s in spatial]
    if min(size) < 1:
        raise ValueError(f"cnn: samples of spatial size {spatial} are too small for two "
                         "conv3/maxpool2 stages")
    return nn.Sequential(
        conv(channels, 32, 3, padding=padding), nn.ReLU(), pool(2),
        conv(32, 64, 3, padding=padding), nn.ReLU(), pool(2),
        nn.Flatten(),
        nn.Linear(64 * math.prod(size), 128), nn.ReLU(),
        nn.Linear(128, num_classes),
    )


def _cnn(input_shape, num_classes: int) -> nn.Module:
    shape = tuple(input_shape)
    if shape == (1, 28, 28):
        return _zoo("cnn", num_classes)
    if len(shape) == 3:
        return _conv_stack(2, shape[0], shape[1:], num_classes)
    if len(shape) == 2:  # (channels, length)
        return _conv_stack(1, shape[0], shape[1:], num_classes)
    if len(shape) == 1:
        side = _square_side(shape[0])
        if side is not None:
            body = _conv_stack(2, 1, (side, side), num_classes) if side != 28 else \
                _zoo("cnn", num_classes)
            return nn.Sequential(_View(1, side, side), *list(body))
        return nn.Sequential(_View(1, shape[0]), *list(_conv_stack(1, 1, shape, num_classes)))
    raise ValueError(f"cnn: cannot use samples of shape {shape}")


def _sequence_shape(input_shape) -> tuple[int, int]:
    shape = tuple(input_shape)
    if len(shape) == 2:
        return shape
    if len(shape) == 1:
        side = _square_side(shape[0])
        return (side, side) if side is not None else (shape[0], 1)
    if len(shape) == 3 and shape[0] == 1:
        return shape[1], shape[2]
    raise ValueError(f"cannot read samples of shape {shape} as sequences")


def _with_sequence_input(name: str, input_shape, num_classes: int) -> nn.Module:
    """lstm/transformer over (steps, features) float sequences."""
    from distprop import models

    steps, features = _sequence_shape(input_shape)
    if name == "lstm":
        if tuple(input_shape) == tuple(models.spec("lstm").input_shape):
            return _zoo("lstm", num_classes)
        model = models.LSTMClassifier(input_size=features, num_classes=num_classes)
    else:
        model = models.TransformerClassifier(num_classes=num_classes)
        width = model.embedding.embedding_dim
        model.embedding = nn.Linear(features, width)  # float features instead of token ids
    if tuple(input_shape) == (steps, features):
        return model
    return nn.Sequential(_View(steps, features), model)


def model_for(name: str, input_shape, num_classes: int) -> nn.Module:
    """The zoo model ``name`` adapted to samples of ``input_shape`` and ``num_classes``.

    Raises:
        ValueError: unknown model (listing the valid ones), or samples the model cannot take.
    """
    from distprop import models

    models.spec(name)  # unknown name -> ValueError listing the valid ones
    if name in ("mlp", "wide"):
        return _dense(name, input_shape, num_classes)
    if name == "cnn":
        return _cnn(input_shape, num_classes)
    return _with_sequence_input(name, input_shape, num_classes)
