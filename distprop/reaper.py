"""A one-job reaper between ``distprop`` and an MPI launcher that does not clean up reliably.

Run as ``python -I reaper.py FD -- mpiexec ...`` (standard library only, so it starts in a few
tens of milliseconds). It starts the launcher, passes signals on to it and ends with its status
(re-raising the signal that killed it). ``FD`` is the read end of a pipe whose only write end is
held by ``distprop``: end of file there means ``distprop`` died, even by SIGKILL.

Why: ``prctl(PR_SET_PDEATHSIG)`` on the launcher (:func:`distprop.supervise.parent_death_signal`)
is re-sent each time the child is handed from one dying thread of the multi-threaded
``distprop`` to the next, so ``prterun`` (Open MPI 5) often gets SIGTERM twice; it takes the
second one as "abort now" and exits without stopping its ranks (and it also exits when writing
its notice hits the broken output pipe). Ranks that called ``dist.init()`` notice through their
lifeline, but a rank still in interpreter start-up, in ``MPI_Init`` or one that never uses
distprop would run on. The reaper sends exactly one SIGTERM to the launcher when ``distprop``
dies, and, as a child subreaper (``PR_SET_CHILD_SUBREAPER``), adopts whatever the launcher
leaves behind when it exits and stops it (SIGTERM, then SIGKILL after :data:`GRACE` seconds).

A job that ends that way ends without ``MPI_Finalize``, which is where MPI libraries remove their
shared-memory files (Open MPI's ``/dev/shm/sm_segment.*``, 16 MiB per rank), and a prterun
stopped that way does not clean up after its ranks either. So the reaper notes the MPI files
(:data:`MPI_SHM_PREFIXES`) that the job's processes map before it stops anything, and removes
those still there once they are all gone. Files of any other name are never touched.
"""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import time

GRACE = 2.0  # seconds between SIGTERM and SIGKILL, for the launcher and for orphans
FORWARDED = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2, signal.SIGHUP)
_PR_SET_CHILD_SUBREAPER = 36
# Shared-memory files MPI libraries create and remove only in MPI_Finalize: MPICH's start-up
# segment, Open MPI 5's btl/sm segments, Open MPI 4's vader segments.
MPICH_STARTUP_PREFIX = "/dev/shm/mpich_shm_"
MPI_SHM_PREFIXES = (MPICH_STARTUP_PREFIX, "/dev/shm/sm_segment.", "/dev/shm/vader_segment.")


def _subreaper() -> None:
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    except (OSError, AttributeError):
        pass


def descendants() -> list[int]:
    """PIDs of this process's descendants (children first), from ``/proc``."""
    found, todo = [], [os.getpid()]
    while todo:
        parent = todo.pop()
        try:
            tasks = os.listdir(f"/proc/{parent}/task")
        except OSError:
            continue
        for task in tasks:
            try:
                with open(f"/proc/{parent}/task/{task}/children") as f:
                    kids = [int(k) for k in f.read().split()]
            except OSError:
                continue
            found += kids
            todo += kids
    return found


def mapped_mpi_files(pid="self", prefixes=MPI_SHM_PREFIXES) -> list[str]:
    """The files named by ``prefixes`` that process ``pid`` maps (not yet unlinked), once each."""
    try:
        with open(f"/proc/{pid}/maps") as f:
            lines = f.read().splitlines()
    except OSError:
        return []
    found = []
    for line in lines:
        parts = line.split(maxsplit=5)
        if (len(parts) == 6 and parts[5].startswith(prefixes)
                and not parts[5].endswith("(deleted)") and parts[5] not in found):
            found.append(parts[5])
    return found


def unlink_all(paths) -> list[str]:
    """Remove each path that is still there; returns those removed."""
    removed = []
    for path in dict.fromkeys(paths):
        try:
            os.unlink(path)
            removed.append(path)
        except OSError:
            pass
    return removed


def _mpi_files_of_descendants() -> list[str]:
    return [path for pid in descendants() for path in mapped_mpi_files(pid)]


def _reap() -> None:
    """Collect every exited child (adopted orphans included) without blocking."""
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


def stop_leftovers(grace: float = GRACE) -> list[str]:
    """SIGTERM every descendant, then SIGKILL those still there after ``grace`` seconds.
    Returns the MPI shared-memory files they mapped (see the module docstring)."""
    files = _mpi_files_of_descendants()
    for sig in (signal.SIGTERM, signal.SIGKILL):
        pids = descendants()
        if not pids:
            return files
        for pid in pids:
            try:
                os.kill(pid, sig)
            except OSError:
                pass
        deadline = time.monotonic() + (grace if sig == signal.SIGTERM else 1.0)
        while time.monotonic() < deadline:
            _reap()
            if not descendants():
                return files
            time.sleep(0.05)
    return files


def main(argv: list[str]) -> int:
    if len(argv) < 3 or argv[1] != "--":
        print("usage: reaper.py FD -- COMMAND...", file=sys.stderr)
        return 2
    lifeline = int(argv[0])
    _subreaper()
    child = subprocess.Popen(argv[2:])  # same session and output as this process

    def forward(signum, _frame):
        try:
            child.send_signal(signum)
        except ProcessLookupError:
            pass

    for sig in FORWARDED:
        signal.signal(sig, forward)
    watched = [lifeline]
    try:
        pidfd = os.pidfd_open(child.pid)
        watched.append(pidfd)
    except (AttributeError, OSError):
        pidfd = None
    orphaned, files = False, []
    while child.poll() is None:
        try:
            ready, _, _ = select.select(watched, [], [], 0.2 if pidfd is None else None)
        except InterruptedError:
            continue
        if lifeline in ready and not os.read(lifeline, 64):  # distprop is gone
            orphaned = True
            break
    if orphaned:
        files = _mpi_files_of_descendants()  # before anything stops: the job is ending
        child.send_signal(signal.SIGTERM)  # once: a second one makes prterun skip its ranks
        try:
            child.wait(GRACE)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()
    code = child.returncode
    files += stop_leftovers()  # whatever the launcher left behind, adopted by this subreaper
    _reap()
    if files and not descendants():  # the processes that mapped them are all gone
        unlink_all(files)
    if code < 0:  # die the same way, so that distprop reads the same status
        try:
            signal.signal(-code, signal.SIG_DFL)
        except (OSError, ValueError):  # SIGKILL, SIGSTOP: cannot be caught anyway
            pass
        os.kill(os.getpid(), -code)
        return 128 - code
    return code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
