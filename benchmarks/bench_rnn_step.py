"""One step's recurrent products of an LSTM at 1 thread: one OpenBLAS product or column blocks.

For each ``H,B``: ``h @ W_hh^T`` (forward) and ``dgates @ W_hh`` (backward) as one product and
as the column blocks of ``distprop.ops._util.column_blocks`` (thread CPU time, median of 9 x 50
calls, microseconds; ``*_blocks``: how many blocks the plan uses, 1 = not blocked). With
``--threads N`` > 1 (BLAS threads) the clock is wall time.

    python benchmarks/bench_rnn_step.py 256,8 512,8 256,16
    python benchmarks/bench_rnn_step.py --threads 2 256,8
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np

CLOCK = {"now": time.thread_time}


def _median_time(fn, number: int, repeat: int) -> float:
    clock = CLOCK["now"]
    times = []
    for _ in range(repeat):
        start = clock()
        for _ in range(number):
            fn()
        times.append((clock() - start) / number)
    return statistics.median(times)


def products(hidden: int, batch: int) -> dict:
    from distprop.ops._util import column_blocks
    from distprop.ops.rnn import _padded_copy

    rng = np.random.default_rng(0)
    w = rng.standard_normal((4 * hidden, hidden)).astype(np.float32)
    w_p, w_tp = _padded_copy(np, w), _padded_copy(np, np.ascontiguousarray(w.T))
    h = rng.standard_normal((batch, hidden)).astype(np.float32)
    d = rng.standard_normal((batch, 4 * hidden)).astype(np.float32)
    rec, dh = np.empty((batch, 4 * hidden), np.float32), np.empty((batch, hidden), np.float32)
    row = {"hidden": hidden, "batch": batch}
    for name, lhs, weight, out in (("forward", h, w_tp, rec), ("backward", d, w_p, dh)):
        blocks = column_blocks(np, batch, weight, out)

        def blocked(lhs=lhs, blocks=blocks):
            for w_block, o_block in blocks:
                np.matmul(lhs, w_block, out=o_block)

        def one(lhs=lhs, weight=weight, out=out):
            np.matmul(lhs, weight, out=out)

        row[f"{name}_one_us"] = round(_median_time(one, 50, 9) * 1e6, 1)
        row[f"{name}_blocked_us"] = round(_median_time(blocked, 50, 9) * 1e6, 1)
        row[f"{name}_blocks"] = len(blocks)
    return row


def _shape(text: str) -> tuple[int, int]:
    try:
        hidden, batch = (int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected H,B (two integers), got {text!r}") from None
    if hidden <= 0 or batch <= 0:
        raise argparse.ArgumentTypeError(f"H and B must be positive, got {text!r}")
    return hidden, batch


def _threads(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return int(text)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("shapes", nargs="+", metavar="H,B", type=_shape)
    parser.add_argument("--threads", type=_threads, default=1, metavar="N",
                        help="BLAS threads (default 1)")
    args = parser.parse_args(argv)
    from threadpoolctl import threadpool_limits

    threadpool_limits(args.threads)
    if args.threads > 1:
        CLOCK["now"] = time.perf_counter
    for hidden, batch in args.shapes:
        row = products(hidden, batch)
        print(json.dumps({**row, "threads": args.threads}), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
