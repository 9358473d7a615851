"""Fused loss functions with PyTorch's semantics and ``reduction='mean'|'sum'|'none'``.

Each loss is one Function: forward computes the per-element loss and reduces it, backward
writes the gradient directly (cross-entropy: softmax minus the smoothed, weighted target) instead
of differentiating a chain of small ops. The user-facing functions with PyTorch's signatures are
at the bottom; ``dp.nn.functional`` re-exports them.
"""

from __future__ import annotations

import numpy as np

from distprop import cuda_kernels
from distprop.backend import get_array_module
from distprop.ops.activation import stable_sigmoid
from distprop.ops.arith import check_same_device
from distprop.ops.loss_class import (  # noqa: F401  (re-exported: cuda_kernels, callers)
    NLL,
    CrossEntropy,
    _check_classes,
    _index_target,
    _rows,
    _sample_shape,
    _unrows,
)
from distprop.ops.loss_common import (  # noqa: F401  (re-exported)
    REDUCTIONS,
    ClassIndexError,
    _as_dtype,
    _check_broadcastable,
    _check_float,
    _check_same_shape,
    _constant,
    _divide,
    _quiet,
    _reduce,
    _row_coef,
    legacy_reduction,
)
from distprop.tensor import Function, Tensor

# --- elementwise regression losses ----------------------------------------------------------

_DOT_BLOCK = 65536  # elements per BLAS dot: its lanes accumulate sequentially, so blocks of
# this size summed in float64 keep the sum as accurate as NumPy's pairwise sum (relative
# error ~1e-8 instead of ~5e-6 for one float32 dot over 4M elements)


def _blocked_dot(a, b) -> float:
    """sum(a * b) of two same-shape float32/64 NumPy arrays, as float64, without a * b."""
    a, b = a.reshape(-1), b.reshape(-1)
    return float(sum(float(np.dot(a[lo:lo + _DOT_BLOCK], b[lo:lo + _DOT_BLOCK]))
                     for lo in range(0, a.size, _DOT_BLOCK)))


def _huber_sum(d, c) -> float:
    """sum over d of m (|d| - m / 2) with m = min(|d|, delta), from c = clip(d, -delta,
    delta) (so m |d| = c d and m^2 = c c) as c.d - c.c / 2: two dots instead of four passes
    (the first term is at least twice the second: no cancellation)."""
    return _blocked_dot(c, d) - 0.5 * _blocked_dot(c, c)



class _DiffLoss(Function):
    """Losses of d = x - y: forward reduces loss(d); grads are dloss(d) * g and its negation."""

    amp_policy = "fp32"  # autocast: see distprop/amp.py

    name = "loss"
    clipped = None  # Huber/SmoothL1 fast path: clip(d), all that backward then needs

    def forward(self, x, y, reduction="mean", **options):
        _check_float(self.name, x)
        _check_same_shape(self.name, x, y)
        self.options, self.reduction, self.count = options, reduction, x.size
        self.target_dtype = y.dtype
        self.diff = d = x - _as_dtype(y, x.dtype)
        if reduction != "none" and type(d) is np.ndarray and d.dtype.itemsize >= 4 and d.size:
            total = self.loss_sum(d, **options)
            if total is not None:
                if self.clipped is not None:
                    self.diff = None  # backward needs only clip(d)
                return np.asarray(total / d.size if reduction == "mean" else total, d.dtype)
        return _reduce(self.loss(d, **options), reduction)

    def backward(self, grad_out):
        g = grad_out / self.count if self.reduction == "mean" else grad_out
        grad = self.scaled_dloss(self.diff, g, **self.options)
        grad_target = None
        if self.needs_input_grad[1]:
            grad_target = _as_dtype(-grad, self.target_dtype)
        return (grad if self.needs_input_grad[0] else None), grad_target

    def loss(self, d, **options):  # pragma: no cover - abstract
        raise NotImplementedError

    def loss_sum(self, d, **options):
        """sum(loss(d)) as a float for a float32/64 NumPy ``d`` without the per-element loss
        array (dot products instead of passes), or None to use ``loss``."""
        return None

    def scaled_dloss(self, d, g, **options):
        """dloss(d) * g (``g``: the 0-d scale of a reduction, or per element)."""
        return self.dloss(d, **options) * g

    def dloss(self, d, **options):  # pragma: no cover - abstract
        raise NotImplementedError


class MSE(_DiffLoss):
    """l = (x - y)^2; dl/dx = 2 (x - y)."""

    name = "mse_loss"

    def loss(self, d):
        return d * d

    def dloss(self, d):
        return 2.0 * d

    def loss_sum(self, d):
        return _blocked_dot(d, d)

    def scaled_dloss(self, d, g):
        return d * (2.0 * g) if g.ndim == 0 else self.dloss(d) * g  # (2 g exact: same bits)


class L1(_DiffLoss):
    """l = |x - y|; dl/dx = sign(x - y)."""

    name = "l1_loss"

    def loss(self, d):
        return abs(d)

    def dloss(self, d):
        return get_array_module(d).sign(d)


class Huber(_DiffLoss):
    """l = d^2 / 2 if |d| < delta else delta (|d| - delta / 2); dl/dx = clip(d, -delta, delta)."""

    name = "huber_loss"

    def loss(self, d, delta=1.0):
        # m (|d| - m / 2) with m = min(|d|, delta) is both branches in three passes, no where
        a = abs(d)
        m = get_array_module(d).minimum(a, delta)
        a -= 0.5 * m
        a *= m
        return a

    def dloss(self, d, delta=1.0):
        return get_array_module(d).clip(d, -delta, delta)

    def loss_sum(self, d, delta=1.0):
        self.clipped = np.clip(d, -delta, delta)
        return _huber_sum(d, self.clipped)

    def scaled_dloss(self, d, g, delta=1.0):
        if self.clipped is not None:
            return self.clipped * g
        return self.dloss(d, delta) * g


class SmoothL1(_DiffLoss):
    """l = d^2 / (2 beta) if |d| < beta else |d| - beta / 2; dl/dx = clip(d / beta, -1, 1)."""

    name = "smooth_l1_loss"

    def loss(self, d, beta=1.0):
        a = abs(d)
        if beta == 0.0:
            return a
        m = get_array_module(d).minimum(a, beta)  # Huber's m (|d| - m / 2), over beta
        a -= 0.5 * m
        a *= m
        a *= 1.0 / beta
        return a

    def dloss(self, d, beta=1.0):
        xp = get_array_module(d)
        if beta == 0.0:
            return xp.sign(d)
        return xp.clip(d * (1.0 / beta), -1.0, 1.0)

    def loss_sum(self, d, beta=1.0):
        if beta == 0.0:
            return None
        self.clipped = np.clip(d, -beta, beta)
        return _huber_sum(d, self.clipped) / beta

    def scaled_dloss(self, d, g, beta=1.0):
        if self.clipped is not None:  # clip(d / beta, -1, 1) = clip(d, -beta, beta) / beta
            return self.clipped * (g / beta) if g.ndim == 0 else self.clipped * (1.0 / beta) * g
        return self.dloss(d, beta) * g


# --- binary classification losses -----------------------------------------------------------


class BCE(Function):
    """l = -w (y log x + (1 - y) log(1 - x)), logs >= -100; dl/dx = w (x - y) / (x (1 - x))."""

    amp_policy = "fp32"  # autocast: see distprop/amp.py

    def forward(self, x, y, weight=None, reduction="mean"):
        name = "binary_cross_entropy"
        _check_float(name, x)
        _check_same_shape(name, x, y)
        xp = get_array_module(x)
        if not bool(((x >= 0) & (x <= 1)).all()):
            raise ValueError(f"{name}: all elements of input should be between 0 and 1")
        self.target_dtype = y.dtype
        y = _as_dtype(y, x.dtype)
        if not bool(((y >= 0) & (y <= 1)).all()):
            raise ValueError(f"{name}: all elements of target should be between 0 and 1")
        if weight is not None:
            _check_broadcastable(name, "weight", weight, x.shape)
            weight = _constant(weight, x)
        with _quiet(xp):  # log(0) = -inf, clamped to -100 as in PyTorch
            log_x = xp.maximum(xp.log(x), -100.0)
            log_1mx = xp.maximum(xp.log1p(-x), -100.0)
        loss = (y - 1.0) * log_1mx - y * log_x
        if weight is not None:
            loss = loss * weight
        self.x, self.y, self.weight = x, y, weight
        self.reduction, self.count = reduction, x.size
        if self.needs_input_grad[1]:
            self.log_ratio = log_1mx - log_x
        return _reduce(loss, reduction)

    def backward(self, grad_out):
        xp = get_array_module(grad_out)
        g = grad_out / self.count if self.reduction == "mean" else grad_out
        if self.weight is not None:
            g = g * self.weight
        x = self.x
        grad = None
        if self.needs_input_grad[0]:
            grad = g * (x - self.y) / xp.maximum((1.0 - x) * x, 1e-12)
            if grad.shape != x.shape:
                grad = xp.broadcast_to(grad, x.shape)
        grad_target = None
        if self.needs_input_grad[1]:
            grad_target = _as_dtype(xp.broadcast_to(g * self.log_ratio, x.shape),
                                    self.target_dtype)
        return grad, grad_target


def _bce_logits_sum(x, y) -> float:
    """sum of (1 - y) x + softplus(-x) = max(x, 0) - x y + log1p(exp(-|x|)) for float32/64
    NumPy arrays: max(x, 0) summed as (sum x + sum |x|) / 2 and x y as a dot, so the only
    passes that write are |x|, exp and log1p."""
    a = np.abs(x)
    positive_part = 0.5 * (float(x.sum()) + float(a.sum()))
    np.negative(a, out=a)
    np.exp(a, out=a)
    np.log1p(a, out=a)
    return float(a.sum()) + positive_part - _blocked_dot(x, y)


class BCEWithLogits(Function):
    """l = w ((1 - y) x + (1 + (pw - 1) y) softplus(-x)); dl/dx = w ((1 + (pw-1) y) s - pw y)."""

    amp_policy = "fp32"  # autocast: see distprop/amp.py

    def forward(self, x, y, weight=None, pos_weight=None, reduction="mean"):
        name = "binary_cross_entropy_with_logits"
        _check_float(name, x)
        _check_same_shape(name, x, y)
        xp = get_array_module(x)
        self.target_dtype = y.dtype
        y = _as_dtype(y, x.dtype)
        for what, w in (("weight", weight), ("pos_weight", pos_weight)):
            if w is not None:
                _check_broadcastable(name, what, w, x.shape)
        weight, pos_weight = _constant(weight, x), _constant(pos_weight, x)
        self.x, self.y, self.weight, self.pos_weight = x, y, weight, pos_weight
        self.reduction, self.count, self.log_weight = reduction, x.size, None
        if (reduction != "none" and weight is None and pos_weight is None and x.size
                and type(x) is np.ndarray and x.dtype.itemsize >= 4):
            total = _bce_logits_sum(x, y)
            return np.asarray(total / x.size if reduction == "mean" else total, x.dtype)
        softplus_neg = xp.log1p(xp.exp(-abs(x))) + xp.maximum(-x, 0.0)  # -log(sigmoid(x))
        log_weight = None if pos_weight is None else 1.0 + (pos_weight - 1.0) * y
        loss = (1.0 - y) * x
        loss += softplus_neg if log_weight is None else log_weight * softplus_neg
        if weight is not None:
            loss *= weight
        self.x, self.y, self.weight, self.pos_weight = x, y, weight, pos_weight
        self.log_weight = log_weight
        self.reduction, self.count = reduction, x.size
        if self.needs_input_grad[1] and pos_weight is not None:
            self.softplus_neg = softplus_neg
        return _reduce(loss, reduction)

    def backward(self, grad_out):
        xp = get_array_module(grad_out)
        g = grad_out / self.count if self.reduction == "mean" else grad_out
        if self.weight is not None:
            g = g * self.weight
        x, y = self.x, self.y
        grad = None
        if self.needs_input_grad[0]:
            s = stable_sigmoid(x)
            if self.pos_weight is None and self.weight is None and s.shape == x.shape:
                s -= y  # in place: no more arrays
                s *= g
                grad = s
            elif self.pos_weight is None:
                grad = g * (s - y)
            else:
                grad = g * (self.log_weight * s - self.pos_weight * y)
            grad = xp.broadcast_to(grad, x.shape) if grad.shape != x.shape else grad
        grad_target = None
        if self.needs_input_grad[1]:
            dy = -x if self.pos_weight is None else (self.pos_weight - 1.0) * self.softplus_neg - x
            grad_target = _as_dtype(xp.broadcast_to(g * dy, x.shape), self.target_dtype)
        return grad, grad_target


# --- user-facing functions with PyTorch's signatures (dp.nn.functional.*) -------------------


def _target(name: str, input, target):
    if not isinstance(input, Tensor):
        raise TypeError(f"{name}(): expected the input to be a Tensor, got {type(input).__name__}")
    target = target if isinstance(target, Tensor) else Tensor(target)
    check_same_device(name, input.data, target.data)
    return target


def _array(value):
    """Optional weights as raw arrays (they are constants, not differentiated)."""
    if value is None or not isinstance(value, Tensor):
        return None if value is None else Tensor(value).data
    return value.data


def mse_loss(input: Tensor, target, size_average=None, reduce=None,
             reduction: str = "mean") -> Tensor:
    """Mean squared error: reduce((input - target)^2)."""
    reduction = legacy_reduction(size_average, reduce, reduction)
    return MSE.apply(input, _target("mse_loss", input, target), reduction=reduction)


def l1_loss(input: Tensor, target, size_average=None, reduce=None,
            reduction: str = "mean") -> Tensor:
    """Mean absolute error: reduce(|input - target|)."""
    reduction = legacy_reduction(size_average, reduce, reduction)
    return L1.apply(input, _target("l1_loss", input, target), reduction=reduction)


def huber_loss(input: Tensor, target, reduction: str = "mean", delta: float = 1.0) -> Tensor:
    """Quadratic for |input - target| < delta, linear (slope delta) beyond."""
    reduction = legacy_reduction(None, None, reduction)
    if not delta > 0:
        raise ValueError(f"huber_loss: delta must be positive, got {delta}")
    return Huber.apply(input, _target("huber_loss", input, target), reduction=reduction,
                       delta=float(delta))


def smooth_l1_loss(input: Tensor, target, size_average=None, reduce=None,
                   reduction: str = "mean", beta: float = 1.0) -> Tensor:
    """Quadratic (divided by beta) for |input - target| < beta, |d| - beta/2 beyond."""
    reduction = legacy_reduction(size_average, reduce, reduction)
    if beta < 0:
        raise ValueError(f"smooth_l1_loss: beta must be non-negative, got {beta}")
    return SmoothL1.apply(input, _target("smooth_l1_loss", input, target), reduction=reduction,
                          beta=float(beta))


def cross_entropy(input: Tensor, target, weight=None, size_average=None, ignore_index: int = -100,
                  reduce=None, reduction: str = "mean", label_smoothing: float = 0.0) -> Tensor:
    """Softmax cross-entropy of logits ``input`` (N, C, ...) against class indices or probabilities.

    ``target`` holds class indices (integers, the input's shape without dim 1) or class
    probabilities (floats, the input's shape). ``weight`` rescales classes; with indices and
    ``reduction='mean'`` the sum is divided by the summed weights of the non-ignored targets.
    """
    reduction = legacy_reduction(size_average, reduce, reduction)
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"cross_entropy: label_smoothing must be in [0, 1], got {label_smoothing}")
    target = _target("cross_entropy", input, target)
    fused = cuda_kernels.cross_entropy(input, target, weight, ignore_index, reduction,
                                       label_smoothing)
    if fused is not None:
        return fused
    return CrossEntropy.apply(
        input, target, weight=_array(weight),
        ignore_index=int(ignore_index), reduction=reduction, label_smoothing=float(label_smoothing),
    )


def nll_loss(input: Tensor, target, weight=None, size_average=None, ignore_index: int = -100,
             reduce=None, reduction: str = "mean") -> Tensor:
    """Negative log-likelihood of log-probabilities ``input`` (N, C, ...) at class indices."""
    reduction = legacy_reduction(size_average, reduce, reduction)
    return NLL.apply(input, _target("nll_loss", input, target), weight=_array(weight),
                     ignore_index=int(ignore_index), reduction=reduction)


def binary_cross_entropy(input: Tensor, target, weight=None, size_average=None, reduce=None,
                         reduction: str = "mean") -> Tensor:
    """-w (y log x + (1 - y) log(1 - x)) for probabilities ``input`` in [0, 1]."""
    reduction = legacy_reduction(size_average, reduce, reduction)
    return BCE.apply(input, _target("binary_cross_entropy", input, target),
                     weight=_array(weight), reduction=reduction)


def binary_cross_entropy_with_logits(input: Tensor, target, weight=None, size_average=None,
                                     reduce=None, reduction: str = "mean",
                                     pos_weight=None) -> Tensor:
    """Binary cross-entropy of ``sigmoid(input)``, computed stably from the logits."""
    reduction = legacy_reduction(size_average, reduce, reduction)
    return BCEWithLogits.apply(
        input, _target("binary_cross_entropy_with_logits", input, target),
        weight=_array(weight), pos_weight=_array(pos_weight), reduction=reduction,
    )
