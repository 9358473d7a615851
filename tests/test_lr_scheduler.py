"""Learning-rate schedules: the same lr sequence as torch.optim.lr_scheduler, state_dict."""

import copy
import json

import numpy as np
import pytest
import torch

import distprop as dp
from distprop.optim import lr_scheduler as dls

tls = torch.optim.lr_scheduler


class Halve:
    """A callable object (its __dict__ is saved by LambdaLR.state_dict)."""

    def __init__(self):
        self.factor = 0.5

    def __call__(self, epoch):
        return self.factor ** (epoch // 3)


SCHEDULES = {
    "step": lambda m, o: m.StepLR(o, step_size=3, gamma=0.5),
    "multistep": lambda m, o: m.MultiStepLR(o, milestones=[2, 5, 5, 9], gamma=0.3),
    "exponential": lambda m, o: m.ExponentialLR(o, gamma=0.9),
    "cosine": lambda m, o: m.CosineAnnealingLR(o, T_max=7, eta_min=0.001),
    "cosine_no_min": lambda m, o: m.CosineAnnealingLR(o, T_max=4),
    "linear_warmup": lambda m, o: m.LinearLR(o, start_factor=0.1, total_iters=4),
    "linear_decay": lambda m, o: m.LinearLR(o, start_factor=1.0, end_factor=0.2, total_iters=6),
    "lambda": lambda m, o: m.LambdaLR(o, lambda e: 1.0 / (1 + e)),
    "lambda_per_group": lambda m, o: m.LambdaLR(o, [lambda e: 0.9**e, Halve()]),
    "sequential": lambda m, o: m.SequentialLR(
        o, [m.LinearLR(o, start_factor=0.25, total_iters=3),
            m.CosineAnnealingLR(o, T_max=6, eta_min=0.01)], milestones=[3]),
    "sequential3": lambda m, o: m.SequentialLR(
        o, [m.LambdaLR(o, lambda e: 0.5 if e < 2 else 1.0), m.ExponentialLR(o, gamma=0.8),
            m.StepLR(o, step_size=2, gamma=0.5)], milestones=[2, 6]),
}


def optimizers(lrs=(0.1, 0.02)):
    dps = [dp.nn.Parameter(dp.zeros(2)), dp.nn.Parameter(dp.zeros(3))]
    tps = [torch.zeros(2, requires_grad=True), torch.zeros(3, requires_grad=True)]
    opt = dp.optim.SGD([{"params": [dps[0]], "lr": lrs[0]}, {"params": [dps[1]], "lr": lrs[1]}],
                       momentum=0.9)
    topt = torch.optim.SGD([{"params": [tps[0]], "lr": lrs[0]},
                            {"params": [tps[1]], "lr": lrs[1]}], momentum=0.9)
    return opt, topt


@pytest.mark.parametrize("name", list(SCHEDULES))
def test_sequence_matches_torch(name):
    opt, topt = optimizers()
    sched = SCHEDULES[name](dls, opt)
    tsched = SCHEDULES[name](tls, topt)
    ours, theirs = [sched.get_last_lr()], [tsched.get_last_lr()]
    for _ in range(25):
        opt.step()
        topt.step()
        sched.step()
        tsched.step()
        ours.append(sched.get_last_lr())
        theirs.append(tsched.get_last_lr())
        assert [g["lr"] for g in opt.param_groups] == ours[-1]
    np.testing.assert_allclose(ours, theirs, rtol=1e-13, atol=1e-15)
    assert sched.last_epoch == tsched.last_epoch


def test_sequences_are_exact_for_cosine_and_step():
    for name in ("cosine", "step", "sequential"):
        opt, topt = optimizers()
        sched, tsched = SCHEDULES[name](dls, opt), SCHEDULES[name](tls, topt)
        for _ in range(20):
            opt.step()
            topt.step()
            sched.step()
            tsched.step()
            assert sched.get_last_lr() == tsched.get_last_lr(), name


def test_constructor_takes_initial_step_and_sets_initial_lr():
    opt, _ = optimizers()
    sched = dls.LinearLR(opt, start_factor=0.5, total_iters=2)
    assert sched.last_epoch == 0
    assert [g["initial_lr"] for g in opt.param_groups] == [0.1, 0.02]
    assert sched.get_last_lr() == [0.05, 0.01]
    assert sched.base_lrs == [0.1, 0.02]


@pytest.mark.parametrize("name", ["step", "multistep", "exponential", "cosine", "linear_warmup"])
def test_epoch_argument_uses_closed_form_like_torch(name):
    opt, topt = optimizers()
    sched, tsched = SCHEDULES[name](dls, opt), SCHEDULES[name](tls, topt)
    for epoch in (3, 7, 4):
        sched.step(epoch)
        with pytest.warns(UserWarning):
            tsched.step(epoch)
        np.testing.assert_allclose(sched.get_last_lr(), tsched.get_last_lr(), rtol=1e-13)


PLATEAU_METRICS = [1.0, 0.9, 0.95, 0.95, 0.95, 0.8, 0.85, 0.85, 0.85, 0.85, 0.85, 0.5, 0.6,
                   0.6, 0.6, 0.6, 0.6, 0.6, 0.6]


@pytest.mark.parametrize("kwargs", [
    dict(patience=2),
    dict(mode="max", patience=1, factor=0.5),
    dict(patience=1, threshold=0.1, threshold_mode="abs", cooldown=2),
    dict(patience=0, min_lr=[0.05, 0.001], factor=0.5),
    dict(patience=1, factor=0.5, min_lr=0.03, eps=1e-3),
])
def test_reduce_on_plateau_matches_torch(kwargs):
    opt, topt = optimizers()
    sched = dls.ReduceLROnPlateau(opt, **kwargs)
    tsched = tls.ReduceLROnPlateau(topt, **kwargs)
    for metric in PLATEAU_METRICS:
        sched.step(metric)
        tsched.step(metric)
        assert sched.get_last_lr() == tsched.get_last_lr()
        assert (sched.best, sched.num_bad_epochs, sched.cooldown_counter) == \
            (tsched.best, tsched.num_bad_epochs, tsched.cooldown_counter)


@pytest.mark.parametrize("name", list(SCHEDULES) + ["plateau"])
def test_state_dict_resume_equals_uninterrupted(name):
    def make(opt):
        if name == "plateau":
            return dls.ReduceLROnPlateau(opt, patience=1, factor=0.5)
        return SCHEDULES[name](dls, opt)

    def advance(opt, sched, k, start):
        for i in range(start, start + k):
            opt.step()
            if name == "plateau":
                sched.step(PLATEAU_METRICS[i % len(PLATEAU_METRICS)])
            else:
                sched.step()

    ref_opt, _ = optimizers()
    ref = make(ref_opt)
    advance(ref_opt, ref, 14, 0)

    opt, _ = optimizers()
    sched = make(opt)
    advance(opt, sched, 6, 0)
    saved_sched = json.loads(json.dumps(sched.state_dict(), default=dict))  # JSON-safe
    saved_opt = copy.deepcopy(opt.state_dict())

    opt2, _ = optimizers(lrs=(5.0, 5.0))
    sched2 = make(opt2)
    opt2.load_state_dict(saved_opt)
    sched2.load_state_dict(saved_sched)
    advance(opt2, sched2, 8, 6)
    assert sched2.get_last_lr() == ref.get_last_lr()
    assert [g["lr"] for g in opt2.param_groups] == [g["lr"] for g in ref_opt.param_groups]


def test_lambda_state_dict_saves_callable_objects_only():
    opt, _ = optimizers()
    sched = SCHEDULES["lambda_per_group"](dls, opt)
    sched.lr_lambdas[1].factor = 0.25
    state = sched.state_dict()
    assert state["lr_lambdas"] == [None, {"factor": 0.25}]
    opt2, _ = optimizers()
    sched2 = SCHEDULES["lambda_per_group"](dls, opt2)
    sched2.load_state_dict(state)
    assert sched2.lr_lambdas[1].factor == 0.25


def test_bad_scheduler_arguments():
    opt, _ = optimizers()
    with pytest.raises(TypeError, match="not an Optimizer"):
        dls.StepLR(object(), step_size=2)
    with pytest.raises(ValueError, match="step_size must be a positive integer"):
        dls.StepLR(opt, step_size=0)
    with pytest.raises(ValueError, match="T_max must be positive"):
        dls.CosineAnnealingLR(opt, T_max=0)
    with pytest.raises(ValueError, match="Starting multiplicative factor"):
        dls.LinearLR(opt, start_factor=0.0)
    with pytest.raises(ValueError, match="Expected 2 lr_lambdas"):
        dls.LambdaLR(opt, [lambda e: 1.0])
    with pytest.raises(ValueError, match="one milestone fewer"):
        dls.SequentialLR(opt, [dls.StepLR(opt, 2), dls.StepLR(opt, 3)], milestones=[1, 2])
    with pytest.raises(ValueError, match="does not support ReduceLROnPlateau"):
        dls.SequentialLR(opt, [dls.ReduceLROnPlateau(opt)], milestones=[])
    with pytest.raises(ValueError, match="Factor should be < 1.0"):
        dls.ReduceLROnPlateau(opt, factor=1.5)
    with pytest.raises(ValueError, match="mode 'up' is unknown"):
        dls.ReduceLROnPlateau(opt, mode="up")
    with pytest.raises(KeyError, match="initial_lr"):
        dls.StepLR(dp.optim.SGD([dp.nn.Parameter(dp.zeros(1))], lr=0.1), 2, last_epoch=3)
