"""Who died first: Hydra's banner names the first failed process in rank order, which can be a
rank it stopped after the one that really died; the launcher trusts the lifelines' order."""

from __future__ import annotations

import pytest

from distprop import control_channel, supervise
from distprop.hydra_output import Banner


def supervisor_with(events):
    sup = control_channel.Supervisor(listen=False)
    for rank in (0, 1):
        sup.ranks[rank] = control_channel.RankRecord(rank, 1000 + rank, "n1", 2)
    for rank, event in events:
        sup._note(rank, event)
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
])
def test_the_rank_that_dropped_first_is_named(events, expected):
    banner = Banner(pid=1000, host="n1", signal=9)
    code, line = supervise.explain(137, supervisor_with(events), banner, None)
    assert code == 137
    assert line.startswith(expected), line
