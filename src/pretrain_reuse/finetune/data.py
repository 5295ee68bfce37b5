"""What the training loop eats: deterministic step batches of target and selected source samples.

The sample indices of optimiser step ``t`` are a pure function of ``(seed, t)``: epoch-wise seeded
permutations (drop_last, as the official code) for the target and, independently, for the source
stream. A resumed run therefore needs nothing but the step counter to continue exactly where it
stopped, and every rank of a distributed run can compute its share without communication.
"""

from __future__ import annotations

import signal
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from ..artifacts import hash_array
from ..data.datasets import Batch, ImageDataset, line_names
from ..data.text import TextDataset
from ..errors import PretrainReuseError
from ..selection import Selection
from ..units import Units, class_count


def resize_transform(size: int):
    """Per-sample CPU transform: resize the shorter side to ``size`` and centre-crop a square, so
    images of any shape collate into one batch; the random crops happen on the device.

    A deviation from torchvision's pipeline (and the official code's): RandomResizedCrop then
    samples its box (scale 0.08-1 of the area, ratio 3/4-4/3) inside this central square, not in
    the whole image, so the strips beyond the square of a non-square image are never seen. For
    the square images of the bundled data sets, and for the usual near-square photos, the two
    agree or nearly so."""

    def transform(image: torch.Tensor) -> torch.Tensor:
        h, w = image.shape[-2:]
        if (h, w) != (size, size):
            scale = size / min(h, w)
            nh, nw = max(size, round(h * scale)), max(size, round(w * scale))
            image = F.interpolate(image[None], size=(nh, nw), mode="bilinear",
                                  antialias=True, align_corners=False)[0]
            top, left = (nh - size) // 2, (nw - size) // 2
            image = image[:, top:top + size, left:left + size]
        return image

    return transform


def split_validation(labels: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Carve a class-stratified validation split from training labels (seeded).

    Every class with at least two samples gives ``round(fraction * n_c)`` samples (at least one);
    the rest stay for training. Returns sorted (train, val) index arrays.
    """
    val = _draw_validation(labels, np.arange(len(labels)), fraction, seed, keep_one=True)
    return np.setdiff1d(np.arange(len(labels)), val), val


def held_out_validation(labels: np.ndarray, train: np.ndarray, fraction: float,
                        seed: int) -> np.ndarray:
    """Validation samples drawn from those not in ``train`` (the images a low-data or long-tail
    regime leaves out), seeded: ``round(fraction * n_c)`` (at least one) of every class c of the
    whole pool, or all that are left of it (none for a class the regime keeps entirely, like the
    largest class of a long tail). Returns sorted indices."""
    rest = np.setdiff1d(np.arange(len(labels)), train)
    return _draw_validation(labels, rest, fraction, seed, keep_one=False)


def _draw_validation(labels: np.ndarray, candidates: np.ndarray, fraction: float, seed: int, *,
                     keep_one: bool) -> np.ndarray:
    """``round(fraction * n_c)`` (at least one) random ``candidates`` of every class c, capped by
    the class's candidates (less one with ``keep_one``, so that training keeps a sample)."""
    rng = np.random.default_rng([seed, 7])
    val = []
    for c in np.unique(labels):
        idx = candidates[labels[candidates] == c]
        want = max(1, round(fraction * np.count_nonzero(labels == c))) if fraction > 0 else 0
        k = min(want, len(idx) - 1 if keep_one else len(idx))
        val.extend(rng.choice(idx, k, replace=False) if k > 0 else [])
    return np.sort(np.asarray(val, dtype=np.int64))


def check_dataset(name: str, data: object) -> None:
    """Refuse ``data`` (the argument ``name``) that is not an opened data set: a name or path,
    which only the command line and :func:`~.run.run_finetune` open."""
    if not isinstance(data, ImageDataset | TextDataset):
        raise PretrainReuseError(
            f"{name} must be an ImageDataset or TextDataset, got {type(data).__name__}; open it "
            "with pretrain_reuse.data.open_dataset(path or name, split=...) or "
            "pretrain_reuse.data.text.text_file(path)")


def check_batch_size(n: int, batch_size: int, *, what: str = "training",
                     flag: str = "--batch-size") -> None:
    """Epochs drop the last partial batch, so a batch needs at least ``batch_size`` samples."""
    if n < batch_size:
        raise PretrainReuseError(
            f"batch size {batch_size} exceeds the {n} {what} samples; pass a smaller {flag}")


class StepBatches:
    """Index batches per optimiser step: epoch ``e`` uses permutation ``rng(seed, stream, e)``.

    ``balanced_groups`` (optional, one group id per sample) switches to group-balanced sampling:
    each draw picks a group uniformly, then a sample inside it (seeded per step).
    """

    def __init__(self, n: int, batch_size: int, seed: int, stream: int,
                 balanced_groups: np.ndarray | None = None):
        if balanced_groups is None:
            check_batch_size(n, batch_size)
        self.n, self.batch_size, self.seed, self.stream = n, batch_size, seed, stream
        self.steps_per_epoch = max(1, n // batch_size)
        self.groups = None
        if balanced_groups is not None:
            order = np.argsort(balanced_groups, kind="stable")
            _, start = np.unique(balanced_groups[order], return_index=True)
            self.groups = (order, np.append(start, len(order)))
        self._epoch, self._perm = -1, np.empty(0, np.int64)  # the last epoch's permutation

    def batch(self, step: int) -> np.ndarray:
        if self.groups is not None:
            order, bounds = self.groups
            rng = np.random.default_rng([self.seed, self.stream, step])
            g = rng.integers(0, len(bounds) - 1, self.batch_size)
            pos = bounds[g] + (rng.random(self.batch_size) * (bounds[g + 1] - bounds[g])).astype(int)
            return order[pos]
        epoch, pos = divmod(step, self.steps_per_epoch)
        if epoch != self._epoch:  # kept for the epoch's other steps: a permutation of a large
            # source pool costs more than a training step (90 ms for 1.3M samples)
            self._epoch = epoch
            self._perm = np.random.default_rng([self.seed, self.stream, epoch]).permutation(self.n)
        return self._perm[pos * self.batch_size:(pos + 1) * self.batch_size]


class _StepData(torch.utils.data.Dataset):
    """Item ``step``: the collated batch of that step, read as a whole (``load_batch``)."""

    def __init__(self, dataset: ImageDataset, batches: StepBatches):
        self.dataset, self.batches = dataset, batches

    def __getitem__(self, step: int) -> Batch:
        return self.dataset.load_batch(self.batches.batch(step))


def _as_is(batch: Batch) -> Batch:
    return batch


def step_loader(dataset: ImageDataset, batches: StepBatches, start: int, stop: int,
                workers: int, pin_memory: bool = False) -> Iterable[Batch]:
    """The collated batch of each step in ``[start, stop)``. With ``workers`` (or ``pin_memory``:
    batches in page-locked memory, for asynchronous copies to a CUDA device), a DataLoader whose
    items are whole steps (``batch_size=None``), so that each worker builds whole batches; else
    the batches are read right here, in order, without a DataLoader's bookkeeping (50 us a step,
    0.4 % of a 13 ms CPU step of smallcnn-s)."""
    steps = _StepData(dataset, batches)
    if workers == 0 and not pin_memory:
        return map(steps.__getitem__, range(start, stop))
    return torch.utils.data.DataLoader(
        steps, batch_size=None, sampler=range(start, stop), num_workers=workers,
        collate_fn=_as_is, persistent_workers=False, pin_memory=pin_memory,
        worker_init_fn=_ignore_ctrl_c)


def _ignore_ctrl_c(worker: int) -> None:
    """A terminal's Ctrl-C reaches the loader's processes too: they leave it to the training
    loop, which stops after the step under way (a worker that died of it crashed the run)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


@dataclass(frozen=True)
class SourceData:
    """The selected pre-training samples and the labels the source loss uses.

    Attributes:
        dataset: the selected samples (a subset of the pre-training pool).
        labels: per selected sample, the class index of the source head (remapped to the
            selected classes, or the original index with ``source_head="full"``); -1 when the
            pool is unlabelled.
        groups: per selected sample, its unit (for unit-balanced sampling).
        num_classes: size of the source head (0 when unlabelled).
    """

    dataset: ImageDataset | TextDataset
    labels: np.ndarray
    groups: np.ndarray
    num_classes: int


def _check_selection(selection: Selection, n: int, pool: str, fix: str) -> None:
    """The selection must rank the ``n`` units of the pool (``pool`` says what they are)."""
    ranked = len(selection.scores)  # one score per unit the selection ranked
    if ranked != n:
        raise PretrainReuseError(f"the selection ranks {ranked} units, but {pool.format(n=n)}; {fix}")


def selected_source(pool: ImageDataset, selection: Selection, units: Units | None, *,
                    source_head: str) -> SourceData:
    """The pool samples of the selected units (Liu et al.: *all* images of the selected units).

    Class units: samples whose label is a selected class. Cluster units: samples that ``units``
    assigns to a selected cluster, matched by sample id, so the pool must be the data the units
    were built from.
    """
    selected = np.asarray(selection.selected, dtype=np.int64)
    clusters = units is not None and units.kind == "cluster"
    if selection.unit_kind == "cluster" and not clusters:
        # read as class ids, cluster ids name other samples: with as many clusters as classes
        # (K = 1000 on ImageNet-1k) nothing else would tell
        raise PretrainReuseError(
            "the selection ranks k-means clusters, whose samples only their units file knows; "
            "pass the clusters' units file (--units) the selection was made from")
    if clusters:
        _check_selection(selection, len(units), "the units file has {n}",
                         "pass the units file the selection was made from")
        # as many clusters is not enough: another k-means run (seed) numbers other clusters
        made_on = selection.meta.get("inputs", {}).get("source", {}).get("units")
        if made_on is not None and made_on != hash_array(units.prototypes):
            raise PretrainReuseError(
                "the selection was made on other units than the units file (another k-means run "
                "or file); pass the units file the selection was made from")
        chosen = np.flatnonzero(np.isin(units.assignment, selected))  # positions in the units
        if pool.ids == units.sample_ids:  # the data the units were built from, in its order
            idx = chosen
        else:  # matched by id (1.28M ids: a dictionary of a second or two)
            position = {sid: i for i, sid in enumerate(pool.ids)}
            found = [position.get(units.sample_ids[i]) for i in chosen]
            missing = [units.sample_ids[i] for i, p in zip(chosen, found, strict=True) if p is None]
            if missing:
                raise PretrainReuseError(
                    f"{len(missing)} samples of the selected clusters are not in the pre-training "
                    f"data (first: {missing[0]!r}); pass the data the units were built from")
            order = np.argsort(np.asarray(found, dtype=np.int64), kind="stable")
            idx, chosen = np.asarray(found, dtype=np.int64)[order], chosen[order]
        return SourceData(pool.subset(idx), np.full(len(idx), -1), units.assignment[chosen], 0)
    if pool.labels is None:
        raise PretrainReuseError(
            "the pre-training data has no labels, so class units cannot be selected from it; "
            "build cluster units (`units --method kmeans`) and pass them with --units")
    n_classes = class_count(pool)
    _check_selection(selection, n_classes, "the pre-training data has {n} classes",
                     "select over this data's class means, or pass --units for a selection of "
                     "k-means clusters")
    # the names the pool gave the units' classes, where a --class-names file renamed them; a
    # unit named by a line that starts with its class's name ("n01440764 tench, Tinca tinca") is
    # that class
    names = selection.meta.get("data_class_names") or selection.unit_names
    if names and pool.class_names:
        wrong = [i for i, (a, b) in enumerate(zip(names, pool.class_names, strict=True))
                 if not line_names(a, b)]
        if wrong:
            raise PretrainReuseError(
                f"the selection's unit {wrong[0]} is {names[wrong[0]]!r}, but class {wrong[0]} of "
                f"the pre-training data is {pool.class_names[wrong[0]]!r}; select over this data's "
                "class means")
    idx = np.flatnonzero(np.isin(pool.labels, selected))
    if len(idx) == 0:
        raise PretrainReuseError("the selected classes have no samples in the pre-training data")
    groups = pool.labels[idx]
    if source_head == "selected":
        # head output j is the j-th selected class, in ranking order: the same classes ranked
        # otherwise (two distances of table4) start from another pairing of head rows and
        # classes, which moves a run's numbers as another seed would
        remap = np.full(n_classes, -1)
        remap[selected] = np.arange(len(selected))
        return SourceData(pool.subset(idx), remap[groups], groups, len(selected))
    return SourceData(pool.subset(idx), groups.copy(), groups, n_classes)
