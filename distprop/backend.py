"""Array backends: NumPy on the CPU, CuPy on CUDA devices.

This is the only module that imports CuPy. Everything else asks for ``xp`` (the array module of
an array or a device) and writes one body of code for both.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass

import numpy as np

_cupy = None
_cupy_error: str | None = None
_cupy_checked = False


def _load_cupy():
    global _cupy, _cupy_error, _cupy_checked
    if not _cupy_checked:
        _cupy_checked = True
        if os.environ.get("DISTPROP_NO_CUPY"):
            _cupy_error = "CuPy disabled by DISTPROP_NO_CUPY"
        else:
            try:
                import cupy

                _cupy = cupy
            except Exception as exc:  # ImportError, or a broken CUDA install
                _cupy_error = f"CuPy is not importable ({type(exc).__name__}: {exc})"
    return _cupy


def cupy_module():
    """Return the ``cupy`` module, or None when it is not installed."""
    return _load_cupy()


def cupy_available() -> bool:
    return _load_cupy() is not None


def gpu_count() -> int:
    """Number of CUDA devices CuPy can see (0 without CuPy or a driver)."""
    cp = _load_cupy()
    if cp is None:
        return 0
    try:
        return int(cp.cuda.runtime.getDeviceCount())
    except Exception:
        return 0


@dataclass(frozen=True)
class Device:
    """A place arrays live: ``Device("cpu")`` or ``Device("cuda", 0)``."""

    type: str
    index: int | None = None

    def __str__(self) -> str:
        return self.type if self.index is None else f"{self.type}:{self.index}"

    def __repr__(self) -> str:
        return f"device(type='{self.type}'" + (
            ")" if self.index is None else f", index={self.index})"
        )

    @property
    def is_cuda(self) -> bool:
        return self.type == "cuda"


CPU = Device("cpu")
_DEVICE_RE = re.compile(r"^(cpu|cuda)(?::(\d+))?$")


def device(spec: str | Device | None = None) -> Device:
    """Parse ``"cpu"``, ``"cuda"`` or ``"cuda:N"`` into a :class:`Device`.

    Asking for a CUDA device without CuPy or without a GPU raises ``RuntimeError`` saying which
    of the two is missing.
    """
    if spec is None:
        return CPU
    if isinstance(spec, Device):
        return spec
    if not isinstance(spec, str):
        raise TypeError(f"device must be a string like 'cpu' or 'cuda:0', got {spec!r}")
    match = _DEVICE_RE.match(spec.strip().lower())
    if not match:
        raise ValueError(f"unknown device {spec!r}: expected 'cpu', 'cuda' or 'cuda:N'")
    kind, index = match.group(1), match.group(2)
    if kind == "cpu":
        if index is not None:
            raise ValueError(f"unknown device {spec!r}: the CPU device takes no index")
        return CPU
    cp = _load_cupy()
    if cp is None:
        raise RuntimeError(
            f"device {spec!r} needs CuPy, which is missing: {_cupy_error}. "
            "Install it with: pip install 'distprop[gpu]'"
        )
    count = gpu_count()
    if count == 0:
        raise RuntimeError(f"device {spec!r} needs a CUDA GPU, but CuPy sees none")
    idx = cp.cuda.runtime.getDevice() if index is None else int(index)
    if idx >= count:
        raise RuntimeError(f"device {spec!r} does not exist: CuPy sees {count} GPU(s)")
    return Device("cuda", idx)


def device_of(array) -> Device:
    """The device an array lives on."""
    if type(array) is np.ndarray or np.isscalar(array):
        return CPU
    cp = _load_cupy()
    if cp is not None and isinstance(array, cp.ndarray):
        return Device("cuda", int(array.device.id))
    return CPU


def get_array_module(*arrays):
    """``numpy`` or ``cupy``, whichever the arrays belong to (Chainer's idiom)."""
    cp = _load_cupy()
    if cp is not None:
        for a in arrays:
            if isinstance(a, cp.ndarray):
                return cp
    return np


def xp_for(dev: Device):
    """The array module for a device."""
    if dev.is_cuda:
        return _load_cupy()
    return np


def to_device(array, dev: Device):
    """Copy (or pass through) an array onto ``dev``."""
    if dev.is_cuda:
        cp = _load_cupy()
        with cp.cuda.Device(dev.index):
            if isinstance(array, cp.ndarray) and array.device.id != dev.index:
                return array.copy()  # ndarray.copy() copies onto the current device
            return cp.asarray(array)
    return to_host(array)


def to_host(array) -> np.ndarray:
    """A NumPy array with the same values (no copy when it already is one)."""
    if type(array) is np.ndarray:
        return array
    cp = _load_cupy()
    if cp is not None and isinstance(array, cp.ndarray):
        return cp.asnumpy(array)
    return np.asarray(array)


def device_context(dev: Device):
    """A context manager that makes ``dev`` current for CuPy (a no-op on the CPU)."""
    if dev.is_cuda:
        return _load_cupy().cuda.Device(dev.index)
    return _NullContext()


class _NullContext:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


# --- special functions not in NumPy ---------------------------------------------------------

_np_erf = None


def erf(x):
    """Elementwise error function for NumPy or CuPy arrays."""
    global _np_erf
    xp = get_array_module(x)
    if xp is not np:
        import cupyx.scipy.special

        return cupyx.scipy.special.erf(x)
    if _np_erf is None:
        try:
            from scipy.special import erf as scipy_erf

            _np_erf = scipy_erf
        except ImportError:
            vec = np.frompyfunc(math.erf, 1, 1)

            def _np_erf(a):
                return vec(a).astype(a.dtype)

    return _np_erf(x)


# --- random numbers -------------------------------------------------------------------------

_generator = np.random.default_rng()


def manual_seed(seed: int) -> None:
    """Seed the generator behind initialisers, dropout and shuffling (and CuPy's, if present)."""
    global _generator
    _generator = np.random.default_rng(int(seed))
    cp = _load_cupy() if _cupy_checked else None
    if cp is not None:
        try:
            cp.random.seed(int(seed))
        except Exception:
            pass


def seed_rank(seed: int, rank: int, *extra: int) -> None:
    """Give this rank its own stream: the global generator becomes
    ``default_rng(SeedSequence(seed).spawn(world)[rank])`` (the same stream for any world size,
    since child ``rank`` of a SeedSequence does not depend on how many are spawned); ``extra``
    keys derive a further independent stream (a resume on another number of ranks). CuPy's
    generator is seeded from the same sequence."""
    global _generator
    sequence = np.random.SeedSequence(int(seed), spawn_key=(int(rank), *map(int, extra)))
    _generator = np.random.default_rng(sequence)
    cp = _load_cupy() if _cupy_checked else None
    if cp is not None:
        try:
            cp.random.seed(int(sequence.generate_state(1, np.uint64)[0] >> np.uint64(1)))
        except Exception:
            pass


def generator() -> np.random.Generator:
    """The global host generator (seeded by :func:`manual_seed`)."""
    return _generator


def get_rng_state() -> dict:
    """The generator's state as plain JSON-able data (for checkpoints)."""
    return _generator.bit_generator.state


def set_rng_state(state: dict) -> None:
    global _generator
    gen = np.random.default_rng()
    gen.bit_generator.state = state
    _generator = gen


def random_uniform(shape, dtype, dev: Device, low: float = 0.0, high: float = 1.0):
    """Uniform samples on ``dev``; drawn on the host so results do not depend on the device."""
    values = _generator.uniform(low, high, size=shape).astype(dtype, copy=False)
    return to_device(values, dev) if dev.is_cuda else values


def random_normal(shape, dtype, dev: Device, mean: float = 0.0, std: float = 1.0):
    values = _generator.normal(mean, std, size=shape).astype(dtype, copy=False)
    return to_device(values, dev) if dev.is_cuda else values


def bernoulli_mask(shape, keep_prob: float, dtype, dev: Device):
    """A 0/1 mask with P(1) = keep_prob, made on the array's own device."""
    if dev.is_cuda:
        cp = _load_cupy()
        with cp.cuda.Device(dev.index):
            return (cp.random.random_sample(shape, dtype=np.float32) < keep_prob).astype(dtype)
    return (_generator.random(size=shape, dtype=np.float32) < keep_prob).astype(dtype)
