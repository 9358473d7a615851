"""DistributedDataParallel under real mpiexec runs (2 and 3 ranks, tiny float64 models)."""

import re
import time

import pytest

from helpers import run_mpi

pytestmark = pytest.mark.mpi

PRELUDE = "import sys\nsys.path.insert(0, 'tests')\nfrom ddp_common import *\n"


def mpi(body: str, nprocs: int = 2, timeout: float = 60, env=None):
    return run_mpi(PRELUDE + body, nprocs=nprocs, timeout=timeout, env=env)


def ok(result, nprocs: int):
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count("DONE") == nprocs, result.stdout + result.stderr
    return result.stdout


EQUIVALENCE = """
CONFIGS = [
    # name, DDP kwargs, train kwargs
    ("one-bucket-overlap", dict(overlap=True), dict()),
    ("one-bucket-no-overlap", dict(overlap=False), dict()),
    ("tiny-buckets-overlap", dict(bucket_cap_mb=1e-4, first_bucket_mb=1e-5), dict()),
    ("tiny-buckets-no-overlap", dict(bucket_cap_mb=1e-4, overlap=False), dict()),
    ("accumulate-no_sync", dict(bucket_cap_mb=1e-4), dict(accum=2)),
    ("clip-after-sync", dict(bucket_cap_mb=1e-4), dict(clip=0.05)),
    ("adam-tiny-buckets", dict(bucket_cap_mb=1e-4), dict(opt="adam")),
]
x, y = make_data()
for name, ddp_kwargs, train_kwargs in CONFIGS:
    ref = reference(opt=train_kwargs.get("opt", "sgd"), clip=train_kwargs.get("clip"))
    net, _ = train(mlp(seed=rank), x, y, ddp_kwargs=ddp_kwargs, **train_kwargs)
    err = max_diff(net.parameters(), ref)
    net.check_replicas()
    if ddp_kwargs.get("bucket_cap_mb", 25) < 1 and ddp_kwargs.get("overlap", True):
        assert net.last_sync["overlapped"] > 1, net.last_sync
    say(f"{name} buckets={len(net.buckets)} err={err:.2e}")
    assert err < 1e-10, (name, err)
say("DONE")
"""


@pytest.mark.parametrize("nprocs", [2, 3])
def test_equivalence_with_one_process(nprocs):
    """N ranks x B/N == 1 process x B after 10 steps (SGD-momentum, Adam, buckets, overlap on/off,
    no_sync accumulation, clipping after the sync). Models start different on each rank."""
    out = ok(mpi(EQUIVALENCE, nprocs), nprocs)
    errs = [float(e) for e in re.findall(r"err=(\S+)", out)]
    assert len(errs) == 7 * nprocs and max(errs) < 1e-10
    assert re.search(r"tiny-buckets-overlap buckets=4 ", out)


def test_uneven_dataset_same_steps_everywhere():
    """1001 samples on 3 ranks: the sampler pads (or drops), every rank runs the same number of
    synchronised steps, and nobody hangs."""
    body = """
from distprop.data.sampler import DistributedSampler
x, y = make_data(1001)
for drop_last in (False, True):
    sampler = DistributedSampler(x, shuffle=True, seed=3, drop_last=drop_last)
    ddp = DDP(mlp(), bucket_cap_mb=1e-4)
    opt = make_opt("sgd", ddp.parameters(), lr=0.01)
    steps = 0
    for epoch in range(2):
        sampler.set_epoch(epoch)
        idx = sampler.indices()
        for s in range(0, len(idx), 32):
            b = idx[s:s + 32]
            opt.zero_grad()
            ((ddp(dp.tensor(x[b])) - dp.tensor(y[b])) ** 2).mean().backward()
            opt.step()
            steps += 1
    ddp.check_replicas()
    say(f"drop_last={drop_last} samples={len(sampler)} steps={steps}")
say("DONE")
"""
    out = ok(mpi(body, 3), 3)
    assert out.count("drop_last=False samples=334 steps=22") == 3
    assert out.count("drop_last=True samples=333 steps=22") == 3


def test_mismatched_models_raise_on_every_rank():
    body = """
model = nn.Linear(4, 4 if rank == 0 else 5)
try:
    DDP(model)
except RuntimeError as exc:
    say("caught:", exc)
say("DONE")
"""
    out = ok(mpi(body, 3), 3)
    assert out.count("caught: DistributedDataParallel: the model differs across ranks") == 3
    assert "rank(s) 1, 2 differ from rank 0" in out
    assert "'weight' has shape (4, 4) float32 on rank 0 but shape (5, 4) float32 on rank 1" in out


def test_mismatched_models_uncaught_end_the_job_quickly():
    body = """
DDP(nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2 + rank)))
say("DONE")
"""
    t0 = time.monotonic()
    res = mpi(body, 2, timeout=30)
    assert time.monotonic() - t0 < 15
    assert res.returncode != 0
    assert "DONE" not in res.stdout
    assert "[rank 0] RuntimeError: DistributedDataParallel: the model differs" in res.stderr \
        or "[rank 1] RuntimeError: DistributedDataParallel: the model differs" in res.stderr


def test_exception_on_rank1_aborts_the_job_with_its_traceback_once():
    body = """
ddp = DDP(mlp())
opt = make_opt("sgd", ddp.parameters())
x, y = make_data()
for step in range(1000):
    if rank == 1 and step == 3:
        raise ValueError("boom on purpose")
    opt.zero_grad()
    ((ddp(dp.tensor(x[:6])) - dp.tensor(y[:6])) ** 2).mean().backward()
    opt.step()
say("DONE")
"""
    t0 = time.monotonic()
    res = mpi(body, 2, timeout=30)
    elapsed = time.monotonic() - t0
    assert res.returncode != 0
    assert elapsed < 10, elapsed
    err = res.stderr
    assert err.count("[rank 1] Traceback (most recent call last):") == 1, err
    assert "[rank 1] ValueError: boom on purpose" in err
    assert "[rank 0] Traceback" not in err


def test_unused_parameters_both_ways():
    body = """
x, y = make_data()
# find_unused_parameters=True: the unused layer's gradient counts as zero, training works, and a
# branch used only on rank 1 is averaged with rank 0's zeros.
ddp = DDP(mlp(unused=True), bucket_cap_mb=1e-4, find_unused_parameters=True)
opt = make_opt("sgd", ddp.parameters())
for step in range(3):
    opt.zero_grad()
    ((ddp(dp.tensor(x[:6])) - dp.tensor(y[:6])) ** 2).mean().backward()
    opt.step()
spare = ddp.module.seq.spare
assert spare.weight.grad is not None and float(abs(spare.weight.grad.data).max()) == 0.0
ddp.check_replicas()
say("find_unused=True ok")

# find_unused_parameters=False: every rank raises naming the parameter.
ddp = DDP(mlp(unused=True))
try:
    ((ddp(dp.tensor(x[:6])) - dp.tensor(y[:6])) ** 2).mean().backward()
except RuntimeError as exc:
    say("caught:", exc)

# Data-dependent: only rank 1 skips a layer. Without find_unused every rank still raises (no
# hang); with it, rank 0's gradient for that layer is averaged with rank 1's zeros.
class Branchy(nn.Module):
    def __init__(self):
        super().__init__()
        dp.manual_seed(0)
        self.a = nn.Linear(6, 3).double()
        self.b = nn.Linear(3, 3).double()

    def forward(self, x):
        out = self.a(x)
        return self.b(out) if rank == 0 else out

for find in (False, True):
    ddp = DDP(Branchy(), find_unused_parameters=find)
    try:
        ((ddp(dp.tensor(x[:6])) - dp.tensor(y[:6])) ** 2).mean().backward()
        g = ddp.module.b.weight.grad.data.copy()
        all_g = comm.allgather(g)
        assert np.array_equal(all_g[0], all_g[1])
        say(f"branchy find={find} ok")
    except RuntimeError as exc:
        say(f"branchy find={find} caught:", exc)
say("DONE")
"""
    out = ok(mpi(body, 2), 2)
    assert out.count("find_unused=True ok") == 2
    assert out.count("caught: DistributedDataParallel: parameters received no gradient") == 4
    assert out.count("rank 0: seq.spare.weight, seq.spare.bias; rank 1: seq.spare.weight") == 2
    assert out.count("branchy find=False caught:") == 2
    assert out.count("rank 1: b.weight, b.bias)") == 2
    assert out.count("branchy find=True ok") == 2


def test_broadcast_buffers_and_batchnorm_running_stats():
    body = """
dp.manual_seed(0)
model = nn.Sequential(nn.Linear(6, 4), nn.BatchNorm1d(4)).double()
ddp = DDP(model, broadcast_buffers=True)
bn = model[1]
x, y = make_data()
seen = []  # the statistics the wrapped model starts each forward with
model.register_forward_pre_hook(lambda mod, args: seen.append(bn.running_mean.data.copy()))
for step in range(3):
    ddp(dp.tensor(x[rank * 6:(rank + 1) * 6] * (1 + rank))).sum().backward()
everyone = comm.allgather(np.stack(seen))
assert np.array_equal(everyone[0], everyone[1]), everyone  # rank 0's, on every rank
assert not np.array_equal(seen[1], seen[2])
after = comm.allgather(bn.running_mean.data.copy())
assert not np.array_equal(after[0], after[1])  # each rank updated them with its own batch
ddp.eval()
with dp.no_grad():
    ddp(dp.tensor(x[:4]))
evald = comm.allgather(bn.running_mean.data.copy())
assert np.array_equal(evald[0], evald[1]) and np.array_equal(evald[0], after[0])
say("buffers ok")

# broadcast_buffers=False leaves each rank's statistics alone
model2 = nn.Sequential(nn.Linear(6, 4), nn.BatchNorm1d(4)).double()
ddp2 = DDP(model2, broadcast_buffers=False)
for step in range(2):
    ddp2(dp.tensor(x[rank * 6:(rank + 1) * 6] * (1 + rank))).sum().backward()
g = comm.allgather(model2[1].running_mean.data.copy())
assert not np.array_equal(g[0], g[1])
say("DONE")
"""
    out = ok(mpi(body, 2), 2)
    assert out.count("buffers ok") == 2


def test_compression_fp16_bf16_converges_with_bounded_error():
    body = """
x, y = make_data(96)
results = {}
for comp in (None, "fp16", "bf16"):
    ddp = DDP(mlp(dtype=np.float32), compression=comp, bucket_cap_mb=1e-3)
    opt = make_opt("sgd", ddp.parameters(), lr=0.05)
    losses = []
    for step in range(60):
        s = (step * 24) % 96
        xb, yb = x[s + rank * 12:s + (rank + 1) * 12], y[s + rank * 12:s + (rank + 1) * 12]
        opt.zero_grad()
        out = ddp(dp.tensor(xb, dtype=np.float32))
        loss = ((out - dp.tensor(yb, dtype=np.float32)) ** 2).mean()
        loss.backward()
        if step == 0:
            g0 = np.concatenate([p.grad.data.ravel() for p in ddp.parameters()])
        opt.step()
        losses.append(dist.all_reduce_object(loss.item(), "mean"))
    ddp.check_replicas()
    params = np.concatenate([p.data.ravel() for p in ddp.parameters()])
    results[comp] = (losses, params, g0)
base_losses, base_params, base_g = results[None]
for comp in ("fp16", "bf16"):
    losses, params, g0 = results[comp]
    gerr = np.abs(g0 - base_g).max() / np.abs(base_g).max()
    perr = np.abs(params - base_params).max() / np.abs(base_params).max()
    bound = 2e-3 if comp == "fp16" else 1.6e-2
    say(f"{comp} loss {losses[0]:.4f} -> {losses[-1]:.4f} (fp32 {base_losses[-1]:.4f}) "
        f"grad_err={gerr:.2e} param_err={perr:.2e}")
    assert losses[-1] < 0.7 * losses[0], losses
    assert abs(losses[-1] - base_losses[-1]) < 0.05 * base_losses[-1] + 1e-3
    assert 0 < gerr < bound and perr < 10 * bound
say("DONE")
"""
    out = ok(mpi(body, 2), 2)
    assert out.count("fp16 loss") == 2 and out.count("bf16 loss") == 2


def test_nonfinite_gradient_raise_and_skip_on_every_rank():
    body = """
x, y = make_data()
for policy in ("raise", "skip"):
    ddp = DDP(mlp(), nonfinite=policy)
    opt = make_opt("sgd", ddp.parameters())
    for step in range(3):
        xb = x[rank * 6:(rank + 1) * 6].copy()
        if rank == 1 and step == 1:
            xb[0, 0] = np.nan
        opt.zero_grad()
        before = [p.data.copy() for p in ddp.parameters()]
        try:
            ((ddp(dp.tensor(xb)) - dp.tensor(y[:6])) ** 2).mean().backward()
        except FloatingPointError as exc:
            say(f"{policy} step {step} caught:", exc)
            continue
        if ddp.step_ok:
            opt.step()
        else:
            say(f"{policy} step {step} skipped")
            assert all(np.array_equal(b, p.data) for b, p in zip(before, ddp.parameters()))
    ddp.check_replicas()
    assert np.isfinite(np.concatenate([p.data.ravel() for p in ddp.parameters()])).all()
say("DONE")
"""
    out = ok(mpi(body, 2), 2)
    assert out.count("raise step 1 caught: DistributedDataParallel: non-finite gradient") == 2
    assert out.count("skip step 1 skipped") == 2
    assert "raise step 0 caught" not in out and "raise step 2 caught" not in out


def test_replica_check_names_diverged_rank():
    body = """
ddp = DDP(mlp())
if rank == 2:
    next(ddp.parameters()).data[0, 0] += 1e-12
try:
    ddp.check_replicas()
except RuntimeError as exc:
    say("caught:", exc)
periodic = DDP(mlp(), check_replicas_every=2)
x, y = make_data()
for step in range(3):
    if rank == 1 and step == 1:
        next(periodic.parameters()).data[0, 0] += 1.0
    try:
        periodic(dp.tensor(x[:4]))
    except RuntimeError as exc:
        say(f"periodic step {step} caught:", exc)
say("DONE")
"""
    out = ok(mpi(body, 3), 3)
    assert out.count("caught: replica check failed: the parameters on rank(s) 2 differ") == 3
    assert out.count("periodic step 1 caught: replica check failed: the parameters on rank(s) 1") \
        == 3


def test_stall_watchdog_reports_collective_and_aborts():
    body = """
import time
if rank == 1:
    time.sleep(30)
comm.barrier()
say("DONE")
"""
    t0 = time.monotonic()
    res = mpi(body, 2, timeout=40, env={"DISTPROP_STALL_TIMEOUT": "1.5"})
    assert time.monotonic() - t0 < 15
    assert res.returncode != 0
    assert "[rank 0] stall watchdog: rank 0 has waited" in res.stderr
    assert "in collective 'barrier'" in res.stderr


def test_abort_on_exception_context_ends_the_job_even_if_caught_outside():
    body = """
from distprop.distributed import guards
try:
    with guards.abort_on_exception(comm):
        if rank == 1:
            raise KeyError("inside the guarded block")
except KeyError:
    pass
comm.barrier()
say("DONE")
"""
    res = mpi(body, 2, timeout=30)
    assert res.returncode != 0 and "DONE" not in res.stdout
    assert res.stderr.count("[rank 1] KeyError: 'inside the guarded block'") == 1


@pytest.mark.parametrize("stop, code", [("sys.exit(3)", 3), ("raise KeyboardInterrupt", 130)])
def test_abort_on_exception_ends_the_job_on_exit_or_interrupt_of_one_rank(stop, code):
    """sys.exit(n) / Ctrl-C on one rank (caught outside, as click does) must not hang the rest."""
    body = f"""
import sys
from distprop.distributed import guards
try:
    with guards.abort_on_exception(comm):
        if rank == 1:
            {stop}
except KeyboardInterrupt:
    sys.exit(130)
comm.barrier()
say("DONE")
"""
    res = mpi(body, 2, timeout=30)
    assert res.returncode == code and "DONE" not in res.stdout
    assert "[rank 1]" in res.stderr and "aborting the job" in res.stderr


def test_state_dict_keys_and_single_process_world():
    """World of one (no mpiexec): DDP is a thin wrapper; keys have no 'module.' prefix and
    PyTorch-DDP style prefixed keys load."""
    import numpy as np

    import distprop as dp
    from distprop import nn
    from distprop.distributed import DistributedDataParallel
    from distprop.distributed.comm import SingleProcessCommunicator

    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    ddp = DistributedDataParallel(model, comm=SingleProcessCommunicator())
    keys = list(ddp.state_dict())
    assert keys == list(model.state_dict()) and keys[0] == "0.weight"
    assert [n for n, _ in ddp.named_parameters()] == [n for n, _ in model.named_parameters()]
    state = {f"module.{k}": np.full(v.shape, 0.5, dtype=v.dtype) for k, v in
             model.state_dict().items()}
    ddp.load_state_dict(state)
    assert float(model[0].weight.data[0, 0]) == 0.5
    out = ddp(dp.randn(5, 3))
    out.sum().backward()
    assert ddp.last_sync["buckets"] == 1 and model[0].weight.grad is not None
    with pytest.raises(RuntimeError, match="without a forward through the DDP wrapper"):
        model(dp.randn(5, 3)).sum().backward()
