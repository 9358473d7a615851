"""Checkpoint file format: every dtype and shape round-trips exactly (0-d included), metadata
that does not follow the format is a CheckpointError naming the file, and files that are not
checkpoints at all are called that (``--resume`` exits 2 with one line)."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import zipfile

import numpy as np
import pytest

import distprop as dp
from distprop.train import checkpoint as ckpt
from distprop.train.checkpoint import CheckpointError

from helpers import REPO

DTYPES = ["float16", "float32", "float64", "int8", "int16", "int32", "int64", "uint8", "uint16",
          "uint32", "uint64", "bool", "complex64", "complex128", "<U3", ">f4", "<M8[s]"]


def _sample(dtype: str, shape) -> np.ndarray:
    n = int(np.prod(shape))
    base = np.asarray(np.arange(n).reshape(shape) % 5)
    if dtype == "<U3":
        return base.astype(str).astype(dtype)
    if dtype.startswith("complex"):
        return np.asarray(base + 1j * (base + 1)).astype(dtype)
    if dtype == "<M8[s]":
        return base.astype("int64").astype(dtype)
    return base.astype(dtype)


SHAPES = [(), (0,), (1,), (2, 3), (0, 4), (2, 1, 3)]


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES)
def test_arrays_round_trip_with_dtype_and_shape(dtype, shape, tmp_path):
    a = _sample(dtype, shape)
    back = dp.load(dp.save({"a": a, "t": [a]}, tmp_path / "c.npz"))
    for got in (back["a"], back["t"][0]):
        assert got.dtype == a.dtype and got.shape == a.shape
        np.testing.assert_array_equal(got, a)


@pytest.mark.parametrize("make", [
    lambda: np.arange(24.0, dtype=np.float32).reshape(4, 6)[::2, ::3],
    lambda: np.asfortranarray(np.arange(6, dtype=np.int16).reshape(2, 3)),
    lambda: np.arange(10, dtype=np.float64)[::-1],
    lambda: np.arange(12, dtype=np.int64).reshape(3, 4).T,
    lambda: np.broadcast_to(np.float32(2.5), (3, 2)),
], ids=["strided", "fortran", "reversed", "transposed", "broadcast"])
def test_non_contiguous_arrays_round_trip(make, tmp_path):
    a = make()
    back = dp.load(dp.save({"a": a}, tmp_path / "c.npz"))["a"]
    assert back.dtype == a.dtype and back.shape == a.shape
    np.testing.assert_array_equal(back, a)


def test_bfloat16_round_trips_when_a_bf16_dtype_exists(tmp_path):
    ml_dtypes = pytest.importorskip("ml_dtypes", reason="NumPy has no bfloat16 without ml_dtypes")
    a = np.arange(6, dtype=np.float32).reshape(2, 3).astype(ml_dtypes.bfloat16)
    back = dp.load(dp.save({"a": a}, tmp_path / "c.npz"))["a"]
    assert back.shape == a.shape and back.dtype.itemsize == 2
    np.testing.assert_array_equal(back.view(np.uint16), a.view(np.uint16))


@pytest.mark.parametrize("shape", [(), (0,), (1,), (2, 3)], ids=str)
@pytest.mark.parametrize("dtype", ["float32", "float64", "int64"])
def test_tensors_round_trip_as_tensors(dtype, shape, tmp_path):
    t = dp.Tensor(_sample(dtype, shape))
    back = dp.load(dp.save({"t": t}, tmp_path / "c.npz"))["t"]
    assert isinstance(back, dp.Tensor) and back.shape == t.shape and back.dtype == t.dtype
    np.testing.assert_array_equal(back.numpy(), t.numpy())


VALUES = [
    None, True, False, 0, -7, 2**100, 1.5, float("inf"), "", "text with ünïcode", 1 + 2j,
    [], {}, (), [None, 1, "a"], (1, (2, (3,))), {"a": {"b": {"c": [1, (2, None)]}}},
    {1: "int key", (1, "x"): "tuple key", None: 0, 2.5: "float key", "__dunder": 1},
    [{"x": np.zeros(()), "y": (np.ones((0,), np.int8),)}],
]


@pytest.mark.parametrize("value", VALUES, ids=[repr(v)[:30] for v in VALUES])
def test_python_values_round_trip(value, tmp_path):
    back = dp.load(dp.save({"v": value}, tmp_path / "c.npz"))["v"]

    def same(a, b):
        if isinstance(a, np.ndarray):
            return isinstance(b, np.ndarray) and a.dtype == b.dtype and a.shape == b.shape \
                and np.array_equal(a, b)
        if isinstance(a, dict):
            return isinstance(b, dict) and a.keys() == b.keys() and all(same(a[k], b[k])
                                                                        for k in a)
        if isinstance(a, list | tuple):
            return type(a) is type(b) and len(a) == len(b) and all(map(same, a, b))
        return type(a) is type(b) and a == b

    assert same(value, back), (value, back)


def test_nan_and_numpy_scalars(tmp_path):
    back = dp.load(dp.save({"nan": float("nan"), "f32": np.float32(0.5), "i8": np.int8(-3),
                            "c64": np.complex64(1 - 1j), "b": np.bool_(True)},
                           tmp_path / "c.npz"))
    assert np.isnan(back["nan"]) and back["f32"] == 0.5 and back["i8"] == -3
    assert back["b"] is True
    assert back["c64"].dtype == np.complex64 and back["c64"].shape == () and back["c64"] == 1 - 1j


def test_batchnorm_model_loads_back_strictly(tmp_path):
    model = dp.nn.Sequential(dp.nn.Linear(3, 4), dp.nn.BatchNorm1d(4), dp.nn.ReLU(),
                             dp.nn.Linear(4, 2))
    model.train()
    model(dp.randn(5, 3))  # num_batches_tracked -> 1
    state = model.state_dict()
    assert state["1.num_batches_tracked"].shape == ()
    back = dp.load(dp.save(state, tmp_path / "bn.npz"))
    assert back["1.num_batches_tracked"].shape == ()
    fresh = dp.nn.Sequential(dp.nn.Linear(3, 4), dp.nn.BatchNorm1d(4), dp.nn.ReLU(),
                             dp.nn.Linear(4, 2))
    fresh.load_state_dict(back, strict=True)
    for key, value in state.items():
        np.testing.assert_array_equal(fresh.state_dict()[key].numpy(), value.numpy())


def test_too_deep_a_structure_is_refused_on_save(tmp_path):
    deep: list = []
    for _ in range(ckpt.MAX_DEPTH + 5):
        deep = [deep]
    with pytest.raises(ValueError, match="nested deeper than"):
        dp.save({"d": deep}, tmp_path / "c.npz")
    assert not list(tmp_path.iterdir())


# --- metadata that passes (or fails) the checksum but does not follow the format ---------------


def _npy(array) -> bytes:
    buf = io.BytesIO()
    np.lib.format.write_array(buf, np.asarray(array), allow_pickle=False)
    return buf.getvalue()


def _forge(path, meta: bytes, arrays: dict | None = None, good_checksum: bool = True,
           extra_members: dict | None = None):
    """A checkpoint whose metadata bytes are ``meta``, with a correct (or wrong) checksum."""
    arrays = {k: np.asarray(v) for k, v in (arrays or {}).items()}
    digest = ckpt._digest(meta, arrays) if good_checksum else "0" * 64
    with zipfile.ZipFile(path, "w") as zf:
        for name, a in arrays.items():
            zf.writestr(name + ".npy", _npy(a))
        zf.writestr("__meta__.npy", _npy(np.frombuffer(meta, np.uint8)))
        zf.writestr("__sha256__.npy", _npy(np.frombuffer(digest.encode(), np.uint8)))
        for name, data in (extra_members or {}).items():
            zf.writestr(name, data)
    return path


def _body(data, **over) -> bytes:
    return json.dumps({"format": "distprop-checkpoint", "version": 1, "data": data, **over}
                      ).encode()


NONSENSE = [
    ("missing array", _body({"w": {"__array__": "a9"}}), "refers to array 'a9', which the file "
                                                         "does not hold"),
    ("array ref not a name", _body({"w": {"__tensor__": 5}}), "refers to array 5"),
    ("tuple not a list", _body({"t": {"__tuple__": 5}}), "__tuple__ holds a int"),
    ("dict item not a pair", _body({"__dict__": [[1]]}), "a __dict__ item must be [key, value]"),
    ("unhashable key", _body({"__dict__": [[{"a": 1}, 2]]}), "unusable dict key"),
    ("unknown marker", _body({"x": {"__pickle__": "os.system"}}), "unknown marker '__pickle__'"),
    ("bad complex", _body({"c": {"__complex__": [1]}}), "__complex__ must be [real, imag]"),
    ("deep JSON", b'{"format":"distprop-checkpoint","version":1,"data":' + b"[" * 100_000
     + b"]" * 100_000 + b"}", "unreadable metadata (nested too deeply)"),
    ("deep structure", _body(json.loads("[" * 500 + "]" * 500)), "nested deeper than 100 levels"),
    ("not JSON", b"\xff{not json", "unreadable metadata"),
    ("JSON list", b"[1, 2]", "is not a distprop checkpoint (its metadata does not name"),
    ("other format", _body({}, format="numpy"), "is not a distprop checkpoint"),
    ("version string", _body({}, version="1"), "invalid metadata: format version '1'"),
    ("version 0", _body({}, version=0), "invalid metadata: format version 0"),
    ("newer version", _body({}, version=99), "written by a newer distprop (format version 99"),
    ("no data", json.dumps({"format": "distprop-checkpoint", "version": 1}).encode(),
     "no 'data' entry"),
]


@pytest.mark.parametrize("verify", [True, False], ids=["checksum-ok", "unverified"])
@pytest.mark.parametrize("name,meta,message", NONSENSE, ids=[n for n, _, _ in NONSENSE])
def test_nonsense_metadata_is_a_checkpoint_error_naming_the_file(name, meta, message, verify,
                                                                 tmp_path):
    path = _forge(tmp_path / "c.npz", meta, {"a0": np.zeros(3)})
    with pytest.raises(CheckpointError) as info:
        ckpt.load(path, verify=verify)
    assert str(path) in str(info.value) and message in str(info.value)


def test_nonsense_metadata_with_a_wrong_checksum_is_reported_as_corrupted(tmp_path):
    path = _forge(tmp_path / "c.npz", NONSENSE[0][1], good_checksum=False)
    with pytest.raises(CheckpointError, match="is corrupted: SHA-256"):
        ckpt.load(path)


def _raw_header_npy(shape, descr="<f8", payload=b"\0" * 64) -> bytes:
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": descr, "fortran_order": False,
                                               "shape": shape})
    return buf.getvalue() + payload


@pytest.mark.parametrize("members,message", [
    ({"a0.npy": _raw_header_npy((10**6, 10**6))}, "header claims shape (1000000, 1000000) of "
                                                  "float64 (7.3 TiB) but the file holds only"),
    ({"a0.npy": _raw_header_npy((3,), "|O")}, "holds Python objects"),
    ({"a0.npy": b"garbage"}, "not a readable .npy array"),
    ({"notes.txt": b"hello"}, "without distprop metadata; it holds"),
], ids=["huge header", "object dtype", "not npy", "foreign member"])
def test_bad_members_are_refused_before_allocation(members, message, tmp_path):
    path = _forge(tmp_path / "c.npz", _body({}), extra_members=members)
    with pytest.raises(CheckpointError) as info:
        ckpt.load(path)
    assert str(path) in str(info.value) and message in str(info.value)


def test_latest_valid_skips_a_checkpoint_with_nonsense_metadata(tmp_path):
    good = dp.save({"step": 1}, tmp_path / "checkpoint-000000001.npz")
    bad = _forge(tmp_path / "checkpoint-000000002.npz", NONSENSE[0][1])
    said = []
    assert ckpt.latest_valid(tmp_path, log=said.append) == good
    assert len(said) == 1 and str(bad) in said[0] and "refers to array" in said[0]


# --- files that are not checkpoints at all ------------------------------------------------------


def _write(path, kind):
    if kind == "text":
        path.write_text("step,loss\n1,0.5\n")
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "npy":
        np.save(path, np.arange(3))
    elif kind == "npz":
        np.savez(path, x=np.ones((4, 2)), y=np.arange(4))
    elif kind == "pickle":
        import pickle

        path.write_bytes(pickle.dumps({"model": [1, 2, 3]}))
    elif kind == "truncated":
        dp.save({"w": np.ones(1000)}, path)
        path.write_bytes(path.read_bytes()[:300])
    return path


NOT_CHECKPOINTS = [
    ("text", "data.txt", "is not a distprop checkpoint (a text file)"),
    ("empty", "empty.npz", "is not a distprop checkpoint (an empty file)"),
    ("npy", "arr.npy", "is not a distprop checkpoint (a single .npy array, not an .npz archive)"),
    ("npz", "data.npz", "is not a distprop checkpoint (an .npz/zip archive without distprop "
                        "metadata; it holds ['x', 'y']"),
    ("pickle", "model.pkl", "is not a distprop checkpoint (not an .npz archive)"),
    ("truncated", "checkpoint-000000001.npz", "is truncated or corrupted"),
]


@pytest.mark.parametrize("kind,name,message", NOT_CHECKPOINTS,
                         ids=[k for k, _, _ in NOT_CHECKPOINTS])
def test_not_a_checkpoint_says_so_without_talking_about_pickle(kind, name, message, tmp_path):
    path = _write(tmp_path / name, kind)
    with pytest.raises(CheckpointError) as info:
        dp.load(path)
    text = str(info.value)
    assert text.startswith(str(path)) or text.startswith(f"checkpoint {path}")
    assert message in text and "pickle" not in text.lower()


@pytest.mark.parametrize("kind,name,message", NOT_CHECKPOINTS[:5],
                         ids=[k for k, _, _ in NOT_CHECKPOINTS[:5]])
def test_resume_from_a_file_that_is_not_a_checkpoint_exits_2(kind, name, message, tmp_path):
    path = _write(tmp_path / name, kind)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "distprop", "train", "--model", "mlp",
                           "--dataset", "synthetic", "--epochs", "1", "--resume", str(path),
                           "--out", str(tmp_path / "run")], capture_output=True, text=True,
                          timeout=120, env=env, cwd=str(REPO))
    assert done.returncode == 2, done.stderr
    err = " ".join(done.stderr.split())
    assert f"Invalid value for --resume: {path} {message}" in err, err
    assert "Traceback" not in done.stderr and "pickle" not in err.lower()


def _mutations(data: bytes, count: int, seed: int):
    import random

    rng = random.Random(seed)
    for _ in range(count):
        b = bytearray(data)
        if rng.random() < 0.5:
            for _ in range(rng.randint(1, 4)):
                b[rng.randrange(len(b))] = rng.randrange(256)
        else:
            b = b[: rng.randrange(len(b))]
        yield bytes(b)


@pytest.mark.parametrize("compression", [zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED],
                         ids=["stored", "deflated"])
def test_damaged_files_raise_only_checkpoint_errors(compression, tmp_path):
    path = dp.save({"model": {"w": dp.randn(3, 4), "n": np.array(3)}, "pos": (1, None)},
                   tmp_path / "c.npz")
    buf = io.BytesIO()
    with zipfile.ZipFile(path) as zin, zipfile.ZipFile(buf, "w", compression) as zout:
        for info in zin.infolist():
            zout.writestr(info.filename, zin.read(info))
    damaged = tmp_path / "d.npz"
    for i, data in enumerate(_mutations(buf.getvalue(), 300, seed=compression)):
        damaged.write_bytes(data)
        for verify in (True, False):
            try:
                ckpt.load(damaged, verify=verify)
            except CheckpointError as exc:
                assert str(damaged) in str(exc)
            except Exception as exc:
                pytest.fail(f"mutation {i} (verify={verify}): {type(exc).__name__}: {exc}")
