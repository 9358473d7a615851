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
import re
import warnings
import zipfile
from pathlib import Path

import numpy as np

from distprop import backend, fileio
from distprop.tensor import Tensor

FORMAT = "distprop-checkpoint"
VERSION = 1
_META, _SHA = "__meta__", "__sha256__"


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used: missing, truncated, corrupted, or not a checkpoint."""


MAX_DEPTH = 100  # nesting of dicts/lists/tuples; a training state needs fewer than 10 levels


# --- encoding -----------------------------------------------------------------------------------


class _Encoder:
    def __init__(self):
        self.arrays: dict[str, np.ndarray] = {}

    def _array(self, array, kind: str) -> dict:
        name = f"a{len(self.arrays)}"
        host = np.asarray(backend.to_host(array))  # keeps 0-d arrays 0-d
        if not host.flags.c_contiguous:
            host = np.ascontiguousarray(host)
        if host.dtype.hasobject:
            raise TypeError("checkpoints cannot hold object arrays (they would need pickle)")
        self.arrays[name] = host
        return {kind: name}

    def encode(self, obj, where: str = "obj", depth: int = 0):
        if depth > MAX_DEPTH:
            raise ValueError(f"{where}: nested deeper than {MAX_DEPTH} levels; checkpoints "
                             "refuse deeper structures")
        if obj is None or isinstance(obj, bool | str | int | float):
            return obj
        if isinstance(obj, complex):
            return {"__complex__": [obj.real, obj.imag]}
        if isinstance(obj, np.generic):
            if obj.dtype.kind in "biuf":
                return obj.item()
            return self._array(np.asarray(obj), "__array__")  # complex, bf16, ...: a 0-d array
        if isinstance(obj, Tensor):
            return self._array(obj.data, "__tensor__")
        if isinstance(obj, np.ndarray) or (hasattr(obj, "__cuda_array_interface__")
                                           and hasattr(obj, "dtype")):
            return self._array(obj, "__array__")
        d = depth + 1
        if isinstance(obj, dict):
            if all(isinstance(k, str) and not k.startswith("__") for k in obj):
                return {k: self.encode(v, f"{where}[{k!r}]", d) for k, v in obj.items()}
            items = []
            for k, v in obj.items():
                if not isinstance(k, str | int | float | bool | tuple) and k is not None:
                    raise TypeError(f"{where}: dict key {k!r} of type {type(k).__name__} cannot "
                                    "be stored in a checkpoint")
                items.append([self.encode(k, where, d), self.encode(v, f"{where}[{k!r}]", d)])
            return {"__dict__": items}
        if isinstance(obj, tuple):
            return {"__tuple__": [self.encode(v, f"{where}[{i}]", d) for i, v in enumerate(obj)]}
        if isinstance(obj, list):
            return [self.encode(v, f"{where}[{i}]", d) for i, v in enumerate(obj)]
        raise TypeError(f"{where}: cannot store a {type(obj).__name__} in a checkpoint (allowed: "
                        "dict, list, tuple, arrays, Tensors, numbers, strings, bool, None)")


class _Decoder:
    """Rebuilds the structure from the JSON metadata, refusing anything the encoder cannot have
    written (unknown markers, references to missing arrays, wrong types, absurd nesting)."""

    def __init__(self, arrays: dict, path):
        self.arrays, self.path = arrays, path

    def bad(self, where: str, problem: str) -> CheckpointError:
        return CheckpointError(f"checkpoint {self.path} has invalid metadata at {where}: "
                               f"{problem}")

    def _items(self, value, where: str, marker: str) -> list:
        if not isinstance(value, list):
            raise self.bad(where, f"{marker} holds a {type(value).__name__}, expected a list")
        return value

    def decode(self, obj, where: str = "data", depth: int = 0):
        if depth > MAX_DEPTH:
            raise self.bad(where, f"nested deeper than {MAX_DEPTH} levels")
        if obj is None or isinstance(obj, bool | int | float | str):
            return obj
        d = depth + 1
        if isinstance(obj, list):
            return [self.decode(v, f"{where}[{i}]", d) for i, v in enumerate(obj)]
        if not isinstance(obj, dict):  # pragma: no cover - json only yields the types above
            raise self.bad(where, f"unexpected {type(obj).__name__}")
        if len(obj) == 1:
            (key, value), = obj.items()
            if key in ("__array__", "__tensor__"):
                if not isinstance(value, str) or value not in self.arrays:
                    raise self.bad(where, f"refers to array {value!r}, which the file does not "
                                   "hold")
                return Tensor(self.arrays[value]) if key == "__tensor__" else self.arrays[value]
            if key == "__tuple__":
                return tuple(self.decode(v, f"{where}[{i}]", d)
                             for i, v in enumerate(self._items(value, where, key)))
            if key == "__complex__":
                parts = self._items(value, where, key)
                if len(parts) != 2 or not all(isinstance(p, int | float) and
                                              not isinstance(p, bool) for p in parts):
                    raise self.bad(where, f"__complex__ must be [real, imag], got {parts!r:.80}")
                return complex(*parts)
            if key == "__dict__":
                out = {}
                for i, pair in enumerate(self._items(value, where, key)):
                    if not isinstance(pair, list) or len(pair) != 2:
                        raise self.bad(f"{where}[{i}]", "a __dict__ item must be [key, value]")
                    k = _hashable(self.decode(pair[0], f"{where}[{i}]", d))
                    try:
                        hash(k)
                    except TypeError:
                        raise self.bad(f"{where}[{i}]", f"unusable dict key {k!r:.80}") from None
                    out[k] = self.decode(pair[1], f"{where}[{k!r}]", d)
                return out
        for k in obj:
            if k.startswith("__"):
                raise self.bad(where, f"unknown marker {k!r}")
        return {k: self.decode(v, f"{where}[{k!r}]", d) for k, v in obj.items()}


def _hashable(key):
    return tuple(_hashable(k) for k in key) if isinstance(key, list) else key


def _digest(meta_bytes: bytes, arrays: dict[str, np.ndarray]) -> str:
    h = hashlib.sha256()
    h.update(meta_bytes)
    for name in sorted(arrays):
        a = arrays[name]
        if not a.flags.c_contiguous:
            a = np.ascontiguousarray(a)
        h.update(f"|{name}|{a.dtype.str}|{a.shape}|".encode())
        h.update(a.reshape(-1).view(np.uint8).data)
    return h.hexdigest()


# --- files --------------------------------------------------------------------------------------


def save(obj, path) -> Path:
    """Write ``obj`` to ``path`` atomically as an ``.npz`` checkpoint (no pickle).

    Arrays keep their dtype and shape (0-d arrays stay 0-d); NumPy scalars of bool, integer and
    float types are stored as Python numbers, other scalars (complex, ...) as 0-d arrays.

    Args:
        obj: nested dicts/lists/tuples of NumPy or CuPy arrays, Tensors, numbers, strings,
            booleans and None. Dict keys may be strings, numbers or tuples of those.
        path: destination file; its directory is created if needed.

    Returns:
        The path written.

    Raises:
        TypeError: when ``obj`` holds something that cannot be stored without pickle.
        ValueError: when ``obj`` is nested deeper than :data:`MAX_DEPTH` levels.
        distprop.fileio.WriteError: the file cannot be written (e.g. no space left on the
            device); the message names the file, and no partial or temporary file is left.
    """
    path = Path(path)
    enc = _Encoder()
    body = {"format": FORMAT, "version": VERSION, "data": enc.encode(obj)}
    meta_bytes = json.dumps(body, separators=(",", ":")).encode()
    digest = _digest(meta_bytes, enc.arrays)
    members = dict(enc.arrays)
    members[_META] = np.frombuffer(meta_bytes, dtype=np.uint8)
    members[_SHA] = np.frombuffer(digest.encode(), dtype=np.uint8)
    return fileio.atomic_write(path, lambda f: np.savez(f, **members), "checkpoint")


def _not_a_checkpoint(path: Path, head: bytes) -> CheckpointError:
    if not head:
        kind = "an empty file"
    elif head[:1] == b"\x80" and path.suffix in (".pt", ".pth"):  # an old-style torch.save
        return CheckpointError(f"{path} is not a distprop checkpoint (it looks like a PyTorch "
                               f"file). {_TORCH_HINT}")
    elif head[8:10] == b'{"' and int.from_bytes(head[:8], "little") < (100 << 20):
        return CheckpointError(f"{path} is a safetensors file, not a distprop checkpoint; read it "
                               "with dp.load_safetensors(path)")
    elif head.startswith(b"\x93NUMPY"):
        kind = "a single .npy array, not an .npz archive"
    elif all(32 <= b < 127 or b in b"\t\r\n" for b in head):
        kind = "a text file"
    else:
        kind = "not an .npz archive"
    return CheckpointError(f"{path} is not a distprop checkpoint ({kind}); checkpoints are the "
                           "checkpoint-<step>.npz files distprop writes into <out>/checkpoints")


_TORCH_HINT = ("To read its tensors, install torch and call dp.load_torch(path) (torch.load with "
               "weights_only=True); dp.load reads distprop checkpoints only")
_MAX_DEFLATE_RATIO = 1100  # deflate cannot expand data more than ~1032x


def _read_members(path: Path) -> tuple[dict, bytes, str]:
    """The arrays, metadata and recorded checksum of a checkpoint file, every member's header
    checked against its size before it is read (no allocation a header merely claims)."""
    with open(path, "rb") as fh:
        head = fh.read(64)
    if not head.startswith(b"PK\x03\x04"):
        raise _not_a_checkpoint(path, head)
    with zipfile.ZipFile(path) as zf:
        infos = {i.filename[:-4]: i for i in zf.infolist() if i.filename.endswith(".npy")}
        others = [i.filename for i in zf.infolist() if not i.filename.endswith(".npy")]
        if any(name == "data.pkl" or name.endswith("/data.pkl") for name in others):
            raise CheckpointError(f"{path} is a PyTorch file (torch.save), not a distprop "
                                  f"checkpoint. {_TORCH_HINT}")
        if _META not in infos or _SHA not in infos or others:
            held = sorted(infos)[:6] + others[:3]
            raise CheckpointError(f"{path} is not a distprop checkpoint (an .npz/zip archive "
                                  f"without distprop metadata; it holds {held})")
        out = {}
        for name, info in infos.items():
            where = f"checkpoint {path}, member {name!r}"
            if info.compress_type != zipfile.ZIP_STORED and \
                    info.file_size > _MAX_DEFLATE_RATIO * (info.compress_size + 64):
                raise CheckpointError(f"{where} claims {info.file_size} bytes from "
                                      f"{info.compress_size} compressed ones; corrupted")
            with zf.open(info) as m:
                try:
                    fileio.read_npy_layout(m, info.file_size, where)
                except ValueError as exc:
                    raise CheckpointError(str(exc)) from None
            with zf.open(info) as m:
                out[name] = np.lib.format.read_array(m, allow_pickle=False)
    meta = out.pop(_META)
    sha = out.pop(_SHA)
    if meta.dtype != np.uint8 or sha.dtype != np.uint8 or meta.ndim != 1 or sha.ndim != 1:
        raise CheckpointError(f"checkpoint {path} has malformed metadata members")
    return out, meta.tobytes(), sha.tobytes().decode("ascii", "replace")


def load(path, verify: bool = True):
    """Read a checkpoint written by :func:`save` (``allow_pickle=False``, checksum verified).

    Arrays come back as NumPy arrays (same dtype and shape, 0-d included) and Tensors as host
    Tensors. Every member's header is checked against its size before it is read, and the
    metadata is checked against the format (known markers, existing array references, at most
    :data:`MAX_DEPTH` levels) before anything is built from it.

    Raises:
        CheckpointError: the file is missing, truncated, corrupted, not a distprop checkpoint,
            or holds metadata that does not follow the format; the message names the file.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        arrays, meta_bytes, stored = _read_members(path)
    except CheckpointError:
        raise
    except Exception as exc:  # any parse failure (zlib.error, BadZipFile, ...)
        raise CheckpointError(f"checkpoint {path} is truncated or corrupted "
                              f"({type(exc).__name__}: {exc})") from exc
    if verify:
        actual = _digest(meta_bytes, arrays)
        if actual != stored:
            raise CheckpointError(f"checkpoint {path} is corrupted: SHA-256 {actual[:12]}... "
                                  f"does not match the recorded {stored[:12]}...")
    try:
        body = json.loads(meta_bytes)
    except (ValueError, RecursionError) as exc:
        problem = "nested too deeply" if isinstance(exc, RecursionError) else str(exc)
        raise CheckpointError(f"checkpoint {path} has unreadable metadata ({problem})") from None
    if not isinstance(body, dict) or body.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a distprop checkpoint (its metadata does not name "
                              f"the format {FORMAT!r})")
    version = body.get("version")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise CheckpointError(f"checkpoint {path} has invalid metadata: format version "
                              f"{version!r:.40}")
    if version > VERSION:
        raise CheckpointError(f"{path} was written by a newer distprop (format version "
                              f"{version} > {VERSION})")
    if "data" not in body:
        raise CheckpointError(f"checkpoint {path} has invalid metadata: no 'data' entry")
    return _Decoder(arrays, path).decode(body["data"])


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
