"""Datasets: the map-style base class, array-backed datasets and subsets.

An *array-backed* dataset exposes ``arrays`` (a tuple of NumPy arrays or memory maps that share
their first dimension). :class:`~distprop.data.DataLoader` gathers a whole batch from such a
dataset with one fancy-indexing operation per array instead of a Python loop over samples, and a
memory-mapped array only reads the rows a batch asks for.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from distprop import backend
from distprop.tensor import Tensor


class Dataset:
    """A map-style dataset: ``dataset[i]`` is one sample and ``len(dataset)`` the sample count.

    Subclasses implement ``__getitem__`` and ``__len__``. A subclass that can gather many samples
    at once may set ``arrays`` (see :class:`TensorDataset`) to get vectorised batching.
    """

    arrays: tuple[np.ndarray, ...] | None = None

    def __getitem__(self, index):  # pragma: no cover - abstract
        raise NotImplementedError(f"{type(self).__name__} does not implement __getitem__")

    def __len__(self) -> int:  # pragma: no cover - abstract
        raise NotImplementedError(f"{type(self).__name__} does not implement __len__")


def _host_array(value, position: int) -> np.ndarray:
    if isinstance(value, Tensor):
        return backend.to_host(value.data)
    if isinstance(value, np.ndarray):  # includes np.memmap: kept as is, never copied
        return value
    if hasattr(value, "shape") and hasattr(value, "dtype"):
        return backend.to_host(value)
    array = np.asarray(value)
    if array.dtype == object:
        raise TypeError(f"TensorDataset: array {position} has object dtype; pass numbers")
    return array


class TensorDataset(Dataset):
    """Samples are the rows of equally long arrays (``TensorDataset(x, y)``).

    Args:
        *tensors: Tensors or NumPy arrays (memory maps included) with the same first dimension.
            They are kept on the host; batches move to a device in the loader or the trainer.
        dtypes: optional per-array dtype (or None) that gathered batches are cast to, so a
            memory-mapped float64 or uint8 file yields float32 batches without a full copy.

    Raises:
        ValueError: when no array is given, an array is 0-d, or first dimensions differ.
    """

    def __init__(self, *tensors, dtypes=None):
        if not tensors:
            raise ValueError("TensorDataset needs at least one tensor")
        arrays = tuple(_host_array(t, i) for i, t in enumerate(tensors))
        for i, a in enumerate(arrays):
            if a.ndim == 0:
                raise ValueError(f"TensorDataset: tensor {i} is 0-d; every tensor needs a "
                                 "first (sample) dimension")
        sizes = [a.shape[0] for a in arrays]
        if len(set(sizes)) != 1:
            shapes = ", ".join(str(tuple(a.shape)) for a in arrays)
            raise ValueError(f"Size mismatch between tensors: first dimensions differ ({shapes})")
        if dtypes is not None and len(dtypes) != len(arrays):
            raise ValueError(f"TensorDataset: {len(dtypes)} dtypes for {len(arrays)} tensors")
        self.arrays = arrays
        self.dtypes = None if dtypes is None else tuple(
            None if d is None else np.dtype(d) for d in dtypes)

    def _cast(self, i: int, value: np.ndarray) -> np.ndarray:
        if self.dtypes is not None and self.dtypes[i] is not None:
            return value.astype(self.dtypes[i], copy=False)
        return value

    @property
    def tensors(self) -> tuple[Tensor, ...]:
        return tuple(Tensor(self._cast(i, np.asarray(a))) for i, a in enumerate(self.arrays))

    def __len__(self) -> int:
        return int(self.arrays[0].shape[0])

    def __getitem__(self, index):
        return tuple(Tensor(self._cast(i, np.asarray(a[index])))
                     for i, a in enumerate(self.arrays))

    def __repr__(self) -> str:
        shapes = ", ".join(f"{tuple(a.shape)} {a.dtype}" for a in self.arrays)
        return f"TensorDataset({shapes})"


class Subset(Dataset):
    """The samples of ``dataset`` at ``indices``, in that order.

    A subset of an array-backed dataset stays array-backed: a batch is still gathered with one
    indexing operation per array (through the composed indices), so a memory-mapped source is
    read only at the rows a batch needs.
    """

    def __init__(self, dataset: Dataset, indices: Sequence[int] | np.ndarray):
        idx = np.asarray(indices, dtype=np.intp).reshape(-1)
        n = len(dataset)
        if idx.size and (idx.min() < -n or idx.max() >= n):
            raise IndexError(f"Subset indices out of range for a dataset of {n} samples")
        self.dataset = dataset
        self.indices = np.where(idx < 0, idx + n, idx)

    @property
    def arrays(self):  # type: ignore[override]
        return getattr(self.dataset, "arrays", None)

    def gather(self, batch_indices: np.ndarray) -> tuple[np.ndarray, ...]:
        """Rows ``batch_indices`` of this subset from each underlying array."""
        rows = self.indices[batch_indices]
        if isinstance(self.dataset, Subset):
            return self.dataset.gather(rows)
        return gather(self.dataset, rows)

    def __len__(self) -> int:
        return int(self.indices.shape[0])

    def __getitem__(self, index):
        if isinstance(index, (list, np.ndarray)):
            return Subset(self.dataset, self.indices[np.asarray(index)])
        return self.dataset[int(self.indices[index])]

    def __repr__(self) -> str:
        return f"Subset({len(self)} of {self.dataset!r})"


def is_array_backed(dataset) -> bool:
    """Whether ``dataset`` can gather a batch with one indexing operation per array."""
    return getattr(dataset, "arrays", None) is not None


def gather(dataset, indices: np.ndarray) -> tuple[np.ndarray, ...]:
    """Rows ``indices`` of an array-backed dataset, one array per field (host NumPy)."""
    if isinstance(dataset, Subset):
        return dataset.gather(indices)
    idx = np.asarray(indices, dtype=np.intp)
    dtypes = getattr(dataset, "dtypes", None) or (None,) * len(dataset.arrays)
    out = []
    for a, dtype in zip(dataset.arrays, dtypes):
        if isinstance(a, np.memmap) and idx.size > 1:
            # Read rows in file order (fewer, forward-only page faults), then restore the order.
            order = np.argsort(idx, kind="stable")
            rows = np.asarray(a[idx[order]])
            restored = np.empty_like(rows)
            restored[order] = rows
            batch = restored
        else:
            batch = np.asarray(a[idx])
        out.append(batch if dtype is None else batch.astype(dtype, copy=False))
    return tuple(out)


def split_indices(n: int, fractions: Sequence[float], seed: int = 0) -> list[np.ndarray]:
    """Deterministic random split of ``range(n)`` into parts (sorted index arrays).

    Args:
        n: number of samples.
        fractions: either fractions (floats summing to at most 1; when they sum to 1 the last
            part takes the rounding remainder) or integer lengths summing to ``n``.
        seed: the permutation seed; the same arguments give the same parts everywhere.

    Raises:
        ValueError: when a fraction is negative, they sum to more than 1, lengths do not sum to
            ``n``, or a requested part would be empty.
    """
    values = list(fractions)
    perm = np.random.default_rng(int(seed)).permutation(n)
    if values and all(isinstance(v, (int, np.integer)) for v in values):
        counts = [int(v) for v in values]
        if any(c < 0 for c in counts) or sum(counts) != n:
            raise ValueError(f"split lengths {counts} must be >= 0 and sum to {n}")
    else:
        values = [float(f) for f in values]
        if any(f < 0 for f in values) or sum(values) > 1.0 + 1e-9:
            raise ValueError(f"split fractions must be >= 0 and sum to at most 1, got {values}")
        counts = [int(round(f * n)) for f in values]
        if abs(sum(values) - 1.0) < 1e-9:
            counts[-1] = n - sum(counts[:-1])
        for f, c in zip(values, counts):
            if f > 0 and c <= 0:
                raise ValueError(f"split fraction {f} of {n} samples leaves an empty part")
    parts, start = [], 0
    for c in counts:
        parts.append(np.sort(perm[start : start + c]))
        start += c
    return parts


def random_split(dataset: Dataset, lengths: Sequence[float], seed: int = 0) -> list[Subset]:
    """Split a dataset into :class:`Subset` parts (fractions or lengths; deterministic)."""
    return [Subset(dataset, idx) for idx in split_indices(len(dataset), lengths, seed)]
