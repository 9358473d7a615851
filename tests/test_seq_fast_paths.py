"""The sequence layers' fast paths (issue 14): the blocked transposed recurrent weight of
LSTM/GRU at sizes spanning several blocks, and attention's two scale placements (on q when
E < S, on the scores otherwise), against PyTorch and float64 finite differences."""

import numpy as np
import pytest
import torch

import distprop as dp
from distprop.nn import GRU, LSTM, MultiheadAttention
from distprop.ops.attention import ScaledDotProductAttention
from distprop.ops.rnn import _padded_copy, _scaled_transpose

from helpers import gradcheck, recurrent_layer_gradcheck

TOL = {"float64": dict(rtol=1e-10, atol=1e-10), "float32": dict(rtol=2e-5, atol=2e-5)}


@pytest.mark.parametrize("rows,cols", [(1, 3), (64, 5), (65, 7), (200, 40), (256, 9),
                                       (512, 3)])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_scaled_transpose_is_the_scaled_transpose(rows, cols, dtype):
    rng = np.random.default_rng(rows)
    w = rng.standard_normal((rows, cols)).astype(dtype)
    s = rng.standard_normal(rows).astype(dtype)
    got = _scaled_transpose(np, w, s)
    size = np.dtype(dtype).itemsize
    assert got.dtype == np.dtype(dtype) and got.strides[1] == size
    # rows of a multiple of 1 KiB get 64 bytes of padding (cache-set conflicts), others none
    pad = 64 if (rows * size) % 1024 == 0 else 0
    assert got.strides[0] == rows * size + pad
    np.testing.assert_array_equal(got, (w * s[:, None]).T)


def test_padded_copy_keeps_values_and_pads_kib_rows():
    w = np.arange(64 * 256, dtype=np.float32).reshape(64, 256)
    got = _padded_copy(np, w)
    assert got.strides == ((256 + 16) * 4, 4)
    np.testing.assert_array_equal(got, w)


# hidden 40: 160 (LSTM) / 120 (GRU) weight rows, i.e. two full 64-row blocks and a partial one
RNN_CONFIGS = [
    ("plain", {}, None),
    ("bidir_two_layers_batch_first", {"num_layers": 2, "bidirectional": True,
                                      "batch_first": True}, None),
    ("lengths_bidir", {"bidirectional": True}, [5, 2, 4]),
    ("two_layers_no_dropout_train", {"num_layers": 2, "dropout": 0.0}, [3, 5, 1]),
]


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("name,options,lengths", RNN_CONFIGS, ids=[c[0] for c in RNN_CONFIGS])
@pytest.mark.parametrize("mode", ["lstm", "gru"])
def test_wide_recurrent_layers_match_torch(mode, name, options, lengths, dtype):
    from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

    ours_cls, torch_cls = (LSTM, torch.nn.LSTM) if mode == "lstm" else (GRU, torch.nn.GRU)
    ref = torch_cls(7, 40, **options).to(getattr(torch, dtype))
    ours = ours_cls(7, 40, **options, dtype=dtype)
    ours.load_state_dict({k: v.detach().numpy() for k, v in ref.state_dict().items()})
    bf = options.get("batch_first", False)
    x = np.random.default_rng(1).standard_normal((3, 5, 7) if bf else (5, 3, 7)).astype(dtype)
    xo, xt = dp.tensor(x, requires_grad=True), torch.tensor(x, requires_grad=True)
    out, _ = ours(xo, lengths=lengths)
    if lengths is None:
        ref_out, _ = ref(xt)
    else:
        packed = pack_padded_sequence(xt, lengths, batch_first=bf, enforce_sorted=False)
        ref_out, _ = pad_packed_sequence(ref(packed)[0], batch_first=bf, total_length=5)
    np.testing.assert_allclose(out.numpy(), ref_out.detach().numpy(), **TOL[dtype])
    w = np.random.default_rng(2).standard_normal(out.shape).astype(dtype)
    (out * dp.tensor(w)).sum().backward()
    (ref_out * torch.tensor(w)).sum().backward()
    np.testing.assert_allclose(xo.grad.numpy(), xt.grad.numpy(), **TOL[dtype])
    ref_params = dict(ref.named_parameters())
    for pname, p in ours.named_parameters():
        assert p.grad.dtype == np.dtype(dtype)
        np.testing.assert_allclose(p.grad.numpy(), ref_params[pname].grad.numpy(),
                                   **TOL[dtype], err_msg=pname)


@pytest.mark.parametrize("mode,hidden", [("lstm", 17), ("gru", 22)])
def test_wide_recurrent_layer_gradcheck(mode, hidden):
    """68 / 66 weight rows: the transposed copy spans two blocks; reverse, ragged lengths."""
    recurrent_layer_gradcheck(mode, hidden, reverse=True, lengths=[3, 1])


# (L, S, E): E < S puts the scale on q, E >= S on the scores
ATTN_SHAPES = [(4, 6, 3), (5, 3, 4)]


@pytest.mark.parametrize("need_weights", [False, True], ids=["out", "out_and_weights"])
@pytest.mark.parametrize("target,source,embed", ATTN_SHAPES, ids=["scale_on_q", "scale_on_scores"])
def test_attention_scale_placements_gradcheck(target, source, embed, need_weights):
    rng = np.random.default_rng(3)
    q = rng.standard_normal((2, 2, target, embed))
    k = rng.standard_normal((2, 2, source, embed))
    v = rng.standard_normal((2, 2, source, 3))
    bias = np.where(rng.random((2, 1, target, source)) > 0.3, 0.0, -np.inf)
    bias[0, 0, 1] = -np.inf  # a fully masked row: zero output, zero gradient

    def fn(q, k, v):
        result = ScaledDotProductAttention.apply(q, k, v, bias=bias, scale=0.7,
                                                 need_weights=need_weights)
        if not need_weights:
            return result
        return dp.cat([result[0].reshape(-1), result[1].reshape(-1)])

    gradcheck(fn, q, k, v)


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("target,source,embed", ATTN_SHAPES, ids=["scale_on_q", "scale_on_scores"])
def test_mha_scale_placements_match_torch(target, source, embed, dtype):
    heads = 1  # head_dim = embed, so E vs S decides the placement
    ref = torch.nn.MultiheadAttention(embed, heads, batch_first=True).to(getattr(torch, dtype))
    ours = MultiheadAttention(embed, heads, batch_first=True, dtype=dtype)
    ours.load_state_dict({k: v.detach().numpy() for k, v in ref.state_dict().items()})
    rng = np.random.default_rng(4)
    arrays = [rng.standard_normal((2, n, embed)).astype(dtype) for n in (target, source, source)]
    pad = np.zeros((2, source), dtype=bool)
    pad[1, -1] = True
    ours_in = [dp.tensor(a, requires_grad=True) for a in arrays]
    ref_in = [torch.tensor(a, requires_grad=True) for a in arrays]
    out, w = ours(*ours_in, key_padding_mask=pad)
    ref_out, ref_w = ref(*ref_in, key_padding_mask=torch.tensor(pad))
    np.testing.assert_allclose(out.numpy(), ref_out.detach().numpy(), **TOL[dtype])
    np.testing.assert_allclose(w.numpy(), ref_w.detach().numpy(), **TOL[dtype])
    g = rng.standard_normal(out.shape).astype(dtype)
    gw = rng.standard_normal(w.shape).astype(dtype)
    ((out * dp.tensor(g)).sum() + (w * dp.tensor(gw)).sum()).backward()
    ((ref_out * torch.tensor(g)).sum() + (ref_w * torch.tensor(gw)).sum()).backward()
    for a, b in zip(ours_in, ref_in):
        np.testing.assert_allclose(a.grad.numpy(), b.grad.numpy(), **TOL[dtype])
