"""Gradient synchronisation of the ``wide`` model: DDP vs one MPI_Allreduce, overlap on vs off.

Run under MPI (2 ranks, one thread each)::

    OMP_NUM_THREADS=1 mpiexec -n 2 python benchmarks/bench_comm.py --steps 30

Prints one JSON line per measurement (rank 0): median/min/max over ``--steps`` timed steps
after ``--warmup`` steps, every variant once per step in turn (so drifting load hits all alike).
Per step, ``step_s`` is the slowest rank's time and ``sync_s`` the smallest over ranks (the rank
that arrives last waits for nobody: its time is the synchronisation without load imbalance).
Measurements:

* ``mpi-allreduce``: one ``MPI.Allreduce`` (in place, float32) of the model's gradient bytes.
* ``compute``: forward + backward of the bare model (no DDP, no communication).
* ``ddp-overlap-off``: DDP with ``overlap=False``; ``sync_s`` is the end-of-backward work
  (divide by the world size + non-finite check, one allreduce of the flat buffer, wait), i.e.
  the gradient sync time.
* ``ddp-overlap-on``: buckets start during backward; ``sync_s`` is what remains exposed after
  backward. ``-thread``/``-no-thread`` force the MPI progress thread on/off (the others use the
  default, ``DISTPROP_PROGRESS_THREAD`` or auto).
* ``ddp-*-nocheck``: the same with ``nonfinite=None`` (no non-finite check).
* ``ddp-shm-overlap-off`` / ``-on``: node-shared gradient buffers (``comm='shm'``) instead of
  MPI's allreduce (the other ``ddp-*`` variants pass the MPI communicator explicitly).
* ``--compression``: also ``ddp-fp16``/``ddp-bf16`` with overlap off.

``step_s`` is forward + backward (+ sync) wall time; ``exposed_by_step_s = step_s - compute
step_s`` is the communication cost the step actually pays, overlap or not.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np

import distprop as dp
from distprop import distributed as dist
from distprop import nn
from distprop.bench.runner import peak_rss_mb


def build_wide() -> nn.Module:
    try:
        from distprop.models import build_model

        return build_model("wide")
    except ImportError:
        return nn.Sequential(
            nn.Linear(1024, 4096), nn.ReLU(), nn.Linear(4096, 4096), nn.ReLU(),
            nn.Linear(4096, 1024), nn.ReLU(), nn.Linear(1024, 10),
        )


def stats(values: list[float]) -> dict:
    arr = np.asarray(values)
    return {"median": float(np.median(arr)), "min": float(arr.min()), "max": float(arr.max())}


class Variant:
    """One measured configuration: its own model replica (and DDP wrapper), timed per step."""

    def __init__(self, name: str, ddp_kwargs: dict | None, progress_thread: bool | None):
        self.name, self.ddp_kwargs, self.progress_thread = name, ddp_kwargs, progress_thread
        self.model = build_wide()
        self.ddp = (dist.DistributedDataParallel(self.model, **ddp_kwargs)
                    if ddp_kwargs is not None else None)
        self.net = self.ddp if self.ddp is not None else self.model
        self.step_s, self.sync_s, self.overlapped = [], [], []

    def step(self, comm, x, y, record: bool) -> None:
        if self.progress_thread is not None:
            comm.set_progress_thread(self.progress_thread)
        for p in self.model.parameters():
            p.grad = None
        comm.barrier()
        t0 = time.perf_counter()
        dp.functional.cross_entropy(self.net(x), y).backward()
        elapsed = time.perf_counter() - t0
        if record:
            self.step_s.append(elapsed)
            if self.ddp is not None:
                self.sync_s.append(self.ddp.last_sync["finish_s"])
                self.overlapped.append(self.ddp.last_sync["overlapped"])

    def record(self) -> dict:
        out = {"step_s": stats(self.step_s)}
        if self.progress_thread is not None:
            out["progress_thread"] = self.progress_thread
        if self.ddp is not None:
            out.update(sync_s=stats(self.sync_s), buckets=len(self.ddp.buckets),
                       overlapped_buckets=int(np.median(self.overlapped)))
        return out


class RawAllreduce:
    """One in-place ``MPI.Allreduce`` of ``numel`` float32 (the floor for gradient sync)."""

    name = "mpi-allreduce"

    def __init__(self, numel: int):
        self.buf = np.ones(numel, dtype=np.float32)
        self.sync_s: list[float] = []

    def step(self, comm, x, y, record: bool) -> None:
        from mpi4py import MPI

        comm.barrier()
        t0 = time.perf_counter()
        comm.comm.Allreduce(MPI.IN_PLACE, self.buf, MPI.SUM)
        if record:
            self.sync_s.append(time.perf_counter() - t0)

    def record(self) -> dict:
        return {"sync_s": stats(self.sync_s), "numel": int(self.buf.size),
                "mbytes": round(self.buf.nbytes / 2**20, 1)}


def across_ranks(comm, variant) -> dict:
    """Combine the ranks' per-step samples: a step takes as long as its slowest rank, while the
    synchronisation itself is best seen on the rank that arrived last (the others' sync time
    also holds their wait for it), so ``sync_s`` takes the per-step minimum over ranks."""
    per_rank = comm.allgather_obj({"step_s": getattr(variant, "step_s", []),
                                   "sync_s": variant.sync_s})
    out = variant.record()
    for key, reduce in (("step_s", np.max), ("sync_s", np.min)):
        samples = [r[key] for r in per_rank]
        if samples[0]:
            out[key] = stats(list(reduce(np.asarray(samples), axis=0)))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--batch", type=int, default=32, help="samples per rank")
    parser.add_argument("--compression", action="store_true")
    parser.add_argument("--only", default=None,
                        help="comma-separated DDP variants to run (default: all)")
    parser.add_argument("--out", default=None, help="append the JSON lines to this file")
    args = parser.parse_args()

    comm = dist.init()
    if comm.size < 2:
        raise SystemExit("run under mpiexec with at least 2 ranks")
    dp.manual_seed(0)
    rng = np.random.default_rng(comm.rank)
    x = dp.tensor(rng.standard_normal((args.batch, 1024)).astype(np.float32))
    y = dp.tensor(rng.integers(0, 10, args.batch))
    base = {"bench": "comm", "workload": "wide", "ranks": comm.size,
            "threads": int(os.environ.get("OMP_NUM_THREADS", "0") or 0), "batch": args.batch}
    lines = []

    def emit(peer: str, record: dict, **extra) -> None:
        line = {**base, "peer": peer, **record, **extra}
        lines.append(line)
        if comm.rank == 0:
            print(json.dumps(line), flush=True)

    numel = sum(p.numel() for p in build_wide().parameters())
    default_thread = comm.progress_thread  # DISTPROP_PROGRESS_THREAD, else auto
    base["progress_thread_default"] = default_thread
    mpi = dict(comm="mpi")  # MPI's allreduce (the default is node-shared buffers)
    specs = [  # name, DDP kwargs, progress thread (set before each of the variant's steps)
        ("compute", None, default_thread),
        ("ddp-overlap-off", dict(overlap=False, **mpi), default_thread),
        ("ddp-overlap-on", dict(overlap=True, **mpi), default_thread),
        ("ddp-overlap-on-thread", dict(overlap=True, **mpi), True),
        ("ddp-overlap-on-no-thread", dict(overlap=True, **mpi), False),
        ("ddp-overlap-off-nocheck", dict(overlap=False, nonfinite=None, **mpi), default_thread),
        ("ddp-overlap-on-nocheck", dict(overlap=True, nonfinite=None, **mpi), default_thread),
        ("ddp-shm-overlap-off", dict(overlap=False, comm="shm"), default_thread),
        ("ddp-shm-overlap-on", dict(overlap=True, comm="shm"), default_thread),
    ]
    if args.compression:
        specs += [("ddp-fp16", dict(overlap=False, compression="fp16"), default_thread),
                  ("ddp-bf16", dict(overlap=False, compression="bf16"), default_thread)]
    if args.only:
        keep = set(args.only.split(",")) | {"compute"}
        specs = [spec for spec in specs if spec[0] in keep]
    variants = [RawAllreduce(numel)] + [Variant(*spec) for spec in specs]
    # Round robin: every step runs each variant once, so drifting machine load hits all alike.
    for i in range(args.warmup + args.steps):
        for v in variants:
            v.step(comm, x, y, record=i >= args.warmup)
    results = {v.name: across_ranks(comm, v) for v in variants}
    raw, compute = results["mpi-allreduce"], results["compute"]
    emit("mpi-allreduce", raw)
    emit("compute", compute)
    for name, rec in results.items():
        if not name.startswith("ddp"):
            continue
        rec["exposed_by_step_s"] = rec["step_s"]["median"] - compute["step_s"]["median"]
        extra = {"sync_vs_allreduce": rec["sync_s"]["median"] / raw["sync_s"]["median"]}
        if name.startswith("ddp-overlap-on"):
            off = results.get("ddp-overlap-off" + ("-nocheck" if "nocheck" in name else ""))
            if off is not None:
                extra["exposed_vs_overlap_off"] = rec["sync_s"]["median"] / off["sync_s"]["median"]
        emit(name, rec, **extra)
    comm.set_progress_thread(default_thread)
    rss = comm.allgather_obj(peak_rss_mb())
    emit("peak-rss", {"peak_rss_mb": max(rss)})
    if args.out and comm.rank == 0:
        with open(args.out, "a") as f:
            for line in lines:
                f.write(json.dumps(line) + "\n")


if __name__ == "__main__":
    main()
