"""Fault injection: every failure of the "Failures" table in the README, with real processes.

Run ``python tests/faults.py`` from the repository root (``--only 1,5`` for some items,
``--json`` for one JSON line per scenario). Each scenario starts the real CLI (``python -m
distprop``) under the MPICH launcher, injects the fault with real signals, files and disks, and
checks the exit code and the line a user sees. It prints one row per scenario and exits 1 if any
scenario did not behave as the README says. The pytest suite asserts the same behaviour in
detail (tests/test_rundir_lock.py, test_supervise.py, test_resume.py, test_bad_data.py, ...);
this script is the five-minute tour of all of it at once. The full-disk scenario needs root (it
mounts a small tmpfs) and is skipped otherwise.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
RUN = ("--model", "mlp", "--dataset", "synthetic", "--log-every", "1000")


@dataclass
class Outcome:
    item: str
    scenario: str
    code: int | None
    seconds: float
    seen: str
    ok: bool


def distprop(*args) -> list[str]:
    return [sys.executable, "-m", "distprop", *map(str, args)]


def run(cmd, timeout=120, env=None, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=str(REPO),
                          env={**ENV, **(env or {})}, **kwargs)


def line_with(text: str, *needles: str) -> str:
    """The first line of ``text`` holding any of ``needles`` (else its last non-empty line)."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    for needle in needles:
        for line in lines:
            if needle in line:
                return line
    return lines[-1] if lines else ""


def wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        time.sleep(0.1)


def processes_mentioning(needle: str) -> list[int]:
    """PIDs whose command line mentions ``needle`` (the ranks of a run, by its --out)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            try:
                cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if needle in cmd and "--worker-config" in cmd and "mpiexec" not in cmd \
                    and "hydra" not in cmd:
                found.append(int(entry.name))
    return found


def final_weights(out: Path) -> dict:
    import distprop as dp

    state = dp.load(dp.train.latest_valid(out / "checkpoints"))
    return {k: np.asarray(v) for k, v in state["model"].items()}


# --- scenarios ----------------------------------------------------------------------------------


def busy_out(tmp: Path):
    """1: a second run on the same --out while the first is running."""
    out = tmp / "busy"
    first = subprocess.Popen(distprop("train", "-n", 2, *RUN, "--epochs", 3, "--out", out),
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             cwd=str(REPO), env=ENV)
    wait_for(lambda: (out / "config.json").exists(), 60, "the first run to start")
    start = time.monotonic()
    second = run(distprop("train", "-n", 2, *RUN, "--epochs", 4, "--lr", 0.05, "--seed", 1,
                          "--out", out))
    took = time.monotonic() - start
    first.communicate(timeout=180)
    summary = json.loads((out / "summary.json").read_text())
    kept = summary["config"]["epochs"] == 3 and summary["config"]["lr"] is None
    yield Outcome("1", "second run on a busy --out", second.returncode, took,
                  line_with(second.stderr, "in use"),
                  second.returncode == 2 and "in use by another run" in second.stderr
                  and first.returncode == 0 and kept)


def launcher_killed_then_resumed_elsewhere(tmp: Path):
    """5 and 2: kill -9 the launcher of a 2-rank run, then resume it on 1 rank."""
    common = ("--global-batch-size", 64, "--epochs", 2, "--checkpoint-every", 10)
    whole = tmp / "whole"
    done = run(distprop("train", "-n", 2, *RUN, *common, "--out", whole), timeout=180)
    out = tmp / "killed"
    victim = subprocess.Popen(distprop("train", "-n", 2, *RUN, *common, "--out", out),
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              cwd=str(REPO), env=ENV)
    ckpts = out / "checkpoints"
    wait_for(lambda: ckpts.is_dir() and any(ckpts.glob("checkpoint-*0.npz")), 120,
             "a checkpoint")
    ranks = processes_mentioning(str(out))
    start = time.monotonic()
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    try:
        wait_for(lambda: not any(Path(f"/proc/{p}").exists() and
                                 "Z" not in Path(f"/proc/{p}/stat").read_text().split()[2]
                                 for p in ranks if Path(f"/proc/{p}/stat").exists()), 30,
                 "the ranks to end")
        gone = time.monotonic() - start
    except TimeoutError:
        gone = None
    yield Outcome("5", "kill -9 of the launcher: ranks end", -9, gone or 30.0,
                  f"{len(ranks)} rank(s) gone after {gone:.1f} s" if gone else "ranks still alive",
                  len(ranks) == 2 and gone is not None and gone < 10)
    start = time.monotonic()
    resumed = run(distprop("train", *RUN, *common, "--out", out, "--resume", "auto"),
                  timeout=180)
    took = time.monotonic() - start
    diff = max(float(np.max(np.abs(a - b))) for a, b in
               zip(final_weights(whole).values(), final_weights(out).values()))
    yield Outcome("2", "2-rank run resumed on 1 rank, fixed global batch", resumed.returncode,
                  took, line_with(resumed.stdout, "resuming on") + f" | max |diff| {diff:.1e}",
                  done.returncode == 0 and resumed.returncode == 0 and diff < 1e-5)


def batchnorm_round_trip(tmp: Path):
    """3: dp.save/dp.load keep 0-d arrays (BatchNorm's num_batches_tracked)."""
    code = (f"import distprop as dp\nm = dp.nn.BatchNorm1d(4)\ndp.save(m.state_dict(), "
            f"{str(tmp / 'bn.npz')!r})\nm.load_state_dict(dp.load({str(tmp / 'bn.npz')!r}))\n"
            "print('strict load_state_dict of a dp.save-d BatchNorm: ok')")
    start = time.monotonic()
    done = run([sys.executable, "-c", code])
    yield Outcome("3", "dp.save/dp.load of a BatchNorm state_dict", done.returncode,
                  time.monotonic() - start, line_with(done.stdout + done.stderr, "ok", "Error"),
                  done.returncode == 0)


def nonsense_checkpoints(tmp: Path):
    """4: checkpoints that pass the checksum but hold nonsense; files that are not checkpoints."""
    import distprop as dp

    if not (tmp / "whole").exists():  # run alone (--only 4)
        run(distprop("train", *RUN, "--epochs", 1, "--out", tmp / "whole"))
    source = dp.train.latest_valid(tmp / "whole" / "checkpoints")
    state = dp.load(source)
    state["position"]["world_size"] = 0
    bad = tmp / "world0.npz"
    dp.save(state, bad)
    text = tmp / "data.txt"
    text.write_text("1,2,3\n")
    for name, path in (("world size 0", bad), ("a text file", text)):
        start = time.monotonic()
        done = run(distprop("train", *RUN, "--epochs", 1, "--out", tmp / "r4", "--resume", path))
        yield Outcome("4", f"--resume: {name}", done.returncode, time.monotonic() - start,
                      line_with(done.stderr, "Error"), done.returncode == 2
                      and "Traceback" not in done.stderr)


RANK_SCRIPTS = {
    "6": ("rank 1 dies before dist.init()",
          "import os\nif os.environ.get('PMI_RANK') == '1':\n    os._exit(1)\n"
          "import distprop.distributed as dist\ndist.init().barrier()\n",
          {"DISTPROP_INIT_TIMEOUT": "10"}, 1, "never reached"),
    "7": ("sys.exit(3) on rank 1 while rank 0 waits",
          "import sys, distprop.distributed as dist\ncomm = dist.init()\n"
          "sys.exit(3) if comm.rank == 1 else comm.barrier()\n", {}, 3, "status 3"),
    "9": ("rank 1 killed by SIGKILL",
          "import os, signal, distprop.distributed as dist\ncomm = dist.init()\ncomm.barrier()\n"
          "os.kill(os.getpid(), signal.SIGKILL) if comm.rank == 1 else comm.barrier()\n",
          {}, 137, "killed by"),
}


def rank_faults(tmp: Path):
    """6, 7, 9: a rank that dies early, leaves with a status, or is killed by a signal."""
    for item, (title, script, env, wanted, needle) in RANK_SCRIPTS.items():
        path = tmp / f"rank_fault_{item}.py"
        path.write_text(script)
        start = time.monotonic()
        done = run(distprop("launch", "-n", 2, "--", sys.executable, path), env=env, timeout=120)
        yield Outcome(item, title, done.returncode, time.monotonic() - start,
                      line_with(done.stderr + done.stdout, needle), done.returncode == wanted)
    path = tmp / "sleeper.py"
    path.write_text("import time, distprop.distributed as dist\ndist.init()\ntime.sleep(60)\n")
    job = subprocess.Popen(distprop("launch", "-n", 2, "--", sys.executable, path),
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                           cwd=str(REPO), env=ENV)
    time.sleep(4)
    start = time.monotonic()
    job.send_signal(signal.SIGTERM)
    _, err = job.communicate(timeout=60)
    yield Outcome("9", "SIGTERM to the launcher", job.returncode, time.monotonic() - start,
                  line_with(err, "SIGTERM"), job.returncode == 143)


def stdin_loop(tmp: Path):
    """8: a launch inside `while read` leaves the loop its input."""
    loop = (f"printf 'a\\nb\\nc\\n' | while read line; do {sys.executable} -m distprop launch "
            f"-n 2 -- {sys.executable} -c pass; echo ran \"$line\"; done")
    start = time.monotonic()
    done = run(["bash", "-c", loop])
    runs = done.stdout.count("ran ")
    yield Outcome("8", "distprop launch inside while-read over 3 lines", done.returncode,
                  time.monotonic() - start, f"the loop ran {runs} time(s)", runs == 3)


def bad_inputs(tmp: Path):
    """10: bad datasets, bad commands, a full disk: exit 2 (1 for the disk) with one line."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((64, 8)).astype(np.float32)
    np.savez(tmp / "empty.npz", x=x[:0], y=np.zeros(0, np.int64))
    np.savez(tmp / "nan_labels.npz", x=x, y=np.where(np.arange(64) == 5, np.nan, 1.0))
    np.savez(tmp / "label1000.npz", x=x, y=np.where(np.arange(64) == 3, 1000, np.arange(64) % 4))
    huge = tmp / "huge"  # x.npy claims 10^12 float64 but holds 100 bytes
    huge.mkdir()
    header = {"descr": "<f8", "fortran_order": False, "shape": (10**6, 10**6)}
    with open(huge / "x.npy", "wb") as f:
        np.lib.format.write_array_header_1_0(f, header)
        f.write(b"\0" * 100)
    np.save(huge / "y.npy", np.arange(10**6) % 4)
    cases = [
        ("dataset with 0 samples", distprop("train", "--dataset", tmp / "empty.npz"), 2),
        ("NaN labels", distprop("train", "--dataset", tmp / "nan_labels.npz"), 2),
        ("label 1000 in a 4-class set", distprop("train", "--dataset", tmp / "label1000.npz"), 2),
        (".npy header claiming 10^12 elements",
         distprop("train", "--dataset", huge), 2),
        ("launch of a command that does not exist",
         distprop("launch", "-n", 2, "--", "nonexistent_cmd"), 2),
        ("launch of python with no script", distprop("launch", "-n", 2, "python"), 2),
    ]
    for title, cmd, wanted in cases:
        cmd = cmd + (["--out", str(tmp / "r10")] if cmd[3] == "train" else [])
        start = time.monotonic()
        done = run(cmd, timeout=60)
        yield Outcome("10", title, done.returncode, time.monotonic() - start,
                      line_with(done.stderr, "Error"), done.returncode == wanted
                      and "Traceback" not in done.stderr and "does not exist" not in done.stderr)
    yield from full_disk(tmp)


def full_disk(tmp: Path):
    if os.geteuid() != 0:
        yield Outcome("10", "full disk (needs root: skipped)", None, 0.0, "", True)
        return
    mnt = tmp / "tinyfs"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=400k", "tmpfs", str(mnt)], check=True)
    try:
        start = time.monotonic()
        done = run(distprop("train", *RUN, "--epochs", 1, "--out", mnt / "run"))
        partial = [p.name for p in mnt.rglob("*") if p.is_file() and p.name != ".distprop.lock"
                   and (p.name.endswith(".tmp") or p.stat().st_size == 0)]
        yield Outcome("10", "full disk while checkpointing", done.returncode,
                      time.monotonic() - start, line_with(done.stderr, "no space"),
                      done.returncode == 1 and "no space left" in done.stderr and not partial)
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def epoch_boundary_and_threads(tmp: Path):
    """11 and 12: resume at an epoch boundary; a single process with --threads-per-rank 1."""
    out = tmp / "boundary"
    first = run(distprop("train", *RUN, "--epochs", 1, "--threads-per-rank", 1, "--out", out))
    summary = json.loads((out / "summary.json").read_text())
    blas = {entry["threads"] for entry in summary["threads"]["blas"]}
    yield Outcome("12", "one process, --threads-per-rank 1", first.returncode, 0.0,
                  line_with(first.stdout, "BLAS thread") [:110], first.returncode == 0
                  and summary["threads"]["per_rank"] == 1 and blas == {1})
    start = time.monotonic()
    again = run(distprop("train", *RUN, "--epochs", 2, "--out", out, "--resume", "auto"))
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    epochs = [r["epoch"] for r in rows if r.get("kind") == "epoch"]
    yield Outcome("11", "resume at an epoch boundary", again.returncode,
                  time.monotonic() - start, f"epoch rows in metrics.jsonl: {epochs}",
                  again.returncode == 0 and len(epochs) == len(set(epochs)) == 2)


SCENARIOS = {busy_out: {"1"}, launcher_killed_then_resumed_elsewhere: {"2", "5"},
             batchnorm_round_trip: {"3"}, nonsense_checkpoints: {"4"},
             rank_faults: {"6", "7", "9"}, stdin_loop: {"8"}, bad_inputs: {"10"},
             epoch_boundary_and_threads: {"11", "12"}}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--only", help="comma-separated item numbers, e.g. 1,5")
    parser.add_argument("--json", action="store_true", help="one JSON line per scenario")
    args = parser.parse_args(argv)
    only = set(args.only.split(",")) if args.only else None
    results, started = [], time.monotonic()
    with tempfile.TemporaryDirectory(prefix="distprop-faults-") as tmp:
        for scenario, items in SCENARIOS.items():
            if only and not items & only:
                continue
            try:
                for outcome in scenario(Path(tmp)):
                    if only and outcome.item not in only:
                        continue
                    results.append(outcome)
                    if args.json:
                        print(json.dumps(outcome.__dict__), flush=True)
                    else:
                        code = "-" if outcome.code is None else outcome.code
                        print(f"{'ok  ' if outcome.ok else 'FAIL'} item {outcome.item:>2}  "
                              f"{outcome.scenario:<50} exit {code!s:>4}  "
                              f"{outcome.seconds:5.1f} s  {outcome.seen}", flush=True)
            except Exception as exc:  # a broken scenario is a failed row
                results.append(Outcome("?", scenario.__name__, None, 0.0, repr(exc), False))
                print(f"FAIL {scenario.__name__}: {exc!r}", flush=True)
    failed = [r for r in results if not r.ok]
    print(f"{len(results) - len(failed)} passed, {len(failed)} failed "
          f"in {time.monotonic() - started:.0f} s", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
