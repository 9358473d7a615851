"""A full disk and killed writers: one line naming the file and "no space left on device", no
0-byte or partial config/summary/checkpoint files, and orphaned temporary files removed at the
next start. The full disk is a 200 KiB tmpfs mounted by the test (root only; skipped otherwise).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from distprop import fileio
from distprop.train.config import TrainConfig

from helpers import REPO

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
FAST = ["--model", "mlp", "--dataset", "synthetic", "--epochs", "1", "--batch-size", "256",
        "--threads-per-rank", "1"]


@pytest.fixture
def tiny_fs(tmp_path):
    """A 200 KiB tmpfs: a real ENOSPC, unmounted afterwards."""
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mnt = tmp_path / "fs"
    mnt.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=200k", "tmpfs", str(mnt)],
                          capture_output=True, text=True, timeout=30)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True, timeout=30)


def _fill(directory: Path) -> None:
    with open(directory / "filler", "wb", buffering=0) as f:
        try:
            while True:
                f.write(b"\0" * 4096)
        except OSError:
            pass


def _leftovers(root: Path) -> list[str]:
    """Temporary files and empty files anywhere under ``root``."""
    return [str(p) for p in root.rglob("*")
            if p.is_file() and p.name not in ("filler", ".distprop.lock")  # emptied at release
            and (p.name.endswith(".tmp") or p.stat().st_size == 0)]


def _train(*args, timeout=180):
    return subprocess.run([sys.executable, "-m", "distprop", "train", *map(str, args)],
                          capture_output=True, text=True, timeout=timeout, env=ENV,
                          cwd=str(REPO))


@pytest.mark.parametrize("ranks,prefix", [([], "distprop train: error: "),
                                          (["-n", 2], "distprop train: error on rank 0: ")],
                         ids=["one process", "2 ranks"])
def test_full_disk_while_checkpointing_is_one_line_and_leaves_nothing_partial(ranks, prefix,
                                                                               tiny_fs):
    out = tiny_fs / "run"
    done = _train(*FAST, *ranks, "--out", out)
    assert done.returncode == 1, done.stdout + done.stderr
    lines = [line for line in done.stderr.splitlines() if "error" in line.lower()]
    wanted = (f"{prefix}cannot write checkpoint {out / 'checkpoints'}/checkpoint-")
    assert any(line.startswith(wanted) and line.endswith(": no space left on device")
               for line in lines), done.stderr
    assert "Traceback" not in done.stderr
    assert not list((out / "checkpoints").glob("*.npz"))
    assert _leftovers(tiny_fs) == []


def test_full_disk_before_launch_leaves_no_config_json(tiny_fs):
    _fill(tiny_fs)
    out = tiny_fs / "run"
    done = _train(*FAST, "-n", 2, "--out", out, timeout=60)
    assert done.returncode == 1, done.stdout + done.stderr
    assert (f"Error: cannot create the run directory {out} or its lock file: no space left on "
            "device" in done.stderr), done.stderr
    assert "Traceback" not in done.stderr
    assert not (out / "config.json").exists()
    assert _leftovers(tiny_fs) == []


@pytest.mark.parametrize("write", [
    lambda p: fileio.atomic_write_text(p, "x" * 400_000, "summary"),
    lambda p: TrainConfig(dataset="y" * 400_000).save_json(p),
], ids=["summary text", "config json"])
def test_a_failed_rewrite_keeps_the_old_file_whole(write, tiny_fs):
    path = tiny_fs / "summary.json"
    path.write_text('{"old": true}\n')
    with pytest.raises(fileio.WriteError) as info:
        write(path)
    assert str(info.value).startswith("cannot write ") and str(path) in str(info.value)
    assert str(info.value).endswith("no space left on device")
    assert path.read_text() == '{"old": true}\n'
    assert _leftovers(tiny_fs) == []


# --- orphaned temporary files ------------------------------------------------------------------

WRITER = """
import sys, time
from pathlib import Path
from distprop import fileio
tmp = fileio.temp_path(Path(sys.argv[1]))
with open(tmp, "wb") as f:
    f.write(b"x" * 4096)
    f.flush()
    print(tmp, flush=True)
    time.sleep(120)
"""


def _start_writer(target: Path):
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(target)], stdout=subprocess.PIPE,
                            text=True, env=ENV, cwd=str(REPO))
    tmp = Path(proc.stdout.readline().strip())
    assert tmp.is_file()
    return proc, tmp


def test_temporary_files_of_a_killed_writer_are_removed_at_the_next_start(tmp_path):
    out = tmp_path / "run"
    ckpts = out / "checkpoints"
    ckpts.mkdir(parents=True)
    killed, orphan = _start_writer(ckpts / "checkpoint-000000005.npz")
    alive, in_progress = _start_writer(ckpts / "checkpoint-000000006.npz")
    try:
        killed.send_signal(signal.SIGKILL)
        killed.wait(timeout=30)
        old = time.time() - 3600
        os.utime(in_progress, (old, old))  # old, but its writer still runs: kept
        foreign_old = ckpts / ".checkpoint-000000007.npz.otherhost.4242.tmp"
        foreign_new = ckpts / ".checkpoint-000000008.npz.otherhost.4243.tmp"
        for p in (foreign_old, foreign_new):
            p.write_bytes(b"y" * 100)
        os.utime(foreign_old, (old, old))
        future = time.time() + 3600  # being written on another host right now: kept
        os.utime(foreign_new, (future, future))
        summary_orphan = out / f".summary.json.{fileio._HOST}.999999999.tmp"  # PID gone
        summary_orphan.write_text("{")
        os.utime(summary_orphan, (old, old))

        done = _train(*FAST, "--out", out)
        assert done.returncode == 0, done.stderr
        for gone in (orphan, foreign_old, summary_orphan):
            assert not gone.exists()
            assert f"removed {gone} (left by a writer that was killed)" in done.stdout
        assert in_progress.exists() and foreign_new.exists()
    finally:
        for proc in (killed, alive):
            if proc.poll() is None:
                proc.kill()
            proc.wait(timeout=30)
            proc.stdout.close()
