"""Spherical k-means (units.spherical_kmeans) vs scikit-learn's Lloyd KMeans: time and objective.

Same input, one random initialisation each (k distinct samples), scikit-learn's Lloyd for
``--n-iter`` iterations (tol=0, so it runs them all), ours for each of ``--passes`` passes over the
data. scikit-learn runs Euclidean Lloyd on the L2-normalised features, the usual way to get
spherical clusters from it. faiss's spherical Lloyd (``faiss.Kmeans(spherical=True)``) runs as
many iterations on all samples (its default subsample of 256 per centroid is lifted). All results
are scored by the same function: the spherical objective, the mean cosine similarity of every
sample to its cluster's mean direction (higher is better). A last line names the fewest of our
``--passes`` that reach scikit-learn's objective after its ``--n-iter`` iterations, and that
run's speed-up (time to an equal or better objective).

Times are the minimum over ``--repeats`` interleaved rounds; ``--threads`` limits the thread pools
of all sides (BLAS, OpenMP, torch, faiss), and the load average is printed, as the machine may be
shared. Run by hand, not in CI:

    .venv/bin/python benchmarks/kmeans.py --n 200000 --dim 128 --k 2000 --n-iter 20 --passes 18 20 \
        --repeats 3 --threads 1
"""

import argparse
import os
import time
from functools import partial

import faiss
import numpy as np
import torch
from sklearn.cluster import KMeans
from threadpoolctl import threadpool_limits

from pretrain_reuse.features import FeatureStore
from pretrain_reuse.units import _spherical_objective, _unit_rows, spherical_kmeans


def clustered_features(n: int, dim: int, n_centres: int, seed: int) -> np.ndarray:
    """Gaussian blobs of random radius around random directions: clustered but not separable."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((n_centres, dim))
    labels = rng.integers(0, n_centres, n)
    x = centres[labels] + 1.5 * rng.standard_normal((n, dim))
    return (x * rng.uniform(0.5, 2.0, (n, 1))).astype(np.float32)


def sklearn_lloyd(xn: np.ndarray, k: int, n_iter: int, seed: int) -> tuple[np.ndarray, str]:
    km = KMeans(k, n_init=1, max_iter=n_iter, tol=0.0, init="random", random_state=seed,
                algorithm="lloyd").fit(xn)
    return km.labels_.astype(np.int64), f"{km.n_iter_} iterations"


def faiss_lloyd(xn: np.ndarray, k: int, n_iter: int, seed: int) -> tuple[np.ndarray, str]:
    """faiss's spherical Lloyd on all of ``xn`` (no subsample: max_points_per_centroid = N)."""
    fk = faiss.Kmeans(xn.shape[1], k, niter=n_iter, spherical=True, seed=seed,
                      max_points_per_centroid=len(xn))
    fk.train(xn)
    return fk.index.search(xn, 1)[1][:, 0], f"{n_iter} iterations"


def ours(store: FeatureStore, k: int, passes: int, seed: int) -> tuple[np.ndarray, str]:
    units = spherical_kmeans(store, k, n_iter=passes, seed=seed)
    return units.assignment, f"{units.meta['passes']} passes ({units.meta['full_passes']} full)"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=200_000)
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--k", type=int, default=2000)
    p.add_argument("--n-iter", type=int, default=20, help="Lloyd iterations (scikit-learn, faiss)")
    p.add_argument("--passes", type=int, nargs="+", default=[16, 20], help="our passes")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--threads", type=int, help="threads of every pool, both sides (default: all)")
    args = p.parse_args()
    if args.threads:
        threadpool_limits(args.threads)
        torch.set_num_threads(args.threads)
    x = clustered_features(args.n, args.dim, 4 * args.k, args.seed)
    xn = _unit_rows(x).astype(np.float32)
    store = FeatureStore(features=x)
    print(f"n={args.n} dim={args.dim} K={args.k} seed={args.seed} threads={torch.get_num_threads()}; "
          "objective: mean cosine to the cluster's mean direction (higher is better)")
    # warm-up: thread pools, BLAS and torch kernels
    ours(FeatureStore(features=x[:5000]), 50, 2, 0)
    sklearn_lloyd(xn[:5000], 50, 2, 0)

    runs = {
        "scikit-learn Lloyd": partial(sklearn_lloyd, xn, args.k, args.n_iter, args.seed),
        "faiss spherical Lloyd": partial(faiss_lloyd, xn, args.k, args.n_iter, args.seed),
        **{f"ours, {p} passes": partial(ours, store, args.k, p, args.seed) for p in args.passes},
    }
    seconds, scores = dict.fromkeys(runs, np.inf), {}
    for _ in range(args.repeats):  # interleaved, so that a busy spell of the machine hits all
        for name, run in runs.items():
            t0 = time.perf_counter()
            assign, ran = run()
            seconds[name] = min(seconds[name], time.perf_counter() - t0)
            scores[name] = ran, _spherical_objective(xn, assign, int(assign.max()) + 1)
    skl_s, (_, skl_obj) = seconds["scikit-learn Lloyd"], scores["scikit-learn Lloyd"]
    for name, (ran, objective) in scores.items():
        print(f"{name:22s} {ran:20s} {seconds[name]:7.1f} s  objective {objective:.5f}  "
              f"speed-up {skl_s / seconds[name]:5.2f}x  objective - sklearn's {objective - skl_obj:+.5f}")
    reached = [p for p in args.passes if scores[f"ours, {p} passes"][1] >= skl_obj]
    if reached:  # time to an equal objective: the fewest of our passes that match sklearn's
        p = min(reached)
        print(f"ours reaches scikit-learn's objective at {p} passes: speed-up "
              f"{skl_s / seconds[f'ours, {p} passes']:.2f}x")
    else:
        print("none of our --passes reached scikit-learn's objective")
    print("load average (1, 5, 15 min) at the end: " + ", ".join(f"{v:.1f}" for v in os.getloadavg()))


if __name__ == "__main__":
    main()
