"""Module behaviour against PyTorch: state_dict keys/order, loading, errors, modes, grads."""

import numpy as np
import pytest
import torch

import distprop as dp


def build(lib):
    """The same nested model in distprop or PyTorch (``lib`` is ``dp`` or ``torch``)."""
    nn = lib.nn

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 3)
            self.register_buffer("scale", lib.ones(3) * 2.0)
            self.register_buffer("scratch", lib.zeros(3), persistent=False)
            self.layers = nn.ModuleList([nn.Linear(3, 3), nn.Linear(3, 3, bias=False)])
            self.heads = nn.ModuleDict({"b": nn.Linear(3, 3), "a": nn.Identity()})
            self.gate = nn.Parameter(lib.zeros(3) + 0.5)
            self.act = nn.GELU()

        def forward(self, x):
            h = self.act(self.fc(x)) * self.scale
            for layer in self.layers:
                h = lib.tanh(layer(h))
            return self.heads["a"](self.heads["b"](h)) * self.gate

    return nn.Sequential(
        nn.Linear(5, 4),
        nn.ReLU(),
        nn.Dropout(0.3),
        Block(),
        nn.Sequential(nn.Linear(3, 2), nn.LogSoftmax(dim=1)),
    )


def paired():
    torch.manual_seed(0)
    theirs = build(torch)
    ours = build(dp)
    ours.load_state_dict(theirs.state_dict())
    return ours, theirs


def test_state_dict_keys_order_and_shapes_match_torch():
    ours, theirs = build(dp), build(torch)
    sd, ref = ours.state_dict(), theirs.state_dict()
    assert list(sd) == list(ref)
    assert "3.scratch" not in sd and "3.scale" in sd
    for k in ref:
        assert sd[k].shape == tuple(ref[k].shape), k
    assert [n for n, _ in ours.named_parameters()] == [n for n, _ in theirs.named_parameters()]
    assert [n for n, _ in ours.named_buffers()] == [n for n, _ in theirs.named_buffers()]
    assert [n for n, _ in ours.named_modules()] == [n for n, _ in theirs.named_modules()]


def test_state_dict_values_are_detached_views():
    model = dp.nn.Linear(3, 2)
    sd = model.state_dict()
    assert not sd["weight"].requires_grad
    sd["weight"].data[0, 0] = 42.0
    assert model.weight.data[0, 0] == 42.0
    assert model.state_dict(keep_vars=True)["weight"] is model.weight


def test_load_torch_state_dict_gives_same_forward_and_grads():
    ours, theirs = paired()
    for k, v in theirs.state_dict().items():
        np.testing.assert_array_equal(ours.state_dict()[k].numpy(), v.numpy())
    ours.eval()
    theirs.eval()
    x = np.random.default_rng(0).standard_normal((6, 5)).astype(np.float32)
    out, ref = ours(dp.tensor(x)), theirs(torch.tensor(x))
    np.testing.assert_allclose(out.numpy(), ref.detach().numpy(), rtol=1e-5, atol=1e-6)
    target = np.array([0, 1, 1, 0, 1, 0])
    dp.nn.NLLLoss()(out, dp.tensor(target)).backward()
    torch.nn.NLLLoss()(ref, torch.tensor(target)).backward()
    for (name, p), (_, tp) in zip(ours.named_parameters(), theirs.named_parameters()):
        assert p.grad.dtype == np.float32
        np.testing.assert_allclose(p.grad.numpy(), tp.grad.numpy(), rtol=1e-4, atol=1e-6,
                                   err_msg=name)


def test_load_numpy_arrays_and_float64_model():
    torch.manual_seed(1)
    theirs = build(torch).double()
    ours = build(dp).double()
    ours.load_state_dict({k: v.numpy() for k, v in theirs.state_dict().items()})
    ours.eval()
    theirs.eval()
    x = np.random.default_rng(1).standard_normal((4, 5))
    out, ref = ours(dp.tensor(x)), theirs(torch.tensor(x))
    assert out.dtype == np.float64
    np.testing.assert_allclose(out.numpy(), ref.detach().numpy(), rtol=1e-10, atol=1e-12)


def test_round_trip_through_own_state_dict():
    a, b = build(dp), build(dp)
    result = b.load_state_dict(a.state_dict())
    assert result.missing_keys == [] and result.unexpected_keys == []
    for k, v in a.state_dict().items():
        np.testing.assert_array_equal(b.state_dict()[k].numpy(), v.numpy())


def test_missing_and_unexpected_keys_are_named():
    model = build(dp)
    sd = dict(build(dp).state_dict())
    del sd["3.layers.1.weight"]
    sd["3.extra.bias"] = np.zeros(3)
    with pytest.raises(RuntimeError) as info:
        model.load_state_dict(sd)
    msg = str(info.value)
    assert "Missing key(s)" in msg and "3.layers.1.weight" in msg
    assert "Unexpected key(s)" in msg and "3.extra.bias" in msg


def test_strict_false_reports_like_torch():
    sd_t = dict(build(torch).state_dict())
    del sd_t["0.bias"]
    sd_t["9.weight"] = torch.zeros(1)
    expected = build(torch).load_state_dict(sd_t, strict=False)
    model = build(dp)
    before = model.state_dict()["0.bias"].numpy().copy()
    got = model.load_state_dict(sd_t, strict=False)
    assert got.missing_keys == expected.missing_keys == ["0.bias"]
    assert got.unexpected_keys == expected.unexpected_keys == ["9.weight"]
    np.testing.assert_array_equal(model.state_dict()["0.bias"].numpy(), before)
    np.testing.assert_array_equal(model.state_dict()["0.weight"].numpy(), sd_t["0.weight"].numpy())


@pytest.mark.parametrize("strict", [True, False])
def test_shape_mismatch_names_key_and_both_shapes(strict):
    model = build(dp)
    sd = dict(model.state_dict())
    sd["3.fc.weight"] = np.zeros((4, 3), dtype=np.float32)
    with pytest.raises(RuntimeError, match=r"3\.fc\.weight.*\(4, 3\).*\(3, 4\)"):
        model.load_state_dict(sd, strict=strict)


def test_train_eval_propagate_to_every_submodule():
    model = build(dp)
    assert all(m.training for m in model.modules())
    assert model.eval() is model
    assert not any(m.training for m in model.modules())
    model[3].train()
    assert model[3].layers[0].training and not model[0].training
    model.train()
    assert all(m.training for m in model.modules())


def test_zero_grad():
    model = build(dp)
    model(dp.randn(4, 5)).sum().backward()
    assert all(p.grad is not None for p in model.parameters())
    model.zero_grad(set_to_none=False)
    for p in model.parameters():
        assert p.grad is not None and not p.grad.numpy().any()
    model.zero_grad()
    assert all(p.grad is None for p in model.parameters())


def test_parameters_are_shared_once_and_keep_identity_through_to():
    lin = dp.nn.Linear(3, 3)
    model = dp.nn.Sequential(lin, dp.nn.ReLU(), lin)
    assert [n for n, _ in model.named_parameters()] == ["0.weight", "0.bias"]
    ref = torch.nn.Sequential(torch.nn.Linear(3, 3))
    ref = torch.nn.Sequential(ref[0], torch.nn.ReLU(), ref[0])
    assert list(model.state_dict()) == list(ref.state_dict())
    params = list(model.parameters())
    model.double()
    assert [id(p) for p in model.parameters()] == [id(p) for p in params]
    assert all(p.dtype == np.float64 for p in params)


def test_linear_shape_error_names_layer_and_shapes():
    layer = dp.nn.Linear(784, 10)
    with pytest.raises(ValueError, match=r"Linear\(784, 10\).*784.*\(32, 100\)"):
        layer(dp.randn(32, 100))
    with pytest.raises(ValueError, match=r"Linear\(784, 10\).*\(32, 100\)"):
        dp.nn.Sequential(layer)(dp.randn(32, 100))


@pytest.mark.parametrize("make,match", [
    (lambda: dp.nn.Linear(-1, 3), r"shape \(3, -1\).*non-negative"),
    (lambda: dp.nn.Embedding(-2, 3), r"shape \(-2, 3\).*non-negative"),
    (lambda: dp.nn.Conv2d(3, 4, 0), r"Conv2d: kernel_size must be >= 1, got \(0, 0\)"),
    (lambda: dp.nn.Conv1d(3, 4, 3, stride=0), r"Conv1d: stride must be >= 1"),
    (lambda: dp.nn.Conv2d(3, 4, 3, dilation=(1, 0)), r"Conv2d: dilation must be >= 1"),
    (lambda: dp.nn.Conv2d(3, 4, 3, padding=-1), r"Conv2d: padding must be >= 0"),
    (lambda: dp.nn.Sequential(dp.nn.ReLU(), lambda x: x), r"function is not a Module.*'1'"),
    (lambda: dp.nn.ModuleList([3]), r"int is not a Module subclass"),
])
def test_bad_constructor_arguments_get_clear_errors(make, match):
    """A kernel of size 0 used to build a layer that silently produced garbage."""
    with pytest.raises((ValueError, TypeError), match=match):
        make()


def test_linear_refuses_integer_and_mismatched_dtype_inputs():
    """A float64 input into a float32 layer would silently run a float64 GEMM (torch refuses)."""
    layer = dp.nn.Linear(3, 2)
    with pytest.raises(TypeError, match=r"Linear\(3, 2\).*float64.*float32"):
        layer(dp.randn(4, 3, dtype=np.float64))
    with pytest.raises(TypeError, match=r"Linear\(3, 2\).*int64"):
        layer(dp.tensor([[1, 2, 3]]))
    assert layer.double()(dp.randn(4, 3, dtype=np.float64)).dtype == np.float64


def test_dropout_in_a_model_follows_train_and_eval():
    model = dp.nn.Sequential(dp.nn.Identity(), dp.nn.Dropout(0.5))
    x = dp.ones(100_000)
    out = model(x).numpy()
    zero_fraction = (out == 0).mean()
    assert abs(zero_fraction - 0.5) < 5 * np.sqrt(0.25 / x.numel())
    np.testing.assert_allclose(out[out != 0], 2.0)
    model.eval()
    np.testing.assert_array_equal(model(x).numpy(), 1.0)
