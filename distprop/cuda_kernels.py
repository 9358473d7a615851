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

Every kernel is declared once in :data:`KERNELS` (its CUDA source is in
:mod:`distprop.cuda_sources`) and made only by :func:`build`; the offline
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
from distprop import cuda_sources as src
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

_SGD = _declare("elementwise", "distprop_sgd", src.SGD, src.SGD_IN, "T param")
_SGD_MOMENTUM = _declare("elementwise", "distprop_sgd_momentum", src.SGD_MOMENTUM, src.SGD_IN,
                         "T param, T buf")


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


_ADAM = _declare("elementwise", "distprop_adam", src.ADAM, src.ADAM_IN, "T param, T m, T v")
_ADAM_AMSGRAD = _declare("elementwise", "distprop_adam_amsgrad", src.ADAM_AMSGRAD, src.ADAM_IN,
                         "T param, T m, T v, T vmax")


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
_CE_FORWARD_KERNEL = _declare("raw", "distprop_ce_forward",
                              src.CE_FORWARD % {"T": "%(T)s", "N": _CE_THREADS})
_CE_BACKWARD_KERNEL = _declare(
    "elementwise", "distprop_ce_backward", src.CE_BACKWARD,
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

_LSTM_FORWARD_KERNEL = _declare(
    "elementwise", "distprop_lstm_forward", src.LSTM_FORWARD,
    "T c_prev, int64 hidden", "T c, T tanh_c, T h, raw T gates")


def lstm_forward_step(gates, c_prev, c, tanh_c, h):
    """One LSTM step from pre-activations ``gates`` (B, 4H: i, f, g, o; sigmoid rows pre-scaled
    by 1/2): writes the activations into ``gates`` and ``c``, ``tanh(c)``, ``h``; returns ``h``,
    or None when not applicable."""
    if not _usable(gates, c_prev, c, tanh_c, h) or not gates.flags.c_contiguous:
        return None
    build(_LSTM_FORWARD_KERNEL)(c_prev, c.shape[1], c, tanh_c, h, gates)
    return h


_LSTM_BACKWARD_KERNEL = _declare(
    "elementwise", "distprop_lstm_backward", src.LSTM_BACKWARD,
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


_GRU_FORWARD_KERNEL = _declare(
    "elementwise", "distprop_gru_forward", src.GRU_FORWARD,
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


_GRU_BACKWARD_KERNEL = _declare(
    "elementwise", "distprop_gru_backward", src.GRU_BACKWARD,
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

_IM2COL_KERNELS = {
    nd: _declare("elementwise", f"distprop_im2col_{nd}d", src.IM2COL % {"decode": decode},
                 "raw T x, " + src.CONV_PARAMS, "T buf")
    for nd, decode in ((1, src.IM2COL_1D), (2, src.IM2COL_2D))}


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


_COL2IM_KERNELS = {
    nd: _declare("elementwise", f"distprop_col2im_{nd}d", src.COL2IM % {"decode": decode},
                 "raw T gbuf, " + src.CONV_PARAMS, "T gx")
    for nd, decode in ((1, src.COL2IM_1D), (2, src.COL2IM_2D))}


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
