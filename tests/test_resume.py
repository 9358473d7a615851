"""Resuming a training run: on another number of ranks (the position kept in samples), at an
epoch boundary, and from checkpoints that pass the checksum but hold nonsense.

Real ``python -m distprop train [-n K]`` runs of the mlp on synthetic (1638 training samples,
35 steps per epoch at a global batch of 48) or digits data, a few seconds each on 2 cores.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest
from click.testing import CliRunner

import distprop as dp
from distprop import nn
from distprop.cli import cli
from distprop.data import sources
from distprop.data.sampler import DistributedSampler
from distprop.distributed.comm import SingleProcessCommunicator
from distprop.train import callbacks as cbs
from distprop.train import checkpoint as ckpt
from distprop.train import fit

from helpers import REPO

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
N_TRAIN = 1638  # synthetic: 2048 samples, 80 % for training; divisible by 1, 2, 3 and 6


def distprop(*args, timeout=240):
    """``python -m distprop ARGS`` in a subprocess; returns the CompletedProcess."""
    return subprocess.run([sys.executable, "-m", "distprop", *map(str, args)],
                          capture_output=True, text=True, timeout=timeout, env=ENV,
                          cwd=str(REPO))


def ckpt_path(out, step: int):
    return out / "checkpoints" / f"checkpoint-{step:09d}.npz"


def metrics(out) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def final_state(out) -> dict:
    return dp.load(dp.train.list_checkpoints(out / "checkpoints")[-1])


# --- the sampler's start offset -----------------------------------------------------------------


def _rank_indices(n, world, start, epoch=1, seed=5):
    found = []
    for rank in range(world):
        sampler = DistributedSampler(range(n), world, rank, shuffle=True, seed=seed)
        sampler.set_epoch(epoch)
        sampler.set_start(start)
        idx = sampler.indices()
        assert len(idx) == len(sampler) == math.ceil((n - start) / world)
        found.append(idx)
    return found


@pytest.mark.parametrize("n,start,world", [(10, 0, 3), (10, 4, 3), (10, 4, 1), (11, 5, 2),
                                           (11, 10, 4), (7, 7, 2), (7, 6, 4),
                                           (N_TRAIN, 720, 1), (N_TRAIN, 720, 3),
                                           (N_TRAIN, 720, 4)])
def test_start_gives_every_remaining_sample_once_in_the_epochs_order(n, start, world):
    order = np.random.default_rng(5 + 1).permutation(n)
    global_order = np.stack(_rank_indices(n, world, start), axis=1).reshape(-1)  # r, r+W, ...
    rest = n - start
    assert global_order[:rest].tolist() == order[start:].tolist()
    assert global_order[rest:].tolist() == order[: global_order.size - rest].tolist()  # padding


@pytest.mark.parametrize("world", [1, 2, 3, 6])
def test_global_batch_k_is_the_same_samples_on_any_world_size(world):
    """With batch x world fixed (48), global batch k after a start offset is one slice of the
    epoch's order, whatever the number of ranks."""
    n, global_batch, start = N_TRAIN, 48, 720
    order = np.random.default_rng(5 + 1).permutation(n)
    per_rank = global_batch // world
    ranks = _rank_indices(n, world, start)
    for k in range((n - start) // global_batch):
        got = np.concatenate([idx[k * per_rank : (k + 1) * per_rank] for idx in ranks])
        want = order[start + k * global_batch : start + (k + 1) * global_batch]
        assert sorted(got.tolist()) == sorted(want.tolist()), k


@pytest.mark.parametrize("n,world,batch,skipped", [(10, 3, 2, 1), (11, 2, 3, 1), (1258, 2, 32, 7)])
def test_start_on_the_same_world_equals_skipping_batches(n, world, batch, skipped):
    for rank in range(world):
        sampler = DistributedSampler(range(n), world, rank, shuffle=True, seed=1)
        whole = sampler.indices()
        sampler.set_start(skipped * batch * world)
        assert sampler.indices().tolist() == whole[skipped * batch :].tolist()
        sampler.set_epoch(0)  # a new epoch starts at its first sample again
        assert sampler.indices().tolist() == whole.tolist()


@pytest.mark.parametrize("start", [-1, 11, 2.5, True, "3"])
def test_start_outside_the_epoch_is_refused(start):
    sampler = DistributedSampler(range(10), 2, 0)
    with pytest.raises(ValueError, match=r"start must be an integer in \[0, 10\]"):
        sampler.set_start(start)


# --- resuming on another number of ranks --------------------------------------------------------

FIXED = ("--model", "mlp", "--dataset", "synthetic", "--epochs", 2, "--checkpoint-every", 10,
         "--keep-checkpoints", 0, "--log-every", 1)
MID = 50  # 35 steps per epoch: step 50 is 15 steps (720 samples) into the second epoch


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted run on 2 ranks at 48 samples per step, every 10th step on disk."""
    out = tmp_path_factory.mktemp("reference")
    done = distprop("train", "-n", 2, *FIXED, "--global-batch-size", 48, "--out", out)
    assert done.returncode == 0, done.stdout + done.stderr
    assert ckpt_path(out, MID).exists() and final_state(out)["position"]["step"] == 70
    return out


@pytest.mark.parametrize("nprocs", [3, 1])
def test_fixed_global_batch_resumed_on_other_world_size_ends_as_uninterrupted(
        reference, tmp_path, nprocs):
    out = tmp_path / "resumed"
    done = distprop("train", "-n", nprocs, *(["--oversubscribe"] if nprocs > 2 else []), *FIXED,
                    "--global-batch-size", 48, "--out", out, "--resume", ckpt_path(reference, MID))
    assert done.returncode == 0, done.stdout + done.stderr
    assert (f"resuming on {nprocs} rank(s) (grad_accum 1) from a checkpoint written by 2 "
            "rank(s) (grad_accum 1): global batch 48 (unchanged), steps per epoch 35 "
            "(unchanged), lr 0.1 (unchanged" in done.stdout)
    assert f"epoch 2 continues at sample 720 of {N_TRAIN}" in done.stdout
    want, got = final_state(reference), final_state(out)
    assert got["position"]["step"] == 70 and got["position"]["epoch"] == 2
    for key, value in want["model"].items():
        np.testing.assert_allclose(got["model"][key], value, rtol=0, atol=1e-6, err_msg=key)
    ref_rows = {r["step"]: r for r in metrics(reference) if r["kind"] == "train"}
    rows = [r for r in metrics(out) if r["kind"] == "train"]
    assert [r["step"] for r in rows] == list(range(MID + 1, 71))
    for row in rows:
        assert row["lr"] == pytest.approx(ref_rows[row["step"]]["lr"], rel=1e-12, abs=1e-15)
        assert row["loss"] == pytest.approx(ref_rows[row["step"]]["loss"], rel=1e-4, abs=1e-6)


@pytest.mark.parametrize("nprocs", [1, 3])
def test_fixed_per_rank_batch_resumed_on_other_world_size_keeps_the_schedule(
        reference, tmp_path, nprocs):
    """24 samples per rank as before: the global batch and steps per epoch change, the epoch
    finishes its 918 remaining samples once, and cosine decays to exactly 0 at the end."""
    out = tmp_path / "resumed"
    done = distprop("train", "-n", nprocs, *(["--oversubscribe"] if nprocs > 2 else []), *FIXED,
                    "--batch-size", 24, "--out", out, "--resume", ckpt_path(reference, MID))
    assert done.returncode == 0, done.stdout + done.stderr
    spe = math.ceil(math.ceil(N_TRAIN / nprocs) / 24)
    assert f"global batch 48 -> {24 * nprocs}, steps per epoch 35 -> {spe}" in done.stdout
    left = math.ceil(math.ceil((N_TRAIN - 720) / nprocs) / 24)  # steps to finish epoch 2
    rows = metrics(out)
    train = [r for r in rows if r["kind"] == "train"]
    assert [r["step"] for r in train] == list(range(MID + 1, MID + left + 1))
    before = [r["lr"] for r in metrics(reference) if r["kind"] == "train" and r["step"] <= MID]
    lrs = before + [r["lr"] for r in train] + [rows[-1]["lr"]]  # the epoch row: after the end
    assert all(b <= a for a, b in zip(lrs, lrs[1:])), "the learning rate went up"
    assert rows[-1]["kind"] == "epoch" and rows[-1]["lr"] == 0.0
    assert final_state(out)["position"]["step"] == MID + left


# --- epoch boundaries and rates -----------------------------------------------------------------

BOUNDARY = ("--model", "mlp", "--dataset", "digits", "--epochs", 3, "--checkpoint-every", 20,
            "--keep-checkpoints", 0)  # 1258 samples, 20 steps per epoch on 2 ranks


def _old_format_end_of_data(path):
    """Rewrite the checkpoint of step 20 as the code before samples-positions wrote it: the
    first epoch's data done (20 micro-batches), its end not yet run."""
    state = dp.load(path)
    state["position"] = {"epoch": 0, "step": 20, "batch_in_epoch": 20, "sampler_epoch": 0,
                         "grad_accum": 1, "world_size": 2, "seed": 0, "stopped": False}
    state["history"] = []
    ckpt.save(state, path)


@pytest.mark.parametrize("fmt", ["current", "old"])
def test_resume_at_an_epoch_boundary_does_not_repeat_that_epoch(tmp_path, fmt):
    reference = tmp_path / "reference"
    done = distprop("train", "-n", 2, *BOUNDARY, "--out", reference)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.count("epoch 1/3") == 1
    out = tmp_path / "resumed"
    shutil.copytree(reference, out)
    if fmt == "old":
        _old_format_end_of_data(ckpt_path(out, 20))
    before = metrics(out)
    done = distprop("train", "-n", 2, *BOUNDARY, "--out", out, "--resume", ckpt_path(out, 20))
    assert done.returncode == 0, done.stdout + done.stderr
    assert "epoch 1/3" not in done.stdout and "epoch 2/3" in done.stdout
    rows = metrics(out)
    epoch_rows = [r for r in rows if r["kind"] == "epoch"]
    assert [r["epoch"] for r in epoch_rows] == [1, 2, 3]  # counted from 1, as on the console
    assert epoch_rows[0] == [r for r in before if r["kind"] == "epoch"][0]  # not rewritten
    assert all(r["samples_per_s"] is None or r["samples_per_s"] < 1e5 for r in rows)
    for key, value in final_state(reference)["model"].items():
        np.testing.assert_array_equal(final_state(out)["model"][key], value, err_msg=key)


class _Slow(cbs.Callback):
    """At most one batch per 50 ms, so a true rate is at most batch / 0.05 samples/s."""

    def on_step_end(self, trainer, logs):
        time.sleep(0.05)


def test_rates_count_only_the_samples_of_this_run(tmp_path):
    data = sources.synthetic(n=400, shape=(8,), classes=4, seed=3, val_fraction=0.1,
                             test_fraction=0.1)  # 320 training samples: 20 steps of 16

    def run(resume=None, extra=()):
        dp.manual_seed(0)
        model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
        opt = dp.optim.SGD(model.parameters(), lr=0.05)
        callbacks = [cbs.Checkpointer(tmp_path / "ck", every_steps=9, keep=0), *extra]
        return fit(model, nn.CrossEntropyLoss(), opt, data.train, epochs=1, batch_size=16,
                   comm=SingleProcessCommunicator(), callbacks=callbacks, log_every=1,
                   prefetch=0, resume=resume)

    run()
    resume_at = tmp_path / "ck" / "checkpoint-000000018.npz"  # 2 steps left
    history = run(resume=resume_at, extra=[_Slow()])
    (row,) = history.epochs
    assert row["samples_per_s"] <= 16 / 0.05, row  # 32 samples in >= 0.1 s, not 320


# --- checkpoints that hold nonsense -------------------------------------------------------------

BASE = ("--model", "mlp", "--dataset", "synthetic", "--epochs", 1)


@pytest.fixture(scope="module")
def base_run(tmp_path_factory):
    """One rank, 52 steps of 32: step 40 is mid-epoch (1280 samples in)."""
    out = tmp_path_factory.mktemp("base")
    done = distprop("train", *BASE, "--checkpoint-every", 40, "--keep-checkpoints", 0,
                    "--out", out)
    assert done.returncode == 0, done.stdout + done.stderr
    return out


def _pos(**values):
    def change(state):
        state["position"].update(values)
    return change


def _drop(*keys):
    def change(state):
        holder = state
        for key in keys[:-1]:
            holder = holder[key]
        del holder[keys[-1]]
    return change


def _other_shape(state):
    state["model"]["0.weight"] = np.zeros((1024, 64), np.float32)


def _other_architecture(state):
    state["model"]["5.weight"] = state["model"].pop("4.weight")


def _old_format_other_world(state):
    state["position"] = {"epoch": 0, "step": 40, "batch_in_epoch": 40, "sampler_epoch": 0,
                         "grad_accum": 1, "world_size": 2, "seed": 0, "stopped": False}
    state["ranks"] = state["ranks"] * 2


def _set(key, value):
    def change(state):
        state[key] = value
    return change


def _rank0(key, value):
    def change(state):
        state["ranks"][0][key] = value
    return change


NONSENSE = [
    ("world size 0", _pos(world_size=0), "position.world_size must be an integer >= 1, got 0"),
    ("world size -2", _pos(world_size=-2), "position.world_size must be an integer >= 1, got -2"),
    ("negative step", _pos(step=-1), "position.step must be an integer >= 0, got -1"),
    ("step before its epoch", _pos(step=0), "position.step is 0, fewer than the 1 optimizer "
                                            "step(s) that 0 finished epoch(s) and one started"),
    ("epoch without history", _pos(epoch=1), "history has 0 epoch record(s), but "
                                             "position.epoch is 1"),
    ("epoch as text", _pos(epoch="0"), "position.epoch must be an integer >= 0, got '0'"),
    ("stopped as a number", _pos(stopped=3), "position.stopped must be true or false, got 3"),
    ("sample past the epoch", _pos(samples_in_epoch=10**6), "position.samples_in_epoch is "
                                                            "1000000, more than the 1638"),
    ("other training set", _pos(epoch_samples=2000), "position.epoch_samples is 2000, but this "
                                                     "training set has 1638 samples"),
    ("no position", _drop("position"), "position is missing"),
    ("no epoch", _drop("position", "epoch"), "position.epoch is missing"),
    ("no ranks", _drop("ranks"), "ranks is missing"),
    ("ranks not a list", _set("ranks", None), "ranks must be a list of one entry per rank of the 1 "
                                          "that wrote it, got NoneType"),
    ("sums as text", _rank0("sums", ["x"] * 6), "ranks[0].sums must be a list of an even "
                                                "number (at least 4) of numbers"),
    ("broken generator", _rank0("rng", {"bit_generator": "PCG64"}), "ranks[0].rng is not a "
                                                                    "valid generator state"),
    ("model as a list", _set("model", []), "model must be a mapping, got list"),
    ("model of another shape", _other_shape, "model['0.weight'] has shape (1024, 64), this model "
                                             "(1024, 32)"),
    ("model of another architecture", _other_architecture, "model is a different model "
                                                           "(another architecture): it lacks "
                                                           "4.weight; it has 5.weight"),
    ("optimizer without groups", lambda s: s["optimizer"].update(param_groups={}),
     "optimizer.param_groups must be a list of mappings"),
    ("not a training run", _set("kind", "notes"), "kind is 'notes': a checkpoint, but not of a "
                                                  "training run"),
    ("old format mid-epoch on 1 rank", _old_format_other_world,
     "position.batch_in_epoch counts micro-batches (written by an older distprop that did not "
     "record the batch size), so this mid-epoch checkpoint can only be resumed on 2 rank(s) "
     "with --grad-accum 1"),
]


def _write_nonsense(base_run, change, path):
    state = dp.load(ckpt_path(base_run, 40))
    change(state)
    ckpt.save(state, path)  # a valid file with a valid checksum
    return path


@pytest.mark.parametrize("change,message", [row[1:] for row in NONSENSE],
                         ids=[row[0] for row in NONSENSE])
def test_nonsense_checkpoint_is_a_usage_error_naming_file_and_field(base_run, tmp_path, change,
                                                                    message):
    bad = _write_nonsense(base_run, change, tmp_path / "bad.npz")
    result = CliRunner().invoke(cli, ["train", *map(str, BASE), "--resume", str(bad), "--out",
                                      str(tmp_path / "out")], catch_exceptions=False)
    assert result.exit_code == 2, result.output
    flat = " ".join(result.output.split())
    assert f"checkpoint {bad} is not usable: {message}" in flat
    assert "Traceback" not in result.output
    assert not (tmp_path / "out" / "summary.json").exists()


def test_resume_auto_skips_nonsense_checkpoints_and_takes_the_newest_valid_one(base_run,
                                                                            tmp_path):
    out = tmp_path / "run"
    (out / "checkpoints").mkdir(parents=True)
    good = shutil.copy(ckpt_path(base_run, 40), ckpt_path(out, 40))
    bad = {90: _other_shape, 91: _pos(world_size=0), 92: _other_architecture}
    for step, change in bad.items():
        _write_nonsense(base_run, change, ckpt_path(out, step))
    done = distprop("train", "-n", 2, *BASE, "--out", out, "--resume", "auto")
    assert done.returncode == 0, done.stdout + done.stderr
    for step, message in ((90, "model['0.weight'] has shape (1024, 64)"),
                          (91, "position.world_size must be an integer >= 1, got 0"),
                          (92, "model is a different model (another architecture)")):
        assert (f"skipping unusable checkpoint: checkpoint {ckpt_path(out, step)} is not "
                f"usable: {message}") in done.stdout
    assert f"--resume auto: continuing from {good}" in done.stdout
    assert "Traceback" not in done.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["resumed_from"] == str(good)
    assert summary["steps"] == 40 + math.ceil((N_TRAIN - 1280) / 64)  # 2 ranks x 32 from 1280


def test_resume_log_says_how_scale_lr_changed_the_rate(tmp_path):
    args = ("--model", "mlp", "--dataset", "synthetic", "--epochs", 1, "--batch-size", 32,
            "--checkpoint-every", 10, "--scale-lr")  # 26 steps on 2 ranks, lr 0.1 x 2
    done = distprop("train", "-n", 2, *args, "--out", tmp_path / "two")
    assert done.returncode == 0, done.stdout + done.stderr
    done = distprop("train", *args, "--out", tmp_path / "one", "--resume",
                    ckpt_path(tmp_path / "two", 20))
    assert done.returncode == 0, done.stdout + done.stderr
    assert ("written by 2 rank(s) (grad_accum 1): global batch 64 -> 32, steps per epoch 26 -> "
            "52, lr 0.2 -> 0.1 (--scale-lr: lr x ranks), scheduled on the fraction of training "
            "done; epoch 1 continues at sample 1280 of 1638") in done.stdout
