"""Linear, Identity, Flatten."""

from __future__ import annotations

import numpy as np

from distprop import amp, backend
from distprop.nn import init
from distprop.nn.module import Module, Parameter
from distprop.ops import flatten
from distprop.ops.linalg import Linear as LinearFn
from distprop.tensor import Tensor, get_default_dtype


def check_input(layer: str, x, expected: str, ok: bool) -> None:
    """Raise a ValueError naming the layer, what it expects and the shape it got."""
    if not isinstance(x, Tensor):
        raise TypeError(f"{layer}: expected a Tensor input, got {type(x).__name__}")
    if not ok:
        raise ValueError(f"{layer}: expected input of shape {expected}, got {x.shape}")
    if x.dtype.kind != "f":
        raise TypeError(
            f"{layer}: expected a floating-point input, got dtype {x.dtype} "
            "(convert with x.float())"
        )


def check_dtype(layer: str, x: Tensor, reference) -> None:
    """Refuse a float input whose dtype differs from the layer's parameters (NumPy would
    silently compute in the wider dtype), as PyTorch does."""
    if (reference is not None and x.dtype.kind == "f" and x.dtype != reference.dtype
            and not amp.mixed_ok(x.dtype, reference.dtype)):
        raise TypeError(
            f"{layer}: input dtype {x.dtype} does not match the layer's {reference.dtype} "
            "(convert the input with .to(dtype) or the layer with .to(dtype))")


def new_parameter(shape, device=None, dtype=None) -> Parameter:
    """An uninitialised Parameter of the default (or given) dtype on ``device``."""
    if any(int(n) < 0 for n in shape):
        raise ValueError(f"cannot create a parameter of shape {tuple(shape)}: sizes (features, "
                         "channels, embeddings) must be non-negative")
    dt = np.dtype(dtype) if dtype is not None else get_default_dtype()
    dev = backend.device(device)
    with backend.device_context(dev):
        data = backend.xp_for(dev).empty(shape, dtype=dt)
    return Parameter(data)


def reset_affine(weight, bias) -> None:
    """PyTorch's default init of Linear and Conv: kaiming_uniform_(a=sqrt(5)), bias
    U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
    init.kaiming_uniform_(weight, a=5**0.5)
    if bias is not None:
        bound = init.bias_bound(weight)
        init.uniform_(bias, -bound, bound)


class Linear(Module):
    """y = x W^T + b, weight shape (out_features, in_features), PyTorch's default init."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True,
                 device=None, dtype=None):
        super().__init__()
        self.in_features, self.out_features = int(in_features), int(out_features)
        self.weight = new_parameter((self.out_features, self.in_features), device, dtype)
        if bias:
            self.bias = new_parameter((self.out_features,), device, dtype)
        else:
            self.register_parameter("bias", None)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        reset_affine(self.weight, self.bias)

    def forward(self, x: Tensor) -> Tensor:
        name = f"Linear({self.in_features}, {self.out_features})"
        check_input(name, x, f"(*, {self.in_features})",
                    x.ndim >= 1 and x.shape[-1] == self.in_features)
        check_dtype(name, x, self.weight)
        if self.bias is None:
            return LinearFn.apply(x, self.weight)
        return LinearFn.apply(x, self.weight, self.bias)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}")


class Identity(Module):
    """Returns its input."""

    def __init__(self, *args, **kwargs):
        super().__init__()

    def forward(self, x):
        return x


class Flatten(Module):
    """Flattens dims start_dim..end_dim (default 1..-1)."""

    def __init__(self, start_dim: int = 1, end_dim: int = -1):
        super().__init__()
        self.start_dim, self.end_dim = start_dim, end_dim

    def forward(self, x: Tensor) -> Tensor:
        return flatten(x, self.start_dim, self.end_dim)

    def extra_repr(self) -> str:
        return f"start_dim={self.start_dim}, end_dim={self.end_dim}"
