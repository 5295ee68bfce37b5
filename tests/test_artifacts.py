"""Artifacts on disk: FeatureStore, Units and Selection files, atomic writes, ``load`` and hashes.

Every round trip compares what comes back with what went in, value by value; every corrupt file
must surface as :class:`PretrainReuseError` naming the file, never as a library traceback.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

from pretrain_reuse import __version__
from pretrain_reuse.artifacts import (
    atomic_path,
    claim_folder,
    encode_ids,
    hash_array,
    link_file,
    load,
    make_meta,
    releases_folders,
    write_json,
)
from pretrain_reuse.errors import PretrainReuseError
from pretrain_reuse.features import FeatureStore
from pretrain_reuse.selection import Selection
from pretrain_reuse.units import Units


def _files(root: Path) -> set[str]:
    """Every path under ``root`` (files and folders), relative, for before/after comparisons."""
    return {str(p.relative_to(root)) for p in root.rglob("*")}


def _store(n=25, dim=6, labels=True, seed=0) -> FeatureStore:
    rng = np.random.default_rng(seed)
    feats = rng.standard_normal((n, dim)).astype(np.float32)
    labs = rng.integers(0, 4, n) if labels else None
    ids = [f"img/{i:03d}-é.jpg" for i in range(n)]  # non-ASCII ids must survive the blob encoding
    names = ["cat", "dog", "bird", "fish"] if labels else None
    meta = make_meta("test", {"alpha": 0.5, "layers": [1, 2]}, inputs={"src": "sha256:abc"}, seed=7)
    return FeatureStore(features=feats, labels=labs, ids=ids, class_names=names, meta=meta)


# --------------------------------------------------------------------------------------------
# FeatureStore
# --------------------------------------------------------------------------------------------


def test_value_objects_compare_by_value_and_are_not_hashable(tmp_path):
    # the generated __eq__ raised "the truth value of an array is ambiguous"
    from pretrain_reuse.knowledge.metrics import Convergence

    rng = np.random.default_rng(0)
    objects = {
        "fs": FeatureStore(rng.random((5, 3)).astype(np.float32), labels=np.arange(5) % 2,
                           class_names=["a", "b"]),
        "u.safetensors": Units(prototypes=rng.random((4, 3)), kind="class", names=list("wxyz")),
        "sel.json": Selection(selected=[2, 0], scores=np.array([0.5, -np.inf, 0.9, 0.1]),
                              params={"method": "uot"}),
        "conv.json": Convergence(similarity=np.array([0.2, np.nan, 1.0]), detour=np.zeros(3),
                                 n_used=np.array([3, 0, 3]), measure="iou"),
    }
    changed = {"fs": lambda o: replace(o, labels=1 - o.labels),
               "u.safetensors": lambda o: replace(o, prototypes=o.prototypes + 1),
               "sel.json": lambda o: replace(o, scores=o.scores * 2),
               "conv.json": lambda o: replace(o, similarity=np.r_[0.3, o.similarity[1:]])}
    for name, obj in objects.items():
        obj.save(tmp_path / name)
        back = load(tmp_path / name)
        # NaN equals NaN (an undefined s(t)), -inf -inf (a unit the plan gave no mass)
        assert back == load(tmp_path / name), name
        assert back != changed[name](back) and back != "something else", name
        with pytest.raises(TypeError, match="unhashable"):
            hash(back)
    assert load(tmp_path / "fs") == objects["fs"] == load(tmp_path / "fs", lazy=True)


def test_metadata_that_json_cannot_hold_is_one_line_and_writes_nothing(tmp_path):
    # a NaN or an array in metadata a caller gave raised json's ValueError / TypeError on save
    x = np.ones((3, 2), dtype=np.float32)
    for name, obj in (("fs", FeatureStore(x, meta={"x": float("nan")})),
                      ("u.safetensors", Units(prototypes=x, meta={"a": np.ones(2)})),
                      ("sel.json", Selection(selected=[0], scores=np.zeros(3),
                                             params={"k": np.ones(1)}))):
        with pytest.raises(PretrainReuseError, match=r"cannot write as JSON: .*; metadata and "
                                                     r"parameters may hold numbers"):
            obj.save(tmp_path / name)
    assert list(tmp_path.iterdir()) == []


def test_a_shard_size_below_one_is_refused_and_the_store_is_kept(tmp_path):
    # -1 replaced a good store with one of no rows; 0 was range()'s ValueError
    store = FeatureStore(np.ones((4, 2), dtype=np.float32))
    store.save(tmp_path / "fs")
    for size in (-1, 0, 2.5):
        with pytest.raises(PretrainReuseError, match="shard_size must be an integer >= 1"):
            store.save(tmp_path / "fs", shard_size=size)
    assert load(tmp_path / "fs") == store


def test_feature_store_round_trip_over_several_shards_keeps_every_field(tmp_path):
    store = _store(n=25)
    path = store.save(tmp_path / "store", shard_size=10)

    index = json.loads((path / "index.json").read_text())
    assert [s["n"] for s in index["shards"]] == [10, 10, 5]
    assert all((path / s["file"]).is_file() for s in index["shards"])

    back = FeatureStore.load(path)
    assert back.features.dtype == np.float32
    np.testing.assert_array_equal(back.features, store.features)
    assert back.labels.dtype == np.int64
    np.testing.assert_array_equal(back.labels, store.labels)
    assert back.ids == store.ids
    assert back.class_names == ["cat", "dog", "bird", "fish"]
    assert back.meta == store.meta
    assert back.meta["version"] == __version__ and back.meta["seed"] == 7
    assert len(back) == 25 and back.dim == 6


def test_meta_records_the_threads_and_versions_that_decide_the_numbers(tmp_path):
    torch = pytest.importorskip("torch")
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        back = FeatureStore.load(_store(n=3).save(tmp_path / "store"))
    finally:
        torch.set_num_threads(before)
    env = back.meta["environment"]
    assert env["threads"] == 1 and env["torch"] == torch.__version__
    assert env["numpy"] == np.__version__
    assert (env["gpu"] is None) == (not torch.cuda.is_available())


def test_meta_names_the_gpu_of_the_device_the_params_name(monkeypatch):
    # it named the current GPU (GPU 0) for a run on cuda:1, and a GPU for a run on the CPU
    torch = pytest.importorskip("torch")
    from pretrain_reuse.artifacts import make_meta

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    asked = []

    def name(device=None):
        asked.append(device)
        return f"GPU {'current' if device is None or device.index is None else device.index}"

    monkeypatch.setattr(torch.cuda, "get_device_name", name)
    assert make_meta("x", {"device": "cuda:1"})["environment"]["gpu"] == "GPU 1"
    assert make_meta("x", {"device": "cuda"})["environment"]["gpu"] == "GPU current"
    assert make_meta("x", {})["environment"]["gpu"] == "GPU current"  # no device: as before
    assert len(asked) == 3
    assert make_meta("x", {"device": "cpu"})["environment"]["gpu"] is None
    assert len(asked) == 3  # the CPU run asked no GPU (which would start CUDA in the process)


def test_feature_store_saves_float64_features_as_float32(tmp_path):
    rng = np.random.default_rng(1)
    x = rng.standard_normal((7, 3))
    back = FeatureStore.load(FeatureStore(features=x).save(tmp_path / "s"))
    assert back.features.dtype == np.float32
    np.testing.assert_array_equal(back.features, x.astype(np.float32))


def test_feature_store_without_labels_loads_labels_as_none_and_default_ids(tmp_path):
    x = np.arange(12, dtype=np.float32).reshape(4, 3)
    path = FeatureStore(features=x).save(tmp_path / "unlabelled", shard_size=3)
    back = FeatureStore.load(path)
    assert back.labels is None
    assert back.ids == ["0", "1", "2", "3"]
    assert back.class_names is None
    np.testing.assert_array_equal(back.features, x)
    assert json.loads((path / "index.json").read_text())["has_labels"] is False


def test_feature_store_save_replaces_an_old_store_and_leaves_no_temporary_folder(tmp_path):
    _store(n=30, seed=0).save(tmp_path / "store", shard_size=8)  # 4 shards
    new = _store(n=5, seed=1)
    new.save(tmp_path / "store", shard_size=8)  # 1 shard
    assert _files(tmp_path) == {"store", "store/index.json", "store/shard-00000.safetensors"}
    np.testing.assert_array_equal(FeatureStore.load(tmp_path / "store").features, new.features)


def test_feature_store_rejects_labels_of_the_wrong_length():
    with pytest.raises(PretrainReuseError, match="labels must be a vector of 4"):
        FeatureStore(features=np.zeros((4, 2), np.float32), labels=np.zeros(3, np.int64))


def test_feature_store_rejects_non_integer_and_negative_labels():
    x = np.zeros((3, 2), np.float32)
    with pytest.raises(PretrainReuseError, match="integer"):
        FeatureStore(features=x, labels=np.array([0.0, 1.5, 2.0]))
    with pytest.raises(PretrainReuseError, match="non-negative"):
        FeatureStore(features=x, labels=np.array([0, -1, 2]))
    # whole-valued floats are accepted and become int64
    assert FeatureStore(features=x, labels=np.array([0.0, 1.0, 2.0])).labels.dtype == np.int64


def test_truncated_feature_shard_raises_an_error_naming_the_shard(tmp_path):
    path = _store(n=25).save(tmp_path / "store", shard_size=10)
    shard = path / "shard-00001.safetensors"
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    with pytest.raises(PretrainReuseError, match=re.escape("shard-00001.safetensors")):
        FeatureStore.load(path)


def test_feature_shard_of_random_bytes_raises_an_error_naming_the_shard(tmp_path):
    path = _store(n=25).save(tmp_path / "store", shard_size=10)
    (path / "shard-00002.safetensors").write_bytes(np.random.default_rng(0).bytes(300))
    with pytest.raises(PretrainReuseError, match=re.escape("shard-00002.safetensors")):
        FeatureStore.load(path)


def test_missing_feature_shard_raises_an_error_naming_the_shard(tmp_path):
    path = _store(n=25).save(tmp_path / "store", shard_size=10)
    (path / "shard-00000.safetensors").unlink()
    with pytest.raises(PretrainReuseError, match=re.escape("shard-00000.safetensors")):
        FeatureStore.load(path)


def test_store_folder_without_index_json_is_refused(tmp_path):
    path = _store(n=25).save(tmp_path / "store", shard_size=10)
    (path / "index.json").unlink()
    with pytest.raises(PretrainReuseError, match=re.escape("index.json")):
        FeatureStore.load(path)
    with pytest.raises(PretrainReuseError, match=re.escape("index.json")):
        load(path)


def test_store_index_with_wrong_row_count_is_refused(tmp_path):
    path = _store(n=25).save(tmp_path / "store", shard_size=10)
    index = json.loads((path / "index.json").read_text())
    index["shards"][0]["n"] = 9
    (path / "index.json").write_text(json.dumps(index))
    with pytest.raises(PretrainReuseError, match=re.escape("shard-00000.safetensors")):
        FeatureStore.load(path)


def test_corrupt_index_json_is_refused(tmp_path):
    path = _store(n=5).save(tmp_path / "store")
    (path / "index.json").write_text('{"kind": "features", "n": ')
    with pytest.raises(PretrainReuseError, match="not valid JSON"):
        FeatureStore.load(path)


# --------------------------------------------------------------------------------------------
# Units
# --------------------------------------------------------------------------------------------


def _units() -> Units:
    rng = np.random.default_rng(3)
    protos = rng.standard_normal((4, 5)).astype(np.float32)
    assignment = np.array([2, 0, -1, 2, 3, 0, 2, 3], dtype=np.int64)  # unit 1 empty, one unassigned
    ids = [f"s{i}" for i in range(8)]
    meta = make_meta("test.units", {"k": 4}, inputs={"features": "sha256:0123"}, seed=11)
    meta["sizes"] = {"min": 0, "max": 3}
    return Units(prototypes=protos, kind="cluster", assignment=assignment, sample_ids=ids,
                 names=["a", "b", "c", "d"], meta=meta)


def test_units_round_trip_keeps_prototypes_assignment_ids_names_kind_and_meta(tmp_path):
    u = _units()
    back = Units.load(u.save(tmp_path / "u.safetensors"))
    np.testing.assert_array_equal(back.prototypes, u.prototypes)
    assert back.prototypes.dtype == np.float32
    np.testing.assert_array_equal(back.assignment, u.assignment)
    assert back.sample_ids == u.sample_ids
    assert back.names == ["a", "b", "c", "d"]
    assert back.kind == "cluster"
    assert back.meta == u.meta
    assert load(tmp_path / "u.safetensors").meta == u.meta


def test_units_counts_members_and_member_ids_follow_the_assignment(tmp_path):
    back = Units.load(_units().save(tmp_path / "u.safetensors"))
    np.testing.assert_array_equal(back.counts, [2, 0, 3, 2])  # -1 counts nowhere
    members = back.members
    assert len(members) == 4
    assert [m.tolist() for m in members] == [[1, 5], [], [0, 3, 6], [4, 7]]
    assert back.member_ids(2) == ["s0", "s3", "s6"]
    assert back.member_ids(1) == []


def test_units_without_assignment_round_trip_as_bare_prototypes(tmp_path):
    protos = np.random.default_rng(0).standard_normal((3, 4))
    back = Units.load(Units(prototypes=protos).save(tmp_path / "bare.safetensors"))
    np.testing.assert_array_equal(back.prototypes, protos)
    assert back.kind == "prototypes"
    assert back.assignment is None and back.counts is None and back.members is None
    assert back.names is None
    with pytest.raises(PretrainReuseError, match="without members"):
        back.member_ids(0)


def test_units_save_refuses_a_non_safetensors_path_and_writes_nothing(tmp_path):
    with pytest.raises(PretrainReuseError, match=re.escape(".safetensors")):
        _units().save(tmp_path / "u.npy")
    assert _files(tmp_path) == set()


def test_units_reject_names_of_the_wrong_length_and_unknown_kind():
    protos = np.zeros((3, 2))
    with pytest.raises(PretrainReuseError, match="2 unit names for 3 units"):
        Units(prototypes=protos, names=["a", "b"])
    with pytest.raises(PretrainReuseError, match="did you mean 'class'"):
        Units(prototypes=protos, kind="clas")


def test_npy_matrix_loads_as_units_of_kind_prototypes(tmp_path):
    m = np.random.default_rng(0).standard_normal((6, 3)).astype(np.float32)
    np.save(tmp_path / "protos.npy", m)
    for u in (Units.load(tmp_path / "protos.npy"), load(tmp_path / "protos.npy")):
        assert isinstance(u, Units)
        assert u.kind == "prototypes"
        np.testing.assert_array_equal(u.prototypes, m)
        assert u.counts is None and u.members is None and u.names is None
        assert u.meta["inputs"]["prototypes"].startswith("sha256:")


class _Tripwire:
    """Creates a folder when unpickled: proof that a loader ran pickle on untrusted data."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (os.mkdir, (self.path,))


def test_pickled_object_npy_is_refused_and_never_unpickled(tmp_path):
    # the tripwire works: numpy with allow_pickle=True does run it
    np.save(tmp_path / "proof.npy", np.array([_Tripwire(str(tmp_path / "proof")), None],
                                            dtype=object), allow_pickle=True)
    np.load(tmp_path / "proof.npy", allow_pickle=True)
    assert (tmp_path / "proof").is_dir()

    sentinel = tmp_path / "unpickled"
    np.save(tmp_path / "evil.npy", np.array([_Tripwire(str(sentinel)), None], dtype=object),
            allow_pickle=True)
    for opener in (Units.load, load):
        with pytest.raises(PretrainReuseError, match=re.escape("evil.npy")):
            opener(tmp_path / "evil.npy")
    with pytest.raises(PretrainReuseError, match=re.escape("evil.npy")):
        FeatureStore.from_npy(tmp_path / "evil.npy")
    assert not sentinel.exists()


def test_units_file_of_random_bytes_is_refused_naming_the_file(tmp_path):
    (tmp_path / "junk.safetensors").write_bytes(np.random.default_rng(0).bytes(400))
    with pytest.raises(PretrainReuseError, match=re.escape("junk.safetensors")):
        Units.load(tmp_path / "junk.safetensors")


def test_truncated_units_file_is_refused_naming_the_file(tmp_path):
    path = _units().save(tmp_path / "u.safetensors")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 20])
    with pytest.raises(PretrainReuseError, match=re.escape("u.safetensors")):
        Units.load(path)


def test_safetensors_file_not_written_as_units_is_refused(tmp_path):
    save_file({"weight": np.zeros((2, 2), np.float32)}, str(tmp_path / "model.safetensors"))
    with pytest.raises(PretrainReuseError, match="not a units file"):
        Units.load(tmp_path / "model.safetensors")


def test_units_file_with_mismatched_sample_ids_is_refused(tmp_path):
    save_file({"prototypes": np.zeros((2, 3), np.float32), "assignment": np.array([0, 1, 1]),
               "sample_ids": encode_ids(["a", "b"])}, str(tmp_path / "bad.safetensors"),
              metadata={"artifact": "units", "kind": "class", "names": "null", "meta": "{}"})
    with pytest.raises(PretrainReuseError, match=re.escape("bad.safetensors")):
        Units.load(tmp_path / "bad.safetensors")


def test_units_meta_with_numpy_scalars_saves_like_selection_meta(tmp_path):
    u = Units(prototypes=np.zeros((2, 3)), meta={"n": np.int64(3), "x": np.float32(0.5)})
    back = Units.load(u.save(tmp_path / "u.safetensors"))
    assert back.meta == {"n": 3, "x": 0.5}


def test_npy_units_with_nan_or_wrong_rank_are_refused(tmp_path):
    m = np.ones((4, 3))
    m[2, 1] = np.nan
    np.save(tmp_path / "nan.npy", m)
    with pytest.raises(PretrainReuseError, match="row 2"):
        Units.load(tmp_path / "nan.npy")
    np.save(tmp_path / "vec.npy", np.ones(5))
    with pytest.raises(PretrainReuseError, match="2-d"):
        Units.load(tmp_path / "vec.npy")


# --------------------------------------------------------------------------------------------
# Selection
# --------------------------------------------------------------------------------------------


def _selection() -> Selection:
    scores = np.array([0.1, 0.9, -2.0, 0.5, 0.9, 0.3])
    return Selection(selected=[1, 4, 3], scores=scores, params={"method": "uot", "k": 3},
                     meta=make_meta("test.select", {"k": 3}, seed=5),
                     unit_names=["u0", "u1", "u2", "u3", "u4", "u5"],
                     counts=np.array([10, 5, 20, 20, 20, 25]))


def test_selection_round_trip_keeps_selected_scores_params_meta_names_and_counts(tmp_path):
    sel = _selection()
    sel.save(tmp_path / "sel.json")
    obj = json.loads((tmp_path / "sel.json").read_text())
    assert obj["selected"] == [1, 4, 3]
    assert obj["selected_names"] == ["u1", "u4", "u3"]
    back = Selection.load(tmp_path / "sel.json")
    assert back.selected == [1, 4, 3]
    np.testing.assert_array_equal(back.scores, sel.scores)
    assert back.params == {"method": "uot", "k": 3}
    assert back.meta == sel.meta
    assert back.unit_names == sel.unit_names
    np.testing.assert_array_equal(back.counts, sel.counts)


def test_selection_ranking_breaks_ties_by_unit_id():
    np.testing.assert_array_equal(_selection().ranking(), [1, 4, 3, 5, 0, 2])


def test_selection_top_takes_a_count_or_a_sample_fraction_of_the_ranking():
    sel = _selection()
    assert sel.top(2).selected == [1, 4]
    assert sel.top(2).params["k"] == 2
    assert sel.top(6).selected == [1, 4, 3, 5, 0, 2]
    # 100 samples; along the ranking 1 (5), 4 (20), 3 (20), 5 (25), 0 (10), 2 (20)
    # the covered samples are 5, 25, 45, 70, 80, 100
    assert sel.top(0.05).selected == [1]
    assert sel.top(0.25).selected == [1, 4]
    assert sel.top(0.26).selected == [1, 4, 3]
    assert sel.top(0.45).selected == [1, 4, 3]
    assert sel.top(0.5).selected == [1, 4, 3, 5]
    assert sel.top(0.99).selected == [1, 4, 3, 5, 0, 2]
    with pytest.raises(PretrainReuseError, match="exceeds the 6 source units"):
        sel.top(7)


@pytest.mark.parametrize("selected, needle", [([1, 6], "names unit 6, outside the 6 units"),
                                               ([-1], "names unit -1"),
                                               ([1, 4, 1], "names a unit twice")])
def test_an_edited_selection_naming_units_it_does_not_rank_is_refused(tmp_path, selected, needle):
    path = _selection().save(tmp_path / "sel.json")
    obj = json.loads(path.read_text())
    obj["selected"] = selected
    path.write_text(json.dumps(obj))
    with pytest.raises(PretrainReuseError, match=needle):
        Selection.load(path)


def test_selection_top_fraction_is_not_inflated_by_floating_point_rounding():
    sel = Selection(selected=[0], scores=-np.arange(100.0), params={},
                    counts=np.ones(100, dtype=np.int64))
    for k, n in ((0.07, 7), (0.14, 14), (0.28, 28), (0.55, 55), (0.56, 56)):
        assert len(sel.top(k).selected) == n, k


def test_selection_recall_is_the_share_of_relevant_units_selected():
    sel = _selection()
    assert sel.recall([1, 4]) == 1.0
    assert sel.recall([1, 2]) == 0.5
    assert sel.recall(np.array([0, 2, 5, 4])) == 0.25
    with pytest.raises(PretrainReuseError, match="at least one"):
        sel.recall([])
    # an id past the units would silently lower recall (experiment --relevant 0-999)
    with pytest.raises(PretrainReuseError, match=f"id {len(sel.scores)} is out of range"):
        sel.recall([1, len(sel.scores)])


def test_json_that_is_not_a_selection_is_refused(tmp_path):
    (tmp_path / "other.json").write_text('{"kind": "something"}')
    with pytest.raises(PretrainReuseError, match="not a selection"):
        Selection.load(tmp_path / "other.json")
    (tmp_path / "broken.json").write_text('{"kind": "selection", ')
    with pytest.raises(PretrainReuseError, match=re.escape("broken.json")):
        load(tmp_path / "broken.json")


# --------------------------------------------------------------------------------------------
# atomic writes, load() dispatch, hashes
# --------------------------------------------------------------------------------------------


def test_atomic_path_leaves_no_file_behind_when_the_block_raises(tmp_path):
    target = tmp_path / "out.bin"
    with pytest.raises(RuntimeError, match="boom"), atomic_path(target) as tmp:
        tmp.write_bytes(b"half written")
        raise RuntimeError("boom")
    assert _files(tmp_path) == set()


def test_atomic_path_keeps_the_old_file_when_the_block_raises(tmp_path):
    target = tmp_path / "out.bin"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_bytes(b"new but broken")
        raise RuntimeError("boom")
    assert target.read_bytes() == b"old"
    assert _files(tmp_path) == {"out.bin"}


def test_atomic_path_replaces_the_file_when_the_block_succeeds(tmp_path):
    target = tmp_path / "sub" / "out.bin"
    target.parent.mkdir()
    target.write_bytes(b"old")
    with atomic_path(target) as tmp:
        assert tmp.parent == target.parent and tmp != target
        tmp.write_bytes(b"new")
    assert target.read_bytes() == b"new"
    assert _files(tmp_path) == {"sub", "sub/out.bin"}


def test_link_file_replaces_the_file_with_a_link_and_leaves_no_temporary(tmp_path, monkeypatch):
    (tmp_path / "source.npy").write_bytes(b"game")
    (tmp_path / "out.npy").write_bytes(b"damaged")
    link_file(tmp_path / "source.npy", tmp_path / "out.npy")
    assert (tmp_path / "out.npy").samefile(tmp_path / "source.npy")
    assert _files(tmp_path) == {"source.npy", "out.npy"}

    def no_links(src, dst):
        raise OSError(1, "Operation not permitted")

    monkeypatch.setattr(os, "link", no_links)  # a file system without hard links: a copy
    link_file(tmp_path / "source.npy", tmp_path / "copy.npy")
    assert (tmp_path / "copy.npy").read_bytes() == b"game"
    assert not (tmp_path / "copy.npy").samefile(tmp_path / "source.npy")
    assert _files(tmp_path) == {"source.npy", "out.npy", "copy.npy"}


def test_write_json_refuses_nan_and_leaves_nothing(tmp_path):
    with pytest.raises(PretrainReuseError, match="cannot write as JSON: Out of range float values "
                                                 "are not JSON compliant"):
        write_json(tmp_path / "x.json", {"a": float("nan")})
    assert _files(tmp_path) == set()


def test_atomically_written_files_get_the_same_permissions_as_plain_files(tmp_path):
    old = os.umask(0o022)
    try:
        (tmp_path / "plain.json").write_text("{}")
        write_json(tmp_path / "atomic.json", {})
    finally:
        os.umask(old)
    plain = (tmp_path / "plain.json").stat().st_mode & 0o777
    assert (tmp_path / "atomic.json").stat().st_mode & 0o777 == plain


def test_load_dispatches_on_the_kind_of_artifact(tmp_path):
    store_dir = _store(n=6).save(tmp_path / "store")
    _units().save(tmp_path / "u.safetensors")
    np.save(tmp_path / "p.npy", np.eye(3))
    _selection().save(tmp_path / "sel.json")

    assert isinstance(load(store_dir), FeatureStore)
    assert isinstance(load(store_dir / "index.json"), FeatureStore)
    assert len(load(store_dir / "index.json")) == 6
    assert isinstance(load(tmp_path / "u.safetensors"), Units)
    assert load(tmp_path / "u.safetensors").kind == "cluster"
    assert isinstance(load(tmp_path / "p.npy"), Units)
    assert isinstance(load(tmp_path / "sel.json"), Selection)
    assert load(tmp_path / "sel.json").selected == [1, 4, 3]
    # plain strings work as well as Paths
    assert isinstance(load(str(tmp_path / "sel.json")), Selection)


def test_load_refuses_unknown_suffixes_and_missing_paths(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(PretrainReuseError, match="do not know how to open"):
        load(tmp_path / "notes.txt")
    with pytest.raises(PretrainReuseError, match="does not exist"):
        load(tmp_path / "nothing.safetensors")
    # JSON without a kind (a demo's summary.json) was named "not a selection file"
    (tmp_path / "summary.json").write_text(json.dumps({"selection": {}, "finetune": {}}))
    with pytest.raises(PretrainReuseError, match=r"summary\.json' is JSON but no artifact of this "
                                                 r"package; json\.load reads it; pass an artifact"):
        load(tmp_path / "summary.json")
    (tmp_path / "cut.json").write_text('{"kind": "selec')  # not JSON: the selection reader says so
    with pytest.raises(PretrainReuseError) as e:
        load(tmp_path / "cut.json")
    assert "is JSON but" not in str(e.value)


@pytest.mark.parametrize("path", [None, 3])
def test_load_of_something_that_is_no_path_is_one_line(path):
    with pytest.raises(PretrainReuseError, match=rf"path must be a file path \(str or pathlib.Path\), "
                                                 rf"got {type(path).__name__} {path}"):
        load(path)


def test_output_folder_errors_name_the_parameter_and_the_flag(tmp_path):
    # make_folder serves run(out=...) and run_experiment(out) as well as the CLI's --out
    from pretrain_reuse.artifacts import make_folder

    (tmp_path / "f").write_text("x")
    with pytest.raises(PretrainReuseError, match=r"^out \(--out\) '.*f' is a file; pass a folder "
                                                 r"for a run$"):
        make_folder(tmp_path / "f", "a run")


def test_load_names_what_a_file_it_does_not_open_holds(tmp_path):
    from pretrain_reuse.models import create_backbone, save_backbone

    save_backbone(create_backbone("smallcnn-s"), tmp_path / "model.safetensors", {})
    with pytest.raises(PretrainReuseError, match=r"holds a backbone.*create_backbone"):
        load(tmp_path / "model.safetensors")
    (tmp_path / "grid.json").write_text('{"kind": "grid", "rows": []}')
    with pytest.raises(PretrainReuseError, match="holds a 'grid' record"):
        load(tmp_path / "grid.json")
    (tmp_path / "result.json").write_text('{"kind": "finetune-result", "history": []}')
    with pytest.raises(PretrainReuseError, match=r"not a complete fine-tuning result\.json \(no 'config'\)"):
        load(tmp_path / "result.json")
    # a result saved under another name opens by its kind (it was refused as "a record")
    from pretrain_reuse.finetune import RunResult

    result = RunResult(config={"lr": 0.1, "mode": "vanilla"}, history=[], final={"top1": 0.5, "step": 3},
                       at_best_val={"top1": 0.4, "step": 3})
    assert load(result.save(tmp_path / "vanilla_result.json")) == result
    (tmp_path / "run").mkdir()
    with pytest.raises(PretrainReuseError, match=r"folder without index\.json"):
        load(tmp_path / "run")
    (tmp_path / "run" / "run.json").write_text('{"kind": "finetune-run", "config": {}}')
    with pytest.raises(PretrainReuseError, match=r"fine-tuning run that has not finished \(no result"):
        load(tmp_path / "run")
    (tmp_path / "run" / "run.json").write_text('{"kind": "experiment-run", "params": {}}')
    with pytest.raises(PretrainReuseError, match=r"experiment that has not finished \(no experiment\.json\)"):
        load(tmp_path / "run")
    # a cut-short result is named as what it is, in its folder or alone
    (tmp_path / "run" / "result.json").write_text('{"kind": "finetune-res')
    for path in (tmp_path / "run", tmp_path / "run" / "result.json"):
        with pytest.raises(PretrainReuseError, match=r"^fine-tuning result: .* is not valid JSON"):
            load(path)


def test_load_says_how_to_open_the_outputs_of_explain_and_knowledge(tmp_path):
    from pretrain_reuse.knowledge import Interactions

    n = 2
    x = Interactions(n=n, and_values=np.array([0.0, 1.0, 2.0, 0.5]), or_values=np.zeros(4),
                     v=np.array([0.0, 1.0, 2.0, 3.5]), noise=np.zeros(4))
    explained = tmp_path / "k" / "finetuned"
    explained.mkdir(parents=True)
    (explained / "explain.json").write_text('{"kind": "explanations"}')
    sample = x.save(explained / "interactions-0000.safetensors")
    (tmp_path / "k" / "knowledge.json").write_text('{"kind": "knowledge-report"}')

    assert isinstance(load(sample), Interactions)  # one sample's file opens as before
    for path in (tmp_path / "k", tmp_path / "k" / "knowledge.json"):
        with pytest.raises(PretrainReuseError, match=r"output of knowledge: .*knowledge\.json.*json\.load"):
            load(path)
    for path in (explained, explained / "explain.json"):
        with pytest.raises(PretrainReuseError, match=r"output of explain.*interactions-0000"):
            load(path)
    # a cut-short interactions file is not called a units file
    data = sample.read_bytes()
    sample.write_bytes(data[:len(data) - 20])
    with pytest.raises(PretrainReuseError, match=r"not a readable safetensors file \(cut short") as err:
        load(sample)
    assert "units" not in str(err.value)


def test_load_opens_saved_knowledge_results_by_their_kind(tmp_path):
    from pretrain_reuse.knowledge import (
        AccuracyCorrelation,
        Convergence,
        Interactions,
        accuracy_correlation,
        knowledge_convergence,
    )

    def inter(values):
        and_values = np.array(values, float)
        v = np.array([0.0, values[1], values[2], sum(values)])  # the AND game of these values
        return Interactions(n=2, and_values=and_values, or_values=np.zeros(4), v=v, noise=np.zeros(4))

    final = inter([0.0, 1.0, 0.1, 2.0])
    curve = knowledge_convergence([[inter([0.0, 1.0, 2.0, 0.1])], [final]])
    back = load(curve.save(tmp_path / "convergence.json"))
    assert isinstance(back, Convergence) and back.to_dict() == curve.to_dict()
    corr = accuracy_correlation([[0.1, 0.2], [0.4, 0.5], [0.3, 0.2]], [0.6, 0.8, 0.7], n_boot=100)
    back = load(corr.save(tmp_path / "correlation.json"))
    assert isinstance(back, AccuracyCorrelation) and back.to_dict() == corr.to_dict()


def test_repr_of_big_artifacts_is_a_one_line_summary():
    n = 50_000
    store = FeatureStore(features=np.zeros((n, 4), np.float32), labels=np.arange(n) % 5,
                         class_names=list("abcde"))
    assert repr(store) == "FeatureStore(n=50000, dim=4, 5 classes)"
    units = Units(prototypes=np.ones((5, 4)), kind="class", assignment=store.labels,
                  sample_ids=store.ids, names=store.class_names)
    assert repr(units) == "Units(kind='class', units=5, dim=4, samples=50000, names=['a', ...])"


def test_hash_array_is_stable_and_sensitive_to_values_dtype_and_shape():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((50, 8)).astype(np.float32)
    h = hash_array(x)
    assert h.startswith("sha256:")
    assert hash_array(x.copy()) == h
    assert hash_array(np.asfortranarray(x)) == h  # memory layout does not matter
    big = np.zeros((60, 60))
    assert hash_array(big[::2, ::3]) == hash_array(np.ascontiguousarray(big[::2, ::3]))

    y = x.copy()
    y[17, 3] = np.nextafter(y[17, 3], np.float32(np.inf))  # one value, one ulp
    assert hash_array(y) != h
    assert hash_array(x.astype(np.float64)) != h
    assert hash_array(x.reshape(100, 4)) != h


def test_claim_folder_resumes_the_same_run_and_refuses_any_other(tmp_path):
    out = tmp_path / "run"
    claim_folder(out, "demo-run", {"seed": 0, "sizes": (1, 2)}, what="a demo run")
    assert json.loads((out / "run.json").read_text()) == {
        "kind": "demo-run", "params": {"seed": 0, "sizes": [1, 2]}}
    (out / "stage.txt").write_text("done")
    claim_folder(out, "demo-run", {"seed": 0, "sizes": (1, 2)}, what="a demo run")  # resume
    with pytest.raises(PretrainReuseError, match=r"other settings or inputs \(extra, seed\)"):
        claim_folder(out, "demo-run", {"seed": 1, "sizes": [1, 2], "extra": 1}, what="a demo run")
    # another command's folder is named as what it holds, not as a run with other settings
    with pytest.raises(PretrainReuseError, match="holds a demo run, not an experiment;"):
        claim_folder(out, "experiment-run", {"seed": 0, "sizes": [1, 2]}, what="an experiment")
    with pytest.raises(PretrainReuseError, match="holds a demo run, not an embedding;"):
        claim_folder(out, "embedding", {}, what="an embedding", marker="embed.json")
    (out / "run.json").rename(out / "notes.json")
    with pytest.raises(PretrainReuseError, match="is not empty and not an embedding;"):
        claim_folder(out, "embedding", {}, what="an embedding", marker="embed.json")
    (out / "notes.json").rename(out / "run.json")
    (tmp_path / "file").write_text("x")
    with pytest.raises(PretrainReuseError, match="is a file"):
        claim_folder(tmp_path / "file", "demo-run", {}, what="a demo run")
    assert sorted(p.name for p in out.iterdir()) == ["run.json", "stage.txt"]


def test_sample_ids_that_are_not_utf8_are_a_corrupt_file_error():
    from pretrain_reuse.artifacts import decode_ids, encode_ids

    assert decode_ids(encode_ids(["a/1.png", "é.png"]), 2, "u.safetensors") == ["a/1.png", "é.png"]
    with pytest.raises(PretrainReuseError, match=r"'u\.safetensors' stores sample ids that are not UTF-8"):
        decode_ids(np.frombuffer(b"a\n\xff\xfe", dtype=np.uint8), 2, "u.safetensors")


@pytest.mark.parametrize("content,needle", [
    ({"a/0.png": b"x"}, "is a folder of images, not a FeatureStore: embed it first"),
    ({"embed.json": b"{}", "parts/.keep": b""}, "is an unfinished embedding (no index.json yet): rerun"),
    ({"notes.txt": b"x"}, "is a folder without index.json, not a FeatureStore"),
    # images two levels down are a run's figures, not data
    ({"notes.txt": b"x", "a/b/0.png": b"x"}, "is a folder without index.json, not a FeatureStore"),
    # a demo, whose knowledge figures made it a folder of images
    ({"run.json": b'{"kind": "demo-run", "params": {}}', "knowledge/sets.png": b"x",
      "summary.json": b"{}"}, "is a demo run, a folder of artifacts: pass one of them, such as a "
                              "FeatureStore (features_target)"),
    # a grid search, by its marker or (a version without it) by its results
    ({"run.json": b'{"kind": "grid-run", "params": {}}', "lr=0.1/run.json": b'{"kind": "finetune-run"}'},
     "is a grid search, a folder of fine-tuning runs (one per combination): pass one of them; "
     "grid.json, once the search has finished, names the one validation picked"),
    ({"grid.json": b'{"kind": "grid"}', "lr=0.1/result.json": b'{"kind": "finetune-result"}'},
     "is a grid search, a folder of fine-tuning runs"),
])
def test_a_folder_that_is_not_a_store_says_what_it_is(tmp_path, content, needle):
    from pretrain_reuse import load

    for name, data in content.items():
        (tmp_path / "f" / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "f" / name).write_bytes(data)
    with pytest.raises(PretrainReuseError, match=re.escape(needle)):
        load(tmp_path / "f")


def test_a_folder_given_where_features_are_expected_is_one_sentence_naming_no_function(tmp_path,
                                                                                      capsys):
    # the clauses were mixed ("... and pass the store, not a FeatureStore; load opens ..."), and
    # users of the command line were told what the Python function load opens
    from pretrain_reuse.cli import main

    (tmp_path / "imgs" / "cat").mkdir(parents=True)
    (tmp_path / "imgs" / "cat" / "0.png").write_bytes(b"x")
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("x")
    np.save(tmp_path / "T.npy", np.ones((2, 4), np.float32))
    images = tmp_path / "imgs"
    expected = (f"{str(images)!r} is a folder of images, not a FeatureStore: embed it first "
                f"(`pretrain-reuse embed --data {images} --out STORE`) and pass the store")
    with pytest.raises(PretrainReuseError) as e:
        load(images)
    assert str(e.value) == expected
    for folder in (images, tmp_path / "notes"):
        assert main(["select", "--source", str(folder), "--target", str(tmp_path / "T.npy"),
                     "--k", "1", "--out", str(tmp_path / "s.json")]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "load" not in err, err
    assert err.endswith("is a folder without index.json, not a FeatureStore; pass an artifact: a "
                        "FeatureStore, fine-tuning run or experiment folder, Units (.safetensors or "
                        ".npy), Interactions (.safetensors), a selection (.json) or a saved "
                        "knowledge result (.json)\n")


def test_explain_games_and_a_run_split_are_named_not_misread(tmp_path):
    # a game (v on every coalition) was read as a prototype matrix, split.json as a selection
    from pretrain_reuse import load

    (tmp_path / "x" / "games").mkdir(parents=True)
    (tmp_path / "x" / "explain.json").write_text('{"kind": "explanations", "finished": true}')
    np.save(tmp_path / "x" / "games" / "0000005-abc.npy", np.zeros(512))
    with pytest.raises(PretrainReuseError, match="is a cached game of explain"):
        load(tmp_path / "x" / "games" / "0000005-abc.npy")
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "run.json").write_text('{"kind": "finetune-run"}')
    (tmp_path / "run" / "split.json").write_text('{"train": [], "val": []}')
    with pytest.raises(PretrainReuseError, match="record of a fine-tuning run's split"):
        load(tmp_path / "run" / "split.json")


def test_hash_array_is_the_sha256_of_the_c_order_bytes_block_by_block():
    """Hashed in row blocks, so a Fortran-order memmap is never copied whole; the digest is still
    that of the whole array's bytes (hashes recorded by earlier versions stay valid)."""
    import hashlib

    def whole(x):
        h = hashlib.sha256(f"{x.dtype.str}{x.shape}".encode())
        h.update(np.ascontiguousarray(x).tobytes())
        return "sha256:" + h.hexdigest()[:16]

    rng = np.random.default_rng(0)
    for x in (np.asfortranarray(rng.random((70_000, 33))), rng.random((9, 8))[:, ::3],
              np.array(2.5), np.zeros((0, 4)), rng.random((3, 4, 5)).astype(np.float32)):
        assert hash_array(x) == whole(x), x.shape


_HOLD = """
import sys
from pathlib import Path
from pretrain_reuse.artifacts import lock_folder
lock_folder(Path(sys.argv[1]), "a demo run")
print("locked", flush=True)
sys.stdin.read()  # until the test closes it
"""


class _Holder:
    """Another process that holds the lock of ``folder`` until the block ends (or refuses to
    take it: ``error``)."""

    def __init__(self, folder):
        self.folder = folder

    def __enter__(self):
        self.proc = subprocess.Popen([sys.executable, "-c", _HOLD, str(self.folder)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True)
        self.ready = self.proc.stdout.readline().strip()
        return self

    def __exit__(self, *exc):
        _, self.error = self.proc.communicate("")
        return False


def test_a_run_folder_is_locked_against_other_processes_while_a_command_writes_it(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    with _Holder(out) as other:
        assert other.ready == "locked"
        with pytest.raises(PretrainReuseError, match=re.escape(
                f"out (--out) {str(out)!r} is in use by another process writing a demo run there; "
                "wait for it to finish")):
            claim_folder(out, "demo-run", {"seed": 0}, what="a demo run")
        assert list(out.iterdir()) == []  # nothing written
    # the other process ended (its lock with it, however it ends)

    @releases_folders
    def write(inner: bool):
        claim_folder(out, "demo-run", {"seed": 0}, what="a demo run")
        claim_folder(out, "demo-run", {"seed": 0}, what="a demo run")  # this process holds it
        if inner:  # a nested call leaves the outer call's lock held
            write(False)
        with _Holder(out) as other:
            assert other.ready == ""
        assert "in use by another process" in other.error

    write(True)
    with _Holder(out) as other:  # unlocked once the outer call returned
        assert other.ready == "locked"

    @releases_folders
    def fail():
        claim_folder(out, "demo-run", {"seed": 0}, what="a demo run")
        raise PretrainReuseError("a user error after the claim")

    with pytest.raises(PretrainReuseError, match="a user error"):
        fail()
    with _Holder(out) as other:  # unlocked once it raised
        assert other.ready == "locked"


_RANKS = """
import os, sys
from pathlib import Path
import torch.distributed as dist
import torch.multiprocessing as mp
from pretrain_reuse.artifacts import make_run_folder

def rank(r, folder, port):
    os.environ.pop("RANK", None)  # a group started by mp.spawn (or srun) may set none
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=r, world_size=2)
    make_run_folder(Path(folder), "a demo run", "run.json", kind="demo-run")
    dist.barrier()
    print(f"rank {r} ok", flush=True)
    dist.destroy_process_group()

if __name__ == "__main__":
    mp.spawn(rank, args=(sys.argv[1], sys.argv[2]), nprocs=2)
"""


def test_the_processes_of_one_distributed_job_share_its_folder_without_rank_variables(tmp_path):
    # every process of a job calls make_run_folder; only its first locks, whatever started it
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    (tmp_path / "ranks.py").write_text(_RANKS)
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    done = subprocess.run([sys.executable, str(tmp_path / "ranks.py"), str(tmp_path / "run"),
                           str(port)], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    # (two processes' lines can run together on one stdout)
    assert sorted(re.findall(r"rank \d ok", done.stdout)) == ["rank 0 ok", "rank 1 ok"]


# --------------------------------------------------------------------------------------------
# Result objects through the Python API (from an audit of every result type)
# --------------------------------------------------------------------------------------------


def _knowledge_results():
    import copy

    from pretrain_reuse.knowledge import (
        accuracy_correlation,
        and_interactions,
        knowledge_report,
        planted_game,
        set_ablation,
    )
    from pretrain_reuse.knowledge.sensitivity import ratio_sensitivity

    xs = [and_interactions(planted_game(4, {(0, 1): 1.0}, noise=0.01, seed=s))[0]
          .with_info(sample=f"s{s}") for s in range(3)]
    report = knowledge_report(xs, xs)
    results = [xs[0], report, set_ablation(report, xs),
               accuracy_correlation([[.1, .2], [.2, .3], [.3, .5]], [.5, .6, .4]),
               ratio_sensitivity({"a": report}, {"a": ["s0", "s1", "s2"]}, {"a": {"tau": .05}},
                                 {"tau": [.05]})]
    return results, copy.deepcopy


def test_result_objects_compare_by_value_and_their_round_trips_compare_equal(tmp_path):
    # SetAblation, AccuracyCorrelation and KnowledgeSensitivity raised "truth value of an array
    # is ambiguous" on ==, and a loaded Interactions never equalled the one saved
    results, deepcopy = _knowledge_results()
    for result in results:
        assert result == deepcopy(result), type(result).__name__
        suffix = ".safetensors" if type(result).__name__ == "Interactions" else ".json"
        path = result.save(tmp_path / f"{type(result).__name__}{suffix}")
        assert load(path) == result, type(result).__name__


def test_results_that_differ_only_in_when_they_were_made_compare_equal():
    # the same seeded computation a second later was unequal by meta.created (and a run by its
    # train_seconds), so a reproducibility check passed or failed by the clock
    from dataclasses import replace

    from pretrain_reuse.experiments import ExperimentTable
    from pretrain_reuse.finetune import RunResult

    meta = make_meta("test", {"k": 2}, seed=0)
    sel = Selection(selected=[1], scores=np.array([0., 1.]), params={}, meta=meta)
    run = RunResult({"mode": "vanilla"}, [], {"step": 4, "top1": .4}, {"step": 4, "top1": .4},
                    {**meta, "train_seconds": 3.2})
    table = ExperimentTable("table1", [{"method": "vanilla", "top1_mean": .5}], None, {}, meta)
    later = {**meta, "created": "2030-01-01T00:00:00+00:00"}
    for result in (sel, run, table):
        assert replace(result, meta={**later, "train_seconds": 9.9}) == result, type(result).__name__
        assert replace(result, meta={**later, "seed": 1}) != result, type(result).__name__
    assert replace(run, final={"step": 4, "top1": .5}) != run


def test_result_savers_and_loaders_refuse_a_folder_or_another_suffix_in_one_line(tmp_path):
    # a folder gave IsADirectoryError (the JSON loaders) or "is corrupt ... No such device"
    # (safetensors); a knowledge result saved without .json could not be loaded by load()
    from pretrain_reuse.finetune import RunResult
    from pretrain_reuse.knowledge import KnowledgeReport
    from pretrain_reuse.knowledge.values import Interactions

    results, _ = _knowledge_results()
    for loader in (Selection.load, KnowledgeReport.load, Units.load, Interactions.load):
        with pytest.raises(PretrainReuseError, match=r"is a folder; pass a file$"):
            loader(tmp_path)
    for result in results[1:]:
        with pytest.raises(PretrainReuseError, match=r"files are saved as \.json"):
            result.save(tmp_path / "k")
    assert not (tmp_path / "k").exists()
    # a run folder is read as its result.json, as load() reads it
    run = RunResult({"mode": "vanilla"}, [{"step": 4, "val": {"top1": .5}, "test": {"top1": .4}}],
                    {"step": 4, "top1": .4}, {"step": 4, "top1": .4})
    run.save(tmp_path / "run" / "result.json")
    assert RunResult.load(tmp_path / "run") == run == load(tmp_path / "run")


@pytest.mark.parametrize("edit, field", [
    (lambda d: d.update(final={}), "'final'"), (lambda d: d.update(history=5), "'history'"),
    (lambda d: d["history"][0].pop("test"), "'history'"), (lambda d: d.update(config=[1]), "'config'"),
])
def test_an_edited_result_json_is_one_line_naming_the_field(tmp_path, edit, field):
    # the summary and the plot raised KeyError / TypeError on it
    from pretrain_reuse.finetune import RunResult

    RunResult({"mode": "vanilla"}, [{"step": 4, "val": {"top1": .5}, "test": {"top1": .4}}],
              {"step": 4, "top1": .4}, {"step": 4, "top1": .4}).save(tmp_path / "result.json")
    record = json.loads((tmp_path / "result.json").read_text())
    edit(record)
    (tmp_path / "result.json").write_text(json.dumps(record))
    with pytest.raises(PretrainReuseError, match=f"not a readable fine-tuning result.json \\({field}"):
        RunResult.load(tmp_path / "result.json")


def test_units_own_their_prototypes_and_assignment():
    # as a Selection: the caller's arrays changed afterwards changed the units' counts and the
    # prototypes select would rank
    protos, assign = np.eye(3, dtype=np.float32), np.array([0, 1, 1, 2])
    units = Units(protos, kind="class", assignment=assign, sample_ids=["a", "b", "c", "d"])
    protos[0, 0], assign[:] = 9.0, 0
    assert units.prototypes[0, 0] == 1.0 and units.counts.tolist() == [1, 2, 1]
    assert not units.prototypes.flags.writeable and not units.assignment.flags.writeable


def test_a_selection_checks_its_names_and_counts_and_owns_its_scores(tmp_path):
    # names or counts of another length raised IndexError in save() or top(); the caller's
    # scores changed afterwards changed the ranking but not the selection
    with pytest.raises(PretrainReuseError, match=r"unit_names must be one name .* per source unit \(3\)"):
        Selection(selected=[2], scores=np.array([0., 1., 2.]), params={}, unit_names=["a"])
    with pytest.raises(PretrainReuseError, match=r"counts must be one sample count .* per source unit \(2\)"):
        Selection(selected=[0], scores=np.array([0., 1.]), params={}, counts=np.array([1]))
    scores = np.array([1.0, 0.0])
    sel = Selection(selected=[0], scores=scores, params={})
    scores[0] = -5.0
    assert sel.ranking().tolist() == [0, 1] and not sel.scores.flags.writeable
    # a truncated JSON file is named as such, not as a selection
    sel.save(tmp_path / "sel.json")
    (tmp_path / "cut.json").write_text((tmp_path / "sel.json").read_text()[:40])
    with pytest.raises(PretrainReuseError, match=r"cut.json' is not valid JSON") as error:
        load(tmp_path / "cut.json")
    assert str(error.value).startswith("path: ")  # not "selection: "


def test_summaries_of_large_objects_stay_one_short_line(tmp_path):
    # a sentence file's repr printed every sentence (248k characters for 5000)
    from pretrain_reuse.data.text import text_file
    from pretrain_reuse.data.world import make_world
    from pretrain_reuse.knowledge.games import Players

    (tmp_path / "s.jsonl").write_text("".join(json.dumps({"text": f"sentence {i} " * 8, "label": i % 2})
                                              + "\n" for i in range(5000)))
    expected = f"TextDataset({str(tmp_path / 's.jsonl')!r}, n=5000, 2 classes)"
    assert repr(text_file(tmp_path / "s.jsonl")) == expected
    world = make_world()
    assert len(repr(world)) < 120 and repr(world).startswith("World(parts=")
    assert repr(Players(np.ones((3, 32, 32), bool))) == "Players(n=3, masks of 32x32, background='baseline')"


def test_a_convergence_of_unequal_lengths_or_an_unknown_measure_is_refused():
    # it was accepted, saved and loaded again
    from pretrain_reuse.knowledge.metrics import Convergence

    with pytest.raises(PretrainReuseError, match=r"must be \(T,\) arrays, one entry per checkpoint"):
        Convergence(similarity=np.array([.5, 1.]), detour=np.array([0.]), n_used=np.array([3]),
                    measure="iou")
    with pytest.raises(PretrainReuseError, match="measure"):
        Convergence(similarity=np.array([1.]), detour=np.array([0.]), n_used=np.array([3]),
                    measure="foo")
    assert Convergence(np.array([.5, 1.]), np.array([.1, 0.]), np.array([3, 3]), "iou").auc > 0
