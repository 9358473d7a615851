"""ms per MB of float32 gradient for the fp16/bf16 codec: encode, decode, and the 2-rank sum.

    python benchmarks/bench_codec.py [--baseline OLD_TREE] [--mb 4] [--repeats 15] [--clock cpu]

``sum`` is what one rank computes for a 2-rank 16-bit sum: this tree's local reduction (decode
both halves, add in float32, encode once, as _HalfAllreduce does) or, for the baseline tree, its
user-defined MPI op ``_sum16`` on the same words. With ``--baseline`` (a checkout of an older
distprop, e.g. ``git archive OLD | tar -x -C DIR``) both trees are timed call by call, interleaved,
and the medians are printed side by side. One process, no MPI.
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]


def _load(tree: Path, name: str):
    spec = importlib.util.spec_from_file_location(
        name, tree / "distprop" / "distributed" / "compression.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _local_sum(codec, a16, b16, kind):
    codec.sum_words([a16, b16], b16, kind)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline", type=Path, default=None)
    parser.add_argument("--mb", type=float, default=4.0)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                        help="cpu: this thread's CPU time (time.thread_time), which a loaded "
                             "machine's waiting does not inflate")
    args = parser.parse_args()
    sys.path.insert(0, str(REPO))
    trees = {"after": _load(REPO, "codec_after")}
    if args.baseline:
        sys.path.insert(0, str(args.baseline))
        trees["before"] = _load(args.baseline, "codec_before")
    clock = time.perf_counter if args.clock == "wall" else time.thread_time
    n = int(args.mb * 1e6 / 4)
    x = (np.random.default_rng(0).standard_normal(n) * 1e-3).astype(np.float32)
    mb = x.nbytes / 1e6
    for kind in ("fp16", "bf16"):
        times = {(t, op): [] for t in trees for op in ("encode", "decode", "sum")}
        for _ in range(args.repeats):
            for tree, codec in trees.items():
                w, out = np.empty(n, np.uint16), np.empty(n, np.float32)
                t0 = clock()
                codec.encode(x, w, kind)
                t1 = clock()
                codec.decode(w, out, kind)
                t2 = clock()
                w2 = w[::-1].copy()
                t3 = clock()
                if hasattr(codec, "sum_words"):
                    _local_sum(codec, w, w2, kind)
                else:  # a tree from before sum_words: its user-defined MPI op
                    codec._sum16(memoryview(w), memoryview(w2), kind)
                t4 = clock()
                times[tree, "encode"].append(t1 - t0)
                times[tree, "decode"].append(t2 - t1)
                times[tree, "sum"].append(t4 - t3)
        for op in ("encode", "decode", "sum"):
            cells = "  ".join(f"{tree} {1e3 * statistics.median(times[tree, op]) / mb:6.2f}"
                              for tree in trees)
            print(f"{kind} {op:6s} ms/MB: {cells}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
