"""Tests of the AND-OR sparsification solvers (ADMM default, group SGD protocol, exact LP, mode q,
joint sparsification of several models).

Independent references: a dense LP assembled from the defining matrices (all AND and all OR
columns, no tricks) for n <= 5; for the joint problem a dense LP written from the group's
definition (γ_shared, γ'_k, q_k and the transforms as matrices, the max over models as an
epigraph); the group's ``_train_p_q`` rewritten with dense matrices and torch.optim.SGD +
autograd; and invariants (|q| <= b, exact reconstruction of v + q).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.optimize import linprog

from pretrain_reuse.errors import PretrainReuseError
from pretrain_reuse.knowledge import (
    and_interactions,
    and_or_interactions,
    and_or_interactions_lp,
    and_or_interactions_sgd,
    harsanyi_and,
    joint_and_or_interactions,
    mask_of,
    orders,
    planted_game,
    reconstruct_and,
    reconstruct_or,
)

PLANTED_AND = {(0, 1): 2.0, (2, 3, 4): 1.5, (0, 7): -0.8}
PLANTED_OR = {(5, 6): 1.0}


@pytest.fixture(scope="module")
def planted():
    """An n = 8 check: three AND terms, one OR term, noise 0.01."""
    return planted_game(8, PLANTED_AND, PLANTED_OR, noise=0.01, seed=0)


@pytest.fixture(scope="module")
def planted_lp(planted):
    [x] = and_or_interactions_lp(planted, qthres=0.04)
    return x


def dense_matrices(n: int) -> tuple[np.ndarray, np.ndarray]:
    """Z[S, T] = [T ⊆ S]; W[S, T] = [T ∩ S ≠ ∅] for T ≠ ∅ and W[S, ∅] = 1, from the definitions."""
    size = 1 << n
    z = np.array([[float(t & s == t) for t in range(size)] for s in range(size)])
    w = np.array([[1.0 if t == 0 else float(t & s != 0) for t in range(size)] for s in range(size)])
    return z, w


def reference_lp(v: np.ndarray, n: int, b: float, with_or: bool) -> float:
    """min Σ|x| (+ Σ|y|) s.t. |Z x (+ W y) - v| <= b, every column present, x = x+ - x-."""
    z, w = dense_matrices(n)
    k = np.hstack([z, w]) if with_or else z
    a = np.hstack([k, -k])
    res = linprog(np.ones(a.shape[1]), A_ub=np.vstack([a, -a]), b_ub=np.concatenate([v + b, b - v]),
                  bounds=(0, None), method="highs")
    assert res.status == 0
    return res.fun


def joint_lp(games: np.ndarray, n: int, b: np.ndarray, p: np.ndarray, alpha: float) -> float:
    """The joint loss minimised over γ_shared, γ'_k (|γ'_k| <= p_k) and q_k (|q_k| <= b_k).

    I_and,k = Z⁻¹(½(v_k + q_k) + γ_shared + γ'_k), I_or,k = W⁻¹(½(v_k + q_k) - γ_shared - γ'_k);
    loss Σ over the AND and the OR entries S of (1-α)·m_S + α·Σ_k e_k,S with e >= |I|, m >= e.
    """
    z, w = dense_matrices(n)
    models, size = games.shape
    # the variables: γ_shared, γ'_k, q_k, e (type, k, S), m (type, S)
    shared, deviation, noise = 0, size, (1 + models) * size
    absolute, maximum = (1 + 2 * models) * size, (1 + 4 * models) * size
    width = maximum + 2 * size
    rows, rhs = [], []
    for t, (inverse, sign) in enumerate([(np.linalg.inv(z), 1.0), (np.linalg.inv(w), -1.0)]):
        for k in range(models):
            a = np.zeros((size, width))  # I_and,k or I_or,k = a @ x + const
            a[:, shared:shared + size] = sign * inverse
            a[:, deviation + k * size:deviation + (k + 1) * size] = sign * inverse
            a[:, noise + k * size:noise + (k + 1) * size] = 0.5 * inverse
            const = 0.5 * inverse @ games[k]
            e = np.zeros((size, width))
            e[np.arange(size), absolute + (t * models + k) * size + np.arange(size)] = -1.0
            m = np.zeros((size, width))
            m[np.arange(size), maximum + t * size + np.arange(size)] = -1.0
            rows += [a + e, -a + e, -e + m]
            rhs += [-const, const, np.zeros(size)]
    cost = np.zeros(width)
    cost[absolute:maximum] = alpha
    cost[maximum:] = 1 - alpha
    bounds = ([(None, None)] * size + [(-p[k], p[k]) for k in range(models) for _ in range(size)]
              + [(-b[k], b[k]) for k in range(models) for _ in range(size)]
              + [(0, None)] * (2 * models * size + 2 * size))
    res = linprog(cost, A_ub=np.vstack(rows), b_ub=np.concatenate(rhs), bounds=bounds, method="highs")
    assert res.status == 0
    return res.fun


def joint_loss(results, alpha: float) -> float:
    """The joint loss of given interactions of K models, from their arrays."""
    def f(values):
        m = np.abs(np.stack(values))
        return ((1 - alpha) * m.max(0) + alpha * m.sum(0)).sum()
    return f([x.and_values for x in results]) + f([x.or_values for x in results])


def group_sgd(v: np.ndarray, n: int, b: float, lr: float, niter: int):
    """_train_p_q of sjtu-xai-lab/interaction-concept, with dense matrices and autograd."""
    z, w = dense_matrices(n)
    to_and = torch.tensor(np.linalg.inv(z))  # reward -> I_and
    to_or = torch.tensor(np.linalg.inv(w))  # reward -> I_or
    rewards = torch.tensor(v)
    p = torch.zeros_like(rewards, requires_grad=True)
    q = torch.zeros_like(rewards, requires_grad=True)
    opt = torch.optim.SGD([p, q], lr=0.0, momentum=0.9)
    eta = np.logspace(np.log10(lr), np.log10(lr) - 1, niter)
    for it in range(niter):
        q.data = torch.clamp(q.data, -b, b)
        i_and = to_and @ (0.5 * (rewards + q) + p)
        i_or = to_or @ (0.5 * (rewards + q) - p)
        loss = i_and.abs().sum() + i_or.abs().sum()
        if it + 1 < niter:
            opt.zero_grad()
            opt.param_groups[0]["lr"] = eta[it]
            loss.backward()
            opt.step()
    return i_and.detach().numpy(), i_or.detach().numpy(), q.detach().numpy(), loss.item()


def noise_bound(v: np.ndarray, qthres: float) -> float:
    return qthres * abs(v[-1] - v[0])


def v0(v: np.ndarray) -> np.ndarray:
    """The group's "-v0" game v - v(∅), on which the references and the solvers (which centre
    every game) solve the same problem."""
    return v - v[..., :1]


# --------------------------------------------------------------------------------------------
# Optimality
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [3, 5])
def test_exact_lp_equals_a_dense_lp_over_all_and_and_or_columns(n):
    v = v0(planted_game(n, {(0, 1): 1.0, (2,): -0.5}, {(1, 2): 0.7}, noise=0.1, seed=n))
    [x] = and_or_interactions_lp(v, qthres=0.05)
    assert x.meta["objective"] == pytest.approx(reference_lp(v, n, noise_bound(v, 0.05), True), rel=1e-8)


def test_admm_reaches_the_lp_optimum_within_its_certified_gap(planted, planted_lp):
    [x] = and_or_interactions(planted, qthres=0.04, tol=1e-3)
    optimum = planted_lp.meta["objective"]
    assert x.meta["converged"] and x.meta["gap"] <= 1e-3
    assert optimum * (1 - 1e-9) <= x.meta["objective"] <= optimum * (1 + 1e-3)
    assert x.meta["lower_bound"] <= optimum * (1 + 1e-9)


def test_admm_default_objective_is_far_below_the_sgd_protocol(planted, planted_lp):
    [admm] = and_or_interactions(planted)
    [sgd] = and_or_interactions_sgd(planted, niter=1000)
    assert admm.meta["objective"] <= planted_lp.meta["objective"] * (1 + 1e-2)
    assert admm.meta["objective"] < sgd.meta["objective"]


def test_mode_q_reaches_the_optimum_of_a_dense_and_only_lp():
    n = 5
    v = v0(planted_game(n, {(0, 1): 1.0, (1, 2, 3): -0.6}, noise=0.1, seed=2))
    [x] = and_interactions(v, qthres=0.05, tol=1e-4)
    optimum = reference_lp(v, n, noise_bound(v, 0.05), False)
    assert optimum * (1 - 1e-9) <= x.meta["objective"] <= optimum * (1 + 1e-4)
    assert x.meta["objective"] < np.abs(harsanyi_and(v)).sum()


# --------------------------------------------------------------------------------------------
# Invariants
# --------------------------------------------------------------------------------------------

SOLVERS = {
    "admm": lambda v: and_or_interactions(v, qthres=0.05),
    "sgd": lambda v: and_or_interactions_sgd(v, qthres=0.05, lr=1e-3, niter=300),
    "lp": lambda v: and_or_interactions_lp(v, qthres=0.05),
    "mode-q": lambda v: and_interactions(v, qthres=0.05),
    "joint": lambda v: [x for [x] in joint_and_or_interactions(  # the games as K models on one sample
        np.reshape(v, (-1, 1, v.shape[-1])), qthres=0.05)],
}


@pytest.mark.parametrize("solver", SOLVERS)
def test_noise_stays_in_its_box_and_the_interactions_reproduce_v_plus_q_everywhere(solver):
    games = np.stack([planted_game(6, {(0, 1): 1.0}, {(2, 3, 4): -0.5}, noise=0.2, seed=s) for s in range(3)])
    for x, v in zip(SOLVERS[solver](games), games, strict=True):
        b = noise_bound(v, 0.05)
        assert np.abs(x.noise).max() <= b * (1 + 1e-9)
        np.testing.assert_allclose(reconstruct_and(x.and_values) + reconstruct_or(x.or_values), v + x.noise,
                                   atol=1e-10)
        np.testing.assert_array_equal(x.v, v)


@pytest.mark.parametrize("solver", ["admm", "sgd", "lp", "joint"])
def test_and_or_results_have_orders_0_and_1_merged_into_and(solver):
    [x] = SOLVERS[solver](planted_game(5, {(0,): 1.0}, {(1, 2): 1.0, (3, 4): 0.5}, noise=0.1, seed=1))
    assert x.kind == "and-or"
    assert not x.or_values[orders(5) <= 1].any()


@pytest.mark.parametrize("solver", SOLVERS)
def test_a_constant_game_has_no_interaction_but_its_bias_and_a_planted_game_beside_it_is_kept(
        solver):
    # v ≡ 2: the Möbius transform (and the exact LP) give I_and(∅) = 2 and nothing else; an
    # iterative solver's residue (~3e-4 before) must not become salient knowledge
    planted = planted_game(4, {(0, 1): 1.0}, {(2, 3): 0.5}, noise=0.01, seed=0)
    constant, x = SOLVERS[solver](np.stack([np.full(16, 2.0), planted]))
    assert constant.salient() == {} and constant.meta["constant"] and not x.meta["constant"]
    assert constant.and_values[0] == 2.0 and not constant.and_values[1:].any()
    assert not constant.or_values.any() and not constant.noise.any()
    # OR{2,3} = 0.5 (x2 + x3 - x2 x3) in AND terms alone
    expected = ({("and", 0b11), ("and", 0b100), ("and", 0b1000), ("and", 0b1100)}
                if solver == "mode-q" else {("and", 0b11), ("or", 0b1100)})
    assert set(x.salient(0.1)) == expected


@pytest.mark.parametrize("solver", SOLVERS)
def test_the_bias_of_a_game_goes_to_the_empty_coalition_and_changes_nothing_else(solver):
    # v(∅) is the output at the baseline (about -log(C-1) for a zero image), not evidence: the
    # decomposition of v + c must be that of v with c added to I_and(∅), as for exact Harsanyi
    v = planted_game(6, {(0, 1): 2.0, (2, 3, 4): 1.5, (0, 5): -0.8}, {(1, 2): 1.0}, noise=0.05,
                     seed=0)
    [x] = SOLVERS[solver](v)
    for bias in (-8.0, 50.0):
        [y] = SOLVERS[solver](v + bias)
        np.testing.assert_allclose(y.and_values[0], x.and_values[0] + bias, atol=1e-6)
        np.testing.assert_allclose(y.and_values[1:], x.and_values[1:], atol=1e-6)
        np.testing.assert_allclose(y.or_values, x.or_values, atol=1e-6)
        np.testing.assert_allclose(y.noise, x.noise, atol=1e-6)
        assert set(y.salient(0.05)) == set(x.salient(0.05))


def test_without_centring_the_noise_of_the_empty_coalition_is_spent_on_the_bias():
    # the group's runs on outputs without "-v0": with v(∅) = -8 the optimum moves q_∅ to +b and
    # the rest of the decomposition with it (a spurious OR term appears)
    v = planted_game(6, {(0, 1): 2.0, (2, 3, 4): 1.5, (0, 5): -0.8}, {(1, 2): 1.0}, noise=0.05,
                     seed=1)
    [centred] = and_or_interactions_lp(v - 8.0, qthres=0.04)
    [raw] = and_or_interactions_lp(v - 8.0, qthres=0.04, centre=False)
    assert centred.meta["params"]["centre"] and not raw.meta["params"]["centre"]
    assert raw.noise[0] == pytest.approx(raw.meta["b"])
    assert abs(centred.noise[0]) < raw.meta["b"] / 2
    assert len(centred.salient(0.05)) == 4 and len(raw.salient(0.05)) == 5


def test_zero_noise_bound_decomposes_v_itself():
    v = planted_game(5, {(0, 1): 1.0}, {(2, 3): 1.0}, noise=0.05, seed=4)
    [x] = and_or_interactions(v, qthres=0.0)
    assert np.abs(x.noise).max() < 1e-12


# --------------------------------------------------------------------------------------------
# Ground truth
# --------------------------------------------------------------------------------------------


def planted_items() -> dict:
    items = {("and", mask_of(s, 8)): c for s, c in PLANTED_AND.items()}
    items.update({("or", mask_of(s, 8)): c for s, c in PLANTED_OR.items()})
    return items


def assert_recovers_planted_terms(x, tau: float) -> None:
    found, planted = x.salient(tau), planted_items()
    assert set(found) == set(planted)
    b = x.meta["b"]
    for key, value in planted.items():
        assert np.sign(found[key]) == np.sign(value)
        # q may absorb up to b on every coalition, so a term can shrink by about b (seen: 1.8b)
        assert abs(found[key] - value) <= 2 * b


def test_admm_salient_set_is_exactly_the_planted_terms(planted):
    [x] = and_or_interactions(planted, qthres=0.04)
    assert_recovers_planted_terms(x, tau=0.05)


def test_exact_lp_salient_set_is_the_planted_terms_above_its_spurious_vertex_terms(planted_lp):
    # The LP optimum is not unique; HiGHS returns a vertex carrying two spurious terms smaller than
    # b (0.13 and 0.11 here, both above 0.05·max), so the planted terms are exactly the set at 0.1.
    b = noise_bound(planted_lp.v, 0.04)
    spurious = set(planted_lp.salient(0.05)) - set(planted_items())
    assert all(abs(planted_lp.salient(0.05)[k]) < b for k in spurious)
    assert_recovers_planted_terms(planted_lp, tau=0.1)


# --------------------------------------------------------------------------------------------
# The SGD protocol
# --------------------------------------------------------------------------------------------


def test_sgd_reference_follows_the_group_code_step_by_step():
    n = 4
    v = v0(planted_game(n, {(0, 1): 1.0, (2,): 0.3}, {(1, 3): -0.8}, noise=0.2, seed=7))
    b = noise_bound(v, 0.04)
    ref_and, ref_or, ref_q, ref_loss = group_sgd(v, n, b, lr=1e-2, niter=40)
    [x] = and_or_interactions_sgd(v, qthres=0.04, lr=1e-2, niter=40)
    assert x.meta["loss"] == pytest.approx(ref_loss, rel=1e-10)
    low = orders(n) <= 1
    merged_and = ref_and + np.where(low, ref_or, 0.0)
    np.testing.assert_allclose(x.and_values, merged_and, atol=1e-10)
    np.testing.assert_allclose(x.or_values, np.where(low, 0.0, ref_or), atol=1e-10)
    np.testing.assert_allclose(x.noise, ref_q, atol=1e-12)


# --------------------------------------------------------------------------------------------
# Joint sparsification of several models
# --------------------------------------------------------------------------------------------


def shared_term_games(n: int, models: int, samples: int) -> np.ndarray:
    """(K, B, 2^n): the same AND and OR term in every model, a model-specific AND term, noise 0.1."""
    return v0(np.stack([np.stack([planted_game(n, {(0, 1): 1.0, (1, 2): 0.4 * k}, {(2, 3): 0.8},
                                               noise=0.1, seed=10 * k + s) for s in range(samples)])
                        for k in range(models)]))


@pytest.mark.parametrize("models, pthres, alpha", [(2, 0.0, 0.1), (2, 0.05, 0.1), (2, math.inf, 0.1),
                                                   (3, 0.05, 0.1), (3, 0.05, 0.0), (2, 0.05, 1.0)])
def test_joint_loss_reaches_the_optimum_of_a_dense_lp_of_the_group_definition(models, pthres, alpha):
    n = 4
    games = shared_term_games(n, models, samples=2)
    results = joint_and_or_interactions(games, pthres=pthres, alpha=alpha, tol=1e-4, max_iter=20_000)
    mean = np.abs((games[:, :, -1] - games[:, :, 0]).mean(1))
    for s in range(2):
        b = 0.04 * np.abs(games[:, s, -1] - games[:, s, 0])
        optimum = joint_lp(games[:, s], n, b, np.minimum(pthres * mean, 1e6), alpha)
        meta = results[0][s].meta
        assert meta["converged"]
        assert optimum * (1 - 1e-9) <= meta["loss"] <= optimum * (1 + 1e-4)
        assert meta["lower_bound"] <= optimum * (1 + 1e-9)
        # merging orders 0 and 1 can only lower the loss (f is a norm)
        assert joint_loss([results[k][s] for k in range(models)], alpha) <= meta["loss"] * (1 + 1e-12)


def test_joint_coupling_of_the_split_binds_when_pthres_is_small():
    n = 4
    [games] = shared_term_games(n, 2, samples=1).transpose(1, 0, 2)
    b = 0.04 * np.abs(games[:, -1] - games[:, 0])
    free = joint_lp(games, n, b, np.full(2, 1e6), 0.1)
    coupled = joint_lp(games, n, b, np.zeros(2), 0.1)
    assert coupled > free * 1.02  # the premise: γ_1 = γ_2 costs something on these games
    [[x], _] = joint_and_or_interactions(games, pthres=0.0, tol=1e-4, max_iter=20_000)
    assert coupled * (1 - 1e-9) <= x.meta["loss"] <= coupled * (1 + 1e-4)


def test_joint_with_one_model_is_the_single_model_solution(planted):
    [[joint]] = joint_and_or_interactions(planted[None], tol=1e-3)
    [single] = and_or_interactions(planted, tol=1e-3)
    np.testing.assert_array_equal(joint.and_values, single.and_values)
    np.testing.assert_array_equal(joint.or_values, single.or_values)
    assert joint.meta["loss"] == single.meta["loss"]


def test_joint_split_of_a_shared_term_is_the_same_in_every_model():
    # Model 1 adds AND {0,1} to the shared OR {0,1}: for it alone, "AND {0} + AND {1}" and
    # "OR {0,1} + AND {0,1}" cost the same, so independent sparsification may drop the shared OR
    # term in one model only (it does here); the joint loss keeps it in both.
    n, shared = 6, mask_of((0, 1), 6)
    games = np.stack([planted_game(n, {(2, 3, 4): 1.0}, {(0, 1): 1.0}, noise=0.01, seed=0),
                      planted_game(n, {(2, 3, 4): 1.0, (0, 1): 1.0}, {(0, 1): 1.0}, noise=0.01, seed=1)])
    independent = [and_or_interactions(v)[0] for v in games]
    assert abs(independent[0].or_values[shared] - independent[1].or_values[shared]) > 0.5
    joint = [x for [x] in joint_and_or_interactions(games)]
    b = max(x.meta["b"] for x in joint)
    assert abs(joint[0].or_values[shared] - joint[1].or_values[shared]) <= 2 * b
    assert all(abs(x.or_values[shared] - 1.0) <= 0.2 for x in joint)
    assert all(("or", shared) in x.salient(0.05) for x in joint)
    assert ("and", shared) in joint[1].salient(0.05) and ("and", shared) not in joint[0].salient(0.05)


def test_joint_loss_is_below_the_joint_loss_of_the_independent_solutions():
    games = np.stack([planted_game(8, {**PLANTED_AND, (1, 5): 0.3 * k}, PLANTED_OR, noise=0.02, seed=k)
                      for k in range(3)])
    joint = [x for [x] in joint_and_or_interactions(games)]
    independent = [and_or_interactions(v)[0] for v in games]
    assert joint_loss(joint, 0.1) < 0.97 * joint_loss(independent, 0.1)
    planted = set(planted_items())
    assert all(planted <= set(x.salient(0.05)) for x in joint)


def test_joint_meta_records_the_bounds_per_model():
    games = shared_term_games(4, 2, samples=3)
    results = joint_and_or_interactions(games, pthres=0.5, mean_output=[2.0, -4.0], max_iter=50)
    assert [len(r) for r in results] == [3, 3]
    for k, per_model in enumerate(results):
        for s, x in enumerate(per_model):
            assert x.meta["model"] == k and x.meta["p"] == [1.0, 2.0][k]
            assert x.meta["b"] == pytest.approx(noise_bound(games[k, s], 0.04))
            assert x.meta["loss"] == results[0][s].meta["loss"]
            assert x.meta["params"]["mean_output"] == [2.0, -4.0]
    # the means as a tensor, as a study computes them from its models' outputs (here one that
    # still requires grad; on a GPU, one NumPy cannot read either): the same results
    means = torch.tensor([2.0, -4.0], requires_grad=True)
    again = joint_and_or_interactions(games, pthres=0.5, mean_output=means, max_iter=50)

    def solved(runs):  # the metadata but its time stamp, which may tick between the two solves
        return [[{k: v for k, v in x.meta.items() if k != "created"} for x in r] for r in runs]

    assert solved(again) == solved(results)


# --------------------------------------------------------------------------------------------
# Inputs, batches, metadata, errors
# --------------------------------------------------------------------------------------------


def test_a_torch_batch_gives_one_result_per_game_equal_to_single_solves():
    games = torch.tensor(np.stack([planted_game(5, {(0, 1): 1.0}, noise=0.1, seed=s) for s in range(3)]))
    batch = and_or_interactions_lp(games)
    assert len(batch) == 3
    for x, v in zip(batch, games, strict=True):
        [single] = and_or_interactions_lp(v.numpy())
        np.testing.assert_allclose(x.and_values, single.and_values, atol=1e-12)


def test_an_admm_decomposition_does_not_depend_on_the_other_games_of_the_call():
    # all samples ran until the last converged, so a sample's interactions (and its recorded
    # n_iter) changed with the samples beside it: explain and knowledge, --samples 8 and 20,
    # disagreed on one image
    games = np.stack([planted_game(6, {(0, 1): 1.0, (2, 3, 4): -0.7}, noise=0.2, seed=s)
                      for s in range(4)])
    together = and_or_interactions(games, tol=1e-3)
    alone = [and_or_interactions(g, tol=1e-3)[0] for g in games]
    assert len({x.meta["n_iter"] for x in alone}) > 1  # they converge at different iterations
    for x, y in zip(together, alone, strict=True):
        assert x.meta["n_iter"] == y.meta["n_iter"]
        np.testing.assert_allclose(x.and_values, y.and_values, atol=1e-9)
        np.testing.assert_allclose(x.or_values, y.or_values, atol=1e-9)


def test_meta_records_the_parameters_and_the_diagnostics(planted):
    [x] = and_or_interactions(planted, qthres=0.04, tol=0.05, max_iter=100)
    assert x.meta["producer"] == "pretrain_reuse.knowledge.and_or_interactions"
    assert x.meta["params"] == {"qthres": 0.04, "tol": 0.05, "max_iter": 100, "centre": True}
    assert x.meta["n_iter"] <= 100 and x.meta["lower_bound"] <= x.meta["objective"]
    assert x.meta["b"] == pytest.approx(noise_bound(planted, 0.04))


def test_hitting_max_iter_is_reported_as_not_converged(planted):
    [x] = and_or_interactions(planted, tol=1e-9, max_iter=30)
    assert x.meta["n_iter"] == 30 and not x.meta["converged"] and x.meta["gap"] > 1e-9


@pytest.mark.parametrize("call, message", [
    (lambda v: and_or_interactions(v, qthres=-0.1), "qthres=-0.1 must be a finite number >= 0"),
    (lambda v: and_or_interactions(v, tol=0.0), "tol=0.0 must be a relative duality gap"),
    (lambda v: and_interactions(v, qthres=0.1, max_iter=0), "max_iter=0 must be a positive"),
    (lambda v: and_or_interactions_sgd(v, lr=0.0), "lr=0.0 must be a positive learning rate"),
    (lambda v: and_or_interactions_sgd(v, niter=0), "niter=0 must be a positive number"),
    (lambda v: and_or_interactions(v[None, None]), r"v must be one game \(2\^n,\) or a batch"),
    (lambda v: joint_and_or_interactions(v), r"v must hold the games of K models, shape \(K, 2\^n\)"),
    (lambda v: joint_and_or_interactions(v[None], pthres=-1.0), "pthres=-1.0 must be a number >= 0"),
    (lambda v: joint_and_or_interactions(v[None], alpha=1.5), r"alpha=1.5 must be a weight in \[0, 1\]"),
    (lambda v: joint_and_or_interactions(np.stack([v, v]), mean_output=[1.0]),
     "mean_output must be 2 finite numbers, one per model"),
])
def test_bad_solver_arguments_are_refused_naming_the_parameter(call, message):
    with pytest.raises(PretrainReuseError, match=message):
        call(planted_game(3, {(0,): 1.0}))


def test_exact_lp_refuses_games_beyond_its_player_limit():
    with pytest.raises(PretrainReuseError, match=r"the exact LP takes n <= 12 players.*got n=13"):
        and_or_interactions_lp(np.zeros(1 << 13))


def test_an_explanation_warns_of_decompositions_stopped_before_their_tolerance():
    # meta.solver recorded it, but nothing said so: the salient sets of such a sample may differ
    # from the optimum's
    from pretrain_reuse.knowledge.explain import Games, with_games

    values = np.random.default_rng(0).standard_normal((3, 1 << 5))
    games = Games(values, [{"sample": str(i)} for i in range(3)], {})
    stopped = and_or_interactions(values, max_iter=1)
    assert not any(x.meta["converged"] for x in stopped)
    with pytest.warns(UserWarning, match=r"stopped before its tolerance on 3 of 3 samples "
                                         r"\(relative duality gap up to \d"):
        with_games(games, stopped)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with_games(games, and_or_interactions(values))
