"""The launcher's control channel: ranks register with it and report, and it tells them to stop.

:class:`Supervisor` is the server that :func:`distprop.supervise.run_once` starts around the MPI
launcher; :mod:`distprop.distributed.lifeline` is the rank's side.

* **A control channel.** A TCP server (loopback for a one-node job, every interface with ``-H``,
  ``--hostfile`` or Slurm) whose address and a random token reach the ranks in
  ``DISTPROP_SUPERVISOR=host:port:token``. Each rank registers from ``dist.init()`` before MPI is
  initialised (rank from ``PMI_RANK``/``OMPI_COMM_WORLD_RANK``/``SLURM_PROCID``, its PID and
  host), then reports "MPI is up", an initialisation timeout, or a non-zero exit status. Lines are
  JSON; the first one of a connection must carry the token, anything else is dropped.
* **Preemption.** SIGTERM/SIGUSR1 to the launcher, when every rank said it handles preemption
  (the trainer does, from ``fit``), goes to the ranks as a ``preempt`` message instead of a
  kill: they stop after one agreed step, checkpoint it, report ``preempted`` and exit 143
  (:mod:`distprop.distributed.preemption`). A second signal stops the job at once.
* **Stall survey.** A rank whose stall watchdog fires sends ``stall``; the launcher asks every
  rank where it is (``query``, non-blocking sends), waits at most :data:`SURVEY_TIMEOUT`
  seconds, and answers with who answered from where; ranks that did not answer (a stopped
  process, a dead host or link) are named by the asking rank and in the launcher's last line.
"""

from __future__ import annotations

import json
import secrets
import selectors
import signal
import socket
import threading
import time
from dataclasses import dataclass, field

ENV_VAR = "DISTPROP_SUPERVISOR"
_MAX_LINE = 4096  # longest control message looked at
SURVEY_TIMEOUT = 3.0  # seconds a stall survey waits for the ranks' answers


def signal_name(signum: int) -> str:
    """``9`` -> ``'SIGKILL'`` (``'signal 42'`` when the number has no name here)."""
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


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
    preemptible: bool = False  #: its training loop stops at an agreed step on ``preempt``
    preempted: dict | None = None  #: what it said when it stopped for a preemption
    status: dict | None = None  #: its answer to the current stall survey
    conn: socket.socket | None = field(default=None, repr=False)


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
        self._survey: dict | None = None  # the stall survey in progress
        self.stall: dict | None = None  #: the first stall report (who asked, who answered)
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
            events = sel.select(timeout=0.05 if stopping else 0.2)
            woke = time.monotonic()  # connections closed before this wake-up: order unknown
            for key, _ in events:
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
                        self._note(state[1], "dropped", at=woke)
                    sel.unregister(conn)
                    conn.close()
                    del buffers[conn]
            now = time.monotonic()
            self._finish_survey(now)
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
                with self._lock:
                    self.ranks[rank].conn = state[3]
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
            elif event == "preemptible":
                record.preemptible = True
            elif event == "preempted":
                record.preempted = {k: msg.get(k) for k in ("step", "epoch", "cause")}
            elif event == "status" and self._survey is not None \
                    and msg.get("id") == self._survey["id"]:
                record.status = _status_fields(msg)
                return
            elif event == "stall":
                record.status = _status_fields(msg)
                self._start_survey(rank)
            else:
                return
        self._note(rank, event)

    # -- messages to the ranks -------------------------------------------------------------------

    def _send(self, record: RankRecord, msg: dict) -> bool:
        """Send one line to a rank without blocking (a dead host must not stall the launcher)."""
        if record.conn is None or record.dropped is not None:
            return False
        try:
            record.conn.send((json.dumps(msg) + "\n").encode())
            return True
        except OSError:  # its buffer is full (it stopped reading) or the connection is gone
            return False

    def preempt(self, signum: int) -> bool:
        """Ask every rank to stop at an agreed step, checkpoint and exit 143.

        Only when every rank of the job registered and said it handles preemption (the
        trainer does; a user script may not): returns False otherwise, and the caller stops
        the job the hard way.
        """
        with self._lock:
            records = list(self.ranks.values())
            size = max((r.size or 0 for r in records), default=0)
            if not records or len(records) < size or not all(r.preemptible for r in records):
                return False
            for record in records:
                self._send(record, {"event": "preempt", "signal": signal_name(signum)})
        return True

    def preempted(self) -> RankRecord | None:
        """The first rank that reported stopping for a preemption (None if none did)."""
        with self._lock:
            found = [r for r in self.ranks.values() if r.preempted is not None]
        return min(found, key=lambda r: r.rank) if found else None

    def _start_survey(self, asker: int) -> None:
        """A rank's stall watchdog fired: ask every rank where it is (lock held)."""
        if self._survey is not None:
            self._survey["askers"].add(asker)
            return
        self._survey = {"id": secrets.token_hex(4), "askers": {asker},
                        "deadline": time.monotonic() + SURVEY_TIMEOUT}
        for record in self.ranks.values():
            if record.rank != asker:
                record.status = None
                self._send(record, {"event": "query", "id": self._survey["id"]})

    def _finish_survey(self, now: float) -> None:
        """Answer the askers once every rank answered or the survey timed out."""
        with self._lock:
            survey = self._survey
            if survey is None:
                return
            records = sorted(self.ranks.values(), key=lambda r: r.rank)
            waiting = [r for r in records if r.status is None and r.dropped is None]
            if waiting and now < survey["deadline"]:
                return
            size = max((r.size or 0 for r in records), default=len(records))
            rows = [{"rank": r.rank, "host": r.host, "pid": r.pid, "answered": r.status is not None,
                     "gone": r.dropped is not None, **(r.status or {})} for r in records]
            rows += [{"rank": k, "host": None, "pid": None, "answered": False, "gone": True}
                     for k in range(size) if k not in self.ranks]
            report = {"event": "stall-report", "askers": sorted(survey["askers"]), "ranks": rows}
            for record in records:
                if record.rank in survey["askers"]:
                    self._send(record, report)
            if self.stall is None:
                self.stall = report
            self._survey = None

    def _note(self, rank: int, event: str, at: float | None = None) -> None:
        """Record ``event`` of ``rank`` (at ``at``: drops seen at one wake-up share its time)."""
        with self._lock:
            now = time.monotonic() if at is None else at
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

    def first_unannounced_drops(self) -> list[RankRecord]:
        """The ranks whose connections dropped first without an ``exit`` event: killed, not
        ended (the launcher's banner may name a rank it killed afterwards). One rank when its
        drop came first; several when the first such drops were seen at one wake-up of the
        server loop (a loaded launcher may wake only after MPI's launcher has stopped the
        other ranks: their order is then unknown); none when no rank dropped so."""
        with self._lock:
            announced, drops = set(), []
            for at, rank, name in self.order:
                if name == "exit":
                    announced.add(rank)
                elif name == "dropped" and rank not in announced:
                    drops.append((at, rank))
            return [self.ranks[rank] for at, rank in drops if at == drops[0][0]]

    def first(self, event: str) -> RankRecord | None:
        """The rank whose ``event`` arrived first."""
        with self._lock:
            for _, rank, name in self.order:
                if name == event:
                    return self.ranks[rank]
        return None


def _status_fields(msg: dict) -> dict:
    return {"count": msg.get("count"), "current": msg.get("current"),
            "waited": msg.get("waited")}


def _same_host(a: str, b: str) -> bool:
    return a.split(".")[0].lower() == b.split(".")[0].lower()
