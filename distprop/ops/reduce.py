"""Reductions: sum, mean, max/min (with argmax indices), var."""

from __future__ import annotations

from distprop.backend import get_array_module
from distprop.ops._util import normalize_dims
from distprop.tensor import Function


def _expand_to(grad, shape, dims, keepdim):
    """Reinsert reduced axes so ``grad`` broadcasts against the input."""
    xp = get_array_module(grad)
    if dims is None:
        return xp.broadcast_to(grad.reshape((1,) * len(shape)), shape)
    if not keepdim:
        grad = xp.expand_dims(grad, dims)
    return xp.broadcast_to(grad, shape)


class Sum(Function):
    """out = sum(a, dims); grad: g broadcast back."""

    amp_policy = "fp32"  # autocast: see distprop/amp.py

    def forward(self, a, dim=None, keepdim=False):
        self.shape, self.dims, self.keepdim = a.shape, normalize_dims(dim, a.ndim), keepdim
        if a.dtype.kind in "biu":
            return a.sum(axis=self.dims, keepdims=keepdim)
        return a.sum(axis=self.dims, keepdims=keepdim, dtype=a.dtype)

    def backward(self, grad_out):
        return _expand_to(grad_out, self.shape, self.dims, self.keepdim)


class Mean(Function):
    """out = mean(a, dims); grad: g / n broadcast back."""

    amp_policy = "fp32"  # autocast: see distprop/amp.py

    def forward(self, a, dim=None, keepdim=False):
        self.shape, self.dims, self.keepdim = a.shape, normalize_dims(dim, a.ndim), keepdim
        if a.dtype.kind not in "fc":
            raise RuntimeError(f"mean(): expected a floating-point input, got dtype {a.dtype}")
        full = a.size if self.dims is None else 1
        if self.dims is not None:
            for d in self.dims:
                full *= a.shape[d]
        self.count = full
        return a.mean(axis=self.dims, keepdims=keepdim, dtype=a.dtype)

    def backward(self, grad_out):
        return _expand_to(grad_out / self.count, self.shape, self.dims, self.keepdim)


class _Extreme(Function):
    """Max or min over all elements (grad split over ties) or along one dim (grad to argmax)."""

    non_differentiable_outputs = (1,)
    use_max = True

    def forward(self, a, dim=None, keepdim=False):
        xp = get_array_module(a)
        self.shape = a.shape
        self.dim = dim
        if a.size == 0:
            raise RuntimeError("max()/min() of an empty tensor")
        if dim is None or a.ndim == 0:
            normalize_dims(dim, a.ndim)  # range check
            out = a.max() if self.use_max else a.min()
            self.mask = a == out
            if dim is None:
                return out
            self.dim = None
            idx = xp.zeros((), dtype=xp.int64)
            return out, idx
        (d,) = normalize_dims(dim, a.ndim)
        self.dim, self.keepdim = d, keepdim
        idx = a.argmax(axis=d) if self.use_max else a.argmin(axis=d)
        idx_k = xp.expand_dims(idx, d)
        out = xp.take_along_axis(a, idx_k, axis=d)
        self.idx_k = idx_k
        if not keepdim:
            out = out.squeeze(d)
            return out, idx
        return out, idx_k

    def backward(self, grad_out, grad_idx=None):
        xp = get_array_module(grad_out)
        if self.dim is None:
            count = self.mask.sum()
            return self.mask * (grad_out / count).astype(grad_out.dtype)
        grad = xp.zeros(self.shape, dtype=grad_out.dtype)
        g = grad_out if self.keepdim else xp.expand_dims(grad_out, self.dim)
        xp.put_along_axis(grad, self.idx_k, g, axis=self.dim)
        return grad


class Max(_Extreme):
    use_max = True


class Min(_Extreme):
    use_max = False


class Amax(Function):
    """out = max(a, dims) without indices; grad: g split evenly over the tied maxima."""

    use_max = True

    def forward(self, a, dim=None, keepdim=False):
        if a.size == 0:
            raise RuntimeError("amax()/amin() of an empty tensor")
        self.shape, self.dims, self.keepdim = a.shape, normalize_dims(dim, a.ndim), keepdim
        reduce_ = a.max if self.use_max else a.min
        out = reduce_(axis=self.dims, keepdims=True)
        self.mask = a == out
        if keepdim:
            return out
        return out.reshape(()) if self.dims is None else out.squeeze(axis=self.dims)

    def backward(self, grad_out):
        g = _expand_to(grad_out, self.shape, self.dims, self.keepdim)
        count = self.mask.sum(axis=self.dims, keepdims=True).astype(grad_out.dtype)
        return self.mask * (g / count)


class Amin(Amax):
    use_max = False


class Var(Function):
    """out = sum((a - mean)^2) / (n - correction); grad: 2 (a - mean) g / (n - correction)."""

    def forward(self, a, dim=None, correction=1, keepdim=False):
        self.shape, self.dims, self.keepdim = a.shape, normalize_dims(dim, a.ndim), keepdim
        n = a.size if self.dims is None else 1
        if self.dims is not None:
            for d in self.dims:
                n *= a.shape[d]
        self.denominator = max(n - correction, 0)
        self.centered = a - a.mean(axis=self.dims, keepdims=True, dtype=a.dtype)
        sq = (self.centered * self.centered).sum(axis=self.dims, keepdims=keepdim, dtype=a.dtype)
        return sq / a.dtype.type(self.denominator) if self.denominator else sq * float("nan")

    def backward(self, grad_out):
        g = _expand_to(grad_out, self.shape, self.dims, self.keepdim)
        if not self.denominator:  # n <= correction: the output is NaN, and so is its gradient
            return g * self.centered * float("nan")
        return g * self.centered * (2.0 / self.denominator)
