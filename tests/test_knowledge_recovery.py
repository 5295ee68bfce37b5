"""Ground-truth recovery: rule games against brute force, precision/recall on planted cases."""

import itertools

import numpy as np
import pytest

from pretrain_reuse.data import WorldConfig, make_world
from pretrain_reuse.errors import PretrainReuseError
from pretrain_reuse.knowledge import (
    Interactions,
    and_interactions,
    and_or_interactions,
    harsanyi_and,
    planted_game,
)
from pretrain_reuse.knowledge.recovery import ground_truth_recovery, rule_game


def test_rule_game_equals_the_scenes_rule_on_every_set_of_slots():
    data = make_world(WorldConfig()).dataset("target", "test")
    for index in (0, 41, 250):
        scene = data.scene(index)
        n = len(scene.cells)
        v = rule_game(scene.term_slots, n)
        brute = [float(scene.rule_holds([s for s in range(n) if m >> s & 1])) for m in range(1 << n)]
        np.testing.assert_array_equal(v, brute)


def test_rule_interactions_are_the_unions_of_one_subset_per_term_with_alternating_sign():
    # a AND (b OR c) over players a=0, b=3, c=5: +1 on {0,3} and {0,5}, -1 on {0,3,5}
    i = harsanyi_and(rule_game([(0,), (3, 5)], 6))
    expected = np.zeros(64)
    expected[[0b1001, 0b100001]] = 1.0
    expected[0b101001] = -1.0
    np.testing.assert_array_equal(i, expected)


RULE = [(0,), (3, 5)]  # truth: +{0,3}, +{0,5}, -{0,3,5}


def _model(scale: float, extra: dict | None = None, **kw) -> np.ndarray:
    """A model's game: scale x rule game - 2 (a log-odds), plus planted extra AND terms."""
    return scale * rule_game(RULE, 6) - 2.0 + planted_game(6, extra or {}, **kw)


def test_a_spurious_interaction_lowers_precision_and_nothing_lowers_recall():
    # the model has the three true items (±4) and one spurious AND {1,2} = 1.5
    x = and_interactions(_model(4.0, {(1, 2): 1.5}))
    r = ground_truth_recovery(x, [rule_game(RULE, 6)])
    assert r.overall["precision"].mean == pytest.approx(3 / 4)
    assert r.overall["recall"].mean == 1.0
    assert r.overall["signed_precision"].mean == pytest.approx(3 / 4)
    assert r.overall["signed_recall"].mean == 1.0
    # order 2: predicted {0,3}, {0,5}, {1,2}, true {0,3}, {0,5}; order 3: {0,3,5} on both sides
    assert r.by_order[2]["precision"].mean == pytest.approx(2 / 3)
    assert r.by_order[2]["recall"].mean == 1.0
    assert r.by_order[3]["precision"].mean == 1.0 and r.by_order[3]["recall"].mean == 1.0
    assert r.by_order[1]["precision"].n_used == 0 and r.by_order[1]["recall"].n_used == 0


def test_below_tau_items_are_not_predictions_and_flipped_signs_only_fail_signed_matching():
    truth = rule_game(RULE, 6)
    # the spurious term is 0.1 / 4 = 2.5% of the largest interaction: not salient at tau 0.05
    weak = and_interactions(_model(4.0, {(1, 2): 0.1}))
    assert ground_truth_recovery(weak, [truth]).overall["precision"].mean == 1.0
    # a model that learned the rule with the opposite sign: same support, no signed match
    flipped = and_interactions(_model(-4.0))
    r = ground_truth_recovery(flipped, [truth])
    assert r.overall["precision"].mean == 1.0 and r.overall["recall"].mean == 1.0
    assert r.overall["signed_precision"].mean == 0.0 and r.overall["signed_recall"].mean == 0.0


def test_and_or_interactions_are_judged_on_the_harsanyi_transform_of_their_game():
    game = _model(4.0, {(1, 2): 1.5})
    r_and = ground_truth_recovery(and_interactions(game), [rule_game(RULE, 6)])
    r_or = ground_truth_recovery(and_or_interactions(game, qthres=0.0), [rule_game(RULE, 6)])
    assert r_or.to_dict()["overall"] == r_and.to_dict()["overall"]


def test_and_or_interactions_are_judged_with_their_noise_removed():
    # v carries a spurious AND {1,2} that the sparsification's noise q cancels: the denoised
    # game v + q is the model's rule game, whose items are exactly the true ones
    spurious = planted_game(6, {(1, 2): 1.5})
    denoised = _model(4.0)
    x = Interactions(n=6, and_values=harsanyi_and(denoised), or_values=np.zeros(64),
                     v=denoised + spurious, noise=-spurious, kind="and-or")
    r = ground_truth_recovery([x], [rule_game(RULE, 6)])
    assert r.overall["precision"].mean == 1.0 and r.overall["recall"].mean == 1.0
    # judged on v alone, the spurious item would be a fourth prediction
    assert ground_truth_recovery(and_interactions(x.v), [rule_game(RULE, 6)]).overall[
        "precision"].mean == pytest.approx(3 / 4)


def test_recovery_over_samples_averages_and_pools():
    truth = rule_game(RULE, 6)
    xs = and_interactions(np.stack([_model(4.0, {(1, 2): 1.5}), _model(4.0)]))
    r = ground_truth_recovery(xs, [truth, truth])
    p = r.overall["precision"]
    assert p.mean == pytest.approx((3 / 4 + 1) / 2) and p.pooled == pytest.approx(6 / 7)
    assert r.n_samples == 2 and r.to_dict()["overall"]["recall"]["mean"] == 1.0


def test_bad_ground_truth_inputs_are_refused():
    x = and_interactions(_model(4.0))
    with pytest.raises(PretrainReuseError, match="one of each per sample"):
        ground_truth_recovery(x, [])
    with pytest.raises(PretrainReuseError, match="n=6 players"):
        ground_truth_recovery(x, [np.zeros(8)])
    with pytest.raises(PretrainReuseError, match="every term"):
        rule_game([(0,), ()], 4)
    with pytest.raises(PretrainReuseError, match=r"outside 0\.\.3"):
        rule_game([(0, 4)], 4)
    with pytest.raises(PretrainReuseError, match=r"interactions\[0\] must be an Interactions object"):
        ground_truth_recovery([x[0].v], [np.zeros(64)])
    with pytest.raises(PretrainReuseError, match=r"truths\[0\] must be a game"):
        ground_truth_recovery(x, [["a"] * 64])
    with pytest.raises(PretrainReuseError, match="term_slots=3 must be a list of terms"):
        rule_game(3, 4)


def test_rule_game_and_recovery_take_any_iterable():
    # an iterator of terms used to run out in the checks, leaving the all-ones game
    np.testing.assert_array_equal(rule_game(iter([iter([0, 1])]), 2), rule_game([(0, 1)], 2))
    x = and_interactions(_model(4.0))
    truth = [rule_game([(0, 1)], 6)]
    assert (ground_truth_recovery(iter(x), iter(truth)).to_dict()
            == ground_truth_recovery(x, truth).to_dict())


def test_every_nonzero_rule_interaction_is_a_union_of_term_choices():
    # independent check of the closed form on a 3-term rule: brute force over subsets
    terms = [(0, 1), (2,), (3, 4)]
    i = harsanyi_and(rule_game(terms, 5))
    expected = np.zeros(32)
    for picks in itertools.product(*[[c for k in range(1, len(t) + 1)
                                      for c in itertools.combinations(t, k)] for t in terms]):
        s = sum(1 << p for pick in picks for p in pick)
        expected[s] = (-1) ** (bin(s).count("1") - len(terms))
    np.testing.assert_array_equal(i, expected)
