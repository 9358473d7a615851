"""Fast paths of the compute ops (issue 14) against PyTorch and float64 finite differences.

Pointwise (1x1) convolutions skip im2col; activations, max-pool and batch norm bring a gradient
that arrives in another memory layout (channels-first grad for a channels-last activation)
into the activation's layout first. Every row runs both layouts, since the results must not
depend on them.
"""

import numpy as np
import pytest
import torch

import distprop as dp
from distprop.ops.conv import PointwiseConv, is_channels_last

from helpers import gradcheck

# name, input shape, out channels, stride, bias, channels-last input
POINTWISE = [
    ("cf", (2, 3, 5, 6), 4, 1, True, False),
    ("cl", (2, 3, 5, 6), 4, 1, True, True),
    ("cf_stride2", (2, 3, 5, 7), 4, 2, True, False),
    ("cl_stride2", (2, 4, 6, 5), 3, 2, False, True),
    ("one_channel", (3, 1, 4, 4), 5, 1, True, False),
    ("one_channel_stride2", (2, 1, 7, 6), 5, 2, True, False),
    ("one_channel_no_bias", (2, 1, 4, 4), 3, 1, False, False),
    ("one_channel_from_channels_last", (2, 1, 4, 5), 4, 1, True, True),
    ("stride_2x1", (2, 3, 5, 4), 2, (2, 1), True, False),
    ("conv1d", (2, 3, 9), 4, 2, True, False),
]


def _layout(a, channels_last):
    """a (N, C, *sp) stored channels-last (a strided view) or C-contiguous."""
    if not channels_last:
        return np.ascontiguousarray(a)
    perm = (0, *range(2, a.ndim), 1)
    back = (0, a.ndim - 1, *range(1, a.ndim - 1))
    return np.ascontiguousarray(a.transpose(perm)).transpose(back)


def _leaf(a, requires_grad=False):
    """A Tensor over ``a`` itself, strides kept (``dp.tensor`` would copy to C order)."""
    t = dp.tensor(a, requires_grad=requires_grad)
    t.data = a
    return t


def _conv(x, w, b, stride):
    fn = dp.nn.functional.conv1d if x.ndim == 3 else dp.nn.functional.conv2d
    return fn(x, w, b, stride=stride)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("name,shape,o,stride,bias,cl", POINTWISE, ids=[r[0] for r in POINTWISE])
def test_pointwise_conv_matches_torch(name, shape, o, stride, bias, cl, dtype):
    rng = np.random.default_rng(0)
    x = _layout(rng.standard_normal(shape).astype(dtype), cl)
    w = rng.standard_normal((o, shape[1]) + (1,) * (len(shape) - 2)).astype(dtype)
    b = rng.standard_normal(o).astype(dtype) if bias else None
    xt = _leaf(x, requires_grad=True)
    assert is_channels_last(xt.data) == (cl and shape[1] > 1)
    wt = dp.tensor(w, requires_grad=True)
    bt = dp.tensor(b, requires_grad=True) if bias else None
    out = _conv(xt, wt, bt, stride)
    assert type(out._ctx) is PointwiseConv
    # one channel and channels-first inputs give a channels-first output
    assert out.numpy().flags.c_contiguous == (not cl or shape[1] == 1)
    tfn = torch.nn.functional.conv1d if len(shape) == 3 else torch.nn.functional.conv2d
    rx, rw = torch.tensor(np.ascontiguousarray(x), requires_grad=True), torch.tensor(
        w, requires_grad=True)
    rb = torch.tensor(b, requires_grad=True) if bias else None
    ref = tfn(rx, rw, rb, stride=stride)
    proj = rng.standard_normal(tuple(ref.shape)).astype(dtype)
    (out * dp.tensor(proj)).sum().backward()
    (ref * torch.tensor(proj)).sum().backward()
    tol = dict(rtol=1e-4, atol=1e-5) if dtype == "float32" else dict(rtol=1e-10, atol=1e-10)
    assert out.dtype == np.dtype(dtype) and xt.grad.dtype == np.dtype(dtype)
    np.testing.assert_allclose(out.numpy(), ref.detach().numpy(), **tol)
    np.testing.assert_allclose(xt.grad.numpy(), rx.grad.numpy(), **tol)
    np.testing.assert_allclose(wt.grad.numpy(), rw.grad.numpy(), **tol)
    if bias:
        np.testing.assert_allclose(bt.grad.numpy(), rb.grad.numpy(), **tol)


GRADCHECKED = [r for r in POINTWISE if r[0] in ("cf", "cl", "cf_stride2", "cl_stride2",
                                                 "one_channel", "one_channel_stride2")]


@pytest.mark.parametrize("name,shape,o,stride,bias,cl", GRADCHECKED,
                         ids=[r[0] for r in GRADCHECKED])
def test_pointwise_conv_gradcheck(name, shape, o, stride, bias, cl):
    rng = np.random.default_rng(1)
    x = rng.standard_normal(shape)
    w = rng.standard_normal((o, shape[1], 1, 1))
    b = rng.standard_normal(o)

    def fn(x, w, b):
        if cl:  # make the input channels-last the way a network does: a 3x3 conv's output
            x = dp.nn.functional.conv2d(x, dp.tensor(np.ones((shape[1], 1, 3, 3))), padding=1,
                                        groups=shape[1])
        return _conv(x, w, b if bias else None, stride)

    gradcheck(fn, x, w, b)


# name, distprop module, torch module
ACTIVATIONS = [
    ("relu", dp.nn.ReLU, torch.nn.ReLU),
    ("leaky", lambda: dp.nn.LeakyReLU(0.1), lambda: torch.nn.LeakyReLU(0.1)),
    ("leaky_steep", lambda: dp.nn.LeakyReLU(1.5), lambda: torch.nn.LeakyReLU(1.5)),
    ("leaky_negative", lambda: dp.nn.LeakyReLU(-0.2), lambda: torch.nn.LeakyReLU(-0.2)),
    ("sigmoid", dp.nn.Sigmoid, torch.nn.Sigmoid),
    ("silu", dp.nn.SiLU, torch.nn.SiLU),
    ("tanh", dp.nn.Tanh, torch.nn.Tanh),
    ("gelu", dp.nn.GELU, torch.nn.GELU),
    ("maxpool", lambda: dp.nn.MaxPool2d(2), lambda: torch.nn.MaxPool2d(2)),
    ("maxpool_overlap", lambda: dp.nn.MaxPool2d(3, 1, 1), lambda: torch.nn.MaxPool2d(3, 1, 1)),
    ("batchnorm", lambda: dp.nn.BatchNorm2d(4), lambda: torch.nn.BatchNorm2d(4)),
]


@pytest.mark.parametrize("x_cl,grad_cl", [(True, False), (False, True), (True, True)])
@pytest.mark.parametrize("name,ours_cls,torch_cls", ACTIVATIONS, ids=[a[0] for a in ACTIVATIONS])
def test_layouts_match_torch(name, ours_cls, torch_cls, x_cl, grad_cl):
    """Input and incoming gradient in different memory layouts: same values as PyTorch."""
    rng = np.random.default_rng(2)
    x = rng.standard_normal((3, 4, 6, 6)).astype(np.float32) * 3
    x[0, 0, :2, :2] = 0.0  # ties (max-pool takes the first) and ReLU's kink
    x[1, 1, 0, 0] = -120.0  # sigmoid's exp(-x) overflows: the limit must be 0, no warning
    ours, ref = ours_cls(), torch_cls()
    xt = _leaf(_layout(x, x_cl), requires_grad=True)
    rx = torch.tensor(x, requires_grad=True)
    with np.errstate(all="raise"):
        out = ours(xt)
    ref_out = ref(rx)
    grad = rng.standard_normal(tuple(ref_out.shape)).astype(np.float32)
    out.backward(_leaf(_layout(grad, grad_cl)))
    ref_out.backward(torch.tensor(grad))
    assert out.dtype == np.float32 and xt.grad.dtype == np.float32
    np.testing.assert_allclose(out.numpy(), ref_out.detach().numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(xt.grad.numpy(), rx.grad.numpy(), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", ["sigmoid", "silu", "leaky", "leaky_steep", "tanh"])
def test_activation_gradcheck(name):
    ours_cls = dict((a[0], a[1]) for a in ACTIVATIONS)[name]
    x = np.random.default_rng(3).standard_normal((2, 3, 4, 4)) * 2
    gradcheck(lambda t: ours_cls()(t), x)


def test_same_layout_copies_only_across_layouts():
    from distprop.ops._util import same_layout

    cl = _layout(np.ones((2, 3, 4, 5), np.float32), True)
    cf = np.ones((2, 3, 4, 5), np.float32)
    assert same_layout(cf, cf) is cf
    moved = same_layout(cf, cl)
    assert moved is not cf and moved.strides == cl.strides
    np.testing.assert_array_equal(moved, cf)
    ones = np.broadcast_to(np.float32(1), cl.shape)  # sum()'s gradient: left as it is
    assert same_layout(ones, cl) is ones
