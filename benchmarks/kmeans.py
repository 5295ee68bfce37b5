"""Spherical k-means (units.spherical_kmeans, faiss search) vs scikit-learn's Lloyd KMeans.

Same input, same number of Lloyd iterations, one initialisation each; both scored on the same
spherical objective (mean cosine similarity of every sample to its cluster's mean direction).
scikit-learn runs Euclidean Lloyd on the L2-normalised features, the usual way to get spherical
clusters from it. Run by hand, not in CI:

    .venv/bin/python benchmarks/kmeans.py --n 200000 --dim 128 --k 2000 --n-iter 20
"""

import argparse
import time

import numpy as np

from pretrain_reuse.features import FeatureStore
from pretrain_reuse.units import _spherical_objective, _unit_rows, spherical_kmeans


def clustered_features(n: int, dim: int, n_centres: int, seed: int) -> np.ndarray:
    """Gaussian blobs of random radius around random directions: clustered but not separable."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((n_centres, dim))
    labels = rng.integers(0, n_centres, n)
    x = centres[labels] + 1.5 * rng.standard_normal((n, dim))
    return (x * rng.uniform(0.5, 2.0, (n, 1))).astype(np.float32)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=200_000)
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--k", type=int, default=2000)
    p.add_argument("--n-iter", type=int, default=20)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--skip-sklearn", action="store_true")
    args = p.parse_args()

    x = clustered_features(args.n, args.dim, 4 * args.k, args.seed)
    xn = _unit_rows(x).astype(np.float32)
    print(f"n={args.n} dim={args.dim} K={args.k} iterations={args.n_iter}")

    t0 = time.perf_counter()
    units = spherical_kmeans(FeatureStore(features=x), args.k, n_iter=args.n_iter, seed=args.seed)
    ours_s = time.perf_counter() - t0
    ours_obj = units.meta["objective"]
    print(f"ours    {ours_s:8.1f} s  objective {ours_obj:.5f}  clusters {len(units)}")
    if args.skip_sklearn:
        return
    from sklearn.cluster import KMeans

    t0 = time.perf_counter()
    km = KMeans(args.k, n_init=1, max_iter=args.n_iter, tol=0.0, init="random",
                random_state=args.seed, algorithm="lloyd").fit(xn)
    skl_s = time.perf_counter() - t0
    skl_obj = _spherical_objective(xn, km.labels_.astype(np.int64), args.k)
    print(f"sklearn {skl_s:8.1f} s  objective {skl_obj:.5f}")
    print(f"speed-up {skl_s / ours_s:.2f}x   objective ours - sklearn = {ours_obj - skl_obj:+.5f}")


if __name__ == "__main__":
    main()
