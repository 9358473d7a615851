"""Tasks of ``distprop train --task``: classification (the default) and regression.

* ``classification``: integer labels, cross-entropy loss (``--loss cross_entropy``), accuracy.
* ``regression``: an ``.npz`` file with float features ``x`` and float targets ``y`` of shape
  ``(N,)`` or ``(N, k)`` (the same key pairs as classification files: ``x``/``y``, ``X``/``y``,
  ``inputs``/``targets``, ...), split by ``--val-fraction``/``--test-fraction`` and ``--seed``;
  loss ``--loss mse`` (default) or ``huber`` (delta 1); metrics ``r2`` (coefficient of
  determination, uniform over target columns) and ``mae``. The model has ``k`` outputs (1 for
  targets of shape ``(N,)``, which are kept as one column, ``(N, 1)``). For a regression dataset
  :attr:`DataSplits.num_classes <distprop.data.sources.DataSplits>` holds this output width.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from distprop.data import sources
from distprop.data.dataset import Subset, TensorDataset
from distprop.registry import LOSSES, TASKS

__all__ = ["LOSSES", "TASKS", "check_loss", "default_loss", "describe", "load_regression",
           "loss_fn", "losses_of", "metrics"]


def losses_of(task: str) -> tuple[str, ...]:
    """The losses of ``task`` in :data:`distprop.registry.LOSSES` (the first is its default)."""
    return tuple(name for name, entry in LOSSES.items() if entry.task == task)


def default_loss(task: str) -> str:
    """The loss a task uses when ``--loss`` is not given."""
    return losses_of(task)[0]


def check_loss(task: str, loss: str | None) -> None:
    """Raise ValueError naming the valid losses when ``loss`` does not belong to ``task``."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; choose one of {', '.join(TASKS)}")
    if loss is not None and loss not in losses_of(task):
        raise ValueError(f"--loss {loss} does not apply to --task {task}; choose one of "
                         f"{', '.join(losses_of(task))}")


def loss_fn(task: str, loss: str | None = None):
    """The loss module of ``task`` (``loss`` or the task's default)."""
    return LOSSES.lookup(loss or default_loss(task)).load()()


def metrics(task: str) -> dict:
    """The Trainer metrics of ``task`` (see :mod:`distprop.train.metrics`)."""
    from distprop.train.metrics import default_metrics

    return default_metrics(task)


def load_regression(name: str, seed: int = 0, val_fraction: float = 0.1,
                    test_fraction: float = 0.1) -> sources.DataSplits:
    """Float features and targets from an ``.npz`` file, split deterministically by ``seed``.

    Raises:
        DataError: not an ``.npz`` file, keys missing, shapes that do not match, targets that
            are not numbers, NaN/inf.
    """
    path = Path(name)
    if name in sources.DATASETS or path.suffix != ".npz":
        raise sources.DataError(f"--task regression needs an .npz file with float features and "
                                f"targets (x: (N, ...), y: (N,) or (N, k)); got {name!r}")
    if not path.is_file():
        raise sources.DataError(f"dataset file {path} does not exist")
    arrays = sources._read_npz(path, mmap=False)
    xk, yk = sources._pick_keys(arrays, str(path), None, None)
    x, y = np.asarray(arrays[xk]), np.asarray(arrays[yk])
    where = f"{path}: array '{yk}' (targets)"
    if x.ndim < 2 or x.dtype.kind not in "fiub":
        raise sources.DataError(f"{path}: array '{xk}' has shape {x.shape} and dtype {x.dtype}; "
                                "expected numeric features of shape (samples, ...)")
    if y.dtype.kind not in "fiu":
        raise sources.DataError(f"{where} has dtype {y.dtype}; expected float targets")
    if y.ndim not in (1, 2) or y.shape[0] != x.shape[0] or (y.ndim == 2 and y.shape[1] < 1):
        raise sources.DataError(f"{where} has shape {y.shape}; expected ({x.shape[0]},) or "
                                f"({x.shape[0]}, k) to match '{xk}' {x.shape}")
    for label, array in ((f"'{xk}'", x), (f"'{yk}'", y)):
        finite = np.isfinite(array.reshape(array.shape[0], -1)).all(axis=1)
        if not finite.all():
            raise sources.DataError(f"{path}: array {label} has a non-finite value (NaN or inf) "
                                    f"in sample {int(np.argmin(finite))}")
    y = y.reshape(y.shape[0], -1).astype(np.float32)
    sources._check_fractions(val_fraction, test_fraction)
    base = TensorDataset(x, y, dtypes=(np.float32, np.float32))
    fractions = [1.0 - val_fraction - test_fraction, val_fraction, test_fraction]
    train_idx, val_idx, test_idx = sources._split(len(base), fractions, seed, str(path))
    info = {"path": str(path), "keys": {"train": [xk, yk]}, "task": "regression",
            "targets": int(y.shape[1])}
    return sources.DataSplits(
        train=Subset(base, train_idx),
        val=Subset(base, val_idx) if val_idx.size else None,
        test=Subset(base, test_idx) if test_idx.size else None,
        num_classes=int(y.shape[1]), input_shape=tuple(x.shape[1:]), name=str(path), info=info)


def describe(result: dict) -> str:
    """``loss 0.1234  accuracy 97.50%`` or ``loss 0.0123  r2 0.9812  mae 0.0876`` for a result
    of :meth:`~distprop.train.trainer.Trainer.evaluate`."""
    parts = [f"loss {result['loss']:.4f}"]
    if "accuracy" in result:
        parts.append(f"accuracy {100 * result['accuracy']:.2f}%")
    parts += [f"{name} {result[name]:.4f}" for name in ("r2", "mae") if name in result]
    return "  ".join(parts)
