"""ZeroRedundancyOptimizer: optimizer state sharded over ranks (ZeRO stage 1).

The parameters live in flat buffers (:mod:`distprop.flat`). For each buffer, the span
holding this optimizer's parameters is cut into ``world_size`` contiguous chunks of
``span // world_size`` elements; rank r owns chunk r, and the last rank also owns the fewer than
``world_size`` leftover elements, so no padded copy of the buffer is ever made. A rank builds the
wrapped optimizer over 1-D *pieces* (one per parameter, or part of a parameter, inside its
chunk): Parameters whose data and gradient are views of the flat buffers, so the wrapped
optimizer keeps state for 1/N of the model and updates its chunk in place with its usual fused
kernels.

``step()``:

1. gradients: reduce-scatter the flat gradient (averaged over ranks) so that each rank's chunk
   holds the averaged gradient; when DistributedDataParallel already averaged the gradients
   (detected automatically, or ``gradients_averaged=True``) this is skipped and the chunk is
   simply read in place;
2. the wrapped optimizer updates this rank's chunk;
3. all-gather the chunks back into every rank's full parameter buffer.

DDP + ZeRO therefore moves 1.5x the bytes of a plain allreduce (DDP's allreduce, overlapped with
backward, plus the all-gather); ZeRO alone moves 1x (reduce-scatter + all-gather) but cannot
overlap its reduce-scatter with backward. A DDP mode that reduce-scatters its buckets instead of
allreducing them would combine both advantages; it is not implemented.

``consolidate_state_dict(to)`` + ``state_dict()`` (on rank ``to``) give exactly the layout of the
unsharded optimizer's ``state_dict()``; ``load_state_dict`` accepts that layout on any number of
ranks and keeps only this rank's share, so checkpoints move between rank counts.
"""

from __future__ import annotations

import numpy as np

from distprop import backend
from distprop.distributed import world
from distprop.distributed.ddp import owner_of
from distprop.flat import FlatBuffer, flatten, slot_of
from distprop.nn.module import Parameter
from distprop.optim.optimizer import Optimizer
from distprop.tensor import Tensor, as_array, enable_grad


class _Piece:
    """Parameter ``index`` elements ``[lo, hi)`` (flattened), held by ``param``, a 1-D
    Parameter viewing this rank's chunk of the flat buffer."""

    __slots__ = ("param", "index", "lo", "hi", "offset")

    def __init__(self, param: Parameter, index: int, lo: int, hi: int, offset: int):
        self.param, self.index, self.lo, self.hi, self.offset = param, index, lo, hi, offset


class _Shard:
    """This rank's share ``[lo, hi)`` of the span ``[start, stop)`` of one flat buffer."""

    def __init__(self, buffer: FlatBuffer, members: list[tuple[int, int, int]], rank: int,
                 size: int):
        self.buffer = buffer
        self.members = members  # (offset, numel, parameter index), by offset
        self.start = members[0][0]
        self.stop = max(o + n for o, n, _ in members)
        span = self.stop - self.start
        self.chunk = span // size  # elements every rank owns; the last also owns the rest
        self.gathered = self.chunk * size  # [start, start + gathered) is exchanged in chunks
        self.lo = self.start + rank * self.chunk
        self.hi = self.lo + self.chunk + (span - self.gathered if rank == size - 1 else 0)
        self.pieces: list[_Piece] = []
        self.keep: list[FlatBuffer] = []  # the pieces' buffers (views of self.buffer)

    @property
    def tail(self) -> slice:
        return slice(self.start + self.gathered, self.stop)


class ZeroRedundancyOptimizer(Optimizer):
    """Wrap ``optimizer_class`` so that each rank keeps its state for 1/N of the parameters.

    Every rank must build it over the same parameters (same shapes and dtypes, checked). The
    constructor broadcasts rank 0's parameter values so that the replicas start identical.
    ``step()`` is collective. Behind DDP call it after a synchronised backward (not right after
    one inside ``no_sync()``), as with any optimizer; without DDP the gradients are averaged
    inside ``step()``, so clip them only when DDP wraps the model.

    Args:
        params: parameters or parameter groups, as for any optimizer.
        optimizer_class: a :class:`distprop.optim.Optimizer` subclass, e.g. ``dp.optim.Adam``.
        process_group: the communicator (default: ``distprop.distributed.init()``); ``comm`` is
            accepted as another name for it.
        parameters_as_bucket_view: accepted for PyTorch compatibility; parameters always are
            views of flat buffers here.
        gradients_averaged: True when the gradients are already averaged over the ranks before
            ``step()`` (DDP); False to always reduce-scatter them; None (default) decides at
            each step: True exactly when every parameter is wrapped by a
            DistributedDataParallel over a world of the same size.
        **defaults: the wrapped optimizer's arguments (``lr``, ``betas``, ...).

    Attributes:
        optim: the wrapped optimizer over this rank's pieces (its ``state`` is the local shard).
        last_step_reduced: whether the last ``step()`` reduce-scattered the gradients (False
            when they were already averaged, e.g. by DDP, or with one rank).

    Raises:
        TypeError: when ``optimizer_class`` is not an Optimizer subclass.
        ValueError: when the ranks disagree about the parameters.
    """

    def __init__(self, params, optimizer_class, process_group=None, *, comm=None,
                 parameters_as_bucket_view: bool = False, gradients_averaged: bool | None = None,
                 **defaults):
        if not (isinstance(optimizer_class, type) and issubclass(optimizer_class, Optimizer)):
            what = (f"an instance of {type(optimizer_class).__name__}"
                    if not isinstance(optimizer_class, type) else optimizer_class.__name__)
            raise TypeError(f"ZeroRedundancyOptimizer: optimizer_class must be a "
                            f"distprop.optim.Optimizer subclass such as dp.optim.Adam (the class, "
                            f"not an instance), got {what}")
        if issubclass(optimizer_class, ZeroRedundancyOptimizer):
            raise TypeError("ZeroRedundancyOptimizer: optimizer_class cannot itself be a "
                            "ZeroRedundancyOptimizer")
        if process_group is not None and comm is not None and process_group is not comm:
            raise ValueError("ZeroRedundancyOptimizer: pass process_group or comm, not both")
        if gradients_averaged not in (None, True, False):
            raise ValueError(f"gradients_averaged must be True, False or None, got "
                             f"{gradients_averaged!r}")
        comm = process_group if process_group is not None else comm
        if comm is None:
            comm = world.init()
        self.comm = comm
        self.optimizer_class = optimizer_class
        self.gradients_averaged = gradients_averaged
        self._kwargs = dict(defaults)
        self._consolidated: dict | None = None
        self._steps = 0
        self._consolidated_at = -1
        self.last_step_reduced = False
        super().__init__(params, dict(defaults))  # groups, flat buffers (no state here)
        self._check_same_everywhere()
        for shard in self._plan():
            comm.broadcast(shard.buffer.data[shard.start:shard.stop], 0)
        self._build()

    # --- construction -------------------------------------------------------------------------

    def check_group(self, group: dict) -> None:
        """Hyper-parameters are checked by the wrapped optimizer (in :meth:`_build`)."""

    @property
    def _params(self) -> list[Tensor]:
        return [p for g in self.param_groups for p in g["params"]]

    def _check_same_everywhere(self) -> None:
        sig = [[(tuple(p.shape), str(p.dtype)) for p in g["params"]] for g in self.param_groups]
        if self.comm.size == 1:
            return
        every = self.comm.allgather_obj(sig)
        if all(s == every[0] for s in every):
            return
        bad = next(r for r, s in enumerate(every) if s != every[0])
        detail = f"{len(every[0])} vs {len(every[bad])} parameter groups"
        for gi, (a, b) in enumerate(zip(every[0], every[bad])):
            if a != b:
                detail = f"group {gi} has {len(a)} vs {len(b)} parameters"
                for k, (x, y) in enumerate(zip(a, b)):
                    if x != y:
                        detail = (f"parameter {k} of group {gi} is {x[0]} {x[1]} on rank 0 but "
                                  f"{y[0]} {y[1]} on rank {bad}")
                        break
                break
        raise ValueError(f"ZeroRedundancyOptimizer: ranks 0 and {bad} were given different "
                         f"parameters: {detail}")

    def _plan(self) -> list[_Shard]:
        """Each flat buffer's span of our parameters, cut into this rank's shard."""
        by_buffer: dict[int, tuple[FlatBuffer, list]] = {}
        for i, p in enumerate(self._params):
            slot = slot_of(p)
            if slot is None:  # moved out of its buffer since: flatten again
                flatten(self._params)
                return self._plan()
            by_buffer.setdefault(id(slot.buffer), (slot.buffer, []))[1].append(
                (slot.offset, slot.numel, i))
        return [_Shard(buf, sorted(members), self.comm.rank, self.comm.size)
                for buf, members in by_buffer.values()]

    def _build(self) -> None:
        """Cut this rank's shards into pieces and build the wrapped optimizer over them."""
        shards = self._plan()
        params = self._params
        group_of = [gi for gi, g in enumerate(self.param_groups) for _ in g["params"]]
        inner_params: list[list[Parameter]] = [[] for _ in self.param_groups]
        pieces: list[_Piece | None] = []
        for shard in shards:
            buf = shard.buffer
            run: list[_Piece] = []
            for offset, numel, i in shard.members:
                a, b = max(offset, shard.lo), min(offset + numel, shard.hi)
                if a >= b:
                    continue
                if run and run[-1].offset + run[-1].param.data.size != a:
                    self._keep_run(shard, run)
                    run = []
                piece = _Piece(Parameter(buf.data[a:b]), i, a - offset, b - offset, a)
                run.append(piece)
                shard.pieces.append(piece)
                inner_params[group_of[i]].append(piece.param)
            self._keep_run(shard, run)
        by_param = {id(pc.param): pc for s in shards for pc in s.pieces}
        inner_groups = []
        for gi, group in enumerate(self.param_groups):
            members = inner_params[gi]
            if not members:  # this rank owns nothing of the group: a zero-size stand-in
                like = group["params"][0]
                xp = backend.get_array_module(like.data)
                members = [Parameter(xp.zeros(0, dtype=like.dtype))]
            pieces.extend(by_param.get(id(m)) for m in members)
            inner_groups.append({**{k: v for k, v in group.items() if k != "params"},
                                 "params": members})
        self.optim = self.optimizer_class(inner_groups, **self._kwargs)
        self.defaults = dict(self.optim.defaults)
        for group, inner in zip(self.param_groups, self.optim.param_groups):
            group.update({k: v for k, v in inner.items() if k != "params"})
        self._shards = shards
        self._inner_pieces = pieces  # aligned with the wrapped optimizer's parameter order
        self._where = [(slot_of(p).buffer, slot_of(p).offset) for p in params]
        # the gradient arrays the shards view: DDP's node-shared buffers replace them
        self._grad_arrays = {id(s.buffer): s.buffer.grad for s in shards}

    @staticmethod
    def _keep_run(shard: _Shard, run: list[_Piece]) -> None:
        """Put consecutive pieces into one FlatBuffer over the chunk (no copy)."""
        if not run:
            return
        a = run[0].offset
        b = run[-1].offset + run[-1].param.data.size
        shard.keep.append(FlatBuffer([pc.param for pc in run],
                                     storage=(shard.buffer.data[a:b], shard.buffer.grad[a:b])))

    def _stale(self) -> bool:
        for p, (buf, offset) in zip(self._params, self._where):
            slot = slot_of(p)
            if slot is None or slot.buffer is not buf or slot.offset != offset:
                return True
        return any(s.buffer.grad is not self._grad_arrays.get(id(s.buffer))
                   for s in self._shards)

    def _reshard(self) -> None:
        """Parameters moved (e.g. re-flattened): rebuild the shards, keeping the state."""
        full = self._gather_state(keep=True)
        self._build()
        self._load_full(full)

    def add_param_group(self, param_group: dict) -> None:
        """Add a parameter group (collective: call it on every rank with the same group)."""
        full = self._gather_state(keep=True)
        group = self._prepare_group(param_group, len(self.param_groups), set())
        self._append_groups([group])
        self._check_same_everywhere()
        for p in group["params"]:
            self.comm.broadcast(p.data, 0)
        self._build()
        self._load_full(full)

    # --- stepping -----------------------------------------------------------------------------

    def _averaged(self) -> bool:
        if self.gradients_averaged is not None:
            return self.gradients_averaged
        if self.comm.size == 1:
            return True
        for p in self._params:
            owner = owner_of(p)
            if owner is None or owner.comm.size != self.comm.size:
                return False
        return True

    def step(self, closure=None):
        """Reduce the gradients to their owners, update this rank's shard, gather parameters.

        Collective: every rank calls it. Returns ``closure()``'s loss when given.
        """
        loss = None
        if closure is not None:
            with enable_grad():
                loss = closure()
        if self._stale():
            self._reshard()
        params = self._params
        averaged = self._averaged()
        present = np.array([p.grad is not None for p in params], dtype=np.uint8)
        if not averaged:
            self.comm.allreduce(present, "max")  # a parameter with a gradient on any rank
        for p, has in zip(params, present):
            view = p._grad_buffer
            if p.grad is None:
                if has:
                    view[...] = 0
            elif p.grad.data is not view:
                view[...] = p.grad.data
                p.grad = Tensor._wrap(view)
        comm = self.comm
        self.last_step_reduced = not averaged and comm.size > 1
        if not averaged:
            for shard in self._shards:
                grad = shard.buffer.grad
                if shard.chunk:
                    comm.reduce_scatter(grad[shard.start:shard.start + shard.gathered], "mean",
                                        out=grad[shard.lo:shard.lo + shard.chunk])
                if shard.tail.start < shard.tail.stop:
                    comm.allreduce(grad[shard.tail], "mean")
        for pc in (pc for s in self._shards for pc in s.pieces):
            pc.param.grad = Tensor._wrap(pc.param._grad_buffer) if present[pc.index] else None
        self._sync_hyperparameters()
        self.optim.step()
        if comm.size > 1:
            for shard in self._shards:
                data = shard.buffer.data
                if shard.chunk:
                    comm.allgather(data[shard.lo:shard.lo + shard.chunk],
                                   out=data[shard.start:shard.start + shard.gathered])
                if shard.tail.start < shard.tail.stop:
                    comm.broadcast(data[shard.tail], comm.size - 1)
        self._steps += 1
        return loss

    def _sync_hyperparameters(self) -> None:
        """Copy the hyper-parameters (changed by LR schedulers, ...) to the wrapped optimizer."""
        for group, inner in zip(self.param_groups, self.optim.param_groups):
            changed = False
            for key, value in group.items():
                if key != "params" and inner.get(key) is not value:
                    inner[key] = value
                    changed = True
            if changed:
                self.optim.check_group(inner)

    # --- state --------------------------------------------------------------------------------

    def _gather_state(self, keep: bool) -> dict[int, dict] | None:
        """Every parameter's full state (collective); None where ``keep`` is False."""
        meta: dict[int, list] = {}
        for shard in self._shards:
            for pc in shard.pieces:
                entry = self.optim.state.get(pc.param)
                if entry and pc.index not in meta:
                    meta[pc.index] = [(name, None if np.ndim(v) else _host(v))
                                      for name, v in entry.items()]
        if self.comm.size > 1:
            merged: dict[int, list] = {}
            for part in self.comm.allgather_obj(meta):
                for index, names in part.items():
                    merged.setdefault(index, names)
            meta = merged
        full: dict[int, dict] = {i: dict(names) for i, names in sorted(meta.items())}
        params = self._params
        for shard in self._shards:
            names: list[str] = []
            for _, _, i in shard.members:
                for name, scalar in meta.get(i, ()):
                    if scalar is None and name not in names:
                        names.append(name)
            for name in names:
                whole = self._gather_array(shard, name)
                if not keep:
                    continue
                for offset, numel, i in shard.members:
                    if name in full.get(i, {}):
                        a = offset - shard.start
                        full[i][name] = whole[a:a + numel].reshape(params[i].shape)
        return full if keep else None

    def _gather_array(self, shard: _Shard, name: str) -> np.ndarray:
        """State array ``name`` over the shard's whole span, as a host array (collective)."""
        xp = backend.get_array_module(shard.buffer.data)
        dtype = shard.buffer.dtype
        local = xp.zeros(shard.hi - shard.lo, dtype=dtype)
        for pc in shard.pieces:
            entry = self.optim.state.get(pc.param)
            if entry and name in entry:
                a = pc.offset - shard.lo
                local[a:a + entry[name].size] = entry[name]
        comm = self.comm
        if comm.size == 1:
            return _host(local)
        whole = xp.empty(shard.stop - shard.start, dtype=dtype)
        if shard.chunk:
            comm.allgather(local[:shard.chunk], out=whole[:shard.gathered])
        if shard.gathered < len(whole):
            if comm.rank == comm.size - 1:
                whole[shard.gathered:] = local[shard.chunk:]
            comm.broadcast(whole[shard.gathered:], comm.size - 1)
        return _host(whole)

    def consolidate_state_dict(self, to: int = 0) -> None:
        """Gather the full optimizer state onto rank ``to`` (collective: call on every rank).

        Afterwards ``state_dict()`` on rank ``to`` returns it. The state arrays are exchanged
        one at a time, so each rank briefly holds one full-size state array.
        """
        if not isinstance(to, int) or not 0 <= to < self.comm.size:
            raise ValueError(f"consolidate_state_dict: to={to!r} is not a rank of a world of "
                             f"size {self.comm.size}")
        if self._stale():
            self._reshard()
        full = self._gather_state(keep=self.comm.rank == to)
        self._consolidated = full
        self._consolidated_at = self._steps

    def state_dict(self) -> dict:
        """The consolidated state in the unsharded optimizer's layout (rank ``to`` only).

        Raises:
            RuntimeError: when :meth:`consolidate_state_dict` was not called on every rank
                (after the last step) with this rank as ``to``.
        """
        if self.comm.size == 1:
            self.consolidate_state_dict(0)
        if self._consolidated is None or self._consolidated_at != self._steps:
            raise RuntimeError(
                "ZeroRedundancyOptimizer: optimizer state has not been consolidated on this rank "
                "since the last step; call consolidate_state_dict(to=rank) on every rank first "
                "and read state_dict() on that rank")
        index: dict[int, int] = {}
        groups = []
        for group in self.param_groups:
            packed = {k: v for k, v in group.items() if k != "params"}
            packed["params"] = [index.setdefault(id(p), len(index)) for p in group["params"]]
            groups.append(packed)
        return {"state": dict(self._consolidated), "param_groups": groups}

    def load_state_dict(self, state_dict: dict) -> None:
        """Load a state dict in the unsharded layout (from :meth:`state_dict` on any number of
        ranks, or from the plain optimizer); each rank keeps its share. Every rank must pass the
        same dict.

        Raises:
            ValueError: when the groups, parameter counts, shapes or state names do not match.
        """
        if not isinstance(state_dict, dict) or not {"state", "param_groups"} <= set(state_dict):
            raise ValueError("optimizer state_dict must be a dict with 'state' and "
                             "'param_groups' entries")
        saved_groups = state_dict["param_groups"]
        if len(saved_groups) != len(self.param_groups):
            raise ValueError(
                f"loaded state dict has a different number of parameter groups: "
                f"{len(saved_groups)} saved, {len(self.param_groups)} in this optimizer")
        new_groups = []
        ids: dict = {}
        for gi, (group, saved) in enumerate(zip(self.param_groups, saved_groups)):
            if len(saved["params"]) != len(group["params"]):
                raise ValueError(
                    f"loaded state dict contains a parameter group that doesn't match the size "
                    f"of optimizer's group: group {gi} has {len(saved['params'])} parameters "
                    f"saved, {len(group['params'])} here")
            new = {**{k: v for k, v in self.optim.param_groups[gi].items() if k != "params"},
                   **{k: v for k, v in saved.items() if k != "params"}}
            if isinstance(new.get("betas"), list):
                new["betas"] = tuple(new["betas"])
            self.optim.check_group(new)
            new_groups.append(new)
            for key in saved["params"]:
                ids[key] = len(ids)
        params = self._params
        group_of = [gi for gi, g in enumerate(self.param_groups) for _ in g["params"]]
        full: dict[int, dict] = {}
        for key, entry in state_dict["state"].items():
            if key not in ids and isinstance(key, str) and key.isdigit():
                key = int(key)
            if key not in ids:
                raise ValueError(f"state dict has state for parameter {key!r}, which is in no "
                                 "parameter group")
            i = ids[key]
            full[i] = self.optim.validate_state_entry(new_groups[group_of[i]], key, params[i],
                                                      entry)
        for group, new in zip(self.param_groups, new_groups):
            group.update(new)
        self._sync_hyperparameters()
        if self._stale():
            self._build()
        self._load_full(full)

    def _load_full(self, full: dict[int, dict]) -> None:
        """Give the wrapped optimizer this rank's slices of ``full`` (index -> state)."""
        inner_state, k = {}, 0
        for inner in self.optim.param_groups:
            arrays = self.optim.array_state(inner)
            for _ in inner["params"]:
                pc = self._inner_pieces[k]
                if pc is not None and full.get(pc.index):
                    inner_state[k] = {
                        name: as_array(v).reshape(-1)[pc.lo:pc.hi] if name in arrays else v
                        for name, v in full[pc.index].items()}
                k += 1
        groups, k = [], 0
        for inner in self.optim.param_groups:
            packed = {key: v for key, v in inner.items() if key != "params"}
            packed["params"] = list(range(k, k + len(inner["params"])))
            k += len(inner["params"])
            groups.append(packed)
        self.optim.load_state_dict({"state": inner_state, "param_groups": groups})
        self._consolidated = None

    def state_nbytes(self) -> int:
        """Bytes of optimizer state this rank holds (its shard)."""
        return optimizer_state_nbytes(self.optim)

    def __repr__(self) -> str:
        return (f"ZeroRedundancyOptimizer(rank={self.comm.rank}, world_size={self.comm.size}, "
                f"shard={sum(s.hi - s.lo for s in self._shards)} of "
                f"{sum(s.stop - s.start for s in self._shards)} elements, "
                f"optimizer_class={self.optimizer_class.__name__})")


def _host(value):
    return np.array(backend.to_host(value), copy=True)


def optimizer_state_nbytes(optimizer: Optimizer) -> int:
    """Bytes of the state arrays and scalars an optimizer keeps (``optimizer.state`` values)."""
    if isinstance(optimizer, ZeroRedundancyOptimizer):
        return optimizer.state_nbytes()
    total = 0
    for entry in optimizer.state.values():
        for value in entry.values():
            total += int(getattr(value, "nbytes", 0))
    return total
