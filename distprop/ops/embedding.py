"""Embedding lookup: rows of a weight table gathered by integer indices."""

from __future__ import annotations

import numpy as np

from distprop.backend import get_array_module
from distprop.tensor import Function


def check_indices(indices, num_embeddings: int, where: str = "embedding"):
    """Raise a clear error unless ``indices`` are integers in [0, num_embeddings)."""
    if indices.dtype.kind not in "iu":
        raise TypeError(
            f"{where}: indices must be an integer tensor (int32/int64), got dtype {indices.dtype}"
        )
    if indices.size:
        low, high = int(indices.min()), int(indices.max())
        if low < 0 or high >= num_embeddings:
            bad = low if low < 0 else high
            raise IndexError(
                f"{where}: index {bad} is out of range for a table of {num_embeddings} rows "
                f"(valid indices are 0..{num_embeddings - 1})"
            )


def scatter_add_rows(grad, index, rows) -> None:
    """grad[index[k]] += rows[k] for every k, repeated indices accumulating."""
    xp = get_array_module(grad)
    if xp is np:
        # NumPy's ufunc.at is about 5x faster on 1-D operands: address single elements.
        width = grad.shape[1]
        flat = (index[:, None] * width + np.arange(width)).reshape(-1)
        np.add.at(grad.reshape(-1), flat, rows.reshape(-1))
    else:
        import cupyx

        cupyx.scatter_add(grad, index, rows)


class Embedding(Function):
    """out = weight[indices]; grad: g scatter-added into weight's rows (padding row excluded)."""

    def forward(self, indices, weight, padding_idx=None, name="embedding"):
        check_indices(indices, weight.shape[0], name)
        self.indices, self.padding_idx = indices, padding_idx
        self.weight_shape = weight.shape
        return weight[indices]

    def backward(self, grad_out):
        xp = get_array_module(grad_out)
        dim = self.weight_shape[1]
        grad = xp.zeros(self.weight_shape, dtype=grad_out.dtype)
        scatter_add_rows(grad, self.indices.reshape(-1), grad_out.reshape(-1, dim))
        if self.padding_idx is not None:
            grad[self.padding_idx] = 0
        return None, grad
