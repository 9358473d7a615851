"""The fused attention core (distprop/ops/mha.py) and LayerNorm's row path against PyTorch (same
state_dict) and float64 finite differences: packed and separate projections, both layouts,
masks, weights, dropout, the unshifted/shifted softmax, rows recomputed with their own max,
heads on both sides of the GEMM fold, and TransformerEncoder layers built on them."""

import numpy as np
import pytest
import torch

import distprop as dp
import distprop.nn.attention as nn_attention
from distprop.nn import MultiheadAttention
from distprop.ops import mha
from distprop.ops.mha import HeadsAttention
from distprop.ops.norm import LayerNorm as LayerNormFn

from helpers import gradcheck

rng = np.random.default_rng(14)
TOL = {"float64": dict(rtol=1e-9, atol=1e-10), "float32": dict(rtol=2e-4, atol=2e-5)}
N, L, S = 3, 5, 6


def _core_of(out):
    """The HeadsAttention node under MultiheadAttention's out_proj (None: generic path)."""
    fn = out._ctx
    while fn is not None and not isinstance(fn, HeadsAttention):
        fn = next((t._ctx for t in fn.inputs if t is not None and t._ctx is not None), None)
    return fn


def _pair(embed, heads, opts, dtype):
    """Ours in ``dtype`` and PyTorch's in float64 (the reference: with large scores PyTorch's
    own float32 gradients are further from it than ours), same weights."""
    ref = torch.nn.MultiheadAttention(embed, heads, **opts).double()
    ours = MultiheadAttention(embed, heads, **opts, dtype=dtype)
    ours.load_state_dict({k: v.detach().numpy() for k, v in ref.state_dict().items()})
    return ours, ref


def _torch_kw(kw, dtype=torch.float64):
    return {k: (torch.tensor(v, dtype=dtype) if v.dtype.kind == "f" else torch.tensor(v))
            if isinstance(v, np.ndarray) else v for k, v in kw.items()}


def _close(actual, expected, dtype, err_msg="", torch32=None):
    """float64: tight. float32: close to the float64 reference, relative to its largest entry
    too -- or, where the problem is ill-conditioned (huge scores), at most 3x as far from it
    as PyTorch's own float32 result ``torch32``."""
    expected = np.asarray(expected, dtype=float)
    tol = dict(TOL[dtype])
    if dtype == "float32":
        tol["atol"] *= max(1.0, float(np.abs(expected).max()))
        err = np.abs(actual - expected)
        if torch32 is not None and np.all(err <= tol["atol"] + tol["rtol"] * np.abs(expected)):
            return
        if torch32 is not None:
            worst = float(err.max())
            assert worst <= 3 * float(np.abs(np.asarray(torch32, float) - expected).max()), (
                f"{err_msg}: float32 error {worst} vs PyTorch's")
            return
    np.testing.assert_allclose(actual, expected, **tol, err_msg=err_msg)


def _row_offsets(target, source, scale):
    """An additive (L, S) mask whose rows sit far apart: row i shifted by -scale * i."""
    return np.repeat(-scale * np.arange(target, dtype=float)[:, None], source, axis=1)


# name, embed, heads, options, call ("self" packs q/k/v, "cross" projects them apart),
# input scale (large: scores beyond the unshifted range), forward kwargs
CASES = [
    ("self_time_major", 8, 2, {}, "self", 1.0, {}),
    ("self_batch_first_no_weights", 8, 2, {"batch_first": True}, "self", 1.0,
     {"need_weights": False}),
    ("self_per_head_weights", 8, 4, {}, "self", 1.0, {"average_attn_weights": False}),
    ("cross_batch_first", 8, 2, {"batch_first": True}, "cross", 1.0, {}),
    ("cross_kdim_vdim", 8, 2, {"kdim": 3, "vdim": 5}, "cross", 1.0, {"need_weights": False}),
    ("large_head_no_fold", 160, 2, {"batch_first": True}, "self", 1.0,
     {"need_weights": False}),
    ("large_head_time_major_mask", 144, 2, {}, "self", 1.0,
     {"attn_mask": rng.random((L, L)) < 0.3, "need_weights": False}),
    ("bool_mask_causal", 8, 2, {"batch_first": True}, "self", 1.0,
     {"attn_mask": ~np.tril(np.ones((L, L), bool)), "need_weights": False}),
    ("float_mask_3d", 8, 2, {}, "cross", 1.0,
     {"attn_mask": rng.standard_normal((N * 2, L, S))}),
    ("key_padding", 8, 2, {"batch_first": True}, "cross", 1.0,
     {"key_padding_mask": np.array([[0, 0, 0, 1, 1, 0], [0] * 6, [1, 0, 0, 0, 0, 1]], bool)}),
    ("is_causal", 8, 2, {"batch_first": True}, "self", 1.0,
     {"attn_mask": ~np.tril(np.ones((L, L), bool)), "is_causal": True,
      "need_weights": False}),
    ("unbatched_self", 8, 2, {}, "self", 1.0, {"unbatched": True}),
    ("unbatched_cross", 8, 2, {"batch_first": True}, "cross", 1.0, {"unbatched": True}),
    ("huge_scores_shifted", 8, 2, {"batch_first": True}, "self", 30.0,
     {"need_weights": False}),
    ("rows_far_below_max", 8, 2, {}, "self", 1.0,
     {"attn_mask": _row_offsets(L, L, 300.0), "need_weights": False}),
    ("rows_far_below_max_weights", 8, 2, {"batch_first": True}, "cross", 1.0,
     {"attn_mask": _row_offsets(L, S, 300.0)}),
]


def _inputs(embed, opts, call, scale, unbatched, dtype):
    kdim, vdim = opts.get("kdim", embed), opts.get("vdim", embed)

    def shape(length, dim):
        if unbatched:
            return (length, dim)
        return (N, length, dim) if opts.get("batch_first") else (length, N, dim)

    def draw(*s):
        return (scale * rng.standard_normal(shape(*s))).astype(dtype)

    if call == "self":
        return [draw(L, embed)]
    return [draw(L, embed), draw(S, kdim), draw(S, vdim)]


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("name,embed,heads,opts,call,scale,kwargs", CASES,
                         ids=[c[0] for c in CASES])
def test_fused_mha_matches_torch(name, embed, heads, opts, call, scale, kwargs, dtype):
    ours, ref = _pair(embed, heads, opts, dtype)
    kwargs = dict(kwargs)
    unbatched = kwargs.pop("unbatched", False)
    kw = {k: v.astype(dtype) if isinstance(v, np.ndarray) and v.dtype.kind == "f" else v
          for k, v in kwargs.items()}
    arrays = _inputs(embed, opts, call, scale, unbatched, dtype)
    xs = [dp.tensor(a, requires_grad=True) for a in arrays]
    ts = [torch.tensor(a.astype(float), requires_grad=True) for a in arrays]
    qkv = (xs * 3)[:3]
    out, weights = ours(*qkv, **kw)
    assert _core_of(out) is not None, "the fused core did not run"
    assert out.dtype == np.dtype(dtype)
    g = rng.standard_normal(out.shape)
    gw = None if weights is None else rng.standard_normal(weights.shape)
    loss = (out * dp.tensor(g.astype(dtype))).sum()
    if weights is not None:
        loss = loss + (weights * dp.tensor(gw.astype(dtype))).sum()
    loss.backward()
    ref_results = []
    for ref_dtype in ((torch.float64, torch.float32) if dtype == "float32" else
                      (torch.float64,)):
        model = ref.to(ref_dtype)
        model.zero_grad()
        ins = [t.detach().to(ref_dtype).requires_grad_() for t in ts]
        ref_out, ref_weights = model(*(ins * 3)[:3], **_torch_kw(kw, ref_dtype))
        ref_loss = (ref_out * torch.tensor(g, dtype=ref_dtype)).sum()
        if ref_weights is not None:
            ref_loss = ref_loss + (ref_weights * torch.tensor(gw, dtype=ref_dtype)).sum()
        ref_loss.backward()
        grads = {n: p.grad.double().numpy() for n, p in model.named_parameters()}
        ref_results.append((ref_out.detach().double().numpy(),
                            None if ref_weights is None else
                            ref_weights.detach().double().numpy(),
                            [t.grad.double().numpy() for t in ins], grads))
    exact = ref_results[0]
    t32 = ref_results[1] if dtype == "float32" else (None, None, [None] * 3, {})
    _close(out.numpy(), exact[0], dtype, "output", t32[0])
    if weights is not None:
        _close(weights.numpy(), exact[1], dtype, "weights", t32[1])
    for i, a in enumerate(xs):
        _close(a.grad.numpy(), exact[2][i], dtype, f"input {i}", t32[2][i])
    for pname, p in ours.named_parameters():
        assert p.grad.dtype == np.dtype(dtype)
        _close(p.grad.numpy(), exact[3][pname], dtype, pname, t32[3].get(pname))


def test_fused_and_generic_paths_agree_with_dropout(monkeypatch):
    """Same seed, same mask draw: the fused core and the composed ops give the same output and
    gradients with attention dropout (PyTorch draws its masks differently)."""
    model = MultiheadAttention(8, 2, dropout=0.4, dtype="float64")
    x = rng.standard_normal((L, N, 8))
    results = []
    for fused in (True, False):
        if not fused:
            monkeypatch.setattr(nn_attention, "fast_path_ok", lambda *a: False)
        model.zero_grad()
        xt = dp.tensor(x, requires_grad=True)
        dp.manual_seed(7)
        out, weights = model(xt, xt, xt)
        assert (_core_of(out) is not None) == fused
        (out.sum() + (weights * weights).sum()).backward()
        results.append([out.numpy(), weights.numpy(), xt.grad.numpy(),
                        model.in_proj_weight.grad.numpy()])
    assert (results[0][1] == 0).any()  # dropout really dropped weights
    for a, b in zip(*results):
        np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-12)


def test_fully_masked_rows_give_zero_weights_output_and_gradient():
    model = MultiheadAttention(8, 2, batch_first=True, dtype="float64")
    x = rng.standard_normal((N, L, 8))
    mask = np.zeros((L, L), bool)
    mask[1] = True  # query 1 may see no key
    kpm = np.zeros((N, L), bool)
    kpm[2] = True  # batch row 2: every key is padding
    xt = dp.tensor(x, requires_grad=True)
    out, weights = model(xt, xt, xt, attn_mask=mask, key_padding_mask=kpm)
    assert _core_of(out) is not None
    bias = model.out_proj.bias.numpy()
    np.testing.assert_allclose(out.numpy()[:, 1], np.broadcast_to(bias, (N, 8)))
    np.testing.assert_allclose(out.numpy()[2], np.broadcast_to(bias, (L, 8)))
    assert np.all(weights.numpy()[:, 1] == 0) and np.all(weights.numpy()[2] == 0)
    np.testing.assert_allclose(weights.numpy()[:2, [0, 2, 3, 4]].sum(-1), 1.0, rtol=1e-12)
    (out * out).sum().backward()
    assert np.isfinite(xt.grad.numpy()).all()
    np.testing.assert_array_equal(xt.grad.numpy()[2], 0 * xt.grad.numpy()[2])


# --- float64 finite differences of the core itself ---------------------------------------------

E, H = 6, 2

# name, packed, time_major, q/k/v row counts, apply kwargs, extra: scale of inputs
CORE_CASES = [
    ("packed_time_major", True, True, (4, 4), {}, 1.0),
    ("packed_batch_first_bias", True, False, (4, 4),
     {"bias": rng.standard_normal((1, 1, 4, 4))}, 1.0),
    ("separate_batch_first", False, False, (3, 5), {}, 1.0),
    ("separate_time_major_bias", False, True, (3, 5), {"bias": rng.standard_normal((3, 5))},
     1.0),
    ("shifted_softmax", True, False, (4, 4), {}, 12.0),
    ("rows_recomputed", False, False, (3, 5), {"bias": _row_offsets(3, 5, 800.0)}, 1.0),
    ("fully_masked_row", True, True, (4, 4),
     {"bias": np.where(np.arange(4)[:, None] == 2, -np.inf, 0.0) * np.ones((4, 4))}, 1.0),
    ("scale", False, True, (3, 5), {"scale": 0.7}, 1.0),
]


def _core_fn(packed, time_major, rows, kwargs, need_weights=False, dropout_p=0.0, heads=H):
    def fn(*ts):
        if dropout_p:
            dp.manual_seed(3)
        res = HeadsAttention.apply(*ts, heads=heads, time_major=time_major, packed=packed,
                                   dropout_p=dropout_p, need_weights=need_weights, **kwargs)
        if not need_weights:
            return res
        out, weights = res
        return out.sum() * 0.3 + (weights * weights).sum()
    return fn


def _core_arrays(packed, time_major, rows, scale, embed=E):
    def shape(length, width):
        return (length, 2, width) if time_major else (2, length, width)

    if packed:
        return [scale * rng.standard_normal(shape(rows[0], 3 * embed))]
    return [scale * rng.standard_normal(shape(rows[0], embed)),
            scale * rng.standard_normal(shape(rows[1], embed)),
            rng.standard_normal(shape(rows[1], embed))]


@pytest.mark.parametrize("name,packed,time_major,rows,kwargs,scale", CORE_CASES,
                         ids=[c[0] for c in CORE_CASES])
def test_core_gradcheck(name, packed, time_major, rows, kwargs, scale):
    gradcheck(_core_fn(packed, time_major, rows, kwargs),
              *_core_arrays(packed, time_major, rows, scale), rtol=1e-5, atol=1e-6)


def test_core_gradcheck_strided_output_gradient():
    """A non-contiguous gradient of the output (here from a permute after the core)."""
    core = _core_fn(True, False, (4, 4), {"bias": rng.standard_normal((4, 4))})
    gradcheck(lambda qkv: core(qkv).permute(2, 0, 1),
              *_core_arrays(True, False, (4, 4), 1.0), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("need_weights,dropout_p", [(True, 0.0), (False, 0.3), (True, 0.3)])
def test_core_gradcheck_weights_and_dropout(need_weights, dropout_p):
    fn = _core_fn(True, False, (4, 4), {"bias": rng.standard_normal((4, 4))}, need_weights,
                  dropout_p)
    gradcheck(fn, *_core_arrays(True, False, (4, 4), 1.0), rtol=1e-5, atol=1e-6)


def test_core_gradcheck_large_heads_without_fold():
    assert mha._FOLD_MAX_HEAD < 66
    embed = 2 * 66
    gradcheck(_core_fn(True, True, (3, 3), {}), *_core_arrays(True, True, (3, 3), 0.3, embed),
              rtol=1e-5, atol=1e-6)


def test_softmax_exp_shifts_only_out_of_range_matrices():
    moderate = np.array([[[1.0, 2.0], [0.5, -1.0]]], np.float32)
    huge = np.array([[[100.0, 99.0], [98.0, 97.0]], [[1.0, 2.0], [0.5, -1.0]]], np.float32)
    for scores in (moderate, huge):
        expected = np.exp(scores.astype(float) - scores.max(-1, keepdims=True))
        expected /= expected.sum(-1, keepdims=True)
        work = scores.copy()
        inv = mha.softmax_exp(work, None, None)
        np.testing.assert_allclose(work * inv, expected, rtol=1e-6)
    np.testing.assert_allclose(mha.softmax_exp(moderate.copy(), None, None),
                               1 / np.exp(moderate).sum(-1, keepdims=True), rtol=1e-6)  # unshifted
    work = huge.copy()
    mha.softmax_exp(work, None, None)
    assert work[0].max() == 1.0 and work[1].max() == 1.0  # each matrix shifted by its maximum


# --- encoder layers on the fused core and LayerNorm's row path ---------------------------------

ENCODER = [
    ("post_norm_time_major", {}, {}),
    ("pre_norm_batch_first", {"norm_first": True, "batch_first": True}, {}),
    ("post_norm_batch_first_masks", {"batch_first": True},
     {"mask": ~np.tril(np.ones((L, L), bool)),
      "src_key_padding_mask": np.array([[0, 0, 0, 1, 1], [0] * 5, [0, 1, 0, 0, 0]], bool)}),
    ("pre_norm_time_major_causal", {"norm_first": True},
     {"mask": ~np.tril(np.ones((L, L), bool)), "is_causal": True}),
]


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("name,opts,kwargs", ENCODER, ids=[c[0] for c in ENCODER])
def test_encoder_stack_matches_torch(name, opts, kwargs, dtype):
    d_model, nhead, ff = 16, 4, 24
    ref = torch.nn.TransformerEncoder(
        torch.nn.TransformerEncoderLayer(d_model, nhead, ff, dropout=0.0, **opts), 2,
        enable_nested_tensor=False).to(getattr(torch, dtype))
    ours = dp.nn.TransformerEncoder(
        dp.nn.TransformerEncoderLayer(d_model, nhead, ff, dropout=0.0, **opts, dtype=dtype), 2)
    ours.load_state_dict({k: v.detach().numpy() for k, v in ref.state_dict().items()})
    shape = (N, L, d_model) if opts.get("batch_first") else (L, N, d_model)
    x = rng.standard_normal(shape).astype(dtype)
    xd, xt = dp.tensor(x, requires_grad=True), torch.tensor(x, requires_grad=True)
    out, ref_out = ours(xd, **kwargs), ref(xt, **_torch_kw(kwargs))
    tol = TOL[dtype]
    np.testing.assert_allclose(out.numpy(), ref_out.detach().numpy(), **tol)
    g = rng.standard_normal(out.shape).astype(dtype)
    (out * dp.tensor(g)).sum().backward()
    (ref_out * torch.tensor(g)).sum().backward()
    np.testing.assert_allclose(xd.grad.numpy(), xt.grad.numpy(), **tol)
    ref_params = dict(ref.named_parameters())
    for pname, p in ours.named_parameters():
        np.testing.assert_allclose(p.grad.numpy(), ref_params[pname].grad.numpy(), **tol,
                                   err_msg=pname)


# name, input shape, normalized shape, weight, bias, input offset (float32 precision)
LAYERNORM = [
    ("rows_affine", (4, 3, 8), (8,), True, True, 0.0),
    ("rows_two_dims", (3, 2, 5), (2, 5), True, True, 0.0),
    ("rows_no_bias", (6, 7), (7,), True, False, 0.0),
    ("rows_bias_only", (6, 7), (7,), False, True, 0.0),
    ("rows_plain", (5, 4), (4,), False, False, 0.0),
    ("rows_large_mean", (16, 64), (64,), True, True, 1000.0),
    ("strided_input_axes_path", "transposed", (6,), True, True, 0.0),
]


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("name,shape,norm,weight,bias,offset", LAYERNORM,
                         ids=[c[0] for c in LAYERNORM])
def test_layer_norm_rows_match_torch(name, shape, norm, weight, bias, offset, dtype):
    """Against PyTorch in float64 on the same (float32-rounded) values: with a large mean,
    float32 LayerNorms lose digits to the input's own rounding (PyTorch's more than ours)."""
    strided = shape == "transposed"
    base = rng.standard_normal((6, 4, 3) if strided else shape) + offset
    base = base.astype(dtype)
    w = (1 + 0.5 * rng.standard_normal(norm)).astype(dtype) if weight else None
    b = rng.standard_normal(norm).astype(dtype) if bias else None
    xd = dp.tensor(base, requires_grad=True)
    wd = None if w is None else dp.tensor(w, requires_grad=True)
    bd = None if b is None else dp.tensor(b, requires_grad=True)
    xt = torch.tensor(base.astype(float), requires_grad=True)
    wt = None if w is None else torch.tensor(w.astype(float), requires_grad=True)
    bt = None if b is None else torch.tensor(b.astype(float), requires_grad=True)
    x_in, xt_in = (xd.permute(2, 1, 0), xt.permute(2, 1, 0)) if strided else (xd, xt)
    out = dp.nn.functional.layer_norm(x_in, norm, wd, bd)
    assert isinstance(out._ctx, LayerNormFn)
    assert out._ctx.rows == (not strided)  # the strided input takes the generic path
    ref = torch.nn.functional.layer_norm(xt_in, norm, wt, bt)
    tol = dict(rtol=1e-10, atol=1e-10)
    if dtype == "float32":
        tol = dict(rtol=1e-4, atol=2e-5 * max(1.0, offset / 10))
    assert out.dtype == np.dtype(dtype)
    np.testing.assert_allclose(out.numpy(), ref.detach().numpy(), **tol)
    g = rng.standard_normal(out.shape)
    out.backward(dp.tensor(g.astype(dtype)))
    ref.backward(torch.tensor(g))
    for ours_t, ref_t in ((xd, xt), (wd, wt), (bd, bt)):
        if ours_t is not None:
            assert ours_t.grad.dtype == np.dtype(dtype)
            np.testing.assert_allclose(ours_t.grad.numpy(), ref_t.grad.numpy(), **tol)


@pytest.mark.parametrize("weight,bias", [(True, True), (False, False), (False, True)])
def test_layer_norm_rows_gradcheck(weight, bias):
    args = [rng.standard_normal((3, 2, 5))]
    if weight:
        args.append(1 + rng.standard_normal(5))
    if bias:
        args.append(rng.standard_normal(5))

    def fn(x, *wb):
        w = wb[0] if weight else None
        b = wb[-1] if bias else None
        return dp.nn.functional.layer_norm(x, 5, w, b)

    gradcheck(fn, *args)


@pytest.mark.parametrize("strided", [False, True])
def test_layer_norm_with_residual_gradcheck(strided):
    """LayerNorm of x + residual in one op (the post-norm block): rows path and, for a strided
    x, the generic path; both inputs get the gradient."""
    def fn(x, r, w, b):
        if strided:
            x = x.permute(1, 0, 2)
        return LayerNormFn.apply(x, w, b, r, ndim=1, eps=1e-5)

    x = rng.standard_normal((2, 3, 5) if strided else (3, 2, 5))
    gradcheck(fn, x, rng.standard_normal((3, 2, 5)), 1 + rng.standard_normal(5),
              rng.standard_normal(5))


def test_layer_norm_with_residual_gives_each_leaf_its_own_gradient():
    x = dp.tensor(rng.standard_normal((3, 2, 5)), requires_grad=True)
    r = dp.tensor(rng.standard_normal((3, 2, 5)), requires_grad=True)
    LayerNormFn.apply(x, None, None, r, ndim=1, eps=1e-5).sum().backward()
    np.testing.assert_array_equal(x.grad.numpy(), r.grad.numpy())
    assert not np.shares_memory(x.grad.numpy(), r.grad.numpy())


def test_post_norm_layer_fuses_the_residual_add_unless_hooked():
    layer = dp.nn.TransformerEncoderLayer(8, 2, 12, dropout=0.0, dtype="float64")
    x = dp.tensor(rng.standard_normal((L, N, 8)), requires_grad=True)
    out = layer(x)
    assert isinstance(out._ctx, LayerNormFn) and out._ctx.has_residual
    seen = []
    layer.norm2.register_forward_hook(lambda m, args, o: seen.append(args[0].shape))
    hooked = layer(x)
    assert seen == [(L, N, 8)] and not hooked._ctx.has_residual
    np.testing.assert_allclose(hooked.numpy(), out.numpy(), rtol=1e-12, atol=1e-12)
