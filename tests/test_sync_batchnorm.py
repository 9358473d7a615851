"""SyncBatchNorm: N ranks x B/N == one process x B (real mpiexec), conversion, world size 1."""

import re

import numpy as np
import pytest

import distprop as dp
from distprop import nn
from distprop.distributed import SyncBatchNorm

from helpers import run_mpi

PRELUDE = "import sys\nsys.path.insert(0, 'tests')\nfrom ddp_common import *\n" \
          "from distprop.distributed import SyncBatchNorm\n"


def mpi(body: str, nprocs: int):
    result = run_mpi(PRELUDE + body, nprocs=nprocs, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count("DONE") == nprocs, result.stdout + result.stderr
    return result.stdout


TRAINING = """
def bn_model(kind):
    dp.manual_seed(0)
    if kind == "conv":
        layers = [nn.Conv2d(2, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(64, 3)]
    else:
        bn = nn.BatchNorm1d(8, momentum=None if kind == "cumulative" else 0.1)
        layers = [nn.Linear(6, 8), bn, nn.Tanh(), nn.Linear(8, 3)]
    return nn.Sequential(*layers).to(np.float64)

def data(kind):
    rng = np.random.default_rng(5)
    shape = (48, 2, 6, 6) if kind == "conv" else (48, 6)
    return rng.standard_normal(shape) * 2 + 0.5, rng.standard_normal((48, 3))

def run(model, x, y, n_ranks, me, batch=12):
    opt = dp.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    per = batch // n_ranks
    for step in range(10):
        s = (step * batch) % len(x)
        xb, yb = x[s:s + batch][me * per:(me + 1) * per], y[s:s + batch][me * per:(me + 1) * per]
        opt.zero_grad()
        ((model(dp.tensor(xb)) - dp.tensor(yb)) ** 2).mean().backward()
        opt.step()

for kind in ("linear", "cumulative", "conv"):
    x, y = data(kind)
    ref = bn_model(kind)
    run(ref, x, y, 1, 0)
    model = SyncBatchNorm.convert_sync_batchnorm(bn_model(kind))
    assert isinstance(model[1], SyncBatchNorm)
    ddp = DDP(model, bucket_cap_mb=1e-4)
    run(ddp, x, y, world, rank)
    err = max_diff(model.parameters(), [p.data for p in ref.parameters()])
    stats = {k: float(np.abs(v.data - ref.state_dict()[k].data).max())
             for k, v in model.state_dict().items() if "running" in k or "batches" in k}
    assert stats, model.state_dict().keys()
    say(f"{kind} err={err:.2e} stats={max(stats.values()):.2e}")
    assert err < 1e-10 and max(stats.values()) < 1e-10, (kind, err, stats)
    # Without synchronisation the statistics would be per-rank ones: make sure that differs.
    local = bn_model(kind)
    run(DDP(local, bucket_cap_mb=1e-4), x, y, world, rank)
    assert max_diff(local.parameters(), [p.data for p in ref.parameters()]) > 1e-6
say("DONE")
"""


@pytest.mark.mpi
@pytest.mark.parametrize("nprocs", [2, 3])
def test_training_equals_one_process(nprocs):
    """BatchNorm1d (momentum and cumulative average) and BatchNorm2d models converted to
    SyncBatchNorm, trained 10 steps with DDP on N ranks x 12/N samples, match one process on 12:
    parameters, running statistics and num_batches_tracked (float64)."""
    out = mpi(TRAINING, nprocs)
    errs = [float(e) for e in re.findall(r"(?:err|stats)=(\S+)", out)]
    assert len(errs) == 6 * nprocs and max(errs) < 1e-10


UNEVEN = """
SIZES = {2: [5, 3], 3: [4, 0, 3]}[world]
rng = np.random.default_rng(7)
for shape, dtype, affine, track in [((8, 5), np.float64, True, True),
                                    ((8, 5, 3), np.float64, False, True),
                                    ((8, 5), np.float64, True, False),
                                    ((8, 5, 2, 2), np.float32, True, True)]:
    n_total = sum(SIZES)
    x_all = (rng.standard_normal((n_total,) + shape[1:]) * 3 + 1).astype(dtype)
    w_all = rng.standard_normal(x_all.shape).astype(dtype)
    state = {}
    if affine:
        state = {"weight": rng.standard_normal(5).astype(dtype),
                 "bias": rng.standard_normal(5).astype(dtype)}
    if track:
        state.update(running_mean=rng.standard_normal(5).astype(dtype),
                     running_var=rng.uniform(0.5, 2, 5).astype(dtype),
                     num_batches_tracked=np.array(3))
    ref_cls = nn.BatchNorm1d if len(shape) < 4 else nn.BatchNorm2d
    ref = ref_cls(5, momentum=0.3, affine=affine, track_running_stats=track).to(dtype)
    sync = SyncBatchNorm(5, momentum=0.3, affine=affine, track_running_stats=track).to(dtype)
    ref.load_state_dict(state)
    sync.load_state_dict(state)
    lo = sum(SIZES[:rank])
    rows = slice(lo, lo + SIZES[rank])
    xr = dp.tensor(x_all, requires_grad=True)
    out_ref = ref(xr)
    (out_ref * dp.tensor(w_all)).sum().backward()
    xs = dp.tensor(x_all[rows], requires_grad=True)
    out = sync(xs)
    (out * dp.tensor(w_all[rows])).sum().backward()
    tol = 1e-10 if dtype == np.float64 else 2e-5
    assert out.dtype == dtype and xs.grad.dtype == dtype, (out.dtype, xs.grad.dtype)
    errs = [np.abs(out.data - out_ref.data[rows]).max(initial=0),
            np.abs(xs.grad.data - xr.grad.data[rows]).max(initial=0)]
    for p, q in zip(sync.parameters(), ref.parameters()):
        total = p.grad.data.copy()
        comm.allreduce(total, "sum")
        errs.append(np.abs(total - q.grad.data).max())
    for k, v in sync.state_dict().items():
        errs.append(np.abs(v.data - ref.state_dict()[k].data).max())
    err = float(max(errs))
    say(f"shape={shape} dtype={np.dtype(dtype).name} affine={affine} track={track} err={err:.2e}")
    assert err < tol, err
# Eval mode normalises with the (identical) running statistics; no communication.
sync.eval()
ref.eval()
xe = x_all[:3]
assert np.abs(sync(dp.tensor(xe)).data - ref(dp.tensor(xe)).data).max() < 1e-5
say("DONE")
"""


@pytest.mark.mpi
@pytest.mark.parametrize("nprocs", [2, 3])
def test_uneven_batches_forward_backward_and_running_stats(nprocs):
    """Ranks with different numbers of samples (one with none on 3 ranks): outputs, input
    gradients, summed weight/bias gradients and running statistics equal those of BatchNorm on
    the concatenated batch; (N, C), (N, C, L) and (N, C, H, W) inputs; float32 stays float32."""
    out = mpi(UNEVEN, nprocs)
    assert len(re.findall(r"err=", out)) == 4 * nprocs


def _nested():
    dp.manual_seed(0)
    block = nn.Sequential(nn.Conv2d(1, 3, 3), nn.BatchNorm2d(3, momentum=0.2), nn.ReLU())
    return nn.Sequential(block, nn.Flatten(), nn.Linear(12, 4), nn.BatchNorm1d(4, eps=1e-3),
                         nn.LayerNorm(4))


def test_convert_keeps_parameters_buffers_keys_and_mode():
    model = _nested()
    model[0][1].eval()
    keys = list(model.state_dict().keys())
    before = {k: v.data.copy() for k, v in model.state_dict().items()}
    params = {n: p for n, p in model.named_parameters()}
    buffers = {n: b for n, b in model.named_buffers()}
    converted = SyncBatchNorm.convert_sync_batchnorm(model)
    assert converted is model
    assert isinstance(model[0][1], SyncBatchNorm) and isinstance(model[3], SyncBatchNorm)
    assert type(model[4]) is nn.LayerNorm
    assert list(model.state_dict().keys()) == keys
    assert all(params[n] is p for n, p in model.named_parameters())
    assert all(buffers[n] is b for n, b in model.named_buffers())
    for k, v in model.state_dict().items():
        np.testing.assert_array_equal(v.data, before[k])
    assert model[0][1].momentum == 0.2 and model[3].eps == 1e-3
    assert not model[0][1].training and model[3].training
    root = SyncBatchNorm.convert_sync_batchnorm(nn.BatchNorm1d(2, affine=False))
    assert isinstance(root, SyncBatchNorm) and root.weight is None
    assert dp.nn.SyncBatchNorm is SyncBatchNorm
    with pytest.raises(TypeError, match="expects a Module"):
        SyncBatchNorm.convert_sync_batchnorm("model")


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("momentum", [0.1, None])
def test_world_size_one_is_batchnorm(dtype, momentum):
    """One process: SyncBatchNorm is BatchNorm (train and eval, outputs, gradients, stats)."""
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((6, 3, 4)) * 2 + 1).astype(dtype)
    g = rng.standard_normal(x.shape).astype(dtype)
    ref = nn.BatchNorm1d(3, momentum=momentum).to(dtype)
    sync = SyncBatchNorm.convert_sync_batchnorm(nn.BatchNorm1d(3, momentum=momentum).to(dtype))
    for model in (ref, sync):
        model.weight.data[...] = [0.5, 2.0, -1.0]
    for _ in range(2):
        outs = []
        for model in (ref, sync):
            xt = dp.tensor(x, requires_grad=True)
            out = model(xt)
            (out * dp.tensor(g)).sum().backward()
            outs.append((out.data, xt.grad.data, model.weight.grad.data))
        for a, b in zip(*outs):
            np.testing.assert_array_equal(a, b)
            assert a.dtype == dtype
    for k, v in sync.state_dict().items():
        np.testing.assert_array_equal(v.data, ref.state_dict()[k].data)
    sync.eval()
    ref.eval()
    np.testing.assert_array_equal(sync(dp.tensor(x)).data, ref(dp.tensor(x)).data)


def test_bad_inputs_are_named():
    layer = SyncBatchNorm(4)
    with pytest.raises(ValueError, match=r"SyncBatchNorm\(4\): expected at least 2D input"):
        layer(dp.tensor(np.zeros(4)))
    with pytest.raises(ValueError, match=r"expected input with 4 channels .* shape \(2, 3\)"):
        layer(dp.tensor(np.zeros((2, 3))))
    with pytest.raises(TypeError, match="floating-point"):
        layer(dp.tensor(np.zeros((2, 4), dtype=np.int64)))
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        layer(dp.tensor(np.zeros((1, 4))))
