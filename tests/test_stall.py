"""Stall naming (issue 12, section 4): a rank whose stall watchdog fires names the ranks (and
hosts) it did not hear from, asking the launcher, which knows which ranks still answer; and
the default limit follows the measured step time. Real ``mpiexec``, real signals, 2 ranks;
SIGSTOP stands in for a dead host or a cut link (the rank stops answering).
"""

from __future__ import annotations

import os
import signal
import socket
import sys
import time

import pytest
from test_supervise import children, kill_all, start, wait_for_pids

from distprop.distributed import guards
from distprop.distributed.comm import SingleProcessCommunicator

# argv: pid directory, mode: "loop" (allreduce forever) or "sleep" (rank 1 leaves the loop
# and sleeps outside any collective)
WORKER = """
import os, sys, time
import numpy as np
import distprop.distributed as dist
comm = dist.init()
with open(os.path.join(sys.argv[1], f"rank{comm.rank}.pid"), "w") as f:
    f.write(str(os.getpid()))
x = np.ones(4, dtype=np.float32)
for i in range(100000):
    if sys.argv[2] == "sleep" and comm.rank == 1 and i == 20:
        time.sleep(600)
    comm.allreduce(x)
    time.sleep(0.02)
"""


@pytest.mark.parametrize("mode, why", [
    ("stop", "no answer: stopped, hung, or its host or link is down"),
    ("sleep", "alive but in no collective after"),
])
def test_stalled_job_names_the_rank_it_did_not_hear_from(tmp_path, mode, why):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    proc = start("launch", "-n", 2, "--", sys.executable, script, tmp_path,
                 "sleep" if mode == "sleep" else "loop", env={"DISTPROP_STALL_TIMEOUT": "3"})
    pids = wait_for_pids(proc, tmp_path)
    spawned = children(proc.pid)
    try:
        if mode == "stop":
            time.sleep(0.5)
            os.kill(pids[1], signal.SIGSTOP)
        began = time.monotonic()
        _, err = proc.communicate(timeout=90)
        took = time.monotonic() - began
    finally:
        for pid in pids:
            try:
                os.kill(pid, signal.SIGCONT)
            except OSError:
                pass
        kill_all(spawned + pids)
    assert proc.returncode == 1, err
    name = f"rank 1 (PID {pids[1]} on {socket.gethostname()}; {why}"
    # Open MPI's prterun may put a space before a rank's line after its abort notice
    rank0 = [x for x in err.splitlines() if x.lstrip().startswith("[rank 0] stall watchdog:")]
    assert len(rank0) == 1 and f"not heard from: {name}" in rank0[0], err
    launcher = [x for x in err.splitlines() if x.startswith("distprop: the job stalled")]
    assert len(launcher) == 1 and name in launcher[0] and "(exit code 1)" in launcher[0], err
    assert took < 60, err  # 3 s limit + a 3 s survey, generous for a loaded machine


@pytest.mark.parametrize("slowest, limit", [
    (None, guards.FIRST_STEP_STALL_TIMEOUT),  # before the first step: 600 s
    (0.01, 60.0),  # fast steps: the 60 s floor
    (5.0, 100.0),  # 20 x the slowest step
])
def test_default_stall_limit_follows_the_slowest_step(slowest, limit):
    dog = guards.StallWatchdog(SingleProcessCommunicator(), guards.FIRST_STEP_STALL_TIMEOUT,
                               adaptive=True)
    for seconds in ([] if slowest is None else [slowest / 2, slowest, slowest / 3]):
        dog.note_step(seconds)
    assert dog.limit == pytest.approx(limit)


@pytest.mark.parametrize("value, adaptive, limit", [
    (None, True, 200.0),  # 20 x the 10 s step
    ("7", False, 7.0),
])
def test_stall_timeout_variable_overrides_the_adaptive_limit(monkeypatch, value, adaptive,
                                                             limit):
    if value is None:
        monkeypatch.delenv("DISTPROP_STALL_TIMEOUT", raising=False)
    else:
        monkeypatch.setenv("DISTPROP_STALL_TIMEOUT", value)

    class Two(SingleProcessCommunicator):
        size = 2  # start_watchdog only watches worlds of more than one rank

    dog = guards.start_watchdog(Two())
    try:
        dog.note_step(10.0)
        assert dog.adaptive is adaptive
        assert dog.limit == limit
    finally:
        dog.stop()


# argv: seconds to wait at most. Writes to its stderr pipe, waits for the reader, reports how long.
DRAIN = """
import sys, time
from distprop.distributed.comm import _drain_std_pipes
sys.stderr.write("x" * 1000)
sys.stderr.flush()
print("ready", flush=True)
began = time.monotonic()
_drain_std_pipes(float(sys.argv[1]))
print(f"{time.monotonic() - began:.3f}", flush=True)
"""


@pytest.mark.parametrize("reader_delay, limit, low, high", [
    (0.6, 10.0, 0.4, 5.0),  # returns once the reader has read, not at the limit
    (None, 0.5, 0.4, 5.0),  # nobody reads: gives up at the limit
])
def test_abort_waits_until_its_last_words_leave_the_pipe(reader_delay, limit, low, high):
    """Before MPI_Abort a rank waits until its stderr pipe is read (the process manager kills
    it on the abort and may drop what is still in the pipe: a stall report went missing so)."""
    import subprocess

    proc = subprocess.Popen([sys.executable, "-c", DRAIN, str(limit)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline() == "ready\n"
        if reader_delay is not None:
            time.sleep(reader_delay)
            assert proc.stderr.read(1000) == "x" * 1000
        out = proc.stdout.readline()
        assert proc.wait(timeout=30) == 0
    finally:
        proc.kill()
        proc.communicate()
    assert low < float(out) < high, out
