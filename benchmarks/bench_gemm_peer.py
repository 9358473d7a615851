"""What stands between distprop's LSTM and PyTorch's: the GEMMs, and PyTorch's fused RNN layer.

Part 1: the matrix products of an LSTM step, NumPy's ``matmul`` (OpenBLAS) against
``torch.mm`` (PyTorch's CPU BLAS) on the same float32 operands.
Part 2: one LSTM layer (the zoo's: input 64, hidden 256, 32 steps, batch 64), forward and
backward timed apart: distprop's ``LSTMLayer``, the same layer's GEMMs alone (replayed with
``np.matmul``: input projection, one recurrent product per step, and backward's per-step
products plus the three weight/input-gradient GEMMs), and PyTorch's ``nn.LSTM``.
One thread, medians of interleaved repeats; prints JSON lines.

    python benchmarks/bench_gemm_peer.py [--repeats 7]
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import time

import numpy as np

GEMM_SHAPES = [(64, 256, 1024), (64, 1024, 256), (8, 128, 512), (8, 512, 128),
               (32, 64, 256), (1024, 2048, 256)]


def _median_time(fns: dict, repeats: int, inner: int) -> dict:
    """Median seconds per call of each function, the functions interleaved per repeat."""
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            fn()
            start = time.perf_counter()
            for _ in range(inner):
                fn()
            times[name].append((time.perf_counter() - start) / inner)
    return {name: statistics.median(v) for name, v in times.items()}


def gemm_rows(repeats: int):
    import torch

    rng = np.random.default_rng(0)
    for m, k, n in GEMM_SHAPES:
        a = rng.standard_normal((m, k), dtype=np.float32)
        b = rng.standard_normal((k, n), dtype=np.float32)
        out = np.empty((m, n), np.float32)
        ta, tb, tout = torch.from_numpy(a), torch.from_numpy(b), torch.from_numpy(out)
        inner = max(10, int(2e8 / (2 * m * k * n)))
        t = _median_time({"numpy": functools.partial(np.matmul, a, b, out=out),
                          "torch": functools.partial(torch.mm, ta, tb, out=tout)}, repeats, inner)
        flop = 2 * m * k * n
        yield {"part": "gemm", "m": m, "k": k, "n": n,
               "numpy_us": t["numpy"] * 1e6, "torch_us": t["torch"] * 1e6,
               "numpy_gflops": flop / t["numpy"] / 1e9, "torch_gflops": flop / t["torch"] / 1e9,
               "numpy_over_torch": t["numpy"] / t["torch"]}


def lstm_rows(repeats: int, steps=32, batch=64, inputs=64, hidden=256):
    import torch

    from distprop.ops.rnn import LSTMLayer
    from distprop.tensor import Tensor

    rng = np.random.default_rng(0)
    x = rng.standard_normal((steps, batch, inputs), dtype=np.float32)
    lstm = torch.nn.LSTM(inputs, hidden)
    w_ih, w_hh, b_ih, b_hh = (p.detach().numpy().copy() for p in lstm.parameters())
    zeros = np.zeros((batch, hidden), np.float32)
    grad = rng.standard_normal((steps, batch, hidden), dtype=np.float32)

    def ours_forward():
        leaves = [Tensor(a, requires_grad=True) for a in (x, w_ih, w_hh, b_ih, b_hh)]
        out, _, _ = LSTMLayer.apply(leaves[0], Tensor(zeros), Tensor(zeros), *leaves[1:])
        return out

    def ours_both():
        ours_forward().backward(Tensor(grad))

    xt, gt = torch.from_numpy(x).requires_grad_(), torch.from_numpy(grad)

    def torch_forward():
        return lstm(xt)[0]

    def torch_both():
        torch_forward().backward(gt)

    # the GEMMs alone, as LSTMLayer runs them
    h = rng.standard_normal((batch, hidden), dtype=np.float32)
    w_hh_t = np.ascontiguousarray(w_hh.T)
    rec = np.empty((batch, 4 * hidden), np.float32)
    dgates = rng.standard_normal((steps, batch, 4 * hidden), dtype=np.float32)
    dh = np.empty((batch, hidden), np.float32)
    states = rng.standard_normal((steps, batch, hidden), dtype=np.float32)

    def gemm_forward():
        x.reshape(-1, inputs) @ w_ih.T
        for _ in range(steps):
            np.matmul(h, w_hh_t, out=rec)

    def gemm_backward():
        for t in range(steps):
            np.matmul(dgates[t], w_hh, out=dh)
        flat = dgates.reshape(-1, 4 * hidden)
        flat @ w_ih
        flat.T @ x.reshape(-1, inputs)
        flat.T @ states.reshape(-1, hidden)

    t = _median_time({"ours_forward": ours_forward, "ours_both": ours_both,
                      "torch_forward": torch_forward, "torch_both": torch_both,
                      "gemm_forward": gemm_forward, "gemm_backward": gemm_backward},
                     repeats, 5)
    row = {"part": "lstm_layer", "steps": steps, "batch": batch, "input": inputs,
           "hidden": hidden}
    for side in ("ours", "torch"):
        row[f"{side}_forward_ms"] = t[f"{side}_forward"] * 1e3
        row[f"{side}_backward_ms"] = (t[f"{side}_both"] - t[f"{side}_forward"]) * 1e3
    row["gemm_forward_ms"] = t["gemm_forward"] * 1e3
    row["gemm_backward_ms"] = t["gemm_backward"] * 1e3
    yield row


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    import torch
    from threadpoolctl import threadpool_limits

    threadpool_limits(1)
    torch.set_num_threads(1)
    print(json.dumps({"environment": {"numpy": np.__version__, "torch": torch.__version__,
                                      "threads": 1}}))
    for row in (*gemm_rows(args.repeats), *lstm_rows(args.repeats)):
        print(json.dumps({k: round(v, 3) if isinstance(v, float) else v
                          for k, v in row.items()}), flush=True)


if __name__ == "__main__":
    main()
