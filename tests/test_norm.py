"""BatchNorm1d/2d and LayerNorm against PyTorch (train and eval), finite differences, errors."""

import numpy as np
import pytest
import torch

import distprop as dp

from helpers import copy_torch_to_dp, gradcheck

F = dp.nn.functional

rng = np.random.default_rng(0)

F64 = dict(rtol=1e-10, atol=1e-12)
F32 = dict(rtol=1e-5, atol=1e-5)

# id, class name, constructor kwargs, input shape
BATCHNORM = [
    ("bn1d_2d", "BatchNorm1d", dict(num_features=4), (6, 4)),
    ("bn1d_3d", "BatchNorm1d", dict(num_features=3), (4, 3, 5)),
    ("bn1d_momentum_none", "BatchNorm1d", dict(num_features=3, momentum=None), (5, 3)),
    ("bn1d_no_affine", "BatchNorm1d", dict(num_features=3, affine=False), (4, 3, 2)),
    ("bn1d_untracked", "BatchNorm1d", dict(num_features=4, track_running_stats=False), (5, 4)),
    ("bn2d", "BatchNorm2d", dict(num_features=3), (4, 3, 5, 4)),
    ("bn2d_eps_momentum", "BatchNorm2d", dict(num_features=2, eps=1e-3, momentum=0.5),
     (3, 2, 4, 4)),
    ("bn2d_momentum_none", "BatchNorm2d", dict(num_features=3, momentum=None), (2, 3, 3, 3)),
    ("bn2d_no_affine", "BatchNorm2d", dict(num_features=3, affine=False), (2, 3, 4, 3)),
    ("bn2d_untracked_no_affine", "BatchNorm2d",
     dict(num_features=2, affine=False, track_running_stats=False), (3, 2, 3, 3)),
]

LAYERNORM = [
    ("ln_1d", dict(normalized_shape=6), (4, 6)),
    ("ln_3d_input", dict(normalized_shape=5), (2, 3, 5)),
    ("ln_two_dims", dict(normalized_shape=(3, 4)), (2, 3, 4)),
    ("ln_eps", dict(normalized_shape=4, eps=1e-2), (3, 4)),
    ("ln_no_bias", dict(normalized_shape=5, bias=False), (3, 5)),
    ("ln_no_affine", dict(normalized_shape=(2, 3), elementwise_affine=False), (4, 2, 3)),
]


def _randomize(module):
    """Non-trivial affine parameters and running stats, so they matter in the comparison."""
    with torch.no_grad():
        for name, t in module.state_dict().items():
            if t.dtype.is_floating_point:
                base = 1.0 if name.endswith(("weight", "running_var")) else 0.0
                t.copy_(torch.tensor(base + 0.5 * rng.uniform(0.1, 1.0, t.shape)))


def _step(ours, theirs, x, dtype, tol):
    xd = dp.tensor(x, requires_grad=True)
    xt = torch.tensor(x, requires_grad=True)
    out, ref = ours(xd), theirs(xt)
    assert out.dtype == np.dtype(dtype)
    np.testing.assert_allclose(out.numpy(), ref.detach().numpy(), **tol)
    grad = rng.standard_normal(out.shape).astype(dtype)
    out.backward(dp.tensor(grad))
    ref.backward(torch.tensor(grad))
    assert xd.grad.dtype == np.dtype(dtype)
    np.testing.assert_allclose(xd.grad.numpy(), xt.grad.numpy(), **tol)
    params = dict(theirs.named_parameters())
    for name, p in ours.named_parameters():
        assert p.grad.dtype == np.dtype(dtype), name
        np.testing.assert_allclose(p.grad.numpy(), params[name].grad.numpy(), **tol,
                                   err_msg=name)
        p.grad = None
        params[name].grad = None
    state = theirs.state_dict()
    for name, b in ours.named_buffers():
        np.testing.assert_allclose(b.numpy(), state[name].numpy(), **tol, err_msg=name)
        assert b.dtype == (np.int64 if name.endswith("num_batches_tracked") else np.dtype(dtype))


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("case", BATCHNORM, ids=[c[0] for c in BATCHNORM])
def test_batchnorm_matches_torch_train_then_eval(case, dtype):
    _, cls, kwargs, shape = case
    theirs = getattr(torch.nn, cls)(**kwargs).to(getattr(torch, dtype))
    ours = getattr(dp.nn, cls)(**kwargs).to(np.dtype(dtype))
    assert list(ours.state_dict()) == list(theirs.state_dict())
    _randomize(theirs)
    copy_torch_to_dp(theirs, ours)
    tol = F64 if dtype == "float64" else F32
    for _ in range(3):  # training: batch statistics, running-stat updates, num_batches_tracked
        _step(ours, theirs, (rng.standard_normal(shape) * 2 + 1).astype(dtype), dtype, tol)
    if kwargs.get("track_running_stats", True):
        assert int(ours.num_batches_tracked.item()) == 3
    ours.eval()
    theirs.eval()
    for _ in range(2):  # eval: running statistics (or batch statistics when untracked)
        _step(ours, theirs, (rng.standard_normal(shape) * 2 + 1).astype(dtype), dtype, tol)


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("case", LAYERNORM, ids=[c[0] for c in LAYERNORM])
def test_layernorm_matches_torch(case, dtype):
    _, kwargs, shape = case
    theirs = torch.nn.LayerNorm(**kwargs).to(getattr(torch, dtype))
    ours = dp.nn.LayerNorm(**kwargs).to(np.dtype(dtype))
    assert list(ours.state_dict()) == list(theirs.state_dict())
    _randomize(theirs)
    copy_torch_to_dp(theirs, ours)
    _step(ours, theirs, (rng.standard_normal(shape) * 3 - 1).astype(dtype), dtype,
          F64 if dtype == "float64" else F32)


def test_functional_batch_norm_updates_running_stats_like_torch():
    x = rng.standard_normal((5, 3, 4))
    rm, rv = rng.standard_normal(3), rng.uniform(0.5, 2.0, 3)
    ours_rm, ours_rv = dp.tensor(rm), dp.tensor(rv)
    theirs_rm, theirs_rv = torch.tensor(rm), torch.tensor(rv)
    out = F.batch_norm(dp.tensor(x), ours_rm, ours_rv, training=True, momentum=0.3)
    ref = torch.nn.functional.batch_norm(torch.tensor(x), theirs_rm, theirs_rv, training=True,
                                         momentum=0.3)
    np.testing.assert_allclose(out.numpy(), ref.numpy(), **F64)
    np.testing.assert_allclose(ours_rm.numpy(), theirs_rm.numpy(), **F64)
    np.testing.assert_allclose(ours_rv.numpy(), theirs_rv.numpy(), **F64)
    with dp.no_grad():  # the update also happens without a graph
        F.batch_norm(dp.tensor(x), ours_rm, ours_rv, training=True, momentum=0.3)
    torch.nn.functional.batch_norm(torch.tensor(x), theirs_rm, theirs_rv, training=True,
                                   momentum=0.3)
    np.testing.assert_allclose(ours_rv.numpy(), theirs_rv.numpy(), **F64)
    out = F.batch_norm(dp.tensor(x), ours_rm, ours_rv, training=False)
    ref = torch.nn.functional.batch_norm(torch.tensor(x), theirs_rm, theirs_rv, training=False)
    np.testing.assert_allclose(out.numpy(), ref.numpy(), **F64)


GRADCHECK = [
    ("batch_norm_train", lambda x, w, b: F.batch_norm(x, None, None, w, b, training=True),
     [(4, 3, 2), (3,), (3,)]),
    ("batch_norm_train_2d", lambda x: F.batch_norm(x, None, None, training=True, eps=1e-3),
     [(5, 2)]),
    ("batch_norm_eval", lambda x, w, b: F.batch_norm(
        x, dp.tensor(np.array([0.1, -0.2])), dp.tensor(np.array([1.5, 0.7])), w, b),
     [(3, 2, 2, 2), (2,), (2,)]),
    ("layer_norm", lambda x, w, b: F.layer_norm(x, (2, 3), w, b), [(3, 2, 3), (2, 3), (2, 3)]),
    ("layer_norm_plain", lambda x: F.layer_norm(x, 4), [(3, 4)]),
]


@pytest.mark.parametrize("name,fn,shapes", GRADCHECK, ids=[g[0] for g in GRADCHECK])
def test_gradcheck(name, fn, shapes):
    gradcheck(fn, *[rng.standard_normal(s) + (1.0 if len(s) == 1 else 0.0) for s in shapes])


def test_float32_module_keeps_float32_buffers_and_grads():
    bn = dp.nn.BatchNorm2d(3)
    x = dp.randn(4, 3, 2, 2, requires_grad=True)
    y = bn(x)
    y.sum().backward()
    assert y.dtype == np.float32 and x.grad.dtype == np.float32
    assert bn.running_mean.dtype == np.float32 and bn.running_var.dtype == np.float32
    assert bn.num_batches_tracked.dtype == np.int64
    ln = dp.nn.LayerNorm(2)
    assert ln(dp.randn(3, 2)).dtype == np.float32


def test_batchnorm_in_a_conv_net_matches_torch():
    t_net = torch.nn.Sequential(torch.nn.Conv2d(2, 8, 3), torch.nn.BatchNorm2d(8),
                                torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.Linear(72, 3),
                                torch.nn.BatchNorm1d(3)).double()
    d_net = dp.nn.Sequential(dp.nn.Conv2d(2, 8, 3), dp.nn.BatchNorm2d(8), dp.nn.ReLU(),
                             dp.nn.Flatten(), dp.nn.Linear(72, 3), dp.nn.BatchNorm1d(3)).double()
    copy_torch_to_dp(t_net, d_net)
    for mode in ("train", "eval"):
        getattr(t_net, mode)()
        getattr(d_net, mode)()
        _step(d_net, t_net, rng.standard_normal((4, 2, 5, 5)), "float64", F64)


def test_batchnorm_errors_name_layer_and_shapes():
    with pytest.raises(ValueError, match=r"BatchNorm2d\(4\).*\(2, 3, 5, 5\)"):
        dp.nn.BatchNorm2d(4)(dp.randn(2, 3, 5, 5))
    with pytest.raises(ValueError, match=r"BatchNorm2d\(3\).*4D.*\(2, 3, 5\)"):
        dp.nn.BatchNorm2d(3)(dp.randn(2, 3, 5))
    with pytest.raises(ValueError, match=r"BatchNorm1d\(3\).*2D or 3D.*\(2, 3, 4, 4\)"):
        dp.nn.BatchNorm1d(3)(dp.randn(2, 3, 4, 4))
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        dp.nn.BatchNorm1d(3)(dp.randn(1, 3))
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        dp.nn.BatchNorm1d(3, track_running_stats=False)(dp.randn(1, 3))
    with pytest.raises(ValueError, match="more than 1 value per channel"):  # batch stats in eval
        dp.nn.BatchNorm1d(3, track_running_stats=False).eval()(dp.randn(1, 3))
    bn = dp.nn.BatchNorm1d(3).eval()
    assert bn(dp.randn(1, 3)).shape == (1, 3)  # eval mode is fine with one sample
    with pytest.raises(TypeError, match="floating-point"):
        dp.nn.BatchNorm1d(3)(dp.tensor(np.ones((4, 3), dtype=np.int64)))
    with pytest.raises(ValueError, match=r"running_mean.*\(4,\).*3 channels"):
        F.batch_norm(dp.randn(2, 3), dp.zeros(4), dp.ones(3))


def test_layernorm_errors_name_shapes():
    with pytest.raises(ValueError, match=r"LayerNorm\(\(4,\)\).*\(\*, 4\).*\(2, 5\)"):
        dp.nn.LayerNorm(4)(dp.randn(2, 5))
    with pytest.raises(ValueError, match=r"layer_norm.*\[\*, 2, 3\].*\(3, 2\)"):
        F.layer_norm(dp.randn(3, 2), (2, 3))
    with pytest.raises(ValueError, match="weight"):
        F.layer_norm(dp.randn(3, 4), 4, dp.ones(3))


@pytest.mark.parametrize("make,shape", [
    (lambda: dp.nn.LayerNorm(3), (2, 3)),
    (lambda: dp.nn.BatchNorm1d(3), (4, 3)),
    (lambda: dp.nn.BatchNorm1d(3, affine=False), (4, 3)),
    (lambda: dp.nn.BatchNorm2d(3), (2, 3, 2, 2)),
], ids=["layernorm", "bn1d", "bn1d_no_affine", "bn2d"])
def test_norm_layers_refuse_an_input_of_another_float_dtype(make, shape):
    """float64 into a float32 layer would silently compute (and update stats) in float64."""
    layer = make()
    with pytest.raises(TypeError, match=r"Norm.*\(.*float64 does not match the layer's float32"):
        layer(dp.randn(*shape, dtype=np.float64))
    assert layer.double()(dp.randn(*shape, dtype=np.float64)).dtype == np.float64


def test_functional_linear_refuses_mixed_dtypes_and_a_bad_bias():
    with pytest.raises(TypeError, match="linear: input dtype float64 does not match.*float32"):
        dp.nn.functional.linear(dp.randn(2, 3, dtype=np.float64), dp.randn(4, 3))
    with pytest.raises(ValueError, match=r"linear: bias must have shape \(4,\).*got \(5,\)"):
        dp.nn.functional.linear(dp.randn(2, 3), dp.randn(4, 3), dp.randn(5))
