"""Communicators for GPU (CuPy) arrays over MPI: host-staged and CUDA-aware.

Both wrap the world communicator (:class:`~distprop.distributed.comm.MPICommunicator`, or the
single-process one) and implement the same narrow interface: NumPy arrays and small objects go
straight to the wrapped communicator; CuPy arrays take the device path of the subclass.

* :class:`HostStagedCommunicator` (``--comm mpi-host``) copies a device array into a cached
  page-locked (pinned) host buffer, runs the MPI collective on that buffer, and copies the
  result back. Works with any MPI library, and with several ranks per GPU.
* :class:`CudaAwareMPICommunicator` (``--comm mpi-cuda``) hands device pointers straight to a
  CUDA-aware MPI library through mpi4py (``__cuda_array_interface__``), after synchronising
  the current stream (MPI knows nothing of CUDA streams). 16-bit compressed buckets, whose sum
  needs a user-defined MPI operation that runs on the host, are host-staged.

:func:`mpi_cuda_support` asks the MPI library whether it is CUDA-aware (Open MPI's and MPICH's
``MPIX_Query_cuda_support``, MPICH's ``MPIX_GPU_query_support``), which ``--comm auto`` uses.
"""

from __future__ import annotations

import ctypes
import os
from collections import OrderedDict
from typing import Any

import numpy as np

from distprop import backend
from distprop.distributed.comm import (
    Communicator,
    CompletedRequest,
    Request,
    _check_mean_dtype,
    _MPIRequest,
    check_op,
)

# --- is the MPI library CUDA-aware? ----------------------------------------------------------

_MPIX_GPU_SUPPORT_CUDA = 0  # MPICH's mpi.h


def _loaded_mpi_libraries() -> list[str]:
    """Paths of the MPI shared libraries mapped into this process (Linux)."""
    try:
        with open("/proc/self/maps") as f:
            maps = f.read()
    except OSError:
        return []
    paths = {line.split()[-1] for line in maps.splitlines()
             if "/libmpi" in line and line.split()[-1].startswith("/")}
    return sorted(paths)


def mpi_cuda_support() -> tuple[bool | None, str]:
    """Whether the MPI library accepts CUDA device buffers: ``(answer, how we know)``.

    ``answer`` is None when the library cannot say. ``DISTPROP_MPI_CUDA_AWARE=0|1`` overrides
    the query. MPI gets initialised (through mpi4py) when it is not yet.
    """
    override = os.environ.get("DISTPROP_MPI_CUDA_AWARE")
    if override in ("0", "1"):
        return override == "1", "DISTPROP_MPI_CUDA_AWARE"
    try:
        from mpi4py import MPI
    except ImportError as exc:
        return None, f"mpi4py is not importable ({exc})"
    query = getattr(MPI, "Query_cuda_support", None)  # mpi4py builds that expose it
    if query is not None:
        try:
            return bool(query()), "MPI.Query_cuda_support()"
        except Exception:
            pass
    for path in _loaded_mpi_libraries():
        try:
            lib = ctypes.CDLL(path)
        except OSError:
            continue
        if hasattr(lib, "MPIX_Query_cuda_support"):
            fn = lib.MPIX_Query_cuda_support
            fn.restype, fn.argtypes = ctypes.c_int, []
            return bool(fn()), f"MPIX_Query_cuda_support() in {os.path.basename(path)}"
        if hasattr(lib, "MPIX_GPU_query_support"):
            value = ctypes.c_int(0)
            fn = lib.MPIX_GPU_query_support
            fn.restype, fn.argtypes = ctypes.c_int, [ctypes.c_int, ctypes.POINTER(ctypes.c_int)]
            if fn(_MPIX_GPU_SUPPORT_CUDA, ctypes.byref(value)) == 0:
                return bool(value.value), f"MPIX_GPU_query_support() in {os.path.basename(path)}"
    return None, "the MPI library offers no CUDA-support query"


# --- shared base -------------------------------------------------------------------------------


def is_device_array(array) -> bool:
    cp = backend.cupy_module()
    return cp is not None and isinstance(array, cp.ndarray)


class DeviceCommunicator(Communicator):
    """A communicator whose CuPy-array collectives take a device path (see subclasses); host
    arrays, objects, barriers and aborts go to the wrapped ``host`` communicator.

    Args:
        host: the world communicator to wrap (rank, size and local rank come from it).
        device: the CUDA device of this rank.
    """

    kind = "device"

    def __init__(self, host: Communicator, device: backend.Device):
        super().__init__()
        if not device.is_cuda:
            raise ValueError(f"{type(self).__name__} needs a CUDA device, got {device}")
        self.host, self.device = host, device
        self.rank, self.size = host.rank, host.size
        self.local_rank, self.local_size = host.local_rank, host.local_size

    # the stall watchdog watches the host communicator
    def _enter(self, name: str, nbytes: int = 0) -> None:
        self.host._enter(name, nbytes)

    def _exit(self) -> None:
        self.host._exit()

    def _cp(self):
        return backend.cupy_module()

    def _copy_back(self, dst, src) -> None:
        """``dst[...] = src`` (when they differ), the copy kernel on this rank's device."""
        with self._cp().cuda.Device(self.device.index):
            _copy_back(dst, src)

    # -- dispatch -------------------------------------------------------------------------------

    def barrier(self) -> None:
        self.host.barrier()

    def allreduce(self, array, op: str = "sum"):
        if not is_device_array(array):
            return self.host.allreduce(array, op)
        op = check_op(op)
        _check_mean_dtype(array, op)
        return self._device_allreduce(array, op)

    def iallreduce(self, array, op: str = "sum", bfloat16: bool = False) -> Request:
        if not is_device_array(array):
            return self.host.iallreduce(array, op, bfloat16=bfloat16)
        op = check_op(op)
        _check_mean_dtype(array, op)
        if self.size == 1:
            self.allreduce(array, op)
            return CompletedRequest(array)
        return self._device_iallreduce(array, op, bfloat16)

    def broadcast(self, array, root: int = 0):
        if not is_device_array(array):
            return self.host.broadcast(array, root)
        if not 0 <= root < self.size:
            raise ValueError(f"broadcast root {root} is not a rank of a world of size {self.size}")
        return self._device_broadcast(array, root)

    def allgather(self, array, out=None):
        if not is_device_array(array):
            return self.host.allgather(array, out)
        cp = self._cp()
        if out is None:
            out = cp.empty((self.size,) + tuple(array.shape), dtype=array.dtype)
        if out.size != array.size * self.size or out.dtype != array.dtype:
            raise ValueError(f"allgather: out must hold {self.size} x {array.size} elements of "
                             f"{array.dtype}, got {out.size} of {out.dtype}")
        return self._device_allgather(array, out)

    def reduce_scatter(self, array, op: str = "sum", out=None):
        if not is_device_array(array):
            return self.host.reduce_scatter(array, op, out)
        op = check_op(op)
        _check_mean_dtype(array, op)
        m = self._check_chunked(array, "reduce_scatter")
        if out is None:
            out = self._cp().empty(m, dtype=array.dtype)
        if out.size != m:
            raise ValueError(f"reduce_scatter: out must have {m} elements, got {out.size}")
        return self._device_reduce_scatter(array, op, out)

    def allgather_obj(self, value: Any) -> list:
        return self.host.allgather_obj(value)

    def broadcast_obj(self, value: Any, root: int = 0) -> Any:
        return self.host.broadcast_obj(value, root)

    def progress(self) -> None:
        self.host.progress()

    def abort(self, code: int = 1) -> None:
        self.host.abort(code)

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(rank={self.rank}, size={self.size}, "
                f"device={self.device}, host={type(self.host).__name__})")

    # -- the device paths (subclasses) ------------------------------------------------------------

    def _device_allreduce(self, array, op):  # pragma: no cover - interface
        raise NotImplementedError

    def _device_iallreduce(self, array, op, bfloat16):  # pragma: no cover - interface
        raise NotImplementedError

    def _device_broadcast(self, array, root):  # pragma: no cover - interface
        raise NotImplementedError

    def _device_allgather(self, array, out):  # pragma: no cover - interface
        raise NotImplementedError

    def _device_reduce_scatter(self, array, op, out):  # pragma: no cover - interface
        raise NotImplementedError


def _copy_back(dst, src) -> None:
    """dst[...] = src for device arrays of one shape (``src`` a contiguous temporary)."""
    if dst.data.ptr != src.data.ptr:
        dst[...] = src.reshape(dst.shape)


# --- host staging through pinned buffers -------------------------------------------------------


class _StagedRequest(Request):
    """A host iallreduce on a pinned buffer; completion copies the result back to the GPU."""

    def __init__(self, inner: Request, finish):
        self._inner, self._finish, self._finished = inner, finish, False
        self.array = None

    @property
    def done_ns(self):
        return getattr(self._inner, "done_ns", None)

    def test(self) -> bool:
        done = self._inner.test()
        if done:
            self._complete()
        return done

    def wait(self):
        self._inner.wait()
        self._complete()
        return self.array

    def _complete(self) -> None:
        if not self._finished:
            self._finished = True
            self.array = self._finish()


class HostStagedCommunicator(DeviceCommunicator):
    """Device collectives staged through cached pinned host buffers (``--comm mpi-host``).

    A buffer is cached per (device pointer, size, dtype), so the fixed gradient buckets of DDP
    reuse theirs every step; at most ``max_buffers`` are kept. ``ndarray.set()`` from pinned
    memory is asynchronous and does not tell CuPy's pinned-memory pool that the buffer is in use,
    so each buffer keeps the event recorded after its last host-to-device copy, and is
    overwritten (reused) or released (evicted) only after that event completed.
    """

    kind = "mpi-host"

    def __init__(self, host: Communicator, device: backend.Device, max_buffers: int = 256):
        super().__init__(host, device)
        self._buffers: OrderedDict = OrderedDict()
        self.max_buffers = int(max_buffers)

    def _pinned(self, array, tag: str = "") -> np.ndarray:
        key = (array.data.ptr, array.size, array.dtype.str, tag)
        entry = self._buffers.get(key)
        if entry is None:
            import cupyx  # ships with CuPy

            entry = self._buffers[key] = [cupyx.empty_pinned(array.size, dtype=array.dtype), None]
            while len(self._buffers) > self.max_buffers:
                _, (_, copied) = self._buffers.popitem(last=False)
                if copied is not None:  # a set() may still read the evicted buffer
                    copied.synchronize()
        else:
            self._buffers.move_to_end(key)
            if entry[1] is not None:  # about to be overwritten: its last set() must be done
                entry[1].synchronize()
                entry[1] = None
        return entry[0]

    def _copied_from(self, host: np.ndarray) -> None:
        """Keep the event of the asynchronous copy that reads ``host`` (see the class doc)."""
        cp = self._cp()
        for entry in reversed(self._buffers.values()):
            if entry[0] is host:
                entry[1] = cp.cuda.Event(disable_timing=True)
                entry[1].record(cp.cuda.get_current_stream())
                return

    def _to_host(self, array, tag: str = "") -> np.ndarray:
        """A pinned host copy of ``array`` (1-D); waits for the copy (and for the kernels before
        it on the current stream, which produced the data)."""
        cp = self._cp()
        host = self._pinned(array, tag)
        with cp.cuda.Device(self.device.index):
            cp.ascontiguousarray(array).reshape(-1).get(out=host)
        return host

    def _to_device(self, array, host: np.ndarray) -> None:
        cp = self._cp()
        with cp.cuda.Device(self.device.index):
            if array.flags.c_contiguous:
                array.reshape(-1).set(host)  # asynchronous: reads host after we return
                self._copied_from(host)
            else:
                array[...] = cp.asarray(host).reshape(array.shape)

    def _device_allreduce(self, array, op):
        host = self._to_host(array)
        self.host.allreduce(host, op)
        self._to_device(array, host)
        return array

    def _device_iallreduce(self, array, op, bfloat16):
        host = self._to_host(array)
        inner = self.host.iallreduce(host, op, bfloat16=bfloat16)

        def finish():
            self._to_device(array, host)
            return array

        return _StagedRequest(inner, finish)

    def _device_broadcast(self, array, root):
        host = self._to_host(array)
        self.host.broadcast(host, root)
        self._to_device(array, host)
        return array

    def _device_allgather(self, array, out):
        send = self._to_host(array)
        recv = self._pinned(out, "recv")
        self.host.allgather(send, recv)
        self._to_device(out, recv)
        return out

    def _device_reduce_scatter(self, array, op, out):
        send = self._to_host(array)
        recv = self._pinned(out, "recv")
        self.host.reduce_scatter(send, op, recv)
        self._to_device(out, recv)
        return out


# --- CUDA-aware MPI ------------------------------------------------------------------------------


class CudaAwareMPICommunicator(DeviceCommunicator):
    """Device buffers handed straight to a CUDA-aware MPI library (``--comm mpi-cuda``).

    Needs an :class:`~distprop.distributed.comm.MPICommunicator` underneath. Before each call the
    current CUDA stream is synchronised, so the kernels that produced the data have finished.
    """

    kind = "mpi-cuda"

    def __init__(self, host: Communicator, device: backend.Device):
        super().__init__(host, device)
        if not hasattr(host, "comm") or not hasattr(host, "MPI"):
            raise TypeError(f"CudaAwareMPICommunicator needs an MPI communicator underneath, "
                            f"got {type(host).__name__}")
        self._staged = HostStagedCommunicator(host, device)
        self._ops = {"sum": host.MPI.SUM, "mean": host.MPI.SUM, "max": host.MPI.MAX,
                     "min": host.MPI.MIN}

    def _ready(self, array):
        """``array`` (or a contiguous copy) after the current stream has finished writing it."""
        cp = self._cp()
        with cp.cuda.Device(self.device.index):
            work = array if array.flags.c_contiguous else cp.ascontiguousarray(array)
            cp.cuda.get_current_stream().synchronize()
        return work

    def _scale_mean(self, array, op) -> None:
        if op == "mean":
            with self._cp().cuda.Device(self.device.index):
                array *= 1.0 / self.size

    def _device_allreduce(self, array, op):
        if array.dtype == np.float16:  # the half-float sum is a host-side MPI operation
            return self._staged._device_allreduce(array, op)
        work = self._ready(array)
        self.host._blocking("allreduce", work.nbytes, self.host.comm.Allreduce,
                            self.host.MPI.IN_PLACE, work, self._ops[op])
        self._copy_back(array, work)
        self._scale_mean(array, op)
        return array

    def _device_iallreduce(self, array, op, bfloat16):
        if bfloat16 or array.dtype == np.float16:
            return self._staged._device_iallreduce(array, op, bfloat16)
        host = self.host
        work = self._ready(array)
        with host._lock:
            mpi_req = host.comm.Iallreduce(host.MPI.IN_PLACE, work, self._ops[op])

        def finish():
            self._copy_back(array, work)
            self._scale_mean(array, op)

        req = _MPIRequest(host, mpi_req, array, finish, "iallreduce", work.nbytes)
        host._progress.add(req)
        return req

    def _device_broadcast(self, array, root):
        work = self._ready(array)
        self.host._blocking("broadcast", work.nbytes, self.host.comm.Bcast, work, root)
        self._copy_back(array, work)
        return array

    def _device_allgather(self, array, out):
        work = self._ready(array)
        with self._cp().cuda.Device(self.device.index):
            recv = out if out.flags.c_contiguous else self._cp().empty(out.shape, out.dtype)
            self.host._blocking("allgather", work.nbytes * self.size, self.host.comm.Allgather,
                                work, recv)
            _copy_back(out, recv)
        return out

    def _device_reduce_scatter(self, array, op, out):
        if array.dtype == np.float16:
            return self._staged._device_reduce_scatter(array, op, out)
        work = self._ready(array)
        with self._cp().cuda.Device(self.device.index):
            recv = out if out.flags.c_contiguous else self._cp().empty(out.shape, out.dtype)
            self.host._blocking("reduce_scatter", work.nbytes,
                                self.host.comm.Reduce_scatter_block, work.reshape(-1),
                                recv.reshape(-1), self._ops[op])
            _copy_back(out, recv)
        self._scale_mean(out, op)
        return out
