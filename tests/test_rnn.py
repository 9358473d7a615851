"""RNN, LSTM, GRU: PyTorch oracle on the same weights, BPTT gradchecks, lengths, errors."""

import numpy as np
import pytest
import torch
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

import distprop as dp
from distprop.nn.rnn import GRU, LSTM, RNN
from distprop.ops.rnn import GRULayer, LSTMLayer, RNNLayer

from helpers import gradcheck

MODES = {
    "rnn_tanh": (RNN, torch.nn.RNN, {}),
    "rnn_relu": (RNN, torch.nn.RNN, {"nonlinearity": "relu"}),
    "lstm": (LSTM, torch.nn.LSTM, {}),
    "gru": (GRU, torch.nn.GRU, {}),
}

# name, constructor options, forward options (hx: pass initial states, lengths: ragged batch)
CONFIGS = [
    ("default", {}, {}),
    ("two_layers", {"num_layers": 2}, {}),
    ("bidirectional", {"bidirectional": True}, {}),
    ("deep_bidir_batch_first", {"num_layers": 2, "bidirectional": True, "batch_first": True},
     {"hx": True}),
    ("batch_first_hx", {"batch_first": True}, {"hx": True}),
    ("no_bias", {"bias": False, "num_layers": 2}, {"hx": True}),
    ("lengths", {}, {"lengths": [5, 2, 4]}),
    ("lengths_bidir_hx", {"num_layers": 2, "bidirectional": True}, {"lengths": [3, 5, 1],
                                                                    "hx": True}),
    ("lengths_batch_first", {"batch_first": True, "bidirectional": True},
     {"lengths": [2, 5, 5]}),
    ("unbatched", {"num_layers": 2, "bidirectional": True}, {"unbatched": True, "hx": True}),
]

STEPS, BATCH, INPUT, HIDDEN = 5, 3, 4, 6
TOL = {"float64": dict(rtol=1e-10, atol=1e-10), "float32": dict(rtol=1e-5, atol=1e-5)}


def build(mode, options, dtype):
    ours_cls, torch_cls, extra = MODES[mode]
    ref = torch_cls(INPUT, HIDDEN, **extra, **options).to(getattr(torch, dtype))
    ours = ours_cls(INPUT, HIDDEN, **extra, **options, dtype=dtype)
    ours.load_state_dict({k: v.detach().numpy() for k, v in ref.state_dict().items()})
    return ours, ref


def run_both(mode, options, fwd, dtype):
    """Forward and backward through both frameworks on the same data; returns both sides."""
    ours, ref = build(mode, options, dtype)
    rng = np.random.default_rng(3)
    layers = options.get("num_layers", 1) * (2 if options.get("bidirectional") else 1)
    unbatched = fwd.get("unbatched", False)
    if unbatched:
        x = rng.standard_normal((STEPS, INPUT))
        state_shape = (layers, HIDDEN)
    else:
        shape = (BATCH, STEPS, INPUT) if options.get("batch_first") else (STEPS, BATCH, INPUT)
        x = rng.standard_normal(shape)
        state_shape = (layers, BATCH, HIDDEN)
    arrays = [x.astype(dtype)]
    if fwd.get("hx"):
        arrays += [rng.standard_normal(state_shape).astype(dtype)
                   for _ in range(2 if mode == "lstm" else 1)]
    ours_in = [dp.tensor(a, requires_grad=True) for a in arrays]
    ref_in = [torch.tensor(a, requires_grad=True) for a in arrays]
    hx_ours = hx_ref = None
    if len(arrays) > 1:
        hx_ours = tuple(ours_in[1:]) if mode == "lstm" else ours_in[1]
        hx_ref = tuple(ref_in[1:]) if mode == "lstm" else ref_in[1]
    lengths = fwd.get("lengths")
    out, state = ours(ours_in[0], hx_ours, lengths=lengths)
    if lengths is None:
        ref_out, ref_state = ref(ref_in[0], hx_ref)
    else:
        bf = options.get("batch_first", False)
        packed = pack_padded_sequence(ref_in[0], lengths, batch_first=bf, enforce_sorted=False)
        ref_out, ref_state = ref(packed, hx_ref)
        ref_out, _ = pad_packed_sequence(ref_out, batch_first=bf, total_length=STEPS)
    ours_all = [out] + (list(state) if mode == "lstm" else [state])
    ref_all = [ref_out] + (list(ref_state) if mode == "lstm" else [ref_state])
    weights = [np.random.default_rng(i).standard_normal(t.shape).astype(dtype)
               for i, t in enumerate(ours_all)]
    loss = sum((t * dp.tensor(w)).sum() for t, w in zip(ours_all, weights))
    ref_loss = sum((t * torch.tensor(w)).sum() for t, w in zip(ref_all, weights))
    loss.backward()
    ref_loss.backward()
    return ours, ref, ours_in, ref_in, ours_all, ref_all


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("name,options,fwd", CONFIGS, ids=[c[0] for c in CONFIGS])
@pytest.mark.parametrize("mode", list(MODES))
def test_matches_torch(mode, name, options, fwd, dtype):
    ours, ref, ours_in, ref_in, ours_all, ref_all = run_both(mode, options, fwd, dtype)
    tol = TOL[dtype]
    for got, want in zip(ours_all, ref_all):
        assert got.dtype == np.dtype(dtype)
        assert got.shape == tuple(want.shape)
        np.testing.assert_allclose(got.numpy(), want.detach().numpy(), **tol)
    for i, (got, want) in enumerate(zip(ours_in, ref_in)):
        assert got.grad.dtype == np.dtype(dtype)
        np.testing.assert_allclose(got.grad.numpy(), want.grad.numpy(), **tol,
                                   err_msg=f"gradient of input {i}")
    ref_params = dict(ref.named_parameters())
    assert [n for n, _ in ours.named_parameters()] == list(ref_params)
    for pname, p in ours.named_parameters():
        assert p.grad.dtype == np.dtype(dtype)
        np.testing.assert_allclose(p.grad.numpy(), ref_params[pname].grad.numpy(), **tol,
                                   err_msg=f"gradient of {pname}")


def _layer_fn(mode, reverse, lengths):
    """A function of (x, h0, [c0], weights...) returning every output flattened into one."""

    def fn(*tensors):
        kw = {"reverse": reverse, "lengths": lengths}
        if mode == "lstm":
            outs = LSTMLayer.apply(*tensors, **kw)
        elif mode == "gru":
            outs = GRULayer.apply(*tensors, **kw)
        else:
            outs = RNNLayer.apply(*tensors, nonlinearity=mode.split("_")[1], **kw)
        return dp.cat([o.reshape(-1) for o in outs])

    return fn


@pytest.mark.parametrize("lengths", [None, np.array([3, 1])], ids=["full", "lengths"])
@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "reverse"])
@pytest.mark.parametrize("mode", list(MODES))
def test_gradcheck(mode, reverse, lengths):
    rng = np.random.default_rng(0)
    steps, batch, size, hidden = 3, 2, 2, 3
    gates = {"lstm": 4, "gru": 3}.get(mode, 1) * hidden
    arrays = [rng.standard_normal((steps, batch, size)), rng.standard_normal((batch, hidden))]
    if mode == "lstm":
        arrays.append(rng.standard_normal((batch, hidden)))
    arrays += [rng.standard_normal((gates, size)) * 0.5, rng.standard_normal((gates, hidden)) * 0.5,
               rng.standard_normal(gates) * 0.5, rng.standard_normal(gates) * 0.5]
    if mode == "rnn_relu":  # keep pre-activations away from the kink at zero
        arrays[0] = np.abs(arrays[0])
        arrays[-2] = np.abs(arrays[-2]) + 0.5
    gradcheck(_layer_fn(mode, reverse, lengths), *arrays)


@pytest.mark.parametrize("mode", list(MODES))
def test_long_sequence_backprops(mode):
    ours_cls, _, extra = MODES[mode]
    model = ours_cls(4, 8, **extra)
    x = dp.randn(200, 2, 4, requires_grad=True)
    out, _ = model(x)
    out.sum().backward()
    assert out.shape == (200, 2, 8)
    assert out.dtype == np.float32 and x.grad.dtype == np.float32
    assert np.isfinite(x.grad.numpy()).all()
    assert all(p.grad is not None and p.grad.dtype == np.float32 for p in model.parameters())


def test_truncated_bptt_with_detach_matches_torch():
    ref = torch.nn.LSTM(3, 4, batch_first=True).double()
    ours = LSTM(3, 4, batch_first=True, dtype="float64")
    ours.load_state_dict({k: v.detach().numpy() for k, v in ref.state_dict().items()})
    x = np.random.default_rng(0).standard_normal((2, 12, 3))
    state, ref_state = None, None
    for chunk in range(3):
        piece = x[:, 4 * chunk: 4 * chunk + 4]
        out, state = ours(dp.tensor(piece), state)
        ref_out, ref_state = ref(torch.tensor(piece), ref_state)
        out.sum().backward()
        ref_out.sum().backward()
        state = tuple(s.detach() for s in state)
        ref_state = tuple(s.detach() for s in ref_state)
    for (name, p), rp in zip(ours.named_parameters(), ref.parameters()):
        np.testing.assert_allclose(p.grad.numpy(), rp.grad.numpy(), rtol=1e-10, atol=1e-12,
                                   err_msg=name)


def test_padded_steps_do_not_change_state_or_get_gradient():
    model = GRU(3, 4, batch_first=True)
    x = dp.randn(2, 6, 3, requires_grad=True)
    out, h_n = model(x, lengths=[6, 2])
    short, h_short = model(dp.tensor(x.numpy()[1:, :2]))
    np.testing.assert_allclose(h_n.numpy()[0, 1], h_short.numpy()[0, 0], rtol=1e-6)
    assert np.all(out.numpy()[1, 2:] == 0)
    (out.sum() + h_n.sum()).backward()
    assert np.all(x.grad.numpy()[1, 2:] == 0)
    assert np.any(x.grad.numpy()[1, :2] != 0)


def test_parameter_names_shapes_and_init():
    model = LSTM(5, 7, num_layers=2, bidirectional=True)
    ref = torch.nn.LSTM(5, 7, num_layers=2, bidirectional=True)
    assert [(n, p.shape) for n, p in model.named_parameters()] == [
        (n, tuple(p.shape)) for n, p in ref.named_parameters()]
    bound = 1 / np.sqrt(7)
    for p in model.parameters():
        assert p.dtype == np.float32
        assert np.abs(p.numpy()).max() <= bound
        assert p.numpy().std() > bound / 4


def test_dropout_between_layers_only_in_training():
    ref = torch.nn.GRU(3, 4, num_layers=2, dropout=0.5).double()
    model = GRU(3, 4, num_layers=2, dropout=0.5, dtype="float64")
    model.load_state_dict({k: v.detach().numpy() for k, v in ref.state_dict().items()})
    x = np.random.default_rng(0).standard_normal((5, 2, 3))
    train_out = model(dp.tensor(x))[0].numpy()
    model.eval()
    ref.eval()
    eval_out = model(dp.tensor(x))[0].numpy()
    np.testing.assert_allclose(eval_out, ref(torch.tensor(x))[0].detach().numpy(), rtol=1e-10)
    assert not np.allclose(train_out, eval_out)


def test_single_layer_dropout_warns_like_torch():
    with pytest.warns(UserWarning, match="num_layers greater than 1"):
        LSTM(2, 3, dropout=0.2)


@pytest.mark.parametrize("call,match", [
    (lambda m: m(dp.randn(4, 3, 5)), r"LSTM\(3, 4\): expected input of shape"),
    (lambda m: m(dp.randn(4, 2, 3), (dp.zeros(1, 3, 4), dp.zeros(1, 2, 4))), r"expected h0 of"),
    (lambda m: m(dp.randn(4, 2, 3), dp.zeros(1, 2, 4)), r"hx must be a tuple"),
    (lambda m: m(dp.randn(4, 2, 3), lengths=[5, 1]), r"lengths must lie in \[0, 4\]"),
    (lambda m: m(dp.randn(4, 2, 3), lengths=[1, 1, 1]), r"one entry per batch row"),
    (lambda m: m(dp.randn(4, 2, 3, dtype="float64")), r"does not match the parameters' dtype"),
    (lambda m: m(dp.tensor(np.ones((4, 2, 3), np.int64))),
     r"LSTM\(3, 4\): expected a floating-point input, got dtype int64"),
])
def test_errors_are_clear(call, match):
    model = LSTM(3, 4)
    with pytest.raises((ValueError, TypeError), match=match):
        call(model)


def test_bad_constructor_arguments():
    with pytest.raises(ValueError, match="nonlinearity"):
        RNN(2, 3, nonlinearity="sigmoid")
    with pytest.raises(ValueError, match="dropout"):
        GRU(2, 3, dropout=1.5)
    with pytest.raises(ValueError, match="hidden_size"):
        LSTM(2, 0)


def test_grad_norms_match_torch_and_skip_missing():
    ours, ref = build("lstm", {"num_layers": 2}, "float64")
    x = np.random.default_rng(0).standard_normal((STEPS, BATCH, INPUT))
    ours(dp.tensor(x))[0].sum().backward()
    ref(torch.tensor(x))[0].sum().backward()
    norms = dp.nn.utils.grad_norms(ours)
    expected = {n: float(p.grad.norm()) for n, p in ref.named_parameters()}
    assert list(norms) == list(expected)
    for name, value in expected.items():
        assert abs(norms[name] - value) < 1e-10 * max(1.0, value)
    ours.bias_hh_l1.grad = None
    assert "bias_hh_l1" not in dp.nn.utils.grad_norms(ours)
    pairs = dp.nn.utils.grad_norms(list(ours.named_parameters()))
    assert pairs == dp.nn.utils.grad_norms(ours)


@pytest.mark.parametrize("scale,kind", [(0.05, "vanishing"), (3.0, "exploding")])
def test_classify_grad_norms_flags_vanishing_and_exploding_rnn(scale, kind):
    """A long tanh RNN: tiny recurrent weights make the first step's input gradient vanish,
    large ones with a relu make the gradient explode."""
    model = RNN(2, 8, nonlinearity="tanh" if kind == "vanishing" else "relu", dtype="float64")
    with dp.no_grad():
        model.weight_hh_l0.data[...] = scale * np.eye(8)
        model.weight_ih_l0.data[...] = np.abs(model.weight_ih_l0.data)
    x = dp.tensor(np.abs(np.random.default_rng(0).standard_normal((40, 1, 2))),
                  requires_grad=True)
    out, _ = model(x)
    out[-1].sum().backward()
    norms = {"first_step_input": float(np.linalg.norm(x.grad.numpy()[0]))}
    norms.update(dp.nn.utils.grad_norms(model))
    report = dp.nn.utils.classify_grad_norms(norms, vanishing=1e-8, exploding=1e6)
    assert "first_step_input" in report[kind]
    assert np.isfinite(report["total_norm"])
    nan_report = dp.nn.utils.classify_grad_norms({"w": float("nan"), "b": 1.0})
    assert nan_report["nonfinite"] == ["w"] and np.isnan(nan_report["total_norm"])
    with pytest.raises(ValueError, match="vanishing < exploding"):
        dp.nn.utils.classify_grad_norms(norms, vanishing=1.0, exploding=0.5)


def test_projected_lstm_is_refused_clearly():
    with pytest.raises(NotImplementedError, match="proj_size=2"):
        LSTM(3, 4, proj_size=2)
    assert LSTM(3, 4, proj_size=0).hidden_size == 4
