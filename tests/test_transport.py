"""Tests of the entropic unbalanced OT solver and the cost matrices.

Every test compares with an independent reference: POT (``ot.unbalanced.sinkhorn_unbalanced``,
``ot.sinkhorn``), scipy's ``cdist``, a plain numpy log-domain Sinkhorn written below, brute-force
numpy evaluations of the primal and dual objectives, or the optimality conditions of the problem

    min_P <C,P> + eps KL(P || a⊗b) + tau_a KL(P1 || a) + tau_b KL(P^T 1 || b).
"""

from __future__ import annotations

import math
import subprocess
import sys
import warnings
import zlib
from itertools import pairwise

import numpy as np
import pytest
import torch
from scipy.spatial.distance import cdist
from scipy.special import logsumexp

from pretrain_reuse.errors import PretrainReuseError
from pretrain_reuse.transport import (
    MARGINAL_TOL,
    cost_matrix,
    unbalanced_sinkhorn,
    unbalanced_sinkhorn_batched,
)

ot = pytest.importorskip("ot")

TIGHT = dict(tol=1e-12, max_iter=100_000)


# --------------------------------------------------------------------------------------------
# Independent references
# --------------------------------------------------------------------------------------------


def gkl(x, y):
    """Generalised KL(x || y) = sum x log(x/y) - x + y, brute force (x > 0 everywhere here)."""
    x, y = np.asarray(x, float), np.asarray(y, float)
    return float(np.sum(x * np.log(x / y) - x + y))


def primal_objective(P, a, b, C, eps, tau_a, tau_b):
    """The four terms of the primal objective of a plan P, computed by brute force."""
    lin = float(np.sum(C * P))
    ent = eps * gkl(P, np.outer(a, b))
    kla = 0.0 if math.isinf(tau_a) else tau_a * gkl(P.sum(1), a)
    klb = 0.0 if math.isinf(tau_b) else tau_b * gkl(P.sum(0), b)
    return lin + ent, kla, klb


def dual_objective(f, g, a, b, C, eps, tau_a, tau_b):
    """Dual of the UOT problem (Chizat et al. 2018); equals the primal at the optimum."""
    return (
        -tau_a * np.sum(a * np.expm1(-f / tau_a))
        - tau_b * np.sum(b * np.expm1(-g / tau_b))
        - eps * np.sum(np.outer(a, b) * np.expm1((f[:, None] + g[None, :] - C) / eps))
    )


def reference_log_sinkhorn(a, b, C, eps, tau_a, tau_b, tol=1e-13, max_iter=100_000):
    """Plain (unaccelerated, unstabilised-kernel-free) log-domain generalised Sinkhorn in numpy.

    Returns the potentials and the log row mass. Works for any cost since only logsumexp is used.
    """
    la, lb = np.log(a), np.log(b)
    lam_a, lam_b = tau_a / (tau_a + eps), tau_b / (tau_b + eps)
    f, g = np.zeros(len(a)), np.zeros(len(b))
    for _ in range(max_iter):
        f_new = -lam_a * eps * logsumexp(lb[None, :] + (g[None, :] - C) / eps, axis=1)
        g_new = -lam_b * eps * logsumexp(la[:, None] + (f_new[:, None] - C) / eps, axis=0)
        delta = max(np.abs(f_new - f).max(), np.abs(g_new - g).max()) / eps
        f, g = f_new, g_new
        if delta < tol:
            break
    else:  # pragma: no cover - the reference itself must converge
        raise AssertionError("reference Sinkhorn did not converge")
    log_row = la + f / eps + logsumexp(lb[None, :] + (g[None, :] - C) / eps, axis=1)
    return f, g, log_row


def pot_plan(a, b, C, eps, tau_a, tau_b):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the reference must not hit POT's numerical errors
        return ot.unbalanced.sinkhorn_unbalanced(
            a, b, C, reg=eps, reg_m=(tau_a, tau_b), stopThr=1e-12, numItermax=100000
        )


def clustered_features(rng, n, m, dim, n_centres, n_target_centres, noise=0.3):
    centres = rng.standard_normal((n_centres, dim))
    src = centres[rng.integers(0, n_centres, n)] + noise * rng.standard_normal((n, dim))
    chosen = rng.choice(n_centres, n_target_centres, replace=False)
    tgt = centres[chosen[rng.integers(0, n_target_centres, m)]] + noise * rng.standard_normal((m, dim))
    return src, tgt


def top_k(x, k):
    return set(np.argsort(-np.asarray(x), kind="stable")[:k].tolist())


def random_problem(seed, n, m, unit_weights, low=0.0, high=5.0):
    rng = np.random.default_rng(seed)
    C = rng.uniform(low, high, (n, m))
    if unit_weights:
        a, b = np.ones(n), np.ones(m)
    else:
        a, b = rng.uniform(0.2, 2.0, n), rng.uniform(0.2, 2.0, m)
    return a, b, C


# --------------------------------------------------------------------------------------------
# Agreement with POT
# --------------------------------------------------------------------------------------------

SHAPES = [(40, 60), (200, 30), (500, 60)]  # n < m and n > m
TAUS = [(1.0, 100.0), (0.5, 5.0), (10.0, 1.0)]
EPSS = [0.5, 1.0, 2.0]


@pytest.mark.parametrize("unit_weights", [True, False], ids=["unit", "random"])
@pytest.mark.parametrize("eps", EPSS)
@pytest.mark.parametrize("taus", TAUS, ids=lambda t: f"tau{t[0]:g}-{t[1]:g}")
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_row_mass_and_plan_match_pot_to_1e6_in_float64(shape, taus, eps, unit_weights):
    n, m = shape
    tau_a, tau_b = taus
    seed = zlib.crc32(repr((shape, taus, eps, unit_weights)).encode())
    a, b, C = random_problem(seed, n, m, unit_weights)
    P = pot_plan(a, b, C, eps, tau_a, tau_b)

    res = unbalanced_sinkhorn(a, b, C, eps, tau_a, tau_b, **TIGHT)
    assert res.converged
    assert res.log_row_mass.shape == (n,) and res.log_col_mass.shape == (m,)
    assert res.f.dtype == np.float64

    row_ref = P.sum(1)
    assert np.max(np.abs(np.exp(res.log_row_mass) - row_ref) / row_ref) <= 1e-6
    col_ref = P.sum(0)
    assert np.max(np.abs(np.exp(res.log_col_mass) - col_ref) / col_ref) <= 1e-6
    Q = res.plan(a, b, C)
    assert Q.shape == (n, m)
    assert np.max(np.abs(Q - P) / P) <= 1e-6
    # the log plan is the log of the plan
    np.testing.assert_allclose(res.log_plan(a, b, C), np.log(P), rtol=0, atol=1e-6)


@pytest.mark.parametrize("taus", [(math.inf, 5.0), (1.0, math.inf)], ids=["inf-5", "1-inf"])
def test_semi_relaxed_problems_match_pot_and_enforce_the_hard_marginal(taus):
    tau_a, tau_b = taus
    a, b, C = random_problem(4, 80, 30, unit_weights=False, high=4.0)
    eps = 0.5
    P = pot_plan(a, b, C, eps, tau_a, tau_b)
    res = unbalanced_sinkhorn(a, b, C, eps, tau_a, tau_b, **TIGHT)
    assert res.converged
    Q = res.plan(a, b, C)
    assert np.max(np.abs(Q - P) / P) <= 1e-9
    if math.isinf(tau_a):
        np.testing.assert_allclose(Q.sum(1), a, rtol=1e-10)
        assert res.kl_a == 0.0 and res.kl_b > 1.0
    else:
        np.testing.assert_allclose(Q.sum(0), b, rtol=1e-10)
        assert res.kl_b == 0.0 and res.kl_a > 1.0
    ent, kla, klb = primal_objective(P, a, b, C, eps, tau_a, tau_b)
    assert res.objective == pytest.approx(ent + kla + klb, rel=1e-9)


def test_default_tolerance_is_close_to_pot():
    a, b, C = random_problem(11, 200, 30, unit_weights=True)
    P = pot_plan(a, b, C, 1.0, 1.0, 100.0)
    res = unbalanced_sinkhorn(a, b, C)  # paper defaults eps=1, tau_a=1, tau_b=100, tol=1e-6
    assert res.converged and res.n_iter < 100
    assert np.max(np.abs(np.exp(res.log_row_mass) - P.sum(1)) / P.sum(1)) <= 1e-5


@pytest.mark.parametrize("shape, seed", [((300, 40), 31), ((60, 200), 32)], ids=["300x40", "60x200"])
def test_large_equal_taus_converge_in_few_iterations_and_match_pot(shape, seed):
    # With tau_a = tau_b = 100 >> eps, Sinkhorn steps remove a common shift (f + t, g - t) only at
    # the rate (tau/(tau+eps))^2 ~ 0.99: POT needs thousands of iterations. The closed-form
    # translation step removes it at once.
    a, b, C = random_problem(seed, *shape, unit_weights=False)
    P, log = ot.unbalanced.sinkhorn_unbalanced(
        a, b, C, reg=0.5, reg_m=100.0, stopThr=1e-12, numItermax=100_000, log=True
    )
    res = unbalanced_sinkhorn(a, b, C, 0.5, 100.0, 100.0, **TIGHT)
    assert res.converged and res.n_iter < 60 < len(log["err"]) / 40
    assert np.max(np.abs(res.plan(a, b, C) - P) / P) <= 1e-9
    default = unbalanced_sinkhorn(a, b, C, 0.5, 100.0, 100.0)
    assert default.converged and default.n_iter < 30
    assert np.max(np.abs(np.exp(default.log_row_mass) - P.sum(1)) / P.sum(1)) <= 1e-6


# --------------------------------------------------------------------------------------------
# Objective, optimality conditions, duality
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("taus", TAUS, ids=lambda t: f"tau{t[0]:g}-{t[1]:g}")
@pytest.mark.parametrize("eps", [0.5, 1.5])
def test_objective_terms_equal_brute_force_evaluation_on_pot_plan(taus, eps):
    tau_a, tau_b = taus
    a, b, C = random_problem(5, 150, 40, unit_weights=False)
    P = pot_plan(a, b, C, eps, tau_a, tau_b)
    ent, kla, klb = primal_objective(P, a, b, C, eps, tau_a, tau_b)

    res = unbalanced_sinkhorn(a, b, C, eps, tau_a, tau_b, **TIGHT)
    assert isinstance(res.objective, float)
    assert res.entropic_cost == pytest.approx(ent, rel=1e-8)
    assert res.kl_a == pytest.approx(kla, rel=1e-8)
    assert res.kl_b == pytest.approx(klb, rel=1e-7, abs=1e-9)
    assert res.objective == pytest.approx(ent + kla + klb, rel=1e-8)
    assert res.objective == pytest.approx(res.entropic_cost + res.kl_a + res.kl_b, rel=1e-14)
    # and on our own plan, brute force again
    ent2, kla2, klb2 = primal_objective(res.plan(a, b, C), a, b, C, eps, tau_a, tau_b)
    assert res.objective == pytest.approx(ent2 + kla2 + klb2, rel=1e-10)


@pytest.mark.parametrize("taus", TAUS, ids=lambda t: f"tau{t[0]:g}-{t[1]:g}")
def test_primal_objective_equals_dual_objective_at_solution(taus):
    # strong duality: a plan and potentials with zero duality gap are both optimal
    tau_a, tau_b = taus
    a, b, C = random_problem(6, 120, 45, unit_weights=False, high=3.0)
    eps = 0.7
    res = unbalanced_sinkhorn(a, b, C, eps, tau_a, tau_b, **TIGHT)
    dual = dual_objective(res.f, res.g, a, b, C, eps, tau_a, tau_b)
    assert res.objective == pytest.approx(dual, rel=1e-10)
    # a perturbed plan is strictly worse than the solution
    P = res.plan(a, b, C)
    worse = sum(primal_objective(P * 1.05, a, b, C, eps, tau_a, tau_b))
    assert worse > res.objective + 1e-6 * abs(res.objective)


@pytest.mark.parametrize("taus", TAUS, ids=lambda t: f"tau{t[0]:g}-{t[1]:g}")
def test_marginals_satisfy_fixed_point_conditions(taus):
    tau_a, tau_b = taus
    a, b, C = random_problem(7, 90, 35, unit_weights=False)
    eps = 0.8
    res = unbalanced_sinkhorn(a, b, C, eps, tau_a, tau_b, **TIGHT)
    P = res.plan(a, b, C)
    # P1 = a exp(-f/tau_a), P^T1 = b exp(-g/tau_b), recomputed from the plan
    np.testing.assert_allclose(P.sum(1), a * np.exp(-res.f / tau_a), rtol=1e-10)
    np.testing.assert_allclose(P.sum(0), b * np.exp(-res.g / tau_b), rtol=1e-10)
    err_a = np.max(np.abs(np.log(P.sum(1)) - np.log(a) + res.f / tau_a))
    err_b = np.max(np.abs(np.log(P.sum(0)) - np.log(b) + res.g / tau_b))
    assert res.marginal_error_a < 1e-10 and res.marginal_error_b < 1e-10
    assert res.marginal_error_a == pytest.approx(err_a, abs=1e-12)
    assert res.marginal_error_b == pytest.approx(err_b, abs=1e-12)
    # the reported log marginals are those of the plan
    np.testing.assert_allclose(res.log_row_mass, np.log(P.sum(1)), rtol=0, atol=1e-12)
    np.testing.assert_allclose(res.log_col_mass, np.log(P.sum(0)), rtol=0, atol=1e-12)


def test_marginal_error_is_large_when_stopped_early():
    a, b, C = random_problem(8, 90, 35, unit_weights=True)
    late = unbalanced_sinkhorn(a, b, C, 0.2, 1.0, 100.0, **TIGHT)
    assert late.marginal_error_a < 1e-10 and late.marginal_error_b < 1e-10
    # Stopped early, both conditions are violated (even after one plain step, whose g satisfies
    # the column condition, the translation step moves f and g), and the reported errors are
    # those of the plan.
    for max_iter in (1, 5):
        early = unbalanced_sinkhorn(a, b, C, 0.2, 1.0, 100.0, max_iter=max_iter)
        assert not early.converged
        P = early.plan(a, b, C)
        err_a = np.max(np.abs(np.log(P.sum(1)) - np.log(a) + early.f / 1.0))
        err_b = np.max(np.abs(np.log(P.sum(0)) - np.log(b) + early.g / 100.0))
        assert err_a > 1e-2 and err_b > 1e-3
        assert early.marginal_error_a == pytest.approx(err_a, rel=1e-10)
        assert early.marginal_error_b == pytest.approx(err_b, rel=1e-10)


def test_liu_ranking_by_row_mass_equals_ranking_by_minus_f_with_unit_source_weights():
    a, b, C = random_problem(9, 400, 50, unit_weights=False)
    a = np.ones_like(a)
    res = unbalanced_sinkhorn(a, b, C, 1.0, 1.0, 100.0, **TIGHT)
    # log P1 = log a - f / tau_a, so with a = 1 both orders agree exactly
    np.testing.assert_allclose(res.log_row_mass, -res.f / 1.0, rtol=0, atol=1e-10)
    sorted_f = np.sort(res.f)
    assert np.min(np.diff(sorted_f)) > 1e-9  # no near-ties: argsort equality is meaningful
    assert np.array_equal(np.argsort(-res.log_row_mass), np.argsort(res.f))


# --------------------------------------------------------------------------------------------
# Balanced limit
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("eps", [0.05, 0.1, 0.5])
def test_infinite_taus_give_exact_marginals_and_match_pot_balanced_sinkhorn(eps):
    rng = np.random.default_rng(12)
    n, m = 120, 45
    C = rng.uniform(0, 3, (n, m))
    a = rng.uniform(0.5, 2, n)
    b = rng.uniform(0.5, 2, m)
    a, b = a / a.sum(), b / b.sum()
    P = ot.sinkhorn(a, b, C, eps, stopThr=1e-13, numItermax=1_000_000)

    res = unbalanced_sinkhorn(a, b, C, eps, math.inf, math.inf, **TIGHT)
    assert res.converged
    Q = res.plan(a, b, C)
    np.testing.assert_allclose(Q.sum(1), a, rtol=1e-9)
    np.testing.assert_allclose(Q.sum(0), b, rtol=1e-9)
    assert np.max(np.abs(Q - P)) <= 1e-9 * np.max(P)
    assert res.kl_a == 0.0 and res.kl_b == 0.0
    assert res.marginal_error_a < 1e-10 and res.marginal_error_b < 1e-10
    # entropic_cost = <C,P> + eps KL(P || a⊗b) by brute force
    ent, _, _ = primal_objective(P, a, b, C, eps, math.inf, math.inf)
    assert res.entropic_cost == pytest.approx(ent, rel=1e-8)


def test_infinite_taus_with_unequal_masses_raise():
    a, b, C = random_problem(13, 20, 10, unit_weights=True)  # masses 20 and 10
    with pytest.raises(PretrainReuseError, match=r"sum\(a\) == sum\(b\)"):
        unbalanced_sinkhorn(a, b, C, 1.0, math.inf, math.inf)


def test_large_finite_taus_approach_the_balanced_plan():
    rng = np.random.default_rng(14)
    C = rng.uniform(0, 2, (60, 30))
    a, b = np.full(60, 1 / 60), np.full(30, 1 / 30)
    balanced = unbalanced_sinkhorn(a, b, C, 0.5, math.inf, math.inf, **TIGHT).plan(a, b, C)
    errs = []
    for tau in [1.0, 10.0, 100.0]:
        plan = unbalanced_sinkhorn(a, b, C, 0.5, tau, tau, tol=1e-10, max_iter=10_000).plan(a, b, C)
        errs.append(np.abs(plan - balanced).sum())
    assert all(x > 5 * y for x, y in pairwise(errs)), errs
    assert errs[-1] < 1e-2


# --------------------------------------------------------------------------------------------
# Numerical robustness where POT's scaling iterations fail
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def hard_cosine_problem():
    """Liu et al.'s cost with eps_c = 0.001: costs up to 2000, exp(-C) underflows in float64."""
    rng = np.random.default_rng(0)
    src, tgt = clustered_features(rng, 1000, 50, 64, n_centres=100, n_target_centres=10)
    C = cost_matrix(src, tgt, metric="cosine", eps_c=0.001)
    return np.ones(1000), np.ones(50), C


def test_pot_scaling_iterations_break_down_on_large_cosine_costs(hard_cosine_problem):
    a, b, C = hard_cosine_problem
    assert C.max() > 1000 and C.min(axis=1).max() > 745  # some rows underflow exp() entirely
    with pytest.warns(UserWarning, match="Numerical errors"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # numpy's divide-by-zero
        P = ot.unbalanced.sinkhorn_unbalanced(
            a, b, C, reg=1.0, reg_m=(1.0, 100.0), stopThr=1e-12, numItermax=100000
        )
    # POT gives up at iteration 0 and returns the unscaled kernel: many rows carry no mass at all
    assert np.sum(P.sum(1) == 0) > 100
    assert P.sum() < 1e-10


def test_float32_log_domain_solver_handles_costs_up_to_2000(hard_cosine_problem):
    a, b, C = hard_cosine_problem
    res64 = unbalanced_sinkhorn(a, b, C, 1.0, 1.0, 100.0, **TIGHT)
    res32 = unbalanced_sinkhorn(a, b, C, 1.0, 1.0, 100.0, dtype=torch.float32)
    assert res32.f.dtype == np.float32
    for field in ("f", "g", "log_row_mass", "log_col_mass"):
        assert np.isfinite(getattr(res32, field)).all(), field
    assert np.isfinite(res32.objective)
    assert res32.converged and res64.converged
    # float64 against the plain numpy log-domain reference
    f_ref, g_ref, row_ref = reference_log_sinkhorn(a, b, C, 1.0, 1.0, 100.0)
    np.testing.assert_allclose(res64.log_row_mass, row_ref, rtol=0, atol=1e-9)
    np.testing.assert_allclose(res64.g, g_ref, rtol=0, atol=1e-9)
    np.testing.assert_allclose(res64.f, f_ref, rtol=0, atol=1e-9)
    # the scores span hundreds of nats: rows whose mass underflows in any linear-domain solver
    assert row_ref.max() - row_ref.min() > 200
    # float32 within its rounding error, and the same top-100 selection
    err32 = np.max(np.abs(res32.log_row_mass - row_ref))
    assert err32 < 1e-3
    gap = np.diff(np.sort(row_ref)[::-1][99:101])[0]
    assert -gap > 10 * err32  # the top-100 boundary is well separated: the comparison is meaningful
    assert top_k(res32.log_row_mass, 100) == top_k(res64.log_row_mass, 100) == top_k(row_ref, 100)
    # float32 cost input gives float32 output and the same selection
    res32in = unbalanced_sinkhorn(a, b, C.astype(np.float32), 1.0, 1.0, 100.0)
    assert res32in.f.dtype == np.float32 and res32in.converged
    assert top_k(res32in.log_row_mass, 100) == top_k(row_ref, 100)


def test_small_eps_with_large_costs_matches_log_domain_reference_where_pot_fails():
    rng = np.random.default_rng(15)
    n, m, eps = 200, 40, 0.05
    C = rng.uniform(40.0, 100.0, (n, m))  # C/eps in [800, 2000]: exp(-C/eps) == 0 in float64
    a, b = rng.uniform(0.5, 2, n), rng.uniform(0.5, 2, m)
    with pytest.warns(UserWarning, match="Numerical errors"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        P = ot.unbalanced.sinkhorn_unbalanced(
            a, b, C, reg=eps, reg_m=(1.0, 100.0), stopThr=1e-12, numItermax=100000
        )
    assert P.sum() == 0.0

    f_ref, g_ref, row_ref = reference_log_sinkhorn(a, b, C, eps, 1.0, 100.0)
    res64 = unbalanced_sinkhorn(a, b, C, eps, 1.0, 100.0, **TIGHT)
    assert res64.converged
    np.testing.assert_allclose(res64.f, f_ref, rtol=0, atol=1e-8)
    np.testing.assert_allclose(res64.log_row_mass, row_ref, rtol=0, atol=1e-9)
    np.testing.assert_allclose(res64.g, g_ref, rtol=0, atol=1e-8)
    dual = dual_objective(res64.f, res64.g, a, b, C, eps, 1.0, 100.0)
    assert res64.objective == pytest.approx(dual, rel=1e-9)

    res32 = unbalanced_sinkhorn(a, b, C, eps, 1.0, 100.0, dtype=torch.float32, max_iter=100_000)
    assert res32.converged
    assert np.isfinite(res32.log_row_mass).all() and np.isfinite(res32.log_col_mass).all()
    np.testing.assert_allclose(res32.log_row_mass, row_ref, rtol=0, atol=1e-3)
    np.testing.assert_allclose(res32.f, f_ref, rtol=0, atol=2e-3)


@pytest.mark.parametrize(
    "eps_c, dtype, atol",
    [(0.01, torch.float32, 1e-3), (0.001, torch.float32, 2e-3), (0.001, torch.float64, 1e-9)],
)
def test_target_unit_far_from_every_source_keeps_finite_potential(eps_c, dtype, atol):
    # Two target units point away from all sources: their kernel column exp(-C/eps), relative to
    # each row's best match, is below e^-160 (e^-1600 for eps_c = 0.001) and underflows; the
    # column sums must not become log(0).
    rng = np.random.default_rng(30)
    centre = rng.standard_normal(32)
    src = centre + 0.5 * rng.standard_normal((300, 32))
    tgt = np.vstack([centre + 0.5 * rng.standard_normal((20, 32)),
                     -centre + 0.1 * rng.standard_normal((2, 32))])
    C = cost_matrix(src, tgt, eps_c=eps_c)
    gap = (C[:, 20:].min(1) - C[:, :20].min(1)).min()
    assert gap > (100 if dtype == torch.float32 else 800)
    a, b = np.ones(300), np.ones(22)
    f_ref, g_ref, row_ref = reference_log_sinkhorn(a, b, C, 1.0, 1.0, 100.0)
    kw = TIGHT if dtype == torch.float64 else {}
    res = unbalanced_sinkhorn(a, b, C, 1.0, 1.0, 100.0, dtype=dtype, **kw)
    assert res.converged
    assert np.isfinite(res.g).all() and np.isfinite(res.log_col_mass).all()
    np.testing.assert_allclose(res.g, g_ref, rtol=1e-6, atol=atol)
    np.testing.assert_allclose(res.f, f_ref, rtol=1e-6, atol=atol)
    np.testing.assert_allclose(res.log_row_mass, row_ref, rtol=0, atol=atol)
    # the outlying target units still receive mass near b = 1 (strong tau_b), not zero
    assert np.all(res.log_col_mass[20:] > -20)


def test_cached_kernel_follows_a_common_shift_without_a_rebuild_and_rebuilds_on_spread():
    # The stabilised kernel is exact for any h whose drift from the build point h0 stays within
    # `drift` of a constant: a common shift (what the translation step adds) needs no rebuild.
    from pretrain_reuse.transport import _RowLSE

    rng = np.random.default_rng(31)
    C = 100.0 * rng.random((1, 200, 30))
    lse = _RowLSE(torch.tensor(C, dtype=torch.float32), 1.0, torch.float32)
    h = rng.standard_normal((1, 30))

    def exact(h):
        return logsumexp(h[:, None, :] - C, axis=2)

    lse(torch.tensor(h, dtype=torch.float32))
    built_at = lse.h0.clone()
    for shift in (500.0, -2000.0):
        out = lse(torch.tensor(h + shift, dtype=torch.float32)).numpy()
        assert torch.equal(lse.h0, built_at)  # no rebuild
        np.testing.assert_allclose(out, exact(h + shift), rtol=1e-6)
    spread = h + np.linspace(0.0, 2 * lse.drift + 1.0, 30)
    out = lse(torch.tensor(spread, dtype=torch.float32)).numpy()
    assert not torch.equal(lse.h0, built_at)  # rebuilt around the spread potentials
    np.testing.assert_allclose(out, exact(spread), rtol=1e-6)


# --------------------------------------------------------------------------------------------
# torch inputs
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype, atol", [(torch.float64, 1e-10), (torch.float32, 1e-4)])
def test_torch_inputs_give_torch_outputs_with_numpy_numbers(dtype, atol):
    a, b, C = random_problem(16, 150, 40, unit_weights=False)
    ref = unbalanced_sinkhorn(a, b, C, 1.0, 1.0, 100.0, **TIGHT)
    at, bt, Ct = (torch.tensor(x, dtype=dtype) for x in (a, b, C))
    res = unbalanced_sinkhorn(at, bt, Ct, 1.0, 1.0, 100.0, tol=1e-12)
    assert res.converged
    for field in ("f", "g", "log_row_mass", "log_col_mass"):
        value = getattr(res, field)
        assert isinstance(value, torch.Tensor) and value.dtype == dtype, field
        np.testing.assert_allclose(value.numpy(), getattr(ref, field), rtol=1e-5, atol=atol)
    plan = res.plan(at, bt, Ct)
    assert isinstance(plan, torch.Tensor) and plan.shape == (150, 40)
    np.testing.assert_allclose(plan.numpy(), ref.plan(a, b, C), rtol=1e-4, atol=0)
    assert res.objective == pytest.approx(ref.objective, rel=1e-5)


def test_torch_cost_matrix_returns_torch_in_source_dtype():
    rng = np.random.default_rng(17)
    s, t = rng.standard_normal((30, 8)), rng.standard_normal((20, 8))
    ref = cost_matrix(s, t, eps_c=0.1)
    out = cost_matrix(torch.tensor(s, dtype=torch.float32), torch.tensor(t), eps_c=0.1)
    assert isinstance(out, torch.Tensor) and out.dtype == torch.float32
    np.testing.assert_allclose(out.numpy(), ref, rtol=1e-5, atol=1e-4)


# --------------------------------------------------------------------------------------------
# Batched form
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("as_torch", [False, True], ids=["numpy", "torch"])
def test_batched_with_padded_targets_equals_separate_solves(as_torch):
    rng = np.random.default_rng(18)
    n, sizes = 150, [45, 30, 12]
    m = max(sizes)
    a = rng.uniform(0.5, 2, n)
    costs, bs = np.zeros((3, n, m)), np.zeros((3, m))
    for k, size in enumerate(sizes):
        costs[k, :, :size] = rng.uniform(0, 4, (n, size))
        # padded columns get zero cost, the most attractive value: they must still get no mass
        costs[k, :, size:] = 0.0
        bs[k, :size] = rng.uniform(0.5, 2, size)
    inputs = (a, bs, costs)
    if as_torch:
        inputs = tuple(torch.from_numpy(x) for x in inputs)
    res = unbalanced_sinkhorn_batched(*inputs, 1.0, 1.0, 100.0, tol=1e-12, max_iter=10_000)

    def np_(x):
        return x.numpy() if isinstance(x, torch.Tensor) else np.asarray(x)

    assert np_(res.f).shape == (3, n) and np_(res.g).shape == (3, m)
    assert np_(res.converged).shape == (3,) and np_(res.converged).all()
    for k, size in enumerate(sizes):
        single = unbalanced_sinkhorn(a, bs[k, :size], costs[k, :, :size], 1.0, 1.0, 100.0, **TIGHT)
        np.testing.assert_allclose(np_(res.f)[k], single.f, rtol=0, atol=1e-10)
        np.testing.assert_allclose(np_(res.g)[k, :size], single.g, rtol=0, atol=1e-10)
        np.testing.assert_allclose(np_(res.log_row_mass)[k], single.log_row_mass, rtol=0, atol=1e-10)
        np.testing.assert_allclose(
            np_(res.log_col_mass)[k, :size], single.log_col_mass, rtol=0, atol=1e-10
        )
        assert np.all(np.isneginf(np_(res.log_col_mass)[k, size:]))
        assert np.all(np_(res.g)[k, size:] == 0.0)
        assert np_(res.objective)[k] == pytest.approx(single.objective, rel=1e-10)
        assert np_(res.kl_b)[k] == pytest.approx(single.kl_b, rel=1e-8, abs=1e-10)
        assert np_(res.marginal_error_b)[k] < 1e-9
        # the plan restricted to the valid columns matches POT on the unpadded problem
        P = pot_plan(a, bs[k, :size], costs[k, :, :size], 1.0, 1.0, 100.0)
        np.testing.assert_allclose(np.exp(np_(res.log_row_mass)[k]), P.sum(1), rtol=1e-8)
    # the batched plan is the stack of the single plans, zero on padded columns
    plans = np_(res.plan(*inputs))
    assert plans.shape == (3, n, m)
    for k, size in enumerate(sizes):
        single = unbalanced_sinkhorn(a, bs[k, :size], costs[k, :, :size], 1.0, 1.0, 100.0, **TIGHT)
        np.testing.assert_allclose(plans[k, :, :size], single.plan(a, bs[k, :size], costs[k, :, :size]),
                                   rtol=1e-9)
        assert np.all(plans[k, :, size:] == 0.0)


def test_batched_problems_stop_where_their_separate_solves_stop():
    # at the default tolerance the three problems need different iteration counts; each keeps
    # the potentials of its own last iteration, so the batch equals the separate solves exactly
    rng = np.random.default_rng(33)
    n, sizes, highs = 120, [40, 25, 10], [1.0, 4.0, 12.0]
    m = max(sizes)
    a = rng.uniform(0.5, 2, n)
    costs, bs = np.zeros((3, n, m)), np.zeros((3, m))
    for k, (size, high) in enumerate(zip(sizes, highs, strict=True)):
        costs[k, :, :size] = rng.uniform(0, high, (n, size))
        bs[k, :size] = rng.uniform(0.5, 2, size)
    res = unbalanced_sinkhorn_batched(a, bs, costs, 0.5, 1.0, 100.0)
    singles = [unbalanced_sinkhorn(a, bs[k, :size], costs[k, :, :size], 0.5, 1.0, 100.0)
               for k, size in enumerate(sizes)]
    # each problem counts its own iterations, as its separate solve does
    assert len({s.n_iter for s in singles}) == 3
    assert res.n_iter.tolist() == [s.n_iter for s in singles]
    assert res.converged.all()
    for k, (size, single) in enumerate(zip(sizes, singles, strict=True)):
        np.testing.assert_allclose(res.f[k], single.f, rtol=0, atol=1e-12)
        np.testing.assert_allclose(res.g[k, :size], single.g, rtol=0, atol=1e-12)
        np.testing.assert_allclose(res.log_row_mass[k], single.log_row_mass, rtol=0, atol=1e-12)
        np.testing.assert_allclose(res.log_col_mass[k, :size], single.log_col_mass, rtol=0, atol=1e-12)
        assert res.objective[k] == pytest.approx(single.objective, rel=1e-13)


def test_batched_rejects_a_problem_with_only_padding():
    a = np.ones(5)
    b = np.array([[1.0, 1.0], [0.0, 0.0]])
    with pytest.raises(PretrainReuseError, match="b must hold"):
        unbalanced_sinkhorn_batched(a, b, np.ones((2, 5, 2)))


def test_batched_rejects_unbatched_shapes():
    with pytest.raises(PretrainReuseError, match=r"b \(B, m\) and cost \(B, n, m\)"):
        unbalanced_sinkhorn_batched(np.ones(5), np.ones(2), np.ones((5, 2)))


# --------------------------------------------------------------------------------------------
# Convergence reporting
# --------------------------------------------------------------------------------------------


def test_converged_is_false_when_max_iter_is_too_small_and_n_iter_is_reported():
    a, b, C = random_problem(19, 200, 40, unit_weights=True)
    short = unbalanced_sinkhorn(a, b, C, 0.5, 1.0, 100.0, max_iter=2)
    assert short.converged is False and short.n_iter == 2
    full = unbalanced_sinkhorn(a, b, C, 0.5, 1.0, 100.0)
    assert full.converged is True and 2 < full.n_iter < 1000
    # n_iter is the first iteration that meets the tolerance
    one_less = unbalanced_sinkhorn(a, b, C, 0.5, 1.0, 100.0, max_iter=full.n_iter - 1)
    assert one_less.converged is False and one_less.n_iter == full.n_iter - 1
    # a tighter tolerance needs more iterations and gets closer to POT
    tight = unbalanced_sinkhorn(a, b, C, 0.5, 1.0, 100.0, **TIGHT)
    assert tight.n_iter > full.n_iter
    P = pot_plan(a, b, C, 0.5, 1.0, 100.0)
    err = [np.max(np.abs(np.exp(r.log_row_mass) - P.sum(1)) / P.sum(1)) for r in (short, tight)]
    assert err[0] > 1e-3 and err[1] < 1e-10


# --------------------------------------------------------------------------------------------
# Behaviour of the relaxation
# --------------------------------------------------------------------------------------------


def test_total_transported_mass_shrinks_as_tau_a_decreases():
    a, b, C = random_problem(20, 120, 45, unit_weights=True, high=3.0)
    masses = []
    for tau_a in [100.0, 10.0, 1.0, 0.1]:
        res = unbalanced_sinkhorn(a, b, C, 1.0, tau_a, 100.0, **TIGHT)
        mass_rows = np.exp(res.log_row_mass).sum()
        assert mass_rows == pytest.approx(np.exp(res.log_col_mass).sum(), rel=1e-10)
        assert mass_rows == pytest.approx(res.plan(a, b, C).sum(), rel=1e-10)
        masses.append(mass_rows)
    assert all(x > y for x, y in pairwise(masses)), masses
    # source mass is 120, target mass 45: the strong target side pins the plan near 45 units
    assert masses[0] > 60 and 40 < masses[-1] < 50


def test_row_mass_deviation_from_source_weights_decays_like_one_over_tau():
    a, b, C = random_problem(21, 60, 60, unit_weights=False, high=2.0)
    b = b * a.sum() / b.sum()
    dev = []
    for tau in [10.0, 100.0, 1000.0]:
        res = unbalanced_sinkhorn(a, b, C, 1.0, tau, tau, tol=1e-9, max_iter=100_000)
        assert res.converged
        dev.append(np.max(np.abs(np.exp(res.log_row_mass) / a - 1.0)))
    assert dev[1] / dev[2] == pytest.approx(10.0, rel=0.05)
    assert dev[0] / dev[1] == pytest.approx(10.0, rel=0.2)
    assert dev[2] < 5e-3


# --------------------------------------------------------------------------------------------
# cost_matrix
# --------------------------------------------------------------------------------------------


def test_cosine_cost_is_one_minus_cosine_over_eps_c_and_in_range():
    rng = np.random.default_rng(22)
    s = rng.standard_normal((40, 16))
    t = np.vstack([s[:3], -s[3:6], 2.5 * s[6:8], rng.standard_normal((20, 16))])
    eps_c = 0.01
    C = cost_matrix(s, t, metric="cosine", eps_c=eps_c)
    sn = s / np.linalg.norm(s, axis=1, keepdims=True)
    tn = t / np.linalg.norm(t, axis=1, keepdims=True)
    expected = (1.0 - sn @ tn.T) / eps_c
    assert C.shape == (40, 28) and C.dtype == np.float64
    np.testing.assert_allclose(C, expected, rtol=0, atol=1e-10)
    assert C.min() >= 0.0 and C.max() <= 2.0 / eps_c
    # identical directions cost 0, opposite directions 2/eps_c, scale does not matter
    np.testing.assert_allclose(C[[0, 1, 2], [0, 1, 2]], 0.0, atol=1e-10)
    np.testing.assert_allclose(C[[3, 4, 5], [3, 4, 5]], 2.0 / eps_c, rtol=1e-12)
    np.testing.assert_allclose(C[[6, 7], [6, 7]], 0.0, atol=1e-10)
    # the default metric is cosine with eps_c = 0.01
    np.testing.assert_allclose(cost_matrix(s, t), C, rtol=0, atol=0)


@pytest.mark.parametrize("metric, scipy_metric", [("l2", "euclidean"), ("sqeuclidean", "sqeuclidean")])
def test_l2_and_sqeuclidean_costs_match_scipy_cdist(metric, scipy_metric):
    rng = np.random.default_rng(23)
    s = rng.standard_normal((60, 12)) * 3
    t = rng.standard_normal((35, 12)) * 3
    C = cost_matrix(s, t, metric=metric, eps_c=0.5)
    expected = cdist(s, t, scipy_metric) / 0.5
    np.testing.assert_allclose(C, expected, rtol=1e-9, atol=1e-9)


def test_cost_matrix_feature_dimension_mismatch_names_both_dimensions():
    with pytest.raises(PretrainReuseError, match=r"dimension 5 but target has 7"):
        cost_matrix(np.ones((3, 5)), np.ones((4, 7)))


def test_cost_matrix_of_an_all_zero_unit_names_fixes_the_cli_offers():
    # "drop it" named no way to drop a unit; the metric is a flag, the unit's samples data
    t = np.ones((4, 5))
    t[2] = 0
    with pytest.raises(PretrainReuseError) as e:
        cost_matrix(np.ones((3, 5)), t)
    assert str(e.value) == (
        "target unit 2 is an all-zero vector, which has no cosine distance; use --metric l2 "
        "(metric='l2'), or rebuild the units without it: remove the samples whose features are "
        "all zero from the data and embed again (or its row from a .npy prototype matrix)")
    cost_matrix(np.ones((3, 5)), t, metric="l2")  # the fix it names works


def test_cost_matrix_unknown_metric_names_metric():
    with pytest.raises(PretrainReuseError, match=r"metric='manhattan'.*'cosine'"):
        cost_matrix(np.ones((3, 5)), np.ones((4, 5)), metric="manhattan")


@pytest.mark.parametrize("eps_c", [0.0, -0.1, float("nan"), float("inf"), "0.1", None])
def test_cost_matrix_rejects_non_positive_eps_c(eps_c):
    with pytest.raises(PretrainReuseError, match="eps_c"):
        cost_matrix(np.ones((3, 5)), np.ones((4, 5)), eps_c=eps_c)


# --------------------------------------------------------------------------------------------
# Input validation
# --------------------------------------------------------------------------------------------


def _ok():
    return np.ones(4), np.ones(3), np.ones((4, 3))


def test_numpy_scalar_parameters_solve_the_problem_of_python_numbers():
    # POT takes them; the solver refused np.float32(1) as "not a number"
    rng = np.random.default_rng(5)
    a, b, C = rng.uniform(0.5, 2, 6), rng.uniform(0.5, 2, 4), rng.uniform(0, 3, (6, 4))
    ref = unbalanced_sinkhorn(a, b, C, 0.5, 1.0, 100.0, max_iter=1000, tol=1e-7)
    got = unbalanced_sinkhorn(a, b, C, np.float32(0.5), np.float64(1), np.int64(100),
                              max_iter=np.int64(1000), tol=np.float64(1e-7))
    np.testing.assert_array_equal(got.log_row_mass, ref.log_row_mass)
    assert (got.n_iter, got.objective) == (ref.n_iter, ref.objective)
    assert type(got.eps) is float and type(got.tau_b) is float
    np.testing.assert_array_equal(
        cost_matrix(C, C[:2], eps_c=np.float32(0.5)), cost_matrix(C, C[:2], eps_c=0.5))


@pytest.mark.parametrize("as_torch", [False, True])
def test_result_repr_is_a_one_line_summary_not_every_potential(as_torch):
    rng = np.random.default_rng(0)
    arr = torch.from_numpy if as_torch else np.asarray
    one = unbalanced_sinkhorn(arr(np.ones(1000)), arr(np.ones(10)), arr(rng.random((1000, 10))))
    assert repr(one) == (f"UOTResult(shape=(1000, 10), n_iter={one.n_iter}, converged=True, "
                         f"objective={one.objective:.6g})")
    batch = unbalanced_sinkhorn_batched(arr(np.ones(50)), arr(np.ones((3, 10))),
                                        arr(rng.random((3, 50, 10))), max_iter=3)
    assert repr(batch) == "UOTResult(batch=3, shape=(50, 10), n_iter=3, converged=0 of 3)"


def test_nan_or_inf_in_cost_raises_naming_cost():
    a, b, C = _ok()
    for bad in (np.nan, np.inf, -np.inf):
        C2 = C.copy()
        C2[1, 2] = bad
        with pytest.raises(PretrainReuseError, match="cost has NaN/inf"):
            unbalanced_sinkhorn(a, b, C2)
        with pytest.raises(PretrainReuseError, match="cost has NaN/inf"):
            unbalanced_sinkhorn(a, b, C2, dtype=torch.float32)
        with pytest.raises(PretrainReuseError, match="cost has NaN/inf"):
            unbalanced_sinkhorn_batched(a, np.stack([b, b]), np.stack([C, C2]))


def test_huge_finite_cost_is_not_mistaken_for_inf():
    # 1e39 overflows float32 (and a sum of 1e308s overflows float64): neither is an error
    a, b, C = _ok()
    C[1, 2] = 1e39
    res = unbalanced_sinkhorn(a, b, C, dtype=torch.float32)
    assert res.converged and np.isfinite(res.log_row_mass).all()
    C[1, :] = 1e308
    res = unbalanced_sinkhorn(a, b, C)
    assert res.converged and np.isfinite(res.f).all()


@pytest.mark.parametrize(
    "a, b, C, pattern",
    [
        (np.ones(5), np.ones(3), np.ones((4, 3)), r"a is \(5,\)"),
        (np.ones(4), np.ones(2), np.ones((4, 3)), r"b is \((1, )?2,?\)"),
        (np.ones((4, 1)), np.ones(3), np.ones((4, 3)), r"a is \(4, 1\)"),
        (np.ones(4), np.ones((1, 3)), np.ones((4, 3)), r"b must be 1-d"),
        (np.ones(4), np.ones(3), np.ones(12), r"cost must be a 2-d"),
    ],
    ids=["a-too-long", "b-too-short", "a-2d", "b-2d", "cost-1d"],
)
def test_wrong_shapes_raise_naming_the_parameter(a, b, C, pattern):
    with pytest.raises(PretrainReuseError, match=pattern):
        unbalanced_sinkhorn(a, b, C)


@pytest.mark.parametrize(
    "kwargs, name",
    [
        (dict(eps=0.0), "eps"),
        (dict(eps=-1.0), "eps"),
        (dict(eps=float("nan")), "eps"),
        (dict(eps=float("inf")), "eps"),
        (dict(tau_a=0.0), "tau_a"),
        (dict(tau_a=-2.0), "tau_a"),
        (dict(tau_b=0.0), "tau_b"),
        (dict(tau_b=float("nan")), "tau_b"),
        (dict(tol=0.0), "tol"),
        (dict(max_iter=0), "max_iter"),
        (dict(max_iter=-5), "max_iter"),
        (dict(max_iter=10.0), "max_iter"),
        (dict(max_iter=True), "max_iter"),  # was taken as one iteration
        (dict(eps="1"), "eps"),
        (dict(tau_b=True), "tau_b"),
        # so loose that the solver stops unconverged (and the advice to raise --max-iter is wrong)
        (dict(tol=10.0), "tol"),
    ],
)
def test_invalid_parameters_raise_naming_the_parameter(kwargs, name):
    a, b, C = _ok()
    with pytest.raises(PretrainReuseError, match=rf"^{name}( must|=)"):
        unbalanced_sinkhorn(a, b, C, **kwargs)


@pytest.mark.parametrize(
    "a, b, name",
    [
        (np.array([1.0, 0.0, 1.0, 1.0]), np.ones(3), "a must hold"),
        (np.array([1.0, -1.0, 1.0, 1.0]), np.ones(3), "a must hold"),
        (np.array([1.0, np.nan, 1.0, 1.0]), np.ones(3), "a must hold"),
        (np.ones(4), np.array([1.0, 0.0, 1.0]), "b must hold"),
        (np.ones(4), np.array([1.0, np.inf, 1.0]), "b must hold"),
    ],
)
def test_non_positive_or_non_finite_weights_raise(a, b, name):
    with pytest.raises(PretrainReuseError, match=name):
        unbalanced_sinkhorn(a, b, np.ones((4, 3)))


@pytest.mark.parametrize("eps", [1e-6, 1e-10])
def test_float32_potentials_stalled_by_rounding_are_not_converged(eps):
    # At tiny eps the potentials stop moving at float32's rounding error while the optimality
    # conditions are off by whole nats: that is not a solution (float64 keeps going instead).
    rng = np.random.default_rng(0)
    a, b, C = np.ones(50), np.full(5, 10.0), rng.random((50, 5))
    res = unbalanced_sinkhorn(a, b, C, eps, 1.0, 100.0, dtype=torch.float32, max_iter=10_000)
    assert res.n_iter < 100 and res.converged is False
    assert max(res.marginal_error_a, res.marginal_error_b) > MARGINAL_TOL
    ok = unbalanced_sinkhorn(a, b, C, 1e-2, 1.0, 100.0, dtype=torch.float32)
    assert ok.converged and max(ok.marginal_error_a, ok.marginal_error_b) <= MARGINAL_TOL


def test_solver_leaves_torch_thread_count_as_it_was():
    # the CPU iterations run torch on one thread beside the BLAS products; the caller's setting
    # must come back, also when the solve fails
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        cost = np.random.default_rng(0).random((50, 8))
        unbalanced_sinkhorn(np.ones(50), np.ones(8), cost, 1.0, 1.0, 100.0)
        assert torch.get_num_threads() == 2
        cost[3, 2] = np.nan
        with pytest.raises(PretrainReuseError):
            unbalanced_sinkhorn(np.ones(50), np.ones(8), cost, 1.0, 1.0, 100.0)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("which", ["a", "b", "cost"])
def test_inputs_that_require_grad_are_refused_by_name(which):
    args = {"a": torch.ones(30), "b": torch.ones(5), "cost": torch.rand(30, 5)}
    args[which].requires_grad_(True)
    with pytest.raises(PretrainReuseError, match=f"^{which} requires grad; pass {which}.detach()"):
        unbalanced_sinkhorn(args["a"], args["b"], args["cost"])


@pytest.mark.parametrize("cost, needle", [
    (np.full((6, 3), "a"), "cost holds <U1 values, not real numbers"),
    (np.ones((6, 3)) + 0j, "cost holds complex128 values, not real numbers"),
    (torch.ones(6, 3, dtype=torch.complex64), "cost holds complex numbers"),
    ([[1.0, 2.0, 3.0]] * 5 + [[1.0]], "cost is not a rectangular array"),
])
def test_a_cost_of_other_than_real_numbers_is_refused_by_name(cost, needle):
    # strings raised NumPy's ValueError; complex numbers were cast to their real part
    with pytest.raises(PretrainReuseError, match=needle):
        unbalanced_sinkhorn(np.ones(6), np.ones(3), cost)


def test_log_plan_refuses_inputs_of_another_problem():
    rng = np.random.default_rng(0)
    res = unbalanced_sinkhorn(np.ones(6), np.ones(3), rng.random((6, 3)))
    with pytest.raises(PretrainReuseError, match=r"a \(6,\), b \(3,\), cost \(6, 3\); got \(5,\)"):
        res.log_plan(np.ones(5), np.ones(3), rng.random((5, 3)))
    batched = unbalanced_sinkhorn_batched(np.ones(6), np.ones((2, 3)), rng.random((2, 6, 3)))
    assert batched.log_plan(np.ones(6), np.ones((2, 3)), rng.random((2, 6, 3))).shape == (2, 6, 3)
    with pytest.raises(PretrainReuseError, match="log_plan takes"):
        batched.log_plan(np.ones(6), np.ones(3), rng.random((6, 3)))


def test_a_read_only_cost_is_solved_in_place_without_a_warning(tmp_path):
    # a memory-mapped .npy: torch warns of a read-only array; the solver never writes into it
    rng = np.random.default_rng(0)
    np.save(tmp_path / "c.npy", rng.random((40, 5)))
    code = ("import warnings, numpy as np; warnings.simplefilter('error');"
            "from pretrain_reuse.transport import unbalanced_sinkhorn;"
            f"c = np.load({str(tmp_path / 'c.npy')!r}, mmap_mode='r');"
            "print(unbalanced_sinkhorn(np.ones(40), np.ones(5), c).converged)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "True", out.stderr[-2000:]


def test_plan_comes_back_as_the_potentials_whatever_the_weights_are():
    # a torch cost with NumPy weights (the solver moves the weights to the cost): the plan is a
    # tensor like the potentials, equal to the NumPy one
    rng = np.random.default_rng(0)
    a, b, C = rng.random(12) + 0.5, rng.random(4) + 0.5, rng.random((12, 4))
    res = unbalanced_sinkhorn(a, b, torch.from_numpy(C), 1.0, 1.0, 100.0)
    lp = res.log_plan(a, b, torch.from_numpy(C))
    assert isinstance(lp, torch.Tensor) and lp.device == res.f.device
    ref = unbalanced_sinkhorn(a, b, C, 1.0, 1.0, 100.0).log_plan(a, b, C)
    np.testing.assert_allclose(lp.numpy(), ref, rtol=0, atol=1e-12)


@pytest.mark.parametrize("scale", [1e-30, 1e30])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_cosine_cost_ignores_the_size_of_the_features(scale, dtype):
    # the norms of rows of 1e-30 (1e30) under- (over)flow in float32: normalize() then scaled
    # them wrongly, or called them all-zero vectors
    rng = np.random.default_rng(0)
    s, t = rng.standard_normal((20, 8)), rng.standard_normal((5, 8))
    unit_s, unit_t = (x / np.linalg.norm(x, axis=1, keepdims=True) for x in (s, t))
    ref = 1.0 - unit_s @ unit_t.T
    got = cost_matrix((s * scale).astype(dtype), t.astype(dtype), metric="cosine", eps_c=1.0)
    np.testing.assert_allclose(got, ref, rtol=0, atol=1e-5 if dtype == np.float32 else 1e-12)


def test_cpu_solve_uses_torchs_thread_count_for_its_blas_products_too():
    # NumPy's BLAS sums a product in an order that depends on its threads: it must run on the
    # torch thread count that a result's metadata records, not on every core
    from threadpoolctl import threadpool_limits

    rng = np.random.default_rng(0)
    a, b, C = np.ones(5000), np.ones(300), rng.random((5000, 300)) * 30
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        results = []
        for blas in (1, 2):
            with threadpool_limits(blas, user_api="blas"):
                results.append(unbalanced_sinkhorn(a, b, C, 1.0, 1.0, 100.0, dtype=torch.float32))
    finally:
        torch.set_num_threads(before)
    assert np.array_equal(results[0].f, results[1].f) and np.array_equal(results[0].g, results[1].g)


def test_column_sums_whose_terms_underflow_the_float32_kernel_are_recomputed_exactly():
    # Column 1 sits 60 nats below every row's maximum; column 2 160 nats (below float32's range,
    # the kernel floors it at ~e^-86); column 3 has one row 75 nats down and the rest 160 nats, so
    # its kernel sum, ~e^-75, is off by the 199 floored terms (~0.2%). Only an exact recompute
    # from the cost gets columns 2 and 3 right.
    from pretrain_reuse.transport import _RowLSE

    rng = np.random.default_rng(5)
    n = 200
    C = np.empty((1, n, 4))
    C[0, :, 0] = rng.random(n)
    C[0, :, 1] = 60.0 + rng.random(n)
    C[0, :, 2] = 160.0 + rng.random(n)
    C[0, :, 3] = 160.0 + rng.random(n)
    C[0, 0, 3] = 75.0
    lse = _RowLSE(torch.tensor(C, dtype=torch.float32), 1.0, torch.float32)
    lse(torch.zeros(1, 4))  # builds the kernel around h0 = 0
    e = 0.5 * rng.standard_normal((1, n))
    got = lse.col_lse(torch.tensor(e, dtype=torch.float32)).double()
    # the float32 cost is what the solver sees: the reference starts from the same numbers
    c32 = torch.tensor(C, dtype=torch.float32).double()
    expected = torch.logsumexp(torch.tensor(e)[:, :, None] - c32, dim=1)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)


def test_cost_matrix_of_no_units_gradients_and_infinite_features():
    # computing the costs in place broke three cases: l2 of no units raised a bare RuntimeError,
    # autograd through l2 costs failed (cdist's backward reads its output), and an infinite
    # feature was told to raise eps_c instead of the solver's NaN/inf message
    assert cost_matrix(np.zeros((0, 3)), np.ones((5, 3)), metric="l2").shape == (0, 5)
    s = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    t = torch.randn(2, 3, dtype=torch.float64)
    for metric in ("l2", "cosine"):
        cost = cost_matrix(s, t, metric=metric, eps_c=0.5)
        (grad,) = torch.autograd.grad(cost.sum(), s)
        reference = (torch.cdist(s, t) if metric == "l2" else
                     1 - torch.nn.functional.cosine_similarity(s[:, None], t[None], dim=-1)) / 0.5
        (expected,) = torch.autograd.grad(reference.sum(), s)
        torch.testing.assert_close(grad, expected)
    source = np.ones((3, 2))
    source[1, 0] = np.inf
    with pytest.raises(PretrainReuseError, match="cost has NaN/inf entries"):
        unbalanced_sinkhorn(np.ones(3), np.ones(2), cost_matrix(source, np.ones((2, 2)), metric="l2"))
