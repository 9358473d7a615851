"""Every loss x every reduction x its options against PyTorch; gradchecks; dtypes; bad inputs."""

import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as TF

import distprop as dp
from distprop.nn import functional as F

from helpers import gradcheck

rng = np.random.default_rng(0)


def normal(*shape, scale=1.0):
    return scale * rng.standard_normal(shape)


def probs(*shape):
    return rng.uniform(0.05, 0.95, size=shape)


def bits(*shape):
    return (rng.uniform(size=shape) < 0.5).astype(np.float64)


def labels(classes, *shape, ignore=None):
    t = rng.integers(0, classes, size=shape)
    if ignore is not None:
        t.reshape(-1)[::3] = ignore
    return t


def soft(*shape, axis=1):
    p = rng.uniform(size=shape)
    return p / p.sum(axis=axis, keepdims=True)


# name, function name in both F modules, input, target, options, target differentiable
LOSSES = [
    ("mse", "mse_loss", normal(4, 5), normal(4, 5), {}, True),
    ("mse_3d", "mse_loss", normal(2, 3, 4), normal(2, 3, 4), {}, True),
    ("l1", "l1_loss", normal(4, 5), normal(4, 5), {}, True),
    ("huber", "huber_loss", normal(4, 5, scale=2), normal(4, 5), {}, True),
    ("huber_delta0.5", "huber_loss", normal(4, 5, scale=2), normal(4, 5), {"delta": 0.5}, True),
    ("smooth_l1", "smooth_l1_loss", normal(4, 5, scale=2), normal(4, 5), {}, True),
    ("smooth_l1_beta0.3", "smooth_l1_loss", normal(4, 5), normal(4, 5), {"beta": 0.3}, True),
    ("smooth_l1_beta0", "smooth_l1_loss", normal(4, 5), normal(4, 5), {"beta": 0.0}, True),
    ("bce", "binary_cross_entropy", probs(4, 5), probs(4, 5), {}, True),
    ("bce_hard_targets", "binary_cross_entropy", probs(6), bits(6), {}, True),
    ("bce_weight_bcast", "binary_cross_entropy", probs(4, 5), bits(4, 5),
     {"weight": probs(5)}, True),
    ("bce_weight_full", "binary_cross_entropy", probs(3, 2), probs(3, 2),
     {"weight": probs(3, 2)}, True),
    ("bce_logits", "binary_cross_entropy_with_logits", normal(4, 5, scale=3), probs(4, 5), {},
     True),
    ("bce_logits_weight", "binary_cross_entropy_with_logits", normal(4, 5), bits(4, 5),
     {"weight": probs(4, 1)}, True),
    ("bce_logits_pos_weight", "binary_cross_entropy_with_logits", normal(4, 5, scale=3),
     probs(4, 5), {"pos_weight": 3 * probs(5)}, True),
    ("bce_logits_both", "binary_cross_entropy_with_logits", normal(2, 3, 4), bits(2, 3, 4),
     {"weight": probs(3, 4), "pos_weight": 3 * probs(4)}, True),
    ("ce", "cross_entropy", normal(6, 5, scale=2), labels(5, 6), {}, False),
    ("ce_weight", "cross_entropy", normal(6, 5), labels(5, 6), {"weight": probs(5)}, False),
    ("ce_ignore", "cross_entropy", normal(6, 5), labels(5, 6, ignore=-100), {}, False),
    ("ce_ignore_2_weight", "cross_entropy", normal(7, 4), labels(4, 7, ignore=2),
     {"ignore_index": 2, "weight": probs(4)}, False),
    ("ce_smoothing", "cross_entropy", normal(6, 5), labels(5, 6), {"label_smoothing": 0.1},
     False),
    ("ce_smoothing_weight_ignore", "cross_entropy", normal(6, 5), labels(5, 6, ignore=-100),
     {"label_smoothing": 0.2, "weight": probs(5)}, False),
    ("ce_kdim", "cross_entropy", normal(2, 4, 3, 2), labels(4, 2, 3, 2), {}, False),
    ("ce_kdim_all_options", "cross_entropy", normal(2, 4, 3), labels(4, 2, 3, ignore=-100),
     {"weight": probs(4), "label_smoothing": 0.3}, False),
    ("ce_unbatched", "cross_entropy", normal(5), np.array(3), {}, False),
    ("ce_unbatched_smoothing", "cross_entropy", normal(5), np.array(1),
     {"label_smoothing": 0.1, "weight": probs(5)}, False),
    ("ce_probs", "cross_entropy", normal(6, 5, scale=2), soft(6, 5), {}, True),
    ("ce_probs_weight_smoothing", "cross_entropy", normal(6, 5), soft(6, 5),
     {"weight": probs(5), "label_smoothing": 0.15}, True),
    ("ce_probs_kdim", "cross_entropy", normal(2, 3, 4), soft(2, 3, 4), {"weight": probs(3)},
     True),
    ("ce_probs_unbatched", "cross_entropy", normal(4), soft(4, axis=0), {}, True),
    ("nll", "nll_loss", normal(6, 5), labels(5, 6), {}, False),
    ("nll_weight_ignore", "nll_loss", normal(6, 5), labels(5, 6, ignore=-100),
     {"weight": probs(5)}, False),
    ("nll_ignore_1", "nll_loss", normal(6, 3), labels(3, 6, ignore=1), {"ignore_index": 1},
     False),
    ("nll_kdim", "nll_loss", normal(2, 4, 3, 2), labels(4, 2, 3, 2), {"weight": probs(4)}, False),
    ("nll_unbatched", "nll_loss", normal(4), np.array(2), {}, False),
]
IDS = [row[0] for row in LOSSES]
REDUCTIONS = ["mean", "sum", "none"]


def _as(lib, value, dtype):
    """Arrays to the library's tensors: floats in ``dtype``, integers as int64."""
    if not isinstance(value, np.ndarray):
        return value
    dt = np.int64 if value.dtype.kind in "iu" else dtype
    return dp.tensor(value.astype(dt)) if lib is dp else torch.tensor(value.astype(dt))


def _options(lib, options, dtype):
    return {k: _as(lib, v, dtype) for k, v in options.items()}


@pytest.mark.parametrize("name,fname,x,target,options,target_grad", LOSSES, ids=IDS)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_matches_torch(name, fname, x, target, options, target_grad, reduction, dtype):
    xs = np.asarray(x, dtype=dtype)
    ours = dp.tensor(xs, requires_grad=True)
    theirs = torch.tensor(xs, requires_grad=True)
    t_ours, t_theirs = _as(dp, target, dtype), _as(torch, target, dtype)
    if target_grad:
        t_ours.requires_grad_(True)
        t_theirs.requires_grad_(True)
    out = getattr(F, fname)(ours, t_ours, reduction=reduction, **_options(dp, options, dtype))
    ref = getattr(TF, fname)(theirs, t_theirs, reduction=reduction,
                             **_options(torch, options, dtype))
    assert out.dtype == np.dtype(dtype), f"{name}: {dtype} in, {out.dtype} out"
    assert out.shape == tuple(ref.shape)
    tol = dict(rtol=1e-10, atol=1e-12) if dtype == "float64" else dict(rtol=2e-5, atol=1e-6)
    np.testing.assert_allclose(out.numpy(), ref.detach().numpy(), **tol)
    weights = np.random.default_rng(1).standard_normal(out.shape).astype(dtype)
    out.backward(dp.tensor(weights))
    ref.backward(torch.tensor(weights))
    assert ours.grad.dtype == np.dtype(dtype)
    np.testing.assert_allclose(ours.grad.numpy(), theirs.grad.numpy(), **tol)
    if target_grad:
        assert t_ours.grad.dtype == np.dtype(dtype)
        np.testing.assert_allclose(t_ours.grad.numpy(), t_theirs.grad.numpy(), **tol)


@pytest.mark.parametrize("name,fname,x,target,options,target_grad", LOSSES, ids=IDS)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_gradcheck(name, fname, x, target, options, target_grad, reduction):
    fn = getattr(F, fname)
    opts = _options(dp, options, "float64")
    hard_bce = fname == "binary_cross_entropy" and np.isin(target, (0.0, 1.0)).any()
    if target_grad and not hard_bce:  # BCE targets cannot be perturbed outside [0, 1]
        gradcheck(lambda a, b: fn(a, b, reduction=reduction, **opts), x, target)
    else:
        t = dp.tensor(target)
        gradcheck(lambda a: fn(a, t, reduction=reduction, **opts), x)


# --- modules ------------------------------------------------------------------------------------

W5 = probs(5)
MODULES = [
    ("MSELoss", lambda lib: lib.nn.MSELoss(reduction="sum"), normal(3, 5), normal(3, 5)),
    ("L1Loss", lambda lib: lib.nn.L1Loss(), normal(3, 5), normal(3, 5)),
    ("HuberLoss", lambda lib: lib.nn.HuberLoss(delta=0.7), normal(3, 5), normal(3, 5)),
    ("SmoothL1Loss", lambda lib: lib.nn.SmoothL1Loss(reduction="none", beta=0.4), normal(3, 5),
     normal(3, 5)),
    ("CrossEntropyLoss", lambda lib: lib.nn.CrossEntropyLoss(
        weight=_as(lib, W5, "float64"), ignore_index=1, label_smoothing=0.1),
     normal(6, 5), labels(5, 6)),
    ("NLLLoss", lambda lib: lib.nn.NLLLoss(weight=_as(lib, W5, "float64"), reduction="sum"),
     normal(6, 5), labels(5, 6)),
    ("BCELoss", lambda lib: lib.nn.BCELoss(weight=_as(lib, W5, "float64")), probs(3, 5),
     probs(3, 5)),
    ("BCEWithLogitsLoss", lambda lib: lib.nn.BCEWithLogitsLoss(
        pos_weight=_as(lib, 2 * W5, "float64")), normal(3, 5), bits(3, 5)),
]


@pytest.mark.parametrize("name,make,x,target", MODULES, ids=[m[0] for m in MODULES])
def test_modules_match_torch(name, make, x, target):
    ours, theirs = make(dp), make(torch)
    assert list(ours.state_dict()) == list(theirs.state_dict())
    assert ours.reduction == theirs.reduction
    a, b = dp.tensor(x, requires_grad=True), torch.tensor(x, requires_grad=True)
    out, ref = ours(a, _as(dp, target, "float64")), theirs(b, _as(torch, target, "float64"))
    np.testing.assert_allclose(out.numpy(), ref.detach().numpy(), rtol=1e-10, atol=1e-12)
    out.backward(dp.ones_like(out))
    ref.backward(torch.ones_like(ref))
    np.testing.assert_allclose(a.grad.numpy(), b.grad.numpy(), rtol=1e-10, atol=1e-12)


def test_module_weight_buffers_follow_dtype_and_state_dict():
    loss = dp.nn.CrossEntropyLoss(weight=dp.tensor(W5, dtype=dp.float32))
    assert loss.weight.dtype == np.float32
    loss.load_state_dict({"weight": np.ones(5)})
    np.testing.assert_array_equal(loss.weight.numpy(), 1.0)
    loss.double()
    assert loss.weight.dtype == np.float64


@pytest.mark.parametrize("size_average,reduce", [(False, None), (True, None), (None, False),
                                                 (False, True)])
def test_legacy_reduction_flags(size_average, reduce):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        expected = torch.nn.MSELoss(size_average=size_average, reduce=reduce).reduction
    assert dp.nn.MSELoss(size_average=size_average, reduce=reduce).reduction == expected


# --- numerics --------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_cross_entropy_is_stable_for_huge_logits(dtype):
    x = np.array([[1000.0, -1000.0, 0.0], [-5000.0, 5000.0, 4990.0]], dtype=dtype)
    t = np.array([1, 2])
    ours = dp.tensor(x, requires_grad=True)
    out = F.cross_entropy(ours, dp.tensor(t), label_smoothing=0.1)
    out.backward()
    theirs = torch.tensor(x, requires_grad=True)
    ref = TF.cross_entropy(theirs, torch.tensor(t), label_smoothing=0.1)
    ref.backward()
    assert np.isfinite(out.item()) and np.isfinite(ours.grad.numpy()).all()
    np.testing.assert_allclose(out.item(), ref.item(), rtol=1e-6)
    np.testing.assert_allclose(ours.grad.numpy(), theirs.grad.numpy(), rtol=1e-5, atol=1e-7)


def test_bce_with_logits_is_stable_for_huge_logits():
    x = np.array([-800.0, -50.0, 0.0, 50.0, 800.0])
    y = np.array([1.0, 0.0, 0.5, 1.0, 0.0])
    pw = np.array([2.0])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = F.binary_cross_entropy_with_logits(dp.tensor(x), dp.tensor(y), reduction="none",
                                                 pos_weight=dp.tensor(pw))
    ref = TF.binary_cross_entropy_with_logits(torch.tensor(x), torch.tensor(y), reduction="none",
                                              pos_weight=torch.tensor(pw))
    np.testing.assert_allclose(out.numpy(), ref.numpy(), rtol=1e-12)


def test_bce_clamps_log_like_torch():
    x = np.array([0.0, 1.0, 1e-60, 0.5])
    y = np.array([1.0, 0.0, 1.0, 0.0])
    out = F.binary_cross_entropy(dp.tensor(x), dp.tensor(y), reduction="none")
    ref = TF.binary_cross_entropy(torch.tensor(x), torch.tensor(y), reduction="none")
    np.testing.assert_allclose(out.numpy(), ref.numpy(), rtol=1e-12)
    assert out.numpy()[0] == 100.0


@pytest.mark.parametrize("fname", ["cross_entropy", "nll_loss"])
def test_all_ignored_mean_is_nan_like_torch(fname):
    """Loss NaN, but gradient zero (a NaN gradient would poison an allreduce)."""
    x = normal(3, 4)
    t = np.full(3, -100)
    dx, tx = dp.tensor(x, requires_grad=True), torch.tensor(x, requires_grad=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = getattr(F, fname)(dx, dp.tensor(t))
        out.backward()
    ref = getattr(TF, fname)(tx, torch.tensor(t))
    ref.backward()
    assert np.isnan(out.item()) and torch.isnan(ref)
    np.testing.assert_array_equal(dx.grad.numpy(), tx.grad.numpy())
    np.testing.assert_array_equal(dx.grad.numpy(), 0.0)


def test_float64_weights_keep_float32_losses():
    x = dp.randn(4, 5, requires_grad=True)
    t = dp.tensor([0, 1, 2, 3])
    out = F.cross_entropy(x, t, weight=dp.tensor(W5, dtype=dp.float64), label_smoothing=0.1)
    out.backward()
    assert out.dtype == np.float32 and x.grad.dtype == np.float32
    y = dp.rand(4, 5)
    out = F.binary_cross_entropy_with_logits(x, y, pos_weight=np.ones(5))
    assert out.dtype == np.float32


# --- bad inputs --------------------------------------------------------------------------------


@pytest.mark.parametrize("fname", ["cross_entropy", "nll_loss"])
@pytest.mark.parametrize("bad", [5, 7, -1])
def test_class_index_out_of_range(fname, bad):
    x = dp.randn(4, 5)
    t = dp.tensor([0, bad, 1, 2])
    with pytest.raises(IndexError, match=rf"class index {bad} .*5 classes"):
        getattr(F, fname)(x, t)
    with pytest.raises(ValueError, match=rf"{bad}.*5 classes"):
        getattr(F, fname)(dp.randn(2, 5, 3), dp.tensor([[0, 1, 2], [3, 4, bad]]))


FLOAT_ONLY = ["mse_loss", "l1_loss", "huber_loss", "smooth_l1_loss", "binary_cross_entropy",
              "binary_cross_entropy_with_logits", "cross_entropy", "nll_loss"]


@pytest.mark.parametrize("fname", FLOAT_ONLY)
def test_integer_predictions_are_refused(fname):
    x = dp.tensor([[1, 0], [0, 1]])
    target = dp.tensor([0, 1]) if fname in ("cross_entropy", "nll_loss") else dp.rand(2, 2)
    with pytest.raises(TypeError, match="floating-point predictions.*int64"):
        getattr(F, fname)(x, target)


@pytest.mark.parametrize("fname", FLOAT_ONLY[:6])
def test_shape_mismatch_names_both_shapes(fname):
    with pytest.raises(ValueError, match=r"\(4, 3\).*\(4, 2\)"):
        getattr(F, fname)(dp.rand(4, 3), dp.rand(4, 2))


@pytest.mark.parametrize("fname", ["cross_entropy", "nll_loss"])
def test_class_target_shape_mismatch_names_both_shapes(fname):
    with pytest.raises(ValueError, match=r"\(4, 3\).*\(4,\).*\(5,\)"):
        getattr(F, fname)(dp.randn(4, 3), dp.tensor([0, 1, 2, 0, 1]))
    with pytest.raises(ValueError, match=r"weight.*\(3,\).*\(4,\)"):
        getattr(F, fname)(dp.randn(4, 3), dp.tensor([0, 1, 2, 0]), weight=dp.ones(4))


def test_cross_entropy_target_dtype_errors():
    with pytest.raises(TypeError, match="integer dtype"):
        F.cross_entropy(dp.randn(4, 3), dp.tensor([0.0, 1.0, 2.0, 0.0]))
    with pytest.raises(TypeError, match="probabilities.*floating-point"):
        F.cross_entropy(dp.randn(4, 3), dp.tensor(np.zeros((4, 3), dtype=np.int64)))


def test_other_bad_arguments():
    x, y = dp.rand(3), dp.rand(3)
    with pytest.raises(ValueError, match="not a valid value for reduction"):
        F.mse_loss(x, y, reduction="avg")
    with pytest.raises(ValueError, match="not a valid value for reduction"):
        dp.nn.CrossEntropyLoss(reduction="max")
    with pytest.raises(ValueError, match="between 0 and 1"):
        F.binary_cross_entropy(x * 2.0 + 1.0, y)
    with pytest.raises(ValueError, match="target should be between 0 and 1"):
        F.binary_cross_entropy(x, y + 2.0)
    with pytest.raises(ValueError, match="label_smoothing"):
        F.cross_entropy(dp.randn(2, 3), dp.tensor([0, 1]), label_smoothing=1.5)
    with pytest.raises(ValueError, match="delta"):
        F.huber_loss(x, y, delta=0.0)
    with pytest.raises(ValueError, match="beta"):
        F.smooth_l1_loss(x, y, beta=-1.0)
    with pytest.raises(ValueError, match=r"pos_weight.*\(4,\).*\(2, 3\)"):
        F.binary_cross_entropy_with_logits(dp.randn(2, 3), dp.rand(2, 3), pos_weight=dp.ones(4))
