"""``distprop bench scaling``: one launched run per rank count, every rank's timings, one report."""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path

from distprop import trace
from distprop.bench import launching, report


@dataclass
class ScalingConfig:
    """What ``distprop bench scaling`` runs (one run per entry of ``ranks``)."""

    workload: str
    ranks: list[int]
    mode: str = "weak"
    batch_size: int | None = None
    global_batch_size: int | None = None
    steps: int = 30
    warmup: int = 5
    threads_per_rank: int = 1
    overlap: bool = True
    bucket_mb: float = 25.0
    compression: str | None = None
    device: str = "cpu"
    out: str | None = None
    trace: str | None = None
    timeout_s: float = 600.0
    oversubscribe: bool = False
    command: str | None = None  # the command line, recorded in every row

    def batch_per_rank(self, ranks: int) -> int:
        """Per-rank batch: fixed (weak) or the global batch split evenly (strong)."""
        from distprop.bench.runner import default_batch

        if self.mode == "weak":
            return self.batch_size or default_batch(self.workload)
        global_batch = self.global_batch_size or default_batch(self.workload) * max(self.ranks)
        return global_batch // ranks

    def validate(self) -> None:
        """Raise ValueError for settings no run could satisfy."""
        if self.mode not in ("weak", "strong"):
            raise ValueError(f"mode must be weak or strong, got {self.mode!r}")
        if self.mode == "weak" and self.global_batch_size is not None:
            raise ValueError("--global-batch-size is for --mode strong; weak scaling fixes the "
                             "batch per rank (--batch-size)")
        if self.mode == "strong" and self.batch_size is not None:
            raise ValueError("--batch-size is for --mode weak; strong scaling fixes the global "
                             "batch (--global-batch-size)")
        if self.mode == "strong":
            from distprop.bench.runner import default_batch

            g = self.global_batch_size or default_batch(self.workload) * max(self.ranks)
            bad = [r for r in self.ranks if g % r]
            if bad:
                raise ValueError(f"global batch {g} does not split evenly over {bad} ranks")
        if self.steps < 1 or self.warmup < 0:
            raise ValueError("--steps must be >= 1 and --warmup >= 0")

    def run_config(self, ranks: int) -> dict:
        """The JSON config the per-rank worker receives for one run."""
        cfg = {"kind": "train", "workload": self.workload, "mode": self.mode,
               "batch_per_rank": self.batch_per_rank(ranks), "steps": self.steps,
               "warmup": self.warmup, "threads_per_rank": self.threads_per_rank,
               "overlap": self.overlap, "bucket_mb": self.bucket_mb,
               "compression": self.compression, "device": self.device}
        if self.trace:
            cfg["trace"] = trace_stem(self.trace, ranks) + ".rank{rank}.json"
        return cfg


def trace_stem(path: str, ranks: int) -> str:
    """``out/trace.json`` -> ``out/trace.n2`` (per-run traces: ``.rank<R>.json`` and merged
    ``.json``)."""
    p = Path(path)
    stem = p.stem if p.suffix == ".json" else p.name
    return str(p.with_name(f"{stem}.n{ranks}"))


def run_one(cfg: ScalingConfig, ranks: int) -> tuple[dict, dict | None]:
    """Launch one run; returns its row and the raw result (every rank's per-step timings, None
    when the run failed)."""
    run_cfg = cfg.run_config(ranks)
    argv = ["-m", "distprop.bench.runner", json.dumps(run_cfg)]
    outcome = launching.run_worker(ranks, argv, threads=cfg.threads_per_rank,
                                   timeout=cfg.timeout_s, oversubscribe=cfg.oversubscribe)
    if outcome.error is not None:
        return report.error_row(run_cfg, ranks, outcome.error), None
    row = report.summarize_run(outcome.result)
    row["params"] = outcome.result.get("params")
    if cfg.trace:
        stem = trace_stem(cfg.trace, ranks)
        files = [f"{stem}.rank{r}.json" for r in range(ranks)]
        row["trace"] = trace.merge([f for f in files if Path(f).exists()], f"{stem}.json")
    return row, outcome.result


def run_scaling(cfg: ScalingConfig, echo=print) -> list[dict]:
    """Run the sweep, print the table and JSON lines, write files under ``cfg.out``."""
    cfg.validate()
    rows, raw = [], []
    for ranks in cfg.ranks:
        echo(f"# {cfg.workload}: {ranks} rank(s) x {cfg.threads_per_rank} thread(s), "
             f"batch {cfg.batch_per_rank(ranks)}/rank ...", file=sys.stderr)
        row, result = run_one(cfg, ranks)
        row["command"] = cfg.command
        rows.append(row)
        if result is not None:
            raw.append(result)
    report.add_scaling(rows)
    echo(report.format_table(rows))
    for row in rows:
        echo(json.dumps(row))
    if cfg.out:
        out = Path(cfg.out)
        out.mkdir(parents=True, exist_ok=True)
        name = f"scaling-{cfg.workload}-{cfg.mode}"
        report.write_jsonl(rows, out / f"{name}.jsonl")
        report.write_jsonl(raw, out / f"{name}.per-rank.jsonl")
        report.write_csv(rows, out / f"{name}.csv")
        wrote_png = report.plot_scaling(rows, out / f"{name}.png")
        echo(f"# wrote {out / name}.jsonl, .per-rank.jsonl, .csv" + (", .png" if wrote_png else
             " (no PNG: install the 'plot' extra, matplotlib)"), file=sys.stderr)
    return rows

