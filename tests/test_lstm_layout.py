"""Small-batch recurrent products split into column blocks (issue 14): the block plan, LSTM and
GRU with blocked per-step products against PyTorch, and float64 finite differences."""

import numpy as np
import pytest
import torch
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

import distprop as dp
from distprop.nn import GRU, LSTM
from distprop.ops import _util
from distprop.ops._util import column_blocks

from helpers import recurrent_layer_gradcheck

# rows (batch), weight (depth, cols), dtype, expected block widths
PLANS = [
    (8, (256, 1024), "float32", [256] * 4),  # LSTM H=256 forward
    (8, (1024, 256), "float32", [64] * 4),  # LSTM H=256 backward
    (8, (512, 2048), "float32", [128] * 16),  # LSTM H=512 forward
    (8, (2048, 512), "float32", [512]),  # would need 32 wide blocks: one product
    (8, (256, 768), "float32", [256] * 3),  # GRU H=256 forward
    (4, (1024, 256), "float32", [128] * 2),
    (12, (1024, 256), "float32", [64] * 4),
    (16, (256, 1024), "float32", [1024]),  # batch above SMALL_ROWS
    (8, (128, 512), "float32", [512]),  # already under the unpacked size
    (8, (256, 1024), "float64", [1024]),  # float64: not blocked
    (8, (256, 1000), "float32", [256] * 3 + [232]),  # a partial last block
]


@pytest.mark.parametrize("rows,shape,dtype,widths", PLANS)
def test_column_block_plan(rows, shape, dtype, widths):
    rng = np.random.default_rng(0)
    weight = rng.standard_normal(shape).astype(dtype)
    out = np.zeros((rows, shape[1]), dtype=dtype)
    blocks = column_blocks(np, rows, weight, out)
    assert [w.shape[1] for w, _ in blocks] == widths
    lhs = rng.standard_normal((rows, shape[0])).astype(dtype)
    for w_block, out_block in blocks:
        assert np.shares_memory(w_block, weight) and np.shares_memory(out_block, out)
        np.matmul(lhs, w_block, out=out_block)
    np.testing.assert_allclose(out, lhs @ weight, rtol=1e-4, atol=1e-4)


@pytest.fixture
def block_counts(monkeypatch):
    """Records the number of blocks of every per-step product plan."""
    counts = []
    original = _util.column_blocks

    def spy(*args):
        blocks = original(*args)
        counts.append(len(blocks))
        return blocks

    monkeypatch.setattr(_util, "column_blocks", spy)
    return counts


# hidden 256 at batch 8: both per-step products are blocked (4 blocks each for LSTM)
CONFIGS = [
    ("plain", {}, {}),
    ("bidir_two_layers_batch_first_hx", {"num_layers": 2, "bidirectional": True,
                                         "batch_first": True}, {"hx": True}),
    ("lengths_bidir", {"bidirectional": True}, {"lengths": [4, 1, 3, 4, 2, 4, 3, 1]}),
    ("no_bias", {"bias": False}, {"hx": True}),
]


@pytest.mark.parametrize("name,options,fwd", CONFIGS, ids=[c[0] for c in CONFIGS])
@pytest.mark.parametrize("mode", ["lstm", "gru"])
def test_blocked_layers_match_torch(mode, name, options, fwd, block_counts):
    steps, batch, size, hidden = 4, 8, 5, 256
    ours_cls, torch_cls = (LSTM, torch.nn.LSTM) if mode == "lstm" else (GRU, torch.nn.GRU)
    torch.manual_seed(0)
    ref = torch_cls(size, hidden, **options)
    ours = ours_cls(size, hidden, **options)
    ours.load_state_dict({k: v.detach().numpy() for k, v in ref.state_dict().items()})
    bf = options.get("batch_first", False)
    rng = np.random.default_rng(1)
    x = rng.standard_normal((batch, steps, size) if bf else (steps, batch, size))
    x = x.astype(np.float32)
    xo, xt = dp.tensor(x, requires_grad=True), torch.tensor(x, requires_grad=True)
    layers = options.get("num_layers", 1) * (2 if options.get("bidirectional") else 1)
    hx = [rng.standard_normal((layers, batch, hidden)).astype(np.float32) * 0.5
          for _ in range(2 if mode == "lstm" else 1)]
    hx_ours = [dp.tensor(h, requires_grad=True) for h in hx]
    hx_ref = [torch.tensor(h, requires_grad=True) for h in hx]
    use_hx = fwd.get("hx", False)

    def pick(states):
        return tuple(states) if mode == "lstm" else states[0]

    lengths = fwd.get("lengths")
    out, state = ours(xo, pick(hx_ours) if use_hx else None, lengths=lengths)
    ref_in = xt
    if lengths is not None:
        ref_in = pack_padded_sequence(xt, lengths, batch_first=bf, enforce_sorted=False)
    ref_out, ref_state = ref(ref_in, pick(hx_ref) if use_hx else None)
    if lengths is not None:
        ref_out, _ = pad_packed_sequence(ref_out, batch_first=bf, total_length=steps)
    assert max(block_counts) > 1, "the blocked products were not used"
    ours_all = [out] + (list(state) if mode == "lstm" else [state])
    ref_all = [ref_out] + (list(ref_state) if mode == "lstm" else [ref_state])
    weights = [rng.standard_normal(t.shape).astype(np.float32) for t in ours_all]
    sum((t * dp.tensor(w)).sum() for t, w in zip(ours_all, weights)).backward()
    sum((t * torch.tensor(w)).sum() for t, w in zip(ref_all, weights)).backward()
    tol = dict(rtol=1e-4, atol=1e-5)
    for got, want in zip(ours_all, ref_all):
        np.testing.assert_allclose(got.numpy(), want.detach().numpy(), **tol)
    np.testing.assert_allclose(xo.grad.numpy(), xt.grad.numpy(), **tol)
    if use_hx:
        for got, want in zip(hx_ours, hx_ref):
            np.testing.assert_allclose(got.grad.numpy(), want.grad.numpy(), **tol)
    ref_params = dict(ref.named_parameters())
    for pname, p in ours.named_parameters():
        assert p.grad.dtype == np.float32
        np.testing.assert_allclose(p.grad.numpy(), ref_params[pname].grad.numpy(), rtol=1e-4,
                                   atol=1e-4, err_msg=pname)


@pytest.mark.parametrize("reverse,lengths", [(False, None), (True, [3, 1])])
@pytest.mark.parametrize("mode,hidden", [("lstm", 17), ("gru", 22)])
def test_blocked_layer_gradcheck(mode, hidden, reverse, lengths, monkeypatch, block_counts):
    """float64 finite differences with the block plan scaled down to these sizes: forward and
    backward products in several blocks, the last one partial."""
    monkeypatch.setattr(_util, "BLOCKED_DTYPES", (np.dtype(np.float64),))
    monkeypatch.setattr(_util, "SMALL_GEMM", 1200)
    monkeypatch.setattr(_util, "MIN_BLOCK", 8)
    recurrent_layer_gradcheck(mode, hidden, reverse, lengths)
    assert min(block_counts) >= 3, block_counts  # forward and backward plans both blocked
