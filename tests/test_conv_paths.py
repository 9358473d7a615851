"""The fast NumPy paths of convolution and pooling (issue 14): per-phase input gradient,
col2im's runs and stride-phase planes, the scratch-buffer pool, separable average pooling,
grouped 1x1 convolutions.

PyTorch is the oracle (same weights); float64 finite differences check the new gradients; each
path test also checks that the path under test really ran.
"""

import numpy as np
import pytest
import torch

import distprop as dp
from distprop.ops import conv as conv_mod
from distprop.ops import conv_grad, pool, workspace

from helpers import gradcheck

F = dp.nn.functional
pytestmark = pytest.mark.filterwarnings("ignore:Using padding='same'")

# id, input shape, out channels, kernel, stride, padding, groups, channels-last input
# (the rows layout, so the phase gradient, needs 8 channels with one group, 16 per group with more)
PHASE = [
    ("s1_k3", (2, 8, 7, 6), 8, 3, 1, 1, 1, False),
    ("s1_k5_odd", (2, 16, 9, 7), 16, 5, 1, 2, 1, False),
    ("s1_nopad", (2, 8, 6, 7), 6, 3, 1, 0, 1, False),
    ("s1_same_even_k", (2, 8, 7, 6), 8, (2, 4), 1, "same", 1, False),
    ("s2_k3", (2, 16, 9, 8), 16, 3, 2, 1, 1, False),
    ("s2_k5_odd", (2, 8, 11, 9), 8, 5, 2, 2, 1, False),
    ("s2_k4_even", (1, 16, 10, 10), 16, 4, 2, 1, 1, False),
    ("s3_uncovered", (1, 8, 8, 7), 8, 3, 3, 0, 1, False),  # rows/cols no window reaches
    ("s4_gt_k", (2, 32, 9, 9), 16, 3, 4, 1, 2, False),  # phases without taps
    ("rect_stride", (2, 8, 7, 9), 8, (3, 2), (1, 2), (1, 0), 1, False),
    ("groups2_s2", (2, 32, 9, 8), 32, 3, 2, 1, 2, False),
    ("groups4_s1", (2, 64, 6, 6), 32, 3, 1, 1, 4, False),
    ("channels_last_in", (2, 16, 7, 8), 16, 3, 1, 1, 1, True),
    ("batch1_tiny", (1, 8, 3, 3), 4, 3, 1, 1, 1, False),
]


def _counting(monkeypatch):
    calls = []
    real = conv_grad.input_grad

    def spy(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(conv_grad, "input_grad", spy)
    return calls


def _conv_pair(shape, o, k, s, p, g, dtype, channels_last, rng):
    x = rng.standard_normal(shape).astype(dtype)
    if channels_last:
        x = np.ascontiguousarray(x.transpose(0, 2, 3, 1)).transpose(0, 3, 1, 2)
    kernel = (k, k) if isinstance(k, int) else k
    w = rng.standard_normal((o, shape[1] // g, *kernel)).astype(dtype)
    b = rng.standard_normal(o).astype(dtype)
    return x, w, b


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("name,shape,o,k,s,p,g,cl", PHASE, ids=[c[0] for c in PHASE])
def test_phase_input_grad_matches_torch(monkeypatch, name, shape, o, k, s, p, g, cl, dtype):
    calls = _counting(monkeypatch)
    rng = np.random.default_rng(1)
    x, w, b = _conv_pair(shape, o, k, s, p, g, dtype, cl, rng)
    xd, wd, bd = (dp.tensor(a, requires_grad=True) for a in (x, w, b))
    out = F.conv2d(xd, wd, bd, stride=s, padding=p, groups=g)
    xt, wt, bt = (torch.tensor(np.ascontiguousarray(a), requires_grad=True) for a in (x, w, b))
    ref = torch.nn.functional.conv2d(xt, wt, bt, stride=s, padding=p, groups=g)
    grad = rng.standard_normal(tuple(ref.shape)).astype(dtype)
    out.backward(dp.tensor(grad))
    ref.backward(torch.tensor(grad))
    assert calls, "the per-phase input gradient did not run"
    tol = dict(rtol=1e-10, atol=1e-11) if dtype == "float64" else dict(rtol=1e-4, atol=1e-4)
    assert xd.grad.dtype == np.dtype(dtype) and xd.grad.shape == x.shape
    np.testing.assert_allclose(out.numpy(), ref.detach().numpy(), **tol)
    np.testing.assert_allclose(xd.grad.numpy(), xt.grad.numpy(), **tol)
    np.testing.assert_allclose(wd.grad.numpy(), wt.grad.numpy(), **tol)
    np.testing.assert_allclose(bd.grad.numpy(), bt.grad.numpy(), **tol)


def test_phase_and_col2im_give_the_same_gradient(monkeypatch):
    calls = _counting(monkeypatch)
    rng = np.random.default_rng(2)
    x, w, _ = _conv_pair((2, 32, 11, 10), 24, 3, 2, 1, 2, "float64", False, rng)
    grads = []
    for phase in (True, False):
        monkeypatch.setattr(conv_mod.ConvNd, "PHASE_GRAD", phase)
        xd = dp.tensor(x, requires_grad=True)
        F.conv2d(xd, dp.tensor(w), stride=2, padding=1, groups=2).sum().backward()
        grads.append(xd.grad.numpy())
    assert len(calls) == 1  # the phase gradient ran once, col2im once
    np.testing.assert_allclose(grads[0], grads[1], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("stride,padding,groups", [(1, 1, 1), (2, 1, 2), (3, 2, 1)])
def test_phase_input_grad_finite_differences(monkeypatch, stride, padding, groups):
    calls = _counting(monkeypatch)
    rng = np.random.default_rng(3)
    x = rng.standard_normal((1, 16 * groups, 5, 4))  # 16 channels per group: rows layout
    w = rng.standard_normal((8, 16, 3, 2))
    gradcheck(lambda a, b: F.conv2d(a, b, None, stride=stride, padding=padding, groups=groups),
              x, w)
    assert calls


def test_phase_input_grad_conv1d_matches_torch(monkeypatch):
    calls = _counting(monkeypatch)
    rng = np.random.default_rng(4)
    x = rng.standard_normal((2, 8, 13))
    w = rng.standard_normal((8, 8, 4))
    xd = dp.tensor(x, requires_grad=True)
    xt = torch.tensor(x, requires_grad=True)
    out = F.conv1d(xd, dp.tensor(w), stride=2, padding=2)
    ref = torch.nn.functional.conv1d(xt, torch.tensor(w), stride=2, padding=2)
    grad = rng.standard_normal(tuple(ref.shape))
    out.backward(dp.tensor(grad))
    ref.backward(torch.tensor(grad))
    assert calls
    np.testing.assert_allclose(xd.grad.numpy(), xt.grad.numpy(), rtol=1e-10, atol=1e-11)


# in channels, out channels, kernel, stride, dilation, groups
COL2IM = [
    (16, 64, 3, 1, 1, 1),  # out channels > in channels (rows layout)
    (8, 64, 3, 1, 1, 1),  # the same with 8 in channels (column layout)
    (8, 16, 3, 1, 1, 1),  # twice the in channels: the gathers would read twice as much
    (8, 16, 3, 2, 2, 1),  # dilated
    (3, 8, 5, 1, 1, 1),  # < 8 channels per group (column layout)
    (4, 8, (3, 2), 2, 1, 1),
    (16, 16, 1, 2, 1, 2),  # 1x1 grouped, strided
    (16, 8, 3, 1, 1, 4),  # 4 channels per group
]


@pytest.mark.parametrize("c,o,k,s,d,g", COL2IM)
def test_other_convs_keep_col2im_and_match_torch(monkeypatch, c, o, k, s, d, g):
    calls = _counting(monkeypatch)
    rng = np.random.default_rng(12)
    x = rng.standard_normal((2, c, 7, 8))
    kernel = (k, k) if isinstance(k, int) else k
    w = rng.standard_normal((o, c // g, *kernel))
    xd, xt = dp.tensor(x, requires_grad=True), torch.tensor(x, requires_grad=True)
    out = F.conv2d(xd, dp.tensor(w), stride=s, padding=1, dilation=d, groups=g)
    ref = torch.nn.functional.conv2d(xt, torch.tensor(w), stride=s, padding=1, dilation=d,
                                     groups=g)
    grad = rng.standard_normal(tuple(ref.shape))
    out.backward(dp.tensor(grad))
    ref.backward(torch.tensor(grad))
    assert not calls
    np.testing.assert_allclose(xd.grad.numpy(), xt.grad.numpy(), rtol=1e-10, atol=1e-11)



# col2im's special paths, each reached by its own geometries: x shape, out channels, kernel,
# stride, padding, groups.
# _col2im_runs: rows layout, one group, more out than in channels, fewer than 32 channels,
# undilated: adds runs of kernel[-1] * C floats.
# _col2im_phases: the (g, K, M) layout (fewer than 16 channels per group), strided, undilated,
# 32+ output columns: one plane per stride phase.
COL2IM_PATHS = [
    ("_col2im_runs", (2, 16, 7, 8), 32, 3, 1, 1, 1),
    ("_col2im_runs", (2, 16, 9, 9), 80, 5, 1, 2, 1),  # 5x5 with O > 4 C: not the Fourier path
    ("_col2im_runs", (2, 16, 9, 10), 24, 3, 2, 1, 1),  # step 2: two residues per kernel row
    ("_col2im_runs", (1, 16, 11, 12), 32, (3, 5), (2, 3), (1, 2), 1),  # rectangular, step 2
    ("_col2im_runs", (2, 16, 8, 9), 32, (2, 4), (3, 4), 0, 1),  # stride >= kernel: 1 residue
    ("_col2im_runs", (2, 16, 6, 7), 32, (1, 3), 1, (0, 1), 1),  # one kernel row
    ("_col2im_runs", (1, 16, 4, 3), 32, 3, 1, 0, 1),  # a single output column
    ("_col2im_runs", (2, 16, 13), 32, 5, 2, 2, 1),  # conv1d
    ("_col2im_phases", (2, 16, 5, 65), 32, 3, 2, 1, 2),
    ("_col2im_phases", (1, 8, 6, 68), 16, 5, 2, 2, 4),
    ("_col2im_phases", (1, 12, 7, 97), 12, (3, 2), (2, 3), (1, 0), 3),  # odd plane sizes
    ("_col2im_phases", (2, 8, 4, 64), 8, 2, 2, 0, 2),  # stride = kernel: one tap per phase
    ("_col2im_phases", (1, 8, 7, 33), 8, 3, (2, 1), 1, 4),  # strided in one dim only
    ("_col2im_phases", (2, 6, 98), 6, 3, 3, 1, 3),  # conv1d
]


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("path,shape,o,k,s,p,g", COL2IM_PATHS)
def test_col2im_paths_match_torch(monkeypatch, path, shape, o, k, s, p, g, dtype):
    taken = []
    real = getattr(conv_mod, path)
    monkeypatch.setattr(conv_mod, path, lambda *a: taken.append(1) or real(*a))
    rng = np.random.default_rng(13)
    x = rng.standard_normal(shape).astype(dtype)
    nd = len(shape) - 2
    kernel = (k,) * nd if isinstance(k, int) else k
    w = rng.standard_normal((o, shape[1] // g, *kernel)).astype(dtype)
    conv = F.conv2d if nd == 2 else F.conv1d
    ref_conv = torch.nn.functional.conv2d if nd == 2 else torch.nn.functional.conv1d
    xd, xt = dp.tensor(x, requires_grad=True), torch.tensor(x, requires_grad=True)
    out = conv(xd, dp.tensor(w), stride=s, padding=p, groups=g)
    ref = ref_conv(xt, torch.tensor(w), stride=s, padding=p, groups=g)
    grad = rng.standard_normal(tuple(ref.shape)).astype(dtype)
    out.backward(dp.tensor(grad))
    ref.backward(torch.tensor(grad))
    assert taken, f"col2im did not take {path}"
    assert xd.grad.dtype == np.dtype(dtype) and xd.grad.shape == x.shape
    tol = dict(rtol=1e-10, atol=1e-11) if dtype == "float64" else dict(rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(xd.grad.numpy(), xt.grad.numpy(), **tol)

# --- the scratch pool ------------------------------------------------------------------------


def test_scratch_never_hands_out_a_buffer_in_use(monkeypatch):
    monkeypatch.setattr(workspace, "MIN_BYTES", 1024)
    workspace.clear()
    shape = (64, 64)
    first = workspace.scratch(np, shape, np.float32)
    second = workspace.scratch(np, shape, np.float32)
    assert not np.shares_memory(first, second)  # first is alive
    addr = first.__array_interface__["data"][0]
    view = first[::2]
    del first
    third = workspace.scratch(np, shape, np.float32)
    assert third.__array_interface__["data"][0] != addr  # a view of it is alive
    del view, third
    again = workspace.scratch(np, shape, np.float32)
    assert again.__array_interface__["data"][0] == addr  # free again; second is still alive
    small = workspace.scratch(np, (4,), np.float32)  # below MIN_BYTES: never pooled
    assert small.shape == (4,)
    held = workspace.held_bytes()
    monkeypatch.setattr(workspace, "MAX_BYTES", held + 1024)
    huge = workspace.scratch(np, (64, 64, 4), np.float32)  # over MAX_BYTES: not kept ...
    assert huge.shape == (64, 64, 4) and workspace.held_bytes() == held  # ... nor evicting
    del second
    workspace.clear()
    assert workspace.held_bytes() == 0


def test_pooled_buffers_are_not_shared_between_live_graphs(monkeypatch):
    """Two forwards before either backward: the second must not overwrite the first's
    saved columns (pool threshold lowered so these small convs use it)."""
    monkeypatch.setattr(workspace, "MIN_BYTES", 256)
    workspace.clear()
    rng = np.random.default_rng(5)
    x1, x2 = rng.standard_normal((2, 2, 8, 6, 6))
    w = rng.standard_normal((8, 8, 3, 3))
    wd = dp.tensor(w, requires_grad=True)
    wt = torch.tensor(w, requires_grad=True)
    outs = [F.conv2d(dp.tensor(x, requires_grad=True), wd, padding=1) for x in (x1, x2)]
    refs = [torch.nn.functional.conv2d(torch.tensor(x), wt, padding=1) for x in (x1, x2)]
    (outs[0].sum() + (outs[1] * outs[1]).sum()).backward()
    (refs[0].sum() + (refs[1] * refs[1]).sum()).backward()
    np.testing.assert_allclose(wd.grad.numpy(), wt.grad.numpy(), rtol=1e-10, atol=1e-10)
    assert workspace.held_bytes() > 0
    workspace.clear()


# --- separable average pooling ---------------------------------------------------------------

# id, kwargs, input shape, channels-last input
AVG = [
    ("k3_s1", dict(kernel_size=3, stride=1), (2, 3, 8, 7), False),
    ("k3_s2_pad", dict(kernel_size=3, stride=2, padding=1), (2, 3, 9, 8), False),
    ("k3_s2_pad_excl", dict(kernel_size=3, stride=2, padding=1, count_include_pad=False),
     (2, 3, 9, 8), False),
    ("k3_ceil", dict(kernel_size=3, stride=2, ceil_mode=True), (2, 2, 8, 10), False),
    ("k3_exact", dict(kernel_size=3), (2, 2, 9, 6), False),
    ("rect_3x2", dict(kernel_size=(3, 2), stride=(1, 2)), (2, 2, 7, 8), False),
    ("k4_divisor", dict(kernel_size=4, stride=3, divisor_override=5), (1, 2, 10, 11), False),
    ("k3_channels_last", dict(kernel_size=3, stride=2, padding=1), (2, 8, 9, 9), True),
]


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("name,kwargs,shape,cl", AVG, ids=[c[0] for c in AVG])
def test_separable_avg_pool_matches_torch(name, kwargs, shape, cl, dtype):
    rng = np.random.default_rng(8)
    x = rng.standard_normal(shape).astype(dtype)
    xin = np.ascontiguousarray(x.transpose(0, 2, 3, 1)).transpose(0, 3, 1, 2) if cl else x
    xd, xt = dp.tensor(xin, requires_grad=True), torch.tensor(x, requires_grad=True)
    out = dp.nn.AvgPool2d(**kwargs)(xd)
    ref = torch.nn.AvgPool2d(**kwargs)(xt)
    assert out.dtype == np.dtype(dtype)
    grad = rng.standard_normal(tuple(ref.shape)).astype(dtype)
    out.backward(dp.tensor(grad))
    ref.backward(torch.tensor(grad))
    tol = dict(rtol=1e-10, atol=1e-12) if dtype == "float64" else dict(rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(out.numpy(), ref.detach().numpy(), **tol)
    np.testing.assert_allclose(xd.grad.numpy(), xt.grad.numpy(), **tol)
    assert xd.grad.dtype == np.dtype(dtype)


def test_separable_avg_pool_is_used_and_finite_differences(monkeypatch):
    seen = []
    real = pool._sum_along
    monkeypatch.setattr(pool, "_sum_along", lambda *a: seen.append(1) or real(*a))
    rng = np.random.default_rng(9)
    gradcheck(lambda x: F.avg_pool2d(x, 3, 2, 1, ceil_mode=True, count_include_pad=False),
              rng.standard_normal((2, 2, 7, 6)))
    gradcheck(lambda x: F.avg_pool2d(x, (3, 2), 1), rng.standard_normal((1, 2, 5, 5)))
    assert seen


def test_avg_pool_same_module_on_two_shapes_matches_torch():
    """Geometry (and divisors) are cached per input shape: a second shape gets its own."""
    ours, theirs = dp.nn.AvgPool2d(3, 2, 1, count_include_pad=False), torch.nn.AvgPool2d(
        3, 2, 1, count_include_pad=False)
    rng = np.random.default_rng(10)
    for shape in [(1, 2, 7, 7), (2, 2, 6, 9), (1, 2, 7, 7)]:
        x = rng.standard_normal(shape)
        np.testing.assert_allclose(ours(dp.tensor(x)).numpy(),
                                   theirs(torch.tensor(x)).numpy(), rtol=1e-12, atol=1e-12)


# --- grouped 1x1 convolution -------------------------------------------------------------------

# id, input shape, out channels, stride, groups, channels-last input, bias
GROUPED_POINTWISE = [
    ("g2", (2, 16, 5, 6), 8, 1, 2, False, True),
    ("g4_s2_cl", (2, 16, 5, 6), 8, 2, 4, True, True),
    ("g3_rect_stride", (2, 12, 7, 5), 6, (1, 2), 3, False, False),
    ("g2_widen_cl", (1, 16, 4, 4), 32, 1, 2, True, False),
    ("depthwise_s2", (2, 4, 5, 5), 4, 2, 4, False, True),
    ("conv1d_g2", (2, 8, 9), 6, 2, 2, False, True),
]


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("name,shape,o,s,g,cl,bias", GROUPED_POINTWISE,
                         ids=[c[0] for c in GROUPED_POINTWISE])
def test_grouped_pointwise_matches_torch(name, shape, o, s, g, cl, bias, dtype):
    rng = np.random.default_rng(13)
    nd = len(shape) - 2
    x = rng.standard_normal(shape).astype(dtype)
    xin = np.ascontiguousarray(x.transpose(0, 2, 3, 1)).transpose(0, 3, 1, 2) if cl else x
    w = rng.standard_normal((o, shape[1] // g) + (1,) * nd).astype(dtype)
    b = rng.standard_normal(o).astype(dtype) if bias else None
    ours_fn = F.conv1d if nd == 1 else F.conv2d
    ref_fn = torch.nn.functional.conv1d if nd == 1 else torch.nn.functional.conv2d
    xd, wd = dp.tensor(xin, requires_grad=True), dp.tensor(w, requires_grad=True)
    bd = dp.tensor(b, requires_grad=True) if bias else None
    xt, wt = torch.tensor(x, requires_grad=True), torch.tensor(w, requires_grad=True)
    bt = torch.tensor(b, requires_grad=True) if bias else None
    out = ours_fn(xd, wd, bd, stride=s, groups=g)
    assert type(out._ctx).__name__ == "GroupedPointwiseConv"
    ref = ref_fn(xt, wt, bt, stride=s, groups=g)
    grad = rng.standard_normal(tuple(ref.shape)).astype(dtype)
    out.backward(dp.tensor(grad))
    ref.backward(torch.tensor(grad))
    tol = dict(rtol=1e-10, atol=1e-12) if dtype == "float64" else dict(rtol=1e-5, atol=1e-5)
    assert out.dtype == np.dtype(dtype) and xd.grad.dtype == np.dtype(dtype)
    np.testing.assert_allclose(out.numpy(), ref.detach().numpy(), **tol)
    np.testing.assert_allclose(xd.grad.numpy(), xt.grad.numpy(), **tol)
    np.testing.assert_allclose(wd.grad.numpy(), wt.grad.numpy(), **tol)
    if bias:
        np.testing.assert_allclose(bd.grad.numpy(), bt.grad.numpy(), **tol)


@pytest.mark.parametrize("channels_last", [False, True])
def test_grouped_pointwise_finite_differences(channels_last):
    rng = np.random.default_rng(14)
    x = rng.standard_normal((2, 6, 3, 4))
    if channels_last:
        x = np.ascontiguousarray(x.transpose(0, 2, 3, 1)).transpose(0, 3, 1, 2)
    gradcheck(lambda a, w, b: F.conv2d(a, w, b, stride=(2, 1), groups=3), x,
              rng.standard_normal((9, 2, 1, 1)), rng.standard_normal(9))
