"""Fused CUDA kernels for the hot paths of the GPU backend (CuPy ElementwiseKernel/RawKernel).

On the GPU the ``xp`` code of :mod:`distprop.ops` and :mod:`distprop.optim.functional` runs one
kernel launch per array operation. Where a step is a long chain of small elementwise operations
on the same data, one fused kernel does the same arithmetic in one pass over memory and one
launch:

* the SGD-momentum and Adam/AdamW updates over (slices of) the flat parameter buffer;
* softmax cross-entropy with class-index targets (the common training loss): one block per row
  computes max, log-sum-exp and the loss; backward recomputes the softmax from the saved row
  statistics instead of keeping an (N, C) exponential;
* the per-time-step gate math of LSTM and GRU, forward and backward;
* im2col / col2im of the convolutions, reading the unpadded input directly (padding handled in
  the kernel), with no padded copy and no 7-D strided copy.

Every kernel reproduces the formula and the operation order of its NumPy reference (the ``xp``
code path, which stays the reference and is what runs on the CPU), so results agree to float32
rounding. Arrays a kernel writes through computed indices are ``raw`` *output* parameters (CuPy
declares input parameters const).

One dispatch convention: call sites call the kernel function unconditionally (NumPy or CuPy)
and run their ``xp`` code when it returns ``None``, e.g. ``if cuda_kernels.lstm_forward_step(
...) is None: <xp code>``. Each kernel function decides once, through :func:`_usable`: ``None``
for NumPy arrays, when kernels are off (:func:`set_enabled`, ``DISTPROP_CUDA_KERNELS=0``) or an
argument is outside what the kernel handles; else it launches and returns what it wrote.

Every kernel is declared once in :data:`KERNELS` and made only by :func:`build`; the offline
check (tests/test_gpu_offline.py) compiles each with NVRTC (float32/float64, sm_80/sm_90, no
GPU) and checks its launches the way CuPy makes them.

CuPy is reached only through :func:`distprop.backend.cupy_module`; importing this module costs
nothing without it.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import numpy as np

from distprop import backend
from distprop.tensor import Function

_enabled = os.environ.get("DISTPROP_CUDA_KERNELS", "1") not in ("0", "")
_cache: dict = {}
_FLOATS = (np.dtype(np.float32), np.dtype(np.float64))


def enabled() -> bool:
    """Whether the fused kernels are used on CuPy arrays."""
    return _enabled


def set_enabled(flag: bool) -> None:
    """Turn the fused kernels on or off (off: the ``xp`` reference code runs on the GPU too)."""
    global _enabled
    _enabled = bool(flag)


@contextlib.contextmanager
def disabled():
    """Context manager running the ``xp`` reference code instead of the fused kernels."""
    previous = _enabled
    set_enabled(False)
    try:
        yield
    finally:
        set_enabled(previous)


def _usable(*arrays) -> bool:
    """The one GPU-or-not decision: True when fused kernels are on and every array is a CuPy
    float32/float64 array of one dtype (False for NumPy arrays, without touching CuPy)."""
    if not _enabled or type(arrays[0]) is np.ndarray:
        return False
    cp = backend.cupy_module()
    if cp is None:
        return False
    dtype = arrays[0].dtype
    return all(isinstance(a, cp.ndarray) and a.dtype == dtype for a in arrays) and \
        dtype in _FLOATS


@dataclass(frozen=True)
class KernelSpec:
    """One fused kernel: ``kind`` is ``"elementwise"`` (``cupy.ElementwiseKernel(in_params,
    out_params, body, name)``) or ``"raw"`` (``cupy.RawKernel``: ``body`` is the CUDA source
    with ``%(T)s`` for the element type, the function is ``<name>_<float|double>``)."""

    kind: str
    name: str
    body: str
    in_params: str = ""
    out_params: str = ""


KERNELS: dict[str, KernelSpec] = {}


def _declare(kind: str, name: str, body: str, in_params: str = "", out_params: str = "") -> str:
    KERNELS[name] = KernelSpec(kind, name, body, in_params, out_params)
    return name


def build(name: str, dtype=None):
    """The CuPy kernel object of :data:`KERNELS` ``[name]`` (raw kernels: for ``dtype``),
    created once per process; the only place kernel objects are made."""
    spec = KERNELS[name]
    key = (name, None if spec.kind == "elementwise" else np.dtype(dtype).str)
    kernel = _cache.get(key)
    if kernel is None:
        cp = backend.cupy_module()
        if spec.kind == "elementwise":
            kernel = cp.ElementwiseKernel(spec.in_params, spec.out_params, spec.body, name)
        else:
            kernel = cp.RawKernel(spec.body % {"T": _ctype(dtype)}, raw_function_name(name, dtype))
        _cache[key] = kernel
    return kernel


def raw_function_name(name: str, dtype) -> str:
    """The C function a raw kernel exports for ``dtype``."""
    return f"{name}_{_ctype(dtype)}"


def _ctype(dtype) -> str:
    return "float" if np.dtype(dtype) == np.float32 else "double"


# --- optimizer updates over the flat buffer --------------------------------------------------

_EFFECTIVE_GRAD = """
    T d = maximize ? (T)(-grad) : grad;
    if (weight_decay != 0.0) {
        T wd = param * (T)weight_decay;
        d = maximize ? (T)(wd - grad) : (T)(wd + grad);
    }
"""

_SGD_IN = ("T grad, float64 lr, float64 momentum, float64 dampening, float64 weight_decay, "
           "int32 nesterov, int32 maximize, int32 first_step")
_SGD = _declare("elementwise", "distprop_sgd", _EFFECTIVE_GRAD + "param = param + d * (T)(-lr);",
                _SGD_IN, "T param")
_SGD_MOMENTUM = _declare("elementwise", "distprop_sgd_momentum", _EFFECTIVE_GRAD + """
    T b;
    if (first_step) {
        b = d;
    } else {
        b = buf * (T)momentum;
        if (dampening == 0.0) b = b + d; else b = b + d * (T)(1.0 - dampening);
    }
    buf = b;
    if (nesterov) d = b * (T)momentum + d; else d = b;
    param = param + d * (T)(-lr);
""", _SGD_IN, "T param, T buf")


def sgd(param, grad, momentum_buffer, *, lr: float, momentum: float, dampening: float,
        weight_decay: float, nesterov: bool, maximize: bool, first_step: bool):
    """Fused :func:`distprop.optim.functional.sgd`: returns ``param`` (updated in place), or
    None when not applicable."""
    arrays = (param, grad) if momentum == 0 else (param, grad, momentum_buffer)
    if momentum != 0 and momentum_buffer is None or not _usable(*arrays):
        return None
    args = (grad, float(lr), float(momentum), float(dampening), float(weight_decay),
            int(nesterov), int(maximize), int(first_step))
    if momentum == 0:
        build(_SGD)(*args, param)
    else:
        build(_SGD_MOMENTUM)(*args, param, momentum_buffer)
    return param


_ADAM_BODY = """
    T p = param;
    T d;
    if (weight_decay != 0.0 && decoupled) {
        p = p * (T)(1.0 - lr * weight_decay);
        d = maximize ? (T)(-grad) : grad;
    } else if (weight_decay != 0.0) {
        T wd = p * (T)weight_decay;
        d = maximize ? (T)(wd - grad) : (T)(wd + grad);
    } else {
        d = maximize ? (T)(-grad) : grad;
    }
    double w = 1.0 - beta1;
    T diff = d - m;
    T mm = (w < 0.5 && w > -0.5) ? (T)(m + diff * (T)w) : (T)(d - diff * (T)(1.0 - w));
    T vv = v * (T)beta2;
    T t = d * (T)(1.0 - beta2);
    t = t * d;
    vv = vv + t;
    m = mm;
    v = vv;
    %s
    T den = sqrt(src) / (T)bias_correction2_sqrt + (T)eps;
    param = p + (mm * (T)(-step_size)) / den;
"""

_ADAM_IN = ("T grad, float64 lr, float64 beta1, float64 beta2, float64 eps, "
            "float64 weight_decay, float64 step_size, float64 bias_correction2_sqrt, "
            "int32 maximize, int32 decoupled")
_ADAM = _declare("elementwise", "distprop_adam", _ADAM_BODY % "T src = vv;", _ADAM_IN,
                 "T param, T m, T v")
_ADAM_AMSGRAD = _declare(
    "elementwise", "distprop_adam_amsgrad",
    _ADAM_BODY % "vmax = (vmax > vv || vmax != vmax) ? vmax : vv;\n    T src = vmax;",
    _ADAM_IN, "T param, T m, T v, T vmax")


def adam(param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq, *, step: float, lr: float,
         beta1: float, beta2: float, eps: float, weight_decay: float, amsgrad: bool,
         maximize: bool, decoupled_weight_decay: bool):
    """Fused :func:`distprop.optim.functional.adam` (Adam, AdamW, amsgrad): returns ``param``
    (updated in place), or None when not applicable."""
    arrays = (param, grad, exp_avg, exp_avg_sq) + ((max_exp_avg_sq,) if amsgrad else ())
    if amsgrad and max_exp_avg_sq is None or not _usable(*arrays):
        return None
    step_size = lr / (1.0 - beta1**step)
    bc2 = (1.0 - beta2**step) ** 0.5
    args = (grad, float(lr), float(beta1), float(beta2), float(eps), float(weight_decay),
            float(step_size), float(bc2), int(maximize), int(decoupled_weight_decay))
    if amsgrad:
        build(_ADAM_AMSGRAD)(*args, param, exp_avg, exp_avg_sq, max_exp_avg_sq)
    else:
        build(_ADAM)(*args, param, exp_avg, exp_avg_sq)
    return param


# --- softmax cross-entropy with class indices -------------------------------------------------

_CE_THREADS = 256
_CE_FORWARD = r"""
extern "C" __global__ void distprop_ce_forward_%(T)s(
        const %(T)s* x, const long long* target, %(T)s* loss, %(T)s* row_max, %(T)s* row_lse,
        const long long rows, const long long classes, const long long ignore_index) {
    __shared__ %(T)s red[%(N)d];
    const long long row = blockIdx.x;
    if (row >= rows) return;
    const %(T)s* xr = x + row * classes;
    %(T)s mx = xr[0];
    for (long long j = threadIdx.x; j < classes; j += blockDim.x) mx = fmax(mx, xr[j]);
    red[threadIdx.x] = mx;
    __syncthreads();
    for (int s = blockDim.x / 2; s > 0; s >>= 1) {
        if (threadIdx.x < s) red[threadIdx.x] = fmax(red[threadIdx.x], red[threadIdx.x + s]);
        __syncthreads();
    }
    mx = red[0];
    __syncthreads();
    %(T)s acc = 0;
    for (long long j = threadIdx.x; j < classes; j += blockDim.x) acc += exp(xr[j] - mx);
    red[threadIdx.x] = acc;
    __syncthreads();
    for (int s = blockDim.x / 2; s > 0; s >>= 1) {
        if (threadIdx.x < s) red[threadIdx.x] += red[threadIdx.x + s];
        __syncthreads();
    }
    if (threadIdx.x == 0) {
        const %(T)s lse = log(red[0]);
        const long long t = target[row];
        row_max[row] = mx;
        row_lse[row] = lse;
        loss[row] = (t == ignore_index) ? (%(T)s)0 : lse - (xr[t] - mx);
    }
}
"""

_CE_BACKWARD = """
    const ptrdiff_t row = i / classes;
    const long long t = target[row];
    if (t == ignore_index) {
        grad = 0;
    } else {
        const T c = coef[per_row ? row : 0];
        const T p = exp(x[i] - row_max[row] - row_lse[row]);
        grad = c * (p - ((i - row * classes) == t ? (T)1 : (T)0));
    }
"""


_CE_FORWARD_KERNEL = _declare("raw", "distprop_ce_forward",
                              _CE_FORWARD % {"T": "%(T)s", "N": _CE_THREADS})
_CE_BACKWARD_KERNEL = _declare(
    "elementwise", "distprop_ce_backward", _CE_BACKWARD,
    "raw T x, raw int64 target, raw T row_max, raw T row_lse, raw T coef, "
    "int64 classes, int64 ignore_index, int32 per_row", "T grad")


def cross_entropy(input, target, weight, ignore_index: int, reduction: str,
                  label_smoothing: float):
    """Fused :func:`distprop.nn.functional.cross_entropy` (:class:`FusedCrossEntropy`): the
    loss tensor, or None when not applicable. Covers CuPy (N, C) float logits with (N,)
    integer class indices, no class weights and no label smoothing."""
    data = input.data
    t = target.data if hasattr(target, "data") else target
    if (not _usable(data) or weight is not None or label_smoothing or data.ndim != 2
            or data.shape[1] == 0 or getattr(t, "ndim", 0) != 1
            or t.dtype.kind not in "iu" or t.shape[0] != data.shape[0]
            or getattr(target, "requires_grad", False)
            or backend.get_array_module(t) is np):
        return None
    return FusedCrossEntropy.apply(input, target, ignore_index=int(ignore_index),
                                   reduction=reduction)


class FusedCrossEntropy(Function):
    """l = log-sum-exp(x) - x[t] per row (one CUDA block per row); dl/dx = softmax(x) - onehot(t).

    Targets equal to ``ignore_index`` contribute 0 and are left out of the mean's count.
    """

    def forward(self, x, target, ignore_index=-100, reduction="mean"):
        from distprop.ops import loss as _loss  # loss imports this module

        cp = backend.cupy_module()
        _loss._check_float("cross_entropy", x)
        _loss._index_target("cross_entropy", x, target, x.shape[1], ignore_index)
        x = cp.ascontiguousarray(x)
        t = cp.ascontiguousarray(target, dtype=cp.int64)
        rows, classes = x.shape
        loss = cp.empty(rows, dtype=x.dtype)
        row_max = cp.empty(rows, dtype=x.dtype)
        row_lse = cp.empty(rows, dtype=x.dtype)
        if rows:
            build(_CE_FORWARD_KERNEL, x.dtype)(
                (rows,), (_CE_THREADS,),
                (x, t, loss, row_max, row_lse, np.int64(rows), np.int64(classes),
                 np.int64(ignore_index)))
        self.saved = (x, t, row_max, row_lse, int(ignore_index))
        self.reduction = reduction
        if reduction == "none":
            return loss
        if reduction == "sum":
            return loss.sum()
        self.count = (t != ignore_index).sum().astype(x.dtype)
        return _loss._divide(loss.sum(), self.count)

    def backward(self, grad_out):
        from distprop.ops import loss as _loss

        x, t, row_max, row_lse, ignore_index = self.saved
        if self.reduction == "mean":
            coef = _loss._divide(grad_out, self.count)
        else:
            coef = grad_out
        coef = coef.reshape(-1).astype(x.dtype, copy=False)
        grad = backend.cupy_module().empty_like(x)
        build(_CE_BACKWARD_KERNEL)(x, t, row_max, row_lse, coef, x.shape[1], ignore_index,
               int(self.reduction == "none"), grad)
        return grad, None


# --- LSTM / GRU gate math, one kernel per time step ------------------------------------------

_LSTM_FORWARD = """
    const ptrdiff_t b = i / hidden, j = i - b * hidden, base = b * 4 * hidden + j;
    const T ai = (T)0.5 * tanh(gates[base]) + (T)0.5;
    const T af = (T)0.5 * tanh(gates[base + hidden]) + (T)0.5;
    const T ag = tanh(gates[base + 2 * hidden]);
    const T ao = (T)0.5 * tanh(gates[base + 3 * hidden]) + (T)0.5;
    gates[base] = ai;
    gates[base + hidden] = af;
    gates[base + 2 * hidden] = ag;
    gates[base + 3 * hidden] = ao;
    const T cv = af * c_prev + ai * ag;
    c = cv;
    tanh_c = tanh(cv);
    h = ao * tanh_c;
"""
_LSTM_FORWARD_KERNEL = _declare(
    "elementwise", "distprop_lstm_forward", _LSTM_FORWARD,
    "T c_prev, int64 hidden", "T c, T tanh_c, T h, raw T gates")


def lstm_forward_step(gates, c_prev, c, tanh_c, h):
    """One LSTM step from pre-activations ``gates`` (B, 4H: i, f, g, o; sigmoid rows pre-scaled
    by 1/2): writes the activations into ``gates`` and ``c``, ``tanh(c)``, ``h``; returns ``h``,
    or None when not applicable."""
    if not _usable(gates, c_prev, c, tanh_c, h) or not gates.flags.c_contiguous:
        return None
    build(_LSTM_FORWARD_KERNEL)(c_prev, c.shape[1], c, tanh_c, h, gates)
    return h


_LSTM_BACKWARD = """
    const ptrdiff_t b = i / hidden, j = i - b * hidden, base = b * 4 * hidden + j;
    const T ai = act[base], af = act[base + hidden];
    const T ag = act[base + 2 * hidden], ao = act[base + 3 * hidden];
    const T d_o = dh * tanh_c;
    T dcv = dc + (((T)1 - tanh_c * tanh_c) * ao) * dh;
    dgates[base] = (dcv * ag) * (((T)1 - ai) * ai);
    dgates[base + hidden] = (dcv * c_prev) * (((T)1 - af) * af);
    dgates[base + 2 * hidden] = (dcv * ai) * (((T)1 - ag) * (ag + (T)1));
    dgates[base + 3 * hidden] = d_o * (((T)1 - ao) * ao);
    dc = dcv * af;
"""
_LSTM_BACKWARD_KERNEL = _declare(
    "elementwise", "distprop_lstm_backward", _LSTM_BACKWARD,
    "T tanh_c, T c_prev, T dh, int64 hidden, raw T act", "T dc, raw T dgates")


def lstm_backward_step(act, tanh_c, c_prev, dh, dc, dgates):
    """One LSTM BPTT step: gate gradients (w.r.t. the unscaled pre-activations) into ``dgates``
    and ``dc`` carried to the previous step; ``dh`` is this step's hidden-state gradient.
    Returns ``dgates``, or None when not applicable."""
    if not _usable(act, tanh_c, c_prev, dh, dc, dgates) or not (
            act.flags.c_contiguous and dgates.flags.c_contiguous):
        return None
    build(_LSTM_BACKWARD_KERNEL)(tanh_c, c_prev, dh, dh.shape[1], act, dc, dgates)
    return dgates


_GRU_FORWARD = """
    const ptrdiff_t b = i / hidden, j = i - b * hidden;
    const ptrdiff_t base = b * 3 * hidden + j;
    const T r = (T)0.5 * tanh(gates[base] + rec[base]) + (T)0.5;
    const T z = (T)0.5 * tanh(gates[base + hidden] + rec[base + hidden]) + (T)0.5;
    const T hn = rec[base + 2 * hidden];
    const T n = tanh(gates[base + 2 * hidden] + r * hn);
    gates[base] = r;
    gates[base + hidden] = z;
    gates[base + 2 * hidden] = n;
    hidden_n = hn;
    h = (h_prev - n) * z + n;
"""
_GRU_FORWARD_KERNEL = _declare(
    "elementwise", "distprop_gru_forward", _GRU_FORWARD,
    "T h_prev, int64 hidden, raw T rec", "T hidden_n, T h, raw T gates")


def gru_forward_step(gates, rec, h_prev, hidden_n, h):
    """One GRU step: ``gates`` (B, 3H: r, z, n) hold the input projections, ``rec`` the
    recurrent ones (bias included; r, z rows pre-scaled by 1/2). Writes activations into
    ``gates``, ``W_hn h + b_hn`` into ``hidden_n`` and the new state into ``h``; returns ``h``,
    or None when not applicable."""
    if not _usable(gates, rec, h_prev, hidden_n, h) or not (
            gates.flags.c_contiguous and rec.flags.c_contiguous):
        return None
    build(_GRU_FORWARD_KERNEL)(h_prev, h.shape[1], rec, hidden_n, h, gates)
    return h


_GRU_BACKWARD = """
    const ptrdiff_t b = i / hidden, j = i - b * hidden;
    const ptrdiff_t base = b * 3 * hidden + j;
    const T r = act[base], z = act[base + hidden], n = act[base + 2 * hidden];
    const T g = dh;
    T dz = g * (h_prev - n);
    T dn = g * ((T)1 - z);
    dn = dn * ((T)1 - n * n);
    const T dr = (dn * hidden_n) * (((T)1 - r) * r);
    dz = dz * (((T)1 - z) * z);
    dx[base] = dr;
    dx[base + hidden] = dz;
    dx[base + 2 * hidden] = dn;
    dhh[base] = dr;
    dhh[base + hidden] = dz;
    dhh[base + 2 * hidden] = dn * r;
    dh = g * z;
"""
_GRU_BACKWARD_KERNEL = _declare(
    "elementwise", "distprop_gru_backward", _GRU_BACKWARD,
    "T h_prev, T hidden_n, int64 hidden, raw T act", "T dh, raw T dx, raw T dhh")


def gru_backward_step(act, h_prev, hidden_n, dh, dx, dhh):
    """One GRU BPTT step: gate gradients for the input side (``dx``) and the recurrent side
    (``dhh``), and ``dh`` replaced by its direct carry ``dh * z`` (the caller adds
    ``dhh @ W_hh``). Returns ``dx``, or None when not applicable."""
    if not _usable(act, h_prev, hidden_n, dh, dx, dhh) or not (
            act.flags.c_contiguous and dx.flags.c_contiguous and dhh.flags.c_contiguous):
        return None
    build(_GRU_BACKWARD_KERNEL)(h_prev, hidden_n, dh.shape[1], act, dh, dx, dhh)
    return dx


# --- convolution: im2col / col2im --------------------------------------------------------------

_IM2COL = """
    // buf is (M, G, KA) when rows, else (G, KA, M); M = N * prod(out), KA = prod(kernel) * CG
    // (+ 1 for the fused bias column, which gets ones).
    ptrdiff_t m, g, k;
    if (rows) {
        k = i %% ka; g = (i / ka) %% groups; m = i / (ka * groups);
    } else {
        m = i %% msize; k = (i / msize) %% ka; g = i / (msize * ka);
    }
    if (k >= kk) {
        buf = (T)1;
    } else {
        const ptrdiff_t c = k %% cg;
        const ptrdiff_t rest = k / cg;
        %(decode)s
        buf = inside ? (T)x[idx] : (T)0;
    }
"""

_IM2COL_2D = """
    const ptrdiff_t kx = rest % kw, ky = rest / kw;
    const ptrdiff_t ox = m % ow, oy = (m / ow) % oh, n = m / (ow * oh);
    const ptrdiff_t iy = oy * sh - ph + ky * dh, ix = ox * sw - pw + kx * dw;
    const bool inside = iy >= 0 && iy < height && ix >= 0 && ix < width;
    const ptrdiff_t idx[4] = {n, g * cg + c, inside ? iy : 0, inside ? ix : 0};
"""

_IM2COL_1D = """
    const ptrdiff_t kx = rest;
    const ptrdiff_t ox = m % ow, n = m / ow;
    const ptrdiff_t ix = ox * sw - pw + kx * dw;
    const bool inside = ix >= 0 && ix < width;
    const ptrdiff_t idx[3] = {n, g * cg + c, inside ? ix : 0};
"""

_CONV_PARAMS = ("int64 groups, int64 cg, int64 kk, int64 ka, int64 msize, int32 rows, "
                "int64 height, int64 width, int64 oh, int64 ow, int64 kh, int64 kw, "
                "int64 sh, int64 sw, int64 ph, int64 pw, int64 dh, int64 dw")
_IM2COL_KERNELS = {
    nd: _declare("elementwise", f"distprop_im2col_{nd}d", _IM2COL % {"decode": decode},
                 "raw T x, " + _CONV_PARAMS, "T buf")
    for nd, decode in ((1, _IM2COL_1D), (2, _IM2COL_2D))}


def _geometry(x_shape, out_sp, kernel, stride, dilation, padding):
    """(height, width, oh, ow, kh, kw, sh, sw, ph, pw, dh, dw) with 1-D as height 1."""
    if len(kernel) == 1:
        return (1, x_shape[2], 1, out_sp[0], 1, kernel[0], 1, stride[0], 0, padding[0][0], 1,
                dilation[0])
    return (x_shape[2], x_shape[3], out_sp[0], out_sp[1], kernel[0], kernel[1], stride[0],
            stride[1], padding[0][0], padding[1][0], dilation[0], dilation[1])


def im2col(x, buf, rows: bool, out_sp, kernel, stride, dilation, padding, groups: int):
    """Fill the column buffer of :class:`distprop.ops.conv.ConvNd` straight from the unpadded
    input ``x`` (any strides): ``buf`` is (M, g, ka) when ``rows`` else (g, ka, M); a column
    ``ka > prod(kernel) * cg`` (the fused bias) is filled with ones. Returns ``buf``, or None
    when not applicable."""
    nd = len(kernel)
    if nd not in (1, 2) or not _usable(x, buf) or not buf.flags.c_contiguous:
        return None
    cg = x.shape[1] // groups
    kk = cg * int(np.prod(kernel))
    ka = buf.shape[2] if rows else buf.shape[1]
    msize = buf.shape[0] if rows else buf.shape[2]
    geo = _geometry(x.shape, out_sp, kernel, stride, dilation, padding)
    build(_IM2COL_KERNELS[nd])(x, groups, cg, kk, ka, msize, int(rows), *geo, buf)
    return buf


_COL2IM = """
    // gx is a C-contiguous (N, C, *spatial) array; gbuf the column-gradient buffer, laid out
    // (M, G, KK) when rows, else (G, KK, M).
    %(decode)s
    const ptrdiff_t g = ch / cg, c = ch - g * cg;
    T acc = 0;
    for (ptrdiff_t ky = 0; ky < kh; ++ky) {
        const ptrdiff_t ty = iy + ph - ky * dh;
        if (ty < 0 || ty %% sh != 0 || ty / sh >= oh) continue;
        const ptrdiff_t oy = ty / sh;
        for (ptrdiff_t kx = 0; kx < kw; ++kx) {
            const ptrdiff_t tx = ix + pw - kx * dw;
            if (tx < 0 || tx %% sw != 0 || tx / sw >= ow) continue;
            const ptrdiff_t ox = tx / sw;
            const ptrdiff_t m = (n * oh + oy) * ow + ox;
            const ptrdiff_t k = (ky * kw + kx) * cg + c;
            acc += rows ? gbuf[(m * groups + g) * kk + k] : gbuf[(g * kk + k) * msize + m];
        }
    }
    gx = acc;
"""

_COL2IM_2D = """
    const ptrdiff_t ix = i % width, iy = (i / width) % height;
    const ptrdiff_t ch = (i / (width * height)) % (cg * groups);
    const ptrdiff_t n = i / (width * height * cg * groups);
"""

_COL2IM_1D = """
    const ptrdiff_t ix = i % width, iy = 0;
    const ptrdiff_t ch = (i / width) % (cg * groups);
    const ptrdiff_t n = i / (width * cg * groups);
"""

_COL2IM_KERNELS = {
    nd: _declare("elementwise", f"distprop_col2im_{nd}d", _COL2IM % {"decode": decode},
                 "raw T gbuf, " + _CONV_PARAMS, "T gx")
    for nd, decode in ((1, _COL2IM_1D), (2, _COL2IM_2D))}


def col2im(gbuf, x_shape, rows: bool, out_sp, kernel, stride, dilation, padding,
           groups: int):
    """Input gradient (N, C, *spatial) from the column-gradient buffer of ConvNd's backward
    (``(M, g, K)`` when ``rows`` else ``(g, K, M)``), one gather per input element (no atomics,
    deterministic); returns None when not applicable."""
    nd = len(kernel)
    if nd not in (1, 2) or not _usable(gbuf) or not gbuf.flags.c_contiguous:
        return None
    cp = backend.cupy_module()
    cg = x_shape[1] // groups
    kk = cg * int(np.prod(kernel))
    msize = gbuf.shape[0] if rows else gbuf.shape[2]
    gx = cp.empty(tuple(x_shape), dtype=gbuf.dtype)
    geo = _geometry(x_shape, out_sp, kernel, stride, dilation, padding)
    build(_COL2IM_KERNELS[nd])(gbuf, groups, cg, kk, kk, msize, int(rows), *geo, gx)
    return gx
