"""Guards that turn distributed failures into prompt, explained exits instead of hangs.

* :func:`install_excepthook` -- an uncaught exception on any rank prints that rank's traceback
  once, every line prefixed ``[rank r]``, then aborts the whole MPI job (``MPI_Abort``), so the
  other ranks do not wait forever in their next collective. :func:`abort_on_exception` is the
  same as a context manager.
* :class:`StallWatchdog` -- a daemon thread that watches the collective the communicator is
  blocked in; past the limit (argument or ``DISTPROP_STALL_TIMEOUT``, else max(60 s, 20 x the
  slowest step), 600 s before the first step) it prints which collective, on which rank, which
  ranks it did not hear from (asking the launcher), where the main thread is, and aborts the
  job (exit code 1).
* :func:`install_exit_guard` -- ``sys.exit(n)`` with ``n != 0`` on one rank, after ``init()``,
  aborts the whole job with status ``n`` within seconds, instead of leaving that rank in
  ``MPI_Finalize`` and the others in their next collective until the stall watchdog fires.
* :func:`check_replicas` -- compares a checksum of a parameter buffer across ranks and names the
  ranks that diverged from rank 0.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import sys
import threading
import time
import traceback
import zlib

import numpy as np

from distprop import backend
from distprop.distributed.comm import Communicator

DEFAULT_STALL_TIMEOUT = 600.0
_ABORT_DELAY = 0.5  # lets ranks that fail at the same moment print before the job is torn down


def _prefixed(rank: int, text: str) -> str:
    return "".join(f"[rank {rank}] {line}\n" for line in text.rstrip("\n").split("\n"))


def report_and_abort(comm: Communicator, etype, value, tb, code: int = 1) -> None:
    """Print the traceback once, each line prefixed with the rank, then abort the job."""
    text = "".join(traceback.format_exception(etype, value, tb))
    header = (f"uncaught {etype.__name__} on rank {comm.rank} of {comm.size}; aborting the job "
              "(MPI_Abort)\n")
    try:
        sys.stderr.write(_prefixed(comm.rank, header + text))
        sys.stderr.flush()
    except Exception:
        pass
    if comm.size > 1:
        time.sleep(_ABORT_DELAY)
    comm.abort(code)


_installed: dict = {}


def install_excepthook(comm: Communicator) -> None:
    """Make an uncaught exception on this rank abort the whole job (idempotent)."""
    if _installed.get("comm") is comm:
        return
    previous = _installed.get("previous", sys.excepthook)

    def hook(etype, value, tb):
        if issubclass(etype, SystemExit):  # pragma: no cover - SystemExit never gets here
            previous(etype, value, tb)
            return
        report_and_abort(comm, etype, value, tb)

    _installed.update(comm=comm, previous=previous, hook=hook)
    sys.excepthook = hook


def uninstall_excepthook() -> None:
    """Restore the exception hook that was active before :func:`install_excepthook`."""
    if _installed.get("hook") is sys.excepthook:
        sys.excepthook = _installed["previous"]
    _installed.clear()


@contextlib.contextmanager
def abort_on_exception(comm: Communicator):
    """Any exception escaping the block prints ``[rank r]`` traceback and aborts the job.

    ``KeyboardInterrupt`` aborts with code 130 and ``sys.exit(n)`` with ``n != 0`` aborts with
    ``n``, so a rank that stops alone never leaves the others waiting in a collective (outside
    this block, ``init()``'s :func:`install_exit_guard` does the same for ``sys.exit(n)``
    after a short grace).
    """
    try:
        yield
    except Exception:
        report_and_abort(comm, *sys.exc_info())
    except KeyboardInterrupt:
        if comm.size == 1:
            raise
        report_and_abort(comm, *sys.exc_info(), code=130)
    except SystemExit as exc:  # sys.exit(n) on one rank: the others would wait in a collective
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        if code == 0 or comm.size == 1:
            raise
        try:
            sys.stderr.write(_prefixed(comm.rank, f"rank {comm.rank} of {comm.size} called "
                                       f"sys.exit({exc.code!r}); aborting the job (MPI_Abort)"))
            sys.stderr.flush()
        except Exception:
            pass
        time.sleep(_ABORT_DELAY)
        comm.abort(code)


EXIT_GRACE = 3.0  # seconds the ranks leaving with a non-zero status wait for each other
_exit_guard: dict = {}


def _status(code) -> int:
    """The process exit status ``sys.exit(code)`` produces."""
    if code is None:
        return 0
    if isinstance(code, int):
        return code & 0xFF
    return 1  # sys.exit("message") prints it and exits 1


def install_exit_guard(comm: Communicator, grace: float = EXIT_GRACE) -> None:
    """Make ``sys.exit(n)`` (``n != 0``) on one rank end the whole job with status ``n``.

    ``sys.exit`` is wrapped to remember the status, and an exit handler, registered after
    mpi4py's ``MPI_Finalize`` handler so it runs first, checks whether the other ranks are
    leaving too: every rank leaving with a non-zero status posts a non-blocking barrier on a
    private communicator. If all ranks arrive within ``grace`` seconds (a usage error seen by
    every rank, say) MPI finalises normally and the status stands; otherwise this rank prints why
    and calls ``MPI_Abort(n)``, so ``mpiexec`` (and ``distprop launch``) return ``n`` at once.
    A rank leaving with status 0 finalises as usual. Only ``sys.exit`` on the main thread is
    seen: ``raise SystemExit(n)`` written out is not (the stall watchdog still ends such a job),
    and a ``sys.exit(n)`` whose ``SystemExit`` was caught still counts at exit. Idempotent;
    no-op for a world of one or a communicator without MPI.
    """
    mpi = getattr(comm, "MPI", None)
    if comm.size == 1 or mpi is None or _exit_guard.get("comm") is comm:
        return
    private = comm.comm.Dup()  # collective: every rank calls init(), so every rank gets here
    original = _exit_guard.get("original", sys.exit)

    def exit(status=None):  # stands in for sys.exit
        if threading.current_thread() is threading.main_thread():  # elsewhere it ends a thread
            _exit_guard["status"] = _status(status)
        original(status)

    def leave() -> None:
        status = _exit_guard.get("status", 0)
        if not status or _exit_guard.get("comm") is not comm or mpi.Is_finalized():
            return
        request = private.Ibarrier()
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline:
            if request.Test():
                return  # every rank is leaving: finalise normally, keep the status
            time.sleep(0.01)
        from distprop.distributed import lifeline

        lifeline.report("exit", code=status)
        try:
            sys.stderr.write(_prefixed(comm.rank, (
                f"rank {comm.rank} of {comm.size} is leaving with status {status} (sys.exit) "
                f"while other ranks are still running; aborting the job (MPI_Abort({status}))")))
            sys.stderr.flush()
        except Exception:
            pass
        comm.abort(status)

    _exit_guard.update(comm=comm, original=original, status=0)
    sys.exit = exit
    atexit.register(leave)


FIRST_STEP_STALL_TIMEOUT = 600.0  # before the first optimizer step: data loading, JIT, warm-up
MIN_STALL_TIMEOUT = 60.0
STEP_FACTOR = 20.0


def stall_timeout_from_env(default: float | None = DEFAULT_STALL_TIMEOUT) -> float | None:
    """``DISTPROP_STALL_TIMEOUT`` in seconds (0 or empty disables), else ``default``."""
    raw = os.environ.get("DISTPROP_STALL_TIMEOUT")
    if raw is None:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"DISTPROP_STALL_TIMEOUT must be a number of seconds, got {raw!r}") \
            from None
    return value if value > 0 else None


class StallWatchdog:
    """Aborts the job when the communicator stays inside one collective past the limit.

    With a fixed ``timeout`` (argument or ``DISTPROP_STALL_TIMEOUT``) that is the limit.
    Without one (``adaptive=True``) the limit follows the job: 600 s until the first optimizer
    step completes (loading data, building the model, the first step), then
    ``max(60 s, 20 x the slowest step so far)``, where the trainer reports each step's wall
    time (the interval between step ends, checkpoint writes included) through
    :func:`note_step`.

    Before aborting, a rank under ``distprop launch``/``train -n`` asks its launcher which ranks
    still answer and where they are (:func:`distprop.distributed.lifeline.survey`, a few
    seconds at most; a dead host does not answer and does not block it) and names the ranks it
    did not hear from, with their hosts.
    """

    def __init__(self, comm: Communicator, timeout: float, poll: float | None = None,
                 adaptive: bool = False):
        if timeout <= 0:
            raise ValueError(f"stall timeout must be positive, got {timeout}")
        self.comm, self.timeout, self.adaptive = comm, float(timeout), bool(adaptive)
        self.slowest_step: float | None = None
        self.poll = poll if poll is not None else min(1.0, self.timeout / 4)
        self._stop = threading.Event()
        self._main = threading.main_thread()
        self._thread = threading.Thread(target=self._run, name="distprop-stall-watchdog",
                                        daemon=True)

    @property
    def limit(self) -> float:
        """The current limit in seconds (see the class docstring)."""
        if not self.adaptive:
            return self.timeout
        if self.slowest_step is None:
            return FIRST_STEP_STALL_TIMEOUT
        return max(MIN_STALL_TIMEOUT, STEP_FACTOR * self.slowest_step)

    def note_step(self, seconds: float) -> None:
        """One optimizer step (from the previous step's end to this one's) took ``seconds``."""
        if self.slowest_step is None or seconds > self.slowest_step:
            self.slowest_step = float(seconds)

    def start(self) -> StallWatchdog:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        while not self._stop.wait(self.poll):
            current = self.comm.current
            if current is None:
                continue
            name, nbytes, since = current
            waited = time.monotonic() - since
            limit = self.limit
            if waited > limit and self.comm.current is current:
                self._fire(name, nbytes, waited, limit)

    def _limit_source(self, limit: float) -> str:
        if not self.adaptive:
            return "DISTPROP_STALL_TIMEOUT"
        if self.slowest_step is None:
            return "the first-step limit; set DISTPROP_STALL_TIMEOUT to change it"
        return (f"20 x the slowest step so far, {self.slowest_step:.3g} s, at least 60 s; set "
                "DISTPROP_STALL_TIMEOUT to change it")

    def _fire(self, name: str, nbytes: int, waited: float, limit: float | None = None) -> None:
        from distprop.distributed import lifeline

        limit = self.timeout if limit is None else limit
        frame = sys._current_frames().get(self._main.ident)
        stack = "".join(traceback.format_stack(frame)) if frame is not None else ""
        report = lifeline.survey()
        if report is None:
            missing = ("which rank is missing is unknown (no launcher's control channel to ask: "
                       "start the job with distprop launch or distprop train -n)")
        else:
            phrases = lifeline.missing_ranks(report, self.comm.rank)
            missing = ("not heard from: " + "; ".join(phrases) if phrases else
                       "every rank answered its launcher from this same collective")
        msg = (
            f"stall watchdog: rank {self.comm.rank} has waited {waited:.1f} s in collective "
            f"'{name}' ({nbytes} bytes), more than the {limit:g} s limit "
            f"({self._limit_source(limit)}); {missing}. Aborting the job (exit code "
            f"{STALL_EXIT_CODE}). Main thread stack:\n" + stack
        )
        try:
            sys.stderr.write(_prefixed(self.comm.rank, msg))
            sys.stderr.flush()
        except Exception:
            pass
        self.comm.abort(STALL_EXIT_CODE)


STALL_EXIT_CODE = 1
_active: list = []


def start_watchdog(comm: Communicator, timeout: float | None = None) -> StallWatchdog | None:
    """Start a :class:`StallWatchdog`: a fixed limit from the argument or
    ``DISTPROP_STALL_TIMEOUT`` (0 disables), else the adaptive one (600 s until the first
    optimizer step, then max(60 s, 20 x the slowest step)). None for a world of one. The rank
    also answers its launcher's stall survey from ``comm`` (watchdog on or off)."""
    from distprop.distributed import lifeline

    lifeline.watch_communicator(comm)  # the launcher's stall survey asks where this rank is
    adaptive = False
    if timeout is None:
        timeout = stall_timeout_from_env(default=None)
        if timeout is None and os.environ.get("DISTPROP_STALL_TIMEOUT") is None:
            timeout, adaptive = FIRST_STEP_STALL_TIMEOUT, True
    if timeout is None or timeout <= 0 or comm.size == 1:
        return None
    dog = StallWatchdog(comm, timeout, adaptive=adaptive).start()
    _active[:] = [dog]
    return dog


def note_step(seconds: float) -> None:
    """Tell the running stall watchdog (if any) how long an optimizer step took."""
    if _active:
        _active[0].note_step(seconds)


def state_checksum(array) -> int:
    """CRC-32 of the array's bytes (device arrays are copied to the host first)."""
    host = np.ascontiguousarray(backend.to_host(array))
    return zlib.crc32(memoryview(host.reshape(-1)).cast("B"))


def check_replicas(array, comm: Communicator, raise_on_mismatch: bool = True) -> list[int]:
    """Compare ``array`` (e.g. a flat parameter buffer) bit for bit across ranks.

    Returns the ranks whose checksum differs from rank 0's (the same list on every rank); with
    ``raise_on_mismatch`` a non-empty list raises ``RuntimeError`` on every rank.
    """
    if comm.size == 1:
        return []
    sums = comm.allgather_obj(state_checksum(array))
    diverged = [r for r, s in enumerate(sums) if s != sums[0]]
    if diverged and raise_on_mismatch:
        ranks = ", ".join(str(r) for r in diverged)
        raise RuntimeError(
            f"replica check failed: the parameters on rank(s) {ranks} differ from rank 0's "
            f"(CRC-32 {', '.join(f'{s:08x}' for s in sums)}). Replicas diverged: a rank skipped "
            "a step, used different hyper-parameters, or its parameters were changed outside "
            "the synchronised path."
        )
    return diverged
