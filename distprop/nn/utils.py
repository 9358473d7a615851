"""``dp.nn.utils``: parameter vectors, clipping, penalties and gradient diagnostics."""

from __future__ import annotations

from collections.abc import Iterable

from distprop import backend
from distprop.tensor import Tensor


def parameters_to_vector(parameters: Iterable[Tensor]) -> Tensor:
    """Concatenate the parameters into one 1-D tensor (a copy)."""
    params = list(parameters)
    if not params:
        raise ValueError("parameters_to_vector() got an empty parameter list")
    xp = backend.get_array_module(params[0].data)
    return Tensor._wrap(xp.concatenate([p.data.reshape(-1) for p in params]))


def vector_to_parameters(vec: Tensor, parameters: Iterable[Tensor]) -> None:
    """Copy consecutive slices of ``vec`` into the parameters, in place."""
    params = list(parameters)
    total = sum(p.numel() for p in params)
    if vec.ndim != 1 or vec.shape[0] != total:
        raise ValueError(
            f"vector_to_parameters: expected a 1-D vector of {total} elements, got shape "
            f"{vec.shape}"
        )
    offset = 0
    for p in params:
        n = p.numel()
        p.data[...] = vec.data[offset : offset + n].reshape(p.shape)
        offset += n
