"""DistributedDataParallel: bucketed, overlapped gradient averaging over a communicator.

How one synchronised step runs:

1. ``forward`` (through the wrapper) broadcasts rank 0's buffers when they may have drifted and
   arms gradient synchronisation for the next backward (not inside :meth:`no_sync`).
2. During backward, a post-accumulate-grad hook per parameter counts finished gradients per
   bucket. A bucket is a contiguous slice of the flat gradient buffer (reverse registration
   order, first bucket ~``first_bucket_mb``, then ~``bucket_cap_mb``); as soon as all its
   gradients are final it is divided by the world size and a non-blocking allreduce starts on
   the slice itself (no packing copy). Buckets start in one fixed order on every rank: a bucket
   that completes early waits for the ones before it. The communicator's progress thread (and
   the hooks) keep MPI moving those allreduces while backward computes. With node-shared
   buffers (``comm='shm'``, the default where ranks share a node and gradients are CPU
   floats) the bucket goes to :class:`~distprop.distributed.shm.ShmReducer` instead, whose
   gradient storage is one shared-memory window per node.
3. At the end of backward (a ``queue_callback``), parameters that got no gradient are handled,
   remaining buckets start, and DDP waits for all of them, so ``loss.backward()`` returns with
   averaged gradients: the optimizer step and the next forward can never see unsynchronised
   ones. Overlap happens during backward; ``last_sync`` records how long the end wait took.
4. A non-finite check on the averaged gradient (identical on every rank) raises, or zeroes the
   gradient and sets ``step_ok = False`` so the training loop skips the optimizer step. After a
   :class:`distprop.amp.GradScaler` scaled the loss it only sets ``step_ok = False`` and leaves
   the gradients to the scaler, which skips the step and backs off on every rank alike.
"""

from __future__ import annotations

import contextlib
import functools
import math
import time
import weakref

import numpy as np

from distprop import amp, backend, trace
from distprop.distributed import compression as _codec
from distprop.distributed import guards, shm, world
from distprop.distributed.comm import Communicator
from distprop.distributed.consistency import broadcast_state, check_same_model
from distprop.flat import flatten, slot_of
from distprop.nn.module import Module
from distprop.tensor import Tensor, is_grad_enabled, queue_callback

_MB = 1 << 20

# id(parameter) -> the DDP whose hooks it carries (weakly: a dropped wrapper frees its slot).
_OWNERS: weakref.WeakValueDictionary = weakref.WeakValueDictionary()


def owner_of(param: Tensor) -> DistributedDataParallel | None:
    """The live :class:`DistributedDataParallel` whose gradient hooks ``param`` carries (the
    latest wrapper of its model), or None when no DDP syncs its gradient.

    :class:`~distprop.distributed.ZeroRedundancyOptimizer` uses it to know whether gradients
    arrive averaged over its ranks.
    """
    return _OWNERS.get(id(param))


class _Bucket:
    """A contiguous slice ``[start, stop)`` of one flat gradient buffer."""

    __slots__ = ("buffer", "start", "stop", "params", "remaining", "request", "stage", "view",
                 "launched", "launch_ns")

    def __init__(self, buffer, start: int, stop: int, params: list[int]):
        self.buffer, self.start, self.stop, self.params = buffer, start, stop, params
        self.view = buffer.grad[start:stop]
        self.remaining = len(params)
        self.request = None
        self.stage = None
        self.launched = False

    @property
    def nbytes(self) -> int:
        return (self.stop - self.start) * self.buffer.dtype.itemsize


class DistributedDataParallel(Module):
    """Replicate ``module`` on every rank and average its gradients during backward.

    Args:
        module: the model; every rank must build the same one (checked at construction).
        bucket_cap_mb: target size of the gradient buckets after the first (MiB).
        first_bucket_mb: target size of the first bucket, which becomes ready first (MiB).
        overlap: start each bucket's allreduce during backward as soon as it is complete;
            False waits until backward has finished and then reduces each flat buffer with one
            allreduce (the bucket sizes are then ignored).
        compression: None, ``'fp16'`` or ``'bf16'``: send buckets as 16-bit floats (divided by
            the world size first) and write the averaged values back into the gradient buffer.
        broadcast_buffers: broadcast rank 0's buffers (e.g. BatchNorm running statistics) at the
            start of each training forward (and of the first forward after training).
        find_unused_parameters: treat parameters that got no gradient as zero gradients; if
            False, such parameters raise an error naming them, on every rank.
        nonfinite: ``'raise'`` (FloatingPointError on every rank), ``'skip'`` (zero the
            gradients and set ``step_ok = False``; skip ``optimizer.step()`` then) or None (no
            check) for a non-finite averaged gradient.
        check_replicas_every: every this many training forwards, compare a checksum of the
            parameters across ranks and raise naming diverged ranks (0 disables).
        comm: the communicator (default: ``distprop.distributed.init()``), or how to reduce
            GPU gradients: ``'auto'``, ``'nccl'``, ``'mpi-cuda'`` or ``'mpi-host'`` (see
            :func:`distprop.distributed.selection.make_comm`), or ``'shm'``: CPU gradients of
            ranks sharing a node live in one node-shared window and are reduced there (then
            across nodes by MPI; :mod:`distprop.distributed.shm`). With the default comm,
            ``DISTPROP_INTRA_NODE`` (``auto``, ``shm`` or ``mpi``) chooses.

    ``state_dict()`` keys are the wrapped module's keys without a ``module.`` prefix, so
    checkpoints load into the bare model; ``load_state_dict`` also accepts ``module.``-prefixed
    keys as written by PyTorch's DDP.
    """

    def __init__(self, module: Module, bucket_cap_mb: float = 25.0, first_bucket_mb: float = 1.0,
                 overlap: bool = True, compression: str | None = None,
                 broadcast_buffers: bool = True, find_unused_parameters: bool = False,
                 nonfinite: str | None = "raise", check_replicas_every: int = 0,
                 comm: Communicator | str | None = None):
        super().__init__()
        if not isinstance(module, Module):
            raise TypeError(f"DistributedDataParallel wraps a Module, got {type(module).__name__}")
        if compression not in (None, *_codec.KINDS):
            raise ValueError(f"compression must be None, 'fp16' or 'bf16', got {compression!r}")
        if nonfinite not in (None, "raise", "skip"):
            raise ValueError(f"nonfinite must be 'raise', 'skip' or None, got {nonfinite!r}")
        if bucket_cap_mb <= 0 or first_bucket_mb <= 0:
            raise ValueError(
                f"bucket sizes must be positive, got bucket_cap_mb={bucket_cap_mb}, "
                f"first_bucket_mb={first_bucket_mb}"
            )
        self._intra = None  # None (DISTPROP_INTRA_NODE decides), 'shm' or 'mpi'
        if isinstance(comm, str) and comm.lower() == "shm":  # node-shared gradient buffers
            self._intra, comm = "shm", None
        elif comm is not None:
            self._intra = "mpi"  # an explicit communicator reduces everything itself
        if isinstance(comm, str):  # 'auto', 'nccl', 'mpi-cuda', 'mpi-host': for the model's device
            from distprop.distributed.selection import make_comm

            first = next(iter(module.parameters()), None)
            comm = make_comm(comm, device=None if first is None else first.device)
        if comm is None:
            comm = world.init()
        self.module = module
        self.comm = comm
        self.bucket_cap_mb, self.first_bucket_mb = float(bucket_cap_mb), float(first_bucket_mb)
        self.overlap, self.compression = bool(overlap), compression
        self.broadcast_buffers = bool(broadcast_buffers)
        self.find_unused_parameters = bool(find_unused_parameters)
        self.nonfinite, self.check_replicas_every = nonfinite, int(check_replicas_every)
        #: False inside :meth:`no_sync`: the next backward accumulates locally.
        self.require_backward_grad_sync = True
        #: False after a step whose averaged gradient was non-finite under ``nonfinite='skip'``.
        self.step_ok = True
        self.skipped_steps = 0
        #: Timings of the last synchronisation (seconds): ``wait_s`` (end-of-backward wait for
        #: the allreduces), ``finish_s`` (the whole end-of-backward work), ``overlapped``
        #: (buckets started during backward) and ``buckets``.
        self.last_sync: dict = {}
        self._reducer: shm.ShmReducer | None = None

        self._names = [n for n, p in module.named_parameters() if p.requires_grad]
        self._params = [p for _, p in module.named_parameters() if p.requires_grad]
        check_same_model(module, comm)
        self._build_layout(force_flatten=True)
        broadcast_state(module, self._flat_buffers, comm)
        self._mode = None  # None | "sync" | "local": what the next backward does
        self._callback_queued = False
        self._forwards = 0
        self._buffers_dirty = False
        for previous in {id(o): o for p in self._params
                         if (o := _OWNERS.get(id(p))) is not None}.values():
            previous._remove_hooks()  # re-wrapping a model replaces the earlier wrapper
        self._hook_handles = [
            p.register_post_accumulate_grad_hook(functools.partial(self._on_grad_ready, i))
            for i, p in enumerate(self._params)
        ]
        for p in self._params:
            _OWNERS[id(p)] = self
        self._reset_backward_state()

    def _remove_hooks(self) -> None:
        for handle in self._hook_handles:
            handle.remove()
        self._hook_handles = []

    # -- layout -------------------------------------------------------------------------------

    def _build_layout(self, force_flatten: bool = False) -> None:
        """Buckets over wherever the parameters live now (flattening them if they are not)."""
        params = self._params
        keep = None  # holds new buffers until self._flat_buffers does (slots are weak)
        if force_flatten or any(slot_of(p) is None for p in params):
            keep = flatten(params)
        slots = [slot_of(p) for p in params]
        seen, buffers = set(), []
        for s in slots:
            if id(s.buffer) not in seen:
                seen.add(id(s.buffer))
                buffers.append(s.buffer)
        self._flat_buffers = buffers  # keeps the buffers alive (slots refer to them weakly)
        del keep
        itemsize = {id(b): b.dtype.itemsize for b in buffers}
        first_cap = min(self.first_bucket_mb, self.bucket_cap_mb) * _MB
        cap = self.bucket_cap_mb * _MB
        if not self.overlap:  # nothing to overlap with: one allreduce per flat buffer
            first_cap = cap = math.inf
        buckets: list[_Bucket] = []
        current: list[int] = []

        def close():
            if current:
                ss = [slots[i] for i in current]
                start = min(s.offset for s in ss)
                stop = max(s.offset + s.numel for s in ss)
                buckets.append(_Bucket(ss[0].buffer, start, stop, list(current)))
                current.clear()

        size = 0
        for i in reversed(range(len(params))):
            s = slots[i]
            nbytes = s.numel * itemsize[id(s.buffer)]
            limit = first_cap if not buckets else cap
            if current:
                prev = slots[current[-1]]
                contiguous = prev.buffer is s.buffer and prev.index == s.index + 1
                if not contiguous or size + nbytes > limit:
                    close()
                    size = 0
            current.append(i)
            size += nbytes
        close()
        self._buckets = buckets
        self._bucket_of = [0] * len(params)
        for k, b in enumerate(buckets):
            for i in b.params:
                self._bucket_of[i] = k
        if self.compression:
            for b in buckets:
                xp = backend.get_array_module(b.view)
                b.stage = xp.empty(b.stop - b.start, dtype=np.uint16)
        if self._reducer is not None:
            self._reducer.close()
            self._reducer = None
        if shm.choose(self._intra, self.comm, buffers, self.compression):
            index = {id(b): j for j, b in enumerate(buffers)}
            self._reducer = shm.ShmReducer(
                self.comm, buffers, [(index[id(b.buffer)], b.start, b.stop) for b in buckets])
            for b in buckets:  # the gradients moved into the shared window
                b.view = b.buffer.grad[b.start:b.stop]

    def _layout_ok(self) -> bool:
        return all(slot_of(p) is not None for p in self._params) and all(
            b.buffer.valid for b in self._buckets)

    @property
    def buckets(self) -> list[tuple[int, int, list[str]]]:
        """The buckets in launch order: (start, stop, parameter names) in the flat buffer."""
        return [(b.start, b.stop, [self._names[i] for i in b.params]) for b in self._buckets]

    # -- Module API -----------------------------------------------------------------------------

    def forward(self, *inputs, **kwargs):
        if self._in_flight():
            self._abandon_backward()
        if not self._layout_ok():
            self._build_layout()
        training = self.module.training
        if self.broadcast_buffers and self.comm.size > 1 and (training or self._buffers_dirty):
            broadcast_state(self.module, [], self.comm, params=False)
            self._buffers_dirty = False
        if training:
            self._buffers_dirty = True
            self._forwards += 1
            if self.check_replicas_every and self._forwards % self.check_replicas_every == 0:
                self.check_replicas()
        if is_grad_enabled():
            self._mode = "sync" if self.require_backward_grad_sync else "local"
        return self.module(*inputs, **kwargs)

    @contextlib.contextmanager
    def no_sync(self):
        """Within this context, forward/backward accumulate gradients locally; the first
        synchronised backward after it averages the accumulated sum."""
        previous = self.require_backward_grad_sync
        self.require_backward_grad_sync = False
        try:
            yield
        finally:
            self.require_backward_grad_sync = previous

    def named_parameters(self, prefix: str = "", recurse: bool = True):
        return self.module.named_parameters(prefix, recurse)

    def named_buffers(self, prefix: str = "", recurse: bool = True):
        return self.module.named_buffers(prefix, recurse)

    def state_dict(self, prefix: str = "", keep_vars: bool = False):
        return self.module.state_dict(prefix, keep_vars)

    def load_state_dict(self, state_dict, strict: bool = True):
        keys = list(state_dict.keys())
        if keys and all(k.startswith("module.") for k in keys):
            state_dict = {k[len("module."):]: v for k, v in state_dict.items()}
        return self.module.load_state_dict(state_dict, strict)

    def extra_repr(self) -> str:
        return (f"world_size={self.comm.size}, buckets={len(self._buckets)}, "
                f"overlap={self.overlap}, compression={self.compression}"
                + (", intra_node=shm" if self._reducer is not None else ""))

    def check_replicas(self) -> None:
        """Raise on every rank, naming diverged ranks, if parameters differ across ranks."""
        for buf in self._flat_buffers:
            guards.check_replicas(buf.data, self.comm, raise_on_mismatch=True)

    # -- backward machinery ---------------------------------------------------------------------

    def _reset_backward_state(self) -> None:
        self._ready = [False] * len(self._params)
        for b in self._buckets:
            b.remaining, b.request, b.launched = len(b.params), None, False
        self._next_launch = 0
        self._overlapped = 0
        self._local_nonfinite = False
        self._callback_queued = False

    def _in_flight(self) -> bool:
        return self._callback_queued or any(b.launched for b in self._buckets)

    def _abandon_backward(self) -> None:
        """A previous backward stopped half way (an exception was caught): finish the requests
        it started so the collective sequence stays aligned, and start clean."""
        for b in self._buckets:
            if b.request is not None:
                b.request.wait()
        self._reset_backward_state()

    def _on_grad_ready(self, index: int, param: Tensor) -> None:
        mode = self._mode
        if mode == "local":
            return
        if mode is None:
            raise RuntimeError(
                "DistributedDataParallel: a backward reached the model's parameters without a "
                "forward through the DDP wrapper since the last gradient synchronisation "
                "(a second backward on the same graph, or the loss was computed by calling "
                "ddp.module directly). Call ddp(inputs) for every training step."
            )
        if not self._callback_queued:
            self._callback_queued = True
            queue_callback(self.finish_gradient_sync)
        if self._ready[index]:
            return
        self._ready[index] = True
        self._prepare_grad(param)
        bucket = self._buckets[self._bucket_of[index]]
        bucket.remaining -= 1
        if self.overlap:
            if bucket.remaining == 0:
                self._launch_ready(during_backward=True)
            else:
                self.comm.progress()
                if self._reducer is not None:
                    self._reducer.progress()

    def _prepare_grad(self, param: Tensor) -> None:
        """Make the final gradient the flat-buffer view, divide it by the world size (averaging,
        before the sum as PyTorch does) and, in the same pass, look for non-finite values --
        while the gradient is still warm in cache. Ranks agree on non-finite ones in finish."""
        view = param._grad_buffer
        if param.grad is None or param.grad.data is not view:
            view[...] = 0 if param.grad is None else param.grad.data
            param.grad = Tensor._wrap(view)
        check = self.nonfinite is not None and not self.compression
        if not _scale_and_check(view.reshape(-1), 1.0 / self.comm.size, check):
            self._local_nonfinite = True

    def _launch_ready(self, during_backward: bool = False) -> None:
        buckets = self._buckets
        while self._next_launch < len(buckets) and buckets[self._next_launch].remaining == 0:
            self._launch(buckets[self._next_launch])
            self._next_launch += 1
            if during_backward:
                self._overlapped += 1

    def _launch(self, bucket: _Bucket) -> None:
        bucket.launch_ns = trace.now_ns()
        view = bucket.view  # already divided by the world size (_prepare_grad)
        if self.compression:
            _codec.encode(view, bucket.stage, self.compression)
            data = bucket.stage if self.compression == "bf16" else bucket.stage.view(np.float16)
            bucket.request = self.comm.iallreduce(data, "sum",
                                                  bfloat16=self.compression == "bf16")
        elif self._reducer is not None:
            bucket.request = self._reducer.ireduce(self._next_launch)
        else:
            bucket.request = self.comm.iallreduce(view, "sum")
        bucket.launched = True
        trace.complete("allreduce.launch", bucket.launch_ns, trace.now_ns(), "comm",
                       bucket=self._next_launch, bytes=bucket.nbytes)

    def finish_gradient_sync(self) -> None:
        """Finish the gradient averaging of the current backward (runs automatically at the end
        of each synchronised backward; a no-op when nothing is pending)."""
        if not self._callback_queued:
            return
        t0 = time.perf_counter()
        t0_ns = trace.now_ns()
        self._mode = None
        missing = [i for i, ready in enumerate(self._ready) if not ready]
        for i in missing:  # zeros, or what no_sync steps accumulated
            self._ready[i] = True
            self._prepare_grad(self._params[i])
            self._buckets[self._bucket_of[i]].remaining -= 1
        self._launch_ready()
        # One small allreduce, after the buckets, makes every rank agree on the two local
        # verdicts: [parameters without gradient per rank | non-finite gradient per rank].
        size, rank = self.comm.size, self.comm.rank
        check_unused = not self.find_unused_parameters
        flags = np.zeros(2 * size, dtype=np.int64)
        flags[rank] = len(missing) if check_unused else 0
        flags[size + rank] = int(self._local_nonfinite)
        flag_request = self.comm.iallreduce(flags, "sum") if size > 1 else None
        t_wait = time.perf_counter()
        post_nonfinite = False
        for k, b in enumerate(self._buckets):
            with trace.span("wait", "comm", bucket=k):
                b.request.wait()
            trace.complete("allreduce", b.launch_ns, getattr(b.request, "done_ns", None)
                           or trace.now_ns(), "comm", blocking=False, bucket=k, bytes=b.nbytes)
            b.request = None
            if self.compression:
                _codec.decode(b.stage, b.view, self.compression)
                # the 16-bit cast can overflow: check the averaged values (same on all ranks)
                if self.nonfinite is not None and not _all_finite(b.view):
                    post_nonfinite = True
        wait_s = time.perf_counter() - t_wait
        if flag_request is not None:
            flag_request.wait()
        overlapped = self._overlapped
        self._reset_backward_state()
        self.last_sync = {"wait_s": wait_s, "finish_s": time.perf_counter() - t0,
                          "overlapped": overlapped, "buckets": len(self._buckets)}
        trace.complete("gradient sync", t0_ns, trace.now_ns(), "comm", overlapped=overlapped)
        if check_unused and int(flags[:size].sum()) > 0:
            self._raise_unused(missing)
        self.step_ok = True
        bad_ranks = [r for r in range(size) if flags[size + r]]
        if self.nonfinite is not None and (bad_ranks or post_nonfinite):
            self._handle_nonfinite(bad_ranks)

    def _raise_unused(self, missing: list[int]) -> None:
        names = [self._names[i] for i in missing]
        per_rank = self.comm.allgather_obj(names) if self.comm.size > 1 else [names]
        parts = [f"rank {r}: {', '.join(n)}" for r, n in enumerate(per_rank) if n]
        raise RuntimeError(
            "DistributedDataParallel: parameters received no gradient in this backward ("
            + "; ".join(parts) + "). Every parameter must contribute to the loss; pass "
            "find_unused_parameters=True if some are legitimately unused in a step "
            "(their gradients then count as zero)."
        )

    def _handle_nonfinite(self, bad_ranks: list[int]) -> None:
        if amp.loss_is_scaled():
            # A GradScaler scaled this loss: inf/NaN is its signal to skip the step and lower the
            # scale. Leave the (identical on every rank) gradients for scaler.step to see.
            self.step_ok = False
            self.skipped_steps += 1
            return
        names = [n for n, p in zip(self._names, self._params) if not _exactly_finite(p.grad.data)]
        if self.nonfinite == "raise":
            source = f" (from rank(s) {', '.join(map(str, bad_ranks))})" if bad_ranks else ""
            raise FloatingPointError(
                f"DistributedDataParallel: non-finite gradient after the allreduce{source} in "
                + ", ".join(names) + "; every rank sees the same averaged values and raises. "
                "Lower the learning rate, check the data, or pass nonfinite='skip' to skip "
                "such steps."
            )
        for buf in self._flat_buffers:
            buf.grad[...] = 0
        self.step_ok = False
        self.skipped_steps += 1


_CHUNK_BYTES = 1 << 19  # scale and check 512 KiB at a time, so the check reads from cache


def _exactly_finite(array) -> bool:
    return bool(backend.get_array_module(array).isfinite(array).all())


def _scale_and_check(view, scale: float, check: bool) -> bool:
    """``view *= scale`` and, with ``check``, whether every element is finite -- in one pass
    over memory (chunk by chunk). A sum of squares is finite exactly when all elements are,
    barring overflow, which the exact check rules out."""
    xp = backend.get_array_module(view)
    if not check:
        if scale != 1.0:
            view *= scale
        return True
    if xp is not np:
        if scale != 1.0:
            view *= scale
        return _all_finite(view)
    step = max(1, _CHUNK_BYTES // view.dtype.itemsize)
    total = 0.0
    for s in range(0, view.size, step):
        chunk = view[s:s + step]
        if scale != 1.0:
            chunk *= scale
        total += float(np.dot(chunk, chunk))
    return math.isfinite(total) or _exactly_finite(view)


def _all_finite(view) -> bool:
    """True when every element is finite (a dot product first; exact check if it overflows)."""
    xp = backend.get_array_module(view)
    if view.size == 0:
        return True
    if math.isfinite(float(xp.dot(view, view))):
        return True
    return _exactly_finite(view)
