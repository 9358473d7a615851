"""The fit() loop in one process: accumulation, exact resume with dropout, callbacks."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest

import distprop as dp
from distprop import nn
from distprop.data import sources
from distprop.distributed.comm import SingleProcessCommunicator
from distprop.train import callbacks as cbs
from distprop.train import fit


def _model(dropout: float = 0.0, seed: int = 0):
    dp.manual_seed(seed)
    layers = [nn.Linear(8, 32), nn.ReLU()]
    if dropout:
        layers.append(nn.Dropout(dropout))
    return nn.Sequential(*layers, nn.Linear(32, 4))


def _data():
    return sources.synthetic(n=400, shape=(8,), classes=4, seed=3, val_fraction=0.1,
                             test_fraction=0.1)


def _params(model):
    return {k: v.numpy().copy() for k, v in model.state_dict().items()}


def test_grad_accumulation_equals_the_large_batch():
    data = _data()
    results = []
    for batch, accum in ((32, 1), (16, 2), (8, 4)):
        model = _model()
        opt = dp.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        fit(model, nn.CrossEntropyLoss(), opt, data.train, epochs=2, batch_size=batch,
            grad_accum=accum, comm=SingleProcessCommunicator(), prefetch=0)
        results.append(_params(model))
    for other in results[1:]:
        for key, value in results[0].items():
            np.testing.assert_allclose(other[key], value, rtol=1e-5, atol=1e-6, err_msg=key)


class _Crash(cbs.Callback):
    def __init__(self, at_step: int):
        self.at_step = at_step

    def on_step_end(self, trainer, logs):
        if trainer.step == self.at_step:
            raise KeyboardInterrupt("simulated crash")


def _run(tmp_path, name, extra=(), resume=None, seed=0):
    data = _data()
    model = _model(dropout=0.3, seed=seed)
    opt = dp.optim.Adam(model.parameters(), lr=1e-2)
    sched = dp.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=60)
    ckpts = cbs.Checkpointer(tmp_path / name / "ck", every_steps=4, keep=2)
    callbacks = [cbs.LRSchedule(sched), cbs.MetricsLogger(tmp_path / name), ckpts, *extra]
    history = fit(model, nn.CrossEntropyLoss(), opt, data.train, data.val, epochs=3,
                  batch_size=16, grad_accum=2, comm=SingleProcessCommunicator(),
                  callbacks=callbacks, log_every=3, resume=resume, seed=5)
    return model, history


@pytest.mark.parametrize("crash_at,resume_at", [(14, 12), (22, 20)])
def test_resume_mid_epoch_with_dropout_and_schedule_is_exact(tmp_path, crash_at, resume_at):
    """10 steps per epoch: step 12 is mid-epoch, step 20 its last step (before the epoch end)."""
    straight, history = _run(tmp_path, "straight")
    assert len(history.epochs) == 3 and history.final["step"] == 30
    with pytest.raises(KeyboardInterrupt):
        _run(tmp_path, "crashed", extra=[_Crash(at_step=crash_at)])
    latest = dp.train.latest_valid(tmp_path / "crashed" / "ck")
    assert latest.name == f"checkpoint-{resume_at:09d}.npz"
    resumed, history2 = _run(tmp_path, "crashed", resume=latest, seed=99)  # other init
    assert history2.resumed_from == str(latest)
    for key, value in _params(straight).items():
        np.testing.assert_array_equal(_params(resumed)[key], value, err_msg=key)
    assert [r["loss"] for r in history2.epochs] == [r["loss"] for r in history.epochs]
    rows = [json.loads(line) for line in
            (tmp_path / "crashed" / "metrics.jsonl").read_text().splitlines()]
    reference = [json.loads(line) for line in
                 (tmp_path / "straight" / "metrics.jsonl").read_text().splitlines()]
    assert [(r["kind"], r["step"], r["loss"]) for r in rows] == \
        [(r["kind"], r["step"], r["loss"]) for r in reference]  # rows after the resume dropped
    with open(tmp_path / "crashed" / "metrics.csv") as f:
        assert len(list(csv.DictReader(f))) == len(reference)


def test_early_stopping_stops_every_rank_at_the_same_epoch():
    data = _data()
    model = _model()
    opt = dp.optim.SGD(model.parameters(), lr=1e-12)  # nothing improves
    stopper = cbs.EarlyStoppingCallback(patience=2)
    history = fit(model, nn.CrossEntropyLoss(), opt, data.train, data.val, epochs=20,
                  batch_size=64, callbacks=[stopper], comm=SingleProcessCommunicator())
    assert len(history.epochs) == 3 and stopper.stopped_epoch == 2


def test_exploding_gradients_are_reported_with_the_layer(capsys):
    data = _data()
    model = _model()
    opt = dp.optim.SGD(model.parameters(), lr=1e-9)
    ce = nn.CrossEntropyLoss()

    def loss_fn(out, y):
        return ce(out, y) * 1e6

    with pytest.warns(RuntimeWarning, match=r"exploding gradients, global norm .* in 0\.weight"):
        fit(model, loss_fn, opt, data.train, epochs=1, batch_size=64, log_every=1,
            callbacks=[cbs.GradNormMonitor(max_warnings=1)], comm=SingleProcessCommunicator())
    assert "exploding gradients" in capsys.readouterr().err


def test_clipping_bounds_the_update():
    data = _data()
    model = _model()
    before = _params(model)
    opt = dp.optim.SGD(model.parameters(), lr=1.0)
    ce = nn.CrossEntropyLoss()
    fit(model, lambda o, y: ce(o, y) * 1e4, opt, data.train, epochs=1, batch_size=320,
        clip_grad_norm=0.5, comm=SingleProcessCommunicator())
    moved = np.sqrt(sum(((_params(model)[k] - v) ** 2).sum() for k, v in before.items()))
    assert moved == pytest.approx(0.5, rel=1e-4)  # one step of lr 1 with a clipped gradient


def test_batches_must_be_pairs():
    model = _model()
    opt = dp.optim.SGD(model.parameters(), lr=0.1)
    only_x = dp.data.TensorDataset(np.ones((8, 8), np.float32))
    with pytest.raises(ValueError, match=r"\(inputs, targets\) pairs"):
        fit(model, nn.CrossEntropyLoss(), opt, only_x, batch_size=4,
            comm=SingleProcessCommunicator())


def test_an_early_stopped_run_stays_stopped_on_resume(tmp_path):
    data = _data()

    def run(resume=None):
        model = _model()
        opt = dp.optim.SGD(model.parameters(), lr=1e-12)
        stopper = cbs.EarlyStoppingCallback(patience=1)
        saver = cbs.Checkpointer(tmp_path, keep=1)
        return fit(model, nn.CrossEntropyLoss(), opt, data.train, data.val, epochs=20,
                   batch_size=64, callbacks=[stopper, saver], comm=SingleProcessCommunicator(),
                   resume=resume)

    first = run()
    assert len(first.epochs) == 2
    again = run(resume=dp.train.latest_valid(tmp_path))
    assert len(again.epochs) == 2 and again.final["step"] == first.final["step"]


def test_stop_training_on_one_rank_stops_every_rank_after_the_epoch():
    """A callback that sets stop_training on rank 1 only must not leave rank 0 in a collective."""
    from helpers import run_mpi

    script = """
import distprop as dp
from distprop import nn
from distprop.data import sources
from distprop.train import callbacks as cbs, fit
import distprop.distributed as dist

class StopOnRank1(cbs.Callback):
    def on_epoch_end(self, trainer, logs):
        if trainer.comm.rank == 1:
            trainer.stop_training = True

rank = dist.init().rank
dp.manual_seed(0)
model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
data = sources.synthetic(n=64, shape=(8,), classes=4, seed=3, val_fraction=0.0,
                         test_fraction=0.0)
history = fit(model, nn.CrossEntropyLoss(), dp.optim.SGD(model.parameters(), lr=0.1),
              data.train, epochs=3, batch_size=8, callbacks=[StopOnRank1()], prefetch=0)
print(f"rank {rank} ran {len(history.epochs)} epoch(s)", flush=True)
"""
    res = run_mpi(script, 2, timeout=60, env={"DISTPROP_STALL_TIMEOUT": "10"})
    assert res.returncode == 0, res.stderr
    assert "rank 0 ran 1 epoch(s)" in res.stdout and "rank 1 ran 1 epoch(s)" in res.stdout


@pytest.mark.parametrize("which", ["train_data", "val_data"])
def test_nan_in_the_data_is_an_error_before_training(which):
    from distprop.data import TensorDataset

    x = np.random.rand(20, 4).astype(np.float32)
    bad = x.copy()
    bad[7, 2] = np.nan
    good, broken = TensorDataset(x, np.arange(20) % 4), TensorDataset(bad, np.arange(20) % 4)
    model = nn.Linear(4, 4)
    before = model.weight.numpy().copy()
    data = {"train_data": good, "val_data": good, which: broken}
    with pytest.raises(ValueError, match=rf"{which}: tensor 0 of the dataset has a non-finite "
                                         r"value \(NaN or inf\) in sample 7"):
        fit(model, nn.CrossEntropyLoss(), dp.optim.SGD(model.parameters(), lr=0.1),
            data["train_data"], data["val_data"], epochs=1, batch_size=4,
            comm=SingleProcessCommunicator())
    np.testing.assert_array_equal(model.weight.numpy(), before)  # no step was taken
