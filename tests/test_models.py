"""The model zoo: architectures and sizes of BENCHMARKS.md, inputs, errors, one training step."""

import numpy as np
import pytest
import torch

import distprop as dp
from distprop import models

from helpers import copy_torch_to_dp

PARAMS = {"mlp": 1_863_690, "cnn": 225_034, "wide": 25_185_290}


@pytest.mark.parametrize("name", ["mlp", "cnn", "wide"])
def test_zoo_models_build_with_documented_sizes(name):
    model = models.build_model(name)
    assert sum(p.numel() for p in model.parameters()) == PARAMS[name]
    assert all(p.dtype == np.float32 for p in model.parameters())
    x, y = models.sample_batch(name, 3)
    assert x.shape == (3, *models.input_shape(name)) and x.dtype == np.float32
    assert y.shape == (3,) and y.dtype == np.int64 and 0 <= y.numpy().min() <= 9
    with dp.no_grad():
        assert model(x).shape == (3, 10)


def test_registry_entries_describe_the_benchmark_workloads():
    assert {"mlp", "cnn", "wide"} <= set(models.MODELS)
    assert models.batch_size("mlp") == 256 and models.batch_size("cnn") == 64
    assert models.batch_size("wide") == 32
    assert models.input_shape("cnn") == (1, 28, 28)
    assert models.model_names() == sorted(models.MODELS)
    assert isinstance(models.MODELS["mlp"](), dp.nn.Module)  # a spec is its own builder


def test_unknown_model_lists_valid_names():
    with pytest.raises(ValueError, match=r"unknown model 'resnet'.*cnn.*mlp.*wide"):
        models.build_model("resnet")
    with pytest.raises(ValueError, match="valid names"):
        models.input_shape("nope")


def test_build_options_and_reproducible_batches():
    dp.manual_seed(1)
    a = models.build_model("cnn", dtype=dp.float64, num_classes=4)
    dp.manual_seed(1)
    b = models.build_model("cnn", dtype=dp.float64, num_classes=4)
    assert a[0].weight.dtype == np.float64
    np.testing.assert_array_equal(a[0].weight.numpy(), b[0].weight.numpy())
    x1, y1 = models.sample_batch("cnn", 5, seed=7, dtype=np.float64)
    x2, y2 = models.sample_batch("cnn", 5, seed=7, dtype=np.float64)
    np.testing.assert_array_equal(x1.numpy(), x2.numpy())
    np.testing.assert_array_equal(y1.numpy(), y2.numpy())
    assert a(x1).shape == (5, 4)
    with pytest.raises(ValueError, match="batch"):
        models.sample_batch("mlp", 0)


def _torch_cnn():
    tnn = torch.nn
    return tnn.Sequential(tnn.Conv2d(1, 32, 3), tnn.ReLU(), tnn.MaxPool2d(2),
                          tnn.Conv2d(32, 64, 3), tnn.ReLU(), tnn.MaxPool2d(2), tnn.Flatten(),
                          tnn.Linear(1600, 128), tnn.ReLU(), tnn.Linear(128, 10))


def test_cnn_sgd_steps_match_torch_with_flat_buffers():
    """Two SGD-momentum steps of the zoo cnn (flat parameter/gradient buffers) vs PyTorch."""
    ours = models.build_model("cnn", dtype=dp.float64)
    theirs = _torch_cnn().double()
    copy_torch_to_dp(theirs, ours)
    opt = dp.optim.SGD(ours.parameters(), lr=0.1, momentum=0.9)
    topt = torch.optim.SGD(theirs.parameters(), lr=0.1, momentum=0.9)
    x, y = models.sample_batch("cnn", 8, dtype=np.float64, seed=3)
    tx, ty = torch.from_numpy(x.numpy()), torch.from_numpy(y.numpy())
    for _ in range(2):
        opt.zero_grad()
        topt.zero_grad()
        loss = dp.nn.CrossEntropyLoss()(ours(x), y)
        tloss = torch.nn.CrossEntropyLoss()(theirs(tx), ty)
        loss.backward()
        tloss.backward()
        opt.step()
        topt.step()
        np.testing.assert_allclose(loss.item(), tloss.item(), rtol=1e-10)
    state = theirs.state_dict()
    for name, p in ours.state_dict().items():
        np.testing.assert_allclose(p.numpy(), state[name].numpy(), rtol=1e-9, atol=1e-12,
                                   err_msg=name)


def test_tied_linear_weight_accumulates_into_flat_buffer():
    """A weight used twice: the first gradient lands in the flat buffer, the second adds."""
    lin = dp.nn.Linear(4, 4).double()
    twin = dp.nn.Linear(4, 4).double()
    twin.load_state_dict(lin.state_dict())
    dp.optim.SGD(lin.parameters(), lr=0.1)  # flattens lin's parameters
    x = dp.randn(3, 4, dtype=dp.float64)
    lin(lin(x)).sum().backward()
    twin(twin(x)).sum().backward()
    assert lin.weight.grad.data is lin.weight._grad_buffer
    np.testing.assert_allclose(lin.weight.grad.numpy(), twin.weight.grad.numpy(), rtol=1e-12)
