"""Checkpoint files: ``.npz`` arrays plus JSON metadata, a SHA-256 checksum, atomic writes.

:func:`save` stores a nested structure of dicts, lists, tuples, arrays, Tensors, numbers,
strings, booleans and None. Arrays go into the ``.npz`` as plain members; the structure goes into
a JSON document (member ``__meta__``) that refers to them by name. Nothing is ever pickled and
:func:`load` reads with ``allow_pickle=False``, so a checkpoint from an untrusted source cannot run
code. The checksum (member ``__sha256__``) covers the JSON and every array's dtype, shape and
bytes; a truncated or altered file is refused with a :class:`CheckpointError`.

Writes are atomic: a temporary file in the target directory is written, flushed, fsync'ed and
renamed over the target, so a crash leaves either the old file or the new one, never half of one.
:class:`CheckpointManager` numbers checkpoints by step, keeps the last K, and
:func:`latest_valid` finds the newest checkpoint that passes verification (``--resume auto``).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import warnings
import zipfile
from pathlib import Path

import numpy as np

from distprop import backend
from distprop.tensor import Tensor

FORMAT = "distprop-checkpoint"
VERSION = 1
_META, _SHA = "__meta__", "__sha256__"


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used: missing, truncated, corrupted, or not a checkpoint."""


# --- encoding -----------------------------------------------------------------------------------


class _Encoder:
    def __init__(self):
        self.arrays: dict[str, np.ndarray] = {}

    def _array(self, array, kind: str) -> dict:
        name = f"a{len(self.arrays)}"
        host = np.ascontiguousarray(backend.to_host(array))
        if host.dtype.hasobject:
            raise TypeError("checkpoints cannot hold object arrays (they would need pickle)")
        self.arrays[name] = host
        return {kind: name}

    def encode(self, obj, where: str = "obj"):
        if obj is None or isinstance(obj, bool | str):
            return obj
        if isinstance(obj, int | float):
            return obj
        if isinstance(obj, np.generic):
            return obj.item()
        if isinstance(obj, Tensor):
            return self._array(obj.data, "__tensor__")
        if isinstance(obj, np.ndarray) or (hasattr(obj, "__cuda_array_interface__")
                                           and hasattr(obj, "dtype")):
            return self._array(obj, "__array__")
        if isinstance(obj, dict):
            if all(isinstance(k, str) and not k.startswith("__") for k in obj):
                return {k: self.encode(v, f"{where}[{k!r}]") for k, v in obj.items()}
            items = []
            for k, v in obj.items():
                if not isinstance(k, str | int | float | bool | tuple) and k is not None:
                    raise TypeError(f"{where}: dict key {k!r} of type {type(k).__name__} cannot "
                                    "be stored in a checkpoint")
                items.append([self.encode(k), self.encode(v, f"{where}[{k!r}]")])
            return {"__dict__": items}
        if isinstance(obj, tuple):
            return {"__tuple__": [self.encode(v, f"{where}[{i}]") for i, v in enumerate(obj)]}
        if isinstance(obj, list):
            return [self.encode(v, f"{where}[{i}]") for i, v in enumerate(obj)]
        raise TypeError(f"{where}: cannot store a {type(obj).__name__} in a checkpoint (allowed: "
                        "dict, list, tuple, arrays, Tensors, numbers, strings, bool, None)")


def _decode(obj, arrays):
    if isinstance(obj, list):
        return [_decode(v, arrays) for v in obj]
    if isinstance(obj, dict):
        if len(obj) == 1:
            (key, value), = obj.items()
            if key == "__array__":
                return arrays[value]
            if key == "__tensor__":
                return Tensor(arrays[value])
            if key == "__tuple__":
                return tuple(_decode(v, arrays) for v in value)
            if key == "__dict__":
                return {_hashable(_decode(k, arrays)): _decode(v, arrays) for k, v in value}
        return {k: _decode(v, arrays) for k, v in obj.items()}
    return obj


def _hashable(key):
    return tuple(_hashable(k) for k in key) if isinstance(key, list) else key


def _digest(meta_bytes: bytes, arrays: dict[str, np.ndarray]) -> str:
    h = hashlib.sha256()
    h.update(meta_bytes)
    for name in sorted(arrays):
        a = np.ascontiguousarray(arrays[name])
        h.update(f"|{name}|{a.dtype.str}|{a.shape}|".encode())
        h.update(a.reshape(-1).view(np.uint8).data)
    return h.hexdigest()


# --- files --------------------------------------------------------------------------------------


def _fsync_dir(directory: Path) -> None:
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


def save(obj, path) -> Path:
    """Write ``obj`` to ``path`` atomically as an ``.npz`` checkpoint (no pickle).

    Args:
        obj: nested dicts/lists/tuples of NumPy or CuPy arrays, Tensors, numbers, strings,
            booleans and None. Dict keys may be strings, numbers or tuples of those.
        path: destination file; its directory is created if needed.

    Returns:
        The path written.

    Raises:
        TypeError: when ``obj`` holds something that cannot be stored without pickle.
    """
    path = Path(path)
    enc = _Encoder()
    body = {"format": FORMAT, "version": VERSION, "data": enc.encode(obj)}
    meta_bytes = json.dumps(body, separators=(",", ":")).encode()
    digest = _digest(meta_bytes, enc.arrays)
    members = dict(enc.arrays)
    members[_META] = np.frombuffer(meta_bytes, dtype=np.uint8)
    members[_SHA] = np.frombuffer(digest.encode(), dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            np.savez(f, **members)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    _fsync_dir(path.parent)
    return path


def load(path, verify: bool = True):
    """Read a checkpoint written by :func:`save` (``allow_pickle=False``, checksum verified).

    Arrays come back as NumPy arrays and Tensors as host Tensors.

    Raises:
        CheckpointError: the file is missing, truncated, corrupted or not a distprop checkpoint.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        with np.load(path, allow_pickle=False) as f:
            names = list(f.files)
            if _META not in names or _SHA not in names:
                raise CheckpointError(f"{path} is not a distprop checkpoint (no metadata)")
            arrays = {n: f[n] for n in names if n not in (_META, _SHA)}
            meta_bytes = f[_META].tobytes()
            stored = f[_SHA].tobytes().decode("ascii", "replace")
    except CheckpointError:
        raise
    except (zipfile.BadZipFile, ValueError, OSError, EOFError, KeyError) as exc:
        raise CheckpointError(f"checkpoint {path} is truncated or corrupted "
                              f"({type(exc).__name__}: {exc})") from exc
    if verify:
        actual = _digest(meta_bytes, arrays)
        if actual != stored:
            raise CheckpointError(f"checkpoint {path} is corrupted: SHA-256 {actual[:12]}... "
                                  f"does not match the recorded {stored[:12]}...")
    try:
        body = json.loads(meta_bytes)
    except ValueError as exc:
        raise CheckpointError(f"checkpoint {path} has unreadable metadata ({exc})") from exc
    if body.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a distprop checkpoint")
    if body.get("version", 0) > VERSION:
        raise CheckpointError(f"{path} was written by a newer distprop (format version "
                              f"{body['version']} > {VERSION})")
    return _decode(body["data"], arrays)


def verify(path) -> None:
    """Raise :class:`CheckpointError` unless ``path`` is a complete, uncorrupted checkpoint."""
    load(path, verify=True)


# --- a directory of checkpoints -----------------------------------------------------------------

_NAME = re.compile(r"^checkpoint-(\d+)\.npz$")


def list_checkpoints(directory) -> list[Path]:
    """Checkpoint files ``checkpoint-<step>.npz`` in ``directory``, oldest first."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = []
    for p in directory.iterdir():
        m = _NAME.match(p.name)
        if m and p.is_file():
            found.append((int(m.group(1)), p))
    return [p for _, p in sorted(found)]


def latest_valid(directory, log=None) -> Path | None:
    """The newest checkpoint in ``directory`` that verifies, or None when there is none.

    A newer checkpoint that fails verification (truncated, corrupted) is skipped with a message
    through ``log`` (default: :func:`warnings.warn`) naming the file and the reason.
    """
    say = log or (lambda msg: warnings.warn(msg, stacklevel=3))
    for path in reversed(list_checkpoints(directory)):
        try:
            verify(path)
            return path
        except CheckpointError as exc:
            say(f"skipping unusable checkpoint: {exc}; falling back to the previous one")
    return None


class CheckpointManager:
    """Writes ``checkpoint-<step>.npz`` files into a directory and keeps the last ``keep``.

    Args:
        directory: where checkpoints go (created on first save).
        keep: how many of the newest checkpoints to keep (``None`` or 0 keeps all).
    """

    def __init__(self, directory, keep: int | None = 3):
        if keep is not None and keep < 0:
            raise ValueError(f"keep must be >= 0, got {keep}")
        self.directory = Path(directory)
        self.keep = keep

    def path_for(self, step: int) -> Path:
        return self.directory / f"checkpoint-{int(step):09d}.npz"

    def save(self, state, step: int) -> Path:
        """Write ``state`` as the checkpoint of ``step``, then prune old ones."""
        path = save(state, self.path_for(step))
        if self.keep:
            for old in list_checkpoints(self.directory)[: -self.keep]:
                try:
                    old.unlink()
                except OSError:
                    pass
        return path

    def latest(self, log=None) -> Path | None:
        return latest_valid(self.directory, log)
