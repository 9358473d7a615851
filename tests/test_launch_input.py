"""``distprop launch``: standard input is not forwarded unless asked, and commands that cannot
run (missing program, ``python`` waiting for a program on stdin) are refused before starting.

Real ``distprop launch`` processes over the mpich wheel's ``mpiexec``; about 20 s in all.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from distprop import launcher

from helpers import REPO, mpiexec_path

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
LAUNCH = [sys.executable, "-m", "distprop", "launch", "-n", "2"]
# tests/openmpi/run.sh runs this file under Open MPI 5, whose mpiexec never passes on the end of
# standard input: distprop refuses --stdin there
OPEN_MPI = launcher.parse_version_output(launcher.version_output(mpiexec_path())) == "openmpi"
NO_STDIN_UNDER_OPEN_MPI = "--stdin does not work with Open MPI 5's mpiexec"


def launch_with_open_stdin(*args, timeout=60) -> tuple[subprocess.CompletedProcess, float]:
    """Run ``distprop launch -n 2 ARGS`` with a stdin that stays open, as a terminal's would."""
    read_end, write_end = os.pipe()
    started = time.monotonic()
    try:
        done = subprocess.run([*LAUNCH, *map(str, args)], stdin=read_end, capture_output=True,
                              text=True, timeout=timeout, env=ENV, cwd=str(REPO))
    finally:
        os.close(read_end)
        os.close(write_end)
    return done, time.monotonic() - started


LOOP_BODIES = {
    "launch": f"-- '{sys.executable}' -c pass",
    "train": "train -n 2 --model mlp --dataset synthetic --epochs 1 --out \"$out/$l\"",
}


@pytest.mark.parametrize("command", list(LOOP_BODIES))
def test_a_launch_in_a_while_read_loop_leaves_the_loop_its_input(command, tmp_path):
    lines = tmp_path / "lines.txt"
    lines.write_text("one\ntwo\nthree\n")
    prefix = LAUNCH if command == "launch" else LAUNCH[:3]
    call = " ".join(f"'{a}'" for a in prefix) + " " + LOOP_BODIES[command]
    script = f"out='{tmp_path}'; while read l; do {call} > /dev/null || exit 1; " \
             f"echo \"ran $l\"; done < '{lines}'"
    done = subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=300,
                          env=ENV, cwd=str(REPO))
    assert done.returncode == 0, done.stderr
    assert done.stdout.split("\n")[:3] == ["ran one", "ran two", "ran three"], done.stdout


def test_launch_stdin_flag_forwards_input_to_rank_0():
    # only rank 0 reads: Hydra gives the other ranks a pipe that never closes
    code = ("import os, sys; (os.environ.get('PMI_RANK') or os.environ['OMPI_COMM_WORLD_RANK'])"
            " == '0' and print('got', repr(sys.stdin.read()))")
    done = subprocess.run([*LAUNCH, "--stdin", "--", sys.executable, "-c", code],
                          input="hello\n", capture_output=True, text=True, timeout=120, env=ENV,
                          cwd=str(REPO))
    if OPEN_MPI:
        assert done.returncode == 2, done.stderr
        assert NO_STDIN_UNDER_OPEN_MPI in done.stderr
        return
    assert done.returncode == 0, done.stderr
    assert "got 'hello\\n'" in done.stdout


REFUSED = [
    (["--", "nonexistent_cmd"], "command not found: nonexistent_cmd"),
    (["--", "./nonexistent_dir/tool", "--x"], "command not found: ./nonexistent_dir/tool"),
    (["--", "./pyproject.toml"], "command not executable: ./pyproject.toml"),
    (["--", sys.executable], "names no script, -c or -m, so python would wait for a program "
                             "on standard input"),
    (["--", sys.executable, "-u", "-W", "ignore", "-i"], "so python would wait for a program"),
    (["--stdin", "--", sys.executable], NO_STDIN_UNDER_OPEN_MPI if OPEN_MPI
     else "with --stdin only rank 0 gets its program"),
]


@pytest.mark.parametrize("args,message", REFUSED, ids=[" ".join(a[:3]) for a, _ in REFUSED])
def test_launch_refuses_a_command_that_cannot_run(args, message):
    done, elapsed = launch_with_open_stdin(*args)
    assert done.returncode == 2, done.stdout + done.stderr
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and message in lines[0], done.stderr
    assert "Traceback" not in done.stderr and elapsed < 30


def test_launch_python_reading_stdin_runs_on_one_rank_with_the_stdin_flag():
    done = subprocess.run([*LAUNCH[:-1], "1", "--stdin", "--", sys.executable],
                          input="print(6 * 7)\n", capture_output=True, text=True, timeout=120,
                          env=ENV, cwd=str(REPO))
    if OPEN_MPI:
        assert done.returncode == 2 and NO_STDIN_UNDER_OPEN_MPI in done.stderr, done.stderr
        return
    assert done.returncode == 0, done.stderr
    assert "42" in done.stdout


@pytest.mark.parametrize("args,reads", [
    ([], True),
    (["-"], True),
    (["-u", "-B"], True),
    (["-i"], True),
    (["-W", "ignore"], True),
    (["-X", "dev", "-uB"], True),
    (["-c", "pass"], False),
    (["-cpass"], False),
    (["-uc", "pass"], False),
    (["-m", "pytest"], False),
    (["-Wignore", "train.py"], False),
    (["--check-hash-based-pycs", "always", "train.py"], False),
    (["train.py", "-"], False),
    (["-V"], False),
    (["--help"], False),
])
def test_python_reads_stdin_table(args, reads):
    assert launcher.python_reads_stdin(args) is reads


def test_a_command_on_other_hosts_is_not_checked_here():
    cfg = launcher.LaunchConfig(nprocs=2, command=["only_on_the_nodes"], hosts="node-a:1,node-b:1",
                                mpi="mpich")
    launcher.check_command(cfg, launcher.plan(cfg))  # no error: it may exist there
    local = launcher.LaunchConfig(nprocs=2, command=["only_on_the_nodes"], hosts="localhost:2",
                                  mpi="mpich")
    with pytest.raises(launcher.LaunchError, match="command not found: only_on_the_nodes"):
        launcher.check_command(local, launcher.plan(local))
