"""Small helpers shared by the ops."""

from __future__ import annotations


def unbroadcast(grad, shape):
    """Sum ``grad`` down to ``shape``, undoing NumPy broadcasting."""
    if grad.shape == tuple(shape):
        return grad
    extra = grad.ndim - len(shape)
    if extra > 0:
        grad = grad.sum(axis=tuple(range(extra)))
    axes = tuple(i for i, n in enumerate(shape) if n == 1 and grad.shape[i] != 1)
    if axes:
        grad = grad.sum(axis=axes, keepdims=True)
    return grad


def normalize_dims(dim, ndim: int) -> tuple[int, ...] | None:
    """``dim`` (None, int or sequence, negatives allowed) as a sorted tuple of axes."""
    if dim is None:
        return None
    dims = (dim,) if isinstance(dim, int) else tuple(dim)
    if not dims:
        return None  # an empty dim list reduces over everything, as in PyTorch
    out = []
    for d in dims:
        if not -max(ndim, 1) <= d < max(ndim, 1):
            raise IndexError(
                f"Dimension out of range (expected to be in range of "
                f"[{-max(ndim, 1)}, {max(ndim, 1) - 1}], but got {d})"
            )
        out.append(d % max(ndim, 1))
    if ndim == 0:
        return None  # dim 0 / -1 of a 0-d tensor (allowed, as in PyTorch) is the whole tensor
    return tuple(sorted(set(out)))




def _memory_order(a) -> tuple[int, ...]:
    """The axes of ``a`` (size-1 axes left out) from the largest stride to the smallest."""
    axes = [i for i in range(a.ndim) if a.shape[i] != 1]
    return tuple(sorted(axes, key=lambda i: -abs(a.strides[i])))


def same_layout(a, like):
    """``a`` laid out in memory in ``like``'s axis order: ``a`` itself when it already is (or
    the shapes differ), else one copy.

    A gradient arriving channels-first for a channels-last activation (or the other way round)
    makes every elementwise op with a saved array iterate across layouts; with a boolean mask
    operand NumPy buffers and casts, about ten times the cost of this one transposing copy.
    """
    if a.ndim < 3 or a.shape != like.shape or _memory_order(a) == _memory_order(like):
        return a
    from distprop.backend import get_array_module

    out = get_array_module(a).empty_like(like, dtype=a.dtype)
    out[...] = a
    return out


def grad_destination(fn, index: int):
    """Where ``fn``'s backward may write input ``index``'s gradient directly, or None.

    That is the input's flat-buffer gradient view, when the input is a leaf whose ``.grad`` is
    still unset (so nothing is accumulated there yet): writing the GEMM result straight into it
    saves the copy :meth:`Tensor._accumulate` would make (it skips the self-assignment).
    """
    inputs = getattr(fn, "inputs", None)
    t = inputs[index] if inputs is not None and index < len(inputs) else None
    if t is None or t._ctx is not None or t.grad is not None or t._grad_buffer is None:
        return None
    return t._grad_buffer


def gemm(a, b, out=None):
    """``a @ b`` (NumPy matmul semantics, optional ``out``). Float16 NumPy operands (autocast on
    the CPU) run as one float32 BLAS GEMM rounded once to the result dtype -- float32
    accumulation, as GPU tensor cores do -- since NumPy's float16 matmul has no BLAS (~100x
    slower) and accumulates in float16. Everything else is ``xp.matmul`` unchanged."""
    import numpy as np

    if type(a) is np.ndarray and np.float16 in (a.dtype, getattr(b, "dtype", None)):
        result = np.matmul(a.astype(np.float32), b.astype(np.float32))
        if out is None:
            return result.astype(np.result_type(a, b))
        out[...] = result
        return out
    if out is None:
        return a @ b
    from distprop.backend import get_array_module

    return get_array_module(a).matmul(a, b, out=out)
