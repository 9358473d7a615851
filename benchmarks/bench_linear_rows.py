"""Linear forward+backward with few rows (small per-rank batches): distprop with and without its
few-row paths (blocks under OpenBLAS's unpacked size, weight-left forward, one-row outer
product; ``ops/linalg.py``), and PyTorch, interleaved in one process.

    python benchmarks/bench_linear_rows.py [--threads 1]

Prints one JSON line per shape: median ms of each side (the calling thread's CPU time at 1
thread, wall time above: other threads' work is not in the caller's CPU time) and the ratios
to PyTorch.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--without-torch", action="store_true",
                        help="time only distprop's two sides (at 2 threads PyTorch's OpenMP "
                             "threads keep spinning after its step and slow whatever runs next)")
    args = parser.parse_args()
    os.environ["OPENBLAS_NUM_THREADS"] = str(args.threads)
    import torch

    torch.set_num_threads(args.threads)
    shapes = [(1, 1024, 1024), (2, 1024, 1024), (4, 1024, 1024), (8, 1024, 1024), (8, 512, 2048),
              (8, 2048, 512), (12, 1024, 1024), (16, 256, 1024), (32, 784, 256),
              (32, 1024, 1024), (48, 1024, 1024), (64, 1024, 1024)]
    for rows, fin, fout in shapes:
        print(json.dumps({"rows": rows, "in": fin, "out": fout, "threads": args.threads,
                          **bench_shape(rows, fin, fout, args.repeats, not args.without_torch,
                                                   time.thread_time if args.threads == 1
                                                   else time.perf_counter)}), flush=True)


def bench_shape(rows: int, fin: int, fout: int, repeats: int, with_torch: bool, clock) -> dict:
    """Median ms of PyTorch, of distprop ("fast") and of distprop with its few-row paths off."""
    import numpy as np
    import torch

    import distprop as dp
    from distprop.ops import linalg

    x = np.random.default_rng(0).standard_normal((rows, fin)).astype(np.float32)
    ref = torch.nn.Linear(fin, fout)
    ours = dp.nn.Linear(fin, fout)
    ours.load_state_dict({k: v.detach().numpy() for k, v in ref.state_dict().items()})
    xt, xd = torch.tensor(x), dp.tensor(x)
    host_float = linalg._is_host_float

    def step_torch():
        ref.zero_grad()
        ref(xt).sum().backward()

    def step_ours(fast: bool):
        linalg._is_host_float = host_float if fast else (lambda a: False)
        ours.zero_grad()
        ours(xd).sum().backward()
        linalg._is_host_float = host_float

    sides = {"torch": step_torch} if with_torch else {}
    sides.update(fast=lambda: step_ours(True), plain=lambda: step_ours(False))
    times = {k: [] for k in sides}
    for fn in sides.values():
        fn()
    order = list(sides.items())
    for i in range(repeats):  # rotated: at 2 threads whoever runs after PyTorch meets its
        k = i % len(order)  # still-spinning OpenMP threads
        for name, fn in order[k:] + order[:k]:
            t0 = clock()
            fn()
            times[name].append((clock() - t0) * 1e3)
    med = {k: statistics.median(v) for k, v in times.items()}
    ratios = {f"ratio_{k}": round(med[k] / med["torch"], 3) for k in ("fast", "plain")
              if with_torch}
    return {**{f"ms_{k}": round(v, 4) for k, v in med.items()}, **ratios,
            "fast_over_plain": round(med["fast"] / med["plain"], 3)}

if __name__ == "__main__":
    main()
