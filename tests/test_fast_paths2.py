"""More fast paths of issue 14, against PyTorch and float64 finite differences.

GELU's float32 erf (A&S 7.1.26 over cache-sized blocks, the derivative made in the forward),
Embedding's scatter-add backward, and BatchNorm's fused per-channel scale/shift passes.
"""

import numpy as np
import pytest
import torch

import distprop as dp
from distprop.ops.activation import _gelu_f32

from helpers import gradcheck

# name, shape, scale, non-contiguous input
GELU_CASES = [
    ("small", (3, 5), 3.0, False),
    ("blocks", (70001,), 4.0, False),  # one full block of 65536 and a partial one
    ("wide_range", (4, 1000), 12.0, False),
    ("transposed", (40, 30), 3.0, True),
]


@pytest.mark.parametrize("name,shape,scale,transposed", GELU_CASES,
                         ids=[c[0] for c in GELU_CASES])
def test_gelu_float32_matches_torch(name, shape, scale, transposed):
    rng = np.random.default_rng(0)
    x = (rng.standard_normal(shape) * scale).astype(np.float32)
    x.reshape(-1)[:4] = [0.0, -0.0, 1e-30, -6.0]
    if transposed:
        x = x.T
    xt = dp.tensor(x, requires_grad=True)
    xt.data = x
    rx = torch.tensor(x, requires_grad=True)
    out, ref = dp.nn.functional.gelu(xt), torch.nn.functional.gelu(rx)
    grad = rng.standard_normal(x.shape).astype(np.float32)
    out.backward(dp.tensor(grad))
    ref.backward(torch.tensor(grad))
    assert out.dtype == np.float32 and xt.grad.dtype == np.float32
    # atol: PyTorch's own 1 + erf(x) loses ~1.2e-6 for x near -4 (ours is closer to exact there)
    np.testing.assert_allclose(out.numpy(), ref.detach().numpy(), rtol=2e-6, atol=2e-6)
    np.testing.assert_allclose(xt.grad.numpy(), rx.grad.numpy(), rtol=2e-6, atol=2e-6)


def test_gelu_float32_close_to_exact_erf():
    """Absolute error of Phi and of gelu' <= 5e-7 over [-12, 12] against float64 math.erf."""
    from math import erf, exp, pi, sqrt

    x = np.linspace(-12, 12, 20001).astype(np.float32)
    out, deriv = _gelu_f32(x)
    xd = x.astype(np.float64)
    cdf = np.array([0.5 * (1 + erf(v / sqrt(2))) for v in xd])
    pdf = np.array([exp(-v * v / 2) / sqrt(2 * pi) for v in xd])
    assert np.abs(out - xd * cdf).max() < 1e-6
    assert np.abs(deriv - (cdf + xd * pdf)).max() < 5e-7
    assert _gelu_f32(np.zeros(3, np.float32))[1].tolist() == [0.5, 0.5, 0.5]


@pytest.mark.parametrize("dtype", ["float16", "float64"])
def test_gelu_keeps_other_dtypes(dtype):
    """The erf path (scipy) for the other dtypes: result and gradient in the input's dtype."""
    x = np.linspace(-5, 5, 41).astype(dtype)
    xt = dp.tensor(x, requires_grad=True)
    out = dp.nn.functional.gelu(xt)
    out.backward(dp.tensor(np.ones_like(x)))
    assert out.dtype == np.dtype(dtype) and xt.grad.dtype == np.dtype(dtype)
    rx = torch.tensor(x.astype(np.float64), requires_grad=True)
    ref = torch.nn.functional.gelu(rx)
    ref.sum().backward()
    tol = 2e-3 if dtype == "float16" else 1e-12
    np.testing.assert_allclose(out.numpy().astype(np.float64), ref.detach().numpy(), rtol=tol,
                               atol=tol)
    np.testing.assert_allclose(xt.grad.numpy().astype(np.float64), rx.grad.numpy(), rtol=tol,
                               atol=tol)


@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_gelu_float64_gradcheck(approximate):
    x = np.random.default_rng(1).standard_normal((3, 7)) * 3
    gradcheck(lambda t: dp.nn.functional.gelu(t, approximate=approximate), x)
    xt = dp.tensor(x)
    ref = torch.nn.functional.gelu(torch.tensor(x), approximate=approximate).numpy()
    np.testing.assert_allclose(dp.nn.functional.gelu(xt, approximate=approximate).numpy(), ref,
                               rtol=1e-12, atol=1e-14)


# name, vocab, dim, index shape, padding_idx, repeats: index 2 fills every other slot
EMBEDDING_CASES = [
    ("narrow", 7, 16, (4, 5), None, False),  # np.add.at on elements
    ("wide", 9, 260, (3, 6), None, False),  # rounds over occurrences
    ("wide_hot_row", 5, 256, (4, 30), None, True),  # 60 repeats: 8 rounds, then np.add.at
    ("wide_padding", 6, 300, (2, 9), 2, True),
    ("narrow_padding_last", 6, 8, (2, 9), -1, False),
    ("wide_empty", 4, 260, (0,), None, False),
]


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("name,vocab,dim,ishape,pad,hot", EMBEDDING_CASES,
                         ids=[c[0] for c in EMBEDDING_CASES])
def test_embedding_backward_matches_torch(name, vocab, dim, ishape, pad, hot, dtype):
    rng = np.random.default_rng(4)
    idx = rng.integers(0, vocab, ishape)
    if hot:
        idx.reshape(-1)[::2] = 2
    if pad is not None:
        idx.reshape(-1)[1] = pad % vocab
    w = rng.standard_normal((vocab, dim)).astype(dtype)
    wt, rw = dp.tensor(w, requires_grad=True), torch.tensor(w, requires_grad=True)
    out = dp.nn.functional.embedding(dp.tensor(idx), wt, padding_idx=pad)
    ref = torch.nn.functional.embedding(torch.tensor(idx), rw, padding_idx=pad)
    grad = rng.standard_normal(tuple(ref.shape)).astype(dtype)
    out.backward(dp.tensor(grad))
    ref.backward(torch.tensor(grad))
    assert wt.grad.dtype == np.dtype(dtype)
    tol = 1e-5 if dtype == "float32" else 1e-12
    np.testing.assert_allclose(wt.grad.numpy(), rw.grad.numpy(), rtol=tol, atol=tol)
    if pad is not None:
        assert not wt.grad.numpy()[pad].any()


@pytest.mark.parametrize("dim", [16, 256, 300])
def test_scatter_add_rows_same_sums_as_add_at(dim):
    """The rounds add each row's occurrences in index order: bitwise np.add.at's float32 sums."""
    from distprop.ops.embedding import scatter_add_rows

    rng = np.random.default_rng(5)
    index = rng.integers(0, 12, 200)
    index[::3] = 7  # one row repeated ~70 times: past the 8 rounds
    rows = rng.standard_normal((200, dim)).astype(np.float32) * 1e3
    ours, ref = np.ones((12, dim), np.float32), np.ones((12, dim), np.float32)
    scatter_add_rows(ours, index, rows)
    np.add.at(ref, index, rows)
    assert ours.dtype == np.float32
    np.testing.assert_array_equal(ours, ref)


@pytest.mark.parametrize("dim", [3, 256])
def test_embedding_gradcheck(dim):
    idx = np.array([[0, 2, 2], [1, 2, 0]])
    w = np.random.default_rng(6).standard_normal((4, dim))
    gradcheck(lambda t: dp.nn.functional.embedding(dp.tensor(idx), t) * 1.5, w)


# name, module kwargs, input shape, channels-last input, offset added to x (the variance is
# computed from x - mean, so a large mean must not cost precision)
BN_CASES = [
    ("bn2d", {}, (4, 3, 5, 6), False, 0.0),
    ("bn2d_no_affine", {"affine": False}, (3, 4, 3, 3), False, 0.0),
    ("bn2d_cumulative", {"momentum": None}, (2, 5, 4, 4), False, 0.0),
    ("bn2d_channels_last", {}, (3, 4, 5, 5), True, 0.0),
    ("bn2d_offset", {}, (4, 3, 6, 6), False, 300.0),
    ("bn1d_2d", {}, (16, 6), False, 0.0),
    ("bn1d_3d", {"momentum": 0.3}, (4, 6, 7), False, 0.0),
    ("bn2d_one_image", {}, (1, 3, 4, 5), False, 0.0),
]


def _bn_pair(kwargs, shape, dtype):
    cls = {2: "BatchNorm1d", 3: "BatchNorm1d", 4: "BatchNorm2d"}[len(shape)]
    ours = getattr(dp.nn, cls)(shape[1], **kwargs)
    ref = getattr(torch.nn, cls)(shape[1], **kwargs).to(getattr(torch, dtype))
    if ours.weight is not None:
        rng = np.random.default_rng(7)
        w, b = rng.standard_normal(shape[1]) + 1, rng.standard_normal(shape[1])
        ours.weight.data = w.astype(dtype)
        ours.bias.data = b.astype(dtype)
        ref.weight.data, ref.bias.data = torch.tensor(w, dtype=getattr(torch, dtype)), \
            torch.tensor(b, dtype=getattr(torch, dtype))
    if dtype == "float64":
        ours = ours.double()
    return ours, ref


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("name,kwargs,shape,cl,offset", BN_CASES, ids=[c[0] for c in BN_CASES])
def test_batchnorm_train_and_eval_match_torch(name, kwargs, shape, cl, offset, dtype):
    ours, ref = _bn_pair(kwargs, shape, dtype)
    rng = np.random.default_rng(8)
    # PyTorch's eval output is x * a + (b - mean * a), rounded at x's magnitude (the offset);
    # ours is (x - mean) * a + b, checked against float64 below
    tol = dict(rtol=2e-4, atol=2e-5 + 2e-7 * offset) if dtype == "float32" else \
        dict(rtol=1e-9, atol=1e-11)
    for mode in ("train", "train", "eval"):
        ours.train(mode == "train")
        ref.train(mode == "train")
        x = (rng.standard_normal(shape) * 2 + offset).astype(dtype)
        if cl:
            x = np.ascontiguousarray(x.transpose(0, 2, 3, 1)).transpose(0, 3, 1, 2)
        xt = dp.tensor(x, requires_grad=True)
        xt.data = x
        rx = torch.tensor(x, requires_grad=True)
        running = [ours.running_mean.numpy().astype(np.float64),
                   ours.running_var.numpy().astype(np.float64)]
        out, rout = ours(xt), ref(rx)
        if mode == "eval":
            cs = (1, -1) + (1,) * (len(shape) - 2)
            exact = (x - running[0].reshape(cs)) / np.sqrt(running[1].reshape(cs) + 1e-5)
            if ours.weight is not None:
                exact = exact * ours.weight.numpy().reshape(cs) + ours.bias.numpy().reshape(cs)
            np.testing.assert_allclose(out.numpy(), exact, rtol=1e-5, atol=2e-6)
        grad = rng.standard_normal(shape).astype(dtype)
        out.backward(dp.tensor(grad))
        rout.backward(torch.tensor(grad))
        assert out.dtype == np.dtype(dtype) and xt.grad.dtype == np.dtype(dtype)
        np.testing.assert_allclose(out.numpy(), rout.detach().numpy(), **tol)
        np.testing.assert_allclose(xt.grad.numpy(), rx.grad.numpy(), **tol)
        if ours.weight is not None:
            # the batch mean is a float32 BLAS sum (PyTorch: Welford); its rounding error times
            # sum(g) enters sum(g * (x - mean)) when the mean is large
            wtol = dict(tol, atol=tol["atol"] + (2e-6 * offset if dtype == "float32" else 0))
            np.testing.assert_allclose(ours.weight.grad.numpy(), ref.weight.grad.numpy(), **wtol)
            np.testing.assert_allclose(ours.bias.grad.numpy(), ref.bias.grad.numpy(), **tol)
        np.testing.assert_allclose(ours.running_mean.numpy(), ref.running_mean.numpy(), **tol)
        np.testing.assert_allclose(ours.running_var.numpy(), ref.running_var.numpy(), **tol)


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("shape", [(3, 2, 3, 4), (5, 3), (2, 2, 3, 2, 2)])
def test_batchnorm_gradcheck(training, shape):
    rng = np.random.default_rng(9)
    x = rng.standard_normal(shape) * 2 + 1
    w, b = rng.standard_normal(shape[1]) + 1, rng.standard_normal(shape[1])
    rm, rv = rng.standard_normal(shape[1]), rng.random(shape[1]) + 0.5

    def fn(xt, wt, bt):
        return dp.nn.functional.batch_norm(xt, dp.tensor(rm.copy()), dp.tensor(rv.copy()), wt,
                                           bt, training=training)

    gradcheck(fn, x, w, b)


# name, input shape, out channels, kernel, stride, padding, groups (8 <= C/groups < 32: the
# column gradient is regrouped before col2im)
GROUPED_CONV = [
    ("g2_s2", (2, 16, 9, 8), 8, 3, 2, 1, 2),
    ("g4_s1", (2, 48, 6, 6), 8, 3, 1, 1, 4),
    ("g2_k5_s2_nopad", (1, 16, 11, 11), 4, 5, 2, 0, 2),
    ("conv1d_g2_s2", (2, 16, 13), 4, 3, 2, 1, 2),
    ("g4_cg4_cols", (2, 16, 7, 7), 8, 3, 2, 1, 4),  # cg 4: the column-major path, unchanged
]


@pytest.mark.parametrize("name,shape,o,k,s,p,g", GROUPED_CONV, ids=[c[0] for c in GROUPED_CONV])
def test_grouped_conv_backward_matches_torch(name, shape, o, k, s, p, g):
    rng = np.random.default_rng(10)
    nd = len(shape) - 2
    x = rng.standard_normal(shape).astype(np.float32)
    w = rng.standard_normal((o, shape[1] // g) + (k,) * nd).astype(np.float32)
    ours_fn = dp.nn.functional.conv1d if nd == 1 else dp.nn.functional.conv2d
    ref_fn = torch.nn.functional.conv1d if nd == 1 else torch.nn.functional.conv2d
    xt, wt = dp.tensor(x, requires_grad=True), dp.tensor(w, requires_grad=True)
    rx, rw = torch.tensor(x, requires_grad=True), torch.tensor(w, requires_grad=True)
    out = ours_fn(xt, wt, None, stride=s, padding=p, groups=g)
    ref = ref_fn(rx, rw, None, stride=s, padding=p, groups=g)
    grad = rng.standard_normal(tuple(ref.shape)).astype(np.float32)
    out.backward(dp.tensor(grad))
    ref.backward(torch.tensor(grad))
    assert xt.grad.dtype == np.float32
    np.testing.assert_allclose(out.numpy(), ref.detach().numpy(), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(xt.grad.numpy(), rx.grad.numpy(), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(wt.grad.numpy(), rw.grad.numpy(), rtol=1e-4, atol=1e-4)


def test_grouped_conv_gradcheck():
    rng = np.random.default_rng(11)
    x = rng.standard_normal((1, 16, 5, 4))
    w = rng.standard_normal((4, 8, 3, 3))
    gradcheck(lambda a, b: dp.nn.functional.conv2d(a, b, None, stride=2, padding=1, groups=2),
              x, w)
