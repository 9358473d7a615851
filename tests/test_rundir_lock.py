"""One run per ``--out``: the run-directory lock and the configuration handed to the ranks.

Real processes throughout: ``distprop train -n 2`` launchers, a bare ``mpiexec``, SIGKILL.
Budget (2-core machine): about 40 s for the file.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from distprop.train import rundir

from helpers import REPO, mpiexec_path

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
QUICK = ("--model", "mlp", "--dataset", "synthetic", "--epochs", "1")


def distprop(*args, timeout=120):
    return subprocess.run([sys.executable, "-m", "distprop", *map(str, args)],
                          capture_output=True, text=True, timeout=timeout, env=ENV,
                          cwd=str(REPO), stdin=subprocess.DEVNULL)


def start(*args) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "distprop", *map(str, args)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV,
                            cwd=str(REPO), stdin=subprocess.DEVNULL)


def wait_for_holder(out: Path, proc: subprocess.Popen, timeout=120) -> dict:
    """The lock record once ``proc`` has written it."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            record = json.loads((out / rundir.LOCK_NAME).read_text())
            if record["pid"] == proc.pid:
                return record
        except (OSError, ValueError, KeyError):
            pass
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "the run never locked its directory"
        time.sleep(0.02)


def one_error_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1, stderr
    assert "Traceback" not in stderr
    return lines[0]


def snapshot(out: Path) -> dict[str, bytes]:
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*"))
            if p.is_file()}


def test_second_run_on_a_busy_out_exits_2_and_the_first_keeps_its_own_settings(tmp_path):
    out = tmp_path / "run"
    a = start("train", "-n", 2, "--model", "mlp", "--dataset", "synthetic", "--epochs", 20,
              "--seed", 0, "--lr", 0.1, "--out", out)
    try:
        holder = wait_for_holder(out, a)
        started = time.monotonic()
        b = distprop("train", "-n", 2, "--model", "mlp", "--dataset", "synthetic", "--epochs", 4,
                     "--seed", 1, "--lr", 0.05, "--out", out)
        assert a.poll() is None, "run A ended before run B tried: the test proves nothing"
        assert b.returncode == 2, b.stdout + b.stderr
        line = one_error_line(b.stderr)
        assert f"--out {out} is in use by another run (host {socket.gethostname()}, " \
               f"PID {a.pid}, started {holder['started_utc']})" in line
        assert time.monotonic() - started < 60
        record = json.loads((out / "config.json").read_text())  # B wrote nothing
        assert (record["epochs"], record["lr"], record["seed"]) == (20, 0.1, 0)
        stdout, stderr = a.communicate(timeout=300)
    finally:
        if a.poll() is None:
            a.kill()
            a.communicate()
    assert a.returncode == 0, stderr
    assert "epoch 1/20" in stdout and "/4 " not in stdout
    assert "sgd lr 0.1\n" in stdout and "sgd lr 0.05" not in stdout
    summary = json.loads((out / "summary.json").read_text())
    assert summary["epochs_run"] == 20
    assert (summary["config"]["lr"], summary["config"]["seed"]) == (0.1, 0)
    assert (out / rundir.LOCK_NAME).read_text() == ""  # released cleanly
    assert not list(out.glob(".launch-config-*"))


def test_ranks_train_the_launched_configuration_not_whatever_config_json_says(tmp_path):
    out = tmp_path / "run"
    a = start("train", "-n", 2, *QUICK[:-1], 3, "--lr", 0.1, "--out", out)
    try:
        deadline = time.monotonic() + 120
        while not (out / "config.json").is_file() or not (out / "config.json").read_text():
            assert a.poll() is None and time.monotonic() < deadline, a.communicate()
            time.sleep(0.005)
        edited = json.loads((out / "config.json").read_text())
        edited.update(epochs=1, lr=0.05)
        (out / "config.json").write_text(json.dumps(edited))  # before the ranks start reading
        stdout, stderr = a.communicate(timeout=300)
    finally:
        if a.poll() is None:
            a.kill()
            a.communicate()
    assert a.returncode == 0, stderr
    assert "epoch 3/3" in stdout and "sgd lr 0.1\n" in stdout


@pytest.mark.parametrize("change,message", [
    ("missing", "cannot read the launch configuration"),
    ("digest", "was changed after the launch"),
], ids=["missing", "digest"])
def test_a_rank_refuses_a_launch_configuration_it_cannot_trust(change, message, tmp_path):
    path = tmp_path / "launch.json"
    path.write_text(json.dumps({"dataset": "synthetic", "out": str(tmp_path)}))
    args = ["train", "--worker-config", path, "--worker-config-sha256", "0" * 64]
    if change == "missing":
        args[2] = tmp_path / "gone.json"
    done = distprop(*args)
    assert done.returncode == 2, done.stdout + done.stderr
    assert message in one_error_line(done.stderr)


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _record(**changes) -> str:
    holder = rundir.Holder.this_process(["distprop", "train"])
    for key, value in changes.items():
        setattr(holder, key, value)
    return holder.to_json()


# (record left in the lock file, exit code, expected message); the record's PID is not locked
LEFT_RECORDS = {
    "dead-pid-here": (lambda: _record(pid=_dead_pid()), 0, "no longer exists"),
    "pid-reused-here": (lambda: _record(proc_start=1), 0, f"PID {os.getpid()} is now another "
                                                          "process"),
    "other-host": (lambda: _record(host="node-elsewhere"), 2, "was locked by a run on another "
                                                               "machine (host node-elsewhere"),
    "alive-not-locking": (lambda: _record(), 2, "still alive"),
    "unreadable": (lambda: "{not json", 2, "holds no readable record"),
}


@pytest.mark.parametrize("case", list(LEFT_RECORDS))
def test_a_lock_left_by_another_run_is_taken_over_only_when_its_process_is_gone(case, tmp_path):
    make, code, message = LEFT_RECORDS[case]
    out = tmp_path / "run"
    out.mkdir()
    lock_file = out / rundir.LOCK_NAME
    lock_file.write_text(make())
    before = snapshot(out)
    done = distprop("train", *QUICK, "--out", out)
    assert done.returncode == code, done.stdout + done.stderr
    assert message in done.stderr
    if code == 0:
        assert "taking over the lock left by a run that did not end cleanly" in done.stderr
        assert (out / "summary.json").is_file() and lock_file.read_text() == ""
    else:
        assert f"delete {lock_file}" in one_error_line(done.stderr)
        assert snapshot(out) == before  # nothing written


def _descendants(pid: int) -> list[int]:
    """All processes below ``pid`` (mpiexec, Hydra's proxy, the ranks)."""
    try:
        children = [int(c) for c in
                    Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []
    return [p for c in children for p in (c, *_descendants(c))]


@pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="needs /proc")
def test_the_lock_of_a_sigkilled_launcher_passes_to_the_next_run(tmp_path):
    out = tmp_path / "run"
    a = start("train", "-n", 2, *QUICK[:-1], 200, "--out", out)
    job = []
    try:
        wait_for_holder(out, a)
        time.sleep(1.0)  # let mpiexec start its ranks
        job = _descendants(a.pid)
        os.kill(a.pid, signal.SIGKILL)
    finally:
        for pid in job:  # the ranks would outlive the launcher here (issue 11 item 5)
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        a.kill()
        a.communicate(timeout=60)
    assert a.returncode == -signal.SIGKILL
    done = distprop("train", *QUICK, "--out", out)
    assert done.returncode == 0, done.stderr
    assert f"PID {a.pid}, started" in done.stderr and "no longer exists" in done.stderr


def test_the_lock_of_a_failed_run_is_released_cleanly(tmp_path):
    out = tmp_path / "run"
    failed = distprop("train", "-n", 2, *QUICK, "--lr", 1e10, "--out", out)  # diverges
    assert failed.returncode == 1, failed.stdout + failed.stderr
    assert "non-finite gradient" in failed.stderr
    assert (out / rundir.LOCK_NAME).read_text() == ""
    done = distprop("train", *QUICK, "--out", out)
    assert done.returncode == 0, done.stderr
    assert "taking over" not in done.stderr


def test_bare_mpiexec_on_a_locked_out_exits_2_on_every_rank_with_one_message(tmp_path):
    out = tmp_path / "run"
    cmd = [mpiexec_path(), "-n", "2", sys.executable, "-m", "distprop", "train", *QUICK,
           "--out", str(out)]
    with rundir.RunDirLock.acquire(out, command=["test"]) as lock:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=ENV,
                              cwd=str(REPO), stdin=subprocess.DEVNULL)
        assert done.returncode == 2, done.stdout + done.stderr
        line = one_error_line(done.stderr)
        assert f"is in use by another run ({lock.holder.describe()})" in line
        assert not (out / "summary.json").exists()
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=ENV,
                          cwd=str(REPO), stdin=subprocess.DEVNULL)
    assert done.returncode == 0, done.stderr  # rank 0 took the lock, and released it
    assert "taking over" not in done.stderr
    assert (out / rundir.LOCK_NAME).read_text() == ""
