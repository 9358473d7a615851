"""Matrix products: batched matmul and the fused affine map used by Linear."""

from __future__ import annotations

import numpy as np

from distprop.backend import get_array_module
from distprop.ops import _util
from distprop.ops._util import SMALL_ROWS, blocked_gemm, gemm, grad_destination, unbroadcast
from distprop.ops.arith import check_same_device
from distprop.ops.norm import channel_sum
from distprop.tensor import Function


def _swap_last(a):
    return a.swapaxes(-1, -2)


class MatMul(Function):
    """out = a @ b (NumPy semantics, batched); grads: g @ b^T, a^T @ g."""

    amp_policy = "lower"  # autocast: see distprop/amp.py

    def forward(self, a, b):
        if a.ndim == 0 or b.ndim == 0:
            raise RuntimeError("matmul: both arguments must be at least 1-dimensional")
        check_same_device("matmul", a, b)
        ka = a.shape[-1]
        kb = b.shape[0] if b.ndim == 1 else b.shape[-2]
        if ka != kb:
            raise ValueError(
                f"matmul: shapes {tuple(a.shape)} and {tuple(b.shape)} are not aligned "
                f"({ka} != {kb})"
            )
        self.a, self.b = a, b
        return gemm(a, b)

    def backward(self, grad_out):
        a, b = self.a, self.b
        if a.ndim == 1 and b.ndim == 1:  # dot product: a 0-d grad_out
            return (grad_out * b if self.needs_input_grad[0] else None,
                    grad_out * a if self.needs_input_grad[1] else None)
        xp = get_array_module(grad_out)
        a2 = a[None, :] if a.ndim == 1 else a
        b2 = b[:, None] if b.ndim == 1 else b
        g = grad_out
        if a.ndim == 1:
            g = xp.expand_dims(g, -2)
        if b.ndim == 1:
            g = xp.expand_dims(g, -1)
        ga = gb = None
        if self.needs_input_grad[0]:
            ga = gemm(g, _swap_last(b2))
            ga = unbroadcast(ga, a2.shape)
            if a.ndim == 1:
                ga = ga.reshape(a.shape)
        if self.needs_input_grad[1]:
            if b2.ndim == 2 and a2.ndim > 2:
                # Fold the batch into the rows: one GEMM instead of a batched product + sum.
                gb = gemm(a2.reshape(-1, a2.shape[-1]).T, g.reshape(-1, g.shape[-1]))
            else:
                gb = unbroadcast(gemm(_swap_last(a2), g), b2.shape)
            if b.ndim == 1:
                gb = gb.reshape(b.shape)
        return ga, gb


#: Linear's forward computes ``(W @ x^T)^T`` instead of ``x @ W^T`` when x has at most this many
#: rows and W at least ``_LEFT_MIN_WEIGHT`` elements (and the blocks of ``blocked_gemm`` do not
#: apply): OpenBLAS packs a transposed right operand slowly, and for few rows that packing is
#: most of the GEMM (8 x 512 -> 2048: 0.44 ms vs 0.67; ``python benchmarks/bench_gemm_rows.py``,
#: ``benchmarks/results/linear_rows.md``).
#: Equal to rounding (another summation order).
_LEFT_MAX_ROWS = 48
_LEFT_MIN_WEIGHT = 65536


def _is_host_float(a) -> bool:
    """A NumPy float32/float64 array (float16 goes through ``gemm``'s float32 route)."""
    return type(a) is np.ndarray and a.dtype in (np.float32, np.float64)


def _few_rows_gemm(a, b, out):
    """``a @ b`` in blocks (:func:`blocked_gemm`) into ``out`` (or a new array) when ``a`` or the
    inner dimension has few rows; None when one product is as good."""
    if (type(a) is not np.ndarray or a.dtype not in _util.BLOCKED_DTYPES
            or min(a.shape) > SMALL_ROWS):
        return None
    result = np.empty((a.shape[0], b.shape[1]), a.dtype) if out is None else out
    return result if blocked_gemm(a, b, result) else None


def _weight_on_the_left(x2, weight) -> bool:
    return (_is_host_float(x2) and x2.shape[0] <= _LEFT_MAX_ROWS
            and weight.size >= _LEFT_MIN_WEIGHT)


class Linear(Function):
    """out = x @ W^T + b; grads: g @ W, g^T @ x, sum(g)."""

    amp_policy = "lower"  # autocast: see distprop/amp.py

    def forward(self, x, weight, bias=None):
        check_same_device("linear", x, weight, bias)
        if x.shape[-1] != weight.shape[1]:
            raise ValueError(
                f"linear: input has {x.shape[-1]} features (shape {tuple(x.shape)}) but the "
                f"weight expects {weight.shape[1]} (weight shape {tuple(weight.shape)})"
            )
        if x.dtype != weight.dtype:
            raise TypeError(f"linear: input dtype {x.dtype} does not match the weight's "
                            f"{weight.dtype}")
        if bias is not None and tuple(bias.shape) != (weight.shape[0],):
            raise ValueError(f"linear: bias must have shape ({weight.shape[0]},) for a weight "
                             f"of shape {tuple(weight.shape)}, got {tuple(bias.shape)}")
        self.x, self.weight, self.has_bias = x, weight, bias is not None
        x2 = x.reshape(-1, x.shape[-1])
        if _weight_on_the_left(x2, weight):
            out = np.empty((x2.shape[0], weight.shape[0]), x2.dtype)
            if blocked_gemm(x2, weight.T, out):
                if bias is not None:
                    out += bias
            else:
                out_t = gemm(weight, x2.T)  # (out_features, rows): OpenBLAS's fast side
                if bias is not None:
                    np.add(out_t.T, bias, out=out)  # transpose + bias, one pass
                else:
                    out[...] = out_t.T
        else:
            out = gemm(x2, weight.T)
            if bias is not None:
                out += bias
        return out.reshape(x.shape[:-1] + (weight.shape[0],))

    def backward(self, grad_out):
        x, weight = self.x, self.weight
        g2 = grad_out.reshape(-1, grad_out.shape[-1])
        gx = gw = gb = None
        if self.needs_input_grad[0]:
            gx = _few_rows_gemm(g2, weight, None)
            gx = gemm(g2, weight) if gx is None else gx
            gx = gx.reshape(x.shape)
        if self.needs_input_grad[1]:
            dest = grad_destination(self, 1)
            x2 = x.reshape(-1, x.shape[-1])
            if x2.shape[0] == 1 and _is_host_float(x2):
                # one row: an outer product; OpenBLAS's K = 1 GEMM is 3.4x slower (linear_rows.md)
                gw = np.einsum("i,j->ij", g2[0], x2[0], out=dest)
            else:
                gw = _few_rows_gemm(g2.T, x2, dest)
                gw = gemm(g2.T, x2, out=dest) if gw is None else gw
        if self.has_bias and self.needs_input_grad[2]:
            gb = channel_sum(g2)  # a GEMV with ones, faster than NumPy's column sum
        return gx, gw, gb
