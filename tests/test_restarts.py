"""``--max-restarts`` / ``--restart-delay`` (issue 12, section 3): a failed job is relaunched,
``train`` with ``--resume auto``, and ends with the uninterrupted run's parameters. Real
``mpiexec`` and real signals, 2 ranks.
"""

from __future__ import annotations

import os
import signal
import sys
import time

import pytest
from failure_runs import (
    RUN_ARGS,
    assert_same_params,
    final_params,
    finish,
    reference_params,
    wait_for_checkpoint,
)
from test_supervise import kill_all, run_owned, start, train_pids

# argv: directory, exit status of a failing attempt, attempts that fail
SCRIPT = """
import os, sys
attempt = int(os.environ["DISTPROP_RESTART_COUNT"])
rank = int(os.environ["PMI_RANK"])
open(os.path.join(sys.argv[1], f"attempt{attempt}.rank{rank}"), "w").close()
sys.exit(int(sys.argv[2]) if attempt < int(sys.argv[3]) else 0)
"""


@pytest.mark.parametrize("status, failing, restarts, code, attempts, says", [
    (3, 1, 2, 0, 2, ["distprop: restart 1 of 2 in 0 s"]),
    (3, 9, 2, 3, 3, ["restart 1 of 2", "restart 2 of 2", "gave up after 2 restart(s)"]),
    (2, 9, 2, 2, 1, []),  # a usage error is not retried
    (3, 9, 0, 3, 1, []),  # the default: no restarts
])
def test_launch_restarts_a_failed_job_with_its_restart_count(tmp_path, status, failing,
                                                             restarts, code, attempts, says):
    script = tmp_path / "job.py"
    script.write_text(SCRIPT)
    result = run_owned([sys.executable, "-m", "distprop", "launch", "-n", 2, "--max-restarts",
                        restarts, "--restart-delay", 0, "--", sys.executable, script, tmp_path,
                        status, failing], timeout=120)
    assert result.returncode == code, result.stderr
    made = sorted(p.name for p in tmp_path.glob("attempt*"))
    assert made == sorted(f"attempt{k}.rank{r}" for k in range(attempts) for r in (0, 1))
    for text in says:
        assert text in result.stderr
    if not says:
        assert "distprop: restart" not in result.stderr


@pytest.mark.parametrize("args, problem", [
    (["--max-restarts", "-1"], "--max-restarts"),
    (["--restart-delay", "-2"], "--restart-delay"),
    (["--max-restarts", "1"], "use it with -n 2 or more"),  # no launcher: nobody to restart
])
def test_bad_restart_options_are_usage_errors(tmp_path, args, problem):
    result = run_owned([sys.executable, "-m", "distprop", "train", *args, "--epochs", 1,
                        "--out", tmp_path / "run"], timeout=60)
    assert result.returncode == 2, result.stderr
    assert problem in result.stderr and "Traceback" not in result.stderr


def test_sigkill_of_one_rank_restarts_and_ends_as_the_uninterrupted_run(tmp_path,
                                                                       tmp_path_factory):
    expected = reference_params(tmp_path_factory)
    out = tmp_path / "run"
    proc = start("train", "-n", 2, *RUN_ARGS, "--out", out, "--max-restarts", 1,
                 "--restart-delay", 0.5)
    pids = train_pids(out, proc)
    try:
        wait_for_checkpoint(out, proc)
        os.kill(pids[1], signal.SIGKILL)
        stdout, err = finish(proc)
    finally:
        kill_all(pids)
    assert proc.returncode == 0, err
    restart = [x for x in err.splitlines() if x.startswith("distprop: restart 1 of 1")]
    assert len(restart) == 1, err
    # Hydra's report, or on a loaded machine the lifelines' order (see test_supervise)
    assert f"rank 1 (PID {pids[1]} on " in restart[0], err
    assert "killed by SIGKILL" in restart[0] or "died first" in restart[0], err
    assert "--resume auto: continuing from" in stdout
    assert (out / "summary.json").exists()
    assert_same_params(final_params(out), expected)


def test_sigterm_while_waiting_to_restart_stops_without_restarting(tmp_path):
    script = tmp_path / "job.py"
    script.write_text(SCRIPT)
    proc = start("launch", "-n", 2, "--max-restarts", 3, "--restart-delay", 60, "--",
                 sys.executable, script, tmp_path, 3, 9)
    try:
        deadline = time.monotonic() + 60
        err = ""
        while "distprop: restart 1 of 3 in 60 s" not in err:
            assert time.monotonic() < deadline and proc.poll() is None, err
            err += proc.stderr.readline()
        proc.send_signal(signal.SIGTERM)
        _, rest = proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert proc.returncode == 143, err + rest
    assert "received SIGTERM while waiting to restart; not restarting" in rest
    assert sorted(p.name for p in tmp_path.glob("attempt*")) == ["attempt0.rank0",
                                                                 "attempt0.rank1"]
