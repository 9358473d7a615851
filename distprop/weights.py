"""Model weights in files other programs read: safetensors, and PyTorch ``.pt`` on request.

* :func:`save_safetensors` / :func:`load_safetensors` -- a ``state_dict`` as a `safetensors
  <https://huggingface.co/docs/safetensors>`_ file (the ``safetensors`` package: the optional
  extra ``distprop[safetensors]``). distprop's ``state_dict`` keys and dtypes already follow
  PyTorch (``0.weight``, ``lstm.weight_ih_l0``, float32, an int64 ``num_batches_tracked``), so
  ``safetensors.torch.load_file`` gives a dict that the equivalent ``torch.nn`` model takes with
  a strict ``load_state_dict``, and the other way round.
* :func:`load_torch` -- the tensors of a ``torch.save`` file, only when PyTorch is installed and
  only through ``torch.load(weights_only=True)``. :func:`distprop.load` never opens such files.

Nothing here unpickles. What the loaders return are NumPy arrays, which
:meth:`distprop.nn.Module.load_state_dict` accepts. bfloat16 tensors (common in files from
PyTorch) have no NumPy dtype: they are widened to float32, which is exact, with a warning naming
them.
"""

from __future__ import annotations

import json
import os
import struct
import warnings
from pathlib import Path

import numpy as np

from distprop import backend, fileio
from distprop.tensor import Tensor

EXTRA = "pip install 'distprop[safetensors]'"
_NUMPY_DTYPES = {"BOOL", "U8", "I8", "U16", "I16", "U32", "I32", "U64", "I64", "F16", "F32",
                 "F64"}
_MAX_HEADER = 100 << 20  # the safetensors library's own limit on the JSON header


class WeightsError(ValueError):
    """A weights file that cannot be read: missing, not of the expected format, or corrupted."""


def _safetensors():
    try:
        import safetensors
        import safetensors.numpy
    except ImportError as exc:
        raise ImportError("safetensors files need the 'safetensors' package, distprop's optional "
                          f"extra 'safetensors': {EXTRA}") from exc
    return safetensors


def _host_arrays(state_dict) -> dict[str, np.ndarray]:
    """``state_dict`` values (Tensors, NumPy/CuPy arrays, torch tensors) as contiguous host
    arrays, refusing what a safetensors file cannot hold."""
    if not hasattr(state_dict, "items"):
        raise TypeError(f"expected a state_dict (a mapping of names to arrays), got "
                        f"{type(state_dict).__name__}")
    out = {}
    for key, value in state_dict.items():
        if not isinstance(key, str):
            raise TypeError(f"state_dict key {key!r} is not a string")
        if isinstance(value, Tensor):
            value = value.data
        elif hasattr(value, "detach") and hasattr(value, "cpu"):  # a torch tensor
            value = value.detach().cpu()
            if str(value.dtype) == "torch.bfloat16":
                raise TypeError(f"state_dict[{key!r}] is bfloat16, which NumPy cannot hold; "
                                "convert it with .float() first")
            value = value.numpy()
        array = np.ascontiguousarray(backend.to_host(value))
        if array.dtype.kind not in "biuf":
            raise TypeError(f"state_dict[{key!r}] has dtype {array.dtype}; safetensors files "
                            "hold booleans, integers and floats")
        out[key] = array
    return out


def save_safetensors(state_dict, path, metadata: dict | None = None) -> Path:
    """Write ``state_dict`` to ``path`` as a safetensors file, atomically.

    Keys and dtypes are kept as they are (float32 stays float32). The file's metadata gets
    ``format: pt`` (what ``transformers`` and other PyTorch tools expect) plus ``metadata``.

    Args:
        state_dict: names to Tensors, NumPy/CuPy arrays or torch tensors (``model.state_dict()``).
        path: destination file; its directory is created if needed.
        metadata: extra string-to-string entries for the file's header.

    Returns:
        The path written.

    Raises:
        ImportError: the ``safetensors`` package is missing (names the extra to install).
        TypeError: a key is not a string or a value is not a numeric array.
        distprop.fileio.WriteError: the file cannot be written; nothing partial is left.
    """
    st = _safetensors()
    arrays = _host_arrays(state_dict)
    meta = {"format": "pt"}
    for key, value in (metadata or {}).items():
        meta[str(key)] = str(value)
    data = st.numpy.save(arrays, metadata=meta)
    return fileio.atomic_write(Path(path), lambda f: f.write(data), "safetensors file")


def _read_header(path: Path) -> tuple[dict, int]:
    """The JSON header of a safetensors file and where its data starts, checked against the size."""
    size = path.stat().st_size
    with open(path, "rb") as fh:
        head = fh.read(8)
        if len(head) < 8:
            raise WeightsError(f"{path} is not a safetensors file ({size} bytes, too short)")
        (length,) = struct.unpack("<Q", head)
        if length > min(_MAX_HEADER, size - 8):
            raise WeightsError(f"{path} is not a safetensors file (or it is truncated): its "
                               f"header claims {length} bytes of {size}")
        raw = fh.read(length)
    try:
        header = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        raise WeightsError(f"{path} is not a safetensors file (unreadable header)") from None
    if not isinstance(header, dict):
        raise WeightsError(f"{path} is not a safetensors file (header is not a JSON object)")
    return header, 8 + length


def _bf16_as_float32(path: Path, info: dict, start: int, key: str) -> np.ndarray:
    try:
        begin, end = (int(v) for v in info["data_offsets"])
        shape = tuple(int(s) for s in info["shape"])
    except (KeyError, TypeError, ValueError):
        raise WeightsError(f"{path}: tensor {key!r} has a malformed header entry") from None
    count = int(np.prod(shape, dtype=np.int64))
    if end - begin != 2 * count or start + end > path.stat().st_size:
        raise WeightsError(f"{path}: tensor {key!r} ({shape}, BF16) does not match its data "
                           f"offsets [{begin}, {end}); the file is corrupted or truncated")
    raw = np.fromfile(path, dtype="<u2", count=count, offset=start + begin)
    return (raw.astype(np.uint32) << 16).view(np.float32).reshape(shape)


def load_safetensors(path) -> dict[str, np.ndarray]:
    """Read a safetensors file into a dict of NumPy arrays (for ``Module.load_state_dict``).

    Keys, shapes and dtypes are kept, except bfloat16 tensors, which are widened to float32
    (exactly) with a :class:`UserWarning` naming them.

    Raises:
        ImportError: the ``safetensors`` package is missing (names the extra to install).
        WeightsError: the file is missing, not a safetensors file, truncated or corrupted, or
            holds a dtype NumPy has no type for (float8, ...); the message names the file.
    """
    st = _safetensors()
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"safetensors file {path} does not exist")
    header, start = _read_header(path)
    out: dict[str, np.ndarray] = {}
    widened = []
    try:
        with st.safe_open(str(path), framework="numpy") as f:
            for key in f.keys():  # safe_open is not a mapping
                dtype = header.get(key, {}).get("dtype") if isinstance(header.get(key), dict) \
                    else None
                if dtype == "BF16":
                    out[key] = _bf16_as_float32(path, header[key], start, key)
                    widened.append(key)
                elif dtype in _NUMPY_DTYPES:
                    out[key] = f.get_tensor(key)
                else:
                    raise WeightsError(f"{path}: tensor {key!r} has dtype {dtype}, which distprop "
                                       "cannot load (supported: bool, integers, F16, F32, F64, "
                                       "BF16 as float32)")
    except WeightsError:
        raise
    except Exception as exc:  # SafetensorError and friends
        raise WeightsError(f"{path} is not a readable safetensors file ({exc})") from None
    if widened:
        shown = ", ".join(widened[:5]) + (f" (+{len(widened) - 5} more)" if len(widened) > 5
                                          else "")
        warnings.warn(f"{path}: bfloat16 tensor(s) {shown} loaded as float32 (NumPy has no "
                      "bfloat16; the widening is exact)", UserWarning, stacklevel=2)
    return out


def safetensors_metadata(path) -> dict[str, str]:
    """The string metadata in a safetensors file's header (empty when it has none)."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"safetensors file {path} does not exist")
    header, _ = _read_header(path)
    meta = header.get("__metadata__") or {}
    return {str(k): str(v) for k, v in meta.items()} if isinstance(meta, dict) else {}


def _torch_to_numpy(obj, torch, widened: list, where: str = ""):
    if isinstance(obj, torch.Tensor):
        t = obj.detach().cpu()
        if t.dtype == torch.bfloat16:
            widened.append(where or "tensor")
            t = t.float()
        return t.numpy()
    if isinstance(obj, dict):
        return {k: _torch_to_numpy(v, torch, widened, f"{where}.{k}" if where else str(k))
                for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return type(obj)(_torch_to_numpy(v, torch, widened, f"{where}[{i}]")
                         for i, v in enumerate(obj))
    return obj


def load_torch(path) -> dict:
    """The contents of a ``torch.save`` file with tensors as NumPy arrays (needs PyTorch).

    Reads with ``torch.load(path, map_location="cpu", weights_only=True)``: tensors, numbers,
    strings and containers only; a file that needs any other class is refused rather than
    unpickled. bfloat16 tensors are widened to float32 with a warning. A ``state_dict`` saved by
    PyTorch loads into the equivalent distprop model with ``model.load_state_dict(...)``.

    Raises:
        ImportError: PyTorch is not installed.
        WeightsError: the file is missing, unreadable, or holds more than weights.
    """
    try:
        import torch
    except ImportError as exc:
        raise ImportError("reading a .pt file needs PyTorch (torch.load with weights_only=True); "
                          "distprop never unpickles by itself. Install torch, or convert the file "
                          "to safetensors where torch is installed") from exc
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"PyTorch file {path} does not exist")
    try:
        obj = torch.load(os.fspath(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # UnpicklingError (refused object), RuntimeError, ...
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise WeightsError(f"{path}: torch.load(weights_only=True) refused or failed to read it "
                           f"({first})") from None
    widened: list = []
    out = _torch_to_numpy(obj, torch, widened)
    if widened:
        warnings.warn(f"{path}: bfloat16 tensor(s) {', '.join(widened[:5])} loaded as float32",
                      UserWarning, stacklevel=2)
    return out
