"""Interaction transforms and AND-OR sparsification vs their anchors (shapiq, the group's SGD).

1. Harsanyi (AND) interactions by our butterfly vs shapiq's ExactComputer "Moebius" index on the
   same random game: time, ratio, max abs difference.
2. AND-OR sparsification of planted noisy games (random AND/OR terms + Gaussian noise), a batch per
   size: the group's SGD protocol (lr 1e-5, 10,000 iterations, qthres 0.04) vs our default ADMM
   (tol 1e-2, at most 2,000 iterations), plus ADMM stopped after k iterations to find where it
   first matches SGD's objective on every game, and the exact LP optimum (HiGHS) where n is
   small enough. Objectives are Σ|I_and| + Σ|I_or| after merging orders 0 and 1, averaged over
   the batch.

Run by hand, not in CI:

    .venv/bin/python benchmarks/knowledge.py --transform-sizes 10 12 14 --sparsify-sizes 10 12
"""

import argparse

import numpy as np
import torch
from _timing import best_time

from pretrain_reuse.knowledge import (
    and_or_interactions,
    and_or_interactions_lp,
    and_or_interactions_sgd,
    harsanyi_and,
    mask_of,
    planted_game,
)


def bench_transform(sizes, seed: int) -> None:
    import shapiq

    print("\n[1] Harsanyi transform vs shapiq ExactComputer('Moebius')")
    print(f"{'n':>3} {'ours ms':>10} {'shapiq s':>10} {'ratio':>10} {'max|diff|':>10}")
    for n in sizes:
        v = np.random.default_rng(seed + n).standard_normal(1 << n)
        harsanyi_and(v)  # warm-up
        ours, mine = best_time(lambda v=v: harsanyi_and(v), repeat=20)
        weights = 1 << np.arange(n)

        def game(coalitions, v=v, weights=weights):
            return v[(np.asarray(coalitions, dtype=bool) * weights).sum(axis=1)]

        theirs, iv = best_time(lambda n=n, game=game: shapiq.ExactComputer(game, n_players=n)("Moebius"))
        ref = np.empty(1 << n)
        for coalition, pos in iv.interaction_lookup.items():
            ref[mask_of(coalition, n)] = iv.values[pos]
        print(f"{n:>3} {ours * 1e3:>10.3f} {theirs:>10.2f} {theirs / ours:>10.0f} "
              f"{np.abs(mine - ref).max():>10.1e}")


def planted_batch(n: int, batch: int, noise: float, seed: int) -> np.ndarray:
    """Games with 3 AND and 1 OR planted terms of random order 1..4 and value ±U(0.5, 2)."""
    rng = np.random.default_rng(seed)
    games = []
    for k in range(batch):
        def term():
            players = rng.choice(n, size=rng.integers(1, 5), replace=False)
            return tuple(int(p) for p in players), float(rng.choice([-1, 1]) * rng.uniform(0.5, 2))

        and_terms = dict(term() for _ in range(3))
        or_terms = dict([term()])
        games.append(planted_game(n, and_terms, or_terms, noise=noise, seed=seed * 1000 + k))
    return np.stack(games)


def objectives(results) -> np.ndarray:
    return np.array([x.meta["objective"] for x in results])


def bench_sparsify(sizes, batch, sgd_iters, lr, qthres, noise, lp_max, seed) -> None:
    print(f"\n[2] AND-OR sparsification, batch of {batch} planted games (noise {noise}), qthres {qthres}")
    print(f"{'n':>3} {'solver':<26} {'time s':>9} {'mean obj':>10} {'max gap':>9} {'<=SGD':>6} "
          f"{'speed-up':>9}")
    for n in sizes:
        games = planted_batch(n, batch, noise, seed + n)
        sgd_s, sgd = best_time(
            lambda games=games: and_or_interactions_sgd(games, qthres=qthres, lr=lr, niter=sgd_iters))
        sgd_obj = objectives(sgd)
        print(f"{n:>3} {f'SGD lr={lr:g} x{sgd_iters}':<26} {sgd_s:>9.2f} {sgd_obj.mean():>10.4f} "
              f"{'':>9} {'':>6} {1.0:>9.1f}")
        if n <= lp_max:
            lp_s, lp = best_time(lambda games=games: and_or_interactions_lp(games, qthres=qthres))
            print(f"{n:>3} {'exact LP (HiGHS)':<26} {lp_s:>9.2f} {objectives(lp).mean():>10.4f} {0.0:>9.1e} "
                  f"{'yes':>6} {sgd_s / lp_s:>9.1f}")
        and_or_interactions(games[:1], qthres=qthres, max_iter=20)  # warm-up
        k = 25
        while True:
            t, res = best_time(lambda games=games, k=k: and_or_interactions(games, qthres=qthres, max_iter=k),
                           repeat=3)
            obj = objectives(res)
            gap = max(x.meta["gap"] for x in res)
            below = bool((obj <= sgd_obj).all())
            print(f"{n:>3} {f'ADMM stopped at {k} it':<26} {t:>9.2f} {obj.mean():>10.4f} {gap:>9.1e} "
                  f"{'yes' if below else 'no':>6} {sgd_s / t:>9.1f}")
            if below or all(x.meta["converged"] for x in res):
                break
            k *= 2
        t, res = best_time(lambda games=games: and_or_interactions(games, qthres=qthres))
        obj = objectives(res)
        label = f"ADMM default ({res[0].meta['n_iter']} it)"  # tol 1e-2 or max_iter
        print(f"{n:>3} {label:<26} {t:>9.2f} {obj.mean():>10.4f} {max(x.meta['gap'] for x in res):>9.1e} "
              f"{'yes' if (obj <= sgd_obj).all() else 'no':>6} {sgd_s / t:>9.1f}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--transform-sizes", type=int, nargs="*", default=[10, 12, 14])
    p.add_argument("--sparsify-sizes", type=int, nargs="*", default=[10, 12])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--sgd-iters", type=int, default=10_000)
    p.add_argument("--lr", type=float, default=1e-5)
    p.add_argument("--qthres", type=float, default=0.04)
    p.add_argument("--noise", type=float, default=0.05)
    p.add_argument("--lp-max", type=int, default=10, help="largest n solved by the exact LP as well")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (1: steadier timings on a shared machine)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if args.transform_sizes:
        bench_transform(args.transform_sizes, args.seed)
    if args.sparsify_sizes:
        bench_sparsify(args.sparsify_sizes, args.batch, args.sgd_iters, args.lr, args.qthres, args.noise,
                       args.lp_max, args.seed)


if __name__ == "__main__":
    main()
