"""Sentences, labelled for text classifiers or not (to embed): :class:`TextDataset` and the JSONL
reader.

File format (``.jsonl``, UTF-8, with or without a byte-order mark): one JSON object per non-empty line, with

- ``"text"``: the sentence (a non-empty string);
- ``"label"``: an integer class index, or a class name (names are numbered in sorted order, as
  the folders of an image folder are, until :func:`numbered_by` renumbers them in a model's order);
  integer labels are named by a ``classes.txt`` beside the file when there is one (line i names
  class i). Sentences to embed (:func:`text_file` with ``need_labels=False``) may have no label
  at all: then no line has one;
- ``"id"`` (optional): a stable sample id; default ``<file name>:<line number>``.

For example, two lines of SST-2: ``{"label": 1, "text": "a gorgeous , witty , seductive movie ."}``
and ``{"label": 0, "text": "the plot is nothing but boilerplate clichés ."}``.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import PretrainReuseError, check_file
from .datasets import Batch, _is_integer, _parse_labels


@dataclass
class TextDataset:
    """Sentences with class labels.

    Attributes:
        texts: the sentences.
        labels: (N,) int64 class indices; None for unlabelled sentences (to embed).
        class_names: a name per class, or None.
        ids: stable sample ids.
        source: where the sentences came from.
        named: the file gave class names (numbered here, see :func:`numbered_by`), not indices.
        transform: the model's tokenizer (a :class:`~pretrain_reuse.models.TextTransform`), which
            :meth:`load_batch` needs; set it as an image data set's resize transform is set.
    """

    texts: list[str]
    labels: np.ndarray | None
    class_names: list[str] | None
    ids: list[str]
    source: str
    named: bool = False
    transform: Any = None

    def __len__(self) -> int:
        return len(self.texts)

    def subset(self, indices: Sequence[int] | np.ndarray) -> TextDataset:
        """The sentences at ``indices``, with their own ids and labels (a copy of the lists)."""
        idx = np.asarray(indices, dtype=np.int64)
        return replace(self, texts=[self.texts[i] for i in idx], ids=[self.ids[i] for i in idx],
                       labels=None if self.labels is None else self.labels[idx])

    def load_batch(self, indices: Sequence[int]) -> Batch:
        """The sentences at ``indices`` tokenized as one batch by :attr:`transform`: a
        :class:`~pretrain_reuse.data.Batch` whose ``images`` are the model's token tensors (a
        dict of (B, L) tensors, padded to the longest sentence)."""
        if self.transform is None:
            raise PretrainReuseError("set the data's transform to the model's tokenizer "
                                     "(data.transform = backbone.preprocess) before reading batches")
        idx = np.asarray(indices, dtype=np.int64)
        labels = np.full(len(idx), -1, np.int64) if self.labels is None else self.labels[idx]
        return Batch(images=self.transform.batch([self.texts[i] for i in idx]),
                     labels=torch.as_tensor(labels), indices=torch.as_tensor(idx),
                     skipped=torch.zeros(0, dtype=torch.int64))


def is_sentence_file(path) -> bool:
    """Whether ``path`` names a ``.jsonl`` file of sentences (by its suffix, in any case)."""
    return Path(str(path)).suffix.lower() == ".jsonl"


def text_file(path, *, need_labels: bool = True) -> TextDataset:
    """Read a ``.jsonl`` file of labelled sentences (format in the module docstring); with
    ``need_labels=False``, a file whose lines have no ``"label"`` gives unlabelled sentences."""
    p = check_file("data", path)
    try:
        # utf-8-sig: files saved by Windows editors start with a byte-order mark, not JSON
        lines = p.read_text(encoding="utf-8-sig").splitlines()
    except UnicodeDecodeError:
        raise PretrainReuseError(f"data: {str(p)!r} is not UTF-8 text; pass a .jsonl file of "
                                 '{"label": ..., "text": ...} lines') from None
    texts, labels, ids = [], [], []
    first_of_kind: dict[str, int] = {}  # "index" / "name": the first line with such a label
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise PretrainReuseError(f"data: {str(p)!r} line {number} is not JSON ({e.msg})") from None
        text, label = (row.get("text"), row.get("label")) if isinstance(row, dict) else (None, None)
        unlabelled = not need_labels and isinstance(row, dict) and "label" not in row
        if texts and unlabelled != (labels == []):
            raise PretrainReuseError(
                f"data: {str(p)!r} line {number} has {'no' if unlabelled else 'a'} \"label\" but "
                f"the lines before it {'do' if unlabelled else 'do not'}; label every sentence "
                "or none")
        if need_labels and not texts and isinstance(row, dict) and "label" not in row \
                and isinstance(text, str) and text.strip():
            raise PretrainReuseError(  # an unlabelled file, valid to embed, read where labels are needed
                f"data: {str(p)!r} holds unlabelled sentences (line {number} has no \"label\"), but "
                "labelled ones are needed here (a target, test data, or reuse's source pool); give "
                "each line a \"label\"")
        bad_label = not isinstance(label, (int, str)) or isinstance(label, bool)
        if not (isinstance(text, str) and text.strip()) or (bad_label and not unlabelled):
            raise PretrainReuseError(
                f"data: {str(p)!r} line {number} must be an object with a non-empty \"text\" "
                f"string and a \"label\" (class index or name), got {line[:80]!r}")
        if isinstance(label, int) and label < 0:
            raise PretrainReuseError(f"data: {str(p)!r} line {number} has label {label}; class "
                                     "indices are >= 0")
        if not unlabelled:
            kind, other = ("index", "name") if _is_integer(str(label)) else ("name", "index")
            first_of_kind.setdefault(kind, number)
            if other in first_of_kind:  # the indices would become names: one class more
                raise PretrainReuseError(
                    f"data: {str(p)!r} line {number} has the label {label!r}, a class {kind}, but "
                    f"line {first_of_kind[other]} has a class {other}; give every label as an "
                    "index or every label as a name")
        texts.append(text)
        if not unlabelled:
            labels.append(str(label))
        ids.append(str(row.get("id", f"{p.name}:{number}")))
    if not texts:
        raise PretrainReuseError(f"data: {str(p)!r} holds no sentences; add "
                                 '{"label": ..., "text": ...} lines')
    if len(set(ids)) != len(ids):
        raise PretrainReuseError(f"data: {str(p)!r} repeats sample ids; make every \"id\" unique")
    if not labels:
        return TextDataset(texts=texts, labels=None, class_names=None, ids=ids, source=str(p))
    label_array, class_names = _parse_labels(labels, p)
    # as _parse_labels reads them: "3" is the index 3, as 3 is
    named = not all(_is_integer(label) for label in labels)
    return TextDataset(texts=texts, labels=label_array, class_names=class_names, ids=ids,
                       source=str(p), named=named)


def numbered_by(dataset: TextDataset, names: list[str]) -> TextDataset:
    """``dataset`` (with class names, ``dataset.named``) with its classes numbered as ``names``
    numbers them (class i is ``names[i]``: a model's classes), ``class_names`` = ``names``; the
    data may hold fewer classes than ``names``. A class of the data not in ``names`` is refused."""
    index = {name: i for i, name in enumerate(names)}
    unknown = sorted(set(dataset.class_names) - index.keys())
    if unknown:
        raise PretrainReuseError(
            f"data: {dataset.source!r} has the label {unknown[0]!r}, which the model does not "
            f"know (its classes: {', '.join(map(repr, names))}); relabel the data with the "
            "model's class names or pass a model trained on these classes")
    labels = np.asarray([index[dataset.class_names[y]] for y in dataset.labels], np.int64)
    return replace(dataset, labels=labels, class_names=list(names))
