"""GPU benchmarks: distprop on CuPy vs PyTorch CUDA, and NCCL allreduce vs raw cupy.cuda.nccl.

Step time (forward, cross-entropy, backward, SGD momentum 0.9) of the zoo's models on one GPU,
distprop and PyTorch in the same run on the same weights and batch, their timed steps
alternating; at the batch sizes of ../shared/BENCHMARKS.md and at 8x those (``--scales 1,8``).
Targets: step time ratio <= 1.5.

Allreduce: distprop's :class:`~distprop.distributed.nccl.NCCLCommunicator` (blocking
``allreduce`` and ``iallreduce().wait()``) against ``cupy.cuda.nccl`` called directly on the
same bytes with its own communicator and stream; algorithm and bus bandwidth
(``busbw = algbw * 2 (n - 1) / n``, as nccl-tests). Target: time ratio <= 1.1. Run under
``mpiexec -n N`` (one GPU per rank) for N > 1; with one rank the time ratio still measures the
per-call overhead, the bus bandwidth is 0 by definition.

Prints one JSON line per measurement (``--out FILE`` also writes them). Without CuPy or a GPU it
exits with status 2 and says which is missing.

    python benchmarks/bench_gpu.py --models mlp,cnn,lstm,transformer,wide --scales 1,8
    mpiexec -n 2 python benchmarks/bench_gpu.py --only allreduce --sizes-mb 1,25,100
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

LR, MOMENTUM = 0.01, 0.9
MODELS = ("mlp", "cnn", "lstm", "transformer", "wide")


def require_gpu() -> str | None:
    """None when CuPy and a GPU are usable, else the reason (which of the two is missing)."""
    from distprop import backend

    if backend.cupy_module() is None:
        return f"CuPy is missing ({backend._cupy_error}); install it: pip install 'distprop[gpu]'"
    if backend.gpu_count() == 0:
        return "CuPy is installed but sees no CUDA GPU"
    return None


def _sync():
    from distprop import backend

    backend.cupy_module().cuda.get_current_stream().synchronize()


def distprop_step_fn(name: str, batch: int):
    from bench_models import training_step

    import distprop as dp
    from distprop import models

    dp.manual_seed(0)
    model = models.build_model(name)
    state = {k: v.numpy().copy() for k, v in model.state_dict().items()}
    model.to("cuda")
    x, y = models.sample_batch(name, batch, seed=1, device="cuda")
    loss_fn = dp.nn.CrossEntropyLoss()
    optimizer = dp.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM)

    step = training_step(model, loss_fn, optimizer, x, y)

    return step, state, (x.numpy(), y.numpy())


def torch_step_fn(name: str, state: dict, batch_arrays):
    import torch
    from bench_models import training_step

    from distprop.bench.torch_zoo import torch_model

    model = torch_model(name)
    model.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in state.items()})
    model = model.cuda()
    x, y = (torch.from_numpy(a).cuda() for a in batch_arrays)
    loss_fn = torch.nn.CrossEntropyLoss()
    optimizer = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM)

    step = training_step(model, loss_fn, optimizer, x, y)

    return step


def _timed(step, sync) -> float:
    t0 = time.perf_counter()
    step()
    sync()
    return time.perf_counter() - t0


def summarize(times: list[float], batch: int) -> dict:
    med = statistics.median(times)
    return {"step_time_median_s": med, "step_time_min_s": min(times),
            "step_time_max_s": max(times), "samples_per_s": batch / med}


def bench_model(name: str, scale: int, steps: int, warmup: int, with_torch: bool) -> list[dict]:
    from distprop import models

    batch = models.batch_size(name) * scale
    dp_step, state, arrays = distprop_step_fn(name, batch)
    t_step = None
    torch_note = None
    if with_torch:
        try:
            import torch

            if torch.cuda.is_available():
                t_step = torch_step_fn(name, state, arrays)
            else:
                torch_note = "torch has no CUDA device here"
        except ImportError as exc:
            torch_note = f"torch is not importable ({exc})"

    def t_sync():
        import torch

        torch.cuda.synchronize()

    first_dp = float(dp_step().item())
    first_t = float(t_step().item()) if t_step else None
    for _ in range(warmup - 1):
        dp_step()
        if t_step:
            t_step()
    _sync()
    dp_times, t_times = [], []
    for _ in range(steps):  # alternate, so clock and thermal drift hit both alike
        dp_times.append(_timed(dp_step, _sync))
        if t_step:
            t_times.append(_timed(t_step, t_sync))
    common = {"bench": "step", "workload": name, "batch": batch, "batch_scale": scale,
              "steps": steps, "warmup": warmup, "device": _device_name()}
    ours = {**common, "framework": "distprop", **summarize(dp_times, batch),
            "first_loss": first_dp}
    out = [ours]
    if t_step:
        theirs = {**common, "framework": "torch", **summarize(t_times, batch),
                  "first_loss": first_t}
        ours["ratio_vs_torch"] = ours["step_time_median_s"] / theirs["step_time_median_s"]
        ours["ratio_paired_median"] = statistics.median(a / b for a, b in zip(dp_times, t_times))
        ours["target"] = 1.5
        out.append(theirs)
    else:
        ours["torch"] = torch_note
    return out


def _device_name() -> str:
    from distprop import backend
    from distprop.distributed.device import device_name

    cp = backend.cupy_module()
    return device_name(backend.Device("cuda", int(cp.cuda.runtime.getDevice())))


def bench_allreduce(sizes_mb: list[float], iters: int, warmup: int) -> list[dict]:
    """distprop's NCCL communicator vs cupy.cuda.nccl directly, same bytes, same GPU."""
    from distprop import backend, distributed
    from distprop.distributed import device as device_mod
    from distprop.distributed.nccl import NCCLCommunicator, nccl_module

    nccl = nccl_module()
    if nccl is None:
        return [{"bench": "allreduce", "error": "CuPy cannot load NCCL"}]
    cp = backend.cupy_module()
    host = distributed.init()
    dev = device_mod.assign_device(host, "cuda")
    ours = NCCLCommunicator(host, dev)
    uid = nccl.get_unique_id() if host.rank == 0 else None
    uid = host.broadcast_obj(uid, 0) if host.size > 1 else uid
    raw = nccl.NcclCommunicator(host.size, uid, host.rank)
    raw_stream = cp.cuda.Stream(non_blocking=True)
    n_ranks = host.size
    results = []
    for mb in sizes_mb:
        n = max(1, int(mb * 2**20 / 4))
        buf = cp.ones(n, dtype=cp.float32)

        def raw_call(ptr=buf.data.ptr, n=n):
            raw.allReduce(ptr, ptr, n, nccl.NCCL_FLOAT32, nccl.NCCL_SUM, raw_stream.ptr)
            raw_stream.synchronize()

        def ours_blocking(buf=buf):
            ours.allreduce(buf, "sum")

        def ours_async(buf=buf):
            ours.iallreduce(buf, "sum").wait()

        timings = {}
        for label, fn in (("raw", raw_call), ("allreduce", ours_blocking),
                          ("iallreduce", ours_async)):
            for _ in range(warmup):
                fn()
            host.barrier()
            times = []
            for _ in range(iters):
                _sync()
                t0 = time.perf_counter()
                fn()
                times.append(time.perf_counter() - t0)
            timings[label] = statistics.median(times)
        nbytes = n * 4
        for label in ("raw", "allreduce", "iallreduce"):
            t = timings[label]
            algbw = nbytes / t / 1e9
            row = {"bench": "allreduce", "impl": "cupy.cuda.nccl" if label == "raw"
                   else f"distprop {label}", "ranks": n_ranks, "bytes": nbytes,
                   "time_median_s": t, "algbw_GBps": algbw,
                   "busbw_GBps": algbw * 2 * (n_ranks - 1) / n_ranks,
                   "device": _device_name()}
            if label != "raw":
                row["ratio_vs_raw"] = t / timings["raw"]
                row["target"] = 1.1
            results.append(row)
    return results if host.rank == 0 else []


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(MODELS), help="comma-separated zoo names")
    parser.add_argument("--scales", default="1,8", help="batch multipliers of BENCHMARKS.md's")
    parser.add_argument("--steps", type=int, default=30, help="timed steps (>= 30 to report)")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--no-torch", action="store_true", help="skip the PyTorch peer")
    parser.add_argument("--only", choices=("step", "allreduce"), default=None)
    parser.add_argument("--sizes-mb", default="1,25,100", help="allreduce sizes (MiB)")
    parser.add_argument("--iters", type=int, default=20, help="allreduce timed iterations")
    parser.add_argument("--out", default=None, help="also append the JSON lines to this file")
    args = parser.parse_args(argv)
    missing = require_gpu()
    if missing:
        print(f"bench_gpu.py needs a CUDA GPU: {missing}. Nothing was measured.", file=sys.stderr)
        return 2
    import distprop
    from distprop import backend

    cp = backend.cupy_module()
    lines = [{"environment": {"python": platform.python_version(), "numpy": np.__version__,
                              "cupy": cp.__version__, "distprop": distprop.__version__,
                              "cuda_runtime": int(cp.cuda.runtime.runtimeGetVersion()),
                              "device": _device_name()}}]
    if args.only in (None, "step"):
        names = [m.strip() for m in args.models.split(",") if m.strip()]
        scales = [int(s) for s in args.scales.split(",") if s.strip()]
        for name in names:
            for scale in scales:
                lines += bench_model(name, scale, args.steps, args.warmup, not args.no_torch)
                print(f"done: {name} x{scale}", file=sys.stderr, flush=True)
    if args.only in (None, "allreduce"):
        sizes = [float(s) for s in args.sizes_mb.split(",") if s.strip()]
        lines += bench_allreduce(sizes, args.iters, args.warmup)
    text = "\n".join(json.dumps(line) for line in lines)
    print(text, flush=True)
    if args.out:
        with open(args.out, "a") as f:
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
