"""Allreduce bandwidth: distprop's communicator and DDP bucketing against raw mpi4py.

``distprop bench allreduce --sizes 1KB..256MB --ranks 2`` times, for every size, one allreduce of a
float32 buffer of that many bytes three ways in the same processes:

- ``mpi``: ``MPI.COMM_WORLD.Allreduce(MPI.IN_PLACE, buf)`` -- the floor with this MPI;
- ``distprop``: ``dp.distributed.all_reduce`` on a Tensor over the same buffer;
- ``ddp``: DistributedDataParallel's end-of-backward gradient sync (``last_sync["finish_s"]``)
  of parameters holding the same bytes, or of a zoo model's parameters (``--model``), with
  overlap off so the sync is timed alone. (DDP divides each gradient by the world size as it
  becomes final, during backward; that pass is not part of this time.)
- ``ddp-mpi`` / ``ddp-shm``: the same DDP sync forcing the intra-node reduction: MPI's
  allreduce, or the node-shared gradient buffers (``comm='shm'``, :mod:`distprop.distributed.shm`);
- ``memcpy``: every rank copies a buffer of the same bytes at once (``numpy.copyto``): the
  memory-bandwidth floor of any reduction that reads and writes the gradient once;
- ``ddp-fp16`` / ``ddp-bf16`` (``--compression fp16,bf16``): the same DDP sync with gradient
  compression, encode, 16-bit sum and decode included; bus bandwidth still counts the float32
  bytes, so it compares directly with ``ddp``.

The methods take turns call by call so that drift on a shared machine hits all of them alike.

Bus bandwidth is ``bytes / time * 2 (p - 1) / p`` (what each link carries in a ring allreduce),
so numbers for different rank counts compare.
"""

from __future__ import annotations

import statistics
import time

import numpy as np

from distprop.nn.module import Module

METHODS = ("mpi", "distprop", "ddp", "ddp-mpi", "ddp-shm", "memcpy")
COMPRESSED = ("ddp-fp16", "ddp-bf16")  # DDP's sync with --compression fp16 / bf16
_ORDER = METHODS + COMPRESSED


def bus_bandwidth(nbytes: float, seconds: float, ranks: int) -> float:
    """Bytes per second each link carries: nbytes / seconds * 2 (p - 1) / p."""
    if seconds <= 0 or ranks < 2:
        return float("nan")
    return nbytes / seconds * 2 * (ranks - 1) / ranks


def _repeats(nbytes: int, min_repeats: int, max_repeats: int, budget_s: float,
             bytes_per_s: float = 2e9) -> int:
    estimate = 2e-5 + nbytes / bytes_per_s
    return int(max(min_repeats, min(max_repeats, budget_s / estimate)))


def _time_interleaved(comm, fns: dict, repeats: int, self_timed: set[str],
                      warmup: int = 2) -> dict[str, list[float]]:
    """Per-call seconds of each ``fns[m]()`` (or the seconds it returns when ``m`` is
    ``self_timed``), each the slowest rank's. The methods take turns call by call, and every call
    starts together after a barrier, so drift on a shared machine hits them alike."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {m: [] for m in fns}
    for _ in range(repeats):
        for method, fn in fns.items():
            comm.Barrier()
            t0 = time.perf_counter()
            own = fn()
            times[method].append(own if method in self_timed else time.perf_counter() - t0)
    out = {}
    for method, values in times.items():
        slowest = np.array(values)
        comm.Allreduce(_mpi().IN_PLACE, slowest, op=_mpi().MAX)
        out[method] = slowest.tolist()
    return out


def _mpi():
    from mpi4py import MPI

    return MPI


class _GradientOf(Module):
    """Holds parameters; forward returns the sum of their sums, so backward sets every gradient
    to ones (a copy into the flat buffer) and then DDP synchronises them."""

    def __init__(self, inner: Module):
        super().__init__()
        self.inner = inner

    def forward(self):
        total = None
        for p in self.inner.parameters():
            total = p.sum() if total is None else total + p.sum()
        return total


def _ddp_sync(nbytes: int | None, workload: str | None, bucket_mb: float,
              compression: str | None = None, comm=None):
    """A function running one DDP gradient sync (overlap off, so the sync is timed alone) and
    returning its duration in seconds, over a zoo model's parameters (``workload``) or over
    4 MB parameters holding ``nbytes``."""
    import distprop as dp

    if workload is not None:
        from distprop.models import build_model

        inner = build_model(workload)
    else:
        numel = max(1, nbytes // 4)
        chunk = 1 << 20
        sizes = [chunk] * (numel // chunk) + ([numel % chunk] if numel % chunk else [])
        inner = Module()
        for i, n in enumerate(sizes):
            setattr(inner, f"p{i}", dp.nn.Parameter(dp.zeros(n)))
    ddp = dp.distributed.DistributedDataParallel(
        _GradientOf(inner), bucket_cap_mb=bucket_mb, overlap=False, compression=compression,
        comm=comm)

    def one_sync() -> float:
        ddp.zero_grad()
        ddp().backward()
        return ddp.last_sync["finish_s"]

    grad_bytes = 4 * sum(p.numel() for p in inner.parameters())
    return one_sync, grad_bytes


def worker(config: dict) -> dict:
    """Per-rank body: time every size (and the model's gradient) with every method."""
    import distprop as dp

    MPI = _mpi()
    comm = MPI.COMM_WORLD
    ranks = comm.Get_size()
    dp.distributed.init()
    methods = config.get("methods", list(METHODS))
    bucket_mb = config.get("bucket_mb", 25.0)
    cases: list[tuple[int | None, str | None]] = [(n, None) for n in config.get("sizes", [])]
    if config.get("model"):
        cases.append((None, config["model"]))
    rows = []
    for nbytes, workload in cases:
        fns = {}
        if workload is not None:
            from distprop.models import build_model

            nbytes = 4 * sum(p.numel() for p in build_model(workload).parameters())
        if "ddp" in methods:
            fns["ddp"], nbytes = _ddp_sync(nbytes, workload, bucket_mb)
        if "ddp-mpi" in methods:
            fns["ddp-mpi"], nbytes = _ddp_sync(nbytes, workload, bucket_mb,
                                               comm="mpi")
        if "ddp-shm" in methods:
            fns["ddp-shm"], nbytes = _ddp_sync(nbytes, workload, bucket_mb, comm="shm")
        for kind in config.get("compression") or ():
            fns[f"ddp-{kind}"], nbytes = _ddp_sync(nbytes, workload, bucket_mb, kind)
        buf = np.ones(max(1, nbytes // 4), dtype=np.float32)
        if "mpi" in methods:
            fns["mpi"] = lambda b=buf: comm.Allreduce(MPI.IN_PLACE, b, op=MPI.SUM)
        if "distprop" in methods:
            t = dp.from_numpy(buf)
            fns["distprop"] = lambda t=t: dp.distributed.all_reduce(t)
        if "memcpy" in methods:
            dst = np.empty_like(buf)
            fns["memcpy"] = lambda b=buf, d=dst: np.copyto(d, b)
        fns = {m: fns[m] for m in _ORDER if m in fns}
        repeats = config.get("repeats") or _repeats(
            buf.nbytes * len(fns), config.get("min_repeats", 5), config.get("max_repeats", 50),
            config.get("budget_s", 1.0))
        timed = _time_interleaved(comm, fns, repeats,
                                  self_timed={"ddp", "ddp-mpi", "ddp-shm", *COMPRESSED})
        for method, times in timed.items():
            med = statistics.median(times)
            rows.append({"bytes": int(buf.nbytes), "method": method, "ranks": ranks,
                         "model": workload, "repeats": repeats, "time_median_s": med,
                         "time_min_s": min(times), "time_max_s": max(times),
                         "algbw_gbs": buf.nbytes / med / 1e9 if med > 0 else None,
                         "busbw_gbs": bus_bandwidth(buf.nbytes, med, ranks) / 1e9})
        del fns, buf
    return {"rows": rows}


def add_ratios(rows: list[dict]) -> list[dict]:
    """Add ``vs_mpi``: a method's median time over raw MPI's at the same size."""
    floor = {(r["bytes"], r.get("model")): r["time_median_s"] for r in rows
             if r["method"] == "mpi"}
    for r in rows:
        base = floor.get((r["bytes"], r.get("model")))
        r["vs_mpi"] = r["time_median_s"] / base if base else None
    return rows


def format_table(rows: list[dict]) -> str:
    """One line per size (the model's gradient last): bus bandwidth per method, ratios to MPI."""
    from distprop.bench.units import format_size

    methods = [m for m in _ORDER if any(r["method"] == m for r in rows)]
    head = ["size"] + [f"{m} busBW GB/s" for m in methods] + [
        f"{m}/mpi time" for m in methods if m != "mpi"]
    cases: dict[tuple, dict[str, dict]] = {}
    for r in rows:
        cases.setdefault((r.get("model") is not None, r["bytes"], r.get("model")), {})[
            r["method"]] = r
    lines = []
    for key in sorted(cases, key=lambda k: (k[0], k[1])):
        got = cases[key]
        label = format_size(key[1]) + (f" ({key[2]})" if key[2] else "")
        line = [label]
        line += [f"{got[m]['busbw_gbs']:.2f}" if m in got else "-" for m in methods]
        line += [f"{got[m]['vs_mpi']:.2f}" if m in got and got[m].get("vs_mpi") else "-"
                 for m in methods if m != "mpi"]
        lines.append(line)
    widths = [max(len(h), *(len(x[i]) for x in lines)) for i, h in enumerate(head)]
    out = ["  ".join(h.rjust(w) for h, w in zip(head, widths))]
    out += ["  ".join(c.rjust(w) for c, w in zip(x, widths)) for x in lines]
    return "\n".join(out)
