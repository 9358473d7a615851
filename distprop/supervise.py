"""The launcher's side of a supervised job: it owns its ranks and says why the job ended.

:func:`run_job` is what ``distprop launch`` and ``distprop train -n N`` run (through
:func:`distprop.launcher.run`). Around the MPI launcher (``mpiexec``, ``mpirun``, ``srun``) it sets
up three things:

* **The launcher dies, the job dies.** On Linux the launcher child gets a parent-death signal
  (``prctl(PR_SET_PDEATHSIG, SIGTERM)``): if ``distprop`` is killed by any signal, even SIGKILL,
  the kernel sends SIGTERM to ``mpiexec``, which stops its ranks (Hydra's proxies also kill their
  ranks when ``mpiexec``'s control connection drops, on every host). Ranks that called
  ``dist.init()`` also hold a connection to the launcher (below) and exit when it closes, which
  covers launchers that leave their tasks running.
* **A control channel.** A TCP server (loopback for a one-node job, every interface with ``-H``,
  ``--hostfile`` or Slurm) whose address and a random token reach the ranks in
  ``DISTPROP_SUPERVISOR=host:port:token``. Each rank registers from ``dist.init()`` before MPI is
  initialised (rank from ``PMI_RANK``/``OMPI_COMM_WORLD_RANK``/``SLURM_PROCID``, its PID and
  host), then reports "MPI is up", an initialisation timeout, or a non-zero exit status. See
  :mod:`distprop.distributed.lifeline` for the rank's side. Lines are JSON; the first one of a
  connection must carry the token, anything else is dropped.
* **An explanation of the end.** Hydra (MPICH) prints a "BAD TERMINATION" banner with the PID,
  host and signal of a killed process on stdout and exits with the bare signal number; the
  launcher passes Hydra's stdout through, reads that banner, maps the PID to a rank with the
  registrations, prints one line (rank, host, PID, signal by name; for ``train`` that
  ``--resume auto`` continues from the last checkpoint) and returns 128 + the signal as a shell
  would (SIGKILL 137, SIGTERM 143). A rank that exited with a status, ranks that never reached
  ``dist.init()``, and a launcher stopped by SIGINT/SIGTERM (forwarded; 130/143) get their line
  too.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import selectors
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field

ENV_VAR = "DISTPROP_SUPERVISOR"
_MAX_LINE = 4096  # longest control message or banner line looked at


def signal_name(signum: int) -> str:
    """``9`` -> ``'SIGKILL'`` (``'signal 42'`` when the number has no name here)."""
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


# --- parent-death signal ------------------------------------------------------------------------

_PR_SET_PDEATHSIG = 1


def parent_death_signal(signum: int = signal.SIGTERM):
    """A ``preexec_fn`` that makes the child receive ``signum`` when this process dies.

    Linux only (``prctl(PR_SET_PDEATHSIG)`` through ctypes); returns None elsewhere or when libc
    cannot be loaded. The signal follows the death of the *thread* that started the child, so
    call ``Popen`` from a thread that lives as long as the job (the launcher's main thread).
    """
    if not sys.platform.startswith("linux"):
        return None
    try:
        import ctypes  # noqa: PLC0415

        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    parent = os.getpid()

    def preexec() -> None:  # runs in the child between fork and exec: no allocation-heavy work
        prctl(_PR_SET_PDEATHSIG, int(signum), 0, 0, 0)
        if os.getppid() != parent:  # the parent died before prctl took effect
            os.kill(os.getpid(), int(signum))

    return preexec


# --- the control channel ------------------------------------------------------------------------


@dataclass
class RankRecord:
    """What one rank told the launcher (times are ``time.monotonic()`` on the launcher)."""

    rank: int
    pid: int
    host: str
    size: int | None = None
    ready: bool = False  #: MPI initialised on this rank
    exit_code: int | None = None  #: non-zero status the rank reported when leaving
    timed_out: float | None = None  #: seconds it waited in MPI initialisation before giving up
    dropped: float | None = None  #: when its connection closed
    events: list = field(default_factory=list)


class Supervisor:
    """The control-channel server: ranks register and report; see the module docstring.

    Args:
        local: every rank runs on this machine (listen on loopback only).
        listen: False gives a supervisor without a channel (nothing registers).

    Raises:
        OSError: the server socket cannot be opened.
    """

    def __init__(self, local: bool = True, listen: bool = True):
        self.token = secrets.token_hex(16)
        self.ranks: dict[int, RankRecord] = {}
        self.order: list[tuple[float, int, str]] = []  # (time, rank, event) in arrival order
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._server = self._thread = None
        if not listen:
            return
        server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            server.bind(("127.0.0.1" if local else "0.0.0.0", 0))
            server.listen(128)
            server.setblocking(False)
        except OSError:
            server.close()
            raise
        self._server = server
        self.host = "127.0.0.1" if local else socket.gethostname()
        self.port = self._server.getsockname()[1]
        self._thread = threading.Thread(target=self._serve, name="distprop-supervisor",
                                        daemon=True)

    def env(self) -> dict[str, str]:
        """The variable that tells ranks where to register (empty without a channel)."""
        if self._server is None:
            return {}
        return {ENV_VAR: f"{self.host}:{self.port}:{self.token}"}

    def start(self) -> Supervisor:
        if self._thread is not None:
            self._thread.start()
        return self

    def close(self, timeout: float = 2.0) -> None:
        """Stop serving (after reading what is already buffered) and close every socket."""
        self._stop.set()
        if self._thread is not None and self._thread.is_alive():
            self._thread.join(timeout)
        try:
            if self._server is not None:
                self._server.close()
        except OSError:
            pass

    # -- server loop ------------------------------------------------------------------------------

    def _serve(self) -> None:
        sel = selectors.DefaultSelector()
        sel.register(self._server, selectors.EVENT_READ, None)
        buffers: dict[socket.socket, list] = {}  # conn -> [bytes, rank|None, opened at, conn]
        while True:
            stopping = self._stop.is_set()
            for key, _ in sel.select(timeout=0.05 if stopping else 0.2):
                if key.data is None:
                    try:
                        conn, _ = self._server.accept()
                    except OSError:
                        continue
                    conn.setblocking(False)
                    buffers[conn] = [b"", None, time.monotonic(), conn]
                    sel.register(conn, selectors.EVENT_READ, "conn")
                    continue
                conn = key.fileobj
                try:
                    chunk = conn.recv(65536)
                except (BlockingIOError, InterruptedError):
                    continue
                except OSError:
                    chunk = b""
                state = buffers[conn]
                if chunk:
                    state[0] += chunk
                    keep = self._lines(state)
                else:
                    keep = False
                if not keep:
                    if state[1] is not None:
                        self._note(state[1], "dropped")
                    sel.unregister(conn)
                    conn.close()
                    del buffers[conn]
            now = time.monotonic()
            for conn, state in list(buffers.items()):  # a stranger that never says hello
                if state[1] is None and now - state[2] > 10:
                    sel.unregister(conn)
                    conn.close()
                    del buffers[conn]
            if stopping:
                break
        for conn in buffers:
            conn.close()
        sel.close()

    def _lines(self, state: list) -> bool:
        """Handle the complete lines in ``state``'s buffer; False drops the connection."""
        while b"\n" in state[0]:
            raw, state[0] = state[0].split(b"\n", 1)
            try:
                msg = json.loads(raw)
            except ValueError:
                return False
            if not isinstance(msg, dict):
                return False
            if state[1] is None:
                rank = self._hello(msg)
                if rank is None:
                    return False
                state[1] = rank
                try:
                    state[3].send(b"ok\n")  # the rank knows it reached its own launcher
                except OSError:
                    return False
            else:
                self._event(state[1], msg)
        return len(state[0]) <= _MAX_LINE

    def _hello(self, msg: dict) -> int | None:
        if msg.get("token") != self.token or msg.get("event") != "hello":
            return None
        try:
            rank, pid = int(msg["rank"]), int(msg["pid"])
            size = int(msg["size"]) if msg.get("size") is not None else None
        except (KeyError, TypeError, ValueError):
            return None
        with self._lock:
            self.ranks[rank] = RankRecord(rank, pid, str(msg.get("host", "?")), size)
        self._note(rank, "hello")
        return rank

    def _event(self, rank: int, msg: dict) -> None:
        event = msg.get("event")
        with self._lock:
            record = self.ranks[rank]
            if event == "ready":
                record.ready = True
            elif event == "exit" and isinstance(msg.get("code"), int):
                record.exit_code = msg["code"]
            elif event == "init-timeout" and isinstance(msg.get("waited"), (int, float)):
                record.timed_out = float(msg["waited"])
            else:
                return
        self._note(rank, event)

    def _note(self, rank: int, event: str) -> None:
        with self._lock:
            now = time.monotonic()
            self.order.append((now, rank, event))
            if event == "dropped":
                self.ranks[rank].dropped = now

    # -- queries ---------------------------------------------------------------------------------

    def by_pid(self, pid: int, host: str | None = None) -> RankRecord | None:
        """The rank registered with ``pid`` (on ``host`` when several hosts reuse a PID)."""
        with self._lock:
            found = [r for r in self.ranks.values() if r.pid == pid]
        if len(found) > 1 and host:
            same = [r for r in found if _same_host(r.host, host)]
            found = same or found
        return found[0] if found else None

    def first(self, event: str) -> RankRecord | None:
        """The rank whose ``event`` arrived first."""
        with self._lock:
            for _, rank, name in self.order:
                if name == event:
                    return self.ranks[rank]
        return None


def _same_host(a: str, b: str) -> bool:
    return a.split(".")[0].lower() == b.split(".")[0].lower()


# --- Hydra's stdout ----------------------------------------------------------------------------

_BANNER_PID = re.compile(r"^=\s+PID (\d+) RUNNING AT (\S+)")
_BANNER_CODE = re.compile(r"^=\s+EXIT CODE: (\d+)")
_BANNER_SIGNAL = re.compile(r"EXIT STRING: .*\(signal (\d+)\)")
# Open MPI (prterun, on stderr): "... process rank 1 with PID 42 on node n1 exited on" and,
# wrapped onto the next line or not, "signal 9 (Killed)."
_OMPI_PID = re.compile(r"process rank \d+ with PID (\d+) on node (\S+) exited on(?: signal (\d+))?")
_OMPI_SIGNAL = re.compile(r"^\s*signal (\d+)\b")


@dataclass
class Banner:
    """What Hydra's "BAD TERMINATION" banner said about the first process that failed."""

    pid: int | None = None
    host: str | None = None
    exit_code: int | None = None
    signal: int | None = None


class OutputCopier:
    """Copies the launcher's stdout (or stderr) to ours byte for byte and reads Hydra's banner
    (Open MPI's note of a killed process) on the way."""

    def __init__(self, stream, sink_fd: int = 1):
        self.banner = Banner()
        self._ompi_pending = False
        self._stream, self._sink = stream, sink_fd
        self._partial = b""
        self._thread = threading.Thread(target=self._copy, name="distprop-output", daemon=True)

    def start(self) -> OutputCopier:
        self._thread.start()
        return self

    def join(self, timeout: float) -> None:
        self._thread.join(timeout)

    def _copy(self) -> None:
        fd = self._stream.fileno()
        while True:
            try:
                chunk = os.read(fd, 65536)
            except InterruptedError:
                continue
            except OSError:
                break
            if not chunk:
                break
            if not _write_all(self._sink, chunk):
                # Our stdout is gone (``distprop launch ... | head``): close the pipe so the
                # launcher gets SIGPIPE on its next write, as it would have without us.
                self._stream.close()
                return
            self._scan(chunk)
        self._scan(b"\n")

    def _scan(self, chunk: bytes) -> None:
        lines = (self._partial + chunk).split(b"\n")
        self._partial = lines.pop()[-_MAX_LINE:]
        for raw in lines:
            line = raw[-_MAX_LINE:].decode("utf-8", "replace").rstrip("\r")
            found = _BANNER_PID.search(line)
            if found and self.banner.pid is None:
                self.banner.pid, self.banner.host = int(found.group(1)), found.group(2)
            found = _BANNER_CODE.search(line)
            if found and self.banner.exit_code is None:
                self.banner.exit_code = int(found.group(1))
            found = _BANNER_SIGNAL.search(line)
            if found and self.banner.signal is None:
                self.banner.signal = int(found.group(1))
            self._scan_open_mpi(line)

    def _scan_open_mpi(self, line: str) -> None:
        found = _OMPI_SIGNAL.search(line) if self._ompi_pending else None
        if found:
            self.banner.signal, self._ompi_pending = int(found.group(1)), False
            return
        found = _OMPI_PID.search(line)
        if found and self.banner.pid is None:
            self.banner.pid, self.banner.host = int(found.group(1)), found.group(2)
            if found.group(3):
                self.banner.signal = int(found.group(3))
            self._ompi_pending = found.group(3) is None


def _write_all(fd: int, data: bytes) -> bool:
    view = memoryview(data)
    while view:
        try:
            view = view[os.write(fd, view):]
        except InterruptedError:
            continue
        except OSError:
            return False
    return True


# --- running and explaining ---------------------------------------------------------------------


def run_job(argv: list[str], env: dict[str, str], implementation: str, local: bool = True,
            resume_hint: str | None = None, stdin=None) -> int:
    """Run the launcher command under supervision; returns the job's exit code.

    Args:
        argv: the launcher command line.
        env: the complete environment for it.
        implementation: ``mpich``, ``openmpi`` or ``srun`` (Hydra's banner is read for mpich;
            Open MPI gets ``-x DISTPROP_SUPERVISOR`` so its ranks see the variable).
        local: every rank runs on this machine (the control channel stays on loopback).
        resume_hint: when a rank was killed, say this too (``train``: resume from checkpoint).
        stdin: the launcher child's stdin, as for ``subprocess.Popen`` (None: inherited).

    SIGINT/SIGTERM received by the launcher are forwarded to the launcher child and the job
    returns 130/143. A job whose rank was killed by a signal returns 128 + that signal.

    Raises:
        OSError: the launcher cannot be started.
    """
    try:
        supervisor = Supervisor(local=local)
    except OSError as exc:  # no usable network stack: run unsupervised rather than not at all
        print(f"distprop: cannot open the control channel for the ranks ({exc}); they will not "
              "stop by themselves if this launcher dies", file=sys.stderr, flush=True)
        supervisor = Supervisor(listen=False)
    env = {k: v for k, v in env.items() if k != ENV_VAR}  # not an outer launcher's channel
    env.update(supervisor.env())
    if implementation == "openmpi" and supervisor.env():
        argv = [argv[0], "-x", ENV_VAR, *argv[1:]]
    read_banner = implementation in ("mpich", "openmpi")
    read_stderr = implementation == "openmpi"  # where prterun names a killed process
    try:
        proc = subprocess.Popen(argv, env=env, start_new_session=True, stdin=stdin,
                                preexec_fn=parent_death_signal(signal.SIGTERM),
                                stdout=subprocess.PIPE if read_banner else None,
                                stderr=subprocess.PIPE if read_stderr else None)
    except OSError:
        supervisor.close()
        raise
    supervisor.start()
    copier = OutputCopier(proc.stdout).start() if read_banner else None
    err_copier = OutputCopier(proc.stderr, 2).start() if read_stderr else None
    forwarded: list[int] = []

    def forward(signum, _frame):
        forwarded.append(signum)
        try:
            proc.send_signal(signum)
        except ProcessLookupError:
            pass

    previous = {}
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            previous[sig] = signal.signal(sig, forward)
        except ValueError:  # not the main thread: signals stay with the caller
            pass
    try:
        code = proc.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    banner = None
    for reader, stream in ((copier, proc.stdout), (err_copier, proc.stderr)):
        if reader is not None:
            reader.join(5.0)
            stream.close()
            if banner is None or (banner.signal is None and reader.banner.signal is not None):
                banner = reader.banner
    supervisor.close()
    code, message = explain(code, supervisor, banner,
                            forwarded[0] if forwarded else None, resume_hint)
    if message:
        try:
            sys.stdout.flush()
            print(f"distprop: {message}", file=sys.stderr, flush=True)
        except OSError:
            pass
    return code


def _who(record) -> str:
    return f"rank {record.rank} (PID {record.pid} on {record.host})"


def explain(code: int, supervisor: Supervisor, banner: Banner | None,
            forwarded: int | None, resume_hint: str | None = None) -> tuple[int, str | None]:
    """The job's exit code and one line saying why it ended (None when it simply succeeded).

    ``code`` is the launcher child's return code (negative: killed by that signal).
    """
    if forwarded is not None:
        return 128 + forwarded, (f"received {signal_name(forwarded)}; forwarded it to the ranks "
                                 f"and stopped the job (exit code {128 + forwarded})")
    if code < 0:  # the launcher child itself was killed
        return 128 - code, (f"the MPI launcher was killed by {signal_name(-code)}; the job "
                            f"ended (exit code {128 - code})")
    if code == 0:
        return 0, None
    timed_out = [r for r in supervisor.ranks.values() if r.timed_out is not None]
    if timed_out:
        size = max((r.size or 0 for r in supervisor.ranks.values()), default=0)
        missing = [r for r in range(size) if r not in supervisor.ranks]
        waited = max(r.timed_out for r in timed_out)
        gave_up = ", ".join(str(r.rank) for r in sorted(timed_out, key=lambda r: r.rank))
        if missing:
            absent = (f"rank(s) {', '.join(map(str, missing))} never reached dist.init() (exited "
                      "or stuck before it)")
        else:
            absent = "some rank never finished MPI initialisation"
        return code, (f"{absent}; rank(s) {gave_up} gave up waiting after {waited:.0f} s "
                      f"(DISTPROP_INIT_TIMEOUT); exit code {code}")
    if banner is not None and banner.signal is not None:
        record = supervisor.by_pid(banner.pid, banner.host) if banner.pid else None
        if record is not None:
            who = _who(record)
        else:
            who = (f"a rank (PID {banner.pid} on {banner.host}; which one is unknown: it had "
                   "not registered through dist.init())")
        sig = banner.signal
        what = f"{who} was killed by {signal_name(sig)} (signal {sig})"
        if sig == signal.SIGKILL:
            what += ", e.g. by the out-of-memory killer"
        message = f"{what}; the other ranks were stopped (exit code {128 + sig})"
        if resume_hint:
            message += f". {resume_hint}"
        return 128 + sig, message
    leaver = supervisor.first("exit")
    if leaver is not None and leaver.exit_code:
        return code, (f"{_who(leaver)} exited with status {leaver.exit_code} while other ranks "
                      f"were running; the job was ended (exit code {code})")
    return code, None
