"""Small helpers shared by the ops."""

from __future__ import annotations

import numpy as np


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
    if (a.ndim < 3 or a.shape != like.shape or 0 in a.strides  # broadcast: cheap to read
            or _memory_order(a) == _memory_order(like)):
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


# OpenBLAS (SkylakeX kernels) multiplies without packing its operands when M*N*K <= 100^3; packing
# a large weight is most of the work when the other operand has only a few rows. Split into blocks
# under that size, such products run up to 3x faster (1 thread: LSTM H = 256, B = 8, one step
# 92 -> 45 us forward, 94 -> 56 us backward, ``benchmarks/results/lseq.md``; Linear 1024 -> 1024
# with 4 rows 0.65 -> 0.21 ms forward, ``python benchmarks/bench_gemm_rows.py``,
# ``linear_rows.md``; no gain measured from 16 rows).
SMALL_GEMM = 100 ** 3
SMALL_ROWS = 12
MIN_BLOCK, MAX_BLOCK = 64, 256  # narrower blocks measured no faster than one product
BLOCKED_DTYPES = (np.dtype(np.float32),)  # float64 not measured


def _block_width(xp, dtype, few: int, depth: int, many: int) -> int:
    """Width of the blocks of the ``many`` dimension that keep ``few x width x depth`` products
    under :data:`SMALL_GEMM` (0: one product is as good)."""
    if (xp is not np or dtype not in BLOCKED_DTYPES or not 2 <= few <= SMALL_ROWS
            or few * many * depth <= SMALL_GEMM):
        return 0
    width = MAX_BLOCK
    while width >= MIN_BLOCK and few * width * depth > SMALL_GEMM:
        width //= 2
    return width if width >= MIN_BLOCK else 0


def column_blocks(xp, rows: int, weight, out):
    """(weight block, out block) pairs that compute ``out = lhs @ weight`` for an ``lhs`` of
    ``rows`` rows: one pair, or column blocks each under OpenBLAS's unpacked size."""
    depth, cols = weight.shape
    width = _block_width(xp, weight.dtype, rows, depth, cols)
    if not width:
        return [(weight, out)]
    return [(weight[:, j:j + width], out[:, j:j + width]) for j in range(0, cols, width)]


def blocked_gemm(a, b, out) -> bool:
    """``out = a @ b`` for 2-D NumPy operands in blocks under OpenBLAS's unpacked size, when that
    pays: column blocks (:func:`column_blocks`) when ``a`` has few rows, row blocks of ``a`` when
    the inner dimension is that small (a weight gradient from few rows). False: not computed,
    one product is as good."""
    xp = np if type(a) is np.ndarray else None
    blocks = column_blocks(xp, a.shape[0], b, out)
    if len(blocks) > 1:
        for b_block, out_block in blocks:
            np.matmul(a, b_block, out=out_block)
        return True
    height = _block_width(xp, a.dtype, a.shape[1], b.shape[1], a.shape[0])
    if not height:
        return False
    for i in range(0, a.shape[0], height):
        np.matmul(a[i:i + height], b, out=out[i:i + height])
    return True
