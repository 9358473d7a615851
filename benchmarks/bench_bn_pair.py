"""Paired micro-benchmark: BatchNorm forward+backward (training), this tree vs another norm.py.

Usage: python benchmarks/bench_bn_pair.py OLD/distprop/ops/norm.py
Both versions run alternately in one process on the same tensors (thread CPU time, medians);
prints ours/old per shape. Used for issue 14 (results in benchmarks/results/fast_paths2.md).
"""

import importlib.util
import sys
import time

import numpy as np

import distprop as dp
from distprop.ops import norm as new

SHAPES = [(128, 64), (256, 8), (32, 32, 4, 4), (16, 128, 4, 4), (32, 64, 8, 8), (8, 32, 16, 16),
          (16, 16, 32, 32), (32, 128, 16, 16)]


def main(old_path):
    spec = importlib.util.spec_from_file_location("old_norm", old_path)
    old = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(old)
    rng = np.random.default_rng(0)
    for shape in SHAPES:
        c = shape[1]
        x = dp.tensor(rng.standard_normal(shape).astype(np.float32), requires_grad=True)
        g = dp.tensor(rng.standard_normal(shape).astype(np.float32))
        w = dp.tensor(np.ones(c, np.float32), requires_grad=True)
        b = dp.tensor(np.zeros(c, np.float32), requires_grad=True)
        rm, rv = dp.tensor(np.zeros(c, np.float32)), dp.tensor(np.ones(c, np.float32))
        times = {"old": [], "new": []}
        for _ in range(200 if x.numel() < 100_000 else 15):
            for name, mod in (("old", old), ("new", new)):
                t0 = time.thread_time()
                mod.batch_norm(x, rm, rv, w, b, training=True).backward(g)
                times[name].append(time.thread_time() - t0)
        o, n = np.median(times["old"]), np.median(times["new"])
        print(f"{shape} old {o * 1e6:.1f} us  new {n * 1e6:.1f} us  new/old {n / o:.3f}")


if __name__ == "__main__":
    main(sys.argv[1])
