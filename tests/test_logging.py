"""Console messages through `logging`: the rank filter, the `[rank r]` prefix, --log-level and
DISTPROP_LOG_LEVEL, on real processes (mpiexec for the ranks)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from test_cli import distprop

from helpers import run_mpi

FAST = ("--model", "mlp", "--dataset", "synthetic", "--epochs", 1, "--log-every", 100)

LIBRARY_SCRIPT = """
import logging, sys
import distprop
from distprop import distributed
comm = distributed.init()
log = logging.getLogger("distprop.user")
log.debug(f"debug from {comm.rank}")
log.info(f"info from {comm.rank}")
log.warning(f"warning from {comm.rank}")
"""


@pytest.mark.mpi
@pytest.mark.parametrize("level,stdout_lines,stderr_lines", [
    (None, ["[rank 0] info from 0"], ["[rank 0] warning from 0", "[rank 1] warning from 1"]),
    ("debug", ["[rank 0] debug from 0", "[rank 0] info from 0"],
     ["[rank 0] warning from 0", "[rank 1] warning from 1"]),
    ("WARNING", [], ["[rank 0] warning from 0", "[rank 1] warning from 1"]),
    ("error", [], []),
], ids=["default", "debug", "warning", "error"])
def test_library_records_are_filtered_by_rank_and_prefixed(level, stdout_lines, stderr_lines):
    done = run_mpi(LIBRARY_SCRIPT, nprocs=2, env={"DISTPROP_LOG_LEVEL": level or ""},
                   timeout=120)
    assert done.returncode == 0, done.stderr
    got_out = sorted(line for line in done.stdout.splitlines() if " from " in line)
    got_err = sorted(line for line in done.stderr.splitlines() if " from " in line)
    assert got_out == stdout_lines and got_err == stderr_lines, (done.stdout, done.stderr)


def test_a_single_process_has_no_rank_prefix():
    done = subprocess.run([sys.executable, "-c", LIBRARY_SCRIPT], capture_output=True, text=True,
                          timeout=60, env={**os.environ, "DISTPROP_LOG_LEVEL": ""})
    assert done.returncode == 0, done.stderr
    assert "info from 0" in done.stdout.splitlines()
    assert "warning from 0" in done.stderr.splitlines()


@pytest.mark.parametrize("handover,stdout_lines,stderr_lines", [
    ("", ["info from 0"], ["warning from 0"]),  # the same output whatever the application does
    ("distprop.logconfig.configure(console=False)\n",
     ["app: distprop.user info from 0", "app: distprop.user warning from 0"], []),
], ids=["distprop's console", "handed to the application"])
def test_an_application_with_its_own_logging(handover, stdout_lines, stderr_lines):
    script = ("import logging, sys\nimport distprop.logconfig\nlogging.basicConfig("
              "stream=sys.stdout, level=logging.INFO, format='app: %(name)s %(message)s')\n"
              + handover + LIBRARY_SCRIPT)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=60, env={**os.environ, "DISTPROP_LOG_LEVEL": ""})
    assert done.returncode == 0, done.stderr
    assert [line for line in done.stdout.splitlines() if " from " in line] == stdout_lines
    assert [line for line in done.stderr.splitlines() if " from " in line] == stderr_lines


def test_records_reach_pytest_s_capture_like_prints(capsys):
    import logging

    from distprop import logconfig

    logconfig.configure("info")  # the default, whatever an earlier test set
    logging.getLogger("distprop.user").info("info from the test")
    logging.getLogger("distprop.user").warning("warning from the test")
    captured = capsys.readouterr()
    assert captured.out == "info from the test\n" and captured.err == "warning from the test\n"


@pytest.mark.mpi
@pytest.mark.parametrize("how,shown", [
    ((), True),
    (("--log-level", "info"), True),
    (("--log-level", "warning"), False),
    ("env:warning", False),
], ids=["default", "flag info", "flag warning", "env warning"])
def test_train_log_level_reaches_the_ranks(tmp_path, how, shown):
    env = None
    args = how
    if isinstance(how, str):
        env, args = {"DISTPROP_LOG_LEVEL": how.split(":")[1]}, ()
    done = distprop("train", "-n", 2, *FAST, *args, "--out", tmp_path / "run", timeout=180,
                    env=env)
    assert done.returncode == 0, done.stderr
    epoch_lines = [line for line in done.stdout.splitlines() if "epoch 1/1" in line]
    assert epoch_lines == (["[rank 0] epoch 1/1" + epoch_lines[0].split("epoch 1/1", 1)[1]]
                           if shown else []), done.stdout
    assert ("test: loss" in done.stdout) == shown
    assert "[rank 1]" not in done.stdout


@pytest.mark.parametrize("args,env", [
    (("--log-level", "loud"), None),
    ((), {"DISTPROP_LOG_LEVEL": "loud"}),
], ids=["flag", "env"])
def test_an_unknown_log_level_is_a_usage_error(tmp_path, args, env):
    done = distprop("train", *FAST, *args, "--out", tmp_path / "run", timeout=60, env=env)
    assert done.returncode == 2
    errors = [line for line in done.stderr.splitlines() if line.startswith("Error:")]
    assert errors == ["Error: Invalid value for '--log-level': 'loud' is not one of 'debug', "
                      "'info', 'warning', 'error', 'critical'."], done.stderr
    assert not (tmp_path / "run").exists()
