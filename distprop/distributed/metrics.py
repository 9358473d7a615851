"""Metrics across ranks: accumulate (sum, count) pairs locally, reduce once per log interval."""

from __future__ import annotations

import math
from collections.abc import Iterable

import numpy as np

from distprop import backend
from distprop.distributed import world
from distprop.distributed.comm import Communicator
from distprop.tensor import Tensor


def _host_float(value) -> float:
    if isinstance(value, Tensor):
        value = value.data
    return float(backend.to_host(value)) if not isinstance(value, (int, float)) else float(value)


class MetricsReducer:
    """Running sums and counts of named metrics, reduced over ranks in one allreduce.

    ``add('loss', loss_sum, n)`` adds a *sum* and the number of items it covers (pass
    ``loss.item() * batch`` for a mean loss, or the number of correct predictions and the batch
    size for accuracy). Values may be Python numbers, 0-d arrays or Tensors; device values are
    kept on the device until :meth:`reduce`, so ``add`` never synchronises with a GPU.

    :meth:`reduce` sums every (sum, count) pair over all ranks with one allreduce of a float64
    vector, returns ``{name: sum / count}`` (NaN where count is 0), stores the totals in
    ``totals`` and starts a new interval. Every rank must call it at the same points and use the
    same metric names: given up front, or checked with one small allgather on the first
    :meth:`reduce`, after which they are fixed (a new name raises ``KeyError``).

    Args:
        names: the metric names, in a fixed order (optional).
        comm: the communicator (default: ``distprop.distributed.init()``).
    """

    def __init__(self, names: Iterable[str] | None = None, comm: Communicator | None = None):
        if comm is None:
            comm = world.init()
        self.comm = comm
        self._fixed = names is not None
        self._names: list[str] = list(names) if names is not None else []
        self._agreed = self._fixed or comm.size == 1  # names known equal on every rank
        self._sums: dict[str, object] = {}
        self._counts: dict[str, float] = {}
        self.totals: dict[str, tuple[float, float]] = {}

    @property
    def names(self) -> list[str]:
        return list(self._names)

    def add(self, name: str, value, count: float = 1) -> None:
        """Add ``value`` (a sum over ``count`` items) to metric ``name``."""
        if name not in self._sums:
            if name not in self._names:
                if self._fixed:
                    raise KeyError(
                        f"unknown metric {name!r}: this MetricsReducer's names are "
                        f"{self._names} (given up front, or fixed by the first reduce())"
                    )
                self._names.append(name)
            self._sums[name] = 0.0
            self._counts[name] = 0.0
        if isinstance(value, Tensor):
            value = value.data
        self._sums[name] = self._sums[name] + value
        self._counts[name] += float(count)

    def update(self, count: float = 1, **values) -> None:
        """``add`` several metrics that share one count: ``update(n, loss=s, correct=c)``."""
        for name, value in values.items():
            self.add(name, value, count)

    def reduce(self) -> dict[str, float]:
        """Sum over ranks (one allreduce), return means, and reset the interval."""
        if not self._agreed:
            names = self.comm.allgather_obj(self._names)
            if any(n != names[0] for n in names):
                raise RuntimeError(
                    "MetricsReducer: ranks used different metric names: "
                    + "; ".join(f"rank {r}: {n}" for r, n in enumerate(names))
                    + ". Pass names=[...] up front so every rank reduces the same vector."
                )
            self._agreed = self._fixed = True
        k = len(self._names)
        vec = np.zeros(2 * k, dtype=np.float64)
        for i, name in enumerate(self._names):
            if name in self._sums:
                vec[i] = _host_float(self._sums[name])
                vec[k + i] = self._counts[name]
        if self.comm.size > 1 and k:
            self.comm.allreduce(vec, "sum")
        self.totals = {name: (float(vec[i]), float(vec[k + i]))
                       for i, name in enumerate(self._names)}
        self._sums.clear()
        self._counts.clear()
        return {name: (s / c if c else math.nan) for name, (s, c) in self.totals.items()}
