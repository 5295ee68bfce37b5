"""Spherical k-means (units.spherical_kmeans) vs scikit-learn's Lloyd KMeans: time and objective.

Same input, one random initialisation each (k distinct samples), scikit-learn's Lloyd for
``--n-iter`` iterations (tol=0, so it runs them all), ours for each of ``--passes`` passes over the
data. scikit-learn runs Euclidean Lloyd on the L2-normalised features, the usual way to get
spherical clusters from it. faiss's spherical Lloyd (``faiss.Kmeans(spherical=True)``) runs as
many iterations on all samples (its default subsample of 256 per centroid is lifted). All results
are scored by the same function: the spherical objective, the mean cosine similarity of every
sample to its cluster's mean direction (higher is better).
Times are the minimum over ``--repeats`` runs; ``--threads`` limits the thread pools of both sides
(BLAS, OpenMP, torch, faiss), and the load average is printed, as the machine may be shared. Run
by hand, not in CI:

    .venv/bin/python benchmarks/kmeans.py --n 200000 --dim 128 --k 2000 --n-iter 20 --passes 16 20
"""

import argparse
import os
import time

import faiss
import numpy as np
import torch

from pretrain_reuse.features import FeatureStore
from pretrain_reuse.units import _spherical_objective, _unit_rows, spherical_kmeans


def clustered_features(n: int, dim: int, n_centres: int, seed: int) -> np.ndarray:
    """Gaussian blobs of random radius around random directions: clustered but not separable."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((n_centres, dim))
    labels = rng.integers(0, n_centres, n)
    x = centres[labels] + 1.5 * rng.standard_normal((n, dim))
    return (x * rng.uniform(0.5, 2.0, (n, 1))).astype(np.float32)


def timed(fit, repeats: int):
    """Minimum wall time over ``repeats`` calls of ``fit()`` and the last result."""
    best = np.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        result = fit()
        best = min(best, time.perf_counter() - t0)
    return best, result


def faiss_kmeans(xn: np.ndarray, k: int, n_iter: int, seed: int) -> faiss.Kmeans:
    """faiss's spherical Lloyd on all of ``xn`` (no subsample: max_points_per_centroid = N)."""
    fk = faiss.Kmeans(xn.shape[1], k, niter=n_iter, spherical=True, seed=seed,
                      max_points_per_centroid=len(xn))
    fk.train(xn)
    return fk


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=200_000)
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--k", type=int, default=2000)
    p.add_argument("--n-iter", type=int, default=20, help="scikit-learn Lloyd iterations")
    p.add_argument("--passes", type=int, nargs="+", default=[16, 20], help="our passes")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--threads", type=int, help="threads of every pool, both sides (default: all)")
    args = p.parse_args()
    from sklearn.cluster import KMeans
    from threadpoolctl import threadpool_limits

    if args.threads:
        threadpool_limits(args.threads)
        torch.set_num_threads(args.threads)
    x = clustered_features(args.n, args.dim, 4 * args.k, args.seed)
    xn = _unit_rows(x).astype(np.float32)
    store = FeatureStore(features=x)
    print(f"n={args.n} dim={args.dim} K={args.k} seed={args.seed} threads={torch.get_num_threads()}; "
          "objective: mean cosine to the cluster's mean direction (higher is better)")
    # warm-up: thread pools, BLAS and torch kernels
    spherical_kmeans(FeatureStore(features=x[:5000]), 50, n_iter=2)
    KMeans(50, n_init=1, max_iter=2, init="random").fit(xn[:5000])

    skl_s, km = timed(lambda: KMeans(args.k, n_init=1, max_iter=args.n_iter, tol=0.0, init="random",
                                     random_state=args.seed, algorithm="lloyd").fit(xn), args.repeats)
    skl_obj = _spherical_objective(xn, km.labels_.astype(np.int64), args.k)
    print(f"scikit-learn Lloyd {km.n_iter_:3d} iterations      {skl_s:7.1f} s  objective {skl_obj:.5f}")
    faiss_s, fk = timed(lambda: faiss_kmeans(xn, args.k, args.n_iter, args.seed), args.repeats)
    faiss_obj = _spherical_objective(xn, fk.index.search(xn, 1)[1][:, 0], args.k)
    print(f"faiss Lloyd {args.n_iter:3d} iterations             {faiss_s:7.1f} s  objective {faiss_obj:.5f}  "
          f"speed-up {skl_s / faiss_s:5.2f}x  objective faiss - sklearn {faiss_obj - skl_obj:+.5f}")
    for passes in args.passes:
        ours_s, units = timed(lambda p=passes: spherical_kmeans(store, args.k, n_iter=p, seed=args.seed),
                              args.repeats)
        ours_obj = _spherical_objective(xn, units.assignment, len(units))
        m = units.meta
        print(f"ours {m['passes']:3d} passes ({m['full_passes']} full)          {ours_s:7.1f} s  "
              f"objective {ours_obj:.5f}  speed-up {skl_s / ours_s:5.2f}x  "
              f"objective ours - sklearn {ours_obj - skl_obj:+.5f}")
    print("load average (1, 5, 15 min) at the end: " + ", ".join(f"{v:.1f}" for v in os.getloadavg()))


if __name__ == "__main__":
    main()
