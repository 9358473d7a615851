"""The PyTorch peers of the standard workloads: ``python -m distprop.bench.torch_peer CONFIG``.

With ``"ddp": false`` one process trains the model with ``torch.set_num_threads(threads)``; with
``"ddp": true`` every rank started by ``mpiexec`` joins a gloo process group and trains under
``torch.nn.parallel.DistributedDataParallel`` (PyTorch's defaults: 25 MB buckets, overlap on).
Same model, batch, SGD (momentum 0.9), cross-entropy, warm-up and timed steps as the distprop
runner; the result line has the same per-rank lists, so :mod:`distprop.bench.report` summarises
both alike. PyTorch's DDP waits for its buckets inside backward, so its ``compute_s`` includes
communication it did not hide and ``comm_s``/``exposed_comm_s`` are not measured (null).
"""

from __future__ import annotations

import os
import sys
import time

from distprop import heap
from distprop.bench.runner import make_batch, peak_rss_mb
from distprop.bench.torch_zoo import torch_model


def torch_available() -> bool:
    try:
        import torch  # noqa: F401
    except ImportError:
        return False
    return True


def worker(config: dict) -> dict | None:
    import torch
    import torch.distributed as tdist

    threads = int(config.get("threads_per_rank", 1))
    torch.set_num_threads(threads)
    use_ddp = bool(config.get("ddp"))
    rank, size = 0, 1
    if use_ddp:
        # Rank and size from the launcher's environment: gloo needs no MPI in this process.
        from distprop.info import launched_rank, launched_size

        rank, size = launched_rank() or 0, launched_size()
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ["MASTER_PORT"] = str(config["master_port"])
        tdist.init_process_group("gloo", rank=rank, world_size=size)
    torch.manual_seed(int(config.get("seed", 0)))
    model = torch_model(config["workload"])
    net = torch.nn.parallel.DistributedDataParallel(model) if use_ddp else model
    opt = torch.optim.SGD(model.parameters(), lr=float(config.get("lr", 1e-3)), momentum=0.9)
    x_np, y_np = make_batch(config["workload"], int(config["batch_per_rank"]), seed=1000 + rank)
    x, y = torch.from_numpy(x_np), torch.from_numpy(y_np)
    loss_fn = torch.nn.CrossEntropyLoss()
    warmup, steps = int(config.get("warmup", 5)), int(config["steps"])
    keys = ("step_s", "forward_s", "backward_s", "optimizer_s", "compute_s")
    per_step: dict[str, list[float]] = {k: [] for k in keys}
    if use_ddp:
        tdist.barrier()
    clock = time.perf_counter
    for i in range(warmup + steps):
        t0 = clock()
        opt.zero_grad()
        loss = loss_fn(net(x), y)
        t1 = clock()
        loss.backward()
        t2 = clock()
        opt.step()
        t3 = clock()
        if i >= warmup:
            for key, value in zip(keys, (t3 - t0, t1 - t0, t2 - t1, t3 - t2, t2 - t0)):
                per_step[key].append(value)
    unmeasured = [None] * steps
    mine = {"rank": rank, "peak_rss_mb": peak_rss_mb(), "heap": heap.state,
            "final_loss": float(loss.item()),
            **per_step, "comm_s": unmeasured, "exposed_comm_s": unmeasured}
    gathered = [mine]
    if use_ddp:
        gathered = [None] * size
        tdist.all_gather_object(gathered, mine)
        tdist.destroy_process_group()
        if rank != 0:
            return None
    return {**{k: config.get(k) for k in ("workload", "mode", "threads_per_rank",
                                          "batch_per_rank", "warmup", "steps")},
            "peer": "torch-ddp" if use_ddp else "torch", "overlap": use_ddp or None,
            "bucket_mb": 25.0 if use_ddp else None, "compression": None, "device": "cpu",
            "ranks": size, "per_rank": gathered, "torch_version": torch.__version__,
            "params": int(sum(p.numel() for p in model.parameters()))}


def main(argv: list[str] | None = None) -> int:
    from distprop.bench.runner import guarded_main

    code = guarded_main(worker, argv)
    # gloo's threads can abort the interpreter's teardown ("terminate called without an active
    # exception") after the result is out; the run is complete, so leave without a teardown.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    sys.exit(main())
