"""Reading weights files safely, mapping their keys onto a model, and writing backbones back.

Weights are ``.safetensors`` or torch files read with ``torch.load(weights_only=True)``: tensors,
numbers (NumPy's too), strings and containers only, never arbitrary pickled objects. A checkpoint
may be a bare state dict or wrap it as ``{"state_dict": ...}`` (MoCo, Lightning) or ``{"model":
...}`` (DeiT, MAE). Keys are mapped by prefix before they are compared with the model:

- by default the wrapper prefixes ``module.`` (DistributedDataParallel), ``_orig_mod.``
  (``torch.compile``) and ``encoder_q.`` (MoCo's query encoder, so ``module.encoder_q.conv1.weight``
  becomes ``conv1.weight``) are stripped, repeatedly, wherever a key starts with one of them;
- then, when none of the file's keys is a key of the model but some are without one outer
  prefix (a Lightning module's ``model.``), that prefix is stripped (:func:`strip_outer_prefix`);
- a user ``key_map`` of ``{old_prefix: new_prefix}`` replaces the defaults: each key is renamed by
  the first rule whose prefix it starts with, once.

Keys of the file that the model does not have and that lie outside its modules (MoCo's key
encoder and queue, an EMA copy) are ignored and listed in the :class:`LoadReport`; a model key the
file lacks, a shape mismatch, a file key inside the model's modules that the model lacks (a deeper
architecture's blocks), or a file none of whose keys matches is a
:class:`~pretrain_reuse.errors.PretrainReuseError` naming the file and the first offending keys.
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import pickle
import re
import warnings
import zipfile
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from safetensors.torch import save_file
from torch import nn

from ..artifacts import (
    atomic_path,
    check_output_file,
    hash_file,
    read_safetensors,
    safetensors_header,
)
from ..errors import PretrainReuseError

if TYPE_CHECKING:  # backbone.py imports this module
    from .backbone import Backbone

WRAPPER_PREFIXES = ("module.", "_orig_mod.", "encoder_q.")
_SHOWN = 3  # offending keys quoted in an error message


class WeightsWarning(UserWarning):
    """Weights that load, but perhaps not as meant (a head under a name the model does not use)."""


@dataclass(frozen=True)
class LoadReport:
    """What loading a weights file did.

    Attributes:
        path: the weights file.
        loaded: number of tensors copied into the model (body and head).
        unexpected: file keys (after mapping) the model has no place for; they were ignored.
        head: ``"checkpoint"`` (head rebuilt from the file's head weights), ``"none"`` (the file
            has no head weights, so the backbone has no head).
    """

    path: str
    loaded: int
    unexpected: tuple[str, ...]
    head: str


def read_weights(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Read a weights file into (state dict on CPU, safetensors header metadata or ``{}``).
    Weights with NaN values are refused: every output of the model would be NaN, and a
    fine-tuning run would stop at its first step as if its learning rate were too high."""
    state, header = _read_weights(Path(path))
    bad = [k for k, v in state.items() if v.is_floating_point() and bool(torch.isnan(v).any())]
    if bad:
        raise PretrainReuseError(
            f"weights file {str(path)!r} holds NaN values in {len(bad)} tensor(s) (first: "
            f"{bad[0]!r}): a damaged file or a diverged training; pass weights without NaN")
    return state, header


def _read_weights(p: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    if not p.is_file():
        what = "is a folder" if p.is_dir() else "does not exist"
        raise PretrainReuseError(
            f"weights file {str(p)!r} {what}; pass the path of a .safetensors file or a torch "
            "state dict (.pt/.pth/.pth.tar) of this architecture")
    if p.suffix.lower() == ".safetensors":
        state, header = read_safetensors(p, "weights file", "re-download or re-save it", framework="pt")
        if header.get("artifact") == "checkpoint":  # finetune's resume state, not a model's weights
            raise PretrainReuseError(
                f"weights file {str(p)!r} is a fine-tuning run's resume checkpoint (model, "
                "optimiser and sampler state), not a model's weights; pass the run's "
                "model.safetensors or one of its snapshots/ (finetune --snapshots), or rerun "
                "the run's finetune command to finish it")
        return state, header
    return _unwrap(_read_torch(p), p), {}


# What a training script's checkpoint holds beside the tensors, allowed for the weights-only
# unpickler, which still checks every value inside: argparse.Namespace only holds attributes
# (DeiT's and MAE's training args); a NumPy number or bool (a best accuracy as np.float64) is
# rebuilt by numpy's ``scalar(dtype, raw bytes)`` from a dtype, ``np.dtype`` given the dtype's
# class (Float64DType, ...): they make a number of the bytes and call no other code. Other
# dtypes (strings, objects, records) and NumPy arrays stay refused.
_NUMBER_CODES = np.typecodes["AllInteger"] + np.typecodes["AllFloat"] + "?"
_SCALAR = np.float64(0).__reduce__()[0]
# NumPy 1.x pickled the scalar maker as numpy.core.multiarray.scalar (NumPy 2: numpy._core...):
# most training checkpoints were written under NumPy 1
_SAFE_GLOBALS = [argparse.Namespace, _SCALAR, (_SCALAR, "numpy.core.multiarray.scalar"), np.dtype,
                 *{type(np.dtype(code)) for code in _NUMBER_CODES}]


def _read_torch(p: Path) -> Any:
    try:
        with torch.serialization.safe_globals(_SAFE_GLOBALS), warnings.catch_warnings():
            # torch's second line before the error below, for a plain pickle.dump file
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            return torch.load(p, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        # torch names a refused class "Unsupported global: GLOBAL x.Y", a blocked module's
        # function (os.system) "unsupported GLOBAL posix.system whose module posix is blocked",
        # and the class of an object it would rebuild (a NumPy string's dtype) "but got <class 'x.Y'>"
        refused = re.search(r"unsupported (?:global: )?GLOBAL (\S+)|but got <class '([^']+)'>", str(e),
                            re.IGNORECASE)
        if refused is None:
            raise PretrainReuseError(f"weights file {str(p)!r} is not a readable torch file (not a "
                                     "torch.save archive); re-download or re-save it") from None
        raise PretrainReuseError(
            f"weights file {str(p)!r} holds a pickled {refused[1] or refused[2]} object, which "
            "torch.load(weights_only=True) refuses to run; re-save only the tensors: "
            "torch.save(model.state_dict(), path) or a .safetensors file") from None
    except (RuntimeError, EOFError, OSError, zipfile.BadZipFile, ValueError, IndexError) as e:
        # an empty or cut-short file raises EOFError without a message (an old-format one cut
        # short, IndexError)
        reason = (re.split(r"\.\s|\n", str(e).strip())[0][:200] if not isinstance(e, EOFError)
                  else "the file is empty" if p.stat().st_size == 0 else "the file ends early")
        raise PretrainReuseError(f"weights file {str(p)!r} is not a readable torch file "
                                 f"({reason}); re-download or re-save it") from None


def _unwrap(obj: Any, p: Path) -> dict[str, torch.Tensor]:
    """The state dict inside a checkpoint: ``obj``, ``obj["state_dict"]`` or ``obj["model"]``."""
    for key in ("state_dict", "model"):
        if isinstance(obj, Mapping) and isinstance(obj.get(key), Mapping):
            obj = obj[key]
            break
    if not isinstance(obj, Mapping) or not obj:
        raise PretrainReuseError(f"weights file {str(p)!r} holds {type(obj).__name__}, not a state dict "
                                 "(a mapping of parameter names to tensors)")
    bad = [k for k, v in obj.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise PretrainReuseError(
            f"weights file {str(p)!r}: entries {bad[:_SHOWN]} are not tensors; pass a state dict, "
            "or a checkpoint with the state dict under 'state_dict' or 'model'")
    return dict(obj)


def map_keys(state: Mapping[str, torch.Tensor], key_map: Mapping[str, str] | None
             ) -> dict[str, torch.Tensor]:
    """Rename checkpoint keys: strip :data:`WRAPPER_PREFIXES`, or apply ``key_map`` instead."""
    if key_map is None:
        return {_strip_wrappers(k): v for k, v in state.items()}
    return {_rename(k, key_map): v for k, v in state.items()}


def strip_outer_prefix(state: Mapping[str, torch.Tensor], expected: Collection[str], path: str
                       ) -> dict[str, torch.Tensor]:
    """``state`` with one outer prefix stripped from the keys that carry it, when none of its
    keys is a key of the model (``expected``) but some are once stripped: a Lightning module's
    ``model.``, any wrapper's attribute name. The prefix is the part before a model key at the
    end of a file key; a file with two such prefixes (a student and a teacher, a model and its
    EMA copy) is refused, as either could be meant. Otherwise ``state`` as it is (the load then
    names the mismatch)."""
    if any(k in expected for k in state):
        return dict(state)
    prefixes = {have[:-len(want)] for have in state for want in expected if have.endswith("." + want)}
    # each prefix by the model keys it gives; a key that ends in a shorter model key ("1.0.weight"
    # in "model.1.0.weight") suggests a longer prefix that gives fewer
    gives = {p: sum(k.startswith(p) and k[len(p):] in expected for k in state) for p in prefixes}
    best = sorted(p for p, n in gives.items() if n == max(gives.values(), default=0))
    if len(best) > 1:
        raise PretrainReuseError(
            f"weights file {path!r} holds the model's keys under several prefixes "
            f"({', '.join(map(repr, best[:_SHOWN]))}); pick one in Python with "
            f"create_backbone(..., key_map={{{best[0]!r}: ''}}), or save that copy alone")
    if not best:
        return dict(state)
    return {k[len(best[0]):] if k.startswith(best[0]) else k: v for k, v in state.items()}


def _strip_wrappers(key: str) -> str:
    # Terminates: every step shortens the key.
    while key.startswith(WRAPPER_PREFIXES):
        key = key[len(next(p for p in WRAPPER_PREFIXES if key.startswith(p))):]
    return key


def _rename(key: str, key_map: Mapping[str, str]) -> str:
    for old, new in key_map.items():
        if key.startswith(old):
            return new + key[len(old):]
    return key


def split_head(state: Mapping[str, torch.Tensor], head_name: str, owned: Collection[str]
               ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(body keys, head keys relative to ``head_name``) of a mapped state dict.

    Keys the body itself ``owned`` stay in the body even under ``head_name`` (a model without a
    classifier may have its own module called ``head``).
    """
    prefix = head_name + "."
    is_head = {k: k.startswith(prefix) and k not in owned for k in state}
    head = {k[len(prefix):]: v for k, v in state.items() if is_head[k]}
    body = {k: v for k, v in state.items() if not is_head[k]}
    return body, head


def head_from_state(head_state: Mapping[str, torch.Tensor], head_name: str, path: str) -> nn.Module:
    """Rebuild a head from its weights: one ``Linear``, or an MLP of Linears with ReLU between.

    ``{weight, bias}`` is a classifier ``Linear(in, out)``; ``{0.weight, 0.bias, 2.weight,
    2.bias}`` is MoCo-v2's projection head ``Sequential(Linear, ReLU, Linear)`` (a gap in the
    indices is a ReLU). The output size follows the file, so a checkpoint with 37 classes or a
    128-d projection loads into a model built for 1000 classes.
    """
    if set(head_state) in ({"weight", "bias"}, {"weight"}) and head_state["weight"].dim() == 2:
        return _linear(head_state, "")
    index = sorted(int(k.split(".")[0]) for k in head_state if re.fullmatch(r"\d+\.weight", k))
    allowed = {f"{i}.{kind}" for i in index for kind in ("weight", "bias")}
    odd = [k for k in head_state
           if k not in allowed or head_state[k].dim() != (2 if k.endswith("weight") else 1)]
    if odd or not index or index[0] != 0:
        k = (odd or list(head_state))[0]
        raise PretrainReuseError(
            f"weights file {path!r}: head {head_name!r} has key {head_name}.{k} "
            f"{tuple(head_state[k].shape)}; only a Linear or an MLP of Linear+ReLU layers can be "
            "rebuilt; pass key_map to rename it away, or a file without that head")
    layers = [_linear(head_state, f"{i}.") if i in index else nn.ReLU() for i in range(index[-1] + 1)]
    for a, b in itertools.pairwise(m for m in layers if isinstance(m, nn.Linear)):
        if a.out_features != b.in_features:
            raise PretrainReuseError(f"weights file {path!r}: head {head_name!r} layers do not chain "
                                     f"({a.out_features} outputs into {b.in_features} inputs)")
    return nn.Sequential(*layers)


def _linear(state: Mapping[str, torch.Tensor], prefix: str) -> nn.Linear:
    w = state[prefix + "weight"]
    layer = nn.Linear(w.shape[1], w.shape[0], bias=prefix + "bias" in state)
    layer.load_state_dict({k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)})
    return layer


def load_body(model: nn.Module, state: Mapping[str, torch.Tensor], path: str, name: str
              ) -> tuple[int, tuple[str, ...]]:
    """Copy ``state`` into ``model``; return (tensors loaded, ignored file keys).

    Every model key must be in the file with the same shape (BatchNorm's ``num_batches_tracked``
    counters may be absent, as in older torchvision checkpoints).
    """
    expected = model.state_dict()
    matched = [k for k in state if k in expected]
    if not matched:
        raise PretrainReuseError(
            f"weights file {path!r} does not fit {name}: none of its {len(state)} keys is a key of the "
            f"model (file: {_first(state)}; model: {_first(expected)})" + _suggest_key_map(state, expected))
    wrong = [f"{k} {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}"
             for k in matched if state[k].shape != expected[k].shape]
    missing = [k for k in expected if k not in state and not k.endswith("num_batches_tracked")]
    if wrong:
        # keys on one side only as well: the file is of another architecture (a resnet18 file
        # for resnet10t), not a model with one layer resized
        other = [f"{len(missing)} of the model's keys are not in the file"] if missing else []
        other += [f"{len(state) - len(matched)} of the file's are not in the model"] \
            if len(state) > len(matched) else []
        raise PretrainReuseError(
            f"weights file {path!r} does not fit {name}: {len(wrong)} shape mismatch(es): "
            f"{'; '.join(wrong[:_SHOWN])}" + (f"; {' and '.join(other)}" if other else "")
            + "; check the architecture (the file may be of another --model)")
    if missing:
        raise PretrainReuseError(
            f"weights file {path!r} does not fit {name}: it lacks {len(missing)} of the model's keys "
            f"(first: {missing[:_SHOWN]}); check the architecture")
    layers = _layers_lacking(model, [k for k in state if k not in expected])
    if layers:
        # a deeper architecture's file (resnet34's for resnet18) holds every key of the model
        # with its shape, and more blocks: loading its first blocks would give features of
        # neither network, without a word
        raise PretrainReuseError(
            f"weights file {path!r} does not fit {name}: {len(layers)} of its keys are layers the "
            f"model lacks (first: {layers[:_SHOWN]}): weights of another architecture; pass the "
            "--model they were saved from")
    model.load_state_dict({k: state[k] for k in matched}, strict=False)
    return len(matched), tuple(sorted(set(state) - set(expected)))


def _layers_lacking(model: nn.Module, ignored: list[str]) -> list[str]:
    """The file keys of ``ignored`` (keys ``model`` has no tensor for) that number a layer past
    the end of one of the model's numbered containers (``layer1.2.conv1.weight`` where the
    model's ``layer1`` is a Sequential of 2 blocks; ``encoder.layer.4.*`` of a 4-layer BERT):
    a deeper network's blocks. Other keys the model lacks are what checkpoints hold beside a
    model (MoCo's ``encoder_k.*`` and ``queue``, an EMA copy, a pre-training head), a layer its
    library no longer builds (an old RoBERTa file's pooler, an old GPT-2's attention masks) or a
    head under a name the model does not use."""
    modules = dict(model.named_modules())
    lacking = []
    for key in ignored:
        path = key.split(".")[:-1]
        # the deepest module of the model on the key's path, and the name that follows it
        depth = max(d for d in range(len(path) + 1) if ".".join(path[:d]) in modules)
        container = modules[".".join(path[:depth])]
        if depth < len(path) and path[depth].isdigit() \
                and isinstance(container, (nn.Sequential, nn.ModuleList)):
            lacking.append(key)
    return lacking


def _first(keys: Mapping[str, Any]) -> list[str]:
    return list(keys)[:_SHOWN]


def _suggest_key_map(state: Mapping[str, Any], expected: Mapping[str, Any]) -> str:
    """A hint like ``key_map={'backbone.': ''}`` when the file's keys are the model's, prefixed."""
    for want in expected:
        for have in state:
            if have.endswith("." + want):
                prefix = have[:-len(want)]
                return (f"; its keys carry the prefix {prefix!r}: strip it from the file, or load "
                        f"it in Python with create_backbone(..., key_map={{{prefix!r}: ''}})")
    return ("; check the architecture, or map the file's key prefixes in Python with "
            "create_backbone(..., key_map={old_prefix: new_prefix})")


def state_hash(model: nn.Module) -> str:
    """Hash of a model's parameters and buffers (names, dtypes, shapes and values): what the
    network computes with, wherever its weights came from (a file, a Hugging Face folder, code)."""
    if not isinstance(model, nn.Module):
        raise PretrainReuseError(f"state_hash takes a torch module, got {type(model).__name__}; "
                                 "load a model with pretrain_reuse.models.create_backbone")
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name} {t.dtype} {tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy())
    return "sha256:" + h.hexdigest()[:16]


def features_hash(backbone: Backbone, layer: str | None = None) -> str:
    """:func:`state_hash` of the parameters that compute ``backbone.features`` (or, given, the
    features of ``layer``): the body's alone for the ``penultimate`` layer, whose features the
    head on top (a classifier, a projection) does not touch, so one body with two heads, or saved
    without one, hashes the same; body and head for the ``head`` and ``logits`` layers. What
    ``embed`` records as a store's network."""
    from .backbone import Backbone  # backbone.py imports this module

    if not isinstance(backbone, Backbone):
        raise PretrainReuseError(f"features_hash takes a Backbone, got {type(backbone).__name__}; "
                                 "load a model with pretrain_reuse.models.create_backbone")
    layer = backbone.layer if layer is None else layer
    return state_hash(backbone.body if layer == "penultimate" else backbone)


def weights_hash(path: str | Path) -> str:
    """Content hash of a weights file: of a ``.safetensors`` file its tensors (names, dtypes,
    shapes, bytes) without the header's metadata, which records when and from what the file was
    written (:func:`save_backbone`'s ``meta``), so the same weights saved again hash the same;
    of any other file (or a ``.safetensors`` one whose header cannot be read) its bytes."""
    p = Path(path)
    if p.suffix.lower() != ".safetensors":
        return hash_file(p)
    with open(p, "rb") as fh:
        # the format: an 8-byte little-endian header length, the JSON header, the data; a length
        # beyond the file (a renamed .pt, a text file) is no header, and reading it would ask
        # for exabytes
        length = int.from_bytes(fh.read(8), "little")
        if length > p.stat().st_size - 8:
            return hash_file(p)
        try:
            header = json.loads(fh.read(length))
            header.pop("__metadata__", None)
        except (ValueError, AttributeError):  # not JSON, or not a mapping: loading will say so
            return hash_file(p)
        h = hashlib.sha256(json.dumps(header, sort_keys=True).encode())
        for block in iter(lambda: fh.read(1 << 24), b""):
            h.update(block)
    return "sha256:" + h.hexdigest()[:16]


def save_backbone(backbone: Backbone, path: str | Path, meta: Mapping[str, Any] | None = None) -> Path:
    """Write a :class:`~pretrain_reuse.models.Backbone` as ``.safetensors``, atomically.

    Tensors keep the original model's key names (body keys, head keys under the head's name), so
    ``create_backbone(backbone.spec.name, weights=path)`` loads them back. The header holds
    ``kind="backbone"``, the spec (its preprocessing travels with the weights) and ``meta`` (a
    mapping of JSON values; None: empty). An existing file at ``path`` is replaced only if it
    is a backbone too: units, interactions or another program's weights are refused.
    """
    from .backbone import Backbone  # backbone.py imports this module

    if not isinstance(backbone, Backbone):
        raise PretrainReuseError(
            f"save_backbone takes a Backbone, got {type(backbone).__name__}; build the model with "
            "pretrain_reuse.models.create_backbone, or save another module's state_dict with "
            "safetensors.torch.save_file")
    meta = {} if meta is None else meta
    if not isinstance(meta, Mapping):
        raise PretrainReuseError(f"meta must be a mapping (a dict of JSON values) or None, got "
                                 f"{type(meta).__name__}")
    path = check_output_file(path, ".safetensors", "backbone")
    # Clones: safetensors refuses tensors that share storage (tied weights).
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in backbone.body.state_dict().items()}
    if backbone.head is not None:
        tensors.update({f"{backbone.head_name}.{k}": v.detach().to("cpu").contiguous().clone()
                        for k, v in backbone.head.state_dict().items()})
    header = {"kind": "backbone", "spec": backbone.spec.to_json(), "meta": json.dumps(dict(meta))}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=header)
    return path


# the readers of what ``finetune`` records in the weights files it writes (``save_backbone``'s
# ``meta``), for every command that is given such a file

def weights_path(model: Backbone) -> Path | None:
    """The weights file ``model`` was loaded from; None when its weights come from elsewhere."""
    report = model.load_report
    return Path(report.path) if report is not None and Path(report.path).is_file() else None


def weights_meta(path: Path) -> dict[str, Any]:
    """The ``meta`` a ``.safetensors`` weights file records (a fine-tuned model: the run's
    ``params``, with its ``mode``; a fine-tuning snapshot: its ``step`` and ``run``); empty for
    other files and for a header without a readable meta."""
    if path.suffix.lower() != ".safetensors":
        return {}
    try:
        meta = json.loads((safetensors_header(path) or {}).get("meta", "{}"))
    except ValueError:
        return {}
    return meta if isinstance(meta, dict) else {}


def _model_meta(model_or_path: Backbone | Path | None) -> dict[str, Any]:
    """:func:`weights_meta` of a model's weights file or of a path; empty when there is none."""
    path = (model_or_path if isinstance(model_or_path, Path) or model_or_path is None
            else weights_path(model_or_path))
    return weights_meta(path) if path is not None and path.is_file() else {}


def trained_class_names(model_or_path: Backbone | Path | None) -> list[str] | None:
    """The class names of the data a ``finetune`` model was trained on (output i names class
    i), as it records them in its weights file; None for other models and older files."""
    names = _model_meta(model_or_path).get("inputs", {}).get("class_names")
    try:
        names = json.loads(names) if isinstance(names, str) else None
    except ValueError:
        return None
    return names if isinstance(names, list) and all(isinstance(n, str) for n in names) else None


def model_class_names(model: Backbone) -> list[str] | None:
    """The class names of a Hugging Face classifier's config (``id2label``: name of class i),
    None when they are transformers' defaults (LABEL_0, LABEL_1, ...), which name nothing, when
    the model has no such config, or when they do not name every output of its head (a head
    loaded from other weights)."""
    id2label = getattr(getattr(model.body, "config", None), "id2label", None)
    if not id2label or model.num_classes is None:
        return None
    names = [id2label.get(i) for i in range(model.num_classes)]
    if any(not isinstance(name, str) for name in names) or len(id2label) != model.num_classes:
        return None
    return None if names == [f"LABEL_{i}" for i in range(len(names))] else names


def output_class_names(model: Backbone, data_names: Collection[str] | None) -> list[str] | None:
    """The names of ``model``'s outputs to match the classes ``data_names`` of some data by: the
    classes a ``finetune`` model was trained on (:func:`trained_class_names`), else its Hugging
    Face ``id2label`` (:func:`model_class_names`) when it names one of the data's classes at
    least; None when the outputs can only be matched by position. The second condition keeps an
    ImageNet classifier whose config names "tench, Tinca tinca" usable on a folder of WordNet
    ids (n01440764), which sort in its output order."""
    trained = trained_class_names(model)
    if trained is not None:
        return trained
    names = model_class_names(model)
    return names if names is not None and set(names) & set(data_names or ()) else None


def finetune_mode(model_or_path: Backbone | Path | None) -> str | None:
    """The mode (``finetune --mode``) a ``finetune`` model was trained in, as it records it in
    its weights file; None for other models and files."""
    meta = _model_meta(model_or_path)
    mode = meta.get("params", {}).get("mode") if meta.get("producer") == "finetune" else None
    return mode if isinstance(mode, str) else None
