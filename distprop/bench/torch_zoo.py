"""The PyTorch twins of the model zoo (:mod:`distprop.models`), for benchmarks and tests.

``torch_model(name)`` builds the ``torch.nn`` module with the same layers, shapes and
``state_dict`` keys as ``distprop.models.build_model(name)``, so weights move between the two with a
strict ``load_state_dict``. The benchmarks time it against distprop (``benchmarks/``, the
``distprop bench`` torch peer); the tests check exported weights give the same logits in it.
PyTorch is imported only when a model is built.
"""

from __future__ import annotations

from distprop import models


def torch_model(name: str):
    """The zoo model ``name`` (a key of :data:`distprop.models.MODELS`) as a fresh
    ``torch.nn.Module``, in PyTorch's default initialisation.

    Raises:
        ValueError: for a name with no PyTorch twin.
    """
    import torch.nn as tnn  # torch is optional

    if name == "mlp":
        return tnn.Sequential(tnn.Linear(784, 1024), tnn.ReLU(), tnn.Linear(1024, 1024),
                              tnn.ReLU(), tnn.Linear(1024, 10))
    if name == "cnn":
        return tnn.Sequential(tnn.Conv2d(1, 32, 3), tnn.ReLU(), tnn.MaxPool2d(2),
                              tnn.Conv2d(32, 64, 3), tnn.ReLU(), tnn.MaxPool2d(2), tnn.Flatten(),
                              tnn.Linear(1600, 128), tnn.ReLU(), tnn.Linear(128, 10))
    if name == "wide":
        return tnn.Sequential(tnn.Linear(1024, 4096), tnn.ReLU(), tnn.Linear(4096, 4096),
                              tnn.ReLU(), tnn.Linear(4096, 1024), tnn.ReLU(),
                              tnn.Linear(1024, 10))
    if name in ("lstm", "transformer"):
        lstm_twin, transformer_twin = _sequence_twins()
        return lstm_twin() if name == "lstm" else transformer_twin()
    raise ValueError(f"no PyTorch twin for model {name!r}; valid names: "
                     f"{', '.join(models.model_names())}")


def _sequence_twins():
    """PyTorch twins of ``distprop.models.LSTMClassifier`` / ``TransformerClassifier``."""
    import torch.nn as tnn

    class LSTMClassifier(tnn.Module):
        def __init__(self):
            super().__init__()
            self.lstm = tnn.LSTM(64, 256, batch_first=True)
            self.fc = tnn.Linear(256, 10)

        def forward(self, x):
            return self.fc(self.lstm(x)[0][:, -1])

    class TransformerClassifier(tnn.Module):
        def __init__(self):
            super().__init__()
            self.embedding = tnn.Embedding(1000, 128)
            layer = tnn.TransformerEncoderLayer(128, 4, 512, dropout=0.0, batch_first=True)
            self.encoder = tnn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
            self.fc = tnn.Linear(128, 10)

        def forward(self, tokens):
            return self.fc(self.encoder(self.embedding(tokens)).mean(dim=1))

    return LSTMClassifier, TransformerClassifier
