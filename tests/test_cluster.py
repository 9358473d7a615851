"""Multi-host runs on an emulated cluster (issue 12, section 1): two hosts, TCP between them.

``tests/cluster/netcluster.py`` builds hosts ``hosta`` and ``hostb`` (network + UTS namespaces,
one ``eth0`` each on a bridge, 198.18.0.0/24) and removes them at the end, also when a test fails.
Every command runs on ``hosta`` (the "login node"); MPICH's Hydra reaches both hosts through the
ssh stand-in ``tests/cluster/hostexec`` and MPI traffic is forced onto TCP over ``eth0``. Needs
root, ``ip``, ``nsenter``, ``unshare``, ``tc``; skipped otherwise. Budget: ~1.5 min.
"""

from __future__ import annotations

import json
import os
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

PRIVATE = "/tmp/distprop-cluster-out"  # each host sees its own directory here


@pytest.fixture(scope="module")
def cluster():
    c = netcluster.Cluster.private(("hosta", "hostb"))
    try:
        c.up()
        yield c
    finally:
        c.down()


def env(cluster, **extra) -> dict:
    return {**cluster.mpi_env(), "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1",
            "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", **extra}


def on_a(cluster, argv, timeout=120, **extra):
    """Run ``argv`` on hosta (cwd: the repository); returns the CompletedProcess."""
    return cluster.run("hosta", argv, timeout=timeout, env=env(cluster, **extra), check=False,
                       cwd=str(REPO))


def distprop(cluster, *args, timeout=120, **extra):
    return on_a(cluster, [sys.executable, "-m", "distprop", *map(str, args)], timeout=timeout,
                **extra)


# 10 DDP steps of a small float64 MLP (exact match with one process on the global batches),
# then 2 steps of a wide one (~40k parameters, 0.3 MB of gradient per step) for the byte count.
DDP_SCRIPT = """
import json, sys
sys.path.insert(0, "tests")
from ddp_common import *
from mpi4py import MPI
x, y = make_data(48)
result = {"rank": rank, "host": MPI.Get_processor_name()}
for name, hidden, steps in (("small", 16, 10), ("wide", 4000, 2)):
    net, _ = train(mlp(0, hidden=hidden), x, y, steps=steps, batch=12, ddp_kwargs={})
    ref = mlp(0, hidden=hidden)
    train(ref, x, y, steps=steps, batch=12)
    scale = max(float(np.abs(p.data).max()) for p in ref.parameters())
    result[name] = max_diff(net.parameters(), [p.data for p in ref.parameters()]) / scale
result["bytes"] = sum(p.data.nbytes for p in ref.parameters())
print(json.dumps(result), flush=True)
"""


@pytest.mark.parametrize("per_host", [1, 2], ids=["2x1", "2x2"])
def test_ddp_across_hosts_matches_one_process_and_crosses_the_link(cluster, per_host):
    before = cluster.counters()
    n = 2 * per_host
    done = on_a(cluster, [mpiexec_path(), "-n", n, "-hosts", f"hosta:{per_host},hostb:{per_host}",
                          sys.executable, "-c", textwrap.dedent(DDP_SCRIPT)], timeout=150)
    assert done.returncode == 0, done.stdout + done.stderr
    rows = [json.loads(m) for m in re.findall(r"\{[^{}]*\}", done.stdout)]
    assert sorted(r["rank"] for r in rows) == list(range(n))
    hosts = {r["rank"]: r["host"] for r in rows}
    assert sorted(hosts.values()) == ["hosta"] * per_host + ["hostb"] * per_host
    assert max(r["small"] for r in rows) < 1e-12, rows
    assert max(r["wide"] for r in rows) < 1e-12, rows
    after = cluster.counters()
    received_b = after["hostb"][1] - before["hostb"][1]
    # An allreduce of B bytes between two hosts moves at least B/2 each way per step.
    assert received_b > 2 * rows[0]["bytes"] / 2, (received_b, rows[0]["bytes"])


def test_train_with_host_list_and_resume_on_unshared_disks(cluster):
    """``--out`` is a different directory on each host: rank 0 writes the checkpoints; on resume
    rank 0 reads the newest one and sends the state to every rank over MPI."""
    out = f"{PRIVATE}/run"
    args = ("train", "-H", "hosta:1,hostb:1", "-n", 2, "--threads-per-rank", 1, "--model", "mlp",
            "--dataset", "synthetic", "--checkpoint-every", 10, "--log-every", 5, "--out", out)
    first = distprop(cluster, *args, "--epochs", 1, DPC_PRIVATE=PRIVATE)
    assert first.returncode == 0, first.stdout + first.stderr
    disk_a = cluster.state / "disk" / "hosta" / "run"
    assert list((disk_a / "checkpoints").glob("checkpoint-*.npz"))
    assert not (cluster.state / "disk" / "hostb" / "run" / "checkpoints").exists()
    second = distprop(cluster, *args, "--epochs", 2, "--resume", "auto", DPC_PRIVATE=PRIVATE)
    assert second.returncode == 0, second.stdout + second.stderr
    assert "--resume auto: continuing from" in second.stdout
    summary = json.loads((disk_a / "summary.json").read_text())
    assert summary["resumed_from"].endswith(".npz")
    assert summary["world_size"] == 2


def test_launch_with_hostfile_runs_info_on_each_host(cluster, tmp_path):
    hostfile = cluster.state / "hostfile"
    hostfile.write_text("hosta slots=1\nhostb:1\n")
    done = distprop(cluster, "launch", "--hostfile", hostfile, "-n", 2, "--", sys.executable,
                    "-m", "distprop", "info")
    assert done.returncode == 0, done.stdout + done.stderr
    ranks = sorted(line.split()[:4] for line in done.stdout.splitlines()
                   if line.startswith("rank "))
    assert ranks == [["rank", "0/2", "host", "hosta,"], ["rank", "1/2", "host", "hostb,"]]


def test_hosts_have_their_own_names_and_addresses(cluster):
    names = [cluster.run(h, ["hostname"], timeout=10).stdout.strip() for h in cluster.hosts]
    assert names == ["hosta", "hostb"]
    assert os.uname().nodename not in names
    hosts = cluster.run("hosta", ["cat", "/etc/hosts"], timeout=10).stdout
    assert "198.18.0.11 hostb" in hosts


def test_a_second_cluster_and_a_dead_runs_leftovers_leave_this_one_alone(cluster):
    """Two test runs on one machine: another cluster with the same host names comes up and goes
    down beside this one, and a private cluster whose process died is removed by the next
    ``Cluster.private()``, without touching this one."""
    import subprocess

    def namespaces() -> str:
        return subprocess.run(["ip", "netns", "list"], capture_output=True, text=True,
                              timeout=10).stdout

    other = netcluster.Cluster(("hosta", "hostb"), netcluster.STATE.parent / "distprop-other",
                               prefix=f"dpo{os.getpid()}-").up()
    try:
        assert other.run("hostb", ["hostname"], timeout=10).stdout.strip() == "hostb"
        assert f"dpo{os.getpid()}-hosta" in namespaces()
    finally:
        other.down()
    assert f"dpo{os.getpid()}-hosta" not in namespaces()
    dead = subprocess.Popen(["true"])
    dead.wait()
    stale = netcluster.Cluster(("hosta",), netcluster.STATE.parent /
                               f"{netcluster.STATE.name}-{dead.pid}", prefix=f"dpc{dead.pid}-")
    stale.up()
    assert f"dpc{dead.pid}-hosta" in namespaces()
    netcluster.Cluster.private()  # reaps the dead process's cluster
    assert f"dpc{dead.pid}-hosta" not in namespaces() and not stale.state.exists()
    for host in cluster.hosts:  # this module's cluster still answers
        assert cluster.run(host, ["hostname"], timeout=10).stdout.strip() == host
