"""nn.Sequential runs a ReLU followed by a max pool as pool, then ReLU (4x less ReLU work on a
2x2 pool): values and gradients must stay exactly those of PyTorch's order, ties included."""

import numpy as np
import pytest
import torch

import distprop as dp

# name, distprop pool, torch pool, input shape (overlapping windows, marked "overlap", add up a
# position's gradients in another order than PyTorch: last-bit differences, not from the swap)
POOLS = [
    ("2x2", lambda: dp.nn.MaxPool2d(2), lambda: torch.nn.MaxPool2d(2), (2, 3, 8, 8)),
    ("2x2_odd_size", lambda: dp.nn.MaxPool2d(2), lambda: torch.nn.MaxPool2d(2), (2, 3, 7, 9)),
    ("3x3_s2_p1_overlap", lambda: dp.nn.MaxPool2d(3, 2, 1), lambda: torch.nn.MaxPool2d(3, 2, 1),
     (2, 3, 9, 9)),
    ("3x3_large_overlap", lambda: dp.nn.MaxPool2d(3, 1, 1), lambda: torch.nn.MaxPool2d(3, 1, 1),
     (1, 2, 20, 20)),  # 400 outputs: the one-dim-at-a-time path
    ("ceil_mode_overlap", lambda: dp.nn.MaxPool2d(3, 2, ceil_mode=True),
     lambda: torch.nn.MaxPool2d(3, 2, ceil_mode=True), (2, 2, 8, 8)),
    ("dilation_overlap", lambda: dp.nn.MaxPool2d(2, 1, dilation=2),
     lambda: torch.nn.MaxPool2d(2, 1, dilation=2), (2, 2, 7, 7)),
    ("1d", lambda: dp.nn.MaxPool1d(2), lambda: torch.nn.MaxPool1d(2), (2, 3, 10)),
    ("1d_k3_s2_overlap", lambda: dp.nn.MaxPool1d(3, 2, 1), lambda: torch.nn.MaxPool1d(3, 2, 1),
     (2, 3, 11)),
]


def _input_with_ties(shape, channels_last):
    """Integer-valued floats: negative windows (all zeros after ReLU), positive ties, zeros."""
    rng = np.random.default_rng(5)
    x = rng.integers(-3, 4, size=shape).astype(np.float32)
    x.reshape(-1)[: x.size // 4] = -1.0  # whole windows at or below zero
    if channels_last and x.ndim == 4:
        return np.ascontiguousarray(x.transpose(0, 2, 3, 1)).transpose(0, 3, 1, 2)
    return x


def _grads(seq, x, grad):
    xt = dp.Tensor(x, requires_grad=True)
    out = seq(xt)
    out.backward(dp.Tensor(grad))
    return out, xt.grad.numpy()


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("name,ours,ref,shape", POOLS, ids=[p[0] for p in POOLS])
def test_relu_then_max_pool_is_exactly_pytorchs_order(name, ours, ref, shape, channels_last):
    x = _input_with_ties(shape, channels_last)
    seq = dp.nn.Sequential(dp.nn.ReLU(), ours())
    torch_seq = torch.nn.Sequential(torch.nn.ReLU(), ref())
    rx = torch.tensor(np.ascontiguousarray(x), requires_grad=True)
    ref_out = torch_seq(rx)
    grad = np.random.default_rng(6).standard_normal(tuple(ref_out.shape)).astype(np.float32)
    ref_out.backward(torch.tensor(grad))

    out, gx = _grads(seq, x, grad)
    assert type(out.grad_fn).__name__ == "ReLU"  # pooled first: the ReLU ran last
    assert out.dtype == np.float32 and gx.dtype == np.float32
    np.testing.assert_array_equal(out.numpy(), ref_out.detach().numpy())
    if "overlap" in name:
        np.testing.assert_allclose(gx, rx.grad.numpy(), rtol=1e-5, atol=1e-6)
    else:
        np.testing.assert_array_equal(gx, rx.grad.numpy())

    # and the modules called one by one, in the written order, agree to the bit
    relu, pool = seq[0], seq[1]
    xt = dp.Tensor(x, requires_grad=True)
    step_out = pool(relu(xt))
    step_out.backward(dp.Tensor(grad))
    assert type(step_out.grad_fn).__name__ == "MaxPoolNd"
    np.testing.assert_array_equal(out.numpy(), step_out.numpy())
    np.testing.assert_array_equal(gx, xt.grad.numpy())


def test_in_a_conv_net_parameter_gradients_match_pytorch():
    torch.manual_seed(0)
    ref = torch.nn.Sequential(torch.nn.Conv2d(2, 4, 3), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
                              torch.nn.Flatten(), torch.nn.Linear(4 * 3 * 3, 3))
    ours = dp.nn.Sequential(dp.nn.Conv2d(2, 4, 3), dp.nn.ReLU(), dp.nn.MaxPool2d(2),
                            dp.nn.Flatten(), dp.nn.Linear(4 * 3 * 3, 3))
    ours.load_state_dict({k: v.detach().numpy() for k, v in ref.state_dict().items()})
    x = np.random.default_rng(7).standard_normal((4, 2, 8, 8)).astype(np.float32)
    (ref(torch.tensor(x)) ** 2).sum().backward()
    (ours(dp.Tensor(x)) ** 2).sum().backward()
    for (name, p), (_, q) in zip(ours.named_parameters(), ref.named_parameters()):
        np.testing.assert_allclose(p.grad.numpy(), q.grad.numpy(), rtol=1e-5, atol=1e-6,
                                   err_msg=name)


class _MyReLU(dp.nn.ReLU):
    pass


def _hooked_relu():
    relu = dp.nn.ReLU()
    relu.register_forward_hook(lambda module, args, out: None)
    return dp.nn.Sequential(relu, dp.nn.MaxPool2d(2))


def _hooked_pool():
    pool = dp.nn.MaxPool2d(2)
    pool.register_forward_pre_hook(lambda module, args: None)
    return dp.nn.Sequential(dp.nn.ReLU(), pool)


# name, Sequential that must run in the written order, type of its output's grad_fn
KEPT_ORDER = [
    ("relu_forward_hook", _hooked_relu, "MaxPoolNd"),
    ("pool_pre_hook", _hooked_pool, "MaxPoolNd"),
    ("relu_subclass", lambda: dp.nn.Sequential(_MyReLU(), dp.nn.MaxPool2d(2)), "MaxPoolNd"),
    ("avg_pool", lambda: dp.nn.Sequential(dp.nn.ReLU(), dp.nn.AvgPool2d(2)), "AvgPoolNd"),
    ("leaky_relu", lambda: dp.nn.Sequential(dp.nn.LeakyReLU(), dp.nn.MaxPool2d(2)), "MaxPoolNd"),
    ("pool_then_relu", lambda: dp.nn.Sequential(dp.nn.MaxPool2d(2), dp.nn.ReLU()), "ReLU"),
]


@pytest.mark.parametrize("name,build,last", KEPT_ORDER, ids=[k[0] for k in KEPT_ORDER])
def test_written_order_is_kept_where_the_swap_does_not_apply(name, build, last):
    x = _input_with_ties((2, 3, 6, 6), False)
    out = build()(dp.Tensor(x, requires_grad=True))
    assert type(out.grad_fn).__name__ == last


def test_hooks_see_the_full_size_relu_output():
    seen = []
    relu = dp.nn.ReLU()
    relu.register_forward_hook(lambda module, args, out: seen.append(out.shape))
    seq = dp.nn.Sequential(relu, dp.nn.MaxPool2d(2))
    assert seq(dp.Tensor(np.ones((1, 2, 4, 4), np.float32))).shape == (1, 2, 2, 2)
    assert seen == [(1, 2, 4, 4)]


def test_return_indices_keeps_the_order_and_the_tuple():
    x = _input_with_ties((2, 3, 6, 6), False)
    out, idx = dp.nn.Sequential(dp.nn.ReLU(), dp.nn.MaxPool2d(2, return_indices=True))(
        dp.Tensor(x))
    _, ref_idx = torch.nn.MaxPool2d(2, return_indices=True)(torch.relu(torch.tensor(x)))
    np.testing.assert_array_equal(np.asarray(idx.numpy() if hasattr(idx, "numpy") else idx),
                                  ref_idx.numpy())
