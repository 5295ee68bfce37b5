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
import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.numpy import save_file
from tqdm.auto import tqdm

from .artifacts import (
    ValueEquality,
    atomic_path,
    check_output_file,
    decode_ids,
    encode_ids,
    hash_array,
    hash_file,
    make_meta,
    read_safetensors,
    to_json,
)
from .data.catalog import DATASETS
from .errors import (
    PretrainReuseError,
    as_array,
    check_choice,
    check_file,
    check_int,
    check_matrix,
    check_seed,
    check_strings,
    frozen_copy,
    is_integer,
    refuse_path,
)
from .features import FeatureStore, check_unique_ids, float32_rows, hash_ids, load_npy

__all__ = ["Units", "class_means", "spherical_kmeans"]

KINDS = ("class", "cluster", "prototypes")


@dataclass(frozen=True, eq=False)
class Units(ValueEquality):
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
        # copies of its own, as a Selection's: the caller's arrays changed later would change it
        object.__setattr__(self, "prototypes", frozen_copy(check_matrix("prototypes", self.prototypes)))
        if self.names is not None:
            object.__setattr__(self, "names", check_strings("unit names", self.names))
            if len(self.names) != len(self):
                raise PretrainReuseError(f"got {len(self.names)} unit names for {len(self)} units")
        object.__setattr__(self, "sample_ids", check_strings("sample_ids", self.sample_ids))
        if self.assignment is None and self.sample_ids:
            raise PretrainReuseError("sample_ids name the samples of an assignment; pass the "
                                     "assignment too, or no sample_ids")
        if self.assignment is not None:
            a = as_array("assignment", self.assignment)
            if a.ndim != 1 or a.dtype.kind not in "iu":
                raise PretrainReuseError(f"assignment must be a vector of unit indices, got dtype "
                                         f"{a.dtype} shape {a.shape}")
            if len(a) != len(self.sample_ids):
                raise PretrainReuseError("assignment and sample_ids must have the same length")
            if len(a) and (a.max() >= len(self) or a.min() < -1):  # -1: in no unit
                bad = int(a.max()) if a.max() >= len(self) else int(a.min())
                raise PretrainReuseError(
                    f"assignment refers to unit {bad} but the units are 0..{len(self) - 1} (-1: none)")
            check_unique_ids(self.sample_ids)
            object.__setattr__(self, "assignment", frozen_copy(a))

    def __len__(self) -> int:
        return self.prototypes.shape[0]

    def __repr__(self) -> str:  # a summary: the dataclass repr would print every sample id
        samples = "" if self.assignment is None else f", samples={len(self.assignment)}"
        names = "" if self.names is None else f", names=[{self.names[0]!r}, ...]"
        return f"Units(kind={self.kind!r}, units={len(self)}, dim={self.prototypes.shape[1]}{samples}{names})"

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

    def plot(self, ax=None):
        """Histogram of the unit sizes (samples per unit, the size report of k-means clusters):
        a few huge clusters or many tiny ones change how many images ``--k`` units select."""
        import matplotlib.pyplot as plt

        counts = self.counts
        if counts is None:
            raise PretrainReuseError("these units are a bare prototype matrix without members: "
                                     "there are no sizes to plot")
        ax = ax or plt.gca()
        lo, hi = int(counts.min()), int(counts.max())
        # a bar per size while they are few, so that sizes are read off exactly
        ax.hist(counts, bins=np.arange(lo, hi + 2) - 0.5 if hi - lo < 50 else 50, color="0.4")
        ax.set_xlabel(f"samples per {'class' if self.kind == 'class' else 'unit'}")
        ax.set_ylabel("units")
        ax.set_title(f"{len(self)} {self.kind} units, {int(counts.sum())} samples "
                     f"(median {np.median(counts):g}, max {int(counts.max())})")
        return ax

    def member_ids(self, unit: int) -> list[str]:
        """Sample ids of one unit."""
        if self.assignment is None:
            raise PretrainReuseError("these units are a bare prototype matrix without members")
        if not (is_integer(unit) and 0 <= unit < len(self)):
            raise PretrainReuseError(f"unit {unit!r} is not one of these {len(self)} units; pass "
                                     f"an id 0..{len(self) - 1}")
        return [self.sample_ids[i] for i in np.flatnonzero(self.assignment == unit)]

    def save(self, path: str | Path) -> Path:
        """Write a ``.safetensors`` units file atomically."""
        path = check_output_file(path, ".safetensors", "units")
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
        if p.suffix.lower() == ".npy":
            protos = load_npy("units", p)
            check_matrix(f"prototypes in {p.name}", protos)
            return cls(prototypes=protos, kind="prototypes",
                       meta={"producer": "npy", "inputs": {"prototypes": hash_file(p)}})
        t, header = read_safetensors(p, "units file", "rebuild it with `pretrain-reuse units`",
                                     artifact="units")
        if "prototypes" not in t:
            raise PretrainReuseError(f"{str(p)!r} is not a units file written by pretrain-reuse")
        assignment = t.get("assignment")
        corrupt = PretrainReuseError(f"units file {str(p)!r} has a corrupt header; rebuild it")
        if "kind" not in header or (assignment is not None and "sample_ids" not in t):
            raise corrupt
        ids = decode_ids(t["sample_ids"], len(assignment), p) if assignment is not None else []
        try:
            names, meta = json.loads(header.get("names", "null")), json.loads(header.get("meta", "{}"))
        except json.JSONDecodeError:
            raise corrupt from None
        if not isinstance(meta, dict):
            raise corrupt
        return cls(prototypes=t["prototypes"], kind=header["kind"], assignment=assignment,
                   sample_ids=ids, names=names, meta=meta)


def size_report(counts: np.ndarray) -> dict[str, Any]:
    """Summary of unit sizes: min, quartiles, max, and how many are tiny."""
    q = np.percentile(counts, [0, 25, 50, 75, 100]) if len(counts) else [0] * 5
    return {"units": len(counts), "samples": int(counts.sum()),
            "min": int(q[0]), "q25": float(q[1]), "median": float(q[2]), "q75": float(q[3]),
            "max": int(q[4]), "below_5": int((counts < 5).sum())}


#: Bytes of float32 features read and converted at a time (:func:`_chunk_rows`).
CHUNK_BYTES = 32 << 20


def _chunk_rows(dim: int) -> int:
    """Rows per chunk of features of width ``dim``: 65536 of 128, 4096 of 2048. A count of rows
    whatever the width made each chunk's float64 copy 1 GB at D = 2048."""
    return max(1, CHUNK_BYTES // (4 * dim))


def _group_means(features: np.ndarray, assignment: np.ndarray, k: int, normalize: bool,
                 progress: bool = False, chunk: int | None = None,
                 ids: list[str] | None = None) -> np.ndarray:
    """Mean feature of every unit, accumulated in float64 chunk by chunk (memmap friendly).
    ``ids``: the samples' ids, which name a refused row."""
    sums = np.zeros((k, features.shape[1]), dtype=np.float64)
    chunk = chunk or _chunk_rows(features.shape[1])
    for s in _chunks(len(features), chunk, progress, "unit means"):
        x = float32_rows(features, slice(s, s + chunk), ids)
        if normalize:
            x = _unit_rows(x)
        a = np.asarray(assignment[s:s + chunk])
        keep = a >= 0
        sums += _cluster_sums(x[keep], a[keep], k)
    counts = np.bincount(assignment[assignment >= 0], minlength=k)
    return (sums / np.maximum(counts, 1)[:, None]).astype(np.float32)


def _as_store(store) -> FeatureStore:
    """A FeatureStore as it is; an (N, D) array, tensor or nested list as an unlabelled one."""
    if isinstance(store, FeatureStore):
        return store
    refuse_path(store, "features")
    return FeatureStore(features=store)


def class_count(data) -> int:
    """The number of classes of labelled ``data`` (a FeatureStore or a data set), so the number
    of units :func:`class_means` makes of it (an experiment checks class ids against its pool
    before embedding it): one per class name, else one per label 0..max (integer labels without
    names are class indices); FeatureStore has checked that every label has a name."""
    return len(data.class_names) if data.class_names else int(data.labels.max()) + 1


def class_means(store: FeatureStore, *, normalize: bool = False, progress: bool = False) -> Units:
    r"""One unit per class: the mean feature ``mu_c = (1/|c|) sum_{x in c} phi(x)``.

    As the official code of Liu et al. (NeurIPS 2022) does, features are averaged unnormalised
    (the cosine cost normalises the means); ``normalize=True`` L2-normalises every feature first.

    Args:
        store: features with labels ``0..C-1`` (every class must have a sample).
        normalize: average L2-normalised features instead of raw ones.
        progress: show a progress bar over the samples.
    """
    store = _as_store(store)
    if store.labels is None:
        raise PretrainReuseError(
            "the features have no labels, which class means need: pass "
            "FeatureStore(features, labels) (--labels beside .npy features; class folders, a "
            "labelled list file or labelled sentences when embedding), or use k-means units "
            "(spherical_kmeans, --method kmeans)")
    present = np.unique(store.labels)  # sorted; not a bincount, which a label 10**12 would blow up
    n_classes = class_count(store)
    if len(present) < n_classes:
        gaps = np.flatnonzero(present != np.arange(len(present)))
        first = int(gaps[0]) if len(gaps) else len(present)
        if store.class_names and store.meta.get("producer") != "embed":
            raise PretrainReuseError(
                f"{len(store.class_names)} class names for features whose labels name "
                f"{len(present)} classes ({n_classes - len(present)} without samples, first: "
                f"{store.class_names[first]!r}, label {first}); give one name per label 0..C-1 "
                "(--class-names: line i names label i), or relabel the samples")
        if store.class_names:  # embedded from class folders or a list file: name the class
            raise PretrainReuseError(
                f"{n_classes - len(present)} classes have no samples (first: "
                f"{store.class_names[first]!r}, label {first}): the data names them but holds "
                "no readable image of them; add readable images of those classes, or remove them "
                "from the data, and embed again, or cluster the features without their labels "
                "(--method kmeans)")
        raise PretrainReuseError(
            f"{n_classes - len(present)} classes have no samples (first: label {first}); relabel "
            "the samples to 0..C-1 with every class present")
    counts = np.bincount(store.labels, minlength=n_classes)
    protos = _group_means(store.features, store.labels, n_classes, normalize, progress,
                          ids=store.ids)
    check_matrix("class means", protos)
    meta = make_meta("units.class_means", {"normalize": normalize},
                     inputs=_store_inputs(store))
    meta.update(sizes=size_report(counts), embedding=embedding_of(store))
    return Units(prototypes=protos, kind="class", assignment=store.labels.copy(),
                 sample_ids=list(store.ids), names=store.class_names, meta=meta)


#: How spherical k-means picks its initial centroids (see :func:`spherical_kmeans`).
INITS = ("random", "k-means++")

#: k-means++ seeds from a random subsample of at least this many samples (``10 k`` if larger):
#: it adds one centroid at a time, so it costs k passes over the samples it draws from.
KMEANSPP_SAMPLES = 10_000


def spherical_kmeans(store: FeatureStore | np.ndarray, k: int, *, n_iter: int = 20, n_init: int = 1,
                     seed: int = 0, init: str = "random", max_points_per_unit: int | None = None,
                     normalize_means: bool = False, use_gpu: bool = False,
                     progress: bool = False) -> Units:
    r"""Cluster unlabelled features by spherical k-means, then summarise each cluster by its mean.

    Assignments ``a`` and unit-norm centroids ``c_k`` of the L2-normalised features ``x_i`` maximise

    .. math:: \sum_i \langle x_i, c_{a(i)} \rangle
              = \sum_k \Big\| \sum_{i: a(i) = k} x_i \Big\| \quad (c_k \text{ optimal}),

    i.e. cosine similarity, as Liu et al. (NeurIPS 2022, §3.2) cluster 1.28M MoCo-v2 features into
    K = 2000 clusters. Solved by online spherical k-means (Zhong, IJCNN 2005) in steps: the samples
    are shuffled once (seeded); each pass cuts that order into slices of ``32 k`` samples and visits
    the slices in a random order, one step per slice. The samples of a step move to their most
    similar centroid, then every centroid they left or joined becomes the normalised sum of its
    members. Each step is a block-coordinate ascent step (the objective never decreases) and the
    centroids improve several times per pass, not once as in batch Lloyd (faiss, scikit-learn).
    Only passes 1, 3, 9, 27, ... compare every sample with all k centroids; the others compare it
    with its 16 most similar centroids of the last such pass, at a small fraction of the cost. On
    200k x 128 features with K = 2000, 18 passes reach a higher objective than 20 iterations of
    scikit-learn's Lloyd, 3.5-4.0x faster on one thread, over 80% of it in the 3 full passes
    (``benchmarks/kmeans.py``). Training stops early when a full pass moves no sample (a fixed
    point of Lloyd too). An emptied cluster is re-seeded next to the largest one (as faiss does).
    Initial centroids are ``k`` distinct samples drawn with ``seed`` (``init="random"``, as faiss)
    or drawn by greedy k-means++ (Arthur & Vassilvitskii, SODA 2007; scikit-learn's default):
    for each next centroid, ``2 + ln k`` candidates are drawn with probability proportional to
    their cosine distance ``1 - cos`` to the nearest centroid so far, and the one that leaves the
    smallest sum of such distances is kept, all from a random subsample of ``max(10000, 10 k)``
    samples. Random starts put two centroids in one cluster and none in another, and local moves
    cannot undo it: on 5 well-separated directions (5000 x 16, noise 0.02) random starts
    recovered the clusters in 2 of 5 seeds (adjusted Rand 0.70-0.72 in the others), k-means++ in
    5 of 5; with 50 clusters ARI 0.66-0.83 vs 0.98-1.0; on 50 Gaussian classes (2000 x 64) ARI
    0.80-0.92 vs 0.96-1.0 (scikit-learn's k-means++ 0.975-1.0; drawing one candidate, as this
    function did before, 0.90-0.91). On the benchmark's overlapping blobs (200k x 128, K = 2000)
    it did not raise the objective and its draw took 5 s (2 threads), hence not the default.
    Runs in float32 (cluster sums in float64) on the CPU (BLAS and faiss kernels,
    multi-threaded) or on the CUDA GPU.

    Args:
        store: features (labels ignored), or an (N, D) array, tensor or nested list of them.
            Rows are read chunk by chunk, so a memmap works.
        k: number of clusters, ``1 <= k <= N``.
        n_iter: passes over the training samples, at most.
        n_init: independent runs from different random starts; the best objective is kept.
        seed: seed of the initial centroids, the visiting order and the training subsample.
        init: ``"random"`` or ``"k-means++"``, the initial centroids (see above).
        max_points_per_unit: train on at most ``k *`` this many samples (faiss uses 256); None
            trains on all. Every sample is then assigned to its most similar centroid.
        normalize_means: prototypes are the means of normalised features (default: raw features,
            like class means).
        use_gpu: run on the CUDA GPU, which holds all N x D features (10.5 GB for ImageNet's
            1.28M x 2048). Off by default, also where torch sees a GPU: the GPU's clusters
            differ from the CPU's in the last bits, and the same seed must give the same units.
        progress: show a progress bar.

    Returns:
        Units of kind ``"cluster"``: ``assignment`` is every sample's cluster after the last pass
        (at convergence, its most similar centroid). ``meta["objective"]`` is the mean cosine
        similarity of every sample to its cluster's mean direction; ``meta["passes"]``,
        ``meta["full_passes"]``, ``meta["converged"]`` (the last pass was full and moved no
        sample), ``meta["sizes"]``, ``meta["empty_reseeded"]`` (clusters emptied during training
        and re-seeded) and ``meta["empty_dropped"]`` (clusters still empty at the end, removed)
        describe the run.
    """
    store = _as_store(store)
    n = len(store.features)
    # as ints: faiss and NumPy's sampling refuse NumPy integers and floats
    k = check_int("k", k, minimum=1)
    if k > n:
        raise PretrainReuseError(f"k={k} clusters is not possible with {n} samples; pass 1 <= k <= {n}")
    n_iter, n_init = check_int("n_iter", n_iter, minimum=1), check_int("n_init", n_init, minimum=1)
    seed = check_seed("seed", seed)
    check_choice("init", init, INITS)
    if max_points_per_unit is not None:  # -1 would cut rows off the end
        max_points_per_unit = check_int("max_points_per_unit", max_points_per_unit, minimum=1)
    gpu = bool(use_gpu)
    if gpu and not torch.cuda.is_available():
        raise PretrainReuseError("use_gpu=True (--device cuda) but torch sees no CUDA GPU; pass "
                                 "use_gpu=False (--device cpu)")
    rng = np.random.default_rng(seed)
    # shuffled once, so that a pass's steps are slices: no gathered copies of the rows
    position = np.argsort(rng.permutation(n))  # row i of the store is row position[i] of x
    x_np = _normalized_float32(store.features, position, progress, ids=store.ids)
    try:
        objective, assign, fit = _best_of_runs(x_np, k, n_iter, n_init, init, max_points_per_unit,
                                               gpu, rng, progress)
    except torch.cuda.OutOfMemoryError:
        raise PretrainReuseError(
            f"k-means of {n} x {x_np.shape[1]} features does not fit in the GPU's free memory; "
            "run it on the CPU (use_gpu=False, --device cpu) or free the GPU") from None
    del x_np  # the normalised copy: the means below read the features again
    assign = assign[position]  # back to the order of the store
    counts = np.bincount(assign, minlength=k)
    empty = np.flatnonzero(counts == 0)
    if len(empty):  # renumber so that every unit has members
        keep = np.flatnonzero(counts > 0)
        assign = np.searchsorted(keep, assign)
        k = len(keep)
    protos = _group_means(store.features, assign, k, normalize_means, progress, ids=store.ids)
    meta = make_meta("units.spherical_kmeans",
                     {"k": int(k + len(empty)), "n_iter": n_iter, "n_init": n_init, "init": init,
                      "max_points_per_unit": max_points_per_unit,
                      "normalize_means": normalize_means, "gpu": bool(gpu)},
                     # the labels a store may carry play no part in the clusters
                     inputs=_store_inputs(replace(store, labels=None)),
                     seed=seed)
    meta.update(embedding=embedding_of(store), objective=objective, passes=fit.passes,
                full_passes=fit.full_passes,
                converged=fit.converged,
                sizes=size_report(np.bincount(assign)), empty_reseeded=fit.reseeded,
                empty_dropped=len(empty))
    return Units(prototypes=protos, kind="cluster", assignment=assign.astype(np.int64),
                 sample_ids=list(store.ids), meta=meta)


def _best_of_runs(x_np: np.ndarray, k: int, n_iter: int, n_init: int, init: str,
                  max_points_per_unit: int | None, gpu: bool, rng: np.random.Generator,
                  progress: bool) -> tuple[float, np.ndarray, _Fit]:
    """The objective, assignment and fit of the best of ``n_init`` k-means runs on the unit rows
    ``x_np`` (on the GPU if ``gpu``); see :func:`spherical_kmeans`."""
    x = torch.from_numpy(x_np).to("cuda" if gpu else "cpu")
    train = x
    if max_points_per_unit is not None and len(x) > k * max_points_per_unit:
        train = x[:k * max_points_per_unit]  # the first rows of a random order: a random subsample
    best = None
    for run in range(n_init):
        fit = _online_kmeans(train, _initial_centroids(train, k, init, rng), n_iter, rng,
                             progress, f"k-means K={k} run {run + 1}")
        assign = fit.assign if train is x else _most_similar(x, fit.centroids, 1)[:, 0]
        assign = assign.cpu().numpy()
        objective = _spherical_objective(x_np, assign, k)
        if best is None or objective > best[0]:
            best = (objective, assign, fit)
    return best


def embedding_of(store: FeatureStore) -> dict[str, Any] | None:
    """What computed a store's features, as ``embed`` records it: the backbone, its layer, the
    hash of the parameters that compute that layer, the input side and the precision (bf16 on
    a GPU, fp32; None in stores of earlier versions); None for features from elsewhere (a
    ``.npy``). Units carry it (``meta["embedding"]``), so that a selection can tell when source
    and target units summarise features of different networks or image sizes, whose
    similarities mean little."""
    params, inputs = store.meta.get("params", {}), store.meta.get("inputs", {})
    if store.meta.get("producer") != "embed" or not inputs.get("state"):
        return None
    return {"model": params.get("model"), "layer": params.get("layer"), "state": inputs["state"],
            "input_size": store.meta.get("backbone", {}).get("input_size"),
            "precision": store.meta.get("precision")}


def _store_inputs(store: FeatureStore) -> dict[str, Any]:
    """The hashes of the features and labels: the files' own for ``.npy`` files, which
    :meth:`FeatureStore.from_npy` has taken (a second pass over ImageNet's 10 GB of features
    took as long as the means); and, where known, the samples they are of (:func:`data_of`),
    which a selection records of its target."""
    files = store.meta.get("inputs", {}) if store.meta.get("producer") == "npy" else {}
    inputs = {"features": files.get("features") or hash_array(store.features)}
    if store.labels is not None:
        inputs["labels"] = files.get("labels") or hash_array(store.labels)
    data = data_of(store)
    if data is not None:
        inputs["data"] = data
    return inputs


def data_of(store: FeatureStore) -> dict[str, Any] | None:
    """Which samples ``store`` holds features of, as a selection records them of its target
    (``meta.inputs.target.data``) for ``finetune`` to compare with the target data it trains on.

    ``ids`` and ``n``: the hash (:func:`~.features.hash_ids`) and number of the store's sample
    ids. For features from ``embed`` also what it read: ``embedded_ids``, its hash of the ids of
    all that data (the store lacks the unreadable images; a store of some of its rows, like the
    training images of an experiment's low-data regime, lacks others), and ``data``, an embedded
    data set's name or the resolved path of the folder (its ``split`` sub-folder) or list file,
    as ``finetune`` names its target. A relative path is resolved from the working folder, which
    is embed's where the commands run in one folder; one that does not exist from here is kept
    as written. None for a store whose ids are the numbered rows (``.npy`` features): nothing
    to compare."""
    if store.meta.get("producer") != "embed":
        if store.ids == [str(i) for i in range(len(store))]:  # the ids FeatureStore makes up
            return None
        return {"ids": hash_ids(store.ids), "n": len(store)}
    inputs, split = store.meta.get("inputs", {}), store.meta.get("params", {}).get("split")
    data = inputs.get("data")
    if data is not None and data not in DATASETS:  # as embed opens it (open_dataset)
        path = Path(data) / split if split else Path(data)
        data = str(path.resolve()) if path.exists() else data
    return {"ids": hash_ids(store.ids), "n": len(store), "embedded_ids": inputs.get("ids"),
            "data": data}


def _normalized_float32(features: np.ndarray, position: np.ndarray, progress: bool = False,
                        chunk: int | None = None, ids: list[str] | None = None) -> np.ndarray:
    """Contiguous float32 copy with unit-norm rows, row ``i`` of the features at row
    ``position[i]``. Read chunk by chunk in file order (works on memmaps), scattered in memory.
    ``ids``: the samples' ids, which name a refused row."""
    out = np.empty(features.shape, dtype=np.float32)
    chunk = chunk or _chunk_rows(features.shape[1])
    zero = []  # all of them are counted: one dead row and a dead class call for other fixes
    for s in _chunks(len(features), chunk, progress, "normalising"):
        block = float32_rows(features, slice(s, s + chunk), ids)
        norms = _row_norms(block)
        zero += (s + np.flatnonzero(norms[:, 0] == 0)).tolist()
        out[position[s:s + chunk]] = block / np.where(norms == 0, 1, norms)
    if zero:
        raise PretrainReuseError(
            f"{len(zero)} of the {len(features)} feature rows are all zeros (first: row {zero[0]}, "
            f"sample {zero[0]} in the features' order) and have no direction for spherical "
            "k-means; if the backbone gave them (embed warns of them), check its weights and "
            "layer; else remove those samples from the data and embed again (or their rows "
            "from a .npy file), or build class units (units --method class)")
    return out


def _chunks(n: int, chunk: int, progress: bool, desc: str):
    """The starts of the chunks of ``n`` rows, with a progress bar over the rows: reading and
    normalising 1.3M features from disk takes seconds before and after the k-means passes. The
    bar starts once the first chunk has passed its checks, so that features refused there (NaN)
    give the error line alone."""
    bar = None
    try:
        for start in range(0, n, chunk):
            yield start
            if bar is None:
                bar = tqdm(total=n, desc=desc, unit="sample", disable=not progress,
                           unit_scale=True)
            bar.update(min(chunk, n - start))
    finally:
        if bar is not None:
            bar.close()


@dataclass(frozen=True)
class _Fit:
    """One online k-means run: unit-norm centroids (K, D), assignment (N,) and diagnostics."""

    centroids: torch.Tensor
    assign: torch.Tensor
    passes: int
    full_passes: int
    converged: bool
    reseeded: int


def _initial_centroids(x: torch.Tensor, k: int, init: str, rng: np.random.Generator) -> torch.Tensor:
    """(k, D) initial centroids among the unit rows ``x``: ``k`` distinct random rows, or the
    k-means++ draw (see :func:`spherical_kmeans`)."""
    n = len(x)
    if init == "random":
        return x[torch.from_numpy(rng.choice(n, k, replace=False)).to(x.device)].clone()
    budget = max(KMEANSPP_SAMPLES, 10 * k)
    pool = x[torch.from_numpy(np.sort(rng.choice(n, budget, replace=False))).to(x.device)] \
        if n > budget else x
    trials = 2 + int(math.log(k))  # scikit-learn's number of candidates per centroid
    draws = torch.from_numpy(rng.random((k, trials))).to(x.device)
    chosen = [int(rng.integers(len(pool)))]
    # float64: the running sum over tens of thousands of distances decides the draw
    nearest = (1.0 - pool @ pool[chosen[0]]).clamp_(min=0.0).double()
    for j in range(1, k):
        total = torch.cumsum(nearest, 0)
        # an all-zero distance (fewer distinct rows than k) draws uniformly: duplicates, which the
        # training empties and re-seeds as it does any empty cluster
        cands = torch.searchsorted(total, draws[j] * total[-1]).clamp_(max=len(pool) - 1) \
            if total[-1] > 0 else torch.from_numpy(rng.integers(len(pool), size=trials)).to(x.device)
        # each candidate's distances to all rows in one product; keep the candidate that leaves
        # the smallest sum of distances to the nearest centroid
        after = torch.minimum(nearest[:, None], (1.0 - pool @ pool[cands].T).clamp_(min=0.0).double())
        best = int(after.sum(0).argmin())
        chosen.append(int(cands[best]))
        nearest = after[:, best].contiguous()
    return pool[torch.tensor(chosen, device=x.device)].clone()


def _online_kmeans(x: torch.Tensor, centroids: torch.Tensor, n_iter: int, rng: np.random.Generator,
                   progress: bool, desc: str, step_per_cluster: int = 32, n_cand: int = 16) -> _Fit:
    """Online spherical k-means on unit rows ``x`` from the unit rows ``centroids`` (see
    spherical_kmeans).

    A step moves ``step_per_cluster * k`` rows, then updates the centroids. With ~32 rows per
    cluster per step the objective rises much faster than with one step per pass (batch Lloyd)
    and, on the benchmark data (200k x 128, k = 2000), ends higher than with 1-16 rows per
    cluster, which lock in early assignments. A full pass compares every row with all k centroids
    and keeps its ``n_cand`` most similar as candidates; the passes after it compare rows with
    their candidates only. Full passes are 1, 3, 9, 27, ...: the centroids move less and less, so
    candidates stay good for longer (on the benchmark data, 95% of the rows that a full pass 3
    passes later would move have their new centroid among their 16 candidates, 70% 5 passes
    later). The rows of a step are a slice of ``x`` (shuffled by the caller), so the step reads
    them in place: gathering them costs more than comparing them with their candidates. A
    candidate pass that moves no row, or a re-seeding, calls a full pass; training has converged
    when a full pass moves no row.
    """
    n, dim = x.shape
    k = len(centroids)
    n_cand = min(n_cand, k)
    # float64: members are added to and removed from the sums many times over the passes
    sums = torch.zeros(k, dim, dtype=torch.float64, device=x.device)
    counts = torch.zeros(k, dtype=torch.int64, device=x.device)
    assign = torch.full((n,), -1, dtype=torch.int64, device=x.device)  # -1: in no cluster yet
    cand = torch.empty(n, n_cand, dtype=torch.int64, device=x.device)  # first: the best
    reseeded, full, full_passes = 0, True, 0
    full_at = {3 ** j for j in range(n_iter.bit_length())}
    size = step_per_cluster * k
    piece = _chunk_rows(dim) // 2  # rows per float64 copy
    bar = tqdm(range(1, n_iter + 1), desc=desc, disable=not progress, unit="pass")
    for passes in bar:
        moved, full_passes = 0, full_passes + full
        for start in rng.permutation(np.arange(0, n, size)).tolist():
            step = slice(start, start + size)
            if full:
                cand[step] = _most_similar(x[step], centroids, n_cand)
                new = cand[step, 0]
            else:
                new = _best_candidate(x[step], centroids, cand[step])
            old = assign[step]
            change = torch.nonzero(new != old).squeeze(1)
            if len(change) == 0:
                continue
            rows, old, new = change + start, old[change], new[change]
            assign[rows] = new
            had = old >= 0  # in the first pass, a row has no cluster to leave
            _move_rows(sums, x, rows[had], old[had], piece, leave=True)
            counts -= torch.bincount(old[had], minlength=k)
            _move_rows(sums, x, rows, new, piece)
            counts += torch.bincount(new, minlength=k)
            touched = torch.unique(torch.cat([old[had], new]))
            touched = touched[counts[touched] > 0]  # an emptied cluster waits to be re-seeded
            s = sums[touched]
            centroids[touched] = (s / s.norm(dim=1, keepdim=True).clamp_min(1e-12)).float()
            moved += len(change)
        bar.set_postfix(moved=moved, full=full)
        # a fixed point: no later pass can move a row either (a candidate pass that moves none
        # has compared rows with a few centroids only, and calls a full pass to make sure)
        converged = full and moved == 0
        if converged:
            break
        seeded = _reseed_empty(centroids, counts, rng) if passes < n_iter else 0
        reseeded += seeded
        full = moved == 0 or seeded > 0 or passes + 1 in full_at
    return _Fit(centroids, assign, passes=passes, full_passes=full_passes,
                converged=converged, reseeded=reseeded)


def _most_similar(x: torch.Tensor, centroids: torch.Tensor, k: int, chunk: int = 2048) -> torch.Tensor:
    """Indices of the k centroids most similar to every row of x, most similar first: (N, k)."""
    if x.device.type != "cpu":
        return torch.cat([(xc @ centroids.T).topk(k, dim=1).indices for xc in x.split(chunk)])
    # faiss: blocked BLAS products and heap selection in one call, all in faiss's thread pool.
    # (torch.topk on the CPU takes as long as the product; alternating torch and faiss parallel
    # regions per chunk makes their two OpenMP pools fight over the cores.)
    import faiss

    return torch.from_numpy(faiss.knn(x.numpy(), centroids.numpy(), k, metric=faiss.METRIC_INNER_PRODUCT)[1])


def _best_candidate(x: torch.Tensor, centroids: torch.Tensor, cand: torch.Tensor) -> torch.Tensor:
    """``cand[i, j]`` with the largest ``<x[i], centroids[cand[i, j]]>``, for every row i: (N,)."""
    if x.device.type != "cpu":
        return _best_candidate_gathered(x, centroids, cand)
    # faiss reads the centroids in place (torch would first copy them out, 60x slower); NumPy's
    # argmax is ~9x faster than torch's on the CPU
    import faiss

    x, centroids, cand = x.numpy(), centroids.numpy(), cand.numpy()
    sims = np.empty(cand.shape, dtype=np.float32)
    faiss.fvec_inner_products_by_idx(faiss.swig_ptr(sims), faiss.swig_ptr(x), faiss.swig_ptr(centroids),
                                     faiss.swig_ptr(cand), x.shape[1], len(x), cand.shape[1])
    return torch.from_numpy(np.take_along_axis(cand, sims.argmax(1)[:, None], 1)[:, 0])


def _best_candidate_gathered(x: torch.Tensor, centroids: torch.Tensor, cand: torch.Tensor,
                             chunk: int = 2048) -> torch.Tensor:
    """:func:`_best_candidate` in torch operations (the GPU's), ``chunk`` rows at a time: the
    candidates of a whole step (32 k rows) gathered at once take 2048 k D bytes, 8 GB at
    k = 2000 and D = 2048."""
    best = [c.gather(1, torch.einsum("icd,id->ic", centroids[c], xc).argmax(1, keepdim=True))[:, 0]
            for xc, c in zip(x.split(chunk), cand.split(chunk), strict=True)]
    return torch.cat(best)


def _reseed_empty(centroids: torch.Tensor, counts: torch.Tensor, rng: np.random.Generator) -> int:
    """Put each empty cluster's centroid next to one of the largest clusters' (a perturbed copy),
    so that the next pass splits that cluster between the two (as faiss does)."""
    empty = torch.nonzero(counts == 0).squeeze(1)
    if len(empty):
        big = torch.argsort(counts, descending=True)[:len(empty)]
        noise = rng.standard_normal((len(empty), centroids.shape[1]), dtype=np.float32)
        c = centroids[big] + 1e-3 * torch.from_numpy(noise).to(centroids.device)
        centroids[empty] = c / c.norm(dim=1, keepdim=True)
    return len(empty)


def _cluster_sums(x: np.ndarray, assign: np.ndarray, k: int) -> np.ndarray:
    sums = torch.zeros(k, x.shape[1], dtype=torch.float64)
    _add_rows(sums, torch.from_numpy(assign), torch.from_numpy(np.ascontiguousarray(x)).double())
    return sums.numpy()


def _move_rows(sums: torch.Tensor, x: torch.Tensor, rows: torch.Tensor, units: torch.Tensor,
               piece: int, *, leave: bool = False) -> None:
    """``sums[units[j]] += x[rows[j]]`` (``-=`` when the rows ``leave`` their units) in float64,
    ``piece`` rows at a time: a step's rows at once would be a float64 copy of 32 k rows (1 GB at
    k = 2000, D = 2048)."""
    for s in range(0, len(rows), piece):
        xc = x[rows[s:s + piece]].double()
        _add_rows(sums, units[s:s + piece], xc.neg_() if leave else xc)


def _add_rows(sums: torch.Tensor, index: torch.Tensor, rows: torch.Tensor) -> None:
    """``sums[index[j]] += rows[j]`` for every j, in order (deterministic). Not index_add_: with
    2 CPU threads on a busy machine it is 4-30x slower."""
    sums.index_put_((index,), rows, accumulate=True)


def _spherical_objective(x: np.ndarray, assign: np.ndarray, k: int) -> float:
    """Mean cosine similarity of the (unit-norm) samples to their cluster's mean direction:
    ``sum_k |sum_{i in k} x_i| / N``. Summed chunk by chunk: no float64 copy of all of x."""
    chunk = _chunk_rows(x.shape[1])
    sums = sum(_cluster_sums(x[s:s + chunk], assign[s:s + chunk], k) for s in range(0, len(x), chunk))
    return float(np.linalg.norm(sums, axis=1).sum() / len(x))


def _unit_rows(m: np.ndarray) -> np.ndarray:
    norms = _row_norms(m)
    return (m / np.where(norms > 0, norms, 1.0)).astype(np.float32)


def _row_norms(m: np.ndarray) -> np.ndarray:
    """(N, 1) L2 norms of the rows, in float64: squared float32 entries overflow above 1e19."""
    return np.linalg.norm(m.astype(np.float64), axis=1, keepdims=True)
