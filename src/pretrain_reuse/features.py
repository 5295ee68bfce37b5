"""FeatureStore: per-sample features, optional labels and stable sample ids, on disk as shards.

Layout of a store folder::

    store/
      index.json                 kind, n, dim, shards, class_names, meta
      shard-00000.safetensors    features (n_s, D) float32, ids (UTF-8 blob), labels (n_s,) int64

Shards keep single files small enough to write atomically and to produce in parallel; the index is
written last, so a folder without ``index.json`` is an unfinished store. ``load(lazy=True)`` reads
the features from the shard files on demand (:class:`ShardedFeatures`), so that ImageNet's
1.28M x 2048 features (10.5 GB) need not fit in memory to be averaged into units: the command line
loads stores that way.
"""

from __future__ import annotations

import hashlib
import json
import secrets
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

from .artifacts import (
    ValueEquality,
    atomic_path,
    decode_ids,
    encode_ids,
    hash_file,
    read_json,
    write_json,
)
from .errors import (
    PretrainReuseError,
    as_array,
    check_file,
    check_int,
    check_matrix,
    check_regular_file,
    check_strings,
)

__all__ = ["FeatureStore", "ShardedFeatures", "hash_ids"]

STORE_FORMAT = 1


@dataclass(frozen=True, eq=False)
class FeatureStore(ValueEquality):
    """Per-sample features with optional integer labels and string sample ids.

    The constructor takes NumPy arrays, torch tensors or nested lists, and stores NumPy arrays.

    Attributes:
        features: (N, D) real array in the dtype it was given: it is not copied here. A ``.npy``
            input is a read-only memmap; a store loaded with ``lazy=True`` gives a
            :class:`ShardedFeatures` (float32, read from the shard files on demand;
            ``np.asarray`` reads them whole).
            Units read it in float32, chunk by chunk, and :meth:`save` writes float32.
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
        # a loaded store's shards were checked from their headers: as_array would read them all.
        # NaN/inf rows are refused where the rows are read anyway (units, save), not here, where
        # a memory-mapped .npy would be read whole
        features = (self.features if isinstance(self.features, ShardedFeatures)
                    else check_matrix("features", self.features, finite=False))
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
        """Write the store folder (replacing an existing one only once the new one is complete).

        Refuses a row that float32, the dtype a store holds, cannot hold (:func:`float32_rows`),
        naming its sample."""
        shard_size = check_int("shard_size", shard_size, minimum=1)  # -1 would write no row
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
                tensors = {"features": float32_rows(self.features, rows, self.ids),
                           "ids": encode_ids(self.ids[rows])}
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
    def load(cls, path: str | Path, *, lazy: bool = False) -> FeatureStore:
        """Read a store folder written by :meth:`save` (or by ``pretrain-reuse embed``).

        The features are read into one float32 array, or with ``lazy=True`` left in the shard
        files as a :class:`ShardedFeatures`, read when indexed: for code that reads them block by
        block (:func:`~pretrain_reuse.units.class_means`, :func:`~pretrain_reuse.units.spherical_kmeans`,
        :meth:`save`). Ids and labels are read either way."""
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
        parts = []
        labels = np.empty(n, dtype=np.int64) if has_labels else None
        ids: list[str] = []
        start = 0
        for file, shard in zip(files, shards, strict=True):
            k = shard["n"]
            if k:  # a file holds no map of zero bytes
                parts.append(np.memmap(file, dtype="<f4", mode="r", shape=(k, dim),
                                       offset=_data_offset(file, "features")))
            with safe_open(str(file), framework="numpy") as fh:
                if labels is not None:
                    labels[start:start + k] = fh.get_tensor("labels")
                ids.extend(decode_ids(fh.get_tensor("ids"), k, file))
            start += k
        # no rows: an empty array, refused by the constructor's check as any empty input is
        features = ShardedFeatures(parts) if parts else np.empty((0, dim), dtype=np.float32)
        if not lazy:
            features = np.array(features)  # one copy in memory, from the maps' pages
        return cls(features=features, labels=labels, ids=ids, class_names=class_names,
                   meta=index.get("meta", {}))


class ShardedFeatures:
    """The (N, D) float32 features of a store's shards, one read-only memory map per shard,
    seen as one matrix: rows are read from the files when they are indexed.

    Indexing by rows (an int, a slice, an index array or a boolean mask), optionally followed by
    columns (``x[rows, cols]``), returns a NumPy array: a view of the map when the rows are a
    contiguous run inside one shard, else a copy. ``len``, ``shape``, ``dtype`` and ``ndim`` are
    those of the matrix, and ``np.asarray(x)`` reads it whole (into memory, unless the store has
    one shard, whose map it returns). Read-only: change a copy and save a new store.
    """

    def __init__(self, parts: list[np.ndarray]):
        self._parts = parts
        self._starts = np.cumsum([0] + [len(p) for p in parts])
        self.shape = (int(self._starts[-1]), parts[0].shape[1])
        self.dtype = np.dtype(np.float32)
        self.ndim = 2

    def __len__(self) -> int:
        return self.shape[0]

    def __repr__(self) -> str:
        return f"ShardedFeatures(shape={self.shape}, shards={len(self._parts)})"

    def __getitem__(self, key) -> np.ndarray:
        rows, cols = key if isinstance(key, tuple) else (key, slice(None))
        if isinstance(rows, slice) and rows.step in (None, 1):
            start, stop, _ = rows.indices(len(self))
            block = self._run(start, max(start, stop))
        else:  # any other row index means what it means on an array of row numbers
            index = np.arange(len(self))[rows]
            block = self._take(np.atleast_1d(index))
            if index.ndim == 0:
                block = block[0]
        return block[..., cols] if isinstance(key, tuple) else block

    def _run(self, start: int, stop: int) -> np.ndarray:
        """Rows ``start:stop``: a view when one shard holds them all."""
        first = int(np.searchsorted(self._starts, start, side="right")) - 1
        pieces = []
        for p in range(max(first, 0), len(self._parts)):
            lo, hi = self._starts[p], self._starts[p + 1]
            if lo >= stop:
                break
            pieces.append(self._parts[p][max(start, lo) - lo:min(stop, hi) - lo])
        if len(pieces) == 1:
            return pieces[0]
        return np.concatenate(pieces) if pieces else np.empty((0, self.shape[1]), self.dtype)

    def _take(self, index: np.ndarray) -> np.ndarray:
        """Rows ``index`` (in that order), read shard by shard."""
        out = np.empty((len(index), self.shape[1]), dtype=self.dtype)
        shard = np.searchsorted(self._starts, index, side="right") - 1
        for p in np.unique(shard):
            mask = shard == p
            out[mask] = self._parts[p][index[mask] - self._starts[p]]
        return out

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        if copy is False and len(self._parts) > 1:  # NumPy's protocol: never copy, or fail
            raise ValueError("the features of several shards are one array only as a copy")
        whole = self._run(0, len(self))
        if copy and len(self._parts) == 1:  # else it is a concatenation: a copy already
            whole = np.array(whole)
        return whole if dtype is None else whole.astype(dtype, copy=False)


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
        with safe_open(str(check_regular_file("feature shard", file)), framework="numpy") as fh:
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


def float32_rows(features, rows: slice, ids: list[str] | None = None) -> np.ndarray:
    """Rows ``rows`` of ``features`` as a contiguous float32 array, the dtype stores hold and units
    are computed in, after refusing a row that float32 cannot hold: NaN/inf, a value beyond its
    range (a float64 1e300 would become inf) or nonzero values all below it (a row of 1e-300s would
    become a zero row, with no direction). The message names the row by its number in
    ``features`` and, given ``ids``, by its sample id. Reads only those rows (works on memmaps)."""
    block = check_matrix("features", np.asarray(features[rows]), finite=False)

    def refuse(bad: np.ndarray, what: str, fix: str) -> None:
        if bad.any():
            row = rows.start + int(np.flatnonzero(bad)[0])
            sample = f" (sample {str(ids[row])!r})" if ids is not None else ""
            raise PretrainReuseError(f"features row {row}{sample} holds {what}; {fix}")

    refuse(~np.isfinite(block).all(axis=1), "NaN/inf values", "remove or recompute that sample")
    with np.errstate(over="ignore"):  # refused below, naming the row
        out = np.ascontiguousarray(block, dtype=np.float32)
    rescale = "rescale the features (e.g. divide them by their largest norm)"
    refuse(~np.isfinite(out).all(axis=1), "values above the float32 range", rescale)
    refuse(~out.any(axis=1) & block.any(axis=1),
           "only values below the float32 range (they round to zero)", rescale)
    return out


def check_unique_ids(ids: list[str]) -> None:
    """Refuse an id given to two samples: units, selections and fine-tuning find samples by id,
    so an id used twice would map two samples onto one."""
    if len(set(ids)) < len(ids):
        seen: set[str] = set()
        twice = next(i for i in ids if i in seen or seen.add(i))
        raise PretrainReuseError(f"sample id {twice!r} is given to two samples; give every sample "
                                 "its own id")


def hash_ids(ids: list[str]) -> str:
    """Short hash of sample ids in their order, as ``embed`` records the ids of all the data it
    read (``meta.inputs.ids``: unreadable images included), so that a selection's record of its
    target's samples compares with the ids of the data ``finetune`` opens."""
    return "sha256:" + hashlib.sha256("\n".join(ids).encode()).hexdigest()[:16]


def load_npy(what: str, path: str | Path, *, mmap: bool = False) -> np.ndarray:
    """Load a ``.npy`` file without pickles, with a clear error for missing or corrupt files."""
    p = check_regular_file(what, path)
    try:
        with open(p, "rb") as fh:
            is_npy = fh.read(6) == b"\x93NUMPY"  # the format's magic string
        if not is_npy:
            raise ValueError("no NumPy header: not a file numpy.save wrote")
        return np.load(p, mmap_mode="r" if mmap else None, allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        reason = ("it holds pickled objects, which are never loaded"
                  if "pickle" in str(e) or "Python objects" in str(e) else str(e))
        raise PretrainReuseError(
            f"{what}: {str(p)!r} is not a readable .npy array ({reason}); save a numeric array "
            "with numpy.save"
        ) from None
