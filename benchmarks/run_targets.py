"""Run the scaling targets of BENCHMARKS.md and record every command's JSON lines.

    python benchmarks/run_targets.py --repeat 3            # all targets, 3 interleaved rounds
    python benchmarks/run_targets.py --only wide_overlap   # one target
    python benchmarks/make_table.py                        # results/README.md from the JSON

Each distinct command runs once per round (rounds interleave the commands, so a burst of load
on a shared machine hits one round of everything rather than every round of one thing); before
each command it waits (up to ``--max-wait`` s) until fewer than ``--max-busy`` cores are busy
(measured from /proc/stat over 3 s). The runs are appended to ``results/scaling_targets.json``
with the busy cores and load average before, and the load average after.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results" / "scaling_targets.json"
sys.path.insert(0, str(HERE))

from targets import targets  # noqa: E402


def machine() -> dict:
    info = {"cores": len(os.sched_getaffinity(0)), "python": platform.python_version(),
            "platform": platform.platform()}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    versions = subprocess.run(
        [sys.executable, "-c", "import numpy, mpi4py, distprop; from mpi4py import MPI; "
         "print(numpy.__version__, mpi4py.__version__, distprop.__version__, "
         "MPI.Get_library_version().splitlines()[0])"],
        capture_output=True, text=True)
    if versions.returncode == 0:
        numpy_v, mpi4py_v, dp_v, *mpi = versions.stdout.split()
        info.update(numpy=numpy_v, mpi4py=mpi4py_v, distprop=dp_v, mpi=" ".join(mpi))
    try:
        import torch

        info["torch"] = torch.__version__
    except ImportError:
        pass
    return info


def busy_cores(window: float = 3.0) -> float:
    """Cores kept busy (by anyone) over the last ``window`` seconds, from /proc/stat."""
    def sample():
        fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        return sum(fields), fields[3] + fields[4]  # total, idle + iowait

    total0, idle0 = sample()
    time.sleep(window)
    total1, idle1 = sample()
    busy = 1.0 - (idle1 - idle0) / max(1, total1 - total0)
    return busy * len(os.sched_getaffinity(0))


def wait_for_quiet(max_busy: float, max_wait: float) -> tuple[float, float]:
    """Wait until fewer than ``max_busy`` cores are busy (at most ``max_wait`` s); returns the
    seconds waited and the busy cores measured last."""
    waited, busy = 0.0, busy_cores()
    while busy > max_busy and waited < max_wait:
        waited += 3.0
        busy = busy_cores()
    return waited, busy


def run_command(args: tuple[str, ...], repeat: int, max_busy: float, max_wait: float) -> dict:
    cmd = [sys.executable, "-m", "distprop", *args]
    waited, busy = wait_for_quiet(max_busy, max_wait)
    print(f"[round {repeat}] distprop {' '.join(args)} ({busy:.1f} cores busy before, waited "
          f"{waited:.0f} s)", file=sys.stderr, flush=True)
    load_before = os.getloadavg()
    started = time.time()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    rows = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0:
        print(proc.stdout[-2000:] + proc.stderr[-2000:], file=sys.stderr)
    return {"command": "distprop " + " ".join(args), "repeat": repeat, "started": started,
            "busy_cores_before": busy,
            "seconds": time.time() - started, "load_before": load_before,
            "load_after": os.getloadavg(), "exit_code": proc.returncode, "rows": rows}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--only", default=None, help="comma-separated target names")
    parser.add_argument("--fresh", action="store_true", help="drop earlier recorded runs")
    parser.add_argument("--max-busy", type=float, default=0.3,
                        help="wait until fewer cores than this are busy with other work")
    parser.add_argument("--max-wait", type=float, default=300.0,
                        help="seconds to wait for that before running anyway")
    args = parser.parse_args()
    chosen = targets(args.steps, args.warmup)
    if args.only:
        names = set(args.only.split(","))
        unknown = names - {t.name for t in chosen}
        if unknown:
            parser.error(f"unknown target(s) {sorted(unknown)}")
        chosen = [t for t in chosen if t.name in names]
    commands = list(dict.fromkeys(c for t in chosen for c in t.commands))
    doc = {"machine": machine(), "runs": []}
    if RESULTS.exists() and not args.fresh:
        doc["runs"] = json.loads(RESULTS.read_text())["runs"]
    first_round = max((r["repeat"] for r in doc["runs"]), default=-1) + 1
    for i in range(first_round, first_round + args.repeat):
        for command in commands:
            doc["runs"].append(run_command(command, i, args.max_busy, args.max_wait))
            RESULTS.parent.mkdir(parents=True, exist_ok=True)
            RESULTS.write_text(json.dumps(doc, indent=1) + "\n")
    print(f"wrote {RESULTS}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
