"""After training: ``distprop evaluate | predict | export`` on real run directories, and weights
through safetensors into PyTorch and back (issue 16, items 1 and 2)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

import distprop as dp
from distprop import models, weights
from distprop.bench.torch_zoo import torch_model
from distprop.cli import cli
from distprop.train import after

from helpers import REPO, mpiexec_path

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def distprop(*args, timeout=240):
    return subprocess.run([sys.executable, "-m", "distprop", *map(str, args)],
                          capture_output=True, text=True, timeout=timeout, env=ENV,
                          cwd=str(REPO))


def invoke(*args):
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)


def _train(out: Path, *extra) -> dict:
    done = distprop("train", "--model", "mlp", "--dataset", "digits", "--epochs", 1,
                    "--out", out, *extra)
    assert done.returncode == 0, done.stdout + done.stderr
    return json.loads((out / "summary.json").read_text())


@pytest.fixture(scope="module")
def run1(tmp_path_factory) -> Path:
    """A real 1-epoch run on one process (mlp on digits: samples (64,), 10 classes)."""
    out = tmp_path_factory.mktemp("after") / "run1"
    _train(out)
    return out


@pytest.fixture(scope="module")
def run2(tmp_path_factory) -> Path:
    """The same on 2 ranks (distprop train -n 2)."""
    out = tmp_path_factory.mktemp("after") / "run2"
    _train(out, "-n", 2)
    return out


def _digits_test_inputs(n: int = 25) -> np.ndarray:
    splits = dp.data.sources.load("digits", seed=0)
    return splits.test.gather(np.arange(n))[0]


def _torch_twin_of_digits_mlp():
    tnn = torch.nn
    return tnn.Sequential(tnn.Linear(64, 1024), tnn.ReLU(), tnn.Linear(1024, 1024), tnn.ReLU(),
                          tnn.Linear(1024, 10))


# --- evaluate -----------------------------------------------------------------------------------


def test_evaluate_reproduces_the_summary_of_one_process(run1):
    done = distprop("evaluate", run1, "--json")
    assert done.returncode == 0, done.stderr
    got, want = json.loads(done.stdout), json.loads((run1 / "summary.json").read_text())["test"]
    assert got["accuracy"] == want["accuracy"] and got["samples"] == want["samples"] == 359
    assert got["loss"] == pytest.approx(want["loss"], rel=1e-6)
    assert got["checkpoint"].endswith(dp.train.list_checkpoints(run1 / "checkpoints")[-1].name)
    plain = distprop("evaluate", run1, "--split", "val")
    assert plain.returncode == 0 and plain.stdout.startswith("val: loss "), plain.stderr


@pytest.mark.mpi
@pytest.mark.parametrize("how", ["-n 2", "one process", "mpiexec -n 2"])
def test_evaluate_a_two_rank_run(run2, how):
    want = json.loads((run2 / "summary.json").read_text())["test"]
    if how == "-n 2":
        done = distprop("evaluate", run2, "--json", "-n", 2)
    elif how == "one process":
        done = distprop("evaluate", run2, "--json")
    else:
        done = subprocess.run([mpiexec_path(), "-n", "2", sys.executable, "-m", "distprop",
                               "evaluate", str(run2), "--json"], capture_output=True, text=True,
                              timeout=240, env=ENV, cwd=str(REPO))
    assert done.returncode == 0, done.stdout + done.stderr
    got = json.loads(done.stdout)  # rank 0 alone prints: one JSON document
    assert got["accuracy"] == want["accuracy"] and got["samples"] == want["samples"]
    assert got["loss"] == pytest.approx(want["loss"], rel=1e-5)


@pytest.mark.mpi
def test_evaluate_a_run_without_summary_uses_config_json(run2, tmp_path):
    """A run stopped before its end (launched with -n) has config.json but no summary.json."""
    run = tmp_path / "run"
    shutil.copytree(run2, run)
    want = json.loads((run / "summary.json").read_text())["test"]
    (run / "summary.json").unlink()
    done = distprop("evaluate", run, "--json")
    assert done.returncode == 0, done.stderr
    got = json.loads(done.stdout)
    assert got["accuracy"] == want["accuracy"] and got["samples"] == want["samples"]


def _no_valid_checkpoint(run: Path, tmp: Path) -> list:
    for p in dp.train.list_checkpoints(run / "checkpoints"):
        p.write_bytes(p.read_bytes()[:1000])
    return ["evaluate", run]


def _another_model(run: Path, tmp: Path) -> list:
    summary = json.loads((run / "summary.json").read_text())
    summary["config"]["model"] = "cnn"
    (run / "summary.json").write_text(json.dumps(summary))
    return ["evaluate", run]


def _dataset_of_another_shape(run: Path, tmp: Path) -> list:
    return ["evaluate", run, "--dataset", "synthetic"]


def _wrong_input_shape(run: Path, tmp: Path) -> list:
    np.save(tmp / "x.npy", np.zeros((3, 8, 8), np.float32))
    return ["predict", run, "--input", tmp / "x.npy", "--output", tmp / "y.npy"]


def _nan_input(run: Path, tmp: Path) -> list:
    x = _digits_test_inputs(4)
    x[2, 5] = np.nan
    np.save(tmp / "x.npy", x)
    return ["predict", run, "--input", tmp / "x.npy", "--output", tmp / "y.npy"]


def _pickled_input(run: Path, tmp: Path) -> list:
    np.save(tmp / "x.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    return ["predict", run, "--input", tmp / "x.npy", "--output", tmp / "y.npy"]


BAD = [  # (case, setup(run copy, tmp) -> argv, message pieces)
    ("not a directory", lambda run, tmp: ["evaluate", tmp / "nothing"],
     ["is not a directory", "run directory"]),
    ("not a run directory", lambda run, tmp: ["evaluate", tmp], ["is not a distprop run "
                                                                 "directory"]),
    ("no valid checkpoint", _no_valid_checkpoint, ["no valid checkpoint in", "verifies"]),
    ("missing --checkpoint", lambda run, tmp: ["export", run, "-o", tmp / "m.npz",
                                               "--checkpoint", tmp / "none.npz"],
     ["checkpoint", "none.npz does not exist"]),
    ("checkpoint of another model", _another_model, ["holds a different model", "cnn"]),
    ("dataset of another shape", _dataset_of_another_shape,
     ["samples of shape (32,)", "takes (64,)"]),
    ("input of another shape", _wrong_input_shape, ["shape (3, 8, 8)", "takes (N, 64)"]),
    ("input with NaN", _nan_input, ["non-finite", "sample 2"]),
    ("input needing pickle", _pickled_input, ["Python objects", "pickle"]),
    ("export format unknown", lambda run, tmp: ["export", run, "-o", tmp / "m.bin"],
     ["cannot tell the format", "--format"]),
]


@pytest.mark.parametrize("case, setup, pieces", BAD, ids=[b[0] for b in BAD])
def test_bad_input_is_one_line_and_exit_2(run1, tmp_path, case, setup, pieces):
    run = tmp_path / "run"
    shutil.copytree(run1, run)
    argv = setup(run, tmp_path)
    result = invoke(*argv)
    assert result.exit_code == 2, result.output
    error = [line for line in result.output.splitlines() if line.startswith("Error")]
    assert len(error) == 1 and "Traceback" not in result.output, result.output
    for piece in pieces:
        assert piece in error[0], error[0]
    assert not (tmp_path / "y.npy").exists() and not (tmp_path / "m.bin").exists()


# --- predict ------------------------------------------------------------------------------------


def test_predict_writes_the_models_logits_and_probabilities(run1, tmp_path):
    x = _digits_test_inputs()
    np.save(tmp_path / "x.npy", x.astype(np.float64))  # cast to float32 as in training
    for probs in (False, True):
        out = tmp_path / ("p.npy" if probs else "logits.npy")
        done = distprop("predict", run1, "--input", tmp_path / "x.npy", "--output", out,
                        *(["--probs"] if probs else []))
        assert done.returncode == 0, done.stderr
        got = np.load(out)
        assert got.dtype == np.float32 and got.shape == (25, 10)
        model, _ = after.load_model(after.open_run(run1))
        with dp.no_grad():
            logits = model(dp.tensor(x)).numpy()
        if probs:
            np.testing.assert_allclose(got.sum(axis=1), 1.0, rtol=1e-5)
            np.testing.assert_array_equal(got.argmax(axis=1), logits.argmax(axis=1))
        else:
            np.testing.assert_allclose(got, logits, rtol=1e-6, atol=1e-6)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["logits.npy", "p.npy", "x.npy"]


# --- export -------------------------------------------------------------------------------------


def test_cli_export_of_a_real_run_loads_into_torch_strictly(run1, tmp_path):
    x = _digits_test_inputs()
    np.save(tmp_path / "x.npy", x)
    assert distprop("predict", run1, "--input", tmp_path / "x.npy", "--output",
                    tmp_path / "y.npy").returncode == 0
    done = distprop("export", run1, "-o", tmp_path / "m.safetensors")
    assert done.returncode == 0, done.stderr
    state = load_file(str(tmp_path / "m.safetensors"))
    assert {k: v.dtype for k, v in state.items()} == {
        k: torch.float32 for k in ("0.weight", "0.bias", "2.weight", "2.bias", "4.weight",
                                   "4.bias")}
    twin = _torch_twin_of_digits_mlp()
    twin.load_state_dict(state, strict=True)
    with torch.no_grad():
        theirs = twin(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(theirs, np.load(tmp_path / "y.npy"), rtol=1e-5, atol=1e-5)
    meta = weights.safetensors_metadata(tmp_path / "m.safetensors")
    assert meta["format"] == "pt" and meta["distprop_model"] == "mlp"
    assert json.loads(meta["input_shape"]) == [64] and "Linear" in meta["architecture"]
    # npz: the same weights, plain arrays (no pickle)
    assert distprop("export", run1, "--format", "npz", "-o", tmp_path / "w.npz").returncode == 0
    with np.load(tmp_path / "w.npz", allow_pickle=False) as npz:
        assert set(npz.files) == set(state)
        for k in state:
            np.testing.assert_array_equal(npz[k], state[k].numpy())
    # and the exported file is a checkpoint evaluate accepts
    again = distprop("evaluate", run1, "--json", "--checkpoint", tmp_path / "m.safetensors")
    summary = json.loads((run1 / "summary.json").read_text())
    assert json.loads(again.stdout)["accuracy"] == summary["test"]["accuracy"], again.stderr


def _inputs(name: str, n: int = 4) -> np.ndarray:
    return models.sample_batch(name, n, seed=3)[0].numpy()


@pytest.mark.parametrize("name", ["mlp", "cnn", "lstm", "transformer"])
def test_distprop_to_safetensors_to_torch_same_logits(name, tmp_path):
    dp.manual_seed(1)
    ours = models.build_model(name)
    dp.save_safetensors(ours.state_dict(), tmp_path / "m.safetensors")
    twin = torch_model(name)
    twin.load_state_dict(load_file(str(tmp_path / "m.safetensors")), strict=True)
    x = _inputs(name)
    with dp.no_grad(), torch.no_grad():
        np.testing.assert_allclose(twin(torch.from_numpy(x)).numpy(), ours(dp.tensor(x)).numpy(),
                                   rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", ["mlp", "cnn", "lstm", "transformer"])
def test_torch_to_safetensors_to_distprop_same_logits(name, tmp_path):
    torch.manual_seed(2)
    twin = torch_model(name)
    save_file(twin.state_dict(), str(tmp_path / "t.safetensors"))
    ours = models.build_model(name)
    loaded = dp.load_safetensors(tmp_path / "t.safetensors")
    assert all(isinstance(v, np.ndarray) and v.dtype == np.float32 for v in loaded.values())
    ours.load_state_dict(loaded, strict=True)
    x = _inputs(name)
    with dp.no_grad(), torch.no_grad():
        np.testing.assert_allclose(ours(dp.tensor(x)).numpy(), twin(torch.from_numpy(x)).numpy(),
                                   rtol=1e-4, atol=1e-5)


def test_batchnorm_state_keeps_pytorch_dtypes(tmp_path):
    ours = dp.nn.Sequential(dp.nn.Linear(3, 4), dp.nn.BatchNorm1d(4))
    dp.save_safetensors(ours.state_dict(), tmp_path / "bn.safetensors")
    state = load_file(str(tmp_path / "bn.safetensors"))
    assert state["1.num_batches_tracked"].dtype == torch.int64
    torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4)).load_state_dict(
        state, strict=True)


def test_bfloat16_tensors_load_as_float32_with_a_warning(tmp_path):
    values = torch.randn(5, 3).to(torch.bfloat16)
    save_file({"w": values, "b": torch.ones(3)}, str(tmp_path / "bf.safetensors"))
    with pytest.warns(UserWarning, match="bfloat16 tensor.*w.*float32"):
        loaded = dp.load_safetensors(tmp_path / "bf.safetensors")
    assert loaded["w"].dtype == np.float32 and loaded["b"].dtype == np.float32
    np.testing.assert_array_equal(loaded["w"], values.float().numpy())


def test_torch_files_only_through_load_torch(tmp_path):
    twin = torch_model("mlp")
    torch.save(twin.state_dict(), tmp_path / "m.pt")
    with pytest.raises(dp.train.CheckpointError, match=r"PyTorch file.*dp.load_torch") as info:
        dp.load(tmp_path / "m.pt")
    assert "pickle" not in str(info.value)  # the house style of checkpoint messages
    torch.save(twin.state_dict(), tmp_path / "old.pt", _use_new_zipfile_serialization=False)
    with pytest.raises(dp.train.CheckpointError, match=r"looks like a PyTorch file.*dp.load_torch"):
        dp.load(tmp_path / "old.pt")
    ours = models.build_model("mlp")
    ours.load_state_dict(dp.load_torch(tmp_path / "m.pt"), strict=True)
    np.testing.assert_array_equal(ours.state_dict()["4.bias"].numpy(), twin[4].bias.detach())
    torch.save({"w": torch.ones(2), "evil": Path("x")}, tmp_path / "obj.pt")
    with pytest.raises(weights.WeightsError, match="weights_only=True"):
        dp.load_torch(tmp_path / "obj.pt")
    dp.save_safetensors({"w": np.ones(2, np.float32)}, tmp_path / "w.safetensors")
    with pytest.raises(dp.train.CheckpointError, match="dp.load_safetensors"):
        dp.load(tmp_path / "w.safetensors")


@pytest.mark.parametrize("damage", ["empty", "truncated", "garbage header"])
def test_damaged_safetensors_is_a_weights_error(tmp_path, damage):
    path = tmp_path / "m.safetensors"
    dp.save_safetensors({"w": np.arange(6, dtype=np.float32)}, path)
    data = path.read_bytes()
    path.write_bytes({"empty": b"", "truncated": data[:-8],
                      "garbage header": data[:8] + b"\x00" * (len(data) - 8)}[damage])
    with pytest.raises(weights.WeightsError, match=str(path.name)):
        dp.load_safetensors(path)


def test_missing_safetensors_package_names_the_extra(monkeypatch, run1, tmp_path):
    monkeypatch.setitem(sys.modules, "safetensors", None)  # import safetensors -> ImportError
    with pytest.raises(ImportError, match=r"distprop\[safetensors\]"):
        dp.save_safetensors({"w": np.ones(2, np.float32)}, tmp_path / "w.safetensors")
    result = invoke("export", run1, "-o", tmp_path / "m.safetensors")
    assert result.exit_code == 2 and "distprop[safetensors]" in result.output, result.output
    assert not (tmp_path / "m.safetensors").exists()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert invoke("export", run1, "-o", tmp_path / "w.npz").exit_code == 0
