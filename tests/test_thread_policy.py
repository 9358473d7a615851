"""One process applies the same BLAS thread policy as N ranks: ``--threads-per-rank`` if given,
else cores // ranks (cores // 1 for one process), checked with threadpoolctl inside the run."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from distprop.launcher import available_cores

from helpers import REPO

CORES = available_cores()


def _train(tmp_path, *args, env_threads="1"):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        if env_threads is None:
            env.pop(var, None)
        else:
            env[var] = env_threads
    out = tmp_path / "run"
    done = subprocess.run([sys.executable, "-m", "distprop", "train", "--model", "mlp",
                           "--dataset", "synthetic", "--epochs", "1", "--batch-size", "256",
                           "--out", str(out), *map(str, args)], capture_output=True, text=True,
                          timeout=180, env=env, cwd=str(REPO))
    assert done.returncode == 0, done.stdout + done.stderr
    return done, json.loads((out / "summary.json").read_text())


CASES = [
    # args, BLAS threads the caller's environment starts with, threads the run must use
    (["--threads-per-rank", 1], None, 1),
    (["-n", 1, "--threads-per-rank", 1], None, 1),
    ([], "1", CORES),
    (["--threads-per-rank", 2], "1", 2),
    (["-n", 2, "--threads-per-rank", 1], None, 1),
]


@pytest.mark.parametrize("args,env_threads,threads", CASES,
                         ids=["flag 1", "-n 1 flag 1", "default cores", "flag 2", "-n 2 flag 1"])
def test_runs_limit_blas_threads_like_n_ranks(args, env_threads, threads, tmp_path):
    if threads > 1 and CORES < 2:
        pytest.skip("needs 2 cores to tell the policy from the default")
    done, summary = _train(tmp_path, *args, env_threads=env_threads)
    ranks = 2 if "-n" in args and args[args.index("-n") + 1] == 2 else 1
    assert f"{ranks} rank(s) x {threads} BLAS thread(s)" in done.stdout
    assert summary["threads"]["per_rank"] == threads
    pools = summary["threads"]["blas"]
    assert pools and all(p["threads"] == threads for p in pools), pools


def test_threads_per_rank_below_one_is_a_usage_error(tmp_path):
    done = subprocess.run([sys.executable, "-m", "distprop", "train", "--threads-per-rank", "0",
                           "--out", str(tmp_path)], capture_output=True, text=True, timeout=60,
                          cwd=str(REPO))
    assert done.returncode == 2
    assert "Invalid value for --threads-per-rank: must be at least 1, got 0" in done.stderr
