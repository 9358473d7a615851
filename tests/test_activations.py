"""Activations, softmax/log-softmax and dropout: finite differences, PyTorch oracle, dtypes."""

import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as TF

import distprop as dp
from distprop.nn import functional as F

from helpers import gradcheck

rng = np.random.default_rng(0)


def normal(*shape, scale=1.0):
    return scale * rng.standard_normal(shape)


# name, distprop fn, torch fn, input
ACTIVATIONS = [
    ("relu", F.relu, TF.relu, normal(4, 5)),
    ("relu_method", lambda x: x.relu(), lambda x: x.relu(), normal(3, 4)),
    ("dp.relu", dp.relu, torch.relu, normal(6)),
    ("ReLU", dp.nn.ReLU(), torch.nn.ReLU(), normal(2, 3, 4)),
    ("leaky_relu", F.leaky_relu, TF.leaky_relu, normal(4, 5)),
    ("LeakyReLU_0.2", dp.nn.LeakyReLU(0.2), torch.nn.LeakyReLU(0.2), normal(4, 5)),
    ("elu", F.elu, TF.elu, normal(4, 5, scale=2.0)),
    ("ELU_1.7", dp.nn.ELU(alpha=1.7), torch.nn.ELU(alpha=1.7), normal(4, 5, scale=2.0)),
    ("gelu", F.gelu, TF.gelu, normal(4, 5, scale=2.0)),
    ("GELU_tanh", dp.nn.GELU(approximate="tanh"), torch.nn.GELU(approximate="tanh"),
     normal(4, 5, scale=2.0)),
    ("silu", F.silu, TF.silu, normal(4, 5, scale=3.0)),
    ("SiLU", dp.nn.SiLU(), torch.nn.SiLU(), normal(3, 2)),
    ("sigmoid", F.sigmoid, torch.sigmoid, normal(4, 5, scale=4.0)),
    ("sigmoid_method", lambda x: x.sigmoid(), lambda x: x.sigmoid(), normal(3)),
    ("Sigmoid", dp.nn.Sigmoid(), torch.nn.Sigmoid(), normal(3, 2)),
    ("tanh", dp.tanh, torch.tanh, normal(4, 5, scale=2.0)),
    ("tanh_method", lambda x: x.tanh(), lambda x: x.tanh(), normal(3)),
    ("Tanh", dp.nn.Tanh(), torch.nn.Tanh(), normal(3, 2)),
    ("softmax_dim1", lambda x: F.softmax(x, dim=1), lambda x: TF.softmax(x, dim=1),
     normal(4, 5, scale=3.0)),
    ("softmax_dim0", lambda x: dp.softmax(x, 0), lambda x: torch.softmax(x, 0), normal(4, 5)),
    ("softmax_method_3d", lambda x: x.softmax(-1), lambda x: x.softmax(-1), normal(2, 3, 4)),
    ("softmax_1d", lambda x: x.softmax(0), lambda x: x.softmax(0), normal(5)),
    ("Softmax_dim1_3d", dp.nn.Softmax(dim=1), torch.nn.Softmax(dim=1), normal(2, 3, 4)),
    ("log_softmax_dim1", lambda x: F.log_softmax(x, dim=1), lambda x: TF.log_softmax(x, dim=1),
     normal(4, 5, scale=3.0)),
    ("log_softmax_method", lambda x: x.log_softmax(-1), lambda x: x.log_softmax(-1),
     normal(2, 3, 4)),
    ("dp.log_softmax_dim0", lambda x: dp.log_softmax(x, 0), lambda x: torch.log_softmax(x, 0),
     normal(3, 4)),
    ("LogSoftmax", dp.nn.LogSoftmax(dim=-1), torch.nn.LogSoftmax(dim=-1), normal(3, 4)),
    ("Dropout_eval", dp.nn.Dropout(0.5).eval(), torch.nn.Dropout(0.5).eval(), normal(3, 4)),
    ("dropout_not_training", lambda x: F.dropout(x, 0.3, training=False),
     lambda x: TF.dropout(x, 0.3, training=False), normal(3, 4)),
    ("dropout_p0", lambda x: F.dropout(x, 0.0), lambda x: TF.dropout(x, 0.0), normal(3, 4)),
]
IDS = [a[0] for a in ACTIVATIONS]


@pytest.mark.parametrize("name,fn,_torch_fn,x", ACTIVATIONS, ids=IDS)
def test_gradcheck(name, fn, _torch_fn, x):
    gradcheck(fn, x)


@pytest.mark.parametrize("name,fn,torch_fn,x", ACTIVATIONS, ids=IDS)
@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_matches_torch(name, fn, torch_fn, x, dtype):
    a = np.asarray(x, dtype=dtype)
    ours, theirs = dp.tensor(a, requires_grad=True), torch.tensor(a, requires_grad=True)
    out, ref = fn(ours), torch_fn(theirs)
    assert out.dtype == np.dtype(dtype), f"{name}: {dtype} in, {out.dtype} out"
    tol = dict(rtol=1e-10, atol=1e-12) if dtype == "float64" else dict(rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(out.numpy(), ref.detach().numpy(), **tol)
    weights = np.random.default_rng(1).standard_normal(out.shape).astype(dtype)
    out.backward(dp.tensor(weights))
    ref.backward(torch.tensor(weights))
    assert ours.grad.dtype == np.dtype(dtype)
    np.testing.assert_allclose(ours.grad.numpy(), theirs.grad.numpy(), **tol)


EXTREMES = np.array([-1000.0, -80.0, -20.0, -1e-8, 0.0, 1e-8, 20.0, 80.0, 1000.0])
STABLE = [
    ("sigmoid", dp.sigmoid, torch.sigmoid),
    ("silu", F.silu, TF.silu),
    ("elu", F.elu, TF.elu),
    ("gelu", F.gelu, TF.gelu),
    ("gelu_tanh", lambda x: F.gelu(x, approximate="tanh"),
     lambda x: TF.gelu(x, approximate="tanh")),
    ("tanh", dp.tanh, torch.tanh),
    ("softmax", lambda x: x.softmax(0), lambda x: x.softmax(0)),
    ("log_softmax", lambda x: x.log_softmax(0), lambda x: x.log_softmax(0)),
]


@pytest.mark.parametrize("name,fn,torch_fn", STABLE, ids=[s[0] for s in STABLE])
@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_extreme_inputs_are_finite_and_match(name, fn, torch_fn, dtype):
    a = EXTREMES.astype(dtype)
    x = dp.tensor(a, requires_grad=True)
    tx = torch.tensor(a, requires_grad=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no overflow warnings from NumPy
        out = fn(x)
        out.backward(dp.ones_like(out))
    ref = torch_fn(tx)
    ref.backward(torch.ones_like(ref))
    assert np.isfinite(out.numpy()).all() and np.isfinite(x.grad.numpy()).all()
    np.testing.assert_allclose(out.numpy(), ref.detach().numpy(), rtol=1e-6, atol=1e-30)
    np.testing.assert_allclose(x.grad.numpy(), tx.grad.numpy(), rtol=1e-5, atol=1e-30)


@pytest.mark.parametrize("shape", [(5,), (3, 4), (2, 3, 4), (2, 3, 4, 2)])
def test_softmax_implicit_dim_follows_torch(shape):
    a = rng.standard_normal(shape)
    with pytest.warns(UserWarning, match="Implicit dimension"):
        out = dp.nn.Softmax()(dp.tensor(a))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = torch.nn.Softmax()(torch.tensor(a))
        lref = TF.log_softmax(torch.tensor(a))
    np.testing.assert_allclose(out.numpy(), ref.numpy(), rtol=1e-12)
    with pytest.warns(UserWarning):
        np.testing.assert_allclose(F.log_softmax(dp.tensor(a)).numpy(), lref.numpy(), rtol=1e-12)


def test_softmax_dtype_argument():
    x = dp.randn(3, 4)
    out = F.softmax(x, dim=1, dtype=dp.float64)
    assert out.dtype == np.float64
    np.testing.assert_allclose(out.numpy().sum(1), 1.0, rtol=1e-12)


MODULE_REPRS = [
    (dp.nn.ReLU(), torch.nn.ReLU()),
    (dp.nn.LeakyReLU(0.2), torch.nn.LeakyReLU(0.2)),
    (dp.nn.ELU(), torch.nn.ELU()),
    (dp.nn.GELU(approximate="tanh"), torch.nn.GELU(approximate="tanh")),
    (dp.nn.SiLU(), torch.nn.SiLU()),
    (dp.nn.Sigmoid(), torch.nn.Sigmoid()),
    (dp.nn.Tanh(), torch.nn.Tanh()),
    (dp.nn.Softmax(dim=1), torch.nn.Softmax(dim=1)),
    (dp.nn.LogSoftmax(dim=-1), torch.nn.LogSoftmax(dim=-1)),
    (dp.nn.Dropout(0.25), torch.nn.Dropout(0.25)),
]


@pytest.mark.parametrize("ours,theirs", MODULE_REPRS, ids=[repr(m[1]) for m in MODULE_REPRS])
def test_module_repr_and_state_match_torch(ours, theirs):
    assert repr(ours) == repr(theirs)
    assert list(ours.state_dict()) == list(theirs.state_dict()) == []


def test_bad_arguments():
    with pytest.raises(ValueError, match="approximate"):
        dp.nn.GELU(approximate="fast")
    with pytest.raises(ValueError, match="approximate"):
        F.gelu(dp.randn(3), approximate="erf")
    for p in (-0.1, 1.5):
        with pytest.raises(ValueError, match="between 0 and 1"):
            dp.nn.Dropout(p)
        with pytest.raises(ValueError, match="between 0 and 1"):
            F.dropout(dp.randn(3), p)
    with pytest.raises(TypeError, match="floating-point"):
        dp.sigmoid(dp.tensor([1, 2, 3]))
    with pytest.raises(TypeError, match="floating-point"):
        dp.softmax(dp.tensor([1, 2, 3]), 0)
    with pytest.raises(IndexError, match="out of range"):
        dp.softmax(dp.randn(3, 4), 2)


# --- dropout -----------------------------------------------------------------------------------


@pytest.mark.parametrize("p", [0.1, 0.5, 0.8])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_dropout_statistics_in_training(p, dtype):
    n = 200_000
    x = dp.ones(n, dtype=dtype, requires_grad=True)
    layer = dp.nn.Dropout(p)
    out = layer(x)
    assert out.dtype == np.dtype(dtype)
    values = out.numpy()
    kept = values != 0
    # zero fraction within 5 standard errors of p; survivors scaled exactly by 1/(1-p)
    se = np.sqrt(p * (1 - p) / n)
    assert abs((1 - kept.mean()) - p) < 5 * se
    np.testing.assert_allclose(values[kept], 1 / (1 - p), rtol=1e-6)
    assert abs(values.mean() - 1.0) < 5 * se / (1 - p)
    out.sum().backward()
    assert x.grad.dtype == np.dtype(dtype)
    np.testing.assert_array_equal(x.grad.numpy(), values)  # grad = mask / (1 - p)


def test_dropout_eval_is_identity_and_train_mode_toggles():
    layer = dp.nn.Dropout(0.5)
    x = dp.randn(64, 32)
    layer.eval()
    assert layer(x) is x
    layer.train()
    assert (layer(x).numpy() == 0).any()


def test_dropout_edge_probabilities():
    x = dp.randn(10, 10, requires_grad=True)
    assert F.dropout(x, 0.0) is x
    out = F.dropout(x, 1.0)
    np.testing.assert_array_equal(out.numpy(), 0.0)
    out.sum().backward()
    np.testing.assert_array_equal(x.grad.numpy(), 0.0)
    ref = TF.dropout(torch.ones(10, 10), 1.0)
    assert (ref == 0).all()


def test_dropout_is_reproducible_with_manual_seed():
    x = dp.ones(1000)
    dp.manual_seed(123)
    a = F.dropout(x, 0.5).numpy()
    dp.manual_seed(123)
    b = F.dropout(x, 0.5).numpy()
    c = F.dropout(x, 0.5).numpy()
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(b, c)
