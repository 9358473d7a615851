"""Preemption (issue 12, section 3): SIGTERM or SIGUSR1 to the launcher or to one rank stops
every rank after the same step, with a checkpoint of that step, exit 143; ``--resume auto``
then ends bit-identical to an uninterrupted run. Real ``mpiexec``, real signals, 2 ranks.
"""

from __future__ import annotations

import os
import re
import signal

import pytest
from failure_runs import (
    RUN_ARGS,
    assert_same_params,
    final_params,
    finish,
    reference_params,
    wait_for_checkpoint,
)
from test_supervise import kill_all, start, train_pids

from helpers import run_mpi


@pytest.mark.parametrize("target, sig, cause", [
    ("launcher", signal.SIGTERM, "the launcher received SIGTERM"),
    ("rank 1", signal.SIGUSR1, "rank 1 received SIGUSR1"),
])
def test_preempted_job_checkpoints_one_agreed_step_and_resumes_bit_identical(
        tmp_path, tmp_path_factory, target, sig, cause):
    expected = reference_params(tmp_path_factory)
    out = tmp_path / "run"
    proc = start("train", "-n", 2, *RUN_ARGS, "--out", out, "--max-restarts", 2,
                 "--restart-delay", 0)
    pids = train_pids(out, proc)
    try:
        wait_for_checkpoint(out, proc)
        os.kill(proc.pid if target == "launcher" else pids[1], sig)
        stdout, err = finish(proc)
    finally:
        kill_all(pids)
    assert proc.returncode == 143, err
    line = [x for x in err.splitlines() if x.startswith("distprop: preempted")]
    assert len(line) == 1, err
    found = re.search(r"every rank stopped after step (\d+) and wrote its checkpoint", line[0])
    assert found and f"({cause})" in line[0], line[0]
    step = int(found.group(1))
    assert 20 <= step < 158, line[0]
    assert "restart" not in err  # asked to stop: --max-restarts does not apply
    assert f"all ranks stopped after step {step} " in stdout
    assert (out / "checkpoints" / f"checkpoint-{step:09d}.npz").exists()
    assert not (out / "summary.json").exists()  # the run is not over

    proc = start("train", "-n", 2, *RUN_ARGS, "--out", out, "--resume", "auto")
    stdout, err = finish(proc)
    assert proc.returncode == 0, err
    assert f"checkpoint-{step:09d}.npz" in stdout  # continued from the preemption checkpoint
    assert_same_params(final_params(out), expected)


AGREE = """
import os, signal
import distprop.distributed as dist
from distprop.distributed import preemption
comm = dist.init()
stopped = None
with preemption.handling():
    for step in range(50):
        if comm.rank == 1 and step == 17:
            os.kill(os.getpid(), signal.SIGUSR1)  # this rank only
        if preemption.agreed(comm):
            stopped = step
            break
print(f"rank {comm.rank} stopped at {stopped}", flush=True)
"""


def test_preemption_flag_is_agreed_by_every_rank_at_the_same_step():
    """One rank's flag stops all ranks after the same step (a tiny max-allreduce per step)."""
    result = run_mpi(AGREE, nprocs=2, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "rank 0 stopped at 17" in result.stdout and "rank 1 stopped at 17" in result.stdout
    overlapped = run_mpi(AGREE.replace("preemption.agreed(comm)", "vote.step()").replace(
        "comm = dist.init()", "comm = dist.init()\nvote = preemption.StopVote(comm)"),
        nprocs=2, timeout=120)
    assert overlapped.returncode == 0, overlapped.stderr
    assert "rank 0 stopped at 18" in overlapped.stdout  # one step later: the vote overlaps it
    assert "rank 1 stopped at 18" in overlapped.stdout
