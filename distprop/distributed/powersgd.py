"""PowerSGD: low-rank gradient compression with error feedback, as a DDP communication hook.

The maths, the defaults and the state follow PyTorch's
``torch/distributed/algorithms/ddp_comm_hooks/powerSGD_hook.py`` (Vogels et al., 2019,
https://arxiv.org/abs/1905.13727), so a run here and a run there with the same gradients and the
same initial Q give the same P, Q and error-feedback memories. For each bucket, once
``state.iter >= start_powerSGD_iter`` (plain averaging before):

1. add the bucket's error-feedback memory to its local gradient (``use_error_feedback``);
2. view each gradient as an ``n x m`` matrix (its first dimension by the rest); the ones where
   ``(n + m) * rank * min_compression_rate < n * m`` are compressed, the others (biases, small
   layers) are averaged with one plain allreduce;
3. Q (``m x rank``): the previous step's Q (``warm_start``), or standard normal values from a
   seed drawn from ``np.random.RandomState(random_seed)``; orthogonalised;
4. ``P = M Q``, allreduce (sum) of all P of the bucket, orthogonalise each P;
5. ``Q = M^T P``, allreduce of all Q, divided by the world size;
6. ``M ~= P Q^T`` is the averaged gradient; the error memory becomes the local input minus it.

Orthogonalisation: Gram-Schmidt for rank <= 2 (``orthogonalization_epsilon`` guards all-zero
columns), a QR factorisation (LAPACK, as ``torch.linalg.qr``) above.

Communication per compressed ``n x m`` gradient: ``(n + m) * rank`` values instead of ``n * m``,
in two allreduces; the second one (Q) runs when DDP waits for the bucket, at the end of backward.

:class:`PowerSGDState` is per rank (the error memories differ between ranks);
:meth:`PowerSGDState.state_dict` / :meth:`~PowerSGDState.load_state_dict` save and restore it,
and the trainer stores each rank's in its checkpoints.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import numpy as np

from distprop import backend
from distprop.distributed.hooks import Future, GradBucket

__all__ = ["PowerSGDState", "powerSGD_hook", "powersgd_compression"]

_log = logging.getLogger(__name__)


def _orthogonalize(matrix, epsilon: float = 0.0) -> None:
    """Make the columns of ``matrix`` (n x r, r <= n) orthonormal, in place."""
    xp = backend.get_array_module(matrix)
    rank = matrix.shape[1]
    if rank <= 2 or matrix.dtype == np.float16:
        _orthogonalize_gram_schmidt(matrix, epsilon)
    else:
        q, _ = xp.linalg.qr(matrix)
        matrix[...] = q


def _orthogonalize_gram_schmidt(matrix, epsilon: float = 0.0) -> None:
    xp = backend.get_array_module(matrix)
    cols = matrix.shape[1]
    for i in range(cols):
        col = matrix[:, i:i + 1]
        norm = xp.sqrt(xp.sum(col * col, axis=0, keepdims=True))
        with np.errstate(divide="ignore", invalid="ignore"):  # an all-zero column: see epsilon
            col /= norm if epsilon == 0 else norm + matrix.dtype.type(epsilon)
        if i + 1 < cols:
            rest = matrix[:, i + 1:]
            rest -= xp.sum(col * rest, axis=0, keepdims=True) * col


def _should_compress(n: int, m: int, rank: int, min_compression_rate: float) -> tuple:
    uncompressed, compressed = n * m, (n + m) * rank
    return compressed * min_compression_rate < uncompressed, uncompressed, compressed


def _standard_normal(seed: int, shapes: list[tuple], dtype) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(shape).astype(dtype, copy=False) for shape in shapes]


class PowerSGDState:
    """Hyperparameters and per-rank memories of :func:`powerSGD_hook` (PyTorch's names and
    defaults).

    Args:
        process_group: the communicator to reduce over (None: DDP's).
        matrix_approximation_rank: the rank of the approximation (1-4 typical; higher is more
            accurate and sends more).
        start_powerSGD_iter: plain averaging for this many synchronised backwards first.
        min_compression_rate: compress a gradient only when it shrinks by more than this.
        use_error_feedback: carry what the approximation missed into the next step.
        warm_start: start each step's power iteration from the previous Q.
        orthogonalization_epsilon: added to column norms (guards all-zero columns).
        random_seed: seeds the draw of the initial Q (identical on every rank).
        compression_stats_logging_frequency: log the compression rate every this many steps.
        q_init: ``q_init(seed, shapes, dtype) -> [host arrays]``, the standard normal initial
            Qs of one bucket (default: NumPy's ``default_rng(seed)``; a test can feed PyTorch's
            ``torch.randn`` draws here to follow its run exactly).

    Raises:
        ValueError: ``start_powerSGD_iter <= 1`` with error feedback or warm start (as PyTorch),
            or a rank below 1.
    """

    def __init__(self, process_group=None, matrix_approximation_rank: int = 1,
                 start_powerSGD_iter: int = 1_000, min_compression_rate: float = 2,
                 use_error_feedback: bool = True, warm_start: bool = True,
                 orthogonalization_epsilon: float = 0, random_seed: int = 0,
                 compression_stats_logging_frequency: int = 10_000,
                 q_init: Callable | None = None):
        if int(matrix_approximation_rank) < 1:
            raise ValueError(f"PowerSGD matrix_approximation_rank must be >= 1, got "
                             f"{matrix_approximation_rank}")
        if (use_error_feedback or warm_start) and start_powerSGD_iter <= 1:
            raise ValueError(
                "Expect `start_powerSGD_iter` > 1 if `use_error_feedback` or `warm_start` is "
                f"enabled (got {start_powerSGD_iter}): PowerSGD starts after plain averaging of "
                "the first step(s)")
        self.process_group = process_group
        self.matrix_approximation_rank = int(matrix_approximation_rank)
        self.start_powerSGD_iter = int(start_powerSGD_iter)
        self.min_compression_rate = min_compression_rate
        self.use_error_feedback = bool(use_error_feedback)
        self.warm_start = bool(warm_start)
        self.orthogonalization_epsilon = orthogonalization_epsilon
        self.random_seed = int(random_seed)
        self.rng = np.random.RandomState(random_seed)
        self.q_init = q_init or _standard_normal
        self.error_dict: dict = {}
        self.p_memory_dict: dict = {}
        self.q_memory_dict: dict = {}
        self.iter = 0
        self.total_numel_before_compression = 0
        self.total_numel_after_compression = 0
        self.compression_stats_logging_frequency = max(1, int(compression_stats_logging_frequency))
        self.next_stats_report = 0

    def maybe_increase_iter(self, bucket: GradBucket) -> None:
        """Count a synchronised backward (at its last bucket)."""
        if bucket.is_last():
            self.iter += 1
            if self.iter == self.start_powerSGD_iter:
                _log.info(f"PowerSGD: compressing from step {self.iter} on")

    def compression_stats(self) -> tuple[float, int, int]:
        """``(rate, numel before, numel after)`` over everything compressed so far."""
        after = self.total_numel_after_compression
        rate = self.total_numel_before_compression / after if after > 0 else 0
        return rate, self.total_numel_before_compression, after

    # -- checkpoints ----------------------------------------------------------------------------

    def state_dict(self) -> dict:
        """This rank's memories and counters (host arrays; for checkpoints)."""
        def host(d):
            return [[int(k), backend.to_host(v).copy()] for k, v in sorted(d.items())]

        name, keys, pos, has_gauss, gauss = self.rng.get_state()
        return {"kind": "powersgd", "matrix_approximation_rank": self.matrix_approximation_rank,
                "iter": self.iter, "rng": [name, keys, int(pos), int(has_gauss), float(gauss)],
                "error": host(self.error_dict), "p": host(self.p_memory_dict),
                "q": host(self.q_memory_dict),
                "numel": [int(self.total_numel_before_compression),
                          int(self.total_numel_after_compression)],
                "next_stats_report": int(self.next_stats_report)}

    def load_state_dict(self, state: dict, device=None) -> None:
        """Restore what :meth:`state_dict` returned.

        Raises:
            ValueError: not a PowerSGD state, or written with another rank.
        """
        if not isinstance(state, dict) or state.get("kind") != "powersgd":
            raise ValueError("not a PowerSGD state")
        if state.get("matrix_approximation_rank") != self.matrix_approximation_rank:
            raise ValueError(f"PowerSGD state has matrix_approximation_rank "
                             f"{state.get('matrix_approximation_rank')}, this run "
                             f"{self.matrix_approximation_rank}")
        dev = backend.CPU if device is None else backend.device(device)

        def back(items):
            return {int(k): (backend.to_device(np.asarray(v), dev) if dev.is_cuda
                             else np.array(v)) for k, v in items}

        name, keys, pos, has_gauss, gauss = state["rng"]
        rng = np.random.RandomState()
        rng.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, gauss))
        self.rng = rng
        self.iter = int(state["iter"])
        self.error_dict, self.p_memory_dict = back(state["error"]), back(state["p"])
        self.q_memory_dict = back(state["q"])
        self.total_numel_before_compression, self.total_numel_after_compression = state["numel"]
        self.next_stats_report = int(state["next_stats_report"])


def _finite(array) -> bool:
    xp = backend.get_array_module(array)
    return bool(xp.isfinite(array).all())


def _allreduce_mean(comm, tensor) -> Future:
    if comm.size > 1:
        tensor *= 1.0 / comm.size
    return Future.of(comm.iallreduce(tensor, "sum"), tensor)


def _start(comm, array):
    """A non-blocking sum of ``array`` (nothing to do when it is empty)."""
    return comm.iallreduce(array, "sum") if array.size else None


def powerSGD_hook(state: PowerSGDState, bucket: GradBucket) -> Future:
    """Average the bucket with PowerSGD (see the module docstring); returns a
    :class:`~distprop.distributed.hooks.Future` that writes the result into ``bucket.buffer()``.

    Register it with ``ddp.register_comm_hook(PowerSGDState(...), powerSGD_hook)`` or
    ``DistributedDataParallel(..., compression='powersgd')``.
    """
    comm = state.process_group if state.process_group is not None else bucket.comm
    world = comm.size
    input_tensor = bucket.buffer()
    if state.iter < state.start_powerSGD_iter:
        state.maybe_increase_iter(bucket)
        return _allreduce_mean(comm, input_tensor)

    xp = backend.get_array_module(input_tensor)
    dtype = input_tensor.dtype
    index = bucket.index()
    total = input_tensor.shape[0]
    input_copy = None
    if state.use_error_feedback:
        error = state.error_dict.get(index)
        if error is not None and error.shape[0] == total:
            input_tensor += error
        else:
            state.error_dict[index] = xp.zeros(total, dtype=dtype)
        input_copy = input_tensor.copy()

    rank_wanted = state.matrix_approximation_rank
    to_compress, uncompressed = [], []
    ps_size = qs_size = 0
    for tensor in bucket.gradients():
        if tensor.ndim == 0:
            uncompressed.append(tensor)
            state.total_numel_before_compression += 1
            state.total_numel_after_compression += 1
            continue
        matrix = tensor.reshape(tensor.shape[0], -1)
        n, m = matrix.shape
        r = min(n, m, rank_wanted)
        worth, before, after = _should_compress(n, m, r, state.min_compression_rate)
        state.total_numel_before_compression += before
        if worth:
            to_compress.append(matrix)
            ps_size += n * r
            qs_size += m * r
            state.total_numel_after_compression += after
        else:
            uncompressed.append(tensor)
            state.total_numel_after_compression += before
    if bucket.is_last() and state.iter >= state.next_stats_report:
        rate, before, after = state.compression_stats()
        _log.info(f"PowerSGD compression stats: step {state.iter}, {before} values before "
                  f"compression, {after} after, rate {rate:.3g}")
        state.next_stats_report = state.iter + state.compression_stats_logging_frequency

    uncompressed_memory = (xp.concatenate([t.reshape(-1) for t in uncompressed])
                           if uncompressed else xp.zeros(0, dtype=dtype))
    randomize = not state.warm_start or index not in state.p_memory_dict or \
        state.p_memory_dict[index].size != ps_size or state.q_memory_dict[index].size != qs_size
    if randomize:
        state.p_memory_dict[index] = xp.empty(ps_size, dtype=dtype)
        state.q_memory_dict[index] = xp.empty(qs_size, dtype=dtype)
    by_shape: dict[tuple, list] = {}
    for matrix in to_compress:  # PyTorch's order: grouped by shape, first appearance first
        by_shape.setdefault(tuple(matrix.shape), []).append(matrix)
    matrices, ps, qs = [], [], []
    p_at = q_at = 0
    p_memory, q_memory = state.p_memory_dict[index], state.q_memory_dict[index]
    for group in by_shape.values():
        for matrix in group:
            n, m = matrix.shape
            r = min(n, m, rank_wanted)
            matrices.append(matrix)
            ps.append(p_memory[p_at:p_at + n * r].reshape(n, r))
            qs.append(q_memory[q_at:q_at + m * r].reshape(m, r))
            p_at += n * r
            q_at += m * r
    if randomize:
        seed = int(state.rng.randint(1_000_000_000))
        for q, values in zip(qs, state.q_init(seed, [tuple(q.shape) for q in qs], dtype)):
            q[...] = xp.asarray(values, dtype=dtype)
            _orthogonalize(q, state.orthogonalization_epsilon)
    else:
        for q in qs:
            _orthogonalize(q, state.orthogonalization_epsilon)
    for matrix, q, p in zip(matrices, qs, ps):
        xp.matmul(matrix, q, out=p)
    uncompressed_request = _start(comm, uncompressed_memory)
    p_request = _start(comm, p_memory)

    def finish():
        if uncompressed_request is not None:
            uncompressed_request.wait()
            uncompressed_memory[...] *= 1.0 / world
            at = 0
            for tensor in uncompressed:
                tensor[...] = uncompressed_memory[at:at + tensor.size].reshape(tensor.shape)
                at += tensor.size
        if p_request is not None:
            p_request.wait()
        for p in ps:
            _orthogonalize(p, state.orthogonalization_epsilon)
        for matrix, p, q in zip(matrices, ps, qs):
            xp.matmul(matrix.T, p, out=q)
        if q_memory.size:
            comm.iallreduce(q_memory, "sum").wait()
            q_memory[...] *= 1.0 / world
        for p, q, matrix in zip(ps, qs, matrices):
            xp.matmul(p, q.T, out=matrix)
        if state.use_error_feedback:
            state.error_dict[index] = input_copy - input_tensor
        if not _finite(input_tensor):  # (the same verdict on every rank: an averaged result)
            # an inf/NaN step (DDP raises or skips it; a GradScaler backs off) must not poison
            # the following ones through the memories: start this bucket afresh
            state.error_dict.pop(index, None)
            state.p_memory_dict.pop(index, None)
            state.q_memory_dict.pop(index, None)
        if not state.warm_start:
            state.p_memory_dict.clear()
            state.q_memory_dict.clear()
        state.maybe_increase_iter(bucket)
        return input_tensor

    return Future(finish)


def powersgd_compression(comm, **options) -> tuple[PowerSGDState, Callable]:
    """``--compression powersgd``: ``(PowerSGDState(comm, **options), powerSGD_hook)``."""
    return PowerSGDState(comm, **options), powerSGD_hook
