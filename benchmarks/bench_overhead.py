"""Per-step Python overhead of the autograd core: a tiny model, forward + backward, many times.

Prints one JSON line per case with microseconds per step (median of repeats, thread CPU time).
Usage: python benchmarks/bench_overhead.py [--steps N] [--repeats R] [--profile CASE]
"""

from __future__ import annotations

import argparse
import cProfile
import json
import pstats
import time

import numpy as np

import distprop as dp
from distprop import nn


def _mlp():
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8))
    x = dp.tensor(np.random.default_rng(0).standard_normal((4, 8)).astype(np.float32))

    def step():
        model(x).sum().backward()

    return step


def _bn():
    model = nn.BatchNorm1d(8)
    x = dp.tensor(np.random.default_rng(0).standard_normal((256, 8)).astype(np.float32))

    def step():
        model(x).sum().backward()

    return step


def _ops():
    a = dp.tensor(np.ones((4, 4), np.float32), requires_grad=True)

    def step():
        y = (a * 2.0 + 1.0).relu().sum()
        y.backward()

    return step


def _nograd():
    a = dp.tensor(np.ones((4, 4), np.float32))

    def step():
        (a * 2.0 + 1.0).relu().sum()

    return step


CASES = {"mlp": _mlp, "bn": _bn, "ops": _ops, "nograd_ops": _nograd}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--profile", default=None)
    args = ap.parse_args()
    if args.profile:
        step = CASES[args.profile]()
        pr = cProfile.Profile()
        pr.enable()
        for _ in range(args.steps):
            step()
        pr.disable()
        pstats.Stats(pr).sort_stats("tottime").print_stats(25)
        return
    for name, make in CASES.items():
        step = make()
        for _ in range(50):
            step()
        times = []
        for _ in range(args.repeats):
            t0 = time.thread_time()
            for _ in range(args.steps):
                step()
            times.append((time.thread_time() - t0) / args.steps * 1e6)
        print(json.dumps({"case": name, "us_per_step": round(float(np.median(times)), 2)}))


if __name__ == "__main__":
    main()
