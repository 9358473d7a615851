"""Multi-class losses over a class dimension: cross-entropy and NLL (one Function each).

Re-exported by :mod:`distprop.ops.loss`, whose user-facing ``cross_entropy``/``nll_loss`` apply
them.
"""

from __future__ import annotations

from distprop.backend import get_array_module
from distprop.ops.loss_common import (
    ClassIndexError,
    _as_dtype,
    _check_float,
    _constant,
    _divide,
    _row_coef,
)
from distprop.tensor import Function


def _rows(a):
    """An (N, C, d1, ...) or (C,) array as (M, C) rows, one per sample position."""
    if a.ndim == 1:
        return a.reshape(1, -1)
    if a.ndim == 2:
        return a
    return get_array_module(a).moveaxis(a, 1, -1).reshape(-1, a.shape[1])


def _unrows(rows, shape):
    """Inverse of :func:`_rows`."""
    if len(shape) <= 2:
        return rows.reshape(shape)
    moved = rows.reshape((shape[0],) + tuple(shape[2:]) + (shape[1],))
    return get_array_module(rows).moveaxis(moved, -1, 1)


def _sample_shape(shape) -> tuple[int, ...]:
    return () if len(shape) == 1 else (shape[0],) + tuple(shape[2:])


def _check_classes(name: str, x, weight):
    """Check the input has a class dim; return (C, weight as an x.dtype array or None)."""
    if x.ndim == 0:
        raise ValueError(f"{name}: input must have a class dimension, got a 0-d input")
    classes = x.shape[0] if x.ndim == 1 else x.shape[1]
    if weight is not None:
        if tuple(weight.shape) != (classes,):
            raise ValueError(
                f"{name}: weight must have shape ({classes},), one entry per class, got "
                f"{tuple(weight.shape)}"
            )
        weight = _constant(weight, x)
    return classes, weight


def _index_target(name: str, x, target, classes: int, ignore_index: int,
                  none_if_all_kept: bool = False):
    """Validate class indices; return (safe indices (M,), kept mask (M,)). With
    ``none_if_all_kept`` the mask is None when every index is a class and none can be
    ``ignore_index`` (two reductions instead of five passes and a ``where``)."""
    if target.dtype.kind not in "iu":
        raise TypeError(
            f"{name}: class-index targets must have an integer dtype, got {target.dtype} "
            f"(class probabilities need the input's shape {tuple(x.shape)})"
        )
    expected = _sample_shape(x.shape)
    if tuple(target.shape) != expected:
        raise ValueError(
            f"{name}: input of shape {tuple(x.shape)} needs a class-index target of shape "
            f"{expected}, got target shape {tuple(target.shape)}"
        )
    xp = get_array_module(target)
    t = target.reshape(-1)
    if (none_if_all_kept and t.size and not 0 <= ignore_index < classes
            and int(t.min()) >= 0 and int(t.max()) < classes):
        return t, None
    keep = t != ignore_index
    valid = ((t >= 0) & (t < classes)) | ~keep
    if not bool(valid.all()):
        bad = int(t[~valid][0])
        raise ClassIndexError(
            f"{name}: target class index {bad} is out of range for {classes} classes "
            f"(expected 0..{classes - 1}, or ignore_index={ignore_index})"
        )
    return xp.where(keep, t, 0), keep


class CrossEntropy(Function):
    """l = -sum_c q_c log softmax(x)_c (q: weighted smoothed target); dl/dx = softmax sum(q) - q."""

    amp_policy = "fp32"  # autocast: see distprop/amp.py

    def forward(self, x, target, weight=None, ignore_index=-100, reduction="mean",
                label_smoothing=0.0):
        name = "cross_entropy"
        _check_float(name, x)
        xp = get_array_module(x)
        classes, w = _check_classes(name, x, weight)
        eps = float(label_smoothing)
        rows = _rows(x)
        m = rows.shape[0]
        shifted = rows - rows.max(axis=1, keepdims=True)
        self.probs = tuple(target.shape) == tuple(x.shape)
        if self.probs:
            if target.dtype.kind != "f":
                raise TypeError(
                    f"{name}: a target with the input's shape {tuple(x.shape)} holds class "
                    f"probabilities and must be floating-point, got dtype {target.dtype}"
                )
            self.target_dtype = target.dtype
            q = _rows(_as_dtype(target, x.dtype))
            if eps:
                q = q * (1.0 - eps) + eps / classes
            if w is not None:
                q = q * w
            qsum = q.sum(axis=1)
            linear = (q * shifted).sum(axis=1)
            denom = m
            self.q = q
        else:
            t, keep = _index_target(name, x, target, classes, ignore_index,
                                    none_if_all_kept=w is None and not eps)
        if not self.probs and keep is None:  # every row counts with weight 1: no products
            linear, qsum, denom = shifted[xp.arange(m), t], 1.0, m
            self.t, self.wt, self.keep = t, None, None
        elif not self.probs:
            keep = keep.astype(x.dtype)
            wt = keep if w is None else w[t] * keep
            picked = shifted[xp.arange(m), t]
            linear = wt * picked
            qsum = wt
            if eps:
                smooth_linear = shifted.sum(axis=1) if w is None else shifted @ w
                linear = (1.0 - eps) * linear + (eps / classes) * keep * smooth_linear
                w_total = classes if w is None else w.sum()
                qsum = (1.0 - eps) * wt + (eps / classes) * w_total * keep
            denom = wt.sum()
            self.t, self.wt, self.keep = t, wt, keep
        keep_shifted = self.probs and self.needs_input_grad[1]
        exp = xp.exp(shifted) if keep_shifted else xp.exp(shifted, out=shifted)
        sumexp = exp.sum(axis=1)
        lse = xp.log(sumexp)
        per_sample = qsum * lse - linear
        self.exp, self.sumexp, self.qsum, self.w, self.eps = exp, sumexp, qsum, w, eps
        self.shape, self.reduction, self.denom = x.shape, reduction, denom
        if keep_shifted:
            self.shifted, self.lse = shifted, lse
        if reduction == "none":
            return per_sample.reshape(_sample_shape(x.shape))
        if reduction == "sum":
            return per_sample.sum()
        if not self.probs and self.wt is None:  # denom = m > 0
            return per_sample.sum() / denom
        return _divide(per_sample.sum(), denom)

    def backward(self, grad_out):
        xp = get_array_module(grad_out)
        coef = _row_coef(grad_out, self.reduction, self.denom)
        grad = grad_x = grad_target = None
        if self.needs_input_grad[0] and not self.probs and self.wt is None:
            grad = self.exp * (coef / self.sumexp)[:, None]
            grad[xp.arange(grad.shape[0]), self.t] -= coef
            grad_x = _unrows(grad, self.shape)
        elif self.needs_input_grad[0]:
            scale = coef * self.qsum / self.sumexp
            grad = self.exp * scale[:, None]
            if self.probs:
                grad -= self.q * (coef[:, None] if self.reduction == "none" else coef)
            else:
                m = grad.shape[0]
                grad[xp.arange(m), self.t] -= (1.0 - self.eps) * coef * self.wt
                if self.eps:
                    w = 1.0 if self.w is None else self.w
                    grad -= ((self.eps / grad.shape[1]) * coef * self.keep)[:, None] * w
            grad_x = _unrows(grad, self.shape)
        if self.needs_input_grad[1] and self.probs:
            c = coef[:, None] if self.reduction == "none" else coef
            neg_logp = self.lse[:, None] - self.shifted
            if self.w is not None:
                neg_logp *= self.w
            grad_target = _unrows((1.0 - self.eps) * c * neg_logp, self.shape)
            grad_target = _as_dtype(grad_target, self.target_dtype)
        return grad_x, grad_target


class NLL(Function):
    """l = -w[t] x[t] (input: log-probabilities); dl/dx = -w[t] at the target class."""

    amp_policy = "fp32"  # autocast: see distprop/amp.py

    def forward(self, x, target, weight=None, ignore_index=-100, reduction="mean"):
        name = "nll_loss"
        _check_float(name, x)
        xp = get_array_module(x)
        classes, w = _check_classes(name, x, weight)
        rows = _rows(x)
        m = rows.shape[0]
        t, keep = _index_target(name, x, target, classes, ignore_index,
                                none_if_all_kept=w is None)
        self.t, self.shape, self.classes, self.reduction = t, x.shape, classes, reduction
        self.m, self.dtype = m, x.dtype
        if keep is None:  # every row counts with weight 1: no masks, no products
            picked = rows[xp.arange(m), t]
            self.wt, self.denom = None, m
            if reduction == "none":
                return (-picked).reshape(_sample_shape(x.shape))
            total = -picked.sum()
            return total if reduction == "sum" else total / m
        keep = keep.astype(x.dtype)
        wt = keep if w is None else w[t] * keep
        per_sample = -wt * rows[xp.arange(m), t]
        self.wt, self.denom = wt, wt.sum()
        if reduction == "none":
            return per_sample.reshape(_sample_shape(x.shape))
        if reduction == "sum":
            return per_sample.sum()
        return _divide(per_sample.sum(), self.denom)

    def backward(self, grad_out):
        xp = get_array_module(grad_out)
        coef = _row_coef(grad_out, self.reduction, self.denom)
        m = self.m
        grad = xp.zeros((m, self.classes), self.dtype)
        grad[xp.arange(m), self.t] = -coef if self.wt is None else -coef * self.wt
        return _unrows(grad, self.shape), None
