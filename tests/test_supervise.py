"""Jobs are owned by their launcher and every end is explained (issue 11, items 5, 6, 7, 9).

Real ``mpiexec`` processes and real signals, 2 ranks, tiny work. Each rank of the scripts below
writes ``rank<r>.pid`` into a directory so a test can signal it or check that it is gone.
Budget on a loaded 2-core machine: ~2 min, most of it the default 45 s init timeout.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from distprop import launcher
from distprop.reaper import MPI_SHM_PREFIXES

from helpers import REPO, mpiexec_path

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
ENV.pop("DISTPROP_INIT_TIMEOUT", None)
ENV.pop("DISTPROP_STALL_TIMEOUT", None)
# tests/openmpi/run.sh runs this file under Open MPI, whose mpiexec differs where noted
OPEN_MPI = launcher.parse_version_output(launcher.version_output(mpiexec_path())) == "openmpi"

pytestmark = pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs /proc")

# argv: pid directory, "init" or "plain" (never calls dist.init()), seconds to run
WORKER = """
import os, sys, time
import numpy as np
rank = int(os.environ.get("PMI_RANK") or os.environ["OMPI_COMM_WORLD_RANK"])  # MPICH, Open MPI
if sys.argv[2] == "init":
    import distprop.distributed as dist
    comm = dist.init()
with open(os.path.join(sys.argv[1], f"rank{rank}.pid"), "w") as f:
    f.write(str(os.getpid()))
x = np.ones(4, dtype=np.float32)
end = time.monotonic() + float(sys.argv[3])
while time.monotonic() < end:
    if sys.argv[2] == "init":
        comm.allreduce(x)
    time.sleep(0.05)
"""


def alive(pid: int) -> bool:
    """The process exists and is not a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def children(pid: int) -> list[int]:
    """All descendants of ``pid`` (so a test can clean up after itself)."""
    found, todo = [], [pid]
    while todo:
        parent = todo.pop()
        for task in Path(f"/proc/{parent}/task").glob("*"):
            try:
                kids = [int(k) for k in (task / "children").read_text().split()]
            except OSError:
                continue
            found += kids
            todo += kids
    return found


def kill_all(pids) -> None:
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass


def run_owned(cmd, env=None, timeout: float = 60) -> subprocess.CompletedProcess:
    """``subprocess.run`` that also kills the launcher's descendants when it times out."""
    proc = subprocess.Popen([str(c) for c in cmd], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env or ENV, cwd=str(REPO))
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_all(children(proc.pid))
        proc.kill()
        out, err = proc.communicate()
        pytest.fail(f"{cmd} ran past {timeout} s:\n{out}\n{err}")
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def start(*args, env=None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "distprop", *map(str, args)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**ENV, **(env or {})}, cwd=str(REPO))


def launch_worker(tmp_path: Path, mode: str, seconds: float = 60) -> subprocess.Popen:
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    return start("launch", "-n", 2, "--", sys.executable, script, tmp_path, mode, seconds)


def wait_for_pids(proc: subprocess.Popen, directory: Path, count: int = 2,
                  timeout: float = 60) -> list[int]:
    deadline = time.monotonic() + timeout
    files = [directory / f"rank{r}.pid" for r in range(count)]
    while not all(f.exists() and f.read_text() for f in files):
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "the ranks did not start"
        time.sleep(0.05)
    return [int(f.read_text()) for f in files]


def train_pids(out: Path, proc: subprocess.Popen, timeout: float = 60) -> list[int]:
    """PIDs of the rank processes of ``distprop train --out OUT`` (found through /proc)."""
    needle = str(out).encode()  # the per-launch configuration file lies in --out
    deadline = time.monotonic() + timeout
    while True:
        found = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                cmd = (entry / "cmdline").read_bytes().split(b"\0")
                environ = (entry / "environ").read_bytes()
            except OSError:
                continue
            if any(arg.startswith(needle) for arg in cmd) and b"--worker-config" in cmd \
                    and (b"PMI_RANK=" in environ or b"OMPI_COMM_WORLD_RANK=" in environ) \
                    and b"hydra" not in cmd[0] and b"prte" not in cmd[0]:
                found.append(int(entry.name))
        if len(found) == 2 and (out / "checkpoints").exists():
            return found
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "the ranks did not start"
        time.sleep(0.1)


TRAIN_ARGS = ("--model", "mlp", "--dataset", "digits", "--batch-size", 8, "--log-every", 1000)


# --- item 5: the launcher dies, its ranks die ---------------------------------------------------


def mpi_shm_files() -> set[Path]:
    """MPI libraries' shared-memory files now in /dev/shm (distprop.reaper's list of names)."""
    return {p for p in Path("/dev/shm").glob("*")
            if str(p).startswith(MPI_SHM_PREFIXES)} if Path("/dev/shm").is_dir() else set()


@pytest.mark.parametrize("job", ["launch, ranks in dist.init()", "launch, plain processes",
                                 "train"])
def test_kill_9_of_the_launcher_ends_its_ranks(tmp_path, job):
    shm_before = mpi_shm_files()
    if job == "train":
        out = tmp_path / "run"
        proc = start("train", "-n", 2, *TRAIN_ARGS, "--epochs", 1000, "--out", out)
        pids = train_pids(out, proc)
    else:
        proc = launch_worker(tmp_path, "init" if "init" in job else "plain")
        pids = wait_for_pids(proc, tmp_path)
    spawned = children(proc.pid)
    try:
        time.sleep(0.5)
        assert all(alive(p) for p in pids)
        proc.kill()
        proc.communicate(timeout=30)
        deadline = time.monotonic() + 10
        while any(alive(p) for p in pids) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not [p for p in pids if alive(p)], "ranks outlived their launcher"
        # ... and left no MPI shared-memory file (Open MPI's sm_segment.*: the ranks and the
        # reaper remove those of a job that ends without MPI_Finalize)
        while any(alive(p) for p in spawned) and time.monotonic() < deadline + 10:
            time.sleep(0.1)
        assert not mpi_shm_files() - shm_before
    finally:
        kill_all(spawned + pids)


# --- item 6: a rank that dies before dist.init() --------------------------------------------------

DIES_BEFORE_INIT = """
import os
if (os.environ.get("PMI_RANK") or os.environ["OMPI_COMM_WORLD_RANK"]) == "1":
    os._exit(1)
import distprop.distributed as dist
dist.init().barrier()
print("DONE")
"""


# Open MPI ends the job as soon as a rank exits non-zero and names it ("Process name:
# [job,1]"): no rank waits for the init timeout, distprop names the rank from that report.
DEAD_BEFORE_INIT = [
    ("distprop launch", 60, ["distprop: rank(s) 1 never reached dist.init()",
                             "rank(s) 0 gave up waiting after 45 s (DISTPROP_INIT_TIMEOUT)"]),
    ("bare mpiexec, DISTPROP_INIT_TIMEOUT=5", 30,
     ["[rank 0] distprop: rank 0 waited 5 s for MPI initialisation (DISTPROP_INIT_TIMEOUT): "
      "some rank of the 2 did not arrive"]),
] if not OPEN_MPI else [
    ("distprop launch", 30, ["distprop: rank 1 exited with status 1 ", "reached dist.init()",
                             "the other ranks were stopped (exit code 1)"]),
    ("bare mpiexec, DISTPROP_INIT_TIMEOUT=5", 30, ["exited with non-zero status"]),
]


@pytest.mark.parametrize("how, limit, expected", DEAD_BEFORE_INIT)
def test_rank_dead_before_init_ends_the_job(tmp_path, how, limit, expected):
    script = tmp_path / "dies.py"
    script.write_text(DIES_BEFORE_INIT)
    if how == "distprop launch":
        cmd = [sys.executable, "-m", "distprop", "launch", "-n", "2", "--", sys.executable,
               str(script)]
        env = ENV
    else:
        cmd = [mpiexec_path(), "-n", "2", sys.executable, str(script)]
        env = {**ENV, "DISTPROP_INIT_TIMEOUT": "5"}
    shm_before = set(Path("/dev/shm").glob("mpich_shm_*"))
    t0 = time.monotonic()
    done = run_owned(cmd, env=env, timeout=limit + 30)
    elapsed = time.monotonic() - t0
    assert done.returncode == 1, done.stdout + done.stderr
    assert elapsed < limit, elapsed
    assert "DONE" not in done.stdout
    for text in expected:
        assert text in done.stderr, done.stderr
    # the rank that waited inside MPI_Init removes MPICH's start-up file before it exits
    assert not set(Path("/dev/shm").glob("mpich_shm_*")) - shm_before


def test_init_timeout_must_be_a_number():
    done = run_owned([mpiexec_path(), "-n", "2", sys.executable, "-c",
                      "import distprop.distributed as d; d.init()"],
                     env={**ENV, "DISTPROP_INIT_TIMEOUT": "soon"})
    assert done.returncode != 0
    assert "DISTPROP_INIT_TIMEOUT must be a number of seconds (0 disables), got 'soon'" \
        in done.stderr


# --- item 7: sys.exit(n) on one rank -------------------------------------------------------------

EXITS = """
import sys, time
import distprop.distributed as dist
comm = dist.init()
if comm.rank == 1:
    time.sleep(0.5)  # rank 0 is waiting in the barrier by then
    sys.exit(3)
comm.barrier()
print("DONE")
"""


def test_sys_exit_on_one_rank_aborts_the_job_with_its_status(tmp_path):
    script = tmp_path / "exits.py"
    script.write_text(EXITS)
    t0 = time.monotonic()
    done = run_owned([sys.executable, "-m", "distprop", "launch", "-n", "2", "--",
                      sys.executable, script], timeout=90)
    assert done.returncode == 3, done.stdout + done.stderr
    assert time.monotonic() - t0 < 30  # not the 600 s stall watchdog
    assert "DONE" not in done.stdout
    assert "[rank 1] rank 1 of 2 is leaving with status 3 (sys.exit) while other ranks are " \
        "still running; aborting the job (MPI_Abort(3))" in done.stderr
    assert "distprop: rank 1 (PID " in done.stderr
    assert "exited with status 3 while other ranks were running" in done.stderr


def test_sys_exit_on_every_rank_keeps_its_status_without_an_abort(tmp_path):
    """All ranks leaving together (a usage error seen by each) finalise normally."""
    done = run_owned([mpiexec_path(), "-n", "2", sys.executable, "-c",
                      "import sys, distprop.distributed as d; d.init(); sys.exit(2)"])
    assert done.returncode == 2, done.stdout + done.stderr
    assert "MPI_Abort" not in done.stdout + done.stderr


# --- item 9: a rank killed by a signal; the launcher killed by a signal -------------------------


@pytest.mark.parametrize("sig, code", [(signal.SIGKILL, 137), (signal.SIGSEGV, 139),
                                       (signal.SIGTERM, 143)])
def test_rank_killed_by_a_signal_is_named(tmp_path, sig, code):
    proc = launch_worker(tmp_path, "init")
    pids = wait_for_pids(proc, tmp_path)
    spawned = children(proc.pid)
    try:
        time.sleep(0.3)
        os.kill(pids[1], sig)
        _, err = proc.communicate(timeout=60)
    finally:
        kill_all(spawned + pids)
    # Hydra's report names the killed rank 1 with its signal, or (on a loaded machine) a rank
    # it stopped afterwards: then the lifelines' order names rank 1 as the first death, or,
    # when the launcher saw both drops at once, both ranks with the order unknown
    line = [x for x in err.splitlines() if x.startswith("distprop: rank")]
    assert line and f"rank 1 (PID {pids[1]} on " in line[0], err
    name = signal.Signals(sig).name
    plain = f"distprop: rank 1 (PID {pids[1]} on " in line[0] and \
        f"was killed by {name} (signal {int(sig)})" in line[0]
    if plain:
        assert proc.returncode == code, err
    else:
        assert ("died first (killed by a signal" in line[0]
                or "which of them died first is unknown" in line[0]), err
    assert f"(exit code {proc.returncode})" in line[0], err


def test_train_rank_killed_by_sigkill_says_how_to_resume(tmp_path):
    out = tmp_path / "run"
    proc = start("train", "-n", 2, *TRAIN_ARGS, "--epochs", 1000, "--out", out)
    pids = train_pids(out, proc)
    spawned = children(proc.pid)
    try:
        victim = pids[0]
        os.kill(victim, signal.SIGKILL)
        _, err = proc.communicate(timeout=60)
    finally:
        kill_all(spawned + pids)
    assert proc.returncode == 137, err
    line = [x for x in err.splitlines() if x.startswith("distprop: rank ")]
    assert len(line) == 1, err
    assert f"(PID {victim} on " in line[0] and "killed by SIGKILL (signal 9)" in line[0]
    assert f"with --resume auto to continue from the last checkpoint in {out}" in line[0]


@pytest.mark.parametrize("sig, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_launcher_stopped_by_a_signal_forwards_it_and_exits_128_plus(tmp_path, sig, code):
    proc = launch_worker(tmp_path, "init")
    pids = wait_for_pids(proc, tmp_path)
    spawned = children(proc.pid)
    try:
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=30)
        deadline = time.monotonic() + 10
        while any(alive(p) for p in pids) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not [p for p in pids if alive(p)]
    finally:
        kill_all(spawned + pids)
    assert proc.returncode == code, err
    assert f"distprop: received {signal.Signals(sig).name}; forwarded it" in err


# --- the control channel and the output pass-through ---------------------------------------------

RANK_SIDE = """
import mmap, os, time
from distprop.distributed import lifeline
paths = [p for p in os.environ.get("TEST_MAP_FILES", "").split(":") if p]
maps = [mmap.mmap(os.open(p, os.O_RDWR), 4096) for p in paths]  # as MPI maps its segments
line = lifeline.connect()
assert line is not None
line.report("ready", size=2)
time.sleep(30)
"""


def test_control_channel_needs_the_token_and_a_rank_exits_when_its_launcher_is_gone():
    """... and removes the MPI shared-memory files it maps (the job ends without
    MPI_Finalize), never a file of another name."""
    from distprop import control_channel
    from distprop.distributed.lifeline import Lifeline

    tag = f"distprop-test-{os.getpid()}-lifeline"
    mpi_file, other = Path(f"/dev/shm/sm_segment.{tag}.1"), Path(f"/dev/shm/{tag}-data")
    for path in (mpi_file, other):
        path.write_bytes(bytes(4096))

    sup = control_channel.Supervisor(local=False).start()  # every interface, by host name
    try:
        host, port, token = sup.env()[control_channel.ENV_VAR].rsplit(":", 2)
        with pytest.raises(OSError, match="unexpected reply"):
            Lifeline(f"{host}:{port}:not-the-token", rank=0, size=2)
        assert sup.ranks == {}
        env = {**ENV, **sup.env(), "PMI_RANK": "1", "PMI_SIZE": "2",
               "TEST_MAP_FILES": f"{mpi_file}:{other}"}
        proc = subprocess.Popen([sys.executable, "-c", RANK_SIDE], stderr=subprocess.PIPE,
                                text=True, env=env, cwd=str(REPO))
        deadline = time.monotonic() + 30
        while not (1 in sup.ranks and sup.ranks[1].ready):
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
            time.sleep(0.05)
        assert sup.ranks[1].pid == proc.pid and sup.ranks[1].size == 2
    finally:
        sup.close()
    try:
        _, err = proc.communicate(timeout=15)
    finally:
        proc.kill()
        mpi_existed, other_existed = mpi_file.exists(), other.exists()
        mpi_file.unlink(missing_ok=True)
        other.unlink(missing_ok=True)
    assert proc.returncode == 1, err
    assert f"[rank 1] distprop: the launcher (distprop at {host}:{port}) is gone" in err
    assert not mpi_existed, "the rank left its MPI segment behind"
    assert other_existed, "a file that is not an MPI segment was removed"


def test_launch_output_into_a_closed_pipe_ends_the_job():
    """``distprop launch ... | head -1`` ends like the bare launcher would: SIGPIPE (141) under
    MPICH; Open MPI's mpiexec catches SIGPIPE and exits 1 ("SIGPIPE detected - aborting")."""
    reader = subprocess.Popen(["head", "-n", "1"], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE)
    proc = subprocess.Popen([sys.executable, "-m", "distprop", "launch", "-n", "2", "--",
                             sys.executable, "-c",
                             "import time\nwhile True:\n print('x' * 100, flush=True)\n "
                             "time.sleep(0.001)"],
                            stdout=reader.stdin, stderr=subprocess.PIPE, env=ENV, cwd=str(REPO))
    reader.stdin.close()
    spawned = []
    try:
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and proc.poll() is None:
            spawned = children(proc.pid) or spawned
            time.sleep(0.1)
        proc.communicate(timeout=30)
    finally:
        kill_all(spawned)
        proc.kill()
    first = reader.stdout.read()
    # one line of the ranks' x's (MPI's launcher may splice two ranks' lines into one)
    assert first.endswith(b"\n") and len(first) >= 101 and set(first[:-1]) == {ord("x")}, first
    reader.wait(timeout=5)
    assert proc.returncode == (1 if OPEN_MPI else 128 + signal.SIGPIPE)


HYDRA_BANNER = b"""partial rank output without a newline
===================================================================================
=   BAD TERMINATION OF ONE OF YOUR APPLICATION PROCESSES
=   PID 5477 RUNNING AT node-7.cluster
=   EXIT CODE: 9
=   CLEANING UP REMAINING PROCESSES
=   YOU CAN IGNORE THE BELOW CLEANUP MESSAGES
===================================================================================
YOUR APPLICATION TERMINATED WITH THE EXIT STRING: Killed (signal 9)
This typically refers to a problem with your application.
"""


@pytest.mark.parametrize("chunk", [1, 7, 64, len(HYDRA_BANNER)])
def test_hydra_banner_is_passed_through_and_read_whatever_the_chunking(chunk):
    from distprop import supervise

    source_r, source_w = os.pipe()
    sink_r, sink_w = os.pipe()
    with os.fdopen(source_r, "rb", buffering=0) as stream:
        copier = supervise.OutputCopier(stream, sink_w).start()
        for i in range(0, len(HYDRA_BANNER), chunk):
            os.write(source_w, HYDRA_BANNER[i:i + chunk])
            time.sleep(0.001 if chunk < 8 else 0)
        os.close(source_w)
        copier.join(10)
    os.close(sink_w)
    with os.fdopen(sink_r, "rb") as sink:
        assert sink.read() == HYDRA_BANNER
    assert copier.banner == supervise.Banner(pid=5477, host="node-7.cluster", exit_code=9,
                                             signal=9)
