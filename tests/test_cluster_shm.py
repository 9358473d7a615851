"""Hierarchical allreduce over node-shared buffers (issue 13, items 3 and 5) on the emulated
two-host cluster of ``tests/test_cluster.py``: 2 hosts x 2 ranks, DDP with ``comm='shm'``.

Each host's two ranks reduce in their shared window, the slices cross hosts by MPI (TCP over the
emulated link) among the ranks with the same local rank, and every rank ends with the
parameters of one process on the global batch, the same bits on all four. Needs root (skipped
otherwise, like test_cluster.py). Budget: ~20 s.
"""

from __future__ import annotations

import json
import re
import sys
import textwrap
from pathlib import Path

import pytest

from helpers import REPO, mpiexec_path

sys.path.insert(0, str(Path(__file__).resolve().parent / "cluster"))
import netcluster

_REASON = netcluster.missing_requirements()
pytestmark = pytest.mark.skipif(_REASON is not None, reason=str(_REASON))


@pytest.fixture(scope="module")
def cluster():
    c = netcluster.Cluster.private(("hosta", "hostb"))
    try:
        c.up()
        yield c
    finally:
        c.down()


SCRIPT = """
import json, sys, zlib
sys.path.insert(0, "tests")
from ddp_common import *
from mpi4py import MPI
result = {"rank": rank, "host": MPI.Get_processor_name()}
for name, dtype, opt, kw in (  # (Adam magnifies float32 rounding past 1e-6, also over MPI)
    ("f64", np.float64, "adam", {}),
    ("f32-buckets", np.float32, "sgd", {"bucket_cap_mb": 0.004, "first_bucket_mb": 0.002}),
):
    x, y = make_data(48, dtype=dtype)
    net, _ = train(mlp(0, dtype, hidden=300), x, y, steps=6, batch=12, opt=opt,
                   ddp_kwargs={"comm": "shm", **kw})
    via_mpi, _ = train(mlp(0, dtype, hidden=300), x, y, steps=6, batch=12, opt=opt,
                       ddp_kwargs={"comm": comm, **kw})
    ref = mlp(0, dtype, hidden=300)
    train(ref, x, y, steps=6, batch=12, opt=opt)
    scale = max(float(np.abs(p.data).max()) for p in ref.parameters())
    red = net._reducer
    result[name] = {
        "rel": max_diff(net.parameters(), [p.data for p in ref.parameters()]) / scale,
        "rel_mpi": max_diff(via_mpi.parameters(), [p.data for p in ref.parameters()]) / scale,
        "crc": zlib.crc32(b"".join(p.data.tobytes() for p in net.parameters())),
        "nodes": None if red is None else red.nodes, "local": None if red is None else red.L,
        "buckets": len(net.buckets)}
result["bytes"] = sum(p.data.nbytes for p in net.parameters())
sys.stdout.write(json.dumps(result) + chr(10))
sys.stdout.flush()
"""


def test_hierarchical_shm_allreduce_matches_one_process_across_hosts(cluster):
    env = {**cluster.mpi_env(), "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1",
           "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}
    before = cluster.counters()
    done = cluster.run("hosta", [mpiexec_path(), "-n", "4", "-hosts", "hosta:2,hostb:2",
                                 sys.executable, "-c", textwrap.dedent(SCRIPT)],
                       timeout=120, env=env, check=False, cwd=str(REPO))
    assert done.returncode == 0, done.stdout + done.stderr
    decoder = json.JSONDecoder()
    rows = [decoder.raw_decode(done.stdout, m.start())[0]
            for m in re.finditer(r'\{"rank"', done.stdout)]
    assert sorted(r["rank"] for r in rows) == [0, 1, 2, 3]
    assert sorted(r["host"] for r in rows) == ["hosta", "hosta", "hostb", "hostb"]
    for name, tol in (("f64", 1e-12), ("f32-buckets", 1e-6)):
        got = [r[name] for r in rows]
        assert all(g["nodes"] == 2 and g["local"] == 2 for g in got), got  # hierarchical path
        assert max(g["rel"] for g in got) < tol, [(g["rel"], g["rel_mpi"]) for g in got]
        assert len({g["crc"] for g in got}) == 1, got  # the same bits on every rank
    assert rows[0]["f32-buckets"]["buckets"] >= 3
    received_b = cluster.counters()["hostb"][1] - before["hostb"][1]
    # each step, hostb's two ranks receive their slices' sums from hosta: >= half the gradient
    assert received_b > 6 * rows[0]["bytes"] / 2, (received_b, rows[0]["bytes"])
