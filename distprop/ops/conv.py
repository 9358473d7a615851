"""Convolution over 1 or 2 spatial dims: im2col from a strided view, one GEMM per group.

Layout: the input is read through a channels-last strided view ``(N, *out, groups, *kernel,
C/groups)`` of the (padded) input, copied once into the column matrix ``(N*prod(out), groups,
K)`` with ``K = prod(kernel) * C/groups``, and multiplied by the weight reshaped to
``(groups, O/groups, K)``. The GEMM writes ``(N*prod(out), O)``: the result is returned as an
``(N, O, *out)`` view of that channels-last memory (no transpose copy). Any input strides work,
so a convolution fed the previous convolution's channels-last output reads it without a copy.

Backward: the weight gradient is one GEMM ``grad^T @ cols`` per group, the input gradient one
GEMM ``grad @ W`` per group followed by col2im, which loops over kernel offsets only
(``prod(kernel)`` whole-array adds), never over pixels.

Elsewhere: 1x1 kernels are plain GEMMs (:class:`PointwiseConv`, :class:`GroupedPointwiseConv`);
2-D convolutions with large kernels go through the Fourier domain where
:meth:`distprop.ops.conv_fourier.FourierConv2d.suits` says so.
"""

from __future__ import annotations

import itertools
import math

import numpy as np

from distprop import amp, cuda_kernels
from distprop.backend import get_array_module
from distprop.ops import conv_grad
from distprop.ops._util import gemm
from distprop.ops.arith import check_same_device
from distprop.ops.conv_fourier import FourierConv2d
from distprop.ops.workspace import scratch
from distprop.tensor import Function, Tensor


def as_strided(xp, array, shape, strides):
    """``xp.lib.stride_tricks.as_strided`` (NumPy and CuPy share the signature)."""
    return xp.lib.stride_tricks.as_strided(array, shape=shape, strides=strides)


def ntuple(value, n: int, name: str) -> tuple[int, ...]:
    """``value`` (int or sequence of n ints) as an n-tuple of ints."""
    if isinstance(value, (list, tuple)):
        if len(value) == 1 and n > 1:
            value = tuple(value) * n
        if len(value) != n or not all(isinstance(v, int) for v in value):
            raise ValueError(f"{name} must be an int or a tuple of {n} ints, got {value!r}")
        return tuple(int(v) for v in value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an int or a tuple of {n} ints, got {value!r}")
    return (int(value),) * n


def conv_padding(padding, kernel, dilation, stride, nd: int) -> tuple[tuple[int, int], ...]:
    """Per-dim (before, after) zero padding from an int, a tuple, 'valid' or 'same'."""
    if isinstance(padding, str):
        if padding == "valid":
            return ((0, 0),) * nd
        if padding == "same":
            if any(s != 1 for s in stride):
                raise ValueError("padding='same' is not supported for strided convolutions")
            total = [d * (k - 1) for k, d in zip(kernel, dilation)]
            return tuple((t // 2, t - t // 2) for t in total)
        raise ValueError(f"Invalid padding string {padding!r}, should be one of ['valid', 'same']")
    pad = ntuple(padding, nd, "padding")
    if any(p < 0 for p in pad):
        raise ValueError(f"negative padding is not supported, got {pad}")
    return tuple((p, p) for p in pad)


def move_channels_last(x):
    """The (N, C, *sp) array viewed as (N, *sp, C) (a view, never a copy)."""
    return x.transpose((0, *range(2, x.ndim), 1))


def move_channels_first(x):
    """The (N, *sp, C) array viewed as (N, C, *sp)."""
    return x.transpose((0, x.ndim - 1, *range(1, x.ndim - 1)))


def is_channels_last(x) -> bool:
    """True when the channel axis (1) of an (N, C, *sp) array has the smallest stride."""
    return x.ndim > 2 and x.shape[1] > 1 and x.strides[1] <= min(x.strides[2:])


def _c_strides(shape, unit: int) -> tuple[int, ...]:
    """C-order strides (bytes) of ``shape`` whose innermost step is ``unit`` bytes."""
    out, step = [], unit
    for s in reversed(shape):
        out.append(step)
        step *= int(s)
    return tuple(reversed(out))


def _padded_shape(x_shape, pads):
    return (*x_shape[:2], *(s + lo + hi for s, (lo, hi) in zip(x_shape[2:], pads)))


def _alloc(xp, shape, dtype, channels_last: bool, zero: bool):
    """An (N, C, *sp) array stored channels-last or channels-first."""
    make = xp.zeros if zero else xp.empty
    if channels_last:
        return move_channels_first(make((shape[0], *shape[2:], shape[1]), dtype=dtype))
    return make(shape, dtype=dtype)


def _interior(x_shape, pads):
    return (slice(None), slice(None),
            *(slice(lo, lo + s) for s, (lo, _) in zip(x_shape[2:], pads)))


def _padded(xp, x, pads, channels_last: bool):
    """x (N, C, *sp) zero padded and stored as asked; ``x`` itself when it already fits."""
    padding = any(lo or hi for lo, hi in pads)
    if not padding and (x.shape[1] == 1 or is_channels_last(x) == channels_last):
        return x
    shape = _padded_shape(x.shape, pads)
    if channels_last:
        out = move_channels_first(scratch(xp, (shape[0], *shape[2:], shape[1]), x.dtype))
    else:
        out = scratch(xp, shape, x.dtype)
    for dim, (lo, hi) in enumerate(pads):  # zero only the border
        before = (slice(None),) * (2 + dim)
        if lo:
            out[(*before, slice(0, lo))] = 0
        if hi:
            out[(*before, slice(shape[2 + dim] - hi, None))] = 0
    out[_interior(x.shape, pads)] = x
    return out


class ConvNd(Function):
    """out[n,o,y] = sum_{c,k} w[o,c,k] * xpad[n,c,y*s+k*d] + b[o]; grads by GEMMs and col2im.

    The column matrix is stored rows-major ``(M, g, K)`` when there are enough channels per
    group for long contiguous runs in a channels-last input, else ``(g, K, M)`` (runs along the
    output width of a channels-first input). With one group the bias rides in the GEMM as an
    extra column of ones, so neither the bias add nor its gradient costs a pass of its own.
    """

    amp_policy = "lower"  # autocast: see distprop/amp.py

    ROWS_MIN_CHANNELS = 16
    PHASE_GRAD = True  # NumPy, undilated: input gradient by conv_grad (no col2im)

    @classmethod
    def rows_layout(cls, cg: int, og: int, groups: int) -> bool:
        """Store the columns rows-major ``(M, g, K)`` (from a channels-last input)?

        From 16 channels per group on; with one group, from 8 when the output has no more
        channels than the input (the phase input gradient, which wants rows, applies). Below,
        the ``(g, K, M)`` layout's long runs along the output width win. Forward+backward at 1
        thread (``benchmarks/bench_conv_layout.py``, ``benchmarks/results/conv_layout.md``):
        at 8 channels per group ``(g, K, M)`` takes 0.74-0.97x the rows layout's time, except
        with one group and no more output than input channels, 1.09-1.30x.
        """
        return cg >= cls.ROWS_MIN_CHANNELS or (cg >= 8 and og <= cg and groups == 1)

    def forward(self, x, weight, bias=None, *, stride, padding, dilation, groups):
        xp = get_array_module(x)
        nd = x.ndim - 2
        n = x.shape[0]
        o, cg = weight.shape[:2]
        kernel = tuple(weight.shape[2:])
        g = groups
        og = o // g
        out_sp = tuple(
            (size + lo + hi - d * (k - 1) - 1) // s + 1
            for size, (lo, hi), k, s, d in zip(x.shape[2:], padding, kernel, stride, dilation)
        )
        m, kk = n * math.prod(out_sp), math.prod(kernel) * cg
        rows = self.rows_layout(cg, og, g)
        fuse = bias is not None and g == 1
        ka = kk + 1 if fuse else kk
        buf = scratch(xp, (m, g, ka) if rows else (g, ka, m), x.dtype)
        if cuda_kernels.im2col(x, buf, rows, out_sp, kernel, stride, dilation, padding,
                               g) is None:
            xpad = _padded(xp, x, padding, channels_last=rows)
            # Strided view (N, *out, g, *kernel, cg) of the padded input, any layout.
            sn, sc, *ssp = xpad.strides
            view = as_strided(
                xp, xpad, (n, *out_sp, g, *kernel, cg),
                (sn, *(st * s for st, s in zip(ssp, stride)), sc * cg,
                 *(st * d for st, d in zip(ssp, dilation)), sc),
            )
            _logical_cols(xp, buf, rows, n, out_sp, g, kernel, cg)[...] = view
        # Weight (o, cg, *kernel) -> (g, og, *kernel, cg) -> (g, og, K), the cols order.
        wk = xp.empty((g, og, ka), dtype=x.dtype)
        wk[:, :, :kk].reshape(g, og, *kernel, cg)[...] = weight.reshape(
            g, og, cg, *kernel).transpose((0, 1, *range(3, 3 + nd), 2))
        if fuse:
            buf[(slice(None), slice(None), kk) if rows else (slice(None), kk)] = 1
            wk[0, :, kk] = bias
        a = buf.transpose(1, 0, 2) if rows else buf.transpose(0, 2, 1)  # (g, M, ka)
        out = xp.empty((m, o), dtype=x.dtype)
        gemm(a, wk.transpose(0, 2, 1), out=out.reshape(m, g, og).transpose(1, 0, 2))
        if bias is not None and not fuse:
            out += bias
        self.meta = (x.shape, out_sp, kernel, stride, dilation, padding, g, og, cg, rows, fuse)
        self.a = a if self.needs_input_grad[1] or fuse else None
        self.wk = wk if self.needs_input_grad[0] else None
        # The phase gathers read O/g columns per tap where col2im writes C/g: faster as long as
        # the output has no more channels than the input (measured per layer at 1 thread: faster
        # at O = C, slower from O = 2 C on, e.g. the zoo cnn's 32 -> 64 3x3 layer).
        # A 1x1 kernel has one tap: col2im is then a single copy, cheaper than the gathers.
        self.phase_grad = (self.PHASE_GRAD and xp is np and rows and og <= cg
                           and math.prod(kernel) > 1 and all(d == 1 for d in dilation))
        self.has_bias = bias is not None
        return move_channels_first(out.reshape(n, *out_sp, o))

    def backward(self, grad_out):
        xp = get_array_module(grad_out)
        x_shape, out_sp, kernel, stride, dilation, padding, g, og, cg, rows, fuse = self.meta
        n, o = grad_out.shape[:2]
        m, kk, nd = n * math.prod(out_sp), math.prod(kernel) * cg, len(kernel)
        g2 = move_channels_last(grad_out).reshape(m, g, og).transpose(1, 0, 2)  # (g, M, og)
        gx = gw = gb = None
        need_w = self.needs_input_grad[1]
        need_b = self.has_bias and self.needs_input_grad[2]
        if need_w or (need_b and fuse):
            # (g, og, ka) as the transpose of cols^T @ grad: BLAS runs this orientation of the
            # long-inner-dimension product 10-30 % faster (measured, OpenBLAS SkylakeX)
            gwk = gemm(self.a.transpose(0, 2, 1), g2).transpose(0, 2, 1)
            if need_b and fuse:
                gb = gwk[0, :, kk]
            # (g, og, *kernel, cg) -> (o, cg, *kernel)
            gw = gwk[:, :, :kk].reshape(g, og, *kernel, cg).transpose(
                (0, 1, 2 + nd, *range(2, 2 + nd))).reshape(o, cg, *kernel)
        if need_b and not fuse:
            ones = xp.ones(m, dtype=grad_out.dtype)
            gb = gemm(ones, g2.transpose(1, 0, 2).reshape(m, o))
        if self.needs_input_grad[0] and self.phase_grad:
            gx = conv_grad.input_grad(xp, move_channels_last(grad_out), self.wk[:, :, :kk],
                                      x_shape, kernel, stride, padding, g)
        elif self.needs_input_grad[0]:
            gbuf = scratch(xp, (m, g, kk) if rows else (g, kk, m), grad_out.dtype)
            ga = gbuf.transpose(1, 0, 2) if rows else gbuf.transpose(0, 2, 1)  # (g, M, K)
            gemm(g2, self.wk[:, :, :kk], out=ga)
            gx = cuda_kernels.col2im(gbuf, x_shape, rows, out_sp, kernel, stride, dilation,
                                     padding, g)
            if gx is None:
                gcols = _logical_cols(xp, gbuf, rows, n, out_sp, g, kernel, cg)
                gx = _col2im(xp, gcols, x_shape, kernel, stride, dilation, padding, rows)
        return gx, gw, gb


class PointwiseConv(Function):
    """1x1 convolution (one group, no padding): out[n,o,y] = sum_c w[o,c] x[n,c,y*s] + b[o].

    No column matrix: a channels-last input is already the GEMM operand ``(M, C)`` (one GEMM,
    channels-last output, as :class:`ConvNd`); a channels-first one is multiplied image by image
    as ``W (O, C) @ x[n] (C, P)`` (a batched GEMM, channels-first output). One input channel
    counts as channels-first: its rank-1 product is a broadcast multiply with a channels-first
    (PyTorch's) output. A stride only subsamples the input (one strided copy) and its gradient
    (written into zeros).
    """

    amp_policy = "lower"  # autocast: see distprop/amp.py

    def forward(self, x, weight, bias=None, *, stride):
        n, c = x.shape[:2]
        o = weight.shape[0]
        sub = x[(slice(None), slice(None), *(slice(None, None, s) for s in stride))]
        out_sp = sub.shape[2:]
        p = math.prod(out_sp)
        w2 = weight.reshape(o, c)
        # One input channel: both layouts at once; the output is then made channels-first (as
        # PyTorch's), so the ops after it and the output gradient run on contiguous memory.
        self.last = is_channels_last(sub) and c > 1
        self.meta = (x.shape, x.dtype, stride, out_sp, x.strides, self.last)
        self.has_bias = bias is not None
        self.w2 = w2 if self.needs_input_grad[0] else None
        if self.last:
            a = move_channels_last(sub).reshape(n * p, c)  # a view unless strided
            out = gemm(a, w2.T)
            if bias is not None:
                out += bias
            self.a = a if self.needs_input_grad[1] else None
            return move_channels_first(out.reshape(n, *out_sp, o))
        a = sub.reshape(n, c, p)  # a view unless strided
        if c == 1 and type(a) is np.ndarray:
            out = np.multiply(w2, a)  # rank 1: (o, 1) * (n, 1, p), 3x faster than a K = 1 GEMM
        else:
            out = gemm(w2, a)  # (n, o, p)
        if bias is not None:
            out += bias.reshape(o, 1)
        self.a = a if self.needs_input_grad[1] else None
        return out.reshape(n, o, *out_sp)

    def backward(self, grad_out):
        xp = get_array_module(grad_out)
        x_shape, dtype, stride, out_sp, _, last = self.meta
        n, o = grad_out.shape[:2]
        c, p = x_shape[1], math.prod(out_sp)
        gx = gw = gb = None
        if last:
            g2 = move_channels_last(grad_out).reshape(n * p, o)
            if self.needs_input_grad[1]:
                gw = gemm(self.a.T, g2).T.reshape(o, c, *(1,) * len(out_sp))
            if self.has_bias and self.needs_input_grad[2]:
                gb = gemm(xp.ones(n * p, dtype=g2.dtype), g2)  # GEMV: 2.5x sum(axis=0)
            if self.needs_input_grad[0]:
                sub = move_channels_first(gemm(g2, self.w2).reshape(n, *out_sp, c))
        else:
            g3 = grad_out.reshape(n, o, p)
            if self.needs_input_grad[1]:
                gw = gemm(g3, self.a.transpose(0, 2, 1)).sum(axis=0).reshape(
                    o, c, *(1,) * len(out_sp))
            if self.has_bias and self.needs_input_grad[2]:
                # GEMVs over the pixels, then over the images (2-4x g3.sum(axis=(0, 2)))
                gb = gemm(xp.ones(n, dtype=g3.dtype), gemm(g3, xp.ones(p, dtype=g3.dtype)))
            if self.needs_input_grad[0]:
                sub = gemm(self.w2.T, g3).reshape(n, c, *out_sp)
        if self.needs_input_grad[0]:
            if all(s == 1 for s in stride):
                gx = sub
            else:
                gx = _alloc(xp, x_shape, dtype, last, zero=True)
                gx[(slice(None), slice(None), *(slice(None, None, s) for s in stride))] = sub
        return gx, gw, gb


class GroupedPointwiseConv(Function):
    """1x1 convolution with ``groups > 1`` (no padding): :class:`PointwiseConv` per group.

    Channels-last input: one batched GEMM over groups ``(g, M, C/g) @ (g, C/g, O/g)`` reading
    the input in place; channels-first input: ``W[g] (O/g, C/g) @ x[n, g] (C/g, P)`` batched
    over images and groups. No column matrix, no col2im.
    """

    amp_policy = "lower"  # autocast: see distprop/amp.py

    def forward(self, x, weight, bias=None, *, stride, groups):
        n, c = x.shape[:2]
        o, g = weight.shape[0], groups
        og, cg = o // g, c // g
        sub = x[(slice(None), slice(None), *(slice(None, None, s) for s in stride))]
        out_sp = sub.shape[2:]
        p = math.prod(out_sp)
        w3 = weight.reshape(g, og, cg)
        self.last = is_channels_last(sub)
        self.meta = (x.shape, x.dtype, stride, out_sp, g)
        self.has_bias = bias is not None
        self.w3 = w3 if self.needs_input_grad[0] else None
        xp = get_array_module(x)
        if self.last:
            a = move_channels_last(sub).reshape(n * p, g, cg).transpose(1, 0, 2)  # (g, M, cg)
            out = xp.empty((n * p, o), dtype=x.dtype)
            gemm(a, w3.transpose(0, 2, 1), out=out.reshape(n * p, g, og).transpose(1, 0, 2))
            if bias is not None:
                out += bias
            self.a = a if self.needs_input_grad[1] else None
            return move_channels_first(out.reshape(n, *out_sp, o))
        a = sub.reshape(n, g, cg, p)  # a view unless strided
        out = gemm(w3, a)  # (n, g, og, p)
        if bias is not None:
            out += bias.reshape(g, og, 1)
        self.a = a if self.needs_input_grad[1] else None
        return out.reshape(n, o, *out_sp)

    def backward(self, grad_out):
        xp = get_array_module(grad_out)
        x_shape, dtype, stride, out_sp, g = self.meta
        n, o = grad_out.shape[:2]
        c, p = x_shape[1], math.prod(out_sp)
        og, cg = o // g, c // g
        ones = (1,) * len(out_sp)
        gx = gw = gb = None
        if self.last:
            g2 = move_channels_last(grad_out).reshape(n * p, o)
            g3 = g2.reshape(n * p, g, og).transpose(1, 0, 2)  # (g, M, og)
            if self.needs_input_grad[1]:
                gw = gemm(self.a.transpose(0, 2, 1), g3).transpose(0, 2, 1).reshape(o, cg, *ones)
            if self.has_bias and self.needs_input_grad[2]:
                gb = gemm(xp.ones(n * p, dtype=g2.dtype), g2)
            if self.needs_input_grad[0]:
                sub = xp.empty((n * p, c), dtype=grad_out.dtype)
                gemm(g3, self.w3, out=sub.reshape(n * p, g, cg).transpose(1, 0, 2))
                sub = move_channels_first(sub.reshape(n, *out_sp, c))
        else:
            g4 = grad_out.reshape(n, g, og, p)
            if self.needs_input_grad[1]:
                gw = gemm(g4, self.a.transpose(0, 1, 3, 2)).sum(axis=0).reshape(o, cg, *ones)
            if self.has_bias and self.needs_input_grad[2]:
                gb = g4.sum(axis=(0, 3)).reshape(o)
            if self.needs_input_grad[0]:
                sub = gemm(self.w3.transpose(0, 2, 1), g4).reshape(n, c, *out_sp)
        if self.needs_input_grad[0]:
            if all(s == 1 for s in stride):
                gx = sub
            else:
                gx = _alloc(xp, x_shape, dtype, self.last, zero=True)
                gx[(slice(None), slice(None), *(slice(None, None, s) for s in stride))] = sub
        return gx, gw, gb


def _logical_cols(xp, buf, rows, n, out_sp, g, kernel, cg):
    """The column buffer ((M, g, ka) or (g, ka, M)) viewed as (N, *out, g, *kernel, cg)."""
    isz = buf.itemsize
    if rows:
        ka = buf.shape[2]
        s_m = _c_strides((n, *out_sp), g * ka * isz)
        s_k = _c_strides((*kernel, cg), isz)
        s_g = ka * isz
    else:
        ka, m = buf.shape[1], buf.shape[2]
        s_m = _c_strides((n, *out_sp), isz)
        s_k = _c_strides((*kernel, cg), m * isz)
        s_g = ka * m * isz
    return as_strided(xp, buf, (n, *out_sp, g, *kernel, cg), (*s_m, s_g, *s_k))


def _col2im(xp, gcols, x_shape, kernel, stride, dilation, padding, channels_last):
    """Scatter-add column gradients (N, *out, g, *kernel, cg) back to the (N, C, *sp) input.

    One whole-array add per kernel offset; the result keeps the forward pass's layout.
    """
    nd = len(kernel)
    out_sp = gcols.shape[1 : 1 + nd]
    g, cg = gcols.shape[1 + nd], gcols.shape[-1]
    if (g > 1 and not channels_last and out_sp[-1] >= 32 and any(s > 1 for s in stride)
            and all(d == 1 for d in dilation)):
        return _col2im_phases(xp, gcols, x_shape, kernel, stride, padding)
    pad_shape = _padded_shape(x_shape, padding)
    gpad = _alloc(xp, pad_shape, gcols.dtype, channels_last, zero=True)
    if g == 1 and channels_last and cg < 32 and all(d == 1 for d in dilation):
        _col2im_runs(xp, gcols, move_channels_last(gpad), kernel, stride, out_sp)
        return gpad[_interior(x_shape, padding)]
    offsets = itertools.product(*(range(k) for k in kernel))
    if g == 1:  # plain slices, no as_strided per offset (its Python cost shows on small convs)
        src = gcols.reshape(gcols.shape[0], *out_sp, *kernel, cg).transpose(
            (0, 1 + 2 * nd, *range(1, 1 + 2 * nd)))  # (N, C, *out, *kernel)
        for offs in offsets:
            dst = gpad[(slice(None), slice(None), *(
                slice(i * d, i * d + s * (o - 1) + 1, s)
                for i, d, s, o in zip(offs, dilation, stride, out_sp)))]
            dst += src[(Ellipsis, *offs)]
        return gpad[_interior(x_shape, padding)]
    sn, sc, *ssp = gpad.strides
    for offs in offsets:
        # The input positions this kernel offset touched, as (N, *out, g, cg).
        corner = gpad[(slice(None), slice(None),
                       *(slice(i * d, None) for i, d in zip(offs, dilation)))]
        dst = as_strided(xp, corner, (x_shape[0], *out_sp, g, cg),
                         (sn, *(st * s for st, s in zip(ssp, stride)), sc * cg, sc))
        dst += gcols[(slice(None),) * (2 + nd) + offs]
    return gpad[_interior(x_shape, padding)]


def _col2im_phases(xp, gcols, x_shape, kernel, stride, padding):
    """col2im of grouped ``(g, K, M)`` columns with a stride: per stride phase a plane of its own.

    The input positions ``y = q * s + r`` of one phase ``r`` (per spatial dim) form a
    contiguous plane, and kernel offset ``i`` only touches the plane of phase ``i % s``, at
    plane positions ``out + i // s``: so every offset is one unit-stride add (the per-offset
    adds into the padded input step by ``s``), and one strided copy per phase interleaves the
    planes at the end. The same additions in the same order as the per-offset loop. Used from
    32 output columns on, where it took 0.71-0.96x the per-offset loop's time; at 16 columns it
    was 0.90-1.03x and at 8 the rows are too short to repay the planes' zeroing and
    interleaving (up to 1.19x) (``benchmarks/bench_col2im.py --phases``,
    ``benchmarks/results/col2im_runs.md``).
    """
    nd = len(kernel)
    n, c = x_shape[:2]
    out_sp = gcols.shape[1 : 1 + nd]
    g, cg = gcols.shape[1 + nd], gcols.shape[-1]
    pad_shape = _padded_shape(x_shape, padding)
    plane = [-(-size // s) for size, s in zip(pad_shape[2:], stride)]
    planes = xp.zeros((n, g, cg, *stride, *plane), dtype=gcols.dtype)
    # (N, g, cg, *out, *kernel) view of the columns
    src = gcols.transpose((0, 1 + nd, 2 + 2 * nd, *range(1, 1 + nd), *range(2 + nd, 2 + 2 * nd)))
    for offs in itertools.product(*(range(k) for k in kernel)):
        dst = planes[(slice(None), slice(None), slice(None),
                      *(i % s for i, s in zip(offs, stride)),
                      *(slice(i // s, i // s + o) for i, s, o in zip(offs, stride, out_sp)))]
        dst += src[(Ellipsis, *offs)]
    gpad = xp.empty((n, c, *(p * s for p, s in zip(plane, stride))), dtype=gcols.dtype)
    planes = planes.reshape(n, c, *stride, *plane)
    for phase in itertools.product(*(range(s) for s in stride)):
        gpad[(slice(None), slice(None), *(slice(r, None, s) for r, s in zip(phase, stride)))] = \
            planes[(slice(None), slice(None), *phase)]
    return gpad[_interior(x_shape, padding)]


def _col2im_runs(xp, gcols, gpad_cl, kernel, stride, out_sp):
    """col2im of one group's rows-major columns into the channels-last ``gpad_cl`` (N, *sp, C),
    undilated, with runs of ``kernel[-1] * C`` contiguous floats instead of ``C``.

    For one output position along the last dim, its ``kernel[-1]`` taps cover ``kernel[-1] * C``
    consecutive input values, and so do their columns (the (kernel, C) order of a column
    row). Positions ``step = ceil(k / s)`` apart never overlap, so one add per offset of the
    leading kernel dims and per residue of the last output dim modulo ``step`` covers every
    tap: ``prod(kernel[:-1]) * step`` adds (at most ``prod(kernel)``) whose inner loop NumPy
    runs over the whole run. Used below 32 channels: there it took 0.63-0.99x the per-offset
    adds' time; from 32 channels on NumPy sometimes copies the whole 5-d view and it measured
    0.77-1.42x, shape by shape (``benchmarks/bench_col2im.py``,
    ``benchmarks/results/col2im_runs.md``).
    """
    nd = len(kernel)
    n, c = gcols.shape[0], gcols.shape[-1]
    k, s, o = kernel[-1], stride[-1], out_sp[-1]
    step = -(-k // s)
    src = gcols.reshape(n, *out_sp, *kernel, c)
    sn, *ssp, sc = gpad_cl.strides
    for lead in itertools.product(*(range(kd) for kd in kernel[:-1])):
        for j in range(min(step, o)):
            count = len(range(j, o, step))
            corner = gpad_cl[(slice(None), *(slice(i, None) for i in lead), slice(j * s, None))]
            dst = as_strided(xp, corner, (n, *out_sp[:-1], count, k, c),
                             (sn, *(st * sd for st, sd in zip(ssp[:-1], stride[:-1])),
                              ssp[-1] * s * step, ssp[-1], sc))
            dst += src[(slice(None), *(slice(None),) * (nd - 1), slice(j, None, step), *lead)]


def conv_nd(input: Tensor, weight: Tensor, bias: Tensor | None, stride, padding, dilation,
            groups: int, nd: int, name: str) -> Tensor:
    """Shared argument checking and dispatch for conv1d / conv2d (batched or unbatched)."""
    if not isinstance(input, Tensor) or not isinstance(weight, Tensor):
        raise TypeError(f"{name}: input and weight must be Tensors")
    if weight.ndim != nd + 2:
        raise ValueError(
            f"{name}: weight must have {nd + 2} dims (out_channels, in_channels/groups, "
            f"*kernel), got shape {weight.shape}"
        )
    if input.dtype.kind != "f":
        raise TypeError(f"{name}: expected a floating-point input, got dtype {input.dtype}")
    if input.dtype != weight.dtype and not amp.mixed_ok(input.dtype, weight.dtype):
        raise TypeError(
            f"{name}: input dtype {input.dtype} and weight dtype {weight.dtype} differ "
            "(convert one with .to(dtype))"
        )
    unbatched = input.ndim == nd + 1
    if input.ndim not in (nd + 1, nd + 2):
        raise ValueError(
            f"{name}: expected a {nd + 1}-D (unbatched) or {nd + 2}-D (batched) input, got "
            f"shape {input.shape}"
        )
    if isinstance(groups, bool) or not isinstance(groups, int) or groups < 1:
        raise ValueError(f"{name}: groups must be a positive int, got {groups!r}")
    x = input.reshape(1, *input.shape) if unbatched else input
    o, cg = weight.shape[:2]
    if o % groups:
        raise ValueError(f"{name}: out_channels {o} is not divisible by groups {groups}")
    if x.shape[1] != cg * groups:
        raise ValueError(
            f"{name}: expected input with {cg * groups} channels (weight of shape "
            f"{weight.shape}, groups={groups}), got input of shape {input.shape}"
        )
    if bias is not None and tuple(bias.shape) != (o,):
        raise ValueError(f"{name}: bias must have shape ({o},), got {bias.shape}")
    check_same_device(name, input.data, weight.data, None if bias is None else bias.data)
    kernel = tuple(weight.shape[2:])
    stride = ntuple(stride, nd, "stride")
    dilation = ntuple(dilation, nd, "dilation")
    if any(s < 1 for s in stride) or any(d < 1 for d in dilation):
        raise ValueError(f"{name}: stride and dilation must be >= 1, got {stride}, {dilation}")
    pads = conv_padding(padding, kernel, dilation, stride, nd)
    for size, (lo, hi), k, d in zip(x.shape[2:], pads, kernel, dilation):
        if size + lo + hi < d * (k - 1) + 1:
            raise ValueError(
                f"{name}: input of shape {input.shape} (padded spatial size {size + lo + hi}) "
                f"is smaller than the dilated kernel size {d * (k - 1) + 1} (weight of shape "
                f"{weight.shape})"
            )
    args = (x, weight) if bias is None else (x, weight, bias)
    if all(k == 1 for k in kernel) and not any(lo or hi for lo, hi in pads):
        if groups == 1:
            out = PointwiseConv.apply(*args, stride=stride)
        else:
            out = GroupedPointwiseConv.apply(*args, stride=stride, groups=groups)
        return out.reshape(out.shape[1:]) if unbatched else out
    if nd == 2 and FourierConv2d.suits(x.data, weight.data, stride, pads, dilation, groups):
        out = FourierConv2d.apply(*args, stride=stride, padding=pads, dilation=dilation)
    else:
        out = ConvNd.apply(*args, stride=stride, padding=pads, dilation=dilation, groups=groups)
    return out.reshape(out.shape[1:]) if unbatched else out


def conv1d(input, weight, bias=None, stride=1, padding=0, dilation=1, groups=1) -> Tensor:
    """1-D convolution of (N, C, L) (or (C, L)) with weight (O, C/groups, k)."""
    return conv_nd(input, weight, bias, stride, padding, dilation, groups, 1, "conv1d")


def conv2d(input, weight, bias=None, stride=1, padding=0, dilation=1, groups=1) -> Tensor:
    """2-D convolution of (N, C, H, W) (or (C, H, W)) with weight (O, C/groups, kh, kw)."""
    return conv_nd(input, weight, bias, stride, padding, dilation, groups, 2, "conv2d")
