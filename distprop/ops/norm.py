"""Fused batch and layer normalisation (one Function each, closed-form backward)."""

from __future__ import annotations

import numpy as np

from distprop.backend import get_array_module
from distprop.ops._util import same_layout
from distprop.tensor import Function, Tensor


def _channel_shape(x):
    """Broadcast shape of a per-channel vector against (N, C, *sp)."""
    return (1, x.shape[1]) + (1,) * (x.ndim - 2)


def _xp(x):
    """NumPy for an ndarray without a call into the backend (a hot path on small inputs)."""
    return np if type(x) is np.ndarray else get_array_module(x)


_FILLED: dict = {}
_FILLED_MAX_ELEMENTS = 1 << 22  # the cache holds at most 16 MiB of float32 vectors


def _filled(n: int, value: float, x):
    """A read-only vector of ``n`` copies of ``value`` in x's dtype, cached for NumPy (the
    channel sums' GEMV operand: allocating and filling it each call costs as much as the GEMV
    on small arrays)."""
    if type(x) is not np.ndarray:
        return get_array_module(x).full(n, value, dtype=x.dtype)
    key = (n, value, x.dtype)
    v = _FILLED.get(key)
    if v is None:
        v = np.full(n, value, dtype=x.dtype)
        if n > _FILLED_MAX_ELEMENTS // 8:
            return v  # big inputs: the fill is cheap next to the passes; keep the cache small
        if sum(a.size for a in _FILLED.values()) + n > _FILLED_MAX_ELEMENTS:
            _FILLED.clear()
        v.flags.writeable = False
        _FILLED[key] = v
    return v


def channel_sum(x, scale: float = 1.0):
    """Sum of (N, C, *sp) over every axis but 1, times ``scale``, as BLAS matrix-vector
    products with a vector of ``scale``s: one over the (M, C) rows of a channels-last array,
    or over the pixels of a channels-first one and then the batch. NumPy's
    ``sum(axis=(0, 2, 3))`` walks such arrays with short strided inner loops, 5-20x slower;
    other layouts fall back to it."""
    n, c = x.shape[:2]
    if x.ndim == 2 and x.dtype.itemsize >= 4:
        return _filled(n, scale, x) @ x
    axes = (0, *range(2, x.ndim))
    if x.dtype.itemsize < 4:  # no BLAS for half precision; accumulate in float32
        out = x.sum(axis=axes, dtype=_xp(x).float32)
        if scale != 1.0:
            out *= scale
        return out.astype(x.dtype)
    last = x.transpose((0, *range(2, x.ndim), 1))
    if last.flags.c_contiguous:
        rows = last.reshape(-1, c)
        return _filled(rows.shape[0], scale, x) @ rows
    if x.flags.c_contiguous:
        per_image = x.reshape(n, c, -1) @ _filled(x.size // (n * c), scale, x)
        return _filled(n, 1.0, x) @ per_image
    out = x.sum(axis=axes)
    if scale != 1.0:
        out *= scale
    return out


def channel_dot(a, b, scale: float = 1.0):
    """Per-channel sum of a * b over every axis but 1, times ``scale``, without an a * b
    temporary (einsum reads both once; small arrays and half precision:
    ``channel_sum(a * b)``)."""
    if a.dtype.itemsize < 4 or a.size < 32768:  # einsum's ~5 us of parsing: small arrays
        return channel_sum(a * b, scale)
    axes = "nc" + "hwdxyz"[:a.ndim - 2]
    out = _xp(a).einsum(f"{axes},{axes}->c", a, b)
    if scale != 1.0:
        out *= scale
    return out


def per_channel(v, x):
    """The per-channel vector ``v`` shaped to broadcast against x (N, C, *sp) quickly.

    For a C-contiguous x with spatial axes: ``v`` repeated over one image's pixels, a (1, C,
    *sp) plane that NumPy pairs with each image as one long inner loop (a (1, C, 1, 1) vector
    gives N * C inner loops of only the pixel count: 1.1-1.8x slower). Otherwise (1, C, 1...).
    """
    if v.dtype != x.dtype:
        v = v.astype(x.dtype)
    if x.ndim == 2:
        return v
    if x.flags.c_contiguous and x.shape[0] > 1:
        return v.repeat(x.size // (x.shape[0] * x.shape[1])).reshape((1, *x.shape[1:]))
    return v.reshape(_channel_shape(x))


class BatchNorm(Function):
    """y = (x - mean) / sqrt(var + eps) * w + b over all axes but 1;
    train grad: w * invstd / n * (n g - sum g - xhat sum(g xhat)), eval grad: w * invstd * g.

    Passes over x-sized data, float32 channels-first: training forward 4 (mean; x - mean;
    var; scale) + 1 for a bias, backward 6; eval forward 2 (+ 1 for a bias), backward 1.
    The per-channel vector math is a handful of in-place NumPy calls: on small inputs
    (thousands of elements) those calls, not the passes, are the cost."""

    amp_policy = "fp32"  # autocast: see distprop/amp.py

    def forward(self, x, weight=None, bias=None, *, mean=None, var=None, eps, running=None):
        """Batch statistics when ``mean``/``var`` are None (training; folded into
        ``running = (running_mean, running_var, momentum)`` in place when given), else those
        (the running statistics)."""
        xp = _xp(x)
        self.batch_stats = mean is None
        if self.batch_stats:
            count = x.size // x.shape[1]
            mean = channel_sum(x, 1.0 / count)
            xc = xp.subtract(x, per_channel(mean, x))
            var = channel_dot(xc, xc, 1.0 / count)
            if running is not None:
                _update_running(*running, mean, var, count)
            invstd = var + eps
        else:
            invstd = var.astype(x.dtype, copy=False) + eps
        xp.sqrt(invstd, out=invstd)
        xp.reciprocal(invstd, out=invstd)
        scale = invstd if weight is None else invstd * weight
        if self.batch_stats:
            self.xc = xc
        else:  # x - mean, not x * scale + (b - mean * scale): that loses digits for large means
            xc = xp.subtract(x, per_channel(mean, x))
            # x - mean is only needed again for the weight's grad; the mean is copied (C floats)
            # since it is the running-mean buffer itself, which a later forward may update
            self.x, self.mean = x, mean.copy()
        # out = xc * (invstd * w) + b: xhat = xc * invstd is never stored (one pass less)
        out = xp.multiply(xc, per_channel(scale, x), out=None if self.batch_stats else xc)
        if bias is not None:
            out += per_channel(bias, x)
        self.invstd, self.scale, self.weight = invstd, scale, weight
        self.has_bias = bias is not None
        return out

    def backward(self, grad_out):
        xp = _xp(grad_out)
        invstd, weight = self.invstd, self.weight
        need_x = self.needs_input_grad[0]
        need_w = weight is not None and self.needs_input_grad[1]
        need_b = self.has_bias and self.needs_input_grad[2]
        if self.batch_stats:
            xc = self.xc
        elif need_w:  # eval mode: x - mean only for the weight's gradient
            xc = xp.subtract(self.x, per_channel(self.mean, self.x))
        else:
            xc = self.x
        grad_out = same_layout(grad_out, xc)
        gb = gw = gx = None
        if need_b or (need_x and self.batch_stats):
            gb = channel_sum(grad_out)
        if need_w or (need_x and self.batch_stats):
            gw = channel_dot(grad_out, xc)
            gw *= invstd  # sum(g * xhat)
        if need_x:
            scale = self.scale
            if self.batch_stats:
                # gx = scale * (g - gb / n - xhat * gw / n), xhat = xc * invstd
                inv_n = 1.0 / (grad_out.size // grad_out.shape[1])
                k = invstd * gw
                k *= inv_n
                gx = xp.multiply(xc, per_channel(k, xc))
                gx += per_channel(gb * inv_n, xc)
                xp.subtract(grad_out, gx, out=gx)
                gx *= per_channel(scale, xc)
            else:
                gx = grad_out * per_channel(scale, grad_out)
        return gx, (gw if need_w else None), (gb if need_b else None)


def _update_running(running_mean, running_var, momentum, mean, var, count):
    """r = (1 - momentum) * r + momentum * stat in place, with the unbiased variance."""
    m = float(momentum)
    if running_mean is not None:
        running_mean *= 1.0 - m
        running_mean += (m * mean).astype(running_mean.dtype, copy=False)
    if running_var is not None:
        running_var *= 1.0 - m
        running_var += (var * (m * count / (count - 1))).astype(running_var.dtype, copy=False)


def batch_norm(input, running_mean, running_var, weight=None, bias=None, training=False,
               momentum=0.1, eps=1e-5) -> Tensor:
    """Batch normalisation over every axis but 1 (as torch.nn.functional.batch_norm).

    In training the batch statistics normalise (biased variance) and, when running buffers are
    given, update them in place: ``r = (1 - momentum) * r + momentum * stat`` with the unbiased
    variance. Outside training the running statistics normalise.
    """
    if not isinstance(input, Tensor):
        raise TypeError(f"batch_norm: expected a Tensor input, got {type(input).__name__}")
    if input.dtype.kind != "f":
        raise TypeError(f"batch_norm: expected a floating-point input, got dtype {input.dtype}")
    if input.ndim < 2:
        raise ValueError(f"batch_norm: expected input with at least 2 dims, got {input.shape}")
    c = input.shape[1]
    for name, t in (("running_mean", running_mean), ("running_var", running_var),
                    ("weight", weight), ("bias", bias)):
        if t is not None and tuple(t.shape) != (c,):
            raise ValueError(
                f"batch_norm: {name} of shape {tuple(t.shape)} does not match the {c} channels "
                f"of input of shape {input.shape}")
    if not training:
        if running_mean is None or running_var is None:
            raise ValueError("batch_norm: running_mean and running_var are needed when not "
                             "training")
    elif input.numel() // c <= 1:
        raise ValueError(
            f"Expected more than 1 value per channel when training, got input size "
            f"{input.shape}")
    return checked_batch_norm(input, running_mean, running_var, weight, bias, training,
                              momentum, eps)


def checked_batch_norm(input, running_mean, running_var, weight, bias, training, momentum,
                       eps) -> Tensor:
    """:func:`batch_norm` without its argument checks, for callers that made them (the
    BatchNorm modules): on small inputs the checks cost as much as the arithmetic."""
    args = [input, weight, bias]
    while args[-1] is None and len(args) > 1:
        args.pop()
    if not training:
        return BatchNorm.apply(*args, mean=_data(running_mean), var=_data(running_var), eps=eps)
    running = None
    if running_mean is not None or running_var is not None:
        running = (None if running_mean is None else _data(running_mean),
                   None if running_var is None else _data(running_var), momentum)
    return BatchNorm.apply(*args, eps=eps, running=running)


def _data(t):
    return t.data if isinstance(t, Tensor) else t


_LN_FAST = (np.dtype(np.float32), np.dtype(np.float64))


def _ln_rows(x, ndim):
    """``x`` as the (rows, features) matrix LayerNorm normalises the rows of (a view), or None
    where the row path does not apply (CuPy, half precision, a non-contiguous ``x``)."""
    if type(x) is not np.ndarray or x.dtype not in _LN_FAST or not x.flags.c_contiguous:
        return None
    feat = 1
    for s in x.shape[x.ndim - ndim:]:
        feat *= s
    if feat == 0 or x.size == 0:
        return None
    return x.reshape(-1, feat)


class LayerNorm(Function):
    """y = (x - mean) / sqrt(var + eps) * w + b over the last k axes;
    grad: invstd * (gh - mean(gh) - xhat mean(gh xhat)) with gh = g w.

    NumPy float32/float64 with a C-contiguous x works on the (rows, features) matrix: row sums
    as BLAS matrix-vector products with a ones vector (or the weight), row and column dot
    products by einsum -- NumPy's ``mean(axis=-1)`` runs one inner loop per short row, several
    times slower -- and per-row factors folded together, so the forward makes 5 passes over
    x-sized data and the backward 5 (+ 1 for the weight's gradient)."""

    amp_policy = "fp32"  # autocast: see distprop/amp.py

    def forward(self, x, weight=None, bias=None, residual=None, *, ndim, eps):
        """Normalise ``x``, or ``x + residual`` (same shape: the post-norm residual block; both
        inputs get the same gradient) without a separate sum array."""
        self.weight, self.has_bias = weight, bias is not None
        self.has_residual = residual is not None
        rows = _ln_rows(x, ndim)
        if residual is not None:
            if rows is None or _ln_rows(residual, ndim) is None or residual.dtype != x.dtype:
                x, rows = x + residual, None
            else:
                rows = np.add(rows, residual.reshape(rows.shape))  # ours: normalised in place
        self.rows = rows is not None
        if rows is None:
            return self._forward_axes(x, weight, bias, ndim, eps)
        feat = rows.shape[1]
        one = x.dtype.type
        mean = rows @ _filled(feat, 1.0, rows)
        mean *= one(1.0 / feat)
        xhat = np.subtract(rows, mean[:, None], out=rows if residual is not None else None)
        var = np.einsum("ij,ij->i", xhat, xhat)
        var *= one(1.0 / feat)
        var += one(eps)
        invstd = np.sqrt(var, out=var)
        np.reciprocal(invstd, out=invstd)
        xhat *= invstd[:, None]
        if weight is not None:
            out = np.multiply(xhat, weight.reshape(feat))
            if bias is not None:
                out += bias.reshape(feat)
        elif bias is not None:
            out = np.add(xhat, bias.reshape(feat))
        else:
            out = xhat.copy()
        self.xhat, self.invstd, self.norm_shape = xhat, invstd, x.shape[x.ndim - ndim:]
        return out.reshape(x.shape)

    def backward(self, grad_out):
        grads = self._backward_rows(grad_out) if self.rows else self._backward_axes(grad_out)
        if self.has_residual:
            if not self.needs_input_grad[3]:
                return (*grads, None)
            # both inputs get the same values, but never one array: a hook or an in-place
            # change of one leaf's gradient must not change the other's
            both = self.needs_input_grad[0]
            return (*grads, grads[0].copy() if both else grads[0])
        return grads

    def _backward_rows(self, grad_out):
        xhat, invstd, weight = self.xhat, self.invstd, self.weight
        feat = xhat.shape[1]
        g = grad_out.reshape(xhat.shape)  # a copy only when grad_out is not contiguous
        gx = gw = gb = None
        if weight is not None and self.needs_input_grad[1]:
            gw = np.einsum("ij,ij->j", g, xhat).reshape(self.norm_shape)
        if self.has_bias and self.needs_input_grad[2]:
            gb = (_filled(g.shape[0], 1.0, g) @ g).reshape(self.norm_shape)
        if self.needs_input_grad[0] or (self.has_residual and self.needs_input_grad[3]):
            one = g.dtype.type
            # gx = invstd * gh - (invstd * mean(gh xhat)) * xhat - invstd * mean(gh)
            if weight is not None:
                w = weight.reshape(feat)
                gh = np.multiply(g, w)
                mean_gh = g @ w
            else:
                gh = g
                mean_gh = g @ _filled(feat, 1.0, g)
            proj = np.einsum("ij,ij->i", gh, xhat)
            proj *= invstd
            proj *= one(1.0 / feat)
            mean_gh *= invstd
            mean_gh *= one(1.0 / feat)
            if weight is not None:
                gh *= invstd[:, None]
            else:
                gh = np.multiply(g, invstd[:, None])
            gx = np.multiply(xhat, proj[:, None])
            gx += mean_gh[:, None]
            np.subtract(gh, gx, out=gx)
            gx = gx.reshape(grad_out.shape)
        return gx, gw, gb

    def _forward_axes(self, x, weight, bias, ndim, eps):
        """Any array module and layout: reductions over the trailing ``ndim`` axes."""
        xp = get_array_module(x)
        axes = tuple(range(x.ndim - ndim, x.ndim))
        mean = x.mean(axis=axes, keepdims=True)
        xhat = x - mean
        var = xp.square(xhat).mean(axis=axes, keepdims=True)
        invstd = 1.0 / xp.sqrt(var + eps)
        xhat *= invstd
        out = xhat * weight if weight is not None else xhat.copy()
        if bias is not None:
            out += bias
        self.xhat, self.invstd, self.axes = xhat, invstd, axes
        return out

    def _backward_axes(self, grad_out):
        xhat, invstd, weight, axes = self.xhat, self.invstd, self.weight, self.axes
        lead = tuple(range(grad_out.ndim - len(axes)))
        gx = gw = gb = None
        if weight is not None and self.needs_input_grad[1]:
            gw = (grad_out * xhat).sum(axis=lead)
        if self.has_bias and self.needs_input_grad[2]:
            gb = grad_out.sum(axis=lead)
        if self.needs_input_grad[0] or (self.has_residual and self.needs_input_grad[3]):
            gh = grad_out * weight if weight is not None else grad_out
            proj = (gh * xhat).mean(axis=axes, keepdims=True)
            gx = xhat * proj
            gx += gh.mean(axis=axes, keepdims=True)
            get_array_module(grad_out).subtract(gh, gx, out=gx)
            gx *= invstd
        return gx, gw, gb


def layer_norm(input, normalized_shape, weight=None, bias=None, eps=1e-5) -> Tensor:
    """Normalise over the trailing ``normalized_shape`` dims (as torch's layer_norm)."""
    if not isinstance(input, Tensor):
        raise TypeError(f"layer_norm: expected a Tensor input, got {type(input).__name__}")
    if input.dtype.kind != "f":
        raise TypeError(f"layer_norm: expected a floating-point input, got dtype {input.dtype}")
    shape = (normalized_shape,) if isinstance(normalized_shape, int) else tuple(normalized_shape)
    k = len(shape)
    if k == 0 or input.ndim < k or tuple(input.shape[input.ndim - k:]) != shape:
        raise ValueError(
            f"layer_norm: expected input with shape [*, {', '.join(map(str, shape))}], got "
            f"input of shape {input.shape}")
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None and tuple(t.shape) != shape:
            raise ValueError(f"layer_norm: {name} of shape {tuple(t.shape)} does not match "
                             f"normalized_shape {shape}")
    args = [input, weight, bias]
    while args[-1] is None and len(args) > 1:
        args.pop()
    if weight is None and bias is not None:
        args = [input, None, bias]
    return LayerNorm.apply(*args, ndim=k, eps=eps)
