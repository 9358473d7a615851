"""Shape and indexing ops: reshape, permute, squeeze, cat, stack, indexing, casts, copies."""

from __future__ import annotations

import numpy as np

from distprop import backend
from distprop.backend import get_array_module
from distprop.ops._util import normalize_dims
from distprop.ops.arith import check_same_device
from distprop.tensor import Function, Tensor


def _resolve_shape(shape, size: int, src_shape) -> tuple[int, ...]:
    shape = tuple(int(s) for s in shape)
    if shape.count(-1) > 1:
        raise RuntimeError("only one dimension can be inferred (-1) in reshape/view")
    known = 1
    for s in shape:
        if s != -1:
            known *= s
    if -1 in shape:
        if known == 0 or size % known:
            raise RuntimeError(f"shape {list(shape)} is invalid for input of size {size}")
        shape = tuple(size // known if s == -1 else s for s in shape)
    elif known != size:
        raise RuntimeError(
            f"shape {list(shape)} is invalid for input of size {size} (input shape "
            f"{tuple(src_shape)})"
        )
    return shape


class Reshape(Function):
    """out = a viewed with a new shape; grad: g reshaped back."""

    def forward(self, a, shape):
        self.shape = a.shape
        return a.reshape(_resolve_shape(shape, a.size, a.shape))

    def backward(self, grad_out):
        return grad_out.reshape(self.shape)


class Permute(Function):
    """out = a with axes permuted; grad: g with the inverse permutation."""

    def forward(self, a, dims):
        if len(dims) != a.ndim:
            raise RuntimeError(
                f"permute: number of dims {len(dims)} does not match the tensor's {a.ndim}"
            )
        dims = tuple(d % a.ndim for d in dims) if a.ndim else ()
        if sorted(dims) != list(range(a.ndim)):
            raise RuntimeError(f"permute: dims {dims} are not a permutation of the "
                               f"{a.ndim} dimensions of a tensor of shape {tuple(a.shape)}")
        self.inverse = tuple(np.argsort(dims)) if dims else ()
        return a.transpose(dims)

    def backward(self, grad_out):
        return grad_out.transpose(self.inverse)


class Expand(Function):
    """out = a broadcast to a larger shape; grad: g summed back."""

    def forward(self, a, shape):
        xp = get_array_module(a)
        self.shape = a.shape
        lead = len(shape) - a.ndim
        target = tuple(
            a.shape[i - lead] if (s == -1 and i >= lead) else s for i, s in enumerate(shape)
        )
        if lead < 0 or any(n != t and n != 1 for n, t in zip(a.shape, target[lead:])):
            raise RuntimeError(f"expand: a tensor of shape {tuple(a.shape)} cannot be expanded "
                               f"to {tuple(shape)} (only size-1 dims can grow)")
        return xp.broadcast_to(a, target)

    def backward(self, grad_out):
        from distprop.ops._util import unbroadcast

        return unbroadcast(grad_out, self.shape)


class Cat(Function):
    """out = concatenate(inputs, dim); grad: g split back."""

    def forward(self, *arrays, dim=0):
        if not arrays:
            raise ValueError("cat() expects a non-empty sequence of tensors")
        check_same_device("cat", *arrays)
        xp = get_array_module(*arrays)
        ndim = arrays[0].ndim
        d = dim % ndim
        for i, a in enumerate(arrays):
            if a.ndim != ndim or any(
                a.shape[k] != arrays[0].shape[k] for k in range(ndim) if k != d
            ):
                raise ValueError(
                    f"cat(): tensor 0 has shape {tuple(arrays[0].shape)} but tensor {i} has "
                    f"shape {tuple(a.shape)}; they must match except in dimension {dim}"
                )
        self.dim = d
        self.splits = np.cumsum([a.shape[d] for a in arrays])[:-1]
        return xp.concatenate(arrays, axis=d)

    def backward(self, grad_out):
        xp = get_array_module(grad_out)
        return tuple(xp.split(grad_out, self.splits, axis=self.dim))


class Stack(Function):
    """out = stack(inputs, dim); grad: g unstacked."""

    def forward(self, *arrays, dim=0):
        if not arrays:
            raise ValueError("stack() expects a non-empty sequence of tensors")
        check_same_device("stack", *arrays)
        for i, a in enumerate(arrays):
            if a.shape != arrays[0].shape:
                raise ValueError(
                    f"stack(): tensor 0 has shape {tuple(arrays[0].shape)} but tensor {i} has "
                    f"shape {tuple(a.shape)}; all must be equal"
                )
        xp = get_array_module(*arrays)
        self.dim = dim % (arrays[0].ndim + 1)
        self.count = len(arrays)
        return xp.stack(arrays, axis=self.dim)

    def backward(self, grad_out):
        xp = get_array_module(grad_out)
        return tuple(xp.moveaxis(grad_out, self.dim, 0))


def _index_to_arrays(index):
    """Replace Tensors inside an index by their arrays."""
    if isinstance(index, Tensor):
        return index.data
    if isinstance(index, tuple):
        return tuple(i.data if isinstance(i, Tensor) else i for i in index)
    if isinstance(index, list):
        return np.asarray(index)
    return index


def _is_basic(index) -> bool:
    items = index if isinstance(index, tuple) else (index,)
    return all(i is None or i is Ellipsis or isinstance(i, (int, slice)) for i in items)


class GetItem(Function):
    """out = a[index]; grad: g scattered (added) back into zeros of a's shape."""

    def forward(self, a, index):
        self.shape, self.dtype = a.shape, a.dtype
        self.index = index
        self.basic = _is_basic(index)
        try:
            return a[index]
        except IndexError as exc:
            raise IndexError(
                f"invalid index {index!r} for a tensor of shape {tuple(a.shape)}: {exc}"
            ) from None

    def backward(self, grad_out):
        xp = get_array_module(grad_out)
        grad = xp.zeros(self.shape, dtype=grad_out.dtype)
        if self.basic:
            grad[self.index] = grad_out
        elif xp is np:
            np.add.at(grad, self.index, grad_out)
        else:
            import cupyx

            cupyx.scatter_add(grad, self.index, grad_out)
        return grad


class Clone(Function):
    """out = copy of a; grad: g."""

    def forward(self, a):
        return a.copy()

    def backward(self, grad_out):
        return grad_out


class Cast(Function):
    """out = a as another dtype; grad: g cast back."""

    def forward(self, a, dtype):
        self.dtype = a.dtype
        return a.astype(dtype)

    def backward(self, grad_out):
        return grad_out.astype(self.dtype)


class ToDevice(Function):
    """out = a copied to another device; grad: g copied back."""

    def forward(self, a, device):
        self.source = backend.device_of(a)
        return backend.to_device(a, device)

    def backward(self, grad_out):
        return backend.to_device(grad_out, self.source)


def squeeze_shape(shape, dim) -> tuple[int, ...]:
    if dim is None:
        return tuple(s for s in shape if s != 1)
    dims = set(normalize_dims(dim, len(shape)) or ())
    return tuple(s for i, s in enumerate(shape) if not (i in dims and s == 1))


def unsqueeze_shape(shape, dim: int) -> tuple[int, ...]:
    nd = len(shape) + 1
    if not -nd <= dim < nd:
        raise IndexError(f"unsqueeze: dim {dim} out of range for a {len(shape)}-d tensor")
    d = dim % nd
    return tuple(shape[:d]) + (1,) + tuple(shape[d:])
