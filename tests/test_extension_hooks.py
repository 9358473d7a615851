"""Public extension points: an optimizer written against the documented hooks
(``check_group``, ``array_state``, ``scalar_state``, ``advance``, ``kernel``,
``validate_state_entry``) works alone and under ZeRO on 2 real ranks; ``ddp.owner_of`` names
the DDP that syncs a parameter."""

import numpy as np
import pytest
from sign_momentum import SignMomentum

import distprop as dp
from distprop import nn
from distprop.distributed import DistributedDataParallel, ZeroRedundancyOptimizer
from distprop.distributed.comm import SingleProcessCommunicator
from distprop.distributed.ddp import owner_of

from helpers import run_mpi


def _model():
    dp.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 2)).to(np.float64)


def _reference(model, n):
    """The update rule in plain NumPy, on a copy of ``model``'s weights and the same data."""
    weights = [p.data.copy() for p in model.parameters()]
    bufs = [np.zeros_like(w) for w in weights]
    probe = _model()
    for step in range(1, n + 1):
        for p, w in zip(probe.parameters(), weights):
            p.data[...] = w
        probe.zero_grad()
        (probe(_batch(step)) ** 2).mean().backward()
        for w, b, p in zip(weights, bufs, probe.parameters()):
            b[...] = 0.9 * b + p.grad.data
            w -= 0.05 / step ** 0.5 * np.sign(b)
    return weights


def _batch(step):
    return dp.tensor(np.random.default_rng(step).standard_normal((8, 4)))


def _train(model, opt, n):
    for step in range(1, n + 1):
        opt.zero_grad()
        (model(_batch(step)) ** 2).mean().backward()
        opt.step()


@pytest.mark.parametrize("wrap", ["plain", "zero-world-of-one"])
def test_optimizer_from_public_hooks(wrap):
    model = _model()
    expected = _reference(model, 3)
    if wrap == "plain":
        opt = SignMomentum(model.parameters(), lr=0.05)
    else:
        opt = ZeroRedundancyOptimizer(model.parameters(), SignMomentum,
                                      process_group=SingleProcessCommunicator(), lr=0.05)
    _train(model, opt, 3)
    for p, w in zip(model.parameters(), expected):
        np.testing.assert_allclose(p.data, w, rtol=0, atol=1e-12)
    state = opt.state_dict()
    assert sorted(state["state"][0]) == ["buf", "step"] and int(state["state"][0]["step"]) == 3
    opt.load_state_dict(state)  # validate_state_entry accepts its own state


def test_hooks_check_settings_and_loaded_state():
    model = _model()
    with pytest.raises(ValueError, match="Invalid beta: 1.5"):
        SignMomentum(model.parameters(), beta=1.5)
    opt = SignMomentum(model.parameters(), lr=0.05)
    _train(model, opt, 1)
    state = opt.state_dict()
    state["state"][0]["buf"] = np.zeros(7)
    with pytest.raises(ValueError, match=r"state 'buf' of parameter 0 has shape \(7,\)"):
        opt.load_state_dict(state)
    state = opt.state_dict()
    state["state"][0]["exp_avg"] = np.zeros(1)
    with pytest.raises(ValueError, match="state 'exp_avg' .* SignMomentum with these settings"):
        opt.load_state_dict(state)


def test_optimizer_from_public_hooks_under_zero_on_two_ranks():
    """Every rank uses the same batch, so the averaged gradient is the local one and the sharded
    update must equal the plain optimizer's on one process."""
    script = """
import sys
sys.path.insert(0, 'tests')
from ddp_common import *
from distprop.distributed import ZeroRedundancyOptimizer
from sign_momentum import SignMomentum

def model():
    dp.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 2)).to(np.float64)

def train(m, opt):
    for step in range(1, 4):
        opt.zero_grad()
        x = dp.tensor(np.random.default_rng(step).standard_normal((8, 4)))
        (m(x) ** 2).mean().backward()
        opt.step()

ref, sharded = model(), model()
train(ref, SignMomentum(ref.parameters(), lr=0.05))
zero = ZeroRedundancyOptimizer(sharded.parameters(), SignMomentum, lr=0.05)
train(sharded, zero)
assert zero.last_step_reduced
for p, q in zip(sharded.parameters(), ref.parameters()):
    np.testing.assert_allclose(p.data, q.data, rtol=0, atol=1e-12)
zero.consolidate_state_dict(to=0)
if rank == 0:
    full = zero.state_dict()
    assert sorted(full["state"][0]) == ["buf", "step"], full["state"][0]
say("ok", zero.state_nbytes())
"""
    result = run_mpi(script, nprocs=2, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count(" ok ") == 2, result.stdout


def test_owner_of_names_the_ddp_that_syncs_a_parameter():
    comm = SingleProcessCommunicator()
    model = _model()
    assert all(owner_of(p) is None for p in model.parameters())
    first = DistributedDataParallel(model, comm=comm)
    assert all(owner_of(p) is first for p in model.parameters())
    second = DistributedDataParallel(model, comm=comm)  # re-wrapping replaces the owner
    assert all(owner_of(p) is second for p in model.parameters())
    assert all(owner_of(p) is None for p in _model().parameters())
