"""Communicators: the narrow interface every collective in distprop goes through.

A :class:`Communicator` knows its rank, the world size and the node-local rank/size, and offers
blocking and non-blocking collectives on flat arrays plus object variants for small Python
values. Two implementations live here:

* :class:`SingleProcessCommunicator` -- a world of one process; every collective is the identity
  and no MPI library is touched.
* :class:`MPICommunicator` -- mpi4py with buffer-based (uppercase) calls on NumPy arrays. CuPy
  arrays are staged through host memory (a NCCL communicator will plug in for GPUs).

Collectives operate on arrays *in place* where that makes sense (allreduce, broadcast). A
communicator marks the collective it is blocked in (``current``) so a stall watchdog can report it.

MPI progress: MPICH only advances a non-blocking collective inside MPI calls. The MPI
communicator can run a small progress thread that tests outstanding requests every
``DISTPROP_PROGRESS_INTERVAL`` seconds (default 2e-4) while any are pending and sleeps otherwise,
so a long matrix product does not stall the transfer. ``DISTPROP_PROGRESS_THREAD=1|0`` forces it
on or off; by default (``auto``) it runs only when the node has a core to spare for it (more
cores than ranks on the node x BLAS threads per rank): on an oversubscribed node the thread takes
CPU from the computation and measured slower. Without it, :meth:`Communicator.progress` calls
(DDP makes one from every gradient hook), new MPI calls and ``wait()`` advance the transfers.
All MPI calls of one communicator are serialised by a lock, so the thread and the main thread
never complete the same request at once.
"""

from __future__ import annotations

import collections
import os
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from distprop import backend

OPS = ("sum", "mean", "max", "min")


class ReduceOp:
    """Reduction names accepted by every collective (``op='sum'`` works just as well)."""

    SUM = "sum"
    MEAN = "mean"
    AVG = "mean"
    MAX = "max"
    MIN = "min"


def check_op(op: str) -> str:
    """Normalise a reduction name; raise ``ValueError`` naming the valid ones otherwise."""
    name = str(op).lower()
    if name == "avg":
        name = "mean"
    if name not in OPS:
        raise ValueError(f"unknown reduction op {op!r}: expected one of {', '.join(OPS)}")
    return name


def _check_mean_dtype(array, op: str) -> None:
    if op == "mean" and array.dtype.kind not in "fc":
        raise TypeError(
            f"op='mean' needs a floating-point array, got dtype {array.dtype}; use op='sum'"
        )


def _reduce_values(values: list, op: str):
    """Reduce a list of Python values (numbers, or equal-length sequences of numbers)."""
    first = values[0]
    if isinstance(first, (list, tuple)):
        columns = list(zip(*values))
        out = [_reduce_values(list(col), op) for col in columns]
        return type(first)(out)
    if op == "sum":
        total = first
        for v in values[1:]:
            total = total + v
        return total
    if op == "mean":
        return _reduce_values(values, "sum") / len(values)
    if op == "max":
        return max(values)
    return min(values)


class Request:
    """A non-blocking collective in flight. ``wait()`` finishes it; ``test()`` asks if it has."""

    def wait(self):  # pragma: no cover - interface
        raise NotImplementedError

    def test(self) -> bool:  # pragma: no cover - interface
        raise NotImplementedError


class CompletedRequest(Request):
    """A request that finished when it was made (world size 1)."""

    def __init__(self, result=None):
        self.result = result

    def wait(self):
        return self.result

    def test(self) -> bool:
        return True


class Communicator:
    """The interface: rank/size queries, collectives on arrays, and small-object variants.

    Array collectives take NumPy (or CuPy) arrays. ``allreduce`` and ``broadcast`` work in place
    and return the array; ``allgather`` returns ``(size, *shape)``; ``reduce_scatter`` returns
    this rank's chunk of ``array.size // size`` elements. Object variants pickle small values.
    """

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    local_size: int = 1

    def __init__(self) -> None:
        #: (collective name, bytes, start time) while blocked in a collective, else None.
        self.current: tuple[str, int, float] | None = None
        #: blocking collectives entered so far (the same count on every rank of one code path;
        #: the launcher's stall survey compares it across ranks).
        self.collectives = 0

    # -- bookkeeping for the stall watchdog ----------------------------------------------------

    def _enter(self, name: str, nbytes: int = 0) -> None:
        self.current = (name, int(nbytes), time.monotonic())

    def _exit(self) -> None:
        self.current = None

    # -- the interface ------------------------------------------------------------------------

    def barrier(self) -> None:
        raise NotImplementedError

    def allreduce(self, array, op: str = "sum"):
        raise NotImplementedError

    def iallreduce(self, array, op: str = "sum", bfloat16: bool = False) -> Request:
        """Start an in-place allreduce; ``wait()`` on the result finishes it.

        ``float16`` arrays are summed as half floats; ``bfloat16=True`` declares a ``uint16``
        array holding bfloat16 bit patterns (NumPy has no bfloat16 dtype).
        """
        raise NotImplementedError

    def broadcast(self, array, root: int = 0):
        raise NotImplementedError

    def allgather(self, array, out=None):
        raise NotImplementedError

    def reduce_scatter(self, array, op: str = "sum", out=None):
        raise NotImplementedError

    def allgather_obj(self, value: Any) -> list:
        raise NotImplementedError

    def broadcast_obj(self, value: Any, root: int = 0) -> Any:
        raise NotImplementedError

    def allreduce_obj(self, value: Any, op: str = "sum") -> Any:
        """Reduce a number (or a list/tuple of numbers) across ranks; the same result on all."""
        op = check_op(op)
        return _reduce_values(self.allgather_obj(value), op)

    def progress(self) -> None:
        """Give outstanding non-blocking collectives a chance to advance (cheap; may be a no-op)."""

    def abort(self, code: int = 1) -> None:
        raise NotImplementedError

    def _check_chunked(self, array, what: str) -> int:
        if array.size % self.size:
            raise ValueError(
                f"{what}: the array has {array.size} elements, not a multiple of the world size "
                f"{self.size}; pad it first"
            )
        return array.size // self.size

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(rank={self.rank}, size={self.size}, "
                f"local_rank={self.local_rank}, local_size={self.local_size})")


class SingleProcessCommunicator(Communicator):
    """A world of one process: collectives are identities and nothing touches MPI."""

    def barrier(self) -> None:
        return None

    def allreduce(self, array, op: str = "sum"):
        op = check_op(op)
        _check_mean_dtype(array, op)
        return array

    def iallreduce(self, array, op: str = "sum", bfloat16: bool = False) -> Request:
        self.allreduce(array, op)
        return CompletedRequest(array)

    def broadcast(self, array, root: int = 0):
        if root != 0:
            raise ValueError(f"broadcast root {root} does not exist in a world of size 1")
        return array

    def allgather(self, array, out=None):
        if out is None:
            return array.reshape((1,) + tuple(array.shape)).copy()
        flat = out.reshape(-1)
        if flat.size != array.size:
            raise ValueError(f"allgather: out has {flat.size} elements, expected {array.size}")
        flat[...] = array.reshape(-1)
        return out

    def reduce_scatter(self, array, op: str = "sum", out=None):
        op = check_op(op)
        _check_mean_dtype(array, op)
        if out is None:
            return array.reshape(-1).copy()
        out.reshape(-1)[...] = array.reshape(-1)
        return out

    def allgather_obj(self, value: Any) -> list:
        return [value]

    def broadcast_obj(self, value: Any, root: int = 0) -> Any:
        return value

    def abort(self, code: int = 1) -> None:
        _flush_std()
        os._exit(code)


def _flush_std() -> None:
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:
            pass


def _drain_std_pipes(limit: float = 2.0) -> None:
    """Wait (at most ``limit`` seconds) until whoever reads our stdout/stderr pipes has read
    what we wrote. MPI's process manager forwards a rank's output from a pipe and kills the rank
    on ``MPI_Abort``: a message written just before the abort (the traceback, the stall report)
    could still sit unread in the pipe and be lost. Linux's ``FIONREAD`` on either end of a pipe
    counts the unread bytes; files, terminals and sockets are left alone."""
    import fcntl
    import stat
    import struct
    import termios

    pipes = []
    for fd in (1, 2):
        try:
            if stat.S_ISFIFO(os.fstat(fd).st_mode):
                pipes.append(fd)
        except OSError:
            pass
    deadline = time.monotonic() + limit
    for fd in pipes:
        while time.monotonic() < deadline:
            try:
                unread = struct.unpack("i", fcntl.ioctl(fd, termios.FIONREAD, b"\0" * 4))[0]
            except OSError:
                break
            if unread == 0:
                break
            time.sleep(0.005)


class _MPIRequest(Request):
    """An mpi4py request plus what must happen when it completes (copy back, scale)."""

    __slots__ = ("_comm", "_req", "_done", "_finished", "array", "_finish", "_name", "_nbytes",
                 "done_ns")

    def __init__(self, comm: MPICommunicator, req, array, finish: Callable | None, name, nbytes):
        self._comm, self._req, self.array = comm, req, array
        self._finish, self._done, self._finished = finish, False, False
        self._name, self._nbytes = name, nbytes
        self.done_ns = None  # perf_counter_ns() when completion was seen (for traces)

    def _poll_locked(self) -> bool:
        if not self._done and self._req.Test():
            self._done = True
            self.done_ns = time.perf_counter_ns()
        return self._done

    def test(self) -> bool:
        if not self._done:
            with self._comm._lock:
                self._poll_locked()
        if self._done:
            self._complete()
        return self._done

    def wait(self):
        if not self._done:
            comm = self._comm
            comm._enter(self._name, self._nbytes)
            try:
                with comm._lock:
                    if not self._done:
                        self._req.Wait()
                        self._done = True
                        self.done_ns = time.perf_counter_ns()
            finally:
                comm._exit()
        self._complete()
        return self.array

    def _complete(self) -> None:
        if not self._finished:
            self._finished = True
            self._comm._progress.discard(self)
            if self._finish is not None:
                self._finish()


class _ProgressThread:
    """Tests pending requests from a daemon thread so MPI advances them during computation."""

    def __init__(self, lock: threading.Lock, interval: float, enabled: bool):
        self._lock, self.interval, self.enabled = lock, interval, enabled
        self._pending: list[_MPIRequest] = []
        self._cv = threading.Condition()
        self._thread: threading.Thread | None = None

    def add(self, req: _MPIRequest) -> None:
        with self._cv:
            self._pending.append(req)
            self._ensure_thread()
            self._cv.notify()

    def _ensure_thread(self) -> None:
        if self.enabled and self._thread is None:
            self._thread = threading.Thread(target=self._run, name="distprop-mpi-progress",
                                            daemon=True)
            self._thread.start()

    def discard(self, req: _MPIRequest) -> None:
        with self._cv:
            if req in self._pending:
                self._pending.remove(req)

    def poll(self) -> None:
        """Test every pending request once, unless another thread is inside MPI right now."""
        if not self._pending or not self._lock.acquire(blocking=False):
            return
        try:
            for req in list(self._pending):
                req._poll_locked()
        finally:
            self._lock.release()

    def set_enabled(self, enabled: bool) -> None:
        with self._cv:
            self.enabled = bool(enabled)
            self._ensure_thread()
            self._cv.notify()

    def _run(self) -> None:
        while True:
            with self._cv:
                while not self.enabled or not any(not r._done for r in self._pending):
                    self._cv.wait()
                pending = [r for r in self._pending if not r._done]
            with self._lock:
                for req in pending:
                    req._poll_locked()
            time.sleep(self.interval)


def _spare_core(ranks_on_node: int) -> bool:
    """Whether this node has more cores than its ranks' BLAS threads occupy."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # pragma: no cover - not Linux
        cores = os.cpu_count() or 1
    threads = None
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        value = os.environ.get(var, "").split(",")[0].strip()
        if value.isdigit() and int(value) > 0:
            threads = int(value)
            break
    if threads is None:  # BLAS will use every core it sees
        return False
    return cores > ranks_on_node * threads


class MPICommunicator(Communicator):
    """Collectives over an mpi4py communicator (``MPI.COMM_WORLD`` by default).

    Node-local rank and size come from ``Split_type(COMM_TYPE_SHARED)``, which is right under
    mpirun, srun and PBS alike.
    """

    def __init__(self, mpi_comm=None, progress_thread: bool | None = None,
                 progress_interval: float | None = None):
        super().__init__()
        from mpi4py import MPI

        self.MPI = MPI
        self.comm = MPI.COMM_WORLD if mpi_comm is None else mpi_comm
        self.rank = self.comm.Get_rank()
        self.size = self.comm.Get_size()
        self.local_comm = self.comm.Split_type(MPI.COMM_TYPE_SHARED, key=self.rank)
        self.local_rank = self.local_comm.Get_rank()
        self.local_size = self.local_comm.Get_size()
        from distprop.distributed.shm import unlink_mpich_segments

        unlink_mpich_segments(self.local_comm)  # no /dev/shm file left by an aborted job
        # the second phase of 16-bit sums (halfsum.HalfAllreduce) starts when the first ends:
        # on its own communicator, in issue order, so no rank's collective order depends on timing
        self._half_comm = self.comm.Dup()
        self._half_queue: collections.deque = collections.deque()
        self._ops = {"sum": MPI.SUM, "mean": MPI.SUM, "max": MPI.MAX, "min": MPI.MIN}
        self._lock = threading.Lock()
        if progress_thread is None:
            choice = os.environ.get("DISTPROP_PROGRESS_THREAD", "auto").strip().lower()
            if choice in ("", "auto"):
                progress_thread = _spare_core(self.local_size)
            else:
                progress_thread = choice not in ("0", "false", "off", "no")
        if progress_interval is None:
            progress_interval = float(os.environ.get("DISTPROP_PROGRESS_INTERVAL", "2e-4"))
        self._progress = _ProgressThread(self._lock, progress_interval, progress_thread)

    # -- helpers --------------------------------------------------------------------------------

    def _buffer(self, array, op: str = "sum", bfloat16: bool = False):
        """The mpi4py buffer spec and MPI op for ``array`` (16-bit words get no MPI op: their
        sum is :class:`~distprop.distributed.halfsum.HalfAllreduce`)."""
        if bfloat16 or array.dtype == np.float16:
            if op not in ("sum", "mean"):
                raise TypeError(f"op={op!r} is not supported on half-precision arrays")
            if bfloat16 and array.dtype != np.uint16:
                raise TypeError(f"bfloat16=True needs a uint16 array, got dtype {array.dtype}")
            return [array.view(np.uint16), self.MPI.UINT16_T], None
        return array, self._ops[op]

    @staticmethod
    def _stage(array):
        """A contiguous host array holding ``array``'s values, and whether it is a copy."""
        if isinstance(array, np.ndarray):
            if array.flags.c_contiguous:
                return array, False
            return np.ascontiguousarray(array), True
        return np.ascontiguousarray(backend.to_host(array)), True

    @staticmethod
    def _unstage(array, host) -> None:
        if isinstance(array, np.ndarray):
            array[...] = host
        else:
            xp = backend.get_array_module(array)
            array[...] = xp.asarray(host)

    def _blocking(self, name: str, nbytes: int, fn: Callable, *args):
        self.collectives += 1
        self._enter(name, nbytes)
        try:
            with self._lock:
                return fn(*args)
        finally:
            self._exit()

    # -- collectives on arrays ------------------------------------------------------------------

    def barrier(self) -> None:
        self._blocking("barrier", 0, self.comm.Barrier)

    def allreduce(self, array, op: str = "sum"):
        op = check_op(op)
        _check_mean_dtype(array, op)
        if array.dtype == np.float16:  # the same 16-bit sum as iallreduce (no user-defined op)
            return self.iallreduce(array, op).wait()
        host, staged = self._stage(array)
        buf, mpi_op = self._buffer(host, op)
        self._blocking("allreduce", host.nbytes, self.comm.Allreduce, self.MPI.IN_PLACE, buf,
                       mpi_op)
        if op == "mean":
            host *= 1.0 / self.size
        if staged:
            self._unstage(array, host)
        return array

    def iallreduce(self, array, op: str = "sum", bfloat16: bool = False) -> Request:
        op = check_op(op)
        _check_mean_dtype(array, op)
        host, staged = self._stage(array)
        buf, mpi_op = self._buffer(host, op, bfloat16)
        half = buf[1] is self.MPI.UINT16_T if isinstance(buf, list) else False
        inv = 1.0 / self.size

        def finish():
            if op == "mean":
                np.multiply(host, inv, out=host)
            if staged:
                self._unstage(array, host)

        needs_finish = staged or op == "mean"
        if half:  # 16-bit words: alltoall + local float32 sum + allgather (no user MPI op)
            from distprop.distributed.halfsum import HalfAllreduce

            with self._lock:
                req = HalfAllreduce(self, buf[0], "bf16" if bfloat16 else "fp16", array,
                                     finish if needs_finish else None, host.nbytes)
            self._progress.add(req)
            return req
        with self._lock:
            mpi_req = self.comm.Iallreduce(self.MPI.IN_PLACE, buf, mpi_op)
        req = _MPIRequest(self, mpi_req, array, finish if needs_finish else None,
                          "iallreduce", host.nbytes)
        self._progress.add(req)
        return req

    def progress(self) -> None:
        self._progress.poll()

    @property
    def progress_thread(self) -> bool:
        """Whether the background progress thread is on."""
        return self._progress.enabled

    def set_progress_thread(self, enabled: bool) -> None:
        """Turn the background progress thread on or off (e.g. to measure what it buys)."""
        self._progress.set_enabled(enabled)

    def broadcast(self, array, root: int = 0):
        if not 0 <= root < self.size:
            raise ValueError(f"broadcast root {root} is not a rank of a world of size {self.size}")
        host, staged = self._stage(array)
        self._blocking("broadcast", host.nbytes, self.comm.Bcast, host, root)
        if staged:
            self._unstage(array, host)
        return array

    def allgather(self, array, out=None):
        host, staged = self._stage(array)
        n = host.size
        if out is None:
            xp = backend.get_array_module(array)
            out = xp.empty((self.size,) + tuple(array.shape), dtype=array.dtype)
        if out.size != n * self.size or out.dtype != array.dtype:
            raise ValueError(
                f"allgather: out must hold {self.size} x {n} elements of {array.dtype}, got "
                f"{out.size} of {out.dtype}"
            )
        recv, recv_staged = self._stage(out)
        flat = recv.reshape(-1)
        in_place = (not staged and not recv_staged
                    and host.__array_interface__["data"][0]
                    == flat[self.rank * n:].__array_interface__["data"][0])
        send = self.MPI.IN_PLACE if in_place else host
        self._blocking("allgather", host.nbytes * self.size, self.comm.Allgather, send, flat)
        if recv_staged:
            self._unstage(out, recv)
        return out

    def reduce_scatter(self, array, op: str = "sum", out=None):
        op = check_op(op)
        _check_mean_dtype(array, op)
        m = self._check_chunked(array, "reduce_scatter")
        host, _ = self._stage(array)
        xp = backend.get_array_module(array)
        if out is None:
            out = xp.empty(m, dtype=array.dtype)
        if out.size != m:
            raise ValueError(f"reduce_scatter: out must have {m} elements, got {out.size}")
        recv, recv_staged = self._stage(out)
        if np.shares_memory(recv, host):
            recv, recv_staged = np.empty(m, dtype=host.dtype), True
        self._blocking("reduce_scatter", host.nbytes, self.comm.Reduce_scatter_block,
                       host.reshape(-1), recv.reshape(-1), self._ops[op])
        if op == "mean":
            recv *= 1.0 / self.size
        if recv_staged:
            self._unstage(out, recv.reshape(out.shape))
        return out

    # -- small Python objects -------------------------------------------------------------------

    def allgather_obj(self, value: Any) -> list:
        return self._blocking("allgather_obj", 0, self.comm.allgather, value)

    def broadcast_obj(self, value: Any, root: int = 0) -> Any:
        return self._blocking("broadcast_obj", 0, self.comm.bcast, value, root)

    def abort(self, code: int = 1) -> None:
        _flush_std()
        _drain_std_pipes()
        self.MPI.COMM_WORLD.Abort(code)
        # Some MPI builds (MPICH 5 with Hydra) return from MPI_Abort once the process manager
        # has the request and kill the job a moment later: never run on in the meantime.
        os._exit(code)
