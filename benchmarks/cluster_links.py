"""DDP step time of ``distprop train`` over an emulated link, with and without compression.

Builds the two-host test cluster (tests/cluster/netcluster.py; needs root), limits each host's
eth0 with tbf to 10 Gbit/s, 1 Gbit/s and 100 Mbit/s, and trains ``mlp`` on synthetic data for one
epoch with ``--compression none|fp16|bf16``. Prints one JSON line per run and writes them all to
the file given as the first argument (default ``cluster_links.json``). Tears the cluster down.

``--repeats N`` runs every (rate, compression) N times, interleaved (round by round, the
compressions in rotated order); ``--baseline DIR`` also runs, interleaved with this tree, the
distprop in DIR (e.g. ``git archive OLD | tar -x -C DIR``), labelled ``code: before``.
``--table FILE.json`` prints the medians of such a file as a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests" / "cluster"))
import netcluster  # noqa: E402

RATES = ("10gbit", "1gbit", "100mbit")
KINDS = ("none", "fp16", "bf16")


def one_run(cluster, env, rate: str, kind: str, code: str = "after", repo: Path = REPO) -> dict:
    before = cluster.counters()["hostb"][1]
    start = time.time()
    done = cluster.run("hosta", [sys.executable, "-m", "distprop", "train", "-H",
                                 "hosta:1,hostb:1", "-n", "2", "--threads-per-rank", "1",
                                 "--model", "mlp", "--dataset", "synthetic", "--epochs", "1",
                                 "--log-every", "5", "--compression", kind,
                                 "--out", f"/tmp/distprop-linkbench/{rate}-{kind}"],
                       env={**env, "PYTHONPATH": str(repo)}, timeout=300, check=False,
                       cwd=str(repo))
    rate_found = re.findall(r"(\d+) samples/s", done.stdout)
    return {"rate": rate, "compression": kind, "code": code, "rc": done.returncode,
            "samples_per_s": int(rate_found[-1]) if rate_found else None,
            "wall_s": round(time.time() - start, 1),
            "hostb_rx_MB": round((cluster.counters()["hostb"][1] - before) / 1e6, 1),
            **({} if done.returncode == 0 else {"tail": (done.stdout + done.stderr)[-1500:]})}


def table(rows: list[dict], batch: int = 64) -> str:
    """Markdown: median ms/step (= batch / samples/s) per rate, compression and code, with the
    runs' count, the min..max and hostb's received MB."""
    import statistics

    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["rate"], r["compression"], r.get("code", "after")), []).append(r)
    out = ["| link (tbf) | compression | code | runs | ms/step median | min..max | hostb rx (MB) |",
           "|---|---|---|---|---|---|---|"]
    for (rate, kind, code), runs in groups.items():
        ms = [1e3 * batch / r["samples_per_s"] for r in runs if r["rc"] == 0]
        failed = len(runs) - len(ms)
        cell = f"{statistics.median(ms):.0f}" if ms else "-"
        span = f"{min(ms):.0f}..{max(ms):.0f}" if ms else "-"
        rx = statistics.median(r["hostb_rx_MB"] for r in runs)
        out.append(f"| {rate} | {kind} | {code} | {len(ms)}" + (f" ({failed} failed)" if failed
                                                                 else "")
                   + f" | {cell} | {span} | {rx:.1f} |")
    return "\n".join(out)


def main() -> int:
    if sys.argv[1:2] == ["--table"]:
        print(table(json.loads(Path(sys.argv[2]).read_text())))
        return 0
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", nargs="?", default="cluster_links.json")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--baseline", type=Path, default=None)
    parser.add_argument("--rates", default=",".join(RATES))
    args = parser.parse_args()
    out = Path(args.out)
    trees = [("after", REPO)] + ([("before", args.baseline.resolve())] if args.baseline else [])
    cluster = netcluster.Cluster(("hosta", "hostb")).up()
    rows = []
    try:
        env = {**cluster.mpi_env(), "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1"}
        for rate in args.rates.split(","):
            cluster.set_rate(rate)
            for rep in range(args.repeats):
                kinds = KINDS[rep % 3:] + KINDS[:rep % 3]
                for kind in kinds:
                    for code, repo in (trees if rep % 2 == 0 else trees[::-1]):
                        rows.append({**one_run(cluster, env, rate, kind, code, repo),
                                     "repeat": rep})
                        print(json.dumps(rows[-1]), flush=True)
    finally:
        cluster.down()
    out.write_text(json.dumps(rows, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
