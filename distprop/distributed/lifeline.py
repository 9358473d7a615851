"""A rank's side of a supervised job, and the MPI initialisation timeout.

Both start in :func:`distprop.distributed.init` *before* MPI is initialised, when the rank number
is only known from the launcher's environment (``PMI_RANK``, ``OMPI_COMM_WORLD_RANK``,
``PMIX_RANK``, ``SLURM_PROCID``).

* :class:`Lifeline` -- under ``distprop launch``/``train -n N`` (``DISTPROP_SUPERVISOR`` is set,
  see :mod:`distprop.control_channel`) the rank connects to its launcher, registers its rank,
  PID and host, and reports "MPI is up", an initialisation timeout, or a non-zero exit that
  aborts the job. A daemon thread waits on the connection: when it closes, the launcher is gone
  (killed, even by SIGKILL, on any host) and the rank exits at once instead of training on
  unowned.
  The same thread takes the launcher's messages: ``preempt`` (raise this rank's preemption flag,
  :mod:`distprop.distributed.preemption`), ``query`` (answer where this rank is: collectives
  entered, the one it is blocked in) and ``stall-report`` (the answer to :func:`survey`, which a
  rank's stall watchdog asks before aborting, to name the ranks it did not hear from).
* :class:`InitTimer` -- ``DISTPROP_INIT_TIMEOUT`` seconds (default 45; 0 disables) for MPI
  initialisation to complete. A rank that died before ``dist.init()`` leaves the others spinning
  inside ``MPI_Init`` forever, where no collective (and so no stall watchdog) runs; past the
  limit each waiting rank prints which rank it is and that some rank did not arrive, and exits
  with status 1, which ends the job under any launcher.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import threading

from distprop.info import launched_rank, launched_size
from distprop.reaper import MPI_SHM_PREFIXES, mapped_mpi_files, unlink_all

ENV_VAR = "DISTPROP_SUPERVISOR"  # same name as distprop.control_channel.ENV_VAR (kept import-light)
INIT_TIMEOUT_VAR = "DISTPROP_INIT_TIMEOUT"
DEFAULT_INIT_TIMEOUT = 45.0  # ranks of one job reach init() within seconds; a minute-long wait
#: means a rank is gone. Raise it (or set 0) for jobs whose ranks start minutes apart.
CONNECT_TIMEOUT = 10.0
LOST_LAUNCHER_STATUS = 1


def _say(rank, text: str) -> None:
    try:
        sys.stderr.write(f"[rank {'?' if rank is None else rank}] distprop: {text}\n")
        sys.stderr.flush()
    except Exception:
        pass


def _flush_and_exit(status: int) -> None:
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:
            pass
    os._exit(status)


class Lifeline:
    """The connection from this rank to its launcher (see the module docstring).

    Args:
        address: ``host:port:token`` from ``DISTPROP_SUPERVISOR``.
        rank: this rank (from the launcher's environment).
        size: the world size the launcher announced (None if unknown).
    """

    def __init__(self, address: str, rank: int, size: int | None):
        host, port, token = address.rsplit(":", 2)
        self.rank, self.address = rank, f"{host}:{port}"
        self._lock = threading.Lock()
        self._survey_done, self._survey_answer = threading.Event(), None
        hello = (json.dumps({"event": "hello", "token": token, "rank": rank, "size": size,
                             "pid": os.getpid(), "host": socket.gethostname()}) + "\n").encode()
        errors = []
        for name in dict.fromkeys([host, "127.0.0.1"]):  # the launcher may be on this host
            try:
                self._sock = _handshake(name, int(port), hello)
                break
            except OSError as exc:
                errors.append(f"{name}: {exc}")
        else:
            raise OSError("; ".join(errors))
        self._thread = threading.Thread(target=self._watch, name="distprop-lifeline",
                                        daemon=True)
        self._thread.start()

    def report(self, event: str, **fields) -> None:
        """Send one event to the launcher (errors are ignored: the launcher may be gone)."""
        line = (json.dumps({"event": event, **fields}) + "\n").encode()
        with self._lock:
            try:
                self._sock.sendall(line)
            except OSError:
                pass

    def _watch(self) -> None:
        buffer = b""
        while True:
            try:
                data = self._sock.recv(4096)
            except InterruptedError:
                continue
            except OSError:
                data = b""
            if not data:
                break
            buffer += data
            while b"\n" in buffer:
                line, buffer = buffer.split(b"\n", 1)
                self._handle(line)
            buffer = buffer[-65536:]
        _say(self.rank, f"the launcher (distprop at {self.address}) is gone; ending this rank "
             "so that it does not run on unowned")
        # the whole job ends so, without MPI_Finalize: no peer attaches to these files any more
        unlink_mapped_mpi_files()
        _flush_and_exit(LOST_LAUNCHER_STATUS)

    def _handle(self, line: bytes) -> None:
        """A message from the launcher: ``preempt``, ``query`` (answered with this rank's
        collective state) or ``stall-report`` (the answer to :meth:`survey`)."""
        try:
            msg = json.loads(line)
        except ValueError:
            return
        if not isinstance(msg, dict):
            return
        event = msg.get("event")
        if event == "preempt":
            from distprop.distributed import preemption

            preemption.request(f"the launcher ({msg.get('signal', 'SIGTERM')})")
        elif event == "query":
            self.report("status", id=msg.get("id"), **_probe())
        elif event == "stall-report":
            self._survey_answer = msg
            self._survey_done.set()

    def survey(self, timeout: float) -> dict | None:
        """Ask the launcher which ranks still answer and where each one is (see
        :class:`distprop.control_channel.Supervisor`); None if no answer within ``timeout``."""
        self._survey_done = threading.Event()
        self._survey_answer = None
        self.report("stall", **_probe())
        if not self._survey_done.wait(timeout):
            return None
        return self._survey_answer

def _handshake(host: str, port: int, hello: bytes) -> socket.socket:
    """Connect, register, and wait for the launcher's ``ok`` (a stranger on that port that
    hangs up must not read as "the launcher died")."""
    sock = socket.create_connection((host, port), timeout=CONNECT_TIMEOUT)
    try:
        sock.sendall(hello)
        reply = b""
        while not reply.endswith(b"\n") and len(reply) < 16:
            chunk = sock.recv(16)
            if not chunk:
                break
            reply += chunk
        if reply != b"ok\n":
            raise OSError(f"unexpected reply {reply[:16]!r}")
        sock.settimeout(None)
        return sock
    except BaseException:
        sock.close()
        raise


_lifeline: Lifeline | None = None


def connect() -> Lifeline | None:
    """Connect to the launcher named by ``DISTPROP_SUPERVISOR`` (once); None when not set.

    A launcher that cannot be reached costs one line on stderr, not the run.
    """
    global _lifeline
    address = os.environ.get(ENV_VAR)
    if _lifeline is not None or not address:
        return _lifeline
    rank = launched_rank()
    if rank is None:
        return None
    try:
        _lifeline = Lifeline(address, rank, launched_size())
    except (OSError, ValueError) as exc:
        _say(rank, f"cannot reach the launcher at {address.rsplit(':', 1)[0]} ({exc}); this "
             "rank will not stop by itself if the launcher dies")
    return _lifeline


_probe_comm = None


def watch_communicator(comm) -> None:
    """Answer the launcher's stall survey with ``comm``'s state (see :func:`_probe`)."""
    global _probe_comm
    _probe_comm = comm


def _probe() -> dict:
    """Where this rank is: blocking collectives entered, and the one it is blocked in (if any)
    with the seconds it has waited there. Read from another thread: no locks, no MPI."""
    import time

    comm = _probe_comm
    if comm is None:
        return {"count": None, "current": None, "waited": None}
    current = comm.current
    return {"count": getattr(comm, "collectives", None),
            "current": current[0] if current else None,
            "waited": round(time.monotonic() - current[2], 1) if current else None}


def survey(timeout: float = 8.0) -> dict | None:
    """The launcher's answer to "who is missing?" (None without a launcher or an answer)."""
    if _lifeline is None:
        return None
    return _lifeline.survey(timeout)


def report(event: str, **fields) -> None:
    """Tell the launcher about ``event`` when this rank has a lifeline (else do nothing)."""
    if _lifeline is not None:
        _lifeline.report(event, **fields)


def init_timeout_from_env() -> float | None:
    """``DISTPROP_INIT_TIMEOUT`` in seconds (0 disables; default 45).

    Raises:
        ValueError: the variable is not a number.
    """
    raw = os.environ.get(INIT_TIMEOUT_VAR, "").strip()
    if not raw:
        return DEFAULT_INIT_TIMEOUT
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"{INIT_TIMEOUT_VAR} must be a number of seconds (0 disables), got "
                         f"{raw!r}") from None
    return value if value > 0 else None


def unlink_mapped_mpi_files(prefixes=MPI_SHM_PREFIXES) -> list[str]:
    """Remove the names of the MPI shared-memory files (``prefixes``, by default every kind
    :mod:`distprop.reaper` knows) this process maps; the memory stays with the processes that
    map it. Returns the paths. Only for a job that is ending, except for MPICH's start-up
    segment, which every local rank maps during initialisation."""
    return unlink_all(mapped_mpi_files("self", prefixes))


class InitTimer:
    """Exits this rank when MPI initialisation has not completed within ``timeout`` seconds.

    Call :meth:`start` just before MPI is initialised and :meth:`done` right after.
    """

    def __init__(self, timeout: float, rank: int | None, size: int | None):
        self.timeout, self.rank, self.size = float(timeout), rank, size
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, name="distprop-init-timer",
                                        daemon=True)

    def start(self) -> InitTimer:
        self._thread.start()
        return self

    def done(self) -> None:
        self._done.set()

    def _run(self) -> None:
        if self._done.wait(self.timeout):
            return
        world = f"of the {self.size} " if self.size else ""
        _say(self.rank, f"rank {self.rank} waited {self.timeout:g} s for MPI initialisation "
             f"({INIT_TIMEOUT_VAR}): some rank {world}did not arrive (it exited or is stuck "
             "before dist.init()); exiting with status 1")
        report("init-timeout", waited=self.timeout)
        # MPI_Init created (and mapped) MPICH's start-up segment before it began waiting for
        # the missing rank; the job ends without MPI_Finalize, which would have removed it
        unlink_mapped_mpi_files()
        _flush_and_exit(1)


def _libmpi_init_thread():
    """``MPI_Init_thread`` of the MPI library mpi4py loaded, as a ctypes function (or None).

    A ctypes call releases the GIL, so the init timer's thread runs while this thread waits
    inside MPI initialisation; mpi4py's own initialisation holds the GIL throughout.
    """
    import ctypes

    candidates = []
    try:
        with open("/proc/self/maps") as maps:
            for line in maps:
                path = line.split()[-1]
                name = os.path.basename(path)
                if "mpi" in name.lower() and ".so" in name and path not in candidates:
                    candidates.append(path)
    except OSError:
        pass
    candidates.sort(key=lambda p: not os.path.basename(p).startswith("libmpi"))
    for path in [*candidates, None]:
        try:
            func = ctypes.CDLL(path).MPI_Init_thread
        except (OSError, AttributeError):
            continue
        func.restype = ctypes.c_int
        return func
    return None


def initialize_mpi() -> None:
    """Initialise MPI (as mpi4py would, at its ``rc.thread_level``) without holding the GIL.

    Does nothing when ``mpi4py.MPI`` was already imported (MPI is then initialised, or the
    program manages it). When the MPI library cannot be called directly, falls back to
    mpi4py's ``Init_thread`` and arms :mod:`faulthandler` to dump the stacks and exit with
    status 1 past ``DISTPROP_INIT_TIMEOUT`` (the init timer's thread cannot run then).
    """
    import atexit
    import ctypes

    if "mpi4py.MPI" in sys.modules:
        return
    import mpi4py

    if mpi4py.rc.initialize is False:  # the program initialises MPI itself
        return
    mpi4py.rc.initialize = False
    from mpi4py import MPI

    levels = {"single": MPI.THREAD_SINGLE, "funneled": MPI.THREAD_FUNNELED,
              "serialized": MPI.THREAD_SERIALIZED, "multiple": MPI.THREAD_MULTIPLE}
    level = levels.get(str(mpi4py.rc.thread_level).lower(), MPI.THREAD_MULTIPLE)
    if not mpi4py.rc.threads:
        level = MPI.THREAD_SINGLE
    init_thread = _libmpi_init_thread()
    if init_thread is not None:
        provided = ctypes.c_int(0)
        code = init_thread(None, None, ctypes.c_int(level), ctypes.byref(provided))
        if code != 0 or not MPI.Is_initialized():
            raise RuntimeError(f"MPI_Init_thread failed with error code {code}")
    else:
        timeout = init_timeout_from_env() if launched_size() > 1 else None
        if timeout is not None:
            import faulthandler

            faulthandler.dump_traceback_later(timeout, exit=True)
        MPI.Init_thread(level)
        if timeout is not None:
            faulthandler.cancel_dump_traceback_later()

    def finalize() -> None:  # mpi4py finalises only what it initialised
        if MPI.Is_initialized() and not MPI.Is_finalized():
            MPI.Finalize()

    atexit.register(finalize)


def start_init_timer() -> InitTimer | None:
    """An :class:`InitTimer` for this rank, when more than one rank was launched and the
    timeout is on."""
    size = launched_size()
    timeout = init_timeout_from_env()
    if timeout is None or size <= 1:
        return None
    return InitTimer(timeout, launched_rank(), size).start()


def missing_ranks(report: dict, me: int) -> list[str]:
    """From a launcher's stall report, one phrase per rank that rank ``me`` is waiting for.

    A rank is missing when it did not answer the launcher (stopped, dead, its host or link
    down), or answered from somewhere other than the collective ``me`` is blocked in (not in a
    collective, or at another count of collectives). Ranks blocked at the same point are not.
    """
    rows = {row["rank"]: row for row in report.get("ranks", []) if isinstance(row, dict)}
    mine = rows.get(me, {})
    phrases = []
    for rank in sorted(rows):
        row = rows[rank]
        if rank == me:
            continue
        where = f"PID {row['pid']} on {row['host']}" if row.get("pid") else "never registered"
        if not row.get("answered"):
            why = ("gone: its connection to the launcher closed" if row.get("gone")
                   else "no answer: stopped, hung, or its host or link is down")
        elif row.get("current") is None:
            why = (f"alive but in no collective after {row.get('count')} collective(s) "
                   "(busy, or on another code path)")
        elif row.get("count") != mine.get("count") or row.get("current") != mine.get("current"):
            why = (f"alive, in '{row.get('current')}' after {row.get('count')} collective(s), "
                   f"this rank in '{mine.get('current')}' after {mine.get('count')}")
        else:
            continue  # waiting in the same collective: not the one missing
        phrases.append(f"rank {rank} ({where}; {why})")
    return phrases
