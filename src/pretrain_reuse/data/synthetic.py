"""Generated data with a known answer, so that selection can be scored without any download.

:func:`feature_world` plants the structure selection must recover directly in feature space:
pre-training classes come in groups (like ImageNet's birds or dogs); the target task's classes are
new classes of a few of those groups, so the *related* pre-training classes are known exactly
(the ground truth for recall, like the 59 bird classes for CUB in Liu et al., Table 4). A set of
"hub" classes sits at the barycentre of the target groups: close to the target task on average
but close to none of its classes, which is the trap that separates a per-class criterion (UOT)
from an averaged one (greedy OT), as argued in ``methods/reuse.md`` §1.5.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..artifacts import make_meta
from ..errors import PretrainReuseError
from ..features import FeatureStore


@dataclass(frozen=True)
class FeatureWorld:
    """A pre-training pool and a target task in feature space, with the planted answer.

    Attributes:
        pretrain: labelled pre-training features (class ids ``0..C-1``, names ``g03/c07``...).
        target: labelled target features.
        related: ids of the pre-training classes in the target task's groups (the ground truth).
        hubs: ids of the distractor classes planted at the barycentre of the target groups.
    """

    pretrain: FeatureStore
    target: FeatureStore
    related: np.ndarray
    hubs: np.ndarray


def feature_world(*, n_groups: int = 40, classes_per_group: int = 25, target_groups: int = 4,
                  target_classes_per_group: int = 5, n_hubs: int = 25, dim: int = 64,
                  samples_per_class: int = 40, target_samples_per_class: int = 30,
                  group_spread: float = 0.6, class_spread: float = 0.35, noise: float = 0.5,
                  seed: int = 0) -> FeatureWorld:
    """Generate a planted pre-training / target pair of feature sets.

    Group centres are random unit vectors; a class centre is its group centre plus
    ``group_spread``-scaled Gaussian offset; a sample is its class centre plus ``noise``. Target
    classes are fresh classes of ``target_groups`` randomly chosen groups. Hub classes sit at the
    mean of the target group centres plus ``class_spread`` offsets.
    """
    if target_groups > n_groups:
        raise PretrainReuseError(f"target_groups={target_groups} exceeds n_groups={n_groups}")
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((n_groups, dim))
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    scale = 1.0 / np.sqrt(dim)  # offsets of norm ~spread around unit-norm centres

    def classes(base: np.ndarray, k: int, spread: float) -> np.ndarray:
        return base + spread * scale * rng.standard_normal((k, dim))

    pre_centres = [classes(centres[g], classes_per_group, group_spread) for g in range(n_groups)]
    chosen = np.sort(rng.choice(n_groups, target_groups, replace=False))
    barycentre = centres[chosen].mean(axis=0)
    hub_centres = classes(barycentre, n_hubs, class_spread)
    all_pre = np.concatenate([*pre_centres, hub_centres])
    names = [f"g{g:02d}/c{c:02d}" for g in range(n_groups) for c in range(classes_per_group)]
    names += [f"hub/c{c:02d}" for c in range(n_hubs)]
    tgt_centres = np.concatenate([classes(centres[g], target_classes_per_group, group_spread)
                                  for g in chosen])
    tgt_names = [f"t{g:02d}/c{c:02d}" for g in chosen for c in range(target_classes_per_group)]

    def sample(cents: np.ndarray, per_class: int, prefix: str, label_names: list[str]) -> FeatureStore:
        labels = np.repeat(np.arange(len(cents)), per_class)
        feats = cents[labels] + noise * scale * rng.standard_normal((len(labels), dim))
        ids = [f"{prefix}/{label_names[y]}/{i:05d}" for i, y in enumerate(labels)]
        return FeatureStore(features=feats.astype(np.float32), labels=labels, ids=ids,
                            class_names=label_names,
                            meta=make_meta("data.synthetic.feature_world", params, seed=seed))

    params = dict(n_groups=n_groups, classes_per_group=classes_per_group,
                  target_groups=target_groups, target_classes_per_group=target_classes_per_group,
                  n_hubs=n_hubs, dim=dim, samples_per_class=samples_per_class,
                  target_samples_per_class=target_samples_per_class, group_spread=group_spread,
                  class_spread=class_spread, noise=noise)
    pretrain = sample(all_pre, samples_per_class, "pretrain", names)
    target = sample(tgt_centres, target_samples_per_class, "target", tgt_names)
    related = np.concatenate([np.arange(g * classes_per_group, (g + 1) * classes_per_group)
                              for g in chosen])
    hubs = n_groups * classes_per_group + np.arange(n_hubs)
    return FeatureWorld(pretrain=pretrain, target=target, related=related, hubs=hubs)
