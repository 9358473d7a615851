"""Activations, softmax/log-softmax and dropout, with forward and backward side by side.

The user-facing functions at the bottom (``relu``, ``softmax``, ...) are what ``dp.relu``,
``Tensor.softmax`` and ``dp.nn.functional`` call.
"""

from __future__ import annotations

import math
import warnings

import numpy as np

from distprop import backend
from distprop.backend import get_array_module
from distprop.ops._util import normalize_dims, same_layout
from distprop.tensor import Function, Tensor

_SQRT_HALF = math.sqrt(0.5)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)
_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)
_GELU_CUBIC = 0.044715
_LOG_INV_SQRT_2PI = math.log(_INV_SQRT_2PI)
_SIGN_BIT = np.int32(-(2**31))


def stable_sigmoid(x):
    """1 / (1 + exp(-x)) in x's dtype, without overflow trouble.

    float32/64: exp overflowing to inf for very negative x gives the right limit 0, so the
    warning is silenced (three in-place passes, no ``where``). Half precision would overflow
    already at x < -11 where the sigmoid is still representable: exp(-|x|) there.
    """
    xp = get_array_module(x)
    if x.dtype.itemsize < 4:
        e = xp.exp(-abs(x))
        inv = 1.0 / (1.0 + e)
        return xp.where(x >= 0, inv, e * inv)
    with np.errstate(over="ignore"):
        out = xp.asarray(xp.exp(-x))  # a 0-d input gives a scalar: no ``out=`` for it
    out += 1
    return xp.reciprocal(out, out=out)


class ReLU(Function):
    """out = max(x, 0); grad: g * (out > 0)."""

    def forward(self, x):
        self.out = get_array_module(x).maximum(x, 0)
        return self.out

    def backward(self, grad_out):
        return same_layout(grad_out, self.out) * (self.out > 0)


class LeakyReLU(Function):
    """out = x if x > 0 else slope * x; grad: g or slope * g (as one float factor, no where)."""

    def forward(self, x, negative_slope=0.01):
        xp = get_array_module(x)
        self.positive, self.slope = x > 0, float(negative_slope)
        if 0.0 <= self.slope <= 1.0:  # max(x, slope * x) is the same function, and faster
            out = x * self.slope  # in place: a second fresh array costs as much as a pass
            return xp.maximum(out, x, out=out)
        return xp.where(self.positive, x, x * self.slope)

    def backward(self, grad_out):
        grad = same_layout(grad_out, self.positive)
        factor = self.positive.astype(grad.dtype)
        factor *= 1.0 - self.slope
        factor += self.slope
        factor *= grad
        return factor


class ELU(Function):
    """out = x if x > 0 else alpha * (exp(x) - 1); grad: g or g * alpha * exp(x)."""

    def forward(self, x, alpha=1.0):
        xp = get_array_module(x)
        self.alpha = float(alpha)
        self.positive = x > 0
        self.negative_part = xp.minimum(x, 0)
        return xp.where(self.positive, x, self.alpha * xp.expm1(self.negative_part))

    def backward(self, grad_out):
        xp = get_array_module(grad_out)
        slope = self.alpha * xp.exp(self.negative_part)
        return xp.where(self.positive, grad_out, grad_out * slope)


# Abramowitz & Stegun 7.1.26 (the form PyTorch's vectorised float32 erf uses): for z >= 0,
# erfc(z) = t * (a1 + t * (a2 + ... + t * a5)) * exp(-z^2), t = 1 / (1 + p z), |error| <= 1.5e-7.
_AS_P = 0.3275911
_AS_A = (0.254829592, -0.284496736, 1.421413741, -1.453152027, 1.061405429)


def _gelu_f32(x, block=65536):
    """(gelu(x), gelu'(x)) for a float32 NumPy array: in-place passes over cache-sized blocks.

    Phi(x) = 0.5 + copysign(0.5 - h, x) with h = erfc(|x| / sqrt 2) / 2 from A&S 7.1.26
    (absolute error <= 1e-7 plus float32 rounding; 3-4x faster than scipy's float32 erf);
    phi(x) = exp(log(1 / sqrt(2 pi)) - x^2 / 2) and gelu' = Phi + x * phi come from the same
    block while it is in cache, so the backward is one multiply.
    """
    flat = x.reshape(-1)  # a copy only for a non-contiguous x
    out, deriv = np.empty_like(flat), np.empty_like(flat)
    t_buf, h_buf = np.empty((2, min(block, flat.size)), np.float32)
    scale = 0.5 / _INV_SQRT_2PI  # h = t * poly(t) * exp(-x^2 / 2) / 2, from phi
    for lo in range(0, flat.size, block):
        xs, o, g = flat[lo:lo + block], out[lo:lo + block], deriv[lo:lo + block]
        t, h = t_buf[:xs.size], h_buf[:xs.size]
        np.abs(xs, out=g)
        np.multiply(g, _AS_P * _SQRT_HALF, out=t)
        t += 1.0
        np.reciprocal(t, out=t)
        np.multiply(t, scale * _AS_A[4], out=h)
        for coef in _AS_A[3::-1]:
            h += scale * coef
            h *= t
        np.square(g, out=g)
        g *= -0.5
        g += _LOG_INV_SQRT_2PI
        np.exp(g, out=g)  # phi(x)
        h *= g
        np.subtract(0.5, h, out=h)
        np.maximum(h, 0.0, out=h)  # (rounding near x = 0); then copysign = h | signbit(x),
        np.bitwise_and(xs.view(np.int32), _SIGN_BIT, out=t.view(np.int32))  # 3x np.copysign
        np.bitwise_or(h.view(np.int32), t.view(np.int32), out=h.view(np.int32))
        h += 0.5  # Phi(x)
        np.multiply(xs, h, out=o)
        g *= xs
        g += h
    return out.reshape(x.shape), deriv.reshape(x.shape)


class GELU(Function):
    """out = x * Phi(x) (exact, via erf) or its tanh approximation; grad: Phi + x * phi."""

    def forward(self, x, approximate="none"):
        xp = get_array_module(x)
        self.x, self.approximate = x, approximate
        if approximate == "tanh":
            self.t = xp.tanh(_SQRT_2_OVER_PI * (x + _GELU_CUBIC * x * x * x))
            return 0.5 * x * (1.0 + self.t)
        if xp is np and x.dtype == np.float32:
            with np.errstate(over="ignore", under="ignore"):  # exp(-x^2 / 2) -> 0 is right
                out, self.deriv = _gelu_f32(x)
            self.x = None
            return out
        cdf = backend.erf(x * _SQRT_HALF).astype(x.dtype, copy=False)  # scipy: f16 -> f64
        cdf += 1.0
        cdf *= 0.5
        self.cdf, self.deriv = cdf, None
        return x * cdf

    def backward(self, grad_out):
        xp = get_array_module(grad_out)
        if self.approximate != "tanh" and self.deriv is not None:
            return same_layout(grad_out, self.deriv) * self.deriv
        x = self.x
        grad_out = same_layout(grad_out, x)
        if self.approximate == "tanh":
            t = self.t
            inner = _SQRT_2_OVER_PI * (1.0 + 3.0 * _GELU_CUBIC * x * x)
            return grad_out * (0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * inner)
        factor = x * x  # (Phi + x * phi) * g, in place
        factor *= -0.5
        xp.exp(factor, out=factor)
        factor *= _INV_SQRT_2PI
        factor *= x
        factor += self.cdf
        factor *= grad_out
        return factor


class SiLU(Function):
    """out = x * sigmoid(x); grad: g * s * (1 + x * (1 - s)) = g * (s + out * (1 - s)).

    The backward reads the output (kept, as ReLU and Sigmoid keep theirs) instead of x: four
    passes instead of five, and x itself is not held."""

    def forward(self, x):
        self.s = stable_sigmoid(x)
        self.out = x * self.s
        return self.out

    def backward(self, grad_out):
        s = self.s
        factor = 1.0 - s
        factor *= self.out
        factor += s
        factor *= same_layout(grad_out, s)
        return factor


class Sigmoid(Function):
    """out = 1 / (1 + exp(-x)); grad: g * out * (1 - out)."""

    def forward(self, x):
        self.out = stable_sigmoid(x)
        return self.out

    def backward(self, grad_out):
        factor = 1.0 - self.out
        factor *= self.out
        factor *= same_layout(grad_out, self.out)
        return factor


class Tanh(Function):
    """out = tanh(x); grad: g * (1 - out^2)."""

    def forward(self, x):
        self.out = get_array_module(x).tanh(x)
        return self.out

    def backward(self, grad_out):
        factor = self.out * self.out
        xp = get_array_module(factor)
        xp.subtract(1.0, factor, out=factor)
        factor *= same_layout(grad_out, self.out)
        return factor


class Softmax(Function):
    """out = exp(x - max) / sum(exp(x - max)); grad: out * (g - sum(g * out))."""

    amp_policy = "fp32"  # autocast: see distprop/amp.py

    def forward(self, x, dim):
        xp = get_array_module(x)
        (self.dim,) = normalize_dims(dim, x.ndim)
        if x.ndim == 0:
            self.out = xp.ones_like(x)
            return self.out
        e = xp.exp(x - x.max(axis=self.dim, keepdims=True))
        e /= e.sum(axis=self.dim, keepdims=True)
        self.out = e
        return e

    def backward(self, grad_out):
        out = self.out
        if out.ndim == 0:
            return grad_out * 0
        grad = grad_out * out
        grad -= out * grad.sum(axis=self.dim, keepdims=True)
        return grad


class LogSoftmax(Function):
    """out = x - max - log(sum(exp(x - max))); grad: g - exp(out) * sum(g)."""

    amp_policy = "fp32"  # autocast: see distprop/amp.py

    def forward(self, x, dim):
        xp = get_array_module(x)
        (self.dim,) = normalize_dims(dim, x.ndim)
        if x.ndim == 0:
            self.out = xp.zeros_like(x)
            return self.out
        shifted = x - x.max(axis=self.dim, keepdims=True)
        shifted -= xp.log(xp.exp(shifted).sum(axis=self.dim, keepdims=True))
        self.out = shifted
        return shifted

    def backward(self, grad_out):
        xp = get_array_module(grad_out)
        if self.out.ndim == 0:
            return grad_out * 0
        return grad_out - xp.exp(self.out) * grad_out.sum(axis=self.dim, keepdims=True)


class Dropout(Function):
    """out = x * mask / (1 - p) with mask ~ Bernoulli(1 - p); grad: g * mask / (1 - p)."""

    def forward(self, x, p=0.5):
        xp = get_array_module(x)
        if p >= 1.0:
            self.mask = xp.zeros_like(x)
        else:
            keep = 1.0 - float(p)
            self.mask = backend.bernoulli_mask(x.shape, keep, x.dtype, backend.device_of(x))
            self.mask *= 1.0 / keep
        return x * self.mask

    def backward(self, grad_out):
        return grad_out * self.mask


# --- user-facing functions (dp.relu, Tensor.softmax, dp.nn.functional.*) ---------------------


def _float_input(name: str, x) -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"{name}(): expected a Tensor, got {type(x).__name__}")
    if x.dtype.kind != "f":
        raise TypeError(
            f"{name}(): expected a floating-point tensor, got dtype {x.dtype} (use x.float())"
        )


def relu(input: Tensor, inplace: bool = False) -> Tensor:
    """max(input, 0), elementwise (``inplace`` is accepted for PyTorch compatibility)."""
    return ReLU.apply(input)


def leaky_relu(input: Tensor, negative_slope: float = 0.01, inplace: bool = False) -> Tensor:
    """input where positive, else ``negative_slope * input``."""
    return LeakyReLU.apply(input, negative_slope=negative_slope)


def elu(input: Tensor, alpha: float = 1.0, inplace: bool = False) -> Tensor:
    """input where positive, else ``alpha * (exp(input) - 1)``."""
    _float_input("elu", input)
    return ELU.apply(input, alpha=alpha)


def gelu(input: Tensor, approximate: str = "none") -> Tensor:
    """x * Phi(x): exact (``approximate='none'``) or the tanh approximation (``'tanh'``)."""
    if approximate not in ("none", "tanh"):
        raise ValueError(f"gelu(): approximate must be 'none' or 'tanh', got {approximate!r}")
    _float_input("gelu", input)
    return GELU.apply(input, approximate=approximate)


def silu(input: Tensor, inplace: bool = False) -> Tensor:
    """x * sigmoid(x) (also called swish)."""
    _float_input("silu", input)
    return SiLU.apply(input)


def sigmoid(input: Tensor) -> Tensor:
    """1 / (1 + exp(-input)), computed without overflow."""
    _float_input("sigmoid", input)
    return Sigmoid.apply(input)


def tanh(input: Tensor) -> Tensor:
    """Hyperbolic tangent, elementwise."""
    _float_input("tanh", input)
    return Tanh.apply(input)


def _softmax_dim(name: str, ndim: int, dim):
    if dim is not None:
        return dim
    warnings.warn(
        f"Implicit dimension choice for {name} has been deprecated. Change the call to include "
        "dim=X as an argument.",
        stacklevel=4,
    )
    return 0 if ndim in (0, 1, 3) else 1


def softmax(input: Tensor, dim: int | None = None, _stacklevel: int = 3, dtype=None) -> Tensor:
    """exp(x) / sum(exp(x)) along ``dim``, stabilised by subtracting the max.

    Like PyTorch, ``dim=None`` picks dim 0 for 0-, 1- and 3-d inputs and dim 1 otherwise, with a
    deprecation warning.
    """
    if dtype is not None:
        input = input.to(dtype=dtype)
    _float_input("softmax", input)
    return Softmax.apply(input, dim=_softmax_dim("softmax", input.ndim, dim))


def log_softmax(input: Tensor, dim: int | None = None, _stacklevel: int = 3, dtype=None) -> Tensor:
    """log(softmax(input, dim)), computed stably as x - logsumexp(x)."""
    if dtype is not None:
        input = input.to(dtype=dtype)
    _float_input("log_softmax", input)
    return LogSoftmax.apply(input, dim=_softmax_dim("log_softmax", input.ndim, dim))


def check_dropout_p(p: float) -> float:
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"dropout probability has to be between 0 and 1, but got {p}")
    return float(p)


def dropout(input: Tensor, p: float = 0.5, training: bool = True, inplace: bool = False) -> Tensor:
    """Zero each element with probability ``p`` and scale the rest by 1 / (1 - p).

    Returns ``input`` itself when not training or when ``p == 0``.
    """
    p = check_dropout_p(p)
    if not training or p == 0.0:
        return input
    _float_input("dropout", input)
    return Dropout.apply(input, p=p)
