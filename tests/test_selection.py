"""Selection strategies against references: POT's plan, brute force, and the planted world."""

import subprocess
import sys

import numpy as np
import pytest
import torch

from pretrain_reuse.data.synthetic import feature_world
from pretrain_reuse.errors import PretrainReuseError
from pretrain_reuse.features import FeatureStore
from pretrain_reuse.selection import SelectConfig, Selection, select, select_many
from pretrain_reuse.units import Units, class_means


def _units(x, counts=None):
    if counts is None:
        return Units(prototypes=np.asarray(x))
    assignment = np.repeat(np.arange(len(x)), counts)
    return Units(prototypes=np.asarray(x), kind="class", assignment=assignment,
                 sample_ids=[str(i) for i in range(len(assignment))])


@pytest.fixture(scope="module")
def world():
    w = feature_world(n_groups=20, classes_per_group=10, n_hubs=10, seed=1)
    return w, class_means(w.pretrain), class_means(w.target)


def test_uot_ranks_units_like_the_row_mass_of_pots_plan():
    ot = pytest.importorskip("ot")
    rng = np.random.default_rng(0)
    s, t = rng.standard_normal((80, 12)), rng.standard_normal((9, 12))
    sel = select(_units(s), _units(t), SelectConfig(k=20, eps_c=0.5))
    sn = s / np.linalg.norm(s, axis=1, keepdims=True)
    tn = t / np.linalg.norm(t, axis=1, keepdims=True)
    plan = ot.unbalanced.sinkhorn_unbalanced(np.ones(80), np.ones(9), (1 - sn @ tn.T) / 0.5,
                                             reg=1.0, reg_m=(1.0, 100.0), stopThr=1e-12,
                                             numItermax=100000)
    np.testing.assert_allclose(np.exp(sel.scores), plan.sum(1), rtol=1e-6)
    assert sel.selected == list(np.argsort(-plan.sum(1), kind="stable")[:20])
    assert sel.meta["solver"]["converged"] is True


def test_uot_recovers_all_planted_related_classes_and_avoids_hubs(world):
    w, source, target = world
    sel = select(source, target, SelectConfig(k=len(w.related)))
    assert sel.recall(w.related) == 1.0
    assert not set(sel.selected) & set(w.hubs.tolist())


def test_labelled_feature_stores_stand_for_their_class_means(world):
    w, source, target = world
    sel = select(w.pretrain, w.target, SelectConfig(k=len(w.related)))
    ref = select(source, target, SelectConfig(k=len(w.related)))
    assert sel.selected == ref.selected
    np.testing.assert_array_equal(sel.scores, ref.scores)
    unlabelled = type(w.target)(features=w.target.features)
    with pytest.raises(PretrainReuseError, match="the features have no labels, which class means need"):
        select(source, unlabelled)


def test_greedy_ot_falls_for_the_barycentre_hubs(world):
    # Greedy OT averages the distance to all target classes, so classes sitting between the
    # target groups (hubs) outrank genuinely related ones (methods/reuse.md §1.5).
    w, source, target = world
    for metric in ("cosine", "l2"):
        sel = select(source, target, SelectConfig(method="greedy-ot", metric=metric,
                                                  k=len(w.related)))
        assert set(w.hubs.tolist()) <= set(sel.selected)
        assert sel.recall(w.related) <= 1 - len(w.hubs) / len(w.related)


def test_greedy_ot_equals_brute_force_weighted_distance():
    rng = np.random.default_rng(2)
    s, t = rng.standard_normal((30, 5)), rng.standard_normal((4, 5))
    counts = np.array([3, 1, 5, 2])
    for metric in ("l2", "cosine"):
        sel = select(_units(s), _units(t, counts), SelectConfig(method="greedy-ot", metric=metric, k=5))
        if metric == "l2":
            d = np.sqrt(((s[:, None, :] - t[None]) ** 2).sum(-1))
        else:
            d = 1 - (s @ t.T) / np.linalg.norm(s, axis=1)[:, None] / np.linalg.norm(t, axis=1)
        expected = -(d * counts / counts.sum()).sum(1)
        np.testing.assert_allclose(sel.scores, expected, rtol=1e-10)
        assert sel.selected == list(np.argsort(-expected)[:5])


def test_random_selection_is_seeded_and_roughly_uniform():
    s = np.random.default_rng(0).standard_normal((50, 3))
    a = select(_units(s), _units(s[:2]), SelectConfig(method="random", k=10, seed=4))
    b = select(_units(s), _units(s[:2]), SelectConfig(method="random", k=10, seed=4))
    assert a.selected == b.selected and a.meta["seed"] == 4
    hits = np.zeros(50)
    for seed in range(400):
        hits[select(_units(s), _units(s[:2]),
                    SelectConfig(method="random", k=10, seed=seed)).selected] += 1
    # each unit is picked with probability 10/50: 80 of 400 draws, binomial sd ~8
    assert hits.min() > 40 and hits.max() < 120


def test_label_selection_keeps_given_ids_then_pattern_matches():
    s = np.eye(6, 4)
    names = ["sparrow", "dog", "owl", "cat", "wren", "eagle-owl"]
    src = Units(prototypes=s, names=names)
    sel = select(src, _units(s[:1]), SelectConfig(method="label", k=3, unit_ids=(3, 1),
                                                 name_pattern="owl$"))
    assert sel.selected == [3, 1, 2]
    with pytest.raises(PretrainReuseError, match="matches none of the unit names"):
        select(src, _units(s[:1]), SelectConfig(method="label", k=1, name_pattern="zebra"))
    with pytest.raises(PretrainReuseError, match="out of range"):
        select(src, _units(s[:1]), SelectConfig(method="label", k=1, unit_ids=(6,)))


def test_without_k_label_selects_every_named_unit_and_the_rankings_take_100():
    # as the command line: select --method label without --k takes all the units it names
    s = np.eye(6, 4)
    src = Units(prototypes=s, names=["sparrow", "dog", "owl", "cat", "wren", "eagle-owl"])
    sel = select(src, _units(s[:1]), SelectConfig(method="label", unit_ids=(3,), name_pattern="owl$"))
    assert sel.selected == [3, 2, 5]
    assert SelectConfig().k == 100 and SelectConfig(method="random").k == 100


def test_an_invalid_name_pattern_is_refused_when_the_config_is_built():
    with pytest.raises(PretrainReuseError, match="is not a valid regular expression"):
        SelectConfig(method="label", name_pattern="owl(")


def test_label_name_pattern_matching_nothing_is_refused_beside_ids():
    s = np.eye(3, 4)
    src = Units(prototypes=s, names=["sparrow", "dog", "owl"])
    # the ids alone would have been selected, the mistyped pattern silently dropped
    with pytest.raises(PretrainReuseError, match="'zebra' \\(--names\\) matches none of the unit names"):
        select(src, _units(s[:1]), SelectConfig(method="label", unit_ids=(1,), k=None,
                                               name_pattern="zebra"))


def test_label_with_a_sample_share_the_named_units_cannot_reach_is_refused():
    s = np.eye(4)
    src = _units(s, counts=[10, 10, 10, 70])
    # the share is made of the named units only, never of unnamed ones taken in id order
    sel = select(src, _units(s[:1]), SelectConfig(method="label", unit_ids=(3, 1), k=0.5))
    assert sel.selected == [3]
    with pytest.raises(PretrainReuseError, match=r"named units hold 20\.0%"):
        select(src, _units(s[:1]), SelectConfig(method="label", unit_ids=(2, 1), k=0.5))


def test_top_of_a_label_selection_takes_named_units_only():
    # top(5) of 2 named units padded with units nobody named ([3, 1, 0, 2, 4]); select refuses it
    s = np.eye(6, 4)
    src = _units(s, counts=[10, 10, 10, 40, 10, 20])
    sel = select(src, _units(s[:1]), SelectConfig(method="label", unit_ids=(3, 1)))
    assert sel.top(1).selected == [3] and sel.top(2).selected == [3, 1]
    assert sel.top(0.4).selected == [3]
    with pytest.raises(PretrainReuseError, match=r"k=5 but only 2 units were named"):
        sel.top(5)
    with pytest.raises(PretrainReuseError, match=r"named units hold 50\.0%"):
        sel.top(0.6)
    # another method's top ranks every unit
    assert len(select(src, _units(s[:1]), SelectConfig(method="random", k=1)).top(6).selected) == 6


def test_selected_ids_must_be_integers():
    # floats were truncated when saved ([1.5, 2.7] came back as [1, 2]); text was a TypeError
    for ids, bad in (([1.5, 2.7], "1.5"), (["1"], "'1'")):
        with pytest.raises(PretrainReuseError, match=f"selected must be integer ids, got {bad}"):
            Selection(selected=ids, scores=np.zeros(3), params={})
    assert Selection(selected=np.array([2, 0]), scores=np.zeros(3), params={}).selected == [2, 0]


def test_k_as_fraction_covers_that_share_of_samples():
    rng = np.random.default_rng(3)
    s = rng.standard_normal((20, 4))
    counts = rng.integers(1, 50, 20)
    sel = select(_units(s, counts), _units(s[:3]), SelectConfig(k=0.3))
    covered = counts[sel.selected].sum()
    assert covered >= 0.3 * counts.sum() > covered - counts[sel.selected[-1]]
    with pytest.raises(PretrainReuseError, match="fraction"):
        select(_units(s), _units(s[:3]), SelectConfig(k=0.3))


def test_float32_and_float64_select_the_same_units_at_tiny_eps_c(world):
    _, source, target = world
    sels = [select(source, target, SelectConfig(k=40, eps_c=0.001, dtype=dt))
            for dt in ("float32", "float64")]
    assert set(sels[0].selected) == set(sels[1].selected)
    # the float32 log masses themselves, not just their ranking, follow float64's
    np.testing.assert_allclose(sels[0].scores, sels[1].scores, rtol=0, atol=1e-3)


def test_uot_reports_the_transported_mass_as_the_sum_of_the_row_masses():
    rng = np.random.default_rng(4)
    sel = select(_units(rng.standard_normal((30, 6))), _units(rng.standard_normal((5, 6))),
                 SelectConfig(k=5))
    # the scores are log row masses; the total mass is the sum of their exponentials
    assert sel.meta["solver"]["transported_mass"] == pytest.approx(np.exp(sel.scores).sum(), rel=1e-9)


def test_sample_recall_is_the_share_of_relevant_class_samples_in_the_selected_units():
    units = Units(prototypes=np.eye(3), kind="cluster", assignment=np.array([0, 0, 1, 1, 2, 2]),
                  sample_ids=[str(i) for i in range(6)])
    labels = [5, 5, 5, 7, 7, 7]
    sel = Selection(selected=[0, 1], scores=np.array([3.0, 2.0, 1.0]), params={})
    # units 0 and 1 hold samples 0-3: all three of class 5, one of the three of class 7
    assert sel.sample_recall(units, labels, [5]) == 1.0
    assert sel.sample_recall(units, labels, [7]) == pytest.approx(1 / 3)
    # unit 0 alone: two of the six samples of classes 5 and 7
    only_first = Selection(selected=[0], scores=np.array([3.0, 2.0, 1.0]), params={})
    assert only_first.sample_recall(units, labels, {5, 7}) == pytest.approx(2 / 6)


def test_sample_recall_needs_units_with_members_and_a_pool_sample_of_a_relevant_class():
    sel = Selection(selected=[0], scores=np.array([1.0, 0.0]), params={})
    with pytest.raises(PretrainReuseError, match="units that record their members"):
        sel.sample_recall(Units(prototypes=np.eye(2)), [0, 1], [0])
    units = Units(prototypes=np.eye(2), kind="cluster", assignment=np.array([0, 1]),
                  sample_ids=["a", "b"])
    with pytest.raises(PretrainReuseError, match=r"no pool sample has the relevant label 9; "
                                                 r"pass labels the pool has \(0\.\.1\)"):
        sel.sample_recall(units, [0, 1], [9])
    with pytest.raises(PretrainReuseError, match="needs at least one relevant class id"):
        sel.sample_recall(units, [0, 1], [])
    # one id wrong among right ones: its class's samples were left out of the recall unseen
    with pytest.raises(PretrainReuseError, match="no pool sample has the relevant label 9"):
        sel.sample_recall(units, [0, 1], [1, 9])
    # labels of another pool (a raw broadcasting ValueError), units of another pool (accepted)
    with pytest.raises(PretrainReuseError, match=r"5 labels for the 2 samples of the units; pass "
                                                 r"one class label per sample"):
        sel.sample_recall(units, np.arange(5), [0])
    other = Units(prototypes=np.eye(3), kind="cluster", assignment=np.array([0, 1]),
                  sample_ids=["a", "b"])
    with pytest.raises(PretrainReuseError, match="the selection scores 2 units but units has 3"):
        sel.sample_recall(other, [0, 1], [0])
    # relevant first, as recall takes it: a raw AttributeError on a list
    with pytest.raises(PretrainReuseError, match=r"units must be the Units the selection was made "
                                                 r"on, got list; call sample_recall\(units, labels"):
        sel.sample_recall([0], units, [0, 1])


def test_the_plot_and_select_many_refuse_what_recall_and_select_refuse():
    import matplotlib.pyplot as plt

    sel = Selection(selected=[0], scores=np.array([1.0, 0.0]), params={})
    fig, ax = plt.subplots()
    # a relevant id out of range was drawn as if the related units had no score
    with pytest.raises(PretrainReuseError, match="relevant unit id 99 is out of range for 2 units"):
        sel.plot(ax, relevant=[99])
    plt.close(fig)
    # one target store where a list of them is due: a raw TypeError ("not iterable")
    store = FeatureStore(features=np.eye(3), labels=np.array([0, 1, 1]))
    with pytest.raises(PretrainReuseError, match="targets must be a list of target units, got one "
                                                 "FeatureStore; pass \\[targets\\]"):
        select_many(np.eye(3), store, SelectConfig(k=1))


def test_batched_selection_equals_one_target_at_a_time(world):
    _, source, target = world
    t1 = Units(prototypes=target.prototypes[:7])
    t2 = Units(prototypes=target.prototypes[7:])
    cfg = SelectConfig(k=15)
    t3 = Units(prototypes=target.prototypes[:1])
    batched = select_many(source, [t1, t2, target, t3], cfg)
    for sel, t in zip(batched, [t1, t2, target, t3], strict=True):
        single = select(source, t, cfg)
        assert sel.selected == single.selected
        np.testing.assert_allclose(sel.scores, single.scores, rtol=1e-9, atol=1e-9)
        # each records its own solve's iterations (the batch's largest count was recorded)
        assert sel.meta["solver"]["n_iter"] == single.meta["solver"]["n_iter"]
    assert len({sel.meta["solver"]["n_iter"] for sel in batched}) > 1


@pytest.mark.parametrize("method", ["random", "greedy-ot", "label"])
def test_every_method_selects_for_a_target_what_it_selects_for_it_alone(world, method):
    # random selection drew one permutation per target in turn, so a target's units depended on
    # the targets before it in the call (--target a b vs --target b)
    _, source, target = world
    t1, t2 = Units(prototypes=target.prototypes[:7]), Units(prototypes=target.prototypes[7:])
    cfg = SelectConfig(method=method, k=12, seed=3, unit_ids=tuple(range(20)) if method == "label" else ())
    batched = select_many(source, [t1, t2], cfg)
    for sel, t in zip(batched, [t1, t2], strict=True):
        single = select(source, t, cfg)
        assert sel.selected == single.selected
        np.testing.assert_array_equal(sel.scores, single.scores)


def test_an_unfinished_uot_solve_is_warned_of_with_its_fix(world):
    _, source, target = world
    with pytest.warns(UserWarning, match=r"did not converge in 2 iterations .*raise max_iter") as caught:
        sel = select(source, target, SelectConfig(k=5, max_iter=2))
    assert sel.meta["solver"]["converged"] is False
    assert caught[0].filename == __file__  # the caller's line, not select_many's inside select
    t1 = Units(prototypes=target.prototypes[:7])
    with pytest.warns(UserWarning) as caught:
        select_many(source, [t1, target], SelectConfig(k=5, max_iter=2))
    assert ["target 1 of 2" in str(w.message) for w in caught] == [True, False]
    assert ["target 2 of 2" in str(w.message) for w in caught] == [False, True]


def test_a_selections_params_rebuild_its_config_a_hard_marginal_included(world, tmp_path):
    _, source, target = world
    sel = select(source, target, SelectConfig(k=5, tau_b=float("inf")))
    assert sel.params["tau_b"] == "inf"  # as sel.json writes it: JSON has no infinity
    for params in (sel.params, Selection.load(sel.save(tmp_path / "sel.json")).params):
        again = select(source, target, params)
        assert again.selected == sel.selected and again.params == sel.params


def test_a_bare_prototype_matrix_is_a_selection_of_prototypes(world):
    _, source, target = world
    assert select(source.prototypes, target.prototypes, SelectConfig(k=5)).unit_kind == "prototypes"
    assert select(source, target, SelectConfig(k=5)).unit_kind == "class"


def test_top_changes_k_in_the_params_and_the_metadata(world):
    _, source, target = world
    top = select(source, target, SelectConfig(k=10)).top(3)
    assert len(top.selected) == 3 and top.params["k"] == top.meta["params"]["k"] == 3


@pytest.mark.parametrize("scores, what", [([np.nan, 1.0, 0.5], "NaN"), ([[1.0, 2.0]], "shape"),
                                          (["a", "b"], "<U1")])
def test_a_selection_refuses_scores_that_are_not_one_real_number_per_unit(scores, what):
    with pytest.raises(PretrainReuseError, match=f"scores must be one real number per source unit.*{what}"):
        Selection(selected=[0], scores=np.array(scores), params={})


def test_memory_mapped_prototypes_select_without_a_torch_warning(tmp_path, world):
    # in a fresh process: torch gives its read-only-array warning once per process
    _, source, target = world
    np.save(tmp_path / "s.npy", source.prototypes)
    np.save(tmp_path / "t.npy", target.prototypes)
    code = (
        "import numpy as np\n"
        "from pretrain_reuse.selection import SelectConfig, select\n"
        "s, t = (np.load(f, mmap_mode='r') for f in ('s.npy', 't.npy'))\n"
        "for method in ('uot', 'greedy-ot'):\n"
        "    print(select(s, t, SelectConfig(k=5, method=method)).selected)\n")
    proc = subprocess.run([sys.executable, "-W", "error", "-c", code], cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr
    expected = [select(source.prototypes, target.prototypes, SelectConfig(k=5, method=m)).selected
                for m in ("uot", "greedy-ot")]
    assert proc.stdout.split("\n")[:2] == [str(e) for e in expected]

def test_selection_errors_name_the_problem():
    s = np.ones((5, 3))
    with pytest.raises(PretrainReuseError, match="k=6 exceeds the 5 source units"):
        select(_units(s), _units(s), SelectConfig(k=6))
    with pytest.raises(PretrainReuseError, match=r"dimension 3 .* 4"):
        select(_units(s), _units(np.ones((2, 4))), SelectConfig(k=2))
    with pytest.raises(PretrainReuseError, match="did you mean 'uot'"):
        SelectConfig(method="uto")
    with pytest.raises(PretrainReuseError, match="metric"):
        SelectConfig(metric="manhattan")
    with pytest.raises(PretrainReuseError, match="k=0"):
        SelectConfig(k=0)


def test_selection_top_and_roundtrip(tmp_path, world):
    _, source, target = world
    sel = select(source, target, SelectConfig(k=30))
    assert sel.top(5).selected == sel.selected[:5]
    sel.save(tmp_path / "sel.json")
    back = Selection.load(tmp_path / "sel.json")
    assert back.selected == sel.selected and back.params == sel.params
    np.testing.assert_array_equal(back.scores, sel.scores)


def test_a_selection_records_the_units_it_ranked():
    # two k-means runs of one store share the store's inputs; only the units' own hash tells
    # a selection on one from a selection on the other
    from pretrain_reuse.features import FeatureStore
    from pretrain_reuse.units import spherical_kmeans

    rng = np.random.default_rng(0)
    store = FeatureStore(features=rng.normal(size=(300, 8)).astype(np.float32))
    a, b = (spherical_kmeans(store, 8, seed=s) for s in (3, 4))
    assert a.meta["inputs"] == b.meta["inputs"]
    target = rng.normal(size=(5, 8))
    sa, sb = (select(u, target, SelectConfig(k=3)) for u in (a, b))
    assert sa.meta["inputs"]["source"]["units"] != sb.meta["inputs"]["source"]["units"]
    assert sa.meta["inputs"]["source"]["units"] == select(a, target, SelectConfig(k=2)).meta[
        "inputs"]["source"]["units"]


def test_a_selection_records_the_samples_of_each_target_where_they_have_ids():
    # finetune compares them with its --target data; numbered rows (.npy features) say nothing
    from pretrain_reuse.features import hash_ids

    rng = np.random.default_rng(0)
    labels = np.repeat([0, 1], 5)
    source = rng.normal(size=(6, 4))
    stores = [FeatureStore(features=rng.normal(size=(10, 4)), labels=labels,
                           ids=[f"{name}/{i}.png" for i in range(10)]) for name in ("a", "b")]
    sels = select_many(source, [*stores, FeatureStore(features=rng.normal(size=(10, 4)),
                                                      labels=labels)], SelectConfig(k=2))
    recorded = [s.meta["inputs"]["target"].get("data") for s in sels]
    assert recorded == [{"ids": hash_ids(s.ids), "n": 10} for s in stores] + [None]


def test_a_selection_records_the_kind_of_units_it_ranked(tmp_path, world):
    # fine-tuning maps class ids to samples by their labels and cluster ids by the units file:
    # the kind tells it which a selection's ids are
    from pretrain_reuse.units import spherical_kmeans

    _, source, target = world
    clusters = spherical_kmeans(FeatureStore(features=np.random.default_rng(0).normal(
        size=(300, source.prototypes.shape[1])).astype(np.float32)), 8, seed=0)
    for units, kind in ((source, "class"), (clusters, "cluster"),
                        (Units(prototypes=source.prototypes), "prototypes")):
        sel = select(units, target, SelectConfig(k=3))
        assert sel.unit_kind == kind and sel.top(2).unit_kind == kind
        assert Selection.load(sel.save(tmp_path / "sel.json")).unit_kind == kind
    # a file of an earlier version names no kind
    assert Selection(selected=[0], scores=np.zeros(2), params={}).unit_kind is None


@pytest.mark.parametrize("edit,needle", [
    ({"selected": [3.5]}, "'selected' must be a list of unit ids"),  # was read as unit 3
    ({"selected": ["a"]}, "'selected' must be a list of unit ids"),
    ({"scores": ["x", 1]}, "'scores' and 'counts' must be lists of numbers"),
    ({"scores": [[1.0], [2.0]]}, "'scores' must be a flat list"),
    ({"unit_kind": "clusters"}, "'unit_kind' is 'clusters', not one of class, cluster, prototypes"),
    # finetune said "the selected classes have no samples"
    ({"selected": []}, r"the selection selects no unit \(an empty 'selected'\)"),
])
def test_an_edited_selection_file_is_one_line(tmp_path, edit, needle):
    import json

    Selection(selected=[1], scores=np.array([0.1, 0.9]), params={}).save(tmp_path / "sel.json")
    record = {**json.loads((tmp_path / "sel.json").read_text()), **edit}
    (tmp_path / "sel.json").write_text(json.dumps(record))
    with pytest.raises(PretrainReuseError, match=needle):
        Selection.load(tmp_path / "sel.json")


# --------------------------------------------------------------------------------------------
# Plain Python inputs: NumPy numbers, dicts, tensors, lists, text ids
# --------------------------------------------------------------------------------------------


def _problem(seed=4):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((40, 6)), rng.standard_normal((5, 6))


@pytest.mark.parametrize("k", [0, -1, 1.5, 2.0, True, "3", None])
def test_top_refuses_every_k_that_select_config_refuses(k):
    # top(0) gave [], top(-1) every unit but the last, top(1.5) every unit
    sel = Selection(selected=[0], scores=-np.arange(6.0), params={}, counts=np.full(6, 10))
    needle = ("a float is a share of the source samples, in \\(0, 1\\]" if k == 2.0
              else "must be a whole number of units >= 1 or a sample fraction in \\(0, 1\\]")
    with pytest.raises(PretrainReuseError, match=needle):
        sel.top(k)
    if k is not None:  # None is method 'label''s "every named unit"
        with pytest.raises(PretrainReuseError, match=needle):
            SelectConfig(k=k)


def test_top_takes_numpy_numbers_as_counts_and_shares():
    sel = Selection(selected=[0], scores=-np.arange(6.0), params={}, counts=np.full(6, 10))
    assert sel.top(np.int64(2)).selected == [0, 1]
    assert sel.top(np.float32(0.5)).selected == [0, 1, 2]
    assert type(sel.top(np.int64(2)).params["k"]) is int


def test_numpy_numbers_in_select_config_give_the_selection_of_python_numbers():
    s, t = _problem()
    ref_cfg = SelectConfig(k=4, eps_c=0.5, eps=0.5, tau_b=100.0, max_iter=1000, tol=1e-7)
    cfg = SelectConfig(k=np.int64(4), eps_c=np.float32(0.5), eps=np.float32(0.5),
                       tau_b=np.int64(100), max_iter=np.int64(1000), tol=np.float64(1e-7))
    assert cfg == ref_cfg and type(cfg.max_iter) is int and type(cfg.eps) is float
    ref, got = select(s, t, ref_cfg), select(s, t, cfg)
    assert got.selected == ref.selected
    np.testing.assert_array_equal(got.scores, ref.scores)


@pytest.mark.parametrize("kwargs, needle", [
    (dict(eps="1"), "eps must be a positive number, got '1'"),  # was a TypeError
    (dict(eps_c=None), "eps_c must be a positive number, got None"),
    (dict(max_iter=10.5), "max_iter must be an integer >= 1, got 10.5"),
    (dict(max_iter=True), "max_iter must be an integer >= 1, got True"),
    (dict(tol=0.5), "tol=0.5 is too loose"),  # was accepted, then refused by select()
    (dict(method="random", seed=1.5), "seed must be an integer"),
    (dict(method="label", unit_ids=(1.5,)), "unit_ids must be integer ids, got 1.5"),
    (dict(method="label", unit_ids="3,x"), "unit_ids '3,x' is not a list of unit ids"),
])
def test_select_config_refuses_bad_values_at_construction(kwargs, needle):
    with pytest.raises(PretrainReuseError, match=needle):
        SelectConfig(**kwargs)


def test_label_unit_ids_may_be_written_as_text_like_on_the_command_line():
    cfg = SelectConfig(method="label", unit_ids="3,7-9", k=None)
    assert cfg.unit_ids == (3, 7, 8, 9)
    s, t = _problem()
    assert select(s, t, cfg).selected == [3, 7, 8, 9]


def test_a_dict_config_is_the_select_config_of_its_fields():
    s, t = _problem()
    assert select(s, t, {"k": 3, "eps_c": 0.5}).selected == select(
        s, t, SelectConfig(k=3, eps_c=0.5)).selected
    with pytest.raises(PretrainReuseError, match=r"SelectConfig field='kk'.*did you mean 'k'"):
        select(s, t, {"kk": 3})
    with pytest.raises(PretrainReuseError, match=r"cfg must be a SelectConfig or a dict of its fields, "
                                                 r"got int; build it with SelectConfig\(\*\*fields\)"):
        select(s, t, 3)


@pytest.mark.parametrize("convert", [torch.from_numpy, np.ndarray.tolist],
                         ids=["torch tensor", "nested list"])
def test_tensors_and_lists_select_like_numpy_prototypes(convert):
    # cost_matrix and unbalanced_sinkhorn took them; select refused them
    s, t = _problem()
    ref = select(s, t, SelectConfig(k=5))
    got = select(convert(s), convert(t), SelectConfig(k=5))
    assert got.selected == ref.selected
    np.testing.assert_array_equal(got.scores, ref.scores)
    with pytest.raises(PretrainReuseError, match=r"got the path 'u\.npy' where units belong; "
                                                 r"open the file with pretrain_reuse\.load"):
        select("u.npy", t)


@pytest.mark.parametrize("relevant, needle", [
    (["a"], "relevant must be integer ids, got 'a'"),
    ([1.5], "relevant must be integer ids, got 1.5"),
    ("3", "relevant must be a list of integer ids, got '3'"),
    (3, "relevant must be a list of integer ids, got 3"),
])
def test_recall_refuses_ids_that_are_not_integers(relevant, needle):
    sel = Selection(selected=[1, 3], scores=np.zeros(5), params={})
    with pytest.raises(PretrainReuseError, match=needle):
        sel.recall(relevant)
    assert sel.recall({3, np.int64(4)}) == 0.5
    # ids as NumPy arrays and torch tensors (a tensor was refused as "got tensor(0)")
    assert sel.recall(np.array([3, 4])) == sel.recall(torch.tensor([3, 4])) == 0.5


def test_repr_of_a_large_named_selection_is_a_one_line_summary():
    names = [f"class-{i}" for i in range(1000)]
    scores = -np.arange(1000.0)
    sel = Selection(selected=list(range(100)), scores=scores, params={"method": "uot"},
                    unit_names=names)
    assert repr(sel) == ("Selection(method='uot', selected=100 of 1000 units, top=[0 'class-0', "
                         "1 'class-1', 2 'class-2', 3 'class-3', 4 'class-4', ...])")
    assert repr(Selection(selected=[2], scores=scores[:3], params={})) == (
        "Selection(method=None, selected=1 of 3 units, top=[2])")


def test_a_selection_is_saved_only_under_a_json_name_that_load_opens(tmp_path):
    from pretrain_reuse import load

    sel = Selection(selected=[1], scores=np.array([0.1, 0.9]), params={})
    with pytest.raises(PretrainReuseError, match=r"selection files are saved as \.json, got '.*selx'"):
        sel.save(tmp_path / "selx")
    assert not list(tmp_path.iterdir())
    assert load(sel.save(tmp_path / "sel.json")).selected == [1]


def test_messages_shared_with_the_cli_name_the_parameter_and_the_flag():
    with pytest.raises(PretrainReuseError, match=r"needs unit_ids \(--ids\) or a name_pattern \(--names\)"):
        SelectConfig(method="label")
    with pytest.raises(PretrainReuseError, match=r"pass method='label' \(--method label\)"):
        SelectConfig(unit_ids=(1,))
    s, t = _problem()
    with pytest.raises(PretrainReuseError, match=r"only 2 units were named .*pass k=2 \(--k 2\)"):
        select(s, t, SelectConfig(method="label", unit_ids=(1, 2), k=3))
    with pytest.raises(PretrainReuseError, match=r"name_pattern \(--names\) needs unit names; build"):
        select(s, t, SelectConfig(method="label", name_pattern="owl"))
    # clusters have no names to build: they are named by id (it said to pass --class-names)
    clusters = Units(prototypes=s, kind="cluster", assignment=np.arange(80) % 40,
                     sample_ids=[str(i) for i in range(80)])
    with pytest.raises(PretrainReuseError, match=r"which k-means clusters do not have: select them "
                                                 r"by id \(unit_ids, --ids\)$"):
        select(clusters, t, SelectConfig(method="label", name_pattern="owl"))
    with pytest.raises(PretrainReuseError, match=r"exceeds the 40 source units; pass k <= 40 \(--k\)$"):
        select(s, t, SelectConfig(k=41))
    with pytest.raises(PretrainReuseError, match="which a bare prototype matrix lacks; pass Units "
                                                 "that record their members"):
        select(s, t, SelectConfig(k=0.5))


def test_units_of_features_from_different_networks_are_warned_of(quick_demo):
    """Dimensions that agree hide it: the ranking would compare unrelated feature spaces."""
    import warnings
    from dataclasses import replace

    demo, _, _ = quick_demo
    pool, target = (FeatureStore.load(demo / f"features_{n}") for n in ("pretrain", "target"))
    source, same = class_means(pool), class_means(target)
    side = pool.meta["backbone"]["input_size"]
    assert source.meta["embedding"] == {"model": "smallcnn", "layer": "penultimate",
                                        "state": pool.meta["inputs"]["state"], "input_size": side,
                                        "precision": "fp32"}
    renamed = class_means(replace(target, meta={**target.meta, "params": {
        **target.meta["params"], "model": "./smallcnn"}}))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        select(source, same, SelectConfig(k=3))  # the same network: no warning
        select(source, renamed, SelectConfig(k=3))  # ... however its name was spelled
    other = class_means(replace(target, meta={**target.meta, "inputs": {
        **target.meta["inputs"], "state": "sha256:0123456789abcdef"}}))
    with pytest.warns(UserWarning, match=r"different networks, image sizes or precisions \(state: sha256:"):
        select(source, other, SelectConfig(k=3))
    # the same network on images of another size (embed --image-size)
    larger = class_means(replace(target, meta={**target.meta, "backbone": {
        **target.meta["backbone"], "input_size": [2 * side[0], 2 * side[1]]}}))
    with pytest.warns(UserWarning, match=rf"\(input_size: \[{side[0]}, {side[1]}\] vs \[{2 * side[0]},"
                                         rf" {2 * side[1]}\]; both model smallcnn\)"):
        select(source, larger, SelectConfig(k=3))
    # a GPU's bf16 embedding of the same network: its features are rounded
    rounded = class_means(replace(target, meta={**target.meta, "precision": "bf16"}))
    with pytest.warns(UserWarning, match=r"\(precision: fp32 vs bf16; both model smallcnn\)"):
        select(source, rounded, SelectConfig(k=3))
    # units made before the input size was recorded are compared on the rest
    older = replace(same, meta={**same.meta, "embedding": {
        k: v for k, v in same.meta["embedding"].items() if k != "input_size"}})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        select(source, older, SelectConfig(k=3))
    plain = class_means(FeatureStore(features=np.asarray(target.features), labels=target.labels))
    assert plain.meta["embedding"] is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        select(source, plain, SelectConfig(k=3))  # features from elsewhere record no network


def test_the_select_command_prints_the_network_warning_on_one_line(tmp_path, capsys):
    from pretrain_reuse.cli import main

    rng = np.random.default_rng(0)
    net = {"model": "smallcnn", "layer": "penultimate", "state": "sha256:aaaaaaaaaaaaaaaa"}
    Units(prototypes=rng.standard_normal((20, 8)).astype(np.float32), kind="class",
          meta={"embedding": net}).save(tmp_path / "s.safetensors")
    Units(prototypes=rng.standard_normal((4, 8)).astype(np.float32), kind="class",
          meta={"embedding": {**net, "state": "sha256:bbbbbbbbbbbbbbbb"}}).save(tmp_path / "t.safetensors")
    assert main(["select", "--source", str(tmp_path / "s.safetensors"), "--target",
                 str(tmp_path / "t.safetensors"), "--k", "3", "--out", str(tmp_path / "sel.json")]) == 0
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [err[0]] and err[0].startswith(
        "warning: source and target units come from features of different networks, image "
        "sizes or precisions (state: "), err
