"""Communication hooks: what DDP does with a ready gradient bucket (``register_comm_hook``).

A hook is ``hook(state, bucket) -> Future`` (or any object with ``wait()``, e.g. a communicator
request). DDP calls it once per bucket per synchronised backward, in bucket order (the same on
every rank), as soon as the bucket's gradients are final, so its communication overlaps the rest
of backward. ``wait()`` returns the averaged flat gradient of the bucket, or writes it into
``bucket.buffer()`` and returns that (or None). Every rank must issue the same collectives in the
same order, and the result must be identical on every rank (a collective's result is).

What ``bucket.buffer()`` holds when the hook runs (the same contract as PyTorch): this rank's
local gradient, **not** divided by the world size; the hook averages. As an optimisation a hook
may declare ``hook.predivide = True``: DDP then divides each gradient by the world size during
backward, in the same pass over memory that looks for non-finite values, and sets
``bucket.predivided``. The built-in :func:`allreduce_hook`, :func:`fp16_compress_hook` and
:func:`bf16_compress_hook` do (and still work undivided when called from another hook: they read
``bucket.predivided``). :func:`distprop.distributed.powersgd.powerSGD_hook` does not, so its
error-feedback memories hold the same values as PyTorch's.

Non-finite gradients: with :func:`allreduce_hook` DDP checks each rank's local gradient (a NaN
there is a NaN in the average); with any other hook it checks the averaged result, which every
rank sees alike (a 16-bit cast or a low-rank approximation can turn finite values into inf).

The names ``--compression`` accepts are :data:`distprop.registry.COMPRESSIONS`; each entry's
factory ``(comm, **options) -> (state, hook)`` is what ``DistributedDataParallel(compression=)``
registers.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from distprop import backend
from distprop.distributed import compression as _codec

__all__ = ["Future", "GradBucket", "allreduce_hook", "bf16_compress_hook", "fp16_compress_hook",
           "noop_hook"]


class GradBucket:
    """One bucket of DDP's gradients: a contiguous slice ``[start, stop)`` of a flat gradient
    buffer (PyTorch's ``dist.GradBucket``).

    Hooks use :meth:`index`, :meth:`buffer`, :meth:`gradients`, :meth:`parameters`,
    :meth:`is_last` and :meth:`set_buffer`; the other attributes belong to DDP.
    """

    __slots__ = ("flat", "start", "stop", "params", "tensors", "remaining", "request", "view",
                 "launched", "launch_ns", "position", "last", "comm", "predivided", "scratch",
                 "reducer")

    def __init__(self, flat, start: int, stop: int, params: list[int], tensors: list,
                 position: int = 0, last: bool = True, comm=None):
        self.flat, self.start, self.stop, self.params = flat, start, stop, params
        self.tensors = tensors  # in the order they become ready (reverse registration)
        self.view = flat.grad[start:stop]
        self.remaining = len(params)
        self.request = None
        self.launched = False
        self.launch_ns = 0
        self.position, self.last, self.comm = position, last, comm
        self.predivided = False
        self.scratch: dict = {}  # per-bucket buffers a hook keeps between steps (16-bit words)
        #: DDP's node-shared reducer (:mod:`distprop.distributed.shm`) when the gradients live in
        #: a node-shared window, else None: :func:`allreduce_hook` over DDP's comm uses it
        self.reducer = None

    @property
    def nbytes(self) -> int:
        return (self.stop - self.start) * self.flat.dtype.itemsize

    def index(self) -> int:
        """The bucket's position in launch order (0 is the first bucket to become ready)."""
        return self.position

    def buffer(self):
        """The bucket's flat gradient (a 1-D view into DDP's gradient buffer, no copy)."""
        return self.view

    def gradients(self) -> list:
        """The gradient of each parameter in the bucket, as views into :meth:`buffer`, in the
        order backward finishes them (reverse registration order: PyTorch's bucket order after
        its first-step rebuild; the views themselves lie in registration order in the buffer)."""
        return [p._grad_buffer for p in self.tensors]

    def parameters(self) -> list:
        """The parameters whose gradients the bucket holds, in the order of :meth:`gradients`."""
        return list(self.tensors)

    def is_last(self) -> bool:
        """True for the bucket that is launched last in each backward."""
        return self.last

    def set_buffer(self, array) -> None:
        """Replace the bucket's values by ``array`` (copied into :meth:`buffer`)."""
        self.view[...] = array.reshape(-1)

    def world_size(self) -> int:
        """The size of the communicator DDP reduces over."""
        return self.comm.size


class Future:
    """The pending result of a hook (a small ``torch.futures.Future``).

    ``wait()`` finishes the work (once) and returns the value; ``then(callback)`` returns a
    future whose value is ``callback(self)`` (the callback calls ``fut.value()``).
    """

    __slots__ = ("_fn", "_value", "_done", "done_ns")

    def __init__(self, fn: Callable[[], Any] | None = None, value: Any = None):
        self._fn, self._value, self._done = fn, value, fn is None
        self.done_ns = None

    @classmethod
    def completed(cls, value: Any) -> Future:
        """A future that already holds ``value``."""
        return cls(None, value)

    @classmethod
    def of(cls, request, value: Any = None) -> Future:
        """The future of a communicator request: its ``wait()`` result, or ``value`` when given."""
        fut = cls()
        fut._done = False

        def finish():
            result = request.wait()
            fut.done_ns = getattr(request, "done_ns", None)
            return result if value is None else value

        fut._fn = finish
        return fut

    def wait(self) -> Any:
        """Finish the work and return the value."""
        if not self._done:
            fn, self._fn = self._fn, None
            self._value = fn()
            self._done = True
        return self._value

    def value(self) -> Any:
        """The value (finishing the work first if needed)."""
        return self.wait()

    def done(self) -> bool:
        """Whether the value is there."""
        return self._done

    def then(self, callback: Callable[[Future], Any]) -> Future:
        """A future whose value is ``callback(self)``, computed when it is waited for."""
        def chained():
            self.wait()
            return callback(self)

        fut = Future(chained)
        return fut


# -- built-in hooks ------------------------------------------------------------------------------


def _comm_of(state, bucket):
    """The communicator a hook reduces over: ``state`` when it is one, else DDP's."""
    if state is not None and hasattr(state, "iallreduce"):
        return state
    return bucket.comm


def _scale_if_needed(bucket, comm) -> None:
    if not bucket.predivided and comm.size > 1:
        bucket.view *= 1.0 / comm.size


def allreduce_hook(state, bucket: GradBucket) -> Future:
    """Average the bucket with one non-blocking float32 allreduce (DDP's default).

    ``state``: None (DDP's communicator) or a communicator. Over DDP's communicator, when the
    gradients live in a node-shared window (``comm='shm'``, the CPU default), the sum is taken
    there (:class:`~distprop.distributed.shm.ShmReducer`, hierarchical across nodes).
    """
    comm = _comm_of(state, bucket)
    _scale_if_needed(bucket, comm)
    if bucket.reducer is not None and comm is bucket.comm:  # sum in node-shared memory
        return Future.of(bucket.reducer.ireduce(bucket.position), bucket.view)
    return Future.of(comm.iallreduce(bucket.view, "sum"), bucket.view)


allreduce_hook.predivide = True
#: DDP may check each rank's local gradients for inf/NaN instead of the averaged result.
allreduce_hook.nonfinite_from_inputs = True


def _compress_hook(kind: str, state, bucket: GradBucket) -> Future:
    comm = _comm_of(state, bucket)
    _scale_if_needed(bucket, comm)  # divide first (in float32): the 16-bit sum cannot overflow
    view = bucket.view
    stage = bucket.scratch.get(kind)
    if stage is None or stage.size != view.size:
        xp = backend.get_array_module(view)
        stage = bucket.scratch[kind] = xp.empty(view.size, dtype=np.uint16)
    _codec.encode(view, stage, kind)
    data = stage if kind == "bf16" else stage.view(backend.get_array_module(stage).float16)
    request = comm.iallreduce(data, "sum", bfloat16=kind == "bf16")

    def decode(fut: Future):
        _codec.decode(stage, view, kind)
        return view

    return Future.of(request).then(decode)


def fp16_compress_hook(state, bucket: GradBucket) -> Future:
    """Send the bucket as IEEE half floats (divided by the world size first), summed in float32
    per element and rounded once (see :mod:`distprop.distributed.compression`); the average is
    written back into the float32 buffer. ``state``: None or a communicator."""
    return _compress_hook("fp16", state, bucket)


def bf16_compress_hook(state, bucket: GradBucket) -> Future:
    """As :func:`fp16_compress_hook` with bfloat16 words (float32's range, 8 mantissa bits)."""
    return _compress_hook("bf16", state, bucket)


fp16_compress_hook.predivide = bf16_compress_hook.predivide = True


def noop_hook(state, bucket: GradBucket) -> Future:
    """No communication: each rank keeps its local gradient (for measuring compute alone, like
    PyTorch's ``noop_hook``; the replicas drift apart)."""
    return Future.completed(bucket.view)


# -- the COMPRESSIONS registry's factories: (comm, **options) -> (state, hook) ----------------


def no_compression(comm, **options) -> tuple[Any, Callable]:
    """``--compression none``: :func:`allreduce_hook`."""
    return None, allreduce_hook


def fp16_compression(comm, **options) -> tuple[Any, Callable]:
    """``--compression fp16``: :func:`fp16_compress_hook`."""
    return None, fp16_compress_hook


def bf16_compression(comm, **options) -> tuple[Any, Callable]:
    """``--compression bf16``: :func:`bf16_compress_hook`."""
    return None, bf16_compress_hook


def aliases(result, view) -> bool:
    """Whether array ``result`` is ``view`` itself (same memory, same size)."""
    if result is view:
        return True
    if getattr(result, "shape", None) != view.shape:
        return False
    if isinstance(result, np.ndarray) and isinstance(view, np.ndarray):
        return result.__array_interface__["data"][0] == view.__array_interface__["data"][0]
    try:
        return result.data.ptr == view.data.ptr  # CuPy
    except AttributeError:
        return False
