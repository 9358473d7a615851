"""Per-rank memory of Adam on the `wide` model (25.2 M float32 parameters): plain Adam vs
ZeroRedundancyOptimizer, both behind DistributedDataParallel, on 1 and 2 ranks.

Each rank prints one JSON line: optimizer state bytes it holds (exact: the state arrays and
scalars), parameter bytes, peak RSS, and the median step time (forward, backward, gradient sync,
optimizer step; ZeRO's all-gather included). Run every configuration as its own job so that peak
RSS belongs to one optimizer:

    for n in 1 2; do for o in plain zero; do
      OMP_NUM_THREADS=1 mpiexec -n $n python benchmarks/bench_zero.py --optimizer $o
    done; done
    OMP_NUM_THREADS=1 mpiexec -n 2 python benchmarks/bench_zero.py --optimizer zero --no-ddp
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import distprop as dp
from distprop import distributed as dist
from distprop import models, nn
from distprop.bench.runner import peak_rss_mb
from distprop.distributed.zero import optimizer_state_nbytes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--optimizer", choices=("plain", "zero"), default="zero")
    parser.add_argument("--no-ddp", action="store_true",
                        help="ZeRO only: no DDP wrapper; ZeRO reduce-scatters the gradients")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=2)
    args = parser.parse_args()
    if args.no_ddp and args.optimizer != "zero":
        parser.error("--no-ddp needs --optimizer zero (plain Adam needs DDP to average gradients)")
    comm = dist.init()
    dp.manual_seed(0)
    model = models.build_model("wide")
    ddp = model if args.no_ddp else dist.DistributedDataParallel(model, comm=comm)
    if args.optimizer == "zero":
        opt = dist.ZeroRedundancyOptimizer(model.parameters(), dp.optim.Adam, lr=1e-3)
    else:
        opt = dp.optim.Adam(model.parameters(), lr=1e-3)
    x, y = models.sample_batch("wide", seed=comm.rank)
    loss_fn = nn.CrossEntropyLoss()
    times = []
    for step in range(args.warmup + args.steps):
        comm.barrier()
        t0 = time.perf_counter()
        opt.zero_grad()
        loss_fn(ddp(x), y).backward()
        opt.step()
        if step >= args.warmup:
            times.append(time.perf_counter() - t0)
    params = sum(p.data.nbytes for p in model.parameters())
    name = f"adam-{args.optimizer}" + ("-no-ddp" if args.no_ddp else "")
    row = {"workload": "wide", "optimizer": name, "ranks": comm.size,
           "rank": comm.rank, "parameter_bytes": params,
           "optimizer_state_bytes": optimizer_state_nbytes(opt),
           "peak_rss_mb": peak_rss_mb(),
           "step_s_median": statistics.median(times)}
    lines = comm.allgather_obj(json.dumps(row))
    if comm.rank == 0:
        print("\n".join(lines), flush=True)


if __name__ == "__main__":
    main()
