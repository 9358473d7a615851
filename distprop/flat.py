"""Flat parameter and gradient storage.

:func:`flatten` re-homes parameters as views into one contiguous buffer per (dtype, device) and
gives each a gradient view into a matching flat gradient buffer, which backward accumulates into
in place. The optimizer step, the DDP allreduce, clipping and checkpoints then work on whole
buffers (or contiguous slices of them) instead of looping over parameters.

The parameter objects stay the same; only their ``.data`` becomes a view. Order is the order the
parameters were given (a module's registration order), so every process that builds the same
model gets the same layout.
"""

from __future__ import annotations

import functools
import weakref
from collections.abc import Iterable

import numpy as np

from distprop import backend
from distprop.tensor import Tensor


class Slot:
    """Where one parameter lives in its FlatBuffer: ``buffer.data[offset:offset + numel]``.

    A live parameter keeps its buffer alive through its slot; the buffer refers to its
    parameters weakly, so a model that is dropped frees its buffers.
    """

    __slots__ = ("buffer", "index", "offset", "numel", "shape")

    def __init__(self, buffer: FlatBuffer, index: int, offset: int, numel: int, shape):
        self.buffer = buffer
        self.index, self.offset, self.numel, self.shape = index, offset, numel, tuple(shape)

    def __repr__(self) -> str:
        return (f"Slot(index={self.index}, offset={self.offset}, numel={self.numel}, "
                f"shape={self.shape})")


class FlatBuffer:
    """Parameters of one dtype and device as views into one contiguous array.

    Attributes:
        params: the parameters, in layout order.
        offsets: start of each parameter in the buffer (``offsets[i] + sizes[i] = offsets[i+1]``).
        sizes: number of elements of each parameter.
        data: the flat parameter array (1-D).
        grad: the flat gradient array (1-D); each parameter's gradient is a view into it.
        views: each parameter's ``.data`` view (a parameter whose ``.data`` was since replaced,
            e.g. by ``Module.to()``, no longer counts as living in the buffer).
        grad_views: each parameter's gradient view into ``grad``.
        valid: False once another :func:`flatten` has re-homed any of these parameters.
    """

    def __init__(self, params: list[Tensor], storage: tuple | None = None):
        """``storage``: optional ``(data, grad)`` 1-D arrays (e.g. slices of another buffer) to
        use instead of allocating; the parameters' values are copied into ``data``."""
        if not params:
            raise ValueError("FlatBuffer needs at least one parameter")
        dtype = params[0].dtype
        dev = params[0].device
        for p in params:
            if p.dtype != dtype or p.device != dev:
                raise ValueError(
                    f"FlatBuffer parameters must share dtype and device: got {p.dtype} on "
                    f"{p.device} next to {dtype} on {dev}"
                )
        self._params = [weakref.ref(p) for p in params]
        self.sizes = [int(p.data.size) for p in params]
        self.offsets = [int(o) for o in np.cumsum([0] + self.sizes[:-1])]
        self.numel = int(sum(self.sizes))
        self.dtype = np.dtype(dtype)
        self.device = dev
        self.valid = True
        self.views = []
        self.grad_views = []
        xp = backend.xp_for(dev)
        if storage is not None:
            self.data, self.grad = storage
            for name, a in (("data", self.data), ("grad", self.grad)):
                if a.shape != (self.numel,) or a.dtype != self.dtype:
                    raise ValueError(f"FlatBuffer storage {name} must be a 1-D {self.dtype} "
                                     f"array of {self.numel} elements, got {a.dtype} {a.shape}")
        else:
            with backend.device_context(dev):
                self.data = xp.empty(self.numel, dtype=dtype)
                self.grad = xp.zeros(self.numel, dtype=dtype)
        for i, p in enumerate(params):
            start, n, shape = self.offsets[i], self.sizes[i], p.shape
            self.data[start : start + n] = p.data.reshape(-1)
            old_grad = p.grad
            old = _SLOTS.get(id(p))
            if old is not None and old[0]() is p and old[1].buffer is not self:
                old[1].buffer.valid = False
            p.data = self.data[start : start + n].reshape(shape)
            p._grad_buffer = self.grad[start : start + n].reshape(shape)
            self.views.append(p.data)
            self.grad_views.append(p._grad_buffer)
            if old_grad is not None:
                p._grad_buffer[...] = old_grad.data
                p.grad = Tensor._wrap(p._grad_buffer)
            ref = weakref.ref(p, functools.partial(_forget, id(p)))
            _SLOTS[id(p)] = (ref, Slot(self, i, start, n, shape))

    @property
    def params(self) -> list[Tensor]:
        """The parameters, in layout order."""
        return [ref() for ref in self._params]

    def __len__(self) -> int:
        return len(self._params)

    def __repr__(self) -> str:
        return (f"FlatBuffer({len(self._params)} params, {self.numel} elements, {self.dtype}, "
                f"{self.device})")

    def in_place(self, index: int) -> bool:
        """True while parameter ``index`` still lives in this (valid) buffer."""
        p = self._params[index]()
        return self.valid and p is not None and p.data is self.views[index]

    def grad_in_place(self, index: int) -> bool:
        """True when parameter ``index`` lives here and its ``.grad`` is its flat-buffer view."""
        p = self._params[index]()
        return (self.valid and p is not None and p.data is self.views[index]
                and p.grad is not None
                and p.grad.data is self.grad_views[index])

    def grads_present(self, start: int = 0, stop: int | None = None) -> bool:
        """True when every parameter in [start, stop) has its gradient in the flat buffer."""
        stop = len(self._params) if stop is None else stop
        return all(self.grad_in_place(i) for i in range(start, stop))

    def span(self, start: int = 0, stop: int | None = None) -> tuple[int, int]:
        """Element range ``(a, b)`` of parameters [start, stop) in ``data``/``grad``."""
        stop = len(self._params) if stop is None else stop
        if not 0 <= start < stop <= len(self._params):
            raise IndexError(
                f"parameter range [{start}, {stop}) is outside 0..{len(self._params)}"
            )
        return int(self.offsets[start]), int(self.offsets[stop - 1] + self.sizes[stop - 1])

    def materialize_grads(self) -> None:
        """Point every parameter's ``.grad`` at its view (zeros where it had none)."""
        for p, data_view, view in zip(self.params, self.views, self.grad_views):
            if p is None or p.data is not data_view:
                continue  # gone, or moved out of the buffer (e.g. by Module.to())
            if p.grad is None or p.grad.data is not view:
                if p.grad is None:
                    view[...] = 0
                else:
                    view[...] = p.grad.data
                p.grad = Tensor._wrap(view)

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Zero the flat gradient; with ``set_to_none`` the ``.grad`` attributes become None."""
        self.grad[...] = 0
        for p, data_view, view in zip(self.params, self.views, self.grad_views):
            if p is not None and p.data is data_view:
                p.grad = None if set_to_none else Tensor._wrap(view)


# id(param) -> (weakref to the parameter, its Slot); an entry goes when its parameter does.
_SLOTS: dict[int, tuple[weakref.ref, Slot]] = {}


def _forget(key: int, ref: weakref.ref) -> None:
    entry = _SLOTS.get(key)
    if entry is not None and entry[0] is ref:
        del _SLOTS[key]


def slot_of(param: Tensor) -> Slot | None:
    """The parameter's place in a live FlatBuffer, or None when it is not flat."""
    entry = _SLOTS.get(id(param))
    if entry is None or entry[0]() is not param:
        return None
    slot = entry[1]
    if not slot.buffer.valid or param.data is not slot.buffer.views[slot.index]:
        return None
    return slot


def contiguous_range(params: list[Tensor]) -> tuple[FlatBuffer, int, int] | None:
    """If ``params`` are consecutive parameters of one live FlatBuffer, return
    ``(buffer, first_index, last_index + 1)``; else None."""
    if not params:
        return None
    first = slot_of(params[0])
    if first is None:
        return None
    buf = first.buffer
    for k, p in enumerate(params):
        s = slot_of(p)
        if s is None or s.buffer is not buf or s.index != first.index + k:
            return None
    return buf, first.index, first.index + len(params)


def flatten(params: Iterable[Tensor]) -> list[FlatBuffer]:
    """Re-home parameters into flat buffers, one per (dtype, device), keeping their order.

    Parameters that already form consecutive runs of live buffers with this exact grouping are
    left where they are, so calling this twice (optimizer, then DDP) costs nothing.
    """
    params = list(params)
    seen: set[int] = set()
    unique = []
    for p in params:
        if id(p) not in seen:
            seen.add(id(p))
            unique.append(p)
    groups: dict[tuple, list[Tensor]] = {}
    for p in unique:
        groups.setdefault((str(p.dtype), str(p.device)), []).append(p)
    buffers = []
    for group in groups.values():
        existing = contiguous_range(group)
        if existing is not None and existing[1] == 0 and existing[2] == len(existing[0]):
            buffers.append(existing[0])
        else:
            buffers.append(FlatBuffer(group))
    return buffers
