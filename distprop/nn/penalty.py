"""L1 and L2 penalties as differentiable loss terms (``dp.nn.utils.l1_penalty`` / ``l2_penalty``).

Each is one graph node over all the parameters, so adding ``lam * l2_penalty(model.parameters())``
to a loss costs one pass over the parameters forward and one backward.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

from distprop import backend
from distprop.tensor import Function, Tensor


def _result(arrays, value):
    xp = backend.get_array_module(arrays[0])
    dtype = np.result_type(*[a.dtype for a in arrays])
    return xp.asarray(value, dtype=dtype)


class L1Penalty(Function):
    """sum_i sum |p_i|; grad p_i = sign(p_i) * g."""

    def forward(self, *params):
        self.params = params
        xp = backend.get_array_module(params[0])
        return _result(params, sum(xp.abs(p).sum(dtype=np.float64) for p in params))

    def backward(self, grad_out):
        xp = backend.get_array_module(self.params[0])
        scale = float(grad_out)
        return tuple(xp.sign(p) * scale if need else None
                     for p, need in zip(self.params, self.needs_input_grad))


class L2Penalty(Function):
    """sum_i sum p_i^2 (no 1/2); grad p_i = 2 p_i * g."""

    def forward(self, *params):
        self.params = params
        xp = backend.get_array_module(params[0])
        total = sum(xp.vdot(p.reshape(-1), p.reshape(-1)).astype(np.float64) for p in params)
        return _result(params, total)

    def backward(self, grad_out):
        scale = 2.0 * float(grad_out)
        return tuple(p * scale if need else None
                     for p, need in zip(self.params, self.needs_input_grad))


def _params(parameters, name: str) -> list[Tensor]:
    params = [parameters] if isinstance(parameters, Tensor) else list(parameters)
    if not params:
        raise ValueError(f"{name}() got an empty parameter list")
    for i, p in enumerate(params):
        if not isinstance(p, Tensor):
            raise TypeError(f"{name}(): parameter {i} is a {type(p).__name__}, not a Tensor")
    return params


def l1_penalty(parameters: Iterable[Tensor] | Tensor) -> Tensor:
    """``sum(|p|)`` over all elements of all parameters: add ``lam * l1_penalty(...)`` to a loss
    for L1 regularisation (its gradient is ``lam * sign(p)``)."""
    return L1Penalty.apply(*_params(parameters, "l1_penalty"))


def l2_penalty(parameters: Iterable[Tensor] | Tensor) -> Tensor:
    """``sum(p ** 2)`` over all elements of all parameters (no factor 1/2, so the gradient is
    ``2 * p``; ``lam * l2_penalty`` matches ``weight_decay = 2 * lam`` in SGD)."""
    return L2Penalty.apply(*_params(parameters, "l2_penalty"))
