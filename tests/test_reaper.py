"""distprop/reaper.py, the process between distprop and Open MPI's prterun (no MPI needed).

A stand-in launcher behaves like prterun at its worst: it starts its "ranks" in their own
process groups, takes a second SIGTERM as "exit now" without stopping them, and reports each
signal it got. Real processes and signals; each case takes a few seconds at most.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from distprop.supervise import reaper_path

pytestmark = pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs /proc")

# A "rank": maps the files named in TEST_MAP_FILES (colon-separated), as MPI ranks map their
# shared-memory segments, then sleeps.
RANK = """
import mmap, os, time
paths = [p for p in os.environ.get("TEST_MAP_FILES", "").split(":") if p]
maps = [mmap.mmap(os.open(p, os.O_RDWR), 4096) for p in paths]
time.sleep(60)
"""

# argv: pid file directory. Starts 2 "ranks" (own process groups, like prterun's), writes their
# PIDs; SIGTERM: the first one stops the ranks after 1 s, a second one exits at once without.
LAUNCHER = r"""
import os, signal, subprocess, sys, time
RANK = '''{rank}'''
d = sys.argv[1]
got = []
def on_term(signum, frame):
    got.append(signum)
    open(os.path.join(d, "signals"), "a").write(f"{signum}\n")
    if len(got) > 1:
        os._exit(1)  # like prterun's "abort is in progress": the ranks are left running
# Handlers first: the test signals as soon as the "ranks" file appears.
signal.signal(signal.SIGTERM, on_term)
signal.signal(signal.SIGUSR1, on_term)
ranks = [subprocess.Popen([sys.executable, "-c", RANK], preexec_fn=os.setpgrp)
         for _ in range(2)]
open(os.path.join(d, "ranks.tmp"), "w").write(" ".join(str(r.pid) for r in ranks))
os.rename(os.path.join(d, "ranks.tmp"), os.path.join(d, "ranks"))  # never read half-written
deadline = time.monotonic() + 60
while time.monotonic() < deadline:
    if got:
        time.sleep(1.0)  # an orderly stop takes a while
        for r in ranks:
            r.kill()
        sys.exit(143 if got[0] == signal.SIGTERM else 3)
    time.sleep(0.05)
"""


def alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def start(tmp_path: Path, argv=None):
    script = tmp_path / "launcher.py"
    script.write_text(LAUNCHER.replace("{rank}", RANK))
    reader, writer = os.pipe()
    proc = subprocess.Popen([sys.executable, "-I", reaper_path(), str(reader), "--",
                             *(argv or [sys.executable, str(script), str(tmp_path)])],
                            pass_fds=(reader,), start_new_session=True)
    os.close(reader)
    ranks = tmp_path / "ranks"
    deadline = time.monotonic() + 30
    while argv is None and not (ranks.exists() and ranks.read_text()):
        assert time.monotonic() < deadline and proc.poll() is None
        time.sleep(0.05)
    pids = [int(p) for p in ranks.read_text().split()] if argv is None else []
    return proc, writer, pids


def signals(tmp_path: Path) -> list[int]:
    f = tmp_path / "signals"
    return [int(s) for s in f.read_text().split()] if f.exists() else []


def kill_quietly(pids) -> None:
    for p in pids:
        try:
            os.kill(p, signal.SIGKILL)
        except OSError:
            pass


def launcher_exits_without_its_ranks(proc) -> None:
    """Two SIGTERMs to the stand-in launcher under the reaper ``proc``: it exits at the second
    without stopping its ranks, and the reaper ends with its status, 1."""
    launcher = [int(p) for p in Path(f"/proc/{proc.pid}/task/{proc.pid}/children")
                .read_text().split()][0]
    os.kill(launcher, signal.SIGTERM)
    time.sleep(0.2)
    os.kill(launcher, signal.SIGTERM)
    assert proc.wait(timeout=20) == 1


def test_dead_parent_sends_one_sigterm_and_stops_what_the_launcher_leaves(tmp_path):
    proc, writer, pids = start(tmp_path)
    try:
        assert all(alive(p) for p in pids)
        os.close(writer)  # distprop died (also what SIGKILL does to it)
        proc.wait(timeout=20)
        deadline = time.monotonic() + 5
        while any(alive(p) for p in pids) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not [p for p in pids if alive(p)]
        assert signals(tmp_path) == [signal.SIGTERM]  # once, never the fatal second one
    finally:
        kill_quietly(pids)


def test_orphans_are_stopped_when_the_launcher_exits_without_them(tmp_path):
    """The stand-in exits at a second SIGTERM sent to it directly, leaving its ranks."""
    proc, writer, pids = start(tmp_path)
    try:
        launcher_exits_without_its_ranks(proc)
        deadline = time.monotonic() + 5
        while any(alive(p) for p in pids) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not [p for p in pids if alive(p)], "the reaper left the orphans running"
    finally:
        os.close(writer)
        kill_quietly(pids)


@pytest.mark.parametrize("sig, code", [(signal.SIGTERM, 143), (signal.SIGUSR1, 3)])
def test_signals_are_passed_on_and_the_status_comes_back(tmp_path, sig, code):
    proc, writer, pids = start(tmp_path)
    try:
        proc.send_signal(sig)
        assert proc.wait(timeout=20) == code
        assert signals(tmp_path) == [sig]
    finally:
        os.close(writer)


@pytest.mark.parametrize("argv, code", [
    (["sh", "-c", "exit 7"], 7),
    (["sh", "-c", "kill -9 $$"], -signal.SIGKILL),  # killed: the reaper dies the same way
])
def test_exit_status_is_the_launchers(tmp_path, argv, code):
    proc, writer, _ = start(tmp_path, argv)
    try:
        assert proc.wait(timeout=20) == code
    finally:
        os.close(writer)


def _maps(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/maps").read_text()
    except OSError:
        return ""


@pytest.mark.parametrize("ending", ["distprop dies", "the launcher exits without its ranks"])
def test_mpi_shared_memory_files_of_an_ended_job_are_removed(tmp_path, monkeypatch, ending):
    """The stand-in's ranks map an Open MPI-named segment and a file of another name in
    /dev/shm; after the reaper stopped them, the first is gone and the second is untouched."""
    if not Path("/dev/shm").is_dir():
        pytest.skip("no /dev/shm")
    tag = f"distprop-test-{os.getpid()}-{len(ending)}"
    mpi_file = Path(f"/dev/shm/sm_segment.{tag}.0")
    other = Path(f"/dev/shm/{tag}-data")
    for path in (mpi_file, other):
        path.write_bytes(bytes(4096))
    monkeypatch.setenv("TEST_MAP_FILES", f"{mpi_file}:{other}")
    proc, writer, pids = start(tmp_path)
    try:
        deadline = time.monotonic() + 20
        while not all(str(mpi_file) in _maps(p) for p in pids):
            assert time.monotonic() < deadline, "the ranks did not map the files"
            time.sleep(0.05)
        if ending == "distprop dies":
            os.close(writer)
            writer = None
            proc.wait(timeout=20)
        else:
            launcher_exits_without_its_ranks(proc)
        assert not [p for p in pids if alive(p)]
        assert not mpi_file.exists(), "the ended job's MPI segment was left in /dev/shm"
        assert other.exists(), "a file that is not an MPI segment was removed"
    finally:
        if writer is not None:
            os.close(writer)
        kill_quietly(pids)
        for path in (mpi_file, other):
            path.unlink(missing_ok=True)


def test_a_job_that_ends_normally_keeps_its_files(tmp_path):
    """No orphans, no stop: the reaper removes nothing (a finished MPI job cleans up itself)."""
    mpi_file = Path(f"/dev/shm/sm_segment.distprop-test-{os.getpid()}.normal")
    mpi_file.write_bytes(bytes(4096))
    script = (f"import mmap, os; m = mmap.mmap(os.open({str(mpi_file)!r}, os.O_RDWR), 4096); "
              "raise SystemExit(0)")
    try:
        proc, writer, _ = start(tmp_path, [sys.executable, "-c", script])
        try:
            assert proc.wait(timeout=20) == 0
        finally:
            os.close(writer)
        assert mpi_file.exists()
    finally:
        mpi_file.unlink(missing_ok=True)


def test_usage():
    done = subprocess.run([sys.executable, "-I", reaper_path(), "3"], capture_output=True,
                          text=True, timeout=30)
    assert done.returncode == 2 and "usage: reaper.py FD -- COMMAND" in done.stderr
