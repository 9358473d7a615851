"""Alpha-beta projection of data-parallel scaling beyond this machine.

Sending ``n`` bytes between two ranks costs ``alpha + n * beta`` (latency plus inverse
bandwidth). Two allreduce algorithms:

- ring (bandwidth-optimal; MPI and NCCL use it for large messages): a reduce-scatter and an
  allgather of ``p - 1`` steps each, every step moving ``n / p`` bytes per rank:
  ``T = 2 (p - 1) alpha + 2 (p - 1) / p * n * beta``.
- tree (recursive doubling; latency-optimal, used for small messages): ``ceil(log2 p)`` rounds,
  each exchanging the whole buffer: ``T = ceil(log2 p) * (alpha + n * beta)``.

DDP splits the gradient into buckets (a small first bucket, then ``bucket_mb`` each), in the
order backward produces them. With overlap, a bucket's allreduce starts as soon as its gradients
are final and the previous bucket's allreduce has finished (one collective at a time); without
overlap all buckets run after backward. Weak-scaling efficiency is the one-rank step time (pure
compute) over the projected step time.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

ALGORITHMS = ("ring", "tree")


def ring_allreduce_time(nbytes: float, ranks: int, alpha: float, beta: float) -> float:
    """Seconds for a ring allreduce of ``nbytes`` over ``ranks``: 2(p-1)a + 2(p-1)/p n b."""
    if ranks <= 1 or nbytes <= 0:
        return 0.0
    return 2 * (ranks - 1) * alpha + 2 * (ranks - 1) / ranks * nbytes * beta


def tree_allreduce_time(nbytes: float, ranks: int, alpha: float, beta: float) -> float:
    """Seconds for a recursive-doubling allreduce: ceil(log2 p) (a + n b)."""
    if ranks <= 1 or nbytes <= 0:
        return 0.0
    return math.ceil(math.log2(ranks)) * (alpha + nbytes * beta)


def allreduce_time(algorithm: str, nbytes: float, ranks: int, alpha: float, beta: float) -> float:
    if algorithm == "ring":
        return ring_allreduce_time(nbytes, ranks, alpha, beta)
    if algorithm == "tree":
        return tree_allreduce_time(nbytes, ranks, alpha, beta)
    raise ValueError(f"unknown allreduce algorithm {algorithm!r}; choose from {ALGORITHMS}")


def bucket_sizes(total_bytes: float, bucket_bytes: float, first_bucket_bytes: float) -> list[float]:
    """Split the gradient into buckets: ``first_bucket_bytes``, then ``bucket_bytes`` each."""
    if total_bytes <= 0:
        return []
    sizes, left = [], float(total_bytes)
    first = min(first_bucket_bytes, left) if first_bucket_bytes > 0 else min(bucket_bytes, left)
    sizes.append(first)
    left -= first
    while left > 0:
        sizes.append(min(bucket_bytes, left))
        left -= sizes[-1]
    return sizes


@dataclass
class StepProjection:
    """One projected training step."""

    ranks: int
    algorithm: str
    compute_s: float
    comm_s: float
    exposed_comm_s: float
    step_s: float
    efficiency: float


def project_step(compute_s: float, buckets: list[float], ranks: int, algorithm: str, alpha: float,
                 beta: float, overlap: bool = True,
                 backward_fraction: float = 2 / 3) -> StepProjection:
    """Project one step: compute, then (or overlapped with backward) the bucket allreduces.

    Args:
        compute_s: forward + backward + optimizer seconds of one rank (its batch is fixed: weak
            scaling).
        buckets: bucket sizes in bytes, in the order backward finishes them.
        ranks: number of ranks.
        algorithm: ``"ring"`` or ``"tree"``.
        alpha: latency per message, seconds.
        beta: seconds per byte (1 / bandwidth).
        overlap: start each bucket's allreduce as soon as backward has produced it.
        backward_fraction: share of ``compute_s`` spent in backward; gradients are assumed to
            become final at a constant rate in bytes over it.
    """
    if not 0.0 <= backward_fraction <= 1.0:
        raise ValueError(f"backward_fraction must be in [0, 1], got {backward_fraction}")
    times = [allreduce_time(algorithm, b, ranks, alpha, beta) for b in buckets]
    comm = sum(times)
    if overlap:
        forward = compute_s * (1.0 - backward_fraction)
        backward = compute_s * backward_fraction
        total = sum(buckets) or 1.0
        done, produced = forward, 0.0
        for size, t in zip(buckets, times):
            produced += size
            ready = forward + backward * produced / total
            done = max(done, ready) + t
        step = max(compute_s, done)
    else:
        step = compute_s + comm
    return StepProjection(ranks=ranks, algorithm=algorithm, compute_s=compute_s, comm_s=comm,
                          exposed_comm_s=step - compute_s, step_s=step,
                          efficiency=compute_s / step if step > 0 else 1.0)


def project(compute_s: float, grad_bytes: float, ranks: list[int], alpha: float, beta: float,
            bucket_bytes: float = 25 * 2**20, first_bucket_bytes: float = 2**20,
            overlap: bool = True, backward_fraction: float = 2 / 3,
            algorithms: tuple[str, ...] = ALGORITHMS) -> list[dict]:
    """Projected steps for every rank count and algorithm, as dicts (one JSON line each)."""
    buckets = bucket_sizes(grad_bytes, bucket_bytes, first_bucket_bytes)
    rows = []
    for p in ranks:
        for alg in algorithms:
            proj = project_step(compute_s, buckets, p, alg, alpha, beta, overlap,
                                backward_fraction)
            row = asdict(proj)
            row.update(grad_bytes=grad_bytes, buckets=len(buckets), overlap=overlap,
                       alpha_s=alpha, beta_s_per_byte=beta)
            rows.append(row)
    return rows


def fit_alpha_beta(sizes: list[float], times: list[float],
                   large: float = 2**20) -> tuple[float, float]:
    """Fit ``t = a + b n`` to two-rank allreduce timings: ``b`` is the least-squares slope of
    the large messages (``n >= large``, where gradient buckets live; bandwidth out of cache is
    lower than in cache), ``a`` what remains of the smallest message's time.

    At two ranks ring and tree coincide: ``T = 2 alpha + n beta`` (ring) equals
    ``alpha' + n beta`` (tree) with ``alpha' = 2 alpha``; we report the ring ``alpha``
    (``a / 2``, one message's latency) and ``beta = b``.
    """
    if len(sizes) != len(times) or len(sizes) < 2:
        raise ValueError("need at least two (size, time) pairs to fit alpha and beta")
    if len(set(sizes)) < 2:
        raise ValueError("need at least two different sizes to fit alpha and beta")
    pts = [(x, y) for x, y in zip(sizes, times) if x >= large]
    if len({x for x, _ in pts}) < 2:
        pts = list(zip(sizes, times))
    n = len(pts)
    mx, my = sum(x for x, _ in pts) / n, sum(y for _, y in pts) / n
    b = sum((x - mx) * (y - my) for x, y in pts) / sum((x - mx) ** 2 for x, _ in pts)
    b = max(b, 0.0)
    x0, y0 = min(zip(sizes, times))
    return max(y0 - b * x0, 0.0) / 2.0, b


def assumptions(alpha: float, beta: float, bucket_bytes: float, first_bucket_bytes: float,
                overlap: bool, backward_fraction: float) -> list[str]:
    """The model's assumptions, one sentence each, for printing next to a projection."""
    return [
        f"point-to-point message of n bytes costs alpha + n*beta with alpha = {alpha * 1e6:.3g} us"
        f", beta = 1/{1 / beta / 1e9:.4g} GB/s" if beta > 0 else
        f"point-to-point message costs alpha = {alpha * 1e6:.3g} us (infinite bandwidth)",
        "ring allreduce: 2(p-1)*alpha + 2(p-1)/p * n*beta; tree (recursive doubling): "
        "ceil(log2 p)*(alpha + n*beta); reduction arithmetic is folded into beta",
        f"gradient buckets: first {first_bucket_bytes / 2**20:.3g} MB, then "
        f"{bucket_bytes / 2**20:.3g} MB each, one allreduce in flight at a time",
        (f"overlap on: backward is {backward_fraction:.0%} of compute and produces gradient "
         "bytes at a constant rate; a bucket's allreduce starts when it is complete"
         if overlap else "overlap off: every allreduce runs after backward"),
        "weak scaling: per-rank compute stays constant; efficiency = compute / step",
        "communication takes no CPU time from the ranks (a NIC moves the bytes); MPI over shared "
        "memory on fully used cores does take it, and compute slows down (see --calibrate)",
        "not modelled: contention between nodes, stragglers, network topology, "
        "optimizer time outside compute",
    ]


# --- the command: projection, optionally calibrated by measurements here ---------------------

DEFAULT_BANDWIDTH = 100e9 / 8  # 100 Gbit/s in bytes/s
DEFAULT_LATENCY_US = 2.0


@dataclass
class ProjectConfig:
    """What ``distprop bench project`` computes."""

    workload: str = "wide"
    grad_mb: float | None = None
    compute_ms: float | None = None
    bandwidth: float | None = None  # bytes/s
    latency_us: float | None = None
    ranks: list[int] = field(default_factory=lambda: [2**k for k in range(3, 13)])
    bucket_mb: float = 25.0
    first_bucket_mb: float = 1.0
    overlap: bool = True
    backward_fraction: float = 2 / 3
    calibrate: bool = False
    steps: int = 20


def model_grad_bytes(workload: str) -> int:
    """Gradient bytes of a zoo model (float32)."""
    from distprop.models import build_model

    return 4 * int(sum(p.numel() for p in build_model(workload).parameters()))


def calibrate(cfg: ProjectConfig, grad_bytes: float, echo=print) -> dict:
    """Measure alpha/beta (raw MPI Allreduce, 2 ranks) and one rank's step here; predict the
    2-rank step with the model and compare with a measured 2-rank run."""
    import json

    from distprop.bench import launching
    from distprop.bench.scaling import ScalingConfig, run_one
    from distprop.bench.units import parse_sizes

    sizes = parse_sizes("4KB..64MB", factor=4)
    echo("# calibrating: raw MPI Allreduce on 2 ranks ...")
    out = launching.run_worker(2, ["-m", "distprop.bench.runner", json.dumps(
        {"kind": "allreduce", "sizes": sizes, "methods": ["mpi"]})])
    if out.error:
        raise RuntimeError(f"allreduce calibration failed: {out.error}")
    pts = out.result["rows"]
    alpha, beta = fit_alpha_beta([r["bytes"] for r in pts], [r["time_median_s"] for r in pts])
    runs = {}
    scfg = ScalingConfig(workload=cfg.workload, ranks=[1, 2], steps=cfg.steps, warmup=3,
                         overlap=cfg.overlap, bucket_mb=cfg.bucket_mb)
    for n in (1, 2):
        echo(f"# calibrating: {cfg.workload} on {n} rank(s) ...")
        row, _ = run_one(scfg, n)
        if row.get("error"):
            raise RuntimeError(f"{n}-rank calibration run failed: {row['error']}")
        runs[n] = row
    compute_s = runs[1]["step_s"]
    buckets = bucket_sizes(grad_bytes, cfg.bucket_mb * 2**20, cfg.first_bucket_mb * 2**20)
    predicted = project_step(compute_s, buckets, 2, "ring", alpha, beta, cfg.overlap,
                             cfg.backward_fraction)
    measured_step = runs[2]["step_s"]
    return {"kind": "calibration", "alpha_s": alpha, "beta_s_per_byte": beta,
            "bandwidth_gbs": (1 / beta / 1e9) if beta > 0 else None,
            "fit_points": [(r["bytes"], r["time_median_s"]) for r in pts],
            "compute_s": compute_s, "measured_step_s_2": measured_step,
            "measured_efficiency_2": compute_s / measured_step,
            "predicted_step_s_2": predicted.step_s,
            "predicted_efficiency_2": predicted.efficiency,
            "prediction_error": predicted.step_s / measured_step - 1.0,
            "measured_comm_s_2": runs[2]["comm_s"],
            "measured_exposed_comm_s_2": runs[2]["exposed_comm_s"],
            "predicted_exposed_comm_s_2": predicted.exposed_comm_s}


def run_project(cfg: ProjectConfig, echo=print) -> list[dict]:
    """Print the assumptions and the projection table; returns the rows (JSON lines)."""
    import json

    grad_bytes = cfg.grad_mb * 2**20 if cfg.grad_mb else model_grad_bytes(cfg.workload)
    rows: list[dict] = []
    alpha = None if cfg.latency_us is None else cfg.latency_us * 1e-6
    beta = None if cfg.bandwidth is None else 1.0 / cfg.bandwidth
    compute_s = None if cfg.compute_ms is None else cfg.compute_ms * 1e-3
    if cfg.calibrate:
        cal = calibrate(cfg, grad_bytes, echo)
        rows.append(cal)
        echo(f"measured here: alpha = {cal['alpha_s'] * 1e6:.1f} us, beta = 1/"
             f"{cal['bandwidth_gbs'] or float('inf'):.2f} GB/s, one-rank step "
             f"{cal['compute_s'] * 1e3:.1f} ms")
        echo(f"2 ranks: predicted step {cal['predicted_step_s_2'] * 1e3:.1f} ms (efficiency "
             f"{cal['predicted_efficiency_2']:.2f}), measured {cal['measured_step_s_2'] * 1e3:.1f}"
             f" ms (efficiency {cal['measured_efficiency_2']:.2f}): error "
             f"{cal['prediction_error']:+.0%}")
        alpha = cal["alpha_s"] if alpha is None else alpha
        beta = cal["beta_s_per_byte"] if beta is None else beta
        compute_s = cal["compute_s"] if compute_s is None else compute_s
    alpha = DEFAULT_LATENCY_US * 1e-6 if alpha is None else alpha
    beta = 1.0 / DEFAULT_BANDWIDTH if beta is None else beta
    bucket_b, first_b = cfg.bucket_mb * 2**20, cfg.first_bucket_mb * 2**20
    echo("assumptions:")
    for line in assumptions(alpha, beta, bucket_b, first_b, cfg.overlap, cfg.backward_fraction):
        echo(f"  - {line}")
    echo(f"  - {cfg.workload}: {grad_bytes / 2**20:.1f} MB of float32 gradients, one-rank "
         f"compute {compute_s * 1e3:.1f} ms per step")
    proj = project(compute_s, grad_bytes, cfg.ranks, alpha, beta, bucket_b, first_b,
                   cfg.overlap, cfg.backward_fraction)
    for r in proj:
        r["workload"] = cfg.workload
    echo(f"{'ranks':>6} {'ring step ms':>13} {'ring eff':>9} {'tree step ms':>13} "
         f"{'tree eff':>9}")
    by = {(r["ranks"], r["algorithm"]): r for r in proj}
    for p in cfg.ranks:
        ring, tree = by[(p, "ring")], by[(p, "tree")]
        echo(f"{p:>6} {ring['step_s'] * 1e3:>13.2f} {ring['efficiency']:>9.3f} "
             f"{tree['step_s'] * 1e3:>13.2f} {tree['efficiency']:>9.3f}")
    rows.extend(proj)
    for r in rows:
        echo(json.dumps(r))
    return rows
