"""DDP communication hooks (register_comm_hook) and the communicator registry."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner

import distprop as dp
from distprop import registry
from distprop.cli import cli
from distprop.distributed import DistributedDataParallel as DDP
from distprop.distributed import hooks
from distprop.distributed.comm import SingleProcessCommunicator
from distprop.distributed.selection import CommFacts, choose_comm, make_comm

from helpers import run_mpi


def _model():
    dp.manual_seed(0)
    return dp.nn.Sequential(dp.nn.Linear(6, 8), dp.nn.Tanh(), dp.nn.Linear(8, 3))


def _backward(ddp):
    x = dp.tensor(np.linspace(-1, 1, 24, dtype=np.float32).reshape(4, 6))
    ddp(x).sum().backward()


def test_register_once_and_before_the_first_backward():
    ddp = DDP(_model())
    ddp.register_comm_hook(None, hooks.allreduce_hook)
    with pytest.raises(RuntimeError, match="register_comm_hook can only be called once"):
        ddp.register_comm_hook(None, hooks.fp16_compress_hook)
    late = DDP(_model())
    _backward(late)
    with pytest.raises(RuntimeError, match="before the first backward"):
        late.register_comm_hook(None, hooks.allreduce_hook)
    with pytest.raises(TypeError, match="hook must be callable"):
        DDP(_model()).register_comm_hook(None, "allreduce")
    with pytest.raises(RuntimeError, match="only be called once .*fp16_compress_hook"):
        DDP(_model(), compression="fp16").register_comm_hook(None, hooks.allreduce_hook)
    with pytest.raises(ValueError, match="unknown compression 'int8'; choose one of none, "
                                         "fp16, bf16, powersgd"):
        DDP(_model(), compression="int8")


def test_bucket_api_seen_by_a_hook():
    seen = []

    def hook(state, bucket):
        grads = bucket.gradients()
        seen.append({
            "index": bucket.index(), "last": bucket.is_last(), "state": state,
            "predivided": bucket.predivided,
            "shapes": [tuple(p.shape) for p in bucket.parameters()],
            "views": all(np.shares_memory(g, bucket.buffer()) for g in grads),
            "numel": sum(g.size for g in grads) == bucket.buffer().size})
        return hooks.Future.completed(bucket.buffer() * 2)  # not in place: DDP copies it

    model = _model()
    ddp = DDP(model, bucket_cap_mb=300 / 2**20, first_bucket_mb=108 / 2**20)  # one per layer
    ddp.register_comm_hook("my state", hook)
    _backward(ddp)
    assert [s["index"] for s in seen] == [0, 1] and [s["last"] for s in seen] == [False, True]
    assert seen[0]["shapes"] == [(3,), (3, 8)] and seen[1]["shapes"] == [(8,), (8, 6)]
    assert all(s["views"] and s["numel"] and s["state"] == "my state" for s in seen)
    assert not any(s["predivided"] for s in seen)
    plain = _model()
    _backward(DDP(plain))
    for p, q in zip(model.parameters(), plain.parameters()):
        np.testing.assert_array_equal(p.grad.numpy(), 2 * q.grad.numpy())


def test_a_hook_that_makes_inf_is_caught_after_the_hook():
    def overflow(state, bucket):
        bucket.buffer()[0] = np.inf
        return hooks.Future.completed(None)

    ddp = DDP(_model())
    ddp.register_comm_hook(None, overflow)
    with pytest.raises(FloatingPointError, match="non-finite gradient after the allreduce"):
        _backward(ddp)


SCRIPT = r"""
import json
import numpy as np
import distprop as dp
from distprop.distributed import DistributedDataParallel as DDP
from distprop.distributed import hooks

comm = dp.distributed.init()
rank = comm.rank

def model():
    dp.manual_seed(0)
    return dp.nn.Sequential(dp.nn.Linear(6, 40), dp.nn.Tanh(), dp.nn.Linear(40, 3))

x = dp.tensor(np.random.default_rng(rank).standard_normal((5, 6)).astype(np.float32))

def grads(compression=None, hook=None, state=None):
    m = model()
    ddp = DDP(m, compression=compression, bucket_cap_mb=1e-3, first_bucket_mb=1e-3)
    if hook is not None:
        ddp.register_comm_hook(state, hook)
    ddp(x).pow(2).sum().backward()
    return np.concatenate([p.grad.numpy().ravel() for p in m.parameters()])

local = []
def sum_then_mean(state, bucket):   # PyTorch-style: the buffer arrives undivided
    local.append(bucket.buffer().copy())
    fut = hooks.Future.of(state.iallreduce(bucket.buffer(), "sum"))
    return fut.then(lambda f: f.value() / state.size)   # a new array: DDP copies it back

def sum_only(state, bucket):
    return state.iallreduce(bucket.buffer(), "sum")     # a bare request is accepted too

def wrapped_fp16(state, bucket):                        # a user hook around a built-in one
    return hooks.fp16_compress_hook(state, bucket)

default = grads()
mine = grads(hook=sum_then_mean, state=comm)
summed = grads(hook=sum_only, state=comm)
fp16_arg = grads(compression="fp16")
fp16_hook = grads(hook=hooks.fp16_compress_hook)
fp16_wrapped = grads(hook=wrapped_fp16)
m = model()
ddp = DDP(m, bucket_cap_mb=1e-3, first_bucket_mb=1e-3)
with ddp.no_sync():
    ddp(x).pow(2).sum().backward()
alone = np.concatenate([p.grad.numpy().ravel() for p in m.parameters()])
gathered = comm.allgather_obj(alone.tolist())
if rank == 0:
    print("RESULT", json.dumps({
        "mine_vs_default": float(np.abs(mine - default).max()),
        "sum_is_twice": float(np.abs(summed - 2 * default).max()),
        "local_undivided": float(np.abs(np.concatenate(local[::-1]) - alone).max()),
        "fp16_arg_vs_hook": float(np.abs(fp16_arg - fp16_hook).max()),
        "fp16_wrapped_vs_hook": float(np.abs(fp16_wrapped - fp16_hook).max()),
        "fp16_vs_default": float(np.abs(fp16_hook - default).max()),
        "mean_of_local": float(np.abs(np.mean(gathered, axis=0) - default).max()),
        "buckets": len(local)}))
"""


def test_two_ranks_hooks_average_like_the_default_and_fp16_is_a_hook(tmp_path):
    done = run_mpi(SCRIPT, nprocs=2, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    line = next(ln for ln in done.stdout.splitlines() if ln.startswith("RESULT"))
    r = json.loads(line.split(" ", 1)[1])
    assert r["mine_vs_default"] < 1e-6, r  # undivided buffer + sum + divide == the default
    assert r["sum_is_twice"] < 1e-5, r  # a hook decides: sum without dividing is 2x the mean
    assert r["fp16_arg_vs_hook"] == 0.0 and r["fp16_wrapped_vs_hook"] == 0.0, r
    assert 0 < r["fp16_vs_default"] < 1e-2, r  # 16-bit rounding, nothing worse
    assert r["mean_of_local"] < 1e-6, r
    assert r["local_undivided"] < 1e-7, r  # the hook saw this rank's gradient, not divided
    assert r["buckets"] >= 2, r


# --- the communicator registry -------------------------------------------------------------------


def _gpu_facts(**kw):
    base = {"device_is_cuda": True, "world_size": 2, "cupy": True, "nccl": False,
            "nccl_info": "no libnccl", "mpi_cuda_aware": False, "mpi_cuda_info": "no"}
    return CommFacts(**{**base, **kw})


@pytest.mark.parametrize("facts, kind", [
    (CommFacts(device_is_cuda=False, world_size=2), "host"),
    (_gpu_facts(), "mpi-host"),
    (_gpu_facts(mpi_cuda_aware=True), "mpi-cuda"),
    (_gpu_facts(world_size=1), "host"),
])
def test_comm_mpi_is_the_world_communicator_or_its_gpu_form(facts, kind):
    assert choose_comm("mpi", facts) == (kind, "")
    host = SingleProcessCommunicator()
    assert make_comm("mpi", host=host, device="cpu") is host


def test_a_registered_communicator_is_accepted_everywhere_without_other_edits():
    host = SingleProcessCommunicator()
    built = []

    def factory(h, dev):
        built.append(dev)
        return h

    entry = registry.CommEntry("toy", "a test communicator", factory,
                               rule=lambda facts: ("toy", "picked by its rule"))
    registry.COMMS.register(entry)
    try:
        assert choose_comm("toy", CommFacts(device_is_cuda=False, world_size=1)) == (
            "toy", "picked by its rule")
        assert make_comm("toy", host=host, device="cpu", verbose=False) is host and built
        help_text = CliRunner().invoke(cli, ["train", "--help"]).output
        assert "toy: a test communicator" in " ".join(help_text.split())
        from distprop.train.config import TrainConfig

        assert TrainConfig(comm="toy", model="mlp", dataset="digits").validate(1).comm == "toy"
    finally:
        registry.COMMS.unregister("toy")


def test_cli_lists_hooks_and_refuses_bad_powersgd_options():
    help_text = " ".join(CliRunner().invoke(cli, ["train", "--help"]).output.split())
    assert "powersgd: low-rank PowerSGD" in help_text and "mpi: the MPI world" in help_text
    done = CliRunner().invoke(cli, ["train", "--compression", "powersgd", "--powersgd-rank",
                                    "0", "--dry-run"])
    assert done.exit_code == 2, done.output
    assert "--powersgd-rank must be at least 1, got 0" in done.output
    done = CliRunner().invoke(cli, ["train", "--compression", "powersgd", "--powersgd-start",
                                    "1", "--dry-run"])
    assert done.exit_code == 2 and "--powersgd-start must be at least 2" in done.output
