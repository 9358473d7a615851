"""Shared pieces of the restart and preemption tests: a tiny training run and its reference.

The run: ``mlp`` on ``digits``, 2 ranks, 1 epoch of 158 steps with a checkpoint every 20, so
a test can stop it after the first checkpoint and still be mid-training.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
from test_supervise import children, kill_all, start

RUN_ARGS = ("--model", "mlp", "--dataset", "digits", "--batch-size", 4, "--epochs", 1,
            "--log-every", 1000, "--checkpoint-every", 20)
TIMEOUT = 240  # one run takes ~35 s on a loaded 2-core machine

_reference: dict = {}


def final_params(out: Path) -> dict:
    """The model parameters of the newest checkpoint in ``out``."""
    import distprop as dp

    path = dp.train.list_checkpoints(out / "checkpoints")[-1]
    return {k: np.asarray(v) for k, v in dp.load(path)["model"].items()}


def finish(proc, timeout: float = TIMEOUT) -> tuple[str, str]:
    """Wait for a ``distprop`` process started with :func:`start`; kill what it left."""
    spawned = children(proc.pid)
    try:
        return proc.communicate(timeout=timeout)
    finally:
        kill_all(spawned + children(proc.pid))


def reference_params(tmp_path_factory) -> dict:
    """The parameters an uninterrupted run ends with (one run per test session)."""
    if not _reference:
        out = tmp_path_factory.mktemp("reference") / "run"
        proc = start("train", "-n", 2, *RUN_ARGS, "--out", out)
        _, err = finish(proc)
        assert proc.returncode == 0, err
        _reference.update(final_params(out))
    return _reference


def wait_for_checkpoint(out: Path, proc, step: int = 20, timeout: float = 180) -> None:
    """Wait until the checkpoint of ``step`` exists (the ranks are then inside ``fit``)."""
    deadline = time.monotonic() + timeout
    path = out / "checkpoints" / f"checkpoint-{step:09d}.npz"
    while not path.exists():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, f"no {path} after {timeout} s"
        time.sleep(0.05)


def assert_same_params(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert a[key].dtype == b[key].dtype and np.array_equal(a[key], b[key]), key
