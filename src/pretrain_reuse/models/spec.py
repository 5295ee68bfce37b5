"""What a backbone expects as input: :class:`BackboneSpec` and the eval transforms built from it.

A spec carries the preprocessing its weights were trained with (like timm's ``PretrainedCfg``), so
features can never be computed with a transform that drifted from the weights. Specs are read from
the model's own configuration: timm's data config, torchvision's weights transforms, a Hugging Face
image processor, or the registry entry.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from PIL import Image

from ..errors import PretrainReuseError, check_choice, check_image_size

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
MODALITIES = ("image", "text")
POOLINGS = ("mean", "cls")
INTERPOLATIONS = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
    "box": Image.Resampling.BOX,
    "hamming": Image.Resampling.HAMMING,
}
# Fields a user may set through a ``python:`` builder or that travel with saved weights.
PREPROCESSING_FIELDS = ("input_size", "resize_size", "mean", "std", "interpolation", "max_length",
                        "pooling")


@dataclass(frozen=True)
class BackboneSpec:
    """A backbone's name, input modality and preprocessing.

    Image backbones: an image is converted to RGB, resized with ``interpolation`` so that its
    shorter side is ``resize_size`` (an int) or to exactly ``resize_size`` = (H, W) (a pair, as
    torchvision's ``Resize``), centre-cropped to ``input_size`` = (H, W), scaled to [0, 1] and
    normalised with ``mean``/``std`` per channel. Text backbones: a string is tokenized, padded and
    truncated to ``max_length`` tokens, and the last hidden states are pooled by ``pooling``
    (``mean`` over non-padding tokens, or the ``cls`` token).

    Attributes:
        name: the name it is created by (``create_backbone(name)``).
        modality: ``image`` or ``text``.
        description, requires: for registry entries: a one-line summary and the pip packages the
            entry needs (``pip install`` names).
        build: for registry entries: the function that constructs the model (not serialised).
    """

    name: str
    modality: str = "image"
    input_size: tuple[int, int] | None = (224, 224)
    resize_size: int | tuple[int, int] | None = 256
    mean: tuple[float, ...] | None = IMAGENET_MEAN
    std: tuple[float, ...] | None = IMAGENET_STD
    interpolation: str | None = "bilinear"
    max_length: int | None = None
    pooling: str | None = None
    description: str = ""
    requires: tuple[str, ...] = ()
    build: Callable[[BackboneSpec], Any] | None = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        check_choice("modality", self.modality, MODALITIES)
        if self.modality == "text":
            if not (isinstance(self.max_length, int) and self.max_length > 0):
                raise PretrainReuseError(f"{self.name}: text max_length must be a positive int, "
                                         f"got {self.max_length!r}")
            check_choice("pooling", self.pooling, POOLINGS)
            return
        check_choice("interpolation", self.interpolation, INTERPOLATIONS)
        h, w = self.input_size
        rh, rw = self.resize_size if isinstance(self.resize_size, tuple) else (self.resize_size,) * 2
        if not (0 < h <= rh and 0 < w <= rw):
            raise PretrainReuseError(
                f"{self.name}: resize_size={self.resize_size} must be at least input_size="
                f"{self.input_size}; the centre crop is taken from the resized image")
        if len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
            raise PretrainReuseError(f"{self.name}: mean and std need 3 values (RGB) and std > 0, "
                                     f"got mean={self.mean}, std={self.std}")

    @property
    def crop_pct(self) -> float | None:
        """Fraction of the resized image kept by the centre crop (timm's ``crop_pct``)."""
        if self.modality != "image":
            return None
        resized = self.resize_size[0] if isinstance(self.resize_size, tuple) else self.resize_size
        return self.input_size[0] / resized

    @property
    def resize_side(self) -> int:
        """The side images are resized to before the crop: ``resize_size``, or the larger of a
        (H, W) pair (fine-tuning's :func:`~pretrain_reuse.finetune.data.resize_transform`)."""
        side = self.resize_size
        return side if isinstance(side, int) else max(side)

    def at_input_side(self, side: int) -> BackboneSpec:
        """A copy of an image spec whose input is ``side`` x ``side`` pixels, resized first with
        the same crop ratio (ResNet's 224 of 256: 128 of 146), as timm does for another image
        size: only the centre ``side`` of the usual resize would show the network a zoomed-in
        part of the image."""
        if self.modality != "image":
            raise PretrainReuseError(f"{self.name} is a text model; an image size applies to "
                                     "image models only")
        check_image_size(side)
        resize = round(side * self.resize_side / self.input_size[0])
        return self.with_preprocessing({"input_size": side, "resize_size": resize},
                                       source="image size")

    def to_json(self) -> str:
        """The spec as a JSON object string (``build`` is left out)."""
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "build"}
        return json.dumps(d)

    @classmethod
    def from_json(cls, text: str) -> BackboneSpec:
        """The spec from the JSON a saved model carries in its header."""
        d = json.loads(text)
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})

    def with_preprocessing(self, overrides: Mapping[str, Any], *, source: str) -> BackboneSpec:
        """A copy with some of :data:`PREPROCESSING_FIELDS` replaced; unknown keys are an error."""
        unknown = sorted(set(overrides) - set(PREPROCESSING_FIELDS))
        if unknown:
            raise PretrainReuseError(
                f"{source}: unknown preprocessing key(s) {unknown}; allowed: {list(PREPROCESSING_FIELDS)}")
        fixed = {k: tuple(v) if isinstance(v, list) else v for k, v in overrides.items()}
        if "input_size" in fixed:
            fixed["input_size"] = _as_size(fixed["input_size"])
        return dataclasses.replace(self, **fixed)


def _as_size(v: int | tuple[int, int] | list[int]) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else (int(v[0]), int(v[1]))


@dataclass(frozen=True)
class ImageTransform:
    """Deterministic eval transform of a spec: PIL image (or a decoded (C, H, W) float image in
    [0, 1], as datasets load them) -> normalised float32 tensor (3, H, W).

    Same steps and rounding as torchvision's ``Resize`` -> ``CenterCrop`` -> ``ToTensor`` ->
    ``Normalize`` on PIL images (and so as timm's eval transform), without needing torchvision.
    Picklable, so DataLoader workers can run it.
    """

    input_size: tuple[int, int]
    resize_size: int | tuple[int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    interpolation: str

    def __call__(self, img: Image.Image | torch.Tensor) -> torch.Tensor:
        if isinstance(img, torch.Tensor):
            img = to_pil(img)
        img = img.convert("RGB")
        size = _resized_wh(img.size, self.resize_size)
        if size != img.size:
            img = img.resize(size, INTERPOLATIONS[self.interpolation])
        img = _center_crop(img, self.input_size)
        x = torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1).float().div(255)
        mean = torch.tensor(self.mean, dtype=torch.float32)[:, None, None]
        std = torch.tensor(self.std, dtype=torch.float32)[:, None, None]
        return x.sub(mean).div(std)


def to_pil(image: torch.Tensor) -> Image.Image:
    """A decoded (C, H, W) float image in [0, 1] as PIL (rounded to 8 bits), for a transform of PIL
    images."""
    if image.ndim != 3 or image.shape[0] not in (1, 3) or not image.is_floating_point():
        raise PretrainReuseError(f"an image tensor must be a (C, H, W) float image in [0, 1] with 1 "
                                 f"or 3 channels, as datasets load them; got {image.dtype} of "
                                 f"shape {tuple(image.shape)}")
    array = (image.detach().cpu().clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    return Image.fromarray(array[..., 0] if array.shape[-1] == 1 else array)


def _resized_wh(wh: tuple[int, int], size: int | tuple[int, int]) -> tuple[int, int]:
    """(width, height) after resizing: exact for a (H, W) pair, else shorter side = size."""
    if isinstance(size, tuple):
        return size[1], size[0]
    w, h = wh
    short, long = (w, h) if w <= h else (h, w)
    new_long = int(size * long / short)
    return (size, new_long) if w <= h else (new_long, size)


def _center_crop(img: Image.Image, size: tuple[int, int]) -> Image.Image:
    th, tw = size
    w, h = img.size
    top, left = round((h - th) / 2.0), round((w - tw) / 2.0)
    return img.crop((left, top, left + tw, top + th))


@dataclass(frozen=True)
class TextTransform:
    """Tokenize one string into fixed-length ``input_ids``/``attention_mask`` (1-d LongTensors).

    Fixed length lets a DataLoader's default collate stack samples; the backbone trims the
    all-padding columns of a batch before running the model, so the padding costs no compute.
    """

    tokenizer: Any
    max_length: int

    def __call__(self, text: str) -> dict[str, torch.Tensor]:
        enc = self.tokenizer(text, padding="max_length", truncation=True, max_length=self.max_length,
                             return_tensors="pt")
        return {k: v[0] for k, v in enc.items()}

    def batch(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        """Sentences tokenized as one batch, padded on the right to the longest (the padding is
        masked, so each sentence's output is that of the sentence alone)."""
        return dict(self.tokenizer(list(texts), padding=True, truncation=True,
                                   max_length=self.max_length, return_tensors="pt"))


def make_transform(spec: BackboneSpec, tokenizer: Any = None) -> ImageTransform | TextTransform:
    """The eval transform of ``spec`` (a tokenizer is needed for text specs)."""
    if spec.modality == "text":
        return TextTransform(tokenizer, spec.max_length)
    return ImageTransform(spec.input_size, spec.resize_size, spec.mean, spec.std, spec.interpolation)


def spec_from_timm(name: str, data_config: Mapping[str, Any]) -> BackboneSpec:
    """Spec from timm's ``resolve_model_data_config`` (center and squash crop modes)."""
    h, w = data_config["input_size"][-2:]
    crop_pct = data_config["crop_pct"]
    # timm's eval transform: scale = floor(size / crop_pct); shorter side for "center".
    scaled = (int(h / crop_pct), int(w / crop_pct))
    mode = data_config.get("crop_mode", "center")
    if mode == "squash":
        resize: int | tuple[int, int] = scaled
    elif mode == "center" and h == w:
        resize = scaled[0]
    else:
        raise PretrainReuseError(f"{name}: timm crop_mode={mode!r} with input {h}x{w} is not "
                                 "supported; use a model with square input and center/squash crop")
    return BackboneSpec(name=name, input_size=(h, w), resize_size=resize,
                        mean=tuple(data_config["mean"]), std=tuple(data_config["std"]),
                        interpolation=data_config["interpolation"])


def spec_from_torchvision(name: str, transform: Any) -> BackboneSpec:
    """Spec from a torchvision weights entry's ``transforms()`` (``ImageClassification``)."""
    return BackboneSpec(name=name, input_size=_as_size(transform.crop_size[0]),
                        resize_size=transform.resize_size[0], mean=tuple(transform.mean),
                        std=tuple(transform.std), interpolation=transform.interpolation.value)


def spec_from_hf_image_processor(name: str, proc: Any) -> BackboneSpec:
    """Spec from a Hugging Face image processor (ViT, DeiT, BEiT, CLIP, ConvNeXt/ResNet styles)."""
    size, crop = proc.size, getattr(proc, "crop_size", None)
    crop_pct = getattr(proc, "crop_pct", None)
    if size.get("height"):
        resize: int | tuple[int, int] = (size["height"], size["width"])
        out = resize
    elif size.get("shortest_edge") and crop_pct is not None:
        # ConvNeXt-style: below 384 px resize to edge/crop_pct and crop; at 384+ warp, no crop.
        edge = size["shortest_edge"]
        out = (edge, edge)
        resize = int(edge / crop_pct) if edge < 384 else out
    elif size.get("shortest_edge") and getattr(proc, "do_center_crop", False) and crop:
        resize, out = size["shortest_edge"], (crop["height"], crop["width"])
    else:
        raise PretrainReuseError(f"{name}: image processor size={size} without a fixed "
                                 "output size is not supported; use a processor with crop_size")
    if getattr(proc, "do_center_crop", False) and crop and size.get("height"):
        out = (crop["height"], crop["width"])
    resample = Image.Resampling(int(proc.resample)).name.lower()
    return BackboneSpec(name=name, input_size=_as_size(out), resize_size=resize,
                        mean=tuple(proc.image_mean), std=tuple(proc.image_std), interpolation=resample)
