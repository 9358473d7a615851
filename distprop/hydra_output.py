"""The launcher's output, copied through byte for byte while its report of a failed rank is read.

Hydra (MPICH) prints the PID, host and signal of the first process that failed in a banner
and exits with the bare signal number; :class:`OutputCopier` passes the output on and keeps
what the banner said in a :class:`Banner` for :func:`distprop.supervise.explain`. Open MPI's
``prterun`` names a killed process on stderr ("process rank 1 with PID 42 on node n1 exited on
signal 9"), and the rank and status of a process that exited non-zero ("Process name:
[prterun-n1-42@1,1]", "Exit code: 1"); the same reader understands both.
"""

from __future__ import annotations

import os
import re
import threading
from dataclasses import dataclass

_MAX_LINE = 4096  # longest banner line looked at

# --- Hydra's stdout ----------------------------------------------------------------------------

_BANNER_PID = re.compile(r"^=\s+PID (\d+) RUNNING AT (\S+)")
_BANNER_CODE = re.compile(r"^=\s+EXIT CODE: (\d+)")
_BANNER_SIGNAL = re.compile(r"EXIT STRING: .*\(signal (\d+)\)")
# Open MPI (prterun, on stderr): "... process rank 1 with PID 42 on node n1 exited on" and,
# wrapped onto the next line or not, "signal 9 (Killed)."
_OMPI_PID = re.compile(r"process rank \d+ with PID (\d+) on node (\S+) exited on"
                       r"(?: signal (\d+))?")
_OMPI_SIGNAL = re.compile(r"^\s*signal (\d+)\b")
# Open MPI, a process that exited non-zero: "Process name: [prterun-n1-42@1,1]" (job, rank),
# then "Exit code:    1".
_OMPI_NAME = re.compile(r"^\s*Process name:\s+\[\S*,(\d+)\]")
_OMPI_EXIT = re.compile(r"^\s*Exit code:\s+(\d+)")


@dataclass
class Banner:
    """What Hydra's "BAD TERMINATION" banner said about the first process that failed."""

    pid: int | None = None
    host: str | None = None
    exit_code: int | None = None
    signal: int | None = None
    rank: int | None = None  # Open MPI names the rank of a process that exited non-zero


class OutputCopier:
    """Copies the launcher's stdout (or stderr) to ours byte for byte and reads Hydra's banner
    (Open MPI's note of a killed process) on the way."""

    def __init__(self, stream, sink_fd: int = 1):
        self.banner = Banner()
        self._ompi_pending = False
        self._stream, self._sink = stream, sink_fd
        self._partial = b""
        self.mid_line = False  #: the copied output ended without a final newline
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
            self.mid_line = not chunk.endswith(b"\n")
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
        found = _OMPI_NAME.search(line)
        if found and self.banner.rank is None:
            self.banner.rank = int(found.group(1))
            return
        found = _OMPI_EXIT.search(line) if self.banner.rank is not None else None
        if found and self.banner.exit_code is None:
            self.banner.exit_code = int(found.group(1))
            return
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
