"""2-D convolution through the Fourier domain, with the transforms written as GEMMs.

A convolution is a product per frequency: with ``X``, ``W`` and ``G`` the 2-D discrete Fourier
transforms (size = the padded input) of the input, the weight and the output gradient,

- forward ``Y[f] = X[f] @ conj(W[f])``  (``(N, C) @ (C, O)`` at every frequency ``f``),
- input gradient ``DX[f] = G[f] @ W[f]^T``,
- weight gradient ``DW[f] = conj(G[f])^T @ X[f]``,

and the transform size is the padded input, so the circular products equal the linear ones (no
index wraps around). By symmetry only ``N^2 / 2`` of the ``N^2`` frequencies of an ``N x N``
grid are kept, and each costs ``4 C O`` real multiply-adds (a complex product): about
``2 C O`` per pixel, where im2col costs ``C O k^2`` per output pixel, ``k^2 / 2`` times more.
From 5x5 kernels on that pays for the transforms (``FourierConv2d.suits`` says where).

The transforms are not FFTs: for the small image sizes of a convolution, a real DFT along the
width and a complex one along the height are two GEMMs with fixed matrices (``O(n^3)`` per
image, but at BLAS speed; NumPy's pocketfft takes 3-4 us per 20x20 image). The matrices only
have rows for the positions that carry data, so padding, stride and dilation need no copies:
the input sits at ``pad + i``, the output is read at ``i * stride``, the kernel taps sit at
``i * dilation`` (a stride still pays for the products at every frequency of the full grid,
which is why ``conv2d`` sends strided convolutions to im2col). Conjugates come free by
flipping the sign of the transform's exponent. The bias gradient is the zero-frequency term of
``G``, already computed.

Layout: the transforms run image by image on channels-last data (the width transform reads
``(w, C)`` rows, the height transform's operand is then already in ``[real, imaginary]`` row
pairs), and one copy with runs of ``C`` floats turns the result frequency-major for the
products; the inverse mirrors it, so the output and the input gradient come out channels-last in
memory, as im2col's do. (Transforming channels-first images instead needs transposing copies
with runs of ``n / 2 + 1`` floats; that first version was slower on every shape compared.)
"""

from __future__ import annotations

import functools
import math

import numpy as np

from distprop import amp
from distprop.backend import get_array_module
from distprop.ops._util import gemm
from distprop.ops.workspace import scratch
from distprop.tensor import Function

Positions = tuple  # (first, count, step): the positions first + step * i, i < count


def _angles(rows, cols, n: int) -> np.ndarray:
    """2 pi r c / n for every (r, c), reduced mod n in integers first (exact phases)."""
    return 2 * np.pi * (np.outer(rows, cols) % n) / n


def _span(pos: Positions) -> np.ndarray:
    first, count, step = pos
    return first + step * np.arange(count)


@functools.lru_cache(maxsize=128)
def width_dft(pos: Positions, n: int, sign: int, dtype: str) -> np.ndarray:
    """``(2 F, count)``: a real signal at ``pos`` (columns of ``M @ x``) -> its ``F = n // 2 + 1``
    frequencies of ``exp(sign i 2 pi f t / n)``, real parts then imaginary parts."""
    a = _angles(np.arange(n // 2 + 1), _span(pos), n)
    return np.ascontiguousarray(np.concatenate([np.cos(a), sign * np.sin(a)]), dtype=dtype)


@functools.lru_cache(maxsize=128)
def height_dft(out: Positions, inp: Positions, n: int, sign: int, scale: float, dtype: str,
               pairs_in: bool) -> np.ndarray:
    """``scale * exp(sign i 2 pi o p / n)`` as a real ``(2 len(out), 2 len(inp))`` matrix on
    complex rows: ``pairs_in``: rows in ``(part, out)`` order, columns in ``(inp, part)`` order
    (the width transform's output); else rows in ``(out, part)``, columns in ``(part, inp)``."""
    a = _angles(_span(out), _span(inp), n)
    re, im = scale * np.cos(a), scale * sign * np.sin(a)
    block = np.block([[re, -im], [im, re]])  # rows (part, out), columns (part, inp)
    o, i = a.shape
    if pairs_in:
        block = block.reshape(2 * o, 2, i).transpose(0, 2, 1)
    else:
        block = block.reshape(2, o, 2 * i).transpose(1, 0, 2)
    return np.ascontiguousarray(block.reshape(2 * o, 2 * i), dtype=dtype)


@functools.lru_cache(maxsize=128)
def width_idft(n: int, pos: Positions, sign: int, dtype: str) -> np.ndarray:
    """``(count, 2 F)``: the real part at ``pos`` of the sum over all ``n`` frequencies of
    ``Z[f] exp(sign i 2 pi f t / n)``, from the ``F = n // 2 + 1`` of a Hermitian ``Z`` (real
    parts then imaginary parts)."""
    nf = n // 2 + 1
    weight = np.full(nf, 2.0)
    weight[0] = 1.0
    if n % 2 == 0:
        weight[-1] = 1.0
    a = _angles(_span(pos), np.arange(nf), n)
    return np.ascontiguousarray(np.concatenate([weight * np.cos(a), -sign * weight * np.sin(a)],
                                               axis=1), dtype=dtype)


def spectrum(a, pos: tuple[Positions, Positions], size: tuple[int, int], sign: int):
    """Transform of ``a`` ``(R, h, w, C)`` (channels-last; any strides) placed at ``pos`` in a
    ``size`` grid, as ``(2, size[0], F, R, C)``: real and imaginary parts, frequency-major (one
    ``(R, C)`` matrix per frequency).

    Along the width one ``(2F, w) @ (w, C)`` product per row of each image, along the height one
    ``(2 n1, 2 h) @ (2 h, F C)`` product per image (the rows' ``[real, imaginary]`` pairs are
    already interleaved as that product wants), then one copy to frequency-major order whose
    runs are ``C`` long.
    """
    xp = get_array_module(a)
    r, h, w, c = a.shape
    n1, n2 = size
    dt = a.dtype.str
    nf = n2 // 2 + 1
    rows = scratch(xp, (r, h, 2 * nf, c), a.dtype)
    gemm(xp.asarray(width_dft(pos[1], n2, sign, dt)), a, out=rows)  # (R, h, [re|im] x F, C)
    along_h = xp.asarray(height_dft((0, n1, 1), pos[0], n1, sign, 1.0, dt, True))
    per_image = gemm(along_h, rows.reshape(r, 2 * h, nf * c))  # (R, 2, n1, F, C)
    out = scratch(xp, (2, n1, nf, r, c), a.dtype)
    out[...] = per_image.reshape(r, 2, n1, nf, c).transpose(1, 2, 3, 0, 4)
    return out


def inverse(spec, pos: tuple[Positions, Positions], size: tuple[int, int], sign: int):
    """The real signal at ``pos`` of a ``(2, n1, F, R, C)`` Hermitian spectrum, channels-last:
    ``(R, h, w, C)`` with ``h, w`` the two position counts (the steps of :func:`spectrum` in
    reverse)."""
    xp = get_array_module(spec)
    _, n1, nf, r, c = spec.shape
    dt = spec.dtype.str
    h, w = pos[0][1], pos[1][1]
    per_image = scratch(xp, (r, 2, n1, nf, c), spec.dtype)
    per_image[...] = spec.transpose(3, 0, 1, 2, 4)
    along_h = xp.asarray(height_dft(pos[0], (0, n1, 1), n1, sign, 1.0 / math.prod(size), dt,
                                    False))
    rows = gemm(along_h, per_image.reshape(r, 2 * n1, nf * c))  # (R, h, [re|im] x F, C)
    out = xp.empty((r, h, w, c), dtype=spec.dtype)
    gemm(xp.asarray(width_idft(size[1], pos[1], sign, dt)), rows.reshape(r, h, 2 * nf, c),
         out=out)
    return out


def complex_matmul(a, b):
    """``a @ b`` of ``(2, F, m, k)`` and ``(2, F, k, n)`` complex arrays stored as real and
    imaginary parts: four real products per frequency (any transposed views of the operands)."""
    xp = get_array_module(a)
    out = xp.empty((2, a.shape[1], a.shape[2], b.shape[3]), dtype=a.dtype)
    gemm(a[0], b[0], out=out[0])
    out[0] -= gemm(a[1], b[1])
    gemm(a[0], b[1], out=out[1])
    out[1] += gemm(a[1], b[0])
    return out


class FourierConv2d(Function):
    """conv2d with one group by products per frequency (see the module docstring).

    Keeps for backward the input's spectrum (about the padded input's size) and the weight's
    (``C O`` frequency grids of about half a padded image each), not the im2col matrix.
    """

    MIN_TAPS = 25  # kernel taps (5x5) from which the products per frequency pay
    MANY_TAPS = 49  # 7x7: enough work per pixel to carry more output-side transforms ...
    MAX_FAN_OUT = {MIN_TAPS: 4, MANY_TAPS: 8}  # ... O / C up to this (those transforms dominate)
    MIN_OUT_PIXELS = 144  # 12x12; below, there are about as many frequencies as pixels ...
    SMALL_OUT_PIXELS, SMALL_CHANNEL_PAIRS = 64, 1024  # ... down to 8x8 pays when C O <= 1024
    MAX_OUT_SIDE = 64  # the transforms cost O(side) per pixel: larger images stay on im2col
    MIN_BATCH = 8  # the weight's transforms cost the same at any batch: small ones stay on im2col

    @classmethod
    def suits(cls, x, weight, stride, padding, dilation, groups) -> bool:
        """Take this path for ``conv2d`` of the arrays ``x`` and ``weight``? Decided by the
        shapes alone (never by timing or thread count), so a rerun computes the same way:
        NumPy float32/float64 outside autocast, one group, stride 1, and

        - 5x5 (25 taps) or more: ``O <= 4 C``, an output of 12x12 or more (8x8 when
          ``C O <= 1024``);
        - 7x7 (49 taps) or more: ``O <= 8 C``, an output of 8x8 or more;
        - either way no output side above 64 (at 96-160 px the measured ratio ran from 0.4x
          to 2.3x, depending on the channels), and a batch of 8 or more (the weight's and
          its gradient's transforms cost the same at any batch: 1.2-6x im2col's time at
          batch 1-4 on 5x5 kernels).

        There, at 1 thread, forward+backward took 0.23-1.00x the im2col path's time (median
        0.49); outside, up to 2.2x (``benchmarks/bench_conv_fourier.py``,
        ``benchmarks/results/conv_fourier.md``).
        """
        if (type(x) is not np.ndarray or x.ndim != 4 or x.dtype != weight.dtype
                or x.dtype not in (np.float32, np.float64) or amp.is_autocast_enabled()):
            return False
        o, c = weight.shape[:2]
        kernel = weight.shape[2:]
        taps = math.prod(kernel)
        out_sides = [size + lo + hi - d * (k - 1) for size, (lo, hi), k, d
                     in zip(x.shape[2:], padding, kernel, dilation)]
        out_pixels = math.prod(out_sides)
        if (groups != 1 or any(s != 1 for s in stride) or taps < cls.MIN_TAPS
                or max(out_sides) > cls.MAX_OUT_SIDE or x.shape[0] < cls.MIN_BATCH):
            return False
        many = taps >= cls.MANY_TAPS
        big_enough = out_pixels >= cls.MIN_OUT_PIXELS or (
            out_pixels >= cls.SMALL_OUT_PIXELS and (many or c * o <= cls.SMALL_CHANNEL_PAIRS))
        return o <= cls.MAX_FAN_OUT[cls.MANY_TAPS if many else cls.MIN_TAPS] * c and big_enough

    def forward(self, x, weight, bias=None, *, stride, padding, dilation):
        n, c, hgt, wid = x.shape
        o, _, k1, k2 = weight.shape
        size = tuple(s + lo + hi for s, (lo, hi) in zip((hgt, wid), padding))
        out_sp = tuple((sz - d * (k - 1) - 1) // s + 1
                       for sz, k, s, d in zip(size, (k1, k2), stride, dilation))
        x_pos = tuple((lo, s, 1) for (lo, _), s in zip(padding, (hgt, wid)))
        out_pos = tuple((0, cnt, s) for cnt, s in zip(out_sp, stride))
        w_pos = tuple((0, k, d) for k, d in zip((k1, k2), dilation))
        xs = spectrum(x.transpose(0, 2, 3, 1), x_pos, size, -1)  # X
        # conj(W) as (2, .., C, O): the weight (O, C, k1, k2) read as C images (k1, k2, O)
        ws = spectrum(weight.transpose(1, 2, 3, 0), w_pos, size, +1)
        grid = (size[0], size[1] // 2 + 1)  # frequencies kept: all rows, half the columns
        fq = math.prod(grid)
        ys = complex_matmul(xs.reshape(2, fq, n, c), ws.reshape(2, fq, c, o))
        y = inverse(ys.reshape(2, *grid, n, o), out_pos, size, +1)  # (N, h, w, O)
        if bias is not None:
            y += bias
        y = y.transpose(0, 3, 1, 2)  # (N, O, h, w), channels-last in memory
        self.meta = (x.shape, weight.shape, size, grid, x_pos, out_pos, w_pos)
        self.xs = xs.reshape(2, fq, n, c) if self.needs_input_grad[1] else None
        self.ws = ws.reshape(2, fq, c, o) if self.needs_input_grad[0] else None
        self.has_bias = bias is not None
        return y

    def backward(self, grad_out):
        x_shape, w_shape, size, grid, x_pos, out_pos, w_pos = self.meta
        (n, c), o, fq = x_shape[:2], w_shape[0], math.prod(grid)
        # conj(G): (2, n1, F, N, O)
        gs = spectrum(grad_out.transpose(0, 2, 3, 1), out_pos, size, +1)
        gx = gw = gb = None
        if self.has_bias and self.needs_input_grad[2]:
            gb = gs[0, 0, 0].sum(axis=0)  # the zero frequency: sum over the pixels
        gs = gs.reshape(2, fq, n, o)
        if self.needs_input_grad[0]:
            # DX = G W^T = conj(conj(G) conj(W)^T): the inverse of a conjugate flips the sign
            dxs = complex_matmul(gs, self.ws.transpose(0, 1, 3, 2))
            gx = inverse(dxs.reshape(2, *grid, n, c), x_pos, size, -1).transpose(0, 3, 1, 2)
        if self.needs_input_grad[1]:
            dws = complex_matmul(gs.transpose(0, 1, 3, 2), self.xs)  # conj(G)^T X, (.., O, C)
            gw = inverse(dws.reshape(2, *grid, o, c), w_pos, size, +1).transpose(0, 3, 1, 2)
        return gx, gw, gb
