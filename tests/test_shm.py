"""Node-shared gradient buffers (issue 13, items 1 and 5): DDP with ``comm='shm'``.

Real ``mpiexec`` on one node: 2 and 3 ranks give the parameters of one process on the global
batch (float64 to 1e-12, float32 to 1e-6), the same bits on every rank, and on 2 ranks the same
bits as MPI's allreduce; bad choices are refused with one line; a rank stopped or killed in the
middle of a reduction ends the job naming it; and no ``/dev/shm`` file outlives a job, killed or
not.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest

from helpers import REPO, mpiexec_path, run_mpi

# One mpiexec run per rank count: every row trains the same MLP the same way, with DDP over
# shared memory (and, for the bit-for-bit comparison, over MPI), against one process.
EQUIVALENCE = """
import json, sys, zlib
sys.path.insert(0, "tests")
from ddp_common import *
from distprop.distributed import shm

calls = [0]  # buckets reduced through the node-shared window (not merely allocated there)
_ireduce = shm.ShmReducer.ireduce
def counting_ireduce(self, k):
    calls[0] += 1
    return _ireduce(self, k)
shm.ShmReducer.ireduce = counting_ireduce

def crc(model):
    return zlib.crc32(b"".join(p.data.tobytes() for p in model.parameters()))

rows = []
for name, dtype, kw, accum, opt in [
    ("f64-overlap", np.float64, {}, 1, "sgd"),
    ("f64-no-overlap", np.float64, {"overlap": False}, 1, "adam"),
    ("f64-buckets-accum", np.float64, {"bucket_cap_mb": 0.002, "first_bucket_mb": 0.0005}, 2,
     "sgd"),
    ("f32-buckets", np.float32, {"bucket_cap_mb": 0.002, "first_bucket_mb": 0.0005}, 1, "adam"),
]:
    x, y = make_data(48, dtype=dtype)
    calls[0] = 0
    net, _ = train(mlp(0, dtype, hidden=60), x, y, steps=8, batch=12, opt=opt, accum=accum,
                   ddp_kwargs={"comm": "shm", **kw})
    shm_calls = calls[0]
    via_mpi, _ = train(mlp(0, dtype, hidden=60), x, y, steps=8, batch=12, opt=opt, accum=accum,
                       ddp_kwargs={"comm": "mpi", **kw})
    ref = mlp(0, dtype, hidden=60)
    train(ref, x, y, steps=8, batch=12, opt=opt, accum=accum)
    scale = max(float(np.abs(p.data).max()) for p in ref.parameters())
    rows.append({"name": name, "shm": net._reducer is not None and shm_calls > 0,
                 "buckets": len(net.buckets), "rel": max_diff(net.parameters(),
                 [p.data for p in ref.parameters()]) / scale, "crc": crc(net),
                 "crc_mpi": crc(via_mpi)})
refusals = []
for kw in ({"comm": "shm", "compression": "fp16"},):
    try:
        DDP(mlp(0, np.float32), **kw)
    except ValueError as exc:
        refusals.append(str(exc))
sys.stdout.write(json.dumps({"rank": rank, "rows": rows, "refusals": refusals}) + chr(10))
sys.stdout.flush()
"""


@pytest.mark.parametrize("nprocs", [2, 3])
def test_shm_matches_one_process_and_is_the_same_on_every_rank(nprocs):
    done = run_mpi(EQUIVALENCE, nprocs=nprocs, timeout=150)
    assert done.returncode == 0, done.stdout + done.stderr
    decoder = json.JSONDecoder()  # one object per rank (lines of ranks may run together)
    ranks = [decoder.raw_decode(done.stdout, m.start())[0]
             for m in re.finditer(r'\{"rank"', done.stdout)]
    assert sorted(r["rank"] for r in ranks) == list(range(nprocs))
    by_name = {}
    for r in ranks:
        for row in r["rows"]:
            by_name.setdefault(row["name"], []).append(row)
        assert r["refusals"] == ["comm='shm' (node-shared gradient buffers): "
                                 "compression='fp16' is not supported with it"]
    for name, rows in by_name.items():
        assert all(row["shm"] for row in rows), (name, rows)
        tol = 1e-6 if name.startswith("f32") else 1e-12
        assert max(row["rel"] for row in rows) < tol, (name, rows)
        assert len({row["crc"] for row in rows}) == 1, (name, rows)  # same bits on every rank
        if nprocs == 2:  # g0 + g1 either way: the same bits as MPI's allreduce
            assert rows[0]["crc"] == rows[0]["crc_mpi"], (name, rows)
    assert by_name["f64-buckets-accum"][0]["buckets"] >= 3


def test_a_bad_intra_node_choice_is_one_line():
    done = run_mpi("import distprop as dp\nfrom distprop import nn\ndp.distributed.init()\n"
                   "dp.distributed.DistributedDataParallel(nn.Linear(2, 2))",
                   nprocs=2, timeout=60, env={"DISTPROP_INTRA_NODE": "fast"})
    assert done.returncode != 0
    assert ("ValueError: intra-node reduction must be one of auto, shm, mpi, got 'fast' "
            "(DISTPROP_INTRA_NODE or comm=)") in done.stderr


# Rank 1 stops or dies inside backward after its first bucket went out, while rank 0 is
# reducing or waiting for it. argv: "kill" | "stop" | "none".
FAULT = """
import json, os, signal, sys
sys.path.insert(0, "tests")
from ddp_common import *
def mapped():
    with open("/proc/self/maps") as f:
        return sorted({l.split(maxsplit=5)[5].strip() for l in f
                       if len(l.split(maxsplit=5)) == 6 and "/dev/shm/" in l})
x, y = make_data(48, dtype=np.float32)
model = mlp(0, np.float32, hidden=200)
net = DDP(model, comm="shm", bucket_cap_mb=0.01, first_bucket_mb=0.005)
say(json.dumps({"pid": os.getpid(), "maps": mapped()}))
mode = sys.argv[1]
step = [0]
def hook(p):
    if rank == 1 and step[0] == 3 and mode != "none":
        os.kill(os.getpid(), signal.SIGKILL if mode == "kill" else signal.SIGSTOP)
model[0].weight.register_post_accumulate_grad_hook(hook)
opt = dp.optim.SGD(net.parameters(), lr=0.1)
for step[0] in range(6):
    opt.zero_grad()
    ((net(dp.tensor(x[rank::world])) - dp.tensor(y[rank::world])) ** 2).mean().backward()
    opt.step()
say("finished")
"""


def _start(argv, env=None):
    full = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1",
            "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", **(env or {})}
    return subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=full, cwd=str(REPO), start_new_session=True)


def _finish(proc, timeout):
    try:
        return proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)  # the session of this test's own job
            proc.wait(timeout=10)


def _reported(out: str) -> tuple[dict, list[str]]:
    pids, paths = {}, set()
    for m in re.finditer(r"rank (\d+): (\{.*\})", out):
        info = json.loads(m.group(2))
        pids[int(m.group(1))] = info["pid"]
        paths.update(p.strip().removesuffix(" (deleted)") for p in info["maps"])
    return pids, sorted(paths)


@pytest.mark.parametrize("mode", ["none", "kill"])
def test_no_shared_memory_file_outlives_the_job(tmp_path, mode):
    """Normal exit and SIGKILL mid-reduction under ``distprop launch``: the job ends naming the
    killed rank, and none of the /dev/shm files the ranks mapped is left."""
    script = tmp_path / "fault.py"
    script.write_text(FAULT)
    began = time.monotonic()
    proc = _start([sys.executable, "-m", "distprop", "launch", "-n", "2", "--", sys.executable,
                   str(script), mode])
    out, err = _finish(proc, 90)
    pids, paths = _reported(out)
    assert sorted(pids) == [0, 1], out + err
    assert any(p.startswith("/dev/shm/mpich") for p in paths), paths  # the check sees them
    if mode == "none":
        assert proc.returncode == 0, out + err
        assert out.count("finished") == 2
    else:
        # the launcher (exit 137) or rank 0's own check (MPI_Abort(1)) names it first
        assert proc.returncode in (1, 137), out + err
        assert "finished" not in out
        assert re.search(rf"rank 1 \(PID {pids[1]}\b.*(killed by SIGKILL|died)", err), err
        assert time.monotonic() - began < 60
    left = [p for p in paths if os.path.exists(p)]
    assert not left, f"left in /dev/shm after the job: {left}"


def test_a_stopped_rank_is_named_by_the_stall_watchdog():
    """Rank 1 stops (SIGSTOP) mid-backward: rank 0 waits on a shared-memory flag, and the
    stall watchdog (DISTPROP_STALL_TIMEOUT=2) ends the job naming rank 1 and the flag."""
    proc = _start([mpiexec_path(), "-n", "2", sys.executable, "-c", FAULT, "stop"],
                  env={"DISTPROP_STALL_TIMEOUT": "2"})
    out, err = _finish(proc, 90)  # rank 0's MPI_Abort ends the stopped rank too (SIGKILL)
    assert proc.returncode != 0, out + err
    line = [x for x in err.splitlines() if x.startswith("[rank 0] stall watchdog:")]
    assert len(line) == 1, err
    assert re.search(r"in collective 'shm gradient sync, bucket \d+: no '(ready|done)' flag "
                     r"from rank\(s\) 1'", line[0]), line[0]



def test_a_dead_or_zombie_peer_is_seen_as_dead():
    """The wait's liveness check (a local rank that died ends the job at once): a running
    process is alive; killed but not yet reaped (a zombie) or reaped, it is not."""
    from distprop.distributed.shm import _alive

    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        assert _alive(child.pid)
        os.kill(child.pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while _alive(child.pid) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert not _alive(child.pid)  # a zombie: dead, not reaped yet
    finally:
        child.kill()
        child.wait(timeout=10)
    assert not _alive(child.pid)  # reaped: no such process
