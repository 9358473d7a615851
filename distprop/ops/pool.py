"""Pooling over 1 or 2 spatial dims: max, average and adaptive average.

Max and average pooling loop over kernel offsets only: each offset is one strided slice of the
(padded) input covering every window at once, so a 2x2 pool is four whole-array operations.
Arrays keep their input's memory layout (a channels-last convolution output stays channels-last).
"""

from __future__ import annotations

import functools
import itertools
import math

import numpy as np

from distprop.backend import get_array_module
from distprop.ops._util import same_layout
from distprop.ops.conv import ntuple
from distprop.tensor import Function, Tensor


def _alloc_like(xp, like, shape, dtype, fill=None):
    """An array of ``shape`` whose axes are laid out in memory in the same order as ``like``."""
    strides = like.strides
    perm = sorted(range(like.ndim), key=lambda i: -strides[i])
    buf = (xp.zeros if fill == 0 else xp.empty)([shape[i] for i in perm], dtype=dtype)
    if fill is not None and fill != 0:
        buf.fill(fill)
    if perm == list(range(like.ndim)):
        return buf
    inverse = [0] * len(perm)
    for pos, axis in enumerate(perm):
        inverse[axis] = pos
    return buf.transpose(inverse)


def pool_output_size(size, k, pad, s, d, ceil_mode) -> int:
    """PyTorch's pooling output length for one spatial dim."""
    span = size + 2 * pad - d * (k - 1) - 1 + (s - 1 if ceil_mode else 0)
    out = span // s + 1
    if ceil_mode and (out - 1) * s >= size + pad:
        out -= 1
    return out


def _offset_slices(offsets, dilation, stride, out_sp):
    """Index selecting, for one kernel offset, its element of every window (N, C, *out)."""
    return (slice(None), slice(None), *(
        slice(i * d, i * d + s * (o - 1) + 1, s)
        for i, d, s, o in zip(offsets, dilation, stride, out_sp)))


def _pad_to(xp, x, pads_lo, padded_sp, value):
    """x (N, C, *sp) in a buffer of spatial size ``padded_sp`` filled with ``value``."""
    if all(p == 0 for p in pads_lo) and tuple(padded_sp) == tuple(x.shape[2:]):
        return x
    out = _alloc_like(xp, x, (*x.shape[:2], *padded_sp), x.dtype, fill=value)
    out[(slice(None), slice(None),
         *(slice(p, p + s) for p, s in zip(pads_lo, x.shape[2:])))] = x
    return out


def _crop(g, pads_lo, sp):
    return g[(slice(None), slice(None), *(slice(p, p + s) for p, s in zip(pads_lo, sp)))]


class _PoolGeometry:
    """Window geometry shared by max and average pooling (per spatial dim tuples)."""

    def __init__(self, x_shape, kernel, stride, padding, dilation, ceil_mode):
        self.x_shape = tuple(x_shape)
        self.kernel, self.stride, self.padding, self.dilation = kernel, stride, padding, dilation
        self.out_sp = tuple(
            pool_output_size(n, k, p, s, d, ceil_mode)
            for n, k, p, s, d in zip(x_shape[2:], kernel, padding, stride, dilation))
        # Enough room on the high side for every window (ceil_mode may run past the padding).
        self.padded_sp = tuple(
            max(n + 2 * p, (o - 1) * s + d * (k - 1) + 1)
            for n, k, p, s, d, o in zip(x_shape[2:], kernel, padding, stride, dilation,
                                        self.out_sp))
        self.overlap = any(s < d * (k - 1) + 1 for k, s, d in zip(kernel, stride, dilation))
        # Windows tile the padded input exactly: backward need not zero-fill its gradient.
        self.exact_cover = all(d == 1 and s == k and o * s == n for k, s, d, o, n in zip(
            kernel, stride, dilation, self.out_sp, self.padded_sp))

        # avg pooling sums one dim at a time once that saves passes (3+ taps in a dim)
        self.separable = len(kernel) > 1 and max(kernel) >= 3
        # max pooling too, but its two levels of masks only pay on larger outputs (measured:
        # 3x3 windows, 31x31 outputs 1.2-1.6x faster, 6x6 outputs 1.2x slower)
        self.max_separable = self.separable and math.prod(self.out_sp) >= 256
        self._scales = {}

        self._offsets = list(itertools.product(*(range(k) for k in kernel)))
        self._windows = {offs: _offset_slices(offs, dilation, stride, self.out_sp)
                         for offs in self._offsets}

    def offsets(self):
        return self._offsets

    def avg_scale(self, xp, dtype, count_include_pad, divisor_override):
        """1 / divisor: a Python float when every window has the same one, else an array."""
        if divisor_override:
            return 1.0 / divisor_override
        key = (xp, dtype, count_include_pad)
        scale = self._scales.get(key)
        if scale is None:
            div = _divisors(self, count_include_pad)
            if (div == div.flat[0]).all():
                scale = 1.0 / float(div.flat[0])
            else:
                scale = xp.asarray(1.0 / div, dtype=dtype)
            self._scales[key] = scale
        return scale

    def window(self, offsets):
        return self._windows[offsets]


class MaxPoolNd(Function):
    """out = max over each window; grad goes to the first maximal element of its window.

    Windows of 3 or more per dim (on outputs of 256+ positions) are reduced one dim at a time,
    last dim first: the row maxima, then the max of those. Backward routes each gradient to the
    first row holding the window's maximum, then to that row's first maximum -- the window's
    first maximum in row-major order, as PyTorch's -- with ``sum(kernel)`` masked passes
    instead of ``prod(kernel)``. (A window whose maximum is NaN sends its gradient into its last
    row, there to the first maximum or, if that row holds a NaN too, to its last position; the
    one-pass path sends it to the window's last position, PyTorch to its last NaN.)
    """

    def forward(self, x, *, geometry):
        xp = get_array_module(x)
        geo = self.geo = geometry
        xpad = _pad_to(xp, x, geo.padding, geo.padded_sp, -math.inf)
        if geo.max_separable:
            # levels[d]: the maxima over the windows of dims d.. (levels[0] is xpad itself)
            levels = [xpad]
            for dim in reversed(range(len(geo.kernel))):
                levels.append(_max_along(xp, levels[-1], dim, geo))
            self.levels, self.out = levels, levels[-1]
            return self.out
        out = None
        for offs in geo.offsets():
            s = xpad[geo.window(offs)]
            if out is None:
                out = s.copy(order="K")
            else:
                xp.maximum(out, s, out=out)
        self.xpad, self.out = xpad, out
        return out

    def backward(self, grad_out):
        xp = get_array_module(grad_out)
        geo = self.geo
        grad_out = same_layout(grad_out, self.out)  # the masks below are in out's layout
        if geo.max_separable:
            g, levels = grad_out, self.levels
            for dim in range(len(geo.kernel)):  # undo the reductions, last one first
                level = len(levels) - 2 - dim
                g = _route_first_max(xp, levels[level], levels[level + 1], g, dim, geo)
            return _crop(g, geo.padding, geo.x_shape[2:])
        gpad = _alloc_like(xp, self.xpad, self.xpad.shape, grad_out.dtype,
                           fill=None if geo.exact_cover else 0)
        offsets = geo.offsets()
        taken = None  # windows whose first maximum an earlier offset already held
        for n, offs in enumerate(offsets):
            if n < len(offsets) - 1:
                hit = self.xpad[geo.window(offs)] == self.out
                first = hit if taken is None else xp.greater(hit, taken)  # hit and not taken
            elif taken is not None:
                first = xp.logical_not(taken, out=taken)
            else:
                first = None  # a one-element window
            dst = gpad[geo.window(offs)]
            if geo.overlap:
                dst += grad_out if first is None else grad_out * first
            elif first is None:
                dst[...] = grad_out
            else:
                xp.multiply(grad_out, first, out=dst)
            if n < len(offsets) - 1:
                taken = hit if taken is None else xp.logical_or(taken, hit, out=taken)
        return _crop(gpad, geo.padding, geo.x_shape[2:])


def max_pool_indices(x, geo: _PoolGeometry):
    """Flat spatial index (into the unpadded input) of each window's first maximum."""
    xp = get_array_module(x)
    xpad = _pad_to(xp, x, geo.padding, geo.padded_sp, -math.inf)
    out = None
    for offs in geo.offsets():
        s = xpad[geo.window(offs)]
        out = s.copy() if out is None else xp.maximum(out, s)
    index = xp.zeros(out.shape, dtype=np.int64)
    found = xp.zeros(out.shape, dtype=bool)
    sp = geo.x_shape[2:]
    for offs in geo.offsets():
        hit = (xpad[geo.window(offs)] == out) & ~found
        flat = 0
        for dim, (i, s, d, p, o) in enumerate(zip(offs, geo.stride, geo.dilation, geo.padding,
                                                   geo.out_sp)):
            pos = xp.arange(o, dtype=np.int64) * s + (i * d - p)
            flat = flat * sp[dim] + pos.reshape((o,) + (1,) * (len(sp) - dim - 1))
        index += hit * flat
        found |= hit
    return index


class AvgPoolNd(Function):
    """out = sum over each window / divisor (PyTorch's divisor rules); grad spread evenly.

    Windows of 3 or more per dim are summed one dim at a time (``sum(kernel)`` strided adds
    instead of ``prod(kernel)``), and spread back the same way in backward.
    """

    def forward(self, x, *, geometry, count_include_pad, divisor_override):
        xp = get_array_module(x)
        geo = self.geo = geometry
        xpad = _pad_to(xp, x, geo.padding, geo.padded_sp, 0)
        if geo.separable:
            out = xpad
            for dim in range(len(geo.kernel)):
                out = _sum_along(out, dim, geo)
            if out is xpad:
                out = out.copy(order="K")
        else:
            out = None
            for offs in geo.offsets():
                s = xpad[geo.window(offs)]
                if out is None:
                    out = s.copy(order="K")
                else:
                    out += s
        self.scale = geo.avg_scale(xp, x.dtype, count_include_pad, divisor_override)
        out *= self.scale
        self.dtype, self.pad_layout = x.dtype, xpad
        return out

    def backward(self, grad_out):
        xp = get_array_module(grad_out)
        geo = self.geo
        spread = grad_out * self.scale
        if geo.separable:
            g = spread
            for dim in reversed(range(len(geo.kernel))):
                g = _spread_along(xp, g, dim, geo, self.pad_layout)
            return _crop(g, geo.padding, geo.x_shape[2:])
        gpad = _alloc_like(xp, self.pad_layout, self.pad_layout.shape, self.dtype,
                           fill=None if geo.exact_cover else 0)
        for offs in geo.offsets():
            dst = gpad[geo.window(offs)]
            if geo.overlap:
                dst += spread
            else:
                dst[...] = spread
        return _crop(gpad, geo.padding, geo.x_shape[2:])


def _dim_window(dim, i, geo, ndim):
    """Index selecting kernel offset ``i`` of every window along spatial ``dim`` only."""
    d, s, o = geo.dilation[dim], geo.stride[dim], geo.out_sp[dim]
    return (slice(None),) * (2 + dim) + (slice(i * d, i * d + s * (o - 1) + 1, s),) + (
        slice(None),) * (ndim - 3 - dim)


def _sum_along(a, dim, geo):
    """Window sums of ``a`` along spatial ``dim`` (the other dims untouched)."""
    k = geo.kernel[dim]
    out = a[_dim_window(dim, 0, geo, a.ndim)].copy(order="K")
    for i in range(1, k):
        out += a[_dim_window(dim, i, geo, a.ndim)]
    return out


def _max_along(xp, a, dim, geo):
    """Window maxima of ``a`` along spatial ``dim`` (the other dims untouched)."""
    out = a[_dim_window(dim, 0, geo, a.ndim)].copy(order="K")
    for i in range(1, geo.kernel[dim]):
        xp.maximum(out, a[_dim_window(dim, i, geo, a.ndim)], out=out)
    return out


def _route_first_max(xp, vals, maxima, g, dim, geo):
    """Transpose of :func:`_max_along`: each window's gradient ``g`` goes to the first position
    along ``dim`` where ``vals`` equals the window's maximum (the last one if none does)."""
    k, s, d = geo.kernel[dim], geo.stride[dim], geo.dilation[dim]
    overlap = s < d * (k - 1) + 1
    exact = d == 1 and s == k and geo.out_sp[dim] * s == vals.shape[2 + dim]
    out = _alloc_like(xp, vals, vals.shape, g.dtype, fill=None if exact else 0)
    taken = None  # windows whose first maximum an earlier offset already held
    for i in range(k):
        window = _dim_window(dim, i, geo, vals.ndim)
        if i < k - 1:
            hit = vals[window] == maxima
            first = hit if taken is None else xp.greater(hit, taken)  # hit and not taken
        else:
            first = None if taken is None else xp.logical_not(taken, out=taken)
        dst = out[window]
        if overlap:
            dst += g if first is None else g * first
        elif first is None:
            dst[...] = g
        else:
            xp.multiply(g, first, out=dst)
        if i < k - 1:
            taken = hit if taken is None else xp.logical_or(taken, hit, out=taken)
    return out


def _spread_along(xp, g, dim, geo, like):
    """Transpose of :func:`_sum_along`: each window's value added back onto its positions."""
    shape = list(g.shape)
    shape[2 + dim] = geo.padded_sp[dim]
    k, s, d = geo.kernel[dim], geo.stride[dim], geo.dilation[dim]
    overlap = s < d * (k - 1) + 1
    exact = d == 1 and s == k and geo.out_sp[dim] * s == geo.padded_sp[dim]
    out = _alloc_like(xp, like, tuple(shape), g.dtype, fill=None if exact else 0)
    for i in range(k):
        dst = out[_dim_window(dim, i, geo, g.ndim)]
        if overlap:
            dst += g
        else:
            dst[...] = g
    return out


def _divisors(geo: _PoolGeometry, count_include_pad: bool):
    """Per-output-position window sizes, as PyTorch's avg_pool counts them (host array)."""
    total = np.ones((1,) * len(geo.out_sp), dtype=np.float64)
    for dim, (n, k, s, p, o) in enumerate(zip(geo.x_shape[2:], geo.kernel, geo.stride,
                                               geo.padding, geo.out_sp)):
        start = np.arange(o) * s - p
        end = np.minimum(start + k, n + p)
        if not count_include_pad:
            end = np.minimum(end, n)
            start = np.maximum(start, 0)
        count = (end - start).astype(np.float64)
        total = total * count.reshape((o,) + (1,) * (len(geo.out_sp) - dim - 1))
    return total


class AdaptiveAvgPoolNd(Function):
    """out = mean over PyTorch's adaptive bins [floor(i*n/o), ceil((i+1)*n/o)); one GEMM/dim."""

    def forward(self, x, *, output_size):
        xp = get_array_module(x)
        self.mats = [xp.asarray(_bin_matrix(n, o), dtype=x.dtype)
                     for n, o in zip(x.shape[2:], output_size)]
        out = x
        for dim, mat in enumerate(self.mats):
            out = _apply_along(xp, out, mat, 2 + dim)
        return out

    def backward(self, grad_out):
        xp = get_array_module(grad_out)
        g = grad_out
        for dim, mat in enumerate(self.mats):
            g = _apply_along(xp, g, mat.T, 2 + dim)
        return g


def _bin_matrix(n: int, o: int) -> np.ndarray:
    """(o, n) averaging matrix of the adaptive bins."""
    mat = np.zeros((o, n), dtype=np.float64)
    for i in range(o):  # loops over output bins of one dim (a handful), not over pixels
        start, end = (i * n) // o, -((-(i + 1) * n) // o)
        mat[i, start:end] = 1.0 / (end - start)
    return mat


def _apply_along(xp, x, mat, axis):
    """Contract ``axis`` of x with mat (o, n): one GEMM over a contiguous (rows, n) matrix."""
    moved = xp.ascontiguousarray(xp.moveaxis(x, axis, -1))
    out = moved.reshape(-1, moved.shape[-1]) @ mat.T
    return xp.moveaxis(out.reshape(*moved.shape[:-1], mat.shape[0]), -1, axis)


# --- user-facing functions ---------------------------------------------------------------------


def _check_pool_input(input, nd: int, name: str):
    if not isinstance(input, Tensor):
        raise TypeError(f"{name}: expected a Tensor input, got {type(input).__name__}")
    if input.ndim not in (nd + 1, nd + 2):
        raise ValueError(
            f"{name}: expected a {nd + 1}-D (unbatched) or {nd + 2}-D (batched) input, got "
            f"shape {input.shape}"
        )
    if input.dtype.kind != "f":
        raise TypeError(f"{name}: expected a floating-point input, got dtype {input.dtype}")
    unbatched = input.ndim == nd + 1
    return (input.reshape(1, *input.shape) if unbatched else input), unbatched


@functools.lru_cache(maxsize=256)
def _cached_geometry(x_shape, kernel, stride, padding, dilation, ceil_mode) -> _PoolGeometry:
    """One geometry per shape and window (it also keeps the avg-pool divisors)."""
    return _PoolGeometry(x_shape, kernel, stride, padding, dilation, ceil_mode)


def _geometry(x, input, kernel_size, stride, padding, dilation, ceil_mode, nd, name):
    kernel = ntuple(kernel_size, nd, "kernel_size")
    stride = kernel if stride is None or stride == [] or stride == () else ntuple(
        stride, nd, "stride")
    padding = ntuple(padding, nd, "padding")
    dilation = ntuple(dilation, nd, "dilation")
    if any(k < 1 for k in kernel) or any(s < 1 for s in stride) or any(d < 1 for d in dilation):
        raise ValueError(
            f"{name}: kernel_size, stride and dilation must be positive, got {kernel}, {stride}, "
            f"{dilation}")
    if any(p < 0 or p > k // 2 for p, k in zip(padding, kernel)):
        raise ValueError(
            f"{name}: pad should be at most half of kernel size, got padding={padding} and "
            f"kernel_size={kernel}")
    geo = _cached_geometry(tuple(x.shape), kernel, stride, padding, dilation, bool(ceil_mode))
    if any(o < 1 for o in geo.out_sp):
        raise ValueError(
            f"{name}: input of shape {input.shape} is too small for kernel_size={kernel}, "
            f"stride={stride}, padding={padding}, dilation={dilation}: calculated output size "
            f"{geo.out_sp}")
    return geo


def max_pool_nd(input, kernel_size, stride, padding, dilation, ceil_mode, return_indices,
                nd: int, name: str):
    x, unbatched = _check_pool_input(input, nd, name)
    geo = _geometry(x, input, kernel_size, stride, padding, dilation, ceil_mode, nd, name)
    out = MaxPoolNd.apply(x, geometry=geo)
    if unbatched:
        out = out.reshape(out.shape[1:])
    if not return_indices:
        return out
    index = max_pool_indices(x.data, geo)
    return out, Tensor._wrap(index[0] if unbatched else index)


def avg_pool_nd(input, kernel_size, stride, padding, ceil_mode, count_include_pad,
                divisor_override, nd: int, name: str):
    x, unbatched = _check_pool_input(input, nd, name)
    geo = _geometry(x, input, kernel_size, stride, padding, 1, ceil_mode, nd, name)
    if divisor_override is not None and (isinstance(divisor_override, bool) or not isinstance(
            divisor_override, int) or divisor_override == 0):
        raise ValueError(f"{name}: divisor_override must be a non-zero int, got "
                         f"{divisor_override!r}")
    out = AvgPoolNd.apply(x, geometry=geo, count_include_pad=bool(count_include_pad),
                          divisor_override=divisor_override)
    return out.reshape(out.shape[1:]) if unbatched else out


def adaptive_avg_pool_nd(input, output_size, nd: int, name: str):
    x, unbatched = _check_pool_input(input, nd, name)
    if isinstance(output_size, (list, tuple)):
        if len(output_size) != nd:
            raise ValueError(f"{name}: output_size must have {nd} entries, got {output_size!r}")
        sizes = tuple(x.shape[2 + i] if s is None else s for i, s in enumerate(output_size))
    else:
        sizes = (output_size,) * nd
    if not all(isinstance(s, (int, np.integer)) and s >= 1 for s in sizes):
        raise ValueError(f"{name}: output_size must be positive ints or None, got {output_size!r}")
    if any(n < 1 for n in x.shape[2:]):
        raise ValueError(f"{name}: input of shape {input.shape} has an empty spatial dim")
    out = AdaptiveAvgPoolNd.apply(x, output_size=tuple(int(s) for s in sizes))
    return out.reshape(out.shape[1:]) if unbatched else out


def max_pool1d(input, kernel_size, stride=None, padding=0, dilation=1, ceil_mode=False,
               return_indices=False):
    """Max over windows of (N, C, L); with ``return_indices`` also the argmax positions."""
    return max_pool_nd(input, kernel_size, stride, padding, dilation, ceil_mode,
                       return_indices, 1, "max_pool1d")


def max_pool2d(input, kernel_size, stride=None, padding=0, dilation=1, ceil_mode=False,
               return_indices=False):
    """Max over windows of (N, C, H, W); with ``return_indices`` also flat argmax positions."""
    return max_pool_nd(input, kernel_size, stride, padding, dilation, ceil_mode,
                       return_indices, 2, "max_pool2d")


def avg_pool1d(input, kernel_size, stride=None, padding=0, ceil_mode=False,
               count_include_pad=True):
    """Mean over windows of (N, C, L)."""
    return avg_pool_nd(input, kernel_size, stride, padding, ceil_mode, count_include_pad, None,
                       1, "avg_pool1d")


def avg_pool2d(input, kernel_size, stride=None, padding=0, ceil_mode=False,
               count_include_pad=True, divisor_override=None):
    """Mean over windows of (N, C, H, W) (PyTorch's divisor rules)."""
    return avg_pool_nd(input, kernel_size, stride, padding, ceil_mode, count_include_pad,
                       divisor_override, 2, "avg_pool2d")


def adaptive_avg_pool1d(input, output_size):
    """Mean over PyTorch's adaptive bins of (N, C, L)."""
    return adaptive_avg_pool_nd(input, output_size, 1, "adaptive_avg_pool1d")


def adaptive_avg_pool2d(input, output_size):
    """Mean over PyTorch's adaptive bins of (N, C, H, W); None keeps that input size."""
    return adaptive_avg_pool_nd(input, output_size, 2, "adaptive_avg_pool2d")
