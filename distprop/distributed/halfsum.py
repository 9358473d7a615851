"""The sum of 16-bit (fp16/bf16) words across ranks without a user-defined MPI operation.

Used by ``MPICommunicator.iallreduce`` (and ``allreduce`` of float16 arrays); see
:class:`HalfAllreduce` and the module docstring of :mod:`distprop.distributed.compression`.
"""

from __future__ import annotations

import numpy as np

from distprop.distributed import compression
from distprop.distributed.comm import _MPIRequest


class HalfAllreduce(_MPIRequest):
    """A sum of 16-bit (fp16/bf16) words without a user-defined MPI operation.

    Phase 1 (``Ialltoallv``): rank r receives everyone's r-th chunk. Then, locally, the chunks
    are widened to float32, added in rank order and rounded back to 16 bits once. Phase 2
    (``Iallgatherv``, in place): every rank gets every summed chunk. Each rank moves 2 (P-1)/P of
    the buffer, as a ring allreduce does, and converts only its own chunk, outside MPI's
    per-message callback. For 2 ranks the result is bit-identical to the user-defined op
    (``round16(float(a) + float(b))``); for more it is rounded once instead of once per step,
    and it is the same on every rank. The reduction runs in whichever thread sees phase 1 end
    (the progress thread or the waiter), holding the communicator lock. Phase 1 is issued in
    program order on the communicator; phase 2 on a duplicate of it, strictly in the order the
    requests were made (a FIFO), so the collective order is the same on every rank.
    """

    __slots__ = ("_words", "_kind", "_bounds", "_recv", "_phase")

    def __init__(self, comm, words, kind: str, array, finish, nbytes):
        MPI, size, rank = comm.MPI, comm.size, comm.rank
        n = words.size
        bounds = [n * i // size for i in range(size + 1)]
        counts = [bounds[i + 1] - bounds[i] for i in range(size)]
        mine = counts[rank]
        self._words, self._kind, self._bounds, self._phase = words, kind, bounds, 1
        self._recv = np.empty(size * mine, dtype=np.uint16)
        req = comm.comm.Ialltoallv([words, (counts, bounds[:-1]), MPI.UINT16_T],
                                   [self._recv, ([mine] * size, [i * mine for i in
                                                                 range(size)]), MPI.UINT16_T])
        super().__init__(comm, req, array, finish, "iallreduce", nbytes)
        comm._half_queue.append(self)

    def _next_phase_locked(self) -> None:
        """Sum the received chunks (float32, rank order, one rounding) and start phase 2."""
        comm, bounds = self._comm, self._bounds
        size, rank = comm.size, comm.rank
        lo, hi = bounds[rank], bounds[rank + 1]
        mine = hi - lo
        if mine:
            compression.sum_words([self._recv[i * mine:(i + 1) * mine] for i in range(size)],
                                  self._words[lo:hi], self._kind)
        counts = [bounds[i + 1] - bounds[i] for i in range(size)]
        self._recv, self._phase = None, 2
        self._req = comm._half_comm.Iallgatherv(
            comm.MPI.IN_PLACE, [self._words, (counts, bounds[:-1]), comm.MPI.UINT16_T])

    def _advance_locked(self, block: bool) -> None:
        """Start phase 2 of the queued requests, oldest first, up to and including this one
        (blocking: wait for their phase 1; otherwise stop at the first one still running)."""
        queue = self._comm._half_queue
        while self._phase == 1:
            head = queue[0]
            if block:
                head._req.Wait()
            elif not head._req.Test():
                return
            head._next_phase_locked()
            queue.popleft()

    def _poll_locked(self) -> bool:
        if self._phase == 1:
            self._advance_locked(block=False)
            if self._phase == 1:
                return False
        return super()._poll_locked()

    def wait(self):
        if not self._done and self._phase == 1:
            comm = self._comm
            comm._enter(self._name, self._nbytes)
            try:
                with comm._lock:
                    self._advance_locked(block=True)
            finally:
                comm._exit()
        return super().wait()
