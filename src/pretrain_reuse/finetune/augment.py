"""Batched augmentation on the training device, so CPU decoding is not the bottleneck.

Images arrive as float (B, C, S, S) batches in [0, 1] (``S`` = the backbone's resize size, see
:func:`~pretrain_reuse.finetune.data.resize_transform`); the views crop them to the input size
and normalise with the backbone's mean/std:

- ``eval``: centre crop (Resize(256) -> CenterCrop(224) in the paper's setting);
- ``weak``: RandomResizedCrop (scale 0.08-1, torchvision's defaults, as the official code) + flip;
- ``flip``: horizontal flip only (for data whose classes depend on small parts that a random
  crop would cut away, like the synthetic world);
- ``strong=True`` on any of them adds RandAugment(n=``ops``, m=10) and a Cutout of ``cutout``
  times the side (FixMatch's RandAugmentMC as used by Liu et al. for unlabelled reuse: 2 ops,
  half the side, on the ``weak`` crop; ``ops=0`` and ``cutout=0`` leave an independent draw of the
  view it extends). The strong view keeps the geometry of the weak view it extends, so
  data that cannot take random crops (``flip``) is not cropped by its strong view either.

The crop, flip and Cutout are written directly in torch, batched (kornia's per-call bookkeeping
costs more than the work itself on small batches); they sample what kornia 0.9's
``RandomResizedCrop`` / ``RandomHorizontalFlip`` / ``RandomErasing`` sample, and
:func:`resized_crop_boxes` + :func:`hflip_mask` even draw kornia's random numbers in kornia's
order, so they reproduce ``AugmentationSequential(RandomResizedCrop, RandomHorizontalFlip)`` to
float rounding (tests/test_augment.py). RandAugment is kornia's.

Randomness comes from torch's global generators (the crop, flip and Cutout draw from the CPU one
on every device, so the same seed gives the same crops everywhere): the training loop seeds them
per step inside ``torch.random.fork_rng``, so a resumed run replays the exact same augmentations.
"""

from __future__ import annotations

import functools
import math

import numpy as np
import torch
import torch.nn.functional as F
from kornia.augmentation.auto import RandAugment
from torch import nn

from ..errors import PretrainReuseError, check_choice
from ..models.spec import BackboneSpec

VIEWS = ("eval", "flip", "weak")
CROP_ATTEMPTS = 10  # candidate boxes per image, as torchvision's and kornia's RandomResizedCrop


def resized_crop_boxes(n: int, height: int, width: int, *, scale: tuple[float, float] = (0.08, 1.0),
                       ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> torch.Tensor:
    r"""Boxes of RandomResizedCrop for ``n`` images of ``height`` x ``width`` pixels.

    For each image, ten candidates: area ``a ~ U(scale) * height * width``, aspect ratio
    ``r = exp(U(log ratio))`` (width / height), ``w = round(sqrt(a r))``, ``h = round(sqrt(a / r))``;
    the first with ``0 < w <= width`` and ``0 < h <= height`` is kept, else the whole image (for an
    image whose own ratio lies in ``ratio``; else its full width or height, as torchvision). The
    top-left corner is uniform over the positions where the box fits:
    ``x0 = floor(U * (width - w + 1))``, likewise ``y0``. This is torchvision's ``get_params``
    except that the fallback box is placed at random, not centred, as kornia 0.9's
    ``ResizedCropGenerator``, whose random draws (``rand(n, 10)`` twice, then ``rand(n)`` twice,
    all from the global CPU generator) and float32 arithmetic this follows exactly.

    Returns an int64 (n, 4) tensor of ``(x0, y0, w, h)`` on the CPU. The arithmetic on the
    draws runs in NumPy (float32, the same IEEE operations; ``exp`` in torch, as kornia): a few
    dozen torch calls on (n, 10) arrays cost more than the crop itself.
    """
    area = torch.rand(n, CROP_ATTEMPTS).numpy()
    log_ratio = torch.rand(n, CROP_ATTEMPTS).numpy()
    lo, hi = np.float32(scale[0]), np.float32(scale[1])
    area = (area * (hi - lo) + lo) * height * width
    lo, hi = _log_range(tuple(ratio))
    aspect = torch.exp(torch.from_numpy(lo + log_ratio * (hi - lo))).numpy()
    w = np.sqrt(area * aspect).round()
    h = np.sqrt(area / aspect).round()
    fits = (w > 0) & (w <= width) & (h > 0) & (h <= height)
    first = fits.argmax(1)  # the first candidate that fits (argmax returns the first maximum)
    own = width / height
    if own < min(ratio):
        fallback = (width, round(width / min(ratio)))
    elif own > max(ratio):
        fallback = (round(height * max(ratio)), height)
    else:
        fallback = (width, height)
    rows = np.arange(n)
    found = fits[rows, first]
    w = np.where(found, w[rows, first], np.float32(fallback[0])).clip(1, width)
    h = np.where(found, h[rows, first], np.float32(fallback[1])).clip(1, height)
    x0 = np.floor(torch.rand(n).numpy() * (width - w + 1)).clip(0, width - w)
    y0 = np.floor(torch.rand(n).numpy() * (height - h + 1)).clip(0, height - h)
    return torch.from_numpy(np.stack([x0, y0, w, h], axis=1).astype(np.int64))


@functools.lru_cache(maxsize=8)
def _log_range(ratio: tuple[float, float]) -> np.ndarray:
    """``log(ratio)`` in float32, computed by torch as kornia does (cached: called every step)."""
    return torch.log(torch.tensor(ratio, dtype=torch.float32)).numpy()


def crop_resize(images: torch.Tensor, boxes: torch.Tensor, size: tuple[int, int], *,
                mirror: torch.Tensor | None = None) -> torch.Tensor:
    r"""Crop box ``(x0, y0, w, h)`` of each image and resize it to ``size`` = (H', W'), bilinear
    with corners aligned (``F.interpolate(crop, size, mode="bilinear", align_corners=True)`` per
    image, as kornia's slice-mode crop), batched; ``mirror`` (bool, (B,)) flips the marked outputs
    left-right.

    Output pixel ``(i, j)`` samples the image at ``y = y0 + i (h - 1) / (H' - 1)``,
    ``x = x0 + j (w - 1) / (W' - 1)`` (``y0``, ``x0`` when the output side is 1); a mirrored output
    takes column ``W' - 1 - j`` instead of ``j``. All images are sampled by one
    ``F.grid_sample`` call (bilinear, ``align_corners=True``, so that grid value ``-1``/``+1`` is
    the first/last pixel's centre; border padding, as the points never leave the image but by
    rounding).

    ``images``: float (B, C, H, W) on any device; ``boxes``: int (B, 4) inside the images. The
    output has the dtype and device of ``images``. The coordinates are computed in NumPy (float64)
    and only the (B, H') and (B, W') axes go to the device, where the grid is assembled.
    """
    n, (height, width) = len(images), images.shape[-2:]
    x0, y0, w, h = boxes.cpu().numpy().astype(np.float64).T

    def coords(start, extent, out: int, side: int) -> np.ndarray:  # (B, out) in [-1, 1]
        pos = start[:, None] + (extent[:, None] - 1) / max(out - 1, 1) * np.arange(out)
        return pos * (2 / max(side - 1, 1)) - 1

    xs = coords(x0, w, size[1], width)
    if mirror is not None:
        xs = np.where(mirror.cpu().numpy()[:, None], xs[:, ::-1], xs)
    xs = torch.from_numpy(xs.astype(np.float32)).to(images.device, images.dtype)
    ys = torch.from_numpy(coords(y0, h, size[0], height).astype(np.float32))
    ys = ys.to(images.device, images.dtype)
    grid = torch.stack([xs[:, None, :].expand(n, *size), ys[:, :, None].expand(n, *size)], dim=-1)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=True)


def hflip_mask(n: int, p: float = 0.5) -> torch.Tensor:
    """Which of ``n`` images to mirror, each with probability ``p``: ``torch.rand(n) < p`` from
    the global CPU generator, as kornia's ``RandomHorizontalFlip`` draws it."""
    return torch.rand(n) < p


def hflip(images: torch.Tensor, mirror: torch.Tensor) -> torch.Tensor:
    """The images with those marked in ``mirror`` (bool, (B,)) flipped left-right."""
    return torch.where(mirror.to(images.device).view(-1, 1, 1, 1), images.flip(-1), images)


def center_crop(images: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """The central ``size`` = (H', W') window (kornia's CenterCrop: the top-left corner is at
    ``int(H/2 - H'/2)``, ``int(W/2 - W'/2)``); the images themselves when they have that size."""
    height, width = images.shape[-2:]
    if (height, width) == size:
        return images
    if height < size[0] or width < size[1]:
        raise PretrainReuseError(
            f"images of {height}x{width} pixels are smaller than the input size {size[0]}x"
            f"{size[1]}; pass an --image-size of at most {min(height, width)} or resize larger")
    top, left = int(height / 2 - size[0] / 2), int(width / 2 - size[1] / 2)
    return images[..., top:top + size[0], left:left + size[1]]


def erase_squares(images: torch.Tensor, side: int, value: float) -> torch.Tensor:
    """Cutout: set a ``side`` x ``side`` square of each image (all channels) to ``value``, its
    top-left corner uniform over the positions where it fits (``floor(U * (S - side + 1))`` per
    axis, as kornia's ``RandomErasing``; two ``rand(B)`` from the global CPU generator)."""
    height, width = images.shape[-2:]
    x0 = (torch.rand(len(images)) * (width - side + 1)).floor().to(images.device)
    y0 = (torch.rand(len(images)) * (height - side + 1)).floor().to(images.device)
    xs = torch.arange(width, device=images.device)
    ys = torch.arange(height, device=images.device)
    inside_x = (xs >= x0[:, None]) & (xs < x0[:, None] + side)  # (B, W)
    inside_y = (ys >= y0[:, None]) & (ys < y0[:, None] + side)  # (B, H)
    mask = (inside_y[:, :, None] & inside_x[:, None, :])[:, None]
    return torch.where(mask, value, images)


class View(nn.Module):
    """One augmentation pipeline ending in normalisation; ``forward`` maps [0,1] images to inputs.

    ``kind`` is one of :data:`VIEWS` (see the module's docstring), ``input_size`` the side of the
    output, ``strong`` adds RandAugment with ``ops`` operations (none if 0) and a Cutout of
    ``cutout`` times the side. ``forward`` takes float (B, C, H, W) images in [0, 1] on any device
    and returns the normalised (B, C, input_size, input_size) batch on that device, in
    channels-last memory layout.
    """

    def __init__(self, spec: BackboneSpec, kind: str, input_size: int, *, strong: bool = False,
                 cutout: float = 0.5, ops: int = 2):
        super().__init__()
        check_choice("kind", kind, VIEWS)
        self.kind, self.size, self.strong, self.cutout = kind, (input_size, input_size), strong, cutout
        # kornia's RandAugment is a module; the other steps are functions of this module
        self.randaugment = RandAugment(n=ops, m=10) if strong and ops > 0 else None
        mean, std = torch.tensor(spec.mean).view(1, -1, 1, 1), torch.tensor(spec.std).view(1, -1, 1, 1)
        # (x - mean) / std as one fused x * scale + shift
        self.register_buffer("scale", 1 / std, persistent=False)
        self.register_buffer("shift", -mean / std, persistent=False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if self.kind == "weak":
            boxes = resized_crop_boxes(len(images), *images.shape[-2:])
            x = crop_resize(images, boxes, self.size, mirror=hflip_mask(len(images)))
        else:
            x = center_crop(images, self.size)
            if self.kind == "flip":
                x = hflip(x, hflip_mask(len(images)))
        if self.strong:
            if self.randaugment is not None:
                x = self.randaugment(x)
            if self.cutout > 0:
                area = self.cutout * self.cutout * self.size[0] * self.size[1]
                side = min(max(round(math.sqrt(area)), 1), min(self.size))
                x = erase_squares(x, side, 0.5)
        # normalise, then change the layout (a broadcast over the innermost channels is slower)
        x = torch.addcmul(self.shift, x, self.scale)
        return x.contiguous(memory_format=torch.channels_last)


def input_size(spec: BackboneSpec, override: int | None) -> int:
    """Side of the square network input: the config's override, else the backbone's crop size."""
    return override if override is not None else spec.input_size[0]
