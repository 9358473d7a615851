"""Checkpoint files: round trip, no pickle, checksum, atomic writes, keep-K, latest_valid."""

from __future__ import annotations

import zipfile

import numpy as np
import pytest

import distprop as dp
from distprop.train import checkpoint as ckpt
from distprop.train.checkpoint import CheckpointError, CheckpointManager


def _state():
    return {
        "model": {"0.weight": dp.randn(3, 4), "0.bias": np.arange(3.0)},
        "optimizer": {"state": {0: {"momentum_buffer": np.ones(4, np.float16)}, 1: {}},
                      "param_groups": [{"lr": 0.1, "params": [0, 1], "nesterov": False}]},
        "rng": np.random.default_rng(7).bit_generator.state,  # 128-bit integers
        "position": (3, 17, None),
        "misc": [float("inf"), "text", True, np.int64(5), np.float32(0.5), np.zeros((0, 2))],
        "__odd_key": {("a", 1): 2},
    }


def test_round_trip_preserves_structure_types_and_values(tmp_path):
    state = _state()
    path = dp.save(state, tmp_path / "c.npz")
    back = dp.load(path)
    assert isinstance(back["model"]["0.weight"], dp.Tensor)
    np.testing.assert_array_equal(back["model"]["0.weight"].numpy(), state["model"]["0.weight"]
                                  .numpy())
    assert back["model"]["0.weight"].dtype == np.float32
    np.testing.assert_array_equal(back["model"]["0.bias"], np.arange(3.0))
    assert back["optimizer"]["state"][0]["momentum_buffer"].dtype == np.float16
    assert back["optimizer"]["state"][1] == {}
    assert back["optimizer"]["param_groups"] == state["optimizer"]["param_groups"]
    assert back["rng"] == state["rng"]
    assert back["position"] == (3, 17, None)
    assert back["misc"][:5] == [float("inf"), "text", True, 5, 0.5]
    assert back["misc"][5].shape == (0, 2)
    assert back["__odd_key"] == {("a", 1): 2}
    gen = np.random.default_rng()
    gen.bit_generator.state = back["rng"]  # restores a usable generator
    assert gen.random() == np.random.default_rng(7).random()


def test_file_is_plain_npz_without_pickle(tmp_path):
    path = dp.save(_state(), tmp_path / "c.npz")
    with np.load(path, allow_pickle=False) as f:
        assert "__meta__" in f.files and "__sha256__" in f.files
        for name in f.files:
            assert not f[name].dtype.hasobject


def test_unstorable_objects_are_refused_and_leave_the_old_file(tmp_path):
    path = dp.save({"a": 1}, tmp_path / "c.npz")
    with pytest.raises(TypeError, match=r"obj\['bad'\]: cannot store a object"):
        dp.save({"bad": object()}, path)
    assert dp.load(path) == {"a": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["c.npz"]  # no temporary left behind


def _flip_byte(path):
    """Flip one byte inside the first stored array's data (not in zip headers)."""
    with zipfile.ZipFile(path) as zf:
        info = zf.getinfo("a0.npy")
    raw = bytearray(path.read_bytes())
    pos = info.header_offset + 30 + len(info.filename) + len(info.extra) + 128 + 2
    raw[pos] ^= 0xFF
    path.write_bytes(bytes(raw))


def test_corrupted_and_truncated_files_are_refused(tmp_path):
    path = dp.save(_state(), tmp_path / "c.npz")
    good = path.read_bytes()
    _flip_byte(path)
    with pytest.raises(CheckpointError, match="corrupted"):
        dp.load(path)
    path.write_bytes(good[: len(good) // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupted"):
        dp.load(path)
    np.savez(tmp_path / "plain.npz", x=np.ones(2))
    with pytest.raises(CheckpointError, match="not a distprop checkpoint"):
        dp.load(tmp_path / "plain.npz")
    with pytest.raises(CheckpointError, match="does not exist"):
        dp.load(tmp_path / "missing.npz")


def test_altered_arrays_fail_the_checksum(tmp_path):
    """A well-formed zip whose array was changed after writing (zip CRCs recomputed)."""
    path = dp.save(_state(), tmp_path / "c.npz")
    with np.load(path, allow_pickle=False) as f:
        members = {n: f[n] for n in f.files}
    members["a0"] = members["a0"] + 1
    np.savez(path, **members)
    with pytest.raises(CheckpointError, match="corrupted: SHA-256 .* does not match"):
        dp.load(path)
    ckpt.load(path, verify=False)  # readable when explicitly unverified


def test_manager_keeps_last_k_and_latest_valid_falls_back(tmp_path):
    manager = CheckpointManager(tmp_path, keep=2)
    for step in (10, 20, 30):
        manager.save({"step": step}, step)
    names = [p.name for p in ckpt.list_checkpoints(tmp_path)]
    assert names == ["checkpoint-000000020.npz", "checkpoint-000000030.npz"]
    assert ckpt.latest_valid(tmp_path).name == "checkpoint-000000030.npz"
    newest = manager.path_for(30)
    newest.write_bytes(newest.read_bytes()[:-40])  # truncated by a crash or a full disk
    messages = []
    found = ckpt.latest_valid(tmp_path, log=messages.append)
    assert found.name == "checkpoint-000000020.npz" and dp.load(found) == {"step": 20}
    assert len(messages) == 1 and "checkpoint-000000030.npz" in messages[0]
    assert "falling back to the previous one" in messages[0]
    with pytest.warns(UserWarning, match="skipping unusable checkpoint"):
        ckpt.latest_valid(tmp_path)
    assert ckpt.latest_valid(tmp_path / "empty") is None
