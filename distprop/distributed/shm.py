"""Node-shared gradient buffers: DDP's bucket reduction over shared memory (``comm='shm'``).

Ranks of one node (MPI ``Split_type(COMM_TYPE_SHARED)``) keep their flat gradient buffers in one
node-shared window (``MPI.Win.Allocate_shared``). A ready bucket is reduced in place, without
messages:

1. every local rank, once its gradients of the bucket are final, stores the bucket's
   *generation* (how many times this bucket has been launched) into its ``ready`` flag;
2. local rank ``i`` owns slice ``i`` of the bucket. When every local rank's ready flag has
   reached the generation it sums slice ``i`` of all local buffers, a cache-sized chunk at a
   time, always in local-rank order ``((g0 + g1) + g2) + ...`` (so every rank gets the same
   bits, run after run);
3. with more than one node, the slice sum is allreduced (MPI) among the ranks with the same
   local rank, one per node (Horovod's hierarchical allreduce, with every local rank carrying a
   slice across nodes instead of one leader carrying all of it);
4. rank ``i`` writes the reduced slice into every local rank's buffer and stores the
   generation into its ``done`` flag; a rank's bucket is synchronised when every ``done`` flag
   of it has reached the generation.

Each rank therefore reads and writes the bucket once, spread over the local ranks: the traffic of
one ``memcpy`` of the bucket. Flags live in each rank's own cache lines and are written by that
rank only; ``MPI_Win_sync`` (a memory barrier) orders data before flags and flags before data.
Reuse across steps needs no barrier: a rank leaves a bucket's wait only when every reducer has
finished with its buffer (``done``), and the next step's reducers wait for the next generation.

Waits poll with a growing back-off, mark the communicator as inside a collective named after the
missing ranks (so the stall watchdog, ``DISTPROP_STALL_TIMEOUT``, names them when it fires) and
check the missing ranks' processes: a local rank that died ends the job at once, naming it.

Only CPU (NumPy) float gradients; MPICH removes the window's ``/dev/shm`` file as soon as every
rank has mapped it, so nothing is left behind, even after ``SIGKILL``.
"""

from __future__ import annotations

import atexit
import os
import sys
import time

import numpy as np

from distprop import trace
from distprop.distributed.comm import Request
from distprop.distributed.lifeline import unlink_mapped_mpi_files
from distprop.reaper import MPICH_STARTUP_PREFIX

_ALIGN = 4096  # every gradient buffer starts on a page of its rank's segment
_LINE_ELEMS = 64  # slice boundaries on 64-element (256/512-byte) boundaries: no shared lines
_CHUNK_BYTES = 1 << 18  # sum 256 KiB of every rank's slice at a time (stays in L2)
_LIVENESS_S = 0.5  # how often a wait checks that the ranks it waits for still exist

CHOICES = ("auto", "shm", "mpi")


def choose(choice: str | None, comm, buffers, compression) -> bool:
    """Whether DDP reduces through node-shared memory (collective: every rank calls it).

    ``choice``: ``'shm'`` (wanted: raise naming what prevents it, except that a world of one
    rank or one rank per node simply has nothing to share), ``'mpi'`` (never), ``'auto'`` or
    None (env ``DISTPROP_INTRA_NODE``, default ``auto``: shared memory when some ranks share a
    node and the gradients are CPU floats without compression).
    """
    choice = (choice or os.environ.get("DISTPROP_INTRA_NODE") or "auto").strip().lower()
    if choice not in CHOICES:
        raise ValueError(f"intra-node reduction must be one of {', '.join(CHOICES)}, got "
                         f"{choice!r} (DISTPROP_INTRA_NODE or comm=)")
    if choice == "mpi" or comm.size == 1:
        return False
    why = _obstacle(comm, buffers, compression)
    if why is None:
        sizes = comm.allgather_obj(comm.local_size)  # the same verdict on every rank
        if min(sizes) == 1:  # some node has one rank: nothing to share there
            return False
        if len(set(sizes)) == 1:
            return True
        why = ("it needs the same number of ranks on every node, got "
               + ", ".join(str(s) for s in sorted(set(sizes))))
    if choice == "shm":
        raise ValueError(f"comm='shm' (node-shared gradient buffers): {why}")
    return False


def _obstacle(comm, buffers, compression) -> str | None:
    """What rules shared memory out, from facts that are the same on every rank."""
    if getattr(comm, "local_comm", None) is None or getattr(comm, "kind", None):
        return "it needs the MPI world communicator of distprop.distributed.init()"
    if compression:
        return f"compression={compression!r} is not supported with it"
    for b in buffers:
        if b.device.is_cuda:
            return "the gradients are on a GPU; it reduces CPU (NumPy) gradients only"
        if b.dtype.kind != "f":
            return f"the gradients are {b.dtype}; it reduces floating-point gradients only"
    return None


class _BucketRequest(Request):
    """One bucket's reduction in flight; ``wait()`` drives it (and the ones before it)."""

    __slots__ = ("reducer", "index", "gen", "done_ns")

    def __init__(self, reducer: ShmReducer, index: int, gen: int):
        self.reducer, self.index, self.gen = reducer, index, gen
        self.done_ns = None

    def test(self) -> bool:
        self.reducer.progress()
        return self.reducer._complete(self.index, self.gen, self)

    def wait(self):
        r = self.reducer
        r._wait(lambda: r._complete(self.index, self.gen, self), self.index, self.gen)
        return None


class ShmReducer:
    """Node-shared gradient storage and bucket reduction for one DDP wrapper (collective).

    Args:
        comm: the world :class:`~distprop.distributed.comm.MPICommunicator`.
        buffers: the DDP's flat buffers; their gradients are moved into the shared window
            (values kept; parameters' ``.grad`` views follow).
        spans: per bucket in launch order, ``(buffer index, start, stop)`` elements.
    """

    def __init__(self, comm, buffers, spans: list[tuple[int, int, int]]):
        from mpi4py import MPI

        self.MPI, self.comm = MPI, comm
        local = comm.local_comm
        self.L, self.me = local.Get_size(), local.Get_rank()
        self.nodes = comm.size // self.L
        self.spans = list(spans)
        nb = len(self.spans)
        self.world_of = local.allgather(comm.rank)  # local rank -> world rank
        self.pids = local.allgather(os.getpid())
        # per-rank segment: [ready int64 x nb | done int64 x nb] then each gradient buffer
        offsets, size = [], _round_up(16 * max(nb, 1), _ALIGN)
        for b in buffers:
            offsets.append(size)
            size = _round_up(size + b.numel * b.dtype.itemsize, _ALIGN)
        self.win = MPI.Win.Allocate_shared(size, 1, comm=local)
        self.win.Lock_all(MPI.MODE_NOCHECK)
        self.ready, self.done, grads = [], [], []
        for r in range(self.L):
            mem, _ = self.win.Shared_query(r)
            raw = np.frombuffer(mem, dtype=np.uint8, count=size)
            ctrl = raw[:16 * nb].view(np.int64)
            self.ready.append(ctrl[:nb])
            self.done.append(ctrl[nb:2 * nb])
            grads.append([raw[o:o + b.numel * b.dtype.itemsize].view(b.dtype)
                          for o, b in zip(offsets, buffers)])
        self.ready[self.me][:] = 0
        self.done[self.me][:] = 0
        for b, g in zip(buffers, grads[self.me]):
            _rehome_grad(b, g)
        self.win.Sync()
        local.Barrier()  # every rank's flags are zero before anyone raises one
        self.win.Sync()
        self.cross = comm.comm.Split(self.me, comm.rank) if self.nodes > 1 else None
        self._grads = grads
        self._buffers = list(buffers)
        self._tmp = {np.dtype(b.dtype): np.empty(max(1, _CHUNK_BYTES // b.dtype.itemsize),
                                                 b.dtype) for b in buffers}
        self.gen = [0] * nb  # launches of each bucket on this rank
        self._reduced = [0] * nb  # generation whose slice this rank has finished
        self._cross_req: list = [None] * nb
        self._launched: list[int] = []  # buckets launched and not yet reduced by this rank
        self.closed = False
        _LIVE.append(self)
        if not _AT_EXIT:  # after mpi4py's MPI_Finalize handler, so it runs before it
            _AT_EXIT.append(atexit.register(_close_all))

    # -- the bucket interface DDP calls --------------------------------------------------------

    def ireduce(self, index: int) -> Request:
        """Declare bucket ``index`` final on this rank and start its reduction; ``wait()`` on
        the result returns once every local rank's copy holds the sum."""
        self.gen[index] += 1
        gen = self.gen[index]
        self.win.Sync()  # the gradients are written before the flag says so
        self.ready[self.me][index] = gen
        self.win.Sync()
        self._launched.append(index)
        self.progress()
        return _BucketRequest(self, index, gen)

    def progress(self) -> None:
        """Reduce this rank's slice of every launched bucket whose inputs are all ready, in
        launch order (the cross-node allreduces must start in the same order everywhere)."""
        while self._launched:
            k = self._launched[0]
            gen = self.gen[k]
            req = self._cross_req[k]
            if req is not None:  # cross-node allreduce of my slice in flight
                with self.comm._lock:
                    finished = req.Test()
                if not finished:
                    return
                self._cross_req[k] = None
                self._scatter(k)
                self._finish_slice(k, gen)
                continue
            self.win.Sync()
            if any(self.ready[r][k] < gen for r in range(self.L)):
                return
            self.win.Sync()  # the flags are seen before the data they announce
            t0 = trace.now_ns()
            a, b = self._slice(k)
            self._sum_slice(k, a, b)
            if self.cross is None:
                self._finish_slice(k, gen)
            else:
                mine = self._grads[self.me][self.spans[k][0]][a:b]
                with self.comm._lock:
                    self._cross_req[k] = self.cross.Iallreduce(self.MPI.IN_PLACE, mine,
                                                               self.MPI.SUM)
            trace.complete("shm reduce", t0, trace.now_ns(), "comm", bucket=k,
                           bytes=int((b - a) * self._grads[0][self.spans[k][0]].itemsize))

    def close(self) -> None:
        """Free the window (collective over the node; the gradients move back to private
        memory first, so the model stays usable)."""
        if self.closed:
            return
        self.closed = True
        if self in _LIVE:
            _LIVE.remove(self)
        for b, g in zip(self._buffers, self._grads[self.me]):
            if b.grad is g:
                _rehome_grad(b, g.copy())
        self.win.Unlock_all()
        self.win.Free()
        if self.cross is not None:
            self.cross.Free()

    # -- internals -----------------------------------------------------------------------------

    def _slice(self, k: int) -> tuple[int, int]:
        _, start, stop = self.spans[k]
        n, i, L = stop - start, self.me, self.L

        def edge(j):
            return stop if j == L else start + (n * j // L) // _LINE_ELEMS * _LINE_ELEMS

        return edge(i), edge(i + 1)

    def _sum_slice(self, k: int, a: int, b: int) -> None:
        """Sum slice [a, b) of bucket k over the local ranks, in local-rank order; with one
        node write the sum into every local buffer, else into this rank's only."""
        j = self.spans[k][0]
        srcs = [g[j] for g in self._grads]
        tmp = self._tmp[srcs[0].dtype]
        step = tmp.size
        dests = srcs if self.cross is None else [srcs[self.me]]
        for s in range(a, b, step):
            e = min(b, s + step)
            acc = tmp[:e - s]
            np.add(srcs[0][s:e], srcs[1][s:e], out=acc)
            for src in srcs[2:]:
                np.add(acc, src[s:e], out=acc)
            for d in dests:
                d[s:e] = acc

    def _scatter(self, k: int) -> None:
        """After the cross-node allreduce: copy this rank's reduced slice to the other ranks."""
        a, b = self._slice(k)
        j = self.spans[k][0]
        mine = self._grads[self.me][j][a:b]
        for r in range(self.L):
            if r != self.me:
                self._grads[r][j][a:b] = mine

    def _finish_slice(self, k: int, gen: int) -> None:
        self.win.Sync()  # the reduced slice is written before the flag says so
        self.done[self.me][k] = gen
        self.win.Sync()
        self._reduced[k] = gen
        self._launched.pop(0)

    def _complete(self, k: int, gen: int, request=None) -> bool:
        if self._reduced[k] < gen:
            return False
        self.win.Sync()
        if any(self.done[r][k] < gen for r in range(self.L)):
            return False
        self.win.Sync()  # the flags are seen before the data they announce
        if request is not None and request.done_ns is None:
            request.done_ns = trace.now_ns()
        return True

    def _missing(self, k: int, gen: int) -> tuple[str, list[int]]:
        """Which local ranks bucket k still waits for, and on which flag."""
        late = [r for r in range(self.L) if self.ready[r][k] < gen]
        if late:
            return "ready", late
        return "done", [r for r in range(self.L) if self.done[r][k] < gen]

    def _wait(self, finished, k: int, gen: int) -> None:
        """Drive progress until ``finished()``; mark the communicator as inside a collective
        naming the missing ranks (for the stall watchdog) and end the job if one of them died."""
        self.progress()
        if finished():
            return
        comm = self.comm
        nbytes = int((self.spans[k][2] - self.spans[k][1])
                     * self._grads[0][self.spans[k][0]].itemsize)
        since = time.monotonic()
        shown = None
        spins, next_check = 0, since + _LIVENESS_S
        try:
            while True:
                self.progress()
                if finished():
                    return
                spins += 1
                if spins > 64:
                    time.sleep(min(2e-4, 1e-6 * (spins - 64)))
                now = time.monotonic()
                if spins % 64 == 1 or now >= next_check:
                    flag, late = self._missing(k, gen)
                    if late != shown:
                        shown = late
                        who = ", ".join(str(self.world_of[r]) for r in late) or "none"
                        comm.current = (f"shm gradient sync, bucket {k}: no '{flag}' flag from "
                                        f"rank(s) {who}", nbytes, since)
                    if now >= next_check:
                        next_check = now + _LIVENESS_S
                        self._check_alive(late, k)
        finally:
            comm.current = None

    def _check_alive(self, late: list[int], k: int) -> None:
        dead = [r for r in late if not _alive(self.pids[r])]
        if not dead:
            return
        who = ", ".join(f"rank {self.world_of[r]} (PID {self.pids[r]})" for r in dead)
        msg = (f"[rank {self.comm.rank}] shm gradient sync: {who} died during the reduction of "
               f"bucket {k}; aborting the job (MPI_Abort)\n")
        try:
            sys.stderr.write(msg)
            sys.stderr.flush()
        except Exception:
            pass
        self.comm.abort(1)


# Every reducer not yet closed, in creation order. Held strongly: freeing a window is
# collective, so it must not depend on when each rank's garbage collector runs.
_LIVE: list[ShmReducer] = []
_AT_EXIT: list = []


def _close_all() -> None:
    """Free every open window before ``MPI_Finalize`` (collective: every rank of a node made
    the same reducers in the same order; MPICH's OFI device fails to finalise around them)."""
    from mpi4py import MPI

    from distprop.distributed import guards

    if MPI.Is_finalized() or not _LIVE or guards._exit_guard.get("status"):
        return  # (leaving by sys.exit(n != 0): the exit guard aborts the job instead)
    comm = _LIVE[0].comm
    comm._enter("freeing the node-shared gradient windows at exit", 0)  # watched for stalls
    try:
        for reducer in list(_LIVE):
            reducer.close()
    finally:
        comm._exit()


def _alive(pid: int) -> bool:
    """False when ``pid`` is gone or a zombie (a rank on this node that died)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            state = f.read().rsplit(b")", 1)[1].split()[0]
        return state not in (b"Z", b"X")
    except (OSError, IndexError):
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except OSError:
            return True
        return True


def _round_up(n: int, to: int) -> int:
    return (n + to - 1) // to * to


def _rehome_grad(buf, new) -> None:
    """Move a FlatBuffer's gradient into ``new`` (values kept); parameters' gradient views and
    ``.grad`` tensors that were views follow."""
    from distprop.tensor import Tensor

    new[...] = buf.grad
    buf.grad = new
    for i, p in enumerate(buf.params):
        start, n = buf.offsets[i], buf.sizes[i]
        old = buf.grad_views[i]
        view = new[start:start + n].reshape(old.shape)
        buf.grad_views[i] = view
        if p is None or p.data is not buf.views[i]:
            continue
        p._grad_buffer = view
        if p.grad is not None and p.grad.data is old:
            p.grad = Tensor._wrap(view)


def unlink_mpich_segments(local_comm) -> list[str]:
    """Remove the names of MPICH's start-up shared-memory files (``/dev/shm/mpich_shm_*``).

    MPICH keeps that segment's file until ``MPI_Finalize``, so a job that ends by ``MPI_Abort``
    or a signal leaves one file behind per node. Once every local rank has mapped it (true after
    any collective over the world, such as the ``Split_type`` that made ``local_comm``), the name
    is no longer needed: local rank 0 removes it and the memory goes with the last process.
    Returns the removed paths.
    """
    if local_comm.Get_rank() != 0:
        return []
    return unlink_mapped_mpi_files((MPICH_STARTUP_PREFIX,))
