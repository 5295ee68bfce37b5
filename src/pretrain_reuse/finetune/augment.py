"""Batched augmentation on the training device, so CPU decoding is not the bottleneck.

Images arrive as float (B, C, S, S) batches in [0, 1] (``S`` = the backbone's resize size, see
:func:`~pretrain_reuse.finetune.data.resize_transform`); the views crop them to the input size
and normalise with the backbone's mean/std:

- ``eval``: centre crop (Resize(256) -> CenterCrop(224) in the paper's setting);
- ``weak``: RandomResizedCrop (scale 0.08-1, torchvision's defaults, as the official code) + flip,
  taken inside the resized square batch (the official code crops the whole decoded image);
- ``flip``: horizontal flip only (for data whose classes depend on small parts that a random
  crop would cut away, like the synthetic world);
- ``strong=True`` on any of them adds FixMatch's strong augmentation, as Liu et al. use it for
  unlabelled reuse: RandAugmentMC (:func:`randaugment_mc`: per image, ``ops`` operations drawn
  with replacement from FixMatch's 14-operation :data:`POOL`, each with its own magnitude
  uniform on 1..9 of 10 and applied with probability 1/2; the geometric ones fill with black),
  then CutoutAbs (:func:`cutout_abs`: a gray box of side ``cutout`` times the image's, plus
  one pixel, around a uniform random centre, moved inside at the top and left edges and cut at
  the bottom and right ones, as FixMatch's code draws it). Liu et al.: 2 operations, half the
  side, on the ``weak`` crop; ``ops=0`` and ``cutout=0`` leave an independent draw of the view
  it extends. The strong view keeps the geometry of the view it extends, so data that cannot
  take random crops (``flip``) is not cropped by its strong view.

Everything is written directly in torch, batched over the images (kornia's per-call bookkeeping
costs more than the work itself on small batches). The crop and flip sample what kornia 0.9's
``RandomResizedCrop`` / ``RandomHorizontalFlip`` sample, and :func:`resized_crop_boxes` +
:func:`hflip_mask` even draw kornia's random numbers in kornia's order, so they reproduce
``AugmentationSequential(RandomResizedCrop, RandomHorizontalFlip)`` to float rounding. The
RandAugmentMC operations and CutoutAbs mirror the PIL calls of FixMatch's reference code
(kekmodel/FixMatch-pytorch, ``dataset/randaugment.py``) on float images: equal to PIL on 8-bit
images up to PIL's rounding of each step to 8 bits, the geometric ones pixel for pixel
(tests/test_augment.py).

Randomness comes from torch's global CPU generator on every device (so the same seed gives the
same views everywhere): the training loop seeds it per step inside ``torch.random.fork_rng``, so a
resumed run replays the exact same augmentations.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..distributed import to_device
from ..errors import PretrainReuseError, check_choice
from ..models.spec import BackboneSpec

VIEWS = ("eval", "flip", "weak")
CROP_ATTEMPTS = 10  # candidate boxes per image, as torchvision's and kornia's RandomResizedCrop
CUTOUT_GRAY = 127 / 255  # CutoutAbs's fill colour, (127, 127, 127)


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
    xs = to_device(torch.from_numpy(xs.astype(np.float32)).to(images.dtype), images.device)
    ys = torch.from_numpy(coords(y0, h, size[0], height).astype(np.float32))
    ys = to_device(ys.to(images.dtype), images.device)
    # the x and y planes side by side, seen as the (B, H', W', 2) grid: written plane by plane,
    # twice as fast as interleaved, and read as fast (grid_sample takes any strides)
    grid = torch.stack([xs[:, None, :].expand(n, *size), ys[:, :, None].expand(n, *size)], dim=1)
    return F.grid_sample(images, grid.permute(0, 2, 3, 1), mode="bilinear", padding_mode="border",
                         align_corners=True)


def hflip_mask(n: int, p: float = 0.5) -> torch.Tensor:
    """Which of ``n`` images to mirror, each with probability ``p``: ``torch.rand(n) < p`` from
    the global CPU generator, as kornia's ``RandomHorizontalFlip`` draws it."""
    return torch.rand(n) < p


def hflip(images: torch.Tensor, mirror: torch.Tensor) -> torch.Tensor:
    """The images with those marked in ``mirror`` (bool, (B,)) flipped left-right."""
    return torch.where(to_device(mirror, images.device).view(-1, 1, 1, 1), images.flip(-1), images)


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


# FixMatch's strong augmentation (Sohn et al., NeurIPS 2020) as kekmodel/FixMatch-pytorch's
# dataset/randaugment.py runs it on PIL images: RandAugmentMC over its 14-operation pool, then
# CutoutAbs. Each operation below takes float (k, 3, H, W) images in [0, 1] and one argument per
# image, and mirrors one PIL call in exact arithmetic: nothing is rounded to 8 bits between steps,
# except where the PIL operation is itself a table over the 8-bit levels (Equalize, Posterize,
# Solarize), which take round(255 x) as the level of a value x.


def _per_image(values: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
    """One value per image, shaped (k, 1, 1, 1) to broadcast over ``images``, on their device."""
    return to_device(values.to(images.dtype), images.device).view(-1, 1, 1, 1)


def _blend(degenerate: torch.Tensor, images: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """``Image.blend(degenerate, image, factor)``, which every ``ImageEnhance`` class calls:
    ``degenerate + factor (image - degenerate)``, clipped to [0, 1]."""
    factor = _per_image(factor, images)
    return (degenerate + factor * (images - degenerate)).clamp(0, 1)


def _luma(images: torch.Tensor) -> torch.Tensor:
    """(k, 1, H, W) grey images: ``convert("L")``'s ITU-R 601-2 luma of RGB images."""
    r, g, b = images.unbind(1)
    return (0.299 * r + 0.587 * g + 0.114 * b).unsqueeze(1)


def autocontrast(images: torch.Tensor) -> torch.Tensor:
    """``PIL.ImageOps.autocontrast``: each channel stretched linearly so that its darkest value
    becomes 0 and its lightest 1; a constant channel is left as it is."""
    low = images.amin(dim=(-2, -1), keepdim=True)
    span = images.amax(dim=(-2, -1), keepdim=True) - low
    return torch.where(span > 0, (images - low) / span, images)


def brightness(images: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """``PIL.ImageEnhance.Brightness(image).enhance(factor)``: a blend with black."""
    return _blend(torch.zeros_like(images), images, factor)


def color(images: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """``PIL.ImageEnhance.Color(image).enhance(factor)``: a blend with the grey image."""
    return _blend(_luma(images), images, factor)


def contrast(images: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """``PIL.ImageEnhance.Contrast(image).enhance(factor)``: a blend with the image's mean grey
    level (which PIL rounds to an 8-bit level and this keeps exact)."""
    return _blend(_luma(images).mean(dim=(-3, -2, -1), keepdim=True), images, factor)


def equalize(images: torch.Tensor) -> torch.Tensor:
    """``PIL.ImageOps.equalize``: per channel, the table over 8-bit levels that flattens the
    histogram. With ``step = (pixels - pixels at the highest level) // 255``, level ``i`` becomes
    ``min((step // 2 + pixels below level i) // step, 255)``; a channel with ``step = 0`` (a single
    level, or too few pixels) is left as it is. One histogram for all images and channels."""
    k, c = images.shape[:2]
    levels = (images * 255).round().long().reshape(k * c, -1)
    counts = torch.zeros(k * c, 256, dtype=torch.long, device=images.device)
    counts.scatter_add_(1, levels, torch.ones_like(levels))  # integer sums: exact in any order
    at_top = counts.gather(1, levels.amax(1, keepdim=True))
    step = (levels.shape[1] - at_top) // 255  # (k c, 1)
    below = counts.cumsum(1) - counts
    table = ((step // 2 + below) // step.clamp_min(1)).clamp_max(255)
    equalized = table.gather(1, levels).to(images.dtype) / 255
    return torch.where(step > 0, equalized, images.reshape(k * c, -1)).view_as(images)


def posterize(images: torch.Tensor, bits: torch.Tensor) -> torch.Tensor:
    """``PIL.ImageOps.posterize(image, bits)``: the 8-bit level with all but its ``bits`` (int
    (k,)) highest bits cleared."""
    width = _per_image(2 ** (8 - bits), images)  # how many consecutive levels fall together
    levels = (images * 255).round()
    return torch.div(levels, width, rounding_mode="floor") * width / 255


def solarize(images: torch.Tensor, threshold: torch.Tensor) -> torch.Tensor:
    """``PIL.ImageOps.solarize(image, threshold)``: the values whose 8-bit level is at least
    ``threshold`` (int (k,)) are inverted, ``x -> 1 - x``."""
    return torch.where((images * 255).round() >= _per_image(threshold, images), 1 - images, images)


def sharpness(images: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """``PIL.ImageEnhance.Sharpness(image).enhance(factor)``: a blend with the image smoothed by
    ``ImageFilter.SMOOTH`` (3x3 kernel of ones with 5 in the centre, over 13), which, as in PIL,
    leaves the one-pixel border as it is."""
    # the 3x3 sums of the inner pixels, separably (cheaper than conv2d or avg_pool2d on the CPU)
    rows = images[..., :-2] + images[..., 1:-1] + images[..., 2:]
    box = rows[..., :-2, :] + rows[..., 1:-1, :] + rows[..., 2:, :]
    smooth = (box + 4 * images[..., 1:-1, 1:-1]) / 13
    degenerate = images.clone()
    degenerate[..., 1:-1, 1:-1] = smooth
    return _blend(degenerate, images, factor)


def affine_nearest(images: torch.Tensor, matrix: torch.Tensor) -> torch.Tensor:
    r"""``image.transform(image.size, Image.AFFINE, matrix)`` with PIL's defaults: nearest
    neighbour, black outside the image; one matrix per image.

    ``matrix``: float64 (k, 6) on the CPU, rows ``(a, b, c, d, e, f)``: output pixel ``(x, y)``
    (column, row) takes the input pixel that contains the point
    ``(a (x + 1/2) + b (y + 1/2) + c, d (x + 1/2) + e (y + 1/2) + f)``. The coordinates are
    computed as PIL's ``affine_fixed`` computes them, in 16.16 fixed point (the coefficients
    rounded to multiples of 1/65536, the floor taken by a shift), so the pixel taken is PIL's even
    when the point lies on a pixel edge; being integers, they are the same on every device. One
    ``gather`` samples the whole batch (``F.grid_sample``'s nearest mode breaks ties to even).
    """
    k, c, height, width = images.shape
    a, b, shift_x, d, e, shift_y = matrix.unbind(1)
    # as affine_fixed: the half-pixel offsets go into the constant terms (in PIL's order of
    # operations), then each coefficient becomes FIX(v) = floor(v * 65536 + 0.5)
    terms = torch.stack([shift_x + a * 0.5 + b * 0.5, a, b, shift_y + d * 0.5 + e * 0.5, d, e], dim=1)
    fixed = to_device((terms * 65536 + 0.5).floor().long(), images.device).view(k, 2, 3, 1, 1)
    xs = torch.arange(width, device=images.device)
    ys = torch.arange(height, device=images.device).view(height, 1)
    # (k, 2, H, W): the input column and row of each output pixel (>> 16 is the floor)
    source = (fixed[:, :, 0] + fixed[:, :, 1] * xs + fixed[:, :, 2] * ys) >> 16
    col, row = source.unbind(1)
    # compared with Python numbers: a tensor of the limits would be one more blocking copy
    inside = (col >= 0) & (col < width) & (row >= 0) & (row < height)
    # a point outside the image takes a black pixel appended after the last one
    index = torch.where(inside, row * width + col, height * width).view(k, 1, -1)
    pixels = F.pad(images.reshape(k, c, -1), (0, 1))
    return pixels.gather(2, index.expand(k, c, -1)).view_as(images)


# The geometric operations give the matrix of their PIL call for affine_nearest, so that
# RandAugmentMC samples all the images a slot moves in one go.


def rotate_matrix(degrees: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """The matrix of ``image.rotate(degrees)``: counter-clockwise about the point ``(W/2, H/2)``
    of images of ``size`` (H, W), as PIL computes it (``degrees``: float64 (k,) on the CPU)."""
    height, width = size
    angle = torch.deg2rad(-(degrees % 360))  # PIL takes the angle modulo 360 first
    cos, sin = angle.cos(), angle.sin()
    cx, cy = width / 2, height / 2
    shift_x = cos * -cx + sin * -cy + cx
    shift_y = -sin * -cx + cos * -cy + cy
    return torch.stack([cos, sin, shift_x, -sin, cos, shift_y], dim=1)


def shear_x_matrix(shear: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """``(1, shear, 0, 0, 1, 0)``, of ``image.transform(size, AFFINE, ...)`` in ShearX: row ``y``
    moves left by ``shear y`` pixels (``shear``: float64 (k,) on the CPU)."""
    one, zero = torch.ones_like(shear), torch.zeros_like(shear)
    return torch.stack([one, shear, zero, zero, one, zero], dim=1)


def shear_y_matrix(shear: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """``(1, 0, 0, shear, 1, 0)``, of ``image.transform(size, AFFINE, ...)`` in ShearY: column
    ``x`` moves up by ``shear x`` pixels (``shear``: float64 (k,) on the CPU)."""
    one, zero = torch.ones_like(shear), torch.zeros_like(shear)
    return torch.stack([one, zero, zero, shear, one, zero], dim=1)


def translate_x_matrix(pixels: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """``(1, 0, pixels, 0, 1, 0)``, of ``image.transform(size, AFFINE, ...)`` in TranslateX: the
    image moves left by ``pixels`` (float64 (k,) on the CPU, whole numbers)."""
    one, zero = torch.ones_like(pixels), torch.zeros_like(pixels)
    return torch.stack([one, zero, pixels, zero, one, zero], dim=1)


def translate_y_matrix(pixels: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """``(1, 0, 0, 0, 1, pixels)``, of ``image.transform(size, AFFINE, ...)`` in TranslateY: the
    image moves up by ``pixels`` (float64 (k,) on the CPU, whole numbers)."""
    one, zero = torch.ones_like(pixels), torch.zeros_like(pixels)
    return torch.stack([one, zero, zero, zero, one, pixels], dim=1)


GEOMETRIC = (rotate_matrix, shear_x_matrix, shear_y_matrix, translate_x_matrix, translate_y_matrix)


def _enhance_factor(v: torch.Tensor, sign: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """FixMatch's ``_float_parameter(v, 0.9) + 0.05``: 0.14 to 0.86, so these operations only
    ever weaken (brightness, colour, contrast, sharpness)."""
    return v * 0.9 / 10 + 0.05


#: FixMatch's ``fixmatch_augment_pool``, in its order: each operation's name, function (None for
#: Identity; the matrix function for the :data:`GEOMETRIC` ones) and the argument FixMatch gives
#: its PIL call for magnitude ``v`` (1 to 9), random sign ``sign`` (+-1, used by the geometric
#: operations only) and image ``size`` (H, W). ``v`` and ``sign`` are float64 (k,) tensors, and
#: the arguments are computed in FixMatch's order of floating-point operations (``trunc`` is its
#: ``int()``).
POOL = (
    ("AutoContrast", autocontrast, None),
    ("Brightness", brightness, _enhance_factor),
    ("Color", color, _enhance_factor),
    ("Contrast", contrast, _enhance_factor),
    ("Equalize", equalize, None),
    ("Identity", None, None),
    ("Posterize", posterize, lambda v, sign, size: (v * 4 / 10).trunc().long() + 4),  # 4 to 7 bits
    ("Rotate", rotate_matrix, lambda v, sign, size: sign * (v * 30 / 10).trunc()),  # 3 to 27 degrees
    ("Sharpness", sharpness, _enhance_factor),
    ("ShearX", shear_x_matrix, lambda v, sign, size: sign * (v * 0.3 / 10)),  # 0.03 to 0.27
    ("ShearY", shear_y_matrix, lambda v, sign, size: sign * (v * 0.3 / 10)),
    ("Solarize", solarize, lambda v, sign, size: 256 - (v * 256 / 10).trunc().long()),  # 230 to 26
    ("TranslateX", translate_x_matrix, lambda v, sign, size: (sign * (v * 0.3 / 10) * size[1]).trunc()),
    ("TranslateY", translate_y_matrix, lambda v, sign, size: (sign * (v * 0.3 / 10) * size[0]).trunc()),
)


@dataclass(frozen=True)
class RandAugmentDraws:
    """What RandAugmentMC drew for a batch: one row per image, one column per operation slot.

    ``op``: int64 index into :data:`POOL`; ``magnitude``: int64 in 1..m-1; ``applied``: bool,
    whether the slot's operation is applied; ``negative``: bool, whether a geometric operation
    goes the negative way. All (B, n) on the CPU.
    """

    op: torch.Tensor
    magnitude: torch.Tensor
    applied: torch.Tensor
    negative: torch.Tensor


def draw_randaugment(n_images: int, n_ops: int, m: int = 10) -> RandAugmentDraws:
    """RandAugmentMC's random choices for ``n_images`` images: per image, ``n_ops`` operations
    drawn uniformly from :data:`POOL` with replacement (``random.choices``), each with its own
    magnitude uniform on 1..m-1 (``np.random.randint(1, m)``), applied with probability 1/2 and,
    for the geometric ones, negated with probability 1/2. Drawn from the global CPU generator, in
    this order: ``randint`` for the operations, ``randint`` for the magnitudes, ``rand`` twice."""
    shape = (n_images, n_ops)
    return RandAugmentDraws(op=torch.randint(len(POOL), shape), magnitude=torch.randint(1, m, shape),
                            applied=torch.rand(shape) < 0.5, negative=torch.rand(shape) < 0.5)


def randaugment_mc(images: torch.Tensor, draws: RandAugmentDraws) -> torch.Tensor:
    """FixMatch's ``RandAugmentMC(n, m)`` without its Cutout: each image goes through its own
    drawn operations, slot by slot (``draws`` from :func:`draw_randaugment`).

    ``images``: float (B, 3, H, W) in [0, 1] on any device; the result has their dtype and device.
    Batched: for each slot, each operation of :data:`POOL` runs once, on the images that drew and
    apply it, and the geometric ones together, as one :func:`affine_nearest`.
    """
    out = images.clone()
    size = (images.shape[-2], images.shape[-1])
    chosen = torch.where(draws.applied, draws.op, -1)  # the operation each slot applies, or -1
    for slot in range(chosen.shape[1]):
        moved, matrices = [], []  # the images a geometric operation moves, and its matrices
        for index, (_, operation, argument) in enumerate(POOL):
            rows = torch.nonzero(chosen[:, slot] == index).squeeze(1)
            if operation is None or len(rows) == 0:  # Identity, or no image applies this one
                continue
            v = draws.magnitude[rows, slot].double()
            sign = 1 - 2 * draws.negative[rows, slot].double()
            args = () if argument is None else (argument(v, sign, size),)
            if operation in GEOMETRIC:
                moved.append(rows)
                matrices.append(operation(*args, size))
                continue
            on_device = to_device(rows, out.device)
            out.index_copy_(0, on_device, operation(out.index_select(0, on_device), *args))
        if moved:
            on_device = to_device(torch.cat(moved), out.device)
            out.index_copy_(0, on_device, affine_nearest(out.index_select(0, on_device),
                                                         torch.cat(matrices)))
    return out


def cutout_centres(n: int, height: int, width: int) -> torch.Tensor:
    """Float (n, 2) ``(x, y)`` Cutout centres uniform over a ``height`` x ``width`` image, as
    CutoutAbs's ``np.random.uniform(0, w)``, ``np.random.uniform(0, h)`` (here ``rand(n, 2)`` from
    the global CPU generator)."""
    return torch.rand(n, 2) * torch.tensor([width, height])


def cutout_abs(images: torch.Tensor, side: int, centres: torch.Tensor) -> torch.Tensor:
    """FixMatch's ``CutoutAbs(image, side)``: a gray (127/255) box in each image, around its
    centre in ``centres`` (float (B, 2) ``(x, y)`` in pixels, from :func:`cutout_centres`).

    As FixMatch: ``x0 = int(max(0, x - side/2))``, ``x1 = int(min(W, x0 + side))`` (likewise
    ``y0``, ``y1``) and ``ImageDraw.rectangle((x0, y0, x1, y1))``, which includes both corners.
    So the box is ``side + 1`` pixels wide where it fits; at the left and top edges it is moved
    inside (``x1`` is computed from the clipped ``x0``), at the right and bottom edges it is cut.
    """
    height, width = images.shape[-2:]
    x0, y0 = to_device((centres.double() - side / 2).clamp_min(0).floor(), images.device).unbind(1)
    xs = torch.arange(width, device=images.device)
    ys = torch.arange(height, device=images.device)
    # x1 = min(W, x0 + side) is cut to W only when x0 + side passes column W - 1 anyway
    inside_x = (xs >= x0[:, None]) & (xs <= x0[:, None] + side)  # (B, W)
    inside_y = (ys >= y0[:, None]) & (ys <= y0[:, None] + side)  # (B, H)
    box = (inside_y[:, :, None] & inside_x[:, None, :])[:, None]
    return torch.where(box, CUTOUT_GRAY, images)


class View(nn.Module):
    """One augmentation pipeline ending in normalisation; ``forward`` maps [0,1] images to inputs.

    ``kind`` is one of :data:`VIEWS` (see the module's docstring), ``input_size`` the side of the
    output. ``strong`` adds FixMatch's RandAugmentMC with ``ops`` operations per image (none if
    0) and magnitudes out of 10, then its CutoutAbs with ``side = round(cutout * input_size)``
    (none if ``cutout`` is 0). ``corrupt``, if given, maps the cropped images (in [0, 1]) to
    corrupted ones before normalisation, as ImageNet-C corrupts its 224-pixel centre crops
    (:func:`~pretrain_reuse.finetune.corruptions.corrupt`). ``forward`` takes float (B, 3, H, W)
    images in [0, 1] on any device and returns the normalised (B, 3, input_size, input_size)
    batch on that device, in channels-last memory layout.
    """

    def __init__(self, spec: BackboneSpec, kind: str, input_size: int, *, strong: bool = False,
                 cutout: float = 0.5, ops: int = 2,
                 corrupt: Callable[[torch.Tensor], torch.Tensor] | None = None):
        super().__init__()
        check_choice("kind", kind, VIEWS)
        self.kind, self.size, self.corrupt = kind, (input_size, input_size), corrupt
        self.ops = ops if strong else 0
        self.cutout_side = max(round(cutout * input_size), 1) if strong and cutout > 0 else 0
        mean, std = torch.tensor(spec.mean).view(1, -1, 1, 1), torch.tensor(spec.std).view(1, -1, 1, 1)
        # (x - mean) / std as one fused x * scale + shift. The shift is stored as a whole
        # (1, C, S, S) plane: with two operands broadcast along the pixels, addcmul runs a scalar
        # loop on the CPU, 4x slower than its vectorised one (the same fused multiply-add)
        self.register_buffer("scale", 1 / std, persistent=False)
        self.register_buffer("shift", (-mean / std).expand(1, -1, *self.size).contiguous(),
                             persistent=False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if self.kind == "weak":
            boxes = resized_crop_boxes(len(images), *images.shape[-2:])
            x = crop_resize(images, boxes, self.size, mirror=hflip_mask(len(images)))
        else:
            x = center_crop(images, self.size)
            if self.kind == "flip":
                x = hflip(x, hflip_mask(len(images)))
        if self.corrupt is not None:
            x = self.corrupt(x)
        if self.ops > 0:
            x = randaugment_mc(x, draw_randaugment(len(x), self.ops))
        if self.cutout_side > 0:
            x = cutout_abs(x, self.cutout_side, cutout_centres(len(x), *self.size))
        # normalise, then change the layout (a broadcast over the innermost channels is slower)
        x = torch.addcmul(self.shift, x, self.scale)
        return x.contiguous(memory_format=torch.channels_last)


def input_size(spec: BackboneSpec, override: int | None) -> int:
    """Side of the square network input: the config's override, else the backbone's crop size."""
    return override if override is not None else spec.input_size[0]
