"""Turn every rank's per-step timings into scaling rows; print, write JSON lines, CSV and PNG.

A synchronous step ends for everyone when the slowest rank's gradients arrive, so a step's time is
the *maximum* over ranks of that step, and throughput and efficiency come from the median of
those maxima -- never from rank 0 alone multiplied by the world size.
"""

from __future__ import annotations

import csv
import json
import statistics
from pathlib import Path

# Keys of one scaling row, in table/CSV order.
SCALING_KEYS = (
    "workload", "mode", "ranks", "threads_per_rank", "batch_per_rank", "global_batch", "steps",
    "overlap", "bucket_mb", "compression", "device",
    "step_s", "step_median_s", "step_min_s", "step_max_s", "samples_per_s", "speedup",
    "efficiency", "baseline_ranks", "compute_s", "comm_s", "exposed_comm_s", "launch_s",
    "optimizer_s",
    "straggler_spread_s", "peak_rss_mb", "peak_rss_mb_max", "heap", "error",
)
_PER_STEP = ("compute_s", "comm_s", "exposed_comm_s", "launch_s", "optimizer_s")


def _median(values: list) -> float | None:
    """Median of the measured values (None entries are phases a peer does not measure)."""
    values = [v for v in values if v is not None and v == v]
    return float(statistics.median(values)) if values else None


def summarize_run(result: dict) -> dict:
    """One row from one run's gathered per-rank timings (``result["per_rank"]``: one dict per
    rank with lists ``step_s``, ``compute_s``, ... of equal length, and ``peak_rss_mb``)."""
    per_rank = result["per_rank"]
    ranks = len(per_rank)
    steps = min(len(r["step_s"]) for r in per_rank)
    all_steps = [t for r in per_rank for t in r["step_s"][:steps]]
    # The step time of the job: per step, the slowest rank.
    synced = [max(r["step_s"][i] for r in per_rank) for i in range(steps)]
    step_s = _median(synced)
    global_batch = result["batch_per_rank"] * ranks
    row = {k: result.get(k) for k in ("workload", "mode", "threads_per_rank", "batch_per_rank",
                                      "overlap", "bucket_mb", "compression", "device")}
    row.update(
        ranks=ranks, global_batch=global_batch, steps=steps, step_s=step_s,
        step_median_s=_median(all_steps), step_min_s=min(all_steps), step_max_s=max(all_steps),
        samples_per_s=global_batch / step_s if step_s > 0 else float("nan"),
        straggler_spread_s=_median([
            max(r["compute_s"][i] for r in per_rank) - min(r["compute_s"][i] for r in per_rank)
            for i in range(steps)]) if ranks > 1 else 0.0,
        peak_rss_mb=[round(r["peak_rss_mb"], 1) for r in per_rank],
        heap=per_rank[0].get("heap"),  # the malloc policy (distprop/heap.py), alike on all ranks
        error=None,
    )
    row["peak_rss_mb_max"] = max(row["peak_rss_mb"])
    for key in _PER_STEP:
        row[key] = _median([v for r in per_rank for v in r.get(key, [])[:steps]])
    return row


def error_row(config: dict, ranks: int, error: str) -> dict:
    """A row for a run that failed: its configuration and its error, no timings."""
    row = dict.fromkeys(SCALING_KEYS)
    row.update({k: config.get(k) for k in ("workload", "mode", "threads_per_rank", "overlap",
                                           "bucket_mb", "compression", "device")})
    row.update(ranks=ranks, batch_per_rank=config.get("batch_per_rank"), error=error)
    return row


def add_scaling(rows: list[dict]) -> list[dict]:
    """Fill ``speedup`` and ``efficiency`` against the smallest successful rank count.

    speedup = throughput(R) / throughput(R0); efficiency = speedup * R0 / R. With a fixed batch
    per rank (weak scaling) that is t(R0) / t(R); with a fixed global batch (strong scaling) it is
    t(R0) / t(R) * R0 / R.
    """
    ok = [r for r in rows if r.get("error") is None]
    if not ok:
        return rows
    base = min(ok, key=lambda r: r["ranks"])
    for r in ok:
        r["baseline_ranks"] = base["ranks"]
        r["speedup"] = r["samples_per_s"] / base["samples_per_s"]
        r["efficiency"] = r["speedup"] * base["ranks"] / r["ranks"]
    return rows


def _fmt(value, scale: float = 1.0, digits: int = 2) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value * scale:.{digits}f}"
    return str(value)


def format_table(rows: list[dict]) -> str:
    """A fixed-width table for the terminal; failed runs show their first error line."""
    head = ("ranks", "step ms (med/min/max)", "samples/s", "speedup", "eff", "compute ms",
            "comm ms", "exposed ms", "spread ms", "peak RSS MB/rank")
    lines = []
    for r in rows:
        if r.get("error"):
            first = str(r["error"]).strip().splitlines()[0] if r["error"] else "failed"
            lines.append((str(r["ranks"]), f"FAILED: {first}"))
            continue
        lines.append((
            str(r["ranks"]),
            f"{r['step_s'] * 1e3:.1f} ({r['step_median_s'] * 1e3:.1f}/{r['step_min_s'] * 1e3:.1f}"
            f"/{r['step_max_s'] * 1e3:.1f})",
            f"{r['samples_per_s']:.0f}", _fmt(r.get("speedup")), _fmt(r.get("efficiency")),
            _fmt(r["compute_s"], 1e3, 1), _fmt(r["comm_s"], 1e3, 1),
            _fmt(r["exposed_comm_s"], 1e3, 1), _fmt(r["straggler_spread_s"], 1e3, 1),
            ",".join(f"{v:.0f}" for v in r["peak_rss_mb"]),
        ))
    widths = [max(len(h), *(len(line[i]) for line in lines if len(line) > i))
              for i, h in enumerate(head)]
    out = ["  ".join(h.rjust(w) for h, w in zip(head, widths))]
    for line in lines:
        if len(line) == 2:
            out.append(line[0].rjust(widths[0]) + "  " + line[1])
        else:
            out.append("  ".join(c.rjust(w) for c, w in zip(line, widths)))
    return "\n".join(out)


def write_jsonl(rows: list[dict], path: Path) -> None:
    with open(path, "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")


def write_csv(rows: list[dict], path: Path, keys=SCALING_KEYS) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(keys), extrasaction="ignore")
        writer.writeheader()
        for r in rows:
            writer.writerow({k: (";".join(str(v) for v in r[k]) if isinstance(r.get(k), list)
                                 else r.get(k)) for k in keys})


def plot_scaling(rows: list[dict], path: Path) -> bool:
    """Throughput and efficiency against ranks with the ideal lines; False without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    ok = [r for r in rows if r.get("error") is None and r.get("efficiency") is not None]
    if not ok:
        return False
    ranks = [r["ranks"] for r in ok]
    base = min(ok, key=lambda r: r["ranks"])
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    ax1.plot(ranks, [r["samples_per_s"] for r in ok], "o-", label="measured")
    ax1.plot(ranks, [base["samples_per_s"] * n / base["ranks"] for n in ranks], "k--",
             label="ideal")
    ax1.set_xlabel("ranks")
    ax1.set_ylabel("samples/s")
    ax1.set_title(f"{base['workload']} ({base['mode']} scaling): throughput")
    ax1.legend()
    ax2.plot(ranks, [r["efficiency"] for r in ok], "o-", label="measured")
    ax2.axhline(1.0, color="k", linestyle="--", label="ideal")
    ax2.set_ylim(0, 1.1)
    ax2.set_xlabel("ranks")
    ax2.set_ylabel("efficiency")
    ax2.set_title("scaling efficiency")
    ax2.legend()
    for ax in (ax1, ax2):
        ax.set_xticks(ranks)
    return _save(fig, path, plt)


# Keys of one ``bench allreduce`` row and of one ``bench peers`` row (and ratio), in CSV order.
ALLREDUCE_KEYS = ("ranks", "method", "bytes", "model", "repeats", "time_median_s", "time_min_s",
                  "time_max_s", "algbw_gbs", "busbw_gbs", "vs_mpi", "error")
PEERS_KEYS = ("peer", "workload", "ranks", "threads_per_rank", "batch_per_rank", "global_batch",
              "steps", "step_s", "step_min_s", "step_max_s", "samples_per_s", "speedup",
              "efficiency", "compute_s", "comm_s", "bytes", "peak_rss_mb_max", "error")
RATIO_KEYS = ("peer", "workload", "ranks", "what", "ratio", "peak_rss_ratio", "efficiency",
              "peer_efficiency")


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def plot_allreduce(rows: list[dict], path: Path) -> bool:
    """Bus bandwidth against message size, one line per method and rank count (a model's
    gradient as a single marker); False without matplotlib or without a measured row."""
    ok = [r for r in rows if not r.get("error") and r.get("busbw_gbs") is not None]
    plt = _pyplot() if ok else None
    if plt is None:
        return False
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for key in sorted({(r["method"], r["ranks"]) for r in ok}):
        mine = sorted((r for r in ok if (r["method"], r["ranks"]) == key),
                      key=lambda r: r["bytes"])
        sized = [r for r in mine if not r.get("model")]
        label = f"{key[0]}, {key[1]} ranks"
        if sized:
            line, = ax.plot([r["bytes"] for r in sized], [r["busbw_gbs"] for r in sized], "o-",
                            label=label)
            color = line.get_color()
        else:
            color = None
        for r in mine:
            if r.get("model"):
                ax.plot([r["bytes"]], [r["busbw_gbs"]], "*", markersize=12, color=color,
                        label=f"{label}: {r['model']} gradient")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("bytes per allreduce")
    ax.set_ylabel("bus bandwidth (GB/s)")
    ax.set_title("allreduce bus bandwidth")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    return _save(fig, path, plt)


def plot_peers(rows: list[dict], path: Path) -> bool:
    """Step time and throughput against ranks for distprop and each peer (the floors as dashed
    lines); False without matplotlib or without a measured row."""
    ok = [r for r in rows if not r.get("error") and r.get("step_s") is not None]
    plt = _pyplot() if ok else None
    if plt is None:
        return False
    fig, (ax_step, ax_rate) = plt.subplots(1, 2, figsize=(10, 4))
    for peer in dict.fromkeys(r["peer"] for r in ok):
        mine = sorted((r for r in ok if r["peer"] == peer), key=lambda r: r["ranks"])
        style = "o--" if peer in ("mpi-allreduce", "gemm-floor") else "o-"
        ax_step.plot([r["ranks"] for r in mine], [r["step_s"] * 1e3 for r in mine], style,
                     label=peer)
        rated = [r for r in mine if r.get("samples_per_s") is not None]
        if rated:
            ax_rate.plot([r["ranks"] for r in rated], [r["samples_per_s"] for r in rated], style,
                         label=peer)
    ranks = sorted({r["ranks"] for r in ok})
    ax_step.set_ylabel("step (ms; floors: their operation alone)")
    ax_rate.set_ylabel("samples/s")
    for ax, title in ((ax_step, "step time"), (ax_rate, "throughput")):
        ax.set_xlabel("ranks")
        ax.set_xticks(ranks)
        ax.set_title(f"{ok[0]['workload']}: {title}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    return _save(fig, path, plt)


def _save(fig, path: Path, plt) -> bool:
    """Lay out, write and close one figure; True (the plot functions' "written")."""
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True
