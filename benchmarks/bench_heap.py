"""Training steps of the zoo under distprop's heap policy and under glibc's defaults.

Each measurement is a fresh child process that trains one zoo model alone, as a rank does:
``distprop`` under ``DISTPROP_MALLOC=keep`` (the default, :mod:`distprop.heap`) or ``system``
(glibc's defaults), and PyTorch (glibc's defaults, as its users run it) for reference. The children
alternate, keep / system / torch, ``--repeats`` times, so machine drift hits all three alike.
Per child: median wall-clock step, user and system CPU time per step, minor page faults per step
and peak RSS (``VmHWM``). Prints one JSON line per child and one summary line per model.

    python benchmarks/bench_heap.py --models mlp,cnn,lstm,transformer --threads 1 --repeats 3
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
SIDES = (("distprop", "keep"), ("distprop", "system"), ("torch", "system"))


def child(framework: str, model: str, threads: int, steps: int, warmup: int) -> dict:
    """Train ``model`` for warmup + steps steps in this process; the measurements."""
    sys.path.insert(0, HERE)
    import bench_models
    from threadpoolctl import threadpool_limits

    from distprop import heap
    from distprop.bench.runner import peak_rss_mb

    threadpool_limits(threads)
    if framework == "torch":
        import torch

        torch.set_num_threads(threads)
        step, _ = bench_models.torch_step_fn(model, None)
    else:
        step, _ = bench_models.distprop_step_fn(model, None)
    for _ in range(warmup):
        step()
    before = resource.getrusage(resource.RUSAGE_SELF)
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    after = resource.getrusage(resource.RUSAGE_SELF)
    return {"step_ms": statistics.median(times) * 1e3,
            "user_ms": (after.ru_utime - before.ru_utime) / steps * 1e3,
            "sys_ms": (after.ru_stime - before.ru_stime) / steps * 1e3,
            "faults_per_step": (after.ru_minflt - before.ru_minflt) / steps,
            "peak_rss_mb": peak_rss_mb(), "heap": heap.state}


def run_child(framework: str, malloc: str, model: str, args) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    env.update(DISTPROP_MALLOC=malloc, OMP_NUM_THREADS=str(args.threads),
               OPENBLAS_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    cmd = [sys.executable, os.path.abspath(__file__), "--child", framework, "--models", model,
           "--threads", str(args.threads), "--steps", str(args.steps),
           "--warmup", str(args.warmup)]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="mlp,cnn,lstm,transformer")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--child", choices=["distprop", "torch"], help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child, args.models, args.threads, args.steps, args.warmup)))
        return 0
    print(json.dumps({"environment": {"python": sys.version.split()[0], "argv": sys.argv[1:],
                                      "cpu_count": os.cpu_count()}}), flush=True)
    for model in args.models.split(","):
        runs = {side: [] for side in SIDES}
        for rep in range(args.repeats):
            for framework, malloc in SIDES:
                row = run_child(framework, malloc, model, args)
                runs[(framework, malloc)].append(row)
                print(json.dumps({"model": model, "framework": framework, "malloc": malloc,
                                  "repeat": rep, **row}), flush=True)

        def med(side, key, runs=runs):
            return statistics.median(r[key] for r in runs[side])

        keep, system, torch = SIDES
        print(json.dumps({
            "model": model, "summary": True, "repeats": args.repeats,
            "step_ms": {"keep": med(keep, "step_ms"), "system": med(system, "step_ms"),
                        "torch": med(torch, "step_ms")},
            "keep_over_system": med(keep, "step_ms") / med(system, "step_ms"),
            "keep_over_torch": med(keep, "step_ms") / med(torch, "step_ms"),
            "system_over_torch": med(system, "step_ms") / med(torch, "step_ms"),
            "faults_per_step": {"keep": med(keep, "faults_per_step"),
                                "system": med(system, "faults_per_step"),
                                "torch": med(torch, "faults_per_step")},
            "sys_ms": {"keep": med(keep, "sys_ms"), "system": med(system, "sys_ms"),
                       "torch": med(torch, "sys_ms")},
            "peak_rss_mb": {"keep": med(keep, "peak_rss_mb"),
                            "system": med(system, "peak_rss_mb"),
                            "torch": med(torch, "peak_rss_mb")},
        }), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
