"""A fine-tuning run assembled from names and paths (what the CLI and the experiments call):
the target splits and regimes, the source data of a selection, the model, then the loop
(:func:`~.loop.train`)."""

from __future__ import annotations

import hashlib
import json
import os
import sys
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..artifacts import hash_array, hash_file, make_run_folder, read_json, releases_folders
from ..data.catalog import DATASETS, check_out_outside, has_splits, open_dataset, split_folders
from ..data.datasets import DataWarning, ImageDataset, first_readable, labels_by_name, require_labels
from ..data.samplers import subsample_fraction, subsample_long_tail
from ..data.text import TextDataset, is_sentence_file, text_file
from ..distributed import process_device, rank_world
from ..errors import PretrainReuseError, check_file, preview
from ..features import hash_ids
from ..models import create_backbone
from ..models.checkpoint import weights_hash
from ..models.registry import check_modality, model_modality
from ..models.spec import BackboneSpec
from ..selection import Selection
from ..units import Units, class_count
from .augment import View, input_size
from .config import FinetuneConfig
from .data import (
    SourceData,
    check_batch_size,
    check_dataset,
    held_out_validation,
    resize_transform,
    selected_source,
    split_validation,
)
from .evaluate import (
    cotuning_relationship,
    cotuning_reverse_relationship,
    predict,
    sentence_view,
)
from .loop import RunResult, check_shares, total_steps, train
from .model import FinetuneModel, reinitialize, source_classifier

__all__ = ["finetune_datasets", "open_split", "run_finetune", "target_splits"]

#: The data arguments of a run (recorded by :func:`_data_identity`).
DATA_INPUTS = ("target", "target_test", "source")


def data_flags(target, target_test, source) -> dict[str, Any]:
    """The data a fine-tuning run reads, by the flag that names it in messages."""
    return {"--target": target, "--target-test": target_test, "--source": source}


def target_splits(cfg: FinetuneConfig, train_pool: ImageDataset | TextDataset
                  ) -> tuple[ImageDataset | TextDataset, ImageDataset | TextDataset, dict]:
    """Training and validation subsets of the target training data (seeded), and the record of
    the chosen sample ids (saved as ``split.json`` so the run can be audited).

    A low-data (``train_fraction``) or long-tail (``long_tail_ratio``) regime draws the training
    subset from the whole pool, so it has exactly the paper's size (20 % of every class; largest
    / smallest class = ratio), and the validation images come from the images it leaves out
    (:func:`~.data.held_out_validation`). Without a regime, validation is carved from the pool
    (:func:`~.data.split_validation`)."""
    require_labels(train_pool, "fine-tuning")
    labels = train_pool.labels
    sampler = {}
    if cfg.train_fraction is not None or cfg.long_tail_ratio is not None:
        sub = (subsample_fraction(labels, cfg.train_fraction, seed=cfg.seed)
               if cfg.train_fraction is not None
               else subsample_long_tail(labels, cfg.long_tail_ratio, seed=cfg.seed,
                                        order=cfg.long_tail_order))
        train_idx, sampler = np.sort(sub.indices), sub.params
        val_idx = held_out_validation(labels, train_idx, cfg.val_fraction, cfg.seed)
    else:
        train_idx, val_idx = split_validation(labels, cfg.val_fraction, cfg.seed)
    record = {"train": [train_pool.ids[i] for i in train_idx],
              "val": [train_pool.ids[i] for i in val_idx], "sampler": sampler, "seed": cfg.seed}
    return train_pool.subset(train_idx), train_pool.subset(val_idx), record


def open_split(spec: str | Path, split: str, *, flag: str = "data") -> ImageDataset | TextDataset:
    """``split`` (``train`` or ``test``) of an embedded data set or of a folder of split folders
    (``train/``, ``test/``: the sub-folder of that name), else the folder / list file / sentence
    file ``spec`` itself (a folder of class folders holds one split; its test data is
    passed separately). An embedded set of one split (``digits``) is all training data, like a
    folder. ``flag`` names the argument in errors."""
    name = str(spec)
    if is_sentence_file(name):
        return text_file(check_file(flag, name))
    if name not in DATASETS:
        splits = split_folders(Path(spec))
        if splits and split not in splits:
            images = "training" if split == "train" else split
            raise PretrainReuseError(
                f"{flag}: {name!r} holds the split folders {', '.join(splits)}, none named "
                f"{split!r}; pass the folder or list file of the {images} images ({flag})")
        return open_dataset(spec, split=split if splits else None)
    if DATASETS[name].splits != ("all",):
        return open_dataset(spec, split=split)
    if split == "test":
        raise PretrainReuseError(f"{name} is one set of images, with no test split; fine-tune on "
                                 "it with --target-test giving other test data")
    return open_dataset(spec, split="all")


def run_finetune(cfg: FinetuneConfig, *, model: str, target: str, out: str | Path,
                 weights: str | Path | None = None, target_test: str | None = None,
                 source: str | None = None, selection: str | Path | Selection | None = None,
                 units: str | Path | Units | None = None, progress: bool = True,
                 check_only: bool = False) -> RunResult | int:
    """Fine-tune backbone ``model`` (with local ``weights``) on the ``target`` data.

    Args:
        cfg: the recipe (mode, optimiser, schedule, regimes).
        model: a backbone name (:func:`~pretrain_reuse.models.create_backbone`).
        target: target training data: folder, list file or embedded name; of a folder of
            split folders (``train/``, ``test/``), its ``train/``.
        out: run folder (created; a rerun with the same arguments resumes it).
        weights: local weights file of the pre-trained backbone.
        target_test: test data (of a folder of split folders, its ``test/``); default: the
            ``test`` split of an embedded ``target`` or of a ``target`` folder of splits. Where
            both name their classes, its classes are matched to the training data's by name;
            it may lack some of them (noted), not hold others.
        source: the pre-training pool (reuse modes); of a folder of split folders, its
            ``train/``.
        selection: ``sel.json`` from ``pretrain-reuse select``, or the :class:`Selection`
            itself (reuse modes); one made for other target data than ``target`` (by the
            sample ids and the folder or file it records of its target) is warned of.
        units: the units file the selection was made on, or the :class:`Units` themselves
            (needed for cluster units).
        check_only: make every check of the run (options, data, batch sizes, model), write
            nothing, and return the number of validation images (a grid checks all its runs
            before the first).

    A rerun resumes the run in ``out`` when its inputs are the same, compared by what they hold,
    not by how they were given: the weights by their tensors, a selection by its selected unit
    ids, units by their prototypes (a file and the object it holds are the same input; a
    selection saved again with a new creation time too), data folders and list files by their
    resolved path, besides the sample ids and labels every split holds.
    """
    _check_config(cfg)
    _check_source_inputs(cfg, {"--source": source, "--selection": selection, "--units": units},
                         "--mode")
    flags = data_flags(target, target_test, source)
    check_out_outside(out, flags)
    if target_test is None and not has_splits(target):
        if not Path(str(target)).exists():  # a typo, not a folder without its test split
            raise PretrainReuseError(f"--target {str(target)!r} does not exist; pass an image "
                                     "folder, a list file, an embedded data set name or a "
                                     "sentence file (.jsonl, .csv or .tsv)")
        raise PretrainReuseError("pass --target-test with the test data (folder, list file or "
                                 "sentence file: .jsonl, .csv or .tsv)")
    # a model of the other modality is refused before the data is read (listing a large image
    # folder takes long), where its name or configuration files tell its modality
    modality = model_modality(model)
    for flag, spec in flags.items():
        if spec is not None:
            check_modality(model, modality, is_sentence_file(spec), flag)
    _check_text_mode(cfg, modality)  # before the pool is read, which may hold no labels
    # every file is checked before any is read: a missing one is one line
    files = {"weights": _input_file("--weights", weights),
             "selection": _input_file("--selection", selection, Selection),
             "units": _input_file("--units", units, Units)}
    selection = selection if files["selection"] is None else Selection.load(files["selection"])
    cluster_units = units if files["units"] is None else Units.load(files["units"])
    _check_cluster_units(cluster_units, "--units")
    specs = dict(zip(DATA_INPUTS, (target, target_test or target, source), strict=True))
    data = {"target": open_split(target, "train", flag="--target"),
            "target_test": open_split(specs["target_test"], "test", flag="--target-test"),
            "source": open_split(source, "train", flag="--source") if cfg.uses_source else None}
    if selection is not None:
        for side in ("target", "source"):
            if data[side] is not None:
                _warn_of_other_data(selection, files["selection"], side, specs[side], data[side])
    inputs = {"model": model,
              "weights": weights_hash(files["weights"]) if weights is not None else None,
              **{key: None if data[key] is None else _data_identity(specs[key], data[key])
                 for key in DATA_INPUTS},
              # what the selected ids index is recorded apart: the units (clusters), and the
              # source data's labels (classes) in the data fingerprint
              "selection": _selected_hash(selection) if selection is not None else None,
              "units": hash_array(cluster_units.prototypes) if cluster_units is not None else None}
    if out is not None:
        inputs = _as_recorded(Path(out), inputs, {**files, **specs})
    return _finetune(
        cfg, model=model, weights=weights, train_pool=data["target"],
        test_set=data["target_test"], source_pool=data["source"], selection=selection,
        units=cluster_units, out=out, inputs=inputs, progress=progress, check_only=check_only)


#: How a selection made for other data than a run's is named in its warning (the text a
#: warnings filter matches) and the fix it suggests, per side of the selection.
_OTHER_DATA = {
    "target": ("selection for another target", "--target",
               "select for this target (embed it, then select --target its features)"),
    "source": ("selection from another pool", "--source",
               "select from this pool (embed it, build its units, then select --source them)"),
}


def _warn_of_other_data(selection: Selection, path: Path | None, side: str, spec: str | Path,
                        dataset: ImageDataset | TextDataset) -> None:
    """Warn when ``selection`` was made for other data than the run's ``--target`` or
    ``--source`` (``side``; the target all of it, before the validation split and any regime's
    subsample). The selection records the samples of each side's features
    (:func:`~pretrain_reuse.units.data_of`): the hash of their ids and, for features from
    ``embed``, the hash of the ids of all the data embed read (unreadable images included, which
    the features lack) and that data's name or path. The data differ when neither hash is that
    of the given data's ids, or when the recorded path is another folder or file than the given
    one (two folders of the same file names have the same ids; a relative path, not resolvable
    where the units were made, is not compared). On the source side the selected classes or
    clusters would then be other images than those selected.

    A selection that records no samples (written by an earlier version, or made for ``.npy``
    features or prototypes, whose rows have no ids) is not compared: the hash of its labels,
    all it has, differs for the same data where the features left out unreadable images
    or the labels came from a ``.npy`` file, and agrees for other data with the same class
    sizes. A warning, not an error: reusing a selection across data can be deliberate. (Only
    here, where a selection is paired with data by hand: an experiment selects for the very
    images a run trains on.)"""
    recorded = selection.meta.get("inputs", {}).get(side, {}).get("data")
    if not recorded:
        return
    ids, where = hash_ids(dataset.ids), _data_identity(spec, dataset)
    made_for = recorded.get("data")
    placed = made_for is not None and (made_for in DATASETS or Path(made_for).is_absolute())
    same_ids = ids in (recorded.get("ids"), recorded.get("embedded_ids"))
    if same_ids and (not placed or made_for == where):
        return
    name, flag, fix = _OTHER_DATA[side]
    given = "" if path is None else f" ({str(path)!r})"
    of = f" of {made_for!r}" if made_for else ""
    # the same ids elsewhere: other images of the same names, or other labels of the same images
    has = (f"the same sample ids in {where!r} (other files, or other labels, of the same names)"
           if same_ids else f"{len(dataset)} samples of {where!r} (ids {ids})")
    warnings.warn(
        f"{name}: the selection{given} was made for the {recorded.get('n')} samples{of} (ids "
        f"{recorded.get('ids')}), {flag} {str(spec)!r} has {has}; {fix}, or, reusing the "
        f"selection on purpose, silence this with PYTHONWARNINGS='ignore:{name}'", DataWarning,
        stacklevel=3)


def _input_file(flag: str, value: str | Path | Selection | Units | None,
                artifact: type | None = None) -> Path | None:
    """The checked path of the file input ``flag``; None when it is not given or is the
    ``artifact`` object itself (a Selection from select(), Units from spherical_kmeans)."""
    if value is None or (artifact is not None and isinstance(value, artifact)):
        return None
    if not isinstance(value, str | os.PathLike):
        accepted = "a file path" + (f" or a {artifact.__name__} object" if artifact else "")
        raise PretrainReuseError(f"{flag} must be {accepted}, got {type(value).__name__}")
    path = check_file(flag, value)
    if path.is_dir():
        raise PretrainReuseError(f"{flag}: {str(path)!r} is a folder; pass the path of a file")
    return path


def _selected_hash(selection: Selection) -> str:
    """What a run records of its selection: the selected unit ids, in their order (the order
    numbers the classes of the selected source head)."""
    return hash_array(np.asarray(selection.selected, dtype=np.int64))


def _data_identity(spec: str | Path, dataset: ImageDataset) -> str:
    """What a run records of a data argument: an embedded set's name, else the resolved path of
    the folder or list file read, however it was written (relative, absolute, through a link)."""
    return str(spec) if str(spec) in DATASETS else str(Path(dataset.source).resolve())


def _as_recorded(out: Path, inputs: dict, given: dict) -> dict:
    """``inputs``, keeping the record of a run in ``out`` begun by a version that recorded
    inputs in an earlier form, where that record is this form of the input ``given`` now: files
    by their bytes (a selection or units file, whose bytes hold its creation time; weights) and
    data by the path as written (read here from the current folder). Such a run resumes, and its
    run.json, whose hash its snapshots carry, stays as it is."""
    marker = out / "run.json"
    if not marker.is_file():
        return inputs
    old = read_json(marker, "run marker").get("inputs", {})
    kept = dict(inputs)
    for key, value in given.items():
        recorded = old.get(key)
        if value is None or not isinstance(recorded, str) or recorded == inputs[key]:
            continue
        if (str(Path(recorded).resolve()) == inputs[key] if key in DATA_INPUTS
                else recorded == hash_file(value)):
            kept[key] = recorded
    return kept


def finetune_datasets(cfg: FinetuneConfig, *, model: str, train_pool: ImageDataset | TextDataset,
                      test_set: ImageDataset | TextDataset, out: str | Path,
                      weights: str | None = None,
                      source_pool: ImageDataset | TextDataset | None = None,
                      selection: Selection | None = None,
                      units: Units | None = None, inputs: dict | None = None,
                      progress: bool = True, check_only: bool = False) -> RunResult | int:
    """:func:`run_finetune` on dataset objects (any :class:`~pretrain_reuse.data.ImageDataset`,
    or :class:`~pretrain_reuse.data.text.TextDataset` sentences for a text model):
    ``train_pool`` is split into training and validation data, ``test_set`` is only reported on,
    ``source_pool`` + ``selection`` (+ ``units`` for clusters) give the reused data;
    ``check_only`` as in :func:`run_finetune`.

    The run's inputs (in ``run.json`` and the ``meta`` of ``result.json`` and
    ``model.safetensors``) include ``class_names``: the training data's class names, output i of
    the fine-tuned head naming class i, as JSON text (``null`` for data without names).

    Source data, a selection or units for a mode that reuses no pre-training data are refused,
    as :func:`run_finetune` refuses them, and so is their absence in a mode that does; so are
    options the mode never reads (:meth:`~.FinetuneConfig.check_options_used`)."""
    _check_config(cfg)
    _check_source_inputs(cfg, {"source_pool": source_pool, "selection": selection, "units": units},
                         "mode")
    for name, data in (("train_pool", train_pool), ("test_set", test_set),
                       ("source_pool", source_pool)):
        if data is not None:
            check_dataset(name, data)
    for name, value, artifact in (("selection", selection, Selection), ("units", units, Units)):
        if value is not None and not isinstance(value, artifact):
            raise PretrainReuseError(
                f"{name} must be a {artifact.__name__}, got {type(value).__name__}; open the file "
                f"with {artifact.__name__}.load(path), or give run_finetune its path")
    _check_cluster_units(units, "units")
    return _finetune(cfg, model=model, weights=weights, train_pool=train_pool, test_set=test_set,
                     out=out, source_pool=source_pool, selection=selection, units=units,
                     inputs=inputs, progress=progress, check_only=check_only)


@releases_folders
def _finetune(cfg: FinetuneConfig, *, model: str, train_pool: ImageDataset | TextDataset,
              test_set: ImageDataset | TextDataset, out: str | Path, weights: str | None,
              source_pool: ImageDataset | TextDataset | None, selection: Selection | None,
              units: Units | None, inputs: dict | None, progress: bool,
              check_only: bool) -> RunResult | int:
    """:func:`finetune_datasets` on checked arguments (its own, or those of
    :func:`run_finetune`)."""
    with torch.random.fork_rng(devices=[]):  # a seeded initialisation of any fresh layer
        torch.manual_seed(cfg.seed)
        backbone = create_backbone(model, weights=weights, device="cpu")
        if cfg.mode == "scratch":
            reinitialize(backbone, cfg.seed)
    text = _check_modality_and_recipe(
        backbone.spec, cfg, {"--target": train_pool, "--target-test": test_set,
                             "--source": source_pool})
    if cfg.image_size is not None:  # saved with the model: evaluated at the size it trained at
        backbone.set_input_side(cfg.image_size)
    # what turns a sample into the model's input: the tokenizer, or a resize of the image (the
    # random crops happen on the training device)
    resize = backbone.preprocess if text else resize_transform(backbone.spec.resize_side)
    num_classes = _check_classes(train_pool, progress)
    train_set, val_set, split = target_splits(cfg, train_pool)
    check_batch_size(len(train_set), cfg.batch_size)  # before anything is written
    check_shares(cfg, rank_world()[1])  # torchrun's shares, before the run folder is made
    if not text and first_readable(train_set) is None:  # each batch would fail, the first after the folder
        raise PretrainReuseError(
            f"none of the {len(train_set)} training images can be read (first: "
            f"{train_set.ids[0]!r}); check that the files exist and are images, or repair them")
    total_steps(cfg, len(train_set))
    test_set = test_set.subset(range(len(test_set)))
    for d in (train_set, val_set, test_set):  # views of the caller's data, safe to configure
        d.transform = resize
    _match_classes(train_pool, test_set, num_classes, progress)
    _warn_of_training_images(train_pool, test_set)

    source_data: SourceData | None = None
    source_classes = None
    if cfg.uses_source:
        source_data = selected_source(source_pool, selection, units, source_head=cfg.source_head)
        source_data.dataset.transform = resize
        if cfg.source_sampling != "units":  # balanced sampling draws with replacement
            check_batch_size(len(source_data.dataset), cfg.source_batch_size or cfg.batch_size,
                             what="selected source", flag="--source-batch-size")
        if cfg.mode == "reuse":
            if source_data.num_classes == 0:
                fix = ("for sentences, select class units of a labelled pool (units of its "
                       "features with labels)" if isinstance(source_pool, TextDataset)
                       else "use 'reuse-unlabeled' for clusters")
                raise PretrainReuseError(f"mode 'reuse' needs labelled source units; {fix}")
            source_classes = source_data.num_classes
    net = FinetuneModel(backbone, num_classes, source_classes=source_classes,
                        frozen_backbone=cfg.mode == "linear-probe", seed=cfg.seed,
                        source_bn=cfg.source_bn)
    if cfg.mode == "co-tuning":
        _attach_relationship(net, train_set, val_set, cfg, num_classes)
    if check_only:
        return len(val_set)
    # only now: a bad argument leaves no folder
    out = make_run_folder(Path(out), "a fine-tuning run", "run.json", ("split.json",),
                          kind="finetune-run").parent
    # the paths alone do not show data changed on disk; a resumed run would mix the two. The
    # class names, as JSON text (the run's meta holds its inputs as text), name the outputs of
    # the head in model.safetensors, so that data with other classes can be refused there
    inputs = {**(inputs or {"model": model, "weights": weights}),
              "data": _data_fingerprint(train_set, val_set, test_set, source_data),
              "class_names": json.dumps(train_pool.class_names)}
    return train(cfg, net, train_set, val_set, test_set, source_data, out, inputs=inputs,
                 split=split, progress=progress)


#: The recipe options that act on images (or on BatchNorm, which text models do not have).
IMAGE_OPTIONS = ("image_size", "augment", "source_bn")


def _check_config(cfg: FinetuneConfig) -> None:
    if not isinstance(cfg, FinetuneConfig):
        raise PretrainReuseError(
            f"cfg must be a FinetuneConfig, got {type(cfg).__name__}; build it with "
            "FinetuneConfig(**fields) or load_config(path)")
    cfg.check_options_used()


def _check_cluster_units(units: Units | None, name: str) -> None:
    """Refuse class units where cluster units are asked for: a class selection maps to samples
    by their labels, so the units would be ignored."""
    if units is not None and units.kind != "cluster":
        raise PretrainReuseError(
            f"{name} holds {units.kind} units, which map to samples by their labels, so it would "
            f"be ignored; only a selection of clusters needs {name}: drop it")


def _check_source_inputs(cfg: FinetuneConfig, source: dict[str, object], mode: str) -> None:
    """Refuse the ``source`` inputs (the pre-training data, the selection, the units, by the
    names the caller gives them: flags or arguments) given to a mode that reuses no pre-training
    data, which would ignore them, or the first two missing in one that does. ``mode`` names the
    mode's flag or argument in the advice."""
    data, chosen, _ = source
    missing = [f"{what} ({name})" for name, what in ((data, "the pre-training data"),
                                                    (chosen, "a selection of its units"))
               if source[name] is None]
    if cfg.uses_source and missing:
        raise PretrainReuseError(f"mode {cfg.mode!r} needs {' and '.join(missing)}"
                                 + ("" if len(missing) == 2 else ", which was not given"))
    given = [name for name, value in source.items() if value is not None]
    if given and not cfg.uses_source:
        raise PretrainReuseError(
            f"mode {cfg.mode!r} reuses no pre-training data, so {', '.join(given)} would be "
            f"ignored; pass {mode} reuse or reuse-unlabeled, or drop "
            f"{'it' if len(given) == 1 else 'them'}")


def _check_text_mode(cfg: FinetuneConfig, modality: str | None) -> None:
    """Refuse ``reuse-unlabeled`` for a text model (``modality``, None where unknown)."""
    if modality == "text" and cfg.mode == "reuse-unlabeled":
        raise PretrainReuseError(
            "mode 'reuse-unlabeled' trains on weak and strong augmentations of images, which "
            "sentences do not have; reuse labelled sentences with --mode reuse and class units")


def _check_modality_and_recipe(spec: BackboneSpec, cfg: FinetuneConfig,
                               data: dict[str, ImageDataset | TextDataset | None]) -> bool:
    """Whether the run is on sentences: a text model needs sentence files for every
    data argument, an image model images; a text recipe takes no image option and no
    ``reuse-unlabeled`` (its strong view is an image augmentation)."""
    for flag, dataset in data.items():
        if dataset is not None:
            check_modality(spec.name, spec.modality, isinstance(dataset, TextDataset), flag)
    if spec.modality != "text":
        return False
    _check_text_mode(cfg, spec.modality)
    default = FinetuneConfig()
    for name in IMAGE_OPTIONS:
        value = getattr(cfg, name)
        # augment none is what sentences get: a recipe written for images may say so
        if value != getattr(default, name) and (name, value) != ("augment", "none"):
            raise PretrainReuseError(f"{name} applies to images, not to the sentences of the text "
                                     f"model {spec.name}; drop it")
    return True


def _data_fingerprint(train_set: ImageDataset | TextDataset, val_set: ImageDataset | TextDataset,
                      test_set: ImageDataset | TextDataset, source: SourceData | None) -> str:
    """SHA-256 of the sample ids and labels of every split the run reads, and of the sentences
    themselves (their default ids, ``file:line``, stay the same when a file is edited)."""
    digest = hashlib.sha256()
    for part in (train_set, val_set, test_set, *([source.dataset] if source else [])):
        digest.update(json.dumps([part.ids, np.asarray(part.labels).tolist()]).encode())
        if isinstance(part, TextDataset):
            digest.update(json.dumps(part.texts).encode())
    if source is not None:
        digest.update(json.dumps(source.labels.tolist()).encode())
    return digest.hexdigest()


def _check_classes(train_pool: ImageDataset, progress: bool) -> int:
    """The number of target classes (the head's outputs): the class names, else the largest
    label + 1. A task of one class, or labels far beyond the number of images (most classes
    would be empty; a head of 10^12 outputs would not fit in memory), is refused; classes
    without a training image are noted, as their outputs are never trained."""
    labels = train_pool.labels
    if labels is None or len(labels) == 0:
        raise PretrainReuseError(
            "the target training data is empty or unlabelled; fine-tuning needs labelled "
            "training data: pass as --target a folder with a sub-folder of images per class, or "
            "a list file of path,label rows")
    num_classes = class_count(train_pool)
    if num_classes > len(train_pool):
        raise PretrainReuseError(
            f"the training labels go up to {num_classes - 1}, but there are {len(train_pool)} "
            "images: most classes would have none; number the classes 0..C-1")
    present = np.unique(labels)  # the splits and subsamples keep an image of every class
    if len(present) < 2:
        raise PretrainReuseError(
            f"the training data holds one class only ({_class_name(train_pool, int(present[0]))}); "
            "fine-tuning a classifier needs at least two")
    missing = np.setdiff1d(np.arange(num_classes), present)
    if len(missing) and progress:
        names = [_class_name(train_pool, int(c)) for c in missing]
        print(f"note: {len(missing)} of {num_classes} classes have no training image "
              f"({preview(names)}); their outputs are never trained", file=sys.stderr)
    return num_classes


def _class_name(data: ImageDataset, label: int) -> str:
    return data.class_names[label] if data.class_names else f"label {label}"


def _match_classes(train_pool: ImageDataset, test_set: ImageDataset, num_classes: int,
                   progress: bool) -> None:
    """Accuracy is only meaningful when label c means the same class in training and test data.

    Where both name their classes, ``test_set`` (the run's own view) is relabelled by name into
    the training data's numbering: an image folder numbers its classes in sorted order, a list
    file with a ``classes.txt`` in that file's order. A test class the training data lacks is
    refused; training classes without test images are noted (the test accuracy counts the images
    there are, the mean per-class accuracy averages over the classes they show)."""
    if test_set.labels is None or len(test_set) == 0:
        raise PretrainReuseError("the test data is empty or unlabelled; pass labelled test data "
                                 "(--target-test)")
    if progress and bool(train_pool.class_names) != bool(test_set.class_names):
        named, unnamed = (("training", "test") if train_pool.class_names else ("test", "training"))
        print(f"note: the {named} data names its classes and the {unnamed} data does not "
              f"(integer labels), so the {named} data's class i is taken as label i (its "
              "classes in their order); name the classes in both, or in neither", file=sys.stderr)
    test_set.labels = labels_by_name(test_set, train_pool.class_names, "test data (--target-test)")
    if train_pool.class_names and test_set.class_names:
        test_set.class_names = list(train_pool.class_names)
    if int(test_set.labels.max()) >= num_classes:
        raise PretrainReuseError(
            f"the test data has label {int(test_set.labels.max())}, but the training data has "
            f"{num_classes} classes; pass test data with the same classes (--target-test)")
    trained = np.unique(train_pool.labels)
    untested = np.setdiff1d(trained, test_set.labels)
    if len(untested) and progress:
        names = [_class_name(train_pool, int(c)) for c in untested]
        samples = "sentences" if isinstance(test_set, TextDataset) else "images"
        print(f"note: the test data has no {samples} of {len(untested)} of the {len(trained)} "
              f"training classes ({preview(names)}); its accuracy counts its own {samples}, and its "
              f"mean per-class accuracy averages over the {len(np.unique(test_set.labels))} "
              "classes it has", file=sys.stderr)


def _warn_of_training_images(train_pool: ImageDataset | TextDataset,
                             test_set: ImageDataset | TextDataset) -> None:
    """Warn when test images are training images (the same files, by whatever path, like
    ``--target-test`` given the training folder), or test sentences training sentences (the same
    text): their accuracy says how well the model fits what it was trained on, not how it does
    on new samples."""
    if isinstance(train_pool, TextDataset):
        trained = set(train_pool.texts)
        shared = [i for i, text in enumerate(test_set.texts) if text in trained]
        if shared:
            warnings.warn(
                f"{len(shared)} of the {len(test_set)} test sentences are training sentences too "
                f"(the same text; first: {test_set.ids[shared[0]]!r}), so the test accuracy is "
                "partly that of sentences the model was trained on; pass held-out test data "
                "(--target-test)", DataWarning, stacklevel=3)
        return
    train_files, test_files = train_pool.files(), test_set.files()
    if train_files is None or test_files is None:  # images in memory: no files to compare
        return
    trained = set(_resolved(train_files))
    shared = [i for i, f in enumerate(_resolved(test_files)) if f in trained]
    if shared:
        warnings.warn(
            f"{len(shared)} of the {len(test_set)} test images are training images too (the same "
            f"files; first: {test_set.ids[shared[0]]!r}), so the test accuracy is partly that of "
            "images the model was trained on; pass held-out test data (--target-test)",
            DataWarning, stacklevel=3)


def _resolved(paths: list[Path]) -> list[str]:
    """The resolved path of every file; a folder is resolved once for all its files, not per
    file (os.path.realpath costs 50 us a file: seconds for a large data set)."""
    folders: dict[str, str] = {}
    resolved = []
    for path in map(os.fspath, paths):
        if os.path.islink(path):
            resolved.append(os.path.realpath(path))
            continue
        folder, name = os.path.split(path)
        if folder not in folders:
            folders[folder] = os.path.realpath(folder)
        resolved.append(os.path.join(folders[folder], name))
    return resolved


def _attach_relationship(model: FinetuneModel, train_set: ImageDataset | TextDataset,
                         val_set: ImageDataset | TextDataset,
                         cfg: FinetuneConfig, num_classes: int) -> None:
    """Co-Tuning: keep the pre-trained classifier as source head and learn p(y_s | y_t) from its
    predictions on the target training images (and, for the reverse form, validation images)."""
    model.keep_source_classifier(source_classifier(model.backbone))
    # this process's device: under torchrun each rank computes the relationship (the same on
    # every rank) on its own GPU, where cfg.device would put all of them on one
    device = process_device(cfg.device)
    model.to(device)
    spec = model.backbone.spec
    view = (sentence_view if spec.modality == "text"
            else View(spec, "eval", input_size(spec, cfg.image_size)).to(device))

    def source_logits(data: ImageDataset | TextDataset):
        return predict(lambda x: model.source_head(model.backbone.features(x)), data, view,
                       batch_size=cfg.batch_size, device=device, workers=cfg.workers)

    logits, labels = source_logits(train_set)
    if cfg.cotuning_relationship == "reverse":
        rel = cotuning_reverse_relationship(logits, labels, *source_logits(val_set), num_classes)
    else:
        rel = cotuning_relationship(logits, labels, num_classes)
    model.register_buffer("relationship", torch.as_tensor(rel, dtype=torch.float32))
