"""The :class:`Backbone` wrapper: one feature layer, an optional head, and its preprocessing.

Every model, whatever library built it, is split into a **body** that maps an input batch to the
penultimate features (the input of the classifier, e.g. ResNet-18's 512-d global-average-pooled
output) and an optional **head** on top (a classifier ``Linear``, or a projection MLP like
MoCo-v2's 2048→2048→ReLU→128). The split is done by replacing the head module inside the model
with ``nn.Identity``, so the body keeps the model's own code path and parameter names.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import PretrainReuseError, check_choice, user_stacklevel
from .checkpoint import LoadReport, WeightsWarning, head_from_state, load_body, split_head
from .spec import BackboneSpec, ImageTransform, TextTransform, make_transform

LAYERS = ("penultimate", "head", "logits")
HEADLESS_NAME = "head"  # where a head added to a model without one is saved


@dataclass
class ModelParts:
    """What a family resolver hands to :func:`assemble`.

    Attributes:
        model: the full model, weights not yet loaded from a file.
        spec: its preprocessing.
        head_name: dotted name of the head module inside ``model`` (None: no head).
        feature_dim: size of the penultimate features.
        extract: ``extract(body, x) -> (B, feature_dim)``: how the body turns an input batch into
            penultimate features once the head is replaced by ``nn.Identity``.
        tokenizer: for text models.
        default_weights: the weights file used when the caller gives none (registry entries).
    """

    model: nn.Module
    spec: BackboneSpec
    head_name: str | None
    feature_dim: int
    extract: Callable[[nn.Module, Any], torch.Tensor]
    tokenizer: Any = None
    default_weights: Path | None = None


def call_body(body: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``extract`` for models whose forward returns the pooled features once the head is gone."""
    return body(x)


class Backbone(nn.Module):
    """A feature extractor with a chosen layer, an optional head and its eval preprocessing.

    Layers (``layer`` at creation):
        - ``penultimate``: the head's input (global-pooled pre-classifier features; pooled token
          embeddings for text);
        - ``head``: the head's output: a projection (MoCo-v2: the 128-d output before its L2
          normalisation) or a classifier's logits;
        - ``logits``: the head's output, only when the head is a classifier (one ``Linear``).

    Attributes:
        body, head: the modules (``head`` may be None).
        head_name: the head's name in the original model; weights are saved under it.
        spec: the :class:`BackboneSpec` (name, modality, preprocessing).
        layer: the layer :meth:`features` returns.
        load_report: what loading the weights file did (None when no file was loaded).

    Device-agnostic: move it with ``.to(device)`` / ``.to(memory_format=torch.channels_last)`` and
    call it under ``torch.autocast`` as any module.
    """

    def __init__(self, body: nn.Module, head: nn.Module | None, *, head_name: str | None,
                 spec: BackboneSpec, layer: str, feature_dim: int,
                 extract: Callable[[nn.Module, Any], torch.Tensor], tokenizer: Any = None,
                 load_report: LoadReport | None = None):
        super().__init__()
        self.body = body
        self.head = head
        self.head_name = head_name
        self.spec = spec
        self.layer = layer
        self.load_report = load_report
        self._penultimate_dim = feature_dim
        self._extract = extract
        self._tokenizer = tokenizer
        _check_layer(self)

    @property
    def num_classes(self) -> int | None:
        """Number of classes when the head is a classifier (one ``Linear``), else None."""
        return self.head.out_features if isinstance(self.head, nn.Linear) else None

    @property
    def feature_dim(self) -> int:
        """Size of the features :meth:`features` returns."""
        if self.layer == "penultimate":
            return self._penultimate_dim
        return [m for m in self.head.modules() if isinstance(m, nn.Linear)][-1].out_features

    @property
    def preprocess(self) -> ImageTransform | TextTransform:
        """Deterministic eval transform: PIL image or decoded image tensor (or string, for
        text) -> model input."""
        return make_transform(self.spec, self._tokenizer)

    def features(self, x: torch.Tensor | Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Features of the chosen layer, (B, feature_dim), for a batch of preprocessed inputs."""
        z = self._extract(self.body, x)
        return z if self.layer == "penultimate" else self.head(z)

    def set_input_side(self, side: int) -> None:
        """Take inputs of ``side`` x ``side`` pixels from now on (:meth:`BackboneSpec.at_input_side`),
        once one such image has gone through the network: a side too small for its poolings, or
        one its patches or position embeddings do not fit, would otherwise fail at the first
        batch with a traceback from deep in torch. A model saved afterwards keeps the size."""
        spec = self.spec.at_input_side(side)
        was_training = self.training
        self.eval()  # the probe updates no BatchNorm statistics
        try:
            device = next(self.parameters()).device
            with torch.no_grad():
                self.features(torch.zeros(1, 3, side, side, device=device))
        except (RuntimeError, AssertionError, ValueError) as e:
            # torch's layers raise RuntimeError; a model that checks the size itself raises
            # AssertionError (timm's ViT patch embedding) or ValueError (transformers' ViT)
            reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise PretrainReuseError(
                f"image_size {side} does not fit backbone {self.spec.name!r} ({reason}); pass "
                f"another --image-size, or none for its {self.spec.input_size[0]}") from None
        finally:
            self.train(was_training)
        self.spec = spec

    def with_head(self, head: nn.Module) -> Backbone:
        """The same body (shared, not copied) with another head, e.g. a classifier trained on a new
        label set; save it with :func:`~pretrain_reuse.models.save_backbone`."""
        return Backbone(self.body, head, head_name=self.head_name or HEADLESS_NAME, spec=self.spec,
                        layer="penultimate", feature_dim=self._penultimate_dim,
                        extract=self._extract, tokenizer=self._tokenizer)

    def forward(self, x: torch.Tensor | Mapping[str, torch.Tensor]) -> torch.Tensor:
        """The model's output: the head's (logits of a classifier), or the penultimate features."""
        z = self._extract(self.body, x)
        return z if self.head is None else self.head(z)


def _check_layer(b: Backbone) -> None:
    check_choice("layer", b.layer, LAYERS)
    if b.layer == "head" and b.head is None:
        raise PretrainReuseError(f"layer='head': {b.spec.name} has no head (none in the model or "
                                 "its weights file); use layer='penultimate'")
    if b.layer == "logits" and b.num_classes is None:
        # a head that is no classifier (a projection) still gives layer='head'; no head does not
        what, use = (("no head", "layer='penultimate'") if b.head is None else
                     ("a projection head, not a classifier", "layer='head' or 'penultimate'"))
        raise PretrainReuseError(f"layer='logits': {b.spec.name} has {what}; use {use}")


def assemble(parts: ModelParts, state: Mapping[str, torch.Tensor] | None, path: str | None, *,
             layer: str, num_classes: int | None) -> Backbone:
    """Split ``parts.model`` into body and head, load ``state`` into them, wrap as a Backbone.

    With a state dict the head is rebuilt from the file's head weights (its size follows the
    file; no head weights means no head). ``num_classes`` then replaces the head by a fresh
    ``Linear(feature_dim, num_classes)`` for training on a new label set.
    """
    model, head_name = parts.model, parts.head_name
    head = None
    if head_name is not None:
        head = model.get_submodule(head_name)
        model.set_submodule(head_name, nn.Identity())
    report = None
    if state is not None:
        body_state, head_state = split_head(state, head_name or HEADLESS_NAME, model.state_dict())
        head = head_from_state(head_state, head_name or HEADLESS_NAME, path) if head_state else None
        n, unexpected = load_body(model, body_state, path, parts.spec.name)
        if head is not None and first_linear(head).in_features != parts.feature_dim:
            raise PretrainReuseError(
                f"weights file {path!r}: head {head_name!r} takes {first_linear(head).in_features} "
                f"features but {parts.spec.name} gives {parts.feature_dim}; check the architecture")
        report = LoadReport(path=str(path), loaded=n + len(head_state), unexpected=unexpected,
                            head="checkpoint" if head is not None else "none")
        if head is None and num_classes is None:
            _warn_of_other_head(state, unexpected, parts, path)
    if num_classes is not None:
        head = nn.Linear(parts.feature_dim, num_classes)
    return Backbone(model, head, head_name=head_name or HEADLESS_NAME, spec=parts.spec, layer=layer,
                    feature_dim=parts.feature_dim, extract=parts.extract, tokenizer=parts.tokenizer,
                    load_report=report)


def _warn_of_other_head(state: Mapping[str, torch.Tensor], unexpected: tuple[str, ...],
                        parts: ModelParts, path: str) -> None:
    """Warn when a file without head weights holds, among the keys the model ignored, a head
    that takes the model's features: a Linear, or an MLP of them (:func:`head_from_state`),
    likely saved under another name (``head.fc.`` for timm's ``fc``), which the backbone goes
    without. A projector the backbone could not rebuild (one with BatchNorm, as SwAV's) is no
    head to rename, and is not warned of."""
    name = parts.head_name or HEADLESS_NAME
    for key in unexpected:
        if not (key.endswith(".weight") and state[key].dim() == 2
                and state[key].shape[1] == parts.feature_dim):
            continue
        # the Linear's own name, or that of the MLP it is the first layer of (fc.0.weight)
        layer = key.removesuffix(".weight")
        parent, _, last = layer.rpartition(".")
        prefix = parent if last.isdigit() and parent else layer
        head_state = {k[len(prefix) + 1:]: state[k] for k in unexpected if k.startswith(prefix + ".")}
        try:
            head_from_state(head_state, prefix, path)
        except PretrainReuseError:
            continue
        warnings.warn(
            f"weights file {path!r} has no {name}.* weights, so {parts.spec.name} loads without a "
            f"head, but it holds {prefix}.* {tuple(state[key].shape)}, which takes its "
            f"{parts.feature_dim} features: a head under another name? Rename those keys to "
            f"{name}.* in the file to keep it", WeightsWarning, stacklevel=user_stacklevel())
        return


def last_linear_name(model: nn.Module) -> str | None:
    """Name of the head of a plain torch model: its last ``Linear``, or that Linear's parent when
    the parent is an MLP like MoCo-v2's ``fc``: a plain ``nn.Sequential`` (children 0, 1, ...) of
    two or more Linear layers with only ReLU between them."""
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not names:
        return None
    parent_name = names[-1].rpartition(".")[0]
    parent = model.get_submodule(parent_name)
    children = list(parent.named_children())
    is_mlp = (parent_name and isinstance(parent, nn.Sequential)
              and all(n.isdigit() and isinstance(m, nn.Linear | nn.ReLU) for n, m in children)
              and sum(isinstance(m, nn.Linear) for _, m in children) >= 2)
    return parent_name if is_mlp else names[-1]


def first_linear(head: nn.Module) -> nn.Linear:
    return next(m for m in head.modules() if isinstance(m, nn.Linear))
