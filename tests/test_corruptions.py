"""Common corruptions (ImageNet-C) against scikit-image, closed forms and noise statistics, and
evaluate on corrupted images against predictions computed by hand."""

import json
import re
from dataclasses import replace

import numpy as np
import pytest
import torch
from skimage.color import hsv2rgb, rgb2hsv
from skimage.filters import gaussian

from pretrain_reuse.cli import main
from pretrain_reuse.data.catalog import open_dataset
from pretrain_reuse.data.datasets import ArrayDataset
from pretrain_reuse.errors import PretrainReuseError
from pretrain_reuse.features import hash_ids
from pretrain_reuse.finetune.corruptions import CORRUPTIONS, corrupt, parse_corruption
from pretrain_reuse.finetune.evaluate import evaluate_model
from pretrain_reuse.models import create_backbone, save_backbone


def _images(n: int = 3, side: int = 20, seed: int = 0) -> torch.Tensor:
    return torch.from_numpy(np.random.default_rng(seed).random((n, 3, side, side))).float()


@pytest.mark.parametrize("severity, input_size", [(1, None), (3, None), (5, 224), (2, 448)])
def test_gaussian_blur_is_scikit_images_filter_as_imagenet_c_calls_it(severity, input_size):
    x = _images(side=40)
    got = corrupt(x, "gaussian-blur", severity, input_size=input_size)
    sigma = CORRUPTIONS["gaussian-blur"][severity - 1] * (input_size or 40) / 224
    for i in range(len(x)):
        want = gaussian(x[i].permute(1, 2, 0).double().numpy(), sigma=sigma, mode="nearest",
                        truncate=4.0, channel_axis=-1, preserve_range=True)
        np.testing.assert_allclose(got[i].permute(1, 2, 0).numpy(), want, atol=2e-6)


@pytest.mark.parametrize("severity", [1, 5])
def test_brightness_raises_the_hsv_value_as_imagenet_c_does(severity):
    x = _images(n=2)
    x[0, :, :3, :3] = 0.0  # black pixels: no hue, they turn grey
    c = CORRUPTIONS["brightness"][severity - 1]
    got = corrupt(x, "brightness", severity)
    for i in range(len(x)):
        hsv = rgb2hsv(x[i].permute(1, 2, 0).double().numpy())
        hsv[..., 2] = np.clip(hsv[..., 2] + c, 0, 1)
        np.testing.assert_allclose(got[i].permute(1, 2, 0).numpy(), hsv2rgb(hsv), atol=1e-5)


def test_contrast_shrinks_each_channel_towards_its_mean():
    x = _images()
    c = CORRUPTIONS["contrast"][2]
    m = x.mean(dim=(2, 3), keepdim=True)
    torch.testing.assert_close(corrupt(x, "contrast", 3), (x - m) * c + m)


def test_noises_have_their_distributions():
    grey = torch.full((4, 3, 64, 64), 0.5)
    g = torch.Generator().manual_seed(0)
    noisy = corrupt(grey, "gaussian-noise", 2, generator=g) - 0.5  # 0.5 +- 0.12: never clipped
    assert abs(noisy.mean().item()) < 0.005 and noisy.std().item() == pytest.approx(0.12, rel=0.02)
    shot = corrupt(grey, "shot-noise", 3, generator=g)  # Poisson(12 * 0.5) / 12
    assert shot.mean().item() == pytest.approx(0.5, abs=0.005)
    assert shot.var().item() == pytest.approx(0.5 / 12, rel=0.05)
    assert torch.allclose(shot * 12, (shot * 12).round(), atol=1e-4)  # counts of photons
    impulse = corrupt(grey, "impulse-noise", 4, generator=g)
    salt, pepper = (impulse == 1).float().mean().item(), (impulse == 0).float().mean().item()
    assert salt + pepper == pytest.approx(0.17, abs=0.006) and salt == pytest.approx(pepper, abs=0.006)
    assert ((impulse == 0.5) | (impulse == 0) | (impulse == 1)).all()


def test_the_same_generator_seed_gives_the_same_corruption():
    x = _images()
    runs = [corrupt(x, "impulse-noise", 2, generator=torch.Generator().manual_seed(s)) for s in (1, 1, 2)]
    assert torch.equal(runs[0], runs[1]) and not torch.equal(runs[0], runs[2])


@pytest.mark.parametrize("name", ["gaussian-noise", "shot-noise", "impulse-noise"])
def test_an_image_is_corrupted_alike_in_batches_of_any_size_on_the_cpu(name):
    # impulse noise drew its two uniforms as (2, B, ...): 6 images as 2 + 4 came out otherwise
    x = torch.rand(6, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    whole = corrupt(x, name, 3, generator=torch.Generator().manual_seed(5))
    g = torch.Generator().manual_seed(5)
    parts = torch.cat([corrupt(x[:2], name, 3, generator=g), corrupt(x[2:], name, 3, generator=g)])
    assert torch.equal(whole, parts)


@pytest.mark.parametrize("text", ["fog:3", "gaussian-noise", "gaussian-noise:0", "contrast:6",
                                  "contrast:x", ":3"])
def test_a_corruption_that_is_not_name_and_severity_is_one_line(text):
    with pytest.raises(PretrainReuseError, match=r"is not NAME:SEVERITY with a severity of 1-5"):
        parse_corruption(text)


def test_an_image_that_is_no_batch_is_one_line():
    with pytest.raises(PretrainReuseError,
                       match=r"images must be a \(B, C, H, W\) batch, got shape \(3, 8, 8\)"):
        corrupt(torch.rand(3, 8, 8), "contrast", 1)


def test_every_corruption_keeps_images_in_range():
    x = _images(side=32)
    for name in CORRUPTIONS:
        for severity in range(1, 6):
            y = corrupt(x, name, severity, generator=torch.Generator().manual_seed(0))
            assert y.shape == x.shape and y.min() >= 0 and y.max() <= 1, (name, severity)


def test_evaluate_scores_the_centre_crops_corrupted_as_by_hand(tmp_path):
    # the labels are the model's own predictions on centre crops whose contrast was lowered here
    # (ImageNet-C corrupts its 224-pixel crops): the corrupted evaluation must score 1.0, the
    # clean one less. A white frame outside the crop would change the contrast's mean if the
    # corruption saw the whole image.
    torch.manual_seed(0)
    model = create_backbone("smallcnn", num_classes=10).eval()
    model.spec = replace(model.spec, resize_size=48)  # a 32-pixel crop of the 48-pixel image
    pixels = np.random.default_rng(1).integers(0, 256, (40, 48, 48, 3), dtype=np.uint8)
    pixels[:, :8], pixels[:, -8:], pixels[:, :, :8], pixels[:, :, -8:] = 255, 255, 255, 255
    crop = torch.from_numpy(pixels[:, 8:40, 8:40]).permute(0, 3, 1, 2).float() / 255
    m = crop.mean(dim=(2, 3), keepdim=True)
    low = (crop - m) * CORRUPTIONS["contrast"][4] + m
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in (model.spec.mean, model.spec.std))
    with torch.no_grad():
        labels = model((low - mean) / std).argmax(1).numpy()
    data = ArrayDataset(pixels, labels)
    assert evaluate_model(model, data, corruption="contrast:5")["top1"] == 1.0
    assert evaluate_model(model, data)["top1"] < 1.0


def test_evaluate_records_the_corruption_and_its_seed(tmp_path, capsys):
    torch.manual_seed(0)
    weights = tmp_path / "m.safetensors"
    save_backbone(create_backbone("smallcnn", num_classes=10), weights, {})
    argv = ["evaluate", "--model", "smallcnn", "--weights", str(weights), "--data",
            "synthetic:target", "--corruption", "gaussian-noise:5", "--seed", "3", "--quiet"]
    scores = []
    for name in ("a", "b"):
        assert main([*argv, "--out", str(tmp_path / f"{name}.json")]) == 0
        scores.append(json.loads((tmp_path / f"{name}.json").read_text()))
    captured = capsys.readouterr()
    assert "of synthetic:target (test) corrupted by gaussian-noise:5 (seed 3)" in captured.out
    assert "evaluate" not in captured.err  # --quiet: no progress bar
    # without --quiet, a bar over the batches (evaluate said nothing until it was done)
    assert main([*argv[:-1], "--out", str(tmp_path / "bar.json")]) == 0
    assert re.search(r"evaluate: +\d+%.*batch", capsys.readouterr().err)  # how far tqdm draws
    assert scores[0]["top1"] == scores[1]["top1"]
    assert scores[0]["meta"]["params"]["corruption"] == "gaussian-noise:5"
    assert scores[0]["meta"]["seed"] == 3
    # the data scored, as explain records it, with its samples (only the weights were recorded)
    test = open_dataset("synthetic:target", split="test")
    assert {k: scores[0]["meta"]["inputs"][k] for k in ("data", "ids", "n")} == {
        "data": test.source, "ids": hash_ids(test.ids), "n": len(test)}
    rc = main([*argv[:-5], "--corruption", "fog:3", "--out", str(tmp_path / "c.json")])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "corruption 'fog:3' is not NAME:SEVERITY" in err
    assert not (tmp_path / "c.json").exists()
    rc = main([*argv[:-5], "--seed", "-1", "--out", str(tmp_path / "c.json")])  # before any model
    assert rc == 2 and "argument --seed: seed must be an integer" in capsys.readouterr().err
