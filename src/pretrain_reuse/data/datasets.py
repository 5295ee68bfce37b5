"""Image datasets behind one small interface: image folders, file lists, in-memory arrays.

Every dataset is an :class:`ImageDataset` (a ``torch.utils.data.Dataset``):

- ``len(ds)``; ``ds[i] -> (image, label, i)`` with ``image`` a float32 (C, H, W) tensor in [0, 1]
  after the optional per-sample ``transform``, ``label`` an int (-1 when unlabelled) and ``i`` the
  position, so that a batch can always be traced back to its sample ids;
- ``ds.ids`` (stable sample ids: relative paths, or ``name/index``), ``ds.labels`` (int64 array or
  None), ``ds.class_names`` (list or None), ``ds.transform``, ``ds.source`` (where it came from).

Decoding uses PIL and converts every image to one mode (``"RGB"`` unless asked for ``"L"``), so a
folder mixing grey, palette and RGB files still yields same-shaped tensors. An image that cannot be
read (missing, truncated, not an image) does not stop a run: ``ds[i]`` returns ``None`` in place of
the image, :func:`collate` drops it from the batch and lists its position in ``Batch.skipped``, and
:func:`describe_skipped` turns the positions collected over a run into one line (count and first
ids). This works the same in DataLoader worker processes, where a counter on the dataset object
would be lost. Only a list file none of whose paths exists is refused at once (:func:`file_list`).

Order is deterministic: an image folder follows ``torchvision.datasets.ImageFolder`` exactly
(class folders sorted by name, files by sorted ``os.walk``), a list file keeps its line order.
"""

from __future__ import annotations

import codecs
import csv
import io
import os
import re
import warnings
from collections import Counter
from collections.abc import Callable, Collection, Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from PIL import Image

from ..artifacts import atomic_path
from ..errors import (
    PretrainReuseError,
    check_choice,
    check_file,
    check_int,
    check_seed,
    preview,
    read_text,
    user_stacklevel,
)

# The extensions torchvision's ImageFolder accepts (matched case-insensitively).
IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
#: Image formats an image folder does not read (as torchvision's ImageFolder does not): their
#: files are left out of the data with a warning, not silently.
OTHER_IMAGE_EXTENSIONS = (".gif", ".heic", ".heif", ".avif", ".jp2", ".jfif", ".jxl", ".ico",
                          ".svg", ".dng", ".cr2", ".nef", ".arw")
MODES = ("RGB", "L")
# First-row cells that mark a list file's header (compared lower-cased).
_PATH_HEADERS = {"path", "file", "filename", "filepath", "file_path", "image", "img", "image_path"}
#: Column names of a label column in the header row of a CSV list of images or of sentences.
LABEL_HEADERS = ("label", "class", "target", "category", "y")
#: Column names of the text column of a CSV file of sentences: a header row naming one makes the
#: file sentences, not a list of images (:func:`names_text_column`).
TEXT_HEADERS = ("text", "sentence")

Transform = Callable[[torch.Tensor], torch.Tensor]


class DataWarning(UserWarning):
    """A doubt about the data a command was given that does not stop it: unreadable images left
    out, test images that are training images. The command line prints each on one line."""


class ImageDataset(torch.utils.data.Dataset):
    """The common interface of every dataset of the package (see the module docstring).

    Subclasses implement :meth:`load`, which returns the decoded image as a float32 (C, H, W)
    tensor in [0, 1], or ``None`` when it cannot be read.
    """

    def __init__(self, *, ids: list[str], labels: np.ndarray | None,
                 class_names: list[str] | None, transform: Transform | None, source: str):
        self.ids = ids
        self.labels = labels
        self.class_names = class_names
        self.transform = transform
        self.source = source

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> tuple[torch.Tensor | None, int, int]:
        image = self.load(index)
        if image is not None and self.transform is not None:
            image = self.transform(image)
        label = -1 if self.labels is None else int(self.labels[index])
        return image, label, index

    def __getitems__(self, indices: Sequence[int]) -> list[tuple[torch.Tensor | None, int, int]]:
        """``[self[i] for i in indices]``: a DataLoader fetches each batch through this, so that a
        dataset which reads many images at once (:meth:`load_many`) does so."""
        return self._samples(self.load_many(indices), indices)

    def load_batch(self, indices: Sequence[int]) -> Batch:
        """``collate([self[i] for i in indices])``; images read as one tensor (:meth:`load_many`)
        with no transform to apply are taken as they are, not split and stacked again."""
        images = self.load_many(indices)
        if not isinstance(images, torch.Tensor) or self.transform is not None:
            return collate(self._samples(images, indices))
        labels = (np.full(len(indices), -1, np.int64) if self.labels is None
                  else self.labels[indices])
        return Batch(images=images.contiguous(), labels=torch.as_tensor(labels, dtype=torch.int64),
                     indices=torch.as_tensor(indices, dtype=torch.int64),
                     skipped=torch.zeros(0, dtype=torch.int64))

    def _samples(self, images: Sequence[torch.Tensor | None], indices: Sequence[int]
                 ) -> list[tuple[torch.Tensor | None, int, int]]:
        if self.transform is not None:
            images = [None if x is None else self.transform(x) for x in images]
        labels = [-1] * len(indices) if self.labels is None else self.labels[indices].tolist()
        return list(zip(images, labels, indices, strict=True))

    def load(self, index: int) -> torch.Tensor | None:
        """The image at ``index`` as a float (C, H, W) tensor in [0, 1], or None when unreadable."""
        raise NotImplementedError

    def load_many(self, indices: Sequence[int]) -> Sequence[torch.Tensor | None]:
        """``[self.load(i) for i in indices]``; datasets that read a batch faster override it."""
        return [self.load(int(i)) for i in indices]

    def files(self) -> list[Path] | None:
        """The file each sample is read from; None for samples held in memory (arrays,
        procedural images)."""
        return None

    def subset(self, indices: Sequence[int] | np.ndarray) -> SubsetDataset:
        """The samples at ``indices`` (e.g. from a sampler) as a dataset with their own ids/labels."""
        return SubsetDataset(self, np.asarray(indices, dtype=np.int64))

    def __repr__(self) -> str:
        return summary(self)


def summary(dataset) -> str:
    """A data set's one-line repr (images or sentences): its type, source, size and classes."""
    if dataset.labels is None:
        classes = "unlabelled"
    else:  # integer labels without names: as many classes as labels seen
        n = len(dataset.class_names) if dataset.class_names else len(np.unique(dataset.labels))
        classes = f"{n} classes"
    return f"{type(dataset).__name__}({dataset.source!r}, n={len(dataset)}, {classes})"


class SubsetDataset(ImageDataset):
    """A view of ``base`` restricted to ``indices``; positions and ids refer to the subset."""

    def __init__(self, base: ImageDataset, indices: np.ndarray):
        if indices.size and (indices.min() < 0 or indices.max() >= len(base)):
            raise PretrainReuseError(
                f"subset indices must lie in [0, {len(base)}), got range "
                f"[{indices.min()}, {indices.max()}]")
        labels = None if base.labels is None else base.labels[indices]
        super().__init__(ids=[base.ids[i] for i in indices], labels=labels,
                         class_names=base.class_names, transform=base.transform,
                         source=f"{base.source} (subset of {len(indices)})")
        self.base = base
        self.indices = indices

    def files(self) -> list[Path] | None:
        """The files of the base dataset at these positions (None for samples in memory)."""
        base = self.base.files()
        return None if base is None else [base[i] for i in self.indices]

    def load(self, index: int) -> torch.Tensor | None:
        """The image of the base dataset at this subset position."""
        return self.base.load(int(self.indices[index]))

    def load_many(self, indices: Sequence[int]) -> Sequence[torch.Tensor | None]:
        """The images at these subset positions, read by the base dataset in one batch."""
        return self.base.load_many(self.indices[indices])


class FileDataset(ImageDataset):
    """Images decoded from files with PIL; unreadable files yield ``None`` (skipped, counted).

    Sample i is the file ``root / names[i]``. The paths are joined when read: 1.28M ``Path``
    objects take seconds to build and a gigabyte, copied into every DataLoader worker as it
    touches them; the names of a folder or list are its sample ids, held once."""

    def __init__(self, root: Path, names: list[str], *, ids: list[str],
                 labels: np.ndarray | None, class_names: list[str] | None, mode: str,
                 transform: Transform | None, source: str):
        super().__init__(ids=ids, labels=labels, class_names=class_names, transform=transform,
                         source=source)
        self.root, self.names = str(root), names
        self.mode = check_choice("mode", mode, MODES)

    def files(self) -> list[Path]:
        """The file of every sample."""
        return [Path(self.root, name) for name in self.names]

    def load(self, index: int) -> torch.Tensor | None:
        """The decoded image at ``index``, or None when the file cannot be read."""
        return decode_image(os.path.join(self.root, self.names[index]), self.mode)


class ArrayDataset(ImageDataset):
    """Images held in memory: an (N, H, W) or (N, H, W, C) uint8 array (scaled by 1/255) or a float
    array already in [0, 1]; ``mode`` converts grey to RGB or RGB to grey, None keeps C as stored."""

    def __init__(self, images: np.ndarray, labels: np.ndarray | Sequence[int] | None = None, *,
                 class_names: list[str] | None = None, ids: list[str] | None = None,
                 name: str = "arrays", mode: str | None = None,
                 transform: Transform | None = None):
        images = np.asarray(images)
        if images.ndim not in (3, 4) or len(images) == 0:
            raise PretrainReuseError(
                f"images must be a non-empty (N, H, W) or (N, H, W, C) array, got shape "
                f"{images.shape}")
        if images.ndim == 4 and images.shape[-1] not in (1, 3):
            raise PretrainReuseError(
                f"images must have 1 or 3 channels last (N, H, W, C), got shape {images.shape}; "
                "move the channel axis last")
        if images.dtype != np.uint8 and not np.issubdtype(images.dtype, np.floating):
            raise PretrainReuseError(f"images must be uint8 or float, got dtype {images.dtype}")
        # float pixels are used as they are: 0..255 floats would all come out white (NaN fails too)
        if images.dtype != np.uint8 and not (images.min() >= 0 and images.max() <= 1):
            raise PretrainReuseError(
                f"float images must hold values in [0, 1], got the range [{images.min()}, "
                f"{images.max()}]; divide 0..255 pixels by 255, or pass them as uint8")
        if mode is not None:
            check_choice("mode", mode, MODES)
        n = len(images)
        if ids is None:
            ids = [f"{name}/{i}" for i in range(n)]
        if len(ids) != n:
            raise PretrainReuseError(f"got {len(ids)} ids for {n} images; pass one id per image")
        super().__init__(ids=list(ids), labels=_check_labels(labels, n, class_names),
                         class_names=class_names, transform=transform, source=name)
        self.images = images
        self.mode = mode

    def load(self, index: int) -> torch.Tensor:
        """The image at ``index``, a float (C, H, W) tensor in [0, 1]."""
        return self.load_many([index])[0]

    def load_many(self, indices: Sequence[int]) -> torch.Tensor:
        """The images at ``indices`` as one (B, C, H, W) tensor: a few array operations per batch
        instead of per image (loading 64 small images one by one costs more than their crops)."""
        x = torch.from_numpy(self.images[np.asarray(indices, dtype=np.int64)])  # a copy
        x = x.float() / 255 if x.dtype == torch.uint8 else x.float()
        x = x.unsqueeze(1) if x.ndim == 3 else x.permute(0, 3, 1, 2)
        return convert_channels(x, self.mode)


def _check_labels(labels, n: int, class_names: list[str] | None) -> np.ndarray | None:
    if labels is None:
        return None
    labels = np.asarray(labels)
    if labels.shape != (n,) or not np.issubdtype(labels.dtype, np.integer):
        raise PretrainReuseError(
            f"labels must be {n} integer class indices (one per image), got dtype {labels.dtype} "
            f"shape {labels.shape}")
    if n and labels.min() < 0:
        raise PretrainReuseError("labels must be non-negative class indices")
    if class_names is not None and n and labels.max() >= len(class_names):
        raise PretrainReuseError(
            f"label {labels.max()} has no name: only {len(class_names)} class names were given")
    return labels.astype(np.int64)


def repeated_name(names: Sequence[str]) -> str | None:
    """The first name given to two classes, or None. Names may repeat (ImageNet's human-readable
    names have two "crane" classes); only matching classes by name needs them unique."""
    seen: set[str] = set()
    for name in names:
        if name in seen:
            return name
        seen.add(name)
    return None


def require_labels(data: ImageDataset, purpose: str) -> None:
    """Refuse unlabelled ``data`` (images, or sentences: a TextDataset) where ``purpose`` (e.g.
    "fine-tuning", "explaining") needs each sample's class, saying how to label it."""
    if data.labels is not None:
        return
    if hasattr(data, "texts"):
        what, fix = "sentences", ('give each sentence a label (a "label" on each .jsonl line, '
                                  "a label column in a .csv)")
    else:
        what, fix = "images", ("put each class's images in a folder of its own (DATA/<class>/"
                               "<image>), or list them as path,label lines of a .csv list file")
    raise PretrainReuseError(f"{purpose} needs labelled samples (the class of each), but "
                             f"{data.source!r} holds unlabelled {what}; {fix}")


def labels_by_name(data: ImageDataset, class_names: list[str] | None, what: str, *,
                   owner: str = "training data", fix: str | None = None) -> np.ndarray:
    """``data``'s labels in the numbering of ``class_names`` (label i = class_names[i]) when both
    name their classes, else as they are. An image folder numbers its classes in sorted order, a
    list file with a ``classes.txt`` in that file's order: the same classes, numbered otherwise,
    would score every image against another class. A class ``class_names`` lacks is refused
    (``what`` names the data and its flag, e.g. "test data (--target-test)"; ``owner`` whose
    classes ``class_names`` are; ``fix`` the advice, by default to pass other data)."""
    if not class_names or not data.class_names or list(data.class_names) == list(class_names):
        return data.labels
    for names, whose in ((class_names, "training data"), (data.class_names, what.split(" (")[0])):
        twice = repeated_name(names)
        if twice is not None:
            raise PretrainReuseError(
                f"the {whose} names two classes {twice!r}, so the classes of the {what} cannot "
                "be matched to the training data's by name; give every class its own name")
    index = {name: c for c, name in enumerate(class_names)}
    unknown = [name for name in data.class_names if name not in index]
    if unknown:
        raise PretrainReuseError(
            f"the {what.split(' (')[0]}'s classes ({preview(unknown)}) are not classes of the "
            f"{owner} ({preview(class_names)}); "
            + (fix or f"pass {what} with the training data's classes"))
    return np.asarray([index[name] for name in data.class_names])[data.labels]


def convert_channels(x: torch.Tensor, mode: str | None) -> torch.Tensor:
    """Turn a (C, H, W) image, or a (B, C, H, W) batch, into ``mode`` ("RGB": 3 channels, "L": 1;
    None: unchanged). Grey from RGB uses PIL's ITU-R 601-2 luma weights, so arrays match decoded
    files."""
    channels = x.shape[-3]
    if mode == "RGB" and channels == 1:
        return x.expand(*x.shape[:-3], 3, -1, -1).contiguous()
    if mode == "L" and channels == 3:
        r, g, b = x.unbind(-3)
        return (0.299 * r + 0.587 * g + 0.114 * b).unsqueeze(-3)
    return x


#: The PIL modes of which an image with values outside the range read was warned of (once per
#: mode and process: a data set of such images would warn of every one).
_CLIPPED_MODES: set[str] = set()


def decode_image(path: str | Path, mode: str) -> torch.Tensor | None:
    """Decode one file with PIL into a float32 (C, H, W) tensor in [0, 1]; None if unreadable.

    Grey images of more than 8 bits are scaled from their own range: 16-bit ones (PIL modes
    ``I;16*``, and ``I``, as which Pillow opens some 16-bit PNGs and TIFFs) by 1/65535, 32-bit
    float ones (``F``) are taken as values in [0, 1]; both are clipped to [0, 1], with a
    :class:`DataWarning` (once per mode) when some value lies outside (a 32-bit integer image, a
    float one in [0, 255]). (PIL's ``convert`` would clip them at 255 first: a 16-bit scan would
    come out nearly all white, a float one black.)"""
    try:
        with Image.open(path) as im:
            if im.mode.startswith(("I", "F")):
                scale = 1.0 if im.mode == "F" else 65535.0
                grey = torch.from_numpy(np.array(im, dtype=np.float32)) / scale
                _warn_of_clipping(grey, im.mode, scale, path)
                return convert_channels(grey.clamp(0, 1).unsqueeze(0), mode)
            array = np.array(im.convert(mode))  # convert() forces the full decode
    # Everything PIL raises on bad files: missing/unreadable (OSError incl. UnidentifiedImageError,
    # truncated data), bad headers (SyntaxError, ValueError), oversized (DecompressionBombError).
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError):
        return None
    x = torch.from_numpy(array).float() / 255
    return x.unsqueeze(0) if x.ndim == 2 else x.permute(2, 0, 1)


def _warn_of_clipping(grey: torch.Tensor, pil_mode: str, scale: float, path: str | Path) -> None:
    """A DataWarning, the first time in this process for ``pil_mode``, when values of ``grey``
    (already scaled by 1/``scale``) lie outside [0, 1], where the image is clipped."""
    lo, hi = float(grey.min()), float(grey.max())
    if (lo >= 0.0 and hi <= 1.0) or pil_mode in _CLIPPED_MODES:
        return
    _CLIPPED_MODES.add(pil_mode)
    read = "as [0, 1]" if scale == 1.0 else f"by 1/{scale:g}"
    warnings.warn(f"data: {str(path)!r} (PIL mode {pil_mode}) has pixel values from "
                  f"{lo * scale:g} to {hi * scale:g}, read {read}: values outside are clipped, "
                  "here and in any other such image; convert the images to 8 or 16 bits, or "
                  "store floats in [0, 1]", DataWarning, stacklevel=3)


# --- sources ----------------------------------------------------------------------------------

def image_folder(root: str | Path, *, mode: str = "RGB",
                 transform: Transform | None = None) -> FileDataset:
    """An image folder: one sub-folder per class (labels = sorted folder names, as torchvision's
    ImageFolder, but hidden entries are skipped), or a flat folder of unlabelled images.

    Only sub-folders holding images (at any depth) decide the layout, so a folder without images
    (an ``--out`` folder of features, notes) does not turn a flat folder into one of classes. In a
    class layout such a folder is refused, as are loose images beside the class folders: the
    first would be an empty class (dropping it would shift the labels of the classes after it),
    the second images without a label."""
    root = Path(root)
    if not root.is_dir():
        raise PretrainReuseError(f"data: {str(root)!r} is not a folder; pass an image folder")
    entries = list(os.scandir(root))
    loose = sorted(e.name for e in entries if e.is_file() and _is_image(e.name) and not _hidden(e.name))
    folders = sorted(e.name for e in entries if e.is_dir() and not _hidden(e.name))
    other = [e.name for e in entries if e.is_file() and _other_format(e.name)]
    back: list[str] = []
    found = {name: _walk_images(root / name, root, other, back) for name in folders}
    _warn_of_other_formats(root, other)
    _warn_of_links_back(root, back)
    folders = [name for name in folders if name not in back]  # a link back is no class either
    classes = [name for name in folders if found[name]]
    _refuse_names_not_utf8(loose + [f for name in classes for f in found[name]], root)
    if not classes:
        _require_images(loose, root)
        return FileDataset(root, loose, ids=loose, labels=None, class_names=None,
                           mode=mode, transform=transform, source=str(root))
    if loose:
        raise PretrainReuseError(
            f"data: {str(root)!r} holds {len(loose)} image(s) beside its class folders (first: "
            f"{loose[0]!r}), which would have no label; move them into class folders, or pass a "
            "path,label list file of the images to use")
    empty = [name for name in folders if not found[name]]
    if empty:
        raise PretrainReuseError(
            f"data: class folder(s) {', '.join(map(repr, empty[:5]))} in {str(root)!r} hold no "
            f"images ({', '.join(IMG_EXTENSIONS)}); add images, or remove or move them (an --out "
            "folder belongs outside the data folder)")
    rel = [f for name in classes for f in found[name]]
    labels = np.repeat(np.arange(len(classes), dtype=np.int64), [len(found[c]) for c in classes])
    return FileDataset(root, rel, ids=rel, labels=labels,
                       class_names=classes, mode=mode, transform=transform, source=str(root))


def _warn_of_other_formats(root: Path, other: list[str]) -> None:
    """Warn of the files ``other`` in ``root`` whose image format the folder reader skips
    (:data:`OTHER_IMAGE_EXTENSIONS`)."""
    if other:
        counts = Counter(Path(f).suffix.lower() for f in other)
        kinds = ", ".join(f"{n} {ext}" for ext, n in counts.most_common())
        warnings.warn(f"data: {len(other)} file(s) in {str(root)!r} are images of a format not "
                      f"read here ({kinds}; first: {sorted(other)[0]!r}), so they are left out; "
                      f"convert them to one of {', '.join(IMG_EXTENSIONS)}", DataWarning,
                      stacklevel=3)


def _warn_of_links_back(root: Path, back: list[str]) -> None:
    """Warn of the links ``back`` in ``root`` (:func:`_walk_images`) whose folders were skipped."""
    if back:
        warnings.warn(f"data: {len(back)} link(s) in {str(root)!r} lead back into the data folder or "
                      f"above it (first: {back[0]!r}), so they are skipped: read through them, "
                      "their images would join the link's class; remove the links, or copy the "
                      "images if they belong to that class too", DataWarning,
                      stacklevel=user_stacklevel())


def _refuse_names_not_utf8(names: list[str], root: Path) -> None:
    """Sample ids go into JSON and safetensors metadata as UTF-8; a file name in another encoding
    (Latin-1 from an old zip) reaches Python as a str that cannot be encoded, and would fail in
    the middle of embedding or evaluating, after the work."""
    for name in names:
        try:
            name.encode("utf-8")
        except UnicodeEncodeError:
            raise PretrainReuseError(
                f"data: the file name {os.fsencode(name)!r} in {str(root)!r} is not UTF-8 (saved "
                "in another encoding, e.g. Latin-1 by an old zip); rename it, e.g. with "
                f"`convmv -f latin1 -t utf8 -r --notest {str(root)!r}`") from None


def _walk_images(folder: Path, root: Path, other: list[str], back: list[str]) -> list[str]:
    """Image files under ``folder`` in torchvision's order, as POSIX paths relative to ``root``;
    files of the image formats not read (:func:`_other_format`) are appended to ``other``.

    Links to folders are followed, as torchvision does, except a link that leads into ``root``
    or to a folder above it (``ln -s .. up``, ``ln -s . all``): its images are read where they
    lie, and read again under the link they would join this class. Such links are appended to
    ``back``. Each real folder is read once, so a loop of links outside ``root`` ends too."""
    top = os.path.realpath(root)
    seen, by_dir = set(), []
    for dirpath, dirnames, fnames in os.walk(folder, followlinks=True):
        real = os.path.realpath(dirpath)
        rel_dir = Path(dirpath).relative_to(root).as_posix()
        if os.path.islink(dirpath) and (_under(real, top) or _under(top, real)):
            back.append(rel_dir)
            dirnames.clear()
            continue
        if real in seen:
            dirnames.clear()
            continue
        seen.add(real)
        dirnames[:] = sorted(d for d in dirnames if not _hidden(d))  # a deterministic walk
        by_dir.append((dirpath, [f"{rel_dir}/{f}" for f in sorted(fnames)
                                 if _is_image(f) and not _hidden(f)]))
        other += [f"{rel_dir}/{f}" for f in fnames if _other_format(f)]
    return [f for _, files in sorted(by_dir) for f in files]


def _under(path: str, folder: str) -> bool:
    """Whether the real path ``path`` is ``folder`` or lies inside it."""
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def _is_image(name: str) -> bool:
    return name.lower().endswith(IMG_EXTENSIONS)


def _other_format(name: str) -> bool:
    """An image of a format an image folder does not read, not hidden."""
    return name.lower().endswith(OTHER_IMAGE_EXTENSIONS) and not _hidden(name)


def _hidden(name: str) -> bool:
    """Hidden entries (``.ipynb_checkpoints``, ``.git``, macOS's ``._x.png``) are not data;
    torchvision's ImageFolder would make such a folder a class."""
    return name.startswith(".")


def _require_images(files: list, root: Path) -> None:
    if not files:
        raise PretrainReuseError(
            f"data: no images found in {str(root)!r} (looked for {', '.join(IMG_EXTENSIONS)} in "
            "class sub-folders, or directly in the folder); check the path")


def file_list(path: str | Path, *, mode: str = "RGB",
              transform: Transform | None = None) -> FileDataset:
    """A CSV/TSV list of images: ``path[,label]`` per line, paths relative to the list file.

    The delimiter is a tab for ``.tsv`` files or when the first line holds a tab, else a comma
    (space-separated ``path label`` lines are not read: a path may hold spaces). The first line is
    a header when its first cell is a path column name (``path``, ``file``, ``image``...) or its
    second a label column name (``label``, ``class``...), or when its label is no integer while
    every other label is one and its path is no file (``fname,target_id``). The file is UTF-8 (a
    byte-order mark is skipped); a path listed twice, in any spelling (``./a.png``), is refused.
    Integer labels (``10.0`` too, as pandas writes them) are
    class indices used as given: labels 0, 2 and 10 make classes 0..10, some without images, as
    the later stages expect (class means refuse such gaps, fine-tuning notes them); a
    ``classes.txt`` beside the list names them, else ``class_names`` is None. Any other labels are
    class names, numbered in sorted order (as folder names are); a list mixing indices and names,
    or with an empty label, is refused. A single column means unlabelled images.

    A list none of whose paths exists is refused, naming the first path: that is a wrong base
    folder, not a few lost files. Missing paths among existing ones are kept and, like corrupt
    images, skipped and counted when read (``embed`` warns of their count and first ids, and
    lists the first 100 in its index), so a long list with a few deleted files still runs.
    """
    p = check_file("data", path)
    raw = p.read_bytes()
    try:
        # utf-8-sig: Excel's "CSV UTF-8" starts with a byte-order mark, which would join the
        # first path
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError:
        if raw.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):  # Excel's "Unicode text"
            raise PretrainReuseError(
                f"data: list file {str(p)!r} is UTF-16 text; save it as UTF-8") from None
        if b"\0" in raw:  # a binary file (an array, an archive) given as data
            raise PretrainReuseError(
                f"data: {str(p)!r} is not a text list file; pass a folder or a path,label list"
            ) from None
        raise PretrainReuseError(
            f"data: list file {str(p)!r} is not UTF-8 text (Latin-1, as some spreadsheet "
            "programs save CSV?); save it as UTF-8") from None
    lines = text.splitlines()
    first = next((line for line in lines if line.strip()), "")
    delimiter = csv_delimiter(p, first)
    rows = [(n, [c.strip() for c in row]) for n, row in
            enumerate(csv.reader(io.StringIO(text), delimiter=delimiter), start=1)
            if any(c.strip() for c in row)]
    json_lines = p.suffix.lower() == ".jsonl" or first.lstrip().startswith("{")
    if json_lines or (rows and names_text_column(rows[0][1])):
        raise PretrainReuseError(
            f"data: {str(p)!r} holds {'JSON lines' if json_lines else 'a text column'} "
            "(sentences for a text model?), not images; this command needs images (an image "
            "folder, a path,label list or a data set name): sentence files (.jsonl, or .csv "
            "with a text column) are read by embed, finetune, evaluate, explain and knowledge, "
            "with a text model")
    if rows and (_is_header(rows[0][1]) or _is_unnamed_header(rows, p.parent)):
        rows = rows[1:]
    if not rows:
        raise PretrainReuseError(f"data: list file {str(p)!r} lists no images; add path,label lines")
    width = len(rows[0][1])
    for n, row in rows:
        if len(row) != width or width > 2 or not row[0]:
            raise PretrainReuseError(
                f"data: {str(p)!r} line {n} has {len(row)} field(s) {row!r}; every line must be "
                "`path,label` (or every line just `path`)")
        if width == 2 and not row[1]:  # it would be a class named ''
            raise PretrainReuseError(
                f"data: {str(p)!r} line {n} has no label ({row[0]!r} has an empty label cell); "
                "label every image (list unlabelled images in a file of their own, without labels)")
    ids = [row[0] for _, row in rows]
    _refuse_repeated_paths(rows, p)
    _require_some_path(ids, p, delimiter)
    labels, class_names = None, None
    if width == 2:
        cells = [label_cell(row[1]) for _, row in rows]
        refuse_mixed_labels(cells, [n for n, _ in rows], p)
        labels, class_names = _parse_labels(cells, p)
    return FileDataset(p.parent, ids, ids=ids, labels=labels, class_names=class_names, mode=mode,
                       transform=transform, source=str(p))


def _refuse_repeated_paths(rows: list[tuple[int, list[str]]], list_path: Path) -> None:
    """A path listed twice would be one sample id for two samples: a validation split could hold
    an image that training also sees, and two labels for one image contradict each other. Paths
    are compared normalised, as ``./imgs/a.jpg`` and ``imgs/a.jpg`` are one file."""
    first: dict[str, tuple[int, str]] = {}  # normalised path: the line and path first giving it
    for n, row in rows:
        key = os.path.normpath(row[0])
        if key in first:
            line, given = first[key]
            spelt = "" if given == row[0] else f", the second time as {row[0]!r}"
            raise PretrainReuseError(
                f"data: {str(list_path)!r} lists {given!r} twice (lines {line} and {n}{spelt}); "
                "list every image once")
        first[key] = n, row[0]


def _require_some_path(ids: list[str], list_path: Path, delimiter: str) -> None:
    # Stops at the first path that exists: a stat per line only for a list that is all wrong.
    if any(os.path.exists(os.path.join(list_path.parent, i)) for i in ids):
        return
    # A space-separated 'cat/0.png 0' line (ImageNet's val.txt style) reads as one path; the hint
    # is conditional, as a path may hold spaces and the base folder be what is wrong.
    hint = ""
    if delimiter == "," and all(";" in i for i in ids):  # as spreadsheets save CSV in some locales
        hint = "; list files are comma- or tab-separated, not ';'-separated: save it with commas"
    elif delimiter == "," and len(ids[0].split()) > 1:
        hint = (f"; list files are comma-separated: if {ids[0]!r} is a path and a label, write "
                f"{','.join(ids[0].rsplit(maxsplit=1))!r}")
    raise PretrainReuseError(
        f"data: {len(ids)} of {len(ids)} paths in {str(list_path)!r} are missing (first: "
        f"{ids[0]!r}, looked for {str((list_path.parent / ids[0]).absolute())!r}); paths in a list file are "
        f"relative to the list file's folder: fix them or move the list{hint}")


def csv_delimiter(path: Path, first_line: str) -> str:
    """The delimiter of a CSV list or sentence file: a tab for ``.tsv`` files or when the first
    non-empty line holds one, else a comma."""
    return "\t" if path.suffix.lower() == ".tsv" or "\t" in first_line else ","


def names_text_column(row: list[str]) -> bool:
    """Whether the first row ``row`` of a CSV file is the header of a file of sentences: it names
    a text column (:data:`TEXT_HEADERS`) and no path column, and no cell is an image file name
    (a list of images without a header whose first image is of a class named "text")."""
    cells = [c.strip().lower() for c in row]
    return (any(c in TEXT_HEADERS for c in cells) and not any(c in _PATH_HEADERS for c in cells)
            and not any(c.endswith(IMG_EXTENSIONS) for c in cells))


def _is_header(row: list[str]) -> bool:
    return row[0].lower() in _PATH_HEADERS or (len(row) > 1 and row[1].lower() in LABEL_HEADERS)


def _is_unnamed_header(rows: list[tuple[int, list[str]]], folder: Path) -> bool:
    """A first row with column names we do not know (``fname,target_id``): read as data it would
    be an image, and its label would turn every integer label into a class name (renumbered in
    string order). A first row that names an existing file is data (a mixed label set)."""
    first, rest = rows[0][1], [row for _, row in rows[1:]]
    return (len(first) == 2 and bool(rest) and not _is_integer(first[1])
            and all(len(row) == 2 and _is_integer(row[1]) for row in rest)
            and not (folder / first[0]).is_file())


def _is_integer(cell: str) -> bool:
    # ASCII digits only: str.isdigit() also accepts '²', which int() refuses
    digits = cell.removeprefix("-")
    return digits.isascii() and digits.isdigit()


def label_cell(cell: str) -> str:
    """The label of a CSV cell: pandas writes an integer column with a missing value as floats,
    so ``10.0`` is the class index 10."""
    return re.sub(r"^(\d+)\.0+$", r"\1", cell)


def refuse_mixed_labels(labels: Sequence[str | int], lines: Sequence[int], path: Path) -> None:
    """Refuse labels (on lines ``lines`` of ``path``; ints from JSON, else strings) that mix class
    indices and class names: read as names, the indices would be classes of their own,
    renumbered in string order."""
    first_of_kind: dict[str, int] = {}  # "index" / "name": the first line with such a label
    for label, number in zip(labels, lines, strict=True):
        kind, other = ("index", "name") if _is_integer(str(label)) else ("name", "index")
        first_of_kind.setdefault(kind, number)
        if other in first_of_kind:
            raise PretrainReuseError(
                f"data: {str(path)!r} line {number} has the label {label!r}, a class {kind}, but "
                f"line {first_of_kind[other]} has a class {other}; give every label as an index "
                "or every label as a name")


def _parse_labels(cells: list[str], list_path: Path) -> tuple[np.ndarray, list[str] | None]:
    if all(_is_integer(c) for c in cells):
        bad = next((c for c in cells
                    if c.startswith("-") or len(c.lstrip("0")) > 18), None)
        if bad is not None:  # read as names, -1 would become a class of its own
            raise PretrainReuseError(
                f"data: {str(list_path)!r} has the label {bad}; integer labels are class indices "
                "0..C-1 (give unlabelled samples a file of their own, without labels)")
        labels = np.asarray([int(c) for c in cells], np.int64)
        names_file = list_path.parent / "classes.txt"
        names = read_class_names(names_file) if names_file.exists() else None
        if names is not None and labels.max() >= len(names):
            raise PretrainReuseError(
                f"data: label {labels.max()} in {str(list_path)!r} has no name in "
                f"{str(names_file)!r} ({len(names)} names); fix one of the two files")
        return labels, names
    names = sorted(set(cells))
    index = {name: i for i, name in enumerate(names)}
    return np.asarray([index[c] for c in cells], np.int64), names


#: What may follow a class's name at the start of a line of a class-names file that names it.
NAME_ENDS = " \t,;:"


def line_names(line: str, name: str) -> bool:
    """Whether a line of a class-names file names the class ``name``: it is ``name``, or starts
    with ``name`` and one of :data:`NAME_ENDS`, as ImageNet's LOC_synset_mapping.txt
    (``n01440764 tench, Tinca tinca``) names the folder n01440764, and ``tabby cat, a pet`` a
    folder of that name (not ``tabby catfish``)."""
    return line == name or (line.startswith(name) and len(line) > len(name)
                            and line[len(name)] in NAME_ENDS)


def first_word(text: str) -> str:
    """``text`` up to the first of :data:`NAME_ENDS`: the key by which a class-names line is
    matched to the names it may start with."""
    return re.match(f"[^{NAME_ENDS}]*", text).group()


def read_class_names(path: str | Path) -> list[str]:
    """Class names from a text file, one per line (line i names label i)."""
    p = Path(path)
    names = read_text("class names", p).splitlines()
    while names and not names[-1].strip():
        names.pop()
    if not names or any(not n.strip() for n in names):
        raise PretrainReuseError(
            f"class names file {str(p)!r} must hold one non-empty name per line (line i names label i)")
    return [n.strip() for n in names]


def write_class_names(path: str | Path, names: Sequence[str]) -> None:
    """Write class names one per line (atomically), readable by :func:`read_class_names`."""
    if any("\n" in n or not n.strip() for n in names):
        raise PretrainReuseError("class names must be non-empty and hold no newlines")
    with atomic_path(path) as tmp:
        tmp.write_text("".join(f"{n}\n" for n in names))


# --- batching ---------------------------------------------------------------------------------

class Batch(NamedTuple):
    """A collated batch: readable images only; ``skipped`` holds the positions that were not.
    A batch of sentences (:class:`~pretrain_reuse.data.text.TextDataset`) holds their token
    tensors (a dict of (B, L) tensors) in place of images."""

    # (B, C, H, W) float32, (0,) when every image of the batch was unreadable; or token tensors
    images: torch.Tensor | dict[str, torch.Tensor]
    labels: torch.Tensor  # (B,) int64, -1 for unlabelled samples
    indices: torch.Tensor  # (B,) int64 dataset positions
    skipped: torch.Tensor  # (k,) int64 positions whose image could not be read


def inputs_to(inputs: torch.Tensor | dict[str, torch.Tensor], device: torch.device, *,
              non_blocking: bool = False) -> torch.Tensor | dict[str, torch.Tensor]:
    """A batch's model inputs moved to ``device``: an image tensor, or a text batch's dict of
    token tensors."""
    if isinstance(inputs, dict):
        return {k: v.to(device, non_blocking=non_blocking) for k, v in inputs.items()}
    return inputs.to(device, non_blocking=non_blocking)


def collate(samples: list[tuple[torch.Tensor | None, int, int]]) -> Batch:
    """DataLoader ``collate_fn``: stack the readable samples, record the unreadable ones."""
    good = [s for s in samples if s[0] is not None]
    skipped = torch.tensor([s[2] for s in samples if s[0] is None], dtype=torch.int64)
    if not good:
        empty = torch.zeros(0, dtype=torch.int64)
        return Batch(torch.zeros(0), empty, empty, skipped)
    shapes = {tuple(s[0].shape) for s in good}
    if len(shapes) > 1:
        raise PretrainReuseError(
            f"images in one batch have different sizes {sorted(shapes)[:3]}; pass a transform "
            "that resizes them to one size (or use batch size 1)")
    return Batch(images=torch.stack([s[0] for s in good]),
                 labels=torch.tensor([s[1] for s in good], dtype=torch.int64),
                 indices=torch.tensor([s[2] for s in good], dtype=torch.int64),
                 skipped=skipped)


def make_loader(dataset: ImageDataset, *, batch_size: int, workers: int = 0,
                shuffle: bool = False, seed: int = 0, drop_last: bool = False
                ) -> torch.utils.data.DataLoader:
    """A DataLoader yielding :class:`Batch` es; shuffling is seeded, so runs are repeatable."""
    if not isinstance(dataset, torch.utils.data.Dataset):
        raise PretrainReuseError(f"make_loader takes a dataset, got {type(dataset).__name__}; "
                                 "open one with pretrain_reuse.data.open_dataset(path or name)")
    batch_size = check_int("batch_size", batch_size, minimum=1)
    workers = check_int("workers", workers, minimum=0)
    generator = torch.Generator().manual_seed(check_seed("seed", seed))
    return torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, shuffle=shuffle, num_workers=workers, collate_fn=collate,
        generator=generator, drop_last=drop_last)


def unread_classes(dataset: ImageDataset, skipped: Collection[int]) -> list[str]:
    """The classes (names, else "label i") of the images at positions ``skipped`` (found
    unreadable) none of whose images in ``dataset`` can be read. Only those classes' images
    are read again, so the check costs nothing when no image failed."""
    if dataset.labels is None or not skipped:
        return []
    labels = np.asarray(dataset.labels)
    suspects = np.unique(labels[sorted(int(i) for i in skipped)])
    lost = [int(c) for c in suspects
            if all(dataset.load(int(i)) is None for i in np.flatnonzero(labels == c))]
    return [dataset.class_names[c] if dataset.class_names else f"label {c}" for c in lost]


def first_readable(dataset: ImageDataset) -> int | None:
    """The position of the first image of ``dataset`` that can be read, None when none can.
    Decoding stops there, so on sane data this costs one image: a check that commands make
    before they claim their output folder, where data without a readable image would otherwise
    fail halfway and leave a folder behind."""
    return next((i for i in range(len(dataset)) if dataset.load(i) is not None), None)


def describe_skipped(dataset: ImageDataset, skipped: Sequence[int] | torch.Tensor,
                     first: int = 5) -> str:
    """One line reporting unreadable images: how many, and the ids of the first ``first``."""
    positions = sorted(int(i) for i in skipped)
    if not positions:
        return "no unreadable images"
    shown = ", ".join(dataset.ids[i] for i in positions[:first])
    more = ", ..." if len(positions) > first else ""
    return f"skipped {len(positions)} unreadable image(s) of {len(dataset)}: {shown}{more}"
