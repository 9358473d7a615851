"""Mixed precision: :class:`autocast` and :class:`GradScaler`, with PyTorch's semantics.

Inside ``with dp.amp.autocast():`` the GEMM ops (matmul, linear, convolutions, attention) cast
their float32 inputs to float16 and return float16; reductions and numerically sensitive ops
(sum, mean, exp, log, softmax, log_softmax, BatchNorm, LayerNorm and every loss) cast float16
inputs up and run in float32 (PyTorch's CUDA lists); other ops run in their inputs' dtypes, and
mixed float16/float32 operands promote to float32 as in PyTorch. Parameters stay float32 (master
weights): the cast is a graph op whose backward casts the gradient back, so float32 parameters
get float32 gradients. Outside autocast nothing changes.

Casts are not cached (PyTorch caches the float16 copy of each weight inside one autocast
region); a weight used twice in one forward is cast twice.

On NumPy a float16 GEMM runs as a float32 BLAS GEMM of the float16 operands, rounded once to
float16 (float32 accumulation, as GPU tensor cores do); NumPy's own float16 matmul has no BLAS.

bfloat16 is refused with a clear error: NumPy and CuPy have no bfloat16 dtype, and emulating it
by rounding float32 mantissas would give float32 arrays that are neither faster nor smaller --
a silent imitation on exactly the platform (the GPU) where the speed is the point.

:class:`GradScaler` multiplies the loss by a scale so float16 gradients do not underflow, divides
the gradients back before the optimizer step (one pass over each flat gradient buffer, which also
finds inf/NaN), skips the step when any are non-finite and adapts the scale. Under
:class:`~distprop.distributed.DistributedDataParallel` the gradients are already averaged when
the scaler looks at them, so every rank takes the same decision; DDP's non-finite guard then
leaves the decision to the scaler instead of raising.
"""

from __future__ import annotations

import contextlib
import math
import weakref

import numpy as np

from distprop import backend
from distprop.tensor import Tensor, _autocast_mode

__all__ = ["GradScaler", "autocast", "cast_inputs", "is_autocast_enabled", "get_autocast_dtype",
           "mixed_ok"]

_BF16_MESSAGE = ("bfloat16 is not available: NumPy and CuPy have no bfloat16 dtype (and "
                 "distprop does not emulate it); use dtype=float16")


def _resolve_dtype(dtype) -> np.dtype:
    """float16 (the default) or a clear ValueError; bfloat16 in any spelling is refused."""
    if dtype is None:
        return np.dtype(np.float16)
    name = dtype if isinstance(dtype, str) else getattr(dtype, "__name__", None) or str(dtype)
    name = name.lower().replace("torch.", "")
    if name in ("bfloat16", "bf16"):
        raise ValueError(f"autocast: {_BF16_MESSAGE}")
    if name in ("float16", "half", "fp16"):
        return np.dtype(np.float16)
    try:
        resolved = np.dtype(dtype)
    except TypeError:
        resolved = None
    if resolved != np.float16:
        raise ValueError(f"autocast: dtype must be float16 (bfloat16 is not supported), got "
                         f"{dtype!r}")
    return resolved


class autocast(contextlib.ContextDecorator):  # PyTorch's name
    """Context manager (and decorator) running the ops inside it in mixed precision.

    Args:
        device_type: ``'cpu'`` or ``'cuda'``: only tensors on that kind of device are cast;
            None (the default) casts tensors on any device. A dtype given here positionally
            (``autocast(dp.float16)``) is taken as ``dtype``.
        dtype: the low precision type, ``float16`` (the default; also ``'float16'``/``'half'``).
            bfloat16 raises ValueError (NumPy and CuPy have no such dtype).
        enabled: False makes the region a no-op (inside an enabled region it disables autocast,
            as in PyTorch).

    Nesting restores the outer state on exit; the state is per thread.
    """

    def __init__(self, device_type=None, dtype=None, enabled: bool = True):
        if device_type is not None and not isinstance(device_type, str):
            if dtype is not None:
                raise ValueError(f"autocast: device_type must be 'cpu', 'cuda' or None, got "
                                 f"{device_type!r}")
            device_type, dtype = None, device_type
        if device_type not in (None, "cpu", "cuda"):
            raise ValueError(f"autocast: device_type must be 'cpu', 'cuda' or None, got "
                             f"{device_type!r}")
        self.device_type = device_type
        self.dtype = _resolve_dtype(dtype)
        self.enabled = bool(enabled)
        self._saved: list[tuple] = []

    def __enter__(self):
        self._saved.append((_autocast_mode.dtype, _autocast_mode.device_type))
        _autocast_mode.dtype = self.dtype if self.enabled else None
        _autocast_mode.device_type = self.device_type if self.enabled else None
        return self

    def __exit__(self, *exc) -> bool:
        _autocast_mode.dtype, _autocast_mode.device_type = self._saved.pop()
        return False


def is_autocast_enabled() -> bool:
    """True inside an enabled :class:`autocast` region (in this thread)."""
    return _autocast_mode.dtype is not None


def get_autocast_dtype():
    """The low dtype of the enclosing :class:`autocast` region, or None outside one."""
    return _autocast_mode.dtype


def mixed_ok(*dtypes) -> bool:
    """True inside autocast when ``dtypes`` are a float16/float32 mix that the ops reconcile
    (layers use it to accept a float16 activation with float32 parameters)."""
    return _autocast_mode.dtype is not None and all(
        np.dtype(d) in (np.float16, np.float32) for d in dtypes)


def _on_autocast_device(t: Tensor) -> bool:
    kind = _autocast_mode.device_type
    if kind is None:
        return True
    return (kind == "cpu") == isinstance(t.data, np.ndarray)


def cast_inputs(policy: str, args: tuple) -> tuple:
    """``args`` with floating Tensors cast for an op of ``policy`` (see
    :attr:`distprop.tensor.Function.amp_policy`): ``'lower'`` casts float32 to the autocast
    dtype (float64 stays float64, as in PyTorch), ``'fp32'`` casts float16 to float32. The casts
    are differentiable (their backward casts the gradient back)."""
    if policy == "lower":
        source, target = np.float32, _autocast_mode.dtype
    elif policy == "fp32":
        source, target = np.float16, np.float32
    else:
        raise ValueError(f"unknown autocast policy {policy!r}")
    out = None
    for i, a in enumerate(args):
        if isinstance(a, Tensor) and a.data.dtype == source and _on_autocast_device(a):
            if out is None:
                out = list(args)
            out[i] = a.to(dtype=target)
    return args if out is None else tuple(out)


# -- loss scaling ---------------------------------------------------------------------------------

# GradScalers that scaled a loss and have not run update() yet (weakly: a dropped one leaves).
_PENDING: weakref.WeakSet = weakref.WeakSet()


def loss_is_scaled() -> bool:
    """True between a :meth:`GradScaler.scale` and the matching :meth:`GradScaler.update`:
    non-finite gradients are then the scaler's business (it skips the step)."""
    return len(_PENDING) > 0


_READY, _UNSCALED, _STEPPED = 0, 1, 2


def _unscale_and_check(grad, inv_scale: float) -> bool:
    """``grad *= inv_scale`` in place; True when every element is finite (one isfinite pass)."""
    if grad.size == 0:
        return True
    if inv_scale != 1.0:
        grad *= inv_scale  # a Python float keeps the grad's dtype (NEP 50)
    xp = backend.get_array_module(grad)
    return bool(xp.isfinite(grad).all())


def _optimizer_grads(optimizer):
    """The optimizer's gradients as few arrays as possible: each segment's slice of its flat
    gradient buffer when all its gradients live there, else the parameters' own gradients."""
    layout = getattr(optimizer, "_layout", None)
    for index, group in enumerate(optimizer.param_groups):
        segments = layout(index).segments if layout is not None else None
        if segments is None:
            yield from (p.grad.data for p in group["params"] if p.grad is not None)
            continue
        for seg in segments:
            buf, n = seg.buffer, len(seg.params)
            if buf is not None and all(buf.grad_in_place(seg.first + k) for k in range(n)):
                a, b = buf.span(seg.first, seg.first + n)
                yield buf.grad[a:b]
            else:
                yield from (p.grad.data for p in seg.params if p.grad is not None)


class GradScaler:
    """Dynamic loss scaling for float16 training (PyTorch's ``torch.amp.GradScaler``).

    Typical step::

        with dp.amp.autocast():
            loss = loss_fn(model(x), y)
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)      # optional: e.g. before clipping
        scaler.step(optimizer)          # skipped when a gradient is inf/NaN
        scaler.update()                 # backoff after a skip, growth after growth_interval

    Args:
        device: accepted for PyTorch compatibility (``'cpu'``/``'cuda'``/None); unused.
        init_scale: the first scale.
        growth_factor: multiplies the scale after ``growth_interval`` steps without inf/NaN.
        backoff_factor: multiplies the scale after a step with inf/NaN gradients.
        growth_interval: consecutive good steps before the scale grows.
        enabled: False makes every method a pass-through (``step`` just calls the optimizer).
    """

    def __init__(self, device: str | None = None, init_scale: float = 2.0 ** 16,
                 growth_factor: float = 2.0, backoff_factor: float = 0.5,
                 growth_interval: int = 2000, enabled: bool = True):
        if device not in (None, "cpu", "cuda"):
            raise ValueError(f"GradScaler: device must be 'cpu', 'cuda' or None, got {device!r}")
        self._check(init_scale, growth_factor, backoff_factor, growth_interval)
        self._enabled = bool(enabled)
        self._scale = float(np.float32(init_scale))
        self._growth_factor, self._backoff_factor = float(growth_factor), float(backoff_factor)
        self._growth_interval = int(growth_interval)
        self._growth_tracker = 0
        self._per_optimizer: dict[int, dict] = {}
        #: Steps skipped because of inf/NaN gradients (since construction).
        self.skipped_steps = 0

    @staticmethod
    def _check(init_scale, growth_factor, backoff_factor, growth_interval) -> None:
        if not (isinstance(init_scale, (int, float)) and math.isfinite(init_scale)
                and init_scale > 0):
            raise ValueError(f"GradScaler: init_scale must be a positive finite number, got "
                             f"{init_scale!r}")
        if not (isinstance(growth_factor, (int, float)) and growth_factor > 1.0):
            raise ValueError(f"GradScaler: growth_factor must be > 1, got {growth_factor!r}")
        if not (isinstance(backoff_factor, (int, float)) and 0.0 < backoff_factor < 1.0):
            raise ValueError(f"GradScaler: backoff_factor must be in (0, 1), got "
                             f"{backoff_factor!r}")
        if isinstance(growth_interval, bool) or not isinstance(growth_interval, int) \
                or growth_interval < 1:
            raise ValueError(f"GradScaler: growth_interval must be a positive integer, got "
                             f"{growth_interval!r}")

    def is_enabled(self) -> bool:
        return self._enabled

    def get_scale(self) -> float:
        """The current scale (1.0 when disabled)."""
        return self._scale if self._enabled else 1.0

    def get_growth_factor(self) -> float:
        return self._growth_factor

    def get_backoff_factor(self) -> float:
        return self._backoff_factor

    def get_growth_interval(self) -> int:
        return self._growth_interval

    def scale(self, outputs):
        """``outputs`` (a Tensor, or a list/tuple of them) multiplied by the scale."""
        if not self._enabled:
            return outputs
        if isinstance(outputs, Tensor):
            _PENDING.add(self)
            return outputs * self._scale
        if isinstance(outputs, (list, tuple)):
            return type(outputs)(self.scale(o) for o in outputs)
        raise TypeError(f"GradScaler.scale expects a Tensor or a list/tuple of Tensors, got "
                        f"{type(outputs).__name__}")

    def _state(self, optimizer) -> dict:
        return self._per_optimizer.setdefault(id(optimizer), {"stage": _READY, "found_inf": False})

    def unscale_(self, optimizer) -> None:
        """Divide ``optimizer``'s gradients by the scale in place (once per step) and record
        whether any is inf/NaN."""
        if not self._enabled:
            return
        state = self._state(optimizer)
        if state["stage"] == _UNSCALED:
            raise RuntimeError("unscale_() has already been called on this optimizer since the "
                               "last update().")
        if state["stage"] == _STEPPED:
            raise RuntimeError("unscale_() is being called after step().")
        inv_scale = float(np.float32(1.0 / self._scale))
        found_inf = False
        for grad in _optimizer_grads(optimizer):
            if not _unscale_and_check(grad, inv_scale):
                found_inf = True  # keep unscaling the rest, as PyTorch does
        state["found_inf"], state["stage"] = found_inf, _UNSCALED

    def step(self, optimizer, *args, **kwargs):
        """Unscale (unless done) and run ``optimizer.step()`` unless a gradient is inf/NaN;
        returns what ``step`` returned, or None when skipped."""
        if not self._enabled:
            return optimizer.step(*args, **kwargs)
        state = self._state(optimizer)
        if state["stage"] == _STEPPED:
            raise RuntimeError("step() has already been called since the last update().")
        if state["stage"] == _READY:
            self.unscale_(optimizer)
        state["stage"] = _STEPPED
        if state["found_inf"]:
            self.skipped_steps += 1
            return None
        return optimizer.step(*args, **kwargs)

    def update(self, new_scale: float | None = None) -> None:
        """Adapt the scale: back off after any inf/NaN this step, grow after
        ``growth_interval`` clean steps; or set ``new_scale``. Call once per iteration."""
        if not self._enabled:
            return
        _PENDING.discard(self)
        if new_scale is not None:
            if not (isinstance(new_scale, (int, float)) and math.isfinite(new_scale)
                    and new_scale > 0):
                raise ValueError(f"GradScaler.update: new_scale must be a positive finite "
                                 f"number, got {new_scale!r}")
            self._scale = float(np.float32(new_scale))
        else:
            if not self._per_optimizer:
                raise RuntimeError("No inf checks were recorded prior to update(): call "
                                   "scaler.step(optimizer) (or unscale_) before update().")
            if any(s["found_inf"] for s in self._per_optimizer.values()):
                self._scale = float(np.float32(self._scale * self._backoff_factor))
                self._growth_tracker = 0
            else:
                self._growth_tracker += 1
                if self._growth_tracker == self._growth_interval:
                    grown = float(np.float32(self._scale * self._growth_factor))
                    if math.isfinite(grown):
                        self._scale = grown
                    self._growth_tracker = 0
        self._per_optimizer.clear()

    def state_dict(self) -> dict:
        """Scale, factors, interval and growth tracker (empty when disabled), as PyTorch."""
        if not self._enabled:
            return {}
        return {"scale": self._scale, "growth_factor": self._growth_factor,
                "backoff_factor": self._backoff_factor, "growth_interval": self._growth_interval,
                "_growth_tracker": self._growth_tracker}

    def load_state_dict(self, state_dict: dict) -> None:
        """Restore what :meth:`state_dict` returned (also one saved by PyTorch)."""
        if not self._enabled:
            return
        if len(state_dict) == 0:
            raise RuntimeError("The source state dict is empty, possibly because it was saved "
                               "from a disabled instance of GradScaler.")
        missing = [k for k in ("scale", "growth_factor", "backoff_factor", "growth_interval",
                               "_growth_tracker") if k not in state_dict]
        if missing:
            raise KeyError(f"GradScaler.load_state_dict: missing {', '.join(missing)}")
        values = {k: (v.item() if hasattr(v, "item") else v) for k, v in state_dict.items()}
        self._check(float(values["scale"]), float(values["growth_factor"]),
                    float(values["backoff_factor"]), int(values["growth_interval"]))
        self._scale = float(np.float32(values["scale"]))
        self._growth_factor = float(values["growth_factor"])
        self._backoff_factor = float(values["backoff_factor"])
        self._growth_interval = int(values["growth_interval"])
        self._growth_tracker = int(values["_growth_tracker"])
