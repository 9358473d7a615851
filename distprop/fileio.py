"""Files that are either complete or absent, and ``.npy`` headers checked before any allocation.

* :func:`atomic_write` / :func:`atomic_write_text` write into a temporary file next to the target
  (``.NAME.HOST.PID.tmp``), flush, fsync, rename it over the target and fsync the directory, so
  a crash or a full disk leaves the old file or the new one, never a 0-byte or half-written one.
  A failure raises :class:`WriteError`, whose message names the file and the reason (e.g. "No
  space left on device"); the temporary file is removed.
* :func:`remove_orphaned_temps` deletes the temporary files a killed writer left behind.
* :func:`read_npy_layout` reads a ``.npy`` header and checks that the shape times the item size
  fits in the bytes that follow it, so a header claiming 10^12 elements is refused instead of
  NumPy trying to allocate terabytes.
"""

from __future__ import annotations

import errno
import math
import os
import socket
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

_HOST = socket.gethostname().replace(".", "_") or "host"


class WriteError(OSError):
    """A file that could not be written (disk full, no permission); the message names it."""

    def __str__(self) -> str:
        return self.strerror or super().__str__()


def temp_path(path: Path) -> Path:
    """The temporary file :func:`atomic_write` uses for ``path`` (hidden, host and PID tagged)."""
    return path.with_name(f".{path.name}.{_HOST}.{os.getpid()}.tmp")


def fsync_dir(directory: Path) -> None:
    """fsync a directory so a rename in it survives a crash (best effort)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def describe(exc: OSError) -> str:
    """The reason of an OSError in a few words (``no space left on device``)."""
    if exc.errno == errno.ENOSPC:
        return "no space left on device"
    return exc.strerror or str(exc)


def atomic_write(path, write: Callable, what: str = "file") -> Path:
    """Write ``path`` atomically: ``write(f)`` fills a temporary binary file, then it is renamed.

    Args:
        path: the target file; its directory is created if needed.
        write: called with the open temporary file (``"wb"``).
        what: a word for messages (``"checkpoint"``, ``"summary"``).

    Returns:
        The path written.

    Raises:
        WriteError: the directory, the temporary file or the rename failed (message names
            ``path`` and the reason); the target is unchanged and no temporary file is left.
    """
    path = Path(path)
    tmp = temp_path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        raise WriteError(exc.errno, f"cannot write {what} {path}: {describe(exc)}") from exc
    finally:
        try:
            tmp.unlink()
        except OSError:
            pass
    fsync_dir(path.parent)
    return path


def atomic_write_text(path, text: str, what: str = "file") -> Path:
    """:func:`atomic_write` of a UTF-8 text."""
    data = text.encode()
    return atomic_write(path, lambda f: f.write(data), what)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_orphaned_temps(directory, started: float | None = None, log=None) -> list[Path]:
    """Delete temporary files of :func:`atomic_write` that no live writer owns.

    A ``.*.HOST.PID.tmp`` file is an orphan when it was last modified before ``started`` (the
    start of this run; default: now) and, if written on this host, its PID is gone. Files of
    other hosts are only judged by age. Returns the files removed; ``log`` gets one line each.
    """
    directory = Path(directory)
    started = time.time() if started is None else started
    removed = []
    if not directory.is_dir():
        return removed
    for p in directory.iterdir():
        if not (p.name.startswith(".") and p.name.endswith(".tmp")):
            continue
        parts = p.name[:-4].rsplit(".", 2)
        host, pid = (parts[1], parts[2]) if len(parts) == 3 else ("", "")
        try:
            if p.stat().st_mtime >= started or not p.is_file():
                continue
            if host == _HOST and pid.isdigit() and _pid_alive(int(pid)):
                continue
            p.unlink()
        except OSError:
            continue
        removed.append(p)
        if log:
            log(f"removed {p} (left by a writer that was killed)")
    return removed


# --- .npy headers -------------------------------------------------------------------------------


def _human(n: int) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if n < 1024 or unit == "PiB":
            return f"{n} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)  # pragma: no cover


def read_npy_layout(f, size: int, where: str):
    """Read a ``.npy`` header from ``f`` and check it against the ``size`` bytes of the file.

    Args:
        f: a binary file object positioned at the start of the ``.npy`` data.
        size: the total size of the ``.npy`` data in bytes (file size, or a zip member's size).
        where: names the file (and member) in messages.

    Returns:
        ``(shape, fortran_order, dtype, header_bytes)``.

    Raises:
        ValueError: not a ``.npy`` file, unreadable header, an object dtype (would need pickle),
            or a shape whose data does not fit in the file.
    """
    start = f.tell()
    try:
        version = np.lib.format.read_magic(f)
        if version == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
        else:
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
    except Exception as exc:  # a garbled header fails in many ways
        raise ValueError(f"{where}: not a readable .npy array ({exc})") from None
    if dtype.hasobject:
        raise ValueError(f"{where}: holds Python objects; refusing to load it (that would need "
                         "pickle)")
    header = f.tell() - start
    needed = math.prod(int(s) for s in shape) * dtype.itemsize
    available = max(0, size - header)
    if needed > available:
        raise ValueError(f"{where}: header claims shape {tuple(shape)} of {dtype} "
                         f"({_human(needed)}) but the file holds only {_human(available)} of "
                         "data; it is truncated or its header is corrupt")
    return tuple(shape), fortran, dtype, header
