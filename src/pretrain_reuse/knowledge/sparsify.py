r"""Sparse AND / AND-OR interactions: remove bounded noise and split a game into AND and OR parts.

The AND-OR decomposition of the SJTU group (Li & Zhang, arXiv 2304.13312; Chen et al., ICLR 2024;
reference note §2) explains a game v by AND interactions of v_and and OR interactions of v_or:

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
condition number grows like φ^{2n}. Four solvers:

* :func:`and_or_interactions` (default): ADMM batched over samples in torch, with an exact
  O(n 2^n) linear solve and a certified duality gap as the stopping rule.
* :func:`and_or_interactions_sgd`: the group's protocol (SGD, momentum 0.9, learning rate decaying
  log-uniformly from lr to lr/10, q clamped before every step), kept as the reference.
* :func:`and_or_interactions_lp`: the exact optimum by HiGHS (small n).
* :func:`and_interactions`: AND only, optionally with the bounded noise q ("mode=q", Ren et al.,
  ICLR 2024): min_{|q|<=b} ||Harsanyi(v + q)||_1; qthres=0 gives plain Harsanyi interactions.

Every solver takes games ``v`` of shape (2^n,) or (B, 2^n) in bitmask layout (numpy or torch;
torch runs on its device) and returns one :class:`~pretrain_reuse.knowledge.Interactions` per game,
always as a list.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from ..artifacts import make_meta
from ..errors import PretrainReuseError
from .interactions import as_games, or_reconstruct_, or_transform_, orders, pairs, subset_sum_, superset_sum_
from .values import Interactions

__all__ = [
    "MAX_LP_PLAYERS",
    "and_interactions",
    "and_or_interactions",
    "and_or_interactions_lp",
    "and_or_interactions_sgd",
]

#: The exact LP has about 2·3^n nonzeros: ~1 s at n = 10, ~15 s at n = 12 for a sparse game, far
#: more for a dense one. Beyond 12 players use :func:`and_or_interactions`.
MAX_LP_PLAYERS = 12

# ADMM settings for the problem scaled to a unit noise box (|q| <= 1), the fastest to a 1e-2 gap
# in a sweep on planted and dense random games at n = 8 and 10 (rho 0.5..2, c 0.03..1,
# alpha 1.6..1.8, an order-dependent penalty r^|T| with r 0.25..4; Anderson acceleration and
# residual balancing of rho did not help).
_RHO = 1.0  # penalty of the L1 blocks; the soft threshold is 1/_RHO
_C = 0.3  # relative weight of the copy (a, o) = z3 that carries the box constraint
_ALPHA = 1.8  # over-relaxation
_CHECK_EVERY = 20  # iterations between duality-gap evaluations


# --------------------------------------------------------------------------------------------
# Public solvers
# --------------------------------------------------------------------------------------------


def and_interactions(v, *, qthres: float = 0.0, tol: float = 1e-2,
                     max_iter: int = 2_000) -> list[Interactions]:
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

    Returns:
        One :class:`Interactions` (kind ``"and"``) per game.
    """
    games, n = _games(v)
    b = _noise_bound(games, qthres)
    params = dict(qthres=qthres, tol=tol, max_iter=max_iter)
    if qthres == 0:
        i_and = subset_sum_(games.clone(), n, -1.0)
        return _results(games, n, b, i_and, torch.zeros_like(games), torch.zeros_like(games), "and",
                        "and_interactions", params, [{"solver": "exact"}] * len(games))
    _check_solver(tol, max_iter)
    i_and, i_or, q, diag = _admm(games, n, b, with_or=False, tol=tol, max_iter=max_iter)
    return _results(games, n, b, i_and, i_or, q, "and", "and_interactions", params, diag)


def and_or_interactions(v, *, qthres: float = 0.04, tol: float = 1e-2,
                        max_iter: int = 2_000) -> list[Interactions]:
    r"""Sparse AND-OR interactions by ADMM with a certified duality gap (the default solver).

    Solves the problem of the module docstring in the variables a = v_and, o = v_or (γ and q
    follow as γ = (a - o)/2, q = a + o - v). With the box scaled to |q| <= 1 and
    C = {(a, o) : |a + o - v| <= 1, o(∅) = 0}, ADMM (Boyd et al. 2011, with over-relaxation) runs on

    .. math::

        \min \|z_1\|_1 + \textstyle\sum_{T \neq \emptyset} |z_2(T)| + \iota_C(z_3)
        \quad \text{s.t.} \quad z_1 = M a,\; z_2 = M R o,\; z_3 = (a, o),

    where R reverses the bitmask (S -> N\S), so I_or(T) = -z_2(T) for T ≠ ∅ (fixing
    I_or(∅) = o(∅) = 0 loses nothing: a constant moves to I_and(∅) at no cost). The a- and o-updates
    solve (MᵀM + cI) x = r exactly: MᵀM = ⊗[[2,-1],[-1,1]] is a Kronecker power, diagonalised by the
    Kronecker power of its 2×2 orthogonal eigenvector matrix, so each solve costs O(n 2^n). The
    other updates are soft thresholding and a per-coalition projection onto the box.

    Every few iterations a dual-feasible point λ of the LP
    max vᵀλ - b||λ||_1 s.t. |Zᵀλ| <= 1, |Wᵀλ| <= 1 (Z, W the AND and OR reconstruction
    matrices) is built from the multipliers of the box and of the AND block and rescaled into
    feasibility, which bounds the optimum from below;
    iteration stops for a sample when (objective - bound) <= tol · objective. The best feasible
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
            2,000 iterations take about a third of the time of the SGD protocol's 10,000 steps.
            The certificate lags the objective: on the benchmark's planted games (n = 10, noise
            0.05) 2,000 iterations end 0.6% above the exact optimum while the certified gap still
            reads up to 11%; noisy games with a small v(N) - v(∅) (dense optima) need 10,000+
            iterations to certify 1% (benchmarks/knowledge.py).

    Returns:
        One :class:`Interactions` (kind ``"and-or"``) per game, orders 0 and 1 merged into AND;
        ``meta`` holds ``objective`` (Σ|I_and| + Σ|I_or|), ``lower_bound``, ``gap`` (relative),
        ``n_iter``, ``converged`` and the noise bound ``b``.
    """
    games, n = _games(v)
    b = _noise_bound(games, qthres)
    _check_solver(tol, max_iter)
    i_and, i_or, q, diag = _admm(games, n, b, with_or=True, tol=tol, max_iter=max_iter)
    return _results(games, n, b, i_and, i_or, q, "and-or", "and_or_interactions",
                    dict(qthres=qthres, tol=tol, max_iter=max_iter), diag)


def and_or_interactions_sgd(v, *, qthres: float = 0.04, lr: float = 1e-5,
                            niter: int = 10_000) -> list[Interactions]:
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

    Returns:
        One :class:`Interactions` (kind ``"and-or"``) per game; ``meta["loss"]`` is the final loss
        before the merge, ``meta["objective"]`` the L1 norm after it.
    """
    games, n = _games(v)
    b = _noise_bound(games, qthres)
    if not (isinstance(lr, (int, float)) and lr > 0 and math.isfinite(lr)):
        raise PretrainReuseError(f"lr={lr!r} must be a positive learning rate, e.g. 1e-5")
    if not isinstance(niter, int) or niter < 1:
        raise PretrainReuseError(f"niter={niter!r} must be a positive number of iterations")
    gamma = torch.zeros_like(games)
    q = torch.zeros_like(games)
    buf_gamma = buf_q = None
    rates = np.logspace(math.log10(lr), math.log10(lr) - 1, niter)
    for it in range(niter):
        q = torch.maximum(torch.minimum(q, b), -b)
        half = 0.5 * (games + q)
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
    return _results(games, n, b, i_and, i_or, q, "and-or", "and_or_interactions_sgd",
                    dict(qthres=qthres, lr=lr, niter=niter), diag)


def and_or_interactions_lp(v, *, qthres: float = 0.04) -> list[Interactions]:
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
    scale = _scale(games, b)
    x_all, y_all = [], []
    for k in range(len(games)):
        x, y = _solve_lp(games[k].cpu().numpy() / float(scale[k]), float(b[k] / scale[k]), n)
        x_all.append(x * float(scale[k]))
        y_all.append(y * float(scale[k]))
    i_and = torch.tensor(np.array(x_all), dtype=torch.float64, device=games.device)
    i_or = torch.tensor(np.array(y_all), dtype=torch.float64, device=games.device)
    q = _reconstruct(i_and, i_or, n) - games
    return _results(games, n, b, i_and, i_or, q, "and-or", "and_or_interactions_lp",
                    dict(qthres=qthres), [{"solver": "highs"}] * len(games))


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


def _noise_bound(games: torch.Tensor, qthres: float) -> torch.Tensor:
    """(B, 1) b = qthres · |v(N) - v(∅)| (the group's ``qstd="vN-v0"``)."""
    if not isinstance(qthres, (int, float)) or not 0 <= qthres < math.inf:
        raise PretrainReuseError(f"qthres={qthres!r} must be a finite number >= 0 (the group uses 0.04)")
    return qthres * (games[:, -1:] - games[:, :1]).abs()


def _scale(games: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(B, 1) unit in which the solvers work: b, or (b = 0) 4% of the game's range, or 1."""
    spread = 0.04 * (games - games[:, :1]).abs().amax(dim=1, keepdim=True)
    return torch.where(b > 0, b, torch.where(spread > 0, spread, torch.ones_like(spread)))


def _check_solver(tol: float, max_iter: int) -> None:
    if not isinstance(tol, (int, float)) or not 0 < tol < 1:
        raise PretrainReuseError(f"tol={tol!r} must be a relative duality gap in (0, 1), e.g. 1e-3")
    if not isinstance(max_iter, int) or max_iter < 1:
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


def _results(games, n, b, i_and, i_or, q, kind, producer, params, diag) -> list[Interactions]:
    i_and, i_or = i_and.clone(), i_or.clone()
    if kind == "and-or":
        _merge_low_orders(i_and, i_or, n)
    objective = (i_and.abs().sum(-1) + i_or.abs().sum(-1)).tolist()
    out = []
    for k in range(len(games)):
        meta = make_meta(f"pretrain_reuse.knowledge.{producer}", params)
        meta.update(diag[k], objective=objective[k], b=float(b[k]))
        out.append(Interactions(n=n, and_values=i_and[k].cpu().numpy(), or_values=i_or[k].cpu().numpy(),
                                v=games[k].cpu().numpy(), noise=q[k].cpu().numpy(), kind=kind, meta=meta))
    return out


# --------------------------------------------------------------------------------------------
# ADMM
# --------------------------------------------------------------------------------------------

_MOBIUS = np.array([[1.0, 0.0], [-1.0, 1.0]])  # per player: I(S ∪ i) = v(S ∪ i) - v(S)
_MTM_VALUES, _MTM_VECTORS = np.linalg.eigh(_MOBIUS.T @ _MOBIUS)  # [[2,-1],[-1,1]] = Q Λ Qᵀ


class _Kron:
    """x ↦ (m ⊗ ... ⊗ m) x on the last axis of (B, 2^n) tensors, for a 2×2 matrix m with m00 ≠ 0.

    Per player two in-place shears, lo += t·hi then hi += u·lo, followed by one diagonal scaling:
    m = diag(m00, m11 - m10·t) · [[1, 0], [u, 1]] · [[1, t], [0, 1]] with t = m01/m00 and
    u = m10/(m11 - m10·t). The scalings of different players commute with the shears of the
    others, so they are collected into one vector and applied once (2n + 1 tensor ops in all).
    """

    def __init__(self, m: np.ndarray, n: int, device: torch.device):
        self.n = n
        self.t = float(m[0, 1] / m[0, 0])
        high = m[1, 1] - m[1, 0] * self.t
        self.u = float(m[1, 0] / high)
        scale = np.ones(1)
        for _ in range(n):  # bit i of the mask picks m00 (player absent) or `high` (present)
            scale = np.concatenate([scale * m[0, 0], scale * high])
        self.scale = torch.tensor(scale, dtype=torch.float64, device=device)

    def shears(self, x: torch.Tensor) -> torch.Tensor:
        """The transform without the final scaling, on a copy of x."""
        x = x.clone()
        for i in range(self.n):
            lo, hi = pairs(x, self.n, i)
            lo.add_(hi, alpha=self.t)
            hi.add_(lo, alpha=self.u)
        return x


class _Operators:
    """The Kronecker-structured linear algebra of the ADMM for n players on one device."""

    def __init__(self, n: int, device: torch.device):
        self.n = n
        # MᵀM = ⊗[[2,-1],[-1,1]] = B diag(Λ) Bᵀ with B = ⊗Q; eigh's Q is symmetric here, so Bᵀ = B
        assert np.allclose(_MTM_VECTORS, _MTM_VECTORS.T)
        self.basis = _Kron(_MTM_VECTORS, n, device)
        eig = np.ones(1)
        for _ in range(n):
            eig = np.concatenate([eig * _MTM_VALUES[0], eig * _MTM_VALUES[1]])
        # B (D^-1 (B r)) = s ⊙ S(D^-1 ⊙ s ⊙ S(r)) for B = diag(s) S
        self.inverse = torch.tensor(1.0 / (eig + _C), dtype=torch.float64, device=device) * self.basis.scale

    def solve(self, r: torch.Tensor) -> torch.Tensor:
        """(MᵀM + c I)^{-1} r."""
        return self.basis.scale * self.basis.shears(self.inverse * self.basis.shears(r))

    def mobius(self, x: torch.Tensor) -> torch.Tensor:
        return subset_sum_(x.clone(), self.n, -1.0)

    def mobius_t(self, x: torch.Tensor) -> torch.Tensor:
        return superset_sum_(x.clone(), self.n, -1.0)

    def zeta(self, x: torch.Tensor) -> torch.Tensor:
        return subset_sum_(x.clone(), self.n, 1.0)

    def zeta_t(self, x: torch.Tensor) -> torch.Tensor:
        return superset_sum_(x.clone(), self.n, 1.0)


def _project(y: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, with_or: bool) -> torch.Tensor:
    """Projection of stacked (a; R o) onto C = {lo <= a + o <= hi, o(∅) = 0} (or lo <= a <= hi).

    For the pair, a and o move by the same amount until a + o is inside the box (the closest
    point in the Euclidean norm); o(∅), entry N of R o, is pinned to 0 and a(∅) clipped alone.
    """
    if not with_or:
        return torch.minimum(torch.maximum(y, lo), hi)
    a, o = y.chunk(2)
    o = o.flip(-1)
    s = a + o
    shift = 0.5 * (torch.minimum(torch.maximum(s, lo), hi) - s)
    a_new, o_new = a + shift, o + shift
    a_new[:, 0] = torch.minimum(torch.maximum(a[:, 0], lo[:, 0]), hi[:, 0])
    o_new[:, 0] = 0.0
    return torch.cat([a_new, o_new.flip(-1)])


def _admm(games: torch.Tensor, n: int, b: torch.Tensor, *, with_or: bool, tol: float, max_iter: int):
    """ADMM on the scaled problem; returns I_and, I_or, q (unscaled) and per-game diagnostics.

    The AND block (a, z1 = M a) and the OR block (R o, z2 = M R o) have the same form in the
    reversed coordinates R o, so both are stacked into one (2B, 2^n) tensor and updated together;
    only the projection couples them.
    """
    ops = _Operators(n, games.device)
    scale = _scale(games, b)
    v = games / scale
    width = b / scale  # 1, or 0 when qthres = 0 or v(N) = v(∅)
    lo, hi = v - width, v + width
    batch = len(v)

    # start at γ = q = 0 (a = o = v/2) like the SGD protocol, with o(∅) moved into a(∅)
    if with_or:
        a, o = 0.5 * v, 0.5 * v
        a[:, 0], o[:, 0] = v[:, 0], 0.0
        x = torch.cat([a, o.flip(-1)])
    else:
        x = v.clone()
    # entry ∅ of z2 = M R o is o(N), not an interaction: it is not penalised
    free = torch.zeros_like(x, dtype=torch.bool)
    free[batch:, 0] = True
    z, u = ops.mobius(x), torch.zeros_like(x)
    z3, u3 = x.clone(), torch.zeros_like(x)

    best = torch.full((batch,), math.inf, dtype=v.dtype, device=v.device)
    bound = torch.full_like(best, -math.inf)
    best_x = x.clone()
    it = 0
    while it < max_iter:
        it += 1
        x = ops.solve(ops.mobius_t(z - u) + _C * (z3 - u3))
        w = torch.lerp(z, ops.mobius(x), _ALPHA) + u
        z = torch.where(free, w, w - w.clamp(-1.0 / _RHO, 1.0 / _RHO))  # soft thresholding
        u = w - z
        y = torch.lerp(z3, x, _ALPHA) + u3
        z3 = _project(y, lo, hi, with_or)
        u3 = y - z3
        if it % _CHECK_EVERY == 0 or it == max_iter:
            # Σ|I_and| + Σ|I_or| of the feasible point z3 (I_or = -M R o off ∅, I_or(∅) = 0)
            primal = torch.where(free, 0.0, ops.mobius(z3).abs()).reshape(-1, batch, 1 << n).sum((0, 2))
            better = primal < best
            best = torch.where(better, primal, best)
            best_x = torch.where(better.repeat(len(x) // batch)[:, None], z3, best_x)
            # two estimates of the LP's row multipliers: from the box block, and from the L1
            # block (ρ·u is a subgradient of |I_and|, so λ = Mᵀ(ρ·u) has |Zᵀλ| <= 1)
            for lam in (-_RHO * _C * u3[:batch], ops.mobius_t(_RHO * u[:batch])):
                bound = torch.maximum(bound, _dual_bound(ops, lam, v, width, with_or))
            if bool(((best - bound) <= tol * best).all()):
                break
    best_a = best_x[:batch]
    best_o = best_x[batch:].flip(-1) if with_or else torch.zeros_like(v)
    i_and = ops.mobius(best_a) * scale
    i_or = torch.zeros_like(v)
    if with_or:
        i_or = -ops.mobius(best_x[batch:]) * scale
        i_or[:, 0] = 0.0
    q = (best_a + best_o) * scale - games
    gap = ((best - bound) / best.clamp(min=1e-300)).clamp(min=0.0)
    diag = [{"solver": "admm", "n_iter": it, "lower_bound": float(bound[k] * scale[k]),
             "gap": float(gap[k]), "converged": bool(gap[k] <= tol)} for k in range(batch)]
    return i_and, i_or, q, diag


def _dual_bound(ops: _Operators, lam: torch.Tensor, v: torch.Tensor, width: torch.Tensor,
                with_or: bool) -> torch.Tensor:
    r"""(B,) lower bound vᵀλ - w||λ||_1 after scaling λ into |Zᵀλ| <= 1 (and |Wᵀλ| <= 1).

    (Zᵀλ)(T) = Σ_{S⊇T} λ_S; (Wᵀλ)(T) = Σ_{S∩T≠∅} λ_S = Σ_S λ_S - Σ_{S⊆N\T} λ_S.
    """
    worst = ops.zeta_t(lam).abs().amax(-1)
    if with_or:
        w_t = lam.sum(-1, keepdim=True) - ops.zeta(lam).flip(-1)
        worst = torch.maximum(worst, w_t.abs().amax(-1))
    lam = lam / worst.clamp(min=1.0)[:, None]
    return (v * lam).sum(-1) - width[:, 0] * lam.abs().sum(-1)


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

