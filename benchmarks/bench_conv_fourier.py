"""Convolution through the Fourier domain vs im2col, forward+backward of one layer at 1 thread.

``conv2d`` takes ``FourierConv2d`` where ``FourierConv2d.suits`` says so (shape alone) and
``ConvNd`` (im2col) elsewhere. This times both on a grid of shapes (3x3, 5x5 and 7x7 kernels,
'same' padding, stride 1 unless given), interleaved, median of ``--repeat`` steps, milliseconds
per step, wall clock with BLAS held to ``--threads`` threads (default 1). One JSON line per
shape; ``ratio`` < 1: the Fourier path is faster; ``chosen``: what ``conv2d`` takes.

    python benchmarks/bench_conv_fourier.py > benchmarks/results/conv_fourier.jsonl
    python benchmarks/bench_conv_fourier.py 32,64,64,16,5,1   # batch,cin,cout,px,k,stride
    python benchmarks/bench_conv_fourier.py --conv1d   # 1-D: px is the length, the Fourier
                                                       # path runs it as 1-pixel-high images
"""

from __future__ import annotations

import argparse
import itertools
import json
import time

import numpy as np


def grid():
    """(batch, cin, cout, px, k, stride): 5x5 and 7x7 kernels over channels and sizes, 3x3 at
    16 and more input channels, and strided 5x5 kernels."""
    for k, px, c, o in itertools.product((5, 7, 3), (8, 16, 32, 48), (4, 8, 16, 32, 64),
                                         (16, 32, 64, 128)):
        if k != 3 or (c >= 16 and px <= 32):
            yield 16, c, o, px, k, 1
    for c, o in ((8, 32), (32, 32), (32, 128)):
        yield 16, c, o, 32, 5, 2


def grid_1d():
    """(batch, cin, cout, length, k, stride) for ``--conv1d``."""
    for k, length, c, o in itertools.product((3, 5, 9, 15), (32, 128, 512), (16, 64), (16, 64)):
        yield 16, c, o, length, k, 1


def _step(cls, x, w, b, stride, pads, **kwargs):
    import distprop as dp

    xt, wt, bt = (dp.tensor(a, requires_grad=True) for a in (x, w, b))
    dilation = (1,) * len(stride)
    out = cls.apply(xt, wt, bt, stride=stride, padding=pads, dilation=dilation, **kwargs)
    out.backward(dp.tensor(np.ones(out.shape, dtype=out.dtype)))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("shapes", nargs="*", help="batch,cin,cout,px,k,stride (default: a grid)")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="BLAS threads (default 1)")
    parser.add_argument("--conv1d", action="store_true", help="1-D convolutions instead")
    args = parser.parse_args(argv)
    from threadpoolctl import threadpool_limits

    from distprop.ops.conv import ConvNd
    from distprop.ops.conv_fourier import FourierConv2d

    shapes = [tuple(int(v) for v in s.split(",")) for s in args.shapes] or list(
        grid_1d() if args.conv1d else grid())
    nd = 1 if args.conv1d else 2
    with threadpool_limits(args.threads):
        for n, c, o, px, k, s in shapes:
            rng = np.random.default_rng(0)
            x = rng.standard_normal((n, c, *(px,) * nd)).astype(np.float32)
            w = rng.standard_normal((o, c, *(k,) * nd)).astype(np.float32)
            b = rng.standard_normal(o).astype(np.float32)
            pads, stride = ((k // 2, k // 2),) * nd, (s,) * nd
            # the Fourier path is 2-D: a 1-D signal is an image one pixel high
            four = (x, w, pads, stride) if nd == 2 else (
                x[:, :, None], w[:, :, None], ((0, 0), *pads), (1, *stride))
            paths = {"fourier": (FourierConv2d, four, {}),
                     "im2col": (ConvNd, (x, w, pads, stride), {"groups": 1})}
            times = {name: [] for name in paths}
            for cls, (xa, wa, pa, sa), kwargs in paths.values():  # warm: buffers, DFT matrices
                _step(cls, xa, wa, b, sa, pa, **kwargs)
            for _ in range(args.repeat):
                for name, (cls, (xa, wa, pa, sa), kwargs) in paths.items():
                    start = time.perf_counter()
                    _step(cls, xa, wa, b, sa, pa, **kwargs)
                    times[name].append((time.perf_counter() - start) * 1e3)
            ms = {name: float(np.median(t)) for name, t in times.items()}
            chosen = nd == 2 and FourierConv2d.suits(x, w, stride, pads, (1, 1), 1)
            print(json.dumps({
                "dims": nd, "batch": n, "cin": c, "cout": o, "px": px, "k": k, "stride": s,
                "threads": args.threads,
                "fourier_ms": round(ms["fourier"], 3), "im2col_ms": round(ms["im2col"], 3),
                "ratio": round(ms["fourier"] / ms["im2col"], 3),
                "chosen": "fourier" if chosen else "im2col",
            }), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
