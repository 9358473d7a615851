"""Embedding: PyTorch oracle, scatter-add gradients, padding_idx, index validation."""

import numpy as np
import pytest
import torch

import distprop as dp
from distprop.nn import Embedding

from helpers import gradcheck

CASES = [
    ("plain", {}, np.array([[0, 3, 3], [5, 3, 0]])),
    ("padding", {"padding_idx": 3}, np.array([[0, 3, 3], [5, 3, 1]])),
    ("negative_padding", {"padding_idx": -1}, np.array([5, 5, 2, 4])),
    ("scalar_index", {}, np.array(2)),
]


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("name,options,indices", CASES, ids=[c[0] for c in CASES])
def test_matches_torch(name, options, indices, dtype):
    ref = torch.nn.Embedding(6, 4, **options).to(getattr(torch, dtype))
    ours = Embedding(6, 4, **options, dtype=dtype)
    ours.load_state_dict({k: v.detach().numpy() for k, v in ref.state_dict().items()})
    out = ours(dp.tensor(indices))
    ref_out = ref(torch.tensor(indices))
    assert out.dtype == np.dtype(dtype) and out.shape == tuple(ref_out.shape)
    np.testing.assert_array_equal(out.numpy(), ref_out.detach().numpy())
    weights = np.random.default_rng(0).standard_normal(out.shape).astype(dtype)
    (out * dp.tensor(weights)).sum().backward()
    (ref_out * torch.tensor(weights)).sum().backward()
    assert ours.weight.grad.dtype == np.dtype(dtype)
    np.testing.assert_allclose(ours.weight.grad.numpy(), ref.weight.grad.numpy(), rtol=1e-6,
                               atol=1e-6)


def test_init_is_standard_normal_with_zero_padding_row():
    emb = Embedding(2000, 16, padding_idx=7)
    w = emb.weight.numpy()
    assert np.all(w[7] == 0)
    assert abs(w.std() - 1) < 0.02 and abs(w.mean()) < 0.02


def test_gradcheck_functional():
    idx = np.array([[1, 1, 2], [0, 2, 2]])
    gradcheck(lambda w: dp.nn.functional.embedding(idx, w),
              np.random.default_rng(0).standard_normal((4, 3)))


@pytest.mark.parametrize("indices,error,match", [
    (np.array([0, 6]), IndexError, r"Embedding\(6, 4\): index 6 is out of range .* 0\.\.5"),
    (np.array([-1, 2]), IndexError, r"index -1 is out of range"),
    (np.array([0.0, 1.0]), TypeError, r"expected integer indices"),
])
def test_bad_indices_are_reported(indices, error, match):
    with pytest.raises(error, match=match):
        Embedding(6, 4)(dp.tensor(indices))


def test_from_pretrained_freezes_by_default():
    table = np.arange(12, dtype=np.float32).reshape(4, 3)
    emb = Embedding.from_pretrained(table)
    assert not emb.weight.requires_grad
    np.testing.assert_array_equal(emb(dp.tensor(np.array([3, 1]))).numpy(), table[[3, 1]])
    trainable = Embedding.from_pretrained(dp.tensor(table), freeze=False, padding_idx=0)
    trainable(dp.tensor(np.array([0, 1, 1]))).sum().backward()
    np.testing.assert_array_equal(trainable.weight.grad.numpy()[:, 0], [0, 2, 0, 0])


def test_bad_padding_idx():
    with pytest.raises(ValueError, match="padding_idx"):
        Embedding(4, 2, padding_idx=4)


def test_functional_embedding_needs_a_2d_weight():
    with pytest.raises(ValueError, match=r"weight must be 2-D .* got shape \(3,\)"):
        dp.nn.functional.embedding(dp.tensor([0]), dp.ones(3))
