"""The per-rank benchmark worker: ``python -m distprop.bench.runner CONFIG_JSON``.

Every rank builds the same zoo model, wraps it in DistributedDataParallel, trains it with SGD
(momentum 0.9) on random inputs of the workload's shape, warms up, then times each step and its
phases (see :mod:`distprop.bench.breakdown`). Rank 0 gathers every rank's per-step timings and
prints them as one JSON line prefixed with :data:`~distprop.bench.launching.RESULT_PREFIX`.
"""

from __future__ import annotations

import json
import os
import resource
import sys
import time
import traceback

from distprop import heap, trace
from distprop.bench.breakdown import step_breakdown
from distprop.bench.launching import RESULT_PREFIX


def peak_rss_mb() -> float:
    """This process's peak resident set size in MiB.

    Linux: ``VmHWM`` of ``/proc/self/status`` (``ru_maxrss`` would include the forking parent's,
    as it survives ``exec``); elsewhere ``ru_maxrss`` (KiB, bytes on macOS).
    """
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 1024.0 if sys.platform != "darwin" else rss / 2**20


def default_batch(workload: str) -> int:
    """The benchmark's batch per rank of a zoo workload (BENCHMARKS.md)."""
    from distprop import models

    return models.batch_size(workload)


def make_batch(workload: str, batch: int, seed: int):
    """Random inputs and labels (NumPy) of the workload's shape, the same for every framework."""
    from distprop import models

    x, y = models.sample_batch(workload, batch, seed=seed)
    return x.numpy(), y.numpy()


def _device_sync(dev) -> None:
    if dev.is_cuda:
        from distprop import backend

        backend.cupy_module().cuda.get_current_stream().synchronize()


def train_worker(config: dict) -> dict | None:
    """Time ``config["steps"]`` training steps on this rank; rank 0 returns every rank's data."""
    from threadpoolctl import threadpool_limits

    threadpool_limits(int(config.get("threads_per_rank", 1)))
    import distprop as dp
    from distprop.models import build_model

    world = dp.distributed.init()
    rank, size = world.rank, world.size
    dev = dp.device(config.get("device", "cpu") if config.get("device") != "cuda"
                    else f"cuda:{dp.distributed.get_local_rank()}")
    workload = config["workload"]
    batch = int(config["batch_per_rank"])
    trace.enable(None, rank=rank)
    trace.clear()

    dp.manual_seed(int(config.get("seed", 0)))
    model = build_model(workload).to(dev)
    ddp = dp.distributed.DistributedDataParallel(
        model, bucket_cap_mb=float(config.get("bucket_mb", 25.0)),
        overlap=bool(config.get("overlap", True)), compression=config.get("compression"),
        # a benchmark times the steady state: PowerSGD compresses from the second step on
        compression_options={"start_powerSGD_iter": 2}
        if config.get("compression") == "powersgd" else None)
    opt = dp.optim.SGD(model.parameters(), lr=float(config.get("lr", 1e-3)), momentum=0.9)
    x_np, y_np = make_batch(workload, batch, seed=1000 + rank)
    x, y = dp.tensor(x_np, device=dev), dp.tensor(y_np, device=dev)
    loss_fn = dp.nn.CrossEntropyLoss()

    warmup, steps = int(config.get("warmup", 5)), int(config["steps"])
    keep_trace = bool(config.get("trace"))
    kept: list[dict] = []
    per_step: dict[str, list[float]] = {k: [] for k in (
        "step_s", "forward_s", "backward_s", "optimizer_s", "compute_s", "comm_s",
        "exposed_comm_s", "launch_s")}
    world.barrier()
    for i in range(warmup + steps):
        t0 = trace.now_ns()
        opt.zero_grad()
        with trace.span("forward", step=i):
            loss = loss_fn(ddp(x), y)
            _device_sync(dev)
        with trace.span("backward", step=i):
            loss.backward()
            _device_sync(dev)
        with trace.span("optimizer.step", step=i):
            opt.step()
            _device_sync(dev)
        t1 = trace.now_ns()
        trace.complete("step", t0, t1, step=i, warmup=i < warmup)
        events = trace.take_events()
        if keep_trace:
            kept.extend(events)
        if i < warmup:
            continue
        parts = step_breakdown(events)
        per_step["step_s"].append((t1 - t0) * 1e-9)
        for key, value in parts.items():
            per_step[key].append(value)
    loss_value = float(loss.item())
    if keep_trace:
        trace_path = trace.rank_path(config["trace"], rank)
        trace.save(trace_path, kept)
    mine = {"rank": rank, "host": os.uname().nodename, "peak_rss_mb": peak_rss_mb(),
            "heap": heap.state, "final_loss": loss_value, **per_step}
    gathered = _gather(mine, size)
    if rank != 0:
        return None
    return {**{k: config.get(k) for k in ("workload", "mode", "threads_per_rank", "batch_per_rank",
                                          "overlap", "bucket_mb", "compression", "device",
                                          "warmup", "steps")},
            "ranks": size, "per_rank": gathered,
            "params": int(sum(p.numel() for p in model.parameters()))}


def _gather(obj: dict, size: int) -> list[dict]:
    if size == 1:
        return [obj]
    from mpi4py import MPI

    return MPI.COMM_WORLD.gather(obj, root=0)


def guarded_main(worker, argv: list[str] | None = None) -> int:
    """Run ``worker(config)`` on this rank and print its result line (rank 0).

    One failing rank must not leave the others waiting in a collective: it prints its
    traceback once, prefixed with its rank, and ends the whole job (MPI Abort).
    """
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m distprop.bench.runner CONFIG_JSON", file=sys.stderr)
        return 2
    config = json.loads(argv[0])
    try:
        result = worker(config)
    except BaseException:
        rank = trace.rank_from_env()
        text = traceback.format_exc()
        sys.stderr.write("".join(f"[rank {rank}] {line}\n" for line in text.splitlines()))
        sys.stderr.flush()
        _abort()
        return 1
    if result is not None:
        result["finished_at"] = time.time()
        print(RESULT_PREFIX + json.dumps(result), flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    return guarded_main(_dispatch, argv)


def _abort() -> None:
    try:
        from mpi4py import MPI

        if MPI.Is_initialized() and not MPI.Is_finalized() and MPI.COMM_WORLD.Get_size() > 1:
            MPI.COMM_WORLD.Abort(1)
    except ImportError:
        pass


def _dispatch(config: dict) -> dict | None:
    kind = config.get("kind", "train")
    if kind == "train":
        result = train_worker(config)
    elif kind == "allreduce":
        from distprop.bench.allreduce import worker

        result = worker(config)
        from mpi4py import MPI

        if MPI.COMM_WORLD.Get_rank() != 0:
            result = None
    elif kind == "gemm":
        from distprop.bench.peers import gemm_worker

        result = gemm_worker(config)
    else:
        raise ValueError(f"unknown benchmark kind {kind!r}")
    return result


if __name__ == "__main__":
    sys.exit(main())
