"""FeatureStore construction from the inputs a Python user has at hand: NumPy arrays, torch
tensors, nested lists, NumPy string arrays of ids; what it refuses, it refuses in one line."""

import dataclasses

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
