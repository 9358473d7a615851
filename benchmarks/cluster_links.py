"""DDP step time of ``distprop train`` over an emulated link, with and without compression.

Builds the two-host test cluster (tests/cluster/netcluster.py; needs root), limits each host's
eth0 with tbf to 10 Gbit/s, 1 Gbit/s and 100 Mbit/s, and trains ``mlp`` on synthetic data for one
epoch with ``--compression none|fp16|bf16``. Prints one JSON line per run and writes them all to
the file given as the first argument (default ``cluster_links.json``). Tears the cluster down.
"""

from __future__ import annotations

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


def one_run(cluster, env, rate: str, kind: str) -> dict:
    before = cluster.counters()["hostb"][1]
    start = time.time()
    done = cluster.run("hosta", [sys.executable, "-m", "distprop", "train", "-H",
                                 "hosta:1,hostb:1", "-n", "2", "--threads-per-rank", "1",
                                 "--model", "mlp", "--dataset", "synthetic", "--epochs", "1",
                                 "--log-every", "5", "--compression", kind,
                                 "--out", f"/tmp/distprop-linkbench/{rate}-{kind}"],
                       env=env, timeout=300, check=False, cwd=str(REPO))
    rate_found = re.findall(r"(\d+) samples/s", done.stdout)
    return {"rate": rate, "compression": kind, "rc": done.returncode,
            "samples_per_s": int(rate_found[-1]) if rate_found else None,
            "wall_s": round(time.time() - start, 1),
            "hostb_rx_MB": round((cluster.counters()["hostb"][1] - before) / 1e6, 1)}


def main() -> int:
    out = Path(sys.argv[1] if len(sys.argv) > 1 else "cluster_links.json")
    cluster = netcluster.Cluster(("hosta", "hostb")).up()
    rows = []
    try:
        env = {**cluster.mpi_env(), "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1"}
        for rate in RATES:
            cluster.set_rate(rate)
            for kind in KINDS:
                rows.append(one_run(cluster, env, rate, kind))
                print(json.dumps(rows[-1]), flush=True)
    finally:
        cluster.down()
    out.write_text(json.dumps(rows, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
