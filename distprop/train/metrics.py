"""Metrics of the Trainer: functions of outputs and targets, reduced exactly across ranks.

The contract (``fit(..., metrics={"name": m})``): every metric is turned into a fixed number of
*sums*, added up batch by batch on each rank and summed over the ranks (one float64 allreduce
with the loss, at each log interval and epoch end); the metric's value is computed from the
global sums only. Nothing is averaged per rank, so N ranks give the value one process gets on
the same global data (up to float rounding of the summation order).

``m`` is either

* a function ``fn(outputs, targets)`` of the batch's output and target Tensors returning

  - a pair ``(sum, count)``: the metric is ``sum of sums / sum of counts`` over every batch of
    every rank (e.g. ``(number correct, batch size)``), or
  - one number, the batch's mean: weighted by the batch's sample count, i.e. the pair
    ``(value * n, n)``;

  numbers may be Python floats, 0-d NumPy/CuPy arrays or 0-d Tensors (kept on the device
  until the reduction); or

* a :class:`Metric`, for values that are not a ratio of two sums (:class:`R2Score` needs the
  sums of squares and of targets per output column).

Built in: :class:`Accuracy` (argmax of the outputs equals the integer target; the default of a
classification Trainer), :class:`MeanAbsoluteError` and :class:`R2Score` (regression).
"""

from __future__ import annotations

import math

import numpy as np

from distprop import backend
from distprop.tensor import Tensor


def _data(value):
    return value.data if isinstance(value, Tensor) else value


class Metric:
    """A metric as fixed-length sums, reduced over batches and ranks, then turned into a value.

    Subclasses define :meth:`size`, :meth:`sums` and :meth:`value`.
    """

    def size(self, target_shape: tuple[int, ...]) -> int:
        """How many sums, for targets of one sample of ``target_shape``."""
        raise NotImplementedError

    def sums(self, outputs: Tensor, targets: Tensor, xp):
        """This batch's sums: a 1-D float64 ``xp`` array of :meth:`size` entries."""
        raise NotImplementedError

    def value(self, totals: np.ndarray, samples: float) -> float:
        """The metric from the sums over all batches and ranks and the sample count."""
        raise NotImplementedError


class FunctionMetric(Metric):
    """A function ``fn(outputs, targets) -> (sum, count)`` or ``-> batch mean`` (see module)."""

    def __init__(self, fn):
        if not callable(fn):
            raise TypeError(f"a metric must be callable or a Metric, got {type(fn).__name__}")
        self.fn = fn

    def size(self, target_shape) -> int:
        return 2

    def sums(self, outputs, targets, xp):
        result = self.fn(outputs, targets)
        if isinstance(result, tuple | list):
            if len(result) != 2:
                raise ValueError(f"metric {getattr(self.fn, '__name__', self.fn)!r} returned "
                                 f"{len(result)} values; expected (sum, count) or one number")
            total, count = (_data(v) for v in result)
        else:
            n = float(targets.shape[0]) if targets.ndim else 1.0
            total, count = _data(result) * n, n
        return xp.stack([xp.asarray(total, dtype=np.float64), xp.asarray(count, dtype=np.float64)])

    def value(self, totals, samples) -> float:
        return float(totals[0] / totals[1]) if totals[1] else math.nan


class Accuracy(Metric):
    """Fraction of samples whose argmax output equals the integer target (0 for other shapes)."""

    def size(self, target_shape) -> int:
        return 1

    def sums(self, outputs, targets, xp):
        correct = 0.0
        if outputs.ndim == 2 and targets.ndim == 1 and targets.dtype.kind in "iu":
            correct = (outputs.data.argmax(axis=1) == targets.data).sum()
        return xp.asarray(correct, dtype=np.float64).reshape(1)

    def value(self, totals, samples) -> float:
        return float(totals[0] / max(samples, 1.0))


def _columns(outputs: Tensor, targets: Tensor, xp):
    """Outputs and targets as float64 ``(n, k)`` arrays (targets ``(n,)`` are one column)."""
    y = xp.asarray(targets.data, dtype=np.float64)
    y = y.reshape(y.shape[0], -1)
    pred = xp.asarray(outputs.data, dtype=np.float64).reshape(y.shape[0], -1)
    if pred.shape != y.shape:
        raise ValueError(f"regression outputs of shape {tuple(outputs.shape)} do not match "
                         f"targets of shape {tuple(targets.shape)}")
    return pred, y


class MeanAbsoluteError(Metric):
    """Mean over samples and output columns of ``|output - target|``."""

    def size(self, target_shape) -> int:
        return 1

    def sums(self, outputs, targets, xp):
        pred, y = _columns(outputs, targets, xp)
        return xp.abs(pred - y).mean(axis=1).sum().reshape(1)

    def value(self, totals, samples) -> float:
        return float(totals[0] / samples) if samples else math.nan


class R2Score(Metric):
    """Coefficient of determination, averaged uniformly over output columns (as scikit-learn's
    ``r2_score``): per column ``1 - SSE / SST``, from the global sums of squared errors,
    targets and squared targets (``SST = sum y^2 - (sum y)^2 / n``), never from per-rank R^2.
    A constant column scores 1 when predicted exactly, else 0."""

    def size(self, target_shape) -> int:
        return 3 * max(1, math.prod(target_shape))

    def sums(self, outputs, targets, xp):
        pred, y = _columns(outputs, targets, xp)
        return xp.concatenate([((pred - y) ** 2).sum(axis=0), y.sum(axis=0), (y * y).sum(axis=0)])

    def value(self, totals, samples) -> float:
        if not samples:
            return math.nan
        sse, sy, syy = np.split(np.asarray(totals, dtype=np.float64), 3)
        sst = syy - sy * sy / samples
        scores = [1.0 - e / t if t > 0 else (1.0 if e == 0 else 0.0) for e, t in zip(sse, sst)]
        return float(np.mean(scores))


def as_metric(value) -> Metric:
    """A :class:`Metric` as is, a function wrapped in :class:`FunctionMetric`."""
    return value if isinstance(value, Metric) else FunctionMetric(value)


def default_metrics(task: str = "classification") -> dict[str, Metric]:
    """The built-in metrics of a task: accuracy; or R^2 and MAE for regression."""
    if task == "regression":
        return {"r2": R2Score(), "mae": MeanAbsoluteError()}
    return {"accuracy": Accuracy()}


class MetricSums:
    """The layout of the Trainer's running sums: ``[loss_sum, *sums of each metric, samples]``.

    For the default ``{"accuracy": Accuracy()}`` this is ``[loss_sum, correct, samples]``.
    """

    def __init__(self, metrics: dict, target_shape: tuple[int, ...]):
        self.metrics = {str(k): as_metric(v) for k, v in metrics.items()}
        for name in self.metrics:
            if name in ("loss", "samples", "epoch", "step", "lr", "time") or \
                    name.startswith("val_"):
                raise ValueError(f"metric name {name!r} is reserved; pick another")
        self.slices = {}
        at = 1
        for name, metric in self.metrics.items():
            k = int(metric.size(tuple(target_shape)))
            self.slices[name] = slice(at, at + k)
            at += k
        self.width = at + 1  # + the sample count

    @property
    def names(self) -> list[str]:
        return list(self.metrics)

    def row(self, outputs: Tensor, targets: Tensor, loss, xp):
        """This batch's row: loss x n, every metric's sums, n."""
        n = float(targets.shape[0]) if targets.ndim else 1.0
        parts = [xp.asarray(_data(loss), dtype=np.float64).reshape(1) * n]
        for metric in self.metrics.values():
            parts.append(xp.asarray(metric.sums(outputs, targets, xp),
                                    dtype=np.float64).reshape(-1))
        parts.append(xp.asarray([n], dtype=np.float64))
        row = xp.concatenate(parts)
        if row.shape[0] != self.width:
            raise ValueError(f"the metrics gave {row.shape[0] - 2} sums, expected "
                             f"{self.width - 2} (a Metric's sums() must match its size())")
        return row

    def values(self, totals) -> dict[str, float]:
        """``{"loss": mean loss, name: value, ...}`` from globally reduced sums."""
        totals = np.asarray(backend.to_host(totals), dtype=np.float64)
        samples = float(totals[-1])
        out = {"loss": float(totals[0] / max(samples, 1.0))}
        for name, metric in self.metrics.items():
            out[name] = metric.value(totals[self.slices[name]], samples)
        return out
