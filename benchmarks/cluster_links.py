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
import os
import re
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests" / "cluster"))
import netcluster  # noqa: E402

RATES = ("10gbit", "1gbit", "100mbit")
# A private cluster (its own namespace names): a test run of tests/test_cluster.py at the same
# time must not tear it down in the middle of a benchmark.
HOST_A, HOST_B = "lnka", "lnkb"
KINDS = ("none", "fp16", "bf16")


def one_run(cluster, env, rate: str, kind: str, code: str = "after", repo: Path = REPO) -> dict:
    before = cluster.counters()[HOST_B][1]
    start = time.time()
    done = cluster.run(HOST_A, [sys.executable, "-m", "distprop", "train", "-H",
                                f"{HOST_A}:1,{HOST_B}:1", "-n", "2", "--threads-per-rank", "1",
                                 "--model", "mlp", "--dataset", "synthetic", "--epochs", "1",
                                 "--log-every", "5", "--compression", kind,
                                 "--out", f"/tmp/distprop-linkbench/{rate}-{kind}"],
                       env={**env, "PYTHONPATH": str(repo)}, timeout=300, check=False,
                       cwd=str(repo))
    rate_found = re.findall(r"(\d+) samples/s", done.stdout)
    return {"rate": rate, "compression": kind, "code": code, "rc": done.returncode,
            "samples_per_s": int(rate_found[-1]) if rate_found else None,
            "wall_s": round(time.time() - start, 1),
            "hostb_rx_MB": round((cluster.counters()[HOST_B][1] - before) / 1e6, 1),
            **({} if done.returncode == 0 else {"tail": (done.stdout + done.stderr)[-1500:]})}


# -- bench scaling / bench allreduce across the two hosts, with the project model beside -----

LATENCY_S = 50e-6  # per-message latency assumed for the predictions (TCP over veth)


def _bits_per_s(rate: str) -> float:
    number, unit = re.fullmatch(r"(\d+(?:\.\d+)?)([kmg]?)bit", rate).groups()
    return float(number) * {"": 1, "k": 1e3, "m": 1e6, "g": 1e9}[unit]


def _hostfile(cluster) -> Path:
    hostfile = cluster.state / "bench-hosts"
    hostfile.write_text(f"{HOST_A}:1\n{HOST_B}:1\n")  # 1 rank: the first host; 2: one each
    return hostfile


def _bench(cluster, env, args: list, out: Path, timeout: float = 900) -> list[dict]:
    """Run ``distprop bench ARGS --out OUT`` on the first host (ranks placed through
    HYDRA_HOST_FILE)."""
    done = cluster.run(HOST_A, [sys.executable, "-m", "distprop", "bench", *map(str, args),
                                 "--out", out],
                       env={**env, "HYDRA_HOST_FILE": str(_hostfile(cluster))}, timeout=timeout,
                       check=False, cwd=str(REPO))
    if done.returncode != 0:
        print(done.stdout[-2000:], done.stderr[-2000:], file=sys.stderr)
    rows = []
    for f in sorted(out.glob("*.jsonl")):
        if not f.name.endswith(".per-rank.jsonl"):
            rows += [json.loads(line) for line in f.read_text().splitlines() if line.strip()]
    return rows


def bench_rows(cluster, env, rate: str, work: Path) -> list[dict]:
    """``bench scaling`` (mlp, 1 and 2 ranks, each compression) and ``bench allreduce`` (1 MB
    and 8 MB; mpi, ddp, ddp-fp16, ddp-bf16) at ``rate``, each row with the project model's
    prediction (ring, 2 ranks, LATENCY_S, the link's rate; scaling: compute = the 1-rank
    step)."""
    from distprop.bench.project import bucket_sizes, project_step, ring_allreduce_time

    beta = 8.0 / _bits_per_s(rate)
    rows = []
    for kind in KINDS:
        extra = [] if kind == "none" else ["--compression", kind]
        found = _bench(cluster, env, ["scaling", "--model", "mlp", "--ranks", "1,2", "--steps",
                                      10, "--warmup", 2, *extra], work / f"{rate}-scaling-{kind}")
        one = [r for r in found if r["ranks"] == 1 and not r.get("error")]
        for r in found:
            row = {"bench": "scaling", "rate": rate, "compression": kind, "ranks": r["ranks"],
                   "step_ms": round(1e3 * r["step_median_s"], 1) if r.get("step_median_s")
                   else None, "error": r.get("error")}
            if r["ranks"] == 2 and one:
                grad = 4.0 * r["params"] * (0.5 if kind != "none" else 1.0)
                pred = project_step(one[0]["step_median_s"],
                                    bucket_sizes(grad, 25 * 2**20, 2**20), 2, "ring",
                                    LATENCY_S, beta)
                row["predicted_step_ms"] = round(1e3 * pred.step_s, 1)
            rows.append(row)
            print(json.dumps(row), flush=True)
    found = _bench(cluster, env, ["allreduce", "--ranks", 2, "--methods", "mpi,ddp", "--sizes",
                                  "1MB,8MB", "--compression", "fp16,bf16", "--repeats", 5],
                   work / f"{rate}-allreduce")
    for r in found:
        wire = r["bytes"] * (0.5 if r["method"].startswith("ddp-") else 1.0)
        rows.append({"bench": "allreduce", "rate": rate, "method": r["method"],
                     "bytes": r["bytes"], "ms": round(1e3 * r["time_median_s"], 2),
                     "predicted_ms": round(1e3 * ring_allreduce_time(wire, 2, LATENCY_S, beta),
                                           2)})
        print(json.dumps(rows[-1]), flush=True)
    return rows


# -- a cut link: how long until the job ends, and what it says --------------------------------

CUTS = {  # how to cut hostb off, and how to undo it
    "link down": (lambda c: c.run(HOST_B, ["ip", "link", "set", "eth0", "down"]),
                  lambda c: c.run(HOST_B, ["ip", "link", "set", "eth0", "up"])),
    "black hole": (lambda c: [c.run(h, ["ip", "route", "add", "blackhole", f"{ip}/32"])
                              for h, ip in ((HOST_A, netcluster.address(1)),
                                            (HOST_B, netcluster.address(0)))],
                   lambda c: [c.run(h, ["ip", "route", "del", "blackhole", f"{ip}/32"],
                                    check=False)
                              for h, ip in ((HOST_A, netcluster.address(1)),
                                            (HOST_B, netcluster.address(0)))]),
}


def cut_run(cluster, env, how: str) -> dict:
    """Train across both hosts, cut hostb off once steps are running (``how``: a key of
    CUTS), and time the job's end from the cut; keep its last lines."""
    import subprocess

    cut, undo = CUTS[how]
    env = {k: v for k, v in env.items() if k != "DISTPROP_STALL_TIMEOUT"}  # the default limit
    argv = cluster.command(HOST_A, [sys.executable, "-m", "distprop", "train", "-H",
                                    f"{HOST_A}:1,{HOST_B}:1", "-n", "2", "--threads-per-rank", "1",
                                     "--model", "mlp", "--dataset", "synthetic", "--epochs",
                                     1000, "--log-every", 5, "--out",
                                     f"/tmp/distprop-linkbench/cut-{how.replace(' ', '-')}"])
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, **env}, cwd=str(REPO))
    lines = []
    try:
        for line in proc.stdout:  # wait for training steps (two log lines)
            lines.append(line.rstrip("\n"))
            if sum("samples/s" in x for x in lines) >= 2:
                break
        cut(cluster)
        t0 = time.monotonic()
        rest, _ = proc.communicate(timeout=900)
        took = time.monotonic() - t0
    finally:
        if proc.poll() is None:
            proc.kill()
        undo(cluster)
    lines += rest.splitlines()
    said = [x for x in lines if "stall watchdog" in x or x.startswith("distprop:")
            or "not heard from" in x]
    return {"cut": how, "rc": proc.returncode, "cut_to_end_s": round(took, 1),
            "messages": [x[:600] for x in said][-4:]}


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
    parser.add_argument("--bench", action="store_true",
                        help="distprop bench scaling/allreduce per rate with predictions")
    parser.add_argument("--cut", action="store_true",
                        help="time from a cut link (link down, black hole) to the job's end")
    parser.add_argument("--steps", action="store_true",
                        help="with --bench/--cut: also the train step-time runs")
    args = parser.parse_args()
    out = Path(args.out)
    trees = [("after", REPO)] + ([("before", args.baseline.resolve())] if args.baseline else [])
    cluster = netcluster.Cluster.private((HOST_A, HOST_B)).up()
    rows = []
    try:
        env = {**cluster.mpi_env(), "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1"}
        if args.cut:
            for how in CUTS:
                rows.append(cut_run(cluster, env, how))
                print(json.dumps(rows[-1]), flush=True)
        if args.bench:
            work = Path("/tmp/distprop-linkbench/bench")
            for rate in args.rates.split(","):
                cluster.set_rate(rate)
                rows += bench_rows(cluster, env, rate, work)
            cluster.set_rate(None)
        for rate in args.rates.split(",") if args.steps or not (args.bench or args.cut) else ():
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
