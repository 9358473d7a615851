"""Tensor factories: ``zeros``, ``ones``, ``full``, ``empty``, ``arange``, ``randn``, ``rand``, ...

Random factories draw from the global generator (``dp.manual_seed``) on the host, so a seed gives
the same values on every device.
"""

from __future__ import annotations

import numpy as np

from distprop import backend
from distprop.tensor import Tensor, get_default_dtype


def _factory(fill, shape, dtype, device, requires_grad):
    if len(shape) == 1 and isinstance(shape[0], (tuple, list)):
        shape = tuple(shape[0])
    dev = backend.device(device)
    xp = backend.xp_for(dev)
    dtype = np.dtype(dtype) if dtype is not None else get_default_dtype()
    with backend.device_context(dev):
        data = fill(xp, tuple(int(s) for s in shape), dtype)
    return Tensor(data, requires_grad=requires_grad)


def zeros(*shape, dtype=None, device=None, requires_grad: bool = False) -> Tensor:
    return _factory(lambda xp, s, d: xp.zeros(s, d), shape, dtype, device, requires_grad)


def ones(*shape, dtype=None, device=None, requires_grad: bool = False) -> Tensor:
    return _factory(lambda xp, s, d: xp.ones(s, d), shape, dtype, device, requires_grad)


def full(shape, fill_value, dtype=None, device=None, requires_grad: bool = False) -> Tensor:
    return _factory(
        lambda xp, s, d: xp.full(s, fill_value, d), (shape,), dtype, device, requires_grad
    )


def empty(*shape, dtype=None, device=None, requires_grad: bool = False) -> Tensor:
    return _factory(lambda xp, s, d: xp.empty(s, d), shape, dtype, device, requires_grad)


def zeros_like(t: Tensor, dtype=None) -> Tensor:
    return Tensor._wrap(backend.get_array_module(t.data).zeros_like(t.data, dtype=dtype))


def ones_like(t: Tensor, dtype=None) -> Tensor:
    return Tensor._wrap(backend.get_array_module(t.data).ones_like(t.data, dtype=dtype))


def arange(start, end=None, step=1, dtype=None, device=None) -> Tensor:
    if end is None:
        start, end = 0, start
    dev = backend.device(device)
    xp = backend.xp_for(dev)
    data = xp.arange(start, end, step)
    if dtype is not None:
        data = data.astype(dtype)
    elif data.dtype == np.float64:
        data = data.astype(get_default_dtype())
    return Tensor._wrap(data)


def randn(*shape, dtype=None, device=None, requires_grad: bool = False) -> Tensor:
    if len(shape) == 1 and isinstance(shape[0], (tuple, list)):
        shape = tuple(shape[0])
    dtype = np.dtype(dtype) if dtype is not None else get_default_dtype()
    data = backend.random_normal(shape, dtype, backend.device(device))
    return Tensor(data, requires_grad=requires_grad)


def rand(*shape, dtype=None, device=None, requires_grad: bool = False) -> Tensor:
    if len(shape) == 1 and isinstance(shape[0], (tuple, list)):
        shape = tuple(shape[0])
    dtype = np.dtype(dtype) if dtype is not None else get_default_dtype()
    data = backend.random_uniform(shape, dtype, backend.device(device))
    return Tensor(data, requires_grad=requires_grad)


def randint(low, high=None, size=(), dtype=np.int64, device=None) -> Tensor:
    if high is None:
        low, high = 0, low
    data = backend.generator().integers(low, high, size=size).astype(dtype)
    return Tensor(data, device=device)
