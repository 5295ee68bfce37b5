"""Benchmark: our log-domain unbalanced Sinkhorn against POT's scaling iterations.

Data (synthetic, fixed seed), ``--data``:

* ``clustered`` (default): ``400`` random centres in ``R^dim`` (standard normal). Each source
  unit is a uniformly chosen centre plus isotropic Gaussian noise (sigma 0.5 per coordinate);
  each target unit is a centre drawn from a random subset of 50 of those centres plus the same
  noise. So 1/8 of the source units lie in clusters that the target covers, as in data selection
  where a fraction of the pre-training data is relevant to the target task.
* ``gaussian``: every unit standard normal, no structure (all cosines near 0, costs 56-144 at
  ``eps_c = 0.01``). The issue's orientation timing (POT 3.4 s at 20000 x 1000 on 2 cores) is
  of this kind; POT is several times slower here than on ``clustered`` data at the same size.

The cost is Liu et al.'s cosine cost ``(1 - cos) / eps_c`` from
:func:`pretrain_reuse.transport.cost_matrix`, in float64 numpy.

On the SAME float64 cost and with unit weights ``a = b = 1`` it times

* ``POT``: ``ot.unbalanced.sinkhorn_unbalanced(a, b, C, reg=1, reg_m=(1, 100), stopThr=1e-6)``
  (float64, numpy, scaling iterations);
* ``ours-f64``: ``unbalanced_sinkhorn(a, b, C, 1, 1, 100, tol=1e-6)``;
* ``ours-f32``: the same with ``dtype=torch.float32`` (the input cost stays float64 numpy).

Equal tolerance: POT stops when ``max|u - u_prev| / max|u| < 1e-6`` for the scalings
``u = exp(f/eps)`` (averaged with the same quantity for ``v``); we stop when every potential moves
less than ``1e-6 * eps``, i.e. every ``u_j`` changes by less than 1e-6 *relatively*, which implies
POT's test. In float32 no potential of size |f| can move by less than its rounding error, so the
float32 solver stops at ``8 * 1.2e-7 * max|f| / eps`` when that is larger (see
:func:`~pretrain_reuse.transport.unbalanced_sinkhorn`). To show what each stopping rule buys, the
table gives every result's largest relative error of the row masses ``P 1`` against a reference
solved to ``tol=1e-12`` (ours, float64, untimed), and whether its top-100 source units are POT's.

For each it prints the wall time (best of ``--repeat``: the first run of a process pays for
faulting in fresh memory; later runs of POT reuse numpy's huge pages, while torch hands large
blocks back to the OS, so every run of ours faults in its (n, m) kernel again), the iteration
count, the speed-up ``POT time / our time``, whether the top-100 source units by row mass are the
same set as POT's, and the row-mass error above. The header gives the thread counts, the load
average and the bandwidth of a plain numpy copy: both solvers are bound by memory traffic (each
iteration reads the (n, m) kernel twice), so on a shared machine compare ratios from one run only.

Run:  python benchmarks/uot.py --sizes 20000x1000 50000x2000 [--data gaussian]
"""

from __future__ import annotations

import argparse
import os
import platform
import warnings

import numpy as np
import torch
from _timing import best_time

from pretrain_reuse.transport import cost_matrix, unbalanced_sinkhorn

N_CENTRES = 400
N_TARGET_CENTRES = 50
NOISE = 0.5
EPS, TAU_A, TAU_B, TOL = 1.0, 1.0, 100.0, 1e-6
TOP_K = 100


def clustered_features(n: int, m: int, dim: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Sources around 400 random centres, targets around a random subset of 50 of them."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((N_CENTRES, dim))
    src = centres[rng.integers(0, N_CENTRES, n)] + NOISE * rng.standard_normal((n, dim))
    chosen = rng.choice(N_CENTRES, N_TARGET_CENTRES, replace=False)
    tgt = centres[chosen[rng.integers(0, N_TARGET_CENTRES, m)]] + NOISE * rng.standard_normal((m, dim))
    return src, tgt


def gaussian_features(n: int, m: int, dim: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Standard normal sources and targets: no structure."""
    rng = np.random.default_rng(seed)
    return rng.standard_normal((n, dim)), rng.standard_normal((m, dim))


DATA = {"clustered": clustered_features, "gaussian": gaussian_features}


def parse_size(text: str) -> tuple[int, int]:
    try:
        n, m = (int(x) for x in text.lower().split("x"))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"size must look like 20000x1000, got {text!r}") from exc
    return n, m


def copy_bandwidth(megabytes: int = 256) -> float:
    """GB/s moved (read + write) by the best of 5 numpy copies of a ``megabytes`` array."""
    src = np.ones(megabytes << 17)  # float64
    dst = np.empty_like(src)
    np.copyto(dst, src)
    t, _ = best_time(lambda: np.copyto(dst, src), 5)
    return 2 * src.nbytes / t / 1e9


def top_k(scores: np.ndarray, k: int = TOP_K) -> set[int]:
    return set(np.argsort(-scores, kind="stable")[:k].tolist())


def rel_err(row: np.ndarray, row_ref: np.ndarray) -> float:
    return float(np.max(np.abs(row - row_ref) / row_ref))


def run_pot(a, b, C, repeat: int):
    import ot

    def solve(log=False):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            out = ot.unbalanced.sinkhorn_unbalanced(
                a, b, C, reg=EPS, reg_m=(TAU_A, TAU_B), stopThr=TOL, log=log
            )
        return out, [str(w.message) for w in caught]

    t, (plan, warns) = best_time(solve, repeat)
    row = plan.sum(axis=1)
    del plan
    # iteration count from a separate, untimed run (log=True adds full-matrix passes to POT)
    (plan_log, log), _ = solve(log=True)
    del plan_log
    return t, len(log["err"]), row, warns


def run_ours(a, b, C, dtype, repeat: int):
    return best_time(
        lambda: unbalanced_sinkhorn(a, b, C, EPS, TAU_A, TAU_B, tol=TOL, dtype=dtype), repeat
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", nargs="+", type=parse_size,
                        default=[(20000, 1000), (50000, 2000)], metavar="NxM",
                        help="source x target units (default: 20000x1000 50000x2000)")
    parser.add_argument("--dim", type=int, default=128, help="feature dimension (default 128)")
    parser.add_argument("--eps-c", type=float, default=0.01, help="cost scale (default 0.01)")
    parser.add_argument("--repeat", type=int, default=3, help="timed runs, best kept (default 3)")
    parser.add_argument("--seed", type=int, default=0, help="data seed (default 0)")
    parser.add_argument("--data", choices=DATA, default="clustered",
                        help="synthetic units (default: clustered; see the docstring)")
    args = parser.parse_args()

    import ot

    print(f"# {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
          f"torch {torch.__version__} ({torch.get_num_threads()} threads), numpy {np.__version__}, "
          f"POT {ot.__version__}")
    print(f"# {args.data} units, cosine cost eps_c={args.eps_c}, dim={args.dim}, eps={EPS}, tau_a={TAU_A}, "
          f"tau_b={TAU_B}, tol/stopThr={TOL}, a=b=1, seed={args.seed}, best of {args.repeat}")
    print("# load average (1, 5, 15 min) at start: " + ", ".join(f"{x:.2f}" for x in os.getloadavg())
          + f"; numpy copy bandwidth {copy_bandwidth():.1f} GB/s (read + write)")

    # warm-up of both on a small problem (imports, torch kernels, thread pools)
    ws, wt = clustered_features(500, 50, args.dim, seed=12345)
    wc = cost_matrix(ws, wt, metric="cosine", eps_c=args.eps_c)
    run_pot(np.ones(500), np.ones(50), wc, 1)
    for dtype in (None, torch.float32):
        run_ours(np.ones(500), np.ones(50), wc, dtype, 1)

    header = (f"{'size':>12} {'variant':>9} {'time_s':>8} {'iters':>6} {'POT/ours':>9} "
              f"{'top100=POT':>11} {'row_err_vs_ref':>15}")
    print(header)
    print("-" * len(header))
    for n, m in args.sizes:
        src, tgt = DATA[args.data](n, m, args.dim, seed=args.seed)
        C = cost_matrix(src, tgt, metric="cosine", eps_c=args.eps_c)  # float64 numpy
        assert C.dtype == np.float64 and C.shape == (n, m)
        a, b = np.ones(n), np.ones(m)
        size = f"{n}x{m}"

        ref = unbalanced_sinkhorn(a, b, C, EPS, TAU_A, TAU_B, tol=1e-12, max_iter=100_000)
        assert ref.converged
        row_ref = np.exp(ref.log_row_mass)

        t_pot, it_pot, row_pot, warns = run_pot(a, b, C, args.repeat)
        print(f"{size:>12} {'POT':>9} {t_pot:8.2f} {it_pot:6d} {1.0:9.2f} {'-':>11} "
              f"{rel_err(row_pot, row_ref):15.2e}"
              + (f"  warnings: {sorted(set(warns))}" if warns else ""), flush=True)
        top_pot = top_k(row_pot)

        for name, dtype in (("ours-f64", None), ("ours-f32", torch.float32)):
            t, res = run_ours(a, b, C, dtype, args.repeat)
            lrm = np.asarray(res.log_row_mass, dtype=np.float64)
            same = top_k(lrm) == top_pot
            flag = "" if res.converged else "  (not converged)"
            print(f"{size:>12} {name:>9} {t:8.2f} {res.n_iter:6d} {t_pot / t:9.2f} "
                  f"{same!s:>11} {rel_err(np.exp(lrm), row_ref):15.2e}{flag}", flush=True)
        del C


if __name__ == "__main__":
    main()
