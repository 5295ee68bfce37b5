"""FeatureStore construction from the inputs a Python user has at hand: NumPy arrays, torch
tensors, nested lists, NumPy string arrays of ids; what it refuses, it refuses in one line."""

import dataclasses
import re

import numpy as np
import pytest
import torch

from pretrain_reuse.errors import PretrainReuseError
from pretrain_reuse.features import FeatureStore


def _features(n=12, dim=5):
    return np.random.default_rng(0).standard_normal((n, dim)).astype(np.float32)


@pytest.mark.parametrize("convert", [torch.from_numpy, np.ndarray.tolist],
                         ids=["torch tensor", "nested list"])
def test_tensors_and_nested_lists_are_stored_as_the_same_numpy_array(convert):
    x, labels = _features(), np.arange(12) % 3
    store = FeatureStore(features=convert(x), labels=convert(labels))
    assert isinstance(store.features, np.ndarray)
    np.testing.assert_array_equal(store.features, x)
    np.testing.assert_array_equal(store.labels, labels)


def test_a_numpy_array_of_ids_becomes_a_list_of_plain_strings(tmp_path):
    ids = np.array([f"img/{i}.jpg" for i in range(12)])
    store = FeatureStore(features=_features(), ids=ids)
    assert store.ids == [f"img/{i}.jpg" for i in range(12)]
    assert all(type(i) is str for i in store.ids)
    assert FeatureStore.load(store.save(tmp_path / "s")).ids == store.ids


def test_ids_that_are_not_strings_are_refused_naming_the_first():
    with pytest.raises(PretrainReuseError, match="ids must be a list of strings; entry 0 is int 0"):
        FeatureStore(features=_features(), ids=list(range(12)))


def test_features_are_kept_in_their_dtype_and_a_memmap_is_not_read(tmp_path):
    # the docstring's promise: no copy here (a memmap of a large .npy stays on disk)
    x64 = _features().astype(np.float64)
    assert FeatureStore(features=x64).features.dtype == np.float64
    np.save(tmp_path / "x.npy", _features())
    assert isinstance(FeatureStore.from_npy(tmp_path / "x.npy").features, np.memmap)


@pytest.mark.parametrize("value", [np.nan, -np.inf, 1e300, 1e-300],
                         ids=["nan", "inf", "beyond float32", "below float32"])
def test_save_refuses_a_row_that_float32_cannot_hold_naming_its_sample(tmp_path, value):
    # saved before (1e300 as inf), the store failed only in a later command that read it
    x = _features(n=25).astype(np.float64)
    if value == 1e-300:
        x[13] = value  # a row of tiny values was saved as a zero row, with no direction
    else:
        x[13, 2] = value
    ids = [f"img/{i}.jpg" for i in range(25)]
    old = FeatureStore(features=_features(n=3)).save(tmp_path / "s")
    with pytest.raises(PretrainReuseError) as err:
        FeatureStore(features=x, ids=ids).save(tmp_path / "s", shard_size=10)  # row 13: 2nd shard
    what = {1e300: "values above the float32 range; rescale the features",
            1e-300: "only values below the float32 range (they round to zero); rescale"
            }.get(value, "NaN/inf values; remove or recompute that sample")
    assert str(err.value).startswith(f"features row 13 (sample 'img/13.jpg') holds {what}")
    # the store that was there is kept, and no unfinished one is left beside it
    assert [p.name for p in tmp_path.iterdir()] == ["s"]
    np.testing.assert_array_equal(FeatureStore.load(old).features, _features(n=3))


def test_class_names_fewer_than_the_labels_are_refused_at_construction():
    # accepted before, it failed only later, in class_means
    x, labels = _features(n=20), np.arange(20)
    with pytest.raises(PretrainReuseError, match=r"label 19 is out of range for 1 class names; "
                                                 r"give one name per label 0\.\.19"):
        FeatureStore(features=x, labels=labels, class_names=["a"])
    store = FeatureStore(features=x, labels=labels % 2, class_names=["a", "b"])
    with pytest.raises(PretrainReuseError, match="label 1 is out of range for 1 class names"):
        dataclasses.replace(store, class_names=["a"])


def test_class_names_as_labels_become_indices_in_sorted_or_given_order(tmp_path, capsys):
    x = np.arange(12, dtype=np.float32).reshape(4, 3)
    store = FeatureStore(features=x, labels=np.array(["dog", "cat", "dog", "ant"]))
    assert store.labels.tolist() == [2, 1, 2, 0] and store.class_names == ["ant", "cat", "dog"]
    given = FeatureStore(features=x, labels=["dog", "cat", "dog", "ant"], class_names=["dog", "cat", "ant"])
    assert given.labels.tolist() == [0, 1, 0, 2]
    with pytest.raises(PretrainReuseError, match="label 'emu' is not one of the 3 class names"):
        FeatureStore(features=x, labels=["dog", "cat", "emu", "ant"], class_names=["dog", "cat", "ant"])
    # on the command line: a .npy of names beside the features gives named class units
    from pretrain_reuse.cli import main
    from pretrain_reuse.units import Units

    np.save(tmp_path / "f.npy", x)
    np.save(tmp_path / "y.npy", np.array(["dog", "cat", "dog", "ant"]))
    assert main(["units", "--features", str(tmp_path / "f.npy"), "--labels", str(tmp_path / "y.npy"),
                 "--out", str(tmp_path / "u.safetensors"), "--quiet"]) == 0
    units = Units.load(tmp_path / "u.safetensors")
    assert units.names == ["ant", "cat", "dog"]
    np.testing.assert_allclose(units.prototypes[2], (x[0] + x[2]) / 2)


def test_class_names_given_beside_labels_that_are_names_number_them(tmp_path):
    """--class-names renamed the sorted numbering: the unit named dog held the cat."""
    from pretrain_reuse.cli import main
    from pretrain_reuse.units import Units

    np.save(tmp_path / "f.npy", np.array([[1, 0], [0, 1], [1, 0]], np.float32))
    np.save(tmp_path / "l.npy", np.array(["dog", "cat", "dog"]))
    (tmp_path / "names.txt").write_text("dog\ncat\n")
    assert main(["units", "--features", str(tmp_path / "f.npy"), "--labels", str(tmp_path / "l.npy"),
                 "--class-names", str(tmp_path / "names.txt"), "--out", str(tmp_path / "u.safetensors"),
                 "--quiet"]) == 0
    units = Units.load(tmp_path / "u.safetensors")
    assert units.names == ["dog", "cat"]
    np.testing.assert_array_equal(units.prototypes, [[1, 0], [0, 1]])


# --- a store loaded lazily: the features stay in the shard files until indexed -----------------

def _sharded(tmp_path, n=1000, dim=64, shard_size=300):
    x = np.random.default_rng(1).standard_normal((n, dim)).astype(np.float32)
    labels = np.arange(n) % 7
    return x, labels, FeatureStore(features=x, labels=labels).save(tmp_path / "s", shard_size=shard_size)


@pytest.mark.parametrize("shard_size", [300, 1000], ids=["four shards", "one shard"])
def test_lazy_features_index_as_the_array_does_across_shard_boundaries(tmp_path, shard_size):
    from pretrain_reuse.features import ShardedFeatures

    x, _, path = _sharded(tmp_path, shard_size=shard_size)
    lazy = FeatureStore.load(path, lazy=True).features
    assert isinstance(lazy, ShardedFeatures)
    assert (lazy.shape, lazy.dtype, lazy.ndim, len(lazy)) == (x.shape, x.dtype, 2, 1000)
    keys = [slice(None), slice(250, 650), slice(299, 301), slice(10, 20), slice(950, 2000),
            slice(-5, None), slice(700, 300), slice(None, None, 3), slice(900, 100, -7), 5, -1,
            np.int64(600), [999, 0, 301, 300, 299, 0], np.array([], dtype=np.int64),
            np.arange(1000) % 3 == 0, (slice(100, 400), slice(0, 5)), ([3, 700], 2),
            (7, slice(None)), (slice(None), [1, 0])]
    for key in keys:
        got, want = lazy[key], x[key]
        assert isinstance(got, np.ndarray) and got.shape == want.shape, key
        np.testing.assert_array_equal(got, want, err_msg=str(key))
    np.testing.assert_array_equal(np.asarray(lazy), x)
    np.testing.assert_array_equal(np.asarray(lazy, dtype=np.float64), x.astype(np.float64))
    with pytest.raises(IndexError):
        lazy[1000]
    copied = np.array(lazy)  # a copy of its own, whatever the number of shards
    copied[0] = 0
    assert lazy[0].any() and not copied[0].any()


def test_a_lazy_load_reads_no_features_into_memory_and_an_eager_one_reads_them_once(tmp_path):
    import tracemalloc

    x, _, path = _sharded(tmp_path, n=20000, dim=512, shard_size=6000)
    peaks = {}
    for lazy in (True, False):
        tracemalloc.start()
        store = FeatureStore.load(path, lazy=lazy)
        peaks[lazy] = tracemalloc.get_traced_memory()[1] / x.nbytes
        tracemalloc.stop()
        np.testing.assert_array_equal(np.asarray(store.features), x)
    # the ids and labels are read either way (20000 short strings: a tenth of the features)
    assert peaks[True] < 0.15 and 0.95 < peaks[False] - peaks[True] < 1.1, peaks
    assert isinstance(FeatureStore.load(path).features, np.ndarray)


def test_units_and_a_resaved_store_from_a_lazy_store_equal_those_from_memory(tmp_path):
    from pretrain_reuse.units import class_means, spherical_kmeans

    x, labels, path = _sharded(tmp_path)
    lazy, eager = FeatureStore.load(path, lazy=True), FeatureStore.load(path)
    a, b = class_means(lazy), class_means(eager)
    np.testing.assert_array_equal(a.prototypes, b.prototypes)
    assert a.meta["inputs"] == b.meta["inputs"]  # the same content hash
    ka, kb = (spherical_kmeans(s, k=12, seed=3) for s in (lazy, eager))
    np.testing.assert_array_equal(ka.assignment, kb.assignment)
    np.testing.assert_array_equal(ka.prototypes, kb.prototypes)
    # saved over itself, a lazy store reads its rows before the old files are replaced
    lazy.save(path, shard_size=450)
    back = FeatureStore.load(path)
    np.testing.assert_array_equal(back.features, x)
    np.testing.assert_array_equal(back.labels, labels)


def test_the_units_command_averages_a_store_without_reading_it_whole(tmp_path, monkeypatch):
    import tracemalloc

    import pretrain_reuse.units as units_module
    from pretrain_reuse.cli import main
    from pretrain_reuse.units import Units

    # 80 MB of features: the content hash reads 16 MB blocks, the means 1 MB blocks
    x, labels, path = _sharded(tmp_path, n=40000, dim=512, shard_size=12000)
    monkeypatch.setattr(units_module, "CHUNK_BYTES", 1 << 20)
    args = ["units", "--features", str(path), "--out", str(tmp_path / "u.safetensors"), "--quiet"]
    assert main(args) == 0  # once before measuring: the command's imports are not its data
    tracemalloc.start()
    assert main(args) == 0
    peak = tracemalloc.get_traced_memory()[1] / x.nbytes
    tracemalloc.stop()
    assert peak < 0.3, peak
    means = np.stack([x[labels == c].mean(0, dtype=np.float64) for c in range(7)])
    np.testing.assert_allclose(Units.load(tmp_path / "u.safetensors").prototypes, means, rtol=1e-6)


@pytest.mark.parametrize("content, reason", [
    (b"not an array at all", "no NumPy header: not a file numpy.save wrote"),  # was "pickled objects"
    (None, "it holds pickled objects, which are never loaded"),
])
def test_a_file_that_is_no_numeric_npy_array_is_named_for_what_it_is(tmp_path, content, reason):
    from pretrain_reuse.features import load_npy

    path = tmp_path / "x.npy"
    if content is None:
        np.save(path, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    else:
        path.write_bytes(content)
    for mmap in (False, True):
        with pytest.raises(PretrainReuseError, match=re.escape(f"is not a readable .npy array ({reason})")):
            load_npy("features", path, mmap=mmap)
