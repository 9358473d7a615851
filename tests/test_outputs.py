"""What the commands leave for the user: help on every option, CSV and PNG from every bench
sweep, epochs counted from 1 in the metrics files as on the console, the curves plot."""

from __future__ import annotations

import csv
import json
import shutil

import click
import pytest
from click.testing import CliRunner
from test_cli import distprop

from distprop.bench import report
from distprop.cli import cli
from distprop.train import run as run_mod


def _commands(group=cli, path=("distprop",)):
    for name, command in sorted(group.commands.items()):
        yield (*path, name), command
        if isinstance(command, click.Group):
            yield from _commands(command, (*path, name))


@pytest.mark.parametrize("path,command", list(_commands()),
                         ids=[" ".join(p) for p, _ in _commands()])
def test_every_option_has_a_help_text(path, command):
    missing = [p.opts[-1] for p in command.params
               if isinstance(p, click.Option) and not p.hidden and not (p.help or "").strip()]
    assert missing == [], f"{' '.join(path)}: options without help: {missing}"


# --- bench allreduce / peers: JSON lines, CSV and PNG, like bench scaling -----------------------


def _csv_rows(path):
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        return reader.fieldnames, list(reader)


def _jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.mpi
def test_bench_allreduce_writes_csv_and_png(tmp_path):
    result = CliRunner().invoke(cli, ["bench", "allreduce", "--sizes", "4KB,64KB", "--ranks", "2",
                                      "--repeats", "3", "--timeout", "120", "--out",
                                      str(tmp_path)], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    rows = _jsonl(tmp_path / "allreduce.jsonl")
    fields, table = _csv_rows(tmp_path / "allreduce.csv")
    assert tuple(fields) == report.ALLREDUCE_KEYS
    assert [(int(r["bytes"]), r["method"]) for r in table] == \
        [(r["bytes"], r["method"]) for r in rows] and len(rows) == 6
    assert all(float(r["busbw_gbs"]) > 0 for r in table)
    if _has_matplotlib():
        assert (tmp_path / "allreduce.png").read_bytes()[:4] == b"\x89PNG"
        assert f"# wrote {tmp_path / 'allreduce'}.jsonl, .csv, .png" in result.output
    else:
        assert "no PNG: install the 'plot' extra" in result.output


@pytest.mark.mpi
def test_bench_peers_writes_csv_and_png(tmp_path):
    result = CliRunner().invoke(cli, ["bench", "peers", "--model", "mlp", "--ranks", "1,2",
                                      "--batch-size", "8", "--steps", "2", "--warmup", "1",
                                      "--peers", "mpi-allreduce,gemm-floor", "--timeout", "120",
                                      "--out", str(tmp_path)], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    fields, table = _csv_rows(tmp_path / "peers-mlp.csv")
    assert tuple(fields) == report.PEERS_KEYS
    assert sorted((r["peer"], int(r["ranks"])) for r in table) == [
        ("distprop", 1), ("distprop", 2), ("gemm-floor", 1), ("mpi-allreduce", 2)]
    assert all(float(r["step_s"]) > 0 for r in table)
    fields, ratios = _csv_rows(tmp_path / "peers-mlp.ratios.csv")
    assert tuple(fields) == report.RATIO_KEYS
    assert sorted(r["peer"] for r in ratios) == ["gemm-floor", "mpi-allreduce"]
    if _has_matplotlib():
        assert (tmp_path / "peers-mlp.png").read_bytes()[:4] == b"\x89PNG"


def _has_matplotlib() -> bool:
    import importlib.util

    return importlib.util.find_spec("matplotlib") is not None


# --- epochs: counted from 1 in metrics.jsonl/csv and summary.json, as on the console ------------

TRAIN = ("--model", "mlp", "--dataset", "synthetic", "--epochs", 2, "--log-every", 10)


def _epochs(rows, kind):
    return [int(r["epoch"]) for r in rows if r["kind"] == kind]


def test_epochs_are_counted_from_one_in_the_files_as_on_the_console(tmp_path):
    out = tmp_path / "run"
    done = distprop("train", *TRAIN, "--out", out, timeout=180)
    assert done.returncode == 0, done.stderr
    assert "epoch 1/2" in done.stdout and "epoch 2/2" in done.stdout
    rows = _jsonl(out / "metrics.jsonl")
    assert _epochs(rows, "epoch") == [1, 2]
    assert set(_epochs(rows, "train")) == {1, 2}
    _, table = _csv_rows(out / "metrics.csv")
    assert _epochs(table, "epoch") == [1, 2]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["final"]["epoch"] == 2 and summary["epochs_run"] == 2
    last_step_of_epoch_1 = next(r["step"] for r in rows if r["kind"] == "epoch")
    assert all(r["epoch"] == 1 for r in rows if r["step"] <= last_step_of_epoch_1)


def test_resume_renumbers_a_metrics_file_counted_from_zero(tmp_path):
    """A run directory of an older version (epochs from 0) resumed: one numbering afterwards."""
    reference = tmp_path / "reference"
    done = distprop("train", *TRAIN, "--out", reference, timeout=180)
    assert done.returncode == 0, done.stderr
    out = tmp_path / "old"
    shutil.copytree(reference, out)
    old_rows = [{**r, "epoch": r["epoch"] - 1} for r in _jsonl(out / "metrics.jsonl")]
    (out / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in old_rows))
    first = sorted((out / "checkpoints").glob("checkpoint-*.npz"))[0]  # end of epoch 1
    done = distprop("train", *TRAIN, "--out", out, "--resume", first, timeout=180)
    assert done.returncode == 0, done.stderr
    got = [(r["kind"], r["epoch"], r["step"]) for r in _jsonl(out / "metrics.jsonl")]
    want = [(r["kind"], r["epoch"], r["step"]) for r in _jsonl(reference / "metrics.jsonl")]
    assert got == want


# --- curves.png: loss, accuracy, learning rate, test point, title -------------------------------


def test_curves_figure_has_the_lr_curve_the_test_point_and_a_title():
    pytest.importorskip("matplotlib")
    history = [{"epoch": e, "step": 10 * (e + 1), "loss": 1.0 / (e + 1), "accuracy": 0.5 + e / 10,
                "val_loss": 1.2 / (e + 1), "val_accuracy": 0.4 + e / 10, "lr": 0.1 / (e + 1)}
               for e in range(3)]
    steps = [{"step": s, "lr": 0.1 - s / 1000} for s in range(2, 31, 2)]
    fig = run_mod.curves_figure(history, steps, {"loss": 0.3, "accuracy": 0.8},
                                title="mlp on digits")
    try:
        axes = {ax.get_title(): ax for ax in fig.axes}
        assert set(axes) == {"loss", "accuracy", "learning rate"}
        assert fig._suptitle.get_text() == "mlp on digits"
        for name, value in (("loss", 0.3), ("accuracy", 0.8)):
            labels = [line.get_label() for line in axes[name].get_lines()]
            assert labels == ["train", "val", "test"]
            test_line = axes[name].get_lines()[2]
            assert list(test_line.get_xdata()) == [3] and list(test_line.get_ydata()) == [value]
        lr_line = axes["learning rate"].get_lines()[0]
        assert list(lr_line.get_xdata()) == sorted({*range(2, 31, 2), 10, 20, 30})
    finally:
        import matplotlib.pyplot as plt

        plt.close(fig)
