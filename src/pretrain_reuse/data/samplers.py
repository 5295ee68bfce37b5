r"""Subsets of a labelled training set for the paper's low-data and long-tail settings.

Both samplers take the label vector of a training set and return a :class:`Subsample`: the sorted
positions of the kept samples and the parameters that produced them (kept per class included), so
that a run can record and replay exactly which images it trained on. They are seeded and never
touch test sets: evaluate on the full test split.

- :func:`subsample_fraction` -- low data (Liu et al., NeurIPS 2022, §4: 20/40/60/80 % of the CUB
  and Caltech training images per class): class c keeps :math:`\max(1, \lfloor f\, n_c \rfloor)`
  of its :math:`n_c` images, chosen uniformly at random.
- :func:`subsample_long_tail` -- long tail with imbalance ratio r (largest / smallest class, r = 10
  in the paper), the exponential profile of Cui et al., "Class-Balanced Loss Based on Effective
  Number of Samples", CVPR 2019:
  :math:`n_c = \min\big(a_c, \max(1, \lfloor n_{max}\, r^{-\rho(c)/(C-1)} \rfloor)\big)`, where
  :math:`a_c` is the number of images class c has, :math:`n_{max}` the largest :math:`a_c`, and
  :math:`\rho(c)` the rank of class c: its index (``order="index"``, as in Cui et al.'s code) or
  its position in a seeded random permutation (``order="random"``).

A value the data cannot realise is refused rather than run under its name: a fraction below
:math:`1 / n_{max}` (every class would keep its one image whatever the fraction) and a ratio above
:math:`n_{max}` (the smallest classes would keep one image, so the largest / smallest class would
be :math:`n_{max}`, not r). Between these, the floor and the one image a small class keeps make
the share or ratio differ from the one asked for: ``params`` records the realised one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..errors import PretrainReuseError, check_choice

ORDERS = ("index", "random")


@dataclass(frozen=True)
class Subsample:
    """Positions kept by a sampler (sorted int64) and the parameters that chose them.

    ``params`` holds the sampler's name and arguments and ``per_class``: the number of samples kept
    for each class label ``0..C-1``.
    """

    indices: np.ndarray
    params: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.indices)


def subsample_fraction(labels: np.ndarray, fraction: float, *, seed: int) -> Subsample:
    """Keep ``floor(fraction * n_c)`` (at least 1) random samples of every class c;
    ``params["realised"]`` is the share of all samples kept."""
    labels = _check_labels(labels)
    if not 0 < fraction <= 1:
        raise PretrainReuseError(f"fraction must be in (0, 1], got {fraction!r} (e.g. 0.2 for 20 %)")
    available = np.bincount(labels)
    # The 1e-9 keeps exact products (0.025 * 40) from flooring one below.
    share = np.floor(fraction * available + 1e-9)
    if share.max() < 1:
        raise PretrainReuseError(
            f"train fraction {fraction:g} keeps less than one image of every class (the largest "
            f"has {available.max()}); the smallest fraction this data allows is "
            f"{_up(1 / available.max()):g}")
    keep = np.where(available > 0, np.maximum(1, share), 0).astype(int)
    indices = _draw(labels, keep, np.random.default_rng(seed))
    return Subsample(indices, {"sampler": "fraction", "fraction": fraction, "seed": seed,
                               "per_class": keep.tolist(),
                               "realised": float(keep.sum() / available.sum())})


def subsample_long_tail(labels: np.ndarray, ratio: float = 10.0, *, seed: int,
                        order: str = "index") -> Subsample:
    """Keep an exponentially decaying number of samples per class, largest/smallest = ``ratio``
    (Cui et al., CVPR 2019; see the module docstring for the exact profile)."""
    labels = _check_labels(labels)
    if not (ratio >= 1 and math.isfinite(ratio)):
        raise PretrainReuseError(f"ratio must be a finite number >= 1 (largest / smallest class), "
                                 f"got {ratio!r}")
    check_choice("order", order, ORDERS)
    rng = np.random.default_rng(seed)
    available = np.bincount(labels)
    n_classes = len(available)
    rank = np.arange(n_classes) if order == "index" else rng.permutation(n_classes)
    exponent = rank / max(n_classes - 1, 1)
    n_max = int(available.max())
    # The 1e-9 keeps exact integers (n_max / r at the last rank) from flooring one below.
    if np.floor(n_max / ratio + 1e-9) < 1:
        raise PretrainReuseError(
            f"long-tail ratio {ratio:g} asks for less than one image in the smallest class (the "
            f"largest has {n_max}); the largest ratio this data allows is {n_max}")
    target = np.maximum(1, np.floor(n_max / ratio**exponent + 1e-9)).astype(int)
    keep = np.minimum(target, available)
    indices = _draw(labels, keep, rng)
    present = keep[available > 0]
    return Subsample(indices, {"sampler": "long-tail", "ratio": ratio, "order": order,
                               "seed": seed, "n_max": n_max, "rank": rank.tolist(),
                               "per_class": keep.tolist(),
                               "realised": float(present.max() / present.min())})


def _up(value: float, digits: int = 4) -> float:
    """``value`` rounded up to ``digits`` significant digits (a bound that stays a bound)."""
    scale = 10.0 ** (digits - 1 - math.floor(math.log10(value)))
    return math.ceil(value * scale) / scale


def _check_labels(labels) -> np.ndarray:
    if labels is None:
        raise PretrainReuseError("labels are required to subsample per class; this dataset is unlabelled")
    labels = np.asarray(labels)
    if labels.ndim != 1 or labels.size == 0 or not np.issubdtype(labels.dtype, np.integer):
        raise PretrainReuseError(
            f"labels must be a non-empty vector of integer class indices, got dtype {labels.dtype} "
            f"shape {labels.shape}")
    if labels.min() < 0:
        raise PretrainReuseError("labels must be non-negative class indices (-1 means unlabelled)")
    return labels


def _draw(labels: np.ndarray, keep: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """``keep[c]`` random positions of each class c (classes in index order), sorted."""
    by_class = np.split(np.argsort(labels, kind="stable"), np.cumsum(np.bincount(labels))[:-1])
    chosen = [rng.choice(members, size=k, replace=False) for members, k in zip(by_class, keep, strict=True)]
    return np.sort(np.concatenate(chosen)).astype(np.int64)
