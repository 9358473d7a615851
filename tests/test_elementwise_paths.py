"""Fast paths of the elementwise-heavy layers (issue 14): BatchNorm's GEMV statistics and
in-Function running-statistics update, LeakyReLU's in-place forward, SiLU's backward from its
output, the dot-product sums of the Huber/SmoothL1/MSE and BCE-with-logits losses,
cross-entropy and NLL without masks, and Embedding's row rounds. Each against PyTorch (same
data) and float64 finite differences.
"""

import numpy as np
import pytest
import torch

import distprop as dp
from distprop.flat import flatten
from distprop.ops.embedding import scatter_add_rows

from helpers import gradcheck


def _tol(dtype):
    return dict(rtol=1e-10, atol=1e-12) if dtype == np.float64 else dict(rtol=2e-5, atol=2e-6)


# ----------------------------------------------------------------------------- BatchNorm

# name, module, input shape, layout, affine, momentum
BN_CASES = [
    ("1d_small", "BatchNorm1d", (256, 8), "c", True, 0.1),
    ("1d_seq", "BatchNorm1d", (6, 5, 7), "c", True, 0.3),
    ("2d", "BatchNorm2d", (8, 16, 8, 8), "c", True, 0.1),
    ("2d_big", "BatchNorm2d", (4, 8, 32, 32), "c", True, 0.1),  # einsum channel dot
    ("2d_channels_last", "BatchNorm2d", (4, 6, 5, 5), "nhwc", True, 0.1),
    ("2d_no_affine", "BatchNorm2d", (4, 6, 5, 5), "c", False, 0.1),
    ("2d_cumulative", "BatchNorm2d", (4, 6, 5, 5), "c", True, None),
]


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("name,cls,shape,layout,affine,momentum", BN_CASES,
                         ids=[c[0] for c in BN_CASES])
def test_batchnorm_matches_torch(name, cls, shape, layout, affine, momentum, dtype):
    rng = np.random.default_rng(1)
    x = (rng.standard_normal(shape) * 3 + 2).astype(dtype)
    if layout == "nhwc":
        x = np.ascontiguousarray(x.transpose(0, 2, 3, 1)).transpose(0, 3, 1, 2)
    tdt = torch.float64 if dtype == np.float64 else torch.float32
    ref = getattr(torch.nn, cls)(shape[1], affine=affine, momentum=momentum).to(tdt)
    ours = getattr(dp.nn, cls)(shape[1], affine=affine, momentum=momentum, dtype=dtype)
    if affine:
        with torch.no_grad():
            ref.weight.copy_(torch.from_numpy(rng.standard_normal(shape[1])))
            ref.bias.copy_(torch.from_numpy(rng.standard_normal(shape[1])))
        ours.load_state_dict({k: v.detach().numpy().copy() for k, v in ref.state_dict().items()})
    grad = rng.standard_normal(shape).astype(dtype)
    for _ in range(2):  # two steps: the running statistics compound
        xo, xt = dp.tensor(x, requires_grad=True), torch.from_numpy(x.copy()).requires_grad_()
        xo.data = x
        out, want = ours(xo), ref(xt)
        out.backward(dp.tensor(grad))
        want.backward(torch.from_numpy(grad))
        assert out.dtype == dtype and xo.grad.dtype == dtype
        np.testing.assert_allclose(out.numpy(), want.detach().numpy(), **_tol(dtype))
        np.testing.assert_allclose(xo.grad.numpy(), xt.grad.numpy(), **_tol(dtype))
        if affine:
            for p, q in ((ours.weight, ref.weight), (ours.bias, ref.bias)):
                assert p.grad.dtype == dtype
                np.testing.assert_allclose(p.grad.numpy(), q.grad.numpy(), **_tol(dtype))
                p.grad, q.grad = None, None
    for buf in ("running_mean", "running_var"):
        np.testing.assert_allclose(getattr(ours, buf).numpy(), getattr(ref, buf).numpy(),
                                   **_tol(dtype))
        assert getattr(ours, buf).dtype == dtype
    assert int(ours.num_batches_tracked.numpy()) == 2
    ours.eval()
    ref.eval()
    xo = dp.tensor(x, requires_grad=True)
    np.testing.assert_allclose(ours(xo).numpy(), ref(torch.from_numpy(x)).detach().numpy(),
                               **_tol(dtype))


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
def test_functional_batch_norm_updates_buffers_like_torch(dtype):
    rng = np.random.default_rng(2)
    x = rng.standard_normal((5, 3, 4)).astype(dtype)
    rm, rv = rng.standard_normal(3).astype(dtype), rng.random(3).astype(dtype) + 0.5
    trm, trv = torch.from_numpy(rm.copy()), torch.from_numpy(rv.copy())
    orm, orv = dp.tensor(rm), dp.tensor(rv)
    out = dp.nn.functional.batch_norm(dp.tensor(x), orm, orv, training=True, momentum=0.25)
    want = torch.nn.functional.batch_norm(torch.from_numpy(x), trm, trv, training=True,
                                          momentum=0.25)
    np.testing.assert_allclose(out.numpy(), want.numpy(), **_tol(dtype))
    assert not np.allclose(orm.numpy(), rm)  # updated
    np.testing.assert_allclose(orm.numpy(), trm.numpy(), **_tol(dtype))
    np.testing.assert_allclose(orv.numpy(), trv.numpy(), **_tol(dtype))


def test_functional_batch_norm_still_checks_its_arguments():
    x = dp.tensor(np.ones((1, 3), np.float32))
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        dp.nn.functional.batch_norm(x, None, None, training=True)
    with pytest.raises(ValueError, match="running_mean of shape"):
        dp.nn.functional.batch_norm(dp.tensor(np.ones((4, 3), np.float32)),
                                    dp.tensor(np.zeros(2, np.float32)), None, training=True)


@pytest.mark.parametrize("shape", [(6, 3), (3, 2, 4, 3)], ids=["2d", "4d"])
def test_batchnorm_gradcheck(shape):
    rng = np.random.default_rng(3)
    x, w, b = rng.standard_normal(shape) * 2 + 1, rng.standard_normal(shape[1]), \
        rng.standard_normal(shape[1])
    gradcheck(lambda x, w, b: dp.nn.functional.batch_norm(x, None, None, w, b, training=True),
              x, w, b)


def test_batchnorm_module_without_running_stats():
    rng = np.random.default_rng(4)
    x = rng.standard_normal((6, 4, 3)).astype(np.float32)
    ours = dp.nn.BatchNorm1d(4, track_running_stats=False)
    ref = torch.nn.BatchNorm1d(4, track_running_stats=False)
    for training in (True, False):
        ours.train(training)
        ref.train(training)
        np.testing.assert_allclose(ours(dp.tensor(x)).numpy(),
                                   ref(torch.from_numpy(x)).detach().numpy(), rtol=2e-5,
                                   atol=2e-6)
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        ours(dp.tensor(np.ones((1, 4), np.float32)))


# ----------------------------------------------------------------------------- LeakyReLU


@pytest.mark.parametrize("slope", [0.01, 0.0, 1.0, 1.5, -0.2])
@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
def test_leaky_relu_matches_torch(slope, dtype):
    rng = np.random.default_rng(5)
    x = rng.standard_normal((64, 33)).astype(dtype)
    x[0, :3] = [0.0, -0.0, 1e-30]
    xo, xt = dp.tensor(x, requires_grad=True), torch.from_numpy(x.copy()).requires_grad_()
    out = dp.nn.LeakyReLU(slope)(xo)
    want = torch.nn.LeakyReLU(slope)(xt)
    g = rng.standard_normal(x.shape).astype(dtype)
    out.backward(dp.tensor(g))
    want.backward(torch.from_numpy(g))
    assert out.dtype == dtype and xo.grad.dtype == dtype
    np.testing.assert_array_equal(out.numpy(), want.detach().numpy())
    np.testing.assert_allclose(xo.grad.numpy(), xt.grad.numpy(), **_tol(dtype))
    assert np.array_equal(xo.numpy(), x)  # the input is not touched


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
def test_silu_backward_from_output_matches_torch(dtype):
    rng = np.random.default_rng(15)
    x = (rng.standard_normal((64, 40)) * 6).astype(dtype)
    x[0, :4] = [0.0, -0.0, 100.0, -100.0]
    xo, xt = dp.tensor(x, requires_grad=True), torch.from_numpy(x.copy()).requires_grad_()
    out, want = dp.nn.SiLU()(xo), torch.nn.SiLU()(xt)
    g = rng.standard_normal(x.shape).astype(dtype)
    out.backward(dp.tensor(g))
    want.backward(torch.from_numpy(g))
    assert out.dtype == dtype and xo.grad.dtype == dtype
    np.testing.assert_allclose(out.numpy(), want.detach().numpy(), **_tol(dtype))
    np.testing.assert_allclose(xo.grad.numpy(), xt.grad.numpy(), **_tol(dtype))


def test_silu_gradcheck():
    gradcheck(dp.nn.SiLU(), np.random.default_rng(16).standard_normal((4, 7)) * 4)


# ----------------------------------------------------------------------------- losses

# name, torch/distprop class, options, shape (70000+ elements: more than one dot block)
DIFF_LOSSES = [
    ("huber", "HuberLoss", {}, (37, 41)),
    ("huber_delta", "HuberLoss", {"delta": 0.3}, (300, 250)),
    ("smooth_l1", "SmoothL1Loss", {}, (37, 41)),
    ("smooth_l1_beta", "SmoothL1Loss", {"beta": 2.5}, (300, 250)),
    ("smooth_l1_beta0", "SmoothL1Loss", {"beta": 0.0}, (37, 41)),
    ("mse", "MSELoss", {}, (300, 250)),
]


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("name,cls,options,shape", DIFF_LOSSES, ids=[c[0] for c in DIFF_LOSSES])
def test_diff_losses_match_torch(name, cls, options, shape, dtype, reduction):
    rng = np.random.default_rng(6)
    x = (rng.standard_normal(shape) * 2).astype(dtype)
    y = rng.standard_normal(shape).astype(dtype)
    xo, yo = dp.tensor(x, requires_grad=True), dp.tensor(y, requires_grad=True)
    xt = torch.from_numpy(x.copy()).requires_grad_()
    yt = torch.from_numpy(y.copy()).requires_grad_()
    out = getattr(dp.nn, cls)(reduction=reduction, **options)(xo, yo)
    want = getattr(torch.nn, cls)(reduction=reduction, **options)(xt, yt)
    g = rng.standard_normal(tuple(want.shape)).astype(dtype) if reduction == "none" else None
    out.backward(None if g is None else dp.tensor(g))
    want.backward(None if g is None else torch.from_numpy(g))
    assert out.dtype == dtype and xo.grad.dtype == dtype and yo.grad.dtype == dtype
    tol = _tol(dtype) if dtype == np.float64 else dict(rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(out.numpy(), want.detach().numpy(), **tol)
    np.testing.assert_allclose(xo.grad.numpy(), xt.grad.numpy(), **tol)
    np.testing.assert_allclose(yo.grad.numpy(), yt.grad.numpy(), **tol)


@pytest.mark.parametrize("cls,options", [("HuberLoss", {"delta": 0.7}),
                                         ("SmoothL1Loss", {"beta": 0.6}), ("MSELoss", {}),
                                         ("BCEWithLogitsLoss", {})])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_loss_fast_paths_gradcheck(cls, options, reduction):
    rng = np.random.default_rng(7)
    x = rng.standard_normal((5, 6)) * 2
    y = rng.random((5, 6)) if cls == "BCEWithLogitsLoss" else rng.standard_normal((5, 6))
    fn = getattr(dp.nn, cls)(reduction=reduction, **options)
    gradcheck(fn, x, y)


def test_loss_sums_stay_accurate_over_many_blocks():
    """Float32 sums over 4M elements stay within NumPy's pairwise-sum accuracy (one float32
    BLAS dot over all of them was off by ~5e-6 relative)."""
    rng = np.random.default_rng(8)
    x = (rng.standard_normal(4_000_000) * 3).astype(np.float32)
    y = np.zeros_like(x)
    exact = {"MSELoss": (x.astype(np.float64) ** 2).mean()}
    a = np.abs(x.astype(np.float64))
    m = np.minimum(a, 1.0)
    exact["HuberLoss"] = (m * (a - m / 2)).mean()
    for cls, value in exact.items():
        out = getattr(dp.nn, cls)()(dp.tensor(x), dp.tensor(y))
        assert out.dtype == np.float32
        assert abs(float(out.numpy()) - value) / value < 2e-7, cls


def test_loss_fast_paths_keep_nan_and_inf():
    x = np.array([0.5, np.inf, 1.0], np.float32)
    y = np.zeros(3, np.float32)
    assert np.isinf(dp.nn.HuberLoss()(dp.tensor(x), dp.tensor(y)).numpy())
    x[1] = np.nan
    assert np.isnan(dp.nn.MSELoss()(dp.tensor(x), dp.tensor(y)).numpy())
    assert np.isnan(dp.nn.BCEWithLogitsLoss()(dp.tensor(x), dp.tensor(y)).numpy())


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
def test_bce_with_logits_matches_torch(dtype, reduction):
    rng = np.random.default_rng(9)
    x = (rng.standard_normal((300, 250)) * 5).astype(dtype)
    x[0, :4] = [0.0, 100.0, -100.0, -0.0]
    y = rng.random((300, 250)).astype(dtype)
    xo, yo = dp.tensor(x, requires_grad=True), dp.tensor(y, requires_grad=True)
    xt = torch.from_numpy(x.copy()).requires_grad_()
    yt = torch.from_numpy(y.copy()).requires_grad_()
    out = dp.nn.BCEWithLogitsLoss(reduction=reduction)(xo, yo)
    want = torch.nn.BCEWithLogitsLoss(reduction=reduction)(xt, yt)
    g = rng.standard_normal(x.shape).astype(dtype) if reduction == "none" else None
    out.backward(None if g is None else dp.tensor(g))
    want.backward(None if g is None else torch.from_numpy(g))
    assert out.dtype == dtype and xo.grad.dtype == dtype
    tol = _tol(dtype) if dtype == np.float64 else dict(rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(out.numpy(), want.detach().numpy(), **tol)
    np.testing.assert_allclose(xo.grad.numpy(), xt.grad.numpy(), **tol)
    np.testing.assert_allclose(yo.grad.numpy(), yt.grad.numpy(), **tol)


# name, input shape, target maker, options
CE_CASES = [
    ("all_kept", (32, 10), lambda r, c, n: r.integers(0, c, n), {}),
    ("all_kept_int32", (32, 10), lambda r, c, n: r.integers(0, c, n).astype(np.int32), {}),
    ("spatial", (4, 5, 3, 2), lambda r, c, n: r.integers(0, c, n), {}),
    ("some_ignored", (32, 10), lambda r, c, n: np.where(r.random(n) < 0.3, -100,
                                                        r.integers(0, c, n)), {}),
    ("ignore_is_a_class", (32, 10), lambda r, c, n: r.integers(0, c, n), {"ignore_index": 3}),
    ("weighted", (32, 10), lambda r, c, n: r.integers(0, c, n), {"weight": True}),
    ("smoothed", (32, 10), lambda r, c, n: r.integers(0, c, n), {"label_smoothing": 0.1}),
]


NLL_CASES = [c for c in CE_CASES if c[0] != "smoothed"]


def _log_probs(rng, shape):
    x = torch.log_softmax(torch.from_numpy(rng.standard_normal(shape)), 1).numpy()
    return x.astype(np.float32)


# loss, cases, inputs: CrossEntropyLoss takes logits, NLLLoss log-probabilities
INDEX_LOSSES = [
    ("CrossEntropyLoss", CE_CASES, lambda rng, shape: (rng.standard_normal(shape) * 3)
     .astype(np.float32)),
    ("NLLLoss", NLL_CASES, _log_probs),
]


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("loss,name,shape,target,options,inputs", [
    (loss, *case, inputs) for loss, cases, inputs in INDEX_LOSSES for case in cases],
    ids=[f"{loss}-{case[0]}" for loss, cases, _ in INDEX_LOSSES for case in cases])
def test_index_loss_paths_match_torch(loss, name, shape, target, options, inputs, reduction):
    rng = np.random.default_rng(10)
    x = inputs(rng, shape)
    n = shape[0] * int(np.prod(shape[2:], dtype=int))
    t = target(rng, shape[1], n).reshape((shape[0],) + shape[2:])
    kw = dict(options)
    if kw.pop("weight", False):
        w = rng.random(shape[1]).astype(np.float32) + 0.5
        ours_kw, torch_kw = {"weight": dp.tensor(w)}, {"weight": torch.from_numpy(w)}
    else:
        ours_kw, torch_kw = {}, {}
    xo, xt = dp.tensor(x, requires_grad=True), torch.from_numpy(x.copy()).requires_grad_()
    out = getattr(dp.nn, loss)(reduction=reduction, **ours_kw, **kw)(xo, dp.tensor(t))
    want = getattr(torch.nn, loss)(reduction=reduction, **torch_kw, **kw)(
        xt, torch.from_numpy(t.astype(np.int64)))
    g = rng.standard_normal(tuple(want.shape)).astype(np.float32) \
        if reduction == "none" else None
    out.backward(None if g is None else dp.tensor(g))
    want.backward(None if g is None else torch.from_numpy(g))
    assert out.dtype == np.float32 and xo.grad.dtype == np.float32
    np.testing.assert_allclose(out.numpy(), want.detach().numpy(), rtol=2e-5, atol=2e-6)
    np.testing.assert_allclose(xo.grad.numpy(), xt.grad.numpy(), rtol=2e-5, atol=2e-6)


def test_cross_entropy_all_kept_gradcheck():
    rng = np.random.default_rng(11)
    t = rng.integers(0, 4, 5)
    for reduction in ("mean", "sum", "none"):
        gradcheck(lambda x, r=reduction: dp.nn.functional.cross_entropy(x, dp.tensor(t),
                                                                         reduction=r),
                  rng.standard_normal((5, 4)) * 2)
        gradcheck(lambda x, r=reduction: dp.nn.functional.nll_loss(x, dp.tensor(t),
                                                                    reduction=r),
                  rng.standard_normal((5, 4)) * 2)


def test_cross_entropy_fast_path_still_rejects_bad_indices():
    x = dp.tensor(np.zeros((3, 4), np.float32))
    with pytest.raises(IndexError, match="target class index 4 is out of range"):
        dp.nn.functional.cross_entropy(x, dp.tensor(np.array([0, 4, 1])))
    with pytest.raises(IndexError, match="target class index -1 is out of range"):
        dp.nn.functional.cross_entropy(x, dp.tensor(np.array([0, -1, 1])))


# ----------------------------------------------------------------------------- Embedding

# name, vocab, width, tokens, strided rows: add.at on complex pairs (even width, contiguous),
# on single elements (odd width, strided rows), the rounds (256+ floats), the 8-round leftover
SCATTER_CASES = [
    ("pairs_32", 1000, 32, 4096, False),
    ("pairs_64", 10000, 64, 4096, False),
    ("pairs_128_repeats", 100, 128, 4096, False),
    ("odd_width_33", 1000, 33, 4096, False),
    ("strided_rows_64", 1000, 64, 1024, True),
    ("rounds_256", 10000, 256, 512, False),
    ("leftover_512", 50, 512, 2048, False),
]


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("zeroed", [True, False])
@pytest.mark.parametrize("name,vocab,width,tokens,strided", SCATTER_CASES,
                         ids=[c[0] for c in SCATTER_CASES])
def test_scatter_add_rows_equals_add_at(name, vocab, width, tokens, strided, zeroed, dtype):
    rng = np.random.default_rng(12)
    index = rng.integers(0, vocab, tokens)
    rows = rng.standard_normal((tokens, 2 * width if strided else width)).astype(dtype)
    if strided:
        rows = rows[:, ::2]
    start = np.zeros((vocab, width), dtype) if zeroed else \
        rng.standard_normal((vocab, width)).astype(dtype)
    want = start.copy()
    np.add.at(want, index, rows)
    got = start.copy()
    scatter_add_rows(got, index, rows, zeroed=zeroed)
    assert got.dtype == dtype
    np.testing.assert_array_equal(got, want)  # the same additions in the same order


@pytest.mark.parametrize("flat", [False, True], ids=["plain", "flat_buffer"])
@pytest.mark.parametrize("vocab,dim,tokens,padding", [(1000, 512, 2048, None),
                                                      (10000, 64, 4096, 3), (500, 16, 64, None)])
def test_embedding_matches_torch(vocab, dim, tokens, padding, flat):
    rng = np.random.default_rng(13)
    ref = torch.nn.Embedding(vocab, dim, padding_idx=padding)
    ours = dp.nn.Embedding(vocab, dim, padding_idx=padding)
    ours.load_state_dict({k: v.detach().numpy().copy() for k, v in ref.state_dict().items()})
    if flat:
        flatten(ours.parameters())
    idx = rng.integers(0, vocab, (tokens // 8, 8))
    if padding is not None:
        idx[0, :3] = padding
    g = rng.standard_normal((tokens // 8, 8, dim)).astype(np.float32)
    for _ in range(2):  # the second step accumulates into the existing gradient
        ours(dp.tensor(idx)).backward(dp.tensor(g))
        ref(torch.from_numpy(idx)).backward(torch.from_numpy(g))
        assert ours.weight.grad.dtype == np.float32
        np.testing.assert_allclose(ours.weight.grad.numpy(), ref.weight.grad.numpy(),
                                   rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["sigmoid", "silu"])
def test_zero_dimensional_sigmoid_family_matches_torch(name):
    x = np.float32(0.5)
    ours = dp.tensor(x, requires_grad=True)
    out = getattr(dp.nn.functional, name)(ours)
    out.backward()
    theirs = torch.tensor(x, requires_grad=True)
    ref = getattr(torch.nn.functional, name)(theirs)
    ref.backward()
    assert out.numpy().dtype == np.float32 and out.numpy().shape == ()
    np.testing.assert_allclose(out.numpy(), ref.detach().numpy(), rtol=1e-6)
    np.testing.assert_allclose(ours.grad.numpy(), theirs.grad.numpy(), rtol=1e-6)
