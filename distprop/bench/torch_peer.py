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

from distprop.bench.runner import make_batch, peak_rss_mb


def torch_available() -> bool:
    try:
        import torch  # noqa: F401
    except ImportError:
        return False
    return True


def build_torch_model(workload: str):
    """The workload of BENCHMARKS.md as a torch module (same layers and shapes as the zoo)."""
    import torch
    from torch import nn

    if workload == "mlp":
        return nn.Sequential(nn.Linear(784, 1024), nn.ReLU(), nn.Linear(1024, 1024), nn.ReLU(),
                             nn.Linear(1024, 10))
    if workload == "wide":
        return nn.Sequential(nn.Linear(1024, 4096), nn.ReLU(), nn.Linear(4096, 4096), nn.ReLU(),
                             nn.Linear(4096, 1024), nn.ReLU(), nn.Linear(1024, 10))
    if workload == "cnn":
        return nn.Sequential(nn.Conv2d(1, 32, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(32, 64, 3),
                             nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(1600, 128),
                             nn.ReLU(), nn.Linear(128, 10))

    class LSTMNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.lstm = nn.LSTM(64, 256, batch_first=True)
            self.head = nn.Linear(256, 10)

        def forward(self, x):
            out, _ = self.lstm(x)
            return self.head(out[:, -1])

    class TransformerNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(1000, 128)
            self.layers = nn.ModuleList([
                nn.TransformerEncoderLayer(128, 4, 512, dropout=0.0, batch_first=True)
                for _ in range(2)])
            self.head = nn.Linear(128, 10)

        def forward(self, x):
            h = self.embed(x)
            for layer in self.layers:
                h = layer(h)
            return self.head(torch.mean(h, dim=1))

    if workload == "lstm":
        return LSTMNet()
    if workload == "transformer":
        return TransformerNet()
    raise ValueError(f"no torch peer for workload {workload!r}")


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
    model = build_torch_model(config["workload"])
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
    mine = {"rank": rank, "peak_rss_mb": peak_rss_mb(), "final_loss": float(loss.item()),
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
