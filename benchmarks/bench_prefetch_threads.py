"""Does a single process use its threads well? Training steps of zoo models with 1 or 2 BLAS
threads, with the loader's prefetch thread off (0) or on (1), all configurations interleaved in
rounds in one process (issue 14, item 3: BLAS threads for the GEMMs, no oversubscription by the
prefetch thread).

    python benchmarks/bench_prefetch_threads.py [--models mlp,cnn] [--rounds 5]

Prints one JSON line per (model, threads, prefetch): the median wall ms per step over all rounds.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time


def epoch_step_times(model, loss_fn, optimizer, loader) -> list[float]:
    """Wall ms of each training step of one epoch, the wait for the batch included."""
    times = []
    t0 = time.perf_counter()
    for x, y in loader:
        optimizer.zero_grad()
        loss_fn(model(x), y).backward()
        optimizer.step()
        t1 = time.perf_counter()
        times.append((t1 - t0) * 1e3)
        t0 = t1
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="mlp,cnn")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--samples", type=int, default=4096)
    args = parser.parse_args()
    import numpy as np
    from threadpoolctl import threadpool_limits

    import distprop as dp

    for name in args.models.split(","):
        dp.manual_seed(0)
        model = dp.models.build_model(name)
        batch = dp.models.batch_size(name)
        rng = np.random.default_rng(0)
        x = rng.standard_normal((args.samples, *dp.models.input_shape(name))).astype(np.float32)
        y = rng.integers(0, 10, size=args.samples)
        data = dp.data.TensorDataset(x, y)
        optimizer = dp.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        loss_fn = dp.nn.CrossEntropyLoss()
        configs = [(t, p) for t in (1, 2) for p in (0, 1)]
        times = {c: [] for c in configs}
        for _ in range(args.rounds):
            for threads, prefetch in configs:
                loader = dp.data.DataLoader(data, batch_size=batch, shuffle=True,
                                            prefetch=prefetch, drop_last=True)
                with threadpool_limits(threads):
                    times[(threads, prefetch)] += epoch_step_times(model, loss_fn, optimizer,
                                                                   loader)[1:]
        for (threads, prefetch), ts in times.items():
            print(json.dumps({"model": name, "threads": threads, "prefetch": prefetch,
                              "batch": batch, "steps": len(ts),
                              "step_ms_median": round(statistics.median(ts), 3)}), flush=True)


if __name__ == "__main__":
    main()
