"""ZeroRedundancyOptimizer: sharded state under real mpiexec (2 and 3 ranks), checkpoints that
move between rank counts, and argument checks in one process."""

import re

import numpy as np
import pytest

import distprop as dp
from distprop import nn
from distprop.distributed import ZeroRedundancyOptimizer
from distprop.distributed.comm import SingleProcessCommunicator

from helpers import run_mpi

PRELUDE = """
import sys
sys.path.insert(0, 'tests')
from ddp_common import *
from distprop.distributed import ZeroRedundancyOptimizer as ZeRO

OPTS = {"sgd": (dp.optim.SGD, dict(lr=0.05, momentum=0.9)),
        "sgd-wd": (dp.optim.SGD, dict(lr=0.05, momentum=0.9, weight_decay=0.1)),
        "adam": (dp.optim.Adam, dict(lr=0.05 * 0.2))}

def groups(params, split):
    params = list(params)
    if not split:
        return params
    return [{"params": params[:1]}, {"params": params[1:3], "lr": 0.003}, {"params": params[3:]}]

def run(model, opt, steps, net=None, start=0, batch=12, n_ranks=1, me=0, sched=None):
    net = net or model
    x, y = make_data()
    per = batch // n_ranks
    for step in range(start, start + steps):
        s = (step * batch) % len(x)
        xb, yb = x[s:s + batch][me * per:(me + 1) * per], y[s:s + batch][me * per:(me + 1) * per]
        opt.zero_grad()
        ((net(dp.tensor(xb)) - dp.tensor(yb)) ** 2).mean().backward()
        opt.step()
        if sched is not None:
            sched.step()

def plain(kind, split=False, unused=False, steps=10, sched=False):
    model = mlp(0, unused=unused)
    cls, kw = OPTS[kind]
    opt = cls(groups(model.parameters(), split), **kw)
    lr = dp.optim.lr_scheduler.StepLR(opt, 3, 0.5) if sched else None
    run(model, opt, steps, sched=lr)
    return model, opt

def same_state(a, b):
    assert a["param_groups"] == b["param_groups"], (a["param_groups"], b["param_groups"])
    assert list(a["state"]) == list(b["state"]), (list(a["state"]), list(b["state"]))
    err = 0.0
    for i, entry in a["state"].items():
        assert list(entry) == list(b["state"][i]), (list(entry), list(b["state"][i]))
        for k, v in entry.items():
            w = b["state"][i][k]
            assert v.shape == w.shape and v.dtype == w.dtype, (i, k, v.shape, w.shape)
            err = max(err, float(np.abs(v - w).max()))
    return err
"""


def mpi(body: str, nprocs: int, args=()):
    result = run_mpi(PRELUDE + body, nprocs=nprocs, timeout=60, args=args)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count("DONE") == nprocs, result.stdout + result.stderr
    return result.stdout


EQUIVALENCE = """
CONFIGS = [  # name, optimizer, DDP, parameter groups, unused parameter, LR schedule
    ("sgd", "sgd", False, False, False, False),
    ("adam", "adam", False, False, False, False),
    ("sgd+ddp", "sgd", True, False, False, False),
    ("adam+ddp", "adam", True, False, False, False),
    ("adam-groups-steplr", "adam", False, True, False, True),
    ("sgd-wd-unused", "sgd-wd", False, False, True, False),
]
for name, kind, use_ddp, split, unused, sched in CONFIGS:
    ref_model, ref_opt = plain(kind, split, unused, sched=sched)
    model = mlp(seed=rank, unused=unused)  # replicas start different: ZeRO broadcasts rank 0's
    net = DDP(model, bucket_cap_mb=1e-4) if use_ddp else None
    cls, kw = OPTS[kind]
    opt = ZeRO(groups(model.parameters(), split), cls, **kw)
    lr = dp.optim.lr_scheduler.StepLR(opt, 3, 0.5) if sched else None
    run(model, opt, 10, net, n_ranks=world, me=rank, sched=lr)
    assert opt.last_step_reduced == (not use_ddp), (name, opt.last_step_reduced)
    err = max_diff(model.parameters(), [p.data for p in ref_model.parameters()])
    if unused:  # never had a gradient: untouched despite weight decay, no state (as PyTorch)
        spare = mlp(0, unused=True).seq.spare.weight.data
        assert np.array_equal(model.seq.spare.weight.data, spare)
    opt.consolidate_state_dict(to=world - 1)
    if rank == world - 1:
        state_err = same_state(opt.state_dict(), ref_opt.state_dict())
    else:
        try:
            opt.state_dict()
            raise AssertionError("state_dict() on a rank without the consolidated state")
        except RuntimeError as exc:
            assert "consolidate_state_dict" in str(exc)
        state_err = 0.0
    say(f"{name} err={err:.2e} state_err={state_err:.2e} shard={opt.state_nbytes()}")
    assert err < 1e-10 and state_err < 1e-10, (name, err, state_err)
say("DONE")
"""


@pytest.mark.mpi
@pytest.mark.parametrize("nprocs", [2, 3])
def test_equivalence_with_plain_optimizer(nprocs):
    """SGD-momentum and Adam sharded over N ranks (each on 12/N samples; alone, reduce-scattering,
    and behind DDP, slicing the averaged gradient), with parameter groups cutting through the
    shards, an LR schedule, and a parameter that never gets a gradient: the same parameters after
    10 steps as one process with the plain optimizer on 12 samples, and a consolidated
    state_dict equal to the plain optimizer's (float64)."""
    out = mpi(EQUIVALENCE, nprocs)
    errs = [float(e) for e in re.findall(r"err=(\S+)", out)]
    assert len(errs) == 2 * 6 * nprocs and max(errs) < 1e-10
    shards = [int(s) for s in re.findall(r"adam err=\S+ state_err=\S+ shard=(\d+)", out)]
    # exp_avg + exp_avg_sq for ~163/N float64 elements, and a float32 step per piece (<= 4)
    assert len(shards) == nprocs and max(shards) <= (163 // nprocs + nprocs) * 16 + 4 * 4


SAVE = """
path = sys.argv[1]
model = mlp(0)
opt = ZeRO(model.parameters(), dp.optim.Adam, lr=0.01)
run(model, opt, 5, n_ranks=world, me=rank)
opt.consolidate_state_dict(to=0)
if rank == 0:
    dp.save({"model": model.state_dict(), "optimizer": opt.state_dict()}, path)
comm.barrier()
say("DONE")
"""

RESUME = """
path = sys.argv[1]
ckpt = dp.load(path)
ref_model = mlp(0)
ref_opt = dp.optim.Adam(ref_model.parameters(), lr=0.01)
run(ref_model, ref_opt, 10)
for kind in ("zero", "plain"):
    model = mlp(1)
    model.load_state_dict(ckpt["model"])
    if kind == "zero":
        opt = ZeRO(model.parameters(), dp.optim.Adam, lr=0.5)
        opt.load_state_dict(ckpt["optimizer"])
        assert opt.param_groups[0]["lr"] == 0.01 and opt.optim.param_groups[0]["lr"] == 0.01
        run(model, opt, 5, start=5, n_ranks=world, me=rank)
    else:  # the consolidated state loads into the unsharded optimizer too
        opt = dp.optim.Adam(model.parameters(), lr=0.5)
        opt.load_state_dict(ckpt["optimizer"])
        run(model, opt, 5, start=5)
    err = max_diff(model.parameters(), [p.data for p in ref_model.parameters()])
    say(f"{kind} err={err:.2e}")
    assert err < 1e-10, (kind, err)
# The unsharded optimizer's own state_dict loads into ZeRO as well.
model = mlp(0)
opt = ZeRO(model.parameters(), dp.optim.Adam, lr=0.01)
opt.load_state_dict(ref_opt.state_dict())
opt.consolidate_state_dict(0)
if rank == 0:
    assert same_state(opt.state_dict(), ref_opt.state_dict()) == 0.0
say("DONE")
"""


@pytest.mark.mpi
def test_checkpoint_from_two_ranks_resumes_on_three(tmp_path):
    """Adam state consolidated on 2 ranks and saved with dp.save loads into ZeRO on 3 ranks (and
    into plain Adam); 5 + 5 steps equal 10 uninterrupted steps of plain Adam."""
    path = str(tmp_path / "zero.npz")
    mpi(SAVE, 2, args=(path,))
    out = mpi(RESUME, 3, args=(path,))
    assert len(re.findall(r"err=", out)) == 6


MISMATCH = """
model = mlp(0, hidden=16 if rank == 0 else 17)
try:
    ZeRO(model.parameters(), dp.optim.SGD, lr=0.1)
except ValueError as exc:
    say("error:", exc)
say("DONE")
"""


@pytest.mark.mpi
def test_different_parameters_across_ranks_raise_everywhere():
    out = mpi(MISMATCH, 2)
    assert out.count("error: ZeroRedundancyOptimizer: ranks 0 and 1 were given different "
                     "parameters: parameter 0 of group 0 is (16, 6) float64 on rank 0 but "
                     "(17, 6) float64 on rank 1") == 2


# --- one process ---------------------------------------------------------------------------


def _model():
    dp.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 2)).to(np.float64)


def _steps(model, opt, n=4):
    rng = np.random.default_rng(0)
    for _ in range(n):
        opt.zero_grad()
        x = dp.tensor(rng.standard_normal((8, 4)))
        (model(x) ** 2).mean().backward()
        opt.step()


@pytest.mark.parametrize("cls,kwargs", [(dp.optim.SGD, {"lr": 0.1, "momentum": 0.9}),
                                        (dp.optim.Adam, {"lr": 0.01, "amsgrad": True}),
                                        (dp.optim.Adagrad, {"lr": 0.1})])
def test_world_of_one_is_the_plain_optimizer(cls, kwargs):
    ref, model = _model(), _model()
    plain = cls(ref.parameters(), **kwargs)
    zero = ZeroRedundancyOptimizer(model.parameters(), cls,
                                   process_group=SingleProcessCommunicator(), **kwargs)
    _steps(ref, plain)
    _steps(model, zero)
    for p, q in zip(model.parameters(), ref.parameters()):
        np.testing.assert_array_equal(p.data, q.data)
    a, b = zero.state_dict(), plain.state_dict()  # world of one: consolidates by itself
    assert a["param_groups"] == b["param_groups"] and list(a["state"]) == list(b["state"])
    for i in a["state"]:
        for k in b["state"][i]:
            np.testing.assert_array_equal(a["state"][i][k], b["state"][i][k])
    assert not zero.last_step_reduced
    assert zero.state_nbytes() == sum(v.nbytes for e in plain.state.values() for v in e.values())


def test_bad_arguments():
    model = _model()
    comm = SingleProcessCommunicator()
    for bad in (object, dp.optim.SGD(_model().parameters(), lr=0.1), ZeroRedundancyOptimizer,
                "adam"):
        with pytest.raises(TypeError, match="optimizer_class"):
            ZeroRedundancyOptimizer(model.parameters(), bad, comm=comm, lr=0.1)
    try:
        import torch
    except ImportError:  # pragma: no cover
        pass
    else:
        with pytest.raises(TypeError, match="distprop.optim.Optimizer subclass"):
            ZeroRedundancyOptimizer(model.parameters(), torch.optim.Adam, comm=comm)
    with pytest.raises(TypeError, match="unexpected keyword argument 'momentun'"):
        ZeroRedundancyOptimizer(model.parameters(), dp.optim.SGD, comm=comm, momentun=0.9)
    with pytest.raises(ValueError, match="Invalid learning rate"):
        ZeroRedundancyOptimizer(model.parameters(), dp.optim.SGD, comm=comm, lr=-1.0)
    with pytest.raises(ValueError, match="gradients_averaged"):
        ZeroRedundancyOptimizer(model.parameters(), dp.optim.SGD, comm=comm,
                                gradients_averaged="yes")
    with pytest.raises(ValueError, match="empty parameter list"):
        ZeroRedundancyOptimizer([], dp.optim.SGD, comm=comm)
    zero = ZeroRedundancyOptimizer(model.parameters(), dp.optim.Adam, comm=comm, lr=0.01)
    with pytest.raises(ValueError, match="not a rank"):
        zero.consolidate_state_dict(to=1)
    _steps(model, zero, 1)
    good = zero.state_dict()
    with pytest.raises(ValueError, match="number of parameter groups"):
        zero.load_state_dict({"state": {}, "param_groups": good["param_groups"] * 2})
    bad = {"state": {0: {**good["state"][0], "exp_avg": np.zeros((4, 5))}},
           "param_groups": good["param_groups"]}
    with pytest.raises(ValueError, match=r"exp_avg' of parameter 0 has shape \(4, 5\) but the "
                                         r"parameter has shape \(5, 4\)"):
        zero.load_state_dict(bad)
    with pytest.raises(ValueError, match="which Adam with these settings does not use"):
        zero.load_state_dict({"state": {0: {**good["state"][0], "momentum_buffer": 0}},
                              "param_groups": good["param_groups"]})


def test_reshards_when_parameters_move_and_supports_param_groups_added_later():
    """Re-flattening the parameters (here: a new flat buffer) keeps the state; a group added
    later gets its own hyper-parameters."""
    ref, model = _model(), _model()
    plain = dp.optim.Adam(list(ref.parameters())[:2], lr=0.01)
    zero = ZeroRedundancyOptimizer(list(model.parameters())[:2], dp.optim.Adam,
                                   comm=SingleProcessCommunicator(), lr=0.01)
    _steps(ref, plain, 2)
    _steps(model, zero, 2)
    dp.optim.flatten(list(model.parameters())[::-1])  # new buffers, reversed layout
    plain.add_param_group({"params": list(ref.parameters())[2:], "lr": 0.02})
    zero.add_param_group({"params": list(model.parameters())[2:], "lr": 0.02})
    _steps(ref, plain, 2)
    _steps(model, zero, 2)
    for p, q in zip(model.parameters(), ref.parameters()):
        np.testing.assert_allclose(p.data, q.data, rtol=0, atol=1e-14)
    assert zero.state_dict()["param_groups"] == plain.state_dict()["param_groups"]


TRAINER = """
import os
from distprop.train import fit
from distprop.train.callbacks import Checkpointer
x, y = make_data(48)
data = dp.data.TensorDataset(x, y)
final, saved = {}, {}
for kind in ("plain", "zero", "plain-resumed", "zero-resumed"):
    model = mlp(0)
    if kind.startswith("plain"):
        opt = dp.optim.Adam(model.parameters(), lr=0.01)
    else:
        opt = ZeRO(model.parameters(), dp.optim.Adam, lr=0.01)
    folder = os.path.join(sys.argv[1], kind.split("-")[0])
    resume = saved[kind.split("-")[0]] if kind.endswith("resumed") else None
    history = fit(model, nn.MSELoss(), opt, data, epochs=3 if resume else 2, batch_size=6,
                  callbacks=[Checkpointer(folder)], log_every=100, resume=resume)
    saved[kind] = comm.broadcast_obj(history.checkpoints[-1] if rank == 0 else None)
    final[kind] = [p.data.copy() for p in model.parameters()]
pairs = [("zero", "plain"), ("zero-resumed", "plain-resumed")]
err = max(max_diff(final[a], final[b]) for a, b in pairs)
if rank == 0:  # the checkpoints' optimizer states (ZeRO's consolidated on rank 0)
    err = max(err, *(same_state(dp.load(saved[a])["optimizer"], dp.load(saved[b])["optimizer"])
                     for a, b in pairs))
say(f"err={err:.2e}")
assert err < 1e-10 and max_diff(final["zero"], final["zero-resumed"]) > 1e-6
say("DONE")
"""


@pytest.mark.mpi
def test_trainer_checkpoints_consolidated_state_and_resumes(tmp_path):
    """fit() with ZeRO behind the trainer's DDP on 2 ranks: same parameters as plain Adam, rank 0
    writes checkpoints whose optimizer state equals plain Adam's, and resuming continues alike."""
    out = mpi(TRAINER, 2, args=(str(tmp_path),))
    assert len(re.findall(r"err=", out)) == 2
