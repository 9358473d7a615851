"""The 16-bit (fp16/bf16) gradient sum without a user-defined MPI operation (issue 12, slow
links): alltoall of chunks, a float32 sum in rank order with one rounding, allgather."""

import pytest

from helpers import run_mpi

HALF_SUM = """
import sys
import numpy as np
from distprop import distributed as dist
from distprop.distributed import compression

comm = dist.init()
r, n = comm.rank, comm.size
comm.set_progress_thread(sys.argv[1] == "thread")
rng = np.random.default_rng(7)
for kind in ("fp16", "bf16"):
    for size in (0, 1, n - 1, 1000, 65536 * 2 + 3):  # empty, fewer words than ranks, uneven
        xs = (rng.standard_normal((n, size)) * 1e-3).astype(np.float32)
        # every element: 1.0 on one rank and half an fp16/bf16 ulp of 1.0 on the others, so a
        # sum rounded after each partial sum loses what a single rounding keeps
        half_ulp = np.float32(2.0 ** -11 if kind == "fp16" else 2.0 ** -8)
        xs[:, :min(size, 30)] = half_ulp
        for k in range(min(size, 30)):
            xs[k % n, k] = 1.0
        words = np.empty((n, size), np.uint16)
        for k in range(n):
            compression.encode(xs[k], words[k], kind)
        acc = np.zeros(size, np.float32)
        part = np.empty(size, np.float32)
        for k in range(n):  # the reference: float32, rank order, one rounding
            compression.decode(words[k], part, kind)
            acc += part
        expect = np.empty(size, np.uint16)
        compression.encode(acc, expect, kind)
        mine = words[r].copy()
        data = mine if kind == "bf16" else mine.view(np.float16)
        req = comm.iallreduce(data, "sum", bfloat16=kind == "bf16")
        while not req.test():
            pass
        assert req.wait() is data
        bad = np.flatnonzero(mine != expect)
        assert bad.size == 0, (kind, size, bad[:5], mine[bad[:5]], expect[bad[:5]])
        if kind == "fp16":  # the blocking allreduce gives the same words
            blocking = words[r].view(np.float16).copy()
            comm.allreduce(blocking, "sum")
            assert (blocking.view(np.uint16) == expect).all()
        allw = comm.allgather(mine.astype(np.int64))
        assert (allw == allw[0]).all(), "ranks disagree"

# several sums in flight, mixed with ordinary allreduces, rank-dependent timing, waited for in
# reverse order: every rank must still issue the same collectives in the same order
import time
for trial in range(3):
    reqs, expects = [], []
    for k in range(4):
        vals = (np.arange(5000) % 7 + k + r).astype(np.float16)
        reqs.append(comm.iallreduce(vals, "sum"))
        expects.append(sum((np.arange(5000) % 7 + k + q) for q in range(n)).astype(np.float16))
        ints = np.full(3, r + k, np.int64)
        reqs.append(comm.iallreduce(ints, "sum"))
        expects.append(np.full(3, n * k + n * (n - 1) // 2, np.int64))
        time.sleep(0.003 * ((r + k + trial) % n))
    for req, expect in reversed(list(zip(reqs, expects))):
        out = req.wait()
        assert (out == expect).all(), (trial, out[:5], expect[:5])
print(f"DONE {r}")
"""


@pytest.mark.mpi
@pytest.mark.parametrize("nprocs,progress", [(2, "thread"), (3, "thread"), (3, "nothread")])
def test_half_sum_is_float32_rank_order_rounded_once(nprocs, progress):
    res = run_mpi(HALF_SUM, nprocs=nprocs, timeout=90, env={"DISTPROP_STALL_TIMEOUT": "30"},
                  args=(progress,))
    assert res.returncode == 0, res.stdout + res.stderr
    assert all(res.stdout.count(f"DONE {r}") == 1 for r in range(nprocs)), res.stdout


def _bench(*args):
    from click.testing import CliRunner

    from distprop.cli import cli

    return CliRunner().invoke(cli, ["bench", *args], catch_exceptions=False)


@pytest.mark.parametrize("args, needle", [
    (["--compression", "int8"], "unknown compression(s) ['int8']"),
    (["--compression", "fp16", "--methods", "mpi"], "add ddp to --methods"),
])
def test_bench_allreduce_compression_bad_input_is_usage_error(args, needle):
    result = _bench("allreduce", "--sizes", "1KB", *args)
    assert result.exit_code == 2, result.output
    assert needle in result.output


@pytest.mark.mpi
def test_bench_allreduce_times_compressed_ddp_sync():
    import json

    result = _bench("allreduce", "--sizes", "64KB", "--ranks", "2", "--methods", "mpi,ddp",
                    "--compression", "fp16,bf16", "--repeats", "3", "--timeout", "120")
    assert result.exit_code == 0, result.output
    rows = [json.loads(x) for x in result.output.splitlines() if x.startswith("{")]
    assert {r["method"] for r in rows} == {"mpi", "ddp", "ddp-fp16", "ddp-bf16"}
    assert all(r["bytes"] == 65536 and r["time_median_s"] > 0 for r in rows)
    assert "ddp-fp16 busBW GB/s" in result.output
