"""Embedding: a learnable lookup table indexed by integer tokens."""

from __future__ import annotations

import numpy as np

from distprop import backend
from distprop.nn import init
from distprop.nn.linear import new_parameter
from distprop.nn.module import Module, Parameter
from distprop.ops.embedding import Embedding as EmbeddingFn
from distprop.tensor import Tensor, no_grad


def _index_array(indices, layer: str):
    if isinstance(indices, Tensor):
        return indices.data
    if isinstance(indices, (list, tuple, int, np.integer)):
        return np.asarray(indices)
    if hasattr(indices, "dtype") and hasattr(indices, "shape"):
        return indices
    raise TypeError(f"{layer}: expected an integer Tensor of indices, got {type(indices).__name__}")


class Embedding(Module):
    """A table of ``num_embeddings`` vectors of size ``embedding_dim``, looked up by index.

    Weights start as N(0, 1) (PyTorch's init) with the ``padding_idx`` row zeroed. The gradient of
    repeated indices accumulates; the ``padding_idx`` row never receives gradient.

    Args:
        num_embeddings: number of rows in the table.
        embedding_dim: size of each vector.
        padding_idx: a row (negative counts from the end) that stays fixed and gets no gradient.
    """

    def __init__(self, num_embeddings: int, embedding_dim: int, padding_idx: int | None = None,
                 _weight=None, _freeze: bool = False, device=None, dtype=None):
        super().__init__()
        self.num_embeddings, self.embedding_dim = int(num_embeddings), int(embedding_dim)
        if padding_idx is not None:
            if not -self.num_embeddings <= padding_idx < self.num_embeddings:
                raise ValueError(
                    f"Embedding: padding_idx {padding_idx} must be within "
                    f"[-{self.num_embeddings}, {self.num_embeddings - 1}]"
                )
            padding_idx = int(padding_idx) % self.num_embeddings
        self.padding_idx = padding_idx
        if _weight is None:
            self.weight = new_parameter((self.num_embeddings, self.embedding_dim), device, dtype)
            self.reset_parameters()
        else:
            data = _weight.data if isinstance(_weight, Tensor) else _weight
            if tuple(data.shape) != (self.num_embeddings, self.embedding_dim):
                raise ValueError(
                    f"Embedding: _weight has shape {tuple(data.shape)}, expected "
                    f"({self.num_embeddings}, {self.embedding_dim})"
                )
            self.weight = Parameter(Tensor(data, dtype=dtype, device=device).data.copy())
        if _freeze:
            self.weight.requires_grad_(False)

    def reset_parameters(self) -> None:
        init.normal_(self.weight)
        if self.padding_idx is not None:
            with no_grad():
                self.weight.data[self.padding_idx] = 0

    @classmethod
    def from_pretrained(cls, embeddings, freeze: bool = True, padding_idx: int | None = None):
        """An Embedding whose table is a copy of the 2-D ``embeddings`` (frozen by default)."""
        data = embeddings.data if isinstance(embeddings, Tensor) else np.asarray(embeddings)
        if data.ndim != 2:
            raise ValueError(
                f"Embedding.from_pretrained: embeddings must be 2-D, got shape {tuple(data.shape)}"
            )
        return cls(data.shape[0], data.shape[1], padding_idx=padding_idx, _weight=data,
                   _freeze=freeze, dtype=data.dtype)

    def forward(self, indices) -> Tensor:
        layer = f"Embedding({self.num_embeddings}, {self.embedding_dim})"
        idx = _index_array(indices, layer)
        if backend.get_array_module(idx) is not backend.get_array_module(self.weight.data):
            idx = backend.to_device(idx, self.weight.device)
        if idx.dtype.kind not in "iu":
            raise TypeError(
                f"{layer}: expected integer indices (int32/int64), got dtype {idx.dtype}; "
                "convert with indices.astype(np.int64)"
            )
        return EmbeddingFn.apply(idx, self.weight, padding_idx=self.padding_idx, name=layer)

    def extra_repr(self) -> str:
        s = f"{self.num_embeddings}, {self.embedding_dim}"
        if self.padding_idx is not None:
            s += f", padding_idx={self.padding_idx}"
        return s
