"""EarlyStopping: patience, min_delta, modes, non-finite metrics, state_dict."""

import json

import numpy as np
import pytest

import distprop as dp
from distprop.train import EarlyStopping


def test_early_stopping_min_mode():
    stopper = EarlyStopping(patience=2)
    decisions = [stopper.step(v) for v in [1.0, 0.8, 0.85, 0.7, 0.75, 0.71]]
    assert decisions == [False, False, False, False, False, True]
    assert stopper.best == 0.7 and stopper.best_step == 3 and stopper.should_stop


def test_early_stopping_max_mode_min_delta_and_zero_patience():
    stopper = EarlyStopping(patience=1, min_delta=0.05, mode="max")
    assert [stopper.step(v) for v in [0.5, 0.6, 0.62]] == [False, False, True]
    assert stopper.best == 0.6
    zero = EarlyStopping(patience=0)
    assert zero.step(1.0) is False and zero.step(1.0) is True


def test_early_stopping_nonfinite_and_tensor_metric():
    stopper = EarlyStopping(patience=5)
    assert stopper.step(dp.tensor(np.float32(2.0))) is False
    assert stopper.step(float("nan")) is True
    lenient = EarlyStopping(patience=5, check_finite=False)
    assert lenient.step(float("nan")) is False and lenient.num_bad_steps == 1


def test_early_stopping_state_dict_resume():
    values = [1.0, 0.9, 0.95, 0.96, 0.97, 0.5]
    ref = EarlyStopping(patience=3)
    ref_decisions = [ref.step(v) for v in values]
    first = EarlyStopping(patience=3)
    for v in values[:3]:
        first.step(v)
    resumed = EarlyStopping(patience=3)
    resumed.load_state_dict(json.loads(json.dumps(first.state_dict())))
    assert [resumed.step(v) for v in values[3:]] == ref_decisions[3:]
    assert resumed.state_dict() == ref.state_dict()


def test_early_stopping_bad_arguments():
    with pytest.raises(ValueError, match="patience must be an integer >= 0"):
        EarlyStopping(patience=-1)
    with pytest.raises(ValueError, match="min_delta must be a number >= 0"):
        EarlyStopping(patience=1, min_delta=-0.1)
    with pytest.raises(ValueError, match="mode must be 'min' or 'max'"):
        EarlyStopping(patience=1, mode="best")
    with pytest.raises(ValueError, match="unknown keys"):
        EarlyStopping(patience=1).load_state_dict({"wait": 3})
