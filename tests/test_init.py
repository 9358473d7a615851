"""Initialisers: gains and fans equal PyTorch's; empirical distributions match the theory."""

import math

import numpy as np
import pytest
import torch

import distprop as dp
from distprop.nn import init

GAINS = [
    ("linear", None), ("conv1d", None), ("conv2d", None), ("conv3d", None),
    ("conv_transpose1d", None), ("conv_transpose2d", None), ("conv_transpose3d", None),
    ("sigmoid", None), ("tanh", None), ("relu", None), ("leaky_relu", None),
    ("leaky_relu", 0.2), ("leaky_relu", 1), ("leaky_relu", math.sqrt(5)), ("selu", None),
]


@pytest.mark.parametrize("nonlinearity,param", GAINS)
def test_calculate_gain_equals_torch(nonlinearity, param):
    expected = torch.nn.init.calculate_gain(nonlinearity, param)
    assert init.calculate_gain(nonlinearity, param) == pytest.approx(expected, rel=1e-15)


@pytest.mark.parametrize("nonlinearity,param", [("swish", None), ("leaky_relu", "0.1"),
                                                ("leaky_relu", True)])
def test_calculate_gain_rejects_what_torch_rejects(nonlinearity, param):
    with pytest.raises(ValueError):
        torch.nn.init.calculate_gain(nonlinearity, param)
    with pytest.raises(ValueError):
        init.calculate_gain(nonlinearity, param)


@pytest.mark.parametrize("shape", [(5, 3), (8, 4, 3), (16, 3, 5, 5), (2, 6, 2, 3, 4), (7, 1)])
def test_fan_in_and_fan_out_equal_torch(shape):
    expected = torch.nn.init._calculate_fan_in_and_fan_out(torch.empty(shape))
    assert init._calculate_fan_in_and_fan_out(dp.empty(*shape)) == expected


def test_fans_need_two_dimensions():
    with pytest.raises(ValueError, match="fewer than 2 dimensions"):
        init.xavier_uniform_(dp.empty(5))
    with pytest.raises(ValueError, match="Mode fan_avg not supported"):
        init.kaiming_uniform_(dp.empty(3, 3), mode="fan_avg")


SHAPE = (500, 400)  # fan_in 400, fan_out 500: 200,000 samples
CONV = (64, 48, 3, 3)  # fan_in 432, fan_out 576: 27,648 samples
FANS = {SHAPE: (400, 500), CONV: (432, 576)}


def _uniform(low, high):
    return {"low": low, "high": high, "mean": (low + high) / 2, "std": (high - low) / math.sqrt(12)}


def _normal(mean, std):
    return {"mean": mean, "std": std}


def _kaiming_gain(a, nonlinearity):
    return torch.nn.init.calculate_gain(nonlinearity, a)


# name, initialiser call, shape, expected distribution
INITS = [
    ("uniform_", lambda t: init.uniform_(t, -0.3, 0.7), SHAPE, _uniform(-0.3, 0.7)),
    ("uniform_default", init.uniform_, SHAPE, _uniform(0.0, 1.0)),
    ("normal_", lambda t: init.normal_(t, 0.5, 2.0), SHAPE, _normal(0.5, 2.0)),
    ("normal_default", init.normal_, SHAPE, _normal(0.0, 1.0)),
    ("xavier_uniform_", init.xavier_uniform_, SHAPE,
     _uniform(-math.sqrt(6 / 900), math.sqrt(6 / 900))),
    ("xavier_uniform_gain_conv", lambda t: init.xavier_uniform_(t, gain=2.0), CONV,
     _uniform(-2 * math.sqrt(6 / 1008), 2 * math.sqrt(6 / 1008))),
    ("xavier_normal_", init.xavier_normal_, SHAPE, _normal(0.0, math.sqrt(2 / 900))),
    ("xavier_normal_gain_conv", lambda t: init.xavier_normal_(t, gain=0.5), CONV,
     _normal(0.0, 0.5 * math.sqrt(2 / 1008))),
]
for _a, _mode, _nl, _shape in [(0, "fan_in", "relu", SHAPE), (0, "fan_out", "relu", SHAPE),
                               (0.1, "fan_in", "leaky_relu", CONV),
                               (math.sqrt(5), "fan_in", "leaky_relu", SHAPE),
                               (0, "fan_out", "tanh", CONV), (0, "fan_in", "leaky_relu", SHAPE)]:
    _fan = FANS[_shape][0 if _mode == "fan_in" else 1]
    _std = _kaiming_gain(_a, _nl) / math.sqrt(_fan)
    _bound = math.sqrt(3.0) * _std
    _args = dict(a=_a, mode=_mode, nonlinearity=_nl)
    INITS.append((f"kaiming_uniform_{_mode}_{_nl}_{_a:.2f}",
                  lambda t, kw=_args: init.kaiming_uniform_(t, **kw), _shape,
                  _uniform(-_bound, _bound)))
    INITS.append((f"kaiming_normal_{_mode}_{_nl}_{_a:.2f}",
                  lambda t, kw=_args: init.kaiming_normal_(t, **kw), _shape, _normal(0.0, _std)))


@pytest.mark.parametrize("name,fn,shape,dist", INITS, ids=[i[0] for i in INITS])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_empirical_distribution(name, fn, shape, dist, dtype):
    t = dp.nn.Parameter(dp.empty(*shape, dtype=dtype))
    assert fn(t) is t
    assert t.dtype == np.dtype(dtype) and t.grad_fn is None
    values = t.numpy().astype(np.float64)
    n = values.size
    std = values.std()
    assert abs(values.mean() - dist["mean"]) < 5 * dist["std"] / math.sqrt(n)
    assert std == pytest.approx(dist["std"], rel=0.03)
    if "low" in dist:
        width = dist["high"] - dist["low"]
        assert values.min() >= dist["low"] and values.max() <= dist["high"]
        # the samples fill the interval: the extremes lie within 0.1% of the width of the bounds
        assert values.min() < dist["low"] + 1e-3 * width
        assert values.max() > dist["high"] - 1e-3 * width
    else:
        # Gaussian: fraction within one standard deviation is about 68.27%
        within = np.mean(np.abs(values - dist["mean"]) < dist["std"])
        assert within == pytest.approx(0.6827, abs=0.02)


@pytest.mark.parametrize("fn,value", [(init.zeros_, 0.0), (init.ones_, 1.0),
                                      (lambda t: init.constant_(t, -2.5), -2.5)])
def test_constant_initialisers(fn, value):
    t = dp.empty(4, 3)
    assert fn(t) is t
    assert t.dtype == np.float32
    np.testing.assert_array_equal(t.numpy(), value)


@pytest.mark.parametrize("shape", [(30, 50), (50, 30), (8, 2, 3, 3), (20, 20)])
@pytest.mark.parametrize("gain", [1.0, 2.0])
def test_orthogonal(shape, gain):
    t = init.orthogonal_(dp.empty(*shape, dtype=dp.float64), gain=gain)
    flat = t.numpy().reshape(shape[0], -1)
    rows, cols = flat.shape
    gram = flat @ flat.T if rows <= cols else flat.T @ flat
    np.testing.assert_allclose(gram, gain**2 * np.eye(min(rows, cols)), atol=1e-10)


def test_orthogonal_needs_two_dimensions():
    with pytest.raises(ValueError, match="2 or more dimensions"):
        init.orthogonal_(dp.empty(5))


@pytest.mark.parametrize("in_features,out_features", [(300, 200), (784, 1024), (7, 3)])
def test_linear_default_init_matches_torch_bounds(in_features, out_features):
    ours = dp.nn.Linear(in_features, out_features)
    theirs = torch.nn.Linear(in_features, out_features)
    bound = 1 / math.sqrt(in_features)
    # PyTorch: kaiming_uniform_(a=sqrt(5)) gives U(-1/sqrt(fan_in), 1/sqrt(fan_in)); bias the same
    assert torch.nn.init.calculate_gain("leaky_relu", math.sqrt(5)) * math.sqrt(3) == (
        pytest.approx(1.0))
    for p, tp in ((ours.weight, theirs.weight), (ours.bias, theirs.bias)):
        values = p.numpy()
        assert p.dtype == np.float32 and p.shape == tuple(tp.shape)
        assert np.abs(values).max() <= bound * (1 + 1e-6)
        assert np.abs(tp.detach().numpy()).max() <= bound * (1 + 1e-6)
    if in_features * out_features > 10_000:
        w = ours.weight.numpy()
        assert w.std() == pytest.approx(bound / math.sqrt(3), rel=0.02)
        assert w.std() == pytest.approx(theirs.weight.detach().numpy().std(), rel=0.02)


def test_manual_seed_makes_initialisation_reproducible():
    dp.manual_seed(1234)
    a = dp.nn.Linear(20, 10)
    t_a = init.orthogonal_(dp.empty(6, 4))
    dp.manual_seed(1234)
    b = dp.nn.Linear(20, 10)
    t_b = init.orthogonal_(dp.empty(6, 4))
    c = dp.nn.Linear(20, 10)
    np.testing.assert_array_equal(a.weight.numpy(), b.weight.numpy())
    np.testing.assert_array_equal(a.bias.numpy(), b.bias.numpy())
    np.testing.assert_array_equal(t_a.numpy(), t_b.numpy())
    assert not np.array_equal(b.weight.numpy(), c.weight.numpy())
    dp.manual_seed(99)
    assert not np.array_equal(dp.nn.Linear(20, 10).weight.numpy(), a.weight.numpy())
