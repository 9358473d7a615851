"""Linear with few rows (small per-rank batches): products in blocks under OpenBLAS's unpacked
size, the forward as (W @ x^T)^T, the one-row weight gradient as an outer product. Each must give
PyTorch's result, keep the dtype and return C-contiguous arrays; the table checks which path ran."""

import numpy as np
import pytest
import torch

import distprop as dp
from distprop.ops import _util, linalg

from helpers import gradcheck

# name, leading shape of x, in, out, bias, dtype, forward path, backward products in blocks
CASES = [
    ("one_row", (1,), 256, 512, True, np.float32, "left", 0),
    ("two_rows", (2,), 1024, 1024, True, np.float32, "blocks", 2),
    ("eight_rows", (8,), 512, 2048, True, np.float32, "blocks", 1),
    ("twelve_rows", (3, 4), 1024, 1024, False, np.float32, "blocks", 2),
    ("rows_16", (16,), 1024, 1024, True, np.float32, "left", 0),
    ("rows_at_limit", (6, 8), 256, 256, False, np.float32, "left", 0),
    ("rows_past_limit", (49,), 256, 256, True, np.float32, "plain", 0),
    ("small_weight", (8,), 16, 8, True, np.float32, "plain", 0),
    ("float64", (4,), 256, 300, True, np.float64, "left", 0),
    ("many_rows", (64, 4), 256, 256, True, np.float32, "plain", 0),
]


@pytest.fixture
def blocked(monkeypatch):
    """Records the operand shapes of every product blocked_gemm computed in blocks."""
    done = []
    original = _util.blocked_gemm

    def spy(a, b, out):
        result = original(a, b, out)
        if result:
            done.append((a.shape, b.shape))
        return result

    monkeypatch.setattr(linalg, "blocked_gemm", spy)
    return done


@pytest.mark.parametrize("name,lead,fin,fout,bias,dtype,path,backward_blocks", CASES,
                         ids=[c[0] for c in CASES])
def test_linear_matches_torch(name, lead, fin, fout, bias, dtype, path, backward_blocks,
                              blocked):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((*lead, fin)).astype(dtype)
    ref = torch.nn.Linear(fin, fout, bias=bias, dtype=torch.float64 if dtype == np.float64
                          else torch.float32)
    ours = dp.nn.Linear(fin, fout, bias=bias, dtype=dtype)
    ours.load_state_dict({k: v.detach().numpy() for k, v in ref.state_dict().items()})
    assert linalg._weight_on_the_left(x.reshape(-1, fin), ours.weight.numpy()) is (path != "plain")

    xt = torch.tensor(x, requires_grad=True)
    expected = ref(xt)
    xd = dp.tensor(x, requires_grad=True)
    got = ours(xd)
    assert len(blocked) == (path == "blocks")
    assert got.numpy().dtype == dtype and got.numpy().flags.c_contiguous
    tol = 1e-5 if dtype == np.float32 else 1e-12
    np.testing.assert_allclose(got.numpy(), expected.detach().numpy(), rtol=tol, atol=tol)

    w = rng.standard_normal(expected.shape).astype(dtype)
    expected.backward(torch.tensor(w))
    got.backward(dp.tensor(w))
    assert len(blocked) == (path == "blocks") + backward_blocks
    for ours_grad, their_grad in [(xd.grad, xt.grad), (ours.weight.grad, ref.weight.grad)] + (
            [(ours.bias.grad, ref.bias.grad)] if bias else []):
        assert ours_grad.numpy().dtype == dtype and ours_grad.numpy().flags.c_contiguous
        np.testing.assert_allclose(ours_grad.numpy(), their_grad.numpy(), rtol=tol,
                                   atol=tol * 10)


@pytest.mark.parametrize("rows", [1, 3, 6])
@pytest.mark.parametrize("bias", [True, False])
def test_few_row_paths_finite_differences(monkeypatch, rows, bias):
    """float64 finite differences with the thresholds scaled down to these sizes: forward and
    both gradient products in several blocks (the last one partial), or the weight-left forward
    and the outer product for one row."""
    monkeypatch.setattr(linalg, "_LEFT_MIN_WEIGHT", 1)
    monkeypatch.setattr(_util, "BLOCKED_DTYPES", (np.dtype(np.float64),))
    monkeypatch.setattr(_util, "SMALL_GEMM", 120)
    monkeypatch.setattr(_util, "MIN_BLOCK", 2)
    monkeypatch.setattr(_util, "MAX_BLOCK", 4)
    rng = np.random.default_rng(1)
    x, w, b = rng.standard_normal((rows, 7)), rng.standard_normal((9, 7)), rng.standard_normal(9)
    if rows > 1:  # all three products in blocks
        g = rng.standard_normal((rows, 9))
        for lhs, rhs in [(x, w.T), (g, w), (g.T, x)]:
            assert _util.blocked_gemm(lhs, rhs, np.empty((lhs.shape[0], rhs.shape[1])))
    if bias:
        gradcheck(lambda x, w, b: dp.nn.functional.linear(x, w, b), x, w, b)
    else:
        gradcheck(lambda x, w: dp.nn.functional.linear(x, w), x, w)
