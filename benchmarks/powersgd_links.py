"""PowerSGD vs fp16 vs no compression over an emulated 100 Mbit/s link: step time and accuracy.

Builds a private two-host test cluster (tests/cluster/netcluster.py; needs root; hosts
``hka``/``hkb``, namespaces of this process's own) so it does not disturb another cluster on
the machine, limits each host's eth0 with tbf to the rate,
and runs ``distprop train -H hka:1,hkb:1 -n 2 --model mlp --dataset mnist1d`` (5 epochs,
565 steps of 64 samples) with ``--compression none``, ``fp16`` and ``powersgd
--powersgd-rank 4 --powersgd-start 57`` (PyTorch's advice: start after ~10 % of the steps),
interleaved round by round in rotated order. ms/step is 64 / the median of the epoch lines'
samples/s over epochs 2-5 (epoch 1 holds PowerSGD's plain-averaging warm-up); accuracy is the
test accuracy of summary.json. One JSON line per run, all written to the first argument;
``--table FILE.json`` prints the Markdown table.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests" / "cluster"))
import netcluster  # noqa: E402

HOSTS = ("hka", "hkb")
KINDS = {
    "none": ["--compression", "none"],
    "fp16": ["--compression", "fp16"],
    "powersgd-r4": ["--compression", "powersgd", "--powersgd-rank", "4",
                    "--powersgd-start", "57"],
}
BATCH = 64


def one_run(cluster, env, rate: str, kind: str, rep: int) -> dict:
    out = Path(f"/tmp/distprop-psgdbench/{rate}-{kind}-{rep}")
    before = cluster.counters()[HOSTS[1]][1]
    start = time.time()
    done = cluster.run(HOSTS[0], [sys.executable, "-m", "distprop", "train", "-H",
                                  f"{HOSTS[0]}:1,{HOSTS[1]}:1", "-n", "2",
                                  "--threads-per-rank", "1", "--model", "mlp", "--dataset",
                                  "mnist1d", "--log-every", "20", *KINDS[kind], "--out", out],
                       env={**env, "PYTHONPATH": str(REPO)}, timeout=900, check=False,
                       cwd=str(REPO))
    epochs = [int(m) for m in re.findall(r"epoch \d+/\d+ .* (\d+) samples/s", done.stdout)]
    row = {"rate": rate, "compression": kind, "repeat": rep, "rc": done.returncode,
           "epoch_samples_per_s": epochs, "wall_s": round(time.time() - start, 1),
           "hostb_rx_MB": round((cluster.counters()[HOSTS[1]][1] - before) / 1e6, 1)}
    if done.returncode == 0:
        summary = json.loads((out / "summary.json").read_text())
        row.update(test_accuracy=summary["test"]["accuracy"],
                   val_accuracy=summary["final"].get("val_accuracy"), steps=summary["steps"])
    else:
        row["tail"] = (done.stdout + done.stderr)[-1500:]
    return row


def table(rows: list[dict]) -> str:
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["rate"], r["compression"]), []).append(r)
    base = {}
    out = ["| link (tbf) | compression | runs | ms/step median (min..max) | vs none | test acc "
           "| hostb rx (MB) |", "|---|---|---|---|---|---|---|"]
    for (rate, kind), runs in groups.items():
        ok = [r for r in runs if r["rc"] == 0]
        ms = [1e3 * BATCH / statistics.median(r["epoch_samples_per_s"][1:]) for r in ok]
        med = statistics.median(ms) if ms else float("nan")
        if kind == "none":
            base[rate] = med
        ratio = med / base[rate] if rate in base else float("nan")
        acc = sorted({round(100 * r["test_accuracy"], 2) for r in ok})
        rx = statistics.median(r["hostb_rx_MB"] for r in runs)
        out.append(f"| {rate} | {kind} | {len(ok)}/{len(runs)} | {med:.0f} ({min(ms):.0f}.."
                   f"{max(ms):.0f}) | {ratio:.2f} | {', '.join(f'{a:.2f} %' for a in acc)} "
                   f"| {rx:.1f} |")
    return "\n".join(out)


def main() -> int:
    if sys.argv[1:2] == ["--table"]:
        print(table(json.loads(Path(sys.argv[2]).read_text())))
        return 0
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", nargs="?", default="powersgd_links.json")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--rate", default="100mbit")
    parser.add_argument("--first-repeat", type=int, default=0,
                        help="number the rounds from here (another invocation adding rounds)")
    args = parser.parse_args()
    cluster = netcluster.Cluster.private(HOSTS).up()
    rows = []
    names = list(KINDS)
    try:
        env = {**cluster.mpi_env(), "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1"}
        cluster.set_rate(args.rate)
        for rep in range(args.first_repeat, args.first_repeat + args.repeats):
            for kind in names[rep % 3:] + names[:rep % 3]:
                rows.append(one_run(cluster, env, args.rate, kind, rep))
                print(json.dumps(rows[-1]), flush=True)
                Path(args.out).write_text(json.dumps(rows, indent=1) + "\n")
    finally:
        cluster.down()
    return 0


if __name__ == "__main__":
    sys.exit(main())
