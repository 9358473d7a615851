"""Making replicas start identical: model signature check and rank-0 state broadcast."""

from __future__ import annotations

import hashlib

from distprop import backend
from distprop.distributed.comm import Communicator
from distprop.nn.module import Module


def model_signature(module: Module) -> list[tuple[str, tuple[int, ...], str, bool]]:
    """(name, shape, dtype, requires_grad) of every parameter, then every buffer."""
    sig = [(name, tuple(p.shape), str(p.dtype), bool(p.requires_grad))
           for name, p in module.named_parameters()]
    sig += [(f"{name} (buffer)", tuple(b.shape), str(b.dtype), False)
            for name, b in module.named_buffers()]
    return sig


def _describe(entry) -> str:
    name, shape, dtype, requires_grad = entry
    frozen = "" if requires_grad or name.endswith("(buffer)") else ", frozen"
    return f"shape {shape} {dtype}{frozen}"


def _first_difference(ref: list, other: list, rank: int) -> str:
    for k, (a, b) in enumerate(zip(ref, other)):
        if a == b:
            continue
        if a[0] != b[0]:
            return (f"entry {k} is '{a[0]}' on rank 0 but '{b[0]}' on rank {rank}")
        return f"'{a[0]}' has {_describe(a)} on rank 0 but {_describe(b)} on rank {rank}"
    if len(ref) != len(other):
        longer, who = (ref, 0) if len(ref) > len(other) else (other, rank)
        extra = longer[min(len(ref), len(other))]
        return (f"rank 0 has {len(ref)} parameters/buffers but rank {rank} has {len(other)}; "
                f"the first extra one, on rank {who}, is '{extra[0]}' with {_describe(extra)}")
    return "no difference found"  # pragma: no cover - hashes differed


def check_same_model(module: Module, comm: Communicator) -> None:
    """Raise ``RuntimeError`` on every rank unless all ranks hold the same model structure.

    The message names the ranks that differ from rank 0 and the first differing parameter or
    buffer with both shapes. Costs one small allgather (a hash) when the models agree.
    """
    if comm.size == 1:
        return
    sig = model_signature(module)
    digest = hashlib.sha1(repr(sig).encode()).hexdigest()
    digests = comm.allgather_obj(digest)
    if all(d == digests[0] for d in digests):
        return
    sigs = comm.allgather_obj(sig)
    bad = [r for r in range(1, comm.size) if digests[r] != digests[0]]
    first = _first_difference(sigs[0], sigs[bad[0]], bad[0])
    ranks = ", ".join(str(r) for r in bad)
    raise RuntimeError(
        f"DistributedDataParallel: the model differs across ranks: rank(s) {ranks} differ from "
        f"rank 0. First difference: {first}. Every rank must build the same model."
    )


def _broadcast_packed(tensors: list, comm: Communicator, root: int = 0) -> None:
    """Broadcast several arrays of one dtype/device as one message."""
    if len(tensors) == 1 and tensors[0].data.flags.c_contiguous:
        comm.broadcast(tensors[0].data, root)
        return
    xp = backend.get_array_module(tensors[0].data)
    sizes = [int(t.data.size) for t in tensors]
    if comm.rank == root:
        packed = xp.concatenate([t.data.reshape(-1) for t in tensors])
    else:
        packed = xp.empty(sum(sizes), dtype=tensors[0].dtype)
    comm.broadcast(packed, root)
    if comm.rank != root:
        offset = 0
        for t, n in zip(tensors, sizes):
            t.data[...] = packed[offset:offset + n].reshape(t.shape)
            offset += n


def broadcast_state(module: Module, flat_buffers: list, comm: Communicator,
                    params: bool = True) -> None:
    """Copy rank 0's parameters (flat buffers whole, other parameters packed) and buffers to
    every rank, in place."""
    if comm.size == 1:
        return
    groups: dict[tuple, list] = {}
    if params:
        for buf in flat_buffers:
            comm.broadcast(buf.data, 0)
        in_flat = {id(p) for buf in flat_buffers for p in buf.params}
        for p in module.parameters():
            if id(p) not in in_flat:
                groups.setdefault((str(p.dtype), str(p.device)), []).append(p)
    for b in module.buffers():
        if b.data.size:
            groups.setdefault((str(b.dtype), str(b.device), "buffer"), []).append(b)
    for key in sorted(groups):
        _broadcast_packed(groups[key], comm)

