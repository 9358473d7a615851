"""Linear's forward for few rows runs as (W @ x^T)^T (OpenBLAS packs a transposed right operand
slowly); it must give PyTorch's result, keep the dtype and return a C-contiguous array."""

import numpy as np
import pytest
import torch

import distprop as dp
from distprop.ops import linalg

from helpers import gradcheck

# name, leading shape of x, in features, out features, bias, dtype, takes the weight-left path
CASES = [
    ("one_row", (1,), 256, 512, True, np.float32, True),
    ("eight_rows", (8,), 512, 256, True, np.float32, True),
    ("rows_at_limit", (6, 8), 256, 256, False, np.float32, True),
    ("rows_past_limit", (49,), 256, 256, True, np.float32, False),
    ("small_weight", (8,), 16, 8, True, np.float32, False),
    ("float64", (4,), 256, 300, True, np.float64, True),
    ("many_rows", (64, 4), 256, 256, True, np.float32, False),
]


@pytest.mark.parametrize("name,lead,fin,fout,bias,dtype,left", CASES, ids=[c[0] for c in CASES])
def test_linear_matches_torch(name, lead, fin, fout, bias, dtype, left):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((*lead, fin)).astype(dtype)
    ref = torch.nn.Linear(fin, fout, bias=bias, dtype=torch.float64 if dtype == np.float64
                          else torch.float32)
    ours = dp.nn.Linear(fin, fout, bias=bias, dtype=dtype)
    ours.load_state_dict({k: v.detach().numpy() for k, v in ref.state_dict().items()})
    assert linalg._weight_on_the_left(x.reshape(-1, fin), ours.weight.numpy()) is left

    xt = torch.tensor(x, requires_grad=True)
    expected = ref(xt)
    xd = dp.tensor(x, requires_grad=True)
    got = ours(xd)
    assert got.numpy().dtype == dtype and got.numpy().flags.c_contiguous
    tol = 1e-5 if dtype == np.float32 else 1e-12
    np.testing.assert_allclose(got.numpy(), expected.detach().numpy(), rtol=tol, atol=tol)

    w = rng.standard_normal(expected.shape).astype(dtype)
    expected.backward(torch.tensor(w))
    got.backward(dp.tensor(w))
    np.testing.assert_allclose(xd.grad.numpy(), xt.grad.numpy(), rtol=tol, atol=tol)
    np.testing.assert_allclose(ours.weight.grad.numpy(), ref.weight.grad.numpy(), rtol=tol,
                               atol=tol * 10)
    if bias:
        np.testing.assert_allclose(ours.bias.grad.numpy(), ref.bias.grad.numpy(), rtol=tol,
                                   atol=tol * 10)


@pytest.mark.parametrize("bias", [True, False])
def test_weight_left_path_finite_differences(monkeypatch, bias):
    monkeypatch.setattr(linalg, "_LEFT_MIN_WEIGHT", 1)
    rng = np.random.default_rng(1)
    x, w, b = rng.standard_normal((3, 5)), rng.standard_normal((4, 5)), rng.standard_normal(4)
    assert linalg._weight_on_the_left(x, w)
    if bias:
        gradcheck(lambda x, w, b: dp.nn.functional.linear(x, w, b), x, w, b)
    else:
        gradcheck(lambda x, w: dp.nn.functional.linear(x, w), x, w)
