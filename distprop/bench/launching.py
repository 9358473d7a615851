"""Starting a benchmark worker on N ranks and collecting its result line."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from dataclasses import dataclass

RESULT_PREFIX = "DISTPROP-BENCH-RESULT "


def available_cores() -> int:
    """CPU cores this process may run on (its affinity mask, not the machine's total)."""
    from distprop.launcher import available_cores as cores

    return cores()


def check_launchable(ranks: list[int], threads: int = 1, oversubscribe: bool = False) -> None:
    """Raise ValueError when a rank count needs more cores than this machine has."""
    cores = available_cores()
    if oversubscribe:
        return
    too_many = [r for r in ranks if r * threads > cores]
    if too_many:
        raise ValueError(
            f"{max(too_many)} ranks x {threads} thread(s) need {max(too_many) * threads} cores but "
            f"only {cores} are available; lower --ranks/--threads-per-rank or pass "
            "--oversubscribe (timings of oversubscribed runs measure time sharing, not scaling)")


def mpi_command(ranks: int, argv: list[str], threads: int = 1,
                oversubscribe: bool = False) -> tuple[list[str], dict[str, str]]:
    """The launcher command (``distprop launch`` machinery) running ``python argv...`` on
    ``ranks`` ranks with ``threads`` BLAS threads each, and its environment."""
    from distprop.launcher import LaunchConfig, plan

    launch = plan(LaunchConfig(nprocs=ranks, command=[sys.executable, *argv],
                               threads_per_rank=threads, oversubscribe=oversubscribe))
    env = dict(os.environ)
    env.update(launch.env)
    env["PYTHONUNBUFFERED"] = "1"
    return launch.argv, env


@dataclass
class RunOutcome:
    """What one launched run produced: its result dict, or an error text."""

    ranks: int
    result: dict | None
    error: str | None
    command: list[str]


def run_worker(ranks: int, argv: list[str], threads: int = 1, timeout: float = 600.0,
               oversubscribe: bool = False, extra_env: dict | None = None) -> RunOutcome:
    """Launch ``python argv...`` on ``ranks`` ranks and parse the result line rank 0 prints.
    ``extra_env``: variables set for the ranks on top of the launch environment.

    A failing run (non-zero exit, timeout, no result line) becomes an outcome with ``error`` set
    to the tail of its output, so a sweep can report it and go on.
    """
    try:
        cmd, env = mpi_command(ranks, argv, threads, oversubscribe)
    except ValueError as exc:  # LaunchError
        return RunOutcome(ranks, None, f"cannot launch: {exc}", [])
    env = {**env, **(extra_env or {})}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env, start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        # End the launcher and every rank it started (they share its new session).
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()
        return RunOutcome(ranks, None, f"timed out after {timeout:.0f} s\n"
                          f"{_tail(stderr + stdout)}", cmd)
    result = None
    for line in stdout.splitlines():
        if line.startswith(RESULT_PREFIX):
            result = json.loads(line[len(RESULT_PREFIX):])
    if proc.returncode != 0 or result is None:
        why = (f"exit code {proc.returncode}" if proc.returncode != 0
               else "no result line in the output")
        return RunOutcome(ranks, None, f"{why}\n{_tail(stderr + stdout)}", cmd)
    return RunOutcome(ranks, result, None, cmd)


def _tail(text: str, lines: int = 15) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])
