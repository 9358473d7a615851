"""DataLoader: batches of samples as Tensors, optionally prefetched by a background thread."""

from __future__ import annotations

import math
import queue
import threading
from collections.abc import Callable, Iterable, Iterator

import numpy as np

from distprop import backend
from distprop.data.dataset import gather, is_array_backed
from distprop.tensor import Tensor


def collate_numpy(samples: list):
    """Stack a list of samples (tuples/dicts/arrays/Tensors/numbers) into NumPy arrays."""
    first = samples[0]
    if isinstance(first, tuple | list):
        return type(first)(collate_numpy([s[i] for s in samples]) for i in range(len(first)))
    if isinstance(first, dict):
        return {k: collate_numpy([s[k] for s in samples]) for k in first}
    if isinstance(first, Tensor):
        return np.stack([backend.to_host(s.data) for s in samples])
    return np.stack([np.asarray(s) for s in samples])


def to_tensors(batch, device=None, sync_host: bool = True):
    """Turn NumPy arrays (possibly nested in tuples/lists/dicts) into Tensors on ``device``.

    To a GPU the arrays go through pinned host buffers with an asynchronous copy on a separate
    stream (:func:`distprop.placement.batch_to_device`); ``sync_host`` makes the calling thread
    wait for the copy (for a prefetch thread), else the current stream waits for it.
    """
    if device is not None and backend.device(device).is_cuda:
        from distprop import placement

        staged = placement.batch_to_device(batch, backend.device(device), sync_host)
        return _wrap_device(staged)
    if isinstance(batch, tuple | list):
        return type(batch)(to_tensors(b, device) for b in batch)
    if isinstance(batch, dict):
        return {k: to_tensors(v, device) for k, v in batch.items()}
    return Tensor._wrap(np.ascontiguousarray(batch))


def _wrap_device(batch):
    """Device arrays (possibly nested) as Tensors."""
    if isinstance(batch, tuple | list):
        return type(batch)(_wrap_device(b) for b in batch)
    if isinstance(batch, dict):
        return {k: _wrap_device(v) for k, v in batch.items()}
    return Tensor._wrap(batch)


class DataLoader:
    """Iterate over a dataset in mini-batches of Tensors.

    Array-backed datasets (``TensorDataset``, their ``Subset``s, the sources in
    ``dp.data.sources``) are batched with one fancy-indexing gather per array: no Python loop over
    samples, and a memory-mapped file is read only at the rows of the batch. Other datasets are
    indexed sample by sample and stacked by ``collate_fn``.

    Args:
        dataset: a map-style dataset.
        batch_size: samples per batch.
        shuffle: reshuffle every epoch, drawing the permutation from the global generator
            (``dp.manual_seed``). Mutually exclusive with ``sampler``.
        sampler: an iterable of indices with ``len`` (e.g. ``DistributedSampler``); its
            ``set_epoch`` is reached through :meth:`set_epoch`.
        drop_last: drop the last incomplete batch.
        prefetch: number of batches a background thread prepares ahead (0 = none).
        collate_fn: maps a list of samples to NumPy arrays (non-array-backed datasets only).
        device: move each batch to this device once (in the prefetch thread when prefetching);
            to a GPU through pinned host memory and an asynchronous copy on its own stream.

    Raises:
        ValueError: on a non-positive batch size, a negative prefetch, or shuffle with a sampler.
    """

    def __init__(
        self,
        dataset,
        batch_size: int = 1,
        shuffle: bool = False,
        sampler: Iterable[int] | None = None,
        drop_last: bool = False,
        prefetch: int = 0,
        collate_fn: Callable | None = None,
        device=None,
    ):
        if not isinstance(batch_size, int | np.integer) or batch_size <= 0:
            raise ValueError(f"batch_size should be a positive integer, got {batch_size!r}")
        if prefetch < 0:
            raise ValueError(f"prefetch should be >= 0, got {prefetch}")
        if shuffle and sampler is not None:
            raise ValueError("sampler option is mutually exclusive with shuffle")
        self.dataset = dataset
        self.batch_size = int(batch_size)
        self.shuffle = bool(shuffle)
        self.sampler = sampler
        self.drop_last = bool(drop_last)
        self.prefetch = int(prefetch)
        self.collate_fn = collate_fn or collate_numpy
        self.device = device
        self._start_batch = 0

    # --- epoch / position ---------------------------------------------------------------------

    def set_epoch(self, epoch: int) -> None:
        """Forward the epoch to the sampler (a ``DistributedSampler`` reshuffles with it)."""
        if self.sampler is not None and hasattr(self.sampler, "set_epoch"):
            self.sampler.set_epoch(epoch)

    def skip_batches(self, count: int) -> None:
        """Start the next iteration ``count`` batches in (resuming mid-epoch).

        The skipped batches are never gathered: only their indices are discarded.
        """
        if count < 0:
            raise ValueError(f"skip_batches expects count >= 0, got {count}")
        self._start_batch = int(count)

    def _indices(self) -> np.ndarray:
        if self.sampler is not None:
            if callable(getattr(self.sampler, "indices", None)):  # DistributedSampler: no loop
                return np.asarray(self.sampler.indices(), dtype=np.intp)
            return np.fromiter(iter(self.sampler), dtype=np.intp)
        n = len(self.dataset)
        if self.shuffle:
            return backend.generator().permutation(n).astype(np.intp)
        return np.arange(n, dtype=np.intp)

    def _num_samples(self) -> int:
        return len(self.sampler) if self.sampler is not None else len(self.dataset)

    def __len__(self) -> int:
        n = self._num_samples()
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    # --- batches ------------------------------------------------------------------------------

    def _batch_slices(self) -> list[np.ndarray]:
        indices = self._indices()
        n = indices.shape[0]
        stop = n - n % self.batch_size if self.drop_last else n
        bounds = range(0, stop, self.batch_size)
        batches = [indices[i : i + self.batch_size] for i in bounds]
        start, self._start_batch = self._start_batch, 0
        return batches[start:]

    def _load(self, idx: np.ndarray):
        if is_array_backed(self.dataset):
            arrays = gather(self.dataset, idx)
            batch = arrays if len(arrays) > 1 else arrays[0]
        else:
            batch = self.collate_fn([self.dataset[int(i)] for i in idx])
        # A prefetch thread waits for its host-to-device copies; the consumer never does.
        return to_tensors(batch, self.device, sync_host=self.prefetch > 0)

    def __iter__(self) -> Iterator:
        batches = self._batch_slices()  # indices are drawn here, in the caller's thread
        if self.prefetch == 0:
            return (self._load(idx) for idx in batches)
        return _PrefetchIterator(self._load, batches, self.prefetch)

    def __repr__(self) -> str:
        return (f"DataLoader(batch_size={self.batch_size}, shuffle={self.shuffle}, "
                f"drop_last={self.drop_last}, prefetch={self.prefetch}, batches={len(self)})")


_END = object()


class _PrefetchIterator:
    """Runs ``load(idx)`` for each batch in a daemon thread, at most ``depth`` batches ahead."""

    def __init__(self, load, batches, depth: int):
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._work, args=(load, batches), daemon=True,
                                        name="distprop-prefetch")
        self._thread.start()
        self._done = False

    def _put(self, item) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _work(self, load, batches) -> None:
        try:
            for idx in batches:
                if not self._put(("ok", load(idx))):
                    return
        except BaseException as exc:  # re-raised in the consumer thread
            self._put(("error", exc))
            return
        self._put(("end", _END))

    def __iter__(self):
        return self

    def __next__(self):
        if self._done:
            raise StopIteration
        kind, value = self._queue.get()
        if kind == "ok":
            return value
        self._done = True
        self._thread.join()
        if kind == "error":
            raise value
        raise StopIteration

    def close(self) -> None:
        """Stop the background thread (called when iteration is abandoned early)."""
        self._stop.set()
        self._done = True
        self._thread.join(timeout=5)

    def __del__(self):
        self._stop.set()
