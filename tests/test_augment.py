"""The views' hand-written batched ops against kornia (which they replace), per-image
``F.interpolate`` and closed forms: crop boxes, bilinear resize, flip, centre crop, Cutout; and
the views' reproducibility under a seed (what a resumed run relies on)."""

from __future__ import annotations

import math

import kornia.augmentation as K
import pytest
import torch
import torch.nn.functional as F

from pretrain_reuse.errors import PretrainReuseError
from pretrain_reuse.finetune.augment import (
    View,
    center_crop,
    crop_resize,
    erase_squares,
    hflip,
    hflip_mask,
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


@pytest.mark.parametrize("side", [16, 8, 1, 32])
def test_cutout_is_kornias_random_erasing_under_the_same_seed(side):
    x = images(64, 32, 32)
    area = side * side / (32 * 32)
    erasing = K.RandomErasing(scale=(area, area), ratio=(1.0, 1.0), value=0.5, p=1.0)
    torch.manual_seed(3)
    expected = erasing(x)
    torch.manual_seed(3)
    torch.rand(64), torch.rand(64)  # kornia's draws of the (here constant) area and ratio
    assert torch.equal(erase_squares(x, side, 0.5), expected)


def test_cutout_positions_cover_every_place_the_square_fits():
    x = torch.zeros(4000, 1, 10, 10)
    torch.manual_seed(0)
    erased = erase_squares(x, 4, 1.0)[:, 0]
    rows, cols = erased.any(2), erased.any(1)
    assert (erased.flatten(1).sum(1) == 16).all()
    assert (rows.sum(1) == 4).all() and (cols.sum(1) == 4).all()
    top, left = rows.int().argmax(1), cols.int().argmax(1)
    assert set(top.tolist()) == set(range(7)) and set(left.tolist()) == set(range(7))


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


def test_unknown_view_kind_names_the_parameter():
    with pytest.raises(PretrainReuseError, match=r"kind='wek'.*did you mean 'weak'"):
        View(SPEC, "wek", 32)
