"""Interaction transforms, AND-OR sparsification and masked games vs their anchors.

1. Harsanyi (AND) interactions by our butterfly vs shapiq's ExactComputer "Moebius" index on the
   same random game: time, ratio, max abs difference.
2. AND-OR sparsification of planted noisy games (random AND/OR terms + Gaussian noise), a batch per
   size: the group's SGD protocol (lr 1e-5, 10,000 iterations, qthres 0.04) vs our default ADMM
   (tol 1e-2, at most 2,000 iterations), plus ADMM stopped after k iterations (k growing by 25%)
   to find the first k where it matches SGD's objective on every game, and the exact LP optimum
   (HiGHS) where n is small enough. Objectives are Σ|I_and| + Σ|I_or| after merging orders 0 and
   1, averaged over the batch; times are the best of --repeat runs.
3. Masked-game evaluation (``masked_game``: build the 2^n masked inputs of one image, run the
   model, take the log-odds) vs a bare batched forward pass of the same model on as many images
   (the same 2^n masked inputs, built beforehand, in batches of --game-batch), and the masking alone
   (the same call with a model that returns constant logits): throughput in images per second, the
   best of --game-repeat interleaved runs.

Run by hand, not in CI:

    .venv/bin/python benchmarks/knowledge.py --transform-sizes 10 12 14 --sparsify-sizes 10 12 \
        --game-models smallcnn --game-n 10 12
"""

import argparse
from functools import partial

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
from pretrain_reuse.knowledge.games import baseline_input, coalitions, grid_players, masked_game
from pretrain_reuse.models import create_backbone


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


def bench_sparsify(sizes, batch, sgd_iters, lr, qthres, noise, lp_max, repeat, seed) -> None:
    print(f"\n[2] AND-OR sparsification, batch of {batch} planted games (noise {noise}), qthres {qthres}, "
          f"best of {repeat}")
    print(f"{'n':>3} {'solver':<26} {'time s':>9} {'mean obj':>10} {'max gap':>9} {'<=SGD':>6} "
          f"{'speed-up':>9}")

    def row(n, label, t, obj, gap, below, speedup):
        print(f"{n:>3} {label:<26} {t:>9.3f} {obj.mean():>10.4f} {gap:>9.1e} {below:>6} {speedup:>9.1f}")

    for n in sizes:
        games = planted_batch(n, batch, noise, seed + n)
        sgd_s, sgd = best_time(
            lambda games=games: and_or_interactions_sgd(games, qthres=qthres, lr=lr, niter=sgd_iters),
            repeat=repeat)
        sgd_obj = objectives(sgd)
        print(f"{n:>3} {f'SGD lr={lr:g} x{sgd_iters}':<26} {sgd_s:>9.3f} {sgd_obj.mean():>10.4f}")
        if n <= lp_max:
            lp_s, lp = best_time(lambda games=games: and_or_interactions_lp(games, qthres=qthres))
            row(n, "exact LP (HiGHS)", lp_s, objectives(lp), 0.0, "yes", sgd_s / lp_s)
        and_or_interactions(games[:1], qthres=qthres, max_iter=20)  # warm-up
        k = 10
        while True:
            t, res = best_time(lambda games=games, k=k: and_or_interactions(games, qthres=qthres, max_iter=k),
                               repeat=max(repeat, 3))
            obj = objectives(res)
            below = bool((obj <= sgd_obj).all())
            row(n, f"ADMM stopped at {k} it", t, obj, max(x.meta["gap"] for x in res),
                "yes" if below else "no", sgd_s / t)
            if below or all(x.meta["converged"] for x in res):
                break
            k = round(k * 1.25)
        t, res = best_time(lambda games=games: and_or_interactions(games, qthres=qthres), repeat=repeat)
        obj = objectives(res)
        row(n, f"ADMM default ({res[0].meta['n_iter']} it)", t, obj, max(x.meta["gap"] for x in res),
            "yes" if (obj <= sgd_obj).all() else "no", sgd_s / t)


def constant_logits(xs: torch.Tensor) -> torch.Tensor:
    """A "model" that costs nothing: what is left of masked_game is building the masked inputs."""
    return torch.zeros(len(xs), 10)


def time_game(model, n: int, batch_size: int, repeat: int, seed: int) -> tuple[float, float, float]:
    """Seconds for: a bare forward on the 2^n masked images, masked_game, masked_game without the model."""
    h, w = model.spec.input_size
    x = torch.randn(3, h, w, generator=torch.Generator().manual_seed(seed))
    players = grid_players((h, w), (8, 8), n=n, seed=seed)
    baseline = baseline_input(x, "zero")
    # the same 2^n masked images, built beforehand (the speed of a CNN depends on its input)
    masks = (coalitions(n) @ torch.from_numpy(players.masks).float().reshape(n, -1)).clamp(max=1.0)
    batches = [m.view(-1, 1, h, w) * x + (1 - m.view(-1, 1, h, w)) * baseline
               for m in masks.split(batch_size)]

    @torch.no_grad()
    def bare():
        for batch in batches:
            model(batch)

    game = partial(masked_game, model, x, 0, players, baseline, batch_size=batch_size)
    masking = partial(masked_game, constant_logits, x, 0, players, baseline, batch_size=batch_size)
    bare()  # warm-up
    # interleaved, so that a change of the machine's load hits all three alike
    best = [float("inf")] * 3
    for _ in range(repeat):
        best = [min(b, best_time(f)[0]) for b, f in zip(best, (bare, game, masking), strict=True)]
    return tuple(best)


def bench_games(models, sizes, batch_size, repeat, seed) -> None:
    print(f"\n[3] masked game vs a bare forward pass on as many images (batch {batch_size}, "
          f"best of {repeat})")
    print(f"{'model':<20} {'n':>3} {'images':>7} {'bare img/s':>11} {'game img/s':>11} {'ratio':>6} "
          f"{'masking img/s':>14}")
    for name in models:
        model = create_backbone(name, num_classes=10)
        for n in sizes:
            bare_s, game_s, mask_s = time_game(model, n, batch_size, repeat, seed)
            print(f"{name:<20} {n:>3} {2**n:>7} {2**n / bare_s:>11.0f} {2**n / game_s:>11.0f} "
                  f"{bare_s / game_s:>6.2f} {2**n / mask_s:>14.0f}")


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
    p.add_argument("--repeat", type=int, default=2, help="runs per timing (the best counts)")
    p.add_argument("--game-models", nargs="*", default=["smallcnn"],
                   help="registered backbones for [3] (random head), e.g. smallcnn efficientnet-lite0")
    p.add_argument("--game-n", type=int, nargs="*", default=[10, 12], help="players of the masked games")
    p.add_argument("--game-batch", type=int, default=256)
    p.add_argument("--game-repeat", type=int, default=5, help="interleaved runs per timing in [3]")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (1: steadier timings on a shared machine)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if args.transform_sizes:
        bench_transform(args.transform_sizes, args.seed)
    if args.sparsify_sizes:
        bench_sparsify(args.sparsify_sizes, args.batch, args.sgd_iters, args.lr, args.qthres, args.noise,
                       args.lp_max, args.repeat, args.seed)
    if args.game_models:
        bench_games(args.game_models, args.game_n, args.game_batch, args.game_repeat, args.seed)


if __name__ == "__main__":
    main()
