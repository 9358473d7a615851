"""Datasets, DataLoader and dataset sources."""

from __future__ import annotations

import numpy as np
import pytest

import distprop as dp
from distprop.data import DataLoader, Subset, TensorDataset, sources, split_indices
from distprop.data.sources import DataError


def _xy(n=10, d=3):
    x = np.arange(n * d, dtype=np.float32).reshape(n, d)
    y = np.arange(n, dtype=np.int64) % 4
    return x, y


# --- TensorDataset / Subset ---------------------------------------------------------------------


def test_tensor_dataset_items_and_len():
    x, y = _xy()
    ds = TensorDataset(dp.tensor(x), y)
    assert len(ds) == 10
    xi, yi = ds[3]
    np.testing.assert_array_equal(xi.numpy(), x[3])
    assert yi.item() == 3 % 4


def test_tensor_dataset_size_mismatch():
    with pytest.raises(ValueError, match=r"Size mismatch.*\(10, 3\).*\(9,\)"):
        TensorDataset(np.zeros((10, 3)), np.zeros(9))


def test_subset_of_subset_gathers_composed_rows():
    x, y = _xy()
    inner = Subset(TensorDataset(x, y), [9, 8, 7, 6, 5])
    outer = Subset(inner, [4, 0])
    xb, yb = next(iter(DataLoader(outer, batch_size=2)))
    np.testing.assert_array_equal(xb.numpy(), x[[5, 9]])
    np.testing.assert_array_equal(yb.numpy(), y[[5, 9]])


def test_split_indices_deterministic_disjoint_complete():
    a = split_indices(100, [0.7, 0.2, 0.1], seed=3)
    b = split_indices(100, [0.7, 0.2, 0.1], seed=3)
    c = split_indices(100, [0.7, 0.2, 0.1], seed=4)
    assert [p.size for p in a] == [70, 20, 10]
    for p, q in zip(a, b):
        np.testing.assert_array_equal(p, q)
    assert not np.array_equal(a[0], c[0])
    np.testing.assert_array_equal(np.sort(np.concatenate(a)), np.arange(100))
    assert [p.size for p in split_indices(10, [6, 4])] == [6, 4]


@pytest.mark.parametrize("fractions,match", [([0.8, 0.4], "sum to at most 1"),
                                             ([-0.1, 0.5], ">= 0"),
                                             ([5, 4], "sum to 10")])
def test_split_indices_rejects_bad_fractions(fractions, match):
    with pytest.raises(ValueError, match=match):
        split_indices(10, fractions)


# --- DataLoader ---------------------------------------------------------------------------------


def test_loader_batches_in_order_and_drop_last():
    x, y = _xy()
    batches = list(DataLoader(TensorDataset(x, y), batch_size=4))
    assert [b[0].shape for b in batches] == [(4, 3), (4, 3), (2, 3)]
    np.testing.assert_array_equal(np.concatenate([b[1].numpy() for b in batches]), y)
    loader = DataLoader(TensorDataset(x, y), batch_size=4, drop_last=True)
    assert len(loader) == 2 and len(list(loader)) == 2
    assert len(DataLoader(TensorDataset(x, y), batch_size=4)) == 3


def test_loader_shuffle_follows_manual_seed():
    x, y = _xy(50)
    ds = TensorDataset(x, y)

    def order():
        return np.concatenate([b[1].numpy() for b in DataLoader(ds, batch_size=8, shuffle=True)])

    dp.manual_seed(5)
    first = [order(), order()]
    dp.manual_seed(5)
    second = [order(), order()]
    np.testing.assert_array_equal(first[0], second[0])
    np.testing.assert_array_equal(first[1], second[1])
    assert not np.array_equal(first[0], first[1])  # a new permutation every epoch
    np.testing.assert_array_equal(np.sort(first[0]), np.sort(y))


class _NoItemDataset(TensorDataset):
    def __getitem__(self, index):
        raise AssertionError("array-backed batching must not index sample by sample")


def test_array_backed_loader_gathers_without_per_sample_indexing():
    x, y = _xy(20)
    loader = DataLoader(Subset(_NoItemDataset(x, y), np.arange(19, -1, -1)), batch_size=6)
    got = np.concatenate([b[0].numpy() for b in loader])
    np.testing.assert_array_equal(got, x[::-1])


class _DictDataset(dp.data.Dataset):
    def __len__(self):
        return 5

    def __getitem__(self, i):
        return {"x": dp.tensor([float(i), 2.0 * i]), "y": i}


def test_generic_dataset_is_collated_per_sample():
    batch = next(iter(DataLoader(_DictDataset(), batch_size=3)))
    np.testing.assert_array_equal(batch["x"].numpy(), [[0, 0], [1, 2], [2, 4]])
    np.testing.assert_array_equal(batch["y"].numpy(), [0, 1, 2])


def test_prefetch_gives_the_same_batches_and_propagates_errors():
    x, y = _xy(30)
    ds = TensorDataset(x, y)
    plain = [b[0].numpy() for b in DataLoader(ds, batch_size=7)]
    fetched = [b[0].numpy() for b in DataLoader(ds, batch_size=7, prefetch=2)]
    assert len(plain) == len(fetched) == 5
    for a, b in zip(plain, fetched):
        np.testing.assert_array_equal(a, b)

    class Broken(dp.data.Dataset):
        def __len__(self):
            return 4

        def __getitem__(self, i):
            if i == 3:
                raise KeyError("sample 3 is broken")
            return np.float32(i)

    with pytest.raises(KeyError, match="sample 3 is broken"):
        list(DataLoader(Broken(), batch_size=2, prefetch=1))


def test_skip_batches_resumes_mid_epoch_once():
    x, y = _xy(10)
    loader = DataLoader(TensorDataset(x, y), batch_size=3)
    loader.skip_batches(2)
    assert [b[1].numpy().tolist() for b in loader] == [[2, 3, 0], [1]]
    assert len(list(loader)) == 4  # only the next iteration is shortened


def test_sampler_drives_the_order():
    x, y = _xy(10)
    loader = DataLoader(TensorDataset(x, y), batch_size=2, sampler=[9, 1, 4])
    assert len(loader) == 2
    assert [b[0].numpy()[:, 0].tolist() for b in loader] == [[27.0, 3.0], [12.0]]


@pytest.mark.parametrize("kwargs,match", [({"batch_size": 0}, "positive integer"),
                                          ({"prefetch": -1}, "prefetch"),
                                          ({"shuffle": True, "sampler": [0]}, "exclusive")])
def test_loader_rejects_bad_arguments(kwargs, match):
    x, y = _xy()
    with pytest.raises(ValueError, match=match):
        DataLoader(TensorDataset(x, y), **kwargs)


# --- sources ------------------------------------------------------------------------------------


def test_synthetic_is_seeded_and_split():
    a = sources.synthetic(n=200, shape=(2, 5), classes=3, seed=1)
    b = sources.synthetic(n=200, shape=(2, 5), classes=3, seed=1)
    assert a.sizes() == {"train": 160, "val": 20, "test": 20}
    assert a.input_shape == (2, 5) and a.num_classes == 3
    xa = next(iter(DataLoader(a.train, batch_size=200)))[0].numpy()
    xb = next(iter(DataLoader(b.train, batch_size=200)))[0].numpy()
    np.testing.assert_array_equal(xa, xb)
    assert xa.dtype == np.float32


def test_digits_split_is_deterministic():
    pytest.importorskip("sklearn")
    a, b = sources.digits(seed=0), sources.digits(seed=0)
    assert a.sizes() == {"train": 1258, "val": 180, "test": 359}
    np.testing.assert_array_equal(a.test.indices, b.test.indices)
    assert not np.intersect1d(a.train.indices, a.test.indices).size
    x, y = next(iter(DataLoader(a.test, batch_size=1000)))
    assert x.shape == (359, 64) and x.dtype == np.float32 and 0 <= x.numpy().min()
    assert y.dtype == np.int64 and y.numpy().max() <= 9


def test_mnist1d_is_generated_locally_and_cached(tmp_path, monkeypatch):
    pytest.importorskip("mnist1d")
    monkeypatch.setenv("DISTPROP_CACHE_DIR", str(tmp_path))
    state = np.random.get_state()[1].copy()
    first = sources.mnist1d(num_samples=500)
    np.testing.assert_array_equal(np.random.get_state()[1], state)  # caller's RNG untouched
    cached = list(tmp_path.glob("mnist1d-*.npz"))
    assert len(cached) == 1
    second = sources.mnist1d(num_samples=500)
    assert first.sizes() == second.sizes() == {"train": 360, "val": 40, "test": 100}
    assert first.input_shape == (40,) and first.num_classes == 10
    np.testing.assert_array_equal(first.test.arrays[0], second.test.arrays[0])


def test_npz_is_memory_mapped_and_gathers_rows(tmp_path):
    x = np.random.default_rng(0).standard_normal((50, 4))
    y = np.arange(50) % 5
    path = tmp_path / "data.npz"
    np.savez(path, x=x, y=y)
    splits = sources.npz(path, val_fraction=0.2, test_fraction=0.2)
    assert splits.info["memory_mapped"]
    assert isinstance(splits.train.dataset.arrays[0], np.memmap)
    assert splits.num_classes == 5 and splits.sizes() == {"train": 30, "val": 10, "test": 10}
    xb, yb = next(iter(DataLoader(splits.test, batch_size=10)))
    assert xb.dtype == np.float32  # float64 file, float32 batches
    np.testing.assert_allclose(xb.numpy(), x[splits.test.indices].astype(np.float32))
    np.testing.assert_array_equal(yb.numpy(), y[splits.test.indices])


def test_npz_compressed_and_presplit(tmp_path):
    path = tmp_path / "split.npz"
    np.savez_compressed(path, x_train=np.ones((8, 2), np.float32), y_train=np.arange(8) % 2,
                        x_test=np.zeros((4, 2), np.float32), y_test=np.arange(4) % 2)
    splits = sources.npz(path, val_fraction=0.25)
    assert splits.sizes() == {"train": 6, "val": 2, "test": 4}
    assert not splits.info["memory_mapped"]


def test_npy_directory_via_load(tmp_path):
    np.save(tmp_path / "x.npy", np.ones((20, 3), np.float32))
    np.save(tmp_path / "y.npy", np.arange(20) % 2)
    splits = sources.load(str(tmp_path))
    assert splits.num_classes == 2 and isinstance(splits.train.dataset.arrays[0], np.memmap)


def _bad(tmp_path, **arrays):
    path = tmp_path / "bad.npz"
    np.savez(path, **arrays)
    return path


@pytest.mark.parametrize("arrays,kwargs,match", [
    ({"x": np.ones((5, 2)), "y": np.array([0, 1, 2, 3, 4])}, {"num_classes": 3},
     r"bad.npz: array 'y' \(labels\) has label 4 at row 4, outside the range \[0, 3\)"),
    ({"x": np.ones((5, 2)), "y": np.array([0, -1, 0, 1, 1])}, {}, "negative label -1 at row 1"),
    ({"x": np.where(np.eye(5, 2) > 0, np.nan, 1.0), "y": np.zeros(5, int)}, {},
     r"bad.npz: array 'x' has a non-finite value \(nan\) at row 0, feature 0"),
    ({"x": np.ones((5, 2)), "y": np.zeros((5, 1), int)}, {}, r"'y' \(labels\) has shape \(5, 1\)"),
    ({"x": np.ones((5, 2)), "y": np.zeros(4, int)}, {}, "4 labels but 'x' has 5 samples"),
    ({"x": np.ones(5), "y": np.zeros(5, int)}, {}, r"'x' has shape \(5,\)"),
    ({"x": np.ones((5, 2)), "y": np.array([0, 0.5, 1, 1, 0])}, {}, "integer class indices"),
    ({"a": np.ones((5, 2)), "b": np.zeros(5)}, {},
     r"cannot find features and labels.*\['a', 'b'\]"),
    ({"x": np.ones((5, 2)), "y": np.zeros(5, int)}, {"input_shape": (3,)},
     r"samples of shape \(2,\); expected \(3,\)"),
])
def test_bad_data_is_refused_naming_file_and_array(tmp_path, arrays, kwargs, match):
    with pytest.raises(DataError, match=match):
        sources.npz(_bad(tmp_path, **arrays), **kwargs)


def test_missing_file_and_unknown_name(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        sources.npz(tmp_path / "nope.npz")
    with pytest.raises(DataError, match="unknown dataset 'cifar'.*digits, mnist1d, synthetic"):
        sources.load("cifar")


def test_object_arrays_are_never_unpickled(tmp_path):
    path = tmp_path / "obj.npz"
    np.savez(path, x=np.array([[1.0], [2.0]]), y=np.array([None, 1], dtype=object))
    with pytest.raises(DataError, match="(pickle|Python objects)"):
        sources.npz(path)
