"""The GPU path on a real CUDA device (every test is marked ``gpu``: skipped without CuPy+GPU).

* every op, activation, loss, layer (conv, pooling, norms, recurrent) and zoo model on CuPy
  matches the NumPy path on the same inputs and weights (float32 tolerance; float64 tight), the
  rows coming from the CPU test tables (tests/test_ops.py, test_activations.py, ...);
* float64 central-difference gradient checks run on the device;
* the fused kernels (optimizer updates, cross-entropy, LSTM/GRU steps, im2col/col2im) match
  the xp reference code, on the device and against NumPy, and are actually used;
* placement: tensors, ``Tensor.to``, ``Module.to`` with flat buffers and optimizer state, the
  DataLoader's pinned staging, and clear errors when devices are mixed;
* communicators: NCCL (1 rank, and 2 ranks falling back to host staging when they share one
  GPU), host-staged and CUDA-aware MPI (2 ranks sharing one GPU), DDP equivalence with one
  process on the global batch on each path, with fp16/bf16 compression.
"""

from __future__ import annotations

import numpy as np
import pytest

import distprop as dp
from distprop import backend, cuda_kernels
from distprop.flat import contiguous_range, slot_of
from distprop.nn import functional as F
from distprop.nn.module import Parameter
from distprop.optim import functional as OF

from helpers import numeric_grad, run_mpi

pytestmark = pytest.mark.gpu

try:  # the CPU tables import torch (their oracle); without it the table rows are empty
    from test_activations import ACTIVATIONS
    from test_conv_pool import CONV, POOL
    from test_losses import LOSSES
    from test_norm import BATCHNORM, LAYERNORM
    from test_ops import OPS
    from test_optim import CASES as OPT_CASES
    from test_optim import INIT as OPT_INIT
    from test_optim import X as OPT_X
    from test_optim import Y as OPT_Y
    from test_rnn import CONFIGS as RNN_CONFIGS
    from test_rnn import MODES as RNN_MODES
except ImportError:  # pragma: no cover - depends on the machine
    ACTIVATIONS = CONV = POOL = LOSSES = BATCHNORM = LAYERNORM = OPS = OPT_CASES = []
    RNN_CONFIGS, RNN_MODES = [], {}
    OPT_INIT = OPT_X = OPT_Y = None

CUDA = "cuda:0"
F32 = dict(rtol=2e-4, atol=2e-5)  # GPU vs CPU float32: different BLAS and reduction orders
F64 = dict(rtol=1e-9, atol=1e-11)


def _tensor(a, dev, dtype=None, requires_grad=False):
    a = np.asarray(a)
    if dtype is not None and a.dtype.kind == "f":
        a = a.astype(dtype)
    return dp.tensor(a, device=dev, requires_grad=requires_grad and a.dtype.kind == "f")


def _run(fn, arrays, dev, dtype, seed=1):
    """fn on ``arrays`` placed on ``dev``; returns (output, input grads) as NumPy."""
    ts = [_tensor(a, dev, dtype, requires_grad=True) for a in arrays]
    out = fn(*ts)
    assert out.device == backend.device(dev), f"output on {out.device}, expected {dev}"
    assert out.dtype == np.dtype(dtype)
    w = np.random.default_rng(seed).standard_normal(out.shape).astype(dtype)
    out.backward(dp.tensor(w, device=dev))
    return out.numpy(), [None if t.grad is None else t.grad.numpy() for t in ts]


def _same(fn, arrays, dtype="float32", tol=F32):
    """The CPU and the GPU give the same output and gradients."""
    ref_out, ref_grads = _run(fn, arrays, "cpu", dtype)
    out, grads = _run(fn, arrays, CUDA, dtype)
    np.testing.assert_allclose(out, ref_out, **tol)
    for i, (g, r) in enumerate(zip(grads, ref_grads)):
        if r is None:
            assert g is None
        else:
            np.testing.assert_allclose(g, r, **tol, err_msg=f"gradient of input {i}")


def device_gradcheck(fn, *arrays, eps=1e-6, atol=1e-7, rtol=1e-5, seed=0):
    """float64 central differences against autograd, every evaluation on the GPU."""
    arrays = [np.array(a, dtype=np.float64) for a in arrays]
    weights = np.random.default_rng(seed).standard_normal(
        fn(*[_tensor(a, CUDA) for a in arrays]).shape)

    def scalar(*arrs):
        with dp.no_grad():
            out = fn(*[_tensor(a, CUDA) for a in arrs])
        return float((out.numpy() * weights).sum())

    tensors = [_tensor(a, CUDA, requires_grad=True) for a in arrays]
    out = fn(*tensors)
    out.backward(dp.tensor(weights, device=CUDA))
    for i, t in enumerate(tensors):
        expected = numeric_grad(scalar, arrays, i, eps)
        got = t.grad.numpy() if t.grad is not None else np.zeros_like(expected)
        np.testing.assert_allclose(got, expected, atol=atol, rtol=rtol,
                                   err_msg=f"gradient of input {i}")


# --- ops, activations, losses --------------------------------------------------------------------


@pytest.mark.parametrize("name,fn,_torch_fn,inputs", OPS, ids=[o[0] for o in OPS])
def test_op_matches_numpy(name, fn, _torch_fn, inputs):
    _same(fn, inputs)
    _same(fn, inputs, "float64", F64)


@pytest.mark.parametrize("name,fn,_torch_fn,inputs", OPS, ids=[o[0] for o in OPS])
def test_op_gradcheck_on_device(name, fn, _torch_fn, inputs):
    device_gradcheck(fn, *inputs)


@pytest.mark.parametrize("name,fn,_torch_fn,x", ACTIVATIONS, ids=[a[0] for a in ACTIVATIONS])
def test_activation_matches_numpy(name, fn, _torch_fn, x):
    _same(fn, [x])
    device_gradcheck(fn, x)


def _loss_fn(fname, target, options, target_grad, reduction, dtype, dev):
    opts = {k: _tensor(v, dev, dtype) if isinstance(v, np.ndarray) else v
            for k, v in options.items()}
    if target_grad:
        return lambda a, b: getattr(F, fname)(a, b, reduction=reduction, **opts)
    t = _tensor(target, dev, dtype)
    return lambda a: getattr(F, fname)(a, t, reduction=reduction, **opts)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("name,fname,x,target,options,target_grad", LOSSES,
                         ids=[row[0] for row in LOSSES])
def test_loss_matches_numpy(name, fname, x, target, options, target_grad, reduction):
    arrays = [x, target] if target_grad else [x]
    for dtype, tol in (("float32", F32), ("float64", F64)):
        ref = _run(_loss_fn(fname, target, options, target_grad, reduction, dtype, "cpu"),
                   arrays, "cpu", dtype)
        got = _run(_loss_fn(fname, target, options, target_grad, reduction, dtype, CUDA),
                   arrays, CUDA, dtype)
        np.testing.assert_allclose(got[0], ref[0], **tol)
        for g, r in zip(got[1], ref[1]):
            np.testing.assert_allclose(g, r, **tol)
    hard_bce = fname == "binary_cross_entropy" and np.isin(target, (0.0, 1.0)).any()
    if not (target_grad and hard_bce):
        device_gradcheck(_loss_fn(fname, target, options, target_grad, reduction, "float64",
                                  CUDA), *arrays)


# --- layers ----------------------------------------------------------------------------------


def _same_module(make, shape, dtype="float32", tol=F32, seed=0, train=True):
    """One module built on the CPU, a copy moved to the GPU: same outputs, input and parameter
    gradients (and buffers, e.g. BatchNorm running statistics)."""
    dp.manual_seed(seed)
    cpu = make().to(np.dtype(dtype))
    gpu = make().to(np.dtype(dtype))
    gpu.load_state_dict(cpu.state_dict())
    gpu.to(CUDA)
    cpu.train(train)
    gpu.train(train)
    x = np.random.default_rng(seed).standard_normal(shape).astype(dtype)
    outs = []
    for module, dev in ((cpu, "cpu"), (gpu, CUDA)):
        xt = dp.tensor(x, device=dev, requires_grad=True)
        out = module(xt)
        out = out[0] if isinstance(out, tuple) else out
        w = np.random.default_rng(seed + 1).standard_normal(out.shape).astype(dtype)
        out.backward(dp.tensor(w, device=dev))
        outs.append((out.numpy(), xt.grad.numpy(),
                     {n: p.grad.numpy() for n, p in module.named_parameters()},
                     {n: b.numpy() for n, b in module.named_buffers()}))
    (o1, g1, p1, b1), (o2, g2, p2, b2) = outs
    np.testing.assert_allclose(o2, o1, **tol)
    np.testing.assert_allclose(g2, g1, **tol)
    for name in p1:
        np.testing.assert_allclose(p2[name], p1[name], **tol, err_msg=name)
    for name in b1:
        np.testing.assert_allclose(b2[name], b1[name], **tol, err_msg=name)
    for p in gpu.parameters():
        assert p.device.is_cuda


@pytest.mark.parametrize("case", CONV + POOL, ids=[c[0] for c in CONV + POOL])
def test_conv_and_pool_match_numpy(case):
    _, cls, kwargs, shape = case
    _same_module(lambda: getattr(dp.nn, cls)(**kwargs), shape)
    _same_module(lambda: getattr(dp.nn, cls)(**kwargs), shape, "float64", F64)


@pytest.mark.parametrize("case", CONV, ids=[c[0] for c in CONV])
def test_conv_gradcheck_on_device(case):
    _, cls, kwargs, shape = case
    dp.manual_seed(0)
    layer = getattr(dp.nn, cls)(**kwargs).to(np.float64).to(CUDA)
    x = np.random.default_rng(0).standard_normal(shape)
    device_gradcheck(lambda a: layer(a), x, atol=1e-6)


@pytest.mark.parametrize("case", BATCHNORM, ids=[c[0] for c in BATCHNORM])
def test_batchnorm_matches_numpy(case):
    _, cls, kwargs, shape = case
    for train in (True, False):
        _same_module(lambda: getattr(dp.nn, cls)(**kwargs), shape, train=train)


@pytest.mark.parametrize("case", LAYERNORM, ids=[c[0] for c in LAYERNORM])
def test_layernorm_matches_numpy(case):
    _, kwargs, shape = case
    _same_module(lambda: dp.nn.LayerNorm(**kwargs), shape)


def _rnn_run(mode, options, fwd, dev, dtype, state):
    cls, _torch_cls, extra = RNN_MODES[mode]
    module = cls(4, 6, **extra, **options, dtype=dtype)
    module.load_state_dict(state)
    module.to(dev)
    rng = np.random.default_rng(3)
    layers = options.get("num_layers", 1) * (2 if options.get("bidirectional") else 1)
    if fwd.get("unbatched"):
        x, state_shape = rng.standard_normal((5, 4)), (layers, 6)
    else:
        shape = (3, 5, 4) if options.get("batch_first") else (5, 3, 4)
        x, state_shape = rng.standard_normal(shape), (layers, 3, 6)
    inputs = [dp.tensor(x.astype(dtype), device=dev, requires_grad=True)]
    if fwd.get("hx"):
        inputs += [dp.tensor(rng.standard_normal(state_shape).astype(dtype), device=dev,
                             requires_grad=True) for _ in range(2 if mode == "lstm" else 1)]
    hx = None if len(inputs) == 1 else (tuple(inputs[1:]) if mode == "lstm" else inputs[1])
    out, st = module(inputs[0], hx, lengths=fwd.get("lengths"))
    outs = [out] + (list(st) if mode == "lstm" else [st])
    loss = sum((o * dp.tensor(np.random.default_rng(i).standard_normal(o.shape).astype(dtype),
                              device=dev)).sum() for i, o in enumerate(outs))
    loss.backward()
    return ([o.numpy() for o in outs] + [t.grad.numpy() for t in inputs]
            + [p.grad.numpy() for p in module.parameters()])


@pytest.mark.parametrize("name,options,fwd", RNN_CONFIGS, ids=[c[0] for c in RNN_CONFIGS])
@pytest.mark.parametrize("mode", list(RNN_MODES))
def test_recurrent_layers_match_numpy_fused_and_unfused(mode, name, options, fwd):
    cls, _torch_cls, extra = RNN_MODES[mode]
    for dtype, tol in (("float32", F32), ("float64", F64)):
        dp.manual_seed(0)
        state = cls(4, 6, **extra, **options, dtype=dtype).state_dict()
        ref = _rnn_run(mode, options, fwd, "cpu", dtype, state)
        fused = _rnn_run(mode, options, fwd, CUDA, dtype, state)
        with cuda_kernels.disabled():
            plain = _rnn_run(mode, options, fwd, CUDA, dtype, state)
        for a, b, c in zip(ref, fused, plain):
            np.testing.assert_allclose(b, a, **tol)
            np.testing.assert_allclose(c, a, **tol)


MODEL_NAMES = ["mlp", "cnn", "lstm", "transformer", "wide"]


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_zoo_models_match_numpy(name):
    """Forward, cross-entropy and backward of each benchmark model, float64, CPU vs GPU."""
    from distprop import models

    dp.manual_seed(0)
    cpu = models.build_model(name, dtype=np.float64)
    gpu = models.build_model(name, dtype=np.float64)
    gpu.load_state_dict(cpu.state_dict())
    gpu.to(CUDA)
    results = []
    for model, dev in ((cpu, "cpu"), (gpu, CUDA)):
        x, y = models.sample_batch(name, 4, dtype=np.float64, device=dev)
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        results.append((loss.item(), {n: p.grad.numpy() for n, p in model.named_parameters()}))
    assert results[1][0] == pytest.approx(results[0][0], rel=1e-9)
    for n, g in results[0][1].items():
        np.testing.assert_allclose(results[1][1][n], g, rtol=1e-7, atol=1e-10, err_msg=n)


# --- optimizers and the fused kernels ---------------------------------------------------------


def _opt_run(name, kwargs, dev, dtype, steps=5):
    ps = [Parameter(dp.tensor(a.astype(dtype), device=dev)) for a in OPT_INIT]
    opt = getattr(dp.optim, name)(ps, **kwargs)
    x, y = dp.tensor(OPT_X.astype(dtype), device=dev), dp.tensor(OPT_Y.astype(dtype), device=dev)
    for _ in range(steps):
        opt.zero_grad()
        h = (x @ ps[0].T + ps[1]).clamp(min=0)
        ((h @ ps[2].T + ps[3] - y) ** 2).mean().backward()
        opt.step()
    for state in opt.state.values():
        for value in state.values():
            if hasattr(value, "ndim") and value.ndim:
                assert backend.device_of(value) == backend.device(dev)  # state with the params
    return [p.numpy() for p in ps]


@pytest.mark.parametrize("name,kwargs", OPT_CASES,
                         ids=[f"{n}-{'-'.join(f'{k}={v}' for k, v in kw.items())}"
                              for n, kw in OPT_CASES])
def test_optimizer_matches_numpy_fused_and_unfused(name, kwargs):
    for dtype, tol in (("float32", dict(rtol=1e-5, atol=1e-6)), ("float64", F64)):
        ref = _opt_run(name, kwargs, "cpu", dtype)
        fused = _opt_run(name, kwargs, CUDA, dtype)
        with cuda_kernels.disabled():
            plain = _opt_run(name, kwargs, CUDA, dtype)
        for a, b, c in zip(ref, fused, plain):
            np.testing.assert_allclose(b, a, **tol)
            np.testing.assert_allclose(c, a, **tol)


UPDATES = [
    ("sgd", dict(lr=0.1, momentum=0.0, dampening=0.0, weight_decay=0.0, nesterov=False,
                 maximize=False, first_step=False)),
    ("sgd", dict(lr=0.1, momentum=0.9, dampening=0.0, weight_decay=0.0, nesterov=False,
                 maximize=False, first_step=True)),
    ("sgd", dict(lr=0.1, momentum=0.9, dampening=0.3, weight_decay=0.01, nesterov=False,
                 maximize=True, first_step=False)),
    ("sgd", dict(lr=0.05, momentum=0.8, dampening=0.0, weight_decay=0.1, nesterov=True,
                 maximize=False, first_step=False)),
    ("adam", dict(step=1.0, lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0,
                  amsgrad=False, maximize=False, decoupled_weight_decay=False)),
    ("adam", dict(step=7.0, lr=1e-2, beta1=0.3, beta2=0.5, eps=1e-3, weight_decay=0.1,
                  amsgrad=True, maximize=True, decoupled_weight_decay=False)),
    ("adam", dict(step=3.0, lr=1e-2, beta1=0.9, beta2=0.99, eps=1e-8, weight_decay=0.1,
                  amsgrad=False, maximize=False, decoupled_weight_decay=True)),
]


@pytest.mark.parametrize("kind,kw", UPDATES, ids=[f"{k}{i}" for i, (k, _) in enumerate(UPDATES)])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_fused_optimizer_kernels_match_the_numpy_functions(kind, kw, dtype, monkeypatch):
    cp = backend.cupy_module()
    rng = np.random.default_rng(0)
    n = 100_003  # not a multiple of any block size
    host = {k: rng.standard_normal(n).astype(dtype) for k in ("p", "g", "a", "b", "c")}
    host["b"] = np.abs(host["b"])
    host["c"] = np.abs(host["c"]) + host["b"]
    dev = {k: cp.asarray(v) for k, v in host.items()}
    calls = []
    real = getattr(cuda_kernels, kind)
    monkeypatch.setattr(cuda_kernels, kind,
                        lambda *a, **k: calls.append(real(*a, **k)) or calls[-1])
    if kind == "sgd":
        for arrays in (host, dev):
            OF.sgd(arrays["p"], arrays["g"], arrays["a"], **kw)
    else:
        for arrays in (host, dev):
            OF.adam(arrays["p"], arrays["g"], arrays["a"], arrays["b"], arrays["c"], **kw)
    # the host call declined (None), the GPU call went through the fused kernel
    assert [c is not None for c in calls] == [False, True]
    # FMA contraction in the kernel may change the last bit of a float32 result
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == "float32" else dict(rtol=1e-12, atol=1e-14)
    for k in ("p", "a", "b", "c"):
        np.testing.assert_allclose(cp.asnumpy(dev[k]), host[k], **tol, err_msg=k)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_fused_cross_entropy_matches_numpy(reduction, dtype):
    rng = np.random.default_rng(0)
    logits = (3 * rng.standard_normal((67, 300))).astype(dtype)  # classes > threads per block
    target = rng.integers(0, 300, size=67)
    target[::5] = -100
    results = []
    for dev, fused in (("cpu", False), (CUDA, True), (CUDA, False)):
        x = dp.tensor(logits, device=dev, requires_grad=True)
        t = dp.tensor(target, device=dev)
        if fused:
            out = F.cross_entropy(x, t, reduction=reduction)
            assert type(out.grad_fn).__name__ == "FusedCrossEntropy"
        else:
            with cuda_kernels.disabled():
                out = F.cross_entropy(x, t, reduction=reduction)
        w = np.random.default_rng(1).standard_normal(out.shape).astype(dtype)
        out.backward(dp.tensor(w, device=dev))
        results.append((out.numpy(), x.grad.numpy()))
    tol = F32 if dtype == "float32" else F64
    for out, grad in results[1:]:
        np.testing.assert_allclose(out, results[0][0], **tol)
        np.testing.assert_allclose(grad, results[0][1], **tol)
    assert np.all(results[1][1][::5] == 0)  # ignored rows get no gradient


def test_fused_cross_entropy_all_ignored_mean_is_nan_and_bad_labels_raise():
    x = dp.tensor(np.zeros((3, 4), np.float32), device=CUDA, requires_grad=True)
    out = F.cross_entropy(x, dp.tensor(np.full(3, -100), device=CUDA))
    assert np.isnan(out.item())
    with pytest.raises(IndexError, match="target class index 7 is out of range for 4 classes"):
        F.cross_entropy(x, dp.tensor(np.array([0, 7, 1]), device=CUDA))


@pytest.mark.parametrize("case", CONV, ids=[c[0] for c in CONV])
def test_im2col_col2im_kernels_match_the_xp_path(case, monkeypatch):
    _, cls, kwargs, shape = case
    dp.manual_seed(0)
    layer = getattr(dp.nn, cls)(**kwargs).to(CUDA)
    x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    calls = []
    real = cuda_kernels.im2col
    monkeypatch.setattr(cuda_kernels, "im2col", lambda *a: calls.append(real(*a)) or calls[-1])
    results = []
    for ctx in (cuda_kernels.disabled, _nothing):
        with ctx():
            xt = dp.tensor(x, device=CUDA, requires_grad=True)
            out = layer(xt)
            out.backward(dp.tensor(np.ones(out.shape, np.float32), device=CUDA))
            results.append((out.numpy(), xt.grad.numpy(), layer.weight.grad.numpy()))
            layer.zero_grad()
    # disabled: None (the xp path); enabled: the kernel
    assert [c is not None for c in calls] == [False, True]
    for a, b in zip(*results):
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-6)


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def test_lstm_gru_use_the_fused_step_kernels(monkeypatch):
    names = ["lstm_forward_step", "lstm_backward_step", "gru_forward_step", "gru_backward_step"]
    calls = dict.fromkeys(names, 0)
    for name in names:
        real = getattr(cuda_kernels, name)

        def spy(*a, _real=real, _name=name):
            used = _real(*a)
            calls[_name] += int(used is not None)
            return used

        monkeypatch.setattr(cuda_kernels, name, spy)
    for cls in (dp.nn.LSTM, dp.nn.GRU):
        layer = cls(4, 6).to(CUDA)
        out, _ = layer(dp.randn(5, 3, 4, device=CUDA))
        out.sum().backward()
    assert all(v == 5 for v in calls.values()), calls


# --- placement -----------------------------------------------------------------------------------


def test_tensor_placement_and_gradients_across_devices():
    t = dp.tensor([1.0, 2.0], device="cuda")
    assert t.device == backend.Device("cuda", 0) and backend.get_array_module(t.data) is not np
    assert t.to("cpu").device == backend.CPU and t.cpu().numpy().tolist() == [1.0, 2.0]
    x = dp.tensor([1.0, 2.0, 3.0], requires_grad=True)
    y = (x.to("cuda") * 3.0).sum()
    y.backward()
    assert x.grad.device == backend.CPU and x.grad.numpy().tolist() == [3.0, 3.0, 3.0]
    z = dp.zeros(2, 3, device="cuda")
    assert z.device.is_cuda and dp.randn(4, device=CUDA).device.is_cuda
    assert "device='cuda:0'" in repr(t)


def test_module_to_cuda_moves_flat_buffers_and_optimizer_state():
    def build():
        dp.manual_seed(0)
        return dp.nn.Sequential(dp.nn.Linear(5, 8), dp.nn.ReLU(), dp.nn.Linear(8, 3))

    rng = np.random.default_rng(0)
    xs = [rng.standard_normal((6, 5)).astype(np.float32) for _ in range(4)]
    results = []
    for move in (False, True):
        model = build()
        opt = dp.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        for i, xb in enumerate(xs):
            if move and i == 2:
                model.to("cuda")  # after the optimizer exists and has state
                params = list(model.parameters())
                found = contiguous_range(params)
                assert found is not None and found[0].device.is_cuda
                for p in params:  # gradients moved too, as views of the new flat gradient
                    assert p.grad.device.is_cuda and p._grad_buffer is not None
                    assert p.grad.data is p._grad_buffer
            dev = "cuda" if move and i >= 2 else "cpu"
            opt.zero_grad()
            model(dp.tensor(xb, device=dev)).pow(2).mean().backward()
            opt.step()
        if move:
            for p in model.parameters():
                assert slot_of(p) is not None and slot_of(p).buffer.device.is_cuda
                assert backend.device_of(opt.state[p]["momentum_buffer"]).is_cuda
        results.append([p.numpy() for p in model.parameters()])
    for a, b in zip(*results):
        np.testing.assert_allclose(b, a, **F32)


@pytest.mark.parametrize("prefetch", [0, 2])
def test_dataloader_stages_batches_to_the_gpu(prefetch):
    x = np.arange(40, dtype=np.float32).reshape(20, 2)
    y = np.arange(20)
    loader = dp.data.DataLoader(dp.data.TensorDataset(x, y), batch_size=6, prefetch=prefetch,
                                device="cuda")
    seen = []
    for xb, yb in loader:
        assert xb.device.is_cuda and yb.device.is_cuda
        seen.append((xb.numpy(), yb.numpy()))
    np.testing.assert_array_equal(np.concatenate([s[0] for s in seen]), x)
    np.testing.assert_array_equal(np.concatenate([s[1] for s in seen]), y)


MIXED = [
    ("add", lambda a, b: a + b),
    ("mul", lambda a, b: a * b),
    ("matmul", lambda a, b: a @ b),
    ("linear", lambda a, b: F.linear(a, b)),
    ("cat", lambda a, b: dp.cat([a, b])),
    ("stack", lambda a, b: dp.stack([a, b])),
]


@pytest.mark.parametrize("name,fn", MIXED, ids=[m[0] for m in MIXED])
def test_mixing_devices_names_both(name, fn):
    a = dp.randn(3, 3)
    b = dp.randn(3, 3, device="cuda")
    with pytest.raises(RuntimeError, match=r"expected all tensors on the same device, got "
                                           r"(cpu and cuda:0|cuda:0 and cpu)"):
        fn(a, b)


# the layer names itself (its repr head), as every layer error does; tests/test_gpu_offline.py
# checks this pattern against the message the CPU builds
MIXED_CONV_MESSAGE = (r"^Conv2d\(1, 2, kernel_size=3\): expected all tensors on the same device, "
                      r"got cpu and cuda:0$")


def test_mixing_devices_in_layers_and_losses():
    conv = dp.nn.Conv2d(1, 2, 3).to("cuda")
    with pytest.raises(RuntimeError, match=MIXED_CONV_MESSAGE):
        conv(dp.randn(1, 1, 5, 5))
    with pytest.raises(RuntimeError, match="cross_entropy: expected all tensors on the same "
                                           "device, got cuda:0 and cpu"):
        F.cross_entropy(dp.randn(4, 3, device="cuda"), dp.tensor(np.array([0, 1, 2, 0])))


def test_trainer_fits_on_the_gpu():
    from distprop.train.trainer import fit

    rng = np.random.default_rng(0)
    x = rng.standard_normal((256, 8)).astype(np.float32)
    y = (x[:, 0] + x[:, 1] > 0).astype(np.int64)
    dp.manual_seed(0)
    model = dp.nn.Sequential(dp.nn.Linear(8, 16), dp.nn.ReLU(), dp.nn.Linear(16, 2)).to("cuda")
    opt = dp.optim.SGD(model.parameters(), lr=0.2, momentum=0.9)
    history = fit(model, dp.nn.CrossEntropyLoss(), opt, dp.data.TensorDataset(x, y), epochs=5,
                  batch_size=32, device="cuda", comm="auto")
    assert history.final["accuracy"] > 0.9, history.final


# --- communicators and DDP ------------------------------------------------------------------------


def test_nccl_communicator_one_rank_collectives():
    from distprop.distributed.comm import SingleProcessCommunicator
    from distprop.distributed.nccl import NCCLCommunicator, nccl_status

    ok, why = nccl_status()
    if not ok:
        pytest.skip(why)
    cp = backend.cupy_module()
    comm = NCCLCommunicator(SingleProcessCommunicator(), backend.Device("cuda", 0))
    a = cp.arange(10, dtype=cp.float32)
    np.testing.assert_array_equal(cp.asnumpy(comm.allreduce(a, "mean")), np.arange(10))
    b = cp.arange(12, dtype=cp.float64).reshape(3, 4)[:, ::2]  # non-contiguous
    comm.iallreduce(b, "sum").wait()
    np.testing.assert_array_equal(cp.asnumpy(b), np.arange(12.0).reshape(3, 4)[:, ::2])
    h = cp.ones(6, dtype=cp.float16)
    comm.iallreduce(h, "sum").wait()
    bf = cp.full(4, 0x3F80, dtype=cp.uint16)  # bfloat16 1.0
    comm.iallreduce(bf, "sum", bfloat16=True).wait()
    assert cp.asnumpy(bf).tolist() == [0x3F80] * 4
    assert cp.asnumpy(comm.allgather(cp.arange(3))).tolist() == [[0, 1, 2]]
    assert cp.asnumpy(comm.reduce_scatter(cp.arange(4.0))).tolist() == [0, 1, 2, 3]
    c = cp.arange(5)
    comm.broadcast(c, 0)
    assert cp.asnumpy(c).tolist() == [0, 1, 2, 3, 4]
    host = np.arange(3.0)
    assert comm.allreduce(host) is host  # host arrays go to the wrapped communicator


COLLECTIVES = """
import sys
sys.path.insert(0, 'tests')
from ddp_common import *
import cupy as cp
from distprop.distributed import device as devmod
from distprop.distributed.selection import make_comm, comm_kind
dev = devmod.assign_device(comm, "cuda")
c = make_comm(sys.argv[1], host=comm, device=dev)
say("kind", comm_kind(c))
a = cp.arange(6, dtype=cp.float32) + rank
c.allreduce(a, "mean"); assert cp.allclose(a, cp.arange(6) + 0.5), a
m = cp.array([rank, -rank], dtype=cp.float64); c.allreduce(m, "max")
assert m.tolist() == [1, 0], m
b = cp.arange(12, dtype=cp.float64).reshape(3, 4)[:, ::2] * (rank + 1)
c.iallreduce(b, "sum").wait()
assert cp.allclose(b, 3 * cp.arange(12.0).reshape(3, 4)[:, ::2]), b
h = cp.full(8, 0.25 * (rank + 1), dtype=cp.float16); c.iallreduce(h, "sum").wait()
assert cp.allclose(h.astype(cp.float32), 0.75), h
bf = cp.full(4, 0x3F80, dtype=cp.uint16); c.iallreduce(bf, "sum", bfloat16=True).wait()
assert bf.tolist() == [0x4000] * 4, bf  # 1.0 + 1.0 = 2.0 in bfloat16
g = c.allgather(cp.array([rank, rank], dtype=cp.int64)); assert g.tolist() == [[0, 0], [1, 1]]
r = c.reduce_scatter(cp.ones(4) * (rank + 1), "sum"); assert r.tolist() == [3, 3], r
z = cp.array([7.0 + rank]); c.broadcast(z, 1); assert z.tolist() == [8.0]
host = np.ones(3) * rank; c.allreduce(host); assert host.tolist() == [1, 1, 1]
say("DONE")
"""


def _mpi_ok(result, nprocs):
    out = result.stdout + result.stderr
    assert result.returncode == 0, out
    assert result.stdout.count("DONE") == nprocs, out
    return result.stdout


def _require_cuda_aware_mpi():
    from distprop.distributed.gpucomm import mpi_cuda_support

    aware, how = mpi_cuda_support()
    if not aware:
        pytest.skip(f"MPI is not CUDA-aware here ({how})")


@pytest.mark.mpi
@pytest.mark.parametrize("kind", ["mpi-host", "mpi-cuda"])
def test_device_collectives_two_ranks_sharing_one_gpu(kind):
    if kind == "mpi-cuda":
        _require_cuda_aware_mpi()
    out = _mpi_ok(run_mpi(COLLECTIVES, nprocs=2, timeout=180, args=[kind]), 2)
    assert out.count(f"kind {kind}") == 2


DDP_SCRIPT = """
import sys
sys.path.insert(0, 'tests')
from ddp_common import *
from distprop.distributed import device as devmod
from distprop.distributed.selection import make_comm, comm_kind
kind, comp = sys.argv[1], (None if sys.argv[2] == "none" else sys.argv[2])
dev = devmod.assign_device(comm, "cuda")
c = make_comm(kind, host=comm, device=dev)
say("kind", comm_kind(c))
dtype = np.float64 if comp is None else np.float32
x, y = make_data(dtype=dtype)
ref = reference(dtype=dtype)  # one CPU process on the whole global batches
net = DDP(mlp(seed=rank, dtype=dtype).to(dev), comm=c, bucket_cap_mb=1e-4, compression=comp)
opt = make_opt("sgd", net.parameters())
per = 12 // world
for step in range(10):
    s = (step * 12) % len(x)
    xb, yb = x[s:s + 12][rank * per:(rank + 1) * per], y[s:s + 12][rank * per:(rank + 1) * per]
    opt.zero_grad()
    out = net(dp.tensor(xb, device=dev))
    ((out - dp.tensor(yb, device=dev)) ** 2).mean().backward()
    opt.step()
net.check_replicas()
err = max(float(np.abs(p.numpy() - r).max()) for p, r in zip(net.parameters(), ref))
tol = {None: 1e-9, "fp16": 2e-3, "bf16": 2e-2}[comp]
say(f"err={err:.3e}")
assert err < tol, (comp, err)
say("DONE")
"""

DDP_CASES = [(kind, nprocs, comp) for kind, nprocs in (("mpi-host", 2), ("mpi-cuda", 2),
                                                        ("nccl", 1))
             for comp in ("none", "fp16", "bf16")]


@pytest.mark.mpi
@pytest.mark.parametrize("kind,nprocs,comp", DDP_CASES,
                         ids=[f"{k}-{n}rank-{c}" for k, n, c in DDP_CASES])
def test_ddp_equivalence_on_the_gpu(kind, nprocs, comp):
    """N ranks on one GPU x B/N == one CPU process x B (and within the codec's error)."""
    if kind == "mpi-cuda":
        _require_cuda_aware_mpi()
    if kind == "nccl":
        from distprop.distributed.nccl import nccl_status

        ok, why = nccl_status()
        if not ok:
            pytest.skip(why)
    out = _mpi_ok(run_mpi(DDP_SCRIPT, nprocs=nprocs, timeout=240, args=[kind, comp]), nprocs)
    assert out.count(f"kind {kind}") == nprocs


@pytest.mark.mpi
def test_nccl_with_two_ranks_on_one_gpu_falls_back_to_host_staging():
    from distprop.distributed.nccl import nccl_status

    ok, why = nccl_status()
    if not ok:
        pytest.skip(why)
    env = {"CUDA_VISIBLE_DEVICES": "0"}  # both ranks see (and take) the same GPU
    result = run_mpi(COLLECTIVES, nprocs=2, timeout=180, args=["nccl"], env=env)
    out = _mpi_ok(result, 2)
    assert out.count("kind mpi-host") == 2
    assert "NCCL refuses two ranks on one GPU (ranks 0, 1 share one); falling back to " \
           "mpi-host" in result.stderr


@pytest.mark.mpi
def test_device_mapping_two_ranks():
    body = """
import sys
sys.path.insert(0, 'tests')
from ddp_common import *
from distprop.distributed import device as devmod
dev = devmod.assign_device(comm, "cuda")
entries = devmod.gather_mapping(comm, dev)
if rank == 0:
    print(devmod.describe_mapping(entries))
say("DONE", dev)
"""
    count = backend.gpu_count()
    out = _mpi_ok(run_mpi(body, nprocs=2, timeout=120), 2)
    expected = "cuda:1" if count > 1 else "cuda:0"
    assert f"rank 1: DONE {expected}" in out
    if count == 1:
        assert "note: ranks 0, 1 share one GPU" in out


def test_info_reports_the_gpu():
    from distprop import info

    gpu = info._gpu()
    assert gpu["cupy"] and gpu["devices"] >= 1 and gpu["cuda_runtime"] and gpu["cuda_driver"]
    assert gpu["gpus"][0]["name"]
    text = "\n".join(info.format_gpu_lines(gpu, {}))
    assert "GPU 0" in text and "not available (needs CuPy)" not in text
