"""The GEMMs behind Linear's few-row paths, alone: one product against the blocks of
``distprop.ops._util.blocked_gemm``, the weight-left orientation, and the one-row outer product
(thread CPU time, 1 BLAS thread, best of 7 rounds).

    python benchmarks/bench_gemm_rows.py

Prints one JSON line per shape (ms per product; null where the blocks do not apply).
"""

from __future__ import annotations

import json
import os
import time

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")


def best_ms(fn, rounds: int = 7, span: float = 0.03) -> float:
    fn()
    best = float("inf")
    for _ in range(rounds):
        start, calls = time.thread_time(), 0
        while time.thread_time() - start < span:
            fn()
            calls += 1
        best = min(best, (time.thread_time() - start) / calls)
    return best * 1e3


def time_shape(rows: int, fin: int, fout: int) -> dict:
    import numpy as np

    from distprop.ops._util import blocked_gemm

    rng = np.random.default_rng(0)
    x = rng.standard_normal((rows, fin), dtype=np.float32)
    w = rng.standard_normal((fout, fin), dtype=np.float32)
    g = rng.standard_normal((rows, fout), dtype=np.float32)
    out, gw = np.empty((rows, fout), np.float32), np.empty((fout, fin), np.float32)
    row = {"rows": rows, "in": fin, "out": fout,
           "forward_x_wT": best_ms(lambda: np.matmul(x, w.T, out=out)),
           "forward_w_xT": best_ms(lambda: np.ascontiguousarray((w @ x.T).T)),
           "forward_blocks": (best_ms(lambda: blocked_gemm(x, w.T, out))
                              if blocked_gemm(x, w.T, out) else None),
           "weight_grad_gemm": best_ms(lambda: np.matmul(g.T, x, out=gw)),
           "weight_grad_blocks": (best_ms(lambda: blocked_gemm(g.T, x, gw))
                                  if blocked_gemm(g.T, x, gw) else None)}
    if rows == 1:
        row["weight_grad_outer"] = best_ms(lambda: np.einsum("i,j->ij", g[0], x[0], out=gw))
    return {k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()}


def main() -> None:
    for rows, fin, fout in [(1, 1024, 1024), (4, 1024, 1024), (8, 1024, 1024), (8, 512, 2048),
                            (16, 1024, 1024), (48, 1024, 1024)]:
        print(json.dumps(time_shape(rows, fin, fout)), flush=True)


if __name__ == "__main__":
    main()
