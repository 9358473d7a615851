"""The registries (distprop/registry.py): each list of names is declared once and the CLI, the
configuration checks, ``distprop --help``/``info`` and the README follow it.

Adding an optimizer, a schedule or a loss is one ``register`` call: the rows below register a
toy in the registry (and remove it after) and check that the CLI lists it, validates it and
trains with it.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from click.testing import CliRunner

from distprop import nn, optim, registry
from distprop.cli import cli
from distprop.train import run, schedule, tasks
from distprop.train.config import ConfigError, TrainConfig

from helpers import REPO

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
COMMANDS = ("train", "launch", "info", "bench", "evaluate", "predict", "export")


def train_help() -> str:
    done = CliRunner().invoke(cli, ["train", "--help"], terminal_width=200,
                              catch_exceptions=False)
    assert done.exit_code == 0, done.output
    return " ".join(done.output.split())  # wrapped help, as one line


def dry_run(tmp_path, *args) -> dict:
    """``distprop train ... --dry-run`` in-process: validation and :func:`run.check` (which
    builds the model, the optimizer and the schedule), then the resolved configuration."""
    done = CliRunner().invoke(cli, ["train", "--model", "mlp", "--dataset", "digits",
                                    "--out", str(tmp_path / "run"), "--dry-run", *args],
                              catch_exceptions=False)
    assert done.exit_code == 0, done.output
    return json.loads(done.output)


# --- one register call: the CLI lists, validates and uses the new name --------------------------

def _toy_regression_file(tmp_path) -> str:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((64, 4)).astype(np.float32)
    path = tmp_path / "reg.npz"
    np.savez(path, x=x, y=x.sum(axis=1).astype(np.float32))
    return str(path)


TOYS = [
    # registry, entry, option, extra train arguments (a callable of tmp_path), help fragment
    ("OPTIMIZERS",
     registry.OptimizerEntry("toysgd", "plain SGD, for the registry test", optim.SGD,
                             default_lr=0.0625),
     "--optimizer", lambda tmp: [], "0.0625 for toysgd"),
    ("LR_SCHEDULES", registry.Entry("toyhalf", "half the rate throughout", lambda q: 0.5),
     "--lr-schedule", lambda tmp: [], "toyhalf: half the rate throughout"),
    ("LOSSES", registry.LossEntry("toyl1", "mean absolute error", nn.L1Loss, task="regression"),
     "--loss", lambda tmp: ["--task", "regression", "--dataset", _toy_regression_file(tmp)],
     "[cross_entropy|mse|huber|toyl1]"),
]


@pytest.fixture
def registered(request):
    """Register the row's toy entry for the test, and remove it after."""
    kind, entry = request.param
    reg = getattr(registry, kind)
    reg.register(entry)
    yield reg, entry
    reg.unregister(entry.name)


@pytest.mark.parametrize(("registered", "option", "extra", "fragment"),
                         [((kind, entry), option, extra, fragment)
                          for kind, entry, option, extra, fragment in TOYS],
                         indirect=["registered"], ids=[row[0] for row in TOYS])
def test_a_registered_name_is_listed_validated_and_used(registered, option, extra, fragment,
                                                        tmp_path):
    reg, entry = registered
    text = train_help()
    assert entry.name in text and fragment in text, text
    cfg = dry_run(tmp_path, option, entry.name, *extra(tmp_path))
    assert cfg[option.lstrip("-").replace("-", "_")] == entry.name
    reg.unregister(entry.name)
    try:
        assert entry.name not in train_help()
        with pytest.raises((ConfigError, ValueError), match=f"{entry.name}"):
            TrainConfig(**{option.lstrip("-").replace("-", "_"): entry.name},
                        **({"task": "regression"} if reg is registry.LOSSES else {})
                        ).validate(1)
    finally:
        reg.register(entry)


def test_a_toy_optimizer_builds_with_its_default_rate_and_momentum_flag():
    entry = registry.OPTIMIZERS.register(registry.OptimizerEntry(
        "toymom", "SGD taking --momentum", optim.SGD, default_lr=0.25, momentum=True))
    try:
        cfg = TrainConfig(optimizer="toymom", momentum=0.5).validate(1)
        opt = run.build_optimizer(cfg, nn.Linear(2, 2).parameters())
        assert isinstance(opt, optim.SGD)
        assert opt.param_groups[0]["lr"] == 0.25 and opt.param_groups[0]["momentum"] == 0.5
    finally:
        registry.OPTIMIZERS.unregister(entry.name)
    with pytest.raises(ConfigError, match="unknown optimizer 'toymom'; choose one of sgd, adam"):
        TrainConfig(optimizer="toymom").validate(1)


def test_a_toy_optimizer_trains_in_a_real_process(tmp_path):
    """A plugin registers its optimizer, then ``distprop train`` runs with it (real process)."""
    script = textwrap.dedent(f"""
        import sys
        from distprop import optim, registry
        from distprop.cli import main

        def toy(params, lr, weight_decay):
            print("toy optimizer built, lr", lr, file=sys.stderr)
            return optim.SGD(params, lr=lr, weight_decay=weight_decay)

        registry.OPTIMIZERS.register(registry.OptimizerEntry("toy", "a plugin's", toy,
                                                             default_lr=0.05))
        main(["train", "--model", "mlp", "--hidden", "16", "--dataset", "digits",
              "--epochs", "1", "--optimizer", "toy", "--out", {str(tmp_path / "run")!r}])
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=240, env={**ENV, "DISTPROP_BACKEND": "single"}, cwd=str(REPO))
    assert done.returncode == 0, done.stderr[-3000:]
    assert "toy optimizer built, lr 0.05" in done.stderr
    assert (tmp_path / "run" / "summary.json").is_file()


# --- the lists the modules use are the registries' ----------------------------------------------

def test_modules_read_the_registries():
    assert tasks.losses_of("regression") == ("mse", "huber")
    assert tasks.default_loss("classification") == "cross_entropy"
    assert schedule.progress_schedules() == tuple(n for n in registry.LR_SCHEDULES
                                                  if n != "plateau")
    from distprop.distributed import compression, selection

    assert compression.KINDS == ("fp16", "bf16")
    assert tuple(selection.COMM_CHOICES) == ("auto", "nccl", "mpi-cuda", "mpi-host", "mpi", "shm")
    from distprop.distributed.comm import Communicator

    for name, entry in registry.COMMS.items():  # make_comm builds these by name
        if entry.factory is not None:
            assert issubclass(entry.load(), Communicator), name
    from distprop.train import modelspec

    assert modelspec.size_options("cnn") == ("channels",)
    assert modelspec.size_options("wide") == ()
    assert modelspec.size_options("resnet") is None


def test_registry_refuses_a_taken_or_empty_name():
    with pytest.raises(ValueError, match="optimizer 'sgd' is already registered"):
        registry.OPTIMIZERS.register(registry.OptimizerEntry("sgd", "again", optim.SGD))
    with pytest.raises(ValueError, match="needs a non-empty name"):
        registry.OPTIMIZERS.register(registry.OptimizerEntry("", "nameless", optim.SGD))
    with pytest.raises(ValueError, match="unknown comm 'gloo'; choose one of auto, nccl"):
        registry.COMMS.lookup("gloo")


# --- environment variables: every DISTPROP_* read anywhere is in the table ----------------------

def _source_env_names() -> set[str]:
    names = set()
    for path in (REPO / "distprop").rglob("*.py"):
        if path.name == "registry.py":
            continue
        names.update(re.findall(r"DISTPROP_[A-Z0-9_]*[A-Z0-9]", path.read_text()))
    return names


def test_every_distprop_variable_in_the_source_is_in_the_table():
    names = _source_env_names()
    assert "DISTPROP_STALL_TIMEOUT" in names and "DISTPROP_TRACE" in names  # the scan works
    missing = sorted(n for n in names if registry.env_entry(n, COMMANDS) is None
                     and not n.startswith("DISTPROP_TRAIN"))  # the DISTPROP_TRAIN_<OPTION> text
    assert not missing, f"add these to distprop.registry.ENV_VARS: {missing}"
    stale = sorted(n for n in registry.ENV_VARS if "<" not in n and n not in names)
    assert not stale, f"distprop no longer reads: {stale}"


def test_help_and_info_list_the_variables():
    done = subprocess.run([sys.executable, "-m", "distprop", "--help"], capture_output=True,
                          text=True, timeout=120, env={**ENV, "COLUMNS": "200"}, cwd=str(REPO))
    assert done.returncode == 0, done.stderr
    text = " ".join(done.stdout.split())  # wrapped at 100 columns
    for name, entry in registry.ENV_VARS.items():
        assert f"{name} {entry.description}" in text, name
    env = {**ENV, "DISTPROP_STAL_TIMEOUT": "5", "DISTPROP_INIT_TIMEOUT": "30"}
    done = subprocess.run([sys.executable, "-m", "distprop", "info", "--no-mpi-init"],
                          capture_output=True, text=True, timeout=120, env=env, cwd=str(REPO))
    assert done.returncode == 0, done.stderr
    assert "DISTPROP_STAL_TIMEOUT=5: not read by distprop (a typo?)" in done.stdout
    assert ("DISTPROP_INIT_TIMEOUT=30: " + registry.ENV_VARS["DISTPROP_INIT_TIMEOUT"].description
            in done.stdout)


# --- the README's lists are the registries' -----------------------------------------------------

README_LISTS = {"model": registry.MODELS, "optimizer": registry.OPTIMIZERS,
                "lr-schedule": registry.LR_SCHEDULES}


def readme_mismatches(text: str) -> list[str]:
    """What the README says that the registries do not (empty when they agree)."""
    out = []
    for option, reg in README_LISTS.items():
        found = re.findall(rf"`--{option} ([\w|-]+)`", text)
        if not found:
            out.append(f"no `--{option} a|b|...` list")
        for listed in found:
            if listed.split("|") != list(reg):
                out.append(f"--{option}: README {listed}, registry {'|'.join(reg)}")
    for name in sorted(set(re.findall(r"DISTPROP_[A-Z0-9_]*[A-Z0-9]", text))):
        if registry.env_entry(name, COMMANDS) is None and not name.startswith("DISTPROP_TRAIN"):
            out.append(f"README names {name}, which distprop does not read")
    table = re.findall(r"^\| `(DISTPROP_[^`]+)` \|", text, flags=re.M)
    if table and table != list(registry.ENV_VARS):
        out.append(f"README's variable table {table}, registry {list(registry.ENV_VARS)}")
    return out


def test_readme_lists_match_the_registries():
    text = (REPO / "README.md").read_text()
    assert readme_mismatches(text) == []
    assert "| `DISTPROP_" in text, "the README has lost its table of environment variables"


def test_readme_check_sees_drift():
    text = (REPO / "README.md").read_text()
    entry = registry.OPTIMIZERS.register(registry.OptimizerEntry("toydrift", "-", optim.SGD))
    try:
        assert any("--optimizer" in m for m in readme_mismatches(text))
    finally:
        registry.OPTIMIZERS.unregister(entry.name)
    assert any("DISTPROP_NOPE" in m for m in readme_mismatches(text + "\n`DISTPROP_NOPE=1`\n"))
    drifted = text.replace("| `DISTPROP_TRACE` |", "| `DISTPROP_TRACED` |")
    assert drifted != text and any("table" in m for m in readme_mismatches(drifted))
    assert readme_mismatches(text) == []
