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
from distprop.tensor import Function


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


class _Id(Function):
    """The cheapest possible node: the framework's cost alone."""

    def forward(self, a):
        return a

    def backward(self, g):
        return g


def _id_chain(depth, backward):
    a = dp.tensor(np.ones((1,), np.float32), requires_grad=True)
    g1 = np.ones((1,), np.float32)

    def step():
        y = a
        for _ in range(depth):
            y = _Id.apply(y)
        if backward:
            y.backward(g1)
            a.grad = None

    return step


CASES = {
    "mlp": _mlp,
    "bn": _bn,
    "ops": _ops,
    "nograd_ops": _nograd,
    "apply_1": lambda: _id_chain(1, False),
    "node_1_fwd_bwd": lambda: _id_chain(1, True),
    "chain_3_fwd_bwd": lambda: _id_chain(3, True),
}


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
