"""FeatureStore: per-sample features, optional labels and stable sample ids, on disk as shards.

Layout of a store folder::

    store/
      index.json                 kind, n, dim, shards, class_names, meta
      shard-00000.safetensors    features (n_s, D) float32, ids (UTF-8 blob), labels (n_s,) int64

Shards keep single files small enough to write atomically and to produce in parallel; the index is
written last, so a folder without ``index.json`` is an unfinished store.
"""

from __future__ import annotations

import secrets
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load_file, save_file

from .artifacts import atomic_path, decode_ids, encode_ids, hash_file, read_json, write_json
from .errors import PretrainReuseError, check_file, check_matrix

STORE_FORMAT = 1


@dataclass(frozen=True)
class FeatureStore:
    """Per-sample features with optional integer labels and string sample ids.

    Attributes:
        features: (N, D) float32 array (or a read-only memmap for ``.npy`` input).
        labels: (N,) int64 class indices, or None for unlabelled data.
        ids: N sample ids (e.g. relative image paths); ``"0".."N-1"`` when none were given.
        class_names: names of the label values, or None.
        meta: metadata block (producer, params, inputs, seed, version).
    """

    features: np.ndarray
    labels: np.ndarray | None = None
    ids: list[str] = field(default_factory=list)
    class_names: list[str] | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        check_matrix("features", self.features, finite=False)
        n = self.features.shape[0]
        if not self.ids:
            object.__setattr__(self, "ids", [str(i) for i in range(n)])
        if len(self.ids) != n:
            raise PretrainReuseError(f"got {len(self.ids)} sample ids for {n} feature rows")
        if self.labels is not None:
            labels = np.asarray(self.labels)
            if labels.shape != (n,):
                raise PretrainReuseError(
                    f"labels must be a vector of {n} entries (one per feature row), "
                    f"got shape {labels.shape}"
                )
            if not np.issubdtype(labels.dtype, np.integer) and not np.all(np.mod(labels, 1) == 0):
                raise PretrainReuseError("labels must be integer class indices")
            labels = labels.astype(np.int64)
            if labels.min() < 0:
                raise PretrainReuseError("labels must be non-negative class indices")
            object.__setattr__(self, "labels", labels)

    def __repr__(self) -> str:  # a summary: the dataclass repr would print every sample id
        labels = "unlabelled" if self.labels is None else (
            f"{len(self.class_names)} classes" if self.class_names else "labelled")
        return f"FeatureStore(n={len(self.ids)}, dim={self.features.shape[1]}, {labels})"

    def __len__(self) -> int:
        return self.features.shape[0]

    @property
    def dim(self) -> int:
        return self.features.shape[1]

    @classmethod
    def from_npy(cls, features: str | Path, labels: str | Path | None = None) -> FeatureStore:
        """Wrap ``.npy`` per-sample features (memory-mapped) and optional ``.npy`` labels."""
        feats = load_npy("features", features, mmap=True)
        labs = None if labels is None else load_npy("labels", labels)
        meta = {"producer": "npy", "inputs": {"features": hash_file(features)}}
        if labels is not None:
            meta["inputs"]["labels"] = hash_file(labels)
        return cls(features=feats, labels=labs, meta=meta)

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
        n, dim = int(index["n"]), int(index["dim"])
        features = np.empty((n, dim), dtype=np.float32)
        labels = np.empty(n, dtype=np.int64) if index["has_labels"] else None
        ids: list[str] = []
        row = 0
        for shard in index["shards"]:
            file = path / shard["file"]
            try:
                t = load_file(str(check_file("feature shard", file)))
            except (SafetensorError, OSError, ValueError) as e:
                raise PretrainReuseError(
                    f"feature shard {str(file)!r} is corrupt ({e}); re-run embed to rewrite it"
                ) from None
            k = int(shard["n"])
            if t["features"].shape != (k, dim):
                raise PretrainReuseError(
                    f"feature shard {str(file)!r} holds {t['features'].shape}, index says {(k, dim)}; "
                    "re-run embed to rewrite the store"
                )
            features[row:row + k] = t["features"]
            if labels is not None:
                labels[row:row + k] = t["labels"]
            ids.extend(decode_ids(t["ids"], k, file))
            row += k
        if row != n:
            raise PretrainReuseError(f"store {str(path)!r} has {row} rows, index says {n}; re-run embed")
        return cls(features=features, labels=labels, ids=ids,
                   class_names=index.get("class_names"), meta=index.get("meta", {}))


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
