"""Placement helpers: moving flat-buffered models between devices, and staging batches.

Two jobs that sit between :mod:`distprop.backend` (which knows how to copy one array) and the
rest of the library:

* :func:`flat_members` / :func:`reflatten` keep a flattened model flat across ``Module.to()``:
  parameters that lived as views of a :class:`~distprop.flat.FlatBuffer` are re-homed into
  a new buffer on their new device/dtype (gradients included), so the optimizer, DDP and
  clipping keep working on whole buffers. The optimizer notices the old buffer is invalid and
  moves its state next to the new one.
* :class:`BatchStager` moves host batches to a GPU once per step: the batch is copied into a
  page-locked (pinned) host buffer and from there to the device with an asynchronous copy on a
  dedicated stream, so the transfer overlaps the compute of the previous step. On the CPU it is
  never used and batches stay as they are.

CuPy is reached only through :func:`distprop.backend.cupy_module`.
"""

from __future__ import annotations

import threading
from collections import deque

import numpy as np

from distprop import backend
from distprop.flat import flatten, slot_of

# --- keeping flat models flat across Module.to() ---------------------------------------------


def flat_members(module) -> list[tuple[object, list]]:
    """Each live FlatBuffer holding some of ``module``'s parameters, with ``(index, parameter)``
    pairs in buffer order (taken before a move; :func:`reflatten` uses it after)."""
    found: dict[int, tuple[object, list]] = {}
    for p in module.parameters():
        slot = slot_of(p)
        if slot is None:
            continue
        found.setdefault(id(slot.buffer), (slot.buffer, []))[1].append((slot.index, p))
    return [(buf, sorted(members, key=lambda m: m[0])) for buf, members in found.values()]


def reflatten(members: list[tuple[object, list]]) -> list:
    """Re-home, into new flat buffers, the parameters that left their buffer during a move.

    ``members`` comes from :func:`flat_members` before the move. A parameter whose ``.data`` is
    still its buffer view did not move (same device and dtype) and stays where it is. Returns
    the new buffers (the parameters keep them alive).
    """
    new = []
    for buf, indexed in members:
        moved = [p for i, p in indexed if p.data is not buf.views[i]]
        if moved:
            new.extend(flatten(moved))
    return new


# --- host -> device batch staging -------------------------------------------------------------


class BatchStager:
    """Copies host arrays to one CUDA device through pinned buffers on a copy stream.

    ``stage(array)`` returns a device array whose copy has been *issued* on the stager's stream,
    and an event; ``ready(event, sync_host)`` then orders it before later work: with
    ``sync_host=True`` the calling thread waits for the copies (a prefetch thread does this, so
    the consumer never waits), else the caller's current stream waits on the event.

    Pinned buffers are reused round-robin (``depth`` per shape and dtype); a buffer is reused
    only after the copy that last read it has finished.

    Stream ordering: the device array comes from the memory pool of the caller's current stream,
    whose queued kernels may still read memory freed into that pool; the copy stream therefore
    waits on an event recorded on the current stream before it writes, and the consumer waits on
    the copy's event (:meth:`ready`) before it reads.
    """

    def __init__(self, dev: backend.Device, depth: int = 3):
        cp = backend.cupy_module()
        if cp is None or not dev.is_cuda:
            raise RuntimeError(f"BatchStager needs CuPy and a CUDA device, got {dev}")
        self.cp, self.device, self.depth = cp, dev, int(depth)
        with cp.cuda.Device(dev.index):
            self.stream = cp.cuda.Stream(non_blocking=True)
        self._pinned: dict[tuple, deque] = {}
        self._lock = threading.Lock()

    def _buffer(self, shape, dtype):
        """A pinned host array of ``shape``/``dtype`` that no copy in flight still reads."""
        key = (tuple(shape), np.dtype(dtype).str)
        ring = self._pinned.get(key)
        if ring is None:
            ring = self._pinned[key] = deque()
        if len(ring) < self.depth:
            import cupyx  # ships with CuPy

            ring.appendleft((cupyx.empty_pinned(shape, dtype=dtype), None))  # use it next
        host, event = ring.popleft()
        if event is not None:
            event.synchronize()
        return ring, host

    def stage(self, array: np.ndarray):
        """Issue the host-to-device copy of ``array``.

        Returns ``(device array, event)``; the array is safe to use once the event completed
        (see :meth:`ready`).
        """
        cp = self.cp
        array = np.ascontiguousarray(array)
        with self._lock, cp.cuda.Device(self.device.index):
            ring, host = self._buffer(array.shape, array.dtype)
            np.copyto(host, array)
            out = cp.empty(array.shape, dtype=array.dtype)  # current stream's pool
            allocated = cp.cuda.Event(disable_timing=True)
            allocated.record(cp.cuda.get_current_stream())
            self.stream.wait_event(allocated)  # queued compute done with that memory first
            out.set(host, stream=self.stream)
            event = cp.cuda.Event(disable_timing=True)
            event.record(self.stream)
            ring.append((host, event))
        return out, event

    def ready(self, event, sync_host: bool) -> None:
        """Order the copies up to ``event`` before later work: the calling thread waits for
        them (``sync_host``, e.g. a prefetch thread), else its current stream does."""
        if sync_host:
            event.synchronize()
        else:
            with self.cp.cuda.Device(self.device.index):
                self.cp.cuda.get_current_stream().wait_event(event)


_stagers: dict[int, BatchStager] = {}
_stagers_lock = threading.Lock()


def stager_for(dev: backend.Device) -> BatchStager:
    """The process-wide stager of one device (created on first use)."""
    with _stagers_lock:
        stager = _stagers.get(dev.index)
        if stager is None:
            stager = _stagers[dev.index] = BatchStager(dev)
    return stager


def batch_to_device(batch, dev: backend.Device, sync_host: bool):
    """Copy the NumPy arrays of ``batch`` (nested tuples/lists/dicts) to ``dev`` via pinned
    staging; returns the same structure of device arrays, ready to use in this thread
    (``sync_host=False``) or in any thread (``sync_host=True``)."""
    stager = stager_for(dev)
    events = []

    def walk(item):
        if isinstance(item, tuple | list):
            return type(item)(walk(b) for b in item)
        if isinstance(item, dict):
            return {k: walk(v) for k, v in item.items()}
        if isinstance(item, np.ndarray):
            out, event = stager.stage(item)
            events.append(event)
            return out
        return backend.to_device(item, dev)

    out = walk(batch)
    if events:
        stager.ready(events[-1], sync_host)  # copies on one stream finish in order
    return out
