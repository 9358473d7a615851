"""Would splitting elementwise work over 2 threads pay? ReLU forward+backward and the float32
GELU kernel, whole array on this thread vs halves on this thread and one pool thread (NumPy
releases the GIL inside ufunc loops). Minimum of ``--repeat`` calls, milliseconds, wall clock.
One JSON line per (op, size). Not used by distprop: it records why elementwise ops stay on
one thread (see benchmarks/results/split_elementwise.md).

    python benchmarks/bench_split_elementwise.py
"""

from __future__ import annotations

import argparse
import functools
import json
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np


def _best_ms(fn, repeat: int) -> float:
    fn()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times) * 1e3


def _relu(x, g, out, gx, lo, hi):
    np.maximum(x[lo:hi], 0, out=out[lo:hi])
    np.multiply(g[lo:hi], out[lo:hi] > 0, out=gx[lo:hi])


def _gelu(x, g, out, gx, lo, hi):
    from distprop.ops.activation import _gelu_f32

    with np.errstate(over="ignore", under="ignore"):
        o, d = _gelu_f32(x[lo:hi])
    out[lo:hi], gx[lo:hi] = o, d


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="65536,262144,1048576,1433600")
    parser.add_argument("--repeat", type=int, default=30)
    args = parser.parse_args(argv)
    pool = ThreadPoolExecutor(1)
    for size in (int(s) for s in args.sizes.split(",")):
        x = np.random.default_rng(0).standard_normal(size).astype(np.float32)
        arrays = (x, np.ones_like(x), np.empty_like(x), np.empty_like(x))
        for name, op in (("relu", _relu), ("gelu", _gelu)):
            whole = functools.partial(op, *arrays, 0, size)
            first, second = (functools.partial(op, *arrays, 0, size // 2),
                             functools.partial(op, *arrays, size // 2, size))

            def halves(first=first, second=second):
                job = pool.submit(second)
                first()
                job.result()

            one = _best_ms(whole, args.repeat)
            two = _best_ms(halves, args.repeat)
            print(json.dumps({"op": name, "elements": size, "one_thread_ms": round(one, 3),
                              "two_threads_ms": round(two, 3),
                              "speedup": round(one / two, 2)}), flush=True)
    pool.shutdown()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
