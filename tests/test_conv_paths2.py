"""More fast NumPy paths of pooling (issue 14, branch lconv2): max pooling one dim at a time.
(Its 1x1-convolution tests joined the pointwise table of test_fast_paths.py.)

PyTorch is the oracle (same weights); float64 finite differences check the gradients; each path
test also checks that the path under test really ran.
"""

import numpy as np
import pytest
import torch

import distprop as dp
from distprop.ops import pool

from helpers import gradcheck

F = dp.nn.functional


def _tol(dtype):
    return dict(rtol=1e-10, atol=1e-12) if dtype == "float64" else dict(rtol=1e-5, atol=1e-5)


def _leaf(x, channels_last):
    """A leaf tensor of x, or of x moved channels-last (N, H, W, C) when asked."""
    return dp.tensor(np.ascontiguousarray(x.transpose(0, 2, 3, 1)) if channels_last else x,
                     requires_grad=True)


# --- max pooling one dim at a time (3+ taps in a dim) ----------------------------------------

# id, kwargs, input shape, channels-last input
SEPARABLE_MAX = [
    ("k3_s2", dict(kernel_size=3, stride=2), (2, 3, 35, 33), False),
    ("k3_s1", dict(kernel_size=3, stride=1), (2, 2, 18, 19), False),
    ("k3_s2_pad", dict(kernel_size=3, stride=2, padding=1), (2, 3, 32, 34), False),
    ("k3_s3_exact", dict(kernel_size=3, stride=3), (1, 2, 51, 48), False),
    ("k3x2_rect", dict(kernel_size=(3, 2), stride=(2, 1)), (2, 2, 34, 20), False),
    ("k4_s3_ceil", dict(kernel_size=4, stride=3, padding=1, ceil_mode=True), (1, 3, 50, 52),
     False),
    ("k3_dilated", dict(kernel_size=3, stride=1, dilation=2), (1, 2, 22, 21), False),
    ("k3_s2_channels_last", dict(kernel_size=3, stride=2), (2, 8, 33, 35), True),
]


def _spy_route(monkeypatch):
    calls = []
    real = pool._route_first_max

    def spy(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(pool, "_route_first_max", spy)
    return calls


@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("name,kwargs,shape,cl", SEPARABLE_MAX, ids=[c[0] for c in SEPARABLE_MAX])
def test_separable_max_pool_matches_torch(monkeypatch, name, kwargs, shape, cl, dtype, ties):
    calls = _spy_route(monkeypatch)
    rng = np.random.default_rng(23)
    x = rng.standard_normal(shape).astype(dtype)
    if ties:  # few distinct values, many zeros (ReLU-like): most windows hold tied maxima
        x = np.maximum(np.round(x * 1.5), 0).astype(dtype)
    xd = _leaf(x, cl)
    xin = xd.permute(0, 3, 1, 2) if cl else xd
    xt = torch.tensor(x, requires_grad=True)
    out = F.max_pool2d(xin, **kwargs)
    ref = torch.nn.functional.max_pool2d(xt, **kwargs)
    grad = rng.standard_normal(tuple(ref.shape)).astype(dtype)
    out.backward(dp.tensor(grad))
    ref.backward(torch.tensor(grad))
    assert len(calls) == 2, "the one-dim-at-a-time max pooling did not run"
    assert out.dtype == np.dtype(dtype) and xd.grad.dtype == np.dtype(dtype)
    np.testing.assert_array_equal(out.numpy(), ref.detach().numpy())
    gx = xd.grad.numpy().transpose(0, 3, 1, 2) if cl else xd.grad.numpy()
    np.testing.assert_allclose(gx, xt.grad.numpy(), **_tol(dtype))
    # every gradient lands on exactly one element of its window (ties included)
    if ties and kwargs["kernel_size"] == kwargs["stride"] == 3:
        assert np.count_nonzero(gx) == np.count_nonzero(grad)


def test_separable_max_pool_tie_goes_to_first_in_row_major_order(monkeypatch):
    calls = _spy_route(monkeypatch)
    # every 3x3 window has its max twice: at (0, 2) and (1, 0); row-major first is (0, 2)
    tile = np.array([[0, 0, 5], [5, 0, 0], [0, 0, 0]], dtype=np.float64)
    x = np.tile(tile, (18, 18))[None, None]
    xd, xt = dp.tensor(x, requires_grad=True), torch.tensor(x, requires_grad=True)
    F.max_pool2d(xd, 3).sum().backward()
    torch.nn.functional.max_pool2d(xt, 3).sum().backward()
    assert calls
    np.testing.assert_array_equal(xd.grad.numpy(), xt.grad.numpy())
    assert xd.grad.numpy()[0, 0, 0, 2] == 1 and xd.grad.numpy()[0, 0, 1, 0] == 0


def test_small_max_pool_keeps_one_pass_path(monkeypatch):
    calls = _spy_route(monkeypatch)
    x = dp.tensor(np.random.default_rng(24).standard_normal((2, 3, 13, 13)), requires_grad=True)
    F.max_pool2d(x, 3, 2).sum().backward()  # 6x6 outputs: the one-pass path
    assert not calls


@pytest.mark.parametrize("kwargs", [dict(kernel_size=3, stride=2, padding=1),
                                    dict(kernel_size=(3, 2), stride=1)])
def test_separable_max_pool_finite_differences(monkeypatch, kwargs):
    calls = _spy_route(monkeypatch)
    rng = np.random.default_rng(25)
    # distinct values far apart: no ties, so the max is differentiable everywhere
    x = rng.permutation(33 * 33).reshape(1, 1, 33, 33) * 0.01
    gradcheck(lambda a: F.max_pool2d(a, **kwargs), x)
    assert calls
