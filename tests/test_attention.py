"""Attention: scaled_dot_product_attention and MultiheadAttention against PyTorch, masks,
fully masked rows, gradchecks, dtypes and errors."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import distprop as dp
from distprop.nn import MultiheadAttention
from distprop.ops.attention import scaled_dot_product_attention as sdpa

from helpers import gradcheck

rng = np.random.default_rng(0)
TOL = {"float64": dict(rtol=1e-10, atol=1e-10), "float32": dict(rtol=1e-5, atol=1e-5)}


def _causal_bool(target, source):
    return np.tril(np.ones((target, source), dtype=bool))


# name, q/k/v shapes, keyword arguments (arrays are turned into masks on both sides)
SDPA_CASES = [
    ("plain", [(2, 3, 4, 5), (2, 3, 6, 5), (2, 3, 6, 7)], {}),
    ("three_d", [(3, 4, 5), (3, 4, 5), (3, 4, 2)], {}),
    ("broadcast_batch", [(2, 3, 4, 5), (1, 3, 6, 5), (1, 3, 6, 5)], {}),
    ("causal", [(2, 4, 5), (2, 4, 5), (2, 4, 5)], {"is_causal": True}),
    ("causal_rect", [(2, 3, 5), (2, 6, 5), (2, 6, 5)], {"is_causal": True}),
    ("float_mask", [(2, 4, 5), (2, 6, 5), (2, 6, 3)], {"attn_mask": rng.standard_normal((4, 6))}),
    ("bool_mask", [(2, 2, 4, 5), (2, 2, 6, 5), (2, 2, 6, 3)],
     {"attn_mask": rng.random((2, 1, 4, 6)) > 0.2}),
    ("scale", [(2, 4, 5), (2, 6, 5), (2, 6, 5)], {"scale": 0.3}),
]


def _torch_kwargs(kwargs):
    return {k: torch.tensor(v) if isinstance(v, np.ndarray) else v for k, v in kwargs.items()}


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("name,shapes,kwargs", SDPA_CASES, ids=[c[0] for c in SDPA_CASES])
def test_sdpa_matches_torch(name, shapes, kwargs, dtype):
    arrays = [rng.standard_normal(s).astype(dtype) for s in shapes]
    ours = [dp.tensor(a, requires_grad=True) for a in arrays]
    theirs = [torch.tensor(a, requires_grad=True) for a in arrays]
    kw = {k: v.astype(dtype) if isinstance(v, np.ndarray) and v.dtype.kind == "f" else v
          for k, v in kwargs.items()}
    out = dp.nn.functional.scaled_dot_product_attention(*ours, **kw)
    ref = F.scaled_dot_product_attention(*theirs, **_torch_kwargs(kw))
    assert out.dtype == np.dtype(dtype)
    np.testing.assert_allclose(out.numpy(), ref.detach().numpy(), **TOL[dtype])
    weights = rng.standard_normal(out.shape).astype(dtype)
    (out * dp.tensor(weights)).sum().backward()
    (ref * torch.tensor(weights)).sum().backward()
    for i, (a, b) in enumerate(zip(ours, theirs)):
        assert a.grad.dtype == np.dtype(dtype)
        np.testing.assert_allclose(a.grad.numpy(), b.grad.numpy(), **TOL[dtype],
                                   err_msg=f"gradient of input {i}")


@pytest.mark.parametrize("name,shapes,kwargs", SDPA_CASES, ids=[c[0] for c in SDPA_CASES])
def test_sdpa_gradcheck(name, shapes, kwargs):
    arrays = [rng.standard_normal(s) for s in shapes]
    gradcheck(lambda q, k, v: sdpa(q, k, v, **kwargs), *arrays)


def test_sdpa_fully_masked_rows_give_zero_output_and_gradient():
    q, k, v = (rng.standard_normal((2, 4, 3)) for _ in range(3))
    mask = np.ones((4, 4), dtype=bool)
    mask[1] = False  # query 1 may attend to nothing
    additive = np.where(mask, 0.0, -np.inf)
    for m in (mask, additive):
        ours = [dp.tensor(a, requires_grad=True) for a in (q, k, v)]
        out = sdpa(*ours, attn_mask=m)
        assert np.all(out.numpy()[:, 1] == 0)
        assert np.isfinite(out.numpy()).all()
        theirs = [torch.tensor(a, requires_grad=True) for a in (q, k, v)]
        ref = F.scaled_dot_product_attention(*theirs, attn_mask=torch.tensor(m))
        np.testing.assert_allclose(out.numpy(), ref.detach().numpy(), rtol=1e-10, atol=1e-12)
        out.sum().backward()
        ref.sum().backward()
        assert np.all(ours[0].grad.numpy()[:, 1] == 0)
        for a, b in zip(ours, theirs):
            assert np.isfinite(a.grad.numpy()).all()
            np.testing.assert_allclose(a.grad.numpy(), b.grad.numpy(), rtol=1e-10, atol=1e-12)
    gradcheck(lambda a, b, c: sdpa(a, b, c, attn_mask=mask), q, k, v)


def test_sdpa_extreme_scores_are_stable():
    q = np.full((1, 2, 3), 300.0, dtype=np.float32)
    k = np.full((1, 3, 3), 300.0, dtype=np.float32)
    out = sdpa(dp.tensor(q), dp.tensor(k), dp.tensor(np.ones((1, 3, 2), dtype=np.float32)))
    np.testing.assert_allclose(out.numpy(), 1.0)


def test_sdpa_dropout_zeroes_and_rescales():
    dp.manual_seed(1)
    q = k = dp.tensor(np.zeros((1, 200, 4)))
    v = dp.tensor(np.ones((1, 200, 1)))
    out = sdpa(q, k, v, dropout_p=0.5).numpy()
    assert abs(out.mean() - 1.0) < 0.1 and out.std() > 0.01


@pytest.mark.parametrize("kwargs,error,match", [
    ({"attn_mask": np.ones((4, 4), bool), "is_causal": True}, ValueError, "either attn_mask"),
    ({"attn_mask": np.ones((3, 5), bool)}, ValueError, r"does not broadcast .* \(2, 4, 4\)"),
    ({"attn_mask": np.ones((4, 4), int)}, TypeError, "bool or floating-point"),
    ({"dropout_p": 1.5}, ValueError, "dropout_p"),
])
def test_sdpa_errors(kwargs, error, match):
    x = dp.randn(2, 4, 3)
    with pytest.raises(error, match=match):
        sdpa(x, x, x, **kwargs)


def test_sdpa_refuses_integer_inputs():
    x = dp.tensor(np.ones((1, 2, 3), np.int64))
    with pytest.raises(TypeError, match="query must be floating-point, got dtype int64"):
        sdpa(x, x, x)


# --- MultiheadAttention -----------------------------------------------------------------------

E, HEADS, L, S, N = 8, 2, 4, 5, 3

# name, constructor options, call: "self" / "kv_same" / "cross", forward kwargs
MHA_CASES = [
    ("self", {}, "self", {}),
    ("self_no_weights", {}, "self", {"need_weights": False}),
    ("per_head_weights", {}, "self", {"average_attn_weights": False}),
    ("batch_first", {"batch_first": True}, "self", {}),
    ("no_bias", {"bias": False}, "self", {}),
    ("cross", {}, "cross", {}),
    ("key_is_value", {"batch_first": True}, "kv_same", {}),
    ("kdim_vdim", {"kdim": 3, "vdim": 6}, "cross", {}),
    ("bool_mask_2d", {}, "self", {"attn_mask": rng.random((L, L)) < 0.3}),
    ("float_mask_3d", {}, "cross", {"attn_mask": rng.standard_normal((N * HEADS, L, S))}),
    ("causal", {"batch_first": True}, "self",
     {"attn_mask": ~_causal_bool(L, L), "is_causal": True}),
    ("key_padding_bool", {}, "cross",
     {"key_padding_mask": np.array([[0, 0, 0, 1, 1], [0, 0, 0, 0, 0], [0, 1, 0, 0, 1]], bool)}),
    ("key_padding_float_and_mask", {"batch_first": True}, "self",
     {"key_padding_mask": rng.standard_normal((N, L)), "attn_mask": rng.standard_normal((L, L)),
      "average_attn_weights": False}),
    ("unbatched", {}, "cross", {"unbatched": True}),
]


def _mha_inputs(opts, call, unbatched, dtype):
    kdim, vdim = opts.get("kdim", E), opts.get("vdim", E)

    def shape(length, dim):
        if unbatched:
            return (length, dim)
        return (N, length, dim) if opts.get("batch_first") else (length, N, dim)

    if call == "self":
        return [rng.standard_normal(shape(L, E)).astype(dtype)]
    if call == "kv_same":
        return [rng.standard_normal(shape(L, E)).astype(dtype),
                rng.standard_normal(shape(S, E)).astype(dtype)]
    return [rng.standard_normal(shape(L, E)).astype(dtype),
            rng.standard_normal(shape(S, kdim)).astype(dtype),
            rng.standard_normal(shape(S, vdim)).astype(dtype)]


def _qkv(tensors, call):
    if call == "self":
        return tensors[0], tensors[0], tensors[0]
    if call == "kv_same":
        return tensors[0], tensors[1], tensors[1]
    return tuple(tensors)


def _mha_pair(opts, dtype):
    ref = torch.nn.MultiheadAttention(E, HEADS, **opts).to(getattr(torch, dtype))
    ours = MultiheadAttention(E, HEADS, **opts, dtype=dtype)
    ours.load_state_dict({k: v.detach().numpy() for k, v in ref.state_dict().items()})
    return ours, ref


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("name,opts,call,kwargs", MHA_CASES, ids=[c[0] for c in MHA_CASES])
def test_mha_matches_torch(name, opts, call, kwargs, dtype):
    ours, ref = _mha_pair(opts, dtype)
    assert list(ours.state_dict()) == list(ref.state_dict())
    kwargs = dict(kwargs)
    unbatched = kwargs.pop("unbatched", False)
    kw = {k: v.astype(dtype) if isinstance(v, np.ndarray) and v.dtype.kind == "f" else v
          for k, v in kwargs.items()}
    arrays = _mha_inputs(opts, call, unbatched, dtype)
    ours_in = [dp.tensor(a, requires_grad=True) for a in arrays]
    ref_in = [torch.tensor(a, requires_grad=True) for a in arrays]
    out, weights = ours(*_qkv(ours_in, call), **kw)
    ref_out, ref_weights = ref(*_qkv(ref_in, call), **_torch_kwargs(kw))
    tol = TOL[dtype]
    assert out.dtype == np.dtype(dtype)
    np.testing.assert_allclose(out.numpy(), ref_out.detach().numpy(), **tol)
    if ref_weights is None:
        assert weights is None
        loss, ref_loss = out.sum(), ref_out.sum()
    else:
        np.testing.assert_allclose(weights.numpy(), ref_weights.detach().numpy(), **tol)
        w = rng.standard_normal(weights.shape).astype(dtype)
        loss = out.sum() + (weights * dp.tensor(w)).sum()
        ref_loss = ref_out.sum() + (ref_weights * torch.tensor(w)).sum()
    loss.backward()
    ref_loss.backward()
    for i, (a, b) in enumerate(zip(ours_in, ref_in)):
        np.testing.assert_allclose(a.grad.numpy(), b.grad.numpy(), **tol, err_msg=f"input {i}")
    ref_params = dict(ref.named_parameters())
    for pname, p in ours.named_parameters():
        assert p.grad.dtype == np.dtype(dtype)
        np.testing.assert_allclose(p.grad.numpy(), ref_params[pname].grad.numpy(), **tol,
                                   err_msg=pname)


def test_mha_gradcheck_with_masks():
    model = MultiheadAttention(4, 2, dtype="float64")
    kpm = np.array([[False, False, True], [False, False, False]])
    mask = rng.standard_normal((3, 3))

    def fn(x):
        return model(x, x, x, key_padding_mask=kpm, attn_mask=mask)[0]

    gradcheck(fn, rng.standard_normal((3, 2, 4)))


def test_mha_is_causal_alone_builds_the_causal_mask():
    model = MultiheadAttention(E, HEADS, batch_first=True)
    x = dp.randn(N, L, E)
    implicit = model(x, x, x, is_causal=True)[0].numpy()
    explicit = model(x, x, x, attn_mask=~_causal_bool(L, L))[0].numpy()
    np.testing.assert_allclose(implicit, explicit)


def test_mha_fully_masked_query_gives_bias_output_and_zero_weights():
    ours, ref = _mha_pair({}, "float64")
    x = rng.standard_normal((L, N, E))
    kpm = np.zeros((N, L), dtype=bool)
    kpm[0] = True  # batch row 0: every key is padding
    xt = dp.tensor(x, requires_grad=True)
    out, weights = ours(xt, xt, xt, key_padding_mask=kpm)
    assert np.isfinite(out.numpy()).all() and np.isfinite(weights.numpy()).all()
    np.testing.assert_allclose(out.numpy()[:, 0], np.broadcast_to(ours.out_proj.bias.numpy(),
                                                                  (L, E)))
    assert np.all(weights.numpy()[0] == 0)
    ref_out, _ = ref(*(torch.tensor(x),) * 3, key_padding_mask=torch.tensor(kpm))
    np.testing.assert_allclose(out.numpy()[:, 1:], ref_out.detach().numpy()[:, 1:], rtol=1e-10)
    out.sum().backward()
    assert np.isfinite(xt.grad.numpy()).all()
    assert np.isfinite(ours.in_proj_weight.grad.numpy()).all()


def test_mha_init_and_parameter_names():
    model = MultiheadAttention(16, 4)
    ref = torch.nn.MultiheadAttention(16, 4)
    assert [(n, p.shape) for n, p in model.named_parameters()] == [
        (n, tuple(p.shape)) for n, p in ref.named_parameters()]
    assert np.all(model.in_proj_bias.numpy() == 0) and np.all(model.out_proj.bias.numpy() == 0)
    bound = np.sqrt(6 / (16 + 48))
    w = model.in_proj_weight.numpy()
    assert np.abs(w).max() <= bound and w.std() > bound / 3


def test_mha_dropout_only_in_training():
    model = MultiheadAttention(E, HEADS, dropout=0.5)
    x = dp.randn(L, N, E)
    train = model(x, x, x)[0].numpy()
    model.eval()
    first, second = model(x, x, x)[0].numpy(), model(x, x, x)[0].numpy()
    np.testing.assert_array_equal(first, second)
    assert not np.allclose(train, first)


@pytest.mark.parametrize("call,error,match", [
    (lambda m, x: m(x[..., :4], x, x), ValueError, r"expected query of shape \(L, N, E\)"),
    (lambda m, x: m(x, x, x, attn_mask=np.zeros((3, 3), bool)), ValueError,
     r"attn_mask must have shape \(4, 4\) or \(6, 4, 4\)"),
    (lambda m, x: m(x, x, x, key_padding_mask=np.zeros((4, 3), bool)), ValueError,
     r"key_padding_mask must have shape \(3, 4\)"),
    (lambda m, x: m(x, x[:, :2], x[:, :2]), ValueError, "different batch sizes"),
    (lambda m, x: m(x.double(), x.double(), x.double()), TypeError, "does not match"),
])
def test_mha_errors(call, error, match):
    model = MultiheadAttention(E, HEADS)
    with pytest.raises(error, match=match):
        call(model, dp.randn(L, N, E))


def test_mha_bad_construction():
    with pytest.raises(ValueError, match="divisible"):
        MultiheadAttention(10, 3)
    with pytest.raises(ValueError, match="add_bias_kv"):
        MultiheadAttention(8, 2, add_bias_kv=True)


# --- Transformer encoder ----------------------------------------------------------------------

D, NHEAD, FF = 8, 2, 12

# name, layer options, forward kwargs
ENCODER_CASES = [
    ("post_norm", {}, {}),
    ("pre_norm_gelu", {"norm_first": True, "activation": "gelu"}, {}),
    ("batch_first_callable", {"batch_first": True, "activation": F.silu}, {}),
    ("no_bias", {"bias": False}, {}),
    ("src_mask_bool", {}, {"mask": rng.random((L, L)) < 0.3}),
    ("causal", {"batch_first": True}, {"mask": ~_causal_bool(L, L), "is_causal": True}),
    ("key_padding", {"norm_first": True}, {
        "src_key_padding_mask": np.array([[0, 0, 1, 1], [0, 0, 0, 0], [0, 0, 0, 1]], bool)}),
    ("float_masks", {}, {"mask": rng.standard_normal((L, L)),
                         "src_key_padding_mask": rng.standard_normal((N, L))}),
]


def _dp_activation(act):
    return dp.nn.functional.silu if act is F.silu else act


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("name,opts,kwargs", ENCODER_CASES, ids=[c[0] for c in ENCODER_CASES])
def test_encoder_matches_torch(name, opts, kwargs, dtype):
    tdtype = getattr(torch, dtype)
    ref_layer = torch.nn.TransformerEncoderLayer(D, NHEAD, FF, dropout=0.0, **opts)
    ref = torch.nn.TransformerEncoder(ref_layer, 2, norm=torch.nn.LayerNorm(D),
                                      enable_nested_tensor=False).to(tdtype)
    ours_opts = dict(opts, activation=_dp_activation(opts.get("activation", "relu")))
    layer = dp.nn.TransformerEncoderLayer(D, NHEAD, FF, dropout=0.0, **ours_opts, dtype=dtype)
    ours = dp.nn.TransformerEncoder(layer, 2, norm=dp.nn.LayerNorm(D, dtype=dtype))
    assert list(ours.state_dict()) == list(ref.state_dict())
    ours.load_state_dict({k: v.detach().numpy() for k, v in ref.state_dict().items()})
    kw = {k: v.astype(dtype) if isinstance(v, np.ndarray) and v.dtype.kind == "f" else v
          for k, v in kwargs.items()}
    shape = (N, L, D) if opts.get("batch_first") else (L, N, D)
    x = rng.standard_normal(shape).astype(dtype)
    xd, xt = dp.tensor(x, requires_grad=True), torch.tensor(x, requires_grad=True)
    out, ref_out = ours(xd, **kw), ref(xt, **_torch_kwargs(kw))
    tol = TOL[dtype]
    assert out.dtype == np.dtype(dtype)
    np.testing.assert_allclose(out.numpy(), ref_out.detach().numpy(), **tol)
    w = rng.standard_normal(out.shape).astype(dtype)
    (out * dp.tensor(w)).sum().backward()
    (ref_out * torch.tensor(w)).sum().backward()
    np.testing.assert_allclose(xd.grad.numpy(), xt.grad.numpy(), **tol)
    ref_params = dict(ref.named_parameters())
    for pname, p in ours.named_parameters():
        assert p.grad.dtype == np.dtype(dtype)
        np.testing.assert_allclose(p.grad.numpy(), ref_params[pname].grad.numpy(), **tol,
                                   err_msg=pname)


def test_encoder_layer_submodules_and_eval_dropout_match_torch():
    ref = torch.nn.TransformerEncoderLayer(D, NHEAD, FF, dropout=0.3).double()
    ours = dp.nn.TransformerEncoderLayer(D, NHEAD, FF, dropout=0.3, dtype="float64")
    assert [n for n, _ in ours.named_children()] == [
        "self_attn", "linear1", "dropout", "linear2", "norm1", "norm2", "dropout1", "dropout2"]
    assert list(ours.state_dict()) == list(ref.state_dict())
    ours.load_state_dict({k: v.detach().numpy() for k, v in ref.state_dict().items()})
    x = rng.standard_normal((L, N, D))
    train = ours(dp.tensor(x)).numpy()
    ours.eval()
    ref.eval()
    with torch.no_grad():
        expected = ref(torch.tensor(x)).numpy()
    np.testing.assert_allclose(ours(dp.tensor(x)).numpy(), expected, rtol=1e-10, atol=1e-12)
    assert not np.allclose(train, expected)


def test_encoder_layers_are_independent_copies():
    layer = dp.nn.TransformerEncoderLayer(D, NHEAD, FF)
    enc = dp.nn.TransformerEncoder(layer, 2)
    w0, w1 = enc.layers[0].linear1.weight, enc.layers[1].linear1.weight
    assert w0 is not w1 and w0 is not layer.linear1.weight
    np.testing.assert_array_equal(w0.numpy(), w1.numpy())
    assert len(list(enc.parameters())) == 2 * len(list(layer.parameters()))


def test_encoder_bad_arguments():
    with pytest.raises(RuntimeError, match="relu/gelu"):
        dp.nn.TransformerEncoderLayer(D, NHEAD, activation="tanh")
    with pytest.raises(ValueError, match="num_layers"):
        dp.nn.TransformerEncoder(dp.nn.TransformerEncoderLayer(D, NHEAD), 0)


def test_encoder_layer_gradcheck():
    layer = dp.nn.TransformerEncoderLayer(4, 2, 6, dropout=0.0, activation="gelu",
                                          dtype="float64")
    mask = np.array([[False, True, True], [False, False, True], [False, False, False]])
    gradcheck(lambda x: layer(x, src_mask=mask), rng.standard_normal((3, 2, 4)))
