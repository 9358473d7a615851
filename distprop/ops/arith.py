"""Elementwise arithmetic and math functions, with NumPy broadcasting."""

from __future__ import annotations

from distprop.backend import get_array_module
from distprop.ops._util import unbroadcast
from distprop.tensor import Function


def _check_broadcast(op: str, a, b) -> None:
    sa, sb = getattr(a, "shape", ()), getattr(b, "shape", ())
    for x, y in zip(reversed(sa), reversed(sb)):
        if x != y and x != 1 and y != 1:
            raise ValueError(
                f"{op}: shapes {tuple(sa)} and {tuple(sb)} cannot be broadcast together"
            )


def _check_devices(op: str, a, b) -> None:
    xa, xb = get_array_module(a), get_array_module(b)
    if xa is not xb and hasattr(a, "shape") and hasattr(b, "shape"):
        if getattr(a, "ndim", 0) and getattr(b, "ndim", 0):
            from distprop.backend import device_of

            raise RuntimeError(
                f"{op}: expected all tensors on the same device, got {device_of(a)} and "
                f"{device_of(b)}"
            )
    elif xa is xb and xa.__name__ == "cupy" and a.device.id != b.device.id:
        raise RuntimeError(
            f"{op}: expected all tensors on the same device, got cuda:{a.device.id} and "
            f"cuda:{b.device.id}"
        )


def check_same_device(op: str, *arrays) -> None:
    """Raise ``RuntimeError`` naming both devices when ``arrays`` (None skipped) live on
    different devices (CPU vs CUDA, or two GPUs)."""
    present = [a for a in arrays if a is not None and hasattr(a, "shape")]
    for other in present[1:]:
        _check_devices(op, present[0], other)


class Add(Function):
    """out = a + b; grads: unbroadcast(g)."""

    def forward(self, a, b):
        _check_broadcast("add", a, b)
        _check_devices("add", a, b)
        self.shapes = (getattr(a, "shape", ()), getattr(b, "shape", ()))
        return a + b

    def backward(self, grad_out):
        sa, sb = self.shapes
        return (
            unbroadcast(grad_out, sa) if self.needs_input_grad[0] else None,
            unbroadcast(grad_out, sb) if self.needs_input_grad[1] else None,
        )


class Sub(Function):
    """out = a - b; grads: g, -g."""

    def forward(self, a, b):
        _check_broadcast("sub", a, b)
        _check_devices("sub", a, b)
        self.shapes = (getattr(a, "shape", ()), getattr(b, "shape", ()))
        return a - b

    def backward(self, grad_out):
        sa, sb = self.shapes
        return (
            unbroadcast(grad_out, sa) if self.needs_input_grad[0] else None,
            unbroadcast(-grad_out, sb) if self.needs_input_grad[1] else None,
        )


class Mul(Function):
    """out = a * b; grads: g * b, g * a."""

    def forward(self, a, b):
        _check_broadcast("mul", a, b)
        _check_devices("mul", a, b)
        self.a, self.b = a, b
        return a * b

    def backward(self, grad_out):
        a, b = self.a, self.b
        ga = unbroadcast(grad_out * b, a.shape) if self.needs_input_grad[0] else None
        gb = unbroadcast(grad_out * a, b.shape) if self.needs_input_grad[1] else None
        return ga, gb


class Div(Function):
    """out = a / b; grads: g / b, -g * a / b^2."""

    def forward(self, a, b):
        _check_broadcast("div", a, b)
        _check_devices("div", a, b)
        self.a, self.b = a, b
        return a / b

    def backward(self, grad_out):
        a, b = self.a, self.b
        ga = unbroadcast(grad_out / b, a.shape) if self.needs_input_grad[0] else None
        gb = None
        if self.needs_input_grad[1]:
            gb = unbroadcast(-grad_out * a / (b * b), b.shape)
        return ga, gb


class Neg(Function):
    """out = -a; grad: -g."""

    def forward(self, a):
        return -a

    def backward(self, grad_out):
        return -grad_out


class Pow(Function):
    """out = a ** b; grads: g * b * a^(b-1), g * out * log(a)."""

    def forward(self, a, b):
        _check_broadcast("pow", a, b)
        self.a, self.b = a, b
        self.out = a**b
        return self.out

    def backward(self, grad_out):
        a, b = self.a, self.b
        xp = get_array_module(a, b)
        ga = gb = None
        if self.needs_input_grad[0]:
            ga = unbroadcast(grad_out * b * a ** (b - 1), a.shape)
        if self.needs_input_grad[1]:
            safe = xp.where(a > 0, a, 1)
            gb = unbroadcast(grad_out * self.out * xp.log(safe), b.shape)
        return ga, gb


class PowScalar(Function):
    """out = a ** p for a Python number p; grad: g * p * a^(p-1)."""

    def forward(self, a, exponent):
        self.a, self.exponent = a, exponent
        return a**exponent

    def backward(self, grad_out):
        p = self.exponent
        if p == 2:
            return grad_out * (2 * self.a), None
        return grad_out * p * self.a ** (p - 1), None


class RPowScalar(Function):
    """out = c ** a for a Python number c; grad: g * out * log(c)."""

    def forward(self, a, base):
        import math

        self.log_base = math.log(base) if base > 0 else float("nan")
        self.out = base**a
        return self.out

    def backward(self, grad_out):
        return grad_out * self.out * self.log_base, None


class Exp(Function):
    """out = exp(a); grad: g * out."""

    amp_policy = "fp32"  # autocast: see distprop/amp.py

    def forward(self, a):
        self.out = get_array_module(a).exp(a)
        return self.out

    def backward(self, grad_out):
        return grad_out * self.out


class Log(Function):
    """out = log(a); grad: g / a."""

    amp_policy = "fp32"  # autocast: see distprop/amp.py

    def forward(self, a):
        self.a = a
        return get_array_module(a).log(a)

    def backward(self, grad_out):
        return grad_out / self.a


class Sqrt(Function):
    """out = sqrt(a); grad: g / (2 out)."""

    def forward(self, a):
        self.out = get_array_module(a).sqrt(a)
        return self.out

    def backward(self, grad_out):
        return grad_out / (2 * self.out)


class Abs(Function):
    """out = |a|; grad: g * sign(a)."""

    def forward(self, a):
        self.a = a
        return abs(a)

    def backward(self, grad_out):
        return grad_out * get_array_module(self.a).sign(self.a)


class Sign(Function):
    """out = sign(a); grad: 0."""

    def forward(self, a):
        return get_array_module(a).sign(a)

    def backward(self, grad_out):
        return grad_out * 0


class Clamp(Function):
    """out = min(max(a, lo), hi); grad: g where lo <= a <= hi (PyTorch's convention)."""

    def forward(self, a, min=None, max=None):
        xp = get_array_module(a)
        if min is None and max is None:
            raise ValueError("clamp: at least one of min and max must be given")
        mask = xp.ones(a.shape, dtype=bool)
        out = a
        if min is not None:
            mask &= a >= min
            out = xp.maximum(out, xp.asarray(min, dtype=a.dtype))
        if max is not None:
            mask &= a <= max
            out = xp.minimum(out, xp.asarray(max, dtype=a.dtype))
        self.mask = mask
        return out

    def backward(self, grad_out):
        return grad_out * self.mask


class Where(Function):
    """out = where(cond, a, b); grads: g masked by cond / not cond."""

    def forward(self, cond, a, b):
        xp = get_array_module(cond, a, b)
        _check_broadcast("where", a, b)
        _check_broadcast("where", cond, a)
        _check_broadcast("where", cond, b)
        self.cond = cond.astype(bool) if hasattr(cond, "astype") else cond
        self.shapes = (getattr(a, "shape", ()), getattr(b, "shape", ()))
        out = xp.where(self.cond, a, b)
        dtype = a.dtype if hasattr(a, "dtype") else getattr(b, "dtype", out.dtype)
        return out.astype(dtype, copy=False)

    def backward(self, grad_out):
        xp = get_array_module(grad_out)
        zero = xp.zeros((), dtype=grad_out.dtype)
        ga = gb = None
        if self.needs_input_grad[1]:
            ga = unbroadcast(xp.where(self.cond, grad_out, zero), self.shapes[0])
        if self.needs_input_grad[2]:
            gb = unbroadcast(xp.where(self.cond, zero, grad_out), self.shapes[1])
        return None, ga, gb


class Maximum(Function):
    """out = max(a, b) elementwise; ties split the gradient evenly (as PyTorch)."""

    def forward(self, a, b):
        xp = get_array_module(a, b)
        self.a, self.b = a, b
        return xp.maximum(a, b)

    def backward(self, grad_out):
        a, b = self.a, self.b
        win_a = (a > b) + 0.5 * (a == b)
        win_a = win_a.astype(grad_out.dtype)
        ga = unbroadcast(grad_out * win_a, a.shape) if self.needs_input_grad[0] else None
        gb = unbroadcast(grad_out * (1 - win_a), b.shape) if self.needs_input_grad[1] else None
        return ga, gb


class Minimum(Function):
    """out = min(a, b) elementwise; ties split the gradient evenly (as PyTorch)."""

    def forward(self, a, b):
        xp = get_array_module(a, b)
        self.a, self.b = a, b
        return xp.minimum(a, b)

    def backward(self, grad_out):
        a, b = self.a, self.b
        win_a = (a < b) + 0.5 * (a == b)
        win_a = win_a.astype(grad_out.dtype)
        ga = unbroadcast(grad_out * win_a, a.shape) if self.needs_input_grad[0] else None
        gb = unbroadcast(grad_out * (1 - win_a), b.shape) if self.needs_input_grad[1] else None
        return ga, gb
