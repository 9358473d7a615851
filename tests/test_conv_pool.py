"""Conv1d/Conv2d and pooling layers against PyTorch, finite differences, dtypes and bad input."""

import numpy as np
import pytest
import torch

import distprop as dp

from helpers import copy_torch_to_dp, gradcheck

F = dp.nn.functional

rng = np.random.default_rng(0)
pytestmark = pytest.mark.filterwarnings("ignore:Using padding='same'")

# id, layer class name, constructor kwargs, input shape
CONV = [
    ("c2_basic", "Conv2d", dict(in_channels=3, out_channels=4, kernel_size=3), (2, 3, 7, 6)),
    ("c2_stride_pad", "Conv2d", dict(in_channels=3, out_channels=5, kernel_size=3, stride=2,
                                     padding=1), (2, 3, 8, 7)),
    ("c2_rect_dilated", "Conv2d", dict(in_channels=2, out_channels=3, kernel_size=(3, 2),
                                       stride=(2, 1), padding=(1, 0), dilation=(1, 2)),
     (2, 2, 9, 8)),
    ("c2_same_dilated", "Conv2d", dict(in_channels=3, out_channels=2, kernel_size=(3, 4),
                                       padding="same", dilation=2), (2, 3, 7, 8)),
    ("c2_valid", "Conv2d", dict(in_channels=2, out_channels=2, kernel_size=2, padding="valid"),
     (3, 2, 5, 5)),
    ("c2_groups", "Conv2d", dict(in_channels=4, out_channels=6, kernel_size=3, groups=2,
                                 padding=1), (2, 4, 6, 6)),
    ("c2_depthwise", "Conv2d", dict(in_channels=4, out_channels=8, kernel_size=3, groups=4,
                                    stride=2), (2, 4, 7, 7)),
    ("c2_no_bias", "Conv2d", dict(in_channels=3, out_channels=4, kernel_size=2, bias=False),
     (2, 3, 5, 6)),
    ("c2_1x1", "Conv2d", dict(in_channels=5, out_channels=3, kernel_size=1), (2, 5, 4, 4)),
    # >= 8 channels per group: the channels-last (rows) column layout
    ("c2_rows", "Conv2d", dict(in_channels=16, out_channels=6, kernel_size=3, padding=1),
     (2, 16, 5, 6)),
    ("c2_rows_groups", "Conv2d", dict(in_channels=16, out_channels=4, kernel_size=3,
                                      groups=2, stride=2, dilation=(1, 2)), (2, 16, 7, 9)),
    ("c2_rows_no_bias", "Conv2d", dict(in_channels=8, out_channels=3, kernel_size=(2, 3),
                                       bias=False, padding=(0, 2)), (3, 8, 4, 5)),
    ("c2_unbatched", "Conv2d", dict(in_channels=3, out_channels=2, kernel_size=3, padding=1),
     (3, 5, 5)),
    ("c1_basic", "Conv1d", dict(in_channels=3, out_channels=4, kernel_size=3), (2, 3, 9)),
    ("c1_stride_pad_dil", "Conv1d", dict(in_channels=2, out_channels=3, kernel_size=3, stride=2,
                                         padding=2, dilation=2), (2, 2, 11)),
    ("c1_groups_same", "Conv1d", dict(in_channels=6, out_channels=3, kernel_size=4, groups=3,
                                      padding="same"), (2, 6, 8)),
    ("c1_rows", "Conv1d", dict(in_channels=8, out_channels=4, kernel_size=3, padding=1,
                               bias=False), (2, 8, 7)),
    ("c1_unbatched", "Conv1d", dict(in_channels=2, out_channels=3, kernel_size=2), (2, 6)),
]

# id, layer class name, constructor kwargs, input shape
POOL = [
    ("max2_k2", "MaxPool2d", dict(kernel_size=2), (2, 3, 6, 6)),
    ("max2_k2_odd", "MaxPool2d", dict(kernel_size=2), (2, 3, 7, 5)),
    ("max2_k3s2p1", "MaxPool2d", dict(kernel_size=3, stride=2, padding=1), (2, 3, 8, 7)),
    ("max2_ceil", "MaxPool2d", dict(kernel_size=3, stride=2, ceil_mode=True), (2, 2, 8, 9)),
    ("max2_ceil_pad", "MaxPool2d", dict(kernel_size=2, stride=2, padding=1, ceil_mode=True),
     (1, 2, 7, 6)),
    ("max2_dilated", "MaxPool2d", dict(kernel_size=(3, 2), stride=(1, 2), padding=(1, 1),
                                       dilation=(2, 1)), (2, 2, 8, 7)),
    ("max2_overlap", "MaxPool2d", dict(kernel_size=3, stride=1), (2, 2, 6, 5)),
    ("max2_unbatched", "MaxPool2d", dict(kernel_size=2), (3, 4, 4)),
    ("max2_k1_s2", "MaxPool2d", dict(kernel_size=1, stride=2), (2, 2, 5, 4)),
    ("max1", "MaxPool1d", dict(kernel_size=3, stride=2, padding=1), (2, 3, 10)),
    ("max1_ceil_dil", "MaxPool1d", dict(kernel_size=2, stride=2, dilation=2, ceil_mode=True),
     (2, 2, 10)),
    ("avg2_k2", "AvgPool2d", dict(kernel_size=2), (2, 3, 6, 7)),
    ("avg2_pad", "AvgPool2d", dict(kernel_size=3, stride=2, padding=1), (2, 2, 7, 8)),
    ("avg2_pad_excl", "AvgPool2d", dict(kernel_size=3, stride=2, padding=1,
                                        count_include_pad=False), (2, 2, 7, 8)),
    ("avg2_ceil", "AvgPool2d", dict(kernel_size=3, stride=2, padding=1, ceil_mode=True),
     (2, 2, 8, 6)),
    ("avg2_ceil_excl", "AvgPool2d", dict(kernel_size=3, stride=2, padding=1, ceil_mode=True,
                                         count_include_pad=False), (2, 2, 8, 6)),
    ("avg2_divisor", "AvgPool2d", dict(kernel_size=2, stride=1, divisor_override=3),
     (2, 2, 5, 5)),
    ("avg2_rect", "AvgPool2d", dict(kernel_size=(2, 3), stride=(2, 1)), (2, 2, 6, 7)),
    ("avg1", "AvgPool1d", dict(kernel_size=3, stride=2, padding=1, count_include_pad=False),
     (2, 3, 9)),
    ("avg1_ceil", "AvgPool1d", dict(kernel_size=2, ceil_mode=True), (2, 3, 9)),
    ("adapt2_global", "AdaptiveAvgPool2d", dict(output_size=1), (2, 3, 5, 6)),
    ("adapt2_uneven", "AdaptiveAvgPool2d", dict(output_size=(4, 3)), (2, 3, 7, 5)),
    ("adapt2_none", "AdaptiveAvgPool2d", dict(output_size=(None, 2)), (2, 2, 5, 7)),
    ("adapt2_upsample", "AdaptiveAvgPool2d", dict(output_size=(6, 5)), (1, 2, 4, 3)),
    ("adapt1", "AdaptiveAvgPool1d", dict(output_size=4), (2, 3, 9)),
]

F64 = dict(rtol=1e-10, atol=1e-12)
F32 = dict(rtol=1e-5, atol=2e-6)


def _input(shape, dtype, ties=False):
    x = rng.standard_normal(shape)
    if ties:  # ReLU-like zeros and repeated values: max pooling must route like PyTorch
        x = np.maximum(np.round(x, 1), 0.0)
    return x.astype(dtype)


def _compare_module(ours, theirs, x, dtype, tol):
    """Forward, input gradient and parameter gradients of two modules on the same input."""
    xd = dp.tensor(x, requires_grad=True)
    xt = torch.tensor(x, requires_grad=True)
    out, ref = ours(xd), theirs(xt)
    assert out.dtype == np.dtype(dtype)
    assert out.shape == tuple(ref.shape)
    np.testing.assert_allclose(out.numpy(), ref.detach().numpy(), **tol)
    grad = rng.standard_normal(out.shape).astype(dtype)
    out.backward(dp.tensor(grad))
    ref.backward(torch.tensor(grad))
    assert xd.grad.dtype == np.dtype(dtype)
    np.testing.assert_allclose(xd.grad.numpy(), xt.grad.numpy(), **tol)
    params = dict(theirs.named_parameters())
    for name, p in ours.named_parameters():
        assert p.grad is not None, name
        assert p.grad.dtype == np.dtype(dtype), name
        np.testing.assert_allclose(p.grad.numpy(), params[name].grad.numpy(), **tol,
                                   err_msg=name)


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("case", CONV, ids=[c[0] for c in CONV])
def test_conv_matches_torch(case, dtype):
    _, cls, kwargs, shape = case
    theirs = getattr(torch.nn, cls)(**kwargs).to(getattr(torch, dtype))
    ours = getattr(dp.nn, cls)(**kwargs).to(np.dtype(dtype))
    copy_torch_to_dp(theirs, ours)
    _compare_module(ours, theirs, _input(shape, dtype), dtype, F64 if dtype == "float64" else F32)


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("case", POOL, ids=[c[0] for c in POOL])
def test_pool_matches_torch(case, dtype):
    _, cls, kwargs, shape = case
    theirs = getattr(torch.nn, cls)(**kwargs)
    ours = getattr(dp.nn, cls)(**kwargs)
    x = _input(shape, dtype, ties=cls.startswith("Max"))
    _compare_module(ours, theirs, x, dtype, F64 if dtype == "float64" else F32)


def test_chained_layouts_match_torch():
    """conv -> relu -> maxpool -> conv (channels-last views flow between layers) -> avgpool."""
    dims = dict(in_channels=1, out_channels=8, kernel_size=3)
    t_layers = [torch.nn.Conv2d(**dims), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
                torch.nn.Conv2d(8, 12, 3, padding=1), torch.nn.ReLU(),
                torch.nn.Conv2d(12, 10, 2), torch.nn.AvgPool2d(2), torch.nn.Flatten(),
                torch.nn.Linear(40, 3)]
    d_layers = [dp.nn.Conv2d(**dims), dp.nn.ReLU(), dp.nn.MaxPool2d(2),
                dp.nn.Conv2d(8, 12, 3, padding=1), dp.nn.ReLU(),
                dp.nn.Conv2d(12, 10, 2), dp.nn.AvgPool2d(2), dp.nn.Flatten(),
                dp.nn.Linear(40, 3)]
    theirs = torch.nn.Sequential(*t_layers).double()
    ours = dp.nn.Sequential(*d_layers).double()
    copy_torch_to_dp(theirs, ours)
    _compare_module(ours, theirs, _input((3, 1, 12, 12), "float64"), "float64", F64)


# --- float64 finite differences ----------------------------------------------------------------

GRADCHECK = [
    ("conv2d", lambda x, w, b: F.conv2d(x, w, b, stride=2, padding=1),
     [(2, 2, 5, 4), (3, 2, 3, 2), (3,)]),
    ("conv2d_groups_dil", lambda x, w, b: F.conv2d(x, w, b, padding=(1, 2), dilation=(2, 1),
                                                    groups=2), [(1, 4, 5, 5), (4, 2, 2, 3), (4,)]),
    ("conv2d_rows", lambda x, w: F.conv2d(x, w, padding="same"), [(1, 8, 4, 3), (2, 8, 3, 2)]),
    ("conv1d", lambda x, w, b: F.conv1d(x, w, b, stride=2, padding=1, dilation=2),
     [(2, 3, 9), (2, 3, 3), (2,)]),
    ("max_pool2d", lambda x: F.max_pool2d(x, 3, 2, 1, ceil_mode=True), [(2, 2, 6, 5)]),
    ("max_pool1d", lambda x: F.max_pool1d(x, 2, 1, dilation=2), [(2, 2, 7)]),
    ("avg_pool2d", lambda x: F.avg_pool2d(x, 3, 2, 1, ceil_mode=True, count_include_pad=False),
     [(2, 2, 6, 5)]),
    ("avg_pool1d", lambda x: F.avg_pool1d(x, 3, 2, 1), [(2, 2, 7)]),
    ("adaptive_avg_pool2d", lambda x: F.adaptive_avg_pool2d(x, (3, 2)), [(2, 2, 5, 5)]),
    ("adaptive_avg_pool1d", lambda x: F.adaptive_avg_pool1d(x, 3), [(2, 2, 7)]),
]


@pytest.mark.parametrize("name,fn,shapes", GRADCHECK, ids=[g[0] for g in GRADCHECK])
def test_gradcheck(name, fn, shapes):
    gradcheck(fn, *[rng.standard_normal(s) for s in shapes])


# --- functional API, defaults, dtypes ----------------------------------------------------------


def test_functional_matches_torch():
    x = rng.standard_normal((2, 4, 7, 6))
    w = rng.standard_normal((6, 2, 3, 3))
    b = rng.standard_normal(6)
    tx, tw, tb = (torch.tensor(a) for a in (x, w, b))
    dx, dw, db = (dp.tensor(a) for a in (x, w, b))
    tF = torch.nn.functional
    pairs = [
        (F.conv2d(dx, dw, db, 2, 1, 1, 2), tF.conv2d(tx, tw, tb, 2, 1, 1, 2)),
        (F.max_pool2d(dx, 2), tF.max_pool2d(tx, 2)),
        (F.avg_pool2d(dx, 3, 1, 1), tF.avg_pool2d(tx, 3, 1, 1)),
        (F.adaptive_avg_pool2d(dx, (2, None)), tF.adaptive_avg_pool2d(tx, (2, None))),
        (F.conv1d(dx[0, :, 0], dw[:, :, 0], db, padding="same", groups=2),
         tF.conv1d(tx[0, :, 0], tw[:, :, 0], tb, padding="same", groups=2)),
    ]
    for ours, theirs in pairs:
        np.testing.assert_allclose(ours.numpy(), theirs.numpy(), **F64)


def test_max_pool_return_indices_match_torch():
    x = _input((2, 3, 7, 8), "float64", ties=True)
    for kwargs in (dict(kernel_size=2), dict(kernel_size=3, stride=2, padding=1, ceil_mode=True),
                   dict(kernel_size=(2, 3), dilation=(2, 1), stride=1)):
        out, idx = F.max_pool2d(dp.tensor(x), return_indices=True, **kwargs)
        ref, ref_idx = torch.nn.functional.max_pool2d(torch.tensor(x), return_indices=True,
                                                      **kwargs)
        np.testing.assert_array_equal(idx.numpy(), ref_idx.numpy())
        assert idx.dtype == np.int64
    out, idx = dp.nn.MaxPool1d(3, return_indices=True)(dp.tensor(x[0]))
    ref, ref_idx = torch.nn.MaxPool1d(3, return_indices=True)(torch.tensor(x[0]))
    np.testing.assert_array_equal(idx.numpy(), ref_idx.numpy())


@pytest.mark.parametrize("cls,args", [("Conv2d", (6, 5, 3)), ("Conv1d", (4, 8, 5)),
                                      ("Conv2d", (8, 4, (2, 3)))])
def test_default_init_bounds(cls, args):
    dp.manual_seed(3)
    layer = getattr(dp.nn, cls)(*args)
    fan_in = layer.weight.numel() // layer.weight.shape[0]
    bound = 1 / np.sqrt(fan_in)
    w, b = layer.weight.numpy(), layer.bias.numpy()
    assert w.dtype == np.float32 and b.dtype == np.float32
    assert np.abs(w).max() <= bound and np.abs(w).max() > 0.8 * bound
    assert np.abs(b).max() <= bound
    torch_layer = getattr(torch.nn, cls)(*args)
    assert layer.weight.shape == tuple(torch_layer.weight.shape)
    assert list(layer.state_dict()) == list(torch_layer.state_dict())
    # uniform(-bound, bound) has standard deviation bound / sqrt(3)
    assert abs(w.std() - bound / np.sqrt(3)) < 0.25 * bound
    dp.manual_seed(3)
    again = getattr(dp.nn, cls)(*args)
    np.testing.assert_array_equal(again.weight.numpy(), w)


def test_float32_stays_float32_with_python_scalars():
    layers = [dp.nn.Conv2d(3, 4, 3, padding=1), dp.nn.MaxPool2d(2), dp.nn.AvgPool2d(2, 1, 1),
              dp.nn.AdaptiveAvgPool2d(3)]
    x = dp.randn(2, 3, 6, 6, requires_grad=True)
    y = x
    for layer in layers:
        y = layer(y)
        assert y.dtype == np.float32, type(layer).__name__
    y.sum().backward()
    assert x.grad.dtype == np.float32
    assert all(p.grad.dtype == np.float32 for p in layers[0].parameters())


def test_conv_output_is_channels_last_view_and_reads_any_layout():
    conv = dp.nn.Conv2d(8, 8, 3, padding=1).double()
    x = rng.standard_normal((2, 8, 5, 5))
    out_c = conv(dp.tensor(x))
    x_cl = np.ascontiguousarray(x.transpose(0, 2, 3, 1)).transpose(0, 3, 1, 2)
    out_cl = conv(dp.tensor(x_cl))  # same values, channels-last strides
    np.testing.assert_allclose(out_c.numpy(), out_cl.numpy(), **F64)
    assert out_c.data.strides[1] == out_c.data.itemsize  # channel stride smallest
    pairs = [(dp.nn.Conv2d(8, 4, 2, groups=2), torch.nn.Conv2d(8, 4, 2, groups=2)),
             (dp.nn.Conv2d(8, 3, 3, padding=1), torch.nn.Conv2d(8, 3, 3, padding=1)),
             (dp.nn.MaxPool2d(2), torch.nn.MaxPool2d(2))]
    odd = x[:, ::-1, 1:, ::-1]  # negative and offset strides are read through the strided view
    for ours, theirs in pairs:
        ours.double()
        theirs.double()
        copy_torch_to_dp(theirs, ours)
        np.testing.assert_allclose(ours(dp.Tensor(odd)).numpy(),
                                   theirs(torch.tensor(odd.copy())).detach().numpy(), **F64)


# --- bad input ---------------------------------------------------------------------------------


def test_conv_errors_name_layer_and_shapes():
    conv = dp.nn.Conv2d(3, 16, 3)
    with pytest.raises(ValueError, match=r"Conv2d\(3, 16, kernel_size=3\).*\(2, 1, 8, 8\)"):
        conv(dp.randn(2, 1, 8, 8))
    with pytest.raises(ValueError, match=r"Conv2d\(3, 16.*\(2, 3, 8\)"):
        conv(dp.randn(2, 3, 8))
    with pytest.raises(ValueError, match=r"smaller than.*kernel"):
        conv(dp.randn(2, 3, 2, 8))
    with pytest.raises(TypeError, match="dtype"):
        conv(dp.tensor(np.zeros((1, 3, 5, 5), dtype=np.int64)))
    with pytest.raises(TypeError, match="float64.*float32"):
        conv(dp.randn(1, 3, 5, 5, dtype=dp.float64))
    with pytest.raises(ValueError, match=r"Conv1d\(4, 2, kernel_size=3\).*\(2, 3, 9\)"):
        dp.nn.Conv1d(4, 2, 3)(dp.randn(2, 3, 9))
    with pytest.raises(ValueError, match="expected input with 6 channels"):
        F.conv2d(dp.randn(1, 4, 5, 5), dp.randn(4, 3, 3, 3), groups=2)


def test_conv_constructor_errors():
    with pytest.raises(ValueError, match="divisible by groups"):
        dp.nn.Conv2d(3, 4, 3, groups=2)
    with pytest.raises(ValueError, match="divisible by groups"):
        dp.nn.Conv2d(4, 3, 3, groups=2)
    with pytest.raises(ValueError, match="strided"):
        dp.nn.Conv2d(3, 4, 3, stride=2, padding="same")
    with pytest.raises(ValueError, match="padding string"):
        dp.nn.Conv2d(3, 4, 3, padding="full")
    with pytest.raises(NotImplementedError, match="reflect"):
        dp.nn.Conv2d(3, 4, 3, padding_mode="reflect")
    with pytest.raises(ValueError, match="padding_mode"):
        dp.nn.Conv2d(3, 4, 3, padding_mode="mirror")
    with pytest.raises(ValueError, match="kernel_size"):
        dp.nn.Conv2d(3, 4, (3, 3, 3))


def test_pool_errors():
    with pytest.raises(ValueError, match="half of kernel size"):
        dp.nn.MaxPool2d(2, padding=2)(dp.randn(1, 1, 6, 6))
    with pytest.raises(ValueError, match=r"too small.*\(1, 1, 1, 1\)|\(1, 1, 1, 1\).*too small"):
        dp.nn.MaxPool2d(2)(dp.randn(1, 1, 1, 1))
    with pytest.raises(ValueError, match=r"MaxPool2d.*\(1, 2, 3, 4, 5\)"):
        dp.nn.MaxPool2d(2)(dp.randn(1, 2, 3, 4, 5))
    with pytest.raises(ValueError, match="output_size"):
        dp.nn.AdaptiveAvgPool2d((2, 2, 2))(dp.randn(1, 1, 4, 4))
    with pytest.raises(ValueError, match="output_size"):
        dp.nn.AdaptiveAvgPool2d(0)(dp.randn(1, 1, 4, 4))
    with pytest.raises(ValueError, match="divisor_override"):
        dp.nn.AvgPool2d(2, divisor_override=0)(dp.randn(1, 1, 4, 4))
    with pytest.raises(TypeError, match="floating-point"):
        dp.nn.AvgPool2d(2)(dp.tensor(np.ones((1, 1, 4, 4), dtype=np.int32)))
