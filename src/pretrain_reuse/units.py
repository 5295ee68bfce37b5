"""Units: the class means or k-means clusters that selection ranks (Liu et al., NeurIPS 2022, §3).

A labelled pre-training set is summarised by one mean feature per class; an unlabelled one by
spherical k-means clusters (paper: K = 2000 on 128-d MoCo-v2 features), each summarised the same
way, by the mean of its members' features.

File format (``.safetensors``): tensors ``prototypes`` (K, D), ``assignment`` (N,) int64 (the unit
of every sample, -1 for none) and ``sample_ids`` (UTF-8 blob); header metadata ``kind``
(class | cluster | prototypes), ``names`` and ``meta``. A plain ``.npy`` (K, D) matrix is read as
units of kind ``prototypes`` (no counts, no members).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.numpy import save_file
from tqdm.auto import tqdm

from .artifacts import (
    atomic_path,
    decode_ids,
    encode_ids,
    hash_array,
    hash_file,
    make_meta,
    read_safetensors,
    to_json,
)
from .errors import PretrainReuseError, check_choice, check_file, check_matrix
from .features import FeatureStore, load_npy

KINDS = ("class", "cluster", "prototypes")


@dataclass(frozen=True)
class Units:
    """Prototypes of K units and, when known, which samples belong to each.

    Attributes:
        prototypes: (K, D) float array, one row per unit.
        kind: ``"class"``, ``"cluster"`` or ``"prototypes"`` (a bare matrix).
        assignment: (N,) int64 unit index of every sample (-1: in no unit), or None.
        sample_ids: the N sample ids ``assignment`` refers to.
        names: K unit names (class names), or None.
        meta: metadata block; for clusters it includes the size report and the objective.
    """

    prototypes: np.ndarray
    kind: str = "prototypes"
    assignment: np.ndarray | None = None
    sample_ids: list[str] = field(default_factory=list)
    names: list[str] | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        check_choice("kind", self.kind, KINDS)
        check_matrix("prototypes", self.prototypes)
        if self.names is not None and len(self.names) != len(self):
            raise PretrainReuseError(f"got {len(self.names)} unit names for {len(self)} units")
        if self.assignment is not None:
            if len(self.assignment) != len(self.sample_ids):
                raise PretrainReuseError("assignment and sample_ids must have the same length")
            if len(self.assignment) and self.assignment.max() >= len(self):
                raise PretrainReuseError(
                    f"assignment refers to unit {int(self.assignment.max())} but there are only "
                    f"{len(self)} prototypes"
                )

    def __len__(self) -> int:
        return self.prototypes.shape[0]

    @property
    def counts(self) -> np.ndarray | None:
        """(K,) number of samples in each unit, or None for a bare prototype matrix."""
        if self.assignment is None:
            return None
        a = self.assignment[self.assignment >= 0]
        return np.bincount(a, minlength=len(self)).astype(np.int64)

    @property
    def members(self) -> list[np.ndarray] | None:
        """For each unit, the indices (into ``sample_ids``) of its samples, or None."""
        if self.assignment is None:
            return None
        order = np.argsort(self.assignment, kind="stable")
        bounds = np.searchsorted(self.assignment[order], np.arange(len(self) + 1))
        return [order[bounds[k]:bounds[k + 1]] for k in range(len(self))]

    def member_ids(self, unit: int) -> list[str]:
        """Sample ids of one unit."""
        if self.assignment is None:
            raise PretrainReuseError("these units are a bare prototype matrix without members")
        return [self.sample_ids[i] for i in np.flatnonzero(self.assignment == unit)]

    def save(self, path: str | Path) -> Path:
        """Write a ``.safetensors`` units file atomically."""
        path = Path(path)
        if path.suffix != ".safetensors":
            raise PretrainReuseError(f"units are saved as .safetensors, got {str(path)!r}")
        tensors = {"prototypes": np.ascontiguousarray(self.prototypes)}
        if self.assignment is not None:
            tensors["assignment"] = np.ascontiguousarray(self.assignment, dtype=np.int64)
            tensors["sample_ids"] = encode_ids(self.sample_ids)
        header = {"kind": self.kind, "names": to_json(self.names), "meta": to_json(self.meta),
                  "artifact": "units"}
        with atomic_path(path) as tmp:
            save_file(tensors, str(tmp), metadata=header)
        return path

    @classmethod
    def load(cls, path: str | Path) -> Units:
        """Read a units ``.safetensors`` file, or a ``.npy`` prototype matrix."""
        p = check_file("units", path)
        if p.suffix == ".npy":
            protos = load_npy("units", p)
            check_matrix(f"prototypes in {p.name}", protos)
            return cls(prototypes=protos, kind="prototypes",
                       meta={"producer": "npy", "inputs": {"prototypes": hash_file(p)}})
        t, header = read_safetensors(p, "units file", "rebuild it with `pretrain-reuse units`",
                                     artifact="units")
        if "prototypes" not in t:
            raise PretrainReuseError(f"{str(p)!r} is not a units file written by pretrain-reuse")
        assignment = t.get("assignment")
        ids = decode_ids(t["sample_ids"], len(assignment), p) if assignment is not None else []
        try:
            names, meta = json.loads(header.get("names", "null")), json.loads(header.get("meta", "{}"))
        except json.JSONDecodeError:
            raise PretrainReuseError(f"units file {str(p)!r} has a corrupt header; rebuild it") from None
        return cls(prototypes=t["prototypes"], kind=header["kind"], assignment=assignment,
                   sample_ids=ids, names=names, meta=meta)


def size_report(counts: np.ndarray) -> dict[str, Any]:
    """Summary of unit sizes: min, quartiles, max, and how many are tiny."""
    q = np.percentile(counts, [0, 25, 50, 75, 100]) if len(counts) else [0] * 5
    return {"units": len(counts), "samples": int(counts.sum()),
            "min": int(q[0]), "q25": float(q[1]), "median": float(q[2]), "q75": float(q[3]),
            "max": int(q[4]), "below_5": int((counts < 5).sum())}


def _group_means(features: np.ndarray, assignment: np.ndarray, k: int,
                 normalize: bool, chunk: int = 1 << 16) -> np.ndarray:
    """Mean feature of every unit, accumulated in float64 chunk by chunk (memmap friendly)."""
    sums = np.zeros((k, features.shape[1]), dtype=np.float64)
    for s in range(0, len(features), chunk):
        x = np.asarray(features[s:s + chunk], dtype=np.float32)
        if normalize:
            x = _unit_rows(x)
        a = np.asarray(assignment[s:s + chunk])
        keep = a >= 0
        sums += _cluster_sums(x[keep], a[keep], k)
    counts = np.bincount(assignment[assignment >= 0], minlength=k)
    return (sums / np.maximum(counts, 1)[:, None]).astype(np.float32)


def class_means(store: FeatureStore, *, normalize: bool = False) -> Units:
    r"""One unit per class: the mean feature ``mu_c = (1/|c|) sum_{x in c} phi(x)``.

    As the official code of Liu et al. (NeurIPS 2022) does, features are averaged unnormalised
    (the cosine cost normalises the means); ``normalize=True`` L2-normalises every feature first.

    Args:
        store: features with labels ``0..C-1`` (every class must have a sample).
        normalize: average L2-normalised features instead of raw ones.
    """
    if store.labels is None:
        raise PretrainReuseError(
            "class means need labels; pass --labels (or use --method kmeans for unlabelled data)"
        )
    check_matrix("features", store.features[: min(len(store), 4096)])
    n_classes = len(store.class_names) if store.class_names else int(store.labels.max()) + 1
    if store.labels.max() >= n_classes:
        raise PretrainReuseError(
            f"label {int(store.labels.max())} is out of range for {n_classes} class names"
        )
    counts = np.bincount(store.labels, minlength=n_classes)
    if (counts == 0).any():
        missing = np.flatnonzero(counts == 0)
        raise PretrainReuseError(
            f"{len(missing)} classes have no samples (first: {missing[0]}); drop them from the "
            "label set or relabel to 0..C-1"
        )
    protos = _group_means(store.features, store.labels, n_classes, normalize)
    check_matrix("class means", protos)
    meta = make_meta("units.class_means", {"normalize": normalize},
                     inputs=_store_inputs(store))
    meta["sizes"] = size_report(counts)
    return Units(prototypes=protos, kind="class", assignment=store.labels.copy(),
                 sample_ids=list(store.ids), names=store.class_names, meta=meta)


def spherical_kmeans(store: FeatureStore, k: int, *, n_iter: int = 20, n_init: int = 1, seed: int = 0,
                     max_points_per_unit: int | None = None, normalize_means: bool = False,
                     use_gpu: bool | None = None, progress: bool = False) -> Units:
    r"""Cluster unlabelled features by spherical k-means, then summarise each cluster by its mean.

    Lloyd iterations on L2-normalised features ``x_i`` with unit-norm centroids ``c_k``:

    .. math:: \max_{a, c} \sum_i \langle x_i, c_{a(i)} \rangle, \quad \|c_k\| = 1,

    i.e. cosine similarity, as Liu et al. (NeurIPS 2022, §3.2) cluster 1.28M MoCo-v2 features into
    K = 2000 clusters. Assignment is a faiss inner-product search (multi-threaded; on the GPU when
    faiss-gpu is installed); an emptied cluster is re-seeded by splitting the largest one (as faiss
    does). Initial centroids are ``k`` distinct samples drawn with ``seed``.

    Args:
        store: features (labels ignored). Rows are read chunk by chunk, so a memmap works.
        k: number of clusters, ``1 <= k <= N``.
        n_iter: Lloyd iterations (faiss default 20).
        n_init: independent runs from different random starts; the best objective is kept.
        seed: seed of the initial centroids and of the training subsample.
        max_points_per_unit: train on at most ``k *`` this many samples (faiss uses 256); None
            trains on all. Every sample is assigned at the end either way.
        normalize_means: prototypes are the means of normalised features (default: raw features,
            like class means).
        use_gpu: run the search on GPU; default: when faiss sees a GPU.
        progress: show a progress bar.

    Returns:
        Units of kind ``"cluster"`` with ``meta["objective"]`` (mean cosine similarity of every
        sample to its cluster's mean direction), ``meta["sizes"]``, ``meta["empty_reseeded"]``
        (clusters emptied during training and re-seeded) and ``meta["empty_dropped"]``.
    """
    import faiss

    n = len(store.features)
    if not 1 <= k <= n:
        raise PretrainReuseError(f"k={k} clusters is not possible with {n} samples; pass 1 <= k <= {n}")
    if n_iter < 1 or n_init < 1:
        raise PretrainReuseError(f"n_iter and n_init must be >= 1, got {n_iter} and {n_init}")
    x = _normalized_float32(store.features)
    rng = np.random.default_rng(seed)
    train = x
    if max_points_per_unit is not None and n > k * max_points_per_unit:
        train = x[np.sort(rng.choice(n, k * max_points_per_unit, replace=False))]
    gpu = faiss.get_num_gpus() > 0 if use_gpu is None else use_gpu
    best = None
    for run in range(n_init):
        centroids, reseeded = _lloyd(train, k, n_iter, rng, gpu, progress, run)
        assign = _nearest(centroids, x, gpu)
        objective = _spherical_objective(x, assign, k)
        if best is None or objective > best[0]:
            best = (objective, assign, reseeded)
    objective, assign, reseeded = best
    counts = np.bincount(assign, minlength=k)
    empty = np.flatnonzero(counts == 0)
    if len(empty):  # renumber so that every unit has members
        keep = np.flatnonzero(counts > 0)
        assign = np.searchsorted(keep, assign)
        k = len(keep)
    protos = _group_means(store.features, assign, k, normalize_means)
    meta = make_meta("units.spherical_kmeans",
                     {"k": int(k + len(empty)), "n_iter": n_iter, "n_init": n_init,
                      "max_points_per_unit": max_points_per_unit,
                      "normalize_means": normalize_means, "gpu": bool(gpu)},
                     inputs=_store_inputs(store),
                     seed=seed)
    meta.update(objective=objective, sizes=size_report(np.bincount(assign)),
                empty_reseeded=int(reseeded), empty_dropped=len(empty))
    return Units(prototypes=protos, kind="cluster", assignment=assign.astype(np.int64),
                 sample_ids=list(store.ids), meta=meta)


def _store_inputs(store: FeatureStore) -> dict[str, str]:
    inputs = {"features": hash_array(np.asarray(store.features))}
    if store.labels is not None:
        inputs["labels"] = hash_array(store.labels)
    return inputs


def _normalized_float32(features: np.ndarray, chunk: int = 1 << 16) -> np.ndarray:
    """Contiguous float32 copy with unit-norm rows, filled chunk by chunk (works on memmaps)."""
    out = np.empty(features.shape, dtype=np.float32)
    for s in range(0, len(features), chunk):
        block = np.asarray(features[s:s + chunk], dtype=np.float32)
        check_matrix("features", block)
        norms = np.linalg.norm(block, axis=1, keepdims=True)
        if (norms == 0).any():
            row = s + int(np.flatnonzero(norms[:, 0] == 0)[0])
            raise PretrainReuseError(
                f"features row {row} is all zeros and has no direction; drop zero rows before "
                "spherical k-means"
            )
        out[s:s + chunk] = block / norms
    return out


def _lloyd(x: np.ndarray, k: int, n_iter: int, rng: np.random.Generator, gpu: bool,
           progress: bool, run: int) -> tuple[np.ndarray, int]:
    """Spherical Lloyd iterations from k random samples; returns centroids and re-seed count."""
    centroids = x[rng.choice(len(x), k, replace=False)].copy()
    reseeded = 0
    bar = tqdm(range(n_iter), desc=f"k-means K={k} run {run + 1}", disable=not progress, unit="it")
    for _ in bar:
        assign = _nearest(centroids, x, gpu)
        sums = _cluster_sums(x, assign, k)
        counts = np.bincount(assign, minlength=k)
        reseeded += _split_empty(sums, counts, rng)
        centroids = _unit_rows(sums).astype(np.float32)
    return centroids, reseeded


def _cluster_sums(x: np.ndarray, assign: np.ndarray, k: int) -> np.ndarray:
    sums = torch.zeros(k, x.shape[1], dtype=torch.float64)
    sums.index_add_(0, torch.from_numpy(assign), torch.from_numpy(np.ascontiguousarray(x)).double())
    return sums.numpy()


def _spherical_objective(x: np.ndarray, assign: np.ndarray, k: int) -> float:
    """Mean cosine similarity of the (unit-norm) samples to their cluster's mean direction:
    ``sum_k |sum_{i in k} x_i| / N``."""
    return float(np.linalg.norm(_cluster_sums(x, assign, k), axis=1).sum() / len(x))


def _nearest(centroids: np.ndarray, x: np.ndarray, gpu: bool) -> np.ndarray:
    """Max inner product centroid of every row of x (faiss exact search)."""
    import faiss

    index = faiss.IndexFlatIP(centroids.shape[1])
    if gpu:
        index = faiss.index_cpu_to_all_gpus(index)
    index.add(centroids)
    _, assign = index.search(x, 1)
    return assign[:, 0].astype(np.int64)


def _split_empty(sums: np.ndarray, counts: np.ndarray, rng: np.random.Generator) -> int:
    """Re-seed each empty cluster by splitting the largest one into two perturbed halves."""
    empty = np.flatnonzero(counts == 0)
    for e in empty:
        big = int(np.argmax(counts))
        direction = sums[big] / max(counts[big], 1)
        noise = rng.standard_normal(sums.shape[1]) * 1e-3 * (np.linalg.norm(direction) + 1e-12)
        half = counts[big] // 2
        sums[e] = (direction + noise) * half
        sums[big] = (direction - noise) * (counts[big] - half)
        counts[e], counts[big] = half, counts[big] - half
    return len(empty)


def _unit_rows(m: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(m, axis=1, keepdims=True)
    return m / np.where(norms > 0, norms, 1.0)
