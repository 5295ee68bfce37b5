"""FeatureStore: per-sample features, optional labels and stable sample ids, on disk as shards.

Layout of a store folder::

    store/
      index.json                 kind, n, dim, shards, class_names, meta
      shard-00000.safetensors    features (n_s, D) float32, ids (UTF-8 blob), labels (n_s,) int64

Shards keep single files small enough to write atomically and to produce in parallel; the index is
written last, so a folder without ``index.json`` is an unfinished store.
"""

from __future__ import annotations

import json
import secrets
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

from .artifacts import atomic_path, decode_ids, encode_ids, hash_file, read_json, write_json
from .errors import PretrainReuseError, as_array, check_file, check_matrix, check_strings

STORE_FORMAT = 1


@dataclass(frozen=True)
class FeatureStore:
    """Per-sample features with optional integer labels and string sample ids.

    The constructor takes NumPy arrays, torch tensors or nested lists, and stores NumPy arrays.

    Attributes:
        features: (N, D) real array in the dtype it was given (a read-only memmap for ``.npy``
            input, float32 when loaded from a store): it is not copied here. Units read it in
            float32, chunk by chunk, and :meth:`save` writes float32.
        labels: (N,) int64 class indices, or None for unlabelled data.
        ids: N sample ids (e.g. relative image paths); ``"0".."N-1"`` when none were given.
        class_names: names of the label values (``class_names[i]`` names label i), or None.
        meta: metadata block (producer, params, inputs, seed, version).
    """

    features: np.ndarray
    labels: np.ndarray | None = None
    ids: list[str] = field(default_factory=list)
    class_names: list[str] | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        features = check_matrix("features", self.features, finite=False)
        n = features.shape[0]
        ids = check_strings("ids", self.ids) or [str(i) for i in range(n)]
        if len(ids) != n:
            raise PretrainReuseError(f"got {len(ids)} sample ids for {n} feature rows")
        check_unique_ids(ids)
        labels = None if self.labels is None else as_array("labels", self.labels)
        names = None if self.class_names is None else check_strings("class_names", self.class_names)
        if labels is not None and labels.dtype.kind in "USO":  # names, not indices
            labels, names = _named_labels(labels, names)
        labels = None if labels is None else _class_indices(labels, n)
        if names and labels is not None and labels.max() >= len(names):
            raise PretrainReuseError(
                f"label {labels.max()} is out of range for {len(names)} class names; give one "
                f"name per label 0..{labels.max()} (class_names[i], or line i of --class-names, "
                "names label i)")
        object.__setattr__(self, "features", features)
        object.__setattr__(self, "ids", ids)
        object.__setattr__(self, "labels", labels)
        object.__setattr__(self, "class_names", names)

    def __repr__(self) -> str:  # a summary: the dataclass repr would print every sample id
        labels = "unlabelled" if self.labels is None else (
            f"{len(self.class_names)} classes" if self.class_names else "labelled")
        return f"FeatureStore(n={len(self.ids)}, dim={self.features.shape[1]}, {labels})"

    def __len__(self) -> int:
        return self.features.shape[0]

    @property
    def dim(self) -> int:
        """D, the feature dimension."""
        return self.features.shape[1]

    @classmethod
    def from_npy(cls, features: str | Path, labels: str | Path | None = None, *,
                 class_names: list[str] | None = None) -> FeatureStore:
        """Wrap ``.npy`` per-sample features (memory-mapped) and optional ``.npy`` labels (class
        indices, or class names: numbered as in ``class_names``, else in sorted order)."""
        feats = load_npy("features", features, mmap=True)
        labs = None if labels is None else load_npy("labels", labels)
        meta = {"producer": "npy", "inputs": {"features": hash_file(features)}}
        if labels is not None:
            meta["inputs"]["labels"] = hash_file(labels)
        return cls(features=feats, labels=labs, class_names=class_names, meta=meta)

    def save(self, path: str | Path, *, shard_size: int = 65536) -> Path:
        """Write the store folder (replacing an existing one only once the new one is complete)."""
        path = Path(path)
        if path.exists() and not (path / "index.json").exists():
            raise PretrainReuseError(
                f"{str(path)!r} exists and is not a feature store; choose another output path"
            )
        path.parent.mkdir(parents=True, exist_ok=True)
        # not mkdtemp (always 0700): mkdir's mode lets the kernel apply the umask, as for the files
        tmp = path.parent / f".{path.name}.{secrets.token_hex(8)}.tmp"
        tmp.mkdir(mode=0o777)
        try:
            shards = []
            for k, s in enumerate(range(0, len(self), shard_size)):
                name = f"shard-{k:05d}.safetensors"
                rows = slice(s, min(s + shard_size, len(self)))
                tensors = {
                    "features": np.ascontiguousarray(self.features[rows], dtype=np.float32),
                    "ids": encode_ids(self.ids[rows]),
                }
                if self.labels is not None:
                    tensors["labels"] = np.ascontiguousarray(self.labels[rows])
                with atomic_path(tmp / name) as shard:  # for the file mode (see atomic_path)
                    save_file(tensors, str(shard))
                shards.append({"file": name, "n": rows.stop - rows.start})
            write_json(tmp / "index.json", {
                "kind": "features", "format": STORE_FORMAT, "n": len(self), "dim": self.dim,
                "has_labels": self.labels is not None, "class_names": self.class_names,
                "shards": shards, "meta": self.meta,
            })
            if path.exists():
                shutil.rmtree(path)
            tmp.rename(path)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp)
        return path

    @classmethod
    def load(cls, path: str | Path) -> FeatureStore:
        """Read a store folder written by :meth:`save` (or by ``pretrain-reuse embed``)."""
        path = check_file("feature store", path)
        index = read_json(path / "index.json", "feature store index")
        if index.get("kind") != "features":
            raise PretrainReuseError(f"{str(path)!r} is not a feature store (kind={index.get('kind')!r})")
        n, dim, has_labels, class_names, shards = _checked_index(index, path)
        # every shard's header is checked before the (n, dim) array is allocated: an index that
        # lies about n or dim must not end in a traceback or a half-filled array
        files = [_checked_shard(path / s["file"], s["n"], dim, has_labels) for s in shards]
        rows = sum(s["n"] for s in shards)
        if rows != n:
            raise PretrainReuseError(
                f"feature store {str(path)!r}: index.json says n={n} but its shards hold {rows} "
                "rows; re-run embed (or FeatureStore.save) to rewrite the store")
        features = np.empty((n, dim), dtype=np.float32)
        labels = np.empty(n, dtype=np.int64) if has_labels else None
        ids: list[str] = []
        start = 0
        for file, shard in zip(files, shards, strict=True):
            k = shard["n"]
            # copied from the file's pages straight into the array: a shard read whole first
            # would be a second copy of it (a shard of 65536 x 2048 features is 512 MB)
            features[start:start + k] = np.memmap(file, dtype="<f4", mode="r", shape=(k, dim),
                                                  offset=_data_offset(file, "features"))
            with safe_open(str(file), framework="numpy") as fh:
                if labels is not None:
                    labels[start:start + k] = fh.get_tensor("labels")
                ids.extend(decode_ids(fh.get_tensor("ids"), k, file))
            start += k
        return cls(features=features, labels=labels, ids=ids, class_names=class_names,
                   meta=index.get("meta", {}))


def _checked_index(index: dict, path: Path) -> tuple[int, int, bool, list[str] | None, list[dict]]:
    """n, dim, has_labels, class_names and shards of a store's ``index.json``, checked."""
    def corrupt(what: str) -> PretrainReuseError:
        return PretrainReuseError(f"feature store {str(path)!r}: index.json {what}; re-run embed "
                                  "(or FeatureStore.save) to rewrite the store")

    def count(value) -> bool:
        return isinstance(value, int) and not isinstance(value, bool) and value >= 0

    version = index.get("format")
    if not count(version) or version > STORE_FORMAT:
        raise PretrainReuseError(
            f"feature store {str(path)!r} has format {version!r}, this version of pretrain-reuse "
            f"reads format {STORE_FORMAT}; upgrade pretrain-reuse or re-run embed")
    n, dim, has_labels = index.get("n"), index.get("dim"), index.get("has_labels")
    if not count(n) or not count(dim) or not dim or not isinstance(has_labels, bool):
        raise corrupt(f"has n={n!r}, dim={dim!r}, has_labels={has_labels!r} (counts and a true/false)")
    names = index.get("class_names")
    if names is not None and not (isinstance(names, list) and all(isinstance(c, str) for c in names)):
        raise corrupt(f"has class_names {str(names)[:60]}, not a list of names")
    shards = index.get("shards")
    if not isinstance(shards, list) or not all(
            isinstance(s, dict) and isinstance(s.get("file"), str) and count(s.get("n")) for s in shards):
        raise corrupt("lacks a list of shards, each a file name and a row count n")
    return n, dim, has_labels, names, shards


def _checked_shard(file: Path, k: int, dim: int, has_labels: bool) -> Path:
    """``file`` after checking, from its header, that it holds the index's k rows of dim features
    (float32), their ids and, when the store has labels, k int64 labels."""
    expected = {"features": ([k, dim], "F32"), "ids": None,
                **({"labels": ([k], "I64")} if has_labels else {})}
    try:
        with safe_open(str(check_file("feature shard", file)), framework="numpy") as fh:
            found = {name: (fh.get_slice(name).get_shape(), fh.get_slice(name).get_dtype())
                     for name in fh.keys()}  # noqa: SIM118 (not a dict)
    except (SafetensorError, OSError, ValueError) as e:
        raise PretrainReuseError(
            f"feature shard {str(file)!r} is corrupt ({e}); re-run embed to rewrite it") from None
    for name, want in expected.items():
        if name not in found or (want is not None and found[name] != want):
            got = found.get(name, "no tensor")
            raise PretrainReuseError(
                f"feature shard {str(file)!r} holds {name} {got}, the index says {want or 'ids'}; "
                "re-run embed to rewrite the store")
    return file


def _data_offset(file: Path, name: str) -> int:
    """Where the bytes of tensor ``name`` start in the safetensors ``file``: after the 8-byte
    little-endian header size and the JSON header, at the tensor's first data offset."""
    with open(file, "rb") as fh:
        size = int.from_bytes(fh.read(8), "little")
        header = json.loads(fh.read(size))
    return 8 + size + header[name]["data_offsets"][0]


def _is_real(dtype: np.dtype) -> bool:
    return dtype.kind in "biuf"  # bool, signed and unsigned integers, floats


def _named_labels(labels: np.ndarray, names: list[str] | None) -> tuple[np.ndarray, list[str]]:
    """Class names as labels (a ``.npy`` of strings): their indices among ``names``, or among
    the sorted distinct names when none are given (as an image folder orders its classes)."""
    if not all(isinstance(x, str) for x in labels.tolist()):
        raise PretrainReuseError(f"labels must be class indices or class names, got dtype "
                                 f"{labels.dtype} holding {type(labels.tolist()[0]).__name__} values")
    names = names or sorted(set(labels.tolist()))
    index = {name: i for i, name in enumerate(names)}
    unknown = sorted(set(labels.tolist()) - set(index))
    if unknown:
        raise PretrainReuseError(f"label {unknown[0]!r} is not one of the {len(names)} class names; "
                                 "give every class its name (--class-names), or labels 0..C-1")
    return np.array([index[x] for x in labels.tolist()], dtype=np.int64), names


def _class_indices(labels: np.ndarray, n: int) -> np.ndarray:
    """``labels`` as int64 class indices, after checking that they are n whole numbers >= 0 that
    int64 holds (a float 1e300 or a uint64 2**64-1 would otherwise wrap to a negative index)."""
    if labels.shape != (n,):
        raise PretrainReuseError(
            f"labels must be a vector of {n} entries (one per feature row), got shape {labels.shape}")
    if not _is_real(labels.dtype):
        raise PretrainReuseError(f"labels must be integer class indices, got dtype {labels.dtype}")
    if not np.all(np.mod(labels, 1) == 0):  # NaN fails this too
        bad = labels[np.flatnonzero(~(np.mod(labels, 1) == 0))[0]]
        raise PretrainReuseError(f"labels must be integer class indices, got {bad}")
    if labels.min() < 0:
        raise PretrainReuseError(f"labels must be non-negative class indices, got {labels.min()}")
    if labels.max() >= 2**63:
        raise PretrainReuseError(f"label {labels.max()} is too large for a class index; relabel to 0..C-1")
    return labels.astype(np.int64)


def check_unique_ids(ids: list[str]) -> None:
    """Refuse an id given to two samples: units, selections and fine-tuning find samples by id,
    so an id used twice would map two samples onto one."""
    if len(set(ids)) < len(ids):
        seen: set[str] = set()
        twice = next(i for i in ids if i in seen or seen.add(i))
        raise PretrainReuseError(f"sample id {twice!r} is given to two samples; give every sample "
                                 "its own id")


def load_npy(what: str, path: str | Path, *, mmap: bool = False) -> np.ndarray:
    """Load a ``.npy`` file without pickles, with a clear error for missing or corrupt files."""
    p = check_file(what, path)
    try:
        return np.load(p, mmap_mode="r" if mmap else None, allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        reason = "it holds pickled objects, which are never loaded" if "pickle" in str(e) else str(e)
        raise PretrainReuseError(
            f"{what}: {str(p)!r} is not a readable .npy array ({reason}); save a numeric array "
            "with numpy.save"
        ) from None
