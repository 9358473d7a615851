"""The core of multi-head attention as one Function: split into heads, softmax attention, merge.

:class:`HeadsAttention` reads the projected queries, keys and values in the layout the
projections leave them in -- ``(N, L, E)``, or ``(L, N, E)`` time-major, or all three packed in
one ``(..., 3E)`` array for self-attention -- and writes its output already merged back into
that layout, so no reshape/transpose copies are made on either side; its backward writes the
packed ``(..., 3E)`` gradient in one buffer (the in-projection's GEMM takes it as is).

The softmax avoids NumPy's per-row reductions (one inner loop per short row: a row max over
128 columns costs as much as the exponentials): the exponentials take one shift per ``(L, S)``
score matrix, its maximum (one fast whole-matrix reduction), and none at all when every
matrix's maximum is moderate (exp cannot overflow: a pass saved); row sums are one einsum
(no per-row loop, no BLAS call), and the normalisation ``1 / rowsum`` is applied to the
``(L, Ev)`` output rows instead of the ``(L, S)`` weights (and to the output's gradient in the
backward). A row whose sum comes out tiny against that shift (its largest score lies far
below it, so its weights would lose precision or underflow to 0) is recomputed with its own
row maximum, which also yields the zero output and zero gradient of a FULLY MASKED row (as
:mod:`distprop.ops.attention`).

GEMM operands: scaled queries and values are contiguous ``(N, H, L, d)`` / ``(N, H, S, dv)``
copies (the products with the strided views cost up to 1.3x more), keys are used as strided
views (a transposed copy costs more than it saves except for heads of 32 and less).
"""

from __future__ import annotations

import math

import numpy as np
from numpy.lib.stride_tricks import as_strided

from distprop import backend
from distprop.tensor import Function, _grad_mode

_FAST = (np.dtype(np.float32), np.dtype(np.float64))
# A row is recomputed with its own maximum when its sum of exp(score - matrix max) is below
# S * exp(-MARGIN): then every entry within 2**-24 (float32) of the row's largest stays a
# normal float. float64 keeps ~700 of exponent range.
_MARGIN = {np.dtype(np.float32): 70.0, np.dtype(np.float64): 600.0}
# Matrix maxima within these bounds need no shift at all: exp(score) neither overflows (the
# row sums stay far below the largest float) nor pushes many rows under the margin above.
_NO_SHIFT = {np.dtype(np.float32): (-20.0, 60.0), np.dtype(np.float64): (-100.0, 600.0)}
# Heads up to this size fold the softmax backward's row term into a GEMM (see backward).
_FOLD_MAX_HEAD = 64

def fast_path_ok(*arrays) -> bool:
    """Whether :class:`HeadsAttention` handles these arrays (NumPy float32/float64)."""
    return all(type(a) is np.ndarray and a.dtype in _FAST for a in arrays)


def heads_view(a, heads: int, time_major: bool):
    """``a`` (``(L, N, E)`` when ``time_major``, else ``(N, L, E)``, any strides with a unit
    last stride) as an ``(N, heads, L, E / heads)`` view."""
    if time_major:
        a = a.swapaxes(0, 1)
    n, length, e = a.shape
    sn, sl, se = a.strides
    d = e // heads
    return as_strided(a, (n, heads, length, d), (sn, d * se, sl, se))


def softmax_exp(scores, bias, recompute):
    """In place: ``scores`` (..., L, S) becomes ``exp(scores + bias - shift)`` with one shift
    per row; returns ``1 / rowsum`` (..., L, 1), 0 for fully masked rows.

    ``recompute(index)`` gives the unbiased scores of the rows picked by ``index`` (a tuple of
    index arrays over the leading axes) as a (rows, S) array; it is called only for rows whose
    sum underflows against the matrix maximum (see the module doc).
    """
    if bias is not None:
        scores += bias
    lead, (length, src) = scores.shape[:-2], scores.shape[-2:]
    shift = scores.max(axis=(-2, -1), keepdims=True)
    shift[~np.isfinite(shift)] = 0  # a matrix masked throughout: its rows are all dead
    low, high = _NO_SHIFT[scores.dtype]
    if shift.min() < low or shift.max() > high:  # else exp(scores) is as exact: a pass saved
        scores -= shift
    np.exp(scores, out=scores)
    total = np.einsum("ij->i", scores.reshape(-1, src))  # no BLAS: no thread handoff
    total = total.reshape(*lead, length, 1)
    weak = total < src * math.exp(-_MARGIN[scores.dtype])
    if weak.any():
        index = np.nonzero(weak[..., 0])
        rows = recompute(index)
        if bias is not None:
            rows += np.broadcast_to(bias, scores.shape)[index]
        top = rows.max(axis=-1, keepdims=True)
        top[~np.isfinite(top)] = 0  # a fully masked row: exp(-inf) = 0 everywhere
        rows -= top
        np.exp(rows, out=rows)
        scores[index] = rows
        total[index] = rows.sum(axis=-1, keepdims=True)
    total[total == 0] = np.inf  # dead rows: weights, output and gradient 0
    return np.reciprocal(total, out=total)


def _token_major(a, time_major: bool):
    """A (N, H, L, ...) head-major array as the (L, N, H, ...) / (N, L, H, ...) view that
    follows the module layout's memory order."""
    return a.transpose(2, 0, 1, 3) if time_major else a.transpose(0, 2, 1, 3)


def _scale_rows(x, inv, heads: int, time_major: bool, out, x_h=None):
    """``out = x * inv`` per (batch, head, query) row, ``x`` in the module's layout and
    ``out`` either ``x`` itself or a head-major (N, H, L, d) buffer, iterated in the memory
    order of ``x`` (~20 % faster than broadcasting over the strided head views)."""
    if not x.flags.c_contiguous:
        np.multiply(x_h, inv, out=out)
        return
    x4 = x.reshape(x.shape[:2] + (heads, x.shape[2] // heads))
    dest = x4 if out is x else _token_major(out, time_major)
    np.multiply(x4, _token_major(inv, time_major), out=dest)


def _head_rowdot(grad, out, g_h, out_h, heads: int, time_major: bool):
    """Per (batch, head, query) dot products of ``grad`` and ``out`` (both in the module's
    layout) over each head's features, as (N, H, L, 1): one einsum over contiguous rows when
    both arrays are contiguous (einsum over the strided head views is several times slower)."""
    if not (grad.flags.c_contiguous and out.flags.c_contiguous):
        return np.einsum("...ij,...ij->...i", g_h, out_h)[..., None]
    d = out.shape[-1] // heads
    dots = np.einsum("ij,ij->i", grad.reshape(-1, d), out.reshape(-1, d))
    dots = dots.reshape(out.shape[:2] + (heads,))  # (L, N, H) or (N, L, H)
    return (dots.transpose(1, 2, 0) if time_major else dots.transpose(0, 2, 1))[..., None]


class HeadsAttention(Function):
    """``merge_heads(dropout(softmax(q_h k_h^T * scale + bias)) v_h)`` for NumPy float arrays.

    Inputs are ``q, k, v`` in the module's layout (``(L, N, E)`` if ``time_major`` else
    ``(N, L, E)``; k and v with S rows) or, with ``packed``, one ``(..., 3E)`` array holding
    all three (k and v then None). ``bias`` is an additive mask broadcastable to
    ``(N, H, L, S)``. Returns the output in q's layout, contiguous, and with ``need_weights``
    also the (dropped-out) attention weights ``(N, H, L, S)`` as a differentiable output.
    """

    amp_policy = None  # under autocast MultiheadAttention takes the generic path

    def forward(self, q, k=None, v=None, *, heads, time_major, packed=False, bias=None,
                scale=None, dropout_p=0.0, need_weights=False):
        if packed:
            e = q.shape[-1] // 3
            qa, ka, va = q[..., :e], q[..., e:2 * e], q[..., 2 * e:]
        else:
            qa, ka, va = q, k, v
        qv, kv, vv = (heads_view(a, heads, time_major) for a in (qa, ka, va))
        n, _, length, d = qv.shape
        src, dv = kv.shape[2], vv.shape[3]
        dtype = q.dtype
        scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
        qh = np.multiply(qv, dtype.type(scale), out=np.empty((n, heads, length, d), dtype))
        vh = np.empty((n, heads, src, dv), dtype)
        np.copyto(vh, vv)
        kt = kv.swapaxes(-1, -2)  # a transposed copy would cost more than it saves
        expo = np.matmul(qh, kt)
        # Small heads: v^T with a row of ones under it for the backward (see there), copied
        # now while vh is in cache (from memory in the backward it costs ~3x more).
        vt = None
        if dv <= _FOLD_MAX_HEAD and _grad_mode.enabled and any(self.needs_input_grad[:3]):
            vt = np.empty((n, heads, dv + 1, src), dtype)
            np.copyto(vt[..., :dv, :], vh.swapaxes(-1, -2))
            vt[..., dv, :] = 1

        def recompute(index):
            return np.matmul(qh[index][:, None, :], kt[index[:2]])[:, 0]

        inv = softmax_exp(expo, bias, recompute)
        drop = None
        weights = expo  # exp(scores - shift), or that times the dropout mask; rows scaled by inv
        if dropout_p > 0.0:
            keep = 1.0 - dropout_p
            drop = backend.bernoulli_mask(expo.shape, keep, dtype, backend.device_of(expo))
            if keep > 0:
                drop *= dtype.type(1.0 / keep)
            weights = expo * drop
        out_shape = (length, n, heads * dv) if time_major else (n, length, heads * dv)
        out = np.empty(out_shape, dtype)
        out_h = heads_view(out, heads, time_major)
        np.matmul(weights, vh, out=out_h)
        _scale_rows(out, inv, heads, time_major, out)
        # with v^T saved, v itself is not needed again
        self.saved = (qh, kv, vh if vt is None else None, vt, expo, weights, inv, drop, scale,
                      out_h)
        self.out = out
        self.layout = (heads, time_major, packed, q.shape,
                       None if packed else (k.shape, v.shape))
        if need_weights:
            return out, weights * inv
        return out

    def backward(self, grad_out, grad_weights=None):
        qh, kv, vh, vt, expo, weights, inv, drop, scale, out_h = self.saved
        heads, time_major, packed, q_shape, kv_shapes = self.layout
        dtype = grad_out.dtype
        n, _, length, _ = qh.shape
        dv = out_h.shape[3]
        needs = (True, True, True) if packed else self.needs_input_grad[:3]
        if packed:
            grad_qkv = np.empty(q_shape, dtype)
            e = q_shape[-1] // 3
            dests = (grad_qkv[..., :e], grad_qkv[..., e:2 * e], grad_qkv[..., 2 * e:])
            grads = (grad_qkv, None, None)
        else:
            dests = tuple(np.empty(s, dtype) if need else None
                          for s, need in zip((q_shape, *kv_shapes), needs))
            grads = dests
        dest_h = [None if a is None else heads_view(a, heads, time_major) for a in dests]
        g_h = heads_view(grad_out, heads, time_major)
        plain = drop is None and grad_weights is None
        # g' = g / rowsum: the forward's normalisation, moved onto the output's gradient.
        # Without dropout or a weights gradient, the softmax backward's row term r = inv *
        # rowdot(d loss / d weights, weights) equals inv * rowdot(g, out): from the (L, Ev)
        # output instead of the (L, S) weights. For small heads an extra last column of g'
        # holds -r and a row of ones under a transposed copy of v makes the GEMM subtract it
        # (ds = g' [v^T; 1] = dp' - r, a pass over (L, S) saved); large heads use v^T as a
        # view (a transposed copy of v costs more than the GEMM gains) and subtract r.
        fold = plain and vt is not None
        width = dv + 1 if fold else dv
        g = np.empty((n, heads, length, width), dtype)
        _scale_rows(grad_out, inv, heads, time_major, g[..., :dv], g_h)
        if needs[2]:
            np.matmul(weights.swapaxes(-1, -2), g[..., :dv], out=dest_h[2])
        if needs[0] or needs[1]:
            if plain:
                row = _head_rowdot(grad_out, self.out, g_h, out_h, heads, time_major)
                row *= inv
            if fold:
                np.negative(row, out=g[..., dv:])
                ds = np.matmul(g, vt)
            else:  # d loss / d weights, over the row sums
                ds = np.matmul(g, vh.swapaxes(-1, -2) if vt is None else vt[..., :dv, :])
                if not plain:
                    if grad_weights is not None:
                        ds += grad_weights * inv
                    if drop is not None:
                        ds *= drop
                    # softmax backward, p = expo * inv: ds = expo * (ds - r)
                    row = np.einsum("...ij,...ij->...i", ds, expo)[..., None]
                    row *= inv
                ds -= row
            ds *= expo
            if needs[0]:  # k straight from the projection (a copy reads it twice)
                np.matmul(ds, kv, out=dest_h[0])
                dest_h[0] *= dtype.type(scale)
            if needs[1]:
                np.matmul(ds.swapaxes(-1, -2), qh, out=dest_h[1])  # qh carries the scale
        return grads
