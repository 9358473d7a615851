"""The ``distprop`` command line: launch, train (learning, resume after a crash), info, bad input.

Budgets (2 ranks x 1 thread on a 2-core machine): mlp/digits ~10 s, cnn/mnist1d ~15 s (10
epochs of 7200 samples), the crash/resume test ~30 s.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

import distprop as dp
from distprop.cli import cli

from helpers import REPO, mpiexec_path

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def distprop(*args, env=None, timeout=240, **kw):
    """Run ``python -m distprop ARGS`` in a subprocess; returns the CompletedProcess."""
    full = dict(ENV)
    full.update(env or {})
    return subprocess.run([sys.executable, "-m", "distprop", *map(str, args)],
                          capture_output=True, text=True, timeout=timeout, env=full,
                          cwd=str(REPO), **kw)


def invoke(*args, env=None):
    """Run the click app in-process (fast; for errors raised before anything starts)."""
    return CliRunner().invoke(cli, [str(a) for a in args], env=env, catch_exceptions=False)


# --- launch -------------------------------------------------------------------------------------

HYDRA = "HYDRA build details:\n    Version:                                 4.2.0\n"
OPEN_MPI = "mpiexec (Open MPI) 5.0.3\n\nReport bugs to https://www.open-mpi.org/community/help/\n"


def dry_run(*args, version=HYDRA, root="0", extra_env=None):
    env = {"DISTPROP_FAKE_MPI_VERSION": version, "DISTPROP_ASSUME_ROOT": root,
           **(extra_env or {})}
    result = invoke("launch", *args, "--dry-run", "--", "python", "train.py", "--x", "1",
                    env=env)
    assert result.exit_code == 0, result.output
    return result.output.strip().split()


def test_launch_dry_run_mpich():
    argv = dry_run("-n", "2", "--threads-per-rank", "3", "-H", "a:1,b:1")
    assert Path(argv[0]).name in ("mpiexec", "mpirun")
    assert argv[1:9] == ["-n", "2", "-hosts", "a:1,b:1", "-genv", "OMP_NUM_THREADS", "3",
                         "-genv"]
    assert ["-genv", "OPENBLAS_NUM_THREADS", "3"] == argv[8:11]
    assert argv[-4:] == ["python", "train.py", "--x", "1"]
    assert "--allow-run-as-root" not in argv


def test_launch_dry_run_mpich_prefers_the_wheel_next_to_python():
    argv = dry_run("-n", "2")
    assert argv[0] == mpiexec_path()
    assert argv[argv.index("OMP_NUM_THREADS") + 1] == "1"  # 2 cores // 2 ranks


@pytest.mark.parametrize("root", ["1", "0"])
def test_launch_dry_run_openmpi_root_flag(root, tmp_path):
    hostfile = tmp_path / "hosts"
    hostfile.write_text("# nodes\nnode1 slots=2\nnode2:2\n")
    argv = dry_run("-n", "4", "--hostfile", str(hostfile), "--threads-per-rank", "2",
                   "--mpi-args", "--map-by node", version=OPEN_MPI, root=root)
    assert ("--allow-run-as-root" in argv) == (root == "1")
    assert argv[argv.index("--host") + 1] == "node1:2,node2:2"  # Open MPI can't read 'node2:2'
    assert "-x" in argv and "OMP_NUM_THREADS=2" in argv and "MKL_NUM_THREADS=2" in argv
    assert argv[argv.index("--bind-to") + 1] == "none"
    assert argv[-6:] == ["--map-by", "node", "python", "train.py", "--x", "1"]


def test_launch_dry_run_openmpi_oversubscribe():
    argv = dry_run("-n", "5", "--oversubscribe", "--mpi", "openmpi")
    assert "--oversubscribe" in argv and argv[1:3] == ["-n", "5"]


def test_launch_dry_run_srun_forced_and_detected(tmp_path):
    argv = dry_run("-n", "4", "--mpi", "srun", "--threads-per-rank", "2")
    assert argv[:4] == ["srun", "-n", "4", "--cpus-per-task=2"]
    assert argv[4] == "--export=ALL,OMP_NUM_THREADS=2,OPENBLAS_NUM_THREADS=2,MKL_NUM_THREADS=2"
    fake = tmp_path / "srun"
    fake.write_text("#!/bin/sh\nexit 0\n")
    fake.chmod(0o755)
    env = {"SLURM_JOB_ID": "42", "SLURM_NTASKS": "4",
           "PATH": f"{tmp_path}{os.pathsep}{os.environ['PATH']}"}
    argv = dry_run("-n", "4", extra_env=env)
    assert argv[0] == str(fake) and argv[1:3] == ["-n", "4"]


def test_launch_runs_the_job_and_returns_its_exit_code():
    done = distprop("launch", "-n", "2", "--", sys.executable, "-c",
                    "import os, sys; os.write(1, f\"rank {os.environ['PMI_RANK']} "
                    "{os.environ['OMP_NUM_THREADS']}\\n\".encode()); sys.exit(3)", timeout=60)
    assert done.returncode == 3, done.stderr
    assert sorted(line for line in done.stdout.splitlines() if line.startswith("rank")) == \
        ["rank 0 1", "rank 1 1"]


def test_launch_forwards_sigterm():
    proc = subprocess.Popen([sys.executable, "-m", "distprop", "launch", "-n", "2", "--",
                             sys.executable, "-c", "import time; print('up', flush=True); "
                             "time.sleep(60)"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=ENV, cwd=str(REPO))
    # Both ranks print "up"; their writes may interleave on one line ("upup").
    assert "up" in proc.stdout.readline()
    start = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    code = proc.wait(timeout=30)
    assert time.monotonic() - start < 20 and code != 0


# --- info ---------------------------------------------------------------------------------------


def test_info_reports_versions_and_mpi():
    done = distprop("info", timeout=60)
    assert done.returncode == 0, done.stderr
    out = done.stdout
    for key in ("Python", "NumPy", "mpi4py", "MPI library", "mpiexec", "BLAS", "CuPy"):
        assert key in out
    assert "MPICH" in out and "(mpich)" in out
    data = json.loads(distprop("info", "--json", "--no-mpi-init", timeout=60).stdout)
    assert data["numpy"] == np.__version__ and "ranks" not in data


def test_info_under_mpi_lists_every_rank_once():
    done = distprop("launch", "-n", "2", "--", sys.executable, "-m", "distprop", "info",
                    timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.count("NumPy") == 1
    assert "rank 0/2" in done.stdout and "rank 1/2" in done.stdout
    assert "local rank 1/2" in done.stdout


# --- training -----------------------------------------------------------------------------------


def summary(out: Path) -> dict:
    return json.loads((out / "summary.json").read_text())


def test_train_mlp_digits_two_ranks(tmp_path):
    out = tmp_path / "run"
    done = distprop("train", "-n", 2, "--model", "mlp", "--dataset", "digits", "--epochs", 10,
                    "--optimizer", "adam", "--lr", 2e-3, "--out", out)
    assert done.returncode == 0, done.stdout + done.stderr
    s = summary(out)
    assert s["world_size"] == 2 and s["epochs_run"] == 10
    assert s["test"]["accuracy"] >= 0.97, s["test"]
    assert s["test"]["samples"] == s["dataset"]["test"] == 359
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert {"loss", "accuracy", "lr", "samples_per_s", "grad_norm"} <= set(rows[0])
    assert (out / "metrics.csv").read_text().startswith("kind,epoch,step,loss,accuracy,lr")
    assert (out / "curves.png").stat().st_size > 1000
    assert len(dp.train.list_checkpoints(out / "checkpoints")) == 3  # --keep-checkpoints
    assert "Traceback" not in done.stderr


def test_train_cnn_mnist1d_two_ranks(tmp_path):
    out = tmp_path / "run"
    done = distprop("train", "-n", 2, "--model", "cnn", "--dataset", "mnist1d", "--epochs", 10,
                    "--optimizer", "adam", "--lr", 3e-3, "--batch-size", 64, "--out", out,
                    env={"DISTPROP_CACHE_DIR": str(tmp_path / "cache")})
    assert done.returncode == 0, done.stdout + done.stderr
    s = summary(out)
    assert s["test"]["accuracy"] >= 0.90, s["test"]
    assert s["dataset"] == {"train": 7200, "val": 800, "test": 2000}


RESUME_ARGS = ("--model", "mlp", "--dataset", "digits", "--epochs", 2, "--batch-size", 16,
               "--checkpoint-every", 10, "--keep-checkpoints", 3, "--log-every", 5,
               "--optimizer", "adam", "--lr", 1e-3)


def _rank_pids(out: Path) -> dict[int, int]:
    """PID by rank of the worker processes started for the run directory ``out``."""
    prefix = str(out).encode() + b"/"
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmd = (entry / "cmdline").read_bytes().split(b"\0")
            environ = (entry / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"--worker-config" in cmd and any(arg.startswith(prefix) for arg in cmd):
            for var in environ:
                if var.startswith(b"PMI_RANK="):
                    found[int(var.split(b"=")[1])] = int(entry.name)
    return found


def _final_state(out: Path) -> dict:
    return dp.load(dp.train.list_checkpoints(out / "checkpoints")[-1])


@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="needs /proc")
def test_sigkill_one_rank_then_resume_auto_matches_uninterrupted_run(tmp_path):
    reference = tmp_path / "reference"
    done = distprop("train", "-n", 2, *RESUME_ARGS, "--out", reference)
    assert done.returncode == 0, done.stderr

    out = tmp_path / "crashed"
    proc = subprocess.Popen([sys.executable, "-m", "distprop", "train", "-n", "2",
                             *map(str, RESUME_ARGS), "--out", str(out)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV,
                            cwd=str(REPO))
    ckpt_dir = out / "checkpoints"
    deadline = time.monotonic() + 120
    while len(dp.train.list_checkpoints(ckpt_dir)) < 2:  # steps 10 and 20 are on disk
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.02)
    pids = _rank_pids(out)
    os.kill(pids[1], signal.SIGKILL)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode != 0, "the job finished before it could be killed"
    assert not (out / "summary.json").exists()
    saved = dp.train.list_checkpoints(ckpt_dir)
    newest = saved[-1]
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])  # torn write

    done = distprop("train", "-n", 2, *RESUME_ARGS, "--out", out, "--resume", "auto")
    assert done.returncode == 0, done.stderr
    assert f"skipping unusable checkpoint: checkpoint {newest} is truncated" in done.stdout
    assert f"continuing from {saved[-2]}" in done.stdout
    a, b = _final_state(reference), _final_state(out)
    assert a["position"] == b["position"]
    for key, value in a["model"].items():
        np.testing.assert_array_equal(b["model"][key], value, err_msg=key)
    for index, state in a["optimizer"]["state"].items():
        for name, value in state.items():
            np.testing.assert_array_equal(b["optimizer"]["state"][index][name], value)
    assert summary(out)["test"] == summary(reference)["test"]
    assert summary(out)["resumed_from"] == str(saved[-2])


def test_resume_on_a_different_number_of_ranks_is_allowed_and_logged(tmp_path):
    out = tmp_path / "run"
    args = ("--model", "mlp", "--dataset", "synthetic", "--epochs", 2, "--batch-size", 32,
            "--out", out)
    assert distprop("train", "-n", 2, *args).returncode == 0
    done = distprop("train", *args[:5], 3, *args[6:], "--resume", "auto")
    assert done.returncode == 0, done.stderr
    assert "resuming on 1 rank(s)" in done.stdout and "written by 2 rank(s)" in done.stdout
    assert summary(out)["epochs_run"] == 3


def test_train_reads_toml_and_env(tmp_path):
    config = tmp_path / "run.toml"
    config.write_text('[train]\nmodel = "mlp"\ndataset = "synthetic"\nepochs = 1\n'
                      f'out = "{tmp_path / "from_toml"}"\n')
    result = invoke("train", "--config", config, "--dry-run",
                    env={"DISTPROP_TRAIN_BATCH_SIZE": "7"})
    assert result.exit_code == 0, result.output
    resolved = json.loads(result.output)
    assert resolved["dataset"] == "synthetic" and resolved["epochs"] == 1
    assert resolved["batch_size"] == 7  # environment over file
    result = invoke("train", "--config", config, "--dry-run", "--batch-size", 9,
                    env={"DISTPROP_TRAIN_BATCH_SIZE": "7"})
    assert json.loads(result.output)["batch_size"] == 9  # flag over environment


def test_train_dry_run_with_ranks_prints_the_launch_command(tmp_path):
    result = invoke("train", "-n", 2, "--dataset", "synthetic", "--out", tmp_path, "--dry-run",
                    env={"DISTPROP_FAKE_MPI_VERSION": HYDRA})
    assert result.exit_code == 0, result.output
    assert "-m distprop train --worker-config" in result.output
    assert not (tmp_path / "config.json").exists()


# --- bad input ----------------------------------------------------------------------------------


def _bad_npz(tmp_path, **arrays) -> str:
    path = tmp_path / "bad.npz"
    np.savez(path, **arrays)
    return str(path)


BAD_INPUTS = [
    (["--model", "resnet"], "unknown model 'resnet'; choose one of mlp, cnn, lstm, transformer, "
                            "wide"),
    (["--dataset", "cifar"], "unknown dataset 'cifar': expected one of digits, mnist1d, "
                             "synthetic"),
    (["--optimizer", "lbfgs"], "unknown optimizer 'lbfgs'; choose one of sgd, adam, adamw"),
    (["--lr-schedule", "wobbly"], "unknown lr-schedule 'wobbly'"),
    (["--dataset", "/nonexistent/data.npz"], "dataset file /nonexistent/data.npz does not exist"),
    (["-n", 2, "--global-batch-size", 1], "--global-batch-size 1 is smaller than the number of "
                                          "ranks (2)"),
    (["-n", 2, "--global-batch-size", 30, "--grad-accum", 4],
     "--global-batch-size 30 is not divisible by ranks x gradient accumulation = 2 x 4 = 8"),
    (["-n", 64], "-n 64 is more than the 2 CPU cores on this machine; pass --oversubscribe"),
    (["--epochs", 0], "--epochs must be at least 1"),
    (["--weight-decay", -1], "--weight-decay must be a finite number >= 0, got -1.0"),
    (["--device", "cuda"], "needs CuPy"),
    (["--resume", "/nonexistent/ckpt.npz"], "checkpoint /nonexistent/ckpt.npz does not exist"),
    (["--config", "/nonexistent/x.toml"], "config file /nonexistent/x.toml does not exist"),
]


@pytest.mark.parametrize("args,message", BAD_INPUTS, ids=[" ".join(map(str, a)) for a, _ in
                                                          BAD_INPUTS])
def test_bad_input_is_a_usage_error(args, message, tmp_path, monkeypatch):
    if args == ["-n", 64] and (os.cpu_count() or 1) >= 64:
        pytest.skip("this machine has 64 cores")
    if args == ["--device", "cuda"] and dp.backend.cupy_available():  # the gpu-check extra
        message = "needs a CUDA GPU, but CuPy sees none"
    monkeypatch.setenv("DISTPROP_FAKE_MPI_VERSION", HYDRA)
    result = invoke("train", *args, "--out", tmp_path)
    assert result.exit_code == 2, result.output
    flat = " ".join(result.output.split())
    if args == ["-n", 64]:
        message = message.replace("2 CPU cores", f"{dp.launcher.available_cores()} CPU cores")
    assert message in flat
    assert "Traceback" not in result.output
    assert not (tmp_path / "config.json").exists()  # nothing was launched


@pytest.mark.parametrize("toml,message", [
    ('epochs = "x"', "option 'epochs' must be an integer, got 'x'"),
    ("zero = 1", "option 'zero' must be true or false, got 1"),
    ("[train]\nlr = \"fast\"", "option 'lr' must be a number, got 'fast'"),
])
def test_wrongly_typed_toml_value_is_a_usage_error(toml, message, tmp_path):
    path = tmp_path / "c.toml"
    path.write_text(toml + "\n")
    result = invoke("train", "--config", path, "--out", tmp_path)
    assert result.exit_code == 2, result.output
    assert message in " ".join(result.output.split()) and "Traceback" not in result.output


def test_unwritable_out_dir_is_a_usage_error_and_dry_run_creates_nothing(tmp_path):
    (tmp_path / "file").write_text("")
    result = invoke("train", "--out", tmp_path / "file" / "run")
    assert result.exit_code == 2, result.output
    assert "Invalid value for --out: cannot write the directory" in result.output
    assert "Traceback" not in result.output
    result = invoke("train", "--out", tmp_path / "new" / "run", "--dry-run")
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]


def test_unsplittable_mpi_args_is_a_usage_error(monkeypatch):
    monkeypatch.setenv("DISTPROP_FAKE_MPI_VERSION", HYDRA)
    result = invoke("launch", "-n", 2, "--mpi-args", '"unclosed', "--dry-run", "--", "true")
    assert result.exit_code == 2, result.output
    assert "--mpi-args '\"unclosed' cannot be split like a shell would: No closing quotation" \
        in " ".join(result.output.split())
    assert "Traceback" not in result.output


@pytest.mark.parametrize("arrays,message", [
    ({"x": np.ones(10), "y": np.zeros(10, int)}, "array 'x' has shape (10,)"),
    ({"x": np.ones((10, 3)), "y": np.array([0, 1, -1, 0, 1, 0, 1, 0, 1, 0])},
     "array 'y' (labels) has a negative label -1 at row 2"),
    ({"x": np.where(np.eye(10, 3) > 0, np.nan, 0.0), "y": np.zeros(10, int)},
     "array 'x' has a non-finite value (nan) at row 0, feature 0"),
    ({"x": np.ones((10, 3)), "y": np.arange(10) / 3}, "must be integer class indices"),
])
def test_bad_dataset_file_is_a_usage_error(arrays, message, tmp_path):
    path = _bad_npz(tmp_path, **arrays)
    result = invoke("train", "--dataset", path, "--out", tmp_path)
    assert result.exit_code == 2, result.output
    flat = " ".join(result.output.split())
    assert "Invalid value for --dataset" in flat and path in flat and message in flat


def test_model_that_cannot_take_the_data_is_a_usage_error(tmp_path):
    path = _bad_npz(tmp_path, x=np.ones((40, 2, 2), np.float32), y=np.arange(40) % 2)
    result = invoke("train", "--model", "cnn", "--dataset", path, "--out", tmp_path)
    assert result.exit_code == 2 and "Invalid value for --model" in result.output
    assert "too small" in result.output


def test_usage_error_is_printed_once_under_mpiexec(tmp_path):
    """Started by mpiexec directly (no -n): every rank parses, only rank 0 prints."""
    done = subprocess.run([mpiexec_path(), "-n", "2", sys.executable, "-m", "distprop", "train",
                           "--model", "resnet", "--out", str(tmp_path)], capture_output=True,
                          text=True, timeout=120, env=ENV, cwd=str(REPO))
    assert done.returncode == 2
    assert done.stderr.count("unknown model 'resnet'") == 1, done.stderr
    assert "Traceback" not in done.stderr


def test_usage_error_on_one_rank_only_is_printed_and_ends_every_rank(tmp_path):
    """A dataset missing on one node only: rank 1 must not exit alone (unheard) while rank 0
    waits for it; every rank exits 2 and rank 0 prints rank 1's error."""
    rank_cmd = [sys.executable, "-m", "distprop", "train", "--epochs", "1", "--out",
                str(tmp_path)]
    done = subprocess.run([mpiexec_path(), "-n", "1", "-env", "DISTPROP_TRAIN_DATASET", "digits",
                           *rank_cmd, ":", "-n", "1", "-env", "DISTPROP_TRAIN_DATASET",
                           "/nonexistent/data.npz", *rank_cmd], capture_output=True, text=True,
                          timeout=60, env=ENV, cwd=str(REPO))
    assert done.returncode == 2, done.stderr[-2000:]
    assert done.stderr.count("on rank(s) 1: dataset file /nonexistent/data.npz does not "
                             "exist") == 1, done.stderr
    assert "Traceback" not in done.stderr


def test_usage_error_with_ranks_is_printed_once_before_launching(tmp_path):
    done = distprop("train", "-n", 2, "--optimizer", "lbfgs", "--out", tmp_path, timeout=60)
    assert done.returncode == 2
    assert done.stderr.count("unknown optimizer 'lbfgs'") == 1
    assert "mpich launch" not in done.stderr and "Traceback" not in done.stderr


def test_launch_recipe_hostfile_is_valid():
    hostfile = REPO / "launch" / "hostfile.example"
    argv = dry_run("-n", "8", "--hostfile", str(hostfile))
    assert argv[1:4] == ["-n", "8", "-hosts"]  # the hosts as read, in Hydra's syntax
    result = invoke("launch", "-n", "9", "--hostfile", hostfile, "--dry-run", "--", "x",
                    env={"DISTPROP_FAKE_MPI_VERSION": HYDRA})
    assert result.exit_code == 2 and "more than the 8 slots in the host list" in result.output
