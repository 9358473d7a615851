"""Allreduce bandwidth: distprop's communicator and DDP bucketing against raw mpi4py.

``distprop bench allreduce --sizes 1KB..256MB --ranks 2`` times, for every size, one allreduce of a
float32 buffer of that many bytes three ways in the same processes:

- ``mpi``: ``MPI.COMM_WORLD.Allreduce(MPI.IN_PLACE, buf)`` -- the floor with this MPI;
- ``distprop``: ``dp.distributed.all_reduce`` on a Tensor over the same buffer;
- ``ddp``: DistributedDataParallel's gradient sync of parameters holding the same bytes (its
  buckets, its averaging), overlap off so the sync is timed alone.

Bus bandwidth is ``bytes / time * 2 (p - 1) / p`` (what each link carries in a ring allreduce),
so numbers for different rank counts compare.
"""

from __future__ import annotations

import statistics
import time

import numpy as np

from distprop.nn.module import Module

METHODS = ("mpi", "distprop", "ddp")


def bus_bandwidth(nbytes: float, seconds: float, ranks: int) -> float:
    """Bytes per second each link carries: nbytes / seconds * 2 (p - 1) / p."""
    if seconds <= 0 or ranks < 2:
        return float("nan")
    return nbytes / seconds * 2 * (ranks - 1) / ranks


def _repeats(nbytes: int, min_repeats: int, max_repeats: int, budget_s: float,
             bytes_per_s: float = 2e9) -> int:
    estimate = 2e-5 + nbytes / bytes_per_s
    return int(max(min_repeats, min(max_repeats, budget_s / estimate)))


def _time(comm, fn, repeats: int, warmup: int = 2, self_timed: bool = False) -> list[float]:
    """Per-call seconds of ``fn()`` (or the seconds it returns when ``self_timed``), each the
    slowest rank's; every call starts together after a barrier."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        comm.Barrier()
        t0 = time.perf_counter()
        own = fn()
        times.append(own if self_timed else time.perf_counter() - t0)
    slowest = np.array(times)
    comm.Allreduce(_mpi().IN_PLACE, slowest, op=_mpi().MAX)
    return slowest.tolist()


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


def _ddp_sync(nbytes: int | None, workload: str | None, bucket_mb: float):
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
        _GradientOf(inner), bucket_cap_mb=bucket_mb, overlap=False)

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
        if "ddp" in methods or workload is not None:
            fns["ddp"], grad_bytes = _ddp_sync(nbytes, workload, bucket_mb)
            nbytes = grad_bytes
        buf = np.ones(max(1, nbytes // 4), dtype=np.float32)
        if "mpi" in methods:
            fns["mpi"] = lambda b=buf: comm.Allreduce(MPI.IN_PLACE, b, op=MPI.SUM)
        if "distprop" in methods:
            t = dp.from_numpy(buf)
            fns["distprop"] = lambda t=t: dp.distributed.all_reduce(t)
        repeats = _repeats(buf.nbytes, config.get("min_repeats", 5),
                           config.get("max_repeats", 50), config.get("budget_s", 0.5))
        for method in METHODS:
            if method not in fns:
                continue
            times = _time(comm, fns[method], repeats, self_timed=method == "ddp")
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

    methods = [m for m in METHODS if any(r["method"] == m for r in rows)]
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
