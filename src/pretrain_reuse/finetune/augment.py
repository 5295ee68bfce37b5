"""Batched augmentation on the training device (kornia), so CPU decoding is not the bottleneck.

Images arrive as float (B, C, S, S) batches in [0, 1] (``S`` = the backbone's resize size, see
:func:`~pretrain_reuse.finetune.data.resize_transform`); the views crop them to the input size
and normalise with the backbone's mean/std:

- ``eval``: centre crop (Resize(256) -> CenterCrop(224) in the paper's setting);
- ``weak``: RandomResizedCrop (scale 0.08-1, torchvision's defaults, as the official code) + flip;
- ``flip``: horizontal flip only (for data whose classes depend on small parts that a random
  crop would cut away, like the synthetic world);
- ``strong=True`` on any of them adds RandAugment(n=2, m=10) and a Cutout of ``cutout`` times
  the side (FixMatch's RandAugmentMC as used by Liu et al. for unlabelled reuse, with half the
  side, on the ``weak`` crop). The strong view keeps the geometry of the weak view it extends, so
  data that cannot take random crops (``flip``) is not cropped by its strong view either.

Randomness comes from torch's generator: the training loop seeds it per step inside
``torch.random.fork_rng``, so a resumed run replays the exact same augmentations.
"""

from __future__ import annotations

import kornia.augmentation as K
import torch
from kornia.augmentation.auto import RandAugment
from torch import nn

from ..models.spec import BackboneSpec

VIEWS = ("eval", "flip", "weak")


class View(nn.Module):
    """One augmentation pipeline ending in normalisation; ``forward`` maps [0,1] images to inputs."""

    def __init__(self, spec: BackboneSpec, kind: str, input_size: int, *, strong: bool = False,
                 cutout: float = 0.5):
        super().__init__()
        size = (input_size, input_size)
        ops: list[nn.Module] = {
            "eval": lambda: [K.CenterCrop(size)],
            "flip": lambda: [K.CenterCrop(size), K.RandomHorizontalFlip()],
            "weak": lambda: [K.RandomResizedCrop(size, scale=(0.08, 1.0)),
                             K.RandomHorizontalFlip()],
        }[kind]()
        if strong:
            ops.append(RandAugment(n=2, m=10))
            if cutout > 0:
                area = cutout * cutout
                ops.append(K.RandomErasing(scale=(area, area), ratio=(1.0, 1.0), value=0.5, p=1.0))
        self.ops = K.AugmentationSequential(*ops)
        self.register_buffer("mean", torch.tensor(spec.mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(spec.std).view(1, -1, 1, 1), persistent=False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = (self.ops(images) - self.mean) / self.std
        return x.contiguous(memory_format=torch.channels_last)


def input_size(spec: BackboneSpec, override: int | None) -> int:
    """Side of the square network input: the config's override, else the backbone's crop size."""
    return override if override is not None else spec.input_size[0]
