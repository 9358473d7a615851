"""Paired microbenchmark of the sequence layers: distprop vs PyTorch, forward + backward.

Families: ``lstm``, ``gru`` (hidden 64-512, 8-256 steps, batch 8-128, 1-2 layers,
bidirectional), ``mha`` (self-attention MultiheadAttention) and ``encoder``
(TransformerEncoderLayer, ff = 4 d, dropout 0), d_model 64-512, 16-256 tokens, 2-8 heads.
Both sides get the same weights, the same input and the same output gradient; their timed
steps alternate, and the ratio is the median of ours over the median of PyTorch's. At one
thread the clock is the process's CPU time (the machine is shared; CPU time does not count the
time slices other processes take), at two threads wall time.
One JSON line per shape, then one summary line per family (median and worst ratio).

    python benchmarks/bench_seq.py --threads 1 --families lstm,gru --repeats 9
    python benchmarks/bench_seq.py --threads 2 --only 'lstm h256' --profile   # cProfile to stderr
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import pstats
import statistics
import time

import numpy as np

# (hidden, steps, batch, layers, bidirectional); input size 64
RNN_SHAPES = [
    (64, 8, 8, 1, False), (64, 64, 32, 1, False), (128, 32, 64, 1, False),
    (256, 32, 64, 1, False), (256, 128, 16, 1, False), (512, 16, 32, 1, False),
    (512, 64, 8, 1, False), (128, 256, 8, 1, False), (64, 32, 128, 2, False),
    (128, 64, 32, 2, True), (256, 16, 128, 1, True), (256, 32, 32, 2, True),
]
# (d_model, tokens, heads, batch)
ATTN_SHAPES = [
    (64, 16, 2, 32), (128, 64, 4, 32), (256, 128, 8, 8), (512, 32, 8, 16),
    (512, 256, 8, 4), (64, 256, 2, 8), (256, 16, 4, 64), (128, 256, 4, 4),
]
INPUT = 64


def _label(family, shape):
    if family in ("lstm", "gru"):
        h, t, b, layers, bi = shape
        return f"{family} h{h} t{t} b{b} l{layers}" + (" bi" if bi else "")
    d, t, heads, b = shape
    return f"{family} d{d} t{t} h{heads} b{b}"


def build(family, shape):
    """(ours_step, torch_step) closures running forward + backward on the same data."""
    import torch

    import distprop as dp

    dp.manual_seed(0)
    rng = np.random.default_rng(0)
    if family in ("lstm", "gru"):
        h, t, b, layers, bi = shape
        cls = dp.nn.LSTM if family == "lstm" else dp.nn.GRU
        tcls = torch.nn.LSTM if family == "lstm" else torch.nn.GRU
        ours = cls(INPUT, h, num_layers=layers, bidirectional=bi, batch_first=True)
        theirs = tcls(INPUT, h, num_layers=layers, bidirectional=bi, batch_first=True)
        x = rng.standard_normal((b, t, INPUT)).astype(np.float32)
        g = rng.standard_normal((b, t, h * (2 if bi else 1))).astype(np.float32)

        def run_ours(m, xt):
            return m(xt)[0]

        def run_theirs(m, xt):
            return m(xt)[0]
    else:
        d, t, heads, b = shape
        if family == "mha":
            ours = dp.nn.MultiheadAttention(d, heads, batch_first=True)
            theirs = torch.nn.MultiheadAttention(d, heads, batch_first=True)

            def run_ours(m, xt):
                return m(xt, xt, xt, need_weights=False)[0]

            def run_theirs(m, xt):
                return m(xt, xt, xt, need_weights=False)[0]
        else:
            ours = dp.nn.TransformerEncoderLayer(d, heads, 4 * d, dropout=0.0, batch_first=True)
            theirs = torch.nn.TransformerEncoderLayer(d, heads, 4 * d, dropout=0.0,
                                                      batch_first=True)

            def run_ours(m, xt):
                return m(xt)

            def run_theirs(m, xt):
                return m(xt)
        x = rng.standard_normal((b, t, d)).astype(np.float32)
        g = rng.standard_normal((b, t, d)).astype(np.float32)
    theirs.load_state_dict({k: torch.from_numpy(np.array(v.numpy()))
                            for k, v in ours.state_dict().items()})
    xo = dp.tensor(x, requires_grad=True)
    go = dp.tensor(g)
    xt = torch.from_numpy(x.copy()).requires_grad_(True)
    gt = torch.from_numpy(g.copy())

    def step_ours():
        ours.zero_grad()
        xo.grad = None
        run_ours(ours, xo).backward(go)

    def step_theirs():
        theirs.zero_grad()
        xt.grad = None
        run_theirs(theirs, xt).backward(gt)

    return step_ours, step_theirs


def time_pair(step_ours, step_theirs, repeats, min_time, clock=time.perf_counter):
    for _ in range(2):
        step_ours()
        step_theirs()
    ours, theirs = [], []
    start = time.perf_counter()
    i = 0
    while i < repeats or time.perf_counter() - start < min_time:
        for fn, store in ((step_ours, ours), (step_theirs, theirs))[:: 1 if i % 2 == 0 else -1]:
            t0 = clock()
            fn()
            store.append(clock() - t0)
        i += 1
        if i >= 4 * repeats:
            break
    return statistics.median(ours), statistics.median(theirs), len(ours)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--families", default="lstm,gru,mha,encoder")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--min-time", type=float, default=0.5,
                        help="keep alternating until this many seconds have passed")
    parser.add_argument("--clock", choices=["auto", "cpu", "wall"], default="auto",
                        help="cpu: process CPU time (robust on a loaded machine, exact for one "
                             "thread); auto: cpu at 1 thread, wall otherwise")
    parser.add_argument("--only", default=None, help="substring of the shape label")
    parser.add_argument("--profile", action="store_true",
                        help="cProfile distprop's step of the selected shapes to stderr")
    args = parser.parse_args(argv)

    import sys

    import torch
    from threadpoolctl import threadpool_limits

    torch.set_num_threads(args.threads)
    cpu = args.clock == "cpu" or (args.clock == "auto" and args.threads == 1)
    clock = time.process_time if cpu else time.perf_counter
    with threadpool_limits(limits=args.threads, user_api="blas"):
        ratios = {}
        for family in args.families.split(","):
            shapes = RNN_SHAPES if family in ("lstm", "gru") else ATTN_SHAPES
            for shape in shapes:
                label = _label(family, shape)
                if args.only and args.only not in label:
                    continue
                ours, theirs = build(family, shape)
                if args.profile:
                    for _ in range(2):
                        ours()
                    prof = cProfile.Profile()
                    prof.enable()
                    for _ in range(args.repeats):
                        ours()
                    prof.disable()
                    s = io.StringIO()
                    pstats.Stats(prof, stream=s).sort_stats("tottime").print_stats(18)
                    print(label, s.getvalue(), file=sys.stderr)
                    continue
                mo, mt, n = time_pair(ours, theirs, args.repeats, args.min_time, clock)
                ratio = mo / mt
                ratios.setdefault(family, []).append(ratio)
                print(json.dumps({"shape": label, "family": family, "threads": args.threads,
                                  "clock": "cpu" if cpu else "wall",
                                  "distprop_ms": round(mo * 1e3, 3),
                                  "torch_ms": round(mt * 1e3, 3), "ratio": round(ratio, 3),
                                  "samples": n}), flush=True)
        for family, rs in ratios.items():
            print(json.dumps({"summary": family, "threads": args.threads,
                              "median_ratio": round(statistics.median(rs), 3),
                              "worst_ratio": round(max(rs), 3), "shapes": len(rs)}), flush=True)


if __name__ == "__main__":
    main()
