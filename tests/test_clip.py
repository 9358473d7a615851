"""Gradient clipping and penalties against PyTorch; flat and per-parameter paths."""

import math

import numpy as np
import pytest
import torch

import distprop as dp
from distprop.nn import Parameter
from distprop.nn.utils import clip_grad_norm_, clip_grad_value_, l1_penalty, l2_penalty
from distprop.optim import flatten

from helpers import gradcheck

rng = np.random.default_rng(0)
SHAPES = [(6, 5), (6,), (3, 6), (3,)]


def make(dtype, flat=True, scale=1.0):
    values = [rng.standard_normal(s) * scale for s in SHAPES]
    grads = [rng.standard_normal(s) * scale for s in SHAPES]
    ps = [Parameter(dp.tensor(v.astype(dtype))) for v in values]
    if flat:
        flatten(ps)
        for p, g in zip(ps, grads):
            (p * dp.tensor(g.astype(dtype))).sum().backward()  # grads land in the flat buffer
        assert all(p.grad.data is p._grad_buffer for p in ps)
    else:
        for p, g in zip(ps, grads):
            p.grad = dp.tensor(g.astype(dtype))
    tps = [torch.tensor(v.astype(dtype), requires_grad=True) for v in values]
    for tp, g in zip(tps, grads):
        tp.grad = torch.tensor(g.astype(dtype))
    return ps, tps


@pytest.mark.parametrize("flat", [True, False], ids=["flat", "per-param"])
@pytest.mark.parametrize("norm_type", [2.0, 1.0, math.inf, 3.0])
@pytest.mark.parametrize("max_norm", [0.5, 1e6])
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_clip_grad_norm_matches_torch(flat, norm_type, max_norm, dtype):
    ps, tps = make(dtype, flat)
    total = clip_grad_norm_(ps, max_norm, norm_type=norm_type)
    ttotal = torch.nn.utils.clip_grad_norm_(tps, max_norm, norm_type=norm_type, foreach=False)
    tol = 1e-12 if dtype == np.float64 else 1e-5
    assert total.dtype == dtype and total.shape == ()
    np.testing.assert_allclose(total.item(), ttotal.item(), rtol=tol)
    for p, tp in zip(ps, tps):
        assert p.grad.dtype == dtype
        np.testing.assert_allclose(p.grad.numpy(), tp.grad.numpy(), rtol=tol, atol=tol)


def test_flat_path_clips_the_buffer_in_place():
    ps, _ = make(np.float64)
    buf = flatten(ps)[0]
    norm_before = np.linalg.norm(buf.grad)
    total = clip_grad_norm_(ps, 1.0)
    assert total.item() == pytest.approx(norm_before, rel=1e-12)
    assert np.linalg.norm(buf.grad) == pytest.approx(1.0, rel=1e-5)
    assert all(p.grad.data is p._grad_buffer for p in ps)


def test_clip_grad_norm_skips_missing_grads_and_single_tensor():
    ps, tps = make(np.float64)
    ps[1].grad = None
    tps[1].grad = None
    total = clip_grad_norm_(ps, 0.1)
    ttotal = torch.nn.utils.clip_grad_norm_(tps, 0.1)
    np.testing.assert_allclose(total.item(), ttotal.item(), rtol=1e-12)
    for p, tp in zip([ps[0], ps[2]], [tps[0], tps[2]]):
        np.testing.assert_allclose(p.grad.numpy(), tp.grad.numpy(), rtol=1e-12)
    one = clip_grad_norm_(ps[0], 0.01)
    tone = torch.nn.utils.clip_grad_norm_(tps[0], 0.01)
    np.testing.assert_allclose(one.item(), tone.item(), rtol=1e-12)
    assert clip_grad_norm_([Parameter(dp.zeros(3))], 1.0).item() == 0.0


def test_large_float32_buffer_norm_is_accurate():
    p = Parameter(dp.zeros(3_000_000))
    flatten([p])
    values = np.random.default_rng(1).standard_normal(3_000_000).astype(np.float32)
    (p * dp.tensor(values)).sum().backward()
    total = clip_grad_norm_([p], 1e9)
    exact = np.sqrt(np.sum(values.astype(np.float64) ** 2))
    assert abs(total.item() - exact) / exact < 1e-6


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_nonfinite_norm(bad):
    ps, tps = make(np.float64)
    ps[2].grad.data[0, 0] = bad
    tps[2].grad[0, 0] = bad
    with pytest.raises(RuntimeError, match="non-finite"):
        clip_grad_norm_(ps, 1.0, error_if_nonfinite=True)
    with pytest.raises(RuntimeError, match="non-finite"):
        torch.nn.utils.clip_grad_norm_(tps, 1.0, error_if_nonfinite=True)
    total = clip_grad_norm_(ps, 1.0)
    ttotal = torch.nn.utils.clip_grad_norm_(tps, 1.0)
    assert (math.isnan(total.item()) and math.isnan(ttotal.item())) or \
        total.item() == ttotal.item()
    for p, tp in zip(ps, tps):
        np.testing.assert_array_equal(np.isnan(p.grad.numpy()), np.isnan(tp.grad.numpy()))


@pytest.mark.parametrize("flat", [True, False], ids=["flat", "per-param"])
def test_clip_grad_value_matches_torch(flat):
    ps, tps = make(np.float32, flat)
    clip_grad_value_(ps, 0.3)
    torch.nn.utils.clip_grad_value_(tps, 0.3)
    for p, tp in zip(ps, tps):
        assert p.grad.dtype == np.float32
        np.testing.assert_array_equal(p.grad.numpy(), tp.grad.numpy())
    with pytest.raises(ValueError, match="clip_value must be >= 0"):
        clip_grad_value_(ps, -1.0)


@pytest.mark.parametrize("penalty,torch_fn", [
    (l1_penalty, lambda ps: sum(p.abs().sum() for p in ps)),
    (l2_penalty, lambda ps: sum((p**2).sum() for p in ps)),
], ids=["l1", "l2"])
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_penalties_match_torch(penalty, torch_fn, dtype):
    ps, tps = make(dtype, flat=True)
    for p in ps:
        p.grad = None
    value = penalty(ps)
    assert value.dtype == dtype and value.shape == ()
    (value * 0.5).backward()
    tvalue = torch_fn(tps)
    for tp in tps:
        tp.grad = None
    (tvalue * 0.5).backward()
    tol = 1e-12 if dtype == np.float64 else 1e-5
    np.testing.assert_allclose(value.item(), tvalue.item(), rtol=tol)
    for p, tp in zip(ps, tps):
        assert p.grad.dtype == dtype
        np.testing.assert_allclose(p.grad.numpy(), tp.grad.numpy(), rtol=tol, atol=tol)


def test_l2_penalty_is_sum_of_squares_without_half():
    p = Parameter(dp.tensor(np.array([1.0, -2.0, 3.0])))
    value = l2_penalty([p])
    assert value.item() == 14.0
    value.backward()
    np.testing.assert_array_equal(p.grad.numpy(), [2.0, -4.0, 6.0])
    q = Parameter(dp.tensor(np.array([1.0, -2.0, 0.0])))
    l1_penalty(q).backward()
    np.testing.assert_array_equal(q.grad.numpy(), [1.0, -1.0, 0.0])


def test_penalty_gradcheck():
    a = rng.standard_normal((3, 4)) + 0.1
    b = rng.standard_normal(5) + 0.1
    gradcheck(lambda x, y: l2_penalty([x, y]), a, b)
    gradcheck(lambda x, y: l1_penalty([x, y]) * 1.5, a, b)


def test_penalty_in_a_training_loss_equals_weight_decay():
    """lam * l2_penalty with plain SGD == SGD(weight_decay=2 * lam)."""
    lam = 0.05
    results = []
    for use_penalty in (True, False):
        w = Parameter(dp.tensor(np.linspace(-1, 1, 6).reshape(2, 3)))
        opt = dp.optim.SGD([w], lr=0.1, weight_decay=0.0 if use_penalty else 2 * lam)
        x = dp.tensor(np.ones((4, 3)))
        for _ in range(3):
            opt.zero_grad()
            loss = (x @ w.T).sum()
            if use_penalty:
                loss = loss + lam * l2_penalty([w])
            loss.backward()
            opt.step()
        results.append(w.numpy().copy())
    np.testing.assert_allclose(results[0], results[1], rtol=1e-12)


def test_penalty_errors():
    with pytest.raises(ValueError, match="empty parameter list"):
        l2_penalty([])
    with pytest.raises(TypeError, match="not a Tensor"):
        l1_penalty([np.zeros(3)])
