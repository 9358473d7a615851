"""Mixed precision: dp.amp.autocast and dp.amp.GradScaler against PyTorch and float32 training.

Tolerances: float16 has a 2^-11 ~ 4.9e-4 relative rounding step. One autocast GEMM (float32
accumulation, one rounding) matches PyTorch's CPU autocast to 2 float16 ulps; gradients and a
short training run are compared with float32 at 2e-2 relative error (several roundings).
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import threading

import numpy as np
import pytest
import torch
import torch.nn.functional as TF

import distprop as dp
import distprop.nn.functional as F
from distprop import nn
from distprop.amp import GradScaler, autocast
from distprop.data import sources
from distprop.distributed.comm import SingleProcessCommunicator
from distprop.train import callbacks as cbs
from distprop.train.trainer import Trainer

from helpers import run_mpi

F16, F32, F64 = np.dtype(np.float16), np.dtype(np.float32), np.dtype(np.float64)


def _arr(*shape, seed=0, dtype=np.float32):
    return np.random.default_rng(seed).standard_normal(shape).astype(dtype)


X, W, B = _arr(4, 6), _arr(5, 6, seed=1), _arr(5, seed=2)
IMG, KER = _arr(2, 3, 6, 6, seed=3), _arr(4, 3, 3, 3, seed=4)
Q, K_, V = _arr(2, 3, 4, seed=5), _arr(2, 3, 4, seed=6), _arr(2, 3, 4, seed=7)
H = _arr(4, 5, seed=8)
TARGET = np.array([0, 1, 2, 3])


def _dp(*arrays):
    return [dp.tensor(a) for a in arrays]


def _torch(*arrays):
    return [torch.tensor(a) for a in arrays]


# name, distprop op, PyTorch op (None: PyTorch's CPU list differs, see `why`), expected dtype,
# why. Our lists are PyTorch's CUDA lists (what GPU users get); on the CPU PyTorch keeps
# softmax, norms, sum and exp in float16.
DTYPE_TABLE = [
    ("linear", lambda: F.linear(*_dp(X, W, B)), lambda: TF.linear(*_torch(X, W, B)), F16, ""),
    ("matmul", lambda: dp.matmul(*_dp(X, W.T)), lambda: torch.matmul(*_torch(X, W.T)), F16, ""),
    ("bmm (batched matmul)", lambda: dp.matmul(*_dp(Q, K_.transpose(0, 2, 1))),
     lambda: torch.bmm(*_torch(Q, K_.transpose(0, 2, 1))), F16, ""),
    ("conv2d", lambda: F.conv2d(*_dp(IMG, KER)), lambda: TF.conv2d(*_torch(IMG, KER)), F16, ""),
    ("attention", lambda: F.scaled_dot_product_attention(*_dp(Q, K_, V)),
     lambda: TF.scaled_dot_product_attention(*_torch(Q, K_, V)), F16, ""),
    ("cross_entropy", lambda: F.cross_entropy(dp.tensor(H), dp.tensor(TARGET)),
     lambda: TF.cross_entropy(torch.tensor(H), torch.tensor(TARGET)), F32, ""),
    ("mse_loss", lambda: F.mse_loss(*_dp(H, X[:, :5])),
     lambda: TF.mse_loss(*_torch(H, X[:, :5])), F32, ""),
    ("relu (runs in its input dtype)", lambda: F.relu(F.linear(*_dp(X, W))),
     lambda: TF.relu(TF.linear(*_torch(X, W))), F16, ""),
    ("add float16 + float32 (promotes)", lambda: F.linear(*_dp(X, W)) + dp.tensor(H),
     lambda: TF.linear(*_torch(X, W)) + torch.tensor(H), F32, ""),
    ("cat float16, float32 (promotes)", lambda: dp.cat([F.linear(*_dp(X, W)), dp.tensor(H)]),
     lambda: torch.cat([TF.linear(*_torch(X, W)), torch.tensor(H)]), F32, ""),
    ("float64 matmul stays float64", lambda: dp.matmul(*_dp(X.astype(F64), W.T.astype(F64))),
     lambda: torch.matmul(*_torch(X.astype(F64), W.T.astype(F64))), F64, ""),
    ("softmax", lambda: F.softmax(F.linear(*_dp(X, W)), dim=-1), None, F32, "CUDA list"),
    ("log_softmax", lambda: F.log_softmax(F.linear(*_dp(X, W)), dim=-1), None, F32, "CUDA list"),
    ("layer_norm", lambda: F.layer_norm(F.linear(*_dp(X, W)), (5,)), None, F32, "CUDA list"),
    ("batch_norm", lambda: F.batch_norm(F.linear(*_dp(X, W)), dp.zeros(5), dp.ones(5),
                                        training=True), None, F32, "float32 statistics"),
    ("sum", lambda: F.linear(*_dp(X, W)).sum(), None, F32, "CUDA list"),
    ("mean", lambda: F.linear(*_dp(X, W)).mean(), None, F32, "float32 reductions"),
    ("exp", lambda: dp.exp(F.linear(*_dp(X, W))), None, F32, "CUDA list"),
    ("log", lambda: dp.log(dp.abs(F.linear(*_dp(X, W))) + 1.0), None, F32, "CUDA list"),
]


@pytest.mark.parametrize("name, ours, theirs, expected, why", DTYPE_TABLE,
                         ids=[row[0] for row in DTYPE_TABLE])
def test_autocast_dtype_table(name, ours, theirs, expected, why):
    with autocast():
        out = ours()
    assert out.dtype == expected, name
    if theirs is not None:
        with torch.autocast("cpu", dtype=torch.float16):
            ref = theirs()
        assert str(ref.dtype).replace("torch.", "") == expected.name
        np.testing.assert_allclose(out.numpy().astype(np.float64),
                                   ref.detach().numpy().astype(np.float64),
                                   rtol=2e-3, atol=2e-3, err_msg=name)
    # Outside autocast nothing changes: float32 in, float32 out.
    assert ours().dtype in (F32, F64)


def test_linear_gradients_match_torch_autocast():
    """Parameters stay float32 and get float32 gradients equal to PyTorch's autocast ones."""
    w, b = dp.tensor(W, requires_grad=True), dp.tensor(B, requires_grad=True)
    tw, tb = torch.tensor(W, requires_grad=True), torch.tensor(B, requires_grad=True)
    with autocast():
        loss = F.cross_entropy(F.linear(dp.tensor(X), w, b), dp.tensor(TARGET))
    with torch.autocast("cpu", dtype=torch.float16):
        tloss = TF.cross_entropy(TF.linear(torch.tensor(X), tw, tb), torch.tensor(TARGET))
    loss.backward()
    tloss.backward()
    assert loss.dtype == F32 and w.dtype == F32 and w.grad.dtype == F32 and b.grad.dtype == F32
    np.testing.assert_allclose(loss.item(), tloss.item(), rtol=1e-3)
    np.testing.assert_allclose(w.grad.numpy(), tw.grad.numpy(), rtol=5e-3, atol=5e-3)
    np.testing.assert_allclose(b.grad.numpy(), tb.grad.numpy(), rtol=5e-3, atol=5e-3)


class _ConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.norm = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4 * 4 * 4, 3)

    def forward(self, x):
        return self.fc(F.relu(self.norm(self.conv(x))).reshape(x.shape[0], -1))


@pytest.mark.parametrize("model", ["mlp", "conv"])
def test_autocast_gradients_close_to_float32(model):
    """Finite differences do not apply to float16: compare with the float32 gradients."""
    dp.manual_seed(0)
    if model == "mlp":
        net = nn.Sequential(nn.Linear(6, 16), nn.LayerNorm(16), nn.Tanh(), nn.Linear(16, 3))
        x = dp.tensor(np.tile(X, (4, 1)))
    else:
        net, x = _ConvNet(), dp.tensor(IMG)
    y = dp.tensor(np.arange(x.shape[0]) % 3)
    grads = []
    for enabled in (False, True):
        net.zero_grad()
        with autocast(enabled=enabled):
            loss = F.cross_entropy(net(x), y)
        loss.backward()
        grads.append([p.grad.numpy().copy() for p in net.parameters()])
    overall = max(np.abs(g).max() for g in grads[0])
    for (name, p), g32, g16 in zip(net.named_parameters(), *grads):
        assert p.grad.dtype == F32, name
        # 2e-2 of the parameter's largest gradient, plus 1e-3 of the model's (a bias before
        # BatchNorm has a true gradient of 0: what it gets is float16 rounding noise)
        assert np.abs(g16 - g32).max() <= 2e-2 * np.abs(g32).max() + 1e-3 * overall, name


def test_intermediate_gradients_have_their_tensors_dtype():
    """A float32 gradient reaching a float16 output (here through float16 + float32) is cast to
    float16 before the GEMM's backward, as PyTorch's engine does."""
    w = dp.tensor(W, requires_grad=True)
    with autocast():
        h = F.linear(dp.tensor(X), w)
        h.retain_grad()
        (h + dp.tensor(H)).sum().backward()
    assert h.dtype == F16 and h.grad.dtype == F16 and w.grad.dtype == F32


def _digits(n=96, seed=0):
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((3, 10)).astype(np.float32) * 2
    y = np.arange(n) % 3
    return (centers[y] + rng.standard_normal((n, 10)).astype(np.float32)), y


def _train(amp_on: bool, steps=30):
    dp.manual_seed(1)
    net = nn.Sequential(nn.Linear(10, 32), nn.ReLU(), nn.Linear(32, 3))
    opt = dp.optim.Adam(net.parameters(), lr=0.01)
    scaler = GradScaler(enabled=amp_on)
    x, y = _digits()
    losses = []
    for step in range(steps):
        sl = slice((step % 4) * 24, (step % 4 + 1) * 24)
        opt.zero_grad()
        with autocast(enabled=amp_on):
            loss = F.cross_entropy(net(dp.tensor(x[sl])), dp.tensor(y[sl]))
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        losses.append(loss.item())
    return net, losses, scaler


def test_float16_training_tracks_float32():
    """30 Adam steps of a small mlp: autocast + GradScaler stays within 2e-2 (relative to the
    largest weight) of float32 training, and the loss falls the same way."""
    net16, losses16, scaler = _train(True)
    net32, losses32, _ = _train(False)
    assert scaler.skipped_steps == 0 and scaler.get_scale() == 2.0 ** 16
    for (name, p16), p32 in zip(net16.named_parameters(), net32.parameters()):
        assert p16.dtype == F32, name
        a, b = p16.numpy(), p32.numpy()
        assert np.abs(a - b).max() <= 2e-2 * np.abs(b).max(), name
    assert losses16[-1] < 0.5 * losses16[0]
    np.testing.assert_allclose(losses16, losses32, rtol=2e-2, atol=2e-3)


def _scaler_run(framework: str, losses_scale, **kw):
    """SGD on a tiny linear model; the loss of step i is multiplied by losses_scale[i] (inf
    injects a non-finite gradient). Returns (scales after each update, skipped, params)."""
    w0 = _arr(3, 2, seed=9)
    x = _arr(4, 2, seed=10)
    scales, skipped = [], []
    if framework == "torch":
        w = torch.tensor(w0, requires_grad=True)
        opt = torch.optim.SGD([w], lr=0.1)
        scaler = torch.amp.GradScaler("cpu", **kw)
        for m in losses_scale:
            opt.zero_grad()
            loss = (torch.tensor(x) @ w.T).square().mean() * m
            scaler.scale(loss).backward()
            before = w.detach().clone()
            scaler.step(opt)
            skipped.append(bool(torch.equal(before, w.detach())))
            scaler.update()
            scales.append(scaler.get_scale())
        return scales, skipped, w.detach().numpy()
    w = nn.Parameter(dp.tensor(w0))
    opt = dp.optim.SGD([w], lr=0.1)
    scaler = GradScaler(**kw)
    for m in losses_scale:
        opt.zero_grad()
        loss = (dp.matmul(dp.tensor(x), w.T) ** 2).mean() * m
        scaler.scale(loss).backward()
        before = w.numpy().copy()
        scaler.step(opt)
        skipped.append(bool(np.array_equal(before, w.numpy())))
        scaler.update()
        scales.append(scaler.get_scale())
    return scales, skipped, w.numpy()


SCALER_CASES = [
    ("grow every 3", [1.0] * 7, dict(init_scale=4.0, growth_interval=3)),
    ("inf backs off and resets growth", [1, 1, float("inf"), 1, 1, 1, float("nan"), 1],
     dict(init_scale=2.0 ** 16, growth_interval=2)),
    ("custom factors", [1, float("inf"), float("inf"), 1, 1],
     dict(init_scale=1024.0, growth_factor=4.0, backoff_factor=0.25, growth_interval=1)),
]


@pytest.mark.filterwarnings("ignore:invalid value encountered")
@pytest.mark.parametrize("name, losses_scale, kw", SCALER_CASES,
                         ids=[c[0] for c in SCALER_CASES])
def test_grad_scaler_matches_torch(name, losses_scale, kw):
    ours = _scaler_run("dp", losses_scale, **kw)
    theirs = _scaler_run("torch", losses_scale, **kw)
    assert ours[0] == theirs[0], "scale trajectory"
    assert ours[1] == theirs[1], "skipped steps"
    np.testing.assert_allclose(ours[2], theirs[2], rtol=1e-6, atol=1e-7)


def test_grad_scaler_state_dict_round_trips_with_torch():
    _, _, _ = _scaler_run("dp", [1.0] * 3, init_scale=8.0, growth_interval=5)
    src = torch.amp.GradScaler("cpu", init_scale=8.0, growth_interval=5)
    ours = GradScaler(init_scale=1.0)
    ours.load_state_dict(src.state_dict())
    assert ours.get_scale() == 8.0 and ours.get_growth_interval() == 5
    back = torch.amp.GradScaler("cpu")
    back.load_state_dict(ours.state_dict())
    assert back.get_scale() == 8.0 and back.state_dict() == src.state_dict()


def _one_param_step():
    w = nn.Parameter(dp.tensor(W))
    opt = dp.optim.SGD([w], lr=0.1)
    loss = (w * w).sum()
    return w, opt, loss


MISUSE = [
    ("unscale twice", lambda s, o: (s.unscale_(o), s.unscale_(o)), RuntimeError,
     "already been called"),
    ("unscale after step", lambda s, o: (s.step(o), s.unscale_(o)), RuntimeError, "after step"),
    ("step twice", lambda s, o: (s.step(o), s.step(o)), RuntimeError, "already been called"),
    ("update before step", lambda s, o: s.update(), RuntimeError, "No inf checks"),
    ("load empty state", lambda s, o: s.load_state_dict({}), RuntimeError, "empty"),
]


@pytest.mark.parametrize("name, action, exc, match", MISUSE, ids=[m[0] for m in MISUSE])
def test_grad_scaler_misuse_is_refused(name, action, exc, match):
    w, opt, loss = _one_param_step()
    scaler = GradScaler()
    scaler.scale(loss).backward()
    with pytest.raises(exc, match=match):
        action(scaler, opt)


BAD_ARGS = [
    (dict(init_scale=0.0), "init_scale"), (dict(init_scale=float("inf")), "init_scale"),
    (dict(growth_factor=1.0), "growth_factor"), (dict(backoff_factor=1.0), "backoff_factor"),
    (dict(growth_interval=0), "growth_interval"), (dict(device="tpu"), "device"),
]


@pytest.mark.parametrize("kw, match", BAD_ARGS, ids=[m for _, m in BAD_ARGS])
def test_grad_scaler_bad_arguments(kw, match):
    with pytest.raises(ValueError, match=match):
        GradScaler(**kw)


def test_disabled_grad_scaler_is_a_pass_through():
    w, opt, loss = _one_param_step()
    scaler = GradScaler(enabled=False)
    assert scaler.scale(loss) is loss and scaler.get_scale() == 1.0 and scaler.state_dict() == {}
    loss.backward()
    before = w.numpy().copy()
    scaler.step(opt)
    scaler.update()
    assert not np.array_equal(before, w.numpy())


@pytest.mark.parametrize("dtype", ["bfloat16", "bf16", torch.bfloat16])
def test_bfloat16_is_refused_clearly(dtype):
    with pytest.raises(ValueError, match="bfloat16 is not available: NumPy and CuPy have no "
                                         "bfloat16"):
        autocast(dtype=dtype)


@pytest.mark.parametrize("dtype", [np.float32, "float64", "int8"])
def test_autocast_other_dtypes_refused(dtype):
    with pytest.raises(ValueError, match="dtype must be float16"):
        autocast(dtype=dtype)


def test_autocast_scoping():
    """Nesting, enabled=False, device_type filtering, decorator use and thread locality."""
    x, w = _dp(X, W)
    with autocast("cpu", dtype="float16"):
        assert F.linear(x, w).dtype == F16
        with autocast(enabled=False):
            assert F.linear(x, w).dtype == F32
        assert F.linear(x, w).dtype == F16
        seen = []
        t = threading.Thread(target=lambda: seen.append(F.linear(x, w).dtype))
        t.start()
        t.join()
        assert seen == [F32]  # autocast state is per thread
    with autocast("cuda"):  # CPU tensors are not cast by a CUDA autocast
        assert F.linear(x, w).dtype == F32
    with autocast(dp.float16):  # a dtype given positionally
        assert F.linear(x, w).dtype == F16

    @autocast()
    def f():
        return F.linear(x, w)

    assert f().dtype == F16 and f().dtype == F16
    assert F.linear(x, w).dtype == F32
    with pytest.raises(ValueError, match="device_type"):
        autocast("tpu")


DDP_SCRIPT = r"""
import os
import sys
import numpy as np
import distprop as dp
from distprop import nn
from distprop.amp import GradScaler, autocast
from distprop.distributed import DistributedDataParallel

use_scaler = sys.argv[1] == "1"
comm = dp.distributed.init()
rank = comm.rank
dp.manual_seed(0)
model = DistributedDataParallel(nn.Linear(4, 2))
opt = dp.optim.SGD(model.parameters(), lr=0.1)
scaler = GradScaler(init_scale=1024.0, growth_interval=100, enabled=use_scaler)
rng = np.random.default_rng(rank)
for step in range(3):
    x = rng.standard_normal((3, 4)).astype(np.float32)
    if step == 1 and rank == 1:
        x[0, 0] = np.inf  # only rank 1's batch produces an inf gradient
    before = model.module.weight.numpy().copy()
    opt.zero_grad()
    try:
        with autocast():
            loss = (model(dp.tensor(x)) ** 2).mean()
        scaler.scale(loss).backward()
    except FloatingPointError as e:
        print(f"rank {rank} step {step} raised: {e}", flush=True)
        sys.exit(3)
    scaler.step(opt)
    scaler.update()
    same = np.array_equal(before, model.module.weight.numpy())
    digest = float(np.abs(model.module.weight.numpy()).sum())
    os.write(1, (f"rank {rank} step {step} skipped={same} scale={scaler.get_scale()} "
                 f"step_ok={model.step_ok} w={digest:.7f}\n").encode())  # one write per line
"""


@pytest.mark.parametrize("use_scaler", [True, False], ids=["scaler-skips", "no-scaler-raises"])
def test_ddp_inf_on_one_rank(use_scaler):
    """2 ranks, rank 1's batch gives an inf at step 1: with a GradScaler every rank skips that
    step and halves the scale (the averaged flat buffer is the same everywhere); without one,
    DDP's guard raises FloatingPointError on every rank, as before."""
    proc = run_mpi(DDP_SCRIPT, nprocs=2, timeout=120, args=("1" if use_scaler else "0",))
    out = proc.stdout + proc.stderr
    if not use_scaler:
        assert proc.returncode != 0, out
        for r in (0, 1):
            assert f"rank {r} step 1 raised: DistributedDataParallel: non-finite gradient" in out
        return
    assert proc.returncode == 0, out
    lines = re.findall(r"rank \d step \d .*? w=[\d.]+", proc.stdout)
    assert len(lines) == 6, out
    for r in (0, 1):
        assert f"rank {r} step 0 skipped=False scale=1024.0 step_ok=True" in out
        assert f"rank {r} step 1 skipped=True scale=512.0 step_ok=False" in out
        assert f"rank {r} step 2 skipped=False scale=512.0 step_ok=True" in out
    weights = {line.split()[1] + line.split()[3]: line.rsplit("w=", 1)[1] for line in lines}
    for step in range(3):
        assert weights[f"0{step}"] == weights[f"1{step}"], out


# --- Trainer and CLI ------------------------------------------------------------------------------

class _InfAt(cbs.Callback):
    """Makes the loss of optimizer step ``at`` infinite (through the trainer's loss_fn)."""

    def __init__(self, holder: dict, at: int):
        self.holder, self.at = holder, at

    def on_step_end(self, trainer, logs):
        self.holder["inf"] = trainer.step == self.at


class _Crash(cbs.Callback):
    def on_step_end(self, trainer, logs):
        if trainer.step == 10:
            raise KeyboardInterrupt("simulated crash")


def _amp_fit(tmp_path, name, extra=(), resume=None):
    data = sources.synthetic(n=320, shape=(8,), classes=4, seed=3, val_fraction=0.1)
    dp.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 4))
    opt = dp.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    holder = {"inf": False}
    ce = nn.CrossEntropyLoss()

    def loss_fn(out, y):
        loss = ce(out, y)
        return loss * float("inf") if holder["inf"] else loss

    ckpts = cbs.Checkpointer(tmp_path / name, every_steps=4, keep=2)
    trainer = Trainer(model, loss_fn, opt, comm=SingleProcessCommunicator(), prefetch=0,
                      callbacks=[_InfAt(holder, 5), ckpts, *extra], amp="float16")
    history = trainer.fit(data.train, data.val, epochs=2, batch_size=16, resume=resume)
    return trainer, model, history


@pytest.mark.filterwarnings("ignore:invalid value encountered")
def test_trainer_amp_skips_the_inf_step_and_checkpoints_the_scaler(tmp_path):
    """fit(amp='float16'): forward under autocast, loss scaled; the step whose loss is inf is
    skipped and halves the scale; checkpoints carry the scaler, and a resumed run continues
    with the same scale and parameters as an uninterrupted one."""
    trainer, model, history = _amp_fit(tmp_path, "straight")
    assert trainer.scaler.skipped_steps == 1 and trainer.scaler.get_scale() == 2.0 ** 15
    assert np.isfinite(history.final["val_loss"])
    latest = dp.train.latest_valid(tmp_path / "straight")
    assert dp.load(latest)["scaler"]["scale"] == 2.0 ** 15
    with pytest.raises(KeyboardInterrupt):
        _amp_fit(tmp_path, "crashed", extra=[_Crash()])
    resumed_from = dp.train.latest_valid(tmp_path / "crashed")
    trainer2, model2, _ = _amp_fit(tmp_path, "crashed", resume=resumed_from)
    assert trainer2.scaler.get_scale() == 2.0 ** 15 and trainer2.scaler.skipped_steps == 0
    for (name, a), b in zip(model.state_dict().items(), model2.state_dict().values()):
        np.testing.assert_array_equal(a.numpy(), b.numpy(), err_msg=name)


def test_trainer_rejects_bfloat16():
    model = nn.Linear(2, 2)
    with pytest.raises(ValueError, match="bfloat16 is not available"):
        Trainer(model, nn.MSELoss(), dp.optim.SGD(model.parameters(), lr=0.1),
                comm=SingleProcessCommunicator(), amp="bfloat16")


def _cli(*args, timeout=240):
    return subprocess.run([sys.executable, "-m", "distprop", "train", *map(str, args)],
                          capture_output=True, text=True, timeout=timeout)


def test_cli_train_amp_two_ranks(tmp_path):
    out = tmp_path / "run"
    done = _cli("-n", 2, "--amp", "--model", "mlp", "--dataset", "digits", "--epochs", 2,
                "--optimizer", "adam", "--lr", 2e-3, "--out", out)
    assert done.returncode == 0, done.stdout + done.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["config"]["amp"] == "float16"
    assert summary["test"]["accuracy"] >= 0.9, summary["test"]
    assert "scaler" in dp.load(dp.train.latest_valid(out / "checkpoints"))


@pytest.mark.parametrize("value, message", [
    ("bfloat16", "--amp bfloat16 is not available: NumPy and CuPy have no bfloat16 dtype"),
    ("int8", "unknown amp 'int8'; choose one of none, float16"),
])
def test_cli_bad_amp_is_a_usage_error(value, message, tmp_path):
    done = _cli("--amp", value, "--epochs", 1, "--out", tmp_path / "run", timeout=120)
    assert done.returncode == 2, done.stdout + done.stderr
    assert message in done.stderr and "Traceback" not in done.stderr
