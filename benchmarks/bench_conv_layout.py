"""The convolution's two column layouts, forward+backward of one layer at 1 thread.

``ConvNd`` stores its im2col columns rows-major ``(M, g, K)`` (gathered from a channels-last
input) or ``(g, K, M)`` (from a channels-first one); ``ConvNd.rows_layout`` picks one from the
channels per group. This times both on each shape, for a channels-first and a channels-last
input (what the layer before hands on), interleaved, minimum of ``--repeat`` rounds of
``--number`` steps each, milliseconds per step, wall clock with BLAS held to one thread.
Prints one JSON line per shape and input layout; ``cols_over_rows`` < 1: ``(g, K, M)`` is faster.

    python benchmarks/bench_conv_layout.py
    python benchmarks/bench_conv_layout.py 8,16,32,64,3,2,2 16,8,32,32,5,1,1
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np

# (batch, in channels, out channels, image px, kernel, stride, groups)
SHAPES = [
    (8, 16, 32, 64, 3, 2, 2), (8, 8, 16, 32, 3, 2, 1), (16, 16, 16, 32, 3, 1, 2),
    (8, 32, 32, 32, 3, 1, 4), (16, 8, 32, 32, 5, 1, 1), (32, 8, 32, 16, 3, 1, 1),
    (32, 8, 8, 16, 3, 1, 1), (16, 16, 32, 32, 3, 1, 1), (16, 32, 64, 32, 3, 1, 2),
    (16, 64, 64, 16, 3, 1, 4), (16, 8, 8, 32, 3, 2, 1), (8, 16, 16, 32, 3, 1, 2),
    (16, 8, 16, 16, 5, 1, 1),
]


def _step_ms(conv, x, w, b, pads, stride, groups, rows, number):
    from distprop.ops.conv import ConvNd

    f = ConvNd()
    f.needs_input_grad = (True, True, True)
    saved = ConvNd.rows_layout
    ConvNd.rows_layout = classmethod(lambda cls, cg, og, groups: rows)
    try:
        out = f.forward(x, w, b, stride=stride, padding=pads, dilation=(1, 1), groups=groups)
        grad = np.ones(out.shape, dtype=out.dtype)
        start = time.perf_counter()
        for _ in range(number):
            f.forward(x, w, b, stride=stride, padding=pads, dilation=(1, 1), groups=groups)
            f.backward(grad)
        return (time.perf_counter() - start) / number * 1e3
    finally:
        ConvNd.rows_layout = saved


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("shapes", nargs="*", help="n,c,o,px,k,stride,groups (default: a table)")
    parser.add_argument("--number", type=int, default=5)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args(argv)
    from threadpoolctl import threadpool_limits

    from distprop.ops import conv

    shapes = [tuple(int(v) for v in s.split(",")) for s in args.shapes] or SHAPES
    with threadpool_limits(1):
        for n, c, o, px, k, s, g in shapes:
            rng = np.random.default_rng(0)
            x = rng.standard_normal((n, c, px, px)).astype(np.float32)
            w = rng.standard_normal((o, c // g, k, k)).astype(np.float32)
            b = rng.standard_normal(o).astype(np.float32)
            pads = ((k // 2, k // 2),) * 2
            for layout in ("channels_first", "channels_last"):
                xin = x if layout == "channels_first" else conv.move_channels_first(
                    np.ascontiguousarray(conv.move_channels_last(x)))
                best = {True: [], False: []}
                for _ in range(args.repeat):
                    for rows in (True, False):
                        best[rows].append(_step_ms(conv, xin, w, b, pads, (s, s), g, rows,
                                                   args.number))
                rows_ms, cols_ms = min(best[True]), min(best[False])
                print(json.dumps({
                    "batch": n, "cin": c, "cout": o, "px": px, "k": k, "stride": s, "groups": g,
                    "input": layout, "rows_ms": round(rows_ms, 3), "cols_ms": round(cols_ms, 3),
                    "cols_over_rows": round(cols_ms / rows_ms, 3),
                    "chosen": "rows" if conv.ConvNd.rows_layout(c // g, o // g, g) else "cols",
                }), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
