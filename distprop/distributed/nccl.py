"""NCCL collectives for GPU arrays through ``cupy.cuda.nccl`` (``--comm nccl``).

:class:`NCCLCommunicator` wraps the world MPI communicator: rank 0 creates the NCCL unique id,
MPI broadcasts it, and every rank joins one NCCL communicator on its own GPU. CuPy arrays then
go through NCCL; NumPy arrays and small objects still go through MPI.

Ordering: every NCCL call runs on one dedicated stream of the communicator. Before a call, an
event recorded on the caller's current stream (where the backward kernels that produced the
data were queued) is made a dependency of the NCCL stream, so a gradient bucket is reduced only
after the kernels that wrote it, without blocking the host. After the call, another event marks
completion: :meth:`NCCLCommunicator.iallreduce` returns a request whose ``wait()`` synchronises
that event (and makes the current stream wait on it), blocking collectives wait for it before
returning.

16-bit buckets: ``float16`` arrays reduce as NCCL half floats, bfloat16 bit patterns (``uint16``
arrays with ``bfloat16=True``) as NCCL bfloat16 when the library has it (NCCL >= 2.10), else
through the host-staged path. NCCL refuses two ranks on one GPU; the communicator selection
(:mod:`distprop.distributed.selection`) detects that beforehand and falls back to host staging.
"""

from __future__ import annotations

import numpy as np

from distprop import backend
from distprop.distributed.comm import Communicator, Request
from distprop.distributed.gpucomm import DeviceCommunicator, HostStagedCommunicator

# ncclDataType_t / ncclRedOp_t values (nccl.h; cupy_backends/cuda/libs/nccl.pxd)
_NCCL_TYPES = {
    np.dtype(np.int8): 0, np.dtype(np.uint8): 1, np.dtype(np.int32): 2, np.dtype(np.uint32): 3,
    np.dtype(np.int64): 4, np.dtype(np.uint64): 5, np.dtype(np.float16): 6,
    np.dtype(np.float32): 7, np.dtype(np.float64): 8,
}
_NCCL_BFLOAT16 = 9
_NCCL_OPS = {"sum": 0, "mean": 0, "max": 2, "min": 3}
_BF16_MIN_VERSION = 21000  # NCCL 2.10.0


def nccl_module():
    """``cupy.cuda.nccl`` when CuPy was built with NCCL and the library loads, else None."""
    if backend.cupy_module() is None:
        return None
    try:
        from cupy.cuda import nccl
    except Exception:
        return None
    return nccl if getattr(nccl, "available", False) else None


def nccl_status() -> tuple[bool, str]:
    """``(available, description)``: the NCCL version, or why NCCL cannot be used."""
    if backend.cupy_module() is None:
        return False, f"CuPy is missing ({backend._cupy_error})"
    nccl = nccl_module()
    if nccl is None:
        return False, "CuPy cannot load NCCL (install NCCL, e.g. pip install nvidia-nccl-cu12)"
    try:
        return True, f"NCCL {format_version(int(nccl.get_version()))}"
    except Exception as exc:
        return False, f"NCCL does not answer ({exc})"


def format_version(code: int) -> str:
    """NCCL's integer version code as ``major.minor.patch``."""
    if code >= 10000:  # 2.9+: major * 10000 + minor * 100 + patch
        return f"{code // 10000}.{code % 10000 // 100}.{code % 100}"
    return f"{code // 1000}.{code % 1000 // 100}.{code % 100}"


class _NCCLRequest(Request):
    """An NCCL collective queued on the communicator's stream; ``wait()`` synchronises its
    completion event and runs what must follow (copy back from a temporary, mean scaling)."""

    def __init__(self, comm: NCCLCommunicator, done, array, finish, keep, nbytes: int):
        self._comm, self._done_event, self.array = comm, done, array
        self._finish, self._keep, self._nbytes = finish, keep, nbytes
        self._finished = False
        self.done_ns = None

    def test(self) -> bool:
        if self._finished:
            return True
        if self._done_event.done:
            self._complete()
            return True
        return False

    def wait(self):
        if not self._finished:
            self._comm._enter("iallreduce", self._nbytes)
            try:
                self._done_event.synchronize()
            finally:
                self._comm._exit()
            self._complete()
        return self.array

    def _complete(self) -> None:
        if self._finished:
            return
        self._finished = True
        cp = backend.cupy_module()
        import time

        self.done_ns = time.perf_counter_ns()
        with cp.cuda.Device(self._comm.device.index):
            cp.cuda.get_current_stream().wait_event(self._done_event)
            if self._finish is not None:
                self._finish()
        self._keep = None  # temporaries may be freed now


class NCCLCommunicator(DeviceCommunicator):
    """NCCL for CuPy arrays, MPI (the wrapped ``host``) for everything else.

    Args:
        host: the world communicator; its rank 0 makes the NCCL unique id and broadcasts it.
        device: this rank's GPU (one rank per GPU: NCCL refuses duplicates).

    Raises:
        RuntimeError: when CuPy cannot load NCCL.
    """

    kind = "nccl"

    def __init__(self, host: Communicator, device: backend.Device):
        super().__init__(host, device)
        nccl = nccl_module()
        if nccl is None:
            raise RuntimeError("NCCLCommunicator: " + nccl_status()[1])
        self.nccl = nccl
        self.version = int(nccl.get_version())
        cp = self._cp()
        uid = nccl.get_unique_id() if host.rank == 0 else None
        uid = host.broadcast_obj(uid, 0) if host.size > 1 else uid
        with cp.cuda.Device(device.index):
            self._enter("nccl init", 0)
            try:
                self.comm = nccl.NcclCommunicator(host.size, uid, host.rank)
            finally:
                self._exit()
            self.stream = cp.cuda.Stream(non_blocking=True)
        self._fallback = None

    def _staged(self) -> HostStagedCommunicator:
        if self._fallback is None:
            self._fallback = HostStagedCommunicator(self.host, self.device)
        return self._fallback

    def _dtype(self, array, bfloat16: bool = False) -> int | None:
        if bfloat16:
            ok = array.dtype == np.uint16 and self.version >= _BF16_MIN_VERSION
            return _NCCL_BFLOAT16 if ok else None
        return _NCCL_TYPES.get(np.dtype(array.dtype))

    def _enqueue(self, call, *arrays):
        """Run ``call(stream_ptr)`` on the NCCL stream after the current stream's work; returns
        the completion event. ``arrays`` must be contiguous device arrays."""
        cp = self._cp()
        with cp.cuda.Device(self.device.index):
            ready = cp.cuda.Event(disable_timing=True)
            ready.record(cp.cuda.get_current_stream())
            self.stream.wait_event(ready)
            call(self.stream.ptr)
            done = cp.cuda.Event(disable_timing=True)
            done.record(self.stream)
        return done

    def _wait(self, done, name: str, nbytes: int) -> None:
        """Blocking-collective completion: the host and the current stream wait for ``done``."""
        cp = self._cp()
        self._enter(name, nbytes)
        try:
            done.synchronize()
        finally:
            self._exit()
        with cp.cuda.Device(self.device.index):
            cp.cuda.get_current_stream().wait_event(done)

    def _contiguous(self, array):
        cp = self._cp()
        with cp.cuda.Device(self.device.index):
            return array if array.flags.c_contiguous else cp.ascontiguousarray(array)

    def _scale_mean(self, array, op) -> None:
        if op == "mean":
            with self._cp().cuda.Device(self.device.index):
                array *= 1.0 / self.size

    # -- collectives -----------------------------------------------------------------------------

    def _device_allreduce(self, array, op):
        dtype = self._dtype(array)
        if dtype is None:
            return self._staged()._device_allreduce(array, op)
        work = self._contiguous(array)
        ptr, n = work.data.ptr, work.size
        done = self._enqueue(lambda s: self.comm.allReduce(ptr, ptr, n, dtype, _NCCL_OPS[op], s))
        self._wait(done, "allreduce", work.nbytes)
        self._copy_back(array, work)
        self._scale_mean(array, op)
        return array

    def _device_iallreduce(self, array, op, bfloat16):
        dtype = self._dtype(array, bfloat16)
        if dtype is None:
            return self._staged()._device_iallreduce(array, op, bfloat16)
        work = self._contiguous(array)
        ptr, n = work.data.ptr, work.size
        done = self._enqueue(lambda s: self.comm.allReduce(ptr, ptr, n, dtype, _NCCL_OPS[op], s))

        def finish():
            self._copy_back(array, work)
            self._scale_mean(array, op)

        needs_finish = work is not array or op == "mean"
        return _NCCLRequest(self, done, array, finish if needs_finish else None, (work,),
                            work.nbytes)

    def _device_broadcast(self, array, root):
        dtype = self._dtype(array)
        if dtype is None:
            return self._staged()._device_broadcast(array, root)
        work = self._contiguous(array)
        ptr, n = work.data.ptr, work.size
        done = self._enqueue(lambda s: self.comm.bcast(ptr, n, dtype, root, s))
        self._wait(done, "broadcast", work.nbytes)
        self._copy_back(array, work)
        return array

    def _device_allgather(self, array, out):
        dtype = self._dtype(array)
        if dtype is None:
            return self._staged()._device_allgather(array, out)
        cp = self._cp()
        send = self._contiguous(array)
        with cp.cuda.Device(self.device.index):
            recv = out if out.flags.c_contiguous else cp.empty(out.shape, out.dtype)
        sp, rp, n = send.data.ptr, recv.data.ptr, send.size
        done = self._enqueue(lambda s: self.comm.allGather(sp, rp, n, dtype, s))
        self._wait(done, "allgather", send.nbytes * self.size)
        self._copy_back(out, recv)
        return out

    def _device_reduce_scatter(self, array, op, out):
        dtype = self._dtype(array)
        if dtype is None:
            return self._staged()._device_reduce_scatter(array, op, out)
        cp = self._cp()
        send = self._contiguous(array)
        with cp.cuda.Device(self.device.index):
            recv = out if out.flags.c_contiguous else cp.empty(out.shape, out.dtype)
        sp, rp, m = send.data.ptr, recv.data.ptr, recv.size
        done = self._enqueue(
            lambda s: self.comm.reduceScatter(sp, rp, m, dtype, _NCCL_OPS[op], s))
        self._wait(done, "reduce_scatter", send.nbytes)
        self._copy_back(out, recv)
        self._scale_mean(out, op)
        return out

    def abort(self, code: int = 1) -> None:
        try:
            self.comm.abort()
        except Exception:
            pass
        self.host.abort(code)
