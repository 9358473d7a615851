"""Bad ``--dataset`` files: every case is exit 2 with one line naming the file and the problem,
before anything is launched; headers that claim more data than the file holds are refused
without NumPy trying to allocate it; ``--num-classes`` declares classes that do not all occur."""

from __future__ import annotations

import io
import json
import os
import resource
import subprocess
import sys
import zipfile

import numpy as np
import pytest
from click.testing import CliRunner

from distprop.cli import cli

from helpers import REPO

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
HUGE = (10**6, 10**6)  # 10^12 float64 elements: 7.3 TiB
HUGE_MSG = "header claims shape (1000000, 1000000) of float64 (7.3 TiB) but the file holds only"


def _xy(n=40, classes=4, dim=4, seed=0):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((n, dim)).astype(np.float32), np.arange(n) % classes


def _npy_bytes(array=None, header_shape=None, descr="<f8", payload=b"\0" * 100) -> bytes:
    buf = io.BytesIO()
    if header_shape is None:
        np.save(buf, array)
    else:
        np.lib.format.write_array_header_1_0(buf, {"descr": descr, "fortran_order": False,
                                                   "shape": header_shape})
        buf.write(payload)
    return buf.getvalue()


def _zip(path, members: dict, compress=zipfile.ZIP_STORED):
    with zipfile.ZipFile(path, "w", compression=compress) as zf:
        for name, data in members.items():
            zf.writestr(name + ".npy", data)
    return path


# Each builder writes into a directory and returns the --dataset argument.


def _npz(**arrays):
    def build(d):
        np.savez(d / "data.npz", **arrays)
        return d / "data.npz"
    return build


def _huge_member(compress):
    def build(d):
        return _zip(d / "data.npz", {"x": _npy_bytes(header_shape=HUGE),
                                     "y": _npy_bytes(np.zeros(10, np.int64))}, compress)
    return build


def _npy_dir(x=None, y=None, x_raw=None, y_raw=None):
    def build(d):
        (d / "set").mkdir()
        (d / "set" / "x.npy").write_bytes(x_raw if x_raw is not None else _npy_bytes(x))
        (d / "set" / "y.npy").write_bytes(y_raw if y_raw is not None else _npy_bytes(y))
        return d / "set"
    return build


x40, y40 = _xy()
nan_x = x40.copy()
nan_x[7, 2] = np.nan
inf_x = x40.copy()
inf_x[3, 0] = -np.inf
nan_y = y40.astype(float)
nan_y[3] = np.nan
half_y = y40.astype(float)
half_y[1] = 0.5
y1000 = y40.copy()
y1000[5] = 1000
gap_y = (np.arange(40) % 2) * 2  # classes 0 and 2, never 1
truncated = _npy_bytes(x40)[:-50]

CASES = [
    ("0 samples", _npz(x=np.zeros((0, 4), np.float32), y=np.zeros(0, np.int64)), [],
     "array 'x' has no samples"),
    ("NaN in x", _npz(x=nan_x, y=y40), [], "array 'x' has a non-finite value (nan) at row 7, "
                                          "feature 2"),
    ("inf in x", _npz(x=inf_x, y=y40), [], "array 'x' has a non-finite value (-inf) at row 3"),
    ("NaN label", _npz(x=x40, y=nan_y), [], "array 'y' (labels) must be integer class indices; "
                                          "row 3 is nan"),
    ("non-integer label", _npz(x=x40, y=half_y), [], "must be integer class indices; row 1 is "
                                                     "0.5"),
    ("too small to split", _npz(x=x40[:3], y=np.array([0, 1, 0])), [],
     "3 samples are too few to hold out val 0.1, test 0.1 (each held-out part needs at least "
     "one sample)"),
    ("too small for --val-fraction", _npz(x=x40[:6], y=y40[:6] % 2),
     ["--val-fraction", 0.05, "--test-fraction", 0],
     "6 samples are too few to hold out val 0.05"),
    ("x and y lengths differ", _npz(x=x40, y=y40[:30]), [],
     "array 'y' (labels) has 30 labels but 'x' has 40 samples"),
    ("huge stored npz member", _huge_member(zipfile.ZIP_STORED), [], "member 'x': " + HUGE_MSG),
    ("huge compressed npz member", _huge_member(zipfile.ZIP_DEFLATED), [],
     "member 'x': " + HUGE_MSG),
    ("huge .npy header", _npy_dir(x_raw=_npy_bytes(header_shape=HUGE), y=y40),
     [], "x.npy: " + HUGE_MSG),
    ("huge labels .npy header", _npy_dir(x=x40, y_raw=_npy_bytes(header_shape=(10**12,),
                                                                  descr="<i8")),
     [], "y.npy: header claims shape (1000000000000,) of int64"),
    ("truncated .npy", _npy_dir(x_raw=truncated, y=y40), [],
     "x.npy: header claims shape (40, 4) of float32 (640 bytes) but the file holds only 590 "
     "bytes of data; it is truncated or its header is corrupt"),
    ("object .npy", _npy_dir(x=x40, y_raw=_npy_bytes(header_shape=(40,), descr="|O")), [],
     "holds Python objects; refusing to load it"),
    ("label 1000 in a 4-class set", _npz(x=x40, y=y1000), [],
     "labels in 'y' run up to 1000, but 996 of the classes 0..1000 never occur (4, 5, 6, 7, 8, "
     "...); labels must be 0..K-1 with every class present, or pass --num-classes K"),
    ("label 1000 with --num-classes 4", _npz(x=x40, y=y1000), ["--num-classes", 4],
     "array 'y' (labels) has label 1000 at row 5, outside the range [0, 4) of 4 classes"),
    ("label 10^12", _npz(x=x40, y=np.where(y40 == 3, 10**12, y40)), [],
     "labels in 'y' run up to 1000000000000, but 999999999997 of the classes "
     "0..1000000000000 never occur (3, 4, 5, 6, 7, ...)"),
    ("a class never occurs", _npz(x=x40, y=gap_y), [],
     "labels in 'y' run up to 2, but class 1 never occurs; labels must be 0..K-1"),
    ("single class", _npz(x=x40, y=np.zeros(40, np.int64)), [],
     "every label in 'y' is 0; a classifier needs at least 2 classes"),
    ("single class with --num-classes", _npz(x=x40, y=np.full(40, 3)), ["--num-classes", 5],
     "every label in 'y' is 3; a classifier needs at least 2 classes"),
    ("--num-classes 1", _npz(x=x40, y=y40), ["--num-classes", 1],
     "--num-classes must be at least 2, got 1"),
    ("--num-classes for a named dataset", lambda d: "digits", ["--num-classes", 5],
     "dataset digits has 10 classes; --num-classes 5 only applies to dataset files"),
]


@pytest.mark.parametrize("name,build,args,message", CASES, ids=[c[0] for c in CASES])
def test_bad_dataset_is_exit_2_with_one_line(name, build, args, message, tmp_path):
    data = build(tmp_path)
    out = tmp_path / "run"
    result = CliRunner().invoke(cli, ["train", "--dataset", str(data), "--out", str(out),
                                      *map(str, args)], catch_exceptions=False)
    assert result.exit_code == 2, result.output
    flat = " ".join(result.output.split())
    assert message in flat, flat
    if not name.startswith("--num-classes"):
        assert str(data) in flat  # names the file
    assert "Traceback" not in result.output
    errors = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1
    assert not out.exists()  # nothing was written or launched


def _limit_memory():  # a real allocation of the claimed 7.3 TiB (or even 4 GiB) would fail
    resource.setrlimit(resource.RLIMIT_AS, (4 << 30, 4 << 30))


@pytest.mark.parametrize("name", ["huge stored npz member", "huge .npy header"])
def test_huge_header_is_refused_in_a_real_process_without_allocating(name, tmp_path):
    build = next(c[1] for c in CASES if c[0] == name)
    data = build(tmp_path)
    done = subprocess.run([sys.executable, "-m", "distprop", "train", "--dataset", str(data),
                           "--out", str(tmp_path / "run")], capture_output=True, text=True,
                          timeout=120, env=ENV, cwd=str(REPO), preexec_fn=_limit_memory)
    assert done.returncode == 2, done.stderr
    assert HUGE_MSG in " ".join(done.stderr.split()) and "Traceback" not in done.stderr


def test_num_classes_declares_classes_that_do_not_all_occur(tmp_path):
    np.savez(tmp_path / "gap.npz", x=x40, y=gap_y)
    done = subprocess.run([sys.executable, "-m", "distprop", "train", "--dataset",
                           str(tmp_path / "gap.npz"), "--num-classes", "3", "--epochs", "1",
                           "--threads-per-rank", "1", "--out", str(tmp_path / "run")],
                          capture_output=True, text=True, timeout=120, env=ENV, cwd=str(REPO))
    assert done.returncode == 0, done.stderr
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["num_classes"] == 3 and summary["config"]["num_classes"] == 3


def test_library_loader_raises_data_error_for_the_same_cases(tmp_path):
    from distprop.data import sources

    np.savez(tmp_path / "e.npz", x=np.zeros((0, 4), np.float32), y=np.zeros(0, np.int64))
    with pytest.raises(sources.DataError, match="has no samples"):
        sources.load(str(tmp_path / "e.npz"))
    np.savez(tmp_path / "g.npz", x=x40, y=gap_y)
    assert sources.load(str(tmp_path / "g.npz"), num_classes=3).num_classes == 3


@pytest.mark.parametrize("kind", ["npz", "npz-compressed", "npy"])
def test_damaged_dataset_files_raise_only_data_errors(kind, tmp_path):
    import random

    from distprop.data import sources

    buf = io.BytesIO()
    {"npz": np.savez, "npz-compressed": np.savez_compressed}.get(
        kind, lambda b, x, y: np.save(b, x))(buf, x=x40, y=y40)
    name = "x.npy" if kind == "npy" else "d.npz"
    np.save(tmp_path / "y.npy", y40)
    rng = random.Random(kind)
    for i in range(300):
        data = bytearray(buf.getvalue())
        if rng.random() < 0.5:
            for _ in range(rng.randint(1, 4)):
                data[rng.randrange(len(data))] = rng.randrange(256)
        else:
            data = data[: rng.randrange(len(data))]
        (tmp_path / name).write_bytes(bytes(data))
        try:
            sources.load(str(tmp_path / name))
        except sources.DataError:
            pass
        except Exception as exc:
            pytest.fail(f"mutation {i}: {type(exc).__name__}: {exc}")
