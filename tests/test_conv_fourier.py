"""Convolution through the Fourier domain (distprop/ops/conv_fourier.py, issue 14).

PyTorch is the oracle (same weights, float64 to 1e-10 and float32 to 1e-4); float64 finite
differences check the three gradients; the dispatch tests check which shapes take the path.
"""

import numpy as np
import pytest
import torch

import distprop as dp
from distprop.amp import autocast
from distprop.ops.conv_fourier import FourierConv2d

from helpers import gradcheck

F = dp.nn.functional

# id, input shape, out channels, kernel, stride, padding (PyTorch's int/tuple or 'same'), dilation
CASES = [
    ("k5_pad2", (2, 4, 9, 11), 6, 5, 1, 2, 1),
    ("k3x5_rect", (2, 3, 8, 10), 4, (3, 5), 1, (1, 2), 1),
    ("no_pad", (1, 2, 12, 9), 3, 5, 1, 0, 1),
    ("same_even_k", (2, 3, 9, 8), 5, (4, 2), 1, "same", 1),  # asymmetric padding
    ("stride2", (2, 3, 10, 8), 4, 5, 2, 2, 1),
    ("stride_2x3", (1, 2, 12, 13), 3, (3, 5), (2, 3), (0, 3), 1),
    ("dilation2", (2, 3, 12, 11), 4, 3, 1, 2, 2),
    ("one_channel_batch1", (1, 1, 7, 7), 1, 7, 1, 3, 1),
    ("odd_even_sizes", (3, 5, 13, 16), 8, 5, 1, (2, 1), (1, 2)),
]


def _pair(shape, o, k, dtype, rng, channels_last=False):
    x = rng.standard_normal(shape).astype(dtype)
    if channels_last:
        x = np.ascontiguousarray(x.transpose(0, 2, 3, 1)).transpose(0, 3, 1, 2)
    kernel = (k, k) if isinstance(k, int) else k
    return x, rng.standard_normal((o, shape[1], *kernel)).astype(dtype), \
        rng.standard_normal(o).astype(dtype)


def _fourier(x, w, b, stride, padding, dilation):
    """conv2d through FourierConv2d whatever the shape (the same argument handling as conv2d)."""
    from distprop.ops import conv

    nd = 2
    pads = conv.conv_padding(padding, tuple(w.shape[2:]), conv.ntuple(dilation, nd, "d"),
                             conv.ntuple(stride, nd, "s"), nd)
    args = (x, w) if b is None else (x, w, b)
    return FourierConv2d.apply(*args, stride=conv.ntuple(stride, nd, "s"), padding=pads,
                               dilation=conv.ntuple(dilation, nd, "d"))


@pytest.mark.filterwarnings("ignore:Using padding='same'")
@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("name,shape,o,k,s,p,d", CASES, ids=[c[0] for c in CASES])
def test_fourier_conv_matches_torch(name, shape, o, k, s, p, d, bias, dtype):
    rng = np.random.default_rng(7)
    x, w, b = _pair(shape, o, k, dtype, rng, channels_last=name == "odd_even_sizes")
    xd, wd, bd = (dp.tensor(a, requires_grad=True) for a in (x, w, b))
    out = _fourier(xd, wd, bd if bias else None, s, p, d)
    xt, wt, bt = (torch.tensor(np.ascontiguousarray(a), requires_grad=True) for a in (x, w, b))
    ref = torch.nn.functional.conv2d(xt, wt, bt if bias else None, stride=s, padding=p,
                                     dilation=d)
    grad = rng.standard_normal(tuple(ref.shape)).astype(dtype)
    out.backward(dp.tensor(grad))
    ref.backward(torch.tensor(grad))
    tol = dict(rtol=1e-10, atol=1e-10) if dtype == "float64" else dict(rtol=1e-4, atol=1e-4)
    for got, want in [(out, ref), (xd.grad, xt.grad), (wd.grad, wt.grad)] + (
            [(bd.grad, bt.grad)] if bias else []):
        assert got.dtype == np.dtype(dtype) and got.shape == tuple(want.shape)
        np.testing.assert_allclose(got.numpy(), want.detach().numpy(), **tol)
    assert bias or bd.grad is None


@pytest.mark.parametrize("shape,o,k", [((8, 16, 24, 24), 16, 5), ((4, 8, 20, 20), 32, 7)])
def test_float32_error_is_no_worse_than_im2col(shape, o, k):
    """Against a float64 reference, the float32 transforms lose no more than im2col's GEMMs."""
    from distprop.ops.conv import ConvNd

    rng = np.random.default_rng(4)
    x = rng.standard_normal(shape).astype(np.float32)
    w = (rng.standard_normal((o, shape[1], k, k)) / np.sqrt(shape[1] * k * k)).astype(np.float32)
    grad = rng.standard_normal((shape[0], o, *shape[2:])).astype(np.float32)
    xt, wt = (torch.tensor(a.astype(np.float64), requires_grad=True) for a in (x, w))
    ref = torch.nn.functional.conv2d(xt, wt, padding=k // 2)
    ref.backward(torch.tensor(grad.astype(np.float64)))
    errors = {}
    for name, cls, kwargs in [("fourier", FourierConv2d, {}), ("im2col", ConvNd, {"groups": 1})]:
        xd, wd = dp.tensor(x, requires_grad=True), dp.tensor(w, requires_grad=True)
        out = cls.apply(xd, wd, stride=(1, 1), padding=((k // 2,) * 2,) * 2, dilation=(1, 1),
                        **kwargs)
        out.backward(dp.tensor(grad))
        errors[name] = [float(np.abs(got.numpy() - want.detach().numpy()).max()
                              / np.abs(want.detach().numpy()).max())
                        for got, want in [(out, ref), (xd.grad, xt.grad), (wd.grad, wt.grad)]]
    assert max(errors["fourier"]) < 1e-6
    for fourier, im2col in zip(errors["fourier"], errors["im2col"]):
        assert fourier <= 2 * im2col, errors


@pytest.mark.parametrize("s,p,d", [(1, 2, 1), (2, 1, 1), (1, (3, 1), (1, 2))])
def test_fourier_conv_finite_differences(s, p, d):
    rng = np.random.default_rng(3)
    x, w, b = _pair((2, 2, 6, 7), 3, (3, 4), np.float64, rng)
    gradcheck(lambda a, v, c: _fourier(a, v, c, s, p, d), x, w, b)


def test_only_the_gradients_asked_for():
    """A first layer (input without gradient) and a frozen weight: no spectrum kept for them."""
    rng = np.random.default_rng(5)
    x, w, b = _pair((2, 3, 9, 9), 4, 5, np.float32, rng)
    for needs_x, needs_w in [(False, True), (True, False)]:
        xd = dp.tensor(x, requires_grad=needs_x)
        wd = dp.tensor(w, requires_grad=needs_w)
        out = _fourier(xd, wd, dp.tensor(b, requires_grad=True), 1, 2, 1)
        assert (out._ctx.xs is None) == (not needs_w) and (out._ctx.ws is None) == (not needs_x)
        out.sum().backward()
        xt = torch.tensor(x, requires_grad=needs_x)
        wt = torch.tensor(w, requires_grad=needs_w)
        torch.nn.functional.conv2d(xt, wt, torch.tensor(b), padding=2).sum().backward()
        for got, want in [(xd.grad, xt.grad), (wd.grad, wt.grad)]:
            assert (got is None) == (want is None)
            if got is not None:
                np.testing.assert_allclose(got.numpy(), want.numpy(), rtol=1e-4, atol=1e-4)


# input shape, out channels, kernel, stride, padding, dilation, groups, dtype, takes the path
DISPATCH = [
    ((8, 16, 16, 16), 32, 5, 1, 2, 1, 1, "float32", True),
    ((8, 8, 14, 14), 32, 7, 1, 3, 1, 1, "float64", True),
    ((8, 4, 12, 12), 16, (5, 5), 1, "same", 1, 1, "float32", True),
    ((4, 16, 16, 16), 32, 5, 1, 2, 1, 1, "float32", False),  # batch below 8
    ((8, 16, 16, 16), 32, 3, 1, 1, 1, 1, "float32", False),  # 9 taps
    ((8, 16, 16, 16), 32, 3, 1, 2, 2, 1, "float32", False),  # dilated: still 9 taps
    ((8, 16, 16, 16), 32, 5, 2, 2, 1, 1, "float32", False),  # strided
    ((8, 16, 16, 16), 32, 5, 1, 2, 1, 2, "float32", False),  # grouped
    ((8, 4, 16, 16), 32, 5, 1, 2, 1, 1, "float32", False),  # O > 4 C
    ((8, 32, 8, 8), 32, 5, 1, 2, 1, 1, "float32", True),  # 8x8 output, C O = 1024
    ((8, 64, 8, 8), 32, 5, 1, 2, 1, 1, "float32", False),  # 8x8 output, C O = 2048
    ((8, 8, 6, 6), 8, 5, 1, 2, 1, 1, "float32", False),  # 6x6 output
    ((8, 4, 8, 8), 32, 7, 1, 3, 1, 1, "float32", True),  # 7x7: O <= 8 C, 8x8 output
    ((8, 4, 8, 8), 36, 7, 1, 3, 1, 1, "float32", False),  # 7x7: O > 8 C
    ((8, 64, 8, 8), 64, (7, 7), 1, 3, 1, 1, "float32", True),  # 7x7: 8x8, any C O
    ((8, 8, 64, 64), 8, 5, 1, 2, 1, 1, "float32", True),  # 64x64 output
    ((8, 8, 8, 65), 8, 5, 1, 2, 1, 1, "float32", False),  # an output side above 64
]


@pytest.mark.filterwarnings("ignore:Using padding='same'")
@pytest.mark.parametrize("shape,o,k,s,p,d,g,dtype,fourier", DISPATCH)
def test_conv2d_takes_the_fourier_path_exactly_where_it_pays(monkeypatch, shape, o, k, s, p, d,
                                                               g, dtype, fourier):
    calls = []
    real = FourierConv2d.forward

    def spy(self, *args, **kwargs):
        calls.append(1)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(FourierConv2d, "forward", spy)
    rng = np.random.default_rng(2)
    x = rng.standard_normal(shape).astype(dtype)
    kernel = (k, k) if isinstance(k, int) else k
    w = rng.standard_normal((o, shape[1] // g, *kernel)).astype(dtype)
    out = F.conv2d(dp.tensor(x), dp.tensor(w), stride=s, padding=p, dilation=d, groups=g)
    ref = torch.nn.functional.conv2d(torch.tensor(x), torch.tensor(w), stride=s, padding=p,
                                     dilation=d, groups=g)
    assert bool(calls) == fourier
    assert out.dtype == np.dtype(dtype)
    np.testing.assert_allclose(out.numpy(), ref.numpy(), rtol=1e-4, atol=1e-4)


def test_empty_batch():
    """An empty batch (conv2d keeps it on im2col; the path itself copes too): an empty output
    and zero weight and bias gradients."""
    w = dp.tensor(np.ones((8, 8, 5, 5), np.float32), requires_grad=True)
    b = dp.tensor(np.ones(8, np.float32), requires_grad=True)
    x = dp.tensor(np.ones((0, 8, 16, 16), np.float32), requires_grad=True)
    out = _fourier(x, w, b, 1, 2, 1)
    out.sum().backward()
    assert out.shape == (0, 8, 16, 16) and x.grad.shape == (0, 8, 16, 16)
    assert not w.grad.numpy().any() and not b.grad.numpy().any()


def test_autocast_keeps_the_im2col_path(monkeypatch):
    monkeypatch.setattr(FourierConv2d, "forward", lambda *a, **k: pytest.fail("Fourier ran"))
    x = dp.tensor(np.ones((8, 8, 16, 16), np.float32))
    w = dp.tensor(np.ones((8, 8, 5, 5), np.float32))
    assert FourierConv2d.suits(x.data, w.data, (1, 1), ((2, 2), (2, 2)), (1, 1), 1)
    with autocast():
        out = F.conv2d(x, w, padding=2)
    assert out.dtype != np.float32


EQUIVALENCE = """
import sys
sys.path.insert(0, 'tests')
from ddp_common import *
from distprop.ops.conv_fourier import FourierConv2d

ran = []
forward = FourierConv2d.forward
FourierConv2d.forward = lambda self, *a, **k: ran.append(1) or forward(self, *a, **k)

def convnet():
    dp.manual_seed(0)
    return nn.Sequential(nn.Conv2d(2, 4, 5, padding=2), nn.Tanh(), nn.Conv2d(4, 4, 5, padding=2),
                         nn.Flatten(), nn.Linear(4 * 12 * 12, 3)).to(np.float64)

rng = np.random.default_rng(1)
x = rng.standard_normal((64, 2, 12, 12))
y = rng.standard_normal((64, 3))
ref, _ = train(convnet(), x, y, steps=4, batch=32, ranks=(1, 0))
ran.clear()  # from here on only the ranks' own batches of 16
net, _ = train(convnet(), x, y, steps=4, batch=32, ddp_kwargs={})
err = max_diff(net.parameters(), [p.data for p in ref.parameters()])
assert ran and err < 1e-10, (len(ran), err)
say(f"err={err:.2e} DONE")
"""


@pytest.mark.mpi
def test_two_ranks_train_like_one_process():
    """2 ranks x 16 images == 1 process x 32, float64, 4 SGD steps through two Fourier layers."""
    from helpers import run_mpi

    done = run_mpi(EQUIVALENCE, nprocs=2)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.count("DONE") == 2, done.stdout + done.stderr
