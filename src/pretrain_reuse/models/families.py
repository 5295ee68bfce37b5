"""Resolvers for the name prefixes ``timm:``, ``torchvision:``, ``hf:`` and ``python:``.

Each turns the rest of the name into :class:`~pretrain_reuse.models.backbone.ModelParts`: the model
with randomly initialised weights (weights come later, from a local file) and the preprocessing read
from the model's own configuration. Nothing is downloaded: timm and torchvision models are built
with ``pretrained=False`` / ``weights=None``; Hugging Face models load with ``local_files_only``.
"""

from __future__ import annotations

import difflib
import importlib
import importlib.util
import pickle
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from types import ModuleType
from typing import Any, TypeVar

import torch
from torch import nn

from ..artifacts import read_json
from ..errors import PretrainReuseError, preview
from .backbone import ModelParts, call_body, first_linear, last_linear_name
from .spec import BackboneSpec, spec_from_hf_image_processor, spec_from_timm, spec_from_torchvision

TIMM_EXTRA = "pip install 'pretrain-reuse[timm]'"
TORCHVISION_EXTRA = "pip install 'pretrain-reuse[torchvision]'"
HF_EXTRA = "pip install 'pretrain-reuse[hf]'"

T = TypeVar("T")


def require(module: str, what: str, install: str) -> ModuleType:
    """Import ``module`` or explain which pip install provides it."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise PretrainReuseError(f"{what} needs the Python package {module!r}, which is not "
                                 f"installed ({e}); {install}") from None


def _unknown(what: str, name: str, choices: list[str], listing: str) -> PretrainReuseError:
    close = difflib.get_close_matches(name, choices, n=3)
    hint = f" (closest: {', '.join(map(repr, close))})" if close else ""
    return PretrainReuseError(f"{what} has no model {name!r}{hint}; list them with {listing}")


# --- timm -------------------------------------------------------------------------------------

def timm_parts(arch: str, weights: str | Path | None) -> ModelParts:
    """``timm:<arch>[.<tag>]``: ``timm.create_model(arch, pretrained=False)``; preprocessing from
    ``timm.data.resolve_model_data_config`` (a pretrained tag selects that tag's config)."""
    timm = require("timm", f"timm:{arch}", TIMM_EXTRA)
    if not timm.is_model(arch.partition(".")[0]):
        raise _unknown("timm", arch, timm.list_models(), "timm.list_models('pattern*')")
    try:
        model = timm.create_model(arch, pretrained=False)
    except RuntimeError as e:  # timm's error for an unknown pretrained tag
        raise PretrainReuseError(f"timm:{arch}: {e}; list tags with "
                                 "timm.list_pretrained('arch.*')") from None
    head_name = model.pretrained_cfg.get("classifier") if model.num_classes else None
    if head_name is not None and not isinstance(head_name, str):
        raise PretrainReuseError(f"timm:{arch} has several classifiers {head_name}; "
                                 "distilled two-head models are not supported")
    head = model.get_submodule(head_name) if head_name else None
    dim = head.in_features if isinstance(head, nn.Linear) else model.num_features
    spec = spec_from_timm(f"timm:{arch}", timm.data.resolve_model_data_config(model))
    return ModelParts(model, spec, head_name, dim, call_body)


# --- torchvision ------------------------------------------------------------------------------

def torchvision_parts(arch: str, weights: str | Path | None) -> ModelParts:
    """``torchvision:<arch>``: ``torchvision.models.get_model(arch, weights=None)``.

    Preprocessing comes from the arch's weights enum, read without downloading: the entry whose
    file name equals the weights file's (so ``resnet50-0676ba61.pth`` gets IMAGENET1K_V1's resize
    256, not V2's 232), else ``DEFAULT``; ImageNet defaults when the arch has no weights enum.
    """
    tvm = require("torchvision.models", f"torchvision:{arch}", TORCHVISION_EXTRA)
    choices = tvm.list_models(module=tvm)
    if arch not in choices:
        raise _unknown("torchvision.models", arch, choices, "torchvision.models.list_models()")
    model = tvm.get_model(arch, weights=None)
    head_name = last_linear_name(model)
    spec = _torchvision_spec(tvm, arch, weights)
    dim = first_linear(model.get_submodule(head_name)).in_features
    return ModelParts(model, spec, head_name, dim, call_body)


def _torchvision_spec(tvm: ModuleType, arch: str, weights: str | Path | None) -> BackboneSpec:
    name = f"torchvision:{arch}"
    try:
        entries = tvm.get_model_weights(arch)
    except (ValueError, KeyError):  # an arch without pretrained weights
        return BackboneSpec(name=name)
    file = Path(weights).name if weights is not None else None
    entry = next((w for w in entries if Path(w.url).name == file), entries.DEFAULT)
    return spec_from_torchvision(name, entry.transforms())


# --- Hugging Face -----------------------------------------------------------------------------

def hf_parts(ident: str, weights: str | Path | None) -> ModelParts:
    """``hf:<folder or cached id>``: transformers, offline (``local_files_only=True``).

    A folder with an image processor config is an image model, loaded with
    ``AutoModelForImageClassification``: penultimate = the classifier's input (ViT: the final
    layer-normed CLS token; ResNet/ConvNeXt: the pooled features); the head is the classifier when
    the folder has its weights. A folder with a tokenizer is a text model; see
    :func:`hf_text_parts`. A folder whose files are missing, unreadable or do not fit together is
    a one-line error naming it.
    """
    transformers = require("transformers", f"hf:{ident}", HF_EXTRA)
    name = f"hf:{ident}"
    config, proc = _hf_config_and_image_processor(transformers, ident, name)
    if proc is None:
        return hf_text_parts(ident, name)
    return _hf_image_parts(transformers, ident, name, config, proc)


def hf_modality(ident: str) -> str:
    """``image`` or ``text``: the model :func:`hf_parts` builds from ``hf:<ident>``, told by its
    configuration files alone (no weights are read)."""
    transformers = require("transformers", f"hf:{ident}", HF_EXTRA)
    _, proc = _hf_config_and_image_processor(transformers, ident, f"hf:{ident}")
    return "text" if proc is None else "image"


def _hf_config_and_image_processor(transformers: ModuleType, ident: str,
                                   name: str) -> tuple[Any, Any | None]:
    """The model's config and image processor; None for the processor of a text model (one
    without an image processor config). A missing or broken file is one line."""
    folder = Path(ident)
    problem = ("no local folder or cached copy with a config.json" if not folder.is_dir() else
               f"the folder {ident!r} has no config.json" if not (folder / "config.json").is_file()
               else f"the folder {ident!r} has an invalid config.json")
    config = _hf_load(lambda: transformers.AutoConfig.from_pretrained(ident, local_files_only=True),
                      name, problem,
                      "nothing is downloaded at run time: pass a folder written by save_pretrained")
    try:
        return config, transformers.AutoImageProcessor.from_pretrained(ident, local_files_only=True)
    except _hf_errors() as e:
        if (folder / "preprocessor_config.json").is_file():
            # an image model whose processor is broken, not a text model without a tokenizer
            raise PretrainReuseError(
                f"{name}: the folder's preprocessor_config.json is invalid ({_reason(e)}); save the "
                "image processor there again (image_processor.save_pretrained(dir))") from None
        return config, None


def _hf_errors() -> tuple[type[Exception], ...]:
    """What transformers raises for a folder whose files are missing, unreadable or do not fit
    together: OSError (a missing file), ValueError (invalid JSON, an unknown model type),
    SafetensorError (truncated weights), UnpicklingError (a pytorch_model.bin that is not a plain
    state dict), RuntimeError (weights whose shapes are not config.json's) and, from
    huggingface_hub 1.0 (transformers 5), StrictDataclassError (a config value of the wrong type)."""
    from safetensors import SafetensorError

    errors = (OSError, ValueError, RuntimeError, SafetensorError, pickle.UnpicklingError)
    try:
        from huggingface_hub.errors import StrictDataclassError
    except ImportError:  # an older huggingface_hub, which does not validate config values
        return errors
    return (*errors, StrictDataclassError)


def _reason(e: Exception) -> str:
    """transformers' reason on one line, shortened; not an UnpicklingError's, which is torch's
    advice to load the file unsafely."""
    if isinstance(e, pickle.UnpicklingError):
        return "a weights file that is not a plain tensor state dict"
    text = " ".join(str(e).split())
    return text if len(text) <= 200 else text[:200] + "..."


def _hf_load(load: Callable[[], T], name: str, problem: str, fix: str) -> T:
    """``load()`` (a transformers ``from_pretrained``), its failures on the folder's files turned
    into one line: ``name``, the ``problem``, transformers' reason and the ``fix``."""
    try:
        return load()
    except _hf_errors() as e:
        raise PretrainReuseError(f"{name}: {problem} ({_reason(e)}); {fix}") from None


#: The weights files transformers' ``from_pretrained`` reads from a folder.
HF_WEIGHTS_FILES = ("model.safetensors", "pytorch_model.bin")


def hf_checkpoint_state(model: nn.Module, state: Mapping[str, torch.Tensor], path: str | Path,
                        name: str) -> Mapping[str, torch.Tensor]:
    """``state``, read from ``path``, under the names the transformers model ``model`` has.

    transformers renames a checkpoint's keys when it loads one (version 5 names ViT's
    ``attention.attention.query`` ``attention.q_proj``), so the ``model.safetensors`` that
    ``save_pretrained`` writes may not fit the model as built. When the file's keys lack some of
    the model's and the file is the weights file of a ``save_pretrained`` folder (a config.json
    beside it), the folder is loaded by ``from_pretrained`` and its parameters are taken
    instead; any other ``state`` is returned as it is, for the usual checks. A classifier's
    folder (a ``*ForSequenceClassification`` trained with transformers' ``Trainer``) for a base
    model is refused: its classifier would be dropped (a pre-training folder's heads, such as
    BERT's masked-language-model head, are not the model's, and are left out)."""
    path = Path(path)
    transformers = sys.modules.get("transformers")  # imported if model is one of its models
    if (transformers is None or not isinstance(model, transformers.PreTrainedModel)
            or set(model.state_dict()) <= set(state) or path.name not in HF_WEIGHTS_FILES
            or not (path.parent / "config.json").is_file()):
        return state
    loaded, info = _hf_model(type(model), str(path.parent), name)
    classifier = [a for a in loaded.config.architectures or []
                  if a.endswith("ForSequenceClassification")]
    dropped = sorted(info["unexpected_keys"])
    if classifier and dropped:
        # the base model's features (the mean-pooled hidden states of a text encoder) are not
        # the classifier's input (BERT's [CLS] pooler): its head cannot be put on them
        raise PretrainReuseError(
            f"weights file {str(path)!r} is a {classifier[0]}'s (its folder's config.json), whose "
            f"classifier ({preview(dropped)}) does not fit {name}, a model without "
            f"that head; pass --model hf:{path.parent} to use it with its classifier (then "
            "give the other models as weights of that folder's architecture), or save its base "
            "model alone (model.base_model.save_pretrained(dir)) for this model's features")
    # what the folder lacks (a base model's folder for a classifier: its head) is not taken from
    # the random initialisation: the usual checks then see a file without a head, or refuse one
    # that lacks some of the body
    return {k: v for k, v in loaded.state_dict().items() if k not in info["missing_keys"]}


def _hf_model(auto_class: Any, folder: str, name: str) -> tuple[Any, dict]:
    """``auto_class.from_pretrained(folder)`` offline, and its loading info (missing keys, ...);
    missing or corrupt weights, or weights that do not fit config.json, are one line naming the
    folder (transformers' multi-line load report, which a base model without its classifier
    also prints, is not shown: that case is handled by the callers), nor is its bar over the
    weights read (a local folder: drawn even under --quiet)."""
    from transformers.utils import logging as hf_logging

    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        model, info = _hf_load(
            lambda: auto_class.from_pretrained(folder, local_files_only=True,
                                               ignore_mismatched_sizes=True, output_loading_info=True),
            name, f"cannot load the model in {folder!r}", _HF_SAVE)
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()
    if info["mismatched_keys"]:
        key, in_file, in_config = sorted(info["mismatched_keys"])[0][:3]
        raise PretrainReuseError(
            f"{name}: the weights in {folder!r} do not fit its config.json ({key} has shape "
            f"{list(in_file)} in the weights, {list(in_config)} by the config); {_HF_SAVE}")
    return model, info


_HF_SAVE = "pass a folder written by model.save_pretrained(dir) (config.json and model.safetensors)"


def _refuse_missing(info: dict, allowed: tuple[str, ...], folder: str, name: str) -> None:
    """Weights the folder lacks, other than those under ``allowed`` (a classifier that may be
    absent, a text model's unused pooler), would start random: refused, not used silently."""
    missing = sorted(k for k in info["missing_keys"] if not k.startswith(allowed))
    if missing:
        raise PretrainReuseError(
            f"{name}: the weights in {folder!r} lack {missing[0]} ({len(missing)} tensors in all), "
            f"which would start random; {_HF_SAVE}")


def _hf_image_parts(transformers: ModuleType, ident: str, name: str, config: Any,
                    proc: Any) -> ModelParts:
    if type(config) not in transformers.MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING:
        raise PretrainReuseError(f"{name}: transformers has no image-classification model for "
                                 f"its model type {config.model_type!r}")
    model, info = _hf_model(transformers.AutoModelForImageClassification, ident, name)
    model = model.float()  # features in float32; callers use autocast for bf16
    head_name = last_linear_name(model)
    _refuse_missing(info, (head_name + ".",), ident, name)
    dim = first_linear(model.get_submodule(head_name)).in_features
    if any(k.startswith(head_name + ".") for k in info["missing_keys"]):
        # The folder holds a base model: its classifier would be random, so there is no head.
        model.set_submodule(head_name, nn.Identity())
        head_name = None
    return ModelParts(model, spec_from_hf_image_processor(name, proc), head_name, dim, hf_image_features)


def hf_image_features(body: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Penultimate features of a transformers image classifier whose classifier is Identity."""
    return body(pixel_values=x).logits


def hf_text_parts(folder: str, name: str) -> ModelParts:
    """A transformers text model (with ``AutoTokenizer``) pooled to one vector.

    A folder saved from a ``*ForSequenceClassification`` model with its trained classifier (BERT,
    DistilBERT, RoBERTa fine-tuned on SST-2, ...) keeps it, as image classifiers do: the last
    ``Linear`` is the head, everything before it (the encoder, BERT's pooler over the [CLS]
    token, DistilBERT's pre-classifier) the body, so ``backbone(batch)`` gives the model's own
    logits and the penultimate layer is the classifier's input. Any other folder is an encoder
    (``AutoModel``): pooling and maximum length follow its sentence-transformers files when present
    (``1_Pooling/config.json``: mean or CLS token; ``sentence_bert_config.json``:
    ``max_seq_length``); otherwise mean pooling over non-padding tokens and the tokenizer's limit
    (at most the model's position embeddings). No L2 normalisation is applied.
    """
    transformers = require("transformers", name, HF_EXTRA)
    tokenizer = _hf_load(
        lambda: transformers.AutoTokenizer.from_pretrained(folder, local_files_only=True), name,
        "the folder has neither an image processor config nor a readable tokenizer",
        "save one next to the model (image_processor.save_pretrained(dir) or "
        "tokenizer.save_pretrained(dir))")
    # batches are padded on the right whatever the tokenizer says: models that number positions
    # from the first column (GPT-2) would otherwise see each sentence shifted by its batch's
    # padding, and the first token, which CLS pooling reads, would be a pad
    tokenizer.padding_side = "right"
    if tokenizer.pad_token is None:
        raise PretrainReuseError(
            f"{name}: the tokenizer in {folder!r} has no padding token, which batches of sentences "
            "need; give it one and save it again (tokenizer.pad_token = tokenizer.eos_token; "
            "model.config.pad_token_id = tokenizer.pad_token_id; save_pretrained)")
    classifier = _hf_sequence_classifier_parts(transformers, folder, name, tokenizer)
    if classifier is not None:
        return classifier
    pooling_cfg = _read_json(Path(folder) / "1_Pooling" / "config.json", name)
    st_cfg = _read_json(Path(folder) / "sentence_bert_config.json", name)
    model, info = _hf_model(transformers.AutoModel, folder, name)
    _refuse_missing(info, ("pooler.",), folder, name)  # pooling reads the hidden states
    _check_tokenizer(tokenizer, model, folder, name)
    model = model.float()
    pooling = "cls" if pooling_cfg.get("pooling_mode_cls_token") else "mean"
    spec = BackboneSpec(name=name, modality="text", input_size=None, resize_size=None, mean=None,
                        std=None, interpolation=None,
                        max_length=int(st_cfg.get("max_seq_length", _max_length(tokenizer, model))),
                        pooling=pooling)
    extract = hf_text_mean if pooling == "mean" else hf_text_cls
    return ModelParts(model, spec, None, model.config.hidden_size, extract, tokenizer=tokenizer)


def _hf_sequence_classifier_parts(transformers: ModuleType, folder: str, name: str,
                                  tokenizer: Any) -> ModelParts | None:
    """The folder's ``*ForSequenceClassification`` model with its classifier as the head; None
    when the folder holds another model, or no trained classifier (it would be random)."""
    config = transformers.AutoConfig.from_pretrained(folder, local_files_only=True)
    if not any(a.endswith("ForSequenceClassification") for a in config.architectures or []):
        return None
    model, info = _hf_model(transformers.AutoModelForSequenceClassification, folder, name)
    head_name = last_linear_name(model)
    if any(k.startswith(head_name + ".") for k in info["missing_keys"]):
        return None
    _refuse_missing(info, (), folder, name)
    _check_tokenizer(tokenizer, model, folder, name)
    if model.config.pad_token_id is None:
        # a decoder's classifier (GPT-2's) reads the last token before the first pad, and
        # refuses batches without knowing the pad
        model.config.pad_token_id = tokenizer.pad_token_id
    spec = BackboneSpec(name=name, modality="text", input_size=None, resize_size=None, mean=None,
                        std=None, interpolation=None, max_length=_max_length(tokenizer, model),
                        pooling="cls")
    dim = first_linear(model.get_submodule(head_name)).in_features
    return ModelParts(model.float(), spec, head_name, dim, hf_sequence_features, tokenizer=tokenizer)


def _check_tokenizer(tokenizer: Any, model: nn.Module, folder: str, name: str) -> None:
    """The tokenizer fits the model: it has a vocabulary (transformers builds a tokenizer of the
    special tokens alone from a folder without tokenizer files, which reads every word as
    [UNK] and trains on nothing, with exit 0), and no token id beyond the model's embedding table
    (an IndexError traceback in the middle of a run)."""
    special = len(set(tokenizer.all_special_ids))
    if len(tokenizer) <= special:
        raise PretrainReuseError(
            f"{name}: the tokenizer in {folder!r} holds its {special} special tokens only, no "
            "vocabulary: its files (tokenizer.json, vocab.txt, ...) are missing, and every word "
            "would read as unknown; save the model's tokenizer into the folder "
            "(tokenizer.save_pretrained(dir))")
    rows = model.get_input_embeddings().num_embeddings
    if len(tokenizer) > rows:
        raise PretrainReuseError(
            f"{name}: the tokenizer in {folder!r} has {len(tokenizer)} tokens but the model embeds "
            f"{rows}; save the tokenizer the model was trained with, or resize the model's "
            "embeddings (model.resize_token_embeddings(len(tokenizer))) and train it")


def _max_length(tokenizer: Any, model: nn.Module) -> int:
    """The tokenizer's limit, at most the positions the model can embed: its position embeddings,
    less the first ``padding_idx + 1`` where positions start after the pad index."""
    positions = getattr(model.config, "max_position_embeddings", 512) - _position_offset(model)
    return int(min(tokenizer.model_max_length, positions))


def _position_offset(model: nn.Module) -> int:
    """``padding_idx + 1`` for the models whose position ids count on from the pad index (fairseq's
    ``make_positions``: RoBERTa, XLM-R, CamemBERT, Longformer, MPNet, ESM, ...), else 0.

    They are known by their ``position_embeddings`` table, not a list of model types: only these
    give it a ``padding_idx`` (the position of a pad token), as their position ids come from the
    input ids, skipping pad tokens. (LXMERT's table has one without the offset: one position less
    is then used, harmlessly.) Tables under other names (GPT-2's ``wpe``, M2M100's sinusoidal
    ``embed_positions``, which has room for its offset) have none."""
    for module in model.modules():
        table = getattr(module, "position_embeddings", None)
        pad = getattr(table, "padding_idx", None)  # nn.Embedding, or I-BERT's QuantEmbedding
        if pad is not None:
            return int(pad) + 1
    return 0


def hf_sequence_features(body: nn.Module, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """The classifier's input: the model's ``logits`` once its classifier is ``nn.Identity``.

    ``batch`` holds ``input_ids`` or ``inputs_embeds`` (word embeddings, e.g. with absent tokens
    replaced by a baseline embedding) and the tokenizer's other fields."""
    return body(**batch).logits


def _read_json(path: Path, name: str) -> dict:
    """A sentence-transformers settings file of the model ``name``; {} when absent."""
    return read_json(path, name) if path.is_file() else {}


def _drop_padding(batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Remove the columns that are padding in every row (either padding side)."""
    keep = batch["attention_mask"].bool().any(0)
    return {k: v[:, keep] for k, v in batch.items()}


def hf_text_mean(body: nn.Module, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """Mean of the last hidden states over non-padding tokens (sentence-transformers' pooling)."""
    batch = _drop_padding(batch)
    hidden = body(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)


def hf_text_cls(body: nn.Module, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """The last hidden state of the first ([CLS]) token."""
    return body(**_drop_padding(batch)).last_hidden_state[:, 0]


# --- python: a user function ------------------------------------------------------------------

def python_parts(target: str, weights: str | Path | None) -> ModelParts:
    """``python:<module or file.py>:<function>``: ``function()`` returns an ``nn.Module``, or a pair
    ``(module, preprocessing)`` with a dict of :data:`~pretrain_reuse.models.spec.PREPROCESSING_FIELDS`
    (defaults: ImageNet mean/std, resize 256, crop 224, bilinear).

    The head is the model's last ``Linear`` (or its Linear/ReLU MLP parent); a model without one
    returns its penultimate features from ``forward``.
    """
    name = f"python:{target}"
    module_name, _, fn_name = target.rpartition(":")
    if not module_name or not fn_name:
        raise PretrainReuseError(f"{name}: expected python:<module or path.py>:<function>")
    module = _import_user_module(module_name, name)
    fn = getattr(module, fn_name, None)
    if not callable(fn):
        names = [n for n in vars(module) if callable(vars(module)[n]) and not n.startswith("_")]
        raise _unknown(f"python module {module_name!r}", fn_name, names, f"dir({module_name})")
    out = fn()
    model, prep = (out, {}) if isinstance(out, nn.Module) else _model_and_prep(out, name)
    spec = BackboneSpec(name=name).with_preprocessing(prep, source=name)
    head_name = last_linear_name(model)
    if head_name is not None:
        dim = first_linear(model.get_submodule(head_name)).in_features
    else:
        dim = _probe_dim(model, spec, name)
    return ModelParts(model, spec, head_name, dim, call_body)


def _import_user_module(module_name: str, name: str) -> ModuleType:
    try:
        if module_name.endswith(".py"):
            path = Path(module_name)
            if not path.is_file():
                raise PretrainReuseError(f"{name}: file {module_name!r} does not exist")
            loader_spec = importlib.util.spec_from_file_location(path.stem, path)
            module = importlib.util.module_from_spec(loader_spec)
            loader_spec.loader.exec_module(module)
            return module
        return importlib.import_module(module_name)
    except ImportError as e:
        raise PretrainReuseError(f"{name}: cannot import {module_name!r} ({e}); put it on "
                                 "PYTHONPATH or pass the path of a .py file") from None


def _model_and_prep(out: Any, name: str) -> tuple[nn.Module, dict]:
    if (isinstance(out, tuple) and len(out) == 2 and isinstance(out[0], nn.Module)
            and isinstance(out[1], Mapping)):
        return out[0], dict(out[1])
    raise PretrainReuseError(f"{name} returned {type(out).__name__}; return an nn.Module or "
                             "(nn.Module, preprocessing dict)")


def _probe_dim(model: nn.Module, spec: BackboneSpec, name: str) -> int:
    """Feature size of a model without a Linear head, from one forward pass on zeros."""
    # on the model's device: a builder may return it on a GPU
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    with torch.no_grad():
        out = model.eval()(torch.zeros(1, 3, *spec.input_size, device=device))
    if out.dim() != 2:
        raise PretrainReuseError(f"{name}: the model returns shape {tuple(out.shape)}; without a "
                                 "Linear classifier it must return (batch, features)")
    return out.shape[1]


PREFIXES = {
    "timm": timm_parts,
    "torchvision": torchvision_parts,
    "hf": hf_parts,
    "python": python_parts,
}
