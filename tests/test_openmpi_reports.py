"""Open MPI's side of a failed job, checked under any MPI: the report ``prterun`` prints when a
rank exits non-zero is read (rank and status) and explained, and ``--stdin`` is refused for
Open MPI 5, whose ``mpiexec`` never passes on the end of the input. The real Open MPI runs are
in tests/test_supervise.py and tests/test_launch_input.py under tests/openmpi/run.sh.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from distprop import control_channel, launcher, supervise
from distprop.hydra_output import OutputCopier

from helpers import REPO

# prterun 5.0.11, rank 1 of 2 exited with os._exit(1) before MPI_Init
NONZERO_REPORT = b"""--------------------------------------------------------------------------
prterun detected that one or more processes exited with non-zero status,
thus causing the job to be terminated. The first process to do so was:

   Process name: [prterun-vm-11552@1,1]
   Exit code:    1
--------------------------------------------------------------------------
"""


def read_report(text: bytes):
    read_end, write_end = os.pipe()
    sink = os.open(os.devnull, os.O_WRONLY)
    try:
        with os.fdopen(read_end, "rb") as stream:
            copier = OutputCopier(stream, sink).start()
            os.write(write_end, text)
            os.close(write_end)
            copier.join(5.0)
    finally:
        os.close(sink)
    return copier.banner


def supervisor_with(*ranks):
    sup = control_channel.Supervisor(listen=False)
    for rank in ranks:
        sup.ranks[rank] = control_channel.RankRecord(rank, 1000 + rank, "n1", 2)
    return sup


def test_open_mpi_report_of_a_nonzero_exit_names_rank_and_status():
    banner = read_report(NONZERO_REPORT)
    assert (banner.rank, banner.exit_code, banner.signal) == (1, 1, None)


@pytest.mark.parametrize("registered, message", [
    ((0,), "rank 1 exited with status 1 before it reached dist.init(); the other ranks were "
           "stopped (exit code 1)"),
    ((), "rank 1 exited with status 1 (no rank had reached dist.init()); the other ranks were "
         "stopped (exit code 1)"),
    ((0, 1), None),  # a registered rank reports its own exit through the control channel
])
def test_open_mpi_report_is_explained(registered, message):
    code, line = supervise.explain(1, supervisor_with(*registered), read_report(NONZERO_REPORT),
                                   None)
    assert (code, line) == (1, message)


@pytest.mark.parametrize("version, major", [
    ("mpiexec (Open MPI) 5.0.11\n\nReport bugs to https://www.open-mpi.org/", 5),
    ("mpirun (Open MPI) 4.1.6", 4),
    ("HYDRA build details:\n    Version: 4.2.0", None),
])
def test_open_mpi_major_version(version, major):
    assert launcher.open_mpi_major(version) == major


@pytest.mark.parametrize("version, refused", [
    ("mpiexec (Open MPI) 5.0.11", True),
    ("mpirun (Open MPI) 4.1.6", False),
])
def test_stdin_flag_is_refused_under_open_mpi_5(version, refused):
    env = {**os.environ, "DISTPROP_FAKE_MPI_VERSION": version}
    # -n 1 and a command that is not found: under Open MPI 4 the next check refuses it, so
    # nothing starts either way
    done = subprocess.run([sys.executable, "-m", "distprop", "launch", "-n", "1", "--stdin",
                           "--", "nonexistent_cmd"], capture_output=True, text=True,
                          timeout=60, env=env, cwd=str(REPO), stdin=subprocess.DEVNULL)
    assert done.returncode == 2, done.stderr
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    expected = ("--stdin does not work with Open MPI 5's mpiexec: it passes the input to rank 0 "
                "but never its end" if refused else "command not found: nonexistent_cmd")
    assert len(lines) == 1 and expected in lines[0], done.stderr
