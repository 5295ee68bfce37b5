r"""Cost matrices and the entropic unbalanced optimal-transport solver used for data selection.

Liu et al. (NeurIPS 2022, problem (5)) score every pre-training unit by the row mass of the plan of

.. math::

    \min_{P \ge 0} \langle C, P \rangle + \varepsilon\,\mathrm{KL}(P \,\|\, a \otimes b)
        + \tau_a\,\mathrm{KL}(P\mathbf 1 \,\|\, a) + \tau_b\,\mathrm{KL}(P^\top \mathbf 1 \,\|\, b)

between source units (rows, weights ``a``) and target units (columns, weights ``b``), with
``eps=1``, ``tau_a=1`` (pre-training side, weak) and ``tau_b=100`` (target side, strong) on the
cost ``C = (1 - cos) / eps_c``. ``KL`` is the generalised divergence
``KL(x||y) = sum x log(x/y) - x + y``. With unit weights ``a = b = 1`` the entropy term equals the
paper's ``eps * sum P (log P - 1)`` up to the constant ``eps * n * m``, so the plan is the same.

The solver works with the dual potentials ``f, g`` (``P = (a ⊗ b) exp((f ⊕ g - C)/eps)``), so
nothing is exponentiated where it underflows: costs up to ``2/eps_c = 2000`` in float32 are fine.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from .errors import PretrainReuseError, as_array, check_choice, check_int, check_positive

__all__ = [
    "METRICS",
    "UOTResult",
    "cost_matrix",
    "unbalanced_sinkhorn",
    "unbalanced_sinkhorn_batched",
]


# --------------------------------------------------------------------------------------------
# Cost matrices
# --------------------------------------------------------------------------------------------


def _cosine_distance(source: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    s, t = _unit_rows(source, "source"), _unit_rows(target, "target")
    # 1 - cos in place: every fresh (n, m) matrix is page-faulted in, which costs more than
    # the arithmetic on it (measured: 0.3-0.5 s per 400 MB on the 2-core machine)
    return (s @ t.transpose(-1, -2)).neg_().add_(1.0).clamp_(min=0.0)


def _unit_rows(x: torch.Tensor, name: str) -> torch.Tensor:
    """Rows scaled to unit norm whatever their size: first by their largest entry, as a norm of
    rows of 1e-30 (1e30) underflows (overflows) in float32, and ``normalize`` would then scale
    them wrongly or call them zero."""
    scale = x.abs().amax(dim=-1, keepdim=True)
    zero = (scale == 0).nonzero()
    if len(zero):  # no direction: it would be equally far from everything, silently
        raise PretrainReuseError(
            f"{name} unit {int(zero[0, -2])} is an all-zero vector, which has no cosine "
            "distance; use --metric l2 (metric='l2'), or rebuild the units without it: remove "
            "the samples whose features are all zero from the data and embed again (or its row "
            "from a .npy prototype matrix)")
    x = x / scale
    return x / x.norm(dim=-1, keepdim=True)


def _l2_distance(source: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    # the exact difference-based path: the matmul shortcut loses ~1e-3 relative in float32
    return torch.cdist(source, target, compute_mode="donot_use_mm_for_euclid_dist")


def _sql2_distance(source: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return _l2_distance(source, target).square_()


#: Distances between unit prototypes; the cost is ``distance / eps_c``. ``l2`` and ``sqeuclidean``
#: act on the prototypes as given (the paper's UOT_l2 / GOT_l2 use unnormalised class means).
METRICS = {"cosine": _cosine_distance, "l2": _l2_distance, "sqeuclidean": _sql2_distance}


def cost_matrix(source, target, *, metric: str = "cosine", eps_c: float = 0.01):
    r"""Cost between source units (rows) and target units (columns): ``C_ji = d(s_j, t_i) / eps_c``.

    With ``metric="cosine"``, ``d = 1 - cos(s_j, t_i)`` and ``C`` lies in ``[0, 2/eps_c]``; this is
    the ``(1 - cos)/eps_c`` form of Liu et al. (NeurIPS 2022, eq. 5; ``eps_c = 0.01`` reproduces
    their Table 4). ``"l2"`` is the Euclidean and ``"sqeuclidean"`` the squared Euclidean distance.

    Args:
        source: (n, d) prototypes, numpy or torch.
        target: (m, d) prototypes of the same type and feature dimension.
        metric: one of :data:`METRICS`.
        eps_c: positive scale dividing the distance.

    Returns:
        (n, m) cost in the type, dtype and device of ``source``.
    """
    distance = METRICS[check_choice("metric", metric, METRICS)]
    eps_c = check_positive("eps_c", eps_c)
    s, to_user = _to_tensor(source, "source")
    t, _ = _to_tensor(target, "target")
    if s.ndim != 2 or t.ndim != 2:
        raise PretrainReuseError(
            f"source and target must be 2-d (units, features), got shapes {tuple(s.shape)} and "
            f"{tuple(t.shape)}")
    if s.shape[-1] != t.shape[-1]:
        raise PretrainReuseError(
            f"source has feature dimension {s.shape[-1]} but target has {t.shape[-1]}; "
            "embed both with the same backbone and layer"
        )
    t = t.to(dtype=s.dtype, device=s.device)
    d = distance(s, t)
    dtype = str(d.dtype).removeprefix("torch.")
    # cosine distances lie in [0, 2]: only a tiny eps_c overflows them, and no pass over the
    # distances is needed to tell; l2 distances of huge features overflow themselves (NaN inputs
    # are refused by the solver with its own message)
    largest = 2.0 if metric == "cosine" else d.max().item() if d.numel() else 0.0
    if math.isinf(largest) and torch.isfinite(s).all() and torch.isfinite(t).all():
        raise PretrainReuseError(
            f"the {metric} distances of these prototypes overflow {dtype} (entries up to "
            f"{max(s.abs().max().item(), t.abs().max().item()):.3g}); rescale the features, "
            "compute in float64, or use metric cosine")
    if math.isfinite(largest) and largest / eps_c > torch.finfo(d.dtype).max:
        raise PretrainReuseError(f"the costs distance / eps_c overflow {dtype} at "
                                 f"eps_c={eps_c:g}; raise eps_c, or compute in float64")
    # in place, as the distances are, unless autograd needs them (cdist's backward reads them)
    return to_user(d / eps_c if d.requires_grad else d.div_(eps_c))


# --------------------------------------------------------------------------------------------
# The result
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class UOTResult:
    """Solution of an entropic unbalanced OT problem, in the array type of the inputs.

    In the batched form every field but ``eps``, ``tau_a`` and ``tau_b`` carries a leading batch
    dimension ``B``.

    Attributes:
        f, g: dual potentials, (n,) and (m,); ``log P = log a ⊕ log b + (f ⊕ g - C)/eps``.
        log_row_mass: ``log(P 1)``, (n,): the selection score of each source unit.
        log_col_mass: ``log(P^T 1)``, (m,); ``-inf`` on padded columns (``b = 0``).
        objective: the full primal objective ``entropic_cost + kl_a + kl_b``. Summed in float64
            from the marginals, it overflows (inf or NaN) only where the masses exceed float64's
            range: a solve stopped far from convergence (``converged`` False), or costs so
            negative that the optimal plan's own mass does (a cost of -1e5 at ``eps = tau = 1``).
        entropic_cost: ``<C, P> + eps * KL(P || a ⊗ b)``.
        kl_a, kl_b: the marginal penalties ``tau_a * KL(P1 || a)`` and ``tau_b * KL(P^T1 || b)``.
        marginal_error_a, marginal_error_b: max violation, in log space, of the optimality
            conditions ``P1 = a exp(-f/tau_a)`` and ``P^T 1 = b exp(-g/tau_b)``.
        n_iter: iterations used (batched: each problem's own, as its separate solve's).
        converged: whether the potentials moved less than ``tol * eps`` in the last iteration
            (or as little as the dtype's rounding allows) *and* the optimality conditions hold
            to within ``MARGINAL_TOL`` nats: a problem the dtype cannot resolve (float32 with a
            tiny ``eps``) is not converged, however still its potentials are.
        eps, tau_a, tau_b: the regularisation the problem was solved with.
    """

    f: Any
    g: Any
    log_row_mass: Any
    log_col_mass: Any
    objective: Any
    entropic_cost: Any
    kl_a: Any
    kl_b: Any
    marginal_error_a: Any
    marginal_error_b: Any
    n_iter: Any
    converged: Any
    eps: float
    tau_a: float
    tau_b: float

    def __repr__(self) -> str:  # a summary: the dataclass repr would print every potential
        n, m = self.f.shape[-1], self.g.shape[-1]
        if self.f.ndim == 1:
            return (f"UOTResult(shape=({n}, {m}), n_iter={self.n_iter}, converged={self.converged}, "
                    f"objective={self.objective:.6g})")
        return (f"UOTResult(batch={self.f.shape[0]}, shape=({n}, {m}), n_iter={int(self.n_iter.max())}, "
                f"converged={int(self.converged.sum())} of {self.f.shape[0]})")

    def log_plan(self, a, b, cost):
        """``log P`` (n, m) for the inputs the problem was solved on; never exponentiated.

        Returned as the potentials are (a NumPy array, or a tensor on their device), whatever
        ``a``, ``b`` and ``cost`` are: the solver takes weights on the CPU beside a CUDA cost."""
        f, to_user = _to_tensor(self.f, "f")
        g, _ = _to_tensor(self.g, "g")
        a_t, b_t, c_t = (_to_tensor(x, name)[0].to(f.device)
                         for x, name in ((a, "a"), (b, "b"), (cost, "cost")))
        # batched: a is the (n,) source weights all problems share
        if (a_t.shape not in (f.shape, f.shape[-1:]) or b_t.shape != g.shape
                or c_t.shape != (*f.shape, g.shape[-1])):
            raise PretrainReuseError(
                f"log_plan takes the a, b and cost the problem was solved on: a {tuple(f.shape[-1:])}, "
                f"b {tuple(g.shape)}, cost {(*f.shape, g.shape[-1])}; got {tuple(a_t.shape)}, "
                f"{tuple(b_t.shape)}, {tuple(c_t.shape)}")
        c_t = c_t.to(f.dtype)
        return to_user(
            torch.log(a_t.to(f.dtype))[..., :, None]
            + torch.log(b_t.to(f.dtype))[..., None, :]
            + (f[..., :, None] + g[..., None, :] - c_t) / self.eps
        )

    def plan(self, a, b, cost):
        """The plan ``P`` (n, m); entries below the dtype's range are 0."""
        lp = self.log_plan(a, b, cost)
        return np.exp(lp) if isinstance(lp, np.ndarray) else lp.exp()


# --------------------------------------------------------------------------------------------
# Solver
# --------------------------------------------------------------------------------------------


def unbalanced_sinkhorn(
    a, b, cost, eps: float = 1.0, tau_a: float = 1.0, tau_b: float = 100.0, *,
    max_iter: int = 1000, tol: float = 1e-6, dtype: torch.dtype | None = None,
) -> UOTResult:
    r"""Entropic unbalanced OT with KL marginal penalties ``tau_a != tau_b``, in the log domain.

    Solves

    .. math::

        \min_{P \ge 0} \langle C, P \rangle + \varepsilon\,\mathrm{KL}(P \| a \otimes b)
            + \tau_a \mathrm{KL}(P\mathbf 1 \| a) + \tau_b \mathrm{KL}(P^\top\mathbf 1 \| b)

    by the generalised Sinkhorn iterations of Chizat, Peyré, Schmitzer & Vialard (2018) on the
    dual potentials, with ``lambda = tau / (tau + eps)``:

    .. math::

        f_j \leftarrow -\lambda_a \varepsilon \log \textstyle\sum_i b_i e^{(g_i - C_{ji})/\varepsilon},
        \qquad
        g_i \leftarrow -\lambda_b \varepsilon \log \textstyle\sum_j a_j e^{(f_j - C_{ji})/\varepsilon}.

    Each log-sum-exp is a matrix-vector product with a cached kernel re-centred on the current
    potentials whenever they drift (stabilised scaling, Schmitzer 2019), so the iterations cost a
    GEMV, not an ``exp`` of the whole matrix, and stay finite in float32 for any cost; sums whose
    terms would underflow are recomputed exactly. The potentials are over-relaxed with the factor
    that is optimal for the contraction rate ``lambda_a * lambda_b`` (Thibault et al. 2017), which
    halves the iteration count, and after each iteration shifted to ``(f + t, g - t)`` with the
    dual-optimal ``t`` in closed form (translation-invariant Sinkhorn, Séjourné et al. 2022): the
    plan does not change, but the common shift that Sinkhorn removes slowly when the taus are
    large (POT: thousands of iterations at ``tau = 100 eps``) is gone at once. Same fixed point
    as POT's ``ot.unbalanced.sinkhorn_unbalanced(a, b, cost, reg=eps, reg_m=(tau_a, tau_b))``.
    Used for pre-training data selection by Liu et al. (NeurIPS 2022), who rank source units by
    ``P 1`` (here ``log_row_mass``).

    Args:
        a: (n,) positive source weights (the paper: all ones).
        b: (m,) positive target weights (the paper: all ones).
        cost: (n, m) cost matrix, e.g. from :func:`cost_matrix`.
        eps: entropic regularisation ``> 0`` (paper: 1.0).
        tau_a, tau_b: marginal penalties ``> 0``; ``float('inf')`` enforces that marginal exactly
            (then the total masses must agree). Paper: 1.0 and 100.0.
        max_iter: iteration cap; if reached, ``converged`` is False (check it).
        tol: stop when no potential moves more than ``tol * eps`` in one iteration (or, in
            float32, less than its own rounding error, about ``1e-6 * max|f| / eps``); at most
            ``LOOSEST_TOL`` (1e-3), beyond which the marginals would be off when it stops.
        dtype: working dtype (default: that of ``cost``); float32 is safe on GPU.

    Returns:
        :class:`UOTResult` with numpy arrays for numpy inputs, torch tensors (on the device of
        ``cost``) for torch inputs.
    """
    cost_t, to_user = _to_tensor(cost, "cost")
    if cost_t.ndim != 2:
        raise PretrainReuseError(f"cost must be a 2-d (n, m) matrix, got shape {tuple(cost_t.shape)}")
    a_t, b_t = _to_tensor(a, "a")[0], _to_tensor(b, "b")[0]
    if b_t.ndim != 1:
        raise PretrainReuseError(
            f"b must be 1-d with one weight per target unit, got shape {tuple(b_t.shape)}; "
            "use unbalanced_sinkhorn_batched for several target sets"
        )
    if a_t.shape != cost_t.shape[:1] or b_t.shape != cost_t.shape[1:]:
        raise PretrainReuseError(
            f"shapes disagree: cost is {tuple(cost_t.shape)} but a is {tuple(a_t.shape)} and b is "
            f"{tuple(b_t.shape)}; a needs one weight per cost row, b one per cost column"
        )
    out = _solve(a_t, b_t[None], cost_t[None], eps, tau_a, tau_b, max_iter, tol, dtype,
                 allow_padding=False)
    return _finish(out, to_user, squeeze=True)


def unbalanced_sinkhorn_batched(
    a, b, cost, eps: float = 1.0, tau_a: float = 1.0, tau_b: float = 100.0, *,
    max_iter: int = 1000, tol: float = 1e-6, dtype: torch.dtype | None = None,
) -> UOTResult:
    """:func:`unbalanced_sinkhorn` for one source against ``B`` target sets in one call.

    Args:
        a: (n,) source weights, shared by all problems.
        b: (B, m) target weights; target sets of different sizes are padded to ``m`` with
            weight 0 (a padded column receives no mass and its potential is 0).
        cost: (B, n, m) costs (padded columns may hold any finite value).

    The problems are solved together (batched GEMVs); iteration stops when all have converged,
    and each problem keeps the potentials of the iteration at which it converged, so the result
    is that of separate solves. Every field of the result has a leading dimension ``B``;
    ``converged`` is a (B,) bool array and ``n_iter`` a (B,) int array.
    """
    cost_t, to_user = _to_tensor(cost, "cost")
    a_t, b_t = _to_tensor(a, "a")[0], _to_tensor(b, "b")[0]
    if cost_t.ndim != 3 or b_t.ndim != 2:
        raise PretrainReuseError(
            f"batched form takes b (B, m) and cost (B, n, m), got b {tuple(b_t.shape)} and cost "
            f"{tuple(cost_t.shape)}; use unbalanced_sinkhorn for a single problem"
        )
    out = _solve(a_t, b_t, cost_t, eps, tau_a, tau_b, max_iter, tol, dtype, allow_padding=True)
    return _finish(out, to_user, squeeze=False)


def _to_tensor(x, name: str) -> tuple[torch.Tensor, Any]:
    """Tensor view of ``x`` (real numbers only) and a function turning results back into the
    caller's array type."""
    if isinstance(x, torch.Tensor):
        if x.is_complex():
            raise PretrainReuseError(f"{name} holds complex numbers; pass a real array")
        return x, lambda y: y
    arr = as_array(name, x)
    if arr.dtype.kind not in "biuf":  # strings, objects, complex numbers
        raise PretrainReuseError(f"{name} holds {arr.dtype} values, not real numbers; pass a "
                                 "float array")
    if not np.issubdtype(arr.dtype, np.floating):
        arr = arr.astype(np.float64)
    with warnings.catch_warnings():
        # a read-only array (a memory-mapped .npy): nothing here writes into the inputs, and
        # a copy of a large cost would double its memory
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return torch.from_numpy(np.ascontiguousarray(arr)), lambda y: y.cpu().numpy()


def check_solver_params(eps: float, tau_a: float, tau_b: float, max_iter: int, tol: float
                        ) -> tuple[float, float, float, int, float]:
    """``eps, tau_a, tau_b, max_iter, tol`` as Python floats and an int, after checking them
    (NumPy scalars are numbers too): :func:`unbalanced_sinkhorn` and ``SelectConfig`` share it."""
    eps = check_positive("eps", eps)
    tau_a = check_positive("tau_a", tau_a, allow_inf=True)
    tau_b = check_positive("tau_b", tau_b, allow_inf=True)
    tol = check_positive("tol", tol)
    if tol > LOOSEST_TOL:
        raise PretrainReuseError(
            f"tol={tol!r} is too loose: the solver would stop with its marginals off by more than "
            f"{MARGINAL_TOL} nats and report no convergence; pass tol <= {LOOSEST_TOL} (default 1e-6)")
    return eps, tau_a, tau_b, check_int("max_iter", max_iter, minimum=1), tol


def _check_problem(a, b, cost, tau_a, tau_b, dtype, allow_padding):
    if dtype not in (None, torch.float32, torch.float64):
        raise PretrainReuseError(f"dtype must be torch.float32 or torch.float64, got {dtype!r}")
    for name, x in (("cost", cost), ("a", a), ("b", b)):
        if x.requires_grad:
            raise PretrainReuseError(f"{name} requires grad; pass {name}.detach() (the solver is "
                                     "not differentiable)")
    bsz, n, m = cost.shape
    if n == 0 or m == 0:
        raise PretrainReuseError(f"cost has shape {tuple(cost.shape)}; it needs at least one "
                                 "source and one target unit")
    if a.shape != (n,) or b.shape != (bsz, m):
        raise PretrainReuseError(
            f"shapes disagree: cost is {tuple(cost.shape)} but a is {tuple(a.shape)} and b is "
            f"{tuple(b.shape)}; a needs one weight per cost row, b one per cost column"
        )
    # NaN/inf in the cost are caught by the first kernel build (_RowLSE), which reads every entry
    # anyway: a separate pass here would cost as much as an iteration.
    if not (torch.isfinite(a).all() and (a > 0).all()):
        raise PretrainReuseError("a must hold finite positive weights (one per source unit)")
    bad_b = ~torch.isfinite(b) | (b < 0) | (~torch.tensor(allow_padding) & (b == 0))
    if bad_b.any() or not (b > 0).any(dim=1).all():
        raise PretrainReuseError(
            "b must hold finite positive weights (one per target unit)"
            + ("; 0 marks padding, and every problem needs one positive weight" if allow_padding else "")
        )
    if math.isinf(tau_a) and math.isinf(tau_b):
        mass_a, mass_b = a.sum().item(), b.sum(dim=1)
        if not torch.allclose(mass_b, torch.full_like(mass_b, mass_a), rtol=1e-6):
            raise PretrainReuseError(
                f"tau_a = tau_b = inf is balanced OT and needs sum(a) == sum(b); got {mass_a:g} "
                f"and {mass_b.tolist()}; normalise the weights or use finite tau"
            )


def _lam(tau: float, eps: float) -> float:
    return 1.0 if math.isinf(tau) else tau / (tau + eps)


#: The largest violation, in log space (nats: 0.01 is a 1 % error in a marginal mass), of the
#: optimality conditions a solution may have and be called converged. Sinkhorn meets it at any
#: ``tol`` <= 1e-3; it is there for float32 at tiny ``eps``, where the potentials stop moving at
#: their rounding error while the marginals are still off by whole nats.
MARGINAL_TOL = 1e-2

#: The loosest ``tol`` accepted: the one at which Sinkhorn still meets MARGINAL_TOL.
LOOSEST_TOL = 1e-3

#: Cost entries per chunk when the kernel is built: the chunk stays in cache through the build's
#: half-dozen elementwise steps, so the cost is read from memory once and the kernel written once.
_CHUNK = 1 << 18


def _empty_large(*shape: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``torch.empty`` that, on the CPU, takes its memory from NumPy.

    NumPy asks Linux for transparent huge pages on large blocks (``madvise``) and torch does not,
    so the first write into a fresh (n, m) kernel pays one page fault per 4 KiB: measured at
    20000 x 1000 float32 on the 2-core development machine, filling it took 80-90 ms from torch's
    allocator and 22-28 ms from NumPy's, a third of a whole float32 solve.
    """
    if device.type != "cpu":
        return torch.empty(shape, dtype=dtype, device=device)
    numpy_dtype = {torch.float32: np.float32, torch.float64: np.float64}[dtype]
    return torch.from_numpy(np.empty(shape, dtype=numpy_dtype))


class _RowLSE:
    r"""``LSE_i[h_i - C_ji/eps]`` for every row j, for changing h, via a re-centred kernel.

    ``K_ji = exp(h0_i - C_ji/eps - r_j)`` with ``r_j = max_i(h0_i - C_ji/eps)`` so each row of K
    has maximum 1; then ``LSE = r_j + log sum_i K_ji exp(h_i - h0_i)``, exact as long as
    ``h - h0`` stays within ``drift`` of a constant (re-centred otherwise). ``h = -inf`` marks padded columns.
    """

    def __init__(self, cost: torch.Tensor, eps: float, dtype: torch.dtype):
        self.cost, self.eps, self.dtype = cost, eps, dtype
        # float32 keeps ~87 nats of range; 30 leaves room for the sum and for lost tails.
        self.drift = 30.0 if dtype == torch.float32 else 300.0
        # exp with a subnormal result is ~100x slower and adds nothing a sum of at most 1e9 terms
        # can see, so the exponent is floored one nat above log(tiny) (log(tiny) itself, rounded
        # to float32, still gives a subnormal).
        self.floor = math.log(torch.finfo(dtype).tiny) + 1.0
        bsz, n, m = cost.shape
        self.threads = torch.get_num_threads()  # for the rebuilds, which run inside the solver's loop
        self.h0 = None
        self.r = torch.empty(bsz, n, dtype=dtype, device=cost.device)
        self.kernel = _empty_large(bsz, n, m, dtype=dtype, device=cost.device)

    def _recentre(self, h: torch.Tensor) -> torch.Tensor:
        """Rebuild the kernel around ``h``; returns the LSE at ``h`` (the kernel's row sums).

        The first build also checks the cost for NaN/inf entries.
        """
        with _torch_threads(self.threads):
            return self._build(h)

    def _build(self, h: torch.Tensor) -> torch.Tensor:
        bsz, n, m = self.cost.shape
        first = self.h0 is None
        self.h0 = h.clone()
        sums = torch.empty_like(self.r)
        rows = max(1, _CHUNK // m)
        for k in range(bsz):
            total = torch.zeros((), dtype=torch.float64, device=self.cost.device)
            for s in range(0, n, rows):
                # built in place, so no temporaries; the copy casts to the working dtype
                kernel = self.kernel[k, s:s + rows].copy_(self.cost[k, s:s + rows])
                if first:  # NaN/inf propagate into the sum
                    total += kernel.sum()
                torch.add(h[k], kernel, alpha=-1.0 / self.eps, out=kernel)
                r = self.r[k, s:s + rows]
                torch.amax(kernel, dim=1, out=r)
                # exp(x) as 2^(x log2(e)): exp2 is ~40% faster than exp on the CPU
                kernel.sub_(r[:, None]).clamp_(min=self.floor).mul_(1.0 / math.log(2.0)).exp2_()
                torch.sum(kernel, dim=1, out=sums[k, s:s + rows])
            # a huge finite cost can overflow the sum (or the cast): only then does the exact check run
            if first and not torch.isfinite(total) and not torch.isfinite(self.cost[k]).all():
                raise PretrainReuseError("cost has NaN/inf entries; check the prototypes for NaN rows")
        return self.r + torch.log(sums)

    def __call__(self, h: torch.Tensor) -> torch.Tensor:
        if self.h0 is None:
            return self._recentre(h)
        valid = torch.isfinite(h)
        dh = h - self.h0
        # A common shift c of h shifts every LSE by c exactly, so only the spread of the drift
        # around its midrange needs the kernel rebuilt: the translation step moves the
        # potentials by a constant each iteration.
        top = torch.where(valid, dh, -math.inf).amax(dim=1, keepdim=True)
        bottom = torch.where(valid, dh, math.inf).amin(dim=1, keepdim=True)
        if bool(((top - bottom) > 2 * self.drift).any()):
            return self._recentre(h)
        c = (top + bottom) / 2
        s = _products(self.kernel, self._exp(torch.where(valid, dh - c, -math.inf)), transpose=False)
        return self.r + c + torch.log(s)

    def _exp(self, x: torch.Tensor) -> torch.Tensor:
        """``exp(x)``, 0 where it would be subnormal, which it computes ~100x slower on the CPU
        (as in the kernel build): measured, a 20000 x 1000 float32 solve spent 66 ms of its
        180 ms in the exps of these weight vectors without this."""
        return x.masked_fill(x < self.floor, -math.inf).exp()

    def col_lse(self, e: torch.Tensor) -> torch.Tensor:
        r"""``LSE_j[e_j - C_ji/eps]`` for every column i, reusing the row kernel.

        ``exp(-C_ji/eps) = K_ji exp(r_j - h0_i)``, so the sum is a GEMV with K^T weighted by
        ``exp(e_j + r_j - W)``. Terms that underflow (each below ~e^-87 relative to W) are
        negligible when the computed sum exceeds e^-50; columns where it does not are recomputed
        exactly from the cost.
        """
        w = e + self.r
        wmax = w.amax(dim=1, keepdim=True)
        s = _products(self.kernel, self._exp(w - wmax), transpose=True)
        out = wmax - self.h0 + torch.log(s)
        valid = torch.isfinite(self.h0)
        unsafe = (s < math.exp(-50.0)) & valid if self.dtype == torch.float32 else \
            (s < math.exp(-600.0)) & valid
        for k, i in unsafe.nonzero().tolist():
            z = e[k] - self.cost[k, :, i].to(self.dtype) / self.eps
            out[k, i] = torch.logsumexp(z, dim=0)
        return torch.where(valid, out, torch.full_like(out, -math.inf))


@contextlib.contextmanager
def _torch_threads(n: int):
    """Run torch's CPU operations on ``n`` threads inside the block."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@contextlib.contextmanager
def _cpu_threads(blas: int):
    """Inside the block: torch on one thread, the BLAS libraries (NumPy's) on ``blas``."""
    from threadpoolctl import threadpool_limits

    with threadpool_limits(blas, user_api="blas"), _torch_threads(1):
        yield


def _products(kernel: torch.Tensor, w: torch.Tensor, *, transpose: bool) -> torch.Tensor:
    """``K_k w_k`` (or ``K_k^T w_k``) for every problem k of a (B, n, m) kernel.

    On the CPU through NumPy's BLAS: these products are the whole cost of an iteration, and
    torch's CPU GEMV (MKL) took 5.3-5.7 ms for a 20000 x 1000 float32 kernel on the 2-core AMD
    development machine where NumPy's OpenBLAS took 2.4-2.8 ms, at the memory bandwidth. The
    solver's loop runs torch single-threaded around them (see ``_solve``).
    """
    if kernel.device.type != "cpu":
        if transpose:
            return torch.bmm(w[:, None, :], kernel)[:, 0]
        return torch.bmm(kernel, w[..., None])[..., 0]
    out = [w_k.numpy() @ k.numpy() if transpose else k.numpy() @ w_k.numpy()
           for k, w_k in zip(kernel, w, strict=True)]
    return torch.from_numpy(np.stack(out))


def _best_translation(f, g, loga, logb, tau_a, tau_b) -> torch.Tensor:
    r"""The shift ``t`` maximising the dual along ``(f + t, g - t)``, per problem, in closed form.

    The plan ``exp((f ⊕ g - C)/eps)`` does not see the shift, so only the marginal terms move:
    maximise ``-tau_a A e^{-t/tau_a} - tau_b B e^{t/tau_b}`` with ``A = sum a e^{-f/tau_a}``,
    ``B = sum b e^{-g/tau_b}``. This is the translation-invariant step of Séjourné, Vialard &
    Peyré (AISTATS 2022): Sinkhorn alone removes a common shift at the slow rate
    ``lambda_a * lambda_b``, which tends to 1 as the taus grow. Balanced OT (both taus infinite)
    is shift invariant: 0.
    """
    if math.isinf(tau_a) and math.isinf(tau_b):
        return torch.zeros(f.shape[0], dtype=f.dtype, device=f.device)
    weight = 1.0 / (1.0 / tau_a + 1.0 / tau_b)
    return weight * (torch.logsumexp(loga - f / tau_a, dim=1) - torch.logsumexp(logb - g / tau_b, dim=1))


def _solve(a, b, cost, eps, tau_a, tau_b, max_iter, tol, dtype, allow_padding):
    eps, tau_a, tau_b, max_iter, tol = check_solver_params(eps, tau_a, tau_b, max_iter, tol)
    _check_problem(a, b, cost, tau_a, tau_b, dtype, allow_padding)
    dtype = dtype or (cost.dtype if cost.dtype in (torch.float32, torch.float64) else torch.float64)
    dev = cost.device
    loga = torch.log(a.to(device=dev, dtype=dtype))[None].expand(cost.shape[0], -1)
    logb = torch.log(b.to(device=dev, dtype=dtype))  # -inf marks padding
    valid_b = torch.isfinite(logb)
    lam_a, lam_b = _lam(tau_a, eps), _lam(tau_b, eps)
    # Over-relaxation optimal for a linear contraction of rate rho (Young's SOR formula); modest
    # and only enabled once the iterates are close, where the linearisation holds.
    rho = min(lam_a * lam_b, 0.9)
    omega_fast = 2.0 / (1.0 + math.sqrt(1.0 - rho))

    lse = _RowLSE(cost, eps, dtype)
    f = torch.zeros_like(loga)
    g = torch.zeros_like(logb)
    col = torch.zeros_like(logb)  # LSE_j[log a_j + (f_j - C_ji)/eps], set by the first iteration
    zero = torch.zeros((), dtype=dtype, device=dev)
    omega = torch.ones(cost.shape[0], 1, dtype=dtype, device=dev)
    prev_err = torch.full((cost.shape[0],), math.inf, dtype=dtype, device=dev)
    converged = torch.zeros(cost.shape[0], dtype=torch.bool, device=dev)
    n_iter = 0
    iters = torch.zeros(cost.shape[0], dtype=torch.int64, device=dev)  # each problem's own
    # On the CPU the iterations' few torch operations are on vectors, so they run on one thread:
    # a parallel one (exp, log) wakes torch's OpenMP threads, which then spin on the cores that
    # the BLAS threads of the next product need (measured: +5 ms per exp of a 20000-vector,
    # doubling the time of an iteration). NumPy's BLAS takes the caller's torch thread count
    # instead, so that the count recorded with a result is the one that computed it (a product
    # sums in an order that depends on its threads).
    with _cpu_threads(lse.threads) if dev.type == "cpu" else contextlib.nullcontext():
        while n_iter < max_iter and not bool(converged.all()):
            n_iter += 1
            iters += (~converged).long()
            f_new = -lam_a * eps * lse(logb + g / eps)
            f_new = omega * f_new + (1.0 - omega) * f
            col_new = lse.col_lse(loga + f_new / eps)
            g_new = torch.where(valid_b, omega * (-lam_b * eps * col_new) + (1.0 - omega) * g, zero)
            shift = _best_translation(f_new, g_new, loga, logb, tau_a, tau_b)[:, None]
            f_new = f_new + shift
            g_new = torch.where(valid_b, g_new - shift, zero)
            col_new = col_new + shift / eps
            err = torch.maximum((f_new - f).abs().amax(dim=1), (g_new - g).abs().amax(dim=1)) / eps
            if not bool(torch.isfinite(err).all()):
                raise FloatingPointError("non-finite potentials in unbalanced_sinkhorn (please report)")
            # A converged problem keeps its potentials, so a batch gives what separate solves give.
            active = ~converged[:, None]
            f = torch.where(active, f_new, f)
            g = torch.where(active, g_new, g)
            col = torch.where(active, col_new, col)
            # A potential of size |f| cannot move by less than its rounding error: in float32 the
            # attainable tolerance is about 1e-7 * |f| / eps, whatever tol asks for.
            scale = torch.maximum(f.abs().amax(dim=1), g.abs().amax(dim=1)) / eps
            converged = converged | (err < torch.clamp(8 * torch.finfo(dtype).eps * scale, min=tol))
            # Relax only while the error keeps shrinking; fall back to plain steps otherwise.
            omega = torch.where(err < prev_err, omega_fast, 1.0).to(dtype)[:, None]
            prev_err = err

        # Marginals in the log domain, from the final potentials (``col`` is already that of f).
        log_row = loga + f / eps + lse(logb + g / eps)
        log_col = torch.where(valid_b, logb + g / eps + col, -math.inf)
    return dict(f=f, g=g, log_row=log_row, log_col=log_col, loga=loga, logb=logb, eps=eps,
                tau_a=tau_a, tau_b=tau_b, n_iter=iters, converged=converged)


def _kl(log_x: torch.Tensor, log_y: torch.Tensor) -> torch.Tensor:
    """Generalised KL(x || y) per problem, from logs; padded entries (y = 0 = x) contribute 0."""
    x, y = log_x.exp(), log_y.exp()
    terms = torch.where(torch.isfinite(log_y), x * (log_x - log_y) - x + y, torch.zeros_like(x))
    return terms.sum(dim=-1)


def _finish(out: dict, to_user, squeeze: bool) -> UOTResult:
    # Objective in float64 from the marginals alone: with log P = log a + log b + (f+g-C)/eps,
    # <C,P> + eps KL(P||ab) = sum f P1 + sum g P^T1 - eps (mass(P) - sum a * sum b).
    eps = out["eps"]
    d = {k: out[k].double() for k in ("f", "g", "log_row", "log_col", "loga", "logb")}
    row, col = d["log_row"].exp(), d["log_col"].exp()
    mass_ab = d["loga"].exp().sum(dim=1) * d["logb"].exp().sum(dim=1)
    entropic = (d["f"] * row).sum(1) + (d["g"] * col).sum(1) - eps * (row.sum(1) - mass_ab)
    kl_a = _penalty(out["tau_a"], d["log_row"], d["loga"])
    kl_b = _penalty(out["tau_b"], d["log_col"], d["logb"])
    # Optimality conditions P1 = a exp(-f/tau_a), P^T1 = b exp(-g/tau_b), in log space.
    err_a = (d["log_row"] - d["loga"] + d["f"] / out["tau_a"]).abs().amax(dim=1)
    fin = torch.isfinite(d["logb"])
    err_b = torch.where(fin, d["log_col"] - d["logb"] + d["g"] / out["tau_b"], 0.0).abs().amax(1)

    def user(x):
        x = x[0] if squeeze else x
        return to_user(x)

    def scalar(x):
        return float(x[0]) if squeeze else to_user(x)

    conv = out["converged"] & (err_a <= MARGINAL_TOL) & (err_b <= MARGINAL_TOL)
    return UOTResult(
        f=user(out["f"]), g=user(out["g"]),
        log_row_mass=user(out["log_row"]), log_col_mass=user(out["log_col"]),
        objective=scalar(entropic + kl_a + kl_b), entropic_cost=scalar(entropic),
        kl_a=scalar(kl_a), kl_b=scalar(kl_b),
        marginal_error_a=scalar(err_a), marginal_error_b=scalar(err_b),
        n_iter=int(out["n_iter"][0]) if squeeze else to_user(out["n_iter"]),
        converged=bool(conv[0]) if squeeze else to_user(conv),
        eps=float(eps), tau_a=float(out["tau_a"]), tau_b=float(out["tau_b"]),
    )


def _penalty(tau: float, log_marginal: torch.Tensor, log_weight: torch.Tensor) -> torch.Tensor:
    """``tau * KL(marginal || weight)``; 0 for ``tau = inf`` (the constraint holds at convergence)."""
    if math.isinf(tau):
        return torch.zeros(log_marginal.shape[0], dtype=torch.float64, device=log_marginal.device)
    return tau * _kl(log_marginal, log_weight)
