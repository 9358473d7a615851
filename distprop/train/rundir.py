"""An exclusive lock on a run directory (``--out``), so that two runs never share one.

The lock is ``<out>/.distprop.lock``, held with ``fcntl.flock`` for the whole run: the kernel
drops it when the holding process ends, by any signal included. The same file carries a JSON
record of the holder (host, PID, its start time, the command line), written once the lock is
held and emptied on a clean release. The file itself is never deleted, so every run locks the
same inode (deleting a lock file while others open it lets two runs "hold" two files).

Acquiring the lock ends one of four ways:

* the lock is free and the record empty: the directory is ours;
* another process holds the lock: :class:`RunDirBusy`, naming it from its record;
* the lock is free but a record is left (its holder died without releasing, e.g. SIGKILL):
  when the record is from this host and its process is gone (or its PID now belongs to another
  process: the start times differ, or the machine rebooted) the lock is taken over and a note
  says so; a record from another host cannot be checked from here (a file system without shared
  locks would show it free even while that run lives), so it is :class:`RunDirBusy`, naming the
  file to delete if that run is really gone. A record that cannot be read is refused the same
  way. Nothing is ever taken over silently.

Usage::

    with RunDirLock.acquire(out, note=print) as lock:
        ...  # write into out, train
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import shlex
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path

LOCK_NAME = ".distprop.lock"
_RECORD_WAIT_S = 2.0  # how long a refused run waits for a fresh holder to write its record


class RunDirBusy(RuntimeError):
    """The run directory belongs to another run (or may: see the message)."""


def _boot_id() -> str | None:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return None


def process_start_ticks(pid: int) -> int | None:
    """When process ``pid`` started, in clock ticks since boot (None: gone or no /proc)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # the command name (field 2) is in parentheses and may hold spaces or ')'
    fields = stat[stat.rindex(")") + 2:].split()
    return int(fields[19])  # field 22 of stat(5): starttime


def _pid_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


@dataclass
class Holder:
    """Who holds (or held) a run directory, as written into the lock file."""

    host: str
    pid: int
    started: float
    command: str = ""
    proc_start: int | None = None
    boot_id: str | None = None

    @classmethod
    def this_process(cls, command: list[str] | None = None) -> Holder:
        pid = os.getpid()
        return cls(host=socket.gethostname(), pid=pid, started=time.time(),
                   command=shlex.join(command if command is not None else sys.argv),
                   proc_start=process_start_ticks(pid), boot_id=_boot_id())

    @classmethod
    def from_json(cls, text: str) -> Holder:
        """Parse a record; ValueError when it is not one."""
        data = json.loads(text)
        if not isinstance(data, dict) or not isinstance(data.get("host"), str) or \
                not isinstance(data.get("pid"), int) or \
                not isinstance(data.get("started"), int | float):
            raise ValueError("not a lock record")
        proc_start = data.get("proc_start")
        boot_id = data.get("boot_id")
        return cls(host=data["host"], pid=data["pid"], started=float(data["started"]),
                   command=str(data.get("command", "")),
                   proc_start=proc_start if isinstance(proc_start, int) else None,
                   boot_id=boot_id if isinstance(boot_id, str) else None)

    def to_json(self) -> str:
        return json.dumps({
            "host": self.host, "pid": self.pid, "started": self.started,
            "started_utc": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(self.started)),
            "command": self.command, "proc_start": self.proc_start, "boot_id": self.boot_id,
        }, indent=2) + "\n"

    def describe(self) -> str:
        when = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(self.started))
        return f"host {self.host}, PID {self.pid}, started {when}"

    def gone_reason(self) -> str | None:
        """Why this holder's process no longer exists (None: it may still be running).

        Only meaningful for a record written on this host.
        """
        if self.boot_id is not None and _boot_id() not in (None, self.boot_id):
            return "the machine has rebooted since"
        if not _pid_exists(self.pid):
            return f"PID {self.pid} no longer exists"
        ticks = process_start_ticks(self.pid)
        if self.proc_start is not None and ticks is not None and ticks != self.proc_start:
            return f"PID {self.pid} is now another process"
        return None


class RunDirLock:
    """A held lock on a run directory; :meth:`release` (or leaving the ``with``) frees it."""

    def __init__(self, directory: Path, fd: int, holder: Holder):
        self.directory = directory
        self.path = directory / LOCK_NAME
        self.holder = holder
        self._fd: int | None = fd

    @classmethod
    def acquire(cls, directory, command: list[str] | None = None,
                note=logging.getLogger(__name__).warning) -> RunDirLock:
        """Create ``directory`` if needed and lock it for this process.

        Args:
            directory: the run directory (``--out``).
            command: the command line to record (default ``sys.argv``).
            note: called with a one-line message when a dead run's lock is taken over.

        Raises:
            RunDirBusy: another run holds the directory, or may (see the module docstring).
            OSError: the directory or the lock file cannot be created.
        """
        directory = Path(directory).absolute()
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / LOCK_NAME
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    raise
                raise RunDirBusy(_busy_message(directory, path, fd)) from None
            left = _read(fd)
            if left.strip():
                _check_left_record(directory, path, left, note)
            holder = Holder.this_process(command)
            os.ftruncate(fd, 0)
            os.pwrite(fd, holder.to_json().encode(), 0)
            os.fsync(fd)
        except BaseException:
            os.close(fd)  # drops the flock if we had it
            raise
        return cls(directory, fd, holder)

    def release(self) -> None:
        """Empty the record and drop the lock (idempotent)."""
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        with contextlib.suppress(OSError):
            os.ftruncate(fd, 0)
        os.close(fd)

    def __enter__(self) -> RunDirLock:
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def _read(fd: int) -> str:
    return os.pread(fd, 1 << 16, 0).decode("utf-8", errors="replace")


def _busy_message(directory: Path, path: Path, fd: int) -> str:
    """Name the run that holds the lock (waiting briefly for a fresh holder's record)."""
    deadline = time.monotonic() + _RECORD_WAIT_S
    while True:
        try:
            holder = Holder.from_json(_read(fd))
            return f"--out {directory} is in use by another run ({holder.describe()}); wait " \
                   "for it to end or choose another --out"
        except ValueError:
            if time.monotonic() > deadline:
                return f"--out {directory} is in use by another run (its lock file {path} " \
                       "names no holder yet); wait for it to end or choose another --out"
            time.sleep(0.05)


def _check_left_record(directory: Path, path: Path, text: str, note) -> None:
    """The lock was free but a record is left: take over (with a note) or refuse."""
    try:
        holder = Holder.from_json(text)
    except ValueError:
        raise RunDirBusy(f"--out {directory}: its lock file holds no readable record; if no "
                         f"run is using this directory, delete {path} and start again") from None
    if holder.host != socket.gethostname():
        raise RunDirBusy(f"--out {directory} was locked by a run on another machine "
                         f"({holder.describe()}), which cannot be checked from here; if that "
                         f"run is really gone, delete {path} and start again")
    reason = holder.gone_reason()
    if reason is None:
        raise RunDirBusy(f"--out {directory} is recorded as in use by a run that is still "
                         f"alive ({holder.describe()}) although it does not hold the lock; if "
                         f"that process is not a distprop run, delete {path} and start again")
    note(f"distprop: --out {directory}: taking over the lock left by a run that did not end "
         f"cleanly ({holder.describe()}; {reason})")
