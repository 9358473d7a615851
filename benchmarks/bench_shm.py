"""Node-shared gradient buffers (issue 13): the targets, shm against MPI, interleaved in rounds.

    python benchmarks/bench_shm.py --rounds 3            # all, appends results/shm_cpu.jsonl
    python benchmarks/bench_shm.py --rounds 1 --only sync

Each round runs every command once with ``DISTPROP_INTRA_NODE=shm`` and once with ``=mpi``
(alternating which goes first), so load on a shared machine hits both alike:

* ``sync``: ``distprop bench allreduce --model wide --methods mpi,ddp-mpi,ddp-shm,memcpy``: the
  96 MiB gradient sync of ``wide`` on 2 ranks (overlap off), one ``MPI.Allreduce`` of the same
  bytes and a ``memcpy`` of them on every rank at once, interleaved call by call (one run: the
  environment variable does not matter there, each method forces its own);
* ``wide`` / ``mlp``: ``distprop bench scaling --ranks 1,2``: weak-scaling efficiency;
* ``torch``: ``distprop bench peers --model wide --ranks 2 --peers torch-ddp``: step time
  against PyTorch DDP (gloo).

Every JSON row the commands print is stored with ``round``, ``intra_node`` and ``command``; the
summary (medians over rounds) is printed at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
OUT = HERE / "results" / "shm_cpu.jsonl"

COMMANDS = {
    "sync": (("bench", "allreduce", "--model", "wide", "--ranks", "2", "--methods",
              "mpi,ddp-mpi,ddp-shm,memcpy", "--repeats", "20"), False),
    "wide": (("bench", "scaling", "--model", "wide", "--ranks", "1,2", "--steps", "20",
              "--warmup", "5"), True),
    "mlp": (("bench", "scaling", "--model", "mlp", "--ranks", "1,2", "--steps", "30",
             "--warmup", "5"), True),
    "torch": (("bench", "peers", "--model", "wide", "--ranks", "2", "--peers", "torch-ddp",
               "--steps", "20", "--warmup", "5"), True),
}


def run(name: str, intra: str, rnd: int) -> list[dict]:
    args, _ = COMMANDS[name]
    env = {**os.environ, "DISTPROP_INTRA_NODE": intra, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "distprop", *args]
    t0 = time.time()
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=1200, env=env)
    shown = f"DISTPROP_INTRA_NODE={intra} distprop {' '.join(args)}"
    rows = []
    for line in done.stdout.splitlines():
        if line.startswith("{"):
            row = json.loads(line)
            row.update(target=name, round=rnd, intra_node=intra, command=shown,
                       at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t0)),
                       load=os.getloadavg()[0])
            rows.append(row)
    if done.returncode != 0:
        rows.append({"target": name, "round": rnd, "intra_node": intra, "command": shown,
                     "error": done.stderr[-2000:]})
    return rows


def summary(rows: list[dict]) -> None:
    def med(values):
        values = [v for v in values if v is not None]
        return statistics.median(values) if values else None

    def fmt(v, spec=".3f"):
        return "-" if v is None else format(v, spec)

    sync = [r for r in rows if r.get("target") == "sync" and "method" in r]
    for m in ("mpi", "ddp-mpi", "ddp-shm", "memcpy"):
        got = [r for r in sync if r["method"] == m]
        print(f"sync {m:8s} median {fmt(med([r['time_median_s'] * 1e3 for r in got]), '.1f')} ms"
              f"  vs mpi {fmt(med([r['vs_mpi'] for r in got]))}  ({len(got)} runs)")
    for name in ("wide", "mlp"):
        for intra in ("shm", "mpi"):
            two = [r for r in rows if r.get("target") == name and r.get("intra_node") == intra
                   and r.get("ranks") == 2 and "efficiency" in r]
            one = [r for r in rows if r.get("target") == name and r.get("intra_node") == intra
                   and r.get("ranks") == 1 and "step_s" in r]
            print(f"{name} {intra}: efficiency {fmt(med([r['efficiency'] for r in two]))} "
                  f"(runs {[round(r['efficiency'], 3) for r in two]}); step 1 rank "
                  f"{fmt(med([r['step_s'] * 1e3 for r in one]), '.1f')} ms, 2 ranks "
                  f"{fmt(med([r['step_s'] * 1e3 for r in two]), '.1f')} ms, compute "
                  f"{fmt(med([r.get('compute_s', 0) * 1e3 for r in two]), '.1f')} ms, exposed "
                  f"{fmt(med([r.get('exposed_comm_s', 0) * 1e3 for r in two]), '.1f')} ms")
    for intra in ("shm", "mpi"):
        ratio = [r for r in rows if r.get("target") == "torch" and r.get("intra_node") == intra
                 and r.get("kind") == "ratio" and r.get("peer") == "torch-ddp"]
        print(f"wide vs torch-ddp, {intra}: {fmt(med([r.get('ratio') for r in ratio]))} "
              f"(runs {[round(r['ratio'], 3) for r in ratio if r.get('ratio')]})")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--only", default=",".join(COMMANDS))
    ap.add_argument("--summary-only", action="store_true",
                    help="summarise the stored rows without running anything")
    args = ap.parse_args()
    if not args.summary_only:
        names = [n.strip() for n in args.only.split(",") if n.strip()]
        for rnd in range(args.rounds):
            for name in names:
                both = COMMANDS[name][1]
                order = (("shm", "mpi") if rnd % 2 == 0 else ("mpi", "shm")) if both else ("shm",)
                for intra in order:
                    got = run(name, intra, rnd)
                    with OUT.open("a") as f:
                        for row in got:
                            f.write(json.dumps(row) + "\n")
                    print(f"round {rnd} {name} {intra}: {len(got)} rows", flush=True)
    rows = [json.loads(x) for x in OUT.read_text().splitlines() if x.strip()]
    summary(rows)


if __name__ == "__main__":
    main()
