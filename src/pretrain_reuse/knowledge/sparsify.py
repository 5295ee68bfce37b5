r"""Sparse AND / AND-OR interactions: remove bounded noise and split a game into AND and OR parts.

The AND-OR decomposition of the SJTU group (Li & Zhang, arXiv 2304.13312; Chen et al., ICLR 2024;
docs/knowledge.md §1) explains a game v by AND interactions of v_and and OR interactions of v_or:

.. math::

    v'(S) = v(S) + q_S, \quad |q_S| \le b = \mathrm{qthres}\,|v(N) - v(\emptyset)|, \\
    v_{and} = \tfrac12 v' + \gamma, \quad v_{or} = \tfrac12 v' - \gamma, \\
    \min_{\gamma, q} \; \textstyle\sum_S |I_{and}(S)| + \sum_S |I_{or}(S)|,
    \qquad I_{and} = \mathrm{Harsanyi}(v_{and}),\; I_{or} = \mathrm{OR}(v_{or}),

followed by merging orders 0 and 1 into AND (an AND and an OR term on ∅ or on one player are the
same function of S). Writing a = v_and and o = v_or, it is the linear program

.. math::

    \min_{a, o} \|M a\|_1 + \|O o\|_1 \quad \text{s.t.} \quad |a + o - v| \le b

(M the Möbius, O the OR transform): convex, but with 2^{n+1} unknowns and operators whose
condition number grows like φ^{2n}. Five solvers:

* :func:`and_or_interactions` (default): ADMM batched over samples in torch, with an exact
  O(n 2^n) linear solve and a certified duality gap as the stopping rule.
* :func:`joint_and_or_interactions`: the same ADMM on K models at once, with the joint loss and
  the shared AND/OR split of Chen et al. (ICLR 2024), for comparing models on the same samples.
* :func:`and_or_interactions_sgd`: the group's protocol (SGD, momentum 0.9, learning rate decaying
  log-uniformly from lr to lr/10, q clamped before every step), kept as the reference.
* :func:`and_or_interactions_lp`: the exact optimum by HiGHS (small n).
* :func:`and_interactions`: AND only, optionally with the bounded noise q ("mode=q", Ren et al.,
  ICLR 2024): min_{|q|<=b} ||Harsanyi(v + q)||_1; qthres=0 gives plain Harsanyi interactions.

Every single-model solver takes games ``v`` of shape (2^n,) or (B, 2^n) in bitmask layout (numpy
or torch; torch runs on its device) and returns one :class:`~pretrain_reuse.knowledge.Interactions`
per game, always as a list; the joint solver takes (K, B, 2^n) and returns K such lists.

Every solver decomposes the centred game v - v(∅) and adds v(∅) back into I_and(∅), which then
holds v(∅) + q_∅, and I_or(∅) merged into it (``centre=True``, default): the L1 loss counts I(∅)
too, so on v itself the noise q_∅ and the split γ_∅ would be spent on shrinking the bias (whose
size is the baseline's, not the model's evidence), and every coalition's interactions would change
with it. The group sparsifies its "-v0" outputs v(S) - v(∅) (``gt-log-odds-v0`` in
sjtu-xai-lab/generalizable-interaction and interaction-sparsity); ``centre=False`` sparsifies v as
given (their runs without "-v0"). Objectives, losses and bounds in ``meta`` are those of the game
decomposed.

A constant game (v(S) = v(∅) for every S, e.g. a model insensitive to the players) has the exact
decomposition I_and(∅) = v(∅) and no other interaction, which every solver returns as it is
(``meta["constant"]``): the iterative solvers would leave entries at the level of their accuracy,
~1e-4 of |v(∅)|, and the salience threshold, relative to the largest entry, would turn them into
knowledge. In the joint solver this holds per model (the coupling of a constant game's AND/OR
split to the other models' is moot: it has no interaction to split).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from ..artifacts import make_meta
from ..errors import PretrainReuseError, is_integer, is_number
from .interactions import as_games, or_reconstruct_, or_transform_, orders, subset_sum_, superset_sum_
from .values import Interactions

__all__ = [
    "MAX_LP_PLAYERS",
    "and_interactions",
    "and_or_interactions",
    "and_or_interactions_lp",
    "and_or_interactions_sgd",
    "joint_and_or_interactions",
]

#: The exact LP has about 2·3^n nonzeros: ~1 s at n = 10, ~15 s at n = 12 for a sparse game, far
#: more for a dense one. Beyond 12 players use :func:`and_or_interactions`.
MAX_LP_PLAYERS = 12

# ADMM settings for the problem scaled to a unit noise box (|q| <= 1). The penalties start at
# (rho, c) = (0.5, 4) and move geometrically to (1, 0.3) over the first 100 iterations; a sweep on
# the benchmark's planted games (n = 10, 12) and the test's n = 8 game chose them: the start
# reaches the SGD protocol's objective at n = 12 in 50 instead of 120 iterations, the end
# certifies a 1e-3 gap at n = 8 about as fast as the constant (1, 0.3) of an earlier sweep at
# n = 8 and 10 (which found Anderson acceleration and residual balancing of rho of no help).
_RHO_START, _RHO = 0.5, 1.0  # penalty of the L1 blocks; the soft threshold is 1/rho
_C_START, _C = 4.0, 0.3  # relative weight of the copy z3 = (a, o) that carries the box
_SCHEDULE_EVERY, _SCHEDULE_STEPS = 10, 10  # iterations per schedule step, number of steps
_ALPHA = 1.8  # over-relaxation
_CHECK_EVERY = 20  # iterations between duality-gap evaluations


# --------------------------------------------------------------------------------------------
# Public solvers
# --------------------------------------------------------------------------------------------


def and_interactions(v, *, qthres: float = 0.0, tol: float = 1e-2, max_iter: int = 2_000,
                     centre: bool = True) -> list[Interactions]:
    r"""Harsanyi (AND) interactions, optionally after removing bounded noise ("mode=q").

    .. math::

        \min_{|q_S| \le b} \sum_S |I_{and}(S)|, \quad I_{and} = \mathrm{Harsanyi}(v + q),
        \quad b = \mathrm{qthres}\,|v(N) - v(\emptyset)|

    With ``qthres=0`` (default; paper-faithful, Jiang et al. arXiv 2410.08455 eq. 2) q = 0 and the
    result is the exact Möbius transform. Otherwise the problem is solved by the ADMM of
    :func:`and_or_interactions` without the OR part (Ren et al., ICLR 2024, "mode=q").

    Args:
        v: games (2^n,) or (B, 2^n), bitmask layout, finite.
        qthres: noise bound relative to |v(N) - v(∅)|, >= 0 (the group uses 0.04).
        tol: relative duality gap at which ADMM stops (ignored for qthres=0); see
            :func:`and_or_interactions`.
        max_iter: ADMM iteration cap; ``meta["converged"]`` tells whether tol was reached.
        centre: remove the noise from v - v(∅) (module docstring; no effect at qthres=0).

    Returns:
        One :class:`Interactions` (kind ``"and"``) per game.
    """
    games, n = _games(v)
    b = _noise_bound(games, qthres)
    params = dict(qthres=qthres, tol=tol, max_iter=max_iter, centre=centre)
    if qthres == 0:
        i_and = subset_sum_(games.clone(), n, -1.0)
        return _results(games, games, n, b, i_and, torch.zeros_like(games),
                        torch.zeros_like(games), "and", "and_interactions", params,
                        [{"solver": "exact"}] * len(games))
    _check_solver(tol, max_iter)
    work = _centred(games, centre)
    i_and, i_or, q, diag = _admm(work[None], n, b.T, None, with_or=False, alpha=0.0, tol=tol,
                                 max_iter=max_iter)
    return _results(games, work, n, b, i_and[0], i_or[0], q[0], "and", "and_interactions", params,
                    diag)


def and_or_interactions(v, *, qthres: float = 0.04, tol: float = 1e-2, max_iter: int = 2_000,
                        centre: bool = True) -> list[Interactions]:
    r"""Sparse AND-OR interactions by ADMM with a certified duality gap (the default solver).

    Solves the problem of the module docstring in the variables a = v_and, o = v_or (γ and q
    follow as γ = (a - o)/2, q = a + o - v), before the merge of orders 0 and 1, as the SGD
    protocol does. With the box scaled to |q| <= 1 and C = {(a, o) : |a + o - v| <= 1}, ADMM
    (Boyd et al. 2011, with over-relaxation) runs on

    .. math::

        \min \|z_1\|_1 + \|z_2\|_1 + \iota_C(z_3)
        \quad \text{s.t.} \quad z_1 = M a,\; z_2 = T_{or} R o,\; z_3 = (a, o),

    where R reverses the bitmask (S -> N\S) and T_or is M with row ∅ replaced by e_N, so that
    z_2 = (I_or(∅), -I_or(T) for T ≠ ∅). The a- and o-updates solve (MᵀM + cI) x = r exactly:
    MᵀM = ⊗[[2,-1],[-1,1]] is a Kronecker power, diagonalised by the Kronecker power of its 2×2
    orthogonal eigenvector matrix, so each solve costs O(n 2^n); T_orᵀT_or differs from MᵀM in
    two diagonal entries (Woodbury). The other updates are soft thresholding and a per-coalition
    projection onto the box. The penalties start at values that approach the SGD protocol's
    objective fast and move to values that converge fast within the first 100 iterations.

    Every few iterations a dual-feasible point λ of the LP
    max vᵀλ - b||λ||_1 s.t. |Zᵀλ| <= 1, |Wᵀλ| <= 1 (Z, W the AND and OR reconstruction
    matrices) is built from the multipliers of the box and of the L1 blocks and rescaled into
    feasibility, which bounds the optimum from below;
    iteration stops for a sample when (loss - bound) <= tol · loss. The best feasible
    point seen is returned; its reconstruction of v + q is exact and |q| <= b holds by projection.

    Args:
        v: games (2^n,) or (B, 2^n), bitmask layout, finite; torch tensors run on their device.
        qthres: noise bound relative to |v(N) - v(∅)|, >= 0 (the group's images: 0.04).
        tol: relative duality gap to stop at: the L1 objective is within ``tol`` of the optimum.
            The default 1e-2 is 10x tighter than the SGD protocol reaches on dense games (it stops
            15-130% above the optimum); on our test games the salient sets at tol 1e-1 ... 1e-3
            agree equally well with the exact LP's, because the optimum is not unique (the LP
            has a face of optimal solutions), so a smaller gap does not pin the salient set down.
        max_iter: iteration cap; ``meta["converged"]`` says whether tol was reached. The default
            2,000 iterations take a third or less of the time of the SGD protocol's 10,000 steps
            and match its objective within the first 100 (94 at n = 10, 60 at n = 12: 70-240x
            less time than SGD in benchmarks/knowledge.py). The certificate lags the
            objective: on the benchmark's planted games (n = 10, noise 0.05) 2,000 iterations end
            0.7% above the exact optimum on average while the certified gap still reads up to
            16%; noisy games with a small v(N) - v(∅) (dense optima) need 10,000+ iterations to
            certify 1%.
        centre: decompose v - v(∅) and return v(∅) in I_and(∅) (module docstring).

    Returns:
        One :class:`Interactions` (kind ``"and-or"``) per game, orders 0 and 1 merged into AND;
        ``meta`` holds ``objective`` (Σ|I_and| + Σ|I_or| after the merge), ``loss`` (before it),
        ``lower_bound``, ``gap`` (relative), ``n_iter``, ``converged`` and the noise bound ``b``.
    """
    games, n = _games(v)
    b = _noise_bound(games, qthres)
    _check_solver(tol, max_iter)
    work = _centred(games, centre)
    i_and, i_or, q, diag = _admm(work[None], n, b.T, None, with_or=True, alpha=0.0, tol=tol,
                                 max_iter=max_iter)
    return _results(games, work, n, b, i_and[0], i_or[0], q[0], "and-or", "and_or_interactions",
                    dict(qthres=qthres, tol=tol, max_iter=max_iter, centre=centre), diag)


def joint_and_or_interactions(v, *, qthres: float = 0.04, pthres: float = 0.5, alpha: float = 0.1,
                              mean_output=None, tol: float = 1e-2, max_iter: int = 2_000,
                              centre: bool = True) -> list[list[Interactions]]:
    r"""Joint sparse AND-OR interactions of K models on the same samples (Chen et al., ICLR 2024).

    The games v_k of models k = 1..K on one sample (same players, same baseline) are decomposed
    together, each with its own noise q_k and an AND/OR split γ_k that may deviate from a shared
    split γ by at most p_k:

    .. math::

        v_k' = v_k + q_k, \quad |q_{k,S}| \le b_k = \mathrm{qthres}\,|v_k(N) - v_k(\emptyset)|, \\
        v_{and,k} = \tfrac12 v_k' + \gamma + \gamma'_k, \quad
        v_{or,k} = \tfrac12 v_k' - \gamma - \gamma'_k, \quad
        |\gamma'_{k,S}| \le p_k = \mathrm{pthres}\,|m_k|, \\
        \min_{\gamma, \gamma', q} \; \sum_S f\big(I_{and,1..K}(S)\big) + \sum_S f\big(I_{or,1..K}(S)\big),
        \qquad f(u) = (1-\alpha) \max_k |u_k| + \alpha \sum_k |u_k|,

    with I_and,k = Harsanyi(v_and,k), I_or,k = OR(v_or,k) over all 2^n coalitions, and m_k the
    average output v_k(N) - v_k(∅) of model k over the samples of the study (the group's
    ``average_model_output``). f, an ordered weighted L1 norm on R^K, charges an interaction fully
    for the model where it is largest and α for each other model, so a support shared by the
    models is cheap; the bound on γ'_k keeps the AND/OR split of the same effect consistent across
    models (independent sparsification can move it between AND and OR in different models and
    fake "discarded" or "new" knowledge, docs/knowledge.md §1). This is ``_train_p_q_joint_model`` of
    sjtu-xai-lab/generalizable-interaction (their Eq. 6, SGD with momentum, K = 2) as a convex
    problem, solved to a certified gap by the ADMM of :func:`and_or_interactions` (whose problem is
    the case K = 1), here with the prox of f (soft thresholding, then the prox of the max norm) and
    the projection onto the coupling set for each coalition.
    Orders 0 and 1 are merged into AND afterwards, per model, as the group does.

    Args:
        v: games (K, 2^n) of K models on one sample, or (K, B, 2^n) on B samples, bitmask layout,
            finite; torch tensors run on their device.
        qthres: noise bound relative to |v_k(N) - v_k(∅)|, >= 0 (the group's text models: 0.02).
        pthres: bound of γ'_k relative to |m_k|, >= 0; ``math.inf`` removes the coupling of γ.
        alpha: weight of Σ_k in f, in [0, 1] (the group's 0.1; 1 gives independent L1 losses).
        mean_output: m_1..m_K; default: the mean of v_k(N) - v_k(∅) over the given samples. Pass the
            study-wide averages when the samples are decomposed in several calls.
        tol: relative duality gap to stop at (see :func:`and_or_interactions`).
        max_iter: iteration cap; ``meta["converged"]`` says whether tol was reached.
        centre: decompose each v_k - v_k(∅) and return v_k(∅) in I_and,k(∅) (module docstring).

    Returns:
        K lists (one per model) of B :class:`Interactions` (kind ``"and-or"``). ``meta`` holds the
        sample's joint ``loss`` above (before the merge), ``lower_bound``, ``gap``, ``n_iter`` and
        ``converged`` (the same for the K models of a sample), and per model ``objective``
        (Σ|I_and| + Σ|I_or| after the merge), ``b``, ``p`` and ``model`` (k, from 0).
    """
    games, n, _ = as_games(v)
    if games.ndim not in (2, 3):
        raise PretrainReuseError(
            f"v must hold the games of K models, shape (K, 2^n) or (K, B, 2^n), got {tuple(games.shape)}; "
            "stack the models' games of the same samples along the first axis"
        )
    games = games.reshape(len(games), -1, 1 << n)
    models, batch, size = games.shape
    b = _noise_bound(games.reshape(-1, size), qthres).view(models, batch)
    if not is_number(pthres) or not pthres >= 0:
        raise PretrainReuseError(f"pthres={pthres!r} must be a number >= 0 or math.inf (the group uses 0.5)")
    if not is_number(alpha) or not 0 <= alpha <= 1:
        raise PretrainReuseError(f"alpha={alpha!r} must be a weight in [0, 1] (the group uses 0.1)")
    if mean_output is None:
        mean = (games[..., -1] - games[..., 0]).mean(1)
    else:
        # a tensor as it is (a GPU's cannot go through NumPy), other numbers through NumPy
        mean = (mean_output.detach() if torch.is_tensor(mean_output)
                else torch.as_tensor(np.asarray(mean_output, dtype=np.float64)))
        mean = mean.to(device=games.device, dtype=torch.float64)
        if mean.shape != (models,) or not bool(torch.isfinite(mean).all()):
            raise PretrainReuseError(
                f"mean_output must be {models} finite numbers, one per model, got {mean_output!r}")
    _check_solver(tol, max_iter)
    p = None if pthres == math.inf else pthres * mean.abs()
    work = _centred(games, centre)
    i_and, i_or, q, diag = _admm(work, n, b, p, with_or=True, alpha=float(alpha), tol=tol,
                                 max_iter=max_iter)
    params = dict(qthres=qthres, pthres=pthres, alpha=alpha, mean_output=mean.tolist(), tol=tol,
                  max_iter=max_iter, centre=centre)
    return [_results(games[k], work[k], n, b[k, :, None], i_and[k], i_or[k], q[k], "and-or",
                     "joint_and_or_interactions", params,
                     [dict(d, p=math.inf if p is None else float(p[k]), model=k) for d in diag])
            for k in range(models)]


def and_or_interactions_sgd(v, *, qthres: float = 0.04, lr: float = 1e-5, niter: int = 10_000,
                            centre: bool = True) -> list[Interactions]:
    r"""Sparse AND-OR interactions by the group's SGD protocol (reference implementation).

    As ``_train_p_q`` in sjtu-xai-lab/interaction-concept (``src/harsanyi/and_or_harsanyi_utils.py``)
    with ``qstd="vN-v0"`` and the L1 loss: γ = q = 0 at the start; at iteration t, q is clamped to
    [-b, b], the loss Σ|I_and| + Σ|I_or| is evaluated and (except at the last iteration) one SGD
    step with momentum 0.9 and learning rate lr_t = logspace(log10 lr, log10 lr - 1, niter)[t] is
    taken on (γ, q). Gradients are the subgradients sign(I) pulled back through the transposed
    transforms (the same numbers autograd produces, without a graph). Orders 0 and 1 are merged
    into AND afterwards. Settings seen in the group's code: lr 1e-5 with 10,000 (images) or
    20,000 iterations, qthres 0.04.

    Args:
        v: games (2^n,) or (B, 2^n), bitmask layout, finite.
        qthres: noise bound relative to |v(N) - v(∅)|, >= 0.
        lr: initial learning rate > 0.
        niter: number of iterations >= 1.
        centre: decompose v - v(∅) (the group's "-v0" outputs) and return v(∅) in I_and(∅).

    Returns:
        One :class:`Interactions` (kind ``"and-or"``) per game; ``meta["loss"]`` is the final loss
        before the merge, ``meta["objective"]`` the L1 norm after it.
    """
    games, n = _games(v)
    b = _noise_bound(games, qthres)
    if not (is_number(lr) and lr > 0 and math.isfinite(lr)):
        raise PretrainReuseError(f"lr={lr!r} must be a positive learning rate, e.g. 1e-5")
    if not is_integer(niter) or niter < 1:
        raise PretrainReuseError(f"niter={niter!r} must be a positive number of iterations")
    work = _centred(games, centre)
    gamma = torch.zeros_like(games)
    q = torch.zeros_like(games)
    buf_gamma = buf_q = None
    rates = np.logspace(math.log10(lr), math.log10(lr) - 1, niter)
    for it in range(niter):
        q = torch.maximum(torch.minimum(q, b), -b)
        half = 0.5 * (work + q)
        i_and = subset_sum_(half + gamma, n, -1.0)
        i_or = or_transform_(half - gamma, n)
        if it + 1 == niter:
            break
        g_and = superset_sum_(torch.sign(i_and), n, -1.0)
        g_or = _or_transform_transposed(torch.sign(i_or), n)
        grad_gamma, grad_q = g_and - g_or, 0.5 * (g_and + g_or)
        # torch.optim.SGD with momentum 0.9, dampening 0: the buffer starts at the first gradient.
        buf_gamma = grad_gamma if buf_gamma is None else 0.9 * buf_gamma + grad_gamma
        buf_q = grad_q if buf_q is None else 0.9 * buf_q + grad_q
        gamma = gamma - rates[it] * buf_gamma
        q = q - rates[it] * buf_q
    loss = (i_and.abs().sum(-1) + i_or.abs().sum(-1)).tolist()
    diag = [{"solver": "sgd", "loss": loss[k]} for k in range(len(games))]
    return _results(games, work, n, b, i_and, i_or, q, "and-or", "and_or_interactions_sgd",
                    dict(qthres=qthres, lr=lr, niter=niter, centre=centre), diag)


def and_or_interactions_lp(v, *, qthres: float = 0.04, centre: bool = True) -> list[Interactions]:
    r"""The exact optimum of the AND-OR sparsification, as a linear program solved by HiGHS.

    In the interaction variables x = I_and and y = I_or (y only on |T| >= 2: on ∅ and singletons
    an OR term equals an AND term, so the optimum never needs it), with the box scaled to 1:

    .. math::

        \min \|x\|_1 + \|y\|_1 \quad \text{s.t.} \quad
        \Big| \sum_{T \subseteq S} x_T + \sigma - \sum_{T \subseteq N \setminus S} y_T - v(S) \Big| \le 1
        \;\; \forall S, \qquad \sigma = \textstyle\sum_T y_T,

    using Σ_{T∩S≠∅} y_T = σ - Σ_{T⊆N\S} y_T, so the constraint matrix has about 2·3^n nonzeros
    instead of 4^n. x and y are split into positive and negative parts. One solve per game on the
    CPU (Huangfu & Hall 2018, via scipy.optimize.linprog).

    Args:
        v: games (2^n,) or (B, 2^n) with n <= :data:`MAX_LP_PLAYERS`.
        qthres: noise bound relative to |v(N) - v(∅)|, >= 0.
        centre: decompose v - v(∅) and return v(∅) in I_and(∅) (module docstring).

    Returns:
        One :class:`Interactions` (kind ``"and-or"``) per game; ``meta["objective"]`` is the
        optimal Σ|I_and| + Σ|I_or|.
    """
    games, n = _games(v)
    if n > MAX_LP_PLAYERS:
        raise PretrainReuseError(
            f"the exact LP takes n <= {MAX_LP_PLAYERS} players (minutes and GBs beyond), got n={n}; "
            "use and_or_interactions (ADMM) instead"
        )
    try:
        import scipy.optimize  # noqa: F401 (only this solver needs scipy)
    except ImportError:
        raise PretrainReuseError(
            "and_or_interactions_lp needs scipy (HiGHS); install it with `pip install scipy` or use "
            "and_or_interactions"
        ) from None
    b = _noise_bound(games, qthres)
    work = _centred(games, centre)
    scale = _scale(work, b)
    x_all, y_all = [], []
    for k in range(len(games)):
        x, y = _solve_lp(work[k].cpu().numpy() / float(scale[k]), float(b[k] / scale[k]), n)
        x_all.append(x * float(scale[k]))
        y_all.append(y * float(scale[k]))
    i_and = torch.tensor(np.array(x_all), dtype=torch.float64, device=games.device)
    i_or = torch.tensor(np.array(y_all), dtype=torch.float64, device=games.device)
    q = _reconstruct(i_and, i_or, n) - work
    return _results(games, work, n, b, i_and, i_or, q, "and-or", "and_or_interactions_lp",
                    dict(qthres=qthres, centre=centre), [{"solver": "highs"}] * len(games))


# --------------------------------------------------------------------------------------------
# Shared helpers
# --------------------------------------------------------------------------------------------


def _games(v) -> tuple[torch.Tensor, int]:
    games, n, _ = as_games(v)
    if games.ndim > 2:
        raise PretrainReuseError(
            f"v must be one game (2^n,) or a batch (B, 2^n), got shape {tuple(games.shape)}; "
            "reshape it to (B, 2^n)"
        )
    return games.reshape(-1, 1 << n), n


def check_qthres(qthres: float) -> None:
    """A noise bound relative to |v(N) - v(∅)| is a finite number >= 0."""
    if not is_number(qthres) or not 0 <= qthres < math.inf:
        raise PretrainReuseError(f"qthres={qthres!r} must be a finite number >= 0 (the group uses 0.04)")


def _centred(games: torch.Tensor, centre: bool) -> torch.Tensor:
    """The games the solvers decompose: ``v - v(∅)`` with ``centre``, else ``v`` itself."""
    if not isinstance(centre, bool):
        raise PretrainReuseError(f"centre={centre!r} must be True or False")
    return games - games[..., :1] if centre else games


def _noise_bound(games: torch.Tensor, qthres: float) -> torch.Tensor:
    """(B, 1) b = qthres · |v(N) - v(∅)| (the group's ``qstd="vN-v0"``)."""
    check_qthres(qthres)
    return qthres * (games[:, -1:] - games[:, :1]).abs()


def _scale(games: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(B, 1) unit in which the solvers work: b, or (b = 0) 4% of the game's range, or 1."""
    spread = 0.04 * (games - games[:, :1]).abs().amax(dim=1, keepdim=True)
    return torch.where(b > 0, b, torch.where(spread > 0, spread, torch.ones_like(spread)))


def _check_solver(tol: float, max_iter: int) -> None:
    if not is_number(tol) or not 0 < tol < 1:
        raise PretrainReuseError(f"tol={tol!r} must be a relative duality gap in (0, 1), e.g. 1e-3")
    if not is_integer(max_iter) or max_iter < 1:
        raise PretrainReuseError(f"max_iter={max_iter!r} must be a positive number of iterations")


def _or_transform_transposed(g: torch.Tensor, n: int) -> torch.Tensor:
    """Oᵀg for the OR transform O: (Oᵀg)(∅) gains g(∅); the rest is -R Mᵀ g' with g'(∅) = 0."""
    g_empty = g[..., 0].clone()
    g = g.clone()
    g[..., 0] = 0.0
    out = superset_sum_(g, n, -1.0).neg_().flip(-1)
    out[..., 0] += g_empty
    return out


def _reconstruct(i_and: torch.Tensor, i_or: torch.Tensor, n: int) -> torch.Tensor:
    """v' = zeta(I_and) + OR-reconstruction(I_or)."""
    return subset_sum_(i_and.clone(), n, 1.0) + or_reconstruct_(i_or.clone(), n)


def _merge_low_orders(i_and: torch.Tensor, i_or: torch.Tensor, n: int) -> None:
    """In place: I_and(S) += I_or(S), I_or(S) = 0 for |S| <= 1 (the group's reorganisation)."""
    low = torch.from_numpy(orders(n) <= 1).to(i_and.device)
    i_and[:, low] += i_or[:, low]
    i_or[:, low] = 0.0


def _results(games, work, n, b, i_and, i_or, q, kind, producer, params, diag) -> list[Interactions]:
    """Interactions of ``games`` from the decomposition of ``work`` (the games or, centred, the
    games less v(∅), which goes back into I_and(∅))."""
    i_and, i_or, q = i_and.clone(), i_or.clone(), q.clone()
    if kind == "and-or":
        _merge_low_orders(i_and, i_or, n)
    constant = (games == games[:, :1]).all(-1)  # exact: I_and(∅) = v(∅) (module docstring)
    i_and[constant], i_or[constant], q[constant] = 0.0, 0.0, 0.0
    i_and[constant, 0] = work[constant, 0]
    objective = (i_and.abs().sum(-1) + i_or.abs().sum(-1)).tolist()  # of the game decomposed
    i_and[:, 0] += games[:, 0] - work[:, 0]
    out = []
    for k in range(len(games)):
        meta = make_meta(f"pretrain_reuse.knowledge.{producer}", params)
        meta.update(diag[k], objective=objective[k], b=float(b[k]), constant=bool(constant[k]))
        out.append(Interactions(n=n, and_values=i_and[k].cpu().numpy(), or_values=i_or[k].cpu().numpy(),
                                v=games[k].cpu().numpy(), noise=q[k].cpu().numpy(), kind=kind, meta=meta))
    return out


# --------------------------------------------------------------------------------------------
# ADMM
# --------------------------------------------------------------------------------------------
#
# The solver works on K models x B samples at once, with the coalitions along axis 0: tensors of
# shape (2^n, T, K, B), T = 2 blocks (AND game a, reversed OR game R o) or 1 (AND only). Every
# butterfly step then updates two contiguous slabs of T·K·B·2^i values, which is 2-3x faster than
# the strided pairs of the (B, 2^n) layout.

_MOBIUS = np.array([[1.0, 0.0], [-1.0, 1.0]])  # per player: I(S ∪ i) = v(S ∪ i) - v(S)
_MTM_VALUES, _MTM_VECTORS = np.linalg.eigh(_MOBIUS.T @ _MOBIUS)  # [[2,-1],[-1,1]] = Q Λ Qᵀ


class _Operators:
    """The Kronecker-structured linear algebra of the ADMM for n players, along axis 0.

    T x applies the Möbius transform M to the AND block and T_or to the OR block, where T_or is M
    with row ∅ replaced by e_N: on x = R o, (M x)(S) = -I_or(S) for S ≠ ∅ and x(N) = o(∅) = I_or(∅).
    Every operator is a Kronecker power of a 2×2 matrix m, applied per player as two in-place
    shears, lo += t·hi then hi += u·lo (m = diag(m00, m11 - m10·t)·[[1,0],[u,1]]·[[1,t],[0,1]],
    t = m01/m00, u = m10/(m11 - m10·t)), plus one diagonal scaling where m is not unit triangular.
    At n <= 12 making the views of the pairs costs more than the additions, so they are made once
    per shape, on a work buffer.
    """

    def __init__(self, n: int, device: torch.device):
        self.n = n
        # MᵀM = ⊗[[2,-1],[-1,1]] = B diag(Λ) Bᵀ with B = ⊗Q; eigh's Q is symmetric here, so Bᵀ = B
        q = _MTM_VECTORS
        assert np.allclose(q, q.T)
        self.t = float(q[0, 1] / q[0, 0])
        high = q[1, 1] - q[1, 0] * self.t
        self.u = float(q[1, 0] / high)
        scale, eig = np.ones(1), np.ones(1)
        for _ in range(n):  # bit i of the mask picks the "absent" or the "present" factor of player i
            scale = np.concatenate([scale * q[0, 0], scale * high])
            eig = np.concatenate([eig * _MTM_VALUES[0], eig * _MTM_VALUES[1]])
        self.scale = torch.tensor(scale, dtype=torch.float64, device=device)
        self.eig = torch.tensor(eig, dtype=torch.float64, device=device)
        self.work: dict[tuple[int, ...], tuple[torch.Tensor, list]] = {}

    def set_penalty(self, c: float) -> None:
        """Prepare the solves with (TᵀT + cI) for the weight c of the box block."""
        self.c = c
        # B (D^-1 (B r)) = s ⊙ S(D^-1 ⊙ s ⊙ S(r)) for B = diag(s) S
        self.inverse = self.scale / (self.eig + c)
        # T_orᵀT_or + cI = A + U diag(-1, 1) Uᵀ with A = MᵀM + cI, U = [e_∅, e_N]: Woodbury,
        # (A + U C Uᵀ)^-1 = A^-1 - P (C^-1 + Uᵀ P)^-1 Pᵀ with P = A^-1 U (A symmetric)
        unit = torch.zeros(1 << self.n, 2, dtype=torch.float64, device=self.scale.device)
        unit[0, 0] = unit[-1, 1] = 1.0
        self.p = self._solve_a(unit)
        self.k = torch.linalg.inv(torch.diag(unit.new_tensor([-1.0, 1.0])) + self.p[[0, -1]])

    def _kron(self, x: torch.Tensor, t: float, u: float) -> torch.Tensor:
        """The shears of every player applied to a copy of x (2^n, ...)."""
        if x.shape not in self.work:
            buf = torch.empty_like(x, memory_format=torch.contiguous_format)
            pairs = [buf.view(1 << (self.n - 1 - i), 2, -1).unbind(1) for i in range(self.n)]
            self.work[x.shape] = buf, pairs
        buf, pairs = self.work[x.shape]
        buf.copy_(x)
        for lo, hi in pairs:
            if t:
                lo.add_(hi, alpha=t)
            if u:
                hi.add_(lo, alpha=u)
        return buf.clone()

    def _solve_a(self, r: torch.Tensor) -> torch.Tensor:
        """(MᵀM + cI)^{-1} r for r (2^n, ...)."""
        shape = (-1,) + (1,) * (r.ndim - 1)
        y = self._kron(self._kron(r, self.t, self.u) * self.inverse.view(shape), self.t, self.u)
        return y * self.scale.view(shape)

    def solve(self, r: torch.Tensor) -> torch.Tensor:
        """(TᵀT + cI)^{-1} r for r (2^n, T, K, B)."""
        y = self._solve_a(r)
        if y.shape[1] == 2:
            ends = y[[0, -1], 1].reshape(2, -1)
            y[:, 1] -= (self.p @ (self.k @ ends)).view(y[:, 1].shape)
        return y

    def transform(self, x: torch.Tensor) -> torch.Tensor:
        """T x: the interactions (I_and; -I_or off ∅, I_or(∅) at ∅) of the blocks of x."""
        out = self._kron(x, 0.0, -1.0)
        if x.shape[1] == 2:
            out[0, 1] = x[-1, 1]
        return out

    def transform_t(self, g: torch.Tensor) -> torch.Tensor:
        """Tᵀ g: T_orᵀ g = Mᵀ g' + g(∅) e_N, where g' is g with row ∅ set to 0."""
        if g.shape[1] == 1:
            return self._kron(g, -1.0, 0.0)
        empty = g[0, 1].clone()
        g = g.clone()
        g[0, 1] = 0.0
        out = self._kron(g, -1.0, 0.0)
        out[-1, 1] += empty
        return out

    def zeta(self, x: torch.Tensor) -> torch.Tensor:
        """Z x, (Z x)(S) = Σ_{T⊆S} x(T)."""
        return self._kron(x, 0.0, 1.0)

    def zeta_t(self, x: torch.Tensor) -> torch.Tensor:
        """Zᵀ x, (Zᵀ x)(T) = Σ_{S⊇T} x(S)."""
        return self._kron(x, 1.0, 0.0)


def _owl(z: torch.Tensor, alpha: float) -> torch.Tensor:
    """f(z) = (1-α) max_k |z_k| + α Σ_k |z_k| over the models (dim -2); |z| for one model."""
    a = z.abs()
    if z.shape[-2] == 1:
        return a.squeeze(-2)
    return (1 - alpha) * a.amax(-2) + alpha * a.sum(-2)


def _owl_dual(y: torch.Tensor, alpha: float) -> torch.Tensor:
    """Dual norm of f over dim -2: max_k (sum of the k largest |y|) / (1 + α(k-1))."""
    a = y.abs()
    if y.shape[-2] == 1:
        return a.squeeze(-2)
    top = a.sort(-2, descending=True).values.cumsum(-2)
    k = torch.arange(y.shape[-2], dtype=y.dtype, device=y.device)
    return (top / (1 + alpha * k)[:, None]).amax(-2)


def _owl_prox(w: torch.Tensor, tau: float, alpha: float) -> torch.Tensor:
    r"""prox of τ f over dim -2: soft thresholding by τα, then the prox of τ(1-α)||·||_∞.

    The order is exact (Yu, NeurIPS 2013: prox_{f+g} = prox_f ∘ prox_g when ∂f(prox_g(y)) ⊇ ∂f(y),
    which holds for f = ||·||_∞, g = ||·||_1). The l∞ prox clips |y| at the level θ with
    Σ_k (|y_k| - θ)_+ = τ(1-α) (θ = 0 when ||y||_1 <= τ(1-α)).
    """
    if w.shape[-2] == 1:
        return w - w.clamp(-tau, tau)
    y = w - w.clamp(-tau * alpha, tau * alpha)
    a = y.abs()
    top = a.sort(-2, descending=True).values
    excess = top.cumsum(-2) - tau * (1 - alpha)
    k = torch.arange(1, y.shape[-2] + 1, dtype=y.dtype, device=y.device)[:, None]
    active = (top * k > excess).sum(-2, keepdim=True).clamp(min=1)
    theta = (excess.gather(-2, active - 1) / active).clamp(min=0.0)
    return torch.sign(y) * torch.minimum(a, theta)


def _couple(d: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    r"""Euclidean projection of d (..., K, B) onto {d : ∃g, |d_k - g| <= p_k ∀k} along dim -2.

    The projection is clip(d_k, g - p_k, g + p_k) for the g minimising
    Σ_k dist(d_k, [g - p_k, g + p_k])², the root of the increasing piecewise linear
    h(g) = Σ_k (g - d_k - p_k)_+ - Σ_k (d_k - p_k - g)_+: found between the two sorted
    breakpoints where h changes sign, by linear interpolation.
    """
    lo, hi = d - p, d + p
    points = torch.cat([lo, hi], -2).sort(-2).values  # (..., 2K, B)
    h = ((points[..., None, :] - hi[..., None, :, :]).clamp(min=0.0)
         - (lo[..., None, :, :] - points[..., None, :]).clamp(min=0.0)).sum(-2)
    j = ((h <= 0).sum(-2, keepdim=True) - 1).clamp(max=points.shape[-2] - 2)
    g0, g1 = points.gather(-2, j), points.gather(-2, j + 1)
    h0, h1 = h.gather(-2, j), h.gather(-2, j + 1)
    step = torch.where(h1 > h0, -h0 / (h1 - h0).clamp(min=1e-300), torch.zeros_like(h0))
    g = g0 + step.clamp(0.0, 1.0) * (g1 - g0)
    return torch.minimum(torch.maximum(d, g - p), g + p)


def _project(y: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, p: torch.Tensor | None) -> torch.Tensor:
    """Projection of y = (a; R o) (2^n, T, K, B) onto C = {lo <= a + o <= hi, (a - o)/2 coupled}.

    In s = a + o and d = (a - o)/2 the squared distance is ½||Δs||² + 2||Δd||², so s is clipped
    to the box and d projected onto the coupling set (p=None: no coupling) independently.
    """
    if y.shape[1] == 1:
        return torch.minimum(torch.maximum(y, lo[:, None]), hi[:, None])
    a, o = y[:, 0], y[:, 1].flip(0)
    s = torch.minimum(torch.maximum(a + o, lo), hi)
    d = 0.5 * (a - o)
    if p is not None:
        d = _couple(d, p)
    return torch.stack([0.5 * s + d, (0.5 * s - d).flip(0)], 1)


def _penalties(step: int) -> tuple[float, float]:
    """(rho, c) after ``step`` schedule steps: geometric from the start values to the final ones."""
    f = min(step / _SCHEDULE_STEPS, 1.0)
    return _RHO_START ** (1 - f) * _RHO ** f, _C_START ** (1 - f) * _C ** f


def _admm(games: torch.Tensor, n: int, b: torch.Tensor, p: torch.Tensor | None, *, with_or: bool,
          alpha: float, tol: float, max_iter: int):
    """ADMM on the scaled problem for games (K, B, 2^n) of K models on B samples.

    b: (K, B) noise bounds; p: (K,) bounds of γ_k - γ_shared, or None (no coupling); alpha: the
    weight of Σ_k in the loss f. Returns I_and, I_or, q (K, B, 2^n, unscaled, orders not merged)
    and per-sample diagnostics. One sample's K games share one scale, so that f stays a norm.
    """
    models, batch, size = games.shape
    rho, c = _penalties(0)
    ops = _Operators(n, games.device)
    ops.set_penalty(c)
    scale = _scale(games.reshape(-1, size), b.reshape(-1, 1)).view(models, batch).amax(0)  # (B,)
    v = (games / scale[:, None]).permute(2, 0, 1).contiguous()  # (2^n, K, B)
    width = b / scale
    lo, hi = v - width, v + width
    coupling = None if p is None or models == 1 else (p[:, None] / scale).expand(models, batch)

    # start at γ = q = 0 (a = o = v/2), like the SGD protocol
    x = torch.stack([0.5 * v, 0.5 * v.flip(0)], 1) if with_or else v[:, None].clone()
    z, u = ops.transform(x), torch.zeros_like(x)
    z3, u3 = x.clone(), torch.zeros_like(x)

    best = torch.full((batch,), math.inf, dtype=v.dtype, device=v.device)
    bound = torch.full_like(best, -math.inf)
    best_x = x.clone()
    # a sample's result is frozen at the check that certifies it, as if solved alone: the other
    # samples of the call must not change it (each sample's iterates are its own)
    done = torch.zeros(batch, dtype=torch.bool, device=v.device)
    n_iter = [max_iter] * batch
    it = 0
    while it < max_iter:
        it += 1
        if it % _SCHEDULE_EVERY == 0 and it <= _SCHEDULE_EVERY * _SCHEDULE_STEPS:
            rho_new, c_new = _penalties(it // _SCHEDULE_EVERY)
            u, u3 = u * (rho / rho_new), u3 * (rho * c / (rho_new * c_new))  # the same multipliers
            rho, c = rho_new, c_new
            ops.set_penalty(c)
        x = ops.solve(ops.transform_t(z - u) + c * (z3 - u3))
        w = torch.lerp(z, ops.transform(x), _ALPHA) + u
        z = _owl_prox(w, 1.0 / rho, alpha)
        u = w - z
        y = torch.lerp(z3, x, _ALPHA) + u3
        z3 = _project(y, lo, hi, coupling)
        u3 = y - z3
        if it % _CHECK_EVERY == 0 or it == max_iter:
            primal = _owl(ops.transform(z3), alpha).sum((0, 1))  # the loss of the feasible z3
            better = (primal < best) & ~done
            best = torch.where(better, primal, best)
            best_x = torch.where(better, z3, best_x)
            # two estimates of the multipliers (ρ, σ) of the AND and OR reconstructions: from the
            # normal cone of C at z3 (ρc·u3), and from the subgradients of f (ρ·u pulled back by Tᵀ)
            for dual in (-rho * c * u3, ops.transform_t(rho * u)):
                raised = torch.maximum(bound, _dual_bound(ops, dual, v, width, coupling, alpha))
                bound = torch.where(done, bound, raised)
            certified = ~done & ((best - bound) <= tol * best)
            for k in certified.nonzero().flatten().tolist():
                n_iter[k] = it
            done |= certified
            if bool(done.all()):
                break
    t = ops.transform(best_x) * scale
    i_and = t[:, 0]
    i_or = torch.zeros_like(i_and)
    q = best_x[:, 0] * scale - games.permute(2, 0, 1)
    if with_or:
        i_or = -t[:, 1]
        i_or[0] = t[0, 1]
        q = q + best_x[:, 1].flip(0) * scale
    gap = ((best - bound) / best.clamp(min=1e-300)).clamp(min=0.0)
    diag = [{"solver": "admm", "n_iter": n_iter[k] if done[k] else it, "loss": float(best[k] * scale[k]),
             "lower_bound": float(bound[k] * scale[k]), "gap": float(gap[k]),
             "converged": bool(gap[k] <= tol)} for k in range(batch)]
    return i_and.permute(1, 2, 0), i_or.permute(1, 2, 0), q.permute(1, 2, 0), diag


def _dual_bound(ops: _Operators, dual: torch.Tensor, v: torch.Tensor, width: torch.Tensor,
                p: torch.Tensor | None, alpha: float) -> torch.Tensor:
    r"""(B,) lower bound on the loss from multipliers ρ (AND block) and σ = Rσ' (OR block).

    The dual of the problem is max Σ_k λ_kᵀv_k - b_k||λ_k||_1 - p_k||μ_k||_1 over λ, μ with
    Σ_k μ_k = 0 (μ = 0 without coupling) and f°((Zᵀρ)(S)) <= 1, f°((Wᵀσ)(S)) <= 1 for every S,
    where ρ = λ + μ/2, σ = λ - μ/2, f° is the dual norm of f, Z the zeta and W the OR
    reconstruction matrix, (Wᵀσ)(T) = Σ_{S∩T≠∅} σ_S = Σ_S σ_S - (Zσ)(N\T), (Wᵀσ)(∅) = Σ_S σ_S.
    The estimate is made feasible (μ centred, then everything scaled down) and evaluated.
    """
    if dual.shape[1] == 1:
        lam, mu = dual[:, 0], torch.zeros_like(dual[:, 0])
    else:
        rho, sigma = dual[:, 0], dual[:, 1].flip(0)
        lam, mu = 0.5 * (rho + sigma), rho - sigma
        mu = torch.zeros_like(mu) if p is None else mu - mu.mean(-2, keepdim=True)
    rho = lam + 0.5 * mu
    worst = _owl_dual(ops.zeta_t(rho), alpha).amax(0)
    if dual.shape[1] == 2:
        sigma = lam - 0.5 * mu
        total = sigma.sum(0, keepdim=True)
        w_t = total - ops.zeta(sigma).flip(0)
        w_t[0] = total[0]
        worst = torch.maximum(worst, _owl_dual(w_t, alpha).amax(0))
    shrink = worst.clamp(min=1.0)
    value = (v * lam - width * lam.abs()).sum((0, 1))
    if p is not None:
        value = value - (p * mu.abs()).sum((0, 1))
    return value / shrink


# --------------------------------------------------------------------------------------------
# Exact LP
# --------------------------------------------------------------------------------------------


def _solve_lp(v: np.ndarray, width: float, n: int) -> tuple[np.ndarray, np.ndarray]:
    """x = I_and, y = I_or (zero on |T| <= 1) of the scaled problem, by HiGHS."""
    import scipy.sparse as sp  # checked by and_or_interactions_lp
    from scipy.optimize import linprog

    size = 1 << n
    zeta = sp.csr_matrix(np.ones((1, 1)))
    for _ in range(n):
        zeta = sp.kron(sp.csr_matrix(np.linalg.inv(_MOBIUS)), zeta, format="csr")  # Z[S, T] = [T ⊆ S]
    high = np.flatnonzero(orders(n) >= 2)
    # Σ_{T ⊆ N\S} y_T is row N\S of Z, i.e. the rows of Z in reverse order
    complement = zeta[::-1][:, high]
    ones = sp.csr_matrix(np.ones((size, 1)))
    box = sp.hstack([zeta, -zeta, -complement, complement, ones], format="csr")
    k = len(high)
    sigma_row = sp.hstack([sp.csr_matrix((1, 2 * size)), np.ones((1, k)), -np.ones((1, k)),
                           -np.ones((1, 1))], format="csr")
    cost = np.concatenate([np.ones(2 * size + 2 * k), [0.0]])
    bounds = [(0, None)] * (2 * size + 2 * k) + [(None, None)]
    res = linprog(cost, A_ub=sp.vstack([box, -box], format="csr"),
                  b_ub=np.concatenate([v + width, width - v]), A_eq=sigma_row, b_eq=[0.0],
                  bounds=bounds, method="highs",
                  options={"primal_feasibility_tolerance": 1e-10, "dual_feasibility_tolerance": 1e-10})
    if res.status != 0:
        raise RuntimeError(f"HiGHS failed on the AND-OR LP (status {res.status}: {res.message})")
    x = res.x[:size] - res.x[size:2 * size]
    y = np.zeros(size)
    y[high] = res.x[2 * size:2 * size + k] - res.x[2 * size + k:2 * size + 2 * k]
    return x, y

