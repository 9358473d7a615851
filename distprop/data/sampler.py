"""DistributedSampler: each rank's share of every epoch, with PyTorch's semantics."""

from __future__ import annotations

import math
from collections.abc import Iterator

import numpy as np


class DistributedSampler:
    """Split a dataset's indices across ranks, the same permutation on every rank.

    As ``torch.utils.data.DistributedSampler``: with ``shuffle`` the indices are permuted by a
    generator seeded with ``seed + epoch`` (call :meth:`set_epoch` each epoch); then the list is
    padded by wrapping around to a multiple of ``num_replicas`` (or, with ``drop_last``, its
    tail is dropped) and rank ``r`` takes every ``num_replicas``-th index starting at ``r``, so
    every rank gets ``len(sampler)`` indices and runs the same number of steps. The permutation
    comes from NumPy's PCG64 (``np.random.default_rng(seed + epoch).permutation``), so the order
    differs from PyTorch's for the same seed; the counts, padding and strides are the same.

    Evaluation mode (``pad=False``): no padding and no dropping; rank ``r`` visits indices
    ``r, r + num_replicas, ...``, so every sample is seen exactly once across ranks (ranks may
    then get one sample less than others: reduce metrics with ``MetricsReducer`` after the loop,
    not a collective per batch).

    Args:
        dataset: anything with ``len``.
        num_replicas: number of ranks (default: the world size).
        rank: this rank (default: the world rank).
        shuffle: permute the indices each epoch.
        seed: base seed; must be the same on every rank.
        drop_last: drop the tail instead of padding (ignored with ``pad=False``).
        pad: False for the evaluation mode described above.
    """

    def __init__(self, dataset, num_replicas: int | None = None, rank: int | None = None,
                 shuffle: bool = True, seed: int = 0, drop_last: bool = False, pad: bool = True):
        if num_replicas is None or rank is None:
            from distprop import distributed  # noqa: PLC0415

            if num_replicas is None:
                num_replicas = distributed.get_world_size()
            if rank is None:
                rank = distributed.get_rank()
        if num_replicas < 1:
            raise ValueError(f"num_replicas must be at least 1, got {num_replicas}")
        if rank >= num_replicas or rank < 0:
            raise ValueError(
                f"Invalid rank {rank}, rank should be in the interval [0, {num_replicas - 1}]"
            )
        self.dataset = dataset
        self.num_replicas, self.rank = int(num_replicas), int(rank)
        self.shuffle, self.seed, self.drop_last, self.pad = bool(shuffle), int(seed), \
            bool(drop_last), bool(pad)
        self.epoch = 0
        n = len(dataset)
        if not self.pad:
            self.num_samples = len(range(self.rank, n, self.num_replicas))
            self.total_size = n
        else:
            if self.drop_last and n % self.num_replicas != 0:
                self.num_samples = math.ceil((n - self.num_replicas) / self.num_replicas)
            else:
                self.num_samples = math.ceil(n / self.num_replicas)
            self.total_size = self.num_samples * self.num_replicas

    def indices(self) -> np.ndarray:
        """This rank's indices for the current epoch, as an int64 array."""
        n = len(self.dataset)
        if self.shuffle:
            order = np.random.default_rng(self.seed + self.epoch).permutation(n)
        else:
            order = np.arange(n)
        if self.pad:
            if not self.drop_last:
                padding = self.total_size - n
                if padding > 0:
                    order = np.concatenate([order, np.resize(order, padding)])
            else:
                order = order[: self.total_size]
            if order.size != self.total_size:
                raise AssertionError(f"sampler built {order.size} indices, not {self.total_size}")
        mine = order[self.rank : self.total_size : self.num_replicas]
        return mine.astype(np.int64, copy=False)

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices().tolist())

    def __len__(self) -> int:
        return self.num_samples

    def set_epoch(self, epoch: int) -> None:
        """Reshuffle for ``epoch`` (the same on every rank)."""
        self.epoch = int(epoch)

    def __repr__(self) -> str:
        return (f"DistributedSampler(num_replicas={self.num_replicas}, rank={self.rank}, "
                f"shuffle={self.shuffle}, seed={self.seed}, drop_last={self.drop_last}, "
                f"pad={self.pad}, epoch={self.epoch})")
