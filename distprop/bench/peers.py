"""``distprop bench peers``: one workload in distprop and in its peers, in one invocation.

Peers (BENCHMARKS.md): ``torch`` (the same model in PyTorch, one process, same threads),
``torch-ddp`` (PyTorch DDP over gloo, same ranks, same threads per rank), ``mpi-allreduce`` (one
``MPI.Allreduce`` of the model's gradient bytes: the floor for gradient sync) and ``gemm-floor``
(the model's matrix products timed alone in NumPy: the compute floor; Linear-only models).
Ratios are distprop over the peer at the same rank count: below 1 means distprop is faster.
"""

from __future__ import annotations

import json
import socket
import statistics
import sys
import time
from dataclasses import dataclass

from distprop.bench import launching, report

PEERS = ("torch", "torch-ddp", "mpi-allreduce", "gemm-floor")


@dataclass
class PeersConfig:
    workload: str
    ranks: list[int]
    batch_size: int | None = None
    steps: int = 30
    warmup: int = 5
    threads_per_rank: int = 1
    overlap: bool = True
    bucket_mb: float = 25.0
    peers: tuple[str, ...] = PEERS
    timeout_s: float = 600.0
    oversubscribe: bool = False


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def gemm_dims(workload: str) -> list[tuple[int, int]] | None:
    """(in, out) of each Linear of a Linear-only zoo model, else None."""
    from distprop.models import build_model

    shapes = [tuple(p.shape) for p in build_model(workload).parameters()]
    if any(len(s) not in (1, 2) for s in shapes):
        return None
    return [(s[1], s[0]) for s in shapes if len(s) == 2]


def gemm_worker(config: dict) -> dict:
    """Time forward (x W^T) and backward (g^T x, g W) products of every Linear, in float32."""
    import numpy as np
    from threadpoolctl import threadpool_limits

    threadpool_limits(int(config.get("threads_per_rank", 1)))
    batch = int(config["batch_per_rank"])
    rng = np.random.default_rng(0)
    mats = []
    for k, (fan_in, fan_out) in enumerate(config["dims"]):
        mats.append((rng.standard_normal((batch, fan_in), dtype=np.float32),
                     rng.standard_normal((fan_out, fan_in), dtype=np.float32),
                     rng.standard_normal((batch, fan_out), dtype=np.float32), k > 0))

    def one_step():
        for x, w, g, need_grad_x in mats:
            np.matmul(x, w.T)
            np.matmul(g.T, x)
            if need_grad_x:
                np.matmul(g, w)

    for _ in range(int(config.get("warmup", 5))):
        one_step()
    times = []
    for _ in range(int(config["steps"])):
        t0 = time.perf_counter()
        one_step()
        times.append(time.perf_counter() - t0)
    return {"time_median_s": statistics.median(times), "time_min_s": min(times),
            "time_max_s": max(times)}


def _run(argv: list[str], ranks: int, cfg: PeersConfig, extra_env: dict | None = None):
    return launching.run_worker(ranks, argv, threads=cfg.threads_per_rank, timeout=cfg.timeout_s,
                                oversubscribe=cfg.oversubscribe, extra_env=extra_env)


# The PyTorch peers run under glibc's default malloc, as PyTorch users run them: importing
# distprop (which starts the peer) would otherwise hand them distprop's heap policy
# (distprop/heap.py).
TORCH_ENV = {"DISTPROP_MALLOC": "system"}


def _train_row(outcome, run_cfg: dict, ranks: int, peer: str) -> dict:
    if outcome.error is not None:
        row = report.error_row(run_cfg, ranks, outcome.error)
    else:
        row = report.summarize_run(outcome.result)
        row["params"] = outcome.result.get("params")
    row["peer"] = peer
    return row


def run_peers(cfg: PeersConfig, echo=print) -> tuple[list[dict], list[dict]]:
    """Run distprop and every requested peer; returns (rows, ratios) and prints both."""
    from distprop.bench.runner import default_batch
    from distprop.bench.torch_peer import torch_available

    batch = cfg.batch_size or default_batch(cfg.workload)
    base = {"workload": cfg.workload, "mode": "weak", "batch_per_rank": batch,
            "steps": cfg.steps, "warmup": cfg.warmup, "threads_per_rank": cfg.threads_per_rank}
    have_torch = torch_available()
    if not have_torch and ({"torch", "torch-ddp"} & set(cfg.peers)):
        echo("# torch is not installed: skipping the torch and torch-ddp peers "
             "(pip install torch)", file=sys.stderr)
    rows: list[dict] = []
    grad_bytes = None
    for ranks in cfg.ranks:
        echo(f"# {cfg.workload}: distprop on {ranks} rank(s) ...", file=sys.stderr)
        dp_cfg = {**base, "kind": "train", "overlap": cfg.overlap, "bucket_mb": cfg.bucket_mb,
                  "compression": None, "device": "cpu"}
        row = _train_row(_run(["-m", "distprop.bench.runner", json.dumps(dp_cfg)], ranks, cfg),
                         dp_cfg, ranks, "distprop")
        rows.append(row)
        grad_bytes = grad_bytes or (row.get("params") or 0) * 4 or None
        if have_torch and "torch" in cfg.peers and ranks == 1:
            echo("# torch (one process) ...", file=sys.stderr)
            t_cfg = {**base, "ddp": False}
            rows.append(_train_row(_run(["-m", "distprop.bench.torch_peer", json.dumps(t_cfg)],
                                        1, cfg, TORCH_ENV), t_cfg, 1, "torch"))
        if have_torch and "torch-ddp" in cfg.peers and (ranks > 1 or len(cfg.ranks) > 1):
            echo(f"# torch-ddp (gloo) on {ranks} rank(s) ...", file=sys.stderr)
            t_cfg = {**base, "ddp": True, "master_port": free_port()}
            rows.append(_train_row(_run(["-m", "distprop.bench.torch_peer", json.dumps(t_cfg)],
                                        ranks, cfg, TORCH_ENV), t_cfg, ranks, "torch-ddp"))
        if "mpi-allreduce" in cfg.peers and ranks > 1 and grad_bytes:
            echo(f"# mpi-allreduce of {grad_bytes} bytes on {ranks} ranks ...", file=sys.stderr)
            a_cfg = {"kind": "allreduce", "sizes": [grad_bytes], "methods": ["mpi"],
                     "min_repeats": cfg.steps, "max_repeats": cfg.steps}
            out = _run(["-m", "distprop.bench.runner", json.dumps(a_cfg)], ranks, cfg)
            rows.append(_floor_row(out, cfg, ranks, "mpi-allreduce"))
    if "gemm-floor" in cfg.peers and 1 in cfg.ranks:
        dims = gemm_dims(cfg.workload)
        if dims is None:
            echo(f"# gemm-floor: {cfg.workload} is not Linear-only; skipped", file=sys.stderr)
        else:
            g_cfg = {**base, "kind": "gemm", "dims": dims}
            out = _run(["-m", "distprop.bench.runner", json.dumps(g_cfg)], 1, cfg)
            rows.append(_floor_row(out, cfg, 1, "gemm-floor"))
    for peer in ("distprop", "torch-ddp"):
        report.add_scaling([r for r in rows if r["peer"] == peer])
    ratios = compute_ratios(rows)
    echo(format_peers(rows, ratios))
    for r in rows + ratios:
        echo(json.dumps(r))
    return rows, ratios


def _floor_row(outcome, cfg: PeersConfig, ranks: int, peer: str) -> dict:
    row = {"workload": cfg.workload, "ranks": ranks, "peer": peer,
           "threads_per_rank": cfg.threads_per_rank, "error": outcome.error}
    if outcome.error is None:
        res = outcome.result
        res = res["rows"][0] if "rows" in res else res
        row.update(step_s=res["time_median_s"], step_min_s=res["time_min_s"],
                   step_max_s=res["time_max_s"])
        if "bytes" in res:
            row["bytes"] = res["bytes"]
    return row


def compute_ratios(rows: list[dict]) -> list[dict]:
    """distprop over each peer at the same rank count (step time, comm, compute, peak RSS)."""
    ok = [r for r in rows if not r.get("error")]
    mine = {r["ranks"]: r for r in ok if r["peer"] == "distprop"}
    ratios = []
    for r in ok:
        d = mine.get(r["ranks"])
        if r["peer"] == "distprop" or d is None:
            continue
        entry = {"kind": "ratio", "workload": r["workload"], "ranks": r["ranks"],
                 "peer": r["peer"]}
        if r["peer"] in ("torch", "torch-ddp"):
            entry["what"] = "step time"
            entry["ratio"] = d["step_s"] / r["step_s"]
            entry["peak_rss_ratio"] = d["peak_rss_mb_max"] / r["peak_rss_mb_max"]
            if r["peer"] == "torch-ddp" and d.get("efficiency") is not None:
                entry["efficiency"] = d["efficiency"]
                entry["peer_efficiency"] = r.get("efficiency")
        elif r["peer"] == "mpi-allreduce":
            entry["what"] = "gradient sync (comm_s) vs one MPI Allreduce of the same bytes"
            entry["ratio"] = (d["comm_s"] / r["step_s"]) if d.get("comm_s") else None
        elif r["peer"] == "gemm-floor":
            entry["what"] = "compute (forward+backward) vs the matrix products alone"
            entry["ratio"] = d["compute_s"] / r["step_s"] if d.get("compute_s") else None
        ratios.append(entry)
    return ratios


def format_peers(rows: list[dict], ratios: list[dict]) -> str:
    lines = [f"{'peer':>14} {'ranks':>5} {'step ms':>9} {'samples/s':>10} {'eff':>5} "
             f"{'RSS MB':>7}"]
    for r in rows:
        if r.get("error"):
            first = str(r["error"]).strip().splitlines()[0]
            lines.append(f"{r['peer']:>14} {r['ranks']:>5} FAILED: {first}")
            continue
        sps = r.get("samples_per_s")
        eff = r.get("efficiency")
        rss = r.get("peak_rss_mb_max")
        lines.append(f"{r['peer']:>14} {r['ranks']:>5} {r['step_s'] * 1e3:>9.1f} "
                     f"{'' if sps is None else f'{sps:.0f}':>10} "
                     f"{'' if eff is None else f'{eff:.2f}':>5} "
                     f"{'' if rss is None else f'{rss:.0f}':>7}")
    for q in ratios:
        if q.get("ratio") is not None:
            lines.append(f"distprop / {q['peer']} at {q['ranks']} rank(s), {q['what']}: "
                         f"{q['ratio']:.2f}")
    return "\n".join(lines)
