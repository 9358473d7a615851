"""Helpers shared by the loss Functions (:mod:`distprop.ops.loss`,
:mod:`distprop.ops.loss_class`): argument checks, reductions and dtype handling."""

from __future__ import annotations

import contextlib

import numpy as np

from distprop.backend import get_array_module

REDUCTIONS = ("mean", "sum", "none")


class ClassIndexError(IndexError, ValueError):
    """A class-index target outside ``[0, C)`` (and not ``ignore_index``)."""


def legacy_reduction(size_average, reduce, reduction: str) -> str:
    """Map PyTorch's deprecated ``size_average``/``reduce`` flags onto ``reduction``."""
    if size_average is not None or reduce is not None:
        size_average = True if size_average is None else size_average
        reduce = True if reduce is None else reduce
        reduction = "none" if not reduce else ("mean" if size_average else "sum")
    if reduction not in REDUCTIONS:
        raise ValueError(
            f"{reduction!r} is not a valid value for reduction: use 'mean', 'sum' or 'none'"
        )
    return reduction


def _check_float(name: str, x) -> None:
    if x.dtype.kind != "f":
        raise TypeError(
            f"{name}: expected floating-point predictions, got dtype {x.dtype} "
            "(convert with .float())"
        )


def _check_same_shape(name: str, x, y) -> None:
    if tuple(x.shape) != tuple(y.shape):
        raise ValueError(
            f"{name}: input shape {tuple(x.shape)} and target shape {tuple(y.shape)} differ; "
            "they must be equal"
        )


def _check_broadcastable(name: str, what: str, w, shape) -> None:
    ws = tuple(w.shape)
    ok = len(ws) <= len(shape) and all(
        a == b or a == 1 for a, b in zip(reversed(ws), reversed(shape))
    )
    if not ok:
        raise ValueError(f"{name}: {what} of shape {ws} does not broadcast to input shape {shape}")


def _as_dtype(a, dtype):
    return a if a is None or a.dtype == dtype else a.astype(dtype)


def _constant(value, x):
    """A weight array in ``x``'s dtype on ``x``'s device (None stays None)."""
    return None if value is None else get_array_module(x).asarray(value, dtype=x.dtype)


def _reduce(loss, reduction: str):
    if reduction == "none":
        return loss
    return loss.sum() if reduction == "sum" else loss.mean()


def _quiet(xp):
    """Silence NumPy's divide/invalid warnings where inf/NaN are the intended results."""
    return np.errstate(invalid="ignore", divide="ignore") if xp is np else contextlib.nullcontext()


def _divide(num, den):
    """num / den, NaN (without a warning) when den == 0, as PyTorch's all-ignored mean."""
    with _quiet(get_array_module(num)):
        return num / den


def _row_coef(grad_out, reduction: str, den):
    """Each row's share of ``grad_out`` in a class loss's backward: per row for 'none', the
    whole for 'sum', ``grad_out / den`` for the weighted 'mean' (zero when den == 0, i.e. every
    target ignored: the loss is NaN but, as in PyTorch, the gradient is zero, not NaN)."""
    if reduction == "none":
        return grad_out.reshape(-1)
    if reduction == "sum":
        return grad_out
    # den == 0 only when every row weight is zero, so any finite coefficient gives a zero
    # gradient: divide by 1 instead (no branch, hence no device sync on CuPy).
    return grad_out / (den + (den == 0))
