"""Ready-made datasets with deterministic train/validation/test splits (``dp.data.sources``).

* :func:`synthetic` -- seeded Gaussian class clusters of any shape (no extra packages).
* :func:`digits` -- scikit-learn's bundled 8x8 digits (offline; the ``datasets`` extra).
* :func:`mnist1d` -- MNIST-1D generated locally with the ``mnist1d`` package's generator (never
  downloaded) and cached as ``.npz`` under the user cache directory.
* :func:`npz` / :func:`npy` -- your own arrays from files, memory-mapped so that a rank reads only
  the rows of the batches it is given.

Every loader returns :class:`DataSplits` and validates the arrays first: wrong shapes, labels out
of range, NaN/inf, classes that never occur (unless ``num_classes`` is given), a single class,
sets too small for the split, and ``.npy`` headers claiming more data than the file holds (checked
before anything is allocated) raise :class:`DataError` naming the file and the array.
"""

from __future__ import annotations

import math
import os
import random
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from distprop import fileio
from distprop.data.dataset import Subset, TensorDataset, split_indices

DATASETS = ("digits", "mnist1d", "synthetic")
_PAIRS = (("x", "y"), ("X", "y"), ("inputs", "targets"), ("features", "labels"), ("data", "labels"))


class DataError(ValueError):
    """A dataset that cannot be trained on: missing file, wrong shape, bad labels, NaN."""


@dataclass
class DataSplits:
    """A dataset's train, validation and test parts plus what a model needs to know about it.

    Attributes:
        train, val, test: array-backed datasets yielding ``(x, y)``; ``val``/``test`` may be None.
        num_classes: number of classes (labels are ``0 .. num_classes - 1``).
        input_shape: shape of one sample's features.
        name: where the data came from.
        info: extra facts (sizes, cache file, ...), JSON-serialisable.
    """

    train: TensorDataset | Subset
    val: TensorDataset | Subset | None
    test: TensorDataset | Subset | None
    num_classes: int
    input_shape: tuple[int, ...]
    name: str
    info: dict = field(default_factory=dict)

    def sizes(self) -> dict:
        return {k: (len(v) if v is not None else 0)
                for k, v in (("train", self.train), ("val", self.val), ("test", self.test))}


# --- validation ---------------------------------------------------------------------------------


def validate_arrays(x, y, source: str, x_name: str = "x", y_name: str = "y",
                    num_classes: int | None = None, input_shape=None,
                    chunk_bytes: int = 1 << 26) -> int:
    """Check features and labels before training; returns the number of classes.

    Features must be at least 2-D (samples first), finite, and numeric; labels 1-D integers
    (or integral floats) in ``[0, num_classes)``, one per sample. Memory-mapped features are
    scanned in chunks of about ``chunk_bytes``.

    Raises:
        DataError: naming ``source`` and the offending array, row and value.
    """
    where = f"{source}: array '{x_name}'"
    if x.ndim < 2:
        raise DataError(f"{where} has shape {tuple(x.shape)}; expected (samples, features...) "
                        "with at least 2 dimensions")
    if x.dtype.kind not in "fiub":
        raise DataError(f"{where} has dtype {x.dtype}; expected numbers")
    if input_shape is not None and tuple(x.shape[1:]) != tuple(input_shape):
        raise DataError(f"{where} has samples of shape {tuple(x.shape[1:])}; expected "
                        f"{tuple(input_shape)}")
    lwhere = f"{source}: array '{y_name}' (labels)"
    if y.ndim != 1:
        raise DataError(f"{lwhere} has shape {tuple(y.shape)}; expected one label per sample, "
                        f"shape ({x.shape[0]},)")
    if y.shape[0] != x.shape[0]:
        raise DataError(f"{lwhere} has {y.shape[0]} labels but '{x_name}' has {x.shape[0]} "
                        "samples")
    if x.shape[0] == 0:
        raise DataError(f"{where} has no samples")
    labels = np.asarray(y)
    if labels.dtype.kind == "f":
        bad = np.flatnonzero(~np.isfinite(labels) | (labels != np.round(labels)))
        if bad.size:
            raise DataError(f"{lwhere} must be integer class indices; row {bad[0]} is "
                            f"{float(labels[bad[0]])!r}")
    elif labels.dtype.kind not in "iub":
        raise DataError(f"{lwhere} has dtype {labels.dtype}; expected integer class indices")
    low, high = labels.min(), labels.max()
    if low < 0:
        row = int(np.argmin(labels))
        raise DataError(f"{lwhere} has a negative label {labels[row]} at row {row}")
    classes = int(high) + 1 if num_classes is None else int(num_classes)
    if high >= classes:
        row = int(np.argmax(labels))
        raise DataError(f"{lwhere} has label {labels[row]} at row {row}, outside the range "
                        f"[0, {classes}) of {classes} classes")
    if x.dtype.kind == "f":
        row_bytes = max(1, int(np.prod(x.shape[1:])) * x.dtype.itemsize)
        step = max(1, chunk_bytes // row_bytes)
        for start in range(0, x.shape[0], step):
            chunk = np.asarray(x[start : start + step])
            finite = np.isfinite(chunk).reshape(chunk.shape[0], -1)
            if not finite.all():
                row, col = np.argwhere(~finite)[0]
                value = chunk.reshape(chunk.shape[0], -1)[row, col]
                raise DataError(f"{where} has a non-finite value ({value}) at row "
                                f"{start + int(row)}, feature {int(col)}")
    return classes


# --- splitting ----------------------------------------------------------------------------------


def _splits(x, y, name, num_classes, val_fraction, test_fraction, seed, info,
            x_dtype=np.float32) -> DataSplits:
    """Deterministic random train/val/test split of one array pair."""
    base = TensorDataset(x, y.astype(np.int64, copy=False), dtypes=(x_dtype, None))
    fractions = [1.0 - val_fraction - test_fraction, val_fraction, test_fraction]
    train_idx, val_idx, test_idx = _split(len(base), fractions, seed, name)
    return DataSplits(
        train=Subset(base, train_idx),
        val=Subset(base, val_idx) if val_idx.size else None,
        test=Subset(base, test_idx) if test_idx.size else None,
        num_classes=num_classes, input_shape=tuple(x.shape[1:]), name=name, info=info)


def _split(n: int, fractions: list, seed: int, source: str) -> list:
    """:func:`split_indices`, with a :class:`DataError` when a held-out part would be empty."""
    try:
        return split_indices(n, fractions, seed)
    except ValueError:
        held = ", ".join(f"{name} {f:g}" for name, f in zip(("val", "test"), fractions[1:])
                         if f > 0)
        raise DataError(f"{source}: {n} samples are too few to hold out {held} (each held-out "
                        "part needs at least one sample); use more data or lower "
                        "--val-fraction/--test-fraction (0 disables a part)") from None


def _check_classes(labels: list, source: str, y_name: str, num_classes: int,
                   explicit: bool) -> None:
    """At least two classes, and (unless ``explicit``) every class 0..num_classes-1 present."""
    present = np.unique(np.concatenate([np.asarray(a).reshape(-1) for a in labels]))
    if present.size < 2:
        raise DataError(f"{source}: every label in '{y_name}' is {present[0]:g}; a classifier "
                        "needs at least 2 classes (training would report a meaningless 100 % "
                        "accuracy)")
    if explicit:
        return
    n_missing = int(num_classes) - present.size  # labels are in [0, num_classes) by now
    if n_missing > 0:
        seen, shown, c = set(present.astype(np.int64).tolist()), [], 0
        while len(shown) < min(5, n_missing):  # no arange(num_classes): it may be 10^12
            if c not in seen:
                shown.append(str(c))
            c += 1
        if n_missing == 1:
            gap = f"class {shown[0]} never occurs"
        else:
            more = ", ..." if n_missing > 5 else ""
            gap = (f"{n_missing} of the classes 0..{num_classes - 1} never occur "
                   f"({', '.join(shown)}{more})")
        raise DataError(f"{source}: labels in '{y_name}' run up to {num_classes - 1}, but {gap}; "
                        "labels must be 0..K-1 with every class present, or pass --num-classes K "
                        "(num_classes=K) to say how many classes there are")


def _check_fractions(val_fraction: float, test_fraction: float) -> None:
    if not (0 <= val_fraction < 1 and 0 <= test_fraction < 1
            and val_fraction + test_fraction < 1):
        raise DataError(f"val_fraction={val_fraction} and test_fraction={test_fraction} must be "
                        "in [0, 1) and leave some training data")


# --- synthetic ----------------------------------------------------------------------------------


def synthetic(n: int = 2048, shape=(32,), classes: int = 10, seed: int = 0,
              val_fraction: float = 0.1, test_fraction: float = 0.1,
              noise: float = 1.0) -> DataSplits:
    """Seeded Gaussian clusters: one random centre per class plus ``noise`` x N(0, 1).

    Args:
        n: number of samples in total (before splitting).
        shape: shape of one sample, e.g. ``(32,)`` or ``(1, 28, 28)``.
        classes: number of classes.
        seed: generates the data and the split; the same seed gives the same arrays everywhere.
        val_fraction, test_fraction: parts held out for validation and test.
        noise: standard deviation of the noise around each class centre.
    """
    shape = (int(shape),) if isinstance(shape, int | np.integer) else tuple(int(s) for s in shape)
    if n <= 0 or classes < 2 or any(s <= 0 for s in shape):
        raise DataError(f"synthetic data needs n > 0, classes >= 2 and a positive shape; got "
                        f"n={n}, classes={classes}, shape={shape}")
    _check_fractions(val_fraction, test_fraction)
    rng = np.random.default_rng(int(seed))
    centres = rng.standard_normal((classes, *shape)).astype(np.float32)
    y = rng.integers(0, classes, size=n).astype(np.int64)
    x = centres[y] + np.float32(noise) * rng.standard_normal((n, *shape), dtype=np.float32)
    return _splits(x, y, "synthetic", classes, val_fraction, test_fraction, seed,
                   {"n": n, "shape": list(shape), "classes": classes, "seed": seed})


# --- digits -------------------------------------------------------------------------------------


def _need(package: str, module: str):
    try:
        return __import__(module, fromlist=["_"])
    except ImportError as exc:
        raise DataError(f"this dataset needs the '{package}' package ({exc}); install it with: "
                        "pip install 'distprop[datasets]'") from exc


def digits(val_fraction: float = 0.1, test_fraction: float = 0.2, seed: int = 0) -> DataSplits:
    """scikit-learn's bundled 8x8 handwritten digits (1797 samples, 64 features in [0, 1]).

    Needs scikit-learn (the ``datasets`` extra); nothing is downloaded.
    """
    _check_fractions(val_fraction, test_fraction)
    skd = _need("scikit-learn", "sklearn.datasets")
    bunch = skd.load_digits()
    x = (bunch.data / 16.0).astype(np.float32)
    y = bunch.target.astype(np.int64)
    return _splits(x, y, "digits", 10, val_fraction, test_fraction, seed, {"n": len(y)})


# --- mnist1d ------------------------------------------------------------------------------------


def cache_dir() -> Path:
    """Where generated datasets are cached: ``$DISTPROP_CACHE_DIR``, else the user cache dir."""
    env = os.environ.get("DISTPROP_CACHE_DIR")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "distprop"


def _save_npz_atomic(path: Path, arrays: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        np.savez(f, **arrays)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def mnist1d(num_samples: int = 10000, data_seed: int = 42, val_fraction: float = 0.1,
            seed: int = 0, cache: bool = True) -> DataSplits:
    """MNIST-1D (Greydanus 2020): 40-step 1-D signals of the ten digits.

    Generated locally with ``mnist1d.data.make_dataset`` (the package's own generator, default
    transform arguments, never the download path) and cached as ``.npz`` in :func:`cache_dir`.
    The package's 80/20 train/test split is kept; ``val_fraction`` of the training part is held
    out for validation with ``seed``.

    Args:
        num_samples: samples generated in total (the package default is 5000).
        data_seed: the generator's seed (the package default is 42).
        val_fraction: part of the training samples held out for validation.
        seed: seed of the train/validation split.
        cache: read/write the cached arrays.
    """
    if not 0 <= val_fraction < 1:
        raise DataError(f"val_fraction must be in [0, 1), got {val_fraction}")
    path = cache_dir() / f"mnist1d-n{int(num_samples)}-s{int(data_seed)}.npz"
    arrays = None
    if cache and path.exists():
        try:
            with np.load(path, allow_pickle=False) as f:
                arrays = {k: f[k] for k in ("x", "y", "x_test", "y_test")}
        except Exception:
            arrays = None  # unreadable cache: regenerate it
    if arrays is None:
        data_mod = _need("mnist1d", "mnist1d.data")
        args = data_mod.get_dataset_args()
        args.num_samples, args.seed = int(num_samples), int(data_seed)
        np_state, py_state = np.random.get_state(), random.getstate()
        try:  # the generator seeds NumPy's and Python's global RNGs; leave the caller's alone
            made = data_mod.make_dataset(args)
        finally:
            np.random.set_state(np_state)
            random.setstate(py_state)
        arrays = {"x": made["x"].astype(np.float32), "y": made["y"].astype(np.int64),
                  "x_test": made["x_test"].astype(np.float32),
                  "y_test": made["y_test"].astype(np.int64)}
        if cache:
            try:
                _save_npz_atomic(path, arrays)
            except OSError:
                pass  # a read-only cache dir only costs regeneration time
    info = {"num_samples": int(num_samples), "data_seed": int(data_seed), "cache": str(path)}
    for xk, yk in (("x", "y"), ("x_test", "y_test")):
        validate_arrays(arrays[xk], arrays[yk], f"mnist1d ({path})", xk, yk, num_classes=10)
    train = TensorDataset(arrays["x"], arrays["y"])
    tr_idx, va_idx = _split(len(train), [1.0 - val_fraction, val_fraction], seed, "mnist1d")
    return DataSplits(train=Subset(train, tr_idx),
                      val=Subset(train, va_idx) if va_idx.size else None,
                      test=TensorDataset(arrays["x_test"], arrays["y_test"]),
                      num_classes=10, input_shape=(40,), name="mnist1d", info=info)


# --- files --------------------------------------------------------------------------------------


_MAX_DEFLATE_RATIO = 1100  # deflate cannot expand data more than ~1032x


def _check_member(path: Path, zf: zipfile.ZipFile, info: zipfile.ZipInfo):
    """Header of an ``.npz`` member checked against the member's size (no allocation yet)."""
    where = f"{path}: member '{info.filename[:-4]}'"
    if info.compress_type != zipfile.ZIP_STORED and \
            info.file_size > _MAX_DEFLATE_RATIO * (info.compress_size + 64):
        raise DataError(f"{where} claims {info.file_size} bytes from {info.compress_size} "
                        "compressed ones; the file is corrupt")
    try:
        with zf.open(info) as member:
            return fileio.read_npy_layout(member, info.file_size, where)
    except ValueError as exc:
        raise DataError(str(exc)) from None
    except Exception as exc:  # zlib.error, BadZipFile, unsupported zip features
        raise DataError(f"{where}: cannot be read ({type(exc).__name__}: {exc})") from None


def _mmap_npz_member(path: Path, zf: zipfile.ZipFile, member: str):
    """A read-only memory map of an uncompressed ``.npz`` member, or None if compressed."""
    info = zf.getinfo(member)
    shape, fortran, dtype, header = _check_member(path, zf, info)
    if info.compress_type != zipfile.ZIP_STORED:
        return None
    with open(path, "rb") as f:
        f.seek(info.header_offset)
        local = f.read(30)
        if local[:4] != b"PK\x03\x04":
            return None
        name_len = int.from_bytes(local[26:28], "little")
        extra_len = int.from_bytes(local[28:30], "little")
    offset = info.header_offset + 30 + name_len + extra_len + header
    if int(np.prod(shape)) == 0:
        return np.empty(shape, dtype=dtype)
    if offset + math.prod(shape) * dtype.itemsize > path.stat().st_size:
        raise DataError(f"{path}: member '{member[:-4]}' runs past the end of the file; the "
                        "file is truncated")
    return np.memmap(path, dtype=dtype, mode="r", shape=shape, offset=offset,
                     order="F" if fortran else "C")


def _read_npz(path: Path, mmap: bool) -> dict:
    try:
        zf = zipfile.ZipFile(path)
    except Exception as exc:  # BadZipFile, OSError, ValueError, ...
        raise DataError(f"{path}: not a readable .npz file ({exc})") from exc
    out = {}
    with zf:
        names = [n[:-4] for n in zf.namelist() if n.endswith(".npy")]
        for name in names:
            array = _mmap_npz_member(path, zf, name + ".npy") if mmap else None
            if array is None:
                if not mmap:
                    _check_member(path, zf, zf.getinfo(name + ".npy"))
                try:
                    with zf.open(name + ".npy") as member:
                        array = np.lib.format.read_array(member, allow_pickle=False)
                except Exception as exc:  # zlib.error, truncated data, ...
                    raise DataError(f"{path}: member '{name}' cannot be read "
                                    f"({type(exc).__name__}: {exc})") from exc
            out[name] = array
    return out


def _read_npy(path: Path, mmap: bool):
    """A ``.npy`` file, its header checked against the file size first (memory-mapped when
    ``mmap`` and not empty)."""
    size = path.stat().st_size
    try:
        with open(path, "rb") as f:
            shape, fortran, dtype, header = fileio.read_npy_layout(f, size, str(path))
    except ValueError as exc:
        raise DataError(str(exc)) from None
    if math.prod(shape) == 0:
        return np.empty(shape, dtype=dtype)
    if mmap:
        return np.memmap(path, dtype=dtype, mode="r", shape=shape, offset=header,
                         order="F" if fortran else "C")
    try:
        return np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:
        raise DataError(f"{path}: cannot be read ({exc})") from None


def _pick_keys(arrays: dict, source: str, x_key, y_key) -> tuple[str, str]:
    if x_key or y_key:
        for key in (x_key, y_key):
            if key not in arrays:
                raise DataError(f"{source}: no array named '{key}'; it holds {sorted(arrays)}")
        return x_key, y_key
    for xk, yk in _PAIRS:
        if xk in arrays and yk in arrays:
            return xk, yk
    if "x_train" in arrays and "y_train" in arrays:
        return "x_train", "y_train"
    accepted = ", ".join(f"{a}/{b}" for a, b in _PAIRS)
    raise DataError(f"{source}: cannot find features and labels; it holds {sorted(arrays)}; "
                    f"expected one of the pairs {accepted} (or x_train/y_train, optionally "
                    "with x_val/y_val and x_test/y_test)")


def _from_arrays(arrays: dict, source: str, x_key, y_key, num_classes, val_fraction,
                 test_fraction, seed, validate, input_shape) -> DataSplits:
    xk, yk = _pick_keys(arrays, source, x_key, y_key)
    parts = {"train": (xk, yk)}
    suffix_pairs = {"val": ("x_val", "y_val"), "test": ("x_test", "y_test")}
    for part, (xv, yv) in suffix_pairs.items():
        if xv in arrays and yv in arrays:
            parts[part] = (xv, yv)
    for part in parts:
        px, py = parts[part]
        arrays[py] = np.asarray(arrays[py])  # labels are small: read them whole
    explicit = num_classes is not None
    if explicit and int(num_classes) < 2:
        raise DataError(f"{source}: num_classes (--num-classes) must be at least 2, got "
                        f"{num_classes}")
    found = []
    for px, py in parts.values():
        if validate:
            found.append(validate_arrays(arrays[px], arrays[py], source, px, py, num_classes,
                                         input_shape))
        elif arrays[px].ndim < 2 or arrays[py].shape != (arrays[px].shape[0],):
            raise DataError(f"{source}: arrays '{px}' {arrays[px].shape} and '{py}' "
                            f"{arrays[py].shape} do not form (samples, ...) and (samples,)")
        elif arrays[py].size:
            found.append(int(arrays[py].max()) + 1)
    if not explicit:
        num_classes = max(found, default=0)
    if validate:
        _check_classes([arrays[py] for _, py in parts.values()], source, yk, num_classes,
                       explicit)
    shapes = {tuple(arrays[px].shape[1:]) for px, _ in parts.values()}
    if len(shapes) != 1:
        raise DataError(f"{source}: the parts have different sample shapes {sorted(shapes)}")
    info = {"path": source, "keys": {p: list(k) for p, k in parts.items()},
            "memory_mapped": any(isinstance(arrays[px], np.memmap) for px, _ in parts.values())}
    x_dtype = np.float32 if arrays[xk].dtype.kind != "f" or arrays[xk].dtype.itemsize > 4 \
        else None
    if len(parts) == 1:
        _check_fractions(val_fraction, test_fraction)
        return _splits(arrays[xk], arrays[yk], source, num_classes, val_fraction, test_fraction,
                       seed, info, x_dtype=x_dtype)

    def make(part):
        if part not in parts:
            return None
        px, py = parts[part]
        return TensorDataset(arrays[px], arrays[py].astype(np.int64, copy=False),
                             dtypes=(x_dtype, None))

    train, val, test = make("train"), make("val"), make("test")
    if val is None and val_fraction > 0:
        tr_idx, va_idx = _split(len(train), [1.0 - val_fraction, val_fraction], seed, source)
        train, val = Subset(train, tr_idx), Subset(train, va_idx)
    return DataSplits(train, val, test, num_classes, tuple(arrays[xk].shape[1:]), source, info)


def npz(path, x_key: str | None = None, y_key: str | None = None,
        num_classes: int | None = None, val_fraction: float = 0.1, test_fraction: float = 0.1,
        seed: int = 0, validate: bool = True, mmap: bool = True,
        input_shape=None) -> DataSplits:
    """Features and labels from an ``.npz`` file (``np.savez``; never unpickled).

    The file holds a feature/label pair (``x``/``y``, ``X``/``y``, ``inputs``/``targets``,
    ``features``/``labels`` or ``data``/``labels``, or pass ``x_key``/``y_key``), split
    deterministically by ``seed``; or ready-made parts ``x_train``/``y_train`` with optional
    ``x_val``/``y_val`` and ``x_test``/``y_test`` (likewise ``x``/``y`` with ``x_test``/``y_test``).
    Uncompressed members (``np.savez``, not ``savez_compressed``) are memory-mapped.

    Args:
        path: the ``.npz`` file.
        x_key, y_key: names of the feature and label arrays.
        num_classes: number of classes (default: largest label + 1, every class 0..K-1 must
            then occur); give it when some classes have no samples.
        val_fraction, test_fraction: held-out parts when the file is not pre-split.
        seed: seed of the split.
        validate: check shapes, label range and NaN/inf before returning.
        mmap: memory-map uncompressed members instead of reading them.
        input_shape: expected shape of one sample (checked when given).

    Raises:
        DataError: missing file, unknown keys, wrong shapes, labels out of range, NaN/inf.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"dataset file {path} does not exist")
    arrays = _read_npz(path, mmap)
    return _from_arrays(arrays, str(path), x_key, y_key, num_classes, val_fraction,
                        test_fraction, seed, validate, input_shape)


def npy(x_path, y_path, num_classes: int | None = None, val_fraction: float = 0.1,
        test_fraction: float = 0.1, seed: int = 0, validate: bool = True,
        input_shape=None) -> DataSplits:
    """Features and labels from two ``.npy`` files; the features are memory-mapped."""
    x_path, y_path = Path(x_path), Path(y_path)
    for p in (x_path, y_path):
        if not p.is_file():
            raise DataError(f"dataset file {p} does not exist")
    x = _read_npy(x_path, mmap=True)
    y = _read_npy(y_path, mmap=False)
    source = f"{x_path} + {y_path}"
    return _from_arrays({"x": x, "y": y}, source, "x", "y", num_classes, val_fraction,
                        test_fraction, seed, validate, input_shape)


def load(name: str, seed: int = 0, validate: bool = True, **kwargs) -> DataSplits:
    """A dataset by name (``digits``, ``mnist1d``, ``synthetic``) or path.

    A path is an ``.npz`` file, an ``.npy`` feature file with a sibling labels file
    (``x.npy`` + ``y.npy``, or ``NAME.npy`` + ``NAME_labels.npy``), or a directory holding
    ``x.npy`` and ``y.npy``.

    Raises:
        DataError: unknown name, missing file, or invalid data.
    """
    if name == "digits":
        return digits(seed=seed, **kwargs)
    if name == "mnist1d":
        return mnist1d(seed=seed, **kwargs)
    if name == "synthetic":
        return synthetic(seed=seed, **kwargs)
    path = Path(name)
    if path.is_dir():
        return npy(path / "x.npy", path / "y.npy", seed=seed, validate=validate, **kwargs)
    if path.suffix == ".npy":
        labels = path.with_name("y.npy") if path.stem == "x" else \
            path.with_name(path.stem + "_labels.npy")
        return npy(path, labels, seed=seed, validate=validate, **kwargs)
    if path.suffix == ".npz" or path.exists():
        return npz(path, seed=seed, validate=validate, **kwargs)
    raise DataError(f"unknown dataset {name!r}: expected one of {', '.join(DATASETS)} or a path "
                    "to an .npz file, an .npy file or a directory with x.npy and y.npy")
