"""The views' hand-written batched ops against independent references: crop boxes, bilinear
resize, flip and centre crop against kornia (which they replace), per-image ``F.interpolate`` and
closed forms; FixMatch's RandAugmentMC operations and CutoutAbs against the PIL calls of its
reference code (kekmodel/FixMatch-pytorch, dataset/randaugment.py) on 8-bit images, and their
random draws against their distributions; and the views' reproducibility under a seed (what a
resumed run relies on)."""

from __future__ import annotations

import math

import kornia.augmentation as K
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageEnhance, ImageOps

from pretrain_reuse.distributed import to_device
from pretrain_reuse.errors import PretrainReuseError
from pretrain_reuse.finetune.augment import (
    CUTOUT_GRAY,
    POOL,
    RandAugmentDraws,
    View,
    center_crop,
    crop_resize,
    cutout_abs,
    cutout_centres,
    draw_randaugment,
    equalize,
    hflip,
    hflip_mask,
    randaugment_mc,
    resized_crop_boxes,
)
from pretrain_reuse.models import create_backbone

SPEC = create_backbone("smallcnn-s").spec
MEAN = torch.tensor(SPEC.mean).view(1, 3, 1, 1)
STD = torch.tensor(SPEC.std).view(1, 3, 1, 1)


def images(n: int, height: int, width: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 3, height, width, generator=torch.Generator().manual_seed(seed))


def kornia_boxes(params: dict) -> torch.Tensor:
    """(x0, y0, w, h) from kornia's inclusive corner boxes (B, 4, 2)."""
    src = params["src"]
    return torch.stack([src[:, 0, 0], src[:, 0, 1], src[:, 2, 0] - src[:, 0, 0] + 1,
                        src[:, 2, 1] - src[:, 0, 1] + 1], dim=1).long()


@pytest.mark.parametrize(("height", "width", "scale", "ratio"), [
    (40, 40, (0.08, 1.0), (3 / 4, 4 / 3)),
    (24, 24, (0.08, 1.0), (3 / 4, 4 / 3)),
    (32, 32, (0.9, 1.0), (0.5, 2.0)),      # many draws fall back to the whole image
    (20, 60, (0.95, 1.0), (3 / 4, 4 / 3)),  # wider than max(ratio): fallback keeps the height
    (60, 20, (0.95, 1.0), (3 / 4, 4 / 3)),  # narrower than min(ratio): fallback keeps the width
])
def test_crop_boxes_are_kornias_under_the_same_seed(height, width, scale, ratio):
    crop = K.RandomResizedCrop((16, 16), scale=scale, ratio=ratio)
    for seed in range(5):
        torch.manual_seed(seed)
        expected = kornia_boxes(crop.forward_parameters((256, 3, height, width)))
        after_kornia = torch.rand(4)
        torch.manual_seed(seed)
        boxes = resized_crop_boxes(256, height, width, scale=scale, ratio=ratio)
        assert torch.equal(boxes, expected)
        assert torch.equal(torch.rand(4), after_kornia)  # the same draws were consumed


@pytest.mark.parametrize("side", [40, 32, 24])
def test_weak_view_matches_kornia_crop_flip_and_normalisation(side):
    x = images(64, side, side)
    kornia_view = K.AugmentationSequential(K.RandomResizedCrop((32, 32), scale=(0.08, 1.0)),
                                           K.RandomHorizontalFlip())
    view = View(SPEC, "weak", 32)
    for seed in range(3):
        torch.manual_seed(seed)
        expected, after_kornia = (kornia_view(x) - MEAN) / STD, torch.rand(4)
        torch.manual_seed(seed)
        out = view(x)
        assert out.is_contiguous(memory_format=torch.channels_last)
        torch.testing.assert_close(out, expected, atol=2e-5, rtol=0)
        assert torch.equal(torch.rand(4), after_kornia)


@pytest.mark.parametrize("kind", ["eval", "flip"])
def test_eval_and_flip_views_match_kornia_and_consume_the_same_draws(kind):
    x = images(64, 36, 36)
    ops = [K.CenterCrop((32, 32))] + ([K.RandomHorizontalFlip()] if kind == "flip" else [])
    kornia_view = K.AugmentationSequential(*ops)
    torch.manual_seed(4)
    expected, after_kornia = (kornia_view(x) - MEAN) / STD, torch.rand(4)
    torch.manual_seed(4)
    torch.testing.assert_close(View(SPEC, kind, 32)(x), expected)
    assert torch.equal(torch.rand(4), after_kornia)


def test_crop_resize_is_per_image_interpolate_with_aligned_corners():
    x = images(6, 20, 28)
    boxes = torch.tensor([[0, 0, 28, 20], [3, 5, 10, 7], [27, 19, 1, 1], [0, 4, 28, 1],
                          [6, 0, 2, 20], [10, 2, 13, 17]])
    mirror = torch.tensor([False, True, False, True, True, False])
    for size in [(16, 12), (32, 32), (1, 5)]:
        out = crop_resize(x, boxes, size, mirror=mirror)
        for img, (x0, y0, w, h), m, o in zip(x, boxes.tolist(), mirror, out, strict=True):
            ref = F.interpolate(img[None, :, y0:y0 + h, x0:x0 + w], size, mode="bilinear",
                                align_corners=True)[0]
            torch.testing.assert_close(o, ref.flip(-1) if m else ref, atol=1e-5, rtol=0)


def test_crop_resize_of_the_whole_image_at_its_size_is_the_image():
    x = images(4, 32, 32)
    boxes = torch.tensor([[0, 0, 32, 32]] * 4)
    # up to the rounding of the sampling grid's coordinates
    torch.testing.assert_close(crop_resize(x, boxes, (32, 32)), x, atol=1e-5, rtol=0)


def test_crop_boxes_stay_inside_and_in_the_scale_and_ratio_ranges():
    height = width = 224
    torch.manual_seed(0)
    x0, y0, w, h = resized_crop_boxes(20000, height, width).double().unbind(1)
    assert (x0 >= 0).all() and (y0 >= 0).all()
    assert (x0 + w <= width).all() and (y0 + h <= height).all()
    # w = round(sqrt(a r)), h = round(sqrt(a / r)) are off by at most half a pixel each, so
    # w h >= a - (sqrt(a r) + sqrt(a / r)) / 2 and w / h is within the ratio range up to
    # (s + 1/2) / (s - 1/2) for the smallest side s = sqrt(a_min * 3/4)
    a_min = 0.08 * height * width
    slack = (math.sqrt(a_min * 4 / 3) + math.sqrt(a_min * 3 / 4)) / 2
    area = w * h
    assert area.min() >= a_min - slack and area.max() <= height * width
    assert area.min() < a_min * 1.01  # the range's lower end is reached
    s = math.sqrt(a_min * 3 / 4)
    ratio = w / h
    assert ratio.min() >= 3 / 4 * (s - 0.5) / (s + 0.5) and ratio.max() <= 4 / 3 * (s + 0.5) / (s - 0.5)
    # a box of at most 0.7 of the image fits at every ratio, so its log ratio is uniform over
    # [log 3/4, log 4/3] (up to the rounding of w, h): mean 0, variance (log 16/9)^2 / 12
    log_ratio = ratio[area < 0.7 * height * width].log()
    assert abs(log_ratio.mean()) < 0.01
    assert log_ratio.var() == pytest.approx(math.log(16 / 9) ** 2 / 12, rel=0.05)
    # the top-left corner is uniform over the positions where the box fits
    u = (x0 + 0.5) / (width - w + 1)  # x0 uniform on {0, ..., width - w}: mean 1/2
    assert u.mean() == pytest.approx(0.5, abs=0.01) and u.max() < 1


def test_flip_rate_is_one_half_and_flips_exactly_the_marked_images():
    torch.manual_seed(0)
    n = 40000
    rate = hflip_mask(n).double().mean().item()
    assert abs(rate - 0.5) < 4 * math.sqrt(0.25 / n)
    x = images(8, 5, 7)
    mirror = torch.tensor([True, False] * 4)
    out = hflip(x, mirror)
    assert torch.equal(out[mirror], x[mirror].flip(-1)) and torch.equal(out[~mirror], x[~mirror])


@pytest.mark.parametrize(("height", "width"), [(40, 40), (41, 37), (32, 32)])
def test_center_crop_is_kornias(height, width):
    x = images(3, height, width)
    out = center_crop(x, (32, 32))
    assert torch.equal(out, K.CenterCrop((32, 32))(x))
    if (height, width) == (32, 32):
        assert out is x  # a no-op crop is skipped


def test_center_crop_smaller_than_the_input_size_is_a_user_error():
    with pytest.raises(PretrainReuseError, match="image-size"):
        center_crop(images(2, 24, 24), (32, 32))


def test_eval_view_is_the_normalised_centre_crop_channels_last():
    x = images(5, 36, 36)
    out = View(SPEC, "eval", 32)(x)
    assert out.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(out, (x[..., 2:34, 2:34] - MEAN) / STD)


@pytest.mark.parametrize("kind", ["eval", "flip", "weak"])
@pytest.mark.parametrize("strong", [False, True])
def test_views_replay_exactly_under_the_same_seed(kind, strong):
    x = images(16, 32, 32)
    view = View(SPEC, kind, 32, strong=strong)
    torch.manual_seed(7)
    a = view(x)
    torch.manual_seed(7)
    b = view(x)
    assert torch.equal(a, b)
    if kind != "eval" or strong:
        torch.manual_seed(8)
        assert not torch.equal(view(x), a)


def _refuse_pinning(monkeypatch):
    def pin_memory(self, *args, **kwargs):
        raise AssertionError("pinned memory on a CPU-only run (pinning needs CUDA)")

    monkeypatch.setattr(torch.Tensor, "pin_memory", pin_memory)


def test_to_device_on_the_cpu_is_the_tensor_itself_and_never_pins(monkeypatch):
    _refuse_pinning(monkeypatch)
    x = torch.arange(6)
    assert to_device(x, torch.device("cpu")) is x
    assert torch.equal(to_device(x, torch.device("cpu:0")), x)
    assert to_device(x, torch.device("meta")).device.type == "meta"
    # every view's draws reach the images' device through it: nothing is pinned on the CPU
    for kind in ("flip", "weak"):
        View(SPEC, kind, 32, strong=True)(images(8, 36, 36))


def test_to_device_to_a_gpu_pins_then_copies_without_waiting(monkeypatch):
    # a copy from pageable memory makes the host wait for the GPU's queue; from pinned memory
    # with non_blocking=True it is queued (simulated here: this machine may have no GPU)
    calls = []
    monkeypatch.setattr(torch.Tensor, "is_pinned", lambda self: getattr(self, "_pinned", False))

    def pin_memory(self):
        calls.append("pin")
        pinned = self.clone()
        pinned._pinned = True
        return pinned

    def to(self, *args, **kwargs):
        calls.append(("to", args, kwargs, self.is_pinned()))
        return self

    monkeypatch.setattr(torch.Tensor, "pin_memory", pin_memory)
    monkeypatch.setattr(torch.Tensor, "to", to)
    gpu = torch.device("cuda", 1)
    to_device(torch.arange(3), gpu)
    assert calls == ["pin", ("to", (gpu,), {"non_blocking": True}, True)]
    calls.clear()
    already = torch.arange(3)
    already._pinned = True  # a DataLoader's pinned batch is not pinned again
    to_device(already, gpu)
    assert calls == [("to", (gpu,), {"non_blocking": True}, True)]


def test_unknown_view_kind_names_the_parameter():
    with pytest.raises(PretrainReuseError, match=r"kind='wek'.*did you mean 'weak'"):
        View(SPEC, "wek", 32)


# FixMatch's strong augmentation: RandAugmentMC and CutoutAbs against the PIL calls of its
# reference code (kekmodel/FixMatch-pytorch, dataset/randaugment.py)


def uint8_images(n: int, height: int, width: int, seed: int = 0) -> np.ndarray:
    """(n, H, W, 3) uint8 RGB images, each channel uniform over its own random range of levels
    (so that AutoContrast and Equalize have work to do); the first image's red is constant."""
    rng = np.random.default_rng(seed)
    low = rng.integers(0, 120, (n, 1, 1, 3))
    high = rng.integers(130, 256, (n, 1, 1, 3))
    out = (low + rng.random((n, height, width, 3)) * (high - low + 1)).astype(np.uint8)
    out[0, ..., 0] = 77
    return out


def as_float(u8: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(u8).permute(0, 3, 1, 2).float() / 255


def as_levels(x: torch.Tensor) -> np.ndarray:
    """(n, H, W, 3) float64 values times 255, to compare with PIL's 8-bit results."""
    return x.permute(0, 2, 3, 1).double().numpy() * 255


def fixmatch_pil(name: str, img: Image.Image, v: int, negative: bool) -> Image.Image:
    """FixMatch's operation ``name`` at magnitude ``v`` with its random sign fixed: the PIL call
    its function in ``fixmatch_augment_pool`` makes (``_float_parameter(v, max) = v * max / 10``,
    ``_int_parameter = int(v * max / 10)``, the sign applied before ``int()``)."""
    sign = -1 if negative else 1
    factor = v * 0.9 / 10 + 0.05
    shear = sign * (v * 0.3 / 10)  # also TranslateX/Y's shift as a fraction of the size
    width, height = img.size
    calls = {
        "AutoContrast": lambda: ImageOps.autocontrast(img),
        "Brightness": lambda: ImageEnhance.Brightness(img).enhance(factor),
        "Color": lambda: ImageEnhance.Color(img).enhance(factor),
        "Contrast": lambda: ImageEnhance.Contrast(img).enhance(factor),
        "Equalize": lambda: ImageOps.equalize(img),
        "Identity": lambda: img,
        "Posterize": lambda: ImageOps.posterize(img, int(v * 4 / 10) + 4),
        "Rotate": lambda: img.rotate(sign * int(v * 30 / 10)),
        "Sharpness": lambda: ImageEnhance.Sharpness(img).enhance(factor),
        "ShearX": lambda: img.transform(img.size, Image.AFFINE, (1, shear, 0, 0, 1, 0)),
        "ShearY": lambda: img.transform(img.size, Image.AFFINE, (1, 0, 0, shear, 1, 0)),
        "Solarize": lambda: ImageOps.solarize(img, 256 - int(v * 256 / 10)),
        "TranslateX": lambda: img.transform(img.size, Image.AFFINE, (1, 0, int(shear * width), 0, 1, 0)),
        "TranslateY": lambda: img.transform(img.size, Image.AFFINE, (1, 0, 0, 0, 1, int(shear * height))),
    }
    return calls[name]()


#: The range of (ours x 255 - PIL's 8-bit result) that PIL's rounding allows, per operation. Ours
#: is exact; PIL truncates each blend (ImageEnhance) and AutoContrast's table to an integer, so
#: it is 0 to 1 level below. Color and Sharpness blend with a grey / smoothed image that PIL first
#: rounds to the nearest level (half a level either way, weighted by 1 - factor < 1): -1/2 to 3/2.
#: Contrast blends with the mean of the grey image rounded per pixel, itself rounded to a level
#: (up to a level either way): -1 to 2. The table lookups (Equalize, Posterize, Solarize) read the
#: same level as PIL and nearest-neighbour geometry takes PIL's pixel: exact.
PIL_ROUNDING = {
    "AutoContrast": (0, 1), "Brightness": (0, 1), "Color": (-0.5, 1.5), "Contrast": (-1, 2),
    "Sharpness": (-0.5, 1.5),
}


@pytest.mark.parametrize(("height", "width"), [(32, 32), (30, 36)])
@pytest.mark.parametrize("index", range(len(POOL)), ids=[name for name, *_ in POOL])
def test_each_operation_is_fixmatchs_pil_call_at_every_magnitude_and_sign(index, height, width):
    name = POOL[index][0]
    u8 = uint8_images(8, height, width)
    x = as_float(u8)
    low, high = PIL_ROUNDING.get(name, (0, 0))
    for v in range(1, 10):
        for negative in (False, True):
            draws = RandAugmentDraws(op=torch.full((8, 1), index), magnitude=torch.full((8, 1), v),
                                     applied=torch.ones(8, 1, dtype=torch.bool),
                                     negative=torch.full((8, 1), negative))
            ours = as_levels(randaugment_mc(x, draws))
            pil = np.stack([np.asarray(fixmatch_pil(name, Image.fromarray(a), v, negative)) for a in u8])
            diff = ours - pil
            # 1e-3: float32 arithmetic on values that are multiples of 1/255
            assert low - 1e-3 <= diff.min() and diff.max() <= high + 1e-3, (v, negative, diff.min(),
                                                                             diff.max())


def test_equalize_is_pils_on_its_edge_cases():
    # 301 pixels: levels 0..254, 0..44 and one 255, so the table passes 255 and is clipped;
    # a single level, and two levels with too few pixels below the top (step 0), are left alone
    clipped = np.concatenate([np.arange(255), np.arange(45), [255]])
    single = np.full(301, 200)
    two = np.where(np.arange(301) < 150, 10, 240)
    spread = np.random.default_rng(1).integers(100, 111, 301)
    u8 = np.stack([np.stack([clipped, single, two], -1), np.stack([spread, two, clipped], -1)])
    u8 = u8.reshape(2, 7, 43, 3).astype(np.uint8)
    pil = np.stack([np.asarray(ImageOps.equalize(Image.fromarray(a))) for a in u8])
    assert np.abs(as_levels(equalize(as_float(u8))) - pil).max() < 1e-3


def test_randaugment_draws_are_uniform_and_with_replacement():
    from scipy.stats import chi2

    torch.manual_seed(0)
    n = 20000
    draws = draw_randaugment(n, 2)
    counts = torch.bincount(draws.op.flatten(), minlength=len(POOL)).double()
    expected = 2 * n / len(POOL)
    assert ((counts - expected) ** 2 / expected).sum() < chi2.ppf(0.999, len(POOL) - 1)
    # with replacement: both slots draw the same operation at rate 1/14
    same = (draws.op[:, 0] == draws.op[:, 1]).double().mean().item()
    assert abs(same - 1 / 14) < 4 * math.sqrt(1 / 14 * 13 / 14 / n)
    counts = torch.bincount(draws.magnitude.flatten(), minlength=10).double()
    assert counts[0] == 0 and len(counts) == 10  # magnitudes 1..9 (np.random.randint(1, 10))
    expected = 2 * n / 9
    assert ((counts[1:] - expected) ** 2 / expected).sum() < chi2.ppf(0.999, 8)
    for rate in (draws.applied.double().mean().item(), draws.negative.double().mean().item()):
        assert abs(rate - 0.5) < 4 * math.sqrt(0.25 / (2 * n))


def test_each_image_goes_through_its_own_draws():
    x = as_float(uint8_images(32, 24, 24))
    before = x.clone()
    torch.manual_seed(1)
    draws = draw_randaugment(32, 2)
    out = randaugment_mc(x, draws)
    assert torch.equal(x, before)  # the input is not changed
    for i in range(32):
        alone = RandAugmentDraws(draws.op[i:i + 1], draws.magnitude[i:i + 1], draws.applied[i:i + 1],
                                 draws.negative[i:i + 1])
        torch.testing.assert_close(out[i:i + 1], randaugment_mc(x[i:i + 1], alone), atol=1e-6, rtol=0)
        if not draws.applied[i].any():
            assert torch.equal(out[i], x[i])


def test_strong_view_augments_copies_of_one_image_differently():
    x = images(1, 32, 32).expand(64, -1, -1, -1)
    torch.manual_seed(0)
    out = View(SPEC, "flip", 32, strong=True, cutout=0.0)(x)
    # a quarter of the images have no operation applied (one of two flips); most others differ
    assert len(torch.unique(out.flatten(1), dim=0)) >= 32


def test_strong_view_is_its_view_then_randaugment_then_cutout():
    x = images(8, 36, 36)
    torch.manual_seed(5)
    out = View(SPEC, "weak", 32, strong=True, cutout=0.5, ops=2)(x)
    torch.manual_seed(5)
    y = crop_resize(x, resized_crop_boxes(8, 36, 36), (32, 32), mirror=hflip_mask(8))
    y = randaugment_mc(y, draw_randaugment(8, 2))
    y = cutout_abs(y, 16, cutout_centres(8, 32, 32))
    torch.testing.assert_close(out, (y - MEAN) / STD)


def fixmatch_cutout(u8: np.ndarray, side: int, centre: tuple[float, float]) -> np.ndarray:
    """FixMatch's CutoutAbs(img, side) at a given centre: the box from the clipped top-left corner,
    drawn by PIL's rectangle (both corners included) in (127, 127, 127)."""
    img = Image.fromarray(u8)
    x0 = int(max(0, centre[0] - side / 2.0))
    y0 = int(max(0, centre[1] - side / 2.0))
    x1 = int(min(img.size[0], x0 + side))
    y1 = int(min(img.size[1], y0 + side))
    ImageDraw.Draw(img).rectangle((x0, y0, x1, y1), (127, 127, 127))
    return np.asarray(img)


@pytest.mark.parametrize(("height", "width", "side"), [(32, 32, 16), (30, 36, 7), (32, 32, 1)])
def test_cutout_abs_is_fixmatchs_pil_rectangle(height, width, side):
    u8 = uint8_images(12, height, width)
    corners = [[0, 0], [width - 1e-3, 0], [0, height - 1e-3], [width - 1e-3, height - 1e-3],
               [width / 2, height / 2]]
    torch.manual_seed(2)
    centres = torch.cat([torch.tensor(corners), cutout_centres(7, height, width)])
    out = as_levels(cutout_abs(as_float(u8), side, centres))
    pil = np.stack([fixmatch_cutout(a, side, c) for a, c in zip(u8, centres.tolist(), strict=True)])
    assert np.abs(out - pil).max() < 1e-3  # the same box, filled with 127/255


def test_cutout_box_is_moved_inside_at_the_top_left_and_cut_at_the_bottom_right():
    centres = torch.tensor([[0.0, 0.0], [31.999, 31.999], [16.0, 16.0], [2.5, 30.0]])
    erased = cutout_abs(torch.zeros(4, 1, 32, 32), 16, centres)[:, 0] == CUTOUT_GRAY
    rows, cols = erased.any(2), erased.any(1)
    spans = [(r.nonzero().min().item(), r.nonzero().max().item(), c.nonzero().min().item(),
              c.nonzero().max().item()) for r, c in zip(rows, cols, strict=True)]
    # (top, bottom, left, right): side + 1 = 17 pixels where it fits (PIL's rectangle includes
    # both corners); a box from a centre within side/2 of the top or left edge starts at 0 and
    # keeps its size; one past the bottom or right edge is cut there
    assert spans == [(0, 16, 0, 16), (23, 31, 23, 31), (8, 24, 8, 24), (22, 31, 0, 16)]
    assert (erased.flatten(1).sum(1) == (rows.sum(1) * cols.sum(1))).all()  # boxes


def test_cutout_centres_are_uniform_over_the_image():
    torch.manual_seed(0)
    n, size, side = 20000, 32, 16
    erased = cutout_abs(torch.zeros(n, 1, size, size), side, cutout_centres(n, size, size))[:, 0] > 0
    for spans in (erased.any(2), erased.any(1)):  # rows, columns
        start = spans.int().argmax(1)
        # start = floor(max(0, U size - side/2)): 0 with probability (side/2 + 1)/size, then each
        # of 1..size - side/2 - 1 with probability 1/size
        expected = torch.zeros(size, dtype=torch.float64)
        expected[0] = (side / 2 + 1) / size
        expected[1:size - side // 2] = 1 / size
        freq = torch.bincount(start, minlength=size).double() / n
        assert (freq - expected).abs().max() < 4 * math.sqrt(0.3 * 0.7 / n)
        assert torch.equal(spans.sum(1), (size - start).clamp(max=side + 1))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_strong_view_draws_the_same_views_on_cpu_and_cuda():
    x = images(32, 36, 36)
    view = View(SPEC, "weak", 32, strong=True)
    torch.manual_seed(3)
    cpu = view(x)
    torch.manual_seed(3)
    cuda = view.cuda()(x.cuda()).cpu()
    # the same draws; the bilinear crop differs by float rounding, which can move a value across
    # an 8-bit level boundary in the level-based operations, so a few values may differ
    assert ((cuda - cpu).abs() < 1e-4).double().mean() > 0.99
