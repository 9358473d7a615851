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

    Resuming mid-epoch (:meth:`set_start`): the first ``start`` samples of the epoch's global
    order (the permutation above, before padding) are skipped and the rest is split the same way,
    padded by wrapping around to the epoch's first samples. Rank ``r`` then takes
    ``order[start + r :: num_replicas]``, so with a global batch of ``batch * num_replicas``
    samples, global batch ``k`` is ``order[start + k * B : start + (k + 1) * B]`` whatever the
    number of ranks: a run stopped after ``start`` samples continues on any world size with
    every remaining sample of the epoch seen once (plus the padding that evens out the ranks).

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
            from distprop import distributed

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
        self.start = 0
        self._size()

    def _size(self) -> None:
        """``num_samples`` (this rank's share) and ``total_size`` (all ranks', padded) of the
        samples from ``start`` to the end of the epoch."""
        n = len(self.dataset) - self.start
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
        rest = order[self.start :]
        if self.pad:
            if not self.drop_last:
                padding = self.total_size - rest.size
                if padding > 0:
                    rest = np.concatenate([rest, np.resize(order, padding)])
            else:
                rest = rest[: self.total_size]
            if rest.size != self.total_size:
                raise AssertionError(f"sampler built {rest.size} indices, not {self.total_size}")
        mine = rest[self.rank : self.total_size : self.num_replicas]
        return mine.astype(np.int64, copy=False)

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices().tolist())

    def __len__(self) -> int:
        return self.num_samples

    def set_epoch(self, epoch: int) -> None:
        """Reshuffle for ``epoch`` (the same on every rank), starting at its first sample."""
        self.epoch = int(epoch)
        if self.start:
            self.set_start(0)

    def set_start(self, start: int) -> None:
        """Begin the current epoch ``start`` samples into its global order (resume mid-epoch).

        ``start`` counts samples of the epoch's whole permutation, consumed by all ranks
        together, so it means the same on any number of ranks; ``set_epoch`` resets it to 0.

        Raises:
            ValueError: when ``start`` is not in ``[0, len(dataset)]``.
        """
        n = len(self.dataset)
        if isinstance(start, bool) or not isinstance(start, int | np.integer) \
                or not 0 <= start <= n:
            raise ValueError(f"set_start: start must be an integer in [0, {n}] (the samples of "
                             f"one epoch), got {start!r}")
        self.start = int(start)
        self._size()

    def __repr__(self) -> str:
        return (f"DistributedSampler(num_replicas={self.num_replicas}, rank={self.rank}, "
                f"shuffle={self.shuffle}, seed={self.seed}, drop_last={self.drop_last}, "
                f"pad={self.pad}, epoch={self.epoch}, start={self.start})")
