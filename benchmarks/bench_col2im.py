"""col2im's special paths against the per-offset adds they replaced (copied here as references).

Default: a one-group, rows-major (channels-last) convolution; ``distprop.ops.conv._col2im_runs``
adds runs of ``kernel[-1] * C`` contiguous floats where the per-offset loop adds runs of ``C``.
``--phases``: grouped ``(g, K, M)`` columns with stride 2; ``conv._col2im_phases`` adds into one
unit-stride plane per stride phase where the per-offset loop adds with stride 2. Both sides on
the same column gradient, interleaved, BLAS-free, minimum of ``--repeat`` rounds of ``--number``
calls, milliseconds per call, wall clock, one thread. One JSON line per shape.

    python benchmarks/bench_col2im.py
    python benchmarks/bench_col2im.py 64,16,16,16,5,1,1
    python benchmarks/bench_col2im.py --phases
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
    r, o = _interleaved_min_ms(runs, offsets, number, repeat)
    return {"batch": n, "channels": c, "px": px, "padding": pad, "k": k, "stride": s,
            "runs_ms": round(r, 3), "offsets_ms": round(o, 3), "runs_over_offsets": round(r / o, 3)}


def _interleaved_min_ms(first, second, number, repeat) -> tuple[float, float]:
    """Milliseconds per call of ``first`` and ``second``: minimum over ``repeat`` interleaved
    rounds of ``number`` calls each."""
    best = ([], [])
    for _ in range(repeat):
        for times, fn in zip(best, (first, second)):
            start = time.perf_counter()
            for _ in range(number):
                fn()
            times.append((time.perf_counter() - start) / number * 1e3)
    return min(best[0]), min(best[1])


# (batch, in channels C, image px, padding, kernel, stride, groups) for --phases
PHASE_SHAPES = [
    (8, 16, 64, 1, 3, 2, 2), (8, 8, 64, 2, 5, 2, 4), (8, 64, 64, 1, 3, 2, 8),
    # fewer than 32 output columns (distprop keeps the per-offset loop there)
    (16, 16, 32, 1, 3, 2, 2), (8, 32, 32, 1, 3, 2, 4), (32, 8, 16, 1, 3, 2, 2),
    (16, 8, 16, 1, 3, 2, 2), (64, 8, 16, 1, 3, 2, 4), (16, 16, 16, 1, 3, 2, 2),
    (32, 4, 8, 1, 3, 2, 2),
]


def per_offset_grouped(gcols, gpad, kernel, stride, out_sp):
    """The per-offset col2im loop for grouped columns into a channels-first ``gpad``."""
    from distprop.ops import conv

    g, cg = gcols.shape[1 + len(kernel)], gcols.shape[-1]
    sn, sc, *ssp = gpad.strides
    for offs in itertools.product(*(range(k) for k in kernel)):
        corner = gpad[(slice(None), slice(None), *(slice(i, None) for i in offs))]
        dst = conv.as_strided(np, corner, (gpad.shape[0], *out_sp, g, cg),
                              (sn, *(st * s for st, s in zip(ssp, stride)), sc * cg, sc))
        dst += gcols[(slice(None),) * (2 + len(kernel)) + offs]


def _compare_phases(n, c, px, pad, k, s, g, number, repeat) -> dict:
    from distprop.ops import conv

    kernel, stride, pads = (k, k), (s, s), ((pad, pad), (pad, pad))
    out_sp = ((px + 2 * pad - k) // s + 1,) * 2
    cg, m = c // g, n * out_sp[0] * out_sp[1]
    buf = np.random.default_rng(0).standard_normal((g, k * k * cg, m)).astype(np.float32)
    gcols = conv._logical_cols(np, buf, False, n, out_sp, g, kernel, cg)

    def phases():
        return conv._col2im_phases(np, gcols, (n, c, px, px), kernel, stride, pads)

    def offsets():
        gpad = np.zeros((n, c, px + 2 * pad, px + 2 * pad), np.float32)
        per_offset_grouped(gcols, gpad, kernel, stride, out_sp)
        return gpad[:, :, pad:pad + px, pad:pad + px]

    assert np.array_equal(phases(), offsets())  # same additions in the same order
    p, o = _interleaved_min_ms(phases, offsets, number, repeat)
    return {"batch": n, "channels": c, "px": px, "padding": pad, "k": k, "stride": s,
            "groups": g, "phases_ms": round(p, 3), "offsets_ms": round(o, 3),
            "phases_over_offsets": round(p / o, 3)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("shapes", nargs="*",
                        help="n,c,px,pad,k,stride[,groups with --phases] (default: a table)")
    parser.add_argument("--phases", action="store_true",
                        help="grouped strided (g, K, M) columns: stride-phase planes")
    parser.add_argument("--number", type=int, default=5)
    parser.add_argument("--repeat", type=int, default=7)
    args = parser.parse_args(argv)
    shapes = [tuple(int(v) for v in s.split(",")) for s in args.shapes] or (
        PHASE_SHAPES if args.phases else SHAPES)
    compare = _compare_phases if args.phases else _compare
    for shape in shapes:
        print(json.dumps(compare(*shape, args.number, args.repeat)), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
