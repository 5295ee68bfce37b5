"""Sentences, labelled for text classifiers or not (to embed): :class:`TextDataset` and the
readers of sentence files, ``.jsonl`` or CSV/TSV (UTF-8, with or without a byte-order mark).

A ``.jsonl`` file holds one JSON object per non-empty line, with

- ``"text"``: the sentence (a non-empty string);
- ``"label"``: an integer class index, or a class name (names are numbered in sorted order, as
  the folders of an image folder are, until :func:`numbered_by` renumbers them in a model's order);
  integer labels are named by a ``classes.txt`` beside the file when there is one (line i names
  class i). Sentences to embed (:func:`text_file` with ``need_labels=False``) may have no label
  at all: then no line has one;
- ``"id"`` (optional): a stable sample id; default ``<file name>:<line number>``.

For example, two lines of SST-2: ``{"label": 1, "text": "a gorgeous , witty , seductive movie ."}``
and ``{"label": 0, "text": "the plot is nothing but boilerplate clichés ."}``.

A ``.csv`` (or ``.tsv``: tab-separated, as is a file whose first line holds a tab) file of
sentences starts with a header row that names its columns: ``text`` or ``sentence`` (required;
this column is what tells a CSV file of sentences from a CSV list of images), a label column
(``label``, ``class``, ``target``, ``category`` or ``y``; the same labels as above, none for
sentences to embed) and ``id`` (optional); other columns are ignored. A text holding the
delimiter, quotes or line breaks is quoted as the ``csv`` module (and pandas' ``to_csv``) writes
it; a row is numbered by the line it starts on.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch

from ..errors import PretrainReuseError, check_file
from .datasets import (
    LABEL_HEADERS,
    TEXT_HEADERS,
    Batch,
    _is_integer,
    _parse_labels,
    csv_delimiter,
    label_cell,
    names_text_column,
    refuse_mixed_labels,
    summary,
)


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

    def __repr__(self) -> str:  # not every sentence
        return summary(self)

    def content_hash(self) -> str:
        """Short hash of the sentences in their order: a rerun compares it, as the default ids
        (``file:line``) stay the same when a file's sentences are edited."""
        return "sha256:" + hashlib.sha256(json.dumps(self.texts).encode()).hexdigest()[:16]

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
    """Whether ``path`` names a file of sentences: a ``.jsonl`` file (by its suffix, in any case),
    or a ``.csv`` / ``.tsv`` file whose header row names a text column
    (:func:`~.datasets.names_text_column`); a CSV file without one is a list of images. A
    ``.csv`` / ``.tsv`` path that does not exist is refused here, as what it holds cannot be told."""
    p = Path(str(path))
    suffix = p.suffix.lower()
    if suffix == ".jsonl":
        return True
    if suffix not in (".csv", ".tsv") or not check_file("data", p).is_file():
        return False
    try:
        with open(p, encoding="utf-8-sig", newline="") as fh:
            first = next((line for line in fh if line.strip()), "")
    except (OSError, UnicodeDecodeError):  # not text: a list file's reader says so
        return False
    return _csv_header(p, first) is not None


class _Form(NamedTuple):
    """How the messages of one sentence-file format name its rows and their fixes."""
    row: str  # what a row must be
    rows: str  # rows to add to a file without any
    label: str  # how to label every sentence


_JSONL = _Form(row='an object with a non-empty "text" string and a "label" (class index or name)',
               rows='{"label": ..., "text": ...} lines', label='give each line a "label"')
_CSV = _Form(row="a row with a non-empty text cell and a label (class index or name)",
             rows="text,label rows under a text,label header row",
             label=f"add a label column (named {', '.join(LABEL_HEADERS)})")


def text_file(path, *, need_labels: bool = True) -> TextDataset:
    """Read a file of labelled sentences, ``.jsonl`` or CSV/TSV (formats in the module
    docstring); with ``need_labels=False``, a file without labels (no ``"label"`` on any line, no
    label column) gives unlabelled sentences."""
    p = check_file("data", path)
    jsonl = p.suffix.lower() == ".jsonl"
    form = _JSONL if jsonl else _CSV
    try:
        # utf-8-sig: files saved by Windows editors start with a byte-order mark
        text = p.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError:
        raise PretrainReuseError(f"data: {str(p)!r} is not UTF-8 text; pass a sentence file of "
                                 f"{form.rows}") from None
    rows = _jsonl_rows(text, p) if jsonl else _csv_rows(text, p)
    return _sentences(rows, p, need_labels, form)


def _jsonl_rows(text: str, p: Path) -> list[tuple[int, Any, str]]:
    """(line number, parsed object, line) of every non-empty line of a ``.jsonl`` file."""
    rows = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rows.append((number, json.loads(line), line))
        except json.JSONDecodeError as e:
            raise PretrainReuseError(f"data: {str(p)!r} line {number} is not JSON ({e.msg})") from None
    return rows


def _csv_header(p: Path, first: str) -> tuple[str, list[str]] | None:
    """The delimiter and lower-case column names of the CSV/TSV file ``p`` whose first non-empty
    line is ``first``, when that line is a sentence file's header
    (:func:`~.datasets.names_text_column`), else None."""
    delimiter = csv_delimiter(p, first)
    names = [c.strip().lower() for c in next(csv.reader([first], delimiter=delimiter), [])]
    return (delimiter, names) if names_text_column(names) else None


def _csv_rows(text: str, p: Path) -> list[tuple[int, dict[str, str], str]]:
    """(line number, {"text", "label", "id"} of the columns the header names, the row's cells
    joined by the delimiter) of every non-empty row below the header of the CSV/TSV sentence
    file ``p`` whose content is ``text``. A quoted text may span lines; a row is numbered by the
    line it starts on."""
    header = _csv_header(p, next((line for line in text.splitlines() if line.strip()), ""))
    if header is None:
        raise PretrainReuseError(
            f"data: {str(p)!r} has no text column: a CSV file of sentences starts with a header "
            f"row naming it ({' or '.join(TEXT_HEADERS)}), e.g. text,label; a CSV file without "
            "one is a list of images")
    delimiter, names = header
    columns = {}
    for key, known in (("text", TEXT_HEADERS), ("label", LABEL_HEADERS), ("id", ("id",))):
        found = [i for i, n in enumerate(names) if n in known]
        if len(found) > 1:
            raise PretrainReuseError(
                f"data: {str(p)!r} has {len(found)} {key} columns "
                f"({', '.join(names[i] for i in found)}); keep one (or rename the others)")
        if found:
            columns[key] = found[0]
    reader = csv.reader(io.StringIO(text), delimiter=delimiter)
    rows, header_seen, start = [], False, 1
    for cells in reader:
        number, start = start, reader.line_num + 1
        if not any(c.strip() for c in cells):
            continue
        if not header_seen:
            header_seen = True
            continue
        row = {key: cells[i].strip() if key != "text" else cells[i]
               for key, i in columns.items() if i < len(cells)}
        if "label" in row:
            row["label"] = label_cell(row["label"])
        rows.append((number, row, delimiter.join(cells)))
    return rows


def _sentences(rows: list[tuple[int, Any, str]], p: Path, need_labels: bool,
               form: _Form) -> TextDataset:
    """The sentences of a file's ``rows`` (line number, row, row as read), each row checked."""
    texts, labels = [], []
    ids: dict[str, int] = {}  # each sample's id, and the line that gave it
    label_lines = []  # the line of each label
    for number, row, line in rows:
        text, label = (row.get("text"), row.get("label")) if isinstance(row, dict) else (None, None)
        unlabelled = not need_labels and isinstance(row, dict) and "label" not in row
        if texts and unlabelled != (labels == []):
            raise PretrainReuseError(
                f"data: {str(p)!r} line {number} has {'no' if unlabelled else 'a'} label but "
                f"the lines before it {'do' if unlabelled else 'do not'}; label every sentence "
                "or none")
        if need_labels and not texts and isinstance(row, dict) and "label" not in row \
                and isinstance(text, str) and text.strip():
            raise PretrainReuseError(  # an unlabelled file, valid to embed, read where labels are needed
                f"data: {str(p)!r} holds unlabelled sentences (line {number} has no label), but "
                "labelled ones are needed here (a target, test data, or reuse's source pool); "
                f"{form.label}")
        bad_label = (not isinstance(label, (int, str)) or isinstance(label, bool)
                     or (isinstance(label, str) and not label.strip()))
        if not (isinstance(text, str) and text.strip()) or (bad_label and not unlabelled):
            raise PretrainReuseError(
                f"data: {str(p)!r} line {number} must be {form.row}, got {line[:80]!r}")
        if isinstance(label, int) and label < 0:
            raise PretrainReuseError(f"data: {str(p)!r} line {number} has label {label}; class "
                                     "indices are >= 0")
        texts.append(text)
        if not unlabelled:
            labels.append(label)
            label_lines.append(number)
        given = row.get("id")
        sample = f"{p.name}:{number}" if given is None or given == "" else str(given)
        if sample in ids:
            raise PretrainReuseError(f"data: {str(p)!r} lines {ids[sample]} and {number} have the "
                                     f"same id {sample!r}; make every id unique")
        ids[sample] = number
    if not texts:
        raise PretrainReuseError(f"data: {str(p)!r} holds no sentences; add {form.rows}")
    if not labels:
        return TextDataset(texts=texts, labels=None, class_names=None, ids=list(ids),
                           source=str(p))
    refuse_mixed_labels(labels, label_lines, p)
    labels = [str(label) for label in labels]  # as a CSV file gives them: the index 3 as "3"
    label_array, class_names = _parse_labels(labels, p)
    # as _parse_labels reads them: "3" is the index 3, as 3 is
    named = not all(_is_integer(label) for label in labels)
    return TextDataset(texts=texts, labels=label_array, class_names=class_names, ids=list(ids),
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
