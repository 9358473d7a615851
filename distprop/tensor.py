"""Tensor, the autograd graph and the backward walk.

A :class:`Tensor` wraps an xp array (NumPy or CuPy). Operations are :class:`Function` subclasses
(in ``distprop/ops``) whose ``forward`` works on raw arrays and whose ``backward`` maps output
gradients to input gradients. Calling ``Function.apply`` records one graph node when any input
requires a gradient; :meth:`Tensor.backward` walks those nodes in reverse topological order,
iteratively, and accumulates gradients into the leaves (the walk itself is
:mod:`distprop.autograd`; ``backward`` and ``queue_callback`` are re-exported here).
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable

import numpy as np

from distprop import backend
from distprop.autograd import backward, queue_callback  # noqa: F401 (re-exported)
from distprop.tensor_methods import TensorMethods

float16 = np.float16
float32 = np.float32
float64 = np.float64
int32 = np.int32
int64 = np.int64
bool_ = np.bool_

_DEFAULT_DTYPE = np.dtype(np.float32)


class _GradMode(threading.local):
    enabled = True


_grad_mode = _GradMode()


class _AutocastMode(threading.local):
    dtype = None  # the low dtype inside an enabled distprop.amp.autocast, else None
    device_type = None  # 'cpu', 'cuda' or None (every device)


_autocast_mode = _AutocastMode()


def is_grad_enabled() -> bool:
    return _grad_mode.enabled


class _set_grad_enabled(contextlib.ContextDecorator):
    """Context manager (and decorator) setting grad mode; restores the previous one on exit.

    A class rather than a generator context manager: ``no_grad()`` runs in hot loops (e.g.
    batch norm's running statistics), and this costs a fraction of contextlib's generator.
    """

    __slots__ = ("mode", "previous")

    def __init__(self, mode: bool) -> None:
        self.mode = mode
        self.previous = []  # a stack: one object may be entered again inside itself

    def __enter__(self) -> None:
        self.previous.append(_grad_mode.enabled)
        _grad_mode.enabled = self.mode

    def __exit__(self, *exc) -> bool:
        _grad_mode.enabled = self.previous.pop()
        return False

    def _recreate_cm(self):  # a decorated function gets a fresh one per call (re-entrant)
        return _set_grad_enabled(self.mode)


def no_grad():
    """Context manager (and decorator) under which no graph is recorded."""
    return _set_grad_enabled(False)


def enable_grad():
    return _set_grad_enabled(True)


def get_default_dtype():
    return _DEFAULT_DTYPE


def set_default_dtype(dtype) -> None:
    global _DEFAULT_DTYPE
    dtype = np.dtype(dtype)
    if dtype.kind != "f":
        raise TypeError(f"default dtype must be a floating type, got {dtype}")
    _DEFAULT_DTYPE = dtype


class Function:
    """One differentiable operation: ``forward`` on arrays, ``backward`` on gradients.

    Subclasses implement ``forward(self, *inputs, **kwargs)`` receiving raw arrays for Tensor
    inputs (other arguments as given) and returning an array or a tuple of arrays, and
    ``backward(self, *grad_outputs)`` returning one gradient (or None) per positional input.
    State for backward is kept on ``self``; ``self.needs_input_grad`` says which inputs need one.
    """

    __slots__ = ("inputs", "needs_input_grad", "outputs_meta", "_freed", "__dict__")

    #: Outputs that are not differentiable (e.g. argmax indices); indices into the output tuple.
    non_differentiable_outputs: tuple[int, ...] = ()
    #: Under :class:`distprop.amp.autocast`: ``'lower'`` (GEMMs: float32 inputs -> float16),
    #: ``'fp32'`` (float16 inputs -> float32) or None (inputs' dtypes). See distprop/amp.py.
    amp_policy: str | None = None

    @classmethod
    def apply(cls, *args, **kwargs):
        if _autocast_mode.dtype is not None and cls.amp_policy is not None:
            from distprop.amp import cast_inputs

            args = cast_inputs(cls.amp_policy, args)
        fn = cls()
        # One pass over the arguments: raw arrays for forward, which inputs need a gradient,
        # and the graph edges (Tensors, None elsewhere).
        arrays = []
        needs = []
        inputs = []
        any_needs = False
        for a in args:
            if isinstance(a, Tensor):
                arrays.append(a.data)
                inputs.append(a)
                if a.requires_grad:
                    needs.append(True)
                    any_needs = True
                else:
                    needs.append(False)
            else:
                arrays.append(a)
                inputs.append(None)
                needs.append(False)
        record = any_needs and _grad_mode.enabled
        fn.needs_input_grad = tuple(needs)
        result = fn.forward(*arrays, **kwargs)
        if not isinstance(result, tuple):  # the common case: one output
            if isinstance(result, np.generic):
                result = np.asarray(result)
            t = _new_tensor(Tensor)
            t.data = result
            t.grad = None
            t._output_index = 0
            t._retains_grad = False
            t._grad_buffer = None
            t._post_accumulate_hooks = None
            if record:
                if 0 in cls.non_differentiable_outputs:
                    t.requires_grad = False
                    t._ctx = None
                else:
                    t.requires_grad = True
                    t._ctx = fn
                fn.inputs = tuple(inputs)
                fn.outputs_meta = ((result.shape, result.dtype),)
                fn._freed = False
            else:
                t.requires_grad = False
                t._ctx = None
            return t
        wrapped = []
        non_diff = cls.non_differentiable_outputs
        for i, out in enumerate(result):
            if isinstance(out, np.generic):
                out = np.asarray(out)
            differentiable = record and i not in non_diff
            t = Tensor._wrap(out, requires_grad=differentiable)
            if differentiable:
                t._ctx = fn
                t._output_index = i
            wrapped.append(t)
        if record:
            fn.inputs = tuple(inputs)
            fn.outputs_meta = tuple((t.data.shape, t.data.dtype) for t in wrapped)
            fn._freed = False
        return tuple(wrapped)

    def forward(self, *inputs, **kwargs):  # pragma: no cover - abstract
        raise NotImplementedError(f"{type(self).__name__} has no forward")

    def backward(self, *grad_outputs):  # pragma: no cover - abstract
        raise NotImplementedError(f"{type(self).__name__} is not differentiable")

    def release(self) -> None:
        """Drop what forward saved for backward (called after backward unless retain_graph)."""
        self.__dict__.clear()
        self._freed = True


class Tensor(TensorMethods):
    """An n-dimensional array that can record the operations applied to it.

    Its operators and math methods (``+``, ``@``, ``.sum()``, ...) are the functions of
    :mod:`distprop.ops`, bound at import; :mod:`distprop.tensor_methods` declares them.

    Attributes:
        data: the underlying NumPy or CuPy array.
        grad: a Tensor holding the accumulated gradient, or None.
        requires_grad: whether operations on this tensor are recorded.
    """

    __slots__ = (
        "data",
        "grad",
        "requires_grad",
        "_ctx",
        "_output_index",
        "_retains_grad",
        "_grad_buffer",
        "_post_accumulate_hooks",
        "__weakref__",
    )
    __array_priority__ = 1000  # so ndarray.__mul__(tensor) defers to Tensor.__rmul__

    def __init__(self, data, requires_grad: bool = False, dtype=None, device=None):
        if isinstance(data, Tensor):
            data = data.data
        dev = backend.device(device) if device is not None else None
        self.data = _as_array(data, dtype, dev)
        self.grad: Tensor | None = None
        self._ctx: Function | None = None
        self._output_index = 0
        self._retains_grad = False
        self._grad_buffer = None
        self._post_accumulate_hooks: list | None = None
        self.requires_grad = False
        if requires_grad:
            self.requires_grad_(True)

    @classmethod
    def _wrap(cls, array, requires_grad: bool = False) -> Tensor:
        t = cls.__new__(cls)
        t.data = array
        t.grad = None
        t.requires_grad = requires_grad
        t._ctx = None
        t._output_index = 0
        t._retains_grad = False
        t._grad_buffer = None
        t._post_accumulate_hooks = None
        return t

    # --- basic properties -------------------------------------------------------------------

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.data.shape)

    @property
    def dtype(self):
        return self.data.dtype

    @property
    def ndim(self) -> int:
        return self.data.ndim

    @property
    def device(self) -> backend.Device:
        return backend.device_of(self.data)

    @property
    def is_leaf(self) -> bool:
        return self._ctx is None

    @property
    def grad_fn(self) -> Function | None:
        return self._ctx

    @property
    def T(self) -> Tensor:
        return self.permute(*reversed(range(self.ndim)))

    def size(self, dim: int | None = None):
        return self.shape if dim is None else self.shape[dim]

    def dim(self) -> int:
        return self.ndim

    def numel(self) -> int:
        return int(self.data.size)

    def __len__(self) -> int:
        if self.ndim == 0:
            raise TypeError("len() of a 0-d tensor")
        return self.shape[0]

    def __iter__(self):
        # Without this, Python would iterate a 0-d tensor as empty (its [0] is an IndexError).
        if self.ndim == 0:
            raise TypeError("iteration over a 0-d tensor")
        return (self[i] for i in range(self.shape[0]))

    def __repr__(self) -> str:
        extra = ""
        if self._ctx is not None:
            extra = f", grad_fn=<{type(self._ctx).__name__}>"
        elif self.requires_grad:
            extra = ", requires_grad=True"
        dev = self.device
        dev_s = "" if not dev.is_cuda else f", device='{dev}'"
        body = np.array2string(backend.to_host(self.data), separator=", ", precision=4)
        return f"tensor({body}, dtype={self.dtype}{dev_s}{extra})"

    # --- conversion -------------------------------------------------------------------------

    def numpy(self) -> np.ndarray:
        """A host NumPy copy-free view when on the CPU (a copy from a GPU)."""
        return backend.to_host(self.data)

    def item(self):
        if self.data.size != 1:
            raise ValueError(
                f"only a tensor with one element can be converted to a Python scalar, "
                f"got shape {self.shape}"
            )
        return self.data.reshape(()).item()

    def tolist(self):
        return self.numpy().tolist()

    def __float__(self):
        return float(self.item())

    def __int__(self):
        return int(self.item())

    def __bool__(self):
        return bool(self.item())

    def __array__(self, dtype=None, copy=None):
        arr = self.numpy()
        return arr if dtype is None else arr.astype(dtype)

    def detach(self) -> Tensor:
        """A tensor sharing this one's data, cut from the graph."""
        return Tensor._wrap(self.data)

    def detach_(self) -> Tensor:
        self._ctx = None
        self.requires_grad = False
        return self

    def clone(self) -> Tensor:
        from distprop.ops import shape as _shape

        return _shape.Clone.apply(self)

    def requires_grad_(self, requires_grad: bool = True) -> Tensor:
        if requires_grad and self.data.dtype.kind not in "fc":
            raise RuntimeError(
                f"only floating-point tensors can require gradients, got dtype {self.dtype}"
            )
        if not requires_grad and self._ctx is not None:
            raise RuntimeError(
                "requires_grad_(False) is only allowed on leaf tensors; use detach()"
            )
        self.requires_grad = requires_grad
        return self

    def retain_grad(self) -> None:
        """Keep ``.grad`` on this non-leaf tensor after backward."""
        if not self.requires_grad:
            raise RuntimeError("cannot retain_grad() on a tensor that does not require grad")
        self._retains_grad = True

    def to(self, device=None, dtype=None) -> Tensor:
        """This tensor on another device and/or dtype (differentiable)."""
        from distprop.ops import shape as _shape

        if isinstance(device, (type, np.dtype)) and dtype is None:
            device, dtype = None, device
        out = self
        if dtype is not None and np.dtype(dtype) != self.dtype:
            out = _shape.Cast.apply(out, dtype=np.dtype(dtype))
        if device is not None:
            dev = backend.device(device)
            if dev != self.device:
                out = _shape.ToDevice.apply(out, device=dev)
        return out

    def cpu(self) -> Tensor:
        return self.to("cpu")

    def cuda(self, index: int | None = None) -> Tensor:
        return self.to("cuda" if index is None else f"cuda:{index}")

    def float(self) -> Tensor:
        return self.to(dtype=np.float32)

    def double(self) -> Tensor:
        return self.to(dtype=np.float64)

    def type_as(self, other: Tensor) -> Tensor:
        return self.to(dtype=other.dtype)

    # --- hooks used by flat buffers and DistributedDataParallel -----------------------------

    def register_post_accumulate_grad_hook(self, hook: Callable[[Tensor], None]):
        """Call ``hook(tensor)`` once per backward, when this leaf's gradient is final."""
        if self._ctx is not None:
            raise RuntimeError("post-accumulate-grad hooks can only be registered on leaf tensors")
        if self._post_accumulate_hooks is None:
            self._post_accumulate_hooks = []
        self._post_accumulate_hooks.append(hook)
        return _HookHandle(self._post_accumulate_hooks, hook)

    # --- autograd ---------------------------------------------------------------------------

    def backward(self, gradient=None, retain_graph: bool = False) -> None:
        """Accumulate d(self)/d(leaf) into every leaf's ``.grad``.

        Args:
            gradient: the gradient of some scalar with respect to this tensor; may be omitted
                only when this tensor has a single element.
            retain_graph: keep the graph so backward can run through it again.
        """
        backward([self], [gradient], retain_graph=retain_graph)

    def _accumulate(self, grad) -> None:
        """Add ``grad`` (an array) into ``self.grad``; in place when a buffer backs it."""
        if self.grad is None:
            if self._grad_buffer is not None:
                if grad is not self._grad_buffer:  # an op may have written it in place already
                    self._grad_buffer[...] = grad
                self.grad = Tensor._wrap(self._grad_buffer)
            else:
                if grad.dtype != self.data.dtype:
                    grad = grad.astype(self.data.dtype)
                if grad.shape != self.data.shape:
                    grad = backend.get_array_module(grad).broadcast_to(grad, self.data.shape).copy()
                self.grad = Tensor._wrap(grad)
        elif self._grad_buffer is not None and self.grad.data is self._grad_buffer:
            self._grad_buffer += grad
        else:
            self.grad = Tensor._wrap(self.grad.data + grad)


_new_tensor = object.__new__


class _HookHandle:
    def __init__(self, hooks: list, hook):
        self._hooks, self._hook = hooks, hook

    def remove(self) -> None:
        if self._hook in self._hooks:
            self._hooks.remove(self._hook)


def _as_array(data, dtype, dev: backend.Device | None):
    """Turn user data into an xp array following torch.tensor's dtype inference."""
    if dtype is not None:
        dtype = np.dtype(dtype)
    xp_target = backend.xp_for(dev) if dev is not None else None
    mod = backend.get_array_module(data)
    if mod is not np and not isinstance(data, np.ndarray):
        array = data  # already a CuPy array
    else:
        if isinstance(data, np.ndarray):
            array = data
        else:
            array = np.asarray(data)
            if array.dtype == np.float64 and dtype is None:
                array = array.astype(_DEFAULT_DTYPE)
        if array.dtype == object:
            raise TypeError("tensor() got data of object dtype: pass numbers or arrays of numbers")
    if dtype is not None and array.dtype != dtype:
        array = array.astype(dtype)
    if dev is not None and backend.device_of(array) != dev:
        array = backend.to_device(array, dev)
    elif xp_target is None and array.ndim == 0 and isinstance(array, np.ndarray):
        array = np.asarray(array)
    return array


def as_array(value):
    """A value to load (Tensor, NumPy/CuPy array, torch tensor or number) as an xp array.

    Arrays pass through without a copy; torch tensors are accepted so that a PyTorch
    ``state_dict`` loads directly.
    """
    if isinstance(value, Tensor):
        return value.data
    if hasattr(value, "detach") and hasattr(value, "cpu"):  # a torch tensor
        return value.detach().cpu().numpy()
    if hasattr(value, "shape") and hasattr(value, "dtype"):
        return value
    return np.asarray(value)


def tensor(data, dtype=None, requires_grad: bool = False, device=None) -> Tensor:
    """Build a Tensor from data (lists, scalars, NumPy/CuPy arrays or Tensors), copying it.

    Python floats become float32 (the default dtype) as in PyTorch; NumPy arrays keep theirs.
    """
    if isinstance(data, Tensor):
        data = data.data
    xp = backend.get_array_module(data)
    if isinstance(data, np.ndarray) or xp is not np:
        data = data.copy()
    return Tensor(data, requires_grad=requires_grad, dtype=dtype, device=device)


def as_tensor(data, dtype=None, device=None) -> Tensor:
    """Like :func:`tensor`, but shares memory with ``data`` when possible."""
    if isinstance(data, Tensor):
        return data.to(device=device, dtype=dtype) if (dtype or device) else data
    return Tensor(data, dtype=dtype, device=device)


def from_numpy(array: np.ndarray) -> Tensor:
    return Tensor(array)
