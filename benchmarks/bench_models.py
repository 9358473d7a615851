"""Time one training step of the zoo's models in distprop and in PyTorch, in the same run.

A step is: forward, cross-entropy, backward, SGD (momentum 0.9) update. Both frameworks get the
same weights, the same batch and the same number of threads (``torch.set_num_threads`` and
threadpoolctl for NumPy's BLAS); their timed steps alternate so machine drift hits both alike.
Peak RSS is measured in a fresh child process per framework (so neither pays for the other's
imports). Prints one JSON line per model and framework; the distprop line carries the ratio.
The timed steps share one process, so PyTorch's run under distprop's heap policy too
(``distprop/heap.py``); ``bench_heap.py`` times each alone, PyTorch under glibc's defaults.

    python benchmarks/bench_models.py --models mlp,cnn --threads 1 --steps 30
    python benchmarks/bench_models.py --models cnn --profile 20 > /dev/null   # cProfile to stderr
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import os
import platform
import pstats
import statistics
import subprocess
import sys
import time

import numpy as np

from distprop.bench.runner import peak_rss_mb
from distprop.bench.torch_zoo import torch_model

LR, MOMENTUM = 0.01, 0.9


def training_step(model, loss_fn, optimizer, x, y):
    """One call = forward, loss, backward, update; the same body serves distprop and torch."""

    def step():
        optimizer.zero_grad()
        loss = loss_fn(model(x), y)
        loss.backward()
        optimizer.step()
        return loss

    return step


def distprop_step_fn(name: str, batch: int | None):
    """(step, model) for distprop: one call runs forward, loss, backward and the update."""
    import distprop as dp
    from distprop import models

    dp.manual_seed(0)
    model = models.build_model(name)
    x, y = models.sample_batch(name, batch, seed=1)
    loss_fn = dp.nn.CrossEntropyLoss()
    optimizer = dp.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM)

    step = training_step(model, loss_fn, optimizer, x, y)

    return step, model


def torch_step_fn(name: str, batch: int | None, state=None):
    import torch

    from distprop import models

    torch.manual_seed(0)
    model = torch_model(name)
    if state is not None:
        model.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in state.items()})
    x, y = models.sample_batch(name, batch, seed=1)
    x, y = torch.from_numpy(x.numpy()), torch.from_numpy(y.numpy())
    loss_fn = torch.nn.CrossEntropyLoss()
    optimizer = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM)

    step = training_step(model, loss_fn, optimizer, x, y)

    return step, model


def blas_info() -> dict:
    """What threadpoolctl says about the BLAS NumPy uses (kernel, version, threads)."""
    from threadpoolctl import threadpool_info

    for pool in threadpool_info():
        if pool.get("user_api") == "blas" and "numpy" in pool.get("filepath", ""):
            return {k: pool.get(k) for k in ("internal_api", "version", "architecture",
                                             "num_threads", "threading_layer")}
    return {}


def peak_rss_child(framework: str, name: str, batch: int | None, threads: int,
                   steps: int = 8) -> float | None:
    """Peak RSS (MiB) of a fresh process that runs ``steps`` training steps of one framework."""
    cmd = [sys.executable, os.path.abspath(__file__), "--rss-worker", framework,
           "--models", name, "--threads", str(threads), "--steps", str(steps)]
    if batch is not None:
        cmd += ["--batch", str(batch)]
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), OPENBLAS_NUM_THREADS=str(threads),
               MKL_NUM_THREADS=str(threads))
    if framework == "torch":  # PyTorch as its users run it: glibc's malloc defaults
        env["DISTPROP_MALLOC"] = "system"
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    if done.returncode != 0:
        print(done.stderr, file=sys.stderr)
        return None
    return float(done.stdout.strip().splitlines()[-1])


def rss_worker(framework: str, name: str, batch: int | None, threads: int, steps: int) -> None:
    from threadpoolctl import threadpool_limits

    threadpool_limits(threads)
    if framework == "torch":
        import torch

        torch.set_num_threads(threads)
        step, _ = torch_step_fn(name, batch)
    else:
        step, _ = distprop_step_fn(name, batch)
    for _ in range(steps):
        step()
    print(peak_rss_mb())


def summarize(times: list[float], batch: int) -> dict:
    med = statistics.median(times)
    return {"step_time_median_s": med, "step_time_min_s": min(times),
            "step_time_max_s": max(times), "samples_per_s": batch / med,
            "compute_time_s": med, "comm_time_s": 0.0, "exposed_comm_time_s": 0.0}


def bench(name: str, threads: int, steps: int, warmup: int, batch: int | None,
          rss: bool) -> list[dict]:
    import torch

    from distprop import models

    torch.set_num_threads(threads)
    dp_step, dp_model = distprop_step_fn(name, batch)
    state = {k: v.numpy().copy() for k, v in dp_model.state_dict().items()}
    t_step, _ = torch_step_fn(name, batch, state)
    first_dp, first_t = float(dp_step().item()), float(t_step().item())
    for _ in range(warmup - 1):
        dp_step()
        t_step()
    dp_times, t_times = [], []
    for _ in range(steps):  # alternate, so drift on a shared machine affects both alike
        t0 = time.perf_counter()
        dp_step()
        t1 = time.perf_counter()
        t_step()
        t2 = time.perf_counter()
        dp_times.append(t1 - t0)
        t_times.append(t2 - t1)
    n = models.batch_size(name) if batch is None else batch
    common = {"workload": name, "ranks": 1, "threads": threads, "batch": n, "steps": steps,
              "warmup": warmup}
    ours = {**common, "framework": "distprop", **summarize(dp_times, n),
            "first_loss": first_dp}
    theirs = {**common, "framework": "torch", **summarize(t_times, n), "first_loss": first_t}
    ours["ratio_vs_torch"] = ours["step_time_median_s"] / theirs["step_time_median_s"]
    # Each distprop step runs right before a torch step: the ratio within such pairs is the
    # least disturbed by load from other processes; min/min is the best-case ratio.
    ours["ratio_paired_median"] = statistics.median(a / b for a, b in zip(dp_times, t_times))
    ours["ratio_min_vs_torch"] = min(dp_times) / min(t_times)
    if rss:
        ours["peak_rss_mb"] = peak_rss_child("distprop", name, batch, threads)
        theirs["peak_rss_mb"] = peak_rss_child("torch", name, batch, threads)
        if ours["peak_rss_mb"] and theirs["peak_rss_mb"]:
            ours["rss_ratio_vs_torch"] = ours["peak_rss_mb"] / theirs["peak_rss_mb"]
    return [ours, theirs]


def profile(name: str, steps: int, batch: int | None, top: int = 25) -> str:
    """cProfile of ``steps`` distprop steps (after warm-up), sorted by own time."""
    step, _ = distprop_step_fn(name, batch)
    for _ in range(5):
        step()
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(steps):
        step()
    prof.disable()
    out = io.StringIO()
    pstats.Stats(prof, stream=out).sort_stats("tottime").print_stats(top)
    return out.getvalue()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="mlp,cnn", help="comma-separated zoo names")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--steps", type=int, default=30, help="timed steps (>= 30 to report)")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--batch", type=int, default=None, help="override the zoo's batch")
    parser.add_argument("--no-rss", action="store_true", help="skip the peak-RSS child runs")
    parser.add_argument("--profile", type=int, default=0, metavar="STEPS",
                        help="instead of timing, cProfile this many distprop steps to stderr")
    parser.add_argument("--rss-worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    names = [m.strip() for m in args.models.split(",") if m.strip()]
    if args.rss_worker:
        rss_worker(args.rss_worker, names[0], args.batch, args.threads, args.steps)
        return 0
    from threadpoolctl import threadpool_limits

    threadpool_limits(args.threads)
    if args.profile:
        for name in names:
            print(f"== distprop {name}: {args.profile} steps ==", file=sys.stderr)
            print(profile(name, args.profile, args.batch), file=sys.stderr)
        return 0
    import torch

    import distprop

    env = {"python": platform.python_version(), "numpy": np.__version__,
           "torch": torch.__version__, "distprop": distprop.__version__, "blas": blas_info(),
           "OPENBLAS_CORETYPE": os.environ.get("OPENBLAS_CORETYPE"),
           "cpu_count": os.cpu_count()}
    print(json.dumps({"environment": env}), flush=True)
    for name in names:
        for line in bench(name, args.threads, args.steps, args.warmup, args.batch,
                          not args.no_rss):
            print(json.dumps(line), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
