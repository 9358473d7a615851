"""Issue 16 items 3 and 4: models the user brings (``--model pkg.mod:factory``), zoo size options,
Trainer ``metrics=`` reduced exactly across ranks, ``--task regression`` end to end, and the
progress ``fit`` reports by default."""

from __future__ import annotations

import json
import os
import pty
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

import distprop as dp
from distprop import nn
from distprop.cli import cli
from distprop.train import modelspec

from helpers import REPO, run_mpi

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1",
       "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}

FACTORIES = '''
import math
import distprop as dp

NOT_CALLABLE = 3

def good(input_shape, num_classes):
    return dp.nn.Sequential(dp.nn.Flatten(), dp.nn.Linear(math.prod(input_shape), 24),
                            dp.nn.ReLU(), dp.nn.Linear(24, num_classes))

def raises(input_shape, num_classes):
    raise RuntimeError("boom in the factory")

def returns_list(input_shape, num_classes):
    return [1, 2]

def wrong_width(input_shape, num_classes):
    return dp.nn.Linear(math.prod(input_shape), num_classes + 1)

def bad_forward(input_shape, num_classes):
    return dp.nn.Linear(math.prod(input_shape) + 1, num_classes)

def positional(shape, classes):
    return dp.nn.Linear(shape[0], classes)
'''


def distprop(*args, cwd, timeout=240):
    return subprocess.run([sys.executable, "-m", "distprop", *map(str, args)],
                          capture_output=True, text=True, timeout=timeout, env=ENV, cwd=str(cwd))


@pytest.fixture
def factory_dir(tmp_path, monkeypatch):
    """A directory holding ``usermodels.py`` (and a module that fails to import), as cwd."""
    (tmp_path / "usermodels.py").write_text(FACTORIES)
    (tmp_path / "brokenmodels.py").write_text("raise ImportError('needs a package you lack')\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", list(sys.path))
    yield tmp_path
    for name in ("usermodels", "brokenmodels"):
        sys.modules.pop(name, None)


def _dry_run(*args):
    """``distprop train ... --dry-run`` in this process: every check before launching runs."""
    return CliRunner().invoke(cli, ["train", "--epochs", "1", "--dry-run", "--out", "runs/x",
                                    *map(str, args)], catch_exceptions=False)


# --- models the user brings ---------------------------------------------------------------------

BAD_MODELS = [
    ("unknown zoo name", "nope", "choose one of mlp, cnn, lstm, transformer, wide or a "
                                  "factory 'package.module:callable'"),
    ("malformed spec", "a:b:c", "neither a zoo model nor a factory 'package.module:callable'"),
    ("module missing", "nosuchmodule:f", "cannot import 'nosuchmodule': ModuleNotFoundError"),
    ("import fails", "brokenmodels:f", "cannot import 'brokenmodels': ImportError: needs a "
                                       "package you lack"),
    ("no such attribute", "usermodels:missing", "module 'usermodels' has no attribute 'missing'"),
    ("not callable", "usermodels:NOT_CALLABLE", "'NOT_CALLABLE' is not callable (it is of type "
                                                "int)"),
    ("factory raises", "usermodels:raises", "the factory raised RuntimeError: boom in the factory "
                                            "(called as factory(input_shape=(64,), "
                                            "num_classes=10))"),
    ("returns no Module", "usermodels:returns_list", "the factory returned a list, not a "
                                                     "dp.nn.Module"),
    ("output of another width", "usermodels:wrong_width", "gives outputs of shape (2, 11), "
                                                          "expected (batch, 10) for 10 classes"),
    ("forward fails", "usermodels:bad_forward", "does not fit dataset 'digits' (samples of shape "
                                                "(64,)): ValueError"),
    ("positional signature", "usermodels:positional", "unexpected keyword argument "
                                                      "'input_shape'"),
]


@pytest.mark.parametrize("case, spec, piece", BAD_MODELS, ids=[b[0] for b in BAD_MODELS])
def test_a_bad_model_is_one_line_and_exit_2(factory_dir, case, spec, piece):
    result = _dry_run("--model", spec)
    assert result.exit_code == 2, result.output
    assert piece in result.output
    assert "Invalid value for --model" in result.output
    assert "Traceback" not in result.output
    assert sum(line.startswith("Error:") for line in result.output.splitlines()) == 1


def test_factory_is_called_with_the_data_shape_and_class_count(factory_dir):
    model = modelspec.build("usermodels:good", (8, 8), 7)
    out = model(dp.tensor(np.zeros((3, 8, 8), dtype=np.float32)))
    assert out.shape == (3, 7)
    assert model[1].in_features == 64


@pytest.mark.mpi
def test_factory_run_trains_on_two_ranks_and_is_evaluable_and_exportable(tmp_path):
    (tmp_path / "usermodels.py").write_text(FACTORIES)
    done = distprop("train", "-n", 2, "--model", "usermodels:good", "--dataset", "digits",
                    "--epochs", 1, "--out", "run", cwd=tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["config"]["model"] == "usermodels:good"
    assert summary["parameters"] == 64 * 24 + 24 + 24 * 10 + 10
    ev = distprop("evaluate", "run", "--json", cwd=tmp_path)
    assert ev.returncode == 0, ev.stderr
    result = json.loads(ev.stdout)
    assert result["accuracy"] == summary["test"]["accuracy"]
    assert result["loss"] == pytest.approx(summary["test"]["loss"], rel=1e-6)
    ex = distprop("export", "run", "-o", "w.npz", cwd=tmp_path)
    assert ex.returncode == 0, ex.stderr
    with np.load(tmp_path / "w.npz") as weights:
        assert weights["1.weight"].shape == (24, 64)
    # from another directory the factory cannot be imported: one line, exit 2, with the reason
    away = distprop("evaluate", tmp_path / "run", cwd=REPO)
    assert away.returncode == 2
    assert "cannot import 'usermodels'" in away.stderr and "current directory" in away.stderr
    assert "Traceback" not in away.stderr


# --- size options of the zoo --------------------------------------------------------------------

BAD_SIZES = [
    (("--model", "mlp", "--channels", 8), "--channels", "--channels does not apply to model "
                                                        "'mlp' (it takes --hidden, --layers)"),
    (("--model", "cnn", "--hidden", 8), "--hidden", "--hidden does not apply to model 'cnn' (it "
                                                    "takes --channels)"),
    (("--model", "wide", "--layers", 2), "--layers", "--layers does not apply to model 'wide' "
                                                     "(it takes no size options)"),
    (("--model", "mlp", "--hidden", 0), "--hidden", "--hidden must be between 1 and 65536, got 0"),
    (("--model", "lstm", "--layers", 65), "--layers", "--layers must be between 1 and 64, got "
                                                      "65"),
    (("--model", "cnn", "--channels", -1), "--channels", "--channels must be between 1 and 4096"),
    (("--model", "transformer", "--hidden", 30), "--hidden", "must be a multiple of its 4 "
                                                             "attention heads"),
    (("--model", "usermodels:good", "--hidden", 8), "--hidden", "--hidden does not apply to a "
                                                                "model factory"),
]


@pytest.mark.parametrize("args, hint, piece", BAD_SIZES, ids=[" ".join(map(str, b[0]))
                                                              for b in BAD_SIZES])
def test_a_bad_size_option_is_refused(factory_dir, args, hint, piece):
    result = _dry_run(*args)
    assert result.exit_code == 2, result.output
    assert f"Invalid value for {hint}" in result.output and piece in result.output


def _linear_shapes(model):
    return [tuple(m.weight.shape) for m in model.modules() if isinstance(m, nn.Linear)]


GOOD_SIZES = [
    ("mlp", (64,), {"hidden": 16, "layers": 3}, lambda m: _linear_shapes(m) == [
        (16, 64), (16, 16), (16, 16), (10, 16)]),
    ("mlp", (64,), {"hidden": 16}, lambda m: _linear_shapes(m) == [(16, 64), (16, 16), (10, 16)]),
    ("mlp", (64,), {"layers": 1}, lambda m: _linear_shapes(m) == [(1024, 64), (10, 1024)]),
    ("cnn", (64,), {"channels": 4}, lambda m: [tuple(c.weight.shape[:2]) for c in m.modules()
                                               if isinstance(c, nn.Conv2d)] == [(4, 1), (8, 4)]),
    ("cnn", (40,), {"channels": 3}, lambda m: [tuple(c.weight.shape[:2]) for c in m.modules()
                                               if isinstance(c, nn.Conv1d)] == [(3, 1), (6, 3)]),
    ("lstm", (64,), {"hidden": 12, "layers": 2},
     lambda m: m.lstm.hidden_size == 12 and m.lstm.num_layers == 2),
    ("transformer", (64,), {"hidden": 16, "layers": 1},
     lambda m: m.fc.in_features == 16 and len(m.encoder.layers) == 1),
]


@pytest.mark.parametrize("name, shape, sizes, check", GOOD_SIZES,
                         ids=[f"{g[0]}-{g[2]}" for g in GOOD_SIZES])
def test_size_options_shape_the_zoo_model(name, shape, sizes, check):
    model = modelspec.build(name, shape, 10, **sizes)
    inner = model[-1] if isinstance(model, nn.Sequential) and name in ("lstm", "transformer") \
        else model
    assert check(inner)
    out = model(dp.tensor(np.zeros((2, *shape), dtype=np.float32)))
    assert out.shape == (2, 10)


@pytest.mark.mpi
def test_a_sized_run_is_evaluable_and_exportable(tmp_path):
    done = distprop("train", "-n", 2, "--model", "mlp", "--hidden", 16, "--layers", 1,
                    "--epochs", 1, "--out", "run", cwd=tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["config"]["hidden"] == 16 and summary["config"]["layers"] == 1
    ev = distprop("evaluate", "run", "--json", cwd=tmp_path)
    assert ev.returncode == 0, ev.stderr
    assert json.loads(ev.stdout)["accuracy"] == summary["test"]["accuracy"]
    ex = distprop("export", "run", "-o", "w.npz", cwd=tmp_path)
    assert ex.returncode == 0, ex.stderr
    with np.load(tmp_path / "w.npz") as weights:
        assert {k: v.shape for k, v in weights.items()} == {
            "0.weight": (16, 64), "0.bias": (16,), "2.weight": (10, 16), "2.bias": (10,)}


# --- metrics reduced across ranks ---------------------------------------------------------------

METRICS_SCRIPT = """
import json
import numpy as np
import distprop as dp
from distprop import nn
from distprop.data import TensorDataset
from distprop.train import Trainer
from distprop.train.metrics import MeanAbsoluteError, R2Score

rng = np.random.default_rng(7)
x = rng.standard_normal((203, 5)).astype(np.float32)
# rank r of 2 evaluates samples r, r + 2, ...: give odd samples other targets, so that a mean of
# per-rank R^2 (or of per-rank means of unequal shards) differs from the global value
y = (x[:, :2] * [1.0, -2.0] + np.arange(203)[:, None] % 2 * 3.0).astype(np.float32)
data = TensorDataset(x, y)
dp.manual_seed(0)
model = nn.Linear(5, 2)

def sq_err_pair(out, target):            # (sum, count)
    return ((out - target) ** 2).sum(), target.shape[0] * target.shape[1]

def batch_mean_abs(out, target):         # one number: the batch mean
    return (out - target).abs().mean()

metrics = {"r2": R2Score(), "mae": MeanAbsoluteError(), "mse_pair": sq_err_pair,
           "mean_abs": batch_mean_abs}
trainer = Trainer(model, nn.MSELoss(), dp.optim.SGD(model.parameters(), lr=0.0),
                  metrics=metrics, progress=False)
result = trainer.evaluate(data, batch_size=16)
from distprop import distributed
comm = distributed.init()
# the per-rank values, to show a naive average would differ
from distprop.distributed.comm import SingleProcessCommunicator
local = Trainer(model, nn.MSELoss(), dp.optim.SGD(model.parameters(), lr=0.0), metrics=metrics,
                comm=SingleProcessCommunicator(), progress=False)
mine = local.evaluate(dp.data.Subset(data, np.arange(comm.rank, 203, comm.size)), batch_size=16)
every = comm.allgather_obj(mine)
if comm.rank == 0:
    print("RESULT " + json.dumps({"result": result, "per_rank": every}))
"""


def _metrics_result(done) -> dict:
    line = next(ln for ln in done.stdout.splitlines() if ln.startswith("RESULT "))
    return json.loads(line[len("RESULT "):])


@pytest.mark.mpi
def test_metrics_on_two_ranks_equal_one_process_on_the_same_data():
    two = run_mpi(METRICS_SCRIPT, nprocs=2, timeout=180)
    assert two.returncode == 0, two.stdout + two.stderr
    one = subprocess.run([sys.executable, "-c", textwrap.dedent(METRICS_SCRIPT)],
                         capture_output=True, text=True, timeout=180, env=ENV, cwd=str(REPO))
    assert one.returncode == 0, one.stdout + one.stderr
    got, ref = _metrics_result(two)["result"], _metrics_result(one)["result"]
    assert got["samples"] == ref["samples"] == 203
    for name in ("loss", "r2", "mae", "mse_pair", "mean_abs"):
        # float32 per-batch values summed in another order: equal up to float32 rounding
        assert got[name] == pytest.approx(ref[name], rel=1e-6), name
    # and they are the textbook values on the global data, not averages of per-rank values
    rng = np.random.default_rng(7)
    x = rng.standard_normal((203, 5)).astype(np.float32)
    y = (x[:, :2] * [1.0, -2.0] + np.arange(203)[:, None] % 2 * 3.0).astype(np.float32)
    dp.manual_seed(0)
    lin = nn.Linear(5, 2)
    pred = (x @ lin.weight.numpy().T + lin.bias.numpy()).astype(np.float64)
    err = pred - y
    sst = ((y - y.mean(axis=0)) ** 2).sum(axis=0)
    r2 = float(np.mean(1 - (err**2).sum(axis=0) / sst))
    assert got["r2"] == pytest.approx(r2, rel=1e-6)
    assert got["mae"] == pytest.approx(float(np.abs(err).mean()), rel=1e-6)
    assert got["mse_pair"] == pytest.approx(float((err**2).mean()), rel=1e-6)
    assert got["mean_abs"] == pytest.approx(float(np.abs(err).mean()), rel=1e-6)
    per_rank = _metrics_result(two)["per_rank"]
    naive = np.mean([p["r2"] for p in per_rank])
    assert abs(naive - r2) > 1e-3  # the test tells an exact reduction from averaging


def test_a_metric_of_the_wrong_kind_is_refused():
    with pytest.raises(TypeError, match="a metric must be callable or a Metric, got int"):
        dp.train.Trainer(nn.Linear(2, 2), nn.MSELoss(),
                         dp.optim.SGD(nn.Linear(2, 2).parameters(), lr=0.1),
                         metrics={"bad": 3}, progress=False).fit(
            dp.data.TensorDataset(np.zeros((4, 2), np.float32), np.zeros((4, 2), np.float32)))


# --- regression end to end ----------------------------------------------------------------------


def _regression_file(path: Path, width: int | None) -> Path:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((800, 6)).astype(np.float32)
    w = rng.standard_normal((6, width or 1)).astype(np.float32)
    y = (x @ w + 0.05 * rng.standard_normal((800, width or 1))).astype(np.float32)
    np.savez(path, x=x, y=y if width else y[:, 0])
    return path


@pytest.mark.mpi
@pytest.mark.parametrize("width, loss", [(2, "mse"), (None, "huber")])
def test_regression_trains_on_two_ranks_and_evaluate_reproduces_the_summary(tmp_path, width,
                                                                          loss):
    data = _regression_file(tmp_path / "reg.npz", width)
    done = distprop("train", "-n", 2, "--task", "regression", "--loss", loss, "--dataset", data,
                    "--model", "mlp", "--hidden", 32, "--layers", 1, "--optimizer", "adam",
                    "--lr", 0.01, "--epochs", 12, "--out", "run", cwd=tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    assert " r2 " in done.stdout and " mae " in done.stdout
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["task"] == "regression" and summary["num_outputs"] == (width or 1)
    test = summary["test"]
    assert test["r2"] > 0.9, test
    for how in ((), ("-n", 2)) if width else ((),):
        ev = distprop("evaluate", "run", "--json", *how, cwd=tmp_path)
        assert ev.returncode == 0, ev.stderr
        result = json.loads(ev.stdout)
        assert result["samples"] == test["samples"]
        for name in ("loss", "r2", "mae"):
            assert result[name] == pytest.approx(test[name], rel=1e-6), (how, name)
    np.save(tmp_path / "x.npy", np.load(data)["x"][:5])
    pr = distprop("predict", "run", "--input", "x.npy", "--output", "p.npy", cwd=tmp_path)
    assert pr.returncode == 0, pr.stderr
    assert np.load(tmp_path / "p.npy").shape == (5, width or 1)
    probs = distprop("predict", "run", "--input", "x.npy", "--output", "q.npy", "--probs",
                     cwd=tmp_path)
    assert probs.returncode == 2 and "regression run" in probs.stderr
    header = (tmp_path / "run" / "metrics.csv").read_text().splitlines()[0]
    assert "r2" in header.split(",") and "val_mae" in header.split(",")


BAD_TASKS = [
    (("--task", "regression"), "--dataset", "--task regression needs an .npz file"),
    (("--task", "regression", "--loss", "cross_entropy"), "--loss",
     "--loss cross_entropy does not apply to --task regression; choose one of mse, huber"),
    (("--loss", "huber"), "--loss", "--loss huber does not apply to --task classification"),
    (("--task", "regression", "--num-classes", 3), "--num-classes",
     "--num-classes does not apply to --task regression"),
]


@pytest.mark.parametrize("args, hint, piece", BAD_TASKS, ids=[" ".join(map(str, b[0]))
                                                              for b in BAD_TASKS])
def test_a_bad_task_option_is_refused(tmp_path, monkeypatch, args, hint, piece):
    monkeypatch.chdir(tmp_path)
    data = _regression_file(tmp_path / "reg.npz", 2)
    extra = ("--dataset", data) if "--num-classes" in args or "cross_entropy" in args else ()
    result = _dry_run(*args, *extra)
    assert result.exit_code == 2, result.output
    assert f"Invalid value for {hint}" in result.output and piece in result.output


@pytest.mark.parametrize("content, piece", [
    ({"x": np.zeros((10, 3)), "y": np.array(["a"] * 10)}, "expected float targets"),
    ({"x": np.zeros((10, 3)), "y": np.zeros((9,))}, "has shape (9,); expected (10,) or (10, k)"),
    ({"x": np.zeros((10, 3)), "y": np.full((10, 2), np.nan)}, "non-finite value (NaN or inf) "
                                                              "in sample 0"),
])
def test_bad_regression_data_is_refused(tmp_path, monkeypatch, content, piece):
    monkeypatch.chdir(tmp_path)
    np.savez(tmp_path / "bad.npz", **content)
    result = _dry_run("--task", "regression", "--dataset", tmp_path / "bad.npz")
    assert result.exit_code == 2, result.output
    assert "Invalid value for --dataset" in result.output and piece in result.output


# --- progress by default ------------------------------------------------------------------------

PROGRESS_SCRIPT = """
import sys
import numpy as np
import distprop as dp
from distprop import nn
from distprop.data import sources
from distprop.train import fit

data = sources.synthetic(n=200, shape=(8,), classes=4, seed=3, val_fraction=0, test_fraction=0)
dp.manual_seed(0)
model = nn.Linear(8, 4)
progress = {"default": None, "on": True, "off": False}[sys.argv[1]]
fit(model, nn.CrossEntropyLoss(), dp.optim.SGD(model.parameters(), lr=0.1), data.train,
    epochs=2, batch_size=32, prefetch=0, progress=progress)
print("done")
"""


def _fit_output(mode: str, tty: bool) -> tuple[str, str]:
    """stdout and stderr of a fit() run; stderr a pseudo-terminal when ``tty``."""
    cmd = [sys.executable, "-c", PROGRESS_SCRIPT, mode]
    if not tty:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=ENV)
        assert done.returncode == 0, done.stderr
        return done.stdout, done.stderr
    master, slave = pty.openpty()
    try:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=slave, text=True, env=ENV)
        os.close(slave)
        chunks = []
        while True:
            try:
                chunk = os.read(master, 4096)
            except OSError:  # EIO: the child closed the terminal
                break
            if not chunk:
                break
            chunks.append(chunk)
        stdout, _ = proc.communicate(timeout=120)
        assert proc.returncode == 0
    finally:
        os.close(master)
    return stdout, b"".join(chunks).decode(errors="replace")


@pytest.mark.parametrize("mode, tty, reports", [
    ("default", True, True),     # a terminal: progress by default
    ("default", False, False),   # not a terminal: quiet unless asked
    ("on", False, True),         # asked: plain epoch lines
    ("off", True, False),        # refused even on a terminal
])
def test_fit_reports_progress_by_default_on_a_terminal(mode, tty, reports):
    stdout, stderr = _fit_output(mode, tty)
    lines = [ln for ln in stdout.splitlines() if ln.startswith("epoch ")]
    if reports:
        assert [ln.split("  ")[0] for ln in lines] == ["epoch 1/2", "epoch 2/2"], stdout
        assert "loss " in lines[0] and "acc " in lines[0]
    else:
        assert lines == [], stdout
        assert "epoch" not in stderr
    assert stdout.rstrip().endswith("done")
