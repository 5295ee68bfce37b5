"""Units: class means against numpy, spherical k-means against independent Lloyd references."""

from dataclasses import replace

import numpy as np
import pytest
import torch

from pretrain_reuse.errors import PretrainReuseError
from pretrain_reuse.features import FeatureStore
from pretrain_reuse.units import Units, _normalized_float32, class_means, spherical_kmeans


def _planted_sphere(n_clusters=6, per=80, dim=16, spread=0.08, seed=0):
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((n_clusters, dim))
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    truth = np.repeat(np.arange(n_clusters), per)
    scale = rng.uniform(0.5, 3.0, size=(len(truth), 1))  # radial scale must not matter
    x = scale * (centres[truth] + spread * rng.standard_normal((len(truth), dim)))
    return x.astype(np.float32), truth


def _cosine_objective(x, assign):
    """Mean cosine similarity of every sample to the normalised mean direction of its cluster."""
    xn = x / np.linalg.norm(x, axis=1, keepdims=True)
    total = 0.0
    for k in np.unique(assign):
        s = xn[assign == k].sum(0)
        total += np.linalg.norm(s)  # sum_i <x_i, s/|s|> = |s|
    return total / len(x)


def _numpy_spherical_lloyd(x, k, n_iter, seed):
    """A 15-line reference: spherical Lloyd from k random samples."""
    xn = x / np.linalg.norm(x, axis=1, keepdims=True)
    rng = np.random.default_rng(seed + 1000)
    c = xn[rng.choice(len(xn), k, replace=False)]
    for _ in range(n_iter):
        assign = np.argmax(xn @ c.T, axis=1)
        for j in range(k):
            if (assign == j).any():
                s = xn[assign == j].sum(0)
                c[j] = s / np.linalg.norm(s)
    return np.argmax(xn @ c.T, axis=1)


def test_class_means_equal_numpy_per_class_average():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((300, 8)).astype(np.float32)
    y = rng.integers(0, 7, 300)
    units = class_means(FeatureStore(features=x, labels=y))
    expected = np.stack([x[y == c].astype(np.float64).mean(0) for c in range(7)])
    np.testing.assert_allclose(units.prototypes, expected, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(units.counts, np.bincount(y))
    assert units.kind == "class"
    assert units.member_ids(3) == [str(i) for i in np.flatnonzero(y == 3)]
    for wrong in (7, -1, "3"):  # they returned no member, as if the unit were empty
        with pytest.raises(PretrainReuseError, match=r"is not one of these 7 units; pass an id 0\.\.6"):
            units.member_ids(wrong)


def test_units_plot_the_histogram_of_their_sizes():
    import matplotlib.pyplot as plt

    y = np.repeat(np.arange(4), [1, 2, 2, 7])
    units = class_means(FeatureStore(features=np.eye(12, dtype=np.float32), labels=y))
    _, ax = plt.subplots()
    units.plot(ax)
    # one bar per distinct size: one class of 1 sample, two of 2, one of 7
    bars = {round(p.get_x() + p.get_width() / 2, 6): p.get_height() for p in ax.patches if p.get_height()}
    assert bars == {1: 1, 2: 2, 7: 1}
    assert ax.get_title() == "4 class units, 12 samples (median 2, max 7)"
    plt.close("all")
    with pytest.raises(PretrainReuseError, match="bare prototype matrix without members"):
        Units(np.eye(3)).plot()


def test_class_means_normalize_averages_unit_vectors():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((50, 4)).astype(np.float32)
    y = np.repeat(np.arange(5), 10)
    units = class_means(FeatureStore(features=x, labels=y), normalize=True)
    xn = x / np.linalg.norm(x, axis=1, keepdims=True)
    np.testing.assert_allclose(units.prototypes[2], xn[y == 2].mean(0), rtol=1e-5)


def test_class_means_refuses_classes_without_samples():
    x = np.ones((4, 3), np.float32)
    with pytest.raises(PretrainReuseError, match="no samples"):
        class_means(FeatureStore(features=x, labels=np.array([0, 0, 2, 2])))


def test_class_means_refuses_unlabelled_features():
    with pytest.raises(PretrainReuseError, match="labels"):
        class_means(FeatureStore(features=np.ones((4, 3), np.float32)))


def test_spherical_kmeans_recovers_planted_clusters_regardless_of_norm():
    x, truth = _planted_sphere()
    # A random start finds all 6 separated clusters about one time in three; the best of 20
    # starts misses them with probability ~3e-4, whatever the random stream.
    units = spherical_kmeans(FeatureStore(features=x), 6, n_iter=25, n_init=20, seed=0)
    # every found cluster is exactly one planted cluster (perfect contingency table)
    table = np.zeros((6, 6), int)
    np.add.at(table, (truth, units.assignment), 1)
    assert ((table > 0).sum(axis=1) == 1).all() and ((table > 0).sum(axis=0) == 1).all()
    assert units.meta["sizes"]["min"] == units.meta["sizes"]["max"] == 80


def test_spherical_kmeans_objective_matches_numpy_lloyd_sklearn_and_faiss():
    sklearn_cluster = pytest.importorskip("sklearn.cluster")
    faiss = pytest.importorskip("faiss")
    rng = np.random.default_rng(3)
    x = rng.standard_normal((3000, 32)).astype(np.float32)  # no planted structure: hard case
    k, n_iter = 30, 30  # k > 16 candidates: the candidate passes are exercised
    ours = spherical_kmeans(FeatureStore(features=x), k, n_iter=n_iter, seed=0)
    ours_obj = _cosine_objective(x, ours.assignment)
    assert ours.meta["objective"] == pytest.approx(ours_obj, rel=1e-4)
    ref_obj = np.mean([_cosine_objective(x, _numpy_spherical_lloyd(x, k, n_iter, s))
                       for s in range(3)])
    xn = x / np.linalg.norm(x, axis=1, keepdims=True)
    skl = sklearn_cluster.KMeans(k, n_init=1, max_iter=n_iter, random_state=0).fit(xn)
    skl_obj = _cosine_objective(x, skl.labels_)
    fk = faiss.Kmeans(32, k, niter=n_iter, spherical=True, seed=0)
    fk.train(xn)
    faiss_obj = _cosine_objective(x, fk.index.search(xn, 1)[1][:, 0])
    # Local optima differ by initialisation (here by ~0.5%); ours must be as good within 1%.
    assert ours_obj >= 0.99 * max(ref_obj, skl_obj, faiss_obj)


def test_spherical_kmeans_objective_never_decreases_over_passes():
    rng = np.random.default_rng(8)
    x = rng.standard_normal((2000, 16)).astype(np.float32)
    store = FeatureStore(features=x)
    # the same seed replays the same passes, so n_iter=t stops the longer run after pass t
    runs = [spherical_kmeans(store, 40, n_iter=t, seed=0) for t in range(1, 11)]
    objectives = [_cosine_objective(x, u.assignment) for u in runs]
    assert (np.diff(objectives) >= -1e-7).all()
    assert objectives[-1] > objectives[0]
    assert [u.meta["full_passes"] for u in runs][:9] == [1, 1, 2, 2, 2, 2, 2, 2, 3]


def test_spherical_kmeans_assignment_is_argmax_cosine_to_final_centroids():
    x, _ = _planted_sphere(n_clusters=5, spread=0.3, seed=4)
    units = spherical_kmeans(FeatureStore(features=x), 5, n_iter=50, seed=1, normalize_means=True)
    assert units.meta["converged"] and units.meta["passes"] < 50
    c = units.prototypes / np.linalg.norm(units.prototypes, axis=1, keepdims=True)
    xn = x / np.linalg.norm(x, axis=1, keepdims=True)
    np.testing.assert_array_equal(np.argmax(xn @ c.T, axis=1), units.assignment)


def test_spherical_kmeans_is_deterministic_for_a_seed():
    x, _ = _planted_sphere(spread=0.5, seed=5)
    a = spherical_kmeans(FeatureStore(features=x), 9, seed=7)
    b = spherical_kmeans(FeatureStore(features=x), 9, seed=7)
    np.testing.assert_array_equal(a.assignment, b.assignment)
    np.testing.assert_array_equal(a.prototypes, b.prototypes)
    assert a.meta["seed"] == 7


def test_spherical_kmeans_drops_clusters_that_cannot_be_filled():
    # 5 distinct directions, 10 clusters asked: at most 5 can hold members.
    base = np.eye(5, 8, dtype=np.float32)
    x = np.repeat(base, 20, axis=0)
    units = spherical_kmeans(FeatureStore(features=x), 10, seed=0)
    assert len(units) + units.meta["empty_dropped"] == 10
    assert (units.counts > 0).all() and units.counts.sum() == 100
    assert len(units) == 5


def test_spherical_kmeans_reads_memmapped_npy(tmp_path):
    x, _ = _planted_sphere(seed=6)
    np.save(tmp_path / "x.npy", x)
    mm = FeatureStore.from_npy(tmp_path / "x.npy")
    assert isinstance(mm.features, np.memmap)
    a = spherical_kmeans(mm, 6, seed=2)
    b = spherical_kmeans(FeatureStore(features=x), 6, seed=2)
    np.testing.assert_array_equal(a.assignment, b.assignment)


def test_normalized_copy_is_the_shuffled_unit_rows_of_a_memmap(tmp_path):
    x, _ = _planted_sphere(seed=9)
    np.save(tmp_path / "x.npy", x)
    mm = np.load(tmp_path / "x.npy", mmap_mode="r")
    order = np.random.default_rng(0).permutation(len(x))
    got = _normalized_float32(mm, np.argsort(order), chunk=7)  # several chunks, the last short
    expected = x[order] / np.linalg.norm(x[order], axis=1, keepdims=True)
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-7)


def test_spherical_kmeans_trains_on_a_subsample_and_assigns_every_sample():
    x, truth = _planted_sphere(spread=0.05, seed=7)
    # 6 clusters x 20 = 120 of the 480 samples train; all are assigned afterwards
    units = spherical_kmeans(FeatureStore(features=x), 6, n_iter=25, n_init=20, seed=0,
                             max_points_per_unit=20, normalize_means=True)
    table = np.zeros((6, 6), int)
    np.add.at(table, (truth, units.assignment), 1)
    assert ((table > 0).sum(axis=1) == 1).all() and ((table > 0).sum(axis=0) == 1).all()
    c = units.prototypes / np.linalg.norm(units.prototypes, axis=1, keepdims=True)
    xn = x / np.linalg.norm(x, axis=1, keepdims=True)
    np.testing.assert_array_equal(np.argmax(xn @ c.T, axis=1), units.assignment)
    assert units.meta["objective"] == pytest.approx(_cosine_objective(x, units.assignment), rel=1e-5)


def test_spherical_kmeans_rejects_bad_k_and_zero_rows():
    x = np.ones((10, 3), np.float32)
    with pytest.raises(PretrainReuseError, match="k=11"):
        spherical_kmeans(FeatureStore(features=x), 11)
    x[4] = 0
    with pytest.raises(PretrainReuseError, match="row 4"):
        spherical_kmeans(FeatureStore(features=x), 2)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a CUDA GPU")
def test_a_class_without_samples_is_named_with_a_fix_that_works():
    x = np.ones((4, 3), np.float32)
    store = FeatureStore(features=x, labels=np.array([0, 0, 2, 2]), class_names=["a", "b", "c"],
                         meta={"producer": "embed"})
    with pytest.raises(PretrainReuseError, match=r"first: 'b', label 1\): the data names them but "
                                                 r"holds no readable image of them; add readable "
                                                 r"images .* \(--method kmeans\)"):
        class_means(store)
    # features not embedded here (a .npy and a names file): the names file is what to check
    store = replace(store, meta={"producer": "npy"})
    with pytest.raises(PretrainReuseError, match=r"^3 class names for features whose labels name 2 "
                                                 r"classes \(1 without samples, first: 'b', label 1\); "
                                                 "give one name per label"):
        class_means(store)


def test_a_nan_feature_is_named_by_its_own_row_beyond_the_first_chunk():
    # the check ran on the first 4096 rows only, and class means named their own row 0; the
    # sample's id names it too (it did not, so the data to fix was not named)
    x = np.ones((70000, 2), np.float32)
    x[69999, 1] = np.nan
    ids = [f"img{i}.png" for i in range(70000)]
    store = FeatureStore(features=x, labels=np.zeros(70000, np.int64), ids=ids)
    with pytest.raises(PretrainReuseError, match=r"^features row 69999 \(sample 'img69999.png'\) "
                                                 "holds NaN/inf values; remove or recompute"):
        class_means(store)
    with pytest.raises(PretrainReuseError, match=r"^features row 69999 \(sample 'img69999.png'\) "
                                                 "holds NaN/inf"):
        spherical_kmeans(store, 2)


@pytest.mark.parametrize("values", [np.array([["a", "b"], ["c", "d"]]), np.eye(2) * (1 + 1j)])
def test_a_prototype_matrix_of_strings_or_complex_numbers_is_refused(tmp_path, values):
    np.save(tmp_path / "p.npy", values)
    with pytest.raises(PretrainReuseError, match="values, not real numbers; pass a float array"):
        Units.load(tmp_path / "p.npy")


def test_spherical_kmeans_rejects_use_gpu_without_a_gpu():
    with pytest.raises(PretrainReuseError, match="use_gpu"):
        spherical_kmeans(FeatureStore(features=np.eye(4, dtype=np.float32)), 2, use_gpu=True)


def test_class_means_refuse_a_huge_label_without_allocating_a_count_per_label():
    x = np.ones((4, 3), np.float32)
    with pytest.raises(PretrainReuseError,
                       match=r"999999999998 classes have no samples \(first: label 2\); relabel"):
        class_means(FeatureStore(features=x, labels=np.array([0, 1, 1, 10**12])))  # was MemoryError


@pytest.mark.parametrize("labels, message", [
    (np.array([b"a", b"b", b"a", b"b"]), "must be class indices or class names, got dtype |S1 holding bytes"),
    (np.array([0.0, 1.0, 1e300, 1.0]), "label 1e+300 is too large for a class index"),  # wrapped < 0
    (np.array([0, 1, 2**64 - 1, 1], np.uint64), "is too large for a class index"),
    (np.array([0.0, np.nan, 1.0, 1.0]), "labels must be integer class indices, got nan"),
])
def test_labels_that_are_no_class_indices_are_named(labels, message):
    with pytest.raises(PretrainReuseError) as err:
        FeatureStore(features=np.ones((4, 3), np.float32), labels=labels)
    assert message in str(err.value)


def test_complex_features_are_refused_not_cast_to_their_real_part():
    x = np.ones((4, 3), np.complex64) * 1j
    with pytest.raises(PretrainReuseError, match="features holds complex64 values, not real numbers"):
        FeatureStore(features=x)


def test_a_sample_id_given_to_two_samples_is_refused():
    # members and fine-tuning look samples up by id: the two rows would become one sample
    with pytest.raises(PretrainReuseError, match="sample id 'b' is given to two samples"):
        FeatureStore(features=np.ones((3, 2), np.float32), ids=["a", "b", "b"])


@pytest.mark.parametrize("value", [0, -1])
def test_spherical_kmeans_refuses_max_points_per_unit_below_one(value):
    # -1 trained on x[:-k] (all but the last k shuffled rows), 0 raised numpy's ValueError
    x, _ = _planted_sphere()
    with pytest.raises(PretrainReuseError, match=f"max_points_per_unit must be an integer >= 1, got {value}"):
        spherical_kmeans(FeatureStore(features=x), 6, max_points_per_unit=value)


def test_spherical_kmeans_and_normalised_means_ignore_a_scale_that_overflows_float32_squares():
    # |x|^2 of 1e30-scaled rows overflows float32: the rows normalised to zero, one cluster came out
    x, _ = _planted_sphere()
    small = spherical_kmeans(FeatureStore(features=x), 6, seed=0, normalize_means=True)
    huge = spherical_kmeans(FeatureStore(features=x * np.float32(1e30)), 6, seed=0, normalize_means=True)
    np.testing.assert_array_equal(huge.assignment, small.assignment)
    np.testing.assert_allclose(huge.prototypes, small.prototypes, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("tensors, header, message", [
    # each was a KeyError, a TypeError or (the last two) a units file with wrong counts and members
    ({}, {}, "has a corrupt header"),  # no kind
    ({"assignment": np.array([0, 1])}, {"kind": "class"}, "has a corrupt header"),  # no sample ids
    ({}, {"kind": "class", "names": '"abc"'}, "unit names must be a list of strings, got abc"),
    ({"assignment": np.array([0.5, 1.0]), "ids": ["a", "b"]}, {"kind": "class"},
     "assignment must be a vector of unit indices, got dtype float64"),
    ({"assignment": np.array([-5, 1]), "ids": ["a", "b"]}, {"kind": "class"},
     "assignment refers to unit -5 but the units are 0..2"),
    ({"assignment": np.array([0, 1]), "ids": ["a", "a"]}, {"kind": "class"},
     "sample id 'a' is given to two samples"),
])
def test_a_units_file_with_missing_or_inconsistent_entries_is_one_error(tmp_path, tensors, header,
                                                                        message):
    from safetensors.numpy import save_file

    from pretrain_reuse.artifacts import encode_ids
    from pretrain_reuse.units import Units

    tensors = {"prototypes": np.ones((3, 2), np.float32), **tensors}
    if "ids" in tensors:
        tensors["sample_ids"] = encode_ids(tensors.pop("ids"))
    save_file(tensors, str(tmp_path / "u.safetensors"), metadata={"artifact": "units", **header})
    with pytest.raises(PretrainReuseError) as err:
        Units.load(tmp_path / "u.safetensors")
    assert message in str(err.value)



# --------------------------------------------------------------------------------------------
# Plain Python inputs: tensors, lists, NumPy integers
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("convert", [torch.from_numpy, np.ndarray.tolist],
                         ids=["torch tensor", "nested list"])
def test_units_take_tensors_and_lists_as_numpy_arrays(convert):
    p = np.random.default_rng(0).standard_normal((4, 3))
    assignment = np.array([0, 3, 3, -1, 1])
    units = Units(prototypes=convert(p), kind="class", assignment=convert(assignment),
                  sample_ids=list("abcde"))
    assert isinstance(units.prototypes, np.ndarray) and isinstance(units.assignment, np.ndarray)
    np.testing.assert_array_equal(units.prototypes, p)
    np.testing.assert_array_equal(units.counts, [1, 1, 0, 2])


def test_spherical_kmeans_takes_numpy_integers_and_a_plain_array_like_ints_and_a_store():
    x, _ = _planted_sphere(n_clusters=4, per=30)
    ref = spherical_kmeans(FeatureStore(features=x), 4, n_iter=3, n_init=2, seed=1,
                           max_points_per_unit=20)
    got = spherical_kmeans(x, np.int64(4), n_iter=np.int32(3), n_init=np.int64(2),
                           seed=np.uint8(1), max_points_per_unit=np.int64(20))
    np.testing.assert_array_equal(got.assignment, ref.assignment)
    np.testing.assert_array_equal(got.prototypes, ref.prototypes)
    assert got.meta["params"] == ref.meta["params"] and got.meta["seed"] == 1


@pytest.mark.parametrize("kwargs, needle", [
    (dict(k=5.0), "k must be an integer >= 1, got 5.0"),
    (dict(k=True), "k must be an integer >= 1, got True"),
    (dict(k=5, n_iter=3.0), "n_iter must be an integer >= 1, got 3.0"),
    (dict(k=5, n_init="2"), "n_init must be an integer >= 1, got '2'"),
    (dict(k=5, seed=0.5), r"seed must be an integer in \[0, 2\*\*63\), got 0.5"),
])
def test_spherical_kmeans_refuses_non_integer_counts_in_one_line(kwargs, needle):
    x, _ = _planted_sphere(n_clusters=4, per=30)
    with pytest.raises(PretrainReuseError, match=needle):
        spherical_kmeans(FeatureStore(features=x), **kwargs)


def test_class_means_of_a_bare_array_says_it_needs_labels():
    x, truth = _planted_sphere(n_clusters=3, per=10)
    with pytest.raises(PretrainReuseError, match=r"no labels, which class means need: pass "
                                                 r"FeatureStore\(features, labels\)"):
        class_means(x)
    with pytest.raises(PretrainReuseError, match=r"got the path 'feats\.npy' where features belong"):
        class_means("feats.npy")
    means = class_means(FeatureStore(features=x.tolist(), labels=truth.tolist())).prototypes
    np.testing.assert_allclose(means, [x[truth == c].mean(0) for c in range(3)], rtol=1e-6)


def test_converged_means_the_last_pass_compared_every_sample_with_every_centroid(monkeypatch):
    """A candidate pass compares a sample with a few centroids only: when it moves none, the
    result is not yet known to be a fixed point (a found case: seed 5, k = 32, 7 passes)."""
    from pretrain_reuse import units as U

    kinds = []
    most, best = U._most_similar, U._best_candidate
    monkeypatch.setattr(U, "_most_similar", lambda *a, **k: (kinds.append("full"), most(*a, **k))[1])
    monkeypatch.setattr(U, "_best_candidate", lambda *a, **k: (kinds.append("cand"), best(*a, **k))[1])
    rng = np.random.default_rng(5)
    k, dim, n = int(rng.integers(17, 40)), int(rng.integers(3, 10)), int(rng.integers(500, 3000))
    centres, labels = rng.standard_normal((k, dim)), rng.integers(0, k, n)
    x = (centres[labels] + rng.uniform(0.05, 0.6) * rng.standard_normal((n, dim))).astype(np.float32)
    seen = set()
    for n_iter in range(2, 9):
        kinds.clear()
        units = spherical_kmeans(x, k, n_iter=n_iter, seed=5)
        seen.add((units.meta["converged"], kinds[-1]))
        if units.meta["converged"]:
            assert kinds[-1] == "full", n_iter
    assert (False, "cand") in seen  # the case the flag once got wrong


@pytest.mark.parametrize("scale, what", [(1e300, "values above"), (1e-300, "only values below")])
def test_float64_features_beyond_float32_are_named_as_such(scale, what):
    """They became inf (reported as NaN/inf rows, after an overflow warning) or zero rows."""
    x = np.random.default_rng(0).standard_normal((50, 4)) * scale
    labelled = FeatureStore(features=x, labels=np.arange(50) % 2)
    for build in (lambda: spherical_kmeans(x, 3), lambda: class_means(labelled)):
        with pytest.raises(PretrainReuseError, match=f"features row 0 \\(sample '0'\\) holds {what} "
                                                     "the float32"):
            build()


def test_an_all_zero_feature_row_is_refused_with_a_fix_the_cli_offers(tmp_path, capsys,
                                                                        monkeypatch):
    # spherical k-means needs a direction per sample; no verb drops rows, so the message names
    # the sample and a fix a user can do (the old one said "drop zero rows before ...")
    from pretrain_reuse import units as U
    from pretrain_reuse.cli import main

    x = np.random.default_rng(0).standard_normal((40, 4)).astype(np.float32)
    x[[7, 21, 22]] = 0  # counted whichever chunk they are in: a dead class is no stray row
    np.save(tmp_path / "f.npy", x)
    monkeypatch.setattr(U, "_chunk_rows", lambda dim: 16)
    rc = main(["units", "--features", str(tmp_path / "f.npy"), "--method", "kmeans", "--k", "3",
               "--out", str(tmp_path / "u.safetensors"), "--quiet"])
    out, err = capsys.readouterr()
    assert rc == 2 and out == "" and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert err.strip() == (
        "pretrain-reuse: error: 3 of the 40 feature rows are all zeros (first: row 7, sample 7 in "
        "the features' order) and have no direction for spherical k-means; if the backbone gave "
        "them (embed warns of them), check its weights and layer; else remove those samples from "
        "the data and embed again (or their rows from a .npy file), or build class units (units "
        "--method class)")
    assert not (tmp_path / "u.safetensors").exists()


def test_a_bad_output_path_is_refused_before_the_clustering(tmp_path, capsys, monkeypatch):
    from pretrain_reuse import units as U
    from pretrain_reuse.cli import main

    np.save(tmp_path / "f.npy", np.random.default_rng(0).standard_normal((40, 4)).astype(np.float32))
    (tmp_path / "afile").write_text("x")
    (tmp_path / "model.safetensors").write_bytes(b"weights")
    monkeypatch.setattr(U, "_online_kmeans", lambda *a, **k: pytest.fail("clustered first"))
    for out, needle in [("u.npy", "units files are saved as .safetensors, got"),
                        (".", "is a folder; pass a file path ending in .safetensors"),
                        ("afile/u.safetensors", "afile' is a file, not a folder"),
                        ("model.safetensors", "exists and is not a units file")]:
        rc = main(["units", "--features", str(tmp_path / "f.npy"), "--method", "kmeans", "--k", "3",
                   "--out", str(tmp_path / out), "--quiet"])
        err = capsys.readouterr().err
        assert rc == 2 and needle in err and len(err.strip().splitlines()) == 1, err


def test_the_units_command_warns_of_dropped_clusters_and_records_no_unused_labels(tmp_path, capsys):
    from pretrain_reuse.cli import main

    x = np.repeat(np.eye(3, dtype=np.float32), 10, axis=0)  # 3 distinct samples
    np.save(tmp_path / "f.npy", x)
    np.save(tmp_path / "y.npy", np.arange(30) % 3)
    out = tmp_path / "u.safetensors"
    assert main(["units", "--features", str(tmp_path / "f.npy"), "--method", "kmeans", "--k", "5",
                 "--n-init", "2", "--out", str(out), "--quiet"]) == 0
    err = capsys.readouterr().err
    assert "warning: 2 of the 5 clusters ended empty and were dropped" in err
    assert len(Units.load(out)) == 3 and Units.load(out).meta["params"]["n_init"] == 2
    # labels play no part in clusters: given with .npy features they are refused, and those of a
    # labelled store are not recorded as an input of them
    assert main(["units", "--features", str(tmp_path / "f.npy"), "--labels", str(tmp_path / "y.npy"),
                 "--method", "kmeans", "--k", "3", "--out", str(out), "--quiet"]) == 2
    assert "--labels applies to --method class only" in capsys.readouterr().err
    FeatureStore.from_npy(tmp_path / "f.npy", tmp_path / "y.npy").save(tmp_path / "store")
    assert main(["units", "--features", str(tmp_path / "store"), "--method", "kmeans", "--k", "3",
                 "--out", str(out), "--quiet"]) == 0
    assert "labels" not in Units.load(out).meta["inputs"]


@pytest.mark.parametrize("verb, says", [("units", "nothing was written"),
                                        ("embed", "rerun the same command to resume")])
def test_an_interrupt_says_whether_a_rerun_resumes(tmp_path, capsys, monkeypatch, verb, says):
    from pretrain_reuse import cli

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, f"cmd_{verb}", interrupted)
    argv = {"units": ["units", "--features", "f.npy", "--out", "u.safetensors"],
            "embed": ["embed", "--model", "smallcnn", "--data", "synthetic:target", "--out", "e"]}[verb]
    assert cli.main(argv) == 130
    assert capsys.readouterr().err.strip() == f"pretrain-reuse: interrupted; {says}"


def test_kmeanspp_recovers_well_separated_clusters_that_random_starts_merge():
    """Planted truth: 5 directions, tight noise. Random starts (faiss's) leave a cluster without
    a centroid on some seeds; k-means++ draws one in each, on every seed."""
    rng = np.random.default_rng(100)
    dirs = rng.standard_normal((5, 16))
    truth = rng.integers(0, 5, 5000)
    x = (dirs[truth] / np.linalg.norm(dirs[truth], axis=1, keepdims=True)
         + 0.02 * rng.standard_normal((5000, 16))).astype(np.float32)

    def recovered(units):  # the partition equals the planted one, up to cluster numbering
        pairs = set(zip(truth.tolist(), units.assignment.tolist(), strict=True))
        return len(units) == 5 and len(pairs) == 5

    seeds = range(5)
    assert all(recovered(spherical_kmeans(x, 5, seed=s, init="k-means++")) for s in seeds)
    assert not all(recovered(spherical_kmeans(x, 5, seed=s)) for s in seeds)
    assert spherical_kmeans(x, 5, seed=0, init="k-means++").meta["params"]["init"] == "k-means++"
    with pytest.raises(PretrainReuseError, match="init='kmeans' is not one of"):
        spherical_kmeans(x, 5, init="kmeans")


def test_kmeanspp_draws_from_a_subsample_and_copes_with_fewer_distinct_rows_than_k():
    x = np.repeat(np.eye(3, dtype=np.float32), 4000, axis=0)  # 12000 rows > the 10000 drawn from
    units = spherical_kmeans(x, 5, seed=1, init="k-means++")
    assert len(units) == 3 and units.meta["empty_dropped"] == 2
    assert sorted(units.counts.tolist()) == [4000, 4000, 4000]


def test_the_units_command_passes_init_on(tmp_path):
    from pretrain_reuse.cli import main

    np.save(tmp_path / "f.npy", np.random.default_rng(0).standard_normal((60, 4)).astype(np.float32))
    out = tmp_path / "u.safetensors"
    assert main(["units", "--features", str(tmp_path / "f.npy"), "--method", "kmeans", "--k", "4",
                 "--init", "k-means++", "--out", str(out), "--quiet"]) == 0
    assert Units.load(out).meta["params"]["init"] == "k-means++"


def test_units_show_progress_over_the_samples_before_and_after_the_passes(capsys):
    x = np.random.default_rng(0).standard_normal((300, 4)).astype(np.float32)
    spherical_kmeans(x, 3, n_iter=2, progress=True)
    class_means(FeatureStore(features=x, labels=np.arange(300) % 3), progress=True)
    err = capsys.readouterr().err
    for bar in ("normalising: 100%", "unit means: 100%", "k-means K=3 run 1"):
        assert bar in err, err
    assert err.count("300/300") >= 3  # normalising, and the means of the clusters and classes


def test_gathered_candidate_search_in_chunks_equals_faiss():
    # the GPU's path, run here on the CPU with chunks smaller than the rows: the same choices
    # as faiss's in-place products
    from pretrain_reuse.units import _best_candidate, _best_candidate_gathered

    rng = np.random.default_rng(0)
    x = torch.from_numpy(rng.standard_normal((50, 8), dtype=np.float32))
    centroids = torch.from_numpy(rng.standard_normal((20, 8), dtype=np.float32))
    cand = torch.from_numpy(np.stack([rng.choice(20, 5, replace=False) for _ in range(50)]))
    brute = cand[torch.arange(50), (x[:, None, :] * centroids[cand]).sum(-1).argmax(1)]
    assert torch.equal(_best_candidate(x, centroids, cand), brute)
    assert torch.equal(_best_candidate_gathered(x, centroids, cand, chunk=7), brute)


def test_units_of_npy_files_record_the_files_hashes(tmp_path):
    # the hashes FeatureStore.from_npy took: a second pass over the features cost as much as
    # the class means themselves
    from pretrain_reuse.artifacts import hash_file

    rng = np.random.default_rng(0)
    np.save(tmp_path / "f.npy", rng.standard_normal((40, 6)).astype(np.float32))
    np.save(tmp_path / "l.npy", np.arange(40) % 4)
    store = FeatureStore.from_npy(tmp_path / "f.npy", tmp_path / "l.npy")
    files = {"features": hash_file(tmp_path / "f.npy"), "labels": hash_file(tmp_path / "l.npy")}
    assert class_means(store).meta["inputs"] == files
    assert spherical_kmeans(store, 3).meta["inputs"] == {"features": files["features"]}


def test_wide_features_are_read_in_chunks_of_bytes_not_of_rows():
    from pretrain_reuse.units import _chunk_rows

    assert _chunk_rows(128) == 65536 and _chunk_rows(2048) == 4096 and _chunk_rows(10**9) == 1
    # means over several chunks equal one pass of numpy in float64
    rng = np.random.default_rng(1)
    x = rng.standard_normal((9000, 2048)).astype(np.float32)
    y = rng.integers(0, 5, 9000)
    expected = np.stack([x[y == c].astype(np.float64).mean(0) for c in range(5)])
    np.testing.assert_allclose(class_means(FeatureStore(features=x, labels=y)).prototypes,
                               expected, rtol=1e-6, atol=1e-7)


def test_spherical_kmeans_seeds_give_different_clusterings_of_unstructured_data():
    # Gaussian data has no clusters to find, so the result depends on the start: a seed that
    # did not reach the initial centroids would give one clustering for every seed
    x = np.random.default_rng(0).standard_normal((3000, 32)).astype(np.float32)
    runs = [spherical_kmeans(x, 30, n_iter=3, seed=s) for s in range(5)]
    assert len({r.assignment.tobytes() for r in runs}) >= 2
    assert [r.meta["seed"] for r in runs] == [0, 1, 2, 3, 4]


def _greedy_kmeanspp_reference(x, k, rng):
    """Greedy k-means++ by brute force from the same draws as the code (pool = all rows): for
    each next centroid, 2 + ln k candidates by inverse-CDF sampling of the distance 1 - cos to
    the nearest chosen centroid; the candidate whose addition leaves the smallest potential
    sum_i min_j (1 - cos(x_i, c_j)) is kept."""
    xd = x.astype(np.float64)
    trials = 2 + int(np.log(k))
    draws = rng.random((k, trials))
    chosen = [int(rng.integers(len(x)))]

    def potential(centres):
        return np.clip(1.0 - xd @ xd[centres].T, 0.0, None).min(axis=1)

    for j in range(1, k):
        d = potential(chosen)
        cands = [min(int(np.searchsorted(np.cumsum(d), u * d.sum())), len(x) - 1) for u in draws[j]]
        sums = [potential([*chosen, c]).sum() for c in cands]
        chosen.append(cands[int(np.argmin(sums))])
    return chosen


def test_kmeanspp_keeps_the_candidate_that_leaves_the_smallest_potential():
    from pretrain_reuse.units import _initial_centroids

    x, _ = _planted_sphere(n_clusters=8, per=40, spread=0.3, seed=11)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    for seed in range(3):
        got = _initial_centroids(torch.from_numpy(x), 12, "k-means++", np.random.default_rng(seed))
        expected = x[_greedy_kmeanspp_reference(x, 12, np.random.default_rng(seed))]
        np.testing.assert_array_equal(got.numpy(), expected)


def test_an_empty_cluster_is_reseeded_next_to_the_largest_one():
    from pretrain_reuse.units import _reseed_empty

    centroids = torch.eye(4, 6)
    counts = torch.tensor([50, 0, 10, 200])
    assert _reseed_empty(centroids, counts, np.random.default_rng(0)) == 1
    # unit 3 holds the most members: the empty unit 1 becomes a perturbed copy of its centroid
    np.testing.assert_allclose(centroids[1].numpy(), np.eye(4, 6)[3], atol=1e-2)
    assert float(centroids[1].norm()) == pytest.approx(1.0, abs=1e-6)
    assert not torch.equal(centroids[1], centroids[3])
    assert torch.equal(centroids[[0, 2, 3]], torch.eye(4, 6)[[0, 2, 3]])


def test_one_training_point_per_unit_trains_on_k_samples():
    # k x 1 = 6 training samples: one per centroid, so every cluster keeps a member
    x, _ = _planted_sphere(seed=12)
    units = spherical_kmeans(x, 6, seed=3, max_points_per_unit=1)
    assert len(units) == 6 and units.meta["empty_dropped"] == 0
    assert units.counts.sum() == len(x)


def test_size_report_counts_units_with_fewer_than_five_members():
    from pretrain_reuse.units import size_report

    assert size_report(np.array([4, 5, 6])) == {
        "units": 3, "samples": 15, "min": 4, "q25": 4.5, "median": 5.0, "q75": 5.5, "max": 6,
        "below_5": 1}


def test_sample_ids_without_an_assignment_are_refused_not_dropped_on_save():
    # they name the samples of an assignment: without one, save wrote none and load lost them
    with pytest.raises(PretrainReuseError, match="sample_ids name the samples of an assignment"):
        Units(prototypes=np.ones((2, 3)), sample_ids=["a", "b"])
