"""Tests of the Harsanyi (AND) and OR transforms of pretrain_reuse.knowledge.interactions.

References shared with nothing in the package: the defining sums evaluated subset by subset
(brute force, n <= 8), and shapiq's ExactComputer ("Moebius", "Co-Moebius", "SV"), whose results
are keyed by coalition tuples and converted to our bitmask layout explicitly.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from pretrain_reuse.errors import PretrainReuseError
from pretrain_reuse.knowledge import (
    MAX_PLAYERS,
    Interactions,
    harsanyi_and,
    harsanyi_or,
    mask_of,
    orders,
    players_of,
    reconstruct_and,
    reconstruct_or,
)


def random_game(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(1 << n)


def subsets(mask: int):
    """All sub-masks of ``mask`` (brute-force enumeration)."""
    players = [i for i in range(mask.bit_length()) if mask >> i & 1]
    for r in range(len(players) + 1):
        for combo in itertools.combinations(players, r):
            yield sum(1 << i for i in combo)


def brute_mobius(v: np.ndarray, n: int) -> np.ndarray:
    return np.array([sum((-1) ** (bin(s).count("1") - bin(t).count("1")) * v[t] for t in subsets(s))
                     for s in range(1 << n)])


def brute_or(v: np.ndarray, n: int) -> np.ndarray:
    full = (1 << n) - 1
    out = np.array([-sum((-1) ** (bin(s).count("1") - bin(l_).count("1")) * v[full ^ l_] for l_ in subsets(s))
                    for s in range(1 << n)])
    out[0] = v[0]
    return out


def shapiq_game(v: np.ndarray, n: int):
    """Our bitmask game as a shapiq callable: boolean coalition matrix in, values out."""
    weights = 1 << np.arange(n)

    def game(coalitions: np.ndarray) -> np.ndarray:
        return v[(np.asarray(coalitions, dtype=bool) * weights).sum(axis=1)]

    return game


def shapiq_to_bitmask(values, n: int) -> np.ndarray:
    """shapiq's InteractionValues (coalition-tuple keys) in our bitmask layout."""
    out = np.full(1 << n, np.nan)
    for coalition, pos in values.interaction_lookup.items():
        out[mask_of(coalition, n)] = values.values[pos]
    return out


# --------------------------------------------------------------------------------------------
# AND (Harsanyi / Möbius)
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [1, 2, 5, 8])
def test_harsanyi_and_equals_the_defining_alternating_sum(n):
    v = random_game(n, seed=n)
    np.testing.assert_allclose(harsanyi_and(v), brute_mobius(v, n), atol=1e-12)


@pytest.mark.parametrize("n", [3, 7, 12])
def test_harsanyi_and_equals_shapiq_exact_moebius(n):
    shapiq = pytest.importorskip("shapiq")
    v = random_game(n, seed=100 + n)
    exact = shapiq.ExactComputer(shapiq_game(v, n), n_players=n)("Moebius")
    ref = shapiq_to_bitmask(exact, n)
    assert not np.isnan(ref).any(), "shapiq returned fewer than 2^n Moebius values"
    np.testing.assert_allclose(harsanyi_and(v), ref, atol=1e-9)


@pytest.mark.parametrize("n", [1, 4, 9])
def test_exported_and_interactions_are_shapiqs_moebius_values_and_convert_to_its_shapley(n):
    shapiq = pytest.importorskip("shapiq")
    from shapiq.game_theory.moebius_converter import MoebiusConverter

    v = random_game(n, seed=200 + n)
    x = Interactions(n=n, and_values=harsanyi_and(v), or_values=np.zeros(1 << n), v=v,
                     noise=np.zeros(1 << n))
    ours = x.to_shapiq()
    computer = shapiq.ExactComputer(shapiq_game(v, n), n_players=n)
    exact = computer("Moebius")
    assert ours.index == "Moebius" and ours.baseline_value == pytest.approx(v[0], abs=1e-12)
    for coalition in exact.interaction_lookup:
        assert ours[coalition] == pytest.approx(exact[coalition], abs=1e-9)
    # shapiq's own tools take it: its Möbius-to-Shapley conversion gives the game's Shapley values
    sv, ref = MoebiusConverter(ours)("SV", order=1), computer("SV")
    np.testing.assert_allclose([sv[(i,)] for i in range(n)], [ref[(i,)] for i in range(n)],
                               atol=1e-9)
    with pytest.raises(PretrainReuseError, match="not the Möbius transform"):
        Interactions(n=n, and_values=v, or_values=np.zeros_like(v), v=v, noise=np.zeros_like(v),
                     kind="and-or").to_shapiq()


@pytest.mark.parametrize("n", [-1, 40, 2.0, True])
def test_orders_refuses_a_number_of_players_it_cannot_enumerate(n):
    with pytest.raises(PretrainReuseError, match=r"must be a number of players in 0\.\.24"):
        orders(n)


@pytest.mark.parametrize("n", [1, 4, 10])
def test_and_interactions_reproduce_the_game_on_every_coalition(n):
    v = random_game(n, seed=n)
    np.testing.assert_allclose(reconstruct_and(harsanyi_and(v)), v, atol=1e-10)
    # and the matching written out: v(S) = Σ_{T⊆S} I(T)
    i_and = harsanyi_and(v)
    for s in range(0, 1 << n, max(1, (1 << n) // 16)):
        assert sum(i_and[t] for t in subsets(s)) == pytest.approx(v[s], abs=1e-10)


def test_and_interactions_sum_to_v_of_the_grand_coalition():
    v = random_game(9, seed=3)
    assert harsanyi_and(v).sum() == pytest.approx(v[-1], abs=1e-10)
    assert harsanyi_and(v)[1:].sum() == pytest.approx(v[-1] - v[0], abs=1e-10)


def test_unanimity_game_has_a_single_and_interaction():
    n, t = 6, mask_of([1, 3, 4], 6)
    v = ((np.arange(1 << n) & t) == t).astype(float) * 2.5
    expected = np.zeros(1 << n)
    expected[t] = 2.5
    np.testing.assert_allclose(harsanyi_and(v), expected, atol=1e-14)


# --------------------------------------------------------------------------------------------
# OR
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [1, 3, 6])
def test_harsanyi_or_equals_the_defining_sum_over_complements(n):
    v = random_game(n, seed=20 + n)
    np.testing.assert_allclose(harsanyi_or(v), brute_or(v, n), atol=1e-12)


def test_or_interactions_reproduce_the_game_by_the_intersection_rule():
    n = 5
    v = random_game(n, seed=5)
    i_or = harsanyi_or(v)
    for s in range(1 << n):
        direct = i_or[0] + sum(i_or[t] for t in range(1, 1 << n) if t & s)
        assert direct == pytest.approx(v[s], abs=1e-10)
    np.testing.assert_allclose(reconstruct_or(i_or), v, atol=1e-10)


def test_or_interactions_are_signed_co_moebius_values_of_shapiq():
    shapiq = pytest.importorskip("shapiq")
    n = 5
    v = random_game(n, seed=9)
    co = shapiq_to_bitmask(shapiq.ExactComputer(shapiq_game(v, n), n_players=n)("Co-Moebius"), n)
    size = orders(n)
    i_or = harsanyi_or(v)
    np.testing.assert_allclose(i_or[1:], ((-1.0) ** (size + 1) * co)[1:], atol=1e-10)


def test_or_game_of_one_term_has_a_single_or_interaction():
    n, t = 5, mask_of([0, 2], 5)
    v = ((np.arange(1 << n) & t) != 0).astype(float) * -1.5 + 0.25
    expected = np.zeros(1 << n)
    expected[0], expected[t] = 0.25, -1.5
    np.testing.assert_allclose(harsanyi_or(v), expected, atol=1e-14)


# --------------------------------------------------------------------------------------------
# Shapley values from interactions
# --------------------------------------------------------------------------------------------


def test_shapley_values_from_and_interactions_equal_shapiq_exact_shapley():
    shapiq = pytest.importorskip("shapiq")
    n = 6
    v = random_game(n, seed=11)
    x = Interactions(n=n, and_values=harsanyi_and(v), or_values=np.zeros(1 << n), v=v,
                     noise=np.zeros(1 << n))
    sv = shapiq.ExactComputer(shapiq_game(v, n), n_players=n)("SV")
    ref = np.array([sv.values[sv.interaction_lookup[(i,)]] for i in range(n)])
    np.testing.assert_allclose(x.shapley_values(), ref, atol=1e-10)


# --------------------------------------------------------------------------------------------
# Array types, batches, dtypes
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("transform", [harsanyi_and, harsanyi_or, reconstruct_and, reconstruct_or])
def test_torch_input_gives_the_same_values_as_numpy_as_a_float64_tensor(transform):
    v = random_game(7, seed=1)
    out = transform(torch.tensor(v, dtype=torch.float32))
    assert isinstance(out, torch.Tensor) and out.dtype == torch.float64 and out.device == torch.device("cpu")
    expected = transform(v.astype(np.float32))
    assert isinstance(expected, np.ndarray) and expected.dtype == np.float64
    np.testing.assert_allclose(out.numpy(), expected, atol=1e-12)


@pytest.mark.parametrize("transform", [harsanyi_and, harsanyi_or, reconstruct_and, reconstruct_or])
def test_batched_games_equal_one_game_at_a_time(transform):
    games = np.random.default_rng(4).standard_normal((3, 2, 1 << 6))
    out = transform(games)
    assert out.shape == games.shape
    for i, j in itertools.product(range(3), range(2)):
        np.testing.assert_allclose(out[i, j], transform(games[i, j]), atol=1e-12)


def test_transforms_do_not_modify_their_input():
    v = random_game(5)
    t = torch.tensor(v)
    harsanyi_or(v), harsanyi_and(t)
    np.testing.assert_array_equal(v, random_game(5))
    np.testing.assert_array_equal(t.numpy(), random_game(5))


def test_float32_games_are_transformed_in_float64():
    v32 = random_game(12, seed=2).astype(np.float32)
    exact = harsanyi_and(v32.astype(np.float64))
    np.testing.assert_array_equal(harsanyi_and(v32), exact)


def test_layout_helpers_round_trip():
    assert mask_of([0, 3], 5) == 0b1001
    assert players_of(0b10110) == (1, 2, 4)
    np.testing.assert_array_equal(orders(3), [0, 1, 1, 2, 1, 2, 2, 3])


# --------------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("length", [0, 1, 3, 12, 1000])
def test_length_not_a_power_of_two_is_refused_naming_v(length):
    with pytest.raises(PretrainReuseError, match=r"v has last dimension .* not 2\^n"):
        harsanyi_and(np.zeros(length))


def test_too_many_players_is_refused_with_the_limit():
    huge = np.broadcast_to(0.0, (1 << (MAX_PLAYERS + 1),))  # a view: nothing is allocated
    with pytest.raises(PretrainReuseError, match=rf"n={MAX_PLAYERS + 1} players; at most {MAX_PLAYERS}"):
        harsanyi_or(huge)


def test_nan_in_the_game_is_refused_with_its_position():
    v = random_game(4)
    v[5] = np.nan
    with pytest.raises(PretrainReuseError, match=r"v has 1 NaN/inf values \(first at index \(5,\)\)"):
        harsanyi_and(v)


def test_interactions_argument_is_named_in_reconstruction_errors():
    with pytest.raises(PretrainReuseError, match="interactions has last dimension 6"):
        reconstruct_or(np.zeros(6))


def test_non_numeric_games_are_refused():
    with pytest.raises(PretrainReuseError, match="v must be a numeric array"):
        harsanyi_and(["a", "b"])


def test_mask_of_refuses_players_outside_the_game():
    with pytest.raises(PretrainReuseError, match=r"player 5 is not an index in 0\.\.3"):
        mask_of([1, 5], 4)


@pytest.mark.parametrize("mask", [-1, 1.5, "3"])
def test_players_of_refuses_a_mask_that_is_not_a_non_negative_integer(mask):
    with pytest.raises(PretrainReuseError, match=r"mask=.* must be a non-negative integer bitmask"):
        players_of(mask)
