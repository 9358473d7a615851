"""Reusable scratch arrays for the NumPy convolution: no page faults on every step.

With glibc's default settings, allocations above its mmap threshold (at most 32 MiB) get fresh
``mmap`` pages, so a 50 MB column matrix allocated each step costs its size in page faults
(measured: a 52 MB ``empty`` + copy takes 11 ms, the copy into a kept buffer 4 ms).
:mod:`distprop.heap` raises that threshold when distprop is imported; the pool still serves
processes that keep glibc's defaults (``DISTPROP_MALLOC=system``), other C libraries, and
buffers above the raised threshold. :func:`scratch` hands out a
kept array of the asked shape instead, but only one that nothing else still references: the
pool's own references are the only ones left exactly when no view of it (a saved column matrix,
a gradient still in the autograd graph, a user's ``.grad``) is alive, since every NumPy view
holds a reference to the array that owns its memory. So a buffer is never handed out twice while
in use; a busy buffer just means a fresh allocation.

Only large NumPy arrays are pooled (smaller ones come back from the heap cheaply); CuPy has its
own memory pool. The pool keeps at most :data:`MAX_BYTES` and drops the least recently used
shapes first.
"""

from __future__ import annotations

import sys
import threading
from collections import OrderedDict

import numpy as np

MIN_BYTES = 8 << 20  # below this even glibc's default heap mostly reuses freed memory
MAX_BYTES = 128 << 20  # total bytes the pool keeps (peak RSS stays close to before)
MAX_PER_KEY = 3  # buffers kept per (shape, dtype)

_lock = threading.Lock()
_pool: OrderedDict = OrderedDict()  # (shape, dtype) -> list of arrays, most recently used last
_held = [0]  # bytes kept by the pool


def _free_refcount() -> int:
    """``sys.getrefcount`` of a list member nothing else references, read the way
    :func:`scratch` reads it (the count differs between Python versions)."""
    probe = [np.empty(1)]
    for buf in probe:
        return sys.getrefcount(buf)
    raise AssertionError("unreachable")


_FREE = _free_refcount()


def scratch(xp, shape, dtype):
    """An uninitialised array of ``shape``/``dtype``: a kept one no one else holds, or new."""
    shape = tuple(int(s) for s in shape)
    dtype = np.dtype(dtype)
    nbytes = dtype.itemsize
    for s in shape:
        nbytes *= s
    if xp is not np or not MIN_BYTES <= nbytes <= MAX_BYTES:  # an oversized one: not kept
        return xp.empty(shape, dtype=dtype)
    key = (shape, dtype.str)
    with _lock:
        bufs = _pool.get(key)
        if bufs is not None:
            _pool.move_to_end(key)
            for buf in bufs:
                if sys.getrefcount(buf) <= _FREE:
                    return buf
        out = np.empty(shape, dtype=dtype)
        if bufs is not None and len(bufs) >= MAX_PER_KEY:
            return out
        _evict(MAX_BYTES - nbytes)
        if _held[0] + nbytes <= MAX_BYTES:
            _pool.setdefault(key, []).append(out)
            _held[0] += nbytes
        return out


def _evict(limit: int) -> None:
    """Drop least recently used shapes until the pool keeps at most ``limit`` bytes."""
    while _held[0] > limit and _pool:
        key, bufs = _pool.popitem(last=False)
        _held[0] -= sum(b.nbytes for b in bufs)


def clear() -> None:
    """Forget every kept buffer (arrays still in use stay valid: they are ordinary arrays)."""
    with _lock:
        _pool.clear()
        _held[0] = 0


def held_bytes() -> int:
    """Bytes the pool keeps now."""
    return _held[0]
