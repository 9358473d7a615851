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

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

from distprop import backend
from distprop.tensor import Tensor


@dataclass(frozen=True)
class Slot:
    """Where one parameter lives in its FlatBuffer: ``buffer.data[offset:offset + numel]``."""

    buffer: FlatBuffer
    index: int
    offset: int
    numel: int
    shape: tuple[int, ...]


class FlatBuffer:
    """Parameters of one dtype and device as views into one contiguous array.

    Attributes:
        params: the parameters, in layout order.
        offsets: start of each parameter in the buffer (``offsets[i] + sizes[i] = offsets[i+1]``).
        sizes: number of elements of each parameter.
        data: the flat parameter array (1-D).
        grad: the flat gradient array (1-D); each parameter's gradient is a view into it.
    """

    def __init__(self, params: list[Tensor]):
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
        self.params = list(params)
        self.sizes = [int(p.data.size) for p in params]
        self.offsets = list(np.cumsum([0] + self.sizes[:-1]).astype(int))
        self.numel = int(sum(self.sizes))
        self.dtype = np.dtype(dtype)
        self.device = dev
        self.valid = True
        xp = backend.xp_for(dev)
        with backend.device_context(dev):
            self.data = xp.empty(self.numel, dtype=dtype)
            self.grad = xp.zeros(self.numel, dtype=dtype)
        for i, p in enumerate(params):
            start, n, shape = self.offsets[i], self.sizes[i], p.shape
            self.data[start : start + n] = p.data.reshape(-1)
            old_grad = p.grad
            old_slot = _SLOTS.get(id(p))
            if old_slot is not None and old_slot.buffer is not self:
                old_slot.buffer.valid = False
            p.data = self.data[start : start + n].reshape(shape)
            p._grad_buffer = self.grad[start : start + n].reshape(shape)
            if old_grad is not None:
                p._grad_buffer[...] = old_grad.data
                p.grad = Tensor._wrap(p._grad_buffer)
            _SLOTS[id(p)] = Slot(self, i, start, n, shape)

    def __len__(self) -> int:
        return len(self.params)

    def __repr__(self) -> str:
        return (f"FlatBuffer({len(self.params)} params, {self.numel} elements, {self.dtype}, "
                f"{self.device})")

    def grads_present(self, start: int = 0, stop: int | None = None) -> bool:
        """True when every parameter in [start, stop) has its gradient in the flat buffer."""
        stop = len(self.params) if stop is None else stop
        for p in self.params[start:stop]:
            if p.grad is None or p.grad.data is not p._grad_buffer:
                return False
        return True

    def materialize_grads(self) -> None:
        """Point every parameter's ``.grad`` at its view (zeros where it had none)."""
        for p in self.params:
            if p.grad is None or p.grad.data is not p._grad_buffer:
                if p.grad is None:
                    p._grad_buffer[...] = 0
                else:
                    p._grad_buffer[...] = p.grad.data
                p.grad = Tensor._wrap(p._grad_buffer)

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Zero the flat gradient; with ``set_to_none`` the ``.grad`` attributes become None."""
        self.grad[...] = 0
        for p in self.params:
            p.grad = None if set_to_none else Tensor._wrap(p._grad_buffer)


# id(param) -> Slot. Parameters are long-lived; a stale entry only costs a lookup miss.
_SLOTS: dict[int, Slot] = {}


def slot_of(param: Tensor) -> Slot | None:
    """The parameter's place in a live FlatBuffer, or None when it is not flat."""
    slot = _SLOTS.get(id(param))
    if slot is None or not slot.buffer.valid:
        return None
    buf = slot.buffer
    if slot.index >= len(buf.params) or buf.params[slot.index] is not param:
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
        if existing is not None and existing[1] == 0 and existing[2] == len(existing[0].params):
            buffers.append(existing[0])
        else:
            buffers.append(FlatBuffer(group))
    return buffers
