"""The network being fine-tuned: a backbone, a new target head and, for reuse, a source head."""

from __future__ import annotations

import copy
import math
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from ..errors import PretrainReuseError
from ..models.backbone import Backbone


def new_head(in_features: int, out_features: int, generator: torch.Generator) -> nn.Linear:
    """A linear head initialised as the official code does: N(0, sqrt(2/2048)) weights, zero bias."""
    # skip_init: nn.Linear's own initialisation would draw from (and move) the global generator
    head = nn.utils.skip_init(nn.Linear, in_features, out_features)
    with torch.no_grad():
        head.weight.copy_(torch.randn(head.weight.shape, generator=generator) * math.sqrt(2 / 2048))
        head.bias.zero_()
    return head


class FinetuneModel(nn.Module):
    """``backbone`` (penultimate features) + ``head`` (target classes) + optional ``source_head``.

    ``source_classes`` adds a fresh source head (labelled reuse); Co-Tuning keeps the
    pre-trained classifier as source head instead (:meth:`keep_source_classifier`).
    ``frozen_backbone`` (linear probing): the backbone gets no gradients and stays in eval mode,
    so its BatchNorm statistics do not move either.
    ``source_bn``: how BatchNorm treats reused source images (see :meth:`joint_features`).
    """

    def __init__(self, backbone: Backbone, num_classes: int, *, source_classes: int | None = None,
                 frozen_backbone: bool = False, seed: int = 0, source_bn: str = "mixed"):
        super().__init__()
        if backbone.layer != "penultimate":
            raise PretrainReuseError("fine-tuning needs the backbone's penultimate features "
                                     f"(layer='penultimate'), got layer={backbone.layer!r}")
        generator = torch.Generator().manual_seed(seed)
        self.backbone = backbone
        self.head = new_head(backbone.feature_dim, num_classes, generator)
        self.source_head = (None if source_classes is None
                            else new_head(backbone.feature_dim, source_classes, generator))
        self.source_head_is_new = source_classes is not None
        self.frozen_backbone = frozen_backbone
        self.source_bn = source_bn
        if frozen_backbone:
            backbone.requires_grad_(False)
        if backbone.head is not None:
            # the pre-training classifier computes nothing here (Co-Tuning trains a copy of
            # it); left trainable, DistributedDataParallel stops at its missing gradients
            backbone.head.requires_grad_(False)

    def train(self, mode: bool = True) -> FinetuneModel:
        super().train(mode)
        if self.frozen_backbone:
            self.backbone.eval()
        return self

    def features(self, x: torch.Tensor) -> torch.Tensor:
        if self.frozen_backbone:
            with torch.no_grad():
                return self.backbone.features(x)
        return self.backbone.features(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Target logits."""
        return self.head(self.features(x))

    def joint_features(self, target: torch.Tensor, *sources: torch.Tensor) -> list[torch.Tensor]:
        """Features of a target batch and of source batches, one tensor each.

        ``source_bn="mixed"``: one pass over their concatenation, so BatchNorm normalises with,
        and keeps running statistics of, the mixed batch (the official code). ``"target"``: the
        target batch passes alone and alone sets the running statistics that evaluation on
        target data uses; the source batches are normalised with their own batch statistics,
        which are not tracked. With a pool unlike the target (or strongly augmented source
        views) the mixed statistics describe neither distribution.

        Sentences (dicts of token tensors) pass batch by batch: text models normalise each
        sample alone (LayerNorm), and batches padded to different lengths do not concatenate.
        """
        if isinstance(target, dict):
            return [self.features(x) for x in (target, *sources)]
        sizes = [len(target), *(len(s) for s in sources)]
        if self.source_bn == "mixed":
            return list(self.features(torch.cat([target, *sources])).split(sizes))
        z_target = self.features(target)
        with untracked_batchnorm(self.backbone):
            z_sources = self.features(torch.cat(sources))
        return [z_target, *z_sources.split(sizes[1:])]

    def keep_source_classifier(self, head: nn.Module) -> None:
        """Co-Tuning: ``head``, the pre-trained classifier, becomes the source head. It is not a
        new head, so it trains at the backbone's learning rate (thuml/CoTuning, tllib)."""
        self.source_head, self.source_head_is_new = head, False

    def param_groups(self, lr: float, head_lr_mult: float, weight_decay: float) -> list[dict]:
        """Backbone (and a pre-trained source head) at ``lr``, new heads at ``head_lr_mult * lr``
        (official: 10x); decay on all."""
        new = [self.head] + ([self.source_head] if self.source_head_is_new else [])
        old = [self.backbone] + ([] if self.source_head is None or self.source_head_is_new
                                 else [self.source_head])
        heads = [p for m in new for p in m.parameters()]
        body = [p for m in old for p in m.parameters() if p.requires_grad]
        groups = [{"params": heads, "lr": lr * head_lr_mult, "base_lr": lr * head_lr_mult,
                   "weight_decay": weight_decay}]
        if body:
            groups.append({"params": body, "lr": lr, "base_lr": lr, "weight_decay": weight_decay})
        return groups


@contextmanager
def untracked_batchnorm(module: nn.Module) -> Iterator[None]:
    """BatchNorm layers in training mode keep normalising with batch statistics but leave their
    running statistics unchanged (momentum 0) inside the block."""
    layers = [m for m in module.modules()
              if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training]
    saved = [m.momentum for m in layers]
    for m in layers:
        m.momentum = 0.0
    try:
        yield
    finally:
        for m, momentum in zip(layers, saved, strict=True):
            m.momentum = momentum


def check_source_head(backbone: Backbone, *, other_fix: str = "") -> None:
    """Refuse a backbone without the pre-training classifier head that Co-Tuning keeps as its
    source head, naming where one comes from: a Hugging Face model's classifier comes with its
    folder (a base model's folder has none), any other model's with its weights file.
    ``other_fix`` is added to the message (the experiment's skip)."""
    if backbone.num_classes is not None:
        return
    name = backbone.spec.name
    if name.startswith("hf:"):
        task = "Sequence" if backbone.spec.modality == "text" else "Image"
        fix = (f"pass as --model the folder of a Hugging Face *For{task}Classification model (its "
               "classifier is the source head)")
    else:
        fix = "pass --weights of a classifier"
    raise PretrainReuseError(f"co-tuning needs a backbone with its pre-training classifier head; "
                             f"{name} has none; {fix}{other_fix}")


def source_classifier(backbone: Backbone) -> nn.Linear:
    """A trainable copy of the backbone's own classifier head (Co-Tuning's source head)."""
    check_source_head(backbone)
    return copy.deepcopy(backbone.head).requires_grad_(True)


def reinitialize(module: nn.Module, seed: int) -> nn.Module:
    """Reset every parameter with its layer's own initialisation (training from scratch).

    A Hugging Face model inside is reset by its own scheme (``_init_weights``: e.g. N(0, 0.02)
    for BERT's embeddings, where ``nn.Embedding.reset_parameters`` draws N(0, 1), and GPT-2's
    ``Conv1D`` layers, which have no ``reset_parameters`` and would keep their pre-trained
    weights)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for m in module.modules():
            if hasattr(m, "reset_parameters"):
                m.reset_parameters()
        for model in _outermost_hf_models(module):
            # transformers skips tensors it has marked as loaded from a file
            for t in (*model.modules(), *model.parameters(), *model.buffers()):
                if getattr(t, "_is_hf_initialized", False):
                    t._is_hf_initialized = False
            model.apply(model._init_weights)
    return module


def _outermost_hf_models(module: nn.Module) -> list[nn.Module]:
    """The Hugging Face models (modules with ``_init_weights``) in ``module``, without those
    inside another (a classifier's encoder is reset with the classifier)."""
    found = [m for m in module.modules() if callable(getattr(m, "_init_weights", None))]
    inner = {id(sub) for m in found for sub in m.modules() if sub is not m}
    return [m for m in found if id(m) not in inner]
