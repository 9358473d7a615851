"""How an optimizer group's parameters sit in flat buffers: segments and their flat state.

A *segment* is a run of a group's parameters that are consecutive in one FlatBuffer (or a single
parameter that is not flat). Its state lives in flat arrays in the same layout as the buffer
slice, and per-parameter scalars (``step``) in small host arrays; ``views(k)`` gives parameter
``k``'s share of both, which is what ``optimizer.state[p]`` holds.
"""

from __future__ import annotations

import numpy as np

from distprop import backend
from distprop.flat import FlatBuffer, slot_of
from distprop.tensor import Tensor, get_default_dtype


def scalar_dtype():
    """dtype of ``step``-like scalar state: float32, or float64 when that is the default dtype."""
    return np.float64 if np.dtype(get_default_dtype()) == np.float64 else np.float32


class Segment:
    """Consecutive parameters of one group in one FlatBuffer (or a single non-flat parameter),
    with their state as flat arrays (``arrays``) and per-parameter scalars (``scalars``)."""

    def __init__(self, buffer: FlatBuffer | None, first: int, params: list[Tensor]):
        self.buffer = buffer
        self.first = first
        self.params = params
        sizes = [int(p.data.size) for p in params]
        self.offsets = [0]
        for n in sizes[:-1]:
            self.offsets.append(self.offsets[-1] + n)
        self.sizes = sizes
        self.numel = sum(sizes)
        self.arrays: dict[str, object] = {}
        self.scalars: dict[str, np.ndarray] = {}
        self.inited = np.zeros(len(params), dtype=bool)

    def uniform(self) -> bool:
        """True when every parameter has the same scalar state (and all or none have state)."""
        if self.inited.any() and not self.inited.all():
            return False
        return all(bool((s == s[0]).all()) for s in self.scalars.values())

    def live(self) -> bool:
        if self.buffer is None:
            return slot_of(self.params[0]) is None
        return self.buffer.valid

    def ensure(self, array_init: dict[str, float], scalar_init: dict[str, float]) -> None:
        """Allocate the flat state arrays (filled with their initial values) on first use."""
        ref = self.buffer.data if self.buffer is not None else self.params[0].data
        xp = backend.get_array_module(ref)
        for name, fill in array_init.items():
            if name not in self.arrays:
                with backend.device_context(backend.device_of(ref)):
                    self.arrays[name] = xp.full(self.numel, fill, dtype=ref.dtype)
        for name, init in scalar_init.items():
            if name not in self.scalars:
                self.scalars[name] = np.full(len(self.params), init, dtype=scalar_dtype())

    def views(self, k: int) -> tuple[dict[str, object], dict[str, np.ndarray]]:
        """Parameter ``k``'s state: array views shaped like it, and 0-d scalar views."""
        o, n, shape = self.offsets[k], self.sizes[k], self.params[k].shape
        arrays = {name: a[o : o + n].reshape(shape) for name, a in self.arrays.items()}
        scalars = {name: s[k : k + 1].reshape(()) for name, s in self.scalars.items()}
        return arrays, scalars


class Layout:
    """A group's parameters cut into segments, and where each parameter sits."""

    def __init__(self, params: list[Tensor]):
        self.params_list = params
        self.count = len(params)
        self.segments: list[Segment] = []
        self.where: dict[int, tuple[Segment, int]] = {}
        runs: dict[int, list[tuple[int, Tensor]]] = {}
        buffers: dict[int, FlatBuffer] = {}
        for p in params:
            slot = slot_of(p)
            if slot is None:
                self._add(Segment(None, 0, [p]))
            else:
                buf = slot.buffer
                buffers[id(buf)] = buf
                runs.setdefault(id(buf), []).append((slot.index, p))
        for key, members in runs.items():
            members.sort(key=lambda item: item[0])
            start = 0
            for i in range(1, len(members) + 1):
                if i == len(members) or members[i][0] != members[i - 1][0] + 1:
                    chunk = members[start:i]
                    self._add(Segment(buffers[key], chunk[0][0], [p for _, p in chunk]))
                    start = i

    def _add(self, seg: Segment) -> None:
        self.segments.append(seg)
        for k, p in enumerate(seg.params):
            self.where[id(p)] = (seg, k)

    def stale(self, params: list[Tensor]) -> bool:
        if params is not self.params_list or len(params) != self.count:
            return True
        return not all(seg.live() for seg in self.segments)
