"""``embed``: images (or sentences) to a FeatureStore with a backbone, batched, resumable and
multi-process.

The data set is cut into fixed shards of ``shard_size`` consecutive samples. Each shard is
computed in batches from its own start and written atomically as one safetensors file, so:

- an interrupted run (even ``kill -9``) loses at most the shards in flight; rerunning the same
  command skips the finished ones and ends with a store identical to an uninterrupted run;
- under ``torchrun --nproc_per_node N`` rank ``r`` computes the shards ``k = r (mod N)`` and rank
  0 writes ``index.json`` at the end, giving the same store as one process.

Unreadable images are skipped, counted, warned of (:class:`~.data.DataWarning`, with the first
ids) and the first :data:`SKIPPED_LISTED` listed in the index (never a crash halfway through a
million-image folder); a data set with no readable image at all is refused before anything is
written. A file of sentences (``.jsonl`` or CSV, labelled or not, :mod:`~.data.text`) goes through a
text backbone (a Hugging Face encoder or sequence classifier: ``all-minilm-l6-v2``, ``hf:<dir>``)
the same way, its sentences tokenized by the model's own tokenizer.
"""

from __future__ import annotations

import json
import math
import time
import warnings
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from safetensors import safe_open
from safetensors.numpy import save_file
from tqdm.auto import tqdm

from .artifacts import (
    atomic_path,
    claim_folder,
    encode_ids,
    hash_array,
    hash_file,
    lock_folder,
    make_meta,
    releases_folders,
    safetensors_header,
    to_json,
    write_json,
)
from .configs import check_fields
from .data.catalog import check_out_outside, open_dataset
from .data.datasets import Batch, DataWarning, ImageDataset, collate, describe_skipped, first_readable
from .data.text import TextDataset, is_sentence_file, text_file
from .distributed import bf16_autocast, process_device, rank_world, uses_bf16
from .errors import PretrainReuseError, check_choice, check_device, check_image_size, check_seed
from .features import STORE_FORMAT, FeatureStore, hash_ids
from .models import LAYERS, ImageTransform, create_backbone, features_hash, state_hash
from .models.registry import check_modality, model_modality

#: Unreadable images named in a store's ``index.json`` (``meta.skipped_ids``; ``meta.skipped``
#: counts them all): the index is read with every load of the store, and the ids of a folder
#: of, say, 100,000 unreadable files would make it megabytes.
SKIPPED_LISTED = 100


@dataclass(frozen=True)
class EmbedConfig:
    """What to embed and how. ``data`` is a folder, a list file or an embedded data set name of
    images, or a file of sentences (``.jsonl`` or CSV, :mod:`~.data.text`; for a text
    backbone). ``precision`` ``auto`` is bf16 autocast on a GPU that computes in bf16 natively
    (compute capability 8.0 and later), else float32."""

    model: str
    data: str
    weights: str | None = None
    layer: str = "penultimate"
    split: str | None = None
    batch_size: int = 128
    workers: int = 0
    shard_size: int = 8192
    device: str = "cpu"
    precision: str = "auto"  # "fp32"; "bf16"; "auto": bf16 on a GPU with native bf16, else fp32
    seed: int = 0  # initialises whatever the weights file does not cover (all of it without one)
    image_size: int | None = None  # input side in pixels, resized at the backbone's crop ratio

    def __post_init__(self):
        check_fields(self)
        check_choice("layer", self.layer, LAYERS)
        check_choice("precision", self.precision, ("auto", "fp32", "bf16"))
        check_device(self.device)
        for name in ("batch_size", "shard_size"):
            if getattr(self, name) < 1:
                raise PretrainReuseError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.workers < 0:
            raise PretrainReuseError(f"workers must be >= 0, got {self.workers}")
        check_seed("seed", self.seed)
        if self.image_size is not None:
            check_image_size(self.image_size)


def preprocessed(dataset: ImageDataset, preprocess: ImageTransform) -> ImageDataset:
    """``dataset`` with a backbone's own eval transform (``Backbone.preprocess``: PIL resize,
    centre crop, normalise), exactly as the model's weights expect their inputs."""
    return _Preprocessed(dataset, preprocess)


class _Preprocessed(ImageDataset):

    def __init__(self, dataset: ImageDataset, preprocess: ImageTransform):
        super().__init__(ids=dataset.ids, labels=dataset.labels, class_names=dataset.class_names,
                         transform=None, source=dataset.source)
        self.dataset, self.preprocess = dataset, preprocess

    def load(self, index: int) -> torch.Tensor | None:
        image = self.dataset.load(index)
        if image is None:
            return None
        p = self.preprocess
        if _is_noop_resize(p, image):
            # already at the input size: the PIL round trip would only quantise and copy
            mean = torch.tensor(p.mean).view(-1, 1, 1)
            return (image.expand(3, -1, -1) - mean) / torch.tensor(p.std).view(-1, 1, 1)
        return p(image)


def _is_noop_resize(p: ImageTransform, image: torch.Tensor) -> bool:
    h, w = image.shape[-2:]
    return (h, w) == tuple(p.input_size) and p.resize_size in (h, (h, w)) and h == w


class _Sentences(torch.utils.data.Dataset):
    """Sentences read as :func:`_embed_shard` reads images, ``(text, label, position)``, and
    tokenized a batch at a time by the text backbone's own transform (:meth:`collate`); every
    sentence is readable."""

    def __init__(self, dataset: TextDataset, preprocess):
        self.dataset, self.preprocess = dataset, preprocess
        self.ids, self.labels = dataset.ids, dataset.labels
        self.class_names = dataset.class_names

    def __len__(self) -> int:
        return len(self.dataset)

    def load(self, index: int) -> dict[str, torch.Tensor]:
        """The sentence at ``index`` tokenized, as a batch of one."""
        return self.preprocess.batch([self.dataset.texts[index]])

    def __getitem__(self, index: int) -> tuple[str, int, int]:
        return self.dataset.texts[index], -1 if self.labels is None else int(self.labels[index]), index

    def collate(self, samples: list[tuple[str, int, int]]) -> Batch:
        """DataLoader ``collate_fn``: the batch's sentences tokenized together."""
        return Batch(images=self.preprocess.batch([s[0] for s in samples]),
                     labels=torch.tensor([s[1] for s in samples]),
                     indices=torch.tensor([s[2] for s in samples]),
                     skipped=torch.zeros(0, dtype=torch.int64))


def _on_device(inputs: torch.Tensor | dict[str, torch.Tensor], device: torch.device):
    """A batch of images (channels-last) or of tokenized sentences on ``device``."""
    if isinstance(inputs, dict):
        return {key: value.to(device, non_blocking=True) for key, value in inputs.items()}
    return inputs.to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)


def _open_data(cfg: EmbedConfig) -> ImageDataset | TextDataset:
    if not is_sentence_file(cfg.data):
        return open_dataset(cfg.data, split=cfg.split)
    if cfg.split is not None:
        raise PretrainReuseError("--split picks a sub-folder of an image data set; a sentence "
                                 "file holds one split: pass that split's file as --data")
    return text_file(cfg.data, need_labels=False)


@releases_folders
def embed(cfg: EmbedConfig, out: str | Path, *, progress: bool = True,
          load: bool = True) -> FeatureStore | None:
    """Compute the features of every image (sentence) of ``cfg.data`` into the store folder
    ``out``.

    Returns the store, or None on the processes of a ``torchrun`` job other than rank 0 (eight
    processes each holding ImageNet's 1.28M x 2048 features would need 84 GB) and with
    ``load=False``, which leaves the store on disk only (ImageNet's 1.28M x 2048 features are
    10 GB to read back; the command line reports from ``index.json``)."""
    out = Path(out)
    check_out_outside(out, {"--data": cfg.data})
    rank, world = rank_world()
    device = process_device(cfg.device)
    # a model of the other modality, or an unknown one, is refused before the data is listed
    check_modality(cfg.model, model_modality(cfg.model), is_sentence_file(cfg.data), "--data")
    dataset = _open_data(cfg)
    text = isinstance(dataset, TextDataset)
    if len(dataset) == 0:
        raise PretrainReuseError(f"--data {cfg.data!r} holds no images")
    encode_ids(dataset.ids)  # a file name with a newline cannot be stored: say so before any work
    if text and cfg.image_size is not None:
        raise PretrainReuseError("--image-size applies to images; --data is a file of sentences")
    first = 0 if text else _first_readable_image(dataset, cfg.data)
    with torch.random.fork_rng(devices=[]):  # every process and every rerun: the same network
        torch.manual_seed(cfg.seed)
        backbone = create_backbone(cfg.model, weights=cfg.weights, layer=cfg.layer, device=device)
    check_modality(cfg.model, backbone.spec.modality, text, "--data")  # python: builders
    if cfg.image_size is not None:
        backbone.set_input_side(cfg.image_size)
    if not text:
        backbone.to(memory_format=torch.channels_last)
    data = (_Sentences(dataset, backbone.preprocess) if text
            else preprocessed(dataset, backbone.preprocess))
    use_bf16 = uses_bf16(cfg.precision, device)
    _check_first_sample(backbone, data, first, cfg, device, use_bf16)
    # The network's own parameters, not only the --weights file: a Hugging Face folder, a
    # python: builder or a registry default changed between two runs must not be mixed.
    identity = {"config": _resume_config(cfg, _recorded_device(out)), "state": state_hash(backbone),
                **data_identity(dataset)}
    parts = out / "parts"
    if rank == 0:
        # before a stopped run's marker is forgotten: it may be a running one's
        lock_folder(out, "an embedding")
        _forget_a_run_without_shards(out, parts)
        _record_added_keys(out / "embed.json", identity)
        claim_folder(out, "embedding", identity, what="an embedding", marker="embed.json")
        parts.mkdir(exist_ok=True)
    if world > 1:
        dist.barrier()

    n_shards = -(-len(dataset) // cfg.shard_size)
    mine = [k for k in range(n_shards) if k % world == rank and not _shard_done(parts, k)]
    if not mine and _finished_store(out):
        # every rank finds the same: rewriting the index would only replace the recorded
        # embedding time, and a progress bar would count nothing
        return FeatureStore.load(out) if rank == 0 and load else None
    def size(k: int) -> int:
        return min(cfg.shard_size, len(dataset) - k * cfg.shard_size)

    # a resumed run's bar starts at the samples of this rank that earlier runs embedded
    total = sum(size(k) for k in range(rank, n_shards, world))
    # under torchrun the bar is rank 0's, which counts its own share of the samples
    share = f" (process 1 of {world}: its share)" if world > 1 else ""
    bar = tqdm(total=total, initial=total - sum(size(k) for k in mine), desc=f"embed {cfg.model}{share}",
               unit="sentence" if text else "img", disable=not progress or rank != 0)
    t0 = time.perf_counter()
    for k in mine:
        _embed_shard(k, data, backbone, cfg, device, use_bf16, parts, bar)
    bar.close()
    if world > 1:
        dist.barrier()
    if rank == 0:
        skipped, zero = _write_index(out, parts, n_shards, dataset, backbone, cfg, use_bf16,
                                     time.perf_counter() - t0)
        if skipped:
            warnings.warn(f"{describe_skipped(dataset, skipped)}; they have no features (the "
                          f"first {SKIPPED_LISTED} are listed in index.json, meta.skipped_ids)",
                          DataWarning, stacklevel=3)
        if zero:
            warnings.warn(_describe_zero_rows(dataset, zero, cfg.model), DataWarning, stacklevel=3)
    if world > 1:
        dist.barrier()
    return FeatureStore.load(out) if rank == 0 and load else None


def _first_readable_image(dataset: ImageDataset, data: str) -> int:
    # Checked before the folder is claimed: otherwise the run would end in an empty store that a
    # rerun with fixed data refuses as "made with other settings"
    first = first_readable(dataset)
    if first is not None:
        return first
    raise PretrainReuseError(
        f"--data {data!r}: none of its {len(dataset)} images can be read (first: "
        f"{dataset.ids[0]!r}); check that the files exist and are images")


@torch.no_grad()
def _check_first_sample(backbone, data: ImageDataset | _Sentences, first: int, cfg: EmbedConfig,
                        device: torch.device, use_bf16: bool) -> None:
    """One image (sentence) through the network before anything is written: a network that
    cannot take the preprocessed images, or whose weights give NaN, fails here in one line, not
    halfway through a run that would leave a folder a fixed rerun refuses."""
    x = data.load(first)
    if isinstance(x, dict):
        x, unit, sample = _on_device(x, device), "sentence", "its first sentence"
        fix = "check that the folder holds a text model and its own tokenizer"
    else:
        x, unit, sample = x[None].to(device), "image", f"a preprocessed image of shape {tuple(x.shape)}"
        fix = ("check that the model takes inputs of that size (a python: builder can set "
               "input_size / resize_size in the dict it returns)")
    try:
        with bf16_autocast(device, use_bf16):
            features = backbone.features(x).float()
    except RuntimeError as e:  # shape mismatches; not a user error we can name more precisely
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise PretrainReuseError(f"{cfg.model} fails on {sample} ({reason}); {fix}") from None
    if features.shape[1:] != (backbone.feature_dim,):
        raise PretrainReuseError(
            f"{cfg.model} gives {math.prod(features.shape[1:])} features per {unit}, but its head "
            f"takes {backbone.feature_dim}, on {sample}; {fix}")
    _check_finite(features.cpu(), torch.tensor([first]), data, use_bf16)


def _resume_config(cfg: EmbedConfig, recorded_device: str | None = None) -> dict:
    """The settings that decide the features, as a rerun compares them: ``workers`` does not
    change a feature, a data folder or weights file is the same whichever way its path is
    written (a rerun from another folder), and a device is the same by its type (``cuda``,
    ``cuda:1`` and the GPU of each torchrun process compute the same features; the CPU does not
    compute what a GPU computes in bf16). ``recorded_device``: the device as the folder's marker
    holds it, kept where it is of the same type (earlier versions recorded ``cuda:0``)."""
    config = asdict(cfg)
    del config["workers"]
    for key in ("data", "weights"):
        if config[key] is not None and Path(config[key]).exists():
            config[key] = str(Path(config[key]).resolve())
    kind = torch.device(cfg.device).type
    same_kind = recorded_device is not None and torch.device(recorded_device).type == kind
    config["device"] = recorded_device if same_kind else kind
    return config


def _recorded_device(out: Path) -> str | None:
    """The device in the marker of the embedding in ``out``, if there is a readable one."""
    try:
        device = json.loads((out / "embed.json").read_text())["params"]["config"]["device"]
        torch.device(device)
    except (OSError, ValueError, KeyError, TypeError, RuntimeError):
        return None  # no marker, or not one of ours: claim_folder says what is wrong with it
    return device


def data_identity(dataset: ImageDataset | TextDataset) -> dict[str, Any]:
    """What an embedding records of the data it read: how many samples, a hash of their ids and
    of their labels, and for sentences of their texts (edited in place, a file keeps its ids).
    An experiment compares it with its data as it is now before reusing the features."""
    return {"n": len(dataset), "ids": hash_ids(dataset.ids),
            "labels": None if dataset.labels is None else hash_array(dataset.labels),
            **({"texts": dataset.content_hash()} if isinstance(dataset, TextDataset) else {})}


#: What an embedding's identity holds since a later version: the labels (a list file relabelled in
#: place keeps its ids) and a sentence file's texts (edited in place, it keeps its ids).
_ADDED_KEYS = ("labels", "texts")


def _record_added_keys(marker: Path, identity: dict[str, Any]) -> None:
    """Give the marker of an earlier version's embedding of the same inputs the keys of
    :data:`_ADDED_KEYS` it lacks, so that the rerun resumes it: those versions trusted the data
    by its ids, as this one then does once."""
    try:
        recorded = json.loads(marker.read_text())
        params = recorded["params"]
    except (OSError, ValueError, KeyError, TypeError):
        return  # none, or not readable: claim_folder decides
    now = json.loads(to_json(identity))
    if isinstance(params, dict) and not any(k in params for k in _ADDED_KEYS) and params == {
            k: v for k, v in now.items() if k not in _ADDED_KEYS}:
        write_json(marker, {**recorded, "params": now})


def _forget_a_run_without_shards(out: Path, parts: Path) -> None:
    """A run stopped before its first shard was written (it failed on a bad image or weights)
    left nothing to resume or to mix: a rerun may take its folder, whatever its settings."""
    marker = out / "embed.json"
    if marker.is_file() and parts.is_dir() and not any(parts.iterdir()):
        parts.rmdir()
        marker.unlink()


def _shard_path(parts: Path, k: int) -> Path:
    return parts / f"shard-{k:05d}.safetensors"


def _finished_store(out: Path) -> bool:
    """Whether ``out`` holds a finished store whose ``index.json`` opens: a missing or damaged
    index is written again from the shards."""
    try:
        FeatureStore.load(out, lazy=True)
    except PretrainReuseError:
        return False
    return True


def _shard_done(parts: Path, k: int) -> bool:
    """Whether shard ``k`` is written and readable. Shards are written whole (temp file, then
    rename), so an unreadable one was damaged afterwards (disk, copy): computed again."""
    path = _shard_path(parts, k)
    if not path.exists():
        return False
    if safetensors_header(path) is None:  # checks the header and that the file holds its data
        path.unlink()
        return False
    return True


@torch.no_grad()
def _embed_shard(k: int, data: ImageDataset | _Sentences, backbone, cfg: EmbedConfig,
                 device: torch.device, use_bf16: bool, parts: Path, bar) -> None:
    start = k * cfg.shard_size
    positions = list(range(start, min(start + cfg.shard_size, len(data))))
    batches = [positions[i:i + cfg.batch_size] for i in range(0, len(positions), cfg.batch_size)]
    # its own generator: a DataLoader draws its workers' base seed from the caller's global one
    loader = torch.utils.data.DataLoader(data, batch_sampler=batches, num_workers=cfg.workers,
                                         collate_fn=data.collate
                                         if isinstance(data, _Sentences) else collate,
                                         generator=torch.Generator().manual_seed(cfg.seed))
    feats, idx, skipped = [], [], []
    for batch in loader:
        skipped.extend(batch.skipped.tolist())
        if len(batch.indices):
            with bf16_autocast(device, use_bf16):
                feats.append(backbone.features(_on_device(batch.images, device)).float().cpu())
            _check_finite(feats[-1], batch.indices, data, use_bf16)
            idx.append(batch.indices)
        bar.update(len(batch.indices) + len(batch.skipped))
    index = torch.cat(idx).numpy() if idx else np.zeros(0, np.int64)
    features = torch.cat(feats).numpy() if feats else np.zeros((0, backbone.feature_dim), np.float32)
    tensors = {
        "features": features,
        "index": index.astype(np.int64),
        "ids": encode_ids([data.ids[i] for i in index]),
        "skipped": np.asarray(sorted(skipped), dtype=np.int64),
        # all-zero rows (a layer with dead units): no direction for cosine costs or k-means
        "zero_rows": index[~features.any(axis=1)].astype(np.int64),
    }
    if data.labels is not None:
        tensors["labels"] = data.labels[index].astype(np.int64)
    with atomic_path(_shard_path(parts, k)) as tmp:
        save_file(tensors, str(tmp))


def _check_finite(features: torch.Tensor, indices: torch.Tensor, data: ImageDataset | _Sentences,
                  use_bf16: bool) -> None:
    """NaN/inf features would poison every later step (class means, k-means, selection)."""
    bad = (~torch.isfinite(features)).any(dim=1).nonzero()
    if len(bad):
        sample = data.ids[int(indices[int(bad[0])])]
        what = "sentence" if isinstance(data, _Sentences) else "image"
        raise PretrainReuseError(
            f"the backbone gave NaN/inf features (first for {what} {sample!r}); check the weights "
            "for NaN/inf parameters" + (", or embed with --precision fp32 (bf16 overflows)"
                                        if use_bf16 else ""))


def _write_index(out: Path, parts: Path, n_shards: int, dataset: ImageDataset | TextDataset, backbone,
                 cfg: EmbedConfig, use_bf16: bool, seconds: float) -> tuple[list[int], list[int]]:
    """Write ``index.json`` over the shards; returns the positions of the unreadable samples
    and of those whose features are all zeros.

    ``meta.inputs.state`` is the hash of the parameters that compute the embedded layer
    (:func:`~.models.features_hash`), which units carry and a selection compares: the same body
    with another head (a pre-trained classifier, the weights saved without it or fine-tuned with
    a new one) embeds the same features. Stores written before recorded the whole network's
    :func:`~.models.state_hash`, so such a store and a newer one may be warned of as different
    networks. (A rerun is compared on the whole network, as before, in ``embed.json``.)
    ``meta.precision`` is the precision the features were computed in (``bf16`` or ``fp32``, what
    ``auto`` became on the device): bf16 features are rounded to 8 bits of mantissa."""
    shards, skipped, zero, classes_seen = [], [], [], set()
    for k in range(n_shards):
        path = _shard_path(parts, k)
        with safe_open(str(path), framework="np") as t:  # all but the features: no full read
            shards.append({"file": f"parts/{path.name}", "n": len(t.get_tensor("index"))})
            skipped.extend(t.get_tensor("skipped").tolist())
            names = t.keys()  # a safe_open handle has no `in`
            if "labels" in names:
                classes_seen.update(np.unique(t.get_tensor("labels")).tolist())
            if "zero_rows" in names:  # (shards of an earlier version, resumed, record none)
                zero.extend(t.get_tensor("zero_rows").tolist())
    meta = make_meta("embed", asdict(cfg), seed=cfg.seed, inputs={
        "data": cfg.data, "ids": hash_ids(dataset.ids),
        "weights": hash_file(cfg.weights) if cfg.weights else None,
        "state": features_hash(backbone)})
    # classes all of whose images were unreadable: class means will refuse the store
    empty = [name for c, name in enumerate(dataset.class_names or []) if c not in classes_seen]
    meta.update(backbone=json.loads(backbone.spec.to_json()), seconds=round(seconds, 2),
                precision="bf16" if use_bf16 else "fp32",
                skipped=len(skipped),
                skipped_ids=[dataset.ids[i] for i in skipped[:SKIPPED_LISTED]],
                classes_without_images=empty,
                zero_rows=len(zero), zero_row_ids=[dataset.ids[i] for i in zero[:SKIPPED_LISTED]])
    write_json(out / "index.json", {
        "kind": "features", "format": STORE_FORMAT, "n": sum(s["n"] for s in shards),
        "dim": backbone.feature_dim, "has_labels": dataset.labels is not None,
        "class_names": dataset.class_names, "shards": shards, "meta": meta})
    return skipped, zero


def _describe_zero_rows(dataset: ImageDataset | TextDataset, zero: list[int], model: str) -> str:
    """The warning of samples whose features are all zeros: how many, the first, the class
    with the most of them."""
    what = "sentences" if isinstance(dataset, TextDataset) else "images"
    most = ""
    if dataset.labels is not None:
        label, count = Counter(dataset.labels[zero].tolist()).most_common(1)[0]
        name = dataset.class_names[label] if dataset.class_names else str(label)
        most = f", {count} of them of class {name!r}"
    return (f"{len(zero)} of the {len(dataset)} {what} got all-zero features from {model} "
            f"(first: {dataset.ids[zero[0]]!r}{most}), which have no direction: k-means units "
            "and cosine selection refuse them; check --weights and --layer (a layer whose units "
            "are all dead for these inputs, as after a diverged training, gives zeros); "
            "index.json lists them (meta.zero_row_ids)")
