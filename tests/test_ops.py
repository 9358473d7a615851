"""Every op: float64 finite differences, the PyTorch oracle, and dtype preservation."""

import numpy as np
import pytest
import torch

import distprop as dp

from helpers import gradcheck

rng = np.random.default_rng(0)


def positive(*shape):
    return rng.uniform(0.5, 2.0, size=shape)


def normal(*shape):
    return rng.standard_normal(shape)


# name, distprop fn, torch fn, input arrays
OPS = [
    ("add", lambda a, b: a + b, lambda a, b: a + b, [normal(3, 4), normal(4)]),
    ("add_bcast", lambda a, b: a + b, lambda a, b: a + b, [normal(3, 1, 4), normal(2, 1)]),
    ("sub", lambda a, b: a - b, lambda a, b: a - b, [normal(3, 4), normal(3, 1)]),
    ("rsub", lambda a: 2.0 - a, lambda a: 2.0 - a, [normal(3)]),
    ("mul", lambda a, b: a * b, lambda a, b: a * b, [normal(2, 3), normal(2, 3)]),
    ("mul_scalar", lambda a: a * 3.0, lambda a: a * 3.0, [normal(2, 3)]),
    ("div", lambda a, b: a / b, lambda a, b: a / b, [normal(2, 3), positive(3)]),
    ("rdiv", lambda a: 1.0 / a, lambda a: 1.0 / a, [positive(2, 3)]),
    ("neg", lambda a: -a, lambda a: -a, [normal(4)]),
    ("pow_scalar", lambda a: a**3, lambda a: a**3, [normal(5)]),
    ("pow_half", lambda a: a**0.5, lambda a: a**0.5, [positive(5)]),
    ("pow_tensor", lambda a, b: a**b, lambda a, b: a**b, [positive(3), normal(3)]),
    ("rpow", lambda a: 2.0**a, lambda a: 2.0**a, [normal(3)]),
    ("exp", dp.exp, torch.exp, [normal(3, 2)]),
    ("log", dp.log, torch.log, [positive(3, 2)]),
    ("sqrt", dp.sqrt, torch.sqrt, [positive(3, 2)]),
    ("abs", dp.abs, torch.abs, [normal(3, 2)]),
    ("clamp", lambda a: dp.clamp(a, -0.5, 0.5), lambda a: torch.clamp(a, -0.5, 0.5),
     [normal(4, 3)]),
    ("clamp_min", lambda a: a.clamp(min=0.1), lambda a: a.clamp(min=0.1), [normal(4, 3)]),
    ("where", lambda a, b: dp.where(a > 0, a, b), lambda a, b: torch.where(a > 0, a, b),
     [normal(3, 4), normal(3, 4)]),
    ("maximum", dp.maximum, torch.maximum, [normal(3, 4), normal(3, 4)]),
    ("minimum", dp.minimum, torch.minimum, [normal(3, 4), normal(4)]),
    ("matmul", lambda a, b: a @ b, lambda a, b: a @ b, [normal(3, 4), normal(4, 5)]),
    ("matmul_batched", lambda a, b: a @ b, lambda a, b: a @ b, [normal(2, 3, 4), normal(2, 4, 5)]),
    ("matmul_bcast", lambda a, b: a @ b, lambda a, b: a @ b, [normal(2, 3, 4), normal(4, 5)]),
    ("matmul_vec", lambda a, b: a @ b, lambda a, b: a @ b, [normal(3, 4), normal(4)]),
    ("vec_matmul", lambda a, b: a @ b, lambda a, b: a @ b, [normal(4), normal(4, 2)]),
    ("dot", lambda a, b: a @ b, lambda a, b: a @ b, [normal(4), normal(4)]),
    ("sum", lambda a: a.sum(), lambda a: a.sum(), [normal(3, 4)]),
    ("sum_dim", lambda a: a.sum(dim=1), lambda a: a.sum(dim=1), [normal(3, 4, 2)]),
    ("sum_dims_keep", lambda a: a.sum(dim=(0, 2), keepdim=True),
     lambda a: a.sum(dim=(0, 2), keepdim=True), [normal(3, 4, 2)]),
    ("sum_empty_dims", lambda a: a.sum(dim=()), lambda a: a.sum(dim=()), [normal(3, 4)]),
    ("mean", lambda a: a.mean(), lambda a: a.mean(), [normal(3, 4)]),
    ("mean_empty_dims", lambda a: a.mean(dim=[]), lambda a: a.mean(dim=[]), [normal(3, 4)]),
    ("mean_dim", lambda a: a.mean(dim=-1, keepdim=True), lambda a: a.mean(dim=-1, keepdim=True),
     [normal(3, 4)]),
    ("max", lambda a: a.max(), lambda a: a.max(), [normal(3, 4)]),
    ("max_dim", lambda a: a.max(dim=1)[0], lambda a: a.max(dim=1)[0], [normal(3, 4)]),
    ("min_dim_keep", lambda a: a.min(dim=0, keepdim=True)[0],
     lambda a: a.min(dim=0, keepdim=True)[0], [normal(3, 4)]),
    ("amax_dims", lambda a: a.amax(dim=(0, 2)), lambda a: a.amax(dim=(0, 2)), [normal(3, 4, 2)]),
    ("amin_keep", lambda a: a.amin(-1, keepdim=True), lambda a: a.amin(-1, keepdim=True),
     [normal(3, 4)]),
    ("amin_all", lambda a: a.amin(), lambda a: a.amin(), [normal(3, 4)]),
    ("var", lambda a: a.var(), lambda a: a.var(), [normal(3, 4)]),
    ("var_dim_biased", lambda a: a.var(dim=1, unbiased=False),
     lambda a: a.var(dim=1, unbiased=False), [normal(3, 4)]),
    ("std", lambda a: a.std(dim=0), lambda a: a.std(dim=0), [normal(5, 4)]),
    ("reshape", lambda a: a.reshape(4, -1), lambda a: a.reshape(4, -1), [normal(2, 6)]),
    ("view", lambda a: a.view(3, 4), lambda a: a.view(3, 4), [normal(12)]),
    ("transpose", lambda a: a.transpose(0, 2), lambda a: a.transpose(0, 2), [normal(2, 3, 4)]),
    ("T", lambda a: a.T, lambda a: a.T, [normal(2, 3)]),
    ("permute", lambda a: a.permute(2, 0, 1), lambda a: a.permute(2, 0, 1), [normal(2, 3, 4)]),
    ("squeeze", lambda a: a.squeeze(1), lambda a: a.squeeze(1), [normal(3, 1, 2)]),
    ("unsqueeze", lambda a: a.unsqueeze(-1), lambda a: a.unsqueeze(-1), [normal(3, 2)]),
    ("expand", lambda a: a.expand(3, 4), lambda a: a.expand(3, 4), [normal(3, 1)]),
    ("flatten", lambda a: a.flatten(1), lambda a: a.flatten(1), [normal(2, 3, 4)]),
    ("cat", lambda a, b: dp.cat([a, b], dim=1), lambda a, b: torch.cat([a, b], dim=1),
     [normal(2, 3), normal(2, 2)]),
    ("stack", lambda a, b: dp.stack([a, b], dim=1), lambda a, b: torch.stack([a, b], dim=1),
     [normal(2, 3), normal(2, 3)]),
    ("slice", lambda a: a[1:, ::2], lambda a: a[1:, ::2], [normal(4, 5)]),
    ("index_int", lambda a: a[2], lambda a: a[2], [normal(4, 5)]),
    ("index_repeat", lambda a: a[np.array([0, 2, 0, 0])], lambda a: a[[0, 2, 0, 0]],
     [normal(4, 3)]),
    ("index_mask", lambda a: a[a.data > 0], lambda a: a[a > 0], [normal(4, 3)]),
    ("index_pairs", lambda a: a[np.arange(3), np.array([1, 0, 1])],
     lambda a: a[torch.arange(3), torch.tensor([1, 0, 1])], [normal(3, 2)]),
    ("reuse", lambda a: a * a + a, lambda a: a * a + a, [normal(3)]),
]


@pytest.mark.parametrize("name,fn,_torch_fn,inputs", OPS, ids=[o[0] for o in OPS])
def test_gradcheck(name, fn, _torch_fn, inputs):
    gradcheck(fn, *inputs)


@pytest.mark.parametrize("name,fn,torch_fn,inputs", OPS, ids=[o[0] for o in OPS])
@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_matches_torch(name, fn, torch_fn, inputs, dtype):
    arrays = [np.asarray(a, dtype=dtype) for a in inputs]
    ours = [dp.tensor(a, requires_grad=True) for a in arrays]
    theirs = [torch.tensor(a, requires_grad=True) for a in arrays]
    out, ref = fn(*ours), torch_fn(*theirs)
    assert out.dtype == np.dtype(dtype), f"{name}: {dtype} in, {out.dtype} out"
    tol = dict(rtol=1e-10, atol=1e-12) if dtype == "float64" else dict(rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(out.numpy(), ref.detach().numpy(), **tol)
    weights = np.random.default_rng(1).standard_normal(out.shape).astype(dtype)
    out.backward(dp.tensor(weights))
    ref.backward(torch.tensor(weights))
    for t, r in zip(ours, theirs):
        assert t.grad.dtype == np.dtype(dtype)
        np.testing.assert_allclose(t.grad.numpy(), r.grad.numpy(), **tol)


def test_long_chain_does_not_recurse():
    x = dp.tensor(1.0, requires_grad=True)
    y = x
    for _ in range(10_000):
        y = y * 1.0001
    y.backward()
    assert abs(x.grad.item() - 1.0001**10_000) < 1e-2


def test_second_backward_needs_retain_graph():
    x = dp.tensor([1.0, 2.0], requires_grad=True)
    y = (x * x).sum()
    y.backward(retain_graph=True)
    y.backward()
    np.testing.assert_allclose(x.grad.numpy(), [4.0, 8.0])
    with pytest.raises(RuntimeError, match="second time"):
        y.backward()


def test_backward_on_non_scalar_needs_gradient():
    x = dp.tensor([1.0, 2.0], requires_grad=True)
    with pytest.raises(RuntimeError, match="scalar outputs"):
        (x * 2).backward()


def test_no_grad_and_detach():
    x = dp.tensor([1.0], requires_grad=True)
    with dp.no_grad():
        y = x * 2
    assert not y.requires_grad and y.grad_fn is None
    assert not x.detach().requires_grad
    z = x * 2
    assert z.requires_grad and not z.is_leaf


def test_integer_tensors_cannot_require_grad():
    with pytest.raises(RuntimeError, match="floating-point"):
        dp.tensor([1, 2, 3], requires_grad=True)


def test_retain_grad_on_intermediate():
    x = dp.tensor([1.0, 2.0], requires_grad=True)
    h = x * 3
    h.retain_grad()
    (h * h).sum().backward()
    np.testing.assert_allclose(h.grad.numpy(), [6.0, 12.0])


def test_shape_errors_name_both_shapes():
    a, b = dp.randn(3, 4), dp.randn(5, 6)
    with pytest.raises(ValueError, match=r"\(3, 4\).*\(5, 6\)"):
        a @ b
    with pytest.raises(ValueError, match=r"\(3, 4\).*\(5, 6\)"):
        a + b


def test_python_floats_keep_float32():
    x = dp.randn(3)
    for y in (x * 2.5, x + np.float64(1.0), 1.5 / (x.abs() + 1), x**2.0):
        assert y.dtype == np.float32


@pytest.mark.parametrize("fn", [
    lambda a: a.sum(0), lambda a: a.mean(-1), lambda a: a.sum(dim=-1, keepdim=True),
    lambda a: a.var(0, unbiased=False), lambda a: a.max(0)[0], lambda a: a.min(-1)[0],
], ids=["sum", "mean", "sum_keep", "var", "max", "min"])
def test_0d_tensor_reductions_accept_dim_0_and_minus_1(fn):
    x, tx = dp.tensor(3.0, requires_grad=True), torch.tensor(3.0, requires_grad=True)
    out, tout = fn(x), fn(tx)
    assert out.shape == tuple(tout.shape)
    np.testing.assert_allclose(out.numpy(), tout.detach().numpy())
    out.backward(), tout.backward()
    np.testing.assert_allclose(x.grad.numpy(), tx.grad.numpy())
    with pytest.raises(IndexError, match="Dimension out of range"):
        dp.tensor(3.0).sum(1)


def test_max_min_along_a_dim_give_values_and_indices_by_name():
    a = dp.tensor([[1.0, 5.0, 4.0], [7.0, 0.0, 2.0]])
    for dp_fn, torch_fn in ((a.max, torch.tensor(a.numpy()).max),
                            (a.min, torch.tensor(a.numpy()).min)):
        out, ref = dp_fn(dim=1), torch_fn(dim=1)
        np.testing.assert_array_equal(out.values.numpy(), ref.values.numpy())
        np.testing.assert_array_equal(out.indices.numpy(), ref.indices.numpy())
        values, indices = out
        assert values is out.values and indices is out.indices


def test_var_with_too_few_elements_gives_nan_gradient_like_torch():
    x, tx = dp.tensor([1.0], requires_grad=True), torch.tensor([1.0], requires_grad=True)
    x.var().backward()
    with pytest.warns(UserWarning):
        tx.var().backward()
    assert np.isnan(x.grad.numpy()).all() and torch.isnan(tx.grad).all()


PROMOTION = [
    ("int*float", lambda a, f: a * 0.5), ("int/int", lambda a, f: a / 2),
    ("rdiv", lambda a, f: 1 / a), ("exp", lambda a, f: a.exp()), ("log", lambda a, f: a.log()),
    ("sqrt", lambda a, f: a.sqrt()), ("int*f32", lambda a, f: a * f),
    ("f32+int", lambda a, f: f + a),
    ("f64-int", lambda a, f: f.double() - a), ("int**0.5", lambda a, f: a**0.5),
    ("maximum", lambda a, f: dp.maximum(a, f) if isinstance(a, dp.Tensor) else torch.maximum(a, f)),
    ("bool*f32", lambda a, f: (a > 1) * f), ("int+int", lambda a, f: a + a),
    ("int**2", lambda a, f: a**2), ("int-1", lambda a, f: a - 1),
    ("f32*f64_0d", lambda a, f: f * (f[0] * 0 + 2).double()),
    ("f64_0d/f32", lambda a, f: (f[1] * 0 + 2).double() / f),
    ("f64*f32_0d", lambda a, f: f.double() * f[0]),
]


@pytest.mark.parametrize("name,fn", PROMOTION, ids=[r[0] for r in PROMOTION])
def test_type_promotion_matches_torch(name, fn):
    """NumPy alone makes int64 * float32 and float32 * float64_0d float64; PyTorch keeps float32."""
    out = fn(dp.tensor([1, 2, 3]), dp.tensor([0.5, 1.5, 2.5]))
    ref = fn(torch.tensor([1, 2, 3]), torch.tensor([0.5, 1.5, 2.5]))
    assert out.dtype == np.dtype(str(ref.dtype).removeprefix("torch.")), name
    np.testing.assert_allclose(out.numpy(), ref.numpy(), rtol=1e-6)


def test_amax_amin_split_the_gradient_over_ties_like_torch():
    a = np.array([[1.0, 3.0, 3.0], [2.0, -1.0, 0.0], [5.0, 5.0, 5.0]])
    for name in ("amax", "amin"):
        x, tx = dp.tensor(a, requires_grad=True), torch.tensor(a, requires_grad=True)
        getattr(x, name)(1).sum().backward()
        getattr(tx, name)(1).sum().backward()
        np.testing.assert_allclose(x.grad.numpy(), tx.grad.numpy(), rtol=1e-15)


@pytest.mark.parametrize("call,error,match", [
    (lambda: dp.ones(2, 3).flatten(3), IndexError, "Dimension out of range"),
    (lambda: dp.ones(2, 3, 4).flatten(2, 1), RuntimeError, "start_dim cannot come after"),
    (lambda: dp.ones(2, 3).squeeze(3), IndexError, "Dimension out of range"),
    (lambda: dp.ones(2, 3).transpose(0, 2), IndexError, "Dimension out of range"),
    (lambda: dp.ones(2, 3).permute(0, 0), RuntimeError, r"\(0, 0\) are not a permutation"),
    (lambda: dp.ones(2, 3).expand(4, 3), RuntimeError, r"\(2, 3\) cannot be expanded to \(4, 3\)"),
    (lambda: dp.ones(2, 3).expand(3), RuntimeError, r"\(2, 3\) cannot be expanded to \(3,\)"),
    (lambda: dp.where(dp.ones(2) > 0, dp.ones(3), dp.ones(2)), ValueError,
     r"where: shapes \(3,\) and \(2,\) cannot be broadcast"),
    (lambda: dp.ones(2, 3)[5], IndexError, r"invalid index 5 for a tensor of shape \(2, 3\)"),
    (lambda: dp.ones(3)[dp.tensor([1.0])], IndexError, r"invalid index .*integer"),
])
def test_bad_shape_arguments_get_clear_errors(call, error, match):
    """These used to pass silently (flatten, squeeze wrapped dims around) or fail in NumPy."""
    with pytest.raises(error, match=match):
        call()


def test_shape_ops_with_negative_and_0d_dims_match_torch():
    x, tx = dp.ones(2, 1, 3, 1), torch.ones(2, 1, 3, 1)
    for fn in (lambda a: a.squeeze((1, -1)), lambda a: a.squeeze(-1), lambda a: a.flatten(-2),
               lambda a: a.flatten(0, -2), lambda a: a.transpose(-1, 0),
               lambda a: a[:, 0].expand(4, -1, -1, 5)):
        assert fn(x).shape == tuple(fn(tx).shape)
    assert dp.tensor(3.0).transpose(0, -1).shape == () and dp.tensor(3.0).flatten().shape == (1,)


def test_0d_float64_tensor_keeps_float32_operand_and_gets_float64_grad():
    x = dp.ones(3, requires_grad=True)
    s = dp.tensor(2.0, dtype=np.float64, requires_grad=True)
    y = x * s
    assert y.dtype == np.float32 and (x * np.array(2.0)).dtype == np.float32
    y.sum().backward()
    assert x.grad.dtype == np.float32 and s.grad.dtype == np.float64
    assert s.grad.item() == 3.0


def test_iterating_a_0d_tensor_is_an_error_and_rows_keep_the_graph():
    with pytest.raises(TypeError, match="iteration over a 0-d tensor"):
        list(dp.tensor(1.0))
    x = dp.tensor([[1.0, 2.0], [3.0, 4.0]], requires_grad=True)
    a, b = x
    (a * 2 + b).sum().backward()
    np.testing.assert_array_equal(x.grad.numpy(), [[2.0, 2.0], [1.0, 1.0]])
