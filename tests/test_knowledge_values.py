"""Tests of the Interactions value object: lookup, salient sets, summaries, files, plots."""

from __future__ import annotations

import json

import numpy as np
import pytest

from pretrain_reuse.errors import PretrainReuseError
from pretrain_reuse.knowledge import (
    Interactions,
    accuracy_correlation,
    and_interactions,
    and_or_interactions_lp,
    and_or_interactions_sgd,
    harsanyi_and,
    mask_of,
    planted_game,
)
from pretrain_reuse.knowledge.recovery import rule_game


def make(n: int, and_terms: dict, or_terms: dict | None = None, *, empty: float = 0.0) -> Interactions:
    """Interactions with the given AND/OR values (by player tuple) and the game they reproduce."""
    i_and, i_or = np.zeros(1 << n), np.zeros(1 << n)
    i_and[0] = empty
    for players, value in and_terms.items():
        i_and[mask_of(players, n)] = value
    for players, value in (or_terms or {}).items():
        i_or[mask_of(players, n)] = value
    v = planted_game(n, and_terms, or_terms, bias=empty)
    return Interactions(n=n, and_values=i_and, or_values=i_or, v=v, noise=np.zeros(1 << n),
                        kind="and-or" if or_terms else "and")


# --------------------------------------------------------------------------------------------
# Salient interactions and lookup
# --------------------------------------------------------------------------------------------


def test_salient_threshold_is_relative_to_the_largest_and_or_entry_excluding_the_empty_set():
    x = make(4, {(0,): 0.04, (0, 1): 1.0, (2, 3): -0.06, (1, 2, 3): 0.05}, {(1, 3): -2.0}, empty=50.0)
    # max over AND and OR (∅ excluded) is 2.0, so the threshold is 0.1: only |I| > 0.1 survive
    assert x.salient(0.05) == {("and", 0b0011): 1.0, ("or", 0b1010): -2.0}
    # tau = 0.02: threshold 0.04 is strict, so the 0.04 singleton stays out
    assert set(x.salient(0.02)) == {("and", 0b0011), ("or", 0b1010), ("and", 0b1100), ("and", 0b1110)}


def test_salient_set_of_an_all_zero_game_is_empty():
    x = make(3, {}, empty=3.0)
    assert x.salient(0.05) == {}


def test_get_and_top_k_look_up_by_player_tuples():
    x = make(4, {(0, 1): 1.0, (2,): -3.0}, {(1, 3): 2.0})
    assert x.get((1, 0)) == 1.0 and x.get([1, 3], type="or") == 2.0 and x.get([3]) == 0.0
    assert x.top_k(2) == [("and", (2,), -3.0), ("or", (1, 3), 2.0)]


def test_get_of_a_bare_index_names_the_coalition_forms_it_accepts():
    x = make(4, {(3,): 1.0})
    for key in (3, "03"):
        with pytest.raises(PretrainReuseError) as e:
            x.get(key)
        assert "is not a coalition; pass its player indices, e.g. get((3,))" in str(e.value)
        assert "as get(players_of(mask), type)" in str(e.value)
    assert x.get((3,)) == 1.0


def test_repr_is_a_short_summary_counting_the_salient_interactions():
    # 12 players: the four 4096-entry arrays would print thousands of characters
    n = 12
    i_and = np.zeros(1 << n)
    i_and[[1, 3, 7]] = [1.0, -0.5, 0.049]  # 0.049 < 0.05 * 1.0: not salient
    i_or = np.zeros(1 << n)
    i_or[5] = 0.2
    x = Interactions(n=n, and_values=i_and, or_values=i_or, v=np.zeros(1 << n),
                     noise=np.zeros(1 << n), kind="and-or", info={"sample": "img_003.png"})
    assert len(x.salient()) == 3
    assert repr(x) == "Interactions(kind='and-or', n=12, salient=3 (tau=0.05), sample='img_003.png')"
    assert repr(make(2, {})) == "Interactions(kind='and', n=2, salient=0 (tau=0.05))"


def test_by_order_is_the_share_of_absolute_strength_per_order():
    x = make(3, {(0,): 1.0, (0, 1): -2.0, (0, 1, 2): 1.0}, {(1, 2): 4.0}, empty=7.0)
    h = x.by_order()
    np.testing.assert_allclose(h["and"], [0, 1 / 8, 2 / 8, 1 / 8])
    np.testing.assert_allclose(h["or"], [0, 0, 4 / 8, 0])
    h_salient = x.by_order(tau=0.3)  # threshold 1.2: keeps -2 (AND) and 4 (OR)
    np.testing.assert_allclose(h_salient["and"], [0, 0, 2 / 6, 0])
    np.testing.assert_allclose(h_salient["or"], [0, 0, 4 / 6, 0])


# --------------------------------------------------------------------------------------------
# Faithfulness and Shapley values
# --------------------------------------------------------------------------------------------


def test_faithfulness_error_is_zero_when_every_interaction_is_salient():
    x = make(5, {(0, 1): 2.0, (2,): 0.5}, {(3, 4): -1.0}, empty=0.3)
    err = x.faithfulness_error(tau=0.0)
    assert err["max"] == pytest.approx(0.0, abs=1e-12) and err["mean"] == pytest.approx(0.0, abs=1e-12)
    assert err["outside_share"] == 0.0 and err["noise"] == 0.0


def test_faithfulness_error_counts_the_dropped_interaction_on_the_coalitions_it_fires():
    n = 3
    x = make(n, {(0, 1): 2.0, (2,): 0.05})  # v(N) - v(∅) = 2.05; τ = 0.05 drops the 0.05 term
    err = x.faithfulness_error(tau=0.05)
    assert err["max"] == pytest.approx(0.05 / 2.05)
    assert err["mean"] == pytest.approx(4 * 0.05 / 8 / 2.05)  # {2} ⊆ S on 4 of the 8 coalitions
    assert err["outside_share"] == pytest.approx(0.05 / 2.05)


def test_faithfulness_error_is_relative_to_v_of_n_minus_v_of_empty_and_counts_the_largest_noise():
    # I(∅) = 1, I({0}) = 2, I({0,1}) = 1 reproduce v + q = [1, 3, 1, 4]; the noise q is
    # [0, 0.3, -0.1, 0], so v(N) - v(∅) = 4 - 1 = 3 and, all interactions kept, |v - ŵ| = |q|
    q = np.array([0.0, 0.3, -0.1, 0.0])
    x = Interactions(n=2, and_values=[1.0, 2.0, 0.0, 1.0], or_values=np.zeros(4),
                     v=np.array([1.0, 3.0, 1.0, 4.0]) - q, noise=q)
    err = x.faithfulness_error(tau=0.0)
    assert err["max"] == pytest.approx(0.3 / 3)
    assert err["mean"] == pytest.approx((0.3 + 0.1) / 4 / 3)
    assert err["noise"] == pytest.approx(0.3 / 3)  # the largest |q_S|, not their mean (0.1 / 3)
    assert err["outside_share"] == 0.0


def test_faithfulness_error_is_nan_when_v_of_n_equals_v_of_empty():
    x = make(2, {(0,): 1.0, (0, 1): -1.0})
    assert np.isnan(x.faithfulness_error()["max"])


def test_shapley_values_of_and_or_interactions_are_those_of_the_denoised_game():
    shapiq = pytest.importorskip("shapiq")
    n = 6
    v = planted_game(n, {(0, 1): 1.0, (2, 3, 4): -0.7}, {(4, 5): 0.9, (0, 2): 0.4}, noise=0.05, seed=1)
    [x] = and_or_interactions_lp(v, qthres=0.05)
    denoised = x.v + x.noise
    weights = 1 << np.arange(n)
    sv = shapiq.ExactComputer(lambda c: denoised[(np.asarray(c, bool) * weights).sum(1)], n_players=n)("SV")
    ref = np.array([sv.values[sv.interaction_lookup[(i,)]] for i in range(n)])
    np.testing.assert_allclose(x.shapley_values(), ref, atol=1e-8)
    assert x.shapley_values().sum() == pytest.approx(denoised[-1] - denoised[0], abs=1e-8)


# --------------------------------------------------------------------------------------------
# Construction, files, plots
# --------------------------------------------------------------------------------------------


def test_construction_refuses_bad_shapes_nan_and_or_values_on_an_and_kind():
    zeros = np.zeros(8)
    with pytest.raises(PretrainReuseError, match=r"and_values must have shape \(8,\)"):
        Interactions(n=3, and_values=np.zeros(4), or_values=zeros, v=zeros, noise=zeros)
    with pytest.raises(PretrainReuseError, match="noise has NaN"):
        Interactions(n=3, and_values=zeros, or_values=zeros, v=zeros, noise=np.full(8, np.nan))
    with pytest.raises(PretrainReuseError, match="kind='and' interactions must have all-zero or_values"):
        Interactions(n=3, and_values=zeros, or_values=np.ones(8), v=zeros, noise=zeros)
    with pytest.raises(PretrainReuseError, match="kind='both' is not one of"):
        Interactions(n=3, and_values=zeros, or_values=zeros, v=zeros, noise=zeros, kind="both")
    with pytest.raises(PretrainReuseError, match="n=0 must be an integer number of players"):
        Interactions(n=0, and_values=[0.0], or_values=[0.0], v=[0.0], noise=[0.0])
    with pytest.raises(PretrainReuseError, match="and_values must be an array of numbers, got str"):
        Interactions(n=2, and_values="abcd", or_values=np.zeros(4), v=np.zeros(4), noise=np.zeros(4))


def test_tau_and_k_errors_name_the_parameter():
    x = make(2, {(0,): 1.0})
    with pytest.raises(PretrainReuseError, match=r"tau=1\.5"):
        x.salient(1.5)
    with pytest.raises(PretrainReuseError, match="k=0 must be a positive integer"):
        x.top_k(0)
    with pytest.raises(PretrainReuseError, match="type='xor' is not one of"):
        x.get([0], type="xor")


def test_save_and_load_round_trip_every_field(tmp_path):
    v = planted_game(5, {(0, 1): 1.0}, noise=0.1, seed=3)
    [x] = and_interactions(v, qthres=0.04)
    x = x.with_info(sample="img_001.jpg", players=[[0, 1], [2, 3]], baseline="mean")
    path = x.save(tmp_path / "sub" / "x.safetensors")
    y = Interactions.load(path)
    for name in ("and_values", "or_values", "v", "noise"):
        np.testing.assert_array_equal(getattr(y, name), getattr(x, name))
    assert (y.n, y.kind, y.info) == (x.n, x.kind, x.info)
    assert y.meta == json.loads(json.dumps(x.meta))
    assert [p.name for p in path.parent.iterdir()] == ["x.safetensors"]  # no temporary left behind


def test_loading_a_corrupt_or_foreign_file_says_so(tmp_path):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a safetensors file")
    with pytest.raises(PretrainReuseError, match="is corrupt"):
        Interactions.load(bad)
    with pytest.raises(PretrainReuseError, match=r"saved as \.safetensors"):
        make(2, {}).save(tmp_path / "x.json")
    with pytest.raises(PretrainReuseError, match="does not exist"):
        Interactions.load(tmp_path / "missing.safetensors")


def test_save_replaces_interactions_but_no_other_file(tmp_path):
    # it replaced a units file (or a model's weights) silently
    from pretrain_reuse.units import Units

    path = make(2, {(0,): 1.0}).save(tmp_path / "x.safetensors")
    make(2, {(1,): 2.0}).save(path)  # an explanation rerun rewrites its own files
    assert Interactions.load(path).get([1]) == 2.0
    units = Units(prototypes=np.eye(3, dtype=np.float32), kind="prototypes").save(
        tmp_path / "units.safetensors")
    before = units.read_bytes()
    with pytest.raises(PretrainReuseError, match=r"units\.safetensors' exists and is not an "
                                                 "interactions file; choose another output path"):
        make(2, {}).save(units)
    assert units.read_bytes() == before


def test_plot_orders_draws_the_by_order_shares():
    plt = pytest.importorskip("matplotlib.pyplot")
    x = make(3, {(0,): 1.0, (0, 1): -2.0}, {(1, 2): 1.0})
    _, ax = plt.subplots()
    assert x.plot_orders(ax) is ax
    heights = [p.get_height() for p in ax.patches]
    np.testing.assert_allclose(heights, [0.25, 0.5, 0.0, 0.0, 0.25, 0.0])  # AND bars, then OR bars
    plt.close("all")


def test_arrays_are_read_only_copies_of_the_inputs():
    values = np.zeros(4)
    x = Interactions(n=2, and_values=values, or_values=values, v=values, noise=values)
    values[1] = 5.0
    assert x.and_values[1] == 0.0
    with pytest.raises(ValueError, match="read-only"):
        x.and_values[1] = 1.0


def test_with_info_returns_a_new_object():
    x = make(2, {(0,): 1.0})
    y = x.with_info(label=3)
    assert y.info == {"label": 3} and x.info == {}
    np.testing.assert_array_equal(y.and_values, x.and_values)


@pytest.mark.parametrize("value", [object(), float("nan"), {"inner": {1, 2}}])
def test_info_that_cannot_be_saved_is_refused_when_given_naming_the_key(value):
    x = make(2, {(0,): 1.0})
    with pytest.raises(PretrainReuseError, match=r"info\['bad'\] = .* cannot be saved as JSON"):
        x.with_info(label=3, bad=value)


def test_and_interactions_without_noise_are_the_harsanyi_transform():
    v = planted_game(6, {(0, 5): 1.0, (1, 2): -1.0}, noise=0.2, seed=0)
    [x] = and_interactions(v)
    np.testing.assert_array_equal(x.and_values, harsanyi_and(v))
    assert not x.noise.any() and x.kind == "and" and x.meta["solver"] == "exact"


@pytest.mark.parametrize("call", [
    lambda: planted_game(True),
    lambda: rule_game([[0]], n=True),
    lambda: and_or_interactions_sgd(np.zeros(4), niter=True),
    lambda: accuracy_correlation([[0.1], [0.2], [0.3]], [0.5, 0.6, 0.7], n_boot=np.True_),
    lambda: make(2, {(0, 1): 1.0}).top_k(True),
], ids=["planted_game n", "rule_game n", "sgd niter", "n_boot", "top_k k"])
def test_a_bool_is_no_count_in_the_knowledge_functions(call):
    with pytest.raises(PretrainReuseError, match="True"):
        call()
