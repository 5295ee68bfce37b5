"""Hugging Face sequence classifiers as classifier backbones, for explaining text models.

``create_backbone("hf:<folder>")`` loads a text folder as an encoder (``AutoModel``: no
classifier). A folder saved from a ``*ForSequenceClassification`` model (BERT, DistilBERT,
RoBERTa fine-tuned on SST-2, ...) also holds the trained classifier; :func:`create_classifier`
keeps it: the model is loaded with ``AutoModelForSequenceClassification`` (offline,
``local_files_only=True``), its last ``Linear`` becomes the head of a
:class:`~pretrain_reuse.models.Backbone` and everything before it (the encoder, BERT's pooler
over the [CLS] token, DistilBERT's pre-classifier) the body, so ``backbone(batch).logits`` are
the model's own logits and ``layer="penultimate"`` gives the classifier's input. Any other name
goes to :func:`~pretrain_reuse.models.create_backbone` unchanged.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from ..errors import PretrainReuseError
from .backbone import Backbone, ModelParts, assemble, first_linear, last_linear_name
from .checkpoint import map_keys, read_weights
from .families import HF_EXTRA, require
from .registry import create_backbone
from .spec import BackboneSpec

__all__ = ["create_classifier", "is_sequence_classifier"]


def is_sequence_classifier(name: str) -> bool:
    """Whether ``name`` is ``hf:<folder>`` whose config names a ``*ForSequenceClassification``."""
    prefix, _, ident = name.partition(":")
    if prefix != "hf" or not ident:
        return False
    transformers = require("transformers", name, HF_EXTRA)
    try:
        config = transformers.AutoConfig.from_pretrained(ident, local_files_only=True)
    except (OSError, ValueError):
        return False  # create_backbone reports the missing folder
    return any(a.endswith("ForSequenceClassification") for a in config.architectures or [])


def create_classifier(name: str, *, weights: str | Path | None = None,
                      device: str | torch.device = "cpu") -> Backbone:
    """A classifier by name, in eval mode on ``device``: a Hugging Face sequence classifier with
    its own head, or whatever :func:`~pretrain_reuse.models.create_backbone` builds.

    Args:
        name: ``hf:<folder>`` of a ``*ForSequenceClassification`` model, or any backbone name.
        weights: a weights file replacing the folder's (e.g. written by ``save_backbone`` after
            fine-tuning), loaded as :func:`create_backbone` loads it.
        device: where the model is moved.
    """
    if not is_sequence_classifier(name):
        return create_backbone(name, weights=weights, device=device)
    parts = _sequence_parts(name.partition(":")[2], name)
    state = None
    if weights is not None:
        state, _ = read_weights(weights)
        state = map_keys(state, None)
    backbone = assemble(parts, state, None if weights is None else str(weights),
                        layer="penultimate", num_classes=None)
    return backbone.to(device).eval()


def _sequence_parts(folder: str, name: str) -> ModelParts:
    transformers = require("transformers", name, HF_EXTRA)
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError) as e:
        raise PretrainReuseError(
            f"{name}: the folder has no tokenizer ({str(e).splitlines()[0]}); save one next to the "
            "model (tokenizer.save_pretrained(dir))") from None
    model, info = transformers.AutoModelForSequenceClassification.from_pretrained(
        folder, local_files_only=True, output_loading_info=True)
    model = model.float()
    head_name = last_linear_name(model)
    if any(k.startswith(head_name + ".") for k in info["missing_keys"]):
        raise PretrainReuseError(
            f"{name}: the folder holds no trained classifier ({head_name} would be random); pass "
            "a folder saved from a fine-tuned *ForSequenceClassification model")
    limit = min(tokenizer.model_max_length, getattr(model.config, "max_position_embeddings", 512))
    spec = BackboneSpec(name=name, modality="text", input_size=None, resize_size=None, mean=None,
                        std=None, interpolation=None, max_length=int(limit), pooling="cls")
    dim = first_linear(model.get_submodule(head_name)).in_features
    return ModelParts(model, spec, head_name, dim, hf_sequence_features, tokenizer=tokenizer)


def hf_sequence_features(body: nn.Module, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """The classifier's input: the model's ``logits`` once its classifier is ``nn.Identity``.

    ``batch`` holds ``input_ids`` or ``inputs_embeds`` (word embeddings, e.g. with absent tokens
    replaced by a baseline embedding) and the tokenizer's other fields."""
    return body(**batch).logits
