"""Preemption: stop every rank at the same optimizer step, checkpoint it, exit 143.

A cluster that wants its nodes back sends SIGTERM (Slurm: ``--signal=TERM@60`` a minute before
the time limit, or SIGUSR1 with ``--signal=USR1@60``). Any of three paths raise this rank's
flag:

* SIGTERM or SIGUSR1 delivered to the rank itself (``srun`` signals every task; ``kill`` on one
  rank), while :func:`handling` is active (the trainer's ``fit``);
* the launcher (``distprop launch``/``train -n``) receiving SIGTERM/SIGUSR1: when every rank told
  it that it handles preemption, it sends ``preempt`` over the control channel
  (:mod:`distprop.distributed.lifeline`) instead of killing the job;
* :func:`request` called by the program.

The flag of one rank is not enough: the ranks must stop after the *same* step or the last gradient
allreduce would wait forever. :func:`agreed` reduces the flags with one tiny allreduce (an 8-byte
max) that every rank calls once per step; it is true on every rank at the same step. The trainer
uses :class:`StopVote`, the same vote started at one step and completed at the next (non-blocking),
so that it costs no round trip of its own. The trainer then writes the checkpoint of that step,
reports ``preempted`` to the launcher and every rank exits with :data:`EXIT_CODE` (143, as a shell
reports SIGTERM); the launcher does not restart a preempted job (``--max-restarts``), and
``--resume auto`` continues bit-identically to an uninterrupted run.
"""

from __future__ import annotations

import contextlib
import signal
import threading

import numpy as np

EXIT_CODE = 143  #: what a preempted rank and launcher exit with (128 + SIGTERM)
SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

_flag = threading.Event()
_cause: list[str] = []


def request(cause: str = "requested") -> None:
    """Ask this rank to stop at the next step the ranks agree on (thread- and signal-safe)."""
    if not _flag.is_set():
        _cause.append(cause)
    _flag.set()


def requested() -> bool:
    """True once this rank was asked to stop (by a signal, the launcher or :func:`request`)."""
    return _flag.is_set()


def cause() -> str | None:
    """What asked this rank to stop first (``'SIGTERM'``, ``'the launcher (SIGUSR1)'``, ...)."""
    return _cause[0] if _cause else None


def reset() -> None:
    """Forget a request (tests, or a program that runs several trainings in one process)."""
    _flag.clear()
    _cause.clear()


def agreed(comm) -> bool:
    """True on every rank when any rank was asked to stop; collective (call once per step).

    One ``max`` allreduce of a single float64 on the communicator: a few microseconds on
    shared memory, one latency on a network.
    """
    if comm.size == 1:
        return _flag.is_set()
    vote = np.array([1.0 if _flag.is_set() else 0.0])
    return bool(comm.allreduce(vote, op="max")[0] > 0)


def who_asked(comm) -> str:
    """Which rank was asked to stop, and by what (``'rank 1 received SIGUSR1'``, ``'the
    launcher (SIGTERM)'``); collective: call it on every rank once the ranks agreed to stop."""
    causes = comm.allgather_obj(cause()) if comm.size > 1 else [cause()]
    first = next(((rank, c) for rank, c in enumerate(causes) if c), None)
    if first is None:
        return "requested"
    rank, text = first
    return text if text.startswith("the launcher") else f"rank {rank} received {text}"


class StopVote:
    """The per-step agreement of :func:`agreed`, overlapped with the next step.

    :meth:`step` (once per optimizer step, on every rank) completes the vote started at the
    previous step and starts the next one (a non-blocking 8-byte ``max`` allreduce that the
    step's own gradient allreduce carries along), so the agreement costs no round trip of its
    own; the ranks stop one step after the flag was first seen, all at the same step. Call
    :meth:`drain` before anything that is not a step (epoch ends) so the vote in flight does not
    outlive the loop.
    """

    def __init__(self, comm):
        self.comm = comm
        self._vote = np.zeros(1)
        self._pending = None

    def step(self) -> bool:
        """True on every rank at the same step once any rank's flag was up (collective)."""
        if self.comm.size == 1:
            return _flag.is_set()
        stop = self.drain()
        if not stop:
            self._vote[0] = 1.0 if _flag.is_set() else 0.0
            self._pending = self.comm.iallreduce(self._vote, op="max")
        return stop

    def drain(self) -> bool:
        """Complete the vote in flight; its outcome (False when none was in flight)."""
        if self._pending is None:
            return False
        self._pending.wait()
        self._pending = None
        return bool(self._vote[0] > 0)


@contextlib.contextmanager
def handling():
    """Within the block, SIGTERM and SIGUSR1 raise the flag instead of ending the process.

    On the main thread only (elsewhere Python cannot install handlers: the block then changes
    nothing). The previous handlers come back at the end. A repeated signal changes nothing (the
    launcher and ``srun`` may both pass the same preemption on); SIGKILL still ends a rank that
    does not stop.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {}

    def handler(signum, frame):
        request(signal.Signals(signum).name)

    for sig in SIGNALS:
        previous[sig] = signal.signal(sig, handler)
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)
