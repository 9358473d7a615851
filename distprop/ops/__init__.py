"""Differentiable operations on Tensors.

Each op is a :class:`~distprop.tensor.Function` subclass in one of the modules here; this module
holds the thin functions users call (``dp.exp(x)``, ``dp.cat([...])``) and binds the Tensor
methods and operators to them, explicitly.
"""

from __future__ import annotations

import numbers
import operator
from typing import NamedTuple

import numpy as np

from distprop.ops import arith, linalg, reduce, shape
from distprop.ops._util import normalize_dims
from distprop.ops.activation import log_softmax, relu, sigmoid, softmax, tanh
from distprop.tensor import Tensor, get_default_dtype


def _operand(value):
    """Tensors pass through; Python and NumPy scalars stay scalars (keeping float32 float32)."""
    if isinstance(value, Tensor):
        return value
    if isinstance(value, (bool, numbers.Number)) and not isinstance(value, np.ndarray):
        if isinstance(value, np.generic):
            return value.item()
        return value
    if isinstance(value, (list, tuple)) or hasattr(value, "shape"):
        return Tensor(value)
    raise TypeError(f"unsupported operand of type {type(value).__name__}")


def _is_float(value) -> bool:
    return isinstance(value, Tensor) and value.dtype.kind in "fc"


def _to_float(value, dtype):
    """An integer/bool Tensor cast to ``dtype``; anything else unchanged."""
    if isinstance(value, Tensor) and value.dtype.kind in "biu":
        return Tensor._wrap(value.data.astype(dtype))
    return value


def _operands(a, b, true_div: bool = False):
    """Both operands, with PyTorch's type promotion: integer/bool tensors mixed with a float
    tensor take its dtype, with a Python float (or under true division) the default float
    dtype; a 0-d float tensor takes the dtype of an n-d float one. (NumPy alone would give
    float64 for ``int64 * float32`` and for ``float32 * float64_0d``.)"""
    a, b = _operand(a), _operand(b)
    if _is_float(a) and _is_float(b) and a.dtype != b.dtype and (a.ndim == 0) != (b.ndim == 0):
        if a.ndim == 0:
            return a.to(dtype=b.dtype), b
        return a, b.to(dtype=a.dtype)
    if _is_float(a) or _is_float(b):
        dtype = a.dtype if _is_float(a) else b.dtype
        return _to_float(a, dtype), _to_float(b, dtype)
    if true_div or isinstance(a, float) or isinstance(b, float):
        dtype = get_default_dtype()
        return _to_float(a, dtype), _to_float(b, dtype)
    return a, b


def _float_input(a):
    """Integer/bool tensors into float-valued functions (exp, log, sqrt) become the default
    float dtype, as in PyTorch."""
    return _to_float(a, get_default_dtype())


def add(a, b):
    return arith.Add.apply(*_operands(a, b))


def sub(a, b):
    return arith.Sub.apply(*_operands(a, b))


def mul(a, b):
    return arith.Mul.apply(*_operands(a, b))


def div(a, b):
    return arith.Div.apply(*_operands(a, b, true_div=True))


def neg(a):
    return arith.Neg.apply(a)


def pow(a, b):
    a, b = _operands(a, b)
    if isinstance(a, Tensor) and not isinstance(b, Tensor):
        return arith.PowScalar.apply(a, b)
    if not isinstance(a, Tensor):
        return arith.RPowScalar.apply(b, a)
    return arith.Pow.apply(a, b)


def exp(a):
    return arith.Exp.apply(_float_input(a))


def log(a):
    return arith.Log.apply(_float_input(a))


def sqrt(a):
    return arith.Sqrt.apply(_float_input(a))


def abs(a):
    return arith.Abs.apply(a)


def sign(a):
    return arith.Sign.apply(a)


def clamp(a, min=None, max=None):
    return arith.Clamp.apply(a, min=min, max=max)


def where(condition, a, b):
    cond = condition.data if isinstance(condition, Tensor) else np.asarray(condition)
    return arith.Where.apply(cond, _operand(a), _operand(b))


def maximum(a, b):
    return arith.Maximum.apply(*_operands(a, b))


def minimum(a, b):
    return arith.Minimum.apply(*_operands(a, b))


def matmul(a, b):
    return linalg.MatMul.apply(_operand(a), _operand(b))


def sum(a, dim=None, keepdim=False):
    return reduce.Sum.apply(a, dim=dim, keepdim=keepdim)


def mean(a, dim=None, keepdim=False):
    return reduce.Mean.apply(a, dim=dim, keepdim=keepdim)


class ValuesIndices(NamedTuple):
    """``(values, indices)`` of ``max``/``min`` along a dim, as ``torch.return_types.max``."""

    values: Tensor
    indices: Tensor


def max(a, dim=None, keepdim=False):
    """Max over all elements, or ``(values, indices)`` along ``dim`` (as torch.max)."""
    if isinstance(dim, Tensor):
        return maximum(a, dim)
    out = reduce.Max.apply(a, dim=dim, keepdim=keepdim)
    return out if dim is None else ValuesIndices(*out)


def min(a, dim=None, keepdim=False):
    """Min over all elements, or ``(values, indices)`` along ``dim`` (as torch.min)."""
    if isinstance(dim, Tensor):
        return minimum(a, dim)
    out = reduce.Min.apply(a, dim=dim, keepdim=keepdim)
    return out if dim is None else ValuesIndices(*out)


def amax(a, dim=None, keepdim=False):
    """Max over ``dim`` (int or tuple); the gradient is split evenly over ties (as torch.amax)."""
    return reduce.Amax.apply(a, dim=dim, keepdim=keepdim)


def amin(a, dim=None, keepdim=False):
    """Min over ``dim`` (int or tuple); the gradient is split evenly over ties (as torch.amin)."""
    return reduce.Amin.apply(a, dim=dim, keepdim=keepdim)


def var(a, dim=None, unbiased=None, keepdim=False, correction=None):
    if correction is None:
        correction = 0 if unbiased is False else 1
    return reduce.Var.apply(a, dim=dim, correction=correction, keepdim=keepdim)


def std(a, dim=None, unbiased=None, keepdim=False, correction=None):
    return sqrt(var(a, dim=dim, unbiased=unbiased, keepdim=keepdim, correction=correction))


def reshape(a, *shape_):
    if len(shape_) == 1 and isinstance(shape_[0], (tuple, list)):
        shape_ = tuple(shape_[0])
    return shape.Reshape.apply(a, shape=shape_)


def flatten(a, start_dim=0, end_dim=-1):
    nd = a.ndim
    (s,), (e,) = normalize_dims(start_dim, nd) or (0,), normalize_dims(end_dim, nd) or (0,)
    if nd == 0:
        return reshape(a, 1)
    if s > e:
        raise RuntimeError("flatten() has invalid args: start_dim cannot come after end_dim")
    new = a.shape[:s] + (-1,) + a.shape[e + 1 :]
    return reshape(a, new)


def permute(a, *dims):
    if len(dims) == 1 and isinstance(dims[0], (tuple, list)):
        dims = tuple(dims[0])
    return shape.Permute.apply(a, dims=tuple(dims))


def transpose(a, dim0, dim1):
    (dim0,), (dim1,) = normalize_dims(dim0, a.ndim) or (0,), normalize_dims(dim1, a.ndim) or (0,)
    if a.ndim == 0:
        return shape.Permute.apply(a, dims=())
    dims = list(range(a.ndim))
    dims[dim0], dims[dim1] = dims[dim1], dims[dim0]
    return shape.Permute.apply(a, dims=tuple(dims))


def squeeze(a, dim=None):
    return shape.Reshape.apply(a, shape=shape.squeeze_shape(a.shape, dim))


def unsqueeze(a, dim):
    return shape.Reshape.apply(a, shape=shape.unsqueeze_shape(a.shape, dim))


def expand(a, *sizes):
    if len(sizes) == 1 and isinstance(sizes[0], (tuple, list)):
        sizes = tuple(sizes[0])
    return shape.Expand.apply(a, shape=tuple(sizes))


def cat(tensors, dim=0):
    return shape.Cat.apply(*[_operand(t) for t in tensors], dim=dim)


concatenate = cat


def stack(tensors, dim=0):
    return shape.Stack.apply(*[_operand(t) for t in tensors], dim=dim)


def getitem(a, index):
    return shape.GetItem.apply(a, index=shape._index_to_arrays(index))


def _reverse(op):
    return lambda self, other: op(other, self)


def _compare(op):
    def method(self, other):
        other = other.data if isinstance(other, Tensor) else other
        return Tensor._wrap(op(self.data, other))

    return method


#: Every Tensor operator and math method: name -> the function of this module it calls
#: (declared for type checkers in :mod:`distprop.tensor_methods`).
TENSOR_METHODS: dict[str, object] = {
    "__add__": add,
    "__radd__": _reverse(add),
    "__sub__": sub,
    "__rsub__": _reverse(sub),
    "__mul__": mul,
    "__rmul__": _reverse(mul),
    "__truediv__": div,
    "__rtruediv__": _reverse(div),
    "__neg__": neg,
    "__pow__": pow,
    "__rpow__": _reverse(pow),
    "__matmul__": matmul,
    "__rmatmul__": _reverse(matmul),
    "__getitem__": getitem,
    "__abs__": abs,
    "__lt__": _compare(operator.lt),
    "__le__": _compare(operator.le),
    "__gt__": _compare(operator.gt),
    "__ge__": _compare(operator.ge),
    "__eq__": _compare(operator.eq),
    "__ne__": _compare(operator.ne),
    "add": add,
    "sub": sub,
    "mul": mul,
    "div": div,
    "neg": neg,
    "pow": pow,
    "matmul": matmul,
    "exp": exp,
    "log": log,
    "sqrt": sqrt,
    "abs": abs,
    "sign": sign,
    "clamp": clamp,
    "clip": clamp,
    "maximum": maximum,
    "minimum": minimum,
    "sum": sum,
    "mean": mean,
    "max": max,
    "min": min,
    "amax": amax,
    "amin": amin,
    "var": var,
    "std": std,
    "reshape": reshape,
    "view": reshape,
    "flatten": flatten,
    "permute": permute,
    "transpose": transpose,
    "squeeze": squeeze,
    "unsqueeze": unsqueeze,
    "expand": expand,
    "relu": relu,
    "sigmoid": sigmoid,
    "tanh": tanh,
    "softmax": softmax,
    "log_softmax": log_softmax,
    "argmax": lambda self, dim=None, keepdim=False: Tensor._wrap(
        _argext(self.data, dim, keepdim, "argmax")
    ),
    "argmin": lambda self, dim=None, keepdim=False: Tensor._wrap(
        _argext(self.data, dim, keepdim, "argmin")
    ),
}


def _bind_tensor_methods() -> None:
    for name, fn in TENSOR_METHODS.items():
        setattr(Tensor, name, fn)
    Tensor.__hash__ = object.__hash__


def _argext(data, dim, keepdim, name):
    out = getattr(data, name)(axis=dim)
    if dim is None:
        return np.asarray(out) if np.isscalar(out) else out
    if keepdim:
        from distprop.backend import get_array_module

        out = get_array_module(data).expand_dims(out, dim)
    return out


_bind_tensor_methods()
