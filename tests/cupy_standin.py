"""A stand-in ``cupy`` for offline GPU checks: NumPy memory, CuPy's launch rules, no device.

Never used by distprop itself: a test installs it in place of CuPy (see :func:`installed`), so
that the GPU branches of distprop run on the CPU as far as their *launches* go:

* ``ndarray`` is a NumPy subclass (the "device" array); module functions (``empty``,
  ``ascontiguousarray``, ...) forward to NumPy and return ``ndarray``;
* ``ElementwiseKernel(...)(*args)`` checks the call the way CuPy's ``ElementwiseKernel.__call__``
  does, using CuPy's own parameter parser and type decision (``_decide_params_type``): the
  argument count, the unification of each type placeholder, the output shapes against the
  broadcast shape, a loop size, and that each scalar fits its declared type. It records the
  launch (:data:`LAUNCHES`); by default it computes nothing (the outputs keep their contents),
  in ``run`` mode (:func:`installed`) it runs CuPy's generated source compiled as host C++;
* ``RawKernel(code, name)(grid, block, args)`` checks each argument against the C signature of
  ``name`` in ``code`` the way CuPy packs them (arrays as pointers of their dtype, NumPy scalars
  as their dtype, a Python int as a 64-bit integer, a Python float as a double) and records it;
* ``cuda.Stream``, ``cuda.Event`` and ``ndarray.set`` record the calls made on them
  (:data:`CALLS`), so the stream ordering of the staging code can be checked.

The stand-in is installed only by the offline tests (never by a ``gpu`` test, never by distprop),
so it cannot make a GPU test pass that would fail on a device.
"""

from __future__ import annotations

import contextlib
import re
import types

import numpy as np

LAUNCHES: list[dict] = []
CALLS: list[tuple] = []
MODE = types.SimpleNamespace(run=False)  # run: launches also compute, as host C++


class LaunchError(AssertionError):
    """A launch that CuPy would reject, or that would misread an argument."""


class ndarray(np.ndarray):  # CuPy's name
    """A "device" array backed by host memory."""

    @property
    def device(self):
        return types.SimpleNamespace(id=0)

    @property
    def data(self):  # CuPy's MemoryPointer: only .ptr is read by distprop
        return types.SimpleNamespace(ptr=self.__array_interface__["data"][0])

    def __setitem__(self, key, value):
        CALLS.append(("setitem", _devices[-1]))
        super().__setitem__(key, value)

    def set(self, host, stream=None):
        CALLS.append(("set", id(self), _stream_name(stream)))
        np.copyto(np.asarray(self), np.asarray(host).reshape(self.shape))

    def get(self, stream=None, out=None):
        CALLS.append(("get", id(self), _stream_name(stream)))
        if out is None:
            return np.array(self)
        np.copyto(out, np.asarray(self).reshape(out.shape))
        return out


def _dev(a):
    return a.view(ndarray) if isinstance(a, np.ndarray) and not isinstance(a, ndarray) else a


_ALLOCATING = {"empty", "empty_like", "zeros", "zeros_like", "ones", "asarray", "array",
               "ascontiguousarray", "full", "arange"}


def _forward(name, fn):
    def call(*args, **kwargs):
        if name in _ALLOCATING:
            CALLS.append(("alloc", name, _devices[-1]))
        return _dev(fn(*args, **kwargs))
    return call


# --- streams and events (recorded, never waited on) --------------------------------------------


class Stream:
    _count = 0

    def __init__(self, non_blocking=False, null=False):
        Stream._count += 1
        self.name = "null" if null else f"stream{Stream._count}"
        self.ptr = 0 if null else Stream._count

    def wait_event(self, event):
        CALLS.append(("wait_event", self.name, event.name))

    def synchronize(self):
        CALLS.append(("synchronize", self.name))

    def __enter__(self):
        _current.append(self)
        return self

    def __exit__(self, *exc):
        _current.pop()
        return False


_NULL = Stream(null=True)
_current: list[Stream] = [_NULL]


def _stream_name(stream):
    return (stream or _current[-1]).name


class Event:
    _count = 0

    def __init__(self, disable_timing=False, **kwargs):
        Event._count += 1
        self.name = f"event{Event._count}"

    def record(self, stream=None):
        CALLS.append(("record", self.name, _stream_name(stream)))

    def synchronize(self):
        CALLS.append(("event_synchronize", self.name))

    @property
    def done(self):
        return True


_devices: list = [None]  # None: no ``with cuda.Device(...)`` around the call


@contextlib.contextmanager
def _device(index=None):
    _devices.append(index)
    try:
        yield
    finally:
        _devices.pop()


class _Runtime:
    @staticmethod
    def getDeviceCount():  # CuPy's name
        return 1

    @staticmethod
    def getDevice():
        return 0


cuda = types.SimpleNamespace(Stream=Stream, Event=Event, Device=_device, runtime=_Runtime,
                             get_current_stream=lambda: _current[-1])

# --- NCCL of one rank: collectives copy between the (host) pointers ---------------------------

_NCCL_ITEMSIZE = {0: 1, 1: 1, 2: 4, 3: 4, 4: 8, 5: 8, 6: 2, 7: 4, 8: 8, 9: 2}


class NcclCommunicator:
    """``cupy.cuda.nccl.NcclCommunicator`` for a world of one rank (records each call)."""

    def __init__(self, ndev, uid, rank):
        if ndev != 1:
            raise LaunchError("the stand-in NCCL has one rank")
        CALLS.append(("nccl_init", _devices[-1]))

    def _copy(self, name, src, dst, count, dtype, stream):
        CALLS.append(("nccl", name, _devices[-1], stream))
        if src != dst:
            import ctypes

            ctypes.memmove(dst, src, count * _NCCL_ITEMSIZE[dtype])

    def allReduce(self, src, dst, count, dtype, op, stream):  # NCCL's names
        self._copy("allReduce", src, dst, count, dtype, stream)

    def bcast(self, ptr, count, dtype, root, stream):
        self._copy("bcast", ptr, ptr, count, dtype, stream)

    def allGather(self, src, dst, count, dtype, stream):
        self._copy("allGather", src, dst, count, dtype, stream)

    def reduceScatter(self, src, dst, count, dtype, op, stream):
        self._copy("reduceScatter", src, dst, count, dtype, stream)


nccl = types.SimpleNamespace(available=True, get_version=lambda: 21903,
                             get_unique_id=lambda: b"stand-in", NcclCommunicator=NcclCommunicator)


# --- kernels --------------------------------------------------------------------------------------


def _real_cupy():
    import cupy  # the real one, for its parser and type rules

    return cupy


class ElementwiseKernel:
    """Checks and records launches as ``cupy.ElementwiseKernel`` would make them."""

    def __init__(self, in_params, out_params, operation, name="kernel", **kwargs):
        self.real = _real_cupy().ElementwiseKernel(in_params, out_params, operation, name,
                                                   **kwargs)
        self.name = name

    def __call__(self, *args, **kwargs):
        k = self.real
        if kwargs:
            raise LaunchError(f"{self.name}: unexpected keyword arguments {sorted(kwargs)}")
        if len(args) not in (k.nin, k.nargs):
            raise LaunchError(f"{self.name}: {len(args)} arguments, CuPy wants {k.nin} or "
                              f"{k.nargs} (with outputs)")
        if len(args) != k.nargs:
            raise LaunchError(f"{self.name}: outputs must be passed (distprop writes in place)")
        params = k.in_params + k.out_params
        for p, a in zip(params, args):
            if isinstance(a, np.ndarray) and not isinstance(a, ndarray):
                raise LaunchError(f"{self.name}: {p.name} is a host (NumPy) array")
        ins, outs = args[:k.nin], args[k.nin:]
        in_dtypes = tuple(a.dtype if isinstance(a, ndarray) else None for a in ins)
        out_dtypes = tuple(a.dtype for a in outs)
        try:
            in_types, out_types, type_map = k._decide_params_type(in_dtypes, out_dtypes)
        except (TypeError, KeyError) as exc:
            raise LaunchError(f"{self.name}: type decision fails: {exc!r}") from exc
        for p, a, t in zip(k.in_params, ins, in_types):
            if not isinstance(a, ndarray):
                _check_scalar(self.name, p.name, a, np.dtype(t))
        loop = [a for p, a in zip(params, args) if isinstance(a, ndarray) and not p.raw]
        if not loop:
            raise LaunchError(f"{self.name}: loop size is undecided (every array is raw)")
        try:
            shape = np.broadcast_shapes(*(a.shape for a in loop))
        except ValueError as exc:
            raise LaunchError(f"{self.name}: {exc}") from exc
        for p, a in zip(k.out_params, outs):
            if not p.raw and a.shape != shape:
                raise LaunchError(f"{self.name}: output {p.name} has shape {a.shape}, the "
                                  f"broadcast shape is {shape}")
        launch = dict(kind="elementwise", name=self.name, kernel=k, args=args,
                      in_types=in_types, type_map=type_map, shape=shape)
        LAUNCHES.append(launch)
        if MODE.run:
            import host_kernels

            code, host, dims = elementwise_code(launch, index_32_bits=True)
            host_kernels.run_elementwise(code, self.name, host, dims)


def elementwise_code(launch: dict, index_32_bits: bool):
    """CuPy's generated source for an elementwise launch (its own generator, with the argument
    infos and type map CuPy's ``__call__`` would use, including ``_reduce_dims``' collapse of
    C-contiguous loop arrays to one dimension), with the arguments and their shape + byte
    strides as the kernel sees them."""
    cupy = _real_cupy()
    from cupy._core import _carray, _kernel, _scalar

    info = _kernel._ArgInfo
    k, args, shape = launch["kernel"], launch["args"], launch["shape"]
    params = k.in_params + k.out_params
    loop = [a for p, a in zip(params, args) if isinstance(a, np.ndarray) and not p.raw]
    reduce = all(a.flags.c_contiguous and a.shape == shape for a in loop)
    lshape = (int(np.prod(shape)),) if reduce else shape
    infos, host, dims = [], [], []
    for i, (p, a) in enumerate(zip(params, args)):
        if isinstance(a, np.ndarray):
            view = a if p.raw else (a.reshape(lshape) if reduce else np.broadcast_to(a, shape))
            infos.append(info(1, cupy.ndarray, a.dtype, view.ndim, bool(view.flags.c_contiguous),
                              index_32_bits))
            host.append(a)
            dims.append(list(view.shape) + list(view.strides))
        else:
            t = np.dtype(launch["in_types"][i])
            infos.append(info(3, _scalar.CScalar, t, 0, True, True))
            host.append(np.array(a, dtype=t))
            dims.append([])
    infos.append(info(2, _carray.Indexer, None, len(lshape), True, index_32_bits))
    dims.append(list(lshape))
    code = _kernel._get_elementwise_kernel_code(tuple(infos), launch["type_map"], k.params,
                                                k.operation, k.name, k.preamble)
    return code, host, dims


def _check_scalar(kernel, name, value, dtype):
    """A scalar for a typed parameter: CuPy casts it to ``dtype``; it must survive the cast."""
    if isinstance(value, np.ndarray):
        raise LaunchError(f"{kernel}: {name} gets a host array")
    if not isinstance(value, int | float | bool | np.generic):
        raise LaunchError(f"{kernel}: {name} gets {type(value).__name__}, not a scalar")
    if dtype.kind in "iu" and not float(value).is_integer():
        raise LaunchError(f"{kernel}: {name} is {dtype} but gets {value!r}")
    if dtype.kind in "iu" and not np.iinfo(dtype).min <= int(value) <= np.iinfo(dtype).max:
        raise LaunchError(f"{kernel}: {name} is {dtype} but {value!r} does not fit")


_C_SCALARS = {"float": "float32", "double": "float64", "long long": "int64", "int": "int32",
              "unsigned int": "uint32", "unsigned long long": "uint64", "bool": "bool",
              "long long int": "int64", "ptrdiff_t": "int64", "size_t": "uint64",
              "int64_t": "int64", "int32_t": "int32"}


def c_signature(code: str, name: str) -> list[tuple[str, bool, str]]:
    """``(C type, is pointer, parameter name)`` of ``extern "C" __global__ void name(...)``."""
    m = re.search(r'extern\s+"C"\s+__global__\s+void\s+' + re.escape(name) + r"\s*\(([^)]*)\)",
                  code)
    if m is None:
        raise LaunchError(f"no extern \"C\" __global__ function {name} in the source")
    out = []
    for part in m.group(1).split(","):
        part = " ".join(part.replace("*", " * ").split())
        words = [w for w in part.split() if w not in ("const", "__restrict__")]
        pointer = "*" in words
        words = [w for w in words if w != "*"]
        out.append((" ".join(words[:-1]), pointer, words[-1]))
    return out


class RawKernel:
    """Checks and records launches as ``cupy.RawKernel`` would pack them."""

    def __init__(self, code, name, options=(), **kwargs):
        self.code, self.name, self.options = code, name, tuple(options)
        self.signature = c_signature(code, name)

    def __call__(self, grid, block, args, shared_mem=0, **kwargs):
        for what, dims in (("grid", grid), ("block", block)):
            if not (isinstance(dims, tuple) and 1 <= len(dims) <= 3
                    and all(isinstance(d, int) and d >= 1 for d in dims)):
                raise LaunchError(f"{self.name}: {what} must be a tuple of 1-3 positive ints, "
                                  f"got {dims!r}")
        if int(np.prod(block)) > 1024:
            raise LaunchError(f"{self.name}: {int(np.prod(block))} threads per block > 1024")
        if len(args) != len(self.signature):
            raise LaunchError(f"{self.name}: {len(args)} arguments for "
                              f"{len(self.signature)} parameters")
        from cupy._core._scalar import get_typename  # CuPy's type names

        for (ctype, pointer, pname), a in zip(self.signature, args):
            if isinstance(a, np.ndarray):
                if not isinstance(a, ndarray):
                    raise LaunchError(f"{self.name}: {pname} gets a host array")
                if not pointer or get_typename(a.dtype) != ctype:
                    raise LaunchError(f"{self.name}: {pname} is {ctype}{'*' * pointer} but "
                                      f"gets an array of {a.dtype}")
                if not a.flags.c_contiguous:
                    raise LaunchError(f"{self.name}: {pname} gets a non-contiguous array")
                continue
            if pointer:
                raise LaunchError(f"{self.name}: pointer {pname} gets {type(a).__name__}")
            # CuPy packs a Python int as int64 and a Python float as float64, whatever the
            # C parameter says; NumPy scalars keep their dtype
            if isinstance(a, bool):
                packed = np.dtype(bool)
            elif isinstance(a, int):
                packed = np.dtype(np.int64)
            elif isinstance(a, float):
                packed = np.dtype(np.float64)
            elif isinstance(a, np.generic):
                packed = a.dtype
            else:
                raise LaunchError(f"{self.name}: {pname} gets {type(a).__name__}")
            want = _C_SCALARS.get(ctype)
            if want is None or np.dtype(want) != packed:
                raise LaunchError(f"{self.name}: {pname} is {ctype} but CuPy passes "
                                  f"{type(a).__name__} {a!r} as {packed}")
        LAUNCHES.append(dict(kind="raw", name=self.name, code=self.code, options=self.options,
                             args=args, grid=grid, block=block))
        if MODE.run:
            import host_kernels

            host_kernels.run_raw(self.code, self.name, grid, block, args)


class ReductionKernel:
    def __init__(self, *args, **kwargs):
        raise LaunchError("ReductionKernel: the offline launch check does not model it yet")


# --- the module -------------------------------------------------------------------------------


def module() -> types.ModuleType:
    """A fresh module object playing ``cupy`` (``__name__ == "cupy"``)."""
    mod = types.ModuleType("cupy")
    for name in ("ndarray", "ElementwiseKernel", "RawKernel", "ReductionKernel", "cuda"):
        setattr(mod, name, globals()[name])
    for name in ("float16", "float32", "float64", "int32", "int64", "uint8", "bool_", "dtype"):
        setattr(mod, name, getattr(np, name))
    mod.asnumpy = lambda a, stream=None: np.array(a)

    def __getattr__(name):  # everything else: the NumPy function, returning device arrays
        fn = getattr(np, name)
        return _forward(name, fn) if callable(fn) else fn

    mod.__getattr__ = __getattr__
    return mod


@contextlib.contextmanager
def installed(monkeypatch, run: bool = False):
    """Make distprop's backend hand out the stand-in as CuPy (and ``cupyx.empty_pinned``);
    with ``run`` the kernels also compute (host C++), else they are only checked."""
    import sys

    from distprop import backend, cuda_kernels

    mod = module()
    monkeypatch.setattr(cuda_kernels, "_cache", {})  # kernel objects of the stand-in only
    monkeypatch.setattr(backend, "_cupy", mod)
    monkeypatch.setattr(backend, "_cupy_checked", True)
    monkeypatch.setitem(sys.modules, "cupyx", cupyx_module())
    LAUNCHES.clear()
    CALLS.clear()
    _current[:] = [_NULL]
    _devices[:] = [None]
    monkeypatch.setattr(MODE, "run", run)
    yield mod


def cupyx_module() -> types.ModuleType:
    """``cupyx`` with ``empty_pinned`` (plain host memory, recorded)."""
    cupyx = types.ModuleType("cupyx")

    def empty_pinned(shape, dtype=np.float64):
        CALLS.append(("empty_pinned", shape))
        return np.empty(shape, dtype)

    cupyx.empty_pinned = empty_pinned
    return cupyx
