"""Gradient clipping (``dp.nn.utils.clip_grad_norm_`` / ``clip_grad_value_``), flat-buffer aware.

When the parameters are one whole contiguous run of a flat buffer with every gradient in place
(the usual case: all of a model's parameters after an optimizer or DDP flattened them), the norm
is one pass over the flat gradient slice and clipping one in-place multiply. Otherwise each
gradient is handled on its own; the results are the same. Norms are accumulated in float64 over
cache-sized chunks, so large float32 buffers lose no precision.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import numpy as np

from distprop import backend
from distprop.flat import contiguous_range
from distprop.tensor import Tensor

# CPU chunk: short enough that float32 dot products inside a chunk stay accurate, long enough
# that the Python loop costs little. On a GPU each array is reduced whole, in float64.
_CHUNK = 1 << 16


def _as_list(parameters) -> list[Tensor]:
    if isinstance(parameters, Tensor):
        return [parameters]
    return list(parameters)


def _flat_grads(params: list[Tensor]) -> list:
    """1-D gradient arrays covering the parameters' gradients: one flat slice when possible."""
    found = contiguous_range(params)
    if found is not None:
        buf, start, stop = found
        if buf.grads_present(start, stop):
            a, b = buf.span(start, stop)
            return [buf.grad[a:b]]
    return [p.grad.data.reshape(-1) if p.grad.data.flags.c_contiguous else p.grad.data
            for p in params if p.grad is not None]


def _norm_power_sum(g, norm_type: float) -> float:
    """sum(|g|^p) (or max |g| for p = inf) of one array, accumulated in float64 by chunks."""
    xp = backend.get_array_module(g)
    flat = g.reshape(-1)
    chunk = _CHUNK if xp is np else max(1, flat.size)
    total = 0.0
    for a in range(0, flat.size, chunk):
        part = flat[a : a + chunk]
        if norm_type == 2.0:
            value = xp.vdot(part, part) if xp is np else xp.square(part).sum(dtype=np.float64)
        elif norm_type == 1.0:
            value = xp.abs(part).sum(dtype=np.float64)
        elif math.isinf(norm_type):
            value = xp.abs(part).max() if norm_type > 0 else xp.abs(part).min()
        elif norm_type == 0.0:
            value = xp.count_nonzero(part)
        else:
            value = (xp.abs(part).astype(np.float64) ** norm_type).sum()
        value = float(value)
        if math.isinf(norm_type):
            if math.isnan(value) or math.isnan(total):
                total = math.nan
            elif a == 0:
                total = value
            else:
                total = max(total, value) if norm_type > 0 else min(total, value)
        else:
            total += value
    return total


def get_total_norm(grads: list, norm_type: float = 2.0) -> float:
    """The ``norm_type``-norm of all the arrays together, as a Python float."""
    if math.isinf(norm_type):
        parts = [_norm_power_sum(g, norm_type) for g in grads if g.size]
        if any(math.isnan(p) for p in parts):
            return math.nan
        if not parts:
            return 0.0
        return max(parts) if norm_type > 0 else min(parts)
    total = sum(_norm_power_sum(g, norm_type) for g in grads)
    if norm_type == 0.0:
        return total
    if norm_type == 2.0:
        return math.sqrt(total)
    if norm_type == 1.0:
        return total
    return total ** (1.0 / norm_type)


def clip_grad_norm_(parameters: Iterable[Tensor] | Tensor, max_norm: float,
                    norm_type: float = 2.0, error_if_nonfinite: bool = False,
                    foreach: bool | None = None) -> Tensor:
    """Scale the gradients so that their total norm is at most ``max_norm`` (in place).

    The scale is ``min(1, max_norm / (total_norm + 1e-6))``, as in PyTorch.

    Args:
        parameters: parameters (or one Tensor) whose ``.grad`` to clip; those without a
            gradient are ignored.
        max_norm: the largest allowed total norm.
        norm_type: order of the norm: 2 (default), 1, ``inf`` or any positive number.
        error_if_nonfinite: raise when the total norm is NaN or infinite instead of scaling.
        foreach: accepted for PyTorch compatibility; flat buffers make it unnecessary.

    Returns:
        The total norm of the gradients before clipping, as a 0-d Tensor of their dtype.

    Raises:
        RuntimeError: with ``error_if_nonfinite`` when the total norm is not finite.
    """
    params = _as_list(parameters)
    norm_type = float(norm_type)
    with_grad = [p for p in params if p.grad is not None]
    if not with_grad:
        return Tensor._wrap(np.asarray(0.0, dtype=np.float32))
    grads = _flat_grads(params) if len(with_grad) == len(params) else _flat_grads(with_grad)
    dtype = np.result_type(*[g.dtype for g in grads])
    total = get_total_norm(grads, norm_type)
    if error_if_nonfinite and not math.isfinite(total):
        raise RuntimeError(
            f"The total norm of order {norm_type} for gradients from `parameters` is "
            "non-finite, so it cannot be clipped. To disable this error and scale the gradients "
            "by the non-finite norm anyway, set `error_if_nonfinite=False`"
        )
    total_arr = np.asarray(total, dtype=dtype)
    coef = float(max_norm) / (float(total_arr) + 1e-6)
    if math.isnan(coef) or coef < 1.0:
        with np.errstate(invalid="ignore"):  # inf * 0 -> nan, as in PyTorch, without a warning
            for g in grads:
                g *= coef
    xp = backend.get_array_module(grads[0])
    return Tensor._wrap(xp.asarray(total_arr))


def clip_grad_value_(parameters: Iterable[Tensor] | Tensor, clip_value: float,
                     foreach: bool | None = None) -> None:
    """Clamp every gradient element into ``[-clip_value, clip_value]`` (in place).

    Args:
        parameters: parameters (or one Tensor) whose ``.grad`` to clamp.
        clip_value: the bound; must be a non-negative number.
        foreach: accepted for PyTorch compatibility.
    """
    clip_value = float(clip_value)
    if not clip_value >= 0:
        raise ValueError(f"clip_grad_value_: clip_value must be >= 0, got {clip_value}")
    params = [p for p in _as_list(parameters) if p.grad is not None]
    for g in _flat_grads(params) if params else []:
        backend.get_array_module(g).clip(g, -clip_value, clip_value, out=g)
