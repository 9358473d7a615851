"""Communicators and collectives: a world of one process, and real mpiexec runs of 2 and 3."""

import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import distprop as dp
from distprop.distributed import compression
from distprop.distributed.comm import SingleProcessCommunicator, check_op
from distprop.distributed.metrics import MetricsReducer

from helpers import REPO, run_mpi

LAUNCHER_VARS = ("PMI_RANK", "PMI_SIZE", "PMI_FD", "PMIX_RANK", "OMPI_COMM_WORLD_SIZE",
                 "OMPI_COMM_WORLD_RANK", "MV2_COMM_WORLD_SIZE", "SLURM_PROCID")


def test_plain_process_is_a_world_of_one_without_mpi():
    code = """
import sys
import numpy as np
import distprop as dp
from distprop import distributed as dist
comm = dist.init()
assert dist.init() is comm and dist.is_initialized()
a = np.arange(4.0)
dist.all_reduce(a, "mean")
t = dp.tensor([1.0, 2.0])
dist.all_reduce(t)
dist.barrier()
print(type(comm).__name__, dist.get_rank(), dist.get_world_size(), dist.get_local_rank(),
      dist.get_local_size(), a.tolist(), t.tolist(), dist.all_gather(a).shape,
      dist.all_gather_object("x"), "mpi4py.MPI" in sys.modules)
"""
    env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_VARS}
    env.pop("DISTPROP_BACKEND", None)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                         cwd=str(REPO), timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["SingleProcessCommunicator", "0", "1", "0", "1",
                                  "[0.0,", "1.0,", "2.0,", "3.0]", "[1.0,", "2.0]", "(1,", "4)",
                                  "['x']", "False"]


def test_single_process_communicator_collectives():
    comm = SingleProcessCommunicator()
    a = np.arange(6.0)
    assert comm.allreduce(a, "max") is a
    assert comm.iallreduce(a).test() and comm.iallreduce(a).wait() is a
    assert comm.allgather(a).shape == (1, 6)
    out = np.zeros(6)
    comm.allgather(a, out=out)
    np.testing.assert_array_equal(out, a)
    np.testing.assert_array_equal(comm.reduce_scatter(a, "mean"), a)
    assert comm.allreduce_obj([1, 2.5], "sum") == [1, 2.5]
    assert comm.broadcast_obj({"a": 1}) == {"a": 1}
    with pytest.raises(ValueError, match="unknown reduction op 'prod'"):
        comm.allreduce(a, "prod")
    with pytest.raises(TypeError, match="op='mean' needs a floating-point array"):
        comm.allreduce(np.arange(3), "mean")
    with pytest.raises(ValueError, match="root 1 does not exist"):
        comm.broadcast(a, 1)
    assert check_op("AVG") == "mean"


def test_metrics_reducer_single_process():
    m = MetricsReducer(comm=SingleProcessCommunicator())
    m.add("loss", 6.0, 3)
    m.add("loss", dp.tensor(2.0), 1)
    m.update(4, correct=3)
    assert m.reduce() == {"loss": 2.0, "correct": 0.75}
    assert m.totals == {"loss": (8.0, 4.0), "correct": (3.0, 4.0)}
    out = m.reduce()  # a new interval: nothing added
    assert np.isnan(out["loss"]) and np.isnan(out["correct"])
    fixed = MetricsReducer(["loss"], comm=SingleProcessCommunicator())
    with pytest.raises(KeyError, match="unknown metric 'acc'"):
        fixed.add("acc", 1.0)


def _torch_bf16_bits(x):
    return torch.from_numpy(x).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)


def _codec_inputs():
    rng = np.random.default_rng(0)
    typical = (rng.standard_normal(300_000) * 10.0 ** rng.uniform(-12, 7, 300_000))
    any_bits = rng.integers(0, 2**32, 300_000, dtype=np.uint64).astype(np.uint32)
    special = [0.0, -0.0, np.inf, -np.inf, np.nan, 65504, 65519.99, 65520, 2.0 ** -24,
               2.0 ** -25, 3 * 2.0 ** -26, 1.0 + 2.0 ** -8, 1.0 + 3 * 2.0 ** -8,
               1.0 + 2.0 ** -11, 1.0 + 3 * 2.0 ** -11]  # overflow, subnormals, ties to even
    return np.concatenate([np.array(special), typical]).astype(np.float32), \
        any_bits.view(np.float32)


@pytest.mark.parametrize("kind", ["fp16", "bf16"])
def test_codec_encode_is_correctly_rounded(kind):
    for x in _codec_inputs():
        words = np.empty(x.size, np.uint16)
        compression.encode(x, words, kind)
        with np.errstate(over="ignore"):
            ref = x.astype(np.float16).view(np.uint16) if kind == "fp16" else _torch_bf16_bits(x)
        nan = np.isnan(x)
        np.testing.assert_array_equal(words[~nan], ref[~nan])
        back = np.empty(int(nan.sum()), np.float32)
        compression.decode(words[nan], back, kind)
        assert nan.any() and np.isnan(back).all()
    x64 = _codec_inputs()[0].astype(np.float64) * 1.1  # float64 in: rounded via float32
    words = np.empty(x64.size, np.uint16)
    compression.encode(x64, words, kind)
    ref32 = np.empty(x64.size, np.uint16)
    compression.encode(x64.astype(np.float32), ref32, kind)
    np.testing.assert_array_equal(words, ref32)


@pytest.mark.parametrize("kind", ["fp16", "bf16"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_codec_decode_every_16_bit_word(kind, dtype):
    words = np.arange(65536, dtype=np.uint32).astype(np.uint16)
    out = np.empty(65536, dtype)
    compression.decode(words, out, kind)
    if kind == "fp16":
        ref = words.view(np.float16).astype(dtype)
    else:
        ref = torch.from_numpy(words.view(np.int16)).view(torch.bfloat16).double().numpy()
    nan = np.isnan(ref)
    assert (np.isnan(out) == nan).all()
    np.testing.assert_array_equal(out[~nan], ref[~nan].astype(dtype))
    strided = np.zeros((65536, 2), dtype)[:, 0]  # non-contiguous output
    compression.decode(words, strided, kind)
    np.testing.assert_array_equal(strided[~nan], out[~nan])


def test_codec_sum_adds_in_float32_and_rounds_once():
    rng = np.random.default_rng(1)
    a, b = rng.standard_normal((2, 200_000)).astype(np.float32) * 1e-3
    for kind in ("fp16", "bf16"):
        wa, wb = np.empty(a.size, np.uint16), np.empty(a.size, np.uint16)
        compression.encode(a, wa, kind)
        compression.encode(b, wb, kind)
        fa, fb = np.empty_like(a), np.empty_like(a)
        compression.decode(wa, fa, kind)
        compression.decode(wb, fb, kind)
        expected = np.empty(a.size, np.uint16)
        compression.encode(fa + fb, expected, kind)
        compression.sum_words([wa, wb], wb, kind)
        np.testing.assert_array_equal(wb, expected)
    with pytest.raises(ValueError, match="unknown compression 'int8'"):
        compression.encode(a, wa, "int8")


COLLECTIVES = """
import numpy as np
import distprop as dp
from distprop import distributed as dist
from distprop.distributed import compression
from distprop.distributed.metrics import MetricsReducer

comm = dist.init()
r, n = comm.rank, comm.size
assert dist.init() is comm and comm.local_size == n and comm.local_rank == r
ranks = np.arange(n)

for dtype in (np.float32, np.float64, np.int64):
    for op, expect in (("sum", ranks.sum() + n), ("max", n), ("min", 1)):
        a = np.full(5, r + 1, dtype=dtype)
        assert dist.all_reduce(a, op) is a and a.dtype == dtype
        assert (a == expect).all(), (dtype, op, a)
a = np.full(4, float(r))
dist.all_reduce(a, "mean")
assert np.allclose(a, ranks.mean())

t = dp.tensor([float(r), 2.0 * r])  # Tensors, in place
dist.all_reduce(t, "sum")
assert t.tolist() == [ranks.sum(), 2 * ranks.sum()] and t.dtype == np.float32

m = np.arange(12.0).reshape(3, 4) * (r + 1)
col = m[:, 1]  # non-contiguous view: reduced in place through a staging copy
dist.all_reduce(col)
assert np.allclose(m[:, 1], np.arange(1, 12, 4) * (ranks + 1).sum())

reqs = [comm.iallreduce(np.full(1000, float(r + k)), "sum") for k in range(3)]
for k, req in enumerate(reqs):
    out = req.wait()
    assert np.allclose(out, (ranks + k).sum()) and req.test()
req = dist.all_reduce(np.full(3, 1.0), "mean", async_op=True)
assert np.allclose(req.wait(), 1.0)

b = np.full(3, float(r))
dist.broadcast(b, src=n - 1)
assert (b == n - 1).all()
bt = dp.tensor([r, r])
dist.broadcast(bt, 0)
assert bt.tolist() == [0, 0]

g = dist.all_gather(np.array([r, 10 * r]))
assert g.tolist() == [[k, 10 * k] for k in range(n)]
lst = [dp.zeros(2) for _ in range(n)]
dist.all_gather(lst, dp.tensor([float(r), 1.0]))
assert [x.tolist() for x in lst] == [[k, 1.0] for k in range(n)]
flat = np.zeros(3 * n)  # in place: this rank's chunk already sits in the output
flat[3 * r:3 * r + 3] = r + 0.5
comm.allgather(flat[3 * r:3 * r + 3], out=flat)
assert flat.tolist() == [k + 0.5 for k in range(n) for _ in range(3)]

full = np.arange(2.0 * n) + r
chunk = dist.reduce_scatter(full)
assert chunk.tolist() == [(2 * r + ranks).sum(), (2 * r + 1 + ranks).sum()]
chunk = dist.reduce_scatter(dp.tensor(full), "mean")
assert np.allclose(chunk.numpy(), [2 * r + ranks.mean(), 2 * r + 1 + ranks.mean()])
try:
    comm.reduce_scatter(np.zeros(2 * n + 1))
except ValueError as exc:
    assert "not a multiple of the world size" in str(exc)

assert dist.all_gather_object({"rank": r}) == [{"rank": k} for k in range(n)]
assert dist.broadcast_object("hello" if r == 1 else None, src=1) == "hello"
assert dist.all_reduce_object([r, 1.5], "sum") == [ranks.sum(), 1.5 * n]
assert dist.all_reduce_object(float(r), "max") == n - 1
assert dist.all_reduce_object(r, "mean") == ranks.mean()

# half precision sums (custom MPI operations on 16-bit words)
x = np.linspace(-1, 1, 101).astype(np.float32) * (r + 1)
h = x.astype(np.float16)
comm.iallreduce(h, "sum").wait()
assert np.abs(h.astype(np.float32) - x / (r + 1) * (ranks + 1).sum()).max() < 1e-2
words = np.empty(x.size, np.uint16)
compression.encode(x, words, "bf16")
comm.iallreduce(words, "sum", bfloat16=True).wait()
back = np.empty_like(x)
compression.decode(words, back, "bf16")
assert np.abs(back - x / (r + 1) * (ranks + 1).sum()).max() < 0.05

metrics = MetricsReducer()
metrics.add("loss", 2.0 * (r + 1), 2)
metrics.update(4, correct=r)
means = metrics.reduce()
assert means == {"loss": (ranks + 1).sum() / n, "correct": ranks.sum() / (4 * n)}, means
try:
    metrics.add("new_after_first_reduce", 1.0)
except KeyError as exc:
    assert "fixed by the first reduce()" in str(exc)
else:
    raise AssertionError("a new metric name after the first reduce was accepted")
mixed = MetricsReducer()
mixed.add("loss", 1.0)
if r == 0:
    mixed.add("only_on_rank_0", 1.0)
try:
    mixed.reduce()
except RuntimeError as exc:
    assert "ranks used different metric names" in str(exc)
else:
    raise AssertionError("metric names differ across ranks but no error")
dist.barrier()
print(f"DONE {r}")
"""


@pytest.mark.mpi
@pytest.mark.parametrize("nprocs", [2, 3])
def test_collectives_under_mpiexec(nprocs):
    res = run_mpi(COLLECTIVES, nprocs=nprocs, timeout=60, env={"DISTPROP_STALL_TIMEOUT": "20"})
    assert res.returncode == 0, res.stdout + res.stderr
    assert all(res.stdout.count(f"DONE {r}") == 1 for r in range(nprocs)), res.stdout


@pytest.mark.mpi
def test_progress_thread_advances_iallreduce_during_compute():
    """While the main thread computes (no MPI calls), the progress thread completes the request;
    with the thread off, MPICH leaves it unfinished until wait()."""
    code = """
import time
import numpy as np
from distprop import distributed as dist
comm = dist.init()
a = np.ones(2_000_000, np.float32)
comm.barrier()
req = comm.iallreduce(a)
t0 = time.perf_counter()
while time.perf_counter() - t0 < 1.0:
    np.dot(a, a)  # compute that never enters MPI
done = req._done
req.wait()
assert (a == comm.size).all()
print(f"rank {comm.rank} done_during_compute={done}")
"""
    on = run_mpi(code, nprocs=2, timeout=60, env={"DISTPROP_PROGRESS_THREAD": "1"})
    off = run_mpi(code, nprocs=2, timeout=60, env={"DISTPROP_PROGRESS_THREAD": "0"})
    assert on.returncode == 0 and off.returncode == 0, on.stderr + off.stderr
    assert on.stdout.count("done_during_compute=True") == 2, on.stdout
    assert off.stdout.count("done_during_compute=False") >= 1, off.stdout
