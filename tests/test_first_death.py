"""Who died first: Hydra's banner names the first failed process in rank order, which can be a
rank it stopped after the one that really died; the launcher trusts the lifelines' order."""

from __future__ import annotations

import pytest

from distprop import control_channel, supervise
from distprop.hydra_output import Banner


def supervisor_with(events):
    """A launcher's records of ranks 0 and 1 on host n1; ``events`` are (rank, event) or
    (rank, event, time) (drops seen at one wake-up of the server loop share their time)."""
    sup = control_channel.Supervisor(listen=False)
    for rank in (0, 1):
        sup.ranks[rank] = control_channel.RankRecord(rank, 1000 + rank, "n1", 2)
    for rank, event, *at in events:
        sup._note(rank, event, *at)
    return sup


@pytest.mark.parametrize("events, expected", [
    # rank 1 was killed first; Hydra then killed rank 0 and its banner names rank 0
    ([(1, "dropped"), (0, "dropped")],
     "rank 1 (PID 1001 on n1) died first (killed by a signal; MPI's launcher then reported "
     "SIGKILL for rank 0)"),
    # rank 0 really was the one killed
    ([(0, "dropped"), (1, "dropped")], "rank 0 (PID 1000 on n1) was killed by SIGKILL"),
    # rank 1 ended in order (exit event) before rank 0 was killed: rank 0 it is
    ([(1, "exit"), (1, "dropped"), (0, "dropped")],
     "rank 0 (PID 1000 on n1) was killed by SIGKILL"),
    # both drops seen at one wake-up (a loaded launcher): order unknown, MPI's banner stands
    # and the other rank is named with it
    ([(0, "dropped", 5.0), (1, "dropped", 5.0)],
     "rank 0 (PID 1000 on n1) was killed by SIGKILL (signal 9), as MPI's launcher reports; rank 1 "
     "(PID 1001 on n1) stopped at the same moment, so which of them died first is unknown"),
    ([(1, "dropped", 5.0), (0, "dropped", 5.0)],
     "rank 0 (PID 1000 on n1) was killed by SIGKILL (signal 9), as MPI's launcher reports; rank 1 "
     "(PID 1001 on n1) stopped at the same moment, so which of them died first is unknown"),
])
def test_the_rank_that_dropped_first_is_named(events, expected):
    banner = Banner(pid=1000, host="n1", signal=9)
    code, line = supervise.explain(137, supervisor_with(events), banner, None)
    assert code == 137
    assert line.startswith(expected), line


# argv: pid directory. Rank 1 ends its script normally (and waits in MPI_Finalize); rank 0
# waits to be killed.
CLEAN_THEN_KILLED = """
import os, sys, time
import distprop.distributed as dist
comm = dist.init()
with open(os.path.join(sys.argv[1], f"rank{comm.rank}.pid"), "w") as f:
    f.write(str(os.getpid()))
if comm.rank == 0:
    time.sleep(120)
open(os.path.join(sys.argv[1], "rank1.done"), "w").close()
"""


def test_a_rank_that_ended_normally_is_not_named_as_the_first_death(tmp_path):
    """Real processes: rank 1 finishes its script (status 0); then rank 0 is killed. The
    launcher names rank 0, not the rank that ended in order (it waits in MPI_Finalize for
    the others, so its connection closes only when MPI's launcher stops it)."""
    import os
    import signal
    import socket
    import sys
    import time

    from test_supervise import children, kill_all, start, wait_for_pids

    script = tmp_path / "worker.py"
    script.write_text(CLEAN_THEN_KILLED)
    proc = start("launch", "-n", 2, "--", sys.executable, script, tmp_path)
    pids = wait_for_pids(proc, tmp_path)
    spawned = children(proc.pid)
    try:
        deadline = time.monotonic() + 30
        while not (tmp_path / "rank1.done").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert (tmp_path / "rank1.done").exists(), "rank 1 did not reach the end of its script"
        time.sleep(1.0)  # rank 1 is inside its exit handlers / MPI_Finalize
        os.kill(pids[0], signal.SIGKILL)
        _, err = proc.communicate(timeout=60)
    finally:
        kill_all(spawned + pids)
    assert proc.returncode == 128 + signal.SIGKILL, err
    line = [x for x in err.splitlines() if x.startswith("distprop: rank")]
    assert line and line[0].startswith(
        f"distprop: rank 0 (PID {pids[0]} on {socket.gethostname()}) was killed by SIGKILL"), err
