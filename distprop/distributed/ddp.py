"""DistributedDataParallel: bucketed, overlapped gradient averaging over a communicator.

How one synchronised step runs:

1. ``forward`` (through the wrapper) broadcasts rank 0's buffers when they may have drifted and
   arms gradient synchronisation for the next backward (not inside :meth:`no_sync`).
2. During backward, a post-accumulate-grad hook per parameter counts finished gradients per
   bucket. A bucket is a contiguous slice of the flat gradient buffer (reverse registration
   order, first bucket ~``first_bucket_mb``, then ~``bucket_cap_mb``); as soon as all its
   gradients are final it goes to the communication hook (:meth:`register_comm_hook`; the
   default divides it by the world size and starts a non-blocking allreduce on the slice itself,
   no packing copy; fp16/bf16/PowerSGD are hooks in :mod:`distprop.distributed.hooks` and
   :mod:`distprop.distributed.powersgd`). Buckets start in one fixed order on every rank: a bucket
   that completes early waits for the ones before it. The communicator's progress thread (and
   the hooks) keep MPI moving those allreduces while backward computes. With node-shared
   buffers (``comm='shm'``, the default where ranks share a node and gradients are CPU
   floats) the bucket goes to :class:`~distprop.distributed.shm.ShmReducer` instead, whose
   gradient storage is one shared-memory window per node.
3. At the end of backward (a ``queue_callback``), parameters that got no gradient are handled,
   remaining buckets start, and DDP waits for all of them, so ``loss.backward()`` returns with
   averaged gradients: the optimizer step and the next forward can never see unsynchronised
   ones. Overlap happens during backward; ``last_sync`` records how long the end wait took.
4. A non-finite check (on each rank's gradient while it is divided, for the default allreduce
   hook; on the averaged result, identical on every rank, for any other hook) raises, or zeroes the
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
from distprop.distributed import guards, hooks, shm, world
from distprop.distributed.comm import Communicator
from distprop.distributed.consistency import broadcast_state, check_same_model
from distprop.flat import flatten, slot_of
from distprop.nn.module import Module
from distprop.registry import COMPRESSIONS
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


class DistributedDataParallel(Module):
    """Replicate ``module`` on every rank and average its gradients during backward.

    Args:
        module: the model; every rank must build the same one (checked at construction).
        bucket_cap_mb: target size of the gradient buckets after the first (MiB).
        first_bucket_mb: target size of the first bucket, which becomes ready first (MiB).
        overlap: start each bucket's allreduce during backward as soon as it is complete;
            False waits until backward has finished and then reduces each flat buffer with one
            allreduce (the bucket sizes are then ignored).
        compression: None or a name in :data:`distprop.registry.COMPRESSIONS` (``'none'``,
            ``'fp16'``, ``'bf16'``, ``'powersgd'``): registers that communication hook (see
            :mod:`distprop.distributed.hooks`); :meth:`register_comm_hook` takes any other.
        compression_options: keyword arguments of the compression's state (e.g.
            ``{'matrix_approximation_rank': 4}`` for PowerSGD).
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
            gradients: a name in :data:`distprop.registry.COMMS` (``'auto'``, ...; see
            :func:`distprop.distributed.selection.make_comm`), or ``'shm'``: CPU gradients of
            ranks sharing a node live in one node-shared window and the default hook reduces
            them there (then across nodes by MPI; :mod:`distprop.distributed.shm`), or ``'mpi'``
            for MPI's allreduce only. Otherwise (the default, another name, or a communicator
            object) ``DISTPROP_INTRA_NODE`` (``auto``, ``shm`` or ``mpi``) chooses.

    ``state_dict()`` keys are the wrapped module's keys without a ``module.`` prefix, so
    checkpoints load into the bare model; ``load_state_dict`` also accepts ``module.``-prefixed
    keys as written by PyTorch's DDP.
    """

    def __init__(self, module: Module, bucket_cap_mb: float = 25.0, first_bucket_mb: float = 1.0,
                 overlap: bool = True, compression: str | None = None,
                 compression_options: dict | None = None,
                 broadcast_buffers: bool = True, find_unused_parameters: bool = False,
                 nonfinite: str | None = "raise", check_replicas_every: int = 0,
                 comm: Communicator | str | None = None):
        super().__init__()
        if not isinstance(module, Module):
            raise TypeError(f"DistributedDataParallel wraps a Module, got {type(module).__name__}")
        if compression is not None and compression not in COMPRESSIONS:
            raise ValueError(f"compression: {COMPRESSIONS.unknown(compression)}")
        if nonfinite not in (None, "raise", "skip"):
            raise ValueError(f"nonfinite must be 'raise', 'skip' or None, got {nonfinite!r}")
        if bucket_cap_mb <= 0 or first_bucket_mb <= 0:
            raise ValueError(
                f"bucket sizes must be positive, got bucket_cap_mb={bucket_cap_mb}, "
                f"first_bucket_mb={first_bucket_mb}"
            )
        # intra-node reduction: None (DISTPROP_INTRA_NODE decides), 'shm' or 'mpi'
        self._intra = comm.lower() if isinstance(comm, str) and comm.lower() in (
            "shm", "mpi") else None
        if self._intra == "shm":  # node-shared gradient buffers over the world communicator
            comm = None
        if isinstance(comm, str):  # a registry.COMMS name: for the model's device
            from distprop.distributed.selection import make_comm

            first = next(iter(module.parameters()), None)
            comm = make_comm(comm, device=None if first is None else first.device)
        if comm is None:
            comm = world.init()
        self.module = module
        self.comm = comm
        self.bucket_cap_mb, self.first_bucket_mb = float(bucket_cap_mb), float(first_bucket_mb)
        self.overlap = bool(overlap)
        self.compression = None if compression in (None, "none") else compression
        #: the communication hook and its state (:meth:`register_comm_hook`)
        self.comm_hook_state, self.comm_hook = hooks.no_compression(comm)
        self._hook_registered = False
        self._synced_backwards = 0
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
        if self.compression is not None:
            state, hook = COMPRESSIONS[self.compression].load()(comm, **(compression_options or {}))
            self.register_comm_hook(state, hook)

    def register_comm_hook(self, state, hook) -> None:
        """Let ``hook(state, bucket)`` average each gradient bucket instead of the plain
        allreduce (PyTorch's ``DistributedDataParallel.register_comm_hook``).

        ``bucket`` is a :class:`distprop.distributed.hooks.GradBucket`; the hook returns a
        :class:`~distprop.distributed.hooks.Future` (or a request) whose ``wait()`` gives the
        averaged flat gradient or writes it into ``bucket.buffer()``. ``buffer()`` holds the
        local gradient not yet divided by the world size, unless the hook sets
        ``hook.predivide = True``. Built-in hooks: :mod:`distprop.distributed.hooks`
        (allreduce, fp16, bf16) and :mod:`distprop.distributed.powersgd`.

        Raises:
            RuntimeError: a hook was registered already (also by ``compression=``), or a
                synchronised backward has run.
        """
        if not callable(hook):
            raise TypeError(f"register_comm_hook: hook must be callable, got {type(hook).__name__}")
        if self._hook_registered:
            name = getattr(self.comm_hook, "__name__", self.comm_hook)
            raise RuntimeError("register_comm_hook can only be called once (a hook is already "
                               f"registered: {name})")
        if self._synced_backwards:
            raise RuntimeError("register_comm_hook must be called before the first backward "
                               "that synchronises gradients")
        self.comm_hook_state, self.comm_hook = state, hook
        self._hook_registered = True

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
        buckets: list[hooks.GradBucket] = []
        current: list[int] = []

        def close():
            if current:
                ss = [slots[i] for i in current]
                start = min(s.offset for s in ss)
                stop = max(s.offset + s.numel for s in ss)
                buckets.append(hooks.GradBucket(ss[0].buffer, start, stop, list(current),
                                                [params[i] for i in current],
                                                position=len(buckets), last=False,
                                                comm=self.comm))
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
        if buckets:
            buckets[-1].last = True
        self._buckets = buckets
        self._bucket_of = [0] * len(params)
        for k, b in enumerate(buckets):
            for i in b.params:
                self._bucket_of[i] = k
        if self._reducer is not None:
            self._reducer.close()
            self._reducer = None
        if shm.choose(self._intra, self.comm, buffers, self.compression):
            index = {id(b): j for j, b in enumerate(buffers)}
            self._reducer = shm.ShmReducer(
                self.comm, buffers, [(index[id(b.flat)], b.start, b.stop) for b in buckets])
            for b in buckets:  # the gradients moved into the shared window
                b.view = b.flat.grad[b.start:b.stop]
                b.reducer = self._reducer

    def _layout_ok(self) -> bool:
        return all(slot_of(p) is not None for p in self._params) and all(
            b.flat.valid for b in self._buckets)

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
                f"overlap={self.overlap}, comm_hook="
                f"{getattr(self.comm_hook, '__name__', type(self.comm_hook).__name__)}"
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
        """Make the final gradient the flat-buffer view and, for a hook that wants it
        (``predivide``), divide it by the world size and in the same pass look for non-finite
        values (``nonfinite_from_inputs``) -- while the gradient is still warm in cache. Ranks
        agree on non-finite ones in finish."""
        view = param._grad_buffer
        if param.grad is None or param.grad.data is not view:
            view[...] = 0 if param.grad is None else param.grad.data
            param.grad = Tensor._wrap(view)
        hook = self.comm_hook
        check = self.nonfinite is not None and getattr(hook, "nonfinite_from_inputs", False)
        scale = 1.0 / self.comm.size if getattr(hook, "predivide", False) else 1.0
        if not _scale_and_check(view.reshape(-1), scale, check):
            self._local_nonfinite = True

    def _launch_ready(self, during_backward: bool = False) -> None:
        buckets = self._buckets
        while self._next_launch < len(buckets) and buckets[self._next_launch].remaining == 0:
            self._launch(buckets[self._next_launch])
            self._next_launch += 1
            if during_backward:
                self._overlapped += 1

    def _launch(self, bucket: hooks.GradBucket) -> None:
        bucket.launch_ns = trace.now_ns()
        bucket.predivided = bool(getattr(self.comm_hook, "predivide", False))
        bucket.launched = True  # before the hook: an exception in it still finishes cleanly
        bucket.request = self.comm_hook(self.comm_hook_state, bucket)
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
        check_after = self.nonfinite is not None and not getattr(
            self.comm_hook, "nonfinite_from_inputs", False)
        for k, b in enumerate(self._buckets):
            with trace.span("wait", "comm", bucket=k):
                result = b.request.wait()
            if result is not None and not hooks.aliases(result, b.view):
                b.view[...] = result.reshape(-1)
            trace.complete("allreduce", b.launch_ns, getattr(b.request, "done_ns", None)
                           or trace.now_ns(), "comm", blocking=False, bucket=k, bytes=b.nbytes)
            b.request = None
            # a 16-bit cast or a low-rank approximation can overflow: check the averaged
            # values (the same on every rank)
            if check_after and not _all_finite(b.view):
                post_nonfinite = True
        wait_s = time.perf_counter() - t_wait
        if flag_request is not None:
            flag_request.wait()
        overlapped = self._overlapped
        self._synced_backwards += 1
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
