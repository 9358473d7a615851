"""Optimizers against PyTorch (single-tensor implementation): parameters and state after 20 steps
for every option combination, dtypes, groups, flat vs per-parameter paths, state_dict, errors."""

import copy

import numpy as np
import pytest
import torch

import distprop as dp
from distprop.flat import slot_of
from distprop.nn import Parameter
from distprop.optim import flatten

rng = np.random.default_rng(0)
SHAPES = [(4, 5), (4,), (3, 4), (3,)]
INIT = [rng.standard_normal(s) for s in SHAPES]
X = rng.standard_normal((8, 5))
Y = rng.standard_normal((8, 3))

# (optimizer, kwargs): every option of every optimizer, alone and combined.
CASES = [
    ("SGD", dict(lr=0.1)),
    ("SGD", dict(lr=0.1, momentum=0.9)),
    ("SGD", dict(lr=0.1, momentum=0.9, dampening=0.5)),
    ("SGD", dict(lr=0.1, momentum=0.9, nesterov=True)),
    ("SGD", dict(lr=0.1, weight_decay=0.1)),
    ("SGD", dict(lr=0.1, momentum=0.5, weight_decay=0.1, dampening=0.1)),
    ("SGD", dict(lr=0.01, maximize=True)),
    ("SGD", dict(lr=0.002, momentum=0.9, nesterov=True, weight_decay=0.1, maximize=True)),
    ("Adam", dict(lr=0.01)),
    ("Adam", dict(lr=0.01, betas=(0.3, 0.5), eps=1e-3)),
    ("Adam", dict(lr=0.01, amsgrad=True)),
    ("Adam", dict(lr=0.01, weight_decay=0.1)),
    ("Adam", dict(lr=0.01, maximize=True)),
    ("Adam", dict(lr=0.01, amsgrad=True, weight_decay=0.1, maximize=True)),
    ("Adam", dict(lr=0.01, weight_decay=0.1, decoupled_weight_decay=True)),
    ("AdamW", dict(lr=0.01)),
    ("AdamW", dict(lr=0.01, weight_decay=0.2, amsgrad=True)),
    ("AdamW", dict(lr=0.01, maximize=True)),
    ("NAdam", dict(lr=0.01)),
    ("NAdam", dict(lr=0.01, momentum_decay=0.05, betas=(0.6, 0.9))),
    ("NAdam", dict(lr=0.01, weight_decay=0.1)),
    ("NAdam", dict(lr=0.01, weight_decay=0.1, decoupled_weight_decay=True)),
    ("NAdam", dict(lr=0.01, maximize=True)),
    ("RMSprop", dict(lr=0.01)),
    ("RMSprop", dict(lr=0.01, alpha=0.9, eps=1e-4)),
    ("RMSprop", dict(lr=0.01, centered=True)),
    ("RMSprop", dict(lr=0.01, momentum=0.5)),
    ("RMSprop", dict(lr=0.01, centered=True, momentum=0.5, weight_decay=0.1)),
    ("RMSprop", dict(lr=0.01, maximize=True)),
    ("Adagrad", dict(lr=0.1)),
    ("Adagrad", dict(lr=0.1, lr_decay=0.1)),
    ("Adagrad", dict(lr=0.1, initial_accumulator_value=0.5, eps=1e-6)),
    ("Adagrad", dict(lr=0.1, weight_decay=0.1)),
    ("Adagrad", dict(lr=0.01, maximize=True)),
    ("Adadelta", dict()),
    ("Adadelta", dict(lr=0.5, rho=0.5)),
    ("Adadelta", dict(lr=0.5, weight_decay=0.1)),
    ("Adadelta", dict(lr=0.1, maximize=True)),
]
IDS = [f"{name}-" + "-".join(f"{k}={v}" for k, v in kw.items()) for name, kw in CASES]


def dp_loss(ps, dtype):
    x, y = dp.tensor(X.astype(dtype)), dp.tensor(Y.astype(dtype))
    h = (x @ ps[0].T + ps[1]).clamp(min=0)
    return ((h @ ps[2].T + ps[3] - y) ** 2).mean()


def torch_loss(ps):
    x, y = torch.tensor(X, dtype=ps[0].dtype), torch.tensor(Y, dtype=ps[0].dtype)
    h = (x @ ps[0].T + ps[1]).clamp(min=0)
    return ((h @ ps[2].T + ps[3] - y) ** 2).mean()


def dp_params(dtype=np.float64):
    return [Parameter(dp.tensor(a.astype(dtype))) for a in INIT]


def torch_params(dtype=torch.float64):
    return [torch.tensor(a, dtype=dtype, requires_grad=True) for a in INIT]


def run_dp(opt, ps, steps, dtype=np.float64, skip=None):
    for i in range(steps):
        opt.zero_grad()
        dp_loss(ps, dtype).backward()
        if skip is not None and i % 2 == 1:  # parameter `skip` gets no gradient on odd steps
            ps[skip].grad = None
        opt.step()
    return ps


def run_torch(opt, ps, steps, skip=None):
    for i in range(steps):
        opt.zero_grad()
        torch_loss(ps).backward()
        if skip is not None and i % 2 == 1:
            ps[skip].grad = None
        opt.step()
    return ps


def to_numpy_state(sd):
    """A torch optimizer state_dict with NumPy values (our layout)."""
    return {
        "state": {k: {n: (v.numpy() if torch.is_tensor(v) else v) for n, v in s.items()}
                  for k, s in sd["state"].items()},
        "param_groups": copy.deepcopy(sd["param_groups"]),
    }


def to_torch_state(sd):
    """Our state_dict with torch tensors, loadable by torch.optim."""
    return {
        "state": {k: {n: torch.from_numpy(np.array(v)) for n, v in s.items()}
                  for k, s in sd["state"].items()},
        "param_groups": copy.deepcopy(sd["param_groups"]),
    }


def assert_same_state(ours, theirs, rtol, atol):
    assert set(ours["state"]) == set(theirs["state"])
    for index, entry in theirs["state"].items():
        assert set(ours["state"][index]) == set(entry), index
        for name, value in entry.items():
            got = np.asarray(ours["state"][index][name])
            want = value.numpy() if torch.is_tensor(value) else np.asarray(value)
            assert got.shape == want.shape, (index, name)
            np.testing.assert_allclose(got, want, rtol=rtol, atol=atol, err_msg=f"{index}.{name}")


@pytest.mark.parametrize("name,kwargs", CASES, ids=IDS)
def test_matches_torch_float64(name, kwargs):
    ps = dp_params()
    opt = getattr(dp.optim, name)(ps, **kwargs)
    run_dp(opt, ps, 20)
    tps = torch_params()
    topt = getattr(torch.optim, name)(tps, foreach=False, **kwargs)
    run_torch(topt, tps, 20)
    for p, tp in zip(ps, tps):
        assert np.isfinite(p.numpy()).all()
        np.testing.assert_allclose(p.numpy(), tp.detach().numpy(), rtol=1e-10, atol=1e-10)
    assert_same_state(opt.state_dict(), topt.state_dict(), rtol=1e-9, atol=1e-10)
    ours_groups = opt.state_dict()["param_groups"]
    for key, value in kwargs.items():
        assert ours_groups[0][key] == value


@pytest.mark.parametrize("name,kwargs", CASES[::3], ids=IDS[::3])
def test_float32_stays_float32_and_matches(name, kwargs):
    ps = dp_params(np.float32)
    opt = getattr(dp.optim, name)(ps, **kwargs)
    run_dp(opt, ps, 20, dtype=np.float32)
    tps = torch_params(torch.float32)
    topt = getattr(torch.optim, name)(tps, foreach=False, **kwargs)
    run_torch(topt, tps, 20)
    for p, tp in zip(ps, tps):
        assert p.dtype == np.float32 and p.grad.dtype == np.float32
        np.testing.assert_allclose(p.numpy(), tp.detach().numpy(), rtol=1e-5, atol=1e-5)
    sd = opt.state_dict()
    for entry in sd["state"].values():
        for key, value in entry.items():
            assert np.asarray(value).dtype == np.float32, key
    assert_same_state(sd, topt.state_dict(), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name,kwargs", [CASES[3], CASES[13], CASES[21], CASES[27], CASES[31]],
                         ids=["sgd", "adam", "nadam", "rmsprop", "adagrad"])
def test_skipped_parameter_matches_torch(name, kwargs):
    """A parameter without a gradient on odd steps: its step count falls behind the others'."""
    ps = dp_params()
    opt = getattr(dp.optim, name)(ps, **kwargs)
    run_dp(opt, ps, 20, skip=1)
    tps = torch_params()
    topt = getattr(torch.optim, name)(tps, foreach=False, **kwargs)
    run_torch(topt, tps, 20, skip=1)
    for p, tp in zip(ps, tps):
        np.testing.assert_allclose(p.numpy(), tp.detach().numpy(), rtol=1e-10, atol=1e-10)
    assert_same_state(opt.state_dict(), topt.state_dict(), rtol=1e-9, atol=1e-10)


def test_first_step_without_grad_creates_no_state():
    ps = dp_params()
    opt = dp.optim.Adam(ps[:2], lr=0.1)
    opt.step()
    assert opt.state_dict()["state"] == {}
    ps[1].grad = dp.tensor(np.ones(4))
    opt.step()
    assert list(opt.state_dict()["state"]) == [1]
    assert float(opt.state[ps[1]]["step"]) == 1.0


def test_param_groups_with_own_hyperparameters():
    ps = dp_params()
    opt = dp.optim.SGD([{"params": ps[:2]}, {"params": ps[2:], "lr": 0.01, "momentum": 0.5}],
                       lr=0.1, momentum=0.9)
    run_dp(opt, ps, 20)
    tps = torch_params()
    topt = torch.optim.SGD([{"params": tps[:2]}, {"params": tps[2:], "lr": 0.01,
                                                 "momentum": 0.5}], lr=0.1, momentum=0.9,
                           foreach=False)
    run_torch(topt, tps, 20)
    for p, tp in zip(ps, tps):
        np.testing.assert_allclose(p.numpy(), tp.detach().numpy(), rtol=1e-10, atol=1e-10)
    sd = opt.state_dict()
    assert [g["params"] for g in sd["param_groups"]] == [[0, 1], [2, 3]]
    assert [g["lr"] for g in sd["param_groups"]] == [0.1, 0.01]
    assert_same_state(sd, topt.state_dict(), rtol=1e-9, atol=1e-10)


def test_add_param_group_later():
    ps = dp_params()
    opt = dp.optim.Adam(ps[:2], lr=0.01)
    tps = torch_params()
    topt = torch.optim.Adam(tps[:2], lr=0.01, foreach=False)
    run_dp(opt, ps, 3)
    run_torch(topt, tps, 3)
    opt.add_param_group({"params": ps[2:], "lr": 0.05})
    topt.add_param_group({"params": tps[2:], "lr": 0.05})
    run_dp(opt, ps, 5)
    run_torch(topt, tps, 5)
    for p, tp in zip(ps, tps):
        np.testing.assert_allclose(p.numpy(), tp.detach().numpy(), rtol=1e-10, atol=1e-10)


def test_constructor_flattens_groups_in_order():
    ps = dp_params()
    opt = dp.optim.Adam([{"params": [ps[2], ps[0]]}, {"params": [ps[3], ps[1]]}])
    buf = slot_of(ps[0]).buffer
    assert [slot_of(p).index for p in (ps[2], ps[0], ps[3], ps[1])] == [0, 1, 2, 3]
    assert all(slot_of(p).buffer is buf for p in ps)
    assert [len(layout.segments) for layout in opt._layouts] == [1, 1]
    # Already-flat parameters stay where they are.
    before = [slot_of(p).buffer for p in ps]
    dp.optim.SGD(ps, lr=0.1)
    assert [slot_of(p).buffer for p in ps] == before


@pytest.mark.parametrize("name,kwargs", CASES[1::4], ids=IDS[1::4])
def test_flat_and_per_parameter_paths_identical(name, kwargs):
    results = []
    for mode in ("flat", "per-param", "grads-elsewhere"):
        ps = dp_params()
        opt = getattr(dp.optim, name)(ps, **kwargs)
        opt._use_flat = mode != "per-param"
        for _ in range(10):
            opt.zero_grad()
            dp_loss(ps, np.float64).backward()
            if mode == "grads-elsewhere":  # gradients not in the flat buffer
                for p in ps:
                    p.grad = dp.tensor(p.grad.numpy().copy())
            opt.step()
        results.append(([p.numpy().copy() for p in ps], opt.state_dict()))
    for params, sd in results[1:]:
        for a, b in zip(results[0][0], params):
            np.testing.assert_array_equal(a, b)
        for index, entry in results[0][1]["state"].items():
            for key, value in entry.items():
                np.testing.assert_array_equal(value, sd["state"][index][key])


def test_fused_path_runs_on_whole_slices(monkeypatch):
    ps = dp_params()
    opt = dp.optim.Adam(ps, lr=0.01)
    calls = []
    kernel = opt.kernel
    monkeypatch.setattr(opt, "kernel", lambda *a: calls.append(a[1].shape) or kernel(*a))
    run_dp(opt, ps, 2)
    assert calls == [(39,), (39,)]  # one call per step over the whole 39-element buffer
    calls.clear()
    opt._use_flat = False
    run_dp(opt, ps, 1)
    assert len(calls) == 4


def test_state_views_into_flat_arrays():
    ps = dp_params()
    opt = dp.optim.Adam(ps, lr=0.01)
    run_dp(opt, ps, 2)
    seg = opt._layouts[0].segments[0]
    for p in ps:
        st = opt.state[p]
        assert st["exp_avg"].shape == p.shape
        assert np.shares_memory(st["exp_avg"], seg.arrays["exp_avg"])
        assert st["step"].shape == () and float(st["step"]) == 2.0


def test_chunked_update_matches_single_call(monkeypatch):
    from distprop.optim import optimizer as optmod

    results = []
    for chunk_bytes in (1 << 20, 64 * 8):
        monkeypatch.setattr(optmod, "_CPU_CHUNK_BYTES", chunk_bytes)
        big = [Parameter(dp.tensor(np.linspace(-1, 1, 3001).reshape(3001)))]
        opt = dp.optim.Adam(big, lr=0.01, amsgrad=True)
        for _ in range(3):
            big[0].grad = dp.tensor(np.cos(big[0].numpy() * 7))
            opt.step()
        results.append(big[0].numpy().copy())
    np.testing.assert_array_equal(results[0], results[1])


def test_reflatten_by_another_component_keeps_state():
    ref = dp_params()
    ref_opt = dp.optim.Adam(ref, lr=0.01, amsgrad=True)
    run_dp(ref_opt, ref, 10)

    ps = dp_params()
    opt = dp.optim.Adam([{"params": ps[:2]}, {"params": ps[2:], "lr": 0.01}], lr=0.01,
                        amsgrad=True)
    run_dp(opt, ps, 5)
    old = slot_of(ps[0]).buffer
    flatten([ps[3], ps[1], ps[0], ps[2]])  # e.g. DDP, in another order
    assert not old.valid
    run_dp(opt, ps, 5)
    for a, b in zip(ref, ps):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    layout = opt._layouts[0]
    assert all(seg.buffer is slot_of(ps[0]).buffer for seg in layout.segments)
    np.testing.assert_array_equal(opt.state[ps[0]]["exp_avg"], ref_opt.state[ref[0]]["exp_avg"])


def test_update_slice_matches_step():
    ps = dp_params()
    opt = dp.optim.Adam(ps[:1], lr=0.01, weight_decay=0.1)
    data = INIT[0].copy().ravel()
    state = {}
    for _ in range(4):
        opt.zero_grad()
        dp_loss(ps, np.float64).backward()
        grad = ps[0].grad.numpy().ravel().copy()
        opt.step()
        opt.update_slice(data, grad, state)
        np.testing.assert_array_equal(data, ps[0].numpy().ravel())
    assert float(state["step"]) == 4.0
    np.testing.assert_array_equal(state["exp_avg"], opt.state[ps[0]]["exp_avg"].ravel())


def test_optimizer_over_one_dimensional_shard_parameter():
    full = np.linspace(-1, 1, 40)
    shard = Parameter(dp.tensor(full[10:30].copy()))
    opt = dp.optim.SGD([shard], lr=0.5, momentum=0.9)
    shard.grad = dp.tensor(np.ones(20))  # a gradient shard from elsewhere
    opt.step()
    np.testing.assert_allclose(shard.numpy(), full[10:30] - 0.5)


def test_zero_grad():
    ps = dp_params()
    opt = dp.optim.SGD(ps, lr=0.1)
    dp_loss(ps, np.float64).backward()
    buf = slot_of(ps[0]).buffer
    opt.zero_grad(set_to_none=False)
    assert all(p.grad is not None for p in ps) and (buf.grad == 0).all()
    dp_loss(ps, np.float64).backward()
    opt.zero_grad()
    assert all(p.grad is None for p in ps)


def test_closure():
    ps = dp_params()
    opt = dp.optim.SGD(ps, lr=0.1)

    def closure():
        opt.zero_grad()
        loss = dp_loss(ps, np.float64)
        loss.backward()
        return loss

    with dp.no_grad():
        loss = opt.step(closure)
    assert loss.item() > 0


@pytest.mark.parametrize("name,kwargs", [CASES[5], CASES[13], CASES[19], CASES[27], CASES[32],
                                         CASES[35]],
                         ids=["sgd", "adam", "nadam", "rmsprop", "adagrad", "adadelta"])
def test_save_restore_mid_run_equals_uninterrupted(name, kwargs):
    cls = getattr(dp.optim, name)
    ref = dp_params()
    ref_opt = cls(ref, **kwargs)
    ref_sched = dp.optim.lr_scheduler.StepLR(ref_opt, step_size=3, gamma=0.5)
    for _ in range(2):
        run_dp(ref_opt, ref, 5)
        ref_sched.step()

    ps = dp_params()
    opt = cls(ps, **kwargs)
    sched = dp.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.5)
    run_dp(opt, ps, 5)
    sched.step()
    saved_params = [p.numpy().copy() for p in ps]
    saved_opt = copy.deepcopy(opt.state_dict())
    saved_sched = copy.deepcopy(sched.state_dict())
    run_dp(opt, ps, 3)  # progress that the restore must discard

    resumed = [Parameter(dp.tensor(a)) for a in saved_params]
    opt2 = cls(resumed, **{**kwargs, "lr": 123.0})
    sched2 = dp.optim.lr_scheduler.StepLR(opt2, step_size=3, gamma=0.5)
    opt2.load_state_dict(saved_opt)
    sched2.load_state_dict(saved_sched)
    run_dp(opt2, resumed, 5)
    sched2.step()
    for a, b in zip(ref, resumed):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    assert sched2.get_last_lr() == ref_sched.get_last_lr()


@pytest.mark.parametrize("name,kwargs", [CASES[7], CASES[13], CASES[22], CASES[28], CASES[33],
                                         CASES[36]],
                         ids=["sgd", "adam", "nadam", "rmsprop", "adagrad", "adadelta"])
def test_state_dict_round_trips_with_torch(name, kwargs):
    # torch -> ours
    tps = torch_params()
    topt = getattr(torch.optim, name)(tps, foreach=False, **kwargs)
    run_torch(topt, tps, 5)
    ps = [Parameter(dp.tensor(tp.detach().numpy().copy())) for tp in tps]
    opt = getattr(dp.optim, name)(ps, **kwargs)
    opt.load_state_dict(to_numpy_state(topt.state_dict()))
    run_dp(opt, ps, 5)
    run_torch(topt, tps, 5)
    for p, tp in zip(ps, tps):
        np.testing.assert_allclose(p.numpy(), tp.detach().numpy(), rtol=1e-10, atol=1e-10)
    # ours -> torch
    tps2 = [torch.tensor(p.numpy().copy(), requires_grad=True) for p in ps]
    topt2 = getattr(torch.optim, name)(tps2, foreach=False, **kwargs)
    topt2.load_state_dict(to_torch_state(opt.state_dict()))
    run_torch(topt2, tps2, 5)
    run_dp(opt, ps, 5)
    for p, tp in zip(ps, tps2):
        np.testing.assert_allclose(p.numpy(), tp.detach().numpy(), rtol=1e-10, atol=1e-10)


def test_state_dict_survives_json_like_round_trip():
    ps = dp_params()
    opt = dp.optim.Adam(ps, lr=0.01)
    run_dp(opt, ps, 2)
    sd = opt.state_dict()
    sd["param_groups"][0]["betas"] = list(sd["param_groups"][0]["betas"])
    sd["state"] = {str(k): v for k, v in sd["state"].items()}
    opt2 = dp.optim.Adam(dp_params(), lr=0.01)
    opt2.load_state_dict(sd)
    assert opt2.param_groups[0]["betas"] == (0.9, 0.999)
    assert float(opt2.state[opt2.param_groups[0]["params"][0]]["step"]) == 2.0


BAD = [
    (lambda ps: dp.optim.SGD(ps, lr=-0.1), "Invalid learning rate: -0.1"),
    (lambda ps: dp.optim.Adam(ps, lr=float("nan")), "Invalid learning rate: nan"),
    (lambda ps: dp.optim.SGD(ps, lr="0.1"), "Invalid learning rate"),
    (lambda ps: dp.optim.Adam(ps, betas=(1.0, 0.999)), "beta parameter at index 0"),
    (lambda ps: dp.optim.AdamW(ps, betas=(0.9, -0.1)), "beta parameter at index 1"),
    (lambda ps: dp.optim.NAdam(ps, betas=(0.9,)), "Invalid betas"),
    (lambda ps: dp.optim.Adam(ps, eps=-1e-8), "Invalid epsilon value"),
    (lambda ps: dp.optim.SGD(ps, momentum=-0.9), "Invalid momentum value"),
    (lambda ps: dp.optim.RMSprop(ps, momentum=-0.9), "Invalid momentum value"),
    (lambda ps: dp.optim.SGD(ps, nesterov=True), "Nesterov momentum requires a momentum"),
    (lambda ps: dp.optim.SGD(ps, momentum=0.9, dampening=0.1, nesterov=True),
     "zero dampening"),
    (lambda ps: dp.optim.Adagrad(ps, lr_decay=-1), "Invalid lr_decay value"),
    (lambda ps: dp.optim.Adadelta(ps, rho=1.5), "Invalid rho value"),
    (lambda ps: dp.optim.SGD(ps, weight_decay=-1), "Invalid weight_decay value"),
    (lambda ps: dp.optim.SGD([{"params": ps[:2]}, {"params": ps[2:], "lr": -1}], lr=0.1),
     "Invalid learning rate: -1"),
    (lambda ps: dp.optim.SGD([], lr=0.1), "empty parameter list"),
    (lambda ps: dp.optim.SGD([{"params": ps[:2]}, {"params": ps[1:]}], lr=0.1),
     "more than one parameter group"),
    (lambda ps: dp.optim.SGD([{"params": []}], lr=0.1), "empty parameter list"),
]


@pytest.mark.parametrize("make,message", BAD, ids=[m for _, m in BAD])
def test_bad_input(make, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        make(dp_params())


def test_bad_param_types():
    with pytest.raises(TypeError, match="iterable of Tensors"):
        dp.optim.SGD(dp_params()[0], lr=0.1)
    with pytest.raises(TypeError, match="can only optimize Tensors"):
        dp.optim.SGD([np.zeros(3)], lr=0.1)


def test_load_state_dict_for_another_model_is_refused():
    ps = dp_params()
    opt = dp.optim.Adam(ps, lr=0.01)
    run_dp(opt, ps, 1)
    sd = opt.state_dict()
    with pytest.raises(ValueError, match="different number of parameter groups"):
        dp.optim.Adam([{"params": ps[:2]}, {"params": ps[2:]}]).load_state_dict(sd)
    with pytest.raises(ValueError, match="doesn't match the size"):
        dp.optim.Adam(ps[:3]).load_state_dict(sd)
    other = [Parameter(dp.randn(*s, dtype=np.float64)) for s in [(5, 4), (4,), (3, 4), (3,)]]
    with pytest.raises(ValueError, match=r"shape \(4, 5\) but the parameter has shape \(5, 4\)"):
        dp.optim.Adam(other).load_state_dict(sd)
    with pytest.raises(ValueError, match="SGD with these settings does not use"):
        dp.optim.SGD(ps, momentum=0.9).load_state_dict(sd)
    with pytest.raises(ValueError, match="lacks"):
        dp.optim.Adam(ps, amsgrad=True).load_state_dict(
            {**sd, "param_groups": [{**sd["param_groups"][0], "amsgrad": True}]})
    with pytest.raises(ValueError, match="'state' and 'param_groups'"):
        opt.load_state_dict({"state": {}})
    # A refused load leaves the optimizer untouched.
    assert float(opt.state[ps[0]]["step"]) == 1.0


def test_repr():
    text = repr(dp.optim.SGD(dp_params(), lr=0.1, momentum=0.9))
    assert text.startswith("SGD (") and "Parameter Group 0" in text and "momentum: 0.9" in text


def test_mixed_dtypes_and_frozen_parameter_in_one_group_match_torch():
    dtypes = [np.float32, np.float64, np.float64, np.float32]
    ps = [Parameter(dp.tensor(a.astype(d))) for a, d in zip(INIT, dtypes)]
    ps[1].requires_grad_(False)  # frozen: never gets a gradient
    opt = dp.optim.Adam(ps, lr=0.01, weight_decay=0.1)
    assert len(opt._layouts[0].segments) == 2  # one per dtype buffer
    tps = [torch.tensor(a.astype(d), requires_grad=(i != 1))
           for i, (a, d) in enumerate(zip(INIT, dtypes))]
    topt = torch.optim.Adam(tps, lr=0.01, weight_decay=0.1, foreach=False)
    x, y = rng.standard_normal((6, 5)), rng.standard_normal((6, 3))
    for _ in range(10):
        opt.zero_grad()
        topt.zero_grad()
        h = dp.tensor(x.astype(np.float32)) @ ps[0].T + ps[1].to(np.float32)
        ((h.clamp(min=0).to(np.float64) @ ps[2].T + ps[3].to(np.float64) - dp.tensor(y)) ** 2
         ).mean().backward()
        th = torch.tensor(x, dtype=torch.float32) @ tps[0].T + tps[1].float()
        ((th.clamp(min=0).double() @ tps[2].T + tps[3].double() - torch.tensor(y)) ** 2
         ).mean().backward()
        opt.step()
        topt.step()
    for p, tp in zip(ps, tps):
        assert p.dtype == tp.detach().numpy().dtype
        # float64 parameters see float32 activations here, so float32 tolerances apply.
        np.testing.assert_allclose(p.numpy(), tp.detach().numpy(), rtol=1e-5, atol=1e-6)
    assert ps[1] not in opt.state or not opt.state[ps[1]]
    assert_same_state(opt.state_dict(), topt.state_dict(), rtol=1e-4, atol=1e-6)


def test_pytorch_only_keywords_are_accepted():
    ps = dp_params()
    for name in ("SGD", "Adam", "AdamW", "Adagrad"):
        getattr(dp.optim, name)(ps, foreach=True, fused=None)
    for name in ("NAdam", "RMSprop", "Adadelta"):
        getattr(dp.optim, name)(ps, foreach=False)
