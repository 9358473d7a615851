"""Render ``results/shapes_cpu.jsonl`` (from bench_shapes.py) as ``results/shapes_cpu.md``.

    python benchmarks/make_shapes_table.py [--jsonl PATH] [--md PATH]

One table per family (shape, ratio to PyTorch at each thread count, times and GEMM floor at the
lowest thread count), then the median and worst ratio per family and thread count, and overall.
``results/shapes_notes.md``, when present, is appended (the profile notes).
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

HERE = Path(__file__).resolve().parent
NOT_SHAPE = {"family", "threads", "ours_ms", "torch_ms", "ratio", "gemm_floor_ms", "repeats",
             "clock"}


def load(path: Path):
    env, rows, done = {}, [], {}
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        row = json.loads(line)
        if "environment" in row:
            env = row["environment"]
        elif row.get("done"):
            done = row
        else:
            rows.append(row)
    return env, rows, done


def shape_key(row) -> tuple:
    return tuple((k, json.dumps(v)) for k, v in row.items() if k not in NOT_SHAPE)


def fmt(v) -> str:
    return "-" if v is None else f"{v:.2f}" if isinstance(v, float) else str(v)


def build(env: dict, rows: list[dict], done: dict, command: str | None) -> str:
    threads = sorted({r["threads"] for r in rows})
    fams = list(dict.fromkeys(r["family"] for r in rows))
    t0 = threads[0]
    lines = ["# Shape sweep, CPU: distprop vs PyTorch, forward+backward (generated)", ""]
    cmd = command or "python benchmarks/bench_shapes.py " + " ".join(env.get("argv", []))
    lines += [
        f"Command: `{cmd}`; rendered by `python benchmarks/make_shapes_table.py`. Versions: "
        f"python {env.get('python', '?')}, numpy {env.get('numpy', '?')}, torch "
        f"{env.get('torch', '?')}, distprop {env.get('distprop', '?')}; "
        f"{env.get('cpu_count', '?')} cores, shared with other jobs. Ratio = median ours / "
        "median torch step (forward, loss = sum(out * fixed projection), backward), the two "
        "alternating step by step in one process. GEMM floor = the step's matrix products timed "
        f"alone with np.matmul at {t0} thread(s). Wall time of the sweep: "
        f"{done.get('wall_s', '?')} s.", "",
        "## Summary (ratio ours/torch; < 1 means distprop is faster)", "",
        "| family | shapes | " + " | ".join(f"median {t}t | worst {t}t" for t in threads)
        + " |",
        "|---|---|" + "---|---|" * len(threads),
    ]

    def stats(sel):
        vals = [r["ratio"] for r in sel]
        return (statistics.median(vals), max(vals)) if vals else (None, None)

    for fam in fams + ["all"]:
        sel = rows if fam == "all" else [r for r in rows if r["family"] == fam]
        cells = []
        for t in threads:
            med, worst = stats([r for r in sel if r["threads"] == t])
            cells += [fmt(med), fmt(worst)]
        n = len({shape_key(r) for r in sel})
        name = "**all**" if fam == "all" else fam
        lines.append(f"| {name} | {n} | " + " | ".join(cells) + " |")
    for fam in fams:
        sel = [r for r in rows if r["family"] == fam]
        by_shape: dict[tuple, dict[int, dict]] = {}
        for r in sel:
            by_shape.setdefault(shape_key(r), {})[r["threads"]] = r
        lines += ["", f"## {fam}", "",
                  "| shape | " + " | ".join(f"ratio {t}t" for t in threads)
                  + f" | ours ms {t0}t | torch ms {t0}t | GEMM floor ms {t0}t |",
                  "|---|" + "---|" * (len(threads) + 3)]
        for key, per in by_shape.items():
            shape = ", ".join(f"{k}={json.loads(v)}" for k, v in key)
            first = per.get(t0, {})
            lines.append(f"| {shape} | " + " | ".join(
                fmt(per[t]["ratio"]) if t in per else "-" for t in threads)
                + f" | {fmt(first.get('ours_ms'))} | {fmt(first.get('torch_ms'))} | "
                f"{fmt(first.get('gemm_floor_ms'))} |")
    notes = HERE / "results" / "shapes_notes.md"
    if notes.exists():
        lines += ["", notes.read_text().strip()]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jsonl", default=str(HERE / "results" / "shapes_cpu.jsonl"))
    parser.add_argument("--md", default=str(HERE / "results" / "shapes_cpu.md"))
    parser.add_argument("--command", default=None, help="the command to quote (default: argv)")
    args = parser.parse_args(argv)
    env, rows, done = load(Path(args.jsonl))
    Path(args.md).write_text(build(env, rows, done, args.command))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
