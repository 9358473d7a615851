"""Which model ``distprop train --model`` builds: a zoo model, sized, or one the user brings.

``--model`` is a zoo name (``mlp``, ``cnn``, ``lstm``, ``transformer``, ``wide``) or a factory
``package.module:callable``. A factory is imported (the current directory is searched first,
so a ``mymodels.py`` next to the command works) and called as::

    factory(input_shape=(64,), num_classes=10) -> dp.nn.Module

with keyword arguments only: ``input_shape`` is one sample's shape (a tuple of ints, no batch
dimension) and ``num_classes`` the model's output width (the class count for classification,
the target width for regression). The model must map a float32 batch ``(N, *input_shape)`` to
outputs of shape ``(N, num_classes)``.

Size options of the zoo: each entry of :data:`distprop.models.MODELS` (the model registry, see
:mod:`distprop.registry`) lists in ``size_options`` which of ``--hidden``, ``--layers`` and
``--channels`` it takes, with their defaults (``wide`` takes none). A factory takes none either
(it sizes itself).

Every problem raises :class:`ModelSpecError` (a ``ValueError``) with one line naming it.
"""

from __future__ import annotations

import importlib
import os
import re
import sys

from distprop import nn
from distprop.models import MODELS

SIZE_LIMITS = {"hidden": 65536, "layers": 64, "channels": 4096}
TRANSFORMER_HEADS = 4
_SPEC = re.compile(r"^[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)*:[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)*$")


class ModelSpecError(ValueError):
    """A ``--model`` value, factory or size option that cannot give a model; ``param`` names
    the option at fault (``model``, ``hidden``, ``layers`` or ``channels``)."""

    def __init__(self, message: str, param: str = "model"):
        super().__init__(message)
        self.param = param


def size_options(model: str) -> tuple[str, ...] | None:
    """The size options zoo model ``model`` takes (None for a name not in the zoo)."""
    spec = MODELS.get(model)
    return None if spec is None else tuple(spec.size_options)


def is_factory(model: str) -> bool:
    """True when ``model`` names a factory (``module:callable``) rather than a zoo model."""
    return ":" in str(model)


def check_sizes(model: str, hidden=None, layers=None, channels=None) -> None:
    """Refuse a size option the model does not take, or a value out of range.

    Raises:
        ModelSpecError: naming the option and the model, or the valid range.
    """
    given = {"hidden": hidden, "layers": layers, "channels": channels}
    for name, value in given.items():
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int):
            raise ModelSpecError(f"--{name} must be an integer, got {value!r}", name)
        if not 1 <= value <= SIZE_LIMITS[name]:
            raise ModelSpecError(f"--{name} must be between 1 and {SIZE_LIMITS[name]}, got "
                                 f"{value}", name)
        if is_factory(model):
            raise ModelSpecError(f"--{name} does not apply to a model factory ({model}); the "
                                 "factory sizes its model itself", name)
        takes = size_options(model)
        if takes is None:
            continue  # an unknown name is reported by the model check
        if name not in takes:
            which = ", ".join(f"--{t}" for t in takes) if takes else "no size options"
            raise ModelSpecError(f"--{name} does not apply to model {model!r} (it takes "
                                 f"{which})", name)
    if model == "transformer" and hidden is not None and hidden % TRANSFORMER_HEADS:
        raise ModelSpecError(f"--hidden {hidden} for model 'transformer' (d_model) must be a "
                             f"multiple of its {TRANSFORMER_HEADS} attention heads", "hidden")


def load_factory(spec: str):
    """The callable named by ``spec`` (``package.module:callable``), imported with the current
    directory on ``sys.path``.

    Raises:
        ModelSpecError: a malformed spec, an import failure (with its exception text), a
            missing attribute or a value that is not callable.
    """
    spec = str(spec)
    if not _SPEC.match(spec):
        raise ModelSpecError(f"--model {spec!r} is neither a zoo model nor a factory "
                             "'package.module:callable' (e.g. mymodels:build)")
    module_name, attr = spec.split(":")
    cwd = os.getcwd()
    if cwd not in sys.path and "" not in sys.path:
        sys.path.insert(0, cwd)
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # any error of the user's module is reported
        raise ModelSpecError(f"--model {spec}: cannot import {module_name!r}: "
                             f"{type(exc).__name__}: {exc}") from None
    value = module
    for part in attr.split("."):
        if not hasattr(value, part):
            raise ModelSpecError(f"--model {spec}: module {module_name!r} has no attribute "
                                 f"{attr!r}")
        value = getattr(value, part)
    if not callable(value):
        raise ModelSpecError(f"--model {spec}: {attr!r} is not callable (it is of type "
                             f"{type(value).__name__}); expected a callable returning a "
                             "dp.nn.Module")
    return value


def _from_factory(spec: str, input_shape, outputs: int) -> nn.Module:
    factory = load_factory(spec)
    try:
        model = factory(input_shape=tuple(int(s) for s in input_shape), num_classes=int(outputs))
    except Exception as exc:  # the user's code: report, never a traceback
        raise ModelSpecError(f"--model {spec}: the factory raised {type(exc).__name__}: {exc} "
                             f"(called as factory(input_shape={tuple(input_shape)}, "
                             f"num_classes={outputs}))") from None
    if not isinstance(model, nn.Module):
        raise ModelSpecError(f"--model {spec}: the factory returned a {type(model).__name__}, "
                             "not a dp.nn.Module")
    return model


# --- sized zoo models ---------------------------------------------------------------------------


def _mlp(input_shape, outputs: int, hidden, layers) -> nn.Module:
    import math

    hidden = hidden or 1024
    layers = layers or 2
    body = [nn.Flatten()] if len(input_shape) > 1 else []
    width = math.prod(input_shape)
    for _ in range(layers):
        body += [nn.Linear(width, hidden), nn.ReLU()]
        width = hidden
    return nn.Sequential(*body, nn.Linear(width, outputs))


def _cnn(input_shape, outputs: int, channels) -> nn.Module:
    """adapt's cnn with ``channels`` and ``2 * channels`` in its two convolutions."""
    from distprop.train import adapt

    model = adapt.model_for("cnn", input_shape, outputs)
    layers = list(model)
    convs = [i for i, m in enumerate(layers) if isinstance(m, nn.Conv1d | nn.Conv2d)]
    first, second = layers[convs[0]], layers[convs[1]]
    cls = type(first)
    layers[convs[0]] = cls(first.in_channels, channels, first.kernel_size,
                           padding=first.padding)
    layers[convs[1]] = cls(channels, 2 * channels, second.kernel_size, padding=second.padding)
    head = next(i for i, m in enumerate(layers) if isinstance(m, nn.Linear))
    old = layers[head]
    spatial = old.in_features // second.out_channels
    layers[head] = nn.Linear(2 * channels * spatial, old.out_features)
    return nn.Sequential(*layers)


def _sequence(name: str, input_shape, outputs: int, hidden, layers) -> nn.Module:
    from distprop import models
    from distprop.train import adapt

    steps, features = adapt._sequence_shape(input_shape)
    if name == "lstm":
        model = models.LSTMClassifier(input_size=features, hidden_size=hidden or 256,
                                      num_classes=outputs)
        if layers:
            model.lstm = nn.LSTM(features, hidden or 256, num_layers=layers, batch_first=True)
    else:
        d_model = hidden or 128
        model = models.TransformerClassifier(d_model=d_model, nhead=TRANSFORMER_HEADS,
                                             dim_feedforward=4 * d_model,
                                             num_layers=layers or 2, num_classes=outputs)
        model.embedding = nn.Linear(features, d_model)  # float features, as in adapt
    if tuple(input_shape) == (steps, features):
        return model
    return nn.Sequential(adapt._View(steps, features), model)


def build(model: str, input_shape, outputs: int, hidden=None, layers=None,
          channels=None) -> nn.Module:
    """The model named by ``--model`` for samples of ``input_shape`` and ``outputs`` outputs.

    Without size options a zoo model is exactly :func:`distprop.train.adapt.model_for`'s.

    Raises:
        ModelSpecError: see :func:`check_sizes` and :func:`load_factory`; a factory that raises
            or returns something else than a ``dp.nn.Module``; an unknown zoo name.
    """
    check_sizes(model, hidden, layers, channels)
    if is_factory(model):
        return _from_factory(model, input_shape, outputs)
    if model not in MODELS:
        raise ModelSpecError(f"unknown model {model!r}; choose one of "
                             f"{', '.join(MODELS)} or a factory 'package.module:callable'")
    shape = tuple(int(s) for s in input_shape)
    try:
        if model == "mlp" and (hidden or layers):
            return _mlp(shape, outputs, hidden, layers)
        if model == "cnn" and channels:
            return _cnn(shape, outputs, channels)
        if model in ("lstm", "transformer") and (hidden or layers):
            return _sequence(model, shape, outputs, hidden, layers)
        from distprop.train.adapt import model_for

        return model_for(model, shape, outputs)
    except ModelSpecError:
        raise
    except ValueError as exc:
        raise ModelSpecError(str(exc)) from None
