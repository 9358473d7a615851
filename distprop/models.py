"""The model zoo of the benchmarks (``../shared/BENCHMARKS.md``), used by the CLI and benchmarks.

Every workload is a classifier over 10 classes trained with cross-entropy. The registry
:data:`MODELS` maps a name to a :class:`ModelSpec`: calling the spec builds the model, and its
fields describe one sample's input and the benchmark's batch per rank.

To add a model, write a builder ``_name(num_classes=10) -> Module`` and add one entry::

    MODELS["name"] = ModelSpec(_name, input_shape=(...), batch_size=..., description="...")

(for token inputs give ``vocab_size``: samples are then int64 ids in ``[0, vocab_size)``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import numpy as np

from distprop import nn
from distprop.tensor import Tensor


@dataclass(frozen=True)
class ModelSpec:
    """One workload: how to build it and what one sample looks like.

    Attributes:
        builder: ``builder(num_classes=10, **kw) -> Module``.
        input_shape: shape of one input sample (no batch dim).
        batch_size: the benchmark's batch per rank.
        description: one line for ``--help`` texts and reports.
        vocab_size: when set, inputs are int64 token ids in ``[0, vocab_size)``, else floats.
        num_classes: number of output classes.
        size_options: the size options ``distprop train`` takes for this model, option name
            (``hidden``, ``layers``, ``channels``) -> what it sets and its default (see
            :mod:`distprop.train.modelspec`).
    """

    builder: Callable[..., nn.Module]
    input_shape: tuple[int, ...]
    batch_size: int
    description: str
    vocab_size: int | None = None
    num_classes: int = 10
    size_options: Mapping[str, str] = field(default_factory=dict, hash=False)

    def __call__(self, **kwargs) -> nn.Module:
        return self.builder(**kwargs)


def _mlp(num_classes: int = 10) -> nn.Module:
    return nn.Sequential(
        nn.Linear(784, 1024), nn.ReLU(),
        nn.Linear(1024, 1024), nn.ReLU(),
        nn.Linear(1024, num_classes),
    )


def _cnn(num_classes: int = 10) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 32, 3), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(1600, 128), nn.ReLU(),
        nn.Linear(128, num_classes),
    )


def _wide(num_classes: int = 10) -> nn.Module:
    return nn.Sequential(
        nn.Linear(1024, 4096), nn.ReLU(),
        nn.Linear(4096, 4096), nn.ReLU(),
        nn.Linear(4096, 1024), nn.ReLU(),
        nn.Linear(1024, num_classes),
    )


class LSTMClassifier(nn.Module):
    """LSTM(64 -> 256, batch_first) whose last time step feeds Linear(256, classes)."""

    def __init__(self, input_size: int = 64, hidden_size: int = 256, num_classes: int = 10):
        super().__init__()
        self.lstm = nn.LSTM(input_size, hidden_size, batch_first=True)
        self.fc = nn.Linear(hidden_size, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        out, _ = self.lstm(x)
        return self.fc(out[:, -1])


class TransformerClassifier(nn.Module):
    """Embedding, 2 post-norm encoder layers (batch_first, dropout 0), mean-pool, Linear."""

    def __init__(self, vocab_size: int = 1000, d_model: int = 128, nhead: int = 4,
                 dim_feedforward: int = 512, num_layers: int = 2, num_classes: int = 10):
        super().__init__()
        self.embedding = nn.Embedding(vocab_size, d_model)
        layer = nn.TransformerEncoderLayer(d_model, nhead, dim_feedforward, dropout=0.0,
                                           batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, num_layers)
        self.fc = nn.Linear(d_model, num_classes)

    def forward(self, tokens: Tensor) -> Tensor:
        return self.fc(self.encoder(self.embedding(tokens)).mean(dim=1))


def _lstm(num_classes: int = 10) -> nn.Module:
    return LSTMClassifier(num_classes=num_classes)


def _transformer(num_classes: int = 10) -> nn.Module:
    return TransformerClassifier(num_classes=num_classes)


MODELS: dict[str, ModelSpec] = {
    "mlp": ModelSpec(_mlp, (784,), 256, "Linear 784-1024-1024-10 with ReLU (1.86 M params)",
                     size_options={"hidden": "width of every hidden layer [1024]",
                                   "layers": "hidden layers [2]"}),
    "cnn": ModelSpec(_cnn, (1, 28, 28), 64,
                     "2 x (Conv2d 3x3, ReLU, MaxPool2d 2), Linear 1600-128-10 (0.23 M params)",
                     size_options={"channels": "channels of the first convolution (the second "
                                               "has twice as many) [32]"}),
    "lstm": ModelSpec(_lstm, (32, 64), 64,
                      "LSTM 64-256 (batch_first), last step, Linear 256-10 (0.33 M params)",
                      size_options={"hidden": "hidden size [256]",
                                    "layers": "stacked LSTM layers [1]"}),
    "transformer": ModelSpec(_transformer, (64,), 32,
                             "Embedding 1000x128, 2 x TransformerEncoderLayer(128, 4 heads, "
                             "ff 512, dropout 0), mean-pool, Linear 128-10 (0.53 M params)",
                             vocab_size=1000,
                             size_options={"hidden": "d_model, a multiple of its 4 heads; the "
                                                     "feed-forward width is 4 x d_model [128]",
                                           "layers": "encoder layers [2]"}),
    "wide": ModelSpec(_wide, (1024,), 32,
                      "Linear 1024-4096-4096-1024-10 with ReLU (25.2 M params, comm-heavy)"),
}


def spec(name: str) -> ModelSpec:
    """The registry entry for ``name``; ValueError listing the valid names otherwise."""
    try:
        return MODELS[name]
    except (KeyError, TypeError):
        raise ValueError(
            f"unknown model {name!r}; valid names: {', '.join(sorted(MODELS))}"
        ) from None


def model_names() -> list[str]:
    return sorted(MODELS)


def build_model(name: str, device=None, dtype=None, **kwargs) -> nn.Module:
    """Build the named model (PyTorch default initialisation from the global seed).

    Args:
        name: a key of :data:`MODELS`.
        device: where to put the parameters ("cpu", "cuda", "cuda:N").
        dtype: parameter dtype (default float32).
        **kwargs: passed to the builder (e.g. ``num_classes``).
    """
    model = spec(name)(**kwargs)
    if device is not None or dtype is not None:
        model.to(device=device, dtype=dtype)
    return model


def input_shape(name: str) -> tuple[int, ...]:
    """Shape of one input sample of the named model (no batch dim)."""
    return spec(name).input_shape


def batch_size(name: str) -> int:
    """The benchmark's batch size per rank for the named model."""
    return spec(name).batch_size


def sample_batch(name: str, batch: int | None = None, *, dtype=np.float32, device=None,
                 seed: int | np.random.Generator = 0) -> tuple[Tensor, Tensor]:
    """A random ``(inputs, labels)`` batch of the right shapes for the named model.

    Inputs are standard normal floats of ``dtype`` (or int64 token ids for token models);
    labels are int64 class indices. ``seed`` (or a Generator) makes the batch reproducible.
    """
    s = spec(name)
    n = s.batch_size if batch is None else int(batch)
    if n < 1:
        raise ValueError(f"batch must be >= 1, got {n}")
    rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
    if s.vocab_size is not None:
        x = rng.integers(0, s.vocab_size, size=(n, *s.input_shape), dtype=np.int64)
    else:
        x = rng.standard_normal((n, *s.input_shape), dtype=np.float64).astype(dtype)
    y = rng.integers(0, s.num_classes, size=n, dtype=np.int64)
    return Tensor(x, device=device), Tensor(y, device=device)
