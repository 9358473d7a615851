"""col2im of a one-group, rows-major (channels-last) convolution: runs vs one add per offset.

``distprop.ops.conv._col2im_runs`` adds runs of ``kernel[-1] * C`` contiguous floats; the
per-offset loop it replaced (copied here as the reference) adds runs of ``C``. Both on the same
column gradient, interleaved, BLAS-free (no GEMM involved), minimum of ``--repeat`` rounds of
``--number`` calls, milliseconds per call, wall clock, one thread. One JSON line per shape.

    python benchmarks/bench_col2im.py
    python benchmarks/bench_col2im.py 64,16,16,16,5,1,1
"""

from __future__ import annotations

import argparse
import itertools
import json
import time

import numpy as np

# (batch, in channels C, image px, padding, kernel, stride, dilation=1)
SHAPES = [
    (64, 16, 16, 2, 5, 1), (32, 16, 28, 2, 5, 1), (8, 16, 64, 1, 3, 2), (64, 16, 16, 1, 3, 1),
    (64, 16, 8, 1, 3, 1), (32, 16, 32, 1, 3, 1), (16, 16, 64, 2, 5, 1), (32, 16, 14, 2, 5, 1),
    (32, 24, 16, 1, 3, 1),
    # from 32 channels on (distprop keeps the per-offset adds there)
    (64, 32, 11, 0, 3, 1), (32, 32, 32, 1, 3, 1), (64, 32, 16, 1, 3, 1), (32, 32, 8, 2, 5, 1),
    (32, 32, 14, 2, 5, 1), (32, 32, 16, 2, 5, 1), (16, 64, 16, 2, 5, 1), (32, 64, 16, 1, 3, 1),
    (16, 64, 32, 1, 3, 1), (64, 128, 8, 1, 3, 1),
]


def per_offset(gcols, gpad, kernel, stride, out_sp):
    """The previous col2im loop: one add per kernel offset, runs of C floats."""
    nd = len(kernel)
    n, c = gcols.shape[0], gcols.shape[-1]
    src = gcols.reshape(n, *out_sp, *kernel, c).transpose((0, 1 + 2 * nd, *range(1, 1 + 2 * nd)))
    for offs in itertools.product(*(range(k) for k in kernel)):
        dst = gpad[(slice(None), slice(None), *(
            slice(i, i + s * (o - 1) + 1, s) for i, s, o in zip(offs, stride, out_sp)))]
        dst += src[(Ellipsis, *offs)]


def _compare(n, c, px, pad, k, s, number, repeat) -> dict:
    from distprop.ops import conv

    kernel, stride = (k, k), (s, s)
    out_sp = ((px + 2 * pad - k) // s + 1,) * 2
    padded = px + 2 * pad
    m = n * out_sp[0] * out_sp[1]
    buf = np.random.default_rng(0).standard_normal((m, 1, k * k * c)).astype(np.float32)
    gcols = conv._logical_cols(np, buf, True, n, out_sp, 1, kernel, c)

    def runs():
        gpad = np.zeros((n, padded, padded, c), np.float32)  # channels-last
        conv._col2im_runs(np, gcols, gpad, kernel, stride, out_sp)
        return gpad

    def offsets():
        gpad = np.zeros((n, padded, padded, c), np.float32)
        per_offset(gcols, conv.move_channels_first(gpad), kernel, stride, out_sp)
        return gpad

    np.testing.assert_allclose(runs(), offsets(), rtol=1e-5, atol=1e-5)
    best = {"runs": [], "offsets": []}
    for _ in range(repeat):
        for name, fn in (("runs", runs), ("offsets", offsets)):
            start = time.perf_counter()
            for _ in range(number):
                fn()
            best[name].append((time.perf_counter() - start) / number * 1e3)
    r, o = min(best["runs"]), min(best["offsets"])
    return {"batch": n, "channels": c, "px": px, "padding": pad, "k": k, "stride": s,
            "runs_ms": round(r, 3), "offsets_ms": round(o, 3), "runs_over_offsets": round(r / o, 3)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("shapes", nargs="*", help="n,c,px,pad,k,stride (default: a table)")
    parser.add_argument("--number", type=int, default=5)
    parser.add_argument("--repeat", type=int, default=7)
    args = parser.parse_args(argv)
    shapes = [tuple(int(v) for v in s.split(",")) for s in args.shapes] or SHAPES
    for shape in shapes:
        print(json.dumps(_compare(*shape, args.number, args.repeat)), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
