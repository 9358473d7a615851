"""torch.nn.functional-style wrappers over ``distprop.ops`` (also ``dp.nn.functional``)."""

from __future__ import annotations

from distprop.ops.linalg import Linear as _Linear


def linear(input, weight, bias=None):
    """y = input @ weight^T + bias."""
    if bias is None:
        return _Linear.apply(input, weight)
    return _Linear.apply(input, weight, bias)
